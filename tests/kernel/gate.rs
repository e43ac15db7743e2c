//! `cacheloop run -- CMD`: the pre-deploy gate. Probes in from CMD's first
//! instruction, its exit status passed on, signals passed through, and a
//! loop (from the first instruction too) failing the gate with exit 3.

use std::{
    fs,
    time::{Duration, Instant},
};

use cacheloop_tests::{Cacheloop, Run, demo_bin, demo_config, fixture_bin, require_root};
use serde_json::Value;

fn run(args: &[&str], command: &[&str]) -> Run {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.push("--json");
    all.push("--");
    all.extend_from_slice(command);
    Cacheloop::start(&all).finish(Duration::from_secs(120))
}

/// The pid the run attached to (its `attached` record).
fn attached_pid(run: &Run) -> u32 {
    run.of_type("attached")[0]["pid"].as_u64().unwrap() as u32
}

fn gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let state = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().chars().next()))
            .flatten();
        if state.is_none_or(|c| c == 'Z') {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn run_counts_every_call_from_the_first_instruction_and_exits_with_the_commands_status() {
    require_root();
    let fixture = fixture_bin();
    let run = run(
        &["--func", "cache_invalidate"],
        &[fixture.to_str().unwrap(), "300:2", "--exit-code=7"],
    );
    assert_eq!(run.code, 7, "{run:?}");
    // The fixture says how many calls it made; every one was counted.
    let done = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("done "))
        .expect("the fixture's own output (on stderr with --json)");
    let made: u64 = done.split(' ').next().unwrap().parse().unwrap();
    let counted: u64 = run
        .of_type("sample")
        .iter()
        .map(|s| s["calls"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, made, "{}", run.stdout);
    // Nothing but JSON on stdout: records() parses every line.
    assert!(
        run.records()
            .last()
            .is_some_and(|r| r["type"] == "detached")
    );
}

#[test]
fn run_fails_the_gate_on_a_loop_from_the_first_instruction_and_stops_the_command() {
    require_root();
    let fixture = fixture_bin();
    let run = run(
        &["--func", "invalidate_*", "--fail-on-loop", "--grace", "2s"],
        &[fixture.to_str().unwrap(), "cycle:max:60"],
    );
    assert_eq!(run.code, 3, "{run:?}");
    let verdict = &run.of_type("loop")[0];
    assert_eq!(verdict["evidence"]["cause"], "call_cycle", "{verdict}");
    let pid = attached_pid(&run);
    assert_eq!(verdict["pid"], pid);
    assert!(gone(pid), "the command was stopped");
    // Said in the output, before the end.
    let stopped = run
        .of_type("warning")
        .into_iter()
        .find(|w| w["kind"] == "command_stopped")
        .unwrap_or_else(|| panic!("no command_stopped record: {}", run.stdout));
    assert_eq!(stopped["pid"], pid);
}

#[test]
fn run_passes_sigterm_on_to_the_command_and_exits_as_it_did() {
    require_root();
    let fixture = fixture_bin();
    let watcher = Cacheloop::start(&[
        "run",
        "--func",
        "cache_invalidate",
        "--json",
        "--",
        fixture.to_str().unwrap(),
        "100:60",
    ]);
    watcher.wait_attached(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    watcher.signal(libc::SIGTERM);
    let run = watcher.finish(Duration::from_secs(60));
    // The fixture died of the SIGTERM, as a shell would report it.
    assert_eq!(run.code, 128 + libc::SIGTERM, "{run:?}");
    assert!(
        run.of_type("target_exit")
            .iter()
            .any(|r| r["pid"] == attached_pid(&run))
    );
}

#[test]
fn run_with_a_target_of_its_own_exits_2_before_starting_anything() {
    let out = std::process::Command::new(cacheloop_tests::cacheloop_bin())
        .args(["run", "--pid", "1", "--func", "f", "--", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("leave out --pid"), "{stderr}");
}

/// demo-cache as the gate's CMD, with `deps` for its dependency rules.
fn gate_demo(deps: &str, extra: &[&str]) -> Run {
    let dir = std::env::temp_dir().join(format!("cacheloop-gate-{deps}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let rules = dir.join("deps.conf");
    fs::copy(demo_config(deps), &rules).unwrap();
    let demo = demo_bin();
    let mut args = vec!["--func", "cache_*", "--key-arg", "0:str", "--fail-on-loop"];
    args.extend_from_slice(extra);
    let out = run(
        &args,
        &[demo.to_str().unwrap(), "--deps", rules.to_str().unwrap()],
    );
    let _ = fs::remove_dir_all(&dir);
    out
}

#[test]
fn run_gates_demo_cache_cyclic_rules_with_exit_3_and_healthy_ones_with_0() {
    require_root();
    let cyclic = gate_demo("cycle.deps", &["--duration", "60s"]);
    assert_eq!(cyclic.code, 3, "{cyclic:?}");
    let verdict: &Value = &cyclic.of_type("loop")[0];
    assert_eq!(verdict["functions"][0], "cache_invalidate", "{verdict}");
    let healthy = gate_demo("healthy.deps", &["--duration", "8s"]);
    assert_eq!(healthy.code, 0, "{healthy:?}");
    assert!(healthy.of_type("loop").is_empty(), "{}", healthy.stdout);
    assert!(
        healthy.stderr.contains("still running: stopped it"),
        "{}",
        healthy.stderr
    );
    assert!(gone(attached_pid(&healthy)));
}

#[test]
fn run_watches_the_commands_children_too() {
    require_root();
    let fixture = fixture_bin();
    let run = run(
        &["--func", "cache_invalidate"],
        &[fixture.to_str().unwrap(), "200:5", "--exit", "--fork"],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let child: u64 = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("child "))
        .expect("the fixture forked")
        .trim()
        .parse()
        .unwrap();
    let rates: Vec<f64> = run
        .of_type("sample")
        .iter()
        .filter(|s| s["pid"] == child)
        .filter_map(|s| s["rate"].as_f64())
        .collect();
    // Attached within an interval of its start, then counted like its
    // parent: its later full intervals read its 200/s.
    assert!(
        rates.iter().any(|r| (170.0..=230.0).contains(r)),
        "the child was counted: {rates:?}\n{}",
        run.stdout
    );
}
