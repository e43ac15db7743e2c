//! The kernel side of cacheloop: count calls, nothing else.
//!
//! One program body, compiled four times: `count_calls_multi` is declared
//! `uprobe.multi` so one link covers every watched function (kernel >= 6.6);
//! `count_calls` is a plain uprobe for older kernels, where the loader attaches
//! one perf link per function. aya decides the attach path from the ELF
//! section, not at run time, so the loader picks the program instead. The
//! `count_keyed` pair also reads keys; the loader loads it only when some
//! function has a key to read.
//!
//! Each hit adds one to a per-CPU counter of its (function, process): at the
//! array slot the attach cookie names when the probe is scoped to one
//! process, else in a hash keyed by (function, process). The function is in
//! the cookie too (the loader's index of that address). No decision
//! is made here: rates, baselines, cycles and verdicts are all computed in
//! userspace. The evidence that explains a loop is gathered beside the
//! count, sampled where it would cost the most:
//! - the call site (return address), counted by (function, process, return
//!   address) so userspace can see watched functions calling each other in
//!   a cycle: every hit for a function called at a modest rate, one hit in
//!   `1 << caller_shift` (weighted by as many) for a hot one, as
//!   the loader sets per function in `FUNC_CONFIG`;
//! - the user stack, on one hit in `STACK_SAMPLE_EVERY`;
//! - with a key configured, the key on every hit, and which key followed
//!   which on the same thread (the order a dependency cycle is walked in):
//!   a sequence cannot be sampled without breaking it.
//!
//! The count before the hit, hashed, decides both samples (see `count`).
//!
//! Without `--func`, `sample_user` (a perf-event program on a CPU-clock
//! tick) samples the watched processes' on-CPU user code, so the loader can
//! pick the functions worth counting; it counts stacks, nothing more.
#![no_std]
#![no_main]
// For `atomic_xadd`, see `add`. The crate is built with -Z build-std
// already (RUSTC_BOOTSTRAP=1), so no other toolchain is needed.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_F_USER_STACK,
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_probe_read_user_str_bytes,
        generated::{bpf_get_attach_cookie, bpf_get_smp_processor_id, bpf_get_stack},
    },
    macros::{map, perf_event, uprobe},
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, StackTrace},
    programs::{PerfEventContext, ProbeContext, tracing::StackIdContext as _},
};
use aya_log_ebpf::warn;
use profiler_common::{
    CALIBRATION_COOKIE, CALIBRATION_KEY_SLOT, CALLERS_ENTRIES, COOKIE_SLOT_SHIFT, CallKey,
    CallerKey, DEFAULT_COUNTS_ENTRIES, FuncConfig, KEY_EDGES_ENTRIES, KEY_MORE_CHUNKS, KEY_NONE,
    KEY_STR, KEY_STR_AT, KEY_TEXT_LEN, KEY_TRUNCATED, KEY_U64, KEYS_ENTRIES, KeyEdge, KeyId,
    KeyText, LAST_KEY_ENTRIES, MAX_CALLER_SHIFT, NAME_LEN, NameText, QUAL_LEN, REFUSED_ENTRIES,
    SAMPLE_FRAMES, SAMPLED_ENTRIES, SAMPLES_ENTRIES, SEEN_ENTRIES, STACK_ENTRIES,
    STACK_SAMPLE_EVERY, SampleKey, StackKey, USDT_ARG_MEM, USDT_ARG_REG, USDT_HITS,
    USDT_SPECS_ENTRIES, UsdtArg, UsdtSpec, WANTED_ENTRIES, fnv1a, fnv1a_more, name_hash,
};

/// Calls per (function, process) of pairs with a slot (see
/// `COOKIE_SLOT_SHIFT`): the per-hit cost of bpftrace's `@ = count()`, one
/// array element. One counter per CPU and slot, CPU by CPU: this CPU's
/// counters start at `cpu * SLOT_STRIDE`, a whole number of cache lines
/// from the next CPU's, so no two CPUs ever write one line, as with a
/// per-CPU array. Unlike one, it can be mapped into the loader, which
/// reads the counters where they are instead of having the kernel copy
/// them out element by element (a fifth of the loader's CPU at 1000
/// functions, four readings a second). Sized by the loader before load.
#[map]
static COUNT_SLOTS: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Slots per CPU in `COUNT_SLOTS` (a multiple of 8); set by the loader.
#[unsafe(no_mangle)]
static SLOT_STRIDE: u32 = 0;

