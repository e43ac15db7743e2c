//! What the user typed: the command line as clap parses it, before any
//! validation beyond the shape of each value. `config.rs` turns it into
//! settings.

use std::{path::PathBuf, time::Duration};

use clap::{ArgGroup, Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cacheloop",
    version,
    about = "Catch cache invalidation loops in live processes, with uprobes",
    long_about = "Attaches uprobes to the invalidation functions of running processes, \
                  counts their calls in the kernel, and tells a runaway invalidation loop \
                  from a healthy burst. Needs root (or CAP_BPF and CAP_PERFMON).\n\n\
                  Exit codes: 0 finished, 1 runtime failure, 2 bad usage or input, \
                  3 loop found with --fail-on-loop."
)]
pub struct Cli {
    /// More diagnostics on stderr (-v, -vv).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to processes and watch their invalidation rates for loops.
    Watch(Box<WatchArgs>),
    /// List the functions of a process or binary that can be watched.
    Symbols(SymbolsArgs),
    /// Show what each preset watches, and why.
    Presets(PresetsArgs),
    /// Run the detector over a recording (`watch --record`) and print what
    /// a live run would; other rule settings give other verdicts. No root
    /// needed.
    Replay(ReplayArgs),
    /// Write an incident report of a recording: one self-contained HTML
    /// page (charts, the verdict and its evidence, the target's CPU and
    /// memory, the settings, the timeline), or Markdown for a postmortem.
    Report(ReportArgs),
    /// Start a command with the probes in place from its first instruction,
    /// watch it as `watch` would, and exit with its status (or 3 with
    /// --fail-on-loop when a loop is confirmed): the pre-deploy gate.
    Run(Box<RunArgs>),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub watch: WatchArgs,

    /// With --fail-on-loop, how long the command gets between SIGTERM and
    /// SIGKILL once a loop is confirmed.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub grace: Duration,

    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The recording, made with `cacheloop watch ... --record FILE`.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Write the report here (default: stdout).
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// `html`: one page that opens offline; `md`: Markdown to paste.
    #[arg(long, value_enum, default_value = "html")]
    pub format: ReportFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Html,
    Md,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The recording, made with `cacheloop watch ... --record FILE`.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Least rate, in calls/s, that can count as a loop (default: the
    /// recording's).
    #[arg(long, value_name = "CALLS_PER_SEC", allow_negative_numbers = true)]
    pub threshold: Option<f64>,

    /// How many times its learned baseline a rate must reach to be suspect
    /// (default: the recording's).
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    pub factor: Option<f64>,

    /// Seconds of a runaway rate that confirm a loop, and calm seconds
    /// that confirm a recovery (default: the recording's).
    #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
    pub sustain: Option<Duration>,

    /// Seconds of structural evidence that confirm a loop (default: the
    /// recording's).
    #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
    pub sustain_structural: Option<Duration>,

    /// Seconds of history averaged into the first baseline (default: the
    /// recording's).
    #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
    pub warmup: Option<Duration>,

    /// CPU, in cores, a process must burn for a loop to be "burning a
    /// core" (default: the recording's).
    #[arg(long, value_name = "CORES", allow_negative_numbers = true)]
    pub cpu_cores: Option<f64>,

    /// Show keys as they are; by default they are hashed as in the live run.
    #[arg(long)]
    pub show_keys: bool,

    /// One JSON object per line on stdout.
    #[arg(long)]
    pub json: bool,

    /// Stop at the first loop and exit with status 3.
    #[arg(long)]
    pub fail_on_loop: bool,
}

#[derive(Debug, Args)]
pub struct PresetsArgs {
    /// Only this preset, one function per line.
    pub name: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").multiple(true).args(["pid", "binary", "name"])))]
pub struct WatchArgs {
    /// Watch this process; repeat for several.
    #[arg(long, value_name = "PID", value_parser = parse_pid)]
    pub pid: Vec<u32>,

    /// Watch every process running this executable or library, now and
    /// later.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,

    /// Watch every process with this command name, now and later (restarts
    /// are attached within an interval); repeat for several.
    #[arg(long, value_name = "COMM")]
    pub name: Vec<String>,

    /// Functions to count: a glob (`*`, `?`, `[..]`) over demangled names
    /// (C, C++, Rust), in the executable and the libraries it maps; repeat
    /// for several. Without --func (or a preset), cacheloop picks them: the
    /// executable's functions whose names read like invalidation, and those
    /// its on-CPU samples find hot.
    #[arg(long = "func", value_name = "PATTERN")]
    pub funcs: Vec<String>,

    /// Watch a cache's invalidation functions as Debian packages it: redis
    /// or varnish (see the README). Without a target, watches the cache's
    /// processes by name.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,

    /// How often to read the counters and judge the rates.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,

