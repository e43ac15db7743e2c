//! `cargo xtask vm-test`: the kernel tests on other kernels, in VMs.
//!
//!     cargo xtask vm-test [--kernel 6.1 --kernel 6.12 ...] [--timeout SECS]
//!                         [--self-test] [-- test-binary args]
//!
//! For each kernel: fetch Debian's cloud image (cached), boot it under qemu
//! with an initramfs holding the same static binaries the host tests ran,
//! run the kernel-test suite inside, and read the result from the serial
//! console. Prints a table and fails on any failed test, panic or hang.
//!
//! `--self-test` checks the runner itself: a guest whose test fails, one
//! whose kernel panics and one that never finishes must each fail the run.

mod guest;
mod image;
mod kernels;

use std::{path::Path, time::Duration};

use crate::cmd;
use guest::{Boot, Outcome, Report};

/// Kernels when none is named: the oldest supported (no uprobe_multi) and
/// a current LTS.
const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12"];
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(900);

/// The test the self-test expects to fail (ignored in normal runs).
const FAILING_TEST: &str = "lifecycle::vm_runner_sees_this_test_fail";

struct Options {
    kernels: Vec<String>,
    timeout: Duration,
    self_test: bool,
    test_args: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        kernels: Vec::new(),
        timeout: DEFAULT_TIMEOUT,
        self_test: false,
        test_args: Vec::new(),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match arg.as_str() {
            "--kernel" => options.kernels.push(value("--kernel")?),
            "--timeout" => {
                let secs = value("--timeout")?;
                let secs: u64 = secs
                    .parse()
                    .map_err(|_| format!("--timeout takes seconds, not '{secs}'"))?;
                options.timeout = Duration::from_secs(secs);
            }
            "--self-test" => options.self_test = true,
            "--" => {
                options.test_args.extend(args.by_ref().cloned());
            }
            other => {
                return Err(format!(
                    "vm-test: unknown argument '{other}'; usage: cargo xtask vm-test \
                     [--kernel VERSION]... [--timeout SECS] [--self-test] [-- test args]"
                ));
            }
        }
    }
    if options.kernels.is_empty() {
        options.kernels = DEFAULT_KERNELS.iter().map(|k| k.to_string()).collect();
    }
    // One test at a time in the guest. Under TCG a probe hit costs
    // 80-250 us (2-5 us on the host), and two tests on the guest's two
    // vCPUs starve each other's targets: a looping thread cannot pin a
    // core, nor outrun its baseline, while the other test's fixture spins
    // beside it. Measured on 6.1: the demo's key cycle went unconfirmed
    // for 35 s with two threads, and was caught in seconds with one.
    if !options
        .test_args
        .iter()
        .any(|a| a.starts_with("--test-threads"))
    {
        options.test_args.insert(0, "--test-threads=1".to_owned());
    }
    Ok(options)
}

/// One boot per kernel: the guest's arguments, and for the self-test the
/// outcome it must come to.
struct Case {
    label: &'static str,
    args: Vec<String>,
    timeout: Duration,
    expected: Option<Outcome>,
}

/// A failing test (ignored in normal runs), a kernel panic and a guest that
/// never finishes (stopped after 30 s).
fn self_test_cases(timeout: Duration) -> Vec<Case> {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect();
    vec![
        Case {
            label: " failing-test",
            args: args(&["--ignored", "--exact", FAILING_TEST]),
            timeout,
            expected: Some(Outcome::Failed(101)),
        },
        Case {
            label: " panic",
            args: args(&["@panic"]),
            timeout,
            expected: Some(Outcome::Panic),
        },
        Case {
            label: " hang",
            args: args(&["@hang"]),
            timeout: Duration::from_secs(30),
            expected: Some(Outcome::Hang),
        },
    ]
}

/// Why a guest's run says nothing about the tests, if it does not: they
/// get one more boot (one, so that a crash that comes back fails the run).
///
/// - The kernel died or stalled before our init said a word: no test ran.
///   Under TCG that happens now and then (seen: an oops in
///   sched_clock_cpu during early initcalls, one boot in dozens).
/// - The kernel oopsed on an int3 in its own text (see
///   `Report::int3_oops`): the kernel's own code patching under TCG. The
///   test binary also keeps the key the tests used to toggle switched on
///   (`steady_guest_kernel` in the test helpers), so this should not
///   come back.
fn emulator_crash(report: &Report, outcome: &Outcome, case: &Case) -> Option<String> {
    if report.release.is_none() {
        Some(format!("died before its init ran ({})", outcome.describe()))
    } else if !outcome.ok() && report.int3_oops && case.expected.is_none() {
        Some(format!(
            "trapped on an int3 in kernel text, the kernel patching itself under TCG ({})",
            outcome.describe()
        ))
    } else {
        None
    }
}

