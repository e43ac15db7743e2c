//! Types and constants shared by the kernel programs and the userspace loader.
//!
//! Everything here is `#[repr(C)]` and padding-free, because the kernel side
//! writes these bytes into BPF maps and the userspace side reads them back.
//! No logic lives here.
#![no_std]

/// Name of the per-CPU hash map that counts calls per (function, process).
pub const COUNTS_MAP: &str = "COUNTS";
/// Name of the per-CPU array whose slot 0 counts hits dropped because
/// `COUNTS` was full.
pub const DROPS_MAP: &str = "DROPS";
/// The program declared `uprobe.multi`: one link for many functions
/// (kernel >= 6.6).
pub const PROG_MULTI: &str = "count_calls_multi";
/// The same program declared as a plain `uprobe`: one perf link per function,
/// for kernels without `uprobe_multi`.
pub const PROG_SINGLE: &str = "count_calls";

/// Name of the LRU per-CPU map of (function, process, return address) call
/// counts: who called each watched function.
pub const CALLERS_MAP: &str = "CALLERS";
/// Capacity of `CALLERS`; an LRU map, so old call sites make room.
pub const CALLERS_ENTRIES: u32 = 8_192;

/// Default capacity of `COUNTS` in the object file; the loader resizes it to
/// the number of (function, process) pairs it expects before loading.
pub const DEFAULT_COUNTS_ENTRIES: u32 = 16_384;

/// Key of the `COUNTS` map.
///
/// `func` is the index of the watched function in the loader's table, passed
/// to the kernel as the attach cookie; `tgid` is the process id as userspace
/// knows it (the kernel's thread-group id). Two `u32`s: no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallKey {
    pub func: u32,
    pub tgid: u32,
}

#[cfg(feature = "user")]
// SAFETY: `CallKey` is `#[repr(C)]`, made of two `u32`s with no padding, and
// every bit pattern is a valid value.
unsafe impl aya::Pod for CallKey {}

/// Key of the `CALLERS` map: a watched function, the process, and the
/// return address of the call (where in the caller it will return to).
/// `u32`, `u32`, `u64`: 16 bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallerKey {
    pub func: u32,
    pub tgid: u32,
    pub return_address: u64,
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, two `u32`s then a `u64`, no padding; any bits are valid.
unsafe impl aya::Pod for CallerKey {}
