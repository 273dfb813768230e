//! A scripted CPU: `run` replays [`VmExit`]s given in advance, so the run
//! loops ([`crate::vm::Vm::run`], the deterministic loop) can be tested
//! without a guest or a host execution environment, in the manner of
//! Firecracker's `handle_kvm_exit` tests. What the loop did to the CPU
//! (completed reads, injected interrupts, window requests, stops) is kept
//! in a [`FakeLog`] the test holds on to.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::{Backend, BackendError, Kick, VmExit};
use crate::cpu::Cpu;

/// One scripted return of `run`.
#[derive(Debug)]
pub struct Scripted {
    /// What `run` returns.
    pub exit: Result<VmExit, BackendError>,
    /// Guest instructions retired before it (the counting mode).
    pub insns: u64,
    /// Whether the CPU takes interrupts after it (IF=1, no shadow).
    pub interrupts_enabled: bool,
}

impl Scripted {
    /// `exit` after one instruction, interrupts disabled.
    pub fn exit(exit: VmExit) -> Scripted {
        Scripted { exit: Ok(exit), insns: 1, interrupts_enabled: false }
    }

    /// A backend failure.
    pub fn error(error: BackendError) -> Scripted {
        Scripted { exit: Err(error), insns: 0, interrupts_enabled: false }
    }

    /// After `n` instructions.
    pub fn after(mut self, n: u64) -> Scripted {
        self.insns = n;
        self
    }

    /// With interrupts enabled from then on.
    pub fn interrupts_on(mut self) -> Scripted {
        self.interrupts_enabled = true;
        self
    }
}

/// What the run loop did to the fake CPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeLog {
    /// `run` calls.
    pub runs: usize,
    /// Values completing `IN`s.
    pub io_in: Vec<u32>,
    /// Values completing MMIO reads.
    pub mmio_reads: Vec<u64>,
    /// Vectors injected.
    pub injected: Vec<u8>,
    /// Interrupt-window requests, in order.
    pub windows: Vec<bool>,
    /// `set_stop` calls (count, guest ns).
    pub stops: Vec<(Option<u64>, Option<u64>)>,
    /// Guest time skipped (ns).
    pub skipped_ns: u64,
    /// Kicks.
    pub kicks: usize,
}

/// The scripted CPU.
pub struct FakeBackend {
    script: VecDeque<Scripted>,
    cpu: Cpu,
    interrupts_enabled: bool,
    /// Instructions retired: `Some` in the counting mode.
    count: Option<u64>,
    log: Arc<Mutex<FakeLog>>,
}

impl FakeBackend {
    /// A CPU that returns `script`, one step per `run`, then fails.
    pub fn new(script: impl IntoIterator<Item = Scripted>) -> FakeBackend {
        FakeBackend {
            script: script.into_iter().collect(),
            cpu: Cpu::flat_protected(0x08, 0x10),
            interrupts_enabled: false,
            count: None,
            log: Arc::default(),
        }
    }

    /// Counting instructions (the deterministic mode's backend).
    pub fn counting(mut self) -> FakeBackend {
        self.count = Some(0);
        self
    }

    /// The log the run loop's calls go to.
    pub fn log(&self) -> Arc<Mutex<FakeLog>> {
        self.log.clone()
    }

    fn note(&self, f: impl FnOnce(&mut FakeLog)) {
        f(&mut self.log.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn unsupported(what: &str) -> BackendError {
        BackendError::Unsupported { backend: "fake", what: what.into() }
    }
}

impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn run(&mut self) -> Result<VmExit, BackendError> {
        self.note(|l| l.runs += 1);
        let step = self
            .script
            .pop_front()
            .ok_or_else(|| BackendError::Failed { backend: "fake", what: "the script ended".into() })?;
        if let Some(c) = self.count.as_mut() {
            *c += step.insns;
        }
        self.interrupts_enabled = step.interrupts_enabled;
        step.exit
    }

    fn complete_io_in(&mut self, value: u32) {
        self.note(|l| l.io_in.push(value));
    }

    fn complete_mmio_read(&mut self, value: u64) {
        self.note(|l| l.mmio_reads.push(value));
    }

    fn interrupts_enabled(&self) -> bool {
        self.interrupts_enabled
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<(), BackendError> {
        self.note(|l| l.injected.push(vector));
        Ok(())
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.note(|l| l.windows.push(on));
    }

    fn kicker(&self) -> Kick {
        let log = self.log.clone();
        Arc::new(move || log.lock().unwrap_or_else(|e| e.into_inner()).kicks += 1)
    }

    fn cpu_state(&mut self) -> Cpu {
        self.cpu.clone()
    }

    fn stats(&self) -> Vec<(String, u64)> {
        vec![("fake/runs".into(), self.log.lock().map_or(0, |l| l.runs as u64))]
    }

    fn instruction_count(&self) -> Option<u64> {
        self.count
    }

    fn virtual_ns(&self) -> Option<u64> {
        let skipped = self.log.lock().map_or(0, |l| l.skipped_ns);
        self.count.map(|c| c + skipped)
    }

    fn set_stop(&mut self, count: Option<u64>, ns: Option<u64>) -> Result<(), BackendError> {
        if self.count.is_none() {
            return Err(Self::unsupported("stops outside the counting mode"));
        }
        self.note(|l| l.stops.push((count, ns)));
        Ok(())
    }

    fn skip_time(&mut self, ns: u64) -> Result<(), BackendError> {
        if self.count.is_none() {
            return Err(Self::unsupported("virtual time outside the counting mode"));
        }
        self.note(|l| l.skipped_ns += ns);
        Ok(())
    }
}
