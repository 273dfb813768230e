//! How guest user code runs: directly (native speed, but every system call,
//! exception and page fault is a host trap, 5-9 µs here) or from the TC
//! (kernel entries are callouts that deliver through the guest IDT with no
//! trap, but computing code pays the translation's overhead). The policy
//! chooses per guest address space (CR3), at run time, from what each mode
//! costs that address space:
//!
//! - direct: user time per kernel entry. An address space that enters the
//!   kernel more often than every [`Policy::TO_TRANSLATED_US`] of user time
//!   (a shell loop, a syscall benchmark, fork/exec) is translated;
//! - translated: the length of each stretch of user code between kernel
//!   entries. Stretches longer than [`Policy::TO_DIRECT_US`] on average
//!   (a compression, a sort) go back to direct execution.
//!
//! Both decisions average a window of [`Policy::WINDOW`] events, and the two
//! thresholds are far apart: an address space does not thrash between modes.
//! docs/translator.md ("User code") gives the measurements behind the
//! numbers.

/// `--user-exec`: which mode guest user code runs in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UserExec {
    /// Always directly (the first Popek).
    Direct,
    /// Always from the TC (kernel entries without host traps).
    Translated,
    /// Per address space, from measurements (this module).
    #[default]
    Adaptive,
}

/// One address space's measurements.
#[derive(Clone, Copy, Debug, Default)]
struct Space {
    translated: bool,
    /// Events in the current window and their total user cycles.
    events: u32,
    cycles: u64,
    /// Blocks translated for this space in the current window.
    translations: u64,
    /// Windows to stay direct after translation churn sent it back.
    penalty: u32,
    /// The penalty the next churn gets: doubled by each churn, back to
    /// [`Policy::CHURN_PENALTY`] after a translated window without churn.
    backoff: u32,
    /// Cycles per kernel entry in the last whole window of each mode (0:
    /// not measured): a space goes translated only while that mode is not
    /// known to be dearer, and back to direct as soon as it is. Why: sort's
    /// input loop costs 18 µs per read direct and 65 µs translated, inside
    /// the fixed thresholds' band, and switched back and forth.
    direct_cost: f64,
    translated_cost: f64,
    /// Windows until both costs are forgotten (and measured again).
    forget: u32,
}

/// What the policy did, for `--stats`.
#[derive(Clone, Copy, Debug, Default)]
pub struct PolicyStats {
    pub to_translated: u64,
    pub to_direct: u64,
    /// Kernel entries from direct user code that the policy saw.
    pub direct_entries: u64,
    /// Stretches of translated user code that ended in a kernel entry.
    pub translated_stretches: u64,
}

/// The per-address-space choice.
#[derive(Debug)]
pub struct Policy {
    mode: UserExec,
    /// TSC cycles per µs (the thresholds are in µs).
    tsc_per_us: f64,
    spaces: engine::fxhash::FxHashMap<u32, Space>,
    /// The address space and mode of the last question (the common case:
    /// the same one again).
    last: Option<(u32, bool)>,
    /// When the current stretch of translated user code began, and in
    /// which address space.
    stretch: Option<(u32, u64)>,
    /// Cycles of the current stretch that were not the code's own
    /// (translating it): left out of its length.
    excluded: u64,
    pub stats: PolicyStats,
}

