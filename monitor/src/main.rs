//! `popek`: the command-line front end.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Measure Popek: one row per figure, optionally as JSON.
    Bench {
        /// Which suite (host).
        #[arg(long, default_value = "host")]
        suite: String,
        /// Also write the rows as JSON to FILE.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Shorter runs (less precise).
        #[arg(long)]
        quick: bool,
    },
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    match cli.command {
        Command::Bench { suite, json, quick } => match monitor::bench::run_suite(&suite, quick) {
            Ok(rows) => {
                print!("{}", monitor::bench::to_table(&rows));
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
        },
    }
}
