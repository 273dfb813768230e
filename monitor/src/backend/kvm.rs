//! The `kvm` backend: the same guest on the same devices, with the CPU
//! virtualized by /dev/kvm (kvm-ioctls), for side-by-side comparison with
//! `bt`. See docs/kvm.md.
//!
//! - Guest RAM is one memory slot at guest-physical 0: a mapping of the
//!   guest-RAM memfd owned by the backend (the same pages as
//!   [`GuestMemory::host_base`], but a mapping whose lifetime the backend
//!   controls, so KVM never writes through an address the monitor unmapped).
//! - One vCPU, no in-kernel irqchip: the monitor's own PIC model decides
//!   vectors, injected with `KVM_INTERRUPT`; `HLT` comes back to userspace.
//! - The CPUID policy is a plain 686 (see [`cpuid_policy`]): no RDRAND,
//!   x2APIC, AVX/XSAVE, long mode or SYSCALL, and no KVM paravirtual leaves.
//! - [`KvmBackend::kicker`] sets `immediate_exit` and sends
//!   [`kick_signal`] (SIGRTMIN+4, a handler that does nothing) to the thread
//!   inside `KVM_RUN`.

use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, Once};
use std::time::Instant;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_dtable, kvm_msr_entry, kvm_regs, kvm_run, kvm_segment, kvm_sregs,
    kvm_userspace_memory_region, CpuId, Msrs as KvmMsrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use tracing::{debug, warn};

use super::{Backend, BackendError, Kick, VmExit};
use crate::cpu::descriptor::Descriptor;
use crate::cpu::policy::{msr, CpuPolicy};
use crate::cpu::state::{cr0, flags, Seg, SegReg, TableReg};
use crate::cpu::Cpu;
use crate::layout::MIN_GUEST_MEM;
use crate::memory::GuestMemory;

const NAME: &str = "kvm";

/// `KVM_INTERRUPT` = `_IOW(KVMIO, 0x86, struct kvm_interrupt)`: kvm-ioctls
/// 0.25 has no wrapper for it.
const KVM_INTERRUPT: libc::c_ulong = 0x4004_AE86;

/// Where KVM may put the real-mode TSS on Intel hosts (three pages just
/// below the BIOS area at the top of the 32-bit space; never guest RAM here).
const TSS_ADDRESS: usize = 0xFFFB_D000;

/// The signal the kicker sends to the vCPU thread. SIGRTMIN+3 belongs to
/// the `bt` backend's execution host.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

fn failed(what: impl Into<String>) -> BackendError {
    BackendError::Failed { backend: NAME, what: what.into() }
}

fn ioctl_failed(step: &str, e: kvm_ioctls::Error) -> BackendError {
    failed(format!("{step}: {e}"))
}

