//! The address window: the monitor reserves the whole guest linear range
//! `[mmap_min_addr, 4 GiB)` of its own address space, so guest code running in
//! compatibility mode sees exactly what the monitor maps there and nothing of
//! the monitor itself (which lives above 4 GiB).
//!
//! Two kinds of mappings live in the window:
//! - **shadow mappings** of guest RAM (memfd pages) at guest-virtual addresses,
//!   created, re-protected and removed by the shadow MMU through [`Window::map`],
//!   [`Window::protect`] and [`Window::unmap`];
//! - the **VMM area** at the top (default `0xFF80_0000..`): a memfd of its own
//!   holding the vCPU page, the exit gate, the indirect-lookup table and the
//!   translation cache, mapped a second time above 4 GiB read-write ("the
//!   alias") so the monitor and the translator write it without ever making
//!   the window copy writable where guest-mode code could write it.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;

use nix::sys::mman::{MapFlags, ProtFlags};

// The layout of the VMM area (offsets from its base) is the translator's:
// the one source of every offset in it (docs/tc-abi.md).
use engine::vmm_area as vmm;

use super::HostError;
use crate::memory::GuestMemory;

const FOUR_GIB: u64 = 1 << 32;
const PAGE: u32 = 4096;

/// Access rights of a window mapping, as guest-mode code sees them (the
/// shadow MMU's type: it decides them).
pub use shadow_mmu::Prot;

fn prot_flags(p: Prot) -> ProtFlags {
    let mut f = ProtFlags::PROT_NONE;
    if p.read {
        f |= ProtFlags::PROT_READ;
    }
    if p.write {
        f |= ProtFlags::PROT_WRITE;
    }
    if p.exec {
        f |= ProtFlags::PROT_EXEC;
    }
    f
}

/// Counters of host calls the window made (each is a syscall: 1-6 µs here).
#[derive(Clone, Copy, Debug, Default)]
pub struct WindowStats {
    pub maps: u64,
    pub unmaps: u64,
    pub protects: u64,
}

/// The reserved low 4 GiB of the monitor's address space. One per process.
pub struct Window {
    min_addr: u32,
    vmm_base: u32,
    vmm_size: u32,
    _vmm_fd: OwnedFd,
    vmm_alias: NonNull<u8>,
    stats: std::sync::Mutex<WindowStats>,
    /// Protection of every 4 KiB page of the window as mapped now (bit 0 R,
    /// 1 W, 2 X; 0 = nothing mapped), so exits can tell "not mapped" from
    /// "mapped without this right" without asking the kernel.
    pages: Box<[std::sync::atomic::AtomicU8]>,
    /// A pipe (read end, write end) for [`Window::read_linear`]: `write`
    /// from a window address copies what a user access could read, and
    /// fails instead of faulting where nothing readable is mapped.
    probe: std::sync::Mutex<(OwnedFd, OwnedFd)>,
}

// SAFETY: the window is process-global by nature; its methods only issue
// mmap/mprotect calls on addresses inside the reservation (thread-safe
// syscalls) and the alias pointer refers to a mapping that is never unmapped.
unsafe impl Send for Window {}
// SAFETY: see `Send`.
unsafe impl Sync for Window {}

static WINDOW: OnceLock<Result<Window, HostError>> = OnceLock::new();

/// Reads `vm.mmap_min_addr`: guest pages below it can never be mapped.
fn mmap_min_addr() -> u32 {
    std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map(|a| a.max(PAGE).next_multiple_of(PAGE))
        .unwrap_or(65536)
}

/// The first mapping found in `[lo, hi)` of this process, from /proc/self/maps.
fn first_mapping_in(lo: u64, hi: u64) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .find(|l| {
            let range = l.split_whitespace().next().unwrap_or("");
            let mut it = range.split('-').map(|x| u64::from_str_radix(x, 16).unwrap_or(0));
            let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
            a < hi && b > lo
        })
        .map(str::to_owned)
}

