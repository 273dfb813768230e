//! `popek bench --suite bt` and `--suite mmu` with `quick`: every row is
//! there, finite and positive. No timing targets: these are benchmarks.

use monitor::bench::{run_suite, Row};
use popek_tests::vm_lock;

fn check(rows: &[Row], suite: &str, names: &[&str]) {
    for name in names {
        let r =
            rows.iter().find(|r| r.name == *name).unwrap_or_else(|| panic!("{suite}: row {name} missing: {rows:?}"));
        assert_eq!(r.suite, suite);
        assert!(r.value.is_finite() && r.value > 0.0, "{suite}/{name} = {} {}", r.value, r.unit);
        assert!(!r.unit.is_empty());
    }
}

#[test]
fn bt_suite_quick_has_every_row() {
    let _l = vm_lock();
    let rows = run_suite("bt", true).expect("bt suite");
    check(&rows, "bt", &["kernel_compute_ratio", "callout_roundtrip", "indirect_lookup", "translate_rate", "cli_sti"]);
    assert!(rows.iter().all(|r| r.backend == "bt" || r.backend == "native"));
}

#[test]
fn mmu_suite_quick_has_every_row() {
    let _l = vm_lock();
    let rows = run_suite("mmu", true).expect("mmu suite");
    check(&rows, "mmu", &["hidden_fault", "hidden_fault_count", "guest_pagefault", "cr3_switch", "timer_irq"]);
    // A reload of the same CR3 keeps every shadow (the new address space
    // maps them identically): no refaults is the expected count.
    let f = rows.iter().find(|r| r.name == "cr3_switch_faults").expect("cr3_switch_faults row");
    assert!(f.value.is_finite() && f.value >= 0.0 && f.value < 1.0, "refaults per reload: {}", f.value);
    assert!(rows.iter().all(|r| r.backend == "bt"));
}

#[test]
fn unknown_suite_is_an_error() {
    assert!(run_suite("no-such-suite", true).is_err());
}

#[test]
fn replay_suite_quick_has_every_row() {
    let _l = vm_lock();
    let rows = run_suite("replay", true).expect("replay suite");
    check(
        &rows,
        "replay",
        &["det_compute_ratio", "record_overhead", "replay_rate", "trace_bytes_per_minsn", "compute_deterministic_s"],
    );
}
