//! `popek bench --suite linux`: Debian's i386 kernel with a busybox
//! initramfs runs the `nb32` benchmark, timed from outside with the host
//! clock on every complete console line.
//!
//! - `boot_to_init` (s): from the start of the run (before guest RAM is
//!   allocated and the kernel loaded) to the init script's first line;
//! - per `nb32` phase, the time between `NB begin <phase> <count>` and
//!   `NB <phase> ...`: `compute` in s, `syscall`, `pgfault`, `ptemod`,
//!   `ctxsw`, `forkwait` in µs per operation (duration / count).
//!
//! The same `nb32` always runs natively (a static i386 binary: the host
//! runs it as a 32-bit process; its stdout lines timed the same way, on a
//! pipe): the reference. Then each peer of `--backends` (default
//! `bt,kvm,qemu`) boots the same kernel and initramfs:
//!
//! - `bt` and `kvm`: [`crate::run::run`] with [`BackendKind`] `Bt` / `Kvm`
//!   (the `popek run` path), on a thread of their own;
//! - `kvm` only after [`kvm_probe`]: the calibration loop
//!   (`kvm::measure_speed`, bounded by [`KVM_PROBE_TIMEOUT`]) and the paging
//!   probe. An emulating /dev/kvm (below [`kvm::is_hardware_speed`], as the
//!   PVM-backed one of the project's machines), refused 32-bit paging, or a
//!   missing or forbidden /dev/kvm skip the peer with the reason;
//! - `qemu`: `qemu-system-i386` TCG, its serial console timed the same way
//!   (skipped with `--quick` or when not installed).
//!
//! A skipped peer prints `linux: <peer> skipped: <reason>` and gets one
//! [`Row::skipped`] per figure (JSON `value: null, skipped: <reason>`).
//!
//! The boot machinery here (`boot`, `boot_jailed`, `boot_qemu`,
//! `run_native_command`, [`TimedLines`]) also serves the workloads suite.
//!
//! Inputs: `POPEK_KERNEL`, `POPEK_BUSYBOX`, `POPEK_NB32`, by default
//! `../shared/guests/linux-686/{vmlinuz,busybox}` and
//! `../shared/guests/bench/nb32` relative to the current directory.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{BenchError, Row};
use crate::backend::bt::BtConfig;
use crate::backend::{kvm, BackendError};
use crate::loader::initramfs;
use crate::run::{self, BackendKind, RunOptions};
use crate::vm::RunOutcome;

/// The kernel command line (the loader may add `reservetop=`).
pub const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
/// The first line the init script prints.
pub const INIT_LINE: &str = "init: up";
/// nb32's phases, in the order it runs them.
pub const PHASES: [&str; 6] = ["compute", "syscall", "pgfault", "ptemod", "ctxsw", "forkwait"];
/// nb32's loop scale for a full run and for `--quick`.
pub const SCALE_FULL: f64 = 1.0;
pub const SCALE_QUICK: f64 = 0.05;
/// Guest RAM (as in the QEMU command line).
const RAM: u64 = 256 << 20;
/// How long a QEMU boot may take before it is killed.
const QEMU_TIMEOUT: Duration = Duration::from_secs(900);

fn fail(msg: String) -> BenchError {
    BenchError::UnexpectedExit(format!("linux suite: {msg}"))
}

/// The three guest files, from the environment or the default paths.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub kernel: PathBuf,
    pub busybox: PathBuf,
    pub nb32: PathBuf,
}

impl Inputs {
    /// Resolves `POPEK_KERNEL`, `POPEK_BUSYBOX`, `POPEK_NB32` (defaults
    /// under `../shared/guests`) and checks that each file exists.
    pub fn from_env() -> Result<Inputs, BenchError> {
        Ok(Inputs {
            kernel: input_file("POPEK_KERNEL", DEFAULT_KERNEL)?,
            busybox: input_file("POPEK_BUSYBOX", DEFAULT_BUSYBOX)?,
            nb32: input_file("POPEK_NB32", "../shared/guests/bench/nb32")?,
        })
    }
}