/// Calls per (function, process) of the other pairs, one slot per CPU.
/// Resized by the loader before load. Not preallocated: with
/// `--binary` the loader sizes it for 256k pairs, and preallocating that
/// many per-CPU entries took 0.17 s at load here, for entries a run mostly
/// never uses. Entries are allocated at a pair's first hit instead, from the
/// kernel's BPF memory allocator (bpf_mem_alloc, kernel 6.1, the oldest we
/// support), safe in any program context.
#[map]
static COUNTS: PerCpuHashMap<CallKey, u64> =
    PerCpuHashMap::with_max_entries(DEFAULT_COUNTS_ENTRIES, BPF_F_NO_PREALLOC);

/// Calls per (function, process, return address). LRU: bounded, and a call
/// site that stops calling ages out.
#[map]
static CALLERS: LruPerCpuHashMap<CallerKey, u64> =
    LruPerCpuHashMap::with_max_entries(CALLERS_ENTRIES, 0);

/// What to gather for each function besides its count, by cookie. Resized
/// by the loader; all zero (no key, every call site) until the loader says
/// otherwise.
#[map]
static FUNC_CONFIG: Array<FuncConfig> = Array::with_max_entries(1, 0);

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

/// Hits that could not be counted because `COUNTS` was full.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0 not zero: count nothing. The loader sets it before taking the
/// probes out and clears it once all are back in, so a probe window counts
/// every function over the same span, the one it measures: links go in and
/// out one function at a time before 6.6, and under emulation that takes
/// longer than a short window lasts. The hits in between still trap.
#[map]
static PAUSED: Array<u32> = Array::with_max_entries(1, 0);

/// The processes whose on-CPU code `sample_user` samples (tgid -> 1), set
/// by the loader.
#[map]
static SAMPLED: HashMap<u32, u32> = HashMap::with_max_entries(SAMPLED_ENTRIES, 0);

/// Sampled user stacks (innermost frames), counted. LRU, so preallocated:
/// a perf-event program may only use preallocated hashes on some kernels.
/// The loader reads and empties it each interval.
#[map]
static SAMPLES: LruPerCpuHashMap<SampleKey, u64> =
    LruPerCpuHashMap::with_max_entries(SAMPLES_ENTRIES, 0);

/// Each USDT probe site attached, by attach cookie: where its name
/// arguments are. Set by the loader.
#[map]
static USDT_SPECS: Array<UsdtSpec> = Array::with_max_entries(USDT_SPECS_ENTRIES, 0);

/// The interpreted names wanted (they matched a `py:`/`rb:`/`php:`
/// pattern): name hash -> function id. Set by the loader.
#[map]
static WANTED: HashMap<u64, u32> = HashMap::with_max_entries(WANTED_ENTRIES, 0);

/// Interpreted names the loader judged and does not want: not reported
/// again. LRU: one forgotten is reported and refused again.
#[map]
static REFUSED: LruHashMap<u64, u8> = LruHashMap::with_max_entries(REFUSED_ENTRIES, 0);

/// Interpreted names seen called that are not (yet) wanted, with their
/// text, for the loader to match: each name once, not each call.
#[map]
static SEEN: LruHashMap<u64, NameText> = LruHashMap::with_max_entries(SEEN_ENTRIES, 0);

#[uprobe(multi)]
pub fn count_calls_multi(ctx: ProbeContext) -> u32 {
    count::<false>(&ctx)
}

#[uprobe]
pub fn count_calls(ctx: ProbeContext) -> u32 {
    count::<false>(&ctx)
}

#[uprobe(multi)]
pub fn count_keyed_multi(ctx: ProbeContext) -> u32 {
    count::<true>(&ctx)
}

#[uprobe]
pub fn count_keyed(ctx: ProbeContext) -> u32 {
    count::<true>(&ctx)
}

/// Discovery: runs on a CPU-clock tick on every CPU (a low frequency set
/// by the loader) and, when the interrupted task belongs to a sampled
/// process, counts its innermost user frames. With the task in the kernel
/// at the tick, the helper starts from the registers saved at its entry,
/// so a loop that spends its time in system calls still names its code.
#[perf_event]
pub fn sample_user(ctx: PerfEventContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the value is only tested for presence.
    if unsafe { SAMPLED.get(&tgid) }.is_none() {
        return 0;
    }
    let mut key = SampleKey {
        tgid,
        depth: 0,
        ips: [0; SAMPLE_FRAMES],
    };
    // SAFETY: the helper writes at most `size` bytes into `key.ips`, which
    // has exactly that many; the context is the one the kernel passed us.
    let written = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            key.ips.as_mut_ptr().cast(),
            (SAMPLE_FRAMES * 8) as u32,
            u64::from(BPF_F_USER_STACK),
        )
    };
    if written <= 0 {
        return 0;
    }
    key.depth = (written / 8) as u32;
    add_lru(&SAMPLES, &key, 1);
    0
}

