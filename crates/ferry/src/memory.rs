//! How the agent's process hands memory back to the kernel.
//!
//! The agent reads objects on one thread (a source), keeps a compact copy on
//! another (the sync thread) and frees the originals there. mimalloc gives a
//! page back only when the thread that owns it next touches its heap, so a
//! thread that goes quiet after start-up (the manifest watcher, a runtime
//! worker that parsed the list responses) kept tens of MiB of freed pages
//! resident for good. Each such thread now collects its own heap when it goes
//! idle, at most once per [`IDLE_COLLECT_EVERY`].
//!
//! Transparent huge pages are turned off for the process: mimalloc asks for
//! them on its arenas, and a 2 MiB page that backs a few live objects is
//! resident whole (13 MiB of the RSS at 100k services). An agent on every
//! node is judged by its RSS, not by TLB misses.
//!
//! Freed pages are given back after 1 ms instead of mimalloc's 10: a
//! start-up frees as fast as it allocates (each object read, then dropped
//! for its compact form; a full sync's batch), and at 10 ms that garbage
//! stacked up to the peak (peak RSS at 100k services 256-260 -> 235 MiB).

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The least time between two collections on one thread.
pub const IDLE_COLLECT_EVERY: Duration = Duration::from_secs(1);

thread_local! {
    static LAST_COLLECT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Gives this thread's free pages back to the kernel, unless it did so less
/// than [`IDLE_COLLECT_EVERY`] ago. For a thread about to wait (tokio's
/// `on_thread_park`, the manifest watcher between batches).
pub fn release_idle() {
    let now = Instant::now();
    let due = LAST_COLLECT.with(|last| match last.get() {
        Some(t) if now.duration_since(t) < IDLE_COLLECT_EVERY => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        release_now();
    }
}

/// Gives this thread's free pages back to the kernel now (after a large sync).
pub fn release_now() {
    // SAFETY: mi_collect only releases free memory; no pointer is invalidated.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_t` (the Rust
/// bindings do not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The process's memory settings, first thing in `main`: transparent huge
/// pages off and a short purge delay (see the module documentation).
pub fn configure() {
    no_huge_pages();
    // SAFETY: sets one of mimalloc's options; any value is valid for it.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1) };
}

/// Turns transparent huge pages off for this process (and what it starts);
/// see the module documentation. Best effort: a kernel without the prctl
/// keeps them, which costs memory, not correctness.
fn no_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only this process's flag.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!("cannot turn transparent huge pages off: {}", std::io::Error::last_os_error());
    }
}
