//! Entry into guest-mode code and the two ways back.
//!
//! ```text
//!   run loop (64-bit)                      guest-mode code (compat mode, CPL 3)
//!   popek_enter(frame) ── iretq ─────────► guest CS:EIP, guest regs, shadow selectors
//!        ▲                                        │            │
//!        │   popek_exit_common ◄── exit gate ◄────┘ callout   │ fault / syscall / kick
//!        │   (xsave guest FPU,    (jmp far gs:[exit_far])      ▼
//!        │    host FS/GS back)                           signal handler (64-bit,
//!        └──────── returns ExitReason ◄── popek_exit_signal ◄─ copies ucontext → Frame,
//!                                                               rewrites RIP/CS/RSP)
//! ```
//!
//! All guest state crosses through one [`Frame`]: a static, because the exit
//! paths run with the guest's FS base and cannot use thread-locals, and the
//! signal handler finds it without any argument. One vCPU per process owns it
//! (enforced by [`super::Vcpu`]).

use std::arch::global_asm;
use std::mem::offset_of;

/// The state components kept for the guest across exits: x87 and SSE.
/// The guest's CPUID policy offers neither AVX nor XSAVE, so its state ends
/// there; saving the host's whole XCR0 (AVX-512: 2.7 KB) on every exit and
/// entry cost more than the rest of a callout's round trip.
pub const XSAVE_MASK: u32 = 0b11;

/// Size of the XSAVE image of [`XSAVE_MASK`]: the legacy x87/SSE region
/// (512 bytes) and the XSAVE header (64). Standard-form XSAVE and XRSTOR of
/// components 0 and 1 touch nothing beyond it, whatever the host's XCR0:
/// the size CPUID leaf 0xD reports covers every enabled component (11008
/// bytes on a Xeon with AMX tiles, which Popek once refused to run on).
pub const XSAVE_AREA_SIZE: usize = 512 + 64;
const _: () = assert!(XSAVE_MASK == 0b11, "a wider mask needs the CPUID leaf 0xD offsets");

/// Why `popek_enter` returned.
pub const EXIT_SIGNAL: u32 = 1;
pub const EXIT_CALLOUT: u32 = 2;
/// A kick arrived between the last check and the jump into the guest: the
/// guest did not run.
pub const EXIT_ABORTED: u32 = 3;
/// A signal other than a kick arrived while entering (bad selector, no
/// compatibility mode): the guest did not run.
pub const EXIT_ENTRY_FAULT: u32 = 4;
/// EFLAGS bits besides the arithmetic ones that guest-mode code can hold:
/// TF, DF, NT, AC, ID. Monitor code runs with them clear.
const SPECIAL_FLAGS: u32 = 0x100 | 0x400 | 0x4000 | 0x4_0000 | 0x20_0000;

/// The callout hook handled the last callout and asked for the run loop.
pub const EXIT_HOOKED: u32 = 5;

/// What a [`CalloutHook`] decided (its return value).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookAction {
    /// Not handled: the callout exits to the run loop as usual.
    Exit = 0,
    /// Handled: the frame holds the next entry state; enter it at once.
    Resume = 1,
    /// Handled, but the run loop must see the result: exit with
    /// [`EXIT_HOOKED`].
    Done = 2,
}

/// A callout hook: called by the callout exit path on the monitor stack, in
/// 64-bit mode, with the host FS base (thread-locals work) but the guest's
/// segment registers and x87 state still loaded, guest XMM0-7 and MXCSR
/// saved aside. It may change the frame (registers, selectors, EIP) and
/// must not enter guest code itself.
pub type CalloutHook = unsafe fn(*mut ()) -> HookAction;

/// The XSAVE image, 64-byte aligned as XSAVE requires.
#[repr(C, align(64))]
pub struct XsaveArea(pub [u8; XSAVE_AREA_SIZE]);

