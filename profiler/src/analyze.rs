//! The analyzer: a pure function of (catalog, snapshot, settings) to typed
//! events. Live, it runs on the control thread right after each reading;
//! `replay` runs the very same code over a recording, which is why it makes
//! no system call and takes time only from the snapshots.
//!
//! Each snapshot's cumulative counters are diffed against the previous one
//! into calls per (process, function); those become rates (calls per probed
//! second), the detector's verdicts, and the structural evidence behind
//! them (call cycles, repeating keys, the hottest stack). Names, key texts
//! and symbols are the enricher's business: events carry ids.

use std::collections::{BTreeMap, BTreeSet};

// foldhash, not std's SipHash: these maps are walked and updated for every
// function, call site and key at each reading (a quarter of the loader's CPU
// with SipHash at 1000 functions). Seeded per process, as std's is.
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};

use crate::{
    catalog::{Catalog, FileId},
    cycles,
    detect::{
        self, ALL_FUNCTIONS, Detector, Learned, LoopVerdict, Recovery, Rules, SeriesKey, Signals,
    },
    report::{Health, round1},
    snapshot::{Glance, ProcessFacts, Snapshot, since},
};

/// The analyzer's settings: the detector's rules (every one a flag of
/// `watch` and of `replay`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    pub rules: Rules,
}

/// Keys shown in a loop record.
const TOP_KEYS: usize = 5;
/// "A few keys": the busiest this many.
const FEW_KEYS: usize = 8;
/// Warn once the counter map is this full.
const MAP_PRESSURE: f64 = 0.9;

/// A key counted in a loop: text keys are told from integer keys, since a
/// text key's hash is not its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyRef {
    pub text: bool,
    pub hash: u64,
}

impl KeyRef {
    /// A text key longer than the kernel hashes in full.
    pub fn truncated(self) -> bool {
        self.text && self.hash & profiler_common::KEY_TRUNCATED != 0
    }
}

/// The hottest stack of a loop's functions, to be symbolized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackRef {
    pub pid: u32,
    pub stack_id: u32,
    /// The busiest call site's return address: a frame-pointer walk from a
    /// function's first instruction skips the immediate caller.
    pub caller: Option<u64>,
}

/// A loop confirmed in one process this tick (its functions together).
#[derive(Clone, Debug, PartialEq)]
pub struct LoopEvent {
    pub pid: u32,
    pub verdicts: Vec<LoopVerdict>,
    pub target: Option<Health>,
    /// The functions in the loop.
    pub functions: Vec<u32>,
    /// With a loop spread over the processes of one name: all of them.
    pub processes: Vec<u32>,
    /// Function ids in call order.
    pub cycle: Option<Vec<u32>>,
    /// Keys in the order one thread walked them, from where traffic
    /// enters the cycle.
    pub key_cycle: Option<Vec<KeyRef>>,
    /// Busiest first, counts scaled to the interval like the calls.
    pub top_keys: Vec<(KeyRef, u64)>,
    /// A few keys carry the calls.
    pub repeating: bool,
    pub stack: Option<StackRef>,
}

/// Something worth a record.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Sample {
        pid: u32,
        ns_pid: Option<u32>,
        func: u32,
        calls: u64,
        rate: f64,
        baseline: Option<f64>,
        estimated: bool,
    },
    Health {
        pid: u32,
        health: Health,
    },
    Loop(Box<LoopEvent>),
    Recovered(Recovery),
    TargetExit {
        pid: u32,
    },
    /// Hits the kernel could not count in this interval.
    Dropped {
        count: u64,
    },
    /// Every interval: what the kernel could not count, and how full the
    /// counter map is.
    Interval {
        dropped: u64,
        /// Key and call-site entries of live processes the kernel's LRU
        /// maps let go in this interval (their counts start over).
        evicted: u64,
        counters: u32,
        capacity: u32,
    },
    /// The first eviction from the key or call-site maps: those statistics
    /// are now the recent ones, not the whole run's.
    Evicted {
        count: u64,
    },
    /// The counter map is nearly full.
    MapPressure {
        used: usize,
        capacity: u32,
    },
}

/// One tick's outcome.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Output {
    pub ts: f64,
    pub events: Vec<Event>,
    /// At least one loop was confirmed.
    pub loop_found: bool,
    /// The busiest process's probe hits per probed second (for the
    /// overhead governor).
    pub hit_rate: f64,
}

/// Invalidations per request, per process.
#[derive(Debug, Default)]
struct Requests {
    /// Learned invalidations per request, per pid.
    baseline: HashMap<u32, f64>,
    /// How many times its baseline the ratio must reach for a rise in
    /// invalidations to be more than traffic (half the rate factor: requests
    /// can grow a little with a loop's side effects).
    factor: f64,
}

/// One interval's invalidations per request in one process.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PerRequest {
    requests_rate: f64,
    /// `None` when nothing was served nor invalidated: no ratio to speak of.
    ratio: Option<f64>,
    /// The ratio did not rise: requests explain the invalidations.
    explained: bool,
    /// The ratio rose `factor` times over its learned value.
    risen: bool,
}

impl Requests {
    /// `None` without `--request-func`.
    fn observe(
        &mut self,
        pid: u32,
        calls: &[u64],
        is_request: &[bool],
        seconds: f64,
    ) -> Option<PerRequest> {
        if !is_request.iter().any(|&r| r) {
            return None;
        }
        let (mut requests, mut invalidations) = (0u64, 0u64);
        for (func, &n) in calls.iter().enumerate() {
            if is_request.get(func).copied().unwrap_or(false) {
                requests += n;
            } else {
                invalidations += n;
            }
        }
        let requests_rate = requests as f64 / seconds;
        if requests == 0 && invalidations == 0 {
            return Some(PerRequest {
                requests_rate,
                ratio: None,
                explained: true,
                risen: false,
            });
        }
        let ratio = invalidations as f64 / requests.max(1) as f64;
        let (explained, risen) = match self.baseline.get(&pid) {
            // The same capped learning as the rate baseline: calm readings
            // only, rising by at most a fifth of itself a second.
            Some(&base) => {
                let risen = ratio >= self.factor * base.max(0.01);
                if !risen {
                    let w = 1.0 - 0.8f64.powf(seconds);
                    let step = (ratio - base).min(base.max(0.01));
                    self.baseline.insert(pid, base + w * step);
                }
                (!risen, risen)
            }
            None => {
                self.baseline.insert(pid, ratio);
                (false, false)
            }
        };
        Some(PerRequest {
            requests_rate,
            ratio: Some(ratio),
            explained,
            risen,
        })
    }
}

/// Diffs cumulative counters: the calls since the previous reading. A
/// counter that went backwards (its entry was removed and made again) counts
/// from zero; one that is missing reads as zero.
#[derive(Debug)]
struct Deltas<K> {
    last: HashMap<K, u64>,
}

impl<K> Default for Deltas<K> {
    fn default() -> Self {
        Self {
            last: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Copy> Deltas<K> {
    fn advance(&mut self, key: K, now: u64) -> u64 {
        // A counter at zero that never read otherwise holds nothing: most
        // watched functions are never called.
        if now == 0 && !self.last.contains_key(&key) {
            return 0;
        }
        since(self.last.insert(key, now).unwrap_or(0), now)
    }

    fn forget(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.last.retain(|k, _| keep(k));
    }
}

/// Inserts into a map of what ended processes left, bounded by
/// [`MAX_INHERITED`]: a new key makes room by dropping the entry that
/// ended longest ago (`ended` reads when).
fn insert_bounded<K: std::hash::Hash + Eq + Clone, V>(
    map: &mut HashMap<K, V>,
    key: K,
    value: V,
    ended: impl Fn(&V) -> f64,
) {
    if map.len() >= MAX_INHERITED && !map.contains_key(&key) {
        let oldest = map
            .iter()
            .min_by(|a, b| ended(a.1).total_cmp(&ended(b.1)))
            .map(|(k, _)| k.clone());
        if let Some(oldest) = oldest {
            map.remove(&oldest);
        }
    }
    map.insert(key, value);
}

/// The most (process, function) totals the summary keeps for processes
/// that are gone.
const MAX_TOTALS: usize = 4096;

/// Per-series totals for the summary.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    calls: u64,
    peak_rate: f64,
}

/// What the run saw, in ids.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub seconds: f64,
    pub functions: usize,
    pub processes: usize,
    /// (pid, function, total calls, peak rate), busiest first.
    pub busiest: Vec<(u32, u32, u64, f64)>,
    /// (pid, functions) of every loop confirmed.
    pub loops: Vec<(u32, Vec<u32>)>,
    /// Functions that never fired.
    pub silent: Vec<u32>,
    pub dropped: u64,
}

pub struct Analyzer {
    detector: Detector,
    requests: Requests,
    counts: Deltas<(u32, u32)>,
    /// Call sites, keys, key transitions and stacks: the last cumulative
    /// counts of the entries the kernel holds (its LRU maps bound them).
    call_sites: HashMap<(u32, u32, u64), u64>,
    /// The reading before's `call_sites`, emptied, for the next reading.
    spare_sites: HashMap<(u32, u32, u64), u64>,
    keys: HashMap<(u32, u32, u64), u64>,
    key_edges: HashMap<(u32, u32, u64, u64), u64>,
    stacks: HashMap<(u32, u32, u32), u64>,
    /// This reading's calls per (pid, function), for naming a sum's loop.
    reading_calls: HashMap<(u32, u32), u64>,
    /// Per series, the keys dropped in the last seconds and when.
    recent_keys: HashMap<SeriesKey, HashMap<u64, f64>>,
    /// Each process's last call cycle and key cycle, and when: the reading
    /// that confirms a loop may miss what the ones before it saw.
    last_cycles: HashMap<u32, (Vec<u32>, f64)>,
    last_key_cycles: HashMap<u32, (Vec<KeyRef>, f64)>,
    /// Stack samples and call-site calls of the last seconds, decaying.
    recent_stacks: HashMap<(u32, u32, u32), f64>,
    recent_sites: HashMap<(u32, u32, u64), f64>,
    /// CPU time of each live process at its last reading, nanoseconds.
    cpu: HashMap<u32, u64>,
    /// Learned CPU, in cores, from readings with nothing suspect: of each
    /// process's busiest thread, and of each group's processes summed (by
    /// group id).
    cpu_baseline: HashMap<u32, f64>,
    /// The processes of the last snapshot, by pid, with their start time,
    /// executable and name.
    live: BTreeMap<u32, (u64, FileId)>,
    comms: HashMap<u32, String>,
    /// What series of exited processes learned, by (process name, function
    /// name): a restart starts from it. Bounded.
    inherited: HashMap<(String, String), (Learned, f64)>,
    /// Per process name, how many of the first catalog functions the last
    /// process of that name never called but had learned (a zero
    /// baseline), and when it ended: one entry, not one per function.
    inherited_quiet: HashMap<String, (u32, HashSet<u32>, f64)>,
    /// Series whose loop was reported (their recovery will be too), with
    /// the pid their records name (a group's: its busiest process).
    announced: HashMap<SeriesKey, u32>,
    /// Ids of process-name groups, as the pid of their series (above any
    /// pid the kernel gives out).
    groups: HashMap<String, u32>,
    /// The reporting period being summed up (samples go out when a
    /// snapshot closes it).
    period: Period,
    /// How many processes were seen (an exec is the same process).
    seen: usize,
    totals: HashMap<SeriesKey, Totals>,
    /// Functions that fired in processes whose totals were let go (see
    /// [`Analyzer::forget_state`]): not silent.
    fired_funcs: HashSet<u32>,
    /// Series that fired since their process (or its program) began.
    fired: HashSet<SeriesKey>,
    loops: Vec<(u32, Vec<u32>)>,
    functions: usize,
    dropped: u64,
    pressure_warned: bool,
    /// Key and call-site entries of live processes that vanished from the
    /// kernel's LRU maps, over the run.
    evicted: u64,
    evictions_warned: bool,
    elapsed: f64,
    /// Scratch: this snapshot's counters by (func, pid), and this
    /// reading's calls per function of one process.
    by_key: HashMap<(u32, u32), u64>,
    /// Scratch: the calls in this snapshot's fresh part, by (func, pid).
    fresh_calls: HashMap<(u32, u32), u64>,
    calls: Vec<u64>,
    is_request: Vec<bool>,
    /// By function: picked for its heat (see `discover.rs`).
    is_hot_pick: Vec<bool>,
    /// By function: left out of its process's sum (picked for heat, or
    /// interpreted: both join the catalog mid-run, one by one, and would
    /// read as the sum running away).
    unsummed: Vec<bool>,
    /// What [`Analyzer::quiet`] holds a glance to, as of the last reading:
    /// per process, the least rate each function (by catalog index) and
    /// their sum could be judged a runaway at
    /// ([`Detector::alarm_rate`]); the same per name group, by name; and
    /// whether some series was in a loop or suspect.
    alarms: HashMap<u32, Alarms>,
    group_alarms: HashMap<String, f64>,
    hold: bool,
}

/// A process's alarm rates (see `Analyzer::alarms`).
#[derive(Debug, Default)]
struct Alarms {
    funcs: Vec<f64>,
    all: f64,
}

/// A glance is quiet while every rate in it stays under this share of the
/// rate it could be judged a runaway at, and the CPU under this share of a
/// loop's core: the margin keeps a loop starting between two glances from
/// going unread.
const GLANCE_MARGIN: f64 = 0.5;

/// What a reporting period summed so far.
#[derive(Debug, Default)]
struct Period {
    /// Calls (scaled to the period like the samples), probed seconds,
    /// peak reading rate, per series.
    series: HashMap<SeriesKey, (u64, f64)>,
    seconds: f64,
    estimated: bool,
    /// CPU nanoseconds used and the seconds they were measured over, per
    /// pid.
    cpu: HashMap<u32, (u64, f64)>,
    /// Requests and invalidations (with `--request-func`) per pid.
    requests: HashMap<u32, (u64, u64, f64)>,
    dropped: u64,
    evicted: u64,
}

/// A part of a reading, judged on its own. A reading that folded in
/// readings let go (`Snapshot::fresh`) is judged as two, as if they had
/// been read apart: the part up to the last glance that let one go (calm
/// by that glance, which the detector learns) and its fresh part, each on
/// its own calls, seconds and CPU. A burst in the fresh part is then
/// neither diluted by the quiet seconds before it nor credited with them.
/// Otherwise the reading is one part.
#[derive(Clone, Copy, Debug)]
struct Part {
    kind: PartKind,
    /// Seconds of it, and those the probes were in: rates are over these.
    seconds: f64,
    window: f64,
    /// The process's CPU in it, and its busiest thread's, in cores.
    cores: Option<f64>,
    thread_cores: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum PartKind {
    Whole,
    Quiet,
    Fresh,
}

impl Part {
    /// The parts of `process`'s reading in `snap`, with `cores` and
    /// `thread_cores` over the whole of it, `window` of its seconds probed.
    fn of(
        snap: &Snapshot,
        process: &ProcessFacts,
        cores: Option<f64>,
        thread_cores: Option<f64>,
        window: f64,
    ) -> Vec<Self> {
        let seconds = snap.seconds.max(1e-3);
        let whole = Self {
            kind: PartKind::Whole,
            seconds,
            window,
            cores,
            thread_cores,
        };
        let Some(fresh) = &snap.fresh else {
            return vec![whole];
        };
        let f = fresh.seconds.clamp(1e-3, seconds);
        let q = seconds - f;
        // Readings are let go only while the probes are in throughout.
        if q < 1e-3 || snap.probed < 1.0 {
            return vec![whole];
        }
        let at = fresh.processes.iter().find(|p| p.pid == process.pid);
        let per = |nanos: u64, s: f64| nanos as f64 / (s * 1e9);
        let (q_cores, f_cores) = match (
            at.and_then(|a| a.cpu_start),
            at.and_then(|a| a.cpu_nanos),
            process.cpu_nanos,
        ) {
            (Some(b), Some(a), Some(n)) => (
                Some(per(a.saturating_sub(b), q)),
                Some(per(n.saturating_sub(a), f)),
            ),
            _ => (cores, cores),
        };
        let part = |kind, s: f64, cores: Option<f64>, hot: Option<u64>| Self {
            kind,
            seconds: s,
            window: s,
            cores,
            thread_cores: hot.map(|n| per(n, s)).or(cores),
        };
        vec![
            part(
                PartKind::Quiet,
                q,
                q_cores,
                at.and_then(|a| a.hot_thread_before),
            ),
            part(
                PartKind::Fresh,
                f,
                f_cores,
                at.and_then(|a| a.hot_thread_nanos),
            ),
        ]
    }

