//! The binary translator end to end (issue 3): kernel-mode guests run from
//! the translation cache, with paging off (the window maps guest-physical
//! memory 1:1), and every sensitive instruction sees the virtual state.

use std::sync::Arc;

use iced_x86::code_asm::*;
use monitor::backend::bt::{BtBackend, BtConfig};
use monitor::backend::{Backend, VmExit};
use monitor::cpu::Cpu;
use monitor::memory::GuestMemory;
use popek_tests::{assemble, assemble_resolving, emit_fib, vm_lock};

const CODE: u32 = 0x10_0000;
const DATA: u32 = 0x20_0000;
const STACK: u32 = 0x30_0000;

#[allow(dead_code)] // `mem` is for tests that inspect guest RAM
struct Kernel {
    bt: BtBackend,
    mem: Arc<GuestMemory>,
    /// Values the guest wrote with OUT, by port.
    outs: Vec<(u16, u32)>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl Kernel {
    fn new(f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>) -> Kernel {
        Kernel::with_code(&assemble(CODE, f))
    }

    fn with_code(code: &[u8]) -> Kernel {
        Kernel::with_config(code, BtConfig::default())
    }

    fn with_config(code: &[u8], config: BtConfig) -> Kernel {
        let lock = vm_lock();
        let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
        mem.write(CODE as u64, code).unwrap();
        let mut cpu = Cpu::flat_protected(0x08, 0x10);
        cpu.eip = CODE;
        cpu.gpr[4] = STACK;
        let bt = BtBackend::new(mem.clone(), cpu, config).expect("bt backend");
        Kernel { bt, mem, outs: Vec::new(), _lock: lock }
    }

    /// Runs until the guest writes port 0xf4 (returns the value), answering
    /// IN from port 0x60 with 0x5A.
    fn run(&mut self) -> u32 {
        for _ in 0..100_000 {
            match self.bt.run().unwrap_or_else(|e| panic!("run: {e:?}\n{}\n{:x?}", self.bt.cpu().dump(), self.outs)) {
                VmExit::IoOut { port: 0xF4, value, .. } => return value,
                VmExit::IoOut { port, value, .. } => self.outs.push((port, value)),
                VmExit::IoIn { port: 0x60, .. } => self.bt.complete_io_in(0x5A),
                VmExit::IoIn { .. } => self.bt.complete_io_in(0xFFFF_FFFF),
                VmExit::Interrupted => {}
                e => panic!(
                    "unexpected exit {e:?} at {:#x}\n{}\n{:x?}",
                    self.bt.cpu().eip,
                    self.bt.cpu().dump(),
                    self.outs
                ),
            }
        }
        panic!("guest did not finish");
    }
}

#[test]
fn compute_and_calls_run_translated() {
    let mut k = Kernel::new(|a| {
        let mut fib = a.create_label();
        let mut l = a.create_label();
        a.mov(eax, 20)?;
        a.call(fib)?;
        a.mov(ebx, eax)?;
        // a loop crossing a page boundary is exercised by the padding below
        a.xor(ecx, ecx)?;
        a.mov(edx, 1000)?;
        a.set_label(&mut l)?;
        a.add(ecx, edx)?;
        a.dec(edx)?;
        a.jnz(l)?;
        a.mov(eax, ebx)?;
        a.out(0xF4, eax)?;
        emit_fib(a, &mut fib)
    });
    assert_eq!(k.run(), 6765);
    assert_eq!(k.bt.cpu().gpr[1], 500_500);
    let s = k.bt.stats();
    let get = |n: &str| s.iter().find(|(k, _)| k == n).map_or(0, |x| x.1);
    assert!(get("engine/blocks_translated") > 3, "{s:?}");
}

#[test]
fn sensitive_instructions_see_virtual_state() {
    let mut k = Kernel::new(|a| {
        a.cli()?;
        a.pushfd()?;
        a.pop(eax)?;
        a.out(0x80, eax)?; // flags with virtual IF=0
        a.sti()?;
        a.pushfd()?;
        a.pop(eax)?;
        a.out(0x80, eax)?; // IF=1
        a.mov(eax, cr0)?;
        a.out(0x80, eax)?;
        a.smsw(eax)?;
        a.out(0x80, eax)?;
        a.mov(eax, cs)?;
        a.out(0x80, eax)?;
        a.in_(al, 0x60)?;
        a.out(0x80, eax)?;
        a.sgdt(ptr(DATA))?;
        a.mov(eax, dword_ptr(DATA + 2))?;
        a.out(0x80, eax)?;
        a.xor(eax, eax)?;
        a.cpuid()?;
        a.mov(eax, ebx)?;
        a.out(0x80, eax)?;
        a.push(cs)?; // inline: the guest's selector from the vCPU page
        a.pop(eax)?;
        a.out(0x80, eax)?;
        a.push(ss)?;
        a.pop(eax)?;
        a.out(0x80, eax)?;
        a.out(0xF4, al)
    });
    k.run();
    let v: Vec<u32> = k.outs.iter().map(|x| x.1).collect();
    assert_eq!(v[0] & 0x200, 0, "PUSHF after CLI shows IF=0");
    assert_eq!(v[1] & 0x200, 0x200, "PUSHF after STI shows IF=1");
    assert_eq!(v[2] & 1, 1, "CR0.PE as the guest set it");
    assert_eq!(v[3] & 0xFFFF, v[2] & 0xFFFF, "SMSW = CR0 low word");
    assert_eq!(v[4] & 0xFFFF, 0x08, "mov ax, cs shows the guest selector, RPL 0");
    assert_eq!(v[5] & 0xFF, 0x5A, "IN reached the port bus");
    assert_eq!(v[6], k.bt.cpu().gdtr.base);
    assert_eq!(v[7], u32::from_le_bytes(*b"Genu"), "CPUID follows the policy");
    assert_eq!(v[8], 0x08, "push cs pushes the guest's CS");
    assert_eq!(v[9], 0x10, "push ss pushes the guest's SS");
}

const GDT: u32 = 0x1000;
const IDT: u32 = 0x2000;

/// Writes a GDT (0x08 code, 0x10 data, 0x18 second code segment based at
/// 0, 0x20 LDT at 0x3000, 0x28 TSS at 0x4000) and an IDT whose gates point
/// at `handlers` (vector, handler address) into guest memory, and loads
/// GDTR/IDTR in the virtual CPU.
fn tables(k: &mut Kernel, handlers: &[(u8, u32)]) {
    let gdt: [u64; 6] = [
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_9b00_0000_ffff,
        0x0000_8200_3000_0fff, // LDT, present, limit 0xfff, base 0x3000
        0x0000_8900_4000_0067, // 32-bit TSS, available, base 0x4000
    ];
    for (i, d) in gdt.iter().enumerate() {
        k.mem.write((GDT + 8 * i as u32) as u64, &d.to_le_bytes()).unwrap();
    }
    for &(v, h) in handlers {
        let lo = (h & 0xFFFF) | (0x08 << 16);
        let hi = (h & 0xFFFF_0000) | 0x8E00;
        k.mem.write((IDT + 8 * u32::from(v)) as u64, &(u64::from(lo) | (u64::from(hi) << 32)).to_le_bytes()).unwrap();
    }
    let c = k.bt.cpu_mut();
    c.gdtr = monitor::cpu::TableReg { base: GDT, limit: 8 * 6 - 1 };
    c.idtr = monitor::cpu::TableReg { base: IDT, limit: 0x7FF };
}

/// Like `Kernel::run`, but raises interrupt `vector` when the guest writes
/// port 0x82, as soon as the guest can take it.
fn run_with_irq(k: &mut Kernel, vector: u8) -> u32 {
    let mut pending = false;
    for _ in 0..100_000 {
        if pending {
            if k.bt.interrupts_enabled() {
                k.bt.inject_interrupt(vector).unwrap();
                pending = false;
                k.bt.request_interrupt_window(false);
            } else {
                k.bt.request_interrupt_window(true);
            }
        }
        match k.bt.run().expect("run") {
            VmExit::IoOut { port: 0xF4, value, .. } => return value,
            VmExit::IoOut { port: 0x82, .. } => pending = true,
            VmExit::IoOut { port, value, .. } => k.outs.push((port, value)),
            VmExit::Interrupted | VmExit::InterruptWindow => {}
            e => panic!("unexpected exit {e:?}\n{}", k.bt.cpu().dump()),
        }
    }
    panic!("guest did not finish");
}

#[test]
fn descriptor_table_stores_return_what_was_loaded() {
    let mut k = Kernel::new(|a| {
        a.mov(eax, 0x20)?;
        a.lldt(ax)?;
        a.mov(eax, 0x28)?;
        a.ltr(ax)?;
        a.sldt(eax)?;
        a.out(0x80, eax)?;
        a.str(eax)?;
        a.out(0x80, eax)?;
        a.sidt(ptr(DATA))?;
        a.mov(eax, dword_ptr(DATA + 2))?;
        a.out(0x80, eax)?;
        a.movzx(eax, word_ptr(DATA))?;
        a.out(0x80, eax)?;
        a.out(0xF4, al)
    });
    tables(&mut k, &[]);
    k.run();
    let v: Vec<u32> = k.outs.iter().map(|x| x.1).collect();
    assert_eq!(v, vec![0x20, 0x28, IDT, 0x7FF]);
    // LTR marked the TSS busy in the guest's GDT.
    let hi = k.mem.read_u32((GDT + 0x28 + 4) as u64).unwrap();
    assert_eq!((hi >> 8) & 0xF, 0xB);
}

#[test]
fn interrupt_waits_for_sti_plus_one_instruction() {
    let handler = 0x10_0800;
    let mut k = Kernel::new(|a| {
        let mut h = a.create_label();
        a.cli()?;
        a.out(0x82, al)?; // the device raises its interrupt now
        a.mov(eax, 10)?;
        a.mov(eax, 11)?;
        a.sti()?;
        a.mov(eax, 1)?; // the STI shadow: still executes
        a.mov(eax, 2)?;
        a.mov(eax, 3)?;
        a.out(0xF4, al)?;
        for _ in 0..(0x800 - 40) {
            a.nop()?;
        }
        a.set_label(&mut h)?;
        a.out(0x81, eax)?; // EAX when the interrupt arrived
        a.iretd()
    });
    tables(&mut k, &[(0x20, handler)]);
    // Find the handler's real address: the first `out 0x81, eax` (E7 81) after 0x800.
    let code = k.mem.slice(CODE as u64, 0x1000).unwrap().to_vec();
    let at = (0x700..0x1000).find(|&i| code[i] == 0xE7 && code[i + 1] == 0x81).unwrap() as u32;
    tables(&mut k, &[(0x20, CODE + at)]);
    let _ = handler;
    run_with_irq(&mut k, 0x20);
    let seen: Vec<u32> = k.outs.iter().filter(|x| x.0 == 0x81).map(|x| x.1).collect();
    assert_eq!(seen, vec![1], "delivered after STI and exactly one more instruction");
}

#[test]
fn indirect_jumps_and_computed_returns() {
    let code = assemble_resolving(CODE, |a, addr| {
        let mut c0 = a.create_label();
        let mut c1 = a.create_label();
        let mut c2 = a.create_label();
        let mut next = a.create_label();
        let mut done = a.create_label();
        let mut back = a.create_label();
        // The jump table, built at run time in DATA.
        for i in 0..3 {
            a.mov(dword_ptr(DATA + 0x100 + 4 * i as u32), addr(i))?;
        }
        a.xor(esi, esi)?; // accumulator
        a.xor(ebx, ebx)?; // i
        a.set_label(&mut next)?;
        a.mov(eax, ebx)?;
        a.and(eax, 3)?;
        a.cmp(eax, 3)?;
        a.je(done)?;
        a.mov(ecx, DATA + 0x100)?;
        a.jmp(dword_ptr(ecx + eax * 4))?;
        a.set_label(&mut c0)?;
        a.add(esi, 1)?;
        a.jmp(back)?;
        a.set_label(&mut c1)?;
        a.add(esi, 10)?;
        a.jmp(back)?;
        a.set_label(&mut c2)?;
        a.add(esi, 100)?;
        a.set_label(&mut back)?;
        // computed return: push an address and RET to it
        a.mov(edx, addr(3))?;
        a.inc(ebx)?;
        a.push(edx)?;
        a.ret()?;
        a.set_label(&mut done)?;
        a.mov(eax, esi)?;
        a.out(0xF4, eax)?;
        Ok(vec![c0, c1, c2, next])
    });
    let mut k = Kernel::with_code(&code);
    assert_eq!(k.run(), 111);
    let s = k.bt.stats();
    assert!(s.iter().any(|(n, v)| n == "engine/indirect_misses" && *v > 0), "{s:?}");
}

#[test]
fn loop_across_a_page_boundary_and_exception_eip() {
    // The loop body straddles 0x101000; a #DE inside a block reports the
    // EIP of the DIV, not of the block start.
    let mut k = Kernel::new(|a| {
        let mut l = a.create_label();
        let mut h = a.create_label();
        for _ in 0..0xFF0 {
            a.nop()?;
        }
        a.mov(ecx, 300)?;
        a.xor(eax, eax)?;
        a.set_label(&mut l)?;
        a.add(eax, ecx)?;
        a.nop()?;
        a.nop()?;
        a.nop()?;
        a.nop()?;
        a.nop()?;
        a.dec(ecx)?;
        a.jnz(l)?;
        a.out(0x80, eax)?;
        a.nop()?;
        a.xor(edx, edx)?;
        a.div(ecx)?; // ECX = 0
        a.out(0xF4, al)?;
        a.set_label(&mut h)?;
        a.mov(eax, dword_ptr(esp))?;
        a.out(0x81, eax)?;
        a.out(0xF4, al)
    });
    let code = k.mem.slice(CODE as u64, 0x2000).unwrap().to_vec();
    let div_at = (0x1000..0x1100).find(|&i| code[i] == 0xF7 && code[i + 1] == 0xF1).unwrap() as u32;
    let handler = div_at + 2 + 2; // after div (2) and out 0xf4,al (2)
    tables(&mut k, &[(0, CODE + handler)]);
    k.run();
    assert_eq!(k.outs[0], (0x80, 45150));
    assert_eq!(k.outs[1], (0x81, CODE + div_at), "#DE pushed the EIP of the DIV");
}

#[test]
fn self_modifying_code_sees_the_new_instruction() {
    let code = assemble_resolving(CODE, |a, addr| {
        let mut f = a.create_label();
        a.call(f)?;
        a.out(0x80, eax)?;
        // Rewrite the immediate of `mov eax, imm32` in f, then call f again.
        a.mov(ebx, addr(0))?;
        a.mov(dword_ptr(ebx + 1), 0x2222_2222)?;
        a.call(f)?;
        a.out(0x80, eax)?;
        a.out(0xF4, al)?;
        a.set_label(&mut f)?;
        a.mov(eax, 0x1111_1111)?;
        a.ret()?;
        Ok(vec![f])
    });
    let mut k = Kernel::with_code(&code);
    k.run();
    assert_eq!(k.outs, vec![(0x80, 0x1111_1111), (0x80, 0x2222_2222)]);
    let s = k.bt.stats();
    assert!(s.iter().any(|(n, v)| n == "engine/invalidations" && *v > 0), "{s:?}");
}

#[test]
fn far_jump_and_iret_change_cs_and_eip() {
    let code = assemble_resolving(CODE, |a, addr| {
        let mut far_target = a.create_label();
        let mut iret_target = a.create_label();
        a.mov(dword_ptr(DATA), addr(0))?;
        a.mov(word_ptr(DATA + 4), 0x18)?;
        a.jmp(fword_ptr(DATA))?;
        a.out(0xF4, al)?; // never
        a.set_label(&mut far_target)?;
        a.mov(eax, cs)?;
        a.out(0x80, eax)?;
        a.mov(eax, addr(1))?;
        a.pushfd()?;
        a.push(0x08)?;
        a.push(eax)?;
        a.iretd()?;
        a.out(0xF4, al)?; // never
        a.set_label(&mut iret_target)?;
        a.mov(eax, cs)?;
        a.out(0x80, eax)?;
        a.out(0xF4, al)?;
        Ok(vec![far_target, iret_target])
    });
    let mut k = Kernel::with_code(&code);
    tables(&mut k, &[]);
    k.run();
    assert_eq!(k.outs, vec![(0x80, 0x18), (0x80, 0x08)]);
}

/// Ports that answer IN with `0x1234_5600 | port low byte` and record OUTs;
/// port 0xF4 stops the run (its OUT changes the loop state).
struct FakePorts {
    outs: Vec<(u16, u8, u32)>,
    stop: bool,
}

impl monitor::backend::Ports for FakePorts {
    fn io_in(&mut self, port: u16, _size: u8) -> u32 {
        0x1234_5600 | u32::from(port & 0xFF)
    }
    fn io_out(&mut self, port: u16, size: u8, value: u32) {
        self.outs.push((port, size, value));
        self.stop |= port == 0xF4;
    }
    fn loop_state(&mut self) -> monitor::backend::LoopState {
        monitor::backend::LoopState { interrupt_pending: false, next_deadline_ns: None, events: self.stop }
    }
}

#[test]
fn port_io_in_place_matches_port_io_through_the_run_loop() {
    // IN of every size into registers that keep their other bytes, OUT of
    // every size, then OUT 0xF4.
    let body = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        a.mov(eax, 0xAABB_CCDDu32)?;
        a.mov(dx, 0x61)?;
        a.in_(al, dx)?;
        a.mov(ebx, eax)?;
        a.mov(eax, 0xAABB_CCDDu32)?;
        a.mov(dx, 0x62)?;
        a.in_(ax, dx)?;
        a.mov(ecx, eax)?;
        a.in_(eax, 0x63)?;
        a.mov(esi, eax)?;
        a.mov(dx, 0x70)?;
        a.out(dx, al)?;
        a.out(dx, ax)?;
        a.out(dx, eax)?;
        a.mov(eax, 7)?;
        a.out(0xF4, eax)?;
        a.hlt()?;
        Ok(())
    };
    // Through the run loop: every access is an exit, answered as FakePorts would.
    let mut k = Kernel::new(body);
    let mut loop_ports = FakePorts { outs: Vec::new(), stop: false };
    loop {
        match k.bt.run().expect("run") {
            VmExit::IoIn { port, size } => {
                let v = monitor::backend::Ports::io_in(&mut loop_ports, port, size);
                k.bt.complete_io_in(v);
            }
            VmExit::IoOut { port, size, value } => {
                monitor::backend::Ports::io_out(&mut loop_ports, port, size, value);
                if port == 0xF4 {
                    break;
                }
            }
            VmExit::Interrupted => {}
            e => panic!("unexpected exit {e:?}"),
        }
    }
    let through_loop = k.bt.cpu().clone();
    drop(k);
    // In place: the same guest with the ports lent to the backend.
    let mut k = Kernel::new(body);
    let mut ports = FakePorts { outs: Vec::new(), stop: false };
    while !ports.stop {
        match k.bt.run_with_ports(&mut ports).expect("run") {
            VmExit::Interrupted => {}
            e => panic!("an access left the backend: {e:?}"),
        }
    }
    let in_place = k.bt.cpu().clone();
    assert_eq!(ports.outs, loop_ports.outs);
    assert_eq!(in_place.gpr, through_loop.gpr, "registers differ");
    assert_eq!(in_place.eip, through_loop.eip);
    assert_eq!(in_place.gpr[3], 0xAABB_CC61, "IN AL keeps the upper bytes");
    assert_eq!(in_place.gpr[1], 0xAABB_5662, "IN AX keeps the upper half");
    assert_eq!(in_place.gpr[6], 0x1234_5663);
    let stats = k.bt.stats();
    assert!(stats.iter().any(|(n, v)| n == "bt/exits/io_in_place" && *v >= 7), "{stats:?}");
}

