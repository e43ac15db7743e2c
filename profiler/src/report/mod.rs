//! What cacheloop tells the user, and the sinks that write it.
//!
//! [`Record`] is the JSON-lines contract of DESIGN.md (`sample`, `loop`, and
//! the lifecycle records): fields may be added, never renamed. Each sink
//! renders records its own way: [`json::JsonSink`] one object per line,
//! [`text::TextSink`] a live view for people. Pure: sinks write to any
//! `io::Write`.

pub mod incident;
pub mod json;
pub mod metrics;
pub mod text;

use std::{io, sync::Arc, time::SystemTime};

use serde::{Deserialize, Serialize};

use crate::detect::{Agreed, LoopVerdict, Recovery, Rules};

/// Unix time in seconds, as a float: the `ts` of every record.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One line of output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// The first record of a run: what is running, where, and every rule
    /// setting in force.
    Start {
        ts: f64,
        /// cacheloop's version.
        version: String,
        /// The kernel release the probes run on.
        kernel: String,
        /// `uprobe_multi` or `perf_link_per_function`.
        mode: String,
        settings: Box<StartSettings>,
        /// With `replay`: the recording replayed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recording: Option<String>,
    },
    /// Something the user should know that does not stop the run: a target
    /// that could not be probed, hits not counted, a map filling up.
    Warning {
        ts: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// What kind: `attach_failed`, `dropped_hits`, `map_pressure`,
        /// `calibration_failed`, `keys_unavailable`, `output_behind`,
        /// `recording_failed`.
        kind: String,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u64>,
    },
    /// Probes are in place for a process (or, with `pid` absent, for every
    /// process running `path`).
    Attached {
        ts: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// The pid inside the process's own pid namespace, where it differs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ns_pid: Option<u32>,
        path: String,
        /// The catalog's names, not copies of them.
        functions: Vec<Arc<str>>,
        /// `uprobe_multi` or `perf_link_per_function`.
        mode: String,
        /// Seconds from start-up to this record.
        attach_seconds: f64,
    },
    /// Without `--func`: a function cacheloop picked to count, and why
    /// (`discover.rs`). Counted from its `attached` record on.
    Picked {
        ts: f64,
        function: String,
        /// The executable it is in.
        path: String,
        /// `name` (reads like invalidation) or `hot` (on-CPU samples).
        why: String,
        /// In words.
        reason: String,
        /// With `hot`: its samples in the window, and the window's in all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        samples: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        of_samples: Option<u64>,
    },
    /// The overhead governor (`--max-overhead`) changed how much of each
    /// interval the probes stay in.
    Governor {
        ts: f64,
        /// Share of each interval the probes are in, percent (100 =
        /// throughout; below that, rates are estimates).
        probed_percent: f64,
        /// What probing throughout would cost the busiest target, percent
        /// of its time.
        full_overhead_percent: f64,
        max_overhead_percent: f64,
        /// What one probe hit costs, measured at start-up.
        probe_cost_us: f64,
    },
    /// Calls of one function in one process over the last interval.
    Sample {
        ts: f64,
        pid: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ns_pid: Option<u32>,
        /// The catalog's name, shared: one record per function and interval.
        function: Arc<str>,
        calls: u64,
        /// Calls per second over the interval.
        rate: f64,
        /// The detector's learned rate, once it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        baseline: Option<f64>,
        /// `calls` and `rate` are estimated from a probe window (the
        /// overhead governor kept the probes out for part of the interval).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        estimated: bool,
    },
    /// What a watched process costs over the last interval.
    Health {
        ts: f64,
        pid: u32,
        #[serde(flatten)]
        health: Health,
    },
    /// A confirmed loop.
    Loop {
        ts: f64,
        pid: u32,
        functions: Vec<String>,
        rate: f64,
        baseline: f64,
        reason: String,
        evidence: Box<Evidence>,
    },
    /// A loop that calmed down.
    Recovered {
        ts: f64,
        pid: u32,
        functions: Vec<String>,
        rate: f64,
        baseline: f64,
        reason: String,
    },
    /// A watched process exited.
    TargetExit { ts: f64, pid: u32 },
    /// An `--on-loop` or `--on-recover` hook ran.
    Hook {
        ts: f64,
        /// `loop` or `recovered`: the verdict it ran for.
        event: String,
        /// The verdict's process.
        pid: u32,
        /// Its exit status, when it exited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<i32>,
        /// The signal that ended it, when one did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        /// It ran past `--hook-timeout` and was stopped.
        timed_out: bool,
        seconds: f64,
        /// Why it could not run, or how it was stopped.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Once per interval: calls the kernel could not count in it (the
    /// counter map was full), and how full that map is. Nothing is lost
    /// without a word: `dropped` is 0 in a healthy run.
    Interval {
        ts: f64,
        dropped: u64,
        /// Key and call-site entries the kernel's LRU tables let go.
        evicted: u64,
        counters: u32,
        counters_capacity: u32,
    },
    /// Every probe was removed.
    Detached {
        ts: f64,
        functions: usize,
        detach_seconds: f64,
        /// Watched functions that never fired: inlined into their callers
        /// at that symbol, or not used by this workload.
        never_called: Vec<String>,
    },
}

