//! `popek bench --suite linux` with `quick`: Debian's kernel boots on bt to
//! nb32 and nb32 runs natively; every bt and native row is there, finite
//! and positive. No timing targets: these are benchmarks. Uses
//! ../shared/guests (skipped, with the reason printed, where it is absent).

use std::path::PathBuf;

use monitor::bench::linux::{run_with, Inputs, PHASES};
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
            assert!(r.value.is_finite() && r.value > 0.0, "{backend}/{name} = {} {}", r.value, r.unit);
            assert!(r.unit == "s" || r.unit == "us", "{backend}/{name}: unit {}", r.unit);
        }
    }
    assert!(rows.iter().all(|r| r.backend != "qemu"), "--quick skips QEMU");
}
