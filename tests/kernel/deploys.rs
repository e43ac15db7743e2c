//! Safety across deploys, exec and kills: probes land on the bytes their
//! offsets were read from, or nowhere; a new build is followed, not guessed;
//! one target that cannot be probed leaves the others watched.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use cacheloop_tests::{
    Cacheloop, Run, Target, cacheloop, fixture_bin, native, require_root, total_calls,
    watch_binary_args,
};
use serde_json::Value;

/// A directory of our own under the system's temporary directory.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("cacheloop-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Installs `build` at `path` the way a package upgrade does: written
/// beside it, then renamed over it (a new inode; processes running the old
/// file keep it).
fn deploy(build: &Path, path: &Path) {
    let staged = path.with_extension("dpkg-new");
    fs::copy(build, &staged).unwrap();
    fs::rename(&staged, path).unwrap();
}

/// Polls the target's code at `addr` for `how_long`: whether a breakpoint
/// was ever seen there.
fn ever_trapped(target: &Target, addr: u64, how_long: Duration) -> bool {
    let until = Instant::now() + how_long;
    while Instant::now() < until {
        if target.trapped_at(addr) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    false
}

fn warnings(run: &Run, kind: &str) -> Vec<Value> {
    run.of_type("warning")
        .into_iter()
        .filter(|w| w["kind"] == kind)
        .collect()
}

#[test]
fn binary_deploy_while_windowing_probes_the_new_build_at_its_own_offsets() {
    require_root();
    let dir = Scratch::new("deploy");
    let server = dir.path("deploy-cache");
    fs::copy(&native().deploy_v1, &server).unwrap();
    // A busy process of the old build, and a budget so small that the
    // governor takes the probes out and puts them back in every interval:
    // the re-attach a deploy can hurt. (Not flat out: the other tests
    // share the machine, and a TCG guest's two CPUs.)
    let old = Target::spawn(&server, &["2000", "60"], "ready");
    let old_offset = old.ready_hex(1) - old.ready_hex(2);
    let watcher = Cacheloop::start(&watch_binary_args(
        &server,
        &["cache_invalidate"],
        &["--max-overhead", "0.2", "--duration", "20s"],
    ));
    watcher.wait_attached(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));

    deploy(&native().deploy_v2, &server);
    std::thread::sleep(Duration::from_millis(1500));
    // Long enough to be seen alive at a tick even on a loaded machine.
    let mut new = Target::spawn(&server, &["300", "12"], "ready");
    let (addr, base) = (new.ready_hex(1), new.ready_hex(2));
    assert_ne!(addr - base, old_offset, "the builds differ in layout");
    // The old build's offset in the new build is the start of another
    // function: a probe left there would count it, or worse.
    assert!(
        !ever_trapped(&new, base + old_offset, Duration::from_secs(2)),
        "a breakpoint at the old build's offset in the new build"
    );
    assert!(
        ever_trapped(&new, addr, Duration::from_secs(3)),
        "the new build's cache_invalidate is probed"
    );
    let done = new.wait_line("done", Duration::from_secs(20)).unwrap();
    assert!(done.ends_with(" ok"), "{done}");
    assert_eq!(new.wait_exit(Duration::from_secs(5)), Some(0));

    let run = watcher.finish(Duration::from_secs(40));
    assert_eq!(run.code, 0, "{run:?}");
    assert_windowed(&run);
    let replaced = warnings(&run, "binary_replaced");
    assert_eq!(replaced.len(), 1, "{}", run.stdout);
    let attached = run.of_type("attached");
    assert_eq!(attached.len(), 2, "old build, then new: {}", run.stdout);
    assert!(
        total_calls(&run, Some(new.pid), "cache_invalidate") > 0,
        "{}",
        run.stdout
    );
    // The old build stays watched after the deploy.
    let deployed = replaced[0]["ts"].as_f64().unwrap();
    assert!(
        run.of_type("sample").iter().any(|s| s["pid"] == old.pid
            && s["ts"].as_f64().unwrap() > deployed
            && s["calls"].as_u64().unwrap() > 0),
        "{}",
        run.stdout
    );
}

/// The governor had the probes out for part of an interval: re-attaches
/// happened.
fn assert_windowed(run: &Run) {
    assert!(
        run.of_type("governor")
            .iter()
            .any(|g| g["probed_percent"].as_f64().unwrap() < 100.0),
        "no probe windows: {}",
        run.stdout
    );
}

