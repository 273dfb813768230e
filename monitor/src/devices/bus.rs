//! Port I/O and MMIO buses: devices registered on non-overlapping ranges,
//! dispatch by address, all-ones for unclaimed addresses, per-device counters.
//!
//! A device is shared behind `Arc<Mutex<_>>` so that one device can sit on
//! several ranges (the PIT also answers port 0x61, the PIC pair 0x4d0) and so
//! that the platform keeps a typed handle next to the bus's `dyn` one. Devices
//! themselves hold no locks and start no threads.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

/// A device on the port I/O bus. `port` is absolute; `size` is 1, 2 or 4.
pub trait PortDevice {
    fn read(&mut self, port: u16, size: u8) -> u32;
    fn write(&mut self, port: u16, size: u8, value: u32);
}

/// A device on the MMIO bus. `addr` is absolute; `data.len()` is the access size.
pub trait MmioDevice {
    fn read(&mut self, addr: u64, data: &mut [u8]);
    fn write(&mut self, addr: u64, data: &[u8]);
}

/// A port device shared between the bus and its owner.
pub type SharedPortDevice = Arc<Mutex<dyn PortDevice + Send>>;
/// An MMIO device shared between the bus and its owner.
pub type SharedMmioDevice = Arc<Mutex<dyn MmioDevice + Send>>;

/// Locks a device mutex, ignoring poisoning: a device is plain data and a
/// panic elsewhere leaves it in a state as valid as any guest could make it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// All-ones masked to an access size in bytes.
pub fn all_ones(size: u8) -> u32 {
    match size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    }
}

/// Splits a 1/2/4-byte port read into byte reads at `port`, `port + 1`, ...
/// (little endian), as the ISA bus does for 8-bit devices.
/// A device whose registers are bytes at consecutive ports: a 16- or
/// 32-bit access touches the next ports in turn, as on the ISA bus.
pub trait ByteRegisters {
    fn read_byte(&mut self, port: u16) -> u8;
    fn write_byte(&mut self, port: u16, value: u8);
}

impl<T: ByteRegisters> PortDevice for T {
    fn read(&mut self, port: u16, size: u8) -> u32 {
        read_bytewise(port, size, |p| self.read_byte(p))
    }

    fn write(&mut self, port: u16, size: u8, value: u32) {
        write_bytewise(port, size, value, |p, b| self.write_byte(p, b))
    }
}

pub fn read_bytewise(port: u16, size: u8, mut read_byte: impl FnMut(u16) -> u8) -> u32 {
    (0..size.min(4)).fold(0u32, |acc, i| acc | u32::from(read_byte(port.wrapping_add(u16::from(i)))) << (8 * i))
}

