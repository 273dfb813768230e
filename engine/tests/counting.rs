//! The counting mode (deterministic execution): every block entry charges
//! the block's length to `VcpuPage.budget` flag-free and exits when it goes
//! negative; callout sites and faults tell the monitor how much of the
//! block retired; capped blocks stop at an exact count; the test-only
//! corruption switch changes exactly one instruction class.

mod common;

use common::*;
use engine::callout::CalloutKind;
use engine::vmm_area::vcpu;
use engine::{BlockKey, Config, Wake};
use iced_x86::code_asm::*;
use iced_x86::{Mnemonic, RflagsBits};

const BASE: u32 = 0x0010_0000;

fn counting() -> engine::Engine {
    engine_with(Config { count_insns: true, ..Config::default() })
}

/// The counting mode with address-space switches parking user blocks at
/// once (`--engine nopageguards`).
fn counting_eager() -> engine::Engine {
    engine_with(Config { count_insns: true, user_page_guards: false, ..Config::default() })
}

/// add eax, 1 ; mov ebx, ecx ; mov eax, cr0 ; add ebx, 2 ; sub ecx, 1 ; jnz BASE
fn code() -> Vec<u8> {
    asm32(BASE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.add(eax, 1).unwrap();
        a.mov(ebx, ecx).unwrap();
        a.mov(eax, cr0).unwrap();
        a.add(ebx, 2).unwrap();
        a.sub(ecx, 1).unwrap();
        a.jnz(top).unwrap();
    })
}

#[test]
fn block_entry_charges_its_length_flag_free() {
    let mut mem = Mem::new(BASE, &code());
    let mut e = counting();
    let key = BlockKey::flat32(BASE);
    let entry = e.translate(key, &mut mem).unwrap();
    let n = e.block(&key).unwrap().insns.len();
    assert_eq!(n, 6);
    let ins = tc_insns(&e, &key, entry);
    let l = texts(&ins);
    let budget = format!("gs:[{:#x}]", vcpu::BUDGET);
    assert_eq!(l[1], format!("mov ecx,{budget}"), "{l:?}");
    assert_eq!(l[2], format!("lea ecx,[ecx-{n:#x}]"), "charges the block's {n} instructions: {l:?}");
    assert_eq!(l[3], format!("mov {budget},ecx"));
    assert!(l[4].starts_with("movzx ecx,word ptr gs:"), "{l:?}");
    assert!(l[6].starts_with("jecxz"), "{l:?}");
    // The whole entry sequence leaves the guest's flags alone.
    for i in &ins[..12] {
        assert_eq!(i.rflags_modified() & !RflagsBits::IF, 0, "{} writes flags", text(i));
    }
}

#[test]
fn sites_say_how_much_of_the_block_retired() {
    let mut mem = Mem::new(BASE, &code());
    let mut e = counting();
    let key = BlockKey::flat32(BASE);
    e.translate(key, &mut mem).unwrap();
    let b = e.block(&key).unwrap().clone();
    let sites: Vec<_> = b.sites.clone().map(|id| e.callout_site(id).unwrap().clone()).collect();
    for s in &sites {
        assert_eq!(s.block_insns, 6);
    }
    let entry_poll = sites.iter().find(|s| s.kind == CalloutKind::Poll).unwrap();
    assert_eq!(entry_poll.insns_before, 0);
    let cr_site = sites.iter().find(|s| matches!(s.kind, CalloutKind::Sensitive(_))).unwrap();
    assert_eq!(cr_site.insns_before, 2, "mov eax, cr0 is the third instruction");
    for exit in sites.iter().filter(|s| s.kind == CalloutKind::BlockExit) {
        assert_eq!(exit.insns_before, 6, "both jnz exits retire the whole block");
    }
    // A fault inside the fourth instruction leaves three retired.
    let fourth = &b.insns[3];
    assert_eq!(b.retired_at(fourth.tc_start), 3);
    assert_eq!(b.retired_at(fourth.tc_end - 1), 3);
    assert_eq!(b.retired_at(b.entry), 0);
    assert_eq!(b.retired_at(b.stubs), 6);
}

