//! Linux x86 boot protocol, 32-bit entry (Documentation/arch/x86/boot.rst).
//!
//! The real-mode setup code is not run: the loader fills the "zero page"
//! (`boot_params`) itself, copies the protected-mode kernel to `code32_start`
//! (1 MiB for every bzImage), puts the command line at [`CMDLINE_ADDR`] and
//! the initrd as high as the header allows, and enters at `code32_start` with
//! ESI = [`ZERO_PAGE_ADDR`] and EBP = EDI = EBX = 0, CS = 0x10, DS = ES = SS =
//! 0x18 from the boot GDT. Boot protocol 2.06 or newer is required.

use thiserror::Error;

use super::{align_up, e820_map, le_u16, le_u32, le_u64, overlaps, overlaps_legacy_hole, write_boot_gdt};
use super::{BootState, RangeKind};
use crate::layout::{BOOT_GDT_ADDR, CMDLINE_ADDR, CMDLINE_MAX_SIZE, PAGE_SIZE, VMM_AREA_SIZE, ZERO_PAGE_ADDR};
use crate::memory::{GuestMemory, MemoryError};

/// Offsets in the image and in `boot_params` (the same for the setup header).
pub mod offset {
    pub const ALT_MEM_K: usize = 0x1E0;
    pub const E820_ENTRIES: usize = 0x1E8;
    pub const SETUP_HEADER: usize = 0x1F1;
    pub const SETUP_SECTS: usize = 0x1F1;
    pub const SYSSIZE: usize = 0x1F4;
    pub const BOOT_FLAG: usize = 0x1FE;
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21C;
    pub const HEAP_END_PTR: usize = 0x224;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22C;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
    /// End of the room for the setup header in `boot_params`.
    pub const SETUP_HEADER_LIMIT: usize = 0x290;
    pub const E820_TABLE: usize = 0x2D0;
}

/// `boot_flag` value.
pub const BOOT_FLAG: u16 = 0xAA55;
/// `header` value: "HdrS".
pub const HDRS: u32 = 0x5372_6448;
/// Oldest boot protocol accepted: 2.06 (Linux 2.6.22) has `cmdline_size`.
pub const MIN_VERSION: u16 = 0x0206;
/// `type_of_loader` for a loader without an assigned id.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xFF;
/// `loadflags` bits.
pub const LOADED_HIGH: u8 = 1 << 0;
pub const CAN_USE_HEAP: u8 = 1 << 7;
/// `heap_end_ptr`: end of the setup heap, relative to the real-mode code
/// start (the usual 0xfe00 of a loader that puts the setup code in a full
/// 64 KiB segment; unused by a 32-bit entry, set for completeness).
pub const HEAP_END: u16 = 0xFE00;
/// Size of `boot_params`.
pub const ZERO_PAGE_SIZE: u64 = 4096;
/// Room for e820 entries in `boot_params`.
pub const E820_MAX_ENTRIES: usize = 128;