#[test]
fn callouts_keep_every_arithmetic_flag_and_df() {
    // For each pattern: load it into EFLAGS (inline POPFD), make a callout
    // (MOV from CR0: resumed from the exit path), read EFLAGS back (inline
    // PUSHFD) and OUT it to port 0x80.
    const PATTERNS: [u32; 8] = [0x000, 0x8D5, 0x800, 0x001, 0x044, 0x490, 0xCD5, 0x400];
    let mut k = Kernel::new(|a| {
        for p in PATTERNS {
            a.push(p | 0x202)?;
            a.popfd()?;
            a.mov(ebx, cr0)?;
            a.pushfd()?;
            a.pop(eax)?;
            a.cld()?;
            a.out(0x80, eax)?;
        }
        a.mov(eax, 1)?;
        a.out(0xF4, eax)?;
        a.hlt()?;
        Ok(())
    });
    assert_eq!(k.run(), 1);
    const MASK: u32 = 0x8D5 | 0x400;
    let seen: Vec<u32> = k.outs.iter().filter(|(p, _)| *p == 0x80).map(|(_, v)| v & MASK).collect();
    assert_eq!(seen, PATTERNS.to_vec(), "flags across a callout");
}

/// Segment loads for [`inline_segment_loads_match_their_callout_twin`]:
/// (selector, register, by POP, EFLAGS pattern, read through it).
const SEG_CASES: [(u32, &str, bool, u32, bool); 14] = [
    (0x30, "ds", false, 0x8D5, true), // data at DATA
    (0x30, "es", true, 0x000, true),
    (0x38, "fs", false, 0x044, true),  // accessed bit clear: the first load sets it
    (0x38, "fs", false, 0x801, true),  // ... and the second may be inline
    (0x30, "gs", false, 0x490, true),  // GS: the guest selector of GS-prefixed code
    (0x33, "ds", false, 0xCD5, false), // RPL 3 > DPL 0: #GP(0x30)
    (0x40, "ds", true, 0x001, false),  // not present: #NP(0x40)
    (0x48, "es", false, 0x8D5, false), // execute-only code: #GP(0x48)
    (0x00, "es", false, 0x044, false), // null: loads
    (0x03, "fs", true, 0x800, false),  // null with RPL 3: loads
    (0x0C, "ds", false, 0x0D5, false), // LDT selector, no LDT: #GP(0x0C)
    (0x50, "ds", false, 0x000, false), // beyond the GDT limit: #GP(0x50)
    (0x10, "gs", true, 0x004, true),   // flat again
    (0x30, "ds", false, 0x080, true),  // after the GDT write below: the new base
];