/// Splits a 1/2/4-byte port write into byte writes (little endian).
pub fn write_bytewise(port: u16, size: u8, value: u32, mut write_byte: impl FnMut(u16, u8)) {
    for i in 0..size.min(4) {
        write_byte(port.wrapping_add(u16::from(i)), (value >> (8 * i)) as u8);
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device {name}: empty range at {base:#x}")]
    EmptyRange { name: &'static str, base: u64 },
    #[error("device {name}: range {base:#x}+{len:#x} wraps past the end of the address space")]
    RangeOverflow { name: &'static str, base: u64, len: u64 },
    #[error("device {name}: range {base:#x}+{len:#x} overlaps {other} at {other_base:#x}+{other_len:#x}")]
    Overlap { name: &'static str, base: u64, len: u64, other: &'static str, other_base: u64, other_len: u64 },
}

/// Access counters of one registered range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AccessCounts {
    pub reads: u64,
    pub writes: u64,
}

/// Counters of one registration, for `popek` stats output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStats {
    pub name: &'static str,
    pub base: u64,
    pub len: u64,
    pub counts: AccessCounts,
}

/// Index of a registration on a bus, returned by `register` and by dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceId(pub usize);

struct Entry<D: ?Sized> {
    name: &'static str,
    base: u64,
    len: u64,
    device: Arc<Mutex<D>>,
    counts: AccessCounts,
}

/// The range bookkeeping shared by both buses: `base -> entry index`.
struct RangeMap<D: ?Sized> {
    entries: Vec<Entry<D>>,
    by_base: BTreeMap<u64, usize>,
    unclaimed: AccessCounts,
    address_limit: u64,
}

impl<D: ?Sized> RangeMap<D> {
    fn new(address_limit: u64) -> Self {
        Self { entries: Vec::new(), by_base: BTreeMap::new(), unclaimed: AccessCounts::default(), address_limit }
    }

    fn insert(&mut self, name: &'static str, base: u64, len: u64, device: Arc<Mutex<D>>) -> Result<DeviceId, BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange { name, base });
        }
        let end = base.checked_add(len).filter(|&e| e <= self.address_limit);
        let end = end.ok_or(BusError::RangeOverflow { name, base, len })?;
        let clash = self.entries.iter().find(|e| base < e.base + e.len && e.base < end);
        if let Some(e) = clash {
            return Err(BusError::Overlap { name, base, len, other: e.name, other_base: e.base, other_len: e.len });
        }
        let id = self.entries.len();
        self.entries.push(Entry { name, base, len, device, counts: AccessCounts::default() });
        self.by_base.insert(base, id);
        Ok(DeviceId(id))
    }

    fn find(&self, addr: u64) -> Option<usize> {
        let (_, &i) = self.by_base.range(..=addr).next_back()?;
        let e = &self.entries[i];
        (addr < e.base + e.len).then_some(i)
    }

    fn stats(&self) -> Vec<DeviceStats> {
        let mut v: Vec<DeviceStats> = self
            .entries
            .iter()
            .map(|e| DeviceStats { name: e.name, base: e.base, len: e.len, counts: e.counts })
            .collect();
        v.sort_by_key(|s| s.base);
        v
    }
}

/// The port I/O bus (0x0000-0xffff).
pub struct PortBus {
    map: RangeMap<dyn PortDevice + Send>,
    /// One bit per port: unclaimed ports already logged.
    logged: Box<[u64; 1024]>,
}

impl Default for PortBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PortBus {
    pub fn new() -> Self {
        Self { map: RangeMap::new(0x1_0000), logged: Box::new([0; 1024]) }
    }

    /// Registers `device` on ports `base..base + len`.
    pub fn register(
        &mut self,
        name: &'static str,
        base: u16,
        len: u16,
        device: SharedPortDevice,
    ) -> Result<DeviceId, BusError> {
        self.map.insert(name, u64::from(base), u64::from(len), device)
    }

    /// The registration claiming `port`, if any.
    pub fn device_at(&self, port: u16) -> Option<DeviceId> {
        self.map.find(u64::from(port)).map(DeviceId)
    }

    /// Reads `size` bytes at `port`; unclaimed ports read as all-ones.
    pub fn read(&mut self, port: u16, size: u8) -> (u32, Option<DeviceId>) {
        match self.map.find(u64::from(port)) {
            Some(i) => {
                let e = &mut self.map.entries[i];
                e.counts.reads += 1;
                let v = lock(&e.device).read(port, size) & all_ones(size);
                (v, Some(DeviceId(i)))
            }
            None => {
                self.map.unclaimed.reads += 1;
                self.log_unclaimed(port, size, None);
                (all_ones(size), None)
            }
        }
    }

    /// Writes `size` bytes at `port`; writes to unclaimed ports are dropped.
    pub fn write(&mut self, port: u16, size: u8, value: u32) -> Option<DeviceId> {
        match self.map.find(u64::from(port)) {
            Some(i) => {
                let e = &mut self.map.entries[i];
                e.counts.writes += 1;
                lock(&e.device).write(port, size, value & all_ones(size));
                Some(DeviceId(i))
            }
            None => {
                self.map.unclaimed.writes += 1;
                self.log_unclaimed(port, size, Some(value));
                None
            }
        }
    }

    fn log_unclaimed(&mut self, port: u16, size: u8, value: Option<u32>) {
        let (word, bit) = (usize::from(port / 64), port % 64);
        if self.logged[word] & (1 << bit) == 0 {
            self.logged[word] |= 1 << bit;
            match value {
                None => tracing::debug!(port = format_args!("{port:#x}"), size, "read from unclaimed port"),
                Some(v) => {
                    tracing::debug!(
                        port = format_args!("{port:#x}"),
                        size,
                        value = format_args!("{v:#x}"),
                        "write to unclaimed port"
                    )
                }
            }
        }
    }

    /// Counters of every registration, by base port.
    pub fn stats(&self) -> Vec<DeviceStats> {
        self.map.stats()
    }

    /// Accesses to ports no device claims.
    pub fn unclaimed(&self) -> AccessCounts {
        self.map.unclaimed
    }
}

/// The MMIO bus (the 64-bit guest-physical space).
pub struct MmioBus {
    map: RangeMap<dyn MmioDevice + Send>,
    logged: HashSet<u64>,
}

impl Default for MmioBus {
    fn default() -> Self {
        Self::new()
    }
}

impl MmioBus {
    pub fn new() -> Self {
        Self { map: RangeMap::new(u64::MAX), logged: HashSet::new() }
    }

    /// Registers `device` on `base..base + len`.
    pub fn register(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: SharedMmioDevice,
    ) -> Result<DeviceId, BusError> {
        self.map.insert(name, base, len, device)
    }

    /// The registration claiming `addr`, if any.
    pub fn device_at(&self, addr: u64) -> Option<DeviceId> {
        self.map.find(addr).map(DeviceId)
    }

    /// Reads `data.len()` bytes at `addr`; unclaimed addresses read as all-ones.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> Option<DeviceId> {
        match self.map.find(addr) {
            Some(i) => {
                let e = &mut self.map.entries[i];
                e.counts.reads += 1;
                lock(&e.device).read(addr, data);
                Some(DeviceId(i))
            }
            None => {
                self.map.unclaimed.reads += 1;
                data.fill(0xFF);
                if self.logged.insert(addr) {
                    tracing::debug!(addr = format_args!("{addr:#x}"), size = data.len(), "read from unclaimed MMIO");
                }
                None
            }
        }
    }

    /// Writes `data` at `addr`; writes to unclaimed addresses are dropped.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Option<DeviceId> {
        match self.map.find(addr) {
            Some(i) => {
                let e = &mut self.map.entries[i];
                e.counts.writes += 1;
                lock(&e.device).write(addr, data);
                Some(DeviceId(i))
            }
            None => {
                self.map.unclaimed.writes += 1;
                if self.logged.insert(addr) {
                    tracing::debug!(addr = format_args!("{addr:#x}"), size = data.len(), "write to unclaimed MMIO");
                }
                None
            }
        }
    }

    /// Counters of every registration, by base address.
    pub fn stats(&self) -> Vec<DeviceStats> {
        self.map.stats()
    }

    /// Accesses to addresses no device claims.
    pub fn unclaimed(&self) -> AccessCounts {
        self.map.unclaimed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eight byte registers, remembering the last access.
    #[derive(Default)]
    struct Regs {
        bytes: [u8; 8],
        base: u16,
    }

    impl PortDevice for Regs {
        fn read(&mut self, port: u16, size: u8) -> u32 {
            read_bytewise(port, size, |p| {
                self.bytes.get(usize::from(p.wrapping_sub(self.base))).copied().unwrap_or(0xFF)
            })
        }
        fn write(&mut self, port: u16, size: u8, value: u32) {
            write_bytewise(port, size, value, |p, b| {
                if let Some(r) = self.bytes.get_mut(usize::from(p.wrapping_sub(self.base))) {
                    *r = b;
                }
            })
        }
    }

    fn regs(base: u16) -> SharedPortDevice {
        Arc::new(Mutex::new(Regs { base, ..Default::default() }))
    }

    #[test]
    fn overlapping_ranges_are_rejected() {
        let mut bus = PortBus::new();
        bus.register("a", 0x40, 4, regs(0x40)).unwrap();
        let err = bus.register("b", 0x43, 2, regs(0x43)).unwrap_err();
        assert_eq!(
            err,
            BusError::Overlap { name: "b", base: 0x43, len: 2, other: "a", other_base: 0x40, other_len: 4 }
        );
        let err = bus.register("c", 0x3e, 3, regs(0x3e)).unwrap_err();
        assert!(matches!(err, BusError::Overlap { other: "a", .. }));
        // Adjacent ranges on both sides are fine.
        bus.register("d", 0x44, 1, regs(0x44)).unwrap();
        bus.register("e", 0x3c, 4, regs(0x3c)).unwrap();
        assert_eq!(bus.register("f", 0x10, 0, regs(0x10)).unwrap_err(), BusError::EmptyRange { name: "f", base: 0x10 });
        assert!(matches!(bus.register("g", 0xFFFF, 2, regs(0)).unwrap_err(), BusError::RangeOverflow { .. }));
        bus.register("h", 0xFFFF, 1, regs(0xFFFF)).unwrap();
    }

    #[test]
    fn dispatch_by_range_and_counts() {
        let mut bus = PortBus::new();
        let a = bus.register("a", 0x40, 4, regs(0x40)).unwrap();
        let b = bus.register("b", 0x60, 8, regs(0x60)).unwrap();
        assert_eq!(bus.write(0x42, 1, 0x5A), Some(a));
        assert_eq!(bus.write(0x64, 2, 0x1234), Some(b));
        assert_eq!(bus.read(0x42, 1), (0x5A, Some(a)));
        assert_eq!(bus.read(0x64, 1).0, 0x34);
        assert_eq!(bus.read(0x65, 1).0, 0x12);
        assert_eq!(bus.read(0x64, 4).0, 0x0000_1234);
        let stats = bus.stats();
        assert_eq!(stats[0].name, "a");
        assert_eq!(stats[0].counts, AccessCounts { reads: 1, writes: 1 });
        assert_eq!(stats[1].counts, AccessCounts { reads: 3, writes: 1 });
    }

    #[test]
    fn unclaimed_ports_read_all_ones() {
        let mut bus = PortBus::new();
        bus.register("a", 0x40, 4, regs(0x40)).unwrap();
        assert_eq!(bus.read(0x44, 1), (0xFF, None));
        assert_eq!(bus.read(0x3F, 2), (0xFFFF, None));
        assert_eq!(bus.read(0x1234, 4), (0xFFFF_FFFF, None));
        assert_eq!(bus.write(0x1234, 4, 7), None);
        assert_eq!(bus.unclaimed(), AccessCounts { reads: 3, writes: 1 });
    }

    struct Ram(Vec<u8>, u64);

    impl MmioDevice for Ram {
        fn read(&mut self, addr: u64, data: &mut [u8]) {
            let o = (addr - self.1) as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, addr: u64, data: &[u8]) {
            let o = (addr - self.1) as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn mmio_bus_dispatch_overlap_and_unclaimed() {
        let mut bus = MmioBus::new();
        let dev: SharedMmioDevice = Arc::new(Mutex::new(Ram(vec![0; 0x1000], 0xFEE0_0000)));
        let id = bus.register("lapic", 0xFEE0_0000, 0x1000, dev).unwrap();
        let other: SharedMmioDevice = Arc::new(Mutex::new(Ram(vec![0; 0x10], 0xFEE0_0FF0)));
        assert!(matches!(bus.register("x", 0xFEE0_0FF0, 0x20, other).unwrap_err(), BusError::Overlap { .. }));
        assert_eq!(bus.write(0xFEE0_0080, &[1, 2, 3, 4]), Some(id));
        let mut buf = [0u8; 4];
        assert_eq!(bus.read(0xFEE0_0080, &mut buf), Some(id));
        assert_eq!(buf, [1, 2, 3, 4]);
        assert_eq!(bus.read(0xFEE0_1000, &mut buf), None);
        assert_eq!(buf, [0xFF; 4]);
        assert_eq!(bus.stats()[0].counts, AccessCounts { reads: 1, writes: 1 });
    }
}
