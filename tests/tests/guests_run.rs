//! The built-in guests (`monitor::guests`) end to end: on the `kvm` backend
//! with the real platform and run loop, and as exported multiboot ELFs under
//! QEMU (TCG). Each test prints why it skips when KVM or QEMU is missing.

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use monitor::backend::bt::{BtBackend, BtConfig};
use monitor::backend::kvm::{self, KvmBackend};
use monitor::backend::BackendError;

use monitor::guests::{self, Guest};
use monitor::memory::GuestMemory;
use monitor::vm::{RunOutcome, Vm};
use popek_tests::captured_platform;

/// Iterations per nano row in these tests: /dev/kvm here emulates.
const NANO_ITERATIONS: u32 = 64;

/// Runs `g` on the `bt` backend (Popek's own engine).
fn run_on_bt(g: &Guest, timeout: Duration) -> (RunOutcome, String) {
    let lock = popek_tests::vm_lock();
    let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
    mem.write(u64::from(g.load_addr), &g.image).unwrap();
    let cpu = g.entry_cpu();
    let (outcome, out) = run_machine(g, mem, timeout, move |mem| {
        Box::new(BtBackend::new(mem, cpu, BtConfig::default()).expect("bt backend"))
    });
    drop(lock);
    (outcome, out)
}

fn run_machine(
    g: &Guest,
    mem: Arc<GuestMemory>,
    timeout: Duration,
    make: impl FnOnce(Arc<GuestMemory>) -> Box<dyn monitor::backend::Backend> + Send + 'static,
) -> (RunOutcome, String) {
    let (platform, out, clock) = captured_platform(mem.size());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let backend = make(mem.clone());
        let mut vm = Vm::new(mem, platform, backend, clock);
        let r = vm.run().map_err(|e| e.to_string());
        // The vCPU goes before the caller hears of the end (and lets the
        // next test create one).
        drop(vm);
        let _ = tx.send(r);
    });
    let start = Instant::now();
    let outcome = match rx.recv_timeout(timeout) {
        Ok(r) => r.unwrap_or_else(|e| panic!("run failed: {e}\noutput so far:\n{}", out.text())),
        Err(_) => panic!("{} did not finish in {timeout:?}; output so far:\n{}", g.name, out.text()),
    };
    println!("{}: {:.2} s\n{}", g.name, start.elapsed().as_secs_f64(), out.text());
    (outcome, out.text())
}

/// Runs `g` on KVM; `None` (reason printed) when KVM is unusable.
fn run_on_kvm(g: &Guest, timeout: Duration) -> Option<(RunOutcome, String)> {
    let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
    mem.write(u64::from(g.load_addr), &g.image).unwrap();
    match kvm::supports_32bit_paging() {
        Ok(true) => {}
        Ok(false) => {
            println!(
                "SKIP: this host's KVM refuses CR0.PG for 32-bit guests (#GP on mov cr0; PVM-backed /dev/kvm), \
                 and {} enables paging",
                g.name
            );
            return None;
        }
        Err(e @ BackendError::Unavailable(..)) => {
            println!("SKIP: {e}");
            return None;
        }
        Err(e) => panic!("KVM paging probe failed: {e}"),
    }
    let cpu = g.entry_cpu();
    let backend = match KvmBackend::new(&mem, &cpu) {
        Ok(b) => b,
        Err(e @ BackendError::Unavailable(..)) => {
            println!("SKIP: {e}");
            return None;
        }
        Err(e) => panic!("KVM is present but the backend failed: {e}"),
    };
    let (platform, out, clock) = captured_platform(mem.size());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut vm = Vm::new(mem, platform, Box::new(backend), clock);
        let r = vm.run().map_err(|e| e.to_string());
        // The vCPU goes before the caller hears of the end (and lets the
        // next test create one).
        drop(vm);
        let _ = tx.send(r);
    });
    let start = Instant::now();
    let outcome = match rx.recv_timeout(timeout) {
        Ok(r) => r.unwrap_or_else(|e| panic!("run failed: {e}\noutput so far:\n{}", out.text())),
        Err(_) => panic!("{} did not finish in {timeout:?}; output so far:\n{}", g.name, out.text()),
    };
    println!("{} on kvm: {:.2} s\n{}", g.name, start.elapsed().as_secs_f64(), out.text());
    Some((outcome, out.text()))
}

