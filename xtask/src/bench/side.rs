//! The per-hit row, measured side by side: cacheloop and bpftrace 0.23 each
//! count the hot function of a target of their own, at the same time, each
//! target on a CPU of its own with its tool pinned beside it.
//!
//! Taking turns on one target (the throughput table) compares seconds a
//! few seconds apart, and on this VM a flat-out target's probed rate moves
//! by up to a sixth from one turn to the next with no tool changed: the
//! rounds' ratios spread from 0.82x to 1.16x. Side by side, both targets
//! see the same moment of the machine. What is left is the CPUs
//! themselves (one of two vCPUs ran a probed target ~10% faster than the
//! other by hand, steadily, whichever tool probed it), so every pair of
//! rounds swaps them, and a pair's ratio is the geometric mean of its two
//! rounds': a CPU's speed cancels out.
//!
//! bpftrace probes the file, so the two targets run two copies of it (two
//! inodes): neither tool's probe traps in the other's target; every other
//! pair swaps the copies too. Each tool is pinned to its target's CPU, so
//! a tool's own work (cacheloop's readings four times a second, its custody
//! helper, which inherits the pinning) is charged to its own target, not
//! to the other: bpftrace's `count()` does next to nothing in userspace,
//! and cacheloop's share is in its ratio. The seconds counted start once
//! both tools said they attached, and a round whose tool exited meanwhile
//! fails.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use super::{SETTLE_SECONDS, Target, mean_rate, stamp, stop, tools::Setup, tools::Tool};

/// Seconds each round counts, after [`SETTLE_SECONDS`].
pub const COUNTED_SECONDS: u64 = 8;

/// Each pair's cacheloop calls/s over bpftrace 0.23's (the geometric mean
/// of its two rounds'), for `pairs` pairs; empty without bpftrace 0.23 or
/// without two CPUs to run the targets on.
pub fn per_hit(setup: &Setup, pairs: usize) -> Result<Vec<f64>, String> {
    if setup.chroot.is_none() || !two_cpus() {
        eprintln!("xtask: per hit side by side needs bpftrace 0.23 and two CPUs; skipped");
        return Ok(Vec::new());
    }
    let copy = Copy::of(&setup.target)?;
    let with = |target: &Path| Setup {
        cacheloop: setup.cacheloop.clone(),
        chroot: setup.chroot.clone(),
        target: target.to_owned(),
    };
    let (original, copied) = (with(&setup.target), with(&copy.0));
    let mut ratios = Vec::new();
    for round in 0..2 * pairs {
        // CPUs swapped every round, files every pair.
        let (ours_cpu, their_cpu) = if round % 2 == 0 { (0, 1) } else { (1, 0) };
        let (ours, theirs) = if round / 2 % 2 == 0 {
            (&original, &copied)
        } else {
            (&copied, &original)
        };
        ratios.push(round_ratio(ours, ours_cpu, theirs, their_cpu)?);
    }
    Ok(ratios
        .chunks(2)
        .map(|pair| (pair[0] * pair[1]).sqrt())
        .collect())
}

/// A copy of the target file beside it (another inode), removed when
/// dropped.
struct Copy(PathBuf);

