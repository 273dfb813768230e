//! `popek run`: build a machine from the command line (guest RAM, an image,
//! the platform, a backend), run it, report how it ended.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use thiserror::Error;

use crate::backend::bt::{BtBackend, BtConfig};
use crate::backend::{Backend, BackendError};
use crate::cpu::policy::CpuPolicy;
use crate::cpu::Cpu;
use crate::devices::platform::Machine;
use crate::devices::{Clock, HostClock, HostWallClock, Platform, PlatformConfig};
use crate::loader::{linux, multiboot, BootState};
use crate::memory::{GuestMemory, MemoryError};
pub use crate::trace::header::parse_size;
use crate::trace::header::{self, HeaderError, MachineSpec};
use crate::vm::{RunOutcome, Vm, VmError};

/// Which CPU runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Bt,
    Kvm,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bt" => Ok(BackendKind::Bt),
            "kvm" => Ok(BackendKind::Kvm),
            o => Err(format!("unknown backend {o:?} (bt or kvm)")),
        }
    }
}

/// Everything `popek run` takes.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// Guest RAM in bytes.
    pub mem: u64,
    pub backend: BackendKind,
    pub bt: BtConfig,
    /// Forward stdin to the guest console (raw mode on a terminal).
    pub interactive: bool,
    /// A built-in guest by name (`popek guest list`) instead of `kernel`.
    pub guest: Option<String>,
    /// Jail the process (docs/security.md) once the machine is built and
    /// before the first guest instruction. The `popek` binary sets it
    /// unless `--no-jail`; a library caller (tests) chooses.
    pub jail: bool,
    /// The PC (`pc`: APICs, PCI; `isa`: what traces without the option ran on).
    pub machine: Machine,
    /// The `pc` CPU without the TSC-deadline timer, as traces recorded
    /// before it had one saw it ([`MachineSpec::legacy_cpu`]).
    pub legacy_cpu: bool,
    /// The i8042 of traces recorded before [`crate::trace::format::MODEL_REVISION`]
    /// 1 ([`MachineSpec::legacy_keyboard`]).
    pub legacy_keyboard: bool,
    /// Let a bzImage's own decompressor run in the guest instead of booting
    /// the kernel the host decompressed (`--guest-decompress`; replays of
    /// traces recorded before model revision 2: [`MachineSpec::guest_decompress`]).
    pub guest_decompress: bool,
    /// virtio-blk disks on raw images (`--disk FILE[,ro]`).
    pub disks: Vec<crate::devices::virtio::blk::DiskSpec>,
    /// A virtio-rng device (`--rng`).
    pub rng: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            kernel: None,
            initrd: None,
            append: None,
            mem: 256 << 20,
            backend: BackendKind::Bt,
            bt: BtConfig::default(),
            interactive: false,
            guest: None,
            jail: false,
            machine: Machine::default(),
            legacy_cpu: false,
            legacy_keyboard: false,
            guest_decompress: false,
            disks: Vec::new(),
            rng: false,
        }
    }
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0} is neither a Linux bzImage nor a multiboot kernel")]
    UnknownImage(PathBuf),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot load the Linux kernel: {0}")]
    Linux(#[from] linux::LinuxError),
    #[error("cannot load the multiboot kernel: {0}")]
    Multiboot(#[from] multiboot::MultibootError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot set up the platform devices: {0}")]
    Platform(#[from] crate::devices::PlatformError),
    #[error("no built-in guest {0:?} (see `popek guest list`)")]
    NoSuchGuest(String),
    #[error("the deterministic mode needs the bt backend (kvm cannot count guest instructions)")]
    DeterministicNeedsBt,
    #[error(transparent)]
    Deterministic(#[from] crate::deterministic::DetError),
    #[error("{0}")]
    Trace(String),
    /// A replay left the recorded execution.
    #[error("{report}")]
    Diverged { at: u64, last_good: u64, report: String },
    #[error("cannot jail the monitor: {0} (--no-jail runs without it, for debugging only)")]
    Jail(#[from] crate::jail::JailError),
    #[error(transparent)]
    MpTable(#[from] crate::devices::mptable::MpTableError),
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::blk::BlockError),
    #[error("the deterministic mode does not record virtio device input: no --disk or --rng with it")]
    DeterministicDevices,
}

impl From<HeaderError> for RunError {
    fn from(e: HeaderError) -> RunError {
        match e {
            HeaderError::Read { path, source } => RunError::Read { path, source },
            HeaderError::NoSuchGuest(name) => RunError::NoSuchGuest(name),
            e @ (HeaderError::Malformed(_) | HeaderError::NotAFile(_)) => RunError::Trace(e.to_string()),
        }
    }
}

impl RunOptions {
    /// The machine part of the options (what a trace header records).
    pub fn machine(&self) -> MachineSpec {
        MachineSpec {
            kernel: self.kernel.clone(),
            guest: self.guest.clone(),
            initrd: self.initrd.clone(),
            append: self.append.clone(),
            mem: self.mem,
            machine: self.machine,
            legacy_cpu: self.legacy_cpu,
            legacy_keyboard: self.legacy_keyboard,
            guest_decompress: self.guest_decompress,
        }
    }

    /// Options that build machine `m`, the rest default.
    pub fn for_machine(m: MachineSpec) -> RunOptions {
        RunOptions {
            kernel: m.kernel,
            guest: m.guest,
            initrd: m.initrd,
            append: m.append,
            mem: m.mem,
            machine: m.machine,
            legacy_cpu: m.legacy_cpu,
            legacy_keyboard: m.legacy_keyboard,
            guest_decompress: m.guest_decompress,
            ..RunOptions::default()
        }
    }
}

impl RunError {
    /// The process exit status `popek` reports for this error: the jail's
    /// own code when guest code reached 64-bit mode, else 1.
    pub fn exit_code(&self) -> u8 {
        let escape = matches!(
            self,
            RunError::Backend(BackendError::GuestEscape(_))
                | RunError::Vm(VmError::Stopped { error: BackendError::GuestEscape(_), .. })
                | RunError::Vm(VmError::Backend(BackendError::GuestEscape(_)))
                | RunError::Deterministic(crate::deterministic::DetError::Backend(BackendError::GuestEscape(_)))
        );
        if escape {
            crate::jail::EXIT_GUEST_ESCAPE
        } else {
            1
        }
    }
}

/// The result of a run: how it ended and every counter.
pub struct RunReport {
    pub outcome: RunOutcome,
    pub stats: Vec<(String, u64)>,
    /// Things worth telling the user (e.g. an added `reservetop=`).
    pub notes: Vec<String>,
    pub wall: std::time::Duration,
}

fn read(path: &Path) -> Result<Vec<u8>, RunError> {
    std::fs::read(path).map_err(|source| RunError::Read { path: path.to_owned(), source })
}

/// The kernel inside bzImage `image`, decompressed by the host (cached
/// across runs: docs/loaders.md), or `None` when the guest must run the
/// image's decompressor (an old boot protocol, another compression, a
/// damaged payload: the guest's decompressor then says what it thinks).
fn host_decompressed(image: &[u8], notes: &mut Vec<String>) -> Option<Vec<u8>> {
    use crate::loader::vmlinux::{self, Cache, Source};
    let header = linux::parse(image).ok()?;
    let got = match Cache::default_location() {
        Some(cache) => cache.vmlinux(image, &header),
        None => vmlinux::decompress(image, &header).map(|v| (v, Source::Decompressed)),
    };
    match got {
        Ok((v, source)) => {
            tracing::debug!(?source, bytes = v.len(), "kernel decompressed by the host");
            Some(v)
        }
        Err(e) => {
            notes.push(format!("the kernel's own decompressor runs in the guest: {e}"));
            None
        }
    }
}

/// Loads the image and returns the initial CPU state.
fn load_image(opts: &RunOptions, mem: &GuestMemory, notes: &mut Vec<String>) -> Result<Cpu, RunError> {
    let Some(kernel) = &opts.kernel else {
        let name = opts.guest.as_deref().unwrap_or("demo");
        let guest = crate::guests::by_name(name).ok_or_else(|| RunError::NoSuchGuest(name.to_string()))?;
        mem.write(u64::from(guest.load_addr), &guest.image)?;
        let mut cpu = Cpu::flat_protected(0x08, 0x10);
        cpu.eip = guest.entry;
        cpu.gpr[4] = guest.load_addr;
        if opts.guest.is_none() {
            notes.push(format!("no --kernel: running the built-in `{}` guest ({})", guest.name, guest.description));
        }
        return Ok(cpu);
    };
    let image = read(kernel)?;
    let append = opts.append.clone().unwrap_or_default();
    // The setup header's magic is enough to pick the Linux loader, which then
    // says precisely what is wrong with a damaged image (truncated, too old).
    let looks_linux = image.get(0x202..0x206) == Some(b"HdrS".as_slice());
    let state: BootState = if looks_linux || linux::is_bzimage(&image) {
        let initrd = opts.initrd.as_deref().map(read).transpose()?;
        let vmlinux = if opts.guest_decompress { None } else { host_decompressed(&image, notes) };
        let boot = match &vmlinux {
            Some(v) => linux::load_decompressed(mem, &image, v, &append, initrd.as_deref())?,
            None => linux::load(mem, &image, &append, initrd.as_deref())?,
        };
        if boot.reservetop_added {
            notes.push(format!(
                "added `{}` to the kernel command line (keeps the fixmap out of the VMM area)",
                linux::reservetop_arg()
            ));
        }
        notes.push(format!("kernel command line: {}", boot.cmdline));
        boot.state
    } else if multiboot::is_multiboot(&image) {
        let module = opts.initrd.as_deref().map(read).transpose()?;
        let modules: Vec<multiboot::Module<'_>> =
            module.as_deref().map(|data| multiboot::Module { data, cmdline: "" }).into_iter().collect();
        multiboot::load(mem, &image, &append, &modules)?
    } else {
        return Err(RunError::UnknownImage(kernel.clone()));
    };
    Ok(state.to_cpu())
}

/// Virtual time's TSC frequency in the deterministic mode (one tick per ns).
pub const DETERMINISTIC_TSC_HZ: u64 = 1_000_000_000;

/// The CPU of `machine`; the TSC runs at `tsc_hz` (the host's, or 1 GHz of
/// virtual time in the deterministic mode). With user isolation the guest
/// is told it is not susceptible to Meltdown (docs/security.md).
pub fn cpu_policy(machine: Machine, tsc_hz: u64, user_isolation: bool, legacy_cpu: bool) -> CpuPolicy {
    let p = match machine {
        Machine::Isa => CpuPolicy::default(),
        Machine::Pc if legacy_cpu => CpuPolicy::pc(tsc_hz).without_tsc_deadline(),
        Machine::Pc => CpuPolicy::pc(tsc_hz),
    };
    if user_isolation {
        p.with_rdcl_no()
    } else {
        p
    }
}

/// The platform of `opts.machine` for a CPU of `policy`, with its virtio
/// devices and its firmware tables written into `mem` (the MP table of the
/// `pc` machine).
fn platform(
    opts: &RunOptions,
    policy: &CpuPolicy,
    mem: &Arc<GuestMemory>,
    config: PlatformConfig,
) -> Result<Platform, RunError> {
    use crate::devices::virtio::{blk::Block, rng::Rng};
    let tsc_hz = policy.tsc_hz.unwrap_or(1);
    let mut platform = Platform::with_machine(config, opts.machine, policy.crystal_hz().unwrap_or(1), tsc_hz)?;
    if opts.legacy_keyboard {
        platform.use_legacy_keyboard_irq();
    }
    for (i, d) in opts.disks.iter().enumerate() {
        platform.add_virtio(Box::new(Block::open(d, i)?), mem)?;
    }
    if opts.rng {
        platform.add_virtio(Box::new(Rng::default()), mem)?;
    }
    if opts.machine == Machine::Pc {
        let mp = crate::devices::mptable::MpConfig {
            cpu_signature: policy.signature,
            cpu_features: policy.edx1,
            pci: Some(platform.pci_irqs()),
        };
        crate::devices::mptable::write(mem, &mp)?;
    }
    Ok(platform)
}

fn backend(
    opts: &RunOptions,
    mem: &Arc<GuestMemory>,
    cpu: Cpu,
    deterministic: bool,
    policy: CpuPolicy,
) -> Result<Box<dyn Backend>, RunError> {
    Ok(match opts.backend {
        BackendKind::Bt => {
            let bt = BtConfig { deterministic: deterministic || opts.bt.deterministic, cpu: policy, ..opts.bt };
            Box::new(BtBackend::new(mem.clone(), cpu, bt)?)
        }
        BackendKind::Kvm => Box::new(crate::backend::kvm::KvmBackend::new(mem, &cpu)?),
    })
}

/// How a run's machine keeps time: the host's clocks, or the deterministic
/// mode's manual clock (driven by the instruction count) and recorded start.
struct Timing {
    clock: Arc<dyn Clock>,
    wall_clock: Arc<dyn crate::devices::clock::WallClock>,
    deterministic: bool,
}

/// The one machine builder under both run paths: guest RAM with the image
/// loaded, the platform devices on `timing`'s clocks, and the CPU backend.
fn build_machine(
    opts: &RunOptions,
    console: Box<dyn std::io::Write + Send>,
    timing: Timing,
    notes: &mut Vec<String>,
) -> Result<Vm, RunError> {
    let mem = Arc::new(GuestMemory::new(opts.mem)?);
    let cpu = load_image(opts, &mem, notes)?;
    for n in notes.iter() {
        tracing::info!("{n}");
    }
    let deterministic = timing.deterministic || opts.bt.deterministic;
    let tsc_hz = if deterministic { DETERMINISTIC_TSC_HZ } else { crate::devices::clock::host_tsc_hz() };
    let policy =
        cpu_policy(opts.machine, tsc_hz, opts.bt.user_isolation && opts.backend == BackendKind::Bt, opts.legacy_cpu);
    let config =
        PlatformConfig { ram_size: mem.size(), console, clock: timing.clock.clone(), wall_clock: timing.wall_clock };
    let platform = platform(opts, &policy, &mem, config)?;
    let backend = backend(opts, &mem, cpu, timing.deterministic, policy)?;
    Ok(Vm::new(mem, platform, backend, timing.clock))
}

/// Closes the jail on this process (the machine is built, every file is
/// open) and says how it went.
fn jail(kind: BackendKind) -> Result<String, RunError> {
    let profile = match kind {
        BackendKind::Bt => crate::jail::Profile::Bt,
        BackendKind::Kvm => crate::jail::Profile::Kvm,
    };
    let r = crate::jail::enter(profile)?;
    Ok(match r.namespaces {
        Ok(()) => {
            format!("jailed: uid {}, empty root, no network, {}-instruction seccomp allow-list", r.uid, r.filter_len)
        }
        Err(e) => {
            format!("jailed: uid {}, {}-instruction seccomp allow-list (no namespaces: {e})", r.uid, r.filter_len)
        }
    })
}

/// Builds the machine and runs it to the end.
pub fn run(opts: &RunOptions, console: Box<dyn std::io::Write + Send>) -> Result<RunReport, RunError> {
    let t = std::time::Instant::now();
    let mut notes = Vec::new();
    let timing =
        Timing { clock: Arc::new(HostClock::new()), wall_clock: Arc::new(HostWallClock), deterministic: false };
    let mut vm = build_machine(opts, console, timing, &mut notes)?;
    if opts.jail {
        notes.push(jail(opts.backend)?);
    }
    let quit = Arc::new(AtomicBool::new(false));
    let raw = if opts.interactive { Some(crate::console::RawMode::enter()) } else { None };
    if opts.interactive {
        let terminal = raw.as_ref().is_some_and(|r| r.is_raw());
        let rx = crate::console::spawn_input(vm.backend.kicker(), quit.clone(), terminal);
        vm.set_input(rx);
        vm.set_quit(quit);
    }
    let outcome = vm.run();
    drop(raw);
    let outcome = outcome?;
    Ok(RunReport { outcome, stats: vm.stats(), notes, wall: t.elapsed() })
}

/// What a deterministic run does besides running.
pub enum DetSession<'a> {
    /// Only the deterministic mode (`--deterministic`).
    Plain,
    /// `--record FILE`; console input from `input` (else stdin when the
    /// run is interactive).
    Record { path: PathBuf, input: Option<std::sync::mpsc::Receiver<Vec<u8>>> },
    /// `popek replay`: the trace.
    Replay(Box<crate::trace::format::Trace>),
    /// A caller's session (the localizer), with the recorded header.
    Custom { header: Box<crate::trace::format::Header>, session: &'a mut dyn crate::deterministic::Session },
}

/// The result of a deterministic run.
pub struct DetReport {
    pub outcome: crate::deterministic::DetOutcome,
    /// Guest instructions retired.
    pub count: u64,
    pub console: crate::deterministic::ConsoleLog,
    pub stats: Vec<(String, u64)>,
    pub notes: Vec<String>,
    pub wall: std::time::Duration,
    /// Replays: what was checked.
    pub verified: Option<crate::trace::replay::Verified>,
    /// Recordings: the trace's size on disk.
    pub trace_bytes: Option<u64>,
}

/// Rebuilds run options from a trace header's command line.
pub fn options_from_header(h: &crate::trace::format::Header) -> Result<RunOptions, RunError> {
    Ok(RunOptions::for_machine(header::machine_from_header(h)?))
}

/// Builds the machine in the deterministic mode and runs it: plain, while
/// recording a trace, or replaying one.
pub fn run_deterministic(
    opts: &RunOptions,
    det: &crate::deterministic::DetOptions,
    session: DetSession,
    engine_switches: &str,
    console: Box<dyn std::io::Write + Send>,
) -> Result<DetReport, RunError> {
    use crate::deterministic::{ConsoleTap, Session};
    use crate::devices::clock::ManualClock;
    use crate::trace::format::Header;
    if opts.backend != BackendKind::Bt {
        return Err(RunError::DeterministicNeedsBt);
    }
    if !opts.disks.is_empty() || opts.rng {
        return Err(RunError::DeterministicDevices);
    }
    let t = std::time::Instant::now();
    let (header, det) = match &session {
        DetSession::Replay(trace) => {
            let h = trace.header.clone();
            let d = crate::deterministic::DetOptions {
                checkpoint_every: h.checkpoint_every,
                memory_every: h.memory_every,
                input_quantum: h.input_quantum,
                ..*det
            };
            (h, d)
        }
        DetSession::Custom { header, .. } => ((**header).clone(), *det),
        _ => {
            let start = crate::devices::HostWallClock;
            let h = Header {
                popek_version: env!("CARGO_PKG_VERSION").to_string(),
                command_line: header::command_line(&opts.machine()),
                mem_bytes: opts.mem,
                images: header::image_digests(&opts.machine())?,
                cpuid: header::cpuid_entries(
                    opts.machine,
                    DETERMINISTIC_TSC_HZ,
                    opts.bt.user_isolation,
                    opts.legacy_cpu,
                ),
                start_unix_ns: crate::devices::clock::WallClock::now_unix_ns(&start),
                checkpoint_every: det.checkpoint_every,
                memory_every: det.memory_every,
                input_quantum: det.input_quantum,
                engine: engine_switches.to_string(),
                host_cpu: crate::trace::format::host_cpu_vendor(),
                model_revision: if opts.legacy_keyboard {
                    0
                } else if opts.guest_decompress {
                    1
                } else {
                    crate::trace::format::MODEL_REVISION
                },
            };
            (h, *det)
        }
    };
    if let DetSession::Replay(_) = &session {
        let now = header::image_digests(&opts.machine())?;
        for (want, have) in header.images.iter().zip(&now) {
            if want.sha256 != have.sha256 || want.len != have.len {
                return Err(RunError::Trace(format!(
                    "the {} image {} is not the one recorded ({} bytes, SHA-256 {}); give the recorded one",
                    have.role,
                    have.name,
                    want.len,
                    hex(&want.sha256)
                )));
            }
        }
    }
    let mut notes = Vec::new();
    let clock = ManualClock::new(0);
    let (tap, log) = ConsoleTap::new(console);
    let timing = Timing {
        clock: Arc::new(clock.clone()),
        wall_clock: Arc::new(ManualClock::new(header.start_unix_ns)),
        deterministic: true,
    };
    let mut vm = build_machine(opts, Box::new(tap), timing, &mut notes)?;
    let quit = Arc::new(AtomicBool::new(false));
    let wants_stdin = matches!(session, DetSession::Plain | DetSession::Record { input: None, .. });
    let mut recorder = crate::trace::record::Recorder::without_trace(None);
    let mut replayer: Option<crate::trace::replay::Replayer> = None;
    let recording = matches!(session, DetSession::Record { .. });
    // Files first (the trace), then the jail, then threads (console input).
    let mut custom = None;
    match session {
        DetSession::Plain => {}
        DetSession::Record { path, input: given } => {
            recorder = crate::trace::record::Recorder::create(&path, &header, given)?;
        }
        DetSession::Replay(trace) => replayer = Some(crate::trace::replay::Replayer::new(&trace)),
        DetSession::Custom { session, .. } => custom = Some(session),
    }
    if opts.jail {
        notes.push(jail(opts.backend)?);
    }
    let raw = if opts.interactive && wants_stdin { Some(crate::console::RawMode::enter()) } else { None };
    if let Some(r) = &raw {
        // Only the recorder (plain, or recording without given input) reads stdin.
        recorder.set_input(Some(crate::console::spawn_input(vm.backend.kicker(), quit.clone(), r.is_raw())));
        vm.set_quit(quit);
    }
    let s: &mut dyn Session = match (custom, replayer.as_mut()) {
        (Some(c), _) => c,
        (None, Some(r)) => r,
        (None, None) => &mut recorder,
    };
    let result = vm.run_deterministic(&clock, &log, s, &det);
    drop(raw);
    let count = vm.backend.instruction_count().unwrap_or(0);
    let outcome = match result {
        Ok(o) => o,
        Err(crate::deterministic::DetError::Diverged { at, last_good, report }) => {
            let state = vm.backend.cpu_state();
            let around = vm.disassemble_at(state.eip, 6);
            let here = crate::trace::format::host_cpu_vendor();
            let vendor = if !header.host_cpu.is_empty() && header.host_cpu != here {
                format!(
                    "\nnote: recorded on a {} CPU, replayed on a {here} one: translated code runs natively, and \
                     flags the architecture leaves undefined differ between vendors",
                    header.host_cpu
                )
            } else {
                String::new()
            };
            let report = format!("{report}{vendor}\nguest state now:\n{}\nguest code at EIP:\n{around}", state.dump());
            return Err(RunError::Diverged { at, last_good, report });
        }
        Err(e) => return Err(e.into()),
    };
    let verified = replayer.map(|r| r.verified);
    let trace_bytes = recording.then_some(recorder.trace_bytes);
    let console = log.lock().map(|l| l.clone()).unwrap_or_default();
    Ok(DetReport { outcome, count, console, stats: vm.stats(), notes, wall: t.elapsed(), verified, trace_bytes })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
