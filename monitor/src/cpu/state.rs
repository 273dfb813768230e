//! The virtual CPU: everything the guest believes about its processor that
//! the host CPU does not hold for it (privilege level, control registers,
//! descriptor tables, segment caches, virtual IF/IOPL, MSRs).

use super::descriptor::Descriptor;

/// EFLAGS bits.
pub mod flags {
    pub const CF: u32 = 1 << 0;
    pub const PF: u32 = 1 << 2;
    pub const AF: u32 = 1 << 4;
    pub const ZF: u32 = 1 << 6;
    pub const SF: u32 = 1 << 7;
    pub const TF: u32 = 1 << 8;
    pub const IF: u32 = 1 << 9;
    pub const DF: u32 = 1 << 10;
    pub const OF: u32 = 1 << 11;
    pub const IOPL: u32 = 3 << 12;
    pub const NT: u32 = 1 << 14;
    pub const RF: u32 = 1 << 16;
    pub const VM: u32 = 1 << 17;
    pub const AC: u32 = 1 << 18;
    pub const VIF: u32 = 1 << 19;
    pub const VIP: u32 = 1 << 20;
    pub const ID: u32 = 1 << 21;
    /// Bits the host CPU holds for the guest while its code runs.
    pub const LIVE: u32 = CF | PF | AF | ZF | SF | TF | DF | OF | AC | ID;
    /// Bits only the virtual CPU holds.
    pub const VIRTUAL: u32 = IF | IOPL | NT | RF | VM | VIF | VIP;
}

/// CR0 bits.
pub mod cr0 {
    pub const PE: u32 = 1 << 0;
    pub const MP: u32 = 1 << 1;
    pub const EM: u32 = 1 << 2;
    pub const TS: u32 = 1 << 3;
    pub const ET: u32 = 1 << 4;
    pub const NE: u32 = 1 << 5;
    pub const WP: u32 = 1 << 16;
    pub const AM: u32 = 1 << 18;
    pub const NW: u32 = 1 << 29;
    pub const CD: u32 = 1 << 30;
    pub const PG: u32 = 1 << 31;
}

/// CR4 bits.
pub mod cr4 {
    pub const VME: u32 = 1 << 0;
    pub const PVI: u32 = 1 << 1;
    pub const TSD: u32 = 1 << 2;
    pub const DE: u32 = 1 << 3;
    pub const PSE: u32 = 1 << 4;
    pub const PAE: u32 = 1 << 5;
    pub const MCE: u32 = 1 << 6;
    pub const PGE: u32 = 1 << 7;
    pub const PCE: u32 = 1 << 8;
    pub const OSFXSR: u32 = 1 << 9;
    pub const OSXMMEXCPT: u32 = 1 << 10;
}

/// Segment register numbers in the x86 encoding order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seg {
    Es = 0,
    Cs = 1,
    Ss = 2,
    Ds = 3,
    Fs = 4,
    Gs = 5,
}

impl Seg {
    pub const ALL: [Seg; 6] = [Seg::Es, Seg::Cs, Seg::Ss, Seg::Ds, Seg::Fs, Seg::Gs];
}

/// A segment register: the visible selector and the hidden descriptor cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegReg {
    pub selector: u16,
    pub cache: Descriptor,
}

/// GDTR / IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableReg {
    pub base: u32,
    pub limit: u16,
}

/// The MSRs a 686-class guest uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Msrs {
    pub sysenter_cs: u32,
    pub sysenter_esp: u32,
    pub sysenter_eip: u32,
    pub apic_base: u64,
    pub pat: u64,
    pub misc_enable: u64,
    pub efer: u64,
    /// Added to the host TSC to give the guest's (guest writes of the TSC
    /// set it).
    pub tsc_offset: i64,
}

/// The general registers, in encoding order (the execution host's frame
/// uses the same order and imports these).
pub mod gpr {
    pub const EAX: usize = 0;
    pub const ECX: usize = 1;
    pub const EDX: usize = 2;
    pub const EBX: usize = 3;
    pub const ESP: usize = 4;
    pub const EBP: usize = 5;
    pub const ESI: usize = 6;
    pub const EDI: usize = 7;
}

/// The complete virtual CPU state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpu {
    pub gpr: [u32; 8],
    pub eip: u32,
    /// Full guest EFLAGS (live bits are synced from the host at exits).
    pub eflags: u32,
    pub seg: [SegReg; 6],
    /// Current privilege level (the guest's, not the host's).
    pub cpl: u8,
    pub cr0: u32,
    pub cr2: u32,
    pub cr3: u32,
    pub cr4: u32,
    pub dr: [u32; 8],
    pub gdtr: TableReg,
    pub idtr: TableReg,
    pub ldtr: SegReg,
    pub tr: SegReg,
    pub msr: Msrs,
    /// HLT executed, waiting for an interrupt.
    pub halted: bool,
    /// Interrupts inhibited for one instruction (after STI, MOV SS, POP SS).
    pub interrupt_shadow: bool,
}

impl Default for Cpu {
    fn default() -> Self {
        Cpu::reset()
    }
}

