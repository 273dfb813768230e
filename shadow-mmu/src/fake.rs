//! Test doubles: guest RAM in a `Vec<u8>`, a window that records every call
//! and keeps a page model, and builders for guest page tables. Public so the
//! monitor's and engine's tests can drive a [`crate::ShadowMmu`] too.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::host::{HostMapper, MapError, MapOp, OutsideRam, PhysMem, Prot};
use crate::paging::pte;
use crate::ShadowMmu;

/// Guest RAM `[0, len)` plus optional MMIO holes inside it.
#[derive(Clone, Debug)]
pub struct FakeMem {
    pub bytes: Vec<u8>,
    pub holes: Vec<Range<u64>>,
}

impl FakeMem {
    pub fn new(len: usize) -> Self {
        FakeMem { bytes: vec![0; len], holes: Vec::new() }
    }

    fn slot(&self, gpa: u64, n: u64) -> Option<usize> {
        let end = gpa.checked_add(n)?;
        (end <= self.bytes.len() as u64 && self.is_ram(gpa)).then_some(gpa as usize)
    }

    pub fn u32(&self, gpa: u64) -> u32 {
        self.read_u32(gpa).expect("fake RAM read")
    }

    pub fn u64(&self, gpa: u64) -> u64 {
        self.read_u64(gpa).expect("fake RAM read")
    }

    pub fn set_u32(&mut self, gpa: u64, v: u32) {
        self.write_u32(gpa, v).expect("fake RAM write");
    }

    pub fn set_u64(&mut self, gpa: u64, v: u64) {
        self.write_u64(gpa, v).expect("fake RAM write");
    }
}

impl PhysMem for FakeMem {
    fn read_u32(&self, gpa: u64) -> Option<u32> {
        let i = self.slot(gpa, 4)?;
        Some(u32::from_le_bytes(self.bytes[i..i + 4].try_into().expect("4 bytes")))
    }
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        let i = self.slot(gpa, 8)?;
        Some(u64::from_le_bytes(self.bytes[i..i + 8].try_into().expect("8 bytes")))
    }
    fn write_u32(&mut self, gpa: u64, value: u32) -> Result<(), OutsideRam> {
        let i = self.slot(gpa, 4).ok_or(OutsideRam(gpa))?;
        self.bytes[i..i + 4].copy_from_slice(&value.to_le_bytes());
        Ok(())
    }
    fn write_u64(&mut self, gpa: u64, value: u64) -> Result<(), OutsideRam> {
        let i = self.slot(gpa, 8).ok_or(OutsideRam(gpa))?;
        self.bytes[i..i + 8].copy_from_slice(&value.to_le_bytes());
        Ok(())
    }
    fn is_ram(&self, gpa: u64) -> bool {
        gpa < self.bytes.len() as u64 && !self.holes.iter().any(|h| h.contains(&gpa))
    }
    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let n = buf.len() as u64;
        let Some(end) = gpa.checked_add(n) else { return false };
        if end > self.bytes.len() as u64 || self.holes.iter().any(|h| h.start < end && gpa < h.end) {
            return false;
        }
        buf.copy_from_slice(&self.bytes[gpa as usize..end as usize]);
        true
    }
}

/// One recorded window call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapCall {
    Map { gva: u32, gpa: u64, len: u32, prot: Prot },
    Unmap { gva: u32, len: u32 },
    Protect { gva: u32, len: u32, prot: Prot },
}

/// A window that records calls and models page → (gpa, prot). It panics on
/// a call the shadow MMU promises never to make (below `min_addr`, into the
/// VMM area, beyond RAM, unaligned), and refuses to protect unmapped pages.
#[derive(Clone, Debug)]
pub struct FakeMapper {
    pub calls: Vec<MapCall>,
    pub pages: BTreeMap<u32, (u64, Prot)>,
    pub min_addr: u32,
    pub vmm_base: u32,
    pub ram_len: u64,
    /// Fail the next call (to test error propagation).
    pub fail_next: bool,
}