impl Window {
    /// The process's window, reserving it on first use with the default VMM
    /// area. Fails with a clear error when the low 4 GiB are not free.
    pub fn get() -> Result<&'static Window, HostError> {
        WINDOW
            .get_or_init(|| Window::reserve(crate::layout::VMM_AREA_BASE, crate::layout::VMM_AREA_SIZE))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn reserve(vmm_base: u32, vmm_size: u32) -> Result<Window, HostError> {
        let min_addr = mmap_min_addr();
        let len = (FOUR_GIB - u64::from(min_addr)) as usize;
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the
        // range is a fresh PROT_NONE reservation owned by the window forever.
        let res = unsafe {
            nix::sys::mman::mmap_anonymous(
                NonZeroUsize::new(min_addr as usize),
                NonZeroUsize::new(len).expect("nonzero"),
                ProtFlags::PROT_NONE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE | MapFlags::MAP_FIXED_NOREPLACE,
            )
        };
        match res {
            Ok(p) if p.as_ptr() as u64 == u64::from(min_addr) => {}
            Ok(p) => {
                // Old kernels ignore MAP_FIXED_NOREPLACE and treat the address as a hint.
                // SAFETY: unmapping exactly what this call just mapped.
                let _ = unsafe { nix::sys::mman::munmap(p, len) };
                return Err(HostError::WindowOccupied(format!(
                    "the kernel placed the reservation at {:p} (MAP_FIXED_NOREPLACE unsupported?)",
                    p.as_ptr()
                )));
            }
            Err(nix::Error::EEXIST) => {
                let what = first_mapping_in(u64::from(min_addr), FOUR_GIB).unwrap_or_else(|| "unknown".into());
                return Err(HostError::WindowOccupied(what));
            }
            Err(e) => return Err(HostError::Syscall { what: "reserve the low 4 GiB", errno: e }),
        }

        // The VMM area: its own memfd, mapped in the window and as an alias.
        let fd = nix::sys::memfd::memfd_create(c"popek-vmm-area", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| HostError::Syscall { what: "memfd_create(vmm area)", errno: e })?;
        nix::unistd::ftruncate(&fd, i64::from(vmm_size))
            .map_err(|e| HostError::Syscall { what: "ftruncate(vmm area)", errno: e })?;
        // SAFETY: a fresh shared mapping of our own memfd, placed by the kernel
        // (above 4 GiB, since the window now holds the low 4 GiB).
        let alias = unsafe {
            nix::sys::mman::mmap(
                None,
                NonZeroUsize::new(vmm_size as usize).expect("nonzero"),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(|e| HostError::Syscall { what: "mmap(vmm area alias)", errno: e })?;
        let (probe_r, probe_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| HostError::Syscall { what: "pipe2(window probe)", errno: e })?;
        let w = Window {
            probe: std::sync::Mutex::new((probe_r, probe_w)),
            min_addr,
            vmm_base,
            vmm_size,
            _vmm_fd: fd,
            vmm_alias: alias.cast(),
            stats: Default::default(),
            pages: (0..(FOUR_GIB / u64::from(PAGE))).map(|_| std::sync::atomic::AtomicU8::new(0)).collect(),
        };
        // Window copies of the VMM area regions, each with its own protection.
        let regions = [
            (vmm::VCPU_PAGE, vmm::EXIT_GATE, Prot::RW),
            (vmm::EXIT_GATE, vmm::TRANSITIONS, Prot::RX),
            (vmm::TRANSITIONS, vmm::TC, Prot::R),
            (vmm::TC, vmm_size, Prot::RX),
        ];
        for (start, end, prot) in regions {
            w.mmap_fixed(vmm_base + start, end - start, prot, w._vmm_fd.as_fd(), u64::from(start))?;
        }
        Ok(w)
    }

    fn record(&self, gva: u32, len: u32, prot: Prot) {
        let bits = u8::from(prot.read) | u8::from(prot.write) << 1 | u8::from(prot.exec) << 2;
        let first = (gva / PAGE) as usize;
        for p in &self.pages[first..first + (len / PAGE) as usize] {
            p.store(bits, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Protection of the page holding `gva` as currently mapped.
    pub fn prot_at(&self, gva: u32) -> Prot {
        let b = self.pages[(gva / PAGE) as usize].load(std::sync::atomic::Ordering::Relaxed);
        Prot { read: b & 1 != 0, write: b & 2 != 0, exec: b & 4 != 0 }
    }

    fn mmap_fixed(
        &self,
        gva: u32,
        len: u32,
        prot: Prot,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
    ) -> Result<(), HostError> {
        // SAFETY: the target range lies inside the window reservation (checked
        // by every caller), which belongs to the window: MAP_FIXED replaces
        // only window pages, never monitor memory.
        unsafe {
            nix::sys::mman::mmap(
                NonZeroUsize::new(gva as usize),
                NonZeroUsize::new(len as usize).expect("nonzero length"),
                prot_flags(prot),
                MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
                fd,
                offset as i64,
            )
        }
        .map(|_| ())
        .map_err(|e| HostError::Syscall { what: "mmap(window)", errno: e })
    }

    /// Lowest guest-virtual address that can be mapped (the host's
    /// `vm.mmap_min_addr`); guest pages below it must be emulated.
    pub fn min_addr(&self) -> u32 {
        self.min_addr
    }

    /// Guest-virtual base of the VMM area.
    pub fn vmm_base(&self) -> u32 {
        self.vmm_base
    }

    pub fn vmm_size(&self) -> u32 {
        self.vmm_size
    }

    /// Guest-virtual address of the exit gate (the callout far-jump target).
    pub fn exit_gate(&self) -> u32 {
        self.vmm_base + vmm::EXIT_GATE
    }

    /// The monitor's read-write alias of the whole VMM area.
    pub fn vmm_alias(&self) -> VmmAlias {
        VmmAlias { ptr: self.vmm_alias, len: self.vmm_size as usize }
    }

    fn check_range(&self, gva: u32, len: u32) -> Result<(), HostError> {
        let bad = || HostError::BadWindowRange { gva, len };
        if len == 0 || !gva.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || gva < self.min_addr {
            return Err(bad());
        }
        let end = gva.checked_add(len).ok_or_else(bad)?;
        if end > self.vmm_base {
            return Err(bad());
        }
        Ok(())
    }

    /// Maps guest-physical `[gpa, gpa+len)` of `mem` at guest-virtual `gva`.
    pub fn map(&self, gva: u32, mem: &GuestMemory, gpa: u64, len: u32, prot: Prot) -> Result<(), HostError> {
        self.check_range(gva, len)?;
        if !gpa.is_multiple_of(u64::from(PAGE)) || gpa.checked_add(u64::from(len)).is_none_or(|e| e > mem.size()) {
            return Err(HostError::BadGuestPhysical { gpa, len });
        }
        self.mmap_fixed(gva, len, prot, mem.fd(), gpa)?;
        self.record(gva, len, prot);
        self.mark_invlpg(gva, len);
        self.stats.lock().expect("stats").maps += 1;
        Ok(())
    }

    /// Sets the INVLPG filter bits (`vmm_area::INVLPG_FILTER`) of the pages
    /// in `[gva, gva+len)`: an INVLPG of any of them now has work. Every
    /// map sets them, so a shadow can never hide behind a clear bit.
    pub fn mark_invlpg(&self, gva: u32, len: u32) {
        let alias = self.vmm_alias();
        let first = gva / PAGE;
        let end = (u64::from(gva) + u64::from(len.max(1))).div_ceil(u64::from(PAGE)).min(1 << 20) as u32;
        let mut page = first;
        while page < end {
            let (off, _) = vmm::invlpg_filter_bit(page * PAGE);
            let mut byte = [0u8];
            alias.read(off as usize, &mut byte);
            // The pages of this filter byte that the range covers.
            let stop = ((page | 7) + 1).min(end);
            let want = (page..stop).fold(byte[0], |b, p| b | 1 << (p & 7));
            if want != byte[0] {
                alias.write(off as usize, &[want]);
            }
            page = stop;
        }
    }

    /// Clears the INVLPG filter bit of the page holding `gva`: the INVLPG
    /// callout found nothing there that a later INVLPG could change.
    pub fn clear_invlpg(&self, gva: u32) {
        let alias = self.vmm_alias();
        let (off, bit) = vmm::invlpg_filter_bit(gva);
        let mut byte = [0u8];
        alias.read(off as usize, &mut byte);
        if byte[0] & bit != 0 {
            alias.write(off as usize, &[byte[0] & !bit]);
        }
    }

    /// Maps guest-physical page `gpa` read-only at VMM-area offset `off`,
    /// which must be one of the alias pages (`vmm_area::GDT_ALIAS`,
    /// `IDT_ALIAS`, `TSS_ALIAS`): translated code reads the live GDT, IDT
    /// and TSS there through GS.
    pub fn map_vmm_page(&self, off: u32, mem: &GuestMemory, gpa: u64) -> Result<(), HostError> {
        let aliases = [
            vmm::GDT_ALIAS..vmm::GDT_ALIAS + vmm::GDT_ALIAS_PAGES * PAGE,
            vmm::IDT_ALIAS..vmm::IDT_ALIAS + vmm::IDT_ALIAS_PAGES * PAGE,
            vmm::TSS_ALIAS..vmm::TSS_ALIAS + PAGE,
        ];
        if !off.is_multiple_of(PAGE) || !aliases.iter().any(|a| a.contains(&off)) || off >= self.vmm_size {
            return Err(HostError::BadWindowRange { gva: self.vmm_base.wrapping_add(off), len: PAGE });
        }
        if !gpa.is_multiple_of(u64::from(PAGE)) || gpa.checked_add(u64::from(PAGE)).is_none_or(|e| e > mem.size()) {
            return Err(HostError::BadGuestPhysical { gpa, len: PAGE });
        }
        self.mmap_fixed(self.vmm_base + off, PAGE, Prot::R, mem.fd(), gpa)?;
        self.stats.lock().expect("stats").maps += 1;
        Ok(())
    }

    /// Removes the mappings in `[gva, gva+len)`: accesses fault again.
    pub fn unmap(&self, gva: u32, len: u32) -> Result<(), HostError> {
        self.check_range(gva, len)?;
        // SAFETY: inside the reservation (checked): replaces window pages with
        // a fresh PROT_NONE reservation.
        unsafe {
            nix::sys::mman::mmap_anonymous(
                NonZeroUsize::new(gva as usize),
                NonZeroUsize::new(len as usize).expect("nonzero"),
                ProtFlags::PROT_NONE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE | MapFlags::MAP_FIXED,
            )
        }
        .map_err(|e| HostError::Syscall { what: "mmap(unmap window)", errno: e })?;
        self.stats.lock().expect("stats").unmaps += 1;
        Ok(())
    }

    /// Changes the protection of `[gva, gva+len)`.
    pub fn protect(&self, gva: u32, len: u32, prot: Prot) -> Result<(), HostError> {
        self.check_range(gva, len)?;
        // SAFETY: inside the reservation (checked); mprotect cannot affect
        // monitor memory there.
        unsafe {
            nix::sys::mman::mprotect(
                NonNull::new(gva as usize as *mut std::ffi::c_void).expect("gva >= min_addr > 0"),
                len as usize,
                prot_flags(prot),
            )
        }
        .map_err(|e| HostError::Syscall { what: "mprotect(window)", errno: e })?;
        self.stats.lock().expect("stats").protects += 1;
        Ok(())
    }

    /// Unmaps every shadow mapping (everything below the VMM area).
    pub fn unmap_all(&self) -> Result<(), HostError> {
        self.unmap(self.min_addr, self.vmm_base - self.min_addr)?;
        // Nothing is mapped: no INVLPG has work until something is again.
        self.vmm_alias().write(vmm::INVLPG_FILTER as usize, &vec![0; vmm::INVLPG_FILTER_LEN as usize]);
        Ok(())
    }

    /// Reads guest-linear memory as guest-mode code would see it (any
    /// mapping with read rights, including the VMM area), without risking a
    /// fault in the monitor: returns how many bytes were readable. The bytes
    /// go through a pipe (`write` fails with EFAULT where a user read would
    /// fault), which the jail allows, unlike `process_vm_readv`.
    pub fn read_linear(&self, lin: u32, buf: &mut [u8]) -> usize {
        use std::os::fd::AsRawFd;
        let len = buf.len().min((FOUR_GIB - u64::from(lin)) as usize);
        let probe = self.probe.lock().expect("window probe");
        let (r, w) = (probe.0.as_raw_fd(), probe.1.as_raw_fd());
        let mut done = 0;
        while done < len {
            // Within one page per round: well under the pipe's capacity.
            let chunk = (len - done).min(PAGE as usize - ((lin as usize + done) % PAGE as usize));
            // SAFETY: `write` reads `chunk` bytes at a user address: the
            // kernel checks the mapping and returns EFAULT (or a short count)
            // instead of faulting; nothing in this process is touched.
            let n = unsafe { libc::write(w, (lin as usize + done) as *const libc::c_void, chunk) };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            // SAFETY: reading back the `n` bytes just written into `buf`,
            // which has room for them (done + n <= len <= buf.len()).
            let got = unsafe { libc::read(r, buf[done..].as_mut_ptr().cast(), n) };
            if got != n as isize {
                // Cannot happen with a private pipe; never leave stale bytes.
                let mut sink = [0u8; 256];
                // SAFETY: reading into a local buffer until the pipe is empty.
                while unsafe { libc::read(r, sink.as_mut_ptr().cast(), sink.len()) } > 0 {}
                break;
            }
            done += n;
            if n < chunk {
                break;
            }
        }
        done
    }

    pub fn stats(&self) -> WindowStats {
        *self.stats.lock().expect("stats")
    }
}

/// The monitor's read-write alias of the VMM area, the only way to its
/// bytes. The same bytes are guest-mode code's (through the window copy),
/// the translator's and the vCPU's, so no holder may ever own a `&mut [u8]`
/// over them: every access is a raw-pointer copy, bounds-checked. Views are
/// `Copy`; all of them are the one mapping, used from the vCPU thread
/// (guest-mode code runs there too, synchronously).
#[derive(Clone, Copy, Debug)]
pub struct VmmAlias {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the pointer refers to a shared mapping that is never unmapped;
// moving a view to another thread (the engine is `Send`) moves no data.
unsafe impl Send for VmmAlias {}

impl VmmAlias {
    /// Pointer to `[off, off+len)` of the alias, asserted in bounds.
    fn at(&self, off: usize, len: usize) -> *mut u8 {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "VMM-area access {off:#x}+{len} out of bounds"
        );
        // SAFETY: in bounds of the mapping (asserted above).
        unsafe { self.ptr.as_ptr().add(off) }
    }

    /// Copies bytes at `off` into `buf`.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        let src = self.at(off, buf.len());
        // SAFETY: `src` is valid for `buf.len()` bytes (checked by `at`); a
        // Rust buffer never overlaps the alias mapping.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) }
    }

    /// Copies `data` to `off`.
    pub fn write(&self, off: usize, data: &[u8]) {
        let dst = self.at(off, data.len());
        // SAFETY: as `read`; no reference to these bytes exists anywhere.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) }
    }

    /// Reads a vCPU-page field that translated code may have written
    /// (volatile: the compiler must not cache it across guest entries).
    pub fn read_u32(&self, off: u32) -> u32 {
        let p = self.at(off as usize, 4).cast::<u32>();
        assert!(p.is_aligned());
        // SAFETY: in bounds (checked by `at`) and aligned (asserted); no
        // reference to these bytes exists.
        unsafe { p.read_volatile() }
    }

    /// Writes a vCPU-page field that translated code reads.
    pub fn write_u32(&self, off: u32, v: u32) {
        let p = self.at(off as usize, 4).cast::<u32>();
        assert!(p.is_aligned());
        // SAFETY: as `read_u32`.
        unsafe { p.write_volatile(v) }
    }

    /// Writes a 16-bit vCPU-page field (selectors) that translated code reads.
    pub fn write_u16(&self, off: u32, v: u16) {
        let p = self.at(off as usize, 2).cast::<u16>();
        assert!(p.is_aligned());
        // SAFETY: as `read_u32`.
        unsafe { p.write_volatile(v) }
    }
}

impl engine::VmmMemory for VmmAlias {
    fn len(&self) -> usize {
        self.len
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        VmmAlias::read(self, off, buf);
    }
    fn write(&mut self, off: usize, data: &[u8]) {
        VmmAlias::write(self, off, data);
    }
}
