//! demo-cache: a small cache service that reproduces the postmortem.
//!
//! It holds real entries, serves a steady mix of reads (misses are
//! recomputed and stored) and writes (each write invalidates a key), and
//! follows a dependency configuration: when a key is invalidated, the keys it
//! lists are invalidated too, through a work queue. The configuration is
//! re-read whenever its file changes. Give it a configuration with a cycle
//! (`page:catalog -> fragment:nav`, `fragment:nav -> page:catalog`) and the
//! queue never drains: CPU pegs, the audit log grows, requests stop. The
//! file is watched inside the loop too, so deploying a configuration without
//! the cycle ends it and traffic resumes: loops can come and go (the soak
//! benchmark does that for an hour). demo-cache exits once the process that
//! started it is gone, so a loop never outlives an interrupted demo.
//!
//!     demo-cache --deps FILE [--writes N] [--reads N]
//!
//! Prints `ready PID` once serving, and a line on each reload.
//!
//! The probe points are plain C symbols: `cache_invalidate` (one key
//! dropped), `cache_get` and `cache_put`.

use std::{
    cell::RefCell,
    collections::{HashMap, VecDeque},
    ffi::{CStr, CString, c_char},
    io::Write as _,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

/// Most audit entries kept; the oldest go first.
const AUDIT_CAP: usize = 2_000_000;

#[derive(Default)]
struct Store {
    entries: HashMap<String, String>,
    /// Every invalidation, as a real service would log it.
    audit: VecDeque<String>,
    invalidations: u64,
}

thread_local! {
    static STORE: RefCell<Store> = RefCell::new(Store::default());
}

/// Drops one key from the cache. Returns 1 if it was cached.
///
/// # Safety
/// `key` points to a NUL-terminated string that outlives the call (true of
/// the three `cache_*` functions).
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn cache_invalidate(key: *const c_char) -> u32 {
    // SAFETY: callers pass a NUL-terminated key that outlives the call.
    let key = unsafe { CStr::from_ptr(key) }.to_string_lossy();
    STORE.with_borrow_mut(|store| {
        store.invalidations += 1;
        if store.audit.len() == AUDIT_CAP {
            store.audit.pop_front();
        }
        store
            .audit
            .push_back(format!("invalidate {key} #{}", store.invalidations));
        u32::from(store.entries.remove(key.as_ref()).is_some())
    })
}

/// Looks a key up; on a miss, computes the value and stores it.
///
/// # Safety
/// As for [`cache_invalidate`].
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn cache_get(key: *const c_char) -> u32 {
    // SAFETY: as for `cache_invalidate`.
    let key = unsafe { CStr::from_ptr(key) };
    let hit = STORE.with_borrow(|store| store.entries.contains_key(key.to_string_lossy().as_ref()));
    if !hit {
        // SAFETY: `key` is the caller's NUL-terminated string.
        unsafe { cache_put(key.as_ptr()) };
    }
    u32::from(hit)
}

/// Computes and stores the value of a key.
///
/// # Safety
/// As for [`cache_invalidate`].
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn cache_put(key: *const c_char) {
    // SAFETY: as for `cache_invalidate`.
    let key = unsafe { CStr::from_ptr(key) }
        .to_string_lossy()
        .into_owned();
    let value = format!("<rendered {key} at {:?}>", SystemTime::now());
    STORE.with_borrow_mut(|store| store.entries.insert(key, value));
}

/// `pattern -> dependents`: invalidating a key that matches `pattern` (exact,
/// or a prefix ending in `*`) invalidates each dependent too.
#[derive(Debug, Default, PartialEq)]
struct Deps {
    rules: Vec<(String, Vec<String>)>,
}

impl Deps {
    fn parse(text: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (from, to) = line
                .split_once("->")
                .ok_or_else(|| format!("line {}: expected 'key -> dependent, ...'", n + 1))?;
            let to = to
                .split(',')
                .map(|d| d.trim().to_owned())
                .filter(|d| !d.is_empty());
            rules.push((from.trim().to_owned(), to.collect()));
        }
        Ok(Self { rules })
    }

    fn dependents<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.rules
            .iter()
            .filter(move |(pattern, _)| match pattern.strip_suffix('*') {
                Some(prefix) => key.starts_with(prefix),
                None => pattern == key,
            })
            .flat_map(|(_, deps)| deps)
    }
}

/// The dependency rules and the file they come from, with what the service
/// checks every 200 ms, even inside a loop: the file (re-read when it
/// changes) and its parent (gone: demo-cache exits).
struct Rules {
    path: PathBuf,
    deps: Deps,
    modified: Option<SystemTime>,
    checked: Instant,
    parent: u32,
}

impl Rules {
    fn load(path: PathBuf) -> Result<Self, String> {
        let (deps, modified) = read_rules(&path)?;
        Ok(Self {
            path,
            deps,
            modified,
            checked: Instant::now(),
            parent: std::os::unix::process::parent_id(),
        })
    }

    fn refresh(&mut self) {
        if self.checked.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.checked = Instant::now();
        if std::os::unix::process::parent_id() != self.parent {
            // Whoever started us (a demo, a test, the bench) is gone and
            // can no longer stop us: do not spin on as an orphan.
            std::process::exit(0);
        }
        let now_modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if now_modified != self.modified {
            match read_rules(&self.path) {
                Ok((new, m)) => {
                    self.deps = new;
                    self.modified = m;
                    say(&format!(
                        "reloaded {} dependency rule(s)",
                        self.deps.rules.len()
                    ));
                }
                Err(e) => eprintln!("demo-cache: keeping the old rules: {e}"),
            }
        }
    }
}

