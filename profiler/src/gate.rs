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
//! ptrace ties a tracee to the thread that is its parent. CMD runs in a
//! process group of its own: signals passed on and the final stop reach
//! its children too (a terminal's Ctrl-C reaches cacheloop only, which
//! passes it on once).

use std::{
    io,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    cli::RunArgs,
    config::{ConfigError, Output, WatchConfig},
    target,
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
    if grace.is_zero() || grace > Duration::from_secs(600) {
        return Err(ConfigError::OutOfRange {
            flag: "--grace",
            value: humantime::format_duration(grace).to_string(),
            expected: "from 1ms to 10m",
        }
        .into());
    }
    // Checked before anything starts; the pid is CMD's, once it exists.
    watch.pid = vec![std::process::id()];
    let mut config = WatchConfig::try_from(watch)?;
    let mut child = spawn_stopped(&command, config.output)?;
    let pid = child.id();
    config.pids = vec![pid];
    config.command = Some(pid);
    config.command_grace = grace;
    let outcome = watch::run_then(config, || release(pid));
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            // Not attached (or failed on the way): CMD does not run
            // unwatched behind the user's back. One that ran and could not
            // be probed again is stopped as at the end of a run, with its
            // grace.
            let lost = matches!(
                e.downcast_ref::<crate::control::RunError>(),
                Some(crate::control::RunError::CommandLost { .. })
            );
            stop(
                pid,
                if lost {
                    grace
                } else {
                    Duration::from_millis(1)
                },
            );
            let _ = child.wait();
            return Err(e);
        }
    };
    if outcome == Outcome::LoopFound {
        // Stopped by the watch, which said so in a `command_stopped`
        // record; reaped here.
        let _ = child.wait();
        return Ok(Outcome::LoopFound);
    }
    // The watch ended with CMD still running: --duration is up (or the
    // reader of the output went away). CMD does not outlive the gate.
    if child.try_wait().ok().flatten().is_none() {
        let how = stop(pid, grace);
        let _ = child.wait();
        eprintln!(
            "cacheloop: the watch ended with {} (pid {pid}) still running: stopped it ({how}); exit 0",
            command[0]
        );
        return Ok(Outcome::Finished);
    }
    let status = child.wait().context("cannot wait for the command")?;
    Ok(Outcome::Command(exit_code(status)))
}

/// Starts `command` in a process group of its own, stopped right after its
/// exec. With `--json`, its stdout goes to cacheloop's stderr: stdout stays
/// JSON lines. Should cacheloop die, so does the command (it would run
/// on unwatched, or die of the exec's trap).
fn spawn_stopped(command: &[String], output: Output) -> anyhow::Result<Child> {
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]).process_group(0);
    if output == Output::Json {
        cmd.stdout(Stdio::from(io::stderr()));
    }
    // SAFETY: between fork and exec only prctl(2) and ptrace(2),
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1
                || libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) == -1
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        anyhow::anyhow!(
            "cannot start {}: {e} (under a debugger or strace, or with kernel.yama.ptrace_scope = 3, it cannot be traced)",
            command[0]
        )
    })?;
    match exec_stop(child.id() as i32) {
        Ok(()) => Ok(child),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e.context(format!("cannot start {}", command[0])))
        }
    }
}

/// Waits for the exec's SIGTRAP stop: CMD is mapped and has not run. A
/// signal that arrives first is passed on to it, not mistaken for that
/// stop. From then on, cacheloop's exit kills it (PTRACE_O_EXITKILL) while
/// it is traced.
fn exec_stop(pid: i32) -> anyhow::Result<()> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if !libc::WIFSTOPPED(status) {
            anyhow::bail!("it ended before its first instruction (status {status:#x})");
        }
        let signal = libc::WSTOPSIG(status);
        if signal == libc::SIGTRAP {
            // SAFETY: ptrace(2) on our stopped tracee.
            unsafe {
                libc::ptrace(
                    libc::PTRACE_SETOPTIONS,
                    pid,
                    0,
                    libc::PTRACE_O_EXITKILL as libc::c_ulong,
                )
            };
            return Ok(());
        }
        // SAFETY: ptrace(2) on our stopped tracee: deliver what stopped it.
        unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, signal as libc::c_ulong) };
    }
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

/// Stops the command and its process group: SIGTERM, then SIGKILL after
/// `grace` to whatever is left of the group (children included). The
/// command is left for its parent to reap; says what it took.
pub fn stop(pid: u32, grace: Duration) -> String {
    if target::stop_group(pid as i32, grace) {
        "it ended on SIGTERM".to_owned()
    } else {
        format!("SIGKILL after {grace:?}: SIGTERM did not end it")
    }
}

/// The status a shell would report: the code, or 128 + the signal.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(u8::MAX),
        (None, Some(signal)) => SIGNALLED.saturating_add(u8::try_from(signal).unwrap_or(0)),
        (None, None) => u8::MAX,
    }
}
