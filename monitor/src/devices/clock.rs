//! Time sources for the devices: a monotonic clock that drives the PIT and the
//! RTC, and a wall clock read once to set the RTC's date.
//!
//! The host clocks serve normal runs; `ManualClock` serves tests and the
//! deterministic mode, where virtual time is derived from instruction counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A monotonic clock in nanoseconds from an arbitrary origin.
pub trait Clock: Send + Sync {
    fn now_ns(&self) -> u64;
}

/// Wall-clock time, nanoseconds since the Unix epoch (UTC).
pub trait WallClock: Send + Sync {
    fn now_unix_ns(&self) -> u64;
}

/// The host's CLOCK_MONOTONIC (`Instant` on Linux), from the moment of creation.
#[derive(Debug, Clone, Copy)]
pub struct HostClock {
    origin: Instant,
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl HostClock {
    pub fn new() -> Self {
        Self { origin: Instant::now() }
    }
}

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The host's CLOCK_REALTIME.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostWallClock;

impl WallClock for HostWallClock {
    fn now_unix_ns(&self) -> u64 {
        let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to: tests and deterministic runs.
/// Clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    ns: Arc<AtomicU64>,
}

impl ManualClock {
    pub fn new(start_ns: u64) -> Self {
        Self { ns: Arc::new(AtomicU64::new(start_ns)) }
    }

    pub fn set(&self, ns: u64) {
        self.ns.store(ns, Ordering::SeqCst);
    }

    pub fn advance(&self, ns: u64) {
        self.ns.fetch_add(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.ns.load(Ordering::SeqCst)
    }
}

impl WallClock for ManualClock {
    fn now_unix_ns(&self) -> u64 {
        self.ns.load(Ordering::SeqCst)
    }
}

/// The host TSC's frequency in Hz, measured once against CLOCK_MONOTONIC
/// and rounded to kHz. The guest's TSC is the host's in normal runs, so
/// this is what CPUID leaves 0x15/0x16 announce.
///
/// Each end of the 5 ms interval is the clock read whose two surrounding
/// TSC reads are closest (of 64 tries): its uncertainty is tens of
/// nanoseconds, a few parts per million of the interval. A plain sleep
/// between two unbracketed reads needed 50 ms for the same precision, and
/// every `popek run` paid it at start-up (with another 20 ms for the
/// statistics' own rate): 70 of the 80 ms a small guest took.
///
/// The result is kept in the cache directory per host boot (the TSC's
/// rate is fixed for a boot: constant-TSC hosts are all Popek runs on), so
/// only a boot's first run sleeps: the 5 ms were a third of a small
/// guest's whole run, and the fuzzers start one VM per input.
pub fn host_tsc_hz() -> u64 {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        let entry = crate::cache::dir().map(|d| d.join("host-tsc"));
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok();
        let boot = boot.as_deref().map(str::trim).filter(|b| !b.is_empty());
        if let (Some(path), Some(boot)) = (&entry, boot) {
            if let Some(hz) = std::fs::read_to_string(path).ok().and_then(|s| cached_tsc_hz(&s, boot)) {
                return hz;
            }
        }
        let hz = measure_tsc_hz();
        if let (Some(path), Some(boot)) = (&entry, boot) {
            let line = format!("{boot} {hz}\n");
            if let Err(e) = crate::cache::write_atomically(path, &[line.as_bytes()]) {
                tracing::debug!(path = %path.display(), error = %e, "cannot cache the TSC calibration");
            }
        }
        hz
    })
}

/// The rate a cache entry (`<boot id> <Hz>`) gives for boot `boot`, when it
/// is this boot's and plausible (1 MHz to 100 GHz).
fn cached_tsc_hz(entry: &str, boot: &str) -> Option<u64> {
    let mut words = entry.split_whitespace();
    if words.next()? != boot {
        return None;
    }
    let hz: u64 = words.next()?.parse().ok()?;
    (words.next().is_none() && (1_000_000..=100_000_000_000).contains(&hz)).then_some(hz)
}

/// Measures the TSC against CLOCK_MONOTONIC over 5 ms.
fn measure_tsc_hz() -> u64 {
    let (c0, t0) = bracketed_sample();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let (c1, t1) = bracketed_sample();
    let ns = t1.saturating_sub(t0).max(1);
    let hz = u128::from(c1.wrapping_sub(c0)) * 1_000_000_000 / u128::from(ns);
    let hz = u64::try_from(hz).unwrap_or(u64::MAX);
    (hz + 500) / 1000 * 1000
}

/// One (TSC, CLOCK_MONOTONIC ns) pair: the TSC taken as the middle of the
/// tightest of 64 `rdtsc; clock_gettime; rdtsc` brackets.
fn bracketed_sample() -> (u64, u64) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    // SAFETY: RDTSC has no preconditions in user mode on x86-64 Linux.
    let rdtsc = || unsafe { std::arch::x86_64::_rdtsc() };
    let mut best = (u64::MAX, 0, 0);
    for _ in 0..64 {
        let a = rdtsc();
        let t = start.elapsed().as_nanos() as u64;
        let b = rdtsc();
        let width = b.wrapping_sub(a);
        if width < best.0 {
            best = (width, a + width / 2, t);
        }
    }
    (best.1, best.2)
}

