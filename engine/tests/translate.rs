//! Translation behaviour, checked on the emitted bytes (disassembled with
//! iced-x86): IDENT copies, callouts, control flow, chaining, recovery.

mod common;

use common::*;
use engine::callout::{CalloutKind, MISS_SITE_ID};
use engine::classify::{Flow, Sensitive};
use engine::vmm_area::{vcpu, LOOKUP_TABLE};
use engine::{BlockKey, Config, EngineError};
use iced_x86::code_asm::*;
use iced_x86::{Decoder, DecoderOptions, Mnemonic, RflagsBits};

const BASE: u32 = 0x0010_0000;

fn gs_off(off: u32) -> String {
    format!("gs:[{off:#x}]")
}

/// The id stored by the callout sequence starting at `lines[at]`.
fn callout_id_at(insns: &[iced_x86::Instruction], at: usize) -> u32 {
    insns[at].immediate32()
}

#[test]
fn sensitive_block_ident_bytes_callouts_and_inline_if() {
    // mov eax, ebx ; cli ; sti ; nop ; pushfd ; mov eax, cr0 ; add eax, 1 ; jmp next
    let code = asm32(BASE, |a| {
        let mut next = a.create_label();
        a.mov(eax, ebx).unwrap();
        a.cli().unwrap();
        a.sti().unwrap();
        a.nop().unwrap();
        a.pushfd().unwrap();
        a.mov(eax, cr0).unwrap();
        a.add(eax, 1).unwrap();
        a.jmp(next).unwrap();
        a.set_label(&mut next).unwrap();
        a.nop().unwrap();
    });
    let mut mem = Mem::new(BASE, &code);
    let mut e = engine();
    let key = BlockKey::flat32(BASE);
    let entry = e.translate(key, &mut mem).unwrap();
    let b = e.block(&key).unwrap().clone();
    assert_eq!(b.insns.len(), 8, "the block ends at the jmp");
    let ins = tc_insns(&e, &key, entry);
    let l = texts(&ins);

    // Block entry: flag-free poll of VcpuPage.poll.
    assert_eq!(l[0], format!("mov {},ecx", gs_off(vcpu::scratch(0))));
    assert_eq!(l[1], format!("mov ecx,{}", gs_off(vcpu::POLL)));
    assert!(l[2].starts_with("jecxz"), "{l:?}");

    // IDENT instructions are the guest's bytes.
    for g in b.insns.iter().filter(|g| g.disposition == engine::mangle::Disposition::Ident) {
        let tc = &e.block_bytes(&key).unwrap()[(g.tc_start - b.tc_start) as usize..(g.tc_end - b.tc_start) as usize];
        // (The STI shadow's interrupt check follows the nop in its range.)
        assert_eq!(&tc[..g.bytes.len()], &g.bytes[..], "{}", text(&g.instr));
    }
    let mov = find(&l, 0, "mov eax,ebx");
    // CLI / STI: one store each to the virtual IF, no exit.
    assert_eq!(l[mov + 1], format!("mov dword ptr {},0x0", gs_off(vcpu::VIF)));
    assert_eq!(l[mov + 2], format!("mov dword ptr {},0x200", gs_off(vcpu::VIF)));
    // The STI shadow: nop runs, then irq_pending is checked.
    assert_eq!(l[mov + 3], "nop");
    assert_eq!(l[mov + 5], format!("mov ecx,{}", gs_off(vcpu::VIF)));
    let chk = find(&l, mov + 4, &format!("mov ecx,{}", gs_off(vcpu::IRQ_PENDING)));
    assert_eq!(chk, mov + 7);
    let poll = e.callout_site(ins[chk + 3].immediate32()).unwrap();
    assert_eq!(poll.kind, CalloutKind::Poll);
    assert_eq!(poll.guest_eip, b.insns[3].instr.next_ip32(), "after the shadowed nop");
    // PUSHFD: real flags with the virtual IF/IOPL, restored with popfd.
    let pf = find(&l, chk, "pushfd");
    let popfd = find(&l, pf, "popfd");
    assert_eq!(l[popfd + 1], "push ecx");
    // MOV EAX, CR0: callout with a resume point.
    let co = find(&l, popfd, &format!("mov dword ptr {},", gs_off(vcpu::CALLOUT_ID)));
    assert_eq!(l[co + 1], format!("jmp far fword ptr {}", gs_off(vcpu::EXIT_FAR)));
    let site = e.callout_site(callout_id_at(&ins, co)).unwrap().clone();
    assert_eq!(site.kind, CalloutKind::Sensitive(Sensitive::MovFromCr));
    let movcr = b.insns[5].instr;
    assert_eq!(site.guest_eip, movcr.ip32());
    assert_eq!(site.next_eip, movcr.next_ip32());
    assert_eq!(site.instruction.code(), iced_x86::Code::Mov_r32_cr);
    assert_eq!(site.resume_tc, Some(ins[co + 1].next_ip32()));
    assert_eq!(l[co + 2], "add eax,0x1");
    // jmp: a jump to this block's exit stub, a BlockExit callout.
    let j = &ins[co + 3];
    assert_eq!(j.mnemonic(), Mnemonic::Jmp);
    let stub = j.near_branch32();
    assert_eq!(stub, b.exits[0].stub);
    let stub_ins = tc_insns(&e, &key, stub);
    let exit = e.callout_site(stub_ins[0].immediate32()).unwrap();
    assert_eq!(exit.kind, CalloutKind::BlockExit);
    assert_eq!(exit.next_eip, BASE + code.len() as u32 - 1);
}

