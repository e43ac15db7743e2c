//! The `cacheloop` binary's allocator: dlmalloc for the small and
//! middle-sized allocations a run makes every interval, the C library's
//! (musl's, in the static release build) for the large ones.
//!
//! Why not musl's alone: its allocator (mallocng) hands freed memory back
//! to the kernel at once. The loader makes the same allocations every
//! interval (records, events, a snapshot's vectors), so with 1000
//! functions musl mapped and unmapped groups of them ~40 times a second:
//! ~150 page faults a second, and a TLB shootdown for each unmap. Measured
//! side by side (1000 functions, 10,000 calls a second, every hit counted,
//! three runs each): 0.52-0.57% of a core with musl's allocator alone,
//! 0.41-0.44% with this one. dlmalloc keeps what an interval frees for the
//! next (it gives the top of its heap back past 2 MiB).
//!
//! Why not dlmalloc alone: it has no separate path for large blocks. A
//! large vector grown in place by musl (`mremap`) is copied by dlmalloc,
//! its old block kept for later; a zeroed one carved from memory used
//! before is written with zeros, where a fresh mapping's untouched pages
//! are never faulted in (the symbol tables' buffer, `symbols.rs`). Through
//! dlmalloc alone the loader's peak RSS rose by 1.5 MiB at one function,
//! and with everything from 1 MiB up left to musl still by 0.3-0.7 MiB at
//! 10,000. Blocks of [`LARGE`] and more go to the C library (musl serves
//! those under ~128 KiB from its groups, maps larger ones itself and grows
//! them with `mremap`): peak RSS +0.25 MiB at 10,000 functions against musl
//! alone, the CPU the same as with 1 MiB within the noise.
//!
//! No allocation happens between fork and exec (`gate.rs`, `hooks.rs`);
//! `main` still has dlmalloc take its lock across a fork, so that one
//! added later cannot find it held by a thread the child does not have.
//!
//! dlmalloc gives memory back only from the top of its heap (past 2 MiB)
//! or whole segments: small blocks freed after a burst stay resident, to
//! be reused. `cargo xtask bench --soak` measures RSS over a long run.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks this size and larger go to the C library.
const LARGE: usize = 1 << 16;

pub struct Heap;

/// Which allocator holds blocks of this layout. The same answer for a
/// block's allocation and its free, as both see the same layout.
fn large(size: usize) -> bool {
    size >= LARGE
}

// SAFETY: every block goes back to the allocator that gave it, picked by
// its size, which the caller passes unchanged to `dealloc` and `realloc`
// (the `GlobalAlloc` contract); a `realloc` across [`LARGE`] moves the
// block between them.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded under the same contract.
        unsafe {
            if large(layout.size()) {
                System.alloc(layout)
            } else {
                dlmalloc::GlobalDlmalloc.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded under the same contract.
        unsafe {
            if large(layout.size()) {
                System.alloc_zeroed(layout)
            } else {
                dlmalloc::GlobalDlmalloc.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from the allocator its size picks.
        unsafe {
            if large(layout.size()) {
                System.dealloc(ptr, layout);
            } else {
                dlmalloc::GlobalDlmalloc.dealloc(ptr, layout);
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from the allocator its size picks; a block
        // crossing [`LARGE`] is copied into the other one, then freed.
        unsafe {
            match (large(layout.size()), large(new_size)) {
                (true, true) => System.realloc(ptr, layout, new_size),
                (false, false) => dlmalloc::GlobalDlmalloc.realloc(ptr, layout, new_size),
                _ => {
                    let new = Layout::from_size_align_unchecked(new_size, layout.align());
                    let moved = self.alloc(new);
                    if !moved.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    moved
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_move_between_the_allocators_with_their_bytes() {
        let heap = Heap;
        let small = Layout::from_size_align(4096, 16).unwrap();
        // SAFETY: each block is used within its size and freed once, with
        // the layout it has at that moment.
        unsafe {
            let p = heap.alloc(small);
            assert!(!p.is_null());
            for i in 0..small.size() {
                *p.add(i) = (i % 251) as u8;
            }
            let p = heap.realloc(p, small, 2 * LARGE);
            assert!(!p.is_null());
            for i in 0..small.size() {
                assert_eq!(*p.add(i), (i % 251) as u8);
            }
            let big = Layout::from_size_align(2 * LARGE, 16).unwrap();
            let p = heap.realloc(p, big, 100);
            assert!(!p.is_null());
            for i in 0..100 {
                assert_eq!(*p.add(i), (i % 251) as u8);
            }
            heap.dealloc(p, Layout::from_size_align(100, 16).unwrap());

            let z = heap.alloc_zeroed(big);
            assert!(!z.is_null());
            assert!((0..big.size()).step_by(4096).all(|i| *z.add(i) == 0));
            heap.dealloc(z, big);
        }
    }
}
