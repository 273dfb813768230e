//! i8254 programmable interval timer: three channels at 0x40-0x42, the
//! control word at 0x43, and channel 2's gate and output through system
//! control port B (0x61).
//!
//! Nothing ticks. A channel remembers the clock tick at which it started
//! counting; counts and output levels are computed from elapsed time at
//! 1.193182 MHz whenever the guest reads them, and the rising edges of channel
//! 0's output (IRQ0) are counted by [`Pit::poll`]. [`Pit::next_irq_deadline_ns`]
//! tells a run loop when the next edge is due so that a halted vCPU can sleep
//! until then.
//!
//! Modelled: modes 0-5 (6 and 7 alias 2 and 3), binary and BCD counting,
//! lobyte/hibyte/lohi access, counter latch, read-back with status latch, the
//! null-count flag, gates (channels 0 and 1 tied high, channel 2 from port
//! 0x61 bit 0). Simplified: a new count written in modes 2/3 restarts the
//! period at once (hardware waits for the end of the current period), mode 3
//! counts are approximations of the hardware's count-by-two, and writing the
//! first byte of a lohi count in mode 0 does not stop the counter.

use std::sync::Arc;

use crate::layout::{PIT_FREQUENCY_HZ, PORT_PIT, PORT_SYSTEM_CONTROL_B};

use super::bus::ByteRegisters;
use super::clock::Clock;

const NS_PER_S: u128 = 1_000_000_000;

/// PIT ticks elapsed at `ns` (floor).
pub fn ns_to_ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_FREQUENCY_HZ) / NS_PER_S) as u64
}

/// The first nanosecond at which `ticks` have elapsed (ceiling), so that
/// `ns_to_ticks(ticks_to_ns(t)) >= t`.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let f = u128::from(PIT_FREQUENCY_HZ);
    u64::try_from((u128::from(ticks) * NS_PER_S).div_ceil(f)).unwrap_or(u64::MAX)
}

fn from_bcd16(v: u16) -> u32 {
    (0..4).fold(0u32, |acc, i| acc * 10 + u32::from((v >> (12 - 4 * i)) & 0xF).min(9))
}

fn to_bcd16(v: u32) -> u16 {
    (0..4).fold(0u16, |acc, i| acc | (((v / 10u32.pow(i)) % 10) as u16) << (4 * i))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Lo = 1,
    Hi = 2,
    LoHi = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Mode written, no count loaded yet.
    Idle,
    /// Count loaded, waiting for a rising gate edge (modes 1 and 5; modes 2
    /// and 3 while the gate is low).
    WaitTrigger,
    /// Counting since tick `start`.
    Running { start: u64 },
    /// Gate low in modes 0/4: `elapsed` ticks counted so far.
    Frozen { elapsed: u64 },
}

