//! Runs the fuzz driver in a child process (`popek fuzz --worker`) so that
//! what `catch_unwind` cannot catch still ends as a reported failure with a
//! reproducer: a hang (an input running longer than the hang limit), an
//! abort (the allocation guard, a double panic), a stack overflow, a
//! signal. The child writes the input it is about to run into a small
//! shared file before each one (one `pwrite`); when it dies, that is the
//! culprit. The parent then starts a new child on a derived seed for the
//! rest of the time.
//!
//! Shared file layout (little-endian u64s): inputs done, failures, sequence
//! number of the running input, its length, then its bytes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{write_reproducer, FuzzError, Options, Progress, Report, TargetInfo};

const OFF_COUNTERS: u64 = 0;
const OFF_INPUT: u64 = 16;
/// New children after crashes, at most, per target run.
const MAX_RESTARTS: u32 = 32;

/// The child's side: a [`Progress`] that writes into the shared file.
pub struct SharedFile {
    file: File,
    scratch: Vec<u8>,
}

impl SharedFile {
    pub fn open(path: &Path) -> Result<SharedFile, FuzzError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| FuzzError::Io { path: path.to_owned(), source })?;
        Ok(SharedFile { file, scratch: Vec::new() })
    }
}

impl Progress for SharedFile {
    fn starting(&mut self, seq: u64, input: &[u8]) {
        self.scratch.clear();
        self.scratch.extend_from_slice(&(seq + 1).to_le_bytes());
        self.scratch.extend_from_slice(&(input.len() as u64).to_le_bytes());
        self.scratch.extend_from_slice(input);
        // Best effort: a failed write only loses the reproducer of a crash.
        let _ = self.file.write_all_at(&self.scratch, OFF_INPUT);
    }

    fn counters(&mut self, inputs: u64, failures: u64) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&inputs.to_le_bytes());
        b[8..].copy_from_slice(&failures.to_le_bytes());
        let _ = self.file.write_all_at(&b, OFF_COUNTERS);
    }
}

fn read_u64(f: &File, off: u64) -> u64 {
    let mut b = [0u8; 8];
    match f.read_exact_at(&mut b, off) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => 0,
    }
}

/// What the shared file says about a dead child: counters and the input
/// that was running.
fn salvage(f: &File) -> (u64, u64, Vec<u8>) {
    let inputs = read_u64(f, OFF_COUNTERS);
    let failures = read_u64(f, OFF_COUNTERS + 8);
    let len = read_u64(f, OFF_INPUT + 8).min(1 << 24) as usize;
    let mut input = vec![0u8; len];
    if f.read_exact_at(&mut input, OFF_INPUT + 16).is_err() {
        input.clear();
    }
    (inputs, failures, input)
}

fn derive_seed(seed: u64, restart: u32) -> u64 {
    super::Rng::new(seed ^ u64::from(restart).wrapping_mul(0xA076_1D64_78BD_642F)).next_u64()
}

