//! `popek bench --suite bt`: what the binary translator costs. Every guest
//! here runs at virtual CPL 0, paging off, flat segments, through
//! [`BtBackend`] (translated code only).
//!
//! - `kernel_compute_ratio`: the host suite's compute loop (the same bytes)
//!   run from the TC, against the same bytes entered by a bare far call with
//!   no monitor around them (native time / TC time; target ≥ 0.85). Runs
//!   alternate; the figure is the ratio of medians.
//! - `callout_roundtrip`: ns per `mov eax, cr0` in a kernel loop (a callout
//!   whose monitor work is one register read), minus the same loop with a
//!   `nop` in its place.
//! - `indirect_lookup`: ns per `call f` / `f: ret` pair in a kernel loop
//!   (the call is a push and a chained jump, the `ret` an inline lookup in
//!   the hash table), minus the loop without the call.
//! - `translate_rate`: guest instructions translated per ms, timing
//!   [`Engine::translate`] over a few thousand distinct generated blocks in a
//!   detached VMM area (no guest, no host mechanics).
//! - `cli_sti`: ns per CLI/STI pair in a kernel loop (inline on the virtual
//!   IF in the vCPU page), minus the empty loop.

use std::sync::Arc;
use std::time::Instant;

use engine::{BlockKey, Engine, FetchFault, GuestCode, VmmAreaView};

use super::{median, BenchError, Row};
use crate::backend::bt::{BtBackend, BtConfig};
use crate::backend::{Backend, BackendError, VmExit};
use crate::cpu::Cpu;
use crate::host::window::Window;
use crate::host::{entry::bare_far_call, ldt::HOST_CS32, Prot};
use crate::memory::GuestMemory;

/// A tiny 32-bit emitter for benchmark guests: raw encodings, one method per
/// instruction form used here (the product binary has no `code_asm`).
pub(super) struct Asm {
    base: u32,
    pub(super) buf: Vec<u8>,
}

/// A forward rel32 branch waiting for its target.
#[must_use]
pub(super) struct Fwd(usize);

