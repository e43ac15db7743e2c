//! Turns call rates into verdicts: is this function in a runaway loop?
//!
//! Pure logic, no system calls: the sampler feeds one rate per
//! (process, function) per interval and gets back the events worth reporting.
//!
//! The rules, per (process, function) series:
//!
//! - **Baseline.** The first `warmup` intervals are averaged into a baseline;
//!   after that, every interval that is not elevated moves it by an
//!   exponentially weighted average (`alpha`), rising by at most `alpha` of
//!   itself per interval. Elevated intervals never feed it, so a burst or a
//!   loop cannot teach the detector that it is normal.
//! - **Elevated.** An interval is elevated when its rate is at least `factor`
//!   times the baseline (a baseline under 1 call/s counts as 1 call/s) *and*
//!   at least `min_rate` calls/s, so that a function going from 2 to 30
//!   calls/s is not a loop.
//! - **Loop.** `sustain` elevated intervals in a row confirm a loop. A
//!   healthy burst (x4-x5, or shorter than `sustain` intervals) never does.
//! - **Recovery.** Once in a loop, `sustain` intervals in a row that are not
//!   elevated report a recovery, and learning resumes.
//!
//! - **Structural evidence.** A function the sampler saw in a call cycle
//!   with other watched functions, or invalidating the same few keys again
//!   and again, needs no baseline: an interval at or above `min_rate` with
//!   that evidence counts as elevated, warm-up or not.
//!   That is how a loop already running at attach is caught.
//!
//! - **Requests.** With `--request-func`, an interval whose invalidations
//!   per request did not rise is traffic, not a loop: the rate rule does
//!   not apply to it (structural evidence still does).
//!
//! What this module does not do: find the cycles (`cycles.rs`), or read the
//! kernel.

use std::collections::HashMap;

/// The thresholds of the rules above. Every field has a command-line flag.
#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    /// How many times the baseline an interval must reach to be elevated.
    pub factor: f64,
    /// The least rate, in calls/s, that can be elevated at all.
    pub min_rate: f64,
    /// Elevated intervals in a row that confirm a loop; calm intervals in a
    /// row that confirm a recovery.
    pub sustain: u32,
    /// Intervals averaged into the first baseline.
    pub warmup: u32,
    /// Weight of the newest calm interval in the baseline, in (0, 1].
    pub alpha: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            factor: 10.0,
            min_rate: 1000.0,
            sustain: 3,
            warmup: 2,
            alpha: 0.2,
        }
    }
}

/// Baselines under this many calls/s are treated as this, so that an idle
/// function (baseline 0) is compared against something.
pub const BASELINE_FLOOR: f64 = 1.0;

/// Identifies one series: a function (its index in the loader's table) in one
/// process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub pid: u32,
    pub func: u32,
}

/// What the sampler knows about an interval besides the rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    /// A call cycle with other watched functions, or the same few keys
    /// invalidated again and again.
    pub structural: bool,
    /// Requests (`--request-func`) rose with the invalidations: the rate
    /// rule does not apply, this is traffic, not a loop.
    pub explained_by_requests: bool,
}

/// Something the detector wants reported.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A loop was confirmed in this interval.
    Loop(LoopVerdict),
    /// A loop that was confirmed earlier has calmed down.
    Recovered(Recovery),
}

/// Why a series was called a loop: the numbers behind the verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopVerdict {
    pub key: SeriesKey,
    /// Rate of the interval that confirmed the loop, calls/s.
    pub rate: f64,
    /// The learned baseline the rates were compared with, calls/s.
    pub baseline: f64,
    /// The elevated rates that confirmed it, oldest first.
    pub elevated_rates: Vec<f64>,
    /// Seconds covered by those intervals.
    pub elevated_seconds: f64,
    /// Confirmed by structural evidence (a call cycle, repeating keys), not
    /// (only) by the rate over baseline.
    pub structural: bool,
}