#[test]
fn call_pushes_the_guest_return_address_and_ret_looks_up() {
    let code = asm32(BASE, |a| {
        let mut f = a.create_label();
        a.call(f).unwrap();
        a.set_label(&mut f).unwrap();
        a.ret().unwrap();
    });
    let mut mem = Mem::new(BASE, &code);
    let mut e = engine_with(Config { poll_at_block_entry: false, ..Config::default() });
    let key = BlockKey::flat32(BASE);
    let entry = e.translate(key, &mut mem).unwrap();
    let l = texts(&tc_insns(&e, &key, entry));
    assert_eq!(l[0], format!("push {:#x}", BASE + 5), "guest return address, not a TC address");
    assert!(l[1].starts_with("jmp "));
    assert_eq!(e.block(&key).unwrap().exits[0].target_eip, BASE + 5);

    let rkey = key.with_eip(BASE + 5);
    let rentry = e.translate(rkey, &mut mem).unwrap();
    let r = texts(&tc_insns(&e, &rkey, rentry));
    assert_eq!(
        &r[..5],
        &[
            format!("mov {},ecx", gs_off(vcpu::scratch(0))),
            "pop ecx".to_string(),
            format!("mov {},ecx", gs_off(vcpu::CALLOUT_TARGET)),
            "movzx ecx,cx".to_string(),
            format!("jmp dword ptr gs:[ecx*4+{LOOKUP_TABLE:#x}]"),
        ]
    );
    // Eager chaining: the call's exit was translated before the target?
    // No: the target was translated after, so the exit still aims at its stub.
    let b = e.block(&key).unwrap();
    assert_eq!(e.exit_target(&b.exits[0]), b.exits[0].stub);
}

#[test]
fn ret_imm_uses_lea_and_16bit_stack_uses_sp() {
    let code = [0xC2, 0x08, 0x00]; // ret 8
    let mut mem = Mem::new(BASE, &code);
    let mut e = engine_with(Config { poll_at_block_entry: false, ..Config::default() });
    let key = BlockKey::flat32(BASE);
    let entry = e.translate(key, &mut mem).unwrap();
    let l = texts(&tc_insns(&e, &key, entry));
    assert_eq!(l[1], "pop ecx");
    assert_eq!(l[2], "lea esp,[esp+0x8]");
    let k16 = BlockKey { flags: 0, ..key };
    let entry = e.translate(k16, &mut mem).unwrap();
    let l = texts(&tc_insns(&e, &k16, entry));
    assert_eq!(l[2], "lea sp,[esp+0x8]");
}

#[test]
fn indirect_jmp_and_call_load_the_operand_flag_free() {
    // jmp eax ; (next block) call dword [ebx+4]
    let mut mem = Mem::new(BASE, &[0xFF, 0xE0]);
    mem.at(BASE + 0x100, &[0xFF, 0x53, 0x04]);
    let mut e = engine_with(Config { poll_at_block_entry: false, ..Config::default() });
    let ka = BlockKey::flat32(BASE);
    let entry = e.translate(ka, &mut mem).unwrap();
    let l = texts(&tc_insns(&e, &ka, entry));
    assert_eq!(l[1], "mov ecx,eax");
    assert_eq!(l[2], format!("mov {},ecx", gs_off(vcpu::CALLOUT_TARGET)));
    let kb2 = ka.with_eip(BASE + 0x100);
    let entry = e.translate(kb2, &mut mem).unwrap();
    let l = texts(&tc_insns(&e, &kb2, entry));
    assert_eq!(l[1], "mov ecx,[ebx+0x4]");
    assert_eq!(l[2], format!("push {:#x}", BASE + 0x103));
    assert!(l[5].starts_with("jmp dword ptr gs:[ecx*4+"));
}

#[test]
fn lookup_table_entries_check_their_guest_eip_and_are_cleared_on_invalidation() {
    let mut mem = Mem::new(BASE, &[0x90, 0xC3]);
    let mut e = engine();
    let key = BlockKey::flat32(BASE);
    e.enter(key, &mut mem).unwrap();
    assert_eq!(e.table_entry(BASE), e.miss_stub());
    e.install_indirect(&key).unwrap();
    let b = e.block(&key).unwrap().clone();
    assert_eq!(e.table_entry(BASE), b.tc_start);
    let l = texts(&tc_insns(&e, &key, b.tc_start));
    assert_eq!(l[0], format!("mov ecx,{}", gs_off(vcpu::CALLOUT_TARGET)));
    assert_eq!(l[1], format!("lea ecx,[ecx-{BASE:#x}]"));
    assert!(l[2].starts_with("jecxz"), "{l:?}");
    assert_eq!(l[3], format!("jmp {:#x}", e.miss_stub()));
    assert_eq!(l[4], format!("mov ecx,{}", gs_off(vcpu::scratch(0))));
    // The miss stub is a callout of kind IndirectMiss.
    assert_eq!(e.callout_site(MISS_SITE_ID).unwrap().kind, CalloutKind::IndirectMiss);

    let dropped = e.invalidate_phys_page(u64::from(BASE) + PHYS_OFFSET);
    assert_eq!(dropped, vec![key]);
    assert_eq!(e.table_entry(BASE), e.miss_stub());
    assert!(e.lookup(&key).is_none());
    assert_eq!(e.stats().blocks_invalidated, 1);
}

/// Where the indirect-entry prologue of `key`'s block sends a target that
/// is not its own (its fourth instruction: `jmp X`).
fn mismatch_target(e: &engine::Engine, key: &BlockKey) -> String {
    let start = e.block(key).unwrap().tc_start;
    texts(&tc_insns(e, key, start))[3].clone()
}

