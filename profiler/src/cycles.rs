//! Call cycles between watched functions: structural evidence of a loop.
//!
//! The kernel records, for each call of a watched function, the return
//! address in its caller; the collector resolves those to caller functions
//! (through the process's mappings, parsed here, and the catalog's code
//! ranges). Here the (caller, callee) pairs become a graph, and a cycle in
//! it is a loop that needs no rate history to be recognised.
//!
//! Pure: mappings come in as `/proc/PID/maps` text.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// One file-backed mapping of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    /// The file's inode: a path may name another build since it was mapped.
    pub inode: u64,
    /// The path, without the " (deleted)" of a file replaced since.
    pub path: PathBuf,
}

/// Parses the file-backed mappings of `/proc/PID/maps` text.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(6, ' ');
            let (range, _perms, offset) = (fields.next()?, fields.next()?, fields.next()?);
            let _device = fields.next()?;
            let inode = fields.next()?.parse().ok()?;
            let path = fields.next()?.trim_start();
            if !path.starts_with('/') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                offset: u64::from_str_radix(offset, 16).ok()?,
                inode,
                path: PathBuf::from(path.strip_suffix(" (deleted)").unwrap_or(path)),
            })
        })
        .collect()
}

/// A cycle in the caller -> callee graph, in call order, starting from its
/// smallest function (so the same cycle always reads the same way).
pub fn find_cycle(edges: &BTreeSet<(u32, u32)>) -> Option<Vec<u32>> {
    let mut next: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for &(caller, callee) in edges {
        next.entry(caller).or_default().push(callee);
    }
    let mut best: Option<Vec<u32>> = None;
    for &start in next.keys() {
        // Depth-first search for a path back to `start` through functions
        // not smaller than it: each cycle is found from its smallest member.
        let mut stack = vec![(start, vec![start])];
        let mut seen = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for &callee in next.get(&node).into_iter().flatten() {
                if callee == start {
                    if best.as_ref().is_none_or(|b| path.len() < b.len()) {
                        best = Some(path.clone());
                    }
                } else if callee > start && seen.insert(callee) {
                    let mut longer = path.clone();
                    longer.push(callee);
                    stack.push((callee, longer));
                }
            }
        }
        if best.is_some() {
            return best;
        }
    }
    None
}

/// Transitions out of a key under this many in a reading say nothing of
/// its successor.
pub const MIN_KEY_TRANSITIONS: u64 = 8;
/// A successor is the key's own when it takes this share of its
/// transitions: a loop walks the same way every time, traffic does not.
pub const DOMINANT_SHARE: f64 = 0.6;

/// The key cycle in one reading's transitions `(from, to, count)`: each
/// key's dominant successor (if it has one) is followed until a key comes
/// back. Returns the cycle (at least two keys) whose transitions are the
/// most, and those transitions' count. Keys are listed in the order they
/// follow each other, starting anywhere (see [`entry_first`]).
pub fn key_cycle(transitions: &[(u64, u64, u64)]) -> Option<(Vec<u64>, u64)> {
    let mut out: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    for &(from, to, n) in transitions {
        let e = out.entry(from).or_insert((0, from, 0));
        // A key following itself counts in its total, never as its
        // successor: two hot keys interleaving at random follow themselves
        // as often as each other, and are no cycle.
        e.0 += n;
        if from == to {
            continue;
        }
        if n > e.2 || (n == e.2 && to < e.1) {
            (e.1, e.2) = (to, n);
        }
    }
    let next: BTreeMap<u64, (u64, u64)> = out
        .into_iter()
        .filter(|(_, (total, _, best))| {
            *total >= MIN_KEY_TRANSITIONS && *best as f64 >= DOMINANT_SHARE * *total as f64
        })
        .map(|(from, (_, to, best))| (from, (to, best)))
        .collect();
    let mut best: Option<(Vec<u64>, u64)> = None;
    let mut done = BTreeSet::new();
    for &start in next.keys() {
        let mut path = Vec::new();
        let mut at = start;
        // A functional graph: follow the one way out until it ends, meets
        // a walk already taken, or comes back on itself.
        let mut back = None;
        while !done.contains(&at) {
            if let Some(i) = path.iter().position(|&k| k == at) {
                back = Some(i);
                break;
            }
            path.push(at);
            match next.get(&at) {
                Some(&(to, _)) => at = to,
                None => break,
            }
        }
        if let Some(i) = back {
            let cycle = path[i..].to_vec();
            let weight = cycle.iter().map(|k| next[k].1).sum();
            if cycle.len() >= 2 && best.as_ref().is_none_or(|(_, w)| weight > *w) {
                best = Some((cycle, weight));
            }
        }
        done.extend(path);
    }
    best
}

