//! The shadow state against a recording window: hidden faults, D-bit
//! emulation, TLB semantics, code protection, emulate outcomes, batching.

mod common;

use common::{vm, Vm, TABLES};
use shadow_mmu::fake::{MapCall, Pager32};
use shadow_mmu::paging::{cr0, cr4, pf, pte};
use shadow_mmu::{Access, EmulateReason, FaultOutcome, MmuConfig, MmuError, Prot};

const RW_US: u64 = pte::RW | pte::US;
const AD: u64 = pte::A | pte::D;

/// 32-bit paging, CR0.WP, no PSE/PGE; the pager for more mappings.
fn vm32(config: MmuConfig, cr4_bits: u32) -> (Vm, Pager32) {
    let mut v = Vm::new(config);
    let p = Pager32::new(TABLES);
    v.paging32(&p, cr4_bits);
    (v, p)
}

fn emulate(gpa: u64, reason: EmulateReason) -> FaultOutcome {
    FaultOutcome::Emulate { gpa, reason }
}

#[test]
fn read_then_write_emulates_the_dirty_bit() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    let pte_a = p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, RW_US);
    assert_eq!(v.fault(0x1000_0010, Access::read()), FaultOutcome::Resolved);
    assert_eq!(v.win.at(0x1000_0000), Some((0x20_0000, Prot::RX)), "writable but clean: read-only");
    assert_eq!(v.mem.u32(pte_a) as u64 & AD, pte::A);
    assert_eq!(v.fault(0x1000_0010, Access::write()), FaultOutcome::Resolved);
    assert_eq!(v.win.at(0x1000_0000), Some((0x20_0000, Prot::RWX)));
    assert_eq!(v.mem.u32(pte_a) as u64 & AD, AD);
    assert_eq!((v.win.map_calls(), v.win.protect_calls()), (1, 1), "the upgrade is an mprotect");
    let s = v.mmu.stats();
    assert_eq!((s.hidden_faults, s.resolved, s.dirty_upgrades), (2, 2, 1));
}

#[test]
fn first_write_maps_writable_at_once() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, RW_US);
    assert_eq!(v.fault(0x1000_0000, Access::write().user()), FaultOutcome::Resolved);
    assert_eq!(v.win.at(0x1000_0000), Some((0x20_0000, Prot::RWX)));
    assert_eq!(v.win.calls.len(), 1);
}

#[test]
fn guest_page_faults_are_reflected() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, pte::RW);
    let out = v.fault(0x1000_0004, Access::read().user());
    assert_eq!(out, FaultOutcome::GuestPageFault { cr2: 0x1000_0004, error_code: pf::P | pf::U });
    let out = v.fault(0x3000_0000, Access::write());
    assert_eq!(out, FaultOutcome::GuestPageFault { cr2: 0x3000_0000, error_code: pf::W });
    assert_eq!(v.mmu.stats().guest_page_faults, 2);
    assert!(v.win.calls.is_empty());
}

#[test]
fn a_guest_page_fault_drops_the_shadow_of_its_address() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, pte::RW);
    v.fault(0x1000_0000, Access::read());
    // In-process mode: user code hitting the mapped supervisor page would not
    // fault natively; if it does fault (a write to the clean page), the #PF
    // drops the shadow as hardware drops the TLB entry.
    let out = v.fault(0x1000_0000, Access::write().user());
    assert_eq!(out, FaultOutcome::GuestPageFault { cr2: 0x1000_0000, error_code: pf::P | pf::W | pf::U });
    assert_eq!(v.mmu.entry(0x1000_0000), None);
}

#[test]
fn wp0_supervisor_write_to_read_only_page_is_emulated() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    let a = p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, pte::US);
    v.mmu.set_cr0(&v.mem, &mut v.win, cr0::PE | cr0::PG).unwrap();
    assert_eq!(v.fault(0x1000_0008, Access::write()), emulate(0x20_0008, EmulateReason::SupervisorWriteWp0));
    assert_eq!(v.mem.u32(a) as u64 & AD, AD, "the emulated write dirties the page");
    assert_eq!(v.mmu.stats().emulate_wp0_write, 1);
    // With WP=1 the same write is a guest #PF.
    v.mmu.set_cr0(&v.mem, &mut v.win, cr0::PE | cr0::PG | cr0::WP).unwrap();
    assert!(matches!(v.fault(0x1000_0008, Access::write()), FaultOutcome::GuestPageFault { .. }));
}

#[test]
fn invlpg_after_narrowing_a_pte() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    let a = p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, RW_US);
    v.fault(0x1000_0000, Access::write());
    v.mem.set_u32(a, v.mem.u32(a) & !(pte::RW as u32));
    v.invlpg(0x1000_0000);
    assert_eq!(v.win.at(0x1000_0000), None);
    assert_eq!(
        v.fault(0x1000_0000, Access::write()),
        FaultOutcome::GuestPageFault { cr2: 0x1000_0000, error_code: pf::P | pf::W }
    );
    assert_eq!(v.fault(0x1000_0000, Access::read()), FaultOutcome::Resolved);
    assert_eq!(v.win.at(0x1000_0000), Some((0x20_0000, Prot::RX)));
    assert_eq!(v.mmu.stats().invlpg, 1);
}

#[test]
fn stale_shadow_stays_until_cr3_reload() {
    // Without the working set, which would map the new frame at the reload.
    let (mut v, mut p) = vm32(MmuConfig { working_set: false, ..MmuConfig::default() }, 0);
    let a = p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, RW_US | AD);
    v.fault(0x1000_0000, Access::read());
    // The guest retargets the PTE without INVLPG: like a TLB, the window
    // keeps the old frame (no fault happens, nothing is re-walked).
    v.mem.set_u32(a, 0x20_7000 | (RW_US | AD | pte::P) as u32);
    assert_eq!(v.win.at(0x1000_0000).unwrap().0, 0x20_0000);
    v.set_cr3(p.cr3);
    assert_eq!(v.win.at(0x1000_0000), None);
    v.fault(0x1000_0000, Access::read());
    assert_eq!(v.win.at(0x1000_0000).unwrap().0, 0x20_7000);
    assert_eq!(v.mmu.stats().cr3_switches, 2);
}

