//! Every interval: read the kernel counters, diff them against the last read,
//! turn the differences into rates, feed the detector, and produce the
//! records of that interval. Also notices processes that appear (`--binary`)
//! and processes that exit.
//!
//! The only kernel access is [`Probes::read_counts`]; the arithmetic lives in
//! [`Deltas`], which is pure and unit-tested.

use std::{
    collections::{BTreeMap, HashMap},
    time::Instant,
};

use profiler_common::{CallKey, CallerKey, KeyId};

use crate::{
    cycles::{self, CodeRange},
    detect::{Detector, Event, LoopVerdict, SeriesKey, Signals},
    probes::{ProbeError, Probes},
    report::{self, Health, KeyCount, Record, Structure, Summary},
    target::{Binary, Process},
};

/// Which processes count: the `--pid` ones, whatever runs the `--binary`
/// file, now or later, and processes named `--name` (the watch loop attaches
/// new ones and hands them over with [`Sampler::adopt`]).
pub struct Watched {
    pub pids: Vec<Process>,
    pub binary: Option<Binary>,
    pub names: Vec<String>,
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
            });
        }
        let ratio = invalidations as f64 / requests.max(1) as f64;
        let explained = match self.baseline.get(&pid) {
            // The same capped learning as the rate baseline: calm intervals
            // only, rising by at most a fifth at a time.
            Some(&base) => {
                let risen = ratio >= self.factor * base.max(0.01);
                if !risen {
                    let step = (ratio - base).min(base.max(0.01));
                    self.baseline.insert(pid, base + 0.2 * step);
                }
                !risen
            }
            None => {
                self.baseline.insert(pid, ratio);
                false
            }
        };
        Some(PerRequest {
            requests_rate,
            ratio: Some(ratio),
            explained,
        })
    }
}

/// Keys shown in a loop record.
const TOP_KEYS: usize = 5;
/// "A few keys": at most this many carry...
const FEW_KEYS: usize = 8;
/// ...at least this share of the interval's calls.
const FEW_KEYS_SHARE: f64 = 0.9;

/// Whether a handful of keys carry (nearly) all of a function's `calls` in
/// an interval: the same keys invalidated again and again. `keys` is sorted
/// busiest first.
fn few_keys_carry(keys: &[(u64, u64)], calls: u64) -> bool {
    let top: u64 = keys.iter().take(FEW_KEYS).map(|&(_, n)| n).sum();
    calls > 0 && top as f64 >= FEW_KEYS_SHARE * calls as f64
}

/// Per-series totals for the summary.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    calls: u64,
    peak_rate: f64,
}

/// Counter arithmetic: last read values, and the calls since then.
#[derive(Debug, Default)]
pub struct Deltas {
    last: HashMap<CallKey, u64>,
}

impl Deltas {
    /// Calls since the previous read for `key`, given its current counter.
    /// A counter that went backwards (its map entry was removed and made
    /// again) counts from zero.
    pub fn advance(&mut self, key: CallKey, now: u64) -> u64 {
        let before = self.last.insert(key, now).unwrap_or(0);
        if now >= before { now - before } else { now }
    }

    pub fn forget_process(&mut self, pid: u32) {
        self.last.retain(|k, _| k.tgid != pid);
    }
}

/// The outcome of one interval.
#[derive(Debug, Default)]
pub struct Tick {
    pub records: Vec<Record>,
    /// At least one loop was confirmed in this interval.
    pub loop_found: bool,
    /// No watched process is left, and none can come (no `--binary`, no
    /// `--name`).
    pub all_gone: bool,
    /// The busiest process's probe hits per probed second (for the
    /// overhead governor).
    pub hit_rate: f64,
}

pub struct Sampler {
    names: Vec<String>,
    watched: Watched,
    /// Live processes by pid.
    live: BTreeMap<u32, Process>,
    processes_seen: usize,
    detector: Detector,
    deltas: Deltas,
    counts: HashMap<CallKey, u64>,
    totals: HashMap<SeriesKey, Totals>,
    loops: Vec<(u32, Vec<String>)>,
    /// CPU time of each live process at the last read, in nanoseconds.
    cpu: HashMap<u32, u64>,
    /// Where the watched functions' code is, to tell who called whom.
    ranges: Vec<CodeRange>,
    callers: HashMap<CallerKey, u64>,
    caller_deltas: HashMap<CallerKey, u64>,
    /// Return address -> watched function holding it (or none), per pid.
    resolved: HashMap<(u32, u64), Option<u32>>,
    keys: HashMap<KeyId, u64>,
    key_deltas: HashMap<KeyId, u64>,
    /// Which cookies have string keys (their text is in the kernel).
    string_keys: Vec<bool>,
    show_keys: bool,
    /// Hashes keys for output, keyed anew each run: consistent within a
    /// run, useless for guessing keys across runs.
    key_hasher: std::collections::hash_map::RandomState,
    /// `is_request[cookie]`: a `--request-func` function.
    is_request: Vec<bool>,
    requests: Requests,
    /// Scratch: this interval's calls per function of one process.
    calls: Vec<u64>,
    last_read: Instant,
    started: Instant,
}

