//! The `symbols` command: the functions a user can pass to `--func`, from
//! the executable and (with `--pid`) every library the process maps.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    cli::SymbolsArgs,
    symbols::{Pattern, SymbolTable},
    target::{Binary, Process},
};

#[derive(Serialize)]
struct Row<'a> {
    name: &'a str,
    raw: &'a str,
    address: String,
    size: u64,
    file: String,
}

/// Lists the functions, sorted by name, with a count at the end.
pub fn run(args: &SymbolsArgs) -> anyhow::Result<()> {
    if let (Some(runtime), Some(pid)) = (&args.runtime, args.pid) {
        return run_runtime(args, runtime, pid);
    }
    // (path to read, path as the process sees it, root for debug files)
    let files: Vec<(PathBuf, PathBuf, PathBuf)> = match (args.pid, &args.binary) {
        (Some(pid), _) => {
            let p = Process::from_pid(pid)?;
            p.mapped_files()
                .into_iter()
                .map(|f| (f.open, f.name, p.root.clone()))
                .collect()
        }
        (None, Some(path)) => {
            let b = Binary::open(path)?;
            vec![(b.path.clone(), b.path, PathBuf::from("/"))]
        }
        (None, None) => unreachable!("clap requires --pid or --binary"),
    };
    let mut tables = Vec::new();
    for (i, (read, shown, root)) in files.iter().enumerate() {
        match SymbolTable::read(read, shown, root) {
            Ok(table) => tables.push(table),
            // The executable must parse; a library that does not is skipped.
            Err(e) if i == 0 => return Err(e.into()),
            Err(e) => log::debug!("skipping {}: {e}", shown.display()),
        }
    }
    // No pattern to check: only whether there is anything to list.
    let all: Vec<&SymbolTable> = tables.iter().collect();
    crate::symbols::check_matches(&all, &[], "")?;
    let pattern = args.pattern.as_deref().map(Pattern::new).transpose()?;
    let mut rows: Vec<Row> = tables
        .iter()
        .flat_map(|t| t.symbols.iter().map(move |s| (t.path.as_path(), s)))
        .filter(|(_, s)| pattern.as_ref().is_none_or(|p| p.selects(s)))
        .map(|(file, s): (&Path, _)| Row {
            name: &s.name,
            raw: s.raw(),
            address: format!("{:#x}", s.address),
            size: s.size,
            file: file.display().to_string(),
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(b.name).then(a.file.cmp(&b.file)));

    let written = print(&rows, args.json);
    match written {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// `symbols --pid P --runtime rb`: attaches the runtime's USDT probe,
/// wanting no name, for `--listen`, and lists every name the kernel saw
/// called (each reported once), sorted.
fn run_runtime(args: &SymbolsArgs, runtime: &str, pid: u32) -> anyhow::Result<()> {
    let runtime = crate::usdt::Runtime::ALL
        .into_iter()
        .find(|r| r.prefix() == runtime)
        .expect("clap checked the runtime");
    crate::privileges::require_probes()?;
    let process = Process::from_pid(pid)?;
    let everything = crate::usdt::RuntimePattern {
        runtime,
        glob: Pattern::new("*")?,
        text: format!("{}:*", runtime.prefix()),
    };
    let mut planner = crate::plan::Planner::runtimes_only(vec![everything]);
    let requests = planner.requests(&crate::plan::FileTarget::of_process(&process), true, "")?;
    let mut probes = crate::probes::Probes::load(1024, 64, false, None, true)?;
    for request in &requests {
        probes.attach(request)?;
    }
    let pattern = args.pattern.as_deref().map(Pattern::new).transpose()?;
    let mut names = std::collections::BTreeSet::new();
    let mut seen = Vec::new();
    let until = std::time::Instant::now() + args.listen;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        probes.take_seen(&mut seen);
        for (hash, text) in &seen {
            if let Some((runtime, display)) = crate::usdt::seen_name(text) {
                names.insert(format!("{}:{display}", runtime.prefix()));
            }
            // Reported once: never again this run.
            let _ = probes.want(*hash, None);
        }
        if std::time::Instant::now() >= until {
            break;
        }
    }
    probes.detach();
    let names: Vec<String> = names
        .into_iter()
        .filter(|n| {
            let bare = n.split_once(':').map_or(n.as_str(), |(_, b)| b);
            pattern.as_ref().is_none_or(|p| p.matches(bare))
        })
        .collect();
    let written = (|| -> io::Result<()> {
        let mut out = io::BufWriter::new(io::stdout().lock());
        for name in &names {
            if args.json {
                serde_json::to_writer(&mut out, &serde_json::json!({ "name": name }))?;
                writeln!(out)?;
            } else {
                writeln!(out, "{name}")?;
            }
        }
        if !args.json {
            writeln!(
                out,
                "{} {} function(s) seen called in {}",
                names.len(),
                runtime.label(),
                humantime::format_duration(args.listen)
            )?;
        }
        out.flush()
    })();
    match written {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn print(rows: &[Row], json: bool) -> io::Result<()> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    for row in rows {
        if json {
            serde_json::to_writer(&mut out, row)?;
            writeln!(out)?;
        } else if row.raw == row.name {
            writeln!(
                out,
                "{:>18} {:>8}  {}  {}",
                row.address, row.size, row.name, row.file
            )?;
        } else {
            writeln!(
                out,
                "{:>18} {:>8}  {}  {}  ({})",
                row.address, row.size, row.name, row.file, row.raw
            )?;
        }
    }
    if !json {
        writeln!(out, "{} function(s)", rows.len())?;
    }
    out.flush()
}
