//! The controller: the only code that changes kernel state. It finds the
//! targets, plans and attaches the probes (and owns their links through
//! [`Probes`]), follows processes as they come (`--binary`, `--name`) and
//! go, puts the probes in and out for the overhead governor's windows, and
//! asks the collector for a snapshot at each tick.
//!
//! Everything it has to say (attached, governor, warnings) comes out as
//! records for the sinks; the catalog it publishes is immutable.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
// foldhash: see analyze.rs.
use foldhash::{HashMap, HashMapExt as _};
use profiler_common::CallKey;

use crate::{
    catalog::{Catalog, FileId},
    collect::Collector,
    config::WatchConfig,
    discover::{self, HotSet},
    governor::{self, Governor},
    plan::{FileTarget, Planner},
    probes::{AttachMode, AttachRequest, MAX_FUNCTIONS, ProbeError, Probes},
    report::{self, Record, unix_now},
    snapshot::{Glance, Snapshot},
    symbolize::CodeIndex,
    symbols::SymbolTable,
    target::{self, Binary, Process, TargetError},
};

/// Failures of the run itself (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// cacheloop runs in a pid namespace of its own: the kernel side counts
    /// by the host's pids, which it cannot see, so every count would be 0.
    #[error(
        "cacheloop runs inside a pid namespace (a container) but the kernel counts calls by host pid; run it in the host's pid namespace (docker --pid=host, Kubernetes hostPID: true)"
    )]
    PidNamespace,
    /// A target exited between being found and being probed.
    #[error("pid {pid} exited before cacheloop could attach")]
    TargetGone { pid: u32 },
    /// `--pid` targets that still run could not be probed again (refused
    /// twice on the way back in) and were not watched to the run's end.
    #[error(
        "pid {pids} still runs but was not watched to the end: its probes could not be put back (see the attach_failed warnings); start cacheloop again"
    )]
    Lost { pids: String },
    /// `--pid` targets that still run but whose main thread has exited:
    /// the kernel cannot keep probes scoped to them, and starting again
    /// would not help (`TargetError::LeaderGone`).
    #[error(
        "pid {pids} still runs but was not watched to the end: its main thread exited, and the kernel cannot keep probes scoped to such a process (see the attach_failed warnings); to count it, watch its program with --binary PATH from before its main thread exits"
    )]
    LostLeaderless { pids: String },
    /// `cacheloop run`: the command could not be probed again.
    #[error(
        "the command (pid {pid}) could not be probed again (see the attach_failed warnings); it does not run unwatched: stopped it"
    )]
    CommandLost { pid: u32 },
}

/// How [`Controller::attach_process`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attach {
    Watched,
    /// The program has none of the functions.
    NoFunctions,
    /// Its files could not be read or planned.
    Unplannable,
    /// The kernel refused the probes (out of descriptors, say).
    Refused,
}

pub struct Controller {
    probes: Probes,
    planner: Planner,
    catalog: Arc<Catalog>,
    /// Functions whose key configuration the kernel has.
    keyed: usize,
    live: BTreeMap<u32, Process>,
    binary: Option<Binary>,
    /// The `--pid` targets: followed through exec.
    pids: Vec<u32>,
    names: Vec<String>,
    /// `cacheloop run`: the command, whose descendants are followed too.
    command: Option<u32>,
    /// Live processes whose executable changed since they were planned
    /// (exec): found by the collector's reading, handled after the tick.
    execed: Vec<u32>,
    /// What the collector's reading said of unknown processes, for after
    /// the tick.
    discovered: Vec<Record>,
    /// Files written in place, said after the tick; and the processes that
    /// are planned again for that (not an exec).
    rewritten: Vec<Record>,
    rewritten_pids: Vec<u32>,
    /// The new `--binary` build last tried (its problems are said once).
    binary_warned: Option<FileId>,
    /// When old `--binary` builds were last looked for in /proc.
    pruned: Instant,
    /// A watched process exited since: old builds are looked for at the
    /// next report (readings between reports do not follow the binary).
    exited_since_pruned: bool,
    windows: Windows,
    collector: Collector,
    pacing: Pacing,
    started: Instant,
    /// Processes found later that could not be probed, by (pid, start
    /// time, program: one that runs exec is tried again):
    /// said once, not tried again each tick.
    failed: std::collections::HashSet<(u32, u64, FileId)>,
    /// Processes found later whose probes wait for the next window: a
    /// refusal then is a refusal on the way in (see `failed`).
    deferred: std::collections::HashSet<u32>,
    /// `--pid` targets still running whose probes the kernel refused on
    /// the way back in (an EMFILE when a window opened): tried once more
    /// at the end of the next interval (`true` once that interval began),
    /// not within the same breath. A `--name`, `--binary` or `cacheloop
    /// run` process is found again anyway; a `--pid` one is not.
    retry: Vec<(Process, bool)>,
    /// `--pid` targets no longer watched though still running (refused
    /// again): a run left with nothing to watch because of them failed.
    lost: Vec<Process>,
    /// Processes said to have their main thread ended (see
    /// [`TargetError::LeaderGone`]): said once, a `--binary` link's counts
    /// of them freed at each reading.
    leaderless: std::collections::HashSet<u32>,
    /// Watched processes with links of their own whose main thread has
    /// ended while other threads run on, since when (see
    /// [`Controller::unwatch_leaderless`]).
    leader_gone_since: HashMap<u32, Instant>,
    /// Without `--func`: what the on-CPU samples picked so far.
    discovery: Option<Discovery>,
    /// `py:`/`rb:`/`php:` patterns: the names the kernel reported seen
    /// (reused), and the patterns for records.
    seen: Vec<(u64, profiler_common::NameText)>,
    runtime_patterns: Vec<String>,
    /// Whether any runtime probe fired yet; said once if none did within
    /// [`SILENT_AFTER`] of the start.
    usdt_fired: bool,
    usdt_silence_said: bool,
    names_full_said: bool,
    /// Records made during a reading, said after the tick.
    pending: Vec<Record>,
    /// Readings taken, and let go as quiet ([`Controller::collect`]).
    readings: u64,
    quiet_readings: u64,
}

/// How long runtime probes may stay silent before a warning says so.
const SILENT_AFTER: Duration = Duration::from_secs(5);

/// Discovery's state (the picking itself is `discover.rs`'s).
#[derive(Default)]
struct Discovery {
    hot: HotSet,
    /// Executables' code, by file, to put samples down to functions.
    indexes: HashMap<FileId, CodeIndex>,
    /// The last reading of the sampler (reused).
    samples: Vec<(profiler_common::SampleKey, u64)>,
    /// The hot picks ran out (said once).
    exhausted: bool,
}

