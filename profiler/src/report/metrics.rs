//! What the records say, as Prometheus metrics (`watch --prometheus`),
//! kept in the official `prometheus-client` crate's registry. Pure: fed the
//! records of each tick and the names of the processes they are about;
//! encoded on each scrape by the exporter (`exporter.rs`), which serves it.
//!
//! Label cardinality: the per-function families have one series per watched
//! function that has fired and live process (`function`, `pid`, `comm`), the
//! per-process ones one per live process; a process's series go when it
//! exits. `cacheloop_loops_total` and `cacheloop_recoveries_total` are by
//! `comm` (and cause), so they survive a restart of the cache.
//!
//! Two text formats: OpenMetrics, the crate's own, which Prometheus asks for
//! by its Accept header; and the classic Prometheus text format (0.0.4) for
//! every other client (`curl`, `promtool check metrics`), rewritten from the
//! same encoding (see [`to_prometheus_text`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::atomic::AtomicU64,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::Record;

/// A float gauge.
type FGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabels {
    function: String,
    pid: u32,
    comm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    pid: u32,
    comm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoopLabels {
    comm: String,
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommLabels {
    comm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabels {
    event: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    kernel: String,
    mode: String,
}

/// The registry to encode, and the families the records update.
pub struct Metrics {
    registry: Registry,
    calls: Family<FunctionLabels, Counter>,
    rate: Family<FunctionLabels, FGauge>,
    baseline: Family<FunctionLabels, FGauge>,
    loop_active: Family<FunctionLabels, Gauge>,
    loops: Family<LoopLabels, Counter>,
    recoveries: Family<CommLabels, Counter>,
    cpu: Family<ProcessLabels, FGauge>,
    rss: Family<ProcessLabels, Gauge>,
    per_request: Family<ProcessLabels, FGauge>,
    probed: FGauge,
    full_overhead: FGauge,
    max_overhead: FGauge,
    hit_cost: FGauge,
    dropped: Counter,
    evicted: Counter,
    counters: Gauge,
    counters_capacity: Gauge,
    warnings: Family<KindLabels, Counter>,
    behind: Counter,
    hooks: Family<HookLabels, Counter>,
    build: Family<BuildLabels, Gauge>,
    attached_functions: Gauge,
    targets: Gauge,
    /// Per live process: its name and the functions it has series for.
    processes: BTreeMap<u32, Process>,
    /// Functions attached, by (process, or none for a whole file; path).
    attached: BTreeMap<(Option<u32>, String), usize>,
}

#[derive(Default)]
struct Process {
    comm: String,
    /// Every label set made for it, exactly: what goes when it does.
    series: HashSet<FunctionLabels>,
    process_series: HashSet<ProcessLabels>,
}

impl Metrics {
    /// `max_overhead` as a share (0.1 for 10%).
    pub fn new(max_overhead: f64) -> Self {
        let mut registry = Registry::default();
        let m = Self {
            registry: Registry::default(),
            calls: Family::default(),
            rate: Family::default(),
            baseline: Family::default(),
            loop_active: Family::default(),
            loops: Family::default(),
            recoveries: Family::default(),
            cpu: Family::default(),
            rss: Family::default(),
            per_request: Family::default(),
            probed: FGauge::default(),
            full_overhead: FGauge::default(),
            max_overhead: FGauge::default(),
            hit_cost: FGauge::default(),
            dropped: Counter::default(),
            evicted: Counter::default(),
            counters: Gauge::default(),
            counters_capacity: Gauge::default(),
            warnings: Family::default(),
            behind: Counter::default(),
            hooks: Family::default(),
            build: Family::default(),
            attached_functions: Gauge::default(),
            targets: Gauge::default(),
            processes: BTreeMap::new(),
            attached: BTreeMap::new(),
        };
        m.probed.set(1.0);
        m.max_overhead.set(max_overhead);
        registry.register(
            "cacheloop_calls",
            "Calls of a watched function counted in a process (estimated from probe windows while the overhead governor keeps the probes out part of the time)",
            m.calls.clone(),
        );
        registry.register(
            "cacheloop_call_rate",
            "Calls per second of a watched function over the last interval",
            m.rate.clone(),
        );
        registry.register(
            "cacheloop_baseline_call_rate",
            "The call rate the detector learned for a function as normal, once it has one",
            m.baseline.clone(),
        );
        registry.register(
            "cacheloop_loop_active",
            "1 while a loop verdict stands for the function, 0 otherwise",
            m.loop_active.clone(),
        );
        registry.register(
            "cacheloop_loops",
            "Loops confirmed, by process name and cause",
            m.loops.clone(),
        );
        registry.register(
            "cacheloop_recoveries",
            "Loops that calmed down, by process name",
            m.recoveries.clone(),
        );
        registry.register(
            "cacheloop_target_cpu_cores",
            "CPU a watched process used over the last interval, in cores",
            m.cpu.clone(),
        );
        registry.register(
            "cacheloop_target_resident_memory_bytes",
            "Resident memory of a watched process",
            m.rss.clone(),
        );
        registry.register(
            "cacheloop_invalidations_per_request",
            "Invalidations per request over the last interval (with --request-func)",
            m.per_request.clone(),
        );
        registry.register(
            "cacheloop_probed_ratio",
            "Share of each interval the probes are in (1: throughout; below, rates are estimates)",
            m.probed.clone(),
        );
        registry.register(
            "cacheloop_probe_overhead_ratio",
            "Share of the busiest target's time probing throughout would cost, as the overhead governor last measured",
            m.full_overhead.clone(),
        );
        registry.register(
            "cacheloop_max_overhead_ratio",
            "The overhead budget (--max-overhead) as a share",
            m.max_overhead.clone(),
        );
        registry.register(
            "cacheloop_probe_hit_cost_seconds",
            "What one probe hit costs a target, measured at start-up (0 until measured)",
            m.hit_cost.clone(),
        );
        registry.register(
            "cacheloop_dropped_hits",
            "Calls the kernel could not count because its counter map was full",
            m.dropped.clone(),
        );
        registry.register(
            "cacheloop_evicted_entries",
            "Key and call-site entries the kernel's LRU tables let go",
            m.evicted.clone(),
        );
        registry.register(
            "cacheloop_kernel_map_entries",
            "(function, process) pairs in the kernel's map of counts",
            m.counters.clone(),
        );
        registry.register(
            "cacheloop_kernel_map_max_entries",
            "Capacity of the kernel's map of counts (beyond it, calls are dropped)",
            m.counters_capacity.clone(),
        );
        registry.register(
            "cacheloop_warnings",
            "Warnings, by kind (attach_failed, dropped_hits, output_behind, ...)",
            m.warnings.clone(),
        );
        registry.register(
            "cacheloop_exporter_behind_ticks",
            "Intervals whose records the output stages fell too far behind to take, the exporter's included (an output_behind warning says so): their calls are missing from cacheloop_calls_total",
            m.behind.clone(),
        );
        registry.register(
            "cacheloop_hooks",
            "--on-loop and --on-recover hooks run, by event and result (ok, failed, timeout)",
            m.hooks.clone(),
        );
        registry.register(
            "cacheloop_build_info",
            "cacheloop's version, the kernel it runs on and its attach mode (always 1)",
            m.build.clone(),
        );
        registry.register(
            "cacheloop_attached_functions",
            "Function probes in place, over all targets",
            m.attached_functions.clone(),
        );
        registry.register(
            "cacheloop_targets",
            "Live processes cacheloop is watching",
            m.targets.clone(),
        );
        Self { registry, ..m }
    }

    /// The processes a tick watched, by pid and name: the truth about
    /// which are live. Any other pid's series go, however it left (an
    /// exit, an exec into a program not watched, a file rewritten under
    /// it); a process whose name changed (exec, PR_SET_NAME) starts new
    /// series under the new name.
    pub fn processes(&mut self, live: impl IntoIterator<Item = (u32, String)>) {
        let live: BTreeMap<u32, String> = live.into_iter().collect();
        let gone: Vec<u32> = self
            .processes
            .iter()
            .filter(|(pid, p)| live.get(pid) != Some(&p.comm))
            .map(|(&pid, _)| pid)
            .collect();
        for pid in gone {
            self.forget(pid);
        }
        for (pid, comm) in live {
            self.processes.entry(pid).or_default().comm = comm;
        }
        self.targets.set(self.processes.len() as i64);
    }

    /// `behind` ticks were not sent to the exporter (it was too far behind).
    pub fn behind(&mut self, ticks: u64) {
        self.behind.inc_by(ticks);
    }

    pub fn observe(&mut self, record: &Record) {
        match record {
            Record::Start {
                version,
                kernel,
                mode,
                ..
            } => {
                self.build
                    .get_or_create(&BuildLabels {
                        version: version.clone(),
                        kernel: kernel.clone(),
                        mode: mode.clone(),
                    })
                    .set(1);
            }
            Record::Attached {
                pid,
                path,
                functions,
                ..
            } => {
                self.attached.insert((*pid, path.clone()), functions.len());
                self.count_attached();
            }
            Record::Warning { kind, .. } => {
                self.warnings
                    .get_or_create(&KindLabels { kind: kind.clone() })
                    .inc();
            }
            Record::Governor {
                probed_percent,
                full_overhead_percent,
                max_overhead_percent,
                probe_cost_us,
                ..
            } => {
                self.probed.set(probed_percent / 100.0);
                self.full_overhead.set(full_overhead_percent / 100.0);
                self.max_overhead.set(max_overhead_percent / 100.0);
                self.hit_cost.set(probe_cost_us / 1e6);
            }
            Record::Sample {
                pid,
                function,
                calls,
                rate,
                baseline,
                ..
            } => {
                let labels = self.function_labels(*pid, function);
                self.calls.get_or_create(&labels).inc_by(*calls);
                self.rate.get_or_create(&labels).set(*rate);
                if let Some(baseline) = baseline {
                    self.baseline.get_or_create(&labels).set(*baseline);
                }
                // Present from the first sample: an alert on `== 1` and a
                // graph both want the 0.
                drop(self.loop_active.get_or_create(&labels));
            }
            Record::Health { pid, health, .. } => {
                let process = self.processes.entry(*pid).or_default();
                let labels = ProcessLabels {
                    pid: *pid,
                    comm: process.comm.clone(),
                };
                process.process_series.insert(labels.clone());
                self.cpu
                    .get_or_create(&labels)
                    .set(health.cpu_percent / 100.0);
                self.rss
                    .get_or_create(&labels)
                    .set(i64::try_from(health.rss_bytes).unwrap_or(i64::MAX));
                if let Some(ratio) = health.invalidations_per_request {
                    self.per_request.get_or_create(&labels).set(ratio);
                }
            }
            Record::Loop {
                pid,
                functions,
                evidence,
                ..
            } => {
                for function in functions {
                    let labels = self.function_labels(*pid, function);
                    self.loop_active.get_or_create(&labels).set(1);
                }
                self.loops
                    .get_or_create(&LoopLabels {
                        comm: self.comm(*pid),
                        cause: evidence.cause.clone(),
                    })
                    .inc();
            }
            Record::Recovered { pid, functions, .. } => {
                for function in functions {
                    let labels = self.function_labels(*pid, function);
                    self.loop_active.get_or_create(&labels).set(0);
                }
                self.recoveries
                    .get_or_create(&CommLabels {
                        comm: self.comm(*pid),
                    })
                    .inc();
            }
            Record::TargetExit { pid, .. } => self.forget(*pid),
            Record::Interval {
                dropped,
                evicted,
                counters,
                counters_capacity,
                ..
            } => {
                self.dropped.inc_by(*dropped);
                self.evicted.inc_by(*evicted);
                self.counters.set(i64::from(*counters));
                self.counters_capacity.set(i64::from(*counters_capacity));
            }
            Record::Hook {
                event,
                status,
                timed_out,
                ..
            } => {
                let result = match (status, timed_out) {
                    (_, true) => "timeout",
                    (Some(0), _) => "ok",
                    _ => "failed",
                };
                self.hooks
                    .get_or_create(&HookLabels {
                        event: event.clone(),
                        result: result.to_owned(),
                    })
                    .inc();
            }
            Record::Picked { .. } => {}
            Record::Detached { .. } => {
                self.attached.clear();
                self.count_attached();
            }
        }
    }

    fn comm(&self, pid: u32) -> String {
        self.processes
            .get(&pid)
            .map(|p| p.comm.clone())
            .unwrap_or_default()
    }

    fn function_labels(&mut self, pid: u32, function: &str) -> FunctionLabels {
        let process = self.processes.entry(pid).or_default();
        let labels = FunctionLabels {
            function: function.to_owned(),
            pid,
            comm: process.comm.clone(),
        };
        process.series.insert(labels.clone());
        labels
    }

    fn count_attached(&self) {
        self.attached_functions
            .set(self.attached.values().sum::<usize>() as i64);
    }

    /// An exited process: its series go (bounded cardinality), and so do
    /// its probes.
    fn forget(&mut self, pid: u32) {
        if let Some(process) = self.processes.remove(&pid) {
            for labels in &process.series {
                self.calls.remove(labels);
                self.rate.remove(labels);
                self.baseline.remove(labels);
                self.loop_active.remove(labels);
            }
            for labels in &process.process_series {
                self.cpu.remove(labels);
                self.rss.remove(labels);
                self.per_request.remove(labels);
            }
        }
        self.attached.retain(|(p, _), _| *p != Some(pid));
        self.count_attached();
        self.targets.set(self.processes.len() as i64);
    }

    /// The registry, to encode on a scrape.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// The OpenMetrics text of `registry`.
pub fn openmetrics_text(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = text::encode(&mut out, registry);
    out
}

/// The classic Prometheus text format (0.0.4) of the same metrics. The
/// crate writes OpenMetrics only, which differs for what is used here in
/// three ways: a counter's `# HELP`/`# TYPE` name it without the `_total`
/// its samples carry (the classic parsers then see a family without help),
/// `# UNIT` lines, and the closing `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Evidence;

    fn sample(pid: u32, calls: u64) -> Record {
        Record::Sample {
            ts: 1.0,
            pid,
            ns_pid: None,
            function: "cache_invalidate".into(),
            calls,
            rate: calls as f64,
            baseline: Some(100.0),
            estimated: false,
        }
    }

    fn looped(pid: u32) -> Record {
        Record::Loop {
            ts: 2.0,
            pid,
            functions: vec!["cache_invalidate".into()],
            rate: 50_000.0,
            baseline: 100.0,
            reason: "a loop".into(),
            evidence: Box::new(Evidence::key_cycle_for_tests(500.0, 2.0)),
        }
    }

    fn text(m: &Metrics) -> String {
        to_prometheus_text(&openmetrics_text(m.registry()))
    }

    #[test]
    fn a_verdict_sets_loop_active_until_recovery_and_an_exit_drops_the_series() {
        let mut m = Metrics::new(0.1);
        m.processes([(7, "demo-cache".to_owned()), (8, "demo-cache".to_owned())]);
        m.observe(&sample(7, 120));
        m.observe(&sample(7, 80));
        m.observe(&sample(8, 5));
        let series = r#"{function="cache_invalidate",pid="7",comm="demo-cache"}"#;
        let t = text(&m);
        assert!(
            t.contains(&format!("cacheloop_calls_total{series} 200\n")),
            "{t}"
        );
        assert!(
            t.contains(&format!("cacheloop_loop_active{series} 0\n")),
            "{t}"
        );
        assert!(t.contains("cacheloop_targets 2\n"), "{t}");
        m.observe(&looped(7));
        let t = text(&m);
        assert!(
            t.contains(&format!("cacheloop_loop_active{series} 1\n")),
            "{t}"
        );
        assert!(
            t.contains(r#"cacheloop_loops_total{comm="demo-cache",cause="key_cycle"} 1"#),
            "{t}"
        );
        m.observe(&Record::Recovered {
            ts: 3.0,
            pid: 7,
            functions: vec!["cache_invalidate".into()],
            rate: 100.0,
            baseline: 100.0,
            reason: "calm".into(),
        });
        assert!(text(&m).contains(&format!("cacheloop_loop_active{series} 0\n")));
        m.observe(&Record::TargetExit { ts: 4.0, pid: 7 });
        let t = text(&m);
        assert!(!t.contains(r#"pid="7""#), "{t}");
        assert!(t.contains(r#"pid="8""#), "{t}");
        assert!(t.contains("cacheloop_targets 1\n"), "{t}");
        // The count of loops outlives the process (a restart keeps it).
        assert!(t.contains(r#"cacheloop_loops_total{comm="demo-cache",cause="key_cycle"} 1"#));

        // Left without a target_exit (an exec into a program not watched),
        // and renamed: the tick's live set is the truth.
        m.processes([(8, "demo-cache".to_owned()), (9, "other".to_owned())]);
        m.observe(&sample(9, 5));
        m.processes([(9, "renamed".to_owned())]);
        m.observe(&sample(9, 5));
        let t = text(&m);
        assert!(!t.contains(r#"pid="8""#), "{t}");
        assert!(!t.contains(r#"comm="other""#), "{t}");
        assert!(t.contains(r#"pid="9",comm="renamed"} 5"#), "{t}");
        assert!(t.contains("cacheloop_targets 1\n"), "{t}");
    }

    #[test]
    fn classic_text_names_counters_with_total_in_help_and_type_and_has_no_eof() {
        let om = "# HELP a_calls Calls.\n# TYPE a_calls counter\na_calls_total 3\n\
                  # HELP b Gauge.\n# TYPE b gauge\n# UNIT b seconds\nb 1.0\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_calls_total Calls.\n# TYPE a_calls_total counter\na_calls_total 3\n\
             # HELP b Gauge.\n# TYPE b gauge\nb 1.0\n"
        );
    }
}
