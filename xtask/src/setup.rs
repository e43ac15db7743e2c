//! Installs what the build needs, once: the pinned Rust toolchain with
//! rust-src and the static (musl) target, and bpf-linker linked to that toolchain's own libLLVM.
//!
//! Facts this rests on (checked on Debian 12): a plain `cargo install
//! bpf-linker` looks for a system LLVM that Debian 12 does not have; linking
//! it to the toolchain's libLLVM works, and the binary then finds the library
//! by its versioned name through an rpath to the prefix it was built with,
//! so the prefix must stay where it was made.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::cmd::run;

/// The toolchain the workspace builds with (aya 0.16 needs 1.98).
pub const TOOLCHAIN: &str = "1.98.0";
const BPF_LINKER: &str = "0.13.0";
/// Static executables: one build serves the host tests and VM guests, and
/// the loader is a single file to copy to a server.
pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// Debian packages the tests use: real caches to probe, and compilers for
/// the C and C++ fixtures (binutils splits their debug info).
pub const TEST_PACKAGES: &[&str] = &[
    "redis-server",
    "varnish",
    "gcc",
    "g++",
    "binutils",
    // A real server scraping the exporter, and promtool for the rules.
    "prometheus",
    // Checking deploy/: a virtual environment for kubernetes-validate,
    // systemd-analyze for the units.
    "python3-venv",
    "systemd",
    // Rendering the incident report headless (tests/report.rs).
    "chromium",
    // Interpreted caches (py:, rb:, php: patterns): Debian's interpreters
    // carry USDT probes. Debian 12's CPython 3.11 never fires its call
    // probe (CPython issue 98894): Debian 11's python3.9 runs from a
    // chroot made with debootstrap (`python_chroot`).
    "python3.11",
    "ruby",
    "php8.2-cli",
    "debootstrap",
];

/// Where the kernel tests' CPython with a working `function__entry` lives:
/// Debian 11's python3.9 in a minimal chroot, made once, kept in the
/// workspace (`target/tools`).
pub fn python_chroot() -> std::path::PathBuf {
    crate::cmd::root().join("target/tools/bullseye-python")
}

/// Makes [`python_chroot`] if it is not there yet (a minute or two, once).
pub fn ensure_python_chroot() -> Result<(), String> {
    let root = python_chroot();
    if root.join("usr/bin/python3.9").is_file() {
        return Ok(());
    }
    eprintln!("xtask: debootstrap Debian 11 with python3.9 for the py: tests (once)");
    let _ = std::fs::remove_dir_all(&root);
    let mut cmd = Command::new("debootstrap");
    cmd.args([
        "--variant=minbase",
        "--include=python3.9-minimal",
        "bullseye",
    ])
    .arg(&root)
    .arg("http://deb.debian.org/debian");
    crate::cmd::run(cmd).map_err(|e| {
        format!("cannot make the Debian 11 chroot the py: tests run python3.9 in ({e}); it needs deb.debian.org")
    })
}

/// What `bench` uses: the tools compared, the chroot maker for the newer
/// bpftrace, GNU time for peak RSS, and gcc for the target.
pub const BENCH_PACKAGES: &[&str] = &["bpftrace", "debootstrap", "time", "gcc"];

/// What `vm-test` adds: the emulator, the guest's userland, the packer.
pub const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio"];

/// What `fuzz` uses: a C++ compiler for libFuzzer, which libfuzzer-sys
/// builds from source.
pub const FUZZ_PACKAGES: &[&str] = &["g++"];

/// The cargo-fuzz that `fuzz` drives (installed with the pinned toolchain).
const CARGO_FUZZ: &str = "0.13.2";

pub fn ensure() -> Result<(), String> {
    ensure_toolchain()?;
    ensure_target()?;
    ensure_bpf_linker()
}

/// Installs those of `packages` that are missing, with apt-get.
pub fn ensure_debian_packages(packages: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| {
            let status = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]));
            !status.is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(cmd).map_err(|e| format!("{e}; installing packages needs root"))
    };
    apt(&["update", "-q"])?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"))
}

/// PATH with cargo's bin directory in front, where bpf-linker goes.
pub fn path_with_tools() -> OsString {
    let mut dirs = vec![cargo_home().join("bin")];
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).unwrap_or_default()
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `rustup <kind> list --installed` says for the pinned toolchain
/// (`component` or `target`), one per line.
fn rustup_installed(kind: &str) -> String {
    output(Command::new("rustup").args([kind, "list", "--installed", "--toolchain", TOOLCHAIN]))
        .unwrap_or_default()
}

/// The pinned toolchain with rust-src, rustfmt and clippy.
pub fn ensure_toolchain() -> Result<(), String> {
    let installed = rustup_installed("component");
    let has = |c: &str| installed.lines().any(|l| l.starts_with(c));
    if has("rust-src") && has("clippy") && has("rustfmt") {
        return Ok(());
    }
    eprintln!("xtask: installing Rust {TOOLCHAIN} with rust-src");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "toolchain",
        "install",
        TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src,rustfmt,clippy",
    ]);
    run(cmd).map_err(|e| format!("{e}; rustup must be able to download Rust {TOOLCHAIN}"))
}

fn ensure_target() -> Result<(), String> {
    if rustup_installed("target")
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return Ok(());
    }
    eprintln!("xtask: adding the {TARGET} target to Rust {TOOLCHAIN}");
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", TARGET, "--toolchain", TOOLCHAIN]);
    run(cmd).map_err(|e| format!("{e}; rustup must be able to download the {TARGET} target"))
}

fn ensure_bpf_linker() -> Result<(), String> {
    let bin = cargo_home().join("bin").join("bpf-linker");
    let version = output(Command::new(&bin).arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER) {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER} against Rust {TOOLCHAIN}'s libLLVM (about two minutes)"
    );
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{TOOLCHAIN}"))
            .args(["--print", "sysroot"]),
    )
    .ok_or("cannot ask rustc for its sysroot")?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    // The real library is libLLVM.so.<major>.<minor>-rust-<version>-<channel>;
    // a small libLLVM-<major>-rust-*.so beside it is only a linker script.
    let lib = fs::read_dir(&lib_dir)
        .map_err(|e| format!("cannot list {}: {e}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM.so."))
        .ok_or_else(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let major = lib
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();

    let prefix = cargo_home().join(format!("cacheloop-llvm-{TOOLCHAIN}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .map_err(|e| format!("cannot create {}: {e}", prefix_lib.display()))?;
    for name in ["libLLVM.so", lib.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&lib), &link)
            .map_err(|e| format!("cannot link {}: {e}", link.display()))?;
    }

    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{TOOLCHAIN}"))
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER,
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN");
    run(cmd)
}

/// cargo-fuzz, for `cargo xtask fuzz`; built from crates.io with the pinned
/// toolchain when missing or of another version (about half a minute).
pub fn ensure_cargo_fuzz() -> Result<(), String> {
    let bin = cargo_home().join("bin").join("cargo-fuzz");
    let version = output(Command::new(&bin).arg("--version")).unwrap_or_default();
    if version.split_whitespace().nth(1) == Some(CARGO_FUZZ) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ} (about half a minute)");
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{TOOLCHAIN}"))
        .args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ,
            "--locked",
            "--force",
        ])
        .env_remove("RUSTUP_TOOLCHAIN");
    run(cmd)
}
