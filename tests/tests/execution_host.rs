//! The execution host (issue 2): guest-mode code runs natively in
//! compatibility mode and every trap comes back as a typed exit with the
//! exact guest state.

use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use monitor::host::ldt::FIRST_SHADOW;
use monitor::host::{Exit, HostSegment, Prot, SegKind, SyscallKind};
use popek_tests::*;

fn run(g: &mut Guest) -> Exit {
    g.vcpu.run().expect("run")
}

#[test]
fn compute_loop_matches_rust() {
    let mut g = Guest::new();
    // sum over i in 1..=100000 of (i*i) ^ (i >> 3), wrapping, as Rust computes it below.
    g.load(|a| {
        let mut l = a.create_label();
        a.xor(eax, eax)?;
        a.mov(ecx, 100_000)?;
        a.set_label(&mut l)?;
        a.mov(ebx, ecx)?;
        a.imul_2(ebx, ecx)?;
        a.mov(edx, ecx)?;
        a.shr(edx, 3)?;
        a.xor(ebx, edx)?;
        a.add(eax, ebx)?;
        a.dec(ecx)?;
        a.jnz(l)?;
        a.ud2()
    });
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
    let expect = (1..=100_000u32).fold(0u32, |s, i| s.wrapping_add(i.wrapping_mul(i) ^ (i >> 3)));
    assert_eq!(g.vcpu.regs().eax, expect);
}

#[test]
fn recursive_calls_match_rust() {
    let mut g = Guest::new();
    // fib(20) by naive recursion through the guest stack.
    g.load(|a| {
        let mut fib = a.create_label();
        a.mov(eax, 20)?;
        a.call(fib)?;
        a.ud2()?;
        emit_fib(a, &mut fib)
    });
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
    fn fib(n: u32) -> u32 {
        if n < 2 {
            n
        } else {
            fib(n - 1) + fib(n - 2)
        }
    }
    assert_eq!(g.vcpu.regs().eax, fib(20));
    assert_eq!(g.vcpu.regs().esp, STACK_TOP);
}

#[test]
fn string_instructions_copy_and_fill() {
    let mut g = Guest::new();
    let src: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    g.mem.write(DATA as u64, &src).unwrap();
    g.load(|a| {
        a.cld()?;
        a.mov(esi, DATA)?;
        a.mov(edi, DATA + 0x1000)?;
        a.mov(ecx, 4096)?;
        a.rep().movsb()?;
        a.mov(edi, DATA + 0x2000)?;
        a.mov(eax, 0xA5A5_5A5Au32)?;
        a.mov(ecx, 256)?;
        a.rep().stosd()?;
        a.ud2()
    });
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
    let mut copy = vec![0u8; 4096];
    g.mem.read(DATA as u64 + 0x1000, &mut copy).unwrap();
    assert_eq!(copy, src);
    for i in 0..256 {
        assert_eq!(g.mem.read_u32(DATA as u64 + 0x2000 + 4 * i).unwrap(), 0xA5A5_5A5A);
    }
    assert_eq!(g.vcpu.regs().ecx, 0);
}

/// A dot product of two f32 vectors with SSE, checked against Rust.
#[test]
fn sse_dot_product_matches_rust() {
    let mut g = Guest::new();
    let a_vals: Vec<f32> = (0..64).map(|i| i as f32 * 0.5 + 1.0).collect();
    let b_vals: Vec<f32> = (0..64).map(|i| 3.0 - i as f32 * 0.25).collect();
    for (i, (x, y)) in a_vals.iter().zip(&b_vals).enumerate() {
        g.mem.write(DATA as u64 + 4 * i as u64, &x.to_le_bytes()).unwrap();
        g.mem.write(DATA as u64 + 0x100 + 4 * i as u64, &y.to_le_bytes()).unwrap();
    }
    g.load(|a| {
        let mut l = a.create_label();
        a.xorps(xmm0, xmm0)?;
        a.mov(esi, DATA)?;
        a.mov(ecx, 16)?;
        a.set_label(&mut l)?;
        a.movups(xmm1, xmmword_ptr(esi))?;
        a.movups(xmm2, xmmword_ptr(esi + 0x100))?;
        a.mulps(xmm1, xmm2)?;
        a.addps(xmm0, xmm1)?;
        a.add(esi, 16)?;
        a.dec(ecx)?;
        a.jnz(l)?;
        a.movups(xmmword_ptr(DATA + 0x400), xmm0)?;
        a.ud2()
    });
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
    let mut lanes = [0f32; 4];
    for (i, x) in a_vals.iter().zip(&b_vals).enumerate() {
        lanes[i % 4] += x.0 * x.1;
    }
    for (i, lane) in lanes.iter().enumerate() {
        let got = f32::from_le_bytes(g.mem.slice(DATA as u64 + 0x400 + 4 * i as u64, 4).unwrap().try_into().unwrap());
        assert_eq!(got.to_bits(), lane.to_bits(), "lane {i}");
    }
    // The vCPU's saved XMM0 is the same vector.
    let saved = g.vcpu.fpu().xmm(0);
    assert_eq!(saved as u32, lanes[0].to_bits());
}

