//! Debian 12 i386 with systemd from a virtio disk (scripts/make-debian-image.sh
//! builds target/debian/{vmlinuz,initrd.img,debian.img}, .ci/run builds it into
//! ~/.cache/popek/debian; SKIPPED without it; the sessions write to a copy):
//! boot to `login:`, log in as root, `systemctl is-system-running`, write and
//! sync a file, `poweroff`; boot again and find the file.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use monitor::bench::distro;
use monitor::devices::virtio::blk::DiskSpec;
use monitor::run::{run, RunOptions};

/// The image (`$POPEK_DEBIAN_IMAGE`, else target/debian, else the cache
/// `.ci/run` fills, `~/.cache/popek/debian`), its disk copied to a scratch
/// file the sessions write to (the image itself stays as built).
fn image_dir() -> Option<(PathBuf, ScratchDir)> {
    let dirs = distro::image_dirs(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debian"));
    let image = match distro::find_image(&dirs) {
        Ok(i) => i,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return None;
        }
    };
    let scratch = ScratchDir(std::env::temp_dir().join(format!("popek-debian-boot-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).unwrap();
    for (name, from) in [("vmlinuz", &image.kernel), ("initrd.img", &image.initrd)] {
        std::os::unix::fs::symlink(std::fs::canonicalize(from).unwrap(), scratch.0.join(name)).unwrap();
    }
    distro::copy_sparse(&image.disk, &scratch.0.join("debian.img")).unwrap();
    Some((scratch.0.clone(), scratch))
}

/// Removes the scratch directory when dropped.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The child half: runs the image with the console on stdin/stdout.
#[test]
fn debian_child() {
    let Some(dir) = std::env::var_os("POPEK_DEBIAN_CHILD").map(PathBuf::from) else { return };
    let opts = RunOptions {
        kernel: Some(dir.join("vmlinuz")),
        initrd: Some(dir.join("initrd.img")),
        append: Some("root=/dev/vda console=ttyS0".into()),
        mem: 512 << 20,
        disks: vec![DiskSpec { path: dir.join("debian.img"), read_only: false }],
        interactive: true,
        ..RunOptions::default()
    };
    let r = run(&opts, Box::new(std::io::stdout()));
    println!("\nCHILD-END {:?}", r.map(|r| r.outcome));
}

/// The child's console output as it comes (prompts have no newline).
fn output(child: &mut std::process::Child) -> Receiver<String> {
    let (tx, rx) = channel();
    let mut out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(String::from_utf8_lossy(&buf[..n]).replace('\r', "")).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits until `what` appears after `log[*from..]`; moves `from` past it.
fn wait_for(rx: &Receiver<String>, what: &str, timeout: Duration, log: &mut String, from: &mut usize) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if let Some(i) = log[*from..].find(what) {
            *from += i + what.len();
            return true;
        }
        let Some(left) = end.checked_duration_since(Instant::now()) else { return false };
        match rx.recv_timeout(left) {
            Ok(chunk) => log.push_str(&chunk),
            Err(_) => return false,
        }
    }
}

/// Boots, logs in, runs `commands` (one line), powers off; the console.
fn session(dir: &std::path::Path, commands: &str) -> (String, Duration) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "debian_child", "--nocapture", "--test-threads=1"])
        .env("POPEK_DEBIAN_CHILD", dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = output(&mut child);
    let mut input = child.stdin.take().unwrap();
    let mut log = String::new();
    let mut at = 0;
    let t = Instant::now();
    let login = wait_for(&rx, "login:", Duration::from_secs(300), &mut log, &mut at);
    let to_login = t.elapsed();
    if login {
        // The prompt line has no newline yet: give getty a moment.
        std::thread::sleep(Duration::from_secs(1));
        let _ = input.write_all(b"root\n");
        let _ = wait_for(&rx, "root@popek", Duration::from_secs(60), &mut log, &mut at);
        let _ = input.write_all(format!("{commands}; echo DONE-$((6*7))\n").as_bytes());
        let _ = wait_for(&rx, "DONE-42", Duration::from_secs(120), &mut log, &mut at);
        let _ = input.write_all(b"poweroff\n");
        let _ = wait_for(&rx, "CHILD-END", Duration::from_secs(180), &mut log, &mut at);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(login, "no login prompt in 300 s:\n{log}");
    (log, to_login)
}

#[test]
fn debian_boots_to_login_runs_systemd_and_keeps_a_synced_file() {
    let Some((dir, _scratch)) = image_dir() else { return };
    let stamp = format!("{}", std::process::id());
    let (log, to_login) = session(
        &dir,
        &format!("systemctl is-system-running; echo kept-{stamp} > /root/popek-test; sync; python3 -c 'print(6*7)'"),
    );
    println!("Debian: login prompt after {to_login:?}");
    // Bash's bracketed-paste switch may precede an output line.
    let ends = |w: &str| log.lines().any(|l| l.trim_end().ends_with(w) && !l.contains("echo"));
    assert!(ends("running") || ends("degraded"), "systemctl is-system-running: {log}");
    assert!(log.lines().any(|l| l.trim_end().ends_with("42") && !l.contains("DONE")), "python3 ran: {log}");
    assert!(log.contains("CHILD-END"), "powered off: {log}");
    let (log, _) = session(&dir, "cat /root/popek-test");
    assert!(log.contains(&format!("kept-{stamp}")), "the file survived the poweroff: {log}");
}
