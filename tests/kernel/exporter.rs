//! The Prometheus exporter (`watch --prometheus`): a live scrape that
//! promtool accepts, and a real Prometheus server alerting on a live loop
//! through the shipped rule. Needs Debian's `prometheus` (server and
//! promtool): not in the VM guests, where these skip.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use cacheloop_tests::{
    Cacheloop, Target, free_port, have_programs, http_get, private_fixture, require_root,
    watch_fixture_args,
};
use serde_json::Value;

fn deploy(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/prometheus")
        .join(name)
}

/// Scrapes until `pred` holds for the body; returns it.
fn scrape_until(port: u16, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(reply) = http_get(port, "/metrics", None) {
            assert_eq!(reply.status, 200, "{reply:?}");
            if pred(&reply.body) {
                return reply.body;
            }
            last = reply.body;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("no scrape within {timeout:?} showed what was awaited; the last:\n{last}");
}

/// `promtool check metrics` on `text`: its complaints, if any.
fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn line_with<'a>(text: &'a str, prefix: &str, needle: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.starts_with(prefix) && l.contains(needle))
}

#[test]
fn prometheus_exporter_serves_a_live_loop_that_promtool_accepts() {
    require_root();
    if !have_programs(&[("promtool", "prometheus")]) {
        return;
    }
    let target = Target::fixture(&["200:hold", "max:40"]);
    // Watched too, and still running when the first exits.
    let bystander = Target::fixture(&["100:60"]);
    let port = free_port();
    let (a, b) = (target.pid.to_string(), bystander.pid.to_string());
    let args = [
        "watch",
        "--pid",
        &a,
        "--pid",
        &b,
        "--func",
        "cache_invalidate",
        "--duration",
        "40s",
        "--prometheus",
        &port.to_string(),
    ];
    let watcher = Cacheloop::start(&args);
    let pid = format!("pid=\"{}\"", target.pid);
    let calls = scrape_until(port, Duration::from_secs(60), |body| {
        line_with(body, "cacheloop_calls_total{", &pid).is_some()
    });
    promtool_check(&calls).unwrap_or_else(|e| panic!("promtool: {e}\n{calls}"));
    for family in [
        "# TYPE cacheloop_calls_total counter",
        "# TYPE cacheloop_loop_active gauge",
        "# TYPE cacheloop_dropped_hits_total counter",
        "# TYPE cacheloop_probed_ratio gauge",
        "# TYPE cacheloop_build_info gauge",
    ] {
        assert!(calls.contains(family), "{family} missing:\n{calls}");
    }
    assert!(
        line_with(&calls, "cacheloop_loop_active{", &pid).is_some_and(|l| l.ends_with(" 0")),
        "{calls}"
    );
    assert!(calls.contains("comm=\"fixture\""), "{calls}");
    assert!(line_with(&calls, "cacheloop_targets ", "").is_some_and(|l| l.ends_with(" 2")));

    // The runaway, once the detector has learned the healthy rate (its
    // warm-up is 2 s): the verdict shows as a 1, a loop counted by cause.
    std::thread::sleep(Duration::from_secs(4));
    target.release();
    let looping = scrape_until(port, Duration::from_secs(60), |body| {
        line_with(body, "cacheloop_loop_active{", &pid).is_some_and(|l| l.ends_with(" 1"))
    });
    // A family shows once it has a series: loops, from the first.
    assert!(looping.contains("# TYPE cacheloop_loops_total counter"));
    assert!(
        line_with(&looping, "cacheloop_loops_total{", "fixture").is_some_and(|l| l.ends_with(" 1")),
        "{looping}"
    );
    promtool_check(&looping).unwrap_or_else(|e| panic!("promtool: {e}\n{looping}"));

    // Prometheus itself asks for OpenMetrics.
    let om = http_get(
        port,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0"),
    )
    .expect("an OpenMetrics scrape");
    assert!(
        om.headers.contains("application/openmetrics-text"),
        "{om:?}"
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert_eq!(
        http_get(port, "/nothing", None).map(|r| r.status),
        Some(404)
    );

    // The looping target exits: its series go, the other's stay.
    drop(target);
    let after = scrape_until(port, Duration::from_secs(30), |body| {
        !body.contains(&pid) && body.contains("cacheloop_targets 1")
    });
    let other = format!("pid=\"{}\"", bystander.pid);
    assert!(
        line_with(&after, "cacheloop_calls_total{", &other).is_some(),
        "{after}"
    );
    promtool_check(&after).unwrap_or_else(|e| panic!("promtool: {e}\n{after}"));
    let run = watcher.finish(Duration::from_secs(60));
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn prometheus_exporter_on_a_port_in_use_exits_1_before_attaching() {
    require_root();
    let target = Target::fixture(&["100:30"]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let mut args = watch_fixture_args(target.pid, &["--prometheus", &port]);
    args.retain(|a| a != "--json");
    let run = Cacheloop::start(&args).finish(Duration::from_secs(30));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && run.stderr.contains("another port"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(!run.stdout.contains("attached"), "{}", run.stdout);
}

/// A Prometheus server of our own on loopback, stopped (by its pid) when
/// dropped.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    /// Runs the shipped configuration and rules, scraping `target_port`
    /// every second instead of every 15.
    fn start(target_port: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("cacheloop-prometheus-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let config = fs::read_to_string(deploy("prometheus.yml"))
            .unwrap()
            .replace("127.0.0.1:9466", &format!("127.0.0.1:{target_port}"))
            .replace("15s", "1s");
        fs::write(dir.join("prometheus.yml"), config).unwrap();
        fs::copy(
            deploy("cacheloop-rules.yml"),
            dir.join("cacheloop-rules.yml"),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Self { child, port, dir }
    }

    /// The state of `alert` for `pid`'s series: pending, firing, or none.
    fn alert_state(&self, alert: &str, pid: u32) -> Option<String> {
        let pid = pid.to_string();
        let reply = http_get(self.port, "/api/v1/alerts", None)?;
        let json: Value = serde_json::from_str(&reply.body).ok()?;
        json["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == alert && a["labels"]["pid"] == pid.as_str())
            .map(|a| a["state"].as_str().unwrap_or_default().to_owned())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_server_fires_the_shipped_alert_on_a_live_loop() {
    require_root();
    if !have_programs(&[("prometheus", "prometheus")]) {
        return;
    }
    let target = Target::fixture(&["200:hold", "max:90"]);
    let port = free_port();
    let listen = port.to_string();
    let mut args = watch_fixture_args(target.pid, &["--duration", "90s", "--prometheus", &listen]);
    args.retain(|a| a != "--json");
    let watcher = Cacheloop::start(&args);
    let server = Prometheus::start(port);
    // Healthy: scraped, and no alert.
    let pid = format!("pid=\"{}\"", target.pid);
    scrape_until(port, Duration::from_secs(60), |body| {
        line_with(body, "cacheloop_calls_total{", &pid).is_some()
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        server.alert_state("CacheInvalidationLoop", target.pid),
        None
    );
    target.release();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut state = None;
    while Instant::now() < deadline {
        state = server.alert_state("CacheInvalidationLoop", target.pid);
        if state.as_deref() == Some("firing") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Pending once the verdict stands, firing 10 s later (the rule's `for`).
    assert_eq!(
        state.as_deref(),
        Some("firing"),
        "the alert did not fire in time"
    );
    drop(server);
    drop(target);
    let run = watcher.finish(Duration::from_secs(60));
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn prometheus_series_of_a_restarted_cache_carry_on_under_its_name() {
    require_root();
    let comm = format!("crs{}", std::process::id() % 1_000_000);
    let (dir, binary) = private_fixture(&comm);
    let first = Target::spawn(&binary, &["200:60"], "ready");
    let port = free_port();
    let watcher = Cacheloop::start(&[
        "watch",
        "--name",
        &comm,
        "--func",
        "cache_invalidate",
        "--duration",
        "30s",
        "--prometheus",
        &port.to_string(),
    ]);
    let named = format!("comm=\"{comm}\"");
    let series = |pid: u32| format!("pid=\"{pid}\",{named}");
    scrape_until(port, Duration::from_secs(60), |body| {
        line_with(body, "cacheloop_calls_total{", &series(first.pid)).is_some()
    });
    let first_pid = first.pid;
    drop(first); // the cache dies...
    let second = Target::spawn(&binary, &["200:60"], "ready"); // ...and is restarted
    // Picked up by name: counted under its new pid and the same name; the
    // old pid's series are gone.
    let after = scrape_until(port, Duration::from_secs(60), |body| {
        line_with(body, "cacheloop_calls_total{", &series(second.pid)).is_some()
            && !body.contains(&format!("pid=\"{first_pid}\""))
    });
    assert!(after.contains("cacheloop_targets 1\n"), "{after}");
    assert!(
        line_with(&after, "cacheloop_attached_functions ", "").is_some_and(|l| l.ends_with(" 1")),
        "{after}"
    );
    drop(second);
    let _ = watcher.finish(Duration::from_secs(60));
    let _ = fs::remove_dir_all(&dir);
}
