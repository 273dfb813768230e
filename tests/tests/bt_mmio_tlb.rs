//! Issue 4: MMIO accesses are emulated and reach a device with the right
//! size and value; the shadow MMU follows TLB semantics (INVLPG, stale
//! entries until a CR3 reload, global pages surviving it).

use std::sync::{Arc, Mutex};

use iced_x86::code_asm::*;
use monitor::backend::bt::{BtBackend, BtConfig};
use monitor::cpu::Cpu;
use monitor::devices::MmioDevice;
use monitor::memory::GuestMemory;
use monitor::vm::{RunOutcome, Vm};
use popek_tests::*;

const DATA: u32 = 0x20_0000;
const MMIO: u32 = 0xFEB0_0000;

/// Records every access; reads return 0xA0 + the offset's low byte per byte.
#[derive(Default)]
struct Recorder(Vec<(bool, u64, Vec<u8>)>);

impl MmioDevice for Recorder {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = 0xA0u8.wrapping_add((addr as u8).wrapping_add(i as u8));
        }
        self.0.push((false, addr, data.to_vec()));
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        self.0.push((true, addr, data.to_vec()));
    }
}

fn machine(code: &[u8], device: Option<Arc<Mutex<Recorder>>>) -> (std::sync::MutexGuard<'static, ()>, Vm, Capture) {
    let lock = vm_lock();
    let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
    mem.write(u64::from(CODE), code).unwrap();
    let mut cpu = Cpu::flat_protected(0x08, 0x10);
    cpu.eip = CODE;
    cpu.gpr[4] = STACK_TOP;
    flat_tables(&mem, &mut cpu, &[], STACK_TOP);
    let (mut platform, out, clock) = captured_platform(mem.size());
    if let Some(d) = device {
        platform.register_mmio("recorder", u64::from(MMIO), 0x1000, d).unwrap();
    }
    let bt = BtBackend::new(mem.clone(), cpu, BtConfig::default()).unwrap();
    (lock, Vm::new(mem, platform, Box::new(bt), clock), out)
}

#[test]
fn mmio_reads_and_writes_reach_the_device() {
    let code = assemble(CODE, |a| {
        a.mov(dword_ptr(MMIO + 0x10), 0x1234_5678)?; // 4-byte write
        a.mov(ax, word_ptr(MMIO + 0x20))?; // 2-byte read
        a.mov(dword_ptr(DATA), eax)?;
        a.mov(byte_ptr(MMIO + 0x30), 0x5A)?; // 1-byte write
        a.add(dword_ptr(MMIO + 0x40), 5)?; // read-modify-write
        a.pushfd()?;
        a.pop(dword_ptr(DATA + 4))?; // flags of the emulated ADD
        a.mov(al, 0)?;
        a.out(0xF4, al)
    });
    let dev = Arc::new(Mutex::new(Recorder::default()));
    let (_l, mut vm, _out) = machine(&code, Some(dev.clone()));
    assert_eq!(vm.run().unwrap(), RunOutcome::DebugExit(1));
    let log = dev.lock().unwrap().0.clone();
    let base = u64::from(MMIO);
    assert_eq!(
        log,
        vec![
            (true, base + 0x10, 0x1234_5678u32.to_le_bytes().to_vec()),
            (false, base + 0x20, vec![0xC0, 0xC1]),
            (true, base + 0x30, vec![0x5A]),
            (false, base + 0x40, vec![0xE0, 0xE1, 0xE2, 0xE3]),
            (true, base + 0x40, (0xE3E2_E1E0u32 + 5).to_le_bytes().to_vec()),
        ]
    );
    assert_eq!(vm.mem.read_u32(u64::from(DATA)).unwrap() & 0xFFFF, 0xC1C0, "the value read reached AX");
    assert_eq!(
        vm.mem.read_u32(u64::from(DATA) + 4).unwrap() & 0x8D5,
        0x080,
        "ADD's flags: SF set, no carry/zero/overflow"
    );
}

const PD: u32 = 0x40_0000;
const PT: u32 = 0x40_1000;
const VA: u32 = 0x80_0000; // through PT[0]
const GVA: u32 = 0x80_1000; // through PT[1], global

