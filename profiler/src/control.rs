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

use crate::{
    catalog::Catalog,
    collect::Collector,
    config::WatchConfig,
    governor::Governor,
    plan::{FileTarget, Planner},
    probes::{AttachMode, AttachRequest, MAX_FUNCTIONS, ProbeError, Probes},
    report::{self, Record, unix_now},
    snapshot::Snapshot,
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

pub struct Controller {
    probes: Probes,
    planner: Planner,
    catalog: Arc<Catalog>,
    /// Functions whose key configuration the kernel has.
    keyed: usize,
    live: BTreeMap<u32, Process>,
    binary: Option<Binary>,
    names: Vec<String>,
    windows: Windows,
    collector: Collector,
    started: Instant,
    /// `--name` processes that could not be probed, by (pid, start time):
    /// said once, not tried again each tick.
    failed: std::collections::HashSet<(u32, u64)>,
}

impl Controller {
    /// Finds the targets, plans, loads and attaches. Returns the controller
    /// and the `attached` records. Bad input is refused before anything is
    /// attached.
    pub fn start(config: &WatchConfig, started: Instant) -> anyhow::Result<(Self, Vec<Record>)> {
        if !target::has_bpf_privileges() {
            return Err(RunError::NoPrivileges.into());
        }
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

        let mut planner = Planner::new(config);
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
            requests.extend(planner.requests(&FileTarget::of_process(p), true, &hint)?);
        }
        let catalog = planner.catalog();

        // Room for every function in every process we may see; --binary and
        // --name may bring processes we do not know of yet.
        let later = if binary.is_some() || !config.names.is_empty() {
            256
        } else {
            0
        };
        let slots = catalog.len().max(1) * (processes.len() + later);
        let mut probes = Probes::load(slots.clamp(1024, 1 << 20) as u32)?;
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
        let running = binary.iter().flat_map(Binary::processes);
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
            names: config.names.clone(),
            windows: Windows::new(config.max_overhead),
            collector: Collector::new(started),
            started,
            failed: std::collections::HashSet::new(),
        };
        controller
            .apply_keys()
            .context("cannot tell the kernel how to read keys")?;
        let attach_seconds = started.elapsed().as_secs_f64();
        let records = requests
            .iter()
            .map(|r| controller.attached_record(r, attach_seconds))
            .collect();
        Ok((controller, records))
    }

    pub fn mode(&self) -> AttachMode {
        self.probes.mode()
    }

    /// The catalog as it stands: a new `Arc` whenever functions were added.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.clone()
    }

    /// One tick's reading.
    pub fn collect(&mut self) -> Result<Snapshot, ProbeError> {
        let probed = self.windows.probed_share();
        self.collector.read_kernel(&mut self.probes)?;
        self.discover();
        Ok(self
            .collector
            .snapshot(&self.probes, &self.catalog, &self.live, probed))
    }

    /// With `--binary`, processes that started running the file since the
    /// last tick show up as counters of unknown pids.
    fn discover(&mut self) {
        let Some(binary) = &self.binary else {
            // Only --pid (and --name, attached by name): counts of other
            // processes (possible when the kernel's pid filter cannot be
            // used) are ignored.
            return;
        };
        let new: Vec<u32> = self
            .collector
            .counted_pids()
            .filter(|pid| !self.live.contains_key(pid))
            .collect();
        for pid in new {
            if binary.runs(pid)
                && let Ok(process) = Process::from_pid(pid)
            {
                self.live.insert(pid, process);
            }
        }
    }

    /// After a tick was judged: lets `exited` processes go, plans the next
    /// probe window (unless this was the `last` tick) and, with `follow`,
    /// attaches processes that started under a watched `--name`. Returns
    /// the records of what it did.
    pub fn after_tick(
        &mut self,
        exited: &[u32],
        hit_rate: f64,
        interval: Duration,
        last: bool,
        follow: bool,
    ) -> anyhow::Result<Vec<Record>> {
        for &pid in exited {
            self.live.remove(&pid);
            self.collector.forget(pid);
            self.probes.forget_process(pid);
        }
        let mut records = Vec::new();
        if !last {
            records.extend(self.windows.plan(&mut self.probes, hit_rate, interval)?);
        }
        if follow && !self.names.is_empty() {
            records.extend(self.attach_new_named());
        }
        Ok(records)
    }

    /// No watched process is left, and none can come (no `--binary`, no
    /// `--name`).
    pub fn all_gone(&self) -> bool {
        self.binary.is_none() && self.names.is_empty() && self.live.is_empty()
    }

    /// When the current probe window ends, if the probes are windowed.
    pub fn window_end(&self) -> Option<Instant> {
        self.windows.end
    }

    /// The window is over: probes out until the next tick.
    pub fn close_window(&mut self) {
        self.windows.close(&mut self.probes);
    }

    /// Detaches everything. Returns the `detached` record's numbers:
    /// functions, how long the kernel took.
    pub fn finish(self) -> (usize, Duration) {
        let functions = self.probes.attached();
        let detach = self.probes.detach();
        (functions, detach)
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// `--name`: probes processes of those names that started since the
    /// last tick (a restart, a new worker).
    fn attach_new_named(&mut self) -> Vec<Record> {
        let started = Instant::now();
        let mut records = Vec::new();
        self.failed.retain(|&(pid, _)| target::is_running(pid));
        for process in target::processes_named(&self.names) {
            let id = (process.pid, process.start_time);
            if self.live.contains_key(&process.pid) || self.failed.contains(&id) {
                continue;
            }
            let pid = process.pid;
            let failed = |e: anyhow::Error| Record::Warning {
                ts: unix_now(),
                pid: Some(pid),
                kind: "attach_failed".to_owned(),
                message: format!("cannot probe new pid {pid}: {e:#}"),
                count: None,
            };
            let requests = match self
                .planner
                .requests(&FileTarget::of_process(&process), false, "")
            {
                Ok(requests) => requests,
                Err(e) => {
                    records.push(failed(e));
                    self.failed.insert(id);
                    continue;
                }
            };
            let attached = requests.iter().try_for_each(|r| self.probes.attach(r));
            if let Err(e) = attached {
                records.push(failed(e.into()));
                self.failed.insert(id);
                self.probes.forget_process(pid);
                continue;
            }
            self.catalog = self.planner.catalog();
            if let Err(e) = self.apply_keys() {
                records.push(Record::Warning {
                    ts: unix_now(),
                    pid: Some(pid),
                    kind: "keys_unavailable".to_owned(),
                    message: format!(
                        "keys of new pid {pid} will not be read: {:#}",
                        anyhow::Error::from(e)
                    ),
                    count: None,
                });
            }
            self.live.insert(pid, process);
            let seconds = started.elapsed().as_secs_f64();
            records.extend(requests.iter().map(|r| self.attached_record(r, seconds)));
        }
        records
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
        Record::Attached {
            ts: unix_now(),
            pid: request.pid,
            ns_pid: request.pid.and_then(|pid| self.live.get(&pid)?.ns_pid),
            path: request.shown.display().to_string(),
            functions: request
                .points
                .iter()
                .map(|&(_, id)| self.catalog.name(id))
                .collect(),
            mode: self.probes.mode().as_str().to_owned(),
            attach_seconds,
        }
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
    probed: Duration,
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
            probed: Duration::ZERO,
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
        self.probed = Duration::ZERO;
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
    /// probes in (for a window, or throughout). Returns records when the
    /// plan changed or calibration failed.
    fn plan(
        &mut self,
        probes: &mut Probes,
        hit_rate: f64,
        interval: Duration,
    ) -> anyhow::Result<Vec<Record>> {
        if self.budget >= 1.0 {
            return Ok(Vec::new());
        }
        let mut records = Vec::new();
        if self.governor.is_none() && hit_rate * WORST_HIT_COST > self.budget {
            match probes.calibrate() {
                Ok(cost) => {
                    log::info!("one probe hit costs {cost:?} here");
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
            return Ok(records);
        };
        let plan = governor.observe(hit_rate);
        let exposure = governor.exposure();
        if self.since.is_none() {
            probes.resume().context("cannot put the probes back in")?;
            self.since = Some(Instant::now());
        }
        self.end = (exposure < 1.0).then(|| Instant::now() + interval.mul_f64(exposure));
        records.extend(plan.map(|p| Record::Governor {
            ts: unix_now(),
            probed_percent: report::round1(p.exposure * 100.0),
            full_overhead_percent: report::round1(p.full_overhead * 100.0),
            max_overhead_percent: self.budget * 100.0,
            probe_cost_us: report::round1(governor.cost() * 1e6),
        }));
        Ok(records)
    }
}
