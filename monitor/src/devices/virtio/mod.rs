//! virtio devices on legacy virtio-pci (virtio 0.9.5 / the 1.x spec's
//! "legacy interface"): a PCI function per device whose BAR0 is an I/O range
//! holding the legacy register block, and INTA# on an I/O APIC pin.
//!
//! Why legacy: every register is a port, so a queue notification or an ISR
//! read is an `OUT`/`IN`, a callout in translated code (~0.6 µs here),
//! where the modern transport's MMIO BARs cost a host page fault and a
//! signal (5-9 µs) per access. Debian's kernels build `VIRTIO_PCI_LEGACY`.
//!
//! Rings are read through rust-vmm's `virtio-queue` on a `vm-memory` view of
//! guest RAM ([`guest_memory_view`]). Guest memory is untrusted: a ring or
//! a descriptor chain that does not make sense puts the device in the
//! DEVICE_NEEDS_RESET state (status bit 0x40); it does nothing more until
//! the driver resets it. A request that is well formed but wrong (a sector
//! beyond the disk) completes with an error status, as on hardware.
//!
//! Requests are served synchronously, on the queue-notify `OUT`.

pub mod blk;
pub mod pci;
pub mod rng;

use std::sync::Arc;

use thiserror::Error;
pub use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::memory::GuestMemory;

/// virtio device types.
pub const TYPE_BLOCK: u16 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK as u16;
pub const TYPE_RNG: u16 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG as u16;

/// Why a device stopped (DEVICE_NEEDS_RESET).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VirtioError {
    #[error("queue {queue}: {what}")]
    Ring { queue: usize, what: String },
    #[error("descriptor chain at head {head}: {what}")]
    Chain { head: u16, what: &'static str },
    #[error("guest memory {addr:#x}+{len:#x} is not RAM")]
    Memory { addr: u64, len: u64 },
}