/// Opens /dev/kvm with an explanation for the usual ways it fails.
fn open_kvm() -> Result<Kvm, BackendError> {
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

fn install_kick_handler() -> Result<(), BackendError> {
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
struct KickState {
    /// The vCPU's `kvm_run` page; `None` once the backend is dropped.
    run: Option<NonNull<kvm_run>>,
    /// The thread inside `KVM_RUN`, if any.
    thread: Option<libc::pthread_t>,
}

// SAFETY: the pointer is only dereferenced under the mutex, while the
// backend (which owns the mapping) is alive: `Drop` clears it under the same
// mutex. `pthread_t` is a plain thread id.
unsafe impl Send for KickState {}

type KickShared = Arc<Mutex<KickState>>;

fn lock(k: &KickShared) -> std::sync::MutexGuard<'_, KickState> {
    k.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- guest RAM mapping -----------------------------------------------------

/// A shared mapping of the guest-RAM memfd owned by the backend.
struct RamMapping {
    addr: NonNull<libc::c_void>,
    size: usize,
}

impl RamMapping {
    fn new(mem: &GuestMemory) -> Result<Self, BackendError> {
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

// ---- state conversions ------------------------------------------------------

fn to_kvm_seg(s: &SegReg) -> kvm_segment {
    let c = &s.cache;
    kvm_segment {
        base: u64::from(c.base),
        limit: c.limit,
        selector: s.selector,
        type_: c.typ,
        present: u8::from(c.present),
        dpl: c.dpl,
        db: u8::from(c.db),
        s: u8::from(c.s),
        l: 0,
        g: u8::from(c.g),
        avl: u8::from(c.avl),
        unusable: u8::from(!c.present),
        padding: 0,
    }
}

fn from_kvm_seg(k: &kvm_segment) -> SegReg {
    SegReg {
        selector: k.selector,
        cache: Descriptor {
            base: k.base as u32,
            limit: k.limit,
            typ: k.type_ & 0xF,
            s: k.s != 0,
            dpl: k.dpl & 3,
            present: k.present != 0 && k.unusable == 0,
            db: k.db != 0,
            g: k.g != 0,
            avl: k.avl != 0,
        },
    }
}

fn to_kvm_dtable(t: &TableReg) -> kvm_dtable {
    kvm_dtable { base: u64::from(t.base), limit: t.limit, padding: [0; 3] }
}

/// Fills `sregs` (as read from KVM, to keep fields Popek does not model)
/// from the neutral state.
fn apply_sregs(sregs: &mut kvm_sregs, cpu: &Cpu) {
    sregs.es = to_kvm_seg(cpu.seg(Seg::Es));
    sregs.cs = to_kvm_seg(cpu.seg(Seg::Cs));
    sregs.ss = to_kvm_seg(cpu.seg(Seg::Ss));
    sregs.ds = to_kvm_seg(cpu.seg(Seg::Ds));
    sregs.fs = to_kvm_seg(cpu.seg(Seg::Fs));
    sregs.gs = to_kvm_seg(cpu.seg(Seg::Gs));
    sregs.tr = to_kvm_seg(&cpu.tr);
    sregs.ldt = to_kvm_seg(&cpu.ldtr);
    sregs.gdt = to_kvm_dtable(&cpu.gdtr);
    sregs.idt = to_kvm_dtable(&cpu.idtr);
    sregs.cr0 = u64::from(cpu.cr0);
    sregs.cr2 = u64::from(cpu.cr2);
    sregs.cr3 = u64::from(cpu.cr3);
    sregs.cr4 = u64::from(cpu.cr4);
    sregs.efer = cpu.msr.efer;
    sregs.apic_base = cpu.msr.apic_base;
    sregs.interrupt_bitmap = [0; 4];
}

fn to_kvm_regs(cpu: &Cpu) -> kvm_regs {
    let g = |i: usize| u64::from(cpu.gpr[i]);
    kvm_regs {
        rax: g(0),
        rcx: g(1),
        rdx: g(2),
        rbx: g(3),
        rsp: g(4),
        rbp: g(5),
        rsi: g(6),
        rdi: g(7),
        rip: u64::from(cpu.eip),
        rflags: u64::from(cpu.eflags | 2),
        ..Default::default()
    }
}

/// The guest-visible MSRs Popek models and KVM holds.
const MSR_LIST: [u32; 4] = [msr::SYSENTER_CS, msr::SYSENTER_ESP, msr::SYSENTER_EIP, msr::PAT];

fn msr_entries(cpu: &Cpu) -> Vec<kvm_msr_entry> {
    let m = &cpu.msr;
    [
        (msr::SYSENTER_CS, u64::from(m.sysenter_cs)),
        (msr::SYSENTER_ESP, u64::from(m.sysenter_esp)),
        (msr::SYSENTER_EIP, u64::from(m.sysenter_eip)),
        (msr::PAT, m.pat),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect()
}

// ---- CPUID -----------------------------------------------------------------

/// Highest basic and extended leaves the guest sees.
const MAX_BASIC_LEAF: u32 = 1;
const MAX_EXT_LEAF: u32 = 0x8000_0004;

/// The guest CPUID: KVM's supported leaves filtered down to a plain 686.
///
/// - leaf 0: the host vendor string, highest basic leaf 1;
/// - leaf 1: the host family/model/stepping; EBX with APIC id 0 and one
///   logical CPU; ECX = 0 (no SSE3+, no RDRAND, no x2APIC, no AVX/XSAVE, no
///   hypervisor bit); EDX = host ∩ [`CpuPolicy`]'s 686 set (FPU, DE, PSE,
///   TSC, MSR, CX8, PGE, CMOV, PAT, CLFSH, MMX, FXSR, SSE, SSE2): no APIC
///   (there is no in-kernel irqchip), no SEP, no PAE;
/// - 0x80000000-0x80000004: the host's brand string, but 0x80000001 empty
///   (no SYSCALL, no long mode, no NX);
/// - nothing else: no KVM paravirtual leaves (0x4000_0000), no cache or
///   topology leaves.
pub fn cpuid_policy(supported: &[kvm_cpuid_entry2]) -> Vec<kvm_cpuid_entry2> {
    let policy = CpuPolicy::default();
    let host = |leaf: u32| supported.iter().find(|e| e.function == leaf && e.index == 0).copied();
    let entry = |function: u32, r: [u32; 4]| kvm_cpuid_entry2 {
        function,
        index: 0,
        flags: 0,
        eax: r[0],
        ebx: r[1],
        ecx: r[2],
        edx: r[3],
        padding: [0; 3],
    };
    let mut out = Vec::new();
    if let Some(l0) = host(0) {
        out.push(entry(0, [l0.eax.min(MAX_BASIC_LEAF), l0.ebx, l0.ecx, l0.edx]));
    }
    if let Some(l1) = host(1) {
        let ebx = (l1.ebx & 0x0000_FF00) | (1 << 16);
        out.push(entry(1, [l1.eax, ebx, 0, l1.edx & policy.edx1]));
    }
    if let Some(e0) = host(0x8000_0000) {
        let max = e0.eax.min(MAX_EXT_LEAF);
        out.push(entry(0x8000_0000, [max, e0.ebx, e0.ecx, e0.edx]));
        if max >= 0x8000_0001 {
            let sig = host(0x8000_0001).map_or(0, |e| e.eax);
            out.push(entry(0x8000_0001, [sig, 0, 0, 0]));
        }
        for leaf in 0x8000_0002..=max {
            if let Some(b) = host(leaf) {
                out.push(entry(leaf, [b.eax, b.ebx, b.ecx, b.edx]));
            }
        }
    }
    out
}

// ---- the backend --------------------------------------------------------------

/// An I/O exit being answered or replayed: string I/O moves `count`
/// elements of `size` bytes through the kvm_run data area.
#[derive(Clone, Copy, Debug)]
struct IoExit {
    port: u16,
    size: u8,
    count: u32,
    /// Element handed to the machine next.
    next: u32,
    data_offset: u64,
    is_in: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    runs: u64,
    io_in: u64,
    io_out: u64,
    mmio: u64,
    halt: u64,
    interrupted: u64,
    window: u64,
    injected: u64,
}

/// One KVM vCPU running a 32-bit guest in a one-slot VM.
pub struct KvmBackend {
    // Field order is drop order: the vCPU and VM go before the RAM mapping.
    vcpu: VcpuFd,
    vm: VmFd,
    _kvm: Kvm,
    ram: RamMapping,
    run: NonNull<kvm_run>,
    kick: KickShared,
    io: Option<IoExit>,
    mmio_read: bool,
    ran: bool,
    stats: Stats,
}

// SAFETY: `run` points into the vCPU's own kvm_run mapping, owned by `vcpu`
// and moved with it; KVM vCPUs may be run from any (one at a time) thread.
unsafe impl Send for KvmBackend {}

impl KvmBackend {
    /// A VM whose RAM is `mem` and whose one vCPU starts in state `cpu`.
    pub fn new(mem: &GuestMemory, cpu: &Cpu) -> Result<Self, BackendError> {
        let kvm = open_kvm()?;
        install_kick_handler()?;
        let vm = kvm.create_vm().map_err(|e| ioctl_failed("KVM_CREATE_VM", e))?;
        if let Err(e) = vm.set_tss_address(TSS_ADDRESS) {
            debug!(error = %e, "KVM_SET_TSS_ADDR failed (only Intel real mode needs it)");
        }
        let ram = RamMapping::new(mem)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem.size(),
            userspace_addr: ram.addr.as_ptr() as u64,
        };
        // SAFETY: the region is `ram`, a live shared mapping of exactly
        // `mem.size()` bytes that outlives the VM (dropped after it).
        unsafe { vm.set_user_memory_region(region) }.map_err(|e| ioctl_failed("KVM_SET_USER_MEMORY_REGION", e))?;
        let mut vcpu = vm.create_vcpu(0).map_err(|e| ioctl_failed("KVM_CREATE_VCPU", e))?;

        let supported =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| ioctl_failed("KVM_GET_SUPPORTED_CPUID", e))?;
        let entries = cpuid_policy(supported.as_slice());
        let cpuid = CpuId::from_entries(&entries).map_err(|e| failed(format!("building the CPUID table: {e:?}")))?;
        vcpu.set_cpuid2(&cpuid).map_err(|e| ioctl_failed("KVM_SET_CPUID2", e))?;

        let run = NonNull::from(vcpu.get_kvm_run());
        let mut backend = KvmBackend {
            vcpu,
            vm,
            _kvm: kvm,
            ram,
            run,
            kick: Arc::new(Mutex::new(KickState { run: Some(run), thread: None })),
            io: None,
            mmio_read: false,
            ran: false,
            stats: Stats::default(),
        };
        backend.set_cpu_state(cpu)?;
        Ok(backend)
    }

    /// Loads the complete architectural state into the vCPU.
    pub fn set_cpu_state(&mut self, cpu: &Cpu) -> Result<(), BackendError> {
        let mut sregs = self.vcpu.get_sregs().map_err(|e| ioctl_failed("KVM_GET_SREGS", e))?;
        apply_sregs(&mut sregs, cpu);
        self.vcpu.set_sregs(&sregs).map_err(|e| ioctl_failed("KVM_SET_SREGS", e))?;
        self.vcpu.set_regs(&to_kvm_regs(cpu)).map_err(|e| ioctl_failed("KVM_SET_REGS", e))?;
        let entries = msr_entries(cpu);
        let msrs = KvmMsrs::from_entries(&entries).map_err(|e| failed(format!("building the MSR list: {e:?}")))?;
        match self.vcpu.set_msrs(&msrs) {
            Ok(n) if n == entries.len() => {}
            Ok(n) => warn!(set = n, wanted = entries.len(), "KVM accepted only some MSRs"),
            Err(e) => return Err(ioctl_failed("KVM_SET_MSRS", e)),
        }
        Ok(())
    }

    fn run_field<T: Copy>(&self, f: impl FnOnce(*const kvm_run) -> *const T) -> T {
        // SAFETY: `run` is the vCPU's live kvm_run mapping; KVM writes it
        // only inside KVM_RUN on this thread, so nothing changes it under us.
        unsafe { std::ptr::read_volatile(f(self.run.as_ptr())) }
    }

    /// Pointer to element `i` of the current I/O exit's data.
    fn io_data(&self, io: &IoExit, i: u32) -> *mut u8 {
        let off = io.data_offset as usize + (i as usize) * usize::from(io.size);
        // SAFETY: KVM places the I/O data inside the kvm_run mapping at
        // `data_offset`, size × count bytes long; `i < count`.
        unsafe { self.run.as_ptr().cast::<u8>().add(off) }
    }

    /// The next element of a pending string OUT, if any.
    fn replay_out(&mut self) -> Option<VmExit> {
        let io = self.io.as_mut().filter(|io| !io.is_in && io.next < io.count)?;
        let i = io.next;
        io.next += 1;
        let io = *io;
        let mut v = [0u8; 4];
        // SAFETY: `io_data` points at `size` (≤ 4) readable bytes.
        unsafe { std::ptr::copy_nonoverlapping(self.io_data(&io, i), v.as_mut_ptr(), usize::from(io.size)) };
        self.stats.io_out += 1;
        Some(VmExit::IoOut { port: io.port, size: io.size, value: u32::from_le_bytes(v) })
    }

    fn describe_internal_error(&mut self) -> String {
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the union holds
        // `internal`.
        let internal =
            unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*self.run.as_ptr()).__bindgen_anon_1.internal)) };
        let n = (internal.ndata as usize).min(internal.data.len());
        let kind = match internal.suberror {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event",
            4 => "unexpected exit",
            _ => "other",
        };
        let cpu = self.cpu_state();
        let bytes = self.code_bytes(&cpu);
        format!(
            "KVM internal error: suberror {} ({kind}), data {:x?}; guest code at {:08x}: {bytes}\n{}",
            internal.suberror,
            &internal.data[..n],
            cpu.linear_eip(),
            cpu.dump()
        )
    }

    /// Up to 16 bytes at the guest's CS:EIP, for error reports.
    fn code_bytes(&self, cpu: &Cpu) -> String {
        let linear = u64::from(cpu.linear_eip());
        let phys = match self.vcpu.translate_gva(linear) {
            Ok(t) if t.valid != 0 => t.physical_address,
            _ if !cpu.paging() => linear,
            _ => return "(not mapped)".into(),
        };
        let Some(avail) = (self.ram.size as u64).checked_sub(phys) else { return "(outside RAM)".into() };
        let n = avail.min(16) as usize;
        // SAFETY: `phys + n` lies inside the RAM mapping.
        let bytes = unsafe { std::slice::from_raw_parts(self.ram.addr.as_ptr().cast::<u8>().add(phys as usize), n) };
        bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
    }

    fn exit_from_kvm(&mut self) -> Result<VmExit, BackendError> {
        self.kick_enter();
        let result = self.vcpu.run();
        let exit = match result {
            Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::IoOut(..)) => Ok(None),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.mmio_read = true;
                Ok(Some(VmExit::MmioRead { addr, size: data.len() as u8 }))
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let mut v = [0u8; 8];
                let n = data.len().min(8);
                v[..n].copy_from_slice(&data[..n]);
                Ok(Some(VmExit::MmioWrite { addr, size: n as u8, value: u64::from_le_bytes(v) }))
            }
            Ok(VcpuExit::Hlt) => Ok(Some(VmExit::Halt)),
            Ok(VcpuExit::Intr) => Ok(Some(VmExit::Interrupted)),
            Ok(VcpuExit::Shutdown) => Ok(Some(VmExit::TripleFault)),
            Ok(VcpuExit::IrqWindowOpen) => Ok(Some(VmExit::InterruptWindow)),
            Ok(VcpuExit::InternalError) => Err(None),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Err(Some(format!("VM entry failed: hardware reason {reason:#x} on host CPU {cpu}")))
            }
            Ok(other) => Err(Some(format!("unexpected KVM exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(Some(VmExit::Interrupted)),
            Err(e) => Err(Some(format!("KVM_RUN: {e}"))),
        };
        self.kick_leave();
        match exit {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Ok(self.io_exit()),
            Err(Some(what)) => Err(failed(what)),
            Err(None) => Err(failed(self.describe_internal_error())),
        }
    }

    /// Decodes KVM_EXIT_IO into the first element of a (string) I/O.
    fn io_exit(&mut self) -> VmExit {
        // SAFETY: exit_reason is KVM_EXIT_IO, so the union holds `io`.
        let raw = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*self.run.as_ptr()).__bindgen_anon_1.io)) };
        let io = IoExit {
            port: raw.port,
            size: raw.size,
            count: raw.count.max(1),
            next: 0,
            data_offset: raw.data_offset,
            is_in: u32::from(raw.direction) == kvm_bindings::KVM_EXIT_IO_IN,
        };
        self.io = Some(io);
        if io.is_in {
            self.stats.io_in += 1;
            VmExit::IoIn { port: io.port, size: io.size }
        } else {
            self.replay_out().expect("an OUT exit has at least one element")
        }
    }

    fn kick_enter(&mut self) {
        // SAFETY: pthread_self has no preconditions.
        lock(&self.kick).thread = Some(unsafe { libc::pthread_self() });
    }

    fn kick_leave(&mut self) {
        let mut k = lock(&self.kick);
        k.thread = None;
        // A kick consumed by this exit (or arriving during it) is answered by
        // returning now; later kicks set the flag again.
        if self.run_field(|r| {
            // SAFETY: only forms a pointer to a field of the live mapping.
            unsafe { std::ptr::addr_of!((*r).immediate_exit) }
        }) != 0
        {
            // SAFETY: as in `run_field`; the kick mutex is held, so the kicker
            // is not writing the flag at the same time.
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*self.run.as_ptr()).immediate_exit), 0) };
        }
    }
}

