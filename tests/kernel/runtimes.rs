//! Caches written in interpreted languages, through their runtimes' USDT
//! probes: real PHP and Ruby processes from Debian's packages, each a small
//! cache service with a dependency map (tests/fixtures/runtimes/), healthy
//! and then with a cycle; and what cacheloop says where a runtime's probe
//! cannot fire (Debian's CPython 3.11, Ruby without a TracePoint, PHP
//! without USE_ZEND_DTRACE=1).

use std::{path::PathBuf, time::Duration};

use cacheloop_tests::{
    Cacheloop, Target, cacheloop, have_programs, latency_bound, require_root, watch_args,
};

/// A runtime's cache service script: `CACHELOOP_RUNTIME_FIXTURES` (the VM
/// runner ships them), or the source tree's.
fn script(name: &str) -> String {
    std::env::var_os("CACHELOOP_RUNTIME_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/runtimes"))
        .join(name)
        .display()
        .to_string()
}

/// A runtime's cache service, started with `env` in its environment.
fn service(env: &[(&str, &str)], program: &str, file: &str) -> Target {
    let file = script(file);
    Target::spawn_env(
        std::path::Path::new(program),
        &[file.as_str(), "200"],
        env,
        "ready",
    )
}

/// Watches `cache` with `pattern`, lets it run healthy, adds the cycle
/// (SIGUSR1), and expects a loop naming `function` within 5 s.
fn cycle_is_caught(mut cache: Target, pattern: &str, function: &str) {
    let watcher = Cacheloop::start(&watch_args(
        cache.pid,
        &[pattern],
        &["--fail-on-loop", "--duration", "40s"],
    ));
    watcher.wait_attached(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(4));
    cache.release();
    let began: f64 = cache
        .wait_line("cycle", Duration::from_secs(5))
        .expect("the service took the cyclic rule")
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let run = watcher.finish(Duration::from_secs(60));
    assert_eq!(run.code, 3, "{run:?}");
    let attached = &run.of_type("attached")[0];
    assert_eq!(attached["mode"], "usdt", "{attached}");
    let healthy: u64 = run
        .of_type("sample")
        .iter()
        .filter(|s| s["function"] == function && s["ts"].as_f64().unwrap() < began)
        .map(|s| s["calls"].as_u64().unwrap())
        .sum();
    assert!(healthy > 500, "healthy calls were counted: {healthy}");
    let record = &run.of_type("loop")[0];
    assert!(
        record["functions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == function),
        "{record}"
    );
    let after = record["ts"].as_f64().unwrap() - began;
    eprintln!("{function}: caught {after:.2} s after the cycle began");
    assert!(
        after < latency_bound(5.0),
        "caught {after:.2} s after it began"
    );
}

#[test]
fn a_php_caches_cycle_is_caught_by_its_function_names() {
    require_root();
    if !have_programs(&[("php8.2", "php8.2-cli")]) {
        return;
    }
    let cache = service(&[("USE_ZEND_DTRACE", "1")], "php8.2", "cache.php");
    cycle_is_caught(cache, "php:Cache::invalidate*", "php:Cache::invalidate");
}

#[test]
fn a_ruby_caches_cycle_is_caught_by_its_method_names() {
    require_root();
    if !have_programs(&[("ruby", "ruby")]) {
        return;
    }
    let cache = service(&[("RUBY_DTRACE_TRACEPOINT", "1")], "ruby", "cache.rb");
    cycle_is_caught(cache, "rb:Cache#invalidate*", "rb:Cache#invalidate");
}

#[test]
fn ruby_without_a_tracepoint_is_said_to_be_silent() {
    require_root();
    if !have_programs(&[("ruby", "ruby")]) {
        return;
    }
    let cache = service(&[], "ruby", "cache.rb");
    let run = cacheloop(
        &watch_args(cache.pid, &["rb:Cache#*"], &["--duration", "8s"]),
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let silent: Vec<_> = run
        .of_type("warning")
        .into_iter()
        .filter(|w| w["kind"] == "probes_silent")
        .collect();
    assert_eq!(silent.len(), 1, "{}", run.stdout);
    assert!(
        silent[0]["message"]
            .as_str()
            .unwrap()
            .contains("TracePoint"),
        "{}",
        silent[0]
    );
}

#[test]
fn php_without_its_variable_is_refused_saying_which() {
    require_root();
    if !have_programs(&[("php8.2", "php8.2-cli")]) {
        return;
    }
    let cache = service(&[], "php8.2", "cache.php");
    let run = cacheloop(
        &watch_args(cache.pid, &["php:Cache::*"], &["--duration", "5s"]),
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("USE_ZEND_DTRACE=1"), "{}", run.stderr);
    assert!(run.stdout.is_empty() || run.of_type("loop").is_empty());
}

/// Debian 11's python3.9 (whose `function__entry` fires) in the chroot
/// `cargo xtask test` makes, if it is there.
fn python_chroot() -> Option<PathBuf> {
    let root = std::env::var_os("CACHELOOP_PY_CHROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/bullseye-python")
        });
    if root.join("usr/bin/python3.9").is_file() {
        return Some(root);
    }
    // `cargo xtask test` makes it: there, its absence is a failure.
    assert!(
        std::env::var_os("CI").is_none() || std::env::var_os("CACHELOOP_GUEST").is_some(),
        "no Debian 11 chroot with python3.9 at {}",
        root.display()
    );
    cacheloop_tests::skip("needs Debian 11's python3.9 in a chroot (cargo xtask test makes it)");
    None
}