impl FakeMapper {
    pub fn new(ram_len: u64) -> Self {
        FakeMapper {
            calls: Vec::new(),
            pages: BTreeMap::new(),
            min_addr: 4096,
            vmm_base: 0xFF80_0000,
            ram_len,
            fail_next: false,
        }
    }

    fn check(&mut self, op: MapOp, gva: u32, len: u32) -> Result<(), MapError> {
        assert!(len > 0 && (gva | len) & 0xFFF == 0, "unaligned {op:?} {gva:#x}+{len:#x}");
        assert!(gva >= self.min_addr, "{op:?} below mmap_min_addr: {gva:#x}");
        assert!(u64::from(gva) + u64::from(len) <= u64::from(self.vmm_base), "{op:?} reaches the VMM area");
        if std::mem::take(&mut self.fail_next) {
            return Err(MapError { op, gva, len, detail: "injected failure".into() });
        }
        Ok(())
    }

    pub fn map_calls(&self) -> usize {
        self.calls.iter().filter(|c| matches!(c, MapCall::Map { .. })).count()
    }

    pub fn protect_calls(&self) -> usize {
        self.calls.iter().filter(|c| matches!(c, MapCall::Protect { .. })).count()
    }

    pub fn unmap_calls(&self) -> usize {
        self.calls.iter().filter(|c| matches!(c, MapCall::Unmap { .. })).count()
    }

    /// What the window holds at the page of `gva`.
    pub fn at(&self, gva: u32) -> Option<(u64, Prot)> {
        self.pages.get(&(gva & !0xFFF)).copied()
    }

    /// Panics unless the window holds exactly what the shadow state says:
    /// every shadow in force with its rights, every parked one with none.
    pub fn assert_matches(&self, mmu: &ShadowMmu) {
        let mut shadow: BTreeMap<u32, (u64, Prot)> = mmu.entries().map(|(gva, e)| (gva, (e.gpa, e.prot))).collect();
        for (gva, e) in mmu.parked_entries() {
            assert!(shadow.insert(gva, (e.gpa, Prot::NONE)).is_none(), "{gva:#x} both parked and in force");
        }
        assert_eq!(self.pages, shadow, "window and shadow state disagree");
    }
}

impl HostMapper for FakeMapper {
    fn map(&mut self, gva: u32, gpa: u64, len: u32, prot: Prot) -> Result<(), MapError> {
        self.check(MapOp::Map, gva, len)?;
        assert!(gpa & 0xFFF == 0 && gpa + u64::from(len) <= self.ram_len, "map beyond RAM: {gpa:#x}+{len:#x}");
        self.calls.push(MapCall::Map { gva, gpa, len, prot });
        for i in 0..len / 4096 {
            self.pages.insert(gva + i * 4096, (gpa + u64::from(i) * 4096, prot));
        }
        Ok(())
    }

    fn unmap(&mut self, gva: u32, len: u32) -> Result<(), MapError> {
        self.check(MapOp::Unmap, gva, len)?;
        self.calls.push(MapCall::Unmap { gva, len });
        let end = u64::from(gva) + u64::from(len);
        self.pages.retain(|&p, _| u64::from(p) < u64::from(gva) || u64::from(p) >= end);
        Ok(())
    }

    fn protect(&mut self, gva: u32, len: u32, prot: Prot) -> Result<(), MapError> {
        self.check(MapOp::Protect, gva, len)?;
        self.calls.push(MapCall::Protect { gva, len, prot });
        for i in 0..len / 4096 {
            match self.pages.get_mut(&(gva + i * 4096)) {
                Some(slot) => slot.1 = prot,
                // The host's unmapped window pages are PROT_NONE
                // reservations: taking every right away leaves them as
                // they are (park spans merge across them); giving any
                // would make them reachable memory.
                None if prot == Prot::NONE => {}
                None => {
                    return Err(MapError { op: MapOp::Protect, gva, len, detail: "page not mapped".into() });
                }
            }
        }
        Ok(())
    }
}

