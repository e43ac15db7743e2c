//! Owns everything cacheloop puts in the kernel: the eBPF object, its maps
//! and the uprobe links. Loads, attaches, reads counters, detaches.
//!
//! Safety on production rests on three facts:
//! - links are owned by file descriptors, never pinned, with a duplicate of
//!   each in the custody helper (`custody.rs`), so if cacheloop dies, even by
//!   SIGKILL in the middle of a detach, the kernel removes every probe;
//! - [`Probes::detach`] (and `Drop`, on any other exit, panics included)
//!   detaches explicitly;
//! - uprobes only read the target: the kernel swaps an int3 in at each probed
//!   address and restores the original instruction on detach.

use std::{
    num::NonZeroU32,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    batch::BatchReader,
    catalog::FileId,
    custody::Custody,
    sampler::Sampler,
    slot_counters::{self, SlotCounters},
    target::OpenFile,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap as BpfHashMap, IterableMap as _, MapData, PerCpuArray, PerCpuHashMap,
        stack_trace::StackTraceMap,
    },
    programs::{
        UProbe,
        links::{FdLink, Link as _},
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
    },
    sys::{UProbeMultiFeature, is_uprobe_multi_supported},
};
use foldhash::{HashMap, HashMapExt as _};
use profiler_common::{
    CALIBRATION_COOKIE, CALIBRATION_KEY_SLOT, CALLERS_ENTRIES, CALLERS_MAP, COOKIE_SLOT_SHIFT,
    COUNT_SLOTS_MAP, COUNTS_MAP, CallKey, CallerKey, DROPS_MAP, FUNC_CONFIG_MAP, FuncConfig,
    KEY_EDGES_ENTRIES, KEY_EDGES_MAP, KEY_NONE, KEY_TEXT_LEN, KEY_TEXT_MAP, KEY_U64, KEYS_ENTRIES,
    KEYS_MAP, KeyEdge, KeyId, KeyText, LAST_KEY_ENTRIES, LAST_KEY_MAP, MAX_CALLER_SHIFT, NameText,
    PAUSED_MAP, PROG_MULTI, PROG_MULTI_KEYED, PROG_SINGLE, PROG_SINGLE_KEYED, REFUSED_MAP,
    SAMPLES_MAP, SEEN_MAP, SLOT_STRIDE, STACK_COUNTS_MAP, STACK_ENTRIES, STACKS_MAP, StackKey,
    USDT_PROGRAM, USDT_SPECS_ENTRIES, USDT_SPECS_MAP, UsdtSpec, WANTED_MAP,
};

/// aya-log's ring buffer of the eBPF program's log lines, and the bytes
/// it is given (a power of two, and at least a page).
const AYA_LOGS_MAP: &str = "AYA_LOGS";
const AYA_LOGS_BYTES: u32 = 16 << 10;

/// The page size (a power of two).
pub(crate) fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(page)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

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
    /// A perf uprobe event refused for want of CAP_SYS_ADMIN.
    #[error(
        "cannot attach uprobes to {}: this kernel has no uprobe_multi (Linux 6.6), so each uprobe is a perf event, and those need CAP_SYS_ADMIN (upstream's 2025 fix 'perf: Revert to requiring CAP_SYS_ADMIN for uprobes', in the stable kernels too; before it, kernel.perf_event_paranoid 3 refused them as well); run cacheloop as root here, or on 6.6 or later, where the four capabilities suffice",
        path.display()
    )]
    NeedsSysAdmin { path: PathBuf },
    /// The on-CPU sampler (no `--func`) could not start.
    #[error(
        "cannot sample the targets' on-CPU code, which picking functions without --func needs (a perf event on each CPU: CAP_PERFMON or CAP_SYS_ADMIN); name the functions with --func instead"
    )]
    Sampling(#[source] aya::programs::ProgramError),
    /// A USDT probe could not be attached.
    #[error("cannot attach the USDT probe in {}{}", path.display(), pid.map(|p| format!(" in pid {p}")).unwrap_or_default())]
    UsdtAttach {
        path: PathBuf,
        pid: Option<u32>,
        #[source]
        source: std::io::Error,
    },
    /// Reading a map failed.
    #[error("cannot read the {name} map")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// Mapping a counter map into the loader failed.
    #[error("cannot map the {name} counters into cacheloop's memory")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// How the probes are attached on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// One `uprobe_multi` link per file and process (kernel >= 6.6).
    Multi,
    /// One perf-event link per function (older kernels): slower to attach.
    PerFunction,
    /// A runtime's USDT probe sites, one perf link each, semaphores raised
    /// by the kernel.
    Usdt,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Multi => "uprobe_multi",
            Self::PerFunction => "perf_link_per_function",
            Self::Usdt => "usdt",
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
    /// Instead of `points`: a runtime's USDT probe sites (`py:`, `rb:`,
    /// `php:` patterns), counted by the names their calls report.
    pub usdt: Vec<UsdtSite>,
}

impl AttachRequest {
    /// Its file as the user knows it, and its process if it has one, for
    /// messages: "/usr/bin/redis-server (pid 42)".
    pub fn described(&self) -> String {
        match self.pid {
            Some(pid) => format!("{} (pid {pid})", self.shown.display()),
            None => self.shown.display().to_string(),
        }
    }
}

/// A USDT probe site to attach at: its file offset, its semaphore's (0:
/// none), and where its name arguments are.
#[derive(Clone, Copy, Debug)]
pub struct UsdtSite {
    pub offset: u64,
    pub semaphore: u64,
    pub spec: UsdtSpec,
}

