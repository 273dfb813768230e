//! The machine: guest RAM, the platform devices and one CPU backend, and the
//! run loop both backends share.
//!
//! ```text
//!        ┌────────────────────────────── Vm::run ───────────────────────────────┐
//!        │ poll timers (PIT/RTC) ─ console input ─ platform events (exit/reset)  │
//!        │ pending IRQ? ── IF=1 → acknowledge at the PIC, inject the vector       │
//!        │              └─ IF=0 → ask the backend for an interrupt window        │
//!        │ publish the next timer deadline for the ticker thread                 │
//!        │ backend.run() ─► IoIn/IoOut → platform ports   Halt → sleep to the    │
//!        │                  Mmio → platform MMIO           next deadline/input   │
//!        │                  Interrupted/Window → loop      TripleFault → report  │
//!        └───────────────────────────────────────────────────────────────────────┘
//!   ticker thread: sleeps until the published deadline, then kicks the vCPU
//!   input thread:  forwards console bytes over a channel, then kicks
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::backend::{Backend, BackendError, Kick, VmExit};
use crate::devices::clock::Clock;
use crate::devices::misc::PlatformEvent;
use crate::devices::platform::{Platform, PlatformError};
use crate::memory::GuestMemory;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("{error}\nguest CPU state:\n{state}")]
    Stopped { error: BackendError, state: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest wrote `code` to isa-debug-exit (already `(v << 1) | 1`).
    DebugExit(u32),
    PowerOff,
    Reset,
    /// HLT with interrupts disabled: nothing can wake the CPU.
    HaltedWithInterruptsOff,
    /// The CPU shut down; the guest state at that point.
    TripleFault(String),
    /// The user asked to quit (console escape).
    Quit,
    /// HLT with no timer armed and no input left (deterministic mode).
    Idle,
}

impl RunOutcome {
    /// The process exit code Popek reports for this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            // The value the guest wrote (QEMU's status is `(v << 1) | 1`).
            RunOutcome::DebugExit(c) => ((*c >> 1) & 0xFF) as u8,
            RunOutcome::PowerOff | RunOutcome::Reset => 0,
            RunOutcome::HaltedWithInterruptsOff => 0,
            RunOutcome::TripleFault(_) => 3,
            RunOutcome::Quit => 0,
            RunOutcome::Idle => 0,
        }
    }
}

impl std::fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunOutcome::DebugExit(c) => {
                write!(f, "guest wrote {} to isa-debug-exit (QEMU would exit with status {c})", c >> 1)
            }
            RunOutcome::PowerOff => write!(f, "guest powered off"),
            RunOutcome::Reset => write!(f, "guest reset the machine"),
            RunOutcome::HaltedWithInterruptsOff => write!(f, "guest halted with interrupts disabled"),
            RunOutcome::TripleFault(state) => write!(f, "guest triple fault; CPU state:\n{state}"),
            RunOutcome::Quit => write!(f, "stopped at the user's request"),
            RunOutcome::Idle => write!(f, "guest halted with no timer armed and no input to wake it"),
        }
    }
}

/// What [`Vm::serve_access`] did with an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    Port {
        port: u16,
        size: u8,
        write: bool,
        value: u32,
    },
    Mmio,
    /// An MSR the machine holds (the guest re-executes the access on replay:
    /// nothing to record).
    Msr,
    NotAnAccess,
}

/// Guest RAM, devices and a CPU.
pub struct Vm {
    pub mem: Arc<GuestMemory>,
    pub platform: Platform,
    pub backend: Box<dyn Backend>,
    clock: Arc<dyn Clock>,
    input: Option<Receiver<Vec<u8>>>,
    quit: Option<Arc<AtomicBool>>,
    /// Counters of the loop itself.
    pub interrupts_injected: u64,
    pub halts: u64,
}