#[test]
fn capped_blocks_stop_early_and_stay_out_of_the_lookup() {
    let mut mem = Mem::new(BASE, &code());
    let mut e = counting();
    let key = BlockKey::flat32(BASE);
    let full = e.translate(key, &mut mem).unwrap();
    let capped = e.translate_capped(key, 2, &mut mem).unwrap();
    assert_ne!(full, capped);
    assert_eq!(e.lookup(&key), Some(full), "the key still finds the full block");
    let c = e.block_at(capped).unwrap();
    assert_eq!(c.insns.len(), 2);
    assert_eq!(c.exits.len(), 1);
    assert_eq!(c.exits[0].target_eip, c.insns[1].instr.next_ip32(), "falls through to the third instruction");
    // The next capped block reuses the slot: the previous one is gone.
    let again = e.translate_capped(BlockKey::flat32(BASE + 3), 1, &mut mem).unwrap();
    assert_eq!(e.block_at(again).unwrap().tc_start, e.block_at(capped).unwrap().tc_start, "same slot");
    assert_eq!(e.block_at(again).unwrap().key.eip, BASE + 3);
    let capped = again;
    assert_eq!(e.lookup(&key), Some(full));
    // A write to the code page drops both (the capped one must not take
    // the full one's key with it before that).
    for p in e.code_pages() {
        e.invalidate_phys_page(p);
    }
    assert_eq!(e.lookup(&key), None);
    assert!(e.block_at(capped).is_none());
}

#[test]
fn the_corruption_switch_hits_one_class_only() {
    let mut mem = Mem::new(BASE, &code());
    let mut e = engine_with(Config { corrupt: Some(Mnemonic::Add), ..Config::default() });
    let key = BlockKey::flat32(BASE);
    let entry = e.translate(key, &mut mem).unwrap();
    let l = texts(&tc_insns(&e, &key, entry));
    let leas: Vec<_> = l.iter().filter(|t| t.starts_with("lea e") && t.ends_with("+0x1]")).collect();
    assert_eq!(leas, ["lea eax,[eax+0x1]", "lea ebx,[ebx+0x1]"], "after each ADD, nothing else: {l:?}");
}

/// Guest code whose linear pages map `shift` bytes further in physical
/// memory than `Mem` says (another address space after a MOV CR3).
struct Shifted<'a>(&'a mut Mem, u64);

impl engine::GuestCode for Shifted<'_> {
    fn fetch(&mut self, linear: u32, buf: &mut [u8]) -> Result<(), engine::FetchFault> {
        self.0.fetch(linear, buf)
    }
    fn phys_page(&mut self, linear: u32) -> Option<u64> {
        self.0.phys_page(linear).map(|p| p + self.1)
    }
}

#[test]
fn user_blocks_go_when_their_pages_map_elsewhere() {
    use engine::GuestCode;
    let mut mem = Mem::new(BASE, &code());
    mem.at(BASE + 0x1000, &[0x90, 0xC3]); // nop; ret
    let mut e = counting_eager();
    let user = BlockKey { cpl: 3, ..BlockKey::flat32(BASE) };
    let kernel = BlockKey::flat32(BASE + 0x1000);
    e.translate(user, &mut mem).unwrap();
    e.translate(kernel, &mut mem).unwrap();
    assert!(e.revalidate_user_mappings(&mut Shifted(&mut mem, 0)).is_empty(), "same mappings: nothing goes");
    let gone = e.revalidate_user_mappings(&mut Shifted(&mut mem, 0x10_0000));
    assert_eq!(gone, vec![user]);
    assert!(e.lookup(&user).is_none());
    assert!(e.lookup(&kernel).is_some(), "kernel blocks are not the user index's business");
    assert!(mem.phys_page(BASE).is_some());
}

#[test]
fn user_blocks_come_back_when_their_frames_are_mapped_again() {
    let mut mem = Mem::new(BASE, &code());
    let mut e = counting_eager();
    let user = BlockKey { cpl: 3, ..BlockKey::flat32(BASE) };
    let entry = e.translate(user, &mut mem).unwrap();
    let translated = e.stats().blocks_translated;
    // Another address space maps the page elsewhere: the block is parked...
    assert_eq!(e.revalidate_user_mappings(&mut Shifted(&mut mem, 0x10_0000)), vec![user]);
    assert!(e.lookup(&user).is_none());
    // ... a translation there is a new block (other frames, other bytes) ...
    let other = e.translate(user, &mut Shifted(&mut mem, 0x10_0000)).unwrap();
    assert_ne!(other, entry);
    // ... and back in the first address space the parked one returns,
    // untranslated, while the other is parked in turn.
    e.revalidate_user_mappings(&mut Shifted(&mut mem, 0));
    assert_eq!(e.translate(user, &mut mem).unwrap(), entry);
    let s = e.stats();
    assert_eq!(s.blocks_translated, translated + 1, "only the other address space's block was translated");
    assert_eq!((s.blocks_parked, s.blocks_revived), (2, 1));
    // A write to the code drops parked blocks too: nothing stale comes back.
    e.revalidate_user_mappings(&mut Shifted(&mut mem, 0x10_0000));
    let phys = engine::GuestCode::phys_page(&mut mem, BASE).unwrap();
    e.invalidate_phys_page(phys);
    assert_ne!(e.translate(user, &mut mem).unwrap(), entry, "retranslated after the write");
}

