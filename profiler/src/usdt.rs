//! Interpreted runtimes, through their USDT probes.
//!
//! A Python, Ruby or PHP cache's functions are not ELF symbols, but
//! Debian's interpreters carry USDT probes (`.note.stapsdt`) that fire on
//! every call with the function's name: `python:function__entry` (file,
//! function, line) in `python3.11`, `ruby:method__entry` (class, method,
//! file, line) in `libruby-3.1.so`, `php:function__entry` (function, file,
//! line, class, scope) in `php8.2`. Each is guarded by a semaphore the
//! runtime tests before it spends anything on the probe; the kernel
//! raises it while a uprobe with that `ref_ctr_offset` is attached (so
//! nothing writes the target's memory from here).
//!
//! A `py:GLOB`, `rb:GLOB` or `php:GLOB` pattern is matched against the
//! names these probes report, as cacheloop shows them: Python
//! `module.function` (the file's stem: `cache.invalidate`, `<module>` for a
//! module's top level), Ruby `Class#method`, PHP `Class::method` or
//! `function`.
//!
//! Pure: ELF bytes and texts in, probe descriptions and names out.

use std::path::Path;

use object::{Object as _, ObjectSection as _, ObjectSegment as _};
use profiler_common::{USDT_ARG_MEM, USDT_ARG_NONE, USDT_ARG_REG, UsdtArg, UsdtSpec};

use crate::symbols::Pattern;

/// An interpreted runtime cacheloop can count functions of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    Python,
    Ruby,
    Php,
}

impl Runtime {
    pub const ALL: [Self; 3] = [Self::Python, Self::Ruby, Self::Php];

    /// The number the kernel carries for it.
    pub fn id(self) -> u32 {
        match self {
            Self::Python => 1,
            Self::Ruby => 2,
            Self::Php => 3,
        }
    }

    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.id() == id)
    }

    /// The pattern prefix: `py`, `rb`, `php`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Python => "py",
            Self::Ruby => "rb",
            Self::Php => "php",
        }
    }

    /// The USDT provider and probe fired on each call.
    pub fn probe(self) -> (&'static str, &'static str) {
        match self {
            Self::Python => ("python", "function__entry"),
            Self::Ruby => ("ruby", "method__entry"),
            Self::Php => ("php", "function__entry"),
        }
    }

    /// Which of the probe's arguments are the qualifier (Python's file,
    /// Ruby's and PHP's class) and the function's name.
    fn name_args(self) -> (usize, usize) {
        match self {
            Self::Python => (0, 1),
            Self::Ruby => (0, 1),
            Self::Php => (3, 0),
        }
    }

    /// The name records show, from the probe's two texts.
    pub fn display(self, qualifier: &str, name: &str) -> String {
        match self {
            Self::Python => {
                let stem = Path::new(qualifier).file_stem().map_or_else(
                    || qualifier.to_owned(),
                    |s| s.to_string_lossy().into_owned(),
                );
                format!("{stem}.{name}")
            }
            Self::Ruby => format!("{qualifier}#{name}"),
            Self::Php if qualifier.is_empty() => name.to_owned(),
            Self::Php => format!("{qualifier}::{name}"),
        }
    }

    /// Its name in messages.
    pub fn label(self) -> &'static str {
        match self {
            Self::Python => "Python",
            Self::Ruby => "Ruby",
            Self::Php => "PHP",
        }
    }

    /// What the runtime needs to fire its probes, said when they cannot be
    /// found.
    pub fn needs(self) -> &'static str {
        match self {
            Self::Python => {
                "a CPython built with --with-dtrace (Debian's python3.11 is); Python 3.12's perf trampolines are not supported"
            }
            Self::Ruby => "a Ruby built with DTrace probes (Debian's libruby3.1 is)",
            Self::Php => {
                "a PHP built with DTrace probes (Debian's php8.2 is), started with USE_ZEND_DTRACE=1 in its environment"
            }
        }
    }
}

/// A `py:GLOB`, `rb:GLOB` or `php:GLOB` pattern, split.
pub fn runtime_pattern(text: &str) -> Option<(Runtime, &str)> {
    let (prefix, glob) = text.split_once(':')?;
    // `Cache::invalidate` (C++) is a symbol pattern, not a runtime's.
    if glob.starts_with(':') {
        return None;
    }
    Runtime::ALL
        .into_iter()
        .find(|r| r.prefix() == prefix)
        .map(|r| (r, glob))
}

