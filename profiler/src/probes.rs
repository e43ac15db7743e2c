//! Owns everything cacheloop puts in the kernel: the eBPF object, its maps
//! and the uprobe links. Loads, attaches, reads counters, detaches.
//!
//! Safety on production rests on three facts:
//! - links are owned by file descriptors of this process and never pinned, so
//!   if cacheloop dies, even by SIGKILL, the kernel removes every probe;
//! - [`Probes::detach`] (and `Drop`, on any other exit, panics included)
//!   detaches explicitly;
//! - uprobes only read the target: the kernel swaps an int3 in at each probed
//!   address and restores the original instruction on detach.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{catalog::FileId, target::OpenFile};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap,
        stack_trace::StackTraceMap,
    },
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
    sys::{UProbeMultiFeature, is_uprobe_multi_supported},
};
use profiler_common::{
    CALIBRATION_COOKIE, CALIBRATION_KEY_SLOT, CALLERS_ENTRIES, CALLERS_MAP, COUNTS_MAP, CallKey,
    CallerKey, DROPS_MAP, KEY_CONFIG_MAP, KEY_EDGES_ENTRIES, KEY_EDGES_MAP, KEY_TEXT_LEN,
    KEY_TEXT_MAP, KEY_U64, KEYS_ENTRIES, KEYS_MAP, KeyConfig, KeyEdge, KeyId, KeyText,
    LAST_KEY_ENTRIES, LAST_KEY_MAP, PROG_MULTI, PROG_SINGLE, STACK_COUNTS_MAP, STACK_ENTRIES,
    STACKS_MAP, StackKey,
};

/// Errors from loading, attaching and reading probes. All of them are about
/// the run (exit 1), not about what the user typed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The kernel refused the eBPF object.
    #[error("the kernel refused cacheloop's eBPF program; is BPF enabled (CONFIG_BPF_EVENTS)?")]
    Load(#[source] aya::EbpfError),
    /// The object lacks a program or map this loader expects (a build error).
    #[error("the embedded eBPF object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    /// The kernel refused to load one of the programs.
    #[error("the kernel refused to load the uprobe program")]
    Program(#[source] aya::programs::ProgramError),
    /// Attaching to a file failed.
    #[error("cannot attach {count} uprobe(s) to {}{}", path.display(), pid.map(|p| format!(" in pid {p}")).unwrap_or_default())]
    Attach {
        path: PathBuf,
        pid: Option<u32>,
        count: usize,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Reading a map failed.
    #[error("cannot read the {name} map")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// How the probes are attached on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// One `uprobe_multi` link per file and process (kernel >= 6.6).
    Multi,
    /// One perf-event link per function (older kernels): slower to attach.
    PerFunction,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Multi => "uprobe_multi",
            Self::PerFunction => "perf_link_per_function",
        }
    }
}

/// One attach request: these file offsets of this file, each with the cookie
/// (function index) the kernel will count it under, for one process or all.
#[derive(Clone, Debug)]
pub struct AttachRequest {
    /// The file the offsets were read from, held open: the kernel is given
    /// its descriptor, so every attach (and every re-attach of a probe
    /// window, days later) lands on these very bytes, whatever a deploy did
    /// to the path since.
    pub file: Arc<OpenFile>,
    /// The same file as the user knows it, for messages and records.
    pub shown: PathBuf,
    /// `None` probes every process that runs the file.
    pub pid: Option<u32>,
    /// (file offset, cookie) pairs.
    pub points: Vec<(u64, u32)>,
}

