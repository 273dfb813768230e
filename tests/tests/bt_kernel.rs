//! The binary translator end to end (issue 3): kernel-mode guests run from
//! the translation cache, with paging off (the window maps guest-physical
//! memory 1:1), and every sensitive instruction sees the virtual state.

use std::sync::Arc;

use iced_x86::code_asm::*;
use monitor::backend::bt::{BtBackend, BtConfig};
use monitor::backend::{Backend, VmExit};
use monitor::cpu::Cpu;
use monitor::memory::GuestMemory;
use popek_tests::{assemble, vm_lock};

const CODE: u32 = 0x10_0000;
const DATA: u32 = 0x20_0000;
const STACK: u32 = 0x30_0000;

#[allow(dead_code)] // `mem` is for tests that inspect guest RAM
struct Kernel {
    bt: BtBackend,
    mem: Arc<GuestMemory>,
    /// Values the guest wrote with OUT, by port.
    outs: Vec<(u16, u32)>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl Kernel {
    fn new(f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>) -> Kernel {
        let lock = vm_lock();
        let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
        mem.write(CODE as u64, &assemble(CODE, f)).unwrap();
        let mut cpu = Cpu::flat_protected(0x08, 0x10);
        cpu.eip = CODE;
        cpu.gpr[4] = STACK;
        let bt = BtBackend::new(mem.clone(), cpu, BtConfig::default()).expect("bt backend");
        Kernel { bt, mem, outs: Vec::new(), _lock: lock }
    }

    /// Runs until the guest writes port 0xf4 (returns the value), answering
    /// IN from port 0x60 with 0x5A.
    fn run(&mut self) -> u32 {
        for _ in 0..100_000 {
            match self.bt.run().expect("run") {
                VmExit::IoOut { port: 0xF4, value, .. } => return value,
                VmExit::IoOut { port, value, .. } => self.outs.push((port, value)),
                VmExit::IoIn { port: 0x60, .. } => self.bt.complete_io_in(0x5A),
                VmExit::IoIn { .. } => self.bt.complete_io_in(0xFFFF_FFFF),
                VmExit::Interrupted => {}
                e => panic!("unexpected exit {e:?} at {:#x}\n{}", self.bt.cpu().eip, self.bt.cpu().dump()),
            }
        }
        panic!("guest did not finish");
    }
}

#[test]
fn compute_and_calls_run_translated() {
    let mut k = Kernel::new(|a| {
        let mut fib = a.create_label();
        let mut base = a.create_label();
        let mut l = a.create_label();
        a.mov(eax, 20)?;
        a.call(fib)?;
        a.mov(ebx, eax)?;
        // a loop crossing a page boundary is exercised by the padding below
        a.xor(ecx, ecx)?;
        a.mov(edx, 1000)?;
        a.set_label(&mut l)?;
        a.add(ecx, edx)?;
        a.dec(edx)?;
        a.jnz(l)?;
        a.mov(eax, ebx)?;
        a.out(0xF4, eax)?;
        a.set_label(&mut fib)?;
        a.cmp(eax, 2)?;
        a.jb(base)?;
        a.push(eax)?;
        a.dec(eax)?;
        a.call(fib)?;
        a.mov(ecx, eax)?;
        a.pop(eax)?;
        a.push(ecx)?;
        a.sub(eax, 2)?;
        a.call(fib)?;
        a.pop(ecx)?;
        a.add(eax, ecx)?;
        a.set_label(&mut base)?;
        a.ret()
    });
    assert_eq!(k.run(), 6765);
    assert_eq!(k.bt.cpu().gpr[1], 500_500);
    let s = k.bt.stats();
    let get = |n: &str| s.iter().find(|(k, _)| k == n).map_or(0, |x| x.1);
    assert!(get("engine/blocks_translated") > 3, "{s:?}");
}

#[test]
fn sensitive_instructions_see_virtual_state() {
    let mut k = Kernel::new(|a| {
        a.cli()?;
        a.pushfd()?;
        a.pop(eax)?;
        a.out(0x80, eax)?; // flags with virtual IF=0
        a.sti()?;
        a.pushfd()?;
        a.pop(eax)?;
        a.out(0x80, eax)?; // IF=1
        a.mov(eax, cr0)?;
        a.out(0x80, eax)?;
        a.smsw(eax)?;
        a.out(0x80, eax)?;
        a.mov(eax, cs)?;
        a.out(0x80, eax)?;
        a.in_(al, 0x60)?;
        a.out(0x80, eax)?;
        a.sgdt(ptr(DATA))?;
        a.mov(eax, dword_ptr(DATA + 2))?;
        a.out(0x80, eax)?;
        a.xor(eax, eax)?;
        a.cpuid()?;
        a.mov(eax, ebx)?;
        a.out(0x80, eax)?;
        a.out(0xF4, al)
    });
    k.run();
    let v: Vec<u32> = k.outs.iter().map(|x| x.1).collect();
    assert_eq!(v[0] & 0x200, 0, "PUSHF after CLI shows IF=0");
    assert_eq!(v[1] & 0x200, 0x200, "PUSHF after STI shows IF=1");
    assert_eq!(v[2] & 1, 1, "CR0.PE as the guest set it");
    assert_eq!(v[3] & 0xFFFF, v[2] & 0xFFFF, "SMSW = CR0 low word");
    assert_eq!(v[4] & 0xFFFF, 0x08, "mov ax, cs shows the guest selector, RPL 0");
    assert_eq!(v[5] & 0xFF, 0x5A, "IN reached the port bus");
    assert_eq!(v[6], k.bt.cpu().gdtr.base);
    assert_eq!(v[7], u32::from_le_bytes(*b"Genu"), "CPUID follows the policy");
}