impl Controller {
    /// Finds the targets, plans, loads and attaches. Returns the controller
    /// and the `attached` records. Bad input is refused before anything is
    /// attached.
    pub fn start(config: &WatchConfig, started: Instant) -> anyhow::Result<(Self, Vec<Record>)> {
        crate::privileges::require_probes()?;
        if target::in_child_pid_namespace() {
            return Err(RunError::PidNamespace.into());
        }
        // Before any process is found: each holds a descriptor.
        crate::probes::raise_open_files_limit();
        let mut processes = config
            .pids
            .iter()
            .map(|&pid| Process::from_pid(pid))
            .collect::<Result<Vec<_>, _>>()?;
        let binary = config.binary.as_deref().map(Binary::open).transpose()?;
        for named in target::processes_named(&config.names, |_| false) {
            if !processes.iter().any(|p| p.pid == named.pid) {
                processes.push(named);
            }
        }
        if processes.is_empty() && binary.is_none() {
            log::warn!(
                "no process named {} runs yet; waiting for one",
                config.names.join(" or ")
            );
        }

        let mut planner = Planner::new(config);
        let mut requests = Vec::new();
        let mut binary = binary;
        if let Some(b) = &mut binary {
            let hint = format!("--binary {}", b.path.display());
            requests.extend(planner.requests(&[binary_file(b)], true, &hint)?);
            // The file read, should a deploy have renamed another into
            // place since the path was checked.
            if let Some(r) = requests.first() {
                b.id = r.file.id;
            }
        }
        let shared: Vec<_> = requests.iter().map(|r| r.file.id).collect();
        for p in &processes {
            let hint = format!("--pid {}", p.pid);
            let planned = planner.requests(&FileTarget::of_process(p), true, &hint)?;
            requests.extend(uncovered(planned, &shared));
        }
        let catalog = planner.catalog();

        // Room for every function in every process we may see; --binary and
        // --name may bring processes we do not know of yet.
        let later = if binary.is_some() || !config.names.is_empty() {
            256
        } else {
            0
        };
        // Without --func, room for what the samples may pick later too;
        // with runtime patterns, for the interpreted names they will match.
        let functions = if config.discover {
            catalog.len() + discover::MAX_HOT
        } else {
            catalog.len().max(1)
        } + if config.runtime_patterns.is_empty() {
            0
        } else {
            256
        };
        let slots = functions * (processes.len() + later);
        // Pairs probed in one process count in an array slot each (the
        // cheapest count per hit); with --name, room for processes that
        // restart (a pair's slot is taken back when its process exits).
        // Pairs beyond it count in the hash.
        let restarts = if config.names.is_empty() {
            0
        } else {
            processes.len().max(4)
        };
        let one_process = functions * (processes.len() + restarts);
        let keys = config.key_arg.is_some() || !config.preset_keys.is_empty();
        let mut probes = Probes::load(
            slots.clamp(1024, 1 << 20) as u32,
            one_process.clamp(64, 1 << 16) as u32,
            keys,
            config.discover.then_some(discover::SAMPLE_HZ),
            !config.runtime_patterns.is_empty(),
        )?;
        for request in &requests {
            if let Err(err) = probes.attach(request) {
                return Err(attach_failure(err, request, &processes));
            }
        }
        if let Some(gone) = processes.iter().find(|p| !p.is_alive()) {
            return Err(RunError::TargetGone { pid: gone.pid }.into());
        }
        log::info!(
            "attached {} function(s) via {}",
            probes.attached(),
            probes.mode().as_str()
        );
        let running = if shared.is_empty() {
            Vec::new()
        } else {
            Binary::processes(&shared)
        };
        let live: BTreeMap<u32, Process> = processes
            .into_iter()
            .chain(running)
            .map(|p| (p.pid, p))
            .collect();
        let mut controller = Self {
            probes,
            planner,
            catalog,
            keyed: 0,
            live,
            binary,
            pids: config.pids.clone(),
            names: config.names.clone(),
            command: config.command,
            execed: Vec::new(),
            discovered: Vec::new(),
            rewritten: Vec::new(),
            rewritten_pids: Vec::new(),
            binary_warned: None,
            pruned: Instant::now(),
            exited_since_pruned: false,
            windows: Windows::new(config.max_overhead),
            collector: Collector::new(started),
            pacing: Pacing::default(),
            started,
            failed: std::collections::HashSet::new(),
            deferred: std::collections::HashSet::new(),
            retry: Vec::new(),
            lost: Vec::new(),
            leaderless: std::collections::HashSet::new(),
            leader_gone_since: HashMap::new(),
            discovery: config.discover.then(Discovery::default),
            seen: Vec::new(),
            runtime_patterns: config
                .runtime_patterns
                .iter()
                .map(|p| p.text.clone())
                .collect(),
            usdt_fired: false,
            usdt_silence_said: false,
            names_full_said: false,
            pending: Vec::new(),
            readings: 0,
            quiet_readings: 0,
        };
        controller
            .apply_keys()
            .context("cannot tell the kernel how to read keys")?;
        let attach_seconds = started.elapsed().as_secs_f64();
        let mut records = controller.picked_records();
        records.extend(
            requests
                .iter()
                .map(|r| controller.attached_record(r, attach_seconds)),
        );
        if let Some(sampler) = controller.probes.sampler() {
            sampler.set_processes(&controller.live.keys().copied().collect());
        }
        Ok((controller, records))
    }

    pub fn mode(&self) -> AttachMode {
        self.probes.mode()
    }

