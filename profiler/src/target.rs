//! Turns what the user named (pids, a binary) into processes and the files
//! to probe, and tells whether a process is still alive.
//!
//! Reads `/proc` only; it neither loads nor attaches anything.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Errors from resolving targets: all about what the user typed.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// No process has that pid (or it is a zombie).
    #[error("no process with pid {pid}; check the pid with 'ps -p {pid}'")]
    NoSuchProcess { pid: u32 },
    /// The process's executable cannot be read through /proc.
    #[error("cannot read the executable of pid {pid} ({source}); is it a kernel thread?")]
    NoExecutable {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    /// `--binary` names a file that does not exist or cannot be read.
    #[error("cannot open --binary {}: {source}", path.display())]
    MissingBinary {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `--binary` names something that is not a regular file.
    #[error("--binary {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
}

/// A live process to watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    /// The executable as the process's mount namespace names it.
    pub exe_name: PathBuf,
    /// A path that opens the very file the process runs, even if it was
    /// replaced or deleted on disk since: `/proc/PID/exe`.
    pub exe: PathBuf,
    /// Start time in clock ticks since boot (field 22 of `/proc/PID/stat`),
    /// to tell the process apart from a later one that reuses its pid.
    pub start_time: u64,
    /// The pid inside the process's own pid namespace, where it differs
    /// (a container).
    pub ns_pid: Option<u32>,
    /// The process's root directory as seen from here: `/proc/PID/root`.
    /// Paths the process sees resolve through it (mount namespaces).
    pub root: PathBuf,
}

/// A file mapped executable by a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedFile {
    /// The path as the process sees it.
    pub name: PathBuf,
    /// A path that opens it from here.
    pub open: PathBuf,
}

impl Process {
    /// Looks up a running process by pid.
    pub fn from_pid(pid: u32) -> Result<Self, TargetError> {
        let stat = read_stat(pid).ok_or(TargetError::NoSuchProcess { pid })?;
        if stat.state == 'Z' || stat.state == 'X' {
            return Err(TargetError::NoSuchProcess { pid });
        }
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let exe_name =
            fs::read_link(&exe).map_err(|source| TargetError::NoExecutable { pid, source })?;
        Ok(Self {
            pid,
            exe_name,
            exe,
            start_time: stat.start_time,
            ns_pid: read_ns_pid(pid).filter(|&inner| inner != pid),
            root: PathBuf::from(format!("/proc/{pid}/root")),
        })
    }

    /// The executable and the libraries the process has mapped executable,
    /// the executable first. Files deleted since they were mapped are left
    /// out, except the executable (`/proc/PID/exe` still opens it).
    pub fn mapped_files(&self) -> Vec<MappedFile> {
        let mut files = vec![MappedFile {
            name: self.exe_name.clone(),
            open: self.exe.clone(),
        }];
        let maps = fs::read_to_string(format!("/proc/{}/maps", self.pid)).unwrap_or_default();
        for name in executable_mappings(&maps) {
            if name == self.exe_name || files.iter().any(|f| f.name == name) {
                continue;
            }
            let open = self.root.join(name.strip_prefix("/").unwrap_or(&name));
            files.push(MappedFile { name, open });
        }
        files
    }

    /// Whether this very process (not a successor with its pid) still runs.
    pub fn is_alive(&self) -> bool {
        read_stat(self.pid)
            .is_some_and(|s| s.start_time == self.start_time && s.state != 'Z' && s.state != 'X')
    }
}