#[test]
fn blocks_sharing_a_lookup_slot_form_a_chain_that_invalidation_mends() {
    // Five one-instruction blocks whose EIPs share their low 16 bits.
    let mut mem = Mem::new(BASE, &[]);
    mem.data.resize(0x5_0000, 0x90);
    let keys: Vec<BlockKey> = (0..5).map(|i| BlockKey::flat32(BASE + i * 0x1_0000)).collect();
    for k in &keys {
        mem.at(k.eip, &[0xC3]);
    }
    let mut e = engine();
    for k in &keys[..3] {
        e.enter(*k, &mut mem).unwrap();
        e.install_indirect(k).unwrap();
    }
    let start = |e: &engine::Engine, i: usize| e.block(&keys[i]).unwrap().tc_start;
    let jmp = |t: u32| format!("jmp {t:#x}");
    // The last installed heads the slot; each mismatch leads to the one before.
    assert_eq!(e.table_entry(BASE), start(&e, 2));
    assert_eq!(mismatch_target(&e, &keys[2]), jmp(start(&e, 1)));
    assert_eq!(mismatch_target(&e, &keys[1]), jmp(start(&e, 0)));
    assert_eq!(mismatch_target(&e, &keys[0]), jmp(e.miss_stub()));
    assert_eq!(e.stats().indirect_conflicts, 2);

    // Dropping the middle block joins its neighbours.
    e.invalidate_phys_page(u64::from(keys[1].eip) + PHYS_OFFSET);
    assert_eq!(mismatch_target(&e, &keys[2]), jmp(start(&e, 0)));
    // Dropping the head makes the next one the table's entry.
    e.invalidate_phys_page(u64::from(keys[2].eip) + PHYS_OFFSET);
    assert_eq!(e.table_entry(BASE), start(&e, 0));
    assert_eq!(mismatch_target(&e, &keys[0]), jmp(e.miss_stub()));

    // A chain holds at most four blocks: the oldest falls out.
    for k in [keys[1], keys[2], keys[3], keys[4]] {
        e.enter(k, &mut mem).unwrap();
        e.install_indirect(&k).unwrap();
    }
    assert_eq!(e.table_entry(BASE), start(&e, 4));
    assert_eq!(mismatch_target(&e, &keys[4]), jmp(start(&e, 3)));
    assert_eq!(mismatch_target(&e, &keys[3]), jmp(start(&e, 2)));
    assert_eq!(mismatch_target(&e, &keys[2]), jmp(start(&e, 1)));
    assert_eq!(mismatch_target(&e, &keys[1]), jmp(e.miss_stub()));
    assert_eq!(mismatch_target(&e, &keys[0]), jmp(e.miss_stub()), "out of the chain");
    // Installing a chained block again moves it to the front, once.
    e.install_indirect(&keys[2]).unwrap();
    assert_eq!(e.table_entry(BASE), start(&e, 2));
    assert_eq!(mismatch_target(&e, &keys[2]), jmp(start(&e, 4)));
    assert_eq!(mismatch_target(&e, &keys[3]), jmp(start(&e, 1)));

    // A flush empties the table and cuts every chain.
    e.flush();
    assert_eq!(e.table_entry(BASE), e.miss_stub());
}

#[test]
fn chaining_patches_the_jump_and_invalidation_unpatches_it() {
    // Block A (page 0): jmp B ; block B (page 1): jmp A
    let mut mem = Mem::new(BASE, &[]);
    let (a, b) = (BASE, BASE + 0x1000);
    mem.at(a, &[0xE9, 0xFB, 0x0F, 0x00, 0x00]); // jmp a+0x1000
    mem.at(b, &[0xE9, 0xFB, 0xEF, 0xFF, 0xFF]); // jmp a
    let mut e = engine();
    let ka = BlockKey::flat32(a);
    let kb = ka.with_eip(b);
    e.translate(ka, &mut mem).unwrap();
    let exit = e.block(&ka).unwrap().exits[0];
    assert_eq!(exit.target_eip, b);
    assert_eq!(e.exit_target(&exit), exit.stub);
    let site = e.callout_site(exit.site).unwrap().clone();
    assert_eq!(site.kind, CalloutKind::BlockExit);
    assert!(matches!(e.chain(site.id), Err(EngineError::NotTranslated(_))));

    // The monitor's BlockExit handling: translate the target, chain.
    let eb = e.translate(kb, &mut mem).unwrap();
    assert_eq!(e.chain(site.id).unwrap(), eb);
    let exit = e.block(&ka).unwrap().exits[0];
    assert_eq!(e.exit_target(&exit), eb);
    assert!(exit.chained.is_some());
    // B's exit to A was chained eagerly (A already translated).
    let back = e.block(&kb).unwrap().exits[0];
    assert_eq!(e.exit_target(&back), e.lookup(&ka).unwrap());
    assert_eq!(e.block(&kb).unwrap().incoming.len(), 1);

    // A write to B's page: B dropped, A's jump back to its stub.
    assert_eq!(e.invalidate_phys_page(u64::from(b) + PHYS_OFFSET), vec![kb]);
    let exit = e.block(&ka).unwrap().exits[0];
    assert_eq!(e.exit_target(&exit), exit.stub);
    assert!(exit.chained.is_none());
    assert!(e.block(&ka).unwrap().incoming.is_empty());
    let s = e.stats();
    assert_eq!((s.chains_patched, s.chains_unpatched), (2, 1));
    // Sites of the dropped block have no resume point any more.
    assert!(matches!(e.chain(back.site), Err(EngineError::StaleSite(_))));
}

#[test]
fn chaining_can_be_switched_off() {
    let mut mem = Mem::new(BASE, &[0xEB, 0x00, 0x90, 0xC3]); // jmp +0
    let mut e = engine_with(Config { chaining: false, ..Config::default() });
    let k = BlockKey::flat32(BASE);
    e.translate(k, &mut mem).unwrap();
    let t = e.translate(k.with_eip(BASE + 2), &mut mem).unwrap();
    let x = e.block(&k).unwrap().exits[0];
    assert_eq!(e.chain(x.site).unwrap(), t);
    assert_eq!(e.exit_target(&e.block(&k).unwrap().exits[0]), x.stub);
}

