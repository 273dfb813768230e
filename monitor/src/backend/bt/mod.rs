//! The `bt` backend: Popek's own CPU. Guest kernel code (virtual CPL 0-2)
//! runs translated from the TC; guest user code (CPL 3, IOPL < 3) runs
//! directly; the shadow MMU keeps the window coherent with the guest's page
//! tables; the virtual CPU ([`crate::cpu`]) gives every sensitive instruction
//! and every exception its architectural meaning.
//!
//! One [`BtBackend::run`] call loops over entries into guest-mode code until
//! something the machine must see happens (I/O, HLT, a kick, a triple
//! fault); callouts, hidden faults and exception delivery are handled here.

pub mod memory;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::callout::CalloutKind;
use engine::vmm_area::{self, vcpu as page};
use engine::{BlockKey, Engine, EngineError};
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};
use shadow_mmu::{EmulateReason, FaultOutcome, MmuConfig, ShadowMmu};

use self::memory::{Code, Linear, Phys, VmmAlias, WindowMapper};
use super::{Backend, BackendError, Kick, VmExit};
use crate::cpu::descriptor::{guest_selector, shadow_index};
use crate::cpu::interrupt::{self, DeliveryError, Event};
use crate::cpu::operand::gpr_write;
use crate::cpu::policy::CpuPolicy;
use crate::cpu::sensitive::{self, Env, ExecError, IoOp, MmuEffect, Outcome};
use crate::cpu::state::flags;
use crate::cpu::{vector, Cpu, Fault, Seg, SegReg};
use crate::devices::clock::VirtualTime;
use crate::host::ldt::{ldt_selector, HostSegment};
use crate::host::{Exit, Segments, SyscallKind, Vcpu, Window};
use crate::memory::GuestMemory;

/// Where, in the exit-gate page, single instructions run natively.
const NATIVE_STEP_OFFSET: u32 = 0x100;
/// Scratch bytes in the vCPU page for redirected memory operands.
const SCRATCH_OFFSET: u32 = 0x800;
const SCRATCH_BYTES: usize = 64;

/// Switches of the bt backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct BtConfig {
    pub engine: engine::Config,
    /// Log every translated block next to its translation (tracing, target
    /// `popek::translations`, level info).
    pub log_translations: bool,
    /// The deterministic mode (record/replay): every guest instruction runs
    /// translated, user code included, and the TC counts retired
    /// instructions; RDTSC reads virtual time.
    pub deterministic: bool,
    /// Shadow MMU: unmap supervisor-only shadows on every entry to CPL 3
    /// (`--engine isolate`; docs/security.md says what it does and costs).
    pub user_isolation: bool,
    /// The CPU the guest sees (CPUID, MSRs): the machine's.
    pub cpu: CpuPolicy,
}

impl BtConfig {
    /// Applies one `--engine` switch: nochain, nopoll, noinline, inline, or
    /// the test-only `corrupt=MNEMONIC` (translations of that instruction
    /// class compute a wrong result; replay must catch it).
    pub fn apply_switch(&mut self, switch: &str) -> Result<(), String> {
        match switch {
            "nochain" => self.engine.chaining = false,
            "nopoll" => self.engine.poll_at_block_entry = false,
            "noinline" => self.engine.inline_flags = false,
            "inline" => self.engine.inline_flags = true,
            "isolate" => self.user_isolation = true,
            s if s.starts_with("corrupt=") => {
                let name = &s["corrupt=".len()..];
                let m = iced_x86::Mnemonic::values()
                    .find(|m| format!("{m:?}").eq_ignore_ascii_case(name))
                    .ok_or_else(|| format!("corrupt={name}: not an x86 mnemonic"))?;
                self.engine.corrupt = Some(m);
            }
            other => {
                return Err(format!(
                    "unknown --engine switch {other:?} (nochain, nopoll, noinline, inline, isolate, corrupt=MNEMONIC)"
                ))
            }
        }
        Ok(())
    }
}

/// The counting state of the deterministic mode (docs/record-replay.md).
#[derive(Clone, Copy, Debug, Default)]
struct Counting {
    /// Guest instructions retired (exact whenever the monitor has control).
    retired: u64,
    /// Stop (`VmExit::Interrupted`) when `retired` reaches this.
    stop_at: Option<u64>,
    /// ... or when guest time reaches this.
    stop_ns: Option<u64>,
    /// The budget as the TC last saw it: what was charged is the difference.
    budget_seen: i32,
    /// Guest time not covered by instructions: idle skips and TSC reads.
    time: VirtualTime,
}

/// Guest nanoseconds one RDTSC takes in the counting mode. Delay loops spin
/// on the TSC; at one nanosecond per instruction they would need a callout
/// per ten nanoseconds of guest time. A real TSC read under a VMM that
/// traps it costs about this much too.
const RDTSC_NS: u64 = 1000;

impl Counting {
    fn now_ns(&self) -> u64 {
        self.time.ns(self.retired)
    }

    /// Instructions the guest may retire before a stop (0: stop now).
    fn left(&self) -> u64 {
        let by_count = self.stop_at.map_or(u64::MAX, |s| s.saturating_sub(self.retired));
        let by_time = self.stop_ns.map_or(u64::MAX, |s| s.saturating_sub(self.now_ns()));
        by_count.min(by_time)
    }
}

/// An I/O instruction waiting for the machine.
#[derive(Clone, Copy, Debug)]
enum PendingIo {
    In { size: u8, next_eip: u32 },
    Ins { insn: Instruction, op: IoOp, next_eip: u32 },
    Outs { insn: Instruction, op: IoOp, next_eip: u32 },
    Out { next_eip: u32 },
}

/// An MMIO read instruction waiting for the device's value.
#[derive(Clone, Copy, Debug)]
struct PendingMmio {
    insn: Instruction,
    gpa: u64,
    size: usize,
    writes: bool,
}

