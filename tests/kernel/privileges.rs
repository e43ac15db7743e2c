//! Least privilege: cacheloop counts as an ordinary user holding only
//! CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, and
//! without any one of them refuses, naming it.

use std::{fs, os::unix::fs::PermissionsExt as _, time::Duration};

use cacheloop_tests::{
    Target, as_nobody_with, cacheloop_bin, fixture_bin, have_programs, kernel_version, native,
    require_root, skip,
};
use serde_json::Value;

const CAPS: [&str; 4] = ["bpf", "perfmon", "sys_ptrace", "dac_read_search"];

/// A fixture only root may read (mode 0700), running as root at 200/s.
fn private_target(name: &str) -> (Target, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("cacheloop-{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let binary = dir.join("cache-server");
    fs::copy(fixture_bin(), &binary).unwrap();
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o700)).unwrap();
    (Target::spawn(&binary, &["200:60"], "ready"), dir)
}

fn watch_with(caps: &[&str], pid: u32) -> std::process::Output {
    watch_func_with(caps, pid, "cache_invalidate")
}

fn watch_func_with(caps: &[&str], pid: u32, func: &str) -> std::process::Output {
    let mut cmd = as_nobody_with(caps);
    cmd.arg(cacheloop_bin()).args([
        "watch",
        "--pid",
        &pid.to_string(),
        "--func",
        func,
        "--duration",
        "3s",
        "--json",
    ]);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) runs");
    // Bounded: a hang here must fail the test, not the suite.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "cacheloop hung");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn watch_as_a_user_with_the_four_capabilities_counts_in_programs_and_libraries() {
    require_root();
    if !have_programs(&[("setpriv", "util-linux")]) {
        return;
    }
    let (target, dir) = private_target("caps-all");
    let out = watch_with(&CAPS, target.pid);
    // Before 6.6 each uprobe is a perf event, and kernels with upstream's
    // 2025 "Revert to requiring CAP_SYS_ADMIN for uprobes" (Debian 12's 6.1)
    // refuse those to CAP_PERFMON: cacheloop must say so.
    if kernel_version() < (6, 6) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() == Some(1) {
            assert!(
                stderr.contains("no uprobe_multi") && stderr.contains("need CAP_SYS_ADMIN"),
                "{stderr}"
            );
            assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
            skip("four capabilities suffice from Linux 6.6 (uprobe_multi); refused clearly here");
            let _ = fs::remove_dir_all(&dir);
            return;
        }
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rates: Vec<f64> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["type"] == "sample" && r["pid"] == target.pid)
        .filter_map(|r| r["rate"].as_f64())
        .collect();
    assert!(!rates.is_empty(), "{stdout}");
    assert!(
        (150.0..=250.0).contains(&rates[0]),
        "counted as root would: {rates:?}"
    );
    let _ = fs::remove_dir_all(&dir);

    // A shared library's function too: libraries are read through the
    // process's root, since /proc/PID/map_files needs CAP_SYS_ADMIN or
    // CAP_CHECKPOINT_RESTORE whatever else is held.
    let lib_user = Target::spawn(&native().uses_lib, &["200", "60"], "ready");
    let out = watch_func_with(&CAPS, lib_user.pid, "lib_cache_invalidate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("\"type\":\"attached\"") && l.contains("libcachehelper.so")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("\"type\":\"sample\"") && l.contains("lib_cache_invalidate")),
        "{stdout}"
    );
}

#[test]
fn watch_without_any_one_of_the_four_capabilities_exits_1_naming_it() {
    require_root();
    if !have_programs(&[("setpriv", "util-linux")]) {
        return;
    }
    let (target, dir) = private_target("caps-less");
    for missing in CAPS {
        let caps: Vec<&str> = CAPS.iter().copied().filter(|&c| c != missing).collect();
        let out = watch_with(&caps, target.pid);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let name = format!("CAP_{}", missing.to_uppercase());
        assert_eq!(out.status.code(), Some(1), "without {name}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "without {name}: {stderr}");
        assert!(
            stderr.contains(&format!("lacks {name}")) && stderr.contains("grant it"),
            "without {name}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "nothing attached without {name}");
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn watch_from_a_user_namespace_exits_1_saying_its_capabilities_do_not_count() {
    require_root();
    if !have_programs(&[("unshare", "util-linux")]) {
        return;
    }
    let target = Target::fixture(&["100:30"]);
    // Root with every capability, but in a user namespace of its own (a
    // rootless container): none of them counts for BPF.
    let out = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user"])
        .arg(cacheloop_bin())
        .args([
            "watch",
            "--pid",
            &target.pid.to_string(),
            "--func",
            "cache_invalidate",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("inside a user namespace") && stderr.contains("host's user namespace"),
        "{stderr}"
    );
}