#[test]
fn recover_maps_every_tc_byte_to_a_guest_eip() {
    let code = asm32(BASE, |a| {
        let mut t = a.create_label();
        a.mov(eax, dword_ptr(ebx)).unwrap();
        a.cli().unwrap();
        a.mov(eax, dword_ptr(ebx).gs()).unwrap();
        a.pushfd().unwrap();
        a.popfd().unwrap();
        a.mov(eax, cr3).unwrap();
        a.je(t).unwrap();
        a.set_label(&mut t).unwrap();
        a.nop().unwrap();
    });
    let mut mem = Mem::new(BASE, &code);
    let mut e = engine();
    let key = BlockKey::flat32(BASE);
    e.translate(key, &mut mem).unwrap();
    let b = e.block(&key).unwrap().clone();
    let eips: Vec<u32> =
        b.insns.iter().map(|g| g.instr.ip32()).chain([b.insns.last().unwrap().instr.next_ip32()]).collect();
    for tc in b.tc_start..b.tc_start + b.tc_len {
        let r = e.recover(tc).unwrap_or_else(|| panic!("no recovery for {tc:#x}"));
        assert!(eips.contains(&r.guest_eip), "{tc:#x} -> {:#x}", r.guest_eip);
    }
    // Inside each guest instruction's translation, the faulting points map
    // to that instruction; IDENT bytes map exactly with nothing spilled.
    for g in &b.insns {
        let r = e.recover(g.tc_start).unwrap();
        assert_eq!(r.guest_eip, g.instr.ip32(), "{}", text(&g.instr));
        assert!(r.exact && r.restore.is_empty());
    }
    // The GS-prefixed load runs with the guest's GS.
    let gsl = &b.insns[2];
    let ins = tc_insns(&e, &key, gsl.tc_start);
    assert_eq!(text(&ins[0]), format!("mov gs,cs:[{:#x}]", VMM + vcpu::GUEST_GS_SEL));
    assert_eq!(text(&ins[1]), "mov eax,gs:[ebx]");
    assert_eq!(text(&ins[2]), format!("mov gs,cs:[{:#x}]", VMM + vcpu::VMM_GS_SEL));
    let r = e.recover(ins[1].ip32()).unwrap();
    assert!(r.gs_is_guest && r.exact);
    assert_eq!(r.guest_eip, gsl.instr.ip32());
    assert!(!e.recover(ins[0].ip32()).unwrap().gs_is_guest);
    // POPF's load from the stack may fault: ECX is in scratch then.
    let popf = &b.insns[4];
    let ins = tc_insns(&e, &key, popf.tc_start);
    assert_eq!(text(&ins[1]), "mov ecx,[esp]");
    let r = e.recover(ins[1].ip32()).unwrap();
    assert_eq!((r.guest_eip, r.exact), (popf.instr.ip32(), true));
    assert_eq!(r.restore, vec![(iced_x86::Register::ECX, 0)]);
    // The exit stubs: the guest is at the branch target.
    let stub = b.exits[0].stub;
    assert_eq!(e.recover(stub).unwrap().guest_eip, b.exits[0].target_eip);
    // The miss stub: the guest EIP is the lookup target.
    assert!(e.recover(e.miss_stub()).unwrap().eip_is_callout_target);
    assert!(e.recover(b.tc_start + b.tc_len + 0x10_0000).is_none());
}

#[test]
fn emitted_sequences_preserve_guest_flags() {
    // Nothing here modifies flags in the guest's own semantics.
    let code = asm32(BASE, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.mov(eax, ebx).unwrap();
        a.cli().unwrap();
        a.sti().unwrap();
        a.lea(esi, dword_ptr(esi + 4)).unwrap();
        a.mov(eax, cr0).unwrap();
        a.mov(ecx, dword_ptr(ebx).gs()).unwrap();
        a.loop_(l).unwrap();
    });
    let mut mem = Mem::new(BASE, &code);
    mem.at(BASE + 0x200, &[0xFF, 0x14, 0x24]); // call [esp]
    mem.at(BASE + 0x300, &[0xC2, 0x04, 0x00]); // ret 4
    let mut e = engine_with(Config { count_indirect_hits: true, ..Config::default() });
    for eip in [BASE, BASE + 0x200, BASE + 0x300] {
        let key = BlockKey::flat32(eip);
        e.translate(key, &mut mem).unwrap();
        e.install_indirect(&key).unwrap();
        let b = e.block(&key).unwrap();
        for i in tc_insns(&e, &key, b.tc_start) {
            let w = i.rflags_modified() & !RflagsBits::IF;
            assert_eq!(w, 0, "{} writes flags", text(&i));
        }
    }
}

#[test]
fn loop_keeps_its_counter_semantics() {
    let code = asm32(BASE, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.nop().unwrap();
        a.loop_(l).unwrap();
    });
    let mut mem = Mem::new(BASE, &code);
    let mut e = engine_with(Config { poll_at_block_entry: false, ..Config::default() });
    let key = BlockKey::flat32(BASE);
    let entry = e.translate(key, &mut mem).unwrap();
    let ins = tc_insns(&e, &key, entry);
    assert_eq!(text(&ins[0]), "nop");
    assert_eq!(ins[1].code(), iced_x86::Code::Loop_rel8_32_ECX);
    assert_eq!(ins[1].near_branch32(), ins[2].next_ip32(), "taken skips the fall-through exit");
    let b = e.block(&key).unwrap();
    assert_eq!(b.exits.len(), 2);
    // The loop jumps to itself: the taken exit got chained eagerly.
    assert_eq!(b.exits[1].target_eip, BASE);
    assert_eq!(e.exit_target(&b.exits[1]), entry);
    assert_eq!(b.exits[0].target_eip, BASE + 3);
}

