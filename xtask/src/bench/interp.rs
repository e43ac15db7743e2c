//! The interpreters' row of the bench: what counting an interpreted
//! function costs the interpreter. A hot PHP (and Ruby) function is called
//! flat out and its calls/s measured: plain; with the runtime's probes
//! switched on but nothing attached (`USE_ZEND_DTRACE=1`, or Ruby's
//! TracePoint, which the probes need); counted by cacheloop with every call
//! trapped (`--max-overhead 100`); and under `--max-overhead 5`.
//!
//! Python is not in it: Debian's CPython 3.11 never fires its
//! `function__entry` probe (CPython issue 98894), and cacheloop refuses
//! `py:` there.
//!
//!     cargo xtask bench --interpreters     # this section alone

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use super::median;

pub const HEADING: &str = "## Interpreters";

/// Seconds each hot run lasts; rates from the third second on (the first
/// include attaching).
const SECONDS: u32 = 8;

const PHP: &str = r#"<?php
function hot_lookup(int $x): int { return $x + 1; }
$seconds = (int)$argv[1];
printf("ready %d\n", getmypid());
$start = microtime(true);
for ($s = 0; $s < $seconds; $s++) {
    $n = 0;
    $until = $start + $s + 1;
    while (microtime(true) < $until) {
        for ($i = 0; $i < 1000; $i++) { hot_lookup($i); }
        $n += 1000;
    }
    printf("second %d %d\n", $s, $n);
}
"#;

const RUBY: &str = r#"
def hot_lookup(x) = x + 1
TracePoint.new(:call) {}.enable if ENV["RUBY_DTRACE_TRACEPOINT"] == "1"
seconds = ARGV[0].to_i
puts "ready #{Process.pid}"
$stdout.flush
start = Process.clock_gettime(Process::CLOCK_MONOTONIC)
seconds.times do |s|
  n = 0
  stop = start + s + 1
  while Process.clock_gettime(Process::CLOCK_MONOTONIC) < stop
    1000.times { |i| hot_lookup(i) }
    n += 1000
  end
  puts "second #{s} #{n}"
  $stdout.flush
end
"#;

struct Runtime {
    label: &'static str,
    program: &'static str,
    script: &'static str,
    file: &'static str,
    /// The environment that switches the runtime's probes on.
    switch: &'static str,
    pattern: &'static str,
}

const RUNTIMES: [Runtime; 2] = [
    Runtime {
        label: "PHP 8.2",
        program: "php8.2",
        script: PHP,
        file: "hot.php",
        switch: "USE_ZEND_DTRACE=1",
        pattern: "php:hot_lookup",
    },
    Runtime {
        label: "Ruby 3.1",
        program: "ruby",
        script: RUBY,
        file: "hot.rb",
        switch: "RUBY_DTRACE_TRACEPOINT=1",
        pattern: "rb:Object#hot_lookup",
    },
];

/// One hot run: the median calls/s from the third second on, with
/// cacheloop attached (`max_overhead`) or not, the probes switched on or
/// not.
fn hot(
    cacheloop: &Path,
    dir: &Path,
    rt: &Runtime,
    switched: bool,
    max_overhead: Option<&str>,
) -> Result<f64, String> {
    let mut command = Command::new(rt.program);
    command
        .arg(dir.join(rt.file))
        .arg(SECONDS.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if switched {
        let (key, value) = rt.switch.split_once('=').expect("VAR=value");
        command.env(key, value);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", rt.program))?;
    let pid = child.id();
    let out = BufReader::new(child.stdout.take().expect("piped"));
    let mut watcher = None;
    let mut rates = Vec::new();
    for line in out.lines().map_while(Result::ok) {
        if line.starts_with("ready") {
            if let Some(budget) = max_overhead {
                watcher = Some(
                    Command::new(cacheloop)
                        .args(["watch", "--pid", &pid.to_string(), "--func", rt.pattern])
                        .args(["--max-overhead", budget, "--json"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .map_err(|e| format!("cannot start cacheloop: {e}"))?,
                );
            }
            continue;
        }
        let mut w = line.split_whitespace().skip(1);
        if let (Some(Ok(second)), Some(Ok(calls))) = (
            w.next().map(str::parse::<u32>),
            w.next().map(str::parse::<f64>),
        ) && second >= 2
        {
            rates.push(calls);
        }
    }
    let _ = child.wait();
    if let Some(w) = watcher {
        super::stop(w);
    }
    if rates.is_empty() {
        return Err(format!("{} printed no rates", rt.program));
    }
    Ok(median(&mut rates))
}

/// Measures each runtime installed here; returns the section.
pub fn run(cacheloop: &Path, dir: &Path, runs: usize) -> Result<String, String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut section = format!(
        "{HEADING}\n\nA hot interpreted function called flat out (`hot_lookup`, {} s runs, medians of {runs}, rates from the third second), in calls/s and as a share of the plain interpreter's. \"switched on\": the environment the runtime's probes need, nothing attached (PHP's `USE_ZEND_DTRACE=1` runs every call through its DTrace hooks; Ruby's probes need a TracePoint enabled). Python is not measured: Debian's CPython 3.11 never fires `function__entry` (CPython issue 98894).\n\n| runtime | plain | switched on | cacheloop `--max-overhead 100` | cacheloop `--max-overhead 5` |\n|---|---|---|---|---|\n",
        SECONDS
    );
    for rt in &RUNTIMES {
        if Command::new(rt.program).arg("--version").output().is_err() {
            eprintln!("xtask: {} not installed; its row is left out", rt.program);
            continue;
        }
        fs::write(dir.join(rt.file), rt.script)
            .map_err(|e| format!("cannot write {}: {e}", rt.file))?;
        let cases: [(bool, Option<&str>); 4] = [
            (false, None),
            (true, None),
            (true, Some("100")),
            (true, Some("5")),
        ];
        let mut rates = [const { Vec::new() }; 4];
        // Round robin: the machine's load drifts.
        for _ in 0..runs {
            for (i, (switched, budget)) in cases.iter().enumerate() {
                eprintln!("xtask: bench {} {switched} {budget:?}", rt.label);
                rates[i].push(hot(cacheloop, dir, rt, *switched, *budget)?);
            }
        }
        let medians: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
        let cell = |r: f64| format!("{:.0} ({:.2}x)", r, r / medians[0].max(1.0));
        let _ = writeln!(
            section,
            "| {} | {:.0} | {} | {} | {} |",
            rt.label,
            medians[0],
            cell(medians[1]),
            cell(medians[2]),
            cell(medians[3])
        );
    }
    Ok(section)
}
