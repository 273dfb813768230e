//! Layout of the VMM area: the one place that fixes where translated code
//! finds its state (docs/tc-abi.md). The monitor imports these constants.
//!
//! ```text
//! base + 0x00_0000  vCPU page (VcpuPage, GS-relative state of translated code)
//! base + 0x00_1000  exit gate (64-bit code written by the monitor)
//! base + 0x04_0000  indirect lookup table: 65 536 x u32 TC addresses
//! base + 0x08_0000  the same for CPL 3 blocks
//! base + 0x10_0000  translation cache (7 MiB): engine stubs, then blocks
//! ```

use std::mem::{offset_of, size_of};

/// Default guest-linear base of the VMM area (top 8 MiB, 4 MiB aligned).
pub const DEFAULT_BASE: u32 = 0xFF80_0000;
/// Size of the whole VMM area.
pub const AREA_SIZE: u32 = 0x0080_0000;
/// The vCPU page: state translated code reads and writes through `GS`.
pub const VCPU_PAGE: u32 = 0x0000;
/// The exit gate: the target of every callout's far jump (monitor-owned).
pub const EXIT_GATE: u32 = 0x1000;
/// The indirect lookup table (blocks translated for CPL 0-2).
pub const LOOKUP_TABLE: u32 = 0x4_0000;
/// The lookup table of blocks translated for CPL 3 (the counting mode and
/// IOPL-3 user code): kernel and user code each keep their table across
/// the constant switches between them.
pub const LOOKUP_TABLE_USER: u32 = LOOKUP_TABLE + LOOKUP_TABLE_SIZE;
/// Entries of the lookup table (indexed by the low 16 bits of a guest EIP).
pub const LOOKUP_ENTRIES: u32 = 65_536;
/// Size in bytes of the lookup table.
pub const LOOKUP_TABLE_SIZE: u32 = LOOKUP_ENTRIES * 4;
/// Start of the translation cache.
pub const TC: u32 = 0x10_0000;
/// Size of the translation cache.
pub const TC_SIZE: u32 = AREA_SIZE - TC;

/// Number of spill slots in [`VcpuPage::scratch`].
pub const SCRATCH_SLOTS: usize = 8;
/// The spill slot that holds guest `ECX` while a flag-free sequence uses it.
pub const SCRATCH_ECX: u8 = 0;

/// The vCPU page as translated code sees it through `GS` (offset 0 of the
/// VMM area). Field order up to `vmm_gs_sel` is the ABI of docs/tc-abi.md;
/// the engine's own fields follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuPage {
    /// Which callout site is exiting (engine-assigned id).
    pub callout_id: u32,
    /// Indirect branches: the guest target EIP being looked up.
    pub callout_target: u32,
    /// Spill slots; the recovery map says which guest register is where.
    pub scratch: [u32; SCRATCH_SLOTS],
    /// Virtual EFLAGS.IF: 0 or 0x200.
    pub vif: u32,
    /// Nonzero when the virtual PIC has an unmasked request.
    pub irq_pending: u32,
    /// Nonzero when translated code must exit at the next poll point.
    pub poll: u32,
    /// Far pointer to the exit gate: offset.
    pub exit_far_offset: u32,
    /// Far pointer to the exit gate: selector (the 6 bytes are contiguous).
    pub exit_far_selector: u16,
    /// Guest `GS` shadow selector, loaded around GS-prefixed instructions.
    pub guest_gs_sel: u16,
    /// The VMM data selector, reloaded after a GS-prefixed instruction.
    pub vmm_gs_sel: u16,
    pub _pad0: u16,
    // ---- engine fields (after the ABI fields) ----
    /// Virtual EFLAGS.IOPL bits (mask 0x3000), kept by inline PUSHF/POPF.
    pub viopl: u32,
    /// Indirect-lookup hits, counted by the indirect entry prologues when
    /// `Config::count_indirect_hits` is on (wraps).
    pub indirect_hits: u32,
    /// The guest's segment selectors (ES, CS, SS, DS, FS, GS; CS and SS
    /// with the virtual RPL), written by the monitor at every entry into
    /// the TC: `push Sreg` becomes `push dword gs:[guest_sel + 4*sreg]`.
    pub guest_sel: [u32; 6],
    /// Instructions the TC may still retire before it must exit (counting
    /// mode): block entries subtract their length and exit when the result
    /// is negative. The monitor keeps it in `0..=BUDGET_MAX`.
    pub budget: i32,
}

/// Largest budget the monitor may set: the entry check reads the sign from
/// the high half (`0xFFFF` = just went negative), so a block's charge must
/// never wrap a budget past `i32::MIN`.
pub const BUDGET_MAX: i32 = 0x7FFF_0000;

