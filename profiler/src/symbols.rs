//! Finds the functions to probe: ELF symbol tables in, attachable functions out.
//!
//! Reads `.symtab` and `.dynsym` through the `object` crate and turns each
//! function symbol's virtual address into the file offset the kernel wants
//! for a uprobe. Selects functions with glob patterns (`globset`).
//!
//! Pure: [`SymbolTable::parse`] works on bytes; only [`SymbolTable::read`]
//! touches the file system. Nothing here talks to the kernel.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use globset::{Glob, GlobMatcher};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};

/// Errors from reading symbols or matching patterns.
#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not an ELF object.
    #[error("{} is not an ELF executable or library ({reason})", path.display())]
    NotElf { path: PathBuf, reason: String },
    /// The file has no function symbols at all.
    #[error(
        "{} has no function symbols (stripped?); install its debug symbols or watch an unstripped build",
        path.display()
    )]
    NoSymbols { path: PathBuf },
    /// A `--func` pattern is not a valid glob.
    #[error("invalid --func pattern '{pattern}': {reason}")]
    BadPattern { pattern: String, reason: String },
    /// A `--func` pattern matched no function.
    #[error(
        "--func '{pattern}' matches no function in {}; list them with 'cacheloop symbols --binary {}'",
        path.display(), path.display()
    )]
    NoMatch { pattern: String, path: PathBuf },
}

/// A function that can carry a uprobe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// The name as the symbol table spells it.
    pub name: String,
    /// Virtual address in the file (`st_value`).
    pub address: u64,
    /// Size in bytes (`st_size`); 0 when the table does not say.
    pub size: u64,
    /// Offset of the function's first byte in the file: where uprobes go.
    pub file_offset: u64,
}

/// The functions of one ELF file, sorted by name.
#[derive(Clone, Debug)]
pub struct SymbolTable {
    pub path: PathBuf,
    pub symbols: Vec<Symbol>,
}

impl SymbolTable {
    /// Reads and parses the ELF file at `path`, naming it `shown` in
    /// messages and results (`/proc/PID/exe` is read, but users know the
    /// file by the name the process ran it as).
    pub fn read(path: &Path, shown: &Path) -> Result<Self, SymbolError> {
        let data = fs::read(path).map_err(|source| SymbolError::Read {
            path: shown.to_owned(),
            source,
        })?;
        Self::parse(shown, &data)
    }

