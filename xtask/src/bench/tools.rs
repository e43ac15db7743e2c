//! The tools compared: cacheloop (release build), Debian 12's bpftrace 0.17
//! (one perf link per probe) and trixie's bpftrace 0.23 (uprobe_multi for
//! wildcards), the latter from a debootstrap chroot under `target/bench`.
//! Each is asked the same thing: count calls of the functions a glob picks
//! in the bench target, in its cheapest form (`@ = count()` for bpftrace).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::cmd::run;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// `watch --pid`: probes scoped to the target process.
    Cacheloop,
    /// `watch --binary`: probes on the file, for every process running it
    /// (what bpftrace does).
    CacheloopBinary,
    Bpftrace17,
    Bpftrace23,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cacheloop => "cacheloop",
            Self::CacheloopBinary => "cacheloop --binary",
            Self::Bpftrace17 => "bpftrace 0.17",
            Self::Bpftrace23 => "bpftrace 0.23",
        }
    }
}

/// Where things are.
pub struct Setup {
    pub cacheloop: PathBuf,
    /// The trixie chroot holding bpftrace 0.23 (None: could not be made).
    pub chroot: Option<PathBuf>,
    /// The bench target as the host sees it (inside the chroot when there
    /// is one, so every tool probes the same file).
    pub target: PathBuf,
}

impl Setup {
    /// The target's path as `tool` sees it.
    fn target_for(&self, tool: Tool) -> String {
        match (tool, &self.chroot) {
            (Tool::Bpftrace23, Some(root)) => {
                let inside = self.target.strip_prefix(root).unwrap_or(&self.target);
                format!("/{}", inside.display())
            }
            _ => self.target.display().to_string(),
        }
    }

    /// The command that runs `tool`: counting calls of `glob` in process
    /// `pid` (cacheloop) or in the target file (cacheloop --binary, and
    /// bpftrace, which has no cheaper pid filter), for `seconds` (None:
    /// until stopped), printing per-interval counts when `every_second`.
    pub fn command(
        &self,
        tool: Tool,
        glob: &str,
        pid: u32,
        seconds: Option<u32>,
        every_second: bool,
        extra: &[&str],
    ) -> Command {
        match tool {
            Tool::Cacheloop | Tool::CacheloopBinary => {
                let mut cmd = Command::new(&self.cacheloop);
                cmd.arg("watch");
                if tool == Tool::Cacheloop {
                    cmd.args(["--pid", &pid.to_string()]);
                } else {
                    cmd.arg("--binary").arg(&self.target);
                }
                cmd.args(["--func", glob, "--json"]);
                if let Some(s) = seconds {
                    cmd.args(["--duration", &format!("{s}s")]);
                }
                cmd.args(extra);
                cmd
            }
            Tool::Bpftrace17 | Tool::Bpftrace23 => {
                let mut script =
                    format!("uprobe:{}:{glob} {{ @ = count(); }}", self.target_for(tool));
                if every_second {
                    script.push_str(" interval:s:1 { print(@); clear(@); }");
                }
                if let Some(s) = seconds {
                    script.push_str(&format!(" interval:s:{s} {{ exit(); }}"));
                }
                let mut cmd = match (tool, &self.chroot) {
                    (Tool::Bpftrace23, Some(root)) => {
                        let mut cmd = Command::new("chroot");
                        cmd.arg(root).arg("bpftrace");
                        cmd
                    }
                    _ => Command::new("bpftrace"),
                };
                // bpftrace refuses more than 512 probes unless told.
                cmd.env("BPFTRACE_MAX_PROBES", "20000");
                cmd.arg("-e").arg(script);
                cmd
            }
        }
    }
}

/// The trixie chroot with bpftrace 0.23, made once (a few minutes), with
/// /proc, /sys and /dev bound in for the run.
pub struct Chroot {
    pub root: PathBuf,
    mounted: Vec<PathBuf>,
}

impl Chroot {
    pub fn prepare(dir: &Path) -> Result<Self, String> {
        let root = dir.join("trixie");
        if !root.join("usr/bin/bpftrace").is_file() {
            eprintln!("xtask: debootstrap trixie with bpftrace 0.23 (a few minutes, once)");
            let _ = fs::remove_dir_all(&root);
            let mut cmd = Command::new("debootstrap");
            cmd.args(["--variant=minbase", "--include=bpftrace", "trixie"])
                .arg(&root)
                .arg("http://deb.debian.org/debian");
            run(cmd)?;
        }
        let mut chroot = Self {
            root,
            mounted: Vec::new(),
        };
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        for dir in ["proc", "sys", "dev"] {
            let at = chroot.root.join(dir);
            if mounts.contains(&format!(" {} ", at.display())) {
                continue;
            }
            let mut cmd = Command::new("mount");
            cmd.arg("--rbind").arg(format!("/{dir}")).arg(&at);
            run(cmd)?;
            chroot.mounted.push(at);
        }
        Ok(chroot)
    }

    pub fn version(&self) -> String {
        version(
            Command::new("chroot")
                .arg(&self.root)
                .args(["bpftrace", "--version"]),
        )
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        // Only what we mounted, by its path.
        for at in self.mounted.iter().rev() {
            let _ = Command::new("umount").arg("-R").arg("-l").arg(at).status();
        }
    }
}

pub fn version(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
