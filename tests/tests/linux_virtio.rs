//! Debian's 686 kernel on the `pc` machine with virtio disks and virtio-rng,
//! driven by Debian's own virtio_pci/virtio_blk/virtio-rng modules (fetched
//! by scripts/fetch-virtio-modules.sh into target/guest-modules/linux-686;
//! the tests print SKIPPED without them or without ../shared/guests).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use monitor::devices::virtio::blk::DiskSpec;
use monitor::loader::initramfs;
use monitor::run::{run, RunOptions};
use monitor::vm::RunOutcome;
use popek_tests::*;

const MODULES: [&str; 7] = [
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio-rng",
];

/// The kernel, busybox and module directory, or `None` (SKIPPED printed).
fn inputs() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("../shared/guests/linux-686");
    let (kernel, busybox) = (dir.join("vmlinuz"), dir.join("busybox"));
    if !kernel.exists() || !busybox.exists() {
        eprintln!("SKIPPED: {} not found (the shared guests live beside the checkout)", dir.display());
        return None;
    }
    let modules = std::env::var_os("POPEK_VIRTIO_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/guest-modules/linux-686"));
    if !modules.join("virtio_blk.ko").exists() {
        eprintln!("SKIPPED: no virtio modules in {} (run scripts/fetch-virtio-modules.sh)", modules.display());
        return None;
    }
    Some((kernel, busybox, modules))
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("popek-virtio-{name}-{}", std::process::id()))
}

/// An initramfs whose init loads the virtio modules, then runs `script`.
fn initrd(busybox: &std::path::Path, modules: &std::path::Path, script: &str, tag: &str) -> PathBuf {
    let mut init =
        String::from("#!/bin/sh\nmount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n");
    for m in MODULES {
        init.push_str(&format!("insmod /m/{m}.ko || echo insmod {m} failed\n"));
    }
    init.push_str("while [ ! -b /dev/vda ]; do sleep 0.1; done\n");
    init.push_str(script);
    let extra: Vec<(String, PathBuf)> =
        MODULES.iter().map(|m| (format!("m/{m}.ko"), modules.join(format!("{m}.ko")))).collect();
    let bytes = initramfs::busybox_initramfs(busybox, &init, &extra).unwrap();
    let path = scratch(&format!("{tag}.cpio.gz"));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn image(tag: &str) -> PathBuf {
    let path = scratch(&format!("{tag}.img"));
    let mut bytes = vec![0u8; 8 << 20];
    bytes[..16].copy_from_slice(b"DISK-ZERO-SECTOR");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn options(kernel: PathBuf, initrd: PathBuf, disks: Vec<DiskSpec>) -> RunOptions {
    RunOptions {
        kernel: Some(kernel),
        initrd: Some(initrd),
        append: Some("console=ttyS0 panic=-1".into()),
        disks,
        rng: true,
        ..RunOptions::default()
    }
}

#[test]
fn linux_drives_virtio_disks_and_rng_in_apic_mode_on_the_tsc() {
    let Some((kernel, busybox, modules)) = inputs() else { return };
    let _l = vm_lock();
    let script = "\
        echo SECTOR0=$(dd if=/dev/vda bs=16 count=1 2>/dev/null)\n\
        echo RO=$(cat /sys/block/vdb/ro) SIZE=$(cat /sys/block/vda/size)\n\
        echo written-by-linux > /tmp/x\n\
        dd if=/tmp/x of=/dev/vda bs=512 seek=3 conv=sync,fsync 2>/dev/null && echo WRITE-OK\n\
        dd if=/tmp/x of=/dev/vdb bs=512 seek=3 conv=sync,fsync 2>/dev/null || echo RO-WRITE-REFUSED\n\
        echo RNG=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' ')\n\
        echo CLOCKSOURCE=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)\n\
        grep -c IO-APIC /proc/interrupts\n\
        poweroff -f\n";
    let (rw, ro) = (image("rw"), image("ro"));
    let disks = vec![DiskSpec { path: rw.clone(), read_only: false }, DiskSpec { path: ro.clone(), read_only: true }];
    let initrd = initrd(&busybox, &modules, script, "drive");
    let out = Capture::default();
    let r = run(&options(kernel, initrd.clone(), disks), Box::new(out.clone())).unwrap();
    let text = out.text();
    assert_eq!(r.outcome, RunOutcome::HaltedWithInterruptsOff, "{text}");
    for want in [
        "Enabling APIC mode:  Flat.  Using 1 I/O APICs",
        "PCI->APIC IRQ transform: INT A -> IRQ 16",
        "[vda] 16384 512-byte logical blocks",
        "SECTOR0=DISK-ZERO-SECTOR",
        "RO=1 SIZE=16384",
        "WRITE-OK",
        "RO-WRITE-REFUSED",
        "CLOCKSOURCE=tsc",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let rng = text.lines().find_map(|l| l.strip_prefix("RNG=")).unwrap_or_default().trim();
    assert_eq!(rng.len(), 32, "16 random bytes: {text}");
    assert_ne!(rng, "0".repeat(32));
    let rw_bytes = std::fs::read(&rw).unwrap();
    assert_eq!(&rw_bytes[3 * 512..3 * 512 + 16], b"written-by-linux");
    let ro_bytes = std::fs::read(&ro).unwrap();
    assert!(ro_bytes[3 * 512..4 * 512].iter().all(|&b| b == 0), "the read-only image is untouched");
    let get = |n: &str| r.stats.iter().find(|(k, _)| k == n).map_or(0, |x| x.1);
    assert!(get("platform/virtio-blk0/flushes") >= 1);
    for p in [rw, ro, initrd] {
        let _ = std::fs::remove_file(p);
    }
}

/// The child half of the kill -9 test: runs the guest with its console on
/// stdout when `POPEK_KILL9_IMAGE` names the disk, else does nothing.
#[test]
fn kill9_child() {
    let (Some(img), Some(initrd)) = (std::env::var_os("POPEK_KILL9_IMAGE"), std::env::var_os("POPEK_KILL9_INITRD"))
    else {
        return;
    };
    let Some((kernel, _, _)) = inputs() else { return };
    let disks = vec![DiskSpec { path: img.into(), read_only: false }];
    let _ = run(&options(kernel, initrd.into(), disks), Box::new(std::io::stdout()));
}

#[test]
fn a_synced_write_survives_kill_9() {
    let Some((_, busybox, modules)) = inputs() else { return };
    let script = "\
        echo survives-kill-9 > /tmp/x\n\
        dd if=/tmp/x of=/dev/vda bs=512 seek=5 conv=sync,fsync 2>/dev/null && echo SYNCED-NOW\n\
        sleep 1000\n";
    let img = image("kill9");
    let initrd = initrd(&busybox, &modules, script, "kill9");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "kill9_child", "--nocapture", "--test-threads=1"])
        .env("POPEK_KILL9_IMAGE", &img)
        .env("POPEK_KILL9_INITRD", &initrd)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("SYNCED-NOW") {
                let _ = tx.send(());
            }
        }
    });
    let start = Instant::now();
    let synced = rx.recv_timeout(Duration::from_secs(120)).is_ok();
    // SIGKILL: no destructor, no flush of ours runs after this.
    let _ = child.kill();
    let _ = child.wait();
    assert!(synced, "the guest never reported its synced write ({:?})", start.elapsed());
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[5 * 512..5 * 512 + 15], b"survives-kill-9");
    for p in [img, initrd] {
        let _ = std::fs::remove_file(p);
    }
}