fn check_demo(out: &str) {
    let lines: Vec<&str> = out.lines().collect();
    let pos = |needle: &str| {
        lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?} in:\n{out}"))
    };
    pos("popek demo");
    let a_hello = pos("[A] hello from user mode (CPL 3)");
    let b_hello = pos("[B] hello from user mode (CPL 3)");
    let b_killed = pos("kernel: task B killed by divide error at eip 0x004");
    let a_killed = pos("kernel: task A killed by page fault at 0x00100000");
    // A usually greets first, but a tick pending at the first IRET (slow
    // boots) lets B start first; B dies first either way (2 ticks vs 6).
    assert!(a_hello < a_killed && b_hello < b_killed && b_killed < a_killed, "B dies first:\n{out}");
    pos("task A: killed by page fault at 0x00100000, heap pages 3");
    pos("task B: killed by divide error at eip 0x004");
    pos("heap pages 2");
    pos("page faults 6 (demand-paged 5)");
    let report = lines[pos("page faults")];
    let ticks: u32 = report.split("timer ticks ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    assert!(ticks >= 6, "A waited 6 ticks: {report}");
    assert!(report.contains("syscalls 6"), "{report}");
    pos("demo: done");
}

fn check_nano(out: &str) {
    for row in guests::nano::ROWS {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("NANO {row} ")))
            .unwrap_or_else(|| panic!("no NANO {row} line in:\n{out}"));
        let n: u64 = line.split(' ').nth(2).unwrap().parse().unwrap();
        assert!(line.ends_with(" cycles"), "{line}");
        assert!(n > 0 || row == "compute", "{line}");
    }
    assert!(out.contains("nano: done"));
}

#[test]
fn guests_demo_on_bt() {
    let (outcome, out) = run_on_bt(&guests::by_name("demo").unwrap(), Duration::from_secs(120));
    assert_eq!(outcome, RunOutcome::DebugExit(1), "{out}");
    check_demo(&out);
}

#[test]
fn guests_nano_on_bt() {
    let (outcome, out) = run_on_bt(&guests::nano::guest(2000), Duration::from_secs(120));
    assert_eq!(outcome, RunOutcome::DebugExit(1), "{out}");
    check_nano(&out);
}

#[test]
fn guests_demo_on_kvm() {
    let g = guests::by_name("demo").unwrap();
    let Some((outcome, out)) = run_on_kvm(&g, Duration::from_secs(120)) else { return };
    assert_eq!(outcome, RunOutcome::DebugExit(1), "{out}");
    check_demo(&out);
}

#[test]
fn guests_nano_on_kvm() {
    let g = guests::nano::guest(NANO_ITERATIONS);
    let Some((outcome, out)) = run_on_kvm(&g, Duration::from_secs(120)) else { return };
    assert_eq!(outcome, RunOutcome::DebugExit(1), "{out}");
    check_nano(&out);
}

/// Runs the exported ELF of `g` under qemu-system-i386 (TCG); `None` when
/// QEMU is not installed.
fn run_on_qemu(g: &Guest) -> Option<(i32, String)> {
    if Command::new("qemu-system-i386").arg("--version").output().is_err() {
        println!("SKIP: qemu-system-i386 is not installed (apt-get install qemu-system-x86)");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("popek-guest-{}-{}", g.name, std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let elf = dir.join(format!("{}.elf", g.name));
    std::fs::write(&elf, guests::export_multiboot(g)).unwrap();
    let mut child = Command::new("qemu-system-i386")
        .args(["-machine", "pc", "-accel", "tcg", "-m", "32", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none", "-parallel", "none"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-kernel")
        .arg(&elf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-i386");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("QEMU did not exit in 60 s; output:\n{}", String::from_utf8_lossy(&o.stdout));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).replace('\r', "");
    println!(
        "{} under QEMU: status {:?} in {:.2} s\n{out}{}",
        g.name,
        status.code(),
        start.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Some((status.code().unwrap_or(-1), out))
}

#[test]
fn guests_demo_under_qemu() {
    let Some((status, out)) = run_on_qemu(&guests::by_name("demo").unwrap()) else { return };
    assert_eq!(status, 1, "isa-debug-exit with 0 gives status (0 << 1) | 1:\n{out}");
    check_demo(&out);
}

#[test]
fn guests_nano_under_qemu() {
    let Some((status, out)) = run_on_qemu(&guests::nano::guest(2000)) else { return };
    assert_eq!(status, 1, "{out}");
    check_nano(&out);
}
