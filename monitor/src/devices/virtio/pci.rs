//! The legacy virtio-pci transport: the register block of a device in its
//! I/O BAR, and the PCI configuration header that announces it.
//!
//! ```text
//! BAR0 + 0x00  u32  device features (RO)     0x0e  u16  queue select
//!        0x04  u32  driver features          0x10  u16  queue notify (W)
//!        0x08  u32  queue address (PFN)      0x12  u8   device status
//!        0x0c  u16  queue size (RO)          0x13  u8   ISR (read clears)
//!        0x14       device configuration (no MSI-X)
//! ```

use virtio_queue::{Queue, QueueT};

use super::{process_queue, DeviceMemory, VirtioDevice, VirtioError};
use crate::devices::bus::{read_bytewise, PortDevice};
use crate::devices::pci::ConfigSpace;

/// Size of each device's I/O BAR.
pub const BAR_SIZE: u16 = 0x100;
/// Ring alignment of the legacy interface.
pub const VRING_ALIGN: u64 = 4096;
/// Device status: the device hit an error and needs a reset.
pub const STATUS_NEEDS_RESET: u8 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
/// Offset of the device configuration in the register block.
const CONFIG_OFFSET: u16 = 0x14;

/// Descriptor table, available ring and used ring of a legacy queue of
/// `size` entries at `base` (virtio 0.9.5 section 2.3).
pub fn legacy_ring_addresses(base: u64, size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    let avail = base + 16 * n;
    let used = (avail + 4 + 2 * n + 2).div_ceil(VRING_ALIGN) * VRING_ALIGN;
    (base, avail, used)
}

/// PCI header of a legacy virtio device: Red Hat's vendor ID, the
/// transitional device ID, subsystem = type, BAR0 at `io_base` (I/O), INTA#
/// whose line register says `irq`.
pub fn config_header(device_type: u16, io_base: u16, irq: u8) -> ConfigSpace {
    let class = match device_type {
        super::TYPE_BLOCK => 0x01_80_00,
        _ => 0x00_FF_00,
    };
    // Transitional device IDs (virtio 1.x, 4.1.2.1): 0x1001 block, 0x1005 entropy.
    let id = match device_type {
        super::TYPE_BLOCK => 0x1001,
        super::TYPE_RNG => 0x1005,
        t => 0x1040 + t,
    };
    let mut c = ConfigSpace::new(0x1AF4, id, class, 0);
    c.set(4, u32::from(io_base) | 1, !(u32::from(BAR_SIZE) - 1));
    c.set(11, 0x1AF4 | (u32::from(device_type) << 16), 0);
    c.set(15, u32::from(irq) | (1 << 8), 0xFF);
    c
}

/// One device behind the legacy transport.
pub struct VirtioPci {
    dev: Box<dyn VirtioDevice>,
    mem: DeviceMemory,
    io_base: u16,
    queues: Vec<Queue>,
    pfns: Vec<u32>,
    driver_features: u32,
    select: u16,
    status: u8,
    isr: u8,
    broken: Option<VirtioError>,
    pub notifications: u64,
}

impl VirtioPci {
    pub fn new(dev: Box<dyn VirtioDevice>, mem: DeviceMemory, io_base: u16) -> Self {
        let queues = dev.queue_sizes().iter().map(|&s| Queue::new(s).expect("a power of two")).collect::<Vec<_>>();
        let pfns = vec![0; queues.len()];
        Self {
            dev,
            mem,
            io_base,
            queues,
            pfns,
            driver_features: 0,
            select: 0,
            status: 0,
            isr: 0,
            broken: None,
            notifications: 0,
        }
    }