/// Guest state and host bookkeeping shared by the entry/exit assembly, the
/// signal handler and the run loop.
#[repr(C, align(64))]
pub struct Frame {
    /// Guest general registers, EIP, EFLAGS.
    pub gpr: [u32; 8],
    pub eip: u32,
    pub eflags: u32,
    /// Guest-mode selectors (host selectors: shadow LDT entries).
    pub cs: u16,
    pub ss: u16,
    pub ds: u16,
    pub es: u16,
    pub fs: u16,
    pub gs: u16,
    // Host state saved by `popek_enter`.
    pub host_rsp: u64,
    pub host_fsbase: u64,
    pub host_gsbase: u64,
    pub host_ds: u16,
    pub host_es: u16,
    pub host_fs: u16,
    pub host_gs: u16,
    pub host_ss: u16,
    pub host_fcw: u16,
    pub host_mxcsr: u32,
    /// Thread id of the vCPU thread (signals on other threads are not ours).
    pub vcpu_tid: i32,
    /// One of `EXIT_*`.
    pub exit_reason: u32,
    /// Signal exits: what the kernel reported.
    pub signo: i32,
    pub si_code: i32,
    pub trapno: u32,
    pub err: u32,
    pub fault_addr: u64,
    /// SIGSYS: the system call number the guest asked for.
    pub syscall_nr: i32,
    /// SIGSYS: the call's audit architecture (i386 or x86-64).
    pub syscall_arch: u32,
    /// Nonzero when a selector in the frame or an LDT entry changed since
    /// the last entry: a hooked resume reloads SS, DS and ES only then (FS
    /// and GS always, for their bases).
    pub seg_dirty: u32,
    /// The callout hook ([`CalloutHook`] as an address) and its context;
    /// 0 when callouts exit to the run loop.
    pub hook_fn: u64,
    pub hook_ctx: u64,
    /// Guest MXCSR and XMM0-7 while a hook runs (the rest of the guest's
    /// FPU state stays in the registers: monitor code does not use x87).
    pub hook_mxcsr: u32,
    /// The guest's FS base while a hook runs with the host's.
    pub hook_fsbase: u64,
    /// Far pointer of a hooked resume: EIP then CS.
    pub resume_far: [u16; 3],
    pub _pad: [u16; 3],
    pub hook_xmm: [u128; 8],
    pub xsave: XsaveArea,
}

/// Index of each guest register in [`Frame::gpr`], in the x86 encoding order.
pub use crate::cpu::state::gpr as reg;

/// The one frame of the process.
#[no_mangle]
pub static mut POPEK_FRAME: Frame = Frame {
    gpr: [0; 8],
    eip: 0,
    eflags: 0,
    cs: 0,
    ss: 0,
    ds: 0,
    es: 0,
    fs: 0,
    gs: 0,
    host_rsp: 0,
    host_fsbase: 0,
    host_gsbase: 0,
    host_ds: 0,
    host_es: 0,
    host_fs: 0,
    host_gs: 0,
    host_ss: 0,
    host_fcw: 0,
    host_mxcsr: 0,
    vcpu_tid: 0,
    exit_reason: 0,
    signo: 0,
    si_code: 0,
    trapno: 0,
    err: 0,
    fault_addr: 0,
    syscall_nr: 0,
    syscall_arch: 0,
    seg_dirty: 0,
    hook_fn: 0,
    hook_ctx: 0,
    hook_mxcsr: 0,
    hook_fsbase: 0,
    resume_far: [0; 3],
    _pad: [0; 3],
    hook_xmm: [0; 8],
    xsave: XsaveArea([0; XSAVE_AREA_SIZE]),
};

/// Set by a kick that arrives while the vCPU is not in guest-mode code; the
/// next entry then returns `EXIT_ABORTED` instead of running the guest.
#[no_mangle]
pub static POPEK_KICK_PENDING: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

extern "C" {
    /// Enters guest-mode code with the state in `POPEK_FRAME`; returns an
    /// `EXIT_*` reason with the guest state back in `POPEK_FRAME`.
    fn popek_enter() -> u32;
    fn popek_enter_window();
    fn popek_enter_window_end();
    fn popek_enter_abort();
    fn popek_enter_fault();
    fn popek_exit_callout();
    fn popek_exit_signal();
    fn popek_resume_window();
    fn popek_resume_window_end();
    fn popek_resume_abort();
}

