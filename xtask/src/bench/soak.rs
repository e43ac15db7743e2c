//! `cargo xtask bench --soak DURATION`: bounded memory and fds over hours,
//! measured while loops come and go.
//!
//! Starts demo-cache (the release build) with its healthy rules and attaches
//! `cacheloop watch --pid PID --func 'cache_*' --json` (the demo's
//! functions) for the whole DURATION (`10m`, `1h`, `1h30m`). Then, over and
//! over: healthy traffic for 30 s, the rules with a cycle for 20, 30 or 40 s
//! (in turn), the healthy rules again. demo-cache re-reads its rules even
//! inside a loop, so deploying the fix ends the loop. Every 10 s it samples
//! cacheloop's RSS (`VmRSS`), open fds and CPU time (utime + stime), and
//! demo-cache's CPU to show the phases. From cacheloop's JSON lines it
//! checks that each loop phase got a `loop` record naming `cache_invalidate`
//! and each fix a `recovered` record naming it, and counts warnings and
//! false alarms (verdicts that match no injected loop).
//!
//! The result replaces the "Soak" section of BENCHMARKS.md (a plain bench
//! run keeps that section; this one keeps the rest) and is printed. The
//! soak fails when a loop went uncaught, a recovery unreported, cacheloop
//! stopped before the end or its fds grew by more than [`FD_SLACK`]; RSS and
//! false alarms are reported, not judged. cacheloop's JSON lines and the
//! samples (CSV) stay in `target/bench/soak/` for a closer look. No network
//! is involved: demo-cache's traffic is in-process calls, and every process
//! started here is stopped by its pid.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, BufWriter, Write as _},
    path::Path,
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, Sender},
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use super::{Target, cpu_ticks};

/// Healthy traffic before the first loop and after each fix.
const HEALTHY_SECONDS: f64 = 30.0;
/// Loop phases last these in turn.
const LOOP_SECONDS: [f64; 3] = [20.0, 30.0, 40.0];
const SAMPLE_SECONDS: f64 = 10.0;
/// fds cacheloop may gain over the soak (a file opened once, late, is
/// fine; one per loop is a leak).
const FD_SLACK: usize = 3;
/// A `loop` record this long after the fix still belongs to that loop (it
/// judged the interval the loop ended in).
const GRACE_SECONDS: f64 = 2.0;
const HEADING: &str = "## Soak";
const FUNCS: &str = "cache_*";
/// The function the cycle drives: a loop phase is caught by a `loop`
/// record naming it, and recovered by a `recovered` record naming it.
const LOOPING: &str = "cache_invalidate";

/// `10m`, `1h`, `1h30m`, `90s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("--soak takes a duration such as 10m, 1h or 1h30m, not '{text}'");
    let (mut total, mut number) = (0u64, String::new());
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(bad)?;
    }
    if !number.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// One phase of the schedule: the rules in force (`cycle`) until `until`
/// seconds after the start.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Planned {
    cycle: bool,
    until: f64,
}

/// Healthy first, then loop and healthy phases while a whole pair fits;
/// the last healthy phase takes what is left.
fn plan(total: f64) -> Vec<Planned> {
    let mut phases = vec![Planned {
        cycle: false,
        until: HEALTHY_SECONDS,
    }];
    let mut at = HEALTHY_SECONDS;
    for n in 0.. {
        let loop_seconds = LOOP_SECONDS[n % LOOP_SECONDS.len()];
        if at + loop_seconds + HEALTHY_SECONDS > total {
            break;
        }
        at += loop_seconds;
        phases.push(Planned {
            cycle: true,
            until: at,
        });
        at += HEALTHY_SECONDS;
        phases.push(Planned {
            cycle: false,
            until: at,
        });
    }
    if let Some(last) = phases.last_mut() {
        last.until = total;
    }
    phases
}

/// A phase as it went: Unix times of its rules going live and of the next
/// deployment (or the end).
#[derive(Clone, Copy, Debug)]
struct Phase {
    cycle: bool,
    from: f64,
    to: f64,
    /// demo-cache said it reloaded its rules (the first phase: started
    /// with them).
    reloaded: bool,
}

/// Records cacheloop writes every interval: counted, not kept.
const PER_INTERVAL: [&str; 3] = ["sample", "health", "interval"];

/// One of cacheloop's records other than the per-interval ones.
#[derive(Clone, Debug)]
struct Record {
    kind: String,
    ts: f64,
    line: String,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Seconds since the start.
    at: f64,
    cycle: bool,
    rss_kib: u64,
    fds: usize,
    ticks: u64,
    target_ticks: Option<u64>,
}

/// cacheloop, stopped like a user would (SIGINT, by its pid) when dropped.
struct Watcher(Option<Child>);

