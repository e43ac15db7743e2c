//! A target process for the kernel tests: calls `cache_invalidate` on a
//! schedule of phases, each a rate (calls/s, or `max`) for some seconds.
//!
//!     fixture 200:6 max:20 [cycle:max:10] [--exit]
//!
//! A `cycle:RATE:SECONDS` phase calls `invalidate_a(8)` instead: A and B
//! invalidating each other, nine calls per top-level call. A
//! `keys:RATE:SECONDS` phase invalidates keys 0, 1 and 2 over and over. A
//! `req:RATE:SECONDS:PER` phase serves RATE requests/s (`handle_request`),
//! each making PER `cache_invalidate` calls. A `slow:RATE:SECONDS:MICROS`
//! phase does MICROS of work after each call (an expensive invalidation);
//! a `spread:RATE:SECONDS:KEYS` phase invalidates KEYS keys in a scrambled
//! order. A `rebuild:RATE:SECONDS` phase calls `rebuild_index(8)`:
//! `rebuild_index` and `reload_entry` calling each other, a cycle through
//! functions whose names say nothing of invalidation (only the on-CPU
//! samples can find it when no `--func` is given).
//!
//! A phase's SECONDS may be `hold`: the phase then runs until the fixture
//! gets SIGUSR1 (`Target::release`), so a test can start the next phase
//! once cacheloop has attached and learned, whatever attaching took.
//!
//! Prints `ready PID ADDR` at start (ADDR: where `cache_invalidate` is mapped), `phase N start TS` as each phase begins (Unix
//! seconds), and at the end `done CALLS CHECKSUM`; then idles until killed,
//! or exits with `--exit` (status 0) or `--exit-code=N`. With
//! `--leader-exits=SECONDS` (or `=usr2`), the phases run on a thread and
//! the main thread ends after that long (or at SIGUSR2; it prints `leader
//! exits`), the process running on under a zombie leader. With `--fork`, a
//! child forked after `ready` (it prints `child PID`) runs the phases too. The checksum lets a test prove that probing
//! changed nothing the program computes.

use std::{
    hint::black_box,
    io::Write as _,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime},
};

/// Set by SIGUSR1: ends the phase held with `hold`.
static RELEASED: AtomicBool = AtomicBool::new(false);

extern "C" fn release(_: libc::c_int) {
    // An atomic store is async-signal-safe.
    RELEASED.store(true, Ordering::SeqCst);
}

/// Set by SIGUSR2: `--leader-exits=usr2` ends the main thread.
static LEADER_GO: AtomicBool = AtomicBool::new(false);

extern "C" fn leader_go(_: libc::c_int) {
    LEADER_GO.store(true, Ordering::SeqCst);
}

/// The watched function: a plain C symbol that does a little real work.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cache_invalidate(key: u64) -> u64 {
    black_box(key.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17))
}

/// A second function, called once per `cache_invalidate`, for tests that
/// watch more than one.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cache_lookup(key: u64) -> u64 {
    black_box(key ^ 0x5555)
}

/// A Rust-mangled function (no `no_mangle`), for demangling tests: its
/// symbol is `_ZN7fixture5store11evict_entry17h…E` or a v0 `_R…` name.
mod store {
    #[inline(never)]
    pub fn evict_entry(key: u64) -> u64 {
        std::hint::black_box(key.rotate_right(7))
    }
}

/// Invalidating A invalidates B, which invalidates A...: the postmortem's
/// cycle, bounded by `depth` so the stack stays small. Each top-level call
/// makes `depth + 1` calls, alternating.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn invalidate_a(depth: u32) -> u64 {
    if depth == 0 {
        return 1;
    }
    black_box(invalidate_b(depth - 1)) + 1
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn invalidate_b(depth: u32) -> u64 {
    if depth == 0 {
        return 1;
    }
    black_box(invalidate_a(depth - 1)) + 1
}