    /// Calls in this part, of a function (or sum) with `whole` calls in
    /// the reading and `fresh` in its fresh part.
    fn calls(&self, whole: u64, fresh: u64) -> u64 {
        match self.kind {
            PartKind::Whole => whole,
            PartKind::Quiet => whole.saturating_sub(fresh),
            PartKind::Fresh => fresh.min(whole),
        }
    }

    fn rate(&self, whole: u64, fresh: u64) -> f64 {
        self.calls(whole, fresh) as f64 / self.window.max(1e-3)
    }

    /// A series' `signals` for this part: its CPU and invalidations per
    /// request; in a quiet part, no structure (its call sites span the
    /// whole reading: see [`Signals::no_evidence`]).
    fn signals(&self, signals: Signals, requests: Option<PerRequest>) -> Signals {
        let signals = Signals {
            cpu: self.thread_cores,
            explained_by_requests: requests.is_some_and(|r| r.explained),
            per_request_risen: requests.is_some_and(|r| r.risen),
            ..signals
        };
        if self.kind != PartKind::Quiet {
            return signals;
        }
        Signals {
            call_cycle: false,
            key_cycle: 0.0,
            cycle_dominance: 0.0,
            top_share: None,
            reinvalidation: None,
            no_evidence: true,
            ..signals
        }
    }
}

/// What the processes of one name did together in a reading.
#[derive(Debug, Default)]
struct GroupSum {
    calls: u64,
    /// Per part of the reading ([`Part`]): its calls and CPU summed.
    parts: Vec<(Part, u64, Option<f64>)>,
    window: f64,
    /// (pid, calls), in pid order.
    pids: Vec<(u32, u64)>,
    /// Cores summed over the processes; None when any is unknown.
    cpu: Option<f64>,
    looping: bool,
    /// A series of one of them was suspect.
    suspect: bool,
    explained: bool,
    risen: bool,
}

/// A process's cycle seen within the last [`CYCLE_MEMORY_SECONDS`].
fn recent<T: Clone>(last: &HashMap<u32, (T, f64)>, pid: u32, now: f64) -> Option<T> {
    last.get(&pid)
        .filter(|(_, at)| now - at <= CYCLE_MEMORY_SECONDS)
        .map(|(c, _)| c.clone())
}

/// How long a cycle seen stays evidence for a verdict.
const CYCLE_MEMORY_SECONDS: f64 = 2.0;

/// Moves a learned CPU (cores) toward `cores` by the rules' default weight
/// per second.
fn learn_cpu(baselines: &mut HashMap<u32, f64>, id: u32, cores: f64, seconds: f64) {
    let w = 1.0 - (1.0 - Rules::default().alpha).powf(seconds);
    let b = baselines.entry(id).or_insert(cores);
    *b += w * (cores - *b);
}

/// Process-name groups are series with a pid from here up: the kernel's
/// pids stay under 2^22.
const GROUP_IDS: u32 = 0x8000_0000;

/// A function is named in a sum's loop when it makes at least this share of
/// the sum's calls in the confirming reading.
const CARRIES: f64 = 0.1;

/// A process inherits what a predecessor of its name learned only if that
/// one ended at most this long ago.
const INHERIT_SECONDS: f64 = 600.0;

/// Most (process name, function) baselines kept for restarts.
const MAX_INHERITED: usize = 4096;
/// A call-graph edge must carry this share of the callee's calls in a
/// reading to make a cycle: bounded recursion now and then does not.
const CALL_EDGE_SHARE: f64 = 0.1;
/// Keyed calls (or calls along a cycle) in a reading below which key
/// shares and cycles say nothing of a function.
const MIN_KEYED: u64 = 20;
/// A key dropped again within this many seconds is dropped again, not new.
const RECENT_KEYS_SECONDS: f64 = 3.0;
/// Keys remembered per series for that.
const MAX_RECENT_KEYS: usize = 65_536;

/// What the keys of one series said in a reading.
#[derive(Clone, Debug, Default)]
struct KeyStats {
    /// Busiest first.
    keys: Vec<(KeyRef, u64)>,
    /// Calls, and keys not seen in the last [`RECENT_KEYS_SECONDS`] before
    /// this reading, leaving out keys too long to hash in full (they may
    /// stand for several keys).
    keyed: u64,
    new_keys: u64,
}

impl KeyStats {
    fn top_share(&self, calls: u64) -> Option<f64> {
        (self.keyed >= MIN_KEYED).then(|| {
            let top: u64 = self
                .keys
                .iter()
                .filter(|(k, _)| !k.truncated())
                .take(FEW_KEYS)
                .map(|&(_, n)| n)
                .sum();
            top as f64 / calls.max(self.keyed) as f64
        })
    }

    /// 1 - new keys / keyed calls: near 0 when nearly every call drops a
    /// key not dropped lately (a mass expiry, a purge, a warm-up), near 1
    /// when the same keys come back (a loop, however many keys it walks).
    fn reinvalidation(&self) -> Option<f64> {
        (self.keyed >= MIN_KEYED).then(|| 1.0 - self.new_keys as f64 / self.keyed as f64)
    }
}

/// A process's key cycle in a reading.
#[derive(Clone, Debug)]
struct KeyCycleSeen {
    keys: Vec<KeyRef>,
    /// Transitions along the cycle per function.
    per_func: HashMap<u32, u64>,
}

impl Analyzer {
    pub fn new(settings: Settings) -> Self {
        let factor = settings.rules.factor / 2.0;
        Self {
            detector: Detector::new(settings.rules),
            requests: Requests {
                factor,
                ..Requests::default()
            },
            counts: Deltas::default(),
            call_sites: HashMap::new(),
            spare_sites: HashMap::new(),
            keys: HashMap::new(),
            key_edges: HashMap::new(),
            stacks: HashMap::new(),
            recent_stacks: HashMap::new(),
            reading_calls: HashMap::new(),
            recent_keys: HashMap::new(),
            last_cycles: HashMap::new(),
            last_key_cycles: HashMap::new(),
            recent_sites: HashMap::new(),
            cpu: HashMap::new(),
            cpu_baseline: HashMap::new(),
            live: BTreeMap::new(),
            comms: HashMap::new(),
            inherited: HashMap::new(),
            inherited_quiet: HashMap::new(),
            announced: HashMap::new(),
            groups: HashMap::new(),
            period: Period::default(),
            seen: 0,
            totals: HashMap::new(),
            fired_funcs: HashSet::new(),
            fired: HashSet::new(),
            loops: Vec::new(),
            functions: 0,
            dropped: 0,
            pressure_warned: false,
            evicted: 0,
            evictions_warned: false,
            elapsed: 0.0,
            by_key: HashMap::new(),
            fresh_calls: HashMap::new(),
            calls: Vec::new(),
            is_request: Vec::new(),
            is_hot_pick: Vec::new(),
            unsummed: Vec::new(),
            alarms: HashMap::new(),
            group_alarms: HashMap::new(),
            // Nothing is known before the first reading.
            hold: true,
        }
    }

    /// Whether the last reading left something to watch at every reading
    /// (a series in a loop or suspect, or none read yet): then no glance
    /// is [`Analyzer::quiet`].
    pub fn holds(&self) -> bool {
        self.hold
    }

