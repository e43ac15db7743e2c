//! The live view for people: a line per busy function each interval, loops
//! called out with their reason, a summary at the end.

use std::{
    collections::HashSet,
    io::{self, Write},
    sync::Arc,
};

use super::{Record, Sink, Summary, thousands, times};

/// One sample's row: rate, pid, function, calls, baseline, estimated.
type Row = (f64, u32, Arc<str>, u64, Option<f64>, bool);

/// Rows shown per interval; the rest are counted in one line.
const TOP: usize = 10;

pub struct TextSink<W: Write> {
    out: W,
    started: Option<f64>,
    header_done: bool,
    /// (rate, pid, function, calls, baseline, estimated) of this
    /// interval's samples.
    rows: Vec<Row>,
    looping: HashSet<(u32, String)>,
    /// (pid, health) of this interval.
    health: Vec<(u32, super::Health)>,
    /// When this interval's samples were read.
    tick_ts: f64,
}

impl<W: Write> TextSink<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            started: None,
            header_done: false,
            rows: Vec::new(),
            looping: HashSet::new(),
            health: Vec::new(),
            tick_ts: 0.0,
        }
    }

    fn elapsed(&mut self, ts: f64) -> f64 {
        ts - *self.started.get_or_insert(ts)
    }
}

impl<W: Write> Sink for TextSink<W> {
    fn emit(&mut self, record: &Record) -> io::Result<()> {
        match record {
            Record::Attached {
                ts,
                pid,
                ns_pid,
                path,
                functions,
                mode,
                attach_seconds,
            } => {
                self.elapsed(*ts);
                let who = match (pid, ns_pid) {
                    (Some(pid), Some(inner)) => {
                        format!("pid {pid} (pid {inner} in its container) {path}")
                    }
                    (Some(pid), None) => format!("pid {pid} {path}"),
                    (None, _) => format!("every process running {path}"),
                };
                let what = match functions.as_slice() {
                    [one] => one.to_string(),
                    many => format!("{} functions", many.len()),
                };
                writeln!(
                    self.out,
                    "watching {what} in {who} via {mode}, attached in {attach_seconds:.2} s"
                )
            }
            Record::Start {
                ts,
                version,
                kernel,
                mode,
                settings,
                recording,
            } => {
                self.elapsed(*ts);
                let source = recording
                    .as_ref()
                    .map_or_else(String::new, |r| format!(", replaying {r}"));
                writeln!(
                    self.out,
                    "cacheloop {version} on Linux {kernel} via {mode}{source}: a loop is a cycle of \
                     calls or keys for {} s, or >= {}x baseline and >= {}/s on a busy core for {} s \
                     (read every {} s, shown every {} s)",
                    settings.sustain_structural,
                    settings.factor,
                    thousands(settings.threshold),
                    settings.sustain,
                    settings.read_seconds,
                    settings.interval_seconds
                )
            }
            Record::Warning {
                ts, pid, message, ..
            } => {
                let at = self.elapsed(*ts);
                let who = pid.map_or_else(String::new, |p| format!(" pid {p}:"));
                writeln!(self.out, "!! warning at {at:.1}s{who} {message}")
            }
            Record::Sample {
                ts,
                pid,
                function,
                calls,
                rate,
                baseline,
                estimated,
                ..
            } => {
                self.tick_ts = *ts;
                self.rows
                    .push((*rate, *pid, function.clone(), *calls, *baseline, *estimated));
                Ok(())
            }
            Record::Governor {
                ts,
                probed_percent,
                full_overhead_percent,
                max_overhead_percent,
                probe_cost_us,
            } => {
                let at = self.elapsed(*ts);
                if *probed_percent >= 100.0 {
                    writeln!(
                        self.out,
                        "-- {at:.1}s probes back in throughout: they cost ~{full_overhead_percent:.1}% of the target's time (limit {max_overhead_percent}%)"
                    )
                } else {
                    writeln!(
                        self.out,
                        "-- {at:.1}s probes in for {probed_percent:.0}% of each interval: left in they would cost ~{full_overhead_percent:.0}% of the target's time \
                         ({probe_cost_us:.1} us a hit; limit {max_overhead_percent}%); rates marked ~ are estimates from those windows"
                    )
                }
            }
            Record::Loop {
                ts,
                pid,
                functions,
                rate,
                baseline,
                reason,
                evidence,
            } => {
                let at = self.elapsed(*ts);
                for f in functions {
                    self.looping.insert((*pid, f.clone()));
                }
                let why = match evidence.cause.as_str() {
                    "call_cycle" => "in a call cycle".to_owned(),
                    "key_cycle" => "walking a key cycle".to_owned(),
                    "repeating_keys" => "on the same few keys".to_owned(),
                    _ => format!(
                        "= {} its baseline of {}/s",
                        times(evidence.ratio),
                        thousands(*baseline)
                    ),
                };
                writeln!(
                    self.out,
                    "\n!! LOOP at {at:.1}s  pid {pid}  {}  {}/s {why}",
                    functions.join(" + "),
                    thousands(*rate),
                )?;
                if let Some(cycle) = &evidence.cycle {
                    writeln!(self.out, "   cycle: {} -> {}", cycle.join(" -> "), cycle[0])?;
                }
                if let Some(pids) = &evidence.processes {
                    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
                    writeln!(self.out, "   together in pids {}", pids.join(", "))?;
                }
                if let Some(keys) = &evidence.key_cycle {
                    writeln!(
                        self.out,
                        "   key cycle: {} -> {}",
                        keys.join(" -> "),
                        keys[0]
                    )?;
                }
                if let Some(keys) = &evidence.top_keys {
                    let keys: Vec<String> = keys
                        .iter()
                        .map(|k| format!("{} x{}", k.key, thousands(k.count as f64)))
                        .collect();
                    writeln!(self.out, "   top keys: {}", keys.join(", "))?;
                }
                if let Some(stack) = &evidence.stack {
                    writeln!(self.out, "   hottest path:")?;
                    for frame in stack.iter().take(12) {
                        writeln!(self.out, "      {frame}")?;
                    }
                }
                writeln!(self.out, "   why: {reason}\n")
            }
            Record::Recovered {
                ts,
                pid,
                functions,
                reason,
                ..
            } => {
                let at = self.elapsed(*ts);
                for f in functions {
                    self.looping.remove(&(*pid, f.clone()));
                }
                writeln!(
                    self.out,
                    "\n.. recovered at {at:.1}s  pid {pid}: {reason}\n"
                )
            }
            Record::Health { pid, health, .. } => {
                self.health.push((*pid, *health));
                Ok(())
            }
            // Drops have their own warning; the text report stays quiet
            // about healthy intervals.
            Record::Interval { .. } => Ok(()),
            Record::TargetExit { ts, pid } => {
                let at = self.elapsed(*ts);
                writeln!(self.out, "-- pid {pid} exited at {at:.1}s")
            }
            Record::Picked {
                ts,
                function,
                path,
                reason,
                ..
            } => {
                self.elapsed(*ts);
                let file = crate::symbolize::file_label(std::path::Path::new(path));
                writeln!(self.out, "picked {function} ({file}): {reason}")
            }
            Record::Hook {
                event,
                pid,
                status,
                signal,
                timed_out,
                seconds,
                error,
                ..
            } => {
                let how = match (status, signal, error) {
                    (Some(0), _, _) => "ok".to_owned(),
                    (Some(code), _, _) => format!("exit status {code}"),
                    (None, Some(signal), _) => format!("killed by signal {signal}"),
                    (None, None, Some(error)) => error.clone(),
                    (None, None, None) => "no status".to_owned(),
                };
                let late = if *timed_out { " (timed out)" } else { "" };
                writeln!(
                    self.out,
                    "-- {event} hook for pid {pid}: {how}{late} after {seconds:.1}s"
                )
            }
            Record::Detached {
                functions,
                detach_seconds,
                ..
            } => writeln!(
                self.out,
                "detached {functions} probe(s) in {:.0} ms; the targets run as before",
                detach_seconds * 1000.0
            ),
        }
    }