impl Sampler {
    /// `names[i]` is the function counted under cookie `i`. Counting starts
    /// at zero now: call right after attaching.
    pub fn new(names: Vec<String>, watched: Watched, detector: Detector) -> Self {
        let running = watched.binary.iter().flat_map(Binary::processes);
        let live: BTreeMap<u32, Process> = watched
            .pids
            .iter()
            .cloned()
            .chain(running)
            .map(|p| (p.pid, p))
            .collect();
        let now = Instant::now();
        Self {
            names,
            processes_seen: live.len(),
            live,
            watched,
            detector,
            deltas: Deltas::default(),
            counts: HashMap::new(),
            totals: HashMap::new(),
            loops: Vec::new(),
            cpu: HashMap::new(),
            ranges: Vec::new(),
            callers: HashMap::new(),
            caller_deltas: HashMap::new(),
            resolved: HashMap::new(),
            keys: HashMap::new(),
            key_deltas: HashMap::new(),
            string_keys: Vec::new(),
            show_keys: false,
            key_hasher: std::collections::hash_map::RandomState::new(),
            is_request: Vec::new(),
            requests: Requests::default(),
            calls: Vec::new(),
            last_read: now,
            started: now,
        }
    }

    /// Whether `pid` is one of the processes watched now.
    pub fn is_watching(&self, pid: u32) -> bool {
        self.live.contains_key(&pid)
    }

    /// A process watched now.
    pub fn process(&self, pid: u32) -> Option<&Process> {
        self.live.get(&pid)
    }

    /// Starts watching a process that was just attached; its counting starts
    /// at zero.
    pub fn adopt(&mut self, process: Process) {
        self.processes_seen += 1;
        self.live.insert(process.pid, process);
    }

    /// The function table grew (new processes brought new functions).
    pub fn set_names(&mut self, names: &[String]) {
        self.names = names.to_vec();
    }

    /// Which functions are requests (`--request-func`), by cookie.
    pub fn set_request_funcs(&mut self, is_request: &[bool], factor: f64) {
        self.is_request = is_request.to_vec();
        self.requests.factor = factor / 2.0;
    }

    /// Which functions have string keys (`string_keys[cookie]`), and
    /// whether to show keys as they are.
    pub fn set_key_kinds(&mut self, string_keys: &[bool], show_keys: bool) {
        self.string_keys = string_keys.to_vec();
        self.show_keys = show_keys;
    }

    /// Per process and function, the keys invalidated in this interval.
    fn keys(
        &mut self,
        probes: &mut Probes,
    ) -> Result<HashMap<SeriesKey, Vec<(u64, u64)>>, ProbeError> {
        probes.read_keys(&mut self.keys)?;
        let mut per_series: HashMap<SeriesKey, Vec<(u64, u64)>> = HashMap::new();
        for (&id, &count) in &self.keys {
            // An LRU entry that was evicted and made again restarts at 0.
            let before = self.key_deltas.insert(id, count).unwrap_or(0);
            let calls = if count >= before {
                count - before
            } else {
                count
            };
            if calls > 0 && self.live.contains_key(&id.tgid) {
                let series = SeriesKey {
                    pid: id.tgid,
                    func: id.func,
                };
                per_series.entry(series).or_default().push((id.hash, calls));
            }
        }
        for keys in per_series.values_mut() {
            keys.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        }
        Ok(per_series)
    }

    /// How a key is shown: as it is with `--show-keys`, hashed otherwise.
    fn key_label(&self, probes: &Probes, func: u32, hash: u64) -> String {
        let string = self
            .string_keys
            .get(func as usize)
            .copied()
            .unwrap_or(false);
        let text = if string {
            probes
                .key_text(hash)
                .unwrap_or_else(|| format!("{hash:016x}"))
        } else {
            hash.to_string()
        };
        if self.show_keys {
            return text;
        }
        use std::hash::BuildHasher as _;
        format!("key#{:016x}", self.key_hasher.hash_one(&text))
    }

