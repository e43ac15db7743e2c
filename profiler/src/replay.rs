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
    recording::{Ending, Reader, Replayed},
    report::{Record, StartSettings},
    watch::{Outcome, stdout_sink},
};

pub fn run(config: ReplayConfig) -> anyhow::Result<Outcome> {
    let mut reader = Reader::open(&config.path)?;
    let header = reader.header.clone();
    let recorded = Rules {
        factor: header.rules.factor,
        min_rate: header.rules.min_rate,
        sustain: header.rules.sustain,
        warmup: header.rules.warmup,
        alpha: header.rules.alpha,
    };
    let rules = config.rules.apply(recorded);
    let mut sink = stdout_sink(config.output);
    let mut enricher = Enricher::replay(
        Arc::new(Catalog::default()),
        rules.clone(),
        config.show_keys,
        header.seed,
    );
    let mut analyzer = Analyzer::new(Settings {
        rules: rules.clone(),
    });
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
    let mut snapshots = 0u64;
    let mut last_ts = header.started;
    let mut result = write(&mut *sink, &[start]);
    while result.is_ok() {
        let Some(item) = reader.next_item() else {
            break;
        };
        let records = match item {
            Replayed::Catalog(catalog) => {
                enricher.set_catalog(catalog);
                continue;
            }
            Replayed::Symbols(facts) => {
                for fact in facts {
                    enricher.add_fact(fact);
                }
                continue;
            }
            Replayed::Lifecycle(Record::Start { .. }) => continue,
            Replayed::Lifecycle(record) => vec![record],
            Replayed::Gap(n) => vec![Record::Warning {
                ts: last_ts,
                pid: None,
                kind: "recording_gap".to_owned(),
                message: format!(
                    "the recorder fell behind and dropped {n} snapshot(s) here; \
                     rates after the gap may read high"
                ),
                count: Some(n),
            }],
            Replayed::Snapshot(catalog, snapshot) => {
                snapshots += 1;
                last_ts = snapshot.ts;
                enricher.set_catalog(catalog.clone());
                enricher.observe(&snapshot);
                let out = analyzer.analyze(&catalog, &snapshot);
                let records = enricher.records(&out);
                if out.loop_found && config.fail_on_loop {
                    outcome = Outcome::LoopFound;
                    result = write(&mut *sink, &records);
                    break;
                }
                records
            }
        };
        result = write(&mut *sink, &records);
    }
    let summary = enricher.summary(&analyzer.summary());
    if result.is_ok() {
        result = sink.finish(&summary).map_err(Some);
    }
    if let Err(Some(e)) = result {
        return Err(anyhow::Error::new(e).context("cannot write the report to stdout"));
    }
    if outcome == Outcome::Finished && reader.ending() == Ending::Truncated {
        eprintln!(
            "cacheloop: {} ends without its closing record (the recorder was stopped mid-write); \
             replayed its {snapshots} whole snapshot(s), up to ts {last_ts:.1}",
            config.path.display()
        );
    }
    Ok(outcome)
}