impl Asm {
    pub(super) fn new(base: u32) -> Asm {
        Asm { base, buf: Vec::new() }
    }
    /// Guest address of the next byte.
    pub(super) fn here(&self) -> u32 {
        self.base + self.buf.len() as u32
    }
    pub(super) fn bytes(&mut self, b: &[u8]) -> &mut Asm {
        self.buf.extend_from_slice(b);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Asm {
        self.bytes(&v.to_le_bytes())
    }
    /// `mov r32, imm32` (B8+r id).
    pub(super) fn mov_imm(&mut self, reg: u8, v: u32) -> &mut Asm {
        self.bytes(&[0xB8 + reg]).u32(v)
    }
    /// `mov dword [abs], imm32` (C7 05 abs imm).
    pub(super) fn mov_mem_imm(&mut self, abs: u32, v: u32) -> &mut Asm {
        self.bytes(&[0xC7, 0x05]).u32(abs).u32(v)
    }
    /// `mov [abs], eax` (A3 abs).
    pub(super) fn store_eax(&mut self, abs: u32) -> &mut Asm {
        self.bytes(&[0xA3]).u32(abs)
    }
    /// `inc dword [abs]` (FF 05 abs).
    pub(super) fn inc_mem(&mut self, abs: u32) -> &mut Asm {
        self.bytes(&[0xFF, 0x05]).u32(abs)
    }
    /// `cmp eax, imm32` (3D id).
    pub(super) fn cmp_eax(&mut self, v: u32) -> &mut Asm {
        self.bytes(&[0x3D]).u32(v)
    }
    /// `add esi, imm32` (81 C6 id).
    pub(super) fn add_esi(&mut self, v: u32) -> &mut Asm {
        self.bytes(&[0x81, 0xC6]).u32(v)
    }
    /// `push imm32` (68 id).
    pub(super) fn push_imm(&mut self, v: u32) -> &mut Asm {
        self.bytes(&[0x68]).u32(v)
    }
    /// `out imm8, al` (E6 ib).
    pub(super) fn out_al(&mut self, port: u8) -> &mut Asm {
        self.bytes(&[0xE6, port])
    }
    /// `call rel32` (E8 cd).
    pub(super) fn call(&mut self, target: u32) -> &mut Asm {
        let rel = target.wrapping_sub(self.here() + 5);
        self.bytes(&[0xE8]).u32(rel)
    }
    /// `jmp rel32` (E9 cd).
    pub(super) fn jmp(&mut self, target: u32) -> &mut Asm {
        let rel = target.wrapping_sub(self.here() + 5);
        self.bytes(&[0xE9]).u32(rel)
    }
    /// `dec ecx; jnz target` (49, 0F 85 cd): the loop tail.
    pub(super) fn dec_ecx_jnz(&mut self, target: u32) -> &mut Asm {
        self.bytes(&[0x49]);
        let rel = target.wrapping_sub(self.here() + 6);
        self.bytes(&[0x0F, 0x85]).u32(rel)
    }
    /// `jcc rel32` to a later address (0F 80+cc cd); see [`Asm::bind`].
    pub(super) fn jcc_fwd(&mut self, cc: u8) -> Fwd {
        self.bytes(&[0x0F, 0x80 + cc, 0, 0, 0, 0]);
        Fwd(self.buf.len())
    }
    /// `jmp rel32` to a later address (E9 cd).
    pub(super) fn jmp_fwd(&mut self) -> Fwd {
        self.bytes(&[0xE9, 0, 0, 0, 0]);
        Fwd(self.buf.len())
    }
    /// Aims a forward branch at the current address.
    pub(super) fn bind(&mut self, f: Fwd) {
        let rel = (self.buf.len() - f.0) as u32;
        self.buf[f.0 - 4..f.0].copy_from_slice(&rel.to_le_bytes());
    }
}

/// Condition codes for [`Asm::jcc_fwd`].
pub(super) const CC_NE: u8 = 5;

/// Register numbers.
pub(super) const EAX: u8 = 0;
pub(super) const ECX: u8 = 1;
pub(super) const EDX: u8 = 2;
pub(super) const ESI: u8 = 6;

/// Guest layout (guest-physical = linear, paging off).
const CODE: u32 = 0x10_0000;
const STACK: u32 = 0x30_0000;
const RAM: u64 = 16 << 20;
/// Where the bare-call copy of the compute loop lives: a window range the
/// paging-off guest never maps (beyond its RAM).
const NATIVE: u32 = 0x4000_0000;
const NATIVE_LEN: u32 = 0x1_0000;

/// Entry points of the kernel guest (each runs `ecx` iterations, then
/// `out 0xf4, al`).
struct Entries {
    compute: u32,
    empty: u32,
    cr0: u32,
    call_ret: u32,
    cli_sti: u32,
}

/// Writes the kernel: a routine per measurement, each ending in `out 0xf4`.
fn kernel(mem: &GuestMemory) -> Result<Entries, BenchError> {
    let mut a = Asm::new(CODE);
    // 0x100000: call compute; out 0xf4, al. The loop at +0x100, as in host.rs.
    let compute = a.here();
    a.call(CODE + 0x100).out_al(0xF4);
    a.buf.resize(0x100, 0x90);
    a.bytes(&super::host::compute_code());
    a.buf.resize(0x200, 0x90);
    // A tiny function for the call/ret loop.
    let f = a.here();
    a.bytes(&[0xC3]); // ret
    a.buf.resize(0x240, 0x90);
    // Each loop body starts 16-byte aligned, like the TC's blocks.
    let lp = |a: &mut Asm, body: &dyn Fn(&mut Asm)| {
        let n = (a.buf.len() + 15) & !15;
        a.buf.resize(n, 0x90);
        let entry = a.here();
        let top = a.here();
        body(a);
        a.dec_ecx_jnz(top).out_al(0xF4);
        entry
    };
    let empty = lp(&mut a, &|a| {
        a.bytes(&[0x90]); // nop
    });
    let cr0 = lp(&mut a, &|a| {
        a.bytes(&[0x0F, 0x20, 0xC0]); // mov eax, cr0
    });
    let call_ret = lp(&mut a, &|a| {
        a.call(f);
    });
    let cli_sti = lp(&mut a, &|a| {
        a.bytes(&[0xFA, 0xFB]); // cli; sti
    });
    mem.write(u64::from(CODE), &a.buf)?;
    Ok(Entries { compute, empty, cr0, call_ret, cli_sti })
}

fn backend_err(e: BackendError) -> BenchError {
    BenchError::UnexpectedExit(format!("bt backend: {e}"))
}

/// A kernel-mode guest on the bt backend.
struct Kernel {
    bt: BtBackend,
    entries: Entries,
}

impl Kernel {
    fn new() -> Result<Kernel, BenchError> {
        Kernel::with_config(BtConfig::default())
    }

