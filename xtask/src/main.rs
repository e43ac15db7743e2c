//! `cargo xtask`: everything beyond `cargo build`, from a fresh machine.
//!
//! - `setup`: installs the pinned toolchain with rust-src and bpf-linker
//!   (linked to that toolchain's own libLLVM). Quick when already done.
//! - `build`: setup, then builds the workspace with the pinned toolchain.
//! - `demo`: build, then the postmortem replayed with cacheloop attached.
//! - `test`: build, install the Debian packages the tests use (Redis,
//!   Varnish, Prometheus, gcc, g++), check what `deploy/` ships, then unit
//!   tests and kernel tests (root needed).
//! - `dist`: the release binary servers and images get: static, stripped,
//!   with its SHA-256 (`target/dist/`).
//! - `vm-test`: build, then the kernel tests inside VMs booting Debian's
//!   cloud kernels (6.1 and 6.12 unless `--kernel` says otherwise).
//! - `bench`: cacheloop against bpftrace, or `--soak 1h` on the demo, to BENCHMARKS.md.
//! - `check`: rustfmt and clippy, as CI runs them.
//! - `fuzz`: the cargo-fuzz targets in `fuzz/` (ELF and symbol names,
//!   command-line values, recordings), each for a bounded time (`--time
//!   SECONDS`, 60 by default); fails on a crash and names the input.
//!   Installs cargo-fuzz and g++ when missing.
//! - `verdicts`: replays the verdict corpus (tests/recordings) and writes
//!   its table into VERDICTS.md.
//!
//! This crate uses std only and builds on the machine's default toolchain:
//! it is what installs the toolchain the rest of the workspace needs.

mod bench;
mod cmd;
mod demo;
mod deploy;
mod fuzz;
mod setup;
mod vm;

use std::process::ExitCode;

const USAGE: &str =
    "usage: cargo xtask <setup|build|demo|test|vm-test|bench|check|fuzz|verdicts|dist> [args]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::ensure(),
        Some("build") => setup::ensure().and_then(|()| cmd::build()),
        Some("demo") => setup::ensure()
            .and_then(|()| cmd::build())
            .and_then(|()| demo::run()),
        Some("test") => setup::ensure()
            .and_then(|()| setup::ensure_debian_packages(setup::TEST_PACKAGES))
            .and_then(|()| setup::ensure_python_chroot())
            .and_then(|()| cmd::build())
            .and_then(|()| deploy::check())
            .and_then(|()| cmd::test(&args[1..])),
        Some("dist") => setup::ensure().and_then(|()| deploy::dist()),
        Some("vm-test") => setup::ensure()
            .and_then(|()| setup::ensure_debian_packages(setup::TEST_PACKAGES))
            .and_then(|()| setup::ensure_debian_packages(setup::VM_PACKAGES))
            .and_then(|()| cmd::build())
            .and_then(|()| vm::run(&args[1..])),
        Some("bench") => setup::ensure()
            .and_then(|()| setup::ensure_debian_packages(setup::BENCH_PACKAGES))
            .and_then(|()| bench::run(&args[1..])),
        Some("check") => setup::ensure().and_then(|()| cmd::check()),
        // No bpf-linker: the fuzz targets build without the eBPF object.
        Some("fuzz") => setup::ensure_toolchain()
            .and_then(|()| setup::ensure_debian_packages(setup::FUZZ_PACKAGES))
            .and_then(|()| setup::ensure_cargo_fuzz())
            .and_then(|()| fuzz::run(&args[1..])),
        Some("verdicts") => setup::ensure()
            .and_then(|()| cmd::build())
            .and_then(|()| cmd::verdicts()),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