/// A process's CPU share (percent of one core; above 100 when several
/// threads run) and resident memory, over one interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub cpu_percent: f64,
    pub rss_bytes: u64,
    /// With `--request-func`: requests per second...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_rate: Option<f64>,
    /// ...and invalidations per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalidations_per_request: Option<f64>,
}

/// Every setting in force, in the `start` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StartSettings {
    /// `--interval`, seconds.
    pub interval_seconds: f64,
    /// `--threshold`: the least rate that can be a loop, calls/s.
    pub threshold: f64,
    /// `--factor`: times the baseline that make an interval suspect.
    pub factor: f64,
    /// `--sustain`: seconds of a runaway rate that confirm a loop.
    pub sustain: f64,
    /// `--sustain-structural`: seconds of structural evidence that do.
    pub sustain_structural: f64,
    /// `--warmup`: seconds averaged into the first baseline.
    pub warmup: f64,
    /// `--cpu-cores`: CPU that counts as a burning core.
    pub cpu_cores: f64,
    /// The counters are read this often (a fraction of the interval), so a
    /// loop is judged within a fraction of a second; samples still come
    /// once an interval.
    pub read_seconds: f64,
    /// Weight of a calm interval in the baseline.
    pub alpha: f64,
    /// Times its learned value the invalidations per request must reach
    /// (`--request-func`): half of `factor`.
    pub request_factor: f64,
    /// `--max-overhead`, percent.
    pub max_overhead_percent: f64,
}

impl StartSettings {
    pub fn new(
        rules: &Rules,
        interval_seconds: f64,
        read_seconds: f64,
        max_overhead_percent: f64,
    ) -> Self {
        Self {
            interval_seconds,
            threshold: rules.min_rate,
            factor: rules.factor,
            sustain: rules.sustain,
            sustain_structural: rules.structural_sustain,
            warmup: rules.warmup,
            cpu_cores: rules.cpu_cores,
            read_seconds,
            alpha: rules.alpha,
            request_factor: rules.factor / 2.0,
            max_overhead_percent,
        }
    }
}

/// The numbers behind a loop verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Confirming rate over baseline.
    pub ratio: f64,
    /// The elevated rates, oldest first, summed over the functions.
    pub elevated_rates: Vec<f64>,
    pub elevated_seconds: f64,
    /// The rule that fired, with its thresholds.
    pub rule: RuleEvidence,
    /// Why, in one word: `call_cycle`, `key_cycle`, `repeating_keys`,
    /// `invalidations_per_request`, `expensive_calls` or
    /// `sustained_rate_over_baseline`.
    pub cause: String,
    /// Every signal that agreed: `call_cycle`, `key_cycle`,
    /// `repeating_keys`, `rate_over_baseline`, `invalidations_per_request`,
    /// `cpu`, and `no_history` when there was none to compare with.
    pub signals: Vec<String>,
    /// The baseline came from an earlier process of the same name (a
    /// restart).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inherited_baseline: bool,
    /// A loop spread over the processes of one name, summed: their pids
    /// (the record's `pid` is the busiest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<Vec<u32>>,
    /// The process's CPU and memory in the confirming interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Health>,
    /// Watched functions calling each other in a cycle, in call order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycle: Option<Vec<String>>,
    /// Keys one thread invalidated in a cycle, in the order they follow
    /// each other, from where traffic enters it (hashed unless
    /// `--show-keys`): the dependency that loops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_cycle: Option<Vec<String>>,
    /// The keys invalidated most in the confirming interval, busiest first
    /// (hashed unless `--show-keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_keys: Option<Vec<KeyCount>>,
    /// The most often sampled user stack of the loop's functions,
    /// innermost frame first: the hottest invalidation path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<Vec<String>>,
}

