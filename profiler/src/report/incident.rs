//! The incident report (`cacheloop report`): what a replay of a recording
//! says, as one self-contained HTML page (inline SVG, no script, nothing
//! fetched: it opens offline from a ticket attachment) or as Markdown to
//! paste into a postmortem. Pure: built from the replay's records, so its
//! numbers are the replay's.

use std::{collections::BTreeMap, fmt::Write as _};

use super::{Evidence, Health, Record, StartSettings, thousands, times};

/// Series drawn in the rates chart, busiest first; the rest are listed.
const CHART_SERIES: usize = 8;
/// The chart's drawing area, in SVG units.
const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 70.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 36.0;
/// Line colours, by series (chosen to stay apart on white).
const PALETTE: [&str; CHART_SERIES] = [
    "#1f5fbf", "#d9480f", "#2b8a3e", "#862e9c", "#0b7285", "#e67700", "#5c5f66", "#a61e4d",
];
/// The shading of a loop's window.
pub const LOOP_SHADE: &str = "#ffc9c9";

/// A line to draw: its name, and (ts, value) points.
type Series = (String, Vec<(f64, f64)>);

/// One sample: (ts, calls/s, estimated from a probe window).
pub type Point = (f64, f64, bool);

/// What the report shows, gathered from the records.
#[derive(Default)]
pub struct Incident {
    pub recording: String,
    pub kernel: String,
    pub mode: String,
    pub started: f64,
    pub ended: f64,
    pub settings: Option<StartSettings>,
    /// (pid, function) -> its samples.
    pub rates: BTreeMap<(u32, String), Vec<Point>>,
    /// (pid, function) -> the last baseline learned.
    pub baselines: BTreeMap<(u32, String), f64>,
    /// pid -> (ts, health).
    pub health: BTreeMap<u32, Vec<(f64, Health)>>,
    pub loops: Vec<Loop>,
    /// (ts, what happened), in order.
    pub timeline: Vec<(f64, String)>,
}

/// A loop and how it ended.
pub struct Loop {
    pub ts: f64,
    pub pid: u32,
    pub functions: Vec<String>,
    pub rate: f64,
    pub baseline: f64,
    pub reason: String,
    pub evidence: Evidence,
    /// When it was reported recovered, and why.
    pub recovered: Option<(f64, String)>,
}

impl Loop {
    /// From when its rate climbed (the readings that confirmed it) to its
    /// recovery or the end of the recording.
    fn window(&self, end: f64) -> (f64, f64) {
        (
            self.ts - self.evidence.elevated_seconds,
            self.recovered.as_ref().map_or(end, |r| r.0),
        )
    }
}

impl Incident {
    /// Gathers the records of a replay of `recording`.
    pub fn from_records(recording: &str, records: &[Record]) -> Self {
        let mut i = Self {
            recording: recording.to_owned(),
            ..Self::default()
        };
        for record in records {
            i.observe(record);
        }
        i
    }

