//! Turns what the user named (pids, a binary) into processes and the files
//! to probe, and tells whether a process is still alive.
//!
//! Reads `/proc` only; it neither loads nor attaches anything.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::{self, File},
    io::{self, Read as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{FileExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{catalog::FileId, privileges};

/// Errors from resolving targets: about what the user typed, but
/// [`TargetError::Unreadable`] ([`TargetError::is_usage`]).
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// No process has that pid (or it is a zombie).
    #[error("no process with pid {pid}; check the pid with 'ps -p {pid}'")]
    NoSuchProcess { pid: u32 },
    /// The process's executable cannot be read through /proc.
    #[error("cannot read the executable of pid {pid} (is it a kernel thread?)")]
    NoExecutable {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    /// Refused for want of a capability.
    #[error(transparent)]
    Capability(#[from] crate::privileges::MissingCapability),
    /// `--binary` names a file that does not exist or cannot be read.
    #[error("cannot open --binary {}", path.display())]
    MissingBinary {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `--binary` names something that is not a regular file.
    #[error("--binary {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    /// The process's main thread has ended while its other threads run on
    /// (`pthread_exit` in `main`): `/proc/PID` shows no program and no
    /// mappings, so there is nothing to plan probes from (see
    /// `Controller::unwatch_leaderless` for one watched before).
    #[error(
        "pid {pid}'s main thread has exited while its other threads run on, so /proc/{pid} shows no program to probe and the kernel cannot scope probes to it; cacheloop cannot watch it now (one watched with --binary from before its main thread exited stays watched)"
    )]
    LeaderGone { pid: u32 },
    /// `/proc/PID` could not be read for a reason of the loader's own (out
    /// of descriptors or memory): nothing is known of the process, not
    /// even that it exited.
    #[error("cannot read /proc/{pid}")]
    Unreadable {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

impl TargetError {
    /// Whether what the user typed is at fault (exit 2), not the machine
    /// the loader runs on (exit 1).
    pub fn is_usage(&self) -> bool {
        !matches!(self, Self::Unreadable { .. } | Self::LeaderGone { .. })
    }

    /// `err`, from reading a process's held `/proc` files, as the
    /// process gone or as the loader's trouble.
    fn reading(pid: u32, err: std::io::Error) -> Self {
        if gone(&err) {
            Self::NoSuchProcess { pid }
        } else {
            Self::Unreadable { pid, source: err }
        }
    }
}

/// A live process to watch.
#[derive(Clone, Debug)]
pub struct Process {
    pub pid: u32,
    /// The executable as the process's mount namespace names it.
    pub exe_name: PathBuf,
    /// A path that opens the very file the process runs, even if it was
    /// replaced or deleted on disk since: `/proc/PID/exe`.
    pub exe: PathBuf,
    /// The file `exe` named when the process was found: an exec changes
    /// it under the same pid.
    pub exe_id: FileId,
    /// Start time in clock ticks since boot (field 22 of `/proc/PID/stat`),
    /// to tell the process apart from a later one that reuses its pid.
    pub start_time: u64,
    /// The pid inside the process's own pid namespace, where it differs
    /// (a container).
    pub ns_pid: Option<u32>,
    /// The process's root directory as seen from here: `/proc/PID/root`.
    /// Paths the process sees resolve through it (mount namespaces).
    pub root: PathBuf,
    /// The command name (`/proc/PID/comm`) when it was found: what a
    /// restart of the same service shares with it.
    pub comm: String,
    /// Its `/proc/PID/stat`, held open since it was found.
    files: Arc<ProcFiles>,
}

/// A process's `/proc/PID/stat`, held open from the moment the process is
/// found. It names that process, not its pid: once it is reaped, a read
/// fails (ESRCH) instead of reading whichever process was given the pid
/// since. A check opens nothing, so a loader out of descriptors (EMFILE)
/// cannot take a live target for an exited one; and it is one `pread`, not
/// a walk of `/proc` every 250 ms. One descriptor (and the kernel's 4 KiB
/// seq_file buffer) a process: `--binary` on a library may watch thousands.
#[derive(Debug)]
struct ProcFiles {
    stat: File,
}

impl ProcFiles {
    fn open(pid: u32) -> io::Result<Self> {
        Ok(Self {
            stat: File::open(format!("/proc/{pid}/stat"))?,
        })
    }

    /// `/proc/PID/stat` now: the kernel writes it afresh on each read from
    /// the start (a seq_file).
    fn stat(&self) -> io::Result<Stat> {
        // A stat line is about 300 bytes; 52 fields of 20 digits and a
        // 64-byte name still fit.
        let mut buf = [0u8; 2048];
        let n = self.stat.read_at(&mut buf, 0)?;
        (n < buf.len())
            .then(|| parse_stat_bytes(&buf[..n]))
            .flatten()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable stat"))
    }
}

/// Whether a read of a `/proc/PID` file failed because the process is gone
/// (reaped), as opposed to the loader's own trouble (out of descriptors or
/// memory): only the first ends a process's watch.
fn gone(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ESRCH | libc::ENOENT))
}

/// A file mapped executable by a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedFile {
    /// The path as the process sees it.
    pub name: PathBuf,
    /// A path that opens the very file mapped (`/proc/PID/map_files/..`),
    /// even if a deploy replaced or deleted it on disk since.
    pub open: PathBuf,
}

/// A file held open from the moment its symbols are read until nothing is
/// attached to it any more. Probes are attached through the descriptor
/// (`/proc/self/fd/N`), never through a path: a path may name another
/// build after a deploy, and the old build's offsets in the new build's
/// code would land int3 in the middle of instructions. The descriptor pins
/// the inode the offsets were read from.
///
/// The descriptor pins which file it is, not what it holds: a file
/// rewritten in place (`cp new old` onto a file no process runs) keeps its
/// inode. [`OpenFile::changed`] tells, from the size and modification time
/// read at open.
#[derive(Debug)]
pub struct OpenFile {
    file: File,
    pub id: FileId,
    stamp: Stamp,
}

/// What changes when a file's bytes do: its size and modification time.
/// Not the change time: renaming a new build over the path unlinks the old
/// file, which updates its ctime while its bytes stay as they were.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    size: u64,
    mtime: (i64, i64),
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

impl OpenFile {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        Ok(Self {
            id: FileId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
            stamp: Stamp::of(&meta),
            file,
        })
    }

    /// The file's size and times when it was opened.
    pub fn stamp(&self) -> Stamp {
        self.stamp
    }

    /// Whether the file's bytes may have changed since it was opened (and
    /// its symbols read): written in place. One `fstat`.
    pub fn changed(&self) -> bool {
        self.file
            .metadata()
            .is_ok_and(|meta| Stamp::of(&meta) != self.stamp)
    }

    /// A path the kernel resolves to this very file while it is open.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// A path that opens the very file `pid` maps at `start..end` (inode
/// `inode`, at `name` when it was mapped).
///
/// `/proc/PID/map_files/START-END` where the kernel lets us follow it: only
/// with CAP_SYS_ADMIN, or CAP_CHECKPOINT_RESTORE from 5.9, whatever other
/// capabilities we hold (root has them; the four of least privilege do
/// not). Otherwise the path in the process's own root
/// (`/proc/PID/root/NAME`), if it still names the inode mapped. A file
/// deleted or replaced on disk since it was mapped then has no path: `None`.
pub fn mapped_file_path(
    pid: u32,
    start: u64,
    end: u64,
    name: &Path,
    inode: u64,
) -> Option<PathBuf> {
    let direct = PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"));
    match fs::metadata(&direct) {
        Ok(_) => return Some(direct),
        Err(e) if e.kind() != std::io::ErrorKind::PermissionDenied => return None,
        Err(_) => {}
    }
    let in_root =
        PathBuf::from(format!("/proc/{pid}/root")).join(name.strip_prefix("/").unwrap_or(name));
    fs::metadata(&in_root)
        .is_ok_and(|m| m.ino() == inode)
        .then_some(in_root)
}

/// The identity of the file at `path` now, if any.
pub fn file_id(path: &Path) -> Option<FileId> {
    let meta = fs::metadata(path).ok()?;
    Some(FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

impl Process {
    /// Looks up a running process by pid.
    pub fn from_pid(pid: u32) -> Result<Self, TargetError> {
        let reading = |e| TargetError::reading(pid, e);
        let files = ProcFiles::open(pid).map_err(reading)?;
        let stat = files.stat().map_err(reading)?;
        if stat.exited() {
            return Err(TargetError::NoSuchProcess { pid });
        }
        if stat.leader_gone() {
            return Err(TargetError::LeaderGone { pid });
        }
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let unreadable = |source| match privileges::explain_proc(
            format!("cannot read the executable of pid {pid}"),
            source,
        ) {
            Ok(source) => TargetError::NoExecutable { pid, source },
            Err(missing) => missing.into(),
        };
        let exe_name = fs::read_link(&exe).map_err(unreadable)?;
        let exe_id = fs::metadata(&exe)
            .map(|m| FileId {
                dev: m.dev(),
                ino: m.ino(),
            })
            .map_err(unreadable)?;
        let process = Self {
            pid,
            exe_name,
            exe,
            exe_id,
            start_time: stat.start_time,
            // Read whole or not at all: out of descriptors, an empty name
            // would not match --name after an exec, and a missing
            // namespace pid would name the process wrongly.
            ns_pid: read_ns_pid(pid)
                .map_err(reading)?
                .filter(|&inner| inner != pid),
            root: PathBuf::from(format!("/proc/{pid}/root")),
            comm: comm_of(pid).map_err(reading)?,
            files: Arc::new(files),
        };
        // The paths above name the pid: had the process been reaped and
        // its pid given to another while they were read, they would
        // describe that one.
        if !process.is_alive() {
            return Err(TargetError::NoSuchProcess { pid });
        }
        Ok(process)
    }

    /// The executable and the libraries the process has mapped executable,
    /// the executable first. Each opens as the very file mapped: a library
    /// upgraded on disk since (mapped "(deleted)") is read through
    /// `/proc/PID/map_files`, not through its path, which now names the new
    /// build.
    pub fn mapped_files(&self) -> Vec<MappedFile> {
        let mut files = vec![MappedFile {
            name: self.exe_name.clone(),
            open: self.exe.clone(),
        }];
        let maps = fs::read_to_string(format!("/proc/{}/maps", self.pid)).unwrap_or_default();
        for mapping in executable_mappings(&maps) {
            if mapping.id(self.pid) == Some(self.exe_id)
                || files.iter().any(|f| f.name == mapping.name)
            {
                continue;
            }
            let Some(open) = mapped_file_path(
                self.pid,
                mapping.start,
                mapping.end,
                &mapping.name,
                mapping.inode,
            ) else {
                log::warn!(
                    "pid {} maps {}, replaced on disk since: reading the copy it runs \
                     needs CAP_CHECKPOINT_RESTORE (or root); its functions are left out",
                    self.pid,
                    mapping.name.display()
                );
                continue;
            };
            files.push(MappedFile {
                open,
                name: mapping.name,
            });
        }
        files
    }

    /// The files the process maps executable now, by identity.
    pub fn mapped_ids(pid: u32) -> io::Result<Vec<FileId>> {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
        Ok(executable_mappings(&maps)
            .iter()
            .filter_map(|m| m.id(pid))
            .collect())
    }

    /// Whether this very process (not a successor with its pid) still runs.
    /// A `stat` the loader cannot read for a reason of its own is no sign
    /// of an exit: only a process reaped or a zombie is gone.
    pub fn is_alive(&self) -> bool {
        match self.files.stat() {
            Ok(s) => self.runs(&s),
            Err(e) => !gone(&e),
        }
    }

    /// This very process as it is now (it may have run exec since it was
    /// found: an exec keeps the start time); None once it is gone, its pid
    /// perhaps another's since.
    pub fn again(&self) -> Result<Option<Self>, TargetError> {
        match Self::from_pid(self.pid) {
            Ok(now) if self.is_alive() && now.start_time == self.start_time => Ok(Some(now)),
            Ok(_) | Err(TargetError::NoSuchProcess { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether `stat`, read through the held file, is of a process still
    /// running. The start time, too: the held file cannot name another
    /// process, but a `Process` built with another's start time must not
    /// pass for it.
    fn runs(&self, stat: &Stat) -> bool {
        stat.start_time == self.start_time && !stat.exited()
    }

    /// Whether the process's main thread has ended while its other
    /// threads run on (see [`TargetError::LeaderGone`]).
    pub fn leader_gone(&self) -> bool {
        self.files
            .stat()
            .is_ok_and(|s| self.runs(&s) && s.leader_gone())
    }

    /// The program the process runs now (an exec changes it under the same
    /// pid), by identity; None once the process is gone or when it cannot
    /// be read. Read by path, then the process found alive through its held
    /// `stat`: alive after the read, it was alive during it, and a pid is
    /// not given to another process while its holder lives.
    pub fn exe_now(&self) -> Option<FileId> {
        file_id(&self.exe).filter(|_| self.is_alive())
    }
}

/// A binary file named with `--binary`: an executable, or a library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binary {
    pub path: PathBuf,
    /// The file the path named when last looked at.
    pub id: FileId,
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
            id: FileId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
        })
    }

    /// The file the path names now, when a deploy replaced it (a package
    /// upgrade renames a new build into place): a new inode. `None` while
    /// it is the same file, or while the path is missing mid-deploy.
    pub fn replaced(&self) -> Option<FileId> {
        file_id(&self.path).filter(|&id| id != self.id)
    }

    /// Whether process `pid` runs or maps one of `files` (executable or
    /// library).
    pub fn used_by(pid: u32, files: &[FileId]) -> bool {
        Self::uses(pid, files).unwrap_or(false)
    }

    /// [`Binary::used_by`], or why its mappings could not be read.
    fn uses(pid: u32, files: &[FileId]) -> io::Result<bool> {
        let exe = file_id(Path::new(&format!("/proc/{pid}/exe")));
        if exe.is_some_and(|id| files.contains(&id)) {
            return Ok(true);
        }
        let maps = Process::mapped_ids(pid)?;
        if maps.iter().any(|id| files.contains(id)) {
            return Ok(true);
        }
        // A process whose main thread has exited reads as running nothing
        // through its own directory; its other threads still run the
        // program, and theirs show it. Taken for unused, the old build's
        // link would go after a deploy while it still counts them.
        if exe.is_none()
            && maps.is_empty()
            && let Some((thread, exe)) = thread_of_leaderless(pid)
        {
            if files.contains(&exe) {
                return Ok(true);
            }
            // Through `/proc/TID`, unlisted but there: its `map_files`
            // (which `task/TID` lacks) name the very files mapped, where
            // the device numbers in `maps` can differ from the files'
            // (btrfs, overlay).
            return Ok(Process::mapped_ids(thread)?
                .iter()
                .any(|id| files.contains(id)));
        }
        Ok(false)
    }

    /// Whether some process runs or maps one of `files` now; None when
    /// `/proc` could not be read through for a reason of the loader's own
    /// (out of descriptors), which says nothing either way.
    pub fn in_use(files: &[FileId]) -> Option<bool> {
        let trouble = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
            )
        };
        for entry in fs::read_dir("/proc").ok()? {
            let entry = entry.ok()?;
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            match Self::uses(pid, files) {
                Ok(true) => return Some(true),
                Err(e) if trouble(&e) => return None,
                // Gone since, or not ours to read (another user's, without
                // CAP_SYS_PTRACE): not counted, as by `used_by`.
                Ok(false) | Err(_) => {}
            }
        }
        Some(false)
    }

    /// The processes running or mapping one of `files` now.
    pub fn processes(files: &[FileId]) -> Vec<Process> {
        let Ok(dir) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found: Vec<Process> = dir
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| Self::used_by(pid, files))
            .filter_map(|pid| Process::from_pid(pid).ok())
            .collect();
        found.sort_by_key(|p| p.pid);
        found
    }
}