/// The default kernel and busybox, relative to the current directory.
pub const DEFAULT_KERNEL: &str = "../shared/guests/linux-686/vmlinuz";
pub const DEFAULT_BUSYBOX: &str = "../shared/guests/linux-686/busybox";

/// The file named by the environment variable `var`, or `default`; an
/// error naming both when it is not a file.
pub fn input_file(var: &str, default: &str) -> Result<PathBuf, BenchError> {
    let (p, from) = match std::env::var_os(var) {
        Some(v) => (PathBuf::from(v), format!("${var}")),
        None => (PathBuf::from(default), format!("the default; set {var} to override")),
    };
    if p.is_file() {
        Ok(p)
    } else {
        Err(BenchError::Input(format!("{} not found ({from})", p.display())))
    }
}

/// The init script: a first line, nb32 at `scale`, power off.
pub fn init_script(scale: f64) -> String {
    format!("#!/bin/sh\necho {INIT_LINE}\n/nb32 {scale}\npoweroff -f\n")
}

/// Console lines with the host time (s since the start) at which each
/// line's newline arrived.
#[derive(Clone, Default)]
pub struct TimedLines(Arc<Mutex<LineState>>);

/// The partial line being received and the complete lines so far.
type LineState = (Vec<u8>, Vec<(f64, String)>);

/// A console sink that timestamps every complete line.
pub struct LineClock {
    start: Instant,
    lines: TimedLines,
}

impl LineClock {
    pub fn new(start: Instant, lines: TimedLines) -> LineClock {
        LineClock { start, lines }
    }
}

impl TimedLines {
    fn push_bytes(&self, at: f64, bytes: &[u8]) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (partial, lines) = &mut *g;
        for &b in bytes {
            if b == b'\n' {
                let text = String::from_utf8_lossy(partial).trim_end_matches('\r').to_owned();
                lines.push((at, text));
                partial.clear();
            } else {
                partial.push(b);
            }
        }
    }

    fn push_line(&self, at: f64, line: String) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.1.push((at, line.trim_end_matches('\r').to_owned()));
    }

    /// Every complete line so far.
    pub fn lines(&self) -> Vec<(f64, String)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// The last `n` complete lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let l = self.lines();
        l[l.len().saturating_sub(n)..].iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>().join("\n")
    }
}