    /// Judges `series` on each part of the reading (with its invalidations
    /// per request), from its calls in the reading and in its fresh part
    /// and its `signals`; says recoveries in `out`, returns loops found.
    fn judge_parts(
        &mut self,
        series: SeriesKey,
        (parts, requests): (&[Part], &[Option<PerRequest>]),
        (calls, fresh_calls): (u64, u64),
        signals: Signals,
        out: &mut Output,
    ) -> Vec<LoopVerdict> {
        let mut found = Vec::new();
        for (part, requests) in parts.iter().zip(requests) {
            let signals = part.signals(signals, *requests);
            let rate = part.rate(calls, fresh_calls);
            match self
                .detector
                .observe_with(series, rate, part.seconds, signals)
            {
                Some(detect::Event::Loop(v)) => found.push(v),
                Some(detect::Event::Recovered(r)) => self.recovered(r, out),
                None => {}
            }
        }
        found
    }

    /// Calls of `func` in process `pid` in the fresh part of the snapshot
    /// being judged (0 when it has none: see `fresh_calls`).
    fn fresh_of(&self, func: u32, pid: u32) -> u64 {
        self.fresh_calls.get(&(func, pid)).copied().unwrap_or(0)
    }

    /// Whether a glance between readings shows nothing that could move a
    /// verdict, so that the reading can be let go (the next one covers its
    /// time): no series in a loop or suspect at the last reading; the CPU
    /// of every watched process together under half of what a loop burns
    /// (`cpu_cores`); and every function, process (its functions summed,
    /// as judged) and name group calling at under half the rate it could
    /// be judged a runaway at ([`Detector::alarm_rate`]). A function or
    /// process the last reading did not judge is held to `min_rate`.
    ///
    /// A verdict needs such a rate or a burning core (`detect::judge`): a
    /// reading that had neither could only have learned calm traffic. The
    /// next reading covers its time, and is judged as two parts ([`Part`]):
    /// up to the last glance that let one go, learned as calm, then the
    /// rest.
    pub fn quiet(&self, glance: &Glance) -> bool {
        let rules = self.detector.rules();
        let burning =
            |cores: Option<f64>| cores.is_none_or(|c| c >= GLANCE_MARGIN * rules.cpu_cores);
        if self.hold || burning(glance.cores) || burning(glance.hottest_thread) {
            return false;
        }
        let loud = |calls: u64, alarm: f64| calls as f64 >= GLANCE_MARGIN * alarm * glance.seconds;
        let mut sums: HashMap<u32, u64> = HashMap::new();
        for c in &glance.calls {
            let alarms = self.alarms.get(&c.pid);
            let alarm = alarms
                .and_then(|a| a.funcs.get(c.func as usize))
                .copied()
                .unwrap_or(rules.min_rate);
            if loud(c.calls, alarm) {
                return false;
            }
            let f = c.func as usize;
            let summed = !(self.is_request.get(f).copied().unwrap_or(false)
                || self.unsummed.get(f).copied().unwrap_or(false));
            if summed {
                *sums.entry(c.pid).or_default() += c.calls;
            }
        }
        let mut groups: HashMap<&str, u64> = HashMap::new();
        for (pid, calls) in sums {
            let alarm = self.alarms.get(&pid).map_or(rules.min_rate, |a| a.all);
            if loud(calls, alarm) {
                return false;
            }
            if let Some(comm) = self.comms.get(&pid) {
                *groups.entry(comm.as_str()).or_default() += calls;
            }
        }
        groups.into_iter().all(|(comm, calls)| {
            // Only groups of two or more are judged as one.
            self.group_alarms
                .get(comm)
                .is_none_or(|&alarm| !loud(calls, alarm))
        })
    }