#[cfg(test)]
impl Evidence {
    /// Evidence of a key cycle seen over `elevated_seconds`, the rest
    /// empty, for the sinks' tests to adjust.
    pub(crate) fn key_cycle_for_tests(ratio: f64, elevated_seconds: f64) -> Self {
        Self {
            ratio,
            elevated_rates: vec![],
            elevated_seconds,
            rule: RuleEvidence {
                name: "rate".into(),
                factor: 10.0,
                min_rate: 1000.0,
                sustain: 2.0,
            },
            cause: "key_cycle".into(),
            signals: vec!["key_cycle".into()],
            inherited_baseline: false,
            processes: None,
            target: None,
            cycle: None,
            key_cycle: None,
            top_keys: None,
            stack: None,
        }
    }
}

/// A key and how often it was invalidated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyCount {
    pub key: String,
    pub count: u64,
}

/// Structural evidence the sampler found for a process in an interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Structure {
    /// Watched functions calling each other, in call order.
    pub cycle: Option<Vec<String>>,
    /// Keys walked in a cycle, in order.
    pub key_cycle: Option<Vec<String>>,
    /// The functions in the loop, when not its verdicts' own (a loop of a
    /// process's functions together, or of a group of processes).
    pub functions: Vec<String>,
    /// A loop over the processes of one name: all of them.
    pub processes: Vec<u32>,
    /// The busiest keys; `repeating` when a few keys carry the calls.
    pub top_keys: Option<Vec<KeyCount>>,
    pub repeating: bool,
    /// The hottest user stack, symbolized.
    pub stack: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleEvidence {
    pub name: String,
    pub factor: f64,
    pub min_rate: f64,
    /// Seconds of suspect readings that confirmed it.
    pub sustain: f64,
}

