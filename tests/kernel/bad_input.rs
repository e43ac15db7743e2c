//! Bad input: one line on stderr that names the problem, the documented exit
//! code, no panic, and the target untouched.

use std::time::Duration;

use cacheloop_tests::{Run, Target, cacheloop, cacheloop_bin, require_root};

/// Runs cacheloop and checks the shape of a refusal.
fn refused(args: &[&str], code: i32, needle: &str) -> Run {
    let run = cacheloop(args, Duration::from_secs(30));
    assert_eq!(run.code, code, "{args:?}: {run:?}");
    assert!(
        run.stdout.is_empty(),
        "{args:?}: nothing on stdout: {run:?}"
    );
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line: {:?}", run.stderr);
    assert!(
        lines[0].contains(needle),
        "{args:?}: '{needle}' not in {:?}",
        lines[0]
    );
    assert!(!run.stderr.contains("panicked"), "{run:?}");
    run
}

/// A pid no process has: one past the kernel's limit.
fn free_pid() -> String {
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (max + 1).to_string()
}

#[test]
fn watch_pid_that_does_not_exist_exits_2() {
    require_root();
    let pid = free_pid();
    refused(
        &["watch", "--pid", &pid, "--func", "f"],
        2,
        &format!("no process with pid {pid}"),
    );
}

#[test]
fn watch_pid_that_is_not_a_number_exits_2() {
    refused(
        &["watch", "--pid", "redis", "--func", "f"],
        2,
        "'redis' is not a process id",
    );
}

#[test]
fn watch_missing_binary_exits_2() {
    require_root();
    refused(
        &[
            "watch",
            "--binary",
            "/nonexistent/cache-server",
            "--func",
            "f",
        ],
        2,
        "/nonexistent/cache-server",
    );
}

#[test]
fn watch_file_that_is_not_elf_exits_2() {
    require_root();
    let path = std::env::temp_dir().join(format!("cacheloop-not-elf-{}", std::process::id()));
    std::fs::write(&path, "#!/bin/sh\necho not a binary\n").unwrap();
    let shown = path.to_str().unwrap();
    refused(
        &["watch", "--binary", shown, "--func", "f"],
        2,
        "is not an ELF",
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn watch_pattern_matching_nothing_exits_2_and_suggests_symbols() {
    require_root();
    let mut target = Target::fixture(&["100:60"]);
    let addr = target.invalidate_addr();
    let original = target.code_at(addr, 8);
    let pid = target.pid.to_string();
    let run = refused(
        &[
            "watch",
            "--pid",
            &pid,
            "--func",
            "cache_invalidate",
            "--func",
            "no_such_fn*",
        ],
        2,
        "'no_such_fn*' matches no function",
    );
    assert!(run.stderr.contains("cacheloop symbols"), "{run:?}");
    assert_eq!(target.code_at(addr, 8), original);
    assert!(target.is_running());
}

#[test]
fn watch_zero_interval_exits_2() {
    refused(
        &["watch", "--pid", "1", "--func", "f", "--interval", "0s"],
        2,
        "--interval must be longer than 0",
    );
}

#[test]
fn watch_malformed_duration_exits_2() {
    refused(
        &[
            "watch",
            "--pid",
            "1",
            "--func",
            "f",
            "--duration",
            "5 minutes-ish",
        ],
        2,
        "is not a duration",
    );
    refused(
        &["watch", "--pid", "1", "--func", "f", "--interval", "fast"],
        2,
        "'fast' is not a duration",
    );
}

#[test]
fn watch_without_target_exits_2() {
    refused(&["watch", "--func", "f"], 2, "--pid");
}

#[test]
fn watch_as_unprivileged_user_exits_1() {
    require_root();
    if !cacheloop_tests::have_programs(&[("setpriv", "util-linux")]) {
        return;
    }
    let target = Target::fixture(&["100:60"]);
    // Drop to nobody, with no capabilities at all.
    let out = cacheloop_tests::as_nobody()
        .arg(cacheloop_bin())
        .args([
            "watch",
            "--pid",
            &target.pid.to_string(),
            "--func",
            "cache_invalidate",
        ])
        .output()
        .expect("setpriv (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("lacks CAP_BPF and CAP_PERFMON") && stderr.contains("run it as root"),
        "{stderr}"
    );
}

#[test]
fn watch_stripped_binary_without_debug_file_exits_2_and_says_so() {
    require_root();
    let dir = std::env::temp_dir().join(format!("cacheloop-watch-stripped-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The C fixture, without the debug file its debuglink names.
    let bare = dir.join("bare");
    std::fs::copy(&cacheloop_tests::native().c_cache, &bare).unwrap();
    refused(
        &[
            "watch",
            "--binary",
            bare.to_str().unwrap(),
            "--func",
            "evict",
        ],
        2,
        "has no function symbols (stripped?)",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn watch_duration_beyond_ten_years_exits_2_without_panic() {
    // Regression: parsed, then overflowed `Instant + duration` and panicked.
    refused(
        &[
            "watch",
            "--pid",
            "1",
            "--func",
            "f",
            "--duration",
            "300000000000y",
        ],
        2,
        "--duration",
    );
}

#[test]
fn watch_nanosecond_interval_exits_2() {
    // Regression: read every map in a busy loop.
    refused(
        &["watch", "--pid", "1", "--func", "f", "--interval", "1ns"],
        2,
        "--interval 1ns is out of range",
    );
}

#[test]
fn missing_binary_names_its_cause_once() {
    require_root();
    // Regression: "...: No such file or directory (os error 2): No such
    // file or directory (os error 2)".
    let run = refused(
        &["symbols", "--binary", "/nonexistent/cache-server"],
        2,
        "No such file or directory",
    );
    assert_eq!(
        run.stderr.matches("No such file or directory").count(),
        1,
        "{run:?}"
    );
}

#[test]
fn unreadable_file_is_the_environment_and_exits_1() {
    require_root();
    if !cacheloop_tests::have_programs(&[("setpriv", "util-linux")]) {
        return;
    }
    // A file nobody may read: EACCES is no fault of what was typed.
    use std::os::unix::fs::PermissionsExt as _;
    let file = std::env::temp_dir().join(format!("cacheloop-unreadable-{}", std::process::id()));
    std::fs::copy(cacheloop_tests::fixture_bin(), &file).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = cacheloop_tests::as_nobody()
        .arg(cacheloop_bin())
        .args(["symbols", "--binary"])
        .arg(&file)
        .output()
        .expect("setpriv (util-linux) runs");
    let _ = std::fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
}

#[test]
fn watch_inside_a_pid_namespace_refuses_and_exits_1() {
    require_root();
    if !cacheloop_tests::have_programs(&[("unshare", "util-linux")]) {
        return;
    }
    // Counts are keyed by host pids: inside a container's pid namespace
    // every count would silently be 0.
    let out = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(cacheloop_bin())
        .args(["watch", "--pid", "1", "--func", "f", "--duration", "1s"])
        .output()
        .expect("unshare (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("pid namespace"), "{stderr}");
}
