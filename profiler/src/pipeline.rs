//! Off the control path: the enricher and the sinks, each on its own
//! thread, fed through queues.
//!
//! The control thread hands each tick's snapshot and events to the
//! enricher thread and goes back to the kernel; the enricher names things
//! and passes records to the output sink (text or JSON lines) and, with
//! `--record`, snapshots and facts to the recorder, each a thread of its
//! own. Nothing the sinks do (a paused terminal, a slow pipe, a slow disk)
//! can hold the probes in past the overhead budget.
//!
//! Falling behind: each queue holds at most [`BACKLOG`] ticks (a bound on
//! memory, not only on delay). When a stage is that far behind, further
//! ticks are dropped for it and counted, and when it catches up it says so
//! first: a `warning` record (`output_behind`) on the output, a gap item in
//! the recording. What a dropped snapshot carried that is sent only once
//! (key texts, stack frames) and its seconds are folded into the next one
//! that gets through, so rates after a gap stay rates and names stay known.
//! Verdicts are made on the control thread and never depend on a sink.
//! Records that are not per-tick (attached, warnings, the end) are never
//! dropped.

use std::{
    io::{self, Write},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc::{self, Receiver, Sender},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    analyze::{self, Output},
    catalog::Catalog,
    enrich::{Enricher, SymbolFact},
    hooks::{HookConfig, Hooks},
    recording::{Header, Item, Writer},
    report::{Record, Sink, Summary, metrics::Metrics, unix_now},
    snapshot::Snapshot,
};

/// Ticks a queue holds before it drops.
pub const BACKLOG: usize = 32;
/// How long the end waits for the sinks to write it (stdout may be
/// blocked for good; the probes are out by then).
const FINISH_WAIT: Duration = Duration::from_secs(10);

/// What the control thread sends.
pub enum Msg {
    Catalog(Arc<Catalog>),
    /// A record of the controller's: attached, governor, warning.
    Lifecycle(Record),
    Tick {
        snapshot: Arc<Snapshot>,
        output: Output,
        /// Ticks dropped just before this one.
        dropped: u64,
    },
    End {
        detached: Record,
        summary: analyze::Summary,
        /// Ticks dropped since the last one that got through.
        dropped: u64,
    },
}

/// A queue that counts what it holds, so that per-tick messages can be
/// dropped when the reader is far behind.
struct Queue<T> {
    tx: Sender<T>,
    depth: Arc<AtomicUsize>,
    /// Ticks dropped since the last one that got through.
    dropped: u64,
}

struct QueueRx<T> {
    rx: Receiver<T>,
    depth: Arc<AtomicUsize>,
}

fn queue<T>() -> (Queue<T>, QueueRx<T>) {
    let (tx, rx) = mpsc::channel();
    let depth = Arc::new(AtomicUsize::new(0));
    (
        Queue {
            tx,
            depth: depth.clone(),
            dropped: 0,
        },
        QueueRx { rx, depth },
    )
}

