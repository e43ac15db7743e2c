//! The `watch` command, end to end: resolve targets, pick functions, attach,
//! sample every interval until told to stop, detach, summarise.
//!
//! This is glue: each step is a call into the module that owns it, and data
//! flows one way (target -> symbols -> probes -> sampler -> detector -> sinks).

use std::{
    collections::{HashMap, hash_map::Entry},
    io::{self, Write},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::Instant,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval_at},
};

use profiler_common::{KEY_STR, KEY_STR_AT, KEY_U64, KeyConfig};

use crate::{
    config::{Output, WatchConfig},
    cycles::CodeRange,
    detect::Detector,
    governor::Governor,
    presets::KeySpec,
    probes::{AttachRequest, ProbeError, Probes},
    report::{self, Record, Sink, json::JsonSink, text::TextSink, unix_now},
    sampler::{Sampler, Watched},
    symbols::{Pattern, SymbolError, SymbolTable, check_matches},
    target::{self, Binary, Process},
};

/// Failures of the run itself (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Not allowed to load BPF programs.
    #[error(
        "cacheloop needs root (or CAP_BPF and CAP_PERFMON) to attach uprobes; run it with sudo"
    )]
    NoPrivileges,
    /// A target exited between being found and being probed.
    #[error("pid {pid} exited before cacheloop could attach")]
    TargetGone { pid: u32 },
}

/// How a run ended, when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Ran to its end (duration, signal, targets gone); loops may have been
    /// reported.
    Finished,
    /// Stopped at a loop because of `--fail-on-loop`.
    LoopFound,
}

/// Why the sampling loop stopped.
enum Stop {
    Done,
    Loop,
    /// The reader of stdout went away: not an error, but stop writing.
    BrokenPipe,
}

