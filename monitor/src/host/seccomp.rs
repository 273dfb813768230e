//! Seccomp filters: the vCPU guard and the classic-BPF builder the jail's
//! allow-list ([`crate::jail`]) is compiled with.
//!
//! The **vCPU guard** is installed on every vCPU thread before its first
//! guest instruction, jailed or not:
//! - every i386 system call traps (SIGSYS, not executed): in compatibility
//!   mode a user-mode `int 0x80`, `sysenter` or `syscall` is a host call,
//!   which the handler turns into a guest system-call exit;
//! - every x86-64 system call whose instruction pointer lies below 4 GiB
//!   traps: nothing of the monitor lives in the window, so such a call was
//!   made by guest code that far-jumped to the host's 64-bit selector 0x33.
//!   The handler stops the VM with a report.
//!
//! The guard is inherited by threads and processes the vCPU thread creates:
//! an i386 program started from it dies of SIGSYS. Start such helpers (e.g.
//! a native benchmark run) from another thread.

use std::cell::Cell;

use super::HostError;

pub const AUDIT_ARCH_I386: u32 = 0x4000_0003;
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;

/// `struct seccomp_data` offsets.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const IP_HIGH_OFFSET: u32 = 12;
const fn arg_offset(arg: u8) -> u32 {
    16 + 8 * arg as u32
}

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JGE_X: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_X) as u16;
const BPF_AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const BPF_ADD_X: u16 = (libc::BPF_ALU | libc::BPF_ADD | libc::BPF_X) as u16;
const BPF_TAX: u16 = (libc::BPF_MISC | libc::BPF_TAX) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// What a filter does with a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    /// SIGSYS to the calling thread; the call is not executed.
    Trap,
    /// The call fails with this errno (used for `clone3`, whose flags live
    /// in memory a filter cannot read, so that libc falls back to `clone`).
    Errno(u16),
    KillProcess,
}

impl Action {
    fn ret(self) -> u32 {
        match self {
            Action::Allow => libc::SECCOMP_RET_ALLOW,
            Action::Trap => libc::SECCOMP_RET_TRAP,
            Action::Errno(e) => libc::SECCOMP_RET_ERRNO | u32::from(e),
            Action::KillProcess => libc::SECCOMP_RET_KILL_PROCESS,
        }
    }
}

/// One condition on a system call argument (64-bit, checked as two words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// `arg == value`.
    Eq(u8, u64),
    /// `arg & mask == value`.
    MaskedEq(u8, u64, u64),
    /// `addr + len` (arguments, both already known to be below 4 GiB) does
    /// not pass 4 GiB: the range lies inside the guest window.
    EndsInWindow { addr: u8, len: u8 },
    /// `arg` is this process's id (filled in when the filter is compiled).
    OwnPid(u8),
    /// Never holds: a rule made only of it always takes `otherwise`.
    Never,
}

impl Check {
    /// `arg < 4 GiB`.
    pub const fn below_4g(arg: u8) -> Check {
        Check::MaskedEq(arg, 0xFFFF_FFFF_0000_0000, 0)
    }
    /// No bit of `bits` set in `arg`.
    pub const fn clear(arg: u8, bits: u64) -> Check {
        Check::MaskedEq(arg, bits, 0)
    }
}

/// A system call the allow-list admits: unconditionally when `any_of` is
/// empty, else when every check of at least one alternative holds.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub nr: i64,
    pub name: &'static str,
    pub any_of: &'static [&'static [Check]],
    /// What to do when no alternative matches (or the call is `clone3`).
    pub otherwise: Action,
}

/// A classic-BPF program under construction (jumps are relative and at
/// most 255 instructions: every rule's body is local, so they always are).
#[derive(Default)]
struct Program(Vec<libc::sock_filter>);

impl Program {
    fn op(&mut self, code: u16, jt: u8, jf: u8, k: u32) {
        self.0.push(libc::sock_filter { code, jt, jf, k });
    }
    fn load(&mut self, offset: u32) {
        self.op(BPF_LD_W_ABS, 0, 0, offset);
    }
    fn ret(&mut self, a: Action) {
        self.op(BPF_RET_K, 0, 0, a.ret());
    }
}

fn jump(n: usize) -> u8 {
    u8::try_from(n).expect("a seccomp rule body longer than 255 instructions")
}