    fn end_tick(&mut self) -> io::Result<()> {
        if self.rows.is_empty() {
            self.health.clear();
            return self.out.flush();
        }
        if !self.header_done {
            writeln!(
                self.out,
                "\n{:>7}  {:>7}  {:<32} {:>9} {:>10} {:>10}",
                "time", "pid", "function", "calls", "rate/s", "baseline/s"
            )?;
            self.header_done = true;
        }
        // The samples' own time: a replay shows the incident's clock.
        let at = self.elapsed(self.tick_ts);
        self.rows
            .sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        for (rate, pid, function, calls, baseline, estimated) in self.rows.iter().take(TOP) {
            let flag = if self.looping.contains(&(*pid, function.to_string())) {
                "  << LOOP"
            } else {
                ""
            };
            let baseline = baseline.map_or_else(|| "learning".to_owned(), thousands);
            let approx = if *estimated { "~" } else { "" };
            writeln!(
                self.out,
                "{at:>6.1}s  {pid:>7}  {function:<32} {:>9} {:>10} {baseline:>10}{flag}",
                format!("{approx}{calls}"),
                format!("{approx}{}", thousands(*rate)),
            )?;
        }
        if self.rows.len() > TOP {
            writeln!(self.out, "{:>18}(+{} quieter)", "", self.rows.len() - TOP)?;
        }
        for (pid, health) in &self.health {
            let per_request = match (health.invalidations_per_request, health.requests_rate) {
                (Some(ratio), Some(requests)) => format!(
                    ", {} requests/s, {} invalidations per request",
                    thousands(requests),
                    thousands(ratio)
                ),
                _ => String::new(),
            };
            writeln!(
                self.out,
                "{:>18}pid {pid}: {:.0}% CPU, {} resident{per_request}",
                "",
                health.cpu_percent,
                super::bytes(health.rss_bytes)
            )?;
        }
        self.rows.clear();
        self.health.clear();
        self.out.flush()
    }