#[test]
fn parked_blocks_of_a_page_come_back_together_and_chained() {
    // A jumps to B, B to C (one page); D is on the next page.
    let mut mem = Mem::new(BASE, &[]);
    mem.at(BASE, &[0xEB, 0x0E]); // jmp BASE+0x10
    mem.at(BASE + 0x10, &[0xEB, 0x0E]); // jmp BASE+0x20
    mem.at(BASE + 0x20, &[0xC3]);
    mem.at(BASE + 0x1000, &[0x90, 0xC3]);
    let mut e = counting_eager();
    let key = |eip| BlockKey { cpl: 3, ..BlockKey::flat32(eip) };
    let (a, b, c, d) = (key(BASE), key(BASE + 0x10), key(BASE + 0x20), key(BASE + 0x1000));
    for k in [c, b, a, d] {
        e.translate(k, &mut mem).unwrap();
    }
    assert!(e.block(&a).unwrap().exits.iter().any(|x| x.chained.is_some()), "A chained to B");
    assert_eq!(e.revalidate_user_mappings(&mut Shifted(&mut mem, 0x10_0000)).len(), 4);
    // Back in the first address space, reaching A brings back B and C (its
    // page) with their chains, not D (another page, not reached yet).
    e.translate(a, &mut mem).unwrap();
    assert!(e.lookup(&b).is_some() && e.lookup(&c).is_some());
    assert!(e.lookup(&d).is_none());
    assert!(e.block(&a).unwrap().exits.iter().any(|x| x.chained.is_some()), "A's exit to B is chained again");
    assert!(e.block(&b).unwrap().exits.iter().any(|x| x.chained.is_some()), "and B's to C");
    let s = e.stats();
    assert_eq!((s.blocks_parked, s.blocks_revived, s.blocks_translated), (4, 3, 4));
    // A page whose frame moved brings nothing back.
    e.revalidate_user_mappings(&mut Shifted(&mut mem, 0x10_0000));
    e.translate(d, &mut Shifted(&mut mem, 0x10_0000)).unwrap();
    assert_eq!(e.stats().blocks_revived, 3, "D was translated anew for the other frame");
}

#[test]
fn invlpg_revalidates_only_the_user_blocks_of_its_page() {
    let mut mem = Mem::new(BASE, &code());
    mem.at(BASE + 0x1000, &[0x90, 0xC3]); // nop; ret
    let mut e = counting_eager();
    let a = BlockKey { cpl: 3, ..BlockKey::flat32(BASE) };
    let b = BlockKey { cpl: 3, ..BlockKey::flat32(BASE + 0x1000) };
    e.translate(a, &mut mem).unwrap();
    e.translate(b, &mut mem).unwrap();
    // Every page maps elsewhere now, but INVLPG named only the second.
    let gone = e.revalidate_user_page(BASE + 0x1004, &mut Shifted(&mut mem, 0x10_0000));
    assert_eq!(gone, vec![b]);
    assert!(e.lookup(&a).is_some(), "the other page's block stays until its own INVLPG or MOV CR3");
    assert!(e.revalidate_user_page(BASE + 0x1000, &mut Shifted(&mut mem, 0x10_0000)).is_empty());
    assert_eq!(e.revalidate_user_page(BASE, &mut Shifted(&mut mem, 0x10_0000)), vec![a]);
}

/// Guest code whose linear pages are not mapped at all (a new address
/// space before its first fault there).
struct Unmapped<'a>(&'a mut Mem);

impl engine::GuestCode for Unmapped<'_> {
    fn fetch(&mut self, linear: u32, buf: &mut [u8]) -> Result<(), engine::FetchFault> {
        self.0.fetch(linear, buf)
    }
    fn phys_page(&mut self, _: u32) -> Option<u64> {
        None
    }
}

