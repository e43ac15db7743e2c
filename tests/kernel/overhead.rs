//! The overhead governor (`--max-overhead`): a function called flat out is
//! probed in windows, its rates are marked as estimates, and the loop is
//! still caught. How much throughput the target keeps is a benchmark
//! (`cargo xtask bench`), not a test: timings are noise here.

use std::time::Duration;

use cacheloop_tests::{
    Cacheloop, Run, Target, cacheloop, private_fixture, require_root, watch_fixture_args,
    watch_held,
};

const INT3: u8 = 0xcc;

#[test]
fn watch_hot_function_under_max_overhead_is_probed_in_windows_and_the_loop_still_caught() {
    require_root();
    let target = Target::fixture(&["200:hold", "max:40"]);
    let addr = target.invalidate_addr();
    let extra = ["--fail-on-loop", "--duration", "40s", "--max-overhead", "5"];
    let run = watch_held(
        &target,
        &watch_fixture_args(target.pid, &extra),
        Duration::from_secs(4),
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 3, "{run:?}");

    let governor = run.of_type("governor");
    let first = governor.first().expect("the governor stepped in");
    let probed = first["probed_percent"].as_f64().unwrap();
    assert!((1.0..100.0).contains(&probed), "{first}");
    assert!(
        first["full_overhead_percent"].as_f64().unwrap() > 5.0,
        "{first}"
    );
    assert!(first["probe_cost_us"].as_f64().unwrap() > 0.0, "{first}");
    assert_eq!(first["max_overhead_percent"], 5.0);

    // The healthy phase was probed throughout; the runaway in windows.
    let samples = run.of_type("sample");
    assert_eq!(
        samples[0]["estimated"],
        serde_json::Value::Null,
        "{}",
        samples[0]
    );
    assert!(
        samples.iter().any(|s| s["estimated"] == true),
        "{}",
        run.stdout
    );
    let record = &run.of_type("loop")[0];
    assert_eq!(record["functions"][0], "cache_invalidate");
    // Whether it ended inside a window or not, nothing is left behind.
    assert_ne!(target.code_at(addr, 1)[0], INT3, "probe removed");
}

#[test]
fn watch_max_overhead_100_keeps_the_probes_in_throughout() {
    let run = watch_flat_out("3s", "100", Duration::from_secs(30));
    assert!(run.of_type("governor").is_empty(), "{}", run.stdout);
    let samples = run.of_type("sample");
    assert!(!samples.is_empty());
    assert!(
        samples.iter().all(|s| s["estimated"].is_null()),
        "{}",
        run.stdout
    );
}

#[test]
fn windows_probe_every_interval_of_a_flat_out_function_for_its_share() {
    let run = watch_flat_out("9s", "5", Duration::from_secs(60));
    // A flat-out function stays over budget: once windowed, never probed
    // throughout again (a reading of no probed time would read as calm and
    // put the probes back in for a whole interval).
    let governor = run.of_type("governor");
    let first = governor.first().expect("the governor stepped in");
    assert!(
        governor
            .iter()
            .all(|g| g["probed_percent"].as_f64().unwrap() < 100.0),
        "{}",
        run.stdout
    );
    // One window serves two intervals; each of them, the last partial one
    // included, is probed for its share and counts calls. (The last may
    // fall inside a window whole, and then is no estimate.)
    let windowed_from = first["ts"].as_f64().unwrap() + 0.5;
    let samples: Vec<_> = run
        .of_type("sample")
        .into_iter()
        .filter(|s| s["ts"].as_f64().unwrap() > windowed_from)
        .collect();
    // (Fewer readings than seconds when a loaded machine held the loader
    // up: the kernel's uprobe (un)registration waits for RCU grace
    // periods, seconds at worst, and a late reading merges two intervals.)
    assert!(samples.len() >= 3, "{}", run.stdout);
    for sample in &samples {
        assert!(sample["calls"].as_u64().unwrap() > 0, "{sample}");
    }
    for sample in &samples[..samples.len() - 1] {
        assert_eq!(sample["estimated"], true, "{sample}");
    }
}