    /// The catalog as it stands: a new `Arc` whenever functions were added.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.clone()
    }

    /// One reading. Whether it closes a reporting interval
    /// (`Snapshot::report`) is the caller's to say: only known once it
    /// was read.
    ///
    /// With `quiet`, a reading between reports may be let go: when nothing
    /// changed among the processes and files, and `quiet` finds nothing in
    /// a glance at the call counters and CPU since the last glance that
    /// could move a verdict, only the counters are read (no evidence maps,
    /// no snapshot, nothing to judge) and None is returned; the next
    /// reading covers the time since the last one. Not while keys are
    /// read: the key maps would hold several readings' keys, and their
    /// sequences and shares are judged per reading.
    pub fn collect(
        &mut self,
        quiet: Option<&dyn Fn(&Glance) -> bool>,
    ) -> Result<Option<Snapshot>, ProbeError> {
        let version = self.catalog.version;
        // A process that ran exec: its probes (on the old program) and its
        // counters go before the maps are read, so the old program's counts
        // can neither be read as the new one's nor linger as a series of
        // zeros. It is planned again after the tick.
        // The snapshot reports these identities, so the analyzer forgets
        // a program's history on exactly the tick its counters went.
        let exes: HashMap<u32, FileId> = self
            .live
            .values()
            .filter_map(|p| Some((p.pid, p.exe_now()?)))
            .collect();
        self.execed = self
            .live
            .values()
            .filter(|p| exes.get(&p.pid).is_some_and(|&id| id != p.exe_id))
            .map(|p| p.pid)
            .collect();
        for &pid in &self.execed {
            self.probes.forget_process(pid);
            self.collector.forget(pid);
        }
        // A process whose main thread ended: out before the counters are
        // read, as soon as that is sure (see `unwatch_leaderless`).
        self.note_leaderless();
        let leaderless = self.unwatch_leaderless();
        // Said through `pending`, which makes this reading a change.
        self.pending.extend(leaderless);
        self.rewritten = self.take_out_rewritten();
        self.judge_names();
        let changed = !(self.execed.is_empty()
            && self.leader_gone_since.is_empty()
            && self.rewritten.is_empty()
            && self.pending.is_empty()
            && self.catalog.version == version);
        let counted = self.collector.read_counts(&mut self.probes)?;
        let quiet = quiet.filter(|_| !changed && !self.probes.uses_keys());
        let glanced = quiet.is_some_and(|quiet| {
            self.collector
                .glance(&self.live)
                .is_some_and(|glance| quiet(&glance))
        });
        if glanced {
            // Quiet, unless a process was found (under --binary, in the
            // counters just read).
            let watched = self.live.len();
            self.discovered = self.discover();
            if self.discovered.is_empty() && self.live.len() == watched {
                self.collector.let_go();
                self.quiet_readings += 1;
                return Ok(None);
            }
            self.collector.read_processes(&self.live);
            self.collector.read_evidence(&mut self.probes)?;
        } else {
            self.collector.read_processes(&self.live);
            self.collector.read_evidence(&mut self.probes)?;
            self.discovered = self.discover();
        }
        // Probed time is split where the call counters were read: hits
        // after it are the next interval's, and so is their time.
        let probed = self.windows.probed_share(counted);
        let mut exes = exes;
        for p in self.live.values() {
            // Found in this reading: as found.
            exes.entry(p.pid).or_insert(p.exe_id);
        }
        let snap = self
            .collector
            .snapshot(&self.probes, &self.catalog, &self.live, &exes, probed);
        self.pace_call_sites(snap.seconds * probed);
        self.readings += 1;
        Ok(Some(snap))
    }

    /// `py:`/`rb:`/`php:` patterns: the interpreted names the kernel saw
    /// called since the last reading become functions (wanted: counted from
    /// now on) or are refused (never reported again). Each name once.
    fn judge_names(&mut self) {
        if self.runtime_patterns.is_empty() {
            return;
        }
        self.probes.take_seen(&mut self.seen);
        self.usdt_fired |= !self.seen.is_empty();
        let mut added = false;
        for (hash, text) in std::mem::take(&mut self.seen) {
            let Some((runtime, display)) = crate::usdt::seen_name(&text) else {
                continue;
            };
            let func = self.planner.wanted_interpreted(runtime, &display).then(|| {
                added = true;
                self.planner
                    .interpreted(&format!("{}:{display}", runtime.prefix()))
            });
            if let Err(e) = self.probes.want(hash, func) {
                if func.is_some() && !self.names_full_said {
                    // Said once as a record: the name's calls are not
                    // counted, and it is reported again each reading.
                    self.names_full_said = true;
                    self.pending.push(warning(
                        None,
                        "names_full",
                        format!(
                            "cannot count {}:{display}: the kernel's table of wanted names is full ({}); narrow the patterns",
                            runtime.prefix(),
                            profiler_common::WANTED_ENTRIES
                        ),
                    ));
                }
                log::debug!("cannot tell the kernel about {display}: {e:#}");
            }
        }
        if added {
            self.catalog = self.planner.catalog();
        }
    }

    /// A warning, once, when runtime probes are attached and none has fired
    /// in [`SILENT_AFTER`]: counting zeros without a word would read as a
    /// healthy cache.
    fn usdt_silence(&mut self) -> Option<Record> {
        if self.runtime_patterns.is_empty()
            || self.usdt_fired
            || self.usdt_silence_said
            || self.started.elapsed() < SILENT_AFTER
        {
            return None;
        }
        // A count of an interpreted function is a probe that fired too.
        if self.catalog.functions.iter().any(|f| f.offsets.is_empty()) {
            self.usdt_fired = true;
            return None;
        }
        self.usdt_silence_said = true;
        Some(warning(
            None,
            "probes_silent",
            format!(
                "no call reached the {} probes in {} s: Ruby 2.5 and later fire method__entry only while a TracePoint is enabled in the process (Ruby bug #14582; the application can enable one, TracePoint.new(:call) {{}}.enable); PHP only when started with USE_ZEND_DTRACE=1; or the process called no function",
                self.runtime_patterns.join(", "),
                SILENT_AFTER.as_secs()
            ),
        ))
    }

    /// Sets each function's call-site sampling (`governor::caller_shift`)
    /// from the calls per probed second of the slowest process calling it:
    /// a hot function has its call site read on a few thousand hits a
    /// second, not on each. Per process, because a sampled hit stands for
    /// up to 64 calls: in a process calling the function a hundred times a
    /// reading, two stray samples would weigh like a call cycle. Raised at
    /// most once a probed second; lowered at the first reading whose rate
    /// asks for it (a burst that ends, a process that starts calling it).
    fn pace_call_sites(&mut self, probed_seconds: f64) {
        let pacing = &mut self.pacing;
        let mut slowest_now: HashMap<u32, f64> = HashMap::new();
        pacing.now.clear();
        for (&key, &total) in self.collector.counts() {
            // A counter below its last reading started over (its slot went
            // to another process's pair): all of it is new.
            let last = pacing.last.get(&key).copied().unwrap_or(0);
            let delta = if total >= last { total - last } else { total };
            pacing.now.insert(key, total);
            if delta == 0 {
                continue;
            }
            *pacing.period.entry(key).or_default() += delta;
            if probed_seconds > 1e-3 {
                let rate = delta as f64 / probed_seconds;
                let slowest = slowest_now.entry(key.func).or_insert(rate);
                *slowest = slowest.min(rate);
            }
        }
        // Pairs no longer counted (their processes went) are forgotten.
        std::mem::swap(&mut pacing.last, &mut pacing.now);
        pacing.period_seconds += probed_seconds;
        let mut shifts: Vec<(u32, u32)> = Vec::new();
        if pacing.period_seconds >= 1.0 {
            let mut slowest: HashMap<u32, f64> = HashMap::new();
            for (key, &calls) in &pacing.period {
                let rate = calls as f64 / pacing.period_seconds;
                let s = slowest.entry(key.func).or_insert(rate);
                *s = s.min(rate);
            }
            shifts.extend(
                slowest
                    .into_iter()
                    .map(|(func, rate)| (func, governor::caller_shift(rate))),
            );
            pacing.period.clear();
            pacing.period_seconds = 0.0;
        } else {
            shifts.extend(slowest_now.into_iter().filter_map(|(func, rate)| {
                let shift = governor::caller_shift(rate);
                (shift < self.probes.caller_shift(func)).then_some((func, shift))
            }));
        }
        for (func, shift) in shifts {
            if let Err(e) = self.probes.set_caller_shift(func, shift) {
                log::debug!("cannot set call-site sampling: {e:#}");
            }
        }
    }

    /// Files written in place since their symbols were read (same inode,
    /// other bytes): every probe on them comes out now, before another hit
    /// can land on an offset that no longer starts an instruction. Their
    /// processes are planned again after the tick (as after an exec), the
    /// `--binary` file at the next tick. Returns the warnings.
    fn take_out_rewritten(&mut self) -> Vec<Record> {
        let mut records = Vec::new();
        for id in self.probes.changed_files() {
            let pids = self.probes.forget_file_everywhere(id);
            self.planner.forget_file(id);
            let mut shown = String::from("a probed file");
            if let Some(b) = &mut self.binary
                && b.id == id
            {
                shown = format!("--binary {}", b.path.display());
                b.id = FileId::default();
            }
            for &pid in &pids {
                self.probes.forget_process(pid);
                self.collector.forget(pid);
                if !self.execed.contains(&pid) && self.live.contains_key(&pid) {
                    self.execed.push(pid);
                    self.rewritten_pids.push(pid);
                }
            }
            records.push(warning(
                None,
                "file_rewritten",
                format!(
                    "{shown} (inode {}) was written in place: its probes were taken out and it is read again",
                    id.ino
                ),
            ));
        }
        records
    }

    /// Notes, at each tick, the watched processes with links of their own
    /// whose main thread has ended while other threads run on (see
    /// [`Controller::unwatch_leaderless`]), and since when.
    fn note_leaderless(&mut self) {
        let now = Instant::now();
        let gone: Vec<u32> = self
            .live
            .values()
            // One read of each process's held stat; entries scanned only
            // for the rare leaderless one.
            .filter(|p| p.leader_gone() && self.probes.scoped_to(p.pid))
            .map(|p| p.pid)
            .collect();
        self.leader_gone_since.retain(|pid, _| gone.contains(pid));
        for pid in gone {
            self.leader_gone_since.entry(pid).or_insert(now);
        }
    }

    /// Processes whose main thread ended (`pthread_exit` in `main`) while
    /// their other threads run on. The kernel scopes a process's own probes
    /// through its main thread's memory, gone with that thread, and no
    /// consumer then claims the process's memory: a pid's uprobe_multi link
    /// made afterwards installs no breakpoint in it, and the breakpoints
    /// already in are taken out whenever any consumer of the same function
    /// comes or goes (another process of the program, a probe window,
    /// another tool). Seen on 6.18: counts read 0 after the first window,
    /// and with no window at all as soon as another process of the same
    /// program was windowed. Its calls would read as zero, a loop as a
    /// recovery, so such a process is no longer watched, and said, once
    /// seen so at two ticks (not in the instant an exiting process's leader
    /// is a zombie before its other threads): a `--pid` target or `run`'s
    /// command is lost (the run fails at its end; `run` stops its command),
    /// others are not tried again. One counted through the `--binary` link
    /// alone, which is not scoped, is still counted.
    fn unwatch_leaderless(&mut self) -> Vec<Record> {
        let sure: Vec<u32> = self
            .leader_gone_since
            .iter()
            .filter(|(_, since)| since.elapsed() >= LEADERLESS_SURE)
            .map(|(&pid, _)| pid)
            .collect();
        let mut records = Vec::new();
        for pid in sure {
            self.leader_gone_since.remove(&pid);
            let Some(p) = self.live.remove(&pid) else {
                continue;
            };
            self.probes.forget_process(pid);
            self.collector.forget(pid);
            records.push(self.drop_leaderless(p));
        }
        records
    }

    /// A process out of `live` whose main thread is gone, its probes
    /// forgotten: a `--pid` target or `run`'s command is lost, another is
    /// not tried again, and the `--binary` link's counts of it are not
    /// said again by [`Controller::discover`]. Returns the warning.
    fn drop_leaderless(&mut self, p: Process) -> Record {
        let pid = p.pid;
        self.leaderless.insert(pid);
        self.deferred.remove(&pid);
        if self.pids.contains(&pid) || self.command == Some(pid) {
            self.lost.push(p);
        } else {
            self.failed.insert((pid, p.start_time, p.exe_id));
        }
        warning(
            Some(pid),
            "attach_failed",
            format!(
                "pid {pid}'s main thread has exited while its other threads run on; the kernel scopes a process's own probes through its main thread, and can no longer keep them in it: it is no longer watched"
            ),
        )
    }

    /// With `--binary`, processes that started running or mapping the file
    /// since the last tick show up as counters of unknown pids: the
    /// all-process link traps in every process that maps the file, and
    /// each one is watched (and its hits weigh on the governor).
    fn discover(&mut self) -> Vec<Record> {
        let mut records = Vec::new();
        if self.binary.is_none() {
            // Only --pid and --name, whose links are scoped to their pids.
            return records;
        }
        let shared = self.probes.shared_files();
        let new: Vec<(u32, u64)> = self
            .collector
            .counted()
            // A `--pid` target waiting to be attached again is counted by the
            // --binary link meanwhile; its own probes come back with it.
            .filter(|(pid, _)| !self.live.contains_key(pid) && !self.retrying(*pid))
            .collect();
        for (pid, calls) in new {
            match Process::from_pid(pid) {
                Ok(process) if Binary::used_by(pid, &shared) => {
                    self.live.insert(pid, process);
                }
                Ok(_) => {
                    // Counted, but maps none of the files now (it unmapped a
                    // library): nothing to watch; its counters go.
                    log::debug!("pid {pid} was counted but maps no --binary file; ignored");
                    self.probes.forget_process(pid);
                }
                Err(e @ TargetError::Unreadable { .. }) => {
                    // The loader's own trouble (out of descriptors): nothing
                    // is known of it; its counters stay, and it is looked
                    // at again at the next reading.
                    log::debug!("pid {pid} was counted but {e:#}; looked at again next time");
                }
                Err(e @ TargetError::LeaderGone { .. }) => {
                    if self.leaderless.insert(pid) {
                        records.push(warning(
                            Some(pid),
                            "attach_failed",
                            format!("{e}; its calls are not in the samples"),
                        ));
                    }
                    self.probes.forget_process(pid);
                }
                Err(_) => {
                    // Started and exited between two ticks: nothing left in
                    // /proc to say what it was. Said, and its counters freed.
                    records.push(warning(
                        Some(pid),
                        "short_lived",
                        format!(
                            "pid {pid} ran the --binary file and exited before it could be identified; its {calls} call(s) are not in the samples"
                        ),
                    ));
                    self.probes.forget_process(pid);
                }
            }
        }
        records
    }

    /// After a reading was judged: lets `exited` processes go, replans
    /// those that ran exec and, at the end of an interval (`report`), plans
    /// the next probe window (unless this was the `last` reading) and, with
    /// `follow`, attaches processes that started under a watched `--name`
    /// or the `--binary`. Returns the records of what it did.
    /// `due` is when the next interval's reading is expected.
    #[allow(clippy::too_many_arguments)]
    pub fn after_tick(
        &mut self,
        exited: &[u32],
        hit_rate: f64,
        due: Instant,
        last: bool,
        follow: bool,
        report: bool,
    ) -> anyhow::Result<Vec<Record>> {
        let follow = follow && report;
        self.exited_since_pruned |= !exited.is_empty();
        for &pid in exited {
            self.live.remove(&pid);
            self.collector.forget(pid);
            self.probes.forget_process(pid);
        }
        let mut records = std::mem::take(&mut self.discovered);
        records.append(&mut self.rewritten);
        let execed = std::mem::take(&mut self.execed);
        for &pid in &execed {
            records.extend(self.replan_exec(pid));
        }
        if !(exited.is_empty() && execed.is_empty()) {
            // Files only those processes ran (an old build of a --name
            // program) are closed, with their symbol tables.
            let closed = self.planner.release_unused();
            if closed > 0 {
                log::debug!("{closed} file(s) no process is probed in any more closed");
            }
        }
        if report && !last {
            let (plan, failed) = self.windows.plan(&mut self.probes, hit_rate, due)?;
            records.extend(plan);
            records.extend(self.unwatch_refused(failed));
        }
        if follow && !self.retry.is_empty() {
            records.extend(self.attach_again());
        }
        if follow && self.binary.is_some() {
            let check_old = std::mem::take(&mut self.exited_since_pruned);
            records.extend(self.follow_binary(check_old));
        }
        if follow && !self.names.is_empty() {
            records.extend(self.attach_new_named());
        }
        if follow && let Some(root) = self.command {
            records.extend(self.attach_new_descendants(root));
        }
        records.append(&mut self.pending);
        if let Some(record) = self.usdt_silence() {
            records.push(record);
        }
        // Name picks of executables planned in this tick first: the hot set
        // must know them before it picks.
        records.extend(self.picked_records());
        if report && !last {
            records.extend(self.pick_hot());
        }
        Ok(records)
    }

    /// `picked` records for what the planner picked since the last call
    /// (by name, as executables are planned); their hot set knows them.
    fn picked_records(&mut self) -> Vec<Record> {
        let picks = self.planner.take_picks();
        let mut records = Vec::with_capacity(picks.len());
        for pick in picks {
            if let Some(d) = &mut self.discovery {
                d.hot.counted(pick.file, &pick.name);
            }
            records.push(self.picked_record(&pick));
        }
        records
    }

    fn picked_record(&self, pick: &discover::Pick) -> Record {
        let path = self
            .live
            .values()
            .find(|p| p.exe_id == pick.file)
            .map(|p| p.exe_name.display().to_string())
            .or_else(|| self.binary.as_ref().map(|b| b.path.display().to_string()))
            .unwrap_or_default();
        let (samples, of) = match pick.why {
            discover::Why::Hot { samples, of } => (Some(samples), Some(of)),
            discover::Why::Name(_) => (None, None),
        };
        Record::Picked {
            ts: unix_now(),
            function: pick.name.clone(),
            path,
            why: pick.why.kind().to_owned(),
            reason: pick.why.describe(),
            samples,
            of_samples: of,
        }
    }

    /// Without `--func`, at the end of each interval: reads the on-CPU
    /// samples of the watched processes, puts each down to a function of
    /// its executable, and attaches the functions newly hot wherever that
    /// executable runs. Returns the `picked` and `attached` records.
    fn pick_hot(&mut self) -> Vec<Record> {
        let Some(mut d) = self.discovery.take() else {
            return Vec::new();
        };
        let records = self.pick_hot_with(&mut d);
        self.discovery = Some(d);
        records
    }

    fn pick_hot_with(&mut self, d: &mut Discovery) -> Vec<Record> {
        let Some(sampler) = self.probes.sampler() else {
            return Vec::new();
        };
        sampler.set_processes(&self.live.keys().copied().collect());
        sampler.drain(&mut d.samples);
        let binary = self.binary.as_ref().map(|b| b.id);
        // Each process's own code: its executable (or the --binary file),
        // where it is mapped now.
        let mut own: HashMap<u32, (FileId, Vec<crate::cycles::Mapping>)> = HashMap::new();
        let mut functions = Vec::new();
        let mut total = 0;
        if d.indexes.len() > 64 {
            d.indexes.clear();
        }
        for (key, n) in &d.samples {
            total += n;
            let Some(process) = self.live.get(&key.tgid) else {
                continue;
            };
            let (file, maps) = own.entry(key.tgid).or_insert_with(|| {
                let file = binary
                    .filter(|b| *b != FileId::default())
                    .unwrap_or(process.exe_id);
                let text = std::fs::read_to_string(format!("/proc/{}/maps", process.pid))
                    .unwrap_or_default();
                let maps = crate::cycles::parse_maps(&text)
                    .into_iter()
                    .filter(|m| m.inode == file.ino)
                    .collect();
                (file, maps)
            });
            if maps.is_empty() {
                continue;
            }
            let index = match d.indexes.entry(*file) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let symbols = match self.planner.symbols(*file) {
                        Some(symbols) => discover::own_index(symbols),
                        None => {
                            match SymbolTable::read(&process.exe, &process.exe_name, &process.root)
                            {
                                Ok(table) => discover::own_index(&table.symbols),
                                Err(e) => {
                                    log::debug!(
                                        "cannot read the symbols of pid {}: {e}",
                                        process.pid
                                    );
                                    discover::own_index(&[])
                                }
                            }
                        }
                    };
                    e.insert(symbols)
                }
            };
            let depth = (key.depth as usize).min(key.ips.len());
            if let Some(name) = discover::attribute(&key.ips[..depth], maps, index) {
                functions.extend(std::iter::repeat_n((*file, name.to_owned()), *n as usize));
            }
        }
        d.hot
            .observe(self.started.elapsed().as_secs_f64(), functions, total);
        let picks = d.hot.picks();
        let mut records: Vec<Record> = picks.iter().map(|p| self.picked_record(p)).collect();
        if d.hot.exhausted() && !d.exhausted {
            d.exhausted = true;
            records.push(warning(
                None,
                "picks_exhausted",
                format!(
                    "{} functions were picked for their heat, the most a run picks: functions that turn hot from now on are not counted; name them with --func",
                    discover::MAX_HOT
                ),
            ));
        }
        let started = Instant::now();
        let files: std::collections::BTreeSet<FileId> = picks.iter().map(|p| p.file).collect();
        for file in files {
            let names: Vec<String> = picks
                .iter()
                .filter(|p| p.file == file)
                .map(|p| p.name.clone())
                .collect();
            let names = self.planner.pick_hot(file, &names);
            if names.is_empty() {
                continue;
            }
            let targets: Vec<FileTarget> = match &self.binary {
                Some(b) if b.id == file => vec![binary_file(b)],
                _ => self
                    .live
                    .values()
                    .filter(|p| p.exe_id == file)
                    .filter_map(|p| FileTarget::of_process(p).into_iter().next())
                    .collect(),
            };
            match self.planner.requests_for_picks(&targets, &names) {
                Ok(requests) => records.extend(self.attach_requests(&requests, started).0),
                Err(e) => records.push(warning(
                    None,
                    "attach_failed",
                    format!(
                        "cannot probe the functions picked ({}): {e:#}",
                        names.join(", ")
                    ),
                )),
            }
        }
        records
    }

    /// [`Controller::unwatch`] for each request the kernel refused as the
    /// probes went back in.
    fn unwatch_refused(&mut self, refused: Refused) -> Vec<Record> {
        // One warning a process, however many of its files were refused:
        // the first says what becomes of it.
        let mut said = std::collections::HashSet::new();
        let mut records = Vec::new();
        for (request, err) in refused {
            let record = self.unwatch(&request, &err.into());
            if request.pid.is_none_or(|pid| said.insert(pid)) {
                records.push(record);
            }
        }
        // The probes are in: later refusals are of probes that were in.
        if !self.probes.paused() {
            self.deferred.clear();
        }
        records
    }

    /// A request the kernel refused on re-attach: that process (or file)
    /// is no longer watched; the rest of the run goes on.
    fn unwatch(&mut self, request: &AttachRequest, err: &anyhow::Error) -> Record {
        if let Some(pid) = request.pid {
            self.probes.forget_process(pid);
            self.collector.forget(pid);
            // A process whose probes never went in is refused for good,
            // as one refused on the way in: a `--name` process still
            // running is not found, attached and refused again at every
            // window. One whose probes were in (an EMFILE on the way back)
            // is found and tried again, as before it was ever watched; a
            // `--pid` target, which nothing finds again, is tried again
            // once (`retry`), and lost if it is refused again.
            let mut found_again = false;
            if let Some(p) = self.live.remove(&pid) {
                if p.leader_gone() {
                    // Refused because its main thread is gone (6.1's perf
                    // events): not to be tried again.
                    return self.drop_leaderless(p);
                }
                let alive = p.is_alive();
                let target = alive && self.pids.contains(&pid);
                if self.deferred.contains(&pid) {
                    self.failed.insert((pid, p.start_time, p.exe_id));
                    if target {
                        self.lost.push(p);
                    }
                } else if target {
                    self.retry.push((p, false));
                } else {
                    found_again = alive && (!self.names.is_empty() || self.command.is_some());
                }
            }
            if found_again || self.retrying(pid) {
                return warning(
                    Some(pid),
                    "attach_failed",
                    format!(
                        "cannot put the probes back in {}: {err:#}; trying again at the next interval",
                        request.described()
                    ),
                );
            }
        } else if let Some(b) = &mut self.binary
            && b.id == request.file.id
        {
            // The --binary build itself: planned and attached again at the
            // next tick, as a deploy would be (one refusal, an EMFILE, must
            // not end the run's coverage for days).
            b.id = FileId::default();
            return warning(
                None,
                "attach_failed",
                format!(
                    "cannot put the probes back in {}: {err:#}; trying again at the next interval",
                    request.shown.display()
                ),
            );
        }
        warning(
            request.pid,
            "attach_failed",
            format!(
                "cannot put the probes back in {}: {err:#}; it is no longer watched",
                request.described()
            ),
        )
    }

    /// A watched process ran exec: same pid, another program. Its probes
    /// sat on the old image; they come out, and a `--pid` or `--name`
    /// target is planned again from the new one. A `--binary` process is
    /// found again by its counts if the new program maps the file too.
    fn replan_exec(&mut self, pid: u32) -> Vec<Record> {
        let Some(old) = self.live.remove(&pid) else {
            return Vec::new();
        };
        let process = match old.again() {
            Ok(Some(process)) => process,
            // Exited since: out of the readings already, so said here.
            Ok(None) => {
                return vec![Record::TargetExit {
                    ts: unix_now(),
                    pid,
                }];
            }
            Err(e) => {
                // The loader's own trouble (out of descriptors): a `--pid`
                // target is tried again, as one refused on the way back
                // in. The old handle still names the process.
                let retried =
                    matches!(e, TargetError::Unreadable { .. }) && self.pids.contains(&pid);
                let then = if retried {
                    self.retry.push((old, false));
                    "trying again at the next interval"
                } else {
                    "it is no longer watched"
                };
                return vec![warning(
                    Some(pid),
                    "attach_failed",
                    format!(
                        "pid {pid} ran exec, then {:#}; {then}",
                        anyhow::Error::from(e)
                    ),
                )];
            }
        };
        let mut records = Vec::new();
        if let Some(i) = self.rewritten_pids.iter().position(|&p| p == pid) {
            self.rewritten_pids.swap_remove(i);
        } else {
            records.push(warning(
                Some(pid),
                "target_exec",
                format!(
                    "pid {pid} ran exec: {} -> {}; its probes on the old program were taken out",
                    old.exe_name.display(),
                    process.exe_name.display()
                ),
            ));
        }
        if !(self.pids.contains(&pid) || target::is_named(&self.names, &process.comm)) {
            return records;
        }
        let (attached, how) = self.attach_process(process);
        records.extend(attached);
        // A `--pid` target whose new program the kernel would not probe
        // still runs unwatched; one without the functions goes.
        if how == Attach::Refused && self.pids.contains(&pid) {
            self.lost.push(old);
        }
        records
    }

    /// `--binary PATH` follows the path: when a deploy renames a new build
    /// into place, the new file is planned and attached for every process
    /// (the old build's links stay while processes still run it). With
    /// `check_old`, old builds no process runs any more are let go.
    fn follow_binary(&mut self, check_old: bool) -> Vec<Record> {
        let mut records = Vec::new();
        let Some(binary) = &mut self.binary else {
            return records;
        };
        let shown = binary.path.display().to_string();
        if let Some(new) = binary.replaced() {
            if self.probes.shared_files().contains(&new) {
                binary.id = new;
            } else {
                records.extend(self.attach_new_build(new, &shown));
            }
        }
        // Every 30 s, or when a process exited: a scan of /proc per old
        // build.
        if check_old || self.pruned.elapsed() >= Duration::from_secs(30) {
            self.pruned = Instant::now();
            let current = self.binary.as_ref().map(|b| b.id);
            for old in self.probes.shared_files() {
                // Not while /proc cannot be read through (out of
                // descriptors): its links would go from processes that
                // still run the old build.
                if Some(old) != current && Binary::in_use(&[old]) == Some(false) {
                    self.probes.forget_file(old);
                    let closed = self.planner.release_unused();
                    log::info!(
                        "no process runs an old build of {shown} any more; {closed} file(s) closed"
                    );
                }
            }
        }
        records
    }

    /// The `--binary` path names file `new` now: read it, plan it, attach
    /// it for every process. The path moves on to `new` only once that
    /// worked, or once the new build is known to hold no watched function:
    /// a file still being written (`cp`, `install`) or a refused attach is
    /// tried again at the next tick, said once.
    fn attach_new_build(&mut self, new: FileId, shown: &str) -> Vec<Record> {
        let started = Instant::now();
        let Some(binary) = &self.binary else {
            return Vec::new();
        };
        let file = binary_file(binary);
        let first_word = self.binary_warned != Some(new);
        self.binary_warned = Some(new);
        let say = |kind: &str, message: String| {
            if first_word {
                vec![warning(None, kind, message)]
            } else {
                Vec::new()
            }
        };
        match self.planner.requests(&[file], false, "") {
            Ok(requests) if requests.is_empty() => {
                self.set_binary(new);
                say(
                    "binary_replaced",
                    format!(
                        "--binary {shown} was replaced by a build where no --func pattern matches; its new processes are not watched"
                    ),
                )
            }
            Ok(requests) => {
                let (attached, failed) = self.attach_requests(&requests, started);
                if failed > 0 {
                    // The one all-process request was refused: nothing is
                    // half attached.
                    let mut records = say(
                        "attach_failed",
                        format!(
                            "--binary {shown} was replaced and the new build cannot be probed yet; trying again each interval"
                        ),
                    );
                    if first_word {
                        records.extend(attached);
                    }
                    return records;
                }
                // The file read, should the path have moved on again.
                self.set_binary(requests[0].file.id);
                let mut records = vec![warning(
                    None,
                    "binary_replaced",
                    format!(
                        "--binary {shown} was replaced (a deploy); probing the new build, read from the new file"
                    ),
                )];
                records.extend(attached);
                records
            }
            Err(e) => say(
                "attach_failed",
                format!(
                    "--binary {shown} was replaced and the new build cannot be read yet ({e:#}); trying again each interval"
                ),
            ),
        }
    }

    fn set_binary(&mut self, id: FileId) {
        if let Some(b) = &mut self.binary {
            b.id = id;
        }
    }

    /// Attaches requests planned after the start; returns the `attached`
    /// records (and `attach_failed` warnings for those the kernel refused)
    /// and how many were refused.
    fn attach_requests(
        &mut self,
        requests: &[AttachRequest],
        started: Instant,
    ) -> (Vec<Record>, usize) {
        let mut records = Vec::new();
        let mut attached = Vec::new();
        for request in requests {
            match self.probes.attach(request) {
                Ok(()) => attached.push(request),
                Err(e) => records.push(warning(
                    request.pid,
                    "attach_failed",
                    format!("{:#}", anyhow::Error::from(e)),
                )),
            }
        }
        self.catalog = self.planner.catalog();
        if let Err(e) = self.apply_keys() {
            records.push(warning(
                None,
                "keys_unavailable",
                format!(
                    "keys of newly probed functions will not be read: {:#}",
                    anyhow::Error::from(e)
                ),
            ));
        }
        let failed = requests.len() - attached.len();
        let seconds = started.elapsed().as_secs_f64();
        records.extend(
            attached
                .into_iter()
                .map(|r| self.attached_record(r, seconds)),
        );
        (records, failed)
    }

    /// No watched process is left, and none can come (no `--binary`, no
    /// `--name`).
    pub fn all_gone(&self) -> bool {
        self.binary.is_none()
            && self.names.is_empty()
            && self.live.is_empty()
            && self.retry.is_empty()
    }

    /// While the governor windows the probes, what comes next and when:
    /// a window opens or closes ([`Controller::change_window`]), or the
    /// interval ending at `due` is read. The reading waits, if it must,
    /// until the probes have been in for the share planned for the
    /// interval (a window that opened late: a timer that fired late, a
    /// slow reading before it), so that no reading is ever made of less
    /// probed time than planned. None: the probes are in throughout, read
    /// on the tick.
    pub fn next_wake(&self, due: Instant) -> Option<(Instant, Wake)> {
        self.windows.next_wake(due)
    }

    /// The time [`Controller::next_wake`] named has come: a window
    /// opens or closes. Returns the records of requests the kernel refused
    /// on the way in (their processes exited while the probes were out).
    pub fn change_window(&mut self) -> anyhow::Result<Vec<Record>> {
        let failed = self.windows.change(&mut self.probes)?;
        Ok(self.unwatch_refused(failed))
    }

    /// Detaches everything. Returns the `detached` record's numbers:
    /// functions, how long the kernel took.
    pub fn finish(self) -> (usize, Duration) {
        log::debug!(
            "{} readings judged; {} quiet ones between reports let go",
            self.readings,
            self.quiet_readings
        );
        let functions = self.probes.attached();
        let detach = self.probes.detach();
        (functions, detach)
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// The `--pid` targets refused on the way back in (`retry`), attached
    /// again; one refused again is lost ([`Controller::lost`]). One put
    /// back is watched as before: a refusal days later is tried again too.
    fn attach_again(&mut self) -> Vec<Record> {
        let mut records = Vec::new();
        for (old, due) in std::mem::take(&mut self.retry) {
            if !due {
                self.retry.push((old, true));
                continue;
            }
            let pid = old.pid;
            if self.live.contains_key(&pid) {
                // Found again meanwhile (also named by --name): watched.
                continue;
            }
            // As it is now: it may have run exec while it was out.
            let process = match old.again() {
                Ok(Some(process)) => process,
                // Exited while it was out: said as any exit is.
                Ok(None) => {
                    records.push(Record::TargetExit {
                        ts: unix_now(),
                        pid,
                    });
                    continue;
                }
                Err(e) => {
                    records.push(warning(
                        Some(pid),
                        "attach_failed",
                        format!(
                            "cannot put the probes back in pid {pid}: {:#}; it is no longer watched",
                            anyhow::Error::from(e)
                        ),
                    ));
                    self.lost.push(old);
                    continue;
                }
            };
            // Refused again, it is lost; so is the same program that
            // could not be read. One that ran exec into a program without
            // the functions, or one that cannot be read, goes as any exec'd
            // target does.
            let same_program = process.exe_id == old.exe_id;
            let (attached, how) = self.attach_process(process);
            records.extend(attached);
            if how == Attach::Refused || (how == Attach::Unplannable && same_program) {
                self.lost.push(old);
            }
        }
        records
    }

    /// Whether `pid` waits in `retry` to be attached again.
    fn retrying(&self, pid: u32) -> bool {
        self.retry.iter().any(|(p, _)| p.pid == pid)
    }

    /// Why a run that ends now failed: `--pid` targets that still run
    /// were not watched to its end (their probes refused on the way back
    /// in, then refused again, or still waiting to be tried again). Not an
    /// exit: the run ends as it would, and says so.
    pub fn lost(&self) -> Option<RunError> {
        let alive: Vec<&Process> = self
            .lost
            .iter()
            .chain(self.retry.iter().map(|(p, _)| p))
            .filter(|p| p.is_alive())
            .collect();
        let running: Vec<u32> = alive.iter().map(|p| p.pid).collect();
        if let Some(&pid) = running.iter().find(|&&pid| Some(pid) == self.command) {
            return Some(RunError::CommandLost { pid });
        }
        let pids = running
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        if running.is_empty() {
            None
        } else if alive.iter().all(|p| p.leader_gone()) {
            Some(RunError::LostLeaderless { pids })
        } else {
            Some(RunError::Lost { pids })
        }
    }

    /// `cacheloop run`: the command still runs but could not be probed
    /// again. The run ends at once: the command does not run unwatched,
    /// whatever its children do.
    pub fn command_lost(&self) -> bool {
        self.lost
            .iter()
            .any(|p| Some(p.pid) == self.command && p.is_alive())
    }

    /// `--name`: probes processes of those names that started since the
    /// last tick (a restart, a new worker).
    fn attach_new_named(&mut self) -> Vec<Record> {
        let found = target::processes_named(&self.names, |pid| self.live.contains_key(&pid));
        self.attach_found(found, false)
    }

    /// `cacheloop run`: the command's children (and theirs) not watched
    /// yet, attached within an interval of their start. One that runs
    /// another program with none of the functions is left alone quietly (a
    /// shell, a helper): it is not what the gate watches.
    fn attach_new_descendants(&mut self, root: u32) -> Vec<Record> {
        let found = target::descendants_of(root, |pid| self.live.contains_key(&pid));
        self.attach_found(found, true)
    }

    /// Attaches the processes `found` that are neither watched nor already
    /// refused; `quiet_unmatched` drops the warning for one with none of
    /// the functions.
    fn attach_found(&mut self, found: Vec<Process>, quiet_unmatched: bool) -> Vec<Record> {
        let mut records = Vec::new();
        self.failed.retain(|&(pid, _, _)| target::is_running(pid));
        for process in found {
            let id = (process.pid, process.start_time, process.exe_id);
            if self.live.contains_key(&process.pid) || self.failed.contains(&id) {
                continue;
            }
            let (attached, _) = self.attach_process(process);
            records.extend(attached.into_iter().filter(|r| {
                !(quiet_unmatched
                    && matches!(r, Record::Warning { kind, message, .. }
                        if kind == "attach_failed" && message.contains(UNMATCHED)))
            }));
        }
        records
    }

    /// Plans and attaches one process found after the start (a new
    /// `--name` process, or a target that ran exec) and watches it. A
    /// process that cannot be probed is said once and not tried again.
    fn attach_process(&mut self, process: Process) -> (Vec<Record>, Attach) {
        let started = Instant::now();
        let pid = process.pid;
        let failed = |e: anyhow::Error| {
            warning(
                Some(pid),
                "attach_failed",
                format!(
                    "cannot probe pid {pid} ({}): {e:#}",
                    process.exe_name.display()
                ),
            )
        };
        let requests = match self
            .planner
            .requests(&FileTarget::of_process(&process), false, "")
        {
            // Without --func, a process with nothing picked yet is still
            // watched: its samples may pick functions later.
            Ok(requests) if requests.is_empty() && !self.planner.discovers() => {
                let none = anyhow::anyhow!("{UNMATCHED}");
                self.failed
                    .insert((pid, process.start_time, process.exe_id));
                return (vec![failed(none)], Attach::NoFunctions);
            }
            Ok(requests) => uncovered(requests, &self.probes.shared_files()),
            Err(e) => {
                self.failed
                    .insert((pid, process.start_time, process.exe_id));
                return (vec![failed(e)], Attach::Unplannable);
            }
        };
        // All of a process's files or none: half a process would be
        // judged on half its calls.
        if let Err(e) = requests.iter().try_for_each(|r| self.probes.attach(r)) {
            self.failed
                .insert((pid, process.start_time, process.exe_id));
            self.probes.forget_process(pid);
            return (vec![failed(e.into())], Attach::Refused);
        }
        if self.probes.paused() {
            self.deferred.insert(pid);
        }
        self.live.insert(pid, process);
        let mut records = Vec::new();
        self.catalog = self.planner.catalog();
        if let Err(e) = self.apply_keys() {
            records.push(warning(
                Some(pid),
                "keys_unavailable",
                format!(
                    "keys of pid {pid} will not be read: {:#}",
                    anyhow::Error::from(e)
                ),
            ));
        }
        let seconds = started.elapsed().as_secs_f64();
        records.extend(requests.iter().map(|r| self.attached_record(r, seconds)));
        (records, Attach::Watched)
    }

    /// Tells the kernel how to read the keys of functions it does not know
    /// yet.
    fn apply_keys(&mut self) -> Result<(), ProbeError> {
        let catalog = self.catalog.clone();
        let mut beyond = 0;
        for (id, function) in catalog.functions.iter().enumerate().skip(self.keyed) {
            self.keyed = id + 1;
            match function.key {
                Some(key) if (id as u32) < MAX_FUNCTIONS => {
                    self.probes.set_key_config(id as u32, key.kernel_config())?;
                }
                Some(_) => beyond += 1,
                None => {}
            }
        }
        if beyond > 0 {
            log::warn!(
                "keys of {beyond} function(s) will not be read: the kernel's key table holds {MAX_FUNCTIONS}"
            );
        }
        Ok(())
    }

    fn attached_record(&self, request: &AttachRequest, attach_seconds: f64) -> Record {
        let functions = if request.usdt.is_empty() {
            request
                .points
                .iter()
                .map(|&(_, id)| self.catalog.shared_name(id))
                .collect()
        } else {
            // Interpreted functions are named as they are called.
            self.runtime_patterns
                .iter()
                .map(|p| p.as_str().into())
                .collect()
        };
        Record::Attached {
            ts: unix_now(),
            pid: request.pid,
            ns_pid: request.pid.and_then(|pid| self.live.get(&pid)?.ns_pid),
            path: request.shown.display().to_string(),
            functions,
            mode: self.probes.mode_for(request).as_str().to_owned(),
            attach_seconds,
        }
    }
}