/// Builds 32-bit (2-level) guest page tables in a [`FakeMem`], taking page
/// tables from a bump allocator starting at `tables`.
#[derive(Clone, Debug)]
pub struct Pager32 {
    /// The page directory: load it into CR3.
    pub cr3: u32,
    next: u64,
}

impl Pager32 {
    /// Page directory at `tables`, page tables after it.
    pub fn new(tables: u64) -> Self {
        Pager32 { cr3: tables as u32, next: tables + 4096 }
    }

    pub fn pde_addr(&self, gva: u32) -> u64 {
        u64::from(self.cr3) + u64::from(gva >> 22) * 4
    }

    /// Address of the PTE for `gva`, creating its page table (PDE flags
    /// P|RW|US) if missing.
    pub fn pte_addr(&mut self, mem: &mut FakeMem, gva: u32) -> u64 {
        let pde_addr = self.pde_addr(gva);
        let mut pde = mem.u32(pde_addr);
        if pde & 1 == 0 {
            pde = self.next as u32 | (pte::P | pte::RW | pte::US) as u32;
            self.next += 4096;
            mem.set_u32(pde_addr, pde);
        }
        u64::from(pde & 0xFFFF_F000) + u64::from((gva >> 12) & 0x3FF) * 4
    }

    /// Maps the 4 KiB page at `gva` to `gpa` with PTE `flags` (P is added).
    pub fn map_4k(&mut self, mem: &mut FakeMem, gva: u32, gpa: u32, flags: u64) -> u64 {
        let a = self.pte_addr(mem, gva);
        mem.set_u32(a, gpa & 0xFFFF_F000 | (flags | pte::P) as u32);
        a
    }

    /// Maps the 4 MiB page at `gva` to `gpa` with PDE `flags` (P|PS added).
    pub fn map_4m(&mut self, mem: &mut FakeMem, gva: u32, gpa: u32, flags: u64) -> u64 {
        let a = self.pde_addr(gva);
        mem.set_u32(a, gpa & 0xFFC0_0000 | (flags | pte::P | pte::PS) as u32);
        a
    }
}

/// Builds PAE guest page tables: a PDPT at `tables` (CR3), page directories
/// and tables after it.
#[derive(Clone, Debug)]
pub struct PagerPae {
    pub cr3: u32,
    next: u64,
}

impl PagerPae {
    pub fn new(tables: u64) -> Self {
        PagerPae { cr3: tables as u32, next: tables + 4096 }
    }

    fn table(&mut self, mem: &mut FakeMem, at: u64, flags: u64) -> u64 {
        let mut e = mem.u64(at);
        if e & pte::P == 0 {
            e = self.next | flags | pte::P;
            self.next += 4096;
            mem.set_u64(at, e);
        }
        e & 0x000F_FFFF_FFFF_F000
    }

    /// Address of the PDE for `gva`, creating the page directory if missing
    /// (a PDPTE has only P among the rights bits).
    pub fn pde_addr(&mut self, mem: &mut FakeMem, gva: u32) -> u64 {
        let pd = self.table(mem, u64::from(self.cr3) + u64::from(gva >> 30) * 8, 0);
        pd + u64::from((gva >> 21) & 0x1FF) * 8
    }

    pub fn pte_addr(&mut self, mem: &mut FakeMem, gva: u32) -> u64 {
        let pde = self.pde_addr(mem, gva);
        let pt = self.table(mem, pde, pte::RW | pte::US);
        pt + u64::from((gva >> 12) & 0x1FF) * 8
    }

    pub fn map_4k(&mut self, mem: &mut FakeMem, gva: u32, gpa: u64, flags: u64) -> u64 {
        let a = self.pte_addr(mem, gva);
        mem.set_u64(a, gpa & !0xFFF | flags | pte::P);
        a
    }

    pub fn map_2m(&mut self, mem: &mut FakeMem, gva: u32, gpa: u64, flags: u64) -> u64 {
        let a = self.pde_addr(mem, gva);
        mem.set_u64(a, gpa & !0x1F_FFFF | flags | pte::P | pte::PS);
        a
    }
}