#[derive(Debug, Error)]
pub enum LinuxError {
    #[error("Linux image truncated: {0}")]
    Truncated(&'static str),
    #[error("not a Linux kernel image: boot_flag is {0:#06x}, not 0xaa55")]
    NoBootFlag(u16),
    #[error("not a bzImage: no \"HdrS\" setup header (boot protocol older than 2.00)")]
    NoSetupHeader,
    #[error("Linux boot protocol {}.{:02} is too old: Popek needs 2.06 or newer (Linux 2.6.22+)", .0 >> 8, .0 & 0xff)]
    ProtocolTooOld(u16),
    #[error("zImage kernels (not loaded high) are not supported: use a bzImage")]
    NotLoadedHigh,
    #[error("kernel_alignment {0:#x} is not a power of two")]
    BadAlignment(u32),
    #[error("the kernel needs guest RAM up to {end:#x} ({what}) but the guest has {ram:#x} bytes")]
    KernelDoesNotFit { what: &'static str, end: u64, ram: u64 },
    #[error("the kernel at {start:#x}..{end:#x} overlaps the legacy hole (0xa0000..0x100000)")]
    LegacyHole { start: u64, end: u64 },
    #[error("the kernel at {start:#x}..{end:#x} overlaps the boot data below {limit:#x}")]
    OverlapsBootData { start: u64, end: u64, limit: u64 },
    #[error("kernel command line is {len} bytes, the kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    NulInCmdline,
    #[error("initrd of {size:#x} bytes does not fit between the kernel's end {low:#x} and {high:#x} (RAM end or initrd_addr_max)")]
    InitrdDoesNotFit { size: u64, low: u64, high: u64 },
    #[error("arithmetic overflow computing {0}")]
    Overflow(&'static str),
    #[error("the decompressed kernel cannot be loaded: {0}")]
    Vmlinux(String),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

type Result<T> = std::result::Result<T, LinuxError>;

/// The setup header fields the loader uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupHeader {
    /// Number of 512-byte setup sectors after the boot sector (0 read as 4).
    pub setup_sects: u8,
    /// Size of the protected-mode kernel in 16-byte paragraphs.
    pub syssize: u32,
    /// Boot protocol version, e.g. 0x020f.
    pub version: u16,
    pub loadflags: u8,
    pub code32_start: u32,
    pub kernel_alignment: u32,
    pub relocatable: bool,
    /// Longest command line, terminating NUL excluded.
    pub cmdline_size: u32,
    /// Highest address the initrd may occupy.
    pub initrd_addr_max: u32,
    /// Where the kernel runs (`LOAD_PHYSICAL_ADDR`); 2.10+, else `code32_start`.
    pub pref_address: u64,
    /// Memory the kernel needs from its runtime start while it boots; 2.10+.
    pub init_size: Option<u32>,
    /// End (exclusive) of the setup header in the image: 0x202 + jump offset.
    pub header_end: usize,
    /// Offset of the protected-mode kernel in the image.
    pub kernel_offset: usize,
    /// Bytes of protected-mode kernel in the image.
    pub kernel_size: u64,
}

impl SetupHeader {
    /// Where the kernel runs while it decompresses and boots: a relocatable
    /// kernel moves itself to the load address rounded up to
    /// `kernel_alignment`, but never below `pref_address`
    /// (arch/x86/boot/compressed/head_32.S).
    pub fn runtime_start(&self, load_addr: u64) -> Option<u64> {
        if self.relocatable && self.version >= 0x0205 {
            Some(align_up(load_addr, u64::from(self.kernel_alignment))?.max(self.pref_address))
        } else {
            Some(self.pref_address)
        }
    }
}

/// Parses and checks the setup header of a bzImage.
pub fn parse(image: &[u8]) -> Result<SetupHeader> {
    let t = LinuxError::Truncated;
    if image.len() < offset::VERSION + 2 {
        return Err(t("shorter than the setup header"));
    }
    let boot_flag = le_u16(image, offset::BOOT_FLAG).ok_or(t("boot flag"))?;
    if boot_flag != BOOT_FLAG {
        return Err(LinuxError::NoBootFlag(boot_flag));
    }
    if le_u32(image, offset::HEADER) != Some(HDRS) {
        return Err(LinuxError::NoSetupHeader);
    }
    let version = le_u16(image, offset::VERSION).ok_or(t("version"))?;
    if version < MIN_VERSION {
        return Err(LinuxError::ProtocolTooOld(version));
    }
    let header_end = offset::HEADER + usize::from(image[offset::JUMP + 1]);
    if header_end < offset::CMDLINE_SIZE + 4 {
        return Err(t("setup header shorter than protocol 2.06's"));
    }
    if image.len() < header_end {
        return Err(t("setup header cut off"));
    }
    let u8_at = |o: usize| image[o];
    let u32_at = |o| le_u32(image, o).ok_or(t("setup header"));
    let setup_sects = match u8_at(offset::SETUP_SECTS) {
        0 => 4,
        n => n,
    };
    let loadflags = u8_at(offset::LOADFLAGS);
    if loadflags & LOADED_HIGH == 0 {
        return Err(LinuxError::NotLoadedHigh);
    }
    let code32_start = u32_at(offset::CODE32_START)?;
    let relocatable = u8_at(offset::RELOCATABLE_KERNEL) != 0;
    let kernel_alignment = u32_at(offset::KERNEL_ALIGNMENT)?;
    if relocatable && !kernel_alignment.is_power_of_two() {
        return Err(LinuxError::BadAlignment(kernel_alignment));
    }
    let (pref_address, init_size) = if version >= 0x020A && header_end >= offset::INIT_SIZE + 4 {
        (le_u64(image, offset::PREF_ADDRESS).ok_or(t("setup header"))?, Some(u32_at(offset::INIT_SIZE)?))
    } else {
        (u64::from(code32_start), None)
    };
    let kernel_offset = (usize::from(setup_sects) + 1) * 512;
    let kernel_size = (image.len() as u64)
        .checked_sub(kernel_offset as u64)
        .filter(|&n| n > 0)
        .ok_or(t("no protected-mode kernel after the setup sectors"))?;
    let syssize = u32_at(offset::SYSSIZE)?;
    if u64::from(syssize) * 16 > kernel_size {
        return Err(t("protected-mode kernel shorter than syssize"));
    }
    Ok(SetupHeader {
        setup_sects,
        syssize,
        version,
        loadflags,
        code32_start,
        kernel_alignment,
        relocatable,
        cmdline_size: u32_at(offset::CMDLINE_SIZE)?,
        initrd_addr_max: u32_at(offset::INITRD_ADDR_MAX)?,
        pref_address,
        init_size,
        header_end,
        kernel_offset,
        kernel_size,
    })
}

/// Whether `image` looks like a bzImage Popek can load.
pub fn is_bzimage(image: &[u8]) -> bool {
    parse(image).is_ok()
}

/// A loaded Linux kernel.
#[derive(Clone, Debug)]
pub struct LinuxBoot {
    pub state: BootState,
    pub header: SetupHeader,
    /// The command line as given to the kernel.
    pub cmdline: String,
    /// Whether the loader appended `reservetop=` (the CLI logs it).
    pub reservetop_added: bool,
}

/// The `reservetop=` argument that keeps the kernel's fixmap out of the VMM area.
pub fn reservetop_arg() -> String {
    format!("reservetop={VMM_AREA_SIZE:#x}")
}

/// Adds [`reservetop_arg`] to `cmdline` unless it already has a
/// `reservetop=`; inserted before a `--` (what follows goes to init).
/// Returns the new command line and whether it was added.
pub fn with_reservetop(cmdline: &str) -> (String, bool) {
    let words: Vec<&str> = cmdline.split_ascii_whitespace().collect();
    let kernel_words = words.iter().position(|w| *w == "--").unwrap_or(words.len());
    if words[..kernel_words].iter().any(|w| w.starts_with("reservetop=")) {
        return (cmdline.to_string(), false);
    }
    let arg = reservetop_arg();
    let mut out: Vec<&str> = words[..kernel_words].to_vec();
    out.push(&arg);
    out.extend_from_slice(&words[kernel_words..]);
    (out.join(" "), true)
}

/// Checks that the kernel's `[start, start+len)` is RAM clear of the
/// legacy hole and of the boot data below [`CMDLINE_ADDR`].
fn check_kernel_range(what: &'static str, start: u64, len: u64, ram: u64) -> Result<u64> {
    let end = start.checked_add(len).ok_or(LinuxError::Overflow("the kernel's end"))?;
    if overlaps_legacy_hole(start, len) {
        return Err(LinuxError::LegacyHole { start, end });
    }
    let boot_data_end = u64::from(CMDLINE_ADDR + CMDLINE_MAX_SIZE);
    let boot_data = u64::from(BOOT_GDT_ADDR);
    if overlaps(start, len, boot_data, boot_data_end - boot_data) {
        return Err(LinuxError::OverlapsBootData { start, end, limit: boot_data_end });
    }
    if end > ram {
        return Err(LinuxError::KernelDoesNotFit { what, end, ram });
    }
    Ok(end)
}

/// The memory the kernel claims from `runtime` while it boots
/// (`init_size`), reserved in `state`; returns its end (or `top`).
fn reserve_work_area(state: &mut BootState, header: &SetupHeader, runtime: u64, top: u64, ram: u64) -> Result<u64> {
    let Some(init_size) = header.init_size else { return Ok(top) };
    let end = runtime.checked_add(u64::from(init_size)).ok_or(LinuxError::Overflow("the kernel's init_size"))?;
    if end > ram {
        return Err(LinuxError::KernelDoesNotFit { what: "runtime address + init_size", end, ram });
    }
    state.add_range(RangeKind::KernelWorkArea, runtime, u64::from(init_size));
    Ok(top.max(end))
}

/// The protected-mode kernel (decompressor and payload) at `code32_start`.
fn place_compressed(mem: &GuestMemory, image: &[u8], header: &SetupHeader) -> Result<(BootState, u64)> {
    let ram = mem.size();
    let mut state = BootState::flat(header.code32_start);
    let load = u64::from(header.code32_start);
    let load_end = check_kernel_range("the compressed kernel", load, header.kernel_size, ram)?;
    let runtime = header.runtime_start(load).ok_or(LinuxError::Overflow("the kernel's runtime address"))?;
    let top = reserve_work_area(&mut state, header, runtime, load_end, ram)?;
    mem.write(load, &image[header.kernel_offset..])?;
    state.ranges.insert(0, super::GuestRange { kind: RangeKind::Kernel, start: load, len: header.kernel_size });
    Ok((state, top))
}

/// The decompressed kernel's `PT_LOAD` segments at their physical
/// addresses (the link address: no KASLR), entered at its ELF entry.
fn place_vmlinux(mem: &GuestMemory, vmlinux: &[u8], header: &SetupHeader) -> Result<(BootState, u64)> {
    let ram = mem.size();
    let plan = super::multiboot::plan_elf(vmlinux).map_err(|e| LinuxError::Vmlinux(e.to_string()))?;
    let mut state = BootState::flat(plan.entry);
    let mut top = 0u64;
    let mut entry_loaded = false;
    for seg in &plan.segments {
        let end = check_kernel_range("the decompressed kernel", seg.paddr, seg.memsz, ram)?;
        mem.write(seg.paddr, &vmlinux[seg.offset as usize..(seg.offset + seg.filesz) as usize])?;
        mem.slice_mut(seg.paddr + seg.filesz, seg.memsz - seg.filesz)?.fill(0);
        state.add_range(RangeKind::Kernel, seg.paddr, seg.filesz);
        if seg.memsz > seg.filesz {
            state.add_range(RangeKind::Bss, seg.paddr + seg.filesz, seg.memsz - seg.filesz);
        }
        top = top.max(end);
        entry_loaded |= (seg.paddr..end).contains(&u64::from(plan.entry));
    }
    if !entry_loaded {
        return Err(LinuxError::Vmlinux(format!("entry point {:#x} is not inside a loaded segment", plan.entry)));
    }
    let runtime = plan.segments.iter().map(|s| s.paddr).min().unwrap_or(header.pref_address);
    let top = reserve_work_area(&mut state, header, runtime, top, ram)?;
    Ok((state, top))
}

/// Loads a bzImage with `cmdline` and an optional initrd into `mem`; the
/// guest runs the image's own decompressor.
pub fn load(mem: &GuestMemory, image: &[u8], cmdline: &str, initrd: Option<&[u8]>) -> Result<LinuxBoot> {
    load_with(mem, image, None, cmdline, initrd)
}

/// [`load`], but with the kernel proper already decompressed (`vmlinux`,
/// the ELF inside the bzImage: [`super::vmlinux`]): its segments go where
/// they are linked to run, and the guest enters them with the same
/// `boot_params` the decompressor would have passed on.
pub fn load_decompressed(
    mem: &GuestMemory,
    image: &[u8],
    vmlinux: &[u8],
    cmdline: &str,
    initrd: Option<&[u8]>,
) -> Result<LinuxBoot> {
    load_with(mem, image, Some(vmlinux), cmdline, initrd)
}

fn load_with(
    mem: &GuestMemory,
    image: &[u8],
    vmlinux: Option<&[u8]>,
    cmdline: &str,
    initrd: Option<&[u8]>,
) -> Result<LinuxBoot> {
    let header = parse(image)?;
    let ram = mem.size();
    let (mut state, kernel_top) = match vmlinux {
        None => place_compressed(mem, image, &header)?,
        Some(v) => place_vmlinux(mem, v, &header)?,
    };
    // Command line.
    let (cmdline, reservetop_added) = with_reservetop(cmdline);
    if cmdline.as_bytes().contains(&0) {
        return Err(LinuxError::NulInCmdline);
    }
    let max = (header.cmdline_size as usize).min(CMDLINE_MAX_SIZE as usize - 1);
    if cmdline.len() > max {
        return Err(LinuxError::CmdlineTooLong { len: cmdline.len(), max });
    }
    let mut z = cmdline.as_bytes().to_vec();
    z.push(0);
    mem.write(u64::from(CMDLINE_ADDR), &z)?;
    state.add_range(RangeKind::CommandLine, u64::from(CMDLINE_ADDR), z.len() as u64);

    // Initrd: as high as allowed, page-aligned, above everything of the kernel.
    let initrd_at = match initrd {
        Some(data) => {
            let size = data.len() as u64;
            let high = ram.min(u64::from(header.initrd_addr_max) + 1);
            let start = high
                .checked_sub(size)
                .map(|s| s & !(u64::from(PAGE_SIZE) - 1))
                .filter(|&s| s >= kernel_top)
                .ok_or(LinuxError::InitrdDoesNotFit { size, low: kernel_top, high })?;
            mem.write(start, data)?;
            state.add_range(RangeKind::Initrd, start, size);
            Some((start as u32, size as u32))
        }
        None => None,
    };

    // boot_params.
    let mut zp = vec![0u8; ZERO_PAGE_SIZE as usize];
    let hdr_end = header.header_end.min(offset::SETUP_HEADER_LIMIT);
    zp[offset::SETUP_HEADER..hdr_end].copy_from_slice(&image[offset::SETUP_HEADER..hdr_end]);
    let put8 = |zp: &mut Vec<u8>, o: usize, v: u8| zp[o] = v;
    let put16 = |zp: &mut Vec<u8>, o: usize, v: u16| zp[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |zp: &mut Vec<u8>, o: usize, v: u32| zp[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put8(&mut zp, offset::TYPE_OF_LOADER, LOADER_TYPE_UNDEFINED);
    put8(&mut zp, offset::LOADFLAGS, header.loadflags | CAN_USE_HEAP);
    put16(&mut zp, offset::HEAP_END_PTR, HEAP_END);
    put32(&mut zp, offset::CMD_LINE_PTR, CMDLINE_ADDR);
    if let Some((start, size)) = initrd_at {
        put32(&mut zp, offset::RAMDISK_IMAGE, start);
        put32(&mut zp, offset::RAMDISK_SIZE, size);
    }
    let alt_mem_k = (ram.saturating_sub(1 << 20) / 1024).min(u64::from(u32::MAX)) as u32;
    put32(&mut zp, offset::ALT_MEM_K, alt_mem_k);
    let map = e820_map(ram);
    debug_assert!(map.len() <= E820_MAX_ENTRIES);
    put8(&mut zp, offset::E820_ENTRIES, map.len() as u8);
    for (i, e) in map.iter().enumerate() {
        let o = offset::E820_TABLE + 20 * i;
        zp[o..o + 8].copy_from_slice(&e.addr.to_le_bytes());
        zp[o + 8..o + 16].copy_from_slice(&e.size.to_le_bytes());
        put32(&mut zp, o + 16, e.typ);
    }
    mem.write(u64::from(ZERO_PAGE_ADDR), &zp)?;
    state.add_range(RangeKind::ZeroPage, u64::from(ZERO_PAGE_ADDR), ZERO_PAGE_SIZE);
    write_boot_gdt(mem, &mut state)?;

    state.esi = ZERO_PAGE_ADDR;
    Ok(LinuxBoot { state, header, cmdline, reservetop_added })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const KERNEL: &str = "/work/shared/guests/linux-686/vmlinuz";
    const MIB: u64 = 1 << 20;

    fn kernel() -> Option<Vec<u8>> {
        match std::fs::read(KERNEL) {
            Ok(k) => Some(k),
            Err(e) => {
                println!("skipped: the real kernel {KERNEL} is not readable here ({e})");
                None
            }
        }
    }

    /// A minimal synthetic bzImage: boot sector + 1 setup sector + `pm` bytes.
    fn synthetic(version: u16, pm: usize) -> Vec<u8> {
        let mut img = vec![0u8; 1024 + pm];
        img[offset::SETUP_SECTS] = 1;
        img[offset::SYSSIZE..offset::SYSSIZE + 4].copy_from_slice(&((pm / 16) as u32).to_le_bytes());
        img[offset::BOOT_FLAG..offset::BOOT_FLAG + 2].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        img[offset::JUMP] = 0xEB;
        img[offset::JUMP + 1] = 0x6A;
        img[offset::HEADER..offset::HEADER + 4].copy_from_slice(b"HdrS");
        img[offset::VERSION..offset::VERSION + 2].copy_from_slice(&version.to_le_bytes());
        img[offset::LOADFLAGS] = LOADED_HIGH;
        img[offset::CODE32_START..offset::CODE32_START + 4].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[offset::INITRD_ADDR_MAX..offset::INITRD_ADDR_MAX + 4].copy_from_slice(&0x37FF_FFFFu32.to_le_bytes());
        img[offset::CMDLINE_SIZE..offset::CMDLINE_SIZE + 4].copy_from_slice(&255u32.to_le_bytes());
        img[offset::PREF_ADDRESS..offset::PREF_ADDRESS + 8].copy_from_slice(&0x10_0000u64.to_le_bytes());
        img[offset::INIT_SIZE..offset::INIT_SIZE + 4].copy_from_slice(&0x40_0000u32.to_le_bytes());
        for (i, b) in img[1024..].iter_mut().enumerate() {
            *b = i as u8;
        }
        img
    }

    fn zp_u32(m: &GuestMemory, o: usize) -> u32 {
        m.read_u32(u64::from(ZERO_PAGE_ADDR) + o as u64).unwrap()
    }

    fn zp_u8(m: &GuestMemory, o: usize) -> u8 {
        m.slice(u64::from(ZERO_PAGE_ADDR) + o as u64, 1).unwrap()[0]
    }

    #[test]
    fn parses_the_real_kernel() {
        let Some(k) = kernel() else { return };
        let h = parse(&k).unwrap();
        assert_eq!(h.version, 0x020F);
        assert_eq!(h.code32_start, 0x10_0000);
        assert!(h.relocatable);
        assert_eq!(h.kernel_offset, (usize::from(h.setup_sects) + 1) * 512);
        assert_eq!(h.header_end, 0x26C);
        assert!(h.init_size.is_some_and(|s| s > 0));
        assert!(u64::from(h.syssize) * 16 <= h.kernel_size);
        assert!(is_bzimage(&k));
    }

    #[test]
    fn the_decompressed_kernel_runs_at_its_link_address() {
        let Some(k) = kernel() else { return };
        let h = parse(&k).unwrap();
        let v = super::super::vmlinux::decompress(&k, &h).unwrap();
        let m = GuestMemory::new(64 * MIB).unwrap();
        let initrd = vec![0x5Au8; 300_000];
        let b = load_decompressed(&m, &k, &v, "console=ttyS0", Some(&initrd)).unwrap();
        let s = &b.state;
        // startup_32 of the kernel proper (the ELF entry), boot_params in ESI.
        assert_eq!((s.eip, s.esi), (0x100_0000, ZERO_PAGE_ADDR));
        // Its first PT_LOAD (file offset 0x1000) at 16 MiB; bss zeroed.
        assert_eq!(m.slice(0x100_0000, 4096).unwrap(), &v[0x1000..0x2000]);
        let bss = s.range(&RangeKind::Bss).unwrap();
        assert!(m.slice(bss.start, bss.len).unwrap().iter().all(|&b| b == 0));
        // The initrd stays above what the kernel claims while booting.
        let rd = u64::from(zp_u32(&m, offset::RAMDISK_IMAGE));
        assert!(rd >= s.range(&RangeKind::KernelWorkArea).unwrap().end() && rd >= bss.end());
        // Too little RAM for its segments, and a kernel that would sit in
        // the legacy hole, are errors.
        let small = GuestMemory::new(24 * MIB).unwrap();
        assert!(matches!(load_decompressed(&small, &k, &v, "", None), Err(LinuxError::KernelDoesNotFit { .. })));
        let low = super::super::multiboot::build_elf(&[0x90; 64], 0xA_0000, 0xA_0000, 0);
        assert!(matches!(load_decompressed(&m, &k, &low, "", None), Err(LinuxError::LegacyHole { .. })));
        let outside = super::super::multiboot::build_elf(&[0x90; 64], 0x20_0000, 0x30_0000, 0);
        assert!(matches!(load_decompressed(&m, &k, &outside, "", None), Err(LinuxError::Vmlinux(_))));
    }

    #[test]
    fn loads_the_real_kernel_into_64_mib() {
        let Some(k) = kernel() else { return };
        let m = GuestMemory::new(64 * MIB).unwrap();
        let initrd = vec![0x5Au8; 300_000];
        let b = load(&m, &k, "console=ttyS0 nokaslr", Some(&initrd)).unwrap();
        let h = &b.header;
        let s = &b.state;
        assert_eq!(s.eip, 0x10_0000);
        assert_eq!(s.esi, ZERO_PAGE_ADDR);
        assert_eq!((s.ebp, s.edi, s.ebx), (0, 0, 0));
        assert_eq!((s.code_selector, s.data_selector), (0x10, 0x18));
        assert!(b.reservetop_added);
        assert_eq!(b.cmdline, "console=ttyS0 nokaslr reservetop=0x800000");
        // The protected-mode kernel, byte for byte, at 1 MiB.
        assert_eq!(m.slice(0x10_0000, h.kernel_size).unwrap(), &k[h.kernel_offset..]);
        // boot_params: the header copied, then the loader's fields.
        let zp = m.slice(u64::from(ZERO_PAGE_ADDR), 4096).unwrap().to_vec();
        assert_eq!(&zp[0x202..0x206], b"HdrS");
        assert_eq!(le_u16(&zp, 0x206), Some(0x020F));
        assert_eq!(le_u16(&zp, 0x1FE), Some(0xAA55));
        assert_eq!(zp_u8(&m, offset::TYPE_OF_LOADER), 0xFF);
        assert_eq!(zp_u8(&m, offset::LOADFLAGS), LOADED_HIGH | CAN_USE_HEAP);
        assert_eq!(le_u16(&zp, offset::HEAP_END_PTR), Some(0xFE00));
        assert_eq!(zp_u32(&m, offset::CMD_LINE_PTR), CMDLINE_ADDR);
        assert_eq!(zp[0x26C..0x290], [0; 0x24]);
        let cmd = m.slice(u64::from(CMDLINE_ADDR), b.cmdline.len() as u64 + 1).unwrap();
        assert_eq!(&cmd[..b.cmdline.len()], b.cmdline.as_bytes());
        assert_eq!(cmd[b.cmdline.len()], 0);
        // The initrd: page-aligned, at the top of RAM, above the kernel's work area.
        let rd = zp_u32(&m, offset::RAMDISK_IMAGE);
        assert_eq!(zp_u32(&m, offset::RAMDISK_SIZE), 300_000);
        assert_eq!(rd % 4096, 0);
        assert!(u64::from(rd) + 300_000 <= 64 * MIB && u64::from(rd) + 300_000 + 4096 > 64 * MIB);
        let work = s.range(&RangeKind::KernelWorkArea).unwrap();
        assert_eq!(work.start, 0x100_0000); // Debian: pref_address 16 MiB
        assert!(u64::from(rd) >= work.end());
        assert_eq!(m.slice(u64::from(rd), 300_000).unwrap(), &initrd[..]);
        // e820.
        assert_eq!(zp[offset::E820_ENTRIES], 4);
        let e = |i: usize| {
            let o = offset::E820_TABLE + 20 * i;
            (le_u64(&zp, o).unwrap(), le_u64(&zp, o + 8).unwrap(), le_u32(&zp, o + 16).unwrap())
        };
        assert_eq!(e(0), (0, 0x9FC00, 1));
        assert_eq!(e(1), (0x9FC00, 0x400, 2));
        assert_eq!(e(2), (0xF0000, 0x10000, 2));
        assert_eq!(e(3), (MIB, 63 * MIB, 1));
        assert_eq!(zp_u32(&m, offset::ALT_MEM_K), 63 * 1024);
    }

    #[test]
    fn real_kernel_errors() {
        let Some(k) = kernel() else { return };
        // Too little RAM: Debian's kernel runs at 16 MiB and needs init_size there.
        let m = GuestMemory::new(24 * MIB).unwrap();
        assert!(matches!(
            load(&m, &k, "", None),
            Err(LinuxError::KernelDoesNotFit { what: "runtime address + init_size", .. })
        ));
        let m = GuestMemory::new(4 * MIB).unwrap();
        assert!(matches!(
            load(&m, &k, "", None),
            Err(LinuxError::KernelDoesNotFit { what: "the compressed kernel", .. })
        ));
        let mut bad = k.clone();
        bad[0x1FE] = 0;
        assert!(matches!(parse(&bad), Err(LinuxError::NoBootFlag(0xAA00))));
        let mut bad = k.clone();
        bad[0x202] = b'X';
        assert!(matches!(parse(&bad), Err(LinuxError::NoSetupHeader)));
        let mut bad = k.clone();
        bad[0x206..0x208].copy_from_slice(&0x0205u16.to_le_bytes());
        let err = parse(&bad).unwrap_err();
        assert!(matches!(err, LinuxError::ProtocolTooOld(0x0205)));
        assert!(err.to_string().contains("2.05 is too old"), "{err}");
        assert!(matches!(parse(&k[..k.len() - 4096]), Err(LinuxError::Truncated(_))));
        assert!(matches!(parse(&k[..0x220]), Err(LinuxError::Truncated("setup header cut off"))));
        assert!(matches!(parse(&k[..0x100]), Err(LinuxError::Truncated(_))));
        let m = GuestMemory::new(64 * MIB).unwrap();
        let huge = vec![0u8; 48 * MIB as usize];
        assert!(matches!(load(&m, &k, "", Some(&huge)), Err(LinuxError::InitrdDoesNotFit { .. })));
        let long = "x".repeat(3000);
        assert!(matches!(load(&m, &k, &long, None), Err(LinuxError::CmdlineTooLong { max: 2047, .. })));
    }

    #[test]
    fn synthetic_image_errors() {
        let m = GuestMemory::new(16 * MIB).unwrap();
        let good = synthetic(0x020F, 4096);
        let b = load(&m, &good, "", None).unwrap();
        assert_eq!(b.cmdline, "reservetop=0x800000");
        assert_eq!(m.slice(0x10_0000, 4096).unwrap(), &good[1024..]);
        let mut bad = good.clone();
        bad[offset::LOADFLAGS] = 0;
        assert!(matches!(parse(&bad), Err(LinuxError::NotLoadedHigh)));
        let mut bad = good.clone();
        bad[offset::RELOCATABLE_KERNEL] = 1;
        bad[offset::KERNEL_ALIGNMENT] = 3;
        assert!(matches!(parse(&bad), Err(LinuxError::BadAlignment(3))));
        let mut bad = good.clone();
        bad[offset::CODE32_START + 2] = 0x0A; // 0xa0000
        assert!(matches!(load(&m, &bad, "", None), Err(LinuxError::LegacyHole { .. })));
        let mut bad = good.clone();
        bad[offset::CODE32_START + 2] = 0x01; // 0x10000
        assert!(matches!(load(&m, &bad, "", None), Err(LinuxError::OverlapsBootData { .. })));
        let mut bad = good.clone();
        bad[offset::INIT_SIZE + 3] = 0xFF;
        assert!(matches!(load(&m, &bad, "", None), Err(LinuxError::KernelDoesNotFit { .. })));
        let mut bad = good.clone();
        bad[offset::PREF_ADDRESS..offset::PREF_ADDRESS + 8].fill(0xFF); // pref_address + init_size overflows
        bad[offset::RELOCATABLE_KERNEL] = 0;
        assert!(matches!(load(&m, &bad, "", None), Err(LinuxError::Overflow(_))));
        let mut bad = good.clone();
        bad[offset::JUMP + 1] = 0x20; // header ends before cmdline_size
        assert!(matches!(parse(&bad), Err(LinuxError::Truncated(_))));
        assert!(matches!(parse(&good[..1024]), Err(LinuxError::Truncated(_))));
        assert!(matches!(load(&m, &good, "a\0b", None), Err(LinuxError::NulInCmdline)));
        // Initrd below initrd_addr_max: here 0x38000000 is above RAM, so RAM bounds it.
        let rd = [1u8; 10];
        let b = load(&m, &good, "", Some(&rd)).unwrap();
        assert_eq!(b.state.range(&RangeKind::Initrd).unwrap().start, 16 * MIB - 4096);
        let mut low_max = good.clone();
        low_max[offset::INITRD_ADDR_MAX..offset::INITRD_ADDR_MAX + 4].copy_from_slice(&0x7F_FFFFu32.to_le_bytes());
        let b = load(&m, &low_max, "", Some(&rd)).unwrap();
        assert_eq!(b.state.range(&RangeKind::Initrd).unwrap().start, 8 * MIB - 4096);
        low_max[offset::INITRD_ADDR_MAX + 2] = 0x2F; // 0x2fffff: below the kernel's work area
        assert!(matches!(load(&m, &low_max, "", Some(&rd)), Err(LinuxError::InitrdDoesNotFit { .. })));
    }

    #[test]
    fn old_protocol_without_init_size() {
        let m = GuestMemory::new(16 * MIB).unwrap();
        let img = synthetic(0x0206, 4096);
        let b = load(&m, &img, "", None).unwrap();
        assert_eq!(b.header.init_size, None);
        assert!(b.state.range(&RangeKind::KernelWorkArea).is_none());
    }

    #[test]
    fn reservetop_is_added_once() {
        assert_eq!(with_reservetop("console=ttyS0"), ("console=ttyS0 reservetop=0x800000".into(), true));
        assert_eq!(with_reservetop("reservetop=16M quiet"), ("reservetop=16M quiet".into(), false));
        assert_eq!(with_reservetop("quiet -- init-arg"), ("quiet reservetop=0x800000 -- init-arg".into(), true));
        // After `--` it is init's argument, not the kernel's.
        assert_eq!(with_reservetop("a -- reservetop=1").0, "a reservetop=0x800000 -- reservetop=1");
        assert_eq!(with_reservetop("").0, "reservetop=0x800000");
    }

    #[test]
    fn skips_loudly_without_the_real_kernel() {
        // The tests above return early (with a printed reason) when the
        // shared kernel is missing; make that visible in one place.
        if !Path::new(KERNEL).exists() {
            println!("skipped: {KERNEL} absent: real-kernel tests did not run");
        }
    }
}
