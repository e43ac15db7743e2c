//! The guest's initramfs: busybox, an init script that runs the kernel
//! tests, the static binaries of the host build, and what the tests start.
//!
//! The tests' own binaries are static (musl). The native fixtures (C, C++,
//! a shared library), Redis and util-linux's `setpriv` and `unshare` are
//! Debian's dynamic executables: they travel with the libraries `ldd`
//! names, at the same paths. Varnish does not: it compiles its VCL with a C
//! compiler, too big for a guest, so its test skips there and says so.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::cmd::run;

/// PID 1 of the guest. Arguments after `--` on the kernel command line
/// reach it as "$@" and go to the test binary; `@panic` and `@hang` are for
/// `vm-test --self-test` (a guest that panics, one that never finishes).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ip link set lo up
echo "cacheloop-vm: kernel $(uname -r)"
case "$1" in
@panic) echo c > /proc/sysrq-trigger ;;
@hang) while :; do sleep 3600; done ;;
esac
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export CACHELOOP_BIN=/cacheloop/bin/cacheloop
export CACHELOOP_FIXTURE=/cacheloop/bin/fixture
export CACHELOOP_WORKLOAD=/cacheloop/bin/workload
export CACHELOOP_DEMO=/cacheloop/bin/demo-cache
export CACHELOOP_NATIVE=/cacheloop/native
export CACHELOOP_DEMO_CONFIG=/cacheloop/demo-config
export CACHELOOP_GUEST=1
export CACHELOOP_RUNTIME_FIXTURES=/cacheloop/runtimes
cd /tmp
/cacheloop/bin/kernel "$@"
echo "cacheloop-vm: exit $?"
poweroff -f
"#;

/// Debian programs the tests start, by name on PATH.
/// PHP too: one executable, whose USDT probe (a uprobe with a semaphore,
/// attached through the perf uprobe PMU) is then tested on each kernel.
/// Ruby and Python need their standard libraries: their tests skip in
/// guests.
const HOST_PROGRAMS: &[&str] = &["redis-server", "redis-cli", "setpriv", "unshare", "php8.2"];

/// What goes in: the build's binaries and the kernel-test executable.
pub struct Inputs<'a> {
    pub root: &'a Path,
    pub bin_dir: &'a Path,
    pub kernel_tests: &'a Path,
}

/// Builds `vm_dir/initramfs.cpio` (uncompressed: the kernel takes it as is,
/// and there is nothing to gain from compressing it for a local boot).
pub fn build(vm_dir: &Path, inputs: &Inputs) -> Result<PathBuf, String> {
    let stage = vm_dir.join("initramfs");
    let _ = fs::remove_dir_all(&stage);
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "cacheloop/bin",
    ] {
        mkdir(&stage.join(dir))?;
    }
    copy(Path::new("/bin/busybox"), &stage.join("bin/busybox"))?;
    write_executable(&stage.join("init"), INIT)?;

    let bin = stage.join("cacheloop/bin");
    for name in ["cacheloop", "fixture", "workload", "demo-cache"] {
        copy_stripped(&inputs.bin_dir.join(name), &bin.join(name))?;
    }
    copy_stripped(inputs.kernel_tests, &bin.join("kernel"))?;
    let config = stage.join("cacheloop/demo-config");
    mkdir(&config)?;
    for name in ["healthy.deps", "cycle.deps"] {
        copy(
            &inputs.root.join("demo/config").join(name),
            &config.join(name),
        )?;
    }

    let runtimes = stage.join("cacheloop/runtimes");
    mkdir(&runtimes)?;
    copy(
        &inputs.root.join("tests/fixtures/runtimes/cache.php"),
        &runtimes.join("cache.php"),
    )?;

    let native = stage.join("cacheloop/native");
    let mut script = Command::new("sh");
    script
        .arg(inputs.root.join("tests/fixtures/build.sh"))
        .arg(&native);
    run(script)?;
    let mut dynamic: Vec<PathBuf> = ["cpp_cache", "uses_lib", "deploy_v1", "deploy_v2"]
        .iter()
        .map(|n| native.join(n))
        .collect();
    for program in HOST_PROGRAMS {
        let path = which(program).ok_or_else(|| format!("{program} is not installed"))?;
        copy(&path, &stage.join("usr/bin").join(program))?;
        dynamic.push(path);
    }
    for library in libraries(&dynamic)? {
        let inside = stage.join(library.strip_prefix("/").unwrap_or(&library));
        if let Some(parent) = inside.parent() {
            mkdir(parent)?;
        }
        copy(&library, &inside)?;
    }

    let cpio = vm_dir.join("initramfs.cpio");
    let mut pack = Command::new("sh");
    pack.arg("-c")
        .arg("find . | cpio --quiet -o -H newc > \"$1\"")
        .arg("sh")
        .arg(&cpio)
        .current_dir(&stage);
    run(pack)?;
    Ok(cpio)
}

/// The shared libraries (and loader) `ldd` says these programs load.
fn libraries(programs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut found = Vec::new();
    for program in programs {
        let out = Command::new("ldd")
            .arg(program)
            .output()
            .map_err(|e| format!("cannot run ldd: {e}"))?;
        if !out.status.success() {
            return Err(format!("ldd {} failed", program.display()));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vdso has no path.
            let path = line
                .split_whitespace()
                .find(|word| word.starts_with('/'))
                .map(PathBuf::from);
            if let Some(path) = path.filter(|p| !found.contains(p)) {
                found.push(path);
            }
        }
    }
    Ok(found)
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn mkdir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Copies the file's contents (through symlinks) with its permissions.
fn copy(from: &Path, to: &Path) -> Result<(), String> {
    fs::copy(from, to)
        .map(drop)
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))
}

/// Copies an executable without its DWARF (a third of the size of a debug
/// build); symbols stay, the tests probe functions by name.
fn copy_stripped(from: &Path, to: &Path) -> Result<(), String> {
    let mut strip = Command::new("strip");
    strip.arg("--strip-debug").arg("-o").arg(to).arg(from);
    run(strip)
}

fn write_executable(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))
}