impl Write for LineClock {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.lines.push_bytes(self.start.elapsed().as_secs_f64(), b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Figures from timed lines: `(name, value, unit)`; `boot_to_init` only
/// when `boot` (the native run has no boot). Errors name what is missing.
pub fn figures(lines: &[(f64, String)], boot: bool) -> Result<Vec<(String, f64, &'static str)>, String> {
    let mut out = Vec::new();
    if boot {
        let t = lines.iter().find(|(_, l)| l.trim() == INIT_LINE).ok_or("the init script's first line never came")?;
        out.push(("boot_to_init".to_owned(), t.0, "s"));
    }
    for phase in PHASES {
        let begin = lines.iter().enumerate().find_map(|(i, (t, l))| {
            let mut w = l.split_whitespace();
            (w.next() == Some("NB") && w.next() == Some("begin") && w.next() == Some(phase))
                .then(|| w.next().and_then(|c| c.parse::<f64>().ok()).map(|c| (i, *t, c)))
                .flatten()
        });
        let (i, t0, count) = begin.ok_or_else(|| format!("no `NB begin {phase} <count>` line"))?;
        let end = lines[i + 1..].iter().find(|(_, l)| {
            let mut w = l.split_whitespace();
            w.next() == Some("NB") && w.next() == Some(phase)
        });
        let (t1, _) = end.ok_or_else(|| format!("no `NB {phase} ...` line after its begin"))?;
        let dt = t1 - t0;
        if phase == "compute" {
            out.push((phase.to_owned(), dt, "s"));
        } else {
            if count <= 0.0 {
                return Err(format!("phase {phase} ran {count} operations"));
            }
            out.push((phase.to_owned(), dt / count * 1e6, "us"));
        }
    }
    Ok(out)
}

fn rows(backend: &str, figs: Vec<(String, f64, &'static str)>) -> Vec<Row> {
    figs.into_iter().map(|(n, v, u)| Row::new("linux", &n, backend, v, u)).collect()
}

/// Every figure of a booted backend, `(name, unit)`, in row order.
pub fn figure_names() -> Vec<(&'static str, &'static str)> {
    let mut v = vec![("boot_to_init", "s")];
    v.extend(PHASES.iter().map(|&p| (p, if p == "compute" { "s" } else { "us" })));
    v
}

/// Removes a temporary file when dropped.
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Boots the kernel and initramfs on `kind` through [`crate::run::run`]
/// (the same path as `popek run --backend <kind>`), on a thread of its own,
/// its console lines timed from just before the run starts (before guest
/// RAM is allocated and the kernel loaded). Gives up after `timeout` (the
/// thread is then left behind: it cannot be cancelled). Returns the timed
/// lines and the VM's counters.
pub fn boot(
    kind: BackendKind,
    kernel: &Path,
    initrd_path: &Path,
    timeout: Duration,
) -> Result<(TimedLines, Vec<(String, u64)>), BenchError> {
    let name = match kind {
        BackendKind::Bt => "bt",
        BackendKind::Kvm => "kvm",
    };
    let opts = RunOptions {
        kernel: Some(kernel.to_owned()),
        initrd: Some(initrd_path.to_owned()),
        append: Some(CMDLINE.to_owned()),
        mem: RAM,
        backend: kind,
        bt: BtConfig::default(),
        interactive: false,
        guest: None,
        jail: false,
        ..RunOptions::default()
    };
    let lines = TimedLines::default();
    let console = lines.clone();
    let (tx, rx) = channel();
    // The vCPU thread gets a seccomp filter that turns every i386 system
    // call into SIGSYS, and children inherit it: boot on a thread of its
    // own so that the native nb32 (started from the caller) is not under it.
    std::thread::Builder::new()
        .name(format!("linux-bench-{name}"))
        .stack_size(16 << 20)
        .spawn(move || {
            let start = Instant::now();
            let _ = tx.send(run::run(&opts, Box::new(LineClock::new(start, console))));
        })
        .map_err(|e| fail(format!("cannot start the vCPU thread: {e}")))?;
    let report = match rx.recv_timeout(timeout) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(fail(format!("run on {name}: {e}\n{}", lines.tail(20)))),
        Err(RecvTimeoutError::Timeout) => {
            return Err(fail(format!("{name}: no power-off within {timeout:?}; output so far:\n{}", lines.tail(20))))
        }
        Err(RecvTimeoutError::Disconnected) => return Err(fail(format!("the {name} vCPU thread panicked"))),
    };
    if report.outcome != RunOutcome::HaltedWithInterruptsOff {
        return Err(fail(format!("{name} run ended with {:?}, not a halt:\n{}", report.outcome, lines.tail(20))));
    }
    Ok((lines, report.stats))
}

/// [`boot`] as a `popek run` child (jailed), its console timed from the
/// moment it is started, as QEMU's is.
pub fn boot_jailed(
    exe: &Path,
    backend: &str,
    kernel: &Path,
    initrd_path: &Path,
    timeout: Duration,
) -> Result<(TimedLines, Vec<(String, u64)>), BenchError> {
    let args: Vec<String> = [
        "--kernel",
        &kernel.display().to_string(),
        "--initrd",
        &initrd_path.display().to_string(),
        "--append",
        CMDLINE,
        "--mem",
        &RAM.to_string(),
        "--backend",
        backend,
        "--stats",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = super::worker::popek_run(exe, &args, timeout)?;
    let lines = TimedLines::default();
    for (t, l) in &run.lines {
        lines.push_line(*t, l.clone());
    }
    if !run.success {
        return Err(fail(format!("popek run --backend {backend} failed:\n{}\n{}", lines.tail(20), run.stderr)));
    }
    Ok((lines, run.stats()))
}

/// Guest instructions the Linux decompressor needs per byte of the
/// kernel's compressed payload: `valgrind --tool=callgrind xz -dc` of the
/// 5.64 MB xz payload of Debian's 6.1 `-686` bzImage (16.3 MB out) counts
/// 1.73 G instructions, ≈ 306 per payload byte (x86-64 liblzma; the
/// kernel's own i386 `xz_dec` is no cheaper). A lower bound for a boot:
/// the kernel proper has yet to run.
pub const DECOMPRESS_INSNS_PER_PAYLOAD_BYTE: f64 = 300.0;
/// What hardware virtualization runs the calibration loop (`dec ecx; jnz`)
/// at, for the "N× faster" of the skip reason: ≥ 1 G instructions/s.
pub const HARDWARE_INSNS_PER_SEC: f64 = 1e9;
/// How long the KVM probes (calibration loop and paging probe) may take
/// before the kvm peer is skipped as too slow (normally ~0.2 s).
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// The size of a bzImage's compressed payload (`payload_length`, boot
/// protocol ≥ 2.08), or of the whole file if the header does not say.
pub fn payload_bytes(kernel: &Path) -> u64 {
    let file_len = std::fs::metadata(kernel).map(|m| m.len()).unwrap_or(0);
    let mut hdr = [0u8; 0x250];
    let ok = std::fs::File::open(kernel).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut hdr)).is_ok();
    let version = u16::from_le_bytes([hdr[0x206], hdr[0x207]]);
    if ok && &hdr[0x202..0x206] == b"HdrS" && version >= 0x0208 {
        let n = u32::from_le_bytes([hdr[0x24c], hdr[0x24d], hdr[0x24e], hdr[0x24f]]);
        if n > 0 {
            return u64::from(n);
        }
    }
    file_len
}

/// Why the kvm peer cannot boot Linux here, from the probes' answers:
/// `speed` in guest instructions/s, `paging` whether 32-bit paging works,
/// `payload` the kernel's compressed size. `None`: hardware speed and
/// paging works, so boot it.
pub fn kvm_skip_reason(speed: f64, paging: Result<bool, String>, payload: u64) -> Option<String> {
    let slow = (!kvm::is_hardware_speed(speed)).then(|| {
        let secs = payload as f64 * DECOMPRESS_INSNS_PER_PAYLOAD_BYTE / speed.max(1.0);
        let need = if secs >= 120.0 { format!("{:.0} min", (secs / 60.0).floor()) } else { format!("{secs:.0} s") };
        format!(
            "/dev/kvm emulates 32-bit guests at {:.1} M insns/s (hardware runs ~{:.0}x faster); \
             the kernel's {:.1} MB compressed payload would need > {need} to decompress",
            speed / 1e6,
            HARDWARE_INSNS_PER_SEC / speed.max(1.0),
            payload as f64 / 1e6
        )
    });
    let paging = match paging {
        Ok(true) => None,
        Ok(false) => {
            Some("/dev/kvm refuses 32-bit paging (mov cr0 with PG raises #GP), which Linux turns on".to_owned())
        }
        Err(e) => Some(format!("the 32-bit paging probe failed: {e}")),
    };
    match (slow, paging) {
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        (a, b) => a.or(b),
    }
}

/// Probes /dev/kvm on a thread of its own, within [`KVM_PROBE_TIMEOUT`]:
/// the calibration loop first (`kvm::measure_speed`), then 32-bit paging
/// (`kvm::supports_32bit_paging`). `Some(reason)` if the kvm peer cannot
/// boot Linux here (missing or forbidden /dev/kvm included).
pub fn kvm_probe(kernel: &Path) -> Option<String> {
    let payload = payload_bytes(kernel);
    let (tx, rx) = channel();
    let spawned = std::thread::Builder::new().name("linux-bench-kvm-probe".into()).spawn(move || {
        let r = match kvm::measure_speed() {
            Err(e @ BackendError::Unavailable(..)) => Some(e.to_string()),
            Err(e) => Some(format!("the KVM calibration loop failed: {e}")),
            Ok(speed) => {
                tracing::info!(speed, "KVM speed");
                kvm_skip_reason(speed, kvm::supports_32bit_paging().map_err(|e| e.to_string()), payload)
            }
        };
        let _ = tx.send(r);
    });
    if let Err(e) = spawned {
        return Some(format!("cannot start the KVM probe thread: {e}"));
    }
    match rx.recv_timeout(KVM_PROBE_TIMEOUT) {
        Ok(r) => r,
        Err(RecvTimeoutError::Timeout) => Some(format!(
            "the KVM calibration loop did not finish within {} s (/dev/kvm is far too slow to boot Linux)",
            KVM_PROBE_TIMEOUT.as_secs()
        )),
        Err(RecvTimeoutError::Disconnected) => Some("the KVM probe panicked".into()),
    }
}

/// Runs nb32 on the host, its stdout lines timed on a pipe.
pub fn run_native(nb32: &Path, scale: f64) -> Result<TimedLines, BenchError> {
    let mut cmd = Command::new(nb32);
    cmd.arg(scale.to_string());
    run_native_command(cmd, "nb32")
}

/// Runs `cmd` (a static i386 program, or one that runs them) on the host,
/// its stdout lines timed on a pipe from just before it starts; `what`
/// names it in errors. Refuses from a seccomp-filtered thread (one that ran
/// a vCPU): the program's i386 system calls would die of SIGSYS there.
pub fn run_native_command(mut cmd: Command, what: &str) -> Result<TimedLines, BenchError> {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    if status.lines().any(|l| l.starts_with("Seccomp:") && l.trim_end() != "Seccomp:\t0") {
        return Err(fail(format!(
            "this thread runs under a seccomp filter (it ran a vCPU?); a native i386 {what} started from it would die of SIGSYS"
        )));
    }
    let lines = TimedLines::default();
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {what} natively (a static i386 binary): {e}")))?;
    let out = child.stdout.take().expect("piped stdout");
    for l in BufReader::new(out).lines() {
        let l = l.map_err(|e| fail(format!("reading {what}'s output: {e}")))?;
        lines.push_line(start.elapsed().as_secs_f64(), l);
    }
    let st = child.wait().map_err(|e| fail(format!("waiting for {what}: {e}")))?;
    if !st.success() {
        return Err(fail(format!("native {what} failed ({st}):\n{}", lines.tail(10))));
    }
    Ok(lines)
}

/// Where QEMU is, if installed (searches `PATH`).
pub fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("qemu-system-i386")).find(|p| p.is_file())
}

