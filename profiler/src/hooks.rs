//! `--on-loop CMD` and `--on-recover CMD`: a command run once per verdict
//! (page someone, flip the flag that bypasses the cache), with the record
//! as JSON on its stdin. A sink of its own, on its own thread: a hook that
//! hangs holds up nothing but the hooks after it.
//!
//! - One at a time, in verdict order; at most [`PENDING`] wait behind a
//!   running one, the others are skipped and said so (`hook_skipped`).
//! - Each is bounded: after `--hook-timeout` its process group gets
//!   SIGTERM, and SIGKILL a second later; the `hook` record says so. When
//!   the hook exits, whatever it left running in its group is killed too
//!   (one at a time means one at a time; `setsid` escapes that, on
//!   purpose). The hook's pid is not reaped until then, so its group id
//!   cannot be reused by another process while it is signalled.
//! - Run by `/bin/sh -c CMD` in a process group of its own, its stdout
//!   discarded (cacheloop's stdout is the report), its stderr cacheloop's,
//!   without the ambient capabilities a service gives cacheloop (they
//!   would pass through exec to the hook). `CACHELOOP_EVENT` (`loop` or
//!   `recovered`), `CACHELOOP_PID` and `CACHELOOP_FUNCTIONS`
//!   (comma-separated) are in its environment. The command is not in the
//!   `hook` record: it may hold a token.
//! - At the end of the run, the hooks already due still run (a
//!   `--fail-on-loop` stop must still page), all within one
//!   `--hook-timeout`: those not started by then are reported skipped.

use std::{
    io::Write as _,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    report::{Record, unix_now},
    target,
};

/// What runs the hooks' commands.
pub const SHELL: &str = "/bin/sh";

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
        self.timeout + GRACE * 2
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
    /// Set by [`Hooks::finish`]: every hook ends by then.
    stop_by: Arc<Mutex<Option<Instant>>>,
}

impl Hooks {
    /// Starts the thread; `report` takes each `hook` record it makes.
    pub fn start(
        config: HookConfig,
        report: impl FnMut(Record) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(PENDING);
        let timeout = config.timeout;
        let stop_by = Arc::new(Mutex::new(None));
        let stop = stop_by.clone();
        let thread = std::thread::Builder::new()
            .name("cacheloop-hooks".into())
            .spawn(move || run(&rx, timeout, &stop, report))?;
        Ok(Self {
            config,
            tx: Some(tx),
            thread: Some(thread),
            skipped: 0,
            stop_by,
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

    /// Runs the hooks already due, all within one `--hook-timeout`, then
    /// ends the thread.
    pub fn finish(mut self) {
        *self.stop_by.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Instant::now() + self.config.timeout);
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Hooks {
    /// Not finished (a failure on the way out): the hooks due are not run.
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            *self.stop_by.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            drop(self.tx.take());
            let _ = thread.join();
        }
    }
}

fn run(
    rx: &Receiver<Due>,
    timeout: Duration,
    stop_by: &Mutex<Option<Instant>>,
    mut report: impl FnMut(Record),
) {
    let stop_by = || *stop_by.lock().unwrap_or_else(PoisonError::into_inner);
    while let Ok(due) = rx.recv() {
        let started = Instant::now();
        if stop_by().is_some_and(|at| started >= at) {
            report(Record::Hook {
                ts: unix_now(),
                event: due.event.to_owned(),
                pid: due.pid,
                status: None,
                signal: None,
                timed_out: false,
                seconds: 0.0,
                error: Some(
                    "not run: cacheloop was stopping and its time for hooks was up".to_owned(),
                ),
            });
            continue;
        }
        report(run_one(&due, started + timeout, stop_by));
    }
}

/// Runs one hook to its end, or until `deadline` (or the end of the run's
/// time for hooks, whichever is first); the `hook` record of it.
fn run_one(due: &Due, deadline: Instant, stop_by: impl Fn() -> Option<Instant>) -> Record {
    let started = Instant::now();
    let record =
        |status: Option<i32>, signal: Option<i32>, timed_out: bool, error: Option<String>| {
            Record::Hook {
                ts: unix_now(),
                event: due.event.to_owned(),
                pid: due.pid,
                status,
                signal,
                timed_out,
                seconds: (started.elapsed().as_secs_f64() * 100.0).round() / 100.0,
                error,
            }
        };
    let mut command = Command::new(SHELL);
    command
        .arg("-c")
        .arg(&due.command)
        .env("CACHELOOP_EVENT", due.event)
        .env("CACHELOOP_PID", due.pid.to_string())
        .env("CACHELOOP_FUNCTIONS", due.functions.join(","))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0);
    // SAFETY: between fork and exec only prctl(2), async-signal-safe. The
    // ambient set is what carries a service's capabilities through exec to
    // a program without file capabilities: the hook gets none of them.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
    let mut child = match command.spawn() {
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
    let group = child.id() as i32;
    let ended = target::wait_unreaped(group, || {
        let now = Instant::now();
        now >= deadline || stop_by().is_some_and(|at| now >= at)
    });
    // Whatever is left in its group goes, the hook itself if it is still
    // there (the leader is not reaped yet: the group id is still its).
    if ended {
        target::kill_group(group);
    } else {
        target::stop_group(group, GRACE);
    }
    let status = child.wait();
    match (ended, status) {
        (true, Ok(status)) => record(status.code(), status.signal(), false, None),
        (true, Err(e)) => record(None, None, false, Some(format!("cannot wait for it: {e}"))),
        (false, _) => record(
            None,
            None,
            true,
            Some(format!(
                "still running after {:.1}s: stopped",
                started.elapsed().as_secs_f64()
            )),
        ),
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
        let dir = std::env::temp_dir().join(format!("cacheloop-hook-kill-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = dir.join("child");
        // A child that ignores SIGTERM (the disposition survives exec).
        let command = format!(
            "trap '' TERM; (exec sleep 30) & echo $! > {}; wait",
            child.display()
        );
        let (mut hooks, rx) = hooks(&command, Duration::from_millis(300));
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
        let pid: u32 = std::fs::read_to_string(&child)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed: gone, or a zombie waiting for its new parent.
        let deadline = Instant::now() + Duration::from_secs(5);
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| !r.trim_start().starts_with('Z'))
            })
        };
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(), "the hook's child {pid} outlived it");
        hooks.finish();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn at_the_end_the_hooks_due_run_within_one_timeout() {
        let (mut hooks, rx) = hooks("sleep 30", Duration::from_millis(500));
        hooks.observe(&recovered(1));
        hooks.observe(&recovered(2));
        let started = Instant::now();
        hooks.finish();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let records: Vec<Record> = rx.try_iter().collect();
        assert_eq!(records.len(), 2, "{records:?}");
        assert!(
            matches!(&records[1], Record::Hook { error: Some(e), .. } if e.contains("not run")),
            "{records:?}"
        );
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