    /// Judges one snapshot, taken under `catalog`.
    pub fn analyze(&mut self, catalog: &Catalog, snap: &Snapshot) -> Output {
        let seconds = snap.seconds.max(1e-3);
        let estimated = snap.probed < 1.0;
        let window = seconds * snap.probed.clamp(1e-3, 1.0);
        let mut out = Output {
            ts: snap.ts,
            ..Output::default()
        };
        self.functions = catalog.len();
        self.elapsed = snap.elapsed;
        self.is_request.clear();
        self.is_request
            .extend((0..catalog.len() as u32).map(|f| catalog.is_request(f)));
        self.is_hot_pick.clear();
        self.is_hot_pick.extend(
            catalog
                .functions
                .iter()
                .map(|f| f.picked == Some(crate::catalog::Picked::Hot)),
        );
        self.unsummed.clear();
        self.unsummed.extend(
            catalog
                .functions
                .iter()
                .zip(&self.is_hot_pick)
                .map(|(f, &hot)| hot || f.is_interpreted()),
        );
        self.notice_processes(catalog, &snap.processes, snap.elapsed);
        self.kernel_warnings(snap, &mut out);
        let evicted_before = self.evicted;

        self.by_key.clear();
        self.by_key
            .extend(snap.counts.iter().map(|c| ((c.func, c.pid), c.calls)));
        // A reading that folded in readings let go is judged in two parts.
        self.fresh_calls.clear();
        if let Some(f) = &snap.fresh {
            self.fresh_calls
                .extend(f.calls.iter().map(|c| ((c.func, c.pid), c.calls)));
        }
        self.reading_calls.clear();
        let (cycles, callee_edges) = self.cycles(snap);
        let keys = self.keys(catalog, snap);
        let key_cycles = self.key_cycles(catalog, snap);
        for (&pid, cycle) in &cycles {
            self.last_cycles.insert(pid, (cycle.clone(), snap.elapsed));
        }
        for (&pid, cycle) in &key_cycles {
            self.last_key_cycles
                .insert(pid, (cycle.keys.clone(), snap.elapsed));
        }
        self.stack_deltas(snap);
        self.period.evicted += self.evicted - evicted_before;
        self.period.seconds += seconds;
        self.period.estimated |= estimated;

        let mut verdicts: BTreeMap<u32, Vec<LoopVerdict>> = BTreeMap::new();
        let mut groups: BTreeMap<String, GroupSum> = BTreeMap::new();
        let mut health: HashMap<u32, Health> = HashMap::new();
        let mut processes: Vec<&ProcessFacts> = snap.processes.iter().collect();
        processes.sort_by_key(|p| p.pid);
        for process in &processes {
            let pid = process.pid;
            // This reading's calls of every function, before judging any:
            // the invalidations-per-request signal needs them all.
            self.calls.clear();
            for func in 0..catalog.len() as u32 {
                let now = self.by_key.get(&(func, pid)).copied().unwrap_or(0);
                self.calls.push(self.counts.advance((func, pid), now));
            }
            // Every run of a runtime's USDT probe is a trap, wanted name or
            // not (interpreted functions' calls are among them).
            let usdt_now = self
                .by_key
                .get(&(profiler_common::USDT_HITS, pid))
                .copied()
                .unwrap_or(0);
            let usdt = self
                .counts
                .advance((profiler_common::USDT_HITS, pid), usdt_now);
            let native: u64 = self
                .calls
                .iter()
                .zip(catalog.functions.iter())
                .filter(|(_, f)| !f.is_interpreted())
                .map(|(n, _)| n)
                .sum();
            out.hit_rate = out.hit_rate.max((native + usdt) as f64 / window);
            if let Some(f) = &snap.fresh {
                // A burst in the fresh part, at its own rate.
                let fresh: u64 = (0..catalog.len() as u32)
                    .filter(|&func| !catalog.functions[func as usize].is_interpreted())
                    .chain([profiler_common::USDT_HITS])
                    .map(|func| self.fresh_of(func, pid))
                    .sum();
                out.hit_rate = out.hit_rate.max(fresh as f64 / f.seconds.max(1e-3));
            }
            for (func, &n) in self.calls.iter().enumerate() {
                if n > 0 {
                    self.reading_calls.insert((pid, func as u32), n);
                }
            }
            let mut cores = None;
            if let Some(cpu_nanos) = process.cpu_nanos {
                let before = self.cpu.insert(pid, cpu_nanos);
                // The first reading of a process has nothing to diff against.
                if let Some(before) = before {
                    let used = cpu_nanos.saturating_sub(before);
                    let sums = self.period.cpu.entry(pid).or_default();
                    sums.0 += used;
                    sums.1 += seconds;
                    cores = Some(used as f64 / (seconds * 1e9));
                }
            }
            // A loop pins a thread: judged on the busiest thread's CPU where
            // there is one to read, the process's otherwise.
            let thread_cores = process
                .hot_thread_nanos
                .map(|n| n as f64 / (seconds * 1e9))
                .or(cores);
            let parts = Part::of(snap, process, cores, thread_cores, window);
            // Invalidations per request, part by part (learned from each
            // calm one); the last part's is the reading's.
            let part_requests: Vec<Option<PerRequest>> = parts
                .iter()
                .map(|part| {
                    if part.kind == PartKind::Whole {
                        return self
                            .requests
                            .observe(pid, &self.calls, &self.is_request, window);
                    }
                    let calls: Vec<u64> = (0..catalog.len())
                        .map(|f| part.calls(self.calls[f], self.fresh_of(f as u32, pid)))
                        .collect();
                    self.requests
                        .observe(pid, &calls, &self.is_request, part.window)
                })
                .collect();
            let per_request = part_requests.last().copied().flatten();
            if per_request.is_some() {
                let (mut req, mut inv) = (0u64, 0u64);
                for (func, &n) in self.calls.iter().enumerate() {
                    if self.is_request[func] {
                        req += n;
                    } else {
                        inv += n;
                    }
                }
                let sums = self.period.requests.entry(pid).or_default();
                sums.0 += req;
                sums.1 += inv;
                sums.2 += window;
            }

            if let Some(c) = cores {
                health.insert(
                    pid,
                    Health {
                        cpu_percent: round1(c * 100.0),
                        rss_bytes: process.rss_bytes,
                        requests_rate: per_request.map(|r| round1(r.requests_rate)),
                        invalidations_per_request: per_request.and_then(|r| r.ratio).map(round1),
                    },
                );
            }
            // How much of the process's watched calls walked its cycles in
            // this reading: a loop running since before attach is most of
            // what its process does; a queue broker's queues emptied in
            // turn are a part of a busy server's work.
            let all_calls: u64 = (0..catalog.len())
                .filter(|&f| !self.is_request[f])
                .map(|f| self.calls[f])
                .sum();
            let along_keys: u64 = key_cycles
                .get(&pid)
                .map_or(0, |c| c.per_func.values().sum());
            let along_calls: u64 = cycles
                .get(&pid)
                .map_or(0, |c| c.iter().map(|&f| self.calls[f as usize]).sum());
            let dominance = along_keys.max(along_calls) as f64 / all_calls.max(1) as f64;
            let process_looping = self.detector.process_in_loop(pid)
                || self
                    .groups
                    .get(&process.comm)
                    .is_some_and(|&id| self.detector.process_in_loop(id));
            // What every series of the process is judged with (each part
            // then sets its own CPU and per-request signals: `Part::signals`).
            let base = Signals {
                cpu: thread_cores,
                cpu_baseline: self.cpu_baseline.get(&pid).copied(),
                explained_by_requests: per_request.is_some_and(|r| r.explained),
                per_request_risen: per_request.is_some_and(|r| r.risen),
                process_looping,
                ..Signals::default()
            };
            let mut any_suspect = false;
            let mut alarms = self.alarms.remove(&pid).unwrap_or_default();
            alarms.funcs.clear();
            self.detector.begin_reading(pid, catalog.len() as u32);
            for func in 0..catalog.len() as u32 {
                let calls = self.calls[func as usize];
                let series = SeriesKey { pid, func };
                let rate = calls as f64 / window;
                let fresh_calls = self.fresh_of(func, pid);
                // Outside a probe window nothing is counted: scale up.
                let reported = if estimated {
                    (rate * seconds).round() as u64
                } else {
                    calls
                };
                if calls > 0 || reported > 0 {
                    let totals = self.totals.entry(series).or_default();
                    totals.calls += reported;
                    let peak = parts.iter().map(|p| p.rate(calls, fresh_calls));
                    totals.peak_rate = peak.fold(totals.peak_rate, f64::max);
                    self.fired.insert(series);
                }
                // Samples are said for functions that fired (zeros
                // included, once they have): the others keep no sums.
                if self.fired.contains(&series) {
                    let sums = self.period.series.entry(series).or_default();
                    sums.0 += reported;
                    sums.1 += window;
                }

                // Requests are counted, not judged.
                if self.is_request[func as usize] {
                    alarms.funcs.push(f64::INFINITY);
                    continue;
                }
                let stats = keys.get(&series);
                // A few calls along the cycle say nothing of a function
                // (a read of one of its keys, once): it must walk it.
                let key_cycle = key_cycles
                    .get(&pid)
                    .and_then(|c| c.per_func.get(&func))
                    .filter(|&&n| n >= MIN_KEYED)
                    .map_or(0.0, |&n| n as f64 / calls.max(1) as f64);
                let in_cycle = cycles.get(&pid).is_some_and(|c| c.contains(&func))
                    && callee_edges.contains(&(pid, func));
                let signals = Signals {
                    call_cycle: in_cycle,
                    key_cycle: key_cycle.min(1.0),
                    top_share: stats.and_then(|s| s.top_share(calls)),
                    reinvalidation: stats.and_then(KeyStats::reinvalidation),
                    cycle_dominance: dominance.min(1.0),
                    heat_only: self.is_hot_pick[func as usize],
                    ..base
                };
                let found = self.judge_parts(
                    series,
                    (&parts, &part_requests),
                    (calls, fresh_calls),
                    signals,
                    &mut out,
                );
                if !found.is_empty() {
                    verdicts.entry(pid).or_default().extend(found);
                }
                any_suspect |= self.detector.suspect(series);
                alarms.funcs.push(self.detector.alarm_rate(series));
            }
            self.detector.end_reading(pid, seconds, process_looping);
            // All its judged functions together: a loop spread over several
            // functions adds up here. Not the functions picked for their
            // heat: one picked mid-run would read as the sum running away.
            let judged: Vec<u32> = (0..catalog.len() as u32)
                .filter(|&f| !self.is_request[f as usize] && !self.unsummed[f as usize])
                .collect();
            let calls: u64 = judged.iter().map(|&f| self.calls[f as usize]).sum();
            let fresh_calls: u64 = judged.iter().map(|&f| self.fresh_of(f, pid)).sum();
            if judged.len() > 1 {
                let series = SeriesKey {
                    pid,
                    func: ALL_FUNCTIONS,
                };
                let along: u64 = key_cycles
                    .get(&pid)
                    .map_or(0, |c| c.per_func.values().sum());
                let signals = Signals {
                    // A cycle of functions picked for heat alone is not
                    // the sum's: those are judged on their own.
                    call_cycle: cycles.get(&pid).is_some_and(|c| {
                        c.iter()
                            .any(|&f| !self.is_hot_pick.get(f as usize).copied().unwrap_or(false))
                    }),
                    key_cycle: (along as f64 / calls.max(1) as f64).min(1.0),
                    cycle_dominance: dominance.min(1.0),
                    ..base
                };
                let found = self.judge_parts(
                    series,
                    (&parts, &part_requests),
                    (calls, fresh_calls),
                    signals,
                    &mut out,
                );
                if !found.is_empty() {
                    verdicts.entry(pid).or_default().extend(found);
                }
                any_suspect |= self.detector.suspect(series);
                alarms.all = self.detector.alarm_rate(series);
            } else {
                alarms.all = f64::INFINITY;
            }
            self.alarms.insert(pid, alarms);
            let group = groups.entry(process.comm.clone()).or_default();
            group.calls += calls;
            group.window = group.window.max(window);
            group.pids.push((pid, calls));
            group.cpu = match (group.cpu, cores, group.pids.len()) {
                (_, Some(c), 1) => Some(c),
                (Some(sum), Some(c), _) => Some(sum + c),
                _ => None,
            };
            // Its parts line up with the other processes' (one snapshot).
            if group.parts.is_empty() {
                group.parts = parts.iter().map(|&p| (p, 0, Some(0.0))).collect();
            }
            for (sum, part) in group.parts.iter_mut().zip(&parts) {
                sum.1 += part.calls(calls, fresh_calls);
                sum.2 = sum.2.zip(part.cores).map(|(a, c)| a + c);
            }
            group.suspect |= any_suspect;
            group.looping |= process_looping;
            group.explained |= base.explained_by_requests;
            group.risen |= base.per_request_risen;

            // The process's usual CPU, learned while nothing is suspect.
            if let Some(c) = thread_cores
                && !any_suspect
                && !process_looping
            {
                learn_cpu(&mut self.cpu_baseline, pid, c, seconds);
            }
        }

        // Processes of one name together: a loop spread over a pool of
        // workers adds up here, its CPU summed over them.
        let mut group_verdicts: Vec<(LoopVerdict, Vec<u32>)> = Vec::new();
        self.group_alarms.clear();
        for (comm, group) in groups {
            if group.pids.len() < 2 {
                continue;
            }
            let next = GROUP_IDS + self.groups.len() as u32;
            let id = *self.groups.entry(comm.clone()).or_insert(next);
            let series = SeriesKey {
                pid: id,
                func: ALL_FUNCTIONS,
            };
            for &(part, calls, cpu) in &group.parts {
                let signals = Signals {
                    cpu,
                    cpu_baseline: self.cpu_baseline.get(&id).copied(),
                    explained_by_requests: group.explained,
                    per_request_risen: group.risen,
                    process_looping: group.looping,
                    ..Signals::default()
                };
                let rate = calls as f64 / part.window.max(1e-3);
                match self
                    .detector
                    .observe_with(series, rate, part.seconds, signals)
                {
                    Some(detect::Event::Loop(v)) => {
                        let pids = group.pids.iter().map(|&(p, _)| p).collect();
                        group_verdicts.push((v, pids));
                    }
                    Some(detect::Event::Recovered(r)) => self.recovered(r, &mut out),
                    None => {}
                }
            }
            self.group_alarms
                .insert(comm, self.detector.alarm_rate(series));
            // The pool's usual CPU, summed, learned while nothing is suspect.
            if let Some(c) = group.cpu
                && !group.suspect
                && !group.looping
                && !self.detector.suspect(series)
            {
                learn_cpu(&mut self.cpu_baseline, id, c, seconds);
            }
        }

        for (pid, mut group) in verdicts {
            // One record per loop of a process: a function joining a loop
            // already reported is in that loop; the sum of its functions
            // speaks only when none of them does.
            if self.announced_for(&[pid]) {
                // In the loop already reported: its recovery waits for these.
                for v in &group {
                    self.announced.insert(v.key, pid);
                }
                continue;
            }
            if group.iter().any(|v| v.key.func != ALL_FUNCTIONS) {
                group.retain(|v| v.key.func != ALL_FUNCTIONS);
            }
            let funcs = self.loop_functions(&group, &[pid], catalog);
            self.announce(&group, pid, &funcs);
            out.events.push(Event::Loop(Box::new(LoopEvent {
                pid,
                processes: Vec::new(),
                target: health.get(&pid).copied(),
                cycle: recent(&self.last_cycles, pid, snap.elapsed),
                key_cycle: recent(&self.last_key_cycles, pid, snap.elapsed),
                top_keys: top_keys(&group, &keys, seconds / window),
                repeating: group.iter().any(|v| v.agreed.repeating_keys),
                stack: hottest_stack(&self.recent_stacks, &self.recent_sites, pid, &funcs),
                functions: funcs,
                verdicts: group,
            })));
            out.loop_found = true;
        }
        for (verdict, pids) in group_verdicts {
            if let Some(&pid) = pids.iter().find(|&&p| self.announced_for(&[p])) {
                self.announced.insert(verdict.key, pid);
                continue;
            }
            // Named after its busiest process, with every process listed.
            let pid = pids
                .iter()
                .copied()
                .max_by_key(|p| self.calls_of(*p))
                .unwrap_or_default();
            let funcs = self.loop_functions(std::slice::from_ref(&verdict), &pids, catalog);
            self.announce(std::slice::from_ref(&verdict), pid, &funcs);
            // The pool's CPU and memory, summed.
            let target =
                pids.iter()
                    .filter_map(|p| health.get(p))
                    .fold(None, |sum: Option<Health>, h| {
                        Some(match sum {
                            None => *h,
                            Some(s) => Health {
                                cpu_percent: round1(s.cpu_percent + h.cpu_percent),
                                rss_bytes: s.rss_bytes + h.rss_bytes,
                                ..s
                            },
                        })
                    });
            out.events.push(Event::Loop(Box::new(LoopEvent {
                pid,
                target,
                cycle: None,
                key_cycle: None,
                top_keys: Vec::new(),
                repeating: false,
                stack: hottest_stack(&self.recent_stacks, &self.recent_sites, pid, &funcs),
                functions: funcs,
                processes: pids,
                verdicts: vec![verdict],
            })));
            out.loop_found = true;
        }

        if snap.report {
            self.report(catalog, snap, &mut out);
        }
        for process in processes.iter().filter(|p| !p.alive) {
            if !snap.report {
                // Its last calls, in a sample of its own: they would be lost
                // with it before the interval ends.
                self.flush_process(catalog, process, &mut out);
            }
            out.events.push(Event::TargetExit { pid: process.pid });
            self.forget(catalog, process.pid);
        }
        // Processes no longer read hold no alarms.
        self.alarms
            .retain(|pid, _| snap.processes.iter().any(|p| p.pid == *pid && p.alive));
        self.hold = self.detector.active();
        out
    }

    /// The samples of a process's part of the reporting period, taken out
    /// of the period.
    fn flush_process(&mut self, catalog: &Catalog, process: &ProcessFacts, out: &mut Output) {
        let seconds = self.period.seconds.max(1e-3);
        for func in 0..catalog.len() as u32 {
            let series = SeriesKey {
                pid: process.pid,
                func,
            };
            let Some((calls, _)) = self.period.series.remove(&series) else {
                continue;
            };
            if self.fired.contains(&series) {
                out.events.push(Event::Sample {
                    pid: process.pid,
                    ns_pid: process.ns_pid,
                    func,
                    calls,
                    rate: round1(calls as f64 / seconds),
                    baseline: self.detector.baseline(series).map(round1),
                    estimated: self.period.estimated,
                });
            }
        }
    }

    /// A recovery, reported for a loop that was: under the pid and as the
    /// functions its loop record named.
    /// Said once the last series in that loop has recovered.
    fn recovered(&mut self, mut r: Recovery, out: &mut Output) {
        let Some(pid) = self.announced.remove(&r.key) else {
            return;
        };
        let still = self
            .announced
            .iter()
            .any(|(k, &p)| p == pid && self.detector.in_loop(*k));
        if !still {
            self.announced.retain(|_, p| *p != pid);
            r.key.pid = pid;
            out.events.push(Event::Recovered(r));
        }
    }

    /// Whether any of `pids` is in a loop already reported.
    fn announced_for(&self, pids: &[u32]) -> bool {
        self.announced
            .iter()
            .any(|(k, p)| pids.contains(p) && self.detector.in_loop(*k))
    }

    fn announce(&mut self, verdicts: &[LoopVerdict], pid: u32, funcs: &[u32]) {
        for v in verdicts {
            self.announced.insert(v.key, pid);
        }
        self.loops.push((pid, funcs.to_vec()));
    }

    /// The functions a loop record names: its verdicts' own, or for a sum
    /// (of a process or a group), the judged functions that were called.
    fn loop_functions(
        &self,
        verdicts: &[LoopVerdict],
        pids: &[u32],
        catalog: &Catalog,
    ) -> Vec<u32> {
        let mut funcs: Vec<u32> = verdicts
            .iter()
            .map(|v| v.key.func)
            .filter(|&f| f != ALL_FUNCTIONS)
            .collect();
        if funcs.is_empty() {
            // The functions that carry the loop in this reading, busiest
            // first: not one that ran before it began in the interval.
            let calls = |f: u32| -> u64 {
                pids.iter()
                    .map(|&pid| self.reading_calls.get(&(pid, f)).copied().unwrap_or(0))
                    .sum()
            };
            let total: u64 = (0..catalog.len() as u32)
                .filter(|&f| !catalog.is_request(f))
                .map(calls)
                .sum();
            funcs = (0..catalog.len() as u32)
                .filter(|&f| !catalog.is_request(f))
                .filter(|&f| calls(f) > 0 && calls(f) as f64 >= CARRIES * total as f64)
                .collect();
            funcs.sort_by_key(|&f| std::cmp::Reverse(calls(f)));
        }
        funcs
    }