/// The line nb32 prints last.
pub const NB_DONE: &str = "NB done";

/// Boots the same kernel and initramfs under QEMU TCG, its serial console
/// on a pipe, timed the same way. Stops QEMU once the guest printed the
/// line `done` (trimmed) and has had a few seconds to power off.
pub fn boot_qemu(qemu: &Path, kernel: &Path, initrd_path: &Path, done: &str) -> Result<TimedLines, BenchError> {
    let lines = TimedLines::default();
    let start = Instant::now();
    let mut child = Command::new(qemu)
        .args(["-M", "pc", "-accel", "tcg", "-m", "256", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd_path)
        .args(["-append", CMDLINE, "-display", "none", "-no-reboot", "-serial", "stdio", "-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", qemu.display())))?;
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = channel();
    let reader = std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send((start.elapsed().as_secs_f64(), l)).is_err() {
                break;
            }
        }
    });
    let mut done_at: Option<Instant> = None;
    let mut killed = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((t, l)) => {
                if l.trim() == done {
                    done_at = Some(Instant::now());
                }
                lines.push_line(t, l);
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let finished = done_at.is_some_and(|d| d.elapsed() > Duration::from_secs(10));
        if !killed && (finished || start.elapsed() > QEMU_TIMEOUT) {
            let _ = child.kill();
            killed = true;
        }
    }
    let _ = reader.join();
    let st = child.wait().map_err(|e| fail(format!("waiting for QEMU: {e}")))?;
    if done_at.is_none() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        return Err(fail(format!("QEMU ended ({st}) before the guest printed {done:?}: {err}\n{}", lines.tail(20))));
    }
    Ok(lines)
}

