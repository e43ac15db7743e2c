//! Targeting and symbols: every way of naming a process and a function,
//! and the names people see being the names in their source.

use std::{fs, path::Path, process::Command, time::Duration};

use cacheloop_tests::{
    Cacheloop, Target, cacheloop, native, private_fixture, rates, require_root, total_calls,
    watch_args, watch_fixture_args,
};

fn within(rate: f64, expected: f64, tolerance: f64) -> bool {
    (rate - expected).abs() <= expected * tolerance
}

#[test]
fn watch_stripped_c_binary_finds_symbols_in_its_debug_file_and_counts_clones() {
    require_root();
    let target = Target::spawn(&native().c_cache, &["150", "60"], "ready");
    let run = cacheloop(
        &watch_args(
            target.pid,
            &["evict", "cache_invalidate"],
            &["--duration", "3s"],
        ),
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 0, "{run:?}");
    // evict exists only as the clone evict.constprop.0.isra.0; it is
    // reported under its source name.
    for function in ["evict", "cache_invalidate"] {
        let r = rates(&run, target.pid, function);
        assert!(
            r.len() >= 2 && within(r[1], 150.0, 0.1),
            "{function}: {r:?}"
        );
    }
}

#[test]
fn watch_cpp_method_by_its_demangled_name() {
    require_root();
    let target = Target::spawn(&native().cpp_cache, &["120", "60"], "ready");
    let run = cacheloop(
        &watch_args(
            target.pid,
            &["cache::Store::invalidate"],
            &["--duration", "3s"],
        ),
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let sample = &run.of_type("sample")[0];
    let name = sample["function"].as_str().unwrap();
    assert!(name.starts_with("cache::Store::invalidate(std::"), "{name}");
    let r = rates(&run, target.pid, name);
    assert!(within(r[1], 120.0, 0.1), "{r:?}");
}

#[test]
fn watch_cpp_method_reads_its_std_string_key_and_names_the_key_cycle() {
    require_root();
    // Flat out from before attach, walking two long keys in turn (their
    // bytes on the heap, not in the string's inline buffer), alike in more
    // than the 47 bytes of text kept: hashed in full, they stay two keys.
    let target = Target::spawn(&native().cpp_cache, &["0", "60", "2"], "ready");
    std::thread::sleep(Duration::from_millis(500));
    let run = cacheloop(
        &watch_args(
            target.pid,
            &["cache::Store::invalidate"],
            // Argument 0 is `this`; 1 the `const std::string&`.
            &[
                "--key-arg",
                "1:string",
                "--show-keys",
                "--fail-on-loop",
                "--duration",
                "30s",
            ],
        ),
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 3, "{run:?}");
    let record = &run.of_type("loop")[0];
    let cycle = cacheloop_tests::key_cycle(record);
    // Two keys; their text is the first 47 bytes, marked as cut.
    assert_eq!(cycle.len(), 2, "{record}");
    for key in cycle {
        assert_eq!(
            key, "catalog-page-for-category-with-a-long-descripti…",
            "{record}"
        );
    }
}

#[test]
fn watch_rust_function_by_its_demangled_path() {
    require_root();
    let target = Target::fixture(&["100:60"]);
    let run = cacheloop(
        &watch_fixture_args(
            target.pid,
            &["--func", "*store::evict_entry", "--duration", "3s"],
        ),
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        total_calls(&run, Some(target.pid), "fixture::store::evict_entry") > 100,
        "{}",
        run.stdout
    );
}

#[test]
fn watch_library_function_by_pid_counts_only_that_process() {
    require_root();
    let watched = Target::spawn(&native().uses_lib, &["200", "60"], "ready");
    let other = Target::spawn(&native().uses_lib, &["300", "60"], "ready");
    let run = cacheloop(
        &watch_args(
            watched.pid,
            &["lib_cache_invalidate"],
            &["--duration", "3s"],
        ),
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let attached = &run.of_type("attached")[0];
    assert!(
        attached["path"]
            .as_str()
            .unwrap()
            .ends_with("libcachehelper.so"),
        "{attached}"
    );
    let r = rates(&run, watched.pid, "lib_cache_invalidate");
    assert!(within(r[1], 200.0, 0.1), "{r:?}");
    assert_eq!(
        total_calls(&run, Some(other.pid), "lib_cache_invalidate"),
        0
    );
}

#[test]
fn symbols_by_pid_lists_library_functions_with_their_file() {
    require_root();
    let target = Target::spawn(&native().uses_lib, &["10", "60"], "ready");
    let pid = target.pid.to_string();
    let run = cacheloop(
        &["symbols", "--pid", &pid, "--match", "lib_cache_*", "--json"],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let rows = run.records();
    assert_eq!(rows.len(), 1, "{}", run.stdout);
    assert_eq!(rows[0]["name"], "lib_cache_invalidate");
    assert!(
        rows[0]["file"]
            .as_str()
            .unwrap()
            .ends_with("libcachehelper.so")
    );
    for field in ["raw", "address", "size"] {
        assert!(!rows[0][field].is_null(), "{field}");
    }
    let text = cacheloop(
        &[
            "symbols",
            "--binary",
            native().cpp_cache.to_str().unwrap(),
            "--match",
            "cache::*",
        ],
        Duration::from_secs(30),
    );
    assert!(
        text.stdout.contains("cache::Store::invalidate(")
            && text.stdout.contains("_ZN5cache5Store10invalidate"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.trim_end().ends_with("2 function(s)"),
        "{}",
        text.stdout
    );
}

#[test]
fn symbols_of_a_stripped_binary_without_debug_file_says_so() {
    let dir = std::env::temp_dir().join(format!("cacheloop-stripped-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let bare = dir.join("bare");
    fs::copy(&native().c_cache, &bare).unwrap();
    let run = cacheloop(
        &["symbols", "--binary", bare.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("no function symbols") && run.stderr.contains("dbgsym"),
        "{}",
        run.stderr
    );
    let _ = fs::remove_dir_all(&dir);
}

/// A copy of the fixture under a name of our own, so `--name` finds only
/// the processes of this test.
#[test]
fn watch_by_name_attaches_processes_that_restart() {
    require_root();
    let comm = format!("clr{}", std::process::id() % 1_000_000);
    let (dir, binary) = private_fixture(&comm);
    let first = Target::spawn(&binary, &["200:60"], "ready");
    let watcher = Cacheloop::start(&[
        "watch",
        "--name",
        &comm,
        "--func",
        "cache_invalidate",
        "--json",
        "--duration",
        "7s",
    ]);
    std::thread::sleep(Duration::from_millis(2500));
    let first_pid = first.pid;
    drop(first); // the service dies...
    std::thread::sleep(Duration::from_millis(300));
    let second = Target::spawn(&binary, &["200:60"], "ready"); // ...and is restarted
    let run = watcher.finish(Duration::from_secs(30));
    assert_eq!(run.code, 0, "{run:?}");
    let attached: Vec<_> = run
        .of_type("attached")
        .iter()
        .map(|r| r["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(
        attached,
        [u64::from(first_pid), u64::from(second.pid)],
        "{}",
        run.stdout
    );
    assert!(
        run.of_type("target_exit")
            .iter()
            .any(|r| r["pid"] == first_pid)
    );
    let r = rates(&run, second.pid, "cache_invalidate");
    assert!(r.len() >= 2, "the restarted process is sampled: {r:?}");
    assert!(r[1..].iter().any(|&x| within(x, 200.0, 0.1)), "{r:?}");
    drop(second);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn watch_process_in_a_container_resolves_its_files_and_reports_its_namespace_pid() {
    require_root();
    if !cacheloop_tests::have_programs(&[("unshare", "util-linux")]) {
        return;
    }
    let (dir, binary) = private_fixture("nsfixture");
    // New mount and pid namespaces: the fixture runs from a tmpfs only that
    // namespace can see, as pid 1.
    let script = format!(
        "mkdir -p /mnt/cl && mount -t tmpfs none /mnt/cl && cp {} /mnt/cl/cache && exec /mnt/cl/cache 200:60",
        binary.display()
    );
    let mut unshare = Target::spawn(
        Path::new("unshare"),
        &[
            "--mount",
            "--pid",
            "--fork",
            // The child is pid 1 of its namespace: killing `unshare` (what
            // dropping the target does) must take it along, or it runs on.
            "--kill-child",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ],
        "ready",
    );
    assert_eq!(
        unshare.ready_extra[0], "1",
        "the fixture is pid 1 in its namespace"
    );
    let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.pid)).unwrap();
    let host_pid: u32 = children
        .split_whitespace()
        .next()
        .expect("unshare's child")
        .parse()
        .unwrap();
    assert!(
        !Path::new("/mnt/cl/cache").exists(),
        "the file is invisible from the host"
    );

    let run = cacheloop(
        &watch_args(host_pid, &["cache_invalidate"], &["--duration", "3s"]),
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let attached = &run.of_type("attached")[0];
    assert_eq!(attached["path"], "/mnt/cl/cache");
    assert_eq!(attached["ns_pid"], 1);
    let sample = &run.of_type("sample")[0];
    assert_eq!(
        (sample["pid"].as_u64(), sample["ns_pid"].as_u64()),
        (Some(u64::from(host_pid)), Some(1))
    );
    assert!(within(
        rates(&run, host_pid, "cache_invalidate")[1],
        200.0,
        0.1
    ));
    assert!(unshare.is_running());
    drop(unshare);
    let _ = Command::new("true").status();
    let _ = fs::remove_dir_all(&dir);
}