impl Watcher {
    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.0.as_mut()?.try_wait().ok().flatten()
    }

    /// SIGINT, then up to 30 s to detach; SIGKILL after that.
    fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.0.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn run(root: &Path, release: &Path, total: Duration) -> Result<(), String> {
    let total_seconds = total.as_secs_f64();
    let schedule = plan(total_seconds);
    let loops = schedule.iter().filter(|p| p.cycle).count();
    if loops == 0 {
        let least = 2.0 * HEALTHY_SECONDS + LOOP_SECONDS[0];
        return Err(format!(
            "--soak needs at least {least} s (healthy, a loop, healthy again)"
        ));
    }
    let work = root.join("target/bench/soak");
    fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let config = root.join("demo/config");
    let deps = work.join("deps.conf");
    fs::copy(config.join("healthy.deps"), &deps)
        .map_err(|e| format!("cannot write {}: {e}", deps.display()))?;

    let deps_arg = deps.to_str().ok_or("the work path is not UTF-8")?;
    let (mut cache, cache_out) = Target::start(&release.join("demo-cache"), &["--deps", deps_arg])?;
    let cache_pid = cache.1;
    let reloads = watch_reloads(cache_out);

    let mut child = Command::new(release.join("cacheloop"))
        .args([
            "watch",
            "--pid",
            &cache_pid.to_string(),
            "--func",
            FUNCS,
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start cacheloop: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut watcher = Watcher(Some(child));
    let pid = watcher.pid();
    let (tx, rx) = mpsc::channel();
    let totals = read_records(stdout, &work.join("cacheloop.jsonl"), tx)?;
    // The first lines, and a count of the rest: bounded over days.
    let diagnostics = thread::spawn(move || {
        let mut kept = Vec::new();
        for (n, line) in BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .enumerate()
        {
            if n < 100 {
                kept.push(line);
            } else if let Some(last) = kept.last_mut() {
                *last = format!("({} more lines)", n - 98);
            }
        }
        kept
    });

    let mut records = Vec::new();
    wait_attached(&rx, &mut records, &mut watcher)?;
    eprintln!(
        "xtask: soak for {}: cacheloop (pid {pid}) on demo-cache (pid {cache_pid}), {loops} loop phases to come and go",
        clock(total_seconds)
    );

    let start = Instant::now();
    let mut phases: Vec<Phase> = Vec::new();
    let mut samples = Vec::new();
    let mut next_sample = 0.0;
    let mut early = None;
    'phases: for (n, planned) in schedule.iter().enumerate() {
        let from = if n == 0 {
            unix_now()
        } else {
            let name = if planned.cycle {
                "cycle.deps"
            } else {
                "healthy.deps"
            };
            deploy(&config.join(name), &deps)?
        };
        if let Some(last) = phases.last_mut() {
            last.to = from;
        }
        phases.push(Phase {
            cycle: planned.cycle,
            from,
            to: f64::NAN,
            reloaded: n == 0,
        });
        if n > 0 {
            let what = if planned.cycle {
                "the rules with a cycle"
            } else {
                "the fix"
            };
            eprintln!(
                "xtask: soak {} / {}: {what} deployed",
                clock(start.elapsed().as_secs_f64()),
                clock(total_seconds)
            );
        }
        loop {
            let now = start.elapsed().as_secs_f64();
            records.extend(rx.try_iter());
            if now >= next_sample {
                match sample(pid, cache_pid, now, planned.cycle) {
                    Some(s) => samples.push(s),
                    None => {
                        early = Some("cacheloop's /proc entry went away".to_owned());
                        break 'phases;
                    }
                }
                next_sample += SAMPLE_SECONDS;
            }
            if let Some(status) = watcher.exited() {
                early = Some(format!("cacheloop exited with {status}"));
                break 'phases;
            }
            if let Ok(Some(status)) = cache.0.try_wait() {
                early = Some(format!("demo-cache exited with {status}"));
                break 'phases;
            }
            if now >= planned.until {
                break;
            }
            let wait = (next_sample.min(planned.until) - now).clamp(0.0, 1.0);
            thread::sleep(Duration::from_secs_f64(wait));
        }
    }
    let ended = unix_now();
    if let Some(last) = phases.last_mut() {
        last.to = ended;
    }
    let elapsed = start.elapsed().as_secs_f64();
    if early.is_none() && samples.last().is_none_or(|s| elapsed - s.at > 1.0) {
        samples.extend(sample(pid, cache_pid, elapsed, false));
    }

    let status = watcher.stop();
    drop(cache);
    let totals = totals.join().unwrap_or_default();
    records.extend(rx.try_iter());
    let diagnostics = diagnostics.join().unwrap_or_default();
    let reloads = reloads.join().unwrap_or_default();
    for phase in phases.iter_mut().skip(1) {
        phase.reloaded = reloads
            .iter()
            .any(|&t| t >= phase.from - 0.5 && t <= phase.from + 5.0);
    }

    write_samples(&work.join("samples.csv"), &samples)?;
    let soak = Soak {
        planned_seconds: total_seconds,
        seconds: elapsed,
        phases,
        samples,
        records,
        totals,
        diagnostics,
        status,
        early,
    };
    let verdict = soak.judge();
    let section = soak.markdown(&verdict);
    let out = root.join("BENCHMARKS.md");
    let old = fs::read_to_string(&out).unwrap_or_default();
    fs::write(&out, replace_section(&old, &section))
        .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    println!("{section}");
    for line in soak.details(&verdict) {
        eprintln!("xtask: soak: {line}");
    }
    if verdict.failures.is_empty() {
        Ok(())
    } else {
        Err(format!("soak failed: {}", verdict.failures.join("; ")))
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `m:ss` (or `h:mm:ss`).
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// Puts `rules` live the way the demo does (a whole file renamed into
/// place); returns when, in Unix seconds.
fn deploy(rules: &Path, deps: &Path) -> Result<f64, String> {
    let staged = deps.with_extension("new");
    fs::copy(rules, &staged).map_err(|e| format!("cannot write {}: {e}", staged.display()))?;
    fs::rename(&staged, deps).map_err(|e| format!("cannot deploy {}: {e}", deps.display()))?;
    Ok(unix_now())
}

/// The samples as CSV, for a plot or a closer look.
fn write_samples(path: &Path, samples: &[Sample]) -> Result<(), String> {
    let mut csv =
        "seconds,rules,cacheloop_rss_kib,cacheloop_fds,cacheloop_cpu_ticks,demo_cache_cpu_ticks\n"
            .to_owned();
    for s in samples {
        let _ = writeln!(
            csv,
            "{:.1},{},{},{},{},{}",
            s.at,
            if s.cycle { "cycle" } else { "healthy" },
            s.rss_kib,
            s.fds,
            s.ticks,
            s.target_ticks.map_or_else(String::new, |t| t.to_string())
        );
    }
    fs::write(path, csv).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// When demo-cache said it reloaded its rules (Unix seconds); also keeps
/// its stdout drained.
fn watch_reloads(out: BufReader<ChildStdout>) -> JoinHandle<Vec<f64>> {
    thread::spawn(move || {
        out.lines()
            .map_while(Result::ok)
            .filter(|l| l.starts_with("reloaded "))
            .map(|_| unix_now())
            .collect()
    })
}

/// What the per-interval records said over the whole run.
#[derive(Debug, Default)]
struct Totals {
    /// Records of each type.
    counts: BTreeMap<String, usize>,
    /// From `interval` records: calls the kernel could not count, entries
    /// its LRU maps evicted, and the counter map's fill (first, last, most)
    /// and capacity.
    dropped: u64,
    evicted: u64,
    counters: Option<(u64, u64, u64)>,
    capacity: Option<u64>,
}

impl Totals {
    fn interval(&mut self, line: &str) {
        let field = |key| json_num(line, key).map(|v| v as u64);
        self.dropped += field("dropped").unwrap_or(0);
        self.evicted += field("evicted").unwrap_or(0);
        if let Some(c) = field("counters") {
            self.counters = Some(match self.counters {
                Some((first, _, most)) => (first, c, most.max(c)),
                None => (c, c, c),
            });
        }
        self.capacity = field("counters_capacity").or(self.capacity);
    }
}

/// Reads cacheloop's JSON lines as they come: every line to `log`, records
/// other than the per-interval ones to `tx`; returns the totals once
/// cacheloop's stdout closes.
fn read_records(
    out: ChildStdout,
    log: &Path,
    tx: Sender<Record>,
) -> Result<JoinHandle<Totals>, String> {
    let file =
        fs::File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    Ok(thread::spawn(move || {
        let mut log = BufWriter::new(file);
        let mut totals = Totals::default();
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = writeln!(log, "{line}");
            let kind = json_str(&line, "type").unwrap_or_else(|| "(not JSON)".to_owned());
            *totals.counts.entry(kind.clone()).or_insert(0) += 1;
            if kind == "interval" {
                totals.interval(&line);
            }
            if !PER_INTERVAL.contains(&kind.as_str()) {
                let ts = json_num(&line, "ts").unwrap_or(f64::NAN);
                let _ = tx.send(Record { kind, ts, line });
            }
        }
        let _ = log.flush();
        totals
    }))
}

/// Until cacheloop's `attached` record (30 s at most).
fn wait_attached(
    rx: &Receiver<Record>,
    records: &mut Vec<Record>,
    watcher: &mut Watcher,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(record) = rx.recv_timeout(Duration::from_millis(200)) {
            let attached = record.kind == "attached";
            records.push(record);
            if attached {
                return Ok(());
            }
        }
        if let Some(status) = watcher.exited() {
            return Err(format!("cacheloop exited with {status} before attaching"));
        }
    }
    Err("cacheloop did not attach within 30 s".to_owned())
}

/// cacheloop's RSS, fds and CPU ticks now, with demo-cache's CPU ticks;
/// None once cacheloop is gone.
fn sample(pid: u32, target: u32, at: f64, cycle: bool) -> Option<Sample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some(Sample {
        at,
        cycle,
        rss_kib,
        fds,
        ticks: cpu_ticks(pid)?,
        target_ticks: cpu_ticks(target),
    })
}

/// The string value of `"key":"…"` (escapes kept as they are).
fn json_str(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut end = start;
    let mut escaped = false;
    for (i, c) in line[start..].char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => {
                end = start + i;
                break;
            }
            _ => escaped = false,
        }
    }
    Some(line[start..end].to_owned())
}

