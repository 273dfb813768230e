//! The execution host: runs 32-bit guest-mode code natively in this process,
//! in IA-32e compatibility mode, and brings every trap back as a typed
//! [`Exit`].
//!
//! - [`window`]: the reserved low 4 GiB, shadow mappings, the VMM area;
//! - [`ldt`]: guest segment descriptors shadowed into the host LDT;
//! - [`entry`]: the assembly that enters guest-mode code and the exit paths;
//! - [`signals`]: the handler that turns host signals into exits;
//! - [`cpuid_fault`]: CPUID faulting, so directly run user code sees the guest's CPUID;
//! - [`seccomp`]: the filter that keeps guest system calls away from the host;
//! - [`vcpu`]: the safe API, [`Vcpu::run`].
//!
//! docs/execution-host.md describes the protocol with a diagram.

pub mod cpuid_fault;
pub mod entry;
pub mod ldt;
pub mod seccomp;
pub mod signals;
pub mod vcpu;
pub mod window;

pub use ldt::{HostSegment, SegKind};
pub use vcpu::{Exit, FpuState, Kicker, Regs, Segments, SyscallKind, Vcpu};
pub use window::{Prot, VmmAlias, Window};

use thiserror::Error;

/// What can go wrong in the execution host. Every variant is a clear,
/// user-facing statement of what the host lacks or what failed.
#[derive(Debug, Error, Clone)]
pub enum HostError {
    #[error(
        "the low 4 GiB of the monitor's address space are not free (found: {0}); Popek needs them for the guest window"
    )]
    WindowOccupied(String),
    #[error("{what} failed: {errno}")]
    Syscall { what: &'static str, errno: nix::Error },
    #[error(
        "modify_ldt refused to write LDT entry {index}: {errno} (kernel built without CONFIG_MODIFY_LDT_SYSCALL?)"
    )]
    ModifyLdt { index: u16, errno: nix::Error },
    #[error("LDT index {0} is out of range")]
    LdtIndex(u16),
    #[error("cannot install the seccomp filter that keeps guest system calls from the host: {0}")]
    Seccomp(nix::Error),
    #[error("this CPU/kernel does not let user code use RDFSBASE/WRFSBASE (FSGSBASE), which Popek needs to protect the host FS base")]
    NoFsGsBase,
    #[error("this CPU/kernel lacks XSAVE, needed to keep guest FPU/SSE state apart from the monitor's")]
    NoXsave,
    #[error("this CPU lacks LAHF/SAHF in 64-bit mode (CPUID 0x80000001 ECX bit 0), which the callout path uses")]
    NoLahfSahf,
    #[error(
        "another vCPU is alive in this process: the window and the host LDT are process-global, one vCPU at a time"
    )]
    Busy,
    #[error(
        "window range {gva:#x}+{len:#x} is not page aligned, is empty, is below mmap_min_addr or reaches the VMM area"
    )]
    BadWindowRange { gva: u32, len: u32 },
    #[error("guest-physical range {gpa:#x}+{len:#x} is not page aligned or is outside guest RAM")]
    BadGuestPhysical { gpa: u64, len: u32 },
    #[error("entering guest code faulted (signal {signo}, trap {trapno}, error code {err:#x}) with CS={cs:#x} SS={ss:#x} DS={ds:#x}: no compatibility mode on this host, or a selector that does not load")]
    EntryFault { signo: i32, trapno: u32, err: u32, cs: u16, ss: u16, ds: u16 },
    #[error("selector {0:#x} is not one the execution host set up (host LDT entry or host flat selector)")]
    BadSelector(u16),
    #[error("unexpected signal {signo} (trap {trapno}) from guest code")]
    UnexpectedSignal { signo: i32, trapno: u32 },
    #[error("invalid FPU state: {0}")]
    BadFpuState(&'static str),
    #[error("{0}")]
    GuestEscape(Escape),
}

/// Guest code switched to the host's 64-bit code selector (a far JMP, CALL,
/// RETF or IRET to 0x33 needs no privilege) and was stopped there: by the
/// vCPU guard if it made a system call (the call did not run), else by the
/// first fault or kick in 64-bit mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Escape {
    pub cs: u16,
    pub rip: u64,
    pub signo: i32,
    /// The system call it asked for: number and whether it was i386
    /// (`int 0x80`, compat `sysenter`) or x86-64 (`syscall`).
    pub syscall: Option<(i32, bool)>,
}

impl std::fmt::Display for Escape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.syscall {
            Some((nr, i386)) => write!(
                f,
                "guest code made a host system call ({} #{nr}) in 64-bit mode at RIP {:#x} (CS={:#x}, the host's \
                 64-bit code selector); it was refused and the VM is stopped",
                if i386 { "i386" } else { "x86-64" },
                self.rip,
                self.cs
            ),
            None => write!(
                f,
                "guest code switched to 64-bit mode (CS={:#x}, the host's 64-bit code selector) and was stopped at \
                 RIP {:#x} (signal {}); no host system call ran, the VM is stopped",
                self.cs, self.rip, self.signo
            ),
        }
    }
}
