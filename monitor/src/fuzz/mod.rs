//! `popek fuzz`: fuzz targets for everything that reads untrusted input,
//! and a stable-Rust driver for them (issue 15; docs/reliability.md).
//!
//! A target takes a byte buffer and, through [`arbitrary::Unstructured`],
//! turns it into a structured input: usually a *valid* one built in code
//! and then mutated ([`mutate`]), sometimes the raw bytes. The only
//! acceptable outcomes are success and a clean `Err` from the code under
//! test; a target returns `Err(String)` only for a violated property (a
//! round trip that loses data, a replay that disagrees with itself). A panic
//! is a failure, caught here with `catch_unwind`. Hangs, aborts, stack
//! overflows and huge allocations kill the process: [`supervise`] runs the
//! driver in a child and keeps the input that was running.
//!
//! The driver is a plain loop: a seeded SplitMix64 makes buffers of random
//! length and content, so a run is reproducible from `--seed`, and every
//! failure's buffer is written as a reproducer (`popek fuzz TARGET --repro
//! FILE` runs one again).

pub mod alloc;
pub mod cpl0;
pub mod cpl3;
pub mod cpl3_paged;
mod guest_storm;
pub mod loaders;
pub mod mutate;
pub mod platform;
pub mod supervise;
pub mod trace;
pub mod virtio;

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

/// A fuzz target: one input in, `Ok` or a violated property out.
pub trait Target {
    fn run(&mut self, input: &[u8]) -> Result<(), String>;
}

/// A target's name, what it checks, and how to build it.
pub struct TargetInfo {
    pub name: &'static str,
    pub about: &'static str,
    /// Longest buffer the driver makes for it.
    pub max_len: usize,
    /// Shortest: the translator targets make blocks while the bytes last,
    /// and each input costs VM start-ups, so an input is always long
    /// enough for every block slot (about 80 bytes a block).
    pub min_len: usize,
    pub make: fn() -> Result<Box<dyn Target>, String>,
}

/// Every target, in the order `popek fuzz all` runs them.
pub fn targets() -> &'static [TargetInfo] {
    &[
        TargetInfo {
            name: "bzimage",
            about: "Linux bzImage setup header and loader (loader/linux.rs), from a valid synthetic bzImage",
            max_len: 4096,
            min_len: 0,
            make: loaders::bzimage,
        },
        TargetInfo {
            name: "multiboot",
            about: "multiboot ELF and a.out-kludge loader with modules (loader/multiboot.rs)",
            max_len: 4096,
            min_len: 0,
            make: loaders::multiboot,
        },
        TargetInfo {
            name: "initramfs",
            about: "initramfs writer round trip and newc/gzip reader (loader/initramfs.rs)",
            max_len: 4096,
            min_len: 0,
            make: loaders::initramfs,
        },
        TargetInfo {
            name: "trace",
            about: "trace writer/reader round trip and the reader on damaged files (trace/format.rs), diff, info",
            max_len: 4096,
            min_len: 0,
            make: trace::trace,
        },
        TargetInfo {
            name: "replay",
            about: "`popek replay`'s input path without a kernel: trace, header → machine, switches, replayer fed its own trace",
            max_len: 4096,
            min_len: 0,
            make: trace::replay,
        },
        TargetInfo {
            name: "virtio",
            about: "virtio descriptor chains (blk, rng) on made-up guest memory, directly and through the legacy PCI registers",
            max_len: 4096,
            min_len: 0,
            make: virtio::virtio,
        },
        TargetInfo {
            name: "cpl3",
            about: "differential: random unprivileged blocks at CPL 3, user code direct vs translated, in a guest (slow: two VMs per input)",
            max_len: 8192,
            min_len: 4096,
            make: cpl3::cpl3,
        },
        TargetInfo {
            name: "cpl3-paged",
            about: "differential, paging on: cpl3's blocks in pairs sharing a linear slot, one per address space (MOV CR3 or INVLPG between runs), direct vs translated (slow: two VMs per input)",
            max_len: 8192,
            min_len: 4096,
            make: cpl3_paged::cpl3_paged,
        },
        TargetInfo {
            name: "cpl0",
            about: "metamorphic: random kernel blocks with sensitive instructions at CPL 0, translated, under seven switch sets that must agree (slow: seven VMs per input)",
            max_len: 8192,
            min_len: 4096,
            make: cpl0::cpl0,
        },
        TargetInfo {
            name: "guest-storm",
            about: "port/MMIO/interrupt storms from a guest on the pc machine: exits, in-place ports, MMIO emulation, delivery (slow: one VM per input)",
            max_len: 2048,
            min_len: 512,
            make: guest_storm::guest_storm,
        },
        TargetInfo {
            name: "platform",
            about: "port/MMIO storms on the pc and isa machines (PIC, PIT, CMOS, UART, APICs, PCI, virtio-pci), timers, interrupts",
            max_len: 8192,
            min_len: 0,
            make: platform::platform,
        },
    ]
}