/// A thread of process `pid` still running its program, and the program,
/// when the main thread has exited and others run on
/// (`Stat::leader_gone`); None otherwise, and for kernel threads, which
/// read the same empty way. A thread itself exiting reads empty too: the
/// first whose `exe` still resolves.
fn thread_of_leaderless(pid: u32) -> Option<(u32, FileId)> {
    let stat = parse_stat_bytes(&fs::read(format!("/proc/{pid}/stat")).ok()?)?;
    if !stat.leader_gone() {
        return None;
    }
    let mut tids = Vec::new();
    task_ids(pid, &mut tids).ok()?;
    tids.into_iter().filter(|&tid| tid != pid).find_map(|tid| {
        let exe = file_id(Path::new(&format!("/proc/{pid}/task/{tid}/exe")))?;
        Some((tid, exe))
    })
}

/// Every live process whose command name (`/proc/PID/comm`, at most 15
/// bytes) is one of `names`, but those `skip` says are known already (each
/// `Process` found holds a descriptor).
pub fn processes_named(names: &[String], skip: impl Fn(u32) -> bool) -> Vec<Process> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<Process> = dir
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| !skip(pid))
        .filter(|&pid| read_comm(pid).is_some_and(|c| is_named(names, &c)))
        .filter_map(|pid| Process::from_pid(pid).ok())
        .collect();
    found.sort_by_key(|p| p.pid);
    found
}

