//! Discovery: which functions to count when the user named none.
//!
//! An on-call engineer often knows the process, not its code. Without
//! `--func` (and without a preset), cacheloop picks functions of the
//! target's own executable itself, two ways:
//!
//! - **by name**, at attach: functions whose name has a word that reads
//!   like invalidation (invalidate, purge, evict, expire, delete, flush,
//!   ban), at most [`MAX_NAMED`] per executable;
//! - **by heat**, all along: the kernel samples the target's on-CPU user
//!   stacks at [`SAMPLE_HZ`] per CPU; each sample is put down to the first
//!   of its innermost frames that lies in a named function of the target's
//!   own executable (time in libc's memcpy counts for the function that
//!   called it). A function that takes [`HOT_SHARE`] of the samples of the
//!   last [`HOT_WINDOW`] seconds (and at least [`HOT_MIN_SAMPLES`]) is
//!   picked, at most [`MAX_HOT`] per run. A loop that starts later shows
//!   up within a window.
//!
//! Picked functions are then counted and judged like named ones, with one
//! difference (see `detect.rs`): a function picked for its heat alone has
//! no history when it is picked, and heat is no evidence (a busy parser is
//! hot all day), so it cannot be called a loop on structure alone the way a
//! named function running at attach can; it needs its process's learned
//! CPU to have risen.
//!
//! Pure: samples and symbols come in, picks go out.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::{catalog::FileId, cycles::Mapping, symbolize::CodeIndex, symbols::Symbol};

/// On-CPU samples per second per CPU: low enough to cost nothing worth
/// measuring (one perf-event program run per CPU per tick, returning at
/// once for other processes), enough for a loop pinning a core to give
/// about 150 samples in [`HOT_WINDOW`].
pub const SAMPLE_HZ: u64 = 49;
/// Functions picked by name, at most, per executable.
pub const MAX_NAMED: usize = 32;
/// Functions picked by heat, at most, over the run.
pub const MAX_HOT: usize = 16;
/// Seconds of samples a pick is judged on.
pub const HOT_WINDOW: f64 = 3.0;
/// Share of the window's samples (of the watched processes, in their own
/// code) that makes a function hot.
pub const HOT_SHARE: f64 = 0.10;
/// Samples a function needs in the window to be hot: a nearly idle process
/// has a few samples, and one of them is no hot set.
pub const HOT_MIN_SAMPLES: u64 = 8;

/// Words that read like invalidation, and the word the records cite. Each
/// matches a whole word of the name, in any case, with common endings
/// (`evicted`, `purges`, `expiry`, `deletion`, `flushing`, `banned`).
const WORDS: &[(&str, &[&str])] = &[
    (
        "invalidate",
        &[
            "invalidate",
            "invalidates",
            "invalidated",
            "invalidation",
            "invalidating",
            "inval",
        ],
    ),
    ("purge", &["purge", "purges", "purged", "purging"]),
    (
        "evict",
        &["evict", "evicts", "evicted", "eviction", "evicting"],
    ),
    (
        "expire",
        &[
            "expire",
            "expires",
            "expired",
            "expiry",
            "expiration",
            "expiring",
        ],
    ),
    (
        "delete",
        &[
            "delete", "deletes", "deleted", "deletion", "deleting", "del",
        ],
    ),
    ("flush", &["flush", "flushes", "flushed", "flushing"]),
    ("ban", &["ban", "bans", "banned", "banning"]),
];

/// The invalidation word a function's name has, if any. Names are split
/// into words at `_`, `:`, `.`, digits and lower-to-upper case changes
/// (`dictDelete`, `HSH_Purge`, `Cache::evict_entry`), so `urban` or
/// `banner` have no `ban`, nor `model` a `del`.
pub fn invalidation_word(name: &str) -> Option<&'static str> {
    // The name without a C++ parameter list or a Rust hash suffix.
    let name = name.split('(').next().unwrap_or(name);
    words(name).find_map(|word| {
        let word = word.to_ascii_lowercase();
        WORDS
            .iter()
            .find(|(_, forms)| forms.contains(&word.as_str()))
            .map(|(cited, _)| *cited)
    })
}

