//! The host side of the `kvm` backend: opening /dev/kvm, the kick signal,
//! the guest-RAM mapping KVM uses, and the probes of what this host's KVM
//! can do (speed, 32-bit paging).

use super::*;

/// Opens /dev/kvm with an explanation for the usual ways it fails.
pub(super) fn open_kvm() -> Result<Kvm, BackendError> {
    Kvm::new().map_err(|e| {
        let why = match e.errno() {
            libc::ENOENT => "/dev/kvm does not exist: the kvm module is not loaded, the host has no \
                             hardware virtualization, or the device was not passed into this container"
                .to_string(),
            libc::EACCES | libc::EPERM => "permission denied opening /dev/kvm: add this user to the \
                                           'kvm' group (or grant read/write access to /dev/kvm) and log in again"
                .to_string(),
            libc::ENXIO | libc::ENODEV => "/dev/kvm exists but no KVM driver answers it".to_string(),
            _ => format!("cannot open /dev/kvm: {e}"),
        };
        BackendError::Unavailable(NAME, why)
    })
}

// ---- the kick --------------------------------------------------------------

extern "C" fn kick_handler(_sig: libc::c_int) {}

static KICK_HANDLER: Once = Once::new();

pub(super) fn install_kick_handler() -> Result<(), BackendError> {
    let mut result = Ok(());
    KICK_HANDLER.call_once(|| {
        // SAFETY: installs a handler that does nothing (async-signal-safe by
        // construction) for a real-time signal nothing else in Popek uses;
        // no SA_RESTART, so a KVM_RUN in progress returns EINTR.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = kick_handler as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(failed(format!("sigaction(SIGRTMIN+4): {}", std::io::Error::last_os_error())));
        }
    });
    result
}

/// What the kicker shares with the backend.
pub(super) struct KickState {
    /// The vCPU's `kvm_run` page; `None` once the backend is dropped.
    pub run: Option<NonNull<kvm_run>>,
    /// The thread inside `KVM_RUN`, if any.
    pub thread: Option<libc::pthread_t>,
}

// SAFETY: the pointer is only dereferenced under the mutex, while the
// backend (which owns the mapping) is alive: `Drop` clears it under the same
// mutex. `pthread_t` is a plain thread id.
unsafe impl Send for KickState {}

pub(super) type KickShared = Arc<Mutex<KickState>>;

pub(super) fn lock(k: &KickShared) -> std::sync::MutexGuard<'_, KickState> {
    k.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- guest RAM mapping -----------------------------------------------------

/// A shared mapping of the guest-RAM memfd owned by the backend.
pub(super) struct RamMapping {
    pub addr: NonNull<libc::c_void>,
    pub size: usize,
}

impl RamMapping {
    pub(super) fn new(mem: &GuestMemory) -> Result<Self, BackendError> {
        let size = usize::try_from(mem.size()).map_err(|_| failed("guest RAM larger than the address space"))?;
        let len = NonZeroUsize::new(size).ok_or_else(|| failed("empty guest RAM"))?;
        // SAFETY: a new shared mapping of the guest-RAM memfd at an address
        // the kernel chooses; it aliases the monitor's own view of the same
        // pages, which is how guest RAM is shared by design.
        let addr = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                mem.fd(),
                0,
            )
        }
        .map_err(|e| failed(format!("mapping guest RAM for KVM: {e}")))?;
        Ok(Self { addr, size })
    }
}

impl Drop for RamMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the VM (and so
        // KVM's use of it) is gone: `KvmBackend` drops the VM first.
        let _ = unsafe { nix::sys::mman::munmap(self.addr, self.size) };
    }
}

// ---- probes -----------------------------------------------------------------

