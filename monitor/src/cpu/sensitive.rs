//! The virtual semantics of every sensitive instruction: what the guest sees
//! instead of the host's state. The translator turns these instructions into
//! callouts; guest user code that executes a privileged one traps. Either way
//! the monitor ends up here with the decoded instruction.
//!
//! One function per instruction family; [`execute`] dispatches on the
//! engine's classification (`engine::classify`, the one table: no opcode
//! matching here) and takes the privilege and IOPL checks from it. The
//! result says what the caller must do next ([`Outcome`]).

use engine::classify::{Class, Classification, Flow, Sensitive};
use iced_x86::{Code, Instruction, OpKind, Register};
use thiserror::Error;

use super::descriptor::Descriptor;
use super::interrupt::{self, load_segment, read_descriptor, DeliveryError};
use super::operand::{self, gpr_read, gpr_write, peek, push, read_operand, seg_of, write_operand};
use super::policy::{msr, CpuPolicy};
use super::state::{cr0, cr4, flags, Cpu, Seg, SegReg};
use super::{vector, Access, Fault, LinearMemory};

/// An I/O access the machine must perform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// `IN`: the value goes to AL/AX/EAX.
    In { port: u16, size: u8 },
    /// `OUT`.
    Out { port: u16, size: u8, value: u32 },
    /// One iteration of `INS`: the value goes to ES:EDI.
    Ins { port: u16, size: u8 },
    /// One iteration of `OUTS` (the value read from DS:ESI).
    Outs { port: u16, size: u8, value: u32 },
}

/// What the shadow MMU must hear about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmuEffect {
    Cr0 {
        old: u32,
        new: u32,
    },
    Cr3 {
        new: u32,
    },
    Cr4 {
        old: u32,
        new: u32,
    },
    /// WRMSR IA32_EFER (NXE changes the host rights of every shadow).
    Efer {
        new: u64,
    },
    Invlpg(u32),
}

/// An access to an MSR the machine holds, not the CPU (IA32_TSC_DEADLINE:
/// the local APIC's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrOp {
    /// RDMSR: the machine's value goes to EDX:EAX.
    Read { index: u32 },
    /// WRMSR of `value`; `tsc` is the guest TSC at the instruction (what
    /// IA32_TSC_DEADLINE is compared with).
    Write { index: u32, value: u64, tsc: u64 },
}

/// What the caller does after a sensitive instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Continue at the next instruction.
    Next,
    /// Control was transferred (EIP, CS, maybe CPL changed).
    Jumped,
    /// Perform the I/O, then continue at the next instruction (string
    /// forms: complete one iteration with [`complete_string_io`]).
    Io(IoOp),
    /// HLT: wait for an interrupt, then continue at the next instruction.
    Halt,
    /// Continue at the next instruction after telling the MMU.
    Mmu(MmuEffect),
    /// INT n / INT3 / INTO taken: deliver software interrupt `vector` with
    /// EIP at the next instruction.
    Interrupt(u8),
    /// A segment register changed: refresh its host shadow, then continue.
    SegmentLoaded(Seg),
    /// The machine performs the MSR access, then continue at the next
    /// instruction (a read: after its value is in EDX:EAX).
    Msr(MsrOp),
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ExecError {
    #[error("guest exception {0:?}")]
    Fault(Fault),
    #[error("the guest needs {0}, which Popek does not model")]
    Unsupported(&'static str),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
}

impl From<Fault> for ExecError {
    fn from(f: Fault) -> Self {
        ExecError::Fault(f)
    }
}

/// What the semantics need besides the CPU.
pub struct Env<'a> {
    pub mem: &'a mut dyn LinearMemory,
    pub policy: &'a CpuPolicy,
    /// The host TSC now (the guest's is this plus the TSC offset).
    pub host_tsc: u64,
}

fn require_cpl0(cpu: &Cpu) -> Result<(), Fault> {
    if cpu.cpl != 0 {
        return Err(Fault::gp(0));
    }
    Ok(())
}

fn require_iopl(cpu: &Cpu) -> Result<(), Fault> {
    if cpu.protected_mode() && cpu.cpl > cpu.iopl() {
        return Err(Fault::gp(0));
    }
    Ok(())
}

fn set_zf(cpu: &mut Cpu, on: bool) {
    if on {
        cpu.eflags |= flags::ZF;
    } else {
        cpu.eflags &= !flags::ZF;
    }
}

/// Executes sensitive instruction `insn` (decoded at `cpu.eip`), classified
/// as `c` by the engine's table: the kind a callout site carries, or
/// `engine::classify::classify` on the direct path.
pub fn execute(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction, c: &Classification) -> Result<Outcome, ExecError> {
    if c.cpl0_only {
        require_cpl0(cpu)?;
    }
    if c.iopl_sensitive {
        require_iopl(cpu)?;
    }
    match c.class {
        Class::Sensitive(s) => sensitive(cpu, env, insn, s),
        Class::ControlFlow(f) => control_flow(cpu, env, insn, f),
        Class::Ident => Err(ExecError::Unsupported("an instruction the sensitive table does not cover")),
    }
}