/// Under `--binary` the link is the file's, and a process whose main
/// thread has exited is still counted through it. After a deploy, when a
/// watched process's exit had the loader look for processes still running
/// the old build, this one read as running nothing (its own `exe` and
/// `maps` are empty) and the old build's link went: its calls were no
/// longer counted, without a word. Its other threads show the old build.
#[test]
fn binary_keeps_the_old_build_while_a_process_without_main_thread_runs_it() {
    require_root();
    let dir = Scratch::new("leaderless");
    let server = dir.path("leaderless-cache");
    fs::copy(fixture_bin(), &server).unwrap();
    let mut kept = Target::spawn(&server, &["--leader-exits=usr2", "200:120"], "ready");
    // Its exit, after the deploy, makes the loader check the old build.
    let mut short = Target::spawn(&server, &["200:hold", "--exit"], "ready");
    let watcher = Cacheloop::start(&watch_binary_args(
        &server,
        &["cache_invalidate"],
        &["--duration", "120s"],
    ));
    watcher.wait_attached(Duration::from_secs(60));
    kept.signal(libc::SIGUSR2);
    assert!(
        kept.wait_line("leader exits", Duration::from_secs(10))
            .is_some()
    );
    deploy(&fixture_bin(), &server);
    watcher.wait_line("binary_replaced", Duration::from_secs(30));
    short.release();
    assert_eq!(short.wait_exit(Duration::from_secs(30)), Some(0));
    // The only one: `kept` runs on.
    watcher.wait_record("target_exit", Duration::from_secs(30));
    // Readings after the check.
    std::thread::sleep(Duration::from_secs(4));
    watcher.signal(libc::SIGINT);

    let run = watcher.finish(Duration::from_secs(60));
    assert_eq!(run.code, 0, "{run:?}");
    let replaced = warnings(&run, "binary_replaced");
    assert_eq!(replaced.len(), 1, "{}", run.stdout);
    let exited = run
        .of_type("target_exit")
        .iter()
        .find(|r| r["pid"] == short.pid)
        .and_then(|r| r["ts"].as_f64())
        .unwrap_or_else(|| panic!("no target_exit for {}: {}", short.pid, run.stdout));
    // The check came after the deploy: a pass says something.
    assert!(
        exited > replaced[0]["ts"].as_f64().unwrap(),
        "{}",
        run.stdout
    );
    let counted_after = run
        .of_type("sample")
        .iter()
        .filter(|s| {
            s["pid"] == kept.pid
                && s["ts"].as_f64().unwrap() > exited + 1.5
                && s["calls"].as_u64().unwrap() > 0
        })
        .count();
    assert!(counted_after >= 2, "{}", run.stdout);
    assert!(kept.is_running());
}

#[test]
fn binary_rewritten_in_place_is_read_again_before_a_probe_lands() {
    require_root();
    let dir = Scratch::new("rewrite");
    let server = dir.path("rewrite-cache");
    fs::copy(&native().deploy_v1, &server).unwrap();
    let watcher = Cacheloop::start(&watch_binary_args(
        &server,
        &["cache_invalidate"],
        &["--duration", "12s"],
    ));
    watcher.wait_attached(Duration::from_secs(60));
    // No process runs it, so it may be written in place: same inode, the
    // other build's bytes. The probe on the old offset must not stay.
    let old_offset = {
        let probe = Target::spawn(&native().deploy_v1, &["1", "0"], "ready");
        probe.ready_hex(1) - probe.ready_hex(2)
    };
    fs::write(&server, fs::read(&native().deploy_v2).unwrap()).unwrap();
    // The next tick notices (within an interval; a loaded machine's ticks
    // run late). A process started before it could meet the old offset:
    // the documented limit of writing in place.
    std::thread::sleep(Duration::from_millis(3500));
    let mut new = Target::spawn(&server, &["300", "6"], "ready");
    let (addr, base) = (new.ready_hex(1), new.ready_hex(2));
    assert!(
        ever_trapped(&new, addr, Duration::from_secs(10)),
        "the new content's cache_invalidate is probed"
    );
    assert!(
        !ever_trapped(&new, base + old_offset, Duration::from_secs(1)),
        "a breakpoint at the old content's offset"
    );
    let done = new.wait_line("done", Duration::from_secs(20)).unwrap();
    assert!(done.ends_with(" ok"), "{done}");
    let run = watcher.finish(Duration::from_secs(40));
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(warnings(&run, "file_rewritten").len(), 1, "{}", run.stdout);
    assert!(
        total_calls(&run, Some(new.pid), "cache_invalidate") > 0,
        "{}",
        run.stdout
    );
}

