//! `popek`: the command-line front end.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use monitor::run::{parse_size, BackendKind, RunOptions};

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
    /// Run a guest: a Linux bzImage or multiboot kernel, or the built-in demo.
    Run {
        /// Kernel image (bzImage or multiboot ELF); the built-in demo guest without it.
        #[arg(long)]
        kernel: Option<PathBuf>,
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
        /// Print exits, translation and shadow-MMU counters and where the time went.
        #[arg(long)]
        stats: bool,
        /// Log every translated block beside its translation (needs -v).
        #[arg(long)]
        log_translations: bool,
        /// Do not forward stdin to the guest console.
        #[arg(long)]
        no_input: bool,
        /// Translator switches for bug hunting, comma-separated:
        /// nochain, nopoll, noinline / inline (PUSHF/POPF as callouts or
        /// inline sequences; callouts by default).
        #[arg(long, value_delimiter = ',')]
        engine: Vec<String>,
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
        /// Backends to compare, comma-separated (suite nano): bt, kvm, qemu.
        #[arg(long, value_delimiter = ',', default_value = "bt,kvm,qemu")]
        backends: Vec<String>,
        /// Also draw the results as a log-scale SVG bar chart (suite nano).
        #[arg(long)]
        svg: Option<PathBuf>,
    },
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

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

#[allow(clippy::too_many_arguments)]
fn run(
    engine: Vec<String>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: Option<String>,
    mem: u64,
    backend: BackendKind,
    stats: bool,
    log_translations: bool,
    no_input: bool,
) -> ExitCode {
    let mut bt = monitor::backend::bt::BtConfig { log_translations, ..Default::default() };
    for e in &engine {
        match e.as_str() {
            "nochain" => bt.engine.chaining = false,
            "nopoll" => bt.engine.poll_at_block_entry = false,
            "noinline" => bt.engine.inline_flags = false,
            "inline" => bt.engine.inline_flags = true,
            other => {
                eprintln!("popek: unknown --engine switch {other:?} (nochain, nopoll, noinline, inline)");
                return ExitCode::from(2);
            }
        }
    }
    let opts = RunOptions { kernel, initrd, append, mem, backend, bt, interactive: !no_input };
    match monitor::run::run(&opts, Box::new(monitor::console::Stdout)) {
        Ok(report) => {
            eprintln!("\npopek: {} ({:.2} s)", report.outcome, report.wall.as_secs_f64());
            if stats {
                for n in &report.notes {
                    eprintln!("popek: {n}");
                }
                eprintln!("popek: counters");
                for (k, v) in &report.stats {
                    eprintln!("  {k:<40} {v}");
                }
            }
            ExitCode::from(report.outcome.exit_code())
        }
        Err(e) => {
            eprintln!("popek: {e}");
            ExitCode::from(1)
        }
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
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    match cli.command {
        Command::Run { kernel, initrd, append, mem, backend, stats, log_translations, no_input, engine } => {
            run(engine, kernel, initrd, append, mem, backend, stats, log_translations, no_input)
        }
        Command::Initramfs { output, dir, files, init, busybox } => initramfs(output, dir, files, init, busybox),
        Command::Guest { action } => guest(action),
        Command::Bench { suite, json, quick, backends, svg } => {
            let result = if suite == "nano" {
                let opts = monitor::bench::nano::Options { quick, backends, svg };
                monitor::bench::nano::run_with(&opts).map(|report| {
                    print!("{}", monitor::bench::nano::to_matrix(&report));
                    report.rows
                })
            } else {
                if svg.is_some() {
                    eprintln!("popek: --svg is for --suite nano; ignored");
                }
                monitor::bench::run_suite(&suite, quick).inspect(|rows| print!("{}", monitor::bench::to_table(rows)))
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
