//! The kernel inside a bzImage, decompressed by the host.
//!
//! A bzImage carries its real kernel (an ELF `vmlinux`) compressed, with a
//! small decompressor in front. Run in the guest, that decompressor is the
//! first 0.4-0.5 s of every boot of Debian's kernels (5.6 MB of XZ into
//! 16 MB, plus KASLR's copy and relocation), about a third of Popek's whole
//! boot to init. The payload is found through the setup header's
//! `payload_offset`/`payload_length` (boot protocol 2.08+), decompressed
//! here once and kept in a cache keyed by the image's SHA-256, and
//! [`super::linux::load_decompressed`] places the ELF where the guest's
//! decompressor would have, minus KASLR (the kernel runs at its link
//! address, as with `nokaslr`): it enters `startup_32` of the kernel
//! proper with the same `boot_params`, as QEMU's and Firecracker's direct
//! ELF boots do. `popek run --guest-decompress` keeps the old path, which
//! replays of traces recorded before model revision 2 take.
//!
//! The payload and the cache are untrusted bytes: the decompressor's
//! dictionary and output are capped, and the ELF is checked by the same
//! parser as a multiboot kernel's. A damaged cache file is decompressed
//! again, never loaded.

use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::linux::SetupHeader;

/// `payload_offset` and `payload_length` in the setup header (2.08+).
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24C;
/// The largest decompressed kernel accepted: Debian's 686 kernel is 16 MB
/// (the payload is stripped), and a decompression bomb in an image must not
/// take the host's memory (a growing buffer may hold twice this).
pub const MAX_VMLINUX: u64 = 96 << 20;
/// The largest XZ dictionary allocated (Linux's own xz_wrap.sh uses 32 MiB).
const MAX_XZ_DICT: usize = 64 << 20;
/// First bytes of a cache file, then the vmlinux length (u64, LE).
const CACHE_MAGIC: &[u8; 16] = b"popek-vmlinux-1\n";

/// How a bzImage's payload is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Gzip,
    /// Another format (bzip2, LZMA, LZO, LZ4, zstd): the guest decompresses.
    Other(&'static str),
}

#[derive(Debug, Error)]
pub enum VmlinuxError {
    #[error("boot protocol {0:#06x} does not locate the payload (needs 2.08)")]
    NoPayloadFields(u16),
    #[error("the payload ({offset:#x}+{len:#x}) is outside the protected-mode kernel ({size:#x} bytes)")]
    PayloadOutside { offset: u64, len: u64, size: u64 },
    #[error("the payload is {0}-compressed, which the host does not decompress")]
    Unsupported(&'static str),
    #[error("cannot decompress the kernel payload: {0}")]
    Corrupt(String),
    #[error("the decompressed kernel is larger than {MAX_VMLINUX} bytes")]
    TooLarge,
    #[error("the decompressed payload is not an ELF image")]
    NotElf,
}

/// The compressed kernel of a bzImage and its format.
pub fn payload<'a>(image: &'a [u8], header: &SetupHeader) -> Result<(Compression, &'a [u8]), VmlinuxError> {
    if header.version < 0x0208 || header.header_end < PAYLOAD_LENGTH + 4 {
        return Err(VmlinuxError::NoPayloadFields(header.version));
    }
    let field = |o| super::le_u32(image, o).map(u64::from).unwrap_or(u64::MAX);
    let (offset, len) = (field(PAYLOAD_OFFSET), field(PAYLOAD_LENGTH));
    let pm = &image[header.kernel_offset..];
    let outside = || VmlinuxError::PayloadOutside { offset, len, size: pm.len() as u64 };
    let end = offset.checked_add(len).filter(|&e| e <= pm.len() as u64).ok_or_else(outside)?;
    let data = &pm[offset as usize..end as usize];
    let kind = match data {
        [0xFD, b'7', b'z', b'X', b'Z', 0, ..] => Compression::Xz,
        [0x1F, 0x8B, ..] => Compression::Gzip,
        [b'B', b'Z', b'h', ..] => Compression::Other("bzip2"),
        [0x5D, 0, 0, ..] => Compression::Other("LZMA"),
        [0x89, b'L', b'Z', b'O', ..] => Compression::Other("LZO"),
        [0x02, 0x21, 0x4C, 0x18, ..] => Compression::Other("LZ4"),
        [0x28, 0xB5, 0x2F, 0xFD, ..] => Compression::Other("zstd"),
        _ => Compression::Other("an unknown format"),
    };
    Ok((kind, data))
}