    fn with_config(config: BtConfig) -> Result<Kernel, BenchError> {
        let mem = Arc::new(GuestMemory::new(RAM)?);
        let entries = kernel(&mem)?;
        let mut cpu = Cpu::flat_protected(0x08, 0x10);
        cpu.eip = CODE;
        cpu.gpr[4] = STACK;
        let bt = BtBackend::new(mem, cpu, config).map_err(backend_err)?;
        Ok(Kernel { bt, entries })
    }

    /// Runs the routine at `entry` with `ecx = iters` until its
    /// `out 0xf4`; seconds of wall time.
    fn time(&mut self, entry: u32, iters: u32) -> Result<f64, BenchError> {
        // Completes the previous OUT (it moves EIP past it) before we aim EIP.
        self.bt.complete_io_in(0);
        let c = self.bt.cpu_mut();
        c.eip = entry;
        c.gpr[1] = iters;
        c.gpr[4] = STACK;
        let t = Instant::now();
        loop {
            match self.bt.run().map_err(backend_err)? {
                VmExit::IoOut { port: 0xF4, .. } => break,
                VmExit::Interrupted => {}
                e => {
                    return Err(BenchError::UnexpectedExit(format!(
                        "{e:?} at eip {:#x} (bt suite kernel)",
                        self.bt.cpu().eip
                    )))
                }
            }
        }
        Ok(t.elapsed().as_secs_f64())
    }
}

/// The bare-call copy of the compute loop, mapped at [`NATIVE`] in the
/// window, outside anything the guest maps.
struct Native {
    window: &'static Window,
    _mem: GuestMemory,
}

impl Native {
    fn new() -> Result<Native, BenchError> {
        let window = Window::get()?;
        let mem = GuestMemory::new(2 << 20)?; // the smallest guest RAM; only NATIVE_LEN is mapped
                                              // +0: call compute; retf    +0x100: compute (as host.rs lays it out)
        mem.write(0, &[0xE8, 0xFB, 0x00, 0x00, 0x00, 0xCB])?;
        mem.write(0x100, &super::host::compute_code())?;
        window.map(NATIVE, &mem, 0, NATIVE_LEN, Prot::RWX)?;
        Ok(Native { window, _mem: mem })
    }