/// A pattern over one runtime's names.
#[derive(Clone, Debug)]
pub struct RuntimePattern {
    pub runtime: Runtime,
    pub glob: Pattern,
    /// As the user wrote it (`py:cache.*`).
    pub text: String,
}

/// One USDT probe of an ELF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub provider: String,
    pub name: String,
    /// File offset of the probe's instruction: where the uprobe goes.
    pub offset: u64,
    /// File offset of its semaphore, if it has one.
    pub semaphore: Option<u64>,
    /// The argument specs, as written (`8@%rbp`).
    pub args: Vec<String>,
}

impl Probe {
    /// What the kernel program reads for `runtime`'s names at this probe;
    /// `None` if an argument is in a form it cannot read.
    pub fn spec(&self, runtime: Runtime) -> Option<UsdtSpec> {
        let (qualifier, name) = runtime.name_args();
        Some(UsdtSpec {
            qualifier: self
                .args
                .get(qualifier)
                .map_or(Some(UsdtArg::default()), |a| parse_arg(a))?,
            name: parse_arg(self.args.get(name)?)?,
            runtime: runtime.id(),
            _reserved: 0,
        })
    }
}

/// x86-64 registers by their place in the kernel's `pt_regs`, with the
/// names of their 32-, 16- and 8-bit parts.
const REGISTERS: &[(u32, &[&str])] = &[
    (0, &["r15", "r15d", "r15w", "r15b"]),
    (1, &["r14", "r14d", "r14w", "r14b"]),
    (2, &["r13", "r13d", "r13w", "r13b"]),
    (3, &["r12", "r12d", "r12w", "r12b"]),
    (4, &["rbp", "ebp", "bp", "bpl"]),
    (5, &["rbx", "ebx", "bx", "bl"]),
    (6, &["r11", "r11d", "r11w", "r11b"]),
    (7, &["r10", "r10d", "r10w", "r10b"]),
    (8, &["r9", "r9d", "r9w", "r9b"]),
    (9, &["r8", "r8d", "r8w", "r8b"]),
    (10, &["rax", "eax", "ax", "al"]),
    (11, &["rcx", "ecx", "cx", "cl"]),
    (12, &["rdx", "edx", "dx", "dl"]),
    (13, &["rsi", "esi", "si", "sil"]),
    (14, &["rdi", "edi", "di", "dil"]),
    (16, &["rip", "eip"]),
    (19, &["rsp", "esp", "sp", "spl"]),
];

fn register(name: &str) -> Option<u32> {
    REGISTERS
        .iter()
        .find(|(_, names)| names.contains(&name))
        .map(|(index, _)| *index)
}

/// Parses one x86-64 USDT argument spec: `SIZE@%reg` or `SIZE@DISP(%reg)`
/// (what GCC writes for the runtimes' pointers). An immediate or an
/// indexed address is refused (`None`): no runtime passes a name so.
pub fn parse_arg(spec: &str) -> Option<UsdtArg> {
    let (_size, operand) = spec.split_once('@')?;
    if let Some(reg) = operand.strip_prefix('%') {
        return Some(UsdtArg {
            kind: USDT_ARG_REG,
            reg: register(reg)?,
            disp: 0,
        });
    }
    let (disp, rest) = operand.split_once('(')?;
    let reg = rest.strip_suffix(')')?.strip_prefix('%')?;
    let disp = if disp.is_empty() {
        0
    } else {
        disp.parse().ok()?
    };
    Some(UsdtArg {
        kind: USDT_ARG_MEM,
        reg: register(reg)?,
        disp,
    })
}

/// Whether a spec reads nothing (an argument the probe does not have).
pub fn is_none(arg: &UsdtArg) -> bool {
    arg.kind == USDT_ARG_NONE
}