impl LoopVerdict {
    /// How many times the baseline the confirming rate is.
    pub fn ratio(&self) -> f64 {
        self.rate / self.baseline.max(BASELINE_FLOOR)
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

#[derive(Debug, Default)]
struct Series {
    /// Sum and count of the warm-up intervals, then the learned baseline.
    warm_sum: f64,
    warm_count: u32,
    baseline: Option<f64>,
    /// Elevated intervals in a row (rate, seconds, in a cycle), while not
    /// yet in a loop.
    elevated: Vec<(f64, f64, bool)>,
    /// `Some` while in a loop.
    looping: Option<Looping>,
}

#[derive(Debug)]
struct Looping {
    seconds: f64,
    peak: f64,
    calm_run: u32,
}

/// The per-series state machines.
#[derive(Debug, Default)]
pub struct Detector {
    rules: Rules,
    series: HashMap<SeriesKey, Series>,
}

impl Detector {
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            series: HashMap::new(),
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Feeds the rate (calls/s) of one series over an interval of `seconds`.
    /// Returns an event when this interval confirms a loop or a recovery.
    pub fn observe(&mut self, key: SeriesKey, rate: f64, seconds: f64) -> Option<Event> {
        self.observe_with(key, rate, seconds, Signals::default())
    }

    /// Feeds one interval with the sampler's other signals.
    pub fn observe_with(
        &mut self,
        key: SeriesKey,
        rate: f64,
        seconds: f64,
        signals: Signals,
    ) -> Option<Event> {
        let Signals {
            structural,
            explained_by_requests,
        } = signals;
        let rules = &self.rules;
        let series = self.series.entry(key).or_default();
        let cyclic = structural && rate >= rules.min_rate;

        let baseline = match series.baseline {
            Some(baseline) => baseline,
            // Still warming up, and no structure to go by: learn.
            None if !cyclic => {
                series.warm_sum += rate;
                series.warm_count += 1;
                if series.warm_count >= rules.warmup.max(1) {
                    series.baseline = Some(series.warm_sum / f64::from(series.warm_count));
                }
                return None;
            }
            // A cycle during warm-up: never learn it as normal.
            None => 0.0,
        };

        let elevated = cyclic
            || (series.baseline.is_some()
                && !explained_by_requests
                && rate >= rules.factor * baseline.max(BASELINE_FLOOR)
                && rate >= rules.min_rate);

        if let Some(looping) = &mut series.looping {
            looping.seconds += seconds;
            if elevated {
                looping.calm_run = 0;
                looping.peak = looping.peak.max(rate);
                return None;
            }
            looping.calm_run += 1;
            if looping.calm_run < rules.sustain {
                return None;
            }
            let recovery = Recovery {
                key,
                rate,
                baseline,
                loop_seconds: looping.seconds,
                peak_rate: looping.peak,
            };
            series.looping = None;
            return Some(Event::Recovered(recovery));
        }

        if !elevated {
            series.elevated.clear();
            // One interval may raise the baseline by at most `alpha` of
            // itself: the partial interval a loop starts in (under the bar,
            // but far above normal) must not lift the bar for the rest of
            // the loop. A real step in traffic is still learned in a few
            // intervals; falls are learned at the full weight.
            let step = (rate - baseline).min(baseline.max(BASELINE_FLOOR));
            series.baseline = Some(baseline + rules.alpha * step);
            return None;
        }

        series.elevated.push((rate, seconds, cyclic));
        if series.elevated.len() < rules.sustain as usize {
            return None;
        }
        let verdict = LoopVerdict {
            key,
            rate,
            baseline,
            elevated_rates: series.elevated.iter().map(|&(r, _, _)| r).collect(),
            elevated_seconds: series.elevated.iter().map(|&(_, s, _)| s).sum(),
            structural: series.elevated.iter().any(|&(_, _, c)| c),
        };
        let peak = verdict.elevated_rates.iter().copied().fold(0.0, f64::max);
        series.looping = Some(Looping {
            seconds: 0.0,
            peak,
            calm_run: 0,
        });
        series.elevated.clear();
        Some(Event::Loop(verdict))
    }

    /// The learned baseline of a series, once warm-up is over.
    pub fn baseline(&self, key: SeriesKey) -> Option<f64> {
        self.series.get(&key).and_then(|s| s.baseline)
    }

    /// Whether a series is in a confirmed loop now.
    pub fn in_loop(&self, key: SeriesKey) -> bool {
        self.series.get(&key).is_some_and(|s| s.looping.is_some())
    }

    /// Drops every series of a process that is gone, so that a new process
    /// that reuses its pid starts from scratch.
    pub fn forget_process(&mut self, pid: u32) {
        self.series.retain(|key, _| key.pid != pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: SeriesKey = SeriesKey { pid: 42, func: 0 };

    /// Feeds one-second intervals; returns (interval index, event) pairs.
    const CYCLE: Signals = Signals {
        structural: true,
        explained_by_requests: false,
    };

    fn run(detector: &mut Detector, rates: &[f64]) -> Vec<(usize, Event)> {
        rates
            .iter()
            .enumerate()
            .filter_map(|(i, &rate)| detector.observe(KEY, rate, 1.0).map(|e| (i, e)))
            .collect()
    }

    fn series(parts: &[(f64, usize)]) -> Vec<f64> {
        parts
            .iter()
            .flat_map(|&(rate, n)| std::iter::repeat_n(rate, n))
            .collect()
    }

    fn loops(events: &[(usize, Event)]) -> Vec<usize> {
        events
            .iter()
            .filter(|(_, e)| matches!(e, Event::Loop(_)))
            .map(|(i, _)| *i)
            .collect()
    }

    #[test]
    fn loop_after_healthy_phase_is_confirmed_after_sustain_intervals() {
        let mut d = Detector::new(Rules::default());
        let rates = series(&[(100.0, 10), (50_000.0, 5)]);
        let events = run(&mut d, &rates);
        // Elevated from interval 10; the third elevated interval confirms.
        assert_eq!(loops(&events), vec![12]);
        let Event::Loop(v) = &events[0].1 else {
            panic!("{events:?}")
        };
        assert_eq!(v.baseline, 100.0);
        assert_eq!(v.elevated_rates, vec![50_000.0; 3]);
        assert_eq!(v.ratio(), 500.0);
    }

    #[test]
    fn loop_starting_mid_interval_is_confirmed_within_five_seconds() {
        let mut d = Detector::new(Rules::default());
        // The loop starts 0.9 s into interval 10: that interval sees 10% of it.
        let mut rates = series(&[(100.0, 10)]);
        rates.push(0.9 * 100.0 + 0.1 * 40_000.0);
        rates.extend(series(&[(40_000.0, 5)]));
        let events = run(&mut d, &rates);
        let first = loops(&events)[0];
        // The loop began at t = 10.9 s; interval i ends at t = i + 1.
        assert!((first + 1) as f64 - 10.9 <= 5.0, "confirmed at {first}");
    }

    #[test]
    fn healthy_bursts_do_not_alarm() {
        let mut d = Detector::new(Rules::default());
        let rates = series(&[
            (200.0, 10),
            (1000.0, 3), // x5 for three seconds
            (200.0, 5),
            (900.0, 4), // x4.5 for four seconds
            (200.0, 5),
            (5_000.0, 2), // x25, but only two intervals
            (200.0, 5),
        ]);
        assert_eq!(run(&mut d, &rates), vec![]);
    }

    #[test]
    fn bursts_do_not_inflate_the_baseline() {
        let mut d = Detector::new(Rules::default());
        run(&mut d, &series(&[(100.0, 5), (5_000.0, 2)]));
        assert_eq!(d.baseline(KEY), Some(100.0));
    }

    #[test]
    fn partial_interval_at_a_loop_start_barely_moves_the_baseline() {
        let mut d = Detector::new(Rules::default());
        // 345/s, then an interval the loop filled for its last 2%.
        run(&mut d, &series(&[(345.0, 6), (1_526.0, 1)]));
        let baseline = d.baseline(KEY).unwrap();
        assert!(baseline <= 345.0 * 1.2 + 1e-9, "baseline {baseline}");
    }

    #[test]
    fn lasting_step_in_traffic_is_learned() {
        let mut d = Detector::new(Rules::default());
        // Traffic doubles for good: no alarm, and the baseline follows.
        let events = run(&mut d, &series(&[(300.0, 5), (600.0, 30)]));
        assert_eq!(events, vec![]);
        assert!(d.baseline(KEY).unwrap() > 590.0);
    }

    #[test]
    fn slow_ramp_is_learned_not_flagged() {
        let mut d = Detector::new(Rules::default());
        // Organic growth: +5% a second for two minutes, 100/s to ~35,000/s.
        let rates: Vec<f64> = (0..120).map(|i| 100.0 * 1.05f64.powi(i)).collect();
        assert_eq!(run(&mut d, &rates), vec![]);
    }

    #[test]
    fn runaway_ramp_is_flagged() {
        let mut d = Detector::new(Rules::default());
        // A loop that feeds itself: the rate triples every second.
        let mut rates = series(&[(100.0, 10)]);
        rates.extend((1..10).map(|i| 100.0 * 3f64.powi(i)));
        assert_eq!(loops(&run(&mut d, &rates)).len(), 1);
    }

    #[test]
    fn loop_from_low_baseline_is_flagged() {
        let mut d = Detector::new(Rules::default());
        let rates = series(&[(2.0, 10), (20_000.0, 4)]);
        assert_eq!(loops(&run(&mut d, &rates)), vec![12]);
    }

    #[test]
    fn loop_in_idle_function_is_flagged() {
        let mut d = Detector::new(Rules::default());
        let rates = series(&[(0.0, 5), (3_000.0, 4)]);
        assert_eq!(loops(&run(&mut d, &rates)), vec![7]);
    }

    #[test]
    fn high_ratio_below_min_rate_is_not_a_loop() {
        let mut d = Detector::new(Rules::default());
        let rates = series(&[(2.0, 10), (500.0, 10)]);
        assert_eq!(run(&mut d, &rates), vec![]);
    }

    #[test]
    fn recovery_is_reported_once_the_rate_falls_back() {
        let mut d = Detector::new(Rules::default());
        let rates = series(&[(100.0, 5), (30_000.0, 6), (110.0, 4)]);
        let events = run(&mut d, &rates);
        assert_eq!(events.len(), 2, "{events:?}");
        let (at, Event::Recovered(r)) = &events[1] else {
            panic!("{events:?}")
        };
        assert_eq!(*at, 13);
        assert_eq!(r.peak_rate, 30_000.0);
        assert!(!d.in_loop(KEY));
        // Learning resumed from the pre-loop baseline.
        assert!(d.baseline(KEY).is_some_and(|b| b < 200.0));
    }

    #[test]
    fn a_calm_interval_inside_a_loop_does_not_end_it() {
        let mut d = Detector::new(Rules::default());
        let rates = series(&[(100.0, 5), (30_000.0, 4), (100.0, 1), (30_000.0, 4)]);
        let events = run(&mut d, &rates);
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(d.in_loop(KEY));
    }

    #[test]
    fn counter_gap_keeps_rates_honest() {
        let mut d = Detector::new(Rules::default());
        // The sampler missed two ticks: one interval of 3 s at the same rate.
        for _ in 0..5 {
            assert_eq!(d.observe(KEY, 200.0, 1.0), None);
        }
        assert_eq!(d.observe(KEY, 200.0, 3.0), None);
        // A loop across a late tick is still caught, and its duration counts.
        let mut got = None;
        for seconds in [1.0, 2.5, 1.0] {
            got = d.observe(KEY, 40_000.0, seconds);
        }
        let Some(Event::Loop(v)) = got else {
            panic!("{got:?}")
        };
        assert_eq!(v.elevated_seconds, 4.5);
    }

    #[test]
    fn exited_process_is_forgotten_and_its_pid_starts_fresh() {
        let mut d = Detector::new(Rules::default());
        run(&mut d, &series(&[(100.0, 5), (30_000.0, 3)]));
        assert!(d.in_loop(KEY));
        d.forget_process(KEY.pid);
        assert!(!d.in_loop(KEY));
        assert_eq!(d.baseline(KEY), None);
        // Another function of another process is untouched by the forget.
        let other = SeriesKey { pid: 7, func: 0 };
        d.observe(other, 1.0, 1.0);
        d.observe(other, 1.0, 1.0);
        d.forget_process(KEY.pid);
        assert_eq!(d.baseline(other), Some(1.0));
    }

    #[test]
    fn loop_running_at_attach_is_caught_from_its_cycle_without_history() {
        let mut d = Detector::new(Rules::default());
        // The very first intervals are already the loop: no baseline.
        let mut events = Vec::new();
        for i in 0..4 {
            if let Some(e) = d.observe_with(KEY, 40_000.0, 1.0, CYCLE) {
                events.push((i, e));
            }
        }
        assert_eq!(loops(&events), vec![2]);
        let Event::Loop(v) = &events[0].1 else {
            panic!()
        };
        assert!(v.structural);
        // The loop was never learned as the baseline.
        assert_eq!(d.baseline(KEY), None);
    }

    #[test]
    fn busy_function_without_a_cycle_is_learned_not_flagged() {
        let mut d = Detector::new(Rules::default());
        for _ in 0..10 {
            assert_eq!(d.observe(KEY, 40_000.0, 1.0), None);
        }
        assert_eq!(d.baseline(KEY), Some(40_000.0));
    }

    #[test]
    fn slow_cycle_below_min_rate_is_not_a_loop() {
        // Bounded recursion in normal operation: a cycle, but a calm one.
        let mut d = Detector::new(Rules::default());
        for _ in 0..10 {
            assert_eq!(d.observe_with(KEY, 300.0, 1.0, CYCLE), None);
        }
    }

    #[test]
    fn surge_explained_by_requests_is_not_a_loop_but_a_cycle_still_is() {
        let mut d = Detector::new(Rules::default());
        let surge = Signals {
            explained_by_requests: true,
            ..Signals::default()
        };
        for _ in 0..5 {
            d.observe(KEY, 200.0, 1.0);
        }
        for _ in 0..5 {
            assert_eq!(d.observe_with(KEY, 20_000.0, 1.0, surge), None);
        }
        let cycle = Signals {
            structural: true,
            explained_by_requests: true,
        };
        let events: Vec<_> = (0..3)
            .filter_map(|_| d.observe_with(KEY, 20_000.0, 1.0, cycle))
            .collect();
        assert_eq!(events.len(), 1, "{events:?}");
    }

    #[test]
    fn custom_rules_are_honoured() {
        let rules = Rules {
            factor: 3.0,
            min_rate: 10.0,
            sustain: 1,
            ..Rules::default()
        };
        let mut d = Detector::new(rules);
        let rates = series(&[(10.0, 5), (40.0, 1)]);
        assert_eq!(loops(&run(&mut d, &rates)), vec![5]);
    }
}
