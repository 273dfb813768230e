//! The guest cannot reach the host (issue 11). Guest user code far-transfers
//! to the host's 64-bit selector 0x33 (JMP, CALL, RETF, IRET: none needs
//! privilege) and tries host system calls from 64-bit mode; `popek` must stop
//! the VM with its report and exit status, and the host file the guest asks
//! for must never appear. Every run goes through the `popek` binary, as a
//! user would start it.
//!
//! Guests: multiboot kernels built here (they switch to CPL 3 and run the
//! escape directly), and a static i386 program inside Debian's kernel with a
//! busybox initramfs (skipped, with the reason printed, without
//! ../shared/guests).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use monitor::jail::{EXIT_GUEST_ESCAPE, EXIT_JAIL_REFUSED};

const POPEK: &str = env!("CARGO_BIN_EXE_popek");

/// Guest layout of the multiboot kernels (physical = linear, paging off).
const LOAD: u32 = 0x10_0000;
const USER: u32 = LOAD + 0x400;
const CODE64: u32 = LOAD + 0x800;
const PATH: u32 = LOAD + 0xC00;
const GDT: u32 = LOAD + 0xE00;
const STACK_TOP: u32 = LOAD + 0x8000;
/// The exit gate in the VMM area: `jmp [rip+2]`, padding, then a pointer into
/// the monitor's text (engine::vmm_area / host::window::vmm).
const GATE_POINTER: u32 = 0xFF80_1008;

#[derive(Clone, Copy, Debug)]
enum Transfer {
    Jmp,
    Call,
    Retf,
    Iret,
}

#[derive(Clone, Copy, Debug)]
enum Payload {
    /// x86-64 `syscall`: open(path, O_CREAT|O_WRONLY, 0644).
    Syscall,
    /// `int 0x80` from 64-bit mode: i386 creat(path, 0644).
    Int80,
    /// `sysenter` from 64-bit mode (#UD on AMD; an i386 call on Intel).
    Sysenter,
    /// No system call: a fault in 64-bit mode.
    Fault,
    /// Find a `syscall` (0F 05) in the monitor's own text, starting at the
    /// pointer the exit gate holds, and jump there with openat's arguments:
    /// the instruction-pointer rule cannot apply, only the allow-list.
    Gadget,
}

fn asm(bitness: u32, ip: u32, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).unwrap();
    f(&mut a).unwrap();
    a.assemble(u64::from(ip)).unwrap()
}

/// 64-bit code at `CODE64` that attempts `p` on the file at `PATH`.
fn payload(p: Payload) -> Vec<u8> {
    asm(64, CODE64, |a| {
        match p {
            Payload::Syscall => {
                a.mov(edi, PATH)?;
                a.mov(esi, 0x41u32)?; // O_CREAT | O_WRONLY
                a.mov(edx, 0o644u32)?;
                a.mov(eax, 2u32)?; // open
                a.syscall()?;
                a.mov(edi, 42u32)?;
                a.mov(eax, 231u32)?; // exit_group(42)
                a.syscall()?;
            }
            Payload::Int80 | Payload::Sysenter => {
                a.mov(ebx, PATH)?;
                a.mov(ecx, 0o644u32)?;
                a.mov(eax, 8u32)?; // i386 creat
                a.mov(ebp, esp)?; // the user stack, as __kernel_vsyscall passes it
                if matches!(p, Payload::Int80) {
                    a.int(0x80)?;
                } else {
                    a.sysenter()?;
                }
            }
            Payload::Fault => {}
            Payload::Gadget => {
                let mut scan = a.create_label();
                let mut found = a.create_label();
                a.mov(r11d, GATE_POINTER)?;
                a.mov(r11, qword_ptr(r11))?;
                a.set_label(&mut scan)?;
                a.inc(r11)?;
                a.cmp(word_ptr(r11), 0x050F)?;
                a.jne(scan)?;
                a.set_label(&mut found)?;
                a.mov(rdi, -100i64)?; // AT_FDCWD
                a.mov(esi, PATH)?;
                a.mov(edx, 0x41u32)?;
                a.mov(r10d, 0o644u32)?;
                a.mov(eax, 257u32)?; // openat
                a.jmp(r11)?;
            }
        }
        a.ud2()
    })
}