/// Runs [`SEG_CASES`] under `config` and returns what the guest reported.
fn run_segment_cases(config: BtConfig) -> (Vec<(u16, u32)>, u64) {
    const HANDLER: u32 = 0x15_0000;
    // After each case: EFLAGS (port 0x80), the selector MOV from Sreg
    // reads back (0x82) and a dword read through the register (0x83). The
    // fault handler reports the error code (0x81) and skips the load (EDI
    // holds its length).
    let code = assemble(CODE, |a| {
        for (i, &(sel, reg, pop, flags, read)) in SEG_CASES.iter().enumerate() {
            if i == SEG_CASES.len() - 1 {
                // Rewrite descriptor 0x30's base (DATA -> DATA + 0x100).
                a.mov(word_ptr(GDT + 0x30 + 2), (DATA + 0x100) & 0xFFFF)?;
            }
            a.push(flags | 0x202)?;
            a.popfd()?;
            a.mov(eax, sel)?;
            if pop {
                a.mov(edi, 1)?;
                a.push(eax)?;
                match reg {
                    "ds" => a.pop(ds)?,
                    "es" => a.pop(es)?,
                    "fs" => a.pop(fs)?,
                    _ => a.pop(gs)?,
                }
            } else {
                a.mov(edi, 2)?;
                // MOV Sreg, r32: 8E /r with no prefix, 2 bytes.
                match reg {
                    "ds" => a.mov(ds, eax)?,
                    "es" => a.mov(es, eax)?,
                    "fs" => a.mov(fs, eax)?,
                    _ => a.mov(gs, eax)?,
                }
            }
            a.pushfd()?;
            a.pop(ebx)?;
            if pop && sel != 0x40 {
                // The pop released its slot; a faulting one did not.
            } else if pop {
                a.pop(ecx)?;
            }
            match reg {
                "ds" => a.mov(ecx, ds)?,
                "es" => a.mov(ecx, es)?,
                "fs" => a.mov(ecx, fs)?,
                _ => a.mov(ecx, gs)?,
            }
            a.mov(edx, 0xDEAD)?;
            if read {
                match reg {
                    "ds" => a.mov(edx, dword_ptr(0x100).ds())?,
                    "es" => a.mov(edx, dword_ptr(0x100).es())?,
                    "fs" => a.mov(edx, dword_ptr(0x100).fs())?,
                    _ => a.mov(edx, dword_ptr(0x100).gs())?,
                }
            }
            a.mov(eax, 0x10)?;
            a.mov(ds, ax)?;
            a.mov(eax, ebx)?;
            a.out(0x80, eax)?;
            a.mov(eax, ecx)?;
            a.out(0x82, eax)?;
            a.mov(eax, edx)?;
            a.out(0x83, eax)?;
        }
        // VERW of each selector, from both ZF states: only ZF may change.
        for sel in [0x10u32, 0x30, 0x33, 0x38, 0x40, 0x48, 0x00, 0x50, 0x0C, 0x08] {
            for flags in [0x8D5u32, 0x000] {
                a.push(flags | 0x202)?;
                a.popfd()?;
                a.mov(eax, sel)?;
                a.verw(ax)?;
                a.pushfd()?;
                a.pop(eax)?;
                a.out(0x84, eax)?;
            }
        }
        a.mov(eax, 1)?;
        a.out(0xF4, eax)
    });
    let handler = assemble(HANDLER, |a| {
        a.pop(eax)?;
        a.out(0x81, eax)?;
        a.add(dword_ptr(esp), edi)?;
        a.iretd()
    });
    let mut k = Kernel::with_config(&code, config);
    k.mem.write(u64::from(HANDLER), &handler).unwrap();
    let gdt: [u64; 10] = [
        0,
        0x00cf_9b00_0000_ffff, // 0x08 code
        0x00cf_9300_0000_ffff, // 0x10 flat data
        0,
        0,
        0,
        0x0040_9320_0000_ffff, // 0x30 data at DATA (0x200000)
        0x0040_9220_0100_ffff, // 0x38 data at DATA + 0x100, not accessed
        0x0040_1320_0000_ffff, // 0x40 not present
        0x00cf_9900_0000_ffff, // 0x48 execute-only code
    ];
    for (i, d) in gdt.iter().enumerate() {
        k.mem.write(u64::from(GDT) + 8 * i as u64, &d.to_le_bytes()).unwrap();
    }
    for (v, at) in [(13u8, HANDLER), (11, HANDLER)] {
        let lo = (at & 0xFFFF) | (0x08 << 16);
        let hi = (at & 0xFFFF_0000) | 0x8E00;
        let gate = u64::from(lo) | (u64::from(hi) << 32);
        k.mem.write(u64::from(IDT) + 8 * u64::from(v), &gate.to_le_bytes()).unwrap();
    }
    for (at, v) in [(0x100u32, 0x3333_3333u32), (DATA + 0x100, 0x2222_2222), (DATA + 0x200, 0x4444_4444)] {
        k.mem.write(u64::from(at), &v.to_le_bytes()).unwrap();
    }
    let c = k.bt.cpu_mut();
    c.gdtr = monitor::cpu::TableReg { base: GDT, limit: 8 * 10 - 1 };
    c.idtr = monitor::cpu::TableReg { base: IDT, limit: 0x7FF };
    assert_eq!(k.run(), 1);
    let stats = k.bt.engine().stats();
    let callouts: u64 = stats
        .callouts_taken
        .iter()
        .filter(|(kind, _)| kind.contains("toseg") || kind.contains("popseg") || kind.contains("verw"))
        .map(|x| x.1)
        .sum();
    (k.outs.clone(), callouts)
}

