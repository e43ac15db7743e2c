//! Recording and replay: a live run's verdicts come back exactly from its
//! recording, without root; other settings give other verdicts; a cut or
//! foreign file is handled cleanly.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use cacheloop_tests::{
    Cacheloop, Run, Target, cacheloop, cacheloop_bin, require_root, watch_args, watch_held,
};
use serde_json::Value;

/// A file in the temp directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        Self(std::env::temp_dir().join(format!("cacheloop-{}-{name}", std::process::id())))
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `cacheloop replay FILE ARGS --json` as the unprivileged user nobody,
/// with no capabilities: replay needs no root.
fn replay_unprivileged(file: &Path, args: &[&str]) -> Run {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = cacheloop_tests::as_nobody()
        .arg(cacheloop_bin())
        .arg("replay")
        .arg(file)
        .args(args)
        .arg("--json")
        .output()
        .expect("setpriv (util-linux) runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The records replay must reproduce exactly, in order.
fn judged(run: &Run) -> Vec<Value> {
    run.records()
        .into_iter()
        .filter(|r| {
            [
                "sample",
                "health",
                "loop",
                "recovered",
                "target_exit",
                "attached",
                "governor",
            ]
            .contains(&r["type"].as_str().unwrap_or(""))
        })
        .collect()
}

#[test]
fn watch_record_of_a_loop_replays_unprivileged_to_identical_verdicts() {
    require_root();
    if !cacheloop_tests::have_programs(&[("setpriv", "util-linux")]) {
        return;
    }
    // Healthy, then A and B invalidating each other flat out, then healthy
    // again: a loop with a cycle, keys and a stack, and its recovery.
    let target = Target::fixture(&["200:hold", "cycle:max:6", "200:60"]);
    let file = TempFile::new("loop.rec");
    let extra = [
        "--duration",
        "16s",
        "--key-arg",
        "0:u64",
        "--record",
        file.arg(),
    ];
    let live = watch_held(
        &target,
        &watch_args(target.pid, &["cache_invalidate", "invalidate_*"], &extra),
        Duration::from_secs(3),
        Duration::from_secs(60),
    );
    assert_eq!(live.code, 0, "{live:?}");
    let records = live.records();
    assert_eq!(records[0]["type"], "start", "{}", live.stdout);
    assert_eq!(records[0]["settings"]["threshold"], 1000.0);
    let loops = live.of_type("loop");
    assert!(
        !loops.is_empty(),
        "the live run saw the loop: {}",
        live.stdout
    );
    assert_eq!(loops[0]["evidence"]["rule"]["name"], "call_cycle");
    assert!(
        !live.of_type("recovered").is_empty(),
        "and its end: {}",
        live.stdout
    );

    let replayed = replay_unprivileged(&file.0, &[]);
    assert_eq!(replayed.code, 0, "{replayed:?}");
    assert!(
        replayed.stderr.is_empty(),
        "a whole recording: {replayed:?}"
    );
    let first = &replayed.records()[0];
    assert_eq!(first["type"], "start");
    assert_eq!(first["recording"], file.arg());
    let (want, got) = (judged(&live), judged(&replayed));
    assert_eq!(
        want.len(),
        got.len(),
        "{}\n---\n{}",
        live.stdout,
        replayed.stdout
    );
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w, g);
    }
    assert_eq!(replayed.of_type("detached").len(), 1);

    // Other settings, other verdicts: nothing runs at a billion calls/s,
    // and no process burns 64 cores.
    let strict = replay_unprivileged(&file.0, &["--threshold", "1e9", "--cpu-cores", "64"]);
    assert_eq!(strict.code, 0, "{strict:?}");
    assert!(strict.of_type("loop").is_empty(), "{}", strict.stdout);
    assert_eq!(strict.records()[0]["settings"]["threshold"], 1e9);
    // The counts do not depend on the rules (baselines do: the loop's
    // intervals, not suspect now, were learned).
    let counts = |run: &Run| -> Vec<(Value, Value, Value)> {
        run.of_type("sample")
            .into_iter()
            .map(|s| (s["ts"].clone(), s["function"].clone(), s["calls"].clone()))
            .collect()
    };
    assert_eq!(counts(&strict), counts(&live));
    // And --fail-on-loop on a replay stops at the verdict, exit 3.
    let gate = replay_unprivileged(&file.0, &["--fail-on-loop"]);
    assert_eq!(gate.code, 3, "{gate:?}");
}

#[test]
fn watch_record_killed_mid_run_replays_up_to_its_last_whole_snapshot() {
    require_root();
    let target = Target::fixture(&["300:60"]);
    let file = TempFile::new("killed.rec");
    let extra = ["--record", file.arg()];
    let watcher = Cacheloop::start(&watch_args(target.pid, &["cache_invalidate"], &extra));
    watcher.wait_attached(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(5));
    watcher.signal(libc::SIGKILL);
    let killed = watcher.finish(Duration::from_secs(10));
    assert_eq!(killed.code, 128 + libc::SIGKILL, "{killed:?}");

    let replayed = cacheloop(&["replay", file.arg(), "--json"], Duration::from_secs(30));
    assert_eq!(replayed.code, 0, "{replayed:?}");
    assert!(
        replayed
            .stderr
            .contains("ends without its closing record (the recorder was stopped mid-write)"),
        "{}",
        replayed.stderr
    );
    assert_eq!(replayed.stderr.lines().count(), 1, "{}", replayed.stderr);
    // Durable every 2 s: of ~5 snapshots at most 2 s are lost.
    let samples = replayed.of_type("sample");
    assert!(samples.len() >= 2, "{}", replayed.stdout);
    assert!(samples.iter().all(|s| s["pid"] == target.pid));
}

#[test]
fn replay_of_a_file_that_is_not_a_recording_exits_2_saying_so() {
    require_root();
    let file = TempFile::new("not.rec");
    std::fs::write(&file.0, "{\"type\":\"sample\"}\n").unwrap();
    let run = cacheloop(&["replay", file.arg()], Duration::from_secs(10));
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stdout.is_empty());
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("is not a cacheloop recording") && run.stderr.contains("--record"),
        "{}",
        run.stderr
    );

    // A recording from a future cacheloop.
    let mut future = b"CLOOPREC".to_vec();
    future.extend(u16::MAX.to_le_bytes());
    std::fs::write(&file.0, future).unwrap();
    let run = cacheloop(&["replay", file.arg()], Duration::from_secs(10));
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("newer than this cacheloop"),
        "{}",
        run.stderr
    );

    let run = cacheloop(
        &["replay", "/nonexistent/incident.rec"],
        Duration::from_secs(10),
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .contains("cannot open the recording /nonexistent/incident.rec"),
        "{}",
        run.stderr
    );
}

#[test]
fn watch_record_to_an_unwritable_path_exits_2_before_attaching() {
    require_root();
    let target = Target::fixture(&["100:30"]);
    let run = cacheloop(
        &watch_args(
            target.pid,
            &["cache_invalidate"],
            &["--record", "/nonexistent/dir/x.rec", "--duration", "2s"],
        ),
        Duration::from_secs(20),
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .contains("cannot create the recording /nonexistent/dir/x.rec"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty(), "nothing attached: {}", run.stdout);
}
