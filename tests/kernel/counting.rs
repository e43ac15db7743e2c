//! Counting: rates measured in the kernel match what the target really did.

use std::time::Duration;

use cacheloop_tests::{Target, cacheloop, fixture_bin, require_root};
use serde_json::Value;

fn rates_of(samples: &[Value], pid: u32, function: &str) -> Vec<f64> {
    samples
        .iter()
        .filter(|s| s["pid"] == pid && s["function"] == function)
        .map(|s| s["rate"].as_f64().expect("rate"))
        .collect()
}

#[test]
fn watch_by_pid_scripted_200_per_second_is_reported_within_10_percent() {
    require_root();
    let target = Target::fixture(&["200:60"]);
    let pid = target.pid.to_string();
    let run = cacheloop(
        &[
            "watch",
            "--pid",
            &pid,
            "--func",
            "cache_invalidate",
            "--duration",
            "5s",
            "--json",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let samples = run.of_type("sample");
    let rates = rates_of(&samples, target.pid, "cache_invalidate");
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
fn watch_by_binary_counts_each_process_apart() {
    require_root();
    let slow = Target::fixture(&["100:60"]);
    let fast = Target::fixture(&["300:60"]);
    let binary = fixture_bin();
    let run = cacheloop(
        &[
            "watch",
            "--binary",
            binary.to_str().unwrap(),
            "--func",
            "cache_invalidate",
            "--duration",
            "4s",
            "--json",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let samples = run.of_type("sample");
    for (target, expected) in [(&slow, 100.0), (&fast, 300.0)] {
        let rates = rates_of(&samples, target.pid, "cache_invalidate");
        assert!(rates.len() >= 3, "pid {}: {rates:?}", target.pid);
        for rate in &rates[..3] {
            let error = (rate - expected).abs() / expected;
            assert!(
                error <= 0.1,
                "pid {} rate {rate}, expected {expected}",
                target.pid
            );
        }
    }
}

#[test]
fn watch_glob_over_several_functions_counts_each() {
    require_root();
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
    let samples = run.of_type("sample");
    // Called once per cache_invalidate: same rate.
    let lookups = rates_of(&samples, target.pid, "cache_lookup");
    assert!((135.0..=165.0).contains(&lookups[0]), "{lookups:?}");
    // Never called: no samples at all.
    assert!(rates_of(&samples, target.pid, "cache_flush_all").is_empty());
}
