//! `popek bench --suite mmu`: what shadow paging and interrupt delivery
//! cost. Guests run with paging on (CR0.PG|WP, CR4.PSE): the kernel sees
//! 0-16 MiB identity-mapped by 4 MiB pages, a user page table at 16 MiB and
//! data page tables at 1 GiB, all built by the bench before the first
//! instruction. Timing is wall time between marks the guest makes (an
//! `out 0x80` from the kernel; through `int 0x80` from user code).
//!
//! - `hidden_fault`: µs per first touch (a kernel read) of one of N pages
//!   present in the guest page table with A clear (so batching cannot
//!   pre-map neighbours): each touch is a host fault resolved by the shadow
//!   MMU. Between passes the kernel clears the A bits and reloads CR3.
//!   `hidden_fault_count` is the number of hidden faults per pass (stats).
//! - `guest_pagefault`: µs per user write that takes a guest #PF: the guest
//!   kernel's handler maps the page (and unmaps + INVLPGs the other one of
//!   a pair, so the next touch faults again), IRETs, the write completes.
//! - `cr3_switch`: µs per kernel `mov cr3` (same value) followed by reads of
//!   a 32-page working set spread one page per 64 KiB; `cr3_switch_faults`
//!   is hidden faults per switch. The shadow MMU keeps what the new address
//!   space maps identically, so a reload refills nothing (it refaulted the
//!   whole working set before: 32 faults, ~420 µs).
//! - `timer_irq`: µs per PIT interrupt taken by a user compute loop through
//!   the real platform and run loop ([`Vm`]): the handler counts, EOIs and
//!   IRETs. (loop time with the PIT at ~20 kHz − without) / interrupts,
//!   median over pairs of adjacent runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bt::{Asm, CC_NE, EAX, ECX, EDX, ESI};
use super::{median, BenchError, Row};
use crate::backend::bt::{BtBackend, BtConfig};
use crate::backend::{Backend, BackendError, Kick, VmExit};
use crate::cpu::{Cpu, Descriptor, SegReg, TableReg};
use crate::devices::{Clock, HostClock, HostWallClock, Platform, PlatformConfig};
use crate::memory::GuestMemory;
use crate::vm::{RunOutcome, Vm};

const RAM: u64 = 32 << 20;
const GDT: u32 = 0x1000;
const IDT: u32 = 0x2000;
const TSS: u32 = 0x4000;
const CODE: u32 = 0x10_0000;
const COUNT: u32 = 0x20_0000;
const STACK: u32 = 0x30_0000;
const PD: u32 = 0x50_0000;
const PT_USER: u32 = 0x50_1000;
const PT_DATA: u32 = 0x50_2000;
const PT_WS: u32 = 0x50_3000;

/// User space: code, stack and a pair of demand-paged heap pages.
const USER: u32 = 0x0100_0000;
const USER_STACK_TOP: u32 = USER + 0x2000;
const HEAP_A: u32 = USER + 0x4000;
const HEAP_B: u32 = USER + 0x5000;
const USER_PHYS: u32 = 0x60_0000;
/// The compute loop count of `timer_irq`, in the user stack page.
const ITERS: u32 = USER + 0x1800;
const ITERS_PHYS: u64 = USER_PHYS as u64 + 0x1800;

/// Kernel data pages touched by `hidden_fault` (N ≤ 1024, one page table).
const DATA: u32 = 0x4000_0000;
const DATA_PHYS: u32 = 0x0100_0000;
/// The `cr3_switch` working set: 32 pages, one per 64 KiB.
const WS: u32 = 0x4040_0000;
const WS_PAGES: u32 = 32;
const WS_STRIDE: u32 = 0x1_0000;
const WS_PHYS: u32 = 0x0140_0000;

const HIDDEN_PAGES: u32 = 1024;

const PTE_P: u32 = 1;
const PTE_RW: u32 = 2;
const PTE_US: u32 = 4;
const PTE_A: u32 = 0x20;
const PTE_D: u32 = 0x40;
const PDE_PS: u32 = 0x80;

fn backend_err(e: BackendError) -> BenchError {
    BenchError::UnexpectedExit(format!("bt backend: {e}"))
}

