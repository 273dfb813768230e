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

/// Size reserved for the XSAVE image of the guest's extended state.
pub const XSAVE_AREA_SIZE: usize = 8192;

/// Why `popek_enter` returned.
pub const EXIT_SIGNAL: u32 = 1;
pub const EXIT_CALLOUT: u32 = 2;
/// A kick arrived between the last check and the jump into the guest: the
/// guest did not run.
pub const EXIT_ABORTED: u32 = 3;
/// A signal other than a kick arrived while entering (bad selector, no
/// compatibility mode): the guest did not run.
pub const EXIT_ENTRY_FAULT: u32 = 4;

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
    pub _pad: [u32; 2],
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
    _pad: [0; 2],
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
}

/// Runs the guest until the next exit.
///
/// # Safety
/// `POPEK_FRAME` must hold a valid guest state: selectors that load (checked
/// by the caller against the LDT it wrote), a valid XSAVE image, and the
/// current thread must have the signal handlers, the alternate signal stack
/// and the seccomp filter installed.
pub(super) unsafe fn enter() -> u32 {
    // SAFETY: per the function contract.
    unsafe { popek_enter() }
}

fn addr(f: unsafe extern "C" fn()) -> usize {
    f as *const () as usize
}

/// Whether `rip` is in the entry window (a kick there aborts the entry).
pub(super) fn in_entry_window(rip: u64) -> bool {
    (addr(popek_enter_window)..addr(popek_enter_window_end)).contains(&(rip as usize))
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
    // Guest AC or DF must not leak into monitor code.
    "push 0x202",
    "popfq",
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