    fn observe(&mut self, record: &Record) {
        let at = record_ts(record);
        if at > self.ended {
            self.ended = at;
        }
        match record {
            Record::Start {
                ts,
                kernel,
                mode,
                settings,
                ..
            } => {
                self.started = *ts;
                self.kernel.clone_from(kernel);
                self.mode.clone_from(mode);
                self.settings = Some((**settings).clone());
            }
            Record::Sample {
                ts,
                pid,
                function,
                rate,
                baseline,
                estimated,
                ..
            } => {
                let key = (*pid, function.to_string());
                self.rates
                    .entry(key.clone())
                    .or_default()
                    .push((*ts, *rate, *estimated));
                if let Some(b) = baseline {
                    self.baselines.insert(key, *b);
                }
            }
            Record::Health { ts, pid, health } => {
                self.health.entry(*pid).or_default().push((*ts, *health));
            }
            Record::Loop {
                ts,
                pid,
                functions,
                rate,
                baseline,
                reason,
                evidence,
            } => {
                self.timeline.push((
                    *ts,
                    format!("loop confirmed in pid {pid}: {}", functions.join(", ")),
                ));
                self.loops.push(Loop {
                    ts: *ts,
                    pid: *pid,
                    functions: functions.clone(),
                    rate: *rate,
                    baseline: *baseline,
                    reason: reason.clone(),
                    evidence: (**evidence).clone(),
                    recovered: None,
                });
            }
            Record::Recovered {
                ts,
                pid,
                functions,
                reason,
                ..
            } => {
                self.timeline.push((
                    *ts,
                    format!("recovered in pid {pid}: {}", functions.join(", ")),
                ));
                if let Some(l) = self.loops.iter_mut().rev().find(|l| {
                    l.pid == *pid
                        && l.recovered.is_none()
                        && functions.iter().any(|f| l.functions.contains(f))
                }) {
                    l.recovered = Some((*ts, reason.clone()));
                }
            }
            Record::Picked {
                ts,
                function,
                reason,
                ..
            } => self
                .timeline
                .push((*ts, format!("picked {function}: {reason}"))),
            Record::Attached {
                ts,
                pid,
                path,
                functions,
                ..
            } => self.timeline.push((
                *ts,
                format!(
                    "attached {} function(s) in {}{}",
                    functions.len(),
                    path,
                    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
                ),
            )),
            Record::Detached { ts, functions, .. } => self
                .timeline
                .push((*ts, format!("detached {functions} probe(s)"))),
            Record::TargetExit { ts, pid } => {
                self.timeline.push((*ts, format!("pid {pid} exited")));
            }
            Record::Warning {
                ts, kind, message, ..
            } => {
                self.timeline
                    .push((*ts, format!("warning ({kind}): {message}")));
            }
            Record::Governor {
                ts, probed_percent, ..
            } => self.timeline.push((
                *ts,
                format!("overhead governor: probes in {probed_percent}% of each interval"),
            )),
            Record::Hook { .. } | Record::Interval { .. } => {}
        }
    }