fn sensitive(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction, s: Sensitive) -> Result<Outcome, ExecError> {
    use Sensitive as S;
    match s {
        S::Pushf => pushf(cpu, env, insn),
        S::Popf => popf(cpu, env, insn),
        S::Cli | S::Sti => cli_sti(cpu, s == S::Sti),
        S::MovToCr | S::MovFromCr => mov_cr(cpu, insn),
        S::MovToDr | S::MovFromDr => mov_dr(cpu, insn),
        S::MovToSeg | S::MovFromSeg | S::PushSeg | S::PopSeg => segment_move(cpu, env, insn, s),
        S::LoadFarPtr(seg) => load_far_pointer(cpu, env, insn, seg),
        S::Lgdt | S::Lidt | S::Sgdt | S::Sidt => table_register(cpu, env, insn, s),
        S::Lldt | S::Ltr | S::Sldt | S::Str => system_segment(cpu, env, insn, s),
        S::Smsw | S::Lmsw | S::Clts => msw(cpu, env, insn, s),
        S::Lar | S::Lsl | S::Verr | S::Verw => inspect_segment(cpu, env, insn, s),
        S::In | S::Out | S::Ins | S::Outs => io(cpu, env, insn, s),
        S::Hlt => Ok(Outcome::Halt),
        S::Invlpg => Ok(Outcome::Mmu(MmuEffect::Invlpg(operand::memory_linear(cpu, insn, 1, false).unwrap_or(0)))),
        S::Invd | S::Wbinvd => Ok(Outcome::Next),
        S::Rdmsr | S::Wrmsr => msr_access(cpu, env, s == S::Wrmsr),
        S::Rdtsc | S::Rdtscp | S::Rdpmc => counters(cpu, env, s),
        S::Cpuid => {
            let r = env.policy.cpuid(cpu.gpr[0], cpu.gpr[1]);
            (cpu.gpr[0], cpu.gpr[3], cpu.gpr[1], cpu.gpr[2]) = (r[0], r[1], r[2], r[3]);
            Ok(Outcome::Next)
        }
        S::Ud | S::Invalid => Err(Fault::ud().into()),
        S::MovTr
        | S::Rdpid
        | S::Monitor
        | S::Mwait
        | S::Xsetbv
        | S::Xgetbv
        | S::Clac
        | S::Stac
        | S::Invpcid
        | S::Rsm
        | S::Unsupported => Err(ExecError::Unsupported("an instruction the sensitive table does not cover")),
    }
}

fn control_flow(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction, f: Flow) -> Result<Outcome, ExecError> {
    match f {
        Flow::Int => Ok(Outcome::Interrupt(insn.immediate8())),
        Flow::Int3 => Ok(Outcome::Interrupt(vector::BP)),
        Flow::Into => Ok(if cpu.eflags & flags::OF != 0 { Outcome::Interrupt(vector::OF) } else { Outcome::Next }),
        Flow::Iret => iret(cpu, env, insn),
        Flow::IndirectJmp | Flow::IndirectCall => near_indirect(cpu, env, insn, f == Flow::IndirectCall),
        Flow::FarJmp | Flow::FarCall | Flow::FarRet => far_transfer(cpu, env, insn, f),
        Flow::Sysenter => sysenter(cpu),
        Flow::Sysexit => sysexit(cpu),
        _ => Err(ExecError::Unsupported("an instruction the sensitive table does not cover")),
    }
}

/// JMP/CALL r/m: the translator hands over those whose operand it cannot
/// load itself (a GS memory operand: glibc's `call gs:[0x10]`).
fn near_indirect(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction, call: bool) -> Result<Outcome, ExecError> {
    let op16 = engine::classify::is_op16(insn.code());
    let mut target = operand::read_operand(cpu, env.mem, insn, 0)?;
    let mut ret = insn.next_ip32();
    if op16 {
        target &= 0xFFFF;
        ret &= 0xFFFF;
    }
    if target > cpu.seg(Seg::Cs).cache.limit {
        return Err(Fault::gp(0).into());
    }
    if call {
        push(cpu, env.mem, ret, if op16 { 2 } else { 4 })?;
    }
    cpu.eip = target;
    Ok(Outcome::Jumped)
}

/// Operand size in bytes (2 or 4) of an instruction whose operand size
/// matters for the stack (PUSH/POP Sreg, far CALL/RET).
fn operand_bytes(insn: &Instruction) -> u32 {
    // Always 16 or 32 for these kinds (a classify test checks it).
    if engine::classify::is_op16(insn.code()) {
        2
    } else {
        4
    }
}

fn pushf(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction) -> Result<Outcome, ExecError> {
    let size = insn.stack_pointer_increment().unsigned_abs();
    // RF and VM read as 0 in the pushed image.
    let image = cpu.eflags & !(flags::RF | flags::VM);
    push(cpu, env.mem, image, size)?;
    Ok(Outcome::Next)
}

fn popf(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction) -> Result<Outcome, ExecError> {
    let size = insn.stack_pointer_increment().unsigned_abs();
    let v = peek(cpu, env.mem, 0, size)?;
    let mut mask = flags::LIVE | flags::NT;
    if size == 2 {
        mask &= 0xFFFF;
    }
    if cpu.cpl == 0 {
        mask |= flags::IOPL;
    }
    if cpu.cpl <= cpu.iopl() {
        mask |= flags::IF;
    }
    cpu.eflags = (cpu.eflags & !mask) | (v & mask) | 2;
    cpu.gpr[4] = cpu.gpr[4].wrapping_add(size);
    Ok(Outcome::Next)
}

fn cli_sti(cpu: &mut Cpu, sti: bool) -> Result<Outcome, ExecError> {
    if sti {
        if cpu.eflags & flags::IF == 0 {
            cpu.interrupt_shadow = true;
        }
        cpu.eflags |= flags::IF;
    } else {
        cpu.eflags &= !flags::IF;
    }
    Ok(Outcome::Next)
}

fn mov_cr(cpu: &mut Cpu, insn: &Instruction) -> Result<Outcome, ExecError> {
    let (dst, src) = (insn.op0_register(), insn.op1_register());
    if dst.is_cr() {
        let v = gpr_read(cpu, src);
        match dst {
            Register::CR0 => {
                let old = cpu.cr0;
                if v & cr0::PG != 0 && v & cr0::PE == 0 {
                    return Err(Fault::gp(0).into());
                }
                cpu.cr0 = v | cr0::ET;
                Ok(Outcome::Mmu(MmuEffect::Cr0 { old, new: cpu.cr0 }))
            }
            Register::CR2 => {
                cpu.cr2 = v;
                Ok(Outcome::Next)
            }
            Register::CR3 => {
                cpu.cr3 = v;
                Ok(Outcome::Mmu(MmuEffect::Cr3 { new: v }))
            }
            Register::CR4 => {
                let allowed = cr4::VME
                    | cr4::PVI
                    | cr4::TSD
                    | cr4::DE
                    | cr4::PSE
                    | cr4::PGE
                    | cr4::PCE
                    | cr4::OSFXSR
                    | cr4::OSXMMEXCPT
                    | cr4::MCE
                    | cr4::PAE;
                if v & !allowed != 0 {
                    return Err(Fault::gp(0).into());
                }
                let old = cpu.cr4;
                cpu.cr4 = v;
                Ok(Outcome::Mmu(MmuEffect::Cr4 { old, new: v }))
            }
            _ => Err(Fault::ud().into()),
        }
    } else {
        let v = match src {
            Register::CR0 => cpu.cr0,
            Register::CR2 => cpu.cr2,
            Register::CR3 => cpu.cr3,
            Register::CR4 => cpu.cr4,
            _ => return Err(Fault::ud().into()),
        };
        gpr_write(cpu, dst, v);
        Ok(Outcome::Next)
    }
}