/// Waits until process `pid` (our child) exits, without reaping it, or
/// until `give_up` says so; whether it exited.
pub fn wait_unreaped(pid: i32, give_up: impl Fn() -> bool) -> bool {
    loop {
        // SAFETY: waitid(2) on our own child into a zeroed siginfo; WNOWAIT
        // leaves it to be reaped by `Child::wait`.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: filled in by waitid for WEXITED (0 when none exited yet).
        if r != 0 || unsafe { info.si_pid() } != 0 {
            return true;
        }
        if give_up() {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Stops the process group `leader` leads (our child, not yet reaped, so
/// the group id is still its group's): SIGTERM, then SIGKILL after `grace`
/// to whatever is left, children included. Whether the leader ended on the
/// SIGTERM.
pub fn stop_group(leader: i32, grace: std::time::Duration) -> bool {
    // SAFETY: kill(2) on the group our unreaped child leads.
    unsafe { libc::kill(-leader, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + grace;
    let ended = wait_unreaped(leader, || std::time::Instant::now() >= deadline);
    kill_group(leader);
    ended
}

/// SIGKILL to the group `leader` (our unreaped child) leads.
pub fn kill_group(leader: i32) {
    // SAFETY: as in `stop_group`.
    unsafe { libc::kill(-leader, libc::SIGKILL) };
}

/// The live processes descended from `root` (its children, theirs, ...),
/// by the parent pids in `/proc/PID/stat`, but those `skip` says are known
/// already.
pub fn descendants_of(root: u32, skip: impl Fn(u32) -> bool) -> Vec<Process> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: BTreeMap<u32, u32> = dir
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, parent_pid(pid)?)))
        .collect();
    let descends = |mut pid: u32| {
        // Bounded: a pid chain cannot be longer than the table.
        for _ in 0..parents.len() {
            match parents.get(&pid) {
                Some(&parent) if parent == root => return true,
                Some(&parent) if parent > 0 => pid = parent,
                _ => return false,
            }
        }
        false
    };
    parents
        .keys()
        .copied()
        .filter(|&pid| pid != root && !skip(pid) && descends(pid))
        .filter_map(|pid| Process::from_pid(pid).ok())
        .collect()
}

/// Field 4 of `/proc/PID/stat`.
fn parent_pid(pid: u32) -> Option<u32> {
    stat_tail(&fs::read(format!("/proc/{pid}/stat")).ok()?)?[1..]
        .split_ascii_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether command name `comm` is one of `names` (`--name`).
pub fn is_named(names: &[String], comm: &str) -> bool {
    names.iter().any(|n| comm_matches(n, comm))
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
    comm_of(pid).ok()
}

/// `/proc/PID/comm`; a name not in UTF-8 (the kernel keeps raw bytes) read
/// lossily.
fn comm_of(pid: u32) -> io::Result<String> {
    let comm = fs::read(format!("/proc/{pid}/comm"))?;
    let comm = comm.strip_suffix(b"\n").unwrap_or(&comm);
    Ok(String::from_utf8_lossy(comm).into_owned())
}

/// The innermost pid of `NSpid:` in `/proc/PID/status` (None before
/// Linux 4.1, which has no such line).
fn read_ns_pid(pid: u32) -> io::Result<Option<u32>> {
    let status = fs::read(format!("/proc/{pid}/status"))?;
    Ok(parse_ns_pid(&String::from_utf8_lossy(&status)))
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

/// An executable mapping of a file, from `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    /// `MAJOR:MINOR` of the file's device, as maps prints it.
    major: u32,
    minor: u32,
    inode: u64,
    /// The path, without the " (deleted)" the kernel appends to a file
    /// removed or replaced since it was mapped.
    name: PathBuf,
}

impl Mapping {
    /// The file's identity as `stat` tells it. Maps prints the device the
    /// way the file's superblock numbers it; for overlay and btrfs that can
    /// differ from what `stat` says, so it is checked against the mapped
    /// file itself when it does not match plainly.
    fn id(&self, pid: u32) -> Option<FileId> {
        let dev = libc::makedev(self.major, self.minor);
        let plain = FileId {
            dev,
            ino: self.inode,
        };
        let open = mapped_file_path(pid, self.start, self.end, &self.name, self.inode);
        match open.as_deref().and_then(file_id) {
            Some(id) if id.ino == self.inode => Some(id),
            Some(_) => None,
            None => Some(plain),
        }
    }
}

/// The file-backed executable mappings in `/proc/PID/maps` text, in order,
/// each file once; anonymous and special mappings left out.
fn executable_mappings(maps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in maps.lines() {
        let Some(mapping) = parse_mapping(line) else {
            continue;
        };
        if !out
            .iter()
            .any(|m| m.inode == mapping.inode && m.name == mapping.name)
        {
            out.push(mapping);
        }
    }
    out
}

fn parse_mapping(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    let _offset = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode: u64 = fields.next()?.parse().ok()?;
    let path = fields.next().unwrap_or("").trim_start();
    if !perms.contains('x') || !path.starts_with('/') || inode == 0 {
        return None;
    }
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        major: u32::from_str_radix(major, 16).ok()?,
        minor: u32::from_str_radix(minor, 16).ok()?,
        inode,
        name: PathBuf::from(path.strip_suffix(" (deleted)").unwrap_or(path)),
    })
}

struct Stat {
    state: char,
    /// The thread group's threads (field 20), the leader counted until it
    /// is reaped.
    threads: u64,
    start_time: u64,
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    /// Resident set, in pages.
    rss_pages: u64,
}

impl Stat {
    /// Whether the process has exited: reaped (`X`), or a zombie with no
    /// thread left. `/proc/PID/stat` shows the thread-group leader's state,
    /// and a leader that ended its own thread (`pthread_exit` in `main`)
    /// is a zombie while the other threads run on: the process is alive
    /// and calling. The kernel keeps such a leader in `num_threads` until
    /// the last thread has gone, so a count above one is a running group.
    fn exited(&self) -> bool {
        self.state == 'X' || (self.state == 'Z' && self.threads <= 1)
    }

    /// The leader's own thread has ended while others run on: its
    /// `/proc/PID/exe` and `maps` read as empty, though the process lives.
    fn leader_gone(&self) -> bool {
        self.state == 'Z' && !self.exited()
    }
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
        usage(&self.files.stat().ok()?)
    }

    /// [`Process::usage`], from the same read as [`Process::is_alive`]:
    /// None when the process is gone (or its usage cannot be read).
    pub fn usage_if_alive(&self) -> Option<Usage> {
        self.files
            .stat()
            .ok()
            .filter(|s| self.runs(s))
            .as_ref()
            .and_then(usage)
    }
}

