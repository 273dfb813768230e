//! virtio-blk on a raw image file (`--disk FILE[,ro]`).
//!
//! Requests: a 16-byte readable header (type, reserved, sector), data
//! buffers (writable for reads, readable for writes), and a writable status
//! byte last. Reads and writes go to the file with `pread`/`pwrite`; a flush
//! is `fdatasync`, so a write the guest has flushed survives the monitor
//! being killed. A read-only disk announces VIRTIO_BLK_F_RO and fails
//! writes with VIRTIO_BLK_S_IOERR, as write-protected hardware does. A
//! request past the end of the disk fails with IOERR; a request whose
//! descriptors are not shaped like one breaks the device.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use super::{read_guest, write_guest, Chain, VirtioDevice, VirtioError, TYPE_BLOCK};

pub const SECTOR: u64 = 512;
/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 128;

use virtio_bindings::virtio_blk as vb;

/// Feature bits.
pub const F_SEG_MAX: u32 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
pub const F_RO: u32 = 1 << vb::VIRTIO_BLK_F_RO;
pub const F_BLK_SIZE: u32 = 1 << vb::VIRTIO_BLK_F_BLK_SIZE;
pub const F_FLUSH: u32 = 1 << vb::VIRTIO_BLK_F_FLUSH;

/// Request types.
pub const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;

/// Status values.
pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;
/// Bytes of a GET_ID answer.
const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;

#[derive(Debug, Error)]
pub enum BlockError {
    #[error("cannot open the disk image {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("disk image {path} is {len} bytes, not a whole number of 512-byte sectors")]
    NotSectors { path: PathBuf, len: u64 },
    #[error("bad --disk {0:?} (FILE or FILE,ro)")]
    Spec(String),
}

/// A `--disk` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for DiskSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.rsplit_once(',') {
            Some((p, "ro")) if !p.is_empty() => Ok(DiskSpec { path: p.into(), read_only: true }),
            Some((p, "rw")) if !p.is_empty() => Ok(DiskSpec { path: p.into(), read_only: false }),
            Some(_) => Err(BlockError::Spec(s.to_string()).to_string()),
            None if !s.is_empty() => Ok(DiskSpec { path: s.into(), read_only: false }),
            None => Err(BlockError::Spec(s.to_string()).to_string()),
        }
    }
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
}

pub struct Block {
    file: File,
    read_only: bool,
    sectors: u64,
    id: String,
    pub stats: BlockStats,
}

impl Block {
    pub fn open(spec: &DiskSpec, index: usize) -> Result<Self, BlockError> {
        let open = |path: &Path| OpenOptions::new().read(true).write(!spec.read_only).open(path);
        let file = open(&spec.path).map_err(|source| BlockError::Open { path: spec.path.clone(), source })?;
        let len = file.metadata().map_err(|source| BlockError::Open { path: spec.path.clone(), source })?.len();
        if !len.is_multiple_of(SECTOR) {
            return Err(BlockError::NotSectors { path: spec.path.clone(), len });
        }
        Ok(Self {
            file,
            read_only: spec.read_only,
            sectors: len / SECTOR,
            id: format!("popek-disk{index}"),
            stats: BlockStats::default(),
        })
    }

