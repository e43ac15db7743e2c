//! The `replay` command: runs the analyzer over a recording and prints the
//! records a live run would print. No kernel, no `/proc`, no root.
//!
//! With the recording's own settings, samples, loops and recoveries come
//! out exactly as the live run wrote them (same `ts`, pids, functions,
//! rates); with other settings (`--threshold`, `--factor`, ...), other
//! verdicts. A recording cut short (its recorder killed) is replayed up to
//! its last whole snapshot, and stderr says so.

use std::sync::Arc;

use crate::{
    analyze::{Analyzer, Settings},
    catalog::Catalog,
    config::ReplayConfig,
    detect::Rules,
    enrich::Enricher,
    pipeline::write_now,
    recording::{Ending, Header, Reader, Replayed},
    report::{Record, StartSettings},
    watch::{Outcome, stdout_sink},
};

/// The analyzer and enricher over a recording's items.
pub struct Replayer {
    analyzer: Analyzer,
    enricher: Enricher,
    /// Unix time of the last snapshot replayed.
    pub last_ts: f64,
    pub snapshots: u64,
}

impl Replayer {
    /// With `rules` (the recording's, or others) and the recording's seed.
    pub fn new(rules: &Rules, show_keys: bool, header: &Header) -> Self {
        Self {
            analyzer: Analyzer::new(Settings {
                rules: rules.clone(),
            }),
            enricher: Enricher::replay(
                Arc::new(Catalog::default()),
                rules.clone(),
                show_keys,
                header.seed,
            ),
            last_ts: header.started,
            snapshots: 0,
        }
    }

    /// The records of one item, and whether it confirmed a loop.
    pub fn step(&mut self, item: Replayed) -> (Vec<Record>, bool) {
        let records = match item {
            Replayed::Catalog(catalog) => {
                self.enricher.set_catalog(catalog);
                Vec::new()
            }
            Replayed::Symbols(facts) => {
                for fact in facts {
                    self.enricher.add_fact(fact);
                }
                Vec::new()
            }
            // Replay says what it runs with in its own start record.
            Replayed::Lifecycle(Record::Start { .. }) => Vec::new(),
            Replayed::Lifecycle(record) => vec![record],
            Replayed::Gap(n) => vec![Record::Warning {
                ts: self.last_ts,
                pid: None,
                kind: "recording_gap".to_owned(),
                message: format!(
                    "the recorder fell behind and dropped {n} snapshot(s) here; \
                     rates after the gap may read high"
                ),
                count: Some(n),
            }],
            Replayed::Snapshot(catalog, snapshot) => {
                self.snapshots += 1;
                self.last_ts = snapshot.ts;
                self.enricher.set_catalog(catalog.clone());
                self.enricher.observe(&snapshot);
                let out = self.analyzer.analyze(&catalog, &snapshot);
                return (self.enricher.records(&out), out.loop_found);
            }
        };
        (records, false)
    }

    pub fn summary(&self) -> crate::report::Summary {
        self.enricher.summary(&self.analyzer.summary())
    }
}

/// The detector rules a recording was made with.
pub fn recorded_rules(header: &Header) -> Rules {
    Rules {
        factor: header.rules.factor,
        min_rate: header.rules.min_rate,
        sustain: header.rules.sustain,
        warmup: header.rules.warmup,
        alpha: header.rules.alpha,
    }
}

