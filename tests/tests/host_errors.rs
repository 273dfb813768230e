//! The execution host refuses what it cannot do with a clear error, never a
//! crash: an occupied low 4 GiB, a second vCPU, selectors it did not set up.

use monitor::host::{HostError, Segments, Vcpu};
use popek_tests::vm_lock;

const CHILD: &str = "POPEK_TEST_CHILD";

/// Runs this test binary again, only `test`, with `mode` in the environment:
/// the window is process-global, so "already occupied" needs a fresh process.
fn in_child(test: &str, mode: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, mode)
        .output()
        .expect("spawn child test");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{text}");
    text
}

#[test]
fn occupied_low_4gib_is_a_clear_error() {
    if std::env::var(CHILD).as_deref() == Ok("occupied") {
        // Something lands in the low 4 GiB before the monitor reserves it.
        // SAFETY: a fresh anonymous mapping at a free address of this child.
        let p = unsafe {
            libc::mmap(
                0x4000_0000 as *mut libc::c_void,
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        assert_eq!(p as usize, 0x4000_0000);
        match Vcpu::new() {
            Err(e @ HostError::WindowOccupied(_)) => {
                let msg = e.to_string();
                assert!(msg.contains("40000000"), "names the mapping: {msg}");
                println!("CHILD-OK: {msg}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("the window was reserved over an existing mapping"),
        }
        return;
    }
    let out = in_child("occupied_low_4gib_is_a_clear_error", "occupied");
    assert!(out.contains("CHILD-OK: the low 4 GiB"), "{out}");
}

#[test]
fn one_vcpu_per_process() {
    let _l = vm_lock();
    let v = Vcpu::new().unwrap();
    assert!(matches!(Vcpu::new(), Err(HostError::Busy)));
    drop(v);
    let _again = Vcpu::new().expect("free again after drop");
}

#[test]
fn foreign_selectors_are_refused_before_entry() {
    let _l = vm_lock();
    let mut v = Vcpu::new().unwrap();
    let flat = v.flat_segments();
    // 0x33 would switch the guest to 64-bit mode; 0x0b is a kernel segment.
    for cs in [0x33u16, 0x0b, 0x7b, 0xFFFC] {
        assert!(matches!(v.set_segments(Segments { cs, ..flat }), Err(HostError::BadSelector(s)) if s == cs));
    }
    assert!(matches!(v.set_segments(Segments { ss: 0, ..flat }), Err(HostError::BadSelector(0))));
    assert!(
        matches!(v.set_segments(Segments { ds: 0x2f, ..flat }), Err(HostError::BadSelector(0x2f))),
        "an LDT entry nobody wrote"
    );
    assert_eq!(v.segments(), flat, "nothing changed");
}
