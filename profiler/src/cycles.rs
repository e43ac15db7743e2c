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