/// The first number after `"key":` (the top-level one for `ts` and `type`,
/// which cacheloop writes first).
fn json_num(line: &str, key: &str) -> Option<f64> {
    let start = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let len = line[start..]
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(line.len() - start);
    line[start..start + len].parse().ok()
}

fn names_looping(r: &Record) -> bool {
    functions(&r.line).split(',').any(|f| f == LOOPING)
}

/// `r` fell while `phase`'s cycle was live (or just after the fix).
fn catches(phase: &Phase, r: &Record) -> bool {
    r.ts >= phase.from && r.ts <= phase.to + GRACE_SECONDS
}

/// The raw `"functions":[…]` list of a record, quotes dropped.
fn functions(line: &str) -> String {
    let Some(at) = line.find("\"functions\":[") else {
        return "?".to_owned();
    };
    let rest = &line[at + "\"functions\":[".len()..];
    rest[..rest.find(']').unwrap_or(rest.len())].replace('"', "")
}

/// Least-squares slope of y over x.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let var: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let cov: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (var > 0.0).then(|| cov / var)
}

fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    (!v.is_empty()).then(|| super::median(&mut v))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// CPU (% of one core) between two samples; USER_HZ is 100 on Linux.
fn cpu_percent(ticks: (u64, u64), a: f64, b: f64) -> f64 {
    ticks.1.saturating_sub(ticks.0) as f64 / (b - a).max(1e-9)
}