#[test]
fn invlpg_anywhere_in_a_large_page_drops_all_of_it() {
    let config = MmuConfig { batch_large: 64 << 10, ..MmuConfig::default() };
    let (mut v, mut p) = vm32(config, cr4::PSE);
    let pde = p.map_4m(&mut v.mem, 0x8000_0000, 0x40_0000, RW_US);
    p.map_4k(&mut v.mem, 0x8040_0000, 0x20_0000, RW_US);
    v.fault(0x8000_0000, Access::read());
    v.fault(0x8020_0000, Access::read());
    v.fault(0x8040_0000, Access::read());
    assert_eq!(v.mmu.mapped_pages(), 16 + 16 + 1);
    // The large page maps as before: an INVLPG keeps it (a refault would
    // map the same and set no A/D bit), at the cost of one PDE read.
    v.invlpg(0x803F_F000);
    assert_eq!(v.mmu.mapped_pages(), 16 + 16 + 1);
    assert_eq!(v.mmu.stats().invlpg_kept, 1);
    // The guest narrows it: an address of the large page that has no
    // shadow of its own drops all of it.
    v.mem.set_u32(pde, v.mem.u32(pde) & !(pte::RW as u32));
    v.invlpg(0x803F_F000);
    assert_eq!(v.mmu.mapped_pages(), 1);
    assert!(v.mmu.entry(0x8040_0000).is_some());
    // Both runs go in one unmap: nothing survives between them.
    assert_eq!(v.win.unmap_calls(), 1);
}

#[test]
fn invlpg_keeps_a_large_page_only_while_its_dirty_bit_stays() {
    let config = MmuConfig { batch_large: 64 << 10, ..MmuConfig::default() };
    let (mut v, mut p) = vm32(config, cr4::PSE);
    let pde = p.map_4m(&mut v.mem, 0x8000_0000, 0x40_0000, RW_US);
    v.fault(0x8000_0000, Access::read());
    v.fault(0x8020_0000, Access::write());
    assert_eq!(v.win.at(0x8020_0000).unwrap().1, Prot::RWX);
    // The guest cleans the page (clears D) and flushes: the writable
    // shadows must go, or the next write would not set D again.
    v.mem.set_u32(pde, v.mem.u32(pde) & !(pte::D as u32));
    v.invlpg(0x8000_0000);
    assert_eq!(v.mmu.mapped_pages(), 0);
    assert_eq!(v.fault(0x8020_0000, Access::read()), FaultOutcome::Resolved);
    assert_eq!(v.win.at(0x8020_0000).unwrap().1, Prot::RX, "read-only until the next write");
    v.fault(0x8020_0000, Access::write());
    assert_ne!(v.mem.u32(pde) as u64 & pte::D, 0);
    // Cleared A: dropped too (the next access must set it again).
    v.mem.set_u32(pde, v.mem.u32(pde) & !(pte::A as u32));
    v.invlpg(0x8020_0000);
    assert_eq!(v.mmu.mapped_pages(), 0);
    assert_eq!(v.mmu.stats().invlpg_kept, 0);
}

#[test]
fn global_pages_survive_cr3_only_with_pge() {
    for pge in [true, false] {
        let (mut v, mut p) = vm32(MmuConfig::default(), if pge { cr4::PGE } else { 0 });
        p.map_4k(&mut v.mem, 0xC000_0000, 0x20_0000, pte::RW | pte::G);
        p.map_4k(&mut v.mem, 0x0800_0000, 0x20_1000, RW_US);
        v.fault(0xC000_0000, Access::read());
        v.fault(0x0800_0000, Access::read());
        assert_eq!(v.mmu.entry(0xC000_0000).unwrap().global, pge);
        // Another address space mapping both pages elsewhere.
        let mut q = Pager32::new(TABLES + 0x8_0000);
        q.map_4k(&mut v.mem, 0xC000_0000, 0x30_0000, pte::RW | pte::G | AD);
        q.map_4k(&mut v.mem, 0x0800_0000, 0x30_1000, RW_US | AD);
        v.set_cr3(q.cr3);
        assert_eq!(v.mmu.entry(0xC000_0000).is_some(), pge, "pge={pge}");
        assert_eq!(v.mmu.entry(0x0800_0000), None);
        if pge {
            // INVLPG drops a global page whose entry changed.
            let g = q.pte_addr(&mut v.mem, 0xC000_0000);
            v.mem.set_u32(g, 0x30_2000 | (pte::RW | pte::G | AD | pte::P) as u32);
            v.invlpg(0xC000_0000);
            assert_eq!(v.mmu.entry(0xC000_0000), None);
            v.fault(0xC000_0000, Access::read());
            assert_eq!(v.win.at(0xC000_0000).unwrap().0, 0x30_2000);
        }
    }
}

#[test]
fn toggling_pge_flushes_what_changed_and_keeps_the_rest() {
    let (mut v, mut p) = vm32(MmuConfig { batch_small: 4096, ..MmuConfig::default() }, cr4::PGE);
    p.map_4k(&mut v.mem, 0xC000_0000, 0x20_0000, pte::RW | pte::G | AD);
    p.map_4k(&mut v.mem, 0xC000_1000, 0x20_1000, pte::RW | pte::G | AD);
    p.map_4k(&mut v.mem, 0x0800_0000, 0x20_2000, RW_US | AD);
    for gva in [0xC000_0000, 0xC000_1000, 0x0800_0000] {
        v.fault(gva, Access::read());
    }
    let (flushes, resyncs) = (v.mmu.stats().flushes, v.mmu.stats().global_resyncs);
    // The guest remaps one kernel page without INVLPG, then flushes the
    // whole TLB the way Linux does without INVPCID: PGE off and on.
    let changed = p.pte_addr(&mut v.mem, 0xC000_1000);
    v.mem.set_u32(changed, 0x20_5000 | (pte::RW | pte::G | AD | pte::P) as u32);
    let unmaps = v.win.unmap_calls();
    v.mmu.set_cr4(&v.mem, &mut v.win, 0).unwrap();
    assert_eq!(v.mmu.entry(0xC000_1000), None, "the flush must not keep a stale translation");
    assert_eq!(v.win.at(0xC000_1000), None);
    assert_eq!(v.win.unmap_calls() - unmaps, 1);
    assert!(v.mmu.entry(0xC000_0000).is_some() && v.mmu.entry(0x0800_0000).is_some(), "unchanged pages stay");
    v.mmu.set_cr4(&v.mem, &mut v.win, cr4::PGE).unwrap();
    assert!(v.mmu.entry(0xC000_0000).unwrap().global);
    assert_eq!(v.mmu.stats().flushes, flushes, "no full flush");
    assert_eq!(v.mmu.stats().global_resyncs - resyncs, 2);
    v.win.assert_matches(&v.mmu);
    // A leaf that lost G: the next address space switch checks it.
    let g = p.pte_addr(&mut v.mem, 0xC000_0000);
    v.mem.set_u32(g, 0x20_0000 | (pte::RW | AD | pte::P) as u32);
    v.mmu.set_cr4(&v.mem, &mut v.win, 0).unwrap();
    v.mmu.set_cr4(&v.mem, &mut v.win, cr4::PGE).unwrap();
    assert!(!v.mmu.entry(0xC000_0000).unwrap().global, "demoted");
    let mut q = Pager32::new(TABLES + 0x8_0000);
    q.map_4k(&mut v.mem, 0xC000_0000, 0x30_0000, pte::RW | AD);
    v.set_cr3(q.cr3);
    assert_eq!(v.mmu.entry(0xC000_0000), None, "a non-global page of another address space");
    // Globals kept across PGE off do not survive a MOV CR3 while it is off.
    v.set_cr3(p.cr3);
    v.fault(0xC000_0000, Access::read());
    let g2 = p.pte_addr(&mut v.mem, 0xC000_0000);
    v.mem.set_u32(g2, 0x20_0000 | (pte::RW | pte::G | AD | pte::P) as u32);
    v.invlpg(0xC000_0000);
    v.fault(0xC000_0000, Access::read());
    assert!(v.mmu.entry(0xC000_0000).unwrap().global);
    v.mmu.set_cr4(&v.mem, &mut v.win, 0).unwrap();
    assert!(v.mmu.entry(0xC000_0000).is_some());
    v.set_cr3(q.cr3);
    assert_eq!(v.mmu.entry(0xC000_0000), None, "PGE is off: every page goes at MOV CR3");
    v.win.assert_matches(&v.mmu);
}

