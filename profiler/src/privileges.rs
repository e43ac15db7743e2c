//! What cacheloop needs of the kernel's capabilities, and saying which one
//! is missing. Root has them all; a service account needs exactly these:
//!
//! - `CAP_BPF`: create the maps and load the eBPF program (Debian sets
//!   `kernel.unprivileged_bpf_disabled`, so nothing without it).
//! - `CAP_PERFMON`: attach it as uprobes through a uprobe_multi link
//!   (Linux 6.6+), and let the program read user memory and stacks.
//! - `CAP_SYS_PTRACE`: read another user's processes in /proc (their
//!   executable, memory map, root directory and threads).
//! - `CAP_DAC_READ_SEARCH`: read the files they run, and their debug
//!   files, whatever their permissions.
//!
//! `CAP_SYS_ADMIN` would cover the first two; it is needed only before
//! 6.6, where each uprobe is a perf event: upstream's 2025 fix "perf:
//! Revert to requiring CAP_SYS_ADMIN for uprobes" (a uprobe off an
//! instruction boundary can corrupt the target), in the stable kernels
//! too, takes CAP_PERFMON's right to those away (see `probes.rs`).

use std::{fs, io};

pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The capabilities that do not suffice on their own: they are named in
/// the message, with what each is for.
const FOR_PROBES: [(u32, &str); 2] = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")];

/// A capability cacheloop lacks, and what it could not do without it.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what}: cacheloop lacks {cap}, needed to {why}; run it as root or grant it {cap} (see 'Least privilege' in the README)"
)]
pub struct MissingCapability {
    pub what: String,
    pub cap: &'static str,
    pub why: &'static str,
    /// The refusal itself, when there was one (a permission error: exit 1).
    #[source]
    pub source: Option<io::Error>,
}

/// This process's effective capabilities (`CapEff` in /proc/self/status).
pub fn effective() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub fn has(cap: u32) -> bool {
    effective() & (1 << cap) != 0
}

/// Whether `caps` may load the program and attach uprobes; if not, the
/// capabilities missing.
pub fn missing_for_probes(caps: u64) -> Vec<&'static str> {
    if caps & (1 << CAP_SYS_ADMIN) != 0 {
        return Vec::new();
    }
    FOR_PROBES
        .iter()
        .filter(|&&(cap, _)| caps & (1 << cap) == 0)
        .map(|&(_, name)| name)
        .collect()
}

/// Whether `uid_map` (`/proc/self/uid_map`) is the initial user
/// namespace's: every uid mapped to itself.
pub fn initial_user_namespace(uid_map: &str) -> bool {
    let fields: Vec<&str> = uid_map.split_whitespace().collect();
    fields == ["0", "0", "4294967295"]
}

/// Refuses before anything is loaded when the probes cannot be.
pub fn require_probes() -> Result<(), MissingCapability> {
    // Capabilities held in a user namespace of its own (a rootless
    // container) show in CapEff but count for nothing with the kernel's BPF
    // and perf checks, which ask the initial namespace.
    if fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| !initial_user_namespace(&m)) {
        return Err(MissingCapability {
            what: "cannot attach uprobes from inside a user namespace (a rootless container?)"
                .to_owned(),
            cap: "CAP_BPF and CAP_PERFMON in the host's user namespace",
            why: "load and attach eBPF programs: capabilities held in a user namespace do not count for them",
            source: None,
        });
    }
    let missing = missing_for_probes(effective());
    match missing.as_slice() {
        [] => Ok(()),
        [cap] => Err(MissingCapability {
            what: "cannot attach uprobes".to_owned(),
            cap,
            why: if *cap == "CAP_BPF" {
                "load its eBPF program"
            } else {
                "attach its eBPF program as uprobes"
            },
            source: None,
        }),
        _ => Err(MissingCapability {
            what: "cannot attach uprobes".to_owned(),
            cap: "CAP_BPF and CAP_PERFMON",
            why: "load its eBPF program and attach it as uprobes",
            source: None,
        }),
    }
}

/// `err`, from reading `what` of another process through /proc, as the
/// missing CAP_SYS_PTRACE when that is why it was refused.
pub fn explain_proc(what: String, err: io::Error) -> Result<io::Error, MissingCapability> {
    explain(
        what,
        err,
        CAP_SYS_PTRACE,
        "CAP_SYS_PTRACE",
        "read another user's processes",
    )
}

/// `err`, from reading file `what`, as the missing CAP_DAC_READ_SEARCH
/// when that is why it was refused.
pub fn explain_file(what: String, err: io::Error) -> Result<io::Error, MissingCapability> {
    explain(
        what,
        err,
        CAP_DAC_READ_SEARCH,
        "CAP_DAC_READ_SEARCH",
        "read files its user cannot",
    )
}

fn explain(
    what: String,
    err: io::Error,
    cap: u32,
    name: &'static str,
    why: &'static str,
) -> Result<io::Error, MissingCapability> {
    if err.kind() == io::ErrorKind::PermissionDenied && !has(cap) {
        Err(MissingCapability {
            what,
            cap: name,
            why,
            source: Some(err),
        })
    } else {
        Ok(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_identity_uid_map_is_the_initial_user_namespace() {
        assert!(initial_user_namespace("         0          0 4294967295\n"));
        assert!(!initial_user_namespace(
            "         0       1000          1\n"
        ));
        assert!(!initial_user_namespace(
            "         0     100000      65536\n     65536       1000          1\n"
        ));
    }

    #[test]
    fn probes_need_bpf_and_perfmon_or_sys_admin_and_the_missing_one_is_named() {
        let bit = |c: u32| 1u64 << c;
        assert!(missing_for_probes(bit(CAP_BPF) | bit(CAP_PERFMON)).is_empty());
        assert!(missing_for_probes(bit(CAP_SYS_ADMIN)).is_empty());
        assert_eq!(missing_for_probes(bit(CAP_BPF)), ["CAP_PERFMON"]);
        assert_eq!(
            missing_for_probes(bit(CAP_SYS_PTRACE) | bit(CAP_DAC_READ_SEARCH)),
            ["CAP_BPF", "CAP_PERFMON"]
        );
    }
}