/// A busy-work step, written out so that even a debug build keeps it in
/// its caller: the on-CPU samples land there.
macro_rules! work {
    ($seed:expr) => {{
        let mut h: u64 = $seed;
        let mut i: u64 = 0;
        while i < 64 {
            h = h.wrapping_mul(31).wrapping_add(7) ^ i;
            i += 1;
        }
        h
    }};
}

/// The same cycle as `invalidate_a`/`invalidate_b` under names that do not
/// read like invalidation, each call doing a little work.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn rebuild_index(depth: u32) -> u64 {
    let h = work!(u64::from(depth));
    if depth == 0 {
        return h;
    }
    black_box(reload_entry(depth - 1)) ^ h
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn reload_entry(depth: u32) -> u64 {
    let h = work!(u64::from(depth) << 1);
    if depth == 0 {
        return h;
    }
    black_box(rebuild_index(depth - 1)) ^ h
}

/// Marks one request served, for `--request-func`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn handle_request(id: u64) -> u64 {
    black_box(id ^ 0xAAAA)
}

/// Never called: for "matches but never fires" cases.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cache_flush_all() -> u64 {
    black_box(7)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `cache_invalidate` (a new key each call) and `cache_lookup`.
    Plain,
    /// `invalidate_a` / `invalidate_b` calling each other.
    Cycle,
    /// `rebuild_index` / `reload_entry` calling each other.
    Rebuild,
    /// `cache_invalidate` on keys 0, 1, 2 again and again.
    FewKeys,
    /// `handle_request` at the phase's rate, each making this many
    /// `cache_invalidate` calls.
    Requests(u64),
    /// `cache_invalidate`, each call followed by this many microseconds of
    /// work: an expensive invalidation.
    Slow(u64),
    /// `cache_invalidate` on this many keys in a scrambled order: a loop
    /// spread over many keys, no key following another the same way.
    Spread(u64),
}

