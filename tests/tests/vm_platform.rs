//! The machine end to end on the bt backend: the shared run loop with the
//! real platform devices (UART, PIC, PIT, isa-debug-exit).

use std::sync::Arc;

use iced_x86::code_asm::*;
use monitor::backend::bt::{BtBackend, BtConfig};
use monitor::cpu::Cpu;

use monitor::memory::GuestMemory;
use monitor::vm::{RunOutcome, Vm};
use popek_tests::*;

const DATA: u32 = 0x20_0000;

fn machine(code: &[u8], gates: &[(u8, u32, u8)]) -> (std::sync::MutexGuard<'static, ()>, Vm, Capture) {
    let lock = vm_lock();
    let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
    mem.write(u64::from(CODE), code).unwrap();
    let mut cpu = Cpu::flat_protected(0x08, 0x10);
    cpu.eip = CODE;
    cpu.gpr[4] = STACK_TOP;
    flat_tables(&mem, &mut cpu, gates, STACK_TOP);
    let (platform, out, clock) = captured_platform(mem.size());
    let bt = BtBackend::new(mem.clone(), cpu, BtConfig::default()).unwrap();
    (lock, Vm::new(mem, platform, Box::new(bt), clock), out)
}

#[test]
fn serial_output_and_debug_exit() {
    let code = assemble(CODE, |a| {
        print_serial(a, b"hello from the TC\n")?;
        a.mov(al, 0x2A)?;
        a.out(0xF4, al)
    });
    let (_l, mut vm, out) = machine(&code, &[]);
    let r = vm.run().unwrap();
    assert_eq!(r, RunOutcome::DebugExit((0x2A << 1) | 1));
    assert_eq!(out.text(), "hello from the TC\n");
}

/// Programs the PIC and the PIT at 1 kHz, then HLTs until 50 timer
/// interrupts have been counted by the IRQ0 handler.
#[test]
fn pit_interrupts_wake_hlt() {
    let code = assemble_resolving(CODE, |a, addr| {
        let mut handler = a.create_label();
        let mut wait = a.create_label();
        for (port, v) in [
            (0x20u32, 0x11u32),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xA0, 0x11),
            (0xA1, 0x28),
            (0xA1, 0x02),
            (0xA1, 0x01),
            (0x21, 0xFE),
            (0xA1, 0xFF),
        ] {
            a.mov(al, v)?;
            a.out(port as u8 as u32, al)?;
        }
        a.mov(al, 0x34)?;
        a.out(0x43, al)?;
        a.mov(al, 0xA9)?; // 1193 = 0x04A9: 1 kHz
        a.out(0x40, al)?;
        a.mov(al, 0x04)?;
        a.out(0x40, al)?;
        a.mov(dword_ptr(DATA), 0)?;
        // IDT gate 0x20 → handler (interrupt gate, ring 0), built by the guest.
        a.mov(eax, addr(0))?;
        a.mov(dword_ptr(DATA + 4), eax)?;
        a.mov(word_ptr(IDT + 0x20 * 8), ax)?;
        a.mov(word_ptr(IDT + 0x20 * 8 + 2), 0x08)?;
        a.mov(word_ptr(IDT + 0x20 * 8 + 4), 0x8E00)?;
        a.shr(eax, 16)?;
        a.mov(word_ptr(IDT + 0x20 * 8 + 6), ax)?;
        a.sti()?;
        a.set_label(&mut wait)?;
        a.hlt()?;
        a.cmp(dword_ptr(DATA), 50)?;
        a.jb(wait)?;
        a.cli()?;
        print_serial(a, b"50 ticks\n")?;
        a.mov(al, 0)?;
        a.out(0xF4, al)?;
        a.set_label(&mut handler)?;
        a.push(eax)?;
        a.inc(dword_ptr(DATA))?;
        a.mov(al, 0x20)?;
        a.out(0x20, al)?;
        a.pop(eax)?;
        a.iretd()?;
        Ok(vec![handler])
    });
    let (_l, mut vm, out) = machine(&code, &[]);
    let r = vm.run().unwrap();
    assert_eq!(r, RunOutcome::DebugExit(1), "{}", out.text());
    assert_eq!(out.text(), "50 ticks\n");
    assert_eq!(vm.mem.read_u32(u64::from(DATA)).unwrap(), 50);
    let stats = vm.stats();
    let get = |n: &str| stats.iter().find(|(k, _)| k == n).map_or(0, |x| x.1);
    assert!(get("vm/interrupts_injected") >= 50);
    assert!(get("vm/halts") >= 50);
}