/// A target that fails on purpose (not in `list` or `all`): the tests of
/// the driver and the supervisor use it. An input starting with 0xFF fails
/// as its second byte modulo 8 says: 1 panic, 2 abort, 3 hang, 4 a huge
/// allocation, 5 a stack overflow, 6 a violated property; anything else
/// passes.
pub static SELFTEST: TargetInfo = TargetInfo {
    name: "selftest",
    about: "fails on purpose (tests of the fuzz driver)",
    max_len: 16,
    min_len: 0,
    make: || Ok(Box::new(SelfTest)),
};

struct SelfTest;

impl Target for SelfTest {
    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        fn recurse(n: u64) -> u64 {
            let pad = std::hint::black_box([n; 64]);
            if n == u64::MAX {
                return 0;
            }
            pad[7].wrapping_add(recurse(std::hint::black_box(n + 1)))
        }
        if input.first() != Some(&0xFF) {
            return Ok(());
        }
        match input.get(1).map(|b| b % 8) {
            Some(1) => panic!("selftest panic"),
            Some(2) => std::process::abort(),
            Some(3) => loop {
                std::thread::sleep(Duration::from_secs(1));
            },
            Some(4) => {
                // black_box on the vector itself: an unused allocation may be elided.
                let v: Vec<u8> = std::hint::black_box(Vec::with_capacity(std::hint::black_box(3usize << 30)));
                drop(std::hint::black_box(v));
                Ok(())
            }
            Some(5) => {
                std::hint::black_box(recurse(0));
                Ok(())
            }
            Some(6) => Err("selftest property".into()),
            _ => Ok(()),
        }
    }
}

/// The target called `name` (`selftest` included).
pub fn target(name: &str) -> Result<&'static TargetInfo, FuzzError> {
    if name == SELFTEST.name {
        return Ok(&SELFTEST);
    }
    targets().iter().find(|t| t.name == name).ok_or_else(|| FuzzError::UnknownTarget(name.to_string()))
}

#[derive(Debug, Error)]
pub enum FuzzError {
    #[error("no fuzz target {0:?} (`popek fuzz list`)")]
    UnknownTarget(String),
    #[error("fuzz target {target} cannot start: {what}")]
    Setup { target: &'static str, what: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("fuzz worker: {0}")]
    Worker(String),
}

/// How long and from where to fuzz.
#[derive(Clone, Debug)]
pub struct Options {
    pub seconds: f64,
    pub seed: u64,
    /// Where reproducers go.
    pub out: PathBuf,
    /// Stop after this many inputs even if time remains.
    pub max_inputs: Option<u64>,
}

/// One run of one target.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub target: String,
    pub seed: u64,
    pub inputs: u64,
    pub failures: u64,
    pub seconds: f64,
    /// Distinct failures: (reproducer file, message).
    pub reproducers: Vec<(PathBuf, String)>,
    /// The slowest input, milliseconds.
    pub slowest_ms: f64,
    /// Peak heap bytes one input held (0 when the guard allocator is not installed).
    pub peak_heap: u64,
    /// How many inputs reached what ([`note`]).
    pub outcomes: Vec<(String, u64)>,
}

/// Exit status of a worker that could not even start (bad arguments, a
/// target that cannot be built): not a crash, nothing to reproduce.
pub const WORKER_SETUP_FAILED: i32 = 2;

/// Per-input heap growth above which an input is a failure.
pub const HEAP_LIMIT: usize = 256 << 20;
/// At most this many distinct failures are written per run.
const MAX_REPRODUCERS: usize = 64;

/// What one input did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A panic or a violated property, with its message.
    Failed(String),
}

