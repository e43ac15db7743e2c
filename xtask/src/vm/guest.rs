//! One guest: boot a kernel under qemu (software emulation), let its init
//! run the kernel tests, and read what happened from the serial console.
//!
//! `/dev/kvm` may exist and still not work (a nested or paravirtual host):
//! stock kernels hang or abort under `-accel kvm` on such machines, so the
//! guest always runs under TCG with `-cpu max`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// What a guest run came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The test binary exited 0.
    Passed,
    /// The test binary exited with this code.
    Failed(i32),
    /// The kernel panicked.
    Panic,
    /// No result within the timeout; the guest was stopped.
    Hang,
    /// qemu ended before the tests said anything (it could not boot).
    NoResult,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        *self == Self::Passed
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Passed => "ok".to_owned(),
            Self::Failed(code) => format!("FAILED (exit {code})"),
            Self::Panic => "KERNEL PANIC".to_owned(),
            Self::Hang => "HUNG (timed out)".to_owned(),
            Self::NoResult => "NO RESULT (did not boot?)".to_owned(),
        }
    }
}

/// What the serial console said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// `uname -r` in the guest.
    pub release: Option<String>,
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
    /// Tests that said they skip (they pass, doing nothing here).
    pub skipped: Vec<String>,
    /// Names of the failed tests.
    pub failures: Vec<String>,
    /// The test binary's exit code.
    pub exit: Option<i32>,
    pub panicked: bool,
    /// The kernel oopsed on an int3 in its own text. Nothing the tests do
    /// writes kernel text: the kernel does, patching its static keys, and
    /// under TCG a vCPU can trap on the patch's int3 after the kernel has
    /// taken it away (seen once on 6.12, at `__schedule`). In a task rather
    /// than in an interrupt, such an oops kills the task, not the kernel:
    /// the run then fails or hangs instead of panicking.
    pub int3_oops: bool,
}

/// Reads a serial console log. Lines may end in `\r` and kernel messages
/// may sit between test lines; every marker is looked for on its own line.
pub fn parse(log: &str) -> Report {
    let mut report = Report::default();
    for line in log.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(release) = after(line, "cacheloop-vm: kernel ") {
            report.release = Some(release.trim().to_owned());
        } else if let Some(code) = after(line, "cacheloop-vm: exit ") {
            report.exit = code.trim().parse().ok();
        } else if let Some(rest) = line.split("cacheloop-test skipped: ").nth(1) {
            let test = rest.split(": ").next().unwrap_or(rest).to_owned();
            if !report.skipped.contains(&test) {
                report.skipped.push(test);
            }
        } else if let Some(rest) = line.strip_prefix("test result: ") {
            report.passed += count(rest, " passed");
            report.failed += count(rest, " failed");
            report.ignored += count(rest, " ignored");
        } else if let Some(test) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            report.failures.push(test.to_owned());
        }
        if line.contains("Kernel panic - not syncing") {
            report.panicked = true;
        }
        if is_int3_oops(line) {
            report.int3_oops = true;
        }
    }
    report
}

/// "Oops: int3: 0000 [#1] ..." (6.10 and later) or "int3: 0000 [#1] ..."
/// (before): the kernel's die message for a trap in its own code.
fn is_int3_oops(line: &str) -> bool {
    line.match_indices("int3: ").any(|(at, marker)| {
        let rest = &line[at + marker.len()..];
        rest.len() >= 7
            && rest.as_bytes()[..4].iter().all(u8::is_ascii_hexdigit)
            && rest[4..].starts_with(" [#")
    })
}

/// The rest of `line` after `marker` (the console may put terminal escapes
/// in front of it).
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|at| &line[at + marker.len()..])
}

