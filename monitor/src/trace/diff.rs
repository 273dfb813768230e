//! Comparing two traces of the same guest: where (at which instruction count) they first part.
//!
//! Header differences are listed as notes (they explain a divergence but are not one). The event
//! streams are compared per kind, each in count order: console input, interrupt injections, port
//! accesses pairwise by position; checkpoints matched by count (a checkpoint present in only one
//! trace is not a divergence); then the End events. The first divergence is the one with the
//! smallest instruction count across kinds.
//!
//! A trace without an End event (a recording cut off) is compared only up to its last event: an
//! event the other trace has at or after that count is not a divergence.

use std::collections::BTreeMap;
use std::fmt;

use super::format::{Checkpoint, End, Event, Header, InputPoint, MemoryDigest, Regs, Trace};

/// Most memory pages named in one difference.
const MAX_PAGES_LISTED: usize = 16;

/// The full page-hash map of guest memory, rebuilt by accumulating [`MemoryDigest`] deltas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageMap {
    pages: BTreeMap<u32, u32>,
}

impl PageMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds in one digest's changed pages.
    pub fn apply(&mut self, digest: &MemoryDigest) {
        self.pages.extend(digest.pages.iter().copied());
    }

    /// Page number → page hash, for every page any digest so far has named.
    pub fn pages(&self) -> &BTreeMap<u32, u32> {
        &self.pages
    }
}

/// Page numbers whose hashes differ between two maps (including pages in only one), ascending.
pub fn differing_pages(a: &BTreeMap<u32, u32>, b: &BTreeMap<u32, u32>) -> Vec<u32> {
    let mut out = Vec::new();
    let (mut ia, mut ib) = (a.iter().peekable(), b.iter().peekable());
    loop {
        match (ia.peek(), ib.peek()) {
            (None, None) => return out,
            (Some(&(&pa, _)), None) => {
                out.push(pa);
                ia.next();
            }
            (None, Some(&(&pb, _))) => {
                out.push(pb);
                ib.next();
            }
            (Some(&(&pa, &ha)), Some(&(&pb, &hb))) => {
                if pa < pb {
                    out.push(pa);
                    ia.next();
                } else if pb < pa {
                    out.push(pb);
                    ib.next();
                } else {
                    if ha != hb {
                        out.push(pa);
                    }
                    ia.next();
                    ib.next();
                }
            }
        }
    }
}

/// Named differences between an expected and an actual checkpoint: count, each register (by name,
/// both values), console length and hash, and — when both carry a memory digest — the whole-memory
/// hash and the pages whose hashes differ in the accumulated maps (at most 16 named). Empty when
/// they agree. The replayer checks its checkpoints with this.
pub fn compare_checkpoint(
    expected: &Checkpoint,
    actual: &Checkpoint,
    expected_pages: &BTreeMap<u32, u32>,
    actual_pages: &BTreeMap<u32, u32>,
) -> Vec<String> {
    let labels = ("expected", "actual");
    let mut out = Vec::new();
    if expected.count != actual.count {
        out.push(pair("count", labels, group(expected.count), group(actual.count)));
    }
    let ea = (expected.regs, expected.console_len, expected.console_hash);
    let aa = (actual.regs, actual.console_len, actual.console_hash);
    compare_state(&mut out, labels, ea, aa);
    if let (Some(me), Some(ma)) = (&expected.memory, &actual.memory) {
        compare_memory(&mut out, labels, (me, expected_pages), (ma, actual_pages));
    }
    out
}

const REG_NAMES: [&str; 8] = ["EAX", "ECX", "EDX", "EBX", "ESP", "EBP", "ESI", "EDI"];
const SEL_NAMES: [&str; 6] = ["ES", "CS", "SS", "DS", "FS", "GS"];

fn pair(name: &str, (la, lb): (&str, &str), a: impl fmt::Display, b: impl fmt::Display) -> String {
    format!("{name}: {la} {a}, {lb} {b}")
}

