//! Jailed benchmark processes. The micro suites (`host`, `bt`, `mmu`) run
//! their VMs in the measuring process itself, so `popek bench` starts itself
//! again as a worker (`popek bench --suite S --worker`): the worker closes
//! the jail before the first guest instruction and prints its rows, one
//! per line, for the parent, which stays free to start QEMU or native
//! programs. The library's suite functions stay in-process (tests call
//! them directly); the jail is the binary's business.

use std::path::Path;
use std::process::{Command, Stdio};

use super::{BenchError, Row};

/// Suites whose whole run happens in a jailed worker.
pub const JAILED_SUITES: &[&str] = &["host", "bt", "mmu"];

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
    Ok(rows)
}

/// The worker's side: close the jail, run `suite`, print its rows.
pub fn serve(suite: &str, quick: bool) -> Result<(), BenchError> {
    // The window reads /proc while it reserves the low 4 GiB: before the
    // jail takes /proc away.
    crate::host::Window::get()?;
    crate::jail::enter(crate::jail::Profile::Bt)?;
    for r in super::run_suite(suite, quick)? {
        println!("{}", to_line(&r));
    }
    Ok(())
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
