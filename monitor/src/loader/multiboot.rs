//! Multiboot v1 (specification 0.6.96) for ELF32 kernels, as QEMU's
//! `-kernel` loads them.
//!
//! The header (magic, flags, checksum) is searched 4-byte aligned in the first
//! 8192 bytes. With flag 16 (address fields) the a.out kludge fields say what
//! to load where; otherwise the image must be an ELF32 i386 executable whose
//! `PT_LOAD` segments are loaded at `p_paddr` (bss zero-filled). Modules go
//! page-aligned above the kernel. The boot GDT, the stack, the information
//! structure, the memory map, the module list and all strings live in the
//! boot area `[BOOT_GDT_ADDR, MULTIBOOT_INFO_END)`; when the kernel is linked
//! over it (real-mode style kernels at 0x8000), the whole area moves, as one
//! piece, to the first place the image and the modules leave free: a lower
//! page below the EBDA, else above the modules (QEMU also keeps its loader
//! data out of the image's way). Entry: EAX = 0x2BADB002, EBX = info
//! address.

use thiserror::Error;

use super::{
    align_up, e820_map, le_u16, le_u32, overlaps, overlaps_legacy_hole, write_boot_gdt_at, BootState, RangeKind,
};
use crate::layout::{BOOT_GDT_ADDR, EBDA_START, HIGH_MEMORY_START, MULTIBOOT_INFO_ADDR, MULTIBOOT_INFO_END, PAGE_SIZE};
use crate::memory::{GuestMemory, MemoryError};

/// Magic value of the multiboot header in the image.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Value of EAX at the kernel's entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie entirely within this many bytes of the image start.
pub const SEARCH_LIMIT: usize = 8192;

/// Header flags (requirements of the kernel).
pub mod header_flags {
    /// Align modules on 4 KiB pages (always done).
    pub const PAGE_ALIGN: u32 = 1 << 0;
    /// Provide mem_lower/mem_upper and the memory map (always done).
    pub const MEMORY_INFO: u32 = 1 << 1;
    /// Preferred video mode: a hint; Popek has no framebuffer and ignores it.
    pub const VIDEO_MODE: u32 = 1 << 2;
    /// The address fields (a.out kludge) are valid and override ELF.
    pub const AOUT_KLUDGE: u32 = 1 << 16;
    /// Required-feature bits Popek understands.
    pub const KNOWN_REQUIRED: u32 = PAGE_ALIGN | MEMORY_INFO | VIDEO_MODE;
    /// Bits 0-15 are requirements: an unknown one must fail the load.
    pub const REQUIRED_MASK: u32 = 0xFFFF;
}

/// Flags of the information structure (what the loader provides).
pub mod info_flags {
    pub const MEMORY: u32 = 1 << 0;
    pub const CMDLINE: u32 = 1 << 2;
    pub const MODS: u32 = 1 << 3;
    pub const MMAP: u32 = 1 << 6;
    pub const BOOT_LOADER_NAME: u32 = 1 << 9;
}

/// Size of the information structure (up to and including the VBE fields).
pub const INFO_SIZE: u32 = 88;
/// Offsets of the information structure's fields.
pub mod info_offset {
    pub const FLAGS: u32 = 0;
    pub const MEM_LOWER: u32 = 4;
    pub const MEM_UPPER: u32 = 8;
    pub const CMDLINE: u32 = 16;
    pub const MODS_COUNT: u32 = 20;
    pub const MODS_ADDR: u32 = 24;
    pub const MMAP_LENGTH: u32 = 44;
    pub const MMAP_ADDR: u32 = 48;
    pub const BOOT_LOADER_NAME: u32 = 64;
}
/// One memory map entry: size (20, not counting itself), base u64, length u64, type.
pub const MMAP_ENTRY_SIZE: u32 = 24;
/// One module entry: mod_start, mod_end, string, reserved.
pub const MODULE_ENTRY_SIZE: u32 = 16;
/// The name Popek gives itself in `boot_loader_name`.
pub const LOADER_NAME: &str = "popek";

const ELF_HEADER_SIZE: usize = 52;
const ELF_PHDR_SIZE: usize = 32;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const EM_386: u16 = 3;
const ET_EXEC: u16 = 2;

