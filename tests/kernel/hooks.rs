//! `--on-loop`: the hook gets the loop record on stdin; a slow one is
//! stopped at its timeout and holds up no sample; a stop at the loop still
//! runs it.

use std::{fs, path::PathBuf, time::Duration};

use cacheloop_tests::{Cacheloop, Target, require_root, watch_fixture_args};
use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cacheloop-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn on_loop_hook_gets_the_loop_record_and_a_slow_one_delays_no_sample() {
    require_root();
    let dir = scratch("hook-slow");
    let got = dir.join("loop.json");
    let hook = format!("cat > {}; sleep 60", got.display());
    let target = Target::fixture(&["200:hold", "max:60"]);
    let extra = [
        "--duration",
        "25s",
        "--on-loop",
        &hook,
        "--hook-timeout",
        "4s",
    ];
    let watcher = Cacheloop::start(&watch_fixture_args(target.pid, &extra));
    watcher.wait_attached(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(4));
    target.release();
    let run = watcher.finish(Duration::from_secs(90));
    assert_eq!(run.code, 0, "{run:?}");

    let records = run.records();
    let verdict = records
        .iter()
        .find(|r| r["type"] == "loop")
        .expect("a loop record");
    let received: Value = serde_json::from_str(fs::read_to_string(&got).unwrap().trim())
        .expect("the hook read one JSON record");
    assert_eq!(&received, verdict);

    let hook = records
        .iter()
        .find(|r| r["type"] == "hook")
        .unwrap_or_else(|| panic!("no hook record: {}", run.stdout));
    assert_eq!(hook["event"], "loop");
    assert_eq!(hook["pid"], target.pid);
    assert_eq!(hook["timed_out"], true, "{hook}");
    let (loop_ts, hook_ts) = (
        verdict["ts"].as_f64().unwrap(),
        hook["ts"].as_f64().unwrap(),
    );
    assert!(hook_ts - loop_ts >= 4.0, "stopped at its timeout: {hook}");

    // Sampling went on, once a second, while the hook ran.
    let ts: Vec<f64> = records
        .iter()
        .filter(|r| r["type"] == "sample" && r["pid"] == target.pid)
        .map(|r| r["ts"].as_f64().unwrap())
        .filter(|&t| t >= loop_ts - 1.0 && t <= hook_ts + 1.0)
        .collect();
    assert!(ts.len() >= 4, "{ts:?}");
    let gap = ts.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    assert!(gap < 3.0, "a sample was held up by the hook: {ts:?}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn on_loop_hook_runs_before_a_fail_on_loop_exit() {
    require_root();
    let dir = scratch("hook-fail");
    let got = dir.join("loop.json");
    let hook = format!("cat > {}", got.display());
    let target = Target::fixture(&["200:hold", "max:60"]);
    let extra = ["--fail-on-loop", "--duration", "40s", "--on-loop", &hook];
    let watcher = Cacheloop::start(&watch_fixture_args(target.pid, &extra));
    watcher.wait_attached(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(4));
    target.release();
    let run = watcher.finish(Duration::from_secs(90));
    assert_eq!(run.code, 3, "{run:?}");
    let records = run.records();
    let at = |kind: &str| records.iter().position(|r| r["type"] == kind);
    let hook = at("hook").unwrap_or_else(|| panic!("no hook record: {}", run.stdout));
    assert_eq!(records[hook]["status"], 0, "{}", records[hook]);
    assert!(hook < at("detached").unwrap(), "{}", run.stdout);
    let received: Value = serde_json::from_str(fs::read_to_string(&got).unwrap().trim()).unwrap();
    assert_eq!(received["type"], "loop");
    assert_eq!(received["pid"], target.pid);
    let _ = fs::remove_dir_all(&dir);
}
