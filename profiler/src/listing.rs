//! The `symbols` command: the functions a user can pass to `--func`.

use std::io::{self, Write};

use serde::Serialize;

use crate::{
    cli::SymbolsArgs,
    symbols::{Pattern, SymbolTable},
    target::{Binary, Process},
};

#[derive(Serialize)]
struct Row<'a> {
    name: &'a str,
    address: String,
    size: u64,
    file: String,
}

/// Lists the functions, sorted by name, with a count at the end.
pub fn run(args: &SymbolsArgs) -> anyhow::Result<()> {
    let (read, shown) = match (args.pid, &args.binary) {
        (Some(pid), _) => {
            let p = Process::from_pid(pid)?;
            (p.exe, p.exe_name)
        }
        (None, Some(path)) => {
            let b = Binary::open(path)?;
            (b.path.clone(), b.path)
        }
        (None, None) => unreachable!("clap requires --pid or --binary"),
    };
    let table = SymbolTable::read(&read, &shown)?;
    let pattern = args.pattern.as_deref().map(Pattern::new).transpose()?;
    let file = shown.display().to_string();

    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut count = 0usize;
    let written = (|| -> io::Result<()> {
        for sym in &table.symbols {
            if pattern.as_ref().is_some_and(|p| !p.matches(&sym.name)) {
                continue;
            }
            count += 1;
            let row = Row {
                name: &sym.name,
                address: format!("{:#x}", sym.address),
                size: sym.size,
                file: file.clone(),
            };
            if args.json {
                serde_json::to_writer(&mut out, &row)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "{:>18} {:>8}  {}  {}",
                    row.address, row.size, row.name, row.file
                )?;
            }
        }
        if !args.json {
            writeln!(out, "{count} function(s)")?;
        }
        out.flush()
    })();
    match written {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