/// Counters with stable names, plus where the time went (in TSC cycles:
/// reading the clock through the vDSO cost a quarter of a callout here).
#[derive(Clone, Debug, Default)]
pub struct BtStats {
    /// Exit counts by name (a short list: a linear scan beats hashing).
    pub exits: Vec<(&'static str, u64)>,
    pub cycles_direct: u64,
    pub cycles_translated: u64,
    pub cycles_total: u64,
    pub ldt_writes: u64,
}

/// Host TSC cycles per microsecond, measured once (20 ms) when first asked.
fn tsc_per_us() -> f64 {
    static RATE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *RATE.get_or_init(|| {
        let (t, c) = (Instant::now(), rdtsc());
        std::thread::sleep(Duration::from_millis(20));
        (rdtsc().wrapping_sub(c)) as f64 / t.elapsed().as_secs_f64() / 1e6
    })
}

fn failed(what: impl std::fmt::Display) -> BackendError {
    BackendError::Failed { backend: "bt", what: what.to_string() }
}

/// Popek's own CPU.
pub struct BtBackend {
    host: Vcpu,
    window: &'static Window,
    mem: Arc<GuestMemory>,
    cpu: Cpu,
    mmu: ShadowMmu,
    engine: Engine,
    policy: CpuPolicy,
    /// Host LDT entries as written, by index.
    ldt: HashMap<u16, HostSegment>,
    pending: Option<PendingIo>,
    want_window: bool,
    /// An MMIO read waiting for its value.
    pending_mmio: Option<PendingMmio>,
    /// Last translated-mode selectors: (guest segments, LDT-write stamp,
    /// host selectors, guest GS shadow).
    tc_segments: Option<([SegReg; 5], u64, Segments, u16)>,
    tc_segments_cpl: u8,
    /// What `run` returns first (the second half of an MMIO access).
    pending_exit: Option<Result<VmExit, BackendError>>,
    /// A kick landed in a committed TC sequence: re-enter the host state
    /// as it is, not at a guest instruction boundary.
    raw_resume: bool,
    /// A kick is waiting for the next block entry (see `step`).
    kick_deferred: bool,
    config: BtConfig,
    stats: BtStats,
    /// Present in the deterministic mode.
    counting: Option<Counting>,
}

impl BtBackend {
    /// A bt CPU over `mem` starting in `cpu`'s state.
    pub fn new(mem: Arc<GuestMemory>, cpu: Cpu, config: BtConfig) -> Result<BtBackend, BackendError> {
        let host = Vcpu::new().map_err(|e| BackendError::Unavailable("the bt execution host", e.to_string()))?;
        let window = host.window();
        window.unmap_all().map_err(failed)?;
        let base = window.vmm_base();
        let ptr = window.vmm_alias_ptr(0);
        let len = window.vmm_size() as usize;
        // SAFETY: the alias mapping is `len` bytes, never unmapped, and this
        // backend (one per process: `Vcpu::new` succeeded) is its only user.
        let alias: &'static mut [u8] = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        let view = engine::VmmAreaView::new(base, Box::new(VmmAlias(alias)));
        let mut engine_config = config.engine;
        if config.deterministic {
            engine_config.count_insns = true;
        }
        let engine = Engine::new(view, engine_config).map_err(failed)?;
        let mmu = ShadowMmu::new(MmuConfig {
            mmap_min_addr: window.min_addr(),
            vmm_base: base,
            user_isolation: config.user_isolation,
            ..MmuConfig::default()
        });
        let mut b = BtBackend {
            host,
            window,
            mem,
            cpu,
            mmu,
            engine,
            policy: config.cpu,
            ldt: HashMap::new(),
            pending: None,
            want_window: false,
            raw_resume: false,
            kick_deferred: false,
            pending_mmio: None,
            tc_segments: None,
            tc_segments_cpl: 0,
            pending_exit: None,
            config,
            stats: BtStats::default(),
            counting: config.deterministic.then(Counting::default),
        };
        b.page_write_u32(page::EXIT_FAR, window.exit_gate());
        b.page_write_u16(page::EXIT_FAR + 4, crate::host::ldt::HOST_CS64);
        let vmm_gs = b.host.vmm_data_selector();
        b.page_write_u16(page::VMM_GS_SEL, vmm_gs);
        b.sync_paging()?;
        Ok(b)
    }

    fn page_ptr(&self, off: u32) -> *mut u8 {
        self.window.vmm_alias_ptr(vmm_area::VCPU_PAGE + off)
    }

    fn page_read_u32(&self, off: u32) -> u32 {
        // SAFETY: in bounds of the alias; the vCPU page is shared with
        // translated code, hence volatile.
        unsafe { self.page_ptr(off).cast::<u32>().read_volatile() }
    }

    fn page_write_u32(&mut self, off: u32, v: u32) {
        // SAFETY: as `page_read_u32`.
        unsafe { self.page_ptr(off).cast::<u32>().write_volatile(v) }
    }

    fn page_write_u16(&mut self, off: u32, v: u16) {
        // SAFETY: as `page_read_u32`.
        unsafe { self.page_ptr(off).cast::<u16>().write_volatile(v) }
    }

    /// Brings the shadow MMU's paging registers in line with the CPU.
    fn sync_paging(&mut self) -> Result<(), BackendError> {
        let mem = self.mem.clone();
        let phys = Phys(&mem);
        let mut mapper = WindowMapper { window: self.window, mem: &mem };
        self.mmu.set_cr4(&phys, &mut mapper, self.cpu.cr4).map_err(failed)?;
        self.mmu.set_cr3(&phys, &mut mapper, self.cpu.cr3).map_err(failed)?;
        self.mmu.set_cr0(&phys, &mut mapper, self.cpu.cr0).map_err(failed)?;
        Ok(())
    }

    /// The virtual CPU (for tests and reports).
    pub fn cpu(&self) -> &Cpu {
        &self.cpu
    }

