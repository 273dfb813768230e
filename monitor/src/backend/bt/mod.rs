//! The `bt` backend: Popek's own CPU. Guest kernel code (virtual CPL 0-2)
//! runs translated from the TC; guest user code (CPL 3, IOPL < 3) runs
//! directly; the shadow MMU keeps the window coherent with the guest's page
//! tables; the virtual CPU ([`crate::cpu`]) gives every sensitive instruction
//! and every exception its architectural meaning.
//!
//! One [`BtBackend::run`] call loops over entries into guest-mode code until
//! something the machine must see happens (I/O, HLT, a kick, a triple
//! fault). The parts, each owning its state:
//!
//! | module | owns |
//! | --- | --- |
//! | this one | the run loop: entries into direct and translated code |
//! | [`memory`] | guest RAM + shadow MMU ([`memory::Guest`]) and the views of them |
//! | [`segments`] | the host LDT shadows of guest descriptors, the selectors per mode |
//! | [`counting`] | the instruction counter of the deterministic mode |
//! | [`exits`] | what a host exit means: hidden faults, exceptions, callouts |
//! | [`emulate`] | sensitive instructions on the virtual CPU, pending I/O and MMIO |
//! | [`reexec`] | re-execution: one instruction run natively, its operand redirected |
//! | [`stats`] | counters and where the time went |
//! | [`transitions`] | what inline INT/IRET may assume, and what they did |

pub mod counting;
mod emulate;
mod exits;
pub mod memory;
mod reexec;
pub mod segments;
pub mod stats;
mod transitions;
pub mod user_exec;

use std::sync::Arc;

use engine::vmm_area::vcpu as page;
use engine::{BlockKey, Engine, EngineError};
use shadow_mmu::{MmuConfig, ShadowMmu};

use self::counting::{Budget, Counter};
use self::emulate::Pending;
use self::memory::Guest;
use self::segments::Shadows;
pub use self::stats::BtStats;
use super::{Backend, BackendError, Kick, VmExit};
use crate::cpu::interrupt::{self, DeliveryError, Event};
use crate::cpu::policy::CpuPolicy;
use crate::cpu::state::flags;
use crate::cpu::{Cpu, Fault, Seg};
use crate::host::{Exit, Vcpu, VmmAlias};
use crate::memory::GuestMemory;

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
    /// Every callout returns to the run loop through the full exit path
    /// (`--engine slowcallouts`), instead of the callout hook that resumes
    /// the TC from the exit path (see [`BtBackend::callout_hook`]).
    pub slow_callouts: bool,
    /// Flush the whole TC at every callout (`--engine flushtc`): a test
    /// switch for the metamorphic fuzzer (docs/reliability.md, "cpl0"),
    /// so every callout's continuation, chain and lookup is made anew.
    pub flush_at_callouts: bool,
    /// Time every callout by kind for `--stats` (two TSC reads each: a
    /// tenth of a hooked callout, so off unless asked for).
    pub profile_callouts: bool,
    /// How guest user code runs (`--user-exec`; the counting mode always
    /// translates it).
    pub user_exec: user_exec::UserExec,
}

impl BtConfig {
    /// Applies one `--engine` switch: nochain, nopoll, noinline, inline,
    /// nosegcache, nopageguards, notransitions, isolate, slowcallouts, flushtc, or
    /// the test-only `corrupt=MNEMONIC` (translations of that instruction
    /// class compute a wrong result; replay must catch it).
    pub fn apply_switch(&mut self, switch: &str) -> Result<(), String> {
        match switch {
            "nochain" => self.engine.chaining = false,
            "nopoll" => self.engine.poll_at_block_entry = false,
            "noinline" => {
                let e = &mut self.engine;
                (e.inline_flags, e.inline_segments, e.inline_transitions, e.inline_invlpg) = (false, false, false, false)
            }
            "inline" => {
                let e = &mut self.engine;
                (e.inline_flags, e.inline_segments, e.inline_transitions, e.inline_invlpg) = (true, true, true, true)
            }
            "nosegcache" => self.engine.inline_segments = false,
            "nopageguards" => self.engine.user_page_guards = false,
            "notransitions" => self.engine.inline_transitions = false,
            "isolate" => self.user_isolation = true,
            "slowcallouts" => self.slow_callouts = true,
            "flushtc" => self.flush_at_callouts = true,
            s if s.starts_with("corrupt=") => self.engine.corrupt_named(&s["corrupt=".len()..])?,
            other => {
                return Err(format!(
                    "unknown --engine switch {other:?} (nochain, nopoll, noinline, inline, nosegcache, nopageguards, notransitions, isolate, slowcallouts, flushtc, corrupt=MNEMONIC)"
                ))
            }
        }
        Ok(())
    }
}

