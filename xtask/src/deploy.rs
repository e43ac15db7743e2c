//! The fleet side: `cargo xtask dist` (the one static binary servers and
//! images get, stripped, with its SHA-256) and the checks of what `deploy/`
//! ships, run by `cargo xtask test` before the tests:
//!
//! - the Kubernetes manifests against the API schemas, strictly (unknown
//!   fields refused), with `kubernetes-validate` from PyPI, pinned, in a
//!   virtual environment under `target/tools`;
//! - the systemd units with `systemd-analyze verify`, any warning failing;
//! - the Prometheus configuration and alert rules with `promtool` (check
//!   config, check rules, and the rules' unit tests).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    cmd::{cargo, root, run},
    setup::TARGET,
};

/// Pinned: a new release can change which manifests validate.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The Kubernetes API the manifests are held to.
const KUBERNETES_VERSION: &str = "1.31";

/// Builds `target/dist/cacheloop` (release, static, stripped) and
/// `cacheloop.sha256` beside it.
pub fn dist() -> Result<(), String> {
    run(cargo(&[
        "build",
        "--profile",
        "dist",
        "--target",
        TARGET,
        "--bin",
        "cacheloop",
    ]))?;
    let built = root()
        .join("target")
        .join(TARGET)
        .join("dist")
        .join("cacheloop");
    let dir = root().join("target/dist");
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let out = dir.join("cacheloop");
    fs::copy(&built, &out).map_err(|e| format!("cannot copy {}: {e}", built.display()))?;
    let sum = Command::new("sha256sum")
        .arg("cacheloop")
        .current_dir(&dir)
        .output()
        .map_err(|e| format!("cannot run sha256sum: {e}"))?;
    if !sum.status.success() {
        return Err("sha256sum failed".to_owned());
    }
    let sums = dir.join("cacheloop.sha256");
    fs::write(&sums, &sum.stdout).map_err(|e| format!("cannot write {}: {e}", sums.display()))?;
    let size = fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!(
        "{} ({:.1} MiB, static, stripped)\n{}: {}",
        out.display(),
        size as f64 / (1024.0 * 1024.0),
        sums.display(),
        String::from_utf8_lossy(&sum.stdout).trim()
    );
    Ok(())
}

/// Checks everything in `deploy/`.
pub fn check() -> Result<(), String> {
    let deploy = root().join("deploy");
    kubernetes(&deploy.join("kubernetes"))?;
    systemd(&deploy.join("systemd"))?;
    prometheus(&deploy.join("prometheus"))?;
    eprintln!("xtask: deploy/ checked (Kubernetes manifests, systemd units, Prometheus rules)");
    Ok(())
}

fn files(dir: &Path, ext: &str) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    Ok(files)
}

fn kubernetes(dir: &Path) -> Result<(), String> {
    let venv = root().join("target/tools/kubernetes-validate");
    let validate = venv.join("bin/kubernetes-validate");
    let installed = venv.join(".installed");
    if fs::read_to_string(&installed).ok().as_deref() != Some(KUBERNETES_VALIDATE) {
        // Debian's python3 (python3-venv), not whatever is first on PATH.
        let mut make = Command::new("/usr/bin/python3");
        make.args(["-m", "venv", "--clear"]).arg(&venv);
        run(make)?;
        let mut pip = Command::new(venv.join("bin/pip"));
        pip.args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            KUBERNETES_VALIDATE,
        ]);
        run(pip)?;
        fs::write(&installed, KUBERNETES_VALIDATE)
            .map_err(|e| format!("cannot write {}: {e}", installed.display()))?;
    }
    let mut cmd = Command::new(validate);
    cmd.args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .args(files(dir, "yaml")?);
    run(cmd).map_err(|e| format!("the Kubernetes manifests do not validate: {e}"))
}

/// `systemd-analyze verify` warns and still exits 0: any output fails. The
/// units name the installed binary; they are verified as copies naming one
/// that exists here.
fn systemd(dir: &Path) -> Result<(), String> {
    let scratch = root().join("target/tools/systemd");
    fs::create_dir_all(&scratch)
        .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
    let binary = root().join("target").join(TARGET).join("debug/cacheloop");
    for unit in files(dir, "service")? {
        let text = fs::read_to_string(&unit)
            .map_err(|e| format!("cannot read {}: {e}", unit.display()))?
            .replace("/usr/local/bin/cacheloop", &binary.display().to_string());
        let copy = scratch.join(unit.file_name().unwrap_or_default());
        fs::write(&copy, text).map_err(|e| format!("cannot write {}: {e}", copy.display()))?;
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .map_err(|e| format!("cannot run systemd-analyze: {e}"))?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() || !said.trim().is_empty() {
            return Err(format!("{} does not verify:\n{said}", unit.display()));
        }
    }
    Ok(())
}

fn prometheus(dir: &Path) -> Result<(), String> {
    for args in [
        &["check", "config", "prometheus.yml"][..],
        &["check", "rules", "cacheloop-rules.yml"],
        &["test", "rules", "cacheloop-rules.test.yml"],
    ] {
        let mut cmd = Command::new("promtool");
        cmd.args(args).current_dir(dir);
        run(cmd)?;
    }
    Ok(())
}