/// Kernel and user entry points.
struct Entries {
    hidden: u32,
    cr3: u32,
    enter_user_pf: u32,
    enter_user_timer: u32,
    pf_handler: u32,
    mark_handler: u32,
    exit_handler: u32,
    timer_handler: u32,
}

/// `push imm; push imm; ...; iretd` into user code at `eip` (IF set).
fn enter_user(a: &mut Asm, eip: u32) {
    a.mov_imm(EAX, 0x3B).bytes(&[0x8E, 0xD8, 0x8E, 0xC0]); // mov ds, ax; mov es, ax
    a.push_imm(0x3B).push_imm(USER_STACK_TOP).push_imm(0x202).push_imm(0x33).push_imm(eip);
    a.bytes(&[0xCF]); // iretd
}

fn kernel_code() -> (Vec<u8>, Entries) {
    let mut a = Asm::new(CODE);

    // hidden_fault: clear A in every data PTE, flush, mark, touch, mark.
    let hidden = a.here();
    a.mov_imm(ESI, PT_DATA).mov_imm(ECX, HIDDEN_PAGES);
    let clear = a.here();
    a.bytes(&[0x81, 0x26]).bytes(&(!PTE_A).to_le_bytes()); // and dword [esi], ~A
    a.add_esi(4).dec_ecx_jnz(clear);
    a.bytes(&[0x0F, 0x20, 0xD8, 0x0F, 0x22, 0xD8]); // mov eax, cr3; mov cr3, eax
    a.out_al(0x80);
    a.mov_imm(ESI, DATA).mov_imm(ECX, HIDDEN_PAGES);
    let touch = a.here();
    a.bytes(&[0x8B, 0x06]); // mov eax, [esi]
    a.add_esi(0x1000).dec_ecx_jnz(touch);
    a.out_al(0x80);
    a.jmp(hidden);

    // cr3_switch: EDX times { mov cr3, eax; read the working set }.
    let cr3 = a.here();
    a.bytes(&[0x0F, 0x20, 0xD8]); // mov eax, cr3
    a.out_al(0x80);
    let outer = a.here();
    a.bytes(&[0x0F, 0x22, 0xD8]); // mov cr3, eax
    a.mov_imm(ESI, WS).mov_imm(ECX, WS_PAGES);
    let ws = a.here();
    a.bytes(&[0x8B, 0x1E]); // mov ebx, [esi]
    a.add_esi(WS_STRIDE).dec_ecx_jnz(ws);
    a.bytes(&[0x4A]); // dec edx
    let rel = outer.wrapping_sub(a.here() + 6);
    a.bytes(&[0x0F, 0x85]).bytes(&rel.to_le_bytes()); // jnz outer
    a.out_al(0x80);
    a.jmp(cr3);

    let enter_user_pf = a.here();
    enter_user(&mut a, USER);
    let enter_user_timer = a.here();
    enter_user(&mut a, USER + 0x100);

    // #PF: map the faulting heap page, unmap the other one and INVLPG it.
    let pf_handler = a.here();
    a.bytes(&[0x50, 0x0F, 0x20, 0xD0]); // push eax; mov eax, cr2
    a.cmp_eax(HEAP_A);
    let not_a = a.jcc_fwd(CC_NE);
    a.mov_mem_imm(pte_of(HEAP_A), (USER_PHYS + 0x4000) | PTE_P | PTE_RW | PTE_US);
    a.mov_mem_imm(pte_of(HEAP_B), 0);
    a.mov_imm(EAX, HEAP_B);
    let done = a.jmp_fwd();
    a.bind(not_a);
    a.mov_mem_imm(pte_of(HEAP_B), (USER_PHYS + 0x5000) | PTE_P | PTE_RW | PTE_US);
    a.mov_mem_imm(pte_of(HEAP_A), 0);
    a.mov_imm(EAX, HEAP_A);
    a.bind(done);
    a.bytes(&[0x0F, 0x01, 0x38]); // invlpg [eax]
    a.bytes(&[0x58, 0x83, 0xC4, 0x04, 0xCF]); // pop eax; add esp, 4; iretd

    // int 0x80 for the bt-driven guests: a mark on port 0x80.
    let mark_handler = a.here();
    a.out_al(0x80).bytes(&[0xCF]); // out 0x80, al; iretd
                                   // int 0x80 under the Vm: isa-debug-exit makes `Vm::run` return.
    let exit_handler = a.here();
    a.out_al(0xF4).bytes(&[0xCF]); // out 0xf4, al; iretd
                                   // IRQ0: count, EOI, return.
    let timer_handler = a.here();
    a.bytes(&[0x50]).inc_mem(COUNT); // push eax; inc dword [COUNT]
    a.bytes(&[0xB0, 0x20]).out_al(0x20); // mov al, 0x20; out 0x20, al
    a.bytes(&[0x58, 0xCF]); // pop eax; iretd
    let e =
        Entries { hidden, cr3, enter_user_pf, enter_user_timer, pf_handler, mark_handler, exit_handler, timer_handler };
    (a.buf, e)
}