fn usage(stat: &Stat) -> Option<Usage> {
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

/// Threads read one by one at most: a process with more is judged on its
/// total CPU.
pub const MAX_THREADS: usize = 256;

impl Process {
    /// Time each thread has spent running or ready to run so far, (tid,
    /// nanoseconds): `/proc/PID/task/*/schedstat` (on-CPU plus run-queue
    /// wait), or its CPU time from `stat` where that file is missing;
    /// `None` past [`MAX_THREADS`] threads. A loop never sleeps: its
    /// thread's busy time keeps pace with the clock even on a machine so
    /// loaded that it gets half a core, while a healthy thread waits on
    /// clients and I/O. The process's total would hide it in a busy server.
    ///
    /// Read four times a second for every watched process, with nothing
    /// allocated per thread: the thread list through `getdents64` into a
    /// buffer on the stack (`read_dir` goes through the C library's
    /// `opendir`, whose buffer the static build's allocator mapped and
    /// unmapped at each call), each `schedstat` into another.
    pub fn thread_busy(&self) -> Option<Vec<(u32, u64)>> {
        let mut tids = Vec::new();
        if !task_ids(self.pid, &mut tids).ok()? {
            return None;
        }
        // SAFETY: sysconf only reads system configuration.
        let tick_hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let tick_hz = u64::try_from(tick_hz).ok().filter(|&t| t > 0)?;
        let mut threads = Vec::with_capacity(tids.len());
        let mut path = String::new();
        for tid in tids {
            let mut read = |file: &str, buf: &mut [u8]| -> Option<usize> {
                path.clear();
                let _ = write!(path, "/proc/{}/task/{tid}/{file}", self.pid);
                let n = File::open(&path).ok()?.read(buf).ok()?;
                (n < buf.len()).then_some(n)
            };
            let mut buf = [0u8; 2048];
            let busy = read("schedstat", &mut buf)
                .and_then(|n| parse_schedstat(std::str::from_utf8(&buf[..n]).ok()?))
                .or_else(|| {
                    let n = read("stat", &mut buf)?;
                    let stat = parse_stat_bytes(&buf[..n])?;
                    Some(stat.cpu_ticks * (1_000_000_000 / tick_hz))
                });
            if let Some(busy) = busy {
                threads.push((tid, busy));
            }
        }
        Some(threads)
    }
}

/// The thread ids of process `pid` (`/proc/PID/task`), into `out`; false
/// past [`MAX_THREADS`] of them.
fn task_ids(pid: u32, out: &mut Vec<u32>) -> io::Result<bool> {
    // `struct linux_dirent64`: inode (8 bytes), offset (8), record length
    // (2), type (1), then the name, NUL-terminated.
    const NAME_AT: usize = 19;
    let dir = File::open(format!("/proc/{pid}/task"))?;
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes of records
        // into `buf`; the descriptor is a directory we hold open.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        let n = match usize::try_from(n) {
            Ok(0) => return Ok(true),
            Ok(n) => n.min(buf.len()),
            Err(_) => return Err(io::Error::last_os_error()),
        };
        let mut at = 0;
        while let Some(record) = buf.get(at..n).filter(|r| r.len() > NAME_AT) {
            let len = usize::from(u16::from_ne_bytes([record[16], record[17]]));
            let Some(name) = record.get(NAME_AT..len) else {
                break;
            };
            let name = name.split(|&b| b == 0).next().unwrap_or_default();
            // "." and ".." parse as no number.
            if let Some(tid) = std::str::from_utf8(name).ok().and_then(|t| t.parse().ok()) {
                if out.len() == MAX_THREADS {
                    return Ok(false);
                }
                out.push(tid);
            }
            at += len;
        }
    }
}

