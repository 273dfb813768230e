//! `popek run`: build a machine from the command line (guest RAM, an image,
//! the platform, a backend), run it, report how it ended.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use thiserror::Error;

use crate::backend::bt::{BtBackend, BtConfig};
use crate::backend::{Backend, BackendError};
use crate::cpu::Cpu;
use crate::devices::{Clock, HostClock, HostWallClock, Platform, PlatformConfig};
use crate::loader::{linux, multiboot, BootState};
use crate::memory::{GuestMemory, MemoryError};
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

/// Loads the image and returns the initial CPU state.
fn load_image(opts: &RunOptions, mem: &GuestMemory, notes: &mut Vec<String>) -> Result<Cpu, RunError> {
    let Some(kernel) = &opts.kernel else {
        let guest = crate::guests::by_name("demo").expect("the demo guest is built in");
        mem.write(u64::from(guest.load_addr), &guest.image)?;
        let mut cpu = Cpu::flat_protected(0x08, 0x10);
        cpu.eip = guest.entry;
        cpu.gpr[4] = guest.load_addr;
        notes.push(format!("no --kernel: running the built-in `{}` guest ({})", guest.name, guest.description));
        return Ok(cpu);
    };
    let image = read(kernel)?;
    let append = opts.append.clone().unwrap_or_default();
    // The setup header's magic is enough to pick the Linux loader, which then
    // says precisely what is wrong with a damaged image (truncated, too old).
    let looks_linux = image.get(0x202..0x206) == Some(b"HdrS".as_slice());
    let state: BootState = if looks_linux || linux::is_bzimage(&image) {
        let initrd = opts.initrd.as_deref().map(read).transpose()?;
        let boot = linux::load(mem, &image, &append, initrd.as_deref())?;
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

fn backend(opts: &RunOptions, mem: &Arc<GuestMemory>, cpu: Cpu) -> Result<Box<dyn Backend>, RunError> {
    Ok(match opts.backend {
        BackendKind::Bt => Box::new(BtBackend::new(mem.clone(), cpu, opts.bt)?),
        BackendKind::Kvm => Box::new(crate::backend::kvm::KvmBackend::new(mem, &cpu)?),
    })
}

/// Builds the machine and runs it to the end.
pub fn run(opts: &RunOptions, console: Box<dyn std::io::Write + Send>) -> Result<RunReport, RunError> {
    let t = std::time::Instant::now();
    let mem = Arc::new(GuestMemory::new(opts.mem)?);
    let mut notes = Vec::new();
    let cpu = load_image(opts, &mem, &mut notes)?;
    for n in &notes {
        tracing::info!("{n}");
    }
    let clock: Arc<dyn Clock> = Arc::new(HostClock::new());
    let platform = Platform::new(PlatformConfig {
        ram_size: mem.size(),
        console,
        clock: clock.clone(),
        wall_clock: Arc::new(HostWallClock),
    })?;
    let backend = backend(opts, &mem, cpu)?;
    let mut vm = Vm::new(mem, platform, backend, clock);
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

/// Parses sizes like `256M`, `1G`, `65536K` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown size suffix in {s:?} (K, M or G)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size too large: {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
    }
}
