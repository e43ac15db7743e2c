//! Finds the functions to probe: ELF symbol tables in, attachable functions out.
//!
//! Reads `.symtab` and `.dynsym` through the `object` crate, plus those of a
//! separate debug file when one is installed (found by build-id or
//! `.gnu_debuglink`, and checked to belong to the binary). Names are
//! demangled (C++, Rust legacy and v0). Each function's virtual address is
//! turned into the file offset the kernel wants for a uprobe, through the
//! binary's executable `PT_LOAD` segments; a symbol outside them is never
//! offered, so a probe can only land on code.
//!
//! Compiler clones: `foo.isra.0`, `foo.constprop.1`, `foo.lto_priv.0` are
//! copies of `foo` that callers call instead of it; they are counted as
//! `foo`. `foo.part.0` and `foo.cold` are fragments whose entry is
//! elsewhere; they are only probed when a pattern names them with the dot.
//!
//! Pure: [`SymbolTable::parse`] works on bytes. [`SymbolTable::read`] and
//! [`debug_file_candidates`] look at the file system; nothing here talks to
//! the kernel.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use globset::{Glob, GlobMatcher};
use object::{Object as _, ObjectSegment as _, ReadRef, SegmentFlags, SymbolKind, elf::PF_X};

/// Errors from reading symbols or matching patterns.
#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Refused for want of a capability.
    #[error(transparent)]
    Capability(#[from] crate::privileges::MissingCapability),
    /// The file is not an ELF object.
    #[error("{} is not an ELF executable or library ({reason})", path.display())]
    NotElf { path: PathBuf, reason: String },
    /// The file has no function symbols at all.
    #[error(
        "{} has no function symbols (stripped?); install its debug symbols (the -dbgsym package) or watch an unstripped build",
        path.display()
    )]
    NoSymbols { path: PathBuf },
    /// A `--func` pattern is not a valid glob.
    #[error("invalid --func pattern '{pattern}': {reason}")]
    BadPattern { pattern: String, reason: String },
    /// A `py:`/`rb:`/`php:` pattern's runtime, with its probes, is not in
    /// the process.
    #[error(
        "--func '{pattern}': pid {pid} runs no {runtime} with USDT probes (it needs {needs}); list what it runs with 'cacheloop symbols --pid {pid}'"
    )]
    NoRuntime {
        pattern: String,
        pid: u32,
        runtime: &'static str,
        needs: &'static str,
    },
    /// A `--func` pattern matched no function.
    #[error(
        "--func '{pattern}' matches no function in {where_}; list them with 'cacheloop symbols {hint}'"
    )]
    NoMatch {
        pattern: String,
        where_: String,
        hint: String,
    },
}

impl SymbolError {
    /// Reading `path` failed: named as the missing capability when that is
    /// why.
    pub fn unreadable(path: &Path, source: std::io::Error) -> Self {
        match crate::privileges::explain_file(format!("cannot read {}", path.display()), source) {
            Ok(source) => Self::Read {
                path: path.to_owned(),
                source,
            },
            Err(missing) => missing.into(),
        }
    }
}

/// A function that can carry a uprobe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// The name people know: demangled, clone suffix removed. Shared with
    /// the catalog and the attach record (10,000 functions: one copy).
    pub name: Arc<str>,
    /// The name as the symbol table spells it, when not `name` (most C
    /// names are): 10,000 symbols are held while their file is probed.
    raw: Option<Box<str>>,
    /// Virtual address in the file (`st_value`).
    pub address: u64,
    /// Size in bytes (`st_size`); 0 when the table does not say.
    pub size: u64,
    /// Offset of the function's first byte in the file: where uprobes go.
    pub file_offset: u64,
    /// A `.part`/`.cold` fragment, not a function entry.
    pub fragment: bool,
    /// The C++ name without its parameter list, for matching
    /// `Cache::invalidate` against `Cache::invalidate(std::string const&)`.
    short: Option<Box<str>>,
}

