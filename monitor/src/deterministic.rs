//! The deterministic mode: the run loop of record and replay.
//!
//! The guest's whole execution is a function of its instruction count:
//! the bt backend counts retired instructions exactly (every block entry
//! charges its length to a budget, docs/translator.md "Counting"), stops at
//! exact counts, and virtual time ([`VirtualTime`]) drives the PIT, the RTC
//! and RDTSC. What the host contributes (console bytes) enters only at
//! *designated points* whose counts are fixed by the guest alone:
//!
//! - every `input_quantum` instructions (the first loop turn at or after the
//!   count — the backend stops there exactly), and
//! - at each HLT (one per count: the HLT retires).
//!
//! A [`Session`] is told about each point and each observable event: the
//! recorder writes them to a trace, the replayer feeds the recorded input
//! back and checks everything else (docs/record-replay.md).

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

pub use self::events::{Checkpoint, End, Event, InputPoint, MemoryDigest, Regs};
use crate::backend::{BackendError, VmExit};
use crate::cpu::Cpu;
use crate::devices::clock::ManualClock;
use crate::vm::{RunOutcome, Served, Vm};

/// What a deterministic run produces, at instruction counts: the vocabulary
/// of traces (`trace::format` stores it, docs/trace-format.md).
pub mod events {
    /// Where console input entered.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum InputPoint {
        /// At an input-quantum boundary.
        Quantum,
        /// While the guest was halted.
        Halt,
    }

    /// The architectural registers a checkpoint records.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Regs {
        /// EAX ECX EDX EBX ESP EBP ESI EDI.
        pub gpr: [u32; 8],
        pub eip: u32,
        pub eflags: u32,
        /// ES CS SS DS FS GS.
        pub sel: [u16; 6],
        pub cr0: u32,
        pub cr2: u32,
        pub cr3: u32,
        pub cr4: u32,
    }

    /// A digest of guest memory.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct MemoryDigest {
        /// Hash of all of guest memory.
        pub whole: u64,
        /// (page number, 32-bit page hash) of the pages changed since the previous memory digest (in
        /// the first digest: every page with nonzero content), strictly increasing by page number.
        pub pages: Vec<(u32, u32)>,
    }

    /// Machine state at an instruction count.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Checkpoint {
        pub count: u64,
        pub regs: Regs,
        /// Console output bytes so far.
        pub console_len: u64,
        /// Hash of the console output so far.
        pub console_hash: u64,
        pub memory: Option<MemoryDigest>,
    }

    /// How and where the recording stopped; the last event of a complete trace.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct End {
        pub count: u64,
        pub outcome: String,
        pub regs: Regs,
        pub console_len: u64,
        pub console_hash: u64,
    }

    /// One trace event, at an instruction count.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Event {
        /// Console bytes given to the UART.
        Input {
            count: u64,
            point: InputPoint,
            bytes: Vec<u8>,
        },
        /// External interrupt injected.
        Interrupt {
            count: u64,
            vector: u8,
        },
        /// Port access (verification stream).
        Io {
            count: u64,
            port: u16,
            size: u8,
            write: bool,
            value: u32,
        },
        Checkpoint(Checkpoint),
        End(End),
    }

    impl Event {
        /// The guest instruction count the event happened at.
        pub fn count(&self) -> u64 {
            match self {
                Event::Input { count, .. } | Event::Interrupt { count, .. } | Event::Io { count, .. } => *count,
                Event::Checkpoint(c) => c.count,
                Event::End(e) => e.count,
            }
        }
    }
}

/// How often the loop stops for checkpoints and input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetOptions {
    /// Instructions between register checkpoints.
    pub checkpoint_every: u64,
    /// Instructions between memory digests (taken at a checkpoint).
    pub memory_every: u64,
    /// Instructions between the points where console input may enter.
    pub input_quantum: u64,
    /// Stop at this instruction count and report the state.
    pub until: Option<u64>,
    /// No checkpoints before this count (the localizer's fine windows).
    pub checkpoint_from: u64,
    /// Test aid: kick the vCPU every this many µs (kicks must not change
    /// anything the guest sees).
    pub stress_kick_us: Option<u64>,
}

