//! The jail: what a guest that takes over the monitor process can reach.
//!
//! Direct execution runs guest user code on the host's GDT, where 0x33 is
//! the 64-bit user code segment: a far JMP/CALL/RETF/IRET to it needs no
//! privilege, and from 64-bit mode guest code can read, write and run
//! anything in this process. So, as Firecracker does, Popek assumes the
//! monitor may be taken over by its guest and decides what that buys. After
//! the machine is built and before the first guest instruction,
//! [`enter`]:
//! 1. when started as root, gives up root (uid/gid 65534) and enters new
//!    user, mount, network, IPC and UTS namespaces whose root is an empty,
//!    read-only tmpfs (pivot_root); for other users it tries the same
//!    without the id change;
//! 2. drops every capability (bounding, permitted, effective, inheritable,
//!    ambient) and sets `no_new_privs`;
//! 3. installs the allow-list of [`policy`] on every thread
//!    (SECCOMP_FILTER_FLAG_TSYNC), with the vCPU guard's rules on top.
//!
//! docs/security.md has the threat model.

pub mod policy;

use std::ffi::CString;

use thiserror::Error;

pub use policy::Profile;

use crate::host::seccomp::{self, Action};

/// Exit status of `popek` when guest code made a host system call or ran
/// in 64-bit mode (the VM is stopped, the call was not executed).
pub const EXIT_GUEST_ESCAPE: u8 = 121;
/// Exit status when the jail refused a system call that guest-controlled
/// (or buggy) monitor code made outside the window.
pub const EXIT_JAIL_REFUSED: u8 = 122;

/// The user and group a jail started as root runs as.
pub const NOBODY: u32 = 65534;

#[derive(Debug, Error)]
pub enum JailError {
    #[error("cannot drop privileges: {what}: {errno}")]
    Privileges { what: &'static str, errno: nix::Error },
    #[error("cannot install the jail's seccomp filter: {0}")]
    Seccomp(#[from] crate::host::HostError),
}

/// What the jail could set up (namespaces are best effort: some hosts
/// forbid user namespaces; the allow-list holds without them).
#[derive(Clone, Debug)]
pub struct JailReport {
    /// `Err(why)` when no namespaces could be entered.
    pub namespaces: Result<(), String>,
    /// The host uid the process runs as now.
    pub uid: u32,
    /// Instructions in the seccomp filter.
    pub filter_len: usize,
}

fn errno(what: &'static str) -> JailError {
    JailError::Privileges { what, errno: nix::Error::last() }
}

/// Jails the calling process for `profile`. Call it from the thread that
/// will run the vCPU, while the process has no other thread if namespaces
/// are wanted (the kernel refuses a user namespace to a threaded process).
pub fn enter(profile: Profile) -> Result<JailReport, JailError> {
    if let Some(r) = JAILED.get() {
        // A second machine in the same process (the replay localizer): the
        // jail is already closed, and a process cannot leave it.
        return Ok(r.clone());
    }
    let r = close(profile)?;
    let _ = JAILED.set(r.clone());
    Ok(r)
}

/// The jail of this process, once closed.
static JAILED: std::sync::OnceLock<JailReport> = std::sync::OnceLock::new();

/// Whether this process is jailed.
pub fn is_jailed() -> bool {
    JAILED.get().is_some()
}

fn close(profile: Profile) -> Result<JailReport, JailError> {
    // SAFETY: geteuid/getegid have no side effects.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // The host TSC rate (the user-exec policy, --stats, timers): its cache
    // file and the boot id behind it are out of reach once jailed, and an
    // `open` then is a refused system call that stops the process (the
    // replay suite's jailed worker met it first).
    crate::devices::clock::host_tsc_hz();
    // Read before /proc goes away with the old root.
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(63);
    if euid == 0 {
        become_nobody()?;
        // A uid change makes the process non-dumpable, which makes
        // /proc/self/uid_map root's: writable again for the maps below.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
    }
    let namespaces = enter_namespaces(if euid == 0 { NOBODY } else { euid }, if euid == 0 { NOBODY } else { egid });
    if euid == 0 {
        // No other process running as nobody may ptrace or read us.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    }
    match (&namespaces, euid) {
        (Err(e), 0) => {
            tracing::warn!("jail: no namespaces ({e}); running as uid {NOBODY} under the seccomp allow-list")
        }
        (Err(e), _) => tracing::info!("jail: no namespaces ({e})"),
        _ => {}
    }
    drop_capabilities(last_cap)?;
    // SAFETY: getuid has no side effects (and is not on the allow-list).
    let uid = unsafe { libc::getuid() };
    // A refused call must be reported, not just kill the process: the
    // handler names it (a kvm process has no vCPU that installed it).
    crate::host::signals::install()?;
    let filter = seccomp::compile(&policy::rules(profile), Action::Trap, Action::Trap, Action::Trap);
    seccomp::install(&filter, true)?;
    seccomp::mark_guarded();
    tracing::info!(?profile, filter_len = filter.len(), "jail closed");
    Ok(JailReport { namespaces, uid, filter_len: filter.len() })
}

/// Root gives up its ids before anything else, so the user namespace maps
/// to an unprivileged host id.
fn become_nobody() -> Result<(), JailError> {
    // SAFETY: plain id-changing calls on this (single-threaded or not:
    // glibc applies them to every thread) process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(errno("setgroups"));
        }
        if libc::setresgid(NOBODY, NOBODY, NOBODY) != 0 {
            return Err(errno("setresgid"));
        }
        if libc::setresuid(NOBODY, NOBODY, NOBODY) != 0 {
            return Err(errno("setresuid"));
        }
    }
    Ok(())
}

fn write_file(path: &str, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{path}: {e}"))
}

fn check(r: libc::c_int, what: &str) -> Result<(), String> {
    if r == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", nix::Error::last()))
    }
}

