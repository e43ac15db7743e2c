//! Validated settings: the second stage after `cli.rs`. Every check on what
//! the user typed that needs no system call happens here, so bad input is
//! refused before anything touches the kernel.

use std::{path::PathBuf, time::Duration};

use crate::{
    cli::{ReplayArgs, WatchArgs},
    detect::Rules,
    presets,
    symbols::{Pattern, SymbolError},
};

/// A value that parses but makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A duration flag is zero.
    #[error("{flag} must be longer than 0 (for example 1s or 500ms)")]
    ZeroDuration { flag: &'static str },
    /// A number flag is out of its range.
    #[error("{flag} {value} is out of range: {expected}")]
    OutOfRange {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A `--func` pattern is not a glob.
    #[error(transparent)]
    Pattern(#[from] SymbolError),
    /// `--preset` names no preset.
    #[error("no preset called '{name}'; presets: {known}")]
    UnknownPreset { name: String, known: String },
    /// Nothing to watch.
    #[error("no target: give --pid PID, --binary PATH or --name COMM (or a --preset)")]
    NoTarget,
    /// `py:`/`rb:`/`php:` with `--binary`.
    #[error(
        "py:, rb: and php: functions are counted per process (their probes raise a semaphore in each): give --pid or --name instead of --binary"
    )]
    RuntimeBinary,
    /// `run` is given a target of its own.
    #[error("cacheloop run watches the command it starts: leave out --pid, --binary and --name")]
    RunTarget,
    /// A hook is asked for where it could not run.
    #[error(
        "--on-loop and --on-recover run their command with /bin/sh, and this system has none (a scratch image?); install a shell or leave the hooks out"
    )]
    NoShell,
}

/// How records are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// Everything `watch` needs, checked.
#[derive(Debug)]
pub struct WatchConfig {
    pub pids: Vec<u32>,
    pub binary: Option<PathBuf>,
    /// Command names (`--name`).
    pub names: Vec<String>,
    /// Every function to probe: `--func`, the preset's, and the requests.
    pub patterns: Vec<Pattern>,
    /// The `--request-func` patterns (also in `patterns`).
    pub request_patterns: Vec<Pattern>,
    /// No `--func` and no preset: cacheloop picks the functions.
    pub discover: bool,
    /// The `py:`, `rb:`, `php:` patterns: interpreted functions.
    pub runtime_patterns: Vec<crate::usdt::RuntimePattern>,
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub rules: Rules,
    pub output: Output,
    pub fail_on_loop: bool,
    /// How to read keys: `--key-arg` for every function, and the preset's
    /// own specs by function name (those win).
    pub key_arg: Option<crate::cli::KeyArg>,
    pub preset_keys: Vec<(&'static str, presets::KeySpec)>,
    pub show_keys: bool,
    /// `--max-overhead` as a share (0.1 for 10%).
    pub max_overhead: f64,
    /// `--record FILE`.
    pub record: Option<PathBuf>,
    /// `--prometheus ADDR`.
    pub prometheus: Option<std::net::SocketAddr>,
    /// `--on-loop`, `--on-recover`, `--hook-timeout`.
    pub hooks: crate::hooks::HookConfig,
    /// `cacheloop run`: the command's pid, which gets SIGINT and SIGTERM
    /// instead of cacheloop.
    pub command: Option<u32>,
    /// `cacheloop run --grace`: between SIGTERM and SIGKILL when a loop
    /// stops the command.
    pub command_grace: Duration,
}

/// Rule settings given on `replay`'s command line; the rest come from the
/// recording.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuleOverrides {
    pub factor: Option<f64>,
    pub min_rate: Option<f64>,
    pub sustain: Option<f64>,
    pub structural_sustain: Option<f64>,
    pub warmup: Option<f64>,
    pub cpu_cores: Option<f64>,
}

impl RuleOverrides {
    /// The recording's rules with these settings in their place.
    pub fn apply(&self, recorded: Rules) -> Rules {
        Rules {
            factor: self.factor.unwrap_or(recorded.factor),
            min_rate: self.min_rate.unwrap_or(recorded.min_rate),
            sustain: self.sustain.unwrap_or(recorded.sustain),
            structural_sustain: self
                .structural_sustain
                .unwrap_or(recorded.structural_sustain),
            warmup: self.warmup.unwrap_or(recorded.warmup),
            cpu_cores: self.cpu_cores.unwrap_or(recorded.cpu_cores),
            ..recorded
        }
    }
}

