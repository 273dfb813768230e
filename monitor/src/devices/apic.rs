//! The local APIC of the one vCPU (xAPIC, MMIO at `LAPIC_BASE`), as Intel's
//! SDM vol. 3 ch. 11 describes it for a P6-family part (version 0x14, six
//! LVT entries, no x2APIC) with the TSC-deadline timer mode (SDM 11.5.4.1).
//!
//! A plain state machine: the platform hands it interrupt messages
//! ([`LocalApic::accept`], from the I/O APIC or a self-IPI), asks it for the
//! highest deliverable vector ([`LocalApic::pending`]) and acknowledges it
//! ([`LocalApic::acknowledge`]), polls its timer on the platform clock, and
//! collects the vectors of level-triggered EOIs for the I/O APIC
//! ([`LocalApic::take_eois`]).
//!
//! The timer counts at `timer_hz` divided by the divide configuration
//! register. `timer_hz` is what CPUID leaf 0x15 announces as the crystal
//! clock (cpu/policy.rs), so Linux takes the timer's period from CPUID and
//! never calibrates it. All times come from the platform clock: virtual time
//! in the deterministic mode.
//!
//! TSC-deadline mode (LVT timer bits 18:17 = 10b): the IA32_TSC_DEADLINE MSR
//! lives here, since firing clears it. The CPU hands each RDMSR/WRMSR of it
//! to the platform ([`LocalApic::tsc_deadline`],
//! [`LocalApic::set_tsc_deadline`]) with the guest TSC at the WRMSR; the
//! deadline becomes a platform-clock time from the distance between the two
//! TSC values at `tsc_hz` (the rate the guest TSC runs at against the
//! platform clock: the host TSC's against CLOCK_MONOTONIC, or 1 GHz of
//! virtual time), rounded up so the interrupt never comes before the guest
//! TSC reaches the deadline.
//!
//! What is not modelled: the IA32_APIC_BASE enable bit detaching the APIC
//! (the MSR lives with the CPU, cpu/sensitive.rs; the platform treats the
//! APIC as hardware-enabled), NMI/SMI/INIT/SIPI delivery (one CPU; logged
//! and dropped), and the spurious-vector race of real hardware (an
//! acknowledge here is atomic).

use std::sync::Arc;

use super::bus::MmioDevice;
use super::clock::Clock;
use crate::layout::LAPIC_BASE;

/// Register offsets (SDM table 11-1).
pub mod reg {
    pub const ID: u32 = 0x20;
    pub const VERSION: u32 = 0x30;
    pub const TPR: u32 = 0x80;
    pub const APR: u32 = 0x90;
    pub const PPR: u32 = 0xA0;
    pub const EOI: u32 = 0xB0;
    pub const RRD: u32 = 0xC0;
    pub const LDR: u32 = 0xD0;
    pub const DFR: u32 = 0xE0;
    pub const SVR: u32 = 0xF0;
    pub const ISR: u32 = 0x100;
    pub const TMR: u32 = 0x180;
    pub const IRR: u32 = 0x200;
    pub const ESR: u32 = 0x280;
    pub const ICR_LOW: u32 = 0x300;
    pub const ICR_HIGH: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_THERMAL: u32 = 0x330;
    pub const LVT_PERF: u32 = 0x340;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_LINT1: u32 = 0x360;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3E0;
}

/// Version register: version 0x14 (integrated APIC), max LVT entry 5.
pub const VERSION: u32 = 0x0005_0014;
/// LVT mask bit.
pub const LVT_MASKED: u32 = 1 << 16;
/// LVT timer modes (bits 18:17). 11b is reserved: it counts as one-shot
/// here (KVM's behaviour; the SDM only says "reserved"), and reads back as
/// written.
pub const TIMER_ONE_SHOT: u32 = 0;
pub const TIMER_PERIODIC: u32 = 1;
pub const TIMER_TSC_DEADLINE: u32 = 2;
/// SVR: APIC software enable.
pub const SVR_ENABLE: u32 = 1 << 8;
/// LVT/ICR delivery modes (bits 8-10).
pub const DM_FIXED: u32 = 0;
pub const DM_LOWEST: u32 = 1;
pub const DM_NMI: u32 = 4;
pub const DM_EXTINT: u32 = 7;
/// ESR bits.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

const LVT_COUNT: usize = 6;
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_ERROR: usize = 5;
/// Writable bits of each LVT entry (timer, thermal, perf, LINT0, LINT1, error).
const LVT_WRITABLE: [u32; LVT_COUNT] = [0x0007_00FF, 0x0001_07FF, 0x0001_07FF, 0x0001_A7FF, 0x0001_A7FF, 0x0001_00FF];

/// One interrupt message to a local APIC (from the I/O APIC or an IPI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub vector: u8,
    /// Delivery mode (`DM_*`).
    pub mode: u32,
    /// Logical (true) or physical destination.
    pub logical: bool,
    pub dest: u8,
    /// Level-triggered: the EOI goes back to the I/O APIC.
    pub level: bool,
}

/// A 256-bit vector register (ISR, TMR, IRR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bits256([u64; 4]);

