//! `popek bench --suite nano` with `quick` on bt, kvm and qemu: every bt row
//! is there and positive; kvm and qemu are either there and positive or
//! skipped with a printed reason; the table names every row and the SVG
//! has one bar per measured value. A skipped backend has one skipped row per
//! figure, written to JSON as `value: null` with the reason. No timing
//! targets: these are benchmarks.

use monitor::bench::nano::{bar_fill, figure_names, run_with, to_matrix, to_svg, Options};
use monitor::bench::to_json;
use monitor::guests::nano::ROWS;
use popek_tests::vm_lock;

#[test]
fn nano_suite_quick_on_every_backend() {
    let _l = vm_lock();
    let svg_path = std::env::temp_dir().join(format!("popek-nano-smoke-{}.svg", std::process::id()));
    let opts = Options {
        quick: true,
        backends: vec!["bt".into(), "kvm".into(), "qemu".into()],
        svg: Some(svg_path.clone()),
        qemu: None,
        popek: None,
    };
    let report = run_with(&opts).expect("nano suite");
    let table = to_matrix(&report);
    println!("{table}");
    for backend in ["bt", "kvm", "qemu"] {
        if let Some((_, why)) = report.skipped.iter().find(|(b, _)| b == backend) {
            assert_ne!(backend, "bt", "bt never skips: {why}");
            assert!(!why.trim().is_empty(), "{backend} skipped without a reason");
            println!("SKIPPED {backend}: {why}");
            let rows: Vec<_> = report.rows.iter().filter(|r| r.backend == backend).collect();
            assert_eq!(rows.len(), ROWS.len(), "{backend}: one skipped row per figure");
            assert!(rows.iter().all(|r| r.skipped.as_deref() == Some(why.as_str()) && r.value.is_nan()), "{rows:?}");
            assert!(table.contains(&format!("{backend}: skipped: {why}")), "{table}");
            continue;
        }
        for name in ROWS {
            let r = report
                .rows
                .iter()
                .find(|r| r.backend == backend && r.name == name)
                .unwrap_or_else(|| panic!("row {backend}/{name} missing: {:?}", report.rows));
            assert_eq!((r.suite.as_str(), r.unit.as_str()), ("nano", "cycles"));
            assert!(r.value.is_finite() && r.value > 0.0, "{backend}/{name} = {}", r.value);
        }
    }
    for name in ROWS {
        assert!(table.lines().any(|l| l.starts_with(name)), "no {name} line in:\n{table}");
    }
    let svg = std::fs::read_to_string(&svg_path).expect("the SVG was written");
    let _ = std::fs::remove_file(&svg_path);
    assert_eq!(svg, to_svg(&report).expect("the chart draws"));
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
    // One bar per measured row, plus one legend swatch per measured backend,
    // in the backend's colour; a skipped backend has neither.
    for backend in ["bt", "kvm", "qemu"] {
        let measured = report.rows.iter().filter(|r| r.backend == backend && r.measured()).count();
        let expected = if measured == 0 { 0 } else { measured + 1 };
        assert_eq!(svg.matches(&bar_fill(&report, backend)).count(), expected, "{backend}:\n{svg}");
    }
    // XML-ish: every element opened is closed.
    for tag in ["svg", "text"] {
        assert_eq!(svg.matches(&format!("<{tag}")).count(), svg.matches(&format!("</{tag}>")).count(), "<{tag}>");
    }
}

/// `--backends kvm,qemu --json`: with kvm skipped (no usable /dev/kvm, or an
/// emulating one that refuses 32-bit paging, as on PVM hosts) and QEMU named
/// by a path that does not exist, both still write one row per figure, each
/// `"value": null` with `"skipped": "<reason>"`. Runs no guest where both
/// skip; a hardware-fast kvm is measured instead.
#[test]
fn nano_suite_skipped_backends_write_null_rows_to_json() {
    let _l = vm_lock();
    let opts = Options {
        quick: true,
        backends: vec!["kvm".into(), "qemu".into()],
        svg: None,
        qemu: Some("/nonexistent/qemu-system-i386".into()),
        popek: None,
    };
    let report = run_with(&opts).expect("nano suite");
    let json = to_json(&report.rows);
    println!("{json}");
    let qemu_why = report.skip_reason("qemu").expect("qemu skipped");
    assert!(qemu_why.contains("/nonexistent/qemu-system-i386"), "{qemu_why}");
    let mut skipped = vec![("qemu", qemu_why)];
    match report.skip_reason("kvm") {
        Some(why) => skipped.push(("kvm", why)),
        None => eprintln!("kvm is usable here: measured"),
    }
    for (backend, why) in skipped {
        for (name, unit) in figure_names() {
            let line = format!(
                r#"{{"suite":"nano","name":"{name}","backend":"{backend}","value":null,"unit":"{unit}","skipped":{}}}"#,
                json_string(why)
            );
            assert!(json.contains(&line), "no {line} in\n{json}");
        }
    }
}

/// `s` as a JSON string literal (quotes and backslashes escaped; the skip
/// reasons have no control characters).
fn json_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}