#[test]
fn page_fault_on_write_is_fixed_and_resumed() {
    let mut g = Guest::new();
    const HOLE: u32 = 0x5000_0000;
    g.load(|a| {
        a.mov(ebx, HOLE + 0x123)?;
        a.mov(dword_ptr(ebx), 0x600D_F00Du32)?;
        a.mov(eax, dword_ptr(ebx))?;
        a.ud2()
    });
    match run(&mut g) {
        Exit::PageFault { address, error_code } => {
            assert_eq!(address, HOLE + 0x123);
            assert_eq!(error_code, 0b10, "write to a not-present page");
        }
        e => panic!("expected #PF, got {e:?}"),
    }
    assert_eq!(g.vcpu.regs().eip, CODE + 5, "EIP at the faulting store");
    // The monitor maps the page and resumes: the store is retried.
    g.vcpu.window().map(HOLE, &g.mem, 0x80_0000, 4096, Prot::RW).unwrap();
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
    assert_eq!(g.vcpu.regs().eax, 0x600D_F00D);
    assert_eq!(g.mem.read_u32(0x80_0123).unwrap(), 0x600D_F00D);
}

#[test]
fn page_fault_error_codes_for_read_protection_and_fetch() {
    let mut g = Guest::new();
    const RO: u32 = 0x6000_0000;
    g.vcpu.window().map(RO, &g.mem, 0x90_0000, 4096, Prot::R).unwrap();
    g.load(|a| {
        a.mov(eax, dword_ptr(0x6100_0000u32))?; // read, not present
        a.mov(dword_ptr(RO), eax)?; // write, present read-only
        a.mov(eax, 0x6200_0000u32)?;
        a.jmp(eax) // fetch, not present
    });
    let e1 = run(&mut g);
    assert_eq!(e1, Exit::PageFault { address: 0x6100_0000, error_code: 0 });
    g.vcpu.window().map(0x6100_0000, &g.mem, 0x91_0000, 4096, Prot::R).unwrap();
    let e2 = run(&mut g);
    assert_eq!(e2, Exit::PageFault { address: RO, error_code: 0b11 });
    g.vcpu.window().protect(RO, 4096, Prot::RW).unwrap();
    match run(&mut g) {
        Exit::PageFault { address, error_code } => {
            assert_eq!(address, 0x6200_0000);
            assert_eq!(error_code & 0x1, 0, "not present");
            assert_eq!(error_code & 0x10, 0x10, "instruction fetch");
        }
        e => panic!("expected fetch #PF, got {e:?}"),
    }
    assert_eq!(g.vcpu.regs().eip, 0x6200_0000);
}

#[test]
fn general_protection_carries_instruction_bytes_and_can_be_skipped() {
    let mut g = Guest::new();
    g.load(|a| {
        a.mov(eax, 1)?;
        a.hlt()?;
        a.mov(eax, 2)?;
        a.int(0x21)?;
        a.mov(eax, 3)?;
        a.ud2()
    });
    match run(&mut g) {
        Exit::GeneralProtection { error_code, insn, len } => {
            assert_eq!(error_code, 0);
            assert!(len >= 1);
            assert_eq!(insn[0], 0xF4, "HLT");
        }
        e => panic!("expected #GP, got {e:?}"),
    }
    assert_eq!(g.vcpu.regs().eip, CODE + 5);
    let mut r = g.vcpu.regs();
    r.eip += 1; // the monitor emulates HLT by skipping it
    g.vcpu.set_regs(&r);
    match run(&mut g) {
        Exit::GeneralProtection { error_code, insn, .. } => {
            assert_eq!(error_code, 0x21 * 8 + 2, "IDT vector, EXT=0, IDT=1");
            assert_eq!(&insn[..2], &[0xCD, 0x21]);
            assert_eq!(g.vcpu.regs().eax, 2);
        }
        e => panic!("expected #GP from INT 0x21, got {e:?}"),
    }
    let mut r = g.vcpu.regs();
    r.eip += 2;
    g.vcpu.set_regs(&r);
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
    assert_eq!(g.vcpu.regs().eax, 3);
}