impl Bits256 {
    fn get(&self, v: u8) -> bool {
        self.0[usize::from(v >> 6)] & (1 << (v & 63)) != 0
    }
    fn set(&mut self, v: u8, on: bool) {
        let w = &mut self.0[usize::from(v >> 6)];
        if on {
            *w |= 1 << (v & 63);
        } else {
            *w &= !(1 << (v & 63));
        }
    }
    fn highest(&self) -> Option<u8> {
        (0..4).rev().find(|&i| self.0[i] != 0).map(|i| (i * 64 + 63 - self.0[i].leading_zeros() as usize) as u8)
    }
    /// 32-bit word `i` (0-7), as the register file shows it.
    fn word(&self, i: u32) -> u32 {
        (self.0[(i / 2) as usize] >> (32 * (i % 2))) as u32
    }
}

/// The timer's counting state.
#[derive(Clone, Copy, Debug, Default)]
struct Timer {
    initial: u32,
    /// Divide configuration register as written (bits 0, 1, 3).
    divide_reg: u32,
    /// Platform time at which the current count started from `initial`.
    start_ns: u64,
    /// Expiries already raised since `start_ns` (periodic mode).
    fired: u64,
    /// Counting (a one-shot that reached zero stops).
    running: bool,
    /// IA32_TSC_DEADLINE in TSC-deadline mode: the guest TSC to fire at,
    /// 0 when disarmed (firing clears it).
    deadline_tsc: u64,
    /// Platform time at which the guest TSC reaches `deadline_tsc`.
    deadline_ns: u64,
}

impl Timer {
    fn divisor(&self) -> u64 {
        let d = (self.divide_reg & 3) | ((self.divide_reg & 8) >> 1);
        if d == 7 {
            1
        } else {
            2 << d
        }
    }
}

/// Counters for stats output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApicStats {
    pub accepted: u64,
    pub delivered: u64,
    pub eois: u64,
    pub timer_expiries: u64,
}

pub struct LocalApic {
    clock: Arc<dyn Clock>,
    timer_hz: u64,
    /// The guest TSC's rate against the platform clock (TSC-deadline mode).
    tsc_hz: u64,
    id: u8,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: Bits256,
    tmr: Bits256,
    irr: Bits256,
    /// Errors since the last ESR write, and what the last write latched.
    esr_pending: u32,
    esr: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; LVT_COUNT],
    timer: Timer,
    /// Vectors of level-triggered interrupts the guest EOI'd, for the I/O APIC.
    eois: Vec<u8>,
    stats: ApicStats,
}

impl LocalApic {
    /// The BSP's APIC after reset, with LINT0 in virtual-wire mode (ExtINT,
    /// unmasked) as a BIOS leaves it, so the 8259 keeps working for guests
    /// that never touch the APIC (QEMU does the same).
    pub fn new(clock: Arc<dyn Clock>, timer_hz: u64) -> Self {
        let mut lvt = [LVT_MASKED; LVT_COUNT];
        lvt[LVT_LINT0] = DM_EXTINT << 8;
        Self {
            clock,
            timer_hz: timer_hz.max(1),
            tsc_hz: timer_hz.max(1),
            id: 0,
            tpr: 0,
            ldr: 0,
            dfr: 0xFFFF_FFFF,
            svr: 0xFF,
            isr: Bits256::default(),
            tmr: Bits256::default(),
            irr: Bits256::default(),
            esr_pending: 0,
            esr: 0,
            icr_low: 0,
            icr_high: 0,
            lvt,
            timer: Timer::default(),
            eois: Vec::new(),
            stats: ApicStats::default(),
        }
    }

    /// The guest TSC runs at `tsc_hz` against the platform clock (the
    /// TSC-deadline timer's conversion; `new` assumes the timer's rate).
    pub fn with_tsc_hz(mut self, tsc_hz: u64) -> Self {
        self.tsc_hz = tsc_hz.max(1);
        self
    }

    pub fn stats(&self) -> ApicStats {
        self.stats
    }

    fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// Does the 8259's INTR reach the CPU (LINT0 unmasked in ExtINT mode)?
    pub fn extint_open(&self) -> bool {
        let l = self.lvt[LVT_LINT0];
        l & LVT_MASKED == 0 && (l >> 8) & 7 == DM_EXTINT
    }

    /// Processor priority (SDM 11.8.3.1).
    pub fn ppr(&self) -> u32 {
        let isrv = self.isr.highest().map_or(0, u32::from);
        if self.tpr & 0xF0 >= isrv & 0xF0 {
            self.tpr & 0xFF
        } else {
            isrv & 0xF0
        }
    }

    /// Does `msg`'s destination include this APIC?
    fn addressed(&self, logical: bool, dest: u8) -> bool {
        if !logical {
            return dest == self.id || dest == 0xFF;
        }
        let ldr = (self.ldr >> 24) as u8;
        if dest == 0xFF {
            return true;
        }
        if self.dfr >> 28 == 0xF {
            // Flat model: a bit mask of up to 8 APICs.
            ldr & dest != 0
        } else {
            // Cluster model: cluster in the high nibble, members in the low.
            ldr >> 4 == dest >> 4 && ldr & dest & 0x0F != 0
        }
    }

    /// An interrupt message on the bus; returns whether this APIC took it.
    pub fn accept(&mut self, msg: Message) -> bool {
        if !self.addressed(msg.logical, msg.dest) {
            return false;
        }
        match msg.mode {
            DM_FIXED | DM_LOWEST => {
                self.raise(msg.vector, msg.level);
                true
            }
            mode => {
                tracing::debug!(mode, vector = msg.vector, "local APIC: delivery mode not modelled, dropped");
                false
            }
        }
    }