/// A call of an interpreted function, at its runtime's USDT probe
/// (`python:function__entry`, `ruby:method__entry`, `php:function__entry`):
/// reads the function's name (and its file or class) from the probe's
/// arguments, hashes it, and counts the call only if the loader wants that
/// name. A name not wanted is written to `SEEN` once, for the loader to
/// match; calls are never sent to userspace one by one.
#[uprobe]
pub fn count_usdt(ctx: ProbeContext) -> u32 {
    if PAUSED.get(0).is_some_and(|&p| p != 0) {
        return 0;
    }
    // SAFETY: as in `count`.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let Some(spec) = USDT_SPECS.get(cookie as u32) else {
        return 0;
    };
    // Every run is a trap the process paid for, wanted name or not: the
    // overhead governor weighs these.
    tally(
        &ctx,
        &CallKey {
            func: USDT_HITS,
            tgid: ctx.tgid(),
        },
    );
    // On the stack (200 bytes of the 512): a per-CPU scratch entry could
    // be overwritten mid-read, uprobe programs being preemptible.
    let mut text = NameText {
        runtime: spec.runtime,
        _reserved: 0,
        qualifier_len: 0,
        name_len: 0,
        qualifier: [0; QUAL_LEN],
        name: [0; NAME_LEN],
    };
    text.qualifier_len = read_name(&ctx, &spec.qualifier, &mut text.qualifier);
    text.name_len = read_name(&ctx, &spec.name, &mut text.name);
    if text.name_len == 0 {
        return 0;
    }
    let hash = name_hash(
        &text.qualifier,
        text.qualifier_len as usize,
        &text.name,
        text.name_len as usize,
    );
    // SAFETY: a plain lookup; the value is copied out.
    match unsafe { WANTED.get(&hash) } {
        Some(&func) => {
            let key = CallKey {
                func,
                tgid: ctx.tgid(),
            };
            tally(&ctx, &key);
        }
        None => {
            // SAFETY: only tested for presence.
            if unsafe { REFUSED.get(&hash) }.is_none() && unsafe { SEEN.get(&hash) }.is_none() {
                let _ = SEEN.insert(&hash, &text, 0);
            }
        }
    }
    0
}

/// Reads the C string a USDT argument points to into `out`; returns its
/// length without the NUL (0 if absent or unreadable).
#[inline(always)]
fn read_name(ctx: &ProbeContext, arg: &UsdtArg, out: &mut [u8]) -> u32 {
    let ptr = match arg.kind {
        USDT_ARG_REG => register(ctx, arg.reg),
        USDT_ARG_MEM => {
            let at = register(ctx, arg.reg).wrapping_add(arg.disp as u64);
            // SAFETY: a checked read of user memory; a fault returns Err.
            match unsafe { bpf_probe_read_user(at as *const u64) } {
                Ok(p) => p,
                Err(_) => return 0,
            }
        }
        _ => return 0,
    };
    if ptr == 0 {
        return 0;
    }
    // SAFETY: a checked, bounded read of a user string.
    match unsafe { bpf_probe_read_user_str_bytes(ptr as *const u8, out) } {
        Ok(read) => read.len() as u32,
        Err(_) => 0,
    }
}

/// Register `index` of the probed task (its place in the kernel's x86-64
/// `pt_regs`). The verifier wants context reads at constant offsets: one
/// arm per register.
#[inline(always)]
fn register(ctx: &ProbeContext, index: u32) -> u64 {
    // SAFETY: the context is the kernel's `pt_regs` for this probe.
    let regs = unsafe { &*ctx.regs };
    match index {
        0 => regs.r15,
        1 => regs.r14,
        2 => regs.r13,
        3 => regs.r12,
        4 => regs.rbp,
        5 => regs.rbx,
        6 => regs.r11,
        7 => regs.r10,
        8 => regs.r9,
        9 => regs.r8,
        10 => regs.rax,
        11 => regs.rcx,
        12 => regs.rdx,
        13 => regs.rsi,
        14 => regs.rdi,
        16 => regs.rip,
        19 => regs.rsp,
        _ => 0,
    }
}

