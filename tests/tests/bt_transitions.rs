//! Inline INT from CPL 3 and IRET to CPL 3 (docs/translator.md, "Inline
//! privilege transitions") against their callout twin: the same kernel and
//! user code run with the inline sequences and with `inline_transitions`
//! off, and everything the guest can see (the frames the kernel finds, its
//! stack, flags and segments, what user code gets back) must be the same.

use std::sync::Arc;

use iced_x86::code_asm::*;
use monitor::backend::bt::user_exec::UserExec;
use monitor::backend::bt::{BtBackend, BtConfig};
use monitor::backend::{Backend, VmExit};
use monitor::cpu::{Cpu, Descriptor, Seg, SegReg, TableReg};
use monitor::memory::GuestMemory;
use popek_tests::{assemble, vm_lock};

const KERNEL: u32 = 0x10_0000;
const USER: u32 = 0x11_0000;
const H80: u32 = 0x14_0000;
const H81: u32 = 0x14_1000;
const H82: u32 = 0x14_2000;
const H83: u32 = 0x14_3000;
const HGP: u32 = 0x14_4000;
const HDE: u32 = 0x14_5000;
const H84: u32 = 0x14_6000;
const GDT: u32 = 0x1000;
const IDT: u32 = 0x2000;
const TSS: u32 = 0x4000;
const RESULTS: u32 = 0x20_0000;
/// A dword the system call reads through the user's DS.
const PROBE: u32 = 0x21_0000;
const USER_STACK: u32 = 0x28_0000;
const KSTACK: u32 = 0x30_0000;
/// A second kernel stack, in a 4 MiB region nothing touched before (the
/// shadow MMU maps in batches within one): the first push of an INT there
/// is a host fault inside the sequence, and the fallback maps the page and
/// runs the INT again.
const FRESH_KSTACK: u32 = 0xE0_0000;
const ROUNDS: u32 = 6;

/// Flags the user code sets before each INT (arithmetic flags and DF).
const FLAG_CASES: [u32; 3] = [0x8D5 | 0x400, 0x000, 0x041];

fn kernel_code() -> Vec<u8> {
    assemble(KERNEL, |a| {
        // Returns within the kernel: an INT from CPL 0, whose handler
        // flips CF and DF in the frame and IRETs to the same CS.
        for &flags in &FLAG_CASES {
            a.push(flags | 0x202)?;
            a.popfd()?;
            a.mov(eax, flags)?;
            a.int(0x84)?;
            a.pushfd()?;
            a.pop(eax)?;
            a.out(0xD1, eax)?;
            a.mov(eax, esp)?;
            a.out(0xD2, eax)?;
        }
        // Enter user mode: data segments the user may keep, then IRET.
        a.mov(eax, 0x23)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(fs, ax)?;
        a.mov(gs, ax)?;
        a.push(0x23)?;
        a.push(USER_STACK)?;
        a.push(0x202)?;
        a.push(0x1B)?;
        a.push(USER)?;
        a.iretd()
    })
}

/// The system call: reports the frame and what the kernel sees, returns
/// EAX + 1 with CF flipped in the returned flags.
fn h80() -> Vec<u8> {
    assemble(H80, |a| {
        a.push(eax)?;
        for (k, port) in (0x90u32..0x95).enumerate() {
            a.mov(eax, dword_ptr(esp + 4 + 4 * k as i32))?;
            a.out(port, eax)?;
        }
        a.mov(eax, esp)?;
        a.out(0x95, eax)?;
        a.pushfd()?;
        a.pop(eax)?;
        a.out(0x96, eax)?;
        a.mov(eax, ds)?;
        a.out(0x97, eax)?;
        a.mov(eax, cs)?;
        a.out(0x98, eax)?;
        a.mov(eax, ss)?;
        a.out(0x99, eax)?;
        a.mov(eax, gs)?;
        a.out(0x9A, eax)?;
        // A read through the user's DS after the entry.
        a.mov(eax, dword_ptr(PROBE))?;
        a.out(0x9B, eax)?;
        a.pop(eax)?;
        a.inc(eax)?;
        a.xor(dword_ptr(esp + 8), 1)?;
        a.iretd()
    })
}

