//! Lifecycle: every way a run ends detaches everything, and the target runs
//! on exactly as before.

use std::time::Duration;

use cacheloop_tests::{
    Cacheloop, Target, cacheloop, fixture_checksum, require_root, watch_fixture_args,
};

const INT3: u8 = 0xCC;

#[test]
fn watch_duration_detaches_and_target_computes_the_same() {
    require_root();
    let mut target = Target::fixture(&["500:12", "--exit"]);
    let addr = target.invalidate_addr();
    let original = target.code_at(addr, 8);
    assert_ne!(original[0], INT3);

    let watcher = Cacheloop::start(&watch_fixture_args(target.pid, &["--duration", "3s"]));
    watcher.wait_attached(Duration::from_secs(60));
    // The probe is really in the target while attached: the kernel put a
    // breakpoint on the function's first byte.
    let mut probed = false;
    for _ in 0..100 {
        if target.code_at(addr, 1)[0] == INT3 {
            probed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(probed, "no breakpoint seen at {addr:#x} while attached");
    let run = watcher.finish(Duration::from_secs(30));
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        target.code_at(addr, 8),
        original,
        "code restored after detach"
    );

    let done = target
        .wait_line("done", Duration::from_secs(20))
        .expect("the target finished its work");
    let words: Vec<u64> = done
        .split(' ')
        .skip(1)
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(
        words[1],
        fixture_checksum(words[0]),
        "the target computed what it always does"
    );
    assert_eq!(target.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn watch_sigint_and_sigterm_detach_and_exit_0() {
    require_root();
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let mut target = Target::fixture(&["300:60"]);
        let addr = target.invalidate_addr();
        let original = target.code_at(addr, 8);
        let watcher = Cacheloop::start(&watch_fixture_args(target.pid, &[]));
        watcher.wait_attached(Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1500));
        watcher.signal(signal);
        let run = watcher.finish(Duration::from_secs(20));
        assert_eq!(run.code, 0, "signal {signal}: {run:?}");
        assert_eq!(run.records().last().unwrap()["type"], "detached");
        assert!(!run.of_type("sample").is_empty());
        assert_eq!(
            target.code_at(addr, 8),
            original,
            "signal {signal}: code restored"
        );
        assert!(target.is_running(), "signal {signal}: target alive");
    }
}

#[test]
fn watch_target_exit_mid_run_is_reported_and_ends_the_run() {
    require_root();
    // Long enough to outlive attaching in a loaded TCG guest.
    let target = Target::fixture(&["200:5", "--exit"]);
    let run = cacheloop(
        &watch_fixture_args(target.pid, &[]),
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let exits = run.of_type("target_exit");
    assert_eq!(exits.len(), 1, "{}", run.stdout);
    assert_eq!(exits[0]["pid"], target.pid);
    assert_eq!(run.records().last().unwrap()["type"], "detached");
}

#[test]
fn watch_goes_on_while_other_targets_remain() {
    require_root();
    // Long enough to outlive attaching in a TCG guest (0.3-0.6 s to load
    // and attach there, plus starting the second fixture).
    let short = Target::fixture(&["200:3", "--exit"]);
    let long = Target::fixture(&["200:60"]);
    let (a, b) = (short.pid.to_string(), long.pid.to_string());
    let run = cacheloop(
        &[
            "watch",
            "--pid",
            &a,
            "--pid",
            &b,
            "--func",
            "cache_invalidate",
            "--duration",
            "7s",
            "--json",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let records = run.records();
    let exit_at = records
        .iter()
        .position(|r| r["type"] == "target_exit" && r["pid"] == short.pid)
        .expect("the short target's exit is reported");
    let later = records[exit_at..]
        .iter()
        .filter(|r| r["type"] == "sample" && r["pid"] == long.pid)
        .count();
    assert!(
        later >= 2,
        "the long target is still sampled after: {later}"
    );
}

/// Fails on purpose: `cargo xtask vm-test --self-test` runs it in a guest
/// to see that a failing test inside a VM fails the run.
#[test]
#[ignore = "fails on purpose; run by `cargo xtask vm-test --self-test`"]
fn vm_runner_sees_this_test_fail() {
    panic!("failing on purpose, for the VM runner's self-test");
}

/// The first byte at `addr` in `target`, read through one of its threads
/// other than the main one: with the main thread ended, `/proc/PID/mem`
/// reads nothing.
fn code_through_a_thread(target: &Target, addr: u64) -> u8 {
    use std::os::unix::fs::FileExt as _;
    let tid = std::fs::read_dir(format!("/proc/{}/task", target.pid))
        .unwrap()
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|&tid| tid != target.pid)
        .expect("a thread besides the main one");
    let mem = std::fs::File::open(format!("/proc/{}/task/{tid}/mem", target.pid)).unwrap();
    let mut byte = [0u8];
    mem.read_exact_at(&mut byte, addr).unwrap();
    byte[0]
}

/// Waits until `target`'s main thread has ended: `/proc/PID/stat` shows
/// its leader a zombie.
fn wait_leader_gone(target: &Target) {
    for _ in 0..500 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", target.pid)).unwrap();
        if stat
            .rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .starts_with('Z')
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("pid {}'s main thread did not end", target.pid);
}

/// Watches a `--leader-exits=usr2` fixture running `phase` until the
/// record `marker`, ends its main thread, and checks what follows: said
/// unwatched, no `target_exit`, exit 1 naming the pid that runs on, the
/// target running with no breakpoint left in it. Returns the run.
fn leader_exits_while_watched(phase: &str, marker: &str) -> cacheloop_tests::Run {
    let mut target = Target::fixture(&["--leader-exits=usr2", phase]);
    let addr = target.invalidate_addr();
    let watcher = Cacheloop::start(&watch_fixture_args(target.pid, &["--duration", "60s"]));
    watcher.wait_record(marker, Duration::from_secs(60));
    target.signal(libc::SIGUSR2);
    let warned = watcher.wait_line("main thread has exited", Duration::from_secs(30));
    assert!(warned.contains("\"kind\":\"attach_failed\""), "{warned}");
    let run = watcher.finish(Duration::from_secs(60));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.of_type("target_exit").is_empty(), "{}", run.stdout);
    let last = run.stderr.lines().last().unwrap_or_default();
    // Not "start cacheloop again": that would fail the same way.
    assert!(
        last.contains(&format!("pid {} still runs", target.pid))
            && last.contains("main thread exited"),
        "{}",
        run.stderr
    );
    assert!(target.is_running());
    assert_ne!(code_through_a_thread(&target, addr), INT3);
    run
}

/// A target whose main thread ends while its other threads run on
/// (`pthread_exit` in `main`) shows a zombie in `/proc/PID/stat`; it was
/// taken for exited, and the run ended with exit 0 while it kept calling.
/// The kernel cannot keep its own probes in it (see `unwatch_leaderless`),
/// so it is said unwatched and the run fails with the pid that runs on:
/// here with no overhead window at this rate.
#[test]
fn a_target_whose_main_thread_exits_is_not_taken_for_exited() {
    require_root();
    let run = leader_exits_while_watched("200:120", "sample");
    assert!(run.of_type("governor").is_empty(), "{}", run.stdout);
}

/// The same under overhead windows, the probes coming out and going back
/// in.
#[test]
fn a_target_whose_main_thread_exits_is_said_unwatched_under_windows() {
    require_root();
    leader_exits_while_watched("max:120", "governor");
}

/// Attaching to such a process fails with the reason (exit 1), not "no
/// process with pid".
#[test]
fn attaching_to_a_process_whose_main_thread_exited_says_why() {
    require_root();
    let mut target = Target::fixture(&["--leader-exits=0", "200:120"]);
    wait_leader_gone(&target);
    let run = cacheloop(
        &watch_fixture_args(target.pid, &["--duration", "2s"]),
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("main thread has exited") && run.stderr.lines().count() == 1,
        "{}",
        run.stderr
    );
    assert!(target.is_running());
}