/// Starts the old build at `dir/exec-cache`, which execs the new build
/// (at `dir/next/exec-cache`, so its command name is the same) after
/// 3 s, watched with `how`; returns the run and the process.
fn watch_through_exec(dir: &Scratch, how: &[&str]) -> (Run, Target) {
    let server = dir.path("exec-cache");
    fs::copy(&native().deploy_v1, &server).unwrap();
    fs::create_dir_all(dir.path("next")).unwrap();
    let next = dir.path("next/exec-cache");
    fs::copy(&native().deploy_v2, &next).unwrap();
    let next = next.to_str().unwrap();
    // 1000/s for 6 s (attaching takes seconds in a loaded TCG guest): read
    // again as the new program's, the old history would be a spike of
    // thousands of calls in one interval.
    let mut target = Target::spawn(&server, &["1000", "6", next, "300", "60"], "ready");
    let pid = target.pid.to_string();
    let mut args = vec!["watch", "--func", "cache_invalidate", "--json"];
    args.extend(
        how.iter()
            .map(|a| if *a == "PID" { pid.as_str() } else { a }),
    );
    args.extend(["--duration", "11s"]);
    let watcher = Cacheloop::start(&args);
    let done = target.wait_line("done", Duration::from_secs(20)).unwrap();
    assert!(done.ends_with(" ok"), "{done}");
    // The new program says ready again, under the same pid.
    target.wait_line("ready", Duration::from_secs(20)).unwrap();
    let run = watcher.finish(Duration::from_secs(40));
    (run, target)
}

#[test]
fn exec_under_name_and_pid_is_planned_again_from_the_new_program() {
    require_root();
    for how in [&["--name", "exec-cache"][..], &["--pid", "PID"]] {
        let dir = Scratch::new("exec");
        let (run, target) = watch_through_exec(&dir, how);
        assert_eq!(run.code, 0, "{how:?}: {run:?}");
        let exec = warnings(&run, "target_exec");
        assert_eq!(exec.len(), 1, "{how:?}: {}", run.stdout);
        assert_eq!(exec[0]["pid"], target.pid);
        let attached = run.of_type("attached");
        let paths: Vec<&str> = attached
            .iter()
            .filter(|a| a["pid"] == target.pid)
            .map(|a| a["path"].as_str().unwrap())
            .collect();
        assert_eq!(paths.len(), 2, "{how:?}: {}", run.stdout);
        assert!(paths[1].ends_with("next/exec-cache"), "{paths:?}");
        // Counted after the exec, at the new program's rate.
        let exec_ts = exec[0]["ts"].as_f64().unwrap();
        let after: Vec<f64> = run
            .of_type("sample")
            .iter()
            .filter(|s| s["pid"] == target.pid && s["ts"].as_f64().unwrap() > exec_ts + 1.0)
            .map(|s| s["rate"].as_f64().unwrap())
            .collect();
        assert!(
            after.iter().any(|&r| (200.0..400.0).contains(&r)),
            "{how:?}: {after:?}\n{}",
            run.stdout
        );
        // The old program's counts are neither read again as the new
        // one's (a spike of thousands of calls in one interval) nor kept as
        // a second series of zeros. Calls, not rates: the last interval,
        // cut short by --duration, can make a few calls a high rate.
        let since_exec: Vec<u64> = run
            .of_type("sample")
            .iter()
            .filter(|s| s["pid"] == target.pid && s["ts"].as_f64().unwrap() > exec_ts)
            .map(|s| s["calls"].as_u64().unwrap())
            .collect();
        let ticks = run
            .of_type("interval")
            .iter()
            .filter(|i| i["ts"].as_f64().unwrap() > exec_ts)
            .count();
        assert!(since_exec.len() <= ticks, "{how:?}: {}", run.stdout);
        assert!(
            since_exec.iter().all(|&calls| calls < 600),
            "{how:?}: {since_exec:?}"
        );
    }
}