    pub fn cpu_mut(&mut self) -> &mut Cpu {
        &mut self.cpu
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn mmu(&self) -> &ShadowMmu {
        &self.mmu
    }

    pub fn bt_stats(&self) -> &BtStats {
        &self.stats
    }

    fn count(&mut self, what: &'static str) {
        match self.stats.exits.iter_mut().find(|e| e.0 == what) {
            Some(e) => e.1 += 1,
            None => self.stats.exits.push((what, 1)),
        }
    }

    /// Host selector for a guest segment register, writing its shadow into
    /// the host LDT when it changed.
    fn shadow(&mut self, seg: SegReg, nullable: bool, user: bool) -> Result<u16, BackendError> {
        if seg.selector & !3 == 0 && nullable {
            return Ok(0);
        }
        let index = shadow_index(seg.selector, user)
            .or(if seg.selector & !3 == 0 { Some(0) } else { None })
            .ok_or_else(|| failed(format!("selector {:#x} has no shadow slot", seg.selector)))?;
        let hs = seg
            .cache
            .shadow(if user { None } else { Some(self.window.vmm_base()) })
            .ok_or_else(|| failed(format!("selector {:#x} is not a code/data segment", seg.selector)))?;
        if self.ldt.get(&index) != Some(&hs) {
            self.host.set_ldt_entry(index, hs).map_err(failed)?;
            self.ldt.insert(index, hs);
            self.stats.ldt_writes += 1;
        }
        Ok(ldt_selector(index))
    }

    fn key(&self) -> BlockKey {
        let cs = self.cpu.seg(Seg::Cs).cache;
        let ss32 = if self.cpu.stack32() { engine::key_flags::SS32 } else { 0 };
        BlockKey { eip: self.cpu.eip, cs_base: cs.base, cs32: cs.db, cpl: self.cpu.cpl, flags: ss32 }
    }

    fn load_host_regs(&mut self, eip: u32) {
        let c = &self.cpu;
        let g = c.gpr;
        self.host.set_regs(&crate::host::Regs {
            eax: g[0],
            ecx: g[1],
            edx: g[2],
            ebx: g[3],
            esp: g[4],
            ebp: g[5],
            esi: g[6],
            edi: g[7],
            eip,
            eflags: c.eflags & flags::LIVE,
        });
    }

    fn save_host_regs(&mut self) -> u32 {
        let r = self.host.regs();
        self.cpu.gpr = [r.eax, r.ecx, r.edx, r.ebx, r.esp, r.ebp, r.esi, r.edi];
        self.cpu.eflags = (self.cpu.eflags & !flags::LIVE) | (r.eflags & flags::LIVE) | 2;
        r.eip
    }

    fn run_host(&mut self, translated: bool) -> Result<Exit, BackendError> {
        let t = rdtsc();
        let exit = self.host.run().map_err(|e| match e {
            crate::host::HostError::GuestEscape(escape) => BackendError::GuestEscape(escape),
            e => failed(e),
        });
        let dt = rdtsc().wrapping_sub(t);
        if translated {
            self.stats.cycles_translated += dt;
        } else {
            self.stats.cycles_direct += dt;
        }
        exit
    }

    /// Delivers an exception or interrupt through the guest's IDT.
    fn raise(&mut self, event: Event) -> Result<Option<VmExit>, BackendError> {
        let mem = self.mem.clone();
        let mut lin = Linear { mmu: &mut self.mmu, mem: &mem };
        match interrupt::deliver(&mut self.cpu, &mut lin, event) {
            Ok(()) => Ok(None),
            Err(DeliveryError::TripleFault { first, second }) => {
                tracing::warn!(first, second, "guest triple fault");
                Ok(Some(VmExit::TripleFault))
            }
            Err(DeliveryError::Unsupported(what)) => {
                Err(BackendError::Unsupported { backend: "bt", what: what.to_string() })
            }
        }
    }

    fn fault(&mut self, f: Fault) -> Result<Option<VmExit>, BackendError> {
        self.raise(Event::Exception(f))
    }

    /// One entry into guest-mode code and the handling of its exit.
    fn step(&mut self) -> Result<Option<VmExit>, BackendError> {
        let r = self.step_once();
        // A kick deferred to the next block entry must reach the machine
        // even when another exit (a callout, a fault) comes first: the
        // entry clears the poll flag, and the ticker sends one kick per
        // deadline.
        if self.kick_deferred && !self.raw_resume {
            self.kick_deferred = false;
            if let Ok(None) = r {
                return Ok(Some(VmExit::Interrupted));
            }
        }
        r
    }

    fn step_once(&mut self) -> Result<Option<VmExit>, BackendError> {
        if self.raw_resume {
            self.raw_resume = false;
            let exit = self.run_host(true)?;
            let host_eip = self.save_host_regs();
            self.sync_virtual_flags();
            self.settle_budget();
            return self.handle_translated_exit(exit, host_eip);
        }
        let c = &self.cpu;
        let direct =
            self.counting.is_none() && c.cpl == 3 && c.iopl() < 3 && c.protected_mode() && c.eflags & flags::VM == 0;
        self.cpu.interrupt_shadow = false;
        if direct {
            self.step_direct()
        } else {
            self.step_translated()
        }
    }

    fn step_direct(&mut self) -> Result<Option<VmExit>, BackendError> {
        let segs = Segments {
            cs: self.shadow(*self.cpu.seg(Seg::Cs), false, true)?,
            ss: self.shadow(*self.cpu.seg(Seg::Ss), false, true)?,
            ds: self.shadow(*self.cpu.seg(Seg::Ds), true, true)?,
            es: self.shadow(*self.cpu.seg(Seg::Es), true, true)?,
            fs: self.shadow(*self.cpu.seg(Seg::Fs), true, true)?,
            gs: self.shadow(*self.cpu.seg(Seg::Gs), true, true)?,
        };
        self.host.set_segments(segs).map_err(failed)?;
        self.load_host_regs(self.cpu.eip);
        let exit = self.run_host(false)?;
        self.cpu.eip = self.save_host_regs();
        let raw = self.sync_user_selectors(segs);
        if raw
            && matches!(
                exit,
                Exit::PageFault { .. }
                    | Exit::GeneralProtection { .. }
                    | Exit::StackFault { .. }
                    | Exit::SegmentNotPresent { .. }
            )
        {
            self.count("raw_selector_retry");
            return Ok(None);
        }
        self.handle_direct_exit(exit)
    }

    /// Guest user code may load selectors itself: map what the host holds
    /// now back to guest selectors. A raw guest GDT selector that loaded on
    /// the host (0x33, 0x2b, 0x7b are host GDT entries too) names a host
    /// segment, not the guest's: the virtual CPU loads the guest's
    /// descriptor and the next entry uses its shadow. Returns whether that
    /// happened (a fault then was probably the raw selector's, and the
    /// instruction is retried).
    fn sync_user_selectors(&mut self, loaded: Segments) -> bool {
        let now = self.host.segments();
        let mut raw = false;
        for (s, was, is) in [
            (Seg::Ds, loaded.ds, now.ds),
            (Seg::Es, loaded.es, now.es),
            (Seg::Fs, loaded.fs, now.fs),
            (Seg::Gs, loaded.gs, now.gs),
        ] {
            if was != is {
                let guest = guest_selector(is, 3).unwrap_or(is);
                raw |= is & 4 == 0 && is & !3 != 0;
                let mem = self.mem.clone();
                let mut lin = Linear { mmu: &mut self.mmu, mem: &mem };
                if interrupt::load_segment(&mut self.cpu, &mut lin, s, guest).is_err() {
                    tracing::debug!(selector = guest, "user code loaded a selector the guest GDT does not back");
                }
            }
        }
        raw
    }

    fn handle_direct_exit(&mut self, exit: Exit) -> Result<Option<VmExit>, BackendError> {
        match exit {
            Exit::PageFault { address, error_code } => {
                self.count("user_page_fault");
                let access =
                    shadow_mmu::Access { write: error_code & 2 != 0, user: true, fetch: error_code & 0x10 != 0 };
                self.hidden_fault(address, access, false)
            }
            Exit::GeneralProtection { error_code, insn, len } => {
                self.count("user_gp");
                let d =
                    Decoder::with_ip(32, &insn[..len as usize], u64::from(self.cpu.eip), DecoderOptions::NONE).decode();
                if d.is_invalid() {
                    return self.fault(Fault::gp(error_code));
                }
                if d.mnemonic() == Mnemonic::Int {
                    self.cpu.eip = d.next_ip32();
                    return self.raise(Event::Software(d.immediate8()));
                }
                if engine::classify::classify(&d).is_ident() {
                    self.fault(Fault::gp(error_code))
                } else {
                    self.emulate(&d, d.next_ip32())
                }
            }
            Exit::SystemCall { kind, eip_known, .. } => {
                self.count("user_syscall");
                if !eip_known {
                    return Err(failed(format!("guest user code made a {kind:?} fast system call whose return address the host kernel discards (hidden from the guest's CPUID)")));
                }
                match kind {
                    SyscallKind::Int80 => self.raise(Event::Software(0x80)),
                    _ => {
                        // SYSENTER: guest CPUID hides it; a 686 without SEP gives #UD.
                        self.cpu.eip = self.cpu.eip.wrapping_sub(2);
                        self.fault(Fault::ud())
                    }
                }
            }
            Exit::Kick => {
                self.count("kick");
                Ok(Some(VmExit::Interrupted))
            }
            Exit::Callout => Err(failed("guest user code jumped into the exit gate")),
            other => {
                self.count("user_exception");
                let ev = exception_of(other);
                self.raise(ev)
            }
        }
    }

    /// A host fault at `address` in the window: resolve it or give the guest
    /// its page fault.
    fn hidden_fault(
        &mut self,
        address: u32,
        access: shadow_mmu::Access,
        from_tc: bool,
    ) -> Result<Option<VmExit>, BackendError> {
        let mem = self.mem.clone();
        let mut phys = Phys(&mem);
        let mut mapper = WindowMapper { window: self.window, mem: &mem };
        let out = self.mmu.handle_fault(&mut phys, &mut mapper, address, access, self.cpu.cpl).map_err(failed)?;
        match out {
            FaultOutcome::Resolved => Ok(None),
            FaultOutcome::GuestPageFault { cr2, error_code } => self.fault(Fault::page(cr2, error_code)),
            FaultOutcome::Emulate { gpa, reason: EmulateReason::CodeWrite } => {
                self.count("code_write");
                self.engine.invalidate_phys_page(gpa & !0xFFF);
                self.mmu.unprotect_code_page(&mut mapper, gpa & !0xFFF).map_err(failed)?;
                if from_tc {
                    // Retranslating would protect the page again before the
                    // write could happen (the writer may be on it): step over it.
                    return self.step_native();
                }
                Ok(None)
            }
            FaultOutcome::Emulate { gpa, reason } => {
                self.count("emulate");
                self.emulate_memory_access(gpa, reason)
            }
        }
    }

    /// An access the window cannot serve (page below `mmap_min_addr`, a
    /// CR0.WP=0 supervisor write to a read-only page, MMIO): perform the
    /// instruction on the virtual CPU's view of memory.
    fn emulate_memory_access(&mut self, gpa: u64, reason: EmulateReason) -> Result<Option<VmExit>, BackendError> {
        match reason {
            EmulateReason::LowPage | EmulateReason::SupervisorWriteWp0 | EmulateReason::VmmArea => {
                self.emulate_by_reexecution()
            }
            EmulateReason::Mmio => self.emulate_mmio(gpa),
            _ => {
                let insn = self.fetch_insn().map(|i| i.to_string()).unwrap_or_else(|_| "?".into());
                Err(BackendError::Unsupported {
                    backend: "bt",
                    what: format!("emulating a memory access ({reason:?} at guest-physical {gpa:#x}) by `{insn}`"),
                })
            }
        }
    }

    fn step_translated(&mut self) -> Result<Option<VmExit>, BackendError> {
        let key = self.key();
        let mem = self.mem.clone();
        let mut budget = None;
        if let Some(c) = &self.counting {
            // Stops by count (checkpoints, input points) and by guest time
            // (timer deadlines) alike.
            let left = c.left();
            if left == 0 {
                return Ok(Some(VmExit::Interrupted));
            }
            budget = Some(left.min(vmm_area::BUDGET_MAX as u64) as i32);
        }
        // The block would overrun the stop: translate a shorter one (once the
        // full block's entry check has said so, see `callout`).
        let cap =
            budget.map(|b| b as u64).filter(|&l| self.engine.block(&key).is_some_and(|b| b.insns.len() as u64 > l));
        let tc = {
            let mut code = Code { mmu: &mut self.mmu, mem: &mem, user: key.cpl == 3 };
            let r = match cap {
                Some(cap) => self.engine.translate_capped(key, cap as usize, &mut code),
                None => self.engine.enter(key, &mut code),
            };
            match r {
                Ok(tc) => tc,
                Err(EngineError::Fetch(f)) => return self.fetch_fault(f.linear),
                Err(e) => return Err(failed(e)),
            }
        };
        if let (Some(b), Some(c)) = (budget, self.counting.as_mut()) {
            c.budget_seen = b;
            self.page_write_u32(page::BUDGET, b as u32);
        }
        self.after_translation(&key);
        let (segs, guest_gs) = self.translated_segments()?;
        self.page_write_u16(page::GUEST_GS_SEL, guest_gs);
        for (i, sreg) in Seg::ALL.iter().enumerate() {
            let sel = u32::from(self.cpu.seg(*sreg).selector);
            self.page_write_u32(page::GUEST_SEL + 4 * i as u32, sel);
        }
        self.page_write_u32(page::VIF, self.cpu.eflags & flags::IF);
        self.page_write_u32(page::VIOPL, self.cpu.eflags & flags::IOPL);
        self.page_write_u32(page::IRQ_PENDING, u32::from(self.want_window));
        self.page_write_u32(page::POLL, 0);
        if self.host.segments() != segs {
            self.host.set_segments(segs).map_err(failed)?;
        }
        self.load_host_regs(tc);
        let exit = self.run_host(true)?;
        let host_eip = self.save_host_regs();
        self.sync_virtual_flags();
        self.settle_budget();
        self.handle_translated_exit(exit, host_eip)
    }

    /// Counting mode: adds what the TC charged since the last look.
    fn settle_budget(&mut self) {
        let now = self.page_read_u32(page::BUDGET) as i32;
        if let Some(c) = self.counting.as_mut() {
            c.retired = c.retired.wrapping_add((i64::from(c.budget_seen) - i64::from(now)) as u64);
            c.budget_seen = now;
        }
    }

    /// Counting mode: the TC left a block after `done` of its `charged`
    /// instructions (entries charge the whole block up front).
    fn refund(&mut self, charged: u32, done: u32) {
        if let Some(c) = self.counting.as_mut() {
            c.retired -= u64::from(charged.saturating_sub(done));
        }
    }

    /// Counting mode: the monitor completed one guest instruction.
    fn retire(&mut self) {
        if let Some(c) = self.counting.as_mut() {
            c.retired += 1;
        }
    }

    /// The guest's TSC: the host's, or virtual time in the counting mode.
    fn guest_tsc_base(&self) -> u64 {
        match &self.counting {
            Some(c) => c.time.tsc(c.retired),
            None => rdtsc(),
        }
    }

    /// Host selectors for translated code (and the guest GS shadow for
    /// GS-prefix rewrites). Callouts come back here constantly with the
    /// same guest segments: the result is cached until a segment or the
    /// host LDT changes.
    fn translated_segments(&mut self) -> Result<(Segments, u16), BackendError> {
        let regs = [Seg::Ss, Seg::Ds, Seg::Es, Seg::Fs, Seg::Gs].map(|s| *self.cpu.seg(s));
        if let Some((cached, stamp, segs, gs)) = &self.tc_segments {
            if *cached == regs && *stamp == self.stats.ldt_writes && self.tc_segments_cpl == self.cpu.cpl {
                return Ok((*segs, *gs));
            }
        }
        // Translated user code (counting mode) keeps the guest's limits, as
        // direct user code does: glibc's TLS accesses wrap around 4 GiB.
        let user = self.cpu.cpl == 3;
        let segs = Segments {
            cs: self.host.vmm_code_selector(),
            ss: self.shadow(regs[0], false, user)?,
            ds: self.shadow(regs[1], true, user)?,
            es: self.shadow(regs[2], true, user)?,
            fs: self.shadow(regs[3], true, user)?,
            gs: self.host.vmm_data_selector(),
        };
        let guest_gs = self.shadow(regs[4], true, user)?;
        self.tc_segments = Some((regs, self.stats.ldt_writes, segs, guest_gs));
        self.tc_segments_cpl = self.cpu.cpl;
        Ok((segs, guest_gs))
    }

    /// Virtual IF and IOPL as translated code left them in the vCPU page.
    fn sync_virtual_flags(&mut self) {
        let vif = self.page_read_u32(page::VIF) & flags::IF;
        let viopl = self.page_read_u32(page::VIOPL) & flags::IOPL;
        self.cpu.eflags = (self.cpu.eflags & !(flags::IF | flags::IOPL)) | vif | viopl;
    }

    /// Fetches and decodes the guest instruction at CS:EIP (32-bit code).
    /// `Err(Ok(exit))` when the fetch itself faulted (the fault is delivered).
    fn fetch_insn(&mut self) -> Result<Instruction, Result<Option<VmExit>, BackendError>> {
        let key = self.key();
        if !key.cs32 {
            return Err(Err(BackendError::Unsupported { backend: "bt", what: "re-executing 16-bit code".into() }));
        }
        let mem = self.mem.clone();
        let mut bytes = [0u8; 15];
        let lin = key.linear();
        let first = (4096 - (lin & 0xFFF) as usize).min(15);
        let fetched = {
            let mut code = Code { mmu: &mut self.mmu, mem: &mem, user: key.cpl == 3 };
            use engine::GuestCode;
            let ok = code.fetch(lin, &mut bytes[..first]).is_ok();
            if ok && first < 15 && code.fetch(lin.wrapping_add(first as u32), &mut bytes[first..]).is_err() {
                bytes[first..].fill(0);
            }
            ok
        };
        if !fetched {
            return Err(self.fetch_fault(lin));
        }
        Ok(Decoder::with_ip(32, &bytes, u64::from(self.cpu.eip), DecoderOptions::NONE).decode())
    }

    /// Runs `bytes` (one instruction, 32-bit) natively in the exit-gate page
    /// with the guest's registers, flags and data segments, GS being the VMM
    /// segment unless `guest_gs`. Returns the exit and whether the
    /// instruction completed.
    fn run_snippet(&mut self, bytes: &[u8], guest_gs: bool) -> Result<(Exit, bool), BackendError> {
        let len = bytes.len();
        let snippet = self.window.exit_gate() + NATIVE_STEP_OFFSET;
        let off = (vmm_area::EXIT_GATE + NATIVE_STEP_OFFSET) as usize;
        // SAFETY: the alias covers the VMM area; the snippet bytes lie in the
        // exit-gate page past the gate and the bare-call trampoline, and no
        // guest-mode code runs while they are written.
        let alias =
            unsafe { std::slice::from_raw_parts_mut(self.window.vmm_alias_ptr(0), self.window.vmm_size() as usize) };
        alias[off..off + len].copy_from_slice(bytes);
        alias[off + len..off + len + 2].copy_from_slice(&[0x0F, 0x0B]);
        let gs =
            if guest_gs { self.shadow(*self.cpu.seg(Seg::Gs), true, false)? } else { self.host.vmm_data_selector() };
        let segs = Segments {
            cs: self.host.vmm_code_selector(),
            ss: self.shadow(*self.cpu.seg(Seg::Ss), false, false)?,
            ds: self.shadow(*self.cpu.seg(Seg::Ds), true, false)?,
            es: self.shadow(*self.cpu.seg(Seg::Es), true, false)?,
            fs: self.shadow(*self.cpu.seg(Seg::Fs), true, false)?,
            gs,
        };
        self.host.set_segments(segs).map_err(failed)?;
        self.load_host_regs(snippet);
        let exit = self.run_host(true)?;
        let host_eip = self.save_host_regs();
        Ok((exit, host_eip == snippet + len as u32))
    }

    /// What to do after a snippet ran the instruction at EIP.
    fn after_snippet(&mut self, exit: Exit, done: bool, next_eip: u32) -> Result<Option<VmExit>, BackendError> {
        match exit {
            Exit::InvalidOpcode if done => {
                self.cpu.eip = next_eip;
                self.retire();
                Ok(None)
            }
            Exit::Kick if done => {
                self.cpu.eip = next_eip;
                self.retire();
                Ok(Some(VmExit::Interrupted))
            }
            Exit::Kick => Ok(Some(VmExit::Interrupted)),
            Exit::PageFault { address, error_code } => {
                let access = shadow_mmu::Access { write: error_code & 2 != 0, user: self.cpu.cpl == 3, fetch: false };
                self.hidden_fault(address, access, false)
            }
            other => self.raise(exception_of(other)),
        }
    }

    /// Runs the one guest instruction at EIP natively, outside any
    /// translation: the way forward after a write to a code page whose
    /// translations were just dropped (the writing instruction may sit on
    /// that very page).
    fn step_native(&mut self) -> Result<Option<VmExit>, BackendError> {
        let insn = match self.fetch_insn() {
            Ok(i) => i,
            Err(r) => return r,
        };
        if insn.is_invalid() || !engine::classify::classify(&insn).is_ident() {
            return Err(BackendError::Unsupported {
                backend: "bt",
                what: format!("a write to a code page by `{insn}`, which cannot run outside translation"),
            });
        }
        let lin = self.key().linear();
        let mut bytes = vec![0u8; insn.len()];
        let mem = self.mem.clone();
        {
            let mut code = Code { mmu: &mut self.mmu, mem: &mem, user: self.cpu.cpl == 3 };
            use engine::GuestCode;
            let first = (4096 - (lin & 0xFFF) as usize).min(bytes.len());
            let _ = code.fetch(lin, &mut bytes[..first]);
            if first < bytes.len() {
                let _ = code.fetch(lin.wrapping_add(first as u32), &mut bytes[first..]);
            }
        }
        self.count("native_step");
        let (exit, done) = self.run_snippet(&bytes, insn.segment_prefix() == iced_x86::Register::GS)?;
        self.after_snippet(exit, done, insn.next_ip32())
    }

    /// Runs `insn` natively with its memory operand redirected to the
    /// vCPU page's scratch slot holding `data`; `data` gets the slot back.
    fn redirect_and_run(&mut self, insn: &Instruction, data: &mut [u8]) -> Result<(Exit, bool), BackendError> {
        let size = data.len();
        // SAFETY: the scratch slot lies inside the vCPU page of the alias
        // (size checked by the callers against SCRATCH_BYTES).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.page_ptr(SCRATCH_OFFSET), size) };
        let mut redirected = *insn;
        redirected.set_memory_base(iced_x86::Register::None);
        redirected.set_memory_index(iced_x86::Register::None);
        redirected.set_memory_index_scale(1);
        redirected.set_memory_displacement32(vmm_area::VCPU_PAGE + SCRATCH_OFFSET);
        redirected.set_memory_displ_size(4);
        redirected.set_segment_prefix(iced_x86::Register::GS);
        let snippet_ip = u64::from(self.window.exit_gate() + NATIVE_STEP_OFFSET);
        let mut enc = iced_x86::Encoder::new(32);
        enc.encode(&redirected, snippet_ip)
            .map_err(|e| BackendError::Unsupported { backend: "bt", what: format!("re-encoding `{insn}`: {e}") })?;
        let bytes = enc.take_buffer();
        let r = self.run_snippet(&bytes, false)?;
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(self.page_ptr(SCRATCH_OFFSET), data.as_mut_ptr(), size) };
        Ok(r)
    }