/// One loop record for the functions of one process confirmed in the same
/// interval: rates and baselines are summed over them.
pub fn loop_record(
    ts: f64,
    verdicts: &[LoopVerdict],
    name: impl Fn(u32) -> String,
    rules: &Rules,
    target: Option<Health>,
    structure: Structure,
) -> Option<Record> {
    let Structure {
        cycle,
        key_cycle,
        functions,
        processes,
        top_keys,
        repeating,
        stack,
    } = structure;
    let first = verdicts.first()?;
    let rate: f64 = verdicts.iter().map(|v| v.rate).sum();
    let baseline: f64 = verdicts.iter().map(|v| v.baseline).sum();
    let mut elevated_rates = vec![0.0; first.elevated_rates.len()];
    for v in verdicts {
        for (sum, r) in elevated_rates.iter_mut().zip(&v.elevated_rates) {
            *sum += r;
        }
    }
    let functions: Vec<String> = if functions.is_empty() {
        verdicts.iter().map(|v| name(v.key.func)).collect()
    } else {
        functions
    };
    let ratio = rate / baseline.max(crate::detect::BASELINE_FLOOR);
    // The strongest cause among the functions, and every signal that
    // agreed in any of them.
    let cause = verdicts.iter().map(|v| v.cause).min()?;
    // No history only if none of the functions had any.
    let agreed = Agreed {
        no_history: verdicts.iter().all(|v| v.agreed.no_history),
        ..verdicts.iter().fold(first.agreed, |a, v| a.union(v.agreed))
    };
    let inherited = verdicts.iter().any(|v| v.inherited);
    let seconds = verdicts
        .iter()
        .map(|v| v.elevated_seconds)
        .fold(0.0, f64::max);
    let keys_text = |keys: &[KeyCount]| {
        keys.iter()
            .map(|k| format!("{} ({}x)", k.key, thousands(k.count as f64)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut said = Vec::new();
    if agreed.call_cycle
        && let Some(cycle) = &cycle
    {
        said.push(format!(
            "{} call each other in a cycle ({} -> {})",
            cycle.join(" and "),
            cycle.join(" -> "),
            cycle[0]
        ));
    }
    if agreed.key_cycle
        && let Some(keys) = &key_cycle
    {
        said.push(format!(
            "one thread invalidates the same keys over and over in the same order ({} -> {}): \
             a cyclic dependency",
            keys.join(" -> "),
            keys[0]
        ));
    }
    if agreed.repeating_keys
        && repeating
        && let Some(keys) = &top_keys
    {
        said.push(format!(
            "the same {} key(s) take nearly every call, far beyond their usual share ({})",
            keys.len(),
            keys_text(keys)
        ));
    }
    if agreed.per_request
        && let Some(h) = target
        && let (Some(ratio), Some(requests)) = (h.invalidations_per_request, h.requests_rate)
    {
        said.push(format!(
            "it makes {} invalidations per request while serving {} requests/s",
            thousands(ratio),
            thousands(requests)
        ));
    }
    if agreed.cpu
        && let Some(h) = target
    {
        said.push(format!(
            "{} {:.0}% CPU ({} resident)",
            if processes.len() > 1 {
                "together they burn"
            } else {
                "the process burns"
            },
            h.cpu_percent,
            bytes(h.rss_bytes)
        ));
    }
    let against = if agreed.no_history {
        "with no healthy history to compare (it was running when cacheloop attached)".to_owned()
    } else {
        format!(
            "{} its usual {}/s{}",
            times(ratio),
            thousands(baseline),
            if inherited {
                " (learned before the process restarted)"
            } else {
                ""
            }
        )
    };
    let spread = match processes.len() {
        0 | 1 => String::new(),
        n => format!(" together in {n} processes of one name"),
    };
    let reason = format!(
        "{}{spread} ran at {}/s, {against}, for {:.1} s of the last {:.1} s; {}: an invalidation \
         loop, not traffic",
        functions.join(" + "),
        thousands(rate),
        seconds,
        if cause.structural() {
            2.0 * rules.structural_sustain
        } else {
            1.5 * rules.sustain
        },
        if said.is_empty() {
            "nothing explains the rise".to_owned()
        } else {
            said.join("; ")
        },
    );
    Some(Record::Loop {
        ts,
        pid: first.key.pid,
        functions,
        rate: round1(rate),
        baseline: round1(baseline),
        reason,
        evidence: Box::new(Evidence {
            ratio: round1(ratio),
            elevated_rates: elevated_rates.into_iter().map(round1).collect(),
            elevated_seconds: round1(seconds),
            rule: RuleEvidence {
                name: cause.as_str().to_owned(),
                factor: rules.factor,
                min_rate: rules.min_rate,
                sustain: if cause.structural() {
                    rules.structural_sustain
                } else {
                    rules.sustain
                },
            },
            cause: cause.as_str().to_owned(),
            signals: agreed.names().into_iter().map(str::to_owned).collect(),
            inherited_baseline: inherited,
            processes: (processes.len() > 1).then_some(processes),
            target,
            cycle,
            key_cycle,
            top_keys,
            stack,
        }),
    })
}

/// 26_214_400 -> "25.0 MiB".
pub(crate) fn bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if n >= 1 << 30 {
        format!("{:.1} GiB", n as f64 / (MIB * 1024.0))
    } else {
        format!("{:.1} MiB", n as f64 / MIB)
    }
}

/// The record for a loop of `function` that is over.
pub fn recovered_record(ts: f64, recovery: &Recovery, function: &str) -> Record {
    let function = function.to_owned();
    Record::Recovered {
        ts,
        pid: recovery.key.pid,
        reason: format!(
            "{function} is back to {}/s (baseline {}/s) after {:.0} s in a loop that peaked at {}/s",
            thousands(recovery.rate),
            thousands(recovery.baseline),
            recovery.loop_seconds,
            thousands(recovery.peak_rate),
        ),
        functions: vec![function],
        rate: round1(recovery.rate),
        baseline: round1(recovery.baseline),
    }
}

/// What the run saw, for the closing summary.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub seconds: f64,
    pub functions: usize,
    pub processes: usize,
    /// (pid, function, total calls, peak rate), busiest first.
    pub busiest: Vec<(u32, String, u64, f64)>,
    /// (pid, functions) of every loop confirmed.
    pub loops: Vec<(u32, Vec<String>)>,
    /// Watched functions that never fired.
    pub silent: Vec<String>,
    /// Hits the kernel could not count (counter map full).
    pub dropped: u64,
}

/// A place records go.
pub trait Sink {
    fn emit(&mut self, record: &Record) -> io::Result<()>;
    /// Called once per interval, after its records.
    fn end_tick(&mut self) -> io::Result<()>;
    /// Called once when the run ends.
    fn finish(&mut self, summary: &Summary) -> io::Result<()>;
}

pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// 48210.4 -> "48,210"; small rates keep a decimal: 2.5 -> "2.5".
pub(crate) fn thousands(x: f64) -> String {
    if x < 10.0 {
        return format!("{:.1}", x.max(0.0));
    }
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// 243.6 -> "244x"; under 10 keeps a decimal.
pub(crate) fn times(ratio: f64) -> String {
    if ratio < 10.0 {
        format!("{ratio:.1}x")
    } else {
        format!("{}x", thousands(ratio))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{Cause, SeriesKey};

    fn verdict(func: u32, rate: f64, baseline: f64) -> LoopVerdict {
        LoopVerdict {
            key: SeriesKey { pid: 7, func },
            rate,
            baseline,
            elevated_rates: vec![rate; 3],
            elevated_seconds: 3.0,
            cause: Cause::RunawayRate,
            agreed: Agreed {
                rate: true,
                cpu: true,
                ..Agreed::default()
            },
            inherited: false,
        }
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(48210.4), "48,210");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(2.46), "2.5");
        assert_eq!(times(243.6), "244x");
        assert_eq!(times(4.52), "4.5x");
    }

    #[test]
    fn loop_record_names_the_function_and_explains_itself() {
        let names = ["cache_invalidate".to_owned()];
        let mut v = verdict(0, 48_000.0, 200.0);
        v.cause = Cause::PerRequest;
        v.agreed.per_request = true;
        let health = Health {
            cpu_percent: 99.0,
            rss_bytes: 25 << 20,
            requests_rate: Some(200.0),
            invalidations_per_request: Some(240.0),
        };
        let rec = loop_record(
            1.5,
            &[v],
            |f| names[f as usize].clone(),
            &Rules::default(),
            Some(health),
            Structure::default(),
        )
        .unwrap();
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["type"], "loop");
        assert_eq!(json["pid"], 7);
        assert_eq!(json["functions"][0], "cache_invalidate");
        assert_eq!(json["rate"], 48_000.0);
        assert_eq!(json["baseline"], 200.0);
        assert_eq!(json["evidence"]["ratio"], 240.0);
        let reason = json["reason"].as_str().unwrap();
        assert!(
            reason.contains("cache_invalidate ran at 48,000/s"),
            "{reason}"
        );
        assert!(reason.contains("240x its usual 200/s"), "{reason}");
        assert!(
            reason.contains("burns 99% CPU (25.0 MiB resident)"),
            "{reason}"
        );
        assert!(
            reason.contains("240 invalidations per request while serving 200 requests/s"),
            "{reason}"
        );
        assert_eq!(json["evidence"]["cause"], "invalidations_per_request");
        assert_eq!(
            json["evidence"]["signals"],
            serde_json::json!(["rate_over_baseline", "invalidations_per_request", "cpu"])
        );
        assert_eq!(json["evidence"]["target"]["rss_bytes"], 25 << 20);
    }

    #[test]
    fn simultaneous_loops_in_one_process_share_a_record() {
        let names = ["inv_a".to_owned(), "inv_b".to_owned()];
        let (a, b) = (verdict(0, 30_000.0, 100.0), verdict(1, 30_000.0, 100.0));
        let rec = loop_record(
            0.0,
            &[a, b],
            |f| names[f as usize].clone(),
            &Rules::default(),
            None,
            Structure::default(),
        )
        .unwrap();
        let Record::Loop {
            functions,
            rate,
            evidence,
            ..
        } = rec
        else {
            panic!()
        };
        assert_eq!(functions, ["inv_a", "inv_b"]);
        assert_eq!(rate, 60_000.0);
        assert_eq!(evidence.elevated_rates, vec![60_000.0; 3]);
    }

    #[test]
    fn loop_confirmed_by_a_cycle_says_so_and_carries_it() {
        let names = vec!["invalidate_a".to_owned(), "invalidate_b".to_owned()];
        let mut a = verdict(0, 30_000.0, 0.0);
        a.cause = Cause::CallCycle;
        a.agreed = Agreed {
            call_cycle: true,
            cpu: true,
            no_history: true,
            ..Agreed::default()
        };
        let structure = Structure {
            cycle: Some(names.clone()),
            ..Structure::default()
        };
        let name = |f: u32| names[f as usize].clone();
        let rec = loop_record(0.0, &[a], name, &Rules::default(), None, structure).unwrap();
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(
            json["evidence"]["cycle"],
            serde_json::json!(["invalidate_a", "invalidate_b"])
        );
        assert_eq!(json["evidence"]["rule"]["name"], "call_cycle");
        let reason = json["reason"].as_str().unwrap();
        assert!(
            reason.contains("invalidate_a -> invalidate_b -> invalidate_a"),
            "{reason}"
        );
    }

    #[test]
    fn loop_confirmed_by_repeating_keys_names_them() {
        let names = ["cache_invalidate".to_owned()];
        let mut v = verdict(0, 80_000.0, 10.0);
        v.cause = Cause::RepeatingKeys;
        v.agreed.repeating_keys = true;
        let keys = vec![
            KeyCount {
                key: "page:catalog".into(),
                count: 40_000,
            },
            KeyCount {
                key: "fragment:nav".into(),
                count: 40_000,
            },
        ];
        let structure = Structure {
            top_keys: Some(keys),
            repeating: true,
            ..Structure::default()
        };
        let name = |f: u32| names[f as usize].clone();
        let rec = loop_record(0.0, &[v], name, &Rules::default(), None, structure).unwrap();
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["evidence"]["rule"]["name"], "repeating_keys");
        assert_eq!(json["evidence"]["top_keys"][0]["key"], "page:catalog");
        assert_eq!(json["evidence"]["top_keys"][0]["count"], 40_000);
        let reason = json["reason"].as_str().unwrap();
        assert!(
            reason.contains("the same 2 key(s) take nearly every call"),
            "{reason}"
        );
        assert!(reason.contains("page:catalog (40,000x)"), "{reason}");
    }

    #[test]
    fn loop_confirmed_by_a_key_cycle_names_the_keys_in_order() {
        let names = ["cache_invalidate".to_owned()];
        let mut v = verdict(0, 80_000.0, 0.0);
        v.cause = Cause::KeyCycle;
        v.agreed = Agreed {
            key_cycle: true,
            cpu: true,
            no_history: true,
            ..Agreed::default()
        };
        let structure = Structure {
            key_cycle: Some(vec!["page:catalog".into(), "fragment:nav".into()]),
            ..Structure::default()
        };
        let name = |f: u32| names[f as usize].clone();
        let health = Health {
            cpu_percent: 100.0,
            rss_bytes: 1 << 20,
            requests_rate: None,
            invalidations_per_request: None,
        };
        let rec = loop_record(0.0, &[v], name, &Rules::default(), Some(health), structure).unwrap();
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["evidence"]["cause"], "key_cycle");
        assert_eq!(
            json["evidence"]["key_cycle"],
            serde_json::json!(["page:catalog", "fragment:nav"])
        );
        assert_eq!(
            json["evidence"]["signals"],
            serde_json::json!(["key_cycle", "cpu", "no_history"])
        );
        let reason = json["reason"].as_str().unwrap();
        assert!(
            reason.contains("(page:catalog -> fragment:nav -> page:catalog)"),
            "{reason}"
        );
        assert!(reason.contains("no healthy history"), "{reason}");
    }

    #[test]
    fn sample_serializes_with_the_contract_fields() {
        let rec = Record::Sample {
            ts: 1795574373.2,
            pid: 1234,
            ns_pid: None,
            function: "cache_invalidate".into(),
            calls: 200,
            rate: 199.8,
            baseline: None,
            estimated: false,
        };
        assert_eq!(
            serde_json::to_string(&rec).unwrap(),
            r#"{"type":"sample","ts":1795574373.2,"pid":1234,"function":"cache_invalidate","calls":200,"rate":199.8}"#
        );
    }
}