/// A binary file named with `--binary`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binary {
    pub path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Binary {
    pub fn open(path: &Path) -> Result<Self, TargetError> {
        let meta = fs::metadata(path).map_err(|source| TargetError::MissingBinary {
            path: path.to_owned(),
            source,
        })?;
        if !meta.is_file() {
            return Err(TargetError::NotAFile {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Whether process `pid` runs this file.
    pub fn runs(&self, pid: u32) -> bool {
        fs::metadata(format!("/proc/{pid}/exe"))
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }

    /// The processes running this file now.
    pub fn processes(&self) -> Vec<Process> {
        let Ok(dir) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found: Vec<Process> = dir
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| self.runs(pid))
            .filter_map(|pid| Process::from_pid(pid).ok())
            .collect();
        found.sort_by_key(|p| p.pid);
        found
    }
}

/// Every live process whose command name (`/proc/PID/comm`, at most 15
/// bytes) is one of `names`.
pub fn processes_named(names: &[String]) -> Vec<Process> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<Process> = dir
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| read_comm(pid).is_some_and(|c| names.iter().any(|n| comm_matches(n, &c))))
        .filter_map(|pid| Process::from_pid(pid).ok())
        .collect();
    found.sort_by_key(|p| p.pid);
    found
}

/// The kernel keeps 15 bytes of a command name: `--name redis-server-long`
/// must match the comm `redis-server-lo`.
fn comm_matches(wanted: &str, comm: &str) -> bool {
    const TASK_COMM_LEN: usize = 15;
    let cut = wanted
        .char_indices()
        .map(|(i, c)| i + c.len_utf8())
        .take_while(|&end| end <= TASK_COMM_LEN)
        .last()
        .unwrap_or(0);
    comm == wanted || comm == &wanted[..cut]
}

fn read_comm(pid: u32) -> Option<String> {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end_matches('\n').to_owned())
}

/// The innermost pid of `NSpid:` in `/proc/PID/status`.
fn read_ns_pid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_ns_pid(&status)
}

fn parse_ns_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// The files of the executable mappings in `/proc/PID/maps` text, in order,
/// each once; anonymous and special mappings and deleted files left out.
fn executable_mappings(maps: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        let mut fields = line.splitn(6, ' ');
        let perms = fields.nth(1).unwrap_or("");
        let path = fields.nth(3).unwrap_or("").trim_start();
        if !perms.contains('x') || !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        let path = PathBuf::from(path);
        if !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

struct Stat {
    state: char,
    start_time: u64,
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    /// Resident set, in pages.
    rss_pages: u64,
}

/// What a process costs now: the first symptoms in the postmortem were CPU
/// and memory climbing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// CPU time used so far (user + system), in nanoseconds.
    pub cpu_nanos: u64,
    /// Resident memory, in bytes.
    pub rss_bytes: u64,
}

impl Process {
    /// CPU time and resident memory now, from `/proc/PID/stat`.
    pub fn usage(&self) -> Option<Usage> {
        let stat = read_stat(self.pid)?;
        // SAFETY: sysconf only reads system configuration.
        let (tick_hz, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let tick_hz = u64::try_from(tick_hz).ok().filter(|&t| t > 0)?;
        let page = u64::try_from(page).ok()?;
        Some(Usage {
            cpu_nanos: stat.cpu_ticks * (1_000_000_000 / tick_hz),
            rss_bytes: stat.rss_pages * page,
        })
    }
}

fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses `/proc/PID/stat`. The command name (field 2) is in parentheses and
/// may itself contain spaces and parentheses, so fields are counted from the
/// last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields are numbered from 1 in proc(5); the state is field 3, so field
    // N is `nth(N - 4)` from here: utime 14, stime 15, starttime 22, rss 24.
    let mut rest = fields.skip(10);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    let start_time = rest.nth(6)?.parse().ok()?;
    let rss_pages = rest.nth(1)?.parse().ok()?;
    Some(Stat {
        state,
        start_time,
        cpu_ticks: utime + stime,
        rss_pages,
    })
}

/// Whether some process has this pid now.
pub fn is_running(pid: u32) -> bool {
    read_stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

/// The running kernel's release (`uname -r`), for records.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default()
}

