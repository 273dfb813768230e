//! String instructions (MOVS, STOS, LODS, CMPS, SCAS, with REP/REPE/REPNE)
//! on the virtual CPU, for the accesses the window cannot serve: guest page
//! 0 lies below the host's `mmap_min_addr` and is never mapped, so its
//! accesses are emulated, and re-execution only redirects an explicit
//! memory operand (docs/reliability.md, finding 9). Every other string
//! instruction runs natively.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::operand::linear;
use super::state::{flags, gpr};
use super::{Access, Cpu, Fault, LinearMemory, Seg};

/// How far a call got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StringStep {
    /// The instruction completed: EIP may move on.
    Done,
    /// The iteration budget ran out with iterations left: the registers
    /// hold the progress (as after an interrupt in the middle of a REP),
    /// EIP stays, and the next run continues.
    More,
}

/// Why a string instruction cannot be run here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StringError {
    #[error("{0:?} is not a string instruction this emulator runs")]
    NotString(Mnemonic),
    #[error("a guest fault")]
    Fault(Fault),
}

impl From<Fault> for StringError {
    fn from(f: Fault) -> Self {
        StringError::Fault(f)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
}

fn op_of(m: Mnemonic) -> Option<Op> {
    use Mnemonic as M;
    Some(match m {
        M::Movsb | M::Movsw | M::Movsd => Op::Movs,
        M::Stosb | M::Stosw | M::Stosd => Op::Stos,
        M::Lodsb | M::Lodsw | M::Lodsd => Op::Lods,
        M::Cmpsb | M::Cmpsw | M::Cmpsd => Op::Cmps,
        M::Scasb | M::Scasw | M::Scasd => Op::Scas,
        _ => return None,
    })
}

/// The arithmetic flags of `a - b` in `bits` bits (CMPS, SCAS), as the
/// processor computes them.
pub fn sub_flags(a: u32, b: u32, bits: u32) -> u32 {
    let mask = if bits >= 32 { u32::MAX } else { (1 << bits) - 1 };
    let (a, b) = (a & mask, b & mask);
    let r = a.wrapping_sub(b) & mask;
    let sign = 1 << (bits - 1);
    let mut f = 0;
    if a < b {
        f |= flags::CF;
    }
    if r == 0 {
        f |= flags::ZF;
    }
    if r & sign != 0 {
        f |= flags::SF;
    }
    if (a ^ b) & (a ^ r) & sign != 0 {
        f |= flags::OF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= flags::AF;
    }
    if (r as u8).count_ones().is_multiple_of(2) {
        f |= flags::PF;
    }
    f
}

const ARITH: u32 = flags::CF | flags::PF | flags::AF | flags::ZF | flags::SF | flags::OF;

/// Runs string instruction `insn` at most `budget` iterations (at least
/// one). A fault leaves the registers as the iterations before it left
/// them, as on the processor.
pub fn execute(
    cpu: &mut Cpu,
    mem: &mut dyn LinearMemory,
    insn: &Instruction,
    budget: u32,
) -> Result<StringStep, StringError> {
    let op = op_of(insn.mnemonic()).ok_or(StringError::NotString(insn.mnemonic()))?;
    let size = insn.memory_size().size() as u32;
    let bits = size * 8;
    // 16-bit addressing: SI, DI and CX.
    let a16 = (0..insn.op_count())
        .any(|i| matches!(insn.op_kind(i), OpKind::MemorySegSI | OpKind::MemorySegDI | OpKind::MemoryESDI));
    let addr_mask = if a16 { 0xFFFF } else { u32::MAX };
    let src_seg = super::operand::seg_of(insn.memory_segment()).unwrap_or(Seg::Ds);
    let rep = insn.has_rep_prefix() || insn.has_repne_prefix();
    let access = Access::at_cpl(cpu.cpl);
    let step = if cpu.eflags & flags::DF != 0 { size.wrapping_neg() } else { size };
    let reg_of = |cpu: &Cpu, r: usize| cpu.gpr[r] & addr_mask;
    let advance = |cpu: &mut Cpu, r: usize| {
        cpu.gpr[r] = (cpu.gpr[r] & !addr_mask) | (cpu.gpr[r].wrapping_add(step) & addr_mask);
    };
    let value_mask = if bits >= 32 { u32::MAX } else { (1 << bits) - 1 };
    for _ in 0..budget.max(1) {
        if rep && reg_of(cpu, gpr::ECX) == 0 {
            return Ok(StringStep::Done);
        }
        let mut buf = [0u8; 4];
        let data = &mut buf[..size as usize];
        let read = |cpu: &Cpu, mem: &mut dyn LinearMemory, seg: Seg, reg: usize, data: &mut [u8]| {
            let lin = linear(cpu, seg, reg_of(cpu, reg), size, false)?;
            mem.read(cpu, lin, data, access)
        };
        let value = |data: &[u8]| data.iter().rev().fold(0u32, |v, &b| (v << 8) | u32::from(b));
        match op {
            Op::Movs => {
                read(cpu, mem, src_seg, gpr::ESI, data)?;
                let lin = linear(cpu, Seg::Es, reg_of(cpu, gpr::EDI), size, true)?;
                mem.write(cpu, lin, data, access)?;
                advance(cpu, gpr::ESI);
                advance(cpu, gpr::EDI);
            }
            Op::Stos => {
                data.copy_from_slice(&cpu.gpr[gpr::EAX].to_le_bytes()[..size as usize]);
                let lin = linear(cpu, Seg::Es, reg_of(cpu, gpr::EDI), size, true)?;
                mem.write(cpu, lin, data, access)?;
                advance(cpu, gpr::EDI);
            }
            Op::Lods => {
                read(cpu, mem, src_seg, gpr::ESI, data)?;
                cpu.gpr[gpr::EAX] = (cpu.gpr[gpr::EAX] & !value_mask) | value(data);
                advance(cpu, gpr::ESI);
            }
            Op::Cmps | Op::Scas => {
                let (a, b) = if op == Op::Cmps {
                    read(cpu, mem, src_seg, gpr::ESI, data)?;
                    let a = value(data);
                    read(cpu, mem, Seg::Es, gpr::EDI, data)?;
                    (a, value(data))
                } else {
                    read(cpu, mem, Seg::Es, gpr::EDI, data)?;
                    (cpu.gpr[gpr::EAX] & value_mask, value(data))
                };
                cpu.eflags = (cpu.eflags & !ARITH) | sub_flags(a, b, bits);
                if op == Op::Cmps {
                    advance(cpu, gpr::ESI);
                }
                advance(cpu, gpr::EDI);
            }
        }
        if !rep {
            return Ok(StringStep::Done);
        }
        cpu.gpr[gpr::ECX] = (cpu.gpr[gpr::ECX] & !addr_mask) | (reg_of(cpu, gpr::ECX).wrapping_sub(1) & addr_mask);
        if matches!(op, Op::Cmps | Op::Scas) {
            // REPE stops on a difference, REPNE on equality.
            let zf = cpu.eflags & flags::ZF != 0;
            if (insn.has_rep_prefix() && !zf) || (insn.has_repne_prefix() && zf) {
                return Ok(StringStep::Done);
            }
        }
    }
    if rep && reg_of(cpu, gpr::ECX) == 0 {
        return Ok(StringStep::Done);
    }
    Ok(StringStep::More)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::interrupt::tests::FlatMem;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(32, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    fn flat_cpu() -> Cpu {
        Cpu { eflags: 0x2, ..Cpu::default() }
    }

    /// The flags of `cmp` as the host CPU computes them, for random pairs
    /// in 8, 16 and 32 bits.
    #[test]
    fn sub_flags_match_the_processor() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u32
        };
        for i in 0..30_000 {
            let (mut a, mut b) = (next(), next());
            if i % 7 == 0 {
                b = a; // equal operands: ZF
            }
            if i % 11 == 0 {
                a &= 0x8000_00FF; // small and sign-edge values
            }
            let host = |bits: u32| -> u32 {
                let f: u64;
                // SAFETY: a register compare and a flags read; no memory.
                unsafe {
                    match bits {
                        8 => {
                            std::arch::asm!("cmp {a:l}, {b:l}", "pushfq", "pop {f}", a = in(reg) a, b = in(reg) b, f = out(reg) f)
                        }
                        16 => {
                            std::arch::asm!("cmp {a:x}, {b:x}", "pushfq", "pop {f}", a = in(reg) a, b = in(reg) b, f = out(reg) f)
                        }
                        _ => {
                            std::arch::asm!("cmp {a:e}, {b:e}", "pushfq", "pop {f}", a = in(reg) a, b = in(reg) b, f = out(reg) f)
                        }
                    }
                }
                f as u32 & ARITH
            };
            for bits in [8, 16, 32] {
                assert_eq!(sub_flags(a, b, bits), host(bits), "{a:#x} - {b:#x} in {bits} bits");
            }
        }
    }

