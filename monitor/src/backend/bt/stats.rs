//! The bt backend's counters, with stable names, and where the time went
//! (in TSC cycles: reading the clock through the vDSO cost a quarter of a
//! callout here).

use engine::callout::CalloutKind;
use engine::Engine;
use shadow_mmu::ShadowMmu;

/// Counters with stable names, plus where the time went.
#[derive(Clone, Debug, Default)]
pub struct BtStats {
    /// Exit counts by name (a short list: a linear scan beats hashing).
    pub exits: Vec<(&'static str, u64)>,
    pub cycles_direct: u64,
    pub cycles_translated: u64,
    pub cycles_total: u64,
    /// Monitor time per callout kind: how many were handled in the hook
    /// (resuming the TC from the exit path) and by the run loop, and the
    /// cycles each path spent from the exit to the next entry (the exit
    /// and entry paths themselves excluded).
    pub callouts: Vec<(CalloutKind, CalloutTime)>,
}

/// Where one callout kind's time went.
#[derive(Clone, Copy, Debug, Default)]
pub struct CalloutTime {
    pub hooked: u64,
    pub hooked_cycles: u64,
    pub looped: u64,
    pub looped_cycles: u64,
}

impl BtStats {
    /// Counts one exit (or event) named `what`.
    pub(super) fn count(&mut self, what: &'static str) {
        match self.exits.iter_mut().find(|e| e.0 == what) {
            Some(e) => e.1 += 1,
            None => self.exits.push((what, 1)),
        }
    }

    /// Counts `n` events named `what`.
    pub(super) fn add(&mut self, what: &'static str, n: u64) {
        match self.exits.iter_mut().find(|e| e.0 == what) {
            Some(e) => e.1 += n,
            None => self.exits.push((what, n)),
        }
    }

    /// `cycles` of monitor time for one callout of `kind`, in the hook or
    /// the run loop.
    pub(super) fn charge_callout(&mut self, kind: CalloutKind, cycles: u64, hooked: bool) {
        let i = match self.callouts.iter().position(|e| e.0 == kind) {
            Some(i) => i,
            None => {
                self.callouts.push((kind, CalloutTime::default()));
                self.callouts.len() - 1
            }
        };
        let t = &mut self.callouts[i].1;
        if hooked {
            t.hooked += 1;
            t.hooked_cycles += cycles;
        } else {
            t.looped += 1;
            t.looped_cycles += cycles;
        }
    }

    /// `cycles` spent in guest-mode code, direct or translated.
    pub(super) fn charge_guest(&mut self, translated: bool, cycles: u64) {
        if translated {
            self.cycles_translated += cycles;
        } else {
            self.cycles_direct += cycles;
        }
    }

    /// Every counter of the backend, the engine's and the MMU's, by name.
    pub(super) fn listing(&self, engine: &Engine, mmu: &ShadowMmu, ldt_writes: u64) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.exits.iter().map(|(k, n)| (format!("bt/exits/{k}"), *n)).collect();
        let e = engine.stats();
        v.push(("engine/blocks_translated".into(), e.blocks_translated));
        v.push(("engine/user_blocks_translated".into(), e.user_blocks_translated));
        v.push(("engine/guest_bytes".into(), e.guest_bytes_translated));
        v.push(("engine/tc_bytes".into(), e.tc_bytes_used));
        v.push(("engine/exits_unchained".into(), e.exits_unchained));
        v.push(("engine/indirect_misses".into(), e.indirect_misses));
        v.push(("engine/indirect_conflicts".into(), e.indirect_conflicts));
        v.push(("engine/invalidations".into(), e.invalidations));
        v.push(("engine/blocks_invalidated".into(), e.blocks_invalidated));
        v.push(("engine/blocks_parked".into(), e.blocks_parked));
        v.push(("engine/blocks_revived".into(), e.blocks_revived));
        v.push(("engine/guard_refreshes".into(), e.guard_refreshes));
        v.push(("engine/guard_stops".into(), e.guard_stops));
        v.push(("engine/flushes".into(), e.flushes));
        for (k, n) in &e.callouts_taken {
            v.push((format!("engine/callouts/{k}"), *n));
        }
        let m = mmu.stats();
        v.push(("mmu/hidden_faults".into(), m.hidden_faults));
        v.push(("mmu/guest_page_faults".into(), m.guest_page_faults));
        // Every shadow-MMU counter that moved, under its stable name.
        v.extend(m.counters().iter().filter(|(_, n)| *n != 0).map(|(k, n)| ((*k).to_string(), *n)));
        v.push(("bt/ldt_writes".into(), ldt_writes));
        let us = |cycles: u64| (cycles as f64 / tsc_per_us()) as u64;
        v.push(("bt/time_direct_us".into(), us(self.cycles_direct)));
        v.push(("bt/time_translated_us".into(), us(self.cycles_translated)));
        let guest = self.cycles_direct + self.cycles_translated;
        v.push(("bt/time_monitor_us".into(), us(self.cycles_total.saturating_sub(guest))));
        // Per callout kind: how many took each path and the mean monitor
        // time of one (hook time is inside time_translated_us).
        let ns_each =
            |cycles: u64, n: u64| if n == 0 { 0 } else { (cycles as f64 * 1e3 / tsc_per_us() / n as f64) as u64 };
        let mut hook_cycles = 0;
        for (kind, t) in &self.callouts {
            let name = kind.name();
            hook_cycles += t.hooked_cycles;
            if t.hooked != 0 {
                v.push((format!("bt/callouts/{name}/hooked"), t.hooked));
                v.push((format!("bt/callouts/{name}/hooked_ns_each"), ns_each(t.hooked_cycles, t.hooked)));
            }
            if t.looped != 0 {
                v.push((format!("bt/callouts/{name}/looped"), t.looped));
                v.push((format!("bt/callouts/{name}/looped_ns_each"), ns_each(t.looped_cycles, t.looped)));
            }
        }
        v.push(("bt/time_hooks_us".into(), us(hook_cycles)));
        v.sort();
        v
    }
}

/// Host TSC cycles per microsecond: the rate the guest's CPUID announces,
/// measured once per process ([`crate::devices::clock::host_tsc_hz`]).
pub(super) fn tsc_per_us() -> f64 {
    crate::devices::clock::host_tsc_hz() as f64 / 1e6
}

pub(super) fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions in user mode on this host.
    unsafe { std::arch::x86_64::_rdtsc() }
}
