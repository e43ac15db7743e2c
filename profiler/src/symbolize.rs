//! Names code addresses: an address in a process becomes `function (file)`,
//! through the process's mappings and the files' symbol tables.
//!
//! Live, [`Symbolizer`] reads `/proc/PID/maps` and symbol tables, caching
//! both (bounded): the enricher calls it off the control path. A recording
//! keeps the [`Frame`]s it produced, so `replay` names the same frames
//! without the processes.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    cycles,
    symbols::{Symbol, SymbolTable},
};

/// What an address was found to be.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// The function holding it, if a symbol covers it.
    pub function: Option<String>,
    /// The file mapped there (its name only), if any.
    pub file: Option<String>,
}

impl Frame {
    /// `function (file)`, or the address where no symbol covers it.
    pub fn describe(&self, ip: u64) -> String {
        match (&self.function, &self.file) {
            (Some(name), Some(file)) => format!("{name} ({file})"),
            (None, Some(file)) => format!("{ip:#x} ({file})"),
            _ => format!("{ip:#x} (unmapped)"),
        }
    }
}

/// Where a frame's address is looked up: the innermost frame at its own
/// address, the others (return addresses, the instruction after a call)
/// one byte earlier, inside the call.
pub fn lookup_address(ip: u64, innermost: bool) -> u64 {
    if innermost { ip } else { ip.saturating_sub(1) }
}

/// Symbol tables kept at most; past this the cache starts over.
const TABLES: usize = 64;
/// Processes whose mappings are kept at most.
const PROCESSES: usize = 256;

/// Functions' code in a file, sorted by start for binary search: file
/// offsets to function names.
pub struct CodeIndex {
    /// (start, end, name).
    ranges: Vec<(u64, u64, Arc<str>)>,
}

impl CodeIndex {
    /// The index of `symbols` (those with a size).
    pub fn new<'a>(symbols: impl IntoIterator<Item = &'a Symbol>) -> Self {
        let mut ranges: Vec<(u64, u64, Arc<str>)> = symbols
            .into_iter()
            .filter(|s| s.size > 0)
            .map(|s| (s.file_offset, s.file_offset + s.size, s.name.clone()))
            .collect();
        ranges.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        Self { ranges }
    }

    /// The function whose code holds file offset `offset`.
    pub fn function_at(&self, offset: u64) -> Option<&str> {
        let after = self.ranges.partition_point(|r| r.0 <= offset);
        // The nearest starts at or before the offset; a few may overlap
        // (aliases), so look back a little.
        self.ranges[..after]
            .iter()
            .rev()
            .take(8)
            .find(|r| offset < r.1)
            .map(|r| &*r.2)
    }
}

#[derive(Default)]
pub struct Symbolizer {
    maps: HashMap<u32, Vec<cycles::Mapping>>,
    /// (pid, path) -> the file's identity (device, inode), so that a
    /// library mapped by many processes is read once.
    files: HashMap<(u32, PathBuf), Option<(u64, u64)>>,
    tables: HashMap<(u64, u64), Option<CodeIndex>>,
}

impl Symbolizer {
    /// Names the code at `address` in process `pid`.
    pub fn frame(&mut self, pid: u32, address: u64) -> Frame {
        let mut map = self.mapping(pid, address, false);
        if map.is_none() {
            // Mapped since we last looked (a library loaded late)?
            map = self.mapping(pid, address, true);
        }
        let Some(map) = map else {
            return Frame::default();
        };
        let offset = address - map.start + map.offset;
        let file = file_label(&map.path);
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        // The very file mapped, even if a deploy replaced the path since.
        let open = crate::target::mapped_file_path(pid, map.start, map.end, &map.path, map.inode)
            .unwrap_or_default();
        if self.files.len() >= PROCESSES * 8 {
            self.files.clear();
        }
        let id = *self
            .files
            .entry((pid, map.path.clone()))
            .or_insert_with(|| {
                use std::os::unix::fs::MetadataExt as _;
                std::fs::metadata(&open).ok().map(|m| (m.dev(), m.ino()))
            });
        let Some(id) = id else {
            return Frame {
                function: None,
                file: Some(file),
            };
        };
        if !self.tables.contains_key(&id) && self.tables.len() >= TABLES {
            // One out, not all: the others are still in use.
            if let Some(&old) = self.tables.keys().next() {
                self.tables.remove(&old);
            }
        }
        let table = self.tables.entry(id).or_insert_with(|| {
            SymbolTable::read(&open, &map.path, &root)
                .ok()
                .map(|t| CodeIndex::new(&t.symbols))
        });
        Frame {
            function: table
                .as_ref()
                .and_then(|t| t.function_at(offset))
                .map(str::to_owned),
            file: Some(file),
        }
    }

    fn mapping(&mut self, pid: u32, address: u64, reread: bool) -> Option<cycles::Mapping> {
        if reread || !self.maps.contains_key(&pid) {
            if self.maps.len() >= PROCESSES {
                self.maps.clear();
            }
            let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            self.maps.insert(pid, cycles::parse_maps(&text));
        }
        self.maps
            .get(&pid)?
            .iter()
            .find(|m| (m.start..m.end).contains(&address))
            .cloned()
    }

    /// Forgets what was cached for a process that exited (symbol tables
    /// stay: other processes may map the same files).
    pub fn forget(&mut self, pid: u32) {
        self.maps.remove(&pid);
        self.files.retain(|(p, _), _| *p != pid);
    }
}

/// The name of a file for frames: its last component.
pub fn file_label(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    )
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
        let mut s = Symbolizer::default();
        let ip = where_am_i() + 1;
        let text = s.frame(std::process::id(), ip).describe(ip);
        assert!(text.contains("where_am_i"), "{text}");
        let own = std::env::current_exe().unwrap();
        assert!(text.ends_with(&format!("({})", file_label(&own))), "{text}");
    }

    #[test]
    fn unmapped_address_says_so() {
        let mut s = Symbolizer::default();
        assert_eq!(s.frame(std::process::id(), 8).describe(8), "0x8 (unmapped)");
    }

    #[test]
    fn return_addresses_are_looked_up_inside_the_call() {
        assert_eq!(lookup_address(0x1000, true), 0x1000);
        assert_eq!(lookup_address(0x1000, false), 0xfff);
    }
}