/// Everything `replay` needs, checked.
#[derive(Debug)]
pub struct ReplayConfig {
    pub path: PathBuf,
    pub rules: RuleOverrides,
    pub output: Output,
    pub show_keys: bool,
    pub fail_on_loop: bool,
}

impl TryFrom<ReplayArgs> for ReplayConfig {
    type Error = ConfigError;

    fn try_from(args: ReplayArgs) -> Result<Self, ConfigError> {
        if let Some(threshold) = args.threshold {
            check_threshold(threshold)?;
        }
        if let Some(factor) = args.factor {
            check_factor(factor)?;
        }
        let sustain = args
            .sustain
            .map(|d| check_seconds("--sustain", d))
            .transpose()?;
        let structural_sustain = args
            .sustain_structural
            .map(|d| check_seconds("--sustain-structural", d))
            .transpose()?;
        let warmup = args
            .warmup
            .map(|d| check_seconds("--warmup", d))
            .transpose()?;
        if let Some(cores) = args.cpu_cores {
            check_cores(cores)?;
        }
        Ok(Self {
            path: args.file,
            rules: RuleOverrides {
                factor: args.factor,
                min_rate: args.threshold,
                sustain,
                structural_sustain,
                warmup,
                cpu_cores: args.cpu_cores,
            },
            output: if args.json {
                Output::Json
            } else {
                Output::Text
            },
            show_keys: args.show_keys,
            fail_on_loop: args.fail_on_loop,
        })
    }
}

fn check_threshold(threshold: f64) -> Result<(), ConfigError> {
    if threshold.is_finite() && threshold >= 0.0 {
        return Ok(());
    }
    Err(ConfigError::OutOfRange {
        flag: "--threshold",
        value: threshold.to_string(),
        expected: "calls per second, 0 or more",
    })
}

fn check_factor(factor: f64) -> Result<(), ConfigError> {
    if factor.is_finite() && factor > 1.0 {
        return Ok(());
    }
    Err(ConfigError::OutOfRange {
        flag: "--factor",
        value: factor.to_string(),
        expected: "a multiple of the baseline greater than 1",
    })
}

/// Shorter intervals would read every map hundreds of times a second: a
/// busy loop of system calls on the server being diagnosed.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Far beyond any run, and far below what makes `Instant + duration`
/// overflow.
const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// Sustain and warm-up times: above zero, at most an hour.
fn check_seconds(flag: &'static str, d: Duration) -> Result<f64, ConfigError> {
    if !d.is_zero() && d <= MAX_INTERVAL {
        return Ok(d.as_secs_f64());
    }
    Err(ConfigError::OutOfRange {
        flag,
        value: humantime::format_duration(d).to_string(),
        expected: "from 1ms to 1h (a duration such as 2s or 500ms)",
    })
}

fn check_cores(cores: f64) -> Result<(), ConfigError> {
    if cores.is_finite() && cores > 0.0 && cores <= 1024.0 {
        return Ok(());
    }
    Err(ConfigError::OutOfRange {
        flag: "--cpu-cores",
        value: cores.to_string(),
        expected: "CPU cores above 0 (0.85 is most of one core)",
    })
}

impl TryFrom<WatchArgs> for WatchConfig {
    type Error = ConfigError;

