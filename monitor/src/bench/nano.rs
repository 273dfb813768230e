//! `popek bench --suite nano`: the built-in `nano` guest
//! ([`crate::guests::nano`]) on each backend, Adams & Agesen style: the
//! same bytes measure syscall, in, call_ret, pgfault, divzero, ptemod, cr3,
//! cli_sti, popf and compute in guest TSC cycles per iteration.
//!
//! - `bt`: `BtBackend` under the real platform and run loop (`Vm`);
//! - `kvm`: `KvmBackend`, after two probes: `kvm::measure_speed()` (an
//!   emulator below [`kvm::is_hardware_speed`] would take hours) and
//!   `kvm::supports_32bit_paging()` (the guest turns paging on). When either
//!   says no, or /dev/kvm is missing, the column is skipped with the reason;
//! - `qemu`: `qemu-system-i386` (TCG) loading the exported multiboot ELF with
//!   `-kernel` and isa-debug-exit at 0xf4, its serial console on a pipe.
//!
//! Every `NANO <row> <cycles> cycles` line becomes a row
//! `{suite: "nano", name: <row>, backend, value: <cycles>, unit: "cycles"}`.
//! [`to_matrix`] prints benchmarks × backends with the ratio to the fastest
//! backend of each row; [`to_svg`] draws the same as a log-scale bar chart.

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{BenchError, Row};
use crate::backend::bt::{BtBackend, BtConfig};
use crate::backend::kvm::{self, KvmBackend};
use crate::backend::{Backend, BackendError};
use crate::devices::{Clock, HostClock, HostWallClock, Platform, PlatformConfig};
use crate::guests::{self, nano::ROWS, Guest};
use crate::memory::GuestMemory;
use crate::vm::{RunOutcome, Vm};

/// The backends of a default run, in column order.
pub const DEFAULT_BACKENDS: [&str; 3] = ["bt", "kvm", "qemu"];
/// Iterations per row: a full run and `--quick`.
pub const ITERATIONS_FULL: u32 = guests::nano::DEFAULT_ITERATIONS;
pub const ITERATIONS_QUICK: u32 = 2_000;
/// Guest RAM for the bt and kvm runs.
const RAM: u64 = 16 << 20;

/// What `popek bench --suite nano` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    /// Backends, in column order: `bt`, `kvm`, `qemu`.
    pub backends: Vec<String>,
    /// Where to write the SVG chart, if anywhere.
    pub svg: Option<PathBuf>,
    /// The QEMU binary; `None` searches `PATH` for `qemu-system-i386`.
    pub qemu: Option<PathBuf>,
    /// The `popek` binary: bt and kvm then run the exported guest as
    /// `popek run` children, jailed like any run. `None` runs them in this
    /// process (tests).
    pub popek: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            quick: false,
            backends: DEFAULT_BACKENDS.iter().map(|s| s.to_string()).collect(),
            svg: None,
            qemu: None,
            popek: None,
        }
    }
}

/// The result of a run: the rows (a skipped backend's as [`Row::skipped`]),
/// and for each backend that could not run the guest, why.
pub use super::Report;

/// The figures of the suite, `(name, unit)`: what a skipped backend gets
/// skipped rows for.
pub fn figure_names() -> Vec<(&'static str, &'static str)> {
    ROWS.iter().map(|r| (*r, "cycles")).collect()
}

fn fail(msg: String) -> BenchError {
    BenchError::UnexpectedExit(format!("nano suite: {msg}"))
}

/// Why a backend produced no rows: skipped (reported, not an error).
enum Outcome {
    Rows(Vec<Row>),
    Skipped(String),
}

/// Runs the suite with the defaults (`bt,kvm,qemu`): `run_suite("nano")`.
pub fn run(quick: bool) -> Result<Vec<Row>, BenchError> {
    Ok(run_with(&Options { quick, ..Options::default() })?.rows)
}

