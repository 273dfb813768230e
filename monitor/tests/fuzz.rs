//! `popek fuzz` as a user runs it (issue 15, docs/reliability.md): every
//! target for a few seconds with a fixed seed finds nothing; the supervisor
//! turns panics, aborts, hangs, huge allocations and stack overflows into
//! failures with reproducers; the regression corpus (inputs that once
//! failed) passes.

use std::path::{Path, PathBuf};
use std::process::Command;

const POPEK: &str = env!("CARGO_BIN_EXE_popek");

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popek-fuzz-it-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every target, 2 s each, seed 15: no failure, and each ran inputs.
#[test]
fn every_target_runs_clean_for_a_few_seconds() {
    let dir = scratch("all");
    let json = dir.join("rows.json");
    let out = Command::new(POPEK)
        .args(["fuzz", "all", "--seconds", "2", "--seed", "15", "--hang-seconds", "20"])
        .arg("--json")
        .arg(&json)
        .arg("--out")
        .arg(dir.join("repro"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(out.status.success(), "popek fuzz all failed:\n{stdout}\n{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["target"].as_str().unwrap()).collect();
    assert_eq!(names, ["bzimage", "multiboot", "initramfs", "trace", "replay", "virtio", "platform"]);
    for r in &rows {
        assert_eq!(r["failures"], 0, "{r}");
        assert!(r["inputs"].as_u64().unwrap() > 100, "{r}");
        assert!(r["seconds"].as_f64().unwrap() >= 1.9, "{r}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn reproducers(dir: &Path, kind: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("selftest-{kind}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// The driver's own failure paths, on a target that fails on purpose.
#[test]
fn the_supervisor_keeps_what_killed_the_worker() {
    let dir = scratch("selftest");
    let out = Command::new(POPEK)
        .args(["fuzz", "selftest", "--seconds", "4", "--seed", "3", "--hang-seconds", "0.5"])
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert_eq!(out.status.code(), Some(1), "failures make the exit status 1");
    // A worker prints each failure as it finds it (stderr); the summary
    // (stdout) has those of the workers that lived to report.
    let all = format!("{stdout}{stderr}");
    assert!(all.contains("selftest panic"), "a caught panic with its message");
    assert!(all.contains("selftest property"), "a violated property");
    assert!(stdout.contains("signal 6"), "an abort (guard, stack overflow or abort()) kills the worker");
    assert!(stdout.contains("ran longer than 0.5 s"), "a hang is killed");
    // A crash's or a hang's reproducer is the input that was running.
    for kind in ["crash", "hang"] {
        let files = reproducers(&dir, kind);
        assert!(!files.is_empty(), "no {kind} reproducer");
        for f in files {
            let case = std::fs::read(&f).unwrap().get(..2).map(|b| (b[0], b[1] % 8));
            let expected: &[u8] = if kind == "hang" { &[3] } else { &[2, 4, 5] };
            assert!(
                case.is_some_and(|(m, c)| m == 0xFF && expected.contains(&c)),
                "{kind} reproducer {} is {case:?}",
                f.display()
            );
        }
    }
    assert!(!reproducers(&dir, "fail").is_empty());
    // Each kind once, by hand, through --repro (in process, guard armed).
    for (case, code, says) in [
        (1u8, Some(1), "selftest panic"),
        (6, Some(1), "selftest property"),
        (2, None, ""),
        (4, None, "above the guard's limit"),
        (5, None, "overflowed its stack"),
    ] {
        let f = dir.join(format!("case-{case}.bin"));
        std::fs::write(&f, [0xFF, case]).unwrap();
        let r = Command::new(POPEK).args(["fuzz", "selftest", "--repro"]).arg(&f).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
        assert_eq!(r.status.code(), code, "case {case}: {text}");
        assert!(text.contains(says), "case {case}: {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Inputs that once failed (docs/reliability.md, "Bugs found"): each target
/// directory of tests/fuzz-corpus is replayed on its target.
#[test]
fn regression_corpus_passes() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus");
    let mut n = 0;
    for entry in std::fs::read_dir(&corpus).unwrap() {
        let dir = entry.unwrap().path();
        let target = dir.file_name().unwrap().to_string_lossy().to_string();
        let out = Command::new(POPEK).args(["fuzz", &target, "--repro"]).arg(&dir).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{target}: {stdout}");
        n += stdout.lines().filter(|l| l.ends_with(": ok")).count();
    }
    assert!(n > 0, "an empty corpus");
}