impl Default for DetOptions {
    fn default() -> Self {
        DetOptions {
            checkpoint_every: 4_000_000,
            memory_every: 1_000_000_000,
            input_quantum: 1_000_000,
            until: None,
            checkpoint_from: 0,
            stress_kick_us: None,
        }
    }
}

/// How long the recorder may wait for console input at a HLT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    No,
    /// The guest sleeps this long (virtual time to its next timer).
    Upto(Duration),
    /// Nothing else can wake the guest.
    Forever,
}

#[derive(Debug, Error)]
pub enum DetError {
    #[error("the {0} backend cannot count instructions (the deterministic mode needs bt)")]
    NotCounting(&'static str),
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The replay left the recorded execution at instruction `at`; the
    /// registers last agreed at `last_good` (a checkpoint); the report says how.
    #[error("{report}")]
    Diverged { at: u64, last_good: u64, report: String },
    #[error("trace: {0}")]
    Trace(String),
}

/// What a deterministic run hears about: the recorder or the replayer.
pub trait Session {
    /// Console input entering at this designated point.
    fn input(&mut self, count: u64, point: InputPoint, wait: Wait) -> Result<Vec<u8>, DetError>;
    /// A port access, an injected interrupt: stored or checked.
    fn observe(&mut self, event: Event) -> Result<(), DetError>;
    /// A checkpoint with the full page-hash map behind its memory digest.
    fn checkpoint(&mut self, cp: Checkpoint, pages: &PageHashes) -> Result<(), DetError>;
    /// The run ended (the guest's end, `--until`, or the user quit).
    fn end(&mut self, end: End) -> Result<(), DetError>;
    /// A count the run must stop at besides the designated points (the
    /// replayer: the recorded end).
    fn stop_hint(&self) -> Option<u64> {
        None
    }
}

/// How a deterministic run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DetOutcome {
    Finished(RunOutcome),
    /// Reached `--until`/the recorded end: the state there, and the code
    /// at EIP.
    Stopped {
        code: String,
        count: u64,
        state: String,
    },
}

/// Everything the guest wrote to its console, as a length and a hash
/// (checkpoints compare it), optionally kept in full.
#[derive(Clone, Debug, Default)]
pub struct ConsoleLog {
    pub len: u64,
    pub hash: u64,
    pub bytes: Vec<u8>,
}

/// A console writer that feeds a [`ConsoleLog`] on its way to `inner`.
pub struct ConsoleTap {
    inner: Box<dyn Write + Send>,
    log: Arc<Mutex<ConsoleLog>>,
}

impl ConsoleTap {
    pub fn new(inner: Box<dyn Write + Send>) -> (ConsoleTap, Arc<Mutex<ConsoleLog>>) {
        let log = Arc::new(Mutex::new(ConsoleLog { hash: FNV_OFFSET, ..ConsoleLog::default() }));
        (ConsoleTap { inner, log: log.clone() }, log)
    }
}

impl Write for ConsoleTap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Ok(mut l) = self.log.lock() {
            l.len += n as u64;
            l.hash = fnv1a(l.hash, &buf[..n]);
            l.bytes.extend_from_slice(&buf[..n]);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// 32-bit hash of one 4 KiB page (four independent lanes of 64-bit
/// multiply-xorshift, folded): memory digests hash all of guest RAM.
pub fn page_hash(page: &[u8]) -> u32 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut lanes = [1u64, 2, 3, 4];
    for chunk in page.chunks_exact(32) {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(chunk[i * 8..i * 8 + 8].try_into().unwrap_or_default());
            *lane = (*lane ^ w).wrapping_mul(K);
            *lane ^= *lane >> 29;
        }
    }
    let h = lanes.iter().fold(0u64, |a, &l| (a ^ l).wrapping_mul(K).rotate_left(23));
    (h ^ (h >> 32)) as u32
}

/// The hash of every guest page at the last memory digest.
#[derive(Clone, Debug, Default)]
pub struct PageHashes {
    pub pages: std::collections::BTreeMap<u32, u32>,
}