/// One row of the table.
struct Row {
    kernel: String,
    release: String,
    report: Report,
    outcome: Outcome,
    seconds: f64,
    expected: Option<Outcome>,
    /// Why the first boot did not count, if it did not.
    retried: Option<String>,
}

pub fn run(args: &[String]) -> Result<(), String> {
    let options = parse_args(args)?;
    let root = cmd::root();
    let vm_dir = root.join("target/vm");
    let kernels = options
        .kernels
        .iter()
        .map(|spec| kernels::fetch(&vm_dir, spec))
        .collect::<Result<Vec<_>, _>>()?;
    let kernel_tests = cmd::kernel_test_binary()?;
    let bin_dir = cmd::bin_dir();
    let initramfs = image::build(
        &vm_dir,
        &image::Inputs {
            root: &root,
            bin_dir: &bin_dir,
            kernel_tests: &kernel_tests,
        },
    )?;

    let cases = if options.self_test {
        self_test_cases(options.timeout)
    } else {
        vec![Case {
            label: "",
            args: options.test_args.clone(),
            timeout: options.timeout,
            expected: None,
        }]
    };

    let mut rows = Vec::new();
    for kernel in &kernels {
        for case in &cases {
            let name = format!("{}{}", kernel.spec, case.label);
            eprintln!(
                "xtask: booting {} ({}){}",
                kernel.spec,
                kernel.package,
                match case.label {
                    "" => " for the kernel tests",
                    label => label,
                }
            );
            let log = vm_dir.join(format!("{}.log", name.replace(' ', "-")));
            let boot = Boot {
                vmlinuz: &kernel.vmlinuz,
                initramfs: &initramfs,
                args: &case.args,
                timeout: case.timeout,
                log: log.clone(),
            };
            let (mut report, mut outcome, mut took) = guest::boot(&boot)?;
            let retried = emulator_crash(&report, &outcome, case);
            if let Some(why) = &retried {
                // The guest's kernel died of the emulator, not of a test:
                // one more boot, saying so, and the first console kept.
                let kept = log.with_extension("first.log");
                let console = match std::fs::rename(&log, &kept) {
                    Ok(()) => format!("its console: {}", kept.display()),
                    Err(e) => format!("its console could not be kept: {e}"),
                };
                eprintln!("xtask: {name} {why}; booting it once more ({console})");
                (report, outcome, took) = guest::boot(&boot)?;
            }
            if !outcome.ok() && case.expected.is_none() {
                show_failure(&log, &report);
            }
            rows.push(Row {
                kernel: name,
                release: report.release.clone().unwrap_or_else(|| "?".to_owned()),
                report,
                outcome,
                seconds: took.as_secs_f64(),
                expected: case.expected.clone(),
                retried,
            });
        }
    }
    print_table(&rows);

    if options.self_test {
        let wrong: Vec<String> = rows
            .iter()
            .filter(|r| r.expected.as_ref() != Some(&r.outcome) || r.outcome.ok())
            .map(|r| format!("{}: {}", r.kernel, r.outcome.describe()))
            .collect();
        return if wrong.is_empty() {
            println!(
                "self-test: a failing test, a panic and a hang each fail the run, as they must"
            );
            Ok(())
        } else {
            Err(format!(
                "self-test: the runner misread a guest: {}",
                wrong.join(", ")
            ))
        };
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.outcome.ok())
        .map(|r| r.kernel.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("kernel tests failed on {}", failed.join(", ")))
    }
}

/// The failing tests' names and the end of the console, so CI shows why.
fn show_failure(log: &Path, report: &Report) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(60)..];
    eprintln!("---- end of {} ----", log.display());
    for line in tail {
        eprintln!("{}", line.trim_end_matches('\r'));
    }
    eprintln!("----");
    for test in &report.failures {
        eprintln!("xtask: failed in the guest: {test}");
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<18} {:<28} {:>6} {:>6} {:>7} {:>7} {:>6}  result",
        "kernel", "release", "passed", "failed", "skipped", "ignored", "secs"
    );
    for row in rows {
        let r = &row.report;
        let result = match &row.expected {
            Some(expected) => format!(
                "{} (expected {})",
                row.outcome.describe(),
                expected.describe()
            ),
            None => row.outcome.describe(),
        };
        let result = match &row.retried {
            Some(why) => format!("{result} (second boot: the first {why})"),
            None => result,
        };
        println!(
            "{:<18} {:<28} {:>6} {:>6} {:>7} {:>7} {:>6.0}  {result}",
            row.kernel,
            row.release,
            r.passed,
            r.failed,
            r.skipped.len(),
            r.ignored,
            row.seconds,
        );
    }
    for row in rows.iter().filter(|r| r.expected.is_none()) {
        for test in &row.report.skipped {
            println!("  {} skipped {test}", row.kernel);
        }
    }
}
