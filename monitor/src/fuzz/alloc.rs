//! An allocation guard for fuzzing: a global allocator (installed by the
//! `popek` binary, see `main.rs`) that forwards to the system allocator and,
//! while armed, counts live heap bytes, keeps their peak, and aborts the
//! process on a single request above [`ABORT_ABOVE`].
//!
//! Why: a parser that trusts a length field allocates what the input asks
//! for. A huge request must not take the machine down or pass unnoticed,
//! and a slow leak (a device queue that grows with every access) must show
//! up as a figure. The abort is caught by the fuzz supervisor, which keeps
//! the input that was running ([`super::supervise`]). Unarmed, the cost is
//! one relaxed atomic load per allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A single allocation above this many bytes aborts an armed process.
pub const ABORT_ABOVE: usize = 1 << 30;

static INSTALLED: AtomicBool = AtomicBool::new(false);
static ARMED: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The guard allocator; `#[global_allocator] static A: GuardAlloc = GuardAlloc;`.
pub struct GuardAlloc;

impl GuardAlloc {
    #[inline]
    fn before(&self, size: usize) {
        if !ARMED.load(Ordering::Relaxed) {
            return;
        }
        if size > ABORT_ABOVE {
            too_large(size);
        }
        let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
        PEAK.fetch_max(live, Ordering::Relaxed);
    }

    #[inline]
    fn after_free(&self, size: usize) {
        if ARMED.load(Ordering::Relaxed) {
            // Blocks allocated before arming are freed too: saturate at 0.
            let _ = LIVE.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(l.saturating_sub(size)));
        }
    }
}

/// Reports the request without allocating and aborts.
#[cold]
fn too_large(size: usize) -> ! {
    let mut msg = *b"popek fuzz: allocation of 0x0000000000000000 bytes is above the guard's limit: aborting\n";
    let digits = b"0123456789abcdef";
    for i in 0..16 {
        msg[28 + i] = digits[(size >> (60 - 4 * i)) & 0xF];
    }
    // SAFETY: writes a stack buffer of its own length to fd 2; no Rust
    // object owns fd 2 in a way this could disturb.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    std::process::abort()
}

// SAFETY: every method forwards to `System` with the caller's layout and
// pointer unchanged; the bookkeeping around it touches only atomics.
unsafe impl GlobalAlloc for GuardAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        self.before(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        self.before(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.after_free(layout.size());
        // SAFETY: `ptr` came from `System` (every allocation goes there) with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.before(new_size);
        self.after_free(layout.size());
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Whether the guard is the process's allocator (false in unit tests).
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Starts counting (and guarding) allocations.
pub fn arm() {
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
}

/// Stops counting.
pub fn disarm() {
    ARMED.store(false, Ordering::Relaxed);
}

/// Heap bytes allocated since arming and not yet freed (approximately:
/// frees of older blocks are subtracted too, saturating).
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Sets the peak to the current live figure; returns that figure.
pub fn reset_peak() -> usize {
    let l = live();
    PEAK.store(l, Ordering::Relaxed);
    l
}

/// The highest live figure since the last [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}