/// What one loop phase got from cacheloop.
struct LoopOutcome {
    /// Seconds from the cycle going live to the first `loop` record naming
    /// [`LOOPING`].
    caught: Option<f64>,
    /// Such records in the phase.
    loop_records: usize,
    /// Seconds from the fix to the first `recovered` record naming
    /// [`LOOPING`] after it.
    recovered: Option<f64>,
    /// Such records while the cycle was live (the verdict flapped).
    recovered_early: usize,
}

struct Verdict {
    loops: Vec<LoopOutcome>,
    injected: usize,
    /// `loop` records that caught no injected loop: in a healthy phase, or
    /// naming other functions only.
    spurious: Vec<Record>,
    /// `recovered` records naming other functions only (spurious loops
    /// ending).
    stray_recoveries: Vec<Record>,
    /// Functions whose last verdict was a loop, when the soak ended healthy.
    unrecovered: Vec<String>,
    warnings: Vec<Record>,
    failures: Vec<String>,
}

struct Soak {
    planned_seconds: f64,
    seconds: f64,
    phases: Vec<Phase>,
    samples: Vec<Sample>,
    records: Vec<Record>,
    totals: Totals,
    diagnostics: Vec<String>,
    status: Option<ExitStatus>,
    early: Option<String>,
}

impl Soak {
    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Record> + 'a {
        self.records.iter().filter(move |r| r.kind == kind)
    }

    fn judge(&self) -> Verdict {
        let mut loops = Vec::new();
        for (n, phase) in self.phases.iter().enumerate().filter(|(_, p)| p.cycle) {
            let next_loop = self.phases[n + 1..]
                .iter()
                .find(|p| p.cycle)
                .map_or(f64::INFINITY, |p| p.from);
            let in_loop: Vec<&Record> = self
                .of_kind("loop")
                .filter(|r| names_looping(r) && catches(phase, r))
                .collect();
            let recovered: Vec<&Record> = self
                .of_kind("recovered")
                .filter(|r| names_looping(r) && r.ts >= phase.to && r.ts < next_loop)
                .collect();
            loops.push(LoopOutcome {
                caught: in_loop.first().map(|r| r.ts - phase.from),
                loop_records: in_loop.len(),
                recovered: recovered.first().map(|r| r.ts - phase.to),
                recovered_early: self
                    .of_kind("recovered")
                    .filter(|r| names_looping(r) && r.ts >= phase.from && r.ts < phase.to)
                    .count(),
            });
        }
        let spurious: Vec<Record> = self
            .of_kind("loop")
            .filter(|r| !(names_looping(r) && self.phases.iter().any(|p| p.cycle && catches(p, r))))
            .cloned()
            .collect();
        let stray_recoveries: Vec<Record> = self
            .of_kind("recovered")
            .filter(|r| !names_looping(r))
            .cloned()
            .collect();
        let warnings: Vec<Record> = self.of_kind("warning").cloned().collect();
        let mut last: BTreeMap<String, &str> = BTreeMap::new();
        for r in self
            .records
            .iter()
            .filter(|r| r.kind == "loop" || r.kind == "recovered")
        {
            last.insert(functions(&r.line), &r.kind);
        }
        let unrecovered = last
            .into_iter()
            .filter(|(_, kind)| *kind == "loop")
            .map(|(f, _)| f)
            .collect();
        let injected = self.phases.iter().filter(|p| p.cycle && p.reloaded).count();

        let mut failures = Vec::new();
        if let Some(why) = &self.early {
            failures.push(format!(
                "stopped at {} of {}: {why}",
                clock(self.seconds),
                clock(self.planned_seconds)
            ));
        }
        let planned = loops.len();
        if injected < planned {
            failures.push(format!(
                "demo-cache took only {injected} of {planned} cycles (no reload seen)"
            ));
        }
        let caught = loops.iter().filter(|l| l.caught.is_some()).count();
        if caught < planned {
            failures.push(format!("{} of {planned} loops uncaught", planned - caught));
        }
        let recovered = loops.iter().filter(|l| l.recovered.is_some()).count();
        if recovered < planned {
            failures.push(format!(
                "{} of {planned} recoveries unreported",
                planned - recovered
            ));
        }
        if let (Some(first), Some(last)) = (self.samples.first(), self.samples.last()) {
            if last.fds > first.fds + FD_SLACK {
                failures.push(format!(
                    "cacheloop's fds grew from {} to {}",
                    first.fds, last.fds
                ));
            }
        }
        match self.status {
            Some(s) if s.success() => {}
            Some(s) => failures.push(format!("cacheloop ended with {s} when stopped")),
            None => failures.push("cacheloop did not stop within 30 s of SIGINT".to_owned()),
        }
        Verdict {
            loops,
            injected,
            spurious,
            stray_recoveries,
            unrecovered,
            warnings,
            failures,
        }
    }

    /// CPU (% of one core) over consecutive sample pairs that `keep`
    /// selects (both samples in the same phase kind).
    fn mean_cpu(&self, keep: impl Fn(&Sample, &Sample) -> bool) -> Option<f64> {
        let (mut ticks, mut seconds) = (0u64, 0.0);
        for pair in self.samples.windows(2) {
            if keep(&pair[0], &pair[1]) {
                ticks += pair[1].ticks.saturating_sub(pair[0].ticks);
                seconds += pair[1].at - pair[0].at;
            }
        }
        (seconds > 0.0).then(|| ticks as f64 / seconds)
    }

    fn markdown(&self, v: &Verdict) -> String {
        let mut md = String::new();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let planned = v.loops.len();
        let _ = writeln!(md, "{HEADING}\n");
        let _ = writeln!(
            md,
            "Written by `cargo xtask bench --soak {}`. cacheloop (release build) watched demo-cache \
             (`watch --pid PID --func '{FUNCS}' --json`) for {} while its dependency rules went from \
             healthy ({HEALTHY_SECONDS:.0} s) to a cycle ({}) and back ({planned} loop phases); every \
             {SAMPLE_SECONDS:.0} s, cacheloop's RSS (`VmRSS`), open fds and CPU time were read from \
             /proc. Kernel {}, a shared virtual machine.\n",
            duration_arg(self.planned_seconds),
            clock(self.seconds),
            LOOP_SECONDS.map(|s| format!("{s:.0}")).join(", ") + " s in turn",
            kernel.trim(),
        );
        let result = if v.failures.is_empty() {
            "passed: every loop caught, every recovery reported, fds flat".to_owned()
        } else {
            format!("FAILED: {}", v.failures.join("; "))
        };
        let _ = writeln!(md, "Result: **{result}**.\n");

        let caught: Vec<f64> = v.loops.iter().filter_map(|l| l.caught).collect();
        let recovered: Vec<f64> = v.loops.iter().filter_map(|l| l.recovered).collect();
        // Median, and the slowest loop's number.
        let latency = |of: &dyn Fn(&LoopOutcome) -> Option<f64>| {
            let values: Vec<f64> = v.loops.iter().filter_map(of).collect();
            let slowest = v
                .loops
                .iter()
                .enumerate()
                .filter_map(|(n, l)| Some((n + 1, of(l)?)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            match (median(&values), slowest) {
                (Some(m), Some((n, max))) => {
                    format!(" ({m:.1} s median, {max:.1} s at most: loop {n})")
                }
                _ => String::new(),
            }
        };
        let _ = writeln!(
            md,
            "- loops injected (demo-cache reloaded the cycle): {} of {planned}",
            v.injected
        );
        let _ = writeln!(
            md,
            "- loops caught (a `loop` record naming `{LOOPING}` while the cycle was live): {} of \
             {planned}{}",
            caught.len(),
            latency(&|l| l.caught)
        );
        let _ = writeln!(
            md,
            "- recoveries reported (a `recovered` record naming `{LOOPING}` after the fix): {} of \
             {planned}{}",
            recovered.len(),
            latency(&|l| l.recovered)
        );
        let extra_loops: usize = v
            .loops
            .iter()
            .map(|l| l.loop_records.saturating_sub(1))
            .sum();
        let early: usize = v.loops.iter().map(|l| l.recovered_early).sum();
        let _ = writeln!(
            md,
            "- the caught loops' verdicts: {extra_loops} `loop` record(s) beyond one per phase, \
             {early} `recovered` while the cycle was still live"
        );
        let tally = |records: &[Record]| {
            let mut by: BTreeMap<String, usize> = BTreeMap::new();
            for r in records {
                *by.entry(functions(&r.line)).or_insert(0) += 1;
            }
            let by: Vec<String> = by.iter().map(|(f, n)| format!("{f} x{n}")).collect();
            if by.is_empty() {
                String::new()
            } else {
                format!(" ({})", by.join(", "))
            }
        };
        let _ = writeln!(
            md,
            "- false alarms: {} `loop` record(s) that caught no injected loop{}, {} `recovered` \
             record(s) ending them{}; still in a loop at the (healthy) end: {}",
            v.spurious.len(),
            tally(&v.spurious),
            v.stray_recoveries.len(),
            tally(&v.stray_recoveries),
            if v.unrecovered.is_empty() {
                "nothing".to_owned()
            } else {
                v.unrecovered.join("; ")
            }
        );
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for w in &v.warnings {
            let kind = json_str(&w.line, "kind").unwrap_or_else(|| "?".to_owned());
            *kinds.entry(kind).or_insert(0) += 1;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        let _ = writeln!(
            md,
            "- warnings: {}{}",
            v.warnings.len(),
            if kinds.is_empty() {
                String::new()
            } else {
                format!(" ({})", kinds.join(", "))
            }
        );
        let count = |kind: &str| self.totals.counts.get(kind).copied().unwrap_or(0);
        let _ = writeln!(
            md,
            "- records: {} `sample`, {} `health`, {} `governor`",
            count("sample"),
            count("health"),
            count("governor")
        );
        if let Some((first, last, most)) = self.totals.counters {
            let _ = writeln!(
                md,
                "- kernel maps (`interval` records): counters {first} at the start, {last} at the end, \
                 {most} at most (of {}); {} calls dropped, {} entries evicted",
                self.totals
                    .capacity
                    .map_or_else(|| "?".to_owned(), |c| c.to_string()),
                self.totals.dropped,
                self.totals.evicted
            );
        }

        if let (Some(first), Some(last)) = (self.samples.first(), self.samples.last()) {
            let max_rss = self.samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
            let max_fds = self.samples.iter().map(|s| s.fds).max().unwrap_or(0);
            let half = self.seconds / 2.0;
            let second_half: Vec<(f64, f64)> = self
                .samples
                .iter()
                .filter(|s| s.at >= half)
                .map(|s| (s.at / 3600.0, mib(s.rss_kib)))
                .collect();
            let growth =
                slope(&second_half).map_or_else(|| "-".to_owned(), |g| format!("{g:+.2} MiB/h"));
            let _ = writeln!(
                md,
                "- RSS: {:.2} MiB at the start, {:.2} MiB at the end, {:.2} MiB at most; growth over the \
                 second half (linear fit): {growth}",
                mib(first.rss_kib),
                mib(last.rss_kib),
                mib(max_rss)
            );
            let _ = writeln!(
                md,
                "- fds: {} at the start, {} at the end, {max_fds} at most",
                first.fds, last.fds
            );
            let cpu = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |c| format!("{c:.2}%"));
            let _ = writeln!(
                md,
                "- CPU (% of one core): {} overall; {} in the first half, {} in the second; {} while \
                 healthy, {} while looping",
                cpu(self.mean_cpu(|_, _| true)),
                cpu(self.mean_cpu(|_, b| b.at <= half)),
                cpu(self.mean_cpu(|a, _| a.at >= half)),
                cpu(self.mean_cpu(|a, b| !a.cycle && !b.cycle)),
                cpu(self.mean_cpu(|a, b| a.cycle && b.cycle)),
            );
        }
        let _ = writeln!(md);

        let _ = writeln!(
            md,
            "| time | rules | cacheloop RSS (MiB) | fds | cacheloop CPU since the row above | demo-cache CPU |\n\
             |---:|---|---:|---:|---:|---:|"
        );
        let mut rows: Vec<usize> = Vec::new();
        for k in 0..=10 {
            let mark = self.seconds * f64::from(k) / 10.0;
            let nearest = self
                .samples
                .iter()
                .enumerate()
                .min_by(|a, b| (a.1.at - mark).abs().total_cmp(&(b.1.at - mark).abs()))
                .map(|(i, _)| i);
            if nearest.is_some() && rows.last() != nearest.as_ref() {
                rows.extend(nearest);
            }
        }
        let mut previous: Option<&Sample> = None;
        for &i in &rows {
            let s = &self.samples[i];
            let (cpu, target) = match previous {
                Some(p) => (
                    format!("{:.2}%", cpu_percent((p.ticks, s.ticks), p.at, s.at)),
                    match (p.target_ticks, s.target_ticks) {
                        (Some(a), Some(b)) => format!("{:.0}%", cpu_percent((a, b), p.at, s.at)),
                        _ => "-".to_owned(),
                    },
                ),
                None => ("-".to_owned(), "-".to_owned()),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {} | {cpu} | {target} |",
                clock(s.at),
                if s.cycle { "cycle" } else { "healthy" },
                mib(s.rss_kib),
                s.fds
            );
            previous = Some(s);
        }
        let _ = writeln!(
            md,
            "\nCPU columns: the mean between this row's sample and the one above (/proc clock ticks). \
             demo-cache runs flat out while its rules hold a cycle. The last soak's cacheloop JSON lines \
             and samples: `target/bench/soak/cacheloop.jsonl`, `samples.csv`."
        );
        md
    }

    /// What to look at more closely, printed after the summary.
    fn details(&self, v: &Verdict) -> Vec<String> {
        let mut lines = Vec::new();
        let loop_phases = self.phases.iter().filter(|p| p.cycle);
        for (n, (phase, outcome)) in loop_phases.zip(&v.loops).enumerate() {
            let at = |ts: f64| clock(ts - self.phases[0].from);
            let caught = outcome.caught.map_or("NOT caught".to_owned(), |s| {
                format!("caught after {s:.1} s")
            });
            let recovered = outcome
                .recovered
                .map_or("recovery NOT reported".to_owned(), |s| {
                    format!("recovered {s:.1} s after the fix")
                });
            lines.push(format!(
                "loop {} ({}-{}): {caught}, {} loop record(s), {recovered}{}",
                n + 1,
                at(phase.from),
                at(phase.to),
                outcome.loop_records,
                if outcome.recovered_early > 0 {
                    format!(", {} recovered while live", outcome.recovered_early)
                } else {
                    String::new()
                }
            ));
        }
        for r in v.spurious.iter().chain(&v.warnings).take(20) {
            let mut line = r.line.clone();
            line.truncate(400);
            lines.push(format!("{}: {line}", r.kind));
        }
        for d in self.diagnostics.iter().take(20) {
            lines.push(format!("cacheloop stderr: {d}"));
        }
        lines
    }
}

/// The `--soak` value that gives these seconds, as the user would type it.
fn duration_arg(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, 0) => format!("{h}h{m}m"),
        _ => format!("{s}s"),
    }
}