impl PageHashes {
    /// Hashes guest RAM; returns the digest of what changed since the last
    /// call (zero pages are left out of the first one).
    pub fn update(&mut self, ram: &[u8]) -> MemoryDigest {
        let zero = page_hash(&[0u8; 4096]);
        let mut changed = Vec::new();
        let mut whole = FNV_OFFSET;
        for (i, page) in ram.chunks(4096).enumerate() {
            let h = page_hash(page);
            whole = (whole ^ u64::from(h)).wrapping_mul(0x100_0000_01b3);
            let old = self.pages.get(&(i as u32)).copied().unwrap_or(zero);
            if old != h {
                changed.push((i as u32, h));
                self.pages.insert(i as u32, h);
            }
        }
        MemoryDigest { whole, pages: changed }
    }
}

/// The registers a checkpoint keeps.
pub fn regs_of(cpu: &Cpu) -> Regs {
    Regs {
        gpr: cpu.gpr,
        eip: cpu.eip,
        eflags: cpu.eflags,
        sel: std::array::from_fn(|i| cpu.seg[i].selector),
        cr0: cpu.cr0,
        cr2: cpu.cr2,
        cr3: cpu.cr3,
        cr4: cpu.cr4,
    }
}

impl Vm {
    /// Runs the guest deterministically until it ends, `opts.until`, or the
    /// session stops it (a divergence). `clock` is the platform's clock.
    pub fn run_deterministic(
        &mut self,
        clock: &ManualClock,
        console: &Arc<Mutex<ConsoleLog>>,
        session: &mut dyn Session,
        opts: &DetOptions,
    ) -> Result<DetOutcome, DetError> {
        let name = self.backend.name();
        let mut count = self.backend.instruction_count().ok_or(DetError::NotCounting(name))?;
        let every = opts.checkpoint_every.max(1);
        let quantum = opts.input_quantum.max(1);
        let mut next_cp = opts.checkpoint_from;
        let mut next_mem = 0u64;
        let mut next_input = quantum;
        let mut pages = PageHashes::default();
        let _stress = self.start_stress_kicks(opts.stress_kick_us);
        let outcome = loop {
            let now = self.backend.virtual_ns().unwrap_or(count);
            clock.set(now);
            self.platform.poll_timers(now);
            if count >= next_cp {
                let memory = (count >= next_mem).then(|| {
                    next_mem = (count / opts.memory_every.max(1) + 1) * opts.memory_every.max(1);
                    pages.update(self.mem.slice(0, self.mem.size()).unwrap_or_default())
                });
                let cp = self.checkpoint(count, console, memory);
                session.checkpoint(cp, &pages)?;
                next_cp = (count / every + 1) * every;
            }
            if count >= next_input {
                let bytes = session.input(count, InputPoint::Quantum, Wait::No)?;
                if !bytes.is_empty() {
                    self.platform.push_console_input(&bytes);
                }
                next_input = (count / quantum + 1) * quantum;
            }
            if let Some(outcome) = self.platform_outcome() {
                break DetOutcome::Finished(outcome);
            }
            if let Some(stop) = opts.until.into_iter().chain(session.stop_hint()).min() {
                if count >= stop {
                    let cpu = self.backend.cpu_state();
                    let code = self.disassemble_at(cpu.eip, 4);
                    break DetOutcome::Stopped { count, state: cpu.dump(), code };
                }
            }
            if self.quit_requested() {
                break DetOutcome::Finished(RunOutcome::Quit);
            }
            if let Some(vector) = self.offer_interrupt()? {
                session.observe(Event::Interrupt { count, vector })?;
            }
            let mut stop = next_cp.min(next_input);
            for s in opts.until.into_iter().chain(session.stop_hint()) {
                stop = stop.min(s);
            }
            let deadline = self.platform.next_deadline_ns().filter(|&d| d > now);
            tracing::trace!(target: "popek::det", count, now, ?deadline, stop, "run");
            self.backend.set_stop(Some(stop.max(count + 1)), deadline)?;
            let exit = self.backend.run()?;
            count = self.backend.instruction_count().ok_or(DetError::NotCounting(name))?;
            clock.set(self.backend.virtual_ns().unwrap_or(count));
            match self.serve_access(exit) {
                Served::Port { port, size, write, value } => {
                    session.observe(Event::Io { count, port, size, write, value })?;
                    continue;
                }
                Served::Mmio | Served::Msr => continue,
                Served::NotAnAccess => {}
            }
            match exit {
                VmExit::Halt => {
                    self.halts += 1;
                    if !self.backend.interrupts_enabled() && !self.platform.pending_interrupt() {
                        break DetOutcome::Finished(RunOutcome::HaltedWithInterruptsOff);
                    }
                    if let Some(o) = self.idle(count, session)? {
                        break DetOutcome::Finished(o);
                    }
                }
                VmExit::TripleFault => {
                    break DetOutcome::Finished(RunOutcome::TripleFault(self.backend.cpu_state().dump()));
                }
                _ => {}
            }
        };
        // A last checkpoint with memory: the end state is verified whole.
        let cp =
            self.checkpoint(count, console, Some(pages.update(self.mem.slice(0, self.mem.size()).unwrap_or_default())));
        session.checkpoint(cp, &pages)?;
        let cpu = self.backend.cpu_state();
        let log = console.lock().map(|l| l.clone()).unwrap_or_default();
        let text = match &outcome {
            DetOutcome::Finished(o) => o.to_string(),
            DetOutcome::Stopped { .. } => "stopped".to_string(),
        };
        let text = text.lines().next().unwrap_or_default().trim_end_matches("; CPU state:").to_string();
        session.end(End { count, outcome: text, regs: regs_of(&cpu), console_len: log.len, console_hash: log.hash })?;
        Ok(outcome)
    }