impl Policy {
    /// Events averaged per decision.
    pub const WINDOW: u32 = 32;
    /// Direct user code that enters the kernel more often than this (µs of
    /// user time per entry) runs translated: a trap costs 5-9 µs here, so
    /// below ~20 µs of work per entry the traps dominate.
    pub const TO_TRANSLATED_US: f64 = 20.0;
    /// Translated user code whose stretches between kernel entries average
    /// more than this runs directly again: the TC's overhead on such
    /// stretches outweighs the trap it saves (translated code runs at
    /// 0.35-0.9 of native here, so a 50 µs stretch costs 5-30 µs more
    /// than direct, against a 5-9 µs trap). It was 150 µs while switching
    /// modes parked and revived every block of a process; the user-page
    /// guards made the switch cheap.
    pub const TO_DIRECT_US: f64 = 50.0;
    /// Translated code that needs a new block more often than once per
    /// this many kernel entries goes back to direct...
    const CHURN: u64 = 4;
    /// ... and stays direct for this many windows (fork/exec churn: each
    /// switch to another process drops the user blocks the space had),
    /// twice as many after each churn that follows, up to
    /// [`Self::MAX_PENALTY`]. A Debian boot had address spaces (systemd,
    /// journald) go translated and back 60 times, each time translating
    /// their working set again: 2.5 s more than running all user code
    /// directly, with a fixed penalty.
    const CHURN_PENALTY: u32 = 8;
    const MAX_PENALTY: u32 = 1024;
    /// How much dearer per entry translated windows must measure than
    /// direct ones to count as dearer. The two figures are not the same
    /// quantity: a translated stretch also pays the callouts of code that
    /// just switched (guard stops, revivals, unchained exits), direct
    /// windows leave out the runs that ended in a page fault. With a
    /// factor of 1, 300 fork+exec of /bin/true went from 0.55 to 0.72 s
    /// and the pipe loop from 0.94 to 1.15 s (their translated windows
    /// measured 1.5-2x their direct ones, yet ran faster); sort's input
    /// loop measures 3.6x (18 against 65 µs) and is slower translated.
    const DEARER: f64 = 2.5;
    /// Windows a mode's measured cost is trusted after a switch (a program
    /// changes phase: reading, sorting, writing).
    const FORGET: u32 = 16;
    /// At most this many address spaces remembered (a fork storm must not
    /// grow the map without bound); forgotten ones start direct again.
    const MAX_SPACES: usize = 4096;

    pub fn new(mode: UserExec, tsc_per_us: f64) -> Policy {
        Policy {
            mode,
            tsc_per_us,
            spaces: Default::default(),
            last: None,
            stretch: None,
            excluded: 0,
            stats: PolicyStats::default(),
        }
    }

    pub fn mode(&self) -> UserExec {
        self.mode
    }

    /// Whether user code of address space `cr3` runs translated now.
    pub fn translated(&mut self, cr3: u32) -> bool {
        match self.mode {
            UserExec::Direct => false,
            UserExec::Translated => true,
            UserExec::Adaptive => match self.last {
                Some((c, t)) if c == cr3 => t,
                _ => {
                    let t = self.spaces.get(&cr3).is_some_and(|s| s.translated);
                    self.last = Some((cr3, t));
                    t
                }
            },
        }
    }

    /// `n` blocks of `cr3`'s user code were translated.
    pub fn user_translations(&mut self, cr3: u32, n: u64) {
        if self.mode == UserExec::Adaptive {
            if let Some(s) = self.spaces.get_mut(&cr3) {
                s.translations += n;
            }
        }
    }

    /// Direct user code of `cr3` ran `cycles` and then entered the guest
    /// kernel (a system call, an exception, a guest page fault).
    pub fn direct_entry(&mut self, cr3: u32, cycles: u64) {
        self.stats.direct_entries += 1;
        self.observe(cr3, false, cycles, 1);
    }

    /// Direct user code of `cr3` ran `cycles` and stopped without entering
    /// the kernel (an interrupt, a hidden fault): user time of the window.
    pub fn direct_time(&mut self, cr3: u32, cycles: u64) {
        self.observe(cr3, false, cycles, 0);
    }

    /// Whether a stretch of translated user code is being timed.
    pub fn in_stretch(&self) -> bool {
        self.stretch.is_some()
    }

    /// Translated user code of `cr3` began to run at TSC `now`.
    pub fn stretch_begins(&mut self, cr3: u32, now: u64) {
        if self.mode == UserExec::Adaptive && self.stretch.is_none() {
            self.stretch = Some((cr3, now));
            self.excluded = 0;
        }
    }