/// `text` without its section `heading`, and that section.
fn split_section<'a>(text: &'a str, heading: &str) -> (String, Option<&'a str>) {
    let start = if text.starts_with(heading) {
        Some(0)
    } else {
        text.find(&format!("\n{heading}")).map(|i| i + 1)
    };
    let Some(start) = start else {
        return (text.to_owned(), None);
    };
    let end = text[start + 1..]
        .find("\n## ")
        .map_or(text.len(), |i| start + 1 + i + 1);
    let rest = format!("{}{}", &text[..start], &text[end..]);
    (rest, Some(&text[start..end]))
}

fn join(rest: &str, section: &str) -> String {
    format!("{}\n\n{}\n", rest.trim_end(), section.trim_end())
}

/// The bench's new `text` with the sections of their own runs (the soak,
/// the interpreters) of the file it replaces (`old`) kept at the end.
pub fn keep_section(text: &str, old: &str) -> String {
    let mut text = text.to_owned();
    for heading in [super::interp::HEADING, HEADING] {
        if let Some(section) = split_section(old, heading).1 {
            text = join(&text, section);
        }
    }
    text
}

/// `old` (the file) with its soak section replaced by `section`.
fn replace_section(old: &str, section: &str) -> String {
    replace_section_of(old, section, HEADING)
}