#[test]
fn sixteen_bit_block_is_reencoded_for_the_32bit_tc() {
    // 16-bit: mov ax, bx ; add ax, [bx+si] ; push ax ; call +0 ; retn
    let code = [0x89, 0xD8, 0x03, 0x00, 0x50, 0xE8, 0x00, 0x00, 0xC3];
    let mut mem = Mem::new(0x7C00, &code);
    let mut e = engine_with(Config { poll_at_block_entry: false, ..Config::default() });
    let key = BlockKey { eip: 0x7C00, cs_base: 0, cs32: false, cpl: 0, flags: 0 };
    let entry = e.translate(key, &mut mem).unwrap();
    let b = e.block(&key).unwrap();
    assert_eq!(b.insns.len(), 4, "ends at the call");
    let l = texts(&tc_insns(&e, &key, entry));
    assert_eq!(l[0], "mov ax,bx");
    assert_eq!(l[1], "add ax,[bx+si]");
    assert_eq!(l[2], "push ax");
    assert!(l[3].ends_with("push 0x7c08"), "16-bit return address");
    assert_eq!(tc_insns(&e, &key, entry)[3].code(), iced_x86::Code::Push_imm16);
    assert_eq!(e.block_bytes(&key).unwrap()[(entry - b.tc_start) as usize..][..3], [0x66, 0x89, 0xD8]);
    let kb2 = key.with_eip(0x7C08);
    let entry = e.translate(kb2, &mut mem).unwrap();
    let l = texts(&tc_insns(&e, &kb2, entry));
    assert_eq!(l[1], "pop cx");
    assert_eq!(l[2], "movzx ecx,cx");
}

#[test]
fn cpl3_blocks_turn_privileged_instructions_into_gp() {
    let code = asm32(BASE, |a| {
        a.cli().unwrap();
        a.mov(eax, cr0).unwrap();
        a.hlt().unwrap();
    });
    let mut mem = Mem::new(BASE, &code);
    let mut e = engine();
    let key = BlockKey { cpl: 3, ..BlockKey::flat32(BASE) };
    e.translate(key, &mut mem).unwrap();
    let b = e.block(&key).unwrap().clone();
    let kinds: Vec<CalloutKind> = b.sites.clone().filter_map(|id| e.callout_site(id)).map(|s| s.kind).collect();
    // CLI at CPL 3 depends on IOPL: a callout the monitor checks.
    assert!(kinds.contains(&CalloutKind::Sensitive(Sensitive::Cli)));
    assert!(kinds.contains(&CalloutKind::GeneralProtection));
    let gp =
        b.sites.clone().filter_map(|id| e.callout_site(id)).find(|s| s.kind == CalloutKind::GeneralProtection).unwrap();
    assert_eq!(gp.instruction.code(), iced_x86::Code::Mov_r32_cr);
    assert_eq!(gp.resume_tc, None);
}

#[test]
fn far_and_interrupt_control_flow_are_callouts() {
    for (bytes, flow) in [
        (&[0xCF][..], Flow::Iret),
        (&[0xEA, 0, 0, 0, 0, 8, 0], Flow::FarJmp),
        (&[0x0F, 0x34], Flow::Sysenter),
        (&[0xCD, 0x80], Flow::Int),
        (&[0xCB], Flow::FarRet),
    ] {
        let mut mem = Mem::new(BASE, bytes);
        let mut e = engine();
        let key = BlockKey::flat32(BASE);
        e.translate(key, &mut mem).unwrap();
        let b = e.block(&key).unwrap();
        let s: Vec<_> = b.sites.clone().filter_map(|id| e.callout_site(id)).map(|s| s.kind).collect();
        assert!(s.contains(&CalloutKind::ControlFlow(flow)), "{s:?}");
        assert!(b.exits.is_empty());
    }
}

#[test]
fn polling_is_switchable() {
    let mut mem = Mem::new(BASE, &[0x90, 0xC3]);
    let mut e = engine_with(Config { poll_at_block_entry: false, ..Config::default() });
    let key = BlockKey::flat32(BASE);
    let entry = e.translate(key, &mut mem).unwrap();
    assert_eq!(text(&tc_insns(&e, &key, entry)[0]), "nop");
    let mut e = engine();
    let entry = e.translate(key, &mut mem).unwrap();
    let ins = tc_insns(&e, &key, entry);
    let poll = e.callout_site(ins[4].immediate32()).unwrap();
    assert_eq!(poll.kind, CalloutKind::Poll);
    assert_eq!(poll.guest_eip, BASE);
    // Resuming after a spurious poll skips straight to the body.
    assert_eq!(text(&tc_insns(&e, &key, poll.resume_tc.unwrap())[0]), "nop");
}

#[test]
fn blocks_stop_at_the_page_end_and_record_both_pages_when_straddling() {
    let start = BASE + 0xFFA;
    let mut mem = Mem::new(BASE, &[]);
    mem.at(start, &[0x90, 0x90, 0x90, 0xB8, 0x01, 0x02, 0x03, 0x04]); // nops, mov eax, imm32 across
    let mut e = engine();
    let key = BlockKey::flat32(start);
    e.translate(key, &mut mem).unwrap();
    let b = e.block(&key).unwrap();
    assert_eq!(b.insns.len(), 4);
    assert_eq!(b.pages.len(), 2);
    assert_eq!(b.exits[0].target_eip, start + 8);
    assert_eq!(e.code_pages(), vec![u64::from(BASE) + PHYS_OFFSET, u64::from(BASE) + 0x1000 + PHYS_OFFSET]);
    assert_eq!(e.take_new_code_pages().len(), 2);
    assert!(e.take_new_code_pages().is_empty());
    // Either page invalidates it.
    assert_eq!(e.invalidate_phys_page(u64::from(BASE) + 0x1000 + PHYS_OFFSET), vec![key]);
}

