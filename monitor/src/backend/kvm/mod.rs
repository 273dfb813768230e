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

mod host;
mod state;

use self::host::{install_kick_handler, lock, open_kvm, KickShared, KickState, RamMapping};
pub use self::host::{is_hardware_speed, measure_speed, supports_32bit_paging};
pub use self::state::cpuid_policy;
use self::state::{apply_sregs, from_kvm_seg, msr_entries, to_kvm_regs, MSR_LIST};

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