/// `old` (the file) with its section `heading` replaced by `section`.
pub fn replace_section_of(old: &str, section: &str, heading: &str) -> String {
    let (rest, _) = split_section(old, heading);
    if rest.trim().is_empty() {
        join("# Benchmarks", section)
    } else {
        join(&rest, section)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_each_spelling() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        for bad in ["", "10", "m", "1x", "0m", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(duration_arg(600.0), "10m");
        assert_eq!(duration_arg(5400.0), "1h30m");
    }

    #[test]
    fn plan_alternates_and_ends_healthy_at_the_end() {
        let phases = plan(600.0);
        assert!(!phases[0].cycle);
        assert!(phases.windows(2).all(|w| w[0].cycle != w[1].cycle));
        assert!(!phases.last().unwrap().cycle);
        assert_eq!(phases.last().unwrap().until, 600.0);
        assert_eq!(phases.iter().filter(|p| p.cycle).count(), 9);
        assert!(plan(60.0).iter().all(|p| !p.cycle));
    }

    #[test]
    fn soak_section_survives_a_bench_run_and_replaces_its_old_self() {
        let bench = "# Benchmarks\n\n## Goals\n\n| a |\n";
        let with = replace_section(bench, "## Soak\n\nfirst\n");
        assert_eq!(
            with,
            "# Benchmarks\n\n## Goals\n\n| a |\n\n## Soak\n\nfirst\n"
        );
        let again = replace_section(&with, "## Soak\n\nsecond\n");
        assert_eq!(
            again,
            "# Benchmarks\n\n## Goals\n\n| a |\n\n## Soak\n\nsecond\n"
        );
        let rerun = keep_section("# Benchmarks\n\n## Goals\n\n| b |\n", &again);
        assert_eq!(
            rerun,
            "# Benchmarks\n\n## Goals\n\n| b |\n\n## Soak\n\nsecond\n"
        );
        assert_eq!(keep_section(bench, bench), bench);
        // A section in the middle is found too, and the rest kept in order.
        let middle = "# B\n\n## Soak\n\nold\n\n## Goals\n\nx\n";
        assert_eq!(
            replace_section(middle, "## Soak\n\nnew\n"),
            "# B\n\n## Goals\n\nx\n\n## Soak\n\nnew\n"
        );
        assert_eq!(
            replace_section("", "## Soak\n\nnew\n"),
            "# Benchmarks\n\n## Soak\n\nnew\n"
        );
    }

    #[test]
    fn records_read_their_type_and_time() {
        let line = r#"{"type":"loop","ts":1795574373.25,"pid":4,"reason":"a \"b\" c","evidence":{"ts":1}}"#;
        assert_eq!(json_str(line, "type").as_deref(), Some("loop"));
        assert_eq!(json_num(line, "ts"), Some(1795574373.25));
        assert_eq!(json_str(line, "reason").as_deref(), Some(r#"a \"b\" c"#));
        assert_eq!(json_num(line, "missing"), None);
    }

    #[test]
    fn judged_from_records_and_samples() {
        use std::os::unix::process::ExitStatusExt as _;
        let record = |kind: &str, ts: f64, functions: &str| Record {
            kind: kind.to_owned(),
            ts,
            line: format!(r#"{{"type":"{kind}","ts":{ts},"functions":["{functions}"]}}"#),
        };
        let phase = |cycle, from, to| Phase {
            cycle,
            from,
            to,
            reloaded: true,
        };
        let sample = |at: f64, cycle, fds| Sample {
            at,
            cycle,
            rss_kib: 5120 + at as u64,
            fds,
            ticks: at as u64 / 10,
            target_ticks: Some(at as u64),
        };
        let soak = Soak {
            planned_seconds: 120.0,
            seconds: 120.0,
            phases: vec![
                phase(false, 1000.0, 1030.0),
                phase(true, 1030.0, 1050.0),
                phase(false, 1050.0, 1080.0),
                phase(true, 1080.0, 1100.0),
                phase(false, 1100.0, 1120.0),
            ],
            samples: (0..=12)
                .map(|n| sample(f64::from(n) * 10.0, (3..5).contains(&n), 27 + n as usize))
                .collect(),
            records: vec![
                record("loop", 1033.0, "cache_invalidate"),
                record("recovered", 1040.0, "cache_invalidate"),
                record("loop", 1043.0, "cache_invalidate"),
                record("recovered", 1054.0, "cache_invalidate"),
                record("loop", 1056.0, "cache_get"),
                // In the second loop phase, but not the looping function.
                record("recovered", 1083.0, "cache_get"),
                record("loop", 1090.0, "cache_get"),
                record("recovered", 1110.0, "cache_invalidate"),
                record("warning", 1111.0, ""),
            ],
            totals: Totals::default(),
            diagnostics: Vec::new(),
            status: Some(ExitStatus::from_raw(0)),
            early: None,
        };
        let v = soak.judge();
        assert_eq!(v.loops[0].caught, Some(3.0));
        assert_eq!(v.loops[0].loop_records, 2);
        assert_eq!(v.loops[0].recovered_early, 1);
        assert_eq!(v.loops[0].recovered, Some(4.0));
        assert_eq!(v.loops[1].caught, None);
        assert_eq!(v.loops[1].recovered, Some(10.0));
        assert_eq!(v.spurious.len(), 2);
        assert_eq!(v.stray_recoveries.len(), 1);
        assert_eq!(v.unrecovered, ["cache_get"]);
        assert_eq!(v.failures.len(), 2, "{:?}", v.failures);
        assert!(v.failures[0].contains("1 of 2 loops uncaught"));
        assert!(v.failures[1].contains("fds grew from 27 to 39"));
        let md = soak.markdown(&v);
        assert!(md.starts_with("## Soak\n"), "{md}");
        assert!(md.contains("was live): 1 of 2 (3.0 s median, 3.0 s at most: loop 1)"));
        assert!(md.contains("after the fix): 2 of 2 (7.0 s median, 10.0 s at most: loop 2)"));
        assert!(md.contains("1 `loop` record(s) beyond one per phase, 1 `recovered` while"));
        assert!(md.contains(
            "false alarms: 2 `loop` record(s) that caught no injected loop (cache_get x2), \
             1 `recovered` record(s) ending them (cache_get x1); still in a loop at the (healthy) \
             end: cache_get"
        ));
        assert!(
            md.contains("| 2:00 | healthy | 5.12 | 39 | 0.10% | 1% |"),
            "{md}"
        );
        assert_eq!(soak.details(&v).len(), 5);
    }

    #[test]
    fn slope_fits_a_line() {
        let points = [(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)];
        assert_eq!(slope(&points), Some(2.0));
        assert_eq!(slope(&points[..1]), None);
    }
}
