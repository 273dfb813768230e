//! Guest segment descriptors: decoding the 8-byte GDT/LDT/IDT entries, and
//! the shadow (host LDT) index each guest descriptor gets.
//!
//! Each guest descriptor has two shadow slots in the host LDT, one-to-one,
//! so mapping a host selector found at an exit back to the guest selector
//! is arithmetic, not a search:
//!
//! | host LDT indexes | holds |
//! | --- | --- |
//! | `0..2048` | guest GDT entry `i`, limit truncated below the VMM area (translated kernel code) |
//! | `2048..4096` | guest GDT entry `i`, as the guest wrote it (direct user code) |
//! | `4096..6144` | guest LDT entry `j`, truncated |
//! | `6144..8188` | guest LDT entry `j`, as written |
//!
//! Why two: user code runs directly and glibc addresses its TLS with
//! negative offsets that wrap around 4 GiB (`gs:[-0x54]`), which a truncated
//! segment turns into #GP (Xen's "nosegneg" problem). Truncating user
//! segments would buy nothing here anyway: in-process user code can load the
//! host's flat selectors itself.

use crate::host::ldt::{self, HostSegment, SegKind};

/// First host LDT index used for guest LDT descriptors.
pub const LDT_SHADOW_BASE: u16 = 4096;
/// Offset of the untruncated (user) slots within each table's range.
pub const USER_SLOTS: u16 = 2048;
/// Guest GDT/LDT indexes that have a shadow slot.
pub const MAX_SHADOWED: u16 = 2044;

/// A decoded segment or system descriptor (the "descriptor cache" view).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub base: u32,
    /// Effective byte-granular limit (granularity applied).
    pub limit: u32,
    /// Type field (4 bits).
    pub typ: u8,
    /// S bit: code/data (true) or system (false).
    pub s: bool,
    pub dpl: u8,
    pub present: bool,
    /// D/B bit.
    pub db: bool,
    pub g: bool,
    pub avl: bool,
}

impl Descriptor {
    /// Decodes the two little-endian words of a descriptor.
    pub fn from_u64(d: u64) -> Descriptor {
        let lo = d as u32;
        let hi = (d >> 32) as u32;
        let base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF00_0000);
        let raw_limit = (lo & 0xFFFF) | (hi & 0x000F_0000);
        let g = hi & (1 << 23) != 0;
        let limit = if g { (raw_limit << 12) | 0xFFF } else { raw_limit };
        Descriptor {
            base,
            limit,
            typ: ((hi >> 8) & 0xF) as u8,
            s: hi & (1 << 12) != 0,
            dpl: ((hi >> 13) & 3) as u8,
            present: hi & (1 << 15) != 0,
            avl: hi & (1 << 20) != 0,
            db: hi & (1 << 22) != 0,
            g,
        }
    }

    /// Encodes back to the 8-byte form (for SGDT-style tests and TSS busy bits).
    pub fn to_u64(&self) -> u64 {
        let raw_limit = if self.g { self.limit >> 12 } else { self.limit } & 0xF_FFFF;
        let lo = (raw_limit & 0xFFFF) | (self.base << 16);
        let hi = ((self.base >> 16) & 0xFF)
            | (u32::from(self.typ) << 8)
            | (u32::from(self.s) << 12)
            | (u32::from(self.dpl) << 13)
            | (u32::from(self.present) << 15)
            | (raw_limit & 0xF_0000)
            | (u32::from(self.avl) << 20)
            | (u32::from(self.db) << 22)
            | (u32::from(self.g) << 23)
            | (self.base & 0xFF00_0000);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    pub fn is_code(&self) -> bool {
        self.s && self.typ & 8 != 0
    }
    pub fn is_data(&self) -> bool {
        self.s && self.typ & 8 == 0
    }
    pub fn is_writable_data(&self) -> bool {
        self.is_data() && self.typ & 2 != 0
    }
    pub fn is_readable(&self) -> bool {
        self.is_data() || (self.is_code() && self.typ & 2 != 0)
    }
    pub fn is_conforming_code(&self) -> bool {
        self.is_code() && self.typ & 4 != 0
    }
    pub fn is_expand_down(&self) -> bool {
        self.is_data() && self.typ & 4 != 0
    }

    /// The access-rights word as LAR reports it (bits 8-23 of the high dword).
    pub fn access_rights(&self) -> u32 {
        (self.to_u64() >> 32) as u32 & 0x00F0_FF00
    }

    /// The host LDT copy of this code/data descriptor, truncated below the
    /// VMM area (`vmm_base`), or as written when `vmm_base` is `None`.
    /// System descriptors have no shadow.
    pub fn shadow(&self, vmm_base: Option<u32>) -> Option<HostSegment> {
        if !self.s {
            return None;
        }
        let kind = if self.is_code() {
            SegKind::Code { readable: self.typ & 2 != 0 }
        } else {
            SegKind::Data { writable: self.typ & 2 != 0, expand_down: self.typ & 4 != 0 }
        };
        let seg = HostSegment { base: self.base, limit: self.limit, kind, big: self.db, present: self.present };
        Some(match vmm_base {
            Some(b) => seg.truncated(b),
            None => seg,
        })
    }
}

