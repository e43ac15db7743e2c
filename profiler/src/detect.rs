//! Turns call rates and the signals beside them into verdicts: is this a
//! runaway invalidation loop, or traffic?
//!
//! Pure logic, no system calls: the analyzer feeds one reading per
//! (process, function) series — a rate over a few hundred milliseconds,
//! and what else it saw in that reading — and gets back the events worth
//! reporting. Time is measured in seconds of readings, never in readings,
//! so the rules hold whatever the reading period.
//!
//! What a loop does that traffic does not, and how each is measured:
//!
//! - **Runaway rate.** The rate is `factor` times its learned baseline and
//!   at least `min_rate` calls/s. On its own that is also a warm-up, a mass
//!   expiry or a ban storm, so it must be **corroborated**: the process
//!   burns a core it did not burn before (a loop pins its thread; an
//!   expiry cycle or a warm-up waits on I/O and on clients), or each
//!   request makes far more invalidations than it used to
//!   (`--request-func`), or there is structure (below). When keys are
//!   captured and nearly every call drops a key not dropped before in that
//!   reading (re-invalidation ratio under one half: a mass expiry, a
//!   purge, a warm-up), the rate alone is never a loop.
//! - **Expensive calls.** A loop of slow calls may stay under `min_rate`
//!   (200 calls/s at 5 ms each pins a core): a rate `factor` times its
//!   baseline, at least [`EXPENSIVE_MIN_RATE`], with the process burning a
//!   core more than it learned, is suspect too.
//! - **Structure**, judged against what the series learned:
//!   - a *call cycle*: watched functions calling each other (each edge a
//!     real share of the calls; a function calling itself is recursion,
//!     not a cycle);
//!   - a *key cycle*: on one thread, the same keys following each other in
//!     the same order (A, B, A, B, ...) over most of the calls;
//!   - *repeating keys*: a few keys carry nearly every call, far beyond the
//!     share those keys carried in healthy history (a queue broker's lists
//!     and counters repeat all day: that share is learned, not alarming).
//!
//!   Structure the series showed in its calm history is not evidence.
//!   With history, new structure needs the rate to run away too
//!   (`factor` times the baseline) or a core to burn. With no history (a
//!   loop already running at attach), only a call or key cycle counts, and
//!   only while the process burns a core.
//! - **Sustain, k of n.** A series is confirmed once its suspect readings
//!   cover `structural_sustain` seconds of the last twice that (structure),
//!   or `sustain` seconds of the last one and a half times that (rate): a
//!   loop that dips now and then is still caught, a burst shorter than
//!   `sustain` never is.
//! - **Learning.** The first `warmup` seconds become the baseline; after
//!   that every reading that is neither suspect nor inside a loop of its
//!   process moves it, by `alpha` per second, rising by at most that share
//!   of itself per second. Suspect readings never feed it, so a burst or a
//!   loop cannot teach the detector that it is normal, and while a process
//!   loops, its starved functions do not learn to be idle.
//! - **Recovery.** Once in a loop, `sustain` seconds without a suspect
//!   reading report a recovery.
//!
//! What this module does not do: find the cycles (`cycles.rs`), or read the
//! kernel.

use std::{cell::Cell, collections::VecDeque};

// foldhash: see analyze.rs.
use foldhash::{HashMap, HashMapExt as _, HashSet};

/// The thresholds of the rules above. Every field has a command-line flag
/// but `alpha` and `cpu_cores`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rules {
    /// How many times the baseline a rate must reach to be a runaway.
    pub factor: f64,
    /// The least rate, in calls/s, that can be a runaway without a
    /// burning core (`--threshold`).
    pub min_rate: f64,
    /// Seconds of runaway readings that confirm a loop on the rate
    /// (`--sustain`); seconds without any that confirm a recovery.
    pub sustain: f64,
    /// Seconds of structural readings that confirm a loop
    /// (`--sustain-structural`).
    pub structural_sustain: f64,
    /// Seconds of history averaged into the first baseline (`--warmup`).
    pub warmup: f64,
    /// Weight per second of calm history in the baseline, in (0, 1].
    pub alpha: f64,
    /// CPU, in cores, that counts as a loop burning the process's thread.
    pub cpu_cores: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            factor: 10.0,
            min_rate: 1000.0,
            sustain: 2.0,
            structural_sustain: 0.5,
            warmup: 2.0,
            alpha: 0.2,
            cpu_cores: 0.85,
        }
    }
}

/// Baselines under this many calls/s are treated as this, so that an idle
/// function (baseline 0) is compared against something.
pub const BASELINE_FLOOR: f64 = 1.0;
/// The least rate an expensive loop can be called at, calls/s.
pub const EXPENSIVE_MIN_RATE: f64 = 20.0;
/// A core more than learned: what a loop burning a thread adds.
const CPU_RISE: f64 = 0.5;
/// A share of calls (repeating keys, a key cycle) counts as new when it is
/// this much above the learned share.
const SHARE_MARGIN: f64 = 0.3;
/// Few keys carry "nearly every call" from this share up.
pub const REPEAT_SHARE: f64 = 0.9;
/// A key cycle must carry this share of a function's keyed calls.
pub const KEY_CYCLE_SHARE: f64 = 0.5;
/// Under this re-invalidation ratio, a reading's keys are mostly new ones.
const DISTINCT_STORM: f64 = 0.5;
/// With no history, a cycle must carry at least this share of all the
/// process's watched calls.
pub const DOMINANT_CYCLE: f64 = 0.5;
/// Seconds a cycle seen before any history must run without a burning core
/// before it is learned as normal.
const UNSETTLED_SECONDS: f64 = 20.0;
/// Half-life of what calm traffic taught (the baseline's level, the shares
/// of keys and cycles): patterns come and go in minutes, not seconds.
pub const MEMORY_SECONDS: f64 = 600.0;
/// A thread at this much CPU in calm traffic is pinned already: a loop
/// cannot show on its CPU, so a runaway rate needs no more corroboration.
const PINNED: f64 = 0.75;

/// Identifies one series: a function (its index in the catalog) in one
/// process. [`ALL_FUNCTIONS`] is the process's functions together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub pid: u32,
    pub func: u32,
}

/// The function id of a process's sum over its judged functions: a loop
/// spread over several functions adds up there.
pub const ALL_FUNCTIONS: u32 = u32::MAX;

/// What the analyzer saw in a reading besides the rate.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Signals {
    /// In a call cycle with other watched functions.
    pub call_cycle: bool,
    /// Share of the calls that walked a key cycle (0 without one).
    pub key_cycle: f64,
    /// Share of all the process's watched calls that walked its call or
    /// key cycle.
    pub cycle_dominance: f64,
    /// With keys captured: share of the calls the few busiest keys carry.
    pub top_share: Option<f64>,
    /// With keys captured: 1 - distinct keys / keyed calls.
    pub reinvalidation: Option<f64>,
    /// The process's CPU in the reading, in cores, and its learned CPU.
    pub cpu: Option<f64>,
    pub cpu_baseline: Option<f64>,
    /// Requests (`--request-func`) rose with the invalidations: traffic.
    pub explained_by_requests: bool,
    /// Invalidations per request rose `factor / 2` times over learned.
    pub per_request_risen: bool,
    /// Another series of the process is in a loop: learn nothing.
    pub process_looping: bool,
    /// The function was picked for its heat (no `--func`): with no history
    /// of its own it is not judged (learned first, then judged like any
    /// other). Heat is no evidence: a healthy recursive parser is hot and
    /// calls itself through others all day, and a step in load raises its
    /// process's CPU.
    pub heat_only: bool,
    /// The reading had no evidence of its own (the quiet part of a reading
    /// that folded in readings let go: its call sites span the whole
    /// reading). Its structure is neither judged nor taught: the shares a
    /// series learned are only forgotten, at the usual pace, and a warm-up
    /// averages its shares over its readings with evidence.
    pub no_evidence: bool,
}

