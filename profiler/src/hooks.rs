//! `--on-loop CMD` and `--on-recover CMD`: a command run once per verdict
//! (page someone, flip the flag that bypasses the cache), with the record
//! as JSON on its stdin. A sink of its own, on its own thread: a hook that
//! hangs holds up nothing but the hooks after it.
//!
//! - One at a time, in verdict order; at most [`PENDING`] wait behind a
//!   running one, the others are skipped and said so (`hook_skipped`).
//! - Each is bounded: after `--hook-timeout` its process group gets
//!   SIGTERM, and SIGKILL a second later; the `hook` record says so.
//! - Run by `/bin/sh -c CMD` in a process group of its own, its stdout
//!   discarded (cacheloop's stdout is the report), its stderr cacheloop's.
//!   `CACHELOOP_EVENT` (`loop` or `recovered`), `CACHELOOP_PID` and
//!   `CACHELOOP_FUNCTIONS` (comma-separated) are in its environment.
//! - At the end of the run, the hooks already due still run (a
//!   `--fail-on-loop` stop must still page) before cacheloop exits.

use std::{
    io::Write as _,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver, SyncSender, TrySendError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::report::{Record, unix_now};

/// Verdicts that may wait behind a running hook.
pub const PENDING: usize = 16;
/// Between SIGTERM and SIGKILL for a hook past its time.
const GRACE: Duration = Duration::from_secs(1);

/// The hooks configured.
#[derive(Clone, Debug, Default)]
pub struct HookConfig {
    pub on_loop: Option<String>,
    pub on_recover: Option<String>,
    pub timeout: Duration,
}

impl HookConfig {
    pub fn any(&self) -> bool {
        self.on_loop.is_some() || self.on_recover.is_some()
    }

    /// The longest the hooks still due at the end may take.
    pub fn drain_bound(&self) -> Duration {
        (self.timeout + GRACE) * (PENDING as u32 + 1)
    }
}

/// One verdict to run a hook for.
struct Due {
    event: &'static str,
    command: String,
    pid: u32,
    functions: Vec<String>,
    json: String,
}

/// The running hook thread.
pub struct Hooks {
    config: HookConfig,
    tx: Option<SyncSender<Due>>,
    thread: Option<JoinHandle<()>>,
    skipped: u64,
}

impl Hooks {
    /// Starts the thread; `report` takes each `hook` record it makes.
    pub fn start(
        config: HookConfig,
        report: impl FnMut(Record) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(PENDING);
        let timeout = config.timeout;
        let thread = std::thread::Builder::new()
            .name("cacheloop-hooks".into())
            .spawn(move || run(rx, timeout, report))?;
        Ok(Self {
            config,
            tx: Some(tx),
            thread: Some(thread),
            skipped: 0,
        })
    }

    /// Queues the hook for `record` if it is a verdict with one. Never
    /// blocks: with [`PENDING`] already waiting, returns a warning instead.
    pub fn observe(&mut self, record: &Record) -> Option<Record> {
        let (event, command, pid, functions) = match record {
            Record::Loop { pid, functions, .. } => ("loop", &self.config.on_loop, pid, functions),
            Record::Recovered { pid, functions, .. } => {
                ("recovered", &self.config.on_recover, pid, functions)
            }
            _ => return None,
        };
        let command = command.as_ref()?;
        let due = Due {
            event,
            command: command.clone(),
            pid: *pid,
            functions: functions.clone(),
            json: serde_json::to_string(record).unwrap_or_default(),
        };
        match self.tx.as_ref()?.try_send(due) {
            Ok(()) => None,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.skipped += 1;
                Some(Record::Warning {
                    ts: unix_now(),
                    pid: Some(*pid),
                    kind: "hook_skipped".to_owned(),
                    message: format!(
                        "the --on-{} hook for pid {pid} was not run: {PENDING} hooks are already waiting behind a running one",
                        if event == "loop" { "loop" } else { "recover" }
                    ),
                    count: Some(self.skipped),
                })
            }
        }
    }

    /// Runs the hooks already due, then ends the thread.
    pub fn finish(mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(rx: Receiver<Due>, timeout: Duration, mut report: impl FnMut(Record)) {
    while let Ok(due) = rx.recv() {
        report(run_one(&due, timeout));
    }
}

/// Runs one hook to its end or its timeout; the `hook` record of it.
fn run_one(due: &Due, timeout: Duration) -> Record {
    let started = Instant::now();
    let record =
        |status: Option<i32>, signal: Option<i32>, timed_out: bool, error: Option<String>| {
            Record::Hook {
                ts: unix_now(),
                event: due.event.to_owned(),
                pid: due.pid,
                command: due.command.clone(),
                status,
                signal,
                timed_out,
                seconds: (started.elapsed().as_secs_f64() * 100.0).round() / 100.0,
                error,
            }
        };
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(&due.command)
        .env("CACHELOOP_EVENT", due.event)
        .env("CACHELOOP_PID", due.pid.to_string())
        .env("CACHELOOP_FUNCTIONS", due.functions.join(","))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return record(
                None,
                None,
                false,
                Some(format!("cannot start /bin/sh: {e}")),
            );
        }
    };
    // From a thread of its own: a hook that never reads its stdin must not
    // hold this one up once the pipe is full.
    if let Some(mut stdin) = child.stdin.take() {
        let json = format!("{}\n", due.json);
        let _ = std::thread::Builder::new()
            .name("cacheloop-hook-in".into())
            .spawn(move || {
                // A hook that exits without reading: EPIPE, nothing to do.
                let _ = stdin.write_all(json.as_bytes());
            });
    }
    match wait(&mut child, started + timeout) {
        Some(status) => record(status.code(), status.signal(), false, None),
        None => {
            stop(&mut child);
            record(
                None,
                None,
                true,
                Some(format!("still running after {timeout:?}: stopped")),
            )
        }
    }
}

