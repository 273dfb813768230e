//! MC146818 real-time clock and CMOS RAM at 0x70 (index, bit 7 = NMI
//! disable) and 0x71 (data), IRQ8.
//!
//! Time: the wall clock is read once, at creation; from then on the RTC
//! advances with the monotonic [`Clock`] that also drives the PIT, so a
//! virtual clock makes the RTC deterministic too. The guest may set the time
//! (with or without register B's SET bit); it then runs from the new value.
//!
//! Registers 0-9 and the century (0x32) are computed from that time on every
//! read, in BCD or binary and 12- or 24-hour format per register B. Register
//! A's UIP bit is high for the last 244 µs of every second, so a guest that
//! waits for UIP to be clear reads a stable time. Register C's PF, AF and UF
//! flags are set by the periodic rate, the alarm and the end of each update
//! (lazily, from elapsed time), cleared on read, and drive IRQ8 through PIE,
//! AIE and UIE. Not modelled: daylight-saving (DSE), square-wave output, the
//! divider's reset states (register A bits 4-6 are stored only).

use std::sync::Arc;

use super::bus::{read_bytewise, write_bytewise, PortDevice};
use super::clock::{Clock, WallClock};
use crate::layout::PORT_CMOS;

const NS: i128 = 1_000_000_000;
/// UIP is high for this long before each update.
const UIP_NS: i128 = 244_000;

const REG_SECONDS: u8 = 0x00;
const REG_SECONDS_ALARM: u8 = 0x01;
const REG_MINUTES: u8 = 0x02;
const REG_MINUTES_ALARM: u8 = 0x03;
const REG_HOURS: u8 = 0x04;
const REG_HOURS_ALARM: u8 = 0x05;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0A;
const REG_B: u8 = 0x0B;
const REG_C: u8 = 0x0C;
const REG_D: u8 = 0x0D;
const REG_CENTURY: u8 = 0x32;

const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;

const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// 0 = Sunday.
    pub weekday: u8,
}

impl DateTime {
    /// From seconds since the Unix epoch (H. Hinnant's `civil_from_days`).
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let tod = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year,
            month,
            day,
            hour: (tod / 3600) as u8,
            minute: (tod / 60 % 60) as u8,
            second: (tod % 60) as u8,
            weekday: (days + 4).rem_euclid(7) as u8,
        }
    }

    /// Seconds since the Unix epoch (`days_from_civil`); the weekday is ignored.
    pub fn to_unix(&self) -> i64 {
        let (m, d) = (i64::from(self.month.clamp(1, 12)), i64::from(self.day.clamp(1, 31)));
        let y = self.year - i64::from(m <= 2);
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        days * 86_400 + i64::from(self.hour) * 3600 + i64::from(self.minute) * 60 + i64::from(self.second)
    }
}

fn to_bcd(v: u8) -> u8 {
    (v / 10) << 4 | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0F)
}

pub struct Cmos {
    clock: Arc<dyn Clock>,
    ram: [u8; 128],
    index: u8,
    nmi_disabled: bool,
    /// Guest time at monotonic `base_mono`, in ns since the epoch.
    base_guest_ns: i128,
    base_mono: u64,
    /// While register B's SET bit is on: the time being set, field by field
    /// (a day of 31 written before the month must not be normalized yet).
    frozen: Option<DateTime>,
    /// Register C flags (PF, AF, UF) up to `synced_mono`.
    flags: u8,
    synced_mono: u64,
}

