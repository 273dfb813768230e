//! The jail's allow-list: every host system call a running VM may make,
//! with the argument checks that matter. This file is the whole policy:
//! read it to audit what a guest that took over the monitor could do.
//!
//! What is *not* here, on purpose: open/openat/creat, execve/execveat,
//! fork/vfork, socket and every network call, ptrace, process_vm_readv/
//! writev, kill, mount, chroot, setuid & co, bpf, perf_event_open,
//! userfaultfd, io_uring. Everything a run needs from the file system
//! (images, initrd, disks, traces, /dev/kvm) is opened before the jail
//! closes; the descriptors stay.
//!
//! Calls not listed trap: the SIGSYS handler names the call and stops the
//! process with [`super::EXIT_JAIL_REFUSED`]. An x86-64 call made from
//! below 4 GiB (guest code that switched to 64-bit mode) and every i386
//! call trap too, before the table is consulted: see
//! [`crate::host::seccomp`].

use crate::host::seccomp::{Action, Check, Rule};

/// Which backend the jailed process runs: their needs differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Binary translation: guest code runs in this process, from the window.
    Bt,
    /// /dev/kvm: guest code never runs in this process.
    Kvm,
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
const MAP_FIXED: u64 = libc::MAP_FIXED as u64;

/// The thread flags glibc's `pthread_create` passes to `clone`; anything
/// else (a new process, new namespaces) is refused.
pub const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

/// Terminal ioctls: the console's raw mode is restored when the run ends.
const TERMINAL_IOCTLS: &[&[Check]] = &[
    &[Check::Eq(1, libc::TCGETS)],
    &[Check::Eq(1, libc::TCSETS)],
    &[Check::Eq(1, libc::TCSETSW)],
    &[Check::Eq(1, libc::TCSETSF)],
    &[Check::Eq(1, libc::TIOCGWINSZ)],
];

const KVMIO: u64 = 0xAE;
const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
use std::mem::size_of;

/// The vCPU ioctls the kvm backend makes while running (VM and vCPU
/// creation happen before the jail).
pub const KVM_RUN: u64 = io(0x80);
pub const KVM_IOCTLS: &[&[Check]] = &[
    &[Check::Eq(1, KVM_RUN)],
    &[Check::Eq(1, ior(0x81, size_of::<kvm_bindings::kvm_regs>()))],
    &[Check::Eq(1, iow(0x82, size_of::<kvm_bindings::kvm_regs>()))],
    &[Check::Eq(1, ior(0x83, size_of::<kvm_bindings::kvm_sregs>()))],
    &[Check::Eq(1, iow(0x84, size_of::<kvm_bindings::kvm_sregs>()))],
    &[Check::Eq(1, iow(0x86, size_of::<kvm_bindings::kvm_interrupt>()))],
    &[Check::Eq(1, iowr(0x88, size_of::<kvm_bindings::kvm_msrs>()))],
    &[Check::Eq(1, iow(0x89, size_of::<kvm_bindings::kvm_msrs>()))],
    &[Check::Eq(1, ior(0x8c, size_of::<kvm_bindings::kvm_fpu>()))],
    &[Check::Eq(1, iow(0x8d, size_of::<kvm_bindings::kvm_fpu>()))],
    &[Check::Eq(1, ior(0x9f, size_of::<kvm_bindings::kvm_vcpu_events>()))],
    &[Check::Eq(1, iow(0xa0, size_of::<kvm_bindings::kvm_vcpu_events>()))],
    &[Check::Eq(1, ior(0xa1, size_of::<kvm_bindings::kvm_debugregs>()))],
    &[Check::Eq(1, iow(0xa2, size_of::<kvm_bindings::kvm_debugregs>()))],
    &[Check::Eq(1, iowr(0x85, size_of::<kvm_bindings::kvm_translation>()))],
    // Terminal ioctls, as for bt.
    &[Check::Eq(1, libc::TCGETS)],
    &[Check::Eq(1, libc::TCSETS)],
    &[Check::Eq(1, libc::TCSETSW)],
    &[Check::Eq(1, libc::TCSETSF)],
    &[Check::Eq(1, libc::TIOCGWINSZ)],
];

