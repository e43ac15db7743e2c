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
//! inodes): neither tool's probe traps in the other's target. Each tool is
//! pinned to its target's CPU, so a tool's own work (cacheloop's readings,
//! its custody helper) is charged to its own target, not to the other.

use std::{
    fs,
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{SETTLE_SECONDS, Target, stop, tools::Setup, tools::Tool};

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
    let copy = copy_of(&setup.target)?;
    let theirs = Setup {
        cacheloop: setup.cacheloop.clone(),
        chroot: setup.chroot.clone(),
        target: copy.clone(),
    };
    let mut ratios = Vec::new();
    for round in 0..2 * pairs {
        let (ours_cpu, their_cpu) = if round % 2 == 0 { (0, 1) } else { (1, 0) };
        ratios.push(round_ratio(setup, ours_cpu, &theirs, their_cpu)?);
    }
    let _ = fs::remove_file(&copy);
    Ok(ratios
        .chunks(2)
        .map(|pair| (pair[0] * pair[1]).sqrt())
        .collect())
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
        let extra: &[&str] = match tool {
            Tool::Cacheloop => &["--max-overhead", "100"],
            _ => &[],
        };
        pinned(
            setup.command(tool, "bench_hot", pid, None, false, extra),
            cpu,
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", tool.name()))
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
    stop(cacheloop);
    stop(bpftrace);
    drop((a, b));
    let rate = |seconds: thread::JoinHandle<Vec<(Instant, f64)>>| -> Result<f64, String> {
        let seconds = seconds.join().map_err(|_| "a target's reader panicked")?;
        let calls: Vec<f64> = seconds
            .iter()
            .filter(|(end, _)| *end <= to && end.checked_sub(Duration::from_secs(1)) >= Some(from))
            .map(|&(_, calls)| calls)
            .collect();
        let rate = calls.iter().sum::<f64>() / calls.len() as f64;
        rate.is_finite()
            .then_some(rate)
            .ok_or_else(|| "a side-by-side target printed no rates".to_owned())
    };
    Ok(rate(a_seconds)? / rate(b_seconds)?)
}

/// The bench target flat out on one CPU.
fn start_pinned(
    path: &Path,
    cpu: u32,
) -> Result<(Target, std::io::BufReader<std::process::ChildStdout>), String> {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(cpu.to_string())
        .arg(path)
        .args(["hot", "120"]);
    Target::spawn(cmd)
}

/// Each second's calls as the target says them, stamped on arrival, until
/// it ends.
fn stamp(
    out: std::io::BufReader<std::process::ChildStdout>,
) -> thread::JoinHandle<Vec<(Instant, f64)>> {
    thread::spawn(move || {
        out.lines()
            .map_while(Result::ok)
            .filter_map(|line| {
                let calls = line.split_whitespace().nth(2)?.parse::<f64>().ok()?;
                Some((Instant::now(), calls))
            })
            .collect()
    })
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

/// A second copy of the target file beside it (another inode), for
/// bpftrace: it probes files, not processes.
fn copy_of(target: &Path) -> Result<PathBuf, String> {
    let mut name = target.file_name().unwrap_or_default().to_owned();
    name.push("_side");
    let copy = target.with_file_name(name);
    fs::copy(target, &copy).map_err(|e| format!("cannot copy {}: {e}", target.display()))?;
    Ok(copy)
}