/// EFLAGS bits the host CPU holds for guest code at `cpl`: user code sets
/// and reads NT natively too (POPF, PUSHF at CPL 3 are not sensitive),
/// kernel translations keep theirs in the vCPU page (`VIOPL`). Leaving NT
/// out at CPL 3 lost a user's NT at every exit of its code (a hidden page
/// fault in the middle of a block; found by `popek fuzz cpl3-paged`).
fn live_flags(cpl: u8) -> u32 {
    if cpl == 3 {
        flags::LIVE | flags::NT
    } else {
        flags::LIVE
    }
}

fn failed(what: impl std::fmt::Display) -> BackendError {
    BackendError::Failed { backend: "bt", what: what.to_string() }
}

fn unsupported(what: impl std::fmt::Display) -> BackendError {
    BackendError::Unsupported { backend: "bt", what: what.to_string() }
}

/// What one step of the run loop produced: `None` to go on.
type Step = Result<Option<VmExit>, BackendError>;

/// Popek's own CPU.
pub struct BtBackend {
    host: Vcpu,
    /// The VMM area's alias (the vCPU page, the native-step slot).
    alias: VmmAlias,
    guest: Guest,
    cpu: Cpu,
    engine: Engine,
    policy: CpuPolicy,
    shadows: Shadows,
    /// An instruction half done, waiting for the machine (I/O, MMIO).
    pending: Pending,
    want_window: bool,
    /// A kick landed in a committed TC sequence: re-enter the host state
    /// as it is, not at a guest instruction boundary.
    raw_resume: bool,
    /// A kick is waiting for the next block entry (see `step`).
    kick_deferred: bool,
    config: BtConfig,
    stats: BtStats,
    counter: Counter,
    /// The last guest #PF raised from a hidden fault: when its handler's
    /// IRET returns to the faulting instruction, the page is mapped then
    /// (`exits::RetryFault`).
    retry: Option<exits::RetryFault>,
    /// What the callout hook decided when it handed back to the run loop
    /// ([`Exit::Hooked`]).
    hook_result: Option<Step>,
    /// The callout hook is running: guest-mode code must not be entered.
    in_hook: bool,
    /// The kind of the callout the run loop is handling and when its exit
    /// arrived (charged to the kind at the next entry).
    open_callout: Option<(engine::callout::CalloutKind, u64)>,
    /// The guest selectors last written to the vCPU page.
    written_sels: Option<([u16; 6], u16)>,
    /// Where the callout being handled continues in the TC when it leaves
    /// the guest at its `next_eip` with the block key unchanged.
    /// Valid until the next entry or `run` call.
    resume_at: Option<Resume>,
    /// Direct or translated user code, per address space.
    user_exec: user_exec::Policy,
    /// An external interrupt was delivered since the last TC entry (the
    /// user-exec policy does not blame user code for it).
    interrupted: bool,
    /// A MOV CR3 happened since translated user code last ran: its blocks
    /// are revalidated against the new tables before the next CPL 3 entry
    /// into the TC (and inline IRETs to CPL 3 exit until then), not at the
    /// switch. A shell whose exec'd child runs directly
    /// parked and revived its ~180 blocks at every switch pair, though it
    /// found them valid again when it came back.
    user_revalidate: bool,
    /// The machine's ports during `run_with_ports` (see [`PortsRef`]).
    ports: Option<PortsRef>,
    /// `Engine::blocks_translated` at the last look (user-exec policy).
    user_blocks_seen: u64,
    /// Inline INT/IRET: the transition page and the monitor's records.
    transitions: transitions::Transitions,
    /// TSC at the last entry into translated code from the run loop, or
    /// at the last exit that charged inline kernel entries (which are
    /// charged the time since).
    tc_entered: u64,
}

