//! `popek bench --suite distro`: the Debian 12 i386 disk image of
//! `scripts/make-debian-image.sh` (systemd, Debian's 686 kernel and initrd)
//! under each backend with the same command line, `root=/dev/vda
//! console=ttyS0`, 512 MiB and the image on virtio-blk:
//!
//! - `bt`: `popek run --kernel vmlinuz --initrd initrd.img --disk COPY
//!   --mem 512M --append ...` (a child process, jailed as every run is;
//!   `--no-jail` passes through);
//! - `qemu`: `qemu-system-i386 -M pc -accel tcg -m 512 -kernel ... -initrd
//!   ... -append ... -drive file=COPY,format=raw,if=virtio -serial stdio`.
//!
//! Each run boots a fresh sparse copy of the image (runs write to it: the
//! journal, the random seed, fsck marks), logs in as root on the serial
//! console (the image's root has an empty password) and measures, with the
//! host's clock on the console output as it arrives:
//!
//! - `boot_to_login` (s): from starting the VMM process to `login:`;
//! - `python` (s): `python3 -c 'print(sum(i*i for i in range(N)))'`, a
//!   fixed loop, cold (the interpreter comes off the virtio disk);
//! - `dpkg_L` (s): `dpkg -L` of every installed package, one process each
//!   (fork, exec, file reads: the kernel-heavy counterpart);
//! - `shutdown` (s): from sending `poweroff` to the VMM process's exit.
//!
//! The workloads run between two markers the shell prints (`echo
//! W$((40+1))B` prints `W41B`, which the echoed command line does not
//! contain). Without the image every figure is a skipped row saying where
//! it was looked for and how to build it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{BenchError, Report, Row};

/// The kernel command line of every backend.
pub const CMDLINE: &str = "root=/dev/vda console=ttyS0";
/// Guest RAM in MiB.
pub const RAM_MIB: u64 = 512;
/// The peers, in order.
pub const BACKENDS: [&str; 2] = ["bt", "qemu"];
/// The figures of a backend, `(name, unit)`, in row order.
pub const FIGURES: [(&str, &str); 4] = [("boot_to_login", "s"), ("python", "s"), ("dpkg_L", "s"), ("shutdown", "s")];
/// How long each step may take before the run is given up.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(180);
/// The shell prompt of root on the image (hostname `popek`).
const PROMPT: &str = "root@popek";

fn fail(msg: String) -> BenchError {
    BenchError::UnexpectedExit(format!("distro suite: {msg}"))
}

/// The three files of a built image.
#[derive(Clone, Debug)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
}

impl Image {
    /// The image in `dir`, if all three files are there.
    pub fn in_dir(dir: &Path) -> Option<Image> {
        let i = Image { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img"), disk: dir.join("debian.img") };
        (i.kernel.is_file() && i.initrd.is_file() && i.disk.is_file()).then_some(i)
    }
}

/// Where `.ci/run` caches the image: `$XDG_CACHE_HOME/popek/debian`, or
/// `~/.cache/popek/debian`.
pub fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("popek/debian"))
}

/// The directories an image is looked for in: `$POPEK_DEBIAN_IMAGE` alone
/// when it is set; otherwise `default` (the script's output directory),
/// then [`cache_dir`].
pub fn image_dirs(default: &Path) -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os("POPEK_DEBIAN_IMAGE").filter(|v| !v.is_empty()) {
        return vec![PathBuf::from(d)];
    }
    let mut v = vec![default.to_owned()];
    v.extend(cache_dir());
    v
}

/// The first complete image among `dirs`, or why there is none and how to
/// build one.
pub fn find_image(dirs: &[PathBuf]) -> Result<Image, String> {
    dirs.iter().find_map(|d| Image::in_dir(d)).ok_or_else(|| {
        let places: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        format!(
            "no Debian image (vmlinuz, initrd.img, debian.img) in {}; build one with \
             scripts/make-debian-image.sh [DIR] (needs mmdebstrap, root or fakeroot and a Debian mirror; \
             ~2-3 min) or point POPEK_DEBIAN_IMAGE at one",
            places.join(" or ")
        )
    })
}