fn mov_dr(cpu: &mut Cpu, insn: &Instruction) -> Result<Outcome, ExecError> {
    let (dst, src) = (insn.op0_register(), insn.op1_register());
    let n = |r: Register| r as usize - Register::DR0 as usize;
    if dst.is_dr() {
        let v = gpr_read(cpu, src);
        cpu.dr[n(dst)] = v;
    } else {
        let v = cpu.dr[n(src)];
        gpr_write(cpu, dst, v);
    }
    Ok(Outcome::Next)
}

fn segment_move(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction, s: Sensitive) -> Result<Outcome, ExecError> {
    match s {
        Sensitive::PushSeg => {
            let s = seg_of(insn.op0_register()).ok_or(Fault::ud())?;
            let size = operand_bytes(insn);
            push(cpu, env.mem, u32::from(cpu.seg(s).selector), size)?;
            Ok(Outcome::Next)
        }
        Sensitive::PopSeg => {
            let s = seg_of(insn.op0_register()).ok_or(Fault::ud())?;
            let size = operand_bytes(insn);
            let sel = peek(cpu, env.mem, 0, size)? as u16;
            load_segment(cpu, env.mem, s, sel)?;
            cpu.gpr[4] = cpu.gpr[4].wrapping_add(size);
            Ok(Outcome::SegmentLoaded(s))
        }
        _ => {
            if let Some(s) = seg_of(insn.op0_register()).filter(|_| insn.op_kind(0) == OpKind::Register) {
                if s == Seg::Cs {
                    return Err(Fault::ud().into());
                }
                let sel = read_operand(cpu, env.mem, insn, 1)? as u16;
                load_segment(cpu, env.mem, s, sel)?;
                Ok(Outcome::SegmentLoaded(s))
            } else {
                // MOV r/m, Sreg: the selector as the guest loaded it (CS and
                // SS with the virtual RPL).
                let s = seg_of(insn.op1_register()).ok_or(Fault::ud())?;
                let v = u32::from(cpu.seg(s).selector);
                if insn.op_kind(0) == OpKind::Register && insn.op0_register().is_gpr32() {
                    gpr_write(cpu, insn.op0_register(), v);
                } else {
                    write_operand(cpu, env.mem, insn, 0, v)?;
                }
                Ok(Outcome::Next)
            }
        }
    }
}

fn load_far_pointer(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction, seg: Register) -> Result<Outcome, ExecError> {
    let seg = seg_of(seg).ok_or(Fault::ud())?;
    let off_size = insn.op0_register().size() as u32;
    let lin = operand::memory_linear(cpu, insn, off_size + 2, false)?;
    let mut b = [0u8; 6];
    env.mem.read(cpu, lin, &mut b[..off_size as usize + 2], Access::at_cpl(cpu.cpl))?;
    let off = if off_size == 4 {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    } else {
        u32::from(u16::from_le_bytes([b[0], b[1]]))
    };
    let sel = u16::from_le_bytes([b[off_size as usize], b[off_size as usize + 1]]);
    load_segment(cpu, env.mem, seg, sel)?;
    gpr_write(cpu, insn.op0_register(), off);
    Ok(Outcome::SegmentLoaded(seg))
}

fn table_register(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction, s: Sensitive) -> Result<Outcome, ExecError> {
    let store = matches!(s, Sensitive::Sgdt | Sensitive::Sidt);
    let gdt = matches!(s, Sensitive::Sgdt | Sensitive::Lgdt);
    let lin = operand::memory_linear(cpu, insn, 6, store)?;
    let acc = Access::at_cpl(cpu.cpl);
    if store {
        let r = if gdt { cpu.gdtr } else { cpu.idtr };
        let mut b = [0u8; 6];
        b[..2].copy_from_slice(&r.limit.to_le_bytes());
        b[2..].copy_from_slice(&r.base.to_le_bytes());
        env.mem.write(cpu, lin, &b, acc)?;
    } else {
        let mut b = [0u8; 6];
        env.mem.read(cpu, lin, &mut b, acc)?;
        let limit = u16::from_le_bytes([b[0], b[1]]);
        let mut base = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        if !cpu.code32() {
            base &= 0x00FF_FFFF;
        }
        let r = super::TableReg { base, limit };
        if gdt {
            cpu.gdtr = r;
        } else {
            cpu.idtr = r;
        }
    }
    Ok(Outcome::Next)
}