/// Turns `cycle` so it starts where traffic enters it: the key the most
/// distinct keys outside the cycle led to (in `history`, every transition
/// still counted), then the one entered most often, then the smallest.
/// `page:catalog -> fragment:nav -> page:catalog` reads from the page
/// every product leads to, not from the fragment.
pub fn entry_first(cycle: &mut [u64], history: &[(u64, u64, u64)]) {
    let key = |k: u64| {
        let from_outside = history
            .iter()
            .filter(|&&(from, to, n)| to == k && n > 0 && !cycle.contains(&from));
        let distinct = from_outside.clone().count();
        let calls: u64 = from_outside.map(|&(_, _, n)| n).sum();
        (distinct, calls, std::cmp::Reverse(k))
    };
    if let Some(i) = (0..cycle.len()).max_by_key(|&i| key(cycle[i])) {
        cycle.rotate_left(i);
    }
}

/// The path of a file as the kernel shows it in mappings.
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edges(pairs: &[(u32, u32)]) -> BTreeSet<(u32, u32)> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn two_functions_calling_each_other_are_a_cycle() {
        assert_eq!(find_cycle(&edges(&[(1, 0), (0, 1)])), Some(vec![0, 1]));
    }

    #[test]
    fn a_function_calling_itself_is_a_cycle() {
        assert_eq!(find_cycle(&edges(&[(0, 1), (2, 2)])), Some(vec![2]));
    }

    #[test]
    fn longer_cycles_come_in_call_order() {
        // 3 -> 1 -> 2 -> 3, plus a branch that goes nowhere.
        let got = find_cycle(&edges(&[(3, 1), (1, 2), (2, 3), (2, 4)]));
        assert_eq!(got, Some(vec![1, 2, 3]));
    }

    #[test]
    fn chains_and_fans_are_not_cycles() {
        assert_eq!(find_cycle(&edges(&[(0, 1), (1, 2), (0, 2), (3, 2)])), None);
        assert_eq!(find_cycle(&edges(&[])), None);
    }

    #[test]
    fn keys_walking_the_same_way_again_and_again_are_a_key_cycle() {
        // page (1) -> nav (2) -> page, 5,000 times each; some noise.
        let got = key_cycle(&[(1, 2, 5000), (2, 1, 4999), (2, 7, 3), (9, 1, 2)]);
        assert_eq!(got, Some((vec![1, 2], 9999)));
    }

    #[test]
    fn traffic_without_a_dominant_way_back_is_no_key_cycle() {
        // Each key goes on to many others: writes of a healthy service.
        let mut t = Vec::new();
        for from in 0..20u64 {
            for to in 0..20u64 {
                if from != to {
                    t.push((from, to, 10));
                }
            }
        }
        assert_eq!(key_cycle(&t), None);
        // A chain that never comes back, and a key following itself.
        assert_eq!(key_cycle(&[(1, 2, 100), (2, 3, 100), (4, 4, 1000)]), None);
        // Two hot keys interleaving at random: each follows itself as
        // often as the other.
        assert_eq!(
            key_cycle(&[(1, 1, 500), (1, 2, 500), (2, 2, 500), (2, 1, 500)]),
            None
        );
        // Too few transitions to say.
        assert_eq!(key_cycle(&[(1, 2, 3), (2, 1, 3)]), None);
    }

    #[test]
    fn a_key_cycle_reads_from_where_traffic_enters_it() {
        let mut cycle = vec![2, 1];
        // Products 10..15 lead to the page (1); only the index (3) leads
        // to the fragment (2), as often in all.
        let mut history: Vec<(u64, u64, u64)> = (10..15).map(|p| (p, 1, 2)).collect();
        history.extend([(3, 2, 10), (1, 2, 500), (2, 1, 500)]);
        entry_first(&mut cycle, &history);
        assert_eq!(cycle, [1, 2]);
    }

    #[test]
    fn file_backed_mappings_are_parsed() {
        let maps = parse_maps(
            "55d0a0000000-55d0a0001000 r--p 00000000 08:01 42 /srv/cache\n\
             55d0a0001000-55d0a0005000 r-xp 00001000 08:01 42 /srv/cache\n\
             7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n\
             7f0000001000-7f0000002000 r-xp 00001000 08:01 43 /srv/lib cache.so (deleted)\n",
        );
        assert_eq!(maps.len(), 3);
        assert_eq!(maps[1].start, 0x55d0_a000_1000);
        assert_eq!(maps[1].offset, 0x1000);
        assert_eq!(maps[1].path, PathBuf::from("/srv/cache"));
        assert_eq!(maps[1].inode, 42);
        assert_eq!(maps[2].path, PathBuf::from("/srv/lib cache.so"));
        assert_eq!(maps[2].inode, 43);
    }
}
