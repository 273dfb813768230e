//! `popek bench --suite workloads`: real programs (busybox applets) inside
//! Debian's i386 kernel with a busybox initramfs, one row per program and
//! backend, in seconds.
//!
//! Programs ([`PROGRAMS`], sizes of a full run in [`Params::FULL`]):
//! `seq` (`seq 1 400000 > file`), `gzip` (`gzip -c file > file.gz`), `sort`
//! (`sort -r file > sorted`), `md5sum` (of the file), `fork_exec` (300
//! fork+exec of `/bin/true` from a shell loop), `find` (`find / -xdev` five
//! times), `pipes` (a shell loop of 100 `seq 1 1000 | cat | grep 7 | wc -l`
//! pipelines). The init script runs the whole list [`Params::reps`] times
//! (3 in a full run) and each row is the median over the repetitions.
//!
//! **Timing: the host's clock.** Around each program the script prints
//! `WL begin <program> <rep> <uptime>` and `WL end <program> <rep>
//! <uptime>` with shell builtins only (`read` of /proc/uptime and `echo`:
//! no fork, so the markers cost the same on every backend); the host
//! stamps every complete console line as it arrives (the linux suite's
//! [`LineClock`](super::linux::LineClock) / `popek run` child / QEMU
//! serial-on-a-pipe machinery), and a row is the time between the two
//! lines. That is what a user waiting for the program feels, and it does
//! not trust the guest's clock, which on bt has run slow in kernel-heavy
//! phases (docs/benchmarks.md, "Known issues"). The guest's own durations
//! (the /proc/uptime fields, 10 ms resolution) are kept as a cross-check:
//! printed per backend beside the host's, with a warning when they
//! disagree by more than a quarter (and 30 ms).
//!
//! Backends: `native` always (the same static i386 busybox runs on the
//! host as 32-bit processes, the same script in a directory laid out as
//! the initramfs, on tmpfs as the guest's files are, so `find` walks the
//! same tree: see [`native_tree`] and [`native_base`]); then
//! each peer of `--backends` (default `bt,kvm,qemu`) as the linux suite
//! boots them (kvm after its probe, qemu skipped with `--quick` or when not
//! installed). A backend that cannot run is reported with the reason and
//! one skipped row per program.
//!
//! Inputs: `POPEK_KERNEL`, `POPEK_BUSYBOX` (defaults as the linux suite's).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::linux::{self, Options, TempFile, TimedLines, BOOT_TIMEOUT};
use super::{median, BenchError, Report, Row};
use crate::loader::initramfs;
use crate::run::BackendKind;

/// The programs, in row order.
pub const PROGRAMS: [&str; 7] = ["seq", "gzip", "sort", "md5sum", "fork_exec", "find", "pipes"];
/// The line the script prints when every repetition is done.
pub const DONE: &str = "WL done";

fn fail(msg: String) -> BenchError {
    BenchError::UnexpectedExit(format!("workloads suite: {msg}"))
}

/// How big each program's run is, and how many times the list runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// `seq 1 N`: the file gzip, sort and md5sum then read.
    pub seq_n: u32,
    /// fork+exec of /bin/true.
    pub forks: u32,
    /// `find / -xdev` runs.
    pub finds: u32,
    /// Pipeline iterations of the `pipes` loop.
    pub pipe_loops: u32,
    /// Repetitions of the whole list (a row is their median).
    pub reps: u32,
}

impl Params {
    /// A full run: the sizes of issue 16's table, three repetitions.
    pub const FULL: Params = Params { seq_n: 400_000, forks: 300, finds: 5, pipe_loops: 100, reps: 3 };
    /// `--quick`: small sizes, one repetition.
    pub const QUICK: Params = Params { seq_n: 20_000, forks: 30, finds: 1, pipe_loops: 10, reps: 1 };
}

