//! Host signals: how guest traps, system calls and kicks come back to the
//! monitor.
//!
//! One process-wide handler serves SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP,
//! SIGSYS and the kick signal. It decides by the interrupted context:
//! - compatibility-mode code (CS is not the host's 64-bit selector) is guest
//!   code: copy its state from the `ucontext` into the frame and return into
//!   `popek_exit_signal` on the monitor stack (sigreturn does the mode switch);
//! - the entry window: a kick aborts the entry, anything else is an entry
//!   fault (bad selector, no compatibility mode);
//! - anywhere else a kick is remembered for the next entry, and any other
//!   signal is a fault of the monitor itself, which must crash loudly.
//!
//! The handler runs on an alternate stack (guest-mode code has the guest's
//! stack pointer) and with the guest's FS base: it restores the host FS/GS
//! base before any code that could touch a thread-local.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use super::entry::{self, POPEK_FRAME, POPEK_KICK_PENDING};
use super::ldt::{HOST_CS64, HOST_DS};
use super::HostError;

/// The signal another thread sends to stop a running vCPU.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

const HANDLED: [libc::c_int; 6] =
    [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGTRAP, libc::SIGSYS];

/// The monitor's own 64-bit code below 4 GiB (the exit-gate page of the VMM
/// area, read-only to guest code), packed as `start | end << 32`: 64-bit
/// code elsewhere below 4 GiB is guest code that reached the host's 64-bit
/// selector.
static MONITOR_LOW_CODE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Declares `range` (below 4 GiB) as the monitor's own 64-bit code.
pub(super) fn set_monitor_code_below_4g(range: std::ops::Range<u32>) {
    MONITOR_LOW_CODE.store(u64::from(range.start) | u64::from(range.end) << 32, Ordering::Release);
}

fn is_monitor_code_below_4g(rip: u64) -> bool {
    let r = MONITOR_LOW_CODE.load(Ordering::Acquire);
    ((r & 0xFFFF_FFFF)..(r >> 32)).contains(&rip)
}

/// Previous handlers, restored for faults that are not ours (Rust's stack
/// overflow reporter lives there).
static mut OLD_ACTIONS: [Option<libc::sigaction>; 6] = [None; 6];
static INSTALLED: OnceLock<Result<(), HostError>> = OnceLock::new();

/// Installs the handlers once per process.
pub fn install() -> Result<(), HostError> {
    INSTALLED.get_or_init(install_once).clone()
}

fn install_once() -> Result<(), HostError> {
    // SAFETY: plain sigaction calls with a zeroed, then filled struct; the
    // handler is an `extern "C"` function with the SA_SIGINFO signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        for s in HANDLED.iter().chain(std::iter::once(&kick_signal())) {
            libc::sigaddset(&mut sa.sa_mask, *s);
        }
        for (i, &sig) in HANDLED.iter().enumerate() {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, &sa, &mut old) != 0 {
                return Err(HostError::Syscall { what: "sigaction", errno: nix::Error::last() });
            }
            (*std::ptr::addr_of_mut!(OLD_ACTIONS))[i] = Some(old);
        }
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(HostError::Syscall { what: "sigaction(kick)", errno: nix::Error::last() });
        }
    }
    Ok(())
}

thread_local! {
    static ALTSTACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Gives the calling thread an alternate signal stack (once per thread; the
/// stack is leaked on purpose: it must outlive any signal on this thread).
pub fn ensure_altstack() -> Result<(), HostError> {
    if ALTSTACK.with(|a| a.get()) {
        return Ok(());
    }
    const SIZE: usize = 256 * 1024;
    let mem: &'static mut [u8] = Box::leak(vec![0u8; SIZE].into_boxed_slice());
    let ss = libc::stack_t { ss_sp: mem.as_mut_ptr().cast(), ss_flags: 0, ss_size: SIZE };
    // SAFETY: `ss` describes a leaked buffer that lives forever.
    if unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) } != 0 {
        return Err(HostError::Syscall { what: "sigaltstack", errno: nix::Error::last() });
    }
    ALTSTACK.with(|a| a.set(true));
    Ok(())
}

