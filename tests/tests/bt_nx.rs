//! NX under PAE paging on the bt backend: a small kernel turns on
//! EFER.NXE (CPUID 0x8000_0001 offers NX), maps a page with XD set, reads
//! it (allowed) and then jumps to it, from a CPL 3 task that runs directly
//! (the shadow has no host execute right: the host fault's I/D bit says
//! fetch) and from CPL 0 (the translator's fetch walks the guest tables).
//! Either way the guest gets #PF with CR2 = the page and the I/D bit.

use std::sync::Arc;

use iced_x86::code_asm::*;
use monitor::backend::bt::{BtBackend, BtConfig};
use monitor::cpu::policy::{CpuPolicy, EXT_EDX_NX};
use monitor::cpu::Cpu;
use monitor::memory::GuestMemory;
use monitor::vm::{RunOutcome, Vm};
use popek_tests::*;

const PDPT: u32 = 0x40_0000;
const PD: u32 = 0x40_1000;
const PT: u32 = 0x40_2000;
/// 8 MiB: user code (executable), user stack (XD), then the XD code page.
const USER_CODE: u32 = 0x80_0000;
const USER_STACK_TOP: u32 = 0x80_2000;
const XD_PAGE: u32 = 0x80_2000;
const USER_CODE_PHYS: u32 = 0x50_0000;
const USER_STACK_PHYS: u32 = 0x50_1000;
const XD_PHYS: u32 = 0x50_2000;
const XD: u32 = 1 << 31; // bit 63 of the entry: the high dword's bit 31

/// `user`: the fetch comes from the CPL 3 task; otherwise from the kernel,
/// through a supervisor XD page. The #PF handler exits with the error
/// code, or 0x77 if CR2 is not the XD page.
fn kernel(user: bool) -> Vec<u8> {
    assemble_resolving(CODE, |a, addr| {
        let mut pf = a.create_label();
        let mut wrong = a.create_label();
        a.mov(eax, addr(0))?;
        a.mov(word_ptr(IDT + 14 * 8), ax)?;
        a.mov(word_ptr(IDT + 14 * 8 + 2), 0x08)?;
        a.mov(word_ptr(IDT + 14 * 8 + 4), 0x8E00)?;
        a.shr(eax, 16)?;
        a.mov(word_ptr(IDT + 14 * 8 + 6), ax)?;
        // PDPTE 0 → PD; 2 MiB identity pages for 0-6 MiB (kernel, tables),
        // a page table for 8-10 MiB.
        a.mov(dword_ptr(PDPT), PD | 1)?;
        for i in 0..3u32 {
            a.mov(dword_ptr(PD + i * 8), (i << 21) | 0x83)?;
        }
        a.mov(dword_ptr(PD + 4 * 8), PT | 7)?;
        let us = if user { 4 } else { 0 };
        a.mov(dword_ptr(PT), USER_CODE_PHYS | 5)?; // user, read-only, executable
        a.mov(dword_ptr(PT + 8), USER_STACK_PHYS | 7)?;
        a.mov(dword_ptr(PT + 8 + 4), XD)?;
        a.mov(dword_ptr(PT + 16), XD_PHYS | 1 | us)?; // read-only, XD
        a.mov(dword_ptr(PT + 16 + 4), XD)?;
        // EFER.NXE, then PAE paging.
        a.mov(ecx, 0xC000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, 1 << 11)?;
        a.wrmsr()?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x20)?;
        a.mov(cr4, eax)?;
        a.mov(eax, PDPT)?;
        a.mov(cr3, eax)?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8001_0000u32)?;
        a.mov(cr0, eax)?;
        if user {
            a.mov(eax, 0x3B)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.push(0x3B)?;
            a.push(USER_STACK_TOP)?;
            a.push(0x202)?;
            a.push(0x33)?;
            a.push(USER_CODE)?;
            a.iretd()?;
        } else {
            // Reading an XD page is fine; executing it is not.
            a.mov(eax, dword_ptr(XD_PAGE))?;
            a.cmp(eax, 0x90C3_9090u32)?;
            a.jne(wrong)?;
            a.mov(eax, XD_PAGE)?;
            a.call(eax)?;
            a.jmp(wrong)?;
        }
        a.set_label(&mut pf)?;
        a.mov(eax, cr2)?;
        a.cmp(eax, XD_PAGE)?;
        a.jne(wrong)?;
        a.pop(eax)?; // the error code
        a.out(0xF4, al)?;
        a.set_label(&mut wrong)?;
        a.mov(al, 0x77)?;
        a.out(0xF4, al)?;
        Ok(vec![pf])
    })
}

fn user_task() -> Vec<u8> {
    assemble(USER_CODE, |a| {
        let mut bad = a.create_label();
        a.mov(eax, dword_ptr(XD_PAGE))?;
        a.cmp(eax, 0x90C3_9090u32)?;
        a.jne(bad)?;
        a.mov(eax, XD_PAGE)?;
        a.call(eax)?;
        a.set_label(&mut bad)?;
        a.ud2()
    })
}

fn run(user: bool) -> (RunOutcome, String) {
    let _l = vm_lock();
    let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
    mem.write(u64::from(CODE), &kernel(user)).unwrap();
    mem.write(u64::from(USER_CODE_PHYS), &user_task()).unwrap();
    // nop; nop; ret; nop: executable if NX were not honoured.
    mem.write(u64::from(XD_PHYS), &[0x90, 0x90, 0xC3, 0x90]).unwrap();
    let mut cpu = Cpu::flat_protected(0x08, 0x10);
    cpu.eip = CODE;
    cpu.gpr[4] = STACK_TOP;
    flat_tables(&mem, &mut cpu, &[], STACK_TOP);
    let (platform, out, clock) = captured_platform(mem.size());
    let config = BtConfig { cpu: CpuPolicy { ext_edx: EXT_EDX_NX, ..CpuPolicy::default() }, ..BtConfig::default() };
    let bt = BtBackend::new(mem.clone(), cpu, config).unwrap();
    let mut vm = Vm::new(mem.clone(), platform, Box::new(bt), clock);
    (vm.run().unwrap(), out.text())
}

/// isa-debug-exit reports `(value << 1) | 1`.
fn exit_with(error_code: u32) -> RunOutcome {
    RunOutcome::DebugExit((error_code << 1) | 1)
}

#[test]
fn a_user_fetch_from_an_xd_page_is_a_page_fault_with_the_id_bit() {
    let (r, console) = run(true);
    // P (protection), U (user access), I/D (instruction fetch); not W.
    assert_eq!(r, exit_with(0x15), "console: {console}");
}

#[test]
fn a_kernel_fetch_from_an_xd_page_is_a_page_fault_with_the_id_bit() {
    let (r, console) = run(false);
    assert_eq!(r, exit_with(0x11), "console: {console}");
}
