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
};

use crate::{
    analyze::{self, Output},
    catalog::Catalog,
    enrich::{Enricher, SymbolFact},
    recording::{Header, Item, Writer},
    report::{Record, Sink, Summary, unix_now},
    snapshot::Snapshot,
};

/// Ticks a queue holds before it drops.
pub const BACKLOG: usize = 32;
/// How long the end waits for the sinks to write it (stdout may be
/// blocked for good; the probes are out by then).
const FINISH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

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

    /// Queued unless the reader is [`BACKLOG`] behind; `make` gets how many
    /// ticks were dropped before this one.
    fn send_tick(&mut self, make: impl FnOnce(u64) -> T) {
        if self.full() {
            self.dropped += 1;
            return;
        }
        let dropped = std::mem::take(&mut self.dropped);
        self.send(make(dropped));
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
    key_texts: Vec<crate::snapshot::KeyText>,
    new_stacks: Vec<crate::snapshot::NewStack>,
}

impl Fold {
    fn drop_one(&mut self, snapshot: &Snapshot) {
        self.count += 1;
        self.seconds += snapshot.seconds;
        self.key_texts.extend(snapshot.key_texts.iter().cloned());
        self.new_stacks.extend(snapshot.new_stacks.iter().cloned());
    }

    /// `snapshot` with what was dropped before it; the count dropped.
    fn into_next(self, snapshot: Arc<Snapshot>) -> (Arc<Snapshot>, u64) {
        if self.count == 0 {
            return (snapshot, 0);
        }
        let mut merged = (*snapshot).clone();
        merged.seconds += self.seconds;
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
                                rec.send(RecMsg::Item(Box::new(Item::Catalog((*catalog).clone()))));
                            }
                            enricher.set_catalog(catalog);
                        }
                        Msg::Lifecycle(record) => {
                            if let Some(rec) = &rec {
                                rec.send(RecMsg::Item(Box::new(Item::lifecycle(&record))));
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
                            let records = enricher.records(&output);
                            let facts: Vec<SymbolFact> = enricher.take_facts();
                            if let Some(rec) = &mut rec {
                                if !facts.is_empty() {
                                    rec.send(RecMsg::Item(Box::new(Item::Symbols(facts))));
                                }
                                if rec.full() {
                                    rec_fold.drop_one(&snapshot);
                                } else {
                                    let (snapshot, folded) =
                                        std::mem::take(&mut rec_fold).into_next(snapshot);
                                    rec.send(RecMsg::Snapshot {
                                        snapshot,
                                        dropped: folded + dropped,
                                    });
                                }
                            }
                            out.send_tick(|behind| SinkMsg::Batch {
                                records,
                                dropped: behind + dropped,
                            });
                        }
                        Msg::End { detached, summary } => {
                            if let Some(rec) = &rec {
                                rec.send(RecMsg::Item(Box::new(Item::lifecycle(&detached))));
                            }
                            out.send(SinkMsg::Batch {
                                records: vec![detached],
                                dropped: 0,
                            });
                            out.send(SinkMsg::Finish(Box::new(enricher.summary(&summary))));
                            break;
                        }
                    }
                }
                drop(out);
                drop(rec);
                for thread in std::iter::once(out_thread).chain(rec_thread) {
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
        if self.queue.full() {
            self.fold.drop_one(&snapshot);
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
        self.queue.send(Msg::End { detached, summary });
        match self.done.recv_timeout(FINISH_WAIT) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take()
                    && thread.join().is_err()
                    && let Ok(mut error) = self.status.error.lock()
                {
                    *error = Some("cacheloop's enricher thread failed".to_owned());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                log::warn!("the output did not take the last records within {FINISH_WAIT:?}");
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
