//! The host LDT: the only descriptor table of the host we own. Guest segment
//! descriptors are shadowed into it with `modify_ldt`, their limits truncated
//! below the VMM area ("segment truncation"), so guest-mode code that reaches
//! for the VMM area through a guest segment faults instead.
//!
//! Every entry is DPL 3 (the kernel forces it): the virtual privilege level
//! lives in the monitor's virtual CPU, not in the descriptor.

use super::HostError;

/// Number of host LDT entries the hardware allows.
pub const LDT_ENTRIES: u16 = 8192;
/// Monitor-reserved entries at the bottom of the LDT. The kernel sizes the
/// LDT by its highest written entry and copies all of it at every
/// `modify_ldt` write: with these at the top, every write of a guest
/// shadow cost a 64 KB table (~17 µs, vmalloc and IPIs included).
pub const VMM_CODE_INDEX: u16 = 0;
pub const VMM_DATA_INDEX: u16 = 1;
/// Flat guest segments truncated below the VMM area: the default guest-mode
/// selectors before a guest has descriptors of its own.
pub const GUEST_FLAT_CODE_INDEX: u16 = 2;
pub const GUEST_FLAT_DATA_INDEX: u16 = 3;
/// First index of the guest shadows: they use `[FIRST_SHADOW, LDT_ENTRIES)`.
pub const FIRST_SHADOW: u16 = 4;

/// The host's 64-bit user code selector (Linux `__USER_CS`).
pub const HOST_CS64: u16 = 0x33;
/// The host's 32-bit user code selector (Linux `__USER32_CS`).
pub const HOST_CS32: u16 = 0x23;
/// The host's user data selector (Linux `__USER_DS`).
pub const HOST_DS: u16 = 0x2b;

/// Selector (TI=1, RPL=3) of host LDT entry `index`.
pub const fn ldt_selector(index: u16) -> u16 {
    (index << 3) | 4 | 3
}

/// What kind of segment a shadow descriptor describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegKind {
    /// Data segment; `writable`, and `expand_down` for stack-style segments.
    Data { writable: bool, expand_down: bool },
    /// Code segment; `readable` (execute/read) or execute-only.
    Code { readable: bool },
}

/// A segment as the host LDT should hold it. `limit` is the byte-granular
/// effective limit (the last valid offset), as in the guest's descriptor cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostSegment {
    pub base: u32,
    pub limit: u32,
    pub kind: SegKind,
    /// D/B bit: 32-bit default operand size / stack.
    pub big: bool,
    pub present: bool,
}

/// What the host LDT holds, entry by entry, as its writer recorded it: a
/// dense table (the selector checks and shadow compares run on every entry
/// into guest code, where a SipHash map lookup per segment showed in
/// profiles of system calls).
#[derive(Clone, Debug)]
pub struct LdtTable(Box<[Option<HostSegment>]>);

impl Default for LdtTable {
    fn default() -> LdtTable {
        LdtTable(vec![None; usize::from(LDT_ENTRIES)].into_boxed_slice())
    }
}

impl LdtTable {
    pub fn get(&self, index: &u16) -> Option<&HostSegment> {
        self.0.get(usize::from(*index))?.as_ref()
    }
    /// Records entry `index` (ignored beyond the LDT, which `set_entry`
    /// refuses anyway).
    pub fn insert(&mut self, index: u16, seg: HostSegment) {
        if let Some(e) = self.0.get_mut(usize::from(index)) {
            *e = Some(seg);
        }
    }
}

impl Extend<(u16, HostSegment)> for LdtTable {
    fn extend<I: IntoIterator<Item = (u16, HostSegment)>>(&mut self, iter: I) {
        for (i, seg) in iter {
            self.insert(i, seg);
        }
    }
}

impl HostSegment {
    /// A flat 32-bit segment covering the whole 4 GiB.
    pub const fn flat(kind: SegKind) -> Self {
        HostSegment { base: 0, limit: u32::MAX, kind, big: true, present: true }
    }

    /// The same segment with its accessible range cut below `vmm_base`.
    /// Expand-down segments cannot be cut without changing which offsets are
    /// valid, so one that would reach the VMM area comes back not present: a
    /// load faults and the monitor emulates.
    pub fn truncated(self, vmm_base: u32) -> HostSegment {
        let mut s = self;
        match s.kind {
            SegKind::Data { expand_down: true, .. } => {
                let upper_end = if s.big { u64::from(u32::MAX) } else { 0xFFFF };
                if u64::from(s.base) + upper_end >= u64::from(vmm_base) {
                    s.present = false;
                }
            }
            _ => {
                let last = u64::from(s.base) + u64::from(s.limit);
                if s.base >= vmm_base {
                    s.present = false;
                } else if last >= u64::from(vmm_base) {
                    s.limit = vmm_base - 1 - s.base;
                }
            }
        }
        s
    }

