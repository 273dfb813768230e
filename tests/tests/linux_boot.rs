//! Issue 5 acceptance: Debian's i386 kernel with a busybox initramfs boots
//! on the bt backend to its init script, which runs `uname -a`,
//! `cat /proc/cpuinfo`, `ls /` and 200 fork/exec of `/bin/true`, then
//! powers off; and the same guest at an interactive shell answers typed
//! commands fed through the console. Uses ../shared/guests (skipped, with
//! the reason printed, where it is absent).

use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use monitor::backend::bt::user_exec::UserExec;
use monitor::backend::bt::{BtBackend, BtConfig};

use monitor::loader::{initramfs, linux};
use monitor::memory::GuestMemory;
use monitor::vm::{RunOutcome, Vm};
use popek_tests::{captured_platform, vm_lock, Capture};

fn guests() -> Option<(PathBuf, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/guests/linux-686");
    let (k, b) = (dir.join("vmlinuz"), dir.join("busybox"));
    if k.exists() && b.exists() {
        Some((k, b))
    } else {
        eprintln!("SKIPPED: {} not found (the shared guests live beside the checkout)", dir.display());
        None
    }
}

fn boot(script: &str) -> Option<(Vm, Capture)> {
    boot_with(script, BtConfig::default())
}

fn boot_with(script: &str, config: BtConfig) -> Option<(Vm, Capture)> {
    let (kernel, busybox) = guests()?;
    let mem = Arc::new(GuestMemory::new(256 << 20).unwrap());
    let initrd = initramfs::busybox_initramfs(&busybox, script, &[]).unwrap();
    let image = std::fs::read(kernel).unwrap();
    let boot = linux::load(&mem, &image, "console=ttyS0 panic=-1 quiet", Some(&initrd)).unwrap();
    assert!(boot.reservetop_added, "the loader reserves the VMM area in the guest");
    let (platform, out, clock) = captured_platform(mem.size());
    let bt = BtBackend::new(mem.clone(), boot.state.to_cpu(), config).unwrap();
    Some((Vm::new(mem, platform, Box::new(bt), clock), out))
}

/// The init script's checks, with guest user code run as `user_exec` says.
fn init_script_runs(user_exec: UserExec) {
    let _l = vm_lock();
    let script = "#!/bin/sh\n\
        mount -t proc proc /proc\n\
        echo init: first line\n\
        uname -a\n\
        cat /proc/cpuinfo\n\
        ls /\n\
        i=0\n\
        while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done\n\
        echo init: $i fork/exec done\n\
        poweroff -f\n";
    let Some((mut vm, out)) = boot_with(script, BtConfig { user_exec, ..BtConfig::default() }) else { return };
    let r = vm.run().unwrap();
    let text = out.text();
    assert_eq!(r, RunOutcome::HaltedWithInterruptsOff, "{text}");
    assert!(text.contains("init: first line"), "{text}");
    assert!(text.contains("Linux (none) 6.1.0-50-686"), "uname -a: {text}");
    assert!(text.contains("model name\t: Popek virtual 686 CPU"), "cpuinfo: {text}");
    assert!(text.contains("proc") && text.contains("init"), "ls /: {text}");
    assert!(text.contains("init: 200 fork/exec done"), "{text}");
    assert!(text.contains("reboot: System halted") || text.contains("System halted"), "{text}");
}

#[test]
fn linux_runs_its_init_script_and_powers_off() {
    init_script_runs(UserExec::Adaptive);
}

#[test]
fn linux_init_script_with_user_code_run_directly() {
    init_script_runs(UserExec::Direct);
}

#[test]
fn linux_init_script_with_user_code_translated() {
    init_script_runs(UserExec::Translated);
}

#[test]
fn linux_shell_answers_typed_commands() {
    let _l = vm_lock();
    let script = "#!/bin/sh\necho shell-ready\nexec /bin/sh\n";
    let Some((mut vm, out)) = boot(script) else { return };
    let (tx, rx) = channel();
    vm.set_input(rx);
    let kick = vm.backend.kicker();
    let watch = out.clone();
    let typist = std::thread::spawn(move || {
        let t = Instant::now();
        while !watch.text().contains("shell-ready") && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        for line in ["echo typed-$((6*7))\n", "poweroff -f\n"] {
            let _ = tx.send(line.as_bytes().to_vec());
            kick();
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let r = vm.run().unwrap();
    typist.join().unwrap();
    let text = out.text();
    assert_eq!(r, RunOutcome::HaltedWithInterruptsOff, "{text}");
    assert!(text.contains("typed-42"), "the shell ran the typed command: {text}");
}