/// The loaded eBPF object and its links.
pub struct Probes {
    // Field order matters for `Drop`: the maps and the logger hold their own
    // file descriptors; `ebpf` owns the program and with it every link.
    counts: PerCpuHashMap<MapData, CallKey, u64>,
    callers: PerCpuHashMap<MapData, CallerKey, u64>,
    key_config: Array<MapData, KeyConfig>,
    keys: PerCpuHashMap<MapData, KeyId, u64>,
    key_text: BpfHashMap<MapData, u64, KeyText>,
    key_edges: PerCpuHashMap<MapData, KeyEdge, u64>,
    last_key: BpfHashMap<MapData, u64, u64>,
    stacks: StackTraceMap<MapData>,
    stack_counts: PerCpuHashMap<MapData, StackKey, u64>,
    drops: PerCpuArray<MapData, u64>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ebpf: Ebpf,
    program: &'static str,
    mode: AttachMode,
    /// Some watched function has a key read: calibration reads one too.
    uses_keys: bool,
    /// Early uprobe_multi kernels (6.6 until the fix) filter a pid-scoped
    /// multi link by one thread only. There, pid-scoped requests go through
    /// this program instead, the plain uprobe, one perf link per function:
    /// a perf uprobe's pid filter compares the task's `mm`, so it covers
    /// every thread of the process. Probing all processes instead would
    /// trap in every other process mapping the file.
    per_process: Option<&'static str>,
    /// Every request attached, with its link while it is in place: a process's
    /// are dropped when it exits, and all can be paused and resumed (the
    /// overhead governor's probe windows).
    entries: Vec<Entry>,
    capacity: u32,
}

struct Entry {
    request: AttachRequest,
    /// The program the link belongs to.
    program: &'static str,
    link: Option<UProbeLinkId>,
}

/// Functions that can have a key configuration (cookies beyond this count
/// but carry none).
pub const MAX_FUNCTIONS: u32 = CALIBRATION_KEY_SLOT;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

impl Probes {
    /// Loads the eBPF object, sizing the counter map for `max_entries`
    /// (function, process) pairs, and picks the attach mode this kernel
    /// supports.
    pub fn load(max_entries: u32) -> Result<Self, ProbeError> {
        // Kernels >= 5.11 charge BPF memory to the cgroup, not RLIMIT_MEMLOCK;
        // raising the limit can fail without CAP_SYS_RESOURCE and that is fine.
        raise_memlock_limit();
        raise_open_files_limit();

        let multi = is_uprobe_multi_supported(UProbeMultiFeature::LinkCreation).unwrap_or(false);
        let pid_filter_ok = !multi
            || is_uprobe_multi_supported(UProbeMultiFeature::ProcessScopedPidFilter)
                .unwrap_or(false);
        let (program, mode) = if multi {
            (PROG_MULTI, AttachMode::Multi)
        } else {
            (PROG_SINGLE, AttachMode::PerFunction)
        };
        let per_process = (!pid_filter_ok).then_some(PROG_SINGLE);

        let mut ebpf = EbpfLoader::new()
            .map_max_entries(COUNTS_MAP, max_entries.max(1))
            .map_max_entries(KEY_CONFIG_MAP, CALIBRATION_KEY_SLOT + 1)
            // Only the chosen program is loaded; the other stays in the file.
            .load(EBPF_OBJECT)
            .map_err(ProbeError::Load)?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .inspect_err(|e| log::debug!("eBPF logs unavailable: {e}"))
            .ok();
        for name in std::iter::once(program).chain(per_process) {
            uprobe(&mut ebpf, name)?
                .load()
                .map_err(ProbeError::Program)?;
        }

        let counts = take_map(&mut ebpf, COUNTS_MAP)?;
        let callers = take_map(&mut ebpf, CALLERS_MAP)?;
        let key_config = take_map(&mut ebpf, KEY_CONFIG_MAP)?;
        let keys = take_map(&mut ebpf, KEYS_MAP)?;
        let key_text = take_map(&mut ebpf, KEY_TEXT_MAP)?;
        let key_edges = take_map(&mut ebpf, KEY_EDGES_MAP)?;
        let last_key = take_map(&mut ebpf, LAST_KEY_MAP)?;
        let stacks = take_map(&mut ebpf, STACKS_MAP)?;
        let stack_counts = take_map(&mut ebpf, STACK_COUNTS_MAP)?;
        let drops = take_map(&mut ebpf, DROPS_MAP)?;
        Ok(Self {
            counts,
            callers,
            key_config,
            keys,
            key_text,
            key_edges,
            last_key,
            stacks,
            stack_counts,
            drops,
            logger,
            ebpf,
            program,
            mode,
            uses_keys: false,
            per_process,
            entries: Vec::new(),
            capacity: max_entries.max(1),
        })
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// Functions attached, over all requests (paused ones included).
    pub fn attached(&self) -> usize {
        self.entries.iter().map(|e| e.request.points.len()).sum()
    }

    /// Attaches one request.
    pub fn attach(&mut self, request: &AttachRequest) -> Result<(), ProbeError> {
        let program = self.program_for(request);
        let link = self.link(program, request)?;
        self.entries.push(Entry {
            request: request.clone(),
            program,
            link: Some(link),
        });
        Ok(())
    }

    /// How `request` is (or would be) attached here.
    pub fn mode_for(&self, request: &AttachRequest) -> AttachMode {
        if self.program_for(request) == PROG_SINGLE {
            AttachMode::PerFunction
        } else {
            AttachMode::Multi
        }
    }

    fn program_for(&self, request: &AttachRequest) -> &'static str {
        match (request.pid, self.per_process) {
            (Some(_), Some(program)) => program,
            _ => self.program,
        }
    }

