//! The guest must never talk to the host kernel: a user-mode `int 0x80`,
//! `sysenter` or `syscall` in compatibility mode is a host 32-bit system
//! call. A seccomp filter on the vCPU thread turns every system call whose
//! architecture is i386 into SIGSYS (the call is not executed), which the
//! signal handler reports as a system-call exit. The monitor itself only
//! makes x86-64 system calls, which the filter allows.
//!
//! The filter is inherited by threads and processes the vCPU thread
//! creates: an i386 program started from it dies of SIGSYS. Start such
//! helpers (e.g. a native benchmark run) from another thread.

use std::cell::Cell;

use super::HostError;

const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// `offsetof(struct seccomp_data, arch)`.
const ARCH_OFFSET: u32 = 4;

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

thread_local! {
    static INSTALLED: Cell<bool> = const { Cell::new(false) };
}

/// Installs the filter on the calling thread (once; filters stack, so a
/// second copy would only slow every system call down).
pub fn install_on_current_thread() -> Result<(), HostError> {
    if INSTALLED.with(Cell::get) {
        return Ok(());
    }
    let filter = [
        libc::sock_filter { code: BPF_LD_W_ABS, jt: 0, jf: 0, k: ARCH_OFFSET },
        libc::sock_filter { code: BPF_JEQ_K, jt: 0, jf: 1, k: AUDIT_ARCH_I386 },
        libc::sock_filter { code: BPF_RET_K, jt: 0, jf: 0, k: libc::SECCOMP_RET_TRAP },
        libc::sock_filter { code: BPF_RET_K, jt: 0, jf: 0, k: libc::SECCOMP_RET_ALLOW },
    ];
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut libc::sock_filter };
    // SAFETY: prctl with integer arguments; NO_NEW_PRIVS only forbids
    // privilege gains through execve for this thread's descendants.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(HostError::Seccomp(nix::Error::last()));
    }
    // SAFETY: `prog` points at a valid filter that outlives the call (the
    // kernel copies it). Without SECCOMP_FILTER_FLAG_TSYNC the filter applies
    // to this thread only.
    let r =
        unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog as *const libc::sock_fprog) };
    if r != 0 {
        return Err(HostError::Seccomp(nix::Error::last()));
    }
    INSTALLED.with(|c| c.set(true));
    Ok(())
}