/// A trap gate (IF stays set): reports EBX and the kernel's flags.
fn h81() -> Vec<u8> {
    assemble(H81, |a| {
        a.mov(eax, ebx)?;
        a.out(0xA0, eax)?;
        a.pushfd()?;
        a.pop(eax)?;
        a.out(0xA1, eax)?;
        a.iretd()
    })
}

/// The end: reports what user code stored, then stops.
fn h82() -> Vec<u8> {
    assemble(H82, |a| {
        a.mov(esi, RESULTS)?;
        a.mov(ecx, ROUNDS * FLAG_CASES.len() as u32 * 3)?;
        let mut next = a.create_label();
        a.set_label(&mut next)?;
        a.lodsd()?;
        a.out(0xB0, eax)?;
        a.loop_(next)?;
        a.mov(eax, 1)?;
        a.out(0xF4, eax)
    })
}

/// Moves TSS.ESP0 between the two kernel stacks.
fn h83() -> Vec<u8> {
    assemble(H83, |a| {
        a.mov(eax, dword_ptr(TSS + 4))?;
        a.xor(eax, KSTACK ^ FRESH_KSTACK)?;
        a.mov(dword_ptr(TSS + 4), eax)?;
        a.iretd()
    })
}

/// #DE: reports the frame's EIP and CS, skips the 2-byte DIV.
fn hde() -> Vec<u8> {
    assemble(HDE, |a| {
        a.mov(eax, dword_ptr(esp))?;
        a.out(0xC0, eax)?;
        a.mov(eax, dword_ptr(esp + 4))?;
        a.out(0xC1, eax)?;
        a.add(dword_ptr(esp), 2)?;
        a.iretd()
    })
}

/// INT 0x84 from the kernel: reports the frame's EIP, CS and flags, flips
/// CF and DF in it.
fn h84() -> Vec<u8> {
    assemble(H84, |a| {
        for (k, port) in (0xD4u32..0xD7).enumerate() {
            a.mov(ebx, dword_ptr(esp + 4 * k as i32))?;
            a.mov(eax, ebx)?;
            a.out(port, eax)?;
        }
        a.xor(dword_ptr(esp + 8), 0x401)?;
        a.iretd()
    })
}

/// #GP: reports the error code and stops.
fn hgp() -> Vec<u8> {
    assemble(HGP, |a| {
        a.pop(eax)?;
        a.out(0xEE, eax)?;
        a.mov(eax, 2)?;
        a.out(0xF4, eax)
    })
}

fn user_code() -> Vec<u8> {
    assemble(USER, |a| {
        a.mov(edi, RESULTS)?;
        for round in 0..ROUNDS {
            if round == 2 || round == 4 {
                // Rounds 2-3 enter on the fresh kernel stack.
                a.int(0x83)?;
            }
            for (k, &flags) in FLAG_CASES.iter().enumerate() {
                a.push(flags | 0x202)?;
                a.popfd()?;
                a.mov(eax, round * 16 + k as u32)?;
                a.mov(ebx, 0x5A5A_0000 | round)?;
                a.int(0x80)?;
                a.pushfd()?;
                a.pop(edx)?;
                a.cld()?;
                a.stosd()?;
                a.mov(eax, edx)?;
                a.and(eax, 0x8D5 | 0x400)?;
                a.stosd()?;
                a.mov(eax, esp)?;
                a.stosd()?;
                a.mov(ebx, edx)?;
                a.int(0x81)?;
            }
            // A #DE the translator sees coming (a zero divisor).
            a.mov(eax, 7)?;
            a.xor(edx, edx)?;
            a.xor(ecx, ecx)?;
            a.div(ecx)?;
        }
        a.int(0x82)
    })
}

fn gate(handler: u32, kind: u32) -> u64 {
    let lo = (handler & 0xFFFF) | (0x08 << 16);
    let hi = (handler & 0xFFFF_0000) | kind;
    u64::from(lo) | (u64::from(hi) << 32)
}

/// What one run counted.
struct Counts {
    inline_int: u64,
    fallbacks: u64,
    iret_callouts: u64,
    de_callouts: u64,
}

