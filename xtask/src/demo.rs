//! `cargo xtask demo`: the postmortem, replayed in under half a minute.
//!
//! Starts demo-cache with a healthy dependency configuration, attaches
//! cacheloop to it by pid, lets healthy traffic set the baseline, then
//! deploys the configuration with a cycle, as happened in the incident.
//! cacheloop catches the loop, explains it and exits 3; the demo then stops
//! demo-cache by its pid, says how long the catch took, and writes the
//! incident report of the run's recording (`cacheloop report`).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::cmd::root;

const HEALTHY_SECONDS: u64 = 6;

pub fn run() -> Result<(), String> {
    replay(&crate::cmd::bin_dir(), false).map(drop)
}

/// The demo with the binaries in `bin`; returns the seconds from the bad
/// rules going live to cacheloop's verdict. `quiet` (the benchmark) shows
/// nothing of it.
pub fn replay(bin: &std::path::Path, quiet: bool) -> Result<f64, String> {
    let root = root();
    let say = |line: &str| {
        if !quiet {
            println!("{line}");
        }
    };
    let work = root.join("target/demo");
    fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let deps = work.join("deps.conf");
    fs::copy(root.join("demo/config/healthy.deps"), &deps)
        .map_err(|e| format!("cannot write {}: {e}", deps.display()))?;

    say("== cacheloop demo: the invalidation-loop postmortem, replayed");
    say("== demo-cache serves 2,000 reads/s and 100 writes/s; each write invalidates");
    say("== a key and, through the dependency rules, the keys that depend on it.\n");

    let mut cache = Command::new(bin.join("demo-cache"))
        .arg("--deps")
        .arg(&deps)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start demo-cache: {e}"))?;
    let mut lines = BufReader::new(cache.stdout.take().ok_or("no stdout")?).lines();
    let pid = lines
        .next()
        .and_then(Result::ok)
        .and_then(|l| l.strip_prefix("ready ").map(str::to_owned))
        .ok_or("demo-cache did not start")?;
    // Keep reading its output so it never blocks on a full pipe.
    thread::spawn(move || {
        lines.map_while(Result::ok).for_each(|l| {
            if !quiet {
                println!("   [demo-cache] {l}")
            }
        })
    });

    let result = watch_and_break(bin, &pid, &deps, &root, quiet);
    // Ours, by its pid: stopped before the report and the gate, so its
    // loop does not burn a core under them.
    let _ = cache.kill();
    let _ = cache.wait();
    if result.is_ok() && !quiet {
        report(bin, &work.join("incident.rec"))?;
        gate(bin, &root)?;
    }
    result
}

fn watch_and_break(
    bin: &std::path::Path,
    pid: &str,
    deps: &std::path::Path,
    root: &std::path::Path,
    quiet: bool,
) -> Result<f64, String> {
    if !quiet {
        println!(
            "$ cacheloop watch --pid {pid} --func 'cache_*' --key-arg 0:str --show-keys --fail-on-loop --record target/demo/incident.rec\n"
        );
    }
    let mut watcher = Command::new(bin.join("cacheloop"));
    watcher.arg("watch");
    let recording = root.join("target/demo/incident.rec");
    if quiet {
        watcher.stdout(Stdio::null());
    } else {
        // The evidence, kept for the incident report at the end.
        watcher.arg("--record").arg(&recording);
    }
    let mut watcher = watcher
        .args([
            "--pid",
            pid,
            "--func",
            "cache_*",
            // Argument 0 of each cache_* function is the key (a C string):
            // with it, cacheloop names the dependency cycle itself. The
            // demo's keys are not personal data, so they are shown.
            "--key-arg",
            "0:str",
            "--show-keys",
            "--fail-on-loop",
            "--duration",
            "45s",
        ])
        .spawn()
        .map_err(|e| format!("cannot start cacheloop: {e}"))?;

    thread::sleep(Duration::from_secs(HEALTHY_SECONDS));
    if !quiet {
        println!(
            "\n== deploying the new dependency rules: fragment:nav -> page:catalog (a cycle)\n"
        );
    }
    let staged = deps.with_extension("new");
    fs::copy(root.join("demo/config/cycle.deps"), &staged).map_err(|e| e.to_string())?;
    fs::rename(&staged, deps).map_err(|e| e.to_string())?;
    let deployed = Instant::now();

    let status = watcher.wait().map_err(|e| format!("cacheloop: {e}"))?;
    let caught = deployed.elapsed().as_secs_f64();
    match status.code() {
        Some(3) => {
            if !quiet {
                println!(
                    "\n== caught: cacheloop exited 3 (loop found) {caught:.1} s after the bad rules went live."
                );
                println!("== In the incident this took people more than two hours.");
            }
            Ok(caught)
        }
        other => Err(format!(
            "cacheloop exited with {other:?}, not 3: the loop was not caught"
        )),
    }
}

/// Writes the incident report of the demo's recording and says where.
fn report(bin: &std::path::Path, recording: &std::path::Path) -> Result<(), String> {
    let page = recording.with_extension("html");
    let status = Command::new(bin.join("cacheloop"))
        .arg("report")
        .arg(recording)
        .arg("-o")
        .arg(&page)
        .status()
        .map_err(|e| format!("cannot run cacheloop report: {e}"))?;
    if !status.success() {
        return Err(format!("cacheloop report failed ({status})"));
    }
    println!(
        "== incident report: {}\n   (one page, opens offline: charts, the verdict and its evidence;\n    `cacheloop report {} --format md` gives Markdown for the postmortem)",
        page.display(),
        recording.display()
    );
    Ok(())
}

/// The pre-deploy gate: each rules file checked under `cacheloop run`
/// before it would reach production.
fn gate(bin: &std::path::Path, root: &std::path::Path) -> Result<(), String> {
    println!(
        "\n== the pre-deploy gate: each rules file tried under `cacheloop run` before it ships"
    );
    for (rules, seconds, expected) in [("cycle.deps", "60s", 3), ("healthy.deps", "5s", 0)] {
        let config = root.join("demo/config").join(rules);
        println!(
            "$ cacheloop run --func 'cache_*' --key-arg 0:str --fail-on-loop --duration {seconds} -- demo-cache --deps {rules}"
        );
        let out = Command::new(bin.join("cacheloop"))
            .args([
                "run",
                "--func",
                "cache_*",
                "--key-arg",
                "0:str",
                "--fail-on-loop",
            ])
            .args(["--duration", seconds, "--json", "--"])
            .arg(bin.join("demo-cache"))
            .arg("--deps")
            .arg(&config)
            // The verdict is the exit status; the records are not shown
            // (stderr is kept to explain a failure).
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot run cacheloop run: {e}"))?;
        let code = out.status.code();
        println!(
            "   exit {}: {}",
            code.map_or_else(|| "by a signal".to_owned(), |c| c.to_string()),
            match code {
                Some(3) => "a loop: the pipeline fails, the rules do not ship",
                Some(0) => "no loop: the rules may ship",
                _ => "unexpected",
            }
        );
        if code != Some(expected) {
            let said: Vec<String> = String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| l.starts_with("cacheloop:"))
                .map(str::to_owned)
                .collect();
            return Err(format!(
                "the gate on {rules} exited {code:?}, not {expected}: {}",
                said.join("; ")
            ));
        }
    }
    Ok(())
}
