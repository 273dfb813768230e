//! The on-disk format of record/replay traces (docs/trace-format.md).
//!
//! A trace is `MAGIC`, the format version (u16 little-endian), then one zlib stream holding the
//! header record and the events. Integers inside the stream are LEB128 varints (zigzag where
//! signed); instruction counts are deltas against the previous event, checkpoint registers are
//! differences against the previous checkpoint, page numbers are deltas within a memory digest.
//!
//! Writing is streaming ([`TraceWriter`]); so is reading ([`TraceReader`]). [`Trace::read`] and
//! [`Trace::from_bytes`] load a whole trace and insist on a complete one (ending with
//! [`Event::End`]); [`Trace::read_partial`] and [`Trace::from_bytes_partial`] also accept a
//! recording that was cut off and say where and why it stops.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

use flate2::write::ZlibEncoder;
use flate2::{Compression, Decompress, FlushDecompress, Status};
use thiserror::Error;

/// The first eight bytes of every trace file.
pub const MAGIC: &[u8; 8] = b"POPEKTRC";
/// The format version this code writes and the only one it reads.
pub const FORMAT_VERSION: u16 = 3;
/// The oldest version this reader accepts (v1 lacks `host_cpu`, v2
/// `model_revision`).
pub const OLDEST_VERSION: u16 = 1;

/// What the recording ran: everything a replay needs to rebuild the same machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub popek_version: String,
    pub command_line: Vec<String>,
    pub mem_bytes: u64,
    pub images: Vec<ImageDigest>,
    pub cpuid: Vec<CpuidEntry>,
    /// Guest wall clock at instruction 0, nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    /// Instructions between register checkpoints.
    pub checkpoint_every: u64,
    /// Instructions between memory digests.
    pub memory_every: u64,
    /// Instructions between points where console input may enter.
    pub input_quantum: u64,
    /// Translator switches, free text.
    pub engine: String,
    /// The recording host's CPU vendor (CPUID leaf 0, e.g. `GenuineIntel`):
    /// translated code runs natively, so instructions whose flags the
    /// architecture leaves undefined can differ on another vendor. Empty in
    /// version 1 traces.
    pub host_cpu: String,
    /// Which behaviour of the device models the recording saw
    /// ([`MODEL_REVISION`]); 0 in version 1 and 2 traces. A replay builds
    /// the machine the recording had.
    pub model_revision: u32,
}

/// The device models' behaviour as of this build, recorded in trace
/// headers. 1: the i8042 raises IRQ1 again for each byte of a multi-byte
/// keyboard answer (before, only for the first: Linux's keyboard probe
/// timed out). 2: a bzImage boots the kernel the host decompressed
/// (loader::vmlinux); a recording with `--guest-decompress` says 1.
pub const MODEL_REVISION: u32 = 2;

/// This host's CPU vendor string (CPUID leaf 0).
pub fn host_cpu_vendor() -> String {
    let r = std::arch::x86_64::__cpuid(0);
    let mut v = Vec::with_capacity(12);
    for w in [r.ebx, r.edx, r.ecx] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    String::from_utf8_lossy(&v).into_owned()
}

/// One image loaded into the guest (kernel, initrd, built-in guest, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageDigest {
    pub role: String,
    pub name: String,
    pub len: u64,
    pub sha256: [u8; 32],
}

/// One CPUID answer the guest saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub leaf: u32,
    pub subleaf: u32,
    /// EAX, EBX, ECX, EDX.
    pub regs: [u32; 4],
}

// The event vocabulary is the deterministic loop's (it produces the events;
// this module only stores them): re-exported so the format reads whole.
pub use crate::deterministic::events::{Checkpoint, End, Event, InputPoint, MemoryDigest, Regs};

/// A whole trace in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub header: Header,
    pub events: Vec<Event>,
}

/// A trace that may have been cut off: the events decoded before the first problem.
#[derive(Debug)]
pub struct PartialTrace {
    pub trace: Trace,
    /// `None` when the trace is complete (ends with [`Event::End`], the stream is whole); otherwise
    /// why reading stopped: [`TraceError::Truncated`] for a recording that was cut off,
    /// [`TraceError::Corrupt`] (or [`TraceError::Io`]) for damage after the events in `trace`.
    pub stopped: Option<TraceError>,
}