impl Symbol {
    /// `raw` as the symbol table spells it; its `name`, demangled.
    fn new(raw: &str, names: Names, address: u64, size: u64, file_offset: u64) -> Self {
        Self {
            raw: (raw != names.full).then(|| raw.into()),
            name: names.full.into(),
            address,
            size,
            file_offset,
            fragment: names.fragment,
            short: names.short.map(String::into_boxed_str),
        }
    }

    /// The name as the symbol table spells it.
    pub fn raw(&self) -> &str {
        self.raw.as_deref().unwrap_or(&self.name)
    }

    /// A function `name` (already demangled) of `size` bytes at file
    /// offset `offset` and the same virtual address: for tests of code that
    /// reads symbol tables.
    pub fn at(name: &str, offset: u64, size: u64) -> Self {
        Self {
            name: name.into(),
            raw: None,
            address: offset,
            size,
            file_offset: offset,
            fragment: false,
            short: None,
        }
    }
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
    /// file by the name the process ran it as). Debug files are looked for
    /// under `root` (`/`, or `/proc/PID/root` for a process in a container).
    ///
    /// The parts parsing needs are read whole ([`read_symbol_parts`]), not
    /// through object's `ReadCache`: that one reads each symbol name with
    /// its own read and lseek (23,000 system calls for a 10,000-symbol
    /// file), which took seconds under TCG emulation in the VM tests. Read,
    /// not mapped: a file truncated in place by a deploy must fail a read,
    /// not kill cacheloop with SIGBUS.
    pub fn read(path: &Path, shown: &Path, root: &Path) -> Result<Self, SymbolError> {
        let data = read_symbol_parts(path).map_err(|e| SymbolError::unreadable(shown, e))?;
        let debug = debug_file_candidates(shown, &data[..])
            .into_iter()
            .find_map(|candidate| {
                let in_root = root.join(candidate.strip_prefix("/").unwrap_or(&candidate));
                // Whole: without a build id, the debug link's CRC is
                // over every byte of it.
                let bytes = fs::read(&in_root).ok()?;
                debug_file_matches(&data[..], &bytes).then_some(bytes)
            });
        Self::parse(shown, &data[..], debug.as_deref())
    }

    /// Parses an ELF file (its bytes, or a cache that reads them on
    /// demand), and its debug file's bytes if given; `path` is only used in
    /// messages and results.
    pub fn parse<'data, R: ReadRef<'data>>(
        path: &Path,
        data: R,
        debug: Option<&'data [u8]>,
    ) -> Result<Self, SymbolError> {
        let not_elf = |reason: String| SymbolError::NotElf {
            path: path.to_owned(),
            reason,
        };
        let file = object::File::parse(data).map_err(|e| not_elf(e.to_string()))?;
        if !matches!(file.format(), object::BinaryFormat::Elf) {
            return Err(not_elf(format!("{:?} format", file.format())));
        }
        // Executable PT_LOAD segments: (vaddr, size, file offset).
        let code: Vec<(u64, u64, u64)> = file
            .segments()
            .filter(|seg| {
                matches!(seg.flags(), SegmentFlags::Elf { p_flags, .. } if p_flags.contains(PF_X))
            })
            .map(|seg| (seg.address(), seg.size(), seg.file_range().0))
            .collect();
        let debug_file = debug.and_then(|d| object::File::parse(d).ok());

        let mut seen = HashMap::new();
        let mut symbols = Vec::new();
        // The defined functions: (name, address, size). The main file's and
        // the debug file's symbols are of different types (one read through
        // a cache, one from bytes), so each is reduced to that first.
        fn functions<'a, S: object::ObjectSymbol<'a>>(
            symbols: impl Iterator<Item = S>,
        ) -> impl Iterator<Item = (&'a str, u64, u64)> {
            symbols
                .filter(|sym| sym.kind() == SymbolKind::Text && sym.is_definition())
                .filter_map(|sym| Some((sym.name().ok()?, sym.address(), sym.size())))
        }
        let all = functions(file.symbols())
            .chain(functions(file.dynamic_symbols()))
            .chain(debug_file.iter().flat_map(|d| functions(d.symbols())));
        for (raw, address, size) in all {
            if raw.is_empty() || seen.insert((raw, address), ()).is_some() {
                continue;
            }
            let Some(file_offset) = code.iter().find_map(|&(vaddr, size, offset)| {
                let delta = address.checked_sub(vaddr)?;
                (delta < size).then_some(offset + delta)
            }) else {
                continue;
            };
            symbols.push(Symbol::new(raw, Names::of(raw), address, size, file_offset));
        }
        // (name, address, raw) triples are unique (deduplicated above): an
        // unstable sort gives one order, without a buffer as large as the
        // table.
        symbols.sort_unstable_by(|a, b| {
            (&a.name, a.address, a.raw()).cmp(&(&b.name, b.address, b.raw()))
        });
        // Held while the file is probed: not the doubling's spare room.
        symbols.shrink_to_fit();
        Ok(Self {
            path: path.to_owned(),
            symbols,
        })
    }

