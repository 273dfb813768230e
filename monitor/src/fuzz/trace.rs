//! Fuzz targets for traces: the format (writer, reader, `trace info`,
//! `trace diff`) and the input path of `popek replay` as far as it goes
//! without running a guest.
//!
//! Traces are built here from fuzz-chosen events, written with the real
//! writer, then damaged either inside the zlib stream (the records are
//! decompressed, mutated and compressed again, so the damage reaches the
//! record decoder rather than zlib's checksum) or outside it. Properties:
//! a trace the writer accepts reads back equal; a trace the reader accepts
//! writes back and reads back equal; a replayer fed its own trace verifies
//! every event and never diverges.

use std::io::{Read, Write};

use arbitrary::Unstructured;

use super::mutate;
use super::Target;
use crate::deterministic::{PageHashes, Session, Wait};
use crate::trace::diff::PageMap;
use crate::trace::format::{
    Checkpoint, CpuidEntry, End, Event, Header, ImageDigest, InputPoint, MemoryDigest, Regs, Trace, MAGIC,
};

fn structured(
    input: &[u8],
    body: impl FnOnce(&mut Unstructured<'_>) -> arbitrary::Result<Result<(), String>>,
) -> Result<(), String> {
    let mut u = Unstructured::new(input);
    body(&mut u).unwrap_or(Ok(()))
}

const ARGS: &[&str] = &[
    "--guest",
    "demo",
    "nano",
    "--mem",
    "256M",
    "64M",
    "0",
    "1K",
    "99999999999G",
    "--machine",
    "pc",
    "isa",
    "--append",
    "console=ttyS0",
    "--kernel",
    "--initrd",
    "/nonexistent/popek-fuzz",
    "--bogus",
    "",
];
const SWITCHES: &[&str] = &[
    "nochain",
    "nopoll",
    "noinline",
    "inline",
    "isolate",
    "slowcallouts",
    "corrupt=add",
    "corrupt=",
    "corrupt=nosuch",
    "x",
];

fn regs(u: &mut Unstructured<'_>, base: &Regs) -> arbitrary::Result<Regs> {
    let mut r = *base;
    for _ in 0..u.int_in_range(0..=4u8)? {
        match u.int_in_range(0..=5u8)? {
            0 => r.gpr[u.choose_index(8)?] = u.arbitrary()?,
            1 => r.eip = u.arbitrary()?,
            2 => r.eflags = u.arbitrary()?,
            3 => r.sel[u.choose_index(6)?] = u.arbitrary()?,
            4 => r.cr3 = u.arbitrary()?,
            _ => r.cr0 = u.arbitrary()?,
        }
    }
    Ok(r)
}

/// A header naming a built-in guest, with fuzz-chosen changes.
fn header(u: &mut Unstructured<'_>) -> arbitrary::Result<Header> {
    let mut command_line: Vec<String> =
        ["--guest", "demo", "--mem", "16M", "--machine", "isa"].iter().map(|s| s.to_string()).collect();
    for _ in 0..u.int_in_range(0..=3u8)? {
        match u.int_in_range(0..=2u8)? {
            0 if !command_line.is_empty() => {
                let i = u.choose_index(command_line.len())?;
                command_line[i] = mutate::string(u, ARGS, 40)?;
            }
            1 => command_line.push(mutate::string(u, ARGS, 40)?),
            _ => command_line.truncate(u.int_in_range(0..=command_line.len())?),
        }
    }
    let engine = (0..u.int_in_range(0..=2u8)?)
        .map(|_| mutate::string(u, SWITCHES, 12))
        .collect::<arbitrary::Result<Vec<_>>>()?
        .join(",");
    Ok(Header {
        popek_version: mutate::string(u, &["0.1.0"], 20)?,
        command_line,
        mem_bytes: 16 << 20,
        images: if u.ratio(1u8, 3)? {
            vec![ImageDigest { role: "guest".into(), name: "demo".into(), len: u.arbitrary()?, sha256: u.arbitrary()? }]
        } else {
            Vec::new()
        },
        cpuid: (0..u.int_in_range(0..=3u8)?)
            .map(|_| Ok(CpuidEntry { leaf: u.arbitrary()?, subleaf: 0, regs: u.arbitrary()? }))
            .collect::<arbitrary::Result<Vec<_>>>()?,
        start_unix_ns: u.arbitrary()?,
        checkpoint_every: u.arbitrary()?,
        memory_every: u.arbitrary()?,
        input_quantum: u.arbitrary()?,
        engine,
        host_cpu: mutate::string(u, &["AuthenticAMD", "GenuineIntel"], 16)?,
        model_revision: u.int_in_range(0..=2)?,
    })
}

/// Events with non-decreasing counts, usually ending with End; `sane`
/// keeps what the writer requires (sorted pages, counts that only grow).
fn events(u: &mut Unstructured<'_>, sane: bool) -> arbitrary::Result<Vec<Event>> {
    let mut v = Vec::new();
    let mut count = 0u64;
    let mut r = Regs::default();
    let (mut console_len, mut console_hash) = (0u64, 0u64);
    for _ in 0..u.int_in_range(0..=24u8)? {
        count = match u.int_in_range(0..=9u8)? {
            0 => count,
            1 if !sane => count.wrapping_sub(u.int_in_range(1..=5u64)?),
            2 => count.saturating_add(u.arbitrary::<u64>()? >> u.int_in_range(0..=63u8)?),
            _ => count.saturating_add(u.int_in_range(1..=100_000u64)?),
        };
        v.push(match u.int_in_range(0..=5u8)? {
            0 => Event::Input {
                count,
                bytes: {
                    let n = u.int_in_range(0..=16usize)?.min(u.len());
                    u.bytes(n)?.to_vec()
                },
                point: if u.arbitrary()? { InputPoint::Halt } else { InputPoint::Quantum },
            },
            1 => Event::Interrupt { count, vector: u.arbitrary()? },
            2 | 3 => Event::Io {
                count,
                port: u.arbitrary()?,
                size: *u.choose(&[1u8, 2, 4])?,
                write: u.arbitrary()?,
                value: u.arbitrary()?,
            },
            _ => {
                r = regs(u, &r)?;
                if u.ratio(1u8, 3)? {
                    console_len = console_len.wrapping_add(u.int_in_range(0..=100u64)?);
                    console_hash = u.arbitrary()?;
                }
                let memory = if u.ratio(1u8, 3)? {
                    let mut pages = Vec::new();
                    let mut p = 0u32;
                    for _ in 0..u.int_in_range(0..=6u8)? {
                        p = if sane { p.saturating_add(u.int_in_range(1..=0x10000u32)?) } else { u.arbitrary()? };
                        pages.push((p, u.arbitrary()?));
                    }
                    if sane {
                        pages.dedup_by_key(|x| x.0);
                    }
                    Some(MemoryDigest { whole: u.arbitrary()?, pages })
                } else {
                    None
                };
                Event::Checkpoint(Checkpoint { count, regs: r, console_len, console_hash, memory })
            }
        });
    }
    if u.ratio(4u8, 5)? {
        let count = count.saturating_add(u.int_in_range(0..=10u64)?);
        v.push(Event::End(End {
            count,
            outcome: mutate::string(u, &["debug-exit 0x31", "halted", "triple fault"], 40)?,
            regs: regs(u, &r)?,
            console_len,
            console_hash,
        }));
    }
    Ok(v)
}

/// Splits an encoded trace into its prologue and decompressed records.
fn records(bytes: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let prologue = bytes.get(..10)?.to_vec();
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&bytes[10..]).read_to_end(&mut raw).ok()?;
    Some((prologue, raw))
}