/// Fuzzes `info` in child processes of `exe` (this `popek`), for
/// `opts.seconds` in all; an input running longer than `hang` is a failure.
pub fn supervise(exe: &Path, info: &TargetInfo, opts: &Options, hang: Duration) -> Result<Report, FuzzError> {
    std::fs::create_dir_all(&opts.out).map_err(|source| FuzzError::Io { path: opts.out.clone(), source })?;
    let shared_path: PathBuf = opts.out.join(format!(".{}-{}.inflight", info.name, std::process::id()));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(opts.seconds.max(0.0));
    let mut total = Report { target: info.name.to_string(), seed: opts.seed, ..Report::default() };
    let mut restart = 0u32;
    let result = loop {
        let now = Instant::now();
        if restart > 0 && (now >= deadline || opts.max_inputs.is_some_and(|m| total.inputs >= m)) {
            break Ok(());
        }
        let shared = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&shared_path)
            .map_err(|source| FuzzError::Io { path: shared_path.clone(), source })?;
        let seed = if restart == 0 { opts.seed } else { derive_seed(opts.seed, restart) };
        let mut cmd = Command::new(exe);
        cmd.args(["fuzz", info.name, "--worker", "--seed", &seed.to_string()])
            .arg("--seconds")
            .arg(format!("{:.3}", deadline.saturating_duration_since(now).as_secs_f64()))
            .arg("--out")
            .arg(&opts.out)
            .arg("--shared")
            .arg(&shared_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null());
        if let Some(m) = opts.max_inputs {
            cmd.arg("--max-inputs").arg(m.saturating_sub(total.inputs).to_string());
        }
        let mut child = cmd.spawn().map_err(|source| FuzzError::Io { path: exe.to_owned(), source })?;
        let (mut last_seq, mut changed) = (0u64, Instant::now());
        let (status, hung) = loop {
            match child.try_wait() {
                Ok(Some(s)) => break (s, false),
                Ok(None) => {}
                Err(e) => return Err(FuzzError::Worker(format!("waiting for the worker: {e}"))),
            }
            let seq = read_u64(&shared, OFF_INPUT);
            if seq != last_seq {
                (last_seq, changed) = (seq, Instant::now());
            } else if changed.elapsed() > hang {
                let _ = child.kill();
                let s = child.wait().map_err(|e| FuzzError::Worker(format!("waiting for the worker: {e}")))?;
                break (s, true);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if status.success() && !hung {
            let mut out = String::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = std::io::Read::read_to_string(&mut o, &mut out);
            }
            let r: Report = serde_json::from_str(out.trim())
                .map_err(|e| FuzzError::Worker(format!("unreadable worker report ({e}): {out:?}")))?;
            merge(&mut total, r);
            break Ok(());
        }
        if !hung && status.code() == Some(super::WORKER_SETUP_FAILED) {
            break Err(FuzzError::Worker(format!("the {} worker could not start (see above)", info.name)));
        }
        // The worker died or hung: the input it was running is the culprit.
        let (inputs, failures, input) = salvage(&shared);
        let (kind, msg) = if hung {
            ("hang", format!("an input ran longer than {:.1} s (worker killed)", hang.as_secs_f64()))
        } else if let Some(sig) = status.signal() {
            let what = match sig {
                libc::SIGABRT => " (SIGABRT: an abort, the allocation guard, or a stack overflow's report)",
                libc::SIGSEGV => " (SIGSEGV: a stack overflow or a bad memory access)",
                libc::SIGKILL => " (SIGKILL: out of memory?)",
                _ => "",
            };
            ("crash", format!("the worker died of signal {sig}{what}"))
        } else {
            ("crash", format!("the worker exited with {status}"))
        };
        let path = write_reproducer(&opts.out, info.name, kind, &input)?;
        eprintln!("popek fuzz: {}: FAILED: {msg}\npopek fuzz:   reproducer: {}", info.name, path.display());
        total.inputs += inputs + 1;
        total.failures += failures + 1;
        total.reproducers.push((path, msg));
        restart += 1;
        if restart > MAX_RESTARTS {
            eprintln!("popek fuzz: {}: {restart} workers died; stopping this target early", info.name);
            break Ok(());
        }
    };
    let _ = std::fs::remove_file(&shared_path);
    result?;
    total.seconds = start.elapsed().as_secs_f64();
    Ok(total)
}

fn merge(total: &mut Report, r: Report) {
    total.inputs += r.inputs;
    total.failures += r.failures;
    total.reproducers.extend(r.reproducers);
    total.slowest_ms = total.slowest_ms.max(r.slowest_ms);
    total.peak_heap = total.peak_heap.max(r.peak_heap);
    for (k, n) in r.outcomes {
        match total.outcomes.iter_mut().find(|(t, _)| *t == k) {
            Some(e) => e.1 += n,
            None => total.outcomes.push((k, n)),
        }
    }
    total.outcomes.sort();
}