/// The callout site of `key`'s user-page guard.
fn guard_site(e: &engine::Engine, key: &BlockKey) -> u32 {
    let b = e.block(key).expect("translated");
    b.sites
        .clone()
        .find(|&id| e.callout_site(id).is_some_and(|s| s.kind == CalloutKind::UserPage))
        .expect("a guard site")
}

#[test]
fn address_space_switches_clear_guards_and_keep_user_blocks() {
    let mut mem = Mem::new(BASE, &code());
    mem.at(BASE + 0x1000, &[0x90, 0xC3]); // nop; ret
    let mut e = counting();
    let user = BlockKey { cpl: 3, ..BlockKey::flat32(BASE) };
    let kernel = BlockKey::flat32(BASE + 0x1000);
    let entry = e.translate(user, &mut mem).unwrap();
    e.translate(kernel, &mut mem).unwrap();
    assert!(e.user_guard(BASE), "a translated page is guarded open");
    assert!(e.revalidate_user_mappings(&mut Shifted(&mut mem, 0)).is_empty());
    assert!(e.user_guard(BASE), "same mappings: still open");
    // Another address space maps the page elsewhere: the guard closes, the
    // block stays registered (no parking, no unchaining).
    assert!(e.revalidate_user_mappings(&mut Shifted(&mut mem, 0x10_0000)).is_empty());
    assert!(!e.user_guard(BASE));
    assert_eq!(e.lookup(&user), Some(entry));
    assert!(!e.user_guard(BASE + 0x1000), "kernel pages have no guard");
    // Back: open again, nothing was parked or translated.
    e.revalidate_user_mappings(&mut Shifted(&mut mem, 0));
    assert!(e.user_guard(BASE));
    let s = e.stats();
    assert_eq!((s.blocks_parked, s.blocks_translated, s.guard_refreshes), (0, 2, 3));
    // INVLPG of the page does the same for that page alone.
    e.revalidate_user_page(BASE + 4, &mut Shifted(&mut mem, 0x10_0000));
    assert!(!e.user_guard(BASE));
    e.revalidate_user_page(BASE, &mut Shifted(&mut mem, 0));
    assert!(e.user_guard(BASE));
}

#[test]
fn a_guard_stop_reopens_parks_or_faults_by_what_the_page_maps_now() {
    let mut mem = Mem::new(BASE, &code());
    let mut e = counting();
    let user = BlockKey { cpl: 3, ..BlockKey::flat32(BASE) };
    let entry = e.translate(user, &mut mem).unwrap();
    let site = guard_site(&e, &user);
    assert_eq!(e.callout_site(site).unwrap().block_insns, 0, "a guard stops before the entry charges anything");
    // Not mapped yet (an exec'd child): the guest's fetch fault, the block stays.
    e.revalidate_user_mappings(&mut Unmapped(&mut mem));
    assert!(!e.user_guard(BASE));
    assert_eq!(e.wake_user_block(site, &mut Unmapped(&mut mem)), Wake::Absent(BASE));
    assert_eq!(e.lookup(&user), Some(entry));
    // Mapped to the same frame again: the guard opens.
    assert_eq!(e.wake_user_block(site, &mut mem), Wake::Live);
    assert!(e.user_guard(BASE));
    // Mapped to another frame: the block is parked, a new one translated
    // for that frame, and the switch back revives the first.
    e.revalidate_user_mappings(&mut Shifted(&mut mem, 0x10_0000));
    assert_eq!(e.wake_user_block(site, &mut Shifted(&mut mem, 0x10_0000)), Wake::Stale);
    assert_eq!(e.lookup(&user), None);
    let other = e.translate(user, &mut Shifted(&mut mem, 0x10_0000)).unwrap();
    assert_ne!(other, entry);
    assert!(e.user_guard(BASE));
    e.revalidate_user_mappings(&mut Shifted(&mut mem, 0));
    assert!(!e.user_guard(BASE), "the registered block is the other frame's");
    let other_site = guard_site(&e, &user);
    assert_eq!(e.wake_user_block(other_site, &mut mem), Wake::Stale);
    assert_eq!(e.translate(user, &mut mem).unwrap(), entry, "revived, not translated");
    let s = e.stats();
    assert_eq!((s.blocks_translated, s.blocks_parked, s.blocks_revived, s.guard_stops), (2, 2, 1, 4));
}