/// Writes a message to stderr with nothing but a raw `write` (signal-safe).
fn raw_stderr(parts: &[&[u8]]) {
    for p in parts {
        // SAFETY: writing a valid byte slice to fd 2.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
}

pub(crate) fn hex(mut v: u64, buf: &mut [u8; 18]) -> &[u8] {
    buf[0] = b'0';
    buf[1] = b'x';
    for i in (2..18).rev() {
        buf[i] = b"0123456789abcdef"[(v & 0xf) as usize];
        v >>= 4;
    }
    &buf[..]
}

/// A fault in the monitor's own code: never handled as a guest fault. Hand
/// it to the previous handler (Rust's stack-overflow report) or the default
/// action, which kills the process with a core dump.
fn monitor_fault(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void, rip: u64) {
    let mut b = [0u8; 18];
    raw_stderr(&[b"popek: fault in the monitor itself at rip=", hex(rip, &mut b), b"\n"]);
    let idx = HANDLED.iter().position(|&s| s == sig);
    // SAFETY: OLD_ACTIONS is written once at install time, before any
    // handler can run; reading it here races with nothing.
    let old = idx.and_then(|i| unsafe { (*std::ptr::addr_of!(OLD_ACTIONS))[i] });
    if let Some(old) = old {
        if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO,
                // so it has this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig, info, uc);
            } else {
                // SAFETY: a plain handler takes the signal number.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig);
            }
            return;
        }
    }
    // SAFETY: resetting to the default action; returning re-executes the
    // faulting instruction, which then kills the process.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}

/// Field offsets of the SIGSYS part of `siginfo_t` (asm-generic/siginfo.h).
const SI_CALL_ADDR_OFFSET: usize = 16;
const SI_SYSCALL_OFFSET: usize = 24;
const SI_ARCH_OFFSET: usize = 28;

/// Copies the interrupted guest state (registers, selectors, signal
/// details) into the frame and makes sigreturn land on the signal exit.
fn leave_guest(
    f: &mut entry::Frame,
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: &mut libc::ucontext_t,
    rip: u64,
    csgsfs: u64,
) {
    let g = &mut uc.uc_mcontext.gregs;
    for (i, r) in [
        libc::REG_RAX,
        libc::REG_RCX,
        libc::REG_RDX,
        libc::REG_RBX,
        libc::REG_RSP,
        libc::REG_RBP,
        libc::REG_RSI,
        libc::REG_RDI,
    ]
    .into_iter()
    .enumerate()
    {
        f.gpr[i] = g[r as usize] as u32;
    }
    f.eip = rip as u32;
    f.eflags = g[libc::REG_EFL as usize] as u32;
    f.cs = (csgsfs & 0xffff) as u16;
    f.ss = (csgsfs >> 48) as u16;
    let (ds, es, fsel, gsel): (u16, u16, u16, u16);
    // SAFETY: reading segment selectors has no side effects; the signal
    // delivery left the interrupted code's DS/ES/FS/GS loaded.
    unsafe {
        std::arch::asm!("mov {0:x}, ds", "mov {1:x}, es", "mov {2:x}, fs", "mov {3:x}, gs",
            out(reg) ds, out(reg) es, out(reg) fsel, out(reg) gsel)
    };
    (f.ds, f.es, f.fs, f.gs) = (ds, es, fsel, gsel);
    f.signo = sig;
    // SAFETY: `info` is valid for SA_SIGINFO handlers.
    let inf = unsafe { &*info };
    f.si_code = inf.si_code;
    f.trapno = g[libc::REG_TRAPNO as usize] as u32;
    f.err = g[libc::REG_ERR as usize] as u32;
    // SAFETY: si_addr is meaningful for SIGSEGV/SIGBUS/SIGILL/SIGFPE/SIGTRAP
    // and harmless to read for the others.
    f.fault_addr = unsafe { inf.si_addr() } as u64;
    if sig == libc::SIGSYS {
        let (nr, addr, arch) = sigsys_details(info);
        f.syscall_nr = nr;
        f.fault_addr = addr;
        f.syscall_arch = arch;
    }
    if sig == kick_signal() {
        POPEK_KICK_PENDING.store(0, Ordering::Relaxed);
    }
    f.exit_reason = entry::EXIT_SIGNAL;
    redirect(g, entry::exit_signal_address(), Some(f.host_rsp));
    uc.uc_flags |= UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS;
}