/// Registers that differ, by name: `EAX: A 0x00000001, B 0x00000002`
/// (the localizer uses it with its own labels).
pub fn compare_regs(out: &mut Vec<String>, labels: (&str, &str), ra: &Regs, rb: &Regs) {
    let gprs = REG_NAMES.iter().zip(ra.gpr.iter().zip(&rb.gpr)).map(|(n, (x, y))| (*n, *x, *y));
    let rest = [("EIP", ra.eip, rb.eip), ("EFLAGS", ra.eflags, rb.eflags)];
    for (name, x, y) in gprs.chain(rest) {
        if x != y {
            out.push(pair(name, labels, format!("{x:#010x}"), format!("{y:#010x}")));
        }
    }
    for (i, name) in SEL_NAMES.iter().enumerate() {
        if ra.sel[i] != rb.sel[i] {
            out.push(pair(name, labels, format!("{:#06x}", ra.sel[i]), format!("{:#06x}", rb.sel[i])));
        }
    }
    for (name, x, y) in
        [("CR0", ra.cr0, rb.cr0), ("CR2", ra.cr2, rb.cr2), ("CR3", ra.cr3, rb.cr3), ("CR4", ra.cr4, rb.cr4)]
    {
        if x != y {
            out.push(pair(name, labels, format!("{x:#010x}"), format!("{y:#010x}")));
        }
    }
}

/// Registers and console, by name.
fn compare_state(out: &mut Vec<String>, labels: (&str, &str), a: (Regs, u64, u64), b: (Regs, u64, u64)) {
    compare_regs(out, labels, &a.0, &b.0);
    if a.1 != b.1 {
        out.push(pair("console length", labels, group(a.1), group(b.1)));
    }
    if a.2 != b.2 {
        out.push(pair("console hash", labels, format!("{:#018x}", a.2), format!("{:#018x}", b.2)));
    }
}

fn compare_memory(
    out: &mut Vec<String>,
    labels: (&str, &str),
    (da, pa): (&MemoryDigest, &BTreeMap<u32, u32>),
    (db, pb): (&MemoryDigest, &BTreeMap<u32, u32>),
) {
    if da.whole != db.whole {
        out.push(pair("memory hash", labels, format!("{:#018x}", da.whole), format!("{:#018x}", db.whole)));
    }
    let pages = differing_pages(pa, pb);
    if !pages.is_empty() {
        let mut s = format!("memory pages differ ({}):", pages.len());
        for p in pages.iter().take(MAX_PAGES_LISTED) {
            s.push_str(&format!(" {p:#x}"));
        }
        if pages.len() > MAX_PAGES_LISTED {
            s.push_str(&format!(" ... and {} more", pages.len() - MAX_PAGES_LISTED));
        }
        out.push(s);
    }
}

/// An instruction count with `_` between thousands: `9_000_123`.
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('_');
        }
        out.push(c);
    }
    out
}

/// One of the two traces compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::A => "A",
            Side::B => "B",
        })
    }
}

/// The stream a divergence is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Console,
    Interrupt,
    Io,
    Checkpoint,
    End,
}

/// The checkpoint nearest at or before a divergence (the later of the two traces').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nearest {
    pub side: Side,
    pub count: u64,
    pub eip: u32,
}

/// Where two traces first part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Divergence {
    /// The instruction count of the divergence (the smaller of the two events' counts).
    pub count: u64,
    pub kind: StreamKind,
    /// Which event: `Io #1234` (0-based position in that kind's stream), `checkpoint at count N`,
    /// `End`.
    pub what: String,
    /// What differs, one item each (`A in 0x3fd -> 0x60 at count 9`, `EAX: A 0x1, B 0x2`, ...).
    pub details: Vec<String>,
    pub nearest: Option<Nearest>,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "traces diverge at count {} in {}: {}", group(self.count), self.what, self.details.join("; "))?;
        match self.nearest {
            Some(n) => write!(f, "\n  nearest checkpoint: {} count {}, EIP {:#010x}", n.side, group(n.count), n.eip),
            None => write!(f, "\n  no checkpoint at or before it"),
        }
    }
}

/// How much the traces were found to agree on (before the divergence, if any).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Checkpoints present in both (same count) that agree.
    pub checkpoints: u64,
    /// Of those, the ones where both carry a memory digest.
    pub memory_digests: u64,
    pub inputs: u64,
    pub interrupts: u64,
    pub io: u64,
    /// Compared up to this instruction count: the divergence, or the end of the shorter trace.
    pub up_to: u64,
}