impl Signals {
    /// Nothing that could make a reading with no calls suspect or teach
    /// its series anything but a zero: no cycle, no key share.
    fn quiet(&self) -> bool {
        !self.call_cycle && self.key_cycle == 0.0 && self.top_share.is_none()
    }
}

/// Why a loop was called: the strongest signal that confirmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    CallCycle,
    KeyCycle,
    RepeatingKeys,
    PerRequest,
    ExpensiveCalls,
    RunawayRate,
}

impl Cause {
    /// The name in `evidence.cause` (and `evidence.rule.name`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CallCycle => "call_cycle",
            Self::KeyCycle => "key_cycle",
            Self::RepeatingKeys => "repeating_keys",
            Self::PerRequest => "invalidations_per_request",
            Self::ExpensiveCalls => "expensive_calls",
            Self::RunawayRate => "sustained_rate_over_baseline",
        }
    }

    pub fn structural(self) -> bool {
        matches!(self, Self::CallCycle | Self::KeyCycle | Self::RepeatingKeys)
    }
}

/// The signals that agreed in a verdict, each named in `evidence.signals`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Agreed {
    pub rate: bool,
    pub cpu: bool,
    pub call_cycle: bool,
    pub key_cycle: bool,
    pub repeating_keys: bool,
    pub per_request: bool,
    /// There was no history to compare with.
    pub no_history: bool,
}

impl Agreed {
    /// Every signal either agreed on (`no_history` included).
    pub fn union(self, o: Self) -> Self {
        Self {
            rate: self.rate || o.rate,
            cpu: self.cpu || o.cpu,
            call_cycle: self.call_cycle || o.call_cycle,
            key_cycle: self.key_cycle || o.key_cycle,
            repeating_keys: self.repeating_keys || o.repeating_keys,
            per_request: self.per_request || o.per_request,
            no_history: self.no_history || o.no_history,
        }
    }

    /// The names of the signals that agreed, strongest first.
    pub fn names(self) -> Vec<&'static str> {
        [
            (self.call_cycle, "call_cycle"),
            (self.key_cycle, "key_cycle"),
            (self.repeating_keys, "repeating_keys"),
            (self.rate, "rate_over_baseline"),
            (self.per_request, "invalidations_per_request"),
            (self.cpu, "cpu"),
            (self.no_history, "no_history"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }

    fn cause(self, rate: f64, min_rate: f64) -> Option<Cause> {
        Some(if self.call_cycle {
            Cause::CallCycle
        } else if self.key_cycle {
            Cause::KeyCycle
        } else if self.repeating_keys {
            Cause::RepeatingKeys
        } else if self.per_request {
            Cause::PerRequest
        } else if self.rate && rate < min_rate {
            Cause::ExpensiveCalls
        } else if self.rate {
            Cause::RunawayRate
        } else {
            return None;
        })
    }
}

/// Something the detector wants reported.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A loop was confirmed in this reading.
    Loop(LoopVerdict),
    /// A loop that was confirmed earlier has calmed down.
    Recovered(Recovery),
}

/// Why a series was called a loop: the numbers behind the verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopVerdict {
    pub key: SeriesKey,
    /// Rate of the suspect readings, calls/s.
    pub rate: f64,
    /// The learned baseline the rates were compared with, calls/s (0
    /// without history).
    pub baseline: f64,
    /// The suspect readings' rates, oldest first.
    pub elevated_rates: Vec<f64>,
    /// Seconds those readings cover.
    pub elevated_seconds: f64,
    pub cause: Cause,
    pub agreed: Agreed,
    /// The baseline came from an earlier process of the same name.
    pub inherited: bool,
}

impl LoopVerdict {
    /// How many times the baseline the confirming rate is.
    pub fn ratio(&self) -> f64 {
        self.rate / self.baseline.max(BASELINE_FLOOR)
    }

    /// Confirmed on structure (a cycle, repeating keys), whatever the
    /// history.
    pub fn structural(&self) -> bool {
        self.cause.structural()
    }
}

/// A loop that is over.
#[derive(Clone, Debug, PartialEq)]
pub struct Recovery {
    pub key: SeriesKey,
    pub rate: f64,
    pub baseline: f64,
    /// Seconds from the loop's confirmation to its recovery.
    pub loop_seconds: f64,
    /// Highest rate seen while in the loop.
    pub peak_rate: f64,
}

/// What a series learned from its calm readings; carried to the next
/// process of the same name.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Learned {
    pub baseline: f64,
    /// The highest baseline of the last minutes (halving every
    /// [`MEMORY_SECONDS`]): a service idle for a while and back at its usual
    /// rate is not a runaway.
    pub level: f64,
    /// Shares of the calls the busiest keys, a key cycle, and a call cycle
    /// (0 or 1) took in calm readings: learned at the baseline's pace and
    /// forgotten over minutes, so that a pattern seen a minute ago is still
    /// known, and one calm reading of a loop's start is not.
    pub top_share: f64,
    pub key_cycle: f64,
    pub call_cycle: f64,
    /// Enough keyed calls were seen in calm traffic to know `top_share`.
    pub top_known: bool,
}

#[derive(Debug, Default)]
struct Series {
    /// Calls, seconds and shares of the warm-up, then what was learned.
    warm_calls: f64,
    warm_seconds: f64,
    /// Of `warm_seconds`, those with evidence (see [`Signals::no_evidence`]).
    warm_evidence_seconds: f64,
    warm_shares: Learned,
    learned: Option<Learned>,
    inherited: bool,
    /// Seconds of structure seen before any history, never corroborated.
    unsettled: f64,
    /// The last readings (seconds, rate, suspect signals), newest last,
    /// covering the longest sustain window.
    recent: VecDeque<Reading>,
    looping: Option<Looping>,
}

#[derive(Clone, Copy, Debug)]
struct Reading {
    seconds: f64,
    rate: f64,
    structural: Option<Agreed>,
    /// A runaway rate, corroborated or not yet.
    runaway: Option<Agreed>,
    /// A core burning (or the per-request ratio risen, or no CPU reading
    /// to go by) in this reading.
    corroborated: bool,
    /// Structure was seen with no history to judge it by: a loop already
    /// running at attach, not corroborated yet. Never learned as normal.
    unlearnable: bool,
}

impl Reading {
    /// Suspect in any way: on structure, on the rate (corroborated or
    /// not), or structure seen before any history.
    fn watchful(&self) -> bool {
        self.structural.is_some() || self.runaway.is_some() || self.unlearnable
    }
}

#[derive(Debug)]
struct Looping {
    seconds: f64,
    peak: f64,
    calm_seconds: f64,
}