#[test]
fn inline_segment_loads_match_their_callout_twin() {
    let mut callout = BtConfig::default();
    callout.apply_switch("nosegcache").unwrap();
    let (callout_outs, callout_callouts) = run_segment_cases(callout);
    let (inline_outs, inline_callouts) = run_segment_cases(BtConfig::default());
    assert_eq!(inline_outs, callout_outs, "inline loads differ from their callouts");
    assert!(
        inline_callouts < callout_callouts,
        "the segment cache took no load inline ({inline_callouts} vs {callout_callouts} callouts)"
    );
    // And the reference itself says what the architecture says.
    let of = |port: u16| -> Vec<u32> { callout_outs.iter().filter(|o| o.0 == port).map(|o| o.1).collect() };
    assert_eq!(of(0x81), vec![0x30, 0x40, 0x48, 0x0C, 0x50], "error codes of the faulting loads");
    let reads = of(0x83);
    assert_eq!(&reads[..5], &[0x2222_2222, 0x2222_2222, 0x4444_4444, 0x4444_4444, 0x2222_2222]);
    assert_eq!(reads[12], 0x3333_3333, "flat GS");
    assert_eq!(reads[13], 0x4444_4444, "the reload after the GDT write sees the new base");
    // VERW: ZF set for the writable data segments 0x10, 0x30, 0x38 and
    // 0x40 (VERW does not check presence), everything else untouched.
    let verw: Vec<u32> = of(0x84).iter().map(|f| f & (0x8D5 | 0x400)).collect();
    let mut want = Vec::new();
    for sel in [0x10u32, 0x30, 0x33, 0x38, 0x40, 0x48, 0x00, 0x50, 0x0C, 0x08] {
        let zf = if [0x10, 0x30, 0x38, 0x40].contains(&sel) { 0x40 } else { 0 };
        want.extend([0x8D5 & !0x40 | zf, zf]);
    }
    assert_eq!(verw, want, "VERW");
    let flags: Vec<u32> = of(0x80).iter().map(|f| f & (0x8D5 | 0x400)).collect();
    let want: Vec<u32> = SEG_CASES.iter().map(|c| c.3).collect();
    assert_eq!(flags, want, "EFLAGS across the loads");
}

