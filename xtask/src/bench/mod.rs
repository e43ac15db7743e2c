//! `cargo xtask bench`: cacheloop side by side with bpftrace, written to
//! BENCHMARKS.md.
//!
//!     cargo xtask bench [--runs N]
//!     cargo xtask bench --soak DURATION    # 10m, 1h: the soak alone
//!
//! One run measures, for cacheloop (release build; `--pid` and `--binary`),
//! Debian 12's bpftrace 0.17 and trixie's bpftrace 0.23 on the same static
//! target file: the whole-process time to attach, count for 1 s, detach and
//! exit with 1, 100, 1000 and 10,000 functions, and its peak RSS; the
//! target's throughput while its hot function is probed (and under
//! `--max-overhead 5`), in at least 6 rounds on one target process where
//! each tool takes its turn (every other round in reverse order), so that
//! ratios compare seconds a few seconds apart, with each
//! tool's eBPF program time per hit from the kernel's own statistics
//! (`kernel.bpf_stats_enabled`, on for those runs only); the loader's CPU
//! with 1000 functions all called, at the default 1 s interval; cacheloop's
//! detection latency on the demo (structural) and on a rate-only runaway.
//! Medians of `--runs` runs (3); bpftrace 0.17 with 1000 functions takes
//! about two minutes a run and runs once, and is left out at 10,000 and of
//! the CPU run. Ratios are cacheloop's over bpftrace's. Nothing here is a
//! test: the machine is shared and noisy.
//!
//! `--per-hit` runs only the side-by-side per-hit rounds (module `side`,
//! `--runs` pairs, at least 4) and prints their ratios; BENCHMARKS.md is
//! left as it is.
//!
//! `--interpreters` runs only the interpreters' section (module `interp`:
//! what counting a PHP or Ruby function costs the interpreter), which a
//! plain run measures too.
//!
//! `--soak DURATION` runs the soak instead (module `soak`): cacheloop
//! attached to the demo for that long while loops come and go, its RSS, fds
//! and CPU over time, every loop caught and every recovery reported. It
//! writes the "Soak" section of BENCHMARKS.md, which a plain run keeps, and
//! fails on a missed loop or recovery or on growing fds.

mod interp;
mod side;
mod soak;
mod target;
mod tools;

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::cmd;
use tools::{Chroot, Setup, Tool};

/// Seconds each case has the hot target in a throughput round, and the
/// first seconds of them not counted (attaching; the governor's first
/// windows).
const PHASE_SECONDS: u32 = 8;
const SETTLE_SECONDS: f64 = 3.0;
/// Throughput rounds at least (the governor's spread is a goal), rounded
/// up to an even count (half of them in reverse order).
const GOVERNED_RUNS: usize = 5;
/// Pairs of side-by-side per-hit rounds (`side.rs`).
const SIDE_PAIRS: usize = 4;
/// Throughput rows, named as the goals look them up.
const CACHELOOP_ALL_HITS: &str = "cacheloop --max-overhead 100";
const CACHELOOP_GOVERNED: &str = "cacheloop --max-overhead 5";
const CPU_RATE: u32 = 10_000;
/// Functions called in the CPU run (all of them, round robin).
const CPU_FUNCTIONS: usize = 1000;