/// Paging on with 4 MiB identity pages for the kernel and a page table
/// for 8-12 MiB; #PF handler: records CR2 and the error code in DATA, then
/// stops the guest (out 0xF4 with 0x99).
#[test]
fn tlb_semantics_invlpg_stale_entries_and_global_pages() {
    let code = assemble_resolving(CODE, |a, addr| {
        let mut pf = a.create_label();
        a.mov(eax, addr(0))?;
        a.mov(word_ptr(IDT + 14 * 8), ax)?;
        a.mov(word_ptr(IDT + 14 * 8 + 2), 0x08)?;
        a.mov(word_ptr(IDT + 14 * 8 + 4), 0x8E00)?;
        a.shr(eax, 16)?;
        a.mov(word_ptr(IDT + 14 * 8 + 6), ax)?;
        a.mov(dword_ptr(PD), 0x0000_0083)?; // 0-8 MiB identity, supervisor, PSE
        a.mov(dword_ptr(PD + 4), 0x0040_0083)?;
        a.mov(dword_ptr(PD + 8), PT | 3)?;
        a.mov(dword_ptr(PT), 0x50_0000 | 3)?; // VA -> 5 MiB, RW
        a.mov(dword_ptr(PT + 4), 0x50_1000 | 0x103)?; // GVA -> 5 MiB + 4 KiB, RW, global
        a.mov(dword_ptr(0x50_0000), 0x1111)?; // physical contents
        a.mov(dword_ptr(0x50_1000), 0x2222)?;
        a.mov(eax, PD)?;
        a.mov(cr3, eax)?;
        a.mov(eax, 0x90)?; // PSE | PGE
        a.mov(cr4, eax)?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8001_0000u32)?; // PG | WP
        a.mov(cr0, eax)?;
        // 1. Both pages readable through the new mappings.
        a.mov(esi, dword_ptr(VA))?;
        a.add(esi, dword_ptr(GVA))?; // 0x3333
                                     // 2. Stale entries: make both not present without INVLPG: reads
                                     //    may still hit the old translation (what a TLB does).
        a.mov(dword_ptr(PT), 0)?;
        a.mov(dword_ptr(PT + 4), 0)?;
        a.add(esi, dword_ptr(VA))?; // 0x4444
        a.add(esi, dword_ptr(GVA))?; // 0x6666
                                     // 3. A CR3 reload drops the non-global one; the global one survives.
        a.mov(eax, cr3)?;
        a.mov(cr3, eax)?;
        a.add(esi, dword_ptr(GVA))?; // 0x8888: global survived
        a.mov(dword_ptr(DATA + 8), esi)?;
        // 4. INVLPG drops the global one too; restore VA read-only and
        //    write it: #PF(P|W) at VA.
        a.invlpg(ptr(GVA))?;
        a.mov(dword_ptr(PT), 0x50_0000 | 1)?;
        a.invlpg(ptr(VA))?;
        a.mov(dword_ptr(VA), 7)?;
        a.mov(al, 0)?; // not reached
        a.out(0xF4, al)?;
        a.set_label(&mut pf)?;
        a.mov(eax, cr2)?;
        a.mov(dword_ptr(DATA), eax)?;
        a.pop(eax)?;
        a.mov(dword_ptr(DATA + 4), eax)?;
        a.mov(al, 0x99)?;
        a.out(0xF4, al)?;
        Ok(vec![pf])
    });
    let (_l, mut vm, out) = machine(&code, None);
    assert_eq!(vm.run().unwrap(), RunOutcome::DebugExit((0x99 << 1) | 1), "{}", out.text());
    let m = &vm.mem;
    assert_eq!(m.read_u32(u64::from(DATA) + 8).unwrap(), 0x8888, "stale reads hit, global survived the CR3 reload");
    assert_eq!(m.read_u32(u64::from(DATA)).unwrap(), VA, "CR2");
    assert_eq!(m.read_u32(u64::from(DATA) + 4).unwrap(), 0b011, "present, write, supervisor");
    // A and D bits the hardware would have set: VA's PTE was rewritten by
    // the guest (A clear), the PD entry for 8 MiB was walked (A set).
    assert_ne!(m.read_u32(u64::from(PD) + 8).unwrap() & 0x20, 0, "PDE accessed");
}

/// A guest without exception handlers: #UD → no gate → #GP → #DF → triple
/// fault. The run ends with a report of the guest state, not a hang.
#[test]
fn triple_fault_ends_the_run_with_the_guest_state() {
    let code = assemble(CODE, |a| {
        a.mov(eax, 0xDEAD_BEEFu32)?;
        a.ud2()
    });
    let (_l, mut vm, _out) = machine(&code, None);
    match vm.run().unwrap() {
        RunOutcome::TripleFault(state) => {
            assert!(state.contains("EAX=deadbeef"), "{state}");
            assert!(state.contains(&format!("EIP={:08x}", CODE + 5)), "the #UD's EIP: {state}");
        }
        other => panic!("expected a triple fault, got {other:?}"),
    }
}