/// The result of [`diff`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffReport {
    /// Informational: header differences, and traces that stop without an End event.
    pub header_notes: Vec<String>,
    pub first: Option<Divergence>,
    pub compared: Counts,
}

impl fmt::Display for DiffReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for n in &self.header_notes {
            writeln!(f, "note: {n}")?;
        }
        let c = &self.compared;
        let agreed = format!(
            "{} checkpoints ({} with memory digests), {} console inputs, {} interrupts, {} port accesses",
            group(c.checkpoints),
            group(c.memory_digests),
            group(c.inputs),
            group(c.interrupts),
            group(c.io)
        );
        match &self.first {
            Some(d) => write!(f, "{d}\n  before it the traces agree on {agreed}"),
            None => write!(f, "traces agree on {agreed} up to count {}", group(c.up_to)),
        }
    }
}

/// One trace's events split by kind.
struct Streams<'a> {
    inputs: Vec<(u64, InputPoint, &'a [u8])>,
    interrupts: Vec<(u64, u8)>,
    io: Vec<(u64, u16, u8, bool, u32)>,
    checkpoints: Vec<&'a Checkpoint>,
    end: Option<&'a End>,
    /// End's count, or the last event's for a trace cut off.
    last: u64,
}

impl<'a> Streams<'a> {
    fn new(t: &'a Trace) -> Self {
        let mut s = Streams {
            inputs: Vec::new(),
            interrupts: Vec::new(),
            io: Vec::new(),
            checkpoints: Vec::new(),
            end: None,
            last: t.events.last().map_or(0, Event::count),
        };
        for e in &t.events {
            match e {
                Event::Input { count, point, bytes } => s.inputs.push((*count, *point, bytes)),
                Event::Interrupt { count, vector } => s.interrupts.push((*count, *vector)),
                Event::Io { count, port, size, write, value } => s.io.push((*count, *port, *size, *write, *value)),
                Event::Checkpoint(c) => s.checkpoints.push(c),
                Event::End(e) => s.end = Some(e),
            }
        }
        if let Some(e) = s.end {
            s.last = e.count;
        }
        s
    }

    /// Whether this trace would have recorded an event at `count` (a cut-off trace covers only
    /// counts before its last event).
    fn covers(&self, count: u64) -> bool {
        self.end.is_some() || count < self.last
    }
}

fn describe_input(&(count, point, bytes): &(u64, InputPoint, &[u8])) -> String {
    let at = match point {
        InputPoint::Quantum => "quantum",
        InputPoint::Halt => "halt",
    };
    format!("{:?} at {at} at count {}", String::from_utf8_lossy(bytes), group(count))
}

fn describe_interrupt(&(count, vector): &(u64, u8)) -> String {
    format!("vector {vector:#04x} at count {}", group(count))
}

fn describe_io(&(count, port, size, write, value): &(u64, u16, u8, bool, u32)) -> String {
    let op = match (write, size) {
        (false, 1) => "in".to_string(),
        (false, 2) => "inw".to_string(),
        (false, 4) => "inl".to_string(),
        (true, 1) => "out".to_string(),
        (true, 2) => "outw".to_string(),
        (true, 4) => "outl".to_string(),
        (w, s) => format!("{} (size {s})", if w { "out" } else { "in" }),
    };
    let arrow = if write { "<-" } else { "->" };
    format!("{op} {port:#x} {arrow} {value:#x} at count {}", group(count))
}

/// Pairwise comparison of one kind's stream.
fn compare_stream<T: PartialEq>(
    kind: StreamKind,
    name: &str,
    (a, sa): (&[T], &Streams),
    (b, sb): (&[T], &Streams),
    count: fn(&T) -> u64,
    describe: fn(&T) -> String,
) -> Option<Divergence> {
    let missing = |side: Side, other: &[T]| match other.last() {
        Some(l) => format!("{side} has no {name} after the one at count {}", group(count(l))),
        None => format!("{side} has no {name} events"),
    };
    for i in 0..a.len().max(b.len()) {
        let (c, details) = match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) if x == y => continue,
            (Some(x), Some(y)) => {
                (count(x).min(count(y)), vec![format!("A {}", describe(x)), format!("B {}", describe(y))])
            }
            (Some(x), None) if sb.covers(count(x)) => {
                (count(x), vec![format!("A {}", describe(x)), missing(Side::B, b)])
            }
            (None, Some(y)) if sa.covers(count(y)) => {
                (count(y), vec![missing(Side::A, a), format!("B {}", describe(y))])
            }
            _ => return None,
        };
        return Some(Divergence { count: c, kind, what: format!("{name} #{i}"), details, nearest: None });
    }
    None
}