/// One hit. `KEYS`: read keys where configured; without it the key path is
/// not in the program at all, and the verifier has a fraction of the work.
///
/// The hit is counted first, and the count before it decides what else
/// this hit gathers: salted with the cookie (so the first hit of every
/// pair and CPU is not the one always sampled) and hashed with
/// SplitMix64's finalizer (`mix`), its high bits pick one hit in
/// `1 << shift` for the call site and one in `STACK_SAMPLE_EVERY << shift`
/// of all hits, among those, for the stack: spread over any pattern of
/// callers as a random draw would be, without a helper call for one. The
/// process id is asked for only when it is needed.
#[inline(always)]
fn count<const KEYS: bool>(ctx: &ProbeContext) -> u32 {
    // An array lookup at a constant index: the verifier inlines it.
    if PAUSED.get(0).is_some_and(|&p| p != 0) {
        return 0;
    }
    // SAFETY: the helper only reads the cookie of the link that ran us; the
    // context pointer is the one the kernel passed to this program.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let func = cookie as u32;
    let slot = (cookie >> COOKIE_SLOT_SHIFT) as u32;
    let counted = match slot_counter(slot) {
        Some(count) => Some(fetch_add(count, 1)),
        None => tally(
            ctx,
            &CallKey {
                func,
                tgid: ctx.tgid(),
            },
        ),
    };
    // A hit the full counter map dropped gathers nothing either: it would
    // stand for calls no count has.
    let Some(before) = counted else {
        return 0;
    };
    // Functions past the config table's end get the defaults: no key,
    // every call site.
    let config_slot = match func {
        CALIBRATION_COOKIE => Some(CALIBRATION_KEY_SLOT),
        func if func < CALIBRATION_KEY_SLOT => Some(func),
        _ => None,
    };
    let config = config_slot.and_then(|slot| FUNC_CONFIG.get(slot));
    let shift = config.map_or(0, |c| c.caller_shift.min(MAX_CALLER_SHIFT));
    let hash = mix(before.wrapping_add(cookie.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let stack_bits = STACK_SAMPLE_EVERY.trailing_zeros() + shift;
    let caller = shift == 0 || hash >> (64 - shift) == 0;
    let keyed = KEYS && config.is_some_and(|c| c.key_kind != KEY_NONE);
    if !(caller || keyed) {
        return 0;
    }
    let key = CallKey {
        func,
        tgid: ctx.tgid(),
    };
    if caller {
        count_caller(ctx, &key, 1 << shift);
        // Stacks are sparser still for a hot function, by the same shift:
        // a stack walk costs microseconds.
        if hash >> (64 - stack_bits) == 0 {
            sample_stack(ctx, &key);
        }
    }
    if keyed && let Some(config) = config {
        count_key(ctx, &key, config);
    }
    0
}

/// This CPU's counter of cookie slot `slot` (the pair's slot plus one; 0:
/// none) in `COUNT_SLOTS`.
#[inline(always)]
fn slot_counter(slot: u32) -> Option<*mut u64> {
    if slot == 0 {
        return None;
    }
    // SAFETY: a read of a constant the loader set before load (volatile,
    // so the compiler does not fold the 0 it was compiled with); the helper
    // takes no arguments. A uprobe program runs with migration disabled:
    // the CPU stays ours until it returns.
    let (stride, cpu) = unsafe {
        (
            core::ptr::read_volatile(&SLOT_STRIDE),
            bpf_get_smp_processor_id(),
        )
    };
    // A slot past the stride is no slot of ours (the lookup bounds the
    // index against the array's end, not against this CPU's share).
    if slot > stride {
        return None;
    }
    COUNT_SLOTS.get_ptr_mut(cpu.wrapping_mul(stride).wrapping_add(slot - 1))
}

/// SplitMix64's finalizer: every bit of `x` moves every bit of the result.
#[inline(always)]
fn mix(x: u64) -> u64 {
    let x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Counts one call of a (function, process) pair in the hash; returns the
/// count before it (on this CPU), or `None` when the map was full and the
/// hit is dropped.
#[inline(always)]
fn tally(ctx: &ProbeContext, key: &CallKey) -> Option<u64> {
    if let Some(before) = bump(key) {
        return Some(before);
    }
    // First hit of this (function, process) on this CPU. Another CPU may
    // create the entry at the same moment; then our insert fails with EEXIST
    // and the lookup after it succeeds.
    if COUNTS.insert(key, &1, u64::from(BPF_NOEXIST)).is_ok() {
        return Some(0);
    }
    if let Some(before) = bump(key) {
        return Some(before);
    }
    if let Some(drops) = DROPS.get_ptr_mut(0) {
        // Log once per CPU, never per hit: this is the hot path. A racing
        // add only changes which hit logs.
        if fetch_add(drops, 1) == 0 {
            warn!(ctx, "cacheloop: counter map full, hits are being dropped");
        }
    }
    None
}

/// At a function's first instruction on x86-64 the stack pointer points at
/// the return address the call pushed: one 8-byte user read, no unwinding.
/// Counted as `weight` calls: the one sampled stands for that many.
#[inline(always)]
fn count_caller(ctx: &ProbeContext, key: &CallKey, weight: u64) {
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
        add_lru(&CALLERS, &caller, weight);
    }
    #[cfg(not(bpf_target_arch = "x86_64"))]
    let _ = (ctx, key, weight);
}

/// Takes the user stack (the caller decided this hit is sampled).
#[inline(always)]
fn sample_stack(ctx: &ProbeContext, key: &CallKey) {
    let Ok(stack_id) = ctx.get_stackid(&STACKS, u64::from(BPF_F_USER_STACK)) else {
        return;
    };
    let id = StackKey {
        func: key.func,
        tgid: key.tgid,
        stack_id: stack_id as u32,
        _reserved: 0,
    };
    add_lru(&STACK_COUNTS, &id, 1);
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

/// Reads the function's key argument, as `config` says, and counts it.
/// Strings are read with a bounded, fault-safe user read.
#[inline(always)]
fn count_key(ctx: &ProbeContext, key: &CallKey, config: &FuncConfig) {
    let Some(arg) = argument(ctx, config.key_arg) else {
        return;
    };
    let mut text = KeyText {
        len: 0,
        _reserved: 0,
        bytes: [0; KEY_TEXT_LEN],
    };
    let hash = match config.key_kind {
        KEY_U64 => arg,
        KEY_STR | KEY_STR_AT => {
            let mut ptr = arg;
            if config.key_kind == KEY_STR_AT {
                // SAFETY: a checked read of user memory; a fault returns Err.
                match unsafe {
                    bpf_probe_read_user((arg + u64::from(config.key_offset)) as *const u64)
                } {
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
    let first = add_lru(&KEYS, &id, 1);
    if first && config.key_kind != KEY_U64 {
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
    add_lru(&KEY_EDGES, &edge, 1);
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
fn bump(key: &CallKey) -> Option<u64> {
    COUNTS.get_ptr_mut(key).map(|count| fetch_add(count, 1))
}

/// Adds `n` to this CPU's slot of a per-CPU map value. A uprobe program
/// runs with migration disabled, so it stays on this CPU, but it is not
/// under a per-CPU guard the way kprobes are (`bpf_prog_active`), and on a
/// preemptible kernel another task on this CPU may run this program between
/// a plain load and store of ours: one of the two hits would be lost. An
/// atomic add (a BPF_ATOMIC add whose result is unused, understood by every
/// kernel we run on) keeps both; uncontended, it costs what a plain add did.
#[inline(always)]
fn add(slot: *mut u64, n: u64) {
    // `AtomicU64::fetch_add` does not exist on the bpf target (it has no
    // compare-and-swap before v3, so Rust declares no 64-bit atomics); the
    // intrinsic it is built on lowers to the plain atomic add.
    // SAFETY: `slot` came from a successful map lookup: a live, aligned u64
    // the map keeps while this program runs.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            slot, n,
        )
    };
}

/// [`add`], then the value this CPU's slot holds (read back, not fetched:
/// BPF_FETCH needs `-mcpu=v3`, and aya-build builds for the generic CPU).
/// Another task adding between the two on this CPU (a preempted hit) only
/// shifts which hit is sampled; the counts stay exact.
#[inline(always)]
fn fetch_add(slot: *mut u64, n: u64) -> u64 {
    add(slot, n);
    // SAFETY: as in `add`.
    unsafe { core::ptr::read_volatile(slot) }.wrapping_sub(n)
}

/// Adds `n` under `key` in an LRU per-CPU map, creating the entry; true
/// when this call created it. Two tasks may create it at once: the second
/// insert fails (`BPF_NOEXIST`) and adds to the entry the first made
/// instead of overwriting it.
#[inline(always)]
fn add_lru<K>(map: &LruPerCpuHashMap<K, u64>, key: &K, n: u64) -> bool {
    if let Some(count) = map.get_ptr_mut(key) {
        add(count, n);
        return false;
    }
    if map.insert(key, &n, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    if let Some(count) = map.get_ptr_mut(key) {
        add(count, n);
    }
    false
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