#[test]
fn an_address_space_switch_keeps_what_the_new_one_maps_identically() {
    let config = MmuConfig { batch_small: 4096, working_set: false, ..MmuConfig::default() };
    let (mut v, mut p) = vm32(config, cr4::PGE);
    // A: shared text (same frame, same rights), a private page, a page the
    // other maps read-only, one it has not accessed yet.
    for (gva, gpa) in
        [(0x0800_0000, 0x20_0000), (0x0900_0000, 0x20_1000), (0x0A00_0000, 0x20_2000), (0x0B00_0000, 0x20_3000)]
    {
        p.map_4k(&mut v.mem, gva, gpa, RW_US | AD);
        v.fault(gva, Access::write().user());
    }
    let mut q = Pager32::new(TABLES + 0x8_0000);
    q.map_4k(&mut v.mem, 0x0800_0000, 0x20_0000, RW_US | AD); // identical, own page table
    q.map_4k(&mut v.mem, 0x0900_0000, 0x30_1000, RW_US | AD); // another frame
    q.map_4k(&mut v.mem, 0x0A00_0000, 0x20_2000, pte::US | AD); // read-only there
    q.map_4k(&mut v.mem, 0x0B00_0000, 0x20_3000, RW_US | pte::D); // not accessed
                                                                  // The directory entries of B were walked before (A set), as a run would have.
    for gva in [0x0800_0000u32, 0x0900_0000, 0x0A00_0000, 0x0B00_0000] {
        let pde = q.pde_addr(gva);
        v.mem.set_u32(pde, v.mem.u32(pde) | pte::A as u32);
    }
    let (unmaps, protects) = (v.win.unmap_calls(), v.win.protect_calls());
    v.set_cr3(q.cr3);
    assert_eq!(v.win.at(0x0800_0000), Some((0x20_0000, Prot::RWX)), "kept, without a new mapping");
    for gone in [0x0900_0000, 0x0A00_0000, 0x0B00_0000] {
        assert_eq!(v.mmu.entry(gone), None, "{gone:#x}");
        // B has other page tables there: A's shadows are parked, mapped
        // with no rights (any access faults and re-walks B's tables).
        assert_eq!(v.win.at(gone).map(|(_, prot)| prot), Some(Prot::NONE), "{gone:#x}");
    }
    assert_eq!(v.win.unmap_calls(), unmaps, "nothing unmapped");
    assert_eq!(v.win.protect_calls() - protects, 3, "each parked page is its own span");
    let b_pte = q.pte_addr(&mut v.mem, 0x0B00_0000);
    assert_eq!(v.mem.u32(b_pte) as u64 & pte::A, 0, "no A set behind the guest's back");
    assert_eq!(v.mmu.stats().cr3_kept_pages, 1);
    assert_eq!(v.mmu.stats().cr3_parked_pages, 3);
    // A fault on a parked page walks B's tables and replaces it.
    assert_eq!(v.fault(0x0900_0000, Access::read().user()), FaultOutcome::Resolved);
    assert_eq!(v.win.at(0x0900_0000).unwrap().0, 0x30_1000);
    // Back to A: what B kept stays, A's parked shadows come back with
    // their rights (one protect each), the replaced one is checked anew.
    let (maps, protects) = (v.win.map_calls(), v.win.protect_calls());
    v.set_cr3(p.cr3);
    for gva in [0x0800_0000u32, 0x0A00_0000, 0x0B00_0000] {
        assert!(v.mmu.entry(gva).is_some(), "{gva:#x}");
    }
    assert_eq!(v.win.at(0x0A00_0000), Some((0x20_2000, Prot::RWX)));
    assert_eq!(v.mmu.entry(0x0900_0000), None, "B's shadow is not A's: parked in turn");
    assert_eq!(v.win.map_calls(), maps, "no new mapping");
    assert_eq!(v.win.protect_calls() - protects, 3, "two revived, one parked");
    assert_eq!(v.mmu.stats().cr3_unparked_pages, 2);
    // A changed entry in A's table while parked: not revived.
    v.set_cr3(q.cr3);
    let a_pte = p.pte_addr(&mut v.mem, 0x0A00_0000);
    v.mem.set_u32(a_pte, 0x20_5000 | (RW_US | AD | pte::P) as u32);
    v.set_cr3(p.cr3);
    assert_eq!(v.mmu.entry(0x0A00_0000), None);
    assert_eq!(v.win.at(0x0A00_0000), None, "the stale parked shadow is unmapped");
    assert!(v.mmu.entry(0x0B00_0000).is_some());
}

#[test]
fn a_directory_entry_not_yet_accessed_drops_its_pages() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    p.map_4k(&mut v.mem, 0x0800_0000, 0x20_0000, RW_US | AD);
    v.fault(0x0800_0000, Access::read().user());
    let mut q = Pager32::new(TABLES + 0x8_0000);
    q.map_4k(&mut v.mem, 0x0800_0000, 0x20_0000, RW_US | AD);
    v.set_cr3(q.cr3);
    assert_eq!(v.mmu.entry(0x0800_0000), None, "the PDE's A bit would be set by a real walk");
}

#[test]
fn a_large_page_stays_only_under_the_same_directory_entry() {
    let config = MmuConfig { batch_large: 64 << 10, ..MmuConfig::default() };
    let (mut v, mut p) = vm32(config, cr4::PSE);
    p.map_4m(&mut v.mem, 0x8000_0000, 0x40_0000, RW_US);
    v.fault(0x8000_0000, Access::write());
    let pde = v.mem.u32(p.pde_addr(0x8000_0000));
    let mut same = Pager32::new(TABLES + 0x8_0000);
    v.mem.set_u32(same.pde_addr(0x8000_0000), pde);
    v.set_cr3(same.cr3);
    assert!(v.mmu.entry(0x8000_0000).is_some(), "the same dirty 4 MiB page");
    let mut clean = Pager32::new(TABLES + 0x9_0000);
    v.mem.set_u32(clean.pde_addr(0x8000_0000), pde & !(pte::D as u32));
    v.set_cr3(clean.cr3);
    assert_eq!(v.mmu.entry(0x8000_0000), None, "writable shadow, clean page: the next write must set D");
    let _ = (&mut same, &mut clean);
}

