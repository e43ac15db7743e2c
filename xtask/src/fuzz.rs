//! `cargo xtask fuzz [--time SECONDS] [TARGET...]`: the cargo-fuzz targets
//! in `fuzz/`, each run for a bounded time (60 s unless `--time` says
//! otherwise); fails on any crash and names the input that caused it.
//!
//! - `symbols`: ELF files and symbol names: `symbols.rs`'s parsing, debug
//!   files, demangling and globs;
//! - `cli_values`: durations, pids, `--key-arg`, globs and whole command
//!   lines: `cli.rs` and `config.rs`;
//! - `recording`: recording files through the reader and the replay:
//!   `recording.rs` and `replay.rs`.
//!
//! The targets are libFuzzer programs built by cargo-fuzz with
//! AddressSanitizer, overflow checks and debug assertions, for the host
//! (glibc; libFuzzer is C++). The build needs no eBPF object
//! (`CACHELOOP_NO_EBPF=1`, see profiler/build.rs) and stays in
//! `fuzz/target` for the next run. A crash is a panic, a sanitizer report,
//! one allocation over [`MALLOC_LIMIT_MB`] or one input running longer than
//! [`TIMEOUT_SECONDS`].
//!
//! The committed seeds (`fuzz/corpus/<target>`, and `tests/recordings` for
//! `recording`) are only read: what libFuzzer learns goes to
//! `fuzz/target/corpus/<target>`, kept between runs. Crash inputs land in
//! `fuzz/artifacts/<target>/`; each run's output is in
//! `fuzz/target/logs/<target>.log`, and its crash report is printed.
//!
//! Targets run side by side, as many at once as there are CPUs: with 2
//! CPUs, `--time 45` runs two rounds, 90 s, after the build.

use std::{
    fs::{self, File},
    path::Path,
    process::{Command, Stdio},
    sync::Mutex,
    thread,
    time::Instant,
};

use crate::cmd::{cargo, root, run as run_cmd};

/// Every fuzz target, as named in fuzz/Cargo.toml.
const TARGETS: &[&str] = &["symbols", "cli_values", "recording"];
const DEFAULT_SECONDS: u64 = 60;
/// libFuzzer programs run on the host; the project is x86-64 only.
const HOST: &str = "x86_64-unknown-linux-gnu";
/// No input needs one allocation this large (the largest seed is 20 KB,
/// and a recording inflates at most ~1000-fold); trusting a length field
/// from the input does.
const MALLOC_LIMIT_MB: u32 = 128;
/// One input taking this long is a hang.
const TIMEOUT_SECONDS: u32 = 10;