    fn calls_of(&self, pid: u32) -> u64 {
        self.reading_calls
            .iter()
            .filter(|((p, _), _)| *p == pid)
            .map(|(_, &calls)| calls)
            .sum()
    }

    /// Closes a reporting period: a sample per series that has fired, the
    /// health of each process, and what the kernel lost, over the period.
    fn report(&mut self, catalog: &Catalog, snap: &Snapshot, out: &mut Output) {
        let period = std::mem::take(&mut self.period);
        let seconds = period.seconds.max(1e-3);
        let mut processes: Vec<&ProcessFacts> = snap.processes.iter().collect();
        processes.sort_by_key(|p| p.pid);
        for process in processes {
            let pid = process.pid;
            if let Some(&(used, cpu_seconds)) = period.cpu.get(&pid) {
                let per_request = period.requests.get(&pid).map(|&(req, inv, window)| {
                    let ratio = (req > 0 || inv > 0).then(|| inv as f64 / req.max(1) as f64);
                    (req as f64 / window.max(1e-3), ratio)
                });
                out.events.push(Event::Health {
                    pid,
                    health: Health {
                        cpu_percent: round1(used as f64 / (cpu_seconds.max(1e-3) * 1e7)),
                        rss_bytes: process.rss_bytes,
                        requests_rate: per_request.map(|(r, _)| round1(r)),
                        invalidations_per_request: per_request.and_then(|(_, r)| r).map(round1),
                    },
                });
            }
            for func in 0..catalog.len() as u32 {
                let series = SeriesKey { pid, func };
                // A function that never fired has nothing to say; once it
                // has, it reports every period, zeros included.
                if !self.fired.contains(&series) {
                    continue;
                }
                let (calls, window) = period.series.get(&series).copied().unwrap_or_default();
                out.events.push(Event::Sample {
                    pid,
                    ns_pid: process.ns_pid,
                    func,
                    calls,
                    rate: round1(calls as f64 / seconds),
                    baseline: self.detector.baseline(series).map(round1),
                    estimated: period.estimated && window > 0.0,
                });
            }
        }
        if let Some(Event::Interval {
            dropped, evicted, ..
        }) = out
            .events
            .iter_mut()
            .find(|e| matches!(e, Event::Interval { .. }))
        {
            *dropped = period.dropped;
            *evicted = period.evicted;
        }
        if period.evicted > 0 && !self.evictions_warned {
            self.evictions_warned = true;
            out.events.push(Event::Evicted {
                count: period.evicted,
            });
        }
    }

    /// A pid whose start time changed is a new process, and one whose
    /// executable changed ran exec: a new program, whose history starts
    /// afresh. Forget the old one. (An executable that could not be read
    /// this tick changes nothing.)
    fn notice_processes(&mut self, catalog: &Catalog, processes: &[ProcessFacts], elapsed: f64) {
        // A process the controller stopped watching (it could not be
        // probed again) is forgotten: its entries leaving the kernel's maps
        // are not evictions.
        let gone: Vec<u32> = self
            .live
            .keys()
            .filter(|pid| !processes.iter().any(|p| p.pid == **pid))
            .copied()
            .collect();
        for pid in gone {
            self.forget(catalog, pid);
        }
        for p in processes {
            let unknown = FileId::default();
            let before = self.live.get(&p.pid).copied();
            let exe = match before {
                Some((_, exe)) if p.exe == unknown => exe,
                _ => p.exe,
            };
            let changed = before.is_some_and(|(start, was)| {
                start != p.start_time || (was != unknown && exe != was)
            });
            if changed {
                self.forget_state(catalog, p.pid);
            }
            self.live.insert(p.pid, (p.start_time, exe));
            if before.is_none_or(|(start, _)| start != p.start_time) {
                self.seen += 1;
            }
            if before.is_none_or(|(start, _)| start != p.start_time) {
                // A new process starts from what the last process of its
                // name learned (a restart). A process that ran exec runs
                // another program: it starts from nothing.
                self.comms.insert(p.pid, p.comm.clone());
                // Not a (name, function) key made per function when no
                // predecessor of this name left anything (10,000 of them).
                let predecessor = self.inherited.keys().any(|(comm, _)| *comm == p.comm);
                for func in (0..catalog.len() as u32).filter(|_| predecessor) {
                    // Only from a predecessor that ended lately: a restart,
                    // not a process of the same name from hours ago.
                    if let Some(&(learned, _)) = self
                        .inherited
                        .get(&(p.comm.clone(), catalog.name(func)))
                        .filter(|(_, at)| elapsed - at <= INHERIT_SECONDS)
                    {
                        self.detector
                            .inherit(SeriesKey { pid: p.pid, func }, learned);
                    }
                }
                // The functions it never called, together (after the
                // others: those have histories of their own).
                if let Some((functions, judged, _)) = self
                    .inherited_quiet
                    .get(&p.comm)
                    .filter(|(_, _, at)| elapsed - at <= INHERIT_SECONDS)
                {
                    self.detector.inherit_quiet(
                        p.pid,
                        (*functions).min(catalog.len() as u32),
                        judged.clone(),
                    );
                }
            }
        }
    }

    fn kernel_warnings(&mut self, snap: &Snapshot, out: &mut Output) {
        let dropped = since(self.dropped, snap.dropped);
        self.period.dropped += dropped;
        if snap.report {
            // Filled in with the period's sums in `report`.
            out.events.push(Event::Interval {
                dropped: 0,
                evicted: 0,
                counters: snap.counts_entries,
                capacity: snap.counts_capacity,
            });
        }
        if snap.dropped > self.dropped {
            out.events.push(Event::Dropped { count: dropped });
            self.dropped = snap.dropped;
        }
        let used = snap.counts_entries as usize;
        if !self.pressure_warned
            && snap.counts_capacity > 0
            && used as f64 >= MAP_PRESSURE * f64::from(snap.counts_capacity)
        {
            self.pressure_warned = true;
            out.events.push(Event::MapPressure {
                used,
                capacity: snap.counts_capacity,
            });
        }
    }

    /// Per process, the cycle of watched functions calling each other in
    /// this reading, if any (function ids, in call order); and the (pid,
    /// callee) pairs whose edges in it carry a real share of their calls.
    /// A function calling itself is recursion, not a cycle.
    #[allow(clippy::type_complexity)]
    fn cycles(&mut self, snap: &Snapshot) -> (HashMap<u32, Vec<u32>>, HashSet<(u32, u32)>) {
        let mut edges: HashMap<(u32, u32, u32), u64> = HashMap::new();
        // The last reading's map, and this one's in the map before it
        // (cleared): its table is already grown for as many sites.
        let mut last = std::mem::take(&mut self.spare_sites);
        last.clear();
        std::mem::swap(&mut last, &mut self.call_sites);
        let decay = recent_decay(snap.seconds);
        for value in self.recent_sites.values_mut() {
            *value *= decay;
        }
        for site in &snap.call_sites {
            let key = (site.func, site.pid, site.return_address);
            self.call_sites.insert(key, site.calls);
            let calls = since(last.get(&key).copied().unwrap_or(0), site.calls);
            if calls == 0 || !self.live.contains_key(&site.pid) {
                continue;
            }
            *self.recent_sites.entry(key).or_default() += calls as f64;
            if let Some(caller) = site.caller
                && caller != site.func
            {
                *edges.entry((site.pid, caller, site.func)).or_default() += calls;
            }
        }
        self.recent_sites.retain(|_, v| *v >= 0.5);
        self.evicted += self.vanished(&last, |s, k| s.call_sites.contains_key(k));
        self.spare_sites = last;
        let mut graphs: HashMap<u32, BTreeSet<(u32, u32)>> = HashMap::new();
        let mut strong = HashSet::new();
        // A reading that folded in readings let go holds their call sites
        // too: an edge must be as busy as in a reading of its fresh part's
        // length (a rare, healthy recursion is not a cycle for being read
        // over more time).
        let least = snap
            .fresh
            .as_ref()
            .map_or(1.0, |f| (snap.seconds / f.seconds.max(1e-3)).max(1.0))
            * MIN_KEYED as f64;
        for ((pid, caller, callee), n) in edges {
            let calls = self.by_key.get(&(callee, pid)).copied().unwrap_or(0);
            let before = self.counts.last.get(&(callee, pid)).copied().unwrap_or(0);
            let callee_calls = since(before, calls).max(1);
            if n as f64 >= least && n as f64 >= CALL_EDGE_SHARE * callee_calls as f64 {
                graphs.entry(pid).or_default().insert((caller, callee));
                strong.insert((pid, callee));
            }
        }
        let cycles = graphs
            .into_iter()
            .filter_map(|(pid, e)| Some((pid, cycles::find_cycle(&e)?)))
            .collect();
        (cycles, strong)
    }

    /// Per process and function, the keys invalidated in this reading,
    /// busiest first.
    fn keys(&mut self, catalog: &Catalog, snap: &Snapshot) -> HashMap<SeriesKey, KeyStats> {
        let mut per_series: HashMap<SeriesKey, KeyStats> = HashMap::new();
        // Only keys the kernel still counts are kept; one evicted and seen
        // again counts from zero.
        let last = std::mem::take(&mut self.keys);
        for k in &snap.keys {
            let id = (k.func, k.pid, k.hash);
            self.keys.insert(id, k.calls);
            let calls = since(last.get(&id).copied().unwrap_or(0), k.calls);
            if calls > 0 && self.live.contains_key(&k.pid) {
                let series = SeriesKey {
                    pid: k.pid,
                    func: k.func,
                };
                let key = KeyRef {
                    text: catalog.has_text_keys(k.func),
                    hash: k.hash,
                };
                let stats = per_series.entry(series).or_default();
                stats.keys.push((key, calls));
                if !key.truncated() {
                    stats.keyed += calls;
                    let seen = self.recent_keys.entry(series).or_default();
                    let recent = seen
                        .insert(k.hash, snap.elapsed)
                        .is_some_and(|at| snap.elapsed - at <= RECENT_KEYS_SECONDS);
                    if !recent {
                        stats.new_keys += 1;
                    }
                }
            }
        }
        self.evicted += self.vanished(&last, |s, k| s.keys.contains_key(k));
        for stats in per_series.values_mut() {
            stats.keys.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        }
        let now = snap.elapsed;
        for seen in self.recent_keys.values_mut() {
            seen.retain(|_, &mut at| now - at <= RECENT_KEYS_SECONDS);
            if seen.len() > MAX_RECENT_KEYS {
                // A storm of new keys: nothing comes back in it anyway.
                seen.clear();
            }
        }
        self.recent_keys.retain(|_, seen| !seen.is_empty());
        per_series
    }

    /// Per process, the key cycle its threads walked in this reading.
    fn key_cycles(&mut self, catalog: &Catalog, snap: &Snapshot) -> HashMap<u32, KeyCycleSeen> {
        let mut per_pid: HashMap<u32, Vec<(u32, u64, u64, u64)>> = HashMap::new();
        let mut history: HashMap<u32, Vec<(u64, u64, u64)>> = HashMap::new();
        let last = std::mem::take(&mut self.key_edges);
        for e in &snap.key_edges {
            let id = (e.func, e.pid, e.from, e.to);
            self.key_edges.insert(id, e.calls);
            if !self.live.contains_key(&e.pid) {
                continue;
            }
            history
                .entry(e.pid)
                .or_default()
                .push((e.from, e.to, e.calls));
            let calls = since(last.get(&id).copied().unwrap_or(0), e.calls);
            // A key too long to hash in full may stand for several: no
            // cycle through it.
            let truncated = |hash: u64| KeyRef { text: true, hash }.truncated();
            let text = catalog.has_text_keys(e.func);
            if calls > 0 && !(text && (truncated(e.from) || truncated(e.to))) {
                per_pid
                    .entry(e.pid)
                    .or_default()
                    .push((e.func, e.from, e.to, calls));
            }
        }
        let mut found = HashMap::new();
        for (pid, edges) in per_pid {
            let transitions: Vec<(u64, u64, u64)> =
                edges.iter().map(|&(_, f, t, n)| (f, t, n)).collect();
            let Some((mut cycle, _)) = cycles::key_cycle(&transitions) else {
                continue;
            };
            cycles::entry_first(&mut cycle, history.get(&pid).map_or(&[], Vec::as_slice));
            let along = |from: u64, to: u64| {
                cycle
                    .iter()
                    .zip(cycle.iter().cycle().skip(1))
                    .any(|(&a, &b)| a == from && b == to)
            };
            let mut per_func: HashMap<u32, u64> = HashMap::new();
            let mut text = false;
            for &(func, from, to, n) in &edges {
                if along(from, to) {
                    *per_func.entry(func).or_default() += n;
                    text |= catalog.has_text_keys(func);
                }
            }
            let keys = cycle.iter().map(|&hash| KeyRef { text, hash }).collect();
            found.insert(pid, KeyCycleSeen { keys, per_func });
        }
        found
    }

