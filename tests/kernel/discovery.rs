//! Discovery: with no `--func`, cacheloop picks the functions itself (by
//! name, and by on-CPU heat) and catches the loops with no names given.

use std::{fs, time::Duration};

use cacheloop_tests::{
    Cacheloop, Run, Target, cacheloop, demo_bin, demo_config, latency_bound, require_root,
    watch_args, watch_held,
};

/// The `picked` records: (function, why).
fn picked(run: &Run) -> Vec<(String, String)> {
    run.of_type("picked")
        .iter()
        .map(|r| {
            (
                r["function"].as_str().unwrap().to_owned(),
                r["why"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn was_picked(run: &Run, function: &str, why: &str) -> bool {
    picked(run).iter().any(|(f, w)| f == function && w == why)
}

/// When phase `n` of a fixture began (Unix seconds), as it said.
fn phase_start(target: &mut Target, n: usize) -> f64 {
    target
        .wait_line(&format!("phase {n} start"), Duration::from_secs(1))
        .expect("the fixture announced the phase")
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn first_loop(run: &Run) -> serde_json::Value {
    run.of_type("loop")
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("a loop record: {run:?}"))
}

fn functions(record: &serde_json::Value) -> Vec<&str> {
    record["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect()
}

#[test]
fn with_no_names_a_call_cycle_running_at_attach_is_caught() {
    require_root();
    let target = Target::fixture(&["cycle:max:60"]);
    let run = cacheloop(
        &watch_args(target.pid, &[], &["--fail-on-loop", "--duration", "30s"]),
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 3, "{run:?}");
    for f in ["invalidate_a", "invalidate_b", "cache_invalidate"] {
        assert!(was_picked(&run, f, "name"), "{f}: {:?}", picked(&run));
    }
    // The runtime a Rust executable carries (std's flush functions, libc's
    // pthread_key_delete) is not the program's own code.
    assert!(
        picked(&run)
            .iter()
            .all(|(f, _)| !f.contains("std::") && !f.starts_with('_') && !f.starts_with("pthread")),
        "{:?}",
        picked(&run)
    );
    let record = first_loop(&run);
    assert_eq!(
        functions(&record),
        ["invalidate_a", "invalidate_b"],
        "{record}"
    );
    assert_eq!(record["evidence"]["cause"], "call_cycle", "{record}");
}

#[test]
fn with_no_names_a_runaway_after_a_healthy_phase_is_caught_within_8_s() {
    require_root();
    let mut target = Target::fixture(&["200:hold", "max:40"]);
    let run = watch_held(
        &target,
        &watch_args(target.pid, &[], &["--fail-on-loop", "--duration", "40s"]),
        Duration::from_secs(4),
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 3, "{run:?}");
    let start = phase_start(&mut target, 1);
    let record = first_loop(&run);
    // The runaway calls cache_invalidate and fixture::store::evict_entry
    // (also picked by name) equally: either may come first.
    assert!(functions(&record).contains(&"cache_invalidate"), "{record}");
    let after = record["ts"].as_f64().unwrap() - start;
    eprintln!("caught {after:.2} s after the runaway began");
    assert!(
        after < latency_bound(8.0),
        "caught {after:.2} s after it began"
    );
}

#[test]
fn a_cycle_through_functions_no_name_gives_away_is_picked_by_heat_and_counted() {
    require_root();
    // A cycle starts after a healthy phase, through functions whose names
    // say nothing: the samples find them, they are counted at once, and
    // (heat being no evidence) they are not judged before they have a
    // history of their own.
    let target = Target::fixture(&["200:hold", "rebuild:max:40"]);
    let run = watch_held(
        &target,
        &watch_args(target.pid, &[], &["--fail-on-loop", "--duration", "12s"]),
        Duration::from_secs(4),
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let hot: Vec<serde_json::Value> = run
        .of_type("picked")
        .into_iter()
        .filter(|r| r["why"] == "hot")
        .collect();
    assert!(
        hot.iter()
            .any(|r| r["function"] == "rebuild_index" || r["function"] == "reload_entry"),
        "{hot:?}"
    );
    assert!(
        hot[0]["reason"]
            .as_str()
            .unwrap()
            .contains("on-CPU samples"),
        "{}",
        hot[0]
    );
    let counted: u64 = run
        .of_type("sample")
        .iter()
        .filter(|s| s["function"] == "rebuild_index" || s["function"] == "reload_entry")
        .map(|s| s["calls"].as_u64().unwrap())
        .sum();
    assert!(
        counted > 1000,
        "the picked functions were counted: {counted}"
    );
    assert!(run.of_type("loop").is_empty(), "{}", run.stdout);
}

#[test]
fn heat_alone_at_attach_is_no_loop() {
    require_root();
    // Hot, and calling each other, since before cacheloop came: that is
    // also what a busy recursive parser looks like. With no name and no
    // history, it is counted, not called a loop.
    let target = Target::fixture(&["rebuild:max:30"]);
    let run = cacheloop(
        &watch_args(target.pid, &[], &["--duration", "10s"]),
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        was_picked(&run, "rebuild_index", "hot") || was_picked(&run, "reload_entry", "hot"),
        "{:?}",
        picked(&run)
    );
    assert!(run.of_type("loop").is_empty(), "{}", run.stdout);
}

#[test]
fn with_no_names_the_demo_caches_dependency_cycle_is_caught() {
    require_root();
    let dir = std::env::temp_dir().join(format!("cacheloop-discover-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let deps = dir.join("deps.conf");
    fs::copy(demo_config("healthy.deps"), &deps).unwrap();
    let mut cache = Target::spawn(&demo_bin(), &["--deps", deps.to_str().unwrap()], "ready");
    let watcher = Cacheloop::start(&watch_args(
        cache.pid,
        &[],
        &["--fail-on-loop", "--duration", "40s"],
    ));
    watcher.wait_attached(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(4));
    let staged = dir.join("deps.new");
    fs::copy(demo_config("cycle.deps"), &staged).unwrap();
    fs::rename(&staged, &deps).unwrap();
    let reloaded = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        cache
            .wait_line("reloaded", Duration::from_secs(5))
            .is_some()
    );
    let run = watcher.finish(Duration::from_secs(60));
    let _ = fs::remove_dir_all(&dir);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        was_picked(&run, "cache_invalidate", "name"),
        "{:?}",
        picked(&run)
    );
    let record = first_loop(&run);
    assert_eq!(functions(&record)[0], "cache_invalidate", "{record}");
    let after = record["ts"].as_f64().unwrap() - reloaded;
    eprintln!("caught {after:.2} s after the cyclic rules went in");
    assert!(
        after < latency_bound(8.0),
        "caught {after:.2} s after the rules went in"
    );
}