#[test]
fn mode_changes_flush_everything() {
    let (mut v, mut p) = vm32(MmuConfig::default(), cr4::PGE);
    p.map_4k(&mut v.mem, 0xC000_0000, 0x20_0000, pte::RW | pte::G);
    for change in 0..3 {
        v.fault(0xC000_0000, Access::read());
        match change {
            0 => v.mmu.set_cr0(&v.mem, &mut v.win, cr0::PE | cr0::PG).unwrap(), // WP off
            1 => v.mmu.set_cr4(&v.mem, &mut v.win, cr4::PGE | cr4::PSE).unwrap(),
            _ => v.mmu.flush_all(&mut v.win).unwrap(),
        }
        assert_eq!(v.mmu.mapped_pages(), 0, "change {change}");
        v.win.assert_matches(&v.mmu);
    }
    // An unrelated CR4 bit (OSFXSR) does not flush.
    v.fault(0xC000_0000, Access::read());
    v.mmu.set_cr4(&v.mem, &mut v.win, cr4::PGE | cr4::PSE | 1 << 9).unwrap();
    assert_eq!(v.mmu.mapped_pages(), 1);
}

#[test]
fn code_page_protection_across_aliases() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    let frame = 0x20_3000u64;
    p.map_4k(&mut v.mem, 0x1000_0000, frame as u32, RW_US);
    p.map_4k(&mut v.mem, 0x5000_0000, frame as u32, RW_US);
    p.map_4k(&mut v.mem, 0x6000_0000, frame as u32, RW_US);
    v.fault(0x1000_0000, Access::write());
    v.fault(0x5000_0000, Access::write());
    assert_eq!(v.mmu.aliases(frame), vec![0x1000_0000, 0x5000_0000]);
    let before = v.win.protect_calls();
    v.mmu.protect_code_page(&mut v.win, frame + 0x123).unwrap();
    assert_eq!(v.win.protect_calls() - before, 2, "one mprotect per writable alias");
    assert!(!v.win.at(0x1000_0000).unwrap().1.write && !v.win.at(0x5000_0000).unwrap().1.write);
    // A write through a new alias goes to the monitor (the walk set D), and
    // the alias is then born read-only although dirty.
    assert_eq!(v.fault(0x6000_0000, Access::write()), emulate(frame, EmulateReason::CodeWrite));
    assert_eq!(v.mmu.entry(0x6000_0000), None);
    v.fault(0x6000_0000, Access::read());
    assert_eq!(v.win.at(0x6000_0000), Some((frame, Prot::RX)));
    // A write through any alias goes to the monitor.
    assert_eq!(v.fault(0x5000_0010, Access::write()), emulate(frame + 0x10, EmulateReason::CodeWrite));
    v.mmu.unprotect_code_page(&mut v.win, frame).unwrap();
    v.win.assert_matches(&v.mmu);
    for alias in [0x1000_0000, 0x5000_0000, 0x6000_0000] {
        assert_eq!(v.win.at(alias), Some((frame, Prot::RWX)), "eagerly writable again: {alias:#x}");
    }
    let s = v.mmu.stats();
    assert_eq!((s.code_pages_protected, s.code_pages_unprotected, s.emulate_code_write), (1, 1, 2));
}

#[test]
fn code_protection_does_not_upgrade_clean_aliases() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    p.map_4k(&mut v.mem, 0x1000_0000, 0x20_3000, RW_US);
    v.fault(0x1000_0000, Access::read()); // clean: RO for D emulation
    v.mmu.protect_code_page(&mut v.win, 0x20_3000).unwrap();
    assert_eq!(v.win.protect_calls(), 0, "already read-only");
    v.mmu.unprotect_code_page(&mut v.win, 0x20_3000).unwrap();
    assert_eq!(v.win.at(0x1000_0000), Some((0x20_3000, Prot::RX)), "still waiting for its first write");
}

#[test]
fn mmio_low_page_and_vmm_area_are_emulated_never_mapped() {
    let (mut v, mut p) = vm32(MmuConfig::default(), cr4::PSE);
    v.mem.holes.push(0xA_0000..0xC_0000);
    p.map_4k(&mut v.mem, 0x1000_0000, 0xB_8000, RW_US); // VGA text
    p.map_4k(&mut v.mem, 0x0000_0000, 0x20_0000, RW_US); // guest page 0
    p.map_4k(&mut v.mem, 0xFFC0_0000, 0x20_1000, pte::RW); // fixmap-like, VMM area
    p.map_4k(&mut v.mem, 0x2000_0000, 0xF00_0000 + 0x100_0000, RW_US); // beyond RAM
    assert_eq!(v.fault(0x1000_0002, Access::write()), emulate(0xB_8002, EmulateReason::Mmio));
    assert_eq!(v.fault(0x0000_0010, Access::read()), emulate(0x20_0010, EmulateReason::LowPage));
    assert_eq!(v.fault(0xFFC0_0004, Access::read()), emulate(0x20_1004, EmulateReason::VmmArea));
    assert_eq!(v.fault(0x2000_0000, Access::read()), emulate(0x1000_0000, EmulateReason::Mmio));
    assert!(v.win.calls.is_empty());
    let s = v.mmu.stats();
    assert_eq!((s.emulate_mmio, s.emulate_low_page, s.emulate_vmm_area, s.emulations()), (2, 1, 1, 4));
}

#[test]
fn paging_off_maps_identity_runs_around_holes() {
    let mut v = Vm::new(MmuConfig { batch_large: 1 << 20, ..MmuConfig::default() });
    v.mem.holes.push(0xA_0000..0x10_0000);
    assert_eq!(v.fault(0x0000_0800, Access::read()), emulate(0x800, EmulateReason::LowPage));
    assert_eq!(v.fault(0x0000_5000, Access::write()), FaultOutcome::Resolved);
    // [4 KiB, 640 KiB): page 0 and the hole stay out.
    assert_eq!(v.win.calls, vec![MapCall::Map { gva: 0x1000, gpa: 0x1000, len: 0x9_F000, prot: Prot::RWX }]);
    assert_eq!(v.fault(0x000B_8000, Access::write()), emulate(0xB_8000, EmulateReason::Mmio));
}