/// The loaded eBPF object and its links.
pub struct Probes {
    // Field order matters for `Drop`: the maps and the logger hold their own
    // file descriptors; `ebpf` owns the programs; the links are in
    // `entries`, detached first by `Drop` (through the helper).
    counts: PerCpuHashMap<MapData, CallKey, u64>,
    count_slots: SlotCounters,
    /// Which pair counts at which slot of `count_slots`.
    slots: Slots,
    /// Entries read from `counts` at the last reading.
    hashed: u32,
    callers: PerCpuHashMap<MapData, CallerKey, u64>,
    func_config: Array<MapData, FuncConfig>,
    /// What `func_config` holds, by slot (absent: all zero).
    configs: HashMap<u32, FuncConfig>,
    /// Batch reads of the counter maps; `None` once the kernel turned
    /// them down (before 5.6), then maps are walked entry by entry.
    batch: Option<BatchReader>,
    keys: PerCpuHashMap<MapData, KeyId, u64>,
    key_text: BpfHashMap<MapData, u64, KeyText>,
    key_edges: PerCpuHashMap<MapData, KeyEdge, u64>,
    last_key: BpfHashMap<MapData, u64, u64>,
    stacks: StackTraceMap<MapData>,
    stack_counts: PerCpuHashMap<MapData, StackKey, u64>,
    drops: PerCpuArray<MapData, u64>,
    /// The kernel's gate: slot 0 set while the probes go in or out.
    paused: Array<MapData, u32>,
    /// The probes are out (`pause`d): what slot 0 of `paused` holds, but
    /// for a gate that would not close (see `pause`).
    gated: bool,
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
    /// The helper holding a copy of every link (`None` if it could not
    /// start, or died: links are then ours alone, as before it existed).
    custody: Option<Custody>,
    /// Discovery's on-CPU sampler.
    sampler: Option<Sampler>,
    /// The interpreted runtimes' maps (`py:`, `rb:`, `php:` patterns).
    usdt: Option<UsdtMaps>,
    /// `USDT_SPECS` slot of each site attached: (file, offset, spec) ->
    /// slot. The spec is part of the key: a file replaced under the same
    /// identity (an inode number reused) may put other arguments at the
    /// same offset.
    usdt_slots: Vec<(FileId, u64, UsdtSpec)>,
}

/// The maps of the USDT program.
struct UsdtMaps {
    specs: Array<MapData, UsdtSpec>,
    wanted: BpfHashMap<MapData, u64, u32>,
    refused: BpfHashMap<MapData, u64, u8>,
    seen: BpfHashMap<MapData, u64, NameText>,
}

struct Entry {
    request: AttachRequest,
    /// The attach cookie of each of the request's points (see
    /// `COOKIE_SLOT_SHIFT`).
    cookies: Vec<u64>,
    /// The program the link belongs to.
    program: &'static str,
    link: Option<Held>,
}

/// A request's links: aya's, or our own (USDT sites, see `perf_uprobe.rs`).
enum Links {
    Aya(Result<Vec<FdLink>, UProbeLink>),
    Own(Vec<OwnedFd>),
}

/// A link in place, owned here rather than by aya's program, so that its
/// descriptors can be handed to the custody helper too.
struct Held {
    /// Ours; closing them detaches nothing while the helper keeps copies.
    links: Links,
    /// The helper's numbers for its copies.
    kept: Vec<u32>,
}

/// Which (function, process) pair counts at which slot of the kernel's
/// `COUNT_SLOTS` array. Slots are handed out to pairs probed in one
/// process, and taken back when the process goes (zeroed by the caller
/// before they are handed out again).
#[derive(Debug)]
struct Slots {
    capacity: u32,
    by_key: HashMap<CallKey, u32>,
    /// Indexed by slot: the pair counting there, if any.
    keys: Vec<Option<CallKey>>,
    free: Vec<u32>,
}

impl Slots {
    fn new(capacity: u32) -> Self {
        Self {
            capacity,
            by_key: HashMap::new(),
            keys: Vec::new(),
            free: Vec::new(),
        }
    }

    /// The pair's slot, given one if it has none; `None` when every slot is
    /// taken (the pair is then counted in the hash).
    fn slot(&mut self, key: CallKey) -> Option<u32> {
        if let Some(&slot) = self.by_key.get(&key) {
            return Some(slot);
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if (self.keys.len() as u32) < self.capacity => {
                self.keys.push(None);
                self.keys.len() as u32 - 1
            }
            None => return None,
        };
        self.keys[slot as usize] = Some(key);
        self.by_key.insert(key, slot);
        Some(slot)
    }

    /// Takes the slots of the pairs `gone` selects from them; returns the
    /// slots, to be zeroed and then [`recycle`](Self::recycle)d. A slot
    /// that could not be zeroed is never handed out again: the next pair
    /// would inherit its count.
    fn release(&mut self, gone: impl Fn(&CallKey) -> bool) -> Vec<u32> {
        let slots: Vec<u32> = self
            .by_key
            .iter()
            .filter(|(k, _)| gone(k))
            .map(|(_, &slot)| slot)
            .collect();
        for &slot in &slots {
            if let Some(key) = self.keys[slot as usize].take() {
                self.by_key.remove(&key);
            }
        }
        slots
    }

