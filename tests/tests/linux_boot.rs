//! Issue 5 acceptance: Debian's i386 kernel with a busybox initramfs boots
//! on the bt backend to its init script, which runs `uname -a`,
//! `cat /proc/cpuinfo`, `ls /` and 200 fork/exec of `/bin/true`, then
//! powers off; and the same guest at an interactive shell answers typed
//! commands fed through the console; on the `pc` machine it runs on the
//! TSC-deadline timer, also recorded and replayed. Uses ../shared/guests
//! (skipped, with the reason printed, where it is absent).

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

/// On the `pc` machine Linux finds the TSC-deadline timer (CPUID leaf 1 ECX
/// bit 24) and makes it its clock event device, through `popek run`'s
/// machine building; the same boot recorded in the deterministic mode
/// replays (its deadlines are WRMSRs the replay executes again).
#[test]
fn linux_on_the_pc_machine_runs_on_the_tsc_deadline_timer() {
    use monitor::deterministic::{DetOptions, DetOutcome};
    use monitor::devices::platform::Machine;
    use monitor::run::{run, run_deterministic, DetSession, RunOptions};
    use monitor::trace::format::Trace;

    let _l = vm_lock();
    let Some((kernel, busybox)) = guests() else { return };
    let script = "#!/bin/sh\n\
        mount -t proc proc /proc\n\
        dmesg | grep 'TSC deadline'\n\
        grep 'Clock Event Device: lapic' /proc/timer_list\n\
        grep LOC /proc/interrupts\n\
        sleep 1\n\
        grep LOC /proc/interrupts\n\
        echo init: done\n\
        poweroff -f\n";
    let dir = std::env::temp_dir().join(format!("popek-linux-deadline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = dir.join("initrd.gz");
    std::fs::write(&initrd, initramfs::busybox_initramfs(&busybox, script, &[]).unwrap()).unwrap();
    let opts = RunOptions {
        kernel: Some(kernel),
        initrd: Some(initrd),
        append: Some("console=ttyS0 panic=-1 quiet".into()),
        mem: 256 << 20,
        machine: Machine::Pc,
        ..RunOptions::default()
    };
    let check = |text: &str| {
        assert!(text.contains("TSC deadline timer available"), "{text}");
        assert!(text.contains("Clock Event Device: lapic-deadline"), "{text}");
        // HZ=250, periodic: about 250 timer interrupts in the second.
        let locs: Vec<u64> = text
            .lines()
            // Anywhere in the line: a kernel message may share it.
            .filter_map(|l| l.split_once("LOC:").map(|(_, rest)| rest))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(locs.len(), 2, "{text}");
        assert!((200..=300).contains(&(locs[1] - locs[0])), "{locs:?}");
        assert!(text.contains("init: done"), "{text}");
    };
    let out = Capture::default();
    let r = run(&opts, Box::new(out.clone())).unwrap();
    assert_eq!(r.outcome, RunOutcome::HaltedWithInterruptsOff, "{}", out.text());
    check(&out.text());

    let trace_path = dir.join("linux.trace");
    let out = Capture::default();
    let session = DetSession::Record { path: trace_path.clone(), input: None };
    let rec = run_deterministic(&opts, &DetOptions::default(), session, "", Box::new(out.clone())).unwrap();
    assert_eq!(rec.outcome, DetOutcome::Finished(RunOutcome::HaltedWithInterruptsOff), "{}", out.text());
    check(&out.text());
    let trace = Trace::read(&trace_path).unwrap();
    let session = DetSession::Replay(Box::new(trace));
    let rep = run_deterministic(&opts, &DetOptions::default(), session, "", Box::new(std::io::sink())).unwrap();
    assert!(rep.verified.expect("a replay verifies").end);
    assert_eq!(rep.count, rec.count);
    let _ = std::fs::remove_dir_all(dir);
}