pub fn run(args: &[String]) -> Result<(), String> {
    let mut runs = 3;
    let mut soak = None;
    let mut interpreters_only = false;
    let mut per_hit_only = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n: &usize| n > 0)
                    .ok_or("--runs takes a number above 0")?;
            }
            "--interpreters" => interpreters_only = true,
            "--per-hit" => per_hit_only = true,
            "--soak" => {
                let d = args.next().ok_or("--soak takes a duration (10m, 1h)")?;
                soak = Some(soak::parse_duration(d)?);
            }
            other => {
                return Err(format!(
                    "bench: unknown argument '{other}'; usage: cargo xtask bench [--runs N] [--interpreters | --per-hit | --soak DURATION]"
                ));
            }
        }
    }
    let root = cmd::root();
    let dir = root.join("target/bench");
    cmd::run(cmd::cargo(&[
        "build",
        "--release",
        "--target",
        crate::setup::TARGET,
        "--bins",
    ]))?;
    let release = root
        .join("target")
        .join(crate::setup::TARGET)
        .join("release");
    if let Some(duration) = soak {
        return soak::run(&root, &release, duration);
    }
    let out = root.join("BENCHMARKS.md");
    if interpreters_only {
        let section = interp::run(&release.join("cacheloop"), &dir, runs)?;
        let old = fs::read_to_string(&out).unwrap_or_default();
        fs::write(
            &out,
            soak::replace_section_of(&old, &section, interp::HEADING),
        )
        .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        println!("{section}");
        return Ok(());
    }

    let chroot = match Chroot::prepare(&dir) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("xtask: no bpftrace 0.23 ({e}); its columns stay empty");
            None
        }
    };
    let target_dir = match &chroot {
        Some(c) => c.root.join("bench"),
        None => dir.clone(),
    };
    let setup = Setup {
        cacheloop: release.join("cacheloop"),
        chroot: chroot.as_ref().map(|c| c.root.clone()),
        target: target::build(&target_dir)?,
    };
    if per_hit_only {
        let pairs = side::per_hit(&setup, runs.max(SIDE_PAIRS))?;
        if pairs.is_empty() {
            return Err("nothing measured side by side".to_owned());
        }
        let mut sorted = pairs.clone();
        println!(
            "per hit, side by side, cacheloop over bpftrace 0.23, each pair: {} (median {:.3}x)",
            pairs
                .iter()
                .map(|r| format!("{r:.3}x"))
                .collect::<Vec<_>>()
                .join(" "),
            median(&mut sorted)
        );
        return Ok(());
    }
    let mut tools = vec![Tool::Cacheloop, Tool::CacheloopBinary, Tool::Bpftrace17];
    if chroot.is_some() {
        tools.push(Tool::Bpftrace23);
    }
    let mut report = Report::default();
    report.versions.push((
        "bpftrace 0.17",
        tools::version(Command::new("bpftrace").arg("--version")),
    ));
    if let Some(c) = &chroot {
        report.versions.push(("bpftrace 0.23", c.version()));
    }

    for (count, glob) in target::GLOBS {
        for &tool in &tools {
            let n = match (tool, count) {
                // One perf link per probe: two minutes a run at 1000,
                // twenty at 10,000.
                (Tool::Bpftrace17, 10_000) => continue,
                (Tool::Bpftrace17, 1000) => 1,
                _ => runs,
            };
            let mut times = Vec::new();
            let mut rss = Vec::new();
            for _ in 0..n {
                eprintln!("xtask: bench {} with {count} function(s)", tool.name());
                let m = attach_count_detach(&setup, tool, glob)?;
                times.push(m.seconds);
                rss.push(m.peak_rss_mib);
                if let (Tool::Cacheloop, Some(d)) = (tool, m.detach_seconds) {
                    report.detach.push((count, d));
                }
            }
            report.attach.push((count, tool, median(&mut times), n));
            report.rss.push((count, tool, median(&mut rss)));
        }
    }

    eprintln!("xtask: bench target throughput");
    let stats = BpfStats::enable();
    // Unprobed and cacheloop at 5% side by side (what a flat-out target
    // keeps), then cacheloop with the governor off and the bpftraces (the
    // per-hit cost), in rounds on one target.
    type Case<'a> = (String, Option<(Tool, &'a [&'a str])>);
    let mut cases: Vec<Case> = vec![
        ("unprobed".to_owned(), None),
        (
            CACHELOOP_GOVERNED.to_owned(),
            Some((Tool::Cacheloop, &["--max-overhead", "5"])),
        ),
        (
            CACHELOOP_ALL_HITS.to_owned(),
            Some((Tool::Cacheloop, &["--max-overhead", "100"])),
        ),
    ];
    cases.extend(
        tools
            .iter()
            .filter(|t| matches!(t, Tool::Bpftrace23 | Tool::Bpftrace17))
            .rev()
            .map(|&t| (t.name().to_owned(), Some((t, &[][..])))),
    );
    // Even: as many rounds in each order.
    let rounds = runs.max(GOVERNED_RUNS).next_multiple_of(2);
    let probes: Vec<_> = cases.iter().map(|c| c.1).collect();
    let measured = throughput_rounds(&setup, &probes, rounds)?;
    let column = |label: &str| {
        let i = cases.iter().position(|c| c.0 == label)?;
        Some(
            measured
                .iter()
                .map(|round| round[i].rate)
                .collect::<Vec<_>>(),
        )
    };
    // Each round's ratio of two cases: seconds apart in one process.
    let paired = |a: &str, b: &str| -> Vec<f64> {
        match (column(a), column(b)) {
            (Some(a), Some(b)) => a.iter().zip(&b).map(|(a, b)| a / b).collect(),
            _ => Vec::new(),
        }
    };
    for (i, (label, _)) in cases.iter().enumerate() {
        let mut rates: Vec<f64> = measured.iter().map(|r| r[i].rate).collect();
        let mut ns: Vec<f64> = measured.iter().filter_map(|r| r[i].ns_per_hit).collect();
        report.throughput.push(Throughput {
            label: label.clone(),
            rate: median(&mut rates),
            of_unprobed: median(&mut paired(label, "unprobed")),
            ns_per_hit: (!ns.is_empty()).then(|| median(&mut ns)),
        });
    }
    report.rounds = rounds;
    report.governed = paired(CACHELOOP_GOVERNED, "unprobed");
    report.per_hit_turns = paired(CACHELOOP_ALL_HITS, Tool::Bpftrace23.name());
    report.bpf_stats = stats.on();
    drop(stats);

    eprintln!("xtask: bench per hit, side by side");
    // Without it the goal falls back to the turns' ratios.
    report.per_hit = side::per_hit(&setup, SIDE_PAIRS).unwrap_or_else(|e| {
        eprintln!("xtask: per hit side by side failed ({e}); the turns' ratios stand in");
        Vec::new()
    });

    eprintln!("xtask: bench loader CPU");
    for &tool in &tools {
        if tool == Tool::Bpftrace17 || tool == Tool::CacheloopBinary {
            continue;
        }
        let mut cpu: Vec<f64> = (0..runs)
            .map(|_| loader_cpu(&setup, tool, &[]))
            .collect::<Result<_, _>>()?;
        report.cpu.push((tool, median(&mut cpu)));
    }
    // Every hit counted, as bpftrace counts them: no probe windows.
    let mut cpu: Vec<f64> = (0..runs)
        .map(|_| loader_cpu(&setup, Tool::Cacheloop, &["--max-overhead", "100"]))
        .collect::<Result<_, _>>()?;
    report.cpu_all_hits = Some(median(&mut cpu));

    eprintln!("xtask: bench detection latency on the demo");
    let mut latency: Vec<f64> = (0..runs)
        .map(|_| crate::demo::replay(&release, true))
        .collect::<Result<_, _>>()?;
    report.latency = median(&mut latency);
    eprintln!("xtask: bench detection latency of a rate-only runaway");
    let mut rate_only: Vec<f64> = (0..runs)
        .map(|_| runaway_latency(&release))
        .collect::<Result<_, _>>()?;
    report.rate_only_latency = median(&mut rate_only);

    eprintln!("xtask: bench interpreters");
    let interpreters = interp::run(&release.join("cacheloop"), &dir, runs)?;

    drop(chroot);
    let text = report.markdown(runs);
    // The soak's section comes from its own runs: keep it.
    let old = fs::read_to_string(&out).unwrap_or_default();
    let text = soak::replace_section_of(
        &soak::keep_section(&text, &old),
        &interpreters,
        interp::HEADING,
    );
    fs::write(&out, &text).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    println!("{text}");
    Ok(())
}

struct Measured {
    seconds: f64,
    peak_rss_mib: f64,
    detach_seconds: Option<f64>,
}

/// A target of ours, stopped by its pid when dropped.
struct Target(Child, u32);

impl Target {
    fn start(
        path: &Path,
        args: &[&str],
    ) -> Result<(Self, BufReader<std::process::ChildStdout>), String> {
        let mut cmd = Command::new(path);
        cmd.args(args);
        Self::spawn(cmd)
    }