/// Two mask registers (0x21, 0xA1) that read back what was written, and a
/// "poll mode" (port 0x20 written with 0x0C) in which a read of 0x21 has a
/// side effect, so the backend may not answer it from its cache.
struct MaskPorts {
    masks: [u8; 2],
    poll: bool,
    reads: u32,
    stop: bool,
}

impl monitor::backend::Ports for MaskPorts {
    fn io_in(&mut self, port: u16, _size: u8) -> u32 {
        self.reads += 1;
        match port {
            0x21 if self.poll => {
                self.poll = false;
                0x80
            }
            0x21 => u32::from(self.masks[0]),
            0xA1 => u32::from(self.masks[1]),
            _ => 0xFF,
        }
    }
    fn io_out(&mut self, port: u16, _size: u8, value: u32) {
        match port {
            0x21 => self.masks[0] = value as u8,
            0xA1 => self.masks[1] = value as u8,
            0x20 => self.poll = value == 0x0C,
            _ => self.stop |= port == 0xF4,
        }
    }
    fn loop_state(&mut self) -> monitor::backend::LoopState {
        monitor::backend::LoopState { interrupt_pending: false, next_deadline_ns: None, events: self.stop }
    }
    fn quiet_read(&mut self, port: u16) -> Option<u8> {
        match port {
            0x21 if !self.poll => Some(self.masks[0]),
            0xA1 => Some(self.masks[1]),
            _ => None,
        }
    }
}