    /// Stop after this long (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Least rate, in calls/s, that can count as a loop.
    #[arg(
        long,
        value_name = "CALLS_PER_SEC",
        default_value_t = 1000.0,
        allow_negative_numbers = true
    )]
    pub threshold: f64,

    /// How many times its learned baseline a rate must reach to be suspect.
    #[arg(
        long,
        value_name = "X",
        default_value_t = 10.0,
        allow_negative_numbers = true
    )]
    pub factor: f64,

    /// Seconds of a runaway rate (k of n: within 1.5 times as long) that
    /// confirm a loop, and calm seconds that confirm a recovery. A bare
    /// number is seconds.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_seconds)]
    pub sustain: Duration,

    /// Seconds of structural evidence (a call cycle, a key cycle, keys
    /// repeating beyond their learned share), within twice as long, that
    /// confirm a loop.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_seconds)]
    pub sustain_structural: Duration,

    /// Seconds of history averaged into the first baseline.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_seconds)]
    pub warmup: Duration,

    /// CPU, in cores, a process must burn (and a core more than it
    /// learned) to corroborate a runaway rate or a cycle seen without
    /// history.
    #[arg(
        long,
        value_name = "CORES",
        default_value_t = 0.85,
        allow_negative_numbers = true
    )]
    pub cpu_cores: f64,

    /// The most of a target's time the probes may take, in percent. A hot
    /// function (a loop calls it flat out) is then probed in a window of
    /// each interval and its rates are estimates, marked as such; 100 keeps
    /// the probes in throughout.
    #[arg(long, value_name = "PERCENT", default_value_t = 10.0)]
    pub max_overhead: f64,

    /// Functions that mark a request served (a glob; repeatable). They are
    /// counted, not judged: each interval reports invalidations per
    /// request, and a rise in invalidations that requests explain (traffic)
    /// is not called a loop.
    #[arg(long, value_name = "PATTERN")]
    pub request_func: Vec<String>,

    /// Capture argument N (from 0) of the watched functions as the key
    /// being invalidated: `N:u64` for an integer, `N:str` for a C string
    /// (read safely, truncated to 48 bytes), `N:str@OFF` for a pointer to a
    /// struct holding, at byte OFF, a pointer to a C string, `N:string` for
    /// a C++ `std::string` (libstdc++, by value or by reference). Key cycles
    /// and repeating keys are evidence of a loop.
    #[arg(long, value_name = "N:TYPE", value_parser = parse_key_arg)]
    pub key_arg: Option<KeyArg>,

    /// Show keys as they are; by default they are hashed (keys can be
    /// personal data).
    #[arg(long)]
    pub show_keys: bool,

    /// One JSON object per line on stdout; diagnostics stay on stderr.
    #[arg(long)]
    pub json: bool,

    /// Stop as soon as a loop is confirmed, and exit with status 3.
    #[arg(long)]
    pub fail_on_loop: bool,

    /// Record the run to FILE: the catalog of probed functions and every
    /// raw snapshot, for `cacheloop replay` (compressed; made durable every
    /// 2 s, so a crash loses at most that).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics: a port alone
    /// listens on loopback (9466 is 127.0.0.1:9466); another interface must
    /// be named (0.0.0.0:9466).
    #[arg(long, value_name = "ADDR", value_parser = crate::exporter::parse_listen)]
    pub prometheus: Option<std::net::SocketAddr>,

    /// Run CMD (with /bin/sh) once per loop verdict, the loop record as
    /// JSON on its stdin; one at a time, stopped after --hook-timeout.
    #[arg(long, value_name = "CMD")]
    pub on_loop: Option<String>,

    /// Run CMD once per recovery, likewise.
    #[arg(long, value_name = "CMD")]
    pub on_recover: Option<String>,

    /// How long a hook may run before it is stopped.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub hook_timeout: Duration,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["pid", "binary"])))]
pub struct SymbolsArgs {
    /// List the functions of this process's executable.
    #[arg(long, value_name = "PID", value_parser = parse_pid)]
    pub pid: Option<u32>,

    /// List the functions of this executable or library.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,

    /// Only functions matching this glob.
    #[arg(long = "match", value_name = "PATTERN")]
    pub pattern: Option<String>,

    /// One JSON object per function.
    #[arg(long)]
    pub json: bool,

    /// Instead of ELF symbols, the functions of an interpreted runtime
    /// (py, rb or php) the process calls: its USDT probe listens for
    /// --listen and lists each name seen called, as `--func 'rb:…'` takes
    /// it. Needs --pid and root.
    #[arg(long, value_name = "RUNTIME", requires = "pid", value_parser = ["py", "rb", "php"])]
    pub runtime: Option<String>,

    /// How long --runtime listens.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    pub listen: Duration,
}