std::thread_local! {
    /// A panic caught in a callout hook, re-raised once the exit path is
    /// back on the monitor's own state.
    static HOOK_PANIC: std::cell::RefCell<Option<Box<dyn std::any::Any + Send>>> =
        const { std::cell::RefCell::new(None) };
}

/// Called by the callout exit path when a hook is set (see [`CalloutHook`]).
extern "C" fn popek_callout_hook() -> u32 {
    // SAFETY: the vCPU thread owns the frame; `enter` wrote both fields
    // from a `CalloutHook` and the context its caller vouched for.
    let (f, ctx) = unsafe {
        let fr = &*std::ptr::addr_of!(POPEK_FRAME);
        (fr.hook_fn, fr.hook_ctx)
    };
    // SAFETY: `hook_fn` is nonzero here (the exit path checked) and was
    // written from a `CalloutHook`.
    let hook: CalloutHook = unsafe { std::mem::transmute::<usize, CalloutHook>(f as usize) };
    // SAFETY: per `enter`'s contract, `ctx` is valid for `hook` now.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { hook(ctx as *mut ()) })) {
        Ok(a) => a as u32,
        Err(p) => {
            HOOK_PANIC.with(|c| *c.borrow_mut() = Some(p));
            HookAction::Done as u32
        }
    }
}

/// Re-raises a panic a callout hook caught (after `enter` returned).
pub(super) fn rethrow_hook_panic() {
    if let Some(p) = HOOK_PANIC.with(|c| c.borrow_mut().take()) {
        std::panic::resume_unwind(p);
    }
}

/// Runs the guest until the next exit, handing callouts to `hook` first.
///
/// # Safety
/// `POPEK_FRAME` must hold a valid guest state: selectors that load (checked
/// by the caller against the LDT it wrote), a valid XSAVE image, and the
/// current thread must have the signal handlers, the alternate signal stack
/// and the seccomp filter installed. With a hook, `ctx` must be valid for it
/// until this returns, and nothing else may use what it points to meanwhile.
pub(super) unsafe fn enter(hook: Option<(CalloutHook, *mut ())>) -> u32 {
    // SAFETY: the vCPU thread owns the frame; no reference to it is live.
    unsafe {
        let f = &mut *std::ptr::addr_of_mut!(POPEK_FRAME);
        (f.hook_fn, f.hook_ctx) = match hook {
            Some((h, ctx)) => (h as usize as u64, ctx as u64),
            None => (0, 0),
        };
        f.seg_dirty = 0;
    }
    // SAFETY: per the function contract.
    let r = unsafe { popek_enter() };
    rethrow_hook_panic();
    r
}

fn addr(f: unsafe extern "C" fn()) -> usize {
    f as *const () as usize
}

/// Whether `rip` is in the entry window (a kick there aborts the entry).
pub(super) fn in_entry_window(rip: u64) -> bool {
    (addr(popek_enter_window)..addr(popek_enter_window_end)).contains(&(rip as usize))
}

/// Whether `rip` is in a hooked resume's window (same rule as entry).
pub(super) fn in_resume_window(rip: u64) -> bool {
    (addr(popek_resume_window)..addr(popek_resume_window_end)).contains(&(rip as usize))
}

/// Where a kick in the resume window goes (the guest FPU state is live
/// there, so this path saves it, unlike the entry abort).
pub(super) fn resume_abort_address() -> u64 {
    addr(popek_resume_abort) as u64
}

/// Address of the 64-bit callout exit path (the exit gate jumps there).
pub(super) fn exit_callout_address() -> u64 {
    addr(popek_exit_callout) as u64
}

/// 64-bit landing points the signal handler redirects to.
pub(super) fn exit_signal_address() -> u64 {
    addr(popek_exit_signal) as u64
}
pub(super) fn enter_abort_address() -> u64 {
    addr(popek_enter_abort) as u64
}
pub(super) fn enter_fault_address() -> u64 {
    addr(popek_enter_fault) as u64
}