    /// Where the watched functions' code lies, for telling callers apart.
    pub fn set_ranges(&mut self, ranges: &[CodeRange]) {
        self.ranges = ranges.to_vec();
        self.resolved.clear();
    }

    /// Per process, the cycle of watched functions calling each other in
    /// this interval, if any (function indices, in call order).
    fn cycles(&mut self, probes: &mut Probes) -> Result<HashMap<u32, Vec<u32>>, ProbeError> {
        probes.read_callers(&mut self.callers)?;
        let mut edges: HashMap<u32, std::collections::BTreeSet<(u32, u32)>> = HashMap::new();
        let mut maps: HashMap<u32, Vec<cycles::Mapping>> = HashMap::new();
        for (&key, &count) in &self.callers {
            let before = self.caller_deltas.insert(key, count).unwrap_or(0);
            if count <= before || !self.live.contains_key(&key.tgid) {
                continue;
            }
            let caller = *self
                .resolved
                .entry((key.tgid, key.return_address))
                .or_insert_with(|| {
                    let maps = maps.entry(key.tgid).or_insert_with(|| {
                        let text = std::fs::read_to_string(format!("/proc/{}/maps", key.tgid));
                        cycles::parse_maps(&text.unwrap_or_default())
                    });
                    cycles::function_at(maps, &self.ranges, key.return_address)
                });
            if let Some(caller) = caller {
                edges
                    .entry(key.tgid)
                    .or_default()
                    .insert((caller, key.func));
            }
        }
        Ok(edges
            .into_iter()
            .filter_map(|(pid, e)| Some((pid, cycles::find_cycle(&e)?)))
            .collect())
    }

