//! PCI configuration mechanism #1 (ports 0xcf8 address, 0xcfc-0xcff data)
//! with a host bridge at 00:00.0, and the reset control register at 0xcf9.
//!
//! There is no firmware: whatever BARs and interrupt lines devices have are
//! assigned by the VMM when it builds the machine (and announced in the MP
//! table), and the guest finds them already programmed. Absent functions
//! read all-ones, so Linux's probes see an empty slot.

use super::bus::{all_ones, PortDevice};
use super::misc::{EventSink, PlatformEvent};
use crate::layout::{PORT_PCI_CONFIG_ADDRESS, PORT_PCI_CONFIG_DATA, PORT_PCI_RESET_CONTROL};

/// One PCI function's configuration space (256 bytes, dword access).
pub trait PciFunction: Send {
    fn config_read(&mut self, offset: u8) -> u32;
    /// `mask` has ones on the bytes written.
    fn config_write(&mut self, offset: u8, value: u32, mask: u32);
}

/// A type 0 configuration header whose writable bits are given per dword.
pub struct ConfigSpace {
    regs: [u32; 64],
    writable: [u32; 64],
}

impl ConfigSpace {
    /// A header with vendor/device IDs, class code (class << 16 | subclass
    /// << 8 | prog-if) and revision; command register writable.
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut regs = [0u32; 64];
        let mut writable = [0u32; 64];
        regs[0] = u32::from(vendor) | (u32::from(device) << 16);
        regs[1] = 0x0200_0000; // status: medium DEVSEL timing
        writable[1] = 0x0000_0547; // command: I/O, memory, master, parity, SERR, INTx disable
        regs[2] = (class << 8) | u32::from(revision);
        writable[3] = 0x0000_FF00; // latency timer
        writable[15] = 0x0000_00FF; // interrupt line (the guest's own note)
        Self { regs, writable }
    }

    pub fn set(&mut self, dword: usize, value: u32, writable: u32) {
        self.regs[dword] = value;
        self.writable[dword] = writable;
    }
}

impl PciFunction for ConfigSpace {
    fn config_read(&mut self, offset: u8) -> u32 {
        self.regs[usize::from(offset >> 2)]
    }

    fn config_write(&mut self, offset: u8, value: u32, mask: u32) {
        let i = usize::from(offset >> 2);
        let w = self.writable[i] & mask;
        self.regs[i] = (self.regs[i] & !w) | (value & w);
    }
}

/// The host bridge at 00:00.0: Intel's 440FX PMC IDs, as QEMU's `pc` has.
pub fn host_bridge() -> ConfigSpace {
    ConfigSpace::new(0x8086, 0x1237, 0x06_00_00, 0x02)
}

/// The configuration ports and the functions on bus 0.
pub struct PciBus {
    events: EventSink,
    address: u32,
    reset_control: u8,
    /// Functions by device number (function 0 only).
    devices: Vec<(u8, Box<dyn PciFunction>)>,
}

impl PciBus {
    pub fn new(events: EventSink) -> Self {
        Self { events, address: 0, reset_control: 0, devices: Vec::new() }
    }

    /// Puts `f` at 00:`device`.0.
    pub fn add(&mut self, device: u8, f: Box<dyn PciFunction>) {
        self.devices.retain(|(d, _)| *d != device);
        self.devices.push((device, f));
    }

    /// The function the address register selects: (function, dword offset).
    fn selected(&mut self) -> Option<(&mut Box<dyn PciFunction>, u8)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let (bus, device, function) = ((a >> 16) & 0xFF, ((a >> 11) & 0x1F) as u8, (a >> 8) & 7);
        if bus != 0 || function != 0 {
            return None;
        }
        let offset = (a & 0xFC) as u8;
        self.devices.iter_mut().find(|(d, _)| *d == device).map(|(_, f)| (f, offset))
    }
}