#[test]
fn divide_error_fixed_by_monitor() {
    let mut g = Guest::new();
    g.load(|a| {
        a.mov(eax, 100)?;
        a.xor(edx, edx)?;
        a.xor(ecx, ecx)?;
        a.div(ecx)?;
        a.ud2()
    });
    assert_eq!(run(&mut g), Exit::DivideError);
    assert_eq!(g.vcpu.regs().eip, CODE + 9, "EIP at the DIV");
    let mut r = g.vcpu.regs();
    r.ecx = 7;
    g.vcpu.set_regs(&r);
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
    assert_eq!((g.vcpu.regs().eax, g.vcpu.regs().edx), (14, 2));
}

#[test]
fn breakpoint_overflow_and_bound_are_traps_or_faults_as_architected() {
    let mut g = Guest::new();
    g.mem.write(DATA as u64, &[0u8, 0, 0, 0, 10, 0, 0, 0]).unwrap(); // bounds [0, 10]
    g.load(|a| {
        a.int3()?; // trap: EIP after
        a.mov(eax, 0x7FFF_FFFF)?;
        a.add(eax, 1)?; // OF=1
        a.into()?; // trap
        a.mov(eax, 11)?;
        a.bound(eax, qword_ptr(DATA))?; // fault: 11 > 10
        a.ud2()
    });
    assert_eq!(run(&mut g), Exit::Breakpoint);
    assert_eq!(g.vcpu.regs().eip, CODE + 1);
    assert_eq!(run(&mut g), Exit::Overflow);
    // int3 (1) + mov eax,imm32 (5) + add eax,imm32 (5) + into (1)
    assert_eq!(g.vcpu.regs().eip, CODE + 12);
    assert_eq!(run(&mut g), Exit::BoundRange);
    let at_bound = CODE + 12 + 5;
    assert_eq!(g.vcpu.regs().eip, at_bound);
    let mut r = g.vcpu.regs();
    r.eax = 5;
    g.vcpu.set_regs(&r);
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
}

#[test]
fn single_step_reports_each_instruction() {
    let mut g = Guest::new();
    g.load(|a| {
        a.mov(eax, 1)?;
        a.mov(ebx, 2)?;
        a.mov(ecx, 3)?;
        a.ud2()
    });
    let mut r = g.vcpu.regs();
    r.eflags |= 0x100; // TF
    g.vcpu.set_regs(&r);
    assert_eq!(run(&mut g), Exit::Debug);
    assert_eq!((g.vcpu.regs().eip, g.vcpu.regs().eax, g.vcpu.regs().ebx), (CODE + 5, 1, 0));
    assert_eq!(run(&mut g), Exit::Debug);
    assert_eq!((g.vcpu.regs().eip, g.vcpu.regs().ebx, g.vcpu.regs().ecx), (CODE + 10, 2, 0));
    let mut r = g.vcpu.regs();
    r.eflags &= !0x100;
    g.vcpu.set_regs(&r);
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
    assert_eq!(g.vcpu.regs().ecx, 3);
}

#[test]
fn alignment_check_when_guest_sets_ac() {
    let mut g = Guest::new();
    g.load(|a| {
        a.pushfd()?;
        a.or(dword_ptr(esp), 0x4_0000)?;
        a.popfd()?;
        a.mov(eax, dword_ptr(DATA + 1))?;
        a.ud2()
    });
    assert_eq!(run(&mut g), Exit::AlignmentCheck);
    assert_ne!(g.vcpu.regs().eflags & 0x4_0000, 0, "guest AC is kept in its EFLAGS");
    let mut r = g.vcpu.regs();
    r.eflags &= !0x4_0000;
    g.vcpu.set_regs(&r);
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
}

