//! Guest segment descriptors: decoding the 8-byte GDT/LDT/IDT entries.
//! (Their host shadows are the bt backend's: `backend::bt::segments`.)

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
    }
}
