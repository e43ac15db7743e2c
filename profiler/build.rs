//! Builds the eBPF object (`profiler-ebpf`) for the bpf target and leaves it in
//! `OUT_DIR`, where `probes.rs` embeds it with `include_bytes_aligned!`.
//!
//! Needs `bpf-linker` on PATH and `-Z build-std=core`; `cargo xtask` sets
//! both up. aya-build turns on build-std when `RUSTC_BOOTSTRAP=1` is set.
//!
//! With `CACHELOOP_NO_EBPF=1` an empty object stands in for it: the fuzz
//! targets (`cargo xtask fuzz`) build the library but never load a
//! program, and building one would take them a minute and a half. A binary
//! built so cannot attach anything (loading fails with an error).

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=CACHELOOP_NO_EBPF");
    if std::env::var_os("CACHELOOP_NO_EBPF").is_some_and(|v| v == "1") {
        let out = std::path::Path::new(&std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
            .join("profiler");
        std::fs::write(out, [])?;
        return Ok(());
    }
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