/// Executable mappings only inside the window, only at fixed addresses (the
/// shadow MMU's and the VMM area's); anything else without PROT_EXEC.
const MAP_BT: &[&[Check]] = &[
    &[Check::clear(2, PROT_EXEC)],
    &[
        Check::below_4g(0),
        Check::below_4g(1),
        Check::EndsInWindow { addr: 0, len: 1 },
        Check::MaskedEq(3, MAP_FIXED, MAP_FIXED),
    ],
];
const PROTECT_BT: &[&[Check]] = &[
    &[Check::clear(2, PROT_EXEC)],
    &[Check::below_4g(0), Check::below_4g(1), Check::EndsInWindow { addr: 0, len: 1 }],
];
/// Nothing executable at all: no guest code runs in a kvm process.
const NO_EXEC: &[&[Check]] = &[&[Check::clear(2, PROT_EXEC)]];

const fn allow(nr: i64, name: &'static str) -> Rule {
    Rule { nr, name, any_of: &[], otherwise: Action::Trap }
}
const fn allow_if(nr: i64, name: &'static str, any_of: &'static [&'static [Check]]) -> Rule {
    Rule { nr, name, any_of, otherwise: Action::Trap }
}

/// Calls every profile needs.
const COMMON: &[Rule] = &[
    // Console, traces, disks, diagnostics: descriptors opened before the jail.
    allow(libc::SYS_read, "read"),
    allow(libc::SYS_write, "write"),
    allow(libc::SYS_readv, "readv"),
    allow(libc::SYS_writev, "writev"),
    allow(libc::SYS_pread64, "pread64"),
    allow(libc::SYS_pwrite64, "pwrite64"),
    allow(libc::SYS_preadv, "preadv"),
    allow(libc::SYS_pwritev, "pwritev"),
    allow(libc::SYS_lseek, "lseek"),
    allow(libc::SYS_fsync, "fsync"),
    allow(libc::SYS_fdatasync, "fdatasync"),
    allow(libc::SYS_close, "close"),
    allow(libc::SYS_poll, "poll"),
    allow(libc::SYS_ppoll, "ppoll"),
    // Memory: the allocator, thread stacks, guest RAM memfds of later VMs.
    allow(libc::SYS_munmap, "munmap"),
    allow_if(libc::SYS_mremap, "mremap", &[&[Check::clear(3, (libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP) as u64)]]),
    allow(libc::SYS_madvise, "madvise"),
    allow(libc::SYS_brk, "brk"),
    allow(libc::SYS_memfd_create, "memfd_create"),
    allow(libc::SYS_ftruncate, "ftruncate"),
    // Threads (ticker, console input, kicks): threads only, no processes.
    allow_if(libc::SYS_clone, "clone", &[&[Check::Eq(0, THREAD_CLONE_FLAGS)]]),
    Rule {
        nr: libc::SYS_clone3,
        name: "clone3",
        any_of: &[&[Check::Never]],
        otherwise: Action::Errno(libc::ENOSYS as u16),
    },
    allow(libc::SYS_set_robust_list, "set_robust_list"),
    allow(libc::SYS_rseq, "rseq"),
    allow_if(libc::SYS_prctl, "prctl", &[&[Check::Eq(0, libc::PR_SET_NAME as u64)]]),
    allow(libc::SYS_futex, "futex"),
    allow(libc::SYS_sched_yield, "sched_yield"),
    allow(libc::SYS_sched_getaffinity, "sched_getaffinity"),
    allow(libc::SYS_exit, "exit"),
    allow(libc::SYS_exit_group, "exit_group"),
    // Signals: kicks go to our own threads only.
    allow(libc::SYS_gettid, "gettid"),
    allow(libc::SYS_getpid, "getpid"),
    allow_if(libc::SYS_tgkill, "tgkill", &[&[Check::OwnPid(0)]]),
    allow(libc::SYS_rt_sigreturn, "rt_sigreturn"),
    allow(libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    allow(libc::SYS_rt_sigaction, "rt_sigaction"),
    allow(libc::SYS_sigaltstack, "sigaltstack"),
    allow(libc::SYS_restart_syscall, "restart_syscall"),
    // Time.
    allow(libc::SYS_clock_gettime, "clock_gettime"),
    allow(libc::SYS_clock_nanosleep, "clock_nanosleep"),
    // The run loop's kick timer (SIGEV_THREAD_ID: the kernel delivers only
    // to a thread of this process).
    allow(libc::SYS_timer_create, "timer_create"),
    allow(libc::SYS_timer_settime, "timer_settime"),
    allow(libc::SYS_timer_delete, "timer_delete"),
    allow(libc::SYS_nanosleep, "nanosleep"),
    allow(libc::SYS_gettimeofday, "gettimeofday"),
    allow(libc::SYS_getrandom, "getrandom"),
];

/// Binary translation: shadow mappings and the host LDT.
const BT: &[Rule] = &[
    allow_if(libc::SYS_mmap, "mmap", MAP_BT),
    allow_if(libc::SYS_mprotect, "mprotect", PROTECT_BT),
    allow(libc::SYS_modify_ldt, "modify_ldt"),
    allow_if(libc::SYS_ioctl, "ioctl", TERMINAL_IOCTLS),
    // CPUID faulting toggled around a CPUID of the monitor's own, and off
    // when the vCPU goes (host/cpuid_fault.rs); ARCH_SET_CPUID only.
    allow_if(libc::SYS_arch_prctl, "arch_prctl", &[&[Check::Eq(0, crate::host::cpuid_fault::ARCH_SET_CPUID)]]),
];

/// /dev/kvm: vCPU ioctls, no executable memory.
const KVM: &[Rule] = &[
    allow_if(libc::SYS_mmap, "mmap", NO_EXEC),
    allow_if(libc::SYS_mprotect, "mprotect", NO_EXEC),
    allow_if(libc::SYS_ioctl, "ioctl", KVM_IOCTLS),
];

/// The allow-list of `profile`.
pub fn rules(profile: Profile) -> Vec<Rule> {
    let own = match profile {
        Profile::Bt => BT,
        Profile::Kvm => KVM,
    };
    COMMON.iter().chain(own).copied().collect()
}

/// The name of x86-64 system call `nr` if the table lists it.
pub fn name(nr: i64) -> Option<&'static str> {
    COMMON.iter().chain(BT).chain(KVM).find(|r| r.nr == nr).map(|r| r.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_no_escape_hatch() {
        for p in [Profile::Bt, Profile::Kvm] {
            let listed: Vec<i64> = rules(p).iter().map(|r| r.nr).collect();
            for forbidden in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_openat2,
                libc::SYS_creat,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_ptrace,
                libc::SYS_process_vm_readv,
                libc::SYS_process_vm_writev,
                libc::SYS_kill,
                libc::SYS_tkill,
                libc::SYS_mount,
                libc::SYS_setuid,
                libc::SYS_unshare,
                libc::SYS_setns,
                libc::SYS_bpf,
                libc::SYS_io_uring_setup,
            ] {
                assert!(!listed.contains(&forbidden), "{p:?} allows system call {forbidden}");
            }
            let mut sorted = listed.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), listed.len(), "{p:?}: a call is listed twice");
        }
    }

    #[test]
    fn kvm_run_is_the_io_number_kvm_ioctls_uses() {
        // _IO(KVMIO, 0x80), as in linux/kvm.h.
        assert_eq!(KVM_RUN, 0xAE80);
        assert_eq!(ior(0x81, size_of::<kvm_bindings::kvm_regs>()), 0x8090_AE81);
    }
}
