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

/// Every target, 2 s each, seed 15: no failure, and each ran inputs
/// (cpl3's known findings are filtered out of its generator; they have
/// tests of their own below).
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
    assert_eq!(
        names,
        [
            "bzimage",
            "multiboot",
            "initramfs",
            "trace",
            "replay",
            "virtio",
            "cpl3",
            "cpl3-paged",
            "cpl0",
            "guest-storm",
            "platform"
        ]
    );
    for r in &rows {
        assert_eq!(r["failures"], 0, "{r}");
        // cpl3 and cpl3-paged start two VMs per input, cpl0 seven, guest-storm one: a handful in 2 s.
        let least = if ["cpl3", "cpl3-paged", "cpl0", "guest-storm"].contains(&r["target"].as_str().unwrap()) {
            1
        } else {
            100
        };
        assert!(r["inputs"].as_u64().unwrap() >= least, "{r}");
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

/// Divergences `popek fuzz cpl3-paged` found (docs/reliability.md, "Found
/// by cpl3-paged"), as regression tests.
mod cpl3_paged_findings {
    use monitor::fuzz::cpl3::{Block, CLOSE};
    use monitor::fuzz::cpl3_paged::{compare, Runs};

    /// POPFD sets NT at CPL 3, then the block's first touch of a page (the
    /// dword above the stack's top, which nothing mapped yet) is a hidden
    /// fault, then PUSHFD: direct execution pushed NT clear, translated set.
    /// (Fixed: NT is one of the flags the host holds for CPL 3 code, saved
    /// and restored at every exit, `bt::live_flags`.)
    #[test]
    fn nt_survives_a_hidden_fault() {
        // push 0x4000 ; popfd ; pop ecx ; push ecx ; pushfd ; pop eax
        let mut code = vec![0x68, 0, 0x40, 0, 0, 0x9D, 0x59, 0x51, 0x9C, 0x58];
        code.extend_from_slice(&CLOSE);
        let block = Block { code, regs: [0; 6], flags: 0, compared: 0xCD5 };
        let runs = Runs { blocks: vec![block.clone(), block], invlpg: false };
        let dir = super::scratch("paged-nt");
        let r = compare(std::path::Path::new(super::POPEK), &dir, &runs);
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = r {
            panic!("{e}");
        }
    }
}

/// Divergences `popek fuzz cpl3` found between guest user code run directly
/// and translated (docs/reliability.md, "Found by cpl3"), each a real
/// failure of the execution host, the bt backend or the translator, now
/// fixed: the blocks that showed them, as regression tests.
mod cpl3_findings {
    use monitor::fuzz::cpl3::{compare, Block, CLOSE};

    fn check(tag: &str, blocks: &[(&[u8], [u32; 6])]) {
        let dir = super::scratch(tag);
        let blocks: Vec<Block> = blocks
            .iter()
            .map(|(code, regs)| {
                let mut code = code.to_vec();
                code.extend_from_slice(&CLOSE);
                Block { code, regs: *regs, flags: 0, compared: 0xCD5 }
            })
            .collect();
        let r = compare(std::path::Path::new(super::POPEK), &dir, &blocks);
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = r {
            panic!("{e}");
        }
    }

    /// POPFD sets NT at CPL 3, then STI faults (#GP): direct execution ends
    /// the VM ("entering guest code faulted ... trap 13"); translated
    /// delivers the #GP.
    /// (Fixed: the signal handler clears NT, which sigreturn would
    /// otherwise leave set in monitor code.)
    #[test]
    fn popf_nt_then_a_fault() {
        check("nt", &[(&[0x68, 0, 0x40, 0, 0, 0x9D, 0xFB], [0; 6])]);
    }

    /// POPFD sets TF at CPL 3, then STI faults: translated user code ends the
    /// VM ("entering guest code faulted ... trap 1"); direct delivers the #GP.
    /// (Fixed: user code with TF set runs directly, where the host's
    /// single-step traps become the guest's #DB.)
    #[test]
    fn popf_tf_then_a_fault() {
        check("tf", &[(&[0x68, 0, 1, 0, 0, 0x9D, 0xFB], [0; 6])]);
    }

    /// POPFD sets AC, a second POPFD follows: the translated POPF sequence
    /// faults inside the translation cache ("fault in the monitor itself").
    /// (Fixed: the exit gate read its 64-bit target from offset 6, which
    /// is #AC at host CPL 3 with the guest's AC set; now 8-aligned.)
    #[test]
    fn popf_ac_twice() {
        check("ac", &[(&[0x68, 0, 0, 4, 0, 0x9D, 0x68, 0, 0, 0, 0, 0x9D], [0; 6])]);
    }

    /// LDS from guest-physical memory beyond RAM (reads all-ones: selector
    /// 0xffff): translated raises #GP(0xfffc); direct completes the load.
    /// (Fixed: far-pointer loads from MMIO or open bus load their selector
    /// through the virtual CPU, not natively.)
    #[test]
    fn lds_from_beyond_ram() {
        check("lds", &[(&[0xC5, 0x8D, 0x55, 0x5A, 0x87, 0xD3], [0; 6])]);
    }

    /// INT 0x80 with EAX = -513 (-ERESTARTNOINTR): under direct execution
    /// Linux's signal code rewinds EIP by 2 before the SIGSYS handler sees it.
    /// (Fixed: the SIGSYS exit takes the return address from seccomp's
    /// call_addr.)
    #[test]
    fn int80_with_a_restart_code_in_eax() {
        // mov eax, -513 ; int 0x80 ; (then the usual close)
        check("restart", &[(&[0xB8, 0xFF, 0xFD, 0xFF, 0xFF, 0xCD, 0x80], [0; 6])]);
    }
}

/// `popek fuzz cpl0` (docs/reliability.md, "cpl0"): the blocks that showed
/// its findings, run under every variant, and a deliberately broken variant
/// (`--engine corrupt=add`) that the comparison must catch.
mod cpl0_findings {
    use monitor::fuzz::cpl0::{compare, Variant, SYSTEM_FLAGS, VARIANTS};
    use monitor::fuzz::cpl3::{Block, CLOSE};

    fn blocks(codes: &[(&[u8], [u32; 6])]) -> Vec<Block> {
        codes
            .iter()
            .map(|(code, regs)| {
                let mut code = code.to_vec();
                code.extend_from_slice(&CLOSE);
                Block { code, regs: *regs, flags: 0, compared: 0xCD5 | SYSTEM_FLAGS }
            })
            .collect()
    }

    fn check(tag: &str, codes: &[(&[u8], [u32; 6])], variants: &[Variant]) -> Result<(), String> {
        let dir = super::scratch(tag);
        let r = compare(std::path::Path::new(super::POPEK), &dir, &blocks(codes), variants);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    /// POPFD of NT at CPL 0: the inline POPF put NT in the host's flags
    /// only (NT is virtual: the host's is never read back), so the guest
    /// lost it; `--engine noinline` (the callout) kept it. Also an inline
    /// PUSHFD after a callout. (Fixed: the vCPU page's `viopl` holds NT,
    /// and an inline IRET misses when it is set: a task return.)
    #[test]
    fn popf_nt_at_cpl0() {
        let r = check(
            "nt0",
            &[
                // push 0x4000 ; popfd
                (&[0x68, 0, 0x40, 0, 0, 0x9D], [0; 6]),
                // push 0x4000 ; popfd ; mov ecx, cr0 (a callout) ; pushfd ; pop ebx
                (&[0x68, 0, 0x40, 0, 0, 0x9D, 0x0F, 0x20, 0xC1, 0x9C, 0x5B], [0; 6]),
            ],
            &VARIANTS,
        );
        if let Err(e) = r {
            panic!("{e}");
        }
    }

    /// The comparison catches a broken translation: `corrupt=add` makes
    /// every translated ADD with a register destination add one more.
    #[test]
    fn a_corrupt_variant_is_a_difference() {
        const CORRUPT: [Variant; 2] = [
            Variant { name: "default", args: &[], flush: false },
            Variant { name: "corrupt", args: &["--engine", "corrupt=add"], flush: false },
        ];
        // add eax, ecx
        let r = check("corrupt", &[(&[0x01, 0xC8], [1, 2, 3, 4, 5, 6])], &CORRUPT);
        let e = r.expect_err("corrupt=add must change the dump");
        assert!(e.contains("variant corrupt differs from default at block 0"), "{e}");
    }
}
