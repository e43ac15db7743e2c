//! The `COUNT_SLOTS` counters, mapped into the loader and read in place.
//!
//! The eBPF program keeps one `u64` per CPU and slot, CPU by CPU (this
//! CPU's counters at `cpu * stride`, the stride a whole number of cache
//! lines), in an array created with `BPF_F_MMAPABLE` (Linux 5.5). Reading a
//! per-CPU array instead costs a system call in which the kernel copies
//! every element out one by one, with a hardened-usercopy check each: about
//! 190 ns an element here, a fifth of the loader's CPU with 1000 functions
//! read four times a second. Mapped, a reading is a few loads per slot.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Array, IterableMap as _, MapData};

/// Counters per cache line: the stride is a multiple of this, so two CPUs
/// never write one line.
const PER_LINE: u32 = 8;

/// Slots per CPU for `slots` slots.
pub fn stride(slots: u32) -> u32 {
    slots.div_ceil(PER_LINE).max(1) * PER_LINE
}

pub struct SlotCounters {
    /// Keeps the map (and so the mapping's memory) alive.
    _map: Array<MapData, u64>,
    base: NonNull<AtomicU64>,
    /// Bytes mapped.
    len: usize,
    stride: usize,
    cpus: usize,
}

// SAFETY: `base` points into a shared mapping this value owns (unmapped in
// `Drop`); it is only read and written through atomics.
unsafe impl Send for SlotCounters {}

impl SlotCounters {
    /// Maps `map`, which holds `stride * cpus` counters.
    pub fn map(map: Array<MapData, u64>, stride: u32, cpus: usize) -> io::Result<Self> {
        let counters = stride as usize * cpus;
        let page = crate::probes::page_size() as usize;
        let len = (counters * 8).div_ceil(page) * page;
        // SAFETY: a new shared mapping of the map's descriptor, whose data
        // the kernel page-aligned for this (BPF_F_MMAPABLE); the result is
        // checked before use.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.map().fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(at.cast::<AtomicU64>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self {
            _map: map,
            base,
            len,
            stride: stride as usize,
            cpus,
        })
    }

    fn counter(&self, cpu: usize, slot: u32) -> &AtomicU64 {
        // Checked in every build: the pointer arithmetic below rests on it.
        assert!(
            (slot as usize) < self.stride && cpu < self.cpus,
            "counter slot {slot} of CPU {cpu} is outside the mapped array"
        );
        // SAFETY: cpu < cpus and slot < stride, so the index is inside the
        // `stride * cpus` counters mapped; the mapping lives as long as
        // `self` and its u64s are aligned (page-aligned start).
        unsafe { self.base.add(cpu * self.stride + slot as usize).as_ref() }
    }

    /// Calls counted at `slot`, over every CPU.
    pub fn sum(&self, slot: u32) -> u64 {
        (0..self.cpus)
            .map(|cpu| self.counter(cpu, slot).load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    }

    /// Sets `slot` back to zero on every CPU (its links must be gone).
    pub fn zero(&self, slot: u32) {
        for cpu in 0..self.cpus {
            self.counter(cpu, slot).store(0, Ordering::Relaxed);
        }
    }
}

impl Drop for SlotCounters {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of `len` bytes, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stride_is_whole_cache_lines_and_holds_every_slot() {
        assert_eq!(stride(0), 8);
        assert_eq!(stride(1), 8);
        assert_eq!(stride(8), 8);
        assert_eq!(stride(9), 16);
        assert_eq!(stride(1000), 1000);
        assert_eq!(stride(1001), 1008);
    }
}
