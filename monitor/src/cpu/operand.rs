//! Operands of decoded guest instructions: general registers of every width,
//! segment registers, effective addresses with the guest's segmentation
//! (base, limit, #GP/#SS on violation), memory through [`LinearMemory`].

use iced_x86::{Instruction, OpKind, Register};

use super::state::{Cpu, Seg};
use super::{vector, Access, Fault, LinearMemory};

/// Reads an 8-, 16- or 32-bit general register.
pub fn gpr_read(cpu: &Cpu, reg: Register) -> u32 {
    let full = reg.full_register32();
    let idx = full as usize - Register::EAX as usize;
    let v = cpu.gpr[idx];
    if reg.is_gpr32() {
        v
    } else if reg.is_gpr16() {
        v & 0xFFFF
    } else if matches!(reg, Register::AH | Register::CH | Register::DH | Register::BH) {
        (cpu.gpr[reg as usize - Register::AH as usize] >> 8) & 0xFF
    } else {
        v & 0xFF
    }
}

/// Writes an 8-, 16- or 32-bit general register (partial writes keep the rest).
pub fn gpr_write(cpu: &mut Cpu, reg: Register, value: u32) {
    if matches!(reg, Register::AH | Register::CH | Register::DH | Register::BH) {
        let r = &mut cpu.gpr[reg as usize - Register::AH as usize];
        *r = (*r & !0xFF00) | ((value & 0xFF) << 8);
        return;
    }
    let idx = reg.full_register32() as usize - Register::EAX as usize;
    let r = &mut cpu.gpr[idx];
    *r = if reg.is_gpr32() {
        value
    } else if reg.is_gpr16() {
        (*r & !0xFFFF) | (value & 0xFFFF)
    } else {
        (*r & !0xFF) | (value & 0xFF)
    };
}

/// The segment register an iced `Register` names.
pub fn seg_of(reg: Register) -> Option<Seg> {
    Some(match reg {
        Register::ES => Seg::Es,
        Register::CS => Seg::Cs,
        Register::SS => Seg::Ss,
        Register::DS => Seg::Ds,
        Register::FS => Seg::Fs,
        Register::GS => Seg::Gs,
        _ => return None,
    })
}

/// Offset (effective address) of the memory operand, in the instruction's
/// address size.
pub fn effective_address(cpu: &Cpu, insn: &Instruction) -> u32 {
    let mut ea = insn.memory_displacement32();
    if insn.memory_base() != Register::None {
        ea = ea.wrapping_add(gpr_read(cpu, insn.memory_base()));
    }
    if insn.memory_index() != Register::None {
        ea = ea.wrapping_add(gpr_read(cpu, insn.memory_index()).wrapping_mul(insn.memory_index_scale()));
    }
    if insn.memory_displ_size() == 2 || insn.memory_base().is_gpr16() || insn.memory_index().is_gpr16() {
        ea &= 0xFFFF;
    }
    ea
}

/// Checks `[offset, offset+len)` against the segment's limit and rights and
/// returns the linear address.
pub fn linear(cpu: &Cpu, seg: Seg, offset: u32, len: u32, write: bool) -> Result<u32, Fault> {
    let c = &cpu.seg(seg).cache;
    let fault = || if seg == Seg::Ss { Fault::with_code(vector::SS, 0) } else { Fault::gp(0) };
    if cpu.protected_mode() {
        if !c.present || (write && !c.is_writable_data()) || (!write && !c.is_readable()) {
            return Err(fault());
        }
        let last = u64::from(offset) + u64::from(len.max(1)) - 1;
        let ok = if c.is_expand_down() {
            let upper = if c.db { 0xFFFF_FFFF } else { 0xFFFF };
            u64::from(offset) > u64::from(c.limit) && last <= upper
        } else {
            last <= u64::from(c.limit)
        };
        if !ok {
            return Err(fault());
        }
    }
    Ok(c.base.wrapping_add(offset))
}

/// Linear address of the instruction's memory operand (`len` bytes).
pub fn memory_linear(cpu: &Cpu, insn: &Instruction, len: u32, write: bool) -> Result<u32, Fault> {
    let seg = seg_of(insn.memory_segment()).unwrap_or(Seg::Ds);
    linear(cpu, seg, effective_address(cpu, insn), len, write)
}