/// The instructions of one check; a failing comparison jumps `fail` = the
/// distance to the end of the check plus `after` (the rest of the
/// alternative, so it lands on the next alternative).
fn check_code(c: Check, after: usize, pid: u32) -> Vec<libc::sock_filter> {
    let mut p = Program::default();
    let word = |p: &mut Program, off: u32, mask: u32, value: u32, left_after: usize| {
        p.load(off);
        if mask != u32::MAX {
            p.op(BPF_AND_K, 0, 0, mask);
        }
        p.op(BPF_JEQ_K, 0, jump(left_after), value);
    };
    match c {
        Check::Eq(a, v) => {
            word(&mut p, arg_offset(a), u32::MAX, v as u32, 2 + after);
            word(&mut p, arg_offset(a) + 4, u32::MAX, (v >> 32) as u32, after);
        }
        Check::MaskedEq(a, m, v) => {
            let (mlo, mhi) = (m as u32, (m >> 32) as u32);
            let hi_len = if mhi != 0 || (v >> 32) != 0 {
                if mhi == u32::MAX {
                    2
                } else {
                    3
                }
            } else {
                0
            };
            if mlo != 0 || v as u32 != 0 {
                word(&mut p, arg_offset(a), mlo, v as u32, hi_len + after);
            }
            if hi_len != 0 {
                word(&mut p, arg_offset(a) + 4, mhi, (v >> 32) as u32, after);
            }
        }
        Check::OwnPid(a) => return check_code(Check::Eq(a, u64::from(pid)), after, pid),
        Check::Never => return check_code(Check::MaskedEq(0, 0, 1), after, pid),
        Check::EndsInWindow { addr, len } => {
            p.load(arg_offset(addr));
            p.op(BPF_TAX, 0, 0, 0);
            p.load(arg_offset(len));
            p.op(BPF_ADD_X, 0, 0, 0);
            // A = end mod 2^32: exactly 4 GiB wraps to 0 (fine); a smaller
            // value than the start means the range wrapped past 4 GiB.
            p.op(BPF_JEQ_K, 1, 0, 0);
            p.op(BPF_JGE_X, 0, jump(after), 0);
        }
    }
    p.0
}

/// Compiles `rules` into a filter: i386 calls get `i386`, x86-64 calls from
/// below 4 GiB get `window`, listed calls are checked, the rest get
/// `default`. Other architectures (x32 numbers included: they never equal a
/// listed number) are killed.
pub fn compile(rules: &[Rule], i386: Action, window: Action, default: Action) -> Vec<libc::sock_filter> {
    // SAFETY: getpid has no side effects.
    compile_for(rules, i386, window, default, unsafe { libc::getpid() } as u32)
}

/// [`compile`] with the process id that [`Check::OwnPid`] compares against.
pub fn compile_for(rules: &[Rule], i386: Action, window: Action, default: Action, pid: u32) -> Vec<libc::sock_filter> {
    let mut p = Program::default();
    p.load(ARCH_OFFSET);
    p.op(BPF_JEQ_K, 0, 1, AUDIT_ARCH_I386);
    p.ret(i386);
    p.op(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64);
    p.ret(Action::KillProcess);
    p.load(IP_HIGH_OFFSET);
    p.op(BPF_JEQ_K, 0, 1, 0);
    p.ret(window);
    for r in rules {
        let mut body = Program::default();
        if r.any_of.is_empty() {
            body.ret(Action::Allow);
        } else {
            for alt in r.any_of {
                // Checks, then ALLOW; a failing check skips to the next alternative.
                let codes: Vec<Vec<libc::sock_filter>> = {
                    let mut out = Vec::new();
                    let mut rest = 1; // the ALLOW
                    for c in alt.iter().rev() {
                        let code = check_code(*c, rest, pid);
                        rest += code.len();
                        out.push(code);
                    }
                    out.reverse();
                    out
                };
                for c in codes {
                    body.0.extend(c);
                }
                body.ret(Action::Allow);
            }
            body.ret(r.otherwise);
        }
        p.load(NR_OFFSET);
        p.op(BPF_JEQ_K, 0, jump(body.0.len()), r.nr as u32);
        p.0.extend(body.0);
    }
    p.ret(default);
    p.0
}

