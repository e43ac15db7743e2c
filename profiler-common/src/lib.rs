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
/// Name of the one-entry array whose slot 0, when not zero, has every hit
/// return before counting anything: the probes are on their way in or out
/// (see `Probes::pause`), and a window counts only while all are in.
pub const PAUSED_MAP: &str = "PAUSED";
/// The program declared `uprobe.multi`: one link for many functions
/// (kernel >= 6.6).
pub const PROG_MULTI: &str = "count_calls_multi";
/// The same program declared as a plain `uprobe`: one perf link per function,
/// for kernels without `uprobe_multi`.
pub const PROG_SINGLE: &str = "count_calls";
/// The two above with key reading compiled in, loaded instead when some
/// function has a key to read: the string-hashing loops make the verifier
/// work several times longer, which a run without keys does not pay.
pub const PROG_MULTI_KEYED: &str = "count_keyed_multi";
pub const PROG_SINGLE_KEYED: &str = "count_keyed";

/// Name of the per-CPU array that counts calls of a (function, process)
/// pair the loader gave a slot: probes scoped to one process carry their
/// pair's slot in the attach cookie, and count at an array index instead of
/// a hash lookup.
pub const COUNT_SLOTS_MAP: &str = "COUNT_SLOTS";
/// The attach cookie is `func | (slot + 1) << COOKIE_SLOT_SHIFT`: the
/// function index in the low half, and in the high half the pair's slot in
/// `COUNT_SLOTS` plus one, or 0 when the pair has none (probes on a file
/// for every process, or no slot left): then the call is counted in
/// `COUNTS` under (function, process).
pub const COOKIE_SLOT_SHIFT: u32 = 32;
/// The eBPF global holding `COUNT_SLOTS`' slots per CPU, set at load.
pub const SLOT_STRIDE: &str = "SLOT_STRIDE";

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
/// to the kernel in the attach cookie; `tgid` is the process id as userspace
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

/// Name of the array of per-function [`FuncConfig`]s, indexed by cookie.
pub const FUNC_CONFIG_MAP: &str = "FUNC_CONFIG";
/// The cookie the loader's calibration probe counts under: no watched
/// function has it.
pub const CALIBRATION_COOKIE: u32 = u32::MAX;
/// Slot of `FUNC_CONFIG` the calibration probe reads its config from (the
/// array has one more slot than functions with a config): calibration
/// measures the key path too.
pub const CALIBRATION_KEY_SLOT: u32 = 1 << 14;
/// Name of the LRU per-CPU map of (function, process, key hash) counts.
pub const KEYS_MAP: &str = "KEYS";
/// Name of the LRU map of key hash -> [`KeyText`] for string keys.
pub const KEY_TEXT_MAP: &str = "KEY_TEXT";
/// Capacity of `KEYS` and `KEY_TEXT`: LRU maps, so hot keys stay and cold
/// ones make room — a bounded in-kernel top-K.
pub const KEYS_ENTRIES: u32 = 4_096;
/// Bytes of a string key kept (its text, 47 bytes and a NUL); longer keys
/// are hashed in full up to [`KEY_HASHED_LEN`] bytes.
pub const KEY_TEXT_LEN: usize = 48;
/// Chunks of `KEY_TEXT_LEN - 1` bytes read after the first to hash a long
/// key in full: keys up to 235 bytes are told apart however alike their
/// first 47 bytes are.
pub const KEY_MORE_CHUNKS: usize = 4;
/// Bytes of a string key hashed at most.
pub const KEY_HASHED_LEN: usize = (KEY_TEXT_LEN - 1) * (KEY_MORE_CHUNKS + 1);
/// Set in the hash of a string key longer than `KEY_HASHED_LEN`: keys that
/// share their first 235 bytes may share a hash, so such keys are shown,
/// but kept out of the key rules. Clear in every other string key's hash.
pub const KEY_TRUNCATED: u64 = 1 << 63;

/// No key captured for this function.
pub const KEY_NONE: u32 = 0;
/// The argument is the key, an integer.
pub const KEY_U64: u32 = 1;
/// The argument points to a NUL-terminated string.
pub const KEY_STR: u32 = 2;
/// The argument points to a struct holding, at `offset`, a pointer to a
/// NUL-terminated string (Redis's `robj`: `ptr` at offset 8).
pub const KEY_STR_AT: u32 = 3;