/// Runs the nano guest on every requested backend. A backend that cannot
/// run it is reported through [`Report::skip`] (a printed
/// `nano: <backend> skipped: <reason>` and one skipped row per figure);
/// writes the SVG if asked.
pub fn run_with(opts: &Options) -> Result<Report, BenchError> {
    if let Some(b) = opts.backends.iter().find(|b| !DEFAULT_BACKENDS.contains(&b.as_str())) {
        return Err(fail(format!("unknown backend {b:?} (known: bt, kvm, qemu)")));
    }
    let iterations = if opts.quick { ITERATIONS_QUICK } else { ITERATIONS_FULL };
    let g = guests::nano::guest(iterations);
    println!("nano: {iterations} iterations per row, backends {}", opts.backends.join(","));
    let mut report = Report::new("nano", &opts.backends);
    for b in &opts.backends {
        let outcome = match b.as_str() {
            "bt" | "kvm" if opts.popek.is_some() => {
                let exe = opts.popek.as_deref().expect("checked");
                let usable = if b == "kvm" { kvm_probe_in_thread() } else { Ok(()) };
                match usable {
                    Err(reason) => Outcome::Skipped(reason),
                    Ok(()) => run_jailed(&g, b, exe, timeout(opts.quick))?,
                }
            }
            "bt" => run_bt(&g, timeout(opts.quick))?,
            "kvm" => run_kvm(&g, timeout(opts.quick))?,
            "qemu" => run_qemu(&g, opts.qemu.clone().or_else(find_qemu), timeout(opts.quick))?,
            other => return Err(fail(format!("unknown backend {other:?} (known: bt, kvm, qemu)"))),
        };
        match outcome {
            Outcome::Rows(r) => report.rows.extend(r),
            Outcome::Skipped(reason) => report.skip(b, &figure_names(), &reason),
        }
    }
    if let Some(path) = &opts.svg {
        std::fs::write(path, to_svg(&report)?).map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
        println!("nano: wrote {}", path.display());
    }
    Ok(report)
}

fn timeout(quick: bool) -> Duration {
    Duration::from_secs(if quick { 120 } else { 900 })
}

/// `NANO <name> <value> cycles` lines of the guest's console as rows.
pub fn parse(out: &str, backend: &str) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for name in ROWS {
        let line = out
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .find(|l| l.split(' ').nth(1) == Some(name) && l.starts_with("NANO "))
            .ok_or_else(|| format!("no `NANO {name} <cycles> cycles` line"))?;
        let w: Vec<&str> = line.split_whitespace().collect();
        let value = match w.as_slice() {
            ["NANO", _, v, "cycles"] => v.parse::<f64>().map_err(|e| format!("{line:?}: {e}"))?,
            _ => return Err(format!("malformed line {line:?}")),
        };
        rows.push(Row::new("nano", name, backend, value, "cycles"));
    }
    Ok(rows)
}

/// A console sink that keeps everything.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).replace('\r', "")
    }
}

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

type MakeBackend = Box<dyn FnOnce(Arc<GuestMemory>) -> Result<Box<dyn Backend>, BackendError> + Send>;

/// Runs `g` through `Vm` on a thread of its own (the vCPU thread's seccomp
/// filter and signal handling stay there), with the console captured.
fn run_vm(g: &Guest, backend: &str, timeout: Duration, make: MakeBackend) -> Result<String, BenchError> {
    let mem = Arc::new(GuestMemory::new(RAM.max(g.memory_needed()))?);
    mem.write(u64::from(g.load_addr), &g.image)?;
    let out = Capture::default();
    let clock: Arc<dyn Clock> = Arc::new(HostClock::new());
    let platform = Platform::new(PlatformConfig {
        ram_size: mem.size(),
        console: Box::new(out.clone()),
        clock: clock.clone(),
        wall_clock: Arc::new(HostWallClock),
    })
    .map_err(|e| fail(format!("platform: {e}")))?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("nano-{backend}"))
        .stack_size(16 << 20)
        .spawn(move || {
            let r = make(mem.clone()).map_err(|e| e.to_string()).and_then(|be| {
                let mut vm = Vm::new(mem, platform, be, clock);
                vm.run().map_err(|e| e.to_string())
            });
            let _ = tx.send(r);
        })
        .map_err(|e| fail(format!("cannot start the vCPU thread: {e}")))?;
    let start = Instant::now();
    let outcome = match rx.recv_timeout(timeout) {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(fail(format!("{backend}: run failed: {e}\n{}", tail(&out.text(), 20)))),
        // The thread is left behind (it cannot be cancelled); the process
        // is about to report the error and exit.
        Err(_) => {
            return Err(fail(format!("{backend}: no exit in {timeout:?}; output so far:\n{}", tail(&out.text(), 20))))
        }
    };
    let text = out.text();
    if outcome != RunOutcome::DebugExit(1) {
        return Err(fail(format!("{backend}: the guest ended with {outcome}, not exit 0:\n{}", tail(&text, 20))));
    }
    tracing::info!(backend, secs = start.elapsed().as_secs_f64(), "nano run");
    Ok(text)
}

