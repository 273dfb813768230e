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
//! The same `nb32` runs natively (a static i386 binary: the host runs it as
//! a 32-bit process; its stdout lines timed the same way, on a pipe) and,
//! if `qemu-system-i386` is installed and not `--quick`, the same kernel and
//! initramfs boot under QEMU TCG, its serial console timed the same way.
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
use crate::backend::bt::{BtBackend, BtConfig};
use crate::devices::{Clock, HostClock, HostWallClock, Platform, PlatformConfig};
use crate::loader::{initramfs, linux};
use crate::memory::GuestMemory;
use crate::vm::{RunOutcome, Vm};

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
        let pick = |var: &str, default: &str| -> Result<PathBuf, BenchError> {
            let (p, from) = match std::env::var_os(var) {
                Some(v) => (PathBuf::from(v), format!("${var}")),
                None => (PathBuf::from(default), format!("the default; set {var} to override")),
            };
            if p.is_file() {
                Ok(p)
            } else {
                Err(BenchError::Input(format!("{} not found ({from})", p.display())))
            }
        };
        Ok(Inputs {
            kernel: pick("POPEK_KERNEL", "../shared/guests/linux-686/vmlinuz")?,
            busybox: pick("POPEK_BUSYBOX", "../shared/guests/linux-686/busybox")?,
            nb32: pick("POPEK_NB32", "../shared/guests/bench/nb32")?,
        })
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

    fn tail(&self, n: usize) -> String {
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

/// Boots the guest on bt; returns the timed console lines and the VM's
/// counters.
pub fn boot_bt(inputs: &Inputs, initrd: &[u8]) -> Result<(TimedLines, Vec<(String, u64)>), BenchError> {
    let image = std::fs::read(&inputs.kernel)
        .map_err(|e| BenchError::Input(format!("cannot read {}: {e}", inputs.kernel.display())))?;
    let lines = TimedLines::default();
    let start = Instant::now();
    let mem = Arc::new(GuestMemory::new(RAM)?);
    let boot = linux::load(&mem, &image, CMDLINE, Some(initrd)).map_err(|e| fail(format!("kernel load: {e}")))?;
    let clock: Arc<dyn Clock> = Arc::new(HostClock::new());
    let platform = Platform::new(PlatformConfig {
        ram_size: mem.size(),
        console: Box::new(LineClock::new(start, lines.clone())),
        clock: clock.clone(),
        wall_clock: Arc::new(HostWallClock),
    })
    .map_err(|e| fail(format!("platform: {e}")))?;
    let bt = BtBackend::new(mem.clone(), boot.state.to_cpu(), BtConfig::default())
        .map_err(|e| fail(format!("bt backend: {e}")))?;
    let mut vm = Vm::new(mem, platform, Box::new(bt), clock);
    let outcome = vm.run().map_err(|e| fail(format!("run on bt: {e}\n{}", lines.tail(20))))?;
    if outcome != RunOutcome::HaltedWithInterruptsOff {
        return Err(fail(format!("bt run ended with {outcome:?}, not a halt:\n{}", lines.tail(20))));
    }
    Ok((lines, vm.stats()))
}

/// Runs nb32 on the host, its stdout lines timed on a pipe.
pub fn run_native(nb32: &Path, scale: f64) -> Result<TimedLines, BenchError> {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    if status.lines().any(|l| l.starts_with("Seccomp:") && l.trim_end() != "Seccomp:\t0") {
        return Err(fail(
            "this thread runs under a seccomp filter (it ran a vCPU?); a native i386 nb32 started from it would die of SIGSYS"
                .into(),
        ));
    }
    let lines = TimedLines::default();
    let start = Instant::now();
    let mut child = Command::new(nb32)
        .arg(scale.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {} natively (a static i386 binary): {e}", nb32.display())))?;
    let out = child.stdout.take().expect("piped stdout");
    for l in BufReader::new(out).lines() {
        let l = l.map_err(|e| fail(format!("reading nb32's output: {e}")))?;
        lines.push_line(start.elapsed().as_secs_f64(), l);
    }
    let st = child.wait().map_err(|e| fail(format!("waiting for nb32: {e}")))?;
    if !st.success() {
        return Err(fail(format!("native nb32 failed ({st}):\n{}", lines.tail(10))));
    }
    Ok(lines)
}

/// Where QEMU is, if installed (searches `PATH`).
pub fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("qemu-system-i386")).find(|p| p.is_file())
}