    /// The functions matching any of `patterns`, one per file offset (aliases
    /// of one function are probed once), in table order. Unlike
    /// [`select`](Self::select), a pattern that matches nothing here is not
    /// an error.
    pub fn matching<'a>(&'a self, patterns: &[Pattern]) -> Vec<&'a Symbol> {
        self.matching_at(patterns)
            .into_iter()
            .map(|i| &self.symbols[i])
            .collect()
    }

    /// [`matching`](Self::matching), as indices into `symbols`.
    pub fn matching_at(&self, patterns: &[Pattern]) -> Vec<usize> {
        let mut offsets = HashMap::new();
        let mut selected = Vec::new();
        for pattern in patterns {
            for (i, sym) in self.symbols.iter().enumerate() {
                if pattern.selects(sym) && offsets.insert(sym.file_offset, ()).is_none() {
                    selected.push(i);
                }
            }
        }
        selected
    }

    /// Like [`matching`](Self::matching), but each pattern must match at
    /// least one function in this file ([`check_matches`]).
    pub fn select(&self, patterns: &[Pattern]) -> Result<Vec<&Symbol>, SymbolError> {
        let hint = format!("--binary {}", self.path.display());
        check_matches(&[self], patterns, &hint)?;
        Ok(self.matching(patterns))
    }
}

/// Checks that each pattern picks some function in `tables`: an executable
/// first, then the libraries it maps that were searched. A file with no
/// function symbols at all says so (stripped); otherwise the first pattern
/// that matches nothing is named, with `hint` completing the `cacheloop
/// symbols` suggestion (`--pid 42`, `--binary PATH`).
pub fn check_matches(
    tables: &[&SymbolTable],
    patterns: &[Pattern],
    hint: &str,
) -> Result<(), SymbolError> {
    let Some(first) = tables.first() else {
        return Ok(());
    };
    if tables.iter().all(|t| t.symbols.is_empty()) {
        return Err(SymbolError::NoSymbols {
            path: first.path.clone(),
        });
    }
    let missing = patterns.iter().find(|p| {
        !tables
            .iter()
            .any(|t| t.symbols.iter().any(|s| p.selects(s)))
    });
    match missing {
        None => Ok(()),
        Some(pattern) => Err(SymbolError::NoMatch {
            pattern: pattern.text.clone(),
            where_: match tables.len() {
                1 => first.path.display().to_string(),
                n => format!(
                    "{} or the {} libraries it maps",
                    first.path.display(),
                    n - 1
                ),
            },
            hint: hint.to_owned(),
        }),
    }
}

/// `len` zero bytes, from the allocator's zeroed memory (fresh pages for a
/// large buffer: not written, so not resident until read into), or an
/// error if there is no room: `vec![0; len]` would abort the process.
fn zeroed(len: usize) -> std::io::Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(len)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::OutOfMemory, "file too large"))?;
    // SAFETY: the layout's size is not zero (checked above).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::OutOfMemory,
            format!("no memory for {len} bytes"),
        ));
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout
    // of `len` bytes of alignment 1, all of them initialized (zero); the
    // Vec takes it over with that length and capacity.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// An ELF file's bytes as far as reading its functions needs them: the