/// SIGSYS: the call number, the instruction pointer after the call, and
/// the call's audit architecture.
fn sigsys_details(info: *const libc::siginfo_t) -> (i32, u64, u32) {
    // SAFETY: for SIGSYS the union holds call_addr, syscall, arch (the
    // handler only calls this for SIGSYS).
    unsafe {
        let base = info as *const u8;
        (
            *base.add(SI_SYSCALL_OFFSET).cast::<i32>(),
            *base.add(SI_CALL_ADDR_OFFSET).cast::<u64>(),
            *base.add(SI_ARCH_OFFSET).cast::<u32>(),
        )
    }
}

extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // First: no guest AC, DF or NT in monitor code, and the host FS/GS base
    // back if the guest's is loaded on the vCPU thread. Nothing before this
    // may touch a thread-local. NT matters beyond the handler: sigreturn
    // restores only the "fixable" flags from the context, so a guest's NT
    // inherited here would survive into the monitor, whose next IRETQ into
    // guest code is then #GP (found by `popek fuzz cpl3`).
    // SAFETY: clearing DF, AC and NT in RFLAGS is harmless for any 64-bit code.
    unsafe { std::arch::asm!("cld", "pushfq", "btr qword ptr [rsp], 18", "btr qword ptr [rsp], 14", "popfq") };
    let frame = std::ptr::addr_of_mut!(POPEK_FRAME);
    // SAFETY: the frame is a static; the fields read here are written by the
    // vCPU thread before it enters guest code.
    let (host_fs, host_gs, vcpu_tid) = unsafe { ((*frame).host_fsbase, (*frame).host_gsbase, (*frame).vcpu_tid) };
    let fs: u64;
    // SAFETY: FSGSBASE is enabled for user mode on hosts that pass the
    // start-up check (`Vcpu::new` tests it before installing handlers).
    unsafe { std::arch::asm!("rdfsbase {}", out(reg) fs) };
    // SAFETY: gettid has no side effects and does not touch errno on success.
    if fs != host_fs && host_fs != 0 && unsafe { libc::gettid() } == vcpu_tid {
        // SAFETY: restoring the vCPU thread's own FS/GS bases.
        unsafe { std::arch::asm!("wrfsbase {}", "wrgsbase {}", in(reg) host_fs, in(reg) host_gs) };
    }

    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers.
    let uc = unsafe { &mut *(uc as *mut libc::ucontext_t) };
    let g = &mut uc.uc_mcontext.gregs;
    let rip = g[libc::REG_RIP as usize] as u64;
    let csgsfs = g[libc::REG_CSGSFS as usize] as u64;
    let cs = (csgsfs & 0xffff) as u16;
    let kick = sig == kick_signal();

    if cs != HOST_CS64 {
        // Guest-mode code was running (only the vCPU thread runs it).
        // SAFETY: the vCPU thread owns the frame while in guest code; this
        // handler runs on that thread.
        leave_guest(unsafe { &mut *frame }, sig, info, uc, rip, csgsfs);
        return;
    }
    // 64-bit code below 4 GiB: nothing of the monitor is there, so guest
    // code far-transferred to the host's 64-bit selector (0x33). Stop the
    // VM: the exit decodes it as an escape (and the vCPU guard kept any
    // system call it made from running).
    // SAFETY: gettid has no side effects.
    if rip < 1 << 32 && !is_monitor_code_below_4g(rip) && vcpu_tid != 0 && unsafe { libc::gettid() } == vcpu_tid {
        // SAFETY: as above: the vCPU thread, which owns the frame.
        leave_guest(unsafe { &mut *frame }, sig, info, uc, rip, csgsfs);
        return;
    }

    let resuming = entry::in_resume_window(rip);
    if resuming || entry::in_entry_window(rip) {
        if kick {
            let to = if resuming { entry::resume_abort_address() } else { entry::enter_abort_address() };
            redirect(g, to, None);
        } else {
            // SAFETY: as above: this is the vCPU thread, mid-entry.
            let f = unsafe { &mut *frame };
            f.signo = sig;
            f.trapno = g[libc::REG_TRAPNO as usize] as u32;
            f.err = g[libc::REG_ERR as usize] as u32;
            redirect(g, entry::enter_fault_address(), None);
        }
        return;
    }
    if kick {
        // Not in guest code: the next entry returns at once.
        POPEK_KICK_PENDING.store(1, Ordering::SeqCst);
        return;
    }
    if super::cpuid_fault::serve_monitor_cpuid(sig, g) {
        return;
    }
    if sig == libc::SIGSYS {
        // The jail refused a call made by 64-bit code outside the window.
        let (nr, addr, arch) = sigsys_details(info);
        crate::jail::refused(nr, arch, addr);
    }
    monitor_fault(sig, info, uc as *mut libc::ucontext_t as *mut libc::c_void, rip);
}