    /// Peak rate of each series, busiest first.
    pub fn peaks(&self) -> Vec<((u32, String), f64)> {
        let mut peaks: Vec<((u32, String), f64)> = self
            .rates
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().map(|p| p.1).fold(0.0, f64::max)))
            .collect();
        peaks.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        peaks
    }

    fn at(&self, ts: f64) -> f64 {
        ts - self.started
    }

    /// The whole page.
    pub fn html(&self) -> String {
        let mut h = String::with_capacity(64 * 1024);
        let title = match self.loops.first() {
            Some(l) => format!("Cache invalidation loop in pid {} — cacheloop", l.pid),
            None => "No loop — cacheloop".to_owned(),
        };
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{}</title><style>{STYLE}</style></head><body>\n",
            esc(&title)
        );
        let _ = write!(
            h,
            "<h1>cacheloop incident report</h1>\n<p class=\"meta\">Recording <code>{}</code> · \
             {:.0} s from {} · kernel {} ({})</p>\n",
            esc(&self.recording),
            self.ended - self.started,
            esc(&utc(self.started)),
            esc(&self.kernel),
            esc(&self.mode)
        );
        self.html_verdicts(&mut h);
        h.push_str("<h2>Calls per second</h2>\n");
        h.push_str(&self.rates_chart());
        self.html_functions(&mut h);
        h.push_str("<h2>Target CPU (% of a core) and memory</h2>\n");
        self.html_health(&mut h);
        self.html_settings(&mut h);
        h.push_str("<h2>Timeline</h2>\n<table><tr><th>time</th><th>what</th></tr>\n");
        for (ts, what) in &self.timeline {
            let _ = writeln!(
                h,
                "<tr><td class=\"n\">{:.1} s</td><td>{}</td></tr>",
                self.at(*ts),
                esc(what)
            );
        }
        h.push_str("</table>\n<p class=\"meta\">Made by <code>cacheloop report</code> from a replay of the recording: the numbers are those `cacheloop replay` prints.</p>\n</body></html>\n");
        h
    }

    fn html_verdicts(&self, h: &mut String) {
        if self.loops.is_empty() {
            h.push_str("<div class=\"verdict ok\"><h2>No loop</h2><p>No invalidation loop was confirmed in this recording.</p></div>\n");
            return;
        }
        for l in &self.loops {
            let ended = match &l.recovered {
                Some((ts, why)) => format!("recovered at {:.1} s: {}", self.at(*ts), why),
                None => "still looping when the recording ended".to_owned(),
            };
            let _ = write!(
                h,
                "<div class=\"verdict loop\" id=\"loop-{}-{:.0}\"><h2>Loop: {} in pid {}</h2>\n\
                 <p class=\"big\"><span class=\"n\">{}</span> calls/s against a baseline of \
                 <span class=\"n\">{}</span> ({}), confirmed at {:.1} s · cause: <b>{}</b></p>\n\
                 <p>{}</p><p>{}</p>\n",
                l.pid,
                l.ts,
                esc(&l.functions.join(", ")),
                l.pid,
                thousands(l.rate),
                thousands(l.baseline),
                times(l.evidence.ratio),
                self.at(l.ts),
                esc(&l.evidence.cause.replace('_', " ")),
                esc(&l.reason),
                esc(&ended)
            );
            h.push_str("<h3>Evidence</h3><ul>\n");
            let _ = writeln!(
                h,
                "<li>Signals that agreed: {}</li>",
                esc(&l.evidence.signals.join(", "))
            );
            if let Some(keys) = &l.evidence.key_cycle {
                let _ = writeln!(
                    h,
                    "<li>Key cycle: <code>{} → {}</code></li>",
                    esc(&keys.join(" → ")),
                    esc(keys.first().map_or("", String::as_str))
                );
            }
            if let Some(cycle) = &l.evidence.cycle {
                let _ = writeln!(
                    h,
                    "<li>Call cycle: <code>{} → {}</code></li>",
                    esc(&cycle.join(" → ")),
                    esc(cycle.first().map_or("", String::as_str))
                );
            }
            if let Some(t) = &l.evidence.target {
                let _ = writeln!(
                    h,
                    "<li>The target then: {:.0}% CPU, {} resident</li>",
                    t.cpu_percent,
                    mib(t.rss_bytes)
                );
            }
            h.push_str("</ul>\n");
            if let Some(keys) = &l.evidence.top_keys {
                h.push_str("<table><tr><th>top key</th><th>invalidations</th></tr>\n");
                for k in keys {
                    let _ = writeln!(
                        h,
                        "<tr><td><code>{}</code></td><td class=\"n\">{}</td></tr>",
                        esc(&k.key),
                        thousands(k.count as f64)
                    );
                }
                h.push_str("</table>\n");
            }
            if let Some(stack) = &l.evidence.stack {
                h.push_str("<p>Hottest path (innermost first):</p><pre>");
                for frame in stack {
                    h.push_str(&esc(frame));
                    h.push('\n');
                }
                h.push_str("</pre>\n");
            }
            h.push_str("</div>\n");
        }
    }

    fn html_functions(&self, h: &mut String) {
        h.push_str("<table><tr><th></th><th>pid</th><th>function</th><th>peak calls/s</th><th>baseline calls/s</th></tr>\n");
        for (n, (key, peak)) in self.peaks().iter().enumerate() {
            let swatch = PALETTE
                .get(n)
                .map(|c| format!("<span class=\"sw\" style=\"background:{c}\"></span>"))
                .unwrap_or_default();
            let baseline = self
                .baselines
                .get(key)
                .map_or_else(|| "-".to_owned(), |b| thousands(*b));
            let _ = writeln!(
                h,
                "<tr><td>{swatch}</td><td class=\"n\">{}</td><td><code>{}</code></td><td class=\"n\">{}</td><td class=\"n\">{baseline}</td></tr>",
                key.0,
                esc(&key.1),
                thousands(*peak)
            );
        }
        h.push_str("</table>\n");
    }

    fn html_health(&self, h: &mut String) {
        if self.health.is_empty() {
            h.push_str("<p>Not recorded.</p>\n");
            return;
        }
        h.push_str("<table><tr><th>pid</th><th>CPU (mean / peak)</th><th>resident memory (first / peak / last)</th></tr>\n");
        for (pid, points) in &self.health {
            let cpu: Vec<f64> = points.iter().map(|p| p.1.cpu_percent).collect();
            let mean = cpu.iter().sum::<f64>() / cpu.len().max(1) as f64;
            let peak = cpu.iter().copied().fold(0.0, f64::max);
            let rss: Vec<u64> = points.iter().map(|p| p.1.rss_bytes).collect();
            let _ = writeln!(
                h,
                "<tr><td class=\"n\">{pid}</td><td class=\"n\">{mean:.0}% / {peak:.0}%</td><td class=\"n\">{} / {} / {}</td></tr>",
                mib(rss.first().copied().unwrap_or(0)),
                mib(rss.iter().copied().max().unwrap_or(0)),
                mib(rss.last().copied().unwrap_or(0))
            );
        }
        h.push_str("</table>\n");
        let cpu = self.health_series("CPU", |hl| hl.cpu_percent);
        h.push_str(&self.chart(&cpu, "% of a core"));
        let rss = self.health_series("MiB resident", |hl| hl.rss_bytes as f64 / (1024.0 * 1024.0));
        h.push_str(&self.chart(&rss, "MiB resident"));
    }

    /// One series per process of `value` over its health readings.
    fn health_series(&self, what: &str, value: impl Fn(&Health) -> f64) -> Vec<Series> {
        self.health
            .iter()
            .map(|(pid, points)| {
                (
                    format!("pid {pid}, {what}"),
                    points.iter().map(|(ts, hl)| (*ts, value(hl))).collect(),
                )
            })
            .collect()
    }

    fn html_settings(&self, h: &mut String) {
        let Some(s) = &self.settings else {
            return;
        };
        h.push_str("<h2>Settings in force</h2>\n<table>\n");
        for (name, value) in [
            ("interval", format!("{} s", s.interval_seconds)),
            ("threshold", format!("{} calls/s", s.threshold)),
            ("factor", format!("{}x the baseline", s.factor)),
            ("sustain", format!("{} s", s.sustain)),
            (
                "sustain (structural)",
                format!("{} s", s.sustain_structural),
            ),
            ("warm-up", format!("{} s", s.warmup)),
            (
                "CPU that counts as a burning core",
                format!("{} cores", s.cpu_cores),
            ),
            ("counters read every", format!("{} s", s.read_seconds)),
            ("max overhead", format!("{}%", s.max_overhead_percent)),
        ] {
            let _ = writeln!(
                h,
                "<tr><td>{name}</td><td class=\"n\">{}</td></tr>",
                esc(&value)
            );
        }
        h.push_str("</table>\n");
    }

    /// The busiest series' rates over time, each loop's window shaded.
    fn rates_chart(&self) -> String {
        let series: Vec<Series> = self
            .peaks()
            .into_iter()
            .take(CHART_SERIES)
            .map(|(key, _)| {
                let points = self.rates[&key].iter().map(|p| (p.0, p.1)).collect();
                (format!("{} (pid {})", key.1, key.0), points)
            })
            .collect();
        self.chart(&series, "calls/s")
    }

    /// A line chart of `series` over the recording's time, loop windows
    /// shaded.
    fn chart(&self, series: &[Series], unit: &str) -> String {
        let span = (self.ended - self.started).max(1.0);
        let top = series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.1))
            .fold(0.0, f64::max);
        let top = nice_ceiling(top.max(1.0));
        let plot_w = WIDTH - LEFT - 10.0;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let x = |ts: f64| LEFT + (ts - self.started) / span * plot_w;
        let y = |v: f64| TOP + plot_h - v / top * plot_h;
        let mut s = String::new();
        let _ = write!(
            s,
            "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{}\">",
            esc(unit)
        );
        for l in &self.loops {
            let (from, to) = l.window(self.ended);
            let _ = write!(
                s,
                "<rect class=\"loopwin\" x=\"{:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{plot_h}\" fill=\"{LOOP_SHADE}\"><title>loop in pid {}</title></rect>\
                 <text x=\"{:.1}\" y=\"{:.1}\" class=\"lbl\" fill=\"#c92a2a\">loop</text>",
                x(from).max(LEFT),
                (x(to) - x(from).max(LEFT)).max(2.0),
                l.pid,
                x(from).max(LEFT) + 4.0,
                TOP + 14.0
            );
        }
        for i in 0..=4 {
            let v = top * f64::from(i) / 4.0;
            let _ = write!(
                s,
                "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#dee2e6\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" class=\"lbl\" text-anchor=\"end\">{}</text>",
                LEFT + plot_w,
                y(v),
                y(v),
                LEFT - 6.0,
                y(v) + 4.0,
                if v == 0.0 {
                    "0".to_owned()
                } else {
                    thousands(v)
                }
            );
            let t = span * f64::from(i) / 4.0;
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"lbl\" text-anchor=\"middle\">{:.0} s</text>",
                x(self.started + t),
                HEIGHT - 12.0,
                t
            );
        }
        for (n, (name, points)) in series.iter().enumerate() {
            let colour = PALETTE[n % PALETTE.len()];
            let mut path = String::new();
            for (ts, v) in points {
                let _ = write!(path, "{:.1},{:.1} ", x(*ts), y(*v));
            }
            let _ = write!(
                s,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"><title>{}</title></polyline>",
                path.trim_end(),
                esc(name)
            );
        }
        s.push_str("</svg>\n<p class=\"legend\">");
        for (n, (name, _)) in series.iter().enumerate() {
            let _ = write!(
                s,
                "<span class=\"sw\" style=\"background:{}\"></span>{} ",
                PALETTE[n % PALETTE.len()],
                esc(name)
            );
        }
        s.push_str("</p>\n");
        s
    }

    /// The Markdown summary for a postmortem. Text from the recording
    /// (function names, keys: request data) is escaped, so it cannot break
    /// the tables or inject markup where Markdown renders HTML.
    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(
            m,
            "## cacheloop: {}\n\nRecording {}, {:.0} s from {}, kernel {} ({}).\n",
            if self.loops.is_empty() {
                "no loop".to_owned()
            } else {
                format!("{} loop(s)", self.loops.len())
            },
            md(&self.recording),
            self.ended - self.started,
            utc(self.started),
            md(&self.kernel),
            md(&self.mode)
        );
        for l in &self.loops {
            let _ = writeln!(
                m,
                "### Loop: {} in pid {}\n\n- {} calls/s against a baseline of {} ({}), confirmed at {:.1} s; cause: {}\n- Why: {}\n- {}",
                md(&l.functions.join(", ")),
                l.pid,
                thousands(l.rate),
                thousands(l.baseline),
                times(l.evidence.ratio),
                self.at(l.ts),
                md(&l.evidence.cause.replace('_', " ")),
                md(&l.reason),
                match &l.recovered {
                    Some((ts, why)) => format!("Recovered at {:.1} s: {}", self.at(*ts), md(why)),
                    None => "Still looping when the recording ended".to_owned(),
                }
            );
            let cycle = |items: &[String]| {
                let mut walk: Vec<String> = items.iter().map(|k| md(k)).collect();
                walk.extend(items.first().map(|k| md(k)));
                walk.join(" → ")
            };
            if let Some(keys) = &l.evidence.key_cycle {
                let _ = writeln!(m, "- Key cycle: {}", cycle(keys));
            }
            if let Some(functions) = &l.evidence.cycle {
                let _ = writeln!(m, "- Call cycle: {}", cycle(functions));
            }
            if let Some(keys) = &l.evidence.top_keys {
                let keys: Vec<String> = keys
                    .iter()
                    .map(|k| format!("{} x{}", md(&k.key), thousands(k.count as f64)))
                    .collect();
                let _ = writeln!(m, "- Top keys: {}", keys.join(", "));
            }
            if let Some(stack) = &l.evidence.stack {
                let _ = writeln!(m, "- Hottest path (innermost first):");
                for frame in stack {
                    let _ = writeln!(m, "  - {}", md(frame));
                }
            }
            m.push('\n');
        }
        m.push_str("| pid | function | peak calls/s | baseline calls/s |\n|---:|---|---:|---:|\n");
        for (key, peak) in self.peaks() {
            let baseline = self
                .baselines
                .get(&key)
                .map_or_else(|| "-".to_owned(), |b| thousands(*b));
            let _ = writeln!(
                m,
                "| {} | {} | {} | {baseline} |",
                key.0,
                md(&key.1),
                thousands(peak)
            );
        }
        m.push_str("\n| time | what |\n|---:|---|\n");
        for (ts, what) in &self.timeline {
            let _ = writeln!(m, "| {:.1} s | {} |", self.at(*ts), md(what));
        }
        m
    }
}