fn compare_checkpoints(sa: &Streams, sb: &Streams) -> Option<Divergence> {
    let (mut pa, mut pb) = (PageMap::new(), PageMap::new());
    let (mut i, mut j) = (0, 0);
    while let (Some(&x), Some(&y)) = (sa.checkpoints.get(i), sb.checkpoints.get(j)) {
        if x.count <= y.count {
            if let Some(m) = &x.memory {
                pa.apply(m);
            }
            i += 1;
        }
        if y.count <= x.count {
            if let Some(m) = &y.memory {
                pb.apply(m);
            }
            j += 1;
        }
        if x.count != y.count {
            continue;
        }
        let labels = ("A", "B");
        let mut details = Vec::new();
        compare_state(
            &mut details,
            labels,
            (x.regs, x.console_len, x.console_hash),
            (y.regs, y.console_len, y.console_hash),
        );
        if let (Some(ma), Some(mb)) = (&x.memory, &y.memory) {
            compare_memory(&mut details, labels, (ma, pa.pages()), (mb, pb.pages()));
        }
        if !details.is_empty() {
            let what = format!("checkpoint at count {}", group(x.count));
            return Some(Divergence { count: x.count, kind: StreamKind::Checkpoint, what, details, nearest: None });
        }
    }
    None
}

fn compare_ends(sa: &Streams, sb: &Streams) -> Option<Divergence> {
    let ends = |side: Side, e: &End| format!("{side} ends ({}) at count {}", e.outcome, group(e.count));
    let continues = |side: Side, s: &Streams| format!("{side} continues to count {}", group(s.last));
    let (count, details) = match (sa.end, sb.end) {
        (Some(x), Some(y)) => {
            let mut details = Vec::new();
            compare_state(
                &mut details,
                ("A", "B"),
                (x.regs, x.console_len, x.console_hash),
                (y.regs, y.console_len, y.console_hash),
            );
            if x.count == y.count && x.outcome == y.outcome && details.is_empty() {
                return None;
            }
            details.splice(0..0, [ends(Side::A, x), ends(Side::B, y)]);
            (x.count.min(y.count), details)
        }
        (Some(x), None) if sb.last > x.count => (x.count, vec![ends(Side::A, x), continues(Side::B, sb)]),
        (None, Some(y)) if sa.last > y.count => (y.count, vec![continues(Side::A, sa), ends(Side::B, y)]),
        _ => return None,
    };
    Some(Divergence { count, kind: StreamKind::End, what: "End".into(), details, nearest: None })
}

fn nearest(sa: &Streams, sb: &Streams, count: u64) -> Option<Nearest> {
    let find = |side: Side, s: &Streams| {
        let i = s.checkpoints.partition_point(|c| c.count <= count);
        i.checked_sub(1).map(|i| Nearest { side, count: s.checkpoints[i].count, eip: s.checkpoints[i].regs.eip })
    };
    match (find(Side::A, sa), find(Side::B, sb)) {
        (Some(a), Some(b)) if b.count > a.count => Some(b),
        (Some(a), _) => Some(a),
        (None, b) => b,
    }
}

