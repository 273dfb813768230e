//! `popek`: the command-line front end.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use monitor::backend::bt::BtConfig;
use monitor::run::{parse_size, BackendKind, RunOptions};

/// The fuzz driver's allocation guard: forwards to the system allocator and
/// costs one relaxed load per allocation unless `popek fuzz` arms it.
#[global_allocator]
static ALLOC: monitor::fuzz::alloc::GuardAlloc = monitor::fuzz::alloc::GuardAlloc;

#[derive(Parser)]
#[command(
    name = "popek",
    version,
    about = "A software x86 VMM: binary translation and shadow paging for 32-bit guests"
)]
struct Cli {
    /// More diagnostics (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest: a Linux bzImage or multiboot kernel, or a built-in guest.
    Run(RunArgs),
    /// Re-run a recorded trace and verify every checkpoint (exit 1 at the
    /// first divergence, with a report).
    Replay {
        /// The trace (`popek run --record FILE`).
        trace: PathBuf,
        /// Stop at this instruction count and dump the guest state.
        #[arg(long)]
        until: Option<u64>,
        /// The kernel image, if it is no longer where the recording found it
        /// (its SHA-256 must match the recorded one).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// The initrd, likewise.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Translator switches on top of the recorded ones (see `run --engine`).
        #[arg(long, value_delimiter = ',')]
        engine: Vec<String>,
        /// On a divergence, name the first diverging instruction by running
        /// the recorded switches (or these) beside the replay's
        /// (`--engine nochain,noinline` is a conservative reference).
        #[arg(long, value_delimiter = ',')]
        reference_engine: Option<Vec<String>>,
        /// Do not echo the guest console.
        #[arg(long)]
        quiet: bool,
        /// Replay without the jail (debugging only; see `run --no-jail`).
        #[arg(long)]
        no_jail: bool,
    },
    /// Look into traces.
    Trace {
        #[command(subcommand)]
        action: TraceAction,
    },
    /// Build a gzip'd cpio initramfs (no external cpio needed).
    Initramfs {
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        /// A directory whose contents become the archive root.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Files to add, as ARCHIVE_PATH=HOST_PATH (repeatable).
        #[arg(long = "file")]
        files: Vec<String>,
        /// A host file whose text becomes /init.
        #[arg(long)]
        init: Option<PathBuf>,
        /// A static busybox: laid out as /bin/busybox with applet links,
        /// /proc, /sys, /dev, /tmp (and a default /init unless --init).
        #[arg(long)]
        busybox: Option<PathBuf>,
    },
    /// The built-in guests: list them, or export one as a multiboot ELF so
    /// other VMMs (QEMU's `-kernel`) run the very same bytes.
    Guest {
        #[command(subcommand)]
        action: GuestAction,
    },
    /// Fuzz a parser or the machine model (docs/reliability.md): TARGET is
    /// one of `popek fuzz list`, or `all`. Prints inputs tried, failures and
    /// the path of each failure's reproducer; exit 1 if anything failed.
    Fuzz(FuzzArgs),
    /// Measure Popek: one row per figure, optionally as JSON.
    Bench {
        /// Which suite.
        #[arg(long, default_value = "host")]
        suite: String,
        /// Also write the rows as JSON to FILE.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Shorter runs (less precise).
        #[arg(long)]
        quick: bool,
        /// Backends to compare, comma-separated (suites nano, linux,
        /// workloads: bt, kvm, qemu, default all three; distro: bt, qemu).
        /// The linux and workloads suites always run native.
        #[arg(long, value_delimiter = ',')]
        backends: Option<Vec<String>>,
        /// Also draw the results as a log-scale SVG bar chart (suite nano).
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Run the suites' VMs without the jail (debugging only).
        #[arg(long)]
        no_jail: bool,
        /// Internal: be the jailed worker of a suite (rows on stdout).
        #[arg(long, hide = true)]
        worker: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel image (bzImage or multiboot ELF); the built-in demo guest without it.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// A built-in guest instead of --kernel (`popek guest list`).
    #[arg(long, conflicts_with = "kernel")]
    guest: Option<String>,
    /// Initial ramdisk (Linux) or first module (multiboot).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    append: Option<String>,
    /// Guest RAM (e.g. 256M).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// CPU backend: bt (binary translation) or kvm.
    #[arg(long, default_value = "bt")]
    backend: BackendKind,
    /// The PC: pc (local APIC, I/O APIC and MP table, PCI host bridge,
    /// CPUID with the TSC frequency) or isa (8259 PIC only, the first
    /// machine; traces recorded without this option replay on it).
    #[arg(long, default_value = "pc")]
    machine: monitor::devices::platform::Machine,
    /// A virtio-blk disk on a raw image, read-write or `,ro` (pc machine;
    /// repeatable: /dev/vda, /dev/vdb, ...).
    #[arg(long = "disk", value_name = "FILE[,ro]")]
    disks: Vec<monitor::devices::virtio::blk::DiskSpec>,
    /// A virtio-rng device (pc machine).
    #[arg(long)]
    rng: bool,
    /// Run a bzImage's own decompressor in the guest (with KASLR) instead
    /// of booting the kernel the host decompressed and cached.
    #[arg(long)]
    guest_decompress: bool,
    /// Print exits, translation and shadow-MMU counters and where the time went.
    #[arg(long)]
    stats: bool,
    /// Log every translated block beside its translation (needs -v).
    #[arg(long)]
    log_translations: bool,
    /// Do not forward stdin to the guest console.
    #[arg(long)]
    no_input: bool,
    /// Translator switches for bug hunting, comma-separated: nochain, nopoll,
    /// noinline / inline (PUSHF/POPF as callouts or inline sequences), and
    /// the test-only corrupt=MNEMONIC.
    #[arg(long, value_delimiter = ',')]
    engine: Vec<String>,
    /// How guest user code runs: directly, from the translation cache
    /// (system calls and exceptions without host traps), or chosen per
    /// address space from measurements (bt backend; the deterministic mode
    /// always translates).
    #[arg(long, default_value = "adaptive")]
    user_exec: monitor::backend::bt::user_exec::UserExec,
    /// Deterministic mode: all code translated, instructions counted,
    /// virtual time (implied by --record).
    #[arg(long)]
    deterministic: bool,
    /// Record a trace of the run to FILE (docs/record-replay.md).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Deterministic mode: instructions between register checkpoints.
    #[arg(long, default_value_t = monitor::deterministic::DetOptions::default().checkpoint_every)]
    checkpoint_every: u64,
    /// Deterministic mode: instructions between memory digests.
    #[arg(long, default_value_t = monitor::deterministic::DetOptions::default().memory_every)]
    memory_every: u64,
    /// Deterministic mode: stop at this instruction count and dump the state.
    #[arg(long)]
    until: Option<u64>,
    /// Run without the jail (no seccomp allow-list, namespaces or dropped
    /// privileges: a guest that reaches 64-bit mode can use the host). For
    /// debugging only.
    #[arg(long)]
    no_jail: bool,
}

#[derive(clap::Args)]
struct FuzzArgs {
    /// A target, `all`, or `list`.
    target: String,
    /// How long to fuzz each target.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seed of the input generator (default: from the clock, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Also write rows {target, seed, inputs, failures, seconds} as JSON to FILE.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where reproducers are written.
    #[arg(long, default_value = "popek-fuzz-repro")]
    out: PathBuf,
    /// Run this reproducer (or every file in this directory) once on TARGET
    /// instead of fuzzing.
    #[arg(long)]
    repro: Option<PathBuf>,
    /// Stop each target after this many inputs.
    #[arg(long)]
    max_inputs: Option<u64>,
    /// An input running longer than this many seconds is a hang.
    #[arg(long, default_value_t = 10.0)]
    hang_seconds: f64,
    /// Also list what the inputs reached (loads, error kinds, divergences).
    #[arg(long)]
    verbose_outcomes: bool,
    /// Fuzz in this process (no protection against hangs, aborts and stack
    /// overflows; for debugging the driver).
    #[arg(long)]
    in_process: bool,
    /// Internal: be the supervised worker (report as JSON on stdout).
    #[arg(long, hide = true)]
    worker: bool,
    /// Internal: the supervisor's shared file.
    #[arg(long, hide = true)]
    shared: Option<PathBuf>,
}

fn fuzz(a: FuzzArgs) -> ExitCode {
    use monitor::fuzz;
    if a.target == "list" {
        for t in fuzz::targets() {
            println!("{:<10} {}", t.name, t.about);
        }
        return ExitCode::SUCCESS;
    }
    let infos: Vec<&fuzz::TargetInfo> = if a.target == "all" {
        fuzz::targets().iter().collect()
    } else {
        match fuzz::target(&a.target) {
            Ok(t) => vec![t],
            Err(e) => {
                eprintln!("popek: {e}");
                return ExitCode::from(2);
            }
        }
    };
    if let Some(path) = &a.repro {
        // A file, or a directory of them (a regression corpus).
        let files = match std::fs::read_dir(path) {
            Ok(dir) => {
                let mut v: Vec<PathBuf> =
                    dir.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
                v.sort();
                v
            }
            Err(_) => vec![path.clone()],
        };
        let mut failed = false;
        for (info, file) in infos.iter().flat_map(|i| files.iter().map(move |f| (i, f))) {
            match fuzz::reproduce(info, file) {
                Ok(fuzz::Outcome::Ok) => println!("{}: {}: ok", info.name, file.display()),
                Ok(fuzz::Outcome::Failed(msg)) => {
                    failed = true;
                    println!("{}: {}: FAILED: {msg}", info.name, file.display());
                }
                Err(e) => {
                    eprintln!("popek: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        return if failed { ExitCode::from(1) } else { ExitCode::SUCCESS };
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let opts = fuzz::Options { seconds: a.seconds, seed, out: a.out.clone(), max_inputs: a.max_inputs };
    if a.worker {
        let [info] = infos[..] else {
            eprintln!("popek: a fuzz worker runs one target");
            return ExitCode::from(2);
        };
        let mut shared = match a.shared.as_deref().map(fuzz::supervise::SharedFile::open).transpose() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("popek: {e}");
                return ExitCode::from(2);
            }
        };
        let progress = shared.as_mut().map(|s| s as &mut dyn fuzz::Progress);
        return match fuzz::fuzz(info, &opts, progress) {
            Ok(r) => {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("popek: {e}");
                ExitCode::from(2)
            }
        };
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("popek: cannot find popek itself: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!("popek fuzz: seed {seed}, {} s per target, reproducers in {}", a.seconds, a.out.display());
    let mut reports = Vec::new();
    for info in infos {
        let r = if a.in_process {
            fuzz::fuzz(info, &opts, None)
        } else {
            fuzz::supervise::supervise(&exe, info, &opts, std::time::Duration::from_secs_f64(a.hang_seconds.max(0.1)))
        };
        match r {
            Ok(r) => {
                println!(
                    "{:<10} {:>10} inputs {:>4} failures {:>7.1} s {:>9.0} inputs/s  slowest {:.1} ms  peak heap {} KiB",
                    r.target,
                    r.inputs,
                    r.failures,
                    r.seconds,
                    r.inputs as f64 / r.seconds.max(1e-9),
                    r.slowest_ms,
                    r.peak_heap >> 10
                );
                for (path, msg) in &r.reproducers {
                    println!("  reproducer {}: {msg}", path.display());
                }
                if a.verbose_outcomes {
                    for (what, n) in &r.outcomes {
                        println!("    {n:>10}  {what}");
                    }
                }
                reports.push(r);
            }
            Err(e) => {
                eprintln!("popek: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(path) = &a.json {
        if let Err(e) = std::fs::write(path, fuzz::to_json(&reports)) {
            eprintln!("popek: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if reports.iter().any(|r| r.failures > 0) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[derive(Subcommand)]
enum TraceAction {
    /// Compare two traces of the same guest and show where they part.
    Diff { a: PathBuf, b: PathBuf },
    /// Summarize a trace: header, event counts, size.
    Info { trace: PathBuf },
}

#[derive(Subcommand)]
enum GuestAction {
    /// List the built-in guests.
    List,
    /// Write a built-in guest as a multiboot v1 ELF.
    Export {
        name: String,
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn guest(action: GuestAction) -> ExitCode {
    match action {
        GuestAction::List => {
            for (name, description) in monitor::guests::list() {
                println!("{name:<8} {description}");
            }
            ExitCode::SUCCESS
        }
        GuestAction::Export { name, output } => {
            let Some(g) = monitor::guests::by_name(&name) else {
                let known: Vec<&str> = monitor::guests::list().iter().map(|g| g.0).collect();
                eprintln!("popek: no built-in guest {name:?} (known: {})", known.join(", "));
                return ExitCode::from(2);
            };
            let elf = monitor::guests::export_multiboot(&g);
            match std::fs::write(&output, &elf) {
                Ok(()) => {
                    eprintln!("popek: wrote {} ({} bytes, multiboot ELF)", output.display(), elf.len());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("popek: cannot write {}: {e}", output.display());
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn init_tracing(verbose: u8, fuzzing: bool) {
    let default = match verbose {
        // Fuzz inputs make devices warn about guest mistakes millions of times.
        0 if fuzzing => "off",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn bt_config(log_translations: bool, engine: &[String]) -> Result<BtConfig, String> {
    let mut bt = BtConfig { log_translations, ..Default::default() };
    for e in engine {
        bt.apply_switch(e)?;
    }
    Ok(bt)
}

fn print_stats(notes: &[String], stats: &[(String, u64)]) {
    for n in notes {
        eprintln!("popek: {n}");
    }
    eprintln!("popek: counters");
    for (k, v) in stats {
        eprintln!("  {k:<40} {v}");
    }
}

fn run(a: RunArgs) -> ExitCode {
    let bt = match bt_config(a.log_translations, &a.engine).map(|b| BtConfig {
        profile_callouts: a.stats,
        user_exec: a.user_exec,
        ..b
    }) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("popek: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = RunOptions {
        kernel: a.kernel,
        initrd: a.initrd,
        append: a.append,
        mem: a.mem,
        backend: a.backend,
        bt,
        interactive: !a.no_input,
        guest: a.guest,
        jail: jail_wanted(a.no_jail),
        machine: a.machine,
        legacy_cpu: false,
        legacy_keyboard: false,
        guest_decompress: a.guest_decompress,
        disks: a.disks,
        rng: a.rng,
    };
    if a.deterministic || a.record.is_some() || a.until.is_some() {
        let det = monitor::deterministic::DetOptions {
            checkpoint_every: a.checkpoint_every,
            memory_every: a.memory_every,
            until: a.until,
            ..Default::default()
        };
        let session = match &a.record {
            Some(p) => monitor::run::DetSession::Record { path: p.clone(), input: None },
            None => monitor::run::DetSession::Plain,
        };
        let switches = a.engine.join(",");
        return match monitor::run::run_deterministic(
            &opts,
            &det,
            session,
            &switches,
            Box::new(monitor::console::Stdout),
        ) {
            Ok(report) => {
                det_summary(&report);
                if a.stats {
                    print_stats(&report.notes, &report.stats);
                }
                det_exit(&report.outcome)
            }
            Err(e) => {
                eprintln!("popek: {e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    match monitor::run::run(&opts, Box::new(monitor::console::Stdout)) {
        Ok(report) => {
            eprintln!("\npopek: {} ({:.2} s)", report.outcome, report.wall.as_secs_f64());
            if a.stats {
                print_stats(&report.notes, &report.stats);
            }
            ExitCode::from(report.outcome.exit_code())
        }
        Err(e) => {
            eprintln!("popek: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The jail is on unless `--no-jail`, which says what it gives up.
fn jail_wanted(no_jail: bool) -> bool {
    if no_jail {
        eprintln!(
            "popek: warning: --no-jail: the monitor runs without its seccomp allow-list, namespaces and dropped \
             privileges; guest code that reaches 64-bit mode can make host system calls with popek's rights"
        );
    }
    !no_jail
}

fn det_summary(report: &monitor::run::DetReport) {
    use monitor::deterministic::DetOutcome;
    let secs = report.wall.as_secs_f64();
    let rate = report.count as f64 / secs.max(1e-9) / 1e6;
    match &report.outcome {
        DetOutcome::Finished(o) => {
            eprintln!("\npopek: {o} at instruction {} ({secs:.2} s, {rate:.0} M insns/s)", report.count)
        }
        DetOutcome::Stopped { count, state, code } => {
            eprintln!("\npopek: stopped at instruction {count}; guest state:\n{state}\nguest code at EIP:\n{code}")
        }
    }
    if let Some(n) = report.trace_bytes {
        eprintln!("popek: trace written ({n} bytes)");
    }
    if let Some(v) = &report.verified {
        eprintln!(
            "popek: replay verified {} checkpoints ({} with memory), {} port accesses, {} interrupts, {} inputs{}",
            v.checkpoints,
            v.memory_digests,
            v.port_accesses,
            v.interrupts,
            v.inputs,
            if v.end { ", and the end state" } else { "" }
        );
    }
}

fn det_exit(outcome: &monitor::deterministic::DetOutcome) -> ExitCode {
    match outcome {
        monitor::deterministic::DetOutcome::Finished(o) => ExitCode::from(o.exit_code()),
        monitor::deterministic::DetOutcome::Stopped { .. } => ExitCode::SUCCESS,
    }
}

struct ReplayArgs {
    trace: PathBuf,
    until: Option<u64>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    engine: Vec<String>,
    reference_engine: Option<Vec<String>>,
    quiet: bool,
    no_jail: bool,
}

fn replay(a: ReplayArgs) -> ExitCode {
    let (t, cut_at) = match monitor::trace::read_for_replay(&a.trace) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("popek: {}: {e}", a.trace.display());
            return ExitCode::from(1);
        }
    };
    let mut until = a.until;
    if let Some(last) = cut_at {
        eprintln!(
            "popek: {} was cut off after {} events; replaying up to instruction {last}",
            a.trace.display(),
            t.events.len()
        );
        until = Some(until.map_or(last, |u| u.min(last)));
    }
    let mut opts = match monitor::run::options_from_header(&t.header) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("popek: {}: {e}", a.trace.display());
            return ExitCode::from(1);
        }
    };
    opts.kernel = a.kernel.or(opts.kernel);
    opts.initrd = a.initrd.or(opts.initrd);
    let recorded: Vec<String> = t.header.engine.split(',').filter(|s| !s.is_empty()).map(String::from).collect();
    let switches: Vec<String> = recorded.iter().cloned().chain(a.engine).collect();
    let reference = a.reference_engine.unwrap_or(recorded);
    let (bt, ref_bt) = match (bt_config(false, &switches), bt_config(false, &reference)) {
        (Ok(b), Ok(r)) => (b, r),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("popek: {e}");
            return ExitCode::from(2);
        }
    };
    opts.bt = bt;
    opts.jail = jail_wanted(a.no_jail);
    let det = monitor::deterministic::DetOptions { until, ..Default::default() };
    let console: Box<dyn std::io::Write + Send> =
        if a.quiet { Box::new(std::io::sink()) } else { Box::new(monitor::console::Stdout) };
    let session = monitor::run::DetSession::Replay(Box::new(t.clone()));
    match monitor::run::run_deterministic(&opts, &det, session, &switches.join(","), console) {
        Ok(report) => {
            det_summary(&report);
            ExitCode::SUCCESS
        }
        Err(monitor::run::RunError::Diverged { at, last_good, report }) => {
            eprintln!("popek: {report}");
            if reference != switches {
                eprintln!(
                    "popek: localizing: engine [{}] against [{}] between instructions {last_good} and {at}...",
                    switches.join(","),
                    reference.join(",")
                );
                let reference_opts = monitor::run::RunOptions { bt: ref_bt, ..opts.clone() };
                match monitor::localize::localize(&reference_opts, &opts, &t, last_good, at) {
                    Ok(Some(l)) => eprint!("popek: {l}"),
                    Ok(None) => {
                        eprintln!("popek: the registers agree all the way: the difference is in memory or devices")
                    }
                    Err(e) => eprintln!("popek: localizing failed: {e}"),
                }
            }
            ExitCode::from(1)
        }
        Err(e @ monitor::run::RunError::Read { .. }) => {
            eprintln!("popek: {e}\npopek: the trace names its images as they were given when recording; point --kernel/--initrd at the same files (their SHA-256 is checked)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("popek: {e}");
            ExitCode::from(1)
        }
    }
}

fn trace_cmd(action: TraceAction) -> ExitCode {
    use monitor::trace::format::Trace;
    let read = |p: &PathBuf| Trace::read(p).map_err(|e| format!("{}: {e}", p.display()));
    match action {
        TraceAction::Diff { a, b } => match (read(&a), read(&b)) {
            (Ok(ta), Ok(tb)) => {
                let report = monitor::trace::diff::diff(&ta, &tb);
                println!("{report}");
                if report.first.is_some() {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("popek: {e}");
                ExitCode::from(2)
            }
        },
        TraceAction::Info { trace } => match read(&trace) {
            Ok(t) => {
                print!("{}", monitor::trace::info(&t, std::fs::metadata(&trace).map(|m| m.len()).unwrap_or(0)));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("popek: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn initramfs(
    output: PathBuf,
    dir: Option<PathBuf>,
    files: Vec<String>,
    init: Option<PathBuf>,
    busybox: Option<PathBuf>,
) -> ExitCode {
    let mut pairs = Vec::new();
    for f in files {
        match f.split_once('=') {
            Some((a, h)) => pairs.push((a.to_owned(), PathBuf::from(h))),
            None => {
                eprintln!("popek: --file wants ARCHIVE_PATH=HOST_PATH, got {f:?}");
                return ExitCode::from(2);
            }
        }
    }
    let init = match init.map(std::fs::read_to_string).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("popek: cannot read the init script: {e}");
            return ExitCode::from(1);
        }
    };
    use monitor::loader::initramfs;
    let built = match &busybox {
        Some(bb) => {
            let script = init.unwrap_or_else(|| initramfs::DEFAULT_BUSYBOX_INIT.to_owned());
            initramfs::busybox_initramfs(bb, &script, &pairs)
        }
        None => initramfs::build(&initramfs::InitramfsSpec { dir, files: pairs, init }),
    };
    match built.map_err(|e| e.to_string()).and_then(|data| {
        std::fs::write(&output, &data)
            .map_err(|e| format!("cannot write {}: {e}", output.display()))
            .map(|_| data.len())
    }) {
        Ok(n) => {
            eprintln!("popek: wrote {} ({n} bytes)", output.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("popek: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    // Descriptors inherited from whoever started us stay outside the jail:
    // a guest that takes the monitor over could write to them.
    // SAFETY: closing descriptors this process has not opened itself; no
    // Rust object owns them yet.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let cli = Cli::parse();
    init_tracing(cli.verbose, matches!(cli.command, Command::Fuzz(_)));
    match cli.command {
        Command::Run(args) => run(args),
        Command::Replay { trace, until, kernel, initrd, engine, reference_engine, quiet, no_jail } => {
            replay(ReplayArgs { trace, until, kernel, initrd, engine, reference_engine, quiet, no_jail })
        }
        Command::Trace { action } => trace_cmd(action),
        Command::Initramfs { output, dir, files, init, busybox } => initramfs(output, dir, files, init, busybox),
        Command::Guest { action } => guest(action),
        Command::Fuzz(args) => fuzz(args),
        Command::Bench { suite, json, quick, backends, svg, no_jail, worker } => {
            if worker {
                return match monitor::bench::worker::serve(&suite, quick) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("popek: bench worker failed: {e}");
                        ExitCode::from(1)
                    }
                };
            }
            let jailed = jail_wanted(no_jail);
            if svg.is_some() && suite != "nano" {
                eprintln!("popek: --svg is for --suite nano; ignored");
            }
            let result = match suite.as_str() {
                "nano" => {
                    let popek = jailed.then(|| std::env::current_exe().ok()).flatten();
                    let mut opts = monitor::bench::nano::Options { quick, svg, popek, ..Default::default() };
                    if let Some(b) = backends {
                        opts.backends = b;
                    }
                    monitor::bench::nano::run_with(&opts).map(|report| {
                        print!("{}", monitor::bench::nano::to_matrix(&report));
                        report.rows
                    })
                }
                "linux" => {
                    let popek = jailed.then(|| std::env::current_exe().ok()).flatten();
                    let mut opts = monitor::bench::linux::Options { quick, popek, ..Default::default() };
                    if let Some(b) = backends {
                        opts.backends = b;
                    }
                    monitor::bench::linux::run_opts(&opts).map(|report| {
                        print!("{}", monitor::bench::to_table(&report.rows));
                        report.rows
                    })
                }
                "distro" => {
                    let popek = std::env::current_exe().ok();
                    let mut opts =
                        monitor::bench::distro::Options { quick, popek, no_jail: !jailed, ..Default::default() };
                    if let Some(b) = backends {
                        opts.backends = b;
                    }
                    monitor::bench::distro::run_opts(&opts).map(|report| {
                        print!("{}", monitor::bench::to_table(&report.rows));
                        report.rows
                    })
                }
                "workloads" => {
                    let popek = jailed.then(|| std::env::current_exe().ok()).flatten();
                    let mut opts = monitor::bench::linux::Options { quick, popek, ..Default::default() };
                    if let Some(b) = backends {
                        opts.backends = b;
                    }
                    monitor::bench::workloads::run_opts(&opts).map(|report| {
                        print!("{}", monitor::bench::to_table(&report.rows));
                        report.rows
                    })
                }
                _ => {
                    if backends.is_some() {
                        eprintln!("popek: --backends is for --suite nano, linux, workloads and distro; ignored");
                    }
                    let rows = if jailed && monitor::bench::worker::JAILED_SUITES.contains(&suite.as_str()) {
                        std::env::current_exe()
                            .map_err(|e| monitor::bench::BenchError::Input(format!("cannot find popek itself: {e}")))
                            .and_then(|exe| monitor::bench::worker::run_jailed(&exe, &suite, quick))
                    } else {
                        monitor::bench::run_suite(&suite, quick)
                    };
                    rows.inspect(|rows| print!("{}", monitor::bench::to_table(rows)))
                }
            };
            match result {
                Ok(rows) => {
                    if let Some(path) = json {
                        if let Err(e) = std::fs::write(&path, monitor::bench::to_json(&rows)) {
                            eprintln!("popek: cannot write {}: {e}", path.display());
                            return ExitCode::from(1);
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("popek: bench failed: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