/// SplitMix64: small, fast and good enough to make fuzz buffers.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A fuzz buffer: mostly short (the structure comes from the target),
    /// sometimes up to `max_len`.
    pub fn buffer(&mut self, max_len: usize, out: &mut Vec<u8>) {
        let cap = match self.below(10) {
            0..=3 => 64,
            4..=7 => 512,
            _ => max_len,
        };
        let len = self.below(cap.min(max_len) as u64 + 1) as usize;
        out.clear();
        while out.len() < len {
            let w = self.next_u64().to_le_bytes();
            let n = (len - out.len()).min(8);
            out.extend_from_slice(&w[..n]);
        }
    }
}

thread_local! {
    /// What the inputs reached (see [`note`]).
    static OUTCOMES: RefCell<std::collections::BTreeMap<String, u64>> = const { RefCell::new(std::collections::BTreeMap::new()) };
    /// The message of the last panic on this thread while capturing.
    static CAPTURED: RefCell<Option<String>> = const { RefCell::new(None) };
    static CAPTURING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Counts an outcome of an input ("loaded", "error NoBootFlag"): a run's
/// report lists them, which shows how deep the inputs get.
pub fn note(what: &str) {
    OUTCOMES.with(|o| *o.borrow_mut().entry(what.to_string()).or_default() += 1);
}

/// Counts an error by its variant name (`prefix` + the `Debug` form's first word).
pub fn note_err(prefix: &str, e: &impl std::fmt::Debug) {
    let d = format!("{e:?}");
    let name: String = d.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    note(&format!("{prefix} {name}"));
}

/// Installs (once) a panic hook that keeps panics of inputs quiet and
/// records their message; other panics go to the previous hook.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(|c| c.get()) {
                let msg = match info.location() {
                    Some(l) => format!("panic at {}:{}: {}", l.file(), l.line(), payload(info.payload())),
                    None => format!("panic: {}", payload(info.payload())),
                };
                CAPTURED.with(|c| *c.borrow_mut() = Some(msg));
            } else {
                previous(info);
            }
        }));
    });
}

fn payload(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Runs one input on `t`, catching a panic.
pub fn run_input(t: &mut dyn Target, input: &[u8]) -> Outcome {
    install_panic_hook();
    CAPTURING.with(|c| c.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.run(input)));
    CAPTURING.with(|c| c.set(false));
    match r {
        Ok(Ok(())) => Outcome::Ok,
        Ok(Err(property)) => Outcome::Failed(format!("property violated: {property}")),
        Err(_) => Outcome::Failed(CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_else(|| "panic".to_string())),
    }
}

/// Builds the target, mapping its error.
pub fn make(info: &TargetInfo) -> Result<Box<dyn Target>, FuzzError> {
    (info.make)().map_err(|what| FuzzError::Setup { target: info.name, what })
}

/// FNV-1a of the input: the reproducer's file name.
fn input_hash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3))
}

/// Writes a reproducer for `target` and returns its path.
pub fn write_reproducer(out: &Path, target: &str, kind: &str, input: &[u8]) -> Result<PathBuf, FuzzError> {
    std::fs::create_dir_all(out).map_err(|source| FuzzError::Io { path: out.to_owned(), source })?;
    let path = out.join(format!("{target}-{kind}-{:016x}.bin", input_hash(input)));
    std::fs::write(&path, input).map_err(|source| FuzzError::Io { path: path.clone(), source })?;
    Ok(path)
}

/// What a failure is "the same" as: a panic's location, or a property's
/// message up to the first quoted or bracketed detail or number (the
/// details differ from input to input, the bug does not).
fn signature(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("panic at ") {
        return rest.splitn(3, ':').take(2).collect::<Vec<_>>().join(":");
    }
    msg.chars().take_while(|c| !matches!(c, '"' | '[' | '(' | '{' | '0'..='9' | '\n')).collect()
}

/// A message cut to a printable length.
fn short(msg: &str) -> String {
    if msg.chars().count() <= 400 {
        msg.to_string()
    } else {
        msg.chars().take(400).collect::<String>() + "..."
    }
}

/// Something that wants to know what the driver is doing (the supervisor's
/// shared file): called before each input and every so often.
pub trait Progress {
    fn starting(&mut self, seq: u64, input: &[u8]);
    fn counters(&mut self, inputs: u64, failures: u64);
}