    /// Stack samples of this reading added to the recent ones (halving
    /// every second): a verdict shows the loop's stack, not the stack of
    /// an hour of healthy traffic before it.
    fn stack_deltas(&mut self, snap: &Snapshot) {
        let decay = recent_decay(snap.seconds);
        for value in self.recent_stacks.values_mut() {
            *value *= decay;
        }
        let last = std::mem::take(&mut self.stacks);
        for s in &snap.stacks {
            let id = (s.func, s.pid, s.stack_id);
            self.stacks.insert(id, s.samples);
            let n = since(last.get(&id).copied().unwrap_or(0), s.samples);
            if n > 0 && self.live.contains_key(&s.pid) {
                *self.recent_stacks.entry(id).or_default() += n as f64;
            }
        }
        self.recent_stacks.retain(|_, v| *v >= 0.5);
    }

    /// Entries of `last` (func, pid, ..) whose process is still live but
    /// that the kernel no longer holds: its LRU map evicted them. Entries
    /// are never deleted otherwise.
    fn vanished(
        &self,
        last: &HashMap<(u32, u32, u64), u64>,
        held: impl Fn(&Self, &(u32, u32, u64)) -> bool,
    ) -> u64 {
        last.keys()
            .filter(|k| self.live.contains_key(&k.1) && !held(self, k))
            .count() as u64
    }

    fn forget(&mut self, catalog: &Catalog, pid: u32) {
        self.live.remove(&pid);
        self.forget_state(catalog, pid);
        self.comms.remove(&pid);
    }

    fn forget_state(&mut self, catalog: &Catalog, pid: u32) {
        // What the process learned is its successor's start (a restart).
        if let Some(comm) = self.comms.get(&pid) {
            let quiet = self.detector.quiet_learned(pid);
            if quiet > 0 {
                // Functions it called inherit their own histories (below),
                // or none: never the quiet ones' zero.
                let judged = self.detector.judged_functions(pid);
                insert_bounded(
                    &mut self.inherited_quiet,
                    comm.clone(),
                    (quiet, judged, self.elapsed),
                    |v| v.2,
                );
            }
            for (func, learned) in self.detector.forget_process(pid) {
                insert_bounded(
                    &mut self.inherited,
                    (comm.clone(), catalog.name(func)),
                    (learned, self.elapsed),
                    |v| v.1,
                );
            }
        } else {
            self.detector.forget_process(pid);
        }
        self.announced.retain(|k, _| k.pid != pid);
        self.counts.forget(|&(_, p)| p != pid);
        self.keys.retain(|&(_, p, _), _| p != pid);
        self.key_edges.retain(|&(_, p, _, _), _| p != pid);
        self.stacks.retain(|&(_, p, _), _| p != pid);
        self.recent_stacks.retain(|&(_, p, _), _| p != pid);
        self.call_sites.retain(|&(_, p, _), _| p != pid);
        self.recent_sites.retain(|&(_, p, _), _| p != pid);
        self.fired.retain(|s| s.pid != pid);
        // A service restarting all day must not grow the summary's table
        // with every process it ever ran: a gone process's silent series go
        // now, and past a bound the smallest totals of gone processes do
        // (their functions are remembered as having fired).
        self.totals.retain(|k, t| k.pid != pid || t.calls > 0);
        if self.totals.len() > MAX_TOTALS {
            let live = &self.live;
            let mut gone: Vec<(SeriesKey, u64)> = self
                .totals
                .iter()
                .filter(|(k, _)| k.pid == pid || !live.contains_key(&k.pid))
                .map(|(k, t)| (*k, t.calls))
                .collect();
            gone.sort_by_key(|&(_, calls)| calls);
            let excess = self.totals.len() - MAX_TOTALS;
            for (key, _) in gone.into_iter().take(excess) {
                self.totals.remove(&key);
                self.fired_funcs.insert(key.func);
            }
        }
        self.cpu.remove(&pid);
        self.cpu_baseline.remove(&pid);
        self.period.cpu.remove(&pid);
        self.period.requests.remove(&pid);
        self.period.series.retain(|k, _| k.pid != pid);
        self.recent_keys.retain(|k, _| k.pid != pid);
        self.last_cycles.remove(&pid);
        self.last_key_cycles.remove(&pid);
        self.requests.baseline.remove(&pid);
    }