global_asm!(
    ".pushsection .text.popek_host,\"ax\",@progbits",
    ".p2align 6",
    ".globl popek_enter",
    "popek_enter:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rip + {f} + {host_rsp}], rsp",
    "rdfsbase rax",
    "mov [rip + {f} + {host_fsbase}], rax",
    "rdgsbase rax",
    "mov [rip + {f} + {host_gsbase}], rax",
    "mov ax, ds",
    "mov [rip + {f} + {host_ds}], ax",
    "mov ax, es",
    "mov [rip + {f} + {host_es}], ax",
    "mov ax, fs",
    "mov [rip + {f} + {host_fs}], ax",
    "mov ax, gs",
    "mov [rip + {f} + {host_gs}], ax",
    "mov ax, ss",
    "mov [rip + {f} + {host_ss}], ax",
    "stmxcsr [rip + {f} + {host_mxcsr}]",
    "fnstcw [rip + {f} + {host_fcw}]",
    // The guest's x87/SSE state (XSAVE_MASK).
    "mov eax, {xmask}",
    "xor edx, edx",
    "xrstor64 [rip + {f} + {xsave}]",
    // IRET frame: SS, RSP, RFLAGS, CS, RIP. IRETQ switches to compatibility
    // mode and loads CS, EIP, EFLAGS (TF included: a single step traps after
    // the first guest instruction, as on hardware) and SS:ESP at once.
    "movzx eax, word ptr [rip + {f} + {ss}]",
    "push rax",
    "mov eax, [rip + {f} + {esp}]",
    "push rax",
    "mov eax, [rip + {f} + {eflags}]",
    "push rax",
    "movzx eax, word ptr [rip + {f} + {cs}]",
    "push rax",
    "mov eax, [rip + {f} + {eip}]",
    "push rax",
    ".globl popek_enter_window",
    "popek_enter_window:",
    "mov ax, [rip + {f} + {ds}]",
    "mov ds, ax",
    "mov ax, [rip + {f} + {es}]",
    "mov es, ax",
    "mov ax, [rip + {f} + {fs}]",
    "mov fs, ax",
    "mov ax, [rip + {f} + {gs}]",
    "mov gs, ax",
    "mov eax, [rip + {f} + {eax}]",
    "mov ecx, [rip + {f} + {ecx}]",
    "mov edx, [rip + {f} + {edx}]",
    "mov ebx, [rip + {f} + {ebx}]",
    "mov ebp, [rip + {f} + {ebp}]",
    "mov esi, [rip + {f} + {esi}]",
    "mov edi, [rip + {f} + {edi}]",
    // Last look for a kick; one arriving after this is redirected to the
    // abort path by the signal handler (the RIP is still in the window).
    "cmp byte ptr [rip + {kick}], 0",
    "jne popek_enter_abort",
    "iretq",
    ".globl popek_enter_window_end",
    "popek_enter_window_end:",
    // Entry aborted by a kick: the guest did not run; the frame is intact.
    ".globl popek_enter_abort",
    "popek_enter_abort:",
    "mov rsp, [rip + {f} + {host_rsp}]",
    "mov byte ptr [rip + {kick}], 0",
    "mov dword ptr [rip + {f} + {exit_reason}], {aborted}",
    "jmp 2f",
    // Entry faulted (the handler filled in the signal details).
    ".globl popek_enter_fault",
    "popek_enter_fault:",
    "mov rsp, [rip + {f} + {host_rsp}]",
    "mov dword ptr [rip + {f} + {exit_reason}], {entry_fault}",
    "jmp 2f",
    // Callout: the exit gate jumped here in 64-bit mode with every guest
    // register live and the guest's stack pointer in RSP.
    ".p2align 4",
    ".globl popek_exit_callout",
    "popek_exit_callout:",
    "mov [rip + {f} + {eax}], eax",
    "mov [rip + {f} + {ecx}], ecx",
    "mov [rip + {f} + {edx}], edx",
    "mov [rip + {f} + {ebx}], ebx",
    "mov [rip + {f} + {esp}], esp",
    "mov [rip + {f} + {ebp}], ebp",
    "mov [rip + {f} + {esi}], esi",
    "mov [rip + {f} + {edi}], edi",
    "mov rsp, [rip + {f} + {host_rsp}]",
    "pushfq",
    "pop rax",
    "mov [rip + {f} + {eflags}], eax",
    // Guest AC, DF, TF, NT or ID must not leak into monitor code (POPFQ
    // only when one is set: it is the slowest instruction here). After
    // this, those flags are clear, which the hooked resume relies on.
    "test eax, {special_flags}",
    "jz 4f",
    "push 0x202",
    "popfq",
    "4:",
    "mov ax, ss",
    "mov [rip + {f} + {ss}], ax",
    "mov ax, ds",
    "mov [rip + {f} + {ds}], ax",
    "mov ax, es",
    "mov [rip + {f} + {es}], ax",
    "mov ax, fs",
    "mov [rip + {f} + {fs}], ax",
    "mov ax, gs",
    "mov [rip + {f} + {gs}], ax",
    "mov dword ptr [rip + {f} + {exit_reason}], {callout}",
    "cmp qword ptr [rip + {f} + {hook_fn}], 0",
    "je 1f",
    // The hook: monitor code with the host FS base (thread-locals), the
    // guest's SSE registers set aside, on the monitor stack (16-aligned).
    "rdfsbase rax",
    "mov [rip + {f} + {hook_fsbase}], rax",
    "mov rax, [rip + {f} + {host_fsbase}]",
    "wrfsbase rax",
    "movups [rip + {f} + {hook_xmm}], xmm0",
    "movups [rip + {f} + {hook_xmm} + 16], xmm1",
    "movups [rip + {f} + {hook_xmm} + 32], xmm2",
    "movups [rip + {f} + {hook_xmm} + 48], xmm3",
    "movups [rip + {f} + {hook_xmm} + 64], xmm4",
    "movups [rip + {f} + {hook_xmm} + 80], xmm5",
    "movups [rip + {f} + {hook_xmm} + 96], xmm6",
    "movups [rip + {f} + {hook_xmm} + 112], xmm7",
    "stmxcsr [rip + {f} + {hook_mxcsr}]",
    "ldmxcsr [rip + {f} + {host_mxcsr}]",
    "sub rsp, 8",
    "call {hook}",
    "add rsp, 8",
    "ldmxcsr [rip + {f} + {hook_mxcsr}]",
    "movups xmm0, [rip + {f} + {hook_xmm}]",
    "movups xmm1, [rip + {f} + {hook_xmm} + 16]",
    "movups xmm2, [rip + {f} + {hook_xmm} + 32]",
    "movups xmm3, [rip + {f} + {hook_xmm} + 48]",
    "movups xmm4, [rip + {f} + {hook_xmm} + 64]",
    "movups xmm5, [rip + {f} + {hook_xmm} + 80]",
    "movups xmm6, [rip + {f} + {hook_xmm} + 96]",
    "movups xmm7, [rip + {f} + {hook_xmm} + 112]",
    "cmp eax, {resume}",
    "je popek_resume_window",
    "cmp eax, {done}",
    "jne 1f",
    "mov dword ptr [rip + {f} + {exit_reason}], {hooked}",
    "jmp 1f",
    // Hooked resume: back into guest-mode code at the frame's state with a
    // far jump (no XRSTOR, no IRETQ). A kick here is redirected to
    // `popek_resume_abort`, as in the entry window; one that came between
    // the hook's last look and this window is caught by the first compare.
    ".globl popek_resume_window",
    "popek_resume_window:",
    "cmp byte ptr [rip + {kick}], 0",
    "jne popek_resume_abort",
    // Segment registers only when a selector or the LDT changed; else only
    // the FS base the hook replaced. (A kick before this point may have
    // put the host's FS and GS bases back, but then the kick is pending
    // and the compare above left.)
    "cmp dword ptr [rip + {f} + {seg_dirty}], 0",
    "je 3f",
    "mov ax, [rip + {f} + {ss}]",
    "mov ss, ax",
    "mov ax, [rip + {f} + {ds}]",
    "mov ds, ax",
    "mov ax, [rip + {f} + {es}]",
    "mov es, ax",
    "mov ax, [rip + {f} + {fs}]",
    "mov fs, ax",
    "mov ax, [rip + {f} + {gs}]",
    "mov gs, ax",
    "jmp 5f",
    "3:",
    "mov rax, [rip + {f} + {hook_fsbase}]",
    "wrfsbase rax",
    "5:",
    "mov eax, [rip + {f} + {eip}]",
    "mov [rip + {f} + {resume_far}], eax",
    "mov ax, [rip + {f} + {cs}]",
    "mov [rip + {f} + {resume_far} + 4], ax",
    // EFLAGS: POPFQ only when the guest has one of the special flags set;
    // else OF by an 8-bit add (1 + 0x7f overflows, 0 + 0x7f does not) and
    // SF, ZF, AF, PF, CF by SAHF (the special flags are clear here, see
    // the exit path).
    "mov eax, [rip + {f} + {eflags}]",
    "test eax, {special_flags}",
    "jz 6f",
    "push rax",
    "popfq",
    "jmp 7f",
    "6:",
    "mov ecx, eax",
    "shr ecx, 11",
    "and ecx, 1",
    "add cl, 0x7f",
    "mov ah, al",
    "sahf",
    "7:",
    "mov ecx, [rip + {f} + {ecx}]",
    "mov edx, [rip + {f} + {edx}]",
    "mov ebx, [rip + {f} + {ebx}]",
    "mov ebp, [rip + {f} + {ebp}]",
    "mov esi, [rip + {f} + {esi}]",
    "mov edi, [rip + {f} + {edi}]",
    "mov eax, [rip + {f} + {eax}]",
    "mov esp, [rip + {f} + {esp}]",
    "jmp fword ptr [rip + {f} + {resume_far}]",
    ".globl popek_resume_window_end",
    "popek_resume_window_end:",
    // A kick in the resume window: the guest did not run again; its FPU
    // state is in the registers, so save it (label 1).
    ".globl popek_resume_abort",
    "popek_resume_abort:",
    "mov rsp, [rip + {f} + {host_rsp}]",
    "mov byte ptr [rip + {kick}], 0",
    "mov dword ptr [rip + {f} + {exit_reason}], {aborted}",
    "jmp 1f",
    // Signal exit: the handler saved the guest registers and pointed RIP
    // here with RSP = host_rsp; the guest's FPU state is live again.
    ".globl popek_exit_signal",
    "popek_exit_signal:",
    "1:",
    "mov eax, {xmask}",
    "xor edx, edx",
    "xsave64 [rip + {f} + {xsave}]",
    "2:",
    // Host FPU control state back (the guest's registers stay saved).
    "fninit",
    "fldcw [rip + {f} + {host_fcw}]",
    "ldmxcsr [rip + {f} + {host_mxcsr}]",
    "mov ax, [rip + {f} + {host_ss}]",
    "mov ss, ax",
    "mov ax, [rip + {f} + {host_ds}]",
    "mov ds, ax",
    "mov ax, [rip + {f} + {host_es}]",
    "mov es, ax",
    "mov ax, [rip + {f} + {host_fs}]",
    "mov fs, ax",
    "mov rax, [rip + {f} + {host_fsbase}]",
    "wrfsbase rax",
    "mov ax, [rip + {f} + {host_gs}]",
    "mov gs, ax",
    "mov rax, [rip + {f} + {host_gsbase}]",
    "wrgsbase rax",
    ".globl popek_exit_path_end",
    "popek_exit_path_end:",
    "mov eax, [rip + {f} + {exit_reason}]",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    ".popsection",
    f = sym POPEK_FRAME,
    kick = sym POPEK_KICK_PENDING,
    host_rsp = const offset_of!(Frame, host_rsp),
    host_fsbase = const offset_of!(Frame, host_fsbase),
    host_gsbase = const offset_of!(Frame, host_gsbase),
    host_ds = const offset_of!(Frame, host_ds),
    host_es = const offset_of!(Frame, host_es),
    host_fs = const offset_of!(Frame, host_fs),
    host_gs = const offset_of!(Frame, host_gs),
    host_ss = const offset_of!(Frame, host_ss),
    host_mxcsr = const offset_of!(Frame, host_mxcsr),
    host_fcw = const offset_of!(Frame, host_fcw),
    xsave = const offset_of!(Frame, xsave),
    xmask = const XSAVE_MASK,
    ss = const offset_of!(Frame, ss),
    cs = const offset_of!(Frame, cs),
    ds = const offset_of!(Frame, ds),
    es = const offset_of!(Frame, es),
    fs = const offset_of!(Frame, fs),
    gs = const offset_of!(Frame, gs),
    eip = const offset_of!(Frame, eip),
    eflags = const offset_of!(Frame, eflags),
    eax = const offset_of!(Frame, gpr) + 4 * reg::EAX,
    ecx = const offset_of!(Frame, gpr) + 4 * reg::ECX,
    edx = const offset_of!(Frame, gpr) + 4 * reg::EDX,
    ebx = const offset_of!(Frame, gpr) + 4 * reg::EBX,
    esp = const offset_of!(Frame, gpr) + 4 * reg::ESP,
    ebp = const offset_of!(Frame, gpr) + 4 * reg::EBP,
    esi = const offset_of!(Frame, gpr) + 4 * reg::ESI,
    edi = const offset_of!(Frame, gpr) + 4 * reg::EDI,
    exit_reason = const offset_of!(Frame, exit_reason),
    aborted = const EXIT_ABORTED,
    entry_fault = const EXIT_ENTRY_FAULT,
    callout = const EXIT_CALLOUT,
    hooked = const EXIT_HOOKED,
    resume = const HookAction::Resume as u32,
    done = const HookAction::Done as u32,
    hook = sym popek_callout_hook,
    hook_fn = const offset_of!(Frame, hook_fn),
    hook_xmm = const offset_of!(Frame, hook_xmm),
    hook_mxcsr = const offset_of!(Frame, hook_mxcsr),
    hook_fsbase = const offset_of!(Frame, hook_fsbase),
    special_flags = const SPECIAL_FLAGS,
    seg_dirty = const offset_of!(Frame, seg_dirty),
    resume_far = const offset_of!(Frame, resume_far),
);