    fn try_from(args: WatchArgs) -> Result<Self, ConfigError> {
        if args.interval.is_zero() {
            return Err(ConfigError::ZeroDuration { flag: "--interval" });
        }
        if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&args.interval) {
            return Err(ConfigError::OutOfRange {
                flag: "--interval",
                value: humantime::format_duration(args.interval).to_string(),
                expected: "from 10ms to 1h (the counters are read and judged this often)",
            });
        }
        if args.duration.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ZeroDuration { flag: "--duration" });
        }
        if let Some(duration) = args.duration.filter(|&d| d > MAX_DURATION) {
            return Err(ConfigError::OutOfRange {
                flag: "--duration",
                value: humantime::format_duration(duration).to_string(),
                expected: "at most 10 years; leave --duration out to run until Ctrl-C",
            });
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&args.hook_timeout) {
            return Err(ConfigError::OutOfRange {
                flag: "--hook-timeout",
                value: humantime::format_duration(args.hook_timeout).to_string(),
                expected: "from 1s to 10m",
            });
        }
        if (args.on_loop.is_some() || args.on_recover.is_some())
            && !std::path::Path::new(crate::hooks::SHELL).exists()
        {
            return Err(ConfigError::NoShell);
        }
        check_threshold(args.threshold)?;
        check_factor(args.factor)?;
        if !(args.max_overhead.is_finite() && args.max_overhead > 0.0 && args.max_overhead <= 100.0)
        {
            return Err(ConfigError::OutOfRange {
                flag: "--max-overhead",
                value: args.max_overhead.to_string(),
                expected: "a percentage above 0 and at most 100",
            });
        }
        let sustain = check_seconds("--sustain", args.sustain)?;
        let structural_sustain = check_seconds("--sustain-structural", args.sustain_structural)?;
        let warmup = check_seconds("--warmup", args.warmup)?;
        check_cores(args.cpu_cores)?;
        let preset = match args.preset.as_deref() {
            Some(name) => Some(
                presets::find(name).ok_or_else(|| ConfigError::UnknownPreset {
                    name: name.to_owned(),
                    known: presets::names(),
                })?,
            ),
            None => None,
        };
        let mut names = args.name;
        if args.pid.is_empty() && args.binary.is_none() && names.is_empty() {
            let preset = preset.ok_or(ConfigError::NoTarget)?;
            names = preset
                .default_names
                .iter()
                .map(|n| (*n).to_owned())
                .collect();
        }
        let preset_funcs = preset
            .iter()
            .flat_map(|p| p.functions.iter().map(|(f, _)| *f));
        let (runtime_funcs, funcs): (Vec<&String>, Vec<&String>) = args
            .funcs
            .iter()
            .partition(|f| crate::usdt::runtime_pattern(f).is_some());
        let runtime_patterns = runtime_funcs
            .into_iter()
            .map(|text| {
                let (runtime, glob) = crate::usdt::runtime_pattern(text).expect("partitioned");
                Ok(crate::usdt::RuntimePattern {
                    runtime,
                    glob: Pattern::new(glob)?,
                    text: text.clone(),
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        if !runtime_patterns.is_empty() && args.binary.is_some() {
            return Err(ConfigError::RuntimeBinary);
        }
        let patterns = funcs
            .into_iter()
            .map(String::as_str)
            .chain(preset_funcs)
            .map(Pattern::new)
            .collect::<Result<_, _>>()?;
        let request_patterns: Vec<Pattern> = args
            .request_func
            .iter()
            .map(|p| Pattern::new(p))
            .collect::<Result<_, _>>()?;
        let mut patterns: Vec<Pattern> = patterns;
        patterns.extend(request_patterns.iter().cloned());
        let discover = args.funcs.is_empty() && preset.is_none();
        let mut pids = args.pid;
        pids.sort_unstable();
        pids.dedup();
        Ok(Self {
            pids,
            binary: args.binary,
            names,
            patterns,
            request_patterns,
            discover,
            runtime_patterns,
            interval: args.interval,
            duration: args.duration,
            rules: Rules {
                factor: args.factor,
                min_rate: args.threshold,
                sustain,
                structural_sustain,
                warmup,
                cpu_cores: args.cpu_cores,
                ..Rules::default()
            },
            output: if args.json {
                Output::Json
            } else {
                Output::Text
            },
            fail_on_loop: args.fail_on_loop,
            key_arg: args.key_arg,
            preset_keys: preset.iter().flat_map(|p| p.keys.iter().copied()).collect(),
            show_keys: args.show_keys,
            max_overhead: args.max_overhead / 100.0,
            record: args.record,
            prometheus: args.prometheus,
            command: None,
            command_grace: Duration::from_secs(5),
            hooks: crate::hooks::HookConfig {
                on_loop: args.on_loop,
                on_recover: args.on_recover,
                timeout: args.hook_timeout,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn config(extra: &[&str]) -> Result<WatchConfig, ConfigError> {
        let args = [
            "cacheloop",
            "watch",
            "--pid",
            "7",
            "--pid",
            "7",
            "--func",
            "f*",
        ];
        let cli = Cli::try_parse_from(args.iter().chain(extra)).unwrap();
        let Command::Watch(w) = cli.command else {
            panic!()
        };
        WatchConfig::try_from(*w)
    }

    #[test]
    fn hook_timeout_is_bounded() {
        for bad in ["0s", "500ms", "11m"] {
            let err = config(&["--hook-timeout", bad]).unwrap_err().to_string();
            assert!(
                err.contains("--hook-timeout") && err.contains("from 1s to 10m"),
                "{err}"
            );
        }
        let c = config(&["--on-loop", "true", "--hook-timeout", "20s"]).unwrap();
        assert_eq!(c.hooks.timeout, Duration::from_secs(20));
        assert_eq!(c.hooks.on_loop.as_deref(), Some("true"));
    }

    #[test]
    fn defaults_make_default_rules() {
        let c = config(&[]).unwrap();
        assert_eq!(c.rules, Rules::default());
        assert_eq!(c.pids, [7], "repeated pids are watched once");
        assert_eq!(c.output, Output::Text);
    }

    #[test]
    fn rule_flags_reach_the_rules() {
        let c = config(&[
            "--threshold",
            "50",
            "--factor",
            "4",
            "--sustain",
            "2",
            "--json",
        ])
        .unwrap();
        assert_eq!(
            (c.rules.min_rate, c.rules.factor, c.rules.sustain),
            (50.0, 4.0, 2.0)
        );
        assert_eq!(c.output, Output::Json);
        assert_eq!(c.max_overhead, 0.1, "10% unless told");
    }

    #[test]
    fn zero_interval_is_refused() {
        let err = config(&["--interval", "0s"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--interval must be longer than 0 (for example 1s or 500ms)"
        );
    }

    #[test]
    fn out_of_range_numbers_are_refused() {
        for args in [
            &["--factor", "1"][..],
            &["--threshold", "-5"],
            &["--threshold", "NaN"],
            &["--sustain", "0"],
            &["--duration", "0ms"],
            // Regression: made `Instant + duration` overflow and panic.
            &["--duration", "300000000000y"],
            // Regression: read the maps in a busy loop.
            &["--interval", "1ns"],
            &["--interval", "2h"],
            &["--max-overhead", "0"],
            &["--max-overhead", "101"],
        ] {
            assert!(config(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn preset_adds_its_functions_and_default_names() {
        let args = [
            "cacheloop",
            "watch",
            "--preset",
            "varnish",
            "--func",
            "extra_fn",
        ];
        let Command::Watch(w) = Cli::try_parse_from(args).unwrap().command else {
            panic!()
        };
        let c = WatchConfig::try_from(*w).unwrap();
        let texts: Vec<&str> = c.patterns.iter().map(Pattern::as_str).collect();
        assert_eq!(
            texts,
            [
                "extra_fn",
                "HSH_Purge",
                "BAN_Commit",
                "EXP_Remove",
                "HSH_Kill"
            ]
        );
        assert_eq!(c.names, ["varnishd", "cache-main"]);
    }

    #[test]
    fn unknown_preset_and_missing_target_are_refused() {
        let args = ["cacheloop", "watch", "--preset", "memcached"];
        let Command::Watch(w) = Cli::try_parse_from(args).unwrap().command else {
            panic!()
        };
        let err = WatchConfig::try_from(*w).unwrap_err().to_string();
        assert_eq!(err, "no preset called 'memcached'; presets: redis, varnish");
        let args = ["cacheloop", "watch", "--func", "f"];
        let Command::Watch(w) = Cli::try_parse_from(args).unwrap().command else {
            panic!()
        };
        assert!(matches!(
            WatchConfig::try_from(*w),
            Err(ConfigError::NoTarget)
        ));
    }

    #[test]
    fn invalid_glob_is_refused() {
        let args = ["cacheloop", "watch", "--pid", "7", "--func", "[oops"];
        let Command::Watch(w) = Cli::try_parse_from(args).unwrap().command else {
            panic!()
        };
        let err = WatchConfig::try_from(*w).unwrap_err();
        assert!(err.to_string().contains("[oops"), "{err}");
    }
}