    /// The explicit memory operand of `insn` and how it is used:
    /// `(size, reads, writes)`, or why it cannot be redirected.
    fn memory_operand(insn: &Instruction) -> Result<(usize, bool, bool), String> {
        if !(0..insn.op_count()).any(|i| insn.op_kind(i) == iced_x86::OpKind::Memory) {
            return Err(format!("`{insn}` has no explicit memory operand"));
        }
        if insn.is_string_instruction()
            || insn.stack_pointer_increment() != 0
            || insn.memory_index().is_vector_register()
        {
            return Err(format!("`{insn}` has implicit or vector memory operands"));
        }
        let size = insn.memory_size().size();
        if size == 0 || size > SCRATCH_BYTES {
            return Err(format!("`{insn}` has a {size}-byte memory operand"));
        }
        let mut factory = iced_x86::InstructionInfoFactory::new();
        let used = factory.info(insn).used_memory();
        use iced_x86::OpAccess as A;
        let writes =
            used.iter().any(|m| matches!(m.access(), A::Write | A::ReadWrite | A::CondWrite | A::ReadCondWrite));
        let reads = used.iter().any(|m| matches!(m.access(), A::Read | A::ReadWrite | A::CondRead | A::ReadCondWrite));
        Ok((size, reads, writes))
    }

