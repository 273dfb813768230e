//! The `kvm` backend on small raw guests: I/O exits (single and string),
//! HLT, kicks, interrupt injection through the interrupt window, triple
//! fault, state round trip, and the speed calibration.
//!
//! Every test needs a usable /dev/kvm: without one it prints why and
//! returns. /dev/kvm on the project's machines emulates 32-bit guests at a
//! few million instructions per second, so the guests stay tiny.

use std::time::Duration;

use monitor::backend::kvm::{self, KvmBackend};
use monitor::backend::{Backend, BackendError, VmExit};
use monitor::cpu::state::{gpr, TableReg};
use monitor::cpu::Cpu;
use monitor::memory::GuestMemory;

const CODE: u32 = 0x1000;

/// A backend running `code` at CODE in flat protected mode, or `None`
/// (with the reason printed) when KVM is unusable here.
fn guest(code: &[u8]) -> Option<(GuestMemory, KvmBackend)> {
    let mem = GuestMemory::new(4 << 20).expect("guest RAM");
    mem.write(u64::from(CODE), code).expect("load code");
    // GDT at 0x500: null, flat code (0x08), flat data (0x10).
    for (i, d) in [0u64, 0x00CF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF].iter().enumerate() {
        mem.write(0x500 + 8 * i as u64, &d.to_le_bytes()).expect("GDT");
    }
    let mut cpu = Cpu::flat_protected(0x08, 0x10);
    cpu.gdtr = TableReg { base: 0x500, limit: 23 };
    cpu.eip = CODE;
    cpu.gpr[gpr::ESP] = 0x8000;
    match KvmBackend::new(&mem, &cpu) {
        Ok(be) => Some((mem, be)),
        Err(e @ BackendError::Unavailable(..)) => {
            println!("SKIP: {e}");
            None
        }
        Err(e) => panic!("KVM is present but the backend failed: {e}"),
    }
}

#[test]
fn kvm_io_exits_and_halt() {
    // in al, 0x61 ; inc al ; out 0x80, al ; mov eax, 0x12345678 ;
    // mov dx, 0xf4 ; out dx, eax ; hlt
    let code = [0xE4, 0x61, 0xFE, 0xC0, 0xE6, 0x80, 0xB8, 0x78, 0x56, 0x34, 0x12, 0x66, 0xBA, 0xF4, 0x00, 0xEF, 0xF4];
    let Some((_mem, mut be)) = guest(&code) else { return };
    assert_eq!(be.run().unwrap(), VmExit::IoIn { port: 0x61, size: 1 });
    be.complete_io_in(0x41);
    assert_eq!(be.run().unwrap(), VmExit::IoOut { port: 0x80, size: 1, value: 0x42 });
    assert_eq!(be.run().unwrap(), VmExit::IoOut { port: 0xF4, size: 4, value: 0x1234_5678 });
    assert_eq!(be.run().unwrap(), VmExit::Halt);
    let cpu = be.cpu_state();
    assert_eq!(cpu.eip, CODE + code.len() as u32, "EIP after HLT");
    assert_eq!(cpu.gpr[gpr::EAX], 0x1234_5678);
    assert_eq!(cpu.cpl, 0);
    assert!(cpu.protected_mode() && !cpu.paging());
    assert!(be.stats().iter().any(|(n, v)| n == "kvm/exits/io_out" && *v == 2));
}

#[test]
fn kvm_string_io_is_split_into_elements() {
    // mov esi, 0x2000 ; mov ecx, 3 ; mov dx, 0x3f8 ; rep outsb ;
    // mov edi, 0x2100 ; mov ecx, 2 ; mov dx, 0x60 ; rep insw ; hlt
    let code = [
        0xBE, 0x00, 0x20, 0x00, 0x00, 0xB9, 0x03, 0x00, 0x00, 0x00, 0x66, 0xBA, 0xF8, 0x03, 0xF3, 0x6E, 0xBF, 0x00,
        0x21, 0x00, 0x00, 0xB9, 0x02, 0x00, 0x00, 0x00, 0x66, 0xBA, 0x60, 0x00, 0xF3, 0x66, 0x6D, 0xF4,
    ];
    let Some((mem, mut be)) = guest(&code) else { return };
    mem.write(0x2000, b"abc").unwrap();
    let mut out = Vec::new();
    let mut ins = 0u32;
    loop {
        match be.run().unwrap() {
            VmExit::IoOut { port: 0x3F8, size: 1, value } => out.push(value as u8),
            VmExit::IoIn { port: 0x60, size: 2 } => {
                ins += 1;
                be.complete_io_in(0x1110 * ins);
            }
            VmExit::Halt => break,
            VmExit::Interrupted => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(out, b"abc");
    assert_eq!(ins, 2);
    let mut got = [0u8; 4];
    mem.read(0x2100, &mut got).unwrap();
    assert_eq!(got, [0x10, 0x11, 0x20, 0x22]);
}

#[test]
fn kvm_kick_interrupts_a_spinning_guest() {
    let code = [0xEB, 0xFE]; // jmp $
    let Some((_mem, mut be)) = guest(&code) else { return };
    let kick = be.kicker();
    // A kick before the run: the next run returns at once.
    kick();
    assert_eq!(be.run().unwrap(), VmExit::Interrupted);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        kick();
    });
    assert_eq!(be.run().unwrap(), VmExit::Interrupted);
    t.join().unwrap();
    assert_eq!(be.cpu_state().eip, CODE);
}

