//! Names the first diverging instruction of a replay that went wrong under
//! other translator switches than the recording's (a translation bug).
//!
//! Checkpoints are coarse; between the last good one and the divergence
//! there may be millions of instructions. Both configurations are
//! deterministic, so the localizer simply runs them again from the start,
//! side by side in time: first with a checkpoint every `(to - from) / 1024`
//! instructions to find the window where their registers part, then with a
//! checkpoint after every instruction of that window. The first instruction
//! after which the registers differ is the one the candidate translates
//! wrongly.

use crate::deterministic::{DetError, DetOptions, PageHashes, Session, Wait};
use crate::run::{run_deterministic, DetSession, RunError, RunOptions};
use crate::trace::format::{Checkpoint, End, Event, Header, InputPoint, Regs, Trace};

/// The instruction the localizer found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Localized {
    /// Its instruction count (it is the `count + 1`-th instruction).
    pub count: u64,
    pub eip: u32,
    /// The instruction, disassembled from the reference run.
    pub code: String,
    /// Register state after it, in the reference and the candidate.
    pub reference: Regs,
    pub candidate: Regs,
}

impl std::fmt::Display for Localized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first = self.code.lines().next().unwrap_or("?").trim();
        writeln!(f, "first diverging instruction: #{} at EIP {:#010x}: {first}", self.count, self.eip)?;
        for d in regs_diff(&self.reference, &self.candidate) {
            writeln!(f, "  after it: {d}")?;
        }
        Ok(())
    }
}

/// Named register differences, "EAX: reference 0x00000001, candidate 0x00000002".
pub fn regs_diff(a: &Regs, b: &Regs) -> Vec<String> {
    let mut v = Vec::new();
    crate::trace::diff::compare_regs(&mut v, ("reference", "candidate"), a, b);
    v
}

/// Feeds a trace's console input back and keeps every checkpoint's registers.
struct Collector {
    inputs: std::collections::VecDeque<(u64, InputPoint, Vec<u8>)>,
    regs: Vec<(u64, Regs)>,
}

impl Collector {
    fn new(trace: &Trace) -> Collector {
        let inputs = trace
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Input { count, point, bytes } => Some((*count, *point, bytes.clone())),
                _ => None,
            })
            .collect();
        Collector { inputs, regs: Vec::new() }
    }
}

impl Session for Collector {
    fn input(&mut self, count: u64, point: InputPoint, _wait: Wait) -> Result<Vec<u8>, DetError> {
        let mut bytes = Vec::new();
        while let Some((c, p, b)) = self.inputs.front() {
            if *c < count {
                self.inputs.pop_front();
                continue;
            }
            if *c > count || *p != point {
                break;
            }
            bytes.extend_from_slice(b);
            self.inputs.pop_front();
        }
        Ok(bytes)
    }
    fn observe(&mut self, _event: Event) -> Result<(), DetError> {
        Ok(())
    }
    fn checkpoint(&mut self, cp: Checkpoint, _pages: &PageHashes) -> Result<(), DetError> {
        if self.regs.last().map(|r| r.0) != Some(cp.count) {
            self.regs.push((cp.count, cp.regs));
        }
        Ok(())
    }
    fn end(&mut self, _end: End) -> Result<(), DetError> {
        Ok(())
    }
}

/// Runs `opts` on the trace's input from the start to `to`, with a
/// checkpoint every `every` instructions from `from` on.
fn collect(opts: &RunOptions, trace: &Trace, from: u64, to: u64, every: u64) -> Result<Vec<(u64, Regs)>, RunError> {
    let mut c = Collector::new(trace);
    let det = DetOptions {
        checkpoint_every: every,
        checkpoint_from: from,
        memory_every: u64::MAX,
        input_quantum: trace.header.input_quantum,
        until: Some(to),
        stress_kick_us: None,
    };
    let header: Box<Header> = Box::new(trace.header.clone());
    let session = DetSession::Custom { header, session: &mut c };
    run_deterministic(opts, &det, session, "", Box::new(std::io::sink()))?;
    Ok(c.regs)
}

/// The first `(count, reference, candidate)` whose registers differ (a
/// checkpoint missing on one side counts as a difference).
fn first_difference(a: &[(u64, Regs)], b: &[(u64, Regs)]) -> Option<(usize, u64)> {
    for i in 0..a.len().max(b.len()) {
        match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) if x == y => continue,
            (Some(x), _) => return Some((i, x.0)),
            (None, Some(y)) => return Some((i, y.0)),
            (None, None) => break,
        }
    }
    None
}

/// Finds the first instruction in `(from, to]` after which `candidate`'s
/// registers differ from `reference`'s on the trace's input. `None` when
/// the registers agree all the way (the difference is in memory or devices).
pub fn localize(
    reference: &RunOptions,
    candidate: &RunOptions,
    trace: &Trace,
    from: u64,
    to: u64,
) -> Result<Option<Localized>, RunError> {
    // One past the divergence: an injection or a port read at `to` shows in
    // the registers only after it.
    let to = to.max(from) + 1;
    let every = ((to - from) / 1024).max(1);
    let (mut lo, mut hi) = (from, to);
    if every > 1 {
        let a = collect(reference, trace, from, to, every)?;
        let b = collect(candidate, trace, from, to, every)?;
        let Some((i, at)) = first_difference(&a, &b) else { return Ok(None) };
        hi = at;
        lo = if i == 0 { from } else { a[i - 1].0 };
    }
    let a = collect(reference, trace, lo, hi, 1)?;
    let b = collect(candidate, trace, lo, hi, 1)?;
    let Some((i, at)) = first_difference(&a, &b) else { return Ok(None) };
    let (Some(before), Some(after_ref)) = (i.checked_sub(1).and_then(|j| a.get(j)), a.get(i)) else {
        return Ok(None);
    };
    let after_cand = b.get(i).map(|x| x.1).unwrap_or_default();
    // The instruction itself, as the reference saw it.
    let det = DetOptions {
        checkpoint_every: u64::MAX,
        memory_every: u64::MAX,
        input_quantum: trace.header.input_quantum,
        until: Some(before.0),
        checkpoint_from: u64::MAX,
        stress_kick_us: None,
    };
    let mut c = Collector::new(trace);
    let header = Box::new(trace.header.clone());
    let report = run_deterministic(
        reference,
        &det,
        DetSession::Custom { header, session: &mut c },
        "",
        Box::new(std::io::sink()),
    )?;
    let code = match report.outcome {
        crate::deterministic::DetOutcome::Stopped { code, .. } => code,
        _ => String::new(),
    };
    debug_assert_eq!(at, before.0 + 1);
    Ok(Some(Localized { count: before.0, eip: before.1.eip, code, reference: after_ref.1, candidate: after_cand }))
}