impl Drop for KvmBackend {
    fn drop(&mut self) {
        lock(&self.kick).run = None;
    }
}

impl Backend for KvmBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&mut self) -> Result<VmExit, BackendError> {
        if let Some(exit) = self.replay_out() {
            return Ok(exit);
        }
        if let Some(io) = self.io.as_mut().filter(|io| io.is_in && io.next < io.count) {
            // A string IN wants its next element: ask without re-entering.
            if io.next > 0 {
                self.stats.io_in += 1;
                return Ok(VmExit::IoIn { port: io.port, size: io.size });
            }
        }
        self.io = None;
        self.mmio_read = false;
        self.ran = true;
        self.stats.runs += 1;
        let exit = self.exit_from_kvm()?;
        match exit {
            VmExit::MmioRead { .. } | VmExit::MmioWrite { .. } => self.stats.mmio += 1,
            VmExit::Halt => self.stats.halt += 1,
            VmExit::Interrupted => self.stats.interrupted += 1,
            VmExit::InterruptWindow => self.stats.window += 1,
            _ => {}
        }
        Ok(exit)
    }

    fn complete_io_in(&mut self, value: u32) {
        let Some(io) = self.io.filter(|io| io.is_in && io.next < io.count) else {
            warn!("complete_io_in without a pending IN");
            return;
        };
        let bytes = value.to_le_bytes();
        let n = usize::from(io.size).min(4);
        // SAFETY: `io_data` points at `size` writable bytes of kvm_run.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.io_data(&io, io.next), n) };
        if let Some(p) = self.io.as_mut() {
            p.next += 1;
        }
    }

    fn complete_mmio_read(&mut self, value: u64) {
        if !self.mmio_read {
            warn!("complete_mmio_read without a pending MMIO read");
            return;
        }
        // SAFETY: the last exit was KVM_EXIT_MMIO (a read), so the union
        // holds `mmio`; `len` ≤ 8 bytes of `data` are written.
        unsafe {
            let mmio = std::ptr::addr_of_mut!((*self.run.as_ptr()).__bindgen_anon_1.mmio);
            let len = ((*mmio).len as usize).min(8);
            let data = &mut (*mmio).data;
            data[..len].copy_from_slice(&value.to_le_bytes()[..len]);
        }
        self.mmio_read = false;
    }

    fn interrupts_enabled(&self) -> bool {
        if !self.ran {
            return false;
        }
        let ready = self.run_field(|r| {
            // SAFETY: only forms a pointer to a field of the live mapping.
            unsafe { std::ptr::addr_of!((*r).ready_for_interrupt_injection) }
        });
        let if_flag = self.run_field(|r| {
            // SAFETY: as above.
            unsafe { std::ptr::addr_of!((*r).if_flag) }
        });
        ready != 0 && if_flag != 0
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<(), BackendError> {
        let irq = kvm_bindings::kvm_interrupt { irq: u32::from(vector) };
        // SAFETY: KVM_INTERRUPT on our vCPU fd with a pointer to a live
        // `kvm_interrupt`, which the kernel only reads.
        let rc =
            unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&self.vcpu), KVM_INTERRUPT as _, &irq as *const _) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(failed(format!("KVM_INTERRUPT vector {vector:#x}: {e}")));
        }
        self.stats.injected += 1;
        Ok(())
    }

    fn request_interrupt_window(&mut self, on: bool) {
        // SAFETY: the field is read by KVM only inside KVM_RUN on this thread.
        unsafe {
            std::ptr::write_volatile(
                std::ptr::addr_of_mut!((*self.run.as_ptr()).request_interrupt_window),
                u8::from(on),
            )
        };
    }

    fn kicker(&self) -> Kick {
        let shared = self.kick.clone();
        let sig = kick_signal();
        Arc::new(move || {
            let k = lock(&shared);
            if let Some(run) = k.run {
                // SAFETY: the backend is alive (it clears `run` under this
                // mutex before unmapping); KVM reads immediate_exit at entry.
                unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run.as_ptr()).immediate_exit), 1) };
            }
            if let Some(t) = k.thread {
                // SAFETY: `t` is inside `run` (it clears `thread` under this
                // mutex before returning), so it is a live thread; the
                // handler for `sig` is installed and does nothing.
                unsafe { libc::pthread_kill(t, sig) };
            }
        })
    }

    fn cpu_state(&mut self) -> Cpu {
        let mut cpu = Cpu::reset();
        let (regs, sregs) = match (self.vcpu.get_regs(), self.vcpu.get_sregs()) {
            (Ok(r), Ok(s)) => (r, s),
            (r, s) => {
                warn!(regs = ?r.err(), sregs = ?s.err(), "cannot read the KVM vCPU state");
                return cpu;
            }
        };
        cpu.gpr = [regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi].map(|v| v as u32);
        cpu.eip = regs.rip as u32;
        cpu.eflags = regs.rflags as u32;
        for (s, k) in [
            (Seg::Es, &sregs.es),
            (Seg::Cs, &sregs.cs),
            (Seg::Ss, &sregs.ss),
            (Seg::Ds, &sregs.ds),
            (Seg::Fs, &sregs.fs),
            (Seg::Gs, &sregs.gs),
        ] {
            cpu.seg[s as usize] = from_kvm_seg(k);
        }
        cpu.tr = from_kvm_seg(&sregs.tr);
        cpu.ldtr = from_kvm_seg(&sregs.ldt);
        cpu.gdtr = TableReg { base: sregs.gdt.base as u32, limit: sregs.gdt.limit };
        cpu.idtr = TableReg { base: sregs.idt.base as u32, limit: sregs.idt.limit };
        cpu.cr0 = sregs.cr0 as u32;
        cpu.cr2 = sregs.cr2 as u32;
        cpu.cr3 = sregs.cr3 as u32;
        cpu.cr4 = sregs.cr4 as u32;
        cpu.msr.efer = sregs.efer;
        cpu.msr.apic_base = sregs.apic_base;
        cpu.cpl = if cpu.cr0 & cr0::PE == 0 {
            0
        } else if cpu.eflags & flags::VM != 0 {
            3
        } else {
            sregs.ss.dpl & 3
        };
        if let Ok(events) = self.vcpu.get_vcpu_events() {
            cpu.interrupt_shadow = events.interrupt.shadow != 0;
        }
        if let Ok(d) = self.vcpu.get_debug_regs() {
            cpu.dr[..4].copy_from_slice(&d.db.map(|v| v as u32));
            cpu.dr[6] = d.dr6 as u32;
            cpu.dr[7] = d.dr7 as u32;
        }
        let entries: Vec<kvm_msr_entry> =
            MSR_LIST.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        if let Ok(mut msrs) = KvmMsrs::from_entries(&entries) {
            if let Ok(n) = self.vcpu.get_msrs(&mut msrs) {
                for e in &msrs.as_slice()[..n] {
                    match e.index {
                        msr::SYSENTER_CS => cpu.msr.sysenter_cs = e.data as u32,
                        msr::SYSENTER_ESP => cpu.msr.sysenter_esp = e.data as u32,
                        msr::SYSENTER_EIP => cpu.msr.sysenter_eip = e.data as u32,
                        msr::PAT => cpu.msr.pat = e.data,
                        _ => {}
                    }
                }
            }
        }
        cpu
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let s = &self.stats;
        [
            ("kvm/runs", s.runs),
            ("kvm/exits/io_in", s.io_in),
            ("kvm/exits/io_out", s.io_out),
            ("kvm/exits/mmio", s.mmio),
            ("kvm/exits/halt", s.halt),
            ("kvm/exits/interrupted", s.interrupted),
            ("kvm/exits/interrupt_window", s.window),
            ("kvm/interrupts_injected", s.injected),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect()
    }
}

