//! The safe face of the execution host: a [`Vcpu`] holds guest-mode register
//! state, enters compatibility-mode code with [`Vcpu::run`] and returns the
//! next [`Exit`].

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};

use super::entry::{self, reg, Frame, POPEK_FRAME, POPEK_KICK_PENDING, XSAVE_AREA_SIZE};
use super::ldt::{self, HostSegment, HOST_CS32, HOST_DS};
use super::window::{Prot, Window};
use super::{seccomp, signals, HostError};

/// Guest general registers, EIP and EFLAGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub eax: u32,
    pub ecx: u32,
    pub edx: u32,
    pub ebx: u32,
    pub esp: u32,
    pub ebp: u32,
    pub esi: u32,
    pub edi: u32,
    pub eip: u32,
    pub eflags: u32,
}

/// Guest-mode segment selectors, as host selectors (shadow LDT entries or
/// the host's flat selectors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segments {
    pub cs: u16,
    pub ss: u16,
    pub ds: u16,
    pub es: u16,
    pub fs: u16,
    pub gs: u16,
}

impl Default for Segments {
    /// The host's flat 32-bit user segments.
    fn default() -> Self {
        Segments { cs: HOST_CS32, ss: HOST_DS, ds: HOST_DS, es: HOST_DS, fs: HOST_DS, gs: HOST_DS }
    }
}

/// Which instruction made a guest system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyscallKind {
    Int80,
    Sysenter,
    Syscall,
}

/// Why guest-mode code stopped. The register state at the exit is in the
/// vCPU ([`Vcpu::regs`]): for faults EIP is the faulting instruction; for
/// traps (breakpoint, single step, overflow, system calls) EIP is the next
/// instruction, as the architecture reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// #PF: `address` is the linear address (CR2); `error_code` has the
    /// architectural P (bit 0), W (bit 1), RSVD (bit 3) and I/D (bit 4) bits;
    /// U/S is left to the monitor, which knows the virtual CPL.
    PageFault {
        address: u32,
        error_code: u32,
    },
    /// #GP with its error code and the instruction bytes at CS:EIP (`len`
    /// of them could be read).
    GeneralProtection {
        error_code: u32,
        insn: [u8; 15],
        len: u8,
    },
    InvalidOpcode,
    DivideError,
    Breakpoint,
    Debug,
    Overflow,
    BoundRange,
    StackFault {
        error_code: u32,
    },
    SegmentNotPresent {
        error_code: u32,
    },
    AlignmentCheck,
    X87Fault,
    SimdFault,
    /// A 32-bit system call by the guest; the host kernel did not execute it.
    /// EAX holds the number the guest asked for, EIP the next instruction,
    /// except when `eip_known` is false: for the fast system calls the host
    /// kernel enters through (SYSCALL on AMD, SYSENTER on Intel) Linux
    /// replaces the return address with its vDSO landing pad before seccomp
    /// runs (`do_fast_syscall_32`), so EIP is lost. Guest CPUID hides these
    /// instructions (a 686 has neither in this form); a guest that uses them
    /// anyway cannot be resumed precisely.
    SystemCall {
        kind: SyscallKind,
        nr: u32,
        eip_known: bool,
    },
    /// Another thread asked the vCPU to stop ([`Kicker::kick`]).
    Kick,
    /// Translated code called out to the monitor (the id is in the vCPU page).
    Callout,
    /// The callout hook of [`Vcpu::run_hooked`] handled a callout and asked
    /// for the run loop; the hook's owner knows what it decided.
    Hooked,
}

/// FPU/SSE state of the guest, as saved by XSAVE.
pub struct FpuState<'a> {
    area: &'a mut [u8; XSAVE_AREA_SIZE],
}

const XSTATE_BV: usize = 512;
const MXCSR: usize = 24;
const XMM0: usize = 160;