/// Invalidates `key` and, through the queue, everything that depends on it.
/// With a cycle in the rules this does not return until rules without the
/// cycle are deployed: that is the bug on show.
fn invalidate(rules: &mut Rules, key: &str) {
    let mut queue = VecDeque::from([key.to_owned()]);
    while let Some(next) = queue.pop_front() {
        let c_key = CString::new(next.as_str()).expect("keys have no NUL");
        // SAFETY: `c_key` is NUL-terminated and lives past the call.
        unsafe { cache_invalidate(c_key.as_ptr()) };
        queue.extend(rules.deps.dependents(&next).cloned());
        rules.refresh();
    }
}

struct Args {
    deps: PathBuf,
    writes: f64,
    reads: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        deps: PathBuf::new(),
        writes: 100.0,
        reads: 2000.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--deps" => args.deps = value.into(),
            "--writes" => {
                args.writes = value.parse().map_err(|_| format!("bad --writes {value}"))?
            }
            "--reads" => args.reads = value.parse().map_err(|_| format!("bad --reads {value}"))?,
            _ => {
                return Err(format!(
                    "unknown flag {flag}; usage: demo-cache --deps FILE [--writes N] [--reads N]"
                ));
            }
        }
    }
    if args.deps.as_os_str().is_empty() {
        return Err("usage: demo-cache --deps FILE [--writes N] [--reads N]".to_owned());
    }
    Ok(args)
}

fn read_rules(path: &PathBuf) -> Result<(Deps, Option<SystemTime>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((Deps::parse(&text)?, modified))
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A small deterministic generator, so runs are alike.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) as usize) % n
    }
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("demo-cache: {e}");
            std::process::exit(2);
        }
    };
    let mut rules = match Rules::load(args.deps.clone()) {
        Ok(rules) => rules,
        Err(e) => {
            eprintln!("demo-cache: {e}");
            std::process::exit(2);
        }
    };

    let readable: Vec<String> = (1..=50)
        .map(|n| format!("product:{n}"))
        .chain((1..=20).map(|n| format!("user:{n}")))
        .chain(["page:catalog", "page:home", "search:index", "fragment:nav"].map(String::from))
        .collect();
    let writable: Vec<&String> = readable
        .iter()
        .filter(|k| {
            !k.starts_with("page:") && !k.starts_with("fragment:") && !k.starts_with("search:")
        })
        .collect();
    let c_readable: Vec<CString> = readable
        .iter()
        .map(|k| CString::new(k.as_str()).expect("key"))
        .collect();

    say(&format!("ready {}", std::process::id()));
    say(&format!(
        "loaded {} dependency rule(s) from {}",
        rules.deps.rules.len(),
        args.deps.display()
    ));

    let mut rng = Lcg(42);
    let start = Instant::now();
    let (mut reads, mut writes) = (0u64, 0u64);
    loop {
        let elapsed = start.elapsed().as_secs_f64();
        while (reads as f64) < args.reads * elapsed {
            // SAFETY: the keys are NUL-terminated and live for the whole run.
            unsafe { cache_get(c_readable[rng.next(c_readable.len())].as_ptr()) };
            reads += 1;
        }
        while (writes as f64) < args.writes * elapsed {
            invalidate(&mut rules, writable[rng.next(writable.len())]);
            writes += 1;
        }
        rules.refresh();
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_with_comments_and_wildcards() {
        let deps = Deps::parse(
            "# c\nproduct:* -> page:catalog, search:index\n\npage:catalog -> fragment:nav # x\n",
        )
        .unwrap();
        let got: Vec<&String> = deps.dependents("product:7").collect();
        assert_eq!(got, ["page:catalog", "search:index"]);
        assert_eq!(deps.dependents("page:catalog").count(), 1);
        assert_eq!(deps.dependents("user:1").count(), 0);
    }

    #[test]
    fn malformed_rule_is_refused() {
        assert!(Deps::parse("product:1 page:home").is_err());
    }

    fn rules_file(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "demo-cache-test-{}-{name}.deps",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn acyclic_invalidation_drops_dependents_and_returns() {
        let path = rules_file(
            "acyclic",
            "product:* -> page:catalog\npage:catalog -> fragment:nav",
        );
        let mut rules = Rules::load(path.clone()).unwrap();
        for key in ["product:1", "page:catalog", "fragment:nav"] {
            let c = CString::new(key).unwrap();
            // SAFETY: `c` is NUL-terminated and lives past the call.
            unsafe { cache_put(c.as_ptr()) };
        }
        invalidate(&mut rules, "product:1");
        STORE.with_borrow(|s| {
            assert!(s.entries.is_empty());
            assert_eq!(s.invalidations, 3);
        });
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn loop_ends_when_rules_without_the_cycle_are_deployed() {
        let path = rules_file(
            "cycle",
            "page:catalog -> fragment:nav\nfragment:nav -> page:catalog",
        );
        let mut rules = Rules::load(path.clone()).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            invalidate(&mut rules, "page:catalog");
            let _ = done.send(());
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(finished.try_recv().is_err(), "the cycle is a loop");
        let staged = path.with_extension("new");
        std::fs::write(&staged, "page:catalog -> fragment:nav\n").unwrap();
        std::fs::rename(&staged, &path).unwrap();
        let ended = finished.recv_timeout(Duration::from_secs(5));
        let _ = std::fs::remove_file(path);
        assert!(ended.is_ok(), "the loop went on after the fix");
    }
}
