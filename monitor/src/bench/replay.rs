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

/// Every figure, in this process (tests; `popek bench` splits it: see
/// [`compute_rows`] and [`trace_rows`]).
pub fn run(quick: bool) -> Result<Vec<Row>, BenchError> {
    let mut rows = compute_rows(quick)?;
    rows.extend(trace_rows(quick, None)?);
    Ok(rows)
}

/// `det_compute_ratio`: the compute loop, normal against deterministic.
pub fn compute_rows(quick: bool) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    let runs = if quick { 3 } else { 5 };
    let iters = if quick { 20_000_000 } else { 200_000_000 };
    let normal = super::bt::compute_seconds(BtConfig::default(), iters, runs)?;
    let det = super::bt::compute_seconds(BtConfig { deterministic: true, ..BtConfig::default() }, iters, runs)?;
    rows.push(Row::new("replay", "compute_normal_s", "bt", normal, "s"));
    rows.push(Row::new("replay", "compute_deterministic_s", "bt", det, "s"));
    rows.push(Row::new("replay", "det_compute_ratio", "bt", normal / det, "ratio"));
    Ok(rows)
}

/// The demo guest plain, recorded and replayed: in this process, or with
/// `popek` as jailed `popek run`/`popek replay` children timed from
/// outside (their figures then include process start-up, a few ms of
/// seconds-long runs).
pub fn trace_rows(quick: bool, popek: Option<&std::path::Path>) -> Result<Vec<Row>, BenchError> {
    if let Some(exe) = popek {
        return trace_rows_jailed(quick, exe);
    }
    let runs = if quick { 3 } else { 5 };
    let mut rows = Vec::new();
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

fn trace_rows_jailed(quick: bool, exe: &std::path::Path) -> Result<Vec<Row>, BenchError> {
    use super::worker::popek_command;
    let runs = if quick { 3 } else { 5 };
    let limit = std::time::Duration::from_secs(300);
    let dir = std::env::temp_dir().join(format!("popek-bench-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Input(format!("{}: {e}", dir.display())))?;
    let path = dir.join("demo.trace").display().to_string();
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let timed = |a: &[String]| -> Result<(f64, super::worker::ChildRun), BenchError> {
        let t = std::time::Instant::now();
        let r = popek_command(exe, a, limit)?;
        if !r.success {
            return Err(BenchError::UnexpectedExit(format!("popek {}: {}", a.join(" "), r.stderr)));
        }
        Ok((t.elapsed().as_secs_f64(), r))
    };
    let (mut plain, mut record, mut replay) = (Vec::new(), Vec::new(), Vec::new());
    let mut count = 0u64;
    for _ in 0..runs {
        plain.push(timed(&args(&["run", "--guest", "demo", "--deterministic", "--no-input"]))?.0);
        let (t, r) = timed(&args(&["run", "--guest", "demo", "--record", &path, "--no-input"]))?;
        record.push(t);
        count = r
            .stderr
            .split("at instruction ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| BenchError::UnexpectedExit(format!("no instruction count in: {}", r.stderr)))?;
        replay.push(timed(&args(&["replay", &path, "--quiet"]))?.0);
    }
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let _ = std::fs::remove_dir_all(&dir);
    let (plain, record, replay) = (median(plain), median(record), median(replay));
    Ok(vec![
        Row::new("replay", "demo_plain_s", "bt", plain, "s"),
        Row::new("replay", "demo_record_s", "bt", record, "s"),
        Row::new("replay", "record_overhead", "bt", record / plain, "ratio"),
        Row::new("replay", "replay_rate", "bt", count as f64 / replay / 1e6, "M insns/s"),
        Row::new("replay", "trace_bytes_per_minsn", "bt", bytes as f64 / (count as f64 / 1e6), "bytes"),
    ])
}
