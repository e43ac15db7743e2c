//! Reads a whole per-CPU hash map in a few system calls with
//! `BPF_MAP_LOOKUP_BATCH` (kernel 5.6; hash, per-CPU hash and their LRU
//! kinds), instead of two calls per entry (get-next-key, then lookup) the
//! way aya walks a map. With 1000 watched functions that is the difference
//! between ~2000 calls per map per reading and one or two.
//!
//! aya has no batch operations, so this is the raw `bpf(2)` command; the
//! buffers are kept and reused, so a reading allocates nothing per entry.

use foldhash::HashMap;
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's internal "not supported" (a map kind without batch ops on
/// some kernels reports it as is).
const ENOTSUPP: i32 = 524;
/// Entries asked for per call at first; more when one hash bucket holds
/// more (the kernel returns whole buckets).
const FIRST_CHUNK: u32 = 1024;
/// The most per-CPU values a call asks for (32 MiB of them).
const MAX_VALUES: usize = 1 << 22;

/// The `batch` member of `union bpf_attr`, as the kernel lays it out.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Reusable buffers for batch reads of per-CPU `u64` counter maps.
pub struct BatchReader {
    cpus: usize,
    chunk: u32,
    keys: Vec<u8>,
    values: Vec<u64>,
}

impl BatchReader {
    /// For per-CPU maps on a machine with `cpus` possible CPUs (the
    /// kernel's per-CPU values carry one slot per possible CPU).
    pub fn new(cpus: usize) -> Self {
        Self {
            cpus: cpus.max(1),
            chunk: FIRST_CHUNK,
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    /// Every entry of the per-CPU map `fd` (keys `K`, values `u64`), summed
    /// over CPUs, into `out` (cleared first). `Ok(false)`: this kernel has
    /// no batch lookup for this map, nothing was read; read it some other
    /// way. At most `bound` entries are read.
    pub fn sum_per_cpu<K: aya::Pod + Eq + std::hash::Hash>(
        &mut self,
        fd: BorrowedFd<'_>,
        bound: usize,
        out: &mut HashMap<K, u64>,
    ) -> io::Result<bool> {
        out.clear();
        let key_size = std::mem::size_of::<K>();
        // The cursor: a bucket index for hash maps, written by the kernel.
        let mut cursor = [0u64; 1];
        let mut next = [0u64; 1];
        let mut first = true;
        // Raised when one bucket held more than was asked for.
        let mut at_least = 1;
        loop {
            // No more than `bound` (the map's capacity) still needs.
            let chunk = (self.chunk as usize)
                .min(bound.saturating_sub(out.len()))
                .max(at_least);
            self.keys.resize(chunk * key_size, 0);
            self.values.resize(chunk * self.cpus, 0);
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { cursor.as_mut_ptr() as u64 },
                out_batch: next.as_mut_ptr() as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: chunk as u32,
                map_fd: fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            // SAFETY: `attr` is a valid `bpf_attr` prefix of the size
            // passed; the kernel writes at most `count` keys and values into
            // the buffers, which hold that many, and one cursor into `next`.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut BatchAttr,
                    std::mem::size_of::<BatchAttr>() as u32,
                )
            };
            let error = (ret < 0).then(io::Error::last_os_error);
            let done = match error.as_ref().and_then(io::Error::raw_os_error) {
                None => false,
                // The last batch: `count` entries were still written.
                Some(libc::ENOENT) => true,
                // A bucket larger than the chunk: ask for more at once.
                Some(libc::ENOSPC) if chunk < MAX_VALUES / self.cpus => {
                    at_least = chunk * 2;
                    self.chunk = self.chunk.max(at_least as u32);
                    continue;
                }
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if first => return Ok(false),
                Some(_) => return Err(error.unwrap_or_else(io::Error::last_os_error)),
            };
            for i in 0..(attr.count as usize).min(chunk) {
                // SAFETY: the kernel wrote `count` keys of `K`'s size; `K`
                // is plain data (every bit pattern valid, as aya's `Pod`).
                let key: K = unsafe {
                    std::ptr::read_unaligned(self.keys.as_ptr().add(i * key_size).cast::<K>())
                };
                let sum = self.values[i * self.cpus..(i + 1) * self.cpus]
                    .iter()
                    .fold(0u64, |a, v| a.wrapping_add(*v));
                out.insert(key, sum);
            }
            if done || out.len() >= bound {
                return Ok(true);
            }
            cursor = next;
            first = false;
        }
    }
}
