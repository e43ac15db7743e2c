//! Builds the eBPF object (`profiler-ebpf`) for the bpf target and leaves it in
//! `OUT_DIR`, where `probes.rs` embeds it with `include_bytes_aligned!`.
//!
//! Needs `bpf-linker` on PATH and `-Z build-std=core`; `cargo xtask` sets
//! both up. aya-build turns on build-std when `RUSTC_BOOTSTRAP=1` is set.

fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "profiler-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../profiler-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(&toolchain()))
}

/// The toolchain that builds us builds the eBPF side too: one compiler, one
/// libLLVM (which bpf-linker is linked against).
/// rustup names it in `RUSTUP_TOOLCHAIN` (`cargo +1.98.0 …` sets it).
fn toolchain() -> String {
    println!("cargo::rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "1.98.0".to_owned())
}