/// Waits until `deadline`; `None` if the hook is still running then.
fn wait(child: &mut Child, deadline: Instant) -> Option<std::process::ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            // Not ours to wait for any more: nothing to report.
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to the hook's process group, SIGKILL after [`GRACE`].
fn stop(child: &mut Child) {
    let group = child.id() as i32;
    // SAFETY: kill(2) on the process group this child leads (we made it
    // with process_group(0) and have not reaped it).
    unsafe { libc::kill(-group, libc::SIGTERM) };
    if wait(child, Instant::now() + GRACE).is_none() {
        // SAFETY: as above.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;

    fn recovered(pid: u32) -> Record {
        Record::Recovered {
            ts: 1.0,
            pid,
            functions: vec!["f".into(), "g".into()],
            rate: 1.0,
            baseline: 1.0,
            reason: "calm".into(),
        }
    }

    fn hooks(command: &str, timeout: Duration) -> (Hooks, Receiver<Record>) {
        let (tx, rx) = channel();
        let config = HookConfig {
            on_loop: None,
            on_recover: Some(command.to_owned()),
            timeout,
        };
        let hooks = Hooks::start(config, move |r| {
            let _ = tx.send(r);
        })
        .unwrap();
        (hooks, rx)
    }

    #[test]
    fn a_hook_reads_the_record_and_its_environment_and_its_status_is_reported() {
        let dir = std::env::temp_dir().join(format!("cacheloop-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("in.json");
        let command = format!(
            "cat > {}; echo \"$CACHELOOP_EVENT $CACHELOOP_PID $CACHELOOP_FUNCTIONS\" >> {0}; exit 7",
            out.display()
        );
        let (mut hooks, rx) = hooks(&command, Duration::from_secs(30));
        assert!(hooks.observe(&recovered(42)).is_none());
        hooks.finish();
        let Record::Hook {
            event,
            pid,
            status,
            timed_out,
            ..
        } = rx.recv().unwrap()
        else {
            panic!("not a hook record");
        };
        assert_eq!(
            (event.as_str(), pid, status, timed_out),
            ("recovered", 42, Some(7), false)
        );
        let got = std::fs::read_to_string(&out).unwrap();
        let (json, env) = got.split_once('\n').unwrap();
        let json: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(json["type"], "recovered");
        assert_eq!(env.trim(), "recovered 42 f,g");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_hook_past_its_timeout_is_stopped_with_its_children_and_reported() {
        let (mut hooks, rx) = hooks("sleep 30 & sleep 30", Duration::from_millis(200));
        let started = Instant::now();
        hooks.observe(&recovered(1));
        let record = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            matches!(
                record,
                Record::Hook {
                    timed_out: true,
                    status: None,
                    ..
                }
            ),
            "{record:?}"
        );
        hooks.finish();
    }

    #[test]
    fn verdicts_beyond_the_pending_bound_are_skipped_with_a_warning() {
        let (mut hooks, _rx) = hooks("sleep 0.1", Duration::from_secs(5));
        let warnings: Vec<Record> = (0..PENDING as u32 + 3)
            .filter_map(|pid| hooks.observe(&recovered(pid)))
            .collect();
        // PENDING wait, and one runs if the thread took it already.
        assert!((2..=3).contains(&warnings.len()), "{warnings:?}");
        assert!(matches!(&warnings[0], Record::Warning { kind, .. } if kind == "hook_skipped"));
        hooks.finish();
    }
}