/// Copies `src` to `dst` keeping its holes (SEEK_DATA/SEEK_HOLE), so that a
/// 2 GiB image with ~0.5 GiB of data costs ~0.5 GiB of writes.
pub fn copy_sparse(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let from = std::fs::File::open(src)?;
    let len = from.metadata()?.len();
    let to = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(dst)?;
    to.set_len(len)?;
    let fd = from.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    while pos < len {
        let off = i64::try_from(pos).map_err(|_| std::io::Error::other("image too large"))?;
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (mut at, end) = (data as u64, (hole as u64).min(len));
        while at < end {
            let want = usize::try_from(end - at).unwrap_or(usize::MAX).min(buf.len());
            let n = from.read_at(&mut buf[..want], at)?;
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the image shrank"));
            }
            to.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        pos = end;
    }
    to.sync_all()
}

/// A VMM process with its console on a pipe: what it printed, each chunk
/// with the host time it arrived, and its stdin for typing.
pub struct Console {
    child: Child,
    input: Option<std::process::ChildStdin>,
    rx: Receiver<(f64, String)>,
    start: Instant,
    /// Everything received so far (`\r` removed).
    pub log: String,
    /// Where the next [`Console::expect`] starts looking.
    from: usize,
    /// The arrival time of each chunk: `(offset into log, seconds)`.
    stamps: Vec<(usize, f64)>,
    /// The end of the process's stderr, and the thread reading it.
    stderr: Arc<Mutex<Vec<u8>>>,
    err_thread: Option<std::thread::JoinHandle<()>>,
}