/// The peers of a default run, in order (native always runs too).
pub const DEFAULT_BACKENDS: [&str; 3] = ["bt", "kvm", "qemu"];
/// How long one boot (bt, kvm or QEMU) may take before it is given up.
pub const BOOT_TIMEOUT: Duration = QEMU_TIMEOUT;

/// What `popek bench --suite linux` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    /// Peers to boot, in order: `bt`, `kvm`, `qemu` (native always runs).
    pub backends: Vec<String>,
    /// The `popek` binary: bt and kvm then boot as `popek run` children,
    /// jailed like any run, timed from outside as QEMU is. `None` boots
    /// them in this process (tests).
    pub popek: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Options {
        Options { quick: false, backends: DEFAULT_BACKENDS.iter().map(|s| s.to_string()).collect(), popek: None }
    }
}

/// The result of a run: the rows (skipped figures included, as
/// [`Row::skipped`]), and for each peer that did not run, why.
pub use super::Report;

/// Checks a `--backends` list: every name one of bt, kvm, qemu.
pub fn check_backends(backends: &[String]) -> Result<(), BenchError> {
    check_backends_of("linux", backends)
}

/// [`check_backends`] for `suite` (the suites that boot Linux on bt, kvm
/// and qemu and always run native).
pub fn check_backends_of(suite: &'static str, backends: &[String]) -> Result<(), BenchError> {
    match backends.iter().find(|b| !DEFAULT_BACKENDS.contains(&b.as_str())) {
        Some(b) => Err(BenchError::UnknownBackend {
            suite,
            backend: b.clone(),
            known: "bt, kvm, qemu; native always runs".into(),
        }),
        None => Ok(()),
    }
}