/// Boots the same kernel and initramfs under QEMU TCG, its serial console
/// on a pipe, timed the same way. Stops QEMU once nb32 is done and the
/// guest has had a few seconds to power off.
pub fn boot_qemu(qemu: &Path, kernel: &Path, initrd_path: &Path) -> Result<TimedLines, BenchError> {
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
                if l.trim() == "NB done" {
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
        return Err(fail(format!("QEMU ended ({st}) before nb32 was done: {err}\n{}", lines.tail(20))));
    }
    Ok(lines)
}

/// Runs the linux suite on the guest files named by the environment (or
/// the defaults).
pub fn run(quick: bool) -> Result<Vec<Row>, BenchError> {
    run_with(&Inputs::from_env()?, quick)
}

/// Runs the linux suite on the given guest files.
pub fn run_with(inputs: &Inputs, quick: bool) -> Result<Vec<Row>, BenchError> {
    let scale = if quick { SCALE_QUICK } else { SCALE_FULL };
    println!("linux: nb32 scale {scale}");
    let initrd =
        initramfs::busybox_initramfs(&inputs.busybox, &init_script(scale), &[("nb32".to_owned(), inputs.nb32.clone())])
            .map_err(|e| fail(format!("initramfs: {e}")))?;

    // The vCPU thread gets a seccomp filter that turns every i386 system
    // call into SIGSYS, and children inherit it: boot bt on a thread of its
    // own so that the native nb32 (started from this thread) is not under it.
    let (bt_lines, stats) = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("linux-bench-bt".into())
            .stack_size(16 << 20)
            .spawn_scoped(s, || boot_bt(inputs, &initrd))
            .map_err(|e| fail(format!("cannot start the vCPU thread: {e}")))?
            .join()
            .map_err(|_| fail("the vCPU thread panicked".into()))?
    })?;
    let interesting = ["bt/time_", "mmu/", "bt/exits/user", "bt/exits/kernel_page_fault", "vm/interrupts_injected"];
    for (k, v) in stats.iter().filter(|(k, _)| interesting.iter().any(|p| k.starts_with(p))) {
        tracing::info!(counter = %k, value = v, "linux bt run");
    }
    let figs = figures(&bt_lines.lines(), true).map_err(|e| fail(format!("bt: {e}\n{}", bt_lines.tail(20))))?;
    let mut out = rows("bt", figs);

    let native = run_native(&inputs.nb32, scale)?;
    let figs = figures(&native.lines(), false).map_err(|e| fail(format!("native: {e}\n{}", native.tail(20))))?;
    out.extend(rows("native", figs));

    if quick {
        println!("linux: qemu skipped (--quick)");
    } else if let Some(qemu) = find_qemu() {
        let path = std::env::temp_dir().join(format!("popek-linux-bench-{}.cpio.gz", std::process::id()));
        std::fs::write(&path, &initrd).map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
        let r = boot_qemu(&qemu, &inputs.kernel, &path);
        let _ = std::fs::remove_file(&path);
        let q = r?;
        let figs = figures(&q.lines(), true).map_err(|e| fail(format!("qemu: {e}\n{}", q.tail(20))))?;
        out.extend(rows("qemu", figs));
    } else {
        println!("linux: qemu skipped (qemu-system-i386 is not on PATH)");
    }
    Ok(out)
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
    }
}
