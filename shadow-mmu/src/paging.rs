//! Guest page-table walks, as the SDM (vol. 3A, chapter 4) describes them:
//! 32-bit paging with 4 KiB and 4 MiB (CR4.PSE, PSE-36) pages, PAE paging
//! with cached PDPTEs, 2 MiB pages and NX, and identity when CR0.PG=0.
//!
//! The walker is pure apart from the A/D updates it writes back through
//! [`PhysMem`]; it knows nothing of the shadow state.

use crate::error::MmuError;
use crate::host::PhysMem;

/// Bytes in a small page.
pub const PAGE_SIZE: u32 = 4096;
/// Mask of the offset inside a small page.
pub const PAGE_MASK: u32 = PAGE_SIZE - 1;
/// MAXPHYADDR of the virtual CPU (CPUID 0x80000008 should say so): PSE-36
/// and PAE entries may address 64 GiB; bits above are reserved.
pub const MAX_PHYS_BITS: u32 = 36;

/// CR0 bits the MMU cares about.
pub mod cr0 {
    pub const PE: u32 = 1 << 0;
    pub const WP: u32 = 1 << 16;
    pub const PG: u32 = 1 << 31;
}

/// CR4 bits the MMU cares about.
pub mod cr4 {
    pub const PSE: u32 = 1 << 4;
    pub const PAE: u32 = 1 << 5;
    pub const PGE: u32 = 1 << 7;
}

/// EFER bits the MMU cares about.
pub mod efer {
    pub const NXE: u64 = 1 << 11;
}

/// Paging-structure entry bits (same positions in 32-bit and PAE entries).
pub mod pte {
    pub const P: u64 = 1 << 0;
    pub const RW: u64 = 1 << 1;
    pub const US: u64 = 1 << 2;
    pub const A: u64 = 1 << 5;
    pub const D: u64 = 1 << 6;
    pub const PS: u64 = 1 << 7;
    pub const G: u64 = 1 << 8;
    pub const XD: u64 = 1 << 63;
}

/// Page-fault error-code bits (SDM figure 4-12).
pub mod pf {
    /// 0: not present; 1: protection violation (or reserved bit).
    pub const P: u32 = 1 << 0;
    /// The access was a write.
    pub const W: u32 = 1 << 1;
    /// The access was a user-mode access.
    pub const U: u32 = 1 << 2;
    /// A reserved bit was set in some paging-structure entry.
    pub const RSVD: u32 = 1 << 3;
    /// Instruction fetch (reported only with PAE and EFER.NXE, no SMEP here).
    pub const ID: u32 = 1 << 4;
}

/// Bits 35:12 of a PAE entry: the physical frame.
const PAE_ADDR: u64 = ((1 << MAX_PHYS_BITS) - 1) & !0xFFF;
/// Bits 62:MAXPHYADDR, reserved in every PAE entry.
const PAE_RSVD_HIGH: u64 = !((1 << MAX_PHYS_BITS) - 1) & !pte::XD;
/// Bits 20:13 of a 2 MiB PDE, reserved (bit 12 is PAT).
const PAE_RSVD_2M: u64 = 0x001F_E000;
/// Reserved bits of a present PDPTE: 63:MAXPHYADDR, 8:5, 2:1.
const PDPTE_RSVD: u64 = !((1 << MAX_PHYS_BITS) - 1) | 0x1E6;
/// Bits 21:(MAXPHYADDR-19) of a 4 MiB PDE, reserved under PSE-36.
const PSE_RSVD_4M: u64 = ((1 << 22) - 1) & !((1 << (MAX_PHYS_BITS - 19)) - 1);

/// The control registers paging depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagingRegs {
    pub cr0: u32,
    pub cr3: u32,
    pub cr4: u32,
    pub efer: u64,
}