    /// `cycles` of the current stretch went to translating its code.
    pub fn exclude(&mut self, cycles: u64) {
        self.excluded = self.excluded.saturating_add(cycles);
    }

    /// The stretch is not one (user code went on directly).
    pub fn stretch_cancel(&mut self) {
        self.stretch = None;
    }

    /// Translated user code left for the kernel at TSC `now`: by its own
    /// doing (`entry`: INT, an exception, a guest page fault) or for an
    /// external interrupt, which says nothing of the code.
    pub fn stretch_ends(&mut self, now: u64, entry: bool) {
        let Some((cr3, start)) = self.stretch.take() else { return };
        if entry {
            self.stats.translated_stretches += 1;
        }
        let cycles = now.wrapping_sub(start).saturating_sub(std::mem::take(&mut self.excluded));
        self.observe(cr3, true, cycles, u32::from(entry));
    }

    /// Translated user code of `cr3` entered the kernel `n` times inline
    /// (INT without an exit) within `cycles` of guest time, kernel time
    /// included: an upper bound on its user time per entry.
    pub fn inline_entries(&mut self, cr3: u32, n: u32, cycles: u64) {
        self.stats.translated_stretches += u64::from(n);
        let cycles = cycles.saturating_sub(std::mem::take(&mut self.excluded));
        self.observe(cr3, true, cycles, n);
    }

    /// Adds `cycles` of user time of `cr3`, in mode `translated`, ending in
    /// a kernel entry or not, to the address space's window; switches mode
    /// when the window says so. Direct code goes translated when a window
    /// of entries averages under [`Self::TO_TRANSLATED_US`]; translated
    /// code goes direct when its average is over [`Self::TO_DIRECT_US`], or
    /// at once when the window's time alone says so (a computing loop
    /// enters the kernel only for interrupts).
    fn observe(&mut self, cr3: u32, translated: bool, cycles: u64, entries: u32) {
        if self.mode != UserExec::Adaptive {
            return;
        }
        if !self.spaces.contains_key(&cr3) && self.spaces.len() >= Self::MAX_SPACES {
            self.spaces.clear();
            self.last = None;
        }
        let (to_translated, to_direct) =
            (Self::TO_TRANSLATED_US * self.tsc_per_us, Self::TO_DIRECT_US * self.tsc_per_us);
        let s = self.spaces.entry(cr3).or_default();
        if s.translated != translated {
            return;
        }
        s.events = s.events.saturating_add(entries);
        s.cycles = s.cycles.saturating_add(cycles);
        let window = f64::from(Self::WINDOW);
        // Translation churn: more than one new block per CHURN entries.
        let churn = translated && s.translations * Self::CHURN > u64::from(s.events.max(1));
        let switch = if s.events < Self::WINDOW && translated && s.cycles as f64 > window * to_direct {
            // Computing between interrupts: no need for a whole window.
            s.translated_cost = s.cycles as f64 / f64::from(s.events.max(1));
            true
        } else if s.events >= Self::WINDOW {
            let avg = s.cycles as f64 / f64::from(s.events);
            s.forget = s.forget.saturating_sub(1);
            if s.forget == 0 {
                // Code changes phase: measure the other mode again.
                (s.direct_cost, s.translated_cost) = (0.0, 0.0);
            }
            if translated {
                if !churn {
                    // A window that paid off: the space earned a fresh start.
                    s.backoff = Self::CHURN_PENALTY;
                }
                s.translated_cost = avg;
                avg > to_direct || churn || (s.direct_cost > 0.0 && avg > Self::DEARER * s.direct_cost)
            } else if s.penalty > 0 {
                s.penalty -= 1;
                false
            } else {
                s.direct_cost = avg;
                avg < to_translated && (s.translated_cost == 0.0 || s.translated_cost < Self::DEARER * avg)
            }
        } else {
            return;
        };
        if switch && churn {
            s.penalty = s.backoff.max(Self::CHURN_PENALTY);
            s.backoff = (s.penalty * 2).min(Self::MAX_PENALTY);
        }
        (s.events, s.cycles, s.translations) = (0, 0, 0);
        if switch {
            s.translated = !translated;
            if s.forget == 0 {
                s.forget = Self::FORGET;
            }
            self.last = None;
            if translated {
                self.stats.to_direct += 1;
            } else {
                self.stats.to_translated += 1;
            }
            tracing::debug!(
                cr3 = format_args!("{cr3:#x}"),
                translated = !translated,
                direct_us = s.direct_cost / self.tsc_per_us,
                translated_us = s.translated_cost / self.tsc_per_us,
                "user-exec policy switched"
            );
        }
    }