impl<T> Queue<T> {
    /// Always queued.
    fn send(&self, msg: T) {
        self.depth.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(msg).is_err() {
            self.depth.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Queued unless the reader is [`BACKLOG`] behind (and it is not news
    /// that must go out); `make` gets how many ticks were dropped before
    /// this one: here, and the `carried` ones dropped upstream of it.
    fn send_tick(&mut self, carried: u64, news: bool, make: impl FnOnce(u64) -> T) {
        self.dropped += carried;
        if self.full() && !news {
            self.dropped += 1;
            return;
        }
        let dropped = std::mem::take(&mut self.dropped);
        self.send(make(dropped));
    }

    /// Another sender into the same queue (its drops counted apart).
    fn sender(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            depth: self.depth.clone(),
            dropped: 0,
        }
    }

    fn full(&self) -> bool {
        self.depth.load(Ordering::Relaxed) >= BACKLOG
    }
}

impl<T> QueueRx<T> {
    fn recv(&self) -> Option<T> {
        let msg = self.rx.recv().ok()?;
        self.depth.fetch_sub(1, Ordering::Relaxed);
        Some(msg)
    }
}

/// What dropped snapshots leave to the next one that gets through.
#[derive(Default)]
struct Fold {
    count: u64,
    seconds: f64,
    /// Probed seconds of the dropped snapshots.
    probed: f64,
    /// One of them closed a reporting interval.
    report: bool,
    /// Processes a dropped snapshot saw for the last time.
    exited: Vec<crate::snapshot::ProcessFacts>,
    key_texts: Vec<crate::snapshot::KeyText>,
    new_stacks: Vec<crate::snapshot::NewStack>,
}

impl Fold {
    /// Drops `snapshot`, which stands for `carried` dropped before it too.
    fn drop_one(&mut self, snapshot: &Snapshot, carried: u64) {
        self.count += 1 + carried;
        self.seconds += snapshot.seconds;
        self.probed += snapshot.seconds * snapshot.probed;
        self.report |= snapshot.report;
        self.exited
            .extend(snapshot.processes.iter().filter(|p| !p.alive).cloned());
        self.key_texts.extend(snapshot.key_texts.iter().cloned());
        self.new_stacks.extend(snapshot.new_stacks.iter().cloned());
    }

    /// `snapshot` with what was dropped before it (its time, probe share,
    /// interval end and exits, so a replay reports what the live run did);
    /// the count dropped.
    fn into_next(self, snapshot: Arc<Snapshot>) -> (Arc<Snapshot>, u64) {
        if self.count == 0 {
            return (snapshot, 0);
        }
        let mut merged = (*snapshot).clone();
        let seconds = merged.seconds + self.seconds;
        merged.probed = (merged.probed * merged.seconds + self.probed) / seconds.max(1e-9);
        merged.seconds = seconds;
        merged.report |= self.report;
        for gone in self.exited {
            if !merged.processes.iter().any(|p| p.pid == gone.pid) {
                merged.processes.push(gone);
            }
        }
        merged.key_texts.splice(0..0, self.key_texts);
        merged.new_stacks.splice(0..0, self.new_stacks);
        (Arc::new(merged), self.count)
    }
}

/// What the output sink tells the control thread.
#[derive(Default)]
pub struct SinkStatus {
    /// The reader of stdout went away: not an error, but stop writing.
    pub closed: AtomicBool,
    /// A write failed otherwise.
    pub error: Mutex<Option<String>>,
    /// The recorder failed; the run goes on without it.
    pub recording_error: Mutex<Option<String>>,
}

enum SinkMsg {
    Batch { records: Vec<Record>, dropped: u64 },
    Finish(Box<Summary>),
}

/// What the metrics sink (`--prometheus`) is sent: records, the processes
/// a tick watched (pid, name; `None` for records not of a tick), and ticks
/// the enricher dropped before them. Never dropped itself: the metrics
/// thread only waits for a scrape's encoding, and a counter must not miss
/// an interval's calls.
struct MetricsMsg {
    records: Vec<Record>,
    processes: Option<Vec<(u32, String)>>,
    dropped: u64,
}

enum RecMsg {
    Item(Box<Item>),
    Snapshot {
        snapshot: Arc<Snapshot>,
        dropped: u64,
    },
}

/// The running enricher and sinks.
pub struct Pipeline {
    queue: Queue<Msg>,
    fold: Fold,
    thread: Option<JoinHandle<()>>,
    /// Says when the enricher thread (and the sinks it waits for) ended.
    done: Receiver<()>,
    pub status: Arc<SinkStatus>,
    /// How long the end may take: [`FINISH_WAIT`], and the hooks still due.
    finish_wait: Duration,
}

/// What the recorder needs to start.
pub struct RecordTo {
    pub path: PathBuf,
    pub writer: Writer,
    pub header: Header,
}

impl Pipeline {
    /// Starts the threads. `make_sink` builds the output sink on its own
    /// thread (stdout's lock stays there).
    pub fn start(
        mut enricher: Enricher,
        make_sink: impl FnOnce() -> Box<dyn Sink> + Send + 'static,
        record: Option<RecordTo>,
        metrics: Option<Arc<Mutex<Metrics>>>,
        hooks: HookConfig,
    ) -> io::Result<Self> {
        let status = Arc::new(SinkStatus::default());
        let (to_enricher, rx) = queue::<Msg>();
        let (mut out, out_rx) = queue::<SinkMsg>();
        let out_status = status.clone();
        let out_thread = std::thread::Builder::new()
            .name("cacheloop-out".into())
            .spawn(move || run_sink(make_sink(), out_rx, &out_status))?;
        let (mut rec, rec_thread) = match record {
            Some(to) => {
                let (q, rec_rx) = queue::<RecMsg>();
                let rec_status = status.clone();
                let thread = std::thread::Builder::new()
                    .name("cacheloop-rec".into())
                    .spawn(move || run_recorder(to, rec_rx, &rec_status))?;
                (Some(q), Some(thread))
            }
            None => (None, None),
        };
        let (met, met_thread) = match metrics {
            Some(metrics) => {
                let (q, met_rx) = queue::<MetricsMsg>();
                let thread = std::thread::Builder::new()
                    .name("cacheloop-metrics".into())
                    .spawn(move || run_metrics(&metrics, met_rx))?;
                (Some(q), Some(thread))
            }
            None => (None, None),
        };
        let finish_wait = FINISH_WAIT
            + if hooks.any() {
                hooks.drain_bound()
            } else {
                Duration::ZERO
            };
        let mut hooks = if hooks.any() {
            // A hook's record goes to the output and the metrics, as soon
            // as it is known.
            let to_out = out.sender();
            let to_met = met.as_ref().map(Queue::sender);
            Some(Hooks::start(hooks, move |record| {
                if let Some(met) = &to_met {
                    met.send(MetricsMsg {
                        records: vec![record.clone()],
                        processes: None,
                        dropped: 0,
                    });
                }
                to_out.send(SinkMsg::Batch {
                    records: vec![record],
                    dropped: 0,
                });
            })?)
        } else {
            None
        };
        let (done_tx, done) = mpsc::channel();
        let enrich_status = status.clone();
        let thread = std::thread::Builder::new()
            .name("cacheloop-enrich".into())
            .spawn(move || {
                let mut rec_fold = Fold::default();
                while let Some(msg) = rx.recv() {
                    match msg {
                        Msg::Catalog(catalog) => {
                            if let Some(rec) = &rec {
                                rec.send(RecMsg::Item(Box::new(Item::catalog(&catalog))));
                            }
                            enricher.set_catalog(catalog);
                        }
                        Msg::Lifecycle(record) => {
                            if let Some(rec) = &rec {
                                rec.send(RecMsg::Item(Box::new(Item::lifecycle(&record))));
                            }
                            if let Some(met) = &met {
                                met.send(MetricsMsg {
                                    records: vec![record.clone()],
                                    processes: None,
                                    dropped: 0,
                                });
                            }
                            out.send(SinkMsg::Batch {
                                records: vec![record],
                                dropped: 0,
                            });
                        }
                        Msg::Tick {
                            snapshot,
                            output,
                            dropped,
                        } => {
                            enricher.observe(&snapshot);
                            let mut records = enricher.records(&output);
                            if let Some(hooks) = &mut hooks {
                                let skipped: Vec<Record> =
                                    records.iter().filter_map(|r| hooks.observe(r)).collect();
                                records.extend(skipped);
                            }
                            let facts: Vec<SymbolFact> = enricher.take_facts();
                            // Before the recorder takes the snapshot.
                            let processes: Vec<(u32, String)> = match met {
                                Some(_) => snapshot
                                    .processes
                                    .iter()
                                    .filter(|p| p.alive)
                                    .map(|p| (p.pid, p.comm.clone()))
                                    .collect(),
                                None => Vec::new(),
                            };
                            if let Some(rec) = &mut rec {
                                if !facts.is_empty() {
                                    rec.send(RecMsg::Item(Box::new(Item::Symbols(facts))));
                                }
                                if rec.full() {
                                    rec_fold.drop_one(&snapshot, dropped);
                                } else {
                                    let (snapshot, folded) =
                                        std::mem::take(&mut rec_fold).into_next(snapshot);
                                    rec.send(RecMsg::Snapshot {
                                        snapshot,
                                        dropped: folded + dropped,
                                    });
                                }
                            }
                            let news = records.iter().any(|r| {
                                matches!(
                                    r,
                                    Record::Loop { .. }
                                        | Record::Recovered { .. }
                                        | Record::TargetExit { .. }
                                )
                            });
                            if let Some(met) = &met {
                                met.send(MetricsMsg {
                                    records: records.clone(),
                                    processes: Some(processes),
                                    dropped,
                                });
                            }
                            out.send_tick(dropped, news, |behind| SinkMsg::Batch {
                                records,
                                dropped: behind,
                            });
                        }
                        Msg::End {
                            detached,
                            summary,
                            dropped,
                        } => {
                            // The hooks already due run first (a stop at a
                            // loop must still page), each within its timeout.
                            if let Some(hooks) = hooks.take() {
                                hooks.finish();
                            }
                            // Ticks dropped at the very end are said too.
                            if let Some(rec) = &rec {
                                let gap = rec_fold.count + dropped;
                                if gap > 0 {
                                    rec.send(RecMsg::Item(Box::new(Item::Gap(gap))));
                                }
                                rec.send(RecMsg::Item(Box::new(Item::lifecycle(&detached))));
                            }
                            if let Some(met) = &met {
                                met.send(MetricsMsg {
                                    records: vec![detached.clone()],
                                    processes: None,
                                    dropped: 0,
                                });
                            }
                            let behind = std::mem::take(&mut out.dropped) + dropped;
                            out.send(SinkMsg::Batch {
                                records: vec![detached],
                                dropped: behind,
                            });
                            out.send(SinkMsg::Finish(Box::new(enricher.summary(&summary))));
                            break;
                        }
                    }
                }
                // Normally finished at the end; if the loop ended otherwise,
                // the hook thread must let go of the output queue before the
                // output thread is waited for.
                drop(hooks.take());
                drop(out);
                drop(rec);
                drop(met);
                for thread in std::iter::once(out_thread)
                    .chain(rec_thread)
                    .chain(met_thread)
                {
                    if thread.join().is_err()
                        && let Ok(mut error) = enrich_status.error.lock()
                    {
                        *error = Some("an output thread of cacheloop failed".to_owned());
                    }
                }
                let _ = done_tx.send(());
            })?;
        Ok(Self {
            queue: to_enricher,
            fold: Fold::default(),
            thread: Some(thread),
            done,
            status,
            finish_wait,
        })
    }

    pub fn catalog(&self, catalog: Arc<Catalog>) {
        self.queue.send(Msg::Catalog(catalog));
    }

    pub fn lifecycle(&self, records: impl IntoIterator<Item = Record>) {
        for record in records {
            self.queue.send(Msg::Lifecycle(record));
        }
    }

    /// Hands one tick over; if the enricher is [`BACKLOG`] behind, it is
    /// dropped and folded into the next.
    pub fn tick(&mut self, snapshot: Snapshot, output: Output) {
        // A loop, a recovery or an exit is never dropped: the queue may run
        // one over its bound for it.
        let news = output.events.iter().any(|e| {
            matches!(
                e,
                analyze::Event::Loop(_)
                    | analyze::Event::Recovered(_)
                    | analyze::Event::TargetExit { .. }
            )
        });
        if self.queue.full() && !news {
            self.fold.drop_one(&snapshot, 0);
            return;
        }
        let (snapshot, dropped) = std::mem::take(&mut self.fold).into_next(Arc::new(snapshot));
        self.queue.send(Msg::Tick {
            snapshot,
            output,
            dropped,
        });
    }

    /// Sends the end and waits (a bounded time: stdout may be blocked for
    /// good) for every sink to write it. `detached` and the summary are
    /// written unless stdout was closed.
    pub fn finish(mut self, detached: Record, summary: analyze::Summary) {
        let dropped = std::mem::take(&mut self.fold).count;
        self.queue.send(Msg::End {
            detached,
            summary,
            dropped,
        });
        match self.done.recv_timeout(self.finish_wait) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take()
                    && thread.join().is_err()
                    && let Ok(mut error) = self.status.error.lock()
                {
                    *error = Some("cacheloop's enricher thread failed".to_owned());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                log::warn!(
                    "the output did not take the last records within {:?}",
                    self.finish_wait
                );
            }
        }
    }
}

fn run_sink(mut sink: Box<dyn Sink>, rx: QueueRx<SinkMsg>, status: &SinkStatus) {
    let write = |sink: &mut dyn Sink, msg: SinkMsg| -> io::Result<()> {
        match msg {
            SinkMsg::Batch { records, dropped } => {
                if dropped > 0 {
                    sink.emit(&Record::Warning {
                        ts: unix_now(),
                        pid: None,
                        kind: "output_behind".to_owned(),
                        message: format!(
                            "{dropped} interval(s) of output were not written: the reader of \
                             the output fell behind"
                        ),
                        count: Some(dropped),
                    })?;
                }
                for r in &records {
                    sink.emit(r)?;
                }
                sink.end_tick()
            }
            SinkMsg::Finish(summary) => sink.finish(&summary),
        }
    };
    while let Some(msg) = rx.recv() {
        if let Err(e) = write(&mut *sink, msg) {
            if e.kind() == io::ErrorKind::BrokenPipe {
                status.closed.store(true, Ordering::Relaxed);
            } else if let Ok(mut error) = status.error.lock() {
                *error = Some(format!("cannot write the report to stdout: {e}"));
            }
            // Drain without writing, so the senders never block.
            while rx.recv().is_some() {}
            return;
        }
    }
}

fn run_metrics(metrics: &Mutex<Metrics>, rx: QueueRx<MetricsMsg>) {
    while let Some(msg) = rx.recv() {
        // A scrape holds the lock while it encodes; a panic there must not
        // take the metrics with it.
        let mut metrics = metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        metrics.behind(msg.dropped);
        if let Some(live) = msg.processes {
            metrics.processes(live);
        }
        for record in &msg.records {
            metrics.observe(record);
        }
    }
}

fn run_recorder(to: RecordTo, rx: QueueRx<RecMsg>, status: &SinkStatus) {
    let RecordTo {
        path,
        mut writer,
        header,
    } = to;
    let write = |writer: &mut Writer, msg: RecMsg| -> io::Result<()> {
        match msg {
            RecMsg::Item(item) => writer.item(&item),
            RecMsg::Snapshot { snapshot, dropped } => {
                if dropped > 0 {
                    writer.item(&Item::Gap(dropped))?;
                }
                writer.snapshot(&snapshot)
            }
        }
    };
    let fail = |e: io::Error| {
        if let Ok(mut error) = status.recording_error.lock() {
            error.get_or_insert_with(|| {
                format!("cannot write the recording {}: {e}", path.display())
            });
        }
    };
    // Named, and the header durable, at once: a run killed early still
    // leaves a file that says what it is.
    let mut ok = writer
        .commit()
        .and_then(|()| writer.item(&Item::Header(header)))
        .and_then(|()| writer.durable())
        .map_err(&fail)
        .is_ok();
    while let Some(msg) = rx.recv() {
        // After a failure, keep draining so that the senders never block.
        if ok {
            ok = write(&mut writer, msg).map_err(&fail).is_ok();
        }
    }
    if ok {
        let _ = writer.finish().map_err(&fail);
    }
}

/// Writes records to a sink right here (replay): the same rendering as the
/// threads, without them.
pub fn write_now(sink: &mut dyn Sink, records: &[Record]) -> io::Result<()> {
    for r in records {
        sink.emit(r)?;
    }
    sink.end_tick()
}

/// Flushes stdout at the very end; a closed pipe is fine.
pub fn flush_stdout() {
    let _ = io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::SyncSender;

    use super::*;
    use crate::{analyze::Event, detect::Rules, enrich::Enricher, snapshot::KeyText};

    /// A sink that holds its first record until told to go on, then keeps
    /// what it is given.
    struct Stuck {
        go: Option<Receiver<()>>,
        kept: SyncSender<Record>,
    }

    impl Sink for Stuck {
        fn emit(&mut self, record: &Record) -> io::Result<()> {
            if let Some(go) = self.go.take() {
                let _ = go.recv();
            }
            let _ = self.kept.send(record.clone());
            Ok(())
        }
        fn end_tick(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn finish(&mut self, _: &Summary) -> io::Result<()> {
            Ok(())
        }
    }

    fn sample(tick: u64) -> Output {
        Output {
            ts: tick as f64,
            events: vec![Event::Sample {
                pid: 1,
                ns_pid: None,
                func: 0,
                calls: tick,
                rate: 1.0,
                baseline: None,
                estimated: false,
            }],
            ..Output::default()
        }
    }

    #[test]
    fn a_stuck_output_never_blocks_and_every_tick_is_written_or_counted() {
        const TICKS: u64 = 3 * BACKLOG as u64;
        let (go_tx, go) = mpsc::channel();
        let (kept, records) = mpsc::sync_channel(10 * BACKLOG);
        let enricher = Enricher::replay(
            Arc::new(Catalog::default()),
            Rules::default(),
            false,
            (1, 2),
        );
        let mut pipeline = Pipeline::start(
            enricher,
            move || Box::new(Stuck { go: Some(go), kept }),
            None,
            None,
            HookConfig::default(),
        )
        .unwrap();
        // The output is stuck; the control thread goes on regardless.
        for tick in 0..TICKS {
            pipeline.tick(Snapshot::default(), sample(tick));
        }
        go_tx.send(()).unwrap();
        let detached = Record::TargetExit { ts: 0.0, pid: 0 };
        pipeline.finish(detached, analyze::Summary::default());
        let records: Vec<Record> = records.try_iter().collect();
        let written = records
            .iter()
            .filter(|r| matches!(r, Record::Sample { .. }))
            .count() as u64;
        let counted: u64 = records
            .iter()
            .filter_map(|r| match r {
                Record::Warning { kind, count, .. } if kind == "output_behind" => *count,
                _ => None,
            })
            .sum();
        // Two queues of BACKLOG and a tick in each thread's hands cannot
        // hold them all while the sink is stuck: some must be dropped, and
        // every one dropped is counted, the last ones too.
        assert!(counted > 0, "the output fell behind: {records:?}");
        assert_eq!(written + counted, TICKS);
    }

    #[test]
    fn dropped_snapshots_fold_into_the_next() {
        let mut fold = Fold::default();
        let dropped = Snapshot {
            seconds: 1.0,
            key_texts: vec![KeyText {
                hash: 7,
                text: "page:catalog".into(),
            }],
            ..Snapshot::default()
        };
        fold.drop_one(&dropped, 0);
        // One that stood for two dropped before it.
        fold.drop_one(
            &Snapshot {
                seconds: 1.5,
                ..Snapshot::default()
            },
            2,
        );
        let next = Arc::new(Snapshot {
            seconds: 1.0,
            ..Snapshot::default()
        });
        let (merged, count) = fold.into_next(next);
        assert_eq!(count, 4);
        assert_eq!(merged.seconds, 3.5, "rates after a gap cover the gap");
        assert_eq!(merged.key_texts, dropped.key_texts);
        let (same, none) = Fold::default().into_next(merged.clone());
        assert_eq!(none, 0);
        assert!(Arc::ptr_eq(&same, &merged));
    }
}