/// A compat-mode function entered by a bare far call, with no monitor state
/// around it: the baseline "native" figure of the host benchmark. The guest
/// code must end with `retf`. Returns EAX.
///
/// # Safety
/// `eip` must be 32-bit code mapped executable in the window that returns
/// with `retf` without faulting, using the stack below `esp` (mapped
/// writable, at least 16 bytes), with CS = `cs`.
pub unsafe fn bare_far_call(window: &super::Window, eip: u32, esp: u32, cs: u16, ecx: u32) -> u32 {
    // Trampoline: call far [rip+0x0a] (to eip:cs); ret (64-bit, to our caller).
    use engine::vmm_area::{BARE_TRAMPOLINE, BARE_TRAMPOLINE_LEN};
    let mut t = [0u8; BARE_TRAMPOLINE_LEN as usize];
    t[..7].copy_from_slice(&[0xFF, 0x1D, 0x0A, 0, 0, 0, 0xC3]);
    t[0x10..0x14].copy_from_slice(&eip.to_le_bytes());
    t[0x14..0x16].copy_from_slice(&cs.to_le_bytes());
    // The trampoline bytes are disjoint from the exit gate (vmm_area asserts it).
    window.vmm_alias().write(BARE_TRAMPOLINE as usize, &t);
    let tramp = u64::from(window.vmm_base() + BARE_TRAMPOLINE);
    let out: u32;
    // SAFETY: per the function contract; RSP is kept in R12 (declared
    // clobbered), RBX and RBP are pushed and popped around the call, every
    // operand is read before RSP changes, and the near call pushes the
    // return address on the guest stack, where the trampoline's `ret` finds
    // it after the guest's `retf`.
    unsafe {
        std::arch::asm!(
            "push rbx",
            "push rbp",
            "mov r12, rsp",
            "mov eax, 0x2b",
            "mov ds, eax",
            "mov es, eax",
            "mov esp, {esp:e}",
            "call {tramp}",
            "mov rsp, r12",
            "pop rbp",
            "pop rbx",
            tramp = in(reg) tramp,
            esp = in(reg) esp,
            inout("ecx") ecx => _,
            out("eax") out,
            out("edx") _, out("esi") _, out("edi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _, out("r12") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
        );
    }
    out
}