#[test]
fn target_that_execs_into_an_unwatchable_program_leaves_the_others_watched() {
    require_root();
    let uses_lib = native().uses_lib.to_str().unwrap().to_owned();
    // Execs into a program without cache_invalidate after 5 s (attaching
    // takes seconds in a loaded TCG guest).
    let leaving = Target::spawn(
        &native().deploy_v1,
        &["200", "5", &uses_lib, "10", "60"],
        "ready",
    );
    let staying = Target::fixture(&["200:60"]);
    let (a, b) = (leaving.pid.to_string(), staying.pid.to_string());
    let run = cacheloop(
        &[
            "watch",
            "--pid",
            &a,
            "--pid",
            &b,
            "--func",
            "cache_invalidate",
            "--duration",
            "10s",
            "--json",
        ],
        Duration::from_secs(40),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let failed = warnings(&run, "attach_failed");
    assert_eq!(failed.len(), 1, "{}", run.stdout);
    assert_eq!(failed[0]["pid"], leaving.pid);
    let failed_ts = failed[0]["ts"].as_f64().unwrap();
    let later = run
        .of_type("sample")
        .iter()
        .filter(|s| s["pid"] == staying.pid && s["ts"].as_f64().unwrap() > failed_ts + 1.0)
        .count();
    assert!(later >= 2, "{}", run.stdout);
}

#[test]
fn binary_library_counts_only_processes_that_map_that_file() {
    require_root();
    let dir = Scratch::new("library");
    // The same bytes under another inode: a second copy of the program
    // and its library.
    for name in ["uses_lib", "libcachehelper.so"] {
        fs::copy(native().uses_lib.with_file_name(name), dir.path(name)).unwrap();
    }
    let library = native().uses_lib.with_file_name("libcachehelper.so");
    let user = Target::spawn(&native().uses_lib, &["200", "60"], "ready");
    let other = Target::spawn(&dir.path("uses_lib"), &["200", "60"], "ready");
    let watcher = Cacheloop::start(&watch_binary_args(
        &library,
        &["lib_cache_invalidate"],
        &["--duration", "5s"],
    ));
    watcher.wait_attached(Duration::from_secs(60));
    assert!(
        ever_trapped(&user, user.ready_hex(1), Duration::from_secs(2)),
        "the process mapping the library is probed"
    );
    assert!(
        !ever_trapped(&other, other.ready_hex(1), Duration::from_secs(1)),
        "a process mapping another copy is not"
    );
    let run = watcher.finish(Duration::from_secs(40));
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        total_calls(&run, Some(user.pid), "lib_cache_invalidate") > 0,
        "{}",
        run.stdout
    );
    assert_eq!(
        total_calls(&run, Some(other.pid), "lib_cache_invalidate"),
        0
    );
}

/// A custody helper stopped (a debugger, SIGSTOP) holds the last copy of
/// each link: at the end of the run cacheloop waits for it (30 s), then
/// kills it, and its exit takes the breakpoints out. (Probes in throughout,
/// so the end is the first time cacheloop waits for the helper: a window
/// putting the probes back in would find it stopped sooner.)
#[test]
fn a_stopped_custody_helper_is_killed_at_the_end_and_no_breakpoint_is_left() {
    require_root();
    let target = Target::fixture(&["200:120"]);
    let addr = target.invalidate_addr();
    let extra = ["--duration", "3s", "--max-overhead", "100"];
    let watcher = Cacheloop::start(&cacheloop_tests::watch_fixture_args(target.pid, &extra));
    watcher.wait_attached(Duration::from_secs(60));
    let helpers = cacheloop_tests::children_of(watcher.pid());
    assert_eq!(helpers.len(), 1, "one custody helper: {helpers:?}");
    // SAFETY: kill(2) on the helper our own child started.
    unsafe { libc::kill(helpers[0], libc::SIGSTOP) };
    let run = watcher.finish(Duration::from_secs(120));
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        cacheloop_tests::wait_gone(helpers[0], Duration::from_secs(10)),
        "the stopped custody helper outlived cacheloop"
    );
    assert!(
        !ever_trapped(&target, addr, Duration::from_millis(300)),
        "a breakpoint left by a stopped custody helper"
    );
}

/// Kills cacheloop `wait_ms` after it attached to the fixture, and checks
/// that no breakpoint is left: its custody helper, which holds a copy of
/// every link, sees it die and exits, and the kernel closes the links as
/// the helper exits, with no kill pending in it.
fn kill_and_check(target: &Target, addr: u64, extra: &[&str], wait_ms: u64) -> Run {
    let windows = !extra.contains(&"100");
    let watcher = Cacheloop::start(&cacheloop_tests::watch_fixture_args(target.pid, extra));
    watcher.wait_attached(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(wait_ms));
    let helpers = cacheloop_tests::children_of(watcher.pid());
    assert_eq!(helpers.len(), 1, "one custody helper: {helpers:?}");
    if !windows {
        // In place, and the helper holds a copy of the link.
        assert!(target.trapped_at(addr), "probed before the kill");
        let links = fs::read_dir(format!("/proc/{}/fd", helpers[0]))
            .unwrap()
            .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
            .filter(|what| what.as_os_str() == "anon_inode:bpf_link")
            .count();
        assert!(links > 0, "the custody helper holds no link");
    }
    watcher.signal(libc::SIGKILL);
    let run = watcher.finish(Duration::from_secs(10));
    assert_eq!(run.code, 128 + libc::SIGKILL, "{run:?}");
    assert!(
        cacheloop_tests::wait_gone(helpers[0], Duration::from_secs(10)),
        "the custody helper outlived cacheloop"
    );
    assert!(
        !ever_trapped(target, addr, Duration::from_millis(300)),
        "a breakpoint left after SIGKILL at {wait_ms} ms"
    );
    run
}