/// Guest-physical address of the PTE of user page `lin`.
fn pte_of(lin: u32) -> u32 {
    PT_USER + ((lin >> 12) & 0x3FF) * 4
}

/// The user program at USER: marks around a loop of two heap writes (each
/// a guest #PF); at USER + 0x100: marks around a compute loop.
fn user_code(pf_iters: u32) -> Vec<u8> {
    let mut a = Asm::new(USER);
    let top = a.here();
    a.mov_imm(EAX, 1).bytes(&[0xCD, 0x80]); // int 0x80
    a.mov_imm(ECX, pf_iters);
    let l = a.here();
    a.store_eax(HEAP_A).store_eax(HEAP_B);
    a.dec_ecx_jnz(l);
    a.mov_imm(EAX, 1).bytes(&[0xCD, 0x80]);
    a.jmp(top);
    a.buf.resize(0x100, 0x90);
    // Compute loop, its count read from ITERS (written by the host).
    let top = a.here();
    a.mov_imm(EAX, 1).bytes(&[0xCD, 0x80]);
    a.bytes(&[0x8B, 0x0D]).bytes(&ITERS.to_le_bytes()); // mov ecx, [ITERS]
    let l = a.here();
    a.bytes(&[0x69, 0xC0, 0xCD, 0x0D, 0x01, 0x00]); // imul eax, eax, 69069
    a.bytes(&[0x40, 0xC1, 0xC6, 0x03, 0x31, 0xC6]); // inc eax; rol esi, 3; xor esi, eax
    a.dec_ecx_jnz(l);
    a.mov_imm(EAX, 1).bytes(&[0xCD, 0x80]);
    a.jmp(top);
    a.buf
}

