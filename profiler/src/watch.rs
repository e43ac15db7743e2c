//! The `watch` command, end to end. Glue only, in the order data flows:
//!
//! controller (attach, collect a snapshot each tick) -> analyzer (events,
//! on this thread: it is pure and quick) -> pipeline (enricher and sinks on
//! their own threads) ; the controller then follows processes and plans the
//! next probe window.

use std::{
    io,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Instant,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval_at},
};

use crate::{
    analyze::{Analyzer, Settings},
    catalog::Catalog,
    config::{Output, WatchConfig},
    control::{Controller, Wake},
    enrich::{Enricher, random_seed},
    exporter,
    pipeline::{Pipeline, RecordTo, flush_stdout},
    recording::{Header, Writer},
    report::{
        Record, Sink, StartSettings, json::JsonSink, metrics::Metrics, text::TextSink, unix_now,
    },
    snapshot::Glance,
    target,
};

pub use crate::control::RunError;

/// How a run ended, when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Ran to its end (duration, signal, targets gone); loops may have been
    /// reported.
    Finished,
    /// Stopped at a loop because of `--fail-on-loop`.
    LoopFound,
    /// `cacheloop run`: the command's own exit status, passed on.
    Command(u8),
}

/// Why the sampling loop stopped.
enum Stop {
    Done,
    Loop,
    /// The reader of stdout went away: not an error, but stop writing.
    BrokenPipe,
}

pub fn run(config: WatchConfig) -> anyhow::Result<Outcome> {
    run_then(config, || Ok(()))
}

/// [`run`], calling `attached` once every probe is in and before the
/// sampling starts (`cacheloop run` lets its command go then).
pub fn run_then(
    config: WatchConfig,
    attached_hook: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    // A recording that cannot be written is refused before anything is
    // attached.
    let writer = config.record.as_deref().map(Writer::create).transpose()?;
    // So is a port the exporter cannot have.
    let listener = config.prometheus.map(exporter::bind).transpose()?;
    let (controller, attached) = Controller::start(&config, started)?;
    attached_hook()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .enable_io()
        .build()
        .context("cannot start the runtime")?;
    let metrics = match listener {
        Some(listener) => {
            let metrics = Arc::new(Mutex::new(Metrics::new(config.max_overhead)));
            exporter::serve(listener, metrics.clone())
                .context("cannot start the Prometheus exporter")?;
            Some(metrics)
        }
        None => None,
    };
    runtime.block_on(watch(config, controller, attached, writer, metrics))
}

/// The sink for stdout, made on its own thread.
pub fn stdout_sink(output: Output) -> Box<dyn Sink> {
    match output {
        Output::Json => Box::new(JsonSink::new(io::BufWriter::new(io::stdout()))),
        Output::Text => Box::new(TextSink::new(io::LineWriter::new(io::stdout()))),
    }
}