/// The per-series state machines.
///
/// A series that has seen no call yet holds nothing: its readings are all
/// calm zeros, and what they taught it (the seconds of its warm-up, then a
/// baseline of zero) is the same for every such series of a process that
/// came into the catalog at the same time. So those are kept per process
/// and stretch of the catalog ([`Quiet`]), and a series is made, with
/// that history, at its first call. With 10,000 watched functions of which
/// a few are called, that is a few series, not 10,000 (0.8 KB each).
#[derive(Debug, Default)]
pub struct Detector {
    rules: Rules,
    series: HashMap<SeriesKey, Series>,
    quiet: HashMap<u32, Quiet>,
}

/// The history the not-yet-called series of one process share.
#[derive(Debug, Default)]
struct Quiet {
    /// Functions below `.0` (catalog ids) that were in the catalog when the
    /// process was first read, then each later growth of the catalog: the
    /// seconds their quiet series learned since (oldest first, so each
    /// stretch covers the ids from the previous one's end). Stretches past
    /// their warm-up are merged: they hold the same history.
    stretches: Vec<(u32, f64)>,
    /// The first stretch starts from an earlier process of the same name
    /// whose quiet series had learned their zero baseline (a restart),
    /// except these functions, which had histories of their own there
    /// (inherited one by one, or not at all).
    inherited: Option<HashSet<u32>>,
}

impl Quiet {
    /// Seconds learned by function `func`'s quiet series, and whether it
    /// inherited its zero baseline; `None` when no stretch covers it.
    fn stretch(&self, func: u32) -> Option<(f64, bool)> {
        let i = self.stretches.partition_point(|&(end, _)| end <= func);
        let &(_, seconds) = self.stretches.get(i)?;
        let inherited = i == 0
            && self
                .inherited
                .as_ref()
                .is_some_and(|except| !except.contains(&func));
        Some((seconds, inherited))
    }

    /// Merges the stretches past `warmup` (after an inherited first one):
    /// a catalog growing one function at a time (interpreted names, hot
    /// picks) must not leave a stretch per function for the whole run.
    fn merge_warm(&mut self, warmup: f64) {
        let first = usize::from(self.inherited.is_some());
        let warm = self.stretches[first.min(self.stretches.len())..]
            .iter()
            .take_while(|s| s.1 + 1e-9 >= warmup)
            .count();
        if warm > 1 {
            // The oldest's seconds (any warm value learns the same), the
            // newest's end.
            let end = self.stretches[first + warm - 1].0;
            self.stretches[first].0 = end;
            self.stretches.drain(first + 1..first + warm);
        }
    }
}

/// Moves `value` toward `target` by weight `w`, rising by at most `w` of
/// itself (floored at `floor`): one partial reading at a loop's start must
/// not lift the bar for the rest of the loop.
fn learn(value: f64, target: f64, w: f64, floor: f64) -> f64 {
    let step = (target - value).min(value.max(floor));
    value + w * step
}