    /// A HLT at `count` (a designated point): console input may enter; else
    /// virtual time skips to the next timer. `Some` when nothing can ever
    /// wake the guest.
    fn idle(&mut self, count: u64, session: &mut dyn Session) -> Result<Option<RunOutcome>, DetError> {
        let now = self.backend.virtual_ns().unwrap_or(count);
        self.platform.poll_timers(now);
        let deadline = self.platform.next_deadline_ns();
        let wait = match deadline {
            _ if self.platform.pending_interrupt() => Wait::No,
            Some(d) => Wait::Upto(Duration::from_nanos(d.saturating_sub(now).min(50_000_000))),
            None => Wait::Forever,
        };
        let bytes = session.input(count, InputPoint::Halt, wait)?;
        if !bytes.is_empty() {
            self.platform.push_console_input(&bytes);
        }
        if self.platform.pending_interrupt() {
            return Ok(None);
        }
        match deadline {
            Some(d) if d > now => {
                self.backend.skip_time(d - now)?;
                Ok(None)
            }
            Some(_) => Ok(None),
            None if bytes.is_empty() => Ok(Some(RunOutcome::Idle)),
            None => Ok(None),
        }
    }

    fn checkpoint(&mut self, count: u64, console: &Arc<Mutex<ConsoleLog>>, memory: Option<MemoryDigest>) -> Checkpoint {
        let cpu = self.backend.cpu_state();
        let (console_len, console_hash) = console.lock().map(|l| (l.len, l.hash)).unwrap_or_default();
        Checkpoint { count, regs: regs_of(&cpu), console_len, console_hash, memory }
    }