#[test]
fn sigkill_with_the_probes_in_leaves_no_breakpoint() {
    require_root();
    let target = Target::fixture(&["2000:60"]);
    let addr = target.invalidate_addr();
    // No probe windows: the links are in place when the kill lands.
    for wait_ms in [300, 1700] {
        kill_and_check(&target, addr, &["--max-overhead", "100"], wait_ms);
    }
}

#[test]
fn sigkill_mid_window_leaves_no_breakpoint() {
    require_root();
    let mut target = Target::fixture(&["2000:60"]);
    let addr = target.invalidate_addr();
    // After a tick or two the governor takes the probes out and puts them
    // back once every two intervals (1 s here): kills land while links are
    // being closed, spread over both intervals of a window. Before the
    // custody helper, the kernel gave up removing a breakpoint then (see
    // custody.rs): 2 kills in 3 at 3.1 s on 6.1.
    for wait_ms in [2600, 3100, 3450, 4100, 4600] {
        let run = kill_and_check(&target, addr, &["--max-overhead", "0.2"], wait_ms);
        assert_windowed(&run);
    }
    assert!(target.is_running(), "the target survived");
}

#[test]
fn name_restarts_from_new_builds_close_the_old_files() {
    require_root();
    let dir = Scratch::new("restarts");
    let open_fds = |pid: i32| fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let watcher = Cacheloop::start(&[
        "watch",
        "--name",
        "restart-cache",
        "--func",
        "cache_invalidate",
        "--duration",
        "30s",
        "--json",
    ]);
    let mut fds = Vec::new();
    // Each restart runs a new build: a new file, as a deploy makes.
    for n in 0..4 {
        let build = dir.path(&format!("v{n}"));
        fs::create_dir_all(&build).unwrap();
        let server = build.join("restart-cache");
        fs::copy(&native().deploy_v1, &server).unwrap();
        let mut target = Target::spawn(&server, &["100", "2.5"], "ready");
        assert_eq!(target.wait_exit(Duration::from_secs(20)), Some(0));
        // Ticks to see it go: the count once it holds still.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last = open_fds(watcher.pid());
        loop {
            std::thread::sleep(Duration::from_millis(1200));
            let now = open_fds(watcher.pid());
            if now == last || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        fds.push(last);
    }
    watcher.signal(libc::SIGTERM);
    let run = watcher.finish(Duration::from_secs(20));
    assert_eq!(run.code, 0, "{run:?}");
    let attached = run.of_type("attached");
    assert_eq!(attached.len(), 4, "{}", run.stdout);
    assert_eq!(fds[1], fds[3], "descriptors pile up with restarts: {fds:?}");
}

#[test]
fn binary_and_name_on_one_process_count_each_call_once() {
    require_root();
    let dir = Scratch::new("double");
    let server = dir.path("double-cache");
    fs::copy(&native().deploy_v1, &server).unwrap();
    let watcher = Cacheloop::start(&watch_binary_args(
        &server,
        &["cache_invalidate"],
        &["--name", "double-cache", "--duration", "8s"],
    ));
    std::thread::sleep(Duration::from_secs(1));
    // Idle at first, so no hit makes the --binary link find it: --name
    // does. Then it runs the same file again at 300 calls/s. The --binary
    // link covers it; a second, pid-scoped link on the same file would run
    // the program twice a hit and count every call twice.
    let path = server.to_str().unwrap();
    let mut target = Target::spawn(&server, &["0.001", "2.5", path, "300", "60"], "ready");
    target.wait_line("ready", Duration::from_secs(20)).unwrap();
    let run = watcher.finish(Duration::from_secs(40));
    assert_eq!(run.code, 0, "{run:?}");
    let rates = cacheloop_tests::rates(&run, target.pid, "cache_invalidate");
    assert!(rates.len() >= 3, "{}", run.stdout);
    assert!(
        rates[1..rates.len() - 1].iter().all(|&r| r < 400.0),
        "{rates:?}\n{}",
        run.stdout
    );
}
