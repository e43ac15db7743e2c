//! The catalog: the immutable table of what is probed.
//!
//! A function is identified by the file it lives in (device and inode) and
//! its name there; its id is the attach cookie the kernel counts it under.
//! Compiler clones of a function (`foo.isra.0`) share its id, so callers of
//! either are counted as `foo`. Each entry says where its code lies (to tell
//! callers apart), how its key argument is read, and whether it marks a
//! request (`--request-func`) rather than an invalidation.
//!
//! A catalog is never changed in place: when new processes bring new
//! functions the planner publishes a new version (`Arc<Catalog>`), and ids
//! of the old version keep their meaning. A recording holds every version
//! it used, so `replay` sees exactly what the live run saw.
//!
//! Pure data: no system calls.

use std::{path::PathBuf, sync::Arc};

use smallvec::SmallVec;

use profiler_common::{FuncConfig, KEY_STR, KEY_STR_AT, KEY_U64};
use serde::{Deserialize, Serialize};

/// A file as the kernel knows it: device and inode.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// How the kernel reads a function's key argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeySpec {
    /// Argument `arg` (from 0) is the key, an integer.
    U64 { arg: u32 },
    /// Argument `arg` points to a NUL-terminated string.
    Str { arg: u32 },
    /// Argument `arg` points to a struct holding, at `offset`, a pointer to
    /// a NUL-terminated string (Redis's `robj`).
    StrAt { arg: u32, offset: u32 },
}

impl KeySpec {
    /// Whether the key is text (its bytes are kept in the kernel).
    pub fn is_text(self) -> bool {
        !matches!(self, Self::U64 { .. })
    }

    /// The form the eBPF program reads (the key fields of the function's
    /// config).
    pub fn kernel_config(self) -> FuncConfig {
        let (kind, arg, offset) = match self {
            Self::U64 { arg } => (KEY_U64, arg, 0),
            Self::Str { arg } => (KEY_STR, arg, 0),
            Self::StrAt { arg, offset } => (KEY_STR_AT, arg, offset),
        };
        FuncConfig {
            key_kind: kind,
            key_arg: arg,
            key_offset: offset,
            ..FuncConfig::default()
        }
    }
}

/// Where part of a function's code lies in its file: file offsets
/// `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

/// One probed function.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Function {
    /// Demangled name, as records show it (the symbol table's own text).
    pub name: Arc<str>,
    /// The file as processes map it (links resolved for `--binary`): every
    /// path it was seen under (bind mounts, hard links, containers). One
    /// list per file, shared by its functions.
    pub paths: Arc<[PathBuf]>,
    pub file_id: FileId,
    /// Entry offsets probed in the file: the function and its clones. One,
    /// almost always: held in place, not allocated (10,000 functions).
    pub offsets: SmallVec<[u64; 1]>,
    /// Code ranges of those entries (where sizes are known).
    pub ranges: SmallVec<[Range; 1]>,
    pub key: Option<KeySpec>,
    /// Marks a request served (`--request-func`): counted, not judged.
    pub request: bool,
    /// Picked by cacheloop (no `--func`), and how: see `discover.rs`.
    /// Recordings store it beside the catalog (`Item::PickedCatalog`), so
    /// that catalogs of format 3 still read.
    #[serde(skip)]
    pub picked: Option<Picked>,
}

/// How a function was picked when none was named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Picked {
    /// Its name reads like invalidation.
    Name,
    /// It was hot in the on-CPU samples: judged against its process's
    /// learned CPU when it has no history of its own.
    Hot,
}

/// Every probed function, by id (the index).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    /// Grows by one each time functions are added.
    pub version: u32,
    pub functions: Vec<Function>,
}

impl Function {
    /// An interpreted function (`php:Cache::invalidate`): counted by name
    /// at its runtime's USDT probe, with no code of its own in a file.
    pub fn is_interpreted(&self) -> bool {
        self.offsets.is_empty()
    }
}

impl Catalog {
    pub fn len(&self) -> usize {
        self.functions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }

    pub fn get(&self, id: u32) -> Option<&Function> {
        self.functions.get(id as usize)
    }

    /// The name records show for function `id`.
    pub fn name(&self, id: u32) -> String {
        self.get(id)
            .map_or_else(|| format!("#{id}"), |f| f.name.to_string())
    }

    /// [`Catalog::name`], the catalog's own text where it has one.
    pub fn shared_name(&self, id: u32) -> Arc<str> {
        self.get(id)
            .map_or_else(|| format!("#{id}").into(), |f| f.name.clone())
    }

    pub fn is_request(&self, id: u32) -> bool {
        self.get(id).is_some_and(|f| f.request)
    }

    /// Whether function `id` has text keys.
    pub fn has_text_keys(&self, id: u32) -> bool {
        self.get(id)
            .and_then(|f| f.key)
            .is_some_and(KeySpec::is_text)
    }

    /// The function whose code holds `offset` in the file mapped as `path`
    /// with inode `inode`: after a deploy two builds share a path, and only
    /// the inode tells whose code an address is in. Where a file was planned
    /// again (rewritten in place, or its inode number reused), the newest
    /// plan wins.
    pub fn function_at(&self, path: &std::path::Path, inode: u64, offset: u64) -> Option<u32> {
        self.functions
            .iter()
            .rposition(|f| {
                f.file_id.ino == inode
                    && f.paths.iter().any(|p| p == path)
                    && f.ranges.iter().any(|r| (r.start..r.end).contains(&offset))
            })
            .map(|i| i as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(name: &str, file: &str, start: u64, end: u64) -> Function {
        Function {
            name: name.into(),
            paths: vec![file.into()].into(),
            file_id: FileId { dev: 1, ino: 2 },
            offsets: vec![start].into(),
            ranges: vec![Range { start, end }].into(),
            key: None,
            request: false,
            picked: None,
        }
    }

    #[test]
    fn code_offsets_resolve_to_the_function_holding_them() {
        let catalog = Catalog {
            version: 1,
            functions: vec![
                function("a", "/srv/cache", 0x1200, 0x1280),
                function("b", "/srv/cache", 0x1300, 0x1340),
                function("c", "/lib/other.so", 0x1200, 0x1280),
            ],
        };
        let cache = std::path::Path::new("/srv/cache");
        assert_eq!(catalog.function_at(cache, 2, 0x1250), Some(0));
        assert_eq!(catalog.function_at(cache, 2, 0x1310), Some(1));
        assert_eq!(catalog.function_at(cache, 2, 0x1400), None);
        assert_eq!(
            catalog.function_at(std::path::Path::new("/lib/other.so"), 2, 0x1200),
            Some(2)
        );
        assert_eq!(
            catalog.function_at(cache, 3, 0x1250),
            None,
            "another build at the same path"
        );
        assert_eq!(catalog.name(7), "#7");
    }

    #[test]
    fn key_specs_become_the_kernel_s_configs() {
        let redis = KeySpec::StrAt { arg: 1, offset: 8 }.kernel_config();
        assert_eq!(
            (
                redis.key_kind,
                redis.key_arg,
                redis.key_offset,
                redis.caller_shift
            ),
            (KEY_STR_AT, 1, 8, 0)
        );
        assert!(!KeySpec::U64 { arg: 0 }.is_text());
        assert!(KeySpec::Str { arg: 0 }.is_text());
    }
}
