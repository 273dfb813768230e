//! Jailed benchmark processes. The micro suites (`host`, `bt`, `mmu`) run
//! their VMs in the measuring process itself, so `popek bench` starts itself
//! again as a worker (`popek bench --suite S --worker`): the worker closes
//! the jail before the first guest instruction and prints its rows, one
//! per line, for the parent, which stays free to start QEMU or native
//! programs. The library's suite functions stay in-process (tests call
//! them directly); the jail is the binary's business.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::{BenchError, Row};

/// Suites whose whole run happens in a jailed worker (`replay`: its
/// in-process part; its traces are recorded and replayed by `popek`
/// children, see [`super::replay::trace_rows`]).
pub const JAILED_SUITES: &[&str] = &["host", "bt", "mmu", "replay"];

const PREFIX: &str = "POPEK-ROW\t";

/// One row as a worker line: the prefix, then the row as JSON (as in
/// `--json`, so text fields survive whole).
pub fn to_line(r: &Row) -> String {
    format!("{PREFIX}{}", serde_json::to_string(r).expect("a row of strings and a number serializes"))
}

/// A worker line back into a row (`None` for other output).
pub fn from_line(line: &str) -> Option<Row> {
    serde_json::from_str(line.strip_prefix(PREFIX)?).ok()
}

/// Runs `suite` in a jailed worker started from `exe` (the `popek`
/// binary) and returns its rows. The worker's stderr passes through.
pub fn run_jailed(exe: &Path, suite: &str, quick: bool) -> Result<Vec<Row>, BenchError> {
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "--suite", suite, "--worker"]).stdin(Stdio::null()).stderr(Stdio::inherit());
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd.output().map_err(|e| BenchError::Input(format!("cannot start {}: {e}", exe.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(BenchError::UnexpectedExit(format!("the jailed {suite} worker ended with {}\n{text}", out.status)));
    }
    let mut rows = Vec::new();
    for line in text.lines() {
        match from_line(line) {
            Some(r) => rows.push(r),
            None => println!("{line}"),
        }
    }
    if suite == "replay" {
        // The trace figures: `popek run --record` and `popek replay`
        // children, each jailed on its own.
        rows.extend(super::replay::trace_rows(quick, Some(exe))?);
    }
    Ok(rows)
}

/// The worker's side: close the jail, run `suite`, print its rows.
pub fn serve(suite: &str, quick: bool) -> Result<(), BenchError> {
    // The window reads /proc while it reserves the low 4 GiB: before the
    // jail takes /proc away.
    crate::host::Window::get()?;
    crate::jail::enter(crate::jail::Profile::Bt)?;
    let rows = match suite {
        "replay" => super::replay::compute_rows(quick)?,
        other => super::run_suite(other, quick)?,
    };
    for r in rows {
        println!("{}", to_line(&r));
    }
    Ok(())
}

/// What a `popek run` child printed: its stdout lines, each with the
/// seconds since the child was started, its stderr, and whether it exited
/// successfully.
pub struct ChildRun {
    pub lines: Vec<(f64, String)>,
    pub stderr: String,
    pub success: bool,
}

impl ChildRun {
    /// The stdout lines as one text.
    pub fn text(&self) -> String {
        self.lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// The counters `popek run --stats` printed (`  name value` lines after
    /// `popek: counters`).
    pub fn stats(&self) -> Vec<(String, u64)> {
        self.stderr
            .lines()
            .skip_while(|l| !l.starts_with("popek: counters"))
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.to_owned(), w.next()?.parse().ok()?))
            })
            .collect()
    }
}

/// Runs `exe run ARGS` (a VM in a process of its own, jailed as every
/// `popek run` is), timing its console lines from the start; killed after
/// `timeout`. How the suites that compare with QEMU and native run their
/// own VMs from the `popek` binary.
pub fn popek_run(exe: &Path, args: &[String], timeout: Duration) -> Result<ChildRun, BenchError> {
    let mut all = vec!["run".to_owned()];
    all.extend_from_slice(args);
    all.push("--no-input".to_owned());
    popek_command(exe, &all, timeout)
}

/// Runs `exe ARGS` (any subcommand), as [`popek_run`] does.
pub fn popek_command(exe: &Path, args: &[String], timeout: Duration) -> Result<ChildRun, BenchError> {
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError::Input(format!("cannot start {}: {e}", exe.display())))?;
    let out = child.stdout.take().expect("piped stdout");
    let err = child.stderr.take().expect("piped stderr");
    let (tx, rx) = channel();
    let reader = std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send((start.elapsed().as_secs_f64(), l.trim_end_matches('\r').to_owned())).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(err), &mut s);
        s
    });
    let mut lines = Vec::new();
    let mut killed = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => lines.push(l),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) if !killed && start.elapsed() > timeout => {
                let _ = child.kill();
                killed = true;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    let st = child.wait().map_err(|e| BenchError::UnexpectedExit(format!("waiting for popek run: {e}")))?;
    if killed {
        let tail: Vec<&str> = lines.iter().rev().take(20).map(|(_, l)| l.as_str()).collect();
        return Err(BenchError::UnexpectedExit(format!(
            "popek run did not finish within {timeout:?}; output so far:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )));
    }
    Ok(ChildRun { lines, stderr, success: st.success() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_the_worker_line() {
        let rows = [
            Row::new("host", "trap_roundtrip", "bt", 8.25, "us"),
            Row::skipped("nano", "syscall", "kvm", "cycles", "no\t/dev/kvm\nhere"),
        ];
        for r in &rows {
            let back = from_line(&to_line(r)).expect("parses");
            assert_eq!(back.name, r.name);
            assert_eq!(back.backend, r.backend);
            assert_eq!(back.unit, r.unit);
            assert!(back.value.to_bits() == r.value.to_bits() || (back.value.is_nan() && r.value.is_nan()));
        }
        assert_eq!(from_line(&to_line(&rows[1])).unwrap().skipped.as_deref(), Some("no\t/dev/kvm\nhere"));
        assert_eq!(from_line(&to_line(&rows[0])).unwrap(), rows[0]);
        assert!(from_line("linux: nb32 scale 0.3").is_none());
    }
}
