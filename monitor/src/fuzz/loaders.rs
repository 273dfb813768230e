//! Fuzz targets for the image loaders: bzImage, multiboot (ELF and a.out
//! kludge) and the initramfs writer and reader.
//!
//! Each starts from a valid image built here, mutates its header fields and
//! its length, and loads it into made-up guest memory. Besides "no panic",
//! a successful load must keep what it promises: every range inside RAM,
//! the kernel's bytes where the ranges say, the entry point inside the
//! kernel, the boot data clear of the kernel and modules.

use arbitrary::Unstructured;

use super::mutate::{self, Field};
use super::Target;
use crate::loader::initramfs::{self, Archive, EntryKind};
use crate::loader::linux::{self, offset as lo};
use crate::loader::multiboot::{self, header_flags, Module, HEADER_MAGIC};
use crate::loader::{overlaps, BootState, RangeKind};
use crate::memory::GuestMemory;

/// Runs a structured body; running out of fuzz bytes is a normal end.
fn structured(
    input: &[u8],
    body: impl FnOnce(&mut Unstructured<'_>) -> arbitrary::Result<Result<(), String>>,
) -> Result<(), String> {
    let mut u = Unstructured::new(input);
    body(&mut u).unwrap_or(Ok(()))
}

/// Two RAM sizes: a small one (placement errors) and a roomy one.
struct Memories {
    small: GuestMemory,
    large: GuestMemory,
}

impl Memories {
    fn new() -> Result<Memories, String> {
        let m = |size| GuestMemory::new(size).map_err(|e| e.to_string());
        Ok(Memories { small: m(2 << 20)?, large: m(16 << 20)? })
    }

    fn pick(&self, u: &mut Unstructured<'_>) -> arbitrary::Result<&GuestMemory> {
        Ok(if u.ratio(1u8, 4)? { &self.small } else { &self.large })
    }
}

/// Every loader range inside RAM.
fn ranges_in_ram(s: &BootState, ram: u64) -> Result<(), String> {
    for r in &s.ranges {
        if r.start.checked_add(r.len).is_none_or(|e| e > ram) {
            return Err(format!("range {:?} at {:#x}+{:#x} is outside RAM ({ram:#x})", r.kind, r.start, r.len));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bzImage

/// The setup header fields the loader reads.
const BZ_FIELDS: &[Field] = &[
    Field::new(lo::SETUP_SECTS, 1),
    Field::new(lo::SYSSIZE, 4),
    Field::new(lo::BOOT_FLAG, 2),
    Field::new(lo::JUMP + 1, 1),
    Field::new(lo::HEADER, 4),
    Field::new(lo::VERSION, 2),
    Field::new(lo::LOADFLAGS, 1),
    Field::new(lo::CODE32_START, 4),
    Field::new(lo::KERNEL_ALIGNMENT, 4),
    Field::new(lo::RELOCATABLE_KERNEL, 1),
    Field::new(lo::CMDLINE_SIZE, 4),
    Field::new(lo::INITRD_ADDR_MAX, 4),
    Field::new(lo::PREF_ADDRESS, 8),
    Field::new(lo::INIT_SIZE, 4),
];

/// A valid bzImage: boot sector, `setup_sects` setup sectors, `pm` bytes
/// of protected-mode kernel, the header fields of protocol `version`.
fn synthetic_bzimage(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
    let version: u16 = *u.choose(&[0x0206u16, 0x0209, 0x020a, 0x020c, 0x020f])?;
    let setup_sects = u.int_in_range(1..=4u8)?;
    let pm = u.int_in_range(16..=4096usize)?;
    let off = (usize::from(setup_sects) + 1) * 512;
    let mut img = vec![0u8; off + pm];
    let put = |img: &mut Vec<u8>, o: usize, v: &[u8]| img[o..o + v.len()].copy_from_slice(v);
    img[lo::SETUP_SECTS] = setup_sects;
    put(&mut img, lo::SYSSIZE, &((pm / 16) as u32).to_le_bytes());
    put(&mut img, lo::BOOT_FLAG, &linux::BOOT_FLAG.to_le_bytes());
    img[lo::JUMP] = 0xEB;
    img[lo::JUMP + 1] = if version >= 0x020a { 0x6A } else { 0x3A };
    put(&mut img, lo::HEADER, b"HdrS");
    put(&mut img, lo::VERSION, &version.to_le_bytes());
    img[lo::LOADFLAGS] = linux::LOADED_HIGH;
    put(&mut img, lo::CODE32_START, &0x10_0000u32.to_le_bytes());
    put(&mut img, lo::INITRD_ADDR_MAX, &0x37FF_FFFFu32.to_le_bytes());
    put(&mut img, lo::CMDLINE_SIZE, &u.int_in_range(0..=2048u32)?.to_le_bytes());
    let relocatable = u.arbitrary::<bool>()?;
    img[lo::RELOCATABLE_KERNEL] = u8::from(relocatable);
    put(&mut img, lo::KERNEL_ALIGNMENT, &(1u32 << u.int_in_range(12..=22u8)?).to_le_bytes());
    if version >= 0x020a {
        put(&mut img, lo::PREF_ADDRESS, &0x10_0000u64.to_le_bytes());
        put(&mut img, lo::INIT_SIZE, &u.int_in_range(0..=0x80_0000u32)?.to_le_bytes());
    }
    for (i, b) in img[off..].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    Ok(img)
}

struct BzImage {
    mem: Memories,
}

pub fn bzimage() -> Result<Box<dyn Target>, String> {
    Ok(Box::new(BzImage { mem: Memories::new()? }))
}

impl Target for BzImage {
    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        structured(input, |u| {
            let img = if u.ratio(1u8, 10)? {
                u.bytes(u.len())?.to_vec()
            } else {
                let mut img = synthetic_bzimage(u)?;
                mutate::mutate(u, &mut img, BZ_FIELDS, 6)?;
                img
            };
            let _ = crate::loader::detect(&img);
            let h = match linux::parse(&img) {
                Ok(h) => h,
                Err(e) => {
                    super::note_err("parse:", &e);
                    return Ok(Ok(()));
                }
            };
            if h.kernel_offset as u64 + h.kernel_size != img.len() as u64 {
                return Ok(Err(format!(
                    "kernel offset {:#x} + size {:#x} is not the image",
                    h.kernel_offset, h.kernel_size
                )));
            }
            let mem = self.mem.pick(u)?;
            let cmdline = mutate::string(u, &["console=ttyS0", "reservetop=0x1000 -- init=/x", "--", "a\0b"], 3000)?;
            let initrd = match u.int_in_range(0..=3u8)? {
                0 => None,
                1 => Some(vec![0xA5; u.int_in_range(0..=4096usize)?]),
                2 => Some(vec![0x5A; u.int_in_range(0..=(mem.size() as usize + 4096))?]),
                _ => Some(u.bytes(u.len().min(256))?.to_vec()),
            };
            if u.ratio(1u8, 4)? {
                // The host decompression path: a payload of random bytes
                // behind an XZ or gzip magic, where the header says.
                return Ok(decompressed(u, mem, img, &h, &cmdline));
            }
            let boot = match linux::load(mem, &img, &cmdline, initrd.as_deref()) {
                Ok(b) => b,
                Err(e) => {
                    super::note_err("load:", &e);
                    return Ok(Ok(()));
                }
            };
            super::note(if boot.state.range(&RangeKind::Initrd).is_some() { "loaded with initrd" } else { "loaded" });
            Ok(check_linux(mem, &img, &boot))
        })
    }
}

/// The bzImage with a payload the host decompresses ([`vmlinux`]): any
/// outcome but a panic is fine; a kernel that decompressed must load or
/// be refused cleanly.
///
/// [`vmlinux`]: crate::loader::vmlinux
fn decompressed(
    u: &mut Unstructured<'_>,
    mem: &GuestMemory,
    mut img: Vec<u8>,
    h: &linux::SetupHeader,
    cmdline: &str,
) -> Result<(), String> {
    use crate::loader::vmlinux;
    let pm = img.len() - h.kernel_offset;
    let off = u.int_in_range(0..=pm).unwrap_or(0);
    let len = u.int_in_range(0..=pm - off + 8).unwrap_or(0);
    img[0x248..0x24C].copy_from_slice(&(off as u32).to_le_bytes());
    img[0x24C..0x250].copy_from_slice(&(len as u32).to_le_bytes());
    let magic: &[u8] =
        if u.arbitrary::<bool>().unwrap_or(false) { &[0xFD, b'7', b'z', b'X', b'Z', 0] } else { &[0x1F, 0x8B, 8, 0] };
    let at = h.kernel_offset + off;
    for (i, b) in magic.iter().enumerate() {
        if let Some(x) = img.get_mut(at + i) {
            *x = *b;
        }
    }
    if let Some(rest) = img.get_mut(at + magic.len()..) {
        for x in rest.iter_mut() {
            *x = u.arbitrary().unwrap_or(0);
        }
    }
    match vmlinux::decompress(&img, h) {
        Err(e) => super::note_err("decompress:", &e),
        Ok(v) => match linux::load_decompressed(mem, &img, &v, cmdline, None) {
            Ok(b) => {
                super::note("decompressed and loaded");
                ranges_in_ram(&b.state, mem.size())?;
            }
            Err(e) => super::note_err("load decompressed:", &e),
        },
    }
    Ok(())
}

fn check_linux(mem: &GuestMemory, img: &[u8], boot: &linux::LinuxBoot) -> Result<(), String> {
    ranges_in_ram(&boot.state, mem.size())?;
    let k = boot.state.range(&RangeKind::Kernel).ok_or("no kernel range")?;
    let loaded = mem.slice(k.start, k.len).map_err(|e| e.to_string())?;
    if loaded != &img[boot.header.kernel_offset..] {
        return Err("the kernel's bytes in guest memory are not the image's".into());
    }
    if let Some(i) = boot.state.range(&RangeKind::Initrd) {
        for r in boot.state.ranges.iter().filter(|r| matches!(r.kind, RangeKind::Kernel | RangeKind::KernelWorkArea)) {
            if overlaps(i.start, i.len, r.start, r.len) {
                return Err(format!("initrd {:#x}+{:#x} overlaps {:?}", i.start, i.len, r.kind));
            }
        }
    }
    if boot.cmdline.len() > boot.header.cmdline_size as usize {
        return Err("command line longer than cmdline_size".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// multiboot

/// One PT_LOAD segment of a synthetic ELF.
struct Seg {
    paddr: u32,
    vaddr: u32,
    data: Vec<u8>,
    bss: u32,
    flags: u32,
}

/// A multiboot ELF32 with `segs`, the multiboot header after the program
/// headers; returns the image and the header's offset.
fn build_elf(segs: &[Seg], entry: u32, mb_flags: u32) -> (Vec<u8>, usize) {
    let phoff = 52usize;
    let mb = phoff + 32 * segs.len();
    let mut data_off = mb + 12;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x01\x01\x01\0");
    f.extend_from_slice(&[0; 8]);
    let u16s = |f: &mut Vec<u8>, vs: &[u16]| vs.iter().for_each(|v| f.extend_from_slice(&v.to_le_bytes()));
    let u32s = |f: &mut Vec<u8>, vs: &[u32]| vs.iter().for_each(|v| f.extend_from_slice(&v.to_le_bytes()));
    u16s(&mut f, &[2, 3]);
    u32s(&mut f, &[1, entry, phoff as u32, 0, 0]);
    u16s(&mut f, &[52, 32, segs.len() as u16, 40, 0, 0]);
    for s in segs {
        let filesz = s.data.len() as u32;
        u32s(&mut f, &[1, data_off as u32, s.vaddr, s.paddr, filesz, filesz + s.bss, s.flags, 4]);
        data_off += s.data.len();
    }
    u32s(&mut f, &[HEADER_MAGIC, mb_flags, 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(mb_flags)]);
    for s in segs {
        f.extend_from_slice(&s.data);
    }
    (f, mb)
}

/// A multiboot image with the a.out kludge: header at `mb`, address fields.
fn build_aout(u: &mut Unstructured<'_>, load: u32) -> arbitrary::Result<(Vec<u8>, usize)> {
    let mb = 4 * u.int_in_range(0..=16usize)?;
    let len = mb + 32 + u.int_in_range(0..=2048usize)?;
    let mut f: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
    let flags = header_flags::AOUT_KLUDGE | header_flags::MEMORY_INFO;
    let bss = u.int_in_range(0..=0x4000u32)?;
    let load_end = if u.arbitrary::<bool>()? { 0 } else { load + len as u32 };
    let bss_end = if bss == 0 { 0 } else { load + len as u32 + bss };
    let entry = load + u.int_in_range(0..=len as u32)?;
    let fields = [
        HEADER_MAGIC,
        flags,
        0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags),
        load + mb as u32,
        load,
        load_end,
        bss_end,
        entry,
    ];
    for (i, v) in fields.iter().enumerate() {
        f[mb + 4 * i..mb + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    Ok((f, mb))
}

/// Fields of the ELF header, the first program headers and the multiboot header.
fn multiboot_fields(mb: usize) -> Vec<Field> {
    let mut v = vec![
        Field::new(4, 1),
        Field::new(5, 1),
        Field::new(16, 2),
        Field::new(18, 2),
        Field::new(24, 4),
        Field::new(28, 4),
        Field::new(42, 2),
        Field::new(44, 2),
    ];
    for ph in 0..3 {
        for i in 0..7 {
            v.push(Field::new(52 + 32 * ph + 4 * i, 4));
        }
    }
    for i in 1..8 {
        v.push(Field::new(mb + 4 * i, 4));
    }
    v
}

/// Makes the checksum of the first multiboot header right again, so that
/// mutations of the flags reach the loader.
fn fix_checksum(img: &mut [u8]) {
    let area = img.len().min(multiboot::SEARCH_LIMIT);
    let Some(o) = (0..area.saturating_sub(11)).step_by(4).find(|&o| img[o..o + 4] == HEADER_MAGIC.to_le_bytes()) else {
        return;
    };
    let flags = u32::from_le_bytes(img[o + 4..o + 8].try_into().unwrap_or([0; 4]));
    img[o + 8..o + 12].copy_from_slice(&0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags).to_le_bytes());
}

struct Multiboot {
    mem: Memories,
}

pub fn multiboot() -> Result<Box<dyn Target>, String> {
    Ok(Box::new(Multiboot { mem: Memories::new()? }))
}

impl Target for Multiboot {
    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        structured(input, |u| {
            let load: u32 = *u.choose(&[0x10_0000u32, 0x8000, 0x20_0000, 0x9F000, 0x1000, 0xFF_F000])?;
            let (mut img, mb) = match u.int_in_range(0..=9u8)? {
                0 => (u.bytes(u.len())?.to_vec(), 0),
                1 | 2 => build_aout(u, load)?,
                _ => {
                    let n = u.int_in_range(1..=3usize)?;
                    let mut segs = Vec::new();
                    let mut at = load;
                    for _ in 0..n {
                        let len = u.int_in_range(1..=1024usize)?;
                        let delta = if u.ratio(1u8, 4)? { 0xC000_0000 } else { 0 };
                        segs.push(Seg {
                            paddr: at,
                            vaddr: at.wrapping_add(delta),
                            data: vec![0x90; len],
                            bss: u.int_in_range(0..=0x2000u32)?,
                            flags: u.int_in_range(0..=7u32)?,
                        });
                        at = at.wrapping_add(len as u32 + 0x3000);
                    }
                    let entry = segs[0].vaddr.wrapping_add(u.int_in_range(0..=16u32)?);
                    let flags = *u.choose(&[header_flags::MEMORY_INFO, header_flags::PAGE_ALIGN | 2, 4])?;
                    build_elf(&segs, entry, flags)
                }
            };
            mutate::mutate(u, &mut img, &multiboot_fields(mb), 6)?;
            if u.ratio(3u8, 4)? {
                fix_checksum(&mut img);
            }
            let _ = multiboot::is_multiboot(&img);
            let mem = self.mem.pick(u)?;
            let cmdline = mutate::string(u, &["console=ttyS0", "", "a\0b"], 512)?;
            let n = u.int_in_range(0..=3usize)?;
            let mut datas = Vec::new();
            let mut lines = Vec::new();
            for _ in 0..n {
                let len = match u.int_in_range(0..=5u8)? {
                    0 => mem.size() as usize / 2,
                    1 => 0,
                    _ => u.int_in_range(1..=8192usize)?,
                };
                datas.push(vec![0x33u8; len]);
                lines.push(mutate::string(u, &["mod", "a\0"], 64)?);
            }
            let modules: Vec<Module<'_>> =
                datas.iter().zip(&lines).map(|(d, c)| Module { data: d, cmdline: c }).collect();
            let state = match multiboot::load(mem, &img, &cmdline, &modules) {
                Ok(s) => s,
                Err(e) => {
                    super::note_err("load:", &e);
                    return Ok(Ok(()));
                }
            };
            super::note(if state.eip != 0 && modules.is_empty() { "loaded" } else { "loaded with modules" });
            Ok(check_multiboot(mem, &state))
        })
    }
}

fn check_multiboot(mem: &GuestMemory, s: &BootState) -> Result<(), String> {
    ranges_in_ram(s, mem.size())?;
    let image = |k: &RangeKind| matches!(k, RangeKind::Kernel | RangeKind::Bss | RangeKind::Module(_));
    let boot = |k: &RangeKind| matches!(k, RangeKind::MultibootInfo | RangeKind::Gdt | RangeKind::Stack);
    if !s
        .ranges
        .iter()
        .filter(|r| matches!(r.kind, RangeKind::Kernel | RangeKind::Bss))
        .any(|r| (r.start..r.end()).contains(&u64::from(s.eip)))
    {
        return Err(format!("entry {:#x} is not inside the kernel", s.eip));
    }
    for a in s.ranges.iter().filter(|r| boot(&r.kind)) {
        for b in s.ranges.iter().filter(|r| image(&r.kind)) {
            if overlaps(a.start, a.len, b.start, b.len) {
                return Err(format!(
                    "{:?} {:#x}+{:#x} overlaps {:?} {:#x}+{:#x}",
                    a.kind, a.start, a.len, b.kind, b.start, b.len
                ));
            }
        }
    }
    for a in s.ranges.iter().filter(|r| matches!(r.kind, RangeKind::Module(_))) {
        for b in s.ranges.iter().filter(|r| image(&r.kind) && r.kind != a.kind) {
            if overlaps(a.start, a.len, b.start, b.len) {
                return Err(format!("{:?} overlaps {:?}", a.kind, b.kind));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// initramfs

const PATHS: &[&str] = &[
    "init",
    "bin",
    "bin/sh",
    "/bin/busybox",
    "dev/console",
    "./etc//passwd",
    "/",
    ".",
    "..",
    "a/../b",
    "TRAILER!!!",
    "dir/TRAILER!!!",
    "a\0b",
    "x/",
    "",
    "ünï/cödé",
];

struct Initramfs;

pub fn initramfs() -> Result<Box<dyn Target>, String> {
    Ok(Box::new(Initramfs))
}

/// The archive's entries as the reader must give them back.
fn expected(a: &Archive) -> Vec<(String, u32, Vec<u8>, u32, u32)> {
    a.entries()
        .map(|(name, e)| {
            let (ty, data, maj, min): (u32, Vec<u8>, u32, u32) = match &e.kind {
                EntryKind::Dir => (initramfs::mode::S_IFDIR, vec![], 0, 0),
                EntryKind::File(d) => (initramfs::mode::S_IFREG, d.clone(), 0, 0),
                EntryKind::Symlink(t) => (initramfs::mode::S_IFLNK, t.as_bytes().to_vec(), 0, 0),
                EntryKind::CharDev { major, minor } => (initramfs::mode::S_IFCHR, vec![], *major, *minor),
                EntryKind::BlockDev { major, minor } => (initramfs::mode::S_IFBLK, vec![], *major, *minor),
                EntryKind::Fifo => (initramfs::mode::S_IFIFO, vec![], 0, 0),
            };
            (name.to_string(), ty | e.perm, data, maj, min)
        })
        .collect()
}

/// Offsets of every newc header in a well-formed archive.
fn header_offsets(cpio: &[u8]) -> Vec<usize> {
    let mut v = Vec::new();
    let mut pos = 0;
    while pos + initramfs::NEWC_HEADER_SIZE <= cpio.len() && v.len() < 64 {
        v.push(pos);
        let hex = |i: usize| {
            std::str::from_utf8(&cpio[pos + 6 + 8 * i..pos + 14 + 8 * i])
                .ok()
                .and_then(|s| usize::from_str_radix(s, 16).ok())
                .unwrap_or(0)
        };
        let name_end = pos + initramfs::NEWC_HEADER_SIZE + hex(11);
        pos = (name_end.next_multiple_of(4) + hex(6)).next_multiple_of(4);
    }
    v
}

impl Target for Initramfs {
    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        structured(input, |u| {
            if u.ratio(1u8, 10)? {
                let raw = u.bytes(u.len())?;
                let _ = initramfs::read_cpio(raw);
                let _ = initramfs::read_gzip_cpio(raw);
                return Ok(Ok(()));
            }
            // Writer: an archive from random operations.
            let mut a = Archive::new();
            for _ in 0..u.int_in_range(0..=12u8)? {
                let path = if u.ratio(1u8, 2)? {
                    mutate::string(u, PATHS, 300)?
                } else {
                    format!("{}/{}", mutate::string(u, PATHS, 20)?, mutate::string(u, PATHS, 20)?)
                };
                let perm: u32 = u.arbitrary()?;
                let _ = match u.int_in_range(0..=5u8)? {
                    0 => a.add_dir(&path, perm),
                    1 => {
                        let n = u.int_in_range(0..=300usize)?;
                        a.add_file(&path, perm, u.bytes(n.min(u.len()))?.to_vec())
                    }
                    2 => a.add_symlink(&path, &mutate::string(u, PATHS, 100)?),
                    3 => a.add_char_dev(&path, perm, u.arbitrary()?, u.arbitrary()?),
                    4 => a.add(&path, perm, EntryKind::BlockDev { major: u.arbitrary()?, minor: u.arbitrary()? }),
                    _ => a.add(&path, perm, EntryKind::Fifo),
                };
            }
            let cpio = a.to_cpio();
            let want = expected(&a);
            super::note(if want.is_empty() { "archive: empty" } else { "archive: with entries" });
            let got: Vec<_> = match initramfs::read_cpio(&cpio) {
                Ok(g) => g.into_iter().map(|e| (e.name, e.mode, e.data, e.rdevmajor, e.rdevminor)).collect(),
                Err(e) => return Ok(Err(format!("the writer's archive does not read back: {e}"))),
            };
            if got != want {
                return Ok(Err(format!("archive read back differs: wrote {want:?}, read {got:?}")));
            }
            // The kernel reads names and link targets as C strings.
            for (name, _, data, ..) in &want {
                if name.contains('\0') || name == initramfs::TRAILER {
                    return Ok(Err(format!(
                        "the writer accepted the name {name:?}, which the kernel reads differently"
                    )));
                }
                if want.iter().any(|w| &w.0 == name && w.1 & initramfs::mode::S_IFMT == initramfs::mode::S_IFLNK)
                    && data.contains(&0)
                {
                    return Ok(Err(format!("the writer accepted a symlink target with a NUL for {name:?}")));
                }
            }
            if u.ratio(1u8, 8)? {
                let gz = a.to_gzip().map_err(|e| e.to_string());
                match gz.and_then(|g| initramfs::read_gzip_cpio(&g).map_err(|e| e.to_string())) {
                    Ok(g) if g.len() == want.len() => {}
                    Ok(_) => return Ok(Err("gzip round trip lost entries".into())),
                    Err(e) => return Ok(Err(format!("gzip round trip failed: {e}"))),
                }
            }
            // Reader: the archive damaged.
            let mut bad = cpio;
            let heads = header_offsets(&bad);
            for _ in 0..u.int_in_range(0..=4u8)? {
                let Ok(&h) = u.choose(&heads) else { break };
                let field = u.int_in_range(0..=12usize)?;
                let v: u32 = match u.int_in_range(0..=4u8)? {
                    0 => 0,
                    1 => u32::MAX,
                    2 => 0x7FFF_FFFF,
                    3 => u.int_in_range(0..=300u32)?,
                    _ => u.arbitrary()?,
                };
                let at = h + 6 + 8 * field;
                if let Some(dst) = bad.get_mut(at..at + 8) {
                    dst.copy_from_slice(format!("{v:08x}").as_bytes());
                }
            }
            mutate::mutate(u, &mut bad, &[], 4)?;
            match initramfs::read_cpio(&bad) {
                Ok(_) => super::note("damaged: read"),
                Err(e) => super::note(&format!("damaged: {e}")),
            }
            if u.ratio(1u8, 16)? {
                if let Ok(gz) = initramfs::gzip(&bad) {
                    let _ = initramfs::read_gzip_cpio(&gz);
                }
            }
            Ok(Ok(()))
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bzimage_smoke() {
        super::super::smoke("bzimage", 300);
    }

    #[test]
    fn multiboot_smoke() {
        super::super::smoke("multiboot", 300);
    }

    #[test]
    fn initramfs_smoke() {
        super::super::smoke("initramfs", 300);
    }
}