impl Console {
    /// Starts `cmd` with stdin, stdout and stderr on pipes (the end of
    /// stderr goes into error messages).
    pub fn spawn(mut cmd: Command) -> Result<Console, BenchError> {
        let start = Instant::now();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot start {:?}: {e}", cmd.get_program())))?;
        let input = child.stdin.take();
        let mut out = child.stdout.take().ok_or_else(|| fail("no stdout pipe".into()))?;
        let mut err = child.stderr.take().ok_or_else(|| fail("no stderr pipe".into()))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let err_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                s.extend_from_slice(&buf[..n]);
                // Keep the last 8 KiB.
                let excess = s.len().saturating_sub(8192);
                s.drain(..excess);
            }
        });
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                let chunk = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                if n == 0 || tx.send((start.elapsed().as_secs_f64(), chunk)).is_err() {
                    break;
                }
            }
        });
        Ok(Console {
            child,
            input,
            rx,
            start,
            log: String::new(),
            from: 0,
            stamps: Vec::new(),
            stderr,
            err_thread: Some(err_thread),
        })
    }

    /// Seconds since the process was started.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn receive(&mut self, (t, chunk): (f64, String)) {
        self.log.push_str(&chunk);
        self.stamps.push((self.log.len(), t));
    }

    /// Waits until `what` appears after the previous match and returns the
    /// time the chunk that completed it arrived.
    pub fn expect(&mut self, what: &str, timeout: Duration) -> Result<f64, BenchError> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(i) = self.log[self.from..].find(what) {
                let done = self.from + i + what.len();
                self.from = done;
                return Ok(arrival(&self.stamps, done).unwrap_or_else(|| self.now()));
            }
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(c) => self.receive(c),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(fail(format!("no {what:?} within {timeout:?}; console so far:\n{}", self.tail())))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.reap(Duration::from_secs(2));
                    return Err(fail(format!("the VMM exited ({st}) before {what:?}; console:\n{}", self.tail())));
                }
            }
        }
    }

    /// After the console closed: waits up to `grace` for the process to
    /// exit and, if it did, for the rest of its stderr. Its exit status, as
    /// text.
    fn reap(&mut self, grace: Duration) -> String {
        let end = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    if let Some(t) = self.err_thread.take() {
                        let _ = t.join();
                    }
                    return st.to_string();
                }
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
                Ok(None) => return "still running".into(),
                Err(e) => return format!("unknown: {e}"),
            }
        }
    }

    /// Types `text` on the console.
    pub fn send(&mut self, text: &str) -> Result<(), BenchError> {
        let input = self.input.as_mut().ok_or_else(|| fail("the console input is closed".into()))?;
        input.write_all(text.as_bytes()).and_then(|()| input.flush()).map_err(|e| fail(format!("typing: {e}")))
    }

    /// Waits for the process to exit (its console closes first); the exit
    /// time and status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(f64, ExitStatus), BenchError> {
        let end = Instant::now() + timeout;
        loop {
            match self.rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(c) => self.receive(c),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(fail(format!("no exit within {timeout:?}; console so far:\n{}", self.tail())))
                }
            }
        }
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| fail(format!("waiting for the VMM: {e}")))? {
                return Ok((self.now(), st));
            }
            if Instant::now() > end {
                return Err(fail(format!("the VMM closed its console but did not exit within {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The last lines of the console and of stderr, for error messages.
    pub fn tail(&self) -> String {
        let lines: Vec<&str> = self.log.lines().collect();
        let mut t = lines[lines.len().saturating_sub(25)..].join("\n");
        let err = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        if !err.is_empty() {
            let err = String::from_utf8_lossy(&err);
            let lines: Vec<&str> = err.lines().collect();
            t.push_str("\n(stderr)\n");
            t.push_str(&lines[lines.len().saturating_sub(10)..].join("\n"));
        }
        t
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The arrival time of the chunk that holds byte `offset` of the log
/// (`stamps`: the log's length after each chunk, with its time).
pub fn arrival(stamps: &[(usize, f64)], offset: usize) -> Option<f64> {
    let i = stamps.partition_point(|&(end, _)| end < offset);
    stamps.get(i).map(|&(_, t)| t)
}

/// The in-guest workloads: `(figure, shell command)`, for `--quick` a
/// shorter python loop and one dpkg pass over a tenth of the packages.
pub fn workloads(quick: bool) -> [(&'static str, String); 2] {
    let n = if quick { 300_000 } else { 3_000_000 };
    let pkgs = if quick { "| head -n 15" } else { "" };
    [
        ("python", format!("python3 -c 'print(sum(i*i for i in range({n})))'")),
        ("dpkg_L", format!("for p in $(dpkg-query -W -f '${{Package}}\\n' {pkgs}); do dpkg -L $p; done > /dev/null")),
    ]
}

/// Whether a workload's console output (between its markers) says it ran:
/// python's sum, and no error from the dpkg loop (its listings go to
/// /dev/null, so anything it says is an error).
pub fn check_output(name: &str, said: &str, quick: bool) -> Result<(), String> {
    match name {
        "python" => {
            let n: u128 = if quick { 300_000 } else { 3_000_000 };
            let sum = (n - 1) * n * (2 * n - 1) / 6;
            if said.lines().any(|l| l.trim() == sum.to_string()) {
                Ok(())
            } else {
                Err(format!("python3 did not print {sum}: {said:?}"))
            }
        }
        _ if said.trim().is_empty() => Ok(()),
        _ => Err(format!("unexpected output {said:?}")),
    }
}

/// A line that prints marker `W<n>` (`n` computed by the shell, so the
/// echoed input never matches), the command, then marker `W<n+1>`.
pub fn marked(cmd: &str, n: u32) -> (String, String, String) {
    (format!("echo W$(({n}-1+1))B; {cmd}; echo W$(({n}+1))E\n"), format!("W{n}B"), format!("W{}E", n + 1))
}

/// One run: boot to login, log in, the workloads, poweroff. The figures
/// in [`FIGURES`] order.
pub fn session(cmd: Command, quick: bool) -> Result<Vec<(&'static str, f64)>, BenchError> {
    let mut c = Console::spawn(cmd)?;
    let login = c.expect("login:", BOOT_TIMEOUT)?;
    let mut out = vec![("boot_to_login", login)];
    // getty prints the prompt before it reads: give it a moment.
    std::thread::sleep(Duration::from_secs(1));
    c.send("root\n")?;
    c.expect(PROMPT, STEP_TIMEOUT)?;
    c.expect("#", STEP_TIMEOUT)?;
    for (i, (name, cmd)) in workloads(quick).iter().enumerate() {
        let (line, begin, end) = marked(cmd, 41 + 10 * i as u32);
        c.send(&line)?;
        let t0 = c.expect(&begin, STEP_TIMEOUT)?;
        let from = c.from;
        let t1 = c.expect(&end, STEP_TIMEOUT)?;
        let said = &c.log[from..c.from - end.len()];
        check_output(name, said, quick).map_err(|e| fail(format!("{name}: {e}; console:\n{}", c.tail())))?;
        out.push((name, t1 - t0));
    }
    c.expect(PROMPT, STEP_TIMEOUT)?;
    let sent = c.now();
    c.send("poweroff\n")?;
    let (gone, status) = c.wait_exit(SHUTDOWN_TIMEOUT)?;
    tracing::info!(%status, "distro: the VMM exited");
    out.push(("shutdown", gone - sent));
    Ok(out)
}

/// What `popek bench --suite distro` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    /// Peers, in order: `bt`, `qemu`.
    pub backends: Vec<String>,
    /// The `popek` binary: bt boots as `popek run` children.
    pub popek: Option<PathBuf>,
    /// Pass `--no-jail` to those children.
    pub no_jail: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            quick: false,
            backends: BACKENDS.iter().map(|s| s.to_string()).collect(),
            popek: None,
            no_jail: false,
        }
    }
}

/// Checks a `--backends` list: bt and qemu.
pub fn check_backends(backends: &[String]) -> Result<(), BenchError> {
    match backends.iter().find(|b| !BACKENDS.contains(&b.as_str())) {
        Some(b) => Err(BenchError::UnknownBackend { suite: "distro", backend: b.clone(), known: "bt, qemu".into() }),
        None => Ok(()),
    }
}

/// The VMM command for `backend` on `image` with the disk `disk` (a copy).
pub fn command(backend: &str, image: &Image, disk: &Path, opts: &Options) -> Result<Command, String> {
    match backend {
        "qemu" => {
            let qemu = super::linux::find_qemu().ok_or("qemu-system-i386 is not on PATH")?;
            let mut c = Command::new(qemu);
            c.args(["-M", "pc", "-accel", "tcg", "-m", &RAM_MIB.to_string(), "-kernel"])
                .arg(&image.kernel)
                .arg("-initrd")
                .arg(&image.initrd)
                .args(["-append", CMDLINE, "-drive"])
                .arg(format!("file={},format=raw,if=virtio", disk.display()))
                .args(["-display", "none", "-no-reboot", "-serial", "stdio", "-monitor", "none"]);
            Ok(c)
        }
        _ => {
            let exe = opts.popek.as_ref().ok_or("no popek binary to run the VM with (run from `popek bench`)")?;
            let mut c = Command::new(exe);
            c.args(["run", "--backend", backend, "--kernel"])
                .arg(&image.kernel)
                .arg("--initrd")
                .arg(&image.initrd)
                .arg("--disk")
                .arg(disk)
                .args(["--mem", &format!("{RAM_MIB}M"), "--append", CMDLINE]);
            if opts.no_jail {
                c.arg("--no-jail");
            }
            Ok(c)
        }
    }
}

/// Runs the suite with the image found by [`find_image`] (`target/debian`
/// relative to the current directory, then the cache).
pub fn run_opts(opts: &Options) -> Result<Report, BenchError> {
    check_backends(&opts.backends)?;
    run_report(find_image(&image_dirs(Path::new("target/debian"))), opts)
}

/// The library's entry: the popek binary from `POPEK_BIN` (none: bt is
/// skipped with the reason).
pub fn run(quick: bool) -> Result<Vec<Row>, BenchError> {
    let popek = std::env::var_os("POPEK_BIN").map(PathBuf::from);
    Ok(run_opts(&Options { quick, popek, ..Options::default() })?.rows)
}

/// Runs each requested backend on `image` (or skips them all with the
/// reason there is none).
pub fn run_report(image: Result<Image, String>, opts: &Options) -> Result<Report, BenchError> {
    check_backends(&opts.backends)?;
    let mut report = Report::new("distro", &opts.backends);
    let image = match image {
        Ok(i) => i,
        Err(why) => {
            for b in &opts.backends {
                report.skip(b, &FIGURES, &why);
            }
            return Ok(report);
        }
    };
    println!("distro: {} on {}, backends {}", image.disk.display(), CMDLINE, opts.backends.join(","));
    let copy = super::linux::TempFile(std::env::temp_dir().join(format!("popek-distro-{}.img", std::process::id())));
    for b in &opts.backends {
        if b == "qemu" && opts.quick {
            report.skip(b, &FIGURES, "--quick");
            continue;
        }
        let cmd = match command(b, &image, &copy.0, opts) {
            Ok(c) => c,
            Err(why) => {
                report.skip(b, &FIGURES, &why);
                continue;
            }
        };
        let t = Instant::now();
        copy_sparse(&image.disk, &copy.0)
            .map_err(|e| fail(format!("cannot copy {} to {}: {e}", image.disk.display(), copy.0.display())))?;
        tracing::info!(secs = t.elapsed().as_secs_f64(), "distro: image copied");
        let figs = session(cmd, opts.quick).map_err(|e| match e {
            BenchError::UnexpectedExit(m) => {
                BenchError::UnexpectedExit(m.replacen("distro suite: ", &format!("distro suite: {b}: "), 1))
            }
            other => other,
        })?;
        let cells: Vec<String> = figs.iter().map(|(n, v)| format!("{n} {v:.2} s")).collect();
        println!("distro: {b}: {}", cells.join(", "));
        report.rows.extend(figs.into_iter().map(|(n, v)| Row::new("distro", n, b, v, "s")));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrival_is_the_chunk_holding_the_offset() {
        let stamps = [(5, 1.0), (12, 2.0), (20, 3.5)];
        assert_eq!(arrival(&stamps, 3), Some(1.0));
        assert_eq!(arrival(&stamps, 5), Some(1.0));
        assert_eq!(arrival(&stamps, 6), Some(2.0));
        assert_eq!(arrival(&stamps, 20), Some(3.5));
        assert_eq!(arrival(&stamps, 21), None);
    }

    #[test]
    fn workload_output_is_checked() {
        assert!(check_output("python", "\n8999995500000500000\n", false).is_ok());
        assert!(check_output("python", "\n  File \"<string>\", line 1\n", false).is_err());
        assert!(check_output("python", "8999955000050000\n", true).is_ok());
        assert!(check_output("dpkg_L", "\n", false).is_ok());
        assert!(check_output("dpkg_L", "\nbash: dpkg: command not found\n", false).is_err());
    }

    #[test]
    fn markers_do_not_match_their_echo() {
        let (line, begin, end) = marked("true", 41);
        assert_eq!(begin, "W41B");
        assert_eq!(end, "W42E");
        assert!(!line.contains(&begin) && !line.contains(&end), "{line}");
        assert!(line.ends_with('\n'));
    }

    #[test]
    fn a_missing_image_skips_every_figure_with_how_to_build_it() {
        let dir = std::env::temp_dir().join(format!("popek-no-image-{}", std::process::id()));
        let why = find_image(std::slice::from_ref(&dir)).unwrap_err();
        assert!(why.contains(&dir.display().to_string()) && why.contains("scripts/make-debian-image.sh"), "{why}");
        let r = run_report(Err(why.clone()), &Options::default()).unwrap();
        assert_eq!(r.rows.len(), FIGURES.len() * 2);
        assert!(r.rows.iter().all(|row| !row.measured() && row.skipped.as_deref() == Some(why.as_str())));
        assert_eq!(r.skip_reason("qemu"), Some(why.as_str()));
        assert!(check_backends(&["kvm".into()]).is_err());
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = std::env::temp_dir().join(format!("popek-sparse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::create(&a).unwrap();
            f.set_len(64 << 20).unwrap();
            f.write_all_at(b"head", 0).unwrap();
            f.write_all_at(&[7u8; 5000], 40 << 20).unwrap();
            f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        }
        copy_sparse(&a, &b).unwrap();
        let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(x == y, "contents differ");
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&b).unwrap().blocks();
        assert!(blocks * 512 < 8 << 20, "the copy is not sparse: {blocks} blocks");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