#[test]
fn cached_port_reads_see_every_write_and_skip_side_effects() {
    // Reads of both masks (DX and imm8 forms) around writes, a read in
    // "poll mode", then OUT 0xF4. Each read goes to EDI's stack of results.
    let code = assemble(CODE, |a| {
        a.mov(edi, DATA)?;
        for (port, value) in [(0x21u32, 0x5Au32), (0xA1, 0xC3), (0x21, 0xFF)] {
            a.mov(eax, value)?;
            a.out(port, al)?;
            a.mov(eax, 0xAABB_CC00u32)?;
            a.mov(dx, port)?;
            a.in_(al, dx)?;
            a.stosd()?;
            a.mov(eax, 0x1122_3300)?;
            a.in_(al, port)?;
            a.stosd()?;
        }
        a.mov(eax, 0x0C)?;
        a.out(0x20, al)?;
        a.in_(al, 0x21)?;
        a.stosd()?;
        a.in_(al, 0x21)?;
        a.stosd()?;
        a.out(0xF4, al)?;
        a.hlt()
    });
    let mut k = Kernel::with_code(&code);
    let mut ports = MaskPorts { masks: [0, 0], poll: false, reads: 0, stop: false };
    while !ports.stop {
        match k.bt.run_with_ports(&mut ports).expect("run") {
            VmExit::Interrupted => {}
            e => panic!("an access left the backend: {e:?}"),
        }
    }
    let mut got = [0u8; 8 * 4];
    k.mem.read(u64::from(DATA), &mut got).unwrap();
    let got: Vec<u32> = got.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(
        got,
        vec![0xAABB_CC5A, 0x1122_335A, 0xAABB_CCC3, 0x1122_33C3, 0xAABB_CCFF, 0x1122_33FF, 0x0000_0080, 0x0000_00FF],
        "each read sees the last write; the poll-mode read reached the port"
    );
    assert_eq!(ports.reads, 1, "only the poll-mode read went to the ports");
}