/// headers, symbol and string tables and notes (build id) and the debug
/// link, each read whole at its offset. The rest (code, data, unwind
/// tables, DWARF) stays zero, in a buffer allocated zeroed and never
/// written there, so it costs address space, not memory: a static 1.6 MiB
/// executable is 0.5 MiB of it. A file that is not a 64-bit ELF, or whose
/// headers do not add up, is read whole.
fn read_symbol_parts(path: &Path) -> std::io::Result<Vec<u8>> {
    use object::{
        Endianness,
        elf::{FileHeader64, SHT_DYNSYM, SHT_NOTE, SHT_STRTAB, SHT_SYMTAB},
        read::elf::{FileHeader as _, SectionHeader as _},
    };
    use std::os::unix::fs::FileExt as _;

    let file = fs::File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
    let mut data = zeroed(len)?;
    let read = |data: &mut [u8], at: u64, size: u64| -> std::io::Result<bool> {
        let (Ok(start), Ok(size)) = (usize::try_from(at), usize::try_from(size)) else {
            return Ok(false);
        };
        let Some(part) = start
            .checked_add(size)
            .and_then(|end| data.get_mut(start..end))
        else {
            return Ok(false);
        };
        file.read_exact_at(part, at)?;
        Ok(true)
    };
    let header_len = std::mem::size_of::<FileHeader64<Endianness>>() as u64;
    let parts = (|| -> std::io::Result<bool> {
        if !read(&mut data, 0, header_len.min(len as u64))? {
            return Ok(false);
        }
        let Ok(&header) = FileHeader64::<Endianness>::parse(&data[..]) else {
            return Ok(false);
        };
        let Ok(endian) = header.endian() else {
            return Ok(false);
        };
        let phs = u64::from(header.e_phnum(endian)) * u64::from(header.e_phentsize(endian));
        let shs = u64::from(header.e_shnum(endian)) * u64::from(header.e_shentsize(endian));
        // e_shnum 0 with sections: their count is elsewhere (over 65,279).
        if header.e_shnum(endian) == 0
            || !read(&mut data, header.e_phoff(endian), phs)?
            || !read(&mut data, header.e_shoff(endian), shs)?
        {
            return Ok(false);
        }
        // The section names first, to find the debug link by name.
        let names = header
            .section_headers(endian, &data[..])
            .ok()
            .zip(header.shstrndx(endian, &data[..]).ok())
            .and_then(|(headers, i)| headers.get(i as usize))
            .and_then(|s| s.file_range(endian));
        let Some((at, size)) = names else {
            return Ok(false);
        };
        if !read(&mut data, at, size)? {
            return Ok(false);
        }
        let Ok(sections) = header.sections(endian, &data[..]) else {
            return Ok(false);
        };
        let mut wanted = Vec::new();
        for section in sections.iter() {
            let kind = section.sh_type(endian);
            let name = sections.section_name(endian, section).unwrap_or_default();
            if matches!(kind, SHT_SYMTAB | SHT_DYNSYM | SHT_STRTAB | SHT_NOTE)
                || name == b".gnu_debuglink"
            {
                wanted.extend(section.file_range(endian));
            }
        }
        for (at, size) in wanted {
            if !read(&mut data, at, size)? {
                return Ok(false);
            }
        }
        Ok(true)
    })()?;
    if !parts {
        read(&mut data, 0, len as u64)?;
    }
    Ok(data)
}

/// The names of one raw symbol.
struct Names {
    full: String,
    short: Option<String>,
    fragment: bool,
}

impl Names {
    fn of(raw: &str) -> Self {
        // Rust, legacy (`_ZN...17h<hash>E`) and v0 (`_R...`); rustc-demangle
        // also drops LLVM's `.llvm.NNN` suffixes. `{:#}` leaves out the hash.
        if let Ok(demangled) = rustc_demangle::try_demangle(raw) {
            return Self {
                full: format!("{demangled:#}"),
                short: None,
                fragment: false,
            };
        }
        // GCC clone suffixes follow the first dot: C and Itanium C++ names
        // have none of their own.
        let (base, suffix) = raw.split_once('.').unwrap_or((raw, ""));
        let fragment = suffix
            .split('.')
            .any(|part| part == "part" || part == "cold");
        // Only `_Z` names are Itanium C++: a C name is not parsed at all.
        let cpp = base
            .starts_with("_Z")
            .then(|| cpp_demangle::Symbol::new(base).ok())
            .flatten();
        let (full, short) = match cpp {
            Some(sym) => {
                let full = sym.demangle().unwrap_or_else(|_| base.to_owned());
                let short = sym
                    .demangle_with_options(&cpp_demangle::DemangleOptions::new().no_params())
                    .ok()
                    .filter(|s| *s != full);
                (full, short)
            }
            _ => (base.to_owned(), None),
        };
        // A fragment keeps its suffix: it is not the function itself.
        let full = if fragment && !suffix.is_empty() {
            format!("{full}.{suffix}")
        } else {
            full
        };
        Self {
            full,
            short,
            fragment,
        }
    }
}