/// The words of an identifier.
fn words(name: &str) -> impl Iterator<Item = &str> + '_ {
    let bytes = name.as_bytes();
    let mut cuts = vec![0];
    for i in 1..bytes.len() {
        let (a, b) = (bytes[i - 1], bytes[i]);
        let boundary = !b.is_ascii_alphabetic()
            || !a.is_ascii_alphabetic()
            || (a.is_ascii_lowercase() && b.is_ascii_uppercase())
            // `HTTPPurge`: the last capital of a run starts the next word.
            || (a.is_ascii_uppercase()
                && b.is_ascii_uppercase()
                && bytes.get(i + 1).is_some_and(u8::is_ascii_lowercase));
        if boundary {
            cuts.push(i);
        }
    }
    cuts.push(bytes.len());
    let pieces: Vec<&str> = cuts
        .windows(2)
        .map(|w| name[w[0]..w[1]].trim_matches(|c: char| !c.is_ascii_alphabetic()))
        .filter(|w| !w.is_empty())
        .collect();
    pieces.into_iter()
}

/// Runtime and C library functions a static executable carries: never
/// picked, and a sample in one is put down to its caller.
const RUNTIME: &[&str] = &[
    "main",
    "start_thread",
    "clone",
    "clone3",
    "memcpy",
    "memmove",
    "memset",
    "memcmp",
    "bcmp",
    "strlen",
    "strcmp",
    "strncmp",
    "strcpy",
    "strncpy",
    "strchr",
    "strrchr",
    "strstr",
    "malloc",
    "free",
    "calloc",
    "realloc",
    "aligned_alloc",
    "posix_memalign",
    "abort",
    "exit",
    "printf",
    "fprintf",
    "snprintf",
    "vsnprintf",
    "sprintf",
    "vfprintf",
    "fwrite",
    "fflush",
    "write",
    "read",
    "nanosleep",
    "usleep",
    "clock_gettime",
    "gettimeofday",
    "syscall",
    "qsort",
];

/// Whether a function is the program's own code, not its language's
/// runtime: not a reserved name (`_start`, `__libc_start_main`,
/// `_Unwind_DeleteException`), not Rust's `std`/`core`/`alloc` (a Rust
/// executable carries them, `std::io::Write::flush` included), not C++'s
/// `std::`, not a C library function a static executable carries. Only
/// these are picked; a sample elsewhere is put down to its caller.
pub fn own_code(name: &str) -> bool {
    !(name.starts_with('_')
        || runtime_path(name)
        || name.starts_with("pthread_")
        || RUNTIME.contains(&name))
}

/// Rust's and C++'s runtime crates and namespaces.
const RUNTIME_CRATES: &[&str] = &[
    "std::",
    "core::",
    "alloc::",
    "compiler_builtins::",
    "__gnu_cxx::",
];

/// Whether a path names runtime code: it starts in a runtime crate, or it
/// is an impl (`<T as Trait>::f`, `<T>::f`) for a type that is the
/// runtime's (`<u64 as core::iter::Step>::forward_unchecked`,
/// `<alloc::vec::Vec<u8> as std::io::Write>::flush`), but not an impl of a
/// runtime trait for the program's own type
/// (`<fixture::Kind as core::cmp::PartialEq>::eq` is the program's).
fn runtime_path(name: &str) -> bool {
    match name.strip_prefix('<') {
        Some(inner) => {
            let ty = inner.trim_start_matches(['&', '*', '(', '[']);
            let ty = ty
                .strip_prefix("mut ")
                .or_else(|| ty.strip_prefix("const "))
                .or_else(|| ty.strip_prefix("dyn "))
                .unwrap_or(ty);
            let primitive = ty
                .split(|c: char| !c.is_ascii_alphanumeric())
                .next()
                .is_some_and(|first| PRIMITIVES.contains(&first));
            primitive || inner.starts_with(['&', '*', '(', '[']) || runtime_path(ty)
        }
        None => RUNTIME_CRATES.iter().any(|c| name.starts_with(c)),
    }
}

const PRIMITIVES: &[&str] = &[
    "u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize", "f32",
    "f64", "bool", "char", "str",
];

