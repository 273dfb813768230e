//! `popek bench`: every capability has a figure. Suites print one row per
//! figure and, with `--json FILE`, write the rows as JSON objects
//! `{suite, name, backend, value, unit}` (one array per run). A figure a
//! backend could not produce (the linux suite's `kvm` on an emulating
//! /dev/kvm, `qemu` with `--quick`) is a row with `value: null` and a
//! `skipped` field giving the reason.

pub mod bt;
pub mod distro;
pub mod host;
pub mod linux;
pub mod mmu;
pub mod nano;
pub mod replay;
pub mod worker;
pub mod workloads;

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
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
    #[error("unknown suite {0:?} (known: host, bt, mmu, linux, nano, replay, workloads, distro)")]
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
        "workloads" => workloads::run(quick),
        "distro" => distro::run(quick),
        other => Err(BenchError::UnknownSuite(other.into())),
    }
}

/// One measured figure. Serialized as one JSON object
/// `{suite, name, backend, value, unit}`, plus `skipped` when the figure
/// was not measured (`value` is then `null`); read back the same way (the
/// jailed worker's rows, [`worker`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub suite: String,
    pub name: String,
    pub backend: String,
    /// NaN for a skipped figure, written as JSON `null`.
    #[serde(serialize_with = "finite_or_null", deserialize_with = "null_as_nan")]
    pub value: f64,
    pub unit: String,
    /// Why this figure was not measured on this backend (`value` is NaN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

    /// Whether this figure was measured (not skipped, and a number).
    pub fn measured(&self) -> bool {
        self.skipped.is_none() && self.value.is_finite()
    }
}

fn finite_or_null<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_none()
    }
}

fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The result of a suite that compares backends (nano, linux): the rows,
/// skipped figures included, and for each backend that did not run, why.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub suite: &'static str,
    /// The requested backends, in column order.
    pub backends: Vec<String>,
    pub rows: Vec<Row>,
    /// `(backend, reason)` for each backend that did not run.
    pub skipped: Vec<(String, String)>,
}

impl Report {
    pub fn new(suite: &'static str, backends: &[String]) -> Report {
        Report { suite, backends: backends.to_vec(), ..Report::default() }
    }

    /// The one way a suite reports a backend it could not run: prints
    /// `<suite>: <backend> skipped: <reason>`, adds one [`Row::skipped`]
    /// per figure (`(name, unit)`) the backend would have produced, and
    /// notes the reason.
    pub fn skip(&mut self, backend: &str, figures: &[(&str, &str)], reason: &str) {
        println!("{}: {backend} skipped: {reason}", self.suite);
        self.rows.extend(figures.iter().map(|(name, unit)| Row::skipped(self.suite, name, backend, unit, reason)));
        self.skipped.push((backend.to_owned(), reason.to_owned()));
    }

    /// Why `backend` did not run, if it did not.
    pub fn skip_reason(&self, backend: &str) -> Option<&str> {
        self.skipped.iter().find(|(b, _)| b == backend).map(|(_, why)| why.as_str())
    }
}

/// The rows as a JSON array, one object per line: `{suite, name, backend,
/// value, unit}`; a skipped figure has `value: null` and a sixth field,
/// `skipped: <reason>`.
pub fn to_json(rows: &[Row]) -> String {
    let lines: Vec<String> =
        rows.iter().map(|r| serde_json::to_string(r).expect("a row of strings and a number serializes")).collect();
    format!("[\n{}\n]\n", lines.join(",\n"))
}

/// The rows as an aligned text table; a skipped figure reads `skipped [n]`,
/// and note `[n]` under the table gives the reason.
pub fn to_table(rows: &[Row]) -> String {
    let mut o = format!("{:<9} {:<24} {:<8} {:>14} {}\n", "suite", "name", "backend", "value", "unit");
    let mut notes: Vec<(&str, &str)> = Vec::new();
    for r in rows {
        match &r.skipped {
            None => {
                let _ = writeln!(o, "{:<9} {:<24} {:<8} {:>14.3} {}", r.suite, r.name, r.backend, r.value, r.unit);
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
                let _ = writeln!(o, "{:<9} {:<24} {:<8} {:>14} {}", r.suite, r.name, r.backend, cell, r.unit);
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
        let j = to_json(&[Row::new("host", "trap\"x\n", "bt", 1.5, "us")]);
        assert!(j.contains(r#"{"suite":"host","name":"trap\"x\n","backend":"bt","value":1.5,"unit":"us"}"#), "{j}");
        assert!(j.starts_with("[\n"));
        assert!(j.trim_end().ends_with(']'));
        assert!(!j.contains("skipped"), "measured rows keep the five fields");
    }

    #[test]
    fn skipped_rows_say_why() {
        let rows = [Row::new("linux", "compute", "bt", 0.5, "s"), Row::skipped("linux", "compute", "kvm", "s", "slow")];
        let j = to_json(&rows);
        assert!(
            j.contains(
                r#"{"suite":"linux","name":"compute","backend":"kvm","value":null,"unit":"s","skipped":"slow"}"#
            ),
            "{j}"
        );
        let t = to_table(&rows);
        assert!(t.contains("skipped [1] s"), "{t}");
        assert!(t.contains("[1] kvm: skipped: slow"), "{t}");
    }

    #[test]
    fn report_skip_adds_a_null_row_per_figure() {
        let mut r = Report::new("nano", &["bt".into(), "kvm".into()]);
        r.skip("kvm", &[("syscall", "cycles"), ("in", "cycles")], "no \"kvm\"");
        assert_eq!(r.skip_reason("kvm"), Some("no \"kvm\""));
        assert_eq!(r.skip_reason("bt"), None);
        assert_eq!(r.rows.len(), 2);
        assert!(r.rows.iter().all(|row| !row.measured() && row.backend == "kvm" && row.suite == "nano"));
        let j = to_json(&r.rows);
        assert!(
            j.contains(
                r#"{"suite":"nano","name":"in","backend":"kvm","value":null,"unit":"cycles","skipped":"no \"kvm\""}"#
            ),
            "{j}"
        );
    }

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
