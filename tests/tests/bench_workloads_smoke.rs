//! `popek bench --suite workloads` with `quick`, bt only: Debian's kernel
//! boots the busybox initramfs on bt and runs every program; the same
//! script runs natively. Every native and bt row is there (the suite
//! fails when a program's markers are missing), finite and not negative;
//! QEMU is skipped with `--quick`. No timing targets. Uses ../shared/guests
//! (skipped, with the reason printed, where it is absent).

use std::path::PathBuf;

use monitor::bench::linux::Options;
use monitor::bench::workloads::{run_report, Inputs, PROGRAMS};
use popek_tests::vm_lock;

fn inputs() -> Option<Inputs> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/guests/linux-686");
    let i = Inputs { kernel: dir.join("vmlinuz"), busybox: dir.join("busybox") };
    if i.kernel.is_file() && i.busybox.is_file() {
        Some(i)
    } else {
        eprintln!("SKIPPED: {} lacks vmlinuz or busybox", dir.display());
        None
    }
}

#[test]
fn workloads_quick_has_every_native_and_bt_row() {
    let _l = vm_lock();
    let Some(inputs) = inputs() else { return };
    let opts = Options { quick: true, backends: vec!["bt".into(), "qemu".into()], popek: None };
    let report = run_report(&inputs, &opts).expect("workloads suite");
    for backend in ["native", "bt"] {
        for name in PROGRAMS {
            let r = report
                .rows
                .iter()
                .find(|r| r.backend == backend && r.name == name)
                .unwrap_or_else(|| panic!("row {backend}/{name} missing: {:?}", report.rows));
            assert_eq!((r.suite.as_str(), r.unit.as_str()), ("workloads", "s"));
            assert_eq!(r.skipped, None, "{backend}/{name}");
            assert!(r.value.is_finite() && r.value >= 0.0, "{backend}/{name} = {}", r.value);
        }
    }
    let qemu: Vec<_> = report.rows.iter().filter(|r| r.backend == "qemu").collect();
    assert_eq!(qemu.len(), PROGRAMS.len());
    assert!(qemu.iter().all(|r| r.skipped.as_deref() == Some("--quick") && r.value.is_nan()));
}

#[test]
fn workloads_unknown_backend_is_an_error() {
    let opts = Options { quick: true, backends: vec!["vmware".into()], popek: None };
    let e = monitor::bench::workloads::run_opts(&opts).unwrap_err();
    assert!(e.to_string().contains("unknown backend \"vmware\" for suite workloads"), "{e}");
}
