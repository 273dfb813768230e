//! A multiboot guest on the `pc` machine that drives the local APIC itself:
//! IA32_APIC_BASE, the software enable, the timer in periodic then one-shot
//! mode at a rate taken from CPUID leaf 0x15, EOIs, a self-IPI, the
//! TSC-deadline mode when CPUID.01H:ECX[24] announces it (a deadline
//! `DEADLINE_TICKS` ahead fires once, after the TSC passed it; a past one at
//! once; 0 disarms), and an empty ISR at the end. It runs through `popek
//! run`'s machine building (the same ELF boots under `qemu-system-i386
//! -machine pc` when QEMU is there: TCG has no TSC-deadline mode, so the
//! guest says so and skips it), in the normal and the deterministic mode.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use monitor::deterministic::{DetOptions, DetOutcome};
use monitor::devices::platform::Machine;
use monitor::run::{run, run_deterministic, DetSession, RunOptions};
use monitor::trace::format::Trace;
use monitor::vm::RunOutcome;
use popek_tests::*;

const LOAD: u32 = 0x10_0000;
const VARS: u32 = 0x20_0000;
const IDT_AT: u32 = 0x21_0000;
const LAPIC: u32 = 0xFEE0_0000;
/// Periodic ticks to wait for.
const TICKS: u32 = 100;

/// Counters in guest memory: timer interrupts, IPIs, the APIC base MSR
/// (low, high), the OR of the ISR words at the end.
const TIMER_COUNT: u32 = VARS;
const IPI_COUNT: u32 = VARS + 4;
const MSR_LOW: u32 = VARS + 8;
const ISR_OR: u32 = VARS + 16;
/// TSC-deadline interrupts, the TSC their handler read (low, high), and the
/// deadline written (low, high).
const DL_COUNT: u32 = VARS + 0x20;
const DL_TSC: u32 = VARS + 0x24;
const DEADLINE: u32 = VARS + 0x2C;
/// How far ahead the guest arms the TSC deadline, in TSC ticks.
const DEADLINE_TICKS: u32 = 20_000_000;
const MSR_TSC_DEADLINE: u32 = 0x6E0;

/// Spins with interrupts as they are until the TSC reaches the 64-bit value
/// at `DEADLINE`.
fn spin_until_deadline(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    let mut spin = a.create_label();
    a.set_label(&mut spin)?;
    a.rdtsc()?;
    a.sub(eax, dword_ptr(DEADLINE))?;
    a.sbb(edx, dword_ptr(DEADLINE + 4))?;
    a.jb(spin)?;
    Ok(())
}

/// `DEADLINE` = the TSC now + `DEADLINE_TICKS`, also left in EDX:EAX.
fn deadline_ahead(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    a.rdtsc()?;
    a.add(eax, DEADLINE_TICKS)?;
    a.adc(edx, 0)?;
    a.mov(dword_ptr(DEADLINE), eax)?;
    a.mov(dword_ptr(DEADLINE + 4), edx)?;
    Ok(())
}