/// New user/mount/net/IPC/UTS namespaces with an empty read-only root.
fn enter_namespaces(uid: u32, gid: u32) -> Result<(), String> {
    let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare only changes this process's namespaces.
    check(unsafe { libc::unshare(flags) }, "unshare")?;
    write_file("/proc/self/setgroups", "deny")?;
    write_file("/proc/self/uid_map", &format!("{uid} {uid} 1\n"))?;
    write_file("/proc/self/gid_map", &format!("{gid} {gid} 1\n"))?;
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (root, tmpfs, none) = (c("/"), c("tmpfs"), c("none"));
    // SAFETY: mount/pivot_root/umount on this process's private mount
    // namespace with valid C strings; nothing outside it changes.
    unsafe {
        check(
            libc::mount(
                none.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            "make / private",
        )?;
        let dir = ["/tmp", "/mnt", "/var/tmp", "/dev"]
            .into_iter()
            .find(|d| std::path::Path::new(d).is_dir())
            .ok_or("no directory to mount the empty root on")?;
        let dir = c(dir);
        let opts = c("size=4k,mode=0555");
        check(
            libc::mount(
                tmpfs.as_ptr(),
                dir.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                opts.as_ptr().cast(),
            ),
            "mount the empty root",
        )?;
        check(libc::chdir(dir.as_ptr()), "chdir to the empty root")?;
        let dot = c(".");
        check(libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int, "pivot_root")?;
        check(libc::umount2(dot.as_ptr(), libc::MNT_DETACH), "detach the old root")?;
        check(libc::chdir(root.as_ptr()), "chdir /")?;
        check(
            libc::mount(
                none.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
            "remount the empty root read-only",
        )?;
    }
    Ok(())
}

/// Clears every capability set, the bounding set included.
fn drop_capabilities(last: libc::c_ulong) -> Result<(), JailError> {
    for cap in 0..=last {
        // SAFETY: prctl with integer arguments. Fails with EPERM without
        // CAP_SETPCAP, when the bounding set no longer matters (no
        // capability can be gained: no_new_privs, no setuid binaries).
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header { version: 0x2008_0522, pid: 0 }; // _LINUX_CAPABILITY_VERSION_3
    let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capset with a version-3 header and its two data words.
    if unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) } != 0 {
        return Err(errno("capset"));
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(errno("no_new_privs"));
    }
    Ok(())
}

/// Reports a call the jail refused and ends the process: called by the
/// SIGSYS handler, so only async-signal-safe raw calls (both allowed).
pub(crate) fn refused(nr: i32, arch: u32, rip: u64) -> ! {
    let mut b = [0u8; 20];
    let name = policy::name(i64::from(nr)).unwrap_or("");
    let arch = if arch == seccomp::AUDIT_ARCH_I386 { "i386 " } else { "" };
    for part in [
        b"popek: the jail refused host system call ".as_slice(),
        arch.as_bytes(),
        b"#",
        decimal(nr as u64, &mut b),
        b" ",
        name.as_bytes(),
        b" made outside the window at rip=",
    ] {
        raw_write(part);
    }
    let mut h = [0u8; 18];
    raw_write(crate::host::signals::hex(rip, &mut h));
    raw_write(b"; monitor code (or guest code that took it over) asked for it. Stopped.\n");
    // SAFETY: exit_group ends the process; it is on the allow-list.
    unsafe { libc::syscall(libc::SYS_exit_group, libc::c_int::from(EXIT_JAIL_REFUSED)) };
    unreachable!("exit_group returned")
}

fn raw_write(b: &[u8]) {
    // SAFETY: writing a valid byte slice to fd 2.
    unsafe { libc::write(2, b.as_ptr().cast(), b.len()) };
}

fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}