#[test]
fn x87_and_simd_exceptions() {
    let mut g = Guest::new();
    g.mem.write_u32(DATA as u64, 0x037B).unwrap(); // FCW: ZE unmasked
    g.mem.write_u32(DATA as u64 + 4, 0x1F80 & !0x200).unwrap(); // MXCSR: ZE unmasked
    g.mem.write(DATA as u64 + 8, &1.0f32.to_le_bytes()).unwrap();
    g.mem.write(DATA as u64 + 12, &0.0f32.to_le_bytes()).unwrap();
    g.load(|a| {
        a.fninit()?;
        a.fldcw(word_ptr(DATA))?;
        a.fld(dword_ptr(DATA + 8))?;
        a.fdiv(dword_ptr(DATA + 12))?; // pending #MF
        a.db(&[0x9B])?; // FWAIT: delivered here
        a.ldmxcsr(dword_ptr(DATA + 4))?;
        a.movss(xmm0, dword_ptr(DATA + 8))?;
        a.divss(xmm0, dword_ptr(DATA + 12))?;
        a.ud2()
    });
    assert_eq!(run(&mut g), Exit::X87Fault);
    // The monitor clears the pending exception in the guest's saved state the
    // way a guest handler would (FNCLEX): reset the x87 part.
    let mxcsr_before = g.vcpu.fpu().mxcsr();
    g.vcpu.fpu().reset();
    g.vcpu.fpu().set_mxcsr(mxcsr_before).unwrap();
    let mut r = g.vcpu.regs();
    r.eip += 1; // skip FWAIT
    g.vcpu.set_regs(&r);
    assert_eq!(run(&mut g), Exit::SimdFault);
}

#[test]
fn stack_fault_and_segment_not_present() {
    let mut g = Guest::new();
    let data = SegKind::Data { writable: true, expand_down: false };
    let small_ss = g
        .vcpu
        .set_ldt_entry(
            FIRST_SHADOW,
            HostSegment { base: 0, limit: 0x30_0000 - 1, kind: data, big: true, present: true },
        )
        .unwrap();
    let absent = g
        .vcpu
        .set_ldt_entry(FIRST_SHADOW + 1, HostSegment { base: 0, limit: 0xFFFF, kind: data, big: true, present: false })
        .unwrap();
    g.load(|a| {
        a.push(eax)?; // ESP = limit+1: the push lands at limit-3: fine
        a.mov(esp, 0x30_0000 + 0x100)?;
        a.push(eax)?; // beyond SS limit: #SS(0)
        a.ud2()
    });
    let mut s = g.vcpu.segments();
    s.ss = small_ss;
    g.vcpu.set_segments(s).unwrap();
    assert_eq!(run(&mut g), Exit::StackFault { error_code: 0 });
    let mut s = g.vcpu.segments();
    s.ss = g.vcpu.flat_segments().ss;
    g.vcpu.set_segments(s).unwrap();
    g.load(|a| {
        a.mov(eax, u32::from(absent))?;
        a.mov(ds, ax)?;
        a.ud2()
    });
    assert_eq!(run(&mut g), Exit::SegmentNotPresent { error_code: u32::from(absent & !3) });
}

fn pipe_is_empty(fd: i32) -> bool {
    let mut b = [0u8; 16];
    // SAFETY: read into a local buffer from our own non-blocking pipe.
    let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), b.len()) };
    n < 0
}