fn guest() -> Vec<u8> {
    assemble_resolving(LOAD, |a, addr| {
        let mut timer = a.create_label();
        let mut ipi = a.create_label();
        let mut spurious = a.create_label();
        let mut idtr = a.create_label();
        let mut wait_periodic = a.create_label();
        let mut wait_oneshot = a.create_label();
        let mut wait_ipi = a.create_label();
        let mut have_rate = a.create_label();
        let mut fail = a.create_label();
        let mut deadline = a.create_label();
        let mut no_deadline = a.create_label();
        let mut deadline_done = a.create_label();
        let mut wait_deadline = a.create_label();
        let mut read_back = a.create_label();
        let mut wait_past = a.create_label();
        a.mov(esp, 0x30_0000u32)?;
        // IDT: gates 0x40 (timer), 0x41 (IPI), 0x42 (TSC deadline), 0xFF (spurious).
        a.mov(ecx, cs)?;
        for (vector, label) in [(0x40u32, 0usize), (0x41, 1), (0x42, 4), (0xFF, 2)] {
            a.mov(eax, addr(label))?;
            a.mov(word_ptr(IDT_AT + vector * 8), ax)?;
            a.mov(word_ptr(IDT_AT + vector * 8 + 2), cx)?; // the loader's flat CS
            a.mov(word_ptr(IDT_AT + vector * 8 + 4), 0x8E00)?;
            a.shr(eax, 16)?;
            a.mov(word_ptr(IDT_AT + vector * 8 + 6), ax)?;
        }
        a.mov(eax, addr(3))?;
        a.lidt(ptr(eax))?;
        a.xor(eax, eax)?;
        for v in [TIMER_COUNT, IPI_COUNT, ISR_OR, DL_COUNT] {
            a.mov(dword_ptr(v), eax)?;
        }
        // The APIC base MSR: enabled, BSP, at 0xfee00000; write it back.
        a.mov(ecx, 0x1Bu32)?;
        a.rdmsr()?;
        a.mov(dword_ptr(MSR_LOW), eax)?;
        a.wrmsr()?;
        // No 8259 interrupts.
        a.mov(al, 0xFFu32)?;
        a.out(0x21, al)?;
        a.out(0xA1, al)?;
        // Software enable, spurious vector 0xff.
        a.mov(dword_ptr(LAPIC + 0xF0), 0x1FF)?;
        // Timer ticks per millisecond at divide-by-1: CPUID 0x15's crystal
        // / 1000 when the CPU says, else a 1 GHz timer (QEMU's).
        a.mov(esi, 1_000_000u32)?;
        a.xor(eax, eax)?;
        a.cpuid()?;
        a.cmp(eax, 0x15)?;
        a.jb(have_rate)?;
        a.mov(eax, 0x15u32)?;
        a.cpuid()?;
        a.test(ecx, ecx)?;
        a.jz(have_rate)?;
        a.mov(eax, ecx)?;
        a.xor(edx, edx)?;
        a.mov(ecx, 1000u32)?;
        a.div(ecx)?;
        a.mov(esi, eax)?;
        a.set_label(&mut have_rate)?;
        a.mov(ebx, esi)?;
        // Periodic at 1 kHz.
        a.mov(dword_ptr(LAPIC + 0x3E0), 0x0B)?;
        a.mov(dword_ptr(LAPIC + 0x320), 0x2_0040)?;
        a.mov(dword_ptr(LAPIC + 0x380), ebx)?;
        a.sti()?;
        a.set_label(&mut wait_periodic)?;
        a.hlt()?;
        a.cmp(dword_ptr(TIMER_COUNT), TICKS)?;
        a.jb(wait_periodic)?;
        // Stop it, take what it already raised, then one-shot: exactly one more.
        a.cli()?;
        a.mov(dword_ptr(LAPIC + 0x320), 0x1_0040)?;
        a.mov(dword_ptr(LAPIC + 0x380), 0)?;
        a.sti()?;
        a.nop()?;
        a.nop()?;
        a.cli()?;
        a.mov(dword_ptr(LAPIC + 0x320), 0x0040)?;
        a.mov(dword_ptr(LAPIC + 0x380), ebx)?;
        a.mov(dword_ptr(TIMER_COUNT), 0)?;
        a.sti()?;
        a.set_label(&mut wait_oneshot)?;
        a.hlt()?;
        a.cmp(dword_ptr(TIMER_COUNT), 1)?;
        a.jb(wait_oneshot)?;
        // Its current count is 0 and it stays quiet.
        a.mov(dword_ptr(ISR_OR + 4), 1)?;
        a.mov(eax, dword_ptr(LAPIC + 0x390))?;
        a.test(eax, eax)?;
        a.jnz(fail)?;
        a.mov(dword_ptr(ISR_OR + 4), 2)?;
        // A self-IPI (shorthand "self", fixed, vector 0x41).
        a.mov(dword_ptr(LAPIC + 0x300), 0x4_0041)?;
        a.set_label(&mut wait_ipi)?;
        a.cmp(dword_ptr(IPI_COUNT), 1)?;
        a.jb(wait_ipi)?;
        a.cli()?;
        a.cmp(dword_ptr(TIMER_COUNT), 1)?;
        a.jne(fail)?;
        a.mov(dword_ptr(ISR_OR + 4), 3)?;
        // TSC-deadline mode, if CPUID.01H:ECX[24] says the timer has it.
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.test(ecx, 1u32 << 24)?;
        a.jz(no_deadline)?;
        a.mov(dword_ptr(ISR_OR + 4), 4)?;
        a.mov(dword_ptr(LAPIC + 0x320), 0x4_0042)?;
        a.mfence()?; // SDM 11.5.4.1: order the LVT write before the WRMSR
                     // The initial count is ignored; the current count reads 0.
        a.mov(dword_ptr(LAPIC + 0x380), 12345)?;
        a.mov(eax, dword_ptr(LAPIC + 0x380))?;
        a.or(eax, dword_ptr(LAPIC + 0x390))?;
        a.jnz(fail)?;
        a.mov(dword_ptr(ISR_OR + 4), 5)?;
        // Arm it DEADLINE_TICKS ahead; it reads back (or 0 if it has fired
        // already, which it may only once the TSC is past it).
        deadline_ahead(a)?;
        a.mov(ecx, MSR_TSC_DEADLINE)?;
        a.wrmsr()?;
        a.rdmsr()?;
        a.cmp(eax, dword_ptr(DEADLINE))?;
        a.jne(read_back)?;
        a.cmp(edx, dword_ptr(DEADLINE + 4))?;
        a.je(deadline)?;
        a.set_label(&mut read_back)?;
        a.or(eax, edx)?;
        a.jnz(fail)?;
        a.rdtsc()?;
        a.sub(eax, dword_ptr(DEADLINE))?;
        a.sbb(edx, dword_ptr(DEADLINE + 4))?;
        a.jb(fail)?;
        a.set_label(&mut deadline)?;
        a.mov(dword_ptr(ISR_OR + 4), 6)?;
        a.sti()?;
        a.set_label(&mut wait_deadline)?;
        a.hlt()?;
        a.cmp(dword_ptr(DL_COUNT), 1)?;
        a.jb(wait_deadline)?;
        a.cli()?;
        // It came when the TSC had reached the deadline.
        a.mov(eax, dword_ptr(DL_TSC))?;
        a.mov(edx, dword_ptr(DL_TSC + 4))?;
        a.sub(eax, dword_ptr(DEADLINE))?;
        a.sbb(edx, dword_ptr(DEADLINE + 4))?;
        a.jb(fail)?;
        a.mov(dword_ptr(ISR_OR + 4), 7)?;
        // Firing cleared the MSR, and no second interrupt comes.
        a.mov(ecx, MSR_TSC_DEADLINE)?;
        a.rdmsr()?;
        a.or(eax, edx)?;
        a.jnz(fail)?;
        deadline_ahead(a)?;
        a.sti()?;
        spin_until_deadline(a)?;
        a.cli()?;
        a.cmp(dword_ptr(DL_COUNT), 1)?;
        a.jne(fail)?;
        a.mov(dword_ptr(ISR_OR + 4), 8)?;
        // Armed, then disarmed by 0: nothing comes.
        deadline_ahead(a)?;
        a.mov(ecx, MSR_TSC_DEADLINE)?;
        a.wrmsr()?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.sti()?;
        spin_until_deadline(a)?;
        a.cli()?;
        a.cmp(dword_ptr(DL_COUNT), 1)?;
        a.jne(fail)?;
        a.mov(dword_ptr(ISR_OR + 4), 9)?;
        // A deadline the TSC has passed fires at once.
        a.mov(ecx, MSR_TSC_DEADLINE)?;
        a.mov(eax, 1u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.sti()?;
        a.set_label(&mut wait_past)?;
        a.cmp(dword_ptr(DL_COUNT), 2)?;
        a.jb(wait_past)?;
        a.cli()?;
        print_serial(a, b"tsc-deadline ok\n")?;
        a.jmp(deadline_done)?;
        a.set_label(&mut no_deadline)?;
        a.nop()?;
        print_serial(a, b"no tsc-deadline\n")?;
        a.set_label(&mut deadline_done)?;
        // Every EOI landed: ISR is empty.
        a.xor(eax, eax)?;
        for i in 0..8 {
            a.or(eax, dword_ptr(LAPIC + 0x100 + 0x10 * i))?;
        }
        a.mov(dword_ptr(ISR_OR), eax)?;
        a.test(eax, eax)?;
        a.jnz(fail)?;
        print_serial(a, b"apic ok\n")?;
        a.mov(al, 0)?;
        a.out(0xF4, al)?;
        a.set_label(&mut fail)?;
        a.nop()?;
        print_serial(a, b"apic FAILED at check ")?;
        a.mov(eax, dword_ptr(ISR_OR + 4))?;
        a.add(al, b'0' as u32)?;
        a.mov(dx, 0x3F8u32)?;
        a.out(dx, al)?;
        a.mov(al, 1)?;
        a.out(0xF4, al)?;
        a.hlt()?;
        a.set_label(&mut timer)?;
        a.inc(dword_ptr(TIMER_COUNT))?;
        a.mov(dword_ptr(LAPIC + 0xB0), 0)?;
        a.iretd()?;
        a.set_label(&mut ipi)?;
        a.inc(dword_ptr(IPI_COUNT))?;
        a.mov(dword_ptr(LAPIC + 0xB0), 0)?;
        a.iretd()?;
        a.set_label(&mut spurious)?;
        a.iretd()?;
        a.set_label(&mut idtr)?;
        a.dw(&[0x7FF])?;
        a.dd(&[IDT_AT])?;
        let mut deadline_irq = a.create_label();
        a.set_label(&mut deadline_irq)?;
        a.push(eax)?;
        a.push(edx)?;
        a.rdtsc()?;
        a.mov(dword_ptr(DL_TSC), eax)?;
        a.mov(dword_ptr(DL_TSC + 4), edx)?;
        a.inc(dword_ptr(DL_COUNT))?;
        a.mov(dword_ptr(LAPIC + 0xB0), 0)?;
        a.pop(edx)?;
        a.pop(eax)?;
        a.iretd()?;
        Ok(vec![timer, ipi, spurious, idtr, deadline_irq])
    })
}

fn elf(tag: &str) -> PathBuf {
    let code = guest();
    let image = monitor::loader::multiboot::build_elf(&code, LOAD, LOAD, 0x20_0000);
    let path = std::env::temp_dir().join(format!("popek-apic-{tag}-{}.elf", std::process::id()));
    std::fs::write(&path, image).unwrap();
    path
}

fn options(kernel: PathBuf) -> RunOptions {
    RunOptions { kernel: Some(kernel), mem: 32 << 20, machine: Machine::Pc, ..RunOptions::default() }
}

#[test]
fn apic_timer_eoi_and_self_ipi_on_the_pc_machine() {
    let _l = vm_lock();
    let kernel = elf("run");
    let out = Capture::default();
    let t = Instant::now();
    let r = run(&options(kernel.clone()), Box::new(out.clone())).unwrap();
    let took = t.elapsed();
    let _ = std::fs::remove_file(kernel);
    assert_eq!(r.outcome, RunOutcome::DebugExit(1), "{}", out.text());
    assert_eq!(out.text(), "tsc-deadline ok\napic ok\n");
    // 101 ms of guest timers on host time.
    assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(5), "{took:?}");
    let get = |n: &str| r.stats.iter().find(|(k, _)| k == n).map_or(0, |x| x.1);
    assert!(get("vm/interrupts_injected") >= u64::from(TICKS) + 2);
}

