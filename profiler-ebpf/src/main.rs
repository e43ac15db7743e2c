//! The kernel side of cacheloop: count calls, nothing else.
//!
//! One program body, compiled twice: `count_calls_multi` is declared
//! `uprobe.multi` so one link covers every watched function (kernel >= 6.6);
//! `count_calls` is a plain uprobe for older kernels, where the loader attaches
//! one perf link per function. aya decides the attach path from the ELF
//! section, not at run time, so the loader picks the program instead.
//!
//! Each hit adds one to a per-CPU counter keyed by (function, process), and
//! one to a counter keyed by (function, process, return address): who called
//! it, so userspace can see watched functions calling each other in a cycle.
//! The function is the attach cookie the loader gave that address. No
//! decision is made here: rates, baselines, cycles and verdicts are all
//! computed in userspace. With a key configured, the key is counted too, and
//! which key followed which on the same thread (the order a dependency
//! cycle is walked in).
#![no_std]
#![no_main]
// For `atomic_xadd`, see `add_one`. The crate is built with -Z build-std
// already (RUSTC_BOOTSTRAP=1), so no other toolchain is needed.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_F_USER_STACK,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_probe_read_user_str_bytes,
        generated::bpf_get_attach_cookie,
    },
    macros::{map, uprobe},
    maps::{Array, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, StackTrace},
    programs::{ProbeContext, tracing::StackIdContext as _},
};
use aya_log_ebpf::warn;
use profiler_common::{
    CALIBRATION_COOKIE, CALIBRATION_KEY_SLOT, CALLERS_ENTRIES, CallKey, CallerKey,
    DEFAULT_COUNTS_ENTRIES, KEY_EDGES_ENTRIES, KEY_MORE_CHUNKS, KEY_STR, KEY_STR_AT, KEY_TEXT_LEN,
    KEY_TRUNCATED, KEY_U64, KEYS_ENTRIES, KeyConfig, KeyEdge, KeyId, KeyText, LAST_KEY_ENTRIES,
    STACK_ENTRIES, STACK_SAMPLE_EVERY, StackKey, fnv1a, fnv1a_more,
};

/// Calls per (function, process), one slot per CPU so the hot path needs no
/// atomics. Resized by the loader before load.
#[map]
static COUNTS: PerCpuHashMap<CallKey, u64> =
    PerCpuHashMap::with_max_entries(DEFAULT_COUNTS_ENTRIES, 0);

/// Calls per (function, process, return address). LRU: bounded, and a call
/// site that stops calling ages out.
#[map]
static CALLERS: LruPerCpuHashMap<CallerKey, u64> =
    LruPerCpuHashMap::with_max_entries(CALLERS_ENTRIES, 0);

/// How to read each function's key argument, by cookie. Resized by the
/// loader; all zero (no key) unless `--key-arg` or a preset says otherwise.
#[map]
static KEY_CONFIG: Array<KeyConfig> = Array::with_max_entries(1, 0);

/// Calls per (function, process, key). LRU: the hot keys stay.
#[map]
static KEYS: LruPerCpuHashMap<KeyId, u64> = LruPerCpuHashMap::with_max_entries(KEYS_ENTRIES, 0);

/// The text of string keys, written when a key is first seen.
#[map]
static KEY_TEXT: LruHashMap<u64, KeyText> = LruHashMap::with_max_entries(KEYS_ENTRIES, 0);

/// The last key each thread passed to a keyed function, by pid_tgid.
#[map]
static LAST_KEY: LruHashMap<u64, u64> = LruHashMap::with_max_entries(LAST_KEY_ENTRIES, 0);

/// Which key followed which on one thread, counted: the order a loop
/// walks its dependency cycle in. LRU: bounded, the busy transitions stay.
#[map]
static KEY_EDGES: LruPerCpuHashMap<KeyEdge, u64> =
    LruPerCpuHashMap::with_max_entries(KEY_EDGES_ENTRIES, 0);

/// Sampled user stacks, and how often each was seen per (function,
/// process): at a verdict, userspace shows the hottest one.
#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(STACK_ENTRIES, 0);

#[map]
static STACK_COUNTS: LruPerCpuHashMap<StackKey, u64> =
    LruPerCpuHashMap::with_max_entries(STACK_ENTRIES, 0);

/// Hits on this CPU, to take a stack on one in `STACK_SAMPLE_EVERY`.
#[map]
static STACK_PACE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Hits that could not be counted because `COUNTS` was full.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[uprobe(multi)]
pub fn count_calls_multi(ctx: ProbeContext) -> u32 {
    count(&ctx)
}

#[uprobe]
pub fn count_calls(ctx: ProbeContext) -> u32 {
    count(&ctx)
}

