//! Guest RAM: one memfd, mapped once above 4 GiB for the monitor's own
//! accesses (the guest-physical view). Shadow mappings inside the window map
//! the same memfd pages again at guest-virtual addresses.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use thiserror::Error;

use crate::layout::{MAX_GUEST_MEM, MIN_GUEST_MEM, PAGE_SIZE};

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("guest memory size {size} bytes is out of range ({min}..={max} bytes)")]
    BadSize { size: u64, min: u64, max: u64 },
    #[error("guest memory size {0:#x} is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("cannot create the guest RAM memfd: {0}")]
    Memfd(nix::Error),
    #[error("cannot size the guest RAM memfd to {size} bytes: {source}")]
    Truncate { size: u64, source: nix::Error },
    #[error("cannot map guest RAM into the monitor: {0}")]
    Map(nix::Error),
    #[error("guest-physical range {gpa:#x}+{len:#x} is outside guest RAM ({size:#x} bytes)")]
    OutOfRange { gpa: u64, len: u64, size: u64 },
}

/// Guest-physical RAM, `[0, size)`.
pub struct GuestMemory {
    fd: OwnedFd,
    host: *mut u8,
    size: u64,
}

// SAFETY: the mapping is owned by this struct and lives as long as it; all
// accesses through the safe API are bounds-checked. Concurrent access from
// several threads is the same as a guest's concurrent access to its RAM.
unsafe impl Send for GuestMemory {}
// SAFETY: see `Send`.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Creates `size` bytes of zeroed guest RAM.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if !(MIN_GUEST_MEM..=MAX_GUEST_MEM).contains(&size) {
            return Err(MemoryError::BadSize { size, min: MIN_GUEST_MEM, max: MAX_GUEST_MEM });
        }
        if !size.is_multiple_of(u64::from(PAGE_SIZE)) {
            return Err(MemoryError::Unaligned(size));
        }
        let fd = nix::sys::memfd::memfd_create(c"popek-guest-ram", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(MemoryError::Memfd)?;
        nix::unistd::ftruncate(&fd, size as i64).map_err(|source| MemoryError::Truncate { size, source })?;
        // SAFETY: a fresh shared mapping of our own memfd at an address the
        // kernel chooses (above 4 GiB: the window reservation holds the low 4 GiB
        // once the execution host is up; before that any address is fine).
        let host = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(size as usize).expect("size checked above"),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(MemoryError::Map)?;
        Ok(Self { fd, host: host.as_ptr().cast(), size })
    }

    /// Size of guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd, for mapping guest pages elsewhere (window, KVM).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Host address of guest-physical 0 in the monitor's view.
    pub fn host_base(&self) -> *mut u8 {
        self.host
    }

    fn check(&self, gpa: u64, len: u64) -> Result<usize, MemoryError> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size => Ok(gpa as usize),
            _ => Err(MemoryError::OutOfRange { gpa, len, size: self.size }),
        }
    }

    /// The guest-physical range as a byte slice.
    pub fn slice(&self, gpa: u64, len: u64) -> Result<&[u8], MemoryError> {
        let off = self.check(gpa, len)?;
        // SAFETY: bounds checked; the mapping lives as long as `self`. Guest
        // code may write the same bytes concurrently, as DMA would: readers get
        // whatever bytes are there.
        Ok(unsafe { std::slice::from_raw_parts(self.host.add(off), len as usize) })
    }

    /// The guest-physical range as a mutable byte slice.
    #[allow(clippy::mut_from_ref)]
    pub fn slice_mut(&self, gpa: u64, len: u64) -> Result<&mut [u8], MemoryError> {
        let off = self.check(gpa, len)?;
        // SAFETY: bounds checked; see `slice`. Guest RAM is shared with the
        // guest by design, so exclusive access cannot be promised beyond the
        // monitor's own single-writer discipline.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.host.add(off), len as usize) })
    }

    /// Copies `data` into guest RAM at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.slice_mut(gpa, data.len() as u64)?.copy_from_slice(data);
        Ok(())
    }

    /// Copies guest RAM at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        buf.copy_from_slice(self.slice(gpa, buf.len() as u64)?);
        Ok(())
    }

    pub fn read_u32(&self, gpa: u64) -> Result<u32, MemoryError> {
        let mut b = [0; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn write_u32(&self, gpa: u64, v: u32) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`.
        let _ = unsafe {
            nix::sys::mman::munmap(
                std::ptr::NonNull::new(self.host.cast()).expect("non-null mapping"),
                self.size as usize,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(GuestMemory::new(4096), Err(MemoryError::BadSize { .. })));
        assert!(matches!(GuestMemory::new((4 << 20) + 1), Err(MemoryError::Unaligned(_))));
    }

    #[test]
    fn reads_back_and_checks_bounds() {
        let m = GuestMemory::new(4 << 20).unwrap();
        m.write_u32(0x1000, 0xdead_beef).unwrap();
        assert_eq!(m.read_u32(0x1000).unwrap(), 0xdead_beef);
        assert!(m.read_u32((4 << 20) - 2).is_err());
        assert!(m.slice(u64::MAX, 2).is_err());
    }
}