impl KvmBackend {
    /// The VM file descriptor (for callers that add devices KVM can model).
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }
}

// ---- speed ------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, r: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, eax: r[0], ebx: r[1], ecx: r[2], edx: r[3], ..Default::default() }
    }

    #[test]
    fn cpuid_policy_is_a_plain_686() {
        let host = [
            leaf(0, [0x10, 0x6874_7541, 0x444D_4163, 0x6974_6E65]), // AuthenticAMD
            leaf(1, [0x00A0_0F11, 0x0A20_0800, 0xFEDA_3203, 0x178B_FBFF]),
            leaf(7, [0, 0xFFFF_FFFF, 0, 0]),
            leaf(0x4000_0000, [0x4000_0001, 1, 2, 3]),
            leaf(0x8000_0000, [0x8000_0028, 0x6874_7541, 0x444D_4163, 0x6974_6E65]),
            leaf(0x8000_0001, [0x00A0_0F11, 0, 0x75C2_37FF, 0x2FD3_FBFF]),
            leaf(0x8000_0002, [1, 2, 3, 4]),
            leaf(0x8000_0003, [5, 6, 7, 8]),
            leaf(0x8000_0004, [9, 10, 11, 12]),
            leaf(0x8000_0008, [0x3030, 0, 0, 0]),
        ];
        let p = cpuid_policy(&host);
        let get = |f: u32| p.iter().find(|e| e.function == f).copied();
        let l0 = get(0).unwrap();
        assert_eq!((l0.eax, l0.ebx, l0.ecx, l0.edx), (1, 0x6874_7541, 0x444D_4163, 0x6974_6E65), "vendor kept");
        let l1 = get(1).unwrap();
        assert_eq!(l1.ecx, 0, "no SSE3+, RDRAND (bit 30), x2APIC (21), AVX (28), XSAVE (26)");
        assert_eq!(l1.edx & (1 << 9), 0, "no APIC");
        assert_eq!(l1.edx & (1 << 11), 0, "no SEP");
        assert_eq!(l1.edx & (1 << 6), 0, "no PAE");
        for bit in [0, 3, 4, 8, 13, 15, 16, 23, 24, 25, 26] {
            assert_ne!(l1.edx & (1 << bit), 0, "686 feature bit {bit} kept");
        }
        assert_eq!(l1.ebx >> 24, 0, "APIC id 0");
        assert!(get(7).is_none() && get(0x4000_0000).is_none() && get(0x8000_0008).is_none());
        assert_eq!(get(0x8000_0000).unwrap().eax, 0x8000_0004);
        let e1 = get(0x8000_0001).unwrap();
        assert_eq!((e1.ecx, e1.edx), (0, 0), "no SYSCALL, long mode, NX");
        assert_eq!(get(0x8000_0003).unwrap().ebx, 6, "brand string kept");
    }

    #[test]
    fn segments_round_trip() {
        let cpu = Cpu::flat_protected(0x08, 0x10);
        for s in Seg::ALL {
            assert_eq!(from_kvm_seg(&to_kvm_seg(cpu.seg(s))), *cpu.seg(s));
        }
        assert_eq!(from_kvm_seg(&to_kvm_seg(&cpu.tr)), cpu.tr);
        assert_eq!(to_kvm_seg(&cpu.ldtr).unusable, 1, "a null LDTR is unusable");
    }
}
