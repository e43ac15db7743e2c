//! What differs between kernel versions: how probes are attached. From 6.6
//! one `uprobe_multi` link carries every function of a file; before that
//! each function gets a perf-event link of its own. Counting must not care.
//! Each test runs on the kernels it is about and skips, saying so, on the
//! others (the VM runner boots both kinds).

use std::time::Duration;

use cacheloop_tests::{Target, cacheloop, kernel_release, kernel_version, require_root, skip};

/// uprobe_multi links arrived in Linux 6.6.
const MULTI: (u32, u32) = (6, 6);

/// Watches the fixture's three `cache_*` functions for 3 s; checks every
/// function was attached in `mode` and the calls were counted.
fn watch_three_functions_in(mode: &str) {
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
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let attached = &run.of_type("attached")[0];
    assert_eq!(attached["mode"], mode, "{attached}");
    assert_eq!(attached["functions"].as_array().unwrap().len(), 3);
    let lookups: Vec<f64> = run
        .of_type("sample")
        .iter()
        .filter(|s| s["function"] == "cache_lookup")
        .map(|s| s["rate"].as_f64().unwrap())
        .collect();
    assert!(
        lookups.iter().any(|r| (120.0..=180.0).contains(r)),
        "{lookups:?}"
    );
}

#[test]
fn watch_on_6_6_or_later_attaches_one_uprobe_multi_link() {
    require_root();
    if kernel_version() < MULTI {
        skip(&format!(
            "needs Linux 6.6 or later (uprobe_multi); this is {}",
            kernel_release()
        ));
        return;
    }
    watch_three_functions_in("uprobe_multi");
}

#[test]
fn watch_before_6_6_falls_back_to_a_perf_link_per_function() {
    require_root();
    if kernel_version() >= MULTI {
        skip(&format!(
            "needs a kernel older than 6.6 (the fallback path); {} has uprobe_multi",
            kernel_release()
        ));
        return;
    }
    watch_three_functions_in("perf_link_per_function");
}
