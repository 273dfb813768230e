//! What the shadow MMU needs from its host, as traits: guest-physical RAM and
//! the address window. The monitor implements them with its memfd and
//! `mmap`/`mprotect`; tests implement them with a `Vec<u8>` and a recorder
//! (`crate::fake`), so no host mechanics leak into this crate.

use thiserror::Error;

/// Host access rights of a window mapping, as code running in the window
/// (guest user code, translated kernel code) sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Prot {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

impl Prot {
    pub const NONE: Prot = Prot { read: false, write: false, exec: false };
    pub const R: Prot = Prot { read: true, write: false, exec: false };
    pub const RW: Prot = Prot { read: true, write: true, exec: false };
    pub const RX: Prot = Prot { read: true, write: false, exec: true };
    pub const RWX: Prot = Prot { read: true, write: true, exec: true };

    /// The same rights without write: what code protection and D-bit
    /// emulation turn a mapping into.
    pub const fn read_only(self) -> Prot {
        Prot { write: false, ..self }
    }

    /// The same rights with write.
    pub const fn writable(self) -> Prot {
        Prot { write: true, ..self }
    }
}

/// A guest-physical write landed outside RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("guest-physical address {0:#x} is not RAM")]
pub struct OutsideRam(pub u64);

/// Guest-physical RAM, little-endian, as the guest's page walker sees it.
///
/// Reads outside RAM return `None`; the walker then behaves like a PC's open
/// bus (all ones), which turns a page table pointing into a hole into a
/// reserved-bit or MMIO outcome instead of a monitor error.
pub trait PhysMem {
    fn read_u32(&self, gpa: u64) -> Option<u32>;
    fn read_u64(&self, gpa: u64) -> Option<u64>;
    fn write_u32(&mut self, gpa: u64, value: u32) -> Result<(), OutsideRam>;
    fn write_u64(&mut self, gpa: u64, value: u64) -> Result<(), OutsideRam>;
    /// Whether the 4 KiB frame holding `gpa` is plain RAM that may be mapped
    /// into the window (not MMIO, not a hole, inside the memfd).
    fn is_ram(&self, gpa: u64) -> bool;
    /// Reads `buf.len()` bytes at `gpa` (page-table snapshots); `false` if
    /// any of them is outside RAM (`buf` is then unspecified). Implementors
    /// with a flat view of RAM should override this with one copy.
    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let mut at = gpa;
        for chunk in buf.chunks_mut(4) {
            let Some(v) = self.read_u32(at) else { return false };
            chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
            at += 4;
        }
        true
    }

    /// Whether the `expected.len()` bytes at `gpa` are `expected` (a MOV
    /// CR3 compares page-table snapshots this way); `None` if any of them is
    /// outside RAM. Implementors with a flat view of RAM should override
    /// this with one comparison in place.
    fn bytes_equal(&self, gpa: u64, expected: &[u8]) -> Option<bool> {
        let mut buf = [0u8; 256];
        let mut at = gpa;
        for chunk in expected.chunks(buf.len()) {
            let now = &mut buf[..chunk.len()];
            if !self.read_bytes(at, now) {
                return None;
            }
            if now != chunk {
                return Some(false);
            }
            at += chunk.len() as u64;
        }
        Some(true)
    }
}

/// Which window operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    Map,
    Unmap,
    Protect,
}

/// A window operation the host refused. The shadow MMU never retries: the
/// monitor treats it as fatal (the shadow state no longer matches the host).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("host {op:?} of window range {gva:#x}+{len:#x} failed: {detail}")]
pub struct MapError {
    pub op: MapOp,
    pub gva: u32,
    pub len: u32,
    pub detail: String,
}

/// The address window: each call is one host syscall (1-6 µs here), so the
/// shadow MMU coalesces contiguous runs before calling.
///
/// All addresses and lengths are 4 KiB aligned and non-empty; ranges never
/// reach below the configured `mmap_min_addr` nor into the VMM area, and
/// `map` is only called for guest-physical RAM.
pub trait HostMapper {
    /// Maps guest-physical RAM `[gpa, gpa+len)` at guest-virtual `gva`,
    /// replacing whatever the window held there.
    fn map(&mut self, gva: u32, gpa: u64, len: u32, prot: Prot) -> Result<(), MapError>;
    /// Removes the mappings in `[gva, gva+len)`: accesses fault again.
    fn unmap(&mut self, gva: u32, len: u32) -> Result<(), MapError>;
    /// Changes the rights of mapped pages in `[gva, gva+len)`.
    fn protect(&mut self, gva: u32, len: u32, prot: Prot) -> Result<(), MapError>;
    /// Shadows now stand for the guest's 2/4 MiB page `[gva, gva+len)`: an
    /// INVLPG of any page in it, mapped or not, has work (the monitor's
    /// INVLPG filter listens). Nothing by default.
    fn note_large_page(&mut self, gva: u32, len: u32) {
        let _ = (gva, len);
    }
}

impl<T: PhysMem + ?Sized> PhysMem for &mut T {
    fn read_u32(&self, gpa: u64) -> Option<u32> {
        (**self).read_u32(gpa)
    }
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        (**self).read_u64(gpa)
    }
    fn write_u32(&mut self, gpa: u64, value: u32) -> Result<(), OutsideRam> {
        (**self).write_u32(gpa, value)
    }
    fn write_u64(&mut self, gpa: u64, value: u64) -> Result<(), OutsideRam> {
        (**self).write_u64(gpa, value)
    }
    fn is_ram(&self, gpa: u64) -> bool {
        (**self).is_ram(gpa)
    }
    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> bool {
        (**self).read_bytes(gpa, buf)
    }
    fn bytes_equal(&self, gpa: u64, expected: &[u8]) -> Option<bool> {
        (**self).bytes_equal(gpa, expected)
    }
}

impl<T: HostMapper + ?Sized> HostMapper for &mut T {
    fn map(&mut self, gva: u32, gpa: u64, len: u32, prot: Prot) -> Result<(), MapError> {
        (**self).map(gva, gpa, len, prot)
    }
    fn note_large_page(&mut self, gva: u32, len: u32) {
        (**self).note_large_page(gva, len)
    }
    fn unmap(&mut self, gva: u32, len: u32) -> Result<(), MapError> {
        (**self).unmap(gva, len)
    }
    fn protect(&mut self, gva: u32, len: u32, prot: Prot) -> Result<(), MapError> {
        (**self).protect(gva, len, prot)
    }
}