fn warning(pid: Option<u32>, kind: &str, message: String) -> Record {
    Record::Warning {
        ts: unix_now(),
        pid,
        kind: kind.to_owned(),
        message,
        count: None,
    }
}

/// The requests not already covered by an all-process link on their file
/// (`--binary`): a second link there would run the program twice a hit and
/// count every call twice.
fn uncovered(requests: Vec<AttachRequest>, shared: &[FileId]) -> Vec<AttachRequest> {
    requests
        .into_iter()
        .filter(|r| !shared.contains(&r.file.id))
        .collect()
}

/// The `--binary` file as the planner opens it: by its path, now.
fn binary_file(binary: &Binary) -> FileTarget {
    FileTarget {
        open: binary.path.clone(),
        shown: binary.path.clone(),
        root: PathBuf::from("/"),
        pid: None,
    }
}

/// How long a process's main thread must have been seen ended, its other
/// threads running on, before it is taken for that (two ticks): a process
/// exiting shows its leader a zombie for a moment before the others.
const LEADERLESS_SURE: Duration = Duration::from_millis(200);

/// A refused attach is most often a process that just exited; say so.
fn attach_failure(
    err: ProbeError,
    request: &AttachRequest,
    processes: &[Process],
) -> anyhow::Error {
    let gone = request
        .pid
        .and_then(|pid| processes.iter().find(|p| p.pid == pid))
        .filter(|p| !p.is_alive());
    match gone {
        Some(p) => RunError::TargetGone { pid: p.pid }.into(),
        None => err.into(),
    }
}