#[test]
fn guest_system_calls_never_reach_the_host() {
    let mut g = Guest::new();
    let mut fds = [0i32; 2];
    // SAFETY: creating a pipe into a local array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) }, 0);
    let pid = std::process::id();
    g.mem.write(DATA as u64, b"/bin/sh\0hello\n").unwrap();
    g.load(|a| {
        a.mov(eax, 4)?; // write(fd, "hello\n", 6)
        a.mov(ebx, fds[1] as u32)?;
        a.mov(ecx, DATA + 8)?;
        a.mov(edx, 6)?;
        a.int(0x80)?;
        a.mov(eax, 11)?; // execve("/bin/sh", 0, 0)
        a.mov(ebx, DATA)?;
        a.xor(ecx, ecx)?;
        a.xor(edx, edx)?;
        a.int(0x80)?;
        a.mov(eax, 1)?; // exit(42)
        a.mov(ebx, 42)?;
        a.int(0x80)?;
        a.mov(eax, 20)?; // getpid via SYSCALL
        a.syscall()?;
        a.mov(eax, 20)?; // getpid via SYSENTER
        a.mov(ebp, esp)?; // the user stack, as __kernel_vsyscall passes it (Intel's fast path reads it)
        a.sysenter()?;
        a.ud2()
    });
    let expect = [(4, 0x8000_0000u32), (11, 0), (1, 0)];
    for (nr, _) in expect {
        match run(&mut g) {
            Exit::SystemCall { kind: SyscallKind::Int80, nr: got, eip_known: true } => assert_eq!(got, nr),
            e => panic!("expected int 0x80 exit for {nr}, got {e:?}"),
        }
        assert_eq!(g.vcpu.regs().eax, nr, "EAX holds the guest's number");
    }
    // Compatibility-mode SYSCALL: on AMD the host kernel's fast path (which
    // discards the return address: the exit says so); on Intel #UD.
    let after_syscall = CODE + 57;
    match run(&mut g) {
        Exit::SystemCall { kind: SyscallKind::Syscall | SyscallKind::Sysenter, nr: 20, eip_known } => {
            if !eip_known {
                eprintln!("fast system call: EIP not recoverable on this host (documented)");
            }
        }
        Exit::InvalidOpcode => eprintln!("SYSCALL is #UD in compatibility mode on this CPU (Intel)"),
        e => panic!("expected a SYSCALL exit or #UD, got {e:?}"),
    }
    let mut r = g.vcpu.regs();
    r.eip = after_syscall; // where the monitor would resume
    g.vcpu.set_regs(&r);
    // SYSENTER: #UD on AMD (reported as a system call, EIP exact); on Intel
    // the kernel's fast path (EIP lost).
    match run(&mut g) {
        Exit::SystemCall { kind: SyscallKind::Sysenter, nr: 20, eip_known } => {
            if !eip_known {
                let mut r = g.vcpu.regs();
                r.eip = after_syscall + 9;
                g.vcpu.set_regs(&r);
            }
        }
        e => panic!("expected SYSENTER exit, got {e:?}"),
    }
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
    assert!(pipe_is_empty(fds[0]), "the host never executed write()");
    assert_eq!(std::process::id(), pid, "still the same process");
}

#[test]
fn kick_stops_an_endless_loop_within_10ms() {
    let mut g = Guest::new();
    g.load(|a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.inc(eax)?;
        a.jmp(l)
    });
    let kicker = g.vcpu.kicker();
    let (tx, rx) = std::sync::mpsc::channel::<Instant>();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        tx.send(Instant::now()).unwrap();
        kicker.kick().unwrap();
    });
    let exit = run(&mut g);
    let stopped = Instant::now();
    t.join().unwrap();
    let kicked = rx.recv().unwrap();
    assert_eq!(exit, Exit::Kick);
    let latency = stopped.duration_since(kicked);
    assert!(latency < Duration::from_millis(10), "kick latency {latency:?}");
    assert!(g.vcpu.regs().eax > 0, "the guest ran");
    let eip = g.vcpu.regs().eip;
    assert!((CODE..CODE + 3).contains(&eip), "EIP {eip:#x} inside the loop");
    // A kick while the vCPU is outside guest code makes the next run return at once.
    g.vcpu.kicker().kick().unwrap();
    let count = g.vcpu.regs().eax;
    assert_eq!(run(&mut g), Exit::Kick);
    assert_eq!(g.vcpu.regs().eax, count, "the guest did not run");
}