/// Guest instructions per second of a 32-bit counting loop (`dec ecx; jnz`),
/// grown until one run takes at least 50 ms: real hardware virtualization
/// gives ≫ 100 M/s, an instruction emulator (PVM here) a few M/s.
pub fn measure_speed() -> Result<f64, BackendError> {
    const CODE: u32 = 0x1000;
    const DONE_PORT: u16 = 0x10;
    let mem = GuestMemory::new(MIN_GUEST_MEM).map_err(|e| failed(format!("guest RAM: {e}")))?;
    let mut iterations: u32 = 20_000;
    loop {
        // mov ecx, N ; 1: dec ecx ; jnz 1b ; out 0x10, al ; hlt
        let n = iterations.to_le_bytes();
        let code = [0xB9, n[0], n[1], n[2], n[3], 0x49, 0x75, 0xFD, 0xE6, DONE_PORT as u8, 0xF4];
        mem.write(u64::from(CODE), &code).map_err(|e| failed(format!("loading the loop: {e}")))?;
        let mut cpu = Cpu::flat_protected(0x08, 0x10);
        cpu.eip = CODE;
        cpu.gpr[crate::cpu::state::gpr::ESP] = 0x8000;
        let mut be = KvmBackend::new(&mem, &cpu)?;
        let start = Instant::now();
        loop {
            match be.run()? {
                VmExit::IoOut { port: DONE_PORT, .. } => break,
                VmExit::Interrupted => continue,
                other => return Err(failed(format!("calibration loop: unexpected exit {other:?}"))),
            }
        }
        let secs = start.elapsed().as_secs_f64();
        if secs >= 0.05 || iterations >= 1 << 30 {
            let speed = 2.0 * f64::from(iterations) / secs.max(1e-9);
            debug!(iterations, secs, speed, "KVM speed");
            return Ok(speed);
        }
        let grow = (0.06 / secs.max(1e-6)).clamp(2.0, 1000.0);
        iterations = (f64::from(iterations) * grow).min(f64::from(1u32 << 30)) as u32;
    }
}

/// Whether a 32-bit guest can turn paging on (`mov cr0` with PG, 4 MiB
/// identity page). PVM-backed /dev/kvm (this project's machines) answers
/// with #GP, so paging guests cannot run on the `kvm` backend there.
pub fn supports_32bit_paging() -> Result<bool, BackendError> {
    const CODE: u32 = 0x1000;
    const PD: u32 = 0x10000;
    const GDT: u32 = 0x500;
    let mem = GuestMemory::new(MIN_GUEST_MEM).map_err(|e| failed(format!("guest RAM: {e}")))?;
    let w = |gpa: u32, b: &[u8]| mem.write(u64::from(gpa), b).map_err(|e| failed(format!("probe setup: {e}")));
    for (i, d) in [0u64, 0x00CF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF].iter().enumerate() {
        w(GDT + 8 * i as u32, &d.to_le_bytes())?;
    }
    w(PD, &0x83u32.to_le_bytes())?; // PDE 0: 4 MiB page, present, writable
                                    // mov eax, PD ; mov cr3, eax ; mov eax, cr4 ; or eax, PSE ; mov cr4, eax ;
                                    // mov eax, cr0 ; or eax, PG ; mov cr0, eax ; out 0x10, al ; hlt
    let mut code = vec![0xB8];
    code.extend_from_slice(&PD.to_le_bytes());
    code.extend_from_slice(&[0x0F, 0x22, 0xD8, 0x0F, 0x20, 0xE0, 0x83, 0xC8, 0x10, 0x0F, 0x22, 0xE0]);
    code.extend_from_slice(&[0x0F, 0x20, 0xC0, 0x0D, 0x00, 0x00, 0x00, 0x80, 0x0F, 0x22, 0xC0, 0xE6, 0x10, 0xF4]);
    w(CODE, &code)?;
    let mut cpu = Cpu::flat_protected(0x08, 0x10);
    cpu.gdtr = TableReg { base: GDT, limit: 23 };
    cpu.eip = CODE;
    let mut be = KvmBackend::new(&mem, &cpu)?;
    for _ in 0..4 {
        match be.run()? {
            VmExit::IoOut { port: 0x10, .. } => return Ok(be.cpu_state().paging()),
            VmExit::Interrupted => continue,
            VmExit::TripleFault => return Ok(false),
            other => return Err(failed(format!("paging probe: unexpected exit {other:?}"))),
        }
    }
    Err(failed("paging probe: no result"))
}

/// Whether KVM runs guest code at hardware speed (≥ 100 M instructions/s).
pub fn is_hardware_speed(instructions_per_second: f64) -> bool {
    instructions_per_second >= 100e6
}
