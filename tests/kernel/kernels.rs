//! What differs between kernel versions: how probes are attached. From 6.6
//! one `uprobe_multi` link carries every function of a file; before that
//! each function gets a perf-event link of its own. Counting must not care.
//! Each test runs on the kernels it is about and skips, saying so, on the
//! others (the VM runner boots both kinds).

use cacheloop_tests::{kernel_release, kernel_version, require_root, skip};

/// uprobe_multi links arrived in Linux 6.6.
const MULTI: (u32, u32) = (6, 6);

/// The counting test's `cache_*` watch (three functions, each counted),
/// and every function attached in `mode`.
fn watch_three_functions_in(mode: &str) {
    let run = crate::counting::watch_glob_over_cache_functions();
    let attached = &run.of_type("attached")[0];
    assert_eq!(attached["mode"], mode, "{attached}");
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