    fn finish(&mut self, summary: &Summary) -> io::Result<()> {
        writeln!(
            self.out,
            "\nsummary: {:.1} s, {} function(s) in {} process(es)",
            summary.seconds, summary.functions, summary.processes
        )?;
        if summary.loops.is_empty() {
            writeln!(self.out, "  no invalidation loop seen")?;
        }
        for (pid, functions) in &summary.loops {
            writeln!(self.out, "  LOOP in pid {pid}: {}", functions.join(" + "))?;
        }
        for (pid, function, calls, peak) in summary.busiest.iter().take(5) {
            writeln!(
                self.out,
                "  pid {pid} {function}: {calls} calls, peak {}/s",
                thousands(*peak)
            )?;
        }
        if !summary.silent.is_empty() {
            writeln!(
                self.out,
                "  never called: {} (inlined into callers, or not used by this workload)",
                summary.silent.join(", ")
            )?;
        }
        if summary.dropped > 0 {
            writeln!(
                self.out,
                "  {} calls were not counted: the counter map was full",
                summary.dropped
            )?;
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Evidence;

    fn render(records: &[Record], summary: &Summary) -> String {
        let mut sink = TextSink::new(Vec::new());
        for r in records {
            sink.emit(r).unwrap();
        }
        sink.end_tick().unwrap();
        sink.finish(summary).unwrap();
        String::from_utf8(sink.out).unwrap()
    }

    fn sample(function: &str, rate: f64) -> Record {
        Record::Sample {
            ts: 1.0,
            pid: 9,
            ns_pid: None,
            function: function.into(),
            calls: rate as u64,
            rate,
            baseline: Some(100.0),
            estimated: false,
        }
    }

    #[test]
    fn busiest_rows_come_first_and_the_rest_are_counted() {
        let mut records: Vec<Record> = (0..12)
            .map(|i| sample(&format!("f{i}"), f64::from(i)))
            .collect();
        records.push(sample("hot", 5000.0));
        let text = render(&records, &Summary::default());
        let hot = text.find("hot").unwrap();
        let f11 = text.find("f11").unwrap();
        assert!(hot < f11, "{text}");
        assert!(text.contains("(+3 quieter)"), "{text}");
    }

    #[test]
    fn loop_is_called_out_with_its_reason_and_flagged_in_rows() {
        let records = [
            Record::Loop {
                ts: 1.0,
                pid: 9,
                functions: vec!["cache_invalidate".into()],
                rate: 48_000.0,
                baseline: 200.0,
                reason: "because".into(),
                evidence: Box::new(Evidence {
                    key_cycle: Some(vec!["page:catalog".into(), "fragment:nav".into()]),
                    stack: Some(vec![
                        "cache_invalidate (cache)".into(),
                        "main (cache)".into(),
                    ]),
                    ..Evidence::key_cycle_for_tests(240.0, 3.0)
                }),
            },
            sample("cache_invalidate", 48_000.0),
            Record::Health {
                ts: 1.0,
                pid: 9,
                health: crate::report::Health {
                    cpu_percent: 98.6,
                    rss_bytes: 3 << 20,
                    requests_rate: None,
                    invalidations_per_request: None,
                },
            },
        ];
        let summary = Summary {
            loops: vec![(9, vec!["cache_invalidate".into()])],
            silent: vec!["cache_flush".into()],
            ..Summary::default()
        };
        let text = render(&records, &summary);
        assert!(text.contains("!! LOOP"), "{text}");
        assert!(text.contains("48,000/s walking a key cycle"), "{text}");
        assert!(
            text.contains("key cycle: page:catalog -> fragment:nav -> page:catalog"),
            "{text}"
        );
        assert!(text.contains("why: because"), "{text}");
        assert!(
            text.contains("hottest path:\n      cache_invalidate (cache)\n      main (cache)"),
            "{text}"
        );
        assert!(text.contains("<< LOOP"), "{text}");
        assert!(text.contains("pid 9: 99% CPU, 3.0 MiB resident"), "{text}");
        assert!(text.contains("LOOP in pid 9: cache_invalidate"), "{text}");
        assert!(text.contains("never called: cache_flush"), "{text}");
    }
}
