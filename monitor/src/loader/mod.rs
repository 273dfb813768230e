//! Guest image loaders: multiboot v1 ELF, Linux boot protocol, initramfs.
//!
//! Every loader writes its image into [`GuestMemory`] and returns a
//! [`BootState`]: the initial CPU state of the 32-bit boot protocols (flat
//! 4 GiB code and data segments, protected mode on, paging off, interrupts
//! off) plus the guest-physical ranges it used. Both backends turn it into
//! their vCPU state ([`BootState::to_cpu`]). Addresses come from
//! [`crate::layout`]; docs/loaders.md has the picture.

pub mod initramfs;
pub mod linux;
pub mod multiboot;
pub mod vmlinux;

use crate::cpu::state::cr0;
use crate::cpu::{Cpu, TableReg};
use crate::layout::{
    BIOS_ROM_START, BOOT_CODE_SELECTOR, BOOT_DATA_SELECTOR, BOOT_GDT_ADDR, BOOT_STACK_BOTTOM, BOOT_STACK_TOP,
    EBDA_START, HIGH_MEMORY_START, LEGACY_HOLE_END, LEGACY_HOLE_START,
};
use crate::memory::{GuestMemory, MemoryError};

/// The kinds of kernel image Popek loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// A Linux bzImage (boot protocol 2.06+): [`linux::load`].
    BzImage,
    /// A multiboot v1 kernel (ELF32 or a.out kludge): [`multiboot::load`].
    Multiboot,
}

/// Which loader `image` is for, if any (a bzImage is checked first).
pub fn detect(image: &[u8]) -> Option<ImageFormat> {
    if linux::is_bzimage(image) {
        Some(ImageFormat::BzImage)
    } else if multiboot::is_multiboot(image) {
        Some(ImageFormat::Multiboot)
    } else {
        None
    }
}

/// What a guest-physical range holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeKind {
    /// Kernel bytes copied from the image.
    Kernel,
    /// Zero-filled memory the kernel expects (bss).
    Bss,
    /// Memory the kernel claims beyond its image while it boots (Linux
    /// `init_size`: decompression buffer, page tables).
    KernelWorkArea,
    /// The boot GDT ([`BOOT_GDT_ADDR`]).
    Gdt,
    /// The initial stack.
    Stack,
    /// Multiboot information area (info struct, memory map, module list, strings).
    MultibootInfo,
    /// Multiboot module number `n`.
    Module(usize),
    /// Linux `boot_params`.
    ZeroPage,
    /// Linux kernel command line.
    CommandLine,
    /// Linux initial ramdisk.
    Initrd,
}

/// One guest-physical range a loader used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestRange {
    pub kind: RangeKind,
    pub start: u64,
    pub len: u64,
}

impl GuestRange {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The initial vCPU state of a loaded guest, and where the loader put things.
///
/// Segments are flat (base 0, limit 4 GiB): CS is a 32-bit execute/read code
/// segment with selector `code_selector`, DS/ES/FS/GS/SS are read/write data
/// segments with selector `data_selector`; both are described by the GDT at
/// `gdtr`. CR0 = PE|ET (protected mode, paging off), EFLAGS = 0x2 (IF off).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootState {
    pub eip: u32,
    pub esp: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
    pub esi: u32,
    pub edi: u32,
    pub ebp: u32,
    pub eflags: u32,
    pub cr0: u32,
    pub code_selector: u16,
    pub data_selector: u16,
    pub gdtr: TableReg,
    /// Guest-physical ranges written or reserved by the loader, in the order
    /// they were placed.
    pub ranges: Vec<GuestRange>,
}

impl BootState {
    /// The common entry state: flat segments from the boot GDT, protected
    /// mode, paging and interrupts off, ESP at [`BOOT_STACK_TOP`], other
    /// registers zero.
    pub(crate) fn flat(eip: u32) -> BootState {
        BootState {
            eip,
            esp: BOOT_STACK_TOP,
            eax: 0,
            ebx: 0,
            ecx: 0,
            edx: 0,
            esi: 0,
            edi: 0,
            ebp: 0,
            eflags: 0x2,
            cr0: cr0::PE | cr0::ET,
            code_selector: BOOT_CODE_SELECTOR,
            data_selector: BOOT_DATA_SELECTOR,
            gdtr: TableReg { base: BOOT_GDT_ADDR, limit: (BOOT_GDT.len() * 8 - 1) as u16 },
            ranges: Vec::new(),
        }
    }

