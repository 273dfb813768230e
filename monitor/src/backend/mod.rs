//! CPU backends behind one trait: `bt` (Popek's binary translator and
//! execution host) and `kvm` (hardware-assisted, for comparison). Memory,
//! loaders, devices and the run loop ([`crate::vm`]) are shared; only the CPU
//! differs. Neutral types here, conversions to each backend's own inside it
//! (as cloud-hypervisor's `hypervisor` crate).

pub mod bt;
pub mod fake;
pub mod kvm;

use thiserror::Error;

use crate::cpu::Cpu;

/// Why a backend's `run` returned: something the machine must handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// `IN`: the machine answers with [`Backend::complete_io_in`] before
    /// the next `run`.
    IoIn {
        port: u16,
        size: u8,
    },
    IoOut {
        port: u16,
        size: u8,
        value: u32,
    },
    /// A guest-physical access no RAM backs; reads are completed with
    /// [`Backend::complete_mmio_read`].
    MmioRead {
        addr: u64,
        size: u8,
    },
    MmioWrite {
        addr: u64,
        size: u8,
        value: u64,
    },
    /// RDMSR of an MSR the machine holds (IA32_TSC_DEADLINE, in the local
    /// APIC): completed with [`Backend::complete_msr_read`].
    MsrRead {
        index: u32,
    },
    /// WRMSR of an MSR the machine holds; `tsc` is the guest TSC at the
    /// instruction (the deadline's reference).
    MsrWrite {
        index: u32,
        value: u64,
        tsc: u64,
    },
    /// HLT: wait for an interrupt (or stop, if interrupts are disabled).
    Halt,
    /// Stopped by [`Backend::kicker`] (or a backend-internal timeslice).
    Interrupted,
    /// The guest can take an interrupt now (after
    /// [`Backend::request_interrupt_window`]).
    InterruptWindow,
    /// The processor shut down: triple fault. The state is in `cpu_state`.
    TripleFault,
}

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("{0} is not available on this host: {1}")]
    Unavailable(&'static str, String),
    #[error("the {backend} backend does not support {what}")]
    Unsupported { backend: &'static str, what: String },
    #[error("the {backend} backend failed: {what}")]
    Failed { backend: &'static str, what: String },
    /// Guest code left compatibility mode for the host's 64-bit mode; the
    /// VM cannot go on (docs/security.md).
    #[error("{0}")]
    GuestEscape(crate::host::Escape),
}

/// A handle that stops a running backend from another thread.
pub type Kick = std::sync::Arc<dyn Fn() + Send + Sync>;

/// One virtual CPU of some kind.
/// The machine's port space, for a backend that answers port I/O without
/// returning to the run loop (the bt backend's callouts, outside the
/// deterministic mode, whose recordings see every access).
pub trait Ports {
    fn io_in(&mut self, port: u16, size: u8) -> u32;
    fn io_out(&mut self, port: u16, size: u8, value: u32);
    /// A fingerprint of what the run loop acts on (pending interrupts,
    /// timer deadlines, platform events): when an access changes it, the
    /// backend returns to the loop.
    fn loop_state(&mut self) -> LoopState;
    /// Whether an access to `port` may move a timer deadline. For the
    /// others the backend compares [`Ports::loop_state_without_deadlines`]
    /// instead: reading every timer twice per access was most of an
    /// in-place IN (nano `in`).
    fn port_moves_deadlines(&self, _port: u16) -> bool {
        true
    }
    /// [`Ports::loop_state`] without `next_deadline_ns` (left `None`).
    fn loop_state_without_deadlines(&mut self) -> LoopState {
        self.loop_state()
    }
    /// What a byte read of `port` returns, when reading it changes nothing
    /// and its value changes only through writes to these ports (a PIC's
    /// mask register): a backend may answer such reads itself until it
    /// hands a write to the machine. `None`: every read goes to the port.
    fn quiet_read(&mut self, _port: u16) -> Option<u8> {
        None
    }
}

/// What the run loop acts on between backend runs (see [`Ports`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopState {
    pub interrupt_pending: bool,
    pub next_deadline_ns: Option<u64>,
    pub events: bool,
}

pub trait Backend {
    fn name(&self) -> &'static str;
    /// Runs guest code until the next [`VmExit`].
    fn run(&mut self) -> Result<VmExit, BackendError>;
    /// [`Backend::run`], with port I/O the backend may perform on `ports`
    /// itself (an access then is no exit). The default ignores `ports`.
    fn run_with_ports(&mut self, ports: &mut dyn Ports) -> Result<VmExit, BackendError> {
        let _ = ports;
        self.run()
    }
    /// The value of the `IN` that caused the last exit.
    fn complete_io_in(&mut self, value: u32);
    /// The value of the MMIO read that caused the last exit.
    fn complete_mmio_read(&mut self, value: u64);
    /// The value of the RDMSR that caused the last exit
    /// ([`VmExit::MsrRead`]). A backend that never makes that exit (kvm)
    /// keeps the default, which does nothing.
    fn complete_msr_read(&mut self, value: u64) {
        let _ = value;
    }
    /// Whether an external interrupt can be injected now (IF=1, no
    /// interrupt shadow).
    fn interrupts_enabled(&self) -> bool;
    /// Delivers external interrupt `vector` before the next instruction.
    fn inject_interrupt(&mut self, vector: u8) -> Result<(), BackendError>;
    /// Asks for [`VmExit::InterruptWindow`] as soon as interrupts can be taken.
    fn request_interrupt_window(&mut self, on: bool);
    /// A handle to make `run` return [`VmExit::Interrupted`].
    fn kicker(&self) -> Kick;
    /// The host thread that [`Backend::kicker`]'s kick signals, when a kick
    /// is exactly the kick signal to it: the run loop can then arm a timer
    /// that sends it ([`crate::host::signals::KickTimer`]) instead of
    /// running a ticker thread.
    fn kick_thread(&self) -> Option<libc::pid_t> {
        None
    }
    /// The architectural state (for reports, dumps and traces).
    fn cpu_state(&mut self) -> Cpu;
    /// Backend counters as `(name, value)` pairs with stable names.
    fn stats(&self) -> Vec<(String, u64)>;
    /// Deterministic mode: guest instructions retired so far (`None` when
    /// the backend does not count).
    fn instruction_count(&self) -> Option<u64> {
        None
    }
    /// Deterministic mode: guest time now, in nanoseconds (derived from the
    /// instruction count, never from the host clock).
    fn virtual_ns(&self) -> Option<u64> {
        None
    }
    /// Deterministic mode: make `run` return [`VmExit::Interrupted`] when
    /// the count reaches `count` exactly, or guest time reaches `ns`.
    fn set_stop(&mut self, _count: Option<u64>, _ns: Option<u64>) -> Result<(), BackendError> {
        Err(BackendError::Unsupported { backend: self.name(), what: "stops by instruction count".into() })
    }
    /// Deterministic mode: guest time jumps `ns` ahead (the guest idles in
    /// HLT until its next timer).
    fn skip_time(&mut self, _ns: u64) -> Result<(), BackendError> {
        Err(BackendError::Unsupported { backend: self.name(), what: "virtual time".into() })
    }
    /// Reads guest-linear memory as the CPU sees it now (for reports).
    fn read_linear(&mut self, _linear: u32, _buf: &mut [u8]) -> Result<(), BackendError> {
        Err(BackendError::Unsupported { backend: self.name(), what: "reading guest-linear memory".into() })
    }
}