#[derive(Debug, Error)]
pub enum TraceError {
    #[error("trace I/O: {0}")]
    Io(#[from] io::Error),
    #[error("not a Popek trace (bad magic)")]
    NotATrace,
    #[error("trace format version {found} is not supported (this Popek reads version {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("trace is truncated: it stops after {events_read} events without an End event")]
    Truncated { events_read: u64 },
    #[error("trace is corrupt: {0}")]
    Corrupt(String),
    #[error("event count went back from {previous} to {found}")]
    CountWentBack { previous: u64, found: u64 },
    #[error("event cannot be written: {0}")]
    Invalid(String),
}

// ---------------------------------------------------------------------------------------------
// Encoding primitives

const TAG_INPUT: u8 = 1;
const TAG_INTERRUPT: u8 = 2;
const TAG_IO_IN: u8 = 3;
const TAG_IO_OUT: u8 = 4;
const TAG_CHECKPOINT: u8 = 5;
const TAG_END: u8 = 6;

/// State-block mask bits: 0-7 GPRs, 8 EIP, 9 EFLAGS, 10 console length, 11 console hash,
/// 12-17 selectors ES..GS, 18-21 CR0 CR2 CR3 CR4, 22 memory digest follows (checkpoints only).
const BIT_CONSOLE_LEN: u32 = 10;
const BIT_CONSOLE_HASH: u32 = 11;
const BIT_SEL0: u32 = 12;
const BIT_CR0: u32 = 18;
const BIT_MEMORY: u32 = 22;
const STATE_BITS: u32 = 23;

/// Raw records are staged here and handed to the compressor in chunks of this size.
const STAGE_BYTES: usize = 64 * 1024;

fn put_uv(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_uv(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn zigzag32(d: i32) -> u32 {
    ((d << 1) ^ (d >> 31)) as u32
}

fn unzigzag32(u: u32) -> i32 {
    (u >> 1) as i32 ^ -((u & 1) as i32)
}

fn zigzag64(d: i64) -> u64 {
    ((d << 1) ^ (d >> 63)) as u64
}

fn unzigzag64(u: u64) -> i64 {
    (u >> 1) as i64 ^ -((u & 1) as i64)
}

/// The 32-bit register a state-block bit stands for (bits 0-9 and 18-21).
fn reg32(r: &mut Regs, bit: u32) -> &mut u32 {
    match bit {
        0..=7 => &mut r.gpr[bit as usize],
        8 => &mut r.eip,
        9 => &mut r.eflags,
        18 => &mut r.cr0,
        19 => &mut r.cr2,
        20 => &mut r.cr3,
        _ => &mut r.cr4,
    }
}

/// Registers and console of the previous checkpoint (or End): the base of the next state block.
#[derive(Clone, Copy, Default)]
struct State {
    regs: Regs,
    console_len: u64,
    console_hash: u64,
}

fn encode_header(out: &mut Vec<u8>, h: &Header) {
    put_str(out, &h.popek_version);
    put_uv(out, h.command_line.len() as u64);
    for a in &h.command_line {
        put_str(out, a);
    }
    put_uv(out, h.mem_bytes);
    put_uv(out, h.images.len() as u64);
    for i in &h.images {
        put_str(out, &i.role);
        put_str(out, &i.name);
        put_uv(out, i.len);
        out.extend_from_slice(&i.sha256);
    }
    put_uv(out, h.cpuid.len() as u64);
    for c in &h.cpuid {
        put_uv(out, c.leaf.into());
        put_uv(out, c.subleaf.into());
        for r in c.regs {
            put_uv(out, r.into());
        }
    }
    put_uv(out, h.start_unix_ns);
    put_uv(out, h.checkpoint_every);
    put_uv(out, h.memory_every);
    put_uv(out, h.input_quantum);
    put_str(out, &h.engine);
    put_str(out, &h.host_cpu);
    put_uv(out, h.model_revision.into());
}

/// Appends a state block (mask, changed fields, optional memory digest) and advances `prev`.
fn encode_state(out: &mut Vec<u8>, prev: &mut State, new: State, memory: Option<&MemoryDigest>) {
    let (mut old, mut cur) = (prev.regs, new.regs);
    let mut mask = 0u64;
    for bit in (0..10).chain(BIT_CR0..BIT_CR0 + 4) {
        if *reg32(&mut old, bit) != *reg32(&mut cur, bit) {
            mask |= 1 << bit;
        }
    }
    for i in 0..6 {
        if old.sel[i] != cur.sel[i] {
            mask |= 1 << (BIT_SEL0 + i as u32);
        }
    }
    if prev.console_len != new.console_len {
        mask |= 1 << BIT_CONSOLE_LEN;
    }
    if prev.console_hash != new.console_hash {
        mask |= 1 << BIT_CONSOLE_HASH;
    }
    if memory.is_some() {
        mask |= 1 << BIT_MEMORY;
    }
    put_uv(out, mask);
    for bit in 0..STATE_BITS {
        if mask & (1 << bit) == 0 {
            continue;
        }
        match bit {
            BIT_CONSOLE_LEN => put_uv(out, zigzag64(new.console_len.wrapping_sub(prev.console_len) as i64)),
            BIT_CONSOLE_HASH => out.extend_from_slice(&new.console_hash.to_le_bytes()),
            BIT_SEL0..BIT_CR0 => {
                let i = (bit - BIT_SEL0) as usize;
                put_uv(out, zigzag32(i32::from(cur.sel[i].wrapping_sub(old.sel[i]) as i16)).into());
            }
            BIT_MEMORY => {
                // Checked by the caller: pages strictly increasing.
                let m = memory.expect("memory bit set only with a digest");
                out.extend_from_slice(&m.whole.to_le_bytes());
                put_uv(out, m.pages.len() as u64);
                let mut next = 0u32;
                for &(page, hash) in &m.pages {
                    put_uv(out, (page - next).into());
                    out.extend_from_slice(&hash.to_le_bytes());
                    next = page.wrapping_add(1);
                }
            }
            _ => {
                let d = reg32(&mut cur, bit).wrapping_sub(*reg32(&mut old, bit));
                put_uv(out, zigzag32(d as i32).into());
            }
        }
    }
    *prev = new;
}

fn check_pages(m: &MemoryDigest) -> Result<(), TraceError> {
    for w in m.pages.windows(2) {
        if w[1].0 <= w[0].0 {
            return Err(TraceError::Invalid(format!(
                "memory digest pages not strictly increasing: {:#x} after {:#x}",
                w[1].0, w[0].0
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Writer

/// Counts the bytes that reach the underlying writer.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Streams a trace out: header at creation, then [`TraceWriter::write`] per event, then
/// [`TraceWriter::finish`]. Records are staged and compressed in chunks; a writer dropped without
/// `finish` still completes the compressed stream (best effort), so a recording cut short by an
/// error reads back as [`TraceError::Truncated`] with its events intact.
pub struct TraceWriter<W: Write = BufWriter<File>> {
    z: Option<ZlibEncoder<Counting<W>>>,
    stage: Vec<u8>,
    last_count: u64,
    prev: State,
    ended: bool,
    events: u64,
}

impl TraceWriter {
    /// Creates (truncates) the file at `path` and writes the header.
    pub fn create(path: impl AsRef<Path>, header: &Header) -> Result<TraceWriter, TraceError> {
        TraceWriter::new(BufWriter::new(File::create(path)?), header)
    }
}

impl<W: Write> TraceWriter<W> {
    /// Writes the file prologue and the header to `w`.
    pub fn new(w: W, header: &Header) -> Result<TraceWriter<W>, TraceError> {
        let mut out = Counting { inner: w, bytes: 0 };
        out.write_all(MAGIC)?;
        out.write_all(&FORMAT_VERSION.to_le_bytes())?;
        let mut stage = Vec::with_capacity(STAGE_BYTES + 1024);
        encode_header(&mut stage, header);
        Ok(TraceWriter {
            z: Some(ZlibEncoder::new(out, Compression::default())),
            stage,
            last_count: 0,
            prev: State::default(),
            ended: false,
            events: 0,
        })
    }

    /// Appends one event. Counts must not decrease; nothing may follow [`Event::End`].
    pub fn write(&mut self, event: &Event) -> Result<(), TraceError> {
        if self.ended {
            return Err(TraceError::Invalid("event after End".into()));
        }
        let count = event.count();
        if count < self.last_count {
            return Err(TraceError::CountWentBack { previous: self.last_count, found: count });
        }
        if let Event::Checkpoint(Checkpoint { memory: Some(m), .. }) = event {
            check_pages(m)?;
        }
        let out = &mut self.stage;
        let delta = count - self.last_count;
        match event {
            Event::Input { point, bytes, .. } => {
                out.push(TAG_INPUT);
                put_uv(out, delta);
                out.push(match point {
                    InputPoint::Quantum => 0,
                    InputPoint::Halt => 1,
                });
                put_uv(out, bytes.len() as u64);
                out.extend_from_slice(bytes);
            }
            Event::Interrupt { vector, .. } => {
                out.push(TAG_INTERRUPT);
                put_uv(out, delta);
                out.push(*vector);
            }
            Event::Io { port, size, write, value, .. } => {
                out.push(if *write { TAG_IO_OUT } else { TAG_IO_IN });
                put_uv(out, delta);
                put_uv(out, (*port).into());
                out.push(*size);
                put_uv(out, (*value).into());
            }
            Event::Checkpoint(c) => {
                out.push(TAG_CHECKPOINT);
                put_uv(out, delta);
                let state = State { regs: c.regs, console_len: c.console_len, console_hash: c.console_hash };
                encode_state(out, &mut self.prev, state, c.memory.as_ref());
            }
            Event::End(e) => {
                out.push(TAG_END);
                put_uv(out, delta);
                put_str(out, &e.outcome);
                let state = State { regs: e.regs, console_len: e.console_len, console_hash: e.console_hash };
                encode_state(out, &mut self.prev, state, None);
                self.ended = true;
            }
        }
        self.last_count = count;
        self.events += 1;
        if self.stage.len() >= STAGE_BYTES {
            self.drain()?;
        }
        Ok(())
    }

    /// Events written so far.
    pub fn events_written(&self) -> u64 {
        self.events
    }

    /// Pushes everything written so far through the compressor to the underlying writer (a zlib
    /// sync flush, a few bytes of overhead): a reader then sees all of it even if the process dies.
    pub fn flush(&mut self) -> Result<(), TraceError> {
        self.drain()?;
        if let Some(z) = self.z.as_mut() {
            z.flush()?;
        }
        Ok(())
    }

    /// Ends the compressed stream and flushes. Returns the bytes written in total (the file size).
    /// A trace finished without an [`Event::End`] reads back as truncated.
    pub fn finish(mut self) -> Result<u64, TraceError> {
        self.drain()?;
        let z = self.z.take().ok_or_else(|| TraceError::Invalid("writer already finished".into()))?;
        let mut out = z.finish()?;
        out.flush()?;
        Ok(out.bytes)
    }

    fn drain(&mut self) -> Result<(), TraceError> {
        if let Some(z) = self.z.as_mut() {
            z.write_all(&self.stage)?;
        }
        self.stage.clear();
        Ok(())
    }
}

impl<W: Write> Drop for TraceWriter<W> {
    fn drop(&mut self) {
        // Not finished (an error or a panic in the recorder): keep what was recorded. The
        // encoder's own drop completes the stream.
        if let Some(z) = self.z.as_mut() {
            let _ = z.write_all(&self.stage);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reader

/// Inflates one zlib stream from `inner`, telling a clean end (`Ok(0)`) from input that stops
/// early (`UnexpectedEof`) and refusing bytes after the stream (`InvalidData`).
struct Inflate<R> {
    inner: R,
    z: Decompress,
    done: bool,
}

impl<R: BufRead> Read for Inflate<R> {
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if dst.is_empty() {
            return Ok(0);
        }
        loop {
            let input = self.inner.fill_buf()?;
            if self.done {
                return if input.is_empty() {
                    Ok(0)
                } else {
                    Err(io::Error::new(io::ErrorKind::InvalidData, "bytes after the end of the compressed stream"))
                };
            }
            let eof = input.is_empty();
            let (in0, out0) = (self.z.total_in(), self.z.total_out());
            let status = self
                .z
                .decompress(input, dst, FlushDecompress::None)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad compressed data: {e}")))?;
            let consumed = (self.z.total_in() - in0) as usize;
            let produced = (self.z.total_out() - out0) as usize;
            self.inner.consume(consumed);
            if status == Status::StreamEnd {
                self.done = true;
            }
            if produced > 0 {
                return Ok(produced);
            }
            if self.done {
                continue;
            }
            if eof {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "compressed stream stops early"));
            }
            if consumed == 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "compressed stream makes no progress"));
            }
        }
    }
}

/// The decompressed record stream. Running out of data is reported as `Truncated { 0 }`; the
/// reader fills in the event count.
struct Records<B> {
    r: B,
}

fn io_to_trace(e: io::Error) -> TraceError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => TraceError::Truncated { events_read: 0 },
        io::ErrorKind::InvalidData => TraceError::Corrupt(e.to_string()),
        _ => TraceError::Io(e),
    }
}

fn corrupt(what: impl Into<String>) -> TraceError {
    TraceError::Corrupt(what.into())
}

impl<B: BufRead> Records<B> {
    /// Next byte, or `None` at a clean end of the stream.
    fn try_u8(&mut self) -> Result<Option<u8>, TraceError> {
        loop {
            match self.r.fill_buf() {
                Ok([]) => return Ok(None),
                Ok(buf) => {
                    let b = buf[0];
                    self.r.consume(1);
                    return Ok(Some(b));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_to_trace(e)),
            }
        }
    }

    fn u8(&mut self) -> Result<u8, TraceError> {
        self.try_u8()?.ok_or(TraceError::Truncated { events_read: 0 })
    }

    fn uv(&mut self) -> Result<u64, TraceError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            if shift == 63 && b > 1 {
                return Err(corrupt("varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("varint longer than 10 bytes"))
    }

    fn uv32(&mut self, what: &str) -> Result<u32, TraceError> {
        let v = self.uv()?;
        u32::try_from(v).map_err(|_| corrupt(format!("{what} {v:#x} does not fit 32 bits")))
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], TraceError> {
        let mut a = [0u8; N];
        for b in &mut a {
            *b = self.u8()?;
        }
        Ok(a)
    }

    /// `len` bytes; the buffer grows only as data actually arrives.
    fn bytes(&mut self, len: u64) -> Result<Vec<u8>, TraceError> {
        let mut v = Vec::with_capacity(len.min(4096) as usize);
        (&mut self.r).take(len).read_to_end(&mut v).map_err(io_to_trace)?;
        if (v.len() as u64) < len {
            return Err(TraceError::Truncated { events_read: 0 });
        }
        Ok(v)
    }

    fn string(&mut self, what: &str) -> Result<String, TraceError> {
        let len = self.uv()?;
        String::from_utf8(self.bytes(len)?).map_err(|_| corrupt(format!("{what} is not UTF-8")))
    }

    /// A vector count; capacity is reserved only up to a small bound.
    fn items<T>(&mut self, mut item: impl FnMut(&mut Self) -> Result<T, TraceError>) -> Result<Vec<T>, TraceError> {
        let n = self.uv()?;
        let mut v = Vec::with_capacity(n.min(256) as usize);
        for _ in 0..n {
            v.push(item(self)?);
        }
        Ok(v)
    }

    fn header(&mut self, version: u16) -> Result<Header, TraceError> {
        Ok(Header {
            popek_version: self.string("popek version")?,
            command_line: self.items(|r| r.string("command line argument"))?,
            mem_bytes: self.uv()?,
            images: self.items(|r| {
                Ok(ImageDigest {
                    role: r.string("image role")?,
                    name: r.string("image name")?,
                    len: r.uv()?,
                    sha256: r.fixed()?,
                })
            })?,
            cpuid: self.items(|r| {
                Ok(CpuidEntry {
                    leaf: r.uv32("cpuid leaf")?,
                    subleaf: r.uv32("cpuid subleaf")?,
                    regs: [r.uv32("cpuid eax")?, r.uv32("cpuid ebx")?, r.uv32("cpuid ecx")?, r.uv32("cpuid edx")?],
                })
            })?,
            start_unix_ns: self.uv()?,
            checkpoint_every: self.uv()?,
            memory_every: self.uv()?,
            input_quantum: self.uv()?,
            engine: self.string("engine")?,
            host_cpu: if version >= 2 { self.string("host cpu")? } else { String::new() },
            model_revision: if version >= 3 { self.uv32("model revision")? } else { 0 },
        })
    }

    /// Reads a state block against `prev` (advancing it); returns the memory digest if present.
    fn state(&mut self, prev: &mut State, memory_allowed: bool) -> Result<Option<MemoryDigest>, TraceError> {
        let mask = self.uv()?;
        if mask >> STATE_BITS != 0 {
            return Err(corrupt(format!("unknown bits in state mask {mask:#x}")));
        }
        if !memory_allowed && mask & (1 << BIT_MEMORY) != 0 {
            return Err(corrupt("memory digest in an End event"));
        }
        let mut s = *prev;
        let mut memory = None;
        for bit in 0..STATE_BITS {
            if mask & (1 << bit) == 0 {
                continue;
            }
            match bit {
                BIT_CONSOLE_LEN => {
                    s.console_len = s.console_len.wrapping_add(unzigzag64(self.uv()?) as u64);
                }
                BIT_CONSOLE_HASH => s.console_hash = u64::from_le_bytes(self.fixed()?),
                BIT_SEL0..BIT_CR0 => {
                    let d = unzigzag32(self.uv32("selector delta")?);
                    let d = i16::try_from(d).map_err(|_| corrupt("selector delta does not fit 16 bits"))?;
                    let i = (bit - BIT_SEL0) as usize;
                    s.regs.sel[i] = s.regs.sel[i].wrapping_add(d as u16);
                }
                BIT_MEMORY => {
                    let whole = u64::from_le_bytes(self.fixed()?);
                    let mut next = 0u64;
                    let pages = self.items(|r| {
                        let page = next + r.uv()?;
                        let page = u32::try_from(page).map_err(|_| corrupt("memory page number beyond 32 bits"))?;
                        next = u64::from(page) + 1;
                        Ok((page, u32::from_le_bytes(r.fixed()?)))
                    })?;
                    memory = Some(MemoryDigest { whole, pages });
                }
                _ => {
                    let d = unzigzag32(self.uv32("register delta")?);
                    let r = reg32(&mut s.regs, bit);
                    *r = r.wrapping_add(d as u32);
                }
            }
        }
        *prev = s;
        Ok(memory)
    }
}

/// Streams a trace in: the header at opening, then one event per [`TraceReader::next_event`]
/// (also an [`Iterator`] that stops after the first error).
pub struct TraceReader<R> {
    records: Records<BufReader<Inflate<R>>>,
    header: Header,
    last_count: u64,
    prev: State,
    events: u64,
    ended: bool,
    finished: bool,
}

impl TraceReader<BufReader<File>> {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, TraceError> {
        TraceReader::new(BufReader::new(File::open(path)?))
    }
}

impl<R: BufRead> TraceReader<R> {
    /// Checks the prologue and reads the header.
    pub fn new(mut r: R) -> Result<Self, TraceError> {
        let mut prologue = [0u8; 10];
        let mut got = 0;
        while got < prologue.len() {
            match r.read(&mut prologue[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if got < MAGIC.len() || &prologue[..8] != MAGIC {
            return Err(TraceError::NotATrace);
        }
        if got < prologue.len() {
            return Err(TraceError::Truncated { events_read: 0 });
        }
        let found = u16::from_le_bytes([prologue[8], prologue[9]]);
        if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&found) {
            return Err(TraceError::UnsupportedVersion { found, supported: FORMAT_VERSION });
        }
        let mut records = Records { r: BufReader::new(Inflate { inner: r, z: Decompress::new(true), done: false }) };
        let header = records.header(found)?;
        Ok(TraceReader {
            records,
            header,
            last_count: 0,
            prev: State::default(),
            events: 0,
            ended: false,
            finished: false,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Events returned so far.
    pub fn events_read(&self) -> u64 {
        self.events
    }

    /// The next event; `Ok(None)` after [`Event::End`] once the stream is verified to end there.
    /// A stream that stops before End gives [`TraceError::Truncated`].
    pub fn next_event(&mut self) -> Result<Option<Event>, TraceError> {
        if self.finished {
            return Ok(None);
        }
        let r = self.step();
        if !matches!(r, Ok(Some(_))) {
            self.finished = true;
        }
        r.map_err(|e| match e {
            TraceError::Truncated { .. } => TraceError::Truncated { events_read: self.events },
            e => e,
        })
    }

    fn step(&mut self) -> Result<Option<Event>, TraceError> {
        if self.ended {
            return match self.records.try_u8()? {
                None => Ok(None),
                Some(_) => Err(corrupt("data after the End event")),
            };
        }
        let Some(tag) = self.records.try_u8()? else {
            return Err(TraceError::Truncated { events_read: 0 });
        };
        let rec = &mut self.records;
        let delta = rec.uv()?;
        let count = self.last_count.checked_add(delta).ok_or_else(|| corrupt("instruction count overflows"))?;
        let event = match tag {
            TAG_INPUT => {
                let point = match rec.u8()? {
                    0 => InputPoint::Quantum,
                    1 => InputPoint::Halt,
                    p => return Err(corrupt(format!("unknown input point {p}"))),
                };
                let len = rec.uv()?;
                Event::Input { count, point, bytes: rec.bytes(len)? }
            }
            TAG_INTERRUPT => Event::Interrupt { count, vector: rec.u8()? },
            TAG_IO_IN | TAG_IO_OUT => {
                let port = rec.uv()?;
                let port = u16::try_from(port).map_err(|_| corrupt(format!("port {port:#x} beyond 16 bits")))?;
                let size = rec.u8()?;
                let value = rec.uv32("port value")?;
                Event::Io { count, port, size, write: tag == TAG_IO_OUT, value }
            }
            TAG_CHECKPOINT => {
                let memory = rec.state(&mut self.prev, true)?;
                let s = self.prev;
                Event::Checkpoint(Checkpoint {
                    count,
                    regs: s.regs,
                    console_len: s.console_len,
                    console_hash: s.console_hash,
                    memory,
                })
            }
            TAG_END => {
                let outcome = rec.string("outcome")?;
                rec.state(&mut self.prev, false)?;
                let s = self.prev;
                self.ended = true;
                Event::End(End {
                    count,
                    outcome,
                    regs: s.regs,
                    console_len: s.console_len,
                    console_hash: s.console_hash,
                })
            }
            t => return Err(corrupt(format!("unknown event tag {t:#04x}"))),
        };
        self.last_count = count;
        self.events += 1;
        Ok(Some(event))
    }

    /// Reads the rest: the events before the first problem and the problem, if any.
    fn drain_partial(mut self) -> PartialTrace {
        let mut events = Vec::new();
        let stopped = loop {
            match self.next_event() {
                Ok(Some(e)) => events.push(e),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        PartialTrace { trace: Trace { header: self.header, events }, stopped }
    }
}

impl<R: BufRead> Iterator for TraceReader<R> {
    type Item = Result<Event, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_event().transpose()
    }
}

impl Trace {
    /// Reads a complete trace; one without an End event is [`TraceError::Truncated`].
    pub fn read(path: impl AsRef<Path>) -> Result<Trace, TraceError> {
        Self::read_partial(path)?.complete()
    }

    /// Parses a complete trace from memory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Trace, TraceError> {
        Self::from_bytes_partial(bytes)?.complete()
    }

    /// Reads whatever a possibly cut-off trace holds. Fails only when not even the header can be
    /// read (not a trace, unsupported version, I/O error opening, header damaged or cut off).
    pub fn read_partial(path: impl AsRef<Path>) -> Result<PartialTrace, TraceError> {
        Ok(TraceReader::open(path)?.drain_partial())
    }

    /// [`Trace::read_partial`] from memory.
    pub fn from_bytes_partial(bytes: &[u8]) -> Result<PartialTrace, TraceError> {
        Ok(TraceReader::new(bytes)?.drain_partial())
    }

    /// Writes the whole trace to `w` (events must be valid for [`TraceWriter::write`]); returns
    /// the bytes written.
    pub fn write_to<W: Write>(&self, w: W) -> Result<u64, TraceError> {
        let mut tw = TraceWriter::new(w, &self.header)?;
        for e in &self.events {
            tw.write(e)?;
        }
        tw.finish()
    }

    /// The trace encoded in memory.
    pub fn to_bytes(&self) -> Result<Vec<u8>, TraceError> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }
}

impl PartialTrace {
    /// The trace if it is complete, else why it is not.
    pub fn complete(self) -> Result<Trace, TraceError> {
        match self.stopped {
            None => Ok(self.trace),
            Some(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            popek_version: "0.1.0".into(),
            command_line: vec!["popek".into(), "run".into(), "--mem".into(), "256M".into()],
            mem_bytes: 256 << 20,
            images: vec![ImageDigest {
                role: "kernel".into(),
                name: "vmlinuz".into(),
                len: 7_000_000,
                sha256: [0xab; 32],
            }],
            cpuid: vec![
                CpuidEntry { leaf: 0, subleaf: 0, regs: [1, 0x756e_6547, 0x6c65_746e, 0x4965_6e69] },
                CpuidEntry { leaf: u32::MAX, subleaf: u32::MAX, regs: [u32::MAX; 4] },
            ],
            start_unix_ns: 1_700_000_000_000_000_000,
            checkpoint_every: 1_000_000,
            memory_every: 10_000_000,
            input_quantum: 100_000,
            engine: "nochain".into(),
            host_cpu: "AuthenticAMD".into(),
            model_revision: MODEL_REVISION,
        }
    }

    fn regs(seed: u32) -> Regs {
        Regs {
            gpr: [seed, 2, 3, 4, 0x9000, 0x9100, 6, 7],
            eip: 0xc010_0000 + seed,
            eflags: 0x202,
            sel: [0x7b, 0x60, 0x68, 0x7b, 0, 0xe0],
            cr0: 0x8005_003b,
            cr2: 0,
            cr3: 0x0100_0000,
            cr4: 0x10,
        }
    }

    fn encode(h: &Header, events: &[Event]) -> Vec<u8> {
        let mut v = Vec::new();
        let mut w = TraceWriter::new(&mut v, h).unwrap();
        for e in events {
            w.write(e).unwrap();
        }
        let n = w.finish().unwrap();
        assert_eq!(n, v.len() as u64);
        v
    }

    fn all_kinds() -> Vec<Event> {
        let max_regs = Regs {
            gpr: [u32::MAX; 8],
            eip: u32::MAX,
            eflags: u32::MAX,
            sel: [u16::MAX; 6],
            cr0: u32::MAX,
            cr2: u32::MAX,
            cr3: u32::MAX,
            cr4: u32::MAX,
        };
        vec![
            Event::Input { count: 0, point: InputPoint::Quantum, bytes: b"ls\n".to_vec() },
            Event::Input { count: 0, point: InputPoint::Halt, bytes: vec![] },
            Event::Interrupt { count: 17, vector: 0x20 },
            Event::Interrupt { count: 17, vector: 0xff },
            Event::Io { count: 18, port: 0x3fd, size: 1, write: false, value: 0x60 },
            Event::Io { count: 19, port: u16::MAX, size: 4, write: true, value: u32::MAX },
            Event::Io { count: 19, port: 0, size: 255, write: false, value: 0 },
            Event::Checkpoint(Checkpoint {
                count: 1_000_000,
                regs: regs(1),
                console_len: 12,
                console_hash: 0x1234_5678_9abc_def0,
                memory: Some(MemoryDigest {
                    whole: u64::MAX,
                    pages: vec![(0, 1), (1, 2), (0x100, u32::MAX), (u32::MAX, 0)],
                }),
            }),
            Event::Checkpoint(Checkpoint {
                count: 2_000_000,
                regs: max_regs,
                console_len: u64::MAX,
                console_hash: u64::MAX,
                memory: None,
            }),
            Event::Checkpoint(Checkpoint {
                count: 3_000_000,
                regs: Regs::default(),
                console_len: 0,
                console_hash: 0,
                memory: Some(MemoryDigest { whole: 0, pages: vec![] }),
            }),
            Event::Checkpoint(Checkpoint { count: 1 << 40, regs: regs(7), memory: None, ..Default::default() }),
            Event::Io { count: u64::MAX - 1, port: 0x60, size: 1, write: false, value: 0x1c },
            Event::End(End {
                count: u64::MAX,
                outcome: "power-off".into(),
                regs: max_regs,
                console_len: 99,
                console_hash: 5,
            }),
        ]
    }

    #[test]
    fn round_trip_every_kind() {
        let t = Trace { header: header(), events: all_kinds() };
        let bytes = t.to_bytes().unwrap();
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(Trace::from_bytes(&bytes).unwrap(), t);
        let empty = Trace { header: Header::default(), events: vec![Event::End(End::default())] };
        assert_eq!(Trace::from_bytes(&empty.to_bytes().unwrap()).unwrap(), empty);
    }

    #[test]
    fn round_trip_through_a_file() {
        let path = std::env::temp_dir().join(format!("popek-trace-test-{}.trc", std::process::id()));
        let t = Trace { header: header(), events: all_kinds() };
        let mut w = TraceWriter::create(&path, &t.header).unwrap();
        for e in &t.events {
            w.write(e).unwrap();
        }
        let n = w.finish().unwrap();
        assert_eq!(n, std::fs::metadata(&path).unwrap().len());
        let back = Trace::read(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back.unwrap(), t);
    }

    #[test]
    fn writer_rejects_bad_events() {
        let mut v = Vec::new();
        let mut w = TraceWriter::new(&mut v, &header()).unwrap();
        w.write(&Event::Interrupt { count: 10, vector: 0x20 }).unwrap();
        assert!(matches!(
            w.write(&Event::Interrupt { count: 9, vector: 0x20 }),
            Err(TraceError::CountWentBack { previous: 10, found: 9 })
        ));
        let unsorted = MemoryDigest { whole: 0, pages: vec![(5, 0), (5, 1)] };
        let c = Checkpoint { count: 10, memory: Some(unsorted), ..Default::default() };
        assert!(matches!(w.write(&Event::Checkpoint(c)), Err(TraceError::Invalid(_))));
        w.write(&Event::End(End { count: 11, ..Default::default() })).unwrap();
        assert!(matches!(w.write(&Event::Interrupt { count: 12, vector: 0 }), Err(TraceError::Invalid(_))));
    }

    /// 10 000 checkpoints of a guest looping: EIP wanders, two registers count, one changes
    /// arbitrarily, console grows now and then; a memory digest every 10th with a few pages.
    fn similar_checkpoints(n: u64) -> (Vec<Event>, u64) {
        let mut rng = Rng(42);
        let mut r = regs(0);
        let mut events = Vec::new();
        let mut console = 0u64;
        let mut hash = 0u64;
        let mut memory_digests = 0;
        for i in 1..=n {
            r.eip = 0xc010_0000 + rng.next() % 0x400;
            r.gpr[1] = r.gpr[1].wrapping_add(1_000);
            r.gpr[6] = r.gpr[6].wrapping_add(4 * (rng.next() % 64));
            if i % 4 == 0 {
                r.gpr[0] = rng.next();
            }
            if i % 50 == 0 {
                console += 1 + u64::from(rng.next() % 80);
                hash = u64::from(rng.next()) << 32 | u64::from(rng.next());
            }
            let memory = (i % 10 == 0).then(|| {
                memory_digests += 1;
                let base = rng.next() % 60_000;
                MemoryDigest {
                    whole: u64::from(rng.next()) << 32 | u64::from(rng.next()),
                    pages: (0..4).map(|k| (base + 3 * k, rng.next())).collect(),
                }
            });
            events.push(Event::Checkpoint(Checkpoint {
                count: i * 1_000_000,
                regs: r,
                console_len: console,
                console_hash: hash,
                memory,
            }));
        }
        events.push(Event::End(End {
            count: n * 1_000_000 + 5,
            outcome: "halt".into(),
            regs: r,
            ..Default::default()
        }));
        (events, memory_digests)
    }

    #[test]
    fn similar_checkpoints_are_small() {
        const N: u64 = 10_000;
        let (events, _) = similar_checkpoints(N);
        let h = Header::default();
        let empty = encode(&h, &[]).len() as u64;
        let no_memory: Vec<Event> = events
            .iter()
            .map(|e| match e {
                Event::Checkpoint(c) => Event::Checkpoint(Checkpoint { memory: None, ..c.clone() }),
                e => e.clone(),
            })
            .collect();
        let plain = encode(&h, &no_memory).len() as u64 - empty;
        let with_memory = encode(&h, &events).len() as u64 - empty;
        let raw = |bytes: &[u8]| {
            let mut out = Vec::new();
            flate2::read::ZlibDecoder::new(&bytes[10..]).read_to_end(&mut out).unwrap();
            out.len() as u64
        };
        let raw_empty = raw(&encode(&h, &[]));
        let plain_raw = raw(&encode(&h, &no_memory)) - raw_empty;
        let with_memory_raw = raw(&encode(&h, &events)) - raw_empty;
        // Measured: 5.4 bytes per checkpoint on disk (13.0 before compression) without memory
        // digests, 8.7 (16.3) with a 4-page digest in every 10th (docs/trace-format.md).
        let per = |n: u64| n as f64 / N as f64;
        eprintln!(
            "checkpoints: {plain} bytes on disk ({} each), {plain_raw} raw ({} each)",
            per(plain),
            per(plain_raw)
        );
        eprintln!(
            "with memory: {with_memory} bytes on disk ({} each), {with_memory_raw} raw ({} each)",
            per(with_memory),
            per(with_memory_raw)
        );
        assert!(plain < 8 * N, "{plain} bytes for {N} checkpoints");
        assert!(plain_raw < 14 * N, "{plain_raw} raw bytes for {N} checkpoints");
        assert!(with_memory < 12 * N, "{with_memory} bytes for {N} checkpoints with memory digests");
        assert_eq!(Trace::from_bytes(&encode(&h, &events)).unwrap().events, events);

        // A checkpoint where nothing changed costs the tag, the count delta and an empty mask.
        let mut raw = Vec::new();
        let mut prev = State { regs: regs(3), ..Default::default() };
        encode_state(&mut raw, &mut prev, State { regs: regs(3), ..Default::default() }, None);
        assert_eq!(raw, [0]);
    }

    #[test]
    fn cut_off_trace_is_truncated_but_usable() {
        let t = Trace { header: header(), events: all_kinds() };
        let bytes = t.to_bytes().unwrap();
        let header_only = encode(&header(), &[]);
        assert!(matches!(Trace::from_bytes(&header_only), Err(TraceError::Truncated { events_read: 0 })));
        for cut in [bytes.len() - 1, bytes.len() - 4, bytes.len() / 2, 12] {
            match Trace::from_bytes(&bytes[..cut]) {
                Err(TraceError::Truncated { .. }) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        // A writer dropped mid-recording (after a flush) leaves a readable prefix.
        let mut v = Vec::new();
        {
            let mut w = TraceWriter::new(&mut v, &header()).unwrap();
            for e in &all_kinds()[..5] {
                w.write(e).unwrap();
            }
            w.flush().unwrap();
            w.write(&all_kinds()[5]).unwrap();
        }
        let p = Trace::from_bytes_partial(&v).unwrap();
        assert!(matches!(p.stopped, Some(TraceError::Truncated { events_read: 6 })), "{:?}", p.stopped);
        assert_eq!(p.trace.events, all_kinds()[..6]);
        assert_eq!(p.trace.header, header());
        // And one cut off after the flush point keeps the flushed events.
        let flushed = {
            let mut v = Vec::new();
            let mut w = TraceWriter::new(&mut v, &header()).unwrap();
            for e in &all_kinds()[..5] {
                w.write(e).unwrap();
            }
            w.flush().unwrap();
            std::mem::forget(w);
            v
        };
        let p = Trace::from_bytes_partial(&flushed).unwrap();
        assert_eq!(p.trace.events, all_kinds()[..5]);
        assert!(matches!(p.stopped, Some(TraceError::Truncated { events_read: 5 })));
    }

    #[test]
    fn bad_prologue() {
        let mut bytes = Trace { header: header(), events: all_kinds() }.to_bytes().unwrap();
        let mut flipped = bytes.clone();
        flipped[0] ^= 0x20;
        assert!(matches!(Trace::from_bytes(&flipped), Err(TraceError::NotATrace)));
        assert!(matches!(Trace::from_bytes(b"POPEK"), Err(TraceError::NotATrace)));
        assert!(matches!(Trace::from_bytes(b""), Err(TraceError::NotATrace)));
        assert!(matches!(Trace::from_bytes(b"POPEKTRC\x01"), Err(TraceError::Truncated { events_read: 0 })));
        bytes[8..10].copy_from_slice(&4u16.to_le_bytes());
        match Trace::from_bytes(&bytes) {
            Err(e @ TraceError::UnsupportedVersion { found: 4, supported: 3 }) => {
                assert!(e.to_string().contains("version 4"))
            }
            other => panic!("{other:?}"),
        }
    }

    /// A v3 stream's header without its last `n` bytes, as version
    /// `version` wrote it (each older version lacks one trailing field).
    fn older_stream(h: &Header, n: usize, version: u16) -> Vec<u8> {
        let mut hdr = Vec::new();
        encode_header(&mut hdr, h);
        let file = encode(h, &all_kinds());
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(&file[10..]), &mut raw).unwrap();
        assert_eq!(raw[..hdr.len()], hdr[..]);
        raw.drain(hdr.len() - n..hdr.len());
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        let mut z = ZlibEncoder::new(bytes, Compression::default());
        z.write_all(&raw).unwrap();
        z.finish().unwrap()
    }

    #[test]
    fn version_2_traces_read_as_model_revision_0() {
        // model_revision 0 is one byte: a v2 header lacks exactly it.
        let h = Header { model_revision: 0, ..header() };
        let t = Trace::from_bytes(&older_stream(&h, 1, 2)).expect("version 2 reads");
        assert_eq!(t.header, h);
        assert_eq!(t.events, all_kinds());
        // And a v3 trace keeps its revision.
        let t = Trace::from_bytes(&Trace { header: header(), events: all_kinds() }.to_bytes().unwrap()).unwrap();
        assert_eq!(t.header.model_revision, MODEL_REVISION);
    }

    #[test]
    fn version_1_traces_read_without_a_host_cpu() {
        // A v1 stream is a v3 stream whose header lacks the last string
        // (empty: one byte) and the revision (0: one byte).
        let h = Header { host_cpu: String::new(), model_revision: 0, ..header() };
        let t = Trace::from_bytes(&older_stream(&h, 2, 1)).expect("version 1 reads");
        assert_eq!(t.header, h);
        assert_eq!(t.events, all_kinds());
    }

    #[test]
    fn trailing_data_is_corrupt() {
        let mut bytes = Trace { header: header(), events: all_kinds() }.to_bytes().unwrap();
        bytes.push(0);
        let p = Trace::from_bytes_partial(&bytes).unwrap();
        assert_eq!(p.trace.events.len(), all_kinds().len());
        assert!(matches!(p.stopped, Some(TraceError::Corrupt(_))));
    }

    #[test]
    fn unknown_tag_is_corrupt() {
        let mut raw = Vec::new();
        encode_header(&mut raw, &header());
        raw.extend_from_slice(&[0x77, 0]);
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let mut z = ZlibEncoder::new(bytes, Compression::default());
        z.write_all(&raw).unwrap();
        let bytes = z.finish().unwrap();
        assert!(matches!(Trace::from_bytes(&bytes), Err(TraceError::Corrupt(m)) if m.contains("tag")));
    }

    /// xorshift32: deterministic garbage without a crate.
    struct Rng(u32);

    impl Rng {
        fn next(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 17;
            self.0 ^= self.0 << 5;
            self.0
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut rng = Rng(0x1234_5678);
        let good = Trace { header: header(), events: all_kinds() }.to_bytes().unwrap();
        let prologue = &good[..10];
        for round in 0..3000 {
            let len = (rng.next() % 600) as usize;
            let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Raw garbage, garbage after a valid prologue, garbage properly compressed (reaches
            // the record decoder), and a valid trace with bytes flipped.
            let _ = Trace::from_bytes(&junk);
            let mut v = prologue.to_vec();
            v.extend_from_slice(&junk);
            let _ = Trace::from_bytes(&v);
            let mut z = ZlibEncoder::new(prologue.to_vec(), Compression::fast());
            let mut raw = Vec::new();
            if round % 2 == 0 {
                encode_header(&mut raw, &header());
            }
            raw.extend_from_slice(&junk);
            z.write_all(&raw).unwrap();
            assert!(Trace::from_bytes(&z.finish().unwrap()).is_err());
            let mut flipped = good.clone();
            for _ in 0..1 + rng.next() % 4 {
                let i = 10 + rng.next() as usize % (good.len() - 10);
                flipped[i] ^= 1 << (rng.next() % 8);
            }
            let _ = Trace::from_bytes_partial(&flipped);
        }
        // A huge length prefix with no data behind it must not allocate it.
        let mut raw = Vec::new();
        put_uv(&mut raw, u64::MAX >> 1);
        let mut z = ZlibEncoder::new(prologue.to_vec(), Compression::fast());
        z.write_all(&raw).unwrap();
        assert!(matches!(Trace::from_bytes(&z.finish().unwrap()), Err(TraceError::Truncated { .. })));
    }

    #[test]
    fn varints_and_zigzag() {
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX - 1, u64::MAX] {
            let mut out = Vec::new();
            put_uv(&mut out, v);
            let mut r = Records { r: &out[..] };
            assert_eq!(r.uv().unwrap(), v);
            assert!(matches!(r.try_u8(), Ok(None)));
        }
        let mut r = Records { r: &[0xff; 10][..] };
        assert!(matches!(r.uv(), Err(TraceError::Corrupt(_))));
        let mut r = Records { r: &[0x80, 0x80][..] };
        assert!(matches!(r.uv(), Err(TraceError::Truncated { .. })));
        for d in [0, 1, -1, i32::MAX, i32::MIN] {
            assert_eq!(unzigzag32(zigzag32(d)), d);
        }
        for d in [0, 1, -1, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag64(zigzag64(d)), d);
        }
        assert_eq!(zigzag32(-1), 1);
        assert_eq!(zigzag32(1), 2);
    }
}