    /// MMIO (or a hole): the access goes to the machine's MMIO bus. A read
    /// first asks the machine for the value ([`VmExit::MmioRead`]), then the
    /// instruction runs on it; a write reports the value the instruction
    /// produced ([`VmExit::MmioWrite`]).
    fn emulate_mmio(&mut self, gpa: u64) -> Result<Option<VmExit>, BackendError> {
        let insn = match self.fetch_insn() {
            Ok(i) => i,
            Err(r) => return r,
        };
        let (size, reads, writes) = Self::memory_operand(&insn)
            .map_err(|what| BackendError::Unsupported { backend: "bt", what: format!("MMIO emulation: {what}") })?;
        if size > 8 {
            return Err(BackendError::Unsupported { backend: "bt", what: format!("MMIO emulation of `{insn}`") });
        }
        self.count("mmio");
        if reads {
            self.pending_mmio = Some(PendingMmio { insn, gpa, size, writes });
            return Ok(Some(VmExit::MmioRead { addr: gpa, size: size as u8 }));
        }
        self.mmio_execute(insn, gpa, size, writes, 0)
    }

    fn mmio_execute(
        &mut self,
        insn: Instruction,
        gpa: u64,
        size: usize,
        writes: bool,
        value: u64,
    ) -> Result<Option<VmExit>, BackendError> {
        let mut data = value.to_le_bytes()[..size].to_vec();
        let (exit, done) = self.redirect_and_run(&insn, &mut data)?;
        if done && matches!(exit, Exit::InvalidOpcode | Exit::Kick) {
            self.cpu.eip = insn.next_ip32();
            self.retire();
            if writes {
                let mut b = [0u8; 8];
                b[..size].copy_from_slice(&data);
                return Ok(Some(VmExit::MmioWrite { addr: gpa, size: size as u8, value: u64::from_le_bytes(b) }));
            }
            return Ok(None);
        }
        self.after_snippet(exit, done, insn.next_ip32())
    }