impl Detector {
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            series: HashMap::new(),
            quiet: HashMap::new(),
        }
    }

    /// Starts a reading of process `pid`, whose catalog now has `functions`
    /// functions: the ones new to it start quiet. Call before its series'
    /// readings, then [`Detector::end_reading`].
    pub fn begin_reading(&mut self, pid: u32, functions: u32) {
        let quiet = self.quiet.entry(pid).or_default();
        let known = quiet.stretches.last().map_or(0, |&(end, _)| end);
        if functions > known {
            quiet.stretches.push((functions, 0.0));
        }
    }

    /// Ends a reading of `seconds` of process `pid`: its quiet series learn
    /// from it as a called one would from a calm zero, unless another series
    /// of the process is in a loop (`process_looping`, as in [`Signals`]).
    pub fn end_reading(&mut self, pid: u32, seconds: f64, process_looping: bool) {
        if process_looping {
            return;
        }
        if let Some(quiet) = self.quiet.get_mut(&pid) {
            for stretch in &mut quiet.stretches {
                stretch.1 += seconds;
            }
            quiet.merge_warm(self.rules.warmup);
        }
    }

    /// The new process `pid` starts from an earlier process of its name
    /// whose first `functions` quiet series had learned (a restart), all
    /// but those in `except` (they had histories of their own). Before its
    /// first reading.
    pub fn inherit_quiet(&mut self, pid: u32, functions: u32, except: HashSet<u32>) {
        let quiet = self.quiet.entry(pid).or_default();
        if quiet.stretches.is_empty() && functions > 0 {
            quiet.stretches.push((functions, 0.0));
            quiet.inherited = Some(except);
        }
    }

    /// The state of a series with no reading of its own: what its
    /// process's quiet stretch taught it, or nothing.
    fn fresh(rules: &Rules, quiet: Option<&Quiet>, func: u32) -> Series {
        let Some((seconds, inherited)) = quiet.and_then(|q| q.stretch(func)) else {
            return Series::default();
        };
        if inherited {
            return Series {
                learned: Some(Learned::default()),
                inherited: true,
                ..Series::default()
            };
        }
        // A warm-up of zeros learns a baseline of zero (`learn_from`), and
        // zeros after it keep every learned share at zero.
        Series {
            warm_seconds: seconds,
            warm_evidence_seconds: seconds,
            learned: (seconds + 1e-9 >= rules.warmup).then(Learned::default),
            ..Series::default()
        }
    }

    /// The series `key`, made from its quiet history if it has none yet,
    /// and the rules (borrowed beside it).
    fn series_mut(&mut self, key: SeriesKey) -> (&Rules, &mut Series) {
        let (rules, quiet) = (&self.rules, &self.quiet);
        let series = self
            .series
            .entry(key)
            .or_insert_with(|| Self::fresh(rules, quiet.get(&key.pid), key.func));
        (rules, series)
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Feeds a reading of `seconds` with only a rate.
    pub fn observe(&mut self, key: SeriesKey, rate: f64, seconds: f64) -> Option<Event> {
        self.observe_with(key, rate, seconds, Signals::default())
    }

    /// Starts a series from what an earlier process of the same name
    /// learned (a restart), unless it has history of its own.
    pub fn inherit(&mut self, key: SeriesKey, learned: Learned) {
        let (_, series) = self.series_mut(key);
        if series.learned.is_none() && series.warm_seconds == 0.0 {
            series.learned = Some(learned);
            series.inherited = true;
        }
    }

    /// What a series learned, once its warm-up is over.
    /// (A series never judged has none: not one never called, whose
    /// quiet history is only made into a series at its first call, nor a
    /// request function, which is counted, not judged.)
    pub fn learned(&self, key: SeriesKey) -> Option<Learned> {
        self.series.get(&key).and_then(|s| s.learned)
    }

    /// What series `key` has learned, its quiet history included.
    #[cfg(test)]
    fn history(&self, key: SeriesKey) -> Option<Learned> {
        match self.series.get(&key) {
            Some(s) => s.learned,
            None => Self::fresh(&self.rules, self.quiet.get(&key.pid), key.func).learned,
        }
    }

    /// Feeds one reading with the analyzer's other signals.
    pub fn observe_with(
        &mut self,
        key: SeriesKey,
        rate: f64,
        seconds: f64,
        signals: Signals,
    ) -> Option<Event> {
        // A calm zero for a series with only calm zeros so far: its quiet
        // stretch learns it (`end_reading`).
        if rate == 0.0
            && signals.quiet()
            && !self.series.contains_key(&key)
            && self
                .quiet
                .get(&key.pid)
                .is_some_and(|q| q.stretch(key.func).is_some())
        {
            return None;
        }
        let (rules, series) = self.series_mut(key);
        let learned = series.learned;
        let (structural, runaway, corroborated, structure) = judge(rules, learned, rate, &signals);
        let suspect = structural.is_some() || runaway.is_some();
        // Structure with no history is not learned as normal, until it has
        // run calm for longer than any loop would (a queue broker emptying
        // its queues in turn since before attach).
        if structure && learned.is_none() && structural.is_none() {
            series.unsettled += seconds;
        }
        let unlearnable = structure && learned.is_none() && series.unsettled < UNSETTLED_SECONDS;

        series.recent.push_back(Reading {
            seconds,
            rate,
            structural,
            runaway,
            corroborated,
            unlearnable,
        });
        let keep = rules.sustain * 1.5 + seconds;
        let mut covered: f64 = series.recent.iter().map(|r| r.seconds).sum();
        while covered > keep && series.recent.len() > 1 {
            covered -= series.recent.pop_front().map_or(0.0, |r| r.seconds);
        }

        if let Some(looping) = &mut series.looping {
            looping.seconds += seconds;
            if suspect {
                looping.calm_seconds = 0.0;
                looping.peak = looping.peak.max(rate);
                return None;
            }
            looping.calm_seconds += seconds;
            if looping.calm_seconds + 1e-9 < rules.sustain {
                return None;
            }
            let recovery = Recovery {
                key,
                rate,
                baseline: learned.map_or(0.0, |l| l.baseline),
                loop_seconds: looping.seconds,
                peak_rate: looping.peak,
            };
            series.looping = None;
            series.recent.clear();
            return Some(Event::Recovered(recovery));
        }

        // A rise nothing corroborates is learned, at the capped pace: a
        // lasting step in traffic becomes the new normal in seconds. A
        // cycle seen before any history is not: on a contended machine a
        // loop already running at attach may get less than a core for a
        // while, and must not become the baseline meanwhile.
        if structural.is_none() && (runaway.is_none() || !corroborated) {
            if !signals.process_looping && !unlearnable {
                // A rise nothing corroborates yet is learned ten times
                // slower: a lasting step in traffic in a minute or two, a
                // loop on a machine too slow to show it burning a core not
                // before it is caught on its structure.
                let pace = if runaway.is_some() { 0.1 } else { 1.0 };
                learn_from(rules, series, rate, seconds * pace, &signals);
            }
            runaway?;
        }

        // k of n, in seconds: structure over the last 2 x its sustain, the
        // rate over the last 1.5 x its sustain, corroborated over at least
        // half of that (a loop that dips shows a burning core in most of
        // its readings, not in each).
        let window = |span: f64, pick: &dyn Fn(&Reading) -> Option<Agreed>| {
            let mut seen = 0.0;
            let mut suspect = 0.0;
            let mut corroborated = 0.0;
            let mut agreed = Agreed::default();
            let mut rates = Vec::new();
            for r in series.recent.iter().rev() {
                if seen + 1e-9 >= span {
                    break;
                }
                seen += r.seconds;
                if let Some(a) = pick(r) {
                    suspect += r.seconds;
                    if r.corroborated || r.structural.is_some() {
                        corroborated += r.seconds;
                        agreed = agreed.union(a);
                    }
                    rates.push((r.rate, r.seconds));
                }
            }
            rates.reverse();
            (suspect, corroborated, agreed, rates)
        };
        let s = rules.structural_sustain;
        let (struct_seconds, _, struct_agreed, struct_rates) =
            window(2.0 * s, &|r: &Reading| r.structural);
        let (rate_seconds, rate_corroborated, rate_agreed, rate_rates) =
            window(1.5 * rules.sustain, &|r: &Reading| {
                r.runaway.or(r.structural)
            });
        let (agreed, rates) = if struct_seconds + 1e-9 >= s {
            (struct_agreed, struct_rates)
        } else if rate_seconds + 1e-9 >= rules.sustain
            && rate_corroborated + 1e-9 >= rules.sustain / 2.0
        {
            (rate_agreed, rate_rates)
        } else {
            return None;
        };
        let elevated_seconds: f64 = rates.iter().map(|&(_, s)| s).sum();
        let calls: f64 = rates.iter().map(|&(r, s)| r * s).sum();
        let mean = calls / elevated_seconds.max(1e-9);
        let cause = agreed.cause(mean, rules.min_rate)?;
        let verdict = LoopVerdict {
            key,
            rate: mean,
            baseline: learned.map_or(0.0, |l| l.baseline),
            elevated_rates: rates.iter().map(|&(r, _)| r).collect(),
            elevated_seconds,
            cause,
            agreed,
            inherited: series.inherited,
        };
        let peak = verdict.elevated_rates.iter().copied().fold(0.0, f64::max);
        series.looping = Some(Looping {
            seconds: 0.0,
            peak,
            calm_seconds: 0.0,
        });
        Some(Event::Loop(verdict))
    }

    /// The learned baseline of a series, once warm-up is over.
    pub fn baseline(&self, key: SeriesKey) -> Option<f64> {
        self.learned(key).map(|l| l.baseline)
    }

    /// Whether a series is in a confirmed loop now.
    pub fn in_loop(&self, key: SeriesKey) -> bool {
        self.series.get(&key).is_some_and(|s| s.looping.is_some())
    }

    /// Whether the last reading of a series was suspect (a rise nothing
    /// corroborated is not), or showed a cycle before any history: what the
    /// process burns then is not its normal.
    pub fn suspect(&self, key: SeriesKey) -> bool {
        self.series
            .get(&key)
            .and_then(|s| s.recent.back())
            .is_some_and(|r| {
                r.structural.is_some() || (r.runaway.is_some() && r.corroborated) || r.unlearnable
            })
    }

    /// The least rate, in calls/s, at which series `key` could be judged a
    /// runaway at its next reading without a core burning: a verdict on
    /// the rate needs `factor` times its baseline and `min_rate`; one on
    /// structure the same with history, a burning core without (see
    /// [`judge`]). 0 while it is in a loop or its last reading was suspect
    /// in any way (a rise not corroborated yet, structure before any
    /// history): every reading counts then. A series with no call yet has
    /// its process's quiet history: a baseline of zero, or none.
    pub fn alarm_rate(&self, key: SeriesKey) -> f64 {
        let min_rate = self.rules.min_rate;
        let Some(series) = self.series.get(&key) else {
            return min_rate;
        };
        if series.looping.is_some() || series.recent.back().is_some_and(Reading::watchful) {
            return 0.0;
        }
        series.learned.map_or(min_rate, |l| {
            min_rate.max(self.rules.factor * l.baseline.max(l.level).max(BASELINE_FLOOR))
        })
    }

    /// Whether some series is in a loop, or its last reading was suspect
    /// in any way (see [`Detector::alarm_rate`]).
    pub fn active(&self) -> bool {
        self.series
            .values()
            .any(|s| s.looping.is_some() || s.recent.back().is_some_and(Reading::watchful))
    }

    /// Whether any series of a process is in a confirmed loop now.
    pub fn process_in_loop(&self, pid: u32) -> bool {
        self.series
            .iter()
            .any(|(k, s)| k.pid == pid && s.looping.is_some())
    }

    /// How many of process `pid`'s first catalog functions, never called,
    /// have learned their (zero) baseline: what a restart of it inherits
    /// for them ([`Detector::inherit_quiet`]).
    /// The functions below it with a series of their own are in
    /// [`Detector::forget_process`]'s list, or learned nothing: a restart
    /// inherits those one by one, or not at all.
    pub fn quiet_learned(&self, pid: u32) -> u32 {
        let Some(quiet) = self.quiet.get(&pid) else {
            return 0;
        };
        quiet
            .stretches
            .iter()
            .enumerate()
            .take_while(|&(i, &(_, seconds))| {
                (i == 0 && quiet.inherited.is_some()) || seconds + 1e-9 >= self.rules.warmup
            })
            .last()
            .map_or(0, |(_, &(end, _))| end)
    }

    /// The functions of process `pid` with a series of their own.
    pub fn judged_functions(&self, pid: u32) -> HashSet<u32> {
        self.series
            .keys()
            .filter(|k| k.pid == pid)
            .map(|k| k.func)
            .collect()
    }

    /// Drops every series of a process that is gone, so that a new process
    /// that reuses its pid starts from scratch. Returns what each learned.
    pub fn forget_process(&mut self, pid: u32) -> Vec<(u32, Learned)> {
        self.quiet.remove(&pid);
        let mut learned = Vec::new();
        self.series.retain(|key, s| {
            if key.pid != pid {
                return true;
            }
            if let Some(l) = s.learned {
                learned.push((key.func, l));
            }
            false
        });
        learned
    }
}