fn header_notes(a: &Header, b: &Header) -> Vec<String> {
    let mut notes = Vec::new();
    let mut note = |name: &str, x: String, y: String| {
        if x != y {
            notes.push(pair(name, ("A", "B"), x, y));
        }
    };
    note("Popek version", a.popek_version.clone(), b.popek_version.clone());
    note("command line", format!("`{}`", a.command_line.join(" ")), format!("`{}`", b.command_line.join(" ")));
    note("memory size", group(a.mem_bytes), group(b.mem_bytes));
    let image = |h: &Header, i: usize| match h.images.get(i) {
        Some(im) => {
            let sha: String = im.sha256[..8].iter().map(|b| format!("{b:02x}")).collect();
            format!("{} {} ({} bytes, sha256 {sha}...)", im.role, im.name, group(im.len))
        }
        None => "none".to_string(),
    };
    for i in 0..a.images.len().max(b.images.len()) {
        if a.images.get(i) != b.images.get(i) {
            note(&format!("image #{i}"), image(a, i), image(b, i));
        }
    }
    note("start time (unix ns)", a.start_unix_ns.to_string(), b.start_unix_ns.to_string());
    note("checkpoint interval", group(a.checkpoint_every), group(b.checkpoint_every));
    note("memory digest interval", group(a.memory_every), group(b.memory_every));
    note("input quantum", group(a.input_quantum), group(b.input_quantum));
    note("engine", format!("{:?}", a.engine), format!("{:?}", b.engine));
    if a.cpuid != b.cpuid {
        let map = |h: &Header| h.cpuid.iter().map(|c| ((c.leaf, c.subleaf), c.regs)).collect::<BTreeMap<_, _>>();
        let (ma, mb) = (map(a), map(b));
        let mut leaves: Vec<_> = ma.keys().chain(mb.keys()).copied().collect();
        leaves.sort_unstable();
        leaves.dedup();
        leaves.retain(|k| ma.get(k) != mb.get(k));
        let mut s = format!("CPUID differs in {} leaves:", leaves.len());
        for (leaf, sub) in leaves.iter().take(MAX_PAGES_LISTED) {
            s.push_str(&format!(" {leaf:#x}.{sub}"));
        }
        if leaves.len() > MAX_PAGES_LISTED {
            s.push_str(&format!(" ... and {} more", leaves.len() - MAX_PAGES_LISTED));
        }
        if leaves.is_empty() {
            s = "CPUID entries listed in a different order".into();
        }
        notes.push(s);
    }
    notes
}

/// Compares two traces of the same guest.
pub fn diff(a: &Trace, b: &Trace) -> DiffReport {
    let mut header_notes = header_notes(&a.header, &b.header);
    let (sa, sb) = (Streams::new(a), Streams::new(b));
    for (side, s) in [(Side::A, &sa), (Side::B, &sb)] {
        if s.end.is_none() {
            header_notes.push(format!(
                "{side} has no End event: its recording stops at count {}; compared up to there",
                group(s.last)
            ));
        }
    }
    let candidates = [
        compare_stream(StreamKind::Console, "Input", (&sa.inputs, &sa), (&sb.inputs, &sb), |x| x.0, describe_input),
        compare_stream(
            StreamKind::Interrupt,
            "Interrupt",
            (&sa.interrupts, &sa),
            (&sb.interrupts, &sb),
            |x| x.0,
            describe_interrupt,
        ),
        compare_stream(StreamKind::Io, "Io", (&sa.io, &sa), (&sb.io, &sb), |x| x.0, describe_io),
        compare_checkpoints(&sa, &sb),
        compare_ends(&sa, &sb),
    ];
    let mut first = candidates.into_iter().flatten().min_by_key(|d| d.count);
    if let Some(d) = first.as_mut() {
        d.nearest = nearest(&sa, &sb, d.count);
    }

    // What agreed before the divergence: pairs present in both with counts below it.
    let below = |c: u64| first.as_ref().is_none_or(|d| c < d.count);
    let pairs = |ca: &mut dyn Iterator<Item = u64>, cb: &mut dyn Iterator<Item = u64>| {
        ca.zip(cb).filter(|&(x, y)| below(x.min(y))).count() as u64
    };
    let mut compared = Counts {
        inputs: pairs(&mut sa.inputs.iter().map(|x| x.0), &mut sb.inputs.iter().map(|x| x.0)),
        interrupts: pairs(&mut sa.interrupts.iter().map(|x| x.0), &mut sb.interrupts.iter().map(|x| x.0)),
        io: pairs(&mut sa.io.iter().map(|x| x.0), &mut sb.io.iter().map(|x| x.0)),
        up_to: first.as_ref().map_or(sa.last.min(sb.last), |d| d.count),
        ..Counts::default()
    };
    let cb: BTreeMap<u64, &Checkpoint> = sb.checkpoints.iter().map(|c| (c.count, *c)).collect();
    for x in sa.checkpoints.iter().filter(|c| below(c.count)) {
        if let Some(y) = cb.get(&x.count) {
            compared.checkpoints += 1;
            if x.memory.is_some() && y.memory.is_some() {
                compared.memory_digests += 1;
            }
        }
    }
    DiffReport { header_notes, first, compared }
}