    /// Encodes the `struct user_desc` for `modify_ldt`.
    fn user_desc(&self, index: u16) -> UserDesc {
        // Limits above 1 MiB need page granularity: round down so the host
        // never allows more than the guest segment does.
        let (limit, pages) =
            if self.limit > 0xF_FFFF { ((self.limit >> 12) & 0xF_FFFF, true) } else { (self.limit, false) };
        let (contents, read_exec_only) = match self.kind {
            SegKind::Data { writable, expand_down } => (u32::from(expand_down), !writable),
            SegKind::Code { readable } => (2, !readable),
        };
        let mut flags: u32 = 0;
        flags |= u32::from(self.big); // seg_32bit
        flags |= contents << 1; // contents:2
        flags |= u32::from(read_exec_only) << 3;
        flags |= u32::from(pages) << 4; // limit_in_pages
        flags |= u32::from(!self.present) << 5; // seg_not_present
        flags |= 1 << 6; // useable
        UserDesc { entry_number: u32::from(index), base_addr: self.base, limit, flags }
    }
}

/// Linux's `struct user_desc` (asm/ldt.h): three words and a bitfield word
/// `seg_32bit:1 contents:2 read_exec_only:1 limit_in_pages:1
/// seg_not_present:1 useable:1 lm:1`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct UserDesc {
    entry_number: u32,
    base_addr: u32,
    limit: u32,
    flags: u32,
}

fn modify_ldt_write(desc: &UserDesc) -> Result<(), HostError> {
    // SAFETY: modify_ldt(1, ptr, size) reads `size` bytes from `desc`, a
    // valid `struct user_desc`; it only changes this process's LDT.
    let r = unsafe { libc::syscall(libc::SYS_modify_ldt, 1, desc as *const UserDesc, std::mem::size_of::<UserDesc>()) };
    if r != 0 {
        return Err(HostError::ModifyLdt { index: desc.entry_number as u16, errno: nix::Error::last() });
    }
    Ok(())
}

/// Writes host LDT entry `index`. Returns its selector.
pub fn set_entry(index: u16, seg: &HostSegment) -> Result<u16, HostError> {
    if index >= LDT_ENTRIES {
        return Err(HostError::LdtIndex(index));
    }
    modify_ldt_write(&seg.user_desc(index))?;
    Ok(ldt_selector(index))
}

/// Clears host LDT entry `index` (loads of its selector fault again).
pub fn clear_entry(index: u16) -> Result<(), HostError> {
    if index >= LDT_ENTRIES {
        return Err(HostError::LdtIndex(index));
    }
    // An all-zero descriptor with read_exec_only and seg_not_present set is
    // what the kernel treats as "empty".
    let desc = UserDesc { entry_number: u32::from(index), base_addr: 0, limit: 0, flags: (1 << 3) | (1 << 5) };
    modify_ldt_write(&desc)
}

/// The monitor's reserved entries: the flat 32-bit code segment translated
/// code runs in, the VMM data segment (GS in translated code, based at the
/// VMM area), and flat guest code/data truncated below the VMM area.
pub fn reserved_entries(vmm_base: u32, vmm_size: u32) -> [(u16, HostSegment); 4] {
    let code = SegKind::Code { readable: true };
    let data = SegKind::Data { writable: true, expand_down: false };
    [
        (VMM_CODE_INDEX, HostSegment::flat(code)),
        (VMM_DATA_INDEX, HostSegment { base: vmm_base, limit: vmm_size - 1, kind: data, big: true, present: true }),
        (GUEST_FLAT_CODE_INDEX, HostSegment::flat(code).truncated(vmm_base)),
        (GUEST_FLAT_DATA_INDEX, HostSegment::flat(data).truncated(vmm_base)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_cuts_below_vmm_area() {
        let flat = HostSegment::flat(SegKind::Data { writable: true, expand_down: false });
        let t = flat.truncated(0xFF80_0000);
        assert_eq!(t.limit, 0xFF7F_FFFF);
        assert!(t.present);
        let based = HostSegment { base: 0xC000_0000, ..flat }.truncated(0xFF80_0000);
        assert_eq!(based.base as u64 + based.limit as u64, 0xFF7F_FFFF);
        let small = HostSegment { limit: 0xFFFF, ..flat }.truncated(0xFF80_0000);
        assert_eq!(small.limit, 0xFFFF);
        let inside = HostSegment { base: 0xFF90_0000, limit: 0xFFF, ..flat }.truncated(0xFF80_0000);
        assert!(!inside.present);
        let down = HostSegment { kind: SegKind::Data { writable: true, expand_down: true }, ..flat };
        assert!(!down.truncated(0xFF80_0000).present);
    }

    #[test]
    fn user_desc_encodes_page_granular_limits() {
        let d = HostSegment::flat(SegKind::Code { readable: true }).truncated(0xFF80_0000).user_desc(5);
        assert_eq!(d.entry_number, 5);
        assert_eq!(d.limit, 0xFF7FF);
        assert_eq!(ldt_selector(5), 0x2f);
    }
}