/// A `vm-memory` view of guest RAM sharing the monitor's mapping.
pub fn guest_memory_view(mem: &Arc<GuestMemory>) -> GuestMemoryMmap {
    // SAFETY: `host_base()..+size()` is the live MAP_SHARED read/write
    // mapping `mem` owns; every device holding the view also holds the
    // `Arc<GuestMemory>`, so the mapping outlives the view, and vm-memory
    // does not unmap a raw region it did not create.
    let region = unsafe {
        MmapRegion::build_raw(
            mem.host_base(),
            mem.size() as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
    }
    .expect("a page-aligned, non-empty mapping is a valid raw region");
    let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("guest RAM starts at 0");
    GuestMemoryMmap::from_regions(vec![region]).expect("one region")
}

/// Guest RAM as a device sees it: the view and what keeps it alive.
#[derive(Clone)]
pub struct DeviceMemory {
    pub view: Arc<GuestMemoryMmap>,
    _owner: Arc<GuestMemory>,
}

impl DeviceMemory {
    pub fn new(mem: &Arc<GuestMemory>) -> Self {
        Self { view: Arc::new(guest_memory_view(mem)), _owner: mem.clone() }
    }
}

/// One popped request: its head index and its descriptors, checked to form
/// a complete chain over guest RAM.
pub struct Chain {
    pub head: u16,
    pub descs: Vec<Descriptor>,
}

/// What a device model implements; the transport does the rest.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u16;
    /// Name on the buses and in stats (`virtio-blk`).
    fn name(&self) -> &'static str;
    /// Legacy 32-bit device feature bits.
    fn features(&self) -> u32;
    /// Maximum size of each queue (the legacy interface uses exactly it).
    fn queue_sizes(&self) -> &[u16];
    /// Device-specific configuration bytes.
    fn config(&self) -> Vec<u8>;
    /// Serves one request; returns the number of bytes written into the
    /// chain's writable descriptors. An `Err` breaks the device.
    fn serve(&mut self, queue: usize, chain: &Chain, mem: &GuestMemoryMmap) -> Result<u32, VirtioError>;
    /// Device counters, `(name, value)`.
    fn stats(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Pops every available chain of `queue`, serves it and puts it in the used
/// ring. Returns whether the driver must be interrupted.
pub fn process_queue(
    dev: &mut dyn VirtioDevice,
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, VirtioError> {
    let ring = |e: virtio_queue::Error| VirtioError::Ring { queue: index, what: e.to_string() };
    let mut served = false;
    loop {
        let chain = {
            let mut iter = queue.iter(mem).map_err(ring)?;
            match iter.next() {
                Some(c) => c,
                None => break,
            }
        };
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.collect();
        let chain = check_chain(head, descs, mem)?;
        let written = dev.serve(index, &chain, mem)?;
        queue.add_used(mem, head, written).map_err(ring)?;
        served = true;
    }
    Ok(served && queue.needs_notification(mem).map_err(ring)?)
}

/// A chain must end (virtio-queue stops silently at a bad index, a loop or a
/// bad indirect table: the last descriptor then still says NEXT), be
/// non-empty, and lie in RAM.
fn check_chain(head: u16, descs: Vec<Descriptor>, mem: &GuestMemoryMmap) -> Result<Chain, VirtioError> {
    let Some(last) = descs.last() else {
        return Err(VirtioError::Chain { head, what: "no descriptor (head index or table outside the queue/RAM)" });
    };
    if last.has_next() {
        return Err(VirtioError::Chain { head, what: "does not end (a loop, a bad next index or indirect table)" });
    }
    for d in &descs {
        if !vm_memory::GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(VirtioError::Memory { addr: d.addr().0, len: u64::from(d.len()) });
        }
    }
    Ok(Chain { head, descs })
}

/// Reads `len` bytes at `addr` of guest RAM.
pub fn read_guest(mem: &GuestMemoryMmap, addr: GuestAddress, buf: &mut [u8]) -> Result<(), VirtioError> {
    use vm_memory::Bytes;
    mem.read_slice(buf, addr).map_err(|_| VirtioError::Memory { addr: addr.0, len: buf.len() as u64 })
}

/// Writes `buf` at `addr` of guest RAM.
pub fn write_guest(mem: &GuestMemoryMmap, addr: GuestAddress, buf: &[u8]) -> Result<(), VirtioError> {
    use vm_memory::Bytes;
    mem.write_slice(buf, addr).map_err(|_| VirtioError::Memory { addr: addr.0, len: buf.len() as u64 })
}

#[cfg(test)]
pub(crate) mod testing {
    //! Made-up guest memory with a legacy split ring, for device tests.

    use super::*;

    pub const RING: u64 = 0x1_0000;
    pub const QSIZE: u16 = 16;
    pub const DESC_F_NEXT: u16 = 1;
    pub const DESC_F_WRITE: u16 = 2;

    pub fn memory() -> (Arc<GuestMemory>, DeviceMemory) {
        let mem = Arc::new(GuestMemory::new(4 << 20).unwrap());
        let dm = DeviceMemory::new(&mem);
        (mem, dm)
    }

    /// A ready queue at `RING` in the legacy layout.
    pub fn queue() -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        let (d, a, u) = pci::legacy_ring_addresses(RING, QSIZE);
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(d as u32), Some(0));
        q.set_avail_ring_address(Some(a as u32), Some(0));
        q.set_used_ring_address(Some(u as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `i`.
    pub fn desc(mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let o = RING + 16 * u64::from(i);
        let mut b = Vec::new();
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&next.to_le_bytes());
        mem.write(o, &b).unwrap();
    }

    /// Makes `heads` available (avail idx = their count).
    pub fn publish(mem: &GuestMemory, heads: &[u16]) {
        let (_, a, _) = pci::legacy_ring_addresses(RING, QSIZE);
        for (i, h) in heads.iter().enumerate() {
            mem.write(a + 4 + 2 * i as u64, &h.to_le_bytes()).unwrap();
        }
        mem.write(a + 2, &(heads.len() as u16).to_le_bytes()).unwrap();
    }

    /// The used ring: (idx, [(id, len)]).
    pub fn used(mem: &GuestMemory) -> (u16, Vec<(u32, u32)>) {
        let (_, _, u) = pci::legacy_ring_addresses(RING, QSIZE);
        let mut b = [0u8; 4];
        mem.read(u, &mut b).unwrap();
        let idx = u16::from_le_bytes([b[2], b[3]]);
        let mut v = Vec::new();
        for i in 0..u64::from(idx) {
            let mut e = [0u8; 8];
            mem.read(u + 4 + 8 * i, &mut e).unwrap();
            v.push((u32::from_le_bytes(e[0..4].try_into().unwrap()), u32::from_le_bytes(e[4..8].try_into().unwrap())));
        }
        (idx, v)
    }
}
