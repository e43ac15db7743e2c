//! The `watch` command, end to end: resolve targets, pick functions, attach,
//! sample every interval until told to stop, detach, summarise.
//!
//! This is glue: each step is a call into the module that owns it, and data
//! flows one way (target -> symbols -> probes -> sampler -> detector -> sinks).

use std::{
    collections::{HashMap, hash_map::Entry},
    io::{self, Write},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::Instant,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval_at, sleep},
};

use crate::{
    config::{Output, WatchConfig},
    detect::Detector,
    probes::{AttachRequest, ProbeError, Probes},
    report::{Record, Sink, json::JsonSink, text::TextSink, unix_now},
    sampler::{Sampler, Watched},
    symbols::SymbolTable,
    target::{self, Binary, Process},
};

/// Failures of the run itself (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Not allowed to load BPF programs.
    #[error(
        "cacheloop needs root (or CAP_BPF and CAP_PERFMON) to attach uprobes; run it with sudo"
    )]
    NoPrivileges,
    /// A target exited between being found and being probed.
    #[error("pid {pid} exited before cacheloop could attach")]
    TargetGone { pid: u32 },
}

/// How a run ended, when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Ran to its end (duration, signal, targets gone); loops may have been
    /// reported.
    Finished,
    /// Stopped at a loop because of `--fail-on-loop`.
    LoopFound,
}

/// Why the sampling loop stopped.
enum Stop {
    Done,
    Loop,
    /// The reader of stdout went away: not an error, but stop writing.
    BrokenPipe,
}

/// The functions to probe, numbered: `names[cookie]`, plus each file's
/// (offset, cookie) points.
struct Plan {
    names: Vec<String>,
    requests: Vec<AttachRequest>,
}

pub fn run(config: WatchConfig) -> anyhow::Result<Outcome> {
    if !target::has_bpf_privileges() {
        return Err(RunError::NoPrivileges.into());
    }
    let started = Instant::now();
    let processes = config
        .pids
        .iter()
        .map(|&pid| Process::from_pid(pid))
        .collect::<Result<Vec<_>, _>>()?;
    let binary = config.binary.as_deref().map(Binary::open).transpose()?;
    let plan = plan(&config, &processes, binary.as_ref())?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .enable_io()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(watch(config, plan, processes, binary, started))
}

/// Reads each distinct file once and numbers the selected functions.
fn plan(
    config: &WatchConfig,
    processes: &[Process],
    binary: Option<&Binary>,
) -> anyhow::Result<Plan> {
    // (file to read and attach to, pid scope); a pid running the --binary
    // file is already covered by the all-processes link on that file.
    let mut files: Vec<(PathBuf, Option<u32>)> = processes
        .iter()
        .filter(|p| !binary.is_some_and(|b| b.runs(p.pid)))
        .map(|p| (p.exe.clone(), Some(p.pid)))
        .collect();
    if let Some(b) = binary {
        files.push((b.path.clone(), None));
    }

    let mut tables: HashMap<(u64, u64), SymbolTable> = HashMap::new();
    let mut names: Vec<String> = Vec::new();
    let mut cookies: HashMap<String, u32> = HashMap::new();
    let mut requests = Vec::new();
    for (path, pid) in files {
        let meta =
            std::fs::metadata(&path).with_context(|| format!("cannot stat {}", path.display()))?;
        let id = (meta.dev(), meta.ino());
        let table = match tables.entry(id) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(slot) => {
                // Name the file as the user knows it in messages.
                let shown = match pid.and_then(|pid| processes.iter().find(|p| p.pid == pid)) {
                    Some(p) => p.exe_name.clone(),
                    None => path.clone(),
                };
                slot.insert(SymbolTable::read(&path, &shown)?)
            }
        };
        let points = table
            .select(&config.patterns)?
            .into_iter()
            .map(|sym| {
                let next = names.len() as u32;
                let cookie = *cookies.entry(sym.name.clone()).or_insert_with(|| {
                    names.push(sym.name.clone());
                    next
                });
                (sym.file_offset, cookie)
            })
            .collect();
        requests.push(AttachRequest { path, pid, points });
    }
    Ok(Plan { names, requests })
}

