//! Deterministic record/replay traces: the on-disk format (docs/trace-format.md) and the comparison of two traces.

pub mod diff;
pub mod format;
pub mod header;
pub mod record;
pub mod replay;

use format::{Event, Trace, TraceError};

/// Reads a trace to replay. A recording that was cut off (killed, crashed)
/// still replays through its last event: then the second value is the
/// instruction count to stop at (one past that event's).
pub fn read_for_replay(path: &std::path::Path) -> Result<(Trace, Option<u64>), TraceError> {
    match Trace::read(path) {
        Ok(t) => Ok((t, None)),
        Err(TraceError::Truncated { .. }) => {
            let p = Trace::read_partial(path)?;
            let last = p.trace.events.last().map_or(0, Event::count);
            Ok((p.trace, Some(last + 1)))
        }
        Err(e) => Err(e),
    }
}

/// A short description of a trace (`popek trace info`).
pub fn info(t: &Trace, bytes_on_disk: u64) -> String {
    let h = &t.header;
    let mut s = format!("Popek {} trace, {} bytes\n", h.popek_version, bytes_on_disk);
    s += &format!("machine: {} (RAM {} MiB)\n", h.command_line.join(" "), h.mem_bytes >> 20);
    for i in &h.images {
        let sha: String = i.sha256.iter().map(|b| format!("{b:02x}")).collect();
        s += &format!("image {}: {} ({} bytes, sha256 {sha})\n", i.role, i.name, i.len);
    }
    if !h.engine.is_empty() {
        s += &format!("engine switches: {}\n", h.engine);
    }
    s += &format!(
        "recorded on: {}\n",
        if h.host_cpu.is_empty() { "(not recorded: a version 1 trace)" } else { h.host_cpu.as_str() }
    );
    s += &format!("device models: revision {} (this build: {})\n", h.model_revision, format::MODEL_REVISION);
    let (mut inputs, mut input_bytes, mut irqs, mut io, mut cps, mut mems) = (0, 0, 0, 0, 0, 0);
    for e in &t.events {
        match e {
            Event::Input { bytes, .. } => {
                inputs += 1;
                input_bytes += bytes.len();
            }
            Event::Interrupt { .. } => irqs += 1,
            Event::Io { .. } => io += 1,
            Event::Checkpoint(c) => {
                cps += 1;
                mems += usize::from(c.memory.is_some());
            }
            Event::End(_) => {}
        }
    }
    s += &format!(
        "events: {inputs} inputs ({input_bytes} bytes), {irqs} interrupts, {io} port accesses, {cps} checkpoints ({mems} with memory)\n"
    );
    match t.events.last() {
        Some(Event::End(e)) => {
            s += &format!("end: {} at instruction {} ({} console bytes)\n", e.outcome, e.count, e.console_len)
        }
        _ => s += "end: missing (the recording was cut off)\n",
    }
    if let Some(last) = t.events.last() {
        if last.count() > 0 {
            s += &format!(
                "size: {:.2} bytes per million instructions\n",
                bytes_on_disk as f64 / (last.count() as f64 / 1e6)
            );
        }
    }
    s
}
