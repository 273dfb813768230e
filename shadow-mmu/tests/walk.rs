//! Guest page-table walks against the SDM: translations, every error-code
//! bit, CR0.WP, NX, reserved bits, A/D updates.

mod common;

use common::{vm, TABLES};
use shadow_mmu::fake::{FakeMem, Pager32, PagerPae};
use shadow_mmu::paging::{cr0, cr4, pf, pte};
use shadow_mmu::{Access, MmuError, PageFault, PageSize, Perms};

const RW_US: u64 = pte::RW | pte::US;

fn pf_code(r: Result<shadow_mmu::Translation, PageFault>) -> u32 {
    r.expect_err("expected a page fault").error_code
}

#[test]
fn paging_off_is_identity() {
    let mut v = vm();
    let t = v.mmu.translate(&mut v.mem, 0x0012_3456, Access::write().user()).unwrap();
    assert_eq!(t.gpa, 0x0012_3456);
    assert!(t.leaf.is_none());
}

#[test]
fn two_level_4k_walk() {
    let mut v = vm();
    let mut p = Pager32::new(TABLES);
    p.map_4k(&mut v.mem, 0x4000_1000, 0x20_5000, RW_US);
    v.paging32(&p, 0);
    let t = v.mmu.translate(&mut v.mem, 0x4000_1123, Access::read()).unwrap();
    assert_eq!(t.gpa, 0x20_5123);
    assert_eq!(t.size, PageSize::Size4K);
    assert_eq!(t.perms, Perms { user: true, writable: true, nx: false });
}

#[test]
fn pse_4m_walk_and_ps_ignored_without_pse() {
    let mut v = vm();
    let mut p = Pager32::new(TABLES);
    p.map_4m(&mut v.mem, 0x8000_0000, 0x40_0000, RW_US);
    v.paging32(&p, cr4::PSE);
    let t = v.mmu.translate(&mut v.mem, 0x8012_3456, Access::read()).unwrap();
    assert_eq!((t.gpa, t.size, t.page_gva), (0x52_3456, PageSize::Size4M, 0x8000_0000));
    // Without CR4.PSE the PS bit is ignored: the PDE points at a page table
    // (frame 0x400000, all zeros here), so the PTE is not present.
    v.mmu.set_cr4(&v.mem, &mut v.win, 0).unwrap();
    assert_eq!(pf_code(v.mmu.translate(&mut v.mem, 0x8012_3456, Access::read())), 0);
}

#[test]
fn pse36_high_bits_and_reserved_bit_21() {
    let mut v = vm();
    let mut p = Pager32::new(TABLES);
    let pde = p.map_4m(&mut v.mem, 0x8000_0000, 0x40_0000, RW_US);
    v.mem.set_u32(pde, v.mem.u32(pde) | (0x3 << 13)); // PA bits 33:32
    v.paging32(&p, cr4::PSE);
    let t = v.mmu.translate(&mut v.mem, 0x8000_0010, Access::read()).unwrap();
    assert_eq!(t.gpa, 0x3_0040_0010);
    v.mem.set_u32(pde, v.mem.u32(pde) | (1 << 21));
    assert_eq!(pf_code(v.mmu.translate(&mut v.mem, 0x8000_0010, Access::read())), pf::P | pf::RSVD);
    // Bit 17 is reserved too with MAXPHYADDR = 36.
    v.mem.set_u32(pde, v.mem.u32(pde) & !(1 << 21) | (1 << 17));
    assert_eq!(pf_code(v.mmu.translate(&mut v.mem, 0x8000_0010, Access::read())), pf::P | pf::RSVD);
}

#[test]
fn pae_4k_and_2m_walks() {
    let mut v = vm();
    let mut p = PagerPae::new(TABLES);
    p.map_4k(&mut v.mem, 0xC000_3000, 0x30_0000, RW_US);
    p.map_2m(&mut v.mem, 0x4020_0000, 0x60_0000, pte::RW);
    v.paging_pae(&p, true);
    let t = v.mmu.translate(&mut v.mem, 0xC000_3ABC, Access::read()).unwrap();
    assert_eq!((t.gpa, t.size), (0x30_0ABC, PageSize::Size4K));
    let t = v.mmu.translate(&mut v.mem, 0x4031_2345, Access::write()).unwrap();
    assert_eq!((t.gpa, t.size, t.page_gva), (0x71_2345, PageSize::Size2M, 0x4020_0000));
    assert!(!t.perms.user);
}