/// What the kernel gathers for one function besides its count: how to read
/// its key argument, and how often to read its call site. Four `u32`s: no
/// padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FuncConfig {
    /// `KEY_NONE`, `KEY_U64`, `KEY_STR` or `KEY_STR_AT`.
    pub key_kind: u32,
    /// The argument (from 0) holding the key.
    pub key_arg: u32,
    /// For `KEY_STR_AT`: where the string pointer sits in the struct.
    pub key_offset: u32,
    /// The call site is read on one hit in `1 << caller_shift` (chosen by
    /// the hashed count) and counted as that many: a function called flat out pays
    /// for a user read and a map update on a few hits, not on each.
    /// Capped at [`MAX_CALLER_SHIFT`].
    pub caller_shift: u32,
}

/// The sparsest call-site sampling: one hit in 64.
pub const MAX_CALLER_SHIFT: u32 = 6;

/// Key of the `KEYS` map. `u32`, `u32`, `u64`: no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId {
    pub func: u32,
    pub tgid: u32,
    /// The integer key itself, or FNV-1a of the string key's bytes.
    pub hash: u64,
}

/// The bytes of a string key. `u32` length, `u32` reserved, bytes: no
/// padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyText {
    pub len: u32,
    pub _reserved: u32,
    pub bytes: [u8; KEY_TEXT_LEN],
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, four `u32`s, no padding; any bits are valid.
unsafe impl aya::Pod for FuncConfig {}
#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `u32`, `u32`, `u64`, no padding; any bits are valid.
unsafe impl aya::Pod for KeyId {}
#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, two `u32`s then bytes, 56 bytes, no padding.
unsafe impl aya::Pod for KeyText {}

/// Name of the LRU map of thread (pid_tgid) -> the last key that thread
/// passed to a watched function (any function with a key).
pub const LAST_KEY_MAP: &str = "LAST_KEY";
/// Threads remembered in `LAST_KEY`; the least recently active make room.
pub const LAST_KEY_ENTRIES: u32 = 8_192;
/// Name of the LRU per-CPU map of key transitions: on one thread, key
/// `from` was followed by key `to`. A loop through a cyclic dependency
/// shows up as the same few transitions again and again.
pub const KEY_EDGES_MAP: &str = "KEY_EDGES";
/// Capacity of `KEY_EDGES`.
pub const KEY_EDGES_ENTRIES: u32 = 4_096;

/// Key of `KEY_EDGES`: in process `tgid`, a call of watched function `func`
/// with key `to` came right after a call (of any keyed function) with key
/// `from` on the same thread (`from == to`: the key followed itself).
/// `u32`, `u32`, `u64`, `u64`: 24 bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyEdge {
    pub tgid: u32,
    pub func: u32,
    pub from: u64,
    pub to: u64,
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, two `u32`s then two `u64`s, no padding; any bits
// are valid.
unsafe impl aya::Pod for KeyEdge {}

/// FNV-1a, the hash both sides use for string keys.
pub const fn fnv1a(bytes: &[u8], len: usize) -> u64 {
    fnv1a_more(0xcbf2_9ce4_8422_2325, bytes, len)
}

