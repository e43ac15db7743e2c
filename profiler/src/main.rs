//! The `cacheloop` binary: parse, dispatch, print an error once, pick the
//! exit code. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser as _;
use profiler::{
    cli::{Cli, Command},
    config::{ConfigError, ReplayConfig, WatchConfig},
    custody, gate, listing, presets,
    recording::RecordingError,
    replay,
    symbols::SymbolError,
    target::TargetError,
    watch::{self, Outcome},
};

/// Exit codes, as DESIGN.md promises them.
const EXIT_RUNTIME: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_LOOP: u8 = 3;

fn main() -> ExitCode {
    // SAFETY: registers fork handlers that take and give back the
    // allocator's lock (see heap.rs); called once, before any fork.
    unsafe { dlmalloc::enable_alloc_after_fork() };
    // The helper that holds the probe links (see custody.rs): started by
    // cacheloop itself, not a command anyone types.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == custody::SUBCOMMAND)
    {
        custody::serve();
        return ExitCode::SUCCESS;
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return clap_exit(&err),
    };
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_default_env()
        .format_timestamp(None)
        .init();

    let result = match cli.command {
        Command::Watch(args) => WatchConfig::try_from(*args)
            .map_err(anyhow::Error::from)
            .and_then(watch::run),
        Command::Replay(args) => ReplayConfig::try_from(args)
            .map_err(anyhow::Error::from)
            .and_then(replay::run),
        Command::Run(args) => gate::run(*args),
        Command::Report(args) => replay::report(&args.file, args.output.as_deref(), args.format)
            .map(|()| Outcome::Finished),
        Command::Symbols(args) => listing::run(&args).map(|()| Outcome::Finished),
        Command::Presets(args) => presets::describe(args.name.as_deref())
            .map(|text| print!("{text}"))
            .map(|()| Outcome::Finished)
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(Outcome::Finished) => ExitCode::SUCCESS,
        Ok(Outcome::LoopFound) => ExitCode::from(EXIT_LOOP),
        Ok(Outcome::Command(code)) => ExitCode::from(code),
        Err(err) => {
            eprintln!("cacheloop: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

/// Bad input is 2; anything that went wrong while running is 1. A refused
/// permission is the environment's doing (not root, a locked-down /proc),
/// whatever it was reading.
fn exit_code(err: &anyhow::Error) -> u8 {
    let denied = err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
    });
    if denied {
        return EXIT_RUNTIME;
    }
    let usage = err.chain().any(|e| {
        e.is::<ConfigError>()
            || e.is::<SymbolError>()
            || e.downcast_ref::<TargetError>()
                .is_some_and(TargetError::is_usage)
            || e.is::<RecordingError>()
    });
    if usage { EXIT_USAGE } else { EXIT_RUNTIME }
}

/// Help and version go to stdout with status 0; usage errors become one line
/// on stderr with status 2.
fn clap_exit(err: &clap::Error) -> ExitCode {
    if !err.use_stderr() {
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    let rendered = err.render().to_string();
    // clap's message runs until the first blank line (the usage follows);
    // fold it into one line.
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    eprintln!("cacheloop: {message}; see 'cacheloop --help'");
    ExitCode::from(EXIT_USAGE)
}

/// See heap.rs: dlmalloc keeps what an interval frees for the next one.
#[global_allocator]
static HEAP: profiler::heap::Heap = profiler::heap::Heap;
