//! An allocator for the fuzz suites, to check that decoding allocates what its input justifies.
//!
//! A test binary installs it (`#[global_allocator] static A: CappedAlloc = CappedAlloc;`, in the
//! test file: the testkit never installs it for its other users) and wraps each decode in
//! [`largest_allocation`], which returns the largest single request the calling thread made
//! meanwhile; the suite compares it with what the input's size justifies. A request over
//! [`HARD_LIMIT`] is never attempted, on any thread: the allocator refuses it and the standard
//! library aborts the process naming the size ("memory allocation of N bytes failed"), so a
//! corrupt length can neither take the machine's memory nor hide behind lazy overcommit.
//!
//! Only the calling thread is measured (the decoders under test run on it; work they hand to a
//! thread pool is bounded by the hard limit only), so parallel tests do not see each other's
//! allocations.

// The one unsafe item of the tests: a `GlobalAlloc` forwarding to the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// No single allocation above this (2 GiB) is attempted while [`CappedAlloc`] is installed.
pub const HARD_LIMIT: usize = 1 << 31;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, refusing requests over [`HARD_LIMIT`] and noting each thread's largest
/// request (see the module docs).
pub struct CappedAlloc;

/// Notes a request of `size` bytes; whether to attempt it.
fn note(size: usize) -> bool {
    // `try_with`: the thread-local may be gone while a thread's destructors run.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
    size <= HARD_LIMIT
}

// SAFETY: every method forwards to `System` with the caller's arguments, or returns null (which
// `GlobalAlloc` allows for a failed allocation) without touching memory.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged (the caller upholds `alloc`'s contract).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !note(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` and returns its result with the largest single allocation (bytes) the calling thread
/// requested meanwhile; 0 unless [`CappedAlloc`] is the global allocator.
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let outer = LARGEST.with(|l| l.replace(0));
    let result = f();
    let largest = LARGEST.with(|l| l.replace(outer.max(l.get())));
    (result, largest)
}