/// `--key-arg N:u64`, `N:str`, `N:str@OFF` or `N:string`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyArg {
    pub index: u32,
    pub kind: KeyKind,
}

/// How a key argument is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// The argument is the key, an integer.
    U64,
    /// The argument points to a NUL-terminated string.
    Str,
    /// The argument points to a struct holding, at this byte offset, a
    /// pointer to a NUL-terminated string. A libstdc++ `std::string` is
    /// offset 0: its first member points to its (NUL-terminated) bytes,
    /// inline for short strings or on the heap.
    StrAt(u32),
}

/// The largest `@OFF` taken: a field within a few pages of the struct.
const MAX_KEY_OFFSET: u32 = 1 << 16;

/// Parses a `--key-arg` value, `N:u64`, `N:str`, `N:str@OFF` or
/// `N:string` with N from 0 to 5; the error names the value and the
/// expected form. Public for the fuzz targets.
pub fn parse_key_arg(text: &str) -> Result<KeyArg, String> {
    let bad = || {
        format!(
            "'{text}' is not N:u64, N:str, N:str@OFFSET or N:string \
             (N: the argument number, from 0, up to 5; OFFSET: bytes, up to {MAX_KEY_OFFSET})"
        )
    };
    let (n, kind) = text.split_once(':').ok_or_else(bad)?;
    let index: u32 = n.parse().map_err(|_| bad())?;
    if index > 5 {
        return Err(bad());
    }
    let kind = match kind {
        "u64" => KeyKind::U64,
        "str" => KeyKind::Str,
        "string" => KeyKind::StrAt(0),
        other => {
            let offset = other.strip_prefix("str@").ok_or_else(bad)?;
            let offset: u32 = offset.parse().map_err(|_| bad())?;
            if offset > MAX_KEY_OFFSET {
                return Err(bad());
            }
            KeyKind::StrAt(offset)
        }
    };
    Ok(KeyArg { index, kind })
}

/// Parses a `--pid` value: a process id, never 0. Public for the fuzz
/// targets.
pub fn parse_pid(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(0) => Err("pid 0 is not a process".to_owned()),
        Ok(pid) => Ok(pid),
        Err(_) => Err(format!(
            "'{text}' is not a process id (expected a number such as 1234)"
        )),
    }
}

/// Parses a duration flag's value: `500ms`, `2s`, `1m`, `1h 30m`. Whether
/// it is in range is `config.rs`'s to check. Public for the fuzz targets.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|_| format!("'{text}' is not a duration (use a number and a unit: 500ms, 2s, 1m)"))
}

