//! `cacheloop report`: the incident report of a committed recording, its
//! numbers checked against `cacheloop replay`, rendered in Debian's
//! headless Chromium (no network) and the screenshot checked to show the
//! verdict box and the chart with the loop's window. No root, no kernel.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use cacheloop_tests::{cacheloop_bin, have_programs};
use serde_json::Value;

fn recording(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("recordings")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cacheloop-report-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn cacheloop(args: &[&str]) -> Output {
    Command::new(cacheloop_bin()).args(args).output().unwrap()
}

/// 47418.4 -> "47,418", as the report writes rates.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Headless Chromium on a local file, with no network and a profile of
/// its own: `--dump-dom` or `--screenshot`.
fn chromium(dir: &Path, page: &Path, what: &[String]) -> Output {
    // Bounded: a browser that hangs fails the test, not the suite.
    Command::new("timeout")
        .args(["120", "chromium"])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1400",
            "--force-device-scale-factor=1",
            "--force-color-profile=srgb",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .args(what)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs")
}

#[test]
fn report_of_a_loop_shows_the_replays_numbers_and_renders_in_chromium() {
    let dir = scratch("loop");
    let page = dir.join("report.html");
    let rec = recording("demo-loop.rec");
    let out = cacheloop(&[
        "report",
        rec.to_str().unwrap(),
        "-o",
        page.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = fs::read_to_string(&page).unwrap();

    // The numbers are the replay's.
    let replay = cacheloop(&["replay", rec.to_str().unwrap(), "--json"]);
    let records: Vec<Value> = String::from_utf8_lossy(&replay.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let verdict = records
        .iter()
        .find(|r| r["type"] == "loop")
        .expect("a loop");
    let pid = verdict["pid"].as_u64().unwrap();
    let function = verdict["functions"][0].as_str().unwrap();
    assert!(
        html.contains(&format!("Loop: {function} in pid {pid}")),
        "{html}"
    );
    for number in [&verdict["rate"], &verdict["baseline"]] {
        let shown = format!(
            "<span class=\"n\">{}</span>",
            thousands(number.as_f64().unwrap())
        );
        assert!(html.contains(&shown), "{shown} not in the report");
    }
    let peak = records
        .iter()
        .filter(|r| r["type"] == "sample" && r["function"] == function)
        .filter_map(|r| r["rate"].as_f64())
        .fold(0.0, f64::max);
    assert!(html.contains(&format!("<td class=\"n\">{}</td>", thousands(peak))));
    for key in verdict["evidence"]["key_cycle"].as_array().unwrap() {
        assert!(html.contains(key.as_str().unwrap()));
    }
    // Self-contained: nothing fetched, nothing run.
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<script"));

    // CI installs it (cargo xtask test): there, its absence is a failure.
    if !have_programs(&[("chromium", "chromium")]) {
        assert!(std::env::var_os("CI").is_none(), "chromium is missing");
        return;
    }
    let dom = chromium(&dir, &page, &["--dump-dom".to_owned()]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains(&format!("Loop: {function} in pid {pid}")),
        "{dom}"
    );

    let shot = dir.join("report.png");
    let out = chromium(&dir, &page, &[format!("--screenshot={}", shot.display())]);
    assert!(shot.exists(), "{}", String::from_utf8_lossy(&out.stderr));
    let decoder = png::Decoder::new(std::io::BufReader::new(fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    let channels = frame.color_type.samples();
    let count = |rgb: [u8; 3]| {
        pixels[..frame.buffer_size()]
            .chunks(channels)
            .filter(|p| p[..3] == rgb)
            .count()
    };
    let area = (frame.width * frame.height) as usize;
    // The loop's window in the chart (#ffc9c9), the chart's first line
    // (#1f5fbf: the two 12 px swatches of that colour make 288 px; the line
    // across the chart, antialiased, adds some 650 exact ones more), the
    // verdict box's border
    // (#c92a2a): a page that rendered, not a blank one.
    let shade = count([0xff, 0xc9, 0xc9]);
    let line = count([0x1f, 0x5f, 0xbf]);
    let border = count([0xc9, 0x2a, 0x2a]);
    assert!(shade > area / 100, "loop window: {shade} px of {area}");
    assert!(line > 288 + 300, "chart line: {line} px");
    assert!(border > 1000, "verdict box: {border} px");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn report_in_markdown_and_of_a_healthy_recording_says_what_it_saw() {
    let out = cacheloop(&[
        "report",
        recording("burst.rec").to_str().unwrap(),
        "--format",
        "md",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.starts_with("## cacheloop: no loop"), "{md}");
    assert!(
        md.contains("| pid | function | peak calls/s | baseline calls/s |"),
        "{md}"
    );
}

#[test]
fn report_of_a_file_that_is_not_a_recording_exits_2_saying_so() {
    let dir = scratch("bad");
    let bad = dir.join("notes.rec");
    fs::write(&bad, "not a recording\n").unwrap();
    let page = dir.join("out.html");
    let out = cacheloop(&[
        "report",
        bad.to_str().unwrap(),
        "-o",
        page.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not a cacheloop recording"), "{stderr}");
    assert!(!page.exists());
    let _ = fs::remove_dir_all(&dir);
}
