//! `popek bench --suite nano` with `quick` on bt, kvm and qemu: every bt row
//! is there and positive; kvm and qemu are either there and positive or
//! skipped with a printed reason; the table names every row and the SVG
//! has one bar per measured value. No timing targets: these are benchmarks.

use monitor::bench::nano::{run_with, to_matrix, to_svg, Options};
use monitor::guests::nano::ROWS;
use popek_tests::vm_lock;

#[test]
fn nano_suite_quick_on_every_backend() {
    let _l = vm_lock();
    let svg_path = std::env::temp_dir().join(format!("popek-nano-smoke-{}.svg", std::process::id()));
    let opts =
        Options { quick: true, backends: vec!["bt".into(), "kvm".into(), "qemu".into()], svg: Some(svg_path.clone()) };
    let report = run_with(&opts).expect("nano suite");
    let table = to_matrix(&report);
    println!("{table}");
    for backend in ["bt", "kvm", "qemu"] {
        if let Some((_, why)) = report.skipped.iter().find(|(b, _)| b == backend) {
            assert_ne!(backend, "bt", "bt never skips: {why}");
            assert!(!why.trim().is_empty(), "{backend} skipped without a reason");
            println!("SKIPPED {backend}: {why}");
            assert!(report.rows.iter().all(|r| r.backend != backend), "{backend}: skipped yet has rows");
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
    assert_eq!(svg, to_svg(&report));
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
    assert_eq!(svg.matches("<rect class=\"bar\"").count(), report.rows.len(), "one bar per row:\n{svg}");
    // XML-ish: every element opened is closed.
    for tag in ["svg", "text", "title"] {
        assert_eq!(svg.matches(&format!("<{tag}")).count(), svg.matches(&format!("</{tag}>")).count(), "<{tag}>");
    }
    assert_eq!(svg.matches("<rect class=\"bar\"").count(), svg.matches("</rect>").count());
}