fn system_segment(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction, s: Sensitive) -> Result<Outcome, ExecError> {
    match s {
        Sensitive::Sldt | Sensitive::Str => {
            let v = if s == Sensitive::Sldt { cpu.ldtr.selector } else { cpu.tr.selector };
            write_operand(cpu, env.mem, insn, 0, u32::from(v))?;
            Ok(Outcome::Next)
        }
        m => {
            let sel = read_operand(cpu, env.mem, insn, 0)? as u16;
            if m == Sensitive::Lldt && sel & !3 == 0 {
                cpu.ldtr = SegReg { selector: 0, cache: Descriptor::default() };
                return Ok(Outcome::Next);
            }
            if sel & 4 != 0 {
                return Err(Fault::gp(u32::from(sel & 0xFFFC)).into());
            }
            let d = read_descriptor(cpu, env.mem, sel, false)?;
            let want = if m == Sensitive::Lldt { d.typ == 2 } else { d.typ == 9 || d.typ == 1 };
            if d.s || !want {
                return Err(Fault::gp(u32::from(sel & 0xFFFC)).into());
            }
            if !d.present {
                return Err(Fault::with_code(vector::NP, u32::from(sel & 0xFFFC)).into());
            }
            if m == Sensitive::Lldt {
                cpu.ldtr = SegReg { selector: sel, cache: d };
            } else {
                // LTR marks the TSS busy in the GDT.
                let mut busy = d;
                busy.typ |= 2;
                let hi = (busy.to_u64() >> 32) as u32;
                let at = cpu.gdtr.base.wrapping_add(u32::from(sel & !7)) + 4;
                env.mem.write(cpu, at, &hi.to_le_bytes(), Access::SUPERVISOR)?;
                cpu.tr = SegReg { selector: sel, cache: busy };
            }
            Ok(Outcome::Next)
        }
    }
}

fn msw(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction, s: Sensitive) -> Result<Outcome, ExecError> {
    match s {
        Sensitive::Smsw => {
            // To a 32-bit register: all of CR0 (the upper bits are undefined
            // on old parts; modern ones return CR0); to memory: 16 bits.
            let v = if insn.op_kind(0) == OpKind::Register { cpu.cr0 } else { cpu.cr0 & 0xFFFF };
            write_operand(cpu, env.mem, insn, 0, v)?;
            Ok(Outcome::Next)
        }
        Sensitive::Lmsw => {
            let v = read_operand(cpu, env.mem, insn, 0)? & 0xF;
            let old = cpu.cr0;
            // LMSW can set PE but not clear it.
            cpu.cr0 = (old & !0xE) | (v & 0xE) | ((old | v) & 1);
            Ok(Outcome::Mmu(MmuEffect::Cr0 { old, new: cpu.cr0 }))
        }
        _ => {
            cpu.cr0 &= !cr0::TS;
            Ok(Outcome::Next)
        }
    }
}

fn inspect_segment(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction, m: Sensitive) -> Result<Outcome, ExecError> {
    let sel_op = if matches!(m, Sensitive::Lar | Sensitive::Lsl) { 1 } else { 0 };
    let sel = read_operand(cpu, env.mem, insn, sel_op)? as u16;
    let d = if sel & !3 == 0 { None } else { read_descriptor(cpu, env.mem, sel, false).ok() };
    let rpl = (sel & 3) as u8;
    let visible = |d: &Descriptor| d.is_conforming_code() || (d.dpl >= cpu.cpl && d.dpl >= rpl);
    let ok = match (m, d) {
        (_, None) => false,
        (Sensitive::Lar, Some(d)) => visible(&d) && (d.s || matches!(d.typ, 1 | 2 | 3 | 4 | 5 | 9 | 0xB | 0xC)),
        (Sensitive::Lsl, Some(d)) => visible(&d) && (d.s || matches!(d.typ, 1 | 2 | 3 | 9 | 0xB)),
        (Sensitive::Verr, Some(d)) => d.s && d.is_readable() && visible(&d),
        (_, Some(d)) => d.s && d.is_writable_data() && visible(&d),
    };
    set_zf(cpu, ok);
    if ok {
        let d = d.expect("ok implies a descriptor");
        match m {
            Sensitive::Lar => write_operand(cpu, env.mem, insn, 0, d.access_rights())?,
            Sensitive::Lsl => write_operand(cpu, env.mem, insn, 0, d.limit)?,
            _ => {}
        }
    }
    Ok(Outcome::Next)
}

fn io(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction, s: Sensitive) -> Result<Outcome, ExecError> {
    let port_of = |cpu: &Cpu, i: u32| match insn.op_kind(i) {
        OpKind::Immediate8 => u16::from(insn.immediate8()),
        _ => cpu.gpr[2] as u16,
    };
    // INS/OUTS: the size of the string element (ES:[EDI] or DS:[ESI]).
    let elem = insn.memory_size().size() as u8;
    Ok(Outcome::Io(match s {
        Sensitive::In => IoOp::In { port: port_of(cpu, 1), size: insn.op0_register().size() as u8 },
        Sensitive::Out => {
            let r = insn.op1_register();
            IoOp::Out { port: port_of(cpu, 0), size: r.size() as u8, value: gpr_read(cpu, r) }
        }
        Sensitive::Ins => IoOp::Ins { port: cpu.gpr[2] as u16, size: elem },
        _ => {
            let size = elem;
            let seg = seg_of(insn.memory_segment()).unwrap_or(Seg::Ds);
            let lin = operand::linear(cpu, seg, cpu.gpr[6], u32::from(size), false)?;
            let mut b = [0u8; 4];
            env.mem.read(cpu, lin, &mut b[..size as usize], Access::at_cpl(cpu.cpl))?;
            IoOp::Outs { port: cpu.gpr[2] as u16, size, value: u32::from_le_bytes(b) }
        }
    }))
}

/// Finishes one iteration of a string I/O instruction: stores an `INS`
/// value, steps ESI/EDI by DF, counts ECX down for REP. Returns whether the
/// instruction is complete (EIP may advance) or must run again.
pub fn complete_string_io(
    cpu: &mut Cpu,
    mem: &mut dyn LinearMemory,
    insn: &Instruction,
    op: IoOp,
    value: u32,
) -> Result<bool, Fault> {
    let step = |cpu: &Cpu, size: u8| {
        if cpu.eflags & flags::DF != 0 {
            0u32.wrapping_sub(u32::from(size))
        } else {
            u32::from(size)
        }
    };
    match op {
        IoOp::Ins { size, .. } => {
            let lin = operand::linear(cpu, Seg::Es, cpu.gpr[7], u32::from(size), true)?;
            mem.write(cpu, lin, &value.to_le_bytes()[..size as usize], Access::at_cpl(cpu.cpl))?;
            cpu.gpr[7] = cpu.gpr[7].wrapping_add(step(cpu, size));
        }
        IoOp::Outs { size, .. } => cpu.gpr[6] = cpu.gpr[6].wrapping_add(step(cpu, size)),
        _ => return Ok(true),
    }
    if insn.has_rep_prefix() {
        cpu.gpr[1] = cpu.gpr[1].wrapping_sub(1);
        return Ok(cpu.gpr[1] == 0);
    }
    Ok(true)
}

