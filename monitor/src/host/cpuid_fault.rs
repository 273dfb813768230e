//! CPUID faulting: guest user code that runs directly sees the guest's
//! CPUID, not the host's.
//!
//! CPUID is not privileged, so without help a guest process running in
//! compatibility mode asks the host CPU and learns of AVX, AVX-512 and
//! OSXSAVE. The guest kernel (told of a plain 686 by [`crate::cpu::policy`])
//! saves neither their state nor lets XGETBV run, and the monitor keeps only
//! x87/SSE state across exits ([`super::entry::XSAVE_MASK`]). Found by CI:
//! busybox's glibc saw OSXSAVE natively, then its XGETBV ran translated and
//! got #UD ("Illegal instruction").
//!
//! With `arch_prctl(ARCH_SET_CPUID, 0)` (Intel's CPUID faulting, AMD's
//! CpuidUserDis) CPUID at host CPL 3 raises #GP on this thread: a guest's
//! comes back as a general-protection exit and runs on the virtual CPU; the
//! monitor's own (a library probing features) is served by
//! [`serve_monitor_cpuid`] from the signal handler.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// `arch_prctl` code that sets this thread's CPUID faulting (asm/prctl.h).
pub const ARCH_SET_CPUID: libc::c_ulong = 0x1012;

/// Whether CPUID faulting was turned on for some thread of this process.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// How many of the monitor's own CPUIDs the signal handler served.
static SERVED: AtomicU64 = AtomicU64::new(0);

/// How many of the monitor's own CPUIDs were served (each costs a trap).
pub fn monitor_cpuids_served() -> u64 {
    SERVED.load(Ordering::Relaxed)
}

fn set_cpuid_allowed(allowed: bool) -> bool {
    // SAFETY: arch_prctl(ARCH_SET_CPUID) only changes this thread's
    // CPUID-faulting flag; it takes no pointer.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_SET_CPUID, libc::c_ulong::from(allowed)) == 0 }
}

/// Makes CPUID fault on the calling thread (whose signal handlers are
/// installed). False when the host CPU or kernel cannot, or says it can
/// but a CPUID then does not fault (some hypervisors advertise the feature
/// without honouring it): guest user code then sees the host's CPUID.
pub(super) fn enable_on_current_thread() -> bool {
    // Fill the standard library's feature cache first, so that the
    // monitor's own feature checks never fault.
    let _ = std::arch::is_x86_feature_detected!("sse4.2");
    if !set_cpuid_allowed(false) {
        return false;
    }
    ENABLED.store(true, Ordering::Release);
    let served = monitor_cpuids_served();
    let _ = std::arch::x86_64::__cpuid(0);
    if monitor_cpuids_served() == served {
        set_cpuid_allowed(true);
        return false;
    }
    true
}

/// Lets the calling thread execute CPUID again.
pub(super) fn disable_on_current_thread() {
    set_cpuid_allowed(true);
}

/// From the signal handler: the monitor's own code faulted. When it is a
/// CPUID refused by CPUID faulting, run it with faulting briefly off, store
/// its result in the interrupted context and step over it. True when served.
pub(super) fn serve_monitor_cpuid(sig: libc::c_int, g: &mut [libc::greg_t; 23]) -> bool {
    if sig != libc::SIGSEGV || !ENABLED.load(Ordering::Acquire) || g[libc::REG_TRAPNO as usize] != 13 {
        return false;
    }
    let rip = g[libc::REG_RIP as usize] as u64;
    // SAFETY: RIP is the monitor's own 64-bit code (the caller checked CS
    // and that it is not guest code), which is mapped and readable.
    let insn = unsafe { std::ptr::read_unaligned(rip as *const [u8; 2]) };
    if insn != [0x0F, 0xA2] {
        return false;
    }
    let (leaf, sub) = (g[libc::REG_RAX as usize] as u32, g[libc::REG_RCX as usize] as u32);
    if !set_cpuid_allowed(true) {
        return false;
    }
    let r = std::arch::x86_64::__cpuid_count(leaf, sub);
    set_cpuid_allowed(false);
    g[libc::REG_RAX as usize] = i64::from(r.eax);
    g[libc::REG_RBX as usize] = i64::from(r.ebx);
    g[libc::REG_RCX as usize] = i64::from(r.ecx);
    g[libc::REG_RDX as usize] = i64::from(r.edx);
    g[libc::REG_RIP as usize] = (rip + 2) as i64;
    SERVED.fetch_add(1, Ordering::Relaxed);
    true
}

#[cfg(test)]
mod tests {
    /// The monitor's own CPUID keeps working on a thread with faulting on:
    /// served by the signal handler, with the host's answer.
    #[test]
    fn monitor_cpuid_is_served_while_faulting() {
        std::thread::spawn(|| {
            crate::host::signals::install().unwrap();
            crate::host::signals::ensure_altstack().unwrap();
            let before = std::arch::x86_64::__cpuid(0);
            if !super::enable_on_current_thread() {
                eprintln!("SKIPPED: this host has no CPUID faulting");
                return;
            }
            let served = super::monitor_cpuids_served();
            let during = std::arch::x86_64::__cpuid(0);
            super::disable_on_current_thread();
            assert_eq!(super::monitor_cpuids_served(), served + 1, "the CPUID faulted and was served");
            let after = std::arch::x86_64::__cpuid(0);
            assert_eq!(super::monitor_cpuids_served(), served + 1, "faulting is off again");
            assert_eq!((after.eax, after.ebx), (during.eax, during.ebx));
            assert_eq!(
                (before.eax, before.ebx, before.ecx, before.edx),
                (during.eax, during.ebx, during.ecx, during.edx)
            );
        })
        .join()
        .unwrap();
    }
}