/// Decompresses a bzImage's payload (the ELF `vmlinux`).
pub fn decompress(image: &[u8], header: &SetupHeader) -> Result<Vec<u8>, VmlinuxError> {
    let (kind, data) = payload(image, header)?;
    let corrupt = |e: std::io::Error| VmlinuxError::Corrupt(e.to_string());
    // Not sized from the header's init_size: that is untrusted too.
    let mut out = Vec::with_capacity((data.len() * 4).min(32 << 20));
    // One byte more than allowed tells "too large" from "exactly the cap".
    let limit = MAX_VMLINUX + 1;
    match kind {
        Compression::Xz => xz_into(data, &mut out)?,
        Compression::Gzip => {
            flate2::read::GzDecoder::new(data).take(limit).read_to_end(&mut out).map_err(corrupt)?;
        }
        Compression::Other(name) => return Err(VmlinuxError::Unsupported(name)),
    }
    if out.len() as u64 > MAX_VMLINUX {
        return Err(VmlinuxError::TooLarge);
    }
    if !out.starts_with(b"\x7fELF") {
        return Err(VmlinuxError::NotElf);
    }
    Ok(out)
}

/// Decodes the XZ stream at the start of `data` (Linux appends the
/// decompressed size after it) into `out`, at most [`MAX_VMLINUX`] + 1 bytes.
fn xz_into(mut data: &[u8], out: &mut Vec<u8>) -> Result<(), VmlinuxError> {
    use xz4rust::XzNextBlockResult::{EndOfStream, NeedMoreData};
    let mut decoder = xz4rust::XzDecoder::in_heap_with_alloc_dict_size(1 << 20, MAX_XZ_DICT);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let step = decoder.decode(data, &mut buf).map_err(|e| VmlinuxError::Corrupt(format!("{e:?}")))?;
        let (used, made) = (step.input_consumed(), step.output_produced());
        out.extend_from_slice(&buf[..made]);
        data = &data[used..];
        if out.len() as u64 > MAX_VMLINUX {
            return Err(VmlinuxError::TooLarge);
        }
        match step {
            EndOfStream(..) => return Ok(()),
            NeedMoreData(..) if used == 0 && made == 0 => {
                return Err(VmlinuxError::Corrupt("the XZ stream ends early".into()))
            }
            NeedMoreData(..) => {}
        }
    }
}

/// Decompressed kernels kept across runs, one file per bzImage SHA-256.
#[derive(Clone, Debug)]
pub struct Cache {
    dir: PathBuf,
}

/// Where a kernel came from ([`Cache::vmlinux`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cached,
    Decompressed,
}

impl Cache {
    /// `$POPEK_CACHE_DIR/kernels`, else `$XDG_CACHE_HOME/popek/kernels`,
    /// else `$HOME/.cache/popek/kernels`.
    pub fn default_location() -> Option<Cache> {
        Some(Cache { dir: crate::cache::dir()?.join("kernels") })
    }

    pub fn at(dir: &Path) -> Cache {
        Cache { dir: dir.to_owned() }
    }

    fn path_for(&self, image: &[u8]) -> PathBuf {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(image);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{hex}.vmlinux"))
    }

    /// The kernel of `image`: from the cache when a whole file is there,
    /// else decompressed and (best effort: a read-only home still boots)
    /// stored for the next run.
    pub fn vmlinux(&self, image: &[u8], header: &SetupHeader) -> Result<(Vec<u8>, Source), VmlinuxError> {
        let path = self.path_for(image);
        if let Some(v) = read_cached(&path) {
            return Ok((v, Source::Cached));
        }
        let v = decompress(image, header)?;
        if let Err(e) = write_cached(&path, &v) {
            tracing::debug!(path = %path.display(), error = %e, "cannot cache the decompressed kernel");
        }
        Ok((v, Source::Decompressed))
    }
}