#[derive(Debug, Clone)]
struct Channel {
    mode: u8,
    access: Access,
    bcd: bool,
    /// Initial count, 1..=65536 (binary) or 1..=10000 (BCD).
    reload: u64,
    run: Run,
    gate: bool,
    /// Lohi writes: the low byte already written.
    write_lo: Option<u8>,
    /// Lohi live reads: the next byte is the high one.
    read_hi_next: bool,
    /// Latched count bytes still to be read, in order.
    latched: Vec<u8>,
    latched_status: Option<u8>,
    null_count: bool,
    /// Ticks up to which rising output edges have been counted.
    cursor: u64,
    /// Rising output edges counted but not yet taken by `poll`.
    pending_edges: u64,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Self {
            mode: 0,
            access: Access::LoHi,
            bcd: false,
            reload: 0x1_0000,
            run: Run::Idle,
            gate,
            write_lo: None,
            read_hi_next: false,
            latched: Vec::new(),
            latched_status: None,
            null_count: true,
            cursor: 0,
            pending_edges: 0,
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x1_0000
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.mode, 2 | 3)
    }

    /// Tick of the single output edge of a one-shot mode, relative to start.
    fn oneshot_edge(&self) -> u64 {
        match self.mode {
            // OUT goes high at terminal count.
            0 | 1 => self.reload,
            // Strobe: low for one tick at terminal count, high again after it.
            _ => self.reload + 1,
        }
    }

    fn out_after(&self, d: u64) -> bool {
        let n = self.reload;
        match self.mode {
            0 | 1 => d >= n,
            2 => n == 1 || d % n != n - 1,
            3 => d % n < n.div_ceil(2),
            _ => d != n,
        }
    }

    fn out(&self, now: u64) -> bool {
        match self.run {
            Run::Idle => self.mode != 0,
            Run::WaitTrigger => true,
            Run::Frozen { elapsed } => self.out_after(elapsed),
            Run::Running { start } => self.out_after(now.saturating_sub(start)),
        }
    }

    fn count_after(&self, d: u64) -> u64 {
        let (n, m) = (self.reload, self.modulus());
        match self.mode {
            2 => (n - d % n) % m,
            3 => (n - (2 * d) % n) % m,
            _ => (n + m - d % m) % m,
        }
    }

    fn count(&self, now: u64) -> u16 {
        let c = match self.run {
            Run::Idle | Run::WaitTrigger => self.reload % self.modulus(),
            Run::Frozen { elapsed } => self.count_after(elapsed),
            Run::Running { start } => self.count_after(now.saturating_sub(start)),
        };
        if self.bcd {
            to_bcd16(c as u32)
        } else {
            c as u16
        }
    }

    fn status(&self, now: u64) -> u8 {
        u8::from(self.out(now)) << 7
            | u8::from(self.null_count) << 6
            | (self.access as u8) << 4
            | self.mode << 1
            | u8::from(self.bcd)
    }

    /// Rising output edges in `(from, to]`.
    fn edges_between(&self, from: u64, to: u64) -> u64 {
        let Run::Running { start } = self.run else { return 0 };
        if to <= from {
            return 0;
        }
        if self.periodic() {
            (to - start) / self.reload - (from.max(start) - start) / self.reload
        } else {
            let e = start + self.oneshot_edge();
            u64::from(from < e && e <= to)
        }
    }

    /// First rising output edge strictly after `t`.
    fn next_edge_after(&self, t: u64) -> Option<u64> {
        let Run::Running { start } = self.run else { return None };
        if self.periodic() {
            Some(start + ((t.max(start) - start) / self.reload + 1) * self.reload)
        } else {
            let e = start + self.oneshot_edge();
            (e > t).then_some(e)
        }
    }

    /// Counts the edges up to `now` before the channel's state changes.
    fn settle(&mut self, now: u64) {
        self.pending_edges += self.edges_between(self.cursor, now);
        self.cursor = now;
    }

    fn take_edges(&mut self, now: u64) -> u64 {
        self.settle(now);
        std::mem::take(&mut self.pending_edges)
    }

    fn start(&mut self, now: u64) {
        self.run = Run::Running { start: now };
    }

    fn load(&mut self, raw: u16, now: u64) {
        self.settle(now);
        self.reload = match (self.bcd, raw) {
            (false, 0) => 0x1_0000,
            (true, 0) => 10_000,
            (false, v) => u64::from(v),
            (true, v) => u64::from(from_bcd16(v)).max(1),
        };
        self.null_count = false;
        match self.mode {
            0 | 4 if self.gate => self.start(now),
            0 | 4 => self.run = Run::Frozen { elapsed: 0 },
            2 | 3 if self.gate => self.start(now),
            // Modes 1 and 5 (and 2/3 with the gate low) wait for a trigger;
            // a retriggerable one-shot already counting keeps its run.
            _ if self.run == Run::Idle || !matches!(self.mode, 1 | 5) => self.run = Run::WaitTrigger,
            _ => {}
        }
    }

    fn set_gate(&mut self, gate: bool, now: u64) {
        if gate == self.gate {
            return;
        }
        self.settle(now);
        self.gate = gate;
        self.run = match (self.mode, self.run, gate) {
            (_, Run::Idle, _) => Run::Idle,
            (0 | 4, Run::Running { start }, false) => Run::Frozen { elapsed: now.saturating_sub(start) },
            (0 | 4, Run::Frozen { elapsed }, true) => Run::Running { start: now.saturating_sub(elapsed) },
            (2 | 3, Run::Running { .. }, false) => Run::WaitTrigger,
            (1 | 2 | 3 | 5, _, true) => Run::Running { start: now },
            (_, run, _) => run,
        };
        // Starting from a frozen state may put `start` before the cursor; the
        // edges before `now` were counted (or could not happen) already.
    }

    fn control(&mut self, value: u8, now: u64) {
        self.settle(now);
        self.access = match (value >> 4) & 3 {
            1 => Access::Lo,
            2 => Access::Hi,
            _ => Access::LoHi,
        };
        self.mode = match (value >> 1) & 7 {
            m @ 6..=7 => m - 4,
            m => m,
        };
        self.bcd = value & 1 != 0;
        self.run = Run::Idle;
        self.null_count = true;
        self.write_lo = None;
        self.read_hi_next = false;
        self.latched.clear();
        self.latched_status = None;
    }

    fn latch_count(&mut self, now: u64) {
        if !self.latched.is_empty() {
            return;
        }
        let [lo, hi] = self.count(now).to_le_bytes();
        self.latched = match self.access {
            Access::Lo => vec![lo],
            Access::Hi => vec![hi],
            Access::LoHi => vec![lo, hi],
        };
    }

    fn latch_status(&mut self, now: u64) {
        if self.latched_status.is_none() {
            self.latched_status = Some(self.status(now));
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(s) = self.latched_status.take() {
            return s;
        }
        if !self.latched.is_empty() {
            return self.latched.remove(0);
        }
        let [lo, hi] = self.count(now).to_le_bytes();
        match self.access {
            Access::Lo => lo,
            Access::Hi => hi,
            Access::LoHi => {
                self.read_hi_next = !self.read_hi_next;
                if self.read_hi_next {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    fn write(&mut self, value: u8, now: u64) {
        match self.access {
            Access::Lo => self.load(u16::from(value), now),
            Access::Hi => self.load(u16::from(value) << 8, now),
            Access::LoHi => match self.write_lo.take() {
                None => self.write_lo = Some(value),
                Some(lo) => self.load(u16::from_le_bytes([lo, value]), now),
            },
        }
    }
}

/// The i8254 and the PIT side of port 0x61.
pub struct Pit {
    clock: Arc<dyn Clock>,
    channels: [Channel; 3],
    /// Port 0x61 bits 1-3 as written (speaker data, parity and channel check enables).
    port61: u8,
    /// Port 0x61 bit 4: toggles on every read (a stand-in for DRAM refresh).
    refresh: bool,
}

impl Pit {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        // Channel 2's gate is low until the guest sets port 0x61 bit 0.
        Self {
            clock,
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port61: 0,
            refresh: false,
        }
    }

    fn now_ticks(&self) -> u64 {
        ns_to_ticks(self.clock.now_ns())
    }

    /// Rising edges of channel 0's output (IRQ0) since the last poll, up to
    /// `now_ns`. Several edges collapse into one request at an edge-triggered
    /// PIC; the count is for statistics and lost-tick accounting.
    pub fn poll(&mut self, now_ns: u64) -> u64 {
        self.channels[0].take_edges(ns_to_ticks(now_ns))
    }

    /// When channel 0's next rising output edge is due, if it is counting.
    /// Already due (edges not yet taken by `poll`) answers a time in the past.
    pub fn next_irq_deadline_ns(&self) -> Option<u64> {
        let ch = &self.channels[0];
        if ch.pending_edges > 0 {
            return Some(ticks_to_ns(ch.cursor));
        }
        ch.next_edge_after(ch.cursor).map(ticks_to_ns)
    }

    /// Channel 2's output, as port 0x61 bit 5 shows it.
    pub fn out2(&self) -> bool {
        self.channels[2].out(self.now_ticks())
    }

    fn read_control_b(&mut self) -> u8 {
        self.refresh = !self.refresh;
        u8::from(self.channels[2].gate)
            | (self.port61 & 0x0E)
            | u8::from(self.refresh) << 4
            | u8::from(self.out2()) << 5
    }

    fn write_control_b(&mut self, value: u8) {
        let now = self.now_ticks();
        self.port61 = value & 0x0E;
        self.channels[2].set_gate(value & 1 != 0, now);
    }

    fn write_control(&mut self, value: u8) {
        let now = self.now_ticks();
        match value >> 6 {
            3 => {
                // Read-back: bit 5 clear latches counts, bit 4 clear latches status.
                for (i, ch) in self.channels.iter_mut().enumerate() {
                    if value & (2 << i) == 0 {
                        continue;
                    }
                    if value & 0x20 == 0 {
                        ch.latch_count(now);
                    }
                    if value & 0x10 == 0 {
                        ch.latch_status(now);
                    }
                }
            }
            sc => {
                let ch = &mut self.channels[usize::from(sc)];
                if value & 0x30 == 0 {
                    ch.latch_count(now);
                } else {
                    ch.control(value, now);
                }
            }
        }
    }
}

impl ByteRegisters for Pit {
    fn read_byte(&mut self, port: u16) -> u8 {
        let now = self.now_ticks();
        match port {
            PORT_SYSTEM_CONTROL_B => self.read_control_b(),
            p if (PORT_PIT..PORT_PIT + 3).contains(&p) => self.channels[usize::from(p - PORT_PIT)].read(now),
            // The control word register is write-only.
            _ => 0xFF,
        }
    }

    fn write_byte(&mut self, port: u16, value: u8) {
        let now = self.now_ticks();
        match port {
            PORT_SYSTEM_CONTROL_B => self.write_control_b(value),
            p if p == PORT_PIT + 3 => self.write_control(value),
            p if (PORT_PIT..PORT_PIT + 3).contains(&p) => self.channels[usize::from(p - PORT_PIT)].write(value, now),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::clock::ManualClock;
    use super::*;
    use crate::devices::bus::PortDevice;

    fn pit() -> (Pit, ManualClock) {
        let clock = ManualClock::new(1_000_000_000);
        (Pit::new(Arc::new(clock.clone())), clock)
    }

    fn out(pit: &mut Pit, port: u16, v: u8) {
        pit.write(port, 1, u32::from(v));
    }

    fn inb(pit: &mut Pit, port: u16) -> u8 {
        pit.read(port, 1) as u8
    }

    #[test]
    fn tick_conversions_round_trip() {
        for t in [0, 1, 2, 1193, 1_193_182, 123_456_789] {
            assert!(ns_to_ticks(ticks_to_ns(t)) >= t);
            assert!(ns_to_ticks(ticks_to_ns(t) - u64::from(t > 0)) < t.max(1));
        }
        assert_eq!(ns_to_ticks(1_000_000_000), 1_193_182);
    }

    #[test]
    fn mode2_on_channel0_raises_irq0_at_hz() {
        let (mut pit, clock) = pit();
        // Linux's pit_set_periodic: binary, mode 2, lohi, HZ=250 -> LATCH 4773.
        let latch: u16 = 4773;
        out(&mut pit, 0x43, 0x34);
        out(&mut pit, 0x40, latch as u8);
        out(&mut pit, 0x40, (latch >> 8) as u8);
        let start = clock.now_ns();
        let deadline = pit.next_irq_deadline_ns().unwrap();
        assert_eq!(deadline - start, ticks_to_ns(ns_to_ticks(start) + 4773) - start);
        assert!((deadline - start).abs_diff(4_000_177) < 1_000, "first edge after one period (~4 ms)");
        clock.set(deadline - 1);
        assert_eq!(pit.poll(clock.now_ns()), 0);
        clock.set(deadline);
        assert_eq!(pit.poll(clock.now_ns()), 1);
        assert_eq!(pit.poll(clock.now_ns()), 0, "an edge is reported once");
        // One second later: 250 periods in total (1 s / 4.000177 ms = 249.99).
        clock.set(start + 1_000_000_000);
        assert_eq!(pit.poll(clock.now_ns()), 248);
        clock.set(start + 1_000_100_000);
        assert_eq!(pit.poll(clock.now_ns()), 1);
        let next = pit.next_irq_deadline_ns().unwrap();
        assert!(next > clock.now_ns() && next - clock.now_ns() <= 4_000_178);
    }

    #[test]
    fn mode4_oneshot_like_linux_clockevents() {
        let (mut pit, clock) = pit();
        out(&mut pit, 0x43, 0x38); // pit_set_oneshot: ch0, lohi, mode 4
        assert_eq!(pit.next_irq_deadline_ns(), None, "no count yet");
        out(&mut pit, 0x40, 100);
        out(&mut pit, 0x40, 0);
        let t0 = ns_to_ticks(clock.now_ns());
        assert_eq!(pit.next_irq_deadline_ns(), Some(ticks_to_ns(t0 + 101)));
        clock.set(ticks_to_ns(t0 + 200));
        assert_eq!(pit.poll(clock.now_ns()), 1);
        clock.advance(1_000_000_000);
        assert_eq!(pit.poll(clock.now_ns()), 0, "one-shot");
        assert_eq!(pit.next_irq_deadline_ns(), None);
    }

    #[test]
    fn edges_before_reprogramming_are_not_lost() {
        let (mut pit, clock) = pit();
        out(&mut pit, 0x43, 0x30); // mode 0
        out(&mut pit, 0x40, 10);
        out(&mut pit, 0x40, 0);
        clock.advance(1_000_000); // ~1193 ticks: terminal count passed
        out(&mut pit, 0x43, 0x30); // reprogram before any poll
        assert_eq!(pit.next_irq_deadline_ns().map(|d| d <= clock.now_ns()), Some(true));
        assert_eq!(pit.poll(clock.now_ns()), 1);
    }

    #[test]
    fn channel2_mode0_out2_via_port61() {
        let (mut pit, clock) = pit();
        // Linux's pit_calibrate_tsc: gate high, speaker off, mode 0, 50 ms latch.
        let v = inb(&mut pit, 0x61);
        out(&mut pit, 0x61, (v & !0x02) | 0x01);
        out(&mut pit, 0x43, 0xB0);
        let latch: u16 = 59659; // CLOCK_TICK_RATE / (1000 / 50)
        out(&mut pit, 0x42, latch as u8);
        out(&mut pit, 0x42, (latch >> 8) as u8);
        let t0 = ns_to_ticks(clock.now_ns());
        assert_eq!(inb(&mut pit, 0x61) & 0x20, 0, "OUT2 low while counting");
        clock.set(ticks_to_ns(t0 + u64::from(latch) - 1));
        assert_eq!(inb(&mut pit, 0x61) & 0x20, 0);
        clock.set(ticks_to_ns(t0 + u64::from(latch)));
        assert_eq!(inb(&mut pit, 0x61) & 0x21, 0x21, "OUT2 high at terminal count, gate reads back");
        assert!((ticks_to_ns(u64::from(latch)) as i64 - 50_000_000).abs() < 10_000);
        // Channel 2 never raises IRQ0.
        assert_eq!(pit.poll(clock.now_ns()), 0);
    }

    #[test]
    fn gate_low_holds_mode0() {
        let (mut pit, clock) = pit();
        out(&mut pit, 0x43, 0xB0);
        out(&mut pit, 0x42, 0xE8); // 1000
        out(&mut pit, 0x42, 0x03);
        clock.advance(ticks_to_ns(1_000_000));
        // Gate low: the counter does not count.
        assert_eq!(inb(&mut pit, 0x42), 0xE8);
        assert_eq!(inb(&mut pit, 0x42), 0x03);
        out(&mut pit, 0x61, 0x01);
        let t0 = ns_to_ticks(clock.now_ns());
        clock.set(ticks_to_ns(t0 + 400));
        out(&mut pit, 0x61, 0x00);
        clock.advance(50_000_000);
        out(&mut pit, 0x43, 0x80); // latch channel 2
        let count = u16::from_le_bytes([inb(&mut pit, 0x42), inb(&mut pit, 0x42)]);
        assert_eq!(count, 600);
        assert_eq!(inb(&mut pit, 0x61) & 0x20, 0);
    }

    #[test]
    fn counter_latch_freezes_the_value_read() {
        let (mut pit, clock) = pit();
        out(&mut pit, 0x43, 0x34);
        out(&mut pit, 0x40, 0x00);
        out(&mut pit, 0x40, 0x10); // 4096
        let t0 = ns_to_ticks(clock.now_ns());
        clock.set(ticks_to_ns(t0 + 96));
        out(&mut pit, 0x43, 0x00); // latch channel 0
        clock.set(ticks_to_ns(t0 + 1000));
        out(&mut pit, 0x43, 0x00); // a second latch is ignored until read
        assert_eq!(inb(&mut pit, 0x40), 0xA0);
        assert_eq!(inb(&mut pit, 0x40), 0x0F, "4096 - 96 = 0x0fa0");
        // Live reads now: 4096 - 1000 = 3096 = 0x0c18.
        assert_eq!(inb(&mut pit, 0x40), 0x18);
        assert_eq!(inb(&mut pit, 0x40), 0x0C);
        // Mode 2 reloads: 4096 + 96 ticks in is 4000 again.
        clock.set(ticks_to_ns(t0 + 4096 + 96));
        out(&mut pit, 0x43, 0x00);
        assert_eq!(u16::from_le_bytes([inb(&mut pit, 0x40), inb(&mut pit, 0x40)]), 4000);
    }

    #[test]
    fn read_back_status_then_count() {
        let (mut pit, clock) = pit();
        out(&mut pit, 0x43, 0x72); // ch1, lohi, mode 1
        assert_eq!(inb(&mut pit, 0x41), 0x00);
        out(&mut pit, 0x43, 0xE4); // read-back status of ch1 (count not latched)
        assert_eq!(inb(&mut pit, 0x41), 0x40 | 0x30 | 0x02 | 0x80, "OUT high, null count, lohi, mode 1");
        out(&mut pit, 0x43, 0x30); // ch0 mode 0
        out(&mut pit, 0x40, 0x34);
        out(&mut pit, 0x40, 0x12);
        let t0 = ns_to_ticks(clock.now_ns());
        clock.set(ticks_to_ns(t0 + 0x10));
        out(&mut pit, 0x43, 0xC2); // read-back count and status of ch0
        clock.advance(1_000_000);
        assert_eq!(inb(&mut pit, 0x40), 0x30, "status: OUT low, count loaded, lohi, mode 0, binary");
        assert_eq!(inb(&mut pit, 0x40), 0x24);
        assert_eq!(inb(&mut pit, 0x40), 0x12);
    }

    #[test]
    fn bcd_counting() {
        let (mut pit, clock) = pit();
        out(&mut pit, 0x43, 0x21); // ch0, hibyte only, mode 0, BCD
        out(&mut pit, 0x40, 0x50); // 5000
        let t0 = ns_to_ticks(clock.now_ns());
        clock.set(ticks_to_ns(t0 + 1234));
        out(&mut pit, 0x43, 0xD2); // read-back: latch count only for ch0
        assert_eq!(inb(&mut pit, 0x40), 0x37, "hibyte of BCD 3766");
        clock.set(ticks_to_ns(t0 + 5000));
        assert_eq!(pit.poll(clock.now_ns()), 1);
    }

    #[test]
    fn mode1_and_mode5_wait_for_a_gate_trigger() {
        let (mut pit, clock) = pit();
        out(&mut pit, 0x43, 0xB2); // ch2, lohi, mode 1 (hardware one-shot)
        out(&mut pit, 0x42, 50);
        out(&mut pit, 0x42, 0);
        clock.advance(ticks_to_ns(500));
        assert!(pit.out2(), "OUT high until triggered");
        out(&mut pit, 0x61, 0x01); // rising gate edge triggers
        let t0 = ns_to_ticks(clock.now_ns());
        clock.set(ticks_to_ns(t0 + 10));
        assert!(!pit.out2(), "OUT low while counting");
        clock.set(ticks_to_ns(t0 + 30));
        out(&mut pit, 0x61, 0x00);
        out(&mut pit, 0x61, 0x01); // retrigger restarts the count
        let t1 = ns_to_ticks(clock.now_ns());
        clock.set(ticks_to_ns(t1 + 49));
        assert!(!pit.out2());
        clock.set(ticks_to_ns(t1 + 50));
        assert!(pit.out2());
        out(&mut pit, 0x43, 0xBA); // ch2, lohi, mode 5 (hardware strobe)
        out(&mut pit, 0x42, 20);
        out(&mut pit, 0x42, 0);
        out(&mut pit, 0x61, 0x00);
        out(&mut pit, 0x61, 0x01);
        let t2 = ns_to_ticks(clock.now_ns());
        let outs: Vec<bool> = [19, 20, 21]
            .iter()
            .map(|&d| {
                clock.set(ticks_to_ns(t2 + d));
                pit.out2()
            })
            .collect();
        assert_eq!(outs, vec![true, false, true], "one-tick strobe at terminal count");
    }

    #[test]
    fn mode3_square_wave_on_channel2() {
        let (mut pit, clock) = pit();
        out(&mut pit, 0x61, 0x03);
        out(&mut pit, 0x43, 0xB6); // ch2, lohi, mode 3 (the speaker beep)
        out(&mut pit, 0x42, 100);
        out(&mut pit, 0x42, 0);
        let t0 = ns_to_ticks(clock.now_ns());
        let outs: Vec<bool> = [0, 49, 50, 99, 100, 149, 150]
            .iter()
            .map(|&d| {
                clock.set(ticks_to_ns(t0 + d));
                pit.out2()
            })
            .collect();
        assert_eq!(outs, vec![true, true, false, false, true, true, false]);
    }
}