/// A function picked, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Pick {
    pub file: FileId,
    pub name: String,
    pub why: Why,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Why {
    /// Its name has this invalidation word.
    Name(&'static str),
    /// It took this many of the window's samples (of `of`).
    Hot { samples: u64, of: u64 },
}

impl Why {
    /// In words, for records.
    pub fn describe(&self) -> String {
        match self {
            Self::Name(word) => format!("its name reads like invalidation ({word})"),
            Self::Hot { samples, of } => format!(
                "hot: {samples} of the last {HOT_WINDOW:.0} s's {of} on-CPU samples ({:.0}%)",
                100.0 * *samples as f64 / (*of).max(1) as f64
            ),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Name(_) => "name",
            Self::Hot { .. } => "hot",
        }
    }
}

/// Words that make a name a check or a lookup that runs on every request
/// (`keyIsExpired`, `getExpire`, `expireIfNeeded`, `checkEviction`), or an
/// allocator (`operator delete`): never picked by name, whatever else
/// they say.
const NOT_INVALIDATION: &[&str] = &[
    "get", "is", "has", "should", "can", "check", "lookup", "find", "if", "needed", "maybe",
    "operator", "test", "count", "stat", "stats", "time", "ttl",
];

/// Whether a name reads like invalidation and is not a check, a lookup or
/// an allocator.
fn invalidation_pick(name: &str) -> Option<&'static str> {
    let bare = name.split('(').next().unwrap_or(name);
    if words(bare).any(|w| NOT_INVALIDATION.contains(&w.to_ascii_lowercase().as_str())) {
        return None;
    }
    invalidation_word(name)
}

/// The functions of an executable picked by name: entries (no `.cold`
/// fragments), one per name, at most [`MAX_NAMED`], those with the
/// strongest words first (`invalidate` before `delete`), then by name.
/// Returns them and how many more read like invalidation but were left
/// out.
pub fn named(symbols: &[Symbol]) -> (Vec<(&Symbol, &'static str)>, usize) {
    let mut seen = HashSet::new();
    let mut found: Vec<(&Symbol, &'static str)> = symbols
        .iter()
        .filter(|s| !s.fragment && own_code(&s.name))
        .filter_map(|s| Some((s, invalidation_pick(&s.name)?)))
        .filter(|(s, _)| seen.insert(&*s.name))
        .collect();
    let rank = |word: &str| WORDS.iter().position(|(w, _)| *w == word);
    found.sort_by(|a, b| rank(a.1).cmp(&rank(b.1)).then(a.0.name.cmp(&b.0.name)));
    let left_out = found.len().saturating_sub(MAX_NAMED);
    found.truncate(MAX_NAMED);
    (found, left_out)
}

/// An executable's own functions by code range (entries, no fragments,
/// [`own_code`] only), to put sampled addresses down to them.
pub fn own_index(symbols: &[Symbol]) -> CodeIndex {
    CodeIndex::new(symbols.iter().filter(|s| !s.fragment && own_code(&s.name)))
}

/// The function of the target's own code a sample is put down to: the
/// first of its frames (innermost first) that lies in `own` (the
/// executable's mappings) at a named function of its own code
/// ([`own_code`]: the index holds only those), so time in memcpy or in
/// Rust's generic code counts for the function that called it. Only the
/// innermost own frame: its callers (a dispatch loop, a request handler)
/// are on every stack and would fill the picks. Frames after the first
/// are return addresses, looked up one byte back (inside the call); they
/// come from frame pointers, which many builds omit, so they matter only
/// when the innermost frame is not the program's.
pub fn attribute<'a>(ips: &[u64], own: &[Mapping], index: &'a CodeIndex) -> Option<&'a str> {
    ips.iter().enumerate().find_map(|(i, &ip)| {
        let ip = crate::symbolize::lookup_address(ip, i == 0);
        let map = own.iter().find(|m| (m.start..m.end).contains(&ip))?;
        index.function_at(ip - map.start + map.offset)
    })
}

/// A function of an executable.
type Func = (FileId, String);

/// The hot set over a sliding window of readings.
#[derive(Default)]
pub struct HotSet {
    /// (time, samples per function, samples in all) of each reading.
    window: VecDeque<(f64, HashMap<Func, u64>, u64)>,
    picked: HashSet<(FileId, String)>,
    hot_picked: usize,
}

impl HotSet {
    /// Marks a function as counted already (picked by name, or given).
    pub fn counted(&mut self, file: FileId, name: &str) {
        self.picked.insert((file, name.to_owned()));
    }