/// Installs `filter` on the calling thread, or with `tsync` on every thread
/// of the process. Sets `no_new_privs` first (required, and wanted).
pub fn install(filter: &[libc::sock_filter], tsync: bool) -> Result<(), HostError> {
    let len = u16::try_from(filter.len()).map_err(|_| HostError::Seccomp(nix::Error::E2BIG))?;
    let prog = libc::sock_fprog { len, filter: filter.as_ptr() as *mut libc::sock_filter };
    // SAFETY: prctl with integer arguments; NO_NEW_PRIVS only forbids
    // privilege gains through execve for this process's descendants.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(HostError::Seccomp(nix::Error::last()));
    }
    let flags = if tsync { libc::SECCOMP_FILTER_FLAG_TSYNC } else { 0 };
    // SAFETY: `prog` points at a valid filter that outlives the call (the
    // kernel copies it).
    let r = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &prog as *const libc::sock_fprog)
    };
    if r < 0 {
        return Err(HostError::Seccomp(nix::Error::last()));
    }
    if r > 0 {
        // TSYNC names the thread that could not be synchronized.
        return Err(HostError::Seccomp(nix::Error::EBUSY));
    }
    Ok(())
}

/// The vCPU guard: i386 calls and x86-64 calls from the window trap, the
/// rest is allowed (the jail, when on, decides about those).
pub fn vcpu_guard() -> Vec<libc::sock_filter> {
    compile(&[], Action::Trap, Action::Trap, Action::Allow)
}

thread_local! {
    static INSTALLED: Cell<bool> = const { Cell::new(false) };
}

/// Installs the vCPU guard on the calling thread (once; filters stack, so a
/// second copy would only slow every system call down). The jail's filter
/// contains the same rules, so a jailed thread skips it.
pub fn install_on_current_thread() -> Result<(), HostError> {
    if INSTALLED.with(Cell::get) {
        return Ok(());
    }
    install(&vcpu_guard(), false)?;
    INSTALLED.with(|c| c.set(true));
    Ok(())
}