/// Many kicks at arbitrary points must not change what the guest computes,
/// integer or SSE: the state at every exit is exact.
#[test]
fn state_is_exact_across_thousands_of_exits() {
    let mut g = Guest::new();
    g.mem.write(DATA as u64, &1.0001f32.to_le_bytes()).unwrap();
    g.load(|a| {
        let mut l = a.create_label();
        a.mov(ecx, 3_000_000)?;
        a.mov(eax, 1)?;
        a.mov(esi, 0x1234_5678)?;
        a.movss(xmm1, dword_ptr(DATA))?;
        a.movss(xmm0, dword_ptr(DATA))?;
        a.set_label(&mut l)?;
        a.imul_3(eax, eax, 69069)?;
        a.add(eax, 1)?;
        a.rol(esi, 3)?;
        a.xor(esi, eax)?;
        a.mulss(xmm0, xmm1)?;
        a.pushfd()?;
        a.popfd()?;
        a.dec(ecx)?;
        a.jnz(l)?;
        a.movss(dword_ptr(DATA + 4), xmm0)?;
        a.ud2()
    });
    let kicker = g.vcpu.kicker();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = kicker.kick();
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    let mut kicks = 0;
    let exit = loop {
        match run(&mut g) {
            Exit::Kick => kicks += 1,
            e => break e,
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    t.join().unwrap();
    assert_eq!(exit, Exit::InvalidOpcode);
    let (mut a, mut b, mut x) = (1u32, 0x1234_5678u32, 1.0001f32);
    for _ in 0..3_000_000 {
        a = a.wrapping_mul(69069).wrapping_add(1);
        b = b.rotate_left(3) ^ a;
        x *= 1.0001f32;
    }
    let r = g.vcpu.regs();
    assert_eq!((r.eax, r.esi, r.ecx), (a, b, 0));
    let got = f32::from_le_bytes(g.mem.slice(DATA as u64 + 4, 4).unwrap().try_into().unwrap());
    assert_eq!(got.to_bits(), x.to_bits());
    eprintln!("{kicks} kicks during the run");
    assert!(kicks > 0, "the run was interrupted at least once");
}

#[test]
fn guest_fpu_control_state_does_not_leak_into_the_monitor() {
    let mut g = Guest::new();
    g.mem.write_u32(DATA as u64, 0x7F80).unwrap(); // MXCSR: round toward zero, all masked
    g.mem.write_u32(DATA as u64 + 4, 0x0C7F).unwrap(); // FCW: truncate, single precision
    g.load(|a| {
        a.ldmxcsr(dword_ptr(DATA))?;
        a.fldcw(word_ptr(DATA + 4))?;
        a.ud2()?;
        a.stmxcsr(dword_ptr(DATA + 8))?;
        a.fnstcw(word_ptr(DATA + 12))?;
        a.ud2()
    });
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
    let mut host_mxcsr = 0u32;
    // SAFETY: stmxcsr stores 4 bytes to a local.
    unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut host_mxcsr) };
    assert_eq!(host_mxcsr & 0x6000, 0, "monitor still rounds to nearest");
    let third = std::hint::black_box(1.0f64) / std::hint::black_box(3.0f64);
    assert_eq!(third.to_bits(), (1.0f64 / 3.0f64).to_bits());
    assert_eq!(g.vcpu.fpu().mxcsr(), 0x7F80, "guest MXCSR saved");
    let mut r = g.vcpu.regs();
    r.eip += 2;
    g.vcpu.set_regs(&r);
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
    assert_eq!(g.mem.read_u32(DATA as u64 + 8).unwrap() & 0xFFFF, 0x7F80, "guest MXCSR restored");
    assert_eq!(g.mem.read_u32(DATA as u64 + 12).unwrap() & 0xFFFF, 0x0C7F, "guest FCW restored");
}