/// The shell commands of each program, with `$R` the root of the tree
/// (empty in the guest) and the working directory `$R/tmp`.
pub fn commands(p: &Params) -> [(&'static str, String); 7] {
    [
        ("seq", format!("seq 1 {} > file", p.seq_n)),
        // Through busybox itself: an applet link more in the shared
        // initramfs would change the recorded traces' initrd.
        ("gzip", "$R/bin/busybox gzip -c file > file.gz".into()),
        ("sort", "sort -r file > sorted".into()),
        ("md5sum", "md5sum file > /dev/null".into()),
        ("fork_exec", format!("i=0; while [ $i -lt {} ]; do $R/bin/true; i=$((i+1)); done", p.forks)),
        ("find", format!("i=0; while [ $i -lt {} ]; do find $R/ -xdev > /dev/null; i=$((i+1)); done", p.finds)),
        (
            "pipes",
            format!(
                "i=0; while [ $i -lt {} ]; do seq 1 1000 | cat | grep 7 | wc -l > /dev/null; i=$((i+1)); done",
                p.pipe_loops
            ),
        ),
    ]
}

/// The part of the script shared by the guest and the native run: `root`
/// is the tree's root (`""` in the guest); prints the markers and, last,
/// [`DONE`].
pub fn script_body(root: &str, p: &Params) -> String {
    let mut s = format!(
        "R='{root}'\nexport PATH=\"$R/bin\"\n\
         mark() {{ read up rest < /proc/uptime; echo \"WL $1 $2 $3 $up\"; }}\n\
         cd \"$R/tmp\" || exit 1\nrep=1\nwhile [ $rep -le {} ]; do\n",
        p.reps
    );
    for (name, cmd) in commands(p) {
        s.push_str(&format!("mark begin {name} $rep; {cmd}; mark end {name} $rep\n"));
    }
    s.push_str("rm -f file file.gz sorted\nrep=$((rep+1))\ndone\n");
    s.push_str(&format!("echo {DONE}\n"));
    s
}

/// The guest's `/init`: /proc for the uptime markers, the body, power off.
pub fn init_script(p: &Params) -> String {
    format!("#!/bin/sh\nmount -t proc proc /proc\necho {}\n{}poweroff -f\n", linux::INIT_LINE, script_body("", p))
}

/// One program's figures on one backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    pub name: &'static str,
    /// Median host-timed duration over the repetitions (s).
    pub host_s: f64,
    /// Median of the guest's own durations (/proc/uptime, s).
    pub guest_s: f64,
}

/// A marker line's fields: `begin`/`end`, program, repetition, the
/// guest's uptime (s).
type Marker<'a> = (&'a str, &'a str, u32, f64);

/// A marker `WL <begin|end> <program> <rep> <uptime>` anywhere in `line`
/// (console noise may precede it).
fn marker(line: &str) -> Option<Marker<'_>> {
    let at = line.find("WL ")?;
    let mut w = line[at..].split_whitespace().skip(1);
    let kind = w.next()?;
    let name = w.next()?;
    let rep = w.next()?.parse().ok()?;
    let up = w.next()?.parse().ok()?;
    Some((kind, name, rep, up))
}

/// Figures from timed console lines, one per program in [`PROGRAMS`]
/// order; every repetition `1..=reps` of every program must have both
/// markers. Errors name what is missing.
pub fn figures(lines: &[(f64, String)], reps: u32) -> Result<Vec<Figure>, String> {
    let marks: Vec<(f64, Marker<'_>)> = lines.iter().filter_map(|(t, l)| marker(l).map(|m| (*t, m))).collect();
    let find = |kind: &str, name: &str, rep: u32| {
        marks.iter().find(|(_, (k, n, r, _))| *k == kind && *n == name && *r == rep).map(|(t, (.., up))| (*t, *up))
    };
    let mut out = Vec::new();
    for name in PROGRAMS {
        let (mut host, mut guest) = (Vec::new(), Vec::new());
        for rep in 1..=reps {
            let (t0, u0) = find("begin", name, rep).ok_or_else(|| format!("no `WL begin {name} {rep}` line"))?;
            let (t1, u1) = find("end", name, rep).ok_or_else(|| format!("no `WL end {name} {rep}` line"))?;
            if t1 < t0 {
                return Err(format!("`WL end {name} {rep}` came before its begin"));
            }
            host.push(t1 - t0);
            guest.push(u1 - u0);
        }
        out.push(Figure { name, host_s: median(host), guest_s: median(guest) });
    }
    Ok(out)
}

/// Whether the guest's clock disagrees with the host's on a figure: by
/// more than a quarter and by more than 30 ms (/proc/uptime counts in
/// 10 ms steps).
pub fn clocks_disagree(f: &Figure) -> bool {
    let d = (f.host_s - f.guest_s).abs();
    d > 0.03 && d > 0.25 * f.host_s.max(f.guest_s)
}

/// Prints the guest-clock cross-check of one backend; returns the rows.
fn rows(backend: &str, figs: &[Figure]) -> Vec<Row> {
    let cells: Vec<String> = figs.iter().map(|f| format!("{} {:.3}/{:.3}", f.name, f.host_s, f.guest_s)).collect();
    println!("workloads: {backend} host/guest-clock s: {}", cells.join(", "));
    for f in figs.iter().filter(|f| clocks_disagree(f)) {
        tracing::warn!(
            backend,
            program = f.name,
            host_s = f.host_s,
            guest_s = f.guest_s,
            "the guest's clock disagrees with the host's"
        );
    }
    figs.iter().map(|f| Row::new("workloads", f.name, backend, f.host_s, "s")).collect()
}

fn figure_units() -> Vec<(&'static str, &'static str)> {
    PROGRAMS.iter().map(|&p| (p, "s")).collect()
}

/// Lays out `dir` as the initramfs is (bin/busybox and its applet links,
/// the empty directories) plus `init` = the native script, so the native
/// `find` walks the guest's tree. (The archive's /dev/console and
/// /dev/null nodes are left out: making them needs privileges.)
pub fn native_tree(dir: &Path, busybox: &Path, p: &Params) -> std::io::Result<PathBuf> {
    for d in ["proc", "sys", "etc", "root", "tmp", "bin", "dev"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy(busybox, dir.join("bin/busybox"))?;
    for applet in initramfs::BUSYBOX_APPLETS {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
    }
    let root = dir.to_str().filter(|s| !s.contains('\'')).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("unusable directory name {}", dir.display()))
    })?;
    let init = dir.join("init");
    std::fs::write(&init, format!("#!/bin/sh\n{}", script_body(root, p)))?;
    Ok(init)
}

