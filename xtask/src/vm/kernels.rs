//! Debian's cloud kernels, fetched once and cached in `target/vm/kernels`.
//!
//! A private apt configuration under `target/vm/apt` (bookworm,
//! bookworm-security and trixie-backports) finds them, whatever sources the
//! host itself uses, and touches nothing of the host's apt state. Cloud
//! kernels boot under TCG in seconds and need no modules: BTF, uprobes, BPF
//! and the serial console are built in.
//!
//! `--kernel 6.1` means the newest `6.1.*` Debian offers; `latest` the
//! newest of all. The first fetch of a spec is cached under its name, so
//! reruns are offline and boot the same kernel; delete `target/vm/kernels`
//! to pick up newer builds.

use std::{
    cmp::Ordering,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::cmd::run;

const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
";

/// A kernel ready to boot.
pub struct Kernel {
    /// What the user asked for (`6.1`, `latest`).
    pub spec: String,
    /// The Debian package it came from.
    pub package: String,
    pub vmlinuz: PathBuf,
}

/// The kernel for `spec`, from the cache or from Debian.
pub fn fetch(vm_dir: &Path, spec: &str) -> Result<Kernel, String> {
    let cache = vm_dir.join("kernels");
    let vmlinuz = cache.join(format!("{spec}.vmlinuz"));
    let package_file = cache.join(format!("{spec}.package"));
    if let (true, Ok(package)) = (vmlinuz.is_file(), fs::read_to_string(&package_file)) {
        return Ok(Kernel {
            spec: spec.to_owned(),
            package: package.trim().to_owned(),
            vmlinuz,
        });
    }
    fs::create_dir_all(&cache).map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let apt = Apt::new(&vm_dir.join("apt"))?;
    let names = apt.package_names()?;
    let package = pick(&names, spec).ok_or_else(|| {
        format!(
            "Debian has no cloud kernel {spec}: try 6.1, 6.12 or latest (versions are matched by prefix)"
        )
    })?;
    // Newer Debian kernels (7.x) split the image package: linux-image-* only
    // depends on linux-binary-*, which holds the kernel.
    let version = version_of(&package).unwrap_or_default();
    let candidates = [
        package.clone(),
        format!("linux-binary-{version}-cloud-amd64"),
        format!("linux-binary-unsigned-{version}-cloud-amd64"),
    ];
    let download = vm_dir.join("download");
    let mut found = None;
    for candidate in candidates.iter().filter(|c| names.contains(c)) {
        if let Some(image) = extract_vmlinuz(&apt, candidate, &download)? {
            found = Some((candidate.clone(), image));
            break;
        }
    }
    let (package, image) =
        found.ok_or_else(|| format!("no boot/vmlinuz-* in {}", candidates.join(" or ")))?;
    fs::rename(&image, &vmlinuz).map_err(|e| format!("cannot keep {}: {e}", image.display()))?;
    fs::write(&package_file, &package)
        .map_err(|e| format!("cannot write {}: {e}", package_file.display()))?;
    let _ = fs::remove_dir_all(&download);
    Ok(Kernel {
        spec: spec.to_owned(),
        package,
        vmlinuz,
    })
}

/// Downloads `package` into a fresh `download` directory and extracts its
/// kernel image, if it has one (only that: the modules are not needed).
fn extract_vmlinuz(apt: &Apt, package: &str, download: &Path) -> Result<Option<PathBuf>, String> {
    eprintln!("xtask: fetching {package}");
    let _ = fs::remove_dir_all(download);
    fs::create_dir_all(download)
        .map_err(|e| format!("cannot create {}: {e}", download.display()))?;
    run(apt.command("apt-get", &["download", package], download))?;
    let deb = fs::read_dir(download)
        .map_err(|e| format!("cannot list {}: {e}", download.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download {package} left no .deb"))?;
    let mut extract = Command::new("sh");
    extract
        .arg("-c")
        // 6.x packages keep it in /boot, 7.x in the modules directory.
        .arg(
            "dpkg-deb --fsys-tarfile \"$1\" | tar -x --wildcards './boot/vmlinuz-*' \
             './usr/lib/modules/*/vmlinuz' 2>/dev/null; true",
        )
        .arg("sh")
        .arg(&deb)
        .current_dir(download);
    run(extract)?;
    let first = |dir: PathBuf| Some(fs::read_dir(dir).ok()?.next()?.ok()?.path());
    Ok(first(download.join("boot")).or_else(|| {
        let version = first(download.join("usr/lib/modules"))?;
        Some(version.join("vmlinuz")).filter(|p| p.is_file())
    }))
}

/// apt-get and apt-cache on a private state directory.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> Result<Self, String> {
        for sub in [
            "etc/apt/sources.list.d",
            "etc/apt/preferences.d",
            "var/lib/apt/lists/partial",
            "var/cache/apt/archives/partial",
            "var/lib/dpkg",
        ] {
            fs::create_dir_all(dir.join(sub))
                .map_err(|e| format!("cannot create {}: {e}", dir.join(sub).display()))?;
        }
        let write = |path: PathBuf, text: &str| {
            fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
        };
        write(dir.join("etc/apt/sources.list"), SOURCES)?;
        write(dir.join("var/lib/dpkg/status"), "")?;
        let apt = Self {
            dir: dir.to_owned(),
        };
        run(apt.command("apt-get", &["update", "-q"], dir))
            .map_err(|e| format!("{e}; fetching kernels needs deb.debian.org"))?;
        Ok(apt)
    }

    fn command(&self, program: &str, args: &[&str], cwd: &Path) -> Command {
        let d = self.dir.display();
        let mut cmd = Command::new(program);
        cmd.arg(format!("-oDir={d}"))
            .arg(format!("-oDir::State::status={d}/var/lib/dpkg/status"))
            .arg("-oDir::Etc::trusted=/etc/apt/trusted.gpg")
            .arg("-oDir::Etc::trustedparts=/etc/apt/trusted.gpg.d")
            // Downloads land in our own directory, which apt's sandbox
            // user may not be able to write.
            .arg("-oAPT::Sandbox::User=root")
            .args(args)
            .current_dir(cwd);
        cmd
    }

    fn package_names(&self) -> Result<Vec<String>, String> {
        let mut cmd = self.command("apt-cache", &["pkgnames", "linux-"], &self.dir);
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run apt-cache: {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

/// The kernel version a cloud image package carries:
/// `linux-image-6.12.117+deb12-cloud-amd64-unsigned` -> `6.12.117+deb12`.
/// Debug-symbol and meta packages are not images.
pub fn version_of(package: &str) -> Option<&str> {
    let rest = package.strip_prefix("linux-image-")?;
    let version = rest
        .strip_suffix("-cloud-amd64-unsigned")
        .or_else(|| rest.strip_suffix("-cloud-amd64"))?;
    version
        .starts_with(|c: char| c.is_ascii_digit())
        .then_some(version)
}

/// Numbers of a version, in order: `6.1.0-56` -> [6, 1, 0, 56].
fn numbers(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Whether `version` is of the series `spec` (`6.1` takes `6.1.0-56`, not
/// `6.12.117`).
fn matches(version: &str, spec: &str) -> bool {
    spec == "latest"
        || version
            .strip_prefix(spec)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '-', '+']))
}

/// The newest cloud image of the series `spec` among `names`.
pub fn pick(names: &[String], spec: &str) -> Option<String> {
    names
        .iter()
        .filter_map(|name| Some((name, version_of(name)?)))
        .filter(|(_, version)| matches(version, spec))
        .max_by(|(a, va), (b, vb)| {
            numbers(va)
                .cmp(&numbers(vb))
                // The same kernel signed and unsigned: either boots.
                .then_with(|| b.len().cmp(&a.len()))
                .then(Ordering::Equal)
        })
        .map(|(name, _)| name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        [
            "linux-image-6.1.0-47-cloud-amd64-unsigned",
            "linux-image-6.1.0-56-cloud-amd64-unsigned",
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.9+deb12-cloud-amd64-unsigned",
            "linux-image-7.3.4+deb13-cloud-amd64",
            "linux-image-7.3.4+deb13-cloud-amd64-dbg",
            "linux-image-7.2.12+deb13-cloud-amd64",
            "linux-image-cloud-amd64",
            "linux-image-6.1.0-56-amd64",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn pick_takes_the_newest_of_the_series_only() {
        assert_eq!(
            pick(&names(), "6.1").as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64-unsigned")
        );
        assert_eq!(
            pick(&names(), "6.12").as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64-unsigned")
        );
        assert_eq!(
            pick(&names(), "7.2").as_deref(),
            Some("linux-image-7.2.12+deb13-cloud-amd64")
        );
    }

    #[test]
    fn pick_latest_is_the_newest_image_and_skips_debug_and_meta_packages() {
        assert_eq!(
            pick(&names(), "latest").as_deref(),
            Some("linux-image-7.3.4+deb13-cloud-amd64")
        );
    }

    #[test]
    fn pick_unknown_series_is_none() {
        assert_eq!(pick(&names(), "5.10"), None);
        assert_eq!(pick(&names(), "6.2"), None);
    }

    #[test]
    fn pick_major_only_takes_the_newest_of_that_major() {
        assert_eq!(
            pick(&names(), "6").as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64-unsigned")
        );
    }

    #[test]
    fn version_of_reads_image_packages_only() {
        assert_eq!(
            version_of("linux-image-6.1.0-56-cloud-amd64-unsigned"),
            Some("6.1.0-56")
        );
        assert_eq!(version_of("linux-image-cloud-amd64"), None);
        assert_eq!(version_of("linux-image-6.1.0-56-amd64"), None);
    }
}
