//! `popek bench --suite linux` with `quick`: Debian's kernel boots on bt to
//! nb32 and nb32 runs natively; every bt and native row is there, finite
//! and positive. `--backends kvm` alone probes /dev/kvm within a time bound
//! and, on an emulating (PVM) or paging-refusing /dev/kvm, reports the kvm
//! peer as skipped with the reason. No timing targets: these are
//! benchmarks. Uses ../shared/guests (skipped, with the reason printed,
//! where it is absent).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use monitor::bench::linux::{figure_names, run_report, run_with, Inputs, Options, KVM_PROBE_TIMEOUT, PHASES};
use monitor::bench::BenchError;
use popek_tests::vm_lock;

fn inputs() -> Option<Inputs> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/guests");
    let i = Inputs {
        kernel: dir.join("linux-686/vmlinuz"),
        busybox: dir.join("linux-686/busybox"),
        nb32: dir.join("bench/nb32"),
    };
    if i.kernel.is_file() && i.busybox.is_file() && i.nb32.is_file() {
        Some(i)
    } else {
        eprintln!("SKIPPED: {} lacks linux-686/{{vmlinuz,busybox}} or bench/nb32", dir.display());
        None
    }
}

fn opts(backends: &[&str]) -> Options {
    Options { quick: true, backends: backends.iter().map(|s| s.to_string()).collect(), popek: None }
}

#[test]
fn linux_suite_quick_has_every_bt_and_native_row() {
    let _l = vm_lock();
    let Some(inputs) = inputs() else { return };
    let rows = run_with(&inputs, true).expect("linux suite");
    for (backend, names) in [("bt", &["boot_to_init"][..]), ("bt", &PHASES[..]), ("native", &PHASES[..])] {
        for name in names {
            let r = rows
                .iter()
                .find(|r| r.backend == backend && r.name == *name)
                .unwrap_or_else(|| panic!("row {backend}/{name} missing: {rows:?}"));
            assert_eq!(r.suite, "linux");
            assert_eq!(r.skipped, None);
            assert!(r.value.is_finite() && r.value > 0.0, "{backend}/{name} = {} {}", r.value, r.unit);
            assert!(r.unit == "s" || r.unit == "us", "{backend}/{name}: unit {}", r.unit);
        }
    }
    let qemu: Vec<_> = rows.iter().filter(|r| r.backend == "qemu").collect();
    assert_eq!(qemu.len(), figure_names().len(), "--quick skips QEMU, one skipped row per figure");
    assert!(qemu.iter().all(|r| r.skipped.as_deref() == Some("--quick") && r.value.is_nan()));
}

#[test]
fn linux_suite_kvm_only_is_skipped_with_a_reason_or_measured() {
    let _l = vm_lock();
    let Some(inputs) = inputs() else { return };
    let start = Instant::now();
    let report = run_report(&inputs, &opts(&["kvm"])).expect("linux suite, kvm only");
    let secs = start.elapsed();
    assert_eq!(report.backends, ["kvm"]);
    assert!(report.rows.iter().all(|r| r.backend == "native" || r.backend == "kvm"), "{:?}", report.rows);
    assert_eq!(report.rows.iter().filter(|r| r.backend == "native").count(), PHASES.len());
    let kvm: Vec<_> = report.rows.iter().filter(|r| r.backend == "kvm").collect();
    assert_eq!(kvm.len(), figure_names().len(), "one kvm row per figure: {kvm:?}");
    match report.skipped.as_slice() {
        [(b, why)] => {
            eprintln!("kvm skipped after {secs:.1?}: {why}");
            assert_eq!(b, "kvm");
            assert!(why.contains("/dev/kvm") || why.contains("KVM"), "{why}");
            assert!(kvm.iter().all(|r| r.skipped.as_deref() == Some(why.as_str()) && r.value.is_nan()));
            // Native nb32 at the quick scale plus the bounded probe: no boot.
            assert!(secs < KVM_PROBE_TIMEOUT + Duration::from_secs(60), "took {secs:?}");
        }
        [] => {
            eprintln!("kvm is hardware-fast here: booted Linux in {secs:.1?}");
            assert!(kvm.iter().all(|r| r.skipped.is_none() && r.value.is_finite() && r.value > 0.0), "{kvm:?}");
        }
        other => panic!("unexpected skips {other:?}"),
    }
}

#[test]
fn linux_suite_unknown_backend_is_an_error() {
    // Checked before any guest file is looked at or anything runs.
    let Err(e) = monitor::bench::linux::run_opts(&opts(&["bt", "vmware"])) else { panic!("accepted vmware") };
    assert!(matches!(&e, BenchError::UnknownBackend { backend, .. } if backend == "vmware"), "{e}");
    assert!(e.to_string().contains("known: bt, kvm, qemu"), "{e}");
    if let Some(inputs) = inputs() {
        assert!(run_report(&inputs, &opts(&["native2"])).is_err());
    }
}