/// Host LDT index of the shadow of guest selector `sel`: the truncated
/// slot, or the user slot (as written) when `user` (None for null
/// selectors and indexes beyond the shadow space).
pub fn shadow_index(sel: u16, user: bool) -> Option<u16> {
    let index = sel >> 3;
    if sel & !3 == 0 || index >= MAX_SHADOWED {
        return None;
    }
    let table = if sel & 4 != 0 { LDT_SHADOW_BASE } else { 0 };
    Some(table + index + if user { USER_SLOTS } else { 0 })
}

/// Host selector (RPL 3, TI=1) for guest selector `sel`.
pub fn shadow_selector(sel: u16, user: bool) -> Option<u16> {
    shadow_index(sel, user).map(ldt::ldt_selector)
}

/// Guest selector for host selector `host` given the guest RPL to report
/// (the host always has RPL 3). Inverse of [`shadow_selector`].
pub fn guest_selector(host: u16, rpl: u8) -> Option<u16> {
    if host & 4 == 0 {
        return None;
    }
    let index = host >> 3;
    let (ti, rest) = if index >= LDT_SHADOW_BASE { (4, index - LDT_SHADOW_BASE) } else { (0, index) };
    let gi = rest % USER_SLOTS;
    if gi >= MAX_SHADOWED {
        return None;
    }
    Some((gi << 3) | ti | u16::from(rpl & 3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_linux_kernel_code_descriptor() {
        // Linux i386 __KERNEL_CS: base 0, limit 0xfffff pages, type 0xb, S, DPL0, P, D, G.
        let d = Descriptor::from_u64(0x00cf_9b00_0000_ffff);
        assert_eq!(
            (d.base, d.limit, d.typ, d.s, d.dpl, d.present, d.db, d.g),
            (0, u32::MAX, 0xb, true, 0, true, true, true)
        );
        assert!(d.is_code() && d.is_readable() && !d.is_conforming_code());
        assert_eq!(d.to_u64(), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn decodes_based_byte_granular_data() {
        let d = Descriptor {
            base: 0x1234_5678,
            limit: 0xABCD,
            typ: 3,
            s: true,
            dpl: 3,
            present: true,
            db: true,
            g: false,
            avl: false,
        };
        assert_eq!(Descriptor::from_u64(d.to_u64()), d);
        let h = d.shadow(Some(0xFF80_0000)).unwrap();
        assert_eq!((h.base, h.limit), (0x1234_5678, 0xABCD));
    }

    #[test]
    fn shadow_selectors_round_trip() {
        assert_eq!(shadow_index(0x10, false), Some(2));
        assert_eq!(shadow_index(0x10, true), Some(USER_SLOTS + 2));
        assert_eq!(shadow_index(0x0f, false), Some(LDT_SHADOW_BASE + 1));
        assert_eq!(shadow_index(3, false), None);
        for user in [false, true] {
            let h = shadow_selector(0x10, user).unwrap();
            assert_eq!(guest_selector(h, 0), Some(0x10));
            let h = shadow_selector(0x0f, user).unwrap();
            assert_eq!(guest_selector(h, 3), Some(0x0f));
        }
        assert!(shadow_index(0x33, true).unwrap() < crate::host::ldt::FIRST_RESERVED);
        assert!(shadow_index((MAX_SHADOWED - 1) << 3 | 4, true).unwrap() < crate::host::ldt::FIRST_RESERVED);
    }

    #[test]
    fn user_shadows_keep_wraparound_limits() {
        // glibc TLS: base B, limit 4 GiB: gs:[-0x54] wraps to B - 0x54.
        let tls = Descriptor {
            base: 0x0823_e000,
            limit: u32::MAX,
            typ: 3,
            s: true,
            dpl: 3,
            present: true,
            db: true,
            g: true,
            avl: false,
        };
        assert_eq!(tls.shadow(None).unwrap().limit, u32::MAX);
        assert!(tls.shadow(Some(0xFF80_0000)).unwrap().limit < 0xFF80_0000 - 0x0823_e000);
    }
}
