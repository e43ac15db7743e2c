//! Running cargo with the pinned toolchain, and the build/test/check steps.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::setup::{TARGET, TOOLCHAIN};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_owned()
}

/// Where the build's binaries land: static executables, one build for the
/// host tests, the VM guests and the demo.
pub fn bin_dir() -> PathBuf {
    root().join("target").join(TARGET).join("debug")
}

/// `cargo +TOOLCHAIN ...` in the workspace, through the rustup proxy.
pub fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{TOOLCHAIN}"))
        .args(args)
        .current_dir(root());
    // `cargo xtask` ran us with the default toolchain; do not let its
    // settings leak into the pinned one.
    for var in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTDOC", "CARGO"] {
        cmd.env_remove(var);
    }
    // The eBPF crate needs -Z build-std=core; aya-build asks for it when
    // RUSTC_BOOTSTRAP=1 lets a stable cargo accept -Z.
    cmd.env("RUSTC_BOOTSTRAP", "1");
    cmd.env("PATH", crate::setup::path_with_tools());
    cmd
}

/// Runs a command, failing with its description when it fails.
pub fn run(mut cmd: Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed ({status})"))
    }
}

/// One build of every binary the demo and the tests use, static (musl) so
/// the same files run on the host and in a minimal VM guest. The default
/// members only: the eBPF crate builds for the bpf target, through
/// profiler/build.rs.
pub fn build() -> Result<(), String> {
    run(cargo(&["build", "--target", TARGET, "--bins", "--tests"]))
}

/// Unit tests, then the kernel tests against the binaries just built.
pub fn test(extra: &[String]) -> Result<(), String> {
    let mut cmd = cargo(&["test", "--target", TARGET]);
    cmd.env("CACHELOOP_PY_CHROOT", crate::setup::python_chroot());
    cmd.args(extra);
    run(cmd)
}

/// Replays the verdict corpus and writes its table into VERDICTS.md (the
/// unit test that checks the table, told to write it).
pub fn verdicts() -> Result<(), String> {
    let mut cmd = cargo(&[
        "test",
        "--target",
        TARGET,
        "-p",
        "profiler",
        "--lib",
        "the_verdict_corpus",
    ]);
    cmd.env("CACHELOOP_WRITE_VERDICTS", "1");
    run(cmd)?;
    println!("VERDICTS.md written");
    Ok(())
}

/// The kernel-test executable of the last build (cargo names it with a
/// hash; it says which in its JSON messages).
pub fn kernel_test_binary() -> Result<PathBuf, String> {
    let mut cmd = cargo(&[
        "test",
        "--target",
        TARGET,
        "--package",
        "cacheloop-tests",
        "--test",
        "kernel",
        "--no-run",
        "--message-format=json",
    ]);
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        // The package's binaries are built too; the test target is ours.
        .filter(|l| l.contains("\"kind\":[\"test\"]"))
        .find_map(|l| json_string(l, "executable"))
        .map(PathBuf::from)
        .ok_or_else(|| "cargo named no kernel test executable".to_owned())
}

/// The string value of `"key":"..."` in one line of JSON (cargo's paths
/// carry no escapes worth decoding here).
fn json_string(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let len = line[start..].find('"')?;
    Some(line[start..start + len].to_owned())
}

/// What CI checks besides tests. The fuzz targets (a workspace of their
/// own) are format-checked here; `cargo xtask fuzz` builds them.
pub fn check() -> Result<(), String> {
    run(cargo(&["fmt", "--all", "--", "--check"]))?;
    run(cargo(&[
        "fmt",
        "--manifest-path",
        "fuzz/Cargo.toml",
        "--all",
        "--",
        "--check",
    ]))?;
    run(cargo(&["clippy", "--all-targets", "--", "-D", "warnings"]))
}
