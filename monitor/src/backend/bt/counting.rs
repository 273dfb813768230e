//! The instruction counter of the deterministic mode (docs/record-replay.md):
//! retired guest instructions, the stops the run loop asked for, and guest
//! time derived from the count. Off outside that mode, where every method is
//! a no-op, so the rest of the backend never asks whether it counts.

use engine::vmm_area;

use crate::devices::clock::VirtualTime;

/// Guest nanoseconds one RDTSC takes in the counting mode. Delay loops spin
/// on the TSC; at one nanosecond per instruction they would need a callout
/// per ten nanoseconds of guest time. A real TSC read under a VMM that
/// traps it costs about this much too.
const RDTSC_NS: u64 = 1000;

/// The counting state.
#[derive(Clone, Copy, Debug, Default)]
struct State {
    /// Guest instructions retired (exact whenever the monitor has control).
    retired: u64,
    /// Stop (`VmExit::Interrupted`) when `retired` reaches this.
    stop_at: Option<u64>,
    /// ... or when guest time reaches this.
    stop_ns: Option<u64>,
    /// The budget as the TC last saw it: what was charged is the difference.
    budget_seen: i32,
    /// Guest time not covered by instructions: idle skips and TSC reads.
    time: VirtualTime,
}

impl State {
    fn now_ns(&self) -> u64 {
        self.time.ns(self.retired)
    }

    /// Instructions the guest may retire before a stop (0: stop now).
    fn left(&self) -> u64 {
        let by_count = self.stop_at.map_or(u64::MAX, |s| s.saturating_sub(self.retired));
        let by_time = self.stop_ns.map_or(u64::MAX, |s| s.saturating_sub(self.now_ns()));
        by_count.min(by_time)
    }
}

/// What the TC may retire before the next stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// Not counting.
    Unlimited,
    /// The stop is reached already.
    StopNow,
    /// This many instructions (at most `vmm_area::BUDGET_MAX`).
    Upto(i32),
}

/// The counter: present in the deterministic mode only.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counter(Option<State>);

impl Counter {
    pub fn new(on: bool) -> Counter {
        Counter(on.then(State::default))
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Guest instructions retired (`None` when not counting).
    pub fn retired(&self) -> Option<u64> {
        self.0.map(|c| c.retired)
    }

    /// Guest time now (`None` when not counting).
    pub fn now_ns(&self) -> Option<u64> {
        self.0.as_ref().map(State::now_ns)
    }

    /// Instructions left before a stop (`None` when not counting).
    pub fn left(&self) -> Option<u64> {
        self.0.as_ref().map(State::left)
    }

    /// The budget for the next TC entry.
    pub fn budget(&self) -> Budget {
        match self.left() {
            None => Budget::Unlimited,
            Some(0) => Budget::StopNow,
            Some(left) => Budget::Upto(left.min(vmm_area::BUDGET_MAX as u64) as i32),
        }
    }

    /// The TC is entered with `budget` in the vCPU page.
    pub fn entered(&mut self, budget: i32) {
        if let Some(c) = self.0.as_mut() {
            c.budget_seen = budget;
        }
    }

    /// Adds what the TC charged since the last look (`now`: the budget the
    /// vCPU page holds).
    pub fn settle(&mut self, now: i32) {
        if let Some(c) = self.0.as_mut() {
            c.retired = c.retired.wrapping_add((i64::from(c.budget_seen) - i64::from(now)) as u64);
            c.budget_seen = now;
        }
    }

    /// The TC left a block after `done` of its `charged` instructions
    /// (entries charge the whole block up front).
    pub fn refund(&mut self, charged: u32, done: u32) {
        if let Some(c) = self.0.as_mut() {
            c.retired -= u64::from(charged.saturating_sub(done));
        }
    }

    /// The monitor completed one guest instruction.
    pub fn retire(&mut self) {
        if let Some(c) = self.0.as_mut() {
            c.retired += 1;
        }
    }

    /// A TSC read by the guest: guest time moves on by [`RDTSC_NS`].
    pub fn tsc_read(&mut self) {
        if let Some(c) = self.0.as_mut() {
            c.time.idle_ns += RDTSC_NS;
        }
    }

    /// Guest time jumps `ns` ahead (idling in HLT).
    pub fn skip(&mut self, ns: u64) {
        if let Some(c) = self.0.as_mut() {
            c.time.idle_ns += ns;
        }
    }

    /// Sets the stops (by count, by guest time).
    pub fn set_stop(&mut self, count: Option<u64>, ns: Option<u64>) {
        if let Some(c) = self.0.as_mut() {
            c.stop_at = count;
            c.stop_ns = ns;
        }
    }

    /// The guest's TSC base in the counting mode (`None`: use the host's).
    pub fn tsc(&self) -> Option<u64> {
        self.0.map(|c| c.time.tsc(c.retired))
    }
}