/// Runs the linux suite with the default peers on the guest files named by
/// the environment (or the defaults).
pub fn run(quick: bool) -> Result<Vec<Row>, BenchError> {
    Ok(run_opts(&Options { quick, ..Options::default() })?.rows)
}

/// Runs the linux suite as asked, on the guest files named by the
/// environment (the backends are checked first).
pub fn run_opts(opts: &Options) -> Result<Report, BenchError> {
    check_backends(&opts.backends)?;
    run_report(&Inputs::from_env()?, opts)
}

/// Runs the linux suite with the default peers on the given guest files.
pub fn run_with(inputs: &Inputs, quick: bool) -> Result<Vec<Row>, BenchError> {
    Ok(run_report(inputs, &Options { quick, ..Options::default() })?.rows)
}

/// Runs the linux suite on the given guest files: native nb32, then each
/// requested peer in order. Prints `linux: <peer> skipped: <reason>` for a
/// peer that cannot run (kvm on an emulating or paging-refusing /dev/kvm,
/// qemu with `--quick` or not installed); its figures become skipped rows.
pub fn run_report(inputs: &Inputs, opts: &Options) -> Result<Report, BenchError> {
    check_backends(&opts.backends)?;
    let quick = opts.quick;
    let scale = if quick { SCALE_QUICK } else { SCALE_FULL };
    println!("linux: nb32 scale {scale}, backends native,{}", opts.backends.join(","));
    let mut report = Report::new("linux", &opts.backends);

    // Native first, from this thread (never a vCPU thread: see `run_native`).
    let native = run_native(&inputs.nb32, scale)?;
    let figs = figures(&native.lines(), false).map_err(|e| fail(format!("native: {e}\n{}", native.tail(20))))?;
    report.rows.extend(rows("native", figs));

    let mut initrd: Option<TempFile> = None;
    for b in &opts.backends {
        let skip = match b.as_str() {
            "kvm" => kvm_probe(&inputs.kernel),
            "qemu" if quick => Some("--quick".to_owned()),
            "qemu" if find_qemu().is_none() => Some("qemu-system-i386 is not on PATH".to_owned()),
            _ => None,
        };
        if let Some(reason) = skip {
            report.skip(b, &figure_names(), &reason);
            continue;
        }
        let path = match &initrd {
            Some(t) => t.0.clone(),
            None => {
                let data = initramfs::busybox_initramfs(
                    &inputs.busybox,
                    &init_script(scale),
                    &[("nb32".to_owned(), inputs.nb32.clone())],
                )
                .map_err(|e| fail(format!("initramfs: {e}")))?;
                let path = std::env::temp_dir().join(format!("popek-linux-bench-{}.cpio.gz", std::process::id()));
                std::fs::write(&path, &data).map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
                initrd.insert(TempFile(path)).0.clone()
            }
        };
        let lines = match b.as_str() {
            "qemu" => boot_qemu(&find_qemu().expect("checked above"), &inputs.kernel, &path, NB_DONE)?,
            peer => {
                let kind = if peer == "kvm" { BackendKind::Kvm } else { BackendKind::Bt };
                let (lines, stats) = match &opts.popek {
                    Some(exe) => boot_jailed(exe, peer, &inputs.kernel, &path, BOOT_TIMEOUT)?,
                    None => boot(kind, &inputs.kernel, &path, BOOT_TIMEOUT)?,
                };
                let interesting = [
                    "bt/time_",
                    "mmu/",
                    "bt/exits/user",
                    "bt/exits/kernel_page_fault",
                    "vm/interrupts_injected",
                    "kvm/",
                ];
                for (k, v) in stats.iter().filter(|(k, _)| interesting.iter().any(|p| k.starts_with(p))) {
                    tracing::info!(counter = %k, value = v, "linux {peer} run");
                }
                lines
            }
        };
        let figs = figures(&lines.lines(), true).map_err(|e| fail(format!("{b}: {e}\n{}", lines.tail(20))))?;
        report.rows.extend(rows(b, figs));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_timed() {
        let l = TimedLines::default();
        let mut c = LineClock::new(Instant::now(), l.clone());
        c.write_all(b"init: u").unwrap();
        c.write_all(b"p\r\nNB begin compute 10\nNB com").unwrap();
        let got = l.lines();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1, "init: up");
        assert_eq!(got[1].1, "NB begin compute 10");
    }

    #[test]
    fn figures_per_phase() {
        let mut lines = vec![(0.5, "[ 1.0] noise".to_owned()), (1.0, "init: up".to_owned())];
        let mut t = 2.0;
        for p in PHASES {
            lines.push((t, format!("NB begin {p} 1000")));
            t += 0.5;
            lines.push((t, format!("NB {p} 1.0 us")));
        }
        let f = figures(&lines, true).unwrap();
        assert_eq!(f[0], ("boot_to_init".to_owned(), 1.0, "s"));
        assert_eq!(f[1], ("compute".to_owned(), 0.5, "s"));
        assert_eq!(f[2], ("syscall".to_owned(), 500.0, "us"));
        assert_eq!(f.len(), 7);
        assert!(figures(&lines[..4], true).is_err());
        let names: Vec<&str> = f.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, figure_names().iter().map(|x| x.0).collect::<Vec<_>>());
    }

    #[test]
    fn kvm_skip_reasons() {
        let r = kvm_skip_reason(1.4e6, Ok(false), 5_640_108).unwrap();
        assert!(r.starts_with("/dev/kvm emulates 32-bit guests at 1.4 M insns/s (hardware runs ~714x faster)"), "{r}");
        assert!(r.contains("5.6 MB compressed payload would need > 20 min to decompress"), "{r}");
        assert!(r.ends_with("; /dev/kvm refuses 32-bit paging (mov cr0 with PG raises #GP), which Linux turns on"));
        assert!(kvm_skip_reason(2e9, Ok(false), 1).unwrap().starts_with("/dev/kvm refuses 32-bit paging"));
        assert!(kvm_skip_reason(50e6, Ok(true), 5_000_000).unwrap().contains("would need > 30 s"));
        assert_eq!(kvm_skip_reason(2e9, Ok(true), 5_000_000), None);
    }

    #[test]
    fn unknown_backend_is_an_error() {
        assert!(check_backends(&["bt".into(), "kvm".into(), "qemu".into()]).is_ok());
        let e =
            run_opts(&Options { quick: true, backends: vec!["kvm".into(), "xen".into()], popek: None }).unwrap_err();
        assert!(e.to_string().contains("unknown backend \"xen\""), "{e}");
    }
}