/// `--name` processes found while the governor has the probes out wait for
/// the next window, then are counted in every interval like the others.
/// One window serves two intervals, so of processes found at readings in a
/// row, some are found while the probes are out.
#[test]
fn processes_found_while_the_probes_are_out_go_in_with_the_next_window() {
    require_root();
    let comm = format!("clw{}", std::process::id() % 1_000_000);
    let (dir, binary) = private_fixture(&comm);
    let _hot = Target::spawn(&binary, &["max:40"], "ready");
    let watcher = Cacheloop::start(&[
        "watch",
        "-vv",
        "--name",
        &comm,
        "--func",
        "cache_invalidate",
        "--json",
        "--interval",
        "2s",
        "--duration",
        "16s",
        "--max-overhead",
        "5",
    ]);
    // The governor steps in after the first interval. Each process is
    // started half an interval after a reading found the last (or the
    // governor stepped in), so found at the next: three readings in a row,
    // with the probes in and out by turns.
    watcher.wait_record("governor", Duration::from_secs(30));
    let found: Vec<Target> = (0..3)
        .map(|_| {
            std::thread::sleep(Duration::from_secs(1));
            let target = Target::spawn(&binary, &["2000:40"], "ready");
            watcher.wait_record("attached", Duration::from_secs(10));
            target
        })
        .collect();
    let run = watcher.finish(Duration::from_secs(60));
    assert_eq!(run.code, 0, "{run:?}");
    assert!(!run.of_type("governor").is_empty(), "{}", run.stdout);
    // At least one was found with the probes out (cacheloop -vv says so).
    assert!(
        found.iter().any(|t| run
            .stderr
            .lines()
            .any(|l| l.contains("goes in with the next window")
                && l.contains(&format!("(pid {})", t.pid)))),
        "{}\n{}",
        run.stderr,
        run.stdout
    );
    for target in &found {
        assert!(
            run.of_type("attached")
                .iter()
                .any(|r| r["pid"] == target.pid),
            "pid {} attached: {}",
            target.pid,
            run.stdout
        );
        // After the interval it was found in, every interval counts its
        // calls (an attach that lands as a window closes may see none).
        let samples: Vec<_> = run
            .of_type("sample")
            .into_iter()
            .filter(|s| s["pid"] == target.pid)
            .collect();
        assert!(samples.len() >= 2, "pid {}: {}", target.pid, run.stdout);
        for sample in &samples[1..] {
            assert!(sample["calls"].as_u64().unwrap() > 0, "{sample}");
            assert_eq!(sample["estimated"], true, "{sample}");
        }
        // Nothing left behind in it either.
        let addr = target.invalidate_addr();
        assert_ne!(target.code_at(addr, 1)[0], INT3, "probe removed");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Watches a fixture calling `cache_invalidate` flat out for `duration`
/// under `--max-overhead max_overhead`; the run must end well (exit 0)
/// within `timeout`.
fn watch_flat_out(duration: &str, max_overhead: &str, timeout: Duration) -> Run {
    require_root();
    let target = Target::fixture(&["max:30"]);
    let extra = ["--duration", duration, "--max-overhead", max_overhead];
    let run = cacheloop(&watch_fixture_args(target.pid, &extra), timeout);
    assert_eq!(run.code, 0, "{run:?}");
    run
}

/// Sets process `pid`'s soft descriptor limit; returns the old one. Only
/// the soft limit: raising a hard limit takes CAP_SYS_RESOURCE, which
/// root may not hold (a container).
fn set_fd_limit(pid: i32, soft: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit(2) reading, then setting, our own child's limit.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut limit) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    let old = limit.rlim_cur;
    limit.rlim_cur = soft;
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

/// `watch ARGS --func cache_invalidate --max-overhead 5 --interval 3s
/// --duration 120s --json` of a flat-out fixture, and that watch's
/// descriptor limit cut to 3 (stdin, stdout, stderr) once the probes go in
/// and out in windows: the next window's attach is refused (EMFILE).
/// Returns the watch and its limit before. (3 s intervals: the retry comes
/// an interval after the refusal is said, time for a test to give the
/// limit back in a loaded VM guest.)
fn watch_until_refused(args: &[&str]) -> (Cacheloop, u64) {
    let mut all = vec!["watch"];
    all.extend(args);
    all.extend([
        "--func",
        "cache_invalidate",
        "--max-overhead",
        "5",
        "--interval",
        "3s",
        "--duration",
        "120s",
        "--json",
    ]);
    let watcher = Cacheloop::start(&all);
    watcher.wait_record("governor", Duration::from_secs(30));
    let old = set_fd_limit(watcher.pid(), 3);
    (watcher, old)
}

/// The `attach_failed` warnings of a run, by message.
fn refusals(run: &Run) -> Vec<String> {
    run.of_type("warning")
        .iter()
        .filter(|w| w["kind"] == "attach_failed")
        .map(|w| w["message"].as_str().unwrap().to_owned())
        .collect()
}

/// [`watch_until_refused`], the limit given back once the refusal is
/// said: the refusal said it would try again, `target` is attached again
/// and counted, and the run, stopped with SIGINT, ends well.
fn refused_then_put_back(target: &Target, args: &[&str]) {
    let (watcher, old) = watch_until_refused(args);
    watcher.wait_line("\"kind\":\"attach_failed\"", Duration::from_secs(30));
    set_fd_limit(watcher.pid(), old);
    watcher.wait_record("attached", Duration::from_secs(30));
    for _ in 0..3 {
        watcher.wait_record("sample", Duration::from_secs(30));
    }
    watcher.signal(libc::SIGINT);
    let run = watcher.finish(Duration::from_secs(60));
    assert_eq!(run.code, 0, "{run:?}");
    let refused = refusals(&run);
    assert!(
        refused
            .first()
            .is_some_and(|m| m.contains("trying again at the next interval")),
        "{}",
        run.stdout
    );
    let attached = run.of_type("attached");
    assert_eq!(attached.len(), 2, "{}", run.stdout);
    let again = attached[1]["ts"].as_f64().unwrap();
    // Counted again: the intervals after the one it came back in.
    let later: Vec<u64> = run
        .of_type("sample")
        .iter()
        .filter(|s| s["pid"] == target.pid && s["ts"].as_f64().unwrap() > again)
        .map(|s| s["calls"].as_u64().unwrap())
        .collect();
    assert!(
        later.len() >= 3 && later[later.len() - 2..].iter().all(|&c| c > 0),
        "{later:?}\n{}",
        run.stdout
    );
    assert!(run.of_type("target_exit").is_empty(), "{}", run.stdout);
    assert_ne!(target.code_at(target.invalidate_addr(), 1)[0], INT3);
}

/// A `--pid` target whose probes are refused on the way back in (the
/// loader out of descriptors as a window opens) is not dropped for good:
/// nothing would find it again, as a `--name` process is found. It is tried
/// again an interval later and, put back, counted as before.
#[test]
fn pid_target_refused_on_the_way_back_in_is_put_back_at_the_next_interval() {
    require_root();
    let target = Target::fixture(&["max:60"]);
    refused_then_put_back(&target, &["--pid", &target.pid.to_string()]);
}

/// A `--name` process refused the same way is found again by its name.
#[test]
fn named_process_refused_on_the_way_back_in_is_found_again() {
    require_root();
    let comm = format!("clr{}", std::process::id() % 1_000_000);
    let (dir, binary) = private_fixture(&comm);
    let target = Target::spawn(&binary, &["max:60"], "ready");
    refused_then_put_back(&target, &["--name", &comm]);
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Refused again, with nothing else to watch, the run does not end as if
/// the target had exited: it fails (exit 1) with one line saying which
/// pid still runs unwatched, and leaves nothing behind in it.
#[test]
fn pid_target_refused_twice_fails_the_run_and_leaves_the_target_running() {
    require_root();
    let mut target = Target::fixture(&["max:60"]);
    // Ends long before the duration.
    let (watcher, _) = watch_until_refused(&["--pid", &target.pid.to_string()]);
    let run = watcher.finish(Duration::from_secs(90));
    assert_eq!(run.code, 1, "{run:?}");
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!("pid {} still runs", target.pid))
            && last.contains("start cacheloop again"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    let refused = refusals(&run);
    assert!(
        refused.len() >= 2
            && refused[0].contains("trying again at the next interval")
            // The second, final: out of descriptors still, the process
            // cannot even be read again.
            && refused[refused.len() - 1].contains("no longer watched"),
        "{}",
        run.stdout
    );
    assert!(target.is_running());
    assert_ne!(target.code_at(target.invalidate_addr(), 1)[0], INT3);
}