/// Stops and joins the stress-kick thread when dropped: no kick may reach
/// the thread after its run (a test harness reuses threads and thread ids).
pub(crate) struct StressKicks {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for StressKicks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Spaces out the kicks of timer deadlines that raise nothing.
///
/// A deadline exists to raise an interrupt; one that passes without
/// making one pending (the line is masked in a way no rule of the devices
/// foresaw, the PIC or APIC disabled) cost a vCPU kick for nothing, and a
/// megahertz timer made that a kick per microsecond: the guest never ran.
/// A deadline is useless, too, while another interrupt already waits (the
/// guest has interrupts off). After such a deadline the next one is armed
/// no earlier than `floor` from now (10 µs, doubling to 1 ms while they
/// stay useless, back to 0 as soon as one raises something), rounded to a
/// multiple of the floor so
/// that the loop does not re-arm the host timer on every pass. Devices
/// compute what the guest reads from the clock, so a later poll loses
/// nothing but edges that changed nothing.
#[derive(Debug, Default)]
struct KickBackoff {
    floor_ns: u64,
}

impl KickBackoff {
    const FIRST_NS: u64 = 10_000;
    const MAX_NS: u64 = 1_000_000;

    /// A pass of the loop: `due` when the armed deadline had passed, and
    /// `raised` when polling the timers made an interrupt pending that was
    /// not (one already waiting for the guest says nothing of the timer).
    fn observe(&mut self, due: bool, raised: bool) {
        if raised {
            self.floor_ns = 0;
        } else if due {
            self.floor_ns = (self.floor_ns * 2).clamp(Self::FIRST_NS, Self::MAX_NS);
        }
    }