    #[test]
    fn rep_movsd_copies_and_advances_forward_and_backward() {
        let mut mem = FlatMem((0..0x100u32).map(|i| i as u8).collect());
        let mut cpu = flat_cpu();
        cpu.gpr[gpr::ESI] = 0x10;
        cpu.gpr[gpr::EDI] = 0x80;
        cpu.gpr[gpr::ECX] = 3;
        assert_eq!(execute(&mut cpu, &mut mem, &decode(&[0xF3, 0xA5]), 100), Ok(StringStep::Done));
        assert_eq!(&mem.0[0x80..0x8C], &(0x10u8..0x1C).collect::<Vec<_>>()[..]);
        assert_eq!((cpu.gpr[gpr::ESI], cpu.gpr[gpr::EDI], cpu.gpr[gpr::ECX]), (0x1C, 0x8C, 0));
        // DF set: backwards, one byte at a time.
        cpu.eflags |= flags::DF;
        cpu.gpr[gpr::ESI] = 0x05;
        cpu.gpr[gpr::EDI] = 0x45;
        cpu.gpr[gpr::ECX] = 2;
        assert_eq!(execute(&mut cpu, &mut mem, &decode(&[0xF3, 0xA4]), 100), Ok(StringStep::Done));
        assert_eq!((mem.0[0x45], mem.0[0x44]), (5, 4));
        assert_eq!((cpu.gpr[gpr::ESI], cpu.gpr[gpr::EDI]), (3, 0x43));
    }