/// Running plus waiting-to-run nanoseconds from a `schedstat` line ("run
/// wait slices").
fn parse_schedstat(text: &str) -> Option<u64> {
    let mut fields = text.split_ascii_whitespace();
    let run: u64 = fields.next()?.parse().ok()?;
    let wait: u64 = fields.next()?.parse().ok()?;
    Some(run.saturating_add(wait))
}

/// [`parse_stat`] of the bytes read. The command name (field 2) is the
/// kernel's raw bytes, not always UTF-8 (a name cut at 15 bytes inside a
/// character, one set with `prctl`); the fields after it are ASCII.
fn parse_stat_bytes(bytes: &[u8]) -> Option<Stat> {
    parse_stat(stat_tail(bytes)?)
}

/// `/proc/PID/stat` from the `)` that closes the command name on: ASCII,
/// whatever bytes the name holds.
fn stat_tail(bytes: &[u8]) -> Option<&str> {
    let close = bytes.iter().rposition(|&b| b == b')')?;
    std::str::from_utf8(&bytes[close..]).ok()
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
    // num_threads 20, then itrealvalue 21 before starttime.
    let threads = rest.nth(4)?.parse().ok()?;
    let start_time = rest.nth(1)?.parse().ok()?;
    let rss_pages = rest.nth(1)?.parse().ok()?;
    Some(Stat {
        state,
        threads,
        start_time,
        cpu_ticks: utime + stime,
        rss_pages,
    })
}