#[cfg(test)]
mod tests {
    use super::super::format::ImageDigest;
    use super::*;

    fn checkpoint(count: u64, memory: Option<MemoryDigest>) -> Checkpoint {
        Checkpoint {
            count,
            regs: Regs { gpr: [count as u32, 1, 2, 3, 0x9000, 0, 0, 0], eip: 0x1000 + count as u32, ..Regs::default() },
            console_len: count / 100,
            console_hash: count * 7,
            memory,
        }
    }

    fn trace() -> Trace {
        let mut events = vec![Event::Input { count: 0, point: InputPoint::Quantum, bytes: b"go\n".to_vec() }];
        for i in 1..=20u64 {
            let memory = (i % 5 == 0).then(|| MemoryDigest {
                whole: i,
                pages: if i == 5 { (0..40).map(|p| (p, p * 3)).collect() } else { vec![(i as u32, i as u32)] },
            });
            events.push(Event::Checkpoint(checkpoint(i * 1000, memory)));
            events.push(Event::Interrupt { count: i * 1000 + 10, vector: 0x20 });
            events.push(Event::Io { count: i * 1000 + 500, port: 0x3fd, size: 1, write: false, value: 0x60 });
        }
        events.push(Event::End(End { count: 21_000, outcome: "halt".into(), ..End::default() }));
        Trace {
            header: Header {
                popek_version: "0.1.0".into(),
                images: vec![ImageDigest { role: "kernel".into(), name: "vmlinuz".into(), len: 100, sha256: [1; 32] }],
                ..Header::default()
            },
            events,
        }
    }