    fn quit_requested(&self) -> bool {
        self.quit_flag().is_some_and(|q| q.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::{FakeBackend, Scripted};
    use crate::layout::{PORT_COM1, PORT_DEBUG_EXIT};
    use crate::vm::tests::machine;

    /// A session that keeps what it hears.
    #[derive(Default)]
    struct Heard {
        events: Vec<Event>,
        checkpoints: Vec<u64>,
        end: Option<End>,
    }

    impl Session for Heard {
        fn input(&mut self, _count: u64, _point: InputPoint, _wait: Wait) -> Result<Vec<u8>, DetError> {
            Ok(Vec::new())
        }
        fn observe(&mut self, event: Event) -> Result<(), DetError> {
            self.events.push(event);
            Ok(())
        }
        fn checkpoint(&mut self, cp: Checkpoint, _pages: &PageHashes) -> Result<(), DetError> {
            self.checkpoints.push(cp.count);
            Ok(())
        }
        fn end(&mut self, end: End) -> Result<(), DetError> {
            self.end = Some(end);
            Ok(())
        }
    }

    fn run(
        fake: FakeBackend,
        opts: &DetOptions,
    ) -> (Result<DetOutcome, DetError>, Heard, crate::backend::fake::FakeLog) {
        let (mut vm, log, console, clock) = machine(fake);
        let (tap, console_log) = ConsoleTap::new(Box::new(console));
        // The platform writes to its own console; the tap only counts here.
        drop(tap);
        let mut heard = Heard::default();
        let r = vm.run_deterministic(&clock, &console_log, &mut heard, opts);
        let log = log.lock().unwrap().clone();
        (r, heard, log)
    }

    #[test]
    fn port_accesses_are_observed_at_their_instruction_counts() {
        let script = [
            Scripted::exit(VmExit::IoOut { port: PORT_COM1, size: 1, value: u32::from(b'x') }).after(10),
            Scripted::exit(VmExit::IoIn { port: PORT_COM1 + 5, size: 1 }).after(5),
            Scripted::exit(VmExit::IoOut { port: PORT_DEBUG_EXIT, size: 1, value: 0 }).after(2),
        ];
        let (r, heard, log) = run(FakeBackend::new(script).counting(), &DetOptions::default());
        assert_eq!(r.unwrap(), DetOutcome::Finished(RunOutcome::DebugExit(1)));
        let io: Vec<_> = heard.events.iter().map(|e| (e.count(), e.clone())).collect();
        assert_eq!(
            io,
            [
                (10, Event::Io { count: 10, port: PORT_COM1, size: 1, write: true, value: u32::from(b'x') }),
                (15, Event::Io { count: 15, port: PORT_COM1 + 5, size: 1, write: false, value: 0x60 }),
                (17, Event::Io { count: 17, port: PORT_DEBUG_EXIT, size: 1, write: true, value: 0 }),
            ]
        );
        // A checkpoint at the start and one at the end; every run had a stop.
        assert_eq!(heard.checkpoints, [0, 17]);
        assert_eq!(heard.end.unwrap().count, 17);
        assert_eq!(log.stops.len(), 3);
        assert!(log.stops.iter().all(|(count, _)| count.is_some()));
    }

    #[test]
    fn halts_and_triple_faults_end_the_deterministic_run() {
        let (r, heard, _) =
            run(FakeBackend::new([Scripted::exit(VmExit::Halt).after(3)]).counting(), &DetOptions::default());
        assert_eq!(r.unwrap(), DetOutcome::Finished(RunOutcome::HaltedWithInterruptsOff));
        assert!(heard.end.unwrap().outcome.contains("interrupts disabled"));
        let (r, _, _) = run(FakeBackend::new([Scripted::exit(VmExit::TripleFault)]).counting(), &DetOptions::default());
        assert!(matches!(r.unwrap(), DetOutcome::Finished(RunOutcome::TripleFault(_))));
    }

    #[test]
    fn the_run_stops_at_until() {
        let script = [Scripted::exit(VmExit::Interrupted).after(40), Scripted::exit(VmExit::Interrupted).after(60)];
        let opts = DetOptions { until: Some(100), ..DetOptions::default() };
        let (r, _, log) = run(FakeBackend::new(script).counting(), &opts);
        assert!(matches!(r.unwrap(), DetOutcome::Stopped { count: 100, .. }));
        assert_eq!(log.stops[0], (Some(100), None));
    }

    #[test]
    fn a_backend_that_does_not_count_is_refused() {
        let (r, _, _) = run(FakeBackend::new([]), &DetOptions::default());
        assert!(matches!(r, Err(DetError::NotCounting("fake"))));
    }

    #[test]
    fn page_hashes_report_changed_pages_only() {
        let mut ram = vec![0u8; 4096 * 8];
        let mut p = PageHashes::default();
        ram[4096 * 3] = 1;
        let d = p.update(&ram);
        assert_eq!(d.pages.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3], "only the nonzero page");
        let d2 = p.update(&ram);
        assert!(d2.pages.is_empty());
        assert_eq!(d.whole, d2.whole);
        ram[4096 * 5 + 100] = 7;
        let d3 = p.update(&ram);
        assert_eq!(d3.pages.iter().map(|x| x.0).collect::<Vec<_>>(), vec![5]);
        assert_ne!(d3.whole, d2.whole);
    }

    #[test]
    fn page_hash_sees_every_byte() {
        let base = [0u8; 4096];
        let h0 = page_hash(&base);
        for i in [0usize, 1, 7, 8, 31, 32, 2048, 4095] {
            let mut p = base;
            p[i] = 0x80;
            assert_ne!(page_hash(&p), h0, "byte {i}");
        }
    }
}