/// Runs the guest with `config`; returns every OUT (port, value) and what
/// the backend counted.
fn run(config: BtConfig) -> (Vec<(u16, u32)>, Counts) {
    let _lock = vm_lock();
    let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
    for (at, code) in [
        (KERNEL, kernel_code()),
        (USER, user_code()),
        (H80, h80()),
        (H81, h81()),
        (H82, h82()),
        (H83, h83()),
        (HGP, hgp()),
        (HDE, hde()),
        (H84, h84()),
    ] {
        mem.write(u64::from(at), &code).unwrap();
    }
    let gdt: [u64; 6] = [
        0,
        0x00cf_9b00_0000_ffff, // 0x08 kernel code
        0x00cf_9300_0000_ffff, // 0x10 kernel data
        0x00cf_fb00_0000_ffff, // 0x18 user code
        0x00cf_f300_0000_ffff, // 0x20 user data
        0x0000_8b00_4000_0067, // 0x28 busy 32-bit TSS at 0x4000
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write(u64::from(GDT) + 8 * i as u64, &d.to_le_bytes()).unwrap();
    }
    for (v, g) in [
        (0x80u64, gate(H80, 0xEE00)),
        (0x81, gate(H81, 0xEF00)),
        (0x82, gate(H82, 0xEE00)),
        (0x83, gate(H83, 0xEE00)),
        (13, gate(HGP, 0x8E00)),
        (0, gate(HDE, 0x8E00)),
        (0x84, gate(H84, 0x8E00)),
    ] {
        mem.write(u64::from(IDT) + 8 * v, &g.to_le_bytes()).unwrap();
    }
    mem.write(u64::from(TSS) + 4, &KSTACK.to_le_bytes()).unwrap();
    mem.write(u64::from(TSS) + 8, &0x10u32.to_le_bytes()).unwrap();
    mem.write(u64::from(PROBE), &0x1234_5678u32.to_le_bytes()).unwrap();
    let mut cpu = Cpu::flat_protected(0x08, 0x10);
    cpu.eip = KERNEL;
    cpu.gpr[4] = KSTACK;
    cpu.gdtr = TableReg { base: GDT, limit: 8 * 6 - 1 };
    cpu.idtr = TableReg { base: IDT, limit: 0x7FF };
    cpu.tr = SegReg {
        selector: 0x28,
        cache: Descriptor { base: TSS, limit: 0x67, typ: 0xB, present: true, ..Descriptor::default() },
    };
    assert_eq!(cpu.seg(Seg::Cs).selector, 0x08);
    let mut bt = BtBackend::new(mem, cpu, config).expect("bt backend");
    let mut outs = Vec::new();
    for _ in 0..1_000_000 {
        match bt.run().unwrap_or_else(|e| panic!("run: {e:?}\n{}", bt.cpu().dump())) {
            VmExit::IoOut { port: 0xF4, value, .. } => {
                assert_eq!(value, 1, "the guest took a #GP: {outs:x?}");
                let stat = |name: &str| bt.stats().iter().find(|s| s.0 == name).map_or(0, |s| s.1);
                let callouts = |kind: &str| -> u64 {
                    bt.engine().stats().callouts_taken.iter().filter(|(k, _)| k.as_str() == kind).map(|x| x.1).sum()
                };
                let iret_callouts = callouts("flow/iret");
                let de_callouts = callouts("de");
                let counts = Counts {
                    inline_int: stat("bt/exits/inline_int"),
                    fallbacks: stat("bt/exits/transition_fault"),
                    iret_callouts,
                    de_callouts,
                };
                return (outs, counts);
            }
            VmExit::IoOut { port, value, .. } => outs.push((port, value)),
            VmExit::Interrupted => {}
            e => panic!("unexpected exit {e:?}\n{}", bt.cpu().dump()),
        }
    }
    panic!("guest did not finish: {outs:x?}");
}

fn config(inline: bool) -> BtConfig {
    let mut c = BtConfig { user_exec: UserExec::Translated, ..BtConfig::default() };
    c.engine.inline_transitions = inline;
    c
}