#[test]
fn apic_guest_is_deterministic() {
    let _l = vm_lock();
    let kernel = elf("det");
    let mut counts = Vec::new();
    for _ in 0..2 {
        let out = Capture::default();
        let r = run_deterministic(
            &options(kernel.clone()),
            &DetOptions::default(),
            DetSession::Plain,
            "",
            Box::new(out.clone()),
        )
        .unwrap();
        assert_eq!(r.outcome, DetOutcome::Finished(RunOutcome::DebugExit(1)), "{}", out.text());
        assert_eq!(out.text(), "tsc-deadline ok\napic ok\n");
        counts.push(r.count);
    }
    let _ = std::fs::remove_file(kernel);
    assert_eq!(counts[0], counts[1], "the same instruction count twice");
}

/// A recording replays: the TSC-deadline writes are guest instructions the
/// replay executes again, and their interrupts are recorded like the other
/// APIC timer interrupts; also under stress kicks (a RDMSR waiting for the
/// machine when a kick lands).
#[test]
fn apic_guest_records_and_replays() {
    let _l = vm_lock();
    let kernel = elf("rec");
    let trace_path = std::env::temp_dir().join(format!("popek-apic-{}.trace", std::process::id()));
    let session = DetSession::Record { path: trace_path.clone(), input: None };
    let out = Capture::default();
    let rec = run_deterministic(&options(kernel.clone()), &DetOptions::default(), session, "", Box::new(out.clone()))
        .unwrap();
    assert_eq!(rec.outcome, DetOutcome::Finished(RunOutcome::DebugExit(1)), "{}", out.text());
    assert_eq!(out.text(), "tsc-deadline ok\napic ok\n");
    let trace = Trace::read(&trace_path).unwrap();
    for det in [DetOptions::default(), DetOptions { stress_kick_us: Some(30), ..DetOptions::default() }] {
        let session = DetSession::Replay(Box::new(trace.clone()));
        let r = run_deterministic(&options(kernel.clone()), &det, session, "", Box::new(std::io::sink())).unwrap();
        let v = r.verified.expect("a replay verifies");
        assert!(v.end, "the end state agrees");
        assert!(v.interrupts >= u64::from(TICKS) + 4, "{v:?}");
        assert_eq!(r.count, rec.count);
    }
    let _ = std::fs::remove_file(kernel);
    let _ = std::fs::remove_file(trace_path);
}

/// The same ELF under QEMU's `pc` machine, when QEMU is installed: the
/// guest's view of the APIC is the hardware's.
#[test]
fn apic_guest_under_qemu() {
    if std::process::Command::new("qemu-system-i386").arg("--version").output().is_err() {
        println!("SKIP: qemu-system-i386 is not installed");
        return;
    }
    let kernel = elf("qemu");
    let o = std::process::Command::new("timeout")
        .arg("60")
        .arg("qemu-system-i386")
        .args(["-machine", "pc", "-accel", "tcg", "-m", "32", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none", "-parallel", "none"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel"])
        .arg(&kernel)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(kernel);
    let text = String::from_utf8_lossy(&o.stdout).replace('\r', "");
    assert_eq!(o.status.code(), Some(1), "{text}{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("apic ok"), "{text}");
    println!("QEMU: {text}");
}