    /// Sets `vector` in IRR (an illegal vector is an error instead).
    fn raise(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        if !self.software_enabled() {
            return;
        }
        self.irr.set(vector, true);
        self.tmr.set(vector, level);
        self.stats.accepted += 1;
    }

    fn error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_ERROR];
        if lvt & LVT_MASKED == 0 && self.software_enabled() {
            let v = lvt as u8;
            if v >= 16 {
                self.irr.set(v, true);
                self.tmr.set(v, false);
            }
        }
    }

    /// The vector the APIC would deliver now, if any.
    pub fn pending(&self) -> Option<u8> {
        if !self.software_enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        (u32::from(v) & 0xF0 > self.ppr() & 0xF0).then_some(v)
    }

    /// The CPU takes the pending interrupt: IRR → ISR.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.pending()?;
        self.irr.set(v, false);
        self.isr.set(v, true);
        self.stats.delivered += 1;
        Some(v)
    }

    /// Vectors of level-triggered interrupts EOI'd since the last call.
    pub fn take_eois(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.eois)
    }

    fn eoi(&mut self) {
        let Some(v) = self.isr.highest() else { return };
        self.isr.set(v, false);
        self.stats.eois += 1;
        if self.tmr.get(v) {
            self.tmr.set(v, false);
            self.eois.push(v);
        }
    }

    // ---- the timer ---------------------------------------------------------

    fn timer_mode(&self) -> u32 {
        (self.lvt[LVT_TIMER] >> 17) & 3
    }

    fn periodic(&self) -> bool {
        self.timer_mode() == TIMER_PERIODIC
    }

    fn tsc_deadline_mode(&self) -> bool {
        self.timer_mode() == TIMER_TSC_DEADLINE
    }

    /// RDMSR IA32_TSC_DEADLINE: the armed deadline, 0 when disarmed, fired,
    /// or not in TSC-deadline mode (SDM 11.5.4.1). The caller polls first.
    pub fn tsc_deadline(&self) -> u64 {
        if self.tsc_deadline_mode() {
            self.timer.deadline_tsc
        } else {
            0
        }
    }

    /// WRMSR IA32_TSC_DEADLINE of `value` when the guest TSC read `tsc_now`:
    /// arms the timer for the moment the TSC reaches `value` (at once if it
    /// has), 0 disarms. Ignored outside TSC-deadline mode (SDM 11.5.4.1).
    pub fn set_tsc_deadline(&mut self, value: u64, tsc_now: u64) {
        if !self.tsc_deadline_mode() {
            tracing::debug!(value, "local APIC: IA32_TSC_DEADLINE write outside TSC-deadline mode ignored");
            return;
        }
        let now = self.clock.now_ns();
        let ahead = u128::from(value.saturating_sub(tsc_now));
        let ns = (ahead * 1_000_000_000).div_ceil(u128::from(self.tsc_hz));
        self.timer.deadline_tsc = value;
        self.timer.deadline_ns = now.saturating_add(u64::try_from(ns).unwrap_or(u64::MAX));
    }

    /// Nanoseconds after `start_ns` at which `ticks` timer ticks have passed.
    fn ticks_to_ns(&self, ticks: u64) -> u64 {
        let cycles = u128::from(ticks) * u128::from(self.timer.divisor());
        let ns = (cycles * 1_000_000_000).div_ceil(u128::from(self.timer_hz));
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    fn ns_to_ticks(&self, ns: u64) -> u64 {
        let cycles = u128::from(ns) * u128::from(self.timer_hz) / 1_000_000_000;
        u64::try_from(cycles / u128::from(self.timer.divisor())).unwrap_or(u64::MAX)
    }

    /// When the next expiry is due (whether or not it interrupts).
    fn next_expiry_ns(&self) -> Option<u64> {
        let t = &self.timer;
        if self.tsc_deadline_mode() {
            return (t.deadline_tsc != 0).then_some(t.deadline_ns);
        }
        if !t.running || t.initial == 0 {
            return None;
        }
        let ticks = (t.fired + 1).saturating_mul(u64::from(t.initial));
        Some(t.start_ns.saturating_add(self.ticks_to_ns(ticks)))
    }

    /// When `poll` will raise the timer interrupt; `None` if it will not
    /// (stopped or masked).
    pub fn next_deadline_ns(&self) -> Option<u64> {
        if self.lvt[LVT_TIMER] & LVT_MASKED != 0 || (self.periodic() && self.timer_expiry_is_moot()) {
            return None;
        }
        self.next_expiry_ns()
    }

    /// Whether a timer expiry would change nothing: its vector is already
    /// requested (or the APIC is disabled), or, for an illegal vector, the
    /// error it would report is already pending with its own interrupt
    /// requested or masked. A periodic timer at a tiny count in that state
    /// set a deadline per period and kicked the vCPU for each (found by
    /// the guest-storm fuzzer: timer_settime took 87 % of a run that never
    /// ended); its expiries collapse into the next one that counts, which
    /// `poll` computes from the clock when the deadline comes back.
    fn timer_expiry_is_moot(&self) -> bool {
        let v = self.lvt[LVT_TIMER] as u8;
        if !self.software_enabled() {
            return v >= 16 || self.esr_pending & ESR_RECEIVE_ILLEGAL_VECTOR != 0;
        }
        if v >= 16 {
            return self.irr.get(v) && !self.tmr.get(v);
        }
        let lvt = self.lvt[LVT_ERROR];
        let e = lvt as u8;
        self.esr_pending & ESR_RECEIVE_ILLEGAL_VECTOR != 0
            && (lvt & LVT_MASKED != 0 || e < 16 || (self.irr.get(e) && !self.tmr.get(e)))
    }

    /// Raises the timer interrupt if an expiry is due at `now_ns` (expiries
    /// missed in between collapse into one, as an edge does).
    pub fn poll(&mut self, now_ns: u64) {
        let Some(due) = self.next_expiry_ns() else { return };
        if now_ns < due {
            return;
        }
        self.stats.timer_expiries += 1;
        if self.tsc_deadline_mode() {
            // Fires once: disarmed, the MSR reads 0.
            self.timer.deadline_tsc = 0;
        } else if self.periodic() {
            let elapsed = self.ns_to_ticks(now_ns - self.timer.start_ns);
            let t = &mut self.timer;
            t.fired = (elapsed / u64::from(t.initial)).max(t.fired + 1);
        } else {
            self.timer.running = false;
        }
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.raise(lvt as u8, false);
        }
    }

    fn current_count(&self, now_ns: u64) -> u32 {
        let t = &self.timer;
        if !t.running || t.initial == 0 || self.tsc_deadline_mode() {
            return 0;
        }
        let elapsed = self.ns_to_ticks(now_ns.saturating_sub(t.start_ns));
        let initial = u64::from(t.initial);
        if self.periodic() {
            (initial - elapsed % initial) as u32
        } else {
            initial.saturating_sub(elapsed) as u32
        }
    }

    fn start_timer(&mut self, initial: u32, now_ns: u64) {
        self.timer.initial = initial;
        self.timer.start_ns = now_ns;
        self.timer.fired = 0;
        self.timer.running = initial != 0;
    }

    // ---- registers ---------------------------------------------------------

    /// Reads the 32-bit register at `offset` (16-byte aligned).
    pub fn read_reg(&mut self, offset: u32) -> u32 {
        match offset {
            reg::ID => u32::from(self.id) << 24,
            reg::VERSION => VERSION,
            reg::TPR => self.tpr,
            reg::APR => 0,
            reg::PPR => self.ppr(),
            reg::EOI | reg::RRD => 0,
            reg::LDR => self.ldr,
            reg::DFR => self.dfr,
            reg::SVR => self.svr,
            o @ 0x100..=0x170 => self.isr.word((o - reg::ISR) >> 4),
            o @ 0x180..=0x1F0 => self.tmr.word((o - reg::TMR) >> 4),
            o @ 0x200..=0x270 => self.irr.word((o - reg::IRR) >> 4),
            reg::ESR => self.esr,
            reg::ICR_LOW => self.icr_low,
            reg::ICR_HIGH => self.icr_high,
            o @ reg::LVT_TIMER..=reg::LVT_ERROR => self.lvt[((o - reg::LVT_TIMER) >> 4) as usize],
            reg::TIMER_INITIAL => self.timer.initial,
            reg::TIMER_CURRENT => self.current_count(self.clock.now_ns()),
            reg::TIMER_DIVIDE => self.timer.divide_reg,
            _ => {
                self.error(ESR_ILLEGAL_REGISTER);
                0
            }
        }
    }

    /// Writes the 32-bit register at `offset` (16-byte aligned).
    pub fn write_reg(&mut self, offset: u32, value: u32) {
        match offset {
            reg::ID => self.id = (value >> 24) as u8,
            reg::TPR => self.tpr = value & 0xFF,
            reg::EOI => self.eoi(),
            reg::LDR => self.ldr = value & 0xFF00_0000,
            reg::DFR => self.dfr = value | 0x0FFF_FFFF,
            reg::SVR => {
                self.svr = value & 0x3FF;
                if !self.software_enabled() {
                    // SDM 11.4.7.2: software disable masks every LVT entry.
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            reg::ESR => {
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            reg::ICR_LOW => {
                self.icr_low = value & 0x000C_CFFF;
                self.send_ipi();
            }
            reg::ICR_HIGH => self.icr_high = value & 0xFF00_0000,
            o @ reg::LVT_TIMER..=reg::LVT_ERROR => {
                let i = ((o - reg::LVT_TIMER) >> 4) as usize;
                let now = self.clock.now_ns();
                let was_periodic = self.periodic();
                let was_deadline = self.tsc_deadline_mode();
                let mut v = value & LVT_WRITABLE[i];
                if !self.software_enabled() {
                    v |= LVT_MASKED;
                }
                self.lvt[i] = v;
                if i == LVT_TIMER && was_deadline != self.tsc_deadline_mode() {
                    // Into or out of TSC-deadline mode: the timer is disarmed
                    // (SDM 11.5.4.1), the initial count cleared (as KVM does).
                    let divide_reg = self.timer.divide_reg;
                    self.timer = Timer { divide_reg, ..Timer::default() };
                } else if i == LVT_TIMER && was_periodic != self.periodic() && self.timer.running {
                    // A mode change restarts counting from the current count.
                    let cur = self.current_count(now);
                    let initial = self.timer.initial;
                    self.start_timer(initial, now);
                    let left = self.ticks_to_ns(u64::from(initial - cur));
                    self.timer.start_ns = now.saturating_sub(left);
                }
            }
            // TSC-deadline mode ignores the initial count (SDM 11.5.4.1).
            reg::TIMER_INITIAL if self.tsc_deadline_mode() => {}
            reg::TIMER_INITIAL => {
                let now = self.clock.now_ns();
                self.start_timer(value, now);
            }
            reg::TIMER_DIVIDE => {
                // The count continues at the new rate from what it is now.
                let now = self.clock.now_ns();
                let cur = self.current_count(now);
                let running = self.timer.running;
                self.timer.divide_reg = value & 0xB;
                if running {
                    let initial = self.timer.initial;
                    self.start_timer(initial, now);
                    let done = self.ticks_to_ns(u64::from(initial - cur));
                    self.timer.start_ns = now.saturating_sub(done);
                }
            }
            reg::VERSION | reg::APR | reg::PPR | reg::RRD | reg::TIMER_CURRENT => {}
            0x100..=0x270 => {}
            _ => self.error(ESR_ILLEGAL_REGISTER),
        }
    }

    /// An ICR low write: an IPI. With one CPU only fixed interrupts to this
    /// APIC (a self-IPI, "all including self", or our own ID) go anywhere.
    fn send_ipi(&mut self) {
        let low = self.icr_low;
        let vector = low as u8;
        let mode = (low >> 8) & 7;
        let to_self = match (low >> 18) & 3 {
            0 => self.addressed(low & (1 << 11) != 0, (self.icr_high >> 24) as u8),
            1 | 2 => true,
            _ => false,
        };
        if mode != DM_FIXED && mode != DM_LOWEST {
            tracing::debug!(icr = format_args!("{low:#x}"), "local APIC: IPI mode not modelled, dropped");
            return;
        }
        if vector < 16 {
            self.error(ESR_SEND_ILLEGAL_VECTOR);
            return;
        }
        if to_self {
            self.raise(vector, false);
        }
    }
}

impl MmioDevice for LocalApic {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        let offset = addr.wrapping_sub(LAPIC_BASE) as u32 & 0xFFF;
        let value = self.read_reg(offset & !0xF);
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get((offset & 0xF) as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        let offset = addr.wrapping_sub(LAPIC_BASE) as u32 & 0xFFF;
        // Registers take aligned 32-bit writes only (SDM 11.4.1); anything
        // else is dropped, as the hardware's behaviour is undefined.
        if offset & 0xF != 0 || data.len() != 4 {
            tracing::debug!(offset, len = data.len(), "local APIC: unaligned or non-32-bit write dropped");
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, value);
    }
}

#[cfg(test)]
mod tests {
    use super::super::clock::ManualClock;
    use super::*;

    fn apic(hz: u64) -> (LocalApic, ManualClock) {
        let clock = ManualClock::new(1_000);
        (LocalApic::new(Arc::new(clock.clone()), hz), clock)
    }

    fn enabled() -> (LocalApic, ManualClock) {
        let (mut a, c) = apic(1_000_000_000);
        a.write_reg(reg::SVR, SVR_ENABLE | 0xFF);
        (a, c)
    }

    fn fixed(vector: u8) -> Message {
        Message { vector, mode: DM_FIXED, logical: false, dest: 0, level: false }
    }

    #[test]
    fn reset_state() {
        let (mut a, _) = apic(1_000_000);
        assert_eq!(a.read_reg(reg::ID), 0);
        assert_eq!(a.read_reg(reg::VERSION), 0x0005_0014);
        assert_eq!(a.read_reg(reg::DFR), 0xFFFF_FFFF);
        assert_eq!(a.read_reg(reg::SVR), 0xFF);
        assert_eq!(a.read_reg(reg::LVT_TIMER), LVT_MASKED);
        assert_eq!(a.read_reg(reg::LVT_LINT0), 0x700, "virtual wire");
        assert!(a.extint_open());
        assert_eq!(a.read_reg(reg::LVT_LINT1), LVT_MASKED);
        // Software-disabled: nothing is accepted.
        assert!(a.accept(fixed(0x40)));
        assert_eq!(a.pending(), None);
    }

    #[test]
    fn priorities_tpr_ppr_and_eoi_order() {
        let (mut a, _) = enabled();
        a.accept(fixed(0x41));
        a.accept(fixed(0x62));
        assert_eq!(a.read_reg(reg::IRR + 0x20), 1 << 1, "0x41: IRR word 2, bit 1");
        assert_eq!(a.read_reg(reg::IRR + 0x30), 1 << 2);
        assert_eq!(a.acknowledge(), Some(0x62));
        assert_eq!(a.read_reg(reg::PPR), 0x60);
        assert_eq!(a.pending(), None, "0x41 is below the in-service class");
        a.write_reg(reg::TPR, 0x70);
        assert_eq!(a.read_reg(reg::PPR), 0x70);
        a.write_reg(reg::EOI, 0);
        assert_eq!(a.read_reg(reg::ISR + 0x30), 0);
        assert_eq!(a.pending(), None, "TPR 0x70 holds 0x41 back");
        a.write_reg(reg::TPR, 0x00);
        assert_eq!(a.acknowledge(), Some(0x41));
        // Same class as in service: not deliverable until EOI.
        a.accept(fixed(0x45));
        assert_eq!(a.pending(), None);
        a.write_reg(reg::EOI, 0);
        assert_eq!(a.acknowledge(), Some(0x45));
        a.write_reg(reg::EOI, 0);
        assert_eq!(a.stats().eois, 3);
        assert!(a.take_eois().is_empty(), "edge interrupts send no EOI message");
    }

    #[test]
    fn level_interrupts_report_their_eoi() {
        let (mut a, _) = enabled();
        a.accept(Message { level: true, ..fixed(0x30) });
        assert_eq!(a.read_reg(reg::TMR + 0x10), 1 << 16);
        assert_eq!(a.acknowledge(), Some(0x30));
        a.write_reg(reg::EOI, 0);
        assert_eq!(a.take_eois(), vec![0x30]);
        assert_eq!(a.read_reg(reg::TMR + 0x10), 0);
    }

    #[test]
    fn logical_destinations_flat_and_cluster() {
        let (mut a, _) = enabled();
        a.write_reg(reg::LDR, 0x0100_0000);
        let m = |dest| Message { logical: true, dest, ..fixed(0x50) };
        assert!(a.accept(m(0x01)));
        assert!(!a.accept(m(0x02)));
        assert!(a.accept(m(0xFF)));
        a.write_reg(reg::DFR, 0x0FFF_FFFF);
        a.write_reg(reg::LDR, 0x2100_0000);
        assert!(a.accept(m(0x21)));
        assert!(!a.accept(m(0x11)));
        assert!(!a.accept(Message { dest: 3, ..fixed(0x50) }), "physical: another ID");
    }

    #[test]
    fn self_ipi_and_illegal_vectors_in_esr() {
        let (mut a, _) = enabled();
        a.write_reg(reg::ICR_LOW, (1 << 18) | 0x55);
        assert_eq!(a.acknowledge(), Some(0x55));
        a.write_reg(reg::EOI, 0);
        a.write_reg(reg::ICR_HIGH, 0);
        a.write_reg(reg::ICR_LOW, 0x66); // no shorthand, physical dest 0 = us
        assert_eq!(a.acknowledge(), Some(0x66));
        a.write_reg(reg::EOI, 0);
        a.write_reg(reg::ICR_LOW, (1 << 18) | 0x05);
        assert_eq!(a.read_reg(reg::ESR), 0, "latched only by an ESR write");
        a.write_reg(reg::ESR, 0);
        assert_eq!(a.read_reg(reg::ESR), ESR_SEND_ILLEGAL_VECTOR);
        a.write_reg(reg::ESR, 0);
        assert_eq!(a.read_reg(reg::ESR), 0);
        a.read_reg(0x3F0);
        a.write_reg(reg::ESR, 0);
        assert_eq!(a.read_reg(reg::ESR), ESR_ILLEGAL_REGISTER);
    }

    #[test]
    fn software_disable_masks_the_lvt() {
        let (mut a, _) = enabled();
        a.write_reg(reg::LVT_TIMER, 0x30);
        assert_eq!(a.read_reg(reg::LVT_TIMER), 0x30);
        a.write_reg(reg::SVR, 0xFF);
        assert_eq!(a.read_reg(reg::LVT_TIMER), LVT_MASKED | 0x30);
        a.write_reg(reg::LVT_TIMER, 0x30);
        assert_eq!(a.read_reg(reg::LVT_TIMER), LVT_MASKED | 0x30, "stays masked while disabled");
    }

    #[test]
    fn one_shot_timer_counts_down_and_fires_once() {
        // 100 MHz, divide by 16: one tick is 160 ns.
        let (mut a, clock) = apic(100_000_000);
        a.write_reg(reg::SVR, SVR_ENABLE | 0xFF);
        a.write_reg(reg::TIMER_DIVIDE, 0x3);
        a.write_reg(reg::LVT_TIMER, 0x40);
        a.write_reg(reg::TIMER_INITIAL, 1000);
        assert_eq!(a.read_reg(reg::TIMER_CURRENT), 1000);
        assert_eq!(a.next_deadline_ns(), Some(1_000 + 160_000));
        clock.advance(16_000);
        assert_eq!(a.read_reg(reg::TIMER_CURRENT), 900);
        a.poll(clock.now_ns());
        assert_eq!(a.pending(), None);
        clock.set(1_000 + 160_000);
        a.poll(clock.now_ns());
        assert_eq!(a.acknowledge(), Some(0x40));
        assert_eq!(a.read_reg(reg::TIMER_CURRENT), 0);
        assert_eq!(a.next_deadline_ns(), None);
        clock.advance(1_000_000);
        a.poll(clock.now_ns());
        assert_eq!(a.stats().timer_expiries, 1);
    }

    #[test]
    fn periodic_timer_reloads_without_drift() {
        // 1 GHz, divide by 1: ticks are nanoseconds.
        let (mut a, clock) = enabled();
        a.write_reg(reg::TIMER_DIVIDE, 0xB);
        a.write_reg(reg::LVT_TIMER, (1 << 17) | 0x31);
        a.write_reg(reg::TIMER_INITIAL, 4_000_000);
        for k in 1..=5u64 {
            let d = a.next_deadline_ns().unwrap();
            assert_eq!(d, 1_000 + k * 4_000_000);
            clock.set(d);
            a.poll(d);
            assert_eq!(a.acknowledge(), Some(0x31));
            a.write_reg(reg::EOI, 0);
        }
        clock.advance(1_000_000);
        assert_eq!(a.read_reg(reg::TIMER_CURRENT), 3_000_000);
        // Missed periods collapse into one interrupt.
        clock.advance(20_000_000);
        a.poll(clock.now_ns());
        assert_eq!(a.acknowledge(), Some(0x31));
        assert_eq!(a.pending(), None);
        assert!(a.next_deadline_ns().unwrap() > clock.now_ns());
        // Masked: counts on, but no deadline to wake for.
        a.write_reg(reg::LVT_TIMER, (1 << 17) | LVT_MASKED | 0x31);
        assert_eq!(a.next_deadline_ns(), None);
        a.write_reg(reg::TIMER_INITIAL, 0);
        assert_eq!(a.read_reg(reg::TIMER_CURRENT), 0);
    }

    /// A periodic timer whose expiries would change nothing sets no
    /// deadline (each was a vCPU kick): while its vector is requested, and
    /// for an illegal vector while the error is pending. Acknowledging
    /// brings the deadline back.
    #[test]
    fn periodic_expiries_that_change_nothing_set_no_deadline() {
        let (mut a, clock) = enabled();
        a.write_reg(reg::TIMER_DIVIDE, 0xB);
        a.write_reg(reg::LVT_TIMER, (1 << 17) | 0x31);
        a.write_reg(reg::TIMER_INITIAL, 100);
        let d = a.next_deadline_ns().unwrap();
        clock.set(d);
        a.poll(d);
        assert_eq!(a.pending(), Some(0x31));
        assert_eq!(a.next_deadline_ns(), None, "0x31 is requested already");
        clock.advance(10_000);
        assert_eq!(a.acknowledge(), Some(0x31));
        let again = a.next_deadline_ns().expect("acknowledged: the timer counts again");
        a.poll(again.max(clock.now_ns()));
        assert_eq!(a.pending(), None, "in service");
        a.write_reg(reg::EOI, 0);
        assert_eq!(a.pending(), Some(0x31), "the expiry while in service waits for the EOI");

        // Vector 3 is illegal: the first expiry reports it, the next ones
        // would only report it again.
        let (mut a, clock) = enabled();
        a.write_reg(reg::LVT_ERROR, LVT_MASKED | 0x40);
        a.write_reg(reg::LVT_TIMER, (1 << 17) | 0x03);
        a.write_reg(reg::TIMER_INITIAL, 100);
        let d = a.next_deadline_ns().unwrap();
        clock.set(d);
        a.poll(d);
        assert_eq!(a.next_deadline_ns(), None, "the error is pending and its interrupt masked");
        a.write_reg(reg::LVT_ERROR, 0x40);
        assert!(a.next_deadline_ns().is_some(), "an unmasked error interrupt counts");
    }

    /// An APIC in TSC-deadline mode (vector 0x50) whose guest TSC runs at
    /// 2 GHz, 7_000_000 ahead of twice the platform clock's ns.
    fn deadline_apic() -> (LocalApic, ManualClock, impl Fn(&ManualClock) -> u64) {
        let (a, clock) = enabled();
        let mut a = a.with_tsc_hz(2_000_000_000);
        a.write_reg(reg::LVT_TIMER, (TIMER_TSC_DEADLINE << 17) | 0x50);
        (a, clock, |c: &ManualClock| 7_000_000 + 2 * c.now_ns())
    }

    #[test]
    fn tsc_deadline_fires_once_when_the_tsc_reaches_it() {
        let (mut a, clock, tsc) = deadline_apic();
        assert_eq!(a.read_reg(reg::LVT_TIMER), 0x4_0050);
        assert_eq!(a.tsc_deadline(), 0, "reset value");
        assert_eq!(a.next_deadline_ns(), None);
        // 4_000_000 TSC ticks ahead: 2 ms of platform time.
        let deadline = tsc(&clock) + 4_000_000;
        a.set_tsc_deadline(deadline, tsc(&clock));
        assert_eq!(a.tsc_deadline(), deadline);
        assert_eq!(a.next_deadline_ns(), Some(1_000 + 2_000_000));
        clock.set(1_000 + 1_999_999);
        a.poll(clock.now_ns());
        assert!(tsc(&clock) < deadline);
        assert_eq!(a.pending(), None, "not before the deadline");
        assert_eq!(a.tsc_deadline(), deadline);
        clock.set(1_000 + 2_000_000);
        assert_eq!(tsc(&clock), deadline);
        a.poll(clock.now_ns());
        assert_eq!(a.acknowledge(), Some(0x50));
        assert_eq!(a.tsc_deadline(), 0, "firing clears the MSR");
        assert_eq!(a.next_deadline_ns(), None);
        a.write_reg(reg::EOI, 0);
        clock.advance(10_000_000);
        a.poll(clock.now_ns());
        assert_eq!(a.pending(), None, "once per write");
        assert_eq!(a.stats().timer_expiries, 1);
        // Half a nanosecond ahead rounds up to one: never early.
        let now = clock.now_ns();
        a.set_tsc_deadline(tsc(&clock) + 3, tsc(&clock));
        assert_eq!(a.next_deadline_ns(), Some(now + 2));
        a.poll(now + 1);
        assert_eq!(a.pending(), None);
        a.poll(now + 2);
        assert_eq!(a.acknowledge(), Some(0x50));
    }

    #[test]
    fn tsc_deadline_zero_disarms_and_the_past_fires_at_once() {
        let (mut a, clock, tsc) = deadline_apic();
        let deadline = tsc(&clock) + 1_000;
        a.set_tsc_deadline(deadline, tsc(&clock));
        a.set_tsc_deadline(0, tsc(&clock));
        assert_eq!(a.tsc_deadline(), 0);
        assert_eq!(a.next_deadline_ns(), None);
        clock.advance(1_000_000);
        a.poll(clock.now_ns());
        assert_eq!(a.pending(), None, "disarmed");
        // Moved backward: the new deadline counts.
        a.set_tsc_deadline(tsc(&clock) + 2_000_000, tsc(&clock));
        a.set_tsc_deadline(tsc(&clock) + 200, tsc(&clock));
        assert_eq!(a.next_deadline_ns(), Some(clock.now_ns() + 100));
        a.set_tsc_deadline(0, tsc(&clock));
        // A deadline the TSC has passed fires at the next poll.
        a.set_tsc_deadline(tsc(&clock) - 5, tsc(&clock));
        assert_eq!(a.next_deadline_ns(), Some(clock.now_ns()));
        a.poll(clock.now_ns());
        assert_eq!(a.acknowledge(), Some(0x50));
        assert_eq!(a.tsc_deadline(), 0);
        a.write_reg(reg::EOI, 0);
        // Masked: it expires (the MSR clears) without an interrupt.
        a.write_reg(reg::LVT_TIMER, (TIMER_TSC_DEADLINE << 17) | LVT_MASKED | 0x50);
        a.set_tsc_deadline(tsc(&clock) + 10, tsc(&clock));
        assert_eq!(a.tsc_deadline(), tsc(&clock) + 10, "the mask is no mode change");
        assert_eq!(a.next_deadline_ns(), None, "nothing to wake for");
        clock.advance(5);
        a.poll(clock.now_ns());
        assert_eq!(a.pending(), None);
        assert_eq!(a.tsc_deadline(), 0);
    }

    #[test]
    fn tsc_deadline_mode_ignores_the_count_and_mode_changes_disarm() {
        let (a, clock) = enabled();
        let mut a = a.with_tsc_hz(1_000_000_000);
        // A one-shot count running, then TSC-deadline mode: disarmed.
        a.write_reg(reg::LVT_TIMER, 0x50);
        a.write_reg(reg::TIMER_INITIAL, 1_000_000);
        assert!(a.next_deadline_ns().is_some());
        a.write_reg(reg::LVT_TIMER, (TIMER_TSC_DEADLINE << 17) | 0x50);
        assert_eq!(a.read_reg(reg::TIMER_INITIAL), 0);
        assert_eq!(a.read_reg(reg::TIMER_CURRENT), 0);
        assert_eq!(a.next_deadline_ns(), None, "the count-down stopped");
        // Initial-count writes are ignored.
        a.write_reg(reg::TIMER_INITIAL, 500);
        assert_eq!(a.read_reg(reg::TIMER_INITIAL), 0);
        assert_eq!(a.read_reg(reg::TIMER_CURRENT), 0);
        assert_eq!(a.next_deadline_ns(), None);
        // Armed, then back to one-shot: disarmed, and it stays so.
        let t = clock.now_ns();
        a.set_tsc_deadline(t + 1_000, t);
        assert_eq!(a.tsc_deadline(), t + 1_000);
        a.write_reg(reg::LVT_TIMER, 0x50);
        assert_eq!(a.tsc_deadline(), 0, "reads 0 outside TSC-deadline mode");
        assert_eq!(a.next_deadline_ns(), None);
        a.write_reg(reg::LVT_TIMER, (TIMER_TSC_DEADLINE << 17) | 0x50);
        assert_eq!(a.tsc_deadline(), 0, "the mode change disarmed it");
        clock.advance(2_000);
        a.poll(clock.now_ns());
        assert_eq!(a.pending(), None);
        // Outside TSC-deadline mode the MSR write is ignored.
        a.write_reg(reg::LVT_TIMER, 0x50);
        a.set_tsc_deadline(clock.now_ns() + 10, clock.now_ns());
        assert_eq!(a.next_deadline_ns(), None);
        a.write_reg(reg::LVT_TIMER, (TIMER_TSC_DEADLINE << 17) | 0x50);
        assert_eq!(a.tsc_deadline(), 0);
        // Mode 11b is reserved: it reads back and counts as one-shot.
        a.write_reg(reg::LVT_TIMER, (3 << 17) | 0x50);
        assert_eq!(a.read_reg(reg::LVT_TIMER), 0x6_0050);
        a.write_reg(reg::TIMER_DIVIDE, 0xB);
        a.write_reg(reg::TIMER_INITIAL, 100);
        assert_eq!(a.read_reg(reg::TIMER_INITIAL), 100);
        a.set_tsc_deadline(clock.now_ns() + 10, clock.now_ns());
        assert_eq!(a.tsc_deadline(), 0);
        assert_eq!(a.next_deadline_ns(), Some(clock.now_ns() + 100));
        clock.advance(100);
        a.poll(clock.now_ns());
        assert_eq!(a.acknowledge(), Some(0x50));
        assert_eq!(a.next_deadline_ns(), None, "one-shot: no reload");
    }

    #[test]
    fn mmio_accesses_are_32_bit_registers() {
        let (mut a, _) = enabled();
        a.write(LAPIC_BASE + 0x80, &0x20u32.to_le_bytes());
        let mut b = [0u8; 4];
        a.read(LAPIC_BASE + 0x80, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x20);
        a.write(LAPIC_BASE + 0x80, &[0x50]);
        a.read(LAPIC_BASE + 0x80, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x20, "byte writes are dropped");
        let mut v = [0u8; 1];
        a.read(LAPIC_BASE + 0x32, &mut v);
        assert_eq!(v[0], 0x05, "byte 2 of the version register");
    }
}