/// Call-site sampling state (see [`Controller::pace_call_sites`]).
#[derive(Default)]
struct Pacing {
    /// Each (function, process) counter at the last reading.
    last: HashMap<CallKey, u64>,
    /// This reading's, reused.
    now: HashMap<CallKey, u64>,
    /// Calls per (function, process) since the shifts were last raised,
    /// over this many probed seconds.
    period: HashMap<CallKey, u64>,
    period_seconds: f64,
}

/// Why a process found later gets no probes.
const UNMATCHED: &str = "no --func pattern matches its functions";

/// What [`Controller::next_wake`] says comes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// A window opens or closes: [`Controller::change_window`].
    Window,
    /// The interval is read.
    Read,
}

/// Requests the kernel refused on re-attach, with its reasons.
type Refused = Vec<(AttachRequest, ProbeError)>;

/// The overhead governor's probe windows: when probing throughout would
/// cost a target more than `--max-overhead`, the probes are in for the
/// governor's share of each interval only.
///
/// Putting a thousand probes in and taking them out again is most of what
/// the loader does while windowed (the kernel writes each breakpoint into
/// the target's page, and takes it out again, one by one), so one window
/// serves two intervals: the probes go in for the last share of one
/// interval and stay in, across the tick that reads it, for the first
/// share of the next. Each interval is still probed for its share, and
/// read at its own tick; the probes go in and out once every two.
struct Windows {
    budget: f64,
    /// Created once hits are frequent enough to need it: it measures the
    /// cost of a hit first (a few milliseconds).
    governor: Option<Governor>,
    /// When the probes went in (None: out).
    since: Option<Instant>,
    /// Probed time and wall time since the last tick.
    probed: Duration,
    tick_at: Instant,
    /// When the probes come out in this interval.
    end: Option<Instant>,
    /// When the probes go in, late in this interval (they are out now).
    start: Option<Instant>,
    /// How long this interval is to be probed for before it is read (set
    /// by each plan; the reading waits for it).
    planned: Duration,
    /// How long the last `resume` took: a late window opens that much
    /// earlier, so that it has its share before the reading.
    resume_took: Duration,
}