async fn watch(
    config: WatchConfig,
    plan: Plan,
    processes: Vec<Process>,
    binary: Option<Binary>,
    started: Instant,
) -> anyhow::Result<Outcome> {
    // Handlers first: a Ctrl-C during attach must still end in a detach.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;

    let stdout = io::stdout().lock();
    let mut sink: Box<dyn Sink> = match config.output {
        Output::Json => Box::new(JsonSink::new(io::BufWriter::new(stdout))),
        Output::Text => Box::new(TextSink::new(io::LineWriter::new(stdout))),
    };

    // Room for every function in every process we may see; --binary may
    // bring processes we do not know of yet.
    let slots = plan.names.len() * (processes.len() + if binary.is_some() { 256 } else { 0 });
    let mut probes = Probes::load(slots.clamp(1024, 1 << 20) as u32)?;
    for request in &plan.requests {
        if let Err(err) = probes.attach(request) {
            return Err(attach_failure(err, request, &processes));
        }
    }
    if let Some(gone) = processes.iter().find(|p| !p.is_alive()) {
        return Err(RunError::TargetGone { pid: gone.pid }.into());
    }
    log::info!(
        "attached {} function(s) via {}",
        probes.attached(),
        probes.mode().as_str()
    );

    let watched = Watched {
        pids: processes,
        binary,
    };
    let mut sampler = Sampler::new(
        plan.names.clone(),
        watched,
        Detector::new(config.rules.clone()),
    );
    let attach_seconds = started.elapsed().as_secs_f64();
    let mut stop = Stop::Done;
    for request in &plan.requests {
        let record = Record::Attached {
            ts: unix_now(),
            pid: request.pid,
            path: match request.pid {
                Some(pid) => sampler.live().find(|p| p.pid == pid).map_or_else(
                    || request.path.display().to_string(),
                    |p| p.exe_name.display().to_string(),
                ),
                None => request.path.display().to_string(),
            },
            functions: request
                .points
                .iter()
                .map(|&(_, cookie)| plan.names[cookie as usize].clone())
                .collect(),
            mode: probes.mode().as_str(),
            attach_seconds,
        };
        if let Err(e) = sink.emit(&record).and_then(|()| sink.end_tick()) {
            stop = write_failure(e)?;
        }
    }

    let deadline = config.duration.map(|d| tokio::time::Instant::now() + d);
    let mut ticks = interval_at(
        tokio::time::Instant::now() + config.interval,
        config.interval,
    );
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while matches!(stop, Stop::Done) {
        let until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ticks.tick() => {}
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = until_deadline => {
                // The last, partial interval still counts.
                let tick = sampler.tick(&mut probes)?;
                stop = deliver(&mut *sink, &tick.records)?;
                break;
            }
        }
        let tick = sampler.tick(&mut probes)?;
        stop = deliver(&mut *sink, &tick.records)?;
        if tick.loop_found && config.fail_on_loop && matches!(stop, Stop::Done) {
            stop = Stop::Loop;
        } else if tick.all_gone {
            break;
        }
    }

    let dropped = probes.dropped();
    let functions = probes.attached();
    let detach = probes.detach();
    let detached = Record::Detached {
        ts: unix_now(),
        functions,
        detach_seconds: detach.as_secs_f64(),
    };
    if !matches!(stop, Stop::BrokenPipe) {
        let summary = sampler.summary(dropped);
        let written = sink.emit(&detached).and_then(|()| sink.finish(&summary));
        if let Err(e) = written {
            write_failure(e)?;
        }
    }
    // Let a closing pipe reader see everything before we exit.
    let _ = io::stdout().flush();
    sleep(std::time::Duration::ZERO).await;
    Ok(match stop {
        Stop::Loop => Outcome::LoopFound,
        Stop::Done | Stop::BrokenPipe => Outcome::Finished,
    })
}

fn deliver(sink: &mut dyn Sink, records: &[Record]) -> anyhow::Result<Stop> {
    let written = records
        .iter()
        .try_for_each(|r| sink.emit(r))
        .and_then(|()| sink.end_tick());
    match written {
        Ok(()) => Ok(Stop::Done),
        Err(e) => write_failure(e),
    }
}

/// A closed stdout ends the run quietly; any other write error fails it.
fn write_failure(err: io::Error) -> anyhow::Result<Stop> {
    if err.kind() == io::ErrorKind::BrokenPipe {
        Ok(Stop::BrokenPipe)
    } else {
        Err(anyhow::Error::new(err).context("cannot write the report to stdout"))
    }
}

/// A refused attach is most often a process that just exited; say so.
fn attach_failure(
    err: ProbeError,
    request: &AttachRequest,
    processes: &[Process],
) -> anyhow::Error {
    let gone = request
        .pid
        .and_then(|pid| processes.iter().find(|p| p.pid == pid))
        .filter(|p| !p.is_alive());
    match gone {
        Some(p) => RunError::TargetGone { pid: p.pid }.into(),
        None => err.into(),
    }
}