    /// Reads the counters and produces this interval's records. `probed` is
    /// the share of the interval the probes were in (1 unless the overhead
    /// governor windowed them): rates are calls per probed second, and
    /// marked as estimates when that is less than the interval.
    pub fn tick(&mut self, probes: &mut Probes, probed: f64) -> Result<Tick, ProbeError> {
        probes.read_counts(&mut self.counts)?;
        let now = Instant::now();
        let seconds = now.duration_since(self.last_read).as_secs_f64().max(1e-3);
        let estimated = probed < 1.0;
        let window = seconds * probed.clamp(1e-3, 1.0);
        self.last_read = now;
        let ts = report::unix_now();
        let mut tick = Tick::default();

        self.discover_processes();
        let cycles = self.cycles(probes)?;
        let keys = self.keys(probes)?;

        let mut verdicts: BTreeMap<u32, Vec<LoopVerdict>> = BTreeMap::new();
        let mut health: HashMap<u32, Health> = HashMap::new();
        for (&pid, process) in &self.live {
            // This interval's calls of every function, before judging any:
            // the invalidations-per-request signal needs them all.
            self.calls.clear();
            for func in 0..self.names.len() as u32 {
                let key = CallKey { func, tgid: pid };
                let now = self.counts.get(&key).copied().unwrap_or(0);
                self.calls.push(self.deltas.advance(key, now));
            }
            tick.hit_rate = tick
                .hit_rate
                .max(self.calls.iter().sum::<u64>() as f64 / window);
            let per_request = self
                .requests
                .observe(pid, &self.calls, &self.is_request, window);

            if let Some(usage) = process.usage() {
                let before = self.cpu.insert(pid, usage.cpu_nanos);
                // The first read of a process has nothing to diff against.
                if let Some(before) = before {
                    let h = Health {
                        cpu_percent: report::round1(
                            usage.cpu_nanos.saturating_sub(before) as f64 / (seconds * 1e7),
                        ),
                        rss_bytes: usage.rss_bytes,
                        requests_rate: per_request.map(|r| report::round1(r.requests_rate)),
                        invalidations_per_request: per_request
                            .and_then(|r| r.ratio)
                            .map(report::round1),
                    };
                    health.insert(pid, h);
                    tick.records.push(Record::Health { ts, pid, health: h });
                }
            }
            for func in 0..self.names.len() as u32 {
                let calls = self.calls[func as usize];
                let series = SeriesKey { pid, func };
                let rate = calls as f64 / window;
                // Outside a probe window nothing is counted: scale up.
                let reported = if estimated {
                    (rate * seconds).round() as u64
                } else {
                    calls
                };
                let totals = self.totals.entry(series).or_default();
                totals.calls += reported;
                totals.peak_rate = totals.peak_rate.max(rate);
                let fired = totals.calls > 0;

                // Requests are counted, not judged.
                if !self.is_request.get(func as usize).copied().unwrap_or(false) {
                    let in_cycle = cycles.get(&pid).is_some_and(|c| c.contains(&func));
                    let repeating = keys.get(&series).is_some_and(|k| few_keys_carry(k, calls));
                    let signals = Signals {
                        structural: in_cycle || repeating,
                        explained_by_requests: per_request.is_some_and(|r| r.explained),
                    };
                    match self.detector.observe_with(series, rate, seconds, signals) {
                        Some(Event::Loop(v)) => verdicts.entry(pid).or_default().push(v),
                        Some(Event::Recovered(r)) => {
                            tick.records
                                .push(report::recovered_record(ts, &r, &self.names))
                        }
                        None => {}
                    }
                }
                // A function that never fired has nothing to say; once it has,
                // it reports every interval, zeros included.
                if fired {
                    tick.records.push(Record::Sample {
                        ts,
                        pid,
                        ns_pid: process.ns_pid,
                        function: self.names[func as usize].clone(),
                        calls: reported,
                        rate: report::round1(rate),
                        baseline: self.detector.baseline(series).map(report::round1),
                        estimated,
                    });
                }
            }
        }

        for (pid, group) in &verdicts {
            let refs: Vec<&LoopVerdict> = group.iter().collect();
            let target = health.get(pid).copied();
            let cycle = cycles.get(pid).map(|c| {
                c.iter()
                    .map(|&f| report::function_name(&self.names, f))
                    .collect()
            });
            // The busiest keys of the functions in this loop; a key seen by
            // several of them counts once, with their calls summed.
            let mut by_key: BTreeMap<String, u64> = BTreeMap::new();
            for v in group {
                for &(hash, n) in keys.get(&v.key).into_iter().flatten() {
                    *by_key
                        .entry(self.key_label(probes, v.key.func, hash))
                        .or_default() += n;
                }
            }
            let mut top: Vec<KeyCount> = by_key
                .into_iter()
                // Counted in the probe window; scaled like the calls.
                .map(|(key, count)| KeyCount {
                    key,
                    count: (count as f64 * seconds / window).round() as u64,
                })
                .collect();
            top.sort_by_key(|k| std::cmp::Reverse(k.count));
            top.truncate(TOP_KEYS);
            let repeating = group.iter().any(|v| {
                let calls = (v.rate * window) as u64;
                keys.get(&v.key).is_some_and(|k| few_keys_carry(k, calls))
            });
            let funcs: Vec<u32> = group.iter().map(|v| v.key.func).collect();
            // At a function's first instruction the kernel's frame-pointer
            // walk skips the immediate caller: its return address is on top
            // of the stack, not in the rbp chain. The caller map has it.
            let stack = probes.hottest_stack(*pid, &funcs).map(|mut ips| {
                if let Some(caller) = probes.hottest_caller(*pid, &funcs)
                    && ips.get(1) != Some(&caller)
                {
                    ips.insert(1.min(ips.len()), caller);
                }
                crate::symbolize::stack(*pid, &ips)
            });
            let structure = Structure {
                cycle,
                top_keys: (!top.is_empty()).then_some(top),
                repeating,
                stack,
            };
            if let Some(record) = report::loop_record(
                ts,
                &refs,
                &self.names,
                self.detector.rules(),
                target,
                structure,
            ) {
                if let Record::Loop { functions, .. } = &record {
                    self.loops.push((*pid, functions.clone()));
                }
                tick.records.push(record);
                tick.loop_found = true;
            }
        }

        self.reap_exited(ts, probes, &mut tick);
        Ok(tick)
    }

    /// With `--binary`, processes that started running the file since the
    /// last interval show up as counter keys of unknown pids.
    fn discover_processes(&mut self) {
        let Some(binary) = &self.watched.binary else {
            // Only --pid: the set is fixed; counts of other processes (possible
            // when the kernel's pid filter cannot be used) are ignored.
            return;
        };
        for pid in self.counts.keys().map(|k| k.tgid) {
            if self.live.contains_key(&pid) || !binary.runs(pid) {
                continue;
            }
            if let Ok(process) = Process::from_pid(pid) {
                self.processes_seen += 1;
                self.live.insert(pid, process);
            }
        }
    }