#[test]
fn inline_int_and_iret_match_their_callout_twin() {
    let (callout, off) = run(config(false));
    let (inline, on) = run(config(true));
    assert_eq!(off.inline_int, 0, "inline entries with inline transitions off");
    assert!(on.inline_int > 0, "no INT went inline");
    assert!(on.fallbacks > 0, "no push on the fresh stack fell back");
    assert_eq!(off.de_callouts, u64::from(ROUNDS), "every #DE a callout without inline transitions");
    assert!(on.de_callouts < off.de_callouts, "no #DE was delivered inline");
    // Only the first IRET to user code (whose CS and SS the monitor has not
    // seen yet) takes the callout; kernel-to-kernel returns go inline too.
    assert!(on.iret_callouts <= 2, "IRETs still took callouts ({} of {})", on.iret_callouts, off.iret_callouts);
    assert_eq!(inline.len(), callout.len());
    for (i, (a, b)) in inline.iter().zip(&callout).enumerate() {
        assert_eq!(a, b, "OUT #{i} differs (inline, callout)");
    }
    // And the reference is what the architecture says.
    let of = |port: u16| -> Vec<u32> { callout.iter().filter(|o| o.0 == port).map(|o| o.1).collect() };
    let cases = (ROUNDS as usize) * FLAG_CASES.len();
    assert_eq!(of(0x91), vec![0x1B; cases], "frame CS");
    assert_eq!(of(0x94), vec![0x23; cases], "frame SS");
    assert!(of(0x93).iter().all(|&e| e == USER_STACK), "frame ESP");
    let flags = of(0x92);
    for (i, f) in flags.iter().enumerate() {
        let want = FLAG_CASES[i % FLAG_CASES.len()] | 0x202;
        assert_eq!(f & (0x8D5 | 0x400 | 0x200 | 0x3000 | 2), want, "frame EFLAGS of case {i}");
    }
    let kesp = of(0x95);
    for (i, e) in kesp.iter().enumerate() {
        let low = (2..4).contains(&(i / FLAG_CASES.len()));
        let top = if low { FRESH_KSTACK } else { KSTACK };
        assert_eq!(*e, top - 24, "kernel ESP in case {i} (the frame and the saved EAX)");
    }
    assert!(of(0x96).iter().all(|f| f & 0x200 == 0), "an interrupt gate clears IF");
    assert!(of(0xA1).iter().all(|f| f & 0x200 != 0), "a trap gate keeps IF");
    assert_eq!(of(0x97), vec![0x23; cases], "DS stays the user's");
    assert_eq!(of(0x98), vec![0x08; cases], "CS is the gate's");
    assert_eq!(of(0x99), vec![0x10; cases], "SS is TSS.SS0");
    assert_eq!(of(0x9B), vec![0x1234_5678; cases], "reads through DS after the entry");
    let results = of(0xB0);
    for (i, r) in results.chunks(3).enumerate() {
        let (round, k) = (i / FLAG_CASES.len(), i % FLAG_CASES.len());
        assert_eq!(r[0], round as u32 * 16 + k as u32 + 1, "EAX back in case {i}");
        // CF flipped by the handler, the rest as the user set them.
        assert_eq!(r[1], (FLAG_CASES[k] ^ 1) & (0x8D5 | 0x400), "flags back in case {i}");
        assert_eq!(r[2], USER_STACK, "ESP back in case {i}");
    }
    assert_eq!(of(0xA0).len(), cases);
    let de = of(0xC0);
    assert_eq!(de.len(), ROUNDS as usize, "one #DE per round");
    assert!(de.iter().all(|&e| (USER..USER + 0x1000).contains(&e)), "#DE frames point at the DIV: {de:x?}");
    assert_eq!(of(0xC1), vec![0x1B; ROUNDS as usize], "#DE frame CS");
    // Kernel to kernel: the frame says CS 0x08 and the flags set before;
    // the IRET restores them with CF and DF flipped, and ESP.
    assert_eq!(of(0xD5), vec![0x08; FLAG_CASES.len()], "kernel frame CS");
    for (i, (&f, &back)) in of(0xD6).iter().zip(&of(0xD1)).enumerate() {
        assert_eq!(f & (0x8D5 | 0x400 | 0x200), FLAG_CASES[i] | 0x200, "kernel frame EFLAGS {i}");
        assert_eq!(back & (0x8D5 | 0x400 | 0x200), (FLAG_CASES[i] ^ 0x401) | 0x200, "flags after IRET {i}");
    }
    assert_eq!(of(0xD2), vec![KSTACK; FLAG_CASES.len()], "ESP after the kernel IRET");
}