/// Guest time in the deterministic mode: a function of the retired
/// instruction count (one nanosecond per instruction, a 1 GHz TSC) plus the
/// time not covered by instructions (idle skips while the guest halted, a
/// fixed cost per TSC read), itself a function of the execution. Nothing of the host's clock
/// enters, so a replay sees the same time at the same instruction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtualTime {
    pub idle_ns: u64,
}

impl VirtualTime {
    /// Nanoseconds of guest time at instruction count `retired`.
    pub fn ns(&self, retired: u64) -> u64 {
        retired.saturating_add(self.idle_ns)
    }
    /// The guest's TSC at `retired` (1 GHz).
    pub fn tsc(&self, retired: u64) -> u64 {
        self.ns(retired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_clocks_move_forward() {
        let c = HostClock::new();
        let a = c.now_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(c.now_ns() >= a + 2_000_000);
        // After 2020-01-01.
        assert!(HostWallClock.now_unix_ns() > 1_577_836_800 * 1_000_000_000);
    }

    /// The 5 ms calibration agrees with one over 200 ms (both bracketed)
    /// to 100 parts per million: the guest's clock would drift 9 s a day
    /// at that bound, against the 0.1 % of a plain short sleep.
    #[test]
    fn the_short_tsc_calibration_matches_a_long_one() {
        let quick = measure_tsc_hz();
        let (c0, t0) = bracketed_sample();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let (c1, t1) = bracketed_sample();
        let long = u128::from(c1 - c0) * 1_000_000_000 / u128::from(t1 - t0);
        let ppm = (i128::from(quick) - long as i128).abs() * 1_000_000 / long as i128;
        eprintln!("TSC: {quick} Hz (5 ms) against {long} Hz (200 ms): {ppm} ppm");
        assert!(ppm < 100, "{quick} Hz against {long} Hz");
    }

    /// Only this boot's entry, whole and plausible, is used.
    #[test]
    fn tsc_cache_entries_belong_to_one_boot() {
        assert_eq!(cached_tsc_hz("abc 2300000000\n", "abc"), Some(2_300_000_000));
        assert_eq!(cached_tsc_hz("abc 2300000000\n", "abd"), None);
        assert_eq!(cached_tsc_hz("abc 23000", "abc"), None);
        assert_eq!(cached_tsc_hz("abc 2300000000 7", "abc"), None);
        assert_eq!(cached_tsc_hz("abc", "abc"), None);
        assert_eq!(cached_tsc_hz("abc -5", "abc"), None);
        assert_eq!(cached_tsc_hz("", "abc"), None);
    }

    #[test]
    fn manual_clock_clones_share_time() {
        let c = ManualClock::new(5);
        let d = c.clone();
        c.advance(10);
        assert_eq!(d.now_ns(), 15);
        d.set(100);
        assert_eq!(Clock::now_ns(&c), 100);
    }
}
