//! ELF files and symbol names, as `symbols.rs` reads them.
//!
//! An input that starts with the ELF magic is a file: parsed on its own, and
//! with a debug file when the input holds a second ELF image (split there;
//! without one, the file stands for its own debug file), through the
//! debug-file helpers, then matched by a few fixed `--func` patterns and by
//! globs made from its own (fuzzed) names. Any other input is a list of
//! symbol names, one per NUL or newline, put into a minimal executable (one
//! code segment, one function symbol per name): the demanglers (C++, Rust
//! legacy and v0) and the clone-suffix rules see each name, which random
//! mutations of a whole ELF file would rarely reach.
//!
//! Nothing here may panic, whatever the bytes.

#![no_main]

use std::{path::Path, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use profiler::symbols::{
    Pattern, SymbolTable, check_matches, debug_file_candidates, debug_file_matches,
};

const ELF_MAGIC: &[u8] = b"\x7fELF";
/// Bounds on the work one input can ask for.
const MAX_NAMES: usize = 64;
const MAX_GLOBS: usize = 4;

fuzz_target!(|data: &[u8]| {
    if data.starts_with(ELF_MAGIC) {
        elf_file(data);
    } else {
        names(data);
    }
});

fn elf_file(data: &[u8]) {
    let (main, debug) = match find(&data[1..], ELF_MAGIC) {
        Some(at) => data.split_at(at + 1),
        None => (data, data),
    };
    let path = Path::new("/usr/lib/cacheloop-fuzz/libfuzzed.so");
    let _ = debug_file_candidates(path, main);
    let debug = debug_file_matches(main, debug).then_some(debug);
    if let Ok(table) = SymbolTable::parse(path, main, debug) {
        exercise(&table);
    }
    if debug.is_some()
        && let Ok(table) = SymbolTable::parse(path, data, None)
    {
        exercise(&table);
    }
}

fn names(data: &[u8]) {
    let names: Vec<&[u8]> = data
        .split(|&b| b == 0 || b == b'\n')
        .filter(|n| !n.is_empty())
        .take(MAX_NAMES)
        .collect();
    let elf = executable(&names);
    match SymbolTable::parse(Path::new("fuzzed"), &elf[..], None) {
        Ok(table) => {
            // At most one function per name that is text: nothing invented
            // (today each such name is one; parsing may leave some out).
            let texts = names
                .iter()
                .filter(|n| std::str::from_utf8(n).is_ok())
                .count();
            assert!(
                table.symbols.len() <= texts,
                "{} symbols from {texts} names",
                table.symbols.len()
            );
            exercise(&table);
        }
        Err(e) => panic!("the executable made for {names:?} does not parse: {e}"),
    }
}

/// Matching as `watch --func` and `symbols --match` do it.
fn exercise(table: &SymbolTable) {
    let fixed = fixed_patterns();
    let _ = table.matching(fixed);
    let _ = table.select(fixed);
    // The names are fuzzed: as globs, they are too (a few: each is a regex
    // to compile).
    let globs: Vec<Pattern> = table
        .symbols
        .iter()
        .flat_map(|s| [&*s.name, s.raw()])
        .take(MAX_GLOBS)
        .filter_map(|text| Pattern::new(text).ok())
        .collect();
    for glob in &globs {
        for sym in &table.symbols {
            let _ = glob.selects(sym);
            let _ = glob.matches(&sym.name);
        }
    }
    let _ = check_matches(&[table, table], &globs, "--binary fuzzed");
}

/// Patterns as users write them, compiled once.
fn fixed_patterns() -> &'static [Pattern] {
    static PATTERNS: OnceLock<Vec<Pattern>> = OnceLock::new();
    PATTERNS.get_or_init(|| {
        [
            "*",
            "cache_*",
            "*::invalidate",
            "cache::Store::invalidate",
            "foo.part.*",
            "[a-z]*",
        ]
        .into_iter()
        .map(|p| Pattern::new(p).expect("a valid glob"))
        .collect()
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A minimal x86-64 executable: one `PT_LOAD` segment (R+X) over the whole
/// file, a `.text` section with one byte per name, and a `.symtab` with one
/// global function symbol per name, at consecutive addresses.
fn executable(names: &[&[u8]]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const SHDR: usize = 64;
    const SYM: usize = 24;
    let text_at = EHDR + PHDR;
    let text_len = names.len().max(1);

    let mut strtab = vec![0u8];
    let mut name_at = Vec::with_capacity(names.len());
    for name in names {
        name_at.push(strtab.len() as u32);
        strtab.extend_from_slice(name);
        strtab.push(0);
    }
    let shstrtab = b"\0.text\0.symtab\0.strtab\0.shstrtab\0";
    let strtab_at = text_at + text_len;
    let shstrtab_at = strtab_at + strtab.len();
    let symtab_at = (shstrtab_at + shstrtab.len()).next_multiple_of(8);
    let symtab_len = (names.len() + 1) * SYM;
    let shdrs_at = symtab_at + symtab_len;
    let end = shdrs_at + 5 * SHDR;

    let mut out = Vec::with_capacity(end);
    // ELF header: 64-bit, little-endian, ET_EXEC, x86-64.
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    push16(&mut out, 2);
    push16(&mut out, 62);
    push32(&mut out, 1);
    push64(&mut out, text_at as u64); // e_entry
    push64(&mut out, EHDR as u64); // e_phoff
    push64(&mut out, shdrs_at as u64); // e_shoff
    push32(&mut out, 0); // e_flags
    push16(&mut out, EHDR as u16);
    push16(&mut out, PHDR as u16);
    push16(&mut out, 1); // e_phnum
    push16(&mut out, SHDR as u16);
    push16(&mut out, 5); // e_shnum
    push16(&mut out, 4); // e_shstrndx
    // PT_LOAD, PF_R | PF_X, the whole file at address 0.
    push32(&mut out, 1);
    push32(&mut out, 5);
    push64(&mut out, 0);
    push64(&mut out, 0);
    push64(&mut out, 0);
    push64(&mut out, end as u64);
    push64(&mut out, end as u64);
    push64(&mut out, 0x1000);
    // .text: `ret`s.
    out.resize(text_at + text_len, 0xc3);
    out.extend_from_slice(&strtab);
    out.extend_from_slice(shstrtab);
    out.resize(symtab_at, 0);
    // The null symbol, then STB_GLOBAL STT_FUNC in .text, one byte each.
    out.resize(symtab_at + SYM, 0);
    for (i, &name) in name_at.iter().enumerate() {
        push32(&mut out, name);
        out.push(0x12);
        out.push(0);
        push16(&mut out, 1);
        push64(&mut out, (text_at + i) as u64);
        push64(&mut out, 1);
    }
    // Section headers: null, .text, .symtab, .strtab, .shstrtab.
    out.resize(shdrs_at + SHDR, 0);
    let sections = [
        // name, type, flags, addr/offset, size, link, info, align, entsize
        (1, 1, 6, text_at, text_len, 0, 0, 16, 0),
        (7, 2, 0, symtab_at, symtab_len, 3, 1, 8, SYM),
        (15, 3, 0, strtab_at, strtab.len(), 0, 0, 1, 0),
        (23, 3, 0, shstrtab_at, shstrtab.len(), 0, 0, 1, 0),
    ];
    for (name, kind, flags, at, len, link, info, align, entsize) in sections {
        push32(&mut out, name);
        push32(&mut out, kind);
        push64(&mut out, flags);
        push64(&mut out, if flags == 0 { 0 } else { at as u64 });
        push64(&mut out, at as u64);
        push64(&mut out, len as u64);
        push32(&mut out, link);
        push32(&mut out, info);
        push64(&mut out, align);
        push64(&mut out, entsize as u64);
    }
    debug_assert_eq!(out.len(), end);
    out
}

fn push16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn push32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn push64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
