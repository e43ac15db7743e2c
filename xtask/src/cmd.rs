//! Running cargo with the pinned toolchain, and the build/test/check steps.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::setup::TOOLCHAIN;

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_owned()
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

/// One build of every binary the demo and the tests use. The default
/// members only: the eBPF crate builds for the bpf target, through
/// profiler/build.rs.
pub fn build() -> Result<(), String> {
    run(cargo(&["build", "--bins", "--tests"]))
}

/// Unit tests, then the kernel tests against the binaries just built.
pub fn test(extra: &[String]) -> Result<(), String> {
    let mut cmd = cargo(&["test"]);
    cmd.args(extra);
    run(cmd)
}

/// What CI checks besides tests.
pub fn check() -> Result<(), String> {
    run(cargo(&["fmt", "--all", "--", "--check"]))?;
    run(cargo(&["clippy", "--all-targets", "--", "-D", "warnings"]))
}