/// Whether a REP string I/O instruction has nothing to do (ECX = 0).
pub fn string_io_is_empty(cpu: &Cpu, insn: &Instruction) -> bool {
    insn.has_rep_prefix() && cpu.gpr[1] == 0
}

fn msr_access(cpu: &mut Cpu, env: &mut Env<'_>, write: bool) -> Result<Outcome, ExecError> {
    let index = cpu.gpr[1];
    let value = (u64::from(cpu.gpr[2]) << 32) | u64::from(cpu.gpr[0]);
    let tsc = (env.host_tsc as i64).wrapping_add(cpu.msr.tsc_offset) as u64;
    let m = &mut cpu.msr;
    let read = match index {
        msr::TSC => {
            if write {
                m.tsc_offset = (value as i64).wrapping_sub(env.host_tsc as i64);
            }
            tsc
        }
        msr::PLATFORM_ID => 0,
        msr::BIOS_SIGN_ID => 0,
        msr::SYSENTER_CS => {
            if write {
                m.sysenter_cs = value as u32;
            }
            u64::from(m.sysenter_cs)
        }
        msr::SYSENTER_ESP => {
            if write {
                m.sysenter_esp = value as u32;
            }
            u64::from(m.sysenter_esp)
        }
        msr::SYSENTER_EIP => {
            if write {
                m.sysenter_eip = value as u32;
            }
            u64::from(m.sysenter_eip)
        }
        msr::MISC_ENABLE => {
            if write {
                m.misc_enable = value;
            }
            m.misc_enable
        }
        msr::PAT => {
            if write {
                m.pat = value;
            }
            m.pat
        }
        msr::EFER if env.policy.has_nx() => {
            if write {
                if value & !super::policy::EFER_NXE != 0 {
                    return Err(Fault::gp(0).into());
                }
                m.efer = value;
                return Ok(Outcome::Mmu(MmuEffect::Efer { new: value }));
            }
            m.efer
        }
        msr::ARCH_CAPABILITIES if env.policy.arch_caps.is_some() => {
            if write {
                return Err(Fault::gp(0).into());
            }
            env.policy.arch_caps.unwrap_or(0)
        }
        msr::APIC_BASE if env.policy.has_apic() => {
            if write {
                m.apic_base = super::policy::apic_base_write(m.apic_base, value)?;
            }
            m.apic_base
        }
        msr::TSC_DEADLINE if env.policy.has_tsc_deadline() => {
            return Ok(Outcome::Msr(if write { MsrOp::Write { index, value, tsc } } else { MsrOp::Read { index } }));
        }
        _ => return Err(Fault::gp(0).into()),
    };
    if !write {
        cpu.gpr[0] = read as u32;
        cpu.gpr[2] = (read >> 32) as u32;
    }
    Ok(Outcome::Next)
}

fn counters(cpu: &mut Cpu, env: &mut Env<'_>, m: Sensitive) -> Result<Outcome, ExecError> {
    match m {
        Sensitive::Rdpmc => {
            if cpu.cpl != 0 && cpu.cr4 & cr4::PCE == 0 {
                return Err(Fault::gp(0).into());
            }
            // No performance counters: the guest sees them stopped.
            cpu.gpr[0] = 0;
            cpu.gpr[2] = 0;
        }
        _ => {
            if cpu.cpl != 0 && cpu.cr4 & cr4::TSD != 0 {
                return Err(Fault::gp(0).into());
            }
            let tsc = (env.host_tsc as i64).wrapping_add(cpu.msr.tsc_offset) as u64;
            cpu.gpr[0] = tsc as u32;
            cpu.gpr[2] = (tsc >> 32) as u32;
            if m == Sensitive::Rdtscp {
                cpu.gpr[1] = 0;
            }
        }
    }
    Ok(Outcome::Next)
}

fn iret(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction) -> Result<Outcome, ExecError> {
    if insn.code() != Code::Iretd {
        return Err(ExecError::Unsupported("16-bit IRET"));
    }
    if !cpu.protected_mode() {
        return Err(ExecError::Unsupported("real-mode IRET"));
    }
    interrupt::iret(cpu, env.mem).map_err(|e| match e {
        Ok(f) => ExecError::Fault(f),
        Err(d) => ExecError::Delivery(d),
    })?;
    Ok(Outcome::Jumped)
}

/// Loads CS for a far JMP/CALL/RET to `sel` (no gates, no privilege change
/// except outward on RET).
fn code_descriptor(cpu: &Cpu, mem: &mut dyn LinearMemory, sel: u16, ret: bool) -> Result<Descriptor, ExecError> {
    if sel & !3 == 0 {
        return Err(Fault::gp(0).into());
    }
    let d = read_descriptor(cpu, mem, sel, false)?;
    let rpl = (sel & 3) as u8;
    let gp = || ExecError::Fault(Fault::gp(u32::from(sel & 0xFFFC)));
    if !d.s {
        return Err(if matches!(d.typ, 4 | 0xC | 5 | 9 | 0xB) {
            ExecError::Unsupported("call gates, task gates and task switches")
        } else {
            gp()
        });
    }
    if !d.is_code() {
        return Err(gp());
    }
    let ok = if ret {
        rpl >= cpu.cpl && if d.is_conforming_code() { d.dpl <= rpl } else { d.dpl == rpl }
    } else if d.is_conforming_code() {
        d.dpl <= cpu.cpl
    } else {
        rpl <= cpu.cpl && d.dpl == cpu.cpl
    };
    if !ok {
        return Err(gp());
    }
    if !d.present {
        return Err(Fault::with_code(vector::NP, u32::from(sel & 0xFFFC)).into());
    }
    Ok(d)
}