    /// A released slot, zeroed, can be handed out again.
    fn recycle(&mut self, slot: u32) {
        if self.key(slot).is_none() && !self.free.contains(&slot) {
            self.free.push(slot);
        }
    }

    fn key(&self, slot: u32) -> Option<CallKey> {
        self.keys.get(slot as usize).copied().flatten()
    }

    /// Slots ever handed out: the part of the array in use.
    fn used(&self) -> u32 {
        self.keys.len() as u32
    }
}

/// Functions that can have a key configuration (cookies beyond this count
/// but carry none).
pub const MAX_FUNCTIONS: u32 = CALIBRATION_KEY_SLOT;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

impl Probes {
    /// Loads the eBPF object, sizing the counter hash for `max_entries`
    /// (function, process) pairs and the counter array for `slots` pairs
    /// probed in one process, and picks the attach mode this kernel
    /// supports. `keys`: some function may have a key to read (the
    /// program that reads keys is loaded, else the one that cannot).
    /// `sampling`: start the on-CPU sampler too (discovery, at that many
    /// samples a second per CPU). `runtimes`: load the USDT program for
    /// interpreted functions.
    pub fn load(
        max_entries: u32,
        slots: u32,
        keys: bool,
        sampling: Option<u64>,
        runtimes: bool,
    ) -> Result<Self, ProbeError> {
        // Kernels >= 5.11 charge BPF memory to the cgroup, not RLIMIT_MEMLOCK;
        // raising the limit can fail without CAP_SYS_RESOURCE and that is fine.
        raise_memlock_limit();
        raise_open_files_limit();
        // After the limit is raised: the helper inherits it, and holds a
        // descriptor per link.
        let custody = Custody::start()
            .inspect_err(|e| {
                log::warn!(
                    "cannot start the custody helper ({e}): a SIGKILL landing while \
                     probes are detached may leave a breakpoint in a target"
                );
            })
            .ok();

        // The slot array is allocated whole, one value per possible CPU
        // (hosts may declare hundreds): at most 8 MiB of it; pairs beyond
        // count in the hash.
        let cpus = aya::util::nr_cpus().map_or(1, |n| n.get());
        let slots = slots.clamp(1, ((8 << 20) / (8 * cpus)).max(64));
        let stride = slot_counters::stride(slots);
        let multi = is_uprobe_multi_supported(UProbeMultiFeature::LinkCreation).unwrap_or(false);
        let pid_filter_ok = !multi
            || is_uprobe_multi_supported(UProbeMultiFeature::ProcessScopedPidFilter)
                .unwrap_or(false);
        let (multi_program, single_program) = if keys {
            (PROG_MULTI_KEYED, PROG_SINGLE_KEYED)
        } else {
            (PROG_MULTI, PROG_SINGLE)
        };
        let (program, mode) = if multi {
            (multi_program, AttachMode::Multi)
        } else {
            (single_program, AttachMode::PerFunction)
        };
        let per_process = (!pid_filter_ok).then_some(single_program);

        let mut loader = EbpfLoader::new();
        // aya-log's ring buffer is 128 KiB, mapped into the loader twice
        // over (260 KiB of its RSS); the program logs one line per CPU at
        // most (the counter map full). 16 KiB holds a hundred of those.
        loader.map_max_entries(AYA_LOGS_MAP, AYA_LOGS_BYTES.max(page_size()));
        if !keys {
            // The program that runs never touches the key maps: one entry
            // each instead of thousands (LRU maps are preallocated, per CPU:
            // milliseconds to create, and memory).
            for map in [KEYS_MAP, KEY_TEXT_MAP, KEY_EDGES_MAP, LAST_KEY_MAP] {
                loader.map_max_entries(map, 1);
            }
        }
        if sampling.is_none() {
            // The sampler's LRU map is preallocated, per CPU.
            loader.map_max_entries(SAMPLES_MAP, 1);
        }
        if !runtimes {
            loader.map_max_entries(SEEN_MAP, 1);
            loader.map_max_entries(REFUSED_MAP, 1);
            loader.map_max_entries(WANTED_MAP, 1);
            loader.map_max_entries(USDT_SPECS_MAP, 1);
        }
        let mut ebpf = loader
            .map_max_entries(COUNTS_MAP, max_entries.max(1))
            .map_max_entries(COUNT_SLOTS_MAP, stride * cpus as u32)
            .override_global(SLOT_STRIDE, &stride, true)
            .map_max_entries(FUNC_CONFIG_MAP, CALIBRATION_KEY_SLOT + 1)
            // Only the chosen programs are loaded; the others stay in the
            // file.
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
        let count_slots =
            SlotCounters::map(take_map(&mut ebpf, COUNT_SLOTS_MAP)?, stride, cpus as usize)
                .map_err(|source| ProbeError::Mmap {
                    name: COUNT_SLOTS_MAP,
                    source,
                })?;
        let callers = take_map(&mut ebpf, CALLERS_MAP)?;
        let func_config = take_map(&mut ebpf, FUNC_CONFIG_MAP)?;
        let keys = take_map(&mut ebpf, KEYS_MAP)?;
        let key_text = take_map(&mut ebpf, KEY_TEXT_MAP)?;
        let key_edges = take_map(&mut ebpf, KEY_EDGES_MAP)?;
        let last_key = take_map(&mut ebpf, LAST_KEY_MAP)?;
        let stacks = take_map(&mut ebpf, STACKS_MAP)?;
        let stack_counts = take_map(&mut ebpf, STACK_COUNTS_MAP)?;
        let drops = take_map(&mut ebpf, DROPS_MAP)?;
        let paused = take_map(&mut ebpf, PAUSED_MAP)?;
        let sampler = sampling
            .map(|hz| Sampler::start(&mut ebpf, hz))
            .transpose()?;
        let usdt = if runtimes {
            uprobe(&mut ebpf, USDT_PROGRAM)?
                .load()
                .map_err(ProbeError::Program)?;
            Some(UsdtMaps {
                specs: take_map(&mut ebpf, USDT_SPECS_MAP)?,
                wanted: take_map(&mut ebpf, WANTED_MAP)?,
                refused: take_map(&mut ebpf, REFUSED_MAP)?,
                seen: take_map(&mut ebpf, SEEN_MAP)?,
            })
        } else {
            None
        };
        Ok(Self {
            counts,
            count_slots,
            slots: Slots::new(slots),
            hashed: 0,
            callers,
            func_config,
            configs: HashMap::new(),
            batch: aya::util::nr_cpus()
                .inspect_err(|(_, e)| log::debug!("no CPU count for batch reads: {e}"))
                .ok()
                .map(|cpus| BatchReader::new(cpus.get() as usize)),
            keys,
            key_text,
            key_edges,
            last_key,
            stacks,
            stack_counts,
            drops,
            paused,
            gated: false,
            logger,
            ebpf,
            program,
            mode,
            uses_keys: false,
            per_process,
            entries: Vec::new(),
            capacity: max_entries.max(1),
            custody,
            sampler,
            usdt,
            usdt_slots: Vec::new(),
        })
    }