async fn watch(
    config: WatchConfig,
    mut controller: Controller,
    attached: Vec<Record>,
    writer: Option<Writer>,
    metrics: Option<Arc<Mutex<Metrics>>>,
) -> anyhow::Result<Outcome> {
    // Handlers first: a Ctrl-C from here on must still end in a detach.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;

    let mut catalog = controller.catalog();
    let seed = random_seed();
    let kernel = target::kernel_release();
    let mode = controller.mode().as_str();
    let read_every = read_period(config.interval);
    let settings = StartSettings::new(
        &config.rules,
        config.interval.as_secs_f64(),
        read_every.as_secs_f64(),
        config.max_overhead * 100.0,
    );
    let start = Record::Start {
        ts: unix_now(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        kernel: kernel.clone(),
        mode: mode.to_owned(),
        settings: Box::new(settings),
        recording: None,
    };
    let record = match (writer, &config.record) {
        (Some(writer), Some(path)) => Some(RecordTo {
            path: path.clone(),
            writer,
            header: Header {
                cacheloop: env!("CARGO_PKG_VERSION").to_owned(),
                kernel,
                mode: mode.to_owned(),
                started: unix_now() - controller.started().elapsed().as_secs_f64(),
                interval_seconds: config.interval.as_secs_f64(),
                read_seconds: read_every.as_secs_f64(),
                max_overhead_percent: config.max_overhead * 100.0,
                rules: config.rules.clone(),
                seed,
                show_keys: config.show_keys,
                command: std::env::args().collect(),
            },
        }),
        _ => None,
    };
    let enricher = Enricher::live(
        catalog.clone(),
        config.rules.clone(),
        config.show_keys,
        seed,
        record.is_some(),
    );
    let output = config.output;
    let mut pipeline = Pipeline::start(
        enricher,
        move || stdout_sink(output),
        record,
        metrics,
        config.hooks.clone(),
    )
    .context("cannot start cacheloop's output threads")?;
    pipeline.catalog(catalog.clone());
    pipeline.lifecycle(std::iter::once(start).chain(attached));

    let mut analyzer = Analyzer::new(Settings {
        rules: config.rules.clone(),
    });
    let deadline = config.duration.map(|d| tokio::time::Instant::now() + d);
    // Read every `read_every`, report every interval: a loop is judged
    // within a fraction of a second, the output keeps its cadence.
    let mut ticks = interval_at(tokio::time::Instant::now() + read_every, read_every);
    let mut next_report = tokio::time::Instant::now() + config.interval;
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut recording_warned = false;
    let mut stop = Stop::Done;
    let mut failure: Option<anyhow::Error> = None;
    while matches!(stop, Stop::Done) {
        let until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        // While the governor windows the probes, the controller says when
        // to read (at the interval's end, once its window had its share)
        // and when the probes go in or out; otherwise the tick does.
        let due = deadline.map_or(next_report, |d| d.min(next_report));
        let wake = controller.next_wake(due.into_std());
        let until_wake = async {
            match wake {
                Some((at, _)) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let windowed = wake.is_some();
        let last = tokio::select! {
            _ = ticks.tick(), if !windowed => false,
            _ = sigint.recv() => match config.command {
                // `cacheloop run`: the command's to handle; the run ends
                // when it exits.
                Some(pid) => { forward(pid, libc::SIGINT); continue; }
                None => break,
            },
            _ = sigterm.recv() => match config.command {
                Some(pid) => { forward(pid, libc::SIGTERM); continue; }
                None => break,
            },
            // The last, partial interval still counts.
            () = until_deadline, if !windowed => true,
            () = until_wake => {
                if let Some((_, Wake::Window)) = wake {
                    match controller.change_window() {
                        Ok(records) => pipeline.lifecycle(records),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                    continue;
                }
                false
            }
        };
        let now = tokio::time::Instant::now();
        if windowed {
            // Back on the tick from here, should the governor put the
            // probes in throughout.
            ticks.reset();
        }
        let report = last || now + read_every / 2 >= next_report;
        // Between reports, a reading whose glance shows nothing that could
        // move a verdict is let go, the next covering its time: most of the
        // loader's work is the reading, four times a second otherwise.
        // Not while recording: a replay under other rules must have every
        // reading to judge.
        let quiet = |glance: &Glance| analyzer.quiet(glance);
        let may_skip = !(report
            || windowed
            || deadline.is_some_and(|d| d <= now + read_every)
            || config.record.is_some()
            || analyzer.holds());
        let quiet: Option<&dyn Fn(&Glance) -> bool> = may_skip.then_some(&quiet);
        let mut snapshot = match controller.collect(quiet) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                failure = Some(e.into());
                break;
            }
        };
        let read = tokio::time::Instant::now();
        // A reading at, past or just short of the deadline (a windowed one
        // waits for its share; a slow one may end there) is the last: the
        // run ends up to half a reading early rather than with a last
        // reading of next to nothing.
        let last = last || deadline.is_some_and(|d| d <= read + read_every / 2);
        let report = report || last;
        snapshot.report = report;
        if report {
            // The next interval ends at least half a reading after this
            // one was read (a reading late or slow enough merges it with
            // the next): never a report of a few ms, and the governor can
            // plan a share of it.
            while next_report <= read + read_every / 2 {
                next_report += config.interval;
            }
        }
        let out = analyzer.analyze(&catalog, &snapshot);
        let stop_at_loop = out.loop_found && config.fail_on_loop;
        let follow = !(stop_at_loop || last);
        let hit_rate = out.hit_rate;
        let exited: Vec<u32> = snapshot
            .processes
            .iter()
            .filter(|p| !p.alive)
            .map(|p| p.pid)
            .collect();
        // Output first: following new processes may take a moment.
        pipeline.tick(snapshot, out);
        // When the next interval's reading is due.
        let due = deadline.map_or(next_report, |d| d.min(next_report));
        let records =
            controller.after_tick(&exited, hit_rate, due.into_std(), last, follow, report);
        match records {
            Ok(records) => pipeline.lifecycle(records),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        if !Arc::ptr_eq(&catalog, &controller.catalog()) {
            catalog = controller.catalog();
            pipeline.catalog(catalog.clone());
        }
        if !recording_warned && let Some(message) = take(&pipeline.status.recording_error) {
            recording_warned = true;
            pipeline.lifecycle([Record::Warning {
                ts: unix_now(),
                pid: None,
                kind: "recording_failed".to_owned(),
                message: format!("{message}; watching goes on without it"),
                count: None,
            }]);
        }
        if pipeline.status.closed.load(Ordering::Relaxed) {
            stop = Stop::BrokenPipe;
        } else if let Some(message) = take(&pipeline.status.error) {
            failure = Some(anyhow::anyhow!(message));
            break;
        } else if stop_at_loop {
            stop = Stop::Loop;
        } else if last || controller.all_gone() || controller.command_lost() {
            break;
        }
    }
    // However the run ended (the deadline, nothing left to watch, a
    // signal): a target that still runs unwatched makes it a failure.
    if failure.is_none() && matches!(stop, Stop::Done) {
        failure = controller.lost().map(anyhow::Error::from);
    }

    // `cacheloop run --fail-on-loop`: the command stops here, and the
    // record says so, before the end of the output and the recording.
    if let (Stop::Loop, Some(pid)) = (&stop, config.command) {
        let how = crate::gate::stop(pid, config.command_grace);
        pipeline.lifecycle([Record::Warning {
            ts: unix_now(),
            pid: Some(pid),
            kind: "command_stopped".to_owned(),
            message: format!("a loop was confirmed: stopped the command (pid {pid}): {how}"),
            count: None,
        }]);
        eprintln!(
            "cacheloop: a loop was confirmed: stopped the command (pid {pid}): {how}; exit 3"
        );
    }
    let (functions, detach) = controller.finish();
    let summary = analyzer.summary();
    let detached = Record::Detached {
        ts: unix_now(),
        functions,
        detach_seconds: detach.as_secs_f64(),
        never_called: names(&catalog, &summary.silent),
    };
    let status = pipeline.status.clone();
    pipeline.finish(detached, summary);
    flush_stdout();
    if let Some(failure) = failure {
        return Err(failure);
    }
    if let Some(message) = take(&status.error) {
        return Err(anyhow::anyhow!(message));
    }
    if let Some(message) = take(&status.recording_error) {
        log::warn!("{message}");
    }
    Ok(match stop {
        Stop::Loop => Outcome::LoopFound,
        Stop::Done | Stop::BrokenPipe => Outcome::Finished,
    })
}

/// How often the counters are read: four times a second, or every
/// interval when that is shorter. The structural rules confirm within
/// half a second of evidence; reading once a second would add up to a
/// second before that.
pub fn read_period(interval: std::time::Duration) -> std::time::Duration {
    interval.min(std::time::Duration::from_millis(250))
}

/// Passes a signal on to `cacheloop run`'s command and its process group.
fn forward(pid: u32, signal: i32) {
    // SAFETY: kill(2) on the group our own child leads, not yet reaped (the
    // gate reaps it after the run).
    unsafe { libc::kill(-(pid as i32), signal) };
}

fn take(slot: &std::sync::Mutex<Option<String>>) -> Option<String> {
    slot.lock().ok()?.take()
}

fn names(catalog: &Catalog, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&f| catalog.name(f)).collect()
}
