//! Shared helpers for Popek's integration tests: guests assembled with
//! iced-x86's `CodeAssembler` (bitness 32), and a one-vCPU-at-a-time lock
//! (the window, the host LDT and the signal handlers are process-global).

use std::sync::{Mutex, MutexGuard};

use iced_x86::code_asm::CodeAssembler;
use monitor::host::{Prot, Vcpu};
use monitor::memory::GuestMemory;

static VM_LOCK: Mutex<()> = Mutex::new(());

/// Takes the process-wide VM lock (poison-tolerant: a failed test must not
/// fail every other one).
pub fn vm_lock() -> MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the test guests live (guest-physical = guest-virtual).
pub const CODE: u32 = 0x10_0000;
pub const DATA: u32 = 0x20_0000;
pub const STACK_TOP: u32 = 0x30_0000;
pub const RAM: u64 = 16 << 20;

/// A vCPU with 16 MiB of guest RAM mapped 1:1 at [1 MiB, 16 MiB) RWX.
pub struct Guest {
    pub vcpu: Vcpu,
    pub mem: GuestMemory,
    _lock: MutexGuard<'static, ()>,
}

impl Guest {
    pub fn new() -> Guest {
        let lock = vm_lock();
        let vcpu = Vcpu::new().expect("execution host");
        let mem = GuestMemory::new(RAM).expect("guest RAM");
        let w = vcpu.window();
        w.unmap_all().expect("clean window");
        w.map(0x10_0000, &mem, 0x10_0000, (RAM as u32) - 0x10_0000, Prot::RWX).expect("map RAM");
        Guest { vcpu, mem, _lock: lock }
    }

    /// Assembles `f`'s code at CODE, loads it, points EIP at it and ESP at STACK_TOP.
    pub fn load(&mut self, f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>) -> Vec<u8> {
        let code = assemble(CODE, f);
        self.mem.write(CODE as u64, &code).expect("load code");
        let mut r = self.vcpu.regs();
        r.eip = CODE;
        r.esp = STACK_TOP;
        self.vcpu.set_regs(&r);
        code
    }
}

impl Default for Guest {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.vcpu.window().unmap_all();
    }
}

/// Assembles 32-bit code at `ip`.
pub fn assemble(ip: u32, f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).expect("bitness 32");
    f(&mut a).expect("assemble");
    a.assemble(u64::from(ip)).expect("encode")
}