/// Removes a directory tree when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the native tree goes: /dev/shm (tmpfs) when it is there and
/// writable, since the guest's files live in RAM too (its root is the
/// initramfs); otherwise the temporary directory.
pub fn native_base() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let writable = std::fs::metadata(shm).is_ok_and(|m| m.is_dir())
        && std::ffi::CString::new("/dev/shm")
            // SAFETY: access(2) on a NUL-terminated path; no memory is kept.
            .is_ok_and(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0);
    if writable {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// Runs the script natively: the static i386 busybox's shell in the tree
/// [`native_tree`] lays out (under [`native_base`]), with an empty
/// environment but `PATH`.
pub fn run_native(busybox: &Path, p: &Params) -> Result<TimedLines, BenchError> {
    let dir = TempDir(native_base().join(format!("popek-workloads-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let init = native_tree(&dir.0, busybox, p)
        .map_err(|e| fail(format!("cannot lay out {} for the native run: {e}", dir.0.display())))?;
    let mut cmd = Command::new(dir.0.join("bin/busybox"));
    cmd.arg("sh").arg(&init).env_clear().env("PATH", dir.0.join("bin")).current_dir(&dir.0);
    let lines = linux::run_native_command(cmd, "busybox sh")?;
    Ok(lines)
}

/// The guest files: kernel and busybox.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub kernel: PathBuf,
    pub busybox: PathBuf,
}

impl Inputs {
    /// `POPEK_KERNEL`, `POPEK_BUSYBOX`, defaults as the linux suite's.
    pub fn from_env() -> Result<Inputs, BenchError> {
        Ok(Inputs {
            kernel: linux::input_file("POPEK_KERNEL", linux::DEFAULT_KERNEL)?,
            busybox: linux::input_file("POPEK_BUSYBOX", linux::DEFAULT_BUSYBOX)?,
        })
    }
}

/// Runs the suite with the default peers (the library's entry, in process).
pub fn run(quick: bool) -> Result<Vec<Row>, BenchError> {
    Ok(run_opts(&Options { quick, ..Options::default() })?.rows)
}

/// Runs the suite as asked on the guest files named by the environment.
pub fn run_opts(opts: &Options) -> Result<Report, BenchError> {
    linux::check_backends_of("workloads", &opts.backends)?;
    run_report(&Inputs::from_env()?, opts)
}

/// Runs the suite on the given guest files: native, then each requested
/// peer in order; a backend that cannot run is skipped with the reason.
pub fn run_report(inputs: &Inputs, opts: &Options) -> Result<Report, BenchError> {
    linux::check_backends_of("workloads", &opts.backends)?;
    let p = if opts.quick { Params::QUICK } else { Params::FULL };
    println!(
        "workloads: seq 1 {}, {} fork+exec, {} find, {} pipelines, {} repetition(s); backends native,{}",
        p.seq_n,
        p.forks,
        p.finds,
        p.pipe_loops,
        p.reps,
        opts.backends.join(",")
    );
    let mut report = Report::new("workloads", &opts.backends);

    // Native first, from this thread (never one that ran a vCPU).
    match run_native(&inputs.busybox, &p)
        .and_then(|l| figures(&l.lines(), p.reps).map_err(|e| fail(format!("native: {e}\n{}", l.tail(20)))))
    {
        Ok(figs) => report.rows.extend(rows("native", &figs)),
        Err(e) => report.skip("native", &figure_units(), &e.to_string()),
    }

    let mut initrd: Option<TempFile> = None;
    for b in &opts.backends {
        let skip = match b.as_str() {
            "kvm" => linux::kvm_probe(&inputs.kernel),
            "qemu" if opts.quick => Some("--quick".to_owned()),
            "qemu" if linux::find_qemu().is_none() => Some("qemu-system-i386 is not on PATH".to_owned()),
            _ => None,
        };
        if let Some(reason) = skip {
            report.skip(b, &figure_units(), &reason);
            continue;
        }
        let path = match &initrd {
            Some(t) => t.0.clone(),
            None => {
                let data = initramfs::busybox_initramfs(&inputs.busybox, &init_script(&p), &[])
                    .map_err(|e| fail(format!("initramfs: {e}")))?;
                let path = std::env::temp_dir().join(format!("popek-workloads-{}.cpio.gz", std::process::id()));
                std::fs::write(&path, &data).map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
                initrd.insert(TempFile(path)).0.clone()
            }
        };
        let lines = match b.as_str() {
            "qemu" => {
                let qemu = linux::find_qemu().ok_or_else(|| fail("qemu-system-i386 vanished from PATH".into()))?;
                linux::boot_qemu(&qemu, &inputs.kernel, &path, DONE)?
            }
            peer => {
                let kind = if peer == "kvm" { BackendKind::Kvm } else { BackendKind::Bt };
                let (lines, _stats) = match &opts.popek {
                    Some(exe) => linux::boot_jailed(exe, peer, &inputs.kernel, &path, BOOT_TIMEOUT)?,
                    None => linux::boot(kind, &inputs.kernel, &path, BOOT_TIMEOUT)?,
                };
                lines
            }
        };
        let figs = figures(&lines.lines(), p.reps).map_err(|e| fail(format!("{b}: {e}\n{}", lines.tail(20))))?;
        report.rows.extend(rows(b, &figs));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed(reps: u32) -> Vec<(f64, String)> {
        let mut lines = vec![(0.5, "[ 1.0] noise".to_owned()), (1.0, "init: up".to_owned())];
        let (mut t, mut up) = (2.0, 10.0);
        for rep in 1..=reps {
            for (i, name) in PROGRAMS.iter().enumerate() {
                lines.push((t, format!("WL begin {name} {rep} {up:.2}")));
                // Program i takes (i + 1) * rep * 0.1 s on the host, the
                // guest's clock counts half of it.
                let d = (i + 1) as f64 * f64::from(rep) * 0.1;
                t += d;
                up += d / 2.0;
                let noise = if i == 2 { "[  3.1] random: crng init done" } else { "" };
                lines.push((t, format!("{noise}WL end {name} {rep} {up:.2}")));
            }
        }
        lines.push((t + 0.1, DONE.to_owned()));
        lines
    }

    #[test]
    fn figures_are_medians_of_host_durations() {
        let f = figures(&timed(3), 3).unwrap();
        assert_eq!(f.iter().map(|f| f.name).collect::<Vec<_>>(), PROGRAMS);
        for (i, fig) in f.iter().enumerate() {
            // Durations (i+1)*0.1*{1,2,3}: the median is the second.
            let want = (i + 1) as f64 * 0.2;
            assert!((fig.host_s - want).abs() < 1e-9, "{fig:?}");
            assert!((fig.guest_s - want / 2.0).abs() < 0.011, "{fig:?}");
            assert!(clocks_disagree(fig), "half speed is a disagreement: {fig:?}");
        }
    }

    #[test]
    fn a_missing_marker_is_named() {
        let mut lines = timed(2);
        lines.retain(|(_, l)| !l.contains("WL end sort 2"));
        assert_eq!(figures(&lines, 2).unwrap_err(), "no `WL end sort 2` line");
        assert!(figures(&timed(1), 2).unwrap_err().contains("WL begin seq 2"));
        assert!(figures(&[(0.0, "WL begin seq x 1.0".into())], 1).is_err());
    }

    #[test]
    fn clocks_agree_within_a_quarter_or_30_ms() {
        let f = |h, g| Figure { name: "seq", host_s: h, guest_s: g };
        assert!(!clocks_disagree(&f(1.0, 0.8)));
        assert!(clocks_disagree(&f(1.0, 0.7)));
        assert!(!clocks_disagree(&f(0.02, 0.04)), "within /proc/uptime's resolution");
    }

    #[test]
    fn the_script_marks_every_program_and_ends_with_done() {
        let s = init_script(&Params::FULL);
        assert!(s.starts_with("#!/bin/sh\n"));
        for name in PROGRAMS {
            assert!(s.contains(&format!("mark begin {name} $rep; ")), "{s}");
            assert!(s.contains(&format!("; mark end {name} $rep\n")), "{s}");
        }
        assert!(s.contains("seq 1 400000 > file"));
        assert!(s.contains("while [ $i -lt 300 ]; do $R/bin/true;"));
        assert!(s.contains("while [ $rep -le 3 ]"));
        assert!(s.trim_end().ends_with("WL done\npoweroff -f"), "{s}");
    }
}