/// String instructions on guest page 0 (below the host's mmap_min_addr,
/// never mapped in the window, so every access is emulated): LODS, STOS,
/// MOVS and CMPS with REP, as the same code gives on page 5
/// (docs/reliability.md, finding 9 of `popek fuzz cpl0`: `lodsb` there
/// used to stop the VM).
#[test]
fn string_instructions_on_guest_page_0_match_the_same_on_another_page() {
    fn on_page(base: u32) -> (Vec<(u16, u32)>, Vec<u8>) {
        let mut k = Kernel::new(|a| {
            a.cld()?;
            // Fill 0xC00 bytes at base+0x100 with a pattern, by REP STOSD.
            a.mov(edi, base + 0x100)?;
            a.mov(eax, 0x0403_0201u32)?;
            a.mov(ecx, 0x300)?;
            a.rep().stosd()?;
            // One LODSB from base+0x8d0 (finding 9's address).
            a.mov(esi, base + 0x8D0)?;
            a.lodsb()?;
            a.movzx(eax, al)?;
            a.out(0x80, eax)?;
            // REP MOVSB 0x40 bytes from DATA into base+0x200, backwards.
            a.std()?;
            a.mov(esi, DATA + 0x3F)?;
            a.mov(edi, base + 0x23F)?;
            a.mov(ecx, 0x40)?;
            a.rep().movsb()?;
            a.cld()?;
            a.mov(eax, edi)?;
            a.out(0x80, eax)?;
            // REPE CMPSD of base+0x100 against DATA+0x100 (equal for 8
            // dwords, then different): ECX left and the flags.
            a.mov(esi, base + 0x100)?;
            a.mov(edi, DATA + 0x100)?;
            a.mov(ecx, 0x20)?;
            a.repe().cmpsd()?;
            a.pushfd()?;
            a.pop(eax)?;
            a.and(eax, 0x8D5)?;
            a.out(0x80, eax)?;
            a.mov(eax, ecx)?;
            a.out(0xF4, eax)
        });
        let data: Vec<u8> = (0..0x40u8).map(|i| i.wrapping_mul(7)).collect();
        k.mem.write(u64::from(DATA), &data).unwrap();
        let mut cmp = vec![0u8; 0x80];
        for (i, b) in cmp.iter_mut().enumerate() {
            *b = if i < 32 { [1, 2, 3, 4][i % 4] } else { 0xEE };
        }
        k.mem.write(u64::from(DATA + 0x100), &cmp).unwrap();
        let left = k.run();
        let mut outs = k.outs.clone();
        outs.push((0xF4, left));
        let mut bytes = vec![0u8; 0x300];
        k.mem.read(u64::from(base), &mut bytes).unwrap();
        (outs, bytes)
    }
    let (outs0, mem0) = on_page(0);
    let (outs5, mem5) = on_page(0x5000);
    // The same results, with the EDI printed relative to its page.
    let rel = |outs: &[(u16, u32)], base: u32| -> Vec<(u16, u32)> {
        outs.iter().enumerate().map(|(i, &(p, v))| (p, if i == 1 { v - base } else { v })).collect()
    };
    assert_eq!(rel(&outs0, 0), rel(&outs5, 0x5000));
    assert_eq!(mem0[0x100..0x240], mem5[0x100..0x240]);
    assert_eq!(outs0[0], (0x80, 0x01), "LODSB read the pattern");
    assert_eq!(outs0[1], (0x80, 0x1FF), "MOVSB went backwards: EDI one below the copy");
    assert_eq!(mem0[0x200..0x240], (0..0x40u8).map(|i| i.wrapping_mul(7)).collect::<Vec<_>>()[..]);
    assert_eq!(outs0[3], (0xF4, 0x20 - 9), "CMPSD stopped at the ninth dword");
}