/// Parses a number of seconds: a duration (`500ms`, `2s`) or a bare number
/// (`3`, `1.5`: seconds).
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("'{text}' is not a number of seconds 0 or more"));
    }
    parse_duration(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cacheloop").chain(args.iter().copied()))
    }

    fn watch(args: &[&str]) -> WatchArgs {
        match parse(args).unwrap().command {
            Command::Watch(w) => *w,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn watch_defaults() {
        let w = watch(&["watch", "--pid", "42", "--func", "cache_*"]);
        assert_eq!(w.pid, [42]);
        assert_eq!(w.funcs, ["cache_*"]);
        assert_eq!(w.interval, Duration::from_secs(1));
        assert_eq!(w.duration, None);
        assert_eq!(w.threshold, 1000.0);
        assert_eq!(w.factor, 10.0);
        assert_eq!(w.sustain, Duration::from_secs(2));
        assert_eq!(w.sustain_structural, Duration::from_millis(500));
        assert!(!w.json && !w.fail_on_loop);
    }

    #[test]
    fn name_repeats_and_is_a_target() {
        let w = watch(&[
            "watch",
            "--name",
            "redis-server",
            "--name",
            "varnishd",
            "--func",
            "f",
        ]);
        assert_eq!(w.name, ["redis-server", "varnishd"]);
        assert!(w.pid.is_empty() && w.binary.is_none());
    }

    #[test]
    fn pid_and_func_repeat() {
        let w = watch(&[
            "watch", "--pid", "1", "--pid", "2", "--func", "a", "--func", "b",
        ]);
        assert_eq!(w.pid, [1, 2]);
        assert_eq!(w.funcs, ["a", "b"]);
    }

    #[test]
    fn every_flag_spelling_parses() {
        let w = watch(&[
            "watch",
            "--binary",
            "/usr/bin/redis-server",
            "--func",
            "f",
            "--interval",
            "500ms",
            "--duration",
            "1m",
            "--threshold",
            "50",
            "--factor",
            "4",
            "--sustain",
            "2",
            "--warmup",
            "5",
            "--json",
            "--fail-on-loop",
        ]);
        assert_eq!(
            w.binary.as_deref(),
            Some(std::path::Path::new("/usr/bin/redis-server"))
        );
        assert_eq!(w.interval, Duration::from_millis(500));
        assert_eq!(w.duration, Some(Duration::from_secs(60)));
        assert_eq!(
            (w.threshold, w.factor, w.sustain, w.warmup),
            (50.0, 4.0, Duration::from_secs(2), Duration::from_secs(5))
        );
        assert!(w.json && w.fail_on_loop);
    }

    #[test]
    fn request_func_repeats() {
        let w = watch(&[
            "watch",
            "--pid",
            "1",
            "--func",
            "f",
            "--request-func",
            "handle_*",
            "--request-func",
            "serve",
        ]);
        assert_eq!(w.request_func, ["handle_*", "serve"]);
    }

    #[test]
    fn key_arg_takes_an_index_and_a_type() {
        let w = watch(&[
            "watch",
            "--pid",
            "1",
            "--func",
            "f",
            "--key-arg",
            "1:str",
            "--show-keys",
        ]);
        assert_eq!(
            w.key_arg,
            Some(KeyArg {
                index: 1,
                kind: KeyKind::Str
            })
        );
        assert!(w.show_keys);
        let w = watch(&["watch", "--pid", "1", "--func", "f", "--key-arg", "0:u64"]);
        assert_eq!(
            w.key_arg,
            Some(KeyArg {
                index: 0,
                kind: KeyKind::U64
            })
        );
        assert_eq!(parse_key_arg("2:str@8").unwrap().kind, KeyKind::StrAt(8));
        assert_eq!(parse_key_arg("1:string").unwrap().kind, KeyKind::StrAt(0));
        for bad in [
            "1",
            "x:str",
            "1:float",
            "9:u64",
            "1:str@",
            "1:str@-8",
            "1:str@99999999",
        ] {
            assert!(
                parse(&["watch", "--pid", "1", "--func", "f", "--key-arg", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_pid_is_named() {
        let err = parse(&["watch", "--pid", "abc", "--func", "f"]).unwrap_err();
        assert!(
            err.to_string().contains("'abc' is not a process id"),
            "{err}"
        );
        let err = parse(&["watch", "--pid", "0", "--func", "f"]).unwrap_err();
        assert!(err.to_string().contains("pid 0"), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let err = parse(&["watch", "--pid", "1", "--func", "f", "--interval", "soon"]).unwrap_err();
        assert!(
            err.to_string().contains("'soon' is not a duration"),
            "{err}"
        );
    }

    #[test]
    fn functions_may_be_left_to_cacheloop() {
        let w = watch(&["watch", "--pid", "1"]);
        assert!(w.funcs.is_empty() && w.preset.is_none());
        let w = watch(&["watch", "--preset", "redis"]);
        assert_eq!(w.preset.as_deref(), Some("redis"));
        assert!(w.funcs.is_empty());
    }

    #[test]
    fn record_takes_a_file() {
        let w = watch(&["watch", "--pid", "1", "--func", "f", "--record", "x.rec"]);
        assert_eq!(w.record.as_deref(), Some(std::path::Path::new("x.rec")));
    }

    #[test]
    fn replay_takes_a_file_and_optional_rules() {
        let Command::Replay(r) = parse(&["replay", "x.rec"]).unwrap().command else {
            panic!()
        };
        assert_eq!(r.file, std::path::Path::new("x.rec"));
        assert_eq!(
            (r.threshold, r.factor, r.sustain, r.warmup),
            (None, None, None, None)
        );
        let Command::Replay(r) = parse(&[
            "replay",
            "x.rec",
            "--threshold",
            "5000",
            "--factor",
            "4",
            "--sustain",
            "5",
            "--warmup",
            "3",
            "--json",
            "--show-keys",
            "--fail-on-loop",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(
            (r.threshold, r.factor, r.sustain, r.warmup),
            (
                Some(5000.0),
                Some(4.0),
                Some(Duration::from_secs(5)),
                Some(Duration::from_secs(3))
            )
        );
        assert!(r.json && r.show_keys && r.fail_on_loop);
        assert!(parse(&["replay"]).is_err());
    }

    #[test]
    fn presets_takes_an_optional_name() {
        let Command::Presets(p) = parse(&["presets", "redis"]).unwrap().command else {
            panic!()
        };
        assert_eq!(p.name.as_deref(), Some("redis"));
        let Command::Presets(p) = parse(&["presets"]).unwrap().command else {
            panic!()
        };
        assert_eq!(p.name, None);
    }

    #[test]
    fn symbols_takes_one_target() {
        assert!(parse(&["symbols", "--pid", "1", "--binary", "/bin/sh"]).is_err());
        let Command::Symbols(s) = parse(&["symbols", "--binary", "/bin/sh", "--match", "x*"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(s.pattern.as_deref(), Some("x*"));
    }
}