    /// Tells the kernel what to do with an interpreted name: count it as
    /// function `func` (`Some`), or never report it again (`None`).
    pub fn want(&mut self, hash: u64, func: Option<u32>) -> Result<(), ProbeError> {
        let Some(usdt) = &mut self.usdt else {
            return Ok(());
        };
        match func {
            Some(func) => usdt
                .wanted
                .insert(&hash, &func, 0)
                .map_err(|source| ProbeError::Map {
                    name: WANTED_MAP,
                    source,
                }),
            None => usdt
                .refused
                .insert(&hash, &1, 0)
                .map_err(|source| ProbeError::Map {
                    name: REFUSED_MAP,
                    source,
                }),
        }
    }

    /// The interpreted names seen called since the last call, not yet
    /// wanted or refused; each read is removed.
    pub fn take_seen(&mut self, out: &mut Vec<(u64, NameText)>) {
        out.clear();
        let Some(usdt) = &mut self.usdt else {
            return;
        };
        let keys: Vec<u64> = usdt.seen.keys().filter_map(Result::ok).collect();
        for key in keys {
            if let Ok(text) = usdt.seen.get(&key, 0) {
                out.push((key, text));
            }
            let _ = usdt.seen.remove(&key);
        }
    }

    /// The on-CPU sampler, when loaded with one.
    pub fn sampler(&mut self) -> Option<&mut Sampler> {
        self.sampler.as_mut()
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// The probes are out ([`Probes::pause`]): an attach now goes in at
    /// [`Probes::resume`].
    pub fn paused(&self) -> bool {
        self.gated
    }

    /// Functions attached, over all requests (paused ones included).
    pub fn attached(&self) -> usize {
        self.entries.iter().map(|e| e.request.points.len()).sum()
    }

    /// Attaches one request. While the probes are out (between two of the
    /// governor's windows) it goes in with the others, at
    /// [`Probes::resume`]: linked now, it would trap on every call and count
    /// none until then. A refusal then comes back from `resume`.
    pub fn attach(&mut self, request: &AttachRequest) -> Result<(), ProbeError> {
        let program = self.program_for(request);
        let (cookies, fresh) = self.cookies(request);
        let link = if self.gated {
            log::debug!(
                "the probes are out: {} goes in with the next window",
                request.described()
            );
            None
        } else {
            match self.link(program, request, &cookies) {
                Ok(link) => Some(link),
                Err(e) => {
                    // Only the slots given out for this request: a pair may
                    // already count in one for a link still in place.
                    self.release_slots(|k| fresh.contains(k));
                    return Err(e);
                }
            }
        };
        self.entries.push(Entry {
            request: request.clone(),
            cookies,
            program,
            link,
        });
        Ok(())
    }

    /// The attach cookie of each point of `request`: its function, and for
    /// a probe scoped to one process the pair's counter slot, given one
    /// here if it has none. Also returns the pairs given one here.
    fn cookies(&mut self, request: &AttachRequest) -> (Vec<u64>, Vec<CallKey>) {
        let mut fresh = Vec::new();
        let cookies = request
            .points
            .iter()
            .map(|&(_, func)| {
                let slot = request.pid.and_then(|tgid| {
                    let key = CallKey { func, tgid };
                    let known = self.slots.by_key.contains_key(&key);
                    let slot = self.slots.slot(key)?;
                    if !known {
                        fresh.push(key);
                    }
                    Some(slot)
                });
                u64::from(func) | slot.map_or(0, |s| u64::from(s + 1) << COOKIE_SLOT_SHIFT)
            })
            .collect();
        (cookies, fresh)
    }

    /// Takes back the counter slots of the pairs `gone` selects, zeroed for
    /// the pairs they will count next. Their links must be gone.
    fn release_slots(&mut self, gone: impl Fn(&CallKey) -> bool) {
        for slot in self.slots.release(gone) {
            self.count_slots.zero(slot);
            self.slots.recycle(slot);
        }
    }

    /// How `request` is (or would be) attached here.
    pub fn mode_for(&self, request: &AttachRequest) -> AttachMode {
        if !request.usdt.is_empty() {
            return AttachMode::Usdt;
        }
        if matches!(self.program_for(request), PROG_SINGLE | PROG_SINGLE_KEYED) {
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
        cookies: &[u64],
    ) -> Result<Held, ProbeError> {
        if !request.usdt.is_empty() {
            return self.link_usdt(request);
        }
        let scope = match request.pid.and_then(NonZeroU32::new) {
            Some(pid) => UProbeScope::OneProcess(pid),
            None => UProbeScope::AllProcesses,
        };
        let points = request
            .points
            .iter()
            .zip(cookies)
            .map(|(&(offset, _), &cookie)| UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(offset),
                cookie: Some(cookie),
            });
        let failed = |source: aya::programs::ProgramError| {
            if perf_event_refused(program, &source) {
                return ProbeError::NeedsSysAdmin {
                    path: request.shown.clone(),
                };
            }
            ProbeError::Attach {
                path: request.shown.clone(),
                pid: request.pid,
                count: request.points.len(),
                source,
            }
        };
        let prog = uprobe(&mut self.ebpf, program)?;
        let id = prog
            .attach(points, request.file.fd_path(), scope)
            .map_err(failed)?;
        let links = Links::Aya(prog.take_link(id).map_err(failed)?.into_fd_links());
        let kept = self.keep(&links);
        Ok(Held { links, kept })
    }

    /// Links a request's USDT sites: a perf uprobe with the site's
    /// semaphore, for its process only, one per site.
    fn link_usdt(&mut self, request: &AttachRequest) -> Result<Held, ProbeError> {
        let failed = |source: std::io::Error| ProbeError::UsdtAttach {
            path: request.shown.clone(),
            pid: request.pid,
            source,
        };
        let Some(pid) = request.pid else {
            return Err(failed(std::io::Error::other(
                "USDT probes are attached per process",
            )));
        };
        let mut links = Vec::with_capacity(request.usdt.len());
        for site in &request.usdt {
            let slot = self.usdt_slot(request.file.id, site)?;
            let program = uprobe(&mut self.ebpf, USDT_PROGRAM)?;
            let fd = program.fd().map_err(ProbeError::Program)?;
            links.push(
                crate::perf_uprobe::attach(
                    fd.as_fd(),
                    &request.file.fd_path(),
                    site.offset,
                    site.semaphore,
                    pid,
                    u64::from(slot),
                )
                .map_err(failed)?,
            );
        }
        let links = Links::Own(links);
        let kept = self.keep(&links);
        Ok(Held { links, kept })
    }

    /// The `USDT_SPECS` slot of a site (its attach cookie), set on first
    /// use.
    fn usdt_slot(&mut self, file: FileId, site: &UsdtSite) -> Result<u32, ProbeError> {
        let next = self.usdt_slots.len() as u32;
        if let Some(slot) = self
            .usdt_slots
            .iter()
            .position(|s| *s == (file, site.offset, site.spec))
        {
            return Ok(slot as u32);
        }
        if next >= USDT_SPECS_ENTRIES {
            return Err(ProbeError::UsdtAttach {
                path: PathBuf::from("(a runtime)"),
                pid: None,
                source: std::io::Error::other(format!(
                    "every one of the {USDT_SPECS_ENTRIES} USDT probe sites cacheloop can hold is taken (interpreter builds seen this run); restart cacheloop"
                )),
            });
        }
        let usdt = self.usdt.as_mut().ok_or(ProbeError::Missing {
            what: "program",
            name: USDT_PROGRAM,
        })?;
        usdt.specs
            .set(next, &site.spec, 0)
            .map_err(|source| ProbeError::Map {
                name: USDT_SPECS_MAP,
                source,
            })?;
        self.usdt_slots.push((file, site.offset, site.spec));
        Ok(next)
    }

    /// Hands the custody helper a copy of each of the link's descriptors.
    fn keep(&mut self, links: &Links) -> Vec<u32> {
        let Some(custody) = &mut self.custody else {
            return Vec::new();
        };
        let (fds, all): (Vec<BorrowedFd<'_>>, usize) = match links {
            Links::Aya(Ok(links)) => (links.iter().filter_map(link_fd).collect(), links.len()),
            Links::Aya(Err(_)) => return Vec::new(),
            Links::Own(links) => (links.iter().map(|l| l.as_fd()).collect(), links.len()),
        };
        if fds.len() < all {
            // Only with an aya that names links otherwise (see `link_fd`).
            log::warn!(
                "{} probe link(s) could not be handed to the custody helper",
                all - fds.len()
            );
        }
        match custody.keep(&fds) {
            Ok(kept) => kept,
            Err(e) => {
                self.lose_custody(&e);
                Vec::new()
            }
        }
    }

    /// Detaches links: closes our descriptors, then has the helper close
    /// its copies and waits until it has, breakpoints out.
    fn unlink(&mut self, held: impl IntoIterator<Item = Held>) {
        self.unlink_then(held, true);
    }

    /// [`Probes::unlink`]; without `wait`, the helper closes its copies
    /// in its own time (see [`Custody::release_later`]).
    fn unlink_then(&mut self, held: impl IntoIterator<Item = Held>, wait: bool) {
        let mut kept = Vec::new();
        for held in held {
            drop(held.links);
            kept.extend(held.kept);
        }
        let Some(custody) = &mut self.custody else {
            return;
        };
        let released = if wait {
            custody.release(&kept)
        } else {
            custody.release_later(&kept)
        };
        if let Err(e) = released {
            self.lose_custody(&e);
        }
    }

    fn lose_custody(&mut self, e: &std::io::Error) {
        log::warn!(
            "the custody helper failed ({e}): a SIGKILL landing while probes are \
             detached may now leave a breakpoint in a target"
        );
        // At end of file it exits, closing its copies.
        if let Some(custody) = self.custody.take() {
            custody.abandon();
        }
    }

    /// Takes every probe out of the targets, keeping the program, maps and
    /// counters: until [`Probes::resume`], the targets run unprobed. The
    /// counting stops at once; the breakpoints come out in the custody
    /// helper's time, not waited for here (see [`Probes::settle`]).
    ///
    /// A kernel limit every detach shares, and windows make frequent: the
    /// breakpoints come out in the closing thread as it returns from
    /// `close` (task work), through get_user_pages on the target, which
    /// (as we read the kernel) gives up with EINTR while a fatal signal is
    /// pending. A SIGKILL that lands then leaves the uprobe registered with
    /// no consumer and its breakpoint in the target (6.1 drops the error
    /// without a word). The target runs on correctly, each
    /// hit trapping and returning, until a later attach and clean detach of
    /// that function removes it. A SIGKILL at any other moment is safe: the
    /// exiting process closes the links with the signal already consumed.
    /// Seen in the VM tests on 6.1: 2 kills in 3 at 3.1 s into a 0.2%
    /// budget. The fix is to close links outside the killable process.
    ///
    /// The kernel stops counting first, at once for every function: the
    /// window the caller measured ends here, not after the last detach.
    pub fn pause(&mut self) {
        self.pause_then(false);
    }

    /// [`Probes::pause`], waiting with `wait` until the breakpoints are out.
    fn pause_then(&mut self, wait: bool) {
        // Failing to close it is not expected of a one-entry array; if it
        // happens, this window also counts while the probes come out. The
        // probes are out all the same: an attach meanwhile waits for
        // `resume`, as with the gate closed.
        if let Err(e) = self.gate(true) {
            log::warn!("{e}");
            self.gated = true;
        }
        let held: Vec<Held> = self
            .entries
            .iter_mut()
            .filter_map(|e| e.link.take())
            .collect();
        // A window's close is not waited for: the gate has stopped the
        // counting, and the kernel's close waits for an RCU grace period
        // (~40 ms here, seconds on a loaded machine) that would hold up
        // the readings. `resume` reads the confirmation before its own
        // links go in.
        self.unlink_then(held, wait);
    }

    /// Waits until the helper has closed every link [`Probes::pause`]
    /// released: their breakpoints are out.
    pub fn settle(&mut self) {
        if let Some(custody) = &mut self.custody
            && let Err(e) = custody.settle()
        {
            self.lose_custody(&e);
        }
    }

    /// Puts back what [`Probes::pause`] took out. With uprobe_multi this
    /// is one link per file and process, milliseconds in all. A request the
    /// kernel refuses now (its process exited while the probes were out)
    /// is dropped and returned with the reason; the others go back in.
    /// Fails only when the kernel's gate cannot be opened again: the probes
    /// would then trap and count nothing, rates reading 0, so that ends the
    /// run instead.
    pub fn resume(&mut self) -> Result<Vec<(AttachRequest, ProbeError)>, ProbeError> {
        self.settle();
        let mut entries = std::mem::take(&mut self.entries);
        let mut failed = Vec::new();
        entries.retain_mut(|e| {
            if e.link.is_some() {
                return true;
            }
            match self.link(e.program, &e.request, &e.cookies) {
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
        // Counting starts now, for every function at once: the window the
        // caller measures from here. Tried again before giving up.
        let mut opened = self.gate(false);
        for _ in 0..3 {
            if opened.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            opened = self.gate(false);
        }
        opened.map(|()| failed)
    }

    /// Closes (`paused`) or opens the kernel's gate on counting.
    fn gate(&mut self, paused: bool) -> Result<(), ProbeError> {
        self.paused
            .set(0, &u32::from(paused), 0)
            .map_err(|source| ProbeError::Map {
                name: PAUSED_MAP,
                source,
            })?;
        self.gated = paused;
        Ok(())
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
        let (held, requests): (Vec<Option<Held>>, Vec<AttachRequest>) =
            gone.into_iter().map(|e| (e.link, e.request)).unzip();
        self.unlink(held.into_iter().flatten());
        requests
    }

    /// Whether links scoped to process `tgid` alone are held (its
    /// `--pid`, `--name` or `run` requests; not a `--binary` file's link).
    pub fn scoped_to(&self, tgid: u32) -> bool {
        self.entries.iter().any(|e| e.request.pid == Some(tgid))
    }

    /// Detaches the links made for one process (it exited) and removes its
    /// counters, so that a service that restarts all day does not pile up
    /// links and map slots.
    pub fn forget_process(&mut self, tgid: u32) {
        self.detach_where(|r| r.pid == Some(tgid));
        self.release_slots(|k| k.tgid == tgid);
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
        // Three rounds of this many: about 2,000 calls in all, as one
        // round was before (under TCG emulation a hit costs ~180 us, and
        // the control thread waits for all of them).
        const CALLS: u32 = 700;
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
                FuncConfig {
                    key_kind: KEY_U64,
                    ..FuncConfig::default()
                },
            )?;
        }
        let program = self.program_for(&request);
        // Counted in the hash, not a slot: the dearer of the two paths
        // (`--binary` probes take it), so the governor errs on the safe
        // side.
        let cookies: Vec<u64> = request.points.iter().map(|p| u64::from(p.1)).collect();
        let me = std::process::id();
        // Hits must run the whole program to be measured (the governor
        // only calibrates with the probes in, so this is a safeguard).
        let gated = self.gated;
        self.gate(false)?;
        let link = self.link(program, &request, &cookies);
        let link = link.inspect_err(|_| {
            let _ = self.gate(gated);
        })?;
        // The median of three rounds: a single round on a shared machine
        // can land on a preemption (too dear) or a quiet moment.
        let mut rounds = [time_calls(), time_calls(), time_calls()];
        rounds.sort_unstable();
        let probed = rounds[1];
        self.unlink([link]);
        self.gate(gated)?;
        // Our own entries go: they are not a watched process's.
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

    /// Whether some function's keys are read (`--key-arg`, a preset).
    pub fn uses_keys(&self) -> bool {
        self.uses_keys
    }

    /// Reads every counter, summed over CPUs, into `out` (cleared first).
    pub fn read_counts(&mut self, out: &mut HashMap<CallKey, u64>) -> Result<(), ProbeError> {
        sum_per_cpu(
            &self.counts,
            COUNTS_MAP,
            self.capacity,
            &mut self.batch,
            out,
        )?;
        self.hashed = out.len() as u32;
        self.read_slots(out);
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
        Ok(())
    }

    /// Adds the counters of the pairs with a slot, summed over CPUs, to
    /// `out`: read in place, no system call.
    fn read_slots(&self, out: &mut HashMap<CallKey, u64>) {
        for slot in 0..self.slots.used() {
            let Some(key) = self.slots.key(slot) else {
                continue;
            };
            // A slot nothing counted in yet is no counter: the hash has no
            // entry for a pair before its first hit either (`never_called`
            // rests on it).
            let calls = self.count_slots.sum(slot);
            if calls > 0 {
                *out.entry(key).or_default() += calls;
            }
        }
    }

    /// Reads the per-call-site counters, summed over CPUs, into `out`.
    pub fn read_callers(&mut self, out: &mut HashMap<CallerKey, u64>) -> Result<(), ProbeError> {
        sum_per_cpu(
            &self.callers,
            CALLERS_MAP,
            CALLERS_ENTRIES,
            &mut self.batch,
            out,
        )
    }

    /// Tells the kernel how to read function `func`'s key argument (the
    /// key fields of `config`; its call-site sampling stays).
    pub fn set_key_config(&mut self, func: u32, config: FuncConfig) -> Result<(), ProbeError> {
        self.uses_keys |= config.key_kind != KEY_NONE && func != CALIBRATION_KEY_SLOT;
        let mut merged = self.configs.get(&func).copied().unwrap_or_default();
        merged.key_kind = config.key_kind;
        merged.key_arg = config.key_arg;
        merged.key_offset = config.key_offset;
        self.write_config(func, merged)
    }

    /// Has the kernel read function `func`'s call site on one hit in
    /// `1 << shift` (capped at `MAX_CALLER_SHIFT`), weighted by as many.
    /// Functions beyond the config table are always read in full.
    pub fn set_caller_shift(&mut self, func: u32, shift: u32) -> Result<(), ProbeError> {
        if func >= CALIBRATION_KEY_SLOT {
            return Ok(());
        }
        let mut config = self.configs.get(&func).copied().unwrap_or_default();
        let shift = shift.min(MAX_CALLER_SHIFT);
        if config.caller_shift == shift {
            return Ok(());
        }
        config.caller_shift = shift;
        self.write_config(func, config)
    }

    /// The call-site sampling shift function `func` has in the kernel.
    pub fn caller_shift(&self, func: u32) -> u32 {
        self.configs.get(&func).map_or(0, |c| c.caller_shift)
    }

    fn write_config(&mut self, slot: u32, config: FuncConfig) -> Result<(), ProbeError> {
        self.func_config
            .set(slot, &config, 0)
            .map_err(|source| ProbeError::Map {
                name: FUNC_CONFIG_MAP,
                source,
            })?;
        self.configs.insert(slot, config);
        Ok(())
    }

    /// Reads the per-key counters, summed over CPUs, into `out`.
    pub fn read_keys(&mut self, out: &mut HashMap<KeyId, u64>) -> Result<(), ProbeError> {
        sum_per_cpu(&self.keys, KEYS_MAP, KEYS_ENTRIES, &mut self.batch, out)
    }

    /// Reads the key-transition counters, summed over CPUs, into `out`.
    pub fn read_key_edges(&mut self, out: &mut HashMap<KeyEdge, u64>) -> Result<(), ProbeError> {
        sum_per_cpu(
            &self.key_edges,
            KEY_EDGES_MAP,
            KEY_EDGES_ENTRIES,
            &mut self.batch,
            out,
        )
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
        sum_per_cpu(
            &self.stack_counts,
            STACK_COUNTS_MAP,
            STACK_ENTRIES,
            &mut self.batch,
            out,
        )
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

    /// How many (function, process) counters the kernel's hash holds at
    /// most (pairs probed in one process count in slots of their own).
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Entries the kernel's counter hash held at the last reading.
    pub fn hashed(&self) -> u32 {
        self.hashed
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
        self.pause_then(true);
        for name in std::iter::once(self.program).chain(self.per_process) {
            if let Ok(prog) = uprobe(&mut self.ebpf, name) {
                let _ = prog.unload();
            }
        }
        started.elapsed()
    }
}

impl Drop for Probes {
    /// Any other way out (an error, a panic): the links go first, through
    /// the helper, then the helper itself.
    fn drop(&mut self) {
        self.pause_then(true);
    }
}

/// The descriptor of an aya link. aya 0.16 lends no link's descriptor, but
/// its id is the descriptor's number (`FdLinkId(fd)`, whose field is
/// private): read from the id's debug form. With a later aya that prints
/// it otherwise, no link is handed to the helper: a warning says so, and
/// the custody kernel tests fail.
fn link_fd(link: &FdLink) -> Option<BorrowedFd<'_>> {
    let id = format!("{:?}", link.id());
    let fd: i32 = id
        .strip_prefix("FdLinkId(")?
        .strip_suffix(')')?
        .parse()
        .ok()?;
    // And checked: that number is a BPF link of ours.
    let what = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    if what.as_os_str() != "anon_inode:bpf_link" {
        return None;
    }
    // SAFETY: the descriptor `link` owns (checked above); the borrow lives
    // no longer than `link`.
    Some(unsafe { BorrowedFd::borrow_raw(fd) })
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
        usdt: Vec::new(),
    })
}

/// Every entry of a per-CPU counter map, summed over CPUs, into `out`
/// (cleared first): in batches where the kernel has them (`batch`; turned
/// off at the first refusal), else entry by entry.
fn sum_per_cpu<K: aya::Pod + Eq + std::hash::Hash>(
    map: &PerCpuHashMap<MapData, K, u64>,
    name: &'static str,
    capacity: u32,
    batch: &mut Option<BatchReader>,
    out: &mut HashMap<K, u64>,
) -> Result<(), ProbeError> {
    // A hash map's entries can be removed and re-added while it is read, and
    // the kernel resumes a batch at the next bucket: bounded as below.
    let bound = 2 * capacity as usize;
    if let Some(reader) = batch {
        match reader.sum_per_cpu(map.map().fd().as_fd(), bound, out) {
            Ok(true) => return Ok(()),
            Ok(false) => {
                log::debug!("no batch map reads on this kernel; reading entry by entry");
                *batch = None;
            }
            Err(e) => log::debug!("batch read of {name} failed ({e}); reading entry by entry"),
        }
    }
    out.clear();
    // aya walks a hash map key by key; when the key it stands on is evicted
    // meanwhile (an LRU map under churn), the kernel starts it over from the
    // first bucket. Bounded: a reading may miss entries, never spin.
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

/// Whether `source`, a perf-event attach of `program`, was refused for
/// want of CAP_SYS_ADMIN: kernels with upstream's "perf: Revert to
/// requiring CAP_SYS_ADMIN for uprobes" (2025; Debian 12's 6.1 has it)
/// refuse perf uprobe events to CAP_PERFMON, whatever
/// kernel.perf_event_paranoid says (seen in the 6.1 VM at -1 to 3). A
/// uprobe_multi link is not a perf event and is not affected.
fn perf_event_refused(program: &str, source: &aya::programs::ProgramError) -> bool {
    if program != PROG_SINGLE && program != PROG_SINGLE_KEYED
        || crate::privileges::has(crate::privileges::CAP_SYS_ADMIN)
    {
        return false;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

pub(crate) fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, ProbeError>
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
/// process), every probed file one more, and every watched process's
/// `/proc/PID/stat` one: take the hard limit, not the usual soft 1024.
pub fn raise_open_files_limit() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(func: u32, tgid: u32) -> CallKey {
        CallKey { func, tgid }
    }

    #[test]
    fn a_pair_keeps_its_slot_until_its_process_goes() {
        let mut slots = Slots::new(3);
        assert_eq!(slots.slot(pair(0, 10)), Some(0));
        assert_eq!(slots.slot(pair(1, 10)), Some(1));
        // Asked again (a re-attach after a deploy): the same slot, so the
        // count goes on.
        assert_eq!(slots.slot(pair(0, 10)), Some(0));
        assert_eq!(slots.slot(pair(0, 20)), Some(2));
        // Full: the next pair counts in the hash.
        assert_eq!(slots.slot(pair(1, 20)), None);
        assert_eq!(slots.key(1), Some(pair(1, 10)));

        let mut gone = slots.release(|k| k.tgid == 10);
        gone.sort_unstable();
        assert_eq!(gone, vec![0, 1]);
        assert_eq!(slots.key(0), None);
        assert_eq!(slots.used(), 3);
        // Not handed out again until zeroed: the next pair would inherit
        // the count.
        assert_eq!(slots.slot(pair(1, 20)), None);
        slots.recycle(1);
        slots.recycle(1);
        assert_eq!(slots.slot(pair(1, 20)), Some(1));
        assert_eq!(slots.key(1), Some(pair(1, 20)));
        // Slot 0 was never zeroed: it stays out of use.
        assert_eq!(slots.slot(pair(2, 20)), None);
        // A slot in use is not recycled.
        slots.recycle(1);
        assert_eq!(slots.slot(pair(3, 20)), None);
        assert_eq!(slots.release(|k| k.tgid == 99), Vec::<u32>::new());
    }
}
