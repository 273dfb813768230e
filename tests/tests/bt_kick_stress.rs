//! Precise state under asynchronous exits: translated kernel code hammered
//! by kicks must compute exactly what it computes undisturbed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use iced_x86::code_asm::*;
use monitor::backend::bt::{BtBackend, BtConfig};
use monitor::backend::{Backend, VmExit};
use monitor::cpu::Cpu;
use monitor::memory::GuestMemory;
use popek_tests::*;

const ITER: u32 = 2_000_000;

/// Guest code for one loop iteration.
type Body = dyn Fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>;

/// Runs `code` at CPL 0 under a kick storm; returns (EAX, ESP, exits) at
/// the final `out 0xf4`.
fn stress(
    name: &str,
    f: impl Fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    cfg: BtConfig,
) -> (u32, u32, u64) {
    let _l = vm_lock();
    let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
    mem.write(u64::from(CODE), &assemble(CODE, f)).unwrap();
    let mut cpu = Cpu::flat_protected(0x08, 0x10);
    cpu.eip = CODE;
    cpu.gpr[4] = STACK_TOP;
    let mut bt = BtBackend::new(mem, cpu, cfg).unwrap();
    let kick = bt.kicker();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let t = std::thread::spawn(move || {
        while !s2.load(Ordering::Relaxed) {
            kick();
            std::thread::sleep(Duration::from_micros(20));
        }
    });
    let mut kicks = 0u64;
    let r = loop {
        match bt.run().unwrap() {
            VmExit::Interrupted => kicks += 1,
            VmExit::IoOut { port: 0xF4, .. } => break (bt.cpu().gpr[0], bt.cpu().gpr[4], kicks),
            e => panic!("{name}: unexpected {e:?}\n{}", bt.cpu().dump()),
        }
    };
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    r
}

fn loop_of(
    body: impl Fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> impl Fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    move |a| {
        let mut top = a.create_label();
        let mut f = a.create_label();
        a.xor(eax, eax)?;
        a.mov(ebx, ITER)?;
        a.mov(ecx, 7)?;
        a.set_label(&mut top)?;
        body(a)?;
        a.dec(ebx)?;
        a.jnz(top)?;
        a.out(0xF4, al)?;
        a.set_label(&mut f)?;
        a.add(eax, ecx)?;
        a.ret()
    }
}

#[test]
fn kicks_do_not_disturb_calls_flags_and_interrupt_masking() {
    let cases: Vec<(&str, Box<Body>)> = vec![
        ("add", Box::new(|a: &mut CodeAssembler| a.add(eax, ecx))),
        (
            "pushf_popf",
            Box::new(|a: &mut CodeAssembler| {
                a.pushfd()?;
                a.add(eax, ecx)?;
                a.popfd()
            }),
        ),
        (
            "cli_sti",
            Box::new(|a: &mut CodeAssembler| {
                a.cli()?;
                a.add(eax, ecx)?;
                a.sti()
            }),
        ),
        (
            "pushf_cli_popf",
            Box::new(|a: &mut CodeAssembler| {
                a.pushfd()?;
                a.cli()?;
                a.add(eax, ecx)?;
                a.popfd()
            }),
        ),
        (
            "call_ret",
            Box::new(|a: &mut CodeAssembler| {
                let mut f = a.create_label();
                let mut over = a.create_label();
                a.call(f)?;
                a.jmp(over)?;
                a.set_label(&mut f)?;
                a.add(eax, ecx)?;
                a.ret()?;
                a.set_label(&mut over)?;
                a.nop()
            }),
        ),
        (
            "push_ret",
            Box::new(|a: &mut CodeAssembler| {
                let mut l = a.create_label();
                a.call(l)?;
                a.set_label(&mut l)?;
                a.add(eax, ecx)?;
                a.add(esp, 4)
            }),
        ),
    ];
    for (name, body) in cases {
        for inline in [true, false] {
            let mut cfg = BtConfig::default();
            cfg.engine.inline_flags = inline;
            let (eax_, esp_, kicks) = stress(name, loop_of(&body), cfg);
            eprintln!("{name} inline={inline}: {kicks} kicks");
            assert_eq!((eax_, esp_), (ITER.wrapping_mul(7), STACK_TOP), "{name} inline={inline} after {kicks} kicks");
        }
    }
}