    fn link(
        &mut self,
        program: &'static str,
        request: &AttachRequest,
    ) -> Result<UProbeLinkId, ProbeError> {
        let scope = match request.pid.and_then(NonZeroU32::new) {
            Some(pid) => UProbeScope::OneProcess(pid),
            None => UProbeScope::AllProcesses,
        };
        let points = request
            .points
            .iter()
            .map(|&(offset, cookie)| UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(offset),
                cookie: Some(u64::from(cookie)),
            });
        uprobe(&mut self.ebpf, program)?
            .attach(points, request.file.fd_path(), scope)
            .map_err(|source| ProbeError::Attach {
                path: request.shown.clone(),
                pid: request.pid,
                count: request.points.len(),
                source,
            })
    }

    fn unlink(&mut self, program: &'static str, link: UProbeLinkId) {
        if let Ok(prog) = uprobe(&mut self.ebpf, program)
            && let Err(e) = prog.detach(link)
        {
            log::debug!("detaching a probe link: {e}");
        }
    }

    /// Takes every probe out of the targets, keeping the program, maps and
    /// counters: until [`Probes::resume`], the targets run unprobed.
    pub fn pause(&mut self) {
        let links: Vec<(&'static str, UProbeLinkId)> = self
            .entries
            .iter_mut()
            .filter_map(|e| Some((e.program, e.link.take()?)))
            .collect();
        for (program, link) in links {
            self.unlink(program, link);
        }
    }

    /// Puts back what [`Probes::pause`] took out. With uprobe_multi this
    /// is one link per file and process, milliseconds in all. A request the
    /// kernel refuses now (its process exited while the probes were out)
    /// is dropped and returned with the reason; the others go back in.
    pub fn resume(&mut self) -> Vec<(AttachRequest, ProbeError)> {
        let mut entries = std::mem::take(&mut self.entries);
        let mut failed = Vec::new();
        entries.retain_mut(|e| {
            if e.link.is_some() {
                return true;
            }
            match self.link(e.program, &e.request) {
                Ok(link) => {
                    e.link = Some(link);
                    true
                }
                Err(err) => {
                    failed.push((e.request.clone(), err));
                    false
                }
            }
        });
        self.entries = entries;
        failed
    }

    /// Detaches every link on file `id` for all processes (a `--binary`
    /// build no process runs any more) and closes it.
    pub fn forget_file(&mut self, id: FileId) {
        self.detach_where(|r| r.file.id == id && r.pid.is_none());
    }

    /// The files probed whose bytes changed since they were read (written
    /// in place): their offsets no longer describe them. One `fstat` per
    /// file, however many processes it is attached for.
    pub fn changed_files(&self) -> Vec<FileId> {
        self.files(|_| true)
            .into_iter()
            .filter(|f| f.changed())
            .map(|f| f.id)
            .collect()
    }

    /// Detaches every link on file `id`, for all processes and each one;
    /// returns the pids whose links went.
    pub fn forget_file_everywhere(&mut self, id: FileId) -> Vec<u32> {
        self.detach_where(|r| r.file.id == id)
            .into_iter()
            .filter_map(|r| r.pid)
            .collect()
    }

    /// The files all-process links are attached to.
    pub fn shared_files(&self) -> Vec<FileId> {
        self.files(|r| r.pid.is_none())
            .into_iter()
            .map(|f| f.id)
            .collect()
    }

    /// The files of the requests `keep` selects, each once.
    fn files(&self, keep: impl Fn(&AttachRequest) -> bool) -> Vec<&OpenFile> {
        let mut files: Vec<&OpenFile> = self
            .entries
            .iter()
            .filter(|e| keep(&e.request))
            .map(|e| &*e.request.file)
            .collect();
        files.sort_by_key(|f| f.id);
        files.dedup_by_key(|f| f.id);
        files
    }

    /// Takes the requests `gone` selects out of the kernel and the list;
    /// returns them.
    fn detach_where(&mut self, gone: impl Fn(&AttachRequest) -> bool) -> Vec<AttachRequest> {
        let (gone, kept): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|e| gone(&e.request));
        self.entries = kept;
        gone.into_iter()
            .map(|entry| {
                if let Some(link) = entry.link {
                    self.unlink(entry.program, link);
                }
                entry.request
            })
            .collect()
    }

    /// Detaches the links made for one process (it exited) and removes its
    /// counters, so that a service that restarts all day does not pile up
    /// links and map slots.
    pub fn forget_process(&mut self, tgid: u32) {
        self.detach_where(|r| r.pid == Some(tgid));
        remove_where(&mut self.counts, |k| k.tgid == tgid);
        // The LRU maps would age them out in time; a process that ran exec
        // must not see its old program's keys and call sites come back as
        // new ones, and a service restarting all day should not crowd out
        // live entries.
        remove_where(&mut self.callers, |k| k.tgid == tgid);
        remove_where(&mut self.keys, |k| k.tgid == tgid);
        remove_where(&mut self.key_edges, |k| k.tgid == tgid);
        // Its threads' last keys (by pid_tgid: the process id is the high
        // half).
        let threads: Vec<u64> = self
            .last_key
            .keys()
            .filter_map(Result::ok)
            .take(2 * LAST_KEY_ENTRIES as usize)
            .filter(|t| (t >> 32) as u32 == tgid)
            .collect();
        for thread in threads {
            let _ = self.last_key.remove(&thread);
        }
        remove_where(&mut self.stack_counts, |k| k.tgid == tgid);
    }

    /// Measures what one probe hit costs on this machine: calls a function
    /// of our own, unprobed and then probed, and returns the difference per
    /// call. Counted under a cookie no watched function has, in our own pid,
    /// and removed after.
    pub fn calibrate(&mut self) -> Result<Duration, ProbeError> {
        const CALLS: u32 = 2000;
        let request = self_probe_request()?;
        let time_calls = || {
            let started = Instant::now();
            for i in 0..CALLS {
                std::hint::black_box(cacheloop_calibration_probe(u64::from(i % 4)));
            }
            started.elapsed()
        };
        // Warm, then the unprobed run.
        time_calls();
        let bare = time_calls();
        // With a key read, as watched functions with keys pay for it (a
        // few keys walked in turn: transitions counted too, and no real
        // key pushed out of the kernel's LRU maps).
        if self.uses_keys {
            self.set_key_config(
                CALIBRATION_KEY_SLOT,
                KeyConfig {
                    kind: KEY_U64,
                    ..KeyConfig::default()
                },
            )?;
        }
        let program = self.program_for(&request);
        let link = self.link(program, &request)?;
        let probed = time_calls();
        self.unlink(program, link);
        // Our own entries go: they are not a watched process's.
        let me = std::process::id();
        let _ = self.counts.remove(&CallKey {
            func: CALIBRATION_COOKIE,
            tgid: me,
        });
        remove_where(&mut self.callers, |k| k.tgid == me);
        remove_where(&mut self.keys, |k| k.tgid == me);
        remove_where(&mut self.key_edges, |k| k.tgid == me);
        remove_where(&mut self.stack_counts, |k| k.tgid == me);
        Ok(probed.saturating_sub(bare) / CALLS)
    }

    /// Reads every counter, summed over CPUs, into `out` (cleared first).
    pub fn read_counts(&mut self, out: &mut HashMap<CallKey, u64>) -> Result<(), ProbeError> {
        sum_per_cpu(&self.counts, COUNTS_MAP, self.capacity, out)?;
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
        Ok(())
    }

    /// Reads the per-call-site counters, summed over CPUs, into `out`.
    pub fn read_callers(&mut self, out: &mut HashMap<CallerKey, u64>) -> Result<(), ProbeError> {
        sum_per_cpu(&self.callers, CALLERS_MAP, CALLERS_ENTRIES, out)
    }

    /// Tells the kernel how to read function `func`'s key argument.
    pub fn set_key_config(&mut self, func: u32, config: KeyConfig) -> Result<(), ProbeError> {
        self.uses_keys |= config.kind != 0 && func != CALIBRATION_KEY_SLOT;
        self.key_config
            .set(func, &config, 0)
            .map_err(|source| ProbeError::Map {
                name: KEY_CONFIG_MAP,
                source,
            })
    }

    /// Reads the per-key counters, summed over CPUs, into `out`.
    pub fn read_keys(&mut self, out: &mut HashMap<KeyId, u64>) -> Result<(), ProbeError> {
        sum_per_cpu(&self.keys, KEYS_MAP, KEYS_ENTRIES, out)
    }

    /// Reads the key-transition counters, summed over CPUs, into `out`.
    pub fn read_key_edges(&mut self, out: &mut HashMap<KeyEdge, u64>) -> Result<(), ProbeError> {
        sum_per_cpu(&self.key_edges, KEY_EDGES_MAP, KEY_EDGES_ENTRIES, out)
    }

    /// The text of a string key, if the kernel still holds it.
    pub fn key_text(&self, hash: u64) -> Option<String> {
        let text = self.key_text.get(&hash, 0).ok()?;
        let len = (text.len as usize).min(text.bytes.len());
        let bytes = &text.bytes[..len];
        let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
        let mut text = String::from_utf8_lossy(bytes).into_owned();
        if len + 1 >= KEY_TEXT_LEN {
            // The text kept is full: the key is (most likely) longer.
            text.push('…');
        }
        Some(text)
    }

    /// Reads the sampled-stack counters, summed over CPUs, into `out`.
    pub fn read_stacks(&mut self, out: &mut HashMap<StackKey, u64>) -> Result<(), ProbeError> {
        sum_per_cpu(&self.stack_counts, STACK_COUNTS_MAP, STACK_ENTRIES, out)
    }

    /// The frames of a sampled stack (instruction pointers, innermost
    /// first), if the kernel still holds it.
    pub fn stack_frames(&self, stack_id: u32) -> Option<Vec<u64>> {
        let trace = self.stacks.get(&stack_id, 0).ok()?;
        Some(trace.frames().iter().map(|f| f.ip).collect())
    }

    /// Takes a stack out of the stack map and its counts out of the
    /// stack-count map, to make room: the kernel's stack map keeps a stack
    /// until it is removed, and once full records no new one.
    pub fn forget_stack(&mut self, stack_id: u32) {
        let _ = self.stacks.remove(&stack_id);
        remove_where(&mut self.stack_counts, |k| k.stack_id == stack_id);
    }

    /// How many (function, process) counters the kernel map holds at most.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Hits the kernel could not count because the counter map was full.
    pub fn dropped(&self) -> u64 {
        self.drops
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// Detaches every probe and unloads the program; returns how long the
    /// kernel took. After this the targets run exactly as before attach.
    pub fn detach(mut self) -> std::time::Duration {
        let started = Instant::now();
        for name in std::iter::once(self.program).chain(self.per_process) {
            if let Ok(prog) = uprobe(&mut self.ebpf, name) {
                let _ = prog.unload();
            }
        }
        started.elapsed()
    }
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, ProbeError> {
    ebpf.program_mut(name)
        .ok_or(ProbeError::Missing {
            what: "program",
            name,
        })?
        .try_into()
        .map_err(ProbeError::Program)
}

/// What [`Probes::calibrate`] probes: a function of ours that does nothing
/// worth optimising away.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cacheloop_calibration_probe(x: u64) -> u64 {
    std::hint::black_box(x.rotate_left(7))
}

