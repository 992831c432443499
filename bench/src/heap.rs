//! A counting wrapper around mimalloc (the allocator the `ferry` binary runs
//! on, so in-process timings see the allocator the agent has): live heap
//! bytes, counted only while switched on, so the timed phases run without its
//! overhead.
//!
//! The `socket_lb` binary installs it as `#[global_allocator]`; the
//! programming benchmark switches it on for a separate pass that rebuilds the
//! ClusterState, Plan and Programmer and reads how much each one holds.

use mimalloc::MiMalloc;
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

static ON: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grow(by: isize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

/// The allocator; see the module documentation.
pub struct CountingAlloc;

// SAFETY: every call is forwarded unchanged to mimalloc; the
// counter only observes sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            grow(layout.size() as isize);
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ON.load(Ordering::Relaxed) {
            LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            grow(layout.size() as isize);
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            grow(new_size as isize - layout.size() as isize);
        }
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { MiMalloc.realloc(ptr, layout, new_size) }
    }
}

/// Starts counting from zero. Memory allocated before is invisible, and so
/// is its release: count a pass that allocates and frees its own objects.
pub fn start() {
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
    ON.store(true, Ordering::Relaxed);
}

/// Stops counting.
pub fn stop() {
    ON.store(false, Ordering::Relaxed);
}

/// Bytes allocated and not freed since `start` (only meaningful while counting,
/// and only when this allocator is the global one).
pub fn live_bytes() -> i64 {
    LIVE.load(Ordering::Relaxed) as i64
}

/// The highest `live_bytes` since `start`.
pub fn peak_bytes() -> i64 {
    PEAK.load(Ordering::Relaxed) as i64
}