#[derive(Debug, Error)]
pub enum MultibootError {
    #[error("not a multiboot kernel: no header magic {HEADER_MAGIC:#x} in the first {SEARCH_LIMIT} bytes")]
    NoHeader,
    #[error("multiboot header at {offset:#x} is cut off by the end of the image or of the search area")]
    HeaderTruncated { offset: usize },
    #[error("multiboot header at {offset:#x}: magic + flags + checksum = {sum:#x}, not 0")]
    BadChecksum { offset: usize, sum: u32 },
    #[error("multiboot header requires features Popek does not provide (flags {0:#x})")]
    UnsupportedFlags(u32),
    #[error("multiboot address fields are inconsistent: {0}")]
    BadAddressFields(&'static str),
    #[error("the multiboot address fields load {offset:#x}+{len:#x} but the image has {file_len:#x} bytes")]
    LoadTruncated { offset: u64, len: u64, file_len: u64 },
    #[error("not an ELF image and the multiboot header has no address fields (flag 16)")]
    NotElf,
    #[error("unsupported ELF: {0} (need a 32-bit little-endian i386 executable)")]
    UnsupportedElf(&'static str),
    #[error("ELF program header table ({phnum} entries at {phoff:#x}) is outside the image ({file_len:#x} bytes)")]
    ElfTruncated { phoff: u64, phnum: u16, file_len: u64 },
    #[error("ELF segment {index}: file bytes {offset:#x}+{filesz:#x} are outside the image ({file_len:#x} bytes)")]
    SegmentTruncated { index: usize, offset: u64, filesz: u64, file_len: u64 },
    #[error("ELF segment {index}: p_filesz {filesz:#x} is larger than p_memsz {memsz:#x}")]
    SegmentSize { index: usize, filesz: u64, memsz: u64 },
    #[error("no loadable segment in the ELF image")]
    NoLoadableSegment,
    #[error("{what} at {start:#x}..{end:#x} does not fit in guest RAM ({ram:#x} bytes)")]
    DoesNotFit { what: &'static str, start: u64, end: u64, ram: u64 },
    #[error("{what} at {start:#x}..{end:#x} overlaps the legacy hole (0xa0000..0x100000)")]
    LegacyHole { what: &'static str, start: u64, end: u64 },
    #[error(
        "no room for the boot GDT, stack and multiboot information ({:#x} bytes) clear of the kernel and modules",
        MULTIBOOT_INFO_END - BOOT_GDT_ADDR
    )]
    NoRoomForBootData,
    #[error("entry point {0:#x} is not inside the loaded kernel")]
    EntryNotLoaded(u32),
    #[error("arithmetic overflow computing {0}")]
    Overflow(&'static str),
    #[error("{0} contains a NUL byte")]
    NulInString(&'static str),
    #[error("multiboot information ({0} bytes) does not fit in the information area")]
    InfoAreaFull(u64),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

type Result<T> = std::result::Result<T, MultibootError>;

/// The multiboot header as found in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Offset of the magic in the image.
    pub offset: usize,
    pub flags: u32,
    /// The a.out kludge fields, when flag 16 is set.
    pub address: Option<AddressFields>,
}

/// The header's address fields (flag 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressFields {
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// A boot module: its bytes and its command line.
#[derive(Clone, Copy, Debug)]
pub struct Module<'a> {
    pub data: &'a [u8],
    pub cmdline: &'a str,
}

/// Finds and checks the multiboot header.
pub fn find_header(image: &[u8]) -> Result<Header> {
    let area = &image[..image.len().min(SEARCH_LIMIT)];
    let offset = (0..area.len().saturating_sub(3))
        .step_by(4)
        .find(|&o| le_u32(area, o) == Some(HEADER_MAGIC))
        .ok_or(MultibootError::NoHeader)?;
    let field = |i: usize| le_u32(area, offset + 4 * i).ok_or(MultibootError::HeaderTruncated { offset });
    let flags = field(1)?;
    let checksum = field(2)?;
    let sum = HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum);
    if sum != 0 {
        return Err(MultibootError::BadChecksum { offset, sum });
    }
    let unknown = flags & header_flags::REQUIRED_MASK & !header_flags::KNOWN_REQUIRED;
    if unknown != 0 {
        return Err(MultibootError::UnsupportedFlags(unknown));
    }
    let address = if flags & header_flags::AOUT_KLUDGE != 0 {
        Some(AddressFields {
            header_addr: field(3)?,
            load_addr: field(4)?,
            load_end_addr: field(5)?,
            bss_end_addr: field(6)?,
            entry_addr: field(7)?,
        })
    } else {
        None
    };
    Ok(Header { offset, flags, address })
}

/// Whether `image` has a valid multiboot header (for format detection).
pub fn is_multiboot(image: &[u8]) -> bool {
    find_header(image).is_ok()
}

/// One piece of the image to copy into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    /// Offset in the image.
    pub offset: u64,
    pub filesz: u64,
    pub paddr: u64,
    pub memsz: u64,
}

/// What to load and where to start.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Plan {
    pub segments: Vec<Segment>,
    pub entry: u32,
}

fn plan_aout(image: &[u8], header: &Header, a: &AddressFields) -> Result<Plan> {
    let file_len = image.len() as u64;
    if a.header_addr < a.load_addr {
        return Err(MultibootError::BadAddressFields("header_addr is below load_addr"));
    }
    let offset = (header.offset as u64)
        .checked_sub(u64::from(a.header_addr - a.load_addr))
        .ok_or(MultibootError::BadAddressFields("load_addr is before the start of the image"))?;
    let filesz = if a.load_end_addr == 0 {
        file_len - offset
    } else {
        u64::from(
            a.load_end_addr
                .checked_sub(a.load_addr)
                .ok_or(MultibootError::BadAddressFields("load_end_addr is below load_addr"))?,
        )
    };
    let end = offset.checked_add(filesz).ok_or(MultibootError::Overflow("the load range"))?;
    if end > file_len {
        return Err(MultibootError::LoadTruncated { offset, len: filesz, file_len });
    }
    let load_end = u64::from(a.load_addr) + filesz;
    let memsz = if a.bss_end_addr == 0 {
        filesz
    } else {
        u64::from(a.bss_end_addr)
            .checked_sub(load_end)
            .ok_or(MultibootError::BadAddressFields("bss_end_addr is below the end of the loaded image"))?
            + filesz
    };
    Ok(Plan { segments: vec![Segment { offset, filesz, paddr: u64::from(a.load_addr), memsz }], entry: a.entry_addr })
}

