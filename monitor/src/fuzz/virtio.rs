//! Fuzz target for virtio descriptor chains: virtio-blk (on a scratch
//! disk in /dev/shm or the temp directory) and virtio-rng, on made-up guest
//! memory holding a legacy split ring.
//!
//! Each input lays out well-formed requests (a blk header, data buffers and
//! a status byte; rng buffers; sometimes through an indirect table), then
//! mutates the descriptor table, the available ring and the request
//! headers, and serves the queue either directly ([`process_queue`]) or
//! through the legacy virtio-pci registers with fuzz-chosen register
//! accesses in between. A bad chain must end as a `VirtioError` (the device
//! needs a reset), never as a panic, and the used index must not run ahead
//! of what the driver made available.

use std::path::PathBuf;
use std::sync::Arc;

use arbitrary::Unstructured;
use virtio_queue::{Queue, QueueT};

use super::mutate::{self, Field};
use super::Target;
use crate::devices::bus::PortDevice;
use crate::devices::virtio::blk::{Block, DiskSpec, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use crate::devices::virtio::pci::{legacy_ring_addresses, VirtioPci};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::{process_queue, DeviceMemory, VirtioDevice};
use crate::memory::GuestMemory;

const RAM: u64 = 2 << 20;
const RING: u64 = 0x1_0000;
const BUFFERS: u64 = 0x4_0000;
const INDIRECT: u64 = 0x3_0000;
const IO: u16 = 0xC000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const DISK_BYTES: u64 = 64 << 10;

struct Virtio {
    mem: Arc<GuestMemory>,
    dm: DeviceMemory,
    disk: PathBuf,
}

pub fn virtio() -> Result<Box<dyn Target>, String> {
    let mem = Arc::new(GuestMemory::new(RAM).map_err(|e| e.to_string())?);
    let dm = DeviceMemory::new(&mem);
    let dir = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let disk = dir.join(format!("popek-fuzz-disk-{}.img", std::process::id()));
    std::fs::write(&disk, vec![0u8; DISK_BYTES as usize]).map_err(|e| format!("{}: {e}", disk.display()))?;
    Ok(Box::new(Virtio { mem, dm, disk }))
}

impl Drop for Virtio {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.disk);
    }
}

/// One descriptor as laid out in the table.
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn encode(descs: &[Desc]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 * descs.len());
    for d in descs {
        b.extend_from_slice(&d.addr.to_le_bytes());
        b.extend_from_slice(&d.len.to_le_bytes());
        b.extend_from_slice(&d.flags.to_le_bytes());
        b.extend_from_slice(&d.next.to_le_bytes());
    }
    b
}

/// Lays out up to `qsize` descriptors of well-formed requests; returns the
/// table, the heads, and the indirect table (if a chain uses one).
fn requests(
    u: &mut Unstructured<'_>,
    blk: bool,
    qsize: u16,
    mem: &GuestMemory,
) -> arbitrary::Result<(Vec<Desc>, Vec<u16>, Vec<Desc>)> {
    let mut table = Vec::new();
    let mut heads = Vec::new();
    let mut indirect = Vec::new();
    let mut buf = BUFFERS;
    for _ in 0..u.int_in_range(1..=4u8)? {
        let mut chain = Vec::new();
        if blk {
            let kind = *u.choose(&[T_IN, T_OUT, T_FLUSH, T_GET_ID, 99])?;
            let sector = if u.ratio(1u8, 4)? { u.arbitrary()? } else { u.int_in_range(0..=DISK_BYTES / 512)? };
            let mut hdr = [0u8; 16];
            hdr[..4].copy_from_slice(&kind.to_le_bytes());
            hdr[8..].copy_from_slice(&sector.to_le_bytes());
            let _ = mem.write(buf, &hdr);
            chain.push(Desc { addr: buf, len: 16, flags: 0, next: 0 });
            buf += 16;
            let writable = if kind == T_OUT { 0 } else { F_WRITE };
            for _ in 0..u.int_in_range(0..=3u8)? {
                let len = if u.ratio(3u8, 4)? { 512 * u.int_in_range(1..=8u32)? } else { u.int_in_range(0..=5000u32)? };
                chain.push(Desc { addr: buf, len, flags: writable, next: 0 });
                buf += u64::from(len);
            }
            chain.push(Desc { addr: buf, len: 1, flags: F_WRITE, next: 0 });
            buf += 1;
        } else {
            for _ in 0..u.int_in_range(1..=3u8)? {
                let len = u.int_in_range(0..=4096u32)?;
                chain.push(Desc { addr: buf, len, flags: F_WRITE, next: 0 });
                buf += u64::from(len);
            }
        }
        if indirect.is_empty() && u.ratio(1u8, 5)? {
            for (i, d) in chain.iter_mut().enumerate() {
                d.next = i as u16 + 1;
            }
            let n = chain.len();
            if let Some(last) = chain.last_mut() {
                last.flags &= !F_NEXT;
            }
            for d in chain.iter_mut().take(n - 1) {
                d.flags |= F_NEXT;
            }
            let len = 16 * n as u32;
            indirect = chain;
            if table.len() < usize::from(qsize) {
                heads.push(table.len() as u16);
                table.push(Desc { addr: INDIRECT, len, flags: F_INDIRECT, next: 0 });
            }
            continue;
        }
        if table.len() + chain.len() > usize::from(qsize) {
            break;
        }
        let first = table.len() as u16;
        let n = chain.len();
        for (i, mut d) in chain.into_iter().enumerate() {
            if i + 1 < n {
                d.flags |= F_NEXT;
                d.next = first + i as u16 + 1;
            }
            table.push(d);
        }
        heads.push(first);
    }
    Ok((table, heads, indirect))
}

