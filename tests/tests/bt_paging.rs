//! Paging, user mode and exceptions on the bt backend (issue 4): a small
//! kernel turns paging on, enters a CPL-3 task that runs directly, serves
//! its system calls through the IDT and demand-pages its heap.

use std::sync::Arc;

use iced_x86::code_asm::*;
use monitor::backend::bt::{BtBackend, BtConfig};
use monitor::cpu::Cpu;

use monitor::memory::GuestMemory;
use monitor::vm::{RunOutcome, Vm};
use popek_tests::*;

const PD: u32 = 0x40_0000;
const PT_USER: u32 = 0x40_1000;
const USER_CODE: u32 = 0x80_0000;
const USER_STACK_TOP: u32 = 0x80_2000;
const HEAP: u32 = 0x90_0000;
const USER_CODE_PHYS: u32 = 0x50_0000;
const USER_STACK_PHYS: u32 = 0x50_1000;
const FREE_PAGES: u32 = 0x60_0000;
const VARS: u32 = 0x20_0000; // next free page, page faults served

fn kernel() -> Vec<u8> {
    assemble_resolving(CODE, |a, addr| {
        let mut syscall = a.create_label();
        let mut pf = a.create_label();
        let mut kill = a.create_label();
        let mut exit = a.create_label();
        // IDT gates: 0x80 (DPL 3) and 14, written by the kernel.
        for (v, i, dpl) in [(0x80u32, 0usize, 3u32), (14, 1, 0)] {
            a.mov(eax, addr(i))?;
            a.mov(word_ptr(IDT + v * 8), ax)?;
            a.mov(word_ptr(IDT + v * 8 + 2), 0x08)?;
            a.mov(word_ptr(IDT + v * 8 + 4), 0x8E00 | (dpl << 13))?;
            a.shr(eax, 16)?;
            a.mov(word_ptr(IDT + v * 8 + 6), ax)?;
        }
        a.mov(dword_ptr(VARS), FREE_PAGES)?;
        // Page directory: two 4 MiB supervisor pages (identity 0-8 MiB) and a
        // user page table for 8-12 MiB.
        a.mov(dword_ptr(PD), 0x0000_0083)?;
        a.mov(dword_ptr(PD + 4), 0x0040_0083)?;
        a.mov(dword_ptr(PD + 8), PT_USER | 7)?;
        a.mov(dword_ptr(PT_USER), USER_CODE_PHYS | 5)?; // user, read-only
        a.mov(dword_ptr(PT_USER + 4), USER_STACK_PHYS | 7)?; // user, writable
        a.mov(eax, PD)?;
        a.mov(cr3, eax)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x10)?; // PSE
        a.mov(cr4, eax)?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8001_0000u32)?; // PG | WP
        a.mov(cr0, eax)?;
        // Enter the user task (user data selectors first: IRET to CPL 3 nulls
        // data segments the task could not load itself).
        a.mov(eax, 0x3B)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.push(0x3B)?;
        a.push(USER_STACK_TOP)?;
        a.push(0x202)?;
        a.push(0x33)?;
        a.push(USER_CODE)?;
        a.iretd()?;

        // int 0x80: EAX = 0 → print BL; EAX = 1 → exit with BL.
        a.set_label(&mut syscall)?;
        a.cmp(eax, 1)?;
        a.je(exit)?;
        a.mov(dx, 0x3F8u32)?;
        a.mov(al, bl)?;
        a.out(dx, al)?;
        a.iretd()?;
        a.set_label(&mut exit)?;
        a.mov(al, bl)?;
        a.out(0xF4, al)?;

        // #PF: map a fresh page if CR2 is in the heap, else kill the task.
        a.set_label(&mut pf)?;
        a.mov(eax, cr2)?;
        a.cmp(eax, HEAP)?;
        a.jb(kill)?;
        a.cmp(eax, HEAP + 0x10_0000)?;
        a.jae(kill)?;
        a.shr(eax, 12)?;
        a.and(eax, 0x3FF)?;
        a.mov(ecx, dword_ptr(VARS))?;
        a.add(dword_ptr(VARS), 0x1000)?;
        a.inc(dword_ptr(VARS + 4))?;
        a.or(ecx, 7)?;
        a.mov(dword_ptr(PT_USER + eax * 4), ecx)?; // the heap PTE (index from CR2)
        a.add(esp, 4)?; // error code
        a.iretd()?;
        a.set_label(&mut kill)?;
        a.mov(al, 0x77)?;
        a.out(0xF4, al)?;
        Ok(vec![syscall, pf])
    })
}

fn user_task() -> Vec<u8> {
    assemble(USER_CODE, |a| {
        for c in b"user\n" {
            a.xor(eax, eax)?;
            a.mov(ebx, u32::from(*c))?;
            a.int(0x80)?;
        }
        // Demand paging: touch three heap pages, check what we wrote.
        a.mov(dword_ptr(HEAP), 0x1111)?;
        a.mov(dword_ptr(HEAP + 0x1000), 0x2222)?;
        a.mov(dword_ptr(HEAP + 0x2004), 0x3333)?;
        a.mov(esi, dword_ptr(HEAP))?;
        a.add(esi, dword_ptr(HEAP + 0x1000))?;
        a.add(esi, dword_ptr(HEAP + 0x2004))?;
        a.mov(eax, 1)?;
        a.mov(ebx, esi)?;
        a.shr(ebx, 4)?; // 0x6666 >> 4 = 0x666 → low byte 0x66
        a.int(0x80)
    })
}

#[test]
fn user_task_with_system_calls_and_demand_paging() {
    let _l = vm_lock();
    let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
    mem.write(u64::from(CODE), &kernel()).unwrap();
    mem.write(u64::from(USER_CODE_PHYS), &user_task()).unwrap();
    let mut cpu = Cpu::flat_protected(0x08, 0x10);
    cpu.eip = CODE;
    cpu.gpr[4] = STACK_TOP;
    flat_tables(&mem, &mut cpu, &[], STACK_TOP);
    let (platform, out, clock) = captured_platform(mem.size());
    let bt = BtBackend::new(mem.clone(), cpu, BtConfig::default()).unwrap();
    let mut vm = Vm::new(mem.clone(), platform, Box::new(bt), clock);
    let r = vm.run().unwrap();
    assert_eq!(r, RunOutcome::DebugExit((0x66 << 1) | 1), "console: {}", out.text());
    assert_eq!(out.text(), "user\n");
    assert_eq!(mem.read_u32(u64::from(VARS) + 4).unwrap(), 3, "three demand-paged heap pages");
    // The guest's PTEs got A and D set by the shadow MMU as hardware would.
    let pte = mem.read_u32(u64::from(PT_USER) + 0x100 * 4).unwrap();
    assert_eq!(pte & 0x60, 0x60, "heap PTE accessed and dirty: {pte:#x}");
    let code_pte = mem.read_u32(u64::from(PT_USER)).unwrap();
    assert_eq!(code_pte & 0x60, 0x20, "code PTE accessed, not dirty: {code_pte:#x}");
}
