//! `popek bench --suite replay`: what the deterministic mode and recording
//! cost (issue 7's targets: the deterministic mode at least half the speed
//! of the normal bt mode on the compute loop; recording under 10 % on top).
//!
//! - `det_compute_ratio`: the bt suite's kernel compute loop in the normal
//!   mode against the deterministic mode (counting at every block entry):
//!   normal time / deterministic time, medians.
//! - `record_overhead`: the built-in demo guest run deterministically with
//!   and without recording a trace: recording wall time / plain wall time,
//!   medians (the same instructions in both, by construction).
//! - `replay_rate`: guest instructions per second replaying that trace.
//! - `trace_bytes_per_minsn`: the trace's size per million instructions.

use super::{median, BenchError, Row};
use crate::backend::bt::BtConfig;
use crate::deterministic::DetOptions;
use crate::run::{run_deterministic, DetSession, RunOptions};
use crate::trace::format::Trace;

fn run_err(e: crate::run::RunError) -> BenchError {
    BenchError::UnexpectedExit(format!("deterministic run: {e}"))
}

pub fn run(quick: bool) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    let runs = if quick { 3 } else { 5 };
    let iters = if quick { 20_000_000 } else { 200_000_000 };
    let normal = super::bt::compute_seconds(BtConfig::default(), iters, runs)?;
    let det = super::bt::compute_seconds(BtConfig { deterministic: true, ..BtConfig::default() }, iters, runs)?;
    rows.push(Row::new("replay", "compute_normal_s", "bt", normal, "s"));
    rows.push(Row::new("replay", "compute_deterministic_s", "bt", det, "s"));
    rows.push(Row::new("replay", "det_compute_ratio", "bt", normal / det, "ratio"));

    let opts = RunOptions { guest: Some("demo".into()), ..RunOptions::default() };
    let dir = std::env::temp_dir().join(format!("popek-bench-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Input(format!("{}: {e}", dir.display())))?;
    let path = dir.join("demo.trace");
    let det_opts = DetOptions::default();
    let (mut plain, mut record, mut replay) = (Vec::new(), Vec::new(), Vec::new());
    let mut count = 0;
    for _ in 0..runs {
        let r =
            run_deterministic(&opts, &det_opts, DetSession::Plain, "", Box::new(std::io::sink())).map_err(run_err)?;
        plain.push(r.wall.as_secs_f64());
        let session = DetSession::Record { path: path.clone(), input: None };
        let r = run_deterministic(&opts, &det_opts, session, "", Box::new(std::io::sink())).map_err(run_err)?;
        record.push(r.wall.as_secs_f64());
        count = r.count;
        let trace = Trace::read(&path).map_err(|e| BenchError::Input(format!("{}: {e}", path.display())))?;
        let r = run_deterministic(&opts, &det_opts, DetSession::Replay(Box::new(trace)), "", Box::new(std::io::sink()))
            .map_err(run_err)?;
        replay.push(r.wall.as_secs_f64());
    }
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let _ = std::fs::remove_dir_all(&dir);
    let (plain, record, replay) = (median(plain), median(record), median(replay));
    rows.push(Row::new("replay", "demo_plain_s", "bt", plain, "s"));
    rows.push(Row::new("replay", "demo_record_s", "bt", record, "s"));
    rows.push(Row::new("replay", "record_overhead", "bt", record / plain, "ratio"));
    rows.push(Row::new("replay", "replay_rate", "bt", count as f64 / replay / 1e6, "M insns/s"));
    rows.push(Row::new("replay", "trace_bytes_per_minsn", "bt", bytes as f64 / (count as f64 / 1e6), "bytes"));
    Ok(rows)
}