fn recompress(prologue: &[u8], raw: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(prologue.to_vec(), flate2::Compression::fast());
    let _ = z.write_all(raw);
    z.finish().unwrap_or_default()
}

/// Damages an encoded trace: inside the stream (usually), outside it, or both.
fn damage(u: &mut Unstructured<'_>, bytes: Vec<u8>) -> arbitrary::Result<Vec<u8>> {
    let mode = u.int_in_range(0..=7u8)?;
    let mut out = match records(&bytes) {
        Some((mut prologue, mut raw)) if mode <= 6 => {
            if mode == 6 {
                // Another format version (1 lacks a header field).
                prologue[8] = u.int_in_range(0..=3u8)?;
            }
            mutate::mutate(u, &mut raw, &[], 4)?;
            recompress(&prologue, &raw)
        }
        _ => bytes,
    };
    if mode == 7 {
        mutate::mutate(u, &mut out, &[], 3)?;
    }
    Ok(out)
}

/// A trace the reader accepted must survive a write and a read unchanged.
fn reread(t: &Trace) -> Result<(), String> {
    let bytes = t.to_bytes().map_err(|e| format!("a trace the reader accepted does not write: {e}"))?;
    let back = Trace::from_bytes_partial(&bytes).map_err(|e| format!("rewritten trace does not read: {e}"))?;
    if &back.trace != t {
        return Err("a rewritten trace reads back different".into());
    }
    Ok(())
}