    /// Emulation by re-execution: the instruction at EIP touches guest
    /// memory the window cannot map where the guest sees it (a page below
    /// the host's `mmap_min_addr`, the VMM area's range, a CR0.WP=0
    /// supervisor write to a read-only page). Its memory operand is
    /// redirected to a scratch slot of the vCPU page (through GS), the guest
    /// bytes copied in, the instruction run natively (the hardware computes
    /// the result and the flags), and the bytes copied back.
    fn emulate_by_reexecution(&mut self) -> Result<Option<VmExit>, BackendError> {
        let insn = match self.fetch_insn() {
            Ok(i) => i,
            Err(r) => return r,
        };
        let (size, reads, writes) = match Self::memory_operand(&insn) {
            Ok(x) => x,
            Err(what) => return Err(BackendError::Unsupported { backend: "bt", what: format!("emulation: {what}") }),
        };
        let lin = match crate::cpu::operand::memory_linear(&self.cpu, &insn, size as u32, writes && !reads) {
            Ok(l) => l,
            Err(f) => return self.fault(f),
        };
        let mem = self.mem.clone();
        let mut data = vec![0u8; size];
        if reads || writes {
            let cpu = self.cpu.clone();
            let mut lin_mem = Linear { mmu: &mut self.mmu, mem: &mem };
            let acc = crate::cpu::Access::at_cpl(cpu.cpl);
            if let Err(f) = crate::cpu::LinearMemory::read(&mut lin_mem, &cpu, lin, &mut data, acc) {
                return self.fault(f);
            }
        }
        self.count("reexecuted");
        let (exit, done) = self.redirect_and_run(&insn, &mut data)?;
        if done && writes {
            let cpu = self.cpu.clone();
            let mut lin_mem = Linear { mmu: &mut self.mmu, mem: &mem };
            let acc = crate::cpu::Access::at_cpl(cpu.cpl);
            if let Err(f) = crate::cpu::LinearMemory::write(&mut lin_mem, &cpu, lin, &data, acc) {
                return self.fault(f);
            }
        }
        if !matches!(exit, Exit::InvalidOpcode | Exit::Kick) {
            // A fault of the instruction itself (e.g. #DE): report it at EIP.
            return self.raise(exception_of(exit));
        }
        self.after_snippet(exit, done, insn.next_ip32())
    }

    /// Write-protects newly translated code pages and logs the block.
    fn after_translation(&mut self, key: &BlockKey) {
        let pages = self.engine.take_new_code_pages();
        if !pages.is_empty() {
            let mem = self.mem.clone();
            let mut mapper = WindowMapper { window: self.window, mem: &mem };
            for p in pages {
                if let Err(e) = self.mmu.protect_code_page(&mut mapper, p) {
                    tracing::warn!(%e, page = p, "cannot write-protect a code page");
                }
            }
        }
        if self.config.log_translations {
            if let Some(text) = self.engine.disassemble_block(key) {
                tracing::info!(target: "popek::translations", "\n{text}");
            }
        }
    }

    fn fetch_fault(&mut self, linear: u32) -> Result<Option<VmExit>, BackendError> {
        let mem = self.mem.clone();
        let access = shadow_mmu::Access { write: false, user: self.cpu.cpl == 3, fetch: true };
        match self.mmu.translate(&mut Phys(&mem), linear, access) {
            Err(pf) => self.fault(Fault::page(pf.cr2, pf.error_code)),
            Ok(t) => Err(BackendError::Unsupported {
                backend: "bt",
                what: format!("executing code outside guest RAM (linear {linear:#x}, physical {:#x})", t.gpa),
            }),
        }
    }

    /// Puts the guest state back to the start of the guest instruction the
    /// TC was executing at `host_eip`.
    fn recover(&mut self, host_eip: u32) -> Result<bool, BackendError> {
        let rec = self
            .engine
            .recover(host_eip)
            .ok_or_else(|| failed(format!("no translation covers TC address {host_eip:#x}")))?;
        for (reg, slot) in &rec.restore {
            let v = self.page_read_u32(page::scratch(*slot));
            gpr_write(&mut self.cpu, *reg, v);
        }
        self.cpu.eip = if rec.eip_is_callout_target { self.page_read_u32(page::CALLOUT_TARGET) } else { rec.guest_eip };
        Ok(rec.exact)
    }

    fn handle_translated_exit(&mut self, exit: Exit, host_eip: u32) -> Result<Option<VmExit>, BackendError> {
        if exit == Exit::Callout {
            return self.callout();
        }
        let deferred = exit == Exit::Kick && self.config.engine.poll_at_block_entry;
        if self.counting.is_some() && !deferred {
            // A fault or stop inside a block: what it did not retire is refunded.
            if let Some((n, done)) =
                self.engine.block_at(host_eip).map(|b| (b.insns.len() as u32, b.retired_at(host_eip)))
            {
                self.refund(n, done);
            }
        }
        if exit == Exit::Kick && self.config.engine.poll_at_block_entry && self.engine.block_at(host_eip).is_some() {
            // Asynchronous stops happen at the translator's own safe points:
            // raise the poll flag and let the TC run on to the next block
            // entry, where it exits with a Poll callout in a clean state
            // (VMware delivered interrupts the same way). Recovery maps stay
            // for synchronous faults, which happen at the faulting
            // instruction.
            self.count("kick_deferred");
            self.page_write_u32(page::POLL, 1);
            self.raw_resume = true;
            self.kick_deferred = true;
            return Ok(None);
        }
        if !self.recover(host_eip)? {
            // Inside the committed tail of a rewritten sequence (nothing there
            // can fault): a kick landed between guest instruction boundaries.
            // Resume the host state as it is; the next exit is a clean one.
            if exit == Exit::Kick {
                self.raw_resume = true;
                return Ok(None);
            }
            return Err(failed(format!("{exit:?} inside a committed TC sequence at {host_eip:#x}")));
        }
        match exit {
            Exit::Kick => {
                self.count("kick");
                Ok(Some(VmExit::Interrupted))
            }
            Exit::PageFault { address, error_code } => {
                self.count("kernel_page_fault");
                let access = shadow_mmu::Access { write: error_code & 2 != 0, user: self.cpu.cpl == 3, fetch: false };
                self.hidden_fault(address, access, true)
            }
            Exit::GeneralProtection { error_code, .. } => {
                self.count("kernel_gp");
                self.fault(Fault::gp(error_code))
            }
            other => {
                self.count("kernel_exception");
                self.raise(exception_of(other))
            }
        }
    }