/// Calibrating waits until hits could cost this much each and still break
/// the budget (TCG guests measure 27-45 us a hit; real machines far less).
const WORST_HIT_COST: f64 = 100e-6;

impl Windows {
    fn new(budget: f64) -> Self {
        let now = Instant::now();
        Self {
            budget,
            governor: None,
            since: Some(now),
            probed: Duration::ZERO,
            tick_at: now,
            end: None,
            start: None,
            planned: Duration::ZERO,
            resume_took: Duration::ZERO,
        }
    }

    /// The probes are in for a window of each interval only.
    fn windowed(&self) -> bool {
        self.governor.as_ref().is_some_and(|g| g.exposure() < 1.0)
    }

    /// See [`Controller::next_wake`].
    fn next_wake(&self, due: Instant) -> Option<(Instant, Wake)> {
        if !self.windowed() {
            return None;
        }
        // A late window goes in before its reading, however late.
        if let Some(at) = self.start {
            return Some((at, Wake::Window));
        }
        let read = match self.since {
            Some(since) => due.max(since + self.planned.saturating_sub(self.probed)),
            None => due,
        };
        Some(match self.end {
            Some(end) if end <= read => (end, Wake::Window),
            _ => (read, Wake::Read),
        })
    }

    /// The time [`Windows::next_wake`] named for a window has come: the probes go in
    /// or come out. Returns the requests the kernel refused on the way in.
    fn change(&mut self, probes: &mut Probes) -> Result<Refused, ProbeError> {
        if self.start.take().is_some() {
            self.open(probes)
        } else {
            self.close(probes);
            Ok(Vec::new())
        }
    }