impl Copy {
    fn of(target: &Path) -> Result<Self, String> {
        let mut name = target.file_name().unwrap_or_default().to_owned();
        name.push("_side");
        let copy = target.with_file_name(name);
        // A copy left by an interrupted run may still be running: replaced,
        // not written over.
        let _ = fs::remove_file(&copy);
        fs::copy(target, &copy).map_err(|e| format!("cannot copy {}: {e}", target.display()))?;
        Ok(Self(copy))
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// One round: both targets and both tools started, counted for
/// [`COUNTED_SECONDS`] after [`SETTLE_SECONDS`]; cacheloop's target's
/// calls/s over bpftrace's.
fn round_ratio(ours: &Setup, ours_cpu: u32, theirs: &Setup, their_cpu: u32) -> Result<f64, String> {
    let (a, a_out) = start_pinned(&ours.target, ours_cpu)?;
    let (b, b_out) = start_pinned(&theirs.target, their_cpu)?;
    let a_seconds = stamp(a_out);
    let b_seconds = stamp(b_out);
    let spawn = |setup: &Setup, tool: Tool, pid: u32, cpu: u32| {
        // bpftrace takes no such flag: it counts every hit anyway.
        let (extra, ready): (&[&str], _) = match tool {
            Tool::Cacheloop => (&["--max-overhead", "100"], "\"type\":\"attached\""),
            _ => (&[], "Attaching"),
        };
        let cmd = pinned(
            setup.command(tool, "bench_hot", pid, None, false, extra),
            cpu,
        );
        start_ready(cmd, tool.name(), ready)
    };
    let cacheloop = spawn(ours, Tool::Cacheloop, a.1, ours_cpu)?;
    let bpftrace = match spawn(theirs, Tool::Bpftrace23, b.1, their_cpu) {
        Ok(b) => b,
        Err(e) => {
            stop(cacheloop);
            return Err(e);
        }
    };
    thread::sleep(Duration::from_secs_f64(SETTLE_SECONDS));
    let from = Instant::now();
    thread::sleep(Duration::from_secs(COUNTED_SECONDS));
    let to = Instant::now();
    let mut tools = [cacheloop, bpftrace];
    let ended: Vec<&str> = tools
        .iter_mut()
        .zip([Tool::Cacheloop, Tool::Bpftrace23])
        .filter_map(|(t, tool)| (!matches!(t.try_wait(), Ok(None))).then(|| tool.name()))
        .collect();
    let [cacheloop, bpftrace] = tools;
    stop(cacheloop);
    stop(bpftrace);
    drop((a, b));
    if !ended.is_empty() {
        return Err(format!("{} exited while counting", ended.join(" and ")));
    }
    let rate = |seconds: thread::JoinHandle<Vec<(Instant, f64)>>| -> Result<f64, String> {
        let seconds = seconds.join().map_err(|_| "a target's reader panicked")?;
        mean_rate(&seconds, from, to)
            .ok_or_else(|| "a side-by-side target printed no rates".to_owned())
    };
    Ok(rate(a_seconds)? / rate(b_seconds)?)
}

/// The bench target flat out on one CPU.
fn start_pinned(
    path: &Path,
    cpu: u32,
) -> Result<(Target, BufReader<std::process::ChildStdout>), String> {
    let mut cmd = Command::new(path);
    cmd.args(["hot", "120"]);
    Target::spawn(pinned(cmd, cpu))
}

/// `cmd` started, once it says `ready` on stdout (its stdout read to the
/// end on a thread of its own); stopped, and an error, when it does not
/// within a minute or exits first.
fn start_ready(mut cmd: Command, name: &str, ready: &'static str) -> Result<Child, String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let (said, heard) = mpsc::channel();
    thread::spawn(move || {
        let mut said = Some(said);
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains(ready)
                && let Some(said) = said.take()
            {
                let _ = said.send(());
            }
        }
    });
    match heard.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => Ok(child),
        Err(_) => {
            stop(child);
            Err(format!("{name} did not attach"))
        }
    }
}

/// `cmd` run under `taskset -c CPU`: the same program, arguments and
/// environment, on that CPU alone.
fn pinned(cmd: Command, cpu: u32) -> Command {
    let mut out = Command::new("taskset");
    out.arg("-c").arg(cpu.to_string()).arg(cmd.get_program());
    out.args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => out.env(key, v),
            None => out.env_remove(key),
        };
    }
    out
}

/// CPUs 0 and 1 are both ours to run on.
fn two_cpus() -> bool {
    let ok = |cpu: &str| {
        Command::new("taskset")
            .args(["-c", cpu, "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ok("0") && ok("1")
}