    fn callout(&mut self) -> Result<Option<VmExit>, BackendError> {
        let id = self.page_read_u32(page::CALLOUT_ID);
        let site = self.engine.callout_site(id).cloned().ok_or_else(|| failed(format!("unknown callout site {id}")))?;
        self.engine.note_callout(id);
        self.refund(site.block_insns, site.insns_before);
        self.count("callout");
        match site.kind {
            CalloutKind::BlockExit => {
                self.cpu.eip = site.next_eip;
                let key = self.key();
                let mem = self.mem.clone();
                let mut code = Code { mmu: &mut self.mmu, mem: &mem, user: key.cpl == 3 };
                match self.engine.translate(key, &mut code) {
                    Ok(_) => {
                        self.after_translation(&key);
                        let _ = self.engine.chain(id);
                        Ok(None)
                    }
                    Err(EngineError::Fetch(f)) => self.fetch_fault(f.linear),
                    Err(e) => Err(failed(e)),
                }
            }
            CalloutKind::IndirectMiss => {
                self.cpu.eip = self.page_read_u32(page::CALLOUT_TARGET);
                let key = self.key();
                let mem = self.mem.clone();
                let mut code = Code { mmu: &mut self.mmu, mem: &mem, user: key.cpl == 3 };
                match self.engine.translate(key, &mut code) {
                    Ok(_) => {
                        self.after_translation(&key);
                        let _ = self.engine.install_indirect(&key);
                        Ok(None)
                    }
                    Err(EngineError::Fetch(f)) => self.fetch_fault(f.linear),
                    Err(e) => Err(failed(e)),
                }
            }
            CalloutKind::Poll => {
                self.cpu.eip = site.guest_eip;
                let budget_only = site.insns_before == 0 && self.page_read_u32(page::POLL) == 0;
                if budget_only && self.counting.is_some_and(|c| c.left() > 0) {
                    // The block would overrun the stop: the next step runs a
                    // shorter translation up to it.
                    return Ok(None);
                }
                Ok(Some(VmExit::Interrupted))
            }
            CalloutKind::GeneralProtection => {
                self.cpu.eip = site.guest_eip;
                self.fault(Fault::gp(0))
            }
            CalloutKind::Sensitive(_) | CalloutKind::ControlFlow(_) => {
                self.cpu.eip = site.guest_eip;
                self.emulate(&site.instruction, site.next_eip)
            }
        }
    }

    /// Performs a sensitive instruction on the virtual CPU.
    fn emulate(&mut self, insn: &Instruction, next_eip: u32) -> Result<Option<VmExit>, BackendError> {
        tracing::trace!(eip = format_args!("{:#x}", self.cpu.eip), next = format_args!("{next_eip:#x}"), %insn, "sensitive");
        let mem = self.mem.clone();
        let policy = self.policy;
        let host_tsc = self.guest_tsc_base();
        let result = {
            let mut lin = Linear { mmu: &mut self.mmu, mem: &mem };
            let mut env = Env { mem: &mut lin, policy: &policy, host_tsc };
            sensitive::execute(&mut self.cpu, &mut env, insn)
        };
        if matches!(
            result,
            Ok(Outcome::Next
                | Outcome::SegmentLoaded(_)
                | Outcome::Jumped
                | Outcome::Mmu(_)
                | Outcome::Halt
                | Outcome::Interrupt(_))
        ) {
            self.retire();
            if matches!(insn.mnemonic(), Mnemonic::Rdtsc | Mnemonic::Rdtscp) {
                if let Some(c) = self.counting.as_mut() {
                    c.time.idle_ns += RDTSC_NS;
                }
            }
        }
        match result {
            Ok(Outcome::Next) | Ok(Outcome::SegmentLoaded(_)) => {
                self.cpu.eip = next_eip;
                Ok(None)
            }
            Ok(Outcome::Jumped) => Ok(None),
            Ok(Outcome::Mmu(effect)) => {
                self.cpu.eip = next_eip;
                self.mmu_effect(effect)?;
                Ok(None)
            }
            Ok(Outcome::Io(op)) => self.start_io(insn, op, next_eip),
            Ok(Outcome::Halt) => {
                self.cpu.eip = next_eip;
                self.cpu.halted = true;
                Ok(Some(VmExit::Halt))
            }
            Ok(Outcome::Interrupt(v)) => {
                self.cpu.eip = next_eip;
                self.raise(Event::Software(v))
            }
            Err(ExecError::Fault(f)) => self.fault(f),
            Err(ExecError::Unsupported(_)) if matches!(insn.mnemonic(), Mnemonic::INVALID) => self.fault(Fault::ud()),
            Err(ExecError::Unsupported(what)) => {
                tracing::debug!(%insn, what, "unsupported sensitive instruction: #UD");
                self.fault(Fault::ud())
            }
            Err(ExecError::Delivery(DeliveryError::TripleFault { .. })) => Ok(Some(VmExit::TripleFault)),
            Err(ExecError::Delivery(DeliveryError::Unsupported(what))) => {
                Err(BackendError::Unsupported { backend: "bt", what: what.to_string() })
            }
        }
    }

    fn mmu_effect(&mut self, effect: MmuEffect) -> Result<(), BackendError> {
        let mem = self.mem.clone();
        let phys = Phys(&mem);
        let mut mapper = WindowMapper { window: self.window, mem: &mem };
        match effect {
            MmuEffect::Cr3 { new } => {
                self.mmu.set_cr3(&phys, &mut mapper, new).map_err(failed)?;
                self.revalidate_user();
                Ok(())
            }
            MmuEffect::Invlpg(lin) => {
                self.mmu.invlpg(&mut mapper, lin).map_err(failed)?;
                self.revalidate_user();
                Ok(())
            }
            MmuEffect::Cr0 { new, .. } => {
                self.mmu.set_cr0(&phys, &mut mapper, new).map_err(failed)?;
                self.revalidate();
                Ok(())
            }
            MmuEffect::Cr4 { new, .. } => {
                self.mmu.set_cr4(&phys, &mut mapper, new).map_err(failed)?;
                self.revalidate();
                Ok(())
            }
        }
    }

    /// The address space changed: translated user code (the counting mode,
    /// or IOPL-3 user code) whose pages now map elsewhere goes. Cheap when
    /// there is none: the engine indexes CPL 3 blocks by page.
    fn revalidate_user(&mut self) {
        let mem = self.mem.clone();
        let mut code = Code { mmu: &mut self.mmu, mem: &mem, user: true };
        self.engine.revalidate_user_mappings(&mut code);
    }

    /// Paging changed: translations whose linear pages now map elsewhere go.
    fn revalidate(&mut self) {
        let mem = self.mem.clone();
        let mut code = Code { mmu: &mut self.mmu, mem: &mem, user: false };
        self.engine.revalidate_mappings(&mut code);
    }

    fn start_io(&mut self, insn: &Instruction, op: IoOp, next_eip: u32) -> Result<Option<VmExit>, BackendError> {
        if sensitive::string_io_is_empty(&self.cpu, insn) {
            self.cpu.eip = next_eip;
            self.retire();
            return Ok(None);
        }
        self.count("io");
        Ok(Some(match op {
            IoOp::In { port, size } => {
                self.pending = Some(PendingIo::In { size, next_eip });
                VmExit::IoIn { port, size }
            }
            IoOp::Out { port, size, value } => {
                // The OUT is complete once the machine has the value: EIP
                // moves now, before the machine may inject an interrupt.
                self.pending = Some(PendingIo::Out { next_eip });
                self.finish_io(0);
                VmExit::IoOut { port, size, value }
            }
            IoOp::Ins { port, size } => {
                self.pending = Some(PendingIo::Ins { insn: *insn, op, next_eip });
                VmExit::IoIn { port, size }
            }
            IoOp::Outs { port, size, value } => {
                self.pending = Some(PendingIo::Outs { insn: *insn, op, next_eip });
                self.finish_io(0);
                VmExit::IoOut { port, size, value }
            }
        }))
    }