#[test]
fn large_pages_are_mapped_in_one_call_and_clipped_below_the_vmm_area() {
    let config = MmuConfig { vmm_base: 0xFF60_0000, ..MmuConfig::default() };
    let (mut v, mut p) = vm32(config, cr4::PSE);
    p.map_4m(&mut v.mem, 0x8000_0000, 0x40_0000, pte::RW);
    p.map_4m(&mut v.mem, 0xFF40_0000, 0x80_0000, pte::RW);
    for i in 0..16 {
        assert_eq!(v.fault(0x8000_0000 + i * 0x4_0000, Access::read()), FaultOutcome::Resolved);
        if i == 0 {
            assert_eq!(v.mmu.mapped_pages(), 1024);
        }
    }
    assert_eq!(v.win.map_calls(), 1, "one mmap for the whole 4 MiB page");
    v.fault(0xFF40_0000, Access::read());
    assert_eq!(
        v.win.calls.last(),
        Some(&MapCall::Map { gva: 0xFF40_0000, gpa: 0x80_0000, len: 0x20_0000, prot: Prot::RX })
    );
    assert_eq!(v.fault(0xFF60_0000, Access::read()), emulate(0xA0_0000, EmulateReason::VmmArea));
}

#[test]
fn a_write_to_a_clean_large_page_upgrades_all_its_shadows_at_once() {
    let (mut v, mut p) = vm32(MmuConfig::default(), cr4::PSE);
    let pde = p.map_4m(&mut v.mem, 0x8000_0000, 0x40_0000, pte::RW);
    v.mmu.protect_code_page(&mut v.win, 0x40_2000).unwrap();
    v.fault(0x8000_0000, Access::read());
    // While the page is clean the code page has the same rights as the rest.
    assert_eq!(v.win.map_calls(), 1);
    v.fault(0x8010_0000, Access::write());
    assert_eq!(v.mem.u32(pde) as u64 & AD, AD);
    // Two mprotects: before and after the code page (the faulting page is
    // upgraded with its siblings).
    assert_eq!(v.win.protect_calls(), 2);
    assert_eq!(v.win.at(0x8000_2000).unwrap().1, Prot::RX, "code page stays read-only");
    assert_eq!(v.win.at(0x803F_F000).unwrap().1, Prot::RWX);
    assert_eq!(v.mmu.stats().dirty_upgrades, 1);
}

#[test]
fn batching_consecutive_accessed_ptes() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    for i in 0..32u32 {
        p.map_4k(&mut v.mem, 0xC000_0000 + i * 4096, 0x20_0000 + i * 4096, pte::RW | AD);
    }
    for i in 0..32u32 {
        // Only pages the window does not hold fault natively.
        if v.win.at(0xC000_0000 + i * 4096).is_none() {
            v.fault(0xC000_0000 + i * 4096, Access::write());
        }
    }
    assert_eq!(v.win.map_calls(), 2, "two 64 KiB runs instead of 32 mmaps");
    assert_eq!(v.mmu.stats().host_map_calls, 2);
    assert_eq!(v.mmu.stats().pages_mapped, 32);
    assert_eq!(v.mmu.stats().hidden_faults, 2, "the other 30 never faulted");
}

#[test]
fn batching_is_slower_without_it() {
    let config = MmuConfig { batch_small: 4096, ..MmuConfig::default() };
    let (mut v, mut p) = vm32(config, 0);
    for i in 0..32u32 {
        p.map_4k(&mut v.mem, 0xC000_0000 + i * 4096, 0x20_0000 + i * 4096, pte::RW | AD);
    }
    for i in 0..32u32 {
        v.fault(0xC000_0000 + i * 4096, Access::write());
    }
    assert_eq!(v.win.map_calls(), 32);
}

#[test]
fn batching_respects_accessed_dirty_frames_and_rights() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    let base = 0xC000_0000u32;
    let mut ptes = Vec::new();
    for i in 0..16u32 {
        ptes.push(p.map_4k(&mut v.mem, base + i * 4096, 0x20_0000 + i * 4096, RW_US | AD));
    }
    let clear = |v: &mut Vm, i: usize, bits: u64| v.mem.set_u32(ptes[i], v.mem.u32(ptes[i]) & !(bits as u32));
    clear(&mut v, 2, pte::A); // never accessed: must not be pre-mapped (nor get A)
    clear(&mut v, 9, pte::D); // clean: would be read-only, a different prot
    v.mem.set_u32(ptes[12], 0x30_0000 | (RW_US | AD | pte::P) as u32); // not consecutive
    v.fault(base + 5 * 4096, Access::write());
    assert_eq!(
        v.win.calls,
        vec![MapCall::Map { gva: base + 3 * 4096, gpa: 0x20_3000, len: 6 * 4096, prot: Prot::RWX }]
    );
    assert_eq!(v.mem.u32(ptes[2]) as u64 & pte::A, 0);
    assert_eq!(v.mem.u32(ptes[9]) as u64 & pte::D, 0);
    v.fault(base + 10 * 4096, Access::read());
    assert_eq!(v.win.calls[1], MapCall::Map { gva: base + 10 * 4096, gpa: 0x20_A000, len: 2 * 4096, prot: Prot::RWX });
}

#[test]
fn pae_2m_pages_and_nx_shadows() {
    let mut v = common::vm();
    let mut p = shadow_mmu::fake::PagerPae::new(TABLES);
    p.map_2m(&mut v.mem, 0x4000_0000, 0x40_0000, RW_US | pte::XD);
    p.map_4k(&mut v.mem, 0x0804_8000, 0x20_0000, pte::US);
    v.paging_pae(&p, true);
    v.fault(0x4000_1000, Access::write().user());
    assert_eq!(v.win.calls, vec![MapCall::Map { gva: 0x4000_0000, gpa: 0x40_0000, len: 0x20_0000, prot: Prot::RW }]);
    assert_eq!(
        v.fault(0x4000_1000, Access::fetch().user()),
        FaultOutcome::GuestPageFault { cr2: 0x4000_1000, error_code: pf::P | pf::U | pf::ID }
    );
    // The #PF dropped the whole 2 MiB page's shadow, as it drops a TLB entry.
    assert_eq!(v.mmu.mapped_pages(), 0);
    v.fault(0x0804_8000, Access::fetch().user());
    assert_eq!(v.win.at(0x0804_8000), Some((0x20_0000, Prot::RX)));
}

#[test]
fn spurious_faults_are_counted_not_remapped() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, RW_US);
    v.fault(0x1000_0000, Access::read());
    v.fault(0x1000_0000, Access::read());
    assert_eq!(v.mmu.stats().spurious, 1);
    assert_eq!(v.win.calls.len(), 1);
}