    fn reap_exited(&mut self, ts: f64, probes: &mut Probes, tick: &mut Tick) {
        let gone: Vec<u32> = self
            .live
            .values()
            .filter(|p| !p.is_alive())
            .map(|p| p.pid)
            .collect();
        for pid in gone {
            self.live.remove(&pid);
            self.detector.forget_process(pid);
            self.deltas.forget_process(pid);
            self.cpu.remove(&pid);
            self.resolved.retain(|&(tgid, _), _| tgid != pid);
            self.caller_deltas.retain(|k, _| k.tgid != pid);
            self.key_deltas.retain(|k, _| k.tgid != pid);
            self.requests.baseline.remove(&pid);
            probes.forget_process(pid);
            tick.records.push(Record::TargetExit { ts, pid });
        }
        tick.all_gone =
            self.watched.binary.is_none() && self.watched.names.is_empty() && self.live.is_empty();
    }

    /// What the run saw.
    pub fn summary(&self, dropped: u64) -> Summary {
        let mut busiest: Vec<(u32, String, u64, f64)> = self
            .totals
            .iter()
            .filter(|(_, t)| t.calls > 0)
            .map(|(k, t)| {
                (
                    k.pid,
                    report::function_name(&self.names, k.func),
                    t.calls,
                    report::round1(t.peak_rate),
                )
            })
            .collect();
        busiest.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        let silent = self
            .names
            .iter()
            .enumerate()
            .filter(|&(func, _)| {
                !self
                    .totals
                    .iter()
                    .any(|(k, t)| k.func == func as u32 && t.calls > 0)
            })
            .map(|(_, name)| name.clone())
            .collect();
        Summary {
            seconds: self.started.elapsed().as_secs_f64(),
            functions: self.names.len(),
            processes: self.processes_seen,
            busiest,
            loops: self.loops.clone(),
            silent,
            dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: CallKey = CallKey { func: 1, tgid: 10 };

    #[test]
    fn invalidations_rising_with_requests_are_explained_and_without_are_not() {
        let mut r = Requests {
            factor: 5.0,
            ..Requests::default()
        };
        let is_request = [true, false];
        // 200 requests/s, two invalidations each.
        for _ in 0..3 {
            let got = r.observe(7, &[200, 400], &is_request, 1.0).unwrap();
            assert_eq!(got.ratio, Some(2.0));
        }
        // Traffic x10: the ratio holds, requests explain it.
        let surge = r.observe(7, &[2000, 4000], &is_request, 1.0).unwrap();
        assert!(
            surge.explained && surge.requests_rate == 2000.0,
            "{surge:?}"
        );
        // A loop: requests flat, invalidations x100.
        let looping = r.observe(7, &[200, 40_000], &is_request, 1.0).unwrap();
        assert!(!looping.explained, "{looping:?}");
        assert_eq!(looping.ratio, Some(200.0));
        // An idle interval (the partial one at the end of a run, say) has
        // no ratio, and does not move the learned one.
        let idle = r.observe(7, &[0, 0], &is_request, 0.01).unwrap();
        assert_eq!(idle.ratio, None);
        assert_eq!(r.baseline[&7], 2.0);
        // Without --request-func there is no such signal.
        assert_eq!(r.observe(7, &[1, 2], &[false, false], 1.0), None);
    }

    #[test]
    fn few_repeating_keys_are_told_from_many_distinct_ones() {
        // Two keys carry all 1000 calls: a loop's signature.
        assert!(few_keys_carry(&[(1, 500), (2, 500)], 1000));
        // 1000 calls over 1000 keys: a busy day.
        let many: Vec<(u64, u64)> = (0..1000).map(|k| (k, 1)).collect();
        assert!(!few_keys_carry(&many, 1000));
        // Keys seen for only part of the calls (the rest unknown): not enough.
        assert!(!few_keys_carry(&[(1, 100)], 1000));
        assert!(!few_keys_carry(&[], 0));
    }

    #[test]
    fn deltas_follow_a_growing_counter() {
        let mut d = Deltas::default();
        assert_eq!(d.advance(K, 5), 5);
        assert_eq!(d.advance(K, 205), 200);
        assert_eq!(d.advance(K, 205), 0);
    }

    #[test]
    fn counter_that_restarts_counts_from_zero() {
        let mut d = Deltas::default();
        d.advance(K, 1000);
        assert_eq!(d.advance(K, 30), 30);
    }

    #[test]
    fn forgotten_process_starts_over() {
        let mut d = Deltas::default();
        d.advance(K, 1000);
        let other = CallKey { func: 1, tgid: 11 };
        d.advance(other, 7);
        d.forget_process(10);
        assert_eq!(d.advance(K, 1000), 1000);
        assert_eq!(d.advance(other, 9), 2);
    }
}