/// Whether some process has this pid now. Unknown (the loader out of
/// descriptors) is yes: only a process gone from `/proc`, or a zombie, is
/// not running.
pub fn is_running(pid: u32) -> bool {
    match fs::read(format!("/proc/{pid}/stat")) {
        Ok(bytes) => parse_stat_bytes(&bytes).is_none_or(|s| !s.exited()),
        Err(e) => !gone(&e),
    }
}

/// The running kernel's release (`uname -r`), for records.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default()
}

/// Whether cacheloop itself runs in a pid namespace below the host's. The
/// eBPF side keys counts by `bpf_get_current_pid_tgid()`, which is always
/// the initial namespace's tgid, while every pid cacheloop reads from
/// `/proc` would be its own namespace's.
///
/// The initial pid namespace has a fixed inode, `PROC_PID_INIT_INO`
/// (0xEFFFFFFC); `/proc/self/ns/pid` names it whichever `/proc` is mounted.
/// (`NSpid:` in `/proc/self/status` does not tell: a container mounts its
/// own `/proc`, which lists only the container's pids.)
pub fn in_child_pid_namespace() -> bool {
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    fs::metadata("/proc/self/ns/pid").is_ok_and(|m| m.ino() != PROC_PID_INIT_INO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_is_running_plus_waiting() {
        assert_eq!(
            parse_schedstat("671289262 1742746412 2301\n"),
            Some(2_414_035_674)
        );
        assert_eq!(parse_schedstat("garbage"), None);
    }

    /// Tests that count this process's own threads, one at a time: one
    /// with hundreds of threads alive would put the other past the bound.
    static OWN_THREADS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// `n` threads that wait for the barrier; their ids.
    fn threads(
        n: usize,
    ) -> (
        Vec<u32>,
        std::sync::Arc<std::sync::Barrier>,
        Vec<std::thread::JoinHandle<()>>,
    ) {
        let go = std::sync::Arc::new(std::sync::Barrier::new(n + 1));
        let (tx, rx) = std::sync::mpsc::channel();
        let handles = (0..n)
            .map(|_| {
                let (go, tx) = (go.clone(), tx.clone());
                std::thread::spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    tx.send(unsafe { libc::gettid() } as u32).unwrap();
                    go.wait();
                })
            })
            .collect();
        let tids = rx.iter().take(n).collect();
        (tids, go, handles)
    }

    /// Every thread, past one `getdents64` buffer's worth (~128 records);
    /// and no more than the bound.
    #[test]
    fn task_ids_lists_every_thread_and_stops_at_the_bound() {
        let _one = OWN_THREADS.lock().unwrap_or_else(|e| e.into_inner());
        let pid = std::process::id();
        let (tids, go, handles) = threads(200);
        let mut listed = Vec::new();
        let within = task_ids(pid, &mut listed).unwrap();
        go.wait();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert!(within);
        assert!(listed.contains(&pid));
        assert!(tids.iter().all(|t| listed.contains(t)), "{listed:?}");

        let (_, go, handles) = threads(300);
        let mut listed = Vec::new();
        let within = task_ids(pid, &mut listed).unwrap();
        go.wait();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert!(!within);
        assert_eq!(listed.len(), MAX_THREADS);
    }

    #[test]
    fn a_spinning_thread_is_busy_and_a_sleeping_one_is_not() {
        let _one = OWN_THREADS.lock().unwrap_or_else(|e| e.into_inner());
        let me = Process::from_pid(std::process::id()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let spinner = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let until = std::time::Instant::now() + std::time::Duration::from_millis(900);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        });
        let spinning = rx.recv().unwrap();
        // SAFETY: as above.
        let sleeping = unsafe { libc::gettid() } as u32;
        let busy = |tid: u32| {
            me.thread_busy()
                .unwrap()
                .into_iter()
                .find(|(t, _)| *t == tid)
                .unwrap()
                .1
        };
        let (spin0, sleep0) = (busy(spinning), busy(sleeping));
        std::thread::sleep(std::time::Duration::from_millis(400));
        let (spin1, sleep1) = (busy(spinning), busy(sleeping));
        spinner.join().unwrap();
        // Running or waiting to run the whole 400 ms, loaded machine or not.
        assert!(spin1 - spin0 >= 300_000_000, "{}", spin1 - spin0);
        assert!(sleep1 - sleep0 < 100_000_000, "{}", sleep1 - sleep0);
    }

    #[test]
    fn stat_with_odd_command_name_parses() {
        let line = "4242 (cache (v2) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 \
                    4 0 987654 12345678 300 18446744073709551615";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.start_time, 987654);
        assert_eq!(stat.cpu_ticks, 5 + 3);
        assert_eq!(stat.rss_pages, 300);
        assert_eq!(stat.threads, 4);
        assert!(!stat.exited() && !stat.leader_gone());
    }

    #[test]
    fn a_zombie_leader_with_threads_left_is_a_running_process() {
        let stat = |state: &str, threads: u32| {
            parse_stat(&format!(
                "4242 (cache) {state} 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 \
                 {threads} 0 987654 0 0 18446744073709551615"
            ))
            .unwrap()
        };
        // Its main thread ended (pthread_exit), two threads run on.
        assert!(!stat("Z", 3).exited() && stat("Z", 3).leader_gone());
        // Every thread ended, not reaped yet: only the leader is counted.
        assert!(stat("Z", 1).exited() && !stat("Z", 1).leader_gone());
        assert!(stat("X", 1).exited());
    }

    #[test]
    fn stat_with_a_command_name_cut_inside_a_character_parses() {
        // "cache-Ωmega" cut at 15 bytes by the kernel: half an Ω is no
        // UTF-8, and the process must not read as unreadable, or gone.
        let mut line = b"4242 (cache-\xce) R 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 \
                         20 0 4 0 987654 12345678 300 18446744073709551615"
            .to_vec();
        assert!(std::str::from_utf8(&line).is_err());
        let stat = parse_stat_bytes(&line).unwrap();
        assert_eq!((stat.state, stat.start_time), ('R', 987654));
        line.truncate(20);
        assert!(parse_stat_bytes(&line).is_none());
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
        let got: Vec<(PathBuf, u64, u64)> = executable_mappings(maps)
            .into_iter()
            .map(|m| (m.name, m.inode, m.start))
            .collect();
        let want = [
            ("/usr/bin/cache", 100, 0x5601),
            ("/usr/lib/x86_64-linux-gnu/libc.so.6", 200, 0x7f00),
            // Replaced on disk since it was mapped: still probed, read
            // through map_files.
            ("/opt/lib/libold.so", 300, 0x7f03),
            ("/opt/my lib/libspace.so", 400, 0x7f04),
        ];
        assert_eq!(got, want.map(|(p, i, s)| (PathBuf::from(p), i, s)).to_vec());
    }

    #[test]
    fn ns_pid_is_the_innermost() {
        assert_eq!(parse_ns_pid("Name:\tx\nNSpid:\t4242\t17\n"), Some(17));
        assert_eq!(parse_ns_pid("NSpid:\t4242\n"), Some(4242));
        assert_eq!(parse_ns_pid("Name:\tx\n"), None);
    }

    #[test]
    fn tests_run_in_the_initial_pid_namespace() {
        assert!(!in_child_pid_namespace());
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
        let named = processes_named(&[read_comm(me.pid).unwrap()], |_| false);
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

    /// A child of the test, `sleep`ing until stopped.
    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap()
    }

    #[test]
    fn process_is_gone_once_it_exits_and_once_it_is_reaped() {
        let mut child = sleeper();
        let p = Process::from_pid(child.id()).unwrap();
        assert!(p.is_alive());
        assert_eq!(p.exe_now(), Some(p.exe_id));
        child.kill().unwrap();
        // A zombie, not reaped yet: gone.
        assert!(wait_unreaped(child.id() as i32, || false));
        assert!(!p.is_alive());
        assert_eq!(p.usage_if_alive(), None);
        child.wait().unwrap();
        // Reaped: the held files fail (ESRCH), whoever has the pid now.
        assert!(!p.is_alive());
        assert_eq!(p.exe_now(), None);
        assert!(matches!(
            Process::from_pid(child.id()),
            Err(TargetError::NoSuchProcess { .. })
        ));
    }

    #[test]
    fn only_a_vanished_process_reads_as_gone() {
        let os = io::Error::from_raw_os_error;
        assert!(gone(&os(libc::ESRCH)));
        assert!(gone(&os(libc::ENOENT)));
        // The loader's own trouble says nothing of the process.
        assert!(!gone(&os(libc::EMFILE)));
        assert!(!gone(&os(libc::ENOMEM)));
        assert!(!gone(&os(libc::EINTR)));
    }

    /// Set in the copy of this test binary that
    /// `liveness_needs_no_free_descriptor` runs.
    const NO_FDS_CHILD: &str = "CACHELOOP_TEST_NO_FDS_PID";
    const NO_FDS_PASSED: i32 = 42;

    /// A loader that has run out of descriptors still sees its target
    /// alive: nothing is opened to check. Run in a copy of this test binary,
    /// since the descriptor limit is the whole process's.
    #[test]
    fn liveness_needs_no_free_descriptor() {
        if let Ok(pid) = std::env::var(NO_FDS_CHILD) {
            let p = Process::from_pid(pid.parse().unwrap()).unwrap();
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            // SAFETY: setrlimit(2) of this process's own descriptor limit.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
            let mut held = Vec::new();
            while let Ok(f) = File::open("/dev/null") {
                held.push(f);
            }
            // A check by path would fail now, and take the process for gone.
            let by_path = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_err();
            assert_eq!(by_path.raw_os_error(), Some(libc::EMFILE));
            assert!(p.is_alive());
            assert!(p.usage_if_alive().is_some());
            assert_eq!(p.exe_now(), Some(p.exe_id));
            // A process found now is not known, not known gone.
            let err = Process::from_pid(p.pid).unwrap_err();
            assert!(
                matches!(err, TargetError::Unreadable { .. }) && !err.is_usage(),
                "{err}"
            );
            // Said apart from a run of no test at all (a filter that no
            // longer matches), which also exits 0.
            std::process::exit(NO_FDS_PASSED);
        }
        let mut target = sleeper();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "target::tests::liveness_needs_no_free_descriptor",
                "--test-threads",
                "1",
            ])
            .env(NO_FDS_CHILD, target.id().to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        target.kill().unwrap();
        target.wait().unwrap();
        assert_eq!(status.code(), Some(NO_FDS_PASSED), "{status}");
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
        let procs = Binary::processes(&[Binary::open(&me).unwrap().id]);
        assert!(
            procs.iter().any(|p| p.pid == std::process::id()),
            "{procs:?}"
        );
    }
}
