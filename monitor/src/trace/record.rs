//! The recorder: a deterministic run's [`Session`] that writes every
//! nondeterministic input and every checkpoint to a trace file.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};

use crate::deterministic::{DetError, PageHashes, Session, Wait};
use crate::trace::format::{Checkpoint, End, Event, Header, InputPoint, TraceWriter};

/// Writes a trace while the guest runs (or, without a trace, only hands
/// console input to the deterministic loop at its designated points).
pub struct Recorder {
    writer: Option<TraceWriter>,
    input: Option<Receiver<Vec<u8>>>,
    /// Bytes of console input recorded.
    pub input_bytes: u64,
    /// Bytes the finished trace takes on disk.
    pub trace_bytes: u64,
    checkpoints: u64,
}

fn trace_err(e: impl std::fmt::Display) -> DetError {
    DetError::Trace(e.to_string())
}

impl Recorder {
    /// Starts a trace at `path`; console input comes from `input` (the
    /// console thread), if any.
    pub fn create(
        path: &std::path::Path,
        header: &Header,
        input: Option<Receiver<Vec<u8>>>,
    ) -> Result<Recorder, DetError> {
        let writer =
            TraceWriter::create(path, header).map_err(|e| DetError::Trace(format!("{}: {e}", path.display())))?;
        Ok(Recorder { writer: Some(writer), input, input_bytes: 0, trace_bytes: 0, checkpoints: 0 })
    }

    /// Console input from `rx` from now on (the console thread starts after
    /// the trace file is open and the jail closed).
    pub fn set_input(&mut self, rx: Option<Receiver<Vec<u8>>>) {
        if rx.is_some() {
            self.input = rx;
        }
    }

    /// The deterministic mode's console input without a trace (`--deterministic`).
    pub fn without_trace(input: Option<Receiver<Vec<u8>>>) -> Recorder {
        Recorder { writer: None, input, input_bytes: 0, trace_bytes: 0, checkpoints: 0 }
    }

    fn write(&mut self, event: &Event) -> Result<(), DetError> {
        match self.writer.as_mut() {
            Some(w) => w.write(event).map_err(trace_err),
            None => Ok(()),
        }
    }

    /// Takes what the console thread has (waiting as `wait` allows).
    fn take_input(&mut self, wait: Wait) -> Vec<u8> {
        let Some(rx) = &self.input else { return Vec::new() };
        let mut bytes = Vec::new();
        let first = match wait {
            Wait::No => rx.try_recv().map_err(|e| e == TryRecvError::Disconnected),
            Wait::Upto(d) => rx.recv_timeout(d).map_err(|e| e == RecvTimeoutError::Disconnected),
            Wait::Forever => rx.recv().map_err(|_| true),
        };
        let mut closed = false;
        match first {
            Ok(b) => bytes.extend(b),
            Err(disconnected) => closed = disconnected,
        }
        while !closed {
            match rx.try_recv() {
                Ok(b) => bytes.extend(b),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => closed = true,
            }
        }
        if closed {
            self.input = None;
        }
        bytes
    }
}

impl Session for Recorder {
    fn input(&mut self, count: u64, point: InputPoint, wait: Wait) -> Result<Vec<u8>, DetError> {
        let bytes = self.take_input(wait);
        if !bytes.is_empty() {
            tracing::debug!(count, ?point, bytes = bytes.len(), "console input enters");
            self.input_bytes += bytes.len() as u64;
            self.write(&Event::Input { count, point, bytes: bytes.clone() })?;
        }
        Ok(bytes)
    }

    fn observe(&mut self, event: Event) -> Result<(), DetError> {
        self.write(&event)
    }

    fn checkpoint(&mut self, cp: Checkpoint, _pages: &PageHashes) -> Result<(), DetError> {
        self.write(&Event::Checkpoint(cp))?;
        // Every 64 checkpoints the trace reaches the disk: a recording killed
        // (Ctrl-C, a crash) still replays up to there.
        self.checkpoints += 1;
        if self.checkpoints.is_multiple_of(64) {
            if let Some(w) = self.writer.as_mut() {
                w.flush().map_err(trace_err)?;
            }
        }
        Ok(())
    }

    fn end(&mut self, end: End) -> Result<(), DetError> {
        self.write(&Event::End(end))?;
        if let Some(w) = self.writer.take() {
            self.trace_bytes = w.finish().map_err(trace_err)?;
        }
        Ok(())
    }
}