/// Whether a reading is suspect on structure, on the rate, or not at all,
/// with the signals that agreed; whether something corroborates a runaway
/// rate in it; and whether it shows structure the series did not learn.
fn judge(
    rules: &Rules,
    learned: Option<Learned>,
    rate: f64,
    signals: &Signals,
) -> (Option<Agreed>, Option<Agreed>, bool, bool) {
    let history = learned.is_some();
    let baseline = learned
        .map_or(0.0, |l| l.baseline.max(l.level))
        .max(BASELINE_FLOOR);
    let cpu_hot = signals.cpu.is_some_and(|cpu| {
        cpu >= rules.cpu_cores && signals.cpu_baseline.is_none_or(|b| cpu >= b + CPU_RISE)
    });
    let rate_up = history && rate >= rules.factor * baseline;

    // Structure, against what the series learned.
    let was = learned.unwrap_or_default();
    let call_cycle = signals.call_cycle && was.call_cycle < 0.5;
    let key_cycle =
        signals.key_cycle >= KEY_CYCLE_SHARE && signals.key_cycle >= was.key_cycle + SHARE_MARGIN;
    let repeating = history
        && was.top_known
        && signals.top_share.is_some_and(|share| {
            share >= REPEAT_SHARE
                && share >= was.top_share + SHARE_MARGIN
                && signals.reinvalidation.is_some_and(|r| r >= REPEAT_SHARE)
        });
    let agreed = Agreed {
        rate: rate_up,
        cpu: cpu_hot,
        call_cycle,
        key_cycle,
        repeating_keys: repeating,
        per_request: signals.per_request_risen,
        no_history: !history,
    };
    // A thread pinned in calm traffic cannot show a loop on its CPU.
    let pinned = signals.cpu_baseline.is_some_and(|b| b >= PINNED);
    let corroborated = cpu_hot || signals.per_request_risen || pinned;
    let busy = rate >= rules.min_rate || cpu_hot;
    // Structure speeds a verdict up; it never makes one on its own: with
    // history, a cycle needs the rate up or a burning core, and a few hot
    // keys (a flash sale on one item is healthy) a corroborated runaway;
    // with none, a cycle needs a burning core.
    // A function picked for its heat has a history of its own before it
    // is judged: heat is no evidence (a recursive parser is hot and calls
    // itself through others all day, and a step in load raises the CPU).
    let structural = busy
        && !(signals.heat_only && !history)
        && if history {
            ((call_cycle || key_cycle) && (rate_up || cpu_hot))
                || (repeating && rate_up && corroborated)
        } else {
            // No history: the cycle must be most of what the process does
            // (a busy server emptying a few queues in turn is not a loop).
            (call_cycle || key_cycle) && cpu_hot && signals.cycle_dominance >= DOMINANT_CYCLE
        };

    // The rate; corroborated over the window (see `observe_with`).
    let distinct_storm = signals.reinvalidation.is_some_and(|r| r < DISTINCT_STORM);
    let fast = rate >= rules.min_rate;
    let expensive = cpu_hot && rate >= EXPENSIVE_MIN_RATE;
    let runaway =
        rate_up && (fast || expensive) && !signals.explained_by_requests && !distinct_storm;
    let structure = call_cycle || key_cycle || repeating;
    (
        structural.then_some(agreed),
        (runaway || structural).then_some(agreed),
        corroborated,
        structure,
    )
}

/// `base.powf(exp)`, remembered for the last few pairs asked: every
/// series of a reading raises the same two bases to the same seconds, and
/// with 1000 functions `pow` alone took over 1% of the loader's CPU.
fn pow(base: f64, exp: f64) -> f64 {
    const REMEMBERED: usize = 4;
    /// (base's bits, exponent's bits, the power) of each, and which to
    /// replace next.
    type Last = ([(u64, u64, f64); REMEMBERED], usize);
    thread_local! {
        static LAST: Cell<Last> =
            const { Cell::new(([(u64::MAX, u64::MAX, f64::NAN); REMEMBERED], 0)) };
    }
    let asked = (base.to_bits(), exp.to_bits());
    LAST.with(|last| {
        let (mut pairs, next) = last.get();
        if let Some(&(_, _, value)) = pairs.iter().find(|p| (p.0, p.1) == asked) {
            return value;
        }
        let value = base.powf(exp);
        pairs[next] = (asked.0, asked.1, value);
        last.set((pairs, (next + 1) % REMEMBERED));
        value
    })
}