/// The paging mode the registers select.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// CR0.PG=0: linear = physical.
    Off,
    /// 32-bit paging, with 4 MiB pages when CR4.PSE.
    TwoLevel,
    /// PAE paging: PDPTE, PD, PT with 64-bit entries.
    Pae,
}

impl PagingRegs {
    pub fn mode(&self) -> PagingMode {
        if self.cr0 & cr0::PG == 0 {
            PagingMode::Off
        } else if self.cr4 & cr4::PAE != 0 {
            PagingMode::Pae
        } else {
            PagingMode::TwoLevel
        }
    }
    pub fn wp(&self) -> bool {
        self.cr0 & cr0::WP != 0
    }
    pub fn pse(&self) -> bool {
        self.cr4 & cr4::PSE != 0
    }
    pub fn pge(&self) -> bool {
        self.cr4 & cr4::PGE != 0
    }
    /// NX is only in effect under PAE paging with EFER.NXE.
    pub fn nx_enabled(&self) -> bool {
        self.mode() == PagingMode::Pae && self.efer & efer::NXE != 0
    }
}

/// Size of a guest page (a leaf of the guest's tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size4M,
}

impl PageSize {
    pub const fn bytes(self) -> u32 {
        match self {
            PageSize::Size4K => 4 << 10,
            PageSize::Size2M => 2 << 20,
            PageSize::Size4M => 4 << 20,
        }
    }
}

/// One memory access, as the guest architecture classifies it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub write: bool,
    /// A user-mode access (CPL 3, not an implicit supervisor access).
    pub user: bool,
    pub fetch: bool,
}

impl Access {
    pub const fn read() -> Access {
        Access { write: false, user: false, fetch: false }
    }
    pub const fn write() -> Access {
        Access { write: true, user: false, fetch: false }
    }
    pub const fn fetch() -> Access {
        Access { write: false, user: false, fetch: true }
    }
    /// The same access made from user mode.
    pub const fn user(self) -> Access {
        Access { user: true, ..self }
    }
}

/// Effective rights of a translation: U/S and R/W ANDed, XD ORed over the
/// levels walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    pub user: bool,
    pub writable: bool,
    pub nx: bool,
}

impl Perms {
    const ALL: Perms = Perms { user: true, writable: true, nx: false };

    fn and(self, entry: u64, nx_enabled: bool) -> Perms {
        Perms {
            user: self.user && entry & pte::US != 0,
            writable: self.writable && entry & pte::RW != 0,
            nx: self.nx || (nx_enabled && entry & pte::XD != 0),
        }
    }

    /// Whether the access is allowed (SDM 4.6, without SMEP/SMAP/PKU).
    pub fn allow(self, access: Access, wp: bool) -> bool {
        if access.user && !self.user {
            return false;
        }
        if access.write && !self.writable && (access.user || wp) {
            return false;
        }
        !(access.fetch && self.nx)
    }
}

/// A guest page fault: what the monitor delivers as vector 14.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    pub cr2: u32,
    pub error_code: u32,
}

/// Where the leaf entry of a translation lives, so neighbours can be read
/// for batching and so A/D updates go to the right place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Guest-physical address of the leaf entry.
    pub entry_gpa: u64,
    /// 8-byte (PAE) entries.
    pub wide: bool,
    /// Rights of the levels above the leaf.
    pub upper: Perms,
}

/// A successful guest translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub gva: u32,
    pub gpa: u64,
    /// Linear base of the guest page.
    pub page_gva: u32,
    /// Physical base of the guest page.
    pub page_gpa: u64,
    pub size: PageSize,
    pub perms: Perms,
    /// G set in the leaf and CR4.PGE on.
    pub global: bool,
    /// D set in the leaf (after this walk's update, if it updated).
    pub dirty: bool,
    /// `None` when paging is off.
    pub leaf: Option<Leaf>,
    /// The directory entry (PDE) the walk went through, as [`dir_key`]:
    /// what a later address space must have in the same place for this
    /// translation's shadow to stay (0 with paging off).
    pub dir: u64,
}