#[test]
fn user_isolation_unmaps_supervisor_pages_on_entry_to_cpl3() {
    let config = MmuConfig { user_isolation: true, ..MmuConfig::default() };
    let (mut v, mut p) = vm32(config, 0);
    p.map_4k(&mut v.mem, 0xC000_0000, 0x20_0000, pte::RW | AD);
    p.map_4k(&mut v.mem, 0xC000_1000, 0x20_1000, pte::RW | AD);
    p.map_4k(&mut v.mem, 0x0804_8000, 0x20_2000, RW_US);
    v.fault(0xC000_0000, Access::write());
    v.fault(0x0804_8000, Access::read().user());
    assert_eq!(v.mmu.supervisor_only_runs(), vec![(0xC000_0000, 0x2000)]);
    v.mmu.set_cpl(&mut v.win, 3).unwrap();
    v.win.assert_matches(&v.mmu);
    assert!(v.mmu.supervisor_only_runs().is_empty());
    assert!(v.mmu.entry(0x0804_8000).is_some());
    // At CPL 3 an implicit supervisor access cannot be given a mapping.
    let out = v.mmu.handle_fault(&mut v.mem, &mut v.win, 0xC000_0000, Access::read(), 3).unwrap();
    assert_eq!(out, emulate(0x20_0000, EmulateReason::SupervisorInUserMode));
    assert_eq!(v.mmu.stats().isolation_unmaps, 1);
}

#[test]
fn shared_mode_keeps_supervisor_pages_but_reports_them() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    p.map_4k(&mut v.mem, 0xC000_0000, 0x20_0000, pte::RW);
    v.fault(0xC000_0000, Access::read());
    v.mmu.set_cpl(&mut v.win, 3).unwrap();
    assert_eq!(v.mmu.supervisor_only_runs(), vec![(0xC000_0000, 0x1000)]);
}

#[test]
fn host_errors_propagate_and_leave_no_phantom_shadow() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    p.map_4k(&mut v.mem, 0x1000_0000, 0x20_0000, RW_US);
    v.win.fail_next = true;
    let err = v.mmu.handle_fault(&mut v.mem, &mut v.win, 0x1000_0000, Access::read(), 0).unwrap_err();
    assert!(matches!(err, MmuError::Host(_)));
    assert_eq!(v.mmu.mapped_pages(), 0);
    v.win.assert_matches(&v.mmu);
}

#[test]
fn counter_names_are_unique_and_stable() {
    let v = vm();
    let names: Vec<&str> = v.mmu.stats().counters().iter().map(|c| c.0).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len());
    assert!(names.contains(&"shadow/faults/hidden") && names.contains(&"shadow/host/map"));
}

#[test]
fn invlpg_of_a_small_page_splits_a_batched_run() {
    let (mut v, mut p) = vm32(MmuConfig::default(), 0);
    let mut ptes = Vec::new();
    for i in 0..16u32 {
        ptes.push(p.map_4k(&mut v.mem, 0xC000_0000 + i * 4096, 0x20_0000 + i * 4096, pte::RW | AD));
    }
    v.fault(0xC000_0000, Access::read());
    assert_eq!(v.mmu.mapped_pages(), 16);
    // Unchanged: the INVLPG keeps the shadow.
    v.invlpg(0xC000_5000);
    assert_eq!(v.mmu.mapped_pages(), 16);
    // Retargeted: it goes.
    v.mem.set_u32(ptes[5], 0x20_F000 | (pte::RW | AD | pte::P) as u32);
    v.invlpg(0xC000_5000);
    assert_eq!(v.mmu.mapped_pages(), 15);
    assert_eq!(v.win.calls.last(), Some(&MapCall::Unmap { gva: 0xC000_5000, len: 0x1000 }));
    assert_eq!(v.mmu.stats().invlpg_kept, 1);
}

#[test]
fn pae_batching_reads_wide_neighbours() {
    let mut v = common::vm();
    let mut p = shadow_mmu::fake::PagerPae::new(TABLES);
    for i in 0..8u32 {
        let flags = pte::RW | AD | if i == 6 { pte::XD } else { 0 };
        p.map_4k(&mut v.mem, 0xC000_0000 + i * 4096, 0x20_0000 + u64::from(i) * 4096, flags);
    }
    v.paging_pae(&p, true);
    v.fault(0xC000_2000, Access::read());
    // Pages 0-5 share rights; page 6 is NX (different host rights).
    assert_eq!(v.win.calls, vec![MapCall::Map { gva: 0xC000_0000, gpa: 0x20_0000, len: 6 * 4096, prot: Prot::RWX }]);
    v.fault(0xC000_6000, Access::read());
    assert_eq!(v.win.at(0xC000_6000), Some((0x20_6000, Prot::RW)));
}

#[test]
fn stale_large_page_stays_until_invlpg() {
    let (mut v, mut p) = vm32(MmuConfig::default(), cr4::PSE);
    let pde = p.map_4m(&mut v.mem, 0x8000_0000, 0x40_0000, pte::RW | AD);
    v.fault(0x8000_0000, Access::write());
    v.mem.set_u32(pde, 0);
    assert_eq!(v.win.at(0x8012_3000).unwrap().0, 0x52_3000, "no INVLPG yet: still translated");
    v.invlpg(0x8012_3000);
    assert_eq!(v.mmu.mapped_pages(), 0);
    assert_eq!(v.fault(0x8012_3000, Access::read()), FaultOutcome::GuestPageFault { cr2: 0x8012_3000, error_code: 0 });
}