fn far_transfer(cpu: &mut Cpu, env: &mut Env<'_>, insn: &Instruction, f: Flow) -> Result<Outcome, ExecError> {
    let size = operand_bytes(insn);
    if f == Flow::FarRet {
        let eip = peek(cpu, env.mem, 0, size)?;
        let sel = peek(cpu, env.mem, size, size)? as u16;
        let imm = if insn.op_count() > 0 { u32::from(insn.immediate16()) } else { 0 };
        if !cpu.protected_mode() {
            cpu.gpr[4] = cpu.gpr[4].wrapping_add(2 * size + imm);
            cpu.seg[Seg::Cs as usize].selector = sel;
            cpu.seg[Seg::Cs as usize].cache.base = u32::from(sel) << 4;
            cpu.eip = eip;
            return Ok(Outcome::Jumped);
        }
        let d = code_descriptor(cpu, env.mem, sel, true)?;
        let rpl = (sel & 3) as u8;
        if rpl > cpu.cpl {
            let esp = peek(cpu, env.mem, 2 * size + imm, size)?;
            let ss = peek(cpu, env.mem, 3 * size + imm, size)? as u16;
            let saved = cpu.cpl;
            cpu.cpl = rpl;
            let r = load_segment(cpu, env.mem, Seg::Ss, ss);
            cpu.cpl = saved;
            r?;
            cpu.gpr[4] = esp.wrapping_add(imm);
            cpu.cpl = rpl;
        } else {
            cpu.gpr[4] = cpu.gpr[4].wrapping_add(2 * size + imm);
        }
        cpu.seg[Seg::Cs as usize] = SegReg { selector: sel, cache: d };
        cpu.eip = eip;
        return Ok(Outcome::Jumped);
    }
    let (sel, offset) = match insn.op0_kind() {
        OpKind::FarBranch32 | OpKind::FarBranch16 => (insn.far_branch_selector(), insn.far_branch32()),
        OpKind::Memory => {
            let n = insn.memory_size().size() as u32;
            let lin = operand::memory_linear(cpu, insn, n, false)?;
            let mut b = [0u8; 6];
            env.mem.read(cpu, lin, &mut b[..n as usize], Access::at_cpl(cpu.cpl))?;
            if n == 6 {
                (u16::from_le_bytes([b[4], b[5]]), u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            } else {
                (u16::from_le_bytes([b[2], b[3]]), u32::from(u16::from_le_bytes([b[0], b[1]])))
            }
        }
        _ => return Err(ExecError::Unsupported("near branch through the far-transfer path")),
    };
    let call = f == Flow::FarCall;
    let push_size = size;
    if !cpu.protected_mode() {
        if call {
            push(cpu, env.mem, u32::from(cpu.seg(Seg::Cs).selector), push_size)?;
            push(cpu, env.mem, insn.next_ip32(), push_size)?;
        }
        cpu.seg[Seg::Cs as usize].selector = sel;
        cpu.seg[Seg::Cs as usize].cache.base = u32::from(sel) << 4;
        cpu.eip = offset;
        return Ok(Outcome::Jumped);
    }
    let d = code_descriptor(cpu, env.mem, sel, false)?;
    if offset > d.limit {
        return Err(Fault::gp(0).into());
    }
    if call {
        let esp = cpu.gpr[4];
        let r = push(cpu, env.mem, u32::from(cpu.seg(Seg::Cs).selector), push_size)
            .and_then(|_| push(cpu, env.mem, insn.next_ip32(), push_size));
        if let Err(f) = r {
            cpu.gpr[4] = esp;
            return Err(f.into());
        }
    }
    cpu.seg[Seg::Cs as usize] = SegReg { selector: (sel & !3) | u16::from(cpu.cpl), cache: d };
    cpu.eip = offset;
    Ok(Outcome::Jumped)
}

fn flat(dpl: u8, code: bool) -> Descriptor {
    Descriptor {
        base: 0,
        limit: u32::MAX,
        typ: if code { 0xB } else { 0x3 },
        s: true,
        dpl,
        present: true,
        db: true,
        g: true,
        avl: false,
    }
}

fn sysenter(cpu: &mut Cpu) -> Result<Outcome, ExecError> {
    let cs = cpu.msr.sysenter_cs as u16;
    if !cpu.protected_mode() || cs & !3 == 0 {
        return Err(Fault::gp(0).into());
    }
    cpu.eflags &= !(flags::VM | flags::IF | flags::RF);
    cpu.cpl = 0;
    cpu.seg[Seg::Cs as usize] = SegReg { selector: cs & 0xFFFC, cache: flat(0, true) };
    cpu.seg[Seg::Ss as usize] = SegReg { selector: (cs & 0xFFFC) + 8, cache: flat(0, false) };
    cpu.gpr[4] = cpu.msr.sysenter_esp;
    cpu.eip = cpu.msr.sysenter_eip;
    Ok(Outcome::Jumped)
}

fn sysexit(cpu: &mut Cpu) -> Result<Outcome, ExecError> {
    let cs = cpu.msr.sysenter_cs as u16;
    if !cpu.protected_mode() || cpu.cpl != 0 || cs & !3 == 0 {
        return Err(Fault::gp(0).into());
    }
    cpu.cpl = 3;
    cpu.seg[Seg::Cs as usize] = SegReg { selector: ((cs & 0xFFFC) + 16) | 3, cache: flat(3, true) };
    cpu.seg[Seg::Ss as usize] = SegReg { selector: ((cs & 0xFFFC) + 24) | 3, cache: flat(3, false) };
    cpu.gpr[4] = cpu.gpr[1];
    cpu.eip = cpu.gpr[2];
    Ok(Outcome::Jumped)
}

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::*;
    use iced_x86::Decoder;

    use super::super::interrupt::tests::{machine, FlatMem};
    use super::*;

    /// Assembles one instruction at `ip` and executes it on the virtual CPU.
    fn exec(
        cpu: &mut Cpu,
        m: &mut FlatMem,
        f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    ) -> Result<Outcome, ExecError> {
        exec_on(&CpuPolicy::default(), cpu, m, f)
    }

    /// [`exec`] on the CPU of `policy`.
    fn exec_on(
        policy: &CpuPolicy,
        cpu: &mut Cpu,
        m: &mut FlatMem,
        f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    ) -> Result<Outcome, ExecError> {
        let mut a = CodeAssembler::new(32).unwrap();
        f(&mut a).unwrap();
        let bytes = a.assemble(u64::from(cpu.eip)).unwrap();
        let insn = Decoder::with_ip(32, &bytes, u64::from(cpu.eip), 0).decode();
        let mut env = Env { mem: m, policy, host_tsc: 1000 };
        let r = execute(cpu, &mut env, &insn, &engine::classify::classify(&insn));
        if matches!(r, Ok(Outcome::Next | Outcome::Mmu(_) | Outcome::SegmentLoaded(_))) {
            cpu.eip = insn.next_ip32();
        }
        r
    }

    #[test]
    fn pushf_shows_virtual_if_and_iopl() {
        let (mut cpu, mut m) = machine();
        cpu.eflags = 0x3202 | flags::CF; // IOPL 3, IF
        exec(&mut cpu, &mut m, |a| a.pushfd()).unwrap();
        let v = u32::from_le_bytes(m.0[cpu.gpr[4] as usize..][..4].try_into().unwrap());
        assert_eq!(v & (flags::IF | flags::IOPL | flags::CF), flags::IF | flags::IOPL | flags::CF);
    }

    #[test]
    fn popf_at_cpl3_cannot_change_if_or_iopl() {
        let (mut cpu, mut m) = machine();
        cpu.cpl = 3;
        cpu.eflags = 0x202;
        cpu.gpr[4] = 0x8000;
        m.0[0x8000..0x8004].copy_from_slice(&(0x3000u32 | flags::CF).to_le_bytes()); // IF=0, IOPL=3
        exec(&mut cpu, &mut m, |a| a.popfd()).unwrap();
        assert_eq!(cpu.eflags & (flags::IF | flags::IOPL | flags::CF), flags::IF | flags::CF);
        assert_eq!(cpu.gpr[4], 0x8004);
    }

    #[test]
    fn cli_at_cpl3_is_gp_and_sti_sets_the_shadow() {
        let (mut cpu, mut m) = machine();
        exec(&mut cpu, &mut m, |a| a.cli()).unwrap();
        assert_eq!(cpu.eflags & flags::IF, 0);
        exec(&mut cpu, &mut m, |a| a.sti()).unwrap();
        assert!(cpu.interrupts_enabled() && cpu.interrupt_shadow);
        cpu.cpl = 3;
        assert_eq!(exec(&mut cpu, &mut m, |a| a.cli()), Err(ExecError::Fault(Fault::gp(0))));
    }

    #[test]
    fn control_registers_and_smsw_show_guest_values() {
        let (mut cpu, mut m) = machine();
        cpu.gpr[0] = 0x8000_0011;
        let r = exec(&mut cpu, &mut m, |a| a.mov(cr0, eax)).unwrap();
        assert!(matches!(r, Outcome::Mmu(MmuEffect::Cr0 { new: 0x8000_0011, .. })));
        exec(&mut cpu, &mut m, |a| a.mov(ebx, cr0)).unwrap();
        assert_eq!(cpu.gpr[3], 0x8000_0011);
        exec(&mut cpu, &mut m, |a| a.smsw(ecx)).unwrap();
        assert_eq!(cpu.gpr[1] & 0xFFFF, 0x11);
        cpu.gpr[2] = 0x12_3000;
        assert_eq!(
            exec(&mut cpu, &mut m, |a| a.mov(cr3, edx)).unwrap(),
            Outcome::Mmu(MmuEffect::Cr3 { new: 0x12_3000 })
        );
        cpu.cpl = 3;
        assert_eq!(exec(&mut cpu, &mut m, |a| a.mov(eax, cr0)), Err(ExecError::Fault(Fault::gp(0))));
    }

    #[test]
    fn lgdt_then_sgdt_round_trips_and_sldt_str() {
        let (mut cpu, mut m) = machine();
        m.0[0x9100..0x9106].copy_from_slice(&[0x3F, 0x00, 0x00, 0x20, 0x01, 0x00]);
        exec(&mut cpu, &mut m, |a| a.lgdt(ptr(0x9100u32))).unwrap();
        assert_eq!((cpu.gdtr.base, cpu.gdtr.limit), (0x12000, 0x3F));
        exec(&mut cpu, &mut m, |a| a.sgdt(ptr(0x9200u32))).unwrap();
        assert_eq!(&m.0[0x9200..0x9206], &[0x3F, 0x00, 0x00, 0x20, 0x01, 0x00]);
        exec(&mut cpu, &mut m, |a| a.str(eax)).unwrap();
        assert_eq!(cpu.gpr[0], 0x30);
    }

    #[test]
    fn mov_from_cs_shows_the_guest_selector_with_its_rpl() {
        let (mut cpu, mut m) = machine();
        exec(&mut cpu, &mut m, |a| a.mov(eax, cs)).unwrap();
        assert_eq!(cpu.gpr[0], 0x10);
        exec(&mut cpu, &mut m, |a| a.push(ss)).unwrap();
        assert_eq!(u32::from_le_bytes(m.0[cpu.gpr[4] as usize..][..4].try_into().unwrap()), 0x18);
    }

    #[test]
    fn lar_lsl_verr_verw() {
        let (mut cpu, mut m) = machine();
        cpu.gpr[1] = 0x2b;
        exec(&mut cpu, &mut m, |a| a.lsl(eax, ecx)).unwrap();
        assert_eq!((cpu.gpr[0], cpu.eflags & flags::ZF), (u32::MAX, flags::ZF));
        exec(&mut cpu, &mut m, |a| a.lar(eax, ecx)).unwrap();
        assert_eq!(cpu.gpr[0], 0x00C0_F300, "LAR masks the limit bits 19:16");
        cpu.gpr[1] = 0x10;
        exec(&mut cpu, &mut m, |a| a.verw(cx)).unwrap();
        assert_eq!(cpu.eflags & flags::ZF, 0, "code is not writable");
    }

    #[test]
    fn port_io_and_cpuid_and_msrs() {
        let (mut cpu, mut m) = machine();
        cpu.gpr[0] = 0xAB;
        assert_eq!(
            exec(&mut cpu, &mut m, |a| a.out(0x80, al)).unwrap(),
            Outcome::Io(IoOp::Out { port: 0x80, size: 1, value: 0xAB })
        );
        cpu.gpr[2] = 0x3F8;
        assert_eq!(exec(&mut cpu, &mut m, |a| a.in_(ax, dx)).unwrap(), Outcome::Io(IoOp::In { port: 0x3F8, size: 2 }));
        cpu.gpr[0] = 0;
        exec(&mut cpu, &mut m, |a| a.cpuid()).unwrap();
        assert_eq!(cpu.gpr[3], u32::from_le_bytes(*b"Genu"));
        cpu.gpr[1] = 0x1234_5678; // unknown MSR
        assert_eq!(exec(&mut cpu, &mut m, |a| a.rdmsr()), Err(ExecError::Fault(Fault::gp(0))));
        cpu.gpr[1] = msr::SYSENTER_EIP;
        cpu.gpr[0] = 0xC000_1000;
        exec(&mut cpu, &mut m, |a| a.wrmsr()).unwrap();
        assert_eq!(cpu.msr.sysenter_eip, 0xC000_1000);
    }

    #[test]
    fn tsc_deadline_msr_goes_to_the_machine_on_the_pc_cpu_only() {
        let pc = CpuPolicy::pc(1_000_000_000);
        let (mut cpu, mut m) = machine();
        cpu.msr.tsc_offset = 5;
        cpu.gpr[1] = msr::TSC_DEADLINE;
        cpu.gpr[0] = 0x89AB_CDEF;
        cpu.gpr[2] = 0x1234;
        assert_eq!(
            exec_on(&pc, &mut cpu, &mut m, |a| a.wrmsr()),
            Ok(Outcome::Msr(MsrOp::Write { index: msr::TSC_DEADLINE, value: 0x1234_89AB_CDEF, tsc: 1005 }))
        );
        assert_eq!(
            exec_on(&pc, &mut cpu, &mut m, |a| a.rdmsr()),
            Ok(Outcome::Msr(MsrOp::Read { index: msr::TSC_DEADLINE }))
        );
        let gp = Err(ExecError::Fault(Fault::gp(0)));
        assert_eq!(exec(&mut cpu, &mut m, |a| a.rdmsr()), gp, "isa: no such MSR");
        assert_eq!(exec(&mut cpu, &mut m, |a| a.wrmsr()), gp);
        cpu.cpl = 3;
        assert_eq!(exec_on(&pc, &mut cpu, &mut m, |a| a.wrmsr()), gp, "CPL 0 only");
    }

    #[test]
    fn far_jump_loads_a_new_cs() {
        let (mut cpu, mut m) = machine();
        // A second ring-0 code segment at GDT 0x38 based at 0x10000.
        let d = Descriptor {
            base: 0x1_0000,
            limit: 0xFFFF,
            typ: 0xB,
            s: true,
            present: true,
            db: true,
            ..Default::default()
        };
        m.0[0x1038..0x1040].copy_from_slice(&d.to_u64().to_le_bytes());
        let r = exec(&mut cpu, &mut m, |a| a.jmp(fword_ptr(0x9300u32)));
        assert!(r.is_err(), "no far pointer there yet: selector 0 is #GP");
        m.0[0x9300..0x9306].copy_from_slice(&[0x34, 0x12, 0, 0, 0x38, 0]);
        exec(&mut cpu, &mut m, |a| a.jmp(fword_ptr(0x9300u32))).unwrap();
        assert_eq!((cpu.seg(Seg::Cs).selector, cpu.seg(Seg::Cs).cache.base, cpu.eip), (0x38, 0x1_0000, 0x1234));
    }

    #[test]
    fn privilege_and_iopl_checks_come_from_the_table() {
        let (mut cpu, mut m) = machine();
        cpu.cpl = 3;
        let gp = Err(ExecError::Fault(Fault::gp(0)));
        assert_eq!(exec(&mut cpu, &mut m, |a| a.hlt()), gp);
        assert_eq!(exec(&mut cpu, &mut m, |a| a.mov(cr0, eax)), gp);
        assert_eq!(exec(&mut cpu, &mut m, |a| a.mov(eax, cr3)), gp);
        assert_eq!(exec(&mut cpu, &mut m, |a| a.lgdt(ptr(0x9000u32))), gp);
        assert_eq!(exec(&mut cpu, &mut m, |a| a.clts()), gp);
        assert_eq!(exec(&mut cpu, &mut m, |a| a.rdmsr()), gp);
        assert_eq!(exec(&mut cpu, &mut m, |a| a.invlpg(ptr(0x9000u32))), gp);
        // Not privileged: the guest sees its own GDTR (the silent ones).
        assert!(exec(&mut cpu, &mut m, |a| a.sgdt(ptr(0x9000u32))).is_ok());
        // IOPL-sensitive: #GP while CPL > IOPL, allowed at IOPL 3.
        assert_eq!(exec(&mut cpu, &mut m, |a| a.out(0x80, al)), gp);
        cpu.eflags |= flags::IOPL;
        assert!(matches!(exec(&mut cpu, &mut m, |a| a.out(0x80, al)), Ok(Outcome::Io(IoOp::Out { port: 0x80, .. }))));
    }

    #[test]
    fn string_io_sizes_come_from_the_encoding() {
        let (mut cpu, mut m) = machine();
        cpu.gpr[2] = 0x3F8;
        for (size, r) in [
            (1, exec(&mut cpu, &mut m, |a| a.insb())),
            (2, exec(&mut cpu, &mut m, |a| a.insw())),
            (4, exec(&mut cpu, &mut m, |a| a.insd())),
        ] {
            assert_eq!(r, Ok(Outcome::Io(IoOp::Ins { port: 0x3F8, size })));
        }
    }
}