const UC_SIGCONTEXT_SS: libc::c_ulong = 0x2;
const UC_STRICT_RESTORE_SS: libc::c_ulong = 0x4;

/// Makes sigreturn land in 64-bit monitor code at `rip`.
fn redirect(g: &mut [libc::greg_t; 23], rip: u64, rsp: Option<u64>) {
    g[libc::REG_RIP as usize] = rip as i64;
    let csgsfs = g[libc::REG_CSGSFS as usize] as u64;
    let csgsfs = (csgsfs & 0x0000_ffff_ffff_0000) | u64::from(HOST_CS64) | (u64::from(HOST_DS) << 48);
    g[libc::REG_CSGSFS as usize] = csgsfs as i64;
    if let Some(rsp) = rsp {
        g[libc::REG_RSP as usize] = rsp as i64;
    }
    // IF only: no guest TF, AC or DF in monitor code.
    g[libc::REG_EFL as usize] = 0x202;
}

/// Sends the kick signal to thread `tid` of this process.
pub fn kick_thread(tid: libc::pid_t) -> Result<(), HostError> {
    // SAFETY: tgkill with our own pid and a thread id of this process.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, kick_signal()) };
    if r != 0 {
        return Err(HostError::Syscall { what: "tgkill(kick)", errno: nix::Error::last() });
    }
    Ok(())
}

/// A POSIX timer that sends the kick signal to one thread of this process
/// when it expires: the run loop's timer deadlines without a thread of
/// their own. A ticker thread woke every 0.2-2 ms on the other CPU, which
/// kept our address space live there, and every `mmap`, `munmap`,
/// `mprotect` and `modify_ldt` of the shadow MMU then waited for an IPI
/// to it (docs/benchmarks.md).
pub struct KickTimer {
    id: libc::timer_t,
}

impl KickTimer {
    /// A disarmed timer that kicks thread `tid`.
    pub fn new(tid: libc::pid_t) -> Result<KickTimer, HostError> {
        // SAFETY: a zeroed sigevent is a valid value of the C struct; the
        // fields set below are the ones SIGEV_THREAD_ID reads.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = kick_signal();
        sev.sigev_notify_thread_id = tid;
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: both pointers are to live locals; the kernel writes `id`.
        let r = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) };
        if r != 0 {
            return Err(HostError::Syscall { what: "timer_create(kick)", errno: nix::Error::last() });
        }
        Ok(KickTimer { id })
    }

    /// Kicks once, `after_ns` from now (a deadline already passed kicks at
    /// once); `None` disarms.
    pub fn set(&self, after_ns: Option<u64>) -> Result<(), HostError> {
        let ns = after_ns.map_or(0, |n| n.max(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as _,
            },
        };
        // SAFETY: `id` is this object's timer; `spec` lives across the call.
        let r = unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) };
        if r != 0 {
            return Err(HostError::Syscall { what: "timer_settime(kick)", errno: nix::Error::last() });
        }
        Ok(())
    }
}

impl Drop for KickTimer {
    fn drop(&mut self) {
        // SAFETY: `id` came from timer_create and is deleted once.
        unsafe { libc::timer_delete(self.id) };
    }
}