    /// Probes in, if they are out; the window starts as the kernel's gate
    /// opens (once every probe is in), as `resume` returns.
    fn open(&mut self, probes: &mut Probes) -> Result<Refused, ProbeError> {
        if self.since.is_some() {
            return Ok(Vec::new());
        }
        // The last window's links closed first (the helper's time, not
        // waited for then): putting the probes in is timed without it.
        probes.settle();
        let resuming = Instant::now();
        let failed = probes.resume()?;
        let now = Instant::now();
        self.resume_took = now - resuming;
        self.since = Some(now);
        log::debug!(
            "window: probes in (putting them in took {:?})",
            self.resume_took
        );
        Ok(failed)
    }

    /// Share of the interval ending `now` (when its counters were read)
    /// that the probes were in; starts the next.
    fn probed_share(&mut self, now: Instant) -> f64 {
        if let Some(since) = self.since {
            self.probed += now.saturating_duration_since(since);
            self.since = Some(now);
        }
        let wall = now.saturating_duration_since(std::mem::replace(&mut self.tick_at, now));
        let share = self.probed.as_secs_f64() / wall.as_secs_f64().max(1e-6);
        self.probed = Duration::ZERO;
        share.min(1.0)
    }

    /// The window is over: probes out until the next one.
    fn close(&mut self, probes: &mut Probes) {
        // Counting stops as `pause` starts (its kernel gate), not once the
        // last probe is out: the window ends now.
        if let Some(since) = self.since.take() {
            self.probed += since.elapsed();
        }
        let pausing = Instant::now();
        probes.pause();
        self.end = None;
        log::debug!(
            "window: probes out (counting stopped; links handed to the custody helper in {:?})",
            pausing.elapsed()
        );
    }

