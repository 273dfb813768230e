//! `popek bench --suite host`: what the execution host costs.
//!
//! - `trap_roundtrip`: guest `ud2` → SIGILL → exit → monitor skips it →
//!   re-entry, µs per round trip (median of batches);
//! - `kick_latency`: from another thread's kick to `run` returning, µs
//!   (median of many kicks of a spinning guest);
//! - `direct_compute_ratio`: speed of a ~1 s compute loop run through the
//!   vCPU with a 250 Hz kick timer, relative to the same bytes entered by a
//!   bare far call with no monitor around them (native time / vCPU time:
//!   1.0 is native speed, the target is ≥ 0.97). Runs alternate so machine
//!   noise hits both sides alike; the figure is the ratio of medians.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{median, BenchError, Row};
use crate::host::{entry::bare_far_call, Exit, HostError, Prot, Vcpu};
use crate::memory::GuestMemory;

const CODE: u32 = 0x10_0000;
const STACK: u32 = 0x30_0000;

/// The compute loop: `ecx` iterations of an LCG and a rotate-xor, then `ret`
/// (called by a `call` stub that ends in `ud2` for the vCPU or `retf` for
/// the bare far call). The bt suite runs the same bytes through the TC.
pub(super) fn compute_code() -> Vec<u8> {
    vec![
        0xB8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0xBE, 0x78, 0x56, 0x34, 0x12, // mov esi, 0x12345678
        // loop:
        0x69, 0xC0, 0xCD, 0x0D, 0x01, 0x00, // imul eax, eax, 69069
        0x40, // inc eax
        0xC1, 0xC6, 0x03, // rol esi, 3
        0x31, 0xC6, // xor esi, eax
        0x49, // dec ecx
        0x75, 0xF1, // jnz loop
        0xC3, // ret
    ]
}

struct Setup {
    vcpu: Vcpu,
    _mem: GuestMemory,
}

fn setup() -> Result<Setup, BenchError> {
    let vcpu = Vcpu::new()?;
    let mem = GuestMemory::new(16 << 20)?;
    let w = vcpu.window();
    w.unmap_all()?;
    w.map(CODE, &mem, u64::from(CODE), 0x30_0000, Prot::RWX)?;
    // 0x100000: call compute; ud2      0x100010: call compute; retf
    // 0x100100: compute
    let stub_vcpu = [0xE8, 0xFB, 0x00, 0x00, 0x00, 0x0F, 0x0B];
    let stub_bare = [0xE8, 0xEB, 0x00, 0x00, 0x00, 0xCB];
    mem.write(u64::from(CODE), &stub_vcpu).expect("in RAM");
    mem.write(u64::from(CODE) + 0x10, &stub_bare).expect("in RAM");
    mem.write(u64::from(CODE) + 0x100, &compute_code()).expect("in RAM");
    // ud2 for the trap loop at 0x100200, a spin loop at 0x100300.
    mem.write(u64::from(CODE) + 0x200, &[0x0F, 0x0B, 0xEB, 0xFC]).expect("in RAM");
    mem.write(u64::from(CODE) + 0x300, &[0xEB, 0xFE]).expect("in RAM");
    Ok(Setup { vcpu, _mem: mem })
}

fn set_eip(v: &mut Vcpu, eip: u32, ecx: u32) {
    let mut r = v.regs();
    r.eip = eip;
    r.ecx = ecx;
    r.esp = STACK;
    v.set_regs(&r);
}

fn trap_roundtrip(v: &mut Vcpu) -> Result<f64, HostError> {
    set_eip(v, CODE + 0x200, 0);
    let mut samples = Vec::new();
    for _ in 0..7 {
        let n = 3000;
        let t = Instant::now();
        for _ in 0..n {
            let e = v.run()?;
            debug_assert_eq!(e, Exit::InvalidOpcode);
            let mut r = v.regs();
            r.eip += 2;
            v.set_regs(&r);
        }
        samples.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(n));
    }
    Ok(median(samples))
}

fn kick_latency(v: &mut Vcpu) -> Result<f64, HostError> {
    let kicker = v.kicker();
    let mut samples = Vec::new();
    for _ in 0..200 {
        set_eip(v, CODE + 0x300, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(300));
            let at = Instant::now();
            let _ = kicker.kick();
            let _ = tx.send(at);
        });
        let e = v.run()?;
        let back = Instant::now();
        t.join().expect("kicker thread");
        if e == Exit::Kick {
            if let Ok(at) = rx.recv() {
                samples.push(back.saturating_duration_since(at).as_secs_f64() * 1e6);
            }
        }
    }
    Ok(median(samples))
}

fn run_vcpu_compute(v: &mut Vcpu, iters: u32) -> Result<(f64, u64), BenchError> {
    let kicker = v.kicker();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let timer = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(4)); // 250 Hz
            let _ = kicker.kick();
        }
    });
    set_eip(v, CODE, iters);
    let t = Instant::now();
    let mut kicks = 0;
    loop {
        match v.run()? {
            Exit::Kick => kicks += 1,
            Exit::InvalidOpcode => break,
            e => {
                stop.store(true, Ordering::Relaxed);
                let _ = timer.join();
                return Err(BenchError::UnexpectedExit(format!("{e:?}")));
            }
        }
    }
    let dt = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = timer.join();
    Ok((dt, kicks))
}

fn run_bare_compute(v: &Vcpu, iters: u32) -> f64 {
    let t = Instant::now();
    // SAFETY: the stub at CODE+0x10 calls the compute loop, which only
    // touches registers and the stack at STACK (mapped RW), then `retf`s.
    unsafe { bare_far_call(v.window(), CODE + 0x10, STACK, crate::host::ldt::HOST_CS32, iters) };
    t.elapsed().as_secs_f64()
}

/// Runs the host suite.
pub fn run(quick: bool) -> Result<Vec<Row>, BenchError> {
    let mut s = setup()?;
    let v = &mut s.vcpu;
    let mut rows = vec![Row::new("host", "trap_roundtrip", "bt", trap_roundtrip(v)?, "us")];
    rows.push(Row::new("host", "kick_latency", "bt", kick_latency(v)?, "us"));

    // Calibrate to about one second natively (0.2 s with --quick).
    let target = if quick { 0.2 } else { 1.0 };
    let probe = 20_000_000u32;
    let t = run_bare_compute(v, probe);
    let iters = ((f64::from(probe) * target / t.max(1e-6)) as u64).clamp(1_000_000, u64::from(u32::MAX)) as u32;
    let (mut native, mut direct) = (Vec::new(), Vec::new());
    let mut kicks = 0;
    for _ in 0..if quick { 3 } else { 5 } {
        native.push(run_bare_compute(v, iters));
        let (dt, k) = run_vcpu_compute(v, iters)?;
        direct.push(dt);
        kicks += k;
    }
    let (n, d) = (median(native), median(direct));
    tracing::info!(native_s = n, vcpu_s = d, iters, kicks, "direct compute");
    rows.push(Row::new("host", "direct_compute_native_s", "native", n, "s"));
    rows.push(Row::new("host", "direct_compute_vcpu_s", "bt", d, "s"));
    rows.push(Row::new("host", "direct_compute_ratio", "bt", n / d, "ratio"));
    Ok(rows)
}
