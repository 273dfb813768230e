//! Protected-mode segment loads, exception and interrupt delivery through the
//! guest's IDT (with the privilege switch to the ring-0 stack from the TSS,
//! double and triple faults), and IRET.
//!
//! Task gates, task switches (IRET with NT) and virtual-8086 mode are not
//! modelled: they fail loudly with [`DeliveryError::Unsupported`] rather
//! than misbehave. Linux-class guests use none of them.

use thiserror::Error;

use super::descriptor::Descriptor;
use super::state::{flags, Cpu, Seg, SegReg};
use super::{vector, Access, Fault, LinearMemory};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DeliveryError {
    #[error("triple fault: exception {second} while delivering a double fault (first exception {first})")]
    TripleFault { first: u8, second: u8 },
    #[error("the guest needs {0}, which Popek does not model")]
    Unsupported(&'static str),
}

/// Where a descriptor-table error code comes from: EXT is set for events not
/// caused by the instruction (external interrupts, exceptions).
fn sel_code(sel: u16, ext: bool) -> u32 {
    u32::from(sel & 0xFFFC) | u32::from(ext)
}

/// Reads the descriptor `sel` names from the GDT or the LDT.
pub fn read_descriptor(cpu: &Cpu, mem: &mut dyn LinearMemory, sel: u16, ext: bool) -> Result<Descriptor, Fault> {
    let offset = u32::from(sel & !7);
    let (base, limit) = if sel & 4 != 0 {
        if cpu.ldtr.selector & !3 == 0 || !cpu.ldtr.cache.present {
            return Err(Fault::gp(sel_code(sel, ext)));
        }
        (cpu.ldtr.cache.base, cpu.ldtr.cache.limit)
    } else {
        (cpu.gdtr.base, u32::from(cpu.gdtr.limit))
    };
    if offset + 7 > limit {
        return Err(Fault::gp(sel_code(sel, ext)));
    }
    Ok(Descriptor::from_u64(mem.read_u64(cpu, base.wrapping_add(offset), Access::SUPERVISOR)?))
}

/// Sets the accessed bit of a code/data descriptor in memory, as the
/// processor does on a segment load.
fn mark_accessed(cpu: &Cpu, mem: &mut dyn LinearMemory, sel: u16, d: &mut Descriptor) -> Result<(), Fault> {
    if d.typ & 1 != 0 {
        return Ok(());
    }
    d.typ |= 1;
    let base = if sel & 4 != 0 { cpu.ldtr.cache.base } else { cpu.gdtr.base };
    let byte5 = (d.to_u64() >> 40) as u8;
    mem.write(cpu, base.wrapping_add(u32::from(sel & !7)) + 5, &[byte5], Access::SUPERVISOR)
}

/// Checks and returns the descriptor for loading `sel` into SS at `cpl`.
fn stack_descriptor(cpu: &Cpu, mem: &mut dyn LinearMemory, sel: u16, cpl: u8, ext: bool) -> Result<Descriptor, Fault> {
    if sel & !3 == 0 {
        return Err(Fault::gp(u32::from(ext)));
    }
    let mut d = read_descriptor(cpu, mem, sel, ext)?;
    if u8::try_from(sel & 3).ok() != Some(cpl) || d.dpl != cpl || !d.is_writable_data() {
        return Err(Fault::gp(sel_code(sel, ext)));
    }
    if !d.present {
        return Err(Fault::with_code(vector::SS, sel_code(sel, ext)));
    }
    mark_accessed(cpu, mem, sel, &mut d)?;
    Ok(d)
}

/// `MOV Sreg`, `POP Sreg`, `LDS`-family loads of SS, DS, ES, FS or GS.
pub fn load_segment(cpu: &mut Cpu, mem: &mut dyn LinearMemory, seg: Seg, sel: u16) -> Result<(), Fault> {
    debug_assert!(seg != Seg::Cs, "CS changes only through far transfers");
    if !cpu.protected_mode() {
        let r = &mut cpu.seg[seg as usize];
        r.selector = sel;
        r.cache.base = u32::from(sel) << 4;
        return Ok(());
    }
    if seg == Seg::Ss {
        let d = stack_descriptor(cpu, mem, sel, cpu.cpl, false)?;
        cpu.seg[Seg::Ss as usize] = SegReg { selector: sel, cache: d };
        cpu.interrupt_shadow = true;
        return Ok(());
    }
    if sel & !3 == 0 {
        // A null selector loads; using the register then faults.
        cpu.seg[seg as usize] = SegReg { selector: sel, cache: Descriptor::default() };
        return Ok(());
    }
    let mut d = read_descriptor(cpu, mem, sel, false)?;
    let rpl = (sel & 3) as u8;
    if !d.is_readable() {
        return Err(Fault::gp(sel_code(sel, false)));
    }
    if (d.is_data() || !d.is_conforming_code()) && (rpl > d.dpl || cpu.cpl > d.dpl) {
        return Err(Fault::gp(sel_code(sel, false)));
    }
    if !d.present {
        return Err(Fault::with_code(vector::NP, sel_code(sel, false)));
    }
    mark_accessed(cpu, mem, sel, &mut d)?;
    cpu.seg[seg as usize] = SegReg { selector: sel, cache: d };
    Ok(())
}

/// Writes `words` (32-bit) below SS:`esp` and returns the new ESP.
fn push_frame(cpu: &Cpu, mem: &mut dyn LinearMemory, ss_base: u32, esp: u32, words: &[u32]) -> Result<u32, Fault> {
    let new_esp = esp.wrapping_sub(4 * words.len() as u32);
    let mut bytes = Vec::with_capacity(words.len() * 4);
    for w in words.iter().rev() {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    mem.write(cpu, ss_base.wrapping_add(new_esp), &bytes, Access::SUPERVISOR)?;
    Ok(new_esp)
}

#[derive(Clone, Copy)]
enum Class {
    Benign,
    Contributory,
    PageFault,
    DoubleFault,
}

fn class(v: u8) -> Class {
    match v {
        0 | 10..=13 => Class::Contributory,
        vector::PF => Class::PageFault,
        vector::DF => Class::DoubleFault,
        _ => Class::Benign,
    }
}

/// What is being delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// An exception raised at the current instruction (EIP already points at
    /// the instruction for faults, after it for traps).
    Exception(Fault),
    /// An external interrupt (from the PIC).
    External(u8),
    /// `INT n` / `INT3` / `INTO` (EIP already after the instruction): the
    /// gate's DPL is checked against CPL.
    Software(u8),
}

/// Delivers `event` through the guest's IDT, escalating nested faults to a
/// double fault and a triple fault as the processor does.
pub fn deliver(cpu: &mut Cpu, mem: &mut dyn LinearMemory, event: Event) -> Result<(), DeliveryError> {
    let first = match event {
        Event::Exception(f) => f.vector,
        Event::External(v) | Event::Software(v) => v,
    };
    let nested = match deliver_once(cpu, mem, event)? {
        None => return Ok(()),
        Some(f) => f,
    };
    let escalate = matches!(
        (class(first), class(nested.vector)),
        (Class::Contributory, Class::Contributory) | (Class::PageFault, Class::Contributory | Class::PageFault)
    );
    if matches!(class(first), Class::DoubleFault) {
        return Err(DeliveryError::TripleFault { first, second: nested.vector });
    }
    let next = if escalate { Fault::with_code(vector::DF, 0) } else { nested };
    match deliver_once(cpu, mem, Event::Exception(next))? {
        None => Ok(()),
        Some(f) if next.vector == vector::DF => {
            Err(DeliveryError::TripleFault { first: next.vector, second: f.vector })
        }
        Some(f) => {
            // A benign first exception whose delivery faulted: deliver that
            // fault, escalating once more if needed.
            match deliver_once(cpu, mem, Event::Exception(Fault::with_code(vector::DF, 0)))? {
                None => Ok(()),
                Some(g) => Err(DeliveryError::TripleFault { first: f.vector, second: g.vector }),
            }
        }
    }
}

/// One delivery attempt; `Ok(Some(fault))` is a fault raised while delivering.
fn deliver_once(cpu: &mut Cpu, mem: &mut dyn LinearMemory, event: Event) -> Result<Option<Fault>, DeliveryError> {
    match try_deliver(cpu, mem, event) {
        Ok(()) => Ok(None),
        Err(Nested::Fault(f)) => Ok(Some(f)),
        Err(Nested::Unsupported(what)) => Err(DeliveryError::Unsupported(what)),
    }
}

enum Nested {
    Fault(Fault),
    Unsupported(&'static str),
}

impl From<Fault> for Nested {
    fn from(f: Fault) -> Self {
        Nested::Fault(f)
    }
}

fn try_deliver(cpu: &mut Cpu, mem: &mut dyn LinearMemory, event: Event) -> Result<(), Nested> {
    let (vec, error_code, software, ext) = match event {
        Event::Exception(f) => (f.vector, f.error_code, false, true),
        Event::External(v) => (v, None, false, true),
        Event::Software(v) => (v, None, true, false),
    };
    if !cpu.protected_mode() {
        return Err(Nested::Unsupported("real-mode interrupt delivery"));
    }
    if cpu.eflags & flags::VM != 0 {
        return Err(Nested::Unsupported("virtual-8086 mode"));
    }
    let idt_code = u32::from(vec) * 8 + 2 + u32::from(ext);
    if u32::from(vec) * 8 + 7 > u32::from(cpu.idtr.limit) {
        return Err(Fault::gp(idt_code).into());
    }
    let gate = mem.read_u64(cpu, cpu.idtr.base.wrapping_add(u32::from(vec) * 8), Access::SUPERVISOR)?;
    let (lo, hi) = (gate as u32, (gate >> 32) as u32);
    let typ = (hi >> 8) & 0x1F;
    let gate_dpl = ((hi >> 13) & 3) as u8;
    let gate_present = hi & (1 << 15) != 0;
    let interrupt_gate = match typ {
        0x0E => true,
        0x0F => false,
        0x05 => return Err(Nested::Unsupported("task gates in the IDT")),
        0x06 | 0x07 => return Err(Nested::Unsupported("16-bit interrupt gates")),
        _ => return Err(Fault::gp(idt_code).into()),
    };
    if software && gate_dpl < cpu.cpl {
        return Err(Fault::gp(idt_code).into());
    }
    if !gate_present {
        return Err(Fault::with_code(vector::NP, idt_code).into());
    }
    let sel = (lo >> 16) as u16;
    let offset = (lo & 0xFFFF) | (hi & 0xFFFF_0000);
    if sel & !3 == 0 {
        return Err(Fault::gp(u32::from(ext)).into());
    }
    let cs = read_descriptor(cpu, mem, sel, ext)?;
    if !cs.is_code() || cs.dpl > cpu.cpl {
        return Err(Fault::gp(sel_code(sel, ext)).into());
    }
    if !cs.present {
        return Err(Fault::with_code(vector::NP, sel_code(sel, ext)).into());
    }
    let new_cpl = if cs.is_conforming_code() { cpu.cpl } else { cs.dpl };
    let old_cs = u32::from(cpu.seg(Seg::Cs).selector);
    let old_ss = u32::from(cpu.seg(Seg::Ss).selector);
    let old_esp = cpu.gpr[4];
    let mut frame = vec![cpu.eflags, old_cs, cpu.eip];
    if let Some(code) = error_code {
        frame.push(code);
    }
    let (ss, esp) = if new_cpl < cpu.cpl {
        // Inner privilege: the new stack comes from the TSS.
        let tss = cpu.tr.cache;
        let at = 4 + 8 * u32::from(new_cpl);
        if at + 5 > tss.limit {
            return Err(Fault::with_code(vector::TS, sel_code(cpu.tr.selector, ext)).into());
        }
        let esp = mem.read_u32(cpu, tss.base.wrapping_add(at), Access::SUPERVISOR)?;
        let ss_sel = mem.read_u16(cpu, tss.base.wrapping_add(at + 4), Access::SUPERVISOR)?;
        let ss = stack_descriptor(cpu, mem, ss_sel, new_cpl, ext).map_err(|f| match f.vector {
            vector::GP => Fault::with_code(vector::TS, sel_code(ss_sel, ext)),
            _ => f,
        })?;
        frame.insert(0, old_esp);
        frame.insert(0, old_ss);
        (SegReg { selector: ss_sel, cache: ss }, esp)
    } else {
        (*cpu.seg(Seg::Ss), old_esp)
    };
    let new_esp = push_frame(cpu, mem, ss.cache.base, esp, &frame)?;
    // Committed: nothing below can fault.
    if vec == vector::PF {
        if let Event::Exception(Fault { cr2: Some(a), .. }) = event {
            cpu.cr2 = a;
        }
    }
    cpu.cpl = new_cpl;
    cpu.seg[Seg::Ss as usize] = ss;
    cpu.gpr[4] = new_esp;
    cpu.seg[Seg::Cs as usize] = SegReg { selector: (sel & !3) | u16::from(new_cpl), cache: cs };
    cpu.eip = offset;
    cpu.eflags &= !(flags::TF | flags::NT | flags::RF | flags::VM);
    if interrupt_gate {
        cpu.eflags &= !flags::IF;
    }
    cpu.halted = false;
    Ok(())
}

/// `IRET` with a 32-bit operand size in protected mode.
pub fn iret(cpu: &mut Cpu, mem: &mut dyn LinearMemory) -> Result<(), Result<Fault, DeliveryError>> {
    if cpu.eflags & flags::NT != 0 {
        return Err(Err(DeliveryError::Unsupported("task return (IRET with NT set)")));
    }
    let ss_base = cpu.seg(Seg::Ss).cache.base;
    let esp = cpu.gpr[4];
    let acc = Access::at_cpl(cpu.cpl);
    let rd = |mem: &mut dyn LinearMemory, cpu: &Cpu, off: u32| {
        mem.read_u32(cpu, ss_base.wrapping_add(esp.wrapping_add(off)), acc)
    };
    let new_eip = rd(mem, cpu, 0).map_err(Ok)?;
    let new_cs = rd(mem, cpu, 4).map_err(Ok)? as u16;
    let new_flags = rd(mem, cpu, 8).map_err(Ok)?;
    if new_flags & flags::VM != 0 && cpu.cpl == 0 {
        return Err(Err(DeliveryError::Unsupported("IRET to virtual-8086 mode")));
    }
    let rpl = (new_cs & 3) as u8;
    if new_cs & !3 == 0 || rpl < cpu.cpl {
        return Err(Ok(Fault::gp(u32::from(new_cs & 0xFFFC))));
    }
    let mut cs = read_descriptor(cpu, mem, new_cs, false).map_err(Ok)?;
    let dpl_ok = if cs.is_conforming_code() { cs.dpl <= rpl } else { cs.dpl == rpl };
    if !cs.is_code() || !dpl_ok {
        return Err(Ok(Fault::gp(u32::from(new_cs & 0xFFFC))));
    }
    if !cs.present {
        return Err(Ok(Fault::with_code(vector::NP, u32::from(new_cs & 0xFFFC))));
    }
    let outer = rpl > cpu.cpl;
    let (ss, new_esp) = if outer {
        let e = rd(mem, cpu, 12).map_err(Ok)?;
        let s = rd(mem, cpu, 16).map_err(Ok)? as u16;
        let d = stack_descriptor(cpu, mem, s, rpl, false).map_err(Ok)?;
        (SegReg { selector: s, cache: d }, e)
    } else {
        (*cpu.seg(Seg::Ss), esp.wrapping_add(12))
    };
    mark_accessed(cpu, mem, new_cs, &mut cs).map_err(Ok)?;
    let mut mask = flags::LIVE | flags::NT | flags::RF;
    if cpu.cpl == 0 {
        mask |= flags::IOPL | flags::VIF | flags::VIP;
    }
    if cpu.cpl <= cpu.iopl() {
        mask |= flags::IF;
    }
    cpu.eflags = (cpu.eflags & !mask) | (new_flags & mask) | 2;
    cpu.eip = new_eip;
    cpu.cpl = rpl;
    cpu.seg[Seg::Cs as usize] = SegReg { selector: new_cs, cache: cs };
    cpu.seg[Seg::Ss as usize] = ss;
    cpu.gpr[4] = new_esp;
    if outer {
        for s in [Seg::Es, Seg::Ds, Seg::Fs, Seg::Gs] {
            let c = cpu.seg(s).cache;
            if (c.is_data() || !c.is_conforming_code()) && c.dpl < rpl {
                cpu.seg[s as usize] = SegReg { selector: 0, cache: Descriptor::default() };
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Flat linear memory without paging, for unit tests.
    pub struct FlatMem(pub Vec<u8>);

    impl LinearMemory for FlatMem {
        fn read(&mut self, _cpu: &Cpu, lin: u32, buf: &mut [u8], _a: Access) -> Result<(), Fault> {
            let s = lin as usize;
            let src = self.0.get(s..s + buf.len()).ok_or(Fault::page(lin, 0))?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write(&mut self, _cpu: &Cpu, lin: u32, data: &[u8], _a: Access) -> Result<(), Fault> {
            let s = lin as usize;
            let dst = self.0.get_mut(s..s + data.len()).ok_or(Fault::page(lin, 2))?;
            dst.copy_from_slice(data);
            Ok(())
        }
    }

    const GDT: u32 = 0x1000;
    const IDT: u32 = 0x2000;
    const TSS: u32 = 0x3000;

    fn put(m: &mut FlatMem, at: u32, v: u64) {
        m.0[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn gate(offset: u32, sel: u16, typ: u32, dpl: u32) -> u64 {
        let lo = (offset & 0xFFFF) | (u32::from(sel) << 16);
        let hi = (offset & 0xFFFF_0000) | (1 << 15) | (dpl << 13) | (typ << 8);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// A Linux-like GDT: 0x10 kernel code, 0x18 kernel data, 0x23 user code,
    /// 0x2b user data; TSS with ss0:esp0 = 0x18:0x9000; IDT with an
    /// interrupt gate at 14 and 32, a trap gate at 0x80 (DPL 3).
    pub fn machine() -> (Cpu, FlatMem) {
        let mut m = FlatMem(vec![0; 0x10_0000]);
        put(&mut m, GDT + 0x10, 0x00cf_9b00_0000_ffff);
        put(&mut m, GDT + 0x18, 0x00cf_9300_0000_ffff);
        put(&mut m, GDT + 0x20, 0x00cf_fb00_0000_ffff);
        put(&mut m, GDT + 0x28, 0x00cf_f300_0000_ffff);
        put(&mut m, IDT + 14 * 8, gate(0x5000, 0x10, 0xE, 0));
        put(&mut m, IDT + 32 * 8, gate(0x6000, 0x10, 0xE, 0));
        put(&mut m, IDT + 0x80 * 8, gate(0x7000, 0x10, 0xF, 3));
        put(&mut m, IDT + 8 * 8, gate(0x8000, 0x10, 0xE, 0));
        m.0[(TSS + 4) as usize..(TSS + 8) as usize].copy_from_slice(&0x9000u32.to_le_bytes());
        m.0[(TSS + 8) as usize..(TSS + 10) as usize].copy_from_slice(&0x18u16.to_le_bytes());
        let mut cpu = Cpu::flat_protected(0x10, 0x18);
        cpu.gpr[4] = 0xA000;
        cpu.gdtr = super::super::TableReg { base: GDT, limit: 0xFF };
        cpu.idtr = super::super::TableReg { base: IDT, limit: 0x7FF };
        cpu.tr = SegReg {
            selector: 0x30,
            cache: Descriptor { base: TSS, limit: 0x67, typ: 0xB, present: true, ..Default::default() },
        };
        (cpu, m)
    }

    fn to_user(cpu: &mut Cpu, m: &mut FlatMem) {
        cpu.cpl = 3;
        cpu.seg[Seg::Cs as usize] = SegReg { selector: 0x23, cache: read_descriptor(cpu, m, 0x23, false).unwrap() };
        cpu.seg[Seg::Ss as usize] = SegReg { selector: 0x2b, cache: read_descriptor(cpu, m, 0x2b, false).unwrap() };
        cpu.gpr[4] = 0x8_0000;
        cpu.eflags = 0x202 | flags::CF;
    }

    #[test]
    fn user_page_fault_switches_to_ring0_stack_with_error_code_and_cr2() {
        let (mut cpu, mut m) = machine();
        to_user(&mut cpu, &mut m);
        cpu.eip = 0x40_1234;
        deliver(&mut cpu, &mut m, Event::Exception(Fault::page(0xdead_b000, 6))).unwrap();
        assert_eq!((cpu.cpl, cpu.eip, cpu.cr2), (0, 0x5000, 0xdead_b000));
        assert_eq!(cpu.seg(Seg::Cs).selector, 0x10);
        assert_eq!(cpu.seg(Seg::Ss).selector, 0x18);
        assert_eq!(cpu.gpr[4], 0x9000 - 24);
        let rd = |m: &FlatMem, o: u32| u32::from_le_bytes(m.0[(0x9000 - 24 + o) as usize..][..4].try_into().unwrap());
        assert_eq!(
            [rd(&m, 0), rd(&m, 4), rd(&m, 8), rd(&m, 12), rd(&m, 16), rd(&m, 20)],
            [6, 0x40_1234, 0x23, 0x203, 0x8_0000, 0x2b]
        );
        assert_eq!(cpu.eflags & flags::IF, 0, "interrupt gate clears IF");
    }

    #[test]
    fn int80_trap_gate_and_iret_back_to_user() {
        let (mut cpu, mut m) = machine();
        to_user(&mut cpu, &mut m);
        cpu.eip = 0x40_0002; // after INT 0x80
        deliver(&mut cpu, &mut m, Event::Software(0x80)).unwrap();
        assert_eq!((cpu.cpl, cpu.eip), (0, 0x7000));
        assert_ne!(cpu.eflags & flags::IF, 0, "trap gate keeps IF");
        iret(&mut cpu, &mut m).unwrap();
        assert_eq!((cpu.cpl, cpu.eip, cpu.gpr[4]), (3, 0x40_0002, 0x8_0000));
        assert_eq!(cpu.seg(Seg::Ss).selector, 0x2b);
        assert_ne!(cpu.eflags & flags::CF, 0);
    }

    #[test]
    fn software_interrupt_through_kernel_only_gate_is_gp() {
        let (mut cpu, mut m) = machine();
        to_user(&mut cpu, &mut m);
        deliver(&mut cpu, &mut m, Event::Software(32)).unwrap();
        // #GP(32*8+2) is not in the IDT (no gate at 13): #GP escalates to #DF.
        assert_eq!(cpu.eip, 0x8000, "double fault handler");
    }

    #[test]
    fn missing_gate_for_a_fault_gives_double_fault_then_triple() {
        let (mut cpu, mut m) = machine();
        deliver(&mut cpu, &mut m, Event::Exception(Fault::gp(0))).unwrap();
        assert_eq!(cpu.eip, 0x8000);
        put(&mut m, IDT + 8 * 8, 0);
        let r = deliver(&mut cpu, &mut m, Event::Exception(Fault::gp(0)));
        assert!(matches!(r, Err(DeliveryError::TripleFault { .. })), "{r:?}");
    }

    #[test]
    fn segment_loads_check_privilege_and_presence() {
        let (mut cpu, mut m) = machine();
        load_segment(&mut cpu, &mut m, Seg::Ds, 0x2b).unwrap();
        assert_eq!(cpu.seg(Seg::Ds).cache.dpl, 3);
        to_user(&mut cpu, &mut m);
        assert_eq!(load_segment(&mut cpu, &mut m, Seg::Ds, 0x18), Err(Fault::gp(0x18)));
        assert_eq!(load_segment(&mut cpu, &mut m, Seg::Ss, 0x18 | 3), Err(Fault::gp(0x18)));
        assert_eq!(load_segment(&mut cpu, &mut m, Seg::Es, 0x400), Err(Fault::gp(0x400)));
        load_segment(&mut cpu, &mut m, Seg::Fs, 0).unwrap();
        assert!(!cpu.seg(Seg::Fs).cache.present);
    }

    #[test]
    fn task_gates_fail_loudly() {
        let (mut cpu, mut m) = machine();
        put(&mut m, IDT + 14 * 8, gate(0, 0x40, 0x5, 0));
        assert!(matches!(
            deliver(&mut cpu, &mut m, Event::Exception(Fault::page(0, 0))),
            Err(DeliveryError::Unsupported(_))
        ));
    }
}
