//! The overhead governor (`--max-overhead`): decides what share of each
//! interval the probes stay in, so that probing a hot function cannot take
//! more than the budget of the target's time. Pure: fed the hit rates the
//! sampler saw and the measured cost of one hit, it answers with the next
//! interval's exposure (1 = probed throughout).
//!
//! A uprobe hit costs the target a trap into the kernel (microseconds on a
//! virtual machine), whatever the eBPF program does. A function called a
//! few hundred times a second costs nothing worth counting; one called flat
//! out (a loop!) makes the probe most of the target's work. When the rate
//! seen while probed, times the cost per hit, exceeds the budget, the probes
//! go in for a window of `budget / cost share` of each interval and come out
//! for the rest; rates are then estimated from the window and marked as
//! estimates. When the estimated full cost falls below half the budget the
//! probes stay in again.

/// Never shorter than this share of an interval (a window must see hits).
pub const MIN_EXPOSURE: f64 = 0.01;

/// Call-site reads per second a function gets about, however hot: enough
/// for the busiest call sites to stand out within a reading (a call cycle's
/// edges carry most of a looping function's calls).
pub const CALL_SITES_PER_SECOND: f64 = 2048.0;

/// How sparsely to read a function's call site at `calls_per_second` (per
/// probed second): one hit in `1 << shift`. Every hit below twice
/// [`CALL_SITES_PER_SECOND`]; above, the largest power of two that leaves
/// at least that many reads a second, capped at
/// [`profiler_common::MAX_CALLER_SHIFT`] (a flat-out function still has
/// thousands read).
pub fn caller_shift(calls_per_second: f64) -> u32 {
    if !calls_per_second.is_finite() || calls_per_second < 2.0 * CALL_SITES_PER_SECOND {
        return 0;
    }
    ((calls_per_second / CALL_SITES_PER_SECOND).log2().floor() as u32)
        .min(profiler_common::MAX_CALLER_SHIFT)
}

#[derive(Clone, Debug)]
pub struct Governor {
    /// The most of the target's time probes may take (0.05 = 5%).
    budget: f64,
    /// Seconds one probe hit costs the target.
    cost: f64,
    exposure: f64,
}

/// A change of plan, to report.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    /// Share of the next interval the probes are in.
    pub exposure: f64,
    /// What the probes would cost if left in throughout (share of time).
    pub full_overhead: f64,
}

impl Governor {
    /// `budget` as a share (0.05 for 5%); `cost` per hit in seconds. A
    /// budget of 1 or more never windows.
    pub fn new(budget: f64, cost: f64) -> Self {
        Self {
            budget,
            cost,
            exposure: 1.0,
        }
    }

    pub fn exposure(&self) -> f64 {
        self.exposure
    }

    /// Seconds one hit costs.
    pub fn cost(&self) -> f64 {
        self.cost
    }

    /// After an interval: `hit_rate` is the busiest process's probe hits per
    /// probed second. Returns the new plan if the exposure changed.
    pub fn observe(&mut self, hit_rate: f64) -> Option<Plan> {
        if self.budget >= 1.0 {
            return None;
        }
        let full_overhead = hit_rate * self.cost;
        let next = if full_overhead <= self.budget {
            // Within budget probed throughout; come back fully only with
            // room to spare, so a rate near the line does not flap.
            if self.exposure >= 1.0 || full_overhead <= self.budget / 2.0 {
                1.0
            } else {
                self.exposure
            }
        } else {
            // Only ever shorter while windowed: a window's first moments
            // (the probes going in) see fewer hits, so its rate reads low,
            // and a longer window on that reading would break the budget.
            (self.budget / full_overhead)
                .clamp(MIN_EXPOSURE, 1.0)
                .min(self.exposure)
        };
        // Small moves are not worth a record.
        let changed = (next - self.exposure).abs() > self.exposure * 0.25
            || (next >= 1.0) != (self.exposure >= 1.0);
        if !changed {
            return None;
        }
        self.exposure = next;
        Some(Plan {
            exposure: next,
            full_overhead,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COST: f64 = 15e-6;

    #[test]
    fn calm_rates_stay_probed_throughout() {
        let mut g = Governor::new(0.05, COST);
        // 1000 calls/s at 15 us: 1.5% of the time.
        assert_eq!(g.observe(1000.0), None);
        assert_eq!(g.exposure(), 1.0);
    }

    #[test]
    fn flat_out_caller_is_probed_in_windows_within_budget() {
        let mut g = Governor::new(0.05, COST);
        // ~60k hits/s: the probe is ~90% of the target's time.
        let plan = g.observe(60_000.0).unwrap();
        assert!((plan.full_overhead - 0.9).abs() < 1e-9);
        assert!(plan.exposure * plan.full_overhead <= 0.05 + 1e-12);
        // The same rate in the window: no change, no record; a lower
        // reading in a window does not lengthen it.
        assert_eq!(g.observe(60_000.0), None);
        assert_eq!(g.observe(40_000.0), None);
        assert!(g.exposure() * 0.9 <= 0.05 + 1e-12);
    }

    #[test]
    fn back_to_full_probing_only_well_under_budget() {
        let mut g = Governor::new(0.05, COST);
        g.observe(60_000.0).unwrap();
        // 4% if probed throughout: under budget, but not by half.
        assert_eq!(g.observe(2_700.0), None);
        assert!(g.exposure() < 1.0);
        let plan = g.observe(1_000.0).unwrap();
        assert_eq!(plan.exposure, 1.0);
    }

    #[test]
    fn exposure_never_drops_below_the_minimum() {
        let mut g = Governor::new(0.001, 1e-3);
        let plan = g.observe(1e6).unwrap();
        assert_eq!(plan.exposure, MIN_EXPOSURE);
    }

    #[test]
    fn call_sites_are_sampled_only_for_hot_functions() {
        assert_eq!(caller_shift(0.0), 0);
        assert_eq!(caller_shift(f64::NAN), 0);
        assert_eq!(caller_shift(4_000.0), 0);
        // 10k/s: one in 4, 2.5k reads a second.
        assert_eq!(caller_shift(10_000.0), 2);
        // Flat out: capped, still thousands of reads a second.
        assert_eq!(caller_shift(250_000.0), 6);
        assert_eq!(caller_shift(1e9), profiler_common::MAX_CALLER_SHIFT);
        for rate in [4_096.0, 9_000.0, 70_000.0, 131_072.0] {
            let shift = caller_shift(rate);
            assert!(rate / f64::from(1u32 << shift) >= CALL_SITES_PER_SECOND);
        }
    }

    #[test]
    fn full_budget_never_windows() {
        let mut g = Governor::new(1.0, COST);
        assert_eq!(g.observe(1e9), None);
        assert_eq!(g.exposure(), 1.0);
    }
}