impl Cmos {
    /// A CMOS for a guest with `ram_size` bytes of RAM, its clock set from `wall`.
    pub fn new(ram_size: u64, clock: Arc<dyn Clock>, wall: &dyn WallClock) -> Self {
        let now = clock.now_ns();
        let mut ram = [0u8; 128];
        ram[usize::from(REG_A)] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        ram[usize::from(REG_B)] = B_24H;
        ram[usize::from(REG_D)] = 0x80; // valid RAM and time
        ram[0x14] = 0x02; // equipment: FPU present, VGA, no floppy
        let set16 = |ram: &mut [u8; 128], at: usize, v: u64| {
            let v = v.min(0xFFFF) as u16;
            ram[at..at + 2].copy_from_slice(&v.to_le_bytes());
        };
        set16(&mut ram, 0x15, 640); // base memory, KiB
        let ext_kib = ram_size.saturating_sub(1 << 20) >> 10;
        set16(&mut ram, 0x17, ext_kib); // memory above 1 MiB, KiB
        set16(&mut ram, 0x30, ext_kib);
        set16(&mut ram, 0x34, ram_size.saturating_sub(16 << 20) >> 16); // above 16 MiB, 64 KiB units
        Self {
            clock,
            ram,
            index: 0,
            nmi_disabled: false,
            base_guest_ns: i128::from(wall.now_unix_ns()),
            base_mono: now,
            frozen: None,
            flags: 0,
            synced_mono: now,
        }
    }

    /// Port 0x70 bit 7 as last written.
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    /// The IRQ8 output: register C's IRQF.
    pub fn irq_level(&self) -> bool {
        self.irqf() != 0
    }

    /// Brings register C up to `now_ns`; returns the IRQ8 level.
    pub fn poll(&mut self, now_ns: u64) -> bool {
        self.sync(now_ns);
        self.irq_level()
    }

    /// When the next enabled interrupt condition is due, if any and if IRQ8
    /// is not already asserted (nothing new can happen until register C is read).
    pub fn next_deadline_ns(&self) -> Option<u64> {
        if self.irq_level() {
            return None;
        }
        let now = self.clock.now_ns();
        let b = self.reg_b();
        let periodic = (b & B_PIE != 0).then(|| self.period_ns()).flatten().map(|p| (now / p + 1) * p);
        let update = (b & (B_UIE | B_AIE) != 0 && self.frozen.is_none()).then(|| {
            let into_second = self.guest_ns(now).rem_euclid(NS);
            now + (NS - into_second) as u64
        });
        periodic.into_iter().chain(update).min()
    }

    /// The guest's current time.
    pub fn guest_time(&self) -> DateTime {
        DateTime::from_unix(self.guest_secs(self.clock.now_ns()))
    }

    fn reg_b(&self) -> u8 {
        self.ram[usize::from(REG_B)]
    }

    fn irqf(&self) -> u8 {
        let b = self.reg_b();
        let enabled = (b & B_PIE != 0 && self.flags & C_PF != 0)
            || (b & B_AIE != 0 && self.flags & C_AF != 0)
            || (b & B_UIE != 0 && self.flags & C_UF != 0);
        if enabled {
            C_IRQF
        } else {
            0
        }
    }

    /// The periodic interrupt period from register A's rate select.
    fn period_ns(&self) -> Option<u64> {
        let rate = self.ram[usize::from(REG_A)] & 0x0F;
        let shift = match rate {
            0 => return None,
            1 | 2 => rate + 7,
            r => r - 1,
        };
        Some(((1u64 << shift) * 1_000_000_000) / 32_768)
    }

    fn guest_ns(&self, mono: u64) -> i128 {
        match self.frozen {
            Some(t) => i128::from(t.to_unix()) * NS,
            None => self.base_guest_ns + i128::from(mono) - i128::from(self.base_mono),
        }
    }

    fn guest_secs(&self, mono: u64) -> i64 {
        self.guest_ns(mono).div_euclid(NS) as i64
    }

    /// Sets the flags for what happened between the last sync and `now`.
    fn sync(&mut self, now: u64) {
        let last = self.synced_mono;
        if now <= last {
            return;
        }
        if let Some(p) = self.period_ns() {
            if now / p > last / p {
                self.flags |= C_PF;
            }
        }
        if self.frozen.is_none() {
            let (from, to) = (self.guest_secs(last), self.guest_secs(now));
            if to > from {
                self.flags |= C_UF;
                // Check the alarm at each update, at most a day's worth.
                if ((from + 1).max(to - 86_400)..=to).any(|s| self.alarm_matches(s)) {
                    self.flags |= C_AF;
                }
            }
        }
        self.synced_mono = now;
    }