fn main() {
    let mut phases = Vec::new();
    let mut exit = false;
    let mut code = 0;
    let mut fork = false;
    let mut leader_exits = None;
    for arg in std::env::args().skip(1) {
        if let Some(when) = arg.strip_prefix("--leader-exits=") {
            leader_exits = Some(match when {
                "usr2" => None,
                secs => Some(secs.parse::<f64>().expect("--leader-exits=SECONDS|usr2")),
            });
            continue;
        }
        if arg == "--exit" {
            exit = true;
            continue;
        }
        if arg == "--fork" {
            fork = true;
            continue;
        }
        if let Some(n) = arg.strip_prefix("--exit-code=") {
            exit = true;
            code = n.parse().expect("--exit-code=N");
            continue;
        }
        let (kind, spec) = if let Some(spec) = arg.strip_prefix("cycle:") {
            (Kind::Cycle, spec)
        } else if let Some(spec) = arg.strip_prefix("rebuild:") {
            (Kind::Rebuild, spec)
        } else if let Some(spec) = arg.strip_prefix("keys:") {
            (Kind::FewKeys, spec)
        } else if let Some(spec) = arg.strip_prefix("slow:") {
            let (spec, micros) = spec.rsplit_once(':').expect("slow:RATE:SECONDS:MICROS");
            (Kind::Slow(micros.parse().expect("microseconds")), spec)
        } else if let Some(spec) = arg.strip_prefix("spread:") {
            let (spec, keys) = spec.rsplit_once(':').expect("spread:RATE:SECONDS:KEYS");
            (Kind::Spread(keys.parse().expect("keys")), spec)
        } else if let Some(spec) = arg.strip_prefix("req:") {
            let (spec, per) = spec.rsplit_once(':').expect("req:RATE:SECONDS:PER");
            (
                Kind::Requests(per.parse().expect("invalidations per request")),
                spec,
            )
        } else {
            (Kind::Plain, arg.as_str())
        };
        let (rate, secs) = spec.split_once(':').expect("phase is RATE:SECONDS");
        let rate = if rate == "max" {
            None
        } else {
            Some(rate.parse::<f64>().expect("rate"))
        };
        let secs = match secs {
            "hold" => None,
            secs => Some(secs.parse::<f64>().expect("seconds or hold")),
        };
        phases.push((kind, rate, secs));
    }
    // SAFETY: the handlers only store to an atomic.
    unsafe {
        libc::signal(libc::SIGUSR1, release as *const () as libc::sighandler_t);
        libc::signal(libc::SIGUSR2, leader_go as *const () as libc::sighandler_t);
    }
    // The address lets tests read the function's live code bytes.
    let addr = cache_invalidate as *const () as usize;
    say(&format!("ready {} {addr:#x}", std::process::id()));
    // `--fork`: a child runs the same phases too (and is waited for).
    // SAFETY: fork(2) in a single-threaded program.
    let child = if fork { unsafe { libc::fork() } } else { -1 };
    if child == 0 {
        say(&format!("child {}", std::process::id()));
    }
    if let Some(when) = leader_exits {
        // The phases run on a thread of their own; the main thread ends
        // after `secs` (or at SIGUSR2) with a bare exit(2), its thread only
        // (no unwinding through Rust frames, as pthread_exit would), and
        // the process runs on under a zombie leader.
        std::thread::spawn(move || run(phases, exit, code, child));
        match when {
            Some(secs) => std::thread::sleep(Duration::from_secs_f64(secs)),
            None => {
                while !LEADER_GO.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        say("leader exits");
        // SAFETY: exit(2) ends the calling thread only; nothing waits for it.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
        unreachable!("exit(2) returned");
    }
    run(phases, exit, code, child)
}

/// Runs the phases, then idles or exits (see the module's comment).
fn run(phases: Vec<(Kind, Option<f64>, Option<f64>)>, exit: bool, code: i32, child: i32) -> ! {
    let (mut calls, mut checksum) = (0u64, 0u64);
    for (n, (kind, rate, secs)) in phases.into_iter().enumerate() {
        say(&format!("phase {n} start {:.3}", unix_now()));
        let start = Instant::now();
        let mut done = 0u64;
        loop {
            let elapsed = start.elapsed().as_secs_f64();
            let over = match secs {
                Some(secs) => elapsed >= secs,
                None => RELEASED.load(Ordering::SeqCst),
            };
            if over {
                break;
            }
            // Calls owed by now; paced on absolute time so rates are exact.
            let owed = match rate {
                Some(rate) => (rate * elapsed) as u64,
                None => done + 4096,
            };
            while done < owed && kind == Kind::Cycle {
                black_box(invalidate_a(8));
                done += 1;
            }
            while done < owed && kind == Kind::Rebuild {
                black_box(rebuild_index(8));
                done += 1;
            }
            while done < owed && kind == Kind::FewKeys {
                black_box(cache_invalidate(done % 3));
                done += 1;
            }
            while let (true, Kind::Slow(micros)) = (done < owed, kind) {
                black_box(cache_invalidate(done % 7));
                let until = Instant::now() + Duration::from_micros(micros);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
                done += 1;
            }
            while let (true, Kind::Spread(keys)) = (done < owed, kind) {
                // A multiplicative scramble: every key in turn, never in
                // the same order twice running.
                let key = done.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                black_box(cache_invalidate(key % keys));
                done += 1;
            }
            while let (true, Kind::Requests(per)) = (done < owed, kind) {
                black_box(handle_request(done));
                for i in 0..per {
                    black_box(cache_invalidate(calls + i));
                }
                calls += per;
                done += 1;
            }
            while done < owed {
                checksum = checksum.wrapping_add(cache_invalidate(calls));
                checksum ^= cache_lookup(calls);
                black_box(store::evict_entry(calls));
                calls += 1;
                done += 1;
            }
            if rate.is_some() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    say(&format!("done {calls} {checksum}"));
    if !exit {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if calls == u64::MAX {
        cache_flush_all();
    }
    if child > 0 {
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
    }
    std::process::exit(code);
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
