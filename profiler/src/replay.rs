//! The `replay` command: runs the analyzer over a recording and prints the
//! records a live run would print. No kernel, no `/proc`, no root. And the
//! `report` command: the same records, rendered as an incident report.
//!
//! With the recording's own settings, samples, loops and recoveries come
//! out exactly as the live run wrote them (same `ts`, pids, functions,
//! rates); with other settings (`--threshold`, `--factor`, ...), other
//! verdicts. A recording cut short (its recorder killed) is replayed up to
//! its last whole snapshot, and stderr says so.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;

use crate::{
    analyze::{Analyzer, Settings},
    catalog::Catalog,
    cli::ReportFormat,
    config::ReplayConfig,
    detect::Rules,
    enrich::Enricher,
    pipeline::write_now,
    recording::{Ending, Header, Reader, Replayed},
    report::{Record, StartSettings, incident::Incident},
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
    header.rules.clone()
}

/// The `start` record of a replay of `path` with `rules`.
fn start_record(header: &Header, rules: &Rules, path: &Path) -> Record {
    Record::Start {
        ts: header.started,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        kernel: header.kernel.clone(),
        mode: header.mode.clone(),
        settings: Box::new(StartSettings::new(
            rules,
            header.interval_seconds,
            header.read_seconds,
            header.max_overhead_percent,
        )),
        recording: Some(path.display().to_string()),
    }
}