    #[test]
    fn a_budget_leaves_the_rest_for_the_next_run() {
        let mut mem = FlatMem(vec![0; 0x100]);
        let mut cpu = flat_cpu();
        cpu.gpr[gpr::EAX] = 0xAB;
        cpu.gpr[gpr::ECX] = 10;
        let stosb = decode(&[0xF3, 0xAA]);
        assert_eq!(execute(&mut cpu, &mut mem, &stosb, 4), Ok(StringStep::More));
        assert_eq!((cpu.gpr[gpr::EDI], cpu.gpr[gpr::ECX]), (4, 6));
        assert_eq!(execute(&mut cpu, &mut mem, &stosb, 100), Ok(StringStep::Done));
        assert_eq!(&mem.0[..11], &[0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0]);
        // REP with ECX = 0 does nothing.
        assert_eq!(execute(&mut cpu, &mut mem, &stosb, 100), Ok(StringStep::Done));
        assert_eq!(cpu.gpr[gpr::EDI], 10);
    }

    #[test]
    fn repe_cmpsb_stops_at_the_first_difference_and_repne_scasb_at_a_match() {
        let mut mem = FlatMem(vec![0; 0x100]);
        mem.0[0x10..0x15].copy_from_slice(b"abcdx");
        mem.0[0x40..0x45].copy_from_slice(b"abcdy");
        let mut cpu = flat_cpu();
        (cpu.gpr[gpr::ESI], cpu.gpr[gpr::EDI], cpu.gpr[gpr::ECX]) = (0x10, 0x40, 8);
        assert_eq!(execute(&mut cpu, &mut mem, &decode(&[0xF3, 0xA6]), 100), Ok(StringStep::Done));
        assert_eq!((cpu.gpr[gpr::ESI], cpu.gpr[gpr::ECX]), (0x15, 3), "stopped after x/y");
        assert_eq!(cpu.eflags & ARITH, sub_flags(u32::from(b'x'), u32::from(b'y'), 8));
        // SCASB for 'c' from 0x10.
        (cpu.gpr[gpr::EAX], cpu.gpr[gpr::EDI], cpu.gpr[gpr::ECX]) = (u32::from(b'c'), 0x10, 8);
        assert_eq!(execute(&mut cpu, &mut mem, &decode(&[0xF2, 0xAE]), 100), Ok(StringStep::Done));
        assert_eq!((cpu.gpr[gpr::EDI], cpu.gpr[gpr::ECX]), (0x13, 5));
        assert_ne!(cpu.eflags & flags::ZF, 0);
    }

    #[test]
    fn lodsw_with_16_bit_addressing_wraps_si_and_keeps_the_upper_halves() {
        let mut mem = FlatMem(vec![0; 0x1_0000]);
        mem.0[0xFFFE] = 0x34;
        mem.0[0xFFFF] = 0x12;
        let mut cpu = flat_cpu();
        cpu.gpr[gpr::ESI] = 0xABCD_FFFE;
        cpu.gpr[gpr::EAX] = 0x5555_0000;
        // a16 o16 lodsw: 67 66 AD.
        assert_eq!(execute(&mut cpu, &mut mem, &decode(&[0x67, 0x66, 0xAD]), 1), Ok(StringStep::Done));
        assert_eq!(cpu.gpr[gpr::EAX], 0x5555_1234);
        assert_eq!(cpu.gpr[gpr::ESI], 0xABCD_0000, "SI wrapped, the upper half kept");
    }

    #[test]
    fn a_fault_keeps_the_iterations_done() {
        let mut mem = FlatMem(vec![0; 0x20]);
        let mut cpu = flat_cpu();
        (cpu.gpr[gpr::EDI], cpu.gpr[gpr::ECX]) = (0x1E, 4);
        let r = execute(&mut cpu, &mut mem, &decode(&[0xF3, 0xAA]), 100);
        assert!(matches!(r, Err(StringError::Fault(f)) if f.vector == crate::cpu::vector::PF));
        assert_eq!((cpu.gpr[gpr::EDI], cpu.gpr[gpr::ECX]), (0x20, 2), "two bytes stored, then #PF");
        assert!(matches!(execute(&mut cpu, &mut mem, &decode(&[0x90]), 1), Err(StringError::NotString(Mnemonic::Nop))));
    }
}