    /// What the run saw, in ids.
    pub fn summary(&self) -> Summary {
        let mut busiest: Vec<(u32, u32, u64, f64)> = self
            .totals
            .iter()
            .filter(|(_, t)| t.calls > 0)
            .map(|(k, t)| (k.pid, k.func, t.calls, round1(t.peak_rate)))
            .collect();
        busiest.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
        // One pass over the totals, not one per function: 10,000 watched
        // functions that never fired made this quadratic at exit.
        let called: HashSet<u32> = self
            .totals
            .iter()
            .filter(|(_, t)| t.calls > 0)
            .map(|(k, _)| k.func)
            .collect();
        let silent = (0..self.functions as u32)
            .filter(|func| !self.fired_funcs.contains(func) && !called.contains(func))
            .collect();
        Summary {
            seconds: self.elapsed,
            functions: self.functions,
            processes: self.seen,
            busiest,
            loops: self.loops.clone(),
            silent,
            dropped: self.dropped,
        }
    }
}

/// The busiest keys of the functions in a loop; a key seen by several of
/// them counts once, with their calls summed. Counted in the probe window,
/// scaled like the calls.
fn top_keys(
    group: &[LoopVerdict],
    keys: &HashMap<SeriesKey, KeyStats>,
    scale: f64,
) -> Vec<(KeyRef, u64)> {
    let mut by_key: BTreeMap<KeyRef, u64> = BTreeMap::new();
    for v in group {
        for &(key, n) in keys.get(&v.key).map(|s| &s.keys).into_iter().flatten() {
            *by_key.entry(key).or_default() += n;
        }
    }
    let mut top: Vec<(KeyRef, u64)> = by_key
        .into_iter()
        .map(|(key, count)| (key, (count as f64 * scale).round() as u64))
        .collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(TOP_KEYS);
    top
}

/// How much of the recent stacks and call sites a reading of `seconds`
/// keeps: they halve every second.
fn recent_decay(seconds: f64) -> f64 {
    0.5f64.powf(seconds.max(0.0))
}

/// The most often sampled recent stack of any of `funcs` in `pid`, with
/// their busiest recent call site.
fn hottest_stack(
    stacks: &HashMap<(u32, u32, u32), f64>,
    sites: &HashMap<(u32, u32, u64), f64>,
    pid: u32,
    funcs: &[u32],
) -> Option<StackRef> {
    let (&(_, _, stack_id), _) = stacks
        .iter()
        .filter(|((f, p, _), _)| *p == pid && funcs.contains(f))
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.2.cmp(&a.0.2)))?;
    let caller = sites
        .iter()
        .filter(|((f, p, _), _)| *p == pid && funcs.contains(f))
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.2.cmp(&a.0.2)))
        .map(|((_, _, address), _)| *address);
    Some(StackRef {
        pid,
        stack_id,
        caller,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        catalog::{FileId, Function, KeySpec, Range},
        snapshot::{CallSite, Count, Fresh, KeyCount, KeyEdgeCount},
    };

    const PID: u32 = 42;

    fn catalog(names: &[&str]) -> Catalog {
        Catalog {
            version: 1,
            functions: names
                .iter()
                .enumerate()
                .map(|(i, n)| Function {
                    name: (*n).into(),
                    paths: vec!["/srv/cache".into()].into(),
                    file_id: FileId { dev: 1, ino: 2 },
                    offsets: vec![0x1000 * (i as u64 + 1)].into(),
                    ranges: vec![Range {
                        start: 0x1000 * (i as u64 + 1),
                        end: 0x1000 * (i as u64 + 1) + 0x100,
                    }]
                    .into(),
                    key: Some(KeySpec::Str { arg: 0 }),
                    request: n.starts_with("handle"),
                    picked: n.starts_with("hot_").then_some(crate::catalog::Picked::Hot),
                })
                .collect(),
        }
    }

    fn process(alive: bool) -> ProcessFacts {
        ProcessFacts {
            pid: PID,
            ns_pid: None,
            start_time: 100,
            exe: FileId { dev: 1, ino: 2 },
            cpu_nanos: None,
            rss_bytes: 0,
            alive,
            comm: "cache".into(),
            hot_thread_nanos: None,
        }
    }

    /// A stream of one-second snapshots built from per-interval calls.
    struct Stream {
        catalog: Catalog,
        analyzer: Analyzer,
        totals: HashMap<u32, u64>,
        key_totals: HashMap<(u32, u64), u64>,
        site_totals: HashMap<(u32, u64), u64>,
        edge_totals: HashMap<(u32, u64, u64), u64>,
        tick: u32,
        /// CPU the process burns in the next ticks, in cores.
        cores: f64,
        cpu_nanos: u64,
        /// The next tick folds in readings let go: its fresh seconds, the
        /// calls of each function in them, and the cores the process burnt
        /// before them (`cores` in them).
        fresh: Option<(f64, Vec<u64>, f64)>,
    }

    impl Stream {
        fn new(names: &[&str]) -> Self {
            Self {
                catalog: catalog(names),
                analyzer: Analyzer::new(Settings::default()),
                totals: HashMap::new(),
                key_totals: HashMap::new(),
                site_totals: HashMap::new(),
                edge_totals: HashMap::new(),
                tick: 0,
                cores: 0.1,
                cpu_nanos: 0,
                fresh: None,
            }
        }

        /// Key transitions in the next tick: (func, from, to, count).
        fn walk(&mut self, edges: &[(u32, u64, u64, u64)]) {
            for &(func, from, to, n) in edges {
                *self.edge_totals.entry((func, from, to)).or_default() += n;
            }
        }

        /// `calls[f]` in this interval; `keys`: (func, key, calls);
        /// `sites`: (func, caller func, calls).
        fn tick(
            &mut self,
            calls: &[u64],
            keys: &[(u32, u64, u64)],
            sites: &[(u32, u32, u64)],
        ) -> Output {
            self.tick += 1;
            let fresh = self.fresh.take();
            let start_cpu = self.cpu_nanos;
            let mut let_go_cpu = None;
            match &fresh {
                Some((f, _, before)) => {
                    let (f, before) = (*f, *before);
                    self.cpu_nanos += (before * (1.0 - f) * 1e9) as u64;
                    let_go_cpu = Some(self.cpu_nanos);
                    self.cpu_nanos += (self.cores * f * 1e9) as u64;
                }
                None => self.cpu_nanos += (self.cores * 1e9) as u64,
            }
            let mut facts = process(true);
            facts.cpu_nanos = Some(self.cpu_nanos);
            let mut snap = Snapshot {
                catalog: 1,
                ts: 1_000.0 + f64::from(self.tick),
                seconds: 1.0,
                elapsed: f64::from(self.tick),
                probed: 1.0,
                processes: vec![facts],
                report: true,
                fresh: fresh.map(|(seconds, calls, _)| Fresh {
                    seconds,
                    calls: calls
                        .iter()
                        .enumerate()
                        .map(|(func, &calls)| Count {
                            func: func as u32,
                            pid: PID,
                            calls,
                        })
                        .collect(),
                    processes: vec![crate::snapshot::FreshProcess {
                        pid: PID,
                        cpu_start: Some(start_cpu),
                        cpu_nanos: let_go_cpu,
                        ..Default::default()
                    }],
                }),
                ..Snapshot::default()
            };
            snap.key_edges = self
                .edge_totals
                .iter()
                .map(|(&(func, from, to), &calls)| KeyEdgeCount {
                    func,
                    pid: PID,
                    from,
                    to,
                    calls,
                })
                .collect();
            for (func, &n) in calls.iter().enumerate() {
                let total = self.totals.entry(func as u32).or_default();
                *total += n;
                snap.counts.push(Count {
                    func: func as u32,
                    pid: PID,
                    calls: *total,
                });
            }
            for &(func, key, n) in keys {
                let total = self.key_totals.entry((func, key)).or_default();
                *total += n;
            }
            snap.keys = self
                .key_totals
                .iter()
                .map(|(&(func, hash), &calls)| KeyCount {
                    func,
                    pid: PID,
                    hash,
                    calls,
                })
                .collect();
            for &(func, caller, n) in sites {
                let total = self
                    .site_totals
                    .entry((func, u64::from(caller)))
                    .or_default();
                *total += n;
            }
            snap.call_sites = self
                .site_totals
                .iter()
                .map(|(&(func, caller), &calls)| CallSite {
                    func,
                    pid: PID,
                    return_address: 0x1000 * (caller + 1) + 5,
                    caller: Some(caller as u32),
                    calls,
                })
                .collect();
            self.analyzer.analyze(&self.catalog, &snap)
        }
    }

    fn loops(out: &Output) -> Vec<&LoopEvent> {
        out.events
            .iter()
            .filter_map(|e| match e {
                Event::Loop(l) => Some(&**l),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn runaway_on_a_burning_core_after_healthy_traffic_is_a_loop_in_two_seconds() {
        let mut s = Stream::new(&["cache_invalidate"]);
        for _ in 0..5 {
            assert!(!s.tick(&[200], &[], &[]).loop_found);
        }
        s.cores = 1.0;
        let outs: Vec<Output> = (0..2).map(|_| s.tick(&[40_000], &[], &[])).collect();
        assert!(!outs[0].loop_found);
        let found = loops(&outs[1]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].verdicts[0].baseline, 200.0);
        assert_eq!(found[0].cycle, None);
        // Samples carry rates and the learned baseline.
        assert!(outs[1].events.iter().any(|e| matches!(
            e,
            Event::Sample { func: 0, calls: 40_000, rate, baseline: Some(b), .. }
                if *rate == 40_000.0 && *b == 200.0
        )));
        assert_eq!(outs[1].hit_rate, 40_000.0);
    }

    fn glance(calls: &[(u32, u32, u64)], cores: f64) -> Glance {
        Glance {
            seconds: 0.25,
            calls: calls
                .iter()
                .map(|&(pid, func, calls)| Count { func, pid, calls })
                .collect(),
            cores: Some(cores),
            hottest_thread: Some(cores),
        }
    }

    #[test]
    fn a_glance_at_calm_traffic_is_quiet_and_half_a_runaway_is_not() {
        let mut s = Stream::new(&["inv_a", "inv_b", "inv_c"]);
        // Nothing judged yet: nothing is quiet.
        assert!(!s.analyzer.quiet(&glance(&[], 0.0)));
        for _ in 0..5 {
            s.tick(&[200, 100, 0], &[], &[]);
        }
        let calm = [(PID, 0, 50), (PID, 1, 25)];
        assert!(s.analyzer.quiet(&glance(&calm, 0.1)));
        // inv_a could run away from 10 x 200 calls/s: half of that, for a
        // quarter of a second, is 250 calls.
        assert!(s.analyzer.quiet(&glance(&[(PID, 0, 240)], 0.1)));
        assert!(!s.analyzer.quiet(&glance(&[(PID, 0, 250)], 0.1)));
        // Never called: held to the least runaway rate, 1000 calls/s.
        assert!(s.analyzer.quiet(&glance(&[(PID, 2, 120)], 0.1)));
        assert!(!s.analyzer.quiet(&glance(&[(PID, 2, 125)], 0.1)));
        // Together: 10 x 300 calls/s for the process's sum, none of them
        // loud on its own.
        let sum = [(PID, 0, 240), (PID, 1, 120), (PID, 2, 20)];
        assert!(s.analyzer.quiet(&glance(&sum[..2], 0.1)));
        assert!(!s.analyzer.quiet(&glance(&sum, 0.1)));
        // A process the last reading did not judge: the least runaway rate.
        assert!(s.analyzer.quiet(&glance(&[(PID + 1, 0, 120)], 0.1)));
        assert!(!s.analyzer.quiet(&glance(&[(PID + 1, 0, 130)], 0.1)));
        // Half a loop's core, in all or on one thread, or not known.
        assert!(!s.analyzer.quiet(&glance(&calm, 0.45)));
        let mut g = glance(&calm, 0.1);
        g.hottest_thread = Some(0.45);
        assert!(!s.analyzer.quiet(&g));
        g.hottest_thread = None;
        assert!(!s.analyzer.quiet(&g));
    }

    #[test]
    fn a_reading_that_folded_in_quiet_ones_is_judged_as_two() {
        // 200 calls/s on a calm core, then a second whose first three
        // quarters a glance found quiet (188 calls, 0.1 core) and whose
        // last quarter ran at 4000 calls/s burning a core: 1188 calls/s and
        // 0.33 core over the second, under 10 x the baseline on no burning
        // core; 4000/s on a burning core over its fresh quarter, a runaway.
        let folded = |fresh: bool| {
            let mut s = Stream::new(&["cache_invalidate"]);
            for _ in 0..5 {
                s.tick(&[200], &[], &[]);
            }
            s.cores = 1.0;
            if fresh {
                s.fresh = Some((0.25, vec![1000], 0.1));
            } else {
                s.cores = 0.325;
            }
            s.tick(&[1188], &[], &[]);
            let key = SeriesKey { pid: PID, func: 0 };
            (
                s.analyzer.detector.suspect(key),
                s.analyzer.detector.baseline(key).unwrap(),
            )
        };
        // The quiet three quarters learnt their 250/s, for their 0.75 s;
        // the fresh one is suspect and learnt nothing.
        let (suspect, baseline) = folded(true);
        assert!(suspect);
        let learnt = 200.0 + (1.0 - 0.8f64.powf(0.75)) * (188.0 / 0.75 - 200.0);
        assert!((baseline - learnt).abs() < 1e-6, "{baseline} vs {learnt}");
        // Judged whole, the same second would have been learned as traffic.
        let (suspect, baseline) = folded(false);
        assert!(!suspect && baseline > 200.0, "{baseline}");
    }

    #[test]
    fn a_folded_reading_catches_an_expensive_loop_and_learns_a_blip_for_its_quarter_only() {
        let key = SeriesKey { pid: PID, func: 0 };
        // 10 calls/s; then 110/s burning 0.9 core in the fresh quarter
        // only (0.3 core over the second): an expensive loop.
        let mut s = Stream::new(&["cache_invalidate"]);
        for _ in 0..5 {
            s.tick(&[10], &[], &[]);
        }
        s.cores = 0.9;
        s.fresh = Some((0.25, vec![27], 0.1));
        s.tick(&[35], &[], &[]);
        assert!(s.analyzer.detector.suspect(key));
        assert!(s.analyzer.detector.baseline(key).unwrap() < 11.0);
        // 200 calls/s; then six times that in the fresh quarter: traffic,
        // learned for a quarter of a second (at most 5.4% up), not as a
        // second of 450 calls/s (20% up).
        let mut s = Stream::new(&["cache_invalidate"]);
        for _ in 0..5 {
            s.tick(&[200], &[], &[]);
        }
        s.fresh = Some((0.25, vec![300], 0.1));
        s.tick(&[450], &[], &[]);
        assert!(!s.analyzer.detector.suspect(key));
        let baseline = s.analyzer.detector.baseline(key).unwrap();
        assert!(baseline > 200.0 && baseline < 211.0, "{baseline}");
    }

    #[test]
    fn no_glance_is_quiet_from_a_suspect_reading_until_the_recovery() {
        let mut s = Stream::new(&["cache_invalidate"]);
        for _ in 0..5 {
            s.tick(&[200], &[], &[]);
        }
        let calm = glance(&[(PID, 0, 50)], 0.1);
        assert!(s.analyzer.quiet(&calm));
        s.cores = 1.0;
        assert!(!s.tick(&[40_000], &[], &[]).loop_found);
        assert!(!s.analyzer.quiet(&calm), "suspect");
        assert!(s.tick(&[40_000], &[], &[]).loop_found);
        assert!(!s.analyzer.quiet(&calm), "in a loop");
        s.cores = 0.1;
        let mut recovered = false;
        for _ in 0..4 {
            let out = s.tick(&[200], &[], &[]);
            recovered |= out.events.iter().any(|e| matches!(e, Event::Recovered(_)));
            assert_eq!(s.analyzer.quiet(&calm), recovered);
        }
        assert!(recovered);
    }

    #[test]
    fn the_same_runaway_on_an_idle_core_is_traffic() {
        let mut s = Stream::new(&["cache_invalidate"]);
        for _ in 0..5 {
            s.tick(&[200], &[], &[]);
        }
        for _ in 0..10 {
            assert!(!s.tick(&[40_000], &[], &[]).loop_found);
        }
    }

    #[test]
    fn call_cycle_from_the_first_interval_is_a_loop_with_its_order() {
        let mut s = Stream::new(&["inv_a", "inv_b"]);
        s.cores = 1.0;
        let mut found = Vec::new();
        for _ in 0..3 {
            let out = s.tick(&[20_000, 20_000], &[], &[(0, 1, 20_000), (1, 0, 20_000)]);
            found.extend(loops(&out).into_iter().cloned());
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].cycle, Some(vec![0, 1]));
        assert_eq!(found[0].verdicts.len(), 2, "both functions, one record");
    }

    #[test]
    fn recursion_now_and_then_on_a_busy_function_is_no_cycle() {
        let mut s = Stream::new(&["inv_a", "inv_b"]);
        s.cores = 1.0;
        for _ in 0..6 {
            // a calls b 20,000 times from outside; b calls a once, and a
            // calls itself: neither edge makes a cycle.
            let out = s.tick(
                &[20_000, 20_000],
                &[],
                &[(1, 0, 20_000), (0, 1, 5), (0, 0, 900)],
            );
            assert!(!out.loop_found, "{out:?}");
        }
    }

    #[test]
    fn keys_repeating_beyond_their_share_are_a_loop_and_distinct_keys_are_not() {
        let mut s = Stream::new(&["cache_invalidate"]);
        for i in 0..5u64 {
            let keys: Vec<(u32, u64, u64)> = (0..200).map(|k| (0, i * 200 + k, 1)).collect();
            s.tick(&[200], &keys, &[]);
        }
        s.cores = 1.0;
        let mut found = Vec::new();
        for _ in 0..3 {
            let out = s.tick(&[30_000], &[(0, 7, 15_000), (0, 9, 15_000)], &[]);
            found.extend(loops(&out).into_iter().cloned());
        }
        assert_eq!(found.len(), 1);
        assert!(found[0].repeating);
        let keys: Vec<u64> = found[0].top_keys.iter().map(|(k, _)| k.hash).collect();
        assert_eq!(keys, [7, 9]);
        assert!(
            found[0]
                .top_keys
                .iter()
                .all(|(k, n)| k.text && *n == 15_000)
        );

        // Flat out from attach on a busy core, each call a new key.
        let mut busy = Stream::new(&["cache_invalidate"]);
        busy.cores = 1.0;
        for i in 0..6u64 {
            let keys: Vec<(u32, u64, u64)> = (0..3000).map(|k| (0, i * 3000 + k, 10)).collect();
            assert!(!busy.tick(&[30_000], &keys, &[]).loop_found);
        }
    }

    #[test]
    fn a_key_cycle_running_at_attach_is_a_loop_naming_the_keys_in_order() {
        let mut s = Stream::new(&["cache_invalidate"]);
        s.cores = 1.0;
        // Product 5 led into the page (1), which walks to the fragment (2)
        // and back, again and again.
        s.walk(&[(0, 5, 1, 1)]);
        let mut found = Vec::new();
        for _ in 0..3 {
            s.walk(&[(0, 1, 2, 10_000), (0, 2, 1, 10_000)]);
            let out = s.tick(&[20_000], &[(0, 1, 10_000), (0, 2, 10_000)], &[]);
            found.extend(loops(&out).into_iter().cloned());
        }
        assert_eq!(found.len(), 1, "{found:?}");
        let cycle: Vec<u64> = found[0]
            .key_cycle
            .as_ref()
            .unwrap()
            .iter()
            .map(|k| k.hash)
            .collect();
        assert_eq!(cycle, [1, 2]);
        assert_eq!(found[0].verdicts[0].cause, detect::Cause::KeyCycle);
    }

    #[test]
    fn a_loop_spread_over_a_pool_of_workers_adds_up_to_one_record() {
        // Four workers of one name; each goes from 30 to 400 calls/s and
        // from a tenth to a third of a core: none is a loop alone (under
        // --threshold, no core burnt), together they burn 1.4 cores more.
        let catalog = catalog(&["cache_invalidate"]);
        let mut analyzer = Analyzer::new(Settings::default());
        let pids = [11, 12, 13, 14];
        let mut totals = [0u64; 4];
        let mut cpu = [0u64; 4];
        let mut found = Vec::new();
        for tick in 1..=12 {
            let (rate, cores) = if tick <= 6 { (30, 0.1) } else { (400, 0.45) };
            let mut snap = Snapshot {
                seconds: 1.0,
                elapsed: f64::from(tick),
                probed: 1.0,
                report: true,
                ..Snapshot::default()
            };
            for (i, &pid) in pids.iter().enumerate() {
                totals[i] += rate;
                cpu[i] += (cores * 1e9) as u64;
                let mut facts = process(true);
                facts.pid = pid;
                facts.comm = "worker".into();
                facts.cpu_nanos = Some(cpu[i]);
                snap.processes.push(facts);
                snap.counts.push(Count {
                    func: 0,
                    pid,
                    calls: totals[i],
                });
            }
            let out = analyzer.analyze(&catalog, &snap);
            found.extend(loops(&out).into_iter().cloned());
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].processes, pids);
        assert_eq!(found[0].functions, [0]);
        assert_eq!(found[0].verdicts[0].rate, 1600.0);
    }

    #[test]
    fn keys_too_long_to_hash_in_full_are_kept_out_of_the_key_rules() {
        let long = |k: u64| k | profiler_common::KEY_TRUNCATED;
        let mut s = Stream::new(&["cache_invalidate"]);
        for i in 0..5u64 {
            let keys: Vec<(u32, u64, u64)> = (0..200).map(|k| (0, i * 200 + k, 1)).collect();
            s.tick(&[200], &keys, &[]);
        }
        s.cores = 1.0;
        // Two "keys" that may each stand for many, and a walk between them.
        for _ in 0..3 {
            s.walk(&[(0, long(1), long(2), 10_000), (0, long(2), long(1), 10_000)]);
            let out = s.tick(&[200], &[(0, long(1), 10_000), (0, long(2), 10_000)], &[]);
            assert!(!out.loop_found, "{out:?}");
        }
    }

    #[test]
    fn a_function_touching_a_loops_keys_now_and_then_is_not_in_it() {
        // cache_invalidate walks the cycle; cache_get read one of its keys
        // twice in the reading, right after it: not its loop.
        let mut s = Stream::new(&["cache_invalidate", "cache_get"]);
        s.cores = 1.0;
        let mut found = Vec::new();
        for _ in 0..3 {
            s.walk(&[(0, 1, 2, 10_000), (0, 2, 1, 10_000), (1, 1, 2, 2)]);
            let out = s.tick(&[20_000, 3], &[(0, 1, 10_000), (0, 2, 10_000)], &[]);
            found.extend(loops(&out).into_iter().cloned());
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].functions, [0], "{found:?}");
    }

    #[test]
    fn a_queue_brokers_hot_keys_learned_calm_are_not_a_loop() {
        // Two lists take every write and alternate, all day, on a calm core.
        let mut s = Stream::new(&["cache_invalidate"]);
        for _ in 0..30 {
            s.walk(&[(0, 1, 2, 1_500), (0, 2, 1, 1_500)]);
            let out = s.tick(&[3_000], &[(0, 1, 1_500), (0, 2, 1_500)], &[]);
            assert!(!out.loop_found, "{out:?}");
        }
    }

    #[test]
    fn requests_explain_a_surge_but_not_a_loop() {
        let mut s = Stream::new(&["cache_invalidate", "handle_request"]);
        for _ in 0..4 {
            s.tick(&[400, 200], &[], &[]);
        }
        // Traffic x10: invalidations per request hold.
        for _ in 0..5 {
            assert!(!s.tick(&[4_000, 2_000], &[], &[]).loop_found);
        }
        // Requests flat, invalidations x100.
        let found: usize = (0..4)
            .map(|_| loops(&s.tick(&[40_000, 200], &[], &[])).len())
            .sum();
        assert_eq!(found, 1);
    }

    #[test]
    fn exit_is_reported_once_and_a_reused_pid_starts_fresh() {
        let mut s = Stream::new(&["cache_invalidate"]);
        s.tick(&[100], &[], &[]);
        let mut snap = Snapshot {
            seconds: 1.0,
            probed: 1.0,
            processes: vec![process(false)],
            report: true,
            ..Snapshot::default()
        };
        let out = s.analyzer.analyze(&s.catalog, &snap);
        assert!(out.events.contains(&Event::TargetExit { pid: PID }));
        snap.processes[0].alive = true;
        snap.processes[0].start_time = 999;
        snap.counts = vec![Count {
            func: 0,
            pid: PID,
            calls: 7,
        }];
        let out = s.analyzer.analyze(&s.catalog, &snap);
        assert!(
            out.events
                .iter()
                .any(|e| matches!(e, Event::Sample { calls: 7, .. }))
        );
        assert_eq!(s.analyzer.summary().processes, 2);
    }

    #[test]
    fn every_interval_says_what_was_dropped_and_evicted() {
        let interval = |out: &Output| {
            out.events.iter().find_map(|e| match e {
                Event::Interval {
                    dropped, evicted, ..
                } => Some((*dropped, *evicted)),
                _ => None,
            })
        };
        let mut s = Stream::new(&["cache_invalidate"]);
        let out = s.tick(&[10], &[(0, 1, 5), (0, 2, 5)], &[]);
        assert_eq!(interval(&out), Some((0, 0)));
        // The kernel's LRU key map let key 2 go while the process lives.
        s.key_totals.remove(&(0, 2));
        let out = s.tick(&[10], &[(0, 1, 5)], &[]);
        assert_eq!(interval(&out), Some((0, 1)), "{out:?}");
        assert!(out.events.contains(&Event::Evicted { count: 1 }));
        // Said once as a warning; counted every interval.
        s.key_totals.remove(&(0, 1));
        let out = s.tick(&[10], &[], &[]);
        assert_eq!(interval(&out), Some((0, 1)), "{out:?}");
        assert!(
            !out.events
                .iter()
                .any(|e| matches!(e, Event::Evicted { .. }))
        );
    }

    #[test]
    fn a_service_restarting_all_day_keeps_the_summary_bounded() {
        let catalog = catalog(&["cache_invalidate", "cache_purge"]);
        let mut analyzer = Analyzer::new(Settings::default());
        for pid in 1..=(MAX_TOTALS as u32 + 500) {
            let mut facts = process(true);
            facts.pid = pid;
            let mut snap = Snapshot {
                seconds: 1.0,
                probed: 1.0,
                processes: vec![facts],
                counts: vec![Count {
                    func: 0,
                    pid,
                    calls: u64::from(pid),
                }],
                ..Snapshot::default()
            };
            analyzer.analyze(&catalog, &snap);
            snap.processes[0].alive = false;
            analyzer.analyze(&catalog, &snap);
        }
        assert!(
            analyzer.totals.len() <= MAX_TOTALS,
            "{}",
            analyzer.totals.len()
        );
        let summary = analyzer.summary();
        assert_eq!(summary.processes, MAX_TOTALS + 500);
        assert_eq!(
            summary.silent,
            [1],
            "cache_invalidate fired, cache_purge never"
        );
        assert_eq!(
            summary.busiest[0].0,
            MAX_TOTALS as u32 + 500,
            "the busiest kept"
        );
    }

    #[test]
    fn a_process_that_ran_exec_starts_fresh() {
        let baseline = |out: &Output| {
            out.events.iter().find_map(|e| match e {
                Event::Sample { baseline, .. } => Some(*baseline),
                _ => None,
            })
        };
        let mut s = Stream::new(&["cache_invalidate"]);
        for _ in 0..4 {
            s.tick(&[100], &[], &[]);
        }
        let out = s.tick(&[100], &[], &[]);
        assert!(matches!(baseline(&out), Some(Some(_))), "{out:?}");
        // Same pid and start time, another program: its counters start at
        // zero and it has no history.
        let mut exec = process(true);
        exec.exe = FileId { dev: 1, ino: 3 };
        let snap = Snapshot {
            seconds: 1.0,
            probed: 1.0,
            report: true,
            processes: vec![exec],
            counts: vec![Count {
                func: 0,
                pid: PID,
                calls: 7,
            }],
            ..Snapshot::default()
        };
        let out = s.analyzer.analyze(&s.catalog, &snap);
        assert_eq!(baseline(&out), Some(None), "{out:?}");
        assert_eq!(s.analyzer.summary().processes, 1, "the same process");
    }

    #[test]
    fn windows_scale_calls_and_mark_estimates() {
        let mut s = Stream::new(&["cache_invalidate"]);
        s.tick(&[100], &[], &[]);
        let snap = Snapshot {
            catalog: 1,
            seconds: 1.0,
            probed: 0.1,
            report: true,
            counts: vec![Count {
                func: 0,
                pid: PID,
                calls: 100 + 500,
            }],
            processes: vec![process(true)],
            ..Snapshot::default()
        };
        let out = s.analyzer.analyze(&s.catalog, &snap);
        assert!(out.events.iter().any(|e| matches!(
            e,
            Event::Sample { calls: 5000, estimated: true, rate, .. } if *rate == 5000.0
        )));
    }

    #[test]
    fn dropped_hits_and_map_pressure_are_reported() {
        let mut s = Stream::new(&["cache_invalidate"]);
        let snap = Snapshot {
            seconds: 1.0,
            probed: 1.0,
            dropped: 12,
            counts_capacity: 1,
            counts_entries: 1,
            counts: vec![Count {
                func: 0,
                pid: PID,
                calls: 1,
            }],
            processes: vec![process(true)],
            ..Snapshot::default()
        };
        let out = s.analyzer.analyze(&s.catalog, &snap);
        assert!(out.events.contains(&Event::Dropped { count: 12 }));
        assert!(
            out.events
                .iter()
                .any(|e| matches!(e, Event::MapPressure { .. }))
        );
        // Only news is reported.
        let out = s.analyzer.analyze(&s.catalog, &snap);
        assert!(
            !out.events
                .iter()
                .any(|e| matches!(e, Event::Dropped { .. } | Event::MapPressure { .. }))
        );
    }

    #[test]
    fn counters_that_restart_count_from_zero() {
        assert_eq!(since(205, 30), 30);
        let mut d: Deltas<u32> = Deltas::default();
        assert_eq!(d.advance(1, 5), 5);
        assert_eq!(d.advance(1, 205), 200);
        assert_eq!(d.advance(1, 30), 30);
        d.forget(|_| false);
        assert_eq!(d.advance(1, 1000), 1000);
    }
}