/// Runs the INVLPG cases with `config`: each case reads a page through
/// the shadow, changes the guest's mapping, INVLPGs it one way or another
/// and reads again (port 0x80). Returns the reads and the INVLPG callouts.
fn run_invlpg_cases(config: BtConfig) -> (Vec<u32>, u64) {
    const PD: u32 = 0xA_0000;
    const PT: u32 = 0xA_1000; // maps 4-8 MiB in 4 KiB pages
    const A: u32 = 0xC0_0000; // a 4 MiB-aligned frame: also the remapped large page
    const B: u32 = 0xC0_1000;
    let pte = |i: u32| PT + 4 * i;
    let page = |i: u32| 0x40_0000 + 0x1000 * i;
    let code = assemble(CODE, |a| {
        // Identity 0-4 MiB (large), the page table for 4-8 MiB, identity 8-12 MiB (large).
        a.mov(dword_ptr(PD), 0x83)?;
        a.mov(dword_ptr(PD + 4), PT | 3)?;
        a.mov(dword_ptr(PD + 8), 0x80_0083)?;
        for i in 0..16 {
            a.mov(dword_ptr(pte(i)), A | 3)?;
        }
        a.mov(eax, PD)?;
        a.mov(cr3, eax)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x10)?; // PSE
        a.mov(cr4, eax)?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32)?;
        a.mov(cr0, eax)?;
        let read = |a: &mut CodeAssembler, at: u32| -> Result<(), IcedError> {
            a.mov(eax, dword_ptr(at))?;
            a.out(0x80, eax)
        };
        // 1. A shadowed page remapped: the INVLPG must drop its shadow.
        read(a, page(0))?;
        a.mov(dword_ptr(pte(0)), B | 3)?;
        a.mov(eax, page(0))?;
        a.invlpg(dword_ptr(eax))?;
        read(a, page(0))?;
        // 2. An INVLPG that keeps the shadow (mapping unchanged) must not
        // forget it: the next one, after the change, drops it.
        read(a, page(1))?;
        a.invlpg(dword_ptr(page(1)))?;
        a.mov(dword_ptr(pte(1)), B | 3)?;
        a.invlpg(dword_ptr(page(1)))?;
        read(a, page(1))?;
        // 3. INVLPGs of a page with nothing left (inline once the first
        // callout found nothing), then a change back.
        read(a, page(2))?;
        a.mov(dword_ptr(pte(2)), B | 3)?;
        for _ in 0..3 {
            a.invlpg(dword_ptr(page(2)))?;
        }
        a.mov(dword_ptr(pte(2)), A | 3)?;
        a.invlpg(dword_ptr(page(2)))?;
        read(a, page(2))?;
        // 4. Segment bases: ES and DS based at 0x1000 name the page after
        // the effective address, which itself was never touched.
        for (sreg_es, (touched, i)) in [(true, (page(8), 8)), (false, (page(10), 10))] {
            read(a, touched)?;
            a.mov(dword_ptr(pte(i)), B | 3)?;
            a.mov(eax, 0x18)?;
            if sreg_es {
                a.mov(es, ax)?;
                a.invlpg(dword_ptr(touched - 0x1000).es())?;
            } else {
                a.mov(ds, ax)?;
                a.invlpg(dword_ptr(touched - 0x1000))?;
            }
            a.mov(eax, 0x10)?;
            a.mov(es, ax)?;
            a.mov(ds, ax)?;
            read(a, touched)?;
        }
        // 5. An SS-relative operand.
        read(a, page(12))?;
        a.mov(dword_ptr(pte(12)), B | 3)?;
        a.mov(ebp, page(12))?;
        a.invlpg(dword_ptr(ebp))?;
        read(a, page(12))?;
        // 6. A large page: an INVLPG of another 4 KiB page inside it drops
        // the whole guest TLB entry.
        read(a, 0x80_1000)?;
        a.mov(dword_ptr(PD + 8), A | 0x83)?;
        a.invlpg(dword_ptr(0xBF_F000))?;
        read(a, 0x80_1000)?;
        a.mov(eax, 1)?;
        a.out(0xF4, eax)
    });
    let mut k = Kernel::with_config(&code, config);
    for (at, v) in [(A, 0xAAAA_0000u32), (B, 0xBBBB_0000), (0x80_1000, 0x8888_0000)] {
        k.mem.write(u64::from(at), &v.to_le_bytes()).unwrap();
    }
    let gdt: [u64; 4] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00cf_9300_1000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        k.mem.write(u64::from(GDT) + 8 * i as u64, &d.to_le_bytes()).unwrap();
    }
    k.bt.cpu_mut().gdtr = monitor::cpu::TableReg { base: GDT, limit: 8 * 4 - 1 };
    assert_eq!(k.run(), 1);
    let callouts =
        k.bt.engine().stats().callouts_taken.iter().filter(|(kind, _)| kind.contains("invlpg")).map(|x| x.1).sum();
    let reads = k.outs.iter().filter(|o| o.0 == 0x80).map(|o| o.1).collect();
    (reads, callouts)
}

#[test]
fn inline_invlpg_matches_its_callout_twin() {
    let mut callout = BtConfig::default();
    callout.apply_switch("noinline").unwrap();
    let (callout_reads, callout_callouts) = run_invlpg_cases(callout);
    let (inline_reads, inline_callouts) = run_invlpg_cases(BtConfig::default());
    let (a, b, large) = (0xAAAA_0000u32, 0xBBBB_0000u32, 0x8888_0000u32);
    // What the architecture says: every read after an INVLPG sees the new mapping.
    let want = vec![a, b, a, b, a, a, a, b, a, b, a, b, large, b];
    assert_eq!(callout_reads, want, "the callout path");
    assert_eq!(inline_reads, want, "the inline path");
    assert!(
        inline_callouts < callout_callouts,
        "no INVLPG retired inline ({inline_callouts} vs {callout_callouts} callouts)"
    );
}
