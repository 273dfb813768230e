//! Platform storms: the machine model driven straight through its port and
//! MMIO buses, as a guest would through IN/OUT and MMIO exits, but with no
//! guest and no CPU: PIC, PIT, CMOS/RTC, UART, i8042, port 0x92, PCI
//! configuration, the local APIC and the I/O APIC (pc machine), and
//! virtio-pci devices. Between accesses the manual clock jumps (by a
//! nanosecond or by years), timers are polled, interrupts acknowledged and
//! console input pushed.
//!
//! Checks: no panic; no spin (one `poll_timers` or access returns within
//! [`SLOW_OP`], whatever the timers were programmed to); no growth (the
//! heap the platform holds after a storm is within [`GROWTH_LIMIT`] of what
//! it held before, when the guard allocator is installed); at most one
//! vector per acknowledge.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Unstructured;

use super::Target;
use crate::devices::clock::ManualClock;
use crate::devices::platform::{Machine, Platform, PlatformConfig};
use crate::devices::virtio::rng::Rng;
use crate::layout::{IOAPIC_BASE, LAPIC_BASE, PCI_IO_BASE};
use crate::memory::GuestMemory;

/// An operation slower than this is a spin.
pub const SLOW_OP: Duration = Duration::from_millis(200);
/// Heap growth over one storm that counts as unbounded.
pub const GROWTH_LIMIT: usize = 1 << 20;

/// Ports of the devices, weighted by being listed.
pub(super) const PORTS: &[u16] = &[
    0x20,
    0x21,
    0xA0,
    0xA1,
    0x4D0,
    0x4D1,
    0x40,
    0x41,
    0x42,
    0x43,
    0x61,
    0x60,
    0x64,
    0x70,
    0x71,
    0x80,
    0x92,
    0xF4,
    0x3F8,
    0x3F9,
    0x3FA,
    0x3FB,
    0x3FC,
    0x3FD,
    0x3FE,
    0x3FF,
    0xCF8,
    0xCF9,
    0xCFA,
    0xCFB,
    0xCFC,
    0xCFD,
    0xCFE,
    0xCFF,
    0x8900,
    PCI_IO_BASE,
    PCI_IO_BASE + 0x08,
    PCI_IO_BASE + 0x0E,
    PCI_IO_BASE + 0x10,
    PCI_IO_BASE + 0x12,
    PCI_IO_BASE + 0x13,
    PCI_IO_BASE + 0x14,
];
/// Local APIC registers.
pub(super) const LAPIC_REGS: &[u64] = &[
    0x20, 0x30, 0x80, 0xB0, 0xD0, 0xE0, 0xF0, 0x100, 0x200, 0x280, 0x300, 0x310, 0x320, 0x350, 0x360, 0x370, 0x380,
    0x390, 0x3E0,
];

struct Storm {
    mem: Arc<GuestMemory>,
}

pub fn platform() -> Result<Box<dyn Target>, String> {
    Ok(Box::new(Storm { mem: Arc::new(GuestMemory::new(2 << 20).map_err(|e| e.to_string())?) }))
}

fn timed(what: &str, f: impl FnOnce()) -> Result<(), String> {
    let t = Instant::now();
    f();
    let took = t.elapsed();
    if took > SLOW_OP {
        return Err(format!("{what} took {:.0} ms (a spin?)", took.as_secs_f64() * 1e3));
    }
    Ok(())
}

impl Target for Storm {
    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        let mut u = Unstructured::new(input);
        self.go(&mut u).unwrap_or(Ok(()))
    }
}