/// Linux's page-table isolation under PAE: a kernel and a user PDPT share
/// the user page directory; the kernel's 2 MiB page and its 4 KiB data are
/// not in the user one. Switching back and forth keeps the user pages
/// without a per-page check and, without `user_isolation`, the kernel's
/// too (the user tables map nothing there): no host call, no new mapping,
/// no hidden fault. (With `user_isolation` they are parked and revived, as
/// `an_address_space_switch_keeps_what_the_new_one_maps_identically` shows
/// for other tables.)
#[test]
fn page_table_isolation_switches_keep_the_kernel() {
    let mut v = common::Vm::new(MmuConfig { working_set: false, ..MmuConfig::default() });
    let mut k = shadow_mmu::fake::PagerPae::new(TABLES);
    k.map_4k(&mut v.mem, 0x0804_8000, 0x20_0000, RW_US | AD);
    k.map_2m(&mut v.mem, 0xC000_0000, 0x40_0000, pte::RW | AD);
    k.map_4k(&mut v.mem, 0xC060_0000, 0x30_0000, pte::RW | AD);
    // The user PDPT: the same user page directory, no kernel directory.
    let user_cr3 = (TABLES + 0x1_0000) as u32;
    let user_pdpte = v.mem.u64(TABLES);
    v.mem.set_u64(u64::from(user_cr3), user_pdpte);
    v.paging_pae(&k, true);
    for gva in [0x0804_8000u32, 0xC000_0000, 0xC060_0000] {
        assert_eq!(v.fault(gva, Access::write()), FaultOutcome::Resolved, "{gva:#x}");
    }
    // Walked once: the directory entries have A set now.
    let (maps, protects) = (v.win.map_calls(), v.win.protect_calls());
    let checked = v.mmu.stats().cr3_checked_pages;
    for _ in 0..3 {
        v.set_cr3(user_cr3);
        assert!(v.mmu.entry(0x0804_8000).is_some());
        assert_eq!(v.win.at(0xC000_0000), Some((0x40_0000, Prot::RWX)), "kept");
        v.set_cr3(k.cr3);
        assert_eq!(v.win.at(0xC000_0000), Some((0x40_0000, Prot::RWX)));
    }
    assert_eq!(v.win.map_calls(), maps, "no new mapping");
    assert_eq!(v.win.protect_calls(), protects, "no host call at all");
    assert!(v.mmu.stats().cr3_absent_kept_pages > 0);
    // The user page and the kernel's 4 KiB page, once each: they were
    // shadowed after their regions' last snapshots; from then on the
    // snapshots vouch for them.
    assert_eq!(v.mmu.stats().cr3_checked_pages - checked, 2);
    // A guest #PF under the user tables (the kernel has no business there,
    // but a stray access must still fault) drops the kept shadow.
    v.set_cr3(user_cr3);
    assert!(matches!(v.fault(0xC060_0000, Access::read()), FaultOutcome::GuestPageFault { .. }));
    v.set_cr3(k.cr3);
    assert_eq!(v.mmu.entry(0xC060_0000), None);
    // A kernel PTE changed while the user tables were loaded: caught.
    v.fault(0xC060_0000, Access::read());
    v.set_cr3(user_cr3);
    let a = k.pte_addr(&mut v.mem, 0xC060_0000);
    v.mem.set_u64(a, 0x30_1000 | pte::RW | AD | pte::P);
    v.set_cr3(k.cr3);
    assert_eq!(v.win.at(0xC060_0000), None, "stale: unmapped, not revived");
    assert_eq!(v.fault(0xC060_0000, Access::read()), FaultOutcome::Resolved);
    assert_eq!(v.win.at(0xC060_0000).unwrap().0, 0x30_1000);
}

/// The user half of a page-table isolation pair maps a kernel region
/// sparsely, through its own page table (Linux's entry trampoline and
/// cpu_entry_area): the kernel's pages there, absent from that table, stay
/// mapped across the switches with no host call (they used to be parked and
/// revived on every system call: 2 mprotects each way). Once the user table
/// maps one of them, the switch no longer keeps it.
#[test]
fn page_table_isolation_keeps_kernel_pages_the_user_table_leaves_absent() {
    let mut v = common::Vm::new(MmuConfig { working_set: false, ..MmuConfig::default() });
    let mut k = shadow_mmu::fake::PagerPae::new(TABLES);
    k.map_4k(&mut v.mem, 0x0804_8000, 0x20_0000, RW_US | AD);
    k.map_4k(&mut v.mem, 0xC060_0000, 0x30_0000, pte::RW | AD);
    k.map_4k(&mut v.mem, 0xC060_1000, 0x30_1000, pte::RW | AD);
    // The user PDPT: the kernel's user directory, and its own kernel
    // directory mapping one trampoline page of the same 2 MiB region.
    let mut u = shadow_mmu::fake::PagerPae::new(TABLES + 0x2_0000);
    u.map_4k(&mut v.mem, 0xC07F_F000, 0x31_F000, pte::RW | AD);
    let pde = u.pde_addr(&mut v.mem, 0xC060_0000);
    v.mem.set_u64(pde, v.mem.u64(pde) | pte::A);
    let user_pdpte = v.mem.u64(TABLES);
    v.mem.set_u64(u64::from(u.cr3), user_pdpte);
    v.paging_pae(&k, true);
    for gva in [0x0804_8000u32, 0xC060_0000, 0xC060_1000] {
        assert_eq!(v.fault(gva, Access::write()), FaultOutcome::Resolved, "{gva:#x}");
    }
    v.set_cr3(u.cr3);
    v.set_cr3(k.cr3);
    let (maps, protects, unmaps) = (v.win.map_calls(), v.win.protect_calls(), v.mmu.stats().host_unmap_calls);
    let kept = v.mmu.stats().cr3_absent_kept_pages;
    for _ in 0..3 {
        v.set_cr3(u.cr3);
        assert_eq!(v.win.at(0xC060_0000), Some((0x30_0000, Prot::RWX)), "kept under the user tables");
        assert_eq!(v.win.at(0xC060_1000), Some((0x30_1000, Prot::RWX)));
        v.set_cr3(k.cr3);
        assert_eq!(v.win.at(0xC060_1000), Some((0x30_1000, Prot::RWX)));
    }
    assert_eq!(v.win.map_calls(), maps, "no new mapping");
    assert_eq!(v.win.protect_calls(), protects, "no park, no revival");
    assert_eq!(v.mmu.stats().host_unmap_calls, unmaps);
    assert_eq!(v.mmu.stats().cr3_absent_kept_pages - kept, 6, "2 pages, 3 switches to the user tables");
    // The user table now maps one of those addresses to another frame:
    // the old frame must not stay reachable there.
    u.map_4k(&mut v.mem, 0xC060_1000, 0x33_1000, pte::RW | AD);
    v.set_cr3(u.cr3);
    assert_ne!(v.win.at(0xC060_1000).map(|m| m.1), Some(Prot::RWX), "not kept: the user table maps it");
    assert_eq!(v.fault(0xC060_1000, Access::read()), FaultOutcome::Resolved);
    assert_eq!(v.win.at(0xC060_1000).map(|m| m.0), Some(0x33_1000));
    // A kernel PTE changed while the user tables were loaded: caught on
    // the way back.
    v.set_cr3(k.cr3);
    v.fault(0xC060_0000, Access::read());
    v.set_cr3(u.cr3);
    let a = k.pte_addr(&mut v.mem, 0xC060_0000);
    v.mem.set_u64(a, 0x30_2000 | pte::RW | AD | pte::P);
    v.set_cr3(k.cr3);
    assert_ne!(v.win.at(0xC060_0000).map(|m| m.0), Some(0x30_0000), "stale: not kept");
    assert_eq!(v.fault(0xC060_0000, Access::read()), FaultOutcome::Resolved);
    assert_eq!(v.win.at(0xC060_0000).map(|m| m.0), Some(0x30_2000));
}