    /// Finishes the pending I/O instruction (OUT completes on the next run).
    fn finish_io(&mut self, value: u32) {
        let Some(p) = self.pending.take() else { return };
        let mem = self.mem.clone();
        match p {
            PendingIo::In { size, next_eip } => {
                let reg = match size {
                    1 => iced_x86::Register::AL,
                    2 => iced_x86::Register::AX,
                    _ => iced_x86::Register::EAX,
                };
                gpr_write(&mut self.cpu, reg, value);
                self.cpu.eip = next_eip;
                self.retire();
            }
            PendingIo::Out { next_eip } => {
                self.cpu.eip = next_eip;
                self.retire();
            }
            PendingIo::Ins { insn, op, next_eip } | PendingIo::Outs { insn, op, next_eip } => {
                let mut lin = Linear { mmu: &mut self.mmu, mem: &mem };
                match sensitive::complete_string_io(&mut self.cpu, &mut lin, &insn, op, value) {
                    Ok(true) => {
                        self.cpu.eip = next_eip;
                        self.retire();
                    }
                    Ok(false) => {}
                    Err(f) => {
                        let _ = self.fault(f);
                    }
                }
            }
        }
    }
}

/// The guest event for a host exit that is an exception of the guest.
fn exception_of(exit: Exit) -> Event {
    match exit {
        Exit::DivideError => Event::Exception(Fault::new(vector::DE)),
        Exit::Debug => Event::Exception(Fault::new(vector::DB)),
        Exit::Breakpoint => Event::Software(vector::BP),
        Exit::Overflow => Event::Software(vector::OF),
        Exit::BoundRange => Event::Exception(Fault::new(vector::BR)),
        Exit::InvalidOpcode => Event::Exception(Fault::ud()),
        Exit::StackFault { error_code } => Event::Exception(Fault::with_code(vector::SS, guest_error_code(error_code))),
        Exit::SegmentNotPresent { error_code } => {
            Event::Exception(Fault::with_code(vector::NP, guest_error_code(error_code)))
        }
        Exit::AlignmentCheck => Event::Exception(Fault::with_code(vector::AC, 0)),
        Exit::X87Fault => Event::Exception(Fault::new(vector::MF)),
        Exit::SimdFault => Event::Exception(Fault::new(vector::XM)),
        Exit::GeneralProtection { error_code, .. } => Event::Exception(Fault::gp(guest_error_code(error_code))),
        Exit::PageFault { address, error_code } => Event::Exception(Fault::page(address, error_code)),
        Exit::SystemCall { .. } | Exit::Kick | Exit::Callout => Event::Exception(Fault::gp(0)),
    }
}

/// A selector error code from the host refers to a host selector: report
/// the guest selector it shadows.
fn guest_error_code(code: u32) -> u32 {
    if code == 0 {
        return 0;
    }
    let sel = (code & 0xFFFC) as u16;
    guest_selector(sel | 3, 0).map_or(code, |g| u32::from(g & 0xFFFC) | (code & 1))
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions in user mode on this host.
    unsafe { std::arch::x86_64::_rdtsc() }
}

impl Backend for BtBackend {
    fn name(&self) -> &'static str {
        "bt"
    }

    fn run(&mut self) -> Result<VmExit, BackendError> {
        if let Some(r) = self.pending_exit.take() {
            return r;
        }
        let t = rdtsc();
        let r = loop {
            if self.cpu.halted {
                break Ok(VmExit::Halt);
            }
            if self.want_window && self.interrupts_enabled() && !self.raw_resume {
                self.want_window = false;
                break Ok(VmExit::InterruptWindow);
            }
            match self.step() {
                Ok(Some(e)) => break Ok(e),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
        };
        self.stats.cycles_total += rdtsc().wrapping_sub(t);
        r
    }

    fn complete_io_in(&mut self, value: u32) {
        self.finish_io(value);
    }

    fn complete_mmio_read(&mut self, value: u64) {
        if let Some(p) = self.pending_mmio.take() {
            match self.mmio_execute(p.insn, p.gpa, p.size, p.writes, value) {
                Ok(Some(e)) => self.pending_exit = Some(Ok(e)),
                Ok(None) => {}
                Err(e) => self.pending_exit = Some(Err(e)),
            }
        }
    }

    fn interrupts_enabled(&self) -> bool {
        // Not between guest instructions (a kick in a committed TC
        // sequence): the virtual CPU state is not the guest's yet.
        !self.raw_resume && self.cpu.interrupts_enabled() && !self.cpu.interrupt_shadow
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<(), BackendError> {
        self.count("interrupt");
        self.cpu.halted = false;
        match self.raise(Event::External(vector))? {
            None => Ok(()),
            Some(_) => Err(failed("triple fault while delivering an external interrupt")),
        }
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.want_window = on;
    }

    fn kicker(&self) -> Kick {
        let k = self.host.kicker();
        Arc::new(move || {
            let _ = k.kick();
        })
    }

    fn cpu_state(&mut self) -> Cpu {
        self.cpu.clone()
    }

    fn instruction_count(&self) -> Option<u64> {
        self.counting.as_ref().map(|c| c.retired)
    }

    fn virtual_ns(&self) -> Option<u64> {
        self.counting.as_ref().map(Counting::now_ns)
    }

    fn set_stop(&mut self, count: Option<u64>, ns: Option<u64>) {
        if let Some(c) = self.counting.as_mut() {
            c.stop_at = count;
            c.stop_ns = ns;
        }
    }

    fn read_linear(&mut self, linear: u32, buf: &mut [u8]) -> bool {
        use engine::GuestCode;
        let mem = self.mem.clone();
        let mut code = Code { mmu: &mut self.mmu, mem: &mem, user: false };
        let mut done = 0;
        while done < buf.len() {
            let lin = linear.wrapping_add(done as u32);
            let n = (4096 - (lin & 0xFFF) as usize).min(buf.len() - done);
            if code.fetch(lin, &mut buf[done..done + n]).is_err() {
                return false;
            }
            done += n;
        }
        true
    }

    fn skip_time(&mut self, ns: u64) {
        if let Some(c) = self.counting.as_mut() {
            c.time.idle_ns += ns;
        }
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.stats.exits.iter().map(|(k, n)| (format!("bt/exits/{k}"), *n)).collect();
        let e = self.engine.stats();
        v.push(("engine/blocks_translated".into(), e.blocks_translated));
        v.push(("engine/guest_bytes".into(), e.guest_bytes_translated));
        v.push(("engine/tc_bytes".into(), e.tc_bytes_used));
        v.push(("engine/exits_unchained".into(), e.exits_unchained));
        v.push(("engine/indirect_misses".into(), e.indirect_misses));
        v.push(("engine/invalidations".into(), e.invalidations));
        v.push(("engine/flushes".into(), e.flushes));
        for (k, n) in &e.callouts_taken {
            v.push((format!("engine/callouts/{k}"), *n));
        }
        let m = self.mmu.stats();
        v.push(("mmu/hidden_faults".into(), m.hidden_faults));
        v.push(("mmu/guest_page_faults".into(), m.guest_page_faults));
        v.push(("bt/ldt_writes".into(), self.stats.ldt_writes));
        let us = |cycles: u64| (cycles as f64 / tsc_per_us()) as u64;
        v.push(("bt/time_direct_us".into(), us(self.stats.cycles_direct)));
        v.push(("bt/time_translated_us".into(), us(self.stats.cycles_translated)));
        let guest = self.stats.cycles_direct + self.stats.cycles_translated;
        v.push(("bt/time_monitor_us".into(), us(self.stats.cycles_total.saturating_sub(guest))));
        v.sort();
        v
    }
}