struct TraceTarget;

pub fn trace() -> Result<Box<dyn Target>, String> {
    Ok(Box::new(TraceTarget))
}

impl Target for TraceTarget {
    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        structured(input, |u| {
            if u.ratio(1u8, 16)? {
                let mut raw = MAGIC.to_vec();
                raw.extend_from_slice(u.bytes(u.len())?);
                let _ = Trace::from_bytes_partial(&raw);
                return Ok(Ok(()));
            }
            let sane = u.ratio(3u8, 4)?;
            let t = Trace { header: header(u)?, events: events(u, sane)? };
            let bytes = match t.to_bytes() {
                Ok(b) => b,
                Err(_) if !sane => return Ok(Ok(())),
                Err(e) => return Ok(Err(format!("the writer refused a sane trace: {e}"))),
            };
            // Round trip.
            match Trace::from_bytes_partial(&bytes) {
                Ok(p) if p.trace == t => {}
                Ok(p) => return Ok(Err(format!("trace read back differs (stopped: {:?})", p.stopped))),
                Err(e) => return Ok(Err(format!("a written trace does not read: {e}"))),
            }
            // Damaged.
            let bad = damage(u, bytes)?;
            let read = Trace::from_bytes_partial(&bad);
            match &read {
                Ok(p) => match &p.stopped {
                    None => super::note("damaged: complete"),
                    Some(e) => super::note_err("damaged: events, then", e),
                },
                Err(e) => super::note_err("damaged: no header:", e),
            }
            if let Ok(p) = read {
                let _ = crate::trace::info(&p.trace, bad.len() as u64);
                let _ = crate::trace::diff::diff(&p.trace, &t);
                if let Err(e) = reread(&p.trace) {
                    return Ok(Err(e));
                }
            }
            Ok(Ok(()))
        })
    }
}

struct Replay;

pub fn replay() -> Result<Box<dyn Target>, String> {
    Ok(Box::new(Replay))
}

/// Feeds a replayer the events of `t` as a deterministic run would
/// produce them; returns whether any divergence was reported.
fn feed(r: &mut crate::trace::replay::Replayer, t: &Trace) -> Result<(), crate::deterministic::DetError> {
    let mut pages = PageHashes::default();
    let mut map = PageMap::new();
    let mut last_input: Option<(u64, InputPoint)> = None;
    for e in &t.events {
        match e {
            Event::Input { count, point, .. } => {
                // The loop asks once per designated point.
                if last_input != Some((*count, *point)) {
                    r.input(*count, *point, Wait::No)?;
                    last_input = Some((*count, *point));
                }
            }
            Event::Io { .. } | Event::Interrupt { .. } => r.observe(e.clone())?,
            Event::Checkpoint(c) => {
                if let Some(m) = &c.memory {
                    map.apply(m);
                    pages.pages = map.pages().clone();
                }
                r.checkpoint(c.clone(), &pages)?;
            }
            Event::End(end) => r.end(end.clone())?,
        }
    }
    Ok(())
}