    /// The full virtual CPU state for this entry state.
    pub fn to_cpu(&self) -> Cpu {
        use crate::cpu::state::gpr;
        let mut c = Cpu::flat_protected(self.code_selector, self.data_selector);
        c.eip = self.eip;
        c.eflags = self.eflags;
        c.cr0 = self.cr0;
        c.gdtr = self.gdtr;
        c.gpr[gpr::EAX] = self.eax;
        c.gpr[gpr::ECX] = self.ecx;
        c.gpr[gpr::EDX] = self.edx;
        c.gpr[gpr::EBX] = self.ebx;
        c.gpr[gpr::ESP] = self.esp;
        c.gpr[gpr::EBP] = self.ebp;
        c.gpr[gpr::ESI] = self.esi;
        c.gpr[gpr::EDI] = self.edi;
        c
    }

    /// The range of `kind`, if the loader used one.
    pub fn range(&self, kind: &RangeKind) -> Option<&GuestRange> {
        self.ranges.iter().find(|r| &r.kind == kind)
    }

    pub(crate) fn add_range(&mut self, kind: RangeKind, start: u64, len: u64) {
        self.ranges.push(GuestRange { kind, start, len });
    }
}

/// The boot GDT: null, null, code (0x10), data (0x18); flat 4 GiB, DPL 0.
pub const BOOT_GDT: [u64; 4] = [0, 0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];

/// Writes [`BOOT_GDT`] at [`BOOT_GDT_ADDR`] and records the GDT and stack
/// ranges in `state`.
pub(crate) fn write_boot_gdt(mem: &GuestMemory, state: &mut BootState) -> Result<(), MemoryError> {
    write_boot_gdt_at(mem, state, 0)
}

/// [`write_boot_gdt`] with the GDT and the stack moved up by `shift` bytes
/// (a multiboot kernel linked over the usual place); GDTR and ESP follow.
pub(crate) fn write_boot_gdt_at(mem: &GuestMemory, state: &mut BootState, shift: u32) -> Result<(), MemoryError> {
    let bytes: Vec<u8> = BOOT_GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    let gdt = BOOT_GDT_ADDR + shift;
    mem.write(u64::from(gdt), &bytes)?;
    state.gdtr.base = gdt;
    state.esp = BOOT_STACK_TOP + shift;
    state.add_range(RangeKind::Gdt, u64::from(gdt), bytes.len() as u64);
    let stack = BOOT_STACK_BOTTOM + shift;
    state.add_range(RangeKind::Stack, u64::from(stack), u64::from(BOOT_STACK_TOP - BOOT_STACK_BOTTOM));
    Ok(())
}

/// e820 memory types.
pub mod e820 {
    pub const RAM: u32 = 1;
    pub const RESERVED: u32 = 2;
}

/// One entry of the BIOS-style memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub typ: u32,
}

/// The memory map Popek reports for `ram_size` bytes of RAM (both loaders):
/// `[0, EBDA_START)` RAM, `[EBDA_START, 640K)` reserved, the BIOS ROM
/// `[BIOS_ROM_START, 1M)` reserved, `[1M, ram_size)` RAM. The VGA window
/// `[640K, 0xF0000)` is not listed at all.
pub fn e820_map(ram_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: u64::from(EBDA_START), typ: e820::RAM },
        E820Entry { addr: u64::from(EBDA_START), size: u64::from(LEGACY_HOLE_START - EBDA_START), typ: e820::RESERVED },
        E820Entry {
            addr: u64::from(BIOS_ROM_START),
            size: u64::from(LEGACY_HOLE_END - BIOS_ROM_START),
            typ: e820::RESERVED,
        },
    ];
    if ram_size > u64::from(HIGH_MEMORY_START) {
        map.push(E820Entry {
            addr: u64::from(HIGH_MEMORY_START),
            size: ram_size - u64::from(HIGH_MEMORY_START),
            typ: e820::RAM,
        });
    }
    map
}