impl Target for Virtio {
    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        let mut u = Unstructured::new(input);
        self.go(&mut u).unwrap_or(Ok(()))
    }
}

impl Virtio {
    fn go(&mut self, u: &mut Unstructured<'_>) -> arbitrary::Result<Result<(), String>> {
        if let Ok(m) = self.mem.slice_mut(0, 0x8_0000) {
            m.fill(0);
        }
        let blk = u.arbitrary::<bool>()?;
        let mut dev: Box<dyn VirtioDevice> = if blk {
            let spec = DiskSpec { path: self.disk.clone(), read_only: u.ratio(1u8, 4)? };
            match Block::open(&spec, 0) {
                Ok(b) => Box::new(b),
                Err(e) => return Ok(Err(format!("scratch disk: {e}"))),
            }
        } else {
            Box::new(Rng::default())
        };
        let qsize = dev.queue_sizes()[0];
        let (table, heads, indirect) = requests(u, blk, qsize, &self.mem)?;
        // The ring image: descriptor table, then the available ring.
        let (d, a, used) = legacy_ring_addresses(RING, qsize);
        let mut ring = encode(&table);
        ring.resize((a - d) as usize, 0);
        let avail_at = ring.len();
        ring.extend_from_slice(&0u16.to_le_bytes());
        ring.extend_from_slice(&(heads.len() as u16).to_le_bytes());
        for h in &heads {
            ring.extend_from_slice(&h.to_le_bytes());
        }
        let mut fields = Vec::new();
        for i in 0..table.len().max(1) {
            let o = 16 * i;
            fields.extend([Field::new(o, 8), Field::new(o + 8, 4), Field::new(o + 12, 2), Field::new(o + 14, 2)]);
        }
        fields.push(Field::new(avail_at + 2, 2));
        for i in 0..heads.len() {
            fields.push(Field::new(avail_at + 4 + 2 * i, 2));
        }
        let fixed_len = ring.len();
        mutate::mutate(u, &mut ring, &fields, 8)?;
        ring.truncate(fixed_len.max(ring.len().min((used - d) as usize)));
        let _ = self.mem.write(RING, &ring);
        let mut ind = encode(&indirect);
        let ind_fields: Vec<Field> = (0..indirect.len())
            .flat_map(|i| [Field::new(16 * i + 8, 4), Field::new(16 * i + 12, 2), Field::new(16 * i + 14, 2)])
            .collect();
        mutate::mutate(u, &mut ind, &ind_fields, 3)?;
        let _ = self.mem.write(INDIRECT, &ind);
        let avail_idx = self.mem.slice(a + 2, 2).map(|b| u16::from_le_bytes([b[0], b[1]])).unwrap_or(0);
        if u.arbitrary::<bool>()? {
            // Directly.
            let mut q = Queue::new(qsize).map_err(|_| arbitrary::Error::IncorrectFormat)?;
            q.set_size(qsize);
            q.set_desc_table_address(Some(d as u32), Some(0));
            q.set_avail_ring_address(Some(a as u32), Some(0));
            q.set_used_ring_address(Some(used as u32), Some(0));
            q.set_ready(true);
            for _ in 0..2 {
                match process_queue(dev.as_mut(), 0, &mut q, &self.dm.view) {
                    Ok(_) => super::note("direct: served"),
                    Err(e) => {
                        super::note_err("direct: broken", &e);
                        break;
                    }
                }
            }
            // The device completes at most what was made available.
            let used_idx = self.mem.slice(used + 2, 2).map(|b| u16::from_le_bytes([b[0], b[1]])).unwrap_or(0);
            if avail_idx <= qsize && used_idx > avail_idx {
                return Ok(Err(format!("used index {used_idx} is ahead of the available index {avail_idx}")));
            }
        } else {
            // Through the legacy PCI registers, with other accesses between.
            let mut p = VirtioPci::new(dev, self.dm.clone(), IO);
            p.write(IO + 0x12, 1, 0x07);
            p.write(IO + 0x08, 4, (RING >> 12) as u32);
            for _ in 0..u.int_in_range(0..=12u8)? {
                let off: u16 = if u.ratio(3u8, 4)? { u.int_in_range(0..=0x30u16)? } else { u.arbitrary()? };
                let size = *u.choose(&[1u8, 2, 4])?;
                if u.arbitrary::<bool>()? {
                    p.write(IO.wrapping_add(off), size, u.arbitrary()?);
                } else {
                    let _ = p.read(IO.wrapping_add(off), size);
                }
            }
            p.write(IO + 0x10, 2, 0);
            p.write(IO + 0x10, 2, u32::from(u.arbitrary::<u16>()? & 3));
            let _ = p.read(IO + 0x13, 1);
            super::note(if p.broken().is_some() { "pci: needs reset" } else { "pci: fine" });
            let _ = (p.irq_level(), p.stats());
        }
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn virtio_smoke() {
        super::super::smoke("virtio", 300);
    }
}