fn run_bt(g: &Guest, timeout: Duration) -> Result<Outcome, BenchError> {
    let cpu = g.entry_cpu();
    let text = run_vm(
        g,
        "bt",
        timeout,
        Box::new(move |mem| Ok(Box::new(BtBackend::new(mem, cpu, BtConfig::default())?) as Box<dyn Backend>)),
    )?;
    Ok(Outcome::Rows(parse(&text, "bt").map_err(|e| fail(format!("bt: {e}\n{}", tail(&text, 20))))?))
}

/// Whether KVM can run the nano guest here; `Err(reason)` if not.
pub fn kvm_usable() -> Result<(), String> {
    let speed = match kvm::measure_speed() {
        Ok(s) => s,
        Err(e @ BackendError::Unavailable(..)) => return Err(e.to_string()),
        Err(e) => return Err(format!("the KVM speed probe failed: {e}")),
    };
    let mut why = Vec::new();
    match kvm::supports_32bit_paging() {
        Ok(true) => {}
        Ok(false) => why.push(
            "32-bit paging refused (mov cr0 with PG raises #GP: PVM-backed /dev/kvm), and the nano guest enables paging"
                .to_owned(),
        ),
        Err(e) => why.push(format!("the 32-bit paging probe failed: {e}")),
    }
    if !kvm::is_hardware_speed(speed) {
        why.push(format!(
            "/dev/kvm runs 32-bit code at {:.2} M instructions/s (an emulator; hardware gives >= 100 M/s)",
            speed / 1e6
        ));
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

/// [`kvm_usable`] on a thread of its own (the probes run KVM guests too).
fn kvm_probe_in_thread() -> Result<(), String> {
    std::thread::spawn(kvm_usable).join().unwrap_or_else(|_| Err("the KVM probe panicked".into()))
}

/// The guest exported as a multiboot ELF and run by `exe run` (jailed).
fn run_jailed(g: &Guest, backend: &str, exe: &std::path::Path, timeout: Duration) -> Result<Outcome, BenchError> {
    let elf = export_elf(g)?;
    let args: Vec<String> = ["--kernel", &elf.display().to_string(), "--mem", &RAM.max(g.memory_needed()).to_string()]
        .iter()
        .map(|s| s.to_string())
        .chain(["--backend".to_owned(), backend.to_owned()])
        .collect();
    let r = super::worker::popek_run(exe, &args, timeout);
    let _ = std::fs::remove_file(&elf);
    let run = r?;
    let text = run.text();
    if !run.success {
        return Err(fail(format!("{backend}: popek run failed:\n{}\n{}", tail(&text, 20), run.stderr)));
    }
    Ok(Outcome::Rows(parse(&text, backend).map_err(|e| fail(format!("{backend}: {e}\n{}", tail(&text, 20))))?))
}

/// Writes `g` as a multiboot ELF to a fresh temporary file.
fn export_elf(g: &Guest) -> Result<PathBuf, BenchError> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let elf = std::env::temp_dir().join(format!("popek-nano-{}-{seq}.elf", std::process::id()));
    std::fs::write(&elf, guests::export_multiboot(g))
        .map_err(|e| fail(format!("cannot write {}: {e}", elf.display())))?;
    Ok(elf)
}

fn run_kvm(g: &Guest, timeout: Duration) -> Result<Outcome, BenchError> {
    if let Err(reason) = kvm_probe_in_thread() {
        return Ok(Outcome::Skipped(reason));
    }
    let cpu = g.entry_cpu();
    let text =
        run_vm(g, "kvm", timeout, Box::new(move |mem| Ok(Box::new(KvmBackend::new(&mem, &cpu)?) as Box<dyn Backend>)))?;
    Ok(Outcome::Rows(parse(&text, "kvm").map_err(|e| fail(format!("kvm: {e}\n{}", tail(&text, 20))))?))
}

/// Where QEMU is, if installed (searches `PATH`).
pub fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("qemu-system-i386")).find(|p| p.is_file())
}