impl PortDevice for PciBus {
    fn read(&mut self, port: u16, size: u8) -> u32 {
        match (port, size) {
            (PORT_PCI_CONFIG_ADDRESS, 4) => self.address,
            (PORT_PCI_RESET_CONTROL, 1) => u32::from(self.reset_control),
            (p, _) if p >= PORT_PCI_CONFIG_DATA => {
                let shift = 8 * u32::from(p - PORT_PCI_CONFIG_DATA);
                match self.selected() {
                    Some((f, offset)) => (f.config_read(offset) >> shift) & all_ones(size),
                    None => all_ones(size),
                }
            }
            _ => all_ones(size),
        }
    }

    fn write(&mut self, port: u16, size: u8, value: u32) {
        match (port, size) {
            (PORT_PCI_CONFIG_ADDRESS, 4) => self.address = value & 0x80FF_FFFC,
            (PORT_PCI_RESET_CONTROL, 1) => {
                self.reset_control = value as u8 & 0x0A;
                if value & 0x04 != 0 {
                    tracing::info!(value, "0xcf9: reset");
                    self.events.push(PlatformEvent::Reset);
                }
            }
            (p, _) if p >= PORT_PCI_CONFIG_DATA => {
                let shift = 8 * u32::from(p - PORT_PCI_CONFIG_DATA);
                if let Some((f, offset)) = self.selected() {
                    f.config_write(offset, value << shift, all_ones(size) << shift);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> (PciBus, EventSink) {
        let events = EventSink::new();
        let mut b = PciBus::new(events.clone());
        b.add(0, Box::new(host_bridge()));
        (b, events)
    }

    fn cfg(dev: u8, offset: u8) -> u32 {
        0x8000_0000 | (u32::from(dev) << 11) | u32::from(offset)
    }

    #[test]
    fn host_bridge_is_found_by_mechanism_1() {
        let (mut b, _) = bus();
        // Linux's pci_check_type1, then pci_sanity_check's class read.
        b.write(0xCFB, 1, 0x01);
        b.write(0xCF8, 4, 0x8000_0000);
        assert_eq!(b.read(0xCF8, 4), 0x8000_0000);
        assert_eq!(b.read(0xCFC, 4), 0x1237_8086);
        assert_eq!(b.read(0xCFE, 2), 0x1237);
        b.write(0xCF8, 4, cfg(0, 0x08));
        assert_eq!(b.read(0xCFE, 2), 0x0600, "host bridge class");
        assert_eq!(b.read(0xCFC, 1), 0x02, "revision");
        b.write(0xCF8, 4, cfg(1, 0));
        assert_eq!(b.read(0xCFC, 4), 0xFFFF_FFFF, "empty slot");
        b.write(0xCF8, 4, cfg(0, 0) | (1 << 16));
        assert_eq!(b.read(0xCFC, 4), 0xFFFF_FFFF, "no bus 1");
        b.write(0xCF8, 4, cfg(0, 0) & !0x8000_0000);
        assert_eq!(b.read(0xCFC, 4), 0xFFFF_FFFF, "enable bit clear");
    }

    #[test]
    fn only_writable_bits_change() {
        let (mut b, events) = bus();
        b.write(0xCF8, 4, cfg(0, 0x00));
        b.write(0xCFC, 4, 0);
        assert_eq!(b.read(0xCFC, 4), 0x1237_8086, "IDs are read-only");
        b.write(0xCF8, 4, cfg(0, 0x04));
        b.write(0xCFC, 2, 0xFFFF);
        assert_eq!(b.read(0xCFC, 2), 0x0547);
        b.write(0xCF8, 4, cfg(0, 0x3C));
        b.write(0xCFC, 1, 0x0B);
        assert_eq!(b.read(0xCFC, 4) & 0xFF, 0x0B, "interrupt line");
        b.write(0xCF9, 1, 0x06);
        assert_eq!(events.take(), vec![PlatformEvent::Reset]);
    }
}