#[test]
fn fetch_fault_at_the_first_instruction_is_an_error() {
    let mut mem = Mem::new(BASE, &[]);
    let mut e = engine();
    let err = e.translate(BlockKey::flat32(0x10), &mut mem).unwrap_err();
    assert!(matches!(err, EngineError::Fetch(_)), "{err}");
}

#[test]
fn the_tc_flushes_when_full() {
    let mut mem = Mem::new(BASE, &[]);
    for n in 0..64u32 {
        mem.at(BASE + n * 16, &[0x90, 0x90, 0xFA, 0xFB, 0x0F, 0x20, 0xC0, 0xC3]);
        // nop nop cli sti mov eax,cr0 ret
    }
    let mut e = engine_with(Config { tc_size: 4096, ..Config::default() });
    let first = BlockKey::flat32(BASE);
    e.translate(first, &mut mem).unwrap();
    let first_site = e.block(&first).unwrap().sites.start;
    for n in 1..64 {
        e.translate(BlockKey::flat32(BASE + n * 16), &mut mem).unwrap();
    }
    let s = e.stats();
    assert!(s.flushes >= 1, "{s:?}");
    assert!(e.generation() >= 1);
    assert!(e.lookup(&first).is_none(), "flushed");
    assert!(e.callout_site(first_site).is_none(), "site ids are not reused");
    assert!(s.tc_bytes_used <= 4096);
    let last = e.block(&BlockKey::flat32(BASE + 63 * 16)).unwrap();
    assert!(last.sites.start > first_site);
    // A block too large for the whole TC is an error, not a loop.
    let mut tiny = engine_with(Config { tc_size: 64, ..Config::default() });
    assert!(matches!(tiny.translate(first, &mut mem), Err(EngineError::BlockTooLarge)));
}

#[test]
fn disassembly_log_marks_each_instruction() {
    let code = asm32(BASE, |a| {
        a.mov(eax, ebx).unwrap();
        a.cli().unwrap();
        a.mov(eax, cr0).unwrap();
        a.ret().unwrap();
    });
    let mut mem = Mem::new(BASE, &code);
    let mut e = engine();
    let key = BlockKey::flat32(BASE);
    e.translate(key, &mut mem).unwrap();
    let log = e.disassemble_block(&key).unwrap();
    assert!(log.contains("IDENT      mov eax,ebx"), "{log}");
    assert!(log.contains("REWRITTEN  cli"), "{log}");
    assert!(log.contains("CALLOUT    mov eax,cr0"), "{log}");
    assert!(log.contains("REWRITTEN  ret"), "{log}");
    assert!(log.contains("-> "), "{log}");
}

#[test]
fn statistics_count_translation_and_reported_callouts() {
    let mut mem = Mem::new(BASE, &[0x0F, 0xA2, 0xC3]); // cpuid ; ret
    let mut e = engine();
    let key = BlockKey::flat32(BASE);
    e.translate(key, &mut mem).unwrap();
    let cpuid = e
        .block(&key)
        .unwrap()
        .sites
        .clone()
        .find(|&id| e.callout_site(id).unwrap().kind == CalloutKind::Sensitive(Sensitive::Cpuid))
        .unwrap();
    e.note_callout(cpuid);
    e.note_callout(MISS_SITE_ID);
    let s = e.stats();
    assert_eq!(s.blocks_translated, 1);
    assert_eq!(s.guest_bytes_translated, 3);
    assert_eq!(s.guest_insns_translated, 2);
    assert_eq!(s.callouts_taken.get("sensitive/cpuid"), Some(&1));
    assert_eq!(s.indirect_misses, 1);
    assert!(s.named().iter().any(|(n, v)| n == "/engine/blocks/translated" && *v == 1));
}

#[test]
fn indirect_table_holds_one_context() {
    let mut mem = Mem::new(BASE, &[0x90, 0xC3]);
    let mut e = engine();
    let kr0 = BlockKey::flat32(BASE);
    e.enter(kr0, &mut mem).unwrap();
    e.install_indirect(&kr0).unwrap();
    assert_ne!(e.table_entry(BASE), e.miss_stub());
    // CPL 3 blocks have their own table: entering one keeps this entry.
    let kr3 = BlockKey { cpl: 3, ..kr0 };
    e.enter(kr3, &mut mem).unwrap();
    assert_ne!(e.table_entry(BASE), e.miss_stub());
    // Entering another kernel context (16-bit code here) empties the table.
    let k16 = BlockKey { cs32: false, ..kr0 };
    e.enter(k16, &mut mem).unwrap();
    assert_eq!(e.table_entry(BASE), e.miss_stub());
}

#[test]
fn revalidation_drops_blocks_whose_mapping_changed() {
    let mut mem = Mem::new(BASE, &[0x90, 0xC3]);
    let mut e = engine();
    let key = BlockKey::flat32(BASE);
    e.translate(key, &mut mem).unwrap();
    assert!(e.revalidate_mappings(&mut mem).is_empty());
    struct Remapped(Mem);
    impl engine::GuestCode for Remapped {
        fn fetch(&mut self, l: u32, b: &mut [u8]) -> Result<(), engine::FetchFault> {
            self.0.fetch(l, b)
        }
        fn phys_page(&mut self, l: u32) -> Option<u64> {
            self.0.phys_page(l).map(|p| p + 0x1000_0000)
        }
    }
    let mut moved = Remapped(mem);
    assert_eq!(e.revalidate_mappings(&mut moved), vec![key]);
}