    pub fn name(&self) -> &'static str {
        self.dev.name()
    }

    pub fn device_type(&self) -> u16 {
        self.dev.device_type()
    }

    /// INTA#: asserted while the ISR is non-zero.
    pub fn irq_level(&self) -> bool {
        self.isr != 0
    }

    /// Why the device stopped, if it did.
    pub fn broken(&self) -> Option<&VirtioError> {
        self.broken.as_ref()
    }

    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let mut v = self.dev.stats();
        v.push(("notifications", self.notifications));
        v
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.pfns.iter_mut().for_each(|p| *p = 0);
        self.driver_features = 0;
        self.select = 0;
        self.status = 0;
        self.isr = 0;
        self.broken = None;
    }

    fn set_pfn(&mut self, pfn: u32) {
        let i = usize::from(self.select);
        let Some(q) = self.queues.get_mut(i) else { return };
        self.pfns[i] = pfn;
        if pfn == 0 {
            q.reset();
            return;
        }
        let size = q.max_size();
        let (d, a, u) = legacy_ring_addresses(u64::from(pfn) << 12, size);
        q.set_size(size);
        q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
        q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
        q.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
        q.set_ready(true);
    }

    fn notify(&mut self, index: u16) {
        self.notifications += 1;
        if self.broken.is_some() {
            return;
        }
        let i = usize::from(index);
        let Some(q) = self.queues.get_mut(i) else { return };
        if !q.ready() {
            return;
        }
        match process_queue(self.dev.as_mut(), i, q, &self.mem.view) {
            Ok(true) => self.isr |= 1,
            Ok(false) => {}
            Err(e) => {
                crate::guest_warn!(device = self.dev.name(), "virtio: {e}; device needs a reset");
                self.broken = Some(e);
                self.status |= STATUS_NEEDS_RESET;
                self.isr |= 2; // configuration change: the driver looks at the status
            }
        }
    }

    fn read_byte(&mut self, offset: u16) -> u8 {
        let word = |v: u32, o: u16| (v >> (8 * u32::from(o))) as u8;
        let queue_size = self.queues.get(usize::from(self.select)).map_or(0, |q| q.max_size());
        let pfn = self.pfns.get(usize::from(self.select)).copied().unwrap_or(0);
        match offset {
            0x00..=0x03 => word(self.dev.features(), offset),
            0x04..=0x07 => word(self.driver_features, offset - 0x04),
            0x08..=0x0B => word(pfn, offset - 0x08),
            0x0C..=0x0D => word(u32::from(queue_size), offset - 0x0C),
            0x0E..=0x0F => word(u32::from(self.select), offset - 0x0E),
            0x10..=0x11 => 0,
            0x12 => self.status,
            0x13 => std::mem::take(&mut self.isr),
            o => self.dev.config().get(usize::from(o - CONFIG_OFFSET)).copied().unwrap_or(0),
        }
    }
}

impl PortDevice for VirtioPci {
    fn read(&mut self, port: u16, size: u8) -> u32 {
        let offset = port.wrapping_sub(self.io_base);
        read_bytewise(offset, size, |o| self.read_byte(o))
    }