    /// Carries out one well-formed request; the status byte.
    fn execute(
        &mut self,
        kind: u32,
        sector: u64,
        data: &[super::Descriptor],
        mem: &GuestMemoryMmap,
    ) -> Result<(u8, u32), VirtioError> {
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let in_range = sector
            .checked_mul(SECTOR)
            .and_then(|o| o.checked_add(total))
            .is_some_and(|end| end <= self.sectors * SECTOR);
        let mut offset = sector.saturating_mul(SECTOR);
        match kind {
            T_IN | T_OUT if !in_range => Ok((S_IOERR, 0)),
            T_IN => {
                let mut written = 0u32;
                for d in data {
                    let mut buf = vec![0u8; d.len() as usize];
                    if self.file.read_exact_at(&mut buf, offset).is_err() {
                        return Ok((S_IOERR, written));
                    }
                    write_guest(mem, d.addr(), &buf)?;
                    offset += u64::from(d.len());
                    written = written.saturating_add(d.len());
                }
                self.stats.reads += 1;
                Ok((S_OK, written))
            }
            T_OUT if self.read_only => Ok((S_IOERR, 0)),
            T_OUT => {
                for d in data {
                    let mut buf = vec![0u8; d.len() as usize];
                    read_guest(mem, d.addr(), &mut buf)?;
                    if self.file.write_all_at(&buf, offset).is_err() {
                        return Ok((S_IOERR, 0));
                    }
                    offset += u64::from(d.len());
                }
                self.stats.writes += 1;
                Ok((S_OK, 0))
            }
            T_FLUSH => {
                self.stats.flushes += 1;
                let ok = self.read_only || self.file.sync_data().is_ok();
                Ok((if ok { S_OK } else { S_IOERR }, 0))
            }
            T_GET_ID => {
                let mut id = self.id.as_bytes().to_vec();
                id.resize(ID_BYTES, 0);
                let mut written = 0u32;
                for d in data {
                    let n = (d.len() as usize).min(id.len());
                    write_guest(mem, d.addr(), &id[..n])?;
                    id.drain(..n);
                    written = written.saturating_add(n as u32);
                }
                Ok((S_OK, written))
            }
            _ => Ok((S_UNSUPP, 0)),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        TYPE_BLOCK
    }
    fn name(&self) -> &'static str {
        "virtio-blk"
    }
    fn features(&self) -> u32 {
        F_SEG_MAX | F_BLK_SIZE | F_FLUSH | if self.read_only { F_RO } else { 0 }
    }
    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    /// capacity (u64 sectors), size_max, seg_max, geometry, blk_size.
    fn config(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(24);
        c.extend_from_slice(&self.sectors.to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&(SECTOR as u32).to_le_bytes());
        c
    }
    fn serve(&mut self, _queue: usize, chain: &Chain, mem: &GuestMemoryMmap) -> Result<u32, VirtioError> {
        let head = chain.head;
        let bad = |what| VirtioError::Chain { head, what };
        let descs = &chain.descs;
        let (Some(header), Some(status)) = (descs.first(), descs.last()) else {
            return Err(bad("empty"));
        };
        if descs.len() < 2 {
            return Err(bad("a request needs a header and a status descriptor"));
        }
        if header.is_write_only() || header.len() < 16 {
            return Err(bad("the request header is not a readable 16-byte buffer"));
        }
        if !status.is_write_only() || status.len() < 1 {
            return Err(bad("the status descriptor is not writable"));
        }
        let mut h = [0u8; 16];
        read_guest(mem, header.addr(), &mut h)?;
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
        let data = &descs[1..descs.len() - 1];
        let want_writable = matches!(kind, T_IN | T_GET_ID);
        if matches!(kind, T_IN | T_OUT | T_GET_ID) && data.iter().any(|d| d.is_write_only() != want_writable) {
            return Err(bad("data buffers point the wrong way for the request type"));
        }
        let (st, written) = self.execute(kind, sector, data, mem)?;
        if st != S_OK {
            self.stats.errors += 1;
        }
        write_guest(mem, status.addr(), &[st])?;
        Ok(written.saturating_add(1))
    }
    fn stats(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("reads", self.stats.reads),
            ("writes", self.stats.writes),
            ("flushes", self.stats.flushes),
            ("errors", self.stats.errors),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{process_queue, VirtioError};
    use super::*;

    const HDR: u64 = 0x2_0000;
    const DATA: u64 = 0x2_1000;
    const STATUS: u64 = 0x2_3000;

    fn image(tag: &str, sectors: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("popek-blk-{tag}-{}.img", std::process::id()));
        let mut bytes = vec![0u8; (sectors * SECTOR) as usize];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn request(mem: &crate::memory::GuestMemory, kind: u32, sector: u64, len: u32, data_flags: u16) {
        let mut h = Vec::new();
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        mem.write(HDR, &h).unwrap();
        mem.write(STATUS, &[0xEE]).unwrap();
        desc(mem, 0, HDR, 16, DESC_F_NEXT, 1);
        desc(mem, 1, DATA, len, data_flags | DESC_F_NEXT, 2);
        desc(mem, 2, STATUS, 1, DESC_F_WRITE, 0);
        publish(mem, &[0]);
    }

    fn status(mem: &crate::memory::GuestMemory) -> u8 {
        let mut b = [0u8];
        mem.read(STATUS, &mut b).unwrap();
        b[0]
    }

    #[test]
    fn read_write_flush_and_id() {
        let path = image("rw", 16);
        let mut blk = Block::open(&DiskSpec { path: path.clone(), read_only: false }, 0).unwrap();
        assert_eq!(&blk.config()[..8], &16u64.to_le_bytes());
        let (mem, dm) = memory();
        let mut q = queue();
        request(&mem, T_IN, 3, 1024, DESC_F_WRITE);
        assert!(process_queue(&mut blk, 0, &mut q, &dm.view).unwrap());
        assert_eq!(status(&mem), S_OK);
        let mut got = vec![0u8; 1024];
        mem.read(DATA, &mut got).unwrap();
        assert!(got[..512].iter().all(|&b| b == 3) && got[512..].iter().all(|&b| b == 4));
        assert_eq!(used(&mem), (1, vec![(0, 1025)]));
        // Write sector 5, then flush: the file has it.
        mem.write(DATA, &[0xAB; 512]).unwrap();
        let mut q = queue();
        request(&mem, T_OUT, 5, 512, 0);
        process_queue(&mut blk, 0, &mut q, &dm.view).unwrap();
        assert_eq!(status(&mem), S_OK);
        let mut q = queue();
        request(&mem, T_FLUSH, 0, 0, 0);
        // A flush has no data descriptor: header then status.
        desc(&mem, 0, HDR, 16, DESC_F_NEXT, 2);
        process_queue(&mut blk, 0, &mut q, &dm.view).unwrap();
        assert_eq!(status(&mem), S_OK);
        let file = std::fs::read(&path).unwrap();
        assert!(file[5 * 512..6 * 512].iter().all(|&b| b == 0xAB));
        let mut q = queue();
        request(&mem, T_GET_ID, 0, 20, DESC_F_WRITE);
        process_queue(&mut blk, 0, &mut q, &dm.view).unwrap();
        let mut id = [0u8; 11];
        mem.read(DATA, &mut id).unwrap();
        assert_eq!(&id, b"popek-disk0");
        assert_eq!(blk.stats, BlockStats { reads: 1, writes: 1, flushes: 1, errors: 0 });
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn read_only_disks_refuse_writes_and_the_end_is_an_error() {
        let path = image("ro", 8);
        let mut blk = Block::open(&DiskSpec { path: path.clone(), read_only: true }, 1).unwrap();
        assert_ne!(blk.features() & F_RO, 0);
        let (mem, dm) = memory();
        let mut q = queue();
        request(&mem, T_OUT, 0, 512, 0);
        process_queue(&mut blk, 0, &mut q, &dm.view).unwrap();
        assert_eq!(status(&mem), S_IOERR);
        assert!(std::fs::read(&path).unwrap()[..512].iter().all(|&b| b == 0), "the image is untouched");
        let mut q = queue();
        request(&mem, T_IN, 7, 1024, DESC_F_WRITE);
        process_queue(&mut blk, 0, &mut q, &dm.view).unwrap();
        assert_eq!(status(&mem), S_IOERR, "past the end");
        let mut q = queue();
        request(&mem, T_IN, u64::MAX / 2, 512, DESC_F_WRITE);
        process_queue(&mut blk, 0, &mut q, &dm.view).unwrap();
        assert_eq!(status(&mem), S_IOERR, "overflowing sector");
        let mut q = queue();
        request(&mem, 99, 0, 512, DESC_F_WRITE);
        process_queue(&mut blk, 0, &mut q, &dm.view).unwrap();
        assert_eq!(status(&mem), S_UNSUPP);
        assert_eq!(blk.stats.errors, 4);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn malformed_requests_break_the_device() {
        let path = image("bad", 8);
        let mut blk = Block::open(&DiskSpec { path: path.clone(), read_only: false }, 2).unwrap();
        let (mem, dm) = memory();
        type Damage = Box<dyn Fn(&crate::memory::GuestMemory)>;
        let cases: [(&str, Damage); 5] = [
            ("writable header", Box::new(|m| desc(m, 0, HDR, 16, DESC_F_WRITE | DESC_F_NEXT, 1))),
            ("short header", Box::new(|m| desc(m, 0, HDR, 8, DESC_F_NEXT, 1))),
            ("read-only status", Box::new(|m| desc(m, 2, STATUS, 1, 0, 0))),
            ("read into a readable buffer", Box::new(|m| desc(m, 1, DATA, 512, DESC_F_NEXT, 2))),
            ("next index out of the table", Box::new(|m| desc(m, 1, DATA, 512, DESC_F_WRITE | DESC_F_NEXT, 99))),
        ];
        for (what, damage) in cases {
            let mut q = queue();
            request(&mem, T_IN, 0, 512, DESC_F_WRITE);
            damage(&mem);
            let r = process_queue(&mut blk, 0, &mut q, &dm.view);
            assert!(matches!(r, Err(VirtioError::Chain { head: 0, .. })), "{what}: {r:?}");
        }
        // A data buffer beyond guest RAM.
        let mut q = queue();
        request(&mem, T_IN, 0, 512, DESC_F_WRITE);
        desc(&mem, 1, 0x7FFF_F000, 512, DESC_F_WRITE | DESC_F_NEXT, 2);
        assert!(matches!(process_queue(&mut blk, 0, &mut q, &dm.view), Err(VirtioError::Memory { .. })));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn disk_arguments() {
        assert_eq!("a.img".parse::<DiskSpec>(), Ok(DiskSpec { path: "a.img".into(), read_only: false }));
        assert_eq!("a.img,ro".parse::<DiskSpec>(), Ok(DiskSpec { path: "a.img".into(), read_only: true }));
        assert!("a.img,xx".parse::<DiskSpec>().is_err());
        assert!("".parse::<DiskSpec>().is_err());
        let missing = DiskSpec { path: "/nonexistent/x.img".into(), read_only: true };
        assert!(matches!(Block::open(&missing, 0), Err(BlockError::Open { .. })));
    }
}
