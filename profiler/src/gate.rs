//! `cacheloop run [watch flags] -- CMD ARGS...`: the pre-deploy gate.
//! Starts CMD with the probes in place before its first instruction,
//! watches it as `watch --pid` would, passes SIGINT and SIGTERM on to it,
//! and exits with its status; with `--fail-on-loop`, a confirmed loop stops
//! it (SIGTERM, SIGKILL after `--grace`) and exits 3. With `--duration`, a
//! CMD still running at the end is stopped the same way and the gate
//! passes (exit 0): no loop in that window.
//!
//! No race with a loop that starts at once: the child asks to be traced
//! (`PTRACE_TRACEME`) before its exec, so the kernel stops it right after
//! the exec, with CMD mapped and not one of its instructions run. The
//! probes are planned from CMD's executable as mapped then and attached
//! for its pid (a uprobe scoped to a process follows its memory map, which
//! is CMD's from then on); only then is the child let go. Functions in
//! shared libraries are not mapped yet at that point: they must be in
//! CMD's own executable. CMD's descendants are followed by the controller
//! (attached within an interval of their start).
//!
//! Everything from the spawn to the release happens on this one thread:
//! ptrace ties a tracee to the thread that is its parent.

use std::{
    io,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    cli::RunArgs,
    config::{ConfigError, Output, WatchConfig},
    watch::{self, Outcome},
};

/// Exit status of a command ended by a signal, as shells report it.
const SIGNALLED: u8 = 128;

pub fn run(args: RunArgs) -> anyhow::Result<Outcome> {
    let RunArgs {
        mut watch,
        grace,
        command,
    } = args;
    if !watch.pid.is_empty() || watch.binary.is_some() || !watch.name.is_empty() {
        return Err(ConfigError::RunTarget.into());
    }
    // Checked before anything starts; the pid is CMD's, once it exists.
    watch.pid = vec![std::process::id()];
    let mut config = WatchConfig::try_from(watch)?;
    let mut child = spawn_stopped(&command, config.output)?;
    let pid = child.id();
    config.pids = vec![pid];
    config.command = Some(pid);
    let fail_on_loop = config.fail_on_loop;
    let outcome = watch::run_then(config, || release(pid));
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            // Not attached (or failed on the way): CMD does not run
            // unwatched behind the user's back.
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    if outcome == Outcome::LoopFound && fail_on_loop {
        let how = stop(&mut child, grace);
        eprintln!(
            "cacheloop: a loop was confirmed in {} (pid {pid}): stopped it ({how}); exit 3",
            command[0]
        );
        return Ok(Outcome::LoopFound);
    }
    // The watch ended with CMD still running: --duration is up (or the
    // reader of the output went away). No loop in that window: the gate
    // passes, and CMD does not outlive it.
    if child.try_wait().ok().flatten().is_none() {
        let how = stop(&mut child, grace);
        eprintln!(
            "cacheloop: no loop while watching {} (pid {pid}); stopped it at the end ({how}); exit 0",
            command[0]
        );
        return Ok(Outcome::Finished);
    }
    let status = child.wait().context("cannot wait for the command")?;
    Ok(Outcome::Command(exit_code(status)))
}

/// Starts `command` stopped right after its exec. With `--json`, its stdout
/// goes to cacheloop's stderr: stdout stays JSON lines.
fn spawn_stopped(command: &[String], output: Output) -> anyhow::Result<Child> {
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]);
    if output == Output::Json {
        cmd.stdout(Stdio::from(io::stderr()));
    }
    // SAFETY: between fork and exec only ptrace(2), async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", command[0]))?;
    let pid = child.id() as i32;
    // The exec's SIGTRAP stop: CMD is mapped and has not run.
    let mut status = 0;
    // SAFETY: waitpid(2) on our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    if r != pid || !libc::WIFSTOPPED(status) {
        anyhow::bail!(
            "{} did not stop at its start as traced (status {status:#x}); is cacheloop itself being traced?",
            command[0]
        );
    }
    Ok(child)
}

/// Lets the stopped command go: its first instruction runs probed.
fn release(pid: u32) -> anyhow::Result<()> {
    // SAFETY: PTRACE_DETACH of our stopped tracee, from the thread that
    // traces it; signal 0: the exec's SIGTRAP is not delivered.
    let r = unsafe { libc::ptrace(libc::PTRACE_DETACH, pid as i32, 0, 0) };
    if r == -1 {
        return Err(io::Error::last_os_error()).context("cannot let the command start");
    }
    Ok(())
}

/// SIGTERM, then SIGKILL after `grace`; says which ended it.
fn stop(child: &mut Child, grace: Duration) -> String {
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return format!("it exited with status {} on SIGTERM", exit_code(status));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    format!("SIGKILL after {grace:?}: SIGTERM did not end it")
}

/// The status a shell would report: the code, or 128 + the signal.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(u8::MAX),
        (None, Some(signal)) => SIGNALLED.saturating_add(u8::try_from(signal).unwrap_or(0)),
        (None, None) => u8::MAX,
    }
}