    fn checkpoint_mut(t: &mut Trace, count: u64) -> &mut Checkpoint {
        t.events
            .iter_mut()
            .find_map(|e| match e {
                Event::Checkpoint(c) if c.count == count => Some(c),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn identical_traces_agree() {
        let r = diff(&trace(), &trace());
        assert_eq!(r.first, None);
        assert!(r.header_notes.is_empty());
        assert_eq!(
            r.compared,
            Counts { checkpoints: 20, memory_digests: 4, inputs: 1, interrupts: 20, io: 20, up_to: 21_000 }
        );
        let s = r.to_string();
        assert!(s.starts_with("traces agree on 20 checkpoints"), "{s}");
        assert!(s.ends_with("up to count 21_000"), "{s}");
    }

    #[test]
    fn changed_io_value_diverges_at_its_count() {
        let mut b = trace();
        for e in &mut b.events {
            if let Event::Io { count: 7500, value, .. } = e {
                *value = 0x61;
            }
        }
        let r = diff(&trace(), &b);
        let d = r.first.as_ref().unwrap();
        assert_eq!((d.count, d.kind, d.what.as_str()), (7500, StreamKind::Io, "Io #6"));
        assert_eq!(d.details, ["A in 0x3fd -> 0x60 at count 7_500", "B in 0x3fd -> 0x61 at count 7_500"]);
        assert_eq!(d.nearest, Some(Nearest { side: Side::A, count: 7000, eip: 0x1000 + 7000 }));
        assert_eq!(r.compared.io, 6);
        assert_eq!(r.compared.checkpoints, 7);
        let s = r.to_string();
        assert!(s.contains("traces diverge at count 7_500 in Io #6: A in 0x3fd -> 0x60"), "{s}");
        assert!(s.contains("EIP 0x00002b58"), "{s}");
    }

    #[test]
    fn changed_register_is_named() {
        let mut b = trace();
        checkpoint_mut(&mut b, 12_000).regs.gpr[3] = 0xdead;
        let r = diff(&trace(), &b);
        let d = r.first.unwrap();
        assert_eq!((d.count, d.kind), (12_000, StreamKind::Checkpoint));
        assert_eq!(d.details, ["EBX: A 0x00000003, B 0x0000dead"]);
    }

    #[test]
    fn changed_memory_page_is_named() {
        let mut b = trace();
        // Page 7 changes in the digest at 15 000 in B only; everything else the same.
        let m = checkpoint_mut(&mut b, 15_000).memory.as_mut().unwrap();
        m.pages.push((7, 0xbad));
        m.whole = 0xbad;
        let r = diff(&trace(), &b);
        let d = r.first.unwrap();
        assert_eq!(d.count, 15_000);
        assert!(d.details.iter().any(|s| s == "memory pages differ (1): 0x7"), "{:?}", d.details);
        assert!(d.details.iter().any(|s| s.starts_with("memory hash")), "{:?}", d.details);
        // Many pages: at most 16 named.
        let mut c = trace();
        let m = checkpoint_mut(&mut c, 5000).memory.as_mut().unwrap();
        for p in &mut m.pages {
            p.1 += 1;
        }
        let d = diff(&trace(), &c).first.unwrap();
        assert_eq!(d.count, 5000);
        assert!(d
            .details
            .iter()
            .any(|s| s.starts_with("memory pages differ (40): 0x0 0x1") && s.ends_with("0xf ... and 24 more")));
    }

    #[test]
    fn differing_images_are_a_header_note() {
        let mut b = trace();
        b.header.images[0].sha256[0] = 2;
        let r = diff(&trace(), &b);
        assert_eq!(r.first, None);
        assert_eq!(r.header_notes.len(), 1);
        assert!(
            r.header_notes[0].starts_with("image #0: A kernel vmlinuz (100 bytes, sha256 0101"),
            "{:?}",
            r.header_notes
        );
        assert!(r.to_string().starts_with("note: image #0"));
    }

    #[test]
    fn cut_off_trace_is_compared_up_to_its_end() {
        let mut b = trace();
        b.events.truncate(30); // up to the Interrupt at 10_010
        let r = diff(&trace(), &b);
        assert_eq!(r.first, None, "{r}");
        assert_eq!(r.compared.up_to, 10_010);
        assert!(r.header_notes[0].starts_with("B has no End event"));
        // A complete trace that ends before a cut-off one's last event diverges there.
        let mut a = trace();
        a.events.truncate(30);
        a.events.push(Event::End(End { count: 10_020, outcome: "triple fault".into(), ..End::default() }));
        let mut c = trace();
        c.events.pop();
        let d = diff(&a, &c).first.unwrap();
        assert_eq!((d.count, d.kind), (10_020, StreamKind::End));
        // A missing Io before the other's end is a divergence.
        let mut e = trace();
        e.events.retain(|e| !matches!(e, Event::Io { count: 3500, .. }));
        let d = diff(&trace(), &e).first.unwrap();
        assert_eq!((d.count, d.what.as_str()), (3500, "Io #2"));
    }

    #[test]
    fn compare_checkpoint_names_differences() {
        let a = checkpoint(1000, Some(MemoryDigest { whole: 1, pages: vec![] }));
        let mut b = a.clone();
        b.regs.sel[1] = 0x73;
        b.regs.cr3 = 0x5000;
        b.console_len += 1;
        let pa = BTreeMap::from([(1, 1), (2, 2)]);
        let pb = BTreeMap::from([(2, 3), (9, 9)]);
        assert_eq!(
            compare_checkpoint(&a, &b, &pa, &pb),
            [
                "CS: expected 0x0000, actual 0x0073",
                "CR3: expected 0x00000000, actual 0x00005000",
                "console length: expected 10, actual 11",
                "memory pages differ (3): 0x1 0x2 0x9",
            ]
        );
        assert!(compare_checkpoint(&a, &a, &pa, &pa).is_empty());
        // Without a digest on one side, memory is not compared.
        let c = Checkpoint { memory: None, ..a.clone() };
        assert!(compare_checkpoint(&a, &c, &pa, &pb).is_empty());
    }

    #[test]
    fn page_map_accumulates() {
        let mut m = PageMap::new();
        m.apply(&MemoryDigest { whole: 0, pages: vec![(1, 10), (2, 20)] });
        m.apply(&MemoryDigest { whole: 0, pages: vec![(2, 21), (5, 50)] });
        assert_eq!(m.pages(), &BTreeMap::from([(1, 10), (2, 21), (5, 50)]));
        assert_eq!(group(9_000_123), "9_000_123");
        assert_eq!(group(0), "0");
        assert_eq!(group(100), "100");
    }
}