    /// The target as `cmd` runs it (which ends in exec'ing it), once it
    /// has said it is ready.
    fn spawn(mut cmd: Command) -> Result<(Self, BufReader<std::process::ChildStdout>), String> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
        let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        out.read_line(&mut line).map_err(|e| e.to_string())?;
        let pid = child.id();
        Ok((Self(child, pid), out))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops a tool we started, by its pid, the way a user would (SIGINT), and
/// waits for it to detach.
fn stop(mut tool: Child) {
    let _ = Command::new("kill")
        .args(["-INT", &tool.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = tool.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = tool.kill();
    let _ = tool.wait();
}

/// Attach, count for 1 s, detach and exit: wall time and peak RSS from GNU
/// time, and cacheloop's own detach time.
fn attach_count_detach(setup: &Setup, tool: Tool, glob: &str) -> Result<Measured, String> {
    let (target, _out) = Target::start(&setup.target, &["idle", "100000"])?;
    let inner = setup.command(tool, glob, target.1, Some(1), false, &[]);
    let stats = std::env::temp_dir().join(format!("cacheloop-bench-{}", std::process::id()));
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%e %M", "-o"])
        .arg(&stats)
        .arg(inner.get_program())
        .args(inner.get_args())
        .envs(inner.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run /usr/bin/time: {e}"))?;
    drop(target);
    let text = fs::read_to_string(&stats).unwrap_or_default();
    let _ = fs::remove_file(&stats);
    let last = text.lines().last().unwrap_or_default();
    let mut fields = last.split_whitespace().map(|f| f.parse::<f64>().ok());
    let (Some(Some(seconds)), Some(Some(kib))) = (fields.next(), fields.next()) else {
        return Err(format!("{} gave no timing ({text:?})", tool.name()));
    };
    if !out.status.success() {
        // bpftrace 0.17 exits 1 after 1000 probes: it tries to clear
        // uprobe_events in tracefs, which is not mounted here; its probes
        // are perf links and are gone anyway. Timed all the same.
        if tool == Tool::Cacheloop {
            return Err(format!("{} failed: {}", tool.name(), out.status));
        }
        eprintln!("xtask: {} exited with {}", tool.name(), out.status);
    }
    let detach_seconds = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("\"type\":\"detached\""))
        .and_then(|l| {
            let at = l.find("\"detach_seconds\":")? + "\"detach_seconds\":".len();
            l[at..].split([',', '}']).next()?.parse().ok()
        });
    Ok(Measured {
        seconds,
        peak_rss_mib: kib / 1024.0,
        detach_seconds,
    })
}

/// One tool's turn at the hot target in a throughput round.
struct Phase {
    /// The target's calls/s over the phase's steady seconds.
    rate: f64,
    /// The tool's eBPF program time per hit (with `BpfStats` on).
    ns_per_hit: Option<f64>,
}

/// Rounds of phases on one hot target: in each round every case in turn
/// probes it (or leaves it alone) for [`PHASE_SECONDS`], so each ratio
/// compares seconds a few seconds apart in one process. Separate targets
/// minutes apart differed by more than the tools do: the process's
/// placement on this VM's CPUs and the machine's load drift.
/// Returns, per round, each case's phase.
fn throughput_rounds(
    setup: &Setup,
    cases: &[Option<(Tool, &[&str])>],
    rounds: usize,
) -> Result<Vec<Vec<Phase>>, String> {
    // Longer than any section (a tool's attach and detach take seconds
    // more than its turn); stopped by its pid when dropped.
    let (target, out) = Target::start(&setup.target, &["hot", "36000"])?;
    let reader = stamp(out);
    let mut spans = Vec::new();
    for round in 0..rounds {
        // Every other round in reverse: the machine drifts within a round
        // too, and a case always just after another would carry its share
        // of that drift into their ratio.
        let mut order: Vec<usize> = (0..cases.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for case in order {
            let probe = &cases[case];
            let started = Instant::now();
            let tool = match probe {
                Some((tool, extra)) => Some(
                    setup
                        .command(*tool, "bench_hot", target.1, None, false, extra)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .map_err(|e| format!("cannot start {}: {e}", tool.name()))?,
                ),
                None => None,
            };
            thread::sleep(Duration::from_secs(u64::from(PHASE_SECONDS) - 1));
            let ns = tool.as_ref().and_then(|t| program_ns_per_hit(t.id()));
            thread::sleep(Duration::from_secs(1));
            spans.push((round, case, started, Instant::now(), ns));
            if let Some(tool) = tool {
                stop(tool);
            }
        }
    }
    drop(target);
    let seconds = reader
        .join()
        .map_err(|_| "the bench target's reader panicked")?;
    let mut by_round: Vec<Vec<Option<Phase>>> = (0..rounds)
        .map(|_| (0..cases.len()).map(|_| None).collect())
        .collect();
    for (round, case, from, to, ns_per_hit) in spans {
        let steady = from + Duration::from_secs_f64(SETTLE_SECONDS);
        let rate = mean_rate(&seconds, steady, to)
            .ok_or("the bench target printed no rates in a phase")?;
        by_round[round][case] = Some(Phase { rate, ns_per_hit });
    }
    Ok(by_round
        .into_iter()
        .map(|round| {
            round
                .into_iter()
                .map(|p| p.expect("every case takes a turn in every round"))
                .collect()
        })
        .collect())
}

/// The bench target's seconds (`second N CALLS` as each ends), stamped on
/// arrival, until it ends.
fn stamp(out: BufReader<std::process::ChildStdout>) -> thread::JoinHandle<Vec<(Instant, f64)>> {
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

/// The mean calls/s of the whole seconds [`stamp`]ed between `from` and
/// `to`; None when there are none. The mean: each second's count is
/// rounded to 1000 calls.
fn mean_rate(seconds: &[(Instant, f64)], from: Instant, to: Instant) -> Option<f64> {
    let calls: Vec<f64> = seconds
        .iter()
        .filter(|(end, _)| *end <= to && end.checked_sub(Duration::from_secs(1)) >= Some(from))
        .map(|&(_, calls)| calls)
        .collect();
    let rate = calls.iter().sum::<f64>() / calls.len() as f64;
    rate.is_finite().then_some(rate)
}

/// `kernel.bpf_stats_enabled` on while this lives (the kernel then times
/// every eBPF program run, which costs each run two clock reads), and back
/// to what it was after.
struct BpfStats(Option<String>);

const BPF_STATS_KNOB: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Self {
        let old = fs::read_to_string(BPF_STATS_KNOB).ok();
        match fs::write(BPF_STATS_KNOB, "1") {
            Ok(()) => Self(old),
            Err(e) => {
                eprintln!("xtask: no eBPF program statistics ({BPF_STATS_KNOB}: {e})");
                Self(None)
            }
        }
    }

    fn on(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = fs::write(BPF_STATS_KNOB, old.trim());
        }
    }
}

/// Nanoseconds per run of the eBPF programs process `pid` holds, over
/// their runs so far, from the kernel's statistics in /proc/PID/fdinfo.
fn program_ns_per_hit(pid: u32) -> Option<f64> {
    let mut time = 0u64;
    let mut runs = 0u64;
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?.flatten() {
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(t), Some(c)) = (field("run_time_ns:"), field("run_cnt:")) {
            time += t;
            runs += c;
        }
    }
    (runs > 0).then(|| time as f64 / runs as f64)
}

/// The tool's CPU (percent of one core) over 10 s of counting
/// [`CPU_FUNCTIONS`] functions called [`CPU_RATE`] times a second in all
/// (each of them called), after a 3 s start.
fn loader_cpu(setup: &Setup, tool: Tool, extra: &[&str]) -> Result<f64, String> {
    let (target, _out) = Target::start(
        &setup.target,
        &[
            "calls",
            &CPU_RATE.to_string(),
            "30",
            &CPU_FUNCTIONS.to_string(),
        ],
    )?;
    let glob = target::GLOBS
        .iter()
        .find(|g| g.0 == CPU_FUNCTIONS)
        .map_or("bench_fn_*", |g| g.1);
    let child = setup
        .command(tool, glob, target.1, None, true, extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", tool.name()))?;
    let pid = child.id();
    thread::sleep(Duration::from_secs(3));
    let before = cpu_ns(pid);
    let started = Instant::now();
    thread::sleep(Duration::from_secs(10));
    let after = cpu_ns(pid);
    let wall = started.elapsed().as_secs_f64();
    stop(child);
    drop(target);
    match (before, after) {
        (Some(b), Some(a)) => Ok(a.saturating_sub(b) as f64 / 1e9 / wall * 100.0),
        _ => Err(format!("{} exited early", tool.name())),
    }
}

/// CPU time of a process and the processes it started (cacheloop's
/// custody helper closes the probe links, and the kernel takes the
/// breakpoints out in its time), all their threads, in nanoseconds: the
/// scheduler's own account (/proc/PID/task/*/schedstat), finer than clock
/// ticks, which would round 0.1% of a core over 10 s to one tick.
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = None;
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let ns = fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
        if let Some(ns) = ns {
            total = Some(total.unwrap_or(0) + ns);
        }
        let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            if let Some(ns) = cpu_ns(child) {
                total = Some(total.unwrap_or(0) + ns);
            }
        }
    }
    total
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Seconds from a rate-only runaway's start (the fixture's own clock) to
/// cacheloop's loop record, at default settings.
fn runaway_latency(release: &Path) -> Result<f64, String> {
    let mut fixture = Command::new(release.join("fixture"))
        .args(["200:6", "max:20"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the fixture: {e}"))?;
    let mut lines = BufReader::new(fixture.stdout.take().ok_or("fixture stdout")?).lines();
    let ready = lines.next().and_then(Result::ok).unwrap_or_default();
    let pid = ready
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let watch = Command::new(release.join("cacheloop"))
        .args(["watch", "--pid", &pid, "--func", "cache_invalidate"])
        .args(["--fail-on-loop", "--json", "--duration", "30s"])
        .output();
    let start = lines
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("phase 1 start ").map(str::to_owned));
    // Ours, by its pid.
    let _ = fixture.kill();
    let _ = fixture.wait();
    let watch = watch.map_err(|e| format!("cannot run cacheloop: {e}"))?;
    let start: f64 = start
        .and_then(|s| s.trim().parse().ok())
        .ok_or("the fixture never began its runaway")?;
    let stdout = String::from_utf8_lossy(&watch.stdout);
    let loop_ts = stdout
        .lines()
        .find(|l| l.starts_with("{\"type\":\"loop\""))
        .and_then(|l| l.split("\"ts\":").nth(1))
        .and_then(|t| t.split(',').next())
        .and_then(|t| t.parse::<f64>().ok())
        .ok_or_else(|| format!("no loop record: {stdout}"))?;
    Ok(loop_ts - start)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[derive(Default)]
struct Report {
    versions: Vec<(&'static str, String)>,
    /// (functions, tool, median seconds, runs)
    attach: Vec<(usize, Tool, f64, usize)>,
    rss: Vec<(usize, Tool, f64)>,
    /// (functions, cacheloop --pid's detach seconds)
    detach: Vec<(usize, f64)>,
    throughput: Vec<Throughput>,
    /// Throughput rounds.
    rounds: usize,
    /// Each round's governed calls/s over its unprobed calls/s.
    governed: Vec<f64>,
    /// Each round's calls/s under cacheloop (every hit) over bpftrace
    /// 0.23's, taking turns on one target.
    per_hit_turns: Vec<f64>,
    /// The same side by side, each pair of rounds' (`side.rs`).
    per_hit: Vec<f64>,
    /// The kernel's eBPF statistics were on for the throughput runs.
    bpf_stats: bool,
    cpu: Vec<(Tool, f64)>,
    /// cacheloop's with `--max-overhead 100`.
    cpu_all_hits: Option<f64>,
    latency: f64,
    rate_only_latency: f64,
}

struct Throughput {
    label: String,
    /// Median calls/s over the rounds.
    rate: f64,
    /// Median over the rounds of calls/s over the round's unprobed calls/s.
    of_unprobed: f64,
    ns_per_hit: Option<f64>,
}

/// The tools with a ratio column, each over bpftrace 0.23.
const OURS: [Tool; 2] = [Tool::Cacheloop, Tool::CacheloopBinary];

impl Report {
    fn get<T: Copy>(rows: &[(usize, Tool, T)], count: usize, tool: Tool) -> Option<T> {
        rows.iter()
            .find(|r| r.0 == count && r.1 == tool)
            .map(|r| r.2)
    }

    /// One table: a row per function count, a column per tool, then
    /// `ratio(ours, bpftrace 0.23's)` for each of [`OURS`].
    fn table(
        md: &mut String,
        tools: &[Tool],
        rows: &[(usize, Tool, f64)],
        unit: &str,
        ratio_title: &str,
        ratio: impl Fn(f64, f64) -> f64,
    ) {
        let mut header = "| functions |".to_owned();
        let mut rule = "|---:|".to_owned();
        for t in tools {
            header.push_str(&format!(" {} |", t.name()));
            rule.push_str("---:|");
        }
        for t in OURS {
            header.push_str(&format!(" {ratio_title}: {} / bpftrace 0.23 |", t.name()));
            rule.push_str("---:|");
        }
        let _ = writeln!(md, "{header}\n{rule}");
        for (count, _) in target::GLOBS {
            let mut line = format!("| {count} |");
            for &t in tools {
                match Self::get(rows, count, t) {
                    Some(v) => line.push_str(&format!(" {v:.2} {unit} |")),
                    None => line.push_str(" - |"),
                }
            }
            for t in OURS {
                match (
                    Self::get(rows, count, t),
                    Self::get(rows, count, Tool::Bpftrace23),
                ) {
                    (Some(a), Some(b)) => line.push_str(&format!(" {:.3}x |", ratio(a, b))),
                    _ => line.push_str(" - |"),
                }
            }
            let _ = writeln!(md, "{line}");
        }
        let _ = writeln!(md);
    }

    fn markdown(&self, runs: usize) -> String {
        let mut md = String::new();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let cpus = thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let _ = writeln!(md, "# Benchmarks\n");
        let _ = writeln!(
            md,
            "Written by `cargo xtask bench` (medians of {runs} runs; bpftrace 0.17 with 1000 functions: one run, \
             with 10,000: not run). Kernel {}, {cpus} CPUs, a shared virtual machine: read the ratios, not the \
             absolute numbers.\n",
            kernel.trim()
        );
        for (name, version) in &self.versions {
            let _ = writeln!(md, "- {name}: `{version}`");
        }
        let _ = writeln!(
            md,
            "- cacheloop: release build, static (musl); `cacheloop` is `watch --pid`, `cacheloop --binary` is \
             `watch --binary` (every process running the file, as bpftrace probes)\n"
        );

        let tools: Vec<Tool> = [
            Tool::Cacheloop,
            Tool::CacheloopBinary,
            Tool::Bpftrace17,
            Tool::Bpftrace23,
        ]
        .into_iter()
        .filter(|&t| self.attach.iter().any(|r| r.1 == t))
        .collect();
        let attach: Vec<(usize, Tool, f64)> = self.attach.iter().map(|r| (r.0, r.1, r.2)).collect();
        let beyond = |t: f64| (t - 1.0).max(0.001);
        let _ = writeln!(
            md,
            "## Attach, count for 1 s, detach and exit (whole process, seconds)\n\n\
             The ratios compare the time beyond the 1 s counting window: attaching, detaching and \
             exiting.\n"
        );
        Self::table(
            &mut md,
            &tools,
            &attach,
            "s",
            "beyond the window",
            |a, b| beyond(a) / beyond(b),
        );
        let _ = writeln!(
            md,
            "Where the time goes (`strace -f -T` on cacheloop, written down when this table was \
             extended): the kernel's verifier took 130-160 ms over the program that reads keys (its \
             bounded string-hashing loops) and 3.5 ms over the one that only counts, so the key-reading \
             program is loaded only when some function has a key to read (`--key-arg`, or a preset \
             that reads keys). With `--binary` the counter hash is sized for 256k (function, process) \
             pairs; preallocated, creating it took ~0.17 s, and with `BPF_F_NO_PREALLOC` (entries \
             allocated at a pair's first hit) 1.7 ms. One `uprobe_multi` link for 1000 offsets: 5-7 ms. \
             What is left: starting, reading the target's symbol table (10,000 names, each demangled \
             to match the glob; C names are no longer run through the C++ demangler), and the \
             kernel's detach of the link at exit (~45 ms: it waits for handlers in flight).\n"
        );
        let _ = writeln!(md, "## Loader peak RSS (MiB)\n");
        Self::table(&mut md, &tools, &self.rss, "MiB", "RSS", |a, b| a / b);
        let _ = writeln!(
            md,
            "Both read the target's symbol table, here 10,000 functions, whatever the glob picks. \
             About 4 MiB of cacheloop's RSS is its own code (built with LTO, one codegen unit; \
             since this run the profiler package at opt-level \"s\": 6.4 to 5.4 MB of code). Small \
             blocks go through dlmalloc since this run (the loader's CPU, below): alone it raised \
             the peak at 10,000 functions from 8.7-8.9 to 9.0 MiB (freed blocks kept, large \
             vectors copied as they grow where musl remaps them); with blocks of 64 KiB and more \
             left to musl and the code built for size, 8.4-8.6 MiB, side by side. \
             Where the rest went at 10,000 functions (valgrind massif, strace), and what changed: \
             the detector kept a series for every (function, process) pair, called or not (~0.8 KB \
             of readings and learning each: ~8 MiB); a series that has only seen zeros now lives \
             in its process's shared quiet history until its first call. The planner published \
             the catalog by cloning it (+1.3 MiB), copied every matching symbol while planning \
             (+1.3 MiB) and held every name twice in its id map (+1.1 MiB): now one catalog, \
             changed in place until shared, indices, and ids hashed through the catalog. The \
             target's file was read whole (1.6 MiB, mostly code): now only its headers, symbol and \
             string tables, notes and debug link, into a zeroed buffer whose other pages are never \
             touched. Catalog entries share one path list per file and hold their offset and range in \
             place (four allocations each, ~1.4 MiB, before). Each name was then still held three \
             times: in the symbol table, in the catalog, and in the `attached` record's list of all \
             10,000 (that many small allocations at once); since this run they share one text \
             (9.19 MiB before, 8.78 MiB after, measured side by side). What is left at 10,000 \
             functions (heaptrack, smaps): the catalog's entries (~1.0 MiB), the symbol table kept \
             for later attaches (~0.9 MiB of entries, ~0.4 MiB of names), the counter slots' index \
             (~0.2 MiB), and the code. bpftrace links LLVM and clang.\n"
        );
        let mut detach: Vec<f64> = self
            .detach
            .iter()
            .filter(|d| d.0 == 1000)
            .map(|d| d.1)
            .collect();
        let detach_1000 = median(&mut detach);
        let _ = writeln!(
            md,
            "cacheloop's own detach of 1000 functions (its `detached` record): {detach_1000:.3} s.\n"
        );

        let _ = writeln!(md, "## Target throughput with its hot function probed\n");
        let _ = writeln!(
            md,
            "`bench_hot` called flat out by one target process, in {} rounds: in each, every row in \
             turn (in reverse order every other round) probes it (or leaves it alone) for \
             {PHASE_SECONDS} s, and its calls per second are \
             averaged over the whole seconds of the last {:.0} s of that (attaching and the governor's first windows left \
             out). Calls/s: the median over the rounds; of unprobed: the median of each round's \
             ratio to that round's unprobed seconds. Program time per hit: the eBPF program's own run \
             time over its runs, as the kernel counts it (`kernel.bpf_stats_enabled`, on for these \
             runs only{}).\n",
            self.rounds,
            f64::from(PHASE_SECONDS) - SETTLE_SECONDS,
            if self.bpf_stats {
                ""
            } else {
                "; it could not be switched on here"
            }
        );
        let _ = writeln!(
            md,
            "| probed by | calls/s | of unprobed | program time per hit |\n|---|---:|---:|---:|"
        );
        for t in &self.throughput {
            let ns = t
                .ns_per_hit
                .map_or_else(|| "-".to_owned(), |ns| format!("{ns:.0} ns"));
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.4}x | {ns} |",
                t.label, t.rate, t.of_unprobed
            );
        }
        let spread = |ratios: &[f64]| {
            let mut sorted = ratios.to_vec();
            sorted.sort_by(f64::total_cmp);
            let (lo, hi) = (sorted.first().copied()?, sorted.last().copied()?);
            Some((lo, hi, median(&mut sorted)))
        };
        let worst_governed = spread(&self.governed).map(|s| s.0);
        if let Some((lo, hi, mid)) = spread(&self.governed) {
            let _ = writeln!(
                md,
                "\nUnder `--max-overhead 5`, each round's over its unprobed seconds: {:.1}% to {:.1}% \
                 (median {:.1}%, {} rounds). The unprobed rate itself moves by up to a fifth from one \
                 turn to the next on this VM (556 to 725 million calls/s in one hand-run series), so \
                 the worst round is mostly the worst draw of that noise. Since the rounds alternate \
                 their order the worst round has read lower (76-80% in the first two runs, medians \
                 89-92%; 90.2% before; 94.1% in a third, on a machine fresh from a newer kernel \
                 whose unprobed rate held steadier): by hand, five governed turns right after an every-hit turn \
                 kept 0.95x of their unprobed neighbour on average, five right after an unprobed turn \
                 1.02x; nothing of the every-hit run lingers (the target is back to full speed within \
                 the second it exits), and what does it was not found. In the run that \
                 wrote this page the rounds spread from 80.3% to 105.3% (a governed round above \
                 its unprobed neighbour is the turns' noise, not the governor): this goal should \
                 be read side by side too, as the per-hit row is since this run (below); not \
                 done yet.",
                lo * 100.0,
                hi * 100.0,
                mid * 100.0,
                self.governed.len()
            );
        }
        if let Some((lo, hi, mid)) = spread(&self.per_hit_turns) {
            let _ = writeln!(
                md,
                "\nEvery hit counted, taking turns, each round's cacheloop over its bpftrace 0.23: \
                 {lo:.3}x to {hi:.3}x (median {mid:.3}x)."
            );
        }
        if let Some((lo, hi, mid)) = spread(&self.per_hit) {
            let _ = writeln!(
                md,
                "\nEvery hit counted, side by side (the per-hit goal): two copies of the target \
                 flat out at the same time, each on a CPU of its own with its tool pinned beside \
                 it, cacheloop on one and bpftrace 0.23 on the other, {counted} s counted \
                 after {SETTLE_SECONDS} s; every pair of rounds swaps the CPUs, and a pair's ratio \
                 is the geometric mean of its two rounds' (a CPU's own speed cancels out): \
                 {lo:.3}x to {hi:.3}x over {} pairs (median {mid:.3}x).",
                self.per_hit.len(),
                counted = side::COUNTED_SECONDS,
            );
        }
        let _ = writeln!(
            md,
            "\nThis machine is noisier than the one before it: the program times of both tools doubled (bpftrace 0.23's 47 to 83 ns) with cacheloop's eBPF program unchanged (the same instructions, compared with llvm-objdump), and taking turns the rounds' ratios spread from 0.82x to 1.16x in the last run. Why side by side since this run: by hand, the same tools in turns 7 s apart read 0.92x to 1.18x a round, side by side on one CPU pair 0.90x to 1.12x, but with the CPUs swapped the pairs came to 0.97x-1.04x: one vCPU here ran a probed target up to a tenth faster than the other, steadily, whichever tool probed it. What a pair compares is the whole cost a tool puts on the CPU its target runs on: cacheloop's readings and its custody helper run there too (bpftrace's `count()` does next to nothing in userspace), and the pairs still spread by a few percent either side of 1.0x, so the per-hit goal reads met or not met from one run to the next. \
             Per hit, the trap into the kernel and back (microseconds on this VM: the calls/s above) is \
             the cost; the eBPF program adds its own time, which includes the two clock reads the \
             statistics take (a program that only adds one to a per-CPU array measured 55-70 ns here, \
             bpftrace's as well as ours). bpftrace's `@ = count()` is that one update. cacheloop's \
             program counts in the slot the cookie names, in an array of one counter per CPU and slot \
             that the loader maps and reads in place (probes scoped to one process; a per-CPU hash \
             keyed by (function, process) cost 30-40 ns more, and stays for `--binary` probes), then looks up the function's config and gathers its evidence sampled, the \
             count before the hit (salted with the cookie, hashed with SplitMix64's finalizer) \
             choosing which hits: the call site (an 8-byte user read and an LRU map update; reading it \
             on every hit measured 260 ns a hit in all) on every hit only while a function is called \
             under ~4000 times a second, then on one hit in 2 to 64, counted with that weight, so a \
             flat-out function has a few thousand read a second; a user stack on one hit in 256, and \
             64 times sparser for a hot function; keys (when configured) on every hit, since a key \
             sequence cannot be sampled. Until this run it drew a random number and asked for the \
             process id on every hit (two helper calls): 122 ns a hit then, 97-107 ns after; the \
             mapped counters ask for the CPU id, a few ns more. The rest \
             of the gap to bpftrace's program is the cookie, the config lookup, the atomic add (a \
             preempted hit on the same CPU must not lose a count) and the sampled call sites: about \
             0.2% of a hit's whole cost here, less than the calls/s vary from one second to the next. \
             Each tool had targets of its own, minutes apart, until three runs ago (0.85-0.96x \
             across runs), then took turns on one target a few seconds apart; since this run the \
             goal is read side by side (above). Under `--max-overhead` the \
             question goes away: the hot function is probed in windows. The governed spread comes \
             from the machine (unprobed runs minutes apart differ by several percent), the cost of a \
             hit, calibrated once at start-up on a function of cacheloop's own, and the first \
             moments of each window, when the probes are going in. Changed in the windows for this \
             run: a windowed interval is read at its end once its window has had its share (it was \
             read on the 250 ms tick, whose drift after one late tick lengthened every other window \
             for the rest of the run), and closing a window no longer holds the loader up while the \
             kernel takes the probes out (an RCU grace period: ~40 ms a window here, seconds on a \
             loaded machine).\n"
        );

        let _ = writeln!(
            md,
            "## Loader CPU, {CPU_FUNCTIONS} functions, 1 s interval\n"
        );
        let _ = writeln!(
            md,
            "{CPU_RATE} calls/s spread over all {CPU_FUNCTIONS} functions; CPU of the loader process and its \
             custody helper (all their threads, from the scheduler's /proc/PID/task/*/schedstat) over \
             10 s, after a 3 s start. \
             bpftrace 0.17 needs two minutes to attach 1000 functions and is left out.\n"
        );
        let _ = writeln!(md, "| tool | CPU (% of one core) |\n|---|---:|");
        for (tool, cpu) in &self.cpu {
            let _ = writeln!(md, "| {} | {cpu:.3}% |", tool.name());
            if *tool == Tool::Cacheloop
                && let Some(all) = self.cpu_all_hits
            {
                let _ = writeln!(
                    md,
                    "| cacheloop --max-overhead 100 (every hit counted, as bpftrace) | {all:.3}% |"
                );
            }
        }
        let _ = writeln!(
            md,
            "\nWhere cacheloop's CPU goes (`perf record --call-graph dwarf` at 1000 functions, and \
             `strace -T` for the map reads). At default settings: a hit costs the target tens of \
             microseconds on this VM (the throughput table above), so 10,000 hits a second would take \
             a quarter of its time, and the governor (`--max-overhead 10`) probes in windows: the \
             loader reads and judges once a second, and puts the 1000 probes in and out once every \
             two seconds (one window serves the end of one interval and the start of the next; it \
             was every second before this run). Putting them in is the kernel's uprobe registration \
             in the target's mappings (`register_for_each_vma`, `install_breakpoint`), about a \
             quarter of the loader's CPU; taking them out happens in the custody helper (counted \
             here since this run: 0.15% of a core with a window every second, 0.10% with one every \
             two). The reading is the rest: the call-site LRU hash copied out entry by entry (about \
             200 ns an entry, 0.2 ms a reading), judging every function (the analyzer, the \
             detectors: mostly cache misses on per-series hash maps, a microsecond or so a function \
             a reading) and the sample records (one per function and interval). The per-CPU slot \
             counters cost 0.19 ms a reading to copy out until this run; they are now mapped into the \
             loader and summed in place. With every hit counted the probes are in throughout and the \
             counters are read four times a second; until this run each of those readings was a full \
             one. Now a reading between two reports is let go when a glance finds nothing that could \
             move a verdict (no series suspect, the CPU under half a loop's core, every rate under half \
             of what could be a runaway: README, \"What counts as a loop\"), and the next one is judged \
             as two parts: the healthy target here is read in full once a second and glanced at three \
             times (the mapped counters summed in place, `/proc/PID/stat` and the threads' \
             `schedstat`). Measured before and after on this VM, every hit counted: 0.80% and 0.43-0.53% \
             of a core. What is left of it: the full reading once a second (the call-site hash, the \
             analyzer and detectors, 1000 sample records as JSON), the glances, and the runtime's \
             timer wakeups. In shares of the loader's CPU with every hit counted (`perf record`, \
             this run's code): the readings and glances about 30% (the call-site and stack maps' \
             batch reads 10%; the glances 10%, mostly opening and reading `/proc` files; the \
             counters 5%), writing the JSON records 10-15% (formatting floats the most), the \
             analyzer and detectors 12%, the enricher 4%, the runtime's timers and wakeups \
             10%, and the rest spread thin (allocation, channels between the loader's threads, \
             the probes' file checks): none of them, removed alone, would bring the loader to \
             0.1% of a core. With the functions idle (1 call a second in all) the loader still \
             took 0.15% of a core, 1.4 ms a second: about 40% of it the checks made every 250 ms \
             whatever the traffic (each process's `/proc/PID/stat`, the `stat` of \
             `/proc/PID/exe` that catches an exec, the threads' `schedstat`), and a fifth the \
             runtime's timers. (Since this run the stat is read through a descriptor held open since \
             the process was found, a pread with no walk of `/proc`, which also keeps a loader \
             out of descriptors from taking its target for exited; by hand, idle, no change \
             beyond the noise.) The release build is static (musl), and musl's \
             allocator hands freed memory back to the kernel at once: the same code built \
             against glibc, side by side, idle at 100 calls a second over the 1000 functions, \
             took 0.19% of a core to the musl build's 0.30-0.34%, and 36 page faults a second \
             to its 262 (groups of small allocations mapped and unmapped ~40 times a second, \
             and each interval's vectors of records, over 128 KiB, mapped afresh); at 10,000 \
             calls a second 0.31% to 0.45%. mimalloc in its place measured worse here \
             (0.43-0.61% idle) and was not kept. A record and an analyzer event were sized by \
             the loop's evidence, which comes once in a run (392 and 224 bytes, for one sample \
             per function and interval); boxed since this run (136 and 56 bytes): page faults \
             270 to 152 a second, the loader 0.29-0.31% to 0.26-0.27% in that side-by-side run. \
             The last committed run read 0.398% in the table above, on a steadier machine \
             (bpftrace 0.23 there: 0.061%); this machine reads higher for every tool. Since this \
             run small blocks go through dlmalloc, which keeps what an interval frees for the next \
             (heap.rs): side by side on this machine, every hit counted, three runs each, \
             0.52-0.57% of a core with musl's allocator alone, 0.41-0.44% with dlmalloc, \
             0.45-0.47% with the loader also built for size (kept for the RSS above). Since this \
             run, side by side, five runs each, every hit counted: sample records share the \
             catalog's name instead of a copy each (1000 allocations a second), the detector's two \
             powers per series come from the last reading's (`pow` alone was over 1% of the \
             loader), and the analyzer's call-site map is cleared and reused instead of grown from \
             empty: median 0.517% to 0.481% of a core; and the threads' busy times are listed \
             with `getdents64` into the stack (musl's `opendir` mapped and unmapped its buffer at \
             every glance): idle, 1 call a second in all, 0.145-0.164% to 0.118-0.141%. That idle \
             floor, the glances every 250 ms that keep the detection latency below its goals and \
             the runtime's timers, is itself above 0.1% of a core on this VM. At default \
             settings the windows dominate: `perf record -g` of the loader and its custody helper \
             put 59% of their CPU in the kernel's uprobe registration (21%) and unregistration \
             (38%, in the helper), 1000 probes in and out every two seconds. Each function's probe \
             must be in for part of every interval for its sample record, so no change on our side \
             lowers that below one window per two intervals; the 0.1% goal cannot be met with \
             windows of 1000 probes on this VM. \
             bpftrace prints one number a second and never windows (its target pays instead). \
             Not done: dense per-process arrays for the analyzer's and detector's per-series state \
             (most of the judging cost), reading call sites only where they can matter, and windows \
             spanning more than two intervals, which the reading-per-interval output does not allow \
             without intervals of no probed time.\n"
        );
        let _ = writeln!(md, "## Detection latency\n");
        let _ = writeln!(
            md,
            "At default settings. bpftrace has no detector to compare: it counts, a person has to \
             read the counts.\n\n\
             | loop | from its start to the verdict | goal |\n|---|---:|---:|\n\
             | the demo's dependency cycle (structural: a key cycle), rules file renamed in to \
             cacheloop's exit 3, including demo-cache's 200 ms reload poll and the detach | {:.2} s | 1.5 s |\n\
             | a runaway with no structure after healthy traffic (the fixture's `200:6 max:20`), \
             phase start to the loop record | {:.2} s | 2.5 s |\n",
            self.latency, self.rate_only_latency
        );

        let _ = writeln!(md, "## Goals\n");
        let _ = writeln!(md, "| goal | measured | |\n|---|---:|---|");
        let t = |count, tool| Self::get(&attach, count, tool);
        let r = |count, tool| Self::get(&self.rss, count, tool);
        let mut goal = |name: &str,
                        value: Option<f64>,
                        limit: f64,
                        less: bool,
                        fmt: &dyn Fn(f64) -> String| {
            let verdict = match value {
                Some(v) if (less && v <= limit) || (!less && v >= limit) => "met",
                Some(_) => "NOT met",
                None => "not measured",
            };
            let shown = value.map(fmt).unwrap_or_else(|| "-".to_owned());
            let _ = writeln!(md, "| {name} | {shown} | {verdict} |");
        };
        let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
        let times = |v: f64| format!("{v:.3}x");
        for tool in OURS {
            goal(
                &format!(
                    "1000 functions, {}: time beyond the window at most 1/3 of bpftrace 0.23's",
                    tool.name()
                ),
                ratio(
                    t(1000, tool).map(beyond),
                    t(1000, Tool::Bpftrace23).map(beyond),
                ),
                1.0 / 3.0,
                true,
                &times,
            );
        }
        for tool in OURS {
            goal(
                &format!(
                    "10,000 functions, {}: within 1 s beyond the window",
                    tool.name()
                ),
                t(10_000, tool).map(beyond),
                1.0,
                true,
                &|v| format!("{v:.2} s"),
            );
        }
        let worst_rss = OURS
            .into_iter()
            .flat_map(|tool| {
                target::GLOBS
                    .iter()
                    .filter_map(move |&(c, _)| ratio(r(c, tool), r(c, Tool::Bpftrace23)))
            })
            .reduce(f64::max);
        goal(
            "peak RSS at most 0.1x bpftrace 0.23's (worst of 1/100/1000/10,000, both modes)",
            worst_rss,
            0.1,
            true,
            &times,
        );
        let (per_hit, how) = if self.per_hit.is_empty() {
            (&self.per_hit_turns, "the rounds' ratios, taking turns")
        } else {
            (&self.per_hit, "the side-by-side pairs' ratios")
        };
        goal(
            &format!(
                "per hit: throughput probed at least 1.0x of bpftrace 0.23's (median of {how})"
            ),
            (!per_hit.is_empty()).then(|| median(&mut per_hit.clone())),
            1.0,
            false,
            &times,
        );
        goal(
            &format!("loader CPU at most 0.1% of a core ({CPU_FUNCTIONS} functions, all called)"),
            self.cpu
                .iter()
                .find(|c| c.0 == Tool::Cacheloop)
                .map(|c| c.1),
            0.1,
            true,
            &|v| format!("{v:.3}%"),
        );
        goal(
            &format!(
                "flat-out target keeps at least 90% of unprobed throughput under --max-overhead 5 (worst of {} rounds)",
                self.governed.len()
            ),
            worst_governed,
            0.9,
            false,
            &|v| format!("{:.1}%", v * 100.0),
        );
        goal(
            "100 functions: at most 0.1x bpftrace 0.17's time",
            ratio(t(100, Tool::Cacheloop), t(100, Tool::Bpftrace17)),
            0.1,
            true,
            &times,
        );
        goal(
            "detaching 1000 functions well under a second",
            Some(detach_1000),
            0.5,
            true,
            &|v| format!("{v:.3} s"),
        );
        md
    }
}