/// FNV-1a of more bytes after those that made `hash`.
pub const fn fnv1a_more(hash: u64, bytes: &[u8], len: usize) -> u64 {
    let mut hash = hash;
    let mut i = 0;
    while i < bytes.len() && i < len {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// Name of the stack-trace map of sampled user stacks.
pub const STACKS_MAP: &str = "STACKS";
/// Name of the LRU per-CPU map of (function, process, stack id) counts.
pub const STACK_COUNTS_MAP: &str = "STACK_COUNTS";
/// Capacity of `STACKS` and `STACK_COUNTS`.
pub const STACK_ENTRIES: u32 = 1_024;
/// A user stack is taken on one hit in this many (chosen by the hashed
/// count, among the hits whose call site is read), and `1 << caller_shift`
/// times sparser for a hot function: walking a stack costs far more than
/// counting, and a loop's hot path shows up anyway. A power of two.
pub const STACK_SAMPLE_EVERY: u32 = 256;

/// Key of `STACK_COUNTS`. Four `u32`s: no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub func: u32,
    pub tgid: u32,
    pub stack_id: u32,
    pub _reserved: u32,
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, four `u32`s, no padding; any bits are valid.
unsafe impl aya::Pod for StackKey {}

/// Name of the perf-event program that samples the on-CPU user code of
/// watched processes (discovery: no `--func` given).
pub const SAMPLE_PROGRAM: &str = "sample_user";
/// Name of the hash of processes the sampler keeps (tgid -> 1).
pub const SAMPLED_MAP: &str = "SAMPLED";
/// Name of the LRU per-CPU map of sampled user stacks, counted.
pub const SAMPLES_MAP: &str = "SAMPLES";
/// Processes the sampler can keep.
pub const SAMPLED_ENTRIES: u32 = 1_024;
/// Distinct sampled stacks kept between two readings (LRU: the busy ones
/// stay). At the sampling frequency a reading sees a few hundred at most.
pub const SAMPLES_ENTRIES: u32 = 4_096;
/// User frames kept per sample: the on-CPU address and a few callers, so
/// that time spent in a library (memcpy, malloc) is put down to the
/// target's own function that called it.
pub const SAMPLE_FRAMES: usize = 4;

/// Key of `SAMPLES`: a process and its innermost user frames. `depth`
/// frames of `ips` are set, the rest zero. Two `u32`s then `u64`s: no
/// padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SampleKey {
    pub tgid: u32,
    pub depth: u32,
    pub ips: [u64; SAMPLE_FRAMES],
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, two `u32`s then four `u64`s, no padding; any bits
// are valid.
unsafe impl aya::Pod for SampleKey {}

/// Name of the program counting the calls of interpreted functions at a
/// runtime's USDT probe (`py:`, `rb:`, `php:` patterns).
pub const USDT_PROGRAM: &str = "count_usdt";
/// Name of the array of USDT probe specs, indexed by the attach cookie.
pub const USDT_SPECS_MAP: &str = "USDT_SPECS";
/// Name of the hash of wanted interpreted names: name hash -> function id.
pub const WANTED_MAP: &str = "WANTED";
/// Name of the LRU hash of interpreted names seen called: hash -> text.
pub const SEEN_MAP: &str = "SEEN";
/// Name of the LRU hash of interpreted names judged and not wanted.
pub const REFUSED_MAP: &str = "REFUSED";
/// Names refused, remembered at most (LRU: one forgotten is reported and
/// refused again, nothing worse).
pub const REFUSED_ENTRIES: u32 = 16_384;
/// The function id every run of the USDT program is also counted under,
/// per process, wanted name or not: what the runtime's probe costs the
/// process, for the overhead governor. Not a catalog id.
pub const USDT_HITS: u32 = u32::MAX - 1;
/// USDT probe sites cacheloop can attach at once.
pub const USDT_SPECS_ENTRIES: u32 = 256;
/// Wanted interpreted names, at most.
pub const WANTED_ENTRIES: u32 = 4_096;
/// Distinct interpreted names remembered between two readings.
pub const SEEN_ENTRIES: u32 = 2_048;
/// Bytes kept of a name's qualifier (Python's file, Ruby's and PHP's class).
pub const QUAL_LEN: usize = 128;
/// Bytes kept of an interpreted function's name.
pub const NAME_LEN: usize = 64;

/// Where a USDT argument is: nowhere (`USDT_ARG_NONE`), in a register
/// (`USDT_ARG_REG`), or in memory at a register plus `disp`
/// (`USDT_ARG_MEM`). `reg` is the register's index in the kernel's
/// `pt_regs` (x86-64: r15 = 0 ... rdi = 14, rip = 16, rsp = 19).
pub const USDT_ARG_NONE: u32 = 0;
pub const USDT_ARG_REG: u32 = 1;
pub const USDT_ARG_MEM: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtArg {
    pub kind: u32,
    pub reg: u32,
    pub disp: i64,
}

/// One USDT probe site: which of its arguments point at the qualifier and
/// at the name (both C strings). Two `UsdtArg`s and two `u32`s: no
/// padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtSpec {
    pub qualifier: UsdtArg,
    pub name: UsdtArg,
    /// Which runtime fires it (the loader's numbering), carried to `SEEN`.
    pub runtime: u32,
    pub _reserved: u32,
}

/// The text of an interpreted name seen called. `u32`s then bytes, sizes
/// multiples of 8: no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NameText {
    pub runtime: u32,
    pub _reserved: u32,
    pub qualifier_len: u32,
    pub name_len: u32,
    pub qualifier: [u8; QUAL_LEN],
    pub name: [u8; NAME_LEN],
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `u32`s then `i64`, no padding; any bits are valid.
unsafe impl aya::Pod for UsdtArg {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for UsdtSpec {}
#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, two `u32`s then byte arrays, no padding.
unsafe impl aya::Pod for NameText {}

/// The hash of an interpreted name: its qualifier, a separator no C string
/// holds, and the name. Both sides compute it.
pub const fn name_hash(
    qualifier: &[u8],
    qualifier_len: usize,
    name: &[u8],
    name_len: usize,
) -> u64 {
    fnv1a_more(fnv1a(qualifier, qualifier_len) ^ 0xff, name, name_len)
}