#[test]
fn callout_far_jump_returns_with_exact_state() {
    let mut g = Guest::new();
    let gate = g.vcpu.window().exit_gate();
    // The far pointer and a callout id live in the vCPU page (VMM-area
    // offset 0), reached through the VMM data selector in GS.
    {
        let alias = g.vcpu.window().vmm_alias();
        alias.write(0x200, &gate.to_le_bytes());
        alias.write(0x204, &0x33u16.to_le_bytes());
    }
    let mut s = g.vcpu.segments();
    s.gs = g.vcpu.vmm_data_selector();
    g.vcpu.set_segments(s).unwrap();
    g.load(|a| {
        a.mov(eax, 0x1111_1111)?;
        a.mov(ecx, 0x2222_2222)?;
        a.mov(edx, 0x3333_3333)?;
        a.mov(ebx, 0x4444_4444)?;
        a.mov(ebp, 0x5555_5555)?;
        a.mov(esi, 0x6666_6666)?;
        a.mov(edi, 0x7777_7777)?;
        a.stc()?;
        a.std()?;
        a.mov(dword_ptr(0x100).gs(), 42)?;
        a.db(&[0x65, 0xFF, 0x2D, 0x00, 0x02, 0x00, 0x00])?; // jmp far gs:[0x200]
        a.cld()?;
        a.mov(eax, 99)?;
        a.ud2()
    });
    assert_eq!(run(&mut g), Exit::Callout);
    let id = g.vcpu.window().vmm_alias().read_u32(0x100);
    assert_eq!(id, 42);
    let r = g.vcpu.regs();
    assert_eq!(
        [r.eax, r.ecx, r.edx, r.ebx, r.ebp, r.esi, r.edi, r.esp],
        [0x1111_1111, 0x2222_2222, 0x3333_3333, 0x4444_4444, 0x5555_5555, 0x6666_6666, 0x7777_7777, STACK_TOP]
    );
    assert_eq!(r.eflags & 0x401, 0x401, "CF and DF survive the callout");
    assert_eq!(g.vcpu.segments().gs, g.vcpu.vmm_data_selector());
    // Resume after the far jump (the monitor knows each callout's resume point).
    let mut r = g.vcpu.regs();
    r.eip = CODE + 5 * 7 + 2 + 11 + 7;
    g.vcpu.set_regs(&r);
    assert_eq!(run(&mut g), Exit::InvalidOpcode);
    assert_eq!(g.vcpu.regs().eax, 99);
}

#[test]
fn guest_cannot_write_outside_its_mappings_or_into_the_vmm_area() {
    let mut g = Guest::new();
    let vmm = g.vcpu.window().vmm_base();
    let mut before = vec![0u8; 0x2000];
    g.vcpu.window().vmm_alias().read(0, &mut before);
    let targets = [0u32, 0x1000, 0x0FFF_FFF0, 0x8000_0000, 0xC000_0000, vmm - 4, vmm, vmm + 0x1000, 0xFFFF_FFF0];
    for &t in &targets {
        g.load(|a| {
            a.mov(ebx, t)?;
            a.mov(dword_ptr(ebx), 0xBAD0_BAD0u32)?;
            a.ud2()
        });
        let e = run(&mut g);
        match e {
            Exit::PageFault { address, error_code } => {
                assert_eq!(address, t, "fault address for {t:#x}");
                assert_eq!(error_code & 2, 2);
                assert!(t < vmm, "no page fault inside the VMM area: the segment limit stops it first");
            }
            Exit::GeneralProtection { error_code: 0, .. } => {
                assert!(t >= vmm - 3, "#GP only at the VMM area, got it for {t:#x}")
            }
            e => panic!("write to {t:#x}: unexpected {e:?}"),
        }
        assert_eq!(g.vcpu.regs().eip, CODE + 5);
    }
    let mut after = vec![0u8; 0x2000];
    g.vcpu.window().vmm_alias().read(0, &mut after);
    assert_eq!(before, after, "VMM area untouched");
}

/// CPUID in guest-mode code faults back to the monitor (CPUID faulting), so
/// that the guest's CPUID policy is what directly run user code sees: a
/// process that saw the host's OSXSAVE would run XGETBV, which the guest's
/// CPU lacks (CI found busybox's glibc doing exactly that).
#[test]
fn cpuid_in_guest_code_exits_to_the_monitor() {
    let mut g = Guest::new();
    if !g.vcpu.hides_host_cpuid() {
        eprintln!("SKIPPED: this host has no CPUID faulting; guest user code sees the host's CPUID");
        return;
    }
    g.load(|a| {
        a.mov(eax, 0)?;
        a.cpuid()?;
        a.ud2()
    });
    match run(&mut g) {
        Exit::GeneralProtection { error_code: 0, insn, len } => {
            assert!(len >= 2);
            assert_eq!(&insn[..2], &[0x0F, 0xA2], "CPUID");
        }
        e => panic!("expected #GP from CPUID, got {e:?}"),
    }
    assert_eq!(g.vcpu.regs().eip, CODE + 5, "at the CPUID");
    // The monitor's own CPUID still answers on this thread (served by the
    // signal handler).
    let served = monitor::host::cpuid_fault::monitor_cpuids_served();
    let vendor = std::arch::x86_64::__cpuid(0);
    assert_ne!(vendor.ebx, 0);
    assert_eq!(monitor::host::cpuid_fault::monitor_cpuids_served(), served + 1);
}