/// Seeds besides `fuzz/corpus/<target>`, relative to the workspace root.
fn more_seeds(target: &str) -> &'static [&'static str] {
    match target {
        "recording" => &["tests/recordings"],
        _ => &[],
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let (seconds, targets) = parse_args(args)?;
    let started = Instant::now();
    build()?;
    eprintln!(
        "xtask: fuzz targets built ({:.0} s); running {} for {seconds} s each",
        started.elapsed().as_secs_f64(),
        targets.join(", ")
    );

    let fuzzing = Instant::now();
    // Popped from its end: the targets start in the order given.
    let queue = Mutex::new(targets.iter().rev().copied().collect::<Vec<_>>());
    let failures = Mutex::new(Vec::new());
    let jobs = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(targets.len());
    thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    // Its own statement: the lock is not held while fuzzing.
                    let next = queue.lock().expect("not poisoned").pop();
                    let Some(target) = next else { break };
                    if let Err(e) = fuzz(target, seconds) {
                        failures.lock().expect("not poisoned").push(e);
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().expect("not poisoned");
    eprintln!(
        "xtask: fuzzing took {:.0} s ({jobs} at a time), {:.0} s with the build",
        fuzzing.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        return Ok(());
    }
    for failure in &failures {
        eprintln!("{failure}");
    }
    Err(format!(
        "{} of {} fuzz targets failed (above)",
        failures.len(),
        targets.len()
    ))
}

fn parse_args(args: &[String]) -> Result<(u64, Vec<&'static str>), String> {
    let usage = || {
        format!(
            "usage: cargo xtask fuzz [--time SECONDS] [TARGET...]; targets: {}",
            TARGETS.join(", ")
        )
    };
    let mut seconds = DEFAULT_SECONDS;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--time" {
            seconds = args
                .next()
                .and_then(|s| s.parse().ok())
                .filter(|&s| s > 0)
                .ok_or_else(|| format!("--time takes a number of seconds; {}", usage()))?;
        } else if let Some(&target) = TARGETS.iter().find(|t| **t == arg) {
            targets.push(target);
        } else {
            return Err(format!("unknown argument '{arg}'; {}", usage()));
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    Ok((seconds, targets))
}

/// Every target, with the pinned toolchain (`-Z sanitizer` through
/// `RUSTC_BOOTSTRAP`, which `cargo()` sets).
fn build() -> Result<(), String> {
    let mut cmd = cargo(&["fuzz", "build", "--target", HOST]);
    cmd.env("CACHELOOP_NO_EBPF", "1");
    run_cmd(cmd)
}

/// Runs one target for `seconds`; the error says what crashed and how to
/// reproduce it.
fn fuzz(target: &str, seconds: u64) -> Result<(), String> {
    let root = root();
    // Relative to the root, where the fuzzer runs: the paths it prints
    // are then short and the same on every machine.
    let fuzz_dir = Path::new("fuzz");
    let binary = fuzz_dir
        .join("target")
        .join(HOST)
        .join("release")
        .join(target);
    let corpus = fuzz_dir.join("target/corpus").join(target);
    let artifacts = fuzz_dir.join("artifacts").join(target);
    let scratch = fuzz_dir.join("target/tmp");
    let log_path = fuzz_dir.join("target/logs").join(format!("{target}.log"));
    for dir in [&corpus, &artifacts, &scratch, &fuzz_dir.join("target/logs")] {
        fs::create_dir_all(root.join(dir))
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let log = File::create(root.join(&log_path))
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("cannot write {}: {e}", log_path.display()))?;

    let mut cmd = Command::new(root.join(&binary));
    cmd.arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
        .arg(format!("-timeout={TIMEOUT_SECONDS}"))
        .arg("-print_final_stats=1")
        // New inputs go to the first directory; the seeds stay as committed.
        .arg(&corpus)
        .arg(fuzz_dir.join("corpus").join(target))
        .args(more_seeds(target))
        .current_dir(&root)
        // As `cargo fuzz run` sets it.
        .env("ASAN_OPTIONS", "detect_odr_violation=0")
        // Where a target writes its scratch files.
        .env("TMPDIR", root.join(&scratch))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let output =
        String::from_utf8_lossy(&fs::read(root.join(&log_path)).unwrap_or_default()).into_owned();
    if status.success() {
        eprintln!("xtask: fuzz {target}: {}, no crash", stats(&output));
        return Ok(());
    }

    let inputs: Vec<&str> = output
        .lines()
        .filter_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
        .collect();
    let mut report = format!(
        "== fuzz {target} failed ({status}); its report (the whole output is in {}):\n{}",
        log_path.display(),
        crash_report(&output)
    );
    if inputs.is_empty() {
        report.push_str(&format!(
            "xtask: fuzz {target}: no crash input was written\n"
        ));
    }
    for input in inputs {
        report.push_str(&format!(
            "xtask: fuzz {target}: crash input {input}\n\
             xtask: reproduce with: {} {input}\n",
            binary.display()
        ));
    }
    Err(report)
}

/// `12,345 runs (270/s), coverage 6660, corpus 752 inputs` from
/// libFuzzer's closing lines.
fn stats(output: &str) -> String {
    let stat = |name: &str| {
        output
            .lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map_or("?", str::trim)
    };
    // `#5457	DONE   cov: 6660 ft: 27076 corp: 752/1493Kb ...`
    let last = output
        .lines()
        .rev()
        .find(|l| l.contains(" cov: "))
        .unwrap_or("");
    let field = |name: &str| {
        last.split_whitespace()
            .skip_while(|w| *w != name)
            .nth(1)
            .unwrap_or("?")
            .split('/')
            .next()
            .unwrap_or("?")
            .to_owned()
    };
    format!(
        "{} runs ({}/s), coverage {}, corpus {} inputs",
        stat("number_of_executed_units"),
        stat("average_exec_per_sec"),
        field("cov:"),
        field("corp:")
    )
}

/// The crash report from libFuzzer's output: from the panic or sanitizer
/// message on, without the progress lines before it.
fn crash_report(output: &str) -> String {
    const MARKERS: &[&str] = &[
        "panicked at",
        "==ERROR",
        "ERROR: libFuzzer",
        "deadly signal",
    ];
    const MOST: usize = 200;
    let lines: Vec<&str> = output.lines().collect();
    let start = lines
        .iter()
        .position(|l| MARKERS.iter().any(|m| l.contains(m)))
        .unwrap_or_else(|| lines.len().saturating_sub(40));
    let mut out = String::new();
    for line in lines.iter().skip(start).take(MOST) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// The seed directories of `target`.
    fn seed_dirs(target: &str) -> Vec<PathBuf> {
        let root = root();
        std::iter::once(root.join("fuzz/corpus").join(target))
            .chain(more_seeds(target).iter().map(|s| root.join(s)))
            .collect()
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn time_and_targets_parse() {
        let (s, t) = parse_args(&args(&[])).unwrap();
        assert_eq!(s, DEFAULT_SECONDS);
        assert_eq!(t.len(), TARGETS.len());
        let (s, t) = parse_args(&args(&["--time", "45", "symbols"])).unwrap();
        assert_eq!((s, t), (45, vec!["symbols"]));
        assert!(parse_args(&args(&["--time"])).is_err());
        assert!(parse_args(&args(&["--time", "0"])).is_err());
        assert!(parse_args(&args(&["nonesuch"])).is_err());
    }

    #[test]
    fn every_target_has_seeds() {
        for target in TARGETS {
            for dir in seed_dirs(target) {
                let seeds = fs::read_dir(&dir)
                    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                    .count();
                assert!(seeds > 0, "{} is empty", dir.display());
            }
        }
    }

    #[test]
    fn closing_stats_are_read() {
        let output = "#11\tINITED cov: 5075 ft: 10538 corp: 7/34Kb exec/s: 0 rss: 62Mb\n\
                      #5457\tDONE   cov: 6660 ft: 27076 corp: 752/1493Kb lim: 12648 exec/s: 341 rss: 469Mb\n\
                      stat::number_of_executed_units: 5457\n\
                      stat::average_exec_per_sec:     341\n";
        assert_eq!(
            stats(output),
            "5457 runs (341/s), coverage 6660, corpus 752 inputs"
        );
    }

    #[test]
    fn crash_report_starts_at_the_panic() {
        let output = "#1 NEW cov: 1\n#2 NEW cov: 2\n\
                      thread '<unnamed>' panicked at profiler/src/x.rs:1:1:\nboom\n\
                      ==1== ERROR: libFuzzer: deadly signal\n";
        assert!(crash_report(output).starts_with("thread '<unnamed>' panicked"));
    }
}