impl Target for Replay {
    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        structured(input, |u| {
            let t = Trace { header: header(u)?, events: events(u, true)? };
            let Ok(mut bytes) = t.to_bytes() else { return Ok(Err("the writer refused a sane trace".into())) };
            if u.ratio(1u8, 3)? {
                bytes = damage(u, bytes)?;
            }
            // `popek replay FILE`: read, accepting a cut-off recording.
            let t = match Trace::from_bytes(&bytes) {
                Ok(t) => t,
                Err(crate::trace::format::TraceError::Truncated { .. }) => match Trace::from_bytes_partial(&bytes) {
                    Ok(p) => p.trace,
                    Err(_) => return Ok(Ok(())),
                },
                Err(_) => return Ok(Ok(())),
            };
            // The machine and switches the header names.
            let opts = crate::run::options_from_header(&t.header);
            match &opts {
                Ok(_) => super::note("header: machine ok"),
                Err(e) => super::note_err("header:", e),
            }
            if let Ok(opts) = opts {
                let m = opts.machine();
                if m.kernel.is_none() && m.initrd.is_none() {
                    if let Ok(now) = crate::trace::header::image_digests(&m) {
                        for (want, have) in t.header.images.iter().zip(&now) {
                            let _ = want.sha256 == have.sha256 && want.len == have.len;
                        }
                    }
                }
            }
            let mut bt = crate::backend::bt::BtConfig::default();
            for s in t.header.engine.split(',').filter(|s| !s.is_empty()) {
                let _ = bt.apply_switch(s);
            }
            // The replayer fed its own trace agrees with it all the way.
            let mut r = crate::trace::replay::Replayer::new(&t);
            if let Err(e) = feed(&mut r, &t) {
                return Ok(Err(format!("a replay of a trace's own events diverged: {e}")));
            }
            let n = |f: fn(&Event) -> bool| t.events.iter().filter(|e| f(e)).count() as u64;
            let v = r.verified;
            if v.port_accesses != n(|e| matches!(e, Event::Io { .. }))
                || v.interrupts != n(|e| matches!(e, Event::Interrupt { .. }))
                || v.checkpoints != n(|e| matches!(e, Event::Checkpoint(_)))
                || v.inputs != n(|e| matches!(e, Event::Input { .. }))
                || v.end != t.events.iter().any(|e| matches!(e, Event::End(_)))
            {
                return Ok(Err(format!("replay verified {v:?} of {} events", t.events.len())));
            }
            // And a replay that differs from the recording diverges cleanly.
            let mut other = t.clone();
            if !other.events.is_empty() {
                let i = u.choose_index(other.events.len())?;
                if u.arbitrary()? {
                    other.events.remove(i);
                } else if let Ok(extra) = events(u, true) {
                    other.events.splice(i..i, extra.into_iter().filter(|e| !matches!(e, Event::End(_))));
                }
            }
            super::note("self-replay: verified");
            let mut r = crate::trace::replay::Replayer::new(&t);
            match feed(&mut r, &other) {
                Ok(()) => super::note("other replay: agreed"),
                Err(_) => super::note("other replay: diverged"),
            }
            let _ = crate::trace::diff::diff(&t, &other);
            Ok(Ok(()))
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn trace_smoke() {
        super::super::smoke("trace", 300);
    }

    #[test]
    fn replay_smoke() {
        super::super::smoke("replay", 300);
    }
}