impl Cpu {
    /// The state after RESET, as far as a 32-bit loader cares (it then sets
    /// protected mode itself): real mode, CS:IP = F000:FFF0.
    pub fn reset() -> Cpu {
        let mut c = Cpu {
            gpr: [0; 8],
            eip: 0xFFF0,
            eflags: 2,
            seg: [SegReg::default(); 6],
            cpl: 0,
            cr0: cr0::ET | cr0::NW | cr0::CD,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            dr: [0, 0, 0, 0, 0xFFFF_0FF0, 0x400, 0xFFFF_0FF0, 0x400],
            gdtr: TableReg { base: 0, limit: 0xFFFF },
            idtr: TableReg { base: 0, limit: 0xFFFF },
            ldtr: SegReg::default(),
            tr: SegReg::default(),
            msr: Msrs { apic_base: 0xFEE0_0900, pat: 0x0007_0406_0007_0406, ..Default::default() },
            halted: false,
            interrupt_shadow: false,
        };
        let data = Descriptor {
            base: 0,
            limit: 0xFFFF,
            typ: 3,
            s: true,
            dpl: 0,
            present: true,
            db: false,
            g: false,
            avl: false,
        };
        for s in Seg::ALL {
            c.seg[s as usize] = SegReg { selector: 0, cache: data };
        }
        c.seg[Seg::Cs as usize] =
            SegReg { selector: 0xF000, cache: Descriptor { base: 0xFFFF_0000, typ: 0xB, ..data } };
        c
    }

    /// Flat 32-bit protected mode, paging off, interrupts off, CPL 0: the
    /// entry state of the multiboot and Linux 32-bit boot protocols.
    pub fn flat_protected(code_sel: u16, data_sel: u16) -> Cpu {
        let mut c = Cpu::reset();
        c.cr0 |= cr0::PE;
        c.eflags = 2;
        let code = Descriptor {
            base: 0,
            limit: u32::MAX,
            typ: 0xB,
            s: true,
            dpl: 0,
            present: true,
            db: true,
            g: true,
            avl: false,
        };
        let data = Descriptor { typ: 0x3, ..code };
        for s in Seg::ALL {
            c.seg[s as usize] = SegReg { selector: data_sel, cache: data };
        }
        c.seg[Seg::Cs as usize] = SegReg { selector: code_sel, cache: code };
        c.tr.cache = Descriptor { typ: 0xB, present: true, limit: 0xFFFF, ..Descriptor::default() };
        c
    }

    pub fn seg(&self, s: Seg) -> &SegReg {
        &self.seg[s as usize]
    }

    pub fn protected_mode(&self) -> bool {
        self.cr0 & cr0::PE != 0
    }

    pub fn paging(&self) -> bool {
        self.cr0 & cr0::PG != 0
    }

    pub fn iopl(&self) -> u8 {
        ((self.eflags & flags::IOPL) >> 12) as u8
    }

    pub fn interrupts_enabled(&self) -> bool {
        self.eflags & flags::IF != 0
    }

    /// Whether the current code segment is 32-bit.
    pub fn code32(&self) -> bool {
        self.seg(Seg::Cs).cache.db
    }

    /// Whether the stack segment is 32-bit (ESP vs SP).
    pub fn stack32(&self) -> bool {
        self.seg(Seg::Ss).cache.db
    }

    /// Guest-linear address of CS:EIP.
    pub fn linear_eip(&self) -> u32 {
        self.seg(Seg::Cs).cache.base.wrapping_add(self.eip)
    }

    /// A one-paragraph dump of the state, for triple-fault reports and `--until`.
    pub fn dump(&self) -> String {
        let g = &self.gpr;
        let s = |r: Seg| {
            let c = self.seg(r);
            format!("{:04x}(base {:08x} limit {:08x})", c.selector, c.cache.base, c.cache.limit)
        };
        format!(
            "EAX={:08x} EBX={:08x} ECX={:08x} EDX={:08x} ESI={:08x} EDI={:08x} EBP={:08x} ESP={:08x}\n\
             EIP={:08x} EFLAGS={:08x} CPL={} CR0={:08x} CR2={:08x} CR3={:08x} CR4={:08x}\n\
             CS={} SS={} DS={} ES={} FS={} GS={}\n\
             GDTR={:08x}/{:04x} IDTR={:08x}/{:04x} LDTR={:04x} TR={:04x}",
            g[gpr::EAX],
            g[gpr::EBX],
            g[gpr::ECX],
            g[gpr::EDX],
            g[gpr::ESI],
            g[gpr::EDI],
            g[gpr::EBP],
            g[gpr::ESP],
            self.eip,
            self.eflags,
            self.cpl,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            s(Seg::Cs),
            s(Seg::Ss),
            s(Seg::Ds),
            s(Seg::Es),
            s(Seg::Fs),
            s(Seg::Gs),
            self.gdtr.base,
            self.gdtr.limit,
            self.idtr.base,
            self.idtr.limit,
            self.ldtr.selector,
            self.tr.selector
        )
    }
}