#[test]
fn a_python_caches_cycle_is_caught_by_its_function_names() {
    require_root();
    let Some(root) = python_chroot() else {
        return;
    };
    // The service, copied into the chroot (as cache.py: the module's name
    // is its file's stem); chroot(8) execs python3.9, so the pid is the
    // interpreter's.
    let dir = format!("/tmp/cacheloop-{}", std::process::id());
    let host_dir = root.join(dir.trim_start_matches('/'));
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::copy(script("cache.py"), host_dir.join("cache.py")).unwrap();
    let inside = format!("{dir}/cache.py");
    let root_arg = root.display().to_string();
    let cache = Target::spawn(
        std::path::Path::new("/usr/sbin/chroot"),
        &[&root_arg, "/usr/bin/python3.9", &inside, "200"],
        "ready",
    );
    cycle_is_caught(cache, "py:cache.invalidate*", "py:cache.invalidate");
    let _ = std::fs::remove_dir_all(&host_dir);
}

#[test]
fn debians_cpython_3_11_is_refused_naming_the_upstream_bug() {
    require_root();
    if !std::path::Path::new("/usr/bin/python3.11").is_file() {
        cacheloop_tests::skip("needs /usr/bin/python3.11 (Debian package python3.11)");
        return;
    }
    let cache = Target::spawn(
        std::path::Path::new("/usr/bin/python3.11"),
        &[&script("cache.py"), "200"],
        "ready",
    );
    let run = cacheloop(
        &watch_args(cache.pid, &["py:cache.invalidate*"], &["--duration", "5s"]),
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("98894"), "{}", run.stderr);
}

#[test]
fn a_runtime_pattern_on_a_program_without_that_runtime_exits_2() {
    require_root();
    let target = Target::fixture(&["200:30"]);
    let run = cacheloop(
        &watch_args(target.pid, &["rb:Cache#*"], &["--duration", "5s"]),
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("runs no Ruby"), "{}", run.stderr);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
}

#[test]
fn symbols_lists_the_interpreted_functions_a_process_calls() {
    require_root();
    if !have_programs(&[("php8.2", "php8.2-cli")]) {
        return;
    }
    let cache = service(&[("USE_ZEND_DTRACE", "1")], "php8.2", "cache.php");
    let pid = cache.pid.to_string();
    let run = cacheloop(
        &[
            "symbols",
            "--pid",
            &pid,
            "--runtime",
            "php",
            "--listen",
            "2s",
            "--match",
            "Cache::*",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let names: Vec<&str> = run.stdout.lines().collect();
    for name in [
        "php:Cache::get",
        "php:Cache::invalidate",
        "php:Cache::invalidateAll",
    ] {
        assert!(names.contains(&name), "{name}: {}", run.stdout);
    }
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("php:Cache::") || n.contains("seen called")),
        "{}",
        run.stdout
    );
}