/// The `report` command: the records a replay of the recording with its
/// own settings writes, rendered as one HTML page or as Markdown.
pub fn report(file: &Path, output: Option<&Path>, format: ReportFormat) -> anyhow::Result<()> {
    let mut reader = Reader::open(file)?;
    let header = reader.header.clone();
    let rules = recorded_rules(&header);
    let mut replayer = Replayer::new(&rules, header.show_keys, &header);
    let mut records = vec![start_record(&header, &rules, file)];
    while let Some(item) = reader.next_item() {
        records.extend(replayer.step(item).0);
    }
    if reader.ending() == Ending::Truncated {
        eprintln!(
            "cacheloop: {} ends without its closing record (the recorder was stopped mid-write); \
             the report covers its {} whole snapshot(s)",
            file.display(),
            replayer.snapshots
        );
    }
    let name = file.file_name().map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let incident = Incident::from_records(&name, &records);
    let text = match format {
        ReportFormat::Html => incident.html(),
        ReportFormat::Md => incident.markdown(),
    };
    match output {
        Some(path) => std::fs::write(path, text)
            .with_context(|| format!("cannot write the report to {}", path.display())),
        None => {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .context("cannot write the report to stdout")
        }
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
    let start = start_record(&header, &rules, &config.path);
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
        replay_with(name, rules, false)
    }

    /// The same, keys shown as they are.
    fn replay_showing(name: &str, rules: Option<crate::config::RuleOverrides>) -> Vec<Record> {
        replay_with(name, rules, true)
    }

    fn replay_with(
        name: &str,
        rules: Option<crate::config::RuleOverrides>,
        show_keys: bool,
    ) -> Vec<Record> {
        let mut reader = Reader::open(&corpus(name)).unwrap();
        let rules = rules
            .unwrap_or_default()
            .apply(recorded_rules(&reader.header));
        let mut replayer = Replayer::new(&rules, show_keys, &reader.header.clone());
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

    /// One case of the verdict corpus, a line of `corpus.tsv`.
    struct Case {
        file: String,
        expect_loop: bool,
        /// When the loop began (Unix seconds); 0: before cacheloop attached.
        start: Option<f64>,
        min_loops: usize,
        what: String,
    }

    fn cases() -> Vec<Case> {
        let text = std::fs::read_to_string(corpus("corpus.tsv")).unwrap();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                assert_eq!(f.len(), 5, "corpus.tsv: {line}");
                Case {
                    file: f[0].to_owned(),
                    expect_loop: f[1] == "loop",
                    start: f[2].parse().ok(),
                    min_loops: f[3].parse().unwrap(),
                    what: f[4].to_owned(),
                }
            })
            .collect()
    }

    /// The verdicts table of VERDICTS.md: each case replayed with the
    /// recording's settings.
    fn verdict_table() -> (String, Vec<String>) {
        let mut table = String::from(
            "| case | what | peak | expected | verdict | cause | after the loop began | evidence |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        let mut wrong = Vec::new();
        let mut cases = cases();
        // Healthy cases first, then loops; by name within each.
        cases.sort_by(|a, b| (a.expect_loop, &a.file).cmp(&(b.expect_loop, &b.file)));
        for case in cases {
            let started = Reader::open(&corpus(&case.file)).unwrap().header.started;
            let records = replay_showing(&case.file, None);
            let found: Vec<&Record> = loops(&records);
            let first = found.first().map(|r| match r {
                Record::Loop { ts, evidence, .. } => (*ts, evidence),
                _ => unreachable!(),
            });
            let start = case.start.map(|s| if s == 0.0 { started } else { s });
            let early = matches!((first, start), (Some((ts, _)), Some(s)) if ts < s);
            let right = if case.expect_loop {
                found.len() >= case.min_loops && !early
            } else {
                found.is_empty()
            };
            if !right {
                wrong.push(format!("{}: {} loop(s) {found:?}", case.file, found.len()));
            }
            let verdict = match (found.len(), right) {
                (0, true) => "quiet".to_owned(),
                (0, false) => "**missed**".to_owned(),
                (n, true) => format!("loop x{n}"),
                (n, false) if !case.expect_loop => format!("**false alarm** x{n}"),
                (n, false) => format!("**wrong** x{n}"),
            };
            let (cause, latency, evidence) = match first {
                Some((ts, e)) => (
                    e.cause.clone(),
                    start.map_or("-".to_owned(), |s| format!("{:.2} s", ts - s)),
                    match (e.cause.as_str(), &e.cycle, &e.key_cycle) {
                        ("call_cycle", Some(c), _) => {
                            format!("call cycle {} -> {}", c.join(" -> "), c[0])
                        }
                        ("key_cycle", _, Some(k)) => {
                            format!("key cycle {} -> {}", k.join(" -> "), k[0])
                        }
                        _ => format!("signals: {}", e.signals.join(", ")),
                    },
                ),
                None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
            };
            // How hard the case is: the highest rate over its learned
            // baseline, and the most CPU, any interval reached.
            let (mut ratio, mut cpu) = (0.0f64, 0.0f64);
            for r in &records {
                match r {
                    Record::Sample {
                        rate,
                        baseline: Some(b),
                        ..
                    } => ratio = ratio.max(rate / b.max(crate::detect::BASELINE_FLOOR)),
                    Record::Health { health, .. } => cpu = cpu.max(health.cpu_percent),
                    _ => {}
                }
            }
            table.push_str(&format!(
                "| `{}` | {} | x{ratio:.0}, {cpu:.0}% CPU | {} | {verdict} | {cause} | {latency} | {evidence} |\n",
                case.file,
                case.what,
                if case.expect_loop { "loop" } else { "healthy" },
            ));
        }
        (table, wrong)
    }

    /// Every healthy case quiet, every loop caught (never before it began),
    /// and VERDICTS.md showing exactly that: `cargo xtask verdicts` writes
    /// it anew.
    #[test]
    fn the_verdict_corpus_has_no_false_alarm_and_no_missed_loop() {
        let (table, wrong) = verdict_table();
        let path = corpus("../../VERDICTS.md");
        let doc = std::fs::read_to_string(&path).unwrap_or_default();
        let (head, tail) = match (doc.find(TABLE_START), doc.find(TABLE_END)) {
            (Some(a), Some(b)) if a < b => (&doc[..a], &doc[b + TABLE_END.len()..]),
            _ => ("", ""),
        };
        let fresh = format!("{head}{TABLE_START}\n{table}{TABLE_END}{tail}");
        if std::env::var_os("CACHELOOP_WRITE_VERDICTS").is_some() {
            std::fs::write(&path, &fresh).unwrap();
        } else {
            assert!(
                doc == fresh,
                "VERDICTS.md is not this build's table: run `cargo xtask verdicts`\n{table}"
            );
        }
        assert!(wrong.is_empty(), "{wrong:#?}\n{table}");
    }

    const TABLE_START: &str = "<!-- verdicts: made by `cargo xtask verdicts` -->";
    const TABLE_END: &str = "<!-- end of verdicts -->";

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
        // The cycle needs --threshold calls/s or a burning core: raise both
        // past the loop's and the verdict goes.
        let strict = crate::config::RuleOverrides {
            min_rate: Some(1e6),
            cpu_cores: Some(64.0),
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
        // Hashed as the live run hashed them (it had no --show-keys)...
        assert!(keys.iter().all(|k| k.key.starts_with("key#")), "{keys:?}");
        // ...and in clear when asked: the cycle in the order it loops.
        let shown = replay_showing("demo-loop.rec", None);
        let Record::Loop { evidence, .. } = loops(&shown)[0] else {
            unreachable!()
        };
        assert_eq!(
            evidence.key_cycle.as_deref(),
            Some(&["page:catalog".to_owned(), "fragment:nav".to_owned()][..])
        );
        // Longer sustains confirm it later; far longer ones not at all
        // within the recording.
        let patient = crate::config::RuleOverrides {
            sustain: Some(30.0),
            structural_sustain: Some(30.0),
            ..Default::default()
        };
        assert!(loops(&replay("demo-loop.rec", Some(patient))).is_empty());
    }
}