    /// Parses ELF bytes; `path` is only used in messages and results.
    pub fn parse(path: &Path, data: &[u8]) -> Result<Self, SymbolError> {
        let file = object::File::parse(data).map_err(|e| SymbolError::NotElf {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        if !matches!(file.format(), object::BinaryFormat::Elf) {
            return Err(SymbolError::NotElf {
                path: path.to_owned(),
                reason: format!("{:?} format", file.format()),
            });
        }

        // .symtab first, then .dynsym: the same function usually appears in
        // both; keep one entry per (name, address).
        let mut seen = HashMap::new();
        let mut symbols = Vec::new();
        for sym in file.symbols().chain(file.dynamic_symbols()) {
            if sym.kind() != SymbolKind::Text || !sym.is_definition() {
                continue;
            }
            let Ok(name) = sym.name() else { continue };
            if name.is_empty() {
                continue;
            }
            let Some(section) = sym
                .section_index()
                .and_then(|i| file.section_by_index(i).ok())
            else {
                continue;
            };
            let Some((section_offset, _)) = section.file_range() else {
                continue;
            };
            let Some(file_offset) = sym
                .address()
                .checked_sub(section.address())
                .and_then(|delta| delta.checked_add(section_offset))
            else {
                continue;
            };
            if seen.insert((name.to_owned(), sym.address()), ()).is_some() {
                continue;
            }
            symbols.push(Symbol {
                name: name.to_owned(),
                address: sym.address(),
                size: sym.size(),
                file_offset,
            });
        }
        symbols.sort_by(|a, b| a.name.cmp(&b.name).then(a.address.cmp(&b.address)));
        Ok(Self {
            path: path.to_owned(),
            symbols,
        })
    }

    /// The functions matching any of `patterns`, one per file offset (aliases
    /// of one function are probed once), in table order. Each pattern must
    /// match at least one function.
    pub fn select(&self, patterns: &[Pattern]) -> Result<Vec<&Symbol>, SymbolError> {
        if self.symbols.is_empty() {
            return Err(SymbolError::NoSymbols {
                path: self.path.clone(),
            });
        }
        let mut offsets = HashMap::new();
        let mut selected = Vec::new();
        for pattern in patterns {
            let mut matched = false;
            for sym in self.symbols.iter().filter(|s| pattern.matches(&s.name)) {
                matched = true;
                if offsets.insert(sym.file_offset, ()).is_none() {
                    selected.push(sym);
                }
            }
            if !matched {
                return Err(SymbolError::NoMatch {
                    pattern: pattern.text.clone(),
                    path: self.path.clone(),
                });
            }
        }
        Ok(selected)
    }
}

/// A `--func` glob: `*`, `?` and `[...]`, matched against the whole name.
#[derive(Clone, Debug)]
pub struct Pattern {
    text: String,
    matcher: GlobMatcher,
}

impl Pattern {
    pub fn new(text: &str) -> Result<Self, SymbolError> {
        let matcher = Glob::new(text)
            .map_err(|e| SymbolError::BadPattern {
                pattern: text.to_owned(),
                reason: e.kind().to_string(),
            })?
            .compile_matcher();
        Ok(Self {
            text: text.to_owned(),
            matcher,
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.matcher.is_match(name)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(names: &[(&str, u64)]) -> SymbolTable {
        SymbolTable {
            path: PathBuf::from("/srv/cache"),
            symbols: names
                .iter()
                .map(|&(name, address)| Symbol {
                    name: name.to_owned(),
                    address,
                    size: 16,
                    file_offset: address - 0x1000,
                })
                .collect(),
        }
    }

    fn names(selected: &[&Symbol]) -> Vec<String> {
        selected.iter().map(|s| s.name.clone()).collect()
    }

    fn patterns(texts: &[&str]) -> Vec<Pattern> {
        texts.iter().map(|t| Pattern::new(t).unwrap()).collect()
    }

    #[test]
    fn globs_select_matching_functions() {
        let t = table(&[
            ("cache_get", 0x2000),
            ("cache_invalidate", 0x2100),
            ("cache_invalidate_all", 0x2200),
            ("main", 0x2300),
        ]);
        let got = t.select(&patterns(&["cache_inv*"])).unwrap();
        assert_eq!(names(&got), ["cache_invalidate", "cache_invalidate_all"]);
        let got = t.select(&patterns(&["cache_[gm]et", "ma?n"])).unwrap();
        assert_eq!(names(&got), ["cache_get", "main"]);
    }

    #[test]
    fn glob_matches_the_whole_name() {
        let t = table(&[("cache_invalidate", 0x2000), ("x_cache_invalidate", 0x2100)]);
        let got = t.select(&patterns(&["cache_invalidate"])).unwrap();
        assert_eq!(names(&got), ["cache_invalidate"]);
    }

    #[test]
    fn aliases_and_overlapping_patterns_probe_once() {
        let t = table(&[
            ("evict", 0x2000),
            ("evict_alias", 0x2000),
            ("evict_all", 0x2100),
        ]);
        let got = t.select(&patterns(&["evict*", "evict_all"])).unwrap();
        assert_eq!(names(&got), ["evict", "evict_all"]);
    }

    #[test]
    fn pattern_matching_nothing_names_itself_and_the_way_out() {
        let t = table(&[("cache_get", 0x2000)]);
        let err = t.select(&patterns(&["cache_get", "nope*"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("'nope*'"), "{msg}");
        assert!(msg.contains("cacheloop symbols"), "{msg}");
    }

    #[test]
    fn bad_glob_is_rejected() {
        let err = Pattern::new("cache_[inv").unwrap_err();
        assert!(err.to_string().contains("cache_[inv"), "{err}");
    }

    #[test]
    fn stripped_file_says_so() {
        let t = table(&[]);
        let err = t.select(&patterns(&["*"])).unwrap_err();
        assert!(err.to_string().contains("no function symbols"), "{err}");
    }

    #[test]
    fn non_elf_bytes_are_rejected() {
        let err = SymbolTable::parse(Path::new("notes.txt"), b"just text").unwrap_err();
        assert!(matches!(err, SymbolError::NotElf { .. }), "{err}");
    }

    #[test]
    fn own_executable_offsets_point_at_the_function_bytes() {
        // This test binary is a real ELF file: the offset of a function must
        // hold the same bytes as the function in memory.
        #[unsafe(no_mangle)]
        #[inline(never)]
        extern "C" fn cacheloop_symbols_selftest(x: u64) -> u64 {
            std::hint::black_box(x.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        }
        let exe = std::env::current_exe().unwrap();
        let data = fs::read(&exe).unwrap();
        let t = SymbolTable::parse(&exe, &data).unwrap();
        let got = t
            .select(&patterns(&["cacheloop_symbols_selftest"]))
            .unwrap();
        let sym = got[0];
        let in_file = &data[sym.file_offset as usize..][..16];
        let func = cacheloop_symbols_selftest as *const u8;
        // SAFETY: the function is at least 16 bytes of code, mapped readable.
        let in_memory = unsafe { std::slice::from_raw_parts(func, 16) };
        assert_eq!(in_file, in_memory);
        assert_eq!(cacheloop_symbols_selftest(1), 0x9E37_79B9_7F4A_7C15);
    }
}