pub fn run(config: ReplayConfig) -> anyhow::Result<Outcome> {
    let mut reader = Reader::open(&config.path)?;
    let header = reader.header.clone();
    let rules = config.rules.apply(recorded_rules(&header));
    let mut sink = stdout_sink(config.output);
    // Keys shown as the live run showed them, or as they are if asked.
    let show_keys = config.show_keys || header.show_keys;
    let mut replayer = Replayer::new(&rules, show_keys, &header);
    let start = Record::Start {
        ts: header.started,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        kernel: header.kernel.clone(),
        mode: header.mode.clone(),
        settings: StartSettings::new(&rules, header.interval_seconds, header.max_overhead_percent),
        recording: Some(config.path.display().to_string()),
    };
    let write = |sink: &mut dyn crate::report::Sink, records: &[Record]| {
        write_now(sink, records).map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => None,
            _ => Some(e),
        })
    };
    let mut outcome = Outcome::Finished;
    let mut result = write(&mut *sink, &[start]);
    while result.is_ok() {
        let Some(item) = reader.next_item() else {
            break;
        };
        let (records, loop_found) = replayer.step(item);
        if !records.is_empty() {
            result = write(&mut *sink, &records);
        }
        if loop_found && config.fail_on_loop {
            outcome = Outcome::LoopFound;
            break;
        }
    }
    // Stopped early (a loop with --fail-on-loop, a closed pipe): whether
    // the file goes on is not known, and not worth a word.
    let read_all = result.is_ok() && outcome == Outcome::Finished;
    if result.is_ok() {
        result = sink.finish(&replayer.summary()).map_err(Some);
    }
    if let Err(Some(e)) = result {
        return Err(anyhow::Error::new(e).context("cannot write the report to stdout"));
    }
    if read_all && reader.ending() == Ending::Truncated {
        eprintln!(
            "cacheloop: {} ends without its closing record (the recorder was stopped mid-write); \
             replayed its {} whole snapshot(s), up to ts {:.1}",
            config.path.display(),
            replayer.snapshots,
            replayer.last_ts
        );
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    //! The committed recordings (tests/recordings, made from live runs by
    //! its make.sh): replayed, they give the verdicts the live runs gave,
    //! and other settings give others.

    use std::path::PathBuf;

    use super::*;

    fn corpus(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/recordings")
            .join(name)
    }

    /// Every record of a replay, with `rules` (None: the recording's).
    fn replay(name: &str, rules: Option<crate::config::RuleOverrides>) -> Vec<Record> {
        let mut reader = Reader::open(&corpus(name)).unwrap();
        let rules = rules
            .unwrap_or_default()
            .apply(recorded_rules(&reader.header));
        let mut replayer = Replayer::new(&rules, false, &reader.header.clone());
        let mut records = Vec::new();
        while let Some(item) = reader.next_item() {
            records.extend(replayer.step(item).0);
        }
        assert_eq!(reader.ending(), Ending::Whole, "{name}");
        records
    }

    fn loops(records: &[Record]) -> Vec<&Record> {
        records
            .iter()
            .filter(|r| matches!(r, Record::Loop { .. }))
            .collect()
    }

    #[test]
    fn healthy_bursts_replay_quiet() {
        let records = replay("burst.rec", None);
        assert!(loops(&records).is_empty(), "{records:?}");
        let peak = records
            .iter()
            .filter_map(|r| match r {
                Record::Sample { rate, .. } => Some(*rate),
                _ => None,
            })
            .fold(0.0, f64::max);
        assert!(peak > 800.0, "the bursts are in it: peak {peak}");
    }

    #[test]
    fn call_cycle_replays_to_its_loop_and_recovery() {
        let records = replay("call-cycle.rec", None);
        let found = loops(&records);
        assert_eq!(found.len(), 1, "{found:?}");
        let Record::Loop { evidence, .. } = found[0] else {
            unreachable!()
        };
        assert_eq!(evidence.rule.name, "call_cycle");
        assert_eq!(
            evidence.cycle.as_deref(),
            Some(&["invalidate_a".to_owned(), "invalidate_b".to_owned()][..])
        );
        let stack = evidence.stack.as_ref().expect("a stack");
        assert!(stack[0].starts_with("invalidate_"), "{stack:?}");
        assert!(
            records
                .iter()
                .any(|r| matches!(r, Record::Recovered { .. })),
            "and its recovery"
        );
        // The cycle needs --threshold calls/s: raise it past the loop's
        // rate and the verdict goes.
        let strict = crate::config::RuleOverrides {
            min_rate: Some(1e6),
            ..Default::default()
        };
        assert!(loops(&replay("call-cycle.rec", Some(strict))).is_empty());
    }

    #[test]
    fn demo_loop_replays_to_its_keys() {
        let records = replay("demo-loop.rec", None);
        let found = loops(&records);
        assert_eq!(found.len(), 1, "{found:?}");
        let Record::Loop {
            functions,
            evidence,
            ..
        } = found[0]
        else {
            unreachable!()
        };
        assert_eq!(functions, &["cache_invalidate"]);
        let keys = evidence.top_keys.as_ref().expect("top keys");
        assert_eq!(keys.len(), 2, "page:catalog and fragment:nav: {keys:?}");
        assert!(keys.iter().all(|k| k.key.starts_with("key#")), "{keys:?}");
        // A longer sustain confirms it later; a far longer one not at all
        // within the recording.
        let patient = crate::config::RuleOverrides {
            sustain: Some(30),
            ..Default::default()
        };
        assert!(loops(&replay("demo-loop.rec", Some(patient))).is_empty());
    }
}