#[test]
fn error_code_bits_32bit() {
    let mut v = vm();
    let mut p = Pager32::new(TABLES);
    p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, pte::US); // user, read-only
    p.map_4k(&mut v.mem, 0x1000_1000, 0x20_1000, pte::RW); // supervisor, writable
    v.paging32(&p, 0);
    let code = |v: &mut common::Vm, gva, a| pf_code(v.mmu.translate(&mut v.mem, gva, a));
    assert_eq!(code(&mut v, 0x2000_0000, Access::read()), 0);
    assert_eq!(code(&mut v, 0x2000_0000, Access::write().user()), pf::W | pf::U);
    assert_eq!(code(&mut v, 0x1000_1000, Access::read().user()), pf::P | pf::U);
    assert_eq!(code(&mut v, 0x1000_0000, Access::write().user()), pf::P | pf::W | pf::U);
    assert_eq!(code(&mut v, 0x1000_0000, Access::write()), pf::P | pf::W, "CR0.WP=1");
    // No NX in 32-bit paging: I/D stays 0 and fetches are never refused.
    assert_eq!(code(&mut v, 0x2000_0000, Access::fetch()), 0);
    assert!(v.mmu.translate(&mut v.mem, 0x1000_1000, Access::fetch()).is_ok());
    let pf = v.mmu.translate(&mut v.mem, 0x2000_0abc, Access::read()).unwrap_err();
    assert_eq!(pf.cr2, 0x2000_0abc);
}

#[test]
fn cr0_wp_governs_supervisor_writes_only() {
    let mut v = vm();
    let mut p = Pager32::new(TABLES);
    p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, pte::US);
    v.paging32(&p, 0);
    v.mmu.set_cr0(&v.mem, &mut v.win, cr0::PE | cr0::PG).unwrap();
    assert!(v.mmu.translate(&mut v.mem, 0x1000_0000, Access::write()).is_ok());
    assert_eq!(pf_code(v.mmu.translate(&mut v.mem, 0x1000_0000, Access::write().user())), pf::P | pf::W | pf::U);
}

#[test]
fn upper_level_rights_are_anded() {
    let mut v = vm();
    let mut p = Pager32::new(TABLES);
    p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, RW_US);
    let pde = p.pde_addr(0x1000_0000);
    v.mem.set_u32(pde, v.mem.u32(pde) & !(pte::US as u32));
    v.paging32(&p, 0);
    assert_eq!(pf_code(v.mmu.translate(&mut v.mem, 0x1000_0000, Access::read().user())), pf::P | pf::U);
    v.mem.set_u32(pde, (v.mem.u32(pde) | pte::US as u32) & !(pte::RW as u32));
    assert_eq!(pf_code(v.mmu.translate(&mut v.mem, 0x1000_0000, Access::write())), pf::P | pf::W);
}

#[test]
fn pae_nx_rsvd_and_id_bits() {
    let mut v = vm();
    let mut p = PagerPae::new(TABLES);
    p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, RW_US | pte::XD);
    let bad = p.map_4k(&mut v.mem, 0x1000_1000, 0x20_1000, RW_US);
    let big = p.map_2m(&mut v.mem, 0x4000_0000, 0x40_0000, RW_US);
    v.paging_pae(&p, true);
    let code = |v: &mut common::Vm, gva, a| pf_code(v.mmu.translate(&mut v.mem, gva, a));
    assert_eq!(code(&mut v, 0x1000_0000, Access::fetch().user()), pf::P | pf::U | pf::ID);
    assert_eq!(code(&mut v, 0x1000_0000, Access::fetch()), pf::P | pf::ID);
    assert_eq!(code(&mut v, 0x2000_0000, Access::fetch()), pf::ID, "I/D on a not-present fetch too");
    assert!(v.mmu.translate(&mut v.mem, 0x1000_0000, Access::write().user()).is_ok());
    // Bit 40 is above MAXPHYADDR: reserved.
    v.mem.set_u64(bad, v.mem.u64(bad) | 1 << 40);
    assert_eq!(code(&mut v, 0x1000_1000, Access::read()), pf::P | pf::RSVD);
    assert_eq!(code(&mut v, 0x1000_1000, Access::write().user()), pf::P | pf::RSVD | pf::W | pf::U);
    // Bit 13 of a 2 MiB PDE is reserved.
    v.mem.set_u64(big, v.mem.u64(big) | 1 << 13);
    assert_eq!(code(&mut v, 0x4000_0000, Access::read()), pf::P | pf::RSVD);
    // Without EFER.NXE, XD is a reserved bit and I/D is never reported.
    v.mmu.set_efer(&v.mem, &mut v.win, 0).unwrap();
    assert_eq!(code(&mut v, 0x1000_0000, Access::read()), pf::P | pf::RSVD);
    assert_eq!(code(&mut v, 0x2000_0000, Access::fetch()), 0);
}

#[test]
fn pdpte_reserved_bits_refuse_the_cr3_load() {
    let mut v = vm();
    let mut p = PagerPae::new(TABLES);
    p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, RW_US);
    v.paging_pae(&p, false);
    let mut q = PagerPae::new(TABLES + 0x10_0000);
    q.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, RW_US);
    v.mem.set_u64(u64::from(q.cr3), v.mem.u64(u64::from(q.cr3)) | pte::RW); // bit 1: reserved in a PDPTE
    let err = v.mmu.set_cr3(&v.mem, &mut v.win, q.cr3).unwrap_err();
    assert!(matches!(err, MmuError::PdpteReserved { index: 0, .. }));
    assert_eq!(v.mmu.regs().cr3, p.cr3, "the faulting MOV CR3 changes nothing");
    // PDPTEs are registers: editing the PDPT takes effect at the next load.
    v.mem.set_u64(u64::from(p.cr3), 0);
    assert!(v.mmu.translate(&mut v.mem, 0x1000_0000, Access::read()).is_ok());
    v.set_cr3(p.cr3);
    assert_eq!(pf_code(v.mmu.translate(&mut v.mem, 0x1000_0000, Access::read())), 0);
}