/// Whether this process may load BPF programs and attach uprobes: root, or
/// CAP_SYS_ADMIN, or CAP_BPF together with CAP_PERFMON.
pub fn has_bpf_privileges() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let Some(caps) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return false;
    };
    let has = |cap: u32| caps & (1 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_name_parses() {
        let line = "4242 (cache (v2) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 \
                    4 0 987654 12345678 300 18446744073709551615";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.start_time, 987654);
        assert_eq!(stat.cpu_ticks, 5 + 3);
        assert_eq!(stat.rss_pages, 300);
    }

    #[test]
    fn executable_mappings_are_listed_once_in_order() {
        let maps = "\
5600-5601 r--p 00000000 08:01 100 /usr/bin/cache
5601-5602 r-xp 00001000 08:01 100 /usr/bin/cache
7f00-7f01 r-xp 00000000 08:01 200 /usr/lib/x86_64-linux-gnu/libc.so.6
7f01-7f02 r-xp 00001000 08:01 200 /usr/lib/x86_64-linux-gnu/libc.so.6
7f02-7f03 rw-p 00000000 00:00 0 
7f03-7f04 r-xp 00000000 08:01 300 /opt/lib/libold.so (deleted)
7f04-7f05 r-xp 00000000 08:01 400 /opt/my lib/libspace.so
7ffd-7ffe r-xp 00000000 00:00 0 [vdso]";
        let got = executable_mappings(maps);
        let want = [
            "/usr/bin/cache",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/opt/my lib/libspace.so",
        ];
        assert_eq!(got, want.map(PathBuf::from));
    }

    #[test]
    fn ns_pid_is_the_innermost() {
        assert_eq!(parse_ns_pid("Name:\tx\nNSpid:\t4242\t17\n"), Some(17));
        assert_eq!(parse_ns_pid("NSpid:\t4242\n"), Some(4242));
        assert_eq!(parse_ns_pid("Name:\tx\n"), None);
    }

    #[test]
    fn long_names_match_the_kernel_s_15_bytes() {
        assert!(comm_matches("redis-server", "redis-server"));
        assert!(comm_matches("varnish-cache-child", "varnish-cache-c"));
        assert!(!comm_matches("redis", "redis-server"));
    }

    #[test]
    fn own_process_maps_its_executable_first_and_its_libc_if_dynamic() {
        let me = Process::from_pid(std::process::id()).unwrap();
        assert_eq!(me.ns_pid, None);
        let files = me.mapped_files();
        assert_eq!(files[0].name, me.exe_name);
        // The build is static (musl) under `cargo xtask`; a plain
        // `cargo test` on a glibc host links libc dynamically.
        let dynamic = cfg!(target_env = "gnu");
        assert_eq!(
            files
                .iter()
                .any(|f| f.name.to_string_lossy().contains("libc")),
            dynamic,
            "{files:?}"
        );
        let named = processes_named(&[read_comm(me.pid).unwrap()]);
        assert!(named.iter().any(|p| p.pid == me.pid));
    }

    #[test]
    fn own_process_resolves_and_is_alive() {
        let me = Process::from_pid(std::process::id()).unwrap();
        assert!(me.is_alive());
        assert_eq!(me.exe_name, std::env::current_exe().unwrap());
    }

    #[test]
    fn own_usage_is_plausible() {
        let me = Process::from_pid(std::process::id()).unwrap();
        let usage = me.usage().unwrap();
        assert!(usage.rss_bytes > 1 << 20, "{usage:?}");
    }

    #[test]
    fn process_that_reused_a_pid_is_not_the_same() {
        let mut me = Process::from_pid(std::process::id()).unwrap();
        me.start_time += 1;
        assert!(!me.is_alive());
    }

    #[test]
    fn missing_binary_is_reported() {
        let err = Binary::open(Path::new("/nonexistent/cache")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cache"), "{err}");
    }

    #[test]
    fn directory_is_not_a_binary() {
        let err = Binary::open(Path::new("/")).unwrap_err();
        assert!(matches!(err, TargetError::NotAFile { .. }), "{err}");
    }

    #[test]
    fn binary_finds_the_processes_running_it() {
        let me = std::env::current_exe().unwrap();
        let procs = Binary::open(&me).unwrap().processes();
        assert!(
            procs.iter().any(|p| p.pid == std::process::id()),
            "{procs:?}"
        );
    }
}
