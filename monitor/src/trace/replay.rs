//! The replayer: a deterministic run's [`Session`] that feeds the recorded
//! console input back at the recorded counts and checks everything else the
//! run does against the trace, stopping at the first divergence.

use std::collections::VecDeque;

use crate::deterministic::{DetError, PageHashes, Session, Wait};
use crate::trace::diff::{compare_checkpoint, PageMap};
use crate::trace::format::{Checkpoint, End, Event, InputPoint, Trace};

/// What a replay verified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verified {
    pub checkpoints: u64,
    pub memory_digests: u64,
    pub port_accesses: u64,
    pub interrupts: u64,
    pub inputs: u64,
    pub end: bool,
}

/// Replays one trace.
pub struct Replayer {
    inputs: VecDeque<(u64, InputPoint, Vec<u8>)>,
    /// Port accesses and interrupts, in recorded order.
    observed: VecDeque<Event>,
    checkpoints: VecDeque<Checkpoint>,
    expected_pages: PageMap,
    end: Option<End>,
    last_good: u64,
    /// The last count at which a checkpoint (registers) agreed.
    registers_good: u64,
    pub verified: Verified,
}

impl Replayer {
    pub fn new(trace: &Trace) -> Replayer {
        let mut r = Replayer {
            inputs: VecDeque::new(),
            observed: VecDeque::new(),
            checkpoints: VecDeque::new(),
            expected_pages: PageMap::default(),
            end: None,
            last_good: 0,
            registers_good: 0,
            verified: Verified::default(),
        };
        for e in &trace.events {
            match e {
                Event::Input { count, point, bytes } => r.inputs.push_back((*count, *point, bytes.clone())),
                Event::Io { .. } | Event::Interrupt { .. } => r.observed.push_back(e.clone()),
                Event::Checkpoint(c) => r.checkpoints.push_back(c.clone()),
                Event::End(end) => r.end = Some(end.clone()),
            }
        }
        r
    }

    /// The recorded end, if the trace has one.
    pub fn recorded_end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// The last instruction count at which everything still agreed.
    pub fn last_good(&self) -> u64 {
        self.last_good
    }

    fn diverged(&self, count: u64, what: String) -> DetError {
        DetError::Diverged {
            at: count,
            last_good: self.registers_good,
            report: format!(
                "replay diverged at instruction {count} (everything agreed up to {}):\n{what}",
                self.last_good
            ),
        }
    }
}

fn describe(e: &Event) -> String {
    match e {
        Event::Io { count, port, size, write, value } => {
            let dir = if *write { "out" } else { "in" };
            format!("{dir} port {port:#x} size {size} value {value:#x} at instruction {count}")
        }
        Event::Interrupt { count, vector } => format!("interrupt vector {vector:#x} injected at instruction {count}"),
        other => format!("{other:?}"),
    }
}

impl Session for Replayer {
    fn input(&mut self, count: u64, point: InputPoint, _wait: Wait) -> Result<Vec<u8>, DetError> {
        let mut bytes = Vec::new();
        while let Some((c, p, b)) = self.inputs.front() {
            if *c < count {
                let msg = format!("console input recorded at instruction {c} ({p:?}) was never reached");
                return Err(self.diverged(count, msg));
            }
            if *c > count || *p != point {
                break;
            }
            bytes.extend_from_slice(b);
            self.inputs.pop_front();
            self.verified.inputs += 1;
        }
        Ok(bytes)
    }

    fn observe(&mut self, event: Event) -> Result<(), DetError> {
        let count = event.count();
        match self.observed.pop_front() {
            Some(expected) if expected == event => {
                match event {
                    Event::Io { .. } => self.verified.port_accesses += 1,
                    _ => self.verified.interrupts += 1,
                }
                self.last_good = count;
                Ok(())
            }
            Some(expected) => {
                let msg = format!("recorded: {}\nreplayed: {}", describe(&expected), describe(&event));
                Err(self.diverged(count.min(expected.count()), msg))
            }
            None => {
                Err(self.diverged(count, format!("the recording has no more events; replayed: {}", describe(&event))))
            }
        }
    }

    fn checkpoint(&mut self, cp: Checkpoint, pages: &PageHashes) -> Result<(), DetError> {
        let Some(front) = self.checkpoints.front() else { return Ok(()) };
        if front.count < cp.count {
            let msg =
                format!("the recording has a checkpoint at instruction {} the replay never stopped at", front.count);
            return Err(self.diverged(cp.count, msg));
        }
        if front.count > cp.count {
            return Ok(());
        }
        let expected = self.checkpoints.pop_front().unwrap_or_default();
        if let Some(m) = &expected.memory {
            self.expected_pages.apply(m);
        }
        let compare_memory = expected.memory.is_some() && cp.memory.is_some();
        let empty = std::collections::BTreeMap::new();
        let (ep, ap) = if compare_memory { (self.expected_pages.pages(), &pages.pages) } else { (&empty, &empty) };
        let diffs = compare_checkpoint(&expected, &cp, ep, ap);
        if !diffs.is_empty() {
            let msg =
                format!("checkpoint at instruction {} (EIP {:#x}):\n  {}", cp.count, cp.regs.eip, diffs.join("\n  "));
            return Err(self.diverged(cp.count, msg));
        }
        self.verified.checkpoints += 1;
        if compare_memory {
            self.verified.memory_digests += 1;
        }
        self.last_good = cp.count;
        self.registers_good = cp.count;
        Ok(())
    }

    fn end(&mut self, end: End) -> Result<(), DetError> {
        if let Some(e) = self.observed.front() {
            let msg = format!("the replay ended ({}) before this recorded event: {}", end.outcome, describe(e));
            return Err(self.diverged(end.count, msg));
        }
        let Some(expected) = self.end.clone() else {
            return Ok(());
        };
        let mut diffs = Vec::new();
        if expected.count != end.count {
            diffs.push(format!("ended at instruction {} (recorded: {})", end.count, expected.count));
        }
        if expected.console_len != end.console_len || expected.console_hash != end.console_hash {
            diffs.push(format!(
                "console output: {} bytes hash {:#x} (recorded: {} bytes hash {:#x})",
                end.console_len, end.console_hash, expected.console_len, expected.console_hash
            ));
        }
        if expected.regs != end.regs {
            diffs.push(format!("registers at the end differ: {:x?} (recorded: {:x?})", end.regs, expected.regs));
        }
        if !diffs.is_empty() {
            return Err(self.diverged(end.count, diffs.join("\n")));
        }
        self.verified.end = true;
        self.last_good = end.count;
        Ok(())
    }

    fn stop_hint(&self) -> Option<u64> {
        self.end.as_ref().map(|e| e.count)
    }
}