    fn time(&self, iters: u32) -> f64 {
        let t = Instant::now();
        // SAFETY: NATIVE holds `call compute; retf`; the loop touches only
        // registers and the stack at the top of the same mapping (RWX).
        unsafe { bare_far_call(self.window, NATIVE, NATIVE + NATIVE_LEN - 16, HOST_CS32, iters) };
        t.elapsed().as_secs_f64()
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        let _ = self.window.unmap(NATIVE, NATIVE_LEN);
    }
}

/// Iterations that take about `target` seconds, from one probe run.
fn calibrate(probe_iters: u32, probe_s: f64, target: f64) -> u32 {
    ((f64::from(probe_iters) * target / probe_s.max(1e-6)) as u64).clamp(1_000, u64::from(u32::MAX)) as u32
}

fn compute_ratio(k: &mut Kernel, quick: bool, rows: &mut Vec<Row>) -> Result<(), BenchError> {
    let native = Native::new()?;
    let target = if quick { 0.1 } else { 0.6 };
    let probe = 20_000_000;
    let iters = calibrate(probe, native.time(probe), target);
    k.time(k.entries.compute, 1000)?; // translate and chain
    let (mut n, mut t) = (Vec::new(), Vec::new());
    for _ in 0..if quick { 3 } else { 7 } {
        n.push(native.time(iters));
        t.push(k.time(k.entries.compute, iters)?);
    }
    let (n, t) = (median(n), median(t));
    tracing::info!(native_s = n, tc_s = t, iters, "kernel compute");
    rows.push(Row::new("bt", "kernel_compute_native_s", "native", n, "s"));
    rows.push(Row::new("bt", "kernel_compute_tc_s", "bt", t, "s"));
    rows.push(Row::new("bt", "kernel_compute_ratio", "bt", n / t, "ratio"));
    Ok(())
}

/// Seconds per run of the compute loop (median of `runs`) under `config`:
/// the replay suite compares the deterministic mode with the normal one.
pub(super) fn compute_seconds(config: BtConfig, iters: u32, runs: usize) -> Result<f64, BenchError> {
    let mut k = Kernel::with_config(config)?;
    k.time(k.entries.compute, 1000)?; // translate and chain
    let mut t = Vec::new();
    for _ in 0..runs {
        t.push(k.time(k.entries.compute, iters)?);
    }
    Ok(median(t))
}

/// ns per iteration of `entry`'s loop minus the empty loop, alternating
/// runs, median of each.
fn per_iteration(k: &mut Kernel, entry: u32, iters: u32, runs: usize) -> Result<f64, BenchError> {
    k.time(entry, 1000)?;
    k.time(k.entries.empty, 1000)?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        with.push(k.time(entry, iters)?);
        without.push(k.time(k.entries.empty, iters)?);
    }
    Ok((median(with) - median(without)) * 1e9 / f64::from(iters))
}

/// A generated guest program of many distinct straight-line blocks, and
/// where each starts.
struct Program {
    bytes: Vec<u8>,
    starts: Vec<u32>,
}

/// Plain instructions (IDENT), a few sensitive ones (inline or callouts)
/// and block ends, chosen by an LCG so that blocks differ.
fn program(base: u32, blocks: usize) -> Program {
    const IDENT: &[&[u8]] = &[
        &[0x89, 0xD8],                   // mov eax, ebx
        &[0x01, 0xCA],                   // add edx, ecx
        &[0x8D, 0x44, 0x8E, 0x08],       // lea eax, [esi+ecx*4+8]
        &[0x8B, 0x47, 0x04],             // mov eax, [edi+4]
        &[0x89, 0x46, 0x0C],             // mov [esi+12], eax
        &[0x53],                         // push ebx
        &[0x5B],                         // pop ebx
        &[0xC1, 0xE0, 0x05],             // shl eax, 5
        &[0x31, 0xF6],                   // xor esi, esi
        &[0x81, 0xF9, 0x00, 0x10, 0, 0], // cmp ecx, 0x1000
        &[0x0F, 0xAF, 0xC3],             // imul eax, ebx
        &[0x66, 0x89, 0x07],             // mov [edi], ax
        &[0x0F, 0xB6, 0x0E],             // movzx ecx, byte [esi]
        &[0xF7, 0xD8],                   // neg eax
        &[0x85, 0xC0],                   // test eax, eax
        &[0x83, 0xC4, 0x08],             // add esp, 8
    ];
    const SENSITIVE: &[&[u8]] = &[
        &[0xFA],             // cli (inline)
        &[0xFB],             // sti (inline)
        &[0x9C],             // pushfd (inline)
        &[0x0F, 0x20, 0xC0], // mov eax, cr0 (callout)
        &[0xE6, 0x80],       // out 0x80, al (callout)
    ];
    let mut seed = 0x1234_5678u32;
    let mut next = || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 16) as usize
    };
    let mut bytes = Vec::new();
    let mut starts = Vec::new();
    for _ in 0..blocks {
        let start = base + bytes.len() as u32;
        starts.push(start);
        for _ in 0..6 + next() % 12 {
            let r = next();
            let insn = if r % 10 == 0 { SENSITIVE[r / 10 % SENSITIVE.len()] } else { IDENT[r % IDENT.len()] };
            bytes.extend_from_slice(insn);
        }
        match next() % 3 {
            0 => bytes.push(0xC3),                       // ret
            1 => bytes.extend_from_slice(&[0x74, 0x00]), // jz +0 (both exits)
            _ => {
                // jmp to some earlier block (or itself)
                let to = starts[next() % starts.len()];
                let rel = to.wrapping_sub(base + bytes.len() as u32 + 5);
                bytes.push(0xE9);
                bytes.extend_from_slice(&rel.to_le_bytes());
            }
        }
    }
    Program { bytes, starts }
}