#[test]
fn callout_sequence_matches_the_abi_bytes() {
    let mut mem = Mem::new(BASE, &[0xF4]); // hlt
    let mut e = engine_with(Config { poll_at_block_entry: false, ..Config::default() });
    let key = BlockKey::flat32(BASE);
    let entry = e.translate(key, &mut mem).unwrap();
    let b = e.block(&key).unwrap();
    let bytes = &e.block_bytes(&key).unwrap()[(entry - b.tc_start) as usize..];
    let id = b.sites.start;
    let mut want = vec![0x65, 0xC7, 0x05];
    want.extend(vcpu::CALLOUT_ID.to_le_bytes());
    want.extend(id.to_le_bytes());
    want.extend([0x65, 0xFF, 0x2D]);
    want.extend(vcpu::EXIT_FAR.to_le_bytes());
    assert_eq!(&bytes[..want.len()], &want[..]);
    let d = Decoder::with_ip(32, &bytes[11..18], 0, DecoderOptions::NONE).into_iter().next().unwrap();
    assert_eq!(d.mnemonic(), Mnemonic::Jmp);
    assert_eq!(e.callout_site(id).unwrap().kind, CalloutKind::Sensitive(Sensitive::Hlt));
    assert_eq!(e.callout_site(id).unwrap().resume_tc, None, "hlt ends the block");
}

#[test]
fn rdtsc_is_native_only_while_the_monitor_says_the_guest_tsc_is_the_hosts() {
    // rdtsc ; nop ; ret
    let code = asm32(BASE, |a| {
        a.rdtsc().unwrap();
        a.nop().unwrap();
        a.ret().unwrap();
    });
    let key = BlockKey::flat32(BASE);
    let callouts = |e: &engine::Engine| e.stats().callout_sites.get("sensitive/rdtsc").copied().unwrap_or(0);
    let mut mem = Mem::new(BASE, &code);
    let mut e = engine_with(Config { native_rdtsc: true, ..Config::default() });
    e.translate(key, &mut mem).unwrap();
    let rdtsc = e.block(&key).unwrap().insns[0].clone();
    assert_eq!(rdtsc.disposition, engine::mangle::Disposition::Rewritten);
    assert_eq!(callouts(&e), 0);
    let tc = e.block_bytes(&key).unwrap();
    let b = e.block(&key).unwrap();
    let at = (rdtsc.tc_start - b.tc_start) as usize;
    let end = (rdtsc.tc_end - b.tc_start) as usize;
    assert!(tc[at..end].windows(2).any(|w| w == [0x0F, 0x31]), "the instruction itself: {:02x?}", &tc[at..end]);

    // The guest changed its TSC: translations are dropped and the next
    // one calls out.
    e.set_native_rdtsc(false);
    assert!(e.block(&key).is_none(), "the TC was flushed");
    e.translate(key, &mut mem).unwrap();
    assert_eq!(e.block(&key).unwrap().insns[0].disposition, engine::mangle::Disposition::Callout);
    assert_eq!(callouts(&e), 1);

    // The counting mode never runs it natively (virtual time).
    let mut c = engine_with(Config { native_rdtsc: true, count_insns: true, ..Config::default() });
    c.translate(key, &mut mem).unwrap();
    assert_eq!(c.block(&key).unwrap().insns[0].disposition, engine::mangle::Disposition::Callout);
}

#[test]
fn div_checks_its_divisor_without_touching_flags_and_calls_out_on_zero() {
    // div ebx ; idiv byte [esi+4] ; div dword gs:[0] ; ret
    let code = asm32(BASE, |a| {
        a.div(ebx).unwrap();
        a.idiv(byte_ptr(esi + 4)).unwrap();
        a.div(dword_ptr(0).gs()).unwrap();
        a.ret().unwrap();
    });
    let mut mem = Mem::new(BASE, &code);
    let mut e = engine();
    let key = BlockKey::flat32(BASE);
    let entry = e.translate(key, &mut mem).unwrap();
    let b = e.block(&key).unwrap().clone();
    let ins = tc_insns(&e, &key, entry);
    let l = texts(&ins);
    // Each checked DIV: divisor into ECX (spilled first), JECXZ to the callout.
    let first = find(&l, 0, "mov ecx,ebx");
    assert!(l[first + 1].starts_with("jecxz"), "{l:?}");
    let second = find(&l, first, "movzx ecx,byte ptr [esi+0x4]");
    assert!(l[second + 1].starts_with("jecxz"), "{l:?}");
    // Nothing of the checks writes flags (the DIVs themselves do).
    for (i, insn) in ins.iter().enumerate().take(second + 8) {
        if !matches!(insn.mnemonic(), Mnemonic::Div | Mnemonic::Idiv) {
            assert_eq!(insn.rflags_modified(), 0, "{} writes flags: {l:?}", l[i]);
        }
    }
    let de: Vec<_> = (0..64)
        .filter_map(|n| e.callout_site(engine::callout::FIRST_SITE_ID + n))
        .filter(|s| s.kind == CalloutKind::DivideError)
        .map(|s| s.guest_eip)
        .collect();
    assert_eq!(de, vec![b.insns[0].instr.ip32(), b.insns[1].instr.ip32()], "one #DE site per checked DIV, at the DIV");
    // The GS operand is left to the host trap (it would need the GS rewrite).
    assert_eq!(b.insns[2].disposition, engine::mangle::Disposition::Rewritten);
}