/// Assembles 32-bit code whose immediates need label addresses: `f` gets
/// the addresses of the labels it returned on the previous pass (a
/// placeholder on the first), so it must use fixed-size forms for them
/// (`mov r32, imm32`, `mov dword [m], imm32`).
pub fn assemble_resolving(
    ip: u32,
    f: impl Fn(&mut CodeAssembler, &dyn Fn(usize) -> u32) -> Result<Vec<iced_x86::code_asm::CodeLabel>, iced_x86::IcedError>,
) -> Vec<u8> {
    let mut addrs: Vec<u32> = Vec::new();
    for _ in 0..2 {
        let mut a = CodeAssembler::new(32).expect("bitness 32");
        let known = addrs.clone();
        let labels = f(&mut a, &|i| known.get(i).copied().unwrap_or(0x1234_5678)).expect("assemble");
        let r = a
            .assemble_options(u64::from(ip), iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .expect("encode");
        addrs = labels.iter().map(|l| r.label_ip(l).expect("label address") as u32).collect();
        if !known.is_empty() {
            return r.inner.code_buffer;
        }
    }
    unreachable!("two passes always return")
}

/// Guest-physical addresses of the descriptor tables [`flat_tables`] builds.
pub const GDT: u32 = 0x1000;
pub const IDT: u32 = 0x2000;

/// A Linux-like GDT at [`GDT`] (0x08 kernel code, 0x10 kernel data, 0x18
/// second kernel code, 0x20 LDT at 0x3000, 0x28 TSS at 0x4000 with
/// SS0:ESP0 = 0x10:`ring0_stack`, 0x33 user code, 0x3b user data) and an IDT
/// at [`IDT`] with interrupt gates (`vector`, handler, DPL) in guest memory;
/// loads GDTR, IDTR and TR in `cpu`.
pub fn flat_tables(mem: &GuestMemory, cpu: &mut monitor::cpu::Cpu, gates: &[(u8, u32, u8)], ring0_stack: u32) {
    use monitor::cpu::{Descriptor, SegReg, TableReg};
    let gdt: [u64; 8] = [
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_9b00_0000_ffff,
        0x0000_8200_3000_0fff,
        0x0000_8900_4000_0067,
        0x00cf_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write(u64::from(GDT) + 8 * i as u64, &d.to_le_bytes()).unwrap();
    }
    for &(v, h, dpl) in gates {
        let lo = (h & 0xFFFF) | (0x08 << 16);
        let hi = (h & 0xFFFF_0000) | 0x8E00 | (u32::from(dpl) << 13);
        mem.write(u64::from(IDT) + 8 * u64::from(v), &(u64::from(lo) | (u64::from(hi) << 32)).to_le_bytes()).unwrap();
    }
    mem.write_u32(0x4004, ring0_stack).unwrap();
    mem.write_u32(0x4008, 0x10).unwrap();
    cpu.gdtr = TableReg { base: GDT, limit: 8 * 8 - 1 };
    cpu.idtr = TableReg { base: IDT, limit: 0x7FF };
    cpu.tr = SegReg { selector: 0x28, cache: Descriptor::from_u64(0x0000_8b00_4000_0067) };
}

/// A console sink tests can read back.
#[derive(Clone, Default)]
pub struct Capture(pub std::sync::Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Emits code that prints `s` on COM1, polling LSR.THRE before each byte.
pub fn print_serial(a: &mut CodeAssembler, s: &[u8]) -> Result<(), iced_x86::IcedError> {
    use iced_x86::code_asm::*;
    for &c in s {
        let mut wait = a.create_label();
        a.set_label(&mut wait)?;
        a.mov(dx, 0x3FDu32)?;
        a.in_(al, dx)?;
        a.test(al, 0x20)?;
        a.jz(wait)?;
        a.mov(dx, 0x3F8u32)?;
        a.mov(al, u32::from(c))?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// The PC platform on the host's clocks with its console captured, for a
/// machine with `ram_size` bytes of RAM.
pub fn captured_platform(
    ram_size: u64,
) -> (monitor::devices::Platform, Capture, std::sync::Arc<dyn monitor::devices::Clock>) {
    use monitor::devices::{Clock, HostClock, HostWallClock, Platform, PlatformConfig};
    let out = Capture::default();
    let clock: std::sync::Arc<dyn Clock> = std::sync::Arc::new(HostClock::new());
    let platform = Platform::new(PlatformConfig {
        ram_size,
        console: Box::new(out.clone()),
        clock: clock.clone(),
        wall_clock: std::sync::Arc::new(HostWallClock),
    })
    .expect("platform");
    (platform, out, clock)
}

/// Emits, at label `fib`, a naive recursive `fib(EAX) -> EAX` through the
/// guest stack (clobbers ECX): the same computation for direct and
/// translated runs.
pub fn emit_fib(a: &mut CodeAssembler, fib: &mut iced_x86::code_asm::CodeLabel) -> Result<(), iced_x86::IcedError> {
    use iced_x86::code_asm::*;
    let mut base = a.create_label();
    a.set_label(fib)?;
    a.cmp(eax, 2)?;
    a.jb(base)?;
    a.push(eax)?;
    a.dec(eax)?;
    a.call(*fib)?;
    a.mov(ecx, eax)?;
    a.pop(eax)?;
    a.push(ecx)?;
    a.sub(eax, 2)?;
    a.call(*fib)?;
    a.pop(ecx)?;
    a.add(eax, ecx)?;
    a.set_label(&mut base)?;
    a.ret()
}