/// A directory entry without its A and D bits: two equal keys lead to the
/// same page table (or the same large page) with the same rights.
pub const fn dir_key(entry: u64) -> u64 {
    entry & !(pte::A | pte::D)
}

/// The directory entry (PDE) covering `gva` under `regs`, with where it
/// lives: `None` with paging off or a non-present PAE PDPTE. Reads only.
pub fn directory_entry<M: PhysMem + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    pdptes: &[u64; 4],
    gva: u32,
) -> Option<(u64, u64)> {
    match regs.mode() {
        PagingMode::Off => None,
        PagingMode::TwoLevel => {
            let gpa = u64::from(regs.cr3 & !PAGE_MASK) + u64::from(gva >> 22) * 4;
            Some((gpa, u64::from(mem.read_u32(gpa).unwrap_or(u32::MAX))))
        }
        PagingMode::Pae => {
            let pdpte = pdptes[(gva >> 30) as usize];
            if pdpte & pte::P == 0 {
                return None;
            }
            let gpa = (pdpte & PAE_ADDR) + u64::from((gva >> 21) & 0x1FF) * 8;
            Some((gpa, mem.read_u64(gpa).unwrap_or(u64::MAX)))
        }
    }
}

/// Whether a PAE directory entry has reserved bits set (a walk through it
/// would fault with RSVD).
pub(crate) fn dir_reserved(regs: &PagingRegs, pde: u64) -> bool {
    regs.mode() == PagingMode::Pae && pde & (PAE_RSVD_HIGH | if regs.nx_enabled() { 0 } else { pte::XD }) != 0
}

/// Where the 4 KiB leaf for `gva` lives under directory entry `pde`.
pub(crate) fn leaf_of(regs: &PagingRegs, pde: u64, gva: u32) -> Leaf {
    let nxe = regs.nx_enabled();
    if regs.mode() == PagingMode::Pae {
        let entry_gpa = (pde & PAE_ADDR) + u64::from((gva >> 12) & 0x1FF) * 8;
        Leaf { entry_gpa, wide: true, upper: Perms::ALL.and(pde, nxe) }
    } else {
        let entry_gpa = (pde & 0xFFFF_F000) + u64::from((gva >> 12) & 0x3FF) * 4;
        Leaf { entry_gpa, wide: false, upper: Perms::ALL.and(pde, false) }
    }
}

/// Reads the four PDPTEs the way MOV CR3 does under PAE paging.
///
/// A present PDPTE with reserved bits makes the loading instruction #GP(0)
/// on hardware; the caller reports it as [`MmuError::PdpteReserved`].
pub fn load_pdptes<M: PhysMem + ?Sized>(mem: &M, cr3: u32) -> Result<[u64; 4], MmuError> {
    let base = u64::from(cr3 & !0x1F);
    let mut out = [0u64; 4];
    for (i, slot) in out.iter_mut().enumerate() {
        let e = mem.read_u64(base + 8 * i as u64).unwrap_or(u64::MAX);
        if e & pte::P != 0 && e & PDPTE_RSVD != 0 {
            return Err(MmuError::PdpteReserved { index: i as u8, entry: e });
        }
        *slot = e;
    }
    Ok(out)
}

/// Walks the guest tables for `gva`.
///
/// With `update_ad`, a successful walk sets A in every entry it used and D in
/// the leaf for writes, as hardware does; a faulting walk changes nothing
/// (KVM's choice too: the SDM allows either).
pub fn walk<M: PhysMem + ?Sized>(
    mem: &mut M,
    regs: &PagingRegs,
    pdptes: &[u64; 4],
    gva: u32,
    access: Access,
    update_ad: bool,
) -> Result<Translation, PageFault> {
    let mut w = Walker { mem, regs, gva, access, update_ad };
    match regs.mode() {
        PagingMode::Off => Ok(Translation {
            gva,
            gpa: u64::from(gva),
            page_gva: gva & !PAGE_MASK,
            page_gpa: u64::from(gva & !PAGE_MASK),
            size: PageSize::Size4K,
            perms: Perms::ALL,
            global: false,
            dirty: true,
            leaf: None,
            dir: 0,
        }),
        PagingMode::TwoLevel => w.two_level(),
        PagingMode::Pae => w.pae(pdptes),
    }
}

