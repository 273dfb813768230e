//! Warnings a guest can trigger at will (an unknown MSR, a PIC mode Popek
//! does not model, a broken virtio ring): logged, but never as a flood. A
//! guest loop that hits one a million times must not fill the host's
//! stderr or its journal (found by the `storm` fuzz target, which saw one
//! i8259 warning per port write). Each call site logs its first
//! [`RateLimit::FIRST`] occurrences, then only the 2^k-th, with the count.

use std::sync::atomic::{AtomicU64, Ordering};

/// One call site's occurrence counter.
pub struct RateLimit(AtomicU64);

impl RateLimit {
    /// Occurrences logged one by one before the thinning starts.
    pub const FIRST: u64 = 8;

    pub const fn new() -> RateLimit {
        RateLimit(AtomicU64::new(0))
    }

    /// Counts one occurrence; `Some(n)` (its number) when it is to be logged.
    pub fn hit(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        (n <= Self::FIRST || n.is_power_of_two()).then_some(n)
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new()
    }
}

/// `tracing::warn!` for what a guest controls, thinned per call site by a
/// [`RateLimit`]; the event carries `occurrences`.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::guest_log::RateLimit = $crate::guest_log::RateLimit::new();
        if let Some(occurrences) = LIMIT.hit() {
            tracing::warn!(occurrences, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_hits_log_a_few_dozen_times() {
        let l = RateLimit::new();
        let logged: Vec<u64> = (0..1_000_000).filter_map(|_| l.hit()).collect();
        // 1..=8, then 16, 32, ..., 2^19.
        let mut want: Vec<u64> = (1..=8).collect();
        want.extend((4..20).map(|k| 1u64 << k));
        assert_eq!(logged, want);
    }
}
