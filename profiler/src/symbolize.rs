//! Names the frames of a user stack: instruction pointers in a process
//! become `function (file)`, through its mappings and the files' symbol
//! tables. Used once per verdict, never per sample.

use std::collections::HashMap;

use crate::{cycles, symbols::SymbolTable};

/// Symbolizes the frames of one process's stack, innermost first. Frames
/// after the first are return addresses (the instruction after a call), so
/// they are looked up one byte earlier, inside the call.
pub fn stack(pid: u32, ips: &[u64]) -> Vec<String> {
    let maps = cycles::parse_maps(
        &std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default(),
    );
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let mut tables: HashMap<std::path::PathBuf, Option<SymbolTable>> = HashMap::new();
    ips.iter()
        .enumerate()
        .map(|(i, &ip)| {
            let lookup = if i == 0 { ip } else { ip.saturating_sub(1) };
            let Some(map) = maps.iter().find(|m| (m.start..m.end).contains(&lookup)) else {
                return format!("{ip:#x} (unmapped)");
            };
            let offset = lookup - map.start + map.offset;
            let table = tables.entry(map.path.clone()).or_insert_with(|| {
                let open = root.join(map.path.strip_prefix("/").unwrap_or(&map.path));
                SymbolTable::read(&open, &map.path, &root).ok()
            });
            let file = map.path.file_name().map_or_else(
                || map.path.display().to_string(),
                |f| f.to_string_lossy().into_owned(),
            );
            match table.as_ref().and_then(|t| function_at(t, offset)) {
                Some(name) => format!("{name} ({file})"),
                None => format!("{ip:#x} ({file})"),
            }
        })
        .collect()
}

/// The function whose code holds file offset `offset`.
fn function_at(table: &SymbolTable, offset: u64) -> Option<&str> {
    table
        .symbols
        .iter()
        .filter(|s| s.size > 0 && (s.file_offset..s.file_offset + s.size).contains(&offset))
        .map(|s| s.name.as_str())
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn where_am_i() -> u64 {
        // The address of this function's own code.
        where_am_i as *const () as u64
    }

    #[test]
    fn own_function_is_named() {
        let frames = stack(std::process::id(), &[where_am_i() + 1]);
        assert!(frames[0].contains("where_am_i"), "{frames:?}");
        let own = std::env::current_exe().unwrap();
        let name = own.file_name().unwrap().to_string_lossy().into_owned();
        assert!(frames[0].ends_with(&format!("({name})")), "{frames:?}");
    }

    #[test]
    fn unmapped_address_says_so() {
        assert_eq!(stack(std::process::id(), &[8])[0], "0x8 (unmapped)");
    }
}
