//! Command-line values, as `cli.rs` and `config.rs` take them.
//!
//! The input (UTF-8 only: the command line is text by the time clap has
//! it) goes to the duration, pid and key-arg parsers and the glob compiler
//! as it is; then as the value of one of the flags those parsers serve
//! (the first byte picks which) in a `cacheloop watch` command line; then,
//! split at whitespace, as a whole command line. Whatever clap accepts is
//! validated into settings as `watch` and `replay` do; settings that pass
//! must be usable: every duration fits `Instant + duration`, which the run
//! computes.
//!
//! Nothing here may panic, whatever the text.

#![no_main]

use std::time::{Duration, Instant};

use clap::Parser as _;
use libfuzzer_sys::fuzz_target;
use profiler::{
    cli::{Cli, Command, parse_duration, parse_key_arg, parse_pid},
    config::{ReplayConfig, WatchConfig},
    symbols::Pattern,
};

/// Flags whose values go through the parsers above, or through the glob
/// compiler.
const FLAGS: &[&str] = &[
    "--interval",
    "--duration",
    "--pid",
    "--key-arg",
    "--func",
    "--request-func",
    "--threshold",
    "--max-overhead",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_duration(text);
    let _ = parse_pid(text);
    let _ = parse_key_arg(text);
    if let Ok(glob) = Pattern::new(text) {
        let _ = glob.matches(text);
        let _ = glob.matches("cache::Store::invalidate(std::string const&)");
    }

    // One flag per input (clap builds and checks the whole command on each
    // parse): the first byte picks it.
    let flag = FLAGS[usize::from(data.first().copied().unwrap_or(0)) % FLAGS.len()];
    let base = ["cacheloop", "watch", "--pid", "1", "--func", "f"];
    command_line(base.into_iter().chain([flag, text]));
    command_line(std::iter::once("cacheloop").chain(text.split_whitespace()));
});

/// Parses and validates one command line as `main` does.
fn command_line<'a>(args: impl IntoIterator<Item = &'a str>) {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // What the user would see (help and version included).
            let _ = e.render().to_string();
            return;
        }
    };
    let watched = |args| {
        if let Ok(config) = WatchConfig::try_from(args) {
            usable(config.interval);
            if let Some(duration) = config.duration {
                usable(duration);
            }
        }
    };
    match cli.command {
        Command::Watch(args) => watched(*args),
        // `run` checks its watch flags the same way (its own target aside).
        Command::Run(args) => watched(args.watch),
        Command::Replay(args) => {
            let _ = ReplayConfig::try_from(args);
        }
        Command::Symbols(_) | Command::Presets(_) | Command::Report(_) => {}
    }
}

/// A duration the run can add to the clock without overflowing.
fn usable(d: Duration) {
    assert!(!d.is_zero(), "a zero duration passed validation");
    assert!(
        Instant::now().checked_add(d).is_some(),
        "{d:?} passed validation but overflows Instant"
    );
}