impl FpuState<'_> {
    fn xstate_bv(&self) -> u64 {
        u64::from_le_bytes(self.area[XSTATE_BV..XSTATE_BV + 8].try_into().expect("8 bytes"))
    }

    /// XMM register `i` (0-7: compatibility mode has eight).
    pub fn xmm(&self, i: usize) -> u128 {
        assert!(i < 8);
        if self.xstate_bv() & 2 == 0 {
            return 0; // SSE state in its initial configuration
        }
        let o = XMM0 + 16 * i;
        u128::from_le_bytes(self.area[o..o + 16].try_into().expect("16 bytes"))
    }

    pub fn set_xmm(&mut self, i: usize, v: u128) {
        assert!(i < 8);
        if self.xstate_bv() & 2 == 0 {
            self.area[XMM0..XMM0 + 16 * 16].fill(0);
        }
        let o = XMM0 + 16 * i;
        self.area[o..o + 16].copy_from_slice(&v.to_le_bytes());
        let bv = self.xstate_bv() | 2;
        self.area[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    }

    pub fn mxcsr(&self) -> u32 {
        u32::from_le_bytes(self.area[MXCSR..MXCSR + 4].try_into().expect("4 bytes"))
    }

    /// Sets MXCSR; reserved bits would make the next entry fault, so they are refused.
    pub fn set_mxcsr(&mut self, v: u32) -> Result<(), HostError> {
        if v & !0xFFFF != 0 {
            return Err(HostError::BadFpuState("reserved MXCSR bits"));
        }
        self.area[MXCSR..MXCSR + 4].copy_from_slice(&v.to_le_bytes());
        Ok(())
    }

    /// Resets to the power-on state (FNINIT state, MXCSR 0x1f80).
    pub fn reset(&mut self) {
        self.area.fill(0);
        self.area[MXCSR..MXCSR + 4].copy_from_slice(&0x1f80u32.to_le_bytes());
        self.area[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
    }
}

/// A handle another thread uses to stop the vCPU.
#[derive(Clone, Copy, Debug)]
pub struct Kicker {
    tid: libc::pid_t,
}

impl Kicker {
    /// Makes the vCPU's current or next `run` return [`Exit::Kick`].
    pub fn kick(&self) -> Result<(), HostError> {
        signals::kick_thread(self.tid)
    }

    /// The thread a kick interrupts (a [`signals::KickTimer`] can kick it).
    pub fn tid(&self) -> libc::pid_t {
        self.tid
    }
}

/// EFLAGS bits guest-mode code controls (the rest are forced: IF=1, IOPL=0).
const USER_EFLAGS: u32 = 0x0000_0001 // CF
    | 0x0000_0004 // PF
    | 0x0000_0010 // AF
    | 0x0000_0040 // ZF
    | 0x0000_0080 // SF
    | 0x0000_0100 // TF
    | 0x0000_0400 // DF
    | 0x0000_0800 // OF
    | 0x0000_4000 // NT
    | 0x0004_0000 // AC
    | 0x0020_0000; // ID

static VCPU_TAKEN: AtomicBool = AtomicBool::new(false);

/// The execution vCPU. Bound to the thread that created it (signals,
/// seccomp and the alternate stack are per thread); one per process.
pub struct Vcpu {
    window: &'static Window,
    /// Host LDT entries this vCPU set up, by index.
    ldt: ldt::LdtTable,
    /// CPUID faults on this thread: directly run guest user code sees the
    /// guest's CPUID ([`super::cpuid_fault`]).
    cpuid_faulting: bool,
    _not_send: PhantomData<*mut ()>,
}

/// Whether the host CPU is AMD's (asked once, before CPUID faulting).
fn host_is_amd() -> bool {
    static AMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMD.get_or_init(|| std::arch::x86_64::__cpuid(0).ebx == u32::from_le_bytes(*b"Auth"))
}

fn check_host() -> Result<(), HostError> {
    const HWCAP2_FSGSBASE: u64 = 1 << 1;
    // SAFETY: getauxval has no preconditions.
    if unsafe { libc::getauxval(libc::AT_HWCAP2) } & HWCAP2_FSGSBASE == 0 {
        return Err(HostError::NoFsGsBase);
    }
    let _ = host_is_amd();
    let leaf1 = std::arch::x86_64::__cpuid(1);
    if leaf1.ecx & (1 << 27) == 0 {
        return Err(HostError::NoXsave);
    }
    // No size check against CPUID leaf 0xD: its EBX is the image for the
    // host's whole XCR0 (11008 bytes with AMX tiles), but Popek saves only
    // XSAVE_MASK, whose image has a fixed size (entry::XSAVE_AREA_SIZE).
    // The hooked resume restores flags with SAHF in 64-bit mode.
    if std::arch::x86_64::__cpuid(0x8000_0001).ecx & 1 == 0 {
        return Err(HostError::NoLahfSahf);
    }
    Ok(())
}

/// Writes the exit gate: `jmp qword [rip+2]` and the address of the callout
/// exit path. It must sit below 4 GiB (a far jump from compatibility mode
/// carries a 32-bit offset); the monitor's code is above.
fn install_exit_gate(window: &Window) {
    // `jmp qword [rip + 2]`, two int3, the 8-aligned address: guest code
    // may arrive with EFLAGS.AC set (a CPL 3 POPF), and at host CPL 3 a
    // misaligned pointer read here would be #AC inside the monitor.
    let mut gate = [0u8; 16];
    gate[..8].copy_from_slice(&[0xFF, 0x25, 2, 0, 0, 0, 0xCC, 0xCC]);
    gate[8..].copy_from_slice(&entry::exit_callout_address().to_le_bytes());
    const _: () = assert!(engine::vmm_area::EXIT_GATE_LEN as usize == 16);
    const _: () = assert!(engine::vmm_area::EXIT_GATE.is_multiple_of(8));
    window.vmm_alias().write(engine::vmm_area::EXIT_GATE as usize, &gate);
    // The gate page is the monitor's only 64-bit code below 4 GiB.
    let start = window.exit_gate();
    signals::set_monitor_code_below_4g(start..start + (engine::vmm_area::TRANSITIONS - engine::vmm_area::EXIT_GATE));
}

impl Vcpu {
    /// Sets up the execution host on the calling thread: reserves the
    /// window, installs the monitor's LDT entries, the signal handlers, an
    /// alternate signal stack and the seccomp filter.
    pub fn new() -> Result<Vcpu, HostError> {
        check_host()?;
        if VCPU_TAKEN.swap(true, Ordering::AcqRel) {
            return Err(HostError::Busy);
        }
        let release = |e| {
            VCPU_TAKEN.store(false, Ordering::Release);
            e
        };
        let window = Window::get().map_err(release)?;
        let reserved = ldt::reserved_entries(window.vmm_base(), window.vmm_size());
        for (idx, seg) in &reserved {
            ldt::set_entry(*idx, seg).map_err(release)?;
        }
        signals::install().map_err(release)?;
        signals::ensure_altstack().map_err(release)?;
        seccomp::install_on_current_thread().map_err(release)?;
        POPEK_KICK_PENDING.store(0, Ordering::SeqCst);
        install_exit_gate(window);
        let cpuid_faulting = super::cpuid_fault::enable_on_current_thread();
        if !cpuid_faulting {
            tracing::warn!(
                "this host has no CPUID faulting: guest user code run directly sees the host's CPUID (docs/security.md)"
            );
        }
        let mut v = Vcpu { window, ldt: ldt::LdtTable::default(), cpuid_faulting, _not_send: PhantomData };
        {
            let f = v.frame_mut();
            f.gpr = [0; 8];
            f.eip = 0;
            f.eflags = 0x202;
            // The signal handler restores these on this thread once guest
            // code ran; until the first entry saves them they must not be a
            // previous vCPU thread's (a reused thread id would get a dead
            // thread's TLS).
            f.host_fsbase = 0;
            f.host_gsbase = 0;
            // SAFETY: gettid has no preconditions.
            f.vcpu_tid = unsafe { libc::gettid() };
        }
        v.ldt.extend(reserved);
        let flat = v.flat_segments();
        v.set_segments(flat)?;
        v.fpu().reset();
        Ok(v)
    }

    fn frame(&self) -> &Frame {
        // SAFETY: this vCPU is the only one (VCPU_TAKEN) and the frame is only
        // written by its own thread (entry code and signal handler run on it).
        unsafe { &*std::ptr::addr_of!(POPEK_FRAME) }
    }

    fn frame_mut(&mut self) -> &mut Frame {
        // SAFETY: see `frame`; `&mut self` makes this the only reference.
        unsafe { &mut *std::ptr::addr_of_mut!(POPEK_FRAME) }
    }

    /// Whether directly run guest user code sees the guest's CPUID (CPUID
    /// faults on this thread) rather than the host's.
    pub fn hides_host_cpuid(&self) -> bool {
        self.cpuid_faulting
    }

    /// The process's address window (shadow mappings, VMM area).
    pub fn window(&self) -> &'static Window {
        self.window
    }

    pub fn regs(&self) -> Regs {
        let f = self.frame();
        Regs {
            eax: f.gpr[reg::EAX],
            ecx: f.gpr[reg::ECX],
            edx: f.gpr[reg::EDX],
            ebx: f.gpr[reg::EBX],
            esp: f.gpr[reg::ESP],
            ebp: f.gpr[reg::EBP],
            esi: f.gpr[reg::ESI],
            edi: f.gpr[reg::EDI],
            eip: f.eip,
            eflags: f.eflags,
        }
    }

    /// Sets the registers. EFLAGS keeps only what guest-mode code controls
    /// (arithmetic flags, TF, DF, NT, AC, ID); IF is always on and IOPL 0.
    pub fn set_regs(&mut self, r: &Regs) {
        let f = self.frame_mut();
        f.gpr = [r.eax, r.ecx, r.edx, r.ebx, r.esp, r.ebp, r.esi, r.edi];
        f.eip = r.eip;
        f.eflags = (r.eflags & USER_EFLAGS) | 0x202;
    }

    pub fn segments(&self) -> Segments {
        let f = self.frame();
        Segments { cs: f.cs, ss: f.ss, ds: f.ds, es: f.es, fs: f.fs, gs: f.gs }
    }

    fn check_selector(&self, sel: u16, code: bool, nullable: bool) -> Result<(), HostError> {
        let ok = match sel {
            0..=3 => nullable,
            s if s == HOST_CS32 => code,
            s if s == HOST_DS => !code,
            s if s & 4 != 0 && s & 3 == 3 => self.ldt.get(&(s >> 3)).is_some_and(|d| {
                d.present && matches!(d.kind, ldt::SegKind::Code { .. }) == code
                    || (!code && matches!(d.kind, ldt::SegKind::Code { readable: true }) && d.present)
            }),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(HostError::BadSelector(sel))
        }
    }

    /// Sets the selectors guest-mode code runs with; each must be a host LDT
    /// entry this vCPU wrote ([`Vcpu::set_ldt_entry`]) or a flat host
    /// selector (0x23 code, 0x2b data); DS, ES, FS and GS may also be null.
    pub fn set_segments(&mut self, s: Segments) -> Result<(), HostError> {
        self.check_selector(s.cs, true, false)?;
        self.check_selector(s.ss, false, false)?;
        // A null data selector loads; guest accesses through it then fault,
        // as the guest expects after an IRET to an outer level nulled it.
        for sel in [s.ds, s.es, s.fs, s.gs] {
            self.check_selector(sel, false, true)?;
        }
        let f = self.frame_mut();
        let new = (s.cs, s.ss, s.ds, s.es, s.fs, s.gs);
        if (f.cs, f.ss, f.ds, f.es, f.fs, f.gs) != new {
            (f.cs, f.ss, f.ds, f.es, f.fs, f.gs) = new;
            f.seg_dirty = 1;
        }
        Ok(())
    }

    /// Writes host LDT entry `index` and returns its selector.
    pub fn set_ldt_entry(&mut self, index: u16, seg: HostSegment) -> Result<u16, HostError> {
        if !(ldt::FIRST_SHADOW..ldt::LDT_ENTRIES).contains(&index) {
            return Err(HostError::LdtIndex(index));
        }
        let sel = ldt::set_entry(index, &seg)?;
        self.ldt.insert(index, seg);
        // A loaded selector may name this entry: reload before resuming.
        self.frame_mut().seg_dirty = 1;
        Ok(sel)
    }

    /// Selectors of the monitor's reserved segments.
    pub fn vmm_code_selector(&self) -> u16 {
        ldt::ldt_selector(ldt::VMM_CODE_INDEX)
    }
    pub fn vmm_data_selector(&self) -> u16 {
        ldt::ldt_selector(ldt::VMM_DATA_INDEX)
    }

    /// Flat 32-bit guest segments (base 0) truncated below the VMM area: the
    /// selectors a new vCPU starts with.
    pub fn flat_segments(&self) -> Segments {
        let d = ldt::ldt_selector(ldt::GUEST_FLAT_DATA_INDEX);
        Segments { cs: ldt::ldt_selector(ldt::GUEST_FLAT_CODE_INDEX), ss: d, ds: d, es: d, fs: d, gs: d }
    }

    /// The guest's saved FPU/SSE state.
    pub fn fpu(&mut self) -> FpuState<'_> {
        FpuState { area: &mut self.frame_mut().xsave.0 }
    }

    /// A handle to stop this vCPU from another thread.
    pub fn kicker(&self) -> Kicker {
        Kicker { tid: self.frame().vcpu_tid }
    }

    fn segment_base(&self, sel: u16) -> u32 {
        if sel & 4 != 0 {
            self.ldt.get(&(sel >> 3)).map_or(0, |d| d.base)
        } else {
            0
        }
    }

    /// Reads up to 15 instruction bytes at guest-linear `lin` (fault-safe).
    fn insn_bytes(&self, lin: u32) -> ([u8; 15], u8) {
        let mut b = [0u8; 15];
        let n = self.window.read_linear(lin, &mut b);
        (b, n as u8)
    }

    /// Runs guest-mode code until the next exit.
    pub fn run(&mut self) -> Result<Exit, HostError> {
        // SAFETY: the frame holds selectors checked by `set_segments` (or
        // saved by an exit), an XSAVE image written by XSAVE or `FpuState`
        // (which keeps reserved bits clear), and `new` installed handlers,
        // alternate stack and seccomp filter on this thread (the type is
        // not Send).
        let reason = unsafe { entry::enter(None) };
        self.exit_of(reason)
    }

    /// Runs guest-mode code until the next exit, handing each callout to
    /// `hook` first: what it handles resumes guest-mode code at once, with
    /// no XSAVE/XRSTOR, host segment reloads or IRETQ (docs/execution-host.md).
    ///
    /// # Safety
    /// `this` must point to a live `Vcpu` and `ctx` be valid for `hook` until
    /// this returns; the hook is the only user of either meanwhile (it may
    /// reach this `Vcpu` through `ctx`, e.g. to set registers or segments,
    /// but must not run it).
    pub unsafe fn run_hooked(this: *mut Vcpu, hook: entry::CalloutHook, ctx: *mut ()) -> Result<Exit, HostError> {
        // SAFETY: as in `run`; the hook contract is the caller's.
        let reason = unsafe { entry::enter(Some((hook, ctx))) };
        // SAFETY: the hook is done; `this` is live (caller's contract).
        unsafe { (*this).exit_of(reason) }
    }

    /// Whether a kick is waiting for the next entry (a hook that sees one
    /// hands the run loop the exit instead of resuming).
    pub fn kick_pending(&self) -> bool {
        POPEK_KICK_PENDING.load(Ordering::SeqCst) != 0
    }

    fn exit_of(&mut self, reason: u32) -> Result<Exit, HostError> {
        match reason {
            entry::EXIT_CALLOUT => Ok(Exit::Callout),
            entry::EXIT_HOOKED => Ok(Exit::Hooked),
            entry::EXIT_ABORTED => Ok(Exit::Kick),
            entry::EXIT_ENTRY_FAULT => {
                let f = self.frame();
                Err(HostError::EntryFault {
                    signo: f.signo,
                    trapno: f.trapno,
                    err: f.err,
                    cs: f.cs,
                    ss: f.ss,
                    ds: f.ds,
                })
            }
            _ => self.decode_signal_exit(),
        }
    }

    fn decode_signal_exit(&mut self) -> Result<Exit, HostError> {
        let f = self.frame();
        let (signo, trapno, err) = (f.signo, f.trapno, f.err);
        let cs_base = self.segment_base(f.cs);
        let eip = f.eip;
        if f.cs == ldt::HOST_CS64 {
            let syscall = (signo == libc::SIGSYS).then_some((f.syscall_nr, f.syscall_arch == seccomp::AUDIT_ARCH_I386));
            // A system call's RIP is where it was made from (call_addr).
            let rip = if syscall.is_some() { f.fault_addr } else { u64::from(f.eip) };
            return Err(HostError::GuestEscape(super::Escape { cs: f.cs, rip, signo, syscall }));
        }
        if signo == signals::kick_signal() {
            return Ok(Exit::Kick);
        }
        let exit = match (signo, trapno) {
            (libc::SIGSEGV, 14) => {
                // W, RSVD and I/D come from the hardware; P from the window's
                // own record (the host PTE of a mapped but never touched page
                // is not present, which says nothing about the guest).
                let address = f.fault_addr as u32;
                let present = u32::from(self.window.prot_at(address) != Prot::NONE);
                Exit::PageFault { address, error_code: (err & 0b1_1010) | present }
            }
            (libc::SIGSEGV, 13) => {
                let (insn, len) = self.insn_bytes(cs_base.wrapping_add(eip));
                Exit::GeneralProtection { error_code: err, insn, len }
            }
            (libc::SIGSEGV, 4) => Exit::Overflow,
            (libc::SIGSEGV, 5) => Exit::BoundRange,
            (libc::SIGBUS, 12) => Exit::StackFault { error_code: err },
            (libc::SIGBUS, 11) => Exit::SegmentNotPresent { error_code: err },
            (libc::SIGBUS, 17) => Exit::AlignmentCheck,
            (libc::SIGILL, _) => {
                let (insn, len) = self.insn_bytes(cs_base.wrapping_add(eip));
                if len >= 2 && insn[..2] == [0x0f, 0x34] {
                    // SYSENTER is #UD in compatibility mode on AMD: still a
                    // system call; report it like the others, after the insn.
                    let nr = f.gpr[reg::EAX];
                    self.frame_mut().eip = eip.wrapping_add(2);
                    Exit::SystemCall { kind: SyscallKind::Sysenter, nr, eip_known: true }
                } else {
                    Exit::InvalidOpcode
                }
            }
            (libc::SIGFPE, 0) => Exit::DivideError,
            (libc::SIGFPE, 16) => Exit::X87Fault,
            (libc::SIGFPE, 19) => Exit::SimdFault,
            (libc::SIGTRAP, 3) => Exit::Breakpoint,
            (libc::SIGTRAP, 1) => Exit::Debug,
            (libc::SIGSYS, _) => {
                let nr = f.syscall_nr as u32;
                let (kind, eip_known) = if f.fault_addr >= 1 << 32 {
                    // A fast system call (SYSCALL on AMD, SYSENTER on Intel):
                    // the host kernel replaced the return address with its
                    // vDSO landing pad before seccomp saw it.
                    (if host_is_amd() { SyscallKind::Syscall } else { SyscallKind::Sysenter }, false)
                } else {
                    // Where the call returns to, from seccomp (call_addr),
                    // not from the interrupted context: for a "number" that
                    // is a restart code (-512..-516) the kernel's signal
                    // code has rewound that EIP by 2 before we run.
                    let eip = f.fault_addr as u32;
                    self.frame_mut().eip = eip;
                    let (b, len) = self.insn_bytes(cs_base.wrapping_add(eip).wrapping_sub(2));
                    let kind = match (len >= 2, b[0], b[1]) {
                        (true, 0x0f, 0x05) => SyscallKind::Syscall,
                        (true, 0x0f, 0x34) => SyscallKind::Sysenter,
                        _ => SyscallKind::Int80,
                    };
                    (kind, true)
                };
                // The kernel left -ENOSYS in EAX: give the guest its number back.
                self.frame_mut().gpr[reg::EAX] = nr;
                Exit::SystemCall { kind, nr, eip_known }
            }
            _ => return Err(HostError::UnexpectedSignal { signo, trapno }),
        };
        Ok(exit)
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        {
            let f = self.frame_mut();
            f.vcpu_tid = 0;
            f.host_fsbase = 0;
            f.host_gsbase = 0;
        }
        if self.cpuid_faulting {
            super::cpuid_fault::disable_on_current_thread();
        }
        VCPU_TAKEN.store(false, Ordering::Release);
    }
}