#[inline(always)]
fn count(ctx: &ProbeContext) -> u32 {
    // SAFETY: the helper only reads the cookie of the link that ran us; the
    // context pointer is the one the kernel passed to this program.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let key = CallKey {
        func: cookie as u32,
        tgid: ctx.tgid(),
    };
    count_caller(ctx, &key);
    count_key(ctx, &key);
    sample_stack(ctx, &key);
    if bump(&key) {
        return 0;
    }
    // First hit of this (function, process) on this CPU. Another CPU may
    // create the entry at the same moment; then our insert fails with EEXIST
    // and the lookup after it succeeds.
    if COUNTS.insert(&key, &1, u64::from(BPF_NOEXIST)).is_ok() || bump(&key) {
        return 0;
    }
    if let Some(drops) = DROPS.get_ptr_mut(0) {
        add_one(drops);
        // SAFETY: this CPU's slot, live as in `add_one`; a racing add only
        // changes which hit logs.
        let first = unsafe { core::ptr::read_volatile(drops) } == 1;
        // Log once per CPU, never per hit: this is the hot path.
        if first {
            warn!(ctx, "cacheloop: counter map full, hits are being dropped");
        }
    }
    0
}

/// At a function's first instruction on x86-64 the stack pointer points at
/// the return address the call pushed: one 8-byte user read, no unwinding.
#[inline(always)]
fn count_caller(ctx: &ProbeContext, key: &CallKey) {
    #[cfg(bpf_target_arch = "x86_64")]
    {
        // SAFETY: `regs` is the register set the kernel handed this program.
        let sp = unsafe { (*ctx.regs).rsp };
        // SAFETY: a checked read of user memory; a fault returns Err.
        let Ok(return_address) = (unsafe { bpf_probe_read_user(sp as *const u64) }) else {
            return;
        };
        let caller = CallerKey {
            func: key.func,
            tgid: key.tgid,
            return_address,
        };
        add_lru(&CALLERS, &caller);
    }
    #[cfg(not(bpf_target_arch = "x86_64"))]
    let _ = (ctx, key);
}

/// Takes the user stack on one hit in `STACK_SAMPLE_EVERY` on this CPU.
#[inline(always)]
fn sample_stack(ctx: &ProbeContext, key: &CallKey) {
    let Some(pace) = STACK_PACE.get_ptr_mut(0) else {
        return;
    };
    add_one(pace);
    // SAFETY: this CPU's slot, live as in `add_one`; a racing add only
    // shifts which hit is sampled.
    let hits = unsafe { core::ptr::read_volatile(pace) };
    if hits % STACK_SAMPLE_EVERY != 1 {
        return;
    }
    let Ok(stack_id) = ctx.get_stackid(&STACKS, u64::from(BPF_F_USER_STACK)) else {
        return;
    };
    let id = StackKey {
        func: key.func,
        tgid: key.tgid,
        stack_id: stack_id as u32,
        _reserved: 0,
    };
    add_lru(&STACK_COUNTS, &id);
}

/// Argument `n` (from 0) of the probed call. The verifier refuses a load
/// from the context at a computed offset, which `ctx.arg(n)` with a
/// run-time `n` becomes; so read all six argument registers at constant
/// offsets, and pick among the copies.
#[inline(always)]
fn argument(ctx: &ProbeContext, n: u32) -> Option<u64> {
    #[cfg(bpf_target_arch = "x86_64")]
    {
        // SAFETY: `regs` is the register set the kernel handed this program.
        let regs = unsafe { &*ctx.regs };
        let args = [regs.rdi, regs.rsi, regs.rdx, regs.rcx, regs.r8, regs.r9];
        args.get(n as usize).copied()
    }
    #[cfg(not(bpf_target_arch = "x86_64"))]
    {
        let _ = (ctx, n);
        None
    }
}

/// Reads the function's key argument, if it has one configured, and counts
/// it. Strings are read with a bounded, fault-safe user read.
#[inline(always)]
fn count_key(ctx: &ProbeContext, key: &CallKey) {
    // Functions past the key table's end have no key read.
    let slot = match key.func {
        CALIBRATION_COOKIE => CALIBRATION_KEY_SLOT,
        func if func < CALIBRATION_KEY_SLOT => func,
        _ => return,
    };
    let Some(config) = KEY_CONFIG.get(slot) else {
        return;
    };
    let Some(arg) = argument(ctx, config.arg) else {
        return;
    };
    let mut text = KeyText {
        len: 0,
        _reserved: 0,
        bytes: [0; KEY_TEXT_LEN],
    };
    let hash = match config.kind {
        KEY_U64 => arg,
        KEY_STR | KEY_STR_AT => {
            let mut ptr = arg;
            if config.kind == KEY_STR_AT {
                // SAFETY: a checked read of user memory; a fault returns Err.
                match unsafe { bpf_probe_read_user((arg + u64::from(config.offset)) as *const u64) }
                {
                    Ok(p) => ptr = p,
                    Err(_) => return,
                }
            }
            // SAFETY: a checked, bounded read of a user string.
            let Ok(read) =
                (unsafe { bpf_probe_read_user_str_bytes(ptr as *const u8, &mut text.bytes) })
            else {
                return;
            };
            text.len = read.len() as u32;
            let hash = fnv1a(&text.bytes, text.len as usize);
            string_hash(ptr, text.len as usize, hash)
        }
        _ => return,
    };
    let id = KeyId {
        func: key.func,
        tgid: key.tgid,
        hash,
    };
    let first = add_lru(&KEYS, &id);
    if first && config.kind != KEY_U64 {
        let _ = KEY_TEXT.insert(&hash, &text, 0);
    }
    count_transition(key, hash, first);
}