/// Whether `[start, start+len)` touches the legacy hole `[640K, 1M)`.
pub(crate) fn overlaps_legacy_hole(start: u64, len: u64) -> bool {
    overlaps(start, len, u64::from(LEGACY_HOLE_START), u64::from(LEGACY_HOLE_END - LEGACY_HOLE_START))
}

/// Whether two half-open ranges intersect (empty ranges never do).
pub(crate) fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen != 0 && blen != 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// Rounds `v` up to a multiple of `align` (a power of two), `None` on overflow.
pub(crate) fn align_up(v: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    Some(v.checked_add(align - 1)? & !(align - 1))
}

/// Little-endian field readers on an image, bounds-checked.
pub(crate) fn le_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off.checked_add(2)?)?.try_into().ok()?))
}

pub(crate) fn le_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

pub(crate) fn le_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off.checked_add(8)?)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_excludes_the_legacy_hole() {
        let map = e820_map(64 << 20);
        assert_eq!(
            map,
            vec![
                E820Entry { addr: 0, size: 0x9FC00, typ: 1 },
                E820Entry { addr: 0x9FC00, size: 0x400, typ: 2 },
                E820Entry { addr: 0xF0000, size: 0x10000, typ: 2 },
                E820Entry { addr: 0x100000, size: (64 << 20) - 0x100000, typ: 1 },
            ]
        );
        for e in map.iter().filter(|e| e.typ == e820::RAM) {
            assert!(!overlaps_legacy_hole(e.addr, e.size));
        }
    }

    #[test]
    fn boot_state_becomes_a_flat_protected_cpu() {
        let mut s = BootState::flat(0x10_0000);
        s.eax = 0x2BAD_B002;
        s.esi = 0x7000;
        let c = s.to_cpu();
        assert_eq!(c.eip, 0x10_0000);
        assert_eq!(c.gpr[0], 0x2BAD_B002);
        assert_eq!(c.gpr[6], 0x7000);
        assert_eq!(c.gpr[4], BOOT_STACK_TOP);
        assert_eq!(c.cr0 & 0x8000_0001, 1);
        assert_eq!(c.eflags & 0x200, 0);
        assert_eq!(c.seg[crate::cpu::Seg::Cs as usize].selector, 0x10);
        assert_eq!(c.seg[crate::cpu::Seg::Cs as usize].cache.limit, u32::MAX);
        assert_eq!(c.gdtr.base, BOOT_GDT_ADDR);
    }

    #[test]
    fn detects_formats() {
        let elf = multiboot::build_elf(&[0xF4], 0x10_0000, 0x10_0000, 0);
        assert_eq!(detect(&elf), Some(ImageFormat::Multiboot));
        assert_eq!(detect(&[0u8; 4096]), None);
        match std::fs::read("/work/shared/guests/linux-686/vmlinuz") {
            Ok(k) => assert_eq!(detect(&k), Some(ImageFormat::BzImage)),
            Err(e) => println!("skipped the bzImage case: shared kernel not readable ({e})"),
        }
    }

    #[test]
    fn boot_gdt_descriptors_are_flat() {
        let m = GuestMemory::new(4 << 20).unwrap();
        let mut s = BootState::flat(0);
        write_boot_gdt(&m, &mut s).unwrap();
        // The descriptors in guest memory are the ones the vCPU starts with.
        let cpu = s.to_cpu();
        let code = crate::cpu::Descriptor::from_u64(BOOT_GDT[2]);
        let data = crate::cpu::Descriptor::from_u64(BOOT_GDT[3]);
        assert_eq!(code, cpu.seg[crate::cpu::Seg::Cs as usize].cache);
        assert_eq!(data, cpu.seg[crate::cpu::Seg::Ds as usize].cache);
        assert!(code.present && code.db && code.g && code.base == 0 && code.limit == u32::MAX);
        assert_eq!(m.read_u32(u64::from(BOOT_GDT_ADDR) + 16).unwrap(), 0xFFFF);
    }
}