/// Size in bytes of operand `i`.
pub fn operand_size(insn: &Instruction, i: u32) -> u32 {
    match insn.op_kind(i) {
        OpKind::Register => insn.op_register(i).size() as u32,
        OpKind::Memory => insn.memory_size().size() as u32,
        OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
        OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
        _ => 4,
    }
}

/// Reads operand `i` (register, memory or immediate), zero-extended.
pub fn read_operand(cpu: &Cpu, mem: &mut dyn LinearMemory, insn: &Instruction, i: u32) -> Result<u32, Fault> {
    Ok(match insn.op_kind(i) {
        OpKind::Register => {
            let r = insn.op_register(i);
            match seg_of(r) {
                Some(s) => u32::from(cpu.seg(s).selector),
                None => gpr_read(cpu, r),
            }
        }
        OpKind::Memory => {
            let n = operand_size(insn, i).min(4);
            let lin = memory_linear(cpu, insn, n, false)?;
            let mut b = [0u8; 4];
            mem.read(cpu, lin, &mut b[..n as usize], Access::at_cpl(cpu.cpl))?;
            u32::from_le_bytes(b)
        }
        OpKind::Immediate8 => u32::from(insn.immediate8()),
        OpKind::Immediate16 => u32::from(insn.immediate16()),
        OpKind::Immediate32 => insn.immediate32(),
        OpKind::Immediate8to16 => u32::from(insn.immediate8to16() as u16),
        OpKind::Immediate8to32 => insn.immediate8to32() as u32,
        _ => return Err(Fault::ud()),
    })
}

/// Writes operand `i` (register or memory), truncated to its size.
pub fn write_operand(
    cpu: &mut Cpu,
    mem: &mut dyn LinearMemory,
    insn: &Instruction,
    i: u32,
    v: u32,
) -> Result<(), Fault> {
    match insn.op_kind(i) {
        OpKind::Register => {
            gpr_write(cpu, insn.op_register(i), v);
            Ok(())
        }
        OpKind::Memory => {
            let n = operand_size(insn, i).min(4);
            let lin = memory_linear(cpu, insn, n, true)?;
            mem.write(cpu, lin, &v.to_le_bytes()[..n as usize], Access::at_cpl(cpu.cpl))
        }
        _ => Err(Fault::ud()),
    }
}

/// Pushes a 32-bit (or 16-bit) value on the guest stack.
pub fn push(cpu: &mut Cpu, mem: &mut dyn LinearMemory, v: u32, size: u32) -> Result<(), Fault> {
    let esp = cpu.gpr[4].wrapping_sub(size);
    let lin = linear(cpu, Seg::Ss, esp, size, true)?;
    mem.write(cpu, lin, &v.to_le_bytes()[..size as usize], Access::at_cpl(cpu.cpl))?;
    cpu.gpr[4] = esp;
    Ok(())
}

/// Reads the value `offset` bytes above the stack top without popping it.
pub fn peek(cpu: &Cpu, mem: &mut dyn LinearMemory, offset: u32, size: u32) -> Result<u32, Fault> {
    let lin = linear(cpu, Seg::Ss, cpu.gpr[4].wrapping_add(offset), size, false)?;
    let mut b = [0u8; 4];
    mem.read(cpu, lin, &mut b[..size as usize], Access::at_cpl(cpu.cpl))?;
    Ok(u32::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_register_writes() {
        let mut c = Cpu::flat_protected(8, 16);
        c.gpr[0] = 0x1122_3344;
        gpr_write(&mut c, Register::AH, 0xAB);
        assert_eq!(c.gpr[0], 0x1122_AB44);
        gpr_write(&mut c, Register::AX, 0x5566);
        assert_eq!(c.gpr[0], 0x1122_5566);
        assert_eq!(gpr_read(&c, Register::AH), 0x55);
        gpr_write(&mut c, Register::BL, 0x7);
        assert_eq!(gpr_read(&c, Register::EBX), 7);
    }

    #[test]
    fn limits_are_checked() {
        let mut c = Cpu::flat_protected(8, 16);
        c.seg[Seg::Ds as usize].cache.limit = 0xFFF;
        assert_eq!(linear(&c, Seg::Ds, 0xFFC, 4, false), Ok(0xFFC));
        assert_eq!(linear(&c, Seg::Ds, 0xFFD, 4, false), Err(Fault::gp(0)));
        c.seg[Seg::Ss as usize].cache.limit = 0xFFF;
        assert_eq!(linear(&c, Seg::Ss, 0x1000, 4, true), Err(Fault::with_code(vector::SS, 0)));
    }
}
