//! Counting: rates measured in the kernel match what the target really did.

use std::{fs, time::Duration};

use cacheloop_tests::{
    Cacheloop, Run, Target, cacheloop, fixture_bin, rates, require_root, watch_binary_args,
    watch_fixture_args,
};

#[test]
fn watch_by_pid_scripted_200_per_second_is_reported_within_10_percent() {
    require_root();
    let target = Target::fixture(&["200:60"]);
    let extra = ["--duration", "5s"];
    let run = cacheloop(
        &watch_fixture_args(target.pid, &extra),
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let samples = run.of_type("sample");
    let rates = rates(&run, target.pid, "cache_invalidate");
    // Five 1 s intervals; the last may be cut short by --duration.
    assert!(rates.len() >= 4, "{rates:?}");
    for rate in &rates[..4] {
        assert!(
            (180.0..=220.0).contains(rate),
            "rate {rate} not 200±20: {rates:?}"
        );
    }
    let sample = &samples[0];
    for field in ["ts", "pid", "function", "calls", "rate"] {
        assert!(!sample[field].is_null(), "sample lacks {field}: {sample}");
    }
    // --json: nothing but JSON on stdout (records() panics otherwise).
    assert!(run.records().iter().any(|r| r["type"] == "attached"));
    assert!(
        run.records()
            .last()
            .is_some_and(|r| r["type"] == "detached")
    );
}

#[test]
fn watch_by_binary_counts_each_process_apart_including_later_ones() {
    require_root();
    // A private copy: a --binary probe is on the file's inode and would put
    // breakpoints in every other test's fixture too.
    let dir = std::env::temp_dir().join(format!("cacheloop-binary-test-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let binary = dir.join("cache-server");
    fs::copy(fixture_bin(), &binary).unwrap();
    let slow = Target::spawn(&binary, &["100:60"], "ready");
    let watcher = Cacheloop::start(&watch_binary_args(
        &binary,
        &["cache_invalidate"],
        &["--duration", "6s"],
    ));
    // Started after cacheloop attached: counted all the same.
    watcher.wait_attached(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let fast = Target::spawn(&binary, &["300:60"], "ready");
    let run = watcher.finish(Duration::from_secs(30));
    assert_eq!(run.code, 0, "{run:?}");
    // The late process started mid-interval: its first sample is partial.
    for (target, expected, full) in [(&slow, 100.0, 0), (&fast, 300.0, 1)] {
        let rates = rates(&run, target.pid, "cache_invalidate");
        assert!(rates.len() >= full + 3, "pid {}: {rates:?}", target.pid);
        let full_rates = &rates[full..full + 3];
        // A fixture starved of CPU for a moment (the first test in a
        // freshly booted TCG guest, while cacheloop loads) catches up on
        // the calls it owes, and one interval sees them: 115.6 for 100 on
        // both VM kernels once. The catch-up moves calls between intervals
        // without adding any, so the mean is held tighter than each.
        // Counting twice or missing a process is far outside both.
        let mean = full_rates.iter().sum::<f64>() / 3.0;
        assert!(
            (mean - expected).abs() / expected <= 0.10,
            "pid {} mean rate {mean}, expected {expected}: {full_rates:?}",
            target.pid
        );
        for rate in full_rates {
            let error = (rate - expected).abs() / expected;
            assert!(
                error <= 0.25,
                "pid {} rate {rate}, expected {expected}: {full_rates:?}",
                target.pid
            );
        }
    }
}

#[test]
fn watch_glob_over_several_functions_counts_each() {
    require_root();
    watch_glob_over_cache_functions();
}

/// Watches the fixture's three `cache_*` functions for 3 s and checks each
/// is attached and counted (`cache_flush_all` is never called). Returns
/// the run for the kernel-specific checks of `kernels.rs`.
pub fn watch_glob_over_cache_functions() -> Run {
    let target = Target::fixture(&["150:60"]);
    let pid = target.pid.to_string();
    let run = cacheloop(
        &[
            "watch",
            "--pid",
            &pid,
            "--func",
            "cache_*",
            "--duration",
            "3s",
            "--json",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let attached = &run.of_type("attached")[0];
    let mut functions: Vec<&str> = attached["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    functions.sort_unstable();
    assert_eq!(
        functions,
        ["cache_flush_all", "cache_invalidate", "cache_lookup"]
    );
    // Called once per cache_invalidate: same rate.
    let lookups = rates(&run, target.pid, "cache_lookup");
    assert!((135.0..=165.0).contains(&lookups[0]), "{lookups:?}");
    // Never called: no samples at all.
    assert!(rates(&run, target.pid, "cache_flush_all").is_empty());
    let detached = run.records().pop().unwrap();
    assert_eq!(
        detached["never_called"],
        serde_json::json!(["cache_flush_all"])
    );
    run
}