fn run_qemu(g: &Guest, qemu: Option<PathBuf>, timeout: Duration) -> Result<Outcome, BenchError> {
    let Some(qemu) = qemu else {
        return Ok(Outcome::Skipped("qemu-system-i386 is not on PATH (apt-get install qemu-system-x86)".into()));
    };
    if !qemu.is_file() {
        return Ok(Outcome::Skipped(format!("{} is not a file", qemu.display())));
    }
    let elf = export_elf(g)?;
    let r = qemu_output(&qemu, &elf, timeout);
    let _ = std::fs::remove_file(&elf);
    let text = r?;
    Ok(Outcome::Rows(parse(&text, "qemu").map_err(|e| fail(format!("qemu: {e}\n{}", tail(&text, 20))))?))
}

fn qemu_output(qemu: &std::path::Path, elf: &std::path::Path, timeout: Duration) -> Result<String, BenchError> {
    let mut child = Command::new(qemu)
        .args(["-machine", "pc", "-accel", "tcg", "-m", "32", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none", "-parallel", "none"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-kernel")
        .arg(elf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", qemu.display())))?;
    // Drain the pipes on threads so a chatty QEMU cannot block on them.
    let mut so = child.stdout.take().expect("piped stdout");
    let mut se = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut so, &mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut se, &mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| fail(format!("waiting for QEMU: {e}")))? {
            break Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).replace('\r', "");
    let err = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    match status {
        None => Err(fail(format!("qemu: no exit in {timeout:?}; output so far:\n{}", tail(&out, 20)))),
        // isa-debug-exit with 0 makes QEMU exit with (0 << 1) | 1.
        Some(s) if s.code() == Some(1) => Ok(out),
        Some(s) => Err(fail(format!("qemu ended with {s}, not the guest's exit 0:\n{}\n{err}", tail(&out, 20)))),
    }
}

// ---- presentation --------------------------------------------------------------

/// The value of `name` on `backend`, if measured.
fn value(rows: &[Row], name: &str, backend: &str) -> Option<f64> {
    rows.iter().find(|r| r.name == name && r.backend == backend && r.measured()).map(|r| r.value)
}

/// The smallest positive value of a row across backends.
fn fastest(rows: &[Row], name: &str) -> Option<f64> {
    rows.iter()
        .filter(|r| r.name == name && r.measured() && r.value > 0.0)
        .map(|r| r.value)
        .min_by(|a, b| a.total_cmp(b))
}

/// The table of the paper: benchmarks × backends, each cell cycles and the
/// ratio to the fastest backend of that row; skipped backends as notes.
pub fn to_matrix(report: &Report) -> String {
    let cols = &report.backends;
    let note = |b: &str| report.skipped.iter().position(|(s, _)| s == b);
    let mut o = format!("{:<10}", "cycles");
    for b in cols {
        let head = match note(b) {
            Some(i) => format!("{b} [{}]", i + 1),
            None => b.clone(),
        };
        let _ = write!(o, " {head:>20}");
    }
    o.push('\n');
    for name in ROWS {
        let _ = write!(o, "{name:<10}");
        let best = fastest(&report.rows, name);
        for b in cols {
            let cell = match (value(&report.rows, name, b), best) {
                (Some(v), Some(f)) => format!("{v:.0} (×{:.2})", v / f),
                (Some(v), None) => format!("{v:.0}"),
                (None, _) if note(b).is_some() => "skipped".to_owned(),
                (None, _) => "-".to_owned(),
            };
            let _ = write!(o, " {cell:>20}");
        }
        o.push('\n');
    }
    for (i, (b, why)) in report.skipped.iter().enumerate() {
        let _ = writeln!(o, "[{}] {b}: skipped: {why}", i + 1);
    }
    o
}

/// Bar colours per backend column (matplotlib's first six).
const COLOURS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// The colour of `backend`'s bars: by its column, so a skipped backend
/// does not shift the others' colours.
fn colour(report: &Report, backend: &str) -> RGBColor {
    COLOURS[report.backends.iter().position(|c| c == backend).unwrap_or(0) % COLOURS.len()]
}

/// The SVG `fill` attribute of `backend`'s bars (and its legend swatch), as
/// [`to_svg`] writes it: `fill="#1F77B4"`.
pub fn bar_fill(report: &Report, backend: &str) -> String {
    let RGBColor(r, g, b) = colour(report, backend);
    format!("fill=\"#{r:02X}{g:02X}{b:02X}\"")
}

/// The skip notes under the chart: `<backend>: skipped: <reason>`,
/// word-wrapped to about `width` characters.
fn skip_notes(report: &Report, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for (b, why) in &report.skipped {
        let mut line = format!("{b}: skipped:");
        for word in why.split_whitespace() {
            if line.chars().count() + 1 + word.chars().count() > width {
                lines.push(std::mem::replace(&mut line, format!("  {word}")));
            } else {
                line.push(' ');
                line.push_str(word);
            }
        }
        lines.push(line);
    }
    lines
}

fn svg_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> BenchError {
    fail(format!("drawing the SVG chart: {e}"))
}

/// A log-scale grouped bar chart drawn with plotters' SVG backend: one
/// group per benchmark, one bar per measured value in its backend's
/// colour, a legend of the measured backends, a gridline per power of ten,
/// and under the chart each skipped backend with its reason.
pub fn to_svg(report: &Report) -> Result<String, BenchError> {
    let measured: Vec<&String> =
        report.backends.iter().filter(|b| report.rows.iter().any(|r| &r.backend == *b && r.measured())).collect();
    // Log axis from the power of ten at or below the smallest value (at
    // least 1 cycle) to the one at or above the largest.
    let vals: Vec<f64> = report.rows.iter().filter(|r| r.measured()).map(|r| r.value.max(1.0)).collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min).log10().floor().clamp(0.0, 12.0);
    let hi = vals.iter().copied().fold(1.0, f64::max).log10().ceil().max(lo + 1.0);
    let (lo, hi) = if vals.is_empty() { (0, 1) } else { (lo as i32, hi as i32) };
    let (floor, ceil) = (10f64.powi(lo), 10f64.powi(hi));
    let notes = skip_notes(report, 130);
    let (w, chart_h) = (960u32, 480u32);
    let h = chart_h + 16 * notes.len() as u32 + 10;

    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(svg_err)?;
        let (top, bottom) = root.split_vertically(chart_h);
        let n = ROWS.len() as f64;
        let powers: Vec<f64> = (lo..=hi).map(|p| 10f64.powi(p)).collect();
        let mut chart = ChartBuilder::on(&top)
            .caption("nano: guest TSC cycles per operation, lower is better (log scale)", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(0f64..n, (floor..ceil).log_scale().with_key_points(powers))
            .map_err(svg_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .x_desc("benchmark")
            .y_desc("cycles per iteration")
            .y_label_formatter(&|y| {
                let p = y.log10().round() as i32;
                if p <= 6 {
                    format!("{}", 10u64.pow(p.max(0) as u32))
                } else {
                    format!("1e{p}")
                }
            })
            .draw()
            .map_err(svg_err)?;
        // One label under each group (plotters puts f64 axis labels at
        // round numbers, not at group centres).
        for (gi, name) in ROWS.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(gi as f64 + 0.5, floor));
            let style = TextStyle::from(("sans-serif", 15)).pos(Pos::new(HPos::Center, VPos::Top));
            root.draw(&Text::new(*name, (x, y + 8), style)).map_err(svg_err)?;
        }
        let bw = 0.8 / measured.len().max(1) as f64;
        for (bi, b) in measured.iter().enumerate() {
            let c = colour(report, b);
            let bars = ROWS.iter().enumerate().filter_map(|(gi, name)| {
                let v = value(&report.rows, name, b)?;
                let x = gi as f64 + 0.1 + bw * bi as f64;
                Some(Rectangle::new([(x, floor), (x + bw * 0.95, v.max(floor))], c.filled()))
            });
            chart
                .draw_series(bars)
                .map_err(svg_err)?
                .label(b.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], c.filled()));
        }
        if !measured.is_empty() {
            chart
                .configure_series_labels()
                .label_font(("sans-serif", 15))
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .draw()
                .map_err(svg_err)?;
        }
        let grey = RGBColor(0x55, 0x55, 0x55);
        for (i, line) in notes.iter().enumerate() {
            let style = TextStyle::from(("sans-serif", 15)).color(&grey);
            bottom.draw(&Text::new(line.as_str(), (84, 14 + 16 * i as i32), style)).map_err(svg_err)?;
        }
        root.present().map_err(svg_err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(scale: u64) -> String {
        let mut s = String::from("nano: TSC cycles per iteration, 10 iterations per row after a warm-up\r\n");
        for (i, r) in ROWS.iter().enumerate() {
            let _ = write!(s, "NANO {r} {} cycles\r\n", (i as u64 + 1) * scale);
        }
        s + "nano: done\n"
    }

    #[test]
    fn parses_every_row() {
        let rows = parse(&lines(10), "bt").unwrap();
        assert_eq!(rows.len(), ROWS.len());
        assert_eq!(rows[0], Row::new("nano", "syscall", "bt", 10.0, "cycles"));
        assert_eq!(rows[9].value, 100.0);
        assert!(parse("NANO syscall 5 cycles\n", "bt").is_err());
        assert!(parse(&lines(1).replace("NANO in 2 cycles", "NANO in x cycles"), "bt").is_err());
    }

    #[test]
    fn matrix_and_svg() {
        let mut rows = parse(&lines(10), "bt").unwrap();
        rows.extend(parse(&lines(1000), "qemu").unwrap());
        let mut report = Report::new("nano", &["bt".into(), "kvm".into(), "qemu".into()]);
        report.rows = rows;
        report.skip("kvm", &figure_names(), "no <kvm> here");
        assert_eq!(report.rows.iter().filter(|r| r.backend == "kvm" && r.value.is_nan()).count(), ROWS.len());
        let t = to_matrix(&report);
        assert!(t.contains("kvm [1]"), "{t}");
        assert!(t.contains("10 (×1.00)"), "{t}");
        assert!(t.contains("1000 (×100.00)"), "{t}");
        assert!(t.contains("[1] kvm: skipped: no <kvm> here"), "{t}");
        let svg = to_svg(&report).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        // The background, the legend's box and border, and per measured
        // backend one bar per value plus its legend swatch, in its colour.
        assert_eq!(svg.matches("<rect ").count(), 3 + 2 * (ROWS.len() + 1), "{svg}");
        for b in ["bt", "qemu"] {
            assert_eq!(svg.matches(&bar_fill(&report, b)).count(), ROWS.len() + 1, "{b}: {svg}");
        }
        assert!(!svg.contains(&bar_fill(&report, "kvm")), "a skipped backend has no bars");
        assert!(svg.contains("kvm: skipped: no &lt;kvm&gt; here"), "{svg}");
        for name in ROWS {
            assert!(svg.contains(&format!(">\n{name}\n</text>")), "no label {name}");
        }
    }
}