/// Text for Markdown: one line, and none of the characters that would make
/// it a table cell boundary, code, emphasis, a link or markup.
fn md(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' | '`' | '*' | '_' | '[' | ']' | '|' | '#' => {
                out.push('\\');
                out.push(c);
            }
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn record_ts(record: &Record) -> f64 {
    match record {
        Record::Start { ts, .. }
        | Record::Warning { ts, .. }
        | Record::Attached { ts, .. }
        | Record::Picked { ts, .. }
        | Record::Governor { ts, .. }
        | Record::Sample { ts, .. }
        | Record::Health { ts, .. }
        | Record::Loop { ts, .. }
        | Record::Recovered { ts, .. }
        | Record::TargetExit { ts, .. }
        | Record::Hook { ts, .. }
        | Record::Interval { ts, .. }
        | Record::Detached { ts, .. } => *ts,
    }
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    let power = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * power)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn utc(ts: f64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(ts.max(0.0)),
    )
    .to_string()
}

/// Text for HTML: function names hold `<`, `>` and `&` (C++).
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1000px;padding:0 16px;color:#212529}\
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:24px 0 8px}h3{font-size:16px;margin:12px 0 4px}\
.meta{color:#6c757d}.verdict{border-radius:6px;padding:4px 16px 12px;margin:16px 0}\
.verdict.loop{background:#fff5f5;border:2px solid #c92a2a}.verdict.ok{background:#ebfbee;border:2px solid #2b8a3e}\
.big{font-size:17px}.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}\
table{border-collapse:collapse;margin:8px 0}td,th{border-bottom:1px solid #dee2e6;padding:3px 10px;text-align:left}\
code,pre{font:13px ui-monospace,monospace}pre{background:#f8f9fa;padding:8px;overflow-x:auto}\
.chart{width:100%;height:auto;background:#fff;border:1px solid #dee2e6}.lbl{font:11px sans-serif;fill:#495057}\
.sw{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;vertical-align:-1px}.legend{font-size:13px}";

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Vec<Record> {
        let settings = StartSettings::new(&crate::detect::Rules::default(), 1.0, 0.25, 10.0);
        let mut r = vec![Record::Start {
            ts: 100.0,
            version: "0".into(),
            kernel: "6.1".into(),
            mode: "uprobe_multi".into(),
            settings: Box::new(settings),
            recording: None,
        }];
        for (i, rate) in [100.0, 110.0, 90_000.0, 95_000.0, 120.0].iter().enumerate() {
            r.push(Record::Sample {
                ts: 101.0 + i as f64,
                pid: 7,
                ns_pid: None,
                function: "Cache<K>::invalidate".into(),
                calls: *rate as u64,
                rate: *rate,
                baseline: Some(100.0),
                estimated: false,
            });
        }
        r.push(Record::Loop {
            ts: 104.0,
            pid: 7,
            functions: vec!["Cache<K>::invalidate".into()],
            rate: 95_000.0,
            baseline: 100.0,
            reason: "runaway".into(),
            evidence: Box::new(Evidence {
                elevated_rates: vec![90_000.0, 95_000.0],
                key_cycle: Some(vec!["page:a".into(), "frag:b".into()]),
                stack: Some(vec!["invalidate (cache.c:10)".into()]),
                ..Evidence::key_cycle_for_tests(950.0, 2.0)
            }),
        });
        r.push(Record::Recovered {
            ts: 105.5,
            pid: 7,
            functions: vec!["Cache<K>::invalidate".into()],
            rate: 120.0,
            baseline: 100.0,
            reason: "calm".into(),
        });
        r
    }

    #[test]
    fn the_page_shows_the_verdict_its_evidence_and_the_loop_window_escaped() {
        let i = Incident::from_records("x.rec", &records());
        let html = i.html();
        assert!(
            html.contains("Loop: Cache&lt;K&gt;::invalidate in pid 7"),
            "{html}"
        );
        assert!(
            html.contains(
                "95,000</span> calls/s against a baseline of <span class=\"n\">100</span>"
            )
        );
        assert!(html.contains("page:a → frag:b → page:a"));
        assert!(html.contains("recovered at 5.5 s: calm"));
        assert!(html.contains(&format!("fill=\"{LOOP_SHADE}\"")));
        // Self-contained: nothing to fetch.
        assert!(
            !html.contains("http://") && !html.contains("https://") && !html.contains("<script")
        );
        let md = i.markdown();
        // Escaped: a function name or a key cannot break the tables.
        assert!(
            md.contains("### Loop: Cache&lt;K&gt;::invalidate in pid 7"),
            "{md}"
        );
        assert!(
            md.contains("| 7 | Cache&lt;K&gt;::invalidate | 95,000 | 100 |"),
            "{md}"
        );
        assert!(md.contains("- Key cycle: page:a → frag:b → page:a"), "{md}");
        assert_eq!(md_escape_check(), "a\\|b \\`c\\` d");
    }

    fn md_escape_check() -> String {
        md("a|b `c`\nd")
    }

    #[test]
    fn nice_ceilings_are_1_2_5_times_a_power_of_ten() {
        assert_eq!(nice_ceiling(95_000.0), 100_000.0);
        assert_eq!(nice_ceiling(120.0), 200.0);
        assert_eq!(nice_ceiling(4.0), 5.0);
    }
}