/// Offsets of [`VcpuPage`] fields from the VMM area base (`GS`-relative).
pub mod vcpu {
    use super::*;
    pub const CALLOUT_ID: u32 = VCPU_PAGE + offset_of!(VcpuPage, callout_id) as u32;
    pub const CALLOUT_TARGET: u32 = VCPU_PAGE + offset_of!(VcpuPage, callout_target) as u32;
    pub const SCRATCH: u32 = VCPU_PAGE + offset_of!(VcpuPage, scratch) as u32;
    pub const VIF: u32 = VCPU_PAGE + offset_of!(VcpuPage, vif) as u32;
    pub const IRQ_PENDING: u32 = VCPU_PAGE + offset_of!(VcpuPage, irq_pending) as u32;
    pub const POLL: u32 = VCPU_PAGE + offset_of!(VcpuPage, poll) as u32;
    pub const EXIT_FAR: u32 = VCPU_PAGE + offset_of!(VcpuPage, exit_far_offset) as u32;
    pub const GUEST_GS_SEL: u32 = VCPU_PAGE + offset_of!(VcpuPage, guest_gs_sel) as u32;
    pub const VMM_GS_SEL: u32 = VCPU_PAGE + offset_of!(VcpuPage, vmm_gs_sel) as u32;
    pub const VIOPL: u32 = VCPU_PAGE + offset_of!(VcpuPage, viopl) as u32;
    pub const INDIRECT_HITS: u32 = VCPU_PAGE + offset_of!(VcpuPage, indirect_hits) as u32;
    pub const GUEST_SEL: u32 = VCPU_PAGE + offset_of!(VcpuPage, guest_sel) as u32;
    pub const BUDGET: u32 = VCPU_PAGE + offset_of!(VcpuPage, budget) as u32;

    /// Offset of scratch slot `slot`.
    pub const fn scratch(slot: u8) -> u32 {
        SCRATCH + 4 * slot as u32
    }
}

const _: () = assert!(size_of::<VcpuPage>() <= 4096);
const _: () = assert!(vcpu::EXIT_FAR + 4 == VCPU_PAGE + offset_of!(VcpuPage, exit_far_selector) as u32);
const _: () = assert!(LOOKUP_TABLE_USER + LOOKUP_TABLE_SIZE <= TC);

/// The lookup table of blocks translated for `cpl`.
pub const fn lookup_table(cpl: u8) -> u32 {
    if cpl == 3 {
        LOOKUP_TABLE_USER
    } else {
        LOOKUP_TABLE
    }
}

/// What the engine needs of the monitor's alias of the VMM area: its bytes.
/// The monitor implements it over its read-write alias mapping; tests use a
/// `Vec<u8>`. Nothing else about the host leaks into the engine.
pub trait VmmMemory {
    /// The whole VMM area, `AREA_SIZE` bytes (or at least up to the end of
    /// the TC the engine is configured to use).
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl VmmMemory for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl VmmMemory for &'static mut [u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// The engine's view of the VMM area: where guest-mode code sees it and the
/// alias through which the engine writes it.
pub struct VmmAreaView {
    /// Guest-linear base (what `GS` base is while TC runs; 4 MiB aligned).
    pub base: u32,
    pub mem: Box<dyn VmmMemory + Send>,
}

impl VmmAreaView {
    pub fn new(base: u32, mem: Box<dyn VmmMemory + Send>) -> VmmAreaView {
        VmmAreaView { base, mem }
    }

    /// A view over a fresh zeroed buffer, for tests and tools.
    pub fn detached(base: u32) -> VmmAreaView {
        VmmAreaView { base, mem: Box::new(vec![0u8; AREA_SIZE as usize]) }
    }

    /// Guest-linear address of VMM-area offset `off`.
    pub fn addr(&self, off: u32) -> u32 {
        self.base.wrapping_add(off)
    }

    pub fn read_u32(&self, off: u32) -> u32 {
        let b = self.mem.bytes();
        let o = off as usize;
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    pub(crate) fn write_u32(&mut self, off: u32, v: u32) {
        self.write(off, &v.to_le_bytes());
    }

    pub(crate) fn write(&mut self, off: u32, data: &[u8]) {
        let o = off as usize;
        self.mem.bytes_mut()[o..o + data.len()].copy_from_slice(data);
    }

    pub fn read(&self, off: u32, len: usize) -> &[u8] {
        let o = off as usize;
        &self.mem.bytes()[o..o + len]
    }

    /// Length of the aliased memory.
    pub fn len(&self) -> usize {
        self.mem.bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