#[test]
fn supervisor_shadows_stay_across_a_switch_to_tables_that_do_not_map_them() {
    // Page-table isolation: A (the kernel tables) maps a supervisor page
    // and a user page, B (the user tables) maps neither region at all.
    for isolate in [false, true] {
        let (mut v, mut p) = vm32(MmuConfig { batch_small: 4096, user_isolation: isolate, ..MmuConfig::default() }, 0);
        p.map_4k(&mut v.mem, 0xC000_0000, 0x20_0000, pte::RW | AD); // supervisor
        p.map_4k(&mut v.mem, 0x0800_0000, 0x20_1000, RW_US | AD); // user
        v.fault(0xC000_0000, Access::write());
        v.fault(0x0800_0000, Access::write().user());
        let q = Pager32::new(TABLES + 0x8_0000);
        let protects = v.win.protect_calls();
        v.set_cr3(q.cr3);
        if isolate {
            assert_eq!(v.mmu.entry(0xC000_0000), None, "isolate: strict, the kernel page goes");
        } else {
            assert_eq!(v.win.at(0xC000_0000), Some((0x20_0000, Prot::RWX)), "kept, rights and all");
            assert_eq!(v.mmu.stats().cr3_absent_kept_pages, 1);
        }
        // A user page of a region B does not map is never kept: B's user
        // code must fault there (demand paging of its own memory).
        assert_eq!(v.mmu.entry(0x0800_0000), None);
        assert_eq!(v.win.at(0x0800_0000).map(|(_, prot)| prot), Some(Prot::NONE));
        assert!(v.win.protect_calls() > protects);
        // Back to A: the kept page needed nothing, the user page comes back.
        let protects = v.win.protect_calls();
        v.set_cr3(p.cr3);
        assert!(v.mmu.entry(0xC000_0000).is_some() || isolate);
        assert!(v.mmu.entry(0x0800_0000).is_some());
        if !isolate {
            assert_eq!(v.win.protect_calls() - protects, 1, "only the user page's revival");
        }
    }
}

#[test]
fn a_switch_back_maps_the_working_set_of_the_last_run() {
    let (mut v, mut p) = vm32(MmuConfig { batch_small: 4096, ..MmuConfig::default() }, cr4::PGE);
    let mut q = Pager32::new(TABLES + 0x10_0000);
    // A touches two private pages; a third is present but never accessed.
    p.map_4k(&mut v.mem, 0x0800_0000, 0x20_0000, RW_US | AD);
    p.map_4k(&mut v.mem, 0x0800_5000, 0x20_5000, RW_US | pte::A);
    let untouched = p.map_4k(&mut v.mem, 0x0800_9000, 0x20_9000, RW_US);
    // B maps other frames at the same addresses.
    q.map_4k(&mut v.mem, 0x0800_0000, 0x30_0000, RW_US | AD);
    q.map_4k(&mut v.mem, 0x0800_5000, 0x30_5000, RW_US | AD);
    assert_eq!(v.fault(0x0800_0000, Access::write().user()), FaultOutcome::Resolved);
    assert_eq!(v.fault(0x0800_5000, Access::read().user()), FaultOutcome::Resolved);
    v.set_cr3(q.cr3);
    assert_eq!(v.fault(0x0800_0000, Access::read().user()), FaultOutcome::Resolved);
    assert_eq!(v.win.at(0x0800_0000).map(|m| m.0), Some(0x30_0000));
    // Back to A: both pages come back without a fault, with the rights a
    // fault gives (the clean page read-only: D-bit emulation).
    let faults = v.mmu.stats().hidden_faults;
    v.set_cr3(p.cr3);
    assert_eq!(v.win.at(0x0800_0000), Some((0x20_0000, Prot::RWX)));
    assert_eq!(v.win.at(0x0800_5000), Some((0x20_5000, Prot::RX)));
    assert_eq!(v.win.at(0x0800_9000), None, "never accessed: left for its fault");
    assert_eq!(v.mem.u32(untouched) as u64 & pte::A, 0, "no A set behind the guest's back");
    assert_eq!(v.mmu.stats().hidden_faults, faults);
    assert!(v.mmu.stats().working_set_prefetched >= 1);
    // A page A's tables no longer map is not brought back.
    v.set_cr3(q.cr3);
    let a_pte = p.pte_addr(&mut v.mem, 0x0800_0000);
    v.mem.set_u32(a_pte, 0);
    v.set_cr3(p.cr3);
    assert_eq!(v.win.at(0x0800_0000), None);
}

#[test]
fn a_ping_pong_maps_the_other_frame_over_the_old_one() {
    let (mut v, mut p) = vm32(MmuConfig { batch_small: 4096, ..MmuConfig::default() }, cr4::PGE);
    let mut q = Pager32::new(TABLES + 0x10_0000);
    // Two processes of one program: a private page each at the same
    // address (their stacks), and A has one more B does not use.
    p.map_4k(&mut v.mem, 0x0800_0000, 0x20_0000, RW_US | AD);
    p.map_4k(&mut v.mem, 0x0800_3000, 0x20_3000, RW_US | AD);
    q.map_4k(&mut v.mem, 0x0800_0000, 0x30_0000, RW_US | AD);
    q.map_4k(&mut v.mem, 0x0800_3000, 0x30_3000, RW_US | AD);
    for gva in [0x0800_0000, 0x0800_3000] {
        v.fault(gva, Access::write().user());
    }
    v.set_cr3(q.cr3);
    v.fault(0x0800_0000, Access::write().user());
    v.set_cr3(p.cr3);
    v.fault(0x0800_3000, Access::write().user());
    v.win.assert_matches(&v.mmu);
    // To B again: its page comes with one map over A's, no protect to
    // park the region and no unmap first; A's other page is unmapped.
    let (maps, unmaps, protects) = (v.win.map_calls(), v.win.unmap_calls(), v.win.protect_calls());
    let faults = v.mmu.stats().hidden_faults;
    v.set_cr3(q.cr3);
    assert_eq!(v.win.at(0x0800_0000), Some((0x30_0000, Prot::RWX)));
    assert_eq!(v.win.at(0x0800_3000), None, "A's frame must not stay visible to B");
    assert_eq!(v.mmu.entry(0x0800_3000), None);
    assert_eq!(v.win.map_calls() - maps, 1);
    assert_eq!(v.win.unmap_calls() - unmaps, 1, "A's page B does not use");
    assert_eq!(v.win.protect_calls(), protects, "nothing parked");
    assert!(v.mmu.stats().cr3_replaced_pages >= 1);
    v.win.assert_matches(&v.mmu);
    // A page B remembers but its tables no longer map is not left with A's frame.
    v.set_cr3(p.cr3);
    v.fault(0x0800_0000, Access::write().user());
    let b_pte = q.pte_addr(&mut v.mem, 0x0800_0000);
    v.mem.set_u32(b_pte, 0);
    v.set_cr3(q.cr3);
    assert_eq!(v.win.at(0x0800_0000), None);
    assert_eq!(v.mmu.entry(0x0800_0000), None);
    assert_eq!(v.mmu.stats().hidden_faults, faults + 1);
    v.win.assert_matches(&v.mmu);
}