    /// The time to arm for `deadline` at `now`.
    fn arm(&self, deadline: Option<u64>, now: u64) -> Option<u64> {
        let d = deadline?;
        if self.floor_ns == 0 || d >= now + self.floor_ns {
            return Some(d);
        }
        Some((now + self.floor_ns).next_multiple_of(self.floor_ns))
    }
}

/// Kicks the vCPU when the published timer deadline passes.
struct Ticker {
    deadline: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    fn start(clock: Arc<dyn Clock>, kick: Kick) -> Ticker {
        let deadline = Arc::new(AtomicU64::new(u64::MAX));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (deadline.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("popek-ticker".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let due = d.load(Ordering::Acquire);
                    let now = clock.now_ns();
                    if due != u64::MAX && now >= due {
                        // Once per deadline: the loop publishes the next one.
                        if d.compare_exchange(due, u64::MAX, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                            kick();
                        }
                        continue;
                    }
                    // No deadline published yet (the loop publishes the next one
                    // after each kick): look again soon rather than late.
                    let wait = if due == u64::MAX { 200_000 } else { (due - now).min(2_000_000) };
                    std::thread::sleep(Duration::from_nanos(wait.max(20_000)));
                }
            })
            .expect("spawn ticker thread");
        Ticker { deadline, stop, thread: Some(thread) }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Vm {
    pub fn new(mem: Arc<GuestMemory>, platform: Platform, backend: Box<dyn Backend>, clock: Arc<dyn Clock>) -> Vm {
        Vm { mem, platform, backend, clock, input: None, quit: None, interrupts_injected: 0, halts: 0 }
    }

    /// Console input arrives on `rx` (the sender kicks the vCPU after sending).
    pub fn set_input(&mut self, rx: Receiver<Vec<u8>>) {
        self.input = Some(rx);
    }

    /// Stop the run (with [`RunOutcome::Quit`]) once `flag` is set; the
    /// setter kicks the vCPU.
    pub fn set_quit(&mut self, flag: Arc<AtomicBool>) {
        self.quit = Some(flag);
    }

    /// `n` guest instructions from CS:`eip`, disassembled (for reports).
    pub fn disassemble_at(&mut self, eip: u32, n: usize) -> String {
        let cpu = self.backend.cpu_state();
        let cs = cpu.seg(crate::cpu::Seg::Cs).cache;
        let mut bytes = vec![0u8; 15 * n];
        let linear = cs.base.wrapping_add(eip);
        // Shorten the read until it fits in mapped memory.
        let mut len = bytes.len();
        while len > 0 && self.backend.read_linear(linear, &mut bytes[..len]).is_err() {
            len = (len / 2).min(4096 - (linear & 0xFFF) as usize);
        }
        if len == 0 {
            return format!("  {eip:#010x}: (not readable)\n");
        }
        let bitness = if cs.db { 32 } else { 16 };
        let mut d = iced_x86::Decoder::with_ip(bitness, &bytes[..len], u64::from(eip), iced_x86::DecoderOptions::NONE);
        let mut out = String::new();
        for insn in d.iter().take(n) {
            if insn.is_invalid() {
                break;
            }
            out.push_str(&format!("  {:#010x}: {insn}\n", insn.ip32()));
        }
        out
    }

    /// Debugging aid: kicks the vCPU every `every_us` µs (or
    /// `POPEK_STRESS_KICK_US`) while the returned guard lives: asynchronous
    /// stops at arbitrary points (the deterministic mode must record and
    /// replay the same trace under them).
    pub(crate) fn start_stress_kicks(&self, every_us: Option<u64>) -> StressKicks {
        let stop = Arc::new(AtomicBool::new(false));
        let us = every_us.or_else(|| std::env::var("POPEK_STRESS_KICK_US").ok().and_then(|v| v.parse::<u64>().ok()));
        let thread = us.map(|us| {
            let (k, s) = (self.backend.kicker(), stop.clone());
            std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_micros(us.max(1)));
                    if !s.load(Ordering::Relaxed) {
                        k();
                    }
                }
            })
        });
        StressKicks { stop, thread }
    }

    pub(crate) fn quit_flag(&self) -> Option<&Arc<AtomicBool>> {
        self.quit.as_ref()
    }

    fn drain_input(&mut self) {
        if let Some(rx) = &self.input {
            while let Ok(bytes) = rx.try_recv() {
                self.platform.push_console_input(&bytes);
            }
        }
    }

    /// Runs the guest until it exits, powers off, resets or dies.
    pub fn run(&mut self) -> Result<RunOutcome, VmError> {
        let timer = self.backend.kick_thread().and_then(|tid| {
            crate::host::signals::KickTimer::new(tid)
                .map_err(|e| tracing::debug!(%e, "no kick timer: a ticker thread kicks instead"))
                .ok()
        });
        let ticker = timer.is_none().then(|| Ticker::start(self.clock.clone(), self.backend.kicker()));
        // The deadline the timer is set for.
        let mut armed: Option<u64> = None;
        let mut backoff = KickBackoff::default();
        let _stress = self.start_stress_kicks(None);
        loop {
            let now = self.clock.now_ns();
            let waiting = self.platform.pending_interrupt();
            self.platform.poll_timers(now);
            backoff.observe(armed.is_some_and(|a| a <= now), !waiting && self.platform.pending_interrupt());
            self.drain_input();
            if self.quit.as_ref().is_some_and(|q| q.load(Ordering::SeqCst)) {
                return Ok(RunOutcome::Quit);
            }
            if let Some(outcome) = self.platform_outcome() {
                return Ok(outcome);
            }
            self.offer_interrupt()?;
            let deadline = backoff.arm(self.platform.next_deadline_ns(), self.clock.now_ns());
            if let Some(t) = &timer {
                if deadline != armed {
                    let after = deadline.map(|d| d.saturating_sub(self.clock.now_ns()));
                    t.set(after).map_err(|e| VmError::Stopped {
                        error: BackendError::Failed { backend: "run loop", what: e.to_string() },
                        state: self.backend.cpu_state().dump(),
                    })?;
                    armed = deadline;
                }
            } else if let Some(t) = &ticker {
                t.deadline.store(deadline.unwrap_or(u64::MAX), Ordering::Release);
                armed = deadline;
            }
            let exit = match self.backend.run_with_ports(&mut self.platform) {
                Ok(e) => e,
                Err(error) => return Err(VmError::Stopped { error, state: self.backend.cpu_state().dump() }),
            };
            if self.serve_access(exit) != Served::NotAnAccess {
                continue;
            }
            match exit {
                VmExit::IoIn { .. }
                | VmExit::IoOut { .. }
                | VmExit::MmioRead { .. }
                | VmExit::MmioWrite { .. }
                | VmExit::MsrRead { .. }
                | VmExit::MsrWrite { .. } => {}
                VmExit::Halt => {
                    self.halts += 1;
                    if !self.backend.interrupts_enabled() && !self.platform.pending_interrupt() {
                        return Ok(RunOutcome::HaltedWithInterruptsOff);
                    }
                    self.wait_for_event();
                }
                VmExit::Interrupted | VmExit::InterruptWindow => {}
                VmExit::TripleFault => return Ok(RunOutcome::TripleFault(self.backend.cpu_state().dump())),
            }
        }
    }

    /// What the guest asked the platform for (isa-debug-exit, power-off,
    /// reset), as the end of the run.
    pub(crate) fn platform_outcome(&mut self) -> Option<RunOutcome> {
        self.platform.take_events().into_iter().next().map(|ev| match ev {
            PlatformEvent::DebugExit(c) => RunOutcome::DebugExit(c),
            PlatformEvent::PowerOff => RunOutcome::PowerOff,
            PlatformEvent::Reset => RunOutcome::Reset,
        })
    }

    /// Injects the PIC's pending interrupt if the CPU can take it now, else
    /// asks the backend for an interrupt window. Returns the vector injected.
    pub(crate) fn offer_interrupt(&mut self) -> Result<Option<u8>, BackendError> {
        if !self.platform.pending_interrupt() {
            return Ok(None);
        }
        if !self.backend.interrupts_enabled() {
            self.backend.request_interrupt_window(true);
            return Ok(None);
        }
        let v = self.platform.acknowledge_interrupt();
        if let Some(v) = v {
            self.backend.inject_interrupt(v)?;
            self.interrupts_injected += 1;
        }
        self.backend.request_interrupt_window(false);
        Ok(v)
    }

    /// Serves a port or MMIO exit on the platform (completing reads).
    pub(crate) fn serve_access(&mut self, exit: VmExit) -> Served {
        match exit {
            VmExit::IoIn { port, size } => {
                let value = self.platform.io_in(port, size);
                self.backend.complete_io_in(value);
                Served::Port { port, size, write: false, value }
            }
            VmExit::IoOut { port, size, value } => {
                self.platform.io_out(port, size, value);
                Served::Port { port, size, write: true, value }
            }
            VmExit::MmioRead { addr, size } => {
                let mut b = [0u8; 8];
                self.platform.mmio_read(addr, &mut b[..usize::from(size).min(8)]);
                self.backend.complete_mmio_read(u64::from_le_bytes(b));
                Served::Mmio
            }
            VmExit::MmioWrite { addr, size, value } => {
                self.platform.mmio_write(addr, &value.to_le_bytes()[..usize::from(size).min(8)]);
                Served::Mmio
            }
            VmExit::MsrRead { index } => {
                let value = self.platform.msr_read(index);
                self.backend.complete_msr_read(value);
                Served::Msr
            }
            VmExit::MsrWrite { index, value, tsc } => {
                self.platform.msr_write(index, value, tsc);
                Served::Msr
            }
            _ => Served::NotAnAccess,
        }
    }

    /// HLT with interrupts enabled: sleep until the next timer deadline or
    /// console input, instead of spinning.
    fn wait_for_event(&mut self) {
        let now = self.clock.now_ns();
        self.platform.poll_timers(now);
        if self.platform.pending_interrupt() {
            return;
        }
        let wait = self.platform.next_deadline_ns().map_or(50_000_000, |d| d.saturating_sub(now)).min(50_000_000);
        let sleep = || std::thread::sleep(Duration::from_nanos(wait));
        match &self.input {
            Some(rx) => match rx.recv_timeout(Duration::from_nanos(wait)) {
                Ok(bytes) => self.platform.push_console_input(&bytes),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Input ended (EOF): stop listening.
                    self.input = None;
                    sleep();
                }
            },
            None => sleep(),
        }
    }

    /// Every counter: the backend's and the machine's, with stable names.
    pub fn stats(&self) -> Vec<(String, u64)> {
        let mut v = self.backend.stats();
        let p = self.platform.stats();
        v.push(("vm/interrupts_injected".into(), self.interrupts_injected));
        v.push(("vm/halts".into(), self.halts));
        v.push(("platform/pit_irq0_edges".into(), p.pit_irq0_edges));
        v.push(("platform/interrupts_acknowledged".into(), p.interrupts_acknowledged));
        v.extend(self.platform.virtio_stats().into_iter().map(|(k, n)| (format!("platform/{k}"), n)));
        v.sort();
        v
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    /// Useless deadlines are spaced out, doubling up to 1 ms; one that
    /// raises something ends it; far deadlines are never moved.
    #[test]
    fn kicks_for_nothing_back_off() {
        use super::KickBackoff;
        let mut b = KickBackoff::default();
        let now = 5_000_001;
        assert_eq!(b.arm(Some(now + 1), now), Some(now + 1), "no backoff yet");
        b.observe(false, false);
        assert_eq!(b.arm(Some(now + 1), now), Some(now + 1), "nothing was due");
        b.observe(true, false);
        assert_eq!(b.arm(Some(now + 1), now), Some(5_020_000), "10 µs on, on a 10 µs boundary");
        assert_eq!(b.arm(Some(now + 1), now + 3), Some(5_020_000), "the same time on the next pass");
        for _ in 0..20 {
            b.observe(true, false);
        }
        assert_eq!(b.arm(Some(now + 1), now), Some(7_000_000), "1 ms at most, on a 1 ms boundary");
        assert_eq!(b.arm(Some(now + 2_000_000), now), Some(now + 2_000_000));
        assert_eq!(b.arm(None, now), None);
        b.observe(true, true);
        assert_eq!(b.arm(Some(now + 1), now), Some(now + 1), "an interrupt ends the backoff");
    }

    use super::*;
    use crate::backend::fake::{FakeBackend, FakeLog, Scripted};
    use crate::devices::clock::ManualClock;
    use crate::devices::PlatformConfig;
    use crate::layout::{IRQ_COM1, PORT_COM1, PORT_DEBUG_EXIT, PORT_PIC_MASTER};

    /// What the platform's COM1 wrote.
    #[derive(Clone, Default)]
    pub(crate) struct Console(pub Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Console {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A machine whose CPU is `fake`, on a clock that stands still.
    pub(crate) fn machine(fake: FakeBackend) -> (Vm, Arc<Mutex<FakeLog>>, Console, ManualClock) {
        let mem = Arc::new(GuestMemory::new(crate::layout::MIN_GUEST_MEM).unwrap());
        let console = Console::default();
        let clock = ManualClock::new(0);
        let platform = Platform::new(PlatformConfig {
            ram_size: mem.size(),
            console: Box::new(console.clone()),
            clock: Arc::new(clock.clone()),
            wall_clock: Arc::new(ManualClock::new(0)),
        })
        .unwrap();
        let log = fake.log();
        (Vm::new(mem, platform, Box::new(fake), Arc::new(clock.clone())), log, console, clock)
    }

    fn out(port: u16, value: u32) -> Scripted {
        Scripted::exit(VmExit::IoOut { port, size: 1, value })
    }

    /// The guest's exit through isa-debug-exit with 0.
    fn debug_exit() -> Scripted {
        out(PORT_DEBUG_EXIT, 0)
    }

    /// The master PIC programmed as Linux does (vectors 0x20-0x27), only
    /// COM1's line unmasked.
    fn pic_setup() -> Vec<Scripted> {
        let data = PORT_PIC_MASTER + 1;
        let mask = 0xFF & !(1u32 << IRQ_COM1);
        vec![out(PORT_PIC_MASTER, 0x11), out(data, 0x20), out(data, 0x04), out(data, 0x01), out(data, mask)]
    }

    #[test]
    fn port_writes_reach_the_devices_and_debug_exit_ends_the_run() {
        let (mut vm, log, console, _) =
            machine(FakeBackend::new([out(PORT_COM1, u32::from(b'h')), out(PORT_COM1, u32::from(b'i')), debug_exit()]));
        assert_eq!(vm.run().unwrap(), RunOutcome::DebugExit(1));
        assert_eq!(console.0.lock().unwrap().as_slice(), b"hi");
        assert_eq!(log.lock().unwrap().runs, 3);
    }

    #[test]
    fn a_port_read_is_completed_with_the_device_value() {
        // IN from COM1's line status register: transmitter empty (0x60).
        let script = [Scripted::exit(VmExit::IoIn { port: PORT_COM1 + 5, size: 1 }), debug_exit()];
        let (mut vm, log, _, _) = machine(FakeBackend::new(script));
        vm.run().unwrap();
        assert_eq!(log.lock().unwrap().io_in, [0x60]);
    }

    #[test]
    fn mmio_reads_are_completed_and_writes_served() {
        // Nothing claims 0xFED0_0000: reads see open bus.
        let script = [
            Scripted::exit(VmExit::MmioRead { addr: 0xFED0_0000, size: 4 }),
            Scripted::exit(VmExit::MmioWrite { addr: 0xFED0_0000, size: 4, value: 7 }),
            debug_exit(),
        ];
        let (mut vm, log, _, _) = machine(FakeBackend::new(script));
        vm.run().unwrap();
        assert_eq!(log.lock().unwrap().mmio_reads, [0xFFFF_FFFF]);
        assert_eq!(vm.platform.stats().unclaimed_mmio.reads, 1);
    }

    #[test]
    fn hlt_with_interrupts_off_ends_the_run() {
        let (mut vm, _, _, _) = machine(FakeBackend::new([Scripted::exit(VmExit::Halt)]));
        assert_eq!(vm.run().unwrap(), RunOutcome::HaltedWithInterruptsOff);
        assert_eq!(vm.halts, 1);
    }

    #[test]
    fn a_pending_interrupt_waits_for_its_window() {
        // THR-empty interrupts on: IRQ4 is pending at once, but the CPU has
        // interrupts off, so the loop asks for a window and injects there.
        let mut script = pic_setup();
        script.push(out(PORT_COM1 + 1, 0x02));
        script.push(Scripted::exit(VmExit::InterruptWindow).interrupts_on());
        script.push(debug_exit());
        let (mut vm, log, _, _) = machine(FakeBackend::new(script));
        assert_eq!(vm.run().unwrap(), RunOutcome::DebugExit(1));
        let log = log.lock().unwrap();
        assert_eq!(log.windows.first(), Some(&true), "{log:?}");
        assert_eq!(log.injected, [0x20 + IRQ_COM1]);
        assert_eq!(vm.interrupts_injected, 1);
    }

    #[test]
    fn a_triple_fault_ends_the_run_with_the_cpu_state() {
        let (mut vm, _, _, _) = machine(FakeBackend::new([Scripted::exit(VmExit::TripleFault)]));
        let RunOutcome::TripleFault(state) = vm.run().unwrap() else { panic!("not a triple fault") };
        assert!(state.contains("EIP="), "{state}");
    }

    #[test]
    fn interrupted_runs_go_on_and_a_quit_stops() {
        let script = [Scripted::exit(VmExit::Interrupted), Scripted::exit(VmExit::Interrupted), debug_exit()];
        let (mut vm, log, _, _) = machine(FakeBackend::new(script));
        assert_eq!(vm.run().unwrap(), RunOutcome::DebugExit(1));
        assert_eq!(log.lock().unwrap().runs, 3);
        let (mut vm, log, _, _) = machine(FakeBackend::new([Scripted::exit(VmExit::Interrupted)]));
        vm.set_quit(Arc::new(AtomicBool::new(true)));
        assert_eq!(vm.run().unwrap(), RunOutcome::Quit);
        assert_eq!(log.lock().unwrap().runs, 0);
    }

    #[test]
    fn a_backend_error_stops_the_run_with_the_cpu_state() {
        let err = BackendError::Failed { backend: "fake", what: "boom".into() };
        let (mut vm, _, _, _) = machine(FakeBackend::new([Scripted::error(err)]));
        match vm.run() {
            Err(VmError::Stopped { error, state }) => {
                assert!(error.to_string().contains("boom"));
                assert!(state.contains("EIP="));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn trait_methods_a_backend_lacks_are_errors() {
        let mut fake = FakeBackend::new([]);
        assert!(matches!(fake.set_stop(Some(1), None), Err(BackendError::Unsupported { .. })));
        assert!(matches!(fake.skip_time(1), Err(BackendError::Unsupported { .. })));
        assert!(matches!(fake.read_linear(0, &mut [0; 4]), Err(BackendError::Unsupported { .. })));
    }

    #[test]
    fn exit_codes_follow_the_guest() {
        assert_eq!(RunOutcome::DebugExit(1).exit_code(), 0, "guest wrote 0");
        assert_eq!(RunOutcome::DebugExit((42 << 1) | 1).exit_code(), 42);
        assert_eq!(RunOutcome::TripleFault(String::new()).exit_code(), 3);
        assert_eq!(RunOutcome::HaltedWithInterruptsOff.exit_code(), 0);
    }
}