/// The `PT_LOAD` segments of an ELF32 i386 executable, checked against the
/// file (also the loader of a bzImage's decompressed kernel).
pub(super) fn plan_elf(image: &[u8]) -> Result<Plan> {
    if image.get(..4) != Some(b"\x7fELF") {
        return Err(MultibootError::NotElf);
    }
    if image.len() < ELF_HEADER_SIZE {
        return Err(MultibootError::UnsupportedElf("ELF header truncated"));
    }
    if image[4] != 1 {
        return Err(MultibootError::UnsupportedElf("not ELFCLASS32"));
    }
    if image[5] != 1 {
        return Err(MultibootError::UnsupportedElf("not little-endian"));
    }
    let truncated = MultibootError::UnsupportedElf("ELF header truncated");
    if le_u16(image, 16).ok_or(truncated)? != ET_EXEC {
        return Err(MultibootError::UnsupportedElf("not an executable (ET_EXEC)"));
    }
    if le_u16(image, 18).ok_or(MultibootError::UnsupportedElf("ELF header truncated"))? != EM_386 {
        return Err(MultibootError::UnsupportedElf("machine is not i386 (EM_386)"));
    }
    let field32 = |o| le_u32(image, o).ok_or(MultibootError::UnsupportedElf("ELF header truncated"));
    let field16 = |o| le_u16(image, o).ok_or(MultibootError::UnsupportedElf("ELF header truncated"));
    let e_entry = field32(24)?;
    let phoff = u64::from(field32(28)?);
    let phentsize = field16(42)?;
    let phnum = field16(44)?;
    if usize::from(phentsize) < ELF_PHDR_SIZE && phnum != 0 {
        return Err(MultibootError::UnsupportedElf("program header entries are smaller than 32 bytes"));
    }
    let file_len = image.len() as u64;
    let table_end = u64::from(phentsize)
        .checked_mul(u64::from(phnum))
        .and_then(|n| n.checked_add(phoff))
        .ok_or(MultibootError::Overflow("the program header table"))?;
    if table_end > file_len {
        return Err(MultibootError::ElfTruncated { phoff, phnum, file_len });
    }
    let mut segments = Vec::new();
    let mut entry = e_entry;
    for index in 0..usize::from(phnum) {
        let ph = phoff as usize + index * usize::from(phentsize);
        let f = |i: usize| le_u32(image, ph + 4 * i).map(u64::from).ok_or(MultibootError::Overflow("a program header"));
        let (p_type, offset, vaddr, paddr, filesz, memsz, flags) = (f(0)?, f(1)?, f(2)?, f(3)?, f(4)?, f(5)?, f(6)?);
        if p_type != u64::from(PT_LOAD) || memsz == 0 {
            continue;
        }
        if offset.checked_add(filesz).is_none_or(|end| end > file_len) {
            return Err(MultibootError::SegmentTruncated { index, offset, filesz, file_len });
        }
        if filesz > memsz {
            return Err(MultibootError::SegmentSize { index, filesz, memsz });
        }
        // The ELF entry is virtual; with paging off the kernel starts at the
        // physical copy of it (as QEMU translates it).
        let e = u64::from(e_entry);
        if flags & u64::from(PF_X) != 0 && vaddr != paddr && (vaddr..vaddr + filesz).contains(&e) {
            entry = u32::try_from(e - vaddr + paddr).map_err(|_| MultibootError::Overflow("the entry point"))?;
        }
        segments.push(Segment { offset, filesz, paddr, memsz });
    }
    if segments.is_empty() {
        return Err(MultibootError::NoLoadableSegment);
    }
    Ok(Plan { segments, entry })
}

/// Checks that `[start, start+len)` is RAM a kernel or module may occupy.
fn check_placement(what: &'static str, start: u64, len: u64, ram: u64) -> Result<()> {
    let end = start.checked_add(len).ok_or(MultibootError::Overflow(what))?;
    if end > ram {
        return Err(MultibootError::DoesNotFit { what, start, end, ram });
    }
    if overlaps_legacy_hole(start, len) {
        return Err(MultibootError::LegacyHole { what, start, end });
    }
    Ok(())
}

/// How far the boot area `[BOOT_GDT_ADDR, MULTIBOOT_INFO_END)` must move up
/// to clear every range in `used` (the kernel and the modules): 0 when it
/// does not collide, else the first page-aligned place below the EBDA, else
/// just above the highest used byte.
fn boot_area_shift(used: &[(u64, u64)], ram: u64) -> Result<u32> {
    let base = u64::from(BOOT_GDT_ADDR);
    let size = u64::from(MULTIBOOT_INFO_END - BOOT_GDT_ADDR);
    let free = |at: u64| at + size <= ram && !used.iter().any(|&(s, l)| overlaps(at, size, s, l));
    let page = u64::from(PAGE_SIZE);
    let low = (0..).map(|i| base + i * page).take_while(|&at| at + size <= u64::from(EBDA_START));
    let top = used.iter().map(|&(s, l)| s + l).max().unwrap_or(0);
    let high = align_up(top, page).map(|a| a + (base % page)).filter(|&a| !overlaps_legacy_hole(a, size));
    let at = low.chain(high).find(|&at| free(at)).ok_or(MultibootError::NoRoomForBootData)?;
    u32::try_from(at - base).map_err(|_| MultibootError::NoRoomForBootData)
}