/// 32-bit CPL 3 code at `USER` that enters 64-bit mode at `CODE64` by `t`.
fn transfer(t: Transfer) -> Vec<u8> {
    asm(32, USER, |a| {
        match t {
            Transfer::Jmp => a.jmp_far(0x33, CODE64)?,
            Transfer::Call => a.call_far(0x33, CODE64)?,
            Transfer::Retf => {
                a.push(0x33)?;
                a.push(CODE64)?;
                a.retf()?;
            }
            Transfer::Iret => {
                a.pushfd()?;
                a.push(0x33)?;
                a.push(CODE64)?;
                a.iretd()?;
            }
        }
        a.ud2()
    })
}

/// A multiboot kernel: own GDT (0x08/0x10 kernel, 0x1b/0x23 user), IRET to
/// CPL 3 at `USER` with IF=0 (no interrupt needs a kernel), which runs the
/// escape.
fn kernel(t: Transfer, p: Payload, path: &Path) -> Vec<u8> {
    let boot = asm(32, LOAD, |a| {
        a.lgdt(ptr(GDT + 0x40))?;
        a.mov(eax, 0x23u32)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.push(0x23)?;
        a.push(STACK_TOP)?;
        a.push(0x2)?;
        a.push(0x1b)?;
        a.push(USER)?;
        a.iretd()
    });
    let mut image = vec![0u8; 0x1000];
    let mut put = |at: u32, bytes: &[u8]| {
        let o = (at - LOAD) as usize;
        image[o..o + bytes.len()].copy_from_slice(bytes);
    };
    put(LOAD, &boot);
    put(USER, &transfer(t));
    put(CODE64, &payload(p));
    let mut name = path.as_os_str().as_encoded_bytes().to_vec();
    name.push(0);
    put(PATH, &name);
    let gdt: [u64; 5] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00cf_fb00_0000_ffff, 0x00cf_f300_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        put(GDT + 8 * i as u32, &d.to_le_bytes());
    }
    let mut gdtr = (5u16 * 8 - 1).to_le_bytes().to_vec();
    gdtr.extend_from_slice(&GDT.to_le_bytes());
    put(GDT + 0x40, &gdtr);
    monitor::loader::multiboot::build_elf(&image, LOAD, LOAD, 0x8000)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("popek-escape-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Runs `popek` with `args`, killed after `limit`.
fn popek(args: &[&str], limit: Duration) -> Output {
    let child = Command::new(POPEK)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn popek");
    let pid = child.id();
    let t = Instant::now();
    let killer = std::thread::spawn(move || {
        while t.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: signal 0 probes whether the child still exists.
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return;
            }
        }
        // SAFETY: killing our own child that outlived its limit.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output().expect("wait for popek");
    let _ = killer.join();
    out
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run_kernel(t: Transfer, p: Payload, extra: &[&str]) -> (Output, PathBuf) {
    let target = scratch(&format!("{t:?}-{p:?}-{}", extra.join("")));
    let _ = std::fs::remove_file(&target);
    // Named after the arguments too: tests run in parallel, and two that
    // build the same kernel must not write one file while the other reads.
    let elf = scratch(&format!("{t:?}-{p:?}-{}.elf", extra.join("")));
    std::fs::write(&elf, kernel(t, p, &target)).unwrap();
    let mut args = vec!["run", "--kernel", elf.to_str().unwrap(), "--mem", "16M", "--no-input"];
    args.extend_from_slice(extra);
    (popek(&args, Duration::from_secs(60)), target)
}

fn assert_stopped(o: &Output, target: &Path, syscall: bool) {
    let all = text(o);
    assert!(!target.exists(), "the guest created {} on the host:\n{all}", target.display());
    assert_eq!(o.status.code(), Some(i32::from(EXIT_GUEST_ESCAPE)), "{all}");
    let want = if syscall { "guest code made a host system call" } else { "switched to 64-bit mode" };
    assert!(String::from_utf8_lossy(&o.stderr).contains(want), "expected {want:?}:\n{all}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("CS=0x33"), "names the mode:\n{all}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("guest CPU state"), "dumps the guest state:\n{all}");
}

#[test]
fn every_far_transfer_to_64_bit_mode_then_syscall_is_stopped() {
    for t in [Transfer::Jmp, Transfer::Call, Transfer::Retf, Transfer::Iret] {
        let (o, target) = run_kernel(t, Payload::Syscall, &[]);
        assert_stopped(&o, &target, true);
    }
}

#[test]
fn int80_and_sysenter_from_64_bit_mode_are_stopped() {
    let (o, target) = run_kernel(Transfer::Jmp, Payload::Int80, &[]);
    assert_stopped(&o, &target, true);
    // SYSENTER from 64-bit mode: #UD on AMD hardware (an escape report), an
    // i386 call through the kernel's fast-syscall path elsewhere (the guard
    // traps it; the host kernel has moved the return point to its vDSO, so
    // the VM stops with that error). Never a host call, never a crash.
    let (o, target) = run_kernel(Transfer::Jmp, Payload::Sysenter, &[]);
    assert!(!target.exists(), "{}", text(&o));
    let code = o.status.code();
    assert!(code == Some(i32::from(EXIT_GUEST_ESCAPE)) || code == Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("guest"), "{}", text(&o));
}

#[test]
fn a_fault_in_64_bit_mode_stops_the_vm() {
    let (o, target) = run_kernel(Transfer::Retf, Payload::Fault, &[]);
    assert_stopped(&o, &target, false);
}

#[test]
fn the_guard_holds_without_the_jail() {
    // The instruction-pointer rule is the vCPU guard's, always on.
    let (o, target) = run_kernel(Transfer::Jmp, Payload::Syscall, &["--no-jail"]);
    assert_stopped(&o, &target, true);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--no-jail"), "warns: {}", text(&o));
}

#[test]
fn a_syscall_gadget_in_the_monitor_is_refused_by_the_allow_list() {
    let (o, target) = run_kernel(Transfer::Jmp, Payload::Gadget, &[]);
    let all = text(&o);
    assert!(!target.exists(), "openat through a monitor gadget created {}:\n{all}", target.display());
    assert_eq!(o.status.code(), Some(i32::from(EXIT_JAIL_REFUSED)), "{all}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("the jail refused host system call #257"), "{all}");
    // Control: without the jail the same guest does reach the host, so the
    // allow-list (not a broken gadget) is what stopped it above.
    let (o, target) = run_kernel(Transfer::Jmp, Payload::Gadget, &["--no-jail"]);
    assert!(target.exists(), "the gadget should work unjailed (else this test proves nothing):\n{}", text(&o));
    let _ = std::fs::remove_file(&target);
}

/// Status lines of every thread of `pid`.
fn thread_status(pid: u32) -> Vec<String> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        v.push(std::fs::read_to_string(t.path().join("status")).unwrap_or_default());
    }
    v
}

#[test]
fn a_running_popek_is_jailed_on_every_thread() {
    // A kernel that spins forever (translated, at CPL 0): popek stays up.
    let spin = asm(32, LOAD, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.jmp(l)
    });
    let elf = scratch("spin.elf");
    std::fs::write(&elf, monitor::loader::multiboot::build_elf(&spin, LOAD, LOAD, 0)).unwrap();
    // Console input on (a pipe kept open): the vCPU thread and the input
    // thread, which blocks reading it. The timer kicks need no thread.
    let mut child = Command::new(POPEK)
        .args(["run", "--kernel", elf.to_str().unwrap(), "--mem", "16M"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until the run loop's threads exist and the jail is closed.
    let t = Instant::now();
    let mut statuses = Vec::new();
    while t.elapsed() < Duration::from_secs(20) {
        statuses = thread_status(pid);
        if statuses.len() >= 2 && statuses.iter().all(|s| s.contains("Seccomp:\t2")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(statuses.len() >= 2, "vCPU and console input threads: {statuses:?}");
    for s in &statuses {
        let field = |k: &str| s.lines().find(|l| l.starts_with(k)).unwrap_or("").to_string();
        assert_eq!(field("Seccomp:"), "Seccomp:\t2", "{s}");
        assert_eq!(field("NoNewPrivs:"), "NoNewPrivs:\t1", "{s}");
        assert_eq!(field("CapEff:"), "CapEff:\t0000000000000000", "{s}");
        assert_eq!(field("CapPrm:"), "CapPrm:\t0000000000000000", "{s}");
        // SAFETY: geteuid has no side effects.
        if unsafe { libc::geteuid() } == 0 {
            assert!(field("Uid:").starts_with("Uid:\t65534"), "root gives up its id: {s}");
        }
    }
}

fn shared_guests() -> Option<(PathBuf, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/guests/linux-686");
    let (k, b) = (dir.join("vmlinuz"), dir.join("busybox"));
    if k.exists() && b.exists() {
        Some((k, b))
    } else {
        eprintln!("SKIPPED: {} not found (the shared guests live beside the checkout)", dir.display());
        None
    }
}

/// A static i386 Linux executable: `code` loaded at 0x08048000 right after
/// the ELF and program headers, entry at its first byte.
fn i386_program(code: impl FnOnce(u32) -> Vec<u8>) -> Vec<u8> {
    const BASE: u32 = 0x0804_8000;
    const HDRS: u32 = 52 + 32;
    let body = code(BASE + HDRS);
    let size = HDRS + body.len() as u32;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0");
    for v in [2u16, 3] {
        f.extend_from_slice(&v.to_le_bytes()); // ET_EXEC, EM_386
    }
    for v in [1u32, BASE + HDRS, 52, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    for v in [52u16, 32, 1, 40, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    for v in [1u32, 0, BASE, BASE, size, size, 7, 0x1000] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&body);
    f
}

#[test]
fn a_process_inside_debian_cannot_reach_the_host() {
    let Some((kernel, busybox)) = shared_guests() else { return };
    let target = scratch("from-debian");
    let _ = std::fs::remove_file(&target);
    // ljmp 0x33:next; then 64-bit: open(target), write, exit_group(42).
    let prog = i386_program(|entry| {
        let code64 = entry + 0x40;
        let path = entry + 0x100;
        let mut code = vec![0u8; 0x100];
        let enter = asm(32, entry, |a| a.jmp_far(0x33, code64));
        code[..enter.len()].copy_from_slice(&enter);
        let long = asm(64, code64, |a| {
            a.mov(edi, path)?;
            a.mov(esi, 0x41u32)?;
            a.mov(edx, 0o644u32)?;
            a.mov(eax, 2u32)?;
            a.syscall()?;
            a.mov(edi, eax)?;
            a.mov(esi, path)?;
            a.mov(edx, 4u32)?;
            a.mov(eax, 1u32)?;
            a.syscall()?;
            a.mov(edi, 42u32)?;
            a.mov(eax, 231u32)?;
            a.syscall()
        });
        code[0x40..0x40 + long.len()].copy_from_slice(&long);
        code.extend_from_slice(target.as_os_str().as_encoded_bytes());
        code.push(0);
        code
    });
    let prog_path = scratch("escape-i386");
    std::fs::write(&prog_path, prog).unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&prog_path).unwrap().permissions(), 0o755);
    std::fs::set_permissions(&prog_path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = "#!/bin/sh\necho escape: starting\n/escape\necho escape: returned $?\npoweroff -f\n";
    let initrd = monitor::loader::initramfs::busybox_initramfs(&busybox, script, &[("escape".into(), prog_path)])
        .expect("initramfs");
    let initrd_path = scratch("escape.cpio.gz");
    std::fs::write(&initrd_path, initrd).unwrap();
    let o = popek(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd_path.to_str().unwrap(),
            "--append",
            "console=ttyS0 quiet panic=-1",
            "--no-input",
        ],
        Duration::from_secs(240),
    );
    let all = text(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("escape: starting"), "the program ran:\n{all}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("escape: returned"), "the VM must stop:\n{all}");
    assert_stopped(&o, &target, true);
}

#[test]
fn the_same_escape_goes_nowhere_when_user_code_is_translated_or_on_kvm() {
    // Translated user code: the far JMP is a callout that reads selector
    // 0x33 from the *guest's* GDT (5 entries: past its limit), so the guest
    // takes a #GP, and with no IDT, shuts down. Nothing reaches 64-bit mode.
    let (o, target) = run_kernel(Transfer::Jmp, Payload::Syscall, &["--deterministic"]);
    assert!(!target.exists(), "{}", text(&o));
    assert_ne!(o.status.code(), Some(i32::from(EXIT_GUEST_ESCAPE)), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("triple fault"), "{}", text(&o));
    // KVM: the selector is the guest's too (paging is off, which this
    // host's /dev/kvm can run).
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED (kvm part): no /dev/kvm on this host");
        return;
    }
    let (o, target) = run_kernel(Transfer::Jmp, Payload::Syscall, &["--backend", "kvm"]);
    assert!(!target.exists(), "{}", text(&o));
    assert_ne!(o.status.code(), Some(i32::from(EXIT_GUEST_ESCAPE)), "{}", text(&o));
    eprintln!("kvm: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn bench_suites_run_their_vms_jailed() {
    // nano on bt: the suite starts `popek run` children (jailed by default),
    // host and replay: jailed workers (replay's once stopped at a refused
    // `open` of the TSC cache, made after its jail closed); all must still
    // measure.
    for (suite, row) in [("nano", "syscall"), ("host", "trap_roundtrip"), ("replay", "det_compute_ratio")] {
        let json = scratch(&format!("bench-{suite}.json"));
        let o = popek(
            &["bench", "--suite", suite, "--quick", "--backends", "bt", "--json", json.to_str().unwrap()],
            Duration::from_secs(300),
        );
        assert!(o.status.success(), "{}", text(&o));
        let rows = std::fs::read_to_string(&json).unwrap();
        assert!(rows.contains(&format!("\"name\":\"{row}\"")) && rows.contains("\"backend\":\"bt\""), "{rows}");
    }
}

#[test]
fn translated_user_code_cannot_give_itself_iopl_3_through_the_vcpu_page() {
    // User code's segments reach the VMM area (as direct user code's do):
    // a process writes IOPL 3 into the vCPU page around a system call, then
    // runs CLI. The monitor must not believe the page for CPL 3 code: CLI
    // faults and Linux kills the process with SIGSEGV (status 139).
    let Some((kernel, busybox)) = shared_guests() else { return };
    let viopl = engine::vmm_area::DEFAULT_BASE + engine::vmm_area::vcpu::VIOPL;
    let prog = i386_program(|entry| {
        asm(32, entry, |a| {
            a.mov(dword_ptr(viopl), 0x3000u32)?;
            a.mov(eax, 20u32)?; // getpid
            a.int(0x80)?;
            a.mov(dword_ptr(viopl), 0x3000u32)?;
            a.cli()?;
            a.mov(ebx, 0u32)?;
            a.mov(eax, 1u32)?; // exit(0)
            a.int(0x80)
        })
    });
    let prog_path = scratch("viopl-i386");
    std::fs::write(&prog_path, prog).unwrap();
    std::fs::set_permissions(&prog_path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = "#!/bin/sh\n/viopl\necho viopl: returned $?\npoweroff -f\n";
    let initrd = monitor::loader::initramfs::busybox_initramfs(&busybox, script, &[("viopl".into(), prog_path)])
        .expect("initramfs");
    let initrd_path = scratch("viopl.cpio.gz");
    std::fs::write(&initrd_path, initrd).unwrap();
    for mode in ["translated", "adaptive", "direct"] {
        let o = popek(
            &[
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--initrd",
                initrd_path.to_str().unwrap(),
                "--append",
                "console=ttyS0 quiet panic=-1",
                "--no-input",
                "--user-exec",
                mode,
            ],
            Duration::from_secs(240),
        );
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("viopl: returned 139"), "--user-exec {mode}: CLI must fault:\n{}", text(&o));
    }
}