/// Where [`cacheloop_calibration_probe`] is in our own executable, as a
/// request for our own pid.
fn self_probe_request() -> Result<AttachRequest, ProbeError> {
    let address = cacheloop_calibration_probe as *const () as u64;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let map = crate::cycles::parse_maps(&maps)
        .into_iter()
        .find(|m| (m.start..m.end).contains(&address))
        .ok_or(ProbeError::Missing {
            what: "mapping",
            name: "cacheloop_calibration_probe",
        })?;
    let path = PathBuf::from("/proc/self/exe");
    let file = OpenFile::open(&path).map_err(|_| ProbeError::Missing {
        what: "file",
        name: "/proc/self/exe",
    })?;
    Ok(AttachRequest {
        file: Arc::new(file),
        shown: path,
        pid: Some(std::process::id()),
        points: vec![(address - map.start + map.offset, CALIBRATION_COOKIE)],
    })
}

/// Every entry of a per-CPU counter map, summed over CPUs, into `out`
/// (cleared first).
fn sum_per_cpu<K: aya::Pod + Eq + std::hash::Hash>(
    map: &PerCpuHashMap<MapData, K, u64>,
    name: &'static str,
    capacity: u32,
    out: &mut HashMap<K, u64>,
) -> Result<(), ProbeError> {
    out.clear();
    // aya walks a hash map key by key; when the key it stands on is evicted
    // meanwhile (an LRU map under churn), the kernel starts it over from the
    // first bucket. Bounded: a reading may miss entries, never spin.
    let bound = 2 * capacity as usize;
    for entry in map.iter().take(bound) {
        let (key, per_cpu) = entry.map_err(|source| ProbeError::Map { name, source })?;
        out.insert(key, per_cpu.iter().sum());
    }
    Ok(())
}

/// Removes the entries whose key matches `stale`.
fn remove_where<K: aya::Pod>(map: &mut PerCpuHashMap<MapData, K, u64>, stale: impl Fn(&K) -> bool) {
    let keys: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| stale(k))
        .collect();
    for key in keys {
        let _ = map.remove(&key);
    }
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, ProbeError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(ProbeError::Missing { what: "map", name })?;
    M::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

/// Every link is a descriptor (on kernels without uprobe_multi, or where
/// pid-scoped probes fall back to perf links, one per function and
/// process), and every probed file one more: take the hard limit, not the
/// usual soft 1024.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                log::debug!(
                    "could not raise RLIMIT_NOFILE: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    if ret != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on kernels >= 5.11",
            std::io::Error::last_os_error()
        );
    }
}