#[test]
fn kvm_injects_through_the_interrupt_window() {
    // IDT at 0x3000 with vector 0x20 -> handler at 0x1100:
    //   handler: out 0x81, al ; iret
    // main at 0x1000: lidt [0x2000] ; mov al, 7 ; sti ; nop ; 1: jmp 1b
    let mut main = vec![0x0F, 0x01, 0x1D, 0x00, 0x20, 0x00, 0x00, 0xB0, 0x07, 0xFB, 0x90, 0xEB, 0xFE];
    main.resize(0x100, 0x90);
    main.extend_from_slice(&[0xE6, 0x81, 0xCF]);
    let Some((mem, mut be)) = guest(&main) else { return };
    // IDTR image: limit, base.
    mem.write(0x2000, &[0xFF, 0x01, 0x00, 0x30, 0x00, 0x00]).unwrap();
    // Interrupt gate: offset 0x1100, selector 0x08, type 0x8E.
    mem.write(0x3000 + 0x20 * 8, &[0x00, 0x11, 0x08, 0x00, 0x00, 0x8E, 0x00, 0x00]).unwrap();
    be.request_interrupt_window(true);
    let mut injected = false;
    for _ in 0..100 {
        match be.run().unwrap() {
            VmExit::InterruptWindow => {
                assert!(be.interrupts_enabled());
                be.request_interrupt_window(false);
                be.inject_interrupt(0x20).unwrap();
                injected = true;
            }
            VmExit::IoOut { port: 0x81, value, .. } => {
                assert!(injected);
                assert_eq!(value, 7);
                return;
            }
            VmExit::Interrupted => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("the interrupt handler never ran");
}

#[test]
fn kvm_triple_fault_is_reported() {
    // lidt [0x2000] (limit 0) ; ud2
    let code = [0x0F, 0x01, 0x1D, 0x00, 0x20, 0x00, 0x00, 0x0F, 0x0B];
    let Some((_mem, mut be)) = guest(&code) else { return };
    assert_eq!(be.run().unwrap(), VmExit::TripleFault);
}

#[test]
fn kvm_state_round_trips() {
    let code = [0xF4];
    let Some((_mem, mut be)) = guest(&code) else { return };
    let mut cpu = be.cpu_state();
    cpu.gpr = [1, 2, 3, 4, 0x7000, 6, 7, 8];
    cpu.eflags = 0x0000_0046;
    cpu.msr.sysenter_cs = 0x08;
    cpu.msr.sysenter_eip = 0xC000_1000;
    be.set_cpu_state(&cpu).unwrap();
    let back = be.cpu_state();
    assert_eq!(back.gpr, cpu.gpr);
    assert_eq!(back.eflags, cpu.eflags);
    assert_eq!(back.seg, cpu.seg);
    assert_eq!(back.gdtr, cpu.gdtr);
    assert_eq!((back.msr.sysenter_cs, back.msr.sysenter_eip), (0x08, 0xC000_1000));
    assert_eq!(back.cr0, cpu.cr0);
}

#[test]
fn kvm_measures_its_speed() {
    match kvm::measure_speed() {
        Ok(ips) => {
            let kind = if kvm::is_hardware_speed(ips) { "hardware virtualization" } else { "an instruction emulator" };
            println!("KVM speed: {:.1} M guest instructions/s ({kind})", ips / 1e6);
            assert!(ips > 1e5, "implausibly slow: {ips}");
        }
        Err(e @ BackendError::Unavailable(..)) => println!("SKIP: {e}"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn kvm_reports_whether_32bit_paging_works() {
    match kvm::supports_32bit_paging() {
        Ok(p) => println!("KVM 32-bit paging: {}", if p { "works" } else { "refused (#GP on mov cr0 with PG)" }),
        Err(e @ BackendError::Unavailable(..)) => println!("SKIP: {e}"),
        Err(e) => panic!("{e}"),
    }
}