/// Records that the calling thread runs under a filter that includes the
/// vCPU guard's rules (the jail's, installed with TSYNC).
pub fn mark_guarded() {
    INSTALLED.with(|c| c.set(true));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic-BPF program on a `seccomp_data` (the subset our
    /// builder emits), so rule compilation is tested without a kernel.
    fn eval(prog: &[libc::sock_filter], nr: i32, arch: u32, ip: u64, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend_from_slice(&nr.to_le_bytes());
        data.extend_from_slice(&arch.to_le_bytes());
        data.extend_from_slice(&ip.to_le_bytes());
        for a in args {
            data.extend_from_slice(&a.to_le_bytes());
        }
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => {
                    let o = i.k as usize;
                    a = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                BPF_JEQ_K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                BPF_JGE_X => pc += usize::from(if a >= x { i.jt } else { i.jf }),
                BPF_AND_K => a &= i.k,
                BPF_ADD_X => a = a.wrapping_add(x),
                BPF_TAX => x = a,
                BPF_RET_K => return i.k,
                c => panic!("opcode {c:#x} not emitted by the builder"),
            }
        }
    }

    const MMAP_RULE: Rule = Rule {
        nr: libc::SYS_mmap,
        name: "mmap",
        any_of: &[
            &[Check::clear(2, libc::PROT_EXEC as u64)],
            &[
                Check::below_4g(0),
                Check::below_4g(1),
                Check::EndsInWindow { addr: 0, len: 1 },
                Check::MaskedEq(3, libc::MAP_FIXED as u64, libc::MAP_FIXED as u64),
            ],
        ],
        otherwise: Action::Trap,
    };
    const HIGH: u64 = 0x5555_0000_1000;

    #[test]
    fn the_guard_traps_i386_and_window_calls_only() {
        let g = vcpu_guard();
        let allow = libc::SECCOMP_RET_ALLOW;
        let trap = libc::SECCOMP_RET_TRAP;
        assert_eq!(eval(&g, 1, AUDIT_ARCH_I386, HIGH, [0; 6]), trap);
        assert_eq!(eval(&g, 1, AUDIT_ARCH_X86_64, 0x0040_0000, [0; 6]), trap);
        assert_eq!(eval(&g, 1, AUDIT_ARCH_X86_64, 0xFFFF_FFFF, [0; 6]), trap);
        assert_eq!(eval(&g, 1, AUDIT_ARCH_X86_64, 0x1_0000_0000, [0; 6]), allow);
        assert_eq!(eval(&g, 1, 0x1234, HIGH, [0; 6]), libc::SECCOMP_RET_KILL_PROCESS);
    }

    #[test]
    fn argument_checks_admit_exactly_their_alternatives() {
        let p = compile(&[MMAP_RULE], Action::Trap, Action::Trap, Action::KillProcess);
        let nr = libc::SYS_mmap as i32;
        let (rw, rwx) = ((libc::PROT_READ | libc::PROT_WRITE) as u64, (libc::PROT_READ | libc::PROT_EXEC) as u64);
        let fixed = (libc::MAP_FIXED | libc::MAP_SHARED) as u64;
        let run = |args| eval(&p, nr, AUDIT_ARCH_X86_64, HIGH, args);
        assert_eq!(run([0, 4096, rw, 0x22, 0, 0]), libc::SECCOMP_RET_ALLOW, "no PROT_EXEC: anywhere");
        assert_eq!(run([0x40_0000, 4096, rwx, fixed, 3, 0]), libc::SECCOMP_RET_ALLOW, "exec inside the window");
        assert_eq!(run([0xFFFF_F000, 4096, rwx, fixed, 3, 0]), libc::SECCOMP_RET_ALLOW, "ends at 4 GiB");
        assert_eq!(run([0xFFFF_F000, 8192, rwx, fixed, 3, 0]), libc::SECCOMP_RET_TRAP, "crosses 4 GiB");
        assert_eq!(run([HIGH, 4096, rwx, fixed, 3, 0]), libc::SECCOMP_RET_TRAP, "exec above the window");
        assert_eq!(run([0x40_0000, 1 << 33, rwx, fixed, 3, 0]), libc::SECCOMP_RET_TRAP, "huge length");
        assert_eq!(run([0x40_0000, 4096, rwx, 0x22, 3, 0]), libc::SECCOMP_RET_TRAP, "exec without MAP_FIXED");
        assert_eq!(
            eval(&p, libc::SYS_openat as i32, AUDIT_ARCH_X86_64, HIGH, [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS,
            "unlisted calls get the default"
        );
    }

    #[test]
    fn equality_checks_compare_both_halves() {
        const R: Rule = Rule {
            nr: libc::SYS_tgkill,
            name: "tgkill",
            any_of: &[&[Check::Eq(0, 1234)]],
            otherwise: Action::Errno(1),
        };
        let p = compile(&[R], Action::Trap, Action::Trap, Action::KillProcess);
        let run = |a0| eval(&p, libc::SYS_tgkill as i32, AUDIT_ARCH_X86_64, HIGH, [a0, 0, 0, 0, 0, 0]);
        assert_eq!(run(1234), libc::SECCOMP_RET_ALLOW);
        assert_eq!(run(1235), libc::SECCOMP_RET_ERRNO | 1);
        assert_eq!(run((1 << 32) | 1234), libc::SECCOMP_RET_ERRNO | 1);
    }

    #[test]
    fn own_pid_and_never() {
        const R: [Rule; 2] = [
            Rule { nr: libc::SYS_tgkill, name: "tgkill", any_of: &[&[Check::OwnPid(0)]], otherwise: Action::Trap },
            Rule { nr: libc::SYS_clone3, name: "clone3", any_of: &[&[Check::Never]], otherwise: Action::Errno(38) },
        ];
        let p = compile_for(&R, Action::Trap, Action::Trap, Action::KillProcess, 777);
        let run = |nr: i64, a0| eval(&p, nr as i32, AUDIT_ARCH_X86_64, HIGH, [a0, 0, 0, 0, 0, 0]);
        assert_eq!(run(libc::SYS_tgkill, 777), libc::SECCOMP_RET_ALLOW);
        assert_eq!(run(libc::SYS_tgkill, 778), libc::SECCOMP_RET_TRAP);
        assert_eq!(run(libc::SYS_clone3, 0), libc::SECCOMP_RET_ERRNO | 38);
        assert_eq!(run(libc::SYS_clone3, 1), libc::SECCOMP_RET_ERRNO | 38);
    }
}