/// Guest RAM with descriptor tables, page tables and code, and the CPU at
/// `entry` with paging on. `int80` is the int 0x80 handler.
fn machine(
    entry: impl Fn(&Entries) -> u32,
    int80: impl Fn(&Entries) -> u32,
    pf_iters: u32,
) -> Result<(Arc<GuestMemory>, Cpu), BenchError> {
    let mem = Arc::new(GuestMemory::new(RAM)?);
    // GDT: 0x08/0x10 kernel code/data, 0x28 TSS, 0x33/0x3b user code/data.
    let gdt: [u64; 8] = [
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_9b00_0000_ffff,
        0,
        0x0000_8900_4000_0067,
        0x00cf_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write(u64::from(GDT) + 8 * i as u64, &d.to_le_bytes())?;
    }
    let (code, e) = kernel_code();
    mem.write(u64::from(CODE), &code)?;
    for (v, h, dpl) in [(14u32, e.pf_handler, 0u32), (0x80, int80(&e), 3), (0x20, e.timer_handler, 0)] {
        let lo = (h & 0xFFFF) | (0x08 << 16);
        let hi = (h & 0xFFFF_0000) | 0x8E00 | (dpl << 13);
        mem.write_u32(u64::from(IDT + v * 8), lo)?;
        mem.write_u32(u64::from(IDT + v * 8 + 4), hi)?;
    }
    mem.write_u32(u64::from(TSS + 4), STACK)?; // ESP0
    mem.write_u32(u64::from(TSS + 8), 0x10)?; // SS0
                                              // Page directory: 0-16 MiB identity (4 MiB supervisor pages), user page
                                              // table at 16 MiB, data tables at 1 GiB.
    for i in 0..4u32 {
        mem.write_u32(u64::from(PD + 4 * i), (i << 22) | PDE_PS | PTE_A | PTE_D | PTE_RW | PTE_P)?;
    }
    mem.write_u32(u64::from(PD + 4 * (USER >> 22)), PT_USER | PTE_US | PTE_RW | PTE_P)?;
    mem.write_u32(u64::from(PD + 4 * (DATA >> 22)), PT_DATA | PTE_RW | PTE_P)?;
    mem.write_u32(u64::from(PD + 4 * (WS >> 22)), PT_WS | PTE_RW | PTE_P)?;
    mem.write_u32(u64::from(pte_of(USER)), USER_PHYS | PTE_US | PTE_P)?;
    mem.write_u32(u64::from(pte_of(USER + 0x1000)), (USER_PHYS + 0x1000) | PTE_US | PTE_RW | PTE_P)?;
    for i in 0..HIDDEN_PAGES {
        mem.write_u32(u64::from(PT_DATA + 4 * i), (DATA_PHYS + 0x1000 * i) | PTE_RW | PTE_P)?;
    }
    for i in 0..WS_PAGES {
        let idx = (WS_STRIDE >> 12) * i;
        mem.write_u32(u64::from(PT_WS + 4 * idx), (WS_PHYS + 0x1000 * i) | PTE_D | PTE_A | PTE_RW | PTE_P)?;
    }
    mem.write(u64::from(USER_PHYS), &user_code(pf_iters))?;

    let mut cpu = Cpu::flat_protected(0x08, 0x10);
    cpu.gdtr = TableReg { base: GDT, limit: 8 * 8 - 1 };
    cpu.idtr = TableReg { base: IDT, limit: 0x7FF };
    cpu.tr = SegReg { selector: 0x28, cache: Descriptor::from_u64(0x0000_8b00_4000_0067) };
    cpu.cr3 = PD;
    cpu.cr4 |= 0x10; // PSE
    cpu.cr0 |= 0x8001_0000; // PG | WP
    cpu.eip = entry(&e);
    cpu.gpr[4] = STACK;
    Ok((mem, cpu))
}

/// A guest run by the bench directly on the bt backend, reporting marks.
struct Marked {
    bt: BtBackend,
}

impl Marked {
    fn new(
        entry: impl Fn(&Entries) -> u32,
        int80: impl Fn(&Entries) -> u32,
        pf_iters: u32,
    ) -> Result<Marked, BenchError> {
        let (mem, cpu) = machine(entry, int80, pf_iters)?;
        Ok(Marked { bt: BtBackend::new(mem, cpu, BtConfig::default()).map_err(backend_err)? })
    }

    fn faults(&self) -> u64 {
        self.bt.mmu().stats().hidden_faults
    }

    /// Runs to the next mark: (time, hidden faults so far).
    fn mark(&mut self) -> Result<(Instant, u64), BenchError> {
        loop {
            match self.bt.run().map_err(backend_err)? {
                VmExit::IoOut { port: 0x80, .. } => return Ok((Instant::now(), self.faults())),
                VmExit::Interrupted => {}
                e => {
                    return Err(BenchError::UnexpectedExit(format!(
                        "{e:?} at eip {:#x} (mmu suite guest)",
                        self.bt.cpu().eip
                    )))
                }
            }
        }
    }

    /// `reps` intervals between a start mark and an end mark: (seconds,
    /// hidden faults) of each.
    fn intervals(&mut self, reps: usize) -> Result<Vec<(f64, u64)>, BenchError> {
        let mut v = Vec::with_capacity(reps);
        for _ in 0..reps {
            let (t0, f0) = self.mark()?;
            let (t1, f1) = self.mark()?;
            v.push((t1.duration_since(t0).as_secs_f64(), f1 - f0));
        }
        Ok(v)
    }
}

fn hidden_fault(quick: bool, rows: &mut Vec<Row>) -> Result<(), BenchError> {
    let mut g = Marked::new(|e| e.hidden, |e| e.mark_handler, 1)?;
    g.intervals(1)?; // warm-up: translate the loops
    let v = g.intervals(if quick { 3 } else { 25 })?;
    let per = median(v.iter().map(|(t, _)| t * 1e6 / f64::from(HIDDEN_PAGES)).collect());
    let faults = median(v.iter().map(|(_, f)| *f as f64).collect());
    rows.push(Row::new("mmu", "hidden_fault", "bt", per, "us"));
    rows.push(Row::new("mmu", "hidden_fault_count", "bt", faults, "faults"));
    Ok(())
}