/// A cache file's vmlinux, if the file is whole.
fn read_cached(path: &Path) -> Option<Vec<u8>> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = [0u8; 24];
    f.read_exact(&mut head).ok()?;
    let len = u64::from_le_bytes(head[16..].try_into().expect("8 bytes"));
    if &head[..16] != CACHE_MAGIC || len > MAX_VMLINUX || f.metadata().ok()?.len() != 24 + len {
        return None;
    }
    let mut v = Vec::with_capacity(len as usize);
    f.take(len).read_to_end(&mut v).ok()?;
    (v.len() as u64 == len && v.starts_with(b"\x7fELF")).then_some(v)
}

/// Writes a cache file whole or not at all.
fn write_cached(path: &Path, vmlinux: &[u8]) -> std::io::Result<()> {
    crate::cache::write_atomically(path, &[CACHE_MAGIC, &(vmlinux.len() as u64).to_le_bytes(), vmlinux])
}

#[cfg(test)]
mod tests {
    use super::*;

    const KERNEL: &str = "/work/shared/guests/linux-686/vmlinuz";

    fn kernel() -> Option<Vec<u8>> {
        match std::fs::read(KERNEL) {
            Ok(k) => Some(k),
            Err(e) => {
                println!("skipped: the real kernel {KERNEL} is not readable here ({e})");
                None
            }
        }
    }

    #[test]
    fn the_real_kernel_decompresses_to_its_elf() {
        let Some(k) = kernel() else { return };
        let h = super::super::linux::parse(&k).unwrap();
        let (kind, data) = payload(&k, &h).unwrap();
        assert_eq!(kind, Compression::Xz);
        // Linux appends the decompressed size after the stream.
        let size = u32::from_le_bytes(data[data.len() - 4..].try_into().unwrap());
        let v = decompress(&k, &h).unwrap();
        assert_eq!(v.len() as u32, size);
        assert_eq!(&v[..4], b"\x7fELF");
    }

    #[test]
    fn damaged_payloads_are_errors() {
        let Some(mut k) = kernel() else { return };
        let h = super::super::linux::parse(&k).unwrap();
        let off = h.kernel_offset + super::super::le_u32(&k, PAYLOAD_OFFSET).unwrap() as usize;
        // A flipped byte in the compressed data: the CRC or the decoder says so.
        k[off + 4096] ^= 0xFF;
        assert!(matches!(decompress(&k, &h), Err(VmlinuxError::Corrupt(_))));
        // A payload that points outside the kernel.
        k[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(payload(&k, &h), Err(VmlinuxError::PayloadOutside { .. })));
        // Another compression format is named, not attempted.
        let mut k2 = kernel().unwrap();
        k2[off..off + 3].copy_from_slice(b"BZh");
        assert!(matches!(decompress(&k2, &h), Err(VmlinuxError::Unsupported("bzip2"))));
    }

    #[test]
    fn the_cache_serves_whole_files_only() {
        let Some(k) = kernel() else { return };
        let h = super::super::linux::parse(&k).unwrap();
        let dir = std::env::temp_dir().join(format!("popek-vmlinux-test-{}", std::process::id()));
        let cache = Cache::at(&dir);
        let (first, s1) = cache.vmlinux(&k, &h).unwrap();
        assert_eq!(s1, Source::Decompressed);
        let (second, s2) = cache.vmlinux(&k, &h).unwrap();
        assert_eq!((s2, first == second), (Source::Cached, true));
        // A truncated file (a crash mid-write would leave none: rename) is
        // decompressed again.
        let path = cache.path_for(&k);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::File::options().write(true).open(&path).unwrap().set_len(len - 1).unwrap();
        assert_eq!(cache.vmlinux(&k, &h).unwrap().1, Source::Decompressed);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