/// A calm reading: the warm-up, then the learned baseline and shares.
fn learn_from(rules: &Rules, series: &mut Series, rate: f64, seconds: f64, signals: &Signals) {
    let w = 1.0 - pow(1.0 - rules.alpha.clamp(0.0, 1.0), seconds);
    // Too few keyed calls to say: what was learned stands.
    let known = signals.top_share.is_some();
    let top = signals.top_share.unwrap_or(0.0);
    let cycle = if signals.call_cycle { 1.0 } else { 0.0 };
    match &mut series.learned {
        Some(l) => {
            l.baseline = learn(l.baseline, rate, w, BASELINE_FLOOR);
            // What calm traffic showed for a while is normal for minutes
            // after: learned at the baseline's pace, forgotten slowly.
            let keep = pow(0.5, seconds / MEMORY_SECONDS);
            let remember = |was: f64, now: f64| {
                if now > was {
                    was + w * (now - was)
                } else {
                    (was * keep).max(now)
                }
            };
            l.level = (l.level * keep).max(l.baseline);
            if known {
                l.top_share = remember(l.top_share, top);
            }
            if signals.no_evidence {
                // Forgotten at the usual pace, never taught.
                l.key_cycle *= keep;
                l.call_cycle *= keep;
            } else {
                l.top_known |= known;
                l.key_cycle = remember(l.key_cycle, signals.key_cycle);
                l.call_cycle = remember(l.call_cycle, cycle);
            }
        }
        None => {
            // The warm-up's shares are its averages (over its seconds with
            // evidence).
            series.warm_calls += rate * seconds;
            series.warm_seconds += seconds;
            if !signals.no_evidence {
                series.warm_evidence_seconds += seconds;
                let shares = &mut series.warm_shares;
                shares.top_share += top * seconds;
                shares.top_known |= known;
                shares.key_cycle += signals.key_cycle * seconds;
                shares.call_cycle += cycle * seconds;
            }
            if series.warm_seconds + 1e-9 >= rules.warmup {
                let t = series.warm_seconds;
                let baseline = series.warm_calls / t;
                let shares = &series.warm_shares;
                let e = series.warm_evidence_seconds.max(1e-9);
                series.learned = Some(Learned {
                    baseline,
                    level: baseline,
                    top_share: shares.top_share / e,
                    key_cycle: shares.key_cycle / e,
                    call_cycle: shares.call_cycle / e,
                    top_known: shares.top_known,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: SeriesKey = SeriesKey { pid: 42, func: 0 };
    /// The default reading period.
    const READ: f64 = 0.25;

    /// Feeds `seconds` of readings to every function below `functions` of
    /// process 42 (`rates[f]`, 0 for the others), as the analyzer does.
    fn feed(d: &mut Detector, functions: u32, rates: &[f64], seconds: f64) -> Vec<Event> {
        let mut events = Vec::new();
        let mut t = 0.0;
        while t + 1e-9 < seconds {
            d.begin_reading(42, functions);
            for func in 0..functions {
                let rate = rates.get(func as usize).copied().unwrap_or(0.0);
                let key = SeriesKey { pid: 42, func };
                events.extend(d.observe_with(key, rate, READ, hot()));
            }
            d.end_reading(42, READ, false);
            t += READ;
        }
        events
    }

    #[test]
    fn never_called_functions_hold_no_series_and_keep_their_history() {
        let mut d = Detector::new(Rules::default());
        // 10,000 functions, one called: one series.
        feed(&mut d, 10_000, &[100.0], 5.0);
        assert_eq!(d.series.len(), 1);
        let quiet = SeriesKey { pid: 42, func: 7 };
        assert_eq!(d.history(quiet), Some(Learned::default()));
        // Not judged: nothing to report as its baseline.
        assert_eq!(d.learned(quiet), None);
        // One of them runs away after 5 s of silence: caught on its rate,
        // as a series fed every zero would be.
        let mut rates = vec![100.0; 8];
        rates[7] = 50_000.0;
        let events = feed(&mut d, 10_000, &rates, 3.0);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Loop(v) if v.key == quiet && v.baseline == 0.0)),
            "{events:?}"
        );
        // A function new to the catalog has no history yet: it warms up.
        let new = SeriesKey {
            pid: 42,
            func: 10_000,
        };
        feed(&mut d, 10_001, &[], READ);
        assert_eq!(d.history(new), None);
        feed(&mut d, 10_001, &[], Rules::default().warmup);
        assert_eq!(d.history(new), Some(Learned::default()));
        // Warm stretches are one: a catalog growing by one function a
        // reading keeps a few.
        for functions in 10_002..10_100 {
            feed(&mut d, functions, &[], READ);
        }
        assert!(d.quiet[&42].stretches.len() <= 10, "{:?}", d.quiet[&42]);
        // A restart of the process inherits its quiet functions' learning,
        // not the functions it called (their own histories go one by one).
        let learned = d.quiet_learned(42);
        assert!(learned >= 10_001, "{learned}");
        let judged = d.judged_functions(42);
        assert!(judged.contains(&7) && judged.contains(&0));
        d.forget_process(42);
        d.inherit_quiet(42, learned, judged);
        assert_eq!(d.history(quiet), None);
        let other = SeriesKey {
            pid: 42,
            func: 5000,
        };
        assert_eq!(d.history(other), Some(Learned::default()));
        assert!(d.series.is_empty());
    }

    /// A process burning a core more than it learned.
    fn hot() -> Signals {
        Signals {
            cpu: Some(1.0),
            cpu_baseline: Some(0.1),
            ..Signals::default()
        }
    }

    fn calm_cpu() -> Signals {
        Signals {
            cpu: Some(0.1),
            cpu_baseline: Some(0.1),
            ..Signals::default()
        }
    }

    /// Feeds readings of `READ` seconds, each `(rate, signals)`, `n` times
    /// per part; returns (seconds at the end of the reading, event).
    fn run(d: &mut Detector, parts: &[(f64, f64, Signals)]) -> Vec<(f64, Event)> {
        let mut t = 0.0;
        let mut events = Vec::new();
        for &(rate, seconds, signals) in parts {
            let n = (seconds / READ).round() as usize;
            for _ in 0..n {
                t += READ;
                if let Some(e) = d.observe_with(KEY, rate, READ, signals) {
                    events.push((t, e));
                }
            }
        }
        events
    }

    fn loops(events: &[(f64, Event)]) -> Vec<(f64, LoopVerdict)> {
        events
            .iter()
            .filter_map(|(t, e)| match e {
                Event::Loop(v) => Some((*t, v.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn runaway_burning_a_core_is_confirmed_after_sustain_seconds() {
        let mut d = Detector::new(Rules::default());
        let events = run(&mut d, &[(100.0, 10.0, calm_cpu()), (50_000.0, 5.0, hot())]);
        let found = loops(&events);
        assert_eq!(found.len(), 1, "{events:?}");
        let (at, v) = &found[0];
        // Started at t = 10 s; two seconds of it confirm.
        assert!((*at - 12.0).abs() < 1e-6, "confirmed at {at}");
        assert_eq!(v.baseline, 100.0);
        assert_eq!(v.cause, Cause::RunawayRate);
        assert!(v.agreed.rate && v.agreed.cpu);
        assert_eq!(v.ratio(), 500.0);
    }

    #[test]
    fn rate_alone_without_a_burning_core_is_traffic() {
        // A mass expiry or a ban storm: x50, but the process idles on I/O.
        let mut d = Detector::new(Rules::default());
        let events = run(
            &mut d,
            &[(100.0, 10.0, calm_cpu()), (5_000.0, 10.0, calm_cpu())],
        );
        assert_eq!(loops(&events), vec![]);
    }

    #[test]
    fn a_storm_of_distinct_keys_is_not_a_loop_even_on_a_busy_core() {
        let mut d = Detector::new(Rules::default());
        let expiry = Signals {
            top_share: Some(0.01),
            reinvalidation: Some(0.02),
            ..hot()
        };
        let events = run(
            &mut d,
            &[(100.0, 10.0, calm_cpu()), (20_000.0, 10.0, expiry)],
        );
        assert_eq!(loops(&events), vec![]);
    }

    #[test]
    fn healthy_bursts_do_not_alarm() {
        let mut d = Detector::new(Rules::default());
        let events = run(
            &mut d,
            &[
                (200.0, 10.0, calm_cpu()),
                (1000.0, 3.0, hot()), // x5 for three seconds
                (200.0, 5.0, calm_cpu()),
                (900.0, 4.0, hot()), // x4.5 for four seconds
                (200.0, 5.0, calm_cpu()),
                (5_000.0, 1.5, hot()), // x25, but for 1.5 s
                (200.0, 5.0, calm_cpu()),
            ],
        );
        assert_eq!(loops(&events), vec![]);
    }

    #[test]
    fn a_loop_that_dips_now_and_then_is_still_caught() {
        let mut d = Detector::new(Rules::default());
        let mut parts = vec![(100.0, 10.0, calm_cpu())];
        for _ in 0..4 {
            parts.push((30_000.0, 0.75, hot()));
            parts.push((100.0, 0.25, calm_cpu()));
        }
        assert_eq!(loops(&run(&mut d, &parts)).len(), 1);
    }

    #[test]
    fn an_expensive_loop_under_the_threshold_is_caught_on_its_core() {
        // 200 calls/s at 5 ms each after 10/s: under --threshold, but a core.
        let mut d = Detector::new(Rules::default());
        let events = run(&mut d, &[(10.0, 10.0, calm_cpu()), (200.0, 4.0, hot())]);
        let found = loops(&events);
        assert_eq!(found.len(), 1, "{events:?}");
        assert_eq!(found[0].1.cause, Cause::ExpensiveCalls);
        // The same rise with the core idle is nothing.
        let mut d = Detector::new(Rules::default());
        let events = run(
            &mut d,
            &[(10.0, 10.0, calm_cpu()), (200.0, 4.0, calm_cpu())],
        );
        assert_eq!(loops(&events), vec![]);
    }

    #[test]
    fn bursts_do_not_inflate_the_baseline() {
        let mut d = Detector::new(Rules::default());
        run(&mut d, &[(100.0, 5.0, calm_cpu()), (5_000.0, 1.0, hot())]);
        assert_eq!(d.baseline(KEY), Some(100.0));
    }

    #[test]
    fn lasting_step_in_traffic_is_learned() {
        let mut d = Detector::new(Rules::default());
        let events = run(
            &mut d,
            &[(300.0, 5.0, calm_cpu()), (600.0, 30.0, calm_cpu())],
        );
        assert_eq!(events, vec![]);
        assert!(d.baseline(KEY).unwrap() > 590.0);
    }

    #[test]
    fn slow_ramp_is_learned_not_flagged() {
        let mut d = Detector::new(Rules::default());
        // Organic growth: +5% a second for two minutes, on a busy core.
        let parts: Vec<(f64, f64, Signals)> = (0..120)
            .map(|i| (100.0 * 1.05f64.powi(i), 1.0, hot()))
            .collect();
        assert_eq!(loops(&run(&mut d, &parts)), vec![]);
    }

    #[test]
    fn loop_in_idle_function_is_flagged() {
        let mut d = Detector::new(Rules::default());
        let events = run(&mut d, &[(0.0, 5.0, calm_cpu()), (3_000.0, 4.0, hot())]);
        assert_eq!(loops(&events).len(), 1);
    }

    #[test]
    fn recovery_is_reported_after_sustain_calm_seconds() {
        let mut d = Detector::new(Rules::default());
        let events = run(
            &mut d,
            &[
                (100.0, 5.0, calm_cpu()),
                (30_000.0, 6.0, hot()),
                (110.0, 4.0, calm_cpu()),
            ],
        );
        let recovered: Vec<_> = events
            .iter()
            .filter_map(|(t, e)| match e {
                Event::Recovered(r) => Some((*t, r.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(recovered.len(), 1, "{events:?}");
        assert!((recovered[0].0 - 13.0).abs() < 1e-6, "{recovered:?}");
        assert_eq!(recovered[0].1.peak_rate, 30_000.0);
        assert!(!d.in_loop(KEY));
        assert!(d.baseline(KEY).is_some_and(|b| b < 200.0));
    }

    #[test]
    fn loop_running_at_attach_is_caught_from_its_cycle_in_half_a_second() {
        let mut d = Detector::new(Rules::default());
        let cycle = Signals {
            call_cycle: true,
            cycle_dominance: 1.0,
            ..hot()
        };
        let events = run(&mut d, &[(40_000.0, 2.0, cycle)]);
        let found = loops(&events);
        assert_eq!(found.len(), 1);
        assert!((found[0].0 - 0.5).abs() < 1e-6, "{found:?}");
        assert_eq!(found[0].1.cause, Cause::CallCycle);
        assert!(found[0].1.agreed.no_history);
        // The loop was never learned as the baseline.
        assert_eq!(d.baseline(KEY), None);
    }

    #[test]
    fn readings_without_evidence_forget_structure_at_the_usual_pace_and_never_teach_it() {
        let mut d = Detector::new(Rules::default());
        let cycle = Signals {
            call_cycle: true,
            ..calm_cpu()
        };
        let blind = Signals {
            no_evidence: true,
            ..calm_cpu()
        };
        // A healthy cycle, learned as normal once it ran calm for longer
        // than a loop would; half the warm-up without evidence.
        run(
            &mut d,
            &[
                (100.0, 21.0, cycle),
                (100.0, 1.0, blind),
                (100.0, 1.0, cycle),
            ],
        );
        let learned = d.learned(KEY).unwrap().call_cycle;
        assert!(learned > 0.999, "{learned}");
        // A minute of readings without evidence forgets at the usual pace
        // (halving every MEMORY_SECONDS), whatever they say.
        let blind_cycle = Signals {
            call_cycle: true,
            ..blind
        };
        run(&mut d, &[(100.0, 30.0, blind), (100.0, 30.0, blind_cycle)]);
        let forgot = learned * 0.5f64.powf(60.0 / MEMORY_SECONDS);
        assert!((d.learned(KEY).unwrap().call_cycle - forgot).abs() < 1e-9);
        assert_eq!(d.baseline(KEY), Some(100.0));
    }

    #[test]
    fn a_hot_pick_is_judged_only_once_it_has_a_history_of_its_own() {
        // Picked for its heat (no --func), calling others in a cycle, its
        // process gone from idle to a core: also a healthy recursive parser
        // under a step in load. Not a loop while it has no history...
        let cycle = Signals {
            call_cycle: true,
            cycle_dominance: 1.0,
            heat_only: true,
            cpu: Some(1.0),
            cpu_baseline: Some(0.05),
            ..Signals::default()
        };
        let mut d = Detector::new(Rules::default());
        assert_eq!(run(&mut d, &[(40_000.0, 5.0, cycle)]), vec![]);
        // ...and once it has one, like any function: a runaway from a
        // learned calm rate, a core burning more, is one.
        let calm = Signals {
            heat_only: true,
            ..calm_cpu()
        };
        let mut d = Detector::new(Rules::default());
        run(&mut d, &[(500.0, 10.0, calm)]);
        assert!(d.baseline(KEY).is_some());
        let found = loops(&run(&mut d, &[(40_000.0, 3.0, cycle)]));
        assert_eq!(found.len(), 1, "{found:?}");
    }

    #[test]
    fn a_cycle_at_attach_on_a_contended_core_is_caught_once_it_gets_one() {
        // The machine is busy: the looping thread gets 70% of a core for a
        // while. Neither the rate nor that CPU may become the normal.
        let mut d = Detector::new(Rules::default());
        let starved = Signals {
            key_cycle: 1.0,
            cpu: Some(0.7),
            ..Signals::default()
        };
        run(&mut d, &[(40_000.0, 3.0, starved)]);
        assert_eq!(d.baseline(KEY), None);
        // (A queue broker emptying its queues in turn since before attach
        // is learned once it has run calm for longer than a loop would.)
        let mut broker = Detector::new(Rules::default());
        let calm = Signals {
            key_cycle: 1.0,
            ..calm_cpu()
        };
        for _ in 0..(30.0 / READ) as usize {
            broker.observe_with(KEY, 3_000.0, READ, calm);
        }
        assert!(broker.baseline(KEY).is_some());
        let full = Signals {
            key_cycle: 1.0,
            cycle_dominance: 1.0,
            ..hot()
        };
        assert_eq!(loops(&run(&mut d, &[(40_000.0, 1.0, full)])).len(), 1);
    }

    #[test]
    fn a_busy_brokers_queues_in_turn_at_attach_are_not_a_loop() {
        // Seen in a loaded VM: Redis's thread busy (running or waiting to
        // run), three queues emptied in turn, but those deletions are a
        // sixth of what the server does.
        let mut d = Detector::new(Rules::default());
        let broker = Signals {
            key_cycle: 0.95,
            cycle_dominance: 0.16,
            cpu: Some(0.95),
            ..Signals::default()
        };
        assert_eq!(run(&mut d, &[(1_500.0, 10.0, broker)]), vec![]);
    }

    #[test]
    fn a_cycle_at_attach_on_an_idle_core_is_not_a_loop() {
        // Bounded recursion in normal operation: a cycle, but the process
        // is not burning a core.
        let mut d = Detector::new(Rules::default());
        let cycle = Signals {
            call_cycle: true,
            key_cycle: 0.9,
            ..calm_cpu()
        };
        assert_eq!(run(&mut d, &[(40_000.0, 10.0, cycle)]), vec![]);
    }

    #[test]
    fn hot_keys_learned_in_healthy_traffic_are_not_a_loop() {
        // A queue broker: two lists take every write, all day.
        let mut d = Detector::new(Rules::default());
        let broker = Signals {
            top_share: Some(1.0),
            reinvalidation: Some(0.99),
            key_cycle: 0.6,
            ..calm_cpu()
        };
        let busy = Signals { ..broker };
        let events = run(&mut d, &[(3_000.0, 10.0, broker), (9_000.0, 10.0, busy)]);
        assert_eq!(loops(&events), vec![]);
    }

    #[test]
    fn keys_repeating_beyond_their_learned_share_are_a_loop_within_a_second() {
        let mut d = Detector::new(Rules::default());
        let healthy = Signals {
            top_share: Some(0.2),
            reinvalidation: Some(0.6),
            ..calm_cpu()
        };
        let looping = Signals {
            top_share: Some(1.0),
            reinvalidation: Some(0.999),
            ..hot()
        };
        let events = run(&mut d, &[(200.0, 10.0, healthy), (30_000.0, 3.0, looping)]);
        let found = loops(&events);
        assert_eq!(found.len(), 1, "{events:?}");
        assert!(found[0].0 <= 10.0 + 1.0, "{found:?}");
        assert_eq!(found[0].1.cause, Cause::RepeatingKeys);
    }

    #[test]
    fn a_flash_sale_on_one_key_is_not_a_loop() {
        // Many keys, then one stock key takes 95% of twice the traffic; the
        // process stays calm.
        let mut d = Detector::new(Rules::default());
        let spread = Signals {
            top_share: Some(0.1),
            reinvalidation: Some(0.5),
            ..calm_cpu()
        };
        let sale = Signals {
            top_share: Some(0.95),
            reinvalidation: Some(0.99),
            ..calm_cpu()
        };
        let events = run(&mut d, &[(500.0, 10.0, spread), (3_000.0, 10.0, sale)]);
        assert_eq!(loops(&events), vec![]);
    }

    #[test]
    fn a_pattern_and_a_rate_seen_a_minute_ago_are_still_normal() {
        // A broker emptying its queues in turn, idle for 20 s, then back.
        let mut d = Detector::new(Rules::default());
        let broker = Signals {
            key_cycle: 0.9,
            top_share: Some(1.0),
            reinvalidation: Some(0.99),
            ..calm_cpu()
        };
        let events = run(
            &mut d,
            &[
                (3_000.0, 30.0, broker),
                (0.0, 20.0, calm_cpu()),
                (3_000.0, 10.0, broker),
            ],
        );
        assert_eq!(loops(&events), vec![]);
    }

    #[test]
    fn a_runaway_on_a_thread_pinned_all_day_needs_no_cpu_to_corroborate() {
        let mut d = Detector::new(Rules::default());
        let pinned = Signals {
            cpu: Some(1.0),
            cpu_baseline: Some(1.0),
            ..Signals::default()
        };
        let events = run(&mut d, &[(500.0, 10.0, pinned), (50_000.0, 4.0, pinned)]);
        assert_eq!(loops(&events).len(), 1, "{events:?}");
    }

    #[test]
    fn one_calm_reading_of_a_loops_start_does_not_make_its_cycle_normal() {
        // On a slow machine the loop's first reading is under the bar and
        // its thread not yet seen burning: calm, with the cycle in it.
        let mut d = Detector::new(Rules::default());
        let start = Signals {
            key_cycle: 1.0,
            ..calm_cpu()
        };
        let looping = Signals {
            key_cycle: 1.0,
            ..calm_cpu()
        };
        let events = run(
            &mut d,
            &[
                (300.0, 10.0, calm_cpu()),
                (2_500.0, 0.25, start),
                (5_000.0, 2.0, looping),
            ],
        );
        let found = loops(&events);
        assert_eq!(found.len(), 1, "{events:?}");
        assert_eq!(found[0].1.cause, Cause::KeyCycle);
    }

    #[test]
    fn starved_functions_learn_nothing_while_their_process_loops() {
        let mut d = Detector::new(Rules::default());
        run(&mut d, &[(500.0, 10.0, calm_cpu())]);
        let starved = Signals {
            process_looping: true,
            ..hot()
        };
        run(&mut d, &[(0.0, 60.0, starved)]);
        assert_eq!(d.baseline(KEY), Some(500.0));
    }

    #[test]
    fn a_restart_inherits_its_predecessors_baseline() {
        let mut d = Detector::new(Rules::default());
        d.inherit(
            KEY,
            Learned {
                baseline: 100.0,
                ..Learned::default()
            },
        );
        let events = run(&mut d, &[(30_000.0, 3.0, hot())]);
        let found = loops(&events);
        assert_eq!(found.len(), 1, "{events:?}");
        assert!(found[0].1.inherited);
        assert_eq!(found[0].1.baseline, 100.0);
    }

    #[test]
    fn surge_explained_by_requests_is_not_a_loop_but_a_cycle_still_is() {
        let mut d = Detector::new(Rules::default());
        let surge = Signals {
            explained_by_requests: true,
            ..hot()
        };
        run(&mut d, &[(200.0, 5.0, calm_cpu())]);
        assert_eq!(run(&mut d, &[(20_000.0, 5.0, surge)]), vec![]);
        let cycle = Signals {
            call_cycle: true,
            ..surge
        };
        assert_eq!(loops(&run(&mut d, &[(20_000.0, 1.0, cycle)])).len(), 1);
    }

    #[test]
    fn custom_rules_are_honoured() {
        let rules = Rules {
            factor: 3.0,
            min_rate: 10.0,
            sustain: 0.25,
            ..Rules::default()
        };
        let mut d = Detector::new(rules);
        let events = run(&mut d, &[(10.0, 5.0, calm_cpu()), (40.0, 0.25, hot())]);
        assert_eq!(loops(&events).len(), 1);
    }

    #[test]
    fn exited_process_is_forgotten_and_hands_over_what_it_learned() {
        let mut d = Detector::new(Rules::default());
        run(&mut d, &[(100.0, 5.0, calm_cpu())]);
        let learned = d.forget_process(KEY.pid);
        assert_eq!(learned.len(), 1);
        assert_eq!(learned[0].1.baseline, 100.0);
        assert_eq!(d.baseline(KEY), None);
    }
}