    /// One reading at `now` (seconds): the functions its samples were put
    /// down to, and how many samples the watched processes had in all
    /// (those outside their own code included).
    pub fn observe(&mut self, now: f64, functions: Vec<(FileId, String)>, total: u64) {
        let mut counts: HashMap<(FileId, String), u64> = HashMap::new();
        for f in functions {
            *counts.entry(f).or_default() += 1;
        }
        self.window.push_back((now, counts, total));
        while self
            .window
            .front()
            .is_some_and(|(t, _, _)| now - t >= HOT_WINDOW)
        {
            self.window.pop_front();
        }
    }

    /// Whether the run's hot picks are used up: functions that turn hot
    /// from now on are not picked.
    pub fn exhausted(&self) -> bool {
        self.hot_picked >= MAX_HOT
    }

    /// The functions newly hot, hottest first, within what is left of
    /// [`MAX_HOT`]; they count as picked from now on.
    pub fn picks(&mut self) -> Vec<Pick> {
        let total: u64 = self.window.iter().map(|(_, _, n)| n).sum();
        let mut sums: HashMap<&(FileId, String), u64> = HashMap::new();
        for (_, counts, _) in &self.window {
            for (f, n) in counts {
                *sums.entry(f).or_default() += n;
            }
        }
        let mut hot: Vec<(&(FileId, String), u64)> = sums
            .into_iter()
            .filter(|(f, n)| {
                *n >= HOT_MIN_SAMPLES
                    && *n as f64 >= HOT_SHARE * total as f64
                    && !self.picked.contains(*f)
            })
            .collect();
        hot.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.1.cmp(&b.0.1)));
        hot.truncate(MAX_HOT - self.hot_picked);
        let picks: Vec<Pick> = hot
            .into_iter()
            .map(|((file, name), samples)| Pick {
                file: *file,
                name: name.clone(),
                why: Why::Hot { samples, of: total },
            })
            .collect();
        for p in &picks {
            self.picked.insert((p.file, p.name.clone()));
        }
        self.hot_picked += picks.len();
        picks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbol(name: &str, offset: u64, size: u64) -> Symbol {
        Symbol::at(name, offset, size)
    }

    #[test]
    fn words_of_every_naming_style() {
        for (name, word) in [
            ("cache_invalidate", Some("invalidate")),
            ("invalidate_a", Some("invalidate")),
            ("dictDelete", Some("delete")),
            ("HSH_Purge", Some("purge")),
            ("VRT_ban_string", Some("ban")),
            ("expireIfNeeded", Some("expire")),
            ("fixture::store::evict_entry", Some("evict")),
            ("Cache::flushAll(int)", Some("flush")),
            ("HTTPPurgeHandler", Some("purge")),
            ("delCommand", Some("delete")),
            ("urban_route", None),
            ("render_banner", None),
            ("model_update", None),
            ("cache_get", None),
            ("handle_request", None),
        ] {
            assert_eq!(invalidation_word(name), word, "{name}");
        }
    }

    #[test]
    fn the_runtime_is_not_own_code() {
        for name in [
            "<alloc::vec::Vec<u8> as std::io::Write>::flush",
            "core::ptr::drop_glue::<std::io::Stdout>",
            "std::rt::lang_start::<()>",
            "__pthread_key_delete",
            "_Unwind_DeleteException",
            "pthread_key_delete",
            "main",
            "memcpy",
            "std::__detail::_Map_base::erase",
            "<u64 as core::iter::range::Step>::forward_unchecked",
            "<u64>::unchecked_add::precondition_check",
            "<&str as core::fmt::Display>::fmt",
            "<[u8]>::copy_from_slice",
        ] {
            assert!(!own_code(name), "{name}");
        }
        for name in [
            "cache_invalidate",
            "<fixture::Kind as core::cmp::PartialEq>::eq",
            "fixture::store::evict_entry",
            "Cache::flush(std::string const&)",
            "memoize_page",
        ] {
            assert!(own_code(name), "{name}");
        }
    }

    #[test]
    fn checks_lookups_and_allocators_are_not_picked_by_name() {
        let symbols: Vec<Symbol> = [
            "keyIsExpired",
            "getExpire",
            "expireIfNeeded",
            "operator delete(void*)",
            "checkEvictionPolicy",
            "activeExpireCycle",
            "dictDelete",
        ]
        .iter()
        .enumerate()
        .map(|(i, n)| symbol(n, i as u64 * 16, 16))
        .collect();
        let (picked, _) = named(&symbols);
        let names: Vec<&str> = picked.iter().map(|(s, _)| &*s.name).collect();
        assert_eq!(names, ["activeExpireCycle", "dictDelete"]);
    }

    #[test]
    fn named_picks_are_capped_strongest_first() {
        let mut symbols: Vec<Symbol> = (0..40)
            .map(|i| symbol(&format!("del_{i:02}"), i * 16, 16))
            .collect();
        symbols.push(symbol("cache_invalidate", 1000, 16));
        symbols.push(symbol("cache_get", 1100, 16));
        let (picked, left_out) = named(&symbols);
        assert_eq!(picked.len(), MAX_NAMED);
        assert_eq!(left_out, 41 - MAX_NAMED);
        assert_eq!(&*picked[0].0.name, "cache_invalidate");
        assert_eq!(picked[0].1, "invalidate");
        assert!(picked.iter().all(|(s, _)| &*s.name != "cache_get"));
    }

    fn exe() -> FileId {
        FileId { dev: 1, ino: 7 }
    }

    #[test]
    fn a_sample_in_a_library_counts_for_its_caller_in_own_code() {
        let index = own_index(&[
            symbol("rebuild", 0x1000, 0x100),
            symbol("main", 0x2000, 0x80),
        ]);
        let own = [Mapping {
            start: 0x5000_0000,
            end: 0x5001_0000,
            offset: 0,
            inode: 7,
            path: "/srv/cache".into(),
        }];
        // memcpy in libc, called from rebuild (return address just after
        // the call), called from main (not own code: the runtime's entry).
        let ips = [0x7f00_0000_1234, 0x5000_1010, 0x5000_2004];
        assert_eq!(attribute(&ips, &own, &index), Some("rebuild"));
        // A return address right after the function's last call belongs
        // to it, not to whatever follows.
        let ips = [0x7f00_0000_1234, 0x5000_1100];
        assert_eq!(attribute(&ips, &own, &index), Some("rebuild"));
        assert_eq!(attribute(&[0x7f00_0000_1234], &own, &index), None);
        // Only the innermost own frame: its callers are not hot for it.
        let index = own_index(&[
            symbol("rebuild", 0x1000, 0x100),
            symbol("dispatch", 0x1100, 0x100),
        ]);
        let ips = [0x5000_1008, 0x5000_1110];
        assert_eq!(attribute(&ips, &own, &index), Some("rebuild"));
    }

    #[test]
    fn a_function_hot_over_the_window_is_picked_once() {
        let mut hot = HotSet::default();
        hot.counted(exe(), "cache_invalidate");
        let f = |name: &str, n: usize| vec![(exe(), name.to_owned()); n];
        // Healthy: a few samples, spread out.
        hot.observe(0.0, [f("cache_invalidate", 3), f("parse", 2)].concat(), 6);
        assert!(hot.picks().is_empty());
        // A loop starts in rebuild/reload: most of each reading.
        for t in 1..=2 {
            hot.observe(
                t as f64,
                [f("rebuild", 25), f("reload", 20), f("parse", 1)].concat(),
                49,
            );
        }
        let picks = hot.picks();
        let names: Vec<&str> = picks.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["rebuild", "reload"]);
        assert!(matches!(
            picks[0].why,
            Why::Hot {
                samples: 50,
                of: 104
            }
        ));
        assert!(
            picks[0].why.describe().contains("48%"),
            "{}",
            picks[0].why.describe()
        );
        hot.observe(3.0, f("rebuild", 49), 49);
        assert!(hot.picks().is_empty(), "picked once");
    }

    #[test]
    fn an_idle_process_has_no_hot_set() {
        let mut hot = HotSet::default();
        for t in 0..5 {
            hot.observe(t as f64, vec![(exe(), "poll_loop".to_owned())], 1);
        }
        assert!(hot.picks().is_empty(), "5 samples in 3 s are not heat");
    }

    #[test]
    fn hot_picks_stop_at_the_cap() {
        let mut hot = HotSet::default();
        let mut all = Vec::new();
        for i in 0..(MAX_HOT + 4) {
            all.extend(vec![(exe(), format!("f{i:02}")); 10]);
        }
        // Each is under HOT_SHARE of the total here: lower the total.
        hot.observe(0.0, all.clone(), 80);
        assert_eq!(hot.picks().len(), MAX_HOT);
        hot.observe(1.0, all, 80);
        assert!(hot.picks().is_empty());
    }
}