pub fn run(config: WatchConfig) -> anyhow::Result<Outcome> {
    if !target::has_bpf_privileges() {
        return Err(RunError::NoPrivileges.into());
    }
    let started = Instant::now();
    let mut processes = config
        .pids
        .iter()
        .map(|&pid| Process::from_pid(pid))
        .collect::<Result<Vec<_>, _>>()?;
    let binary = config.binary.as_deref().map(Binary::open).transpose()?;
    for named in target::processes_named(&config.names) {
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

    let mut planner = Planner::new(config.patterns.clone());
    let mut requests = Vec::new();
    if let Some(b) = &binary {
        let file = FileTarget {
            open: b.path.clone(),
            shown: b.path.clone(),
            root: PathBuf::from("/"),
            pid: None,
        };
        let hint = format!("--binary {}", b.path.display());
        requests.extend(planner.requests(&[file], true, &hint)?);
    }
    // A pid running the --binary file is already covered by the
    // all-processes link on that file.
    for p in processes
        .iter()
        .filter(|p| !binary.as_ref().is_some_and(|b| b.runs(p.pid)))
    {
        let hint = format!("--pid {}", p.pid);
        requests.extend(planner.requests(&Planner::process_files(p), true, &hint)?);
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .enable_io()
        .build()
        .context("cannot start the runtime")?;
    let watched = Watched {
        pids: processes,
        binary,
        names: config.names.clone(),
    };
    runtime.block_on(watch(config, planner, requests, watched, started))
}

/// Decides what to attach where: reads each file once (by device and
/// inode), and numbers the selected functions across every file and process
/// (`names[cookie]`), so that one function name is one series.
struct Planner {
    patterns: Vec<Pattern>,
    tables: HashMap<(u64, u64), SymbolTable>,
    names: Vec<String>,
    cookies: HashMap<String, u32>,
    /// Where each probed function's code lies, to tell callers apart.
    ranges: Vec<CodeRange>,
}

/// A file to read and attach to, and the process scope of its link.
struct FileTarget {
    open: PathBuf,
    shown: PathBuf,
    root: PathBuf,
    pid: Option<u32>,
}

impl Planner {
    fn new(patterns: Vec<Pattern>) -> Self {
        Self {
            patterns,
            tables: HashMap::new(),
            names: Vec::new(),
            cookies: HashMap::new(),
            ranges: Vec::new(),
        }
    }

    /// The files of a process: its executable and libraries, attached for
    /// that process only.
    fn process_files(process: &Process) -> Vec<FileTarget> {
        process
            .mapped_files()
            .into_iter()
            .map(|f| FileTarget {
                open: f.open,
                shown: f.name,
                root: process.root.clone(),
                pid: Some(process.pid),
            })
            .collect()
    }

    /// The attach requests for `files`: an executable, then the libraries
    /// it maps. Each pattern is looked up in the executable first, and only
    /// if it matches nothing there in the libraries (read only then), so
    /// `cache_*` means the program's own functions, while `--func lib_fn`
    /// still finds its library. With `strict`, each pattern must match
    /// somewhere (`hint` completes the suggestion); otherwise what matches
    /// nothing is skipped.
    fn requests(
        &mut self,
        files: &[FileTarget],
        strict: bool,
        hint: &str,
    ) -> anyhow::Result<Vec<AttachRequest>> {
        let Some((exe, libraries)) = files.split_first() else {
            return Ok(Vec::new());
        };
        let exe_id = self.load(exe)?;
        let table = &self.tables[&exe_id];
        let (in_exe, elsewhere): (Vec<Pattern>, Vec<Pattern>) = self
            .patterns
            .iter()
            .cloned()
            .partition(|p| table.symbols.iter().any(|s| p.selects(s)));
        let mut chosen = vec![(exe, points_of(table.matching(&in_exe)))];
        if !elsewhere.is_empty() {
            let found: Vec<((u64, u64), &FileTarget)> = libraries
                .iter()
                .filter_map(|library| Some((self.load(library).ok()?, library)))
                .collect();
            let searched: Vec<&SymbolTable> = std::iter::once(exe_id)
                .chain(found.iter().map(|(id, _)| *id))
                .map(|id| &self.tables[&id])
                .collect();
            if strict {
                check_matches(&searched, &elsewhere, hint)?;
            }
            for ((_, library), table) in found.iter().zip(&searched[1..]) {
                chosen.push((library, points_of(table.matching(&elsewhere))));
            }
        }
        let mut requests = Vec::new();
        for (file, symbols) in chosen {
            if symbols.is_empty() {
                continue;
            }
            // Mappings name a file by the path the process opened, links
            // resolved; a --binary path may be a link (redis-server is).
            let mapped = match file.pid {
                Some(_) => file.shown.clone(),
                None => crate::cycles::canonical(&file.shown),
            };
            let mut points = Vec::with_capacity(symbols.len());
            for (offset, size, name) in symbols {
                let func = self.cookie(&name);
                if size > 0
                    && !self
                        .ranges
                        .iter()
                        .any(|r| r.path == mapped && r.start == offset)
                {
                    self.ranges.push(CodeRange {
                        path: mapped.clone(),
                        start: offset,
                        end: offset + size,
                        func,
                    });
                }
                points.push((offset, func));
            }
            requests.push(AttachRequest {
                path: file.open.clone(),
                shown: file.shown.clone(),
                pid: file.pid,
                points,
            });
        }
        Ok(requests)
    }

    /// Reads a file's symbols once; returns its (device, inode).
    fn load(&mut self, file: &FileTarget) -> Result<(u64, u64), SymbolError> {
        let meta = std::fs::metadata(&file.open).map_err(|source| SymbolError::Read {
            path: file.shown.clone(),
            source,
        })?;
        let id = (meta.dev(), meta.ino());
        if let Entry::Vacant(slot) = self.tables.entry(id) {
            slot.insert(SymbolTable::read(&file.open, &file.shown, &file.root)?);
        }
        Ok(id)
    }

    fn cookie(&mut self, name: &str) -> u32 {
        let next = self.names.len() as u32;
        *self.cookies.entry(name.to_owned()).or_insert_with(|| {
            self.names.push(name.to_owned());
            next
        })
    }
}

fn points_of(symbols: Vec<&crate::symbols::Symbol>) -> Vec<(u64, u64, String)> {
    symbols
        .into_iter()
        .map(|s| (s.file_offset, s.size, s.name.clone()))
        .collect()
}

async fn watch(
    config: WatchConfig,
    mut planner: Planner,
    requests: Vec<AttachRequest>,
    watched: Watched,
    started: Instant,
) -> anyhow::Result<Outcome> {
    // Handlers first: a Ctrl-C during attach must still end in a detach.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;

    let stdout = io::stdout().lock();
    let mut sink: Box<dyn Sink> = match config.output {
        Output::Json => Box::new(JsonSink::new(io::BufWriter::new(stdout))),
        Output::Text => Box::new(TextSink::new(io::LineWriter::new(stdout))),
    };

    // Room for every function in every process we may see; --binary and
    // --name may bring processes we do not know of yet.
    let later = if watched.binary.is_some() || !watched.names.is_empty() {
        256
    } else {
        0
    };
    let slots = planner.names.len().max(1) * (watched.pids.len() + later);
    let mut probes = Probes::load(slots.clamp(1024, 1 << 20) as u32)?;
    for request in &requests {
        if let Err(err) = probes.attach(request) {
            return Err(attach_failure(err, request, &watched.pids));
        }
    }
    if let Some(gone) = watched.pids.iter().find(|p| !p.is_alive()) {
        return Err(RunError::TargetGone { pid: gone.pid }.into());
    }
    log::info!(
        "attached {} function(s) via {}",
        probes.attached(),
        probes.mode().as_str()
    );

    let mut sampler = Sampler::new(
        planner.names.clone(),
        watched,
        Detector::new(config.rules.clone()),
    );
    sampler.set_ranges(&planner.ranges);
    apply_key_configs(&config, &planner.names, &mut probes, &mut sampler)?;
    let attach_seconds = started.elapsed().as_secs_f64();
    let records: Vec<Record> = requests
        .iter()
        .map(|r| attached_record(r, &planner.names, &sampler, &probes, attach_seconds))
        .collect();
    let mut stop = deliver(&mut *sink, &records)?;

    let mut windows = Windows::new(config.max_overhead);
    let deadline = config.duration.map(|d| tokio::time::Instant::now() + d);
    let mut ticks = interval_at(
        tokio::time::Instant::now() + config.interval,
        config.interval,
    );
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while matches!(stop, Stop::Done) {
        let until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let window_end = windows.end;
        let until_window_end = async {
            match window_end {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let last = tokio::select! {
            _ = ticks.tick() => false,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            // The last, partial interval still counts.
            () = until_deadline => true,
            () = until_window_end => {
                windows.close(&mut probes);
                continue;
            }
        };
        let probed = windows.probed_share();
        let tick = sampler.tick(&mut probes, probed)?;
        stop = deliver(&mut *sink, &tick.records)?;
        if !last && let Some(record) = windows.plan(&mut probes, tick.hit_rate, config.interval)? {
            stop = deliver(&mut *sink, &[record])?;
        }
        if tick.loop_found && config.fail_on_loop && matches!(stop, Stop::Done) {
            stop = Stop::Loop;
        } else if last || tick.all_gone {
            break;
        }
        if !config.names.is_empty() && matches!(stop, Stop::Done) {
            let records = attach_new_named(&config, &mut planner, &mut probes, &mut sampler);
            stop = deliver(&mut *sink, &records)?;
        }
    }

    let dropped = probes.dropped();
    let functions = probes.attached();
    let detach = probes.detach();
    let summary = sampler.summary(dropped);
    let detached = Record::Detached {
        ts: unix_now(),
        functions,
        detach_seconds: detach.as_secs_f64(),
        never_called: summary.silent.clone(),
    };
    if !matches!(stop, Stop::BrokenPipe) {
        let written = sink.emit(&detached).and_then(|()| sink.finish(&summary));
        if let Err(e) = written {
            write_failure(e)?;
        }
    }
    let _ = io::stdout().flush();
    Ok(match stop {
        Stop::Loop => Outcome::LoopFound,
        Stop::Done | Stop::BrokenPipe => Outcome::Finished,
    })
}

/// The overhead governor's probe windows: when probing throughout would
/// cost a target more than `--max-overhead`, the probes go in at each tick
/// and come out after the governor's share of the interval.
struct Windows {
    budget: f64,
    /// Created once hits are frequent enough to need it: it measures the
    /// cost of a hit first (a few milliseconds).
    governor: Option<Governor>,
    /// When the probes went in (None: out).
    since: Option<Instant>,
    /// Probed time and wall time since the last tick.
    probed: std::time::Duration,
    tick_at: Instant,
    /// When the probes come out in this interval.
    end: Option<Instant>,
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
            probed: std::time::Duration::ZERO,
            tick_at: now,
            end: None,
        }
    }

    /// Share of the interval now ending that the probes were in; starts
    /// the next.
    fn probed_share(&mut self) -> f64 {
        let now = Instant::now();
        if let Some(since) = self.since {
            self.probed += now - since;
            self.since = Some(now);
        }
        let wall = now - std::mem::replace(&mut self.tick_at, now);
        let share = self.probed.as_secs_f64() / wall.as_secs_f64().max(1e-6);
        self.probed = std::time::Duration::ZERO;
        share.min(1.0)
    }

    /// The window is over: probes out until the next tick.
    fn close(&mut self, probes: &mut Probes) {
        probes.pause();
        if let Some(since) = self.since.take() {
            self.probed += since.elapsed();
        }
        self.end = None;
    }

    /// After a tick: asks the governor about the next interval and puts the
    /// probes in (for a window, or throughout). Returns a record when the
    /// plan changed.
    fn plan(
        &mut self,
        probes: &mut Probes,
        hit_rate: f64,
        interval: std::time::Duration,
    ) -> anyhow::Result<Option<Record>> {
        if self.budget >= 1.0 {
            return Ok(None);
        }
        if self.governor.is_none() && hit_rate * WORST_HIT_COST > self.budget {
            match probes.calibrate() {
                Ok(cost) => {
                    log::info!("one probe hit costs {cost:?} here");
                    self.governor = Some(Governor::new(self.budget, cost.as_secs_f64()));
                }
                Err(e) => {
                    log::warn!(
                        "cannot measure the cost of a probe hit ({e}); --max-overhead is off"
                    );
                    self.budget = 1.0;
                }
            }
        }
        let Some(governor) = &mut self.governor else {
            return Ok(None);
        };
        let plan = governor.observe(hit_rate);
        let exposure = governor.exposure();
        if self.since.is_none() {
            probes.resume().context("cannot put the probes back in")?;
            self.since = Some(Instant::now());
        }
        self.end = (exposure < 1.0).then(|| Instant::now() + interval.mul_f64(exposure));
        Ok(plan.map(|p| Record::Governor {
            ts: unix_now(),
            probed_percent: report::round1(p.exposure * 100.0),
            full_overhead_percent: report::round1(p.full_overhead * 100.0),
            max_overhead_percent: self.budget * 100.0,
            probe_cost_us: report::round1(governor.cost() * 1e6),
        }))
    }
}

/// `--name`: probes processes of those names that started since the last
/// interval (a restart, a new worker). Returns their `attached` records.
fn attach_new_named(
    config: &WatchConfig,
    planner: &mut Planner,
    probes: &mut Probes,
    sampler: &mut Sampler,
) -> Vec<Record> {
    let started = Instant::now();
    let mut records = Vec::new();
    for process in target::processes_named(&config.names) {
        if sampler.is_watching(process.pid) {
            continue;
        }
        let requests = match planner.requests(&Planner::process_files(&process), false, "") {
            Ok(requests) => requests,
            Err(e) => {
                log::warn!("cannot probe new pid {}: {e:#}", process.pid);
                continue;
            }
        };
        let attached = requests.iter().try_for_each(|r| probes.attach(r));
        if let Err(e) = attached {
            log::warn!("cannot probe new pid {}: {e:#}", process.pid);
            probes.forget_process(process.pid);
            continue;
        }
        sampler.set_names(&planner.names);
        sampler.set_ranges(&planner.ranges);
        if let Err(e) = apply_key_configs(config, &planner.names, probes, sampler) {
            log::warn!("keys of new pid {} will not be read: {e:#}", process.pid);
        }
        sampler.adopt(process);
        let seconds = started.elapsed().as_secs_f64();
        records.extend(
            requests
                .iter()
                .map(|r| attached_record(r, &planner.names, sampler, probes, seconds)),
        );
    }
    records
}

/// How to read each function's key: the preset's spec for its functions,
/// `--key-arg` for the rest (requests have none).
fn key_config(config: &WatchConfig, name: &str) -> Option<KeyConfig> {
    if let Some((_, spec)) = config.preset_keys.iter().find(|(f, _)| *f == name) {
        return Some(match *spec {
            KeySpec::Str(arg) => KeyConfig {
                kind: KEY_STR,
                arg,
                ..KeyConfig::default()
            },
            KeySpec::RedisObject(arg) => KeyConfig {
                kind: KEY_STR_AT,
                arg,
                offset: 8,
                ..KeyConfig::default()
            },
        });
    }
    config.key_arg.map(|k| KeyConfig {
        kind: if k.string { KEY_STR } else { KEY_U64 },
        arg: k.index,
        ..KeyConfig::default()
    })
}

/// Tells the kernel and the sampler what each function is: its key, and
/// whether it is a request.
fn apply_key_configs(
    config: &WatchConfig,
    names: &[String],
    probes: &mut Probes,
    sampler: &mut Sampler,
) -> Result<(), ProbeError> {
    let is_request: Vec<bool> = names
        .iter()
        .map(|n| config.request_patterns.iter().any(|p| p.matches(n)))
        .collect();
    sampler.set_request_funcs(&is_request, config.rules.factor);
    let mut string_keys = Vec::with_capacity(names.len());
    for (func, name) in names.iter().enumerate() {
        let key = key_config(config, name).filter(|_| !is_request[func]);
        string_keys.push(key.is_some_and(|k| k.kind != KEY_U64));
        if let Some(key) = key {
            probes.set_key_config(func as u32, key)?;
        }
    }
    sampler.set_key_kinds(&string_keys, config.show_keys);
    Ok(())
}

fn attached_record(
    request: &AttachRequest,
    names: &[String],
    sampler: &Sampler,
    probes: &Probes,
    attach_seconds: f64,
) -> Record {
    Record::Attached {
        ts: unix_now(),
        pid: request.pid,
        ns_pid: request.pid.and_then(|pid| sampler.process(pid)?.ns_pid),
        path: request.shown.display().to_string(),
        functions: request
            .points
            .iter()
            .map(|&(_, cookie)| names[cookie as usize].clone())
            .collect(),
        mode: probes.mode().as_str(),
        attach_seconds,
    }
}

fn deliver(sink: &mut dyn Sink, records: &[Record]) -> anyhow::Result<Stop> {
    let written = records
        .iter()
        .try_for_each(|r| sink.emit(r))
        .and_then(|()| sink.end_tick());
    match written {
        Ok(()) => Ok(Stop::Done),
        Err(e) => write_failure(e),
    }
}

/// A closed stdout ends the run quietly; any other write error fails it.
fn write_failure(err: io::Error) -> anyhow::Result<Stop> {
    if err.kind() == io::ErrorKind::BrokenPipe {
        Ok(Stop::BrokenPipe)
    } else {
        Err(anyhow::Error::new(err).context("cannot write the report to stdout"))
    }
}

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