/// The USDT probes of an ELF file's bytes (none if it has no
/// `.note.stapsdt`). Addresses become file offsets through the `PT_LOAD`
/// segments, after the prelink adjustment (`.stapsdt.base`).
pub fn probes(data: &[u8]) -> Vec<Probe> {
    let Ok(file) = object::File::parse(data) else {
        return Vec::new();
    };
    let Some(notes) = file.section_by_name(".note.stapsdt") else {
        return Vec::new();
    };
    let Ok(bytes) = notes.data() else {
        return Vec::new();
    };
    let base = file.section_by_name(".stapsdt.base").map(|s| s.address());
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .map(|s| (s.address(), s.size(), s.file_range().0))
        .collect();
    let to_offset = |address: u64| {
        segments.iter().find_map(|&(vaddr, size, offset)| {
            let delta = address.checked_sub(vaddr)?;
            (delta < size).then_some(offset + delta)
        })
    };
    let mut found = Vec::new();
    let mut at = 0;
    let u32_at = |b: &[u8], i: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
    };
    let u64_at = |b: &[u8], i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
    };
    let align = |n: usize| (n + 3) & !3;
    while let (Some(namesz), Some(descsz), Some(kind)) = (
        u32_at(bytes, at),
        u32_at(bytes, at + 4),
        u32_at(bytes, at + 8),
    ) {
        let name_at = at + 12;
        let desc_at = name_at + align(namesz as usize);
        let next = desc_at + align(descsz as usize);
        let owner = bytes.get(name_at..name_at + namesz as usize);
        let desc = bytes.get(desc_at..desc_at + descsz as usize);
        at = next;
        let (Some(owner), Some(desc)) = (owner, desc) else {
            break;
        };
        if kind != 3 || owner != b"stapsdt\0" {
            continue;
        }
        let (Some(pc), Some(note_base), Some(semaphore)) =
            (u64_at(desc, 0), u64_at(desc, 8), u64_at(desc, 16))
        else {
            continue;
        };
        let mut texts = desc[24..].split(|&b| b == 0).map(String::from_utf8_lossy);
        let (Some(provider), Some(name), args) = (texts.next(), texts.next(), texts.next()) else {
            continue;
        };
        // Prelinked files moved: the note says where `.stapsdt.base` was.
        let shift = base.map_or(0, |b| b.wrapping_sub(note_base));
        let Some(offset) = to_offset(pc.wrapping_add(shift)) else {
            continue;
        };
        let semaphore = (semaphore != 0)
            .then(|| to_offset(semaphore.wrapping_add(shift)))
            .flatten();
        found.push(Probe {
            provider: provider.into_owned(),
            name: name.into_owned(),
            offset,
            semaphore,
            args: args
                .map(|a| a.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
        });
    }
    found
}

