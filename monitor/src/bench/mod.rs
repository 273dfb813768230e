//! `popek bench`: every capability has a figure. Suites print one row per
//! figure and, with `--json FILE`, write the rows as JSON objects
//! `{suite, name, backend, value, unit}` (one array per run). A figure a
//! backend could not produce (the linux suite's `kvm` on an emulating
//! /dev/kvm, `qemu` with `--quick`) is a row with `value: null` and a
//! `skipped` field giving the reason.

pub mod bt;
pub mod host;
pub mod linux;
pub mod mmu;
pub mod nano;
pub mod replay;
pub mod worker;

use std::fmt::Write as _;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error("the benchmark guest stopped unexpectedly: {0}")]
    UnexpectedExit(String),
    #[error("a benchmark input is missing: {0}")]
    Input(String),
    #[error("unknown suite {0:?} (known: host, bt, mmu, linux, nano)")]
    UnknownSuite(String),
    #[error("unknown backend {backend:?} for suite {suite} (known: {known})")]
    UnknownBackend { suite: &'static str, backend: String, known: String },
    #[error("cannot jail the benchmark worker: {0}")]
    Jail(#[from] crate::jail::JailError),
}

/// Runs one suite by name.
pub fn run_suite(name: &str, quick: bool) -> Result<Vec<Row>, BenchError> {
    match name {
        "host" => host::run(quick),
        "bt" => bt::run(quick),
        "mmu" => mmu::run(quick),
        "linux" => linux::run(quick),
        "nano" => nano::run(quick),
        "replay" => replay::run(quick),
        other => Err(BenchError::UnknownSuite(other.into())),
    }
}

/// One measured figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub suite: String,
    pub name: String,
    pub backend: String,
    pub value: f64,
    pub unit: String,
    /// Why this figure was not measured on this backend (`value` is NaN).
    pub skipped: Option<String>,
}

impl Row {
    pub fn new(suite: &str, name: &str, backend: &str, value: f64, unit: &str) -> Row {
        Row { suite: suite.into(), name: name.into(), backend: backend.into(), value, unit: unit.into(), skipped: None }
    }

    /// A figure `backend` could not produce, and why.
    pub fn skipped(suite: &str, name: &str, backend: &str, unit: &str, reason: &str) -> Row {
        Row { skipped: Some(reason.into()), ..Row::new(suite, name, backend, f64::NAN, unit) }
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The rows as a JSON array of `{suite, name, backend, value, unit}`; a
/// skipped figure has `value: null` and a sixth field, `skipped: <reason>`.
pub fn to_json(rows: &[Row]) -> String {
    let mut o = String::from("[\n");
    for (i, r) in rows.iter().enumerate() {
        let value = if r.value.is_finite() { format!("{}", r.value) } else { "null".into() };
        let skipped = r.skipped.as_deref().map(|s| format!(", \"skipped\": {}", json_str(s))).unwrap_or_default();
        let _ = writeln!(
            o,
            "  {{\"suite\": {}, \"name\": {}, \"backend\": {}, \"value\": {}, \"unit\": {}{}}}{}",
            json_str(&r.suite),
            json_str(&r.name),
            json_str(&r.backend),
            value,
            json_str(&r.unit),
            skipped,
            if i + 1 < rows.len() { "," } else { "" }
        );
    }
    o.push(']');
    o.push('\n');
    o
}

/// The rows as an aligned text table; a skipped figure reads `skipped [n]`,
/// and note `[n]` under the table gives the reason.
pub fn to_table(rows: &[Row]) -> String {
    let mut o = format!("{:<8} {:<24} {:<8} {:>14} {}\n", "suite", "name", "backend", "value", "unit");
    let mut notes: Vec<(&str, &str)> = Vec::new();
    for r in rows {
        match &r.skipped {
            None => {
                let _ = writeln!(o, "{:<8} {:<24} {:<8} {:>14.3} {}", r.suite, r.name, r.backend, r.value, r.unit);
            }
            Some(why) => {
                let n = match notes.iter().position(|&(b, w)| b == r.backend && w == why) {
                    Some(i) => i + 1,
                    None => {
                        notes.push((&r.backend, why));
                        notes.len()
                    }
                };
                let cell = format!("skipped [{n}]");
                let _ = writeln!(o, "{:<8} {:<24} {:<8} {:>14} {}", r.suite, r.name, r.backend, cell, r.unit);
            }
        }
    }
    for (i, (b, why)) in notes.iter().enumerate() {
        let _ = writeln!(o, "[{}] {b}: skipped: {why}", i + 1);
    }
    o
}

/// Median of a non-empty sample.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_rows_have_the_five_fields() {
        let j = to_json(&[Row::new("host", "trap\"x", "bt", 1.5, "us")]);
        assert!(j.contains("\"suite\": \"host\""));
        assert!(j.contains("\"name\": \"trap\\\"x\""));
        assert!(j.contains("\"value\": 1.5"));
        assert!(j.trim_end().ends_with(']'));
        assert!(!j.contains("skipped"), "measured rows keep the five fields");
    }

    #[test]
    fn skipped_rows_say_why() {
        let rows = [Row::new("linux", "compute", "bt", 0.5, "s"), Row::skipped("linux", "compute", "kvm", "s", "slow")];
        let j = to_json(&rows);
        assert!(
            j.contains(r#"{"suite": "linux", "name": "compute", "backend": "kvm", "value": null, "unit": "s", "skipped": "slow"}"#),
            "{j}"
        );
        let t = to_table(&rows);
        assert!(t.contains("skipped [1] s"), "{t}");
        assert!(t.contains("[1] kvm: skipped: slow"), "{t}");
    }

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