/// One entry on the walk path: where it is and what was read.
#[derive(Clone, Copy)]
struct Used {
    gpa: u64,
    value: u64,
}

struct Walker<'a, M: PhysMem + ?Sized> {
    mem: &'a mut M,
    regs: &'a PagingRegs,
    gva: u32,
    access: Access,
    update_ad: bool,
}

impl<M: PhysMem + ?Sized> Walker<'_, M> {
    fn fault(&self, bits: u32) -> PageFault {
        let mut code = bits;
        if self.access.write {
            code |= pf::W;
        }
        if self.access.user {
            code |= pf::U;
        }
        if self.access.fetch && self.regs.nx_enabled() {
            code |= pf::ID;
        }
        PageFault { cr2: self.gva, error_code: code }
    }

    fn read32(&self, gpa: u64) -> u64 {
        u64::from(self.mem.read_u32(gpa).unwrap_or(u32::MAX))
    }

    fn read64(&self, gpa: u64) -> u64 {
        self.mem.read_u64(gpa).unwrap_or(u64::MAX)
    }

    /// Checks rights, then sets A (and D on the leaf for writes).
    fn finish(&mut self, path: &[Used], perms: Perms) -> Result<bool, PageFault> {
        if !perms.allow(self.access, self.regs.wp()) {
            return Err(self.fault(pf::P));
        }
        let leaf = path.len() - 1;
        let mut dirty = path[leaf].value & pte::D != 0;
        if !self.update_ad {
            return Ok(dirty);
        }
        for (i, used) in path.iter().enumerate() {
            let mut bits = pte::A;
            if i == leaf && self.access.write {
                bits |= pte::D;
                dirty = true;
            }
            let new = used.value | bits;
            if new != used.value {
                // A and D live in the low dword of both entry formats; a
                // write outside RAM is dropped, like on an open bus.
                let _ = self.mem.write_u32(used.gpa, new as u32);
            }
        }
        Ok(dirty)
    }

    fn two_level(&mut self) -> Result<Translation, PageFault> {
        let gva = self.gva;
        let pde_gpa = u64::from(self.regs.cr3 & !PAGE_MASK) + u64::from(gva >> 22) * 4;
        let pde = self.read32(pde_gpa);
        if pde & pte::P == 0 {
            return Err(self.fault(0));
        }
        let pde_used = Used { gpa: pde_gpa, value: pde };
        let upper = Perms::ALL.and(pde, false);
        if pde & pte::PS != 0 && self.regs.pse() {
            if pde & PSE_RSVD_4M != 0 {
                return Err(self.fault(pf::P | pf::RSVD));
            }
            let page_gpa = (pde & 0xFFC0_0000) | (((pde >> 13) & 0xFF) << 32);
            let dirty = self.finish(&[pde_used], upper)?;
            let size = PageSize::Size4M;
            return Ok(self.translation(page_gpa, size, upper, pde, dirty, pde_gpa, false, Perms::ALL, pde));
        }
        let pte_gpa = (pde & 0xFFFF_F000) + u64::from((gva >> 12) & 0x3FF) * 4;
        let entry = self.read32(pte_gpa);
        if entry & pte::P == 0 {
            return Err(self.fault(0));
        }
        let perms = upper.and(entry, false);
        let dirty = self.finish(&[pde_used, Used { gpa: pte_gpa, value: entry }], perms)?;
        Ok(self.translation(entry & 0xFFFF_F000, PageSize::Size4K, perms, entry, dirty, pte_gpa, false, upper, pde))
    }

    fn pae(&mut self, pdptes: &[u64; 4]) -> Result<Translation, PageFault> {
        let gva = self.gva;
        let nxe = self.regs.nx_enabled();
        let rsvd = PAE_RSVD_HIGH | if nxe { 0 } else { pte::XD };
        let pdpte = pdptes[(gva >> 30) as usize];
        if pdpte & pte::P == 0 {
            return Err(self.fault(0));
        }
        let pde_gpa = (pdpte & PAE_ADDR) + u64::from((gva >> 21) & 0x1FF) * 8;
        let pde = self.read64(pde_gpa);
        if pde & pte::P == 0 {
            return Err(self.fault(0));
        }
        let large = pde & pte::PS != 0;
        if pde & rsvd != 0 || (large && pde & PAE_RSVD_2M != 0) {
            return Err(self.fault(pf::P | pf::RSVD));
        }
        let pde_used = Used { gpa: pde_gpa, value: pde };
        let upper = Perms::ALL.and(pde, nxe);
        if large {
            let dirty = self.finish(&[pde_used], upper)?;
            let page_gpa = pde & PAE_ADDR & !0x1F_FFFF;
            return Ok(self.translation(page_gpa, PageSize::Size2M, upper, pde, dirty, pde_gpa, true, Perms::ALL, pde));
        }
        let pte_gpa = (pde & PAE_ADDR) + u64::from((gva >> 12) & 0x1FF) * 8;
        let entry = self.read64(pte_gpa);
        if entry & pte::P == 0 {
            return Err(self.fault(0));
        }
        if entry & rsvd != 0 {
            return Err(self.fault(pf::P | pf::RSVD));
        }
        let perms = upper.and(entry, nxe);
        let dirty = self.finish(&[pde_used, Used { gpa: pte_gpa, value: entry }], perms)?;
        Ok(self.translation(entry & PAE_ADDR, PageSize::Size4K, perms, entry, dirty, pte_gpa, true, upper, pde))
    }

    #[allow(clippy::too_many_arguments)]
    fn translation(
        &self,
        page_gpa: u64,
        size: PageSize,
        perms: Perms,
        leaf_entry: u64,
        dirty: bool,
        entry_gpa: u64,
        wide: bool,
        upper: Perms,
        pde: u64,
    ) -> Translation {
        let offset_mask = size.bytes() - 1;
        Translation {
            gva: self.gva,
            gpa: page_gpa + u64::from(self.gva & offset_mask),
            page_gva: self.gva & !offset_mask,
            page_gpa,
            size,
            perms,
            global: self.regs.pge() && leaf_entry & pte::G != 0,
            dirty,
            leaf: Some(Leaf { entry_gpa, wide, upper }),
            dir: dir_key(pde),
        }
    }
}

/// A small-page leaf read for batching: `None` unless it is present, has no
/// reserved bits and was already accessed (pre-mapping it must not need an A
/// update hardware would not have made).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Neighbour {
    pub frame: u64,
    pub perms: Perms,
    pub dirty: bool,
    pub global: bool,
}

pub(crate) fn accessed_neighbour<M: PhysMem + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    leaf: &Leaf,
    entry_gpa: u64,
) -> Option<Neighbour> {
    let nxe = regs.nx_enabled();
    let e = if leaf.wide { mem.read_u64(entry_gpa)? } else { u64::from(mem.read_u32(entry_gpa)?) };
    if e & pte::P == 0 || e & pte::A == 0 {
        return None;
    }
    let frame = if leaf.wide {
        if e & (PAE_RSVD_HIGH | if nxe { 0 } else { pte::XD }) != 0 {
            return None;
        }
        e & PAE_ADDR
    } else {
        e & 0xFFFF_F000
    };
    Some(Neighbour {
        frame,
        perms: leaf.upper.and(e, nxe),
        dirty: e & pte::D != 0,
        global: regs.pge() && e & pte::G != 0,
    })
}