/// Guest code from a byte vector, identity-mapped.
struct VecCode<'a> {
    base: u32,
    bytes: &'a [u8],
}

impl GuestCode for VecCode<'_> {
    fn fetch(&mut self, linear: u32, buf: &mut [u8]) -> Result<(), FetchFault> {
        let off = linear.wrapping_sub(self.base) as usize;
        match self.bytes.get(off..off + buf.len()) {
            Some(b) => {
                buf.copy_from_slice(b);
                Ok(())
            }
            None => {
                // Past the end: int3 padding (never reached: every block ends before).
                buf.fill(0xCC);
                Ok(())
            }
        }
    }
    fn phys_page(&mut self, linear: u32) -> Option<u64> {
        Some(u64::from(linear & !0xFFF))
    }
}

fn translate_rate(quick: bool) -> Result<f64, BenchError> {
    const BASE: u32 = 0x0010_0000;
    let p = program(BASE, 4000);
    let reps = if quick { 3 } else { 15 };
    let mut rates = Vec::new();
    for _ in 0..reps {
        let view = VmmAreaView::detached(0xFF80_0000);
        let mut e = Engine::new(view, engine::Config::default())
            .map_err(|e| BenchError::UnexpectedExit(format!("engine: {e}")))?;
        let mut code = VecCode { base: BASE, bytes: &p.bytes };
        let t = Instant::now();
        for &s in &p.starts {
            e.translate(BlockKey::flat32(s), &mut code)
                .map_err(|err| BenchError::UnexpectedExit(format!("translating {s:#x}: {err}")))?;
        }
        let dt = t.elapsed().as_secs_f64();
        let st = e.stats();
        if st.flushes != 0 {
            tracing::warn!(flushes = st.flushes, "the translate_rate program overflowed the TC");
        }
        rates.push(st.guest_insns_translated as f64 / (dt * 1e3));
    }
    Ok(median(rates))
}

/// Runs the bt suite.
pub fn run(quick: bool) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    let mut k = Kernel::new()?;
    compute_ratio(&mut k, quick, &mut rows)?;
    let runs = if quick { 3 } else { 7 };
    let big = if quick { 2_000_000 } else { 20_000_000 };
    let cr0 = k.entries.cr0;
    let callout_iters = if quick { 20_000 } else { 200_000 };
    rows.push(Row::new("bt", "callout_roundtrip", "bt", per_iteration(&mut k, cr0, callout_iters, runs)?, "ns"));
    let call_ret = k.entries.call_ret;
    rows.push(Row::new("bt", "indirect_lookup", "bt", per_iteration(&mut k, call_ret, big, runs)?, "ns"));
    let cli_sti = k.entries.cli_sti;
    rows.push(Row::new("bt", "cli_sti", "bt", per_iteration(&mut k, cli_sti, big, runs)?, "ns"));
    let stats = k.bt.stats();
    tracing::info!(?stats, "bt suite counters");
    drop(k);
    rows.push(Row::new("bt", "translate_rate", "bt", translate_rate(quick)?, "insns/ms"));
    Ok(rows)
}