impl Storm {
    fn go(&mut self, u: &mut Unstructured<'_>) -> arbitrary::Result<Result<(), String>> {
        let machine = if u.ratio(3u8, 4)? { Machine::Pc } else { Machine::Isa };
        let clock = ManualClock::new(u.int_in_range(0..=1u64 << 40)?);
        let wall = ManualClock::new(u.arbitrary()?);
        let config = PlatformConfig {
            ram_size: u.arbitrary()?,
            console: Box::new(std::io::sink()),
            clock: Arc::new(clock.clone()),
            wall_clock: Arc::new(wall),
        };
        let hz = *u.choose(&[1u64, 1_000_000_000, 3_000_000_000, u64::MAX])?;
        let mut p = match Platform::with_machine(config, machine, hz, hz) {
            Ok(p) => p,
            Err(e) => return Ok(Err(format!("platform: {e}"))),
        };
        if machine == Machine::Pc {
            if let Err(e) = p.add_virtio(Box::new(Rng::default()), &self.mem) {
                return Ok(Err(format!("add_virtio: {e}")));
            }
        }
        let guard = super::alloc::installed();
        let before = if guard { super::alloc::live() } else { 0 };
        while !u.is_empty() {
            let r = match u.int_in_range(0..=15u8)? {
                0..=3 => {
                    let port = if u.ratio(4u8, 5)? { *u.choose(PORTS)? } else { u.arbitrary()? };
                    let size = *u.choose(&[1u8, 2, 4])?;
                    let value: u32 = u.arbitrary()?;
                    timed("io_out", || p.io_out(port, size, value))
                }
                4 | 5 => {
                    let port = if u.ratio(4u8, 5)? { *u.choose(PORTS)? } else { u.arbitrary()? };
                    let size = *u.choose(&[1u8, 2, 4])?;
                    timed("io_in", || {
                        let _ = p.io_in(port, size);
                    })
                }
                6 => {
                    // A program sequence: PIT channel 0 with a tiny divisor,
                    // PIC initialization, an RTC periodic rate, or the APIC
                    // timer's TSC-deadline mode and its MSR.
                    match u.int_in_range(0..=3u8)? {
                        0 => {
                            let mode = *u.choose(&[0x34u32, 0x36, 0x30, 0x32, 0x38, 0x3A])?;
                            let div: u16 = *u.choose(&[0u16, 1, 2, 3, 0xFFFF])?;
                            p.io_out(0x43, 1, mode);
                            p.io_out(0x40, 1, u32::from(div & 0xFF));
                            p.io_out(0x40, 1, u32::from(div >> 8));
                        }
                        1 => {
                            for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 4), (0x21, 1), (0x21, 0)] {
                                p.io_out(port, 1, v);
                            }
                        }
                        // (The CPU hands the MSR over on the pc machine only.)
                        2 if machine == Machine::Pc => {
                            use crate::cpu::policy::msr::TSC_DEADLINE;
                            if u.arbitrary()? {
                                let lvt = *u.choose(&[0x4_0030u32, 0x5_0030, 0x2_0030, 0x6_0030, 0x30])?;
                                p.mmio_write(LAPIC_BASE + 0x320, &lvt.to_le_bytes());
                            }
                            let (value, tsc): (u64, u64) = (u.arbitrary()?, u.arbitrary()?);
                            let r = timed("msr_write", || p.msr_write(TSC_DEADLINE, value, tsc));
                            let _ = p.next_deadline_ns();
                            let r = r.and(timed("msr_read", || {
                                let _ = p.msr_read(TSC_DEADLINE);
                            }));
                            if let Err(e) = r {
                                return Ok(Err(e));
                            }
                        }
                        2 => {}
                        _ => {
                            p.io_out(0x70, 1, 0x0A);
                            p.io_out(0x71, 1, u32::from(u.int_in_range(0x20..=0x2Fu8)?));
                            p.io_out(0x70, 1, 0x0B);
                            p.io_out(0x71, 1, u32::from(u.arbitrary::<u8>()?));
                        }
                    }
                    Ok(())
                }
                7 => {
                    // PCI configuration: address then data.
                    let addr =
                        0x8000_0000u32 | (u.int_in_range(0..=3u32)? << 11) | u32::from(u.arbitrary::<u8>()? & 0xFC);
                    p.io_out(0xCF8, 4, addr);
                    let off = u.int_in_range(0..=3u16)?;
                    if u.arbitrary()? {
                        p.io_out(0xCFC + off, *u.choose(&[1u8, 2, 4])?, u.arbitrary()?);
                    } else {
                        let _ = p.io_in(0xCFC + off, *u.choose(&[1u8, 2, 4])?);
                    }
                    Ok(())
                }
                8 | 9 => {
                    // MMIO: the APICs' registers or anywhere.
                    let addr = match u.int_in_range(0..=3u8)? {
                        0 | 1 => {
                            LAPIC_BASE
                                + *u.choose(LAPIC_REGS)?
                                + u64::from(u.int_in_range(0..=3u8)?) * 4 * u64::from(u.ratio(1u8, 8)?)
                        }
                        2 => IOAPIC_BASE + *u.choose(&[0u64, 0x10, 0x40])?,
                        _ => u.arbitrary()?,
                    };
                    let len = *u.choose(&[1usize, 2, 4, 8])?;
                    if u.arbitrary()? {
                        let data: Vec<u8> = (0..len).map(|_| u.arbitrary()).collect::<arbitrary::Result<_>>()?;
                        timed("mmio_write", || p.mmio_write(addr, &data))
                    } else {
                        let mut data = vec![0u8; len];
                        timed("mmio_read", || p.mmio_read(addr, &mut data))
                    }
                }
                10 | 11 => {
                    let step = match u.int_in_range(0..=3u8)? {
                        0 => u.int_in_range(0..=1000u64)?,
                        1 => u.int_in_range(0..=10_000_000u64)?,
                        2 => u.int_in_range(0..=1u64 << 40)?,
                        _ => u.int_in_range(0..=1u64 << 56)?,
                    };
                    clock.advance(step);
                    let now = p.now_ns();
                    let r = timed("poll_timers", || p.poll_timers(now));
                    let _ = p.next_deadline_ns();
                    r
                }
                12 | 13 => {
                    // The CPU takes what is pending (and EOIs it sometimes).
                    // A level-triggered line held high with auto-EOI stays
                    // pending for ever, as on hardware: that is the guest's
                    // business, so only the time each step takes is checked.
                    let eoi = u.arbitrary::<bool>()?;
                    let mut r = Ok(());
                    for _ in 0..u.int_in_range(1..=64u8)? {
                        if !p.pending_interrupt() {
                            break;
                        }
                        let mut v = None;
                        r = timed("acknowledge_interrupt", || v = p.acknowledge_interrupt());
                        if r.is_err() || v.is_none() {
                            break;
                        }
                        super::note("interrupt acknowledged");
                        if eoi {
                            p.io_out(0x20, 1, 0x20);
                            p.io_out(0xA0, 1, 0x20);
                            if machine == Machine::Pc {
                                p.mmio_write(LAPIC_BASE + 0xB0, &[0; 4]);
                            }
                        }
                    }
                    r
                }
                14 => {
                    let n = u.int_in_range(0..=200usize)?;
                    let bytes = u.bytes(n.min(u.len()))?.to_vec();
                    p.push_console_input(&bytes);
                    Ok(())
                }
                _ => {
                    if !p.take_events().is_empty() {
                        super::note("platform events");
                    }
                    let _ = (p.loop_state(), p.a20_enabled(), p.stats(), p.virtio_stats(), p.pci_irqs());
                    Ok(())
                }
            };
            if let Err(e) = r {
                return Ok(Err(e));
            }
        }
        let _ = p.take_events();
        if guard {
            let grew = super::alloc::live().saturating_sub(before);
            if grew > GROWTH_LIMIT {
                return Ok(Err(format!("the platform grew by {} KiB over one storm", grew >> 10)));
            }
        }
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn platform_smoke() {
        super::super::smoke("platform", 300);
    }
}