    /// After a tick: asks the governor about the next interval and places
    /// its window (or puts the probes in throughout). Returns records when
    /// the plan changed or calibration failed.
    fn plan(
        &mut self,
        probes: &mut Probes,
        hit_rate: f64,
        due: Instant,
    ) -> Result<(Vec<Record>, Refused), ProbeError> {
        let mut failed = Vec::new();
        if self.budget >= 1.0 {
            return Ok((Vec::new(), failed));
        }
        let mut records = Vec::new();
        if self.governor.is_none() && hit_rate * WORST_HIT_COST > self.budget {
            let calibrating = Instant::now();
            match probes.calibrate() {
                Ok(cost) => {
                    log::info!(
                        "one probe hit costs {cost:?} here (measured in {:?})",
                        calibrating.elapsed()
                    );
                    self.governor = Some(Governor::new(self.budget, cost.as_secs_f64()));
                }
                Err(e) => {
                    records.push(Record::Warning {
                        ts: unix_now(),
                        pid: None,
                        kind: "calibration_failed".to_owned(),
                        message: format!(
                            "cannot measure the cost of a probe hit ({:#}); --max-overhead is off",
                            anyhow::Error::from(e)
                        ),
                        count: None,
                    });
                    self.budget = 1.0;
                }
            }
        }
        let Some(governor) = &mut self.governor else {
            return Ok((records, failed));
        };
        let plan = governor.observe(hit_rate);
        let exposure = governor.exposure();
        let probe_cost = governor.cost();
        let now = Instant::now();
        // The interval runs from the reading's stamp to `due`.
        self.planned = due
            .saturating_duration_since(self.tick_at)
            .mul_f64(exposure);
        log::debug!(
            "window: {:.1}% probed, {:?} of the interval ending in {:?}",
            exposure * 100.0,
            self.planned,
            due.saturating_duration_since(now)
        );
        if exposure >= 1.0 {
            self.start = None;
            self.end = None;
            failed = self.open(probes)?;
        } else if self.since.is_some() {
            // In since late in the interval just read (or throughout): the
            // window goes on into this one, for its share.
            self.start = None;
            // Probed since the reading's stamp: out `planned` after it.
            self.end = Some(self.tick_at + self.planned);
        } else {
            // Out: in for the last share of this interval (as long before
            // its reading as putting the probes in took last time, too),
            // and on across the next tick. Should it open late all the
            // same, the reading waits for its share (`next_wake`).
            self.end = None;
            let start = due
                .checked_sub(self.planned + self.resume_took)
                .map_or(now, |at| at.max(now));
            if start <= now {
                failed = self.open(probes)?;
            } else {
                self.start = Some(start);
            }
        }
        records.extend(plan.map(|p| Record::Governor {
            ts: unix_now(),
            probed_percent: report::round1(p.exposure * 100.0),
            full_overhead_percent: report::round1(p.full_overhead * 100.0),
            max_overhead_percent: self.budget * 100.0,
            probe_cost_us: report::round1(probe_cost * 1e6),
        }));
        Ok((records, failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Windows whose governor keeps the probes in for 5% of each interval
    /// (a hit rate that would cost ten times the budget).
    fn windowed(tick_at: Instant) -> Windows {
        let mut w = Windows::new(0.05);
        let mut g = Governor::new(0.05, 1e-6);
        g.observe(500_000.0);
        assert!(g.exposure() < 1.0);
        w.governor = Some(g);
        w.tick_at = tick_at;
        w.since = None;
        w.planned = Duration::from_millis(50);
        w
    }

    #[test]
    fn probes_in_throughout_are_read_on_the_tick() {
        let mut w = Windows::new(0.05);
        assert_eq!(w.next_wake(Instant::now()), None);
        let mut g = Governor::new(0.05, 1e-6);
        g.observe(10.0);
        w.governor = Some(g);
        assert_eq!(w.next_wake(Instant::now()), None);
    }

    #[test]
    fn a_late_window_opens_first_however_late() {
        let t = Instant::now();
        let due = t + Duration::from_secs(1);
        let mut w = windowed(t);
        let start = due - Duration::from_millis(60);
        w.start = Some(start);
        assert_eq!(w.next_wake(due), Some((start, Wake::Window)));
        // Its timer fired past the reading's time: it still opens first.
        assert_eq!(w.next_wake(t), Some((start, Wake::Window)));
    }

    #[test]
    fn a_reading_waits_for_a_late_window_to_have_its_share() {
        let t = Instant::now();
        let due = t + Duration::from_secs(1);
        let mut w = windowed(t);
        // Opened in time: read when due.
        w.since = Some(due - Duration::from_millis(55));
        assert_eq!(w.next_wake(due), Some((due, Wake::Read)));
        // Opened 10 ms before the reading was due: read 40 ms late.
        let since = due - Duration::from_millis(10);
        w.since = Some(since);
        let read = since + Duration::from_millis(50);
        assert_eq!(w.next_wake(due), Some((read, Wake::Read)));
    }

    #[test]
    fn an_early_window_closes_then_the_interval_is_read_when_due() {
        let t = Instant::now();
        let due = t + Duration::from_secs(1);
        let mut w = windowed(t);
        // In from the reading's stamp, out `planned` after it.
        w.since = Some(t);
        let end = t + w.planned;
        w.end = Some(end);
        assert_eq!(w.next_wake(due), Some((end, Wake::Window)));
        w.since = None;
        w.probed = w.planned;
        w.end = None;
        assert_eq!(w.next_wake(due), Some((due, Wake::Read)));
    }
}