    fn alarm_matches(&self, secs: i64) -> bool {
        let t = DateTime::from_unix(secs);
        // An alarm byte of 0xC0-0xFF matches any value.
        let matches = |alarm: u8, v: u8| {
            let a = self.ram[usize::from(alarm)];
            a >= 0xC0 || a == v
        };
        matches(REG_SECONDS_ALARM, self.encode(t.second))
            && matches(REG_MINUTES_ALARM, self.encode(t.minute))
            && matches(REG_HOURS_ALARM, self.encode_hour(t.hour))
    }

    fn encode(&self, v: u8) -> u8 {
        if self.reg_b() & B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.reg_b() & B_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, h: u8) -> u8 {
        if self.reg_b() & B_24H != 0 {
            return self.encode(h);
        }
        let pm = if h >= 12 { 0x80 } else { 0 };
        let h12 = match h % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.reg_b() & B_24H != 0 {
            return self.decode(v);
        }
        let h12 = self.decode(v & 0x7F) % 12;
        h12 + if v & 0x80 != 0 { 12 } else { 0 }
    }

    fn fields(&self, now: u64) -> DateTime {
        self.frozen.unwrap_or_else(|| DateTime::from_unix(self.guest_secs(now)))
    }

    fn read_time_reg(&self, reg: u8, now: u64) -> u8 {
        let t = self.fields(now);
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(DateTime::from_unix(t.to_unix()).weekday + 1),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u8),
            _ => self.encode(t.year.div_euclid(100).clamp(0, 99) as u8),
        }
    }

    fn write_time_reg(&mut self, reg: u8, value: u8, now: u64) {
        let mut t = self.fields(now);
        match reg {
            REG_SECONDS => t.second = self.decode(value).min(59),
            REG_MINUTES => t.minute = self.decode(value).min(59),
            REG_HOURS => t.hour = self.decode_hour(value).min(23),
            REG_DAY => t.day = self.decode(value),
            REG_MONTH => t.month = self.decode(value),
            REG_YEAR => t.year = t.year.div_euclid(100) * 100 + i64::from(self.decode(value) % 100),
            REG_CENTURY => t.year = i64::from(self.decode(value)) * 100 + t.year.rem_euclid(100),
            // The weekday follows from the date.
            _ => return,
        }
        self.sync(now);
        match &mut self.frozen {
            Some(f) => *f = t,
            None => self.base_guest_ns += i128::from(t.to_unix() - self.guest_secs(now)) * NS,
        }
    }

    fn write_reg_b(&mut self, value: u8, now: u64) {
        self.sync(now);
        let was_set = self.reg_b() & B_SET != 0;
        let set = value & B_SET != 0;
        if set && !was_set {
            self.frozen = Some(DateTime::from_unix(self.guest_secs(now)));
        } else if !set && was_set {
            // The clock restarts from the time set, at the start of a second.
            let secs = self.frozen.take().map_or_else(|| self.guest_secs(now), |t| t.to_unix());
            self.base_guest_ns = i128::from(secs) * NS;
            self.base_mono = now;
        }
        // Setting SET clears UIE (data sheet).
        self.ram[usize::from(REG_B)] = if set { value & !B_UIE } else { value };
    }

    fn read_data(&mut self) -> u8 {
        let now = self.clock.now_ns();
        match self.index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH | REG_YEAR | REG_CENTURY => {
                self.read_time_reg(self.index, now)
            }
            REG_A => {
                let into_second = self.guest_ns(now).rem_euclid(NS);
                let uip = self.frozen.is_none() && into_second >= NS - UIP_NS;
                self.ram[usize::from(REG_A)] & 0x7F | if uip { 0x80 } else { 0 }
            }
            REG_C => {
                self.sync(now);
                let v = self.flags | self.irqf();
                self.flags = 0;
                v
            }
            i => self.ram[usize::from(i)],
        }
    }

    fn write_data(&mut self, value: u8) {
        let now = self.clock.now_ns();
        match self.index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH | REG_YEAR | REG_CENTURY => {
                self.write_time_reg(self.index, value, now)
            }
            REG_A => {
                self.sync(now);
                self.ram[usize::from(REG_A)] = value & 0x7F;
            }
            REG_B => self.write_reg_b(value, now),
            // C and D are read-only.
            REG_C | REG_D => {}
            i => self.ram[usize::from(i)] = value,
        }
    }
}