/// Counts the transition from this thread's previous key to `hash`. Keys
/// are followed per thread, not per process: two threads serving
/// unrelated requests must not make up a sequence. A key following itself
/// is counted too: two hot keys interleaving at random are not a cycle,
/// and only the self-transitions show it. A key seen for the first time
/// (`first`) closes no cycle: its transition is not counted, which keeps a
/// storm of new keys from churning the map.
#[inline(always)]
fn count_transition(key: &CallKey, hash: u64, first: bool) {
    // The whole pid_tgid: a thread id reused by another process starts
    // afresh.
    let thread = bpf_get_current_pid_tgid();
    // SAFETY: a copy out of the map value, taken before this program
    // writes the entry; only this thread's hits write it.
    let previous = unsafe { LAST_KEY.get(&thread) }.copied();
    // An update, not a write through the looked-up pointer: an LRU entry
    // may be recycled for another thread under our feet.
    let _ = LAST_KEY.insert(&thread, &hash, 0);
    let Some(from) = previous else {
        return;
    };
    if first {
        return;
    }
    let edge = KeyEdge {
        tgid: key.tgid,
        func: key.func,
        from,
        to: hash,
    };
    add_lru(&KEY_EDGES, &edge);
}

/// Hashes the rest of a string key that filled the text buffer (`len`
/// bytes read, `hash` over them), in bounded chunks: two long keys alike in
/// their first 47 bytes must not be counted as one. A key longer than
/// `KEY_HASHED_LEN` is marked `KEY_TRUNCATED`.
#[inline(always)]
fn string_hash(ptr: u64, len: usize, hash: u64) -> u64 {
    let mut hash = hash;
    let mut offset = len as u64;
    let mut full = len == KEY_TEXT_LEN - 1;
    let mut chunk = [0u8; KEY_TEXT_LEN];
    let mut i = 0;
    while full && i < KEY_MORE_CHUNKS {
        // SAFETY: a checked, bounded read of a user string.
        let Ok(more) =
            (unsafe { bpf_probe_read_user_str_bytes((ptr + offset) as *const u8, &mut chunk) })
        else {
            break;
        };
        hash = fnv1a_more(hash, more, more.len());
        offset += more.len() as u64;
        full = more.len() == KEY_TEXT_LEN - 1;
        i += 1;
    }
    if full {
        hash | KEY_TRUNCATED
    } else {
        hash & !KEY_TRUNCATED
    }
}

#[inline(always)]
fn bump(key: &CallKey) -> bool {
    match COUNTS.get_ptr_mut(key) {
        Some(count) => {
            add_one(count);
            true
        }
        None => false,
    }
}

/// Adds one to this CPU's slot of a per-CPU map value. A uprobe program
/// runs with migration disabled, so it stays on this CPU, but it is not
/// under a per-CPU guard the way kprobes are (`bpf_prog_active`), and on a
/// preemptible kernel another task on this CPU may run this program between
/// a plain load and store of ours: one of the two hits would be lost. An
/// atomic add (a BPF_ATOMIC add whose result is unused, understood by every
/// kernel we run on) keeps both; uncontended, it costs what a plain add did.
#[inline(always)]
fn add_one(slot: *mut u64) {
    // `AtomicU64::fetch_add` does not exist on the bpf target (it has no
    // compare-and-swap before v3, so Rust declares no 64-bit atomics); the
    // intrinsic it is built on lowers to the plain atomic add.
    // SAFETY: `slot` came from a successful map lookup: a live, aligned u64
    // the map keeps while this program runs.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            slot, 1,
        )
    };
}

/// Adds one under `key` in an LRU per-CPU map, creating the entry. Two
/// tasks may create it at once: the second insert fails (`BPF_NOEXIST`)
/// and adds to the entry the first made instead of overwriting it.
#[inline(always)]
fn add_lru<K>(map: &LruPerCpuHashMap<K, u64>, key: &K) -> bool {
    if let Some(count) = map.get_ptr_mut(key) {
        add_one(count);
        return false;
    }
    if map.insert(key, &1, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    if let Some(count) = map.get_ptr_mut(key) {
        add_one(count);
    }
    false
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