    fn write(&mut self, port: u16, size: u8, value: u32) {
        match (port.wrapping_sub(self.io_base), size) {
            (0x04, 4) => self.driver_features = value & self.dev.features(),
            (0x08, 4) => self.set_pfn(value),
            (0x0E, 2) => self.select = value as u16,
            (0x10, 2) => self.notify(value as u16),
            (0x12, 1) => {
                if value == 0 {
                    self.reset();
                } else {
                    self.status = value as u8 | (self.status & STATUS_NEEDS_RESET);
                }
            }
            (o, s) => tracing::debug!(device = self.dev.name(), offset = o, size = s, "virtio-pci: write ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::rng::Rng;
    use super::super::testing::*;
    use super::*;

    const IO: u16 = 0xC000;

    fn rng_device() -> (std::sync::Arc<crate::memory::GuestMemory>, VirtioPci) {
        let (mem, dm) = memory();
        (mem, VirtioPci::new(Box::new(Rng::default()), dm, IO))
    }

    #[test]
    fn legacy_ring_layout() {
        assert_eq!(legacy_ring_addresses(0x1_0000, 256), (0x1_0000, 0x1_1000, 0x1_2000));
        assert_eq!(legacy_ring_addresses(0x1_0000, 16), (0x1_0000, 0x1_0100, 0x1_1000));
    }

    #[test]
    fn header_announces_a_legacy_device() {
        use crate::devices::pci::PciFunction;
        let mut h = config_header(super::super::TYPE_BLOCK, IO, 16);
        assert_eq!(h.config_read(0), 0x1001_1AF4);
        assert_eq!(h.config_read(0x08) >> 8, 0x01_80_00);
        assert_eq!(h.config_read(0x10), u32::from(IO) | 1);
        h.config_write(0x10, 0xFFFF_FFFF, 0xFFFF_FFFF);
        assert_eq!(h.config_read(0x10), 0xFFFF_FF01, "BAR sizing: 256 bytes of I/O");
        h.config_write(0x10, u32::from(IO) | 1, 0xFFFF_FFFF);
        assert_eq!(h.config_read(0x2C), 0x0002_1AF4);
        assert_eq!(h.config_read(0x3C) & 0xFFFF, 0x0110, "INTA#, line 16");
    }

    #[test]
    fn driver_setup_notify_interrupt_and_reset() {
        let (mem, mut d) = rng_device();
        assert_eq!(d.read(IO + 0x0C, 2), 16, "queue 0 size");
        d.write(IO + 0x12, 1, 0x03);
        d.write(IO + 0x0E, 2, 0);
        d.write(IO + 0x08, 4, (RING >> 12) as u32);
        assert_eq!(d.read(IO + 0x08, 4), (RING >> 12) as u32);
        d.write(IO + 0x12, 1, 0x07);
        desc(&mem, 0, 0x3_0000, 32, DESC_F_WRITE, 0);
        publish(&mem, &[0]);
        d.write(IO + 0x10, 2, 0);
        assert!(d.irq_level());
        assert_eq!(used(&mem), (1, vec![(0, 32)]));
        assert_eq!(d.read(IO + 0x13, 1), 1, "queue interrupt");
        assert!(!d.irq_level(), "reading the ISR lowers INTA#");
        assert_eq!(d.read(IO + 0x13, 1), 0);
        d.write(IO + 0x12, 1, 0);
        assert_eq!(d.read(IO + 0x12, 1), 0);
        assert_eq!(d.read(IO + 0x08, 4), 0);
    }

    #[test]
    fn a_looping_chain_breaks_the_device_until_reset() {
        let (mem, mut d) = rng_device();
        d.write(IO + 0x08, 4, (RING >> 12) as u32);
        d.write(IO + 0x12, 1, 0x07);
        desc(&mem, 0, 0x3_0000, 8, DESC_F_WRITE | DESC_F_NEXT, 1);
        desc(&mem, 1, 0x3_0100, 8, DESC_F_WRITE | DESC_F_NEXT, 0);
        publish(&mem, &[0]);
        d.write(IO + 0x10, 2, 0);
        assert!(matches!(d.broken(), Some(VirtioError::Chain { head: 0, .. })), "{:?}", d.broken());
        assert_eq!(d.read(IO + 0x12, 1) & 0x40, 0x40);
        assert_eq!(used(&mem).0, 0, "nothing completed");
        // More notifications do nothing; a reset brings it back.
        d.write(IO + 0x10, 2, 0);
        d.write(IO + 0x12, 1, 0);
        assert!(d.broken().is_none());
    }

    #[test]
    fn bad_rings_break_the_device_without_a_panic() {
        // An available index far ahead of the queue size.
        let (mem, mut d) = rng_device();
        d.write(IO + 0x08, 4, (RING >> 12) as u32);
        let (_, a, _) = legacy_ring_addresses(RING, QSIZE);
        mem.write(a + 2, &0x8000u16.to_le_bytes()).unwrap();
        d.write(IO + 0x10, 2, 0);
        assert!(matches!(d.broken(), Some(VirtioError::Ring { .. })), "{:?}", d.broken());
        // A ring beyond guest RAM.
        let (_, mut d) = rng_device();
        d.write(IO + 0x08, 4, 0x000F_FFFF);
        d.write(IO + 0x10, 2, 0);
        assert!(d.broken().is_some());
        // A descriptor pointing outside RAM; a head index beyond the table.
        for (addr, head) in [(0xFFFF_0000u64, 0u16), (0x3_0000, 40)] {
            let (mem, mut d) = rng_device();
            d.write(IO + 0x08, 4, (RING >> 12) as u32);
            desc(&mem, 0, addr, 64, DESC_F_WRITE, 0);
            publish(&mem, &[head]);
            d.write(IO + 0x10, 2, 0);
            assert!(d.broken().is_some(), "addr {addr:#x} head {head}");
        }
        // Notifying a queue that does not exist is ignored.
        let (_, mut d) = rng_device();
        d.write(IO + 0x10, 2, 7);
        assert!(d.broken().is_none());
    }
}