/// Fuzzes `info` in this process for `opts.seconds`.
pub fn fuzz(info: &TargetInfo, opts: &Options, mut progress: Option<&mut dyn Progress>) -> Result<Report, FuzzError> {
    let mut t = make(info)?;
    let mut rng = Rng::new(opts.seed);
    let mut buf = Vec::with_capacity(info.max_len);
    let mut report = Report { target: info.name.to_string(), seed: opts.seed, ..Report::default() };
    let mut seen = HashSet::new();
    let guard = alloc::installed();
    if guard {
        alloc::arm();
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(opts.seconds.max(0.0));
    let mut slowest = Duration::ZERO;
    OUTCOMES.with(|o| o.borrow_mut().clear());
    loop {
        // The clock is read every input: inputs take microseconds to
        // milliseconds, and a deadline overshoot by a slow one is fine.
        let now = Instant::now();
        if now >= deadline || opts.max_inputs.is_some_and(|m| report.inputs >= m) {
            break;
        }
        rng.buffer(info.max_len, &mut buf);
        // Topped up from the same generator: a run stays a function of its seed.
        while buf.len() < info.min_len {
            buf.extend_from_slice(&rng.next_u64().to_le_bytes());
        }
        if let Some(p) = progress.as_deref_mut() {
            p.starting(report.inputs, &buf);
        }
        let base = if guard { alloc::reset_peak() } else { 0 };
        let outcome = run_input(t.as_mut(), &buf);
        let took = now.elapsed();
        slowest = slowest.max(took);
        let grew = if guard { alloc::peak().saturating_sub(base) } else { 0 };
        report.peak_heap = report.peak_heap.max(grew as u64);
        report.inputs += 1;
        let failure = match outcome {
            Outcome::Failed(msg) => Some(msg),
            Outcome::Ok if grew > HEAP_LIMIT => Some(format!("input held {} MiB of heap at its peak", grew >> 20)),
            Outcome::Ok => None,
        };
        if let Some(msg) = failure {
            report.failures += 1;
            // A panic may leave the target half-updated: start afresh.
            t = make(info)?;
            let sig = signature(&msg);
            if seen.len() < MAX_REPRODUCERS && seen.insert(sig) {
                let path = write_reproducer(&opts.out, info.name, "fail", &buf)?;
                let msg = short(&msg);
                eprintln!("popek fuzz: {}: FAILED: {msg}\npopek fuzz:   reproducer: {}", info.name, path.display());
                report.reproducers.push((path, msg));
            }
        }
        if report.inputs.is_multiple_of(256) {
            if let Some(p) = progress.as_deref_mut() {
                p.counters(report.inputs, report.failures);
            }
        }
    }
    if guard {
        alloc::disarm();
    }
    if let Some(p) = progress {
        p.counters(report.inputs, report.failures);
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.slowest_ms = slowest.as_secs_f64() * 1e3;
    report.outcomes = OUTCOMES.with(|o| std::mem::take(&mut *o.borrow_mut())).into_iter().collect();
    Ok(report)
}

/// Runs one reproducer file on `info`.
pub fn reproduce(info: &TargetInfo, file: &Path) -> Result<Outcome, FuzzError> {
    let input = std::fs::read(file).map_err(|source| FuzzError::Io { path: file.to_owned(), source })?;
    let mut t = make(info)?;
    if alloc::installed() {
        alloc::arm();
    }
    let base = alloc::reset_peak();
    let outcome = run_input(t.as_mut(), &input);
    let grew = alloc::peak().saturating_sub(base);
    alloc::disarm();
    Ok(match outcome {
        Outcome::Ok if grew > HEAP_LIMIT => {
            Outcome::Failed(format!("input held {} MiB of heap at its peak", grew >> 20))
        }
        o => o,
    })
}

/// The `--json` rows: `{target, seed, inputs, failures, seconds}` per report.
pub fn to_json(reports: &[Report]) -> String {
    let rows: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            serde_json::json!({
                "target": r.target,
                "seed": r.seed,
                "inputs": r.inputs,
                "failures": r.failures,
                "seconds": (r.seconds * 1000.0).round() / 1000.0,
            })
        })
        .collect();
    serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".to_string()) + "\n"
}

/// Runs every target for a few inputs with a fixed seed (used by the unit
/// tests of each target module).
#[cfg(test)]
pub(crate) fn smoke(name: &str, inputs: u64) -> Report {
    let dir = std::env::temp_dir().join(format!("popek-fuzz-test-{}-{name}", std::process::id()));
    let opts = Options { seconds: 60.0, seed: 1, out: dir, max_inputs: Some(inputs) };
    let r = fuzz(target(name).unwrap(), &opts, None).unwrap();
    assert_eq!(r.failures, 0, "{name}: {:?}", r.reproducers);
    assert_eq!(r.inputs, inputs);
    r
}