/// The machine's ports, lent for one `run_with_ports` call: a pointer with
/// the borrow's lifetime erased, set and cleared by that call only.
#[derive(Clone, Copy)]
struct PortsRef(std::ptr::NonNull<dyn super::Ports + 'static>);

/// Where a callout continues in the TC: its site's continuation, for the
/// block key it belongs to.
#[derive(Clone, Copy, Debug)]
struct Resume {
    key: BlockKey,
    tc: u32,
    /// No segment register changed: the host selectors and the vCPU page's
    /// copies are still right.
    segs_kept: bool,
}

/// What getting the next translated entry ready produced.
enum Prepared {
    /// The frame holds the entry state: run it.
    Ready,
    /// Something else happens first (a stop, a fault on the code fetch).
    Instead(Step),
}

impl BtBackend {
    /// A bt CPU over `mem` starting in `cpu`'s state.
    pub fn new(mem: Arc<GuestMemory>, cpu: Cpu, config: BtConfig) -> Result<BtBackend, BackendError> {
        let host = Vcpu::new().map_err(|e| BackendError::Unavailable("the bt execution host", e.to_string()))?;
        let window = host.window();
        window.unmap_all().map_err(failed)?;
        let base = window.vmm_base();
        let alias = window.vmm_alias();
        let view = engine::VmmAreaView::new(base, Box::new(alias));
        let mut engine_config = config.engine;
        if config.deterministic {
            engine_config.count_insns = true;
        } else {
            // The guest's TSC starts as the host's (no offset, TSD clear).
            engine_config.native_rdtsc = cpu.msr.tsc_offset == 0 && cpu.cr4 & crate::cpu::state::cr4::TSD == 0;
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
            alias,
            guest: Guest { mem, mmu, window },
            cpu,
            engine,
            policy: config.cpu,
            shadows: Shadows::new(base, alias),
            pending: Pending::default(),
            want_window: false,
            raw_resume: false,
            kick_deferred: false,
            config,
            stats: BtStats::default(),
            counter: Counter::new(config.deterministic),
            retry: None,
            hook_result: None,
            in_hook: false,
            open_callout: None,
            written_sels: None,
            resume_at: None,
            interrupted: false,
            user_revalidate: false,
            ports: None,
            user_blocks_seen: 0,
            transitions: transitions::Transitions::new(alias),
            tc_entered: 0,
            user_exec: user_exec::Policy::new(
                config.user_exec,
                // The deterministic mode translates all user code: no rate needed.
                if config.user_exec == user_exec::UserExec::Adaptive && !config.deterministic {
                    stats::tsc_per_us()
                } else {
                    1.0
                },
            ),
        };
        b.alias.write_u32(page::EXIT_FAR, window.exit_gate());
        b.alias.write_u16(page::EXIT_FAR + 4, crate::host::ldt::HOST_CS64);
        b.alias.write_u16(page::VMM_GS_SEL, b.host.vmm_data_selector());
        b.sync_paging()?;
        Ok(b)
    }

    /// Brings the shadow MMU's paging registers in line with the CPU.
    fn sync_paging(&mut self) -> Result<(), BackendError> {
        let (mmu, phys, mut mapper) = self.guest.paging();
        mmu.set_cr4(&phys, &mut mapper, self.cpu.cr4).map_err(failed)?;
        mmu.set_cr3(&phys, &mut mapper, self.cpu.cr3).map_err(failed)?;
        mmu.set_cr0(&phys, &mut mapper, self.cpu.cr0).map_err(failed)?;
        Ok(())
    }

    /// The virtual CPU (for tests and reports).
    pub fn cpu(&self) -> &Cpu {
        &self.cpu
    }

    pub fn cpu_mut(&mut self) -> &mut Cpu {
        self.shadows.seg_cache.invalidate_gdt();
        self.transitions.invalidate();
        &mut self.cpu
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn mmu(&self) -> &ShadowMmu {
        &self.guest.mmu
    }

    pub fn bt_stats(&self) -> &BtStats {
        &self.stats
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
            eflags: c.eflags & live_flags(c.cpl),
        });
    }

    fn save_host_regs(&mut self) -> u32 {
        let r = self.host.regs();
        self.cpu.gpr = [r.eax, r.ecx, r.edx, r.ebx, r.esp, r.ebp, r.esi, r.edi];
        let live = live_flags(self.cpu.cpl);
        self.cpu.eflags = (self.cpu.eflags & !live) | (r.eflags & live) | 2;
        r.eip
    }

    fn run_host(&mut self, translated: bool) -> Result<Exit, BackendError> {
        self.run_host_with(translated, false)
    }

    /// Runs translated code, with the callout hook when it may be used: not
    /// in the counting mode (whose stops the run loop places), and only with
    /// block-entry polls (a kick that lands while the hook runs is seen at
    /// the next poll point).
    fn run_tc(&mut self) -> Result<Exit, BackendError> {
        let hooked = !self.config.slow_callouts && !self.counter.is_on() && self.config.engine.poll_at_block_entry;
        self.run_host_with(true, hooked)
    }

    fn run_host_with(&mut self, translated: bool, hooked: bool) -> Result<Exit, BackendError> {
        if self.in_hook {
            return Err(failed("guest-mode code entered from inside the callout hook"));
        }
        self.resume_at = None;
        let t = stats::rdtsc();
        self.tc_entered = t;
        if let Some((kind, since)) = self.open_callout.take() {
            self.stats.charge_callout(kind, t.wrapping_sub(since), false);
        }
        let exit = if hooked {
            let me: *mut BtBackend = self;
            // SAFETY: `me` is this backend, live for the whole call, and no
            // reference to it is used until `run_hooked` returns: the hook
            // (`callout_hook_entry`) is its only user meanwhile, and never
            // runs the vCPU (`in_hook`).
            unsafe { Vcpu::run_hooked(std::ptr::addr_of_mut!((*me).host), Self::callout_hook_entry, me.cast()) }
        } else {
            self.host.run()
        };
        let exit = exit.map_err(|e| match e {
            crate::host::HostError::GuestEscape(escape) => BackendError::GuestEscape(escape),
            e => failed(e),
        });
        self.stats.charge_guest(translated, stats::rdtsc().wrapping_sub(t));
        exit
    }

    /// # Safety
    /// `ctx` is the `BtBackend` that `run_host_with` passed to `run_hooked`.
    unsafe fn callout_hook_entry(ctx: *mut ()) -> crate::host::entry::HookAction {
        // SAFETY: per the contract, and `run_host_with` uses nothing of the
        // backend while the hook runs.
        let b = unsafe { &mut *ctx.cast::<BtBackend>() };
        b.in_hook = true;
        let action = b.callout_hook();
        b.in_hook = false;
        action
    }

    /// The callout hook: what the run loop would do for the callout and the
    /// next translated entry, done from the exit path (VMware's monitor ran
    /// its callouts in the guest's context for the same reason). Control
    /// returns to the TC with no XSAVE/XRSTOR, host segment reloads, IRETQ
    /// or trip through the step loop; anything the machine must see, or
    /// that the step loop decides (a window for interrupts, a kick, user
    /// code to run directly), goes back to the run loop instead.
    fn callout_hook(&mut self) -> crate::host::entry::HookAction {
        use crate::host::entry::HookAction;
        let t = if self.config.profile_callouts { stats::rdtsc() } else { 0 };
        let step = self.after_translated(Exit::Callout);
        let kind = self.open_callout.take().map(|(k, _)| k);
        let action = match step {
            Ok(None) if self.tc_goes_on() => match self.prepare_tc_entry() {
                Ok(Prepared::Ready) => HookAction::Resume,
                Ok(Prepared::Instead(step)) => {
                    self.hook_result = Some(step);
                    HookAction::Done
                }
                Err(e) => {
                    self.hook_result = Some(Err(e));
                    HookAction::Done
                }
            },
            step => {
                self.hook_result = Some(step);
                HookAction::Done
            }
        };
        if let Some(kind) = kind {
            self.stats.charge_callout(kind, stats::rdtsc().wrapping_sub(t), true);
        }
        action
    }

    /// Whether the run loop would enter translated code next, with nothing
    /// to do first.
    fn tc_goes_on(&mut self) -> bool {
        let stop = self.cpu.halted
            || (self.want_window && self.interrupts_enabled())
            || self.raw_resume
            || self.kick_deferred
            || !self.pending.is_idle()
            || self.host.kick_pending();
        !stop && !self.runs_direct()
    }

    /// Whether guest code at the current state runs directly (user code
    /// outside the counting mode, unless the user-exec policy translates
    /// its address space) rather than from the TC.
    fn runs_direct(&mut self) -> bool {
        let c = &self.cpu;
        !self.counter.is_on()
            && c.cpl == 3
            && c.iopl() < 3
            && c.protected_mode()
            && c.eflags & flags::VM == 0
            // Single-stepped user code (TF) runs directly: the host's trap
            // after each instruction is the guest's #DB there, while in the
            // TC it would land between translated instructions.
            && (!self.user_exec.translated(c.cr3) || c.eflags & flags::TF != 0)
    }

    /// Delivers an exception or interrupt through the guest's IDT.
    fn raise(&mut self, event: Event) -> Step {
        match interrupt::deliver(&mut self.cpu, &mut self.guest.linear(), event) {
            Ok(()) => Ok(None),
            Err(DeliveryError::TripleFault { first, second }) => {
                tracing::warn!(first, second, "guest triple fault");
                Ok(Some(VmExit::TripleFault))
            }
            Err(DeliveryError::Unsupported(what)) => Err(unsupported(what)),
        }
    }

    fn fault(&mut self, f: Fault) -> Step {
        self.raise(Event::Exception(f))
    }

    /// One entry into guest-mode code and the handling of its exit.
    fn step(&mut self) -> Step {
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

    fn step_once(&mut self) -> Step {
        if self.raw_resume {
            self.raw_resume = false;
            if self.cpu.cpl == 3 {
                self.revalidate_user_blocks();
            }
            let exit = self.run_tc()?;
            return self.finish_tc(exit);
        }
        let direct = self.runs_direct();
        self.cpu.interrupt_shadow = false;
        if direct {
            self.step_direct()
        } else {
            self.step_translated()
        }
    }

    fn step_direct(&mut self) -> Step {
        let segs = self.shadows.direct(&mut self.host, &self.cpu)?;
        self.host.set_segments(segs).map_err(failed)?;
        self.load_host_regs(self.cpu.eip);
        self.user_exec.stretch_cancel();
        let (cr3, t) = (self.cpu.cr3, stats::rdtsc());
        let exit = self.run_host(false)?;
        // A page fault costs a host fault in translated code too: it says
        // nothing about which mode is cheaper.
        let fault = matches!(exit, Exit::PageFault { .. });
        let step = self.after_direct(exit, segs);
        // What the run cost this address space, for the user-exec policy:
        // did it end in the guest kernel?
        // Not even as user time after a fault: a process that starts (exec,
        // then fault after fault) would look as if it computed.
        let dt = stats::rdtsc().wrapping_sub(t);
        match (fault, self.cpu.cpl) {
            (true, _) => {}
            (false, 3) => self.user_exec.direct_time(cr3, dt),
            (false, _) => self.user_exec.direct_entry(cr3, dt),
        }
        step
    }

    /// Back from direct user code that ran with selectors `segs`.
    fn after_direct(&mut self, exit: Exit, segs: crate::host::Segments) -> Step {
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
            self.stats.count("raw_selector_retry");
            return Ok(None);
        }
        self.handle_direct_exit(exit)
    }

    fn step_translated(&mut self) -> Step {
        if let Prepared::Instead(step) = self.prepare_tc_entry()? {
            return step;
        }
        let exit = self.run_tc()?;
        self.finish_tc(exit)
    }

    /// The frame and the vCPU page made ready to enter the TC at the
    /// guest's EIP (translating the block if needed).
    fn prepare_tc_entry(&mut self) -> Result<Prepared, BackendError> {
        self.cpu.interrupt_shadow = false;
        let key = self.key();
        // Stretches of translated user code, for the user-exec policy.
        if key.cpl == 3 {
            if !self.user_exec.in_stretch() {
                self.interrupted = false;
                self.user_exec.stretch_begins(self.cpu.cr3, stats::rdtsc());
            }
        } else if self.user_exec.in_stretch() {
            let entry = !std::mem::take(&mut self.interrupted);
            self.user_exec.stretch_ends(stats::rdtsc(), entry);
        }
        // Stops by count (checkpoints, input points) and by guest time
        // (timer deadlines) alike.
        let budget = match self.counter.budget() {
            Budget::StopNow => return Ok(Prepared::Instead(Ok(Some(VmExit::Interrupted)))),
            Budget::Upto(b) => Some(b),
            Budget::Unlimited => None,
        };
        if key.cpl == 3 {
            self.revalidate_user_blocks();
        }
        let resume = self.resume_at.take().filter(|r| r.key == key && budget.is_none());
        let tc = match resume {
            // The callout's own continuation: no lookup.
            Some(r) => r.tc,
            None => match self.user_timed(|b| b.enter_block(key, budget)) {
                Ok(tc) => tc,
                Err(EngineError::Fetch(f)) => return Ok(Prepared::Instead(self.fetch_fault(f.linear))),
                Err(e) => return Err(failed(e)),
            },
        };
        if let Some(b) = budget {
            self.counter.entered(b);
            self.alias.write_u32(page::BUDGET, b as u32);
        }
        self.after_translation(&key);
        if resume.is_some_and(|r| r.segs_kept) {
            self.write_entry_flags();
        } else {
            self.write_entry_state()?;
        }
        let transitions = self.config.engine.inline_transitions && !self.counter.is_on();
        if (key.cpl == 0 && self.config.engine.inline_segments) || transitions {
            // After LGDT or a paging change the alias must show the new GDT
            // before any inline load runs (a key compare otherwise).
            self.shadows.seg_cache.refresh_gdt(&self.cpu, &mut self.guest)?;
        }
        if transitions {
            self.refresh_transitions()?;
        }
        self.load_host_regs(tc);
        Ok(Prepared::Ready)
    }

    /// The revalidation a MOV CR3 left pending ([`BtBackend::user_revalidate`]):
    /// translated user code whose pages the current tables map elsewhere is
    /// parked. Cheap when there is none: the engine indexes CPL 3 blocks by page.
    fn revalidate_user_blocks(&mut self) {
        if std::mem::take(&mut self.user_revalidate) {
            self.engine.revalidate_user_mappings(&mut self.guest.code(true));
        }
    }

    /// Back from a run of translated code: the hook's decision, or the exit.
    fn finish_tc(&mut self, exit: Exit) -> Step {
        if exit == Exit::Hooked {
            return self.hook_result.take().unwrap_or(Ok(None));
        }
        self.after_translated(exit)
    }

    /// The TC address to enter `key` at. The block would overrun a stop
    /// `budget` instructions away: translate a shorter one (once the full
    /// block's entry check has said so, see `callout`).
    fn enter_block(&mut self, key: BlockKey, budget: Option<i32>) -> Result<u32, EngineError> {
        let cap =
            budget.map(|b| b as u64).filter(|&l| self.engine.block(&key).is_some_and(|b| b.insns.len() as u64 > l));
        let mut code = self.guest.code(key.cpl == 3);
        match cap {
            Some(cap) => self.engine.translate_capped(key, cap as usize, &mut code),
            None => self.engine.enter(key, &mut code),
        }
    }

    /// The vCPU page and the host segments as translated code expects them.
    fn write_entry_state(&mut self) -> Result<(), BackendError> {
        let (segs, guest_gs) = self.shadows.translated(&mut self.host, &self.cpu)?;
        let sels = Seg::ALL.map(|s| self.cpu.seg(s).selector);
        // The selectors only when they changed: the TC does not write them.
        if self.written_sels != Some((sels, guest_gs)) {
            self.alias.write_u16(page::GUEST_GS_SEL, guest_gs);
            let mut user_ok = [1u8; 8];
            for (i, sel) in sels.iter().enumerate() {
                self.alias.write_u32(page::GUEST_SEL + 4 * i as u32, u32::from(*sel));
                let seg = &self.cpu.seg[i];
                user_ok[i] =
                    u8::from(sel & !3 == 0 || i == 1 || i == 2 || segments::SegCache::survives_user_return(&seg.cache));
            }
            self.alias.write(page::SEG_USER_OK as usize, &user_ok);
            self.written_sels = Some((sels, guest_gs));
        }
        self.write_entry_flags();
        if self.host.segments() != segs {
            self.host.set_segments(segs).map_err(failed)?;
        }
        Ok(())
    }

    /// The vCPU page's virtual flags and poll state for an entry.
    fn write_entry_flags(&mut self) {
        self.alias.write_u32(page::VIF, self.cpu.eflags & flags::IF);
        self.alias.write_u32(page::VIOPL, self.cpu.eflags & (flags::IOPL | flags::NT));
        self.alias.write_u32(page::IRQ_PENDING, u32::from(self.want_window));
        self.alias.write_u32(page::POLL, 0);
    }

    /// Back from translated code: the guest's registers, virtual flags and
    /// instruction count as the TC left them, then the exit's meaning.
    fn after_translated(&mut self, exit: Exit) -> Step {
        let host_eip = self.save_host_regs();
        let (transitioned, entries) = self.sync_transition()?;
        if transitioned && self.cpu.cpl == 3 {
            // An inline IRET to user code: its NT is the host's now.
            self.cpu.eflags = (self.cpu.eflags & !flags::NT) | (self.host.regs().eflags & flags::NT);
        }
        if entries != 0 {
            // Kernel entries the policy did not see as exits: charged the
            // time since the TC was entered or entries were last charged
            // (an upper bound on their user time; callouts the hook ran in
            // between re-enter the TC without the run loop).
            let now = stats::rdtsc();
            let cycles = now.wrapping_sub(std::mem::replace(&mut self.tc_entered, now));
            self.user_exec.stretch_cancel();
            self.user_exec.inline_entries(self.cpu.cr3, entries, cycles);
            self.stats.add("inline_int", u64::from(entries));
        }
        if self.cpu.cpl == 0 || transitioned {
            self.sync_inline_segments();
        }
        // Only kernel translations keep IF and IOPL in the vCPU page (inline
        // CLI/STI/POPF are CPL 0 sequences). User code can write that page
        // (its segments reach the VMM area, as direct user code's do): its
        // copy is not believed, or a user process could give itself IOPL 3.
        if self.cpu.cpl < 3 {
            let vif = self.alias.read_u32(page::VIF) & flags::IF;
            // NT too: the host's is not read back (flags::LIVE).
            let viopl = self.alias.read_u32(page::VIOPL) & (flags::IOPL | flags::NT);
            self.cpu.eflags = (self.cpu.eflags & !(flags::IF | flags::IOPL | flags::NT)) | vif | viopl;
        }
        self.counter.settle(self.alias.read_u32(page::BUDGET) as i32);
        self.handle_translated_exit(exit, host_eip)
    }

    /// Segment registers that kernel translations loaded inline (the
    /// segment cache): their selectors from the vCPU page, their
    /// descriptors those the cache entries held.
    fn sync_inline_segments(&mut self) {
        let loaded = self.alias.read_u32(page::SEG_LOADED);
        if loaded == 0 {
            return;
        }
        self.alias.write_u32(page::SEG_LOADED, 0);
        for seg in [Seg::Es, Seg::Ds, Seg::Fs, Seg::Gs] {
            if loaded & (1 << seg as u32) == 0 {
                continue;
            }
            let sel = self.alias.read_u32(page::GUEST_SEL + 4 * seg as u32) as u16;
            if let Some(cache) = self.shadows.seg_cache.loaded(sel) {
                self.cpu.seg[seg as usize] = crate::cpu::SegReg { selector: sel, cache };
            }
        }
        self.written_sels = None;
    }

    /// The port read cache (`vmm_area::PORT_CACHE`) from the machine's
    /// ports while they are lent (`run_with_ports`), or empty: between two
    /// runs the machine may have written them.
    fn refresh_port_cache(&mut self) {
        let on = self.config.engine.inline_port_reads && !self.counter.is_on();
        let ports = self.ports.filter(|_| on);
        for (slot, &port) in engine::vmm_area::CACHED_PORTS.iter().enumerate() {
            // SAFETY: as in `io_in_place`: the `&mut dyn Ports` of the
            // enclosing `run_with_ports` call, not otherwise in use now.
            let value = ports.and_then(|p| unsafe { &mut *p.0.as_ptr() }.quiet_read(port));
            let off = engine::vmm_area::PORT_CACHE + 8 * slot as u32;
            self.alias.write_u32(off, u32::from(value.is_some()));
            self.alias.write_u32(off + 4, u32::from(value.unwrap_or(0)));
        }
    }

    /// The guest's TSC: the host's, or virtual time in the counting mode.
    fn guest_tsc_base(&self) -> u64 {
        self.counter.tsc().unwrap_or_else(stats::rdtsc)
    }

    /// Runs `f` (which may translate); time spent translating user code is
    /// not the code's own, so the user-exec policy does not charge it to
    /// the current stretch: a first translated window would look slow and
    /// send the space back to direct (translation churn has its own rule).
    fn user_timed<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let (before, t) = (self.engine.blocks_translated(), stats::rdtsc());
        let r = f(self);
        if self.cpu.cpl == 3 && self.engine.blocks_translated() != before {
            self.user_exec.exclude(stats::rdtsc().wrapping_sub(t));
        }
        r
    }

    /// Write-protects newly translated code pages and logs the block.
    fn after_translation(&mut self, key: &BlockKey) {
        // Translations of user code count against translating that address
        // space (the user-exec policy): a process that keeps needing new
        // blocks (fork/exec churn, its blocks dropped at every switch) is
        // better off direct.
        let translated = self.engine.blocks_translated();
        if key.cpl == 3 && translated != self.user_blocks_seen {
            self.user_exec.user_translations(self.cpu.cr3, translated - self.user_blocks_seen);
        }
        self.user_blocks_seen = translated;
        let pages = self.engine.take_new_code_pages();
        if !pages.is_empty() {
            let (mmu, _, mut mapper) = self.guest.paging();
            for p in pages {
                if let Err(e) = mmu.protect_code_page(&mut mapper, p) {
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
}

impl Backend for BtBackend {
    fn name(&self) -> &'static str {
        "bt"
    }

    fn run_with_ports(&mut self, ports: &mut dyn super::Ports) -> Result<VmExit, BackendError> {
        let p: std::ptr::NonNull<dyn super::Ports + '_> = std::ptr::NonNull::from(ports);
        // SAFETY: only the lifetime is erased; `self.ports` is cleared
        // before this returns, and nothing keeps a copy (see `with_ports`).
        let p: std::ptr::NonNull<dyn super::Ports + 'static> = unsafe { std::mem::transmute(p) };
        self.ports = Some(PortsRef(p));
        let r = self.run();
        self.ports = None;
        r
    }

    fn run(&mut self) -> Result<VmExit, BackendError> {
        self.resume_at = None;
        self.refresh_port_cache();
        if let Some(r) = self.pending.exit.take() {
            return r;
        }
        let t = stats::rdtsc();
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
        self.stats.cycles_total += stats::rdtsc().wrapping_sub(t);
        r
    }

    fn complete_io_in(&mut self, value: u32) {
        self.finish_io(value);
    }

    fn complete_mmio_read(&mut self, value: u64) {
        self.finish_mmio_read(value);
    }

    fn complete_msr_read(&mut self, value: u64) {
        self.finish_msr_read(value);
    }

    fn interrupts_enabled(&self) -> bool {
        // Not between guest instructions (a kick in a committed TC
        // sequence): the virtual CPU state is not the guest's yet.
        !self.raw_resume && self.cpu.interrupts_enabled() && !self.cpu.interrupt_shadow
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<(), BackendError> {
        self.stats.count("interrupt");
        self.cpu.halted = false;
        self.interrupted = true;
        match self.raise(Event::External(vector))? {
            None => Ok(()),
            Some(_) => Err(failed("triple fault while delivering an external interrupt")),
        }
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.want_window = on;
    }

    fn kick_thread(&self) -> Option<libc::pid_t> {
        Some(self.host.kicker().tid())
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
        self.counter.retired()
    }

    fn virtual_ns(&self) -> Option<u64> {
        self.counter.now_ns()
    }

    fn set_stop(&mut self, count: Option<u64>, ns: Option<u64>) -> Result<(), BackendError> {
        if !self.counter.is_on() {
            return Err(unsupported("stops by instruction count outside the deterministic mode"));
        }
        self.counter.set_stop(count, ns);
        Ok(())
    }

    fn read_linear(&mut self, linear: u32, buf: &mut [u8]) -> Result<(), BackendError> {
        if self.guest.fetch(linear, buf, false) == buf.len() {
            Ok(())
        } else {
            Err(failed(format!("linear {linear:#x} is not mapped for reading")))
        }
    }

    fn skip_time(&mut self, ns: u64) -> Result<(), BackendError> {
        if !self.counter.is_on() {
            return Err(unsupported("virtual time outside the deterministic mode"));
        }
        self.counter.skip(ns);
        Ok(())
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let mut v = self.stats.listing(&self.engine, &self.guest.mmu, self.shadows.writes());
        if self.user_exec.mode() == user_exec::UserExec::Adaptive {
            v.extend(self.user_exec.counters().iter().map(|(k, n)| ((*k).to_string(), *n)));
            v.sort();
        }
        v
    }
}