impl PortDevice for Cmos {
    fn read(&mut self, port: u16, size: u8) -> u32 {
        read_bytewise(port, size, |p| if p == PORT_CMOS + 1 { self.read_data() } else { 0xFF })
    }

    fn write(&mut self, port: u16, size: u8, value: u32) {
        write_bytewise(port, size, value, |p, b| match p {
            PORT_CMOS => {
                self.index = b & 0x7F;
                self.nmi_disabled = b & 0x80 != 0;
            }
            p if p == PORT_CMOS + 1 => self.write_data(b),
            _ => {}
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::clock::ManualClock;
    use super::*;

    /// 2024-02-29 13:45:07 UTC, a Thursday.
    const T0: u64 = 1_709_214_307;

    fn cmos(ram: u64) -> (Cmos, ManualClock) {
        let mono = ManualClock::new(5_000_000_000);
        let wall = ManualClock::new(T0 * 1_000_000_000);
        (Cmos::new(ram, Arc::new(mono.clone()), &wall), mono)
    }

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0x70, 1, u32::from(reg) | 0x80);
        c.read(0x71, 1) as u8
    }

    fn write(c: &mut Cmos, reg: u8, v: u8) {
        c.write(0x70, 1, u32::from(reg));
        c.write(0x71, 1, u32::from(v));
    }

    #[test]
    fn civil_conversions() {
        let t = DateTime::from_unix(T0 as i64);
        assert_eq!((t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday), (2024, 2, 29, 13, 45, 7, 4));
        assert_eq!(t.to_unix(), T0 as i64);
        assert_eq!(DateTime::from_unix(0).weekday, 4, "1970-01-01 was a Thursday");
        for s in [0i64, 951_782_400, 4_102_444_800, -86_400] {
            assert_eq!(DateTime::from_unix(s).to_unix(), s);
        }
    }

    #[test]
    fn time_in_bcd_24h_by_default() {
        let (mut c, _) = cmos(64 << 20);
        assert_eq!(read(&mut c, 0x0B) & 0x06, 0x02);
        assert_eq!(read(&mut c, 0x00), 0x07);
        assert_eq!(read(&mut c, 0x02), 0x45);
        assert_eq!(read(&mut c, 0x04), 0x13);
        assert_eq!(read(&mut c, 0x06), 0x05, "Thursday is day 5");
        assert_eq!(read(&mut c, 0x07), 0x29);
        assert_eq!(read(&mut c, 0x08), 0x02);
        assert_eq!(read(&mut c, 0x09), 0x24);
        assert_eq!(read(&mut c, 0x32), 0x20);
        assert!(c.nmi_disabled());
    }

    #[test]
    fn time_in_binary_and_12h() {
        let (mut c, clock) = cmos(64 << 20);
        write(&mut c, 0x0B, 0x04); // binary, 12-hour
        assert_eq!(read(&mut c, 0x00), 7);
        assert_eq!(read(&mut c, 0x02), 45);
        assert_eq!(read(&mut c, 0x04), 0x80 | 1, "1 PM");
        assert_eq!(read(&mut c, 0x09), 24);
        assert_eq!(read(&mut c, 0x32), 20);
        clock.advance(60 * 1_000_000_000);
        assert_eq!(read(&mut c, 0x02), 46, "the clock runs with the monotonic clock");
        write(&mut c, 0x0B, 0x06); // binary, 24-hour
        assert_eq!(read(&mut c, 0x04), 13);
    }

    #[test]
    fn guest_sets_the_time_with_set_bit() {
        let (mut c, clock) = cmos(64 << 20);
        write(&mut c, 0x0B, 0x82); // SET, BCD, 24h
        write(&mut c, 0x04, 0x23);
        write(&mut c, 0x02, 0x59);
        write(&mut c, 0x00, 0x58);
        write(&mut c, 0x07, 0x31);
        write(&mut c, 0x08, 0x12);
        write(&mut c, 0x09, 0x99);
        write(&mut c, 0x32, 0x19);
        clock.advance(10_000_000_000);
        assert_eq!(read(&mut c, 0x00), 0x58, "frozen while SET");
        write(&mut c, 0x0B, 0x02);
        clock.advance(2_500_000_000);
        let t = c.guest_time();
        assert_eq!((t.year, t.month, t.day, t.hour, t.minute, t.second), (2000, 1, 1, 0, 0, 0));
        assert_eq!(read(&mut c, 0x09), 0x00);
        assert_eq!(read(&mut c, 0x32), 0x20);
    }

    #[test]
    fn uip_high_just_before_each_update() {
        let (mut c, clock) = cmos(64 << 20);
        // T0 is on a second boundary at mono 5 s.
        clock.set(5_500_000_000);
        assert_eq!(read(&mut c, 0x0A), 0x26);
        clock.set(5_999_800_000);
        assert_eq!(read(&mut c, 0x0A), 0xA6);
        assert_eq!(read(&mut c, 0x00), 0x07);
        clock.set(6_000_000_000);
        assert_eq!(read(&mut c, 0x0A), 0x26);
        assert_eq!(read(&mut c, 0x00), 0x08);
    }

    #[test]
    fn update_and_periodic_flags_raise_irq8_and_clear_on_read() {
        let (mut c, clock) = cmos(64 << 20);
        write(&mut c, 0x0B, 0x12); // UIE
        assert!(!c.poll(clock.now_ns()));
        assert_eq!(c.next_deadline_ns(), Some(6_000_000_000));
        clock.set(6_000_000_000);
        assert!(c.poll(clock.now_ns()));
        assert_eq!(c.next_deadline_ns(), None, "IRQ8 stays asserted until C is read");
        assert_eq!(read(&mut c, 0x0C), 0xD0, "IRQF, UF, and PF (set at 1024 Hz even without PIE)");
        assert!(!c.irq_level());
        assert_eq!(read(&mut c, 0x0C), 0x00);
        // Periodic at 1024 Hz (rate 6).
        write(&mut c, 0x0B, 0x42);
        let d = c.next_deadline_ns().unwrap();
        assert!(d > clock.now_ns() && d - clock.now_ns() <= 976_562);
        clock.set(d - 1);
        assert!(!c.poll(d - 1));
        clock.set(d);
        assert!(c.poll(d));
        assert_eq!(read(&mut c, 0x0C), 0xC0);
    }

    #[test]
    fn alarm_flag() {
        let (mut c, clock) = cmos(64 << 20);
        write(&mut c, 0x01, 0x10); // alarm at hh:mm:10 ...
        write(&mut c, 0x03, 0xFF); // ... any minute
        write(&mut c, 0x05, 0xFF); // ... any hour
        write(&mut c, 0x0B, 0x22); // AIE
        clock.set(7_000_000_000); // 13:45:09
        assert!(!c.poll(clock.now_ns()));
        clock.set(8_000_000_000); // 13:45:10
        assert!(c.poll(clock.now_ns()));
        assert_eq!(read(&mut c, 0x0C) & 0xA0, 0xA0);
    }

    #[test]
    fn memory_size_bytes() {
        let (mut c, _) = cmos(48 << 20);
        let word = |c: &mut Cmos, r: u8| u16::from(read(c, r)) | u16::from(read(c, r + 1)) << 8;
        assert_eq!(word(&mut c, 0x15), 640);
        assert_eq!(word(&mut c, 0x17), 47 * 1024);
        assert_eq!(word(&mut c, 0x30), 47 * 1024);
        assert_eq!(word(&mut c, 0x34), 32 * 16, "32 MiB above 16 MiB in 64 KiB units");
        let (mut big, _) = cmos(3 << 30);
        assert_eq!(word(&mut big, 0x17), 0xFFFF);
        assert_eq!(word(&mut big, 0x34), 0xBF00);
        assert_eq!(read(&mut big, 0x0D), 0x80);
    }

    #[test]
    fn ram_bytes_are_stored() {
        let (mut c, _) = cmos(64 << 20);
        write(&mut c, 0x40, 0xAB);
        assert_eq!(read(&mut c, 0x40), 0xAB);
        write(&mut c, 0x0D, 0x00);
        assert_eq!(read(&mut c, 0x0D), 0x80, "register D is read-only");
    }
}