#[test]
fn every_block_of_a_full_tc_is_found_at_its_last_byte() {
    // The default VMM area ends at 2^32: the TC's last block must not wrap
    // (`tc_start + tc_len` overflowing once made such a block invisible to
    // `block_at`, and a kick landing in it stopped the VM).
    let mut e = engine();
    let first = BlockKey::flat32(BASE);
    let mut highest = 0;
    for n in 0u32.. {
        // Distinct blocks of varying length: k NOPs, then ret.
        let eip = BASE + n * 0x40;
        let k = (n % 37) as usize;
        let code = asm32(eip, |a| {
            for _ in 0..k {
                a.nop().unwrap();
            }
            a.ret().unwrap();
        });
        let key = BlockKey::flat32(eip);
        e.translate(key, &mut Mem::new(eip, &code)).unwrap();
        if n > 0 && e.block(&first).is_none() {
            break; // the TC flushed: it was full
        }
        let b = e.block(&key).unwrap();
        assert!(b.tc_start.checked_add(b.tc_len).is_some(), "block at {:#x}+{:#x} wraps", b.tc_start, b.tc_len);
        let last = b.tc_start + (b.tc_len - 1);
        assert!(e.block_at(last).is_some(), "block at {:#x}+{:#x} not found at its last byte", b.tc_start, b.tc_len);
        highest = highest.max(last);
    }
    assert!(highest > 0xFFF0_0000, "the TC filled up to its end ({highest:#x})");
}

#[test]
fn a_first_instruction_cut_by_an_unfetchable_page_is_that_pages_fetch_fault() {
    // Mem holds 0x4000 bytes; the last page ends at BASE + 0x4000. A
    // 5-byte `mov eax, imm32` starting 1 byte before that end must fault on
    // the next page (demand-paged code straddles page ends), not decode as
    // an invalid instruction (#UD: systemd died of it once).
    let mut mem = Mem::new(BASE, &[]);
    let at = BASE + 0x4000 - 1;
    mem.at(at, &[0xB8]);
    let mut e = engine();
    match e.translate(BlockKey::flat32(at), &mut mem) {
        Err(EngineError::Fetch(f)) => assert_eq!(f.linear, BASE + 0x4000),
        other => panic!("expected the next page's fetch fault, got {other:?}"),
    }
    // In the middle of a block, the block ends before it instead.
    let at = BASE + 0x4000 - 2;
    mem.at(at, &[0x90, 0xB8]);
    e.translate(BlockKey::flat32(at), &mut mem).unwrap();
    assert_eq!(e.block(&BlockKey::flat32(at)).unwrap().insns.len(), 1, "the nop only");
}

#[test]
fn segment_loads_become_inline_sequences_with_their_callout() {
    let code = asm32(BASE, |a| {
        a.push(0x202).unwrap();
        a.popfd().unwrap();
        a.mov(eax, 0x50).unwrap();
        a.mov(edi, 2).unwrap();
        a.mov(ds, eax).unwrap();
        a.pop(es).unwrap();
        a.mov(gs, word_ptr(ebx + 4)).unwrap();
        a.ret().unwrap();
    });
    let mut mem = Mem::new(BASE, &code);
    let mut e = engine();
    let key = BlockKey::flat32(BASE);
    e.translate(key, &mut mem).unwrap();
    let log = e.disassemble_block(&key).unwrap();
    for want in ["REWRITTEN  mov ds,ax", "REWRITTEN  pop es", "REWRITTEN  mov gs,[ebx+4]"] {
        assert!(log.contains(want), "{want}: {log}");
    }
    // Each: the selector read with the guest's own operand, the host
    // shadow loaded (GS: its selector stored for GS-prefix rewrites), and
    // the instruction's callout on the miss path.
    for want in ["movzx ecx,ax", "mov ds,dx", "movzx ecx,word ptr [esp]", "mov es,dx", "lea esp,[esp+4]"] {
        assert!(log.contains(want), "{want}: {log}");
    }
    assert!(log.contains("movzx ecx,word ptr [ebx+4]") && log.contains("mov gs:[3Ah],dx"), "{log}");
    assert_eq!(e.stats().callout_sites.get("sensitive/movtoseg"), Some(&2), "{log}");
    assert_eq!(e.stats().callout_sites.get("sensitive/popseg"), Some(&1), "{log}");
    // Without the cache, plain callouts.
    let mut e = engine_with(Config { inline_segments: false, ..Config::default() });
    e.translate(key, &mut mem).unwrap();
    let log = e.disassemble_block(&key).unwrap();
    assert!(log.contains("CALLOUT    mov ds,ax") && !log.contains("mov ds,dx"), "{log}");
}

#[test]
fn gs_relative_indirect_calls_load_their_target_with_the_guest_gs() {
    // i386 glibc's system call: `call *%gs:0x10`.
    let code = asm32(BASE, |a| {
        a.call(dword_ptr(0x10).gs()).unwrap();
    });
    let mut mem = Mem::new(BASE, &code);
    let mut e = engine();
    let key = BlockKey::flat32(BASE);
    e.translate(key, &mut mem).unwrap();
    let log = e.disassemble_block(&key).unwrap();
    assert!(log.contains("REWRITTEN  call dword ptr gs:[10h]"), "{log}");
    let lines: Vec<&str> = log.lines().collect();
    let at = |pat: &str| lines.iter().position(|l| l.contains(pat)).unwrap_or_else(|| panic!("{pat}: {log}"));
    // guest GS, the load through it, the VMM's GS back, then the lookup.
    let (guest_gs, load, vmm_gs) = (at("mov gs,cs:["), at("mov ecx,gs:[10h]"), at("jmp dword ptr gs:[ecx*4"));
    assert!(guest_gs < load && load < vmm_gs, "{log}");
    assert_eq!(e.stats().callout_sites.get("flow/indirectcall"), None, "{log}");
}