/// Where the separate debug file of an ELF file may be, best first: by
/// build-id under `/usr/lib/debug/.build-id`, then by `.gnu_debuglink` next
/// to the file, in its `.debug/`, and under `/usr/lib/debug`.
pub fn debug_file_candidates<'data, R: ReadRef<'data>>(path: &Path, data: R) -> Vec<PathBuf> {
    let Ok(file) = object::File::parse(data) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Ok(Some(id)) = file.build_id()
        && id.len() > 1
    {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        out.push(PathBuf::from(format!(
            "/usr/lib/debug/.build-id/{}/{}.debug",
            &hex[..2],
            &hex[2..]
        )));
    }
    if let Ok(Some((name, _crc))) = file.gnu_debuglink()
        && let Ok(name) = std::str::from_utf8(name)
    {
        let dir = path.parent().unwrap_or(Path::new("/"));
        out.push(dir.join(name));
        out.push(dir.join(".debug").join(name));
        out.push(
            Path::new("/usr/lib/debug")
                .join(dir.strip_prefix("/").unwrap_or(dir))
                .join(name),
        );
    }
    out
}

/// Whether `debug` is the debug file of `main`: same build-id, or, without
/// one, the CRC that `.gnu_debuglink` records. A wrong debug file would put
/// probes at wrong addresses, so anything else is refused.
pub fn debug_file_matches<'data, R: ReadRef<'data>>(main: R, debug: &[u8]) -> bool {
    let (Ok(main), Ok(debug_file)) = (object::File::parse(main), object::File::parse(debug)) else {
        return false;
    };
    match (main.build_id(), debug_file.build_id()) {
        (Ok(Some(a)), Ok(Some(b))) => return a == b,
        (Ok(Some(_)), _) => return false,
        _ => {}
    }
    match main.gnu_debuglink() {
        Ok(Some((_, crc))) => crc32fast::hash(debug) == crc,
        _ => false,
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

    /// Whether this pattern picks `sym`: its demangled name, its C++ name
    /// without parameters, or its raw name. Fragments only when the pattern
    /// names the fragment itself (it contains a dot).
    pub fn selects(&self, sym: &Symbol) -> bool {
        if sym.fragment {
            return self.text.contains('.') && (self.matches(&sym.name) || self.matches(sym.raw()));
        }
        self.matches(&sym.name)
            || sym.short.as_deref().is_some_and(|s| self.matches(s))
            || self.matches(sym.raw())
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
                .map(|&(raw, address)| {
                    Symbol::new(raw, Names::of(raw), address, 16, address - 0x1000)
                })
                .collect(),
        }
    }

    fn names(selected: &[&Symbol]) -> Vec<String> {
        selected.iter().map(|s| s.name.to_string()).collect()
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
    fn cpp_names_are_demangled_and_match_with_or_without_parameters() {
        let t = table(&[
            (
                "_ZN5cache5Store10invalidateERKNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE",
                0x2000,
            ),
            ("_ZN5cache5Store3getEi", 0x2100),
        ]);
        let invalidate = &t.symbols[0];
        assert_eq!(
            &*invalidate.name,
            "cache::Store::invalidate(std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> > const&)"
        );
        let got = t.select(&patterns(&["cache::Store::invalidate"])).unwrap();
        assert_eq!(got[0].raw(), invalidate.raw());
        let got = t.select(&patterns(&["cache::Store::get(int)"])).unwrap();
        assert_eq!(got.len(), 1);
        // The raw name works too, for people pasting from nm.
        assert_eq!(
            t.select(&patterns(&["_ZN5cache5Store3getEi"]))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn rust_legacy_and_v0_names_are_demangled_without_hash() {
        let legacy = Names::of("_ZN5cache5store10invalidate17h0123456789abcdefE");
        assert_eq!(legacy.full, "cache::store::invalidate");
        let v0 = Names::of("_RNvNtCs1234_5cache5store10invalidate");
        assert_eq!(v0.full, "cache::store::invalidate");
    }

    #[test]
    fn gcc_clones_count_as_their_function_and_fragments_are_left_out() {
        let t = table(&[
            ("evict", 0x2000),
            ("evict.isra.0", 0x2100),
            ("evict.constprop.0.isra.0", 0x2200),
            ("evict.part.0", 0x2300),
            ("evict.cold", 0x2400),
        ]);
        let got = t.select(&patterns(&["evict"])).unwrap();
        assert_eq!(names(&got), ["evict", "evict", "evict"]);
        // Named with the dot, a fragment can still be probed.
        let got = t.select(&patterns(&["evict.part.*"])).unwrap();
        assert_eq!(names(&got), ["evict.part.0"]);
    }

    #[test]
    fn pattern_matching_nothing_in_any_file_names_the_files() {
        let (exe, lib) = (table(&[("main", 0x2000)]), table(&[("free", 0x3000)]));
        let err = check_matches(&[&exe, &lib], &patterns(&["lib_fn"]), "--pid 42").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--func 'lib_fn' matches no function in /srv/cache or the 1 libraries it maps; list them with 'cacheloop symbols --pid 42'"
        );
        assert!(check_matches(&[&exe, &lib], &patterns(&["free"]), "--pid 42").is_ok());
    }

    #[test]
    fn files_without_any_symbols_say_they_are_stripped() {
        let (bare, also_bare) = (table(&[]), table(&[]));
        let err = check_matches(&[&bare, &also_bare], &patterns(&["f"]), "--pid 42").unwrap_err();
        assert!(matches!(err, SymbolError::NoSymbols { .. }), "{err}");
    }

    #[test]
    fn debug_file_must_belong_to_the_binary() {
        let exe = fs::read(std::env::current_exe().unwrap()).unwrap();
        // Our own build has a build-id: it matches itself only.
        assert!(debug_file_matches(&exe[..], &exe));
        let other = fs::read("/proc/self/exe").unwrap();
        assert!(debug_file_matches(&exe[..], &other));
        assert!(!debug_file_matches(&exe[..], b"not elf"));
        let candidates = debug_file_candidates(Path::new("/usr/bin/cache"), &exe[..]);
        assert!(
            candidates[0].starts_with("/usr/lib/debug/.build-id/"),
            "{candidates:?}"
        );
    }

    #[test]
    fn the_parts_read_give_the_whole_files_functions() {
        let path = std::env::current_exe().unwrap();
        let whole = fs::read(&path).unwrap();
        let parts = read_symbol_parts(&path).unwrap();
        assert_eq!(parts.len(), whole.len());
        // Code is not read.
        assert!(parts != whole);
        let shown = Path::new("/usr/bin/cache");
        let a = SymbolTable::parse(shown, &whole[..], None).unwrap();
        let b = SymbolTable::parse(shown, &parts[..], None).unwrap();
        assert!(a.symbols.len() > 100);
        assert_eq!(a.symbols, b.symbols);
        assert_eq!(
            debug_file_candidates(shown, &whole[..]),
            debug_file_candidates(shown, &parts[..])
        );
        assert!(debug_file_matches(&parts[..], &whole));
        // Not ELF: read whole.
        let text = std::env::temp_dir().join(format!("cacheloop-parts-{}", std::process::id()));
        fs::write(&text, b"just text").unwrap();
        assert_eq!(read_symbol_parts(&text).unwrap(), b"just text");
        fs::remove_file(&text).unwrap();
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
        let err = SymbolTable::parse(Path::new("notes.txt"), &b"just text"[..], None).unwrap_err();
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
        let t = SymbolTable::parse(&exe, &data[..], None).unwrap();
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