#[test]
fn accessed_and_dirty_bits_like_hardware() {
    let mut v = vm();
    let mut p = Pager32::new(TABLES);
    let pte_a = p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, RW_US);
    let pde_a = p.pde_addr(0x1000_0000);
    v.paging32(&p, 0);
    let bits = |m: &FakeMem, a| u64::from(m.u32(a)) & (pte::A | pte::D);
    v.mmu.probe(&mut v.mem, 0x1000_0000, Access::write()).unwrap();
    assert_eq!((bits(&v.mem, pde_a), bits(&v.mem, pte_a)), (0, 0), "probe leaves A/D alone");
    let t = v.mmu.translate(&mut v.mem, 0x1000_0000, Access::read()).unwrap();
    assert!(!t.dirty);
    assert_eq!((bits(&v.mem, pde_a), bits(&v.mem, pte_a)), (pte::A, pte::A));
    let t = v.mmu.translate(&mut v.mem, 0x1000_0000, Access::write()).unwrap();
    assert!(t.dirty);
    assert_eq!((bits(&v.mem, pde_a), bits(&v.mem, pte_a)), (pte::A, pte::A | pte::D), "D only in the leaf");
    // A faulting walk sets nothing.
    let pte_b = p.map_4k(&mut v.mem, 0x1040_0000, 0x20_1000, pte::US);
    let pde_b = p.pde_addr(0x1040_0000);
    assert!(v.mmu.translate(&mut v.mem, 0x1040_0000, Access::write().user()).is_err());
    assert_eq!((bits(&v.mem, pde_b), bits(&v.mem, pte_b)), (0, 0));
}

#[test]
fn large_page_dirty_bit_and_pae_ad() {
    let mut v = vm();
    let mut p = PagerPae::new(TABLES);
    let pde = p.map_2m(&mut v.mem, 0x4000_0000, 0x40_0000, pte::RW);
    let pte_a = p.map_4k(&mut v.mem, 0x5000_0000, 0x20_0000, pte::RW);
    v.paging_pae(&p, true);
    v.mmu.translate(&mut v.mem, 0x4000_0000, Access::write()).unwrap();
    assert_eq!(v.mem.u64(pde) & (pte::A | pte::D), pte::A | pte::D);
    v.mmu.translate(&mut v.mem, 0x5000_0000, Access::read()).unwrap();
    assert_eq!(v.mem.u64(pte_a) & (pte::A | pte::D), pte::A);
}

#[test]
fn page_table_outside_ram_reads_as_open_bus() {
    let mut v = vm();
    let p = Pager32::new(TABLES);
    v.mem.set_u32(p.pde_addr(0x1000_0000), 0x7000_0000 | 0x7); // PT beyond RAM
    v.paging32(&p, 0);
    // All-ones PTE: present, frame 0xFFFFF000, not RAM: the emulator's job.
    let t = v.mmu.translate(&mut v.mem, 0x1000_0000, Access::read()).unwrap();
    assert_eq!(t.gpa, 0xFFFF_F000);
    let mut q = PagerPae::new(TABLES + 0x10_0000);
    let pde = q.pde_addr(&mut v.mem, 0x1000_0000);
    v.mem.set_u64(pde, 0x7000_0000 | 0x7);
    v.mmu.set_cr4(&v.mem, &mut v.win, cr4::PAE).unwrap();
    v.set_cr3(q.cr3);
    assert_eq!(pf_code(v.mmu.translate(&mut v.mem, 0x1000_0000, Access::read())), pf::P | pf::RSVD);
}

#[test]
fn enabling_pae_paging_with_a_bad_pdpte_changes_nothing() {
    let mut v = vm();
    let mut p = PagerPae::new(TABLES);
    p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, RW_US);
    v.mem.set_u64(u64::from(p.cr3) + 8, 0x30_0000 | pte::P | 1 << 5); // bit 5: reserved
    v.mmu.set_cr4(&v.mem, &mut v.win, cr4::PAE).unwrap();
    v.set_cr3(p.cr3);
    let err = v.mmu.set_cr0(&v.mem, &mut v.win, cr0::PE | cr0::PG).unwrap_err();
    assert_eq!(err, MmuError::PdpteReserved { index: 1, entry: 0x30_0021 });
    assert_eq!(v.mmu.regs().cr0 & cr0::PG, 0);
    assert_eq!(v.mmu.translate(&mut v.mem, 0x1000_0000, Access::read()).unwrap().gpa, 0x1000_0000);
}