/// CPython 3.11 and later (until the fix of CPython issue 98894, merged
/// for a later release in December 2025) carry `function__entry` but never
/// fire it: the 3.11 interpreter loop only reaches it while a trace or
/// profile function is set. Found in the file name of the interpreter
/// holding the probes (`python3.11`, `libpython3.11.so.1.0`). Returns the
/// version when it is one of those.
pub fn silent_python(file: &Path) -> Option<(u32, u32)> {
    let name = file.file_name()?.to_str()?;
    let at = name.find("python3.")? + "python3.".len();
    let minor: String = name[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let minor: u32 = minor.parse().ok()?;
    (minor >= 11).then_some((3, minor))
}

/// The runtime and name (as `display` gives it) of a name the kernel
/// reported seen called; `None` for a runtime this build does not know.
pub fn seen_name(text: &profiler_common::NameText) -> Option<(Runtime, String)> {
    let runtime = Runtime::from_id(text.runtime)?;
    let part = |bytes: &[u8], len: u32| {
        String::from_utf8_lossy(&bytes[..(len as usize).min(bytes.len())])
            .trim_end_matches('\0')
            .to_owned()
    };
    let display = runtime.display(
        &part(&text.qualifier, text.qualifier_len),
        &part(&text.name, text.name_len),
    );
    Some((runtime, display))
}

/// Whether a process's environment (`/proc/PID/environ`'s bytes) turns
/// PHP's probes on: PHP fires them only when started with
/// `USE_ZEND_DTRACE=1`.
pub fn php_probes_on(environ: &[u8]) -> bool {
    // PHP reads it with atoi: any number but 0 turns the probes on.
    environ.split(|&b| b == 0).any(|v| {
        v.strip_prefix(b"USE_ZEND_DTRACE=").is_some_and(|n| {
            let digits: Vec<u8> = n.iter().copied().take_while(u8::is_ascii_digit).collect();
            std::str::from_utf8(&digits)
                .ok()
                .and_then(|d| d.parse::<u64>().ok())
                .is_some_and(|n| n != 0)
        })
    })
}

/// The sites of `runtime`'s call probe among `probes`.
pub fn call_sites(probes: &[Probe], runtime: Runtime) -> Vec<&Probe> {
    let (provider, name) = runtime.probe();
    probes
        .iter()
        .filter(|p| p.provider == provider && p.name == name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_specs_of_debians_runtimes() {
        assert_eq!(
            parse_arg("8@%rbp"),
            Some(UsdtArg {
                kind: USDT_ARG_REG,
                reg: 4,
                disp: 0
            })
        );
        assert_eq!(parse_arg("-4@%eax").unwrap().reg, 10);
        assert_eq!(
            parse_arg("8@-16(%rbp)"),
            Some(UsdtArg {
                kind: USDT_ARG_MEM,
                reg: 4,
                disp: -16
            })
        );
        assert_eq!(parse_arg("-4@112(%rsp)").unwrap().disp, 112);
        assert_eq!(parse_arg("4@$5"), None);
        assert_eq!(parse_arg("8@(%rax,%rbx,8)"), None);
        assert_eq!(parse_arg("8@%xmm0"), None);
    }

    #[test]
    fn patterns_name_their_runtime() {
        assert_eq!(
            runtime_pattern("py:cache.*"),
            Some((Runtime::Python, "cache.*"))
        );
        assert_eq!(
            runtime_pattern("rb:Cache#invalidate"),
            Some((Runtime::Ruby, "Cache#invalidate"))
        );
        assert_eq!(runtime_pattern("php:*"), Some((Runtime::Php, "*")));
        assert_eq!(runtime_pattern("cache_*"), None);
        assert_eq!(runtime_pattern("py::Store::evict"), None);
        assert_eq!(runtime_pattern("go:main.f"), None);
    }

    #[test]
    fn cpython_from_3_11_is_known_silent() {
        assert_eq!(
            silent_python(Path::new("/usr/bin/python3.11")),
            Some((3, 11))
        );
        assert_eq!(
            silent_python(Path::new("/usr/lib/x86_64-linux-gnu/libpython3.12.so.1.0")),
            Some((3, 12))
        );
        assert_eq!(silent_python(Path::new("/usr/bin/python3.10")), None);
        assert_eq!(silent_python(Path::new("/usr/bin/python3.9")), None);
        assert_eq!(silent_python(Path::new("/opt/py/bin/python")), None);
    }

    #[test]
    fn php_probes_need_their_variable() {
        assert!(php_probes_on(b"PATH=/bin\0USE_ZEND_DTRACE=1\0"));
        assert!(!php_probes_on(b"PATH=/bin\0USE_ZEND_DTRACE=0\0"));
        assert!(php_probes_on(b"USE_ZEND_DTRACE=2\0"));
        assert!(!php_probes_on(b"USE_ZEND_DTRACE=yes\0"));
        assert!(!php_probes_on(b""));
    }

    #[test]
    fn names_read_as_each_language_writes_them() {
        assert_eq!(
            Runtime::Python.display("/srv/app/cache.py", "invalidate"),
            "cache.invalidate"
        );
        assert_eq!(
            Runtime::Ruby.display("Cache", "invalidate"),
            "Cache#invalidate"
        );
        assert_eq!(
            Runtime::Php.display("Cache", "invalidate"),
            "Cache::invalidate"
        );
        assert_eq!(
            Runtime::Php.display("", "wp_cache_delete"),
            "wp_cache_delete"
        );
    }

    /// A note section as GCC writes one, in an ELF made by hand is too much
    /// here: the interpreter on this machine, when it has probes, is read
    /// instead (Debian's python3.11 does).
    #[test]
    fn this_machines_python_has_its_call_probe() {
        let Ok(data) = std::fs::read("/usr/bin/python3.11") else {
            eprintln!("no /usr/bin/python3.11 here: skipped");
            return;
        };
        let all = probes(&data);
        if all.is_empty() {
            eprintln!("/usr/bin/python3.11 has no USDT probes: skipped");
            return;
        }
        let sites = call_sites(&all, Runtime::Python);
        assert!(!sites.is_empty(), "{all:?}");
        for site in sites {
            assert!(site.semaphore.is_some(), "{site:?}");
            let spec = site.spec(Runtime::Python).expect("readable arguments");
            assert!(!is_none(&spec.name));
            assert!((site.offset as usize) < data.len());
        }
    }
}