/// The number before `what` in "ok. 38 passed; 0 failed; ...".
fn count(summary: &str, what: &str) -> u32 {
    summary
        .split(';')
        .find(|part| part.contains(what))
        .and_then(|part| part.split_whitespace().rev().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// What the run came to, from the report and whether it timed out.
pub fn outcome(report: &Report, timed_out: bool) -> Outcome {
    if report.panicked {
        Outcome::Panic
    } else if let Some(code) = report.exit {
        if code == 0 {
            Outcome::Passed
        } else {
            Outcome::Failed(code)
        }
    } else if timed_out {
        Outcome::Hang
    } else {
        Outcome::NoResult
    }
}

/// One boot.
pub struct Boot<'a> {
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    /// Arguments for the guest's init (the test binary's, or `@panic`...).
    pub args: &'a [String],
    pub timeout: Duration,
    /// Where the serial console is written.
    pub log: PathBuf,
}

/// Boots the guest and waits for it to power off, panic or time out.
pub fn boot(boot: &Boot) -> Result<(Report, Outcome, Duration), String> {
    let log = fs::File::create(&boot.log)
        .map_err(|e| format!("cannot create {}: {e}", boot.log.display()))?;
    let mut append = String::from("console=ttyS0 panic=-1 quiet --");
    for arg in boot.args {
        append.push(' ');
        append.push_str(arg);
    }
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "2G", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-net", "none"])
        .arg("-kernel")
        .arg(boot.vmlinuz)
        .arg("-initrd")
        .arg(boot.initramfs)
        .arg("-append")
        .arg(&append)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let mut timed_out = false;
    loop {
        match qemu.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() > boot.timeout => {
                // Our own qemu, by its pid.
                let _ = qemu.kill();
                let _ = qemu.wait();
                timed_out = true;
                break;
            }
            Ok(None) => thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("cannot wait for qemu: {e}")),
        }
    }
    let text =
        fs::read(&boot.log).map_err(|e| format!("cannot read {}: {e}", boot.log.display()))?;
    let report = parse(&String::from_utf8_lossy(&text));
    let outcome = outcome(&report, timed_out);
    Ok((report, outcome, started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSING: &str = "\
[    0.000000] Linux version 6.1.0-56-cloud-amd64\r
c\x1b[?7l\x1b[2Jcacheloop-vm: kernel 6.1.0-56-cloud-amd64\r
running 3 tests\r
test kernels::watch_on_6_6_or_later_attaches_one_uprobe_multi_link ... cacheloop-test skipped: kernels::watch_on_6_6_or_later_attaches_one_uprobe_multi_link: needs Linux 6.6 or later (uprobe_multi); this is 6.1.0-56-cloud-amd64\r
ok\r
test counting::watch_glob_over_several_functions_counts_each ... ok\r
[   12.345678] random: crng init done\r
test lifecycle::vm_runner_sees_this_test_fail ... ignored\r
\r
test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 40.10s\r
\r
cacheloop-vm: exit 0\r
[   50.000000] reboot: Power down\r
";

    #[test]
    fn parse_passing_run_counts_tests_and_skips() {
        let report = parse(PASSING);
        assert_eq!(report.release.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!((report.passed, report.failed, report.ignored), (2, 0, 1));
        assert_eq!(
            report.skipped,
            ["kernels::watch_on_6_6_or_later_attaches_one_uprobe_multi_link"]
        );
        assert_eq!(report.exit, Some(0));
        assert_eq!(outcome(&report, false), Outcome::Passed);
    }

    #[test]
    fn parse_failed_test_is_a_failure_with_its_name() {
        let log = "\
cacheloop-vm: kernel 6.12.117+deb12-cloud-amd64
test lifecycle::vm_runner_sees_this_test_fail ... FAILED
test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 41 filtered out; finished in 0.00s
cacheloop-vm: exit 101
";
        let report = parse(log);
        assert_eq!(
            report.failures,
            ["lifecycle::vm_runner_sees_this_test_fail"]
        );
        assert_eq!(report.failed, 1);
        assert_eq!(outcome(&report, false), Outcome::Failed(101));
        assert!(!outcome(&report, false).ok());
    }

    #[test]
    fn parse_panic_wins_over_everything() {
        let log = "cacheloop-vm: kernel 6.1.0-56-cloud-amd64\r\n\
            [    3.1] Kernel panic - not syncing: sysrq triggered crash\r\n";
        assert_eq!(outcome(&parse(log), false), Outcome::Panic);
        assert_eq!(outcome(&parse(log), true), Outcome::Panic);
    }

    #[test]
    fn an_oops_on_a_kernel_int3_is_a_panic_the_runner_can_tell_apart() {
        let log = "cacheloop-vm: kernel 6.12.118+deb12-cloud-amd64\r\n\
            test runtimes::symbols_lists ... [  503.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\r\n\
            [  503.1] RIP: 0010:__schedule+0x407/0xbf0\r\n\
            [  503.2] Kernel panic - not syncing: Fatal exception in interrupt\r\n";
        let report = parse(log);
        assert_eq!(outcome(&report, false), Outcome::Panic);
        assert!(report.int3_oops);
        let sysrq = parse("[    3.1] Kernel panic - not syncing: sysrq triggered crash\n");
        assert!(sysrq.panicked && !sysrq.int3_oops);
        // 6.1 says it without "Oops: "; a test's name or output saying
        // "int3" is not one.
        assert!(parse("[   80.2] int3: 0000 [#1] PREEMPT SMP NOPTI\n").int3_oops);
        assert!(!parse("test probes::int3_is_restored ... ok\n").int3_oops);
        assert!(!parse("int3: 00zz [#1]\n").int3_oops);
    }

    #[test]
    fn silence_until_the_timeout_is_a_hang_and_an_early_end_is_no_result() {
        let log = "cacheloop-vm: kernel 6.1.0-56-cloud-amd64\n";
        assert_eq!(outcome(&parse(log), true), Outcome::Hang);
        assert_eq!(outcome(&parse(""), false), Outcome::NoResult);
        assert!(!Outcome::Hang.ok() && !Outcome::NoResult.ok());
    }
}
