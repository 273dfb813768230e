//! Shared set-up: 16 MiB of fake RAM, page tables from 1 MiB up, data frames
//! from 2 MiB up, and a recording window.
#![allow(dead_code)]

use shadow_mmu::fake::{FakeMapper, FakeMem, Pager32, PagerPae};
use shadow_mmu::paging::{cr0, cr4, efer};
use shadow_mmu::{Access, FaultOutcome, MmuConfig, ShadowMmu};

pub const RAM: usize = 16 << 20;
pub const TABLES: u64 = 0x10_0000;

pub struct Vm {
    pub mem: FakeMem,
    pub win: FakeMapper,
    pub mmu: ShadowMmu,
}

impl Vm {
    pub fn new(config: MmuConfig) -> Vm {
        let mut win = FakeMapper::new(RAM as u64);
        win.min_addr = config.mmap_min_addr;
        win.vmm_base = config.vmm_base;
        Vm { mem: FakeMem::new(RAM), win, mmu: ShadowMmu::new(config) }
    }

    /// Turns on 32-bit paging with CR0.WP and the given CR4.
    pub fn paging32(&mut self, pager: &Pager32, cr4_bits: u32) {
        self.mmu.set_cr4(&self.mem, &mut self.win, cr4_bits).unwrap();
        self.mmu.set_cr3(&self.mem, &mut self.win, pager.cr3).unwrap();
        self.mmu.set_cr0(&self.mem, &mut self.win, cr0::PE | cr0::PG | cr0::WP).unwrap();
    }

    /// Turns on PAE paging (tables must already hold the PDPTEs).
    pub fn paging_pae(&mut self, pager: &PagerPae, nxe: bool) {
        self.mmu.set_efer(&self.mem, &mut self.win, if nxe { efer::NXE } else { 0 }).unwrap();
        self.mmu.set_cr4(&self.mem, &mut self.win, cr4::PAE).unwrap();
        self.mmu.set_cr3(&self.mem, &mut self.win, pager.cr3).unwrap();
        self.mmu.set_cr0(&self.mem, &mut self.win, cr0::PE | cr0::PG | cr0::WP).unwrap();
    }

    /// A hidden fault at `gva`; CPL 3 for user accesses, 0 otherwise.
    pub fn fault(&mut self, gva: u32, access: Access) -> FaultOutcome {
        let cpl = if access.user { 3 } else { 0 };
        let out = self.mmu.handle_fault(&mut self.mem, &mut self.win, gva, access, cpl).unwrap();
        self.win.assert_matches(&self.mmu);
        out
    }

    pub fn set_cr3(&mut self, cr3: u32) {
        self.mmu.set_cr3(&self.mem, &mut self.win, cr3).unwrap();
        self.win.assert_matches(&self.mmu);
    }

    pub fn invlpg(&mut self, gva: u32) {
        self.mmu.invlpg(&self.mem, &mut self.win, gva).unwrap();
        self.win.assert_matches(&self.mmu);
    }
}

pub fn vm() -> Vm {
    Vm::new(MmuConfig::default())
}