fn cr3_switch(quick: bool, rows: &mut Vec<Row>) -> Result<(), BenchError> {
    let switches: u32 = if quick { 20 } else { 200 };
    let mut g = Marked::new(|e| e.cr3, |e| e.mark_handler, 1)?;
    g.bt.cpu_mut().gpr[EDX as usize] = switches;
    // The loop leaves EDX at 0: the host sets it before each start mark.
    let mut v = Vec::new();
    for i in 0..if quick { 3 } else { 12 } {
        let (t0, f0) = g.mark()?;
        let (t1, f1) = g.mark()?;
        if i > 0 {
            v.push((t1.duration_since(t0).as_secs_f64(), f1 - f0));
        }
        g.bt.cpu_mut().gpr[EDX as usize] = switches;
    }
    let per = median(v.iter().map(|(t, _)| t * 1e6 / f64::from(switches)).collect());
    let faults = median(v.iter().map(|(_, f)| *f as f64 / f64::from(switches)).collect());
    rows.push(Row::new("mmu", "cr3_switch", "bt", per, "us"));
    rows.push(Row::new("mmu", "cr3_switch_faults", "bt", faults, "faults"));
    Ok(())
}

fn guest_pagefault(quick: bool, rows: &mut Vec<Row>) -> Result<(), BenchError> {
    let iters: u32 = if quick { 200 } else { 2000 };
    let mut g = Marked::new(|e| e.enter_user_pf, |e| e.mark_handler, iters)?;
    g.intervals(1)?;
    let v = g.intervals(if quick { 3 } else { 11 })?;
    // Two faulting writes per iteration.
    let per = median(v.iter().map(|(t, _)| t * 1e6 / f64::from(2 * iters)).collect());
    let pf = g.bt.mmu().stats().guest_page_faults;
    tracing::info!(guest_page_faults = pf, "guest page faults");
    rows.push(Row::new("mmu", "guest_pagefault", "bt", per, "us"));
    Ok(())
}

/// PIT channel 0 programming through the platform's ports: rate generator
/// at `divisor`, or idle (no count loaded: no deadline, no kicks).
fn pit(vm: &mut Vm, divisor: Option<u16>) {
    vm.platform.io_out(0x43, 1, 0x34);
    if let Some(d) = divisor {
        vm.platform.io_out(0x40, 1, u32::from(d & 0xFF));
        vm.platform.io_out(0x40, 1, u32::from(d >> 8));
    }
}