    /// The policy's counters, by stable name.
    pub fn counters(&self) -> [(&'static str, u64); 5] {
        [
            ("bt/user_exec/to_translated", self.stats.to_translated),
            ("bt/user_exec/to_direct", self.stats.to_direct),
            ("bt/user_exec/direct_entries", self.stats.direct_entries),
            ("bt/user_exec/translated_stretches", self.stats.translated_stretches),
            ("bt/user_exec/spaces_translated", self.spaces.values().filter(|s| s.translated).count() as u64),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 cycle per µs: thresholds read directly in cycles.
    fn adaptive() -> Policy {
        Policy::new(UserExec::Adaptive, 1.0)
    }

    /// `n` stretches of translated user code of `cr3`, `cycles` each, each
    /// ending in a kernel entry.
    fn stretches(p: &mut Policy, cr3: u32, n: u32, cycles: u64) {
        let mut now = 0;
        for _ in 0..n {
            p.stretch_begins(cr3, now);
            now += cycles;
            p.stretch_ends(now, true);
        }
    }

    #[test]
    fn fixed_modes_ignore_measurements() {
        let mut d = Policy::new(UserExec::Direct, 1.0);
        let mut t = Policy::new(UserExec::Translated, 1.0);
        for _ in 0..1000 {
            d.direct_entry(1, 1);
            t.stretch_begins(1, 0);
            t.stretch_ends(1_000_000, true);
        }
        assert!(!d.translated(1));
        assert!(t.translated(1));
    }

    #[test]
    fn dense_kernel_entries_switch_to_translated_after_a_window() {
        let mut p = adaptive();
        for i in 0..Policy::WINDOW {
            assert!(!p.translated(0x1000), "switched early, after {i} entries");
            p.direct_entry(0x1000, 5);
        }
        assert!(p.translated(0x1000));
        assert!(!p.translated(0x2000), "another address space keeps its own mode");
        assert_eq!(p.stats.to_translated, 1);
    }

    #[test]
    fn sparse_kernel_entries_stay_direct() {
        let mut p = adaptive();
        for _ in 0..10 * Policy::WINDOW {
            p.direct_entry(0x1000, 500);
        }
        assert!(!p.translated(0x1000));
    }

    #[test]
    fn long_translated_stretches_go_back_to_direct() {
        let mut p = adaptive();
        for _ in 0..Policy::WINDOW {
            p.direct_entry(0x1000, 1);
        }
        assert!(p.translated(0x1000));
        stretches(&mut p, 0x1000, Policy::WINDOW, 1000);
        assert!(!p.translated(0x1000));
        assert_eq!(p.stats.to_direct, 1);
    }

    #[test]
    fn between_the_thresholds_nothing_changes() {
        // 40 µs per entry: above TO_TRANSLATED, below TO_DIRECT.
        let mut p = adaptive();
        for _ in 0..4 * Policy::WINDOW {
            p.direct_entry(7, 40);
        }
        assert!(!p.translated(7));
        for _ in 0..Policy::WINDOW {
            p.direct_entry(7, 15);
        }
        assert!(p.translated(7));
        stretches(&mut p, 7, 4 * Policy::WINDOW, 30);
        assert!(p.translated(7), "no thrash between the thresholds");
    }

    #[test]
    fn a_space_measured_dearer_translated_goes_back_and_stays_until_it_forgets() {
        let mut p = adaptive();
        for _ in 0..Policy::WINDOW {
            p.direct_entry(4, 10);
        }
        assert!(p.translated(4));
        // 30 µs per entry translated: under TO_DIRECT, but 3x the direct cost.
        stretches(&mut p, 4, Policy::WINDOW, 30);
        assert!(!p.translated(4), "measured dearer: back to direct");
        // Dense entries do not send it back while the measurement holds...
        let mut windows = 0;
        while !p.translated(4) {
            for _ in 0..Policy::WINDOW {
                p.direct_entry(4, 10);
            }
            windows += 1;
            assert!(windows <= Policy::FORGET, "never forgot");
        }
        // ... and it tries again once it is forgotten.
        assert!(windows > Policy::FORGET / 2, "tried again after {windows} windows");
        assert_eq!(p.stats.to_translated, 2);
    }

    #[test]
    fn computing_between_interrupts_goes_direct_without_a_window_of_entries() {
        let mut p = adaptive();
        for _ in 0..Policy::WINDOW {
            p.direct_entry(9, 1);
        }
        assert!(p.translated(9));
        // Interrupts only, each after 4 ms of user time: a few are enough.
        let mut now = 0;
        let mut n = 0;
        while p.translated(9) {
            p.stretch_begins(9, now);
            now += 4000;
            p.stretch_ends(now, false);
            n += 1;
            assert!(n < Policy::WINDOW, "stayed translated for a whole window of interrupts");
        }
        assert_eq!(p.stats.translated_stretches, 0);
    }

    #[test]
    fn translation_churn_sends_a_space_back_to_direct_for_a_while() {
        let mut p = adaptive();
        for _ in 0..Policy::WINDOW {
            p.direct_entry(5, 10);
        }
        assert!(p.translated(5));
        // Short stretches (translated pays off by time) but a new block
        // every entry: back to direct.
        let mut now = 0;
        for _ in 0..Policy::WINDOW {
            p.user_translations(5, 1);
            p.stretch_begins(5, now);
            now += 5;
            p.stretch_ends(now, true);
        }
        assert!(!p.translated(5), "churn sent it back");
        // Dense entries again: it stays direct for the penalty's windows.
        for _ in 0..Policy::CHURN_PENALTY * Policy::WINDOW {
            p.direct_entry(5, 10);
            assert!(!p.translated(5), "penalty served");
        }
        for _ in 0..Policy::WINDOW {
            p.direct_entry(5, 10);
        }
        assert!(p.translated(5), "translated again after the penalty");
        // Churn again at once: twice the penalty this time.
        for _ in 0..Policy::WINDOW {
            p.user_translations(5, 1);
            p.inline_entries(5, 1, 5);
        }
        assert!(!p.translated(5), "churn sent it back again");
        for _ in 0..2 * Policy::CHURN_PENALTY * Policy::WINDOW {
            p.direct_entry(5, 10);
            assert!(!p.translated(5), "the doubled penalty is served");
        }
        for _ in 0..Policy::WINDOW {
            p.direct_entry(5, 10);
        }
        assert!(p.translated(5));
        // A window that pays off resets the backoff.
        for _ in 0..Policy::WINDOW {
            p.inline_entries(5, 1, 5);
        }
        assert!(p.translated(5));
        for _ in 0..Policy::WINDOW {
            p.user_translations(5, 1);
            p.inline_entries(5, 1, 5);
        }
        assert!(!p.translated(5));
        for _ in 0..Policy::CHURN_PENALTY * Policy::WINDOW {
            p.direct_entry(5, 10);
        }
        for _ in 0..Policy::WINDOW {
            p.direct_entry(5, 10);
        }
        assert!(p.translated(5), "the base penalty again");
    }

    #[test]
    fn interrupts_do_not_count_as_kernel_entries_of_direct_code() {
        let mut p = adaptive();
        for _ in 0..10 * Policy::WINDOW {
            p.direct_time(3, 1);
        }
        assert!(!p.translated(3));
    }
}