#[test]
fn registering_a_block_of_another_frame_parks_the_page_s_old_blocks() {
    // Two blocks on one page; the address space changes and only one is
    // entered: the other must not run from a guard the first reopened.
    let mut mem = Mem::new(BASE, &[]);
    mem.at(BASE, &[0x90, 0xC3]);
    mem.at(BASE + 0x10, &[0x90, 0xC3]);
    let mut e = counting();
    let key = |eip| BlockKey { cpl: 3, ..BlockKey::flat32(eip) };
    let (a, b) = (key(BASE), key(BASE + 0x10));
    e.translate(a, &mut mem).unwrap();
    e.translate(b, &mut mem).unwrap();
    e.revalidate_user_mappings(&mut Shifted(&mut mem, 0x10_0000));
    let site = guard_site(&e, &a);
    assert_eq!(e.wake_user_block(site, &mut Shifted(&mut mem, 0x10_0000)), Wake::Stale);
    assert_eq!((e.lookup(&a), e.lookup(&b)), (None, None), "the whole page's blocks are parked");
    // A block registered on the page for a new frame while old ones are
    // still registered (here: translated directly) parks those first.
    e.revalidate_user_mappings(&mut mem);
    e.translate(a, &mut mem).unwrap(); // revives a and b (page mates)
    assert!(e.lookup(&b).is_some());
    e.translate(key(BASE + 0x20), &mut Shifted(&mut mem, 0x10_0000)).unwrap_or_default();
    assert_eq!((e.lookup(&a), e.lookup(&b)), (None, None), "other frame's blocks parked when a new one registers");
}

#[test]
fn chains_within_a_page_skip_the_guard_and_chains_across_pages_pass_it() {
    let mut mem = Mem::new(BASE, &[]);
    mem.at(BASE, &[0xEB, 0x0E]); // jmp BASE+0x10
    mem.at(BASE + 0x10, &[0xE9, 0xEB, 0x0F, 0x00, 0x00]); // jmp BASE+0x1000
    mem.at(BASE + 0x1000, &[0x90, 0xC3]);
    let mut e = engine();
    let key = |eip| BlockKey { cpl: 3, ..BlockKey::flat32(eip) };
    let (a, b, c) = (key(BASE), key(BASE + 0x10), key(BASE + 0x1000));
    for k in [c, b, a] {
        e.translate(k, &mut mem).unwrap();
    }
    let target = |e: &engine::Engine, k: &BlockKey| e.exit_target(&e.block(k).unwrap().exits[0]);
    let (bb, cb) = (e.block(&b).unwrap().clone(), e.block(&c).unwrap().clone());
    assert!(bb.entry_guarded > bb.entry, "a user block has a guard");
    assert_eq!(target(&e, &a), bb.entry_guarded, "same page: past the guard");
    assert_eq!(target(&e, &b), cb.entry, "another page: through its guard");
    // Kernel blocks have none.
    let k = BlockKey::flat32(BASE + 0x1000);
    e.translate(k, &mut mem).unwrap();
    let kb = e.block(&k).unwrap();
    assert_eq!(kb.entry_guarded, kb.entry);
}

#[test]
fn lookup_entries_survive_context_switches_and_flushes() {
    let mut mem = Mem::new(BASE, &code());
    mem.at(BASE + 0x1000, &[0x90, 0xC3]); // nop; ret
    let mut e = counting();
    let kernel = BlockKey::flat32(BASE + 0x1000);
    let user = BlockKey { cpl: 3, ..BlockKey::flat32(BASE) };
    for _ in 0..3 {
        e.translate(kernel, &mut mem).unwrap();
        e.install_indirect(&kernel).unwrap();
        let entry = e.block(&kernel).unwrap().tc_start;
        assert_eq!(e.table_entry(kernel.eip), entry);
        // User blocks have their own table: entering user code leaves the
        // kernel's entries alone.
        e.enter(user, &mut mem).unwrap();
        e.install_indirect(&user).unwrap();
        assert_eq!(e.table_entry(kernel.eip), entry);
        assert_eq!(e.table_entry_for(3, user.eip), e.block(&user).unwrap().tc_start);
        assert_eq!(e.table_entry_for(3, kernel.eip), e.miss_stub(), "kernel blocks are not in the user table");
        // Another kernel context (a different CS base) does clear the kernel table.
        let other = BlockKey { cs_base: BASE, eip: 0x1000, ..kernel };
        e.enter(other, &mut mem).unwrap();
        assert_eq!(e.table_entry(kernel.eip), e.miss_stub());
        e.flush();
        assert_eq!(e.table_entry_for(3, user.eip), e.miss_stub(), "a flush empties the tables");
    }
}