/// A bump allocator over the information area (at `MULTIBOOT_INFO_ADDR +
/// shift`).
struct InfoArea {
    bytes: Vec<u8>,
    shift: u32,
}

impl InfoArea {
    fn alloc(&mut self, data: &[u8], align: usize) -> Result<u32> {
        let at = self.bytes.len().next_multiple_of(align);
        self.bytes.resize(at, 0);
        self.bytes.extend_from_slice(data);
        let limit = (MULTIBOOT_INFO_END - MULTIBOOT_INFO_ADDR) as usize;
        if self.bytes.len() > limit {
            return Err(MultibootError::InfoAreaFull(self.bytes.len() as u64));
        }
        Ok(MULTIBOOT_INFO_ADDR + self.shift + at as u32)
    }

    fn string(&mut self, what: &'static str, s: &str) -> Result<u32> {
        if s.as_bytes().contains(&0) {
            return Err(MultibootError::NulInString(what));
        }
        let mut z = s.as_bytes().to_vec();
        z.push(0);
        self.alloc(&z, 1)
    }

    fn put_u32(&mut self, field: u32, v: u32) {
        let f = field as usize;
        self.bytes[f..f + 4].copy_from_slice(&v.to_le_bytes());
    }
}

/// Loads a multiboot kernel with its command line and modules into `mem`.
pub fn load(mem: &GuestMemory, image: &[u8], cmdline: &str, modules: &[Module<'_>]) -> Result<BootState> {
    let header = find_header(image)?;
    let plan = match &header.address {
        Some(a) => plan_aout(image, &header, a)?,
        None => plan_elf(image)?,
    };
    let ram = mem.size();

    // Kernel segments.
    let mut state = BootState::flat(plan.entry);
    let mut kernel_end = 0u64;
    let mut entry_loaded = false;
    for s in &plan.segments {
        check_placement("kernel segment", s.paddr, s.memsz, ram)?;
        let bytes = &image[s.offset as usize..(s.offset + s.filesz) as usize];
        mem.write(s.paddr, bytes)?;
        mem.slice_mut(s.paddr + s.filesz, s.memsz - s.filesz)?.fill(0);
        state.add_range(RangeKind::Kernel, s.paddr, s.filesz);
        if s.memsz > s.filesz {
            state.add_range(RangeKind::Bss, s.paddr + s.filesz, s.memsz - s.filesz);
        }
        kernel_end = kernel_end.max(s.paddr + s.memsz);
        entry_loaded |= (s.paddr..s.paddr + s.memsz).contains(&u64::from(plan.entry));
    }
    if !entry_loaded {
        return Err(MultibootError::EntryNotLoaded(plan.entry));
    }

    // Modules, page-aligned above the kernel and above 1 MiB.
    let page = u64::from(PAGE_SIZE);
    let mut next =
        align_up(kernel_end.max(u64::from(HIGH_MEMORY_START)), page).ok_or(MultibootError::Overflow("modules"))?;
    let mut mod_ranges = Vec::with_capacity(modules.len());
    for (i, m) in modules.iter().enumerate() {
        let len = m.data.len() as u64;
        check_placement("module", next, len, ram)?;
        if next + len > u64::from(u32::MAX) {
            return Err(MultibootError::DoesNotFit { what: "module", start: next, end: next + len, ram });
        }
        mem.write(next, m.data)?;
        state.add_range(RangeKind::Module(i), next, len);
        mod_ranges.push((next as u32, (next + len) as u32));
        next = align_up(next + len, page).ok_or(MultibootError::Overflow("modules"))?;
    }

    // The boot area, clear of everything loaded.
    let mut used: Vec<(u64, u64)> = plan.segments.iter().map(|s| (s.paddr, s.memsz)).collect();
    used.extend(mod_ranges.iter().map(|&(s, e)| (u64::from(s), u64::from(e - s))));
    let shift = boot_area_shift(&used, ram)?;
    let info_addr = MULTIBOOT_INFO_ADDR + shift;

    // Information structure, then memory map, module list and strings.
    let mut info = InfoArea { bytes: vec![0; INFO_SIZE as usize], shift };
    let map = e820_map(ram);
    let mut mmap = Vec::with_capacity(map.len() * MMAP_ENTRY_SIZE as usize);
    for e in &map {
        mmap.extend_from_slice(&(MMAP_ENTRY_SIZE - 4).to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.size.to_le_bytes());
        mmap.extend_from_slice(&e.typ.to_le_bytes());
    }
    let mmap_addr = info.alloc(&mmap, 8)?;
    let cmdline_addr = info.string("the kernel command line", cmdline)?;
    let name_addr = info.string("the boot loader name", LOADER_NAME)?;
    let mut mods = Vec::with_capacity(modules.len() * MODULE_ENTRY_SIZE as usize);
    for (m, (start, end)) in modules.iter().zip(&mod_ranges) {
        let string = info.string("a module command line", m.cmdline)?;
        for v in [*start, *end, string, 0] {
            mods.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mods_addr = info.alloc(&mods, 4)?;

    let mem_lower = (map[0].size / 1024) as u32;
    let mem_upper = (ram.saturating_sub(u64::from(HIGH_MEMORY_START)) / 1024).min(u64::from(u32::MAX)) as u32;
    let mut flags = info_flags::MEMORY | info_flags::CMDLINE | info_flags::MMAP | info_flags::BOOT_LOADER_NAME;
    if !modules.is_empty() {
        flags |= info_flags::MODS;
    }
    info.put_u32(info_offset::FLAGS, flags);
    info.put_u32(info_offset::MEM_LOWER, mem_lower);
    info.put_u32(info_offset::MEM_UPPER, mem_upper);
    info.put_u32(info_offset::CMDLINE, cmdline_addr);
    info.put_u32(info_offset::MODS_COUNT, modules.len() as u32);
    info.put_u32(info_offset::MODS_ADDR, mods_addr);
    info.put_u32(info_offset::MMAP_LENGTH, mmap.len() as u32);
    info.put_u32(info_offset::MMAP_ADDR, mmap_addr);
    info.put_u32(info_offset::BOOT_LOADER_NAME, name_addr);
    mem.write(u64::from(info_addr), &info.bytes)?;
    state.add_range(RangeKind::MultibootInfo, u64::from(info_addr), info.bytes.len() as u64);
    write_boot_gdt_at(mem, &mut state, shift)?;

    state.eax = BOOTLOADER_MAGIC;
    state.ebx = info_addr;
    Ok(state)
}

/// Builds a minimal multiboot ELF32 executable that loads `code` at
/// `load_addr` (physical = virtual), followed by `bss` zero bytes, and starts
/// at `entry`. Popek uses it to export its built-in guests so that QEMU
/// (`qemu-system-i386 -kernel`) can run the same bytes.
///
/// Layout: ELF header (52 bytes), one `PT_LOAD` program header (32), the
/// multiboot header (12, flags = MEMORY_INFO), then `code`.
///
/// # Panics
///
/// If `code.len() + bss` does not fit in 32 bits.
pub fn build_elf(code: &[u8], load_addr: u32, entry: u32, bss: u32) -> Vec<u8> {
    let code_off = (ELF_HEADER_SIZE + ELF_PHDR_SIZE + 12) as u32;
    let filesz = u32::try_from(code.len()).expect("code larger than 4 GiB");
    let memsz = filesz.checked_add(bss).expect("code + bss larger than 4 GiB");
    let mut f = Vec::with_capacity(code_off as usize + code.len());
    // ELF header.
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[1, 1, 1, 0]); // ELFCLASS32, ELFDATA2LSB, EV_CURRENT, SYSV ABI
    f.extend_from_slice(&[0; 8]);
    let u16s = |f: &mut Vec<u8>, vs: &[u16]| vs.iter().for_each(|v| f.extend_from_slice(&v.to_le_bytes()));
    let u32s = |f: &mut Vec<u8>, vs: &[u32]| vs.iter().for_each(|v| f.extend_from_slice(&v.to_le_bytes()));
    u16s(&mut f, &[ET_EXEC, EM_386]);
    // e_version, e_entry, e_phoff, e_shoff, e_flags
    u32s(&mut f, &[1, entry, ELF_HEADER_SIZE as u32, 0, 0]);
    // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
    u16s(&mut f, &[ELF_HEADER_SIZE as u16, ELF_PHDR_SIZE as u16, 1, 40, 0, 0]);
    // The one PT_LOAD: RWX, no alignment constraint.
    u32s(&mut f, &[PT_LOAD, code_off, load_addr, load_addr, filesz, memsz, 7, 1]);
    // Multiboot header.
    let flags = header_flags::MEMORY_INFO;
    u32s(&mut f, &[HEADER_MAGIC, flags, 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)]);
    debug_assert_eq!(f.len(), code_off as usize);
    f.extend_from_slice(code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{BOOT_STACK_TOP, MULTIBOOT_INFO_ADDR};

    /// A guest that reports whether EAX held the multiboot magic through
    /// isa-debug-exit (QEMU exits with status 99 on success, 101 otherwise):
    ///
    /// ```text
    ///   cmp eax, 0x2BADB002 ; 3D 02 B0 AD 2B
    ///   jne fail            ; 75 04
    ///   mov al, 0x31        ; B0 31
    ///   jmp out             ; EB 02
    /// fail:
    ///   mov al, 0x32        ; B0 32
    /// out:
    ///   out 0xf4, al        ; E6 F4
    /// halt:
    ///   hlt                 ; F4
    ///   jmp halt            ; EB FD
    /// ```
    const CODE: &[u8] =
        &[0x3D, 0x02, 0xB0, 0xAD, 0x2B, 0x75, 0x04, 0xB0, 0x31, 0xEB, 0x02, 0xB0, 0x32, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD];
    const LOAD: u32 = 0x0010_0000;
    const RAM: u64 = 16 << 20;

    fn good() -> Vec<u8> {
        build_elf(CODE, LOAD, LOAD, 0x2000)
    }

    fn mem() -> GuestMemory {
        GuestMemory::new(RAM).unwrap()
    }

    fn cstr(m: &GuestMemory, addr: u32) -> String {
        let b = m.slice(u64::from(addr), 256).unwrap();
        String::from_utf8(b[..b.iter().position(|&c| c == 0).unwrap()].to_vec()).unwrap()
    }

    /// Rewrites a u32 of the multiboot header and fixes the checksum.
    fn patch_header(img: &mut [u8], field: usize, v: u32) {
        let h = find_header(img).unwrap().offset;
        img[h + 4 * field..h + 4 * field + 4].copy_from_slice(&v.to_le_bytes());
        let flags = le_u32(img, h + 4).unwrap();
        let sum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags);
        img[h + 8..h + 12].copy_from_slice(&sum.to_le_bytes());
    }

    fn put(img: &mut [u8], off: usize, v: u32) {
        img[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn build_elf_loads_back() {
        let m = mem();
        // Dirty the bss first: the loader must zero it.
        m.slice_mut(u64::from(LOAD), 0x3000).unwrap().fill(0xCC);
        let s = load(&m, &good(), "console=ttyS0 quiet", &[]).unwrap();
        assert_eq!(s.eip, LOAD);
        assert_eq!(s.eax, BOOTLOADER_MAGIC);
        assert_eq!(s.ebx, MULTIBOOT_INFO_ADDR);
        assert_eq!(s.esp, BOOT_STACK_TOP);
        assert_eq!(s.eflags, 2);
        assert_eq!(m.slice(u64::from(LOAD), CODE.len() as u64).unwrap(), CODE);
        assert!(m.slice(u64::from(LOAD) + CODE.len() as u64, 0x2000).unwrap().iter().all(|&b| b == 0));
        assert_eq!(m.slice(u64::from(LOAD) + CODE.len() as u64 + 0x2000, 1).unwrap(), &[0xCC]);
        let k = s.range(&RangeKind::Kernel).unwrap();
        assert_eq!((k.start, k.len), (u64::from(LOAD), CODE.len() as u64));
        assert_eq!(s.range(&RangeKind::Bss).unwrap().len, 0x2000);
    }

    #[test]
    fn info_structure_fields() {
        let m = mem();
        let (a, b) = (vec![0xAB; 5000], vec![0xCD; 10]);
        let mods = [Module { data: &a, cmdline: "initrd one" }, Module { data: &b, cmdline: "two" }];
        load(&m, &good(), "hello world", &mods).unwrap();
        let info = u64::from(MULTIBOOT_INFO_ADDR);
        let rd = |off: u32| m.read_u32(info + u64::from(off)).unwrap();
        assert_eq!(rd(0), info_flags::MEMORY | info_flags::CMDLINE | info_flags::MODS | info_flags::MMAP | (1 << 9));
        assert_eq!(rd(info_offset::MEM_LOWER), 639);
        assert_eq!(rd(info_offset::MEM_UPPER), ((RAM - 0x10_0000) / 1024) as u32);
        assert_eq!(cstr(&m, rd(info_offset::CMDLINE)), "hello world");
        assert_eq!(cstr(&m, rd(info_offset::BOOT_LOADER_NAME)), "popek");
        // Memory map: four entries, RAM below 0x9fc00 and from 1 MiB.
        assert_eq!(rd(info_offset::MMAP_LENGTH), 4 * 24);
        let mmap = u64::from(rd(info_offset::MMAP_ADDR));
        let entry = |i: u64| {
            let mut e = [0u8; 24];
            m.read(mmap + 24 * i, &mut e).unwrap();
            (
                le_u32(&e, 0).unwrap(),
                super::super::le_u64(&e, 4).unwrap(),
                super::super::le_u64(&e, 12).unwrap(),
                le_u32(&e, 20).unwrap(),
            )
        };
        assert_eq!(entry(0), (20, 0, 0x9FC00, 1));
        assert_eq!(entry(1), (20, 0x9FC00, 0x400, 2));
        assert_eq!(entry(2), (20, 0xF0000, 0x10000, 2));
        assert_eq!(entry(3), (20, 0x10_0000, RAM - 0x10_0000, 1));
        // Modules: page-aligned above the kernel's bss, with their strings.
        assert_eq!(rd(info_offset::MODS_COUNT), 2);
        let mods_addr = u64::from(rd(info_offset::MODS_ADDR));
        let md = |i: u64, f: u64| m.read_u32(mods_addr + 16 * i + 4 * f).unwrap();
        assert_eq!(md(0, 0), 0x10_3000);
        assert_eq!(md(0, 1), 0x10_3000 + 5000);
        assert_eq!(md(1, 0), 0x10_5000);
        assert_eq!(md(1, 1), 0x10_500A);
        assert_eq!(cstr(&m, md(0, 2)), "initrd one");
        assert_eq!(cstr(&m, md(1, 2)), "two");
        assert_eq!(m.slice(0x10_3000, 5000).unwrap(), &a[..]);
        assert_eq!(m.slice(0x10_5000, 10).unwrap(), &b[..]);
    }

    #[test]
    fn header_search() {
        let img = good();
        let h = find_header(&img).unwrap();
        assert_eq!(h.offset, 84);
        assert_eq!(h.flags, header_flags::MEMORY_INFO);
        assert!(h.address.is_none());
        // Beyond 8 KiB the header is not looked for.
        let mut far = vec![0u8; 8192];
        far.extend_from_slice(&img[84..96]);
        assert!(matches!(find_header(&far), Err(MultibootError::NoHeader)));
        // Misaligned: not found.
        let mut mis = vec![0u8; 2];
        mis.extend_from_slice(&img[84..96]);
        assert!(matches!(find_header(&mis), Err(MultibootError::NoHeader)));
        // Cut off after the flags.
        assert!(matches!(find_header(&img[..92]), Err(MultibootError::HeaderTruncated { offset: 84 })));
        assert!(is_multiboot(&img) && !is_multiboot(&img[..80]));
    }

    #[test]
    fn header_errors() {
        let mut bad = good();
        bad[84] ^= 1;
        assert!(matches!(find_header(&bad), Err(MultibootError::NoHeader)));
        let mut bad = good();
        bad[92] ^= 1;
        assert!(matches!(find_header(&bad), Err(MultibootError::BadChecksum { offset: 84, .. })));
        let mut bad = good();
        patch_header(&mut bad, 1, header_flags::MEMORY_INFO | 1 << 3);
        assert!(matches!(load(&mem(), &bad, "", &[]), Err(MultibootError::UnsupportedFlags(8))));
        // Optional bits (17-31) and the video hint are accepted.
        let mut ok = good();
        patch_header(&mut ok, 1, header_flags::VIDEO_MODE | 1 << 20);
        load(&mem(), &ok, "", &[]).unwrap();
    }

    #[test]
    fn elf_errors() {
        let e = |img: &[u8]| load(&mem(), img, "", &[]).unwrap_err();
        let mut bad = good();
        bad[0] = 0;
        assert!(matches!(e(&bad), MultibootError::NotElf));
        let mut bad = good();
        bad[4] = 2;
        assert!(matches!(e(&bad), MultibootError::UnsupportedElf("not ELFCLASS32")));
        let mut bad = good();
        bad[18] = 62;
        assert!(matches!(e(&bad), MultibootError::UnsupportedElf(_)));
        let mut bad = good();
        bad[16] = 3; // ET_DYN
        assert!(matches!(e(&bad), MultibootError::UnsupportedElf(_)));
        let mut bad = good();
        put(&mut bad, 28, 0xFFFF_FF00); // e_phoff
        assert!(matches!(e(&bad), MultibootError::ElfTruncated { .. }));
        // Segment data cut off.
        let img = good();
        assert!(matches!(e(&img[..img.len() - 1]), MultibootError::SegmentTruncated { index: 0, .. }));
        let mut bad = good();
        put(&mut bad, 52 + 4, 0xFFFF_FFF0); // p_offset: overflow
        assert!(matches!(e(&bad), MultibootError::SegmentTruncated { .. }));
        let mut bad = good();
        put(&mut bad, 52 + 20, 4); // p_memsz < p_filesz
        assert!(matches!(e(&bad), MultibootError::SegmentSize { filesz: 18, memsz: 4, .. }));
        let mut bad = good();
        put(&mut bad, 52, 6); // PT_PHDR: nothing to load
        assert!(matches!(e(&bad), MultibootError::NoLoadableSegment));
        let mut bad = good();
        put(&mut bad, 24, 0x50_0000); // e_entry outside
        assert!(matches!(e(&bad), MultibootError::EntryNotLoaded(0x50_0000)));
    }

    #[test]
    fn a_kernel_linked_at_0x8000_moves_the_boot_area_out_of_its_way() {
        let m = mem();
        // 0x8000..0xa84c as in the issue's real-mode test kernel (with bss).
        let st = load(&m, &build_elf(CODE, 0x8000, 0x8000, 0x2800), "low", &[]).unwrap();
        let kernel = (0x8000u64, 0x2800 + CODE.len() as u64);
        for r in &st.ranges {
            if !matches!(r.kind, RangeKind::Kernel | RangeKind::Bss) {
                assert!(!overlaps(r.start, r.len, kernel.0, kernel.1), "{r:?} is on the kernel");
            }
        }
        assert_eq!(st.ebx, st.range(&RangeKind::MultibootInfo).unwrap().start as u32);
        assert_eq!(st.gdtr.base as u64, st.range(&RangeKind::Gdt).unwrap().start);
        let stack = st.range(&RangeKind::Stack).unwrap();
        assert_eq!(u64::from(st.esp), stack.end());
        assert!(st.ebx >= 0xA84C || st.ebx + INFO_SIZE <= 0x8000);
        assert_eq!(cstr(&m, m.read_u32(u64::from(st.ebx + info_offset::CMDLINE)).unwrap()), "low");
        let gdt = m.slice(u64::from(st.gdtr.base), 32).unwrap();
        assert_eq!(&gdt[16..24], &BOOT_GDT_CODE.to_le_bytes());
        // The kernel's own bytes are intact.
        assert_eq!(m.slice(0x8000, CODE.len() as u64).unwrap(), CODE);
        // A kernel clear of the usual area keeps it.
        let usual = load(&mem(), &good(), "", &[]).unwrap();
        assert_eq!(usual.ebx, MULTIBOOT_INFO_ADDR);
        assert_eq!(usual.esp, crate::layout::BOOT_STACK_TOP);
    }

    const BOOT_GDT_CODE: u64 = super::super::BOOT_GDT[2];

    #[test]
    fn placement_errors() {
        let e = |img: &[u8]| load(&mem(), img, "", &[]).unwrap_err();
        assert!(matches!(e(&build_elf(CODE, 0xFFFF_0000, 0xFFFF_0000, 0)), MultibootError::DoesNotFit { .. }));
        assert!(matches!(e(&build_elf(CODE, 0xFFFF_FFF0, 0xFFFF_FFF0, 0x100)), MultibootError::DoesNotFit { .. }));
        assert!(matches!(e(&build_elf(CODE, 0xB8000, 0xB8000, 0)), MultibootError::LegacyHole { .. }));
        assert!(matches!(e(&build_elf(CODE, 0x9F000, 0x9F000, 0x1000)), MultibootError::LegacyHole { .. }));
        // A kernel on every low page and up to the top of RAM leaves no room.
        let huge = build_elf(CODE, 0x1000, 0x1000, (0x9F000 - 0x1000) - CODE.len() as u32);
        let mut m2 = vec![0u8; (RAM - 0x10_0000) as usize];
        m2.truncate((RAM - 0x10_0000 - 0x100) as usize);
        let mods = [Module { data: &m2, cmdline: "" }];
        assert!(matches!(load(&mem(), &huge, "", &mods), Err(MultibootError::NoRoomForBootData)));
        // Below 1 MiB but clear of the boot data: fine.
        load(&mem(), &build_elf(CODE, 0x30000, 0x30000, 0), "", &[]).unwrap();
        let big = vec![0u8; RAM as usize];
        let m = [Module { data: &big, cmdline: "" }];
        assert!(matches!(load(&mem(), &good(), "", &m), Err(MultibootError::DoesNotFit { what: "module", .. })));
        assert!(matches!(load(&mem(), &good(), "a\0b", &[]), Err(MultibootError::NulInString(_))));
        let long = "x".repeat(0x20000);
        assert!(matches!(load(&mem(), &good(), &long, &[]), Err(MultibootError::InfoAreaFull(_))));
    }

    #[test]
    fn elf_entry_is_translated_to_physical() {
        let mut img = good();
        // Link at 0xC0100000, load at 0x100000 (a higher-half kernel).
        put(&mut img, 52 + 8, 0xC010_0000);
        put(&mut img, 24, 0xC010_0004);
        assert_eq!(load(&mem(), &img, "", &[]).unwrap().eip, 0x10_0004);
    }

    /// An a.out-kludge kernel: a flat binary whose header gives the addresses.
    fn aout(load_end_delta: i64, bss: u32) -> Vec<u8> {
        let load = 0x20_0000u32;
        let mut img = vec![0x90u8; 64];
        let hdr_off = 16u32;
        let flags = header_flags::AOUT_KLUDGE | header_flags::PAGE_ALIGN;
        let load_end = (i64::from(load) + 64 + load_end_delta) as u32;
        let fields = [
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags),
            load + hdr_off,
            load,
            load_end,
            if bss == 0 { 0 } else { load_end + bss },
            load + 48,
        ];
        for (i, v) in fields.iter().enumerate() {
            put(&mut img, hdr_off as usize + 4 * i, *v);
        }
        img
    }

    #[test]
    fn aout_kludge() {
        let m = mem();
        let img = aout(0, 0x1000);
        let s = load(&m, &img, "", &[]).unwrap();
        assert_eq!(s.eip, 0x20_0030);
        assert_eq!(m.slice(0x20_0000, 64).unwrap(), &img[..]);
        assert_eq!(s.range(&RangeKind::Bss).unwrap().len, 0x1000);
        // load_end_addr 0: up to the end of the file; bss_end 0: no bss.
        let mut whole = aout(0, 0);
        put(&mut whole, 16 + 20, 0);
        let s = load(&m, &whole, "", &[]).unwrap();
        assert_eq!(s.range(&RangeKind::Kernel).unwrap().len, 64);
        assert!(s.range(&RangeKind::Bss).is_none());

        let e = |img: &[u8]| load(&mem(), img, "", &[]).unwrap_err();
        assert!(matches!(e(&aout(8, 0)), MultibootError::LoadTruncated { .. }));
        assert!(matches!(e(&aout(-80, 0)), MultibootError::BadAddressFields(_)));
        let mut bad = aout(0, 0x1000);
        patch_header(&mut bad, 6, 0x20_0010); // bss_end below load_end
        assert!(matches!(e(&bad), MultibootError::BadAddressFields(_)));
        let mut bad = aout(0, 0);
        patch_header(&mut bad, 4, 0x20_0100); // load_addr above header_addr
        assert!(matches!(e(&bad), MultibootError::BadAddressFields(_)));
        let mut bad = aout(0, 0);
        patch_header(&mut bad, 4, 0x1F_0000); // starts before the file
        assert!(matches!(e(&bad), MultibootError::BadAddressFields(_)));
        let mut bad = aout(0, 0);
        patch_header(&mut bad, 7, 0x10_0000); // entry outside
        assert!(matches!(e(&bad), MultibootError::EntryNotLoaded(_)));
        assert!(matches!(find_header(&aout(0, 0)[..40]), Err(MultibootError::HeaderTruncated { .. })));
    }

    /// Runs the exported ELF under QEMU when it is installed: the same bytes
    /// must see the multiboot magic there too.
    #[test]
    fn exported_elf_runs_under_qemu_if_installed() {
        let Some(qemu) = std::env::var_os("PATH")
            .and_then(|p| std::env::split_paths(&p).map(|d| d.join("qemu-system-i386")).find(|q| q.is_file()))
        else {
            println!("skipped: qemu-system-i386 is not installed");
            return;
        };
        let path = std::env::temp_dir().join(format!("popek-mb-{}.elf", std::process::id()));
        std::fs::write(&path, good()).unwrap();
        let status = std::process::Command::new(qemu)
            .args(["-display", "none", "-no-reboot", "-m", "16", "-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
            .arg("-kernel")
            .arg(&path)
            .status()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(status.code(), Some(99), "guest did not see EAX = 0x2BADB002");
    }
}