fn timer_irq(quick: bool, rows: &mut Vec<Row>) -> Result<(), BenchError> {
    let (mem, cpu) = machine(|e| e.enter_user_timer, |e| e.exit_handler, 1)?;
    let clock: Arc<dyn Clock> = Arc::new(HostClock::new());
    let platform = Platform::new(PlatformConfig {
        ram_size: mem.size(),
        console: Box::new(std::io::sink()),
        clock: clock.clone(),
        wall_clock: Arc::new(HostWallClock),
    })
    .map_err(|e| BenchError::UnexpectedExit(format!("platform: {e}")))?;
    // Compute iterations per interval (a first guess; calibrated below).
    let mut iters: u32 = 50_000_000;
    mem.write_u32(ITERS_PHYS, iters)?;
    let bt = BtBackend::new(mem.clone(), cpu, BtConfig::default()).map_err(backend_err)?;
    let mut vm = Vm::new(mem.clone(), platform, Box::new(bt), clock);
    // PIC pair: vectors 0x20/0x28, cascade on IRQ2, only IRQ0 unmasked.
    for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0xA0, 0x11), (0xA1, 0x28)] {
        vm.platform.io_out(port, 1, v);
    }
    for (port, v) in [(0xA1, 0x02), (0xA1, 0x01), (0x21, 0xFE), (0xA1, 0xFF)] {
        vm.platform.io_out(port, 1, v);
    }
    const DIVISOR: u16 = 60; // 1.193182 MHz / 60 ≈ 20 kHz
    let mark = |vm: &mut Vm| -> Result<(Instant, u32), BenchError> {
        match vm.run().map_err(|e| BenchError::UnexpectedExit(format!("vm: {e}")))? {
            RunOutcome::DebugExit(_) => Ok((Instant::now(), mem.read_u32(u64::from(COUNT)).unwrap_or(0))),
            other => Err(BenchError::UnexpectedExit(format!("timer_irq guest: {other}"))),
        }
    };
    // One loop interval with the PIT at `divisor` (or idle): (s, interrupts).
    let interval = |vm: &mut Vm, divisor: Option<u16>| -> Result<(f64, u32), BenchError> {
        mark(vm)?; // start mark: the guest reads ITERS next
        pit(vm, divisor);
        let (t0, c0) = (Instant::now(), mem.read_u32(u64::from(COUNT)).unwrap_or(0));
        let (t1, c1) = mark(vm)?;
        pit(vm, None);
        Ok((t1.duration_since(t0).as_secs_f64(), c1.wrapping_sub(c0)))
    };
    let (probe, _) = interval(&mut vm, None)?;
    let target = if quick { 0.05 } else { 0.25 };
    iters = ((f64::from(iters) * target / probe.max(1e-6)) as u64).clamp(100_000, u64::from(u32::MAX)) as u32;
    // The Vm's own ticker alone: how many of the PIT's ~20 kHz edges become
    // interrupts (it sleeps 2 ms after each kick: see docs/benchmarks.md).
    mem.write_u32(ITERS_PHYS, iters)?;
    let (t, n) = interval(&mut vm, Some(DIVISOR))?;
    rows.push(Row::new("mmu", "timer_irq_ticker_rate", "bt", f64::from(n) / t, "irq/s"));
    // Then a kicker thread (a 50 µs sleep between kicks) next to the PIT
    // at 20 kHz: most kicks find an IRQ0 edge pending, so kicks ≈ interrupts.
    let kicker = Kicker::start(vm.backend.kicker(), KICK_PERIOD);
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..if quick { 5 } else { 11 } {
        mem.write_u32(ITERS_PHYS, iters)?;
        off.push(interval(&mut vm, None)?);
        mem.write_u32(ITERS_PHYS, iters)?;
        kicker.active.store(true, Ordering::Relaxed);
        let r = interval(&mut vm, Some(DIVISOR));
        kicker.active.store(false, Ordering::Relaxed);
        on.push(r?);
    }
    drop(kicker);
    tracing::info!(stats = ?vm.stats(), "timer_irq counters");
    let t_on = median(on.iter().map(|x| x.0).collect());
    let t_off = median(off.iter().map(|x| x.0).collect());
    let n_on = median(on.iter().map(|x| f64::from(x.1)).collect());
    let n_off = median(off.iter().map(|x| f64::from(x.1)).collect());
    if n_on - n_off < 1.0 {
        return Err(BenchError::UnexpectedExit(format!(
            "timer_irq: no PIT interrupt reached the guest ({n_on} with the PIT on)"
        )));
    }
    // Each on-interval against the off-interval just before it (same
    // machine load), then the median.
    let per = median(
        on.iter().zip(&off).filter(|(a, b)| a.1 > b.1).map(|(a, b)| (a.0 - b.0) * 1e6 / f64::from(a.1 - b.1)).collect(),
    );
    tracing::info!(t_on, t_off, n_on, n_off, iters, "timer irq");
    rows.push(Row::new("mmu", "timer_irq", "bt", per, "us"));
    rows.push(Row::new("mmu", "timer_irq_rate", "bt", n_on / t_on, "irq/s"));
    Ok(())
}

const KICK_PERIOD: Duration = Duration::from_micros(50);

/// A thread that kicks the vCPU about every `period` (a sleep: spinning
/// would take the vCPU's core on a loaded 2-core host) while `active`.
struct Kicker {
    active: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Kicker {
    fn start(kick: Kick, period: Duration) -> Kicker {
        let active = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (active.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(period);
                if a.load(Ordering::Relaxed) {
                    kick();
                }
            }
        });
        Kicker { active, stop, thread: Some(thread) }
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs the mmu suite.
pub fn run(quick: bool) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    hidden_fault(quick, &mut rows)?;
    guest_pagefault(quick, &mut rows)?;
    cr3_switch(quick, &mut rows)?;
    timer_irq(quick, &mut rows)?;
    Ok(rows)
}
