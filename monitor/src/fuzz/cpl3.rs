//! The CPL-3 differential translator fuzzer (issue 15, item 1), first
//! version: random blocks of unprivileged instructions, encoded with
//! iced-x86, run at CPL 3 by a small multiboot guest, once with guest user
//! code executed directly (`--user-exec direct`) and once translated
//! (`--user-exec translated`). The guest dumps, after each block, the
//! vector that ended it (0x80: the block's closing `int 0x80`; else the
//! exception), the error code, EIP, the defined arithmetic flags, ESP, the
//! general registers and hashes of the data and stack pages, on COM1. The
//! two dumps must be identical.
//!
//! Why through the `popek` binary: one VM per process (the address window
//! is process-global), and the runs must be the ones a user gets. Each fuzz
//! input is one guest of up to [`BLOCKS`] blocks, so a run costs two VM
//! start-ups. The target needs the `popek` executable (the fuzz worker);
//! built elsewhere (unit tests) it says so.
//!
//! Undefined flags: an instruction may leave flags undefined (BT leaves
//! OF, SF, AF and PF so). Hardware keeps some of them unchanged, and the
//! translator may treat them as dead, so a later reader of such a flag
//! can see different values in the two runs, both correct. Rule: a
//! generated instruction that reads a flag left undefined earlier in its
//! block is left out, a jump is inserted only where its condition is
//! defined, and the final EFLAGS are compared only on the flags defined
//! all through the block (per-block masks in the guest).
//!
//! Deliberately left out, each a known difference between direct and
//! translated user code rather than a translator bug: reading segment
//! registers (direct execution shows the host LDT's shadow selectors,
//! docs/translator.md), CPUID and RDTSC (direct execution reaches the host
//! CPU), and anything touching memory outside the data and stack pages.
//!
//! Beyond the first version's instructions ([`plain`]), the generator
//! makes (each idiom one piece, which a Jcc skips whole):
//!
//! - **FS/GS operands** ([`segment_op`], [`segment_string`]). The guest's
//!   GDT has two more DPL-3 data segments, FS based at the data page (limit
//!   0xFFF) and GS at its middle (limit 0x7FF), which the kernel loads
//!   before each block ([`SEGMENTS`]); user code never loads or reads a
//!   segment register. Operands in 32-bit addressing (absolute,
//!   base+disp, base+index*scale+disp, the registers loaded just before
//!   with values whose 32-bit sum wraps to the target) and in 16-bit
//!   addressing (0x67: the eight forms, with no, 8- or 16-bit
//!   displacement, and disp16 alone; random high register halves, sums
//!   that wrap at 64 KiB). String instructions with an FS/GS source:
//!   MOVS, LODS, CMPS (32-bit), LODS with SI and a CX count (16-bit).
//! - **16-bit addressing without an override only in LEA.** DS, ES and
//!   SS are flat (base 0), so a 16-bit effective address through them is
//!   below 64 KiB, never in the data or stack pages, and basing DS or SS
//!   at the data page would move every other operand. 16-bit MOVS, CMPS,
//!   STOS and SCAS (destination ES:DI) are left out for that reason.
//! - **Indirect branches and local calls** ([`branch`]): JMP reg, JMP
//!   [mem] (through EBP, FS or GS) and PUSH imm32 + RET forward to a label
//!   later in the piece, over INT3s that never run; CALL rel32, CALL reg
//!   or CALL [mem] to a short body of first-version arithmetic that ends
//!   in RET (or RET 4 after a PUSH), jumped over after the return. The
//!   addresses are patched in once the piece's place in the block is
//!   known ([`Piece::relocs`]).
//! - **x87 arithmetic** ([`x87`]): FNINIT, a load, one to three
//!   operations with 32/64-bit float and 32-bit integer memory operands
//!   (EBP, FS, GS; 16- or 32-bit addressing), unary ones, FCOMIP (flags),
//!   maybe a translator exit in the middle, a store into the hashed data
//!   page, maybe FNSTSW AX.
//!
//! Every access stays aligned to its size, as in the first version
//! (misaligned accesses with EFLAGS.AC set are not tried yet).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arbitrary::Unstructured;
use dynasmrt::{DynasmApi, DynasmLabelApi};
use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Register, RflagsBits};

use super::Target;
use crate::cpu::descriptor::Descriptor;
use crate::guests::kernel::{
    self as gk, init_pic, interrupt_stubs, kernel_start, x86, Asm, Image, KCODE, LOAD_ADDR, USER_CS, USER_DS,
};

/// Blocks per guest.
pub const BLOCKS: usize = 32;
/// Where block `i` is: one 256-byte slot each, below the runtime area.
pub(super) const BLOCKS_AT: u32 = LOAD_ADDR + 0x6000;
pub(super) const SLOT: u32 = 0x100;
/// The data page the blocks address through EBP (EBP = its middle).
pub(super) const DATA_PAGE: u32 = 0x0014_0000;
pub(super) const USTACK_TOP: u32 = 0x0015_0000;
const KSTACK_TOP: u32 = gk::KSTACK0_TOP;
/// The kernel variable holding the index of the next block's setup.
const NEXT: u32 = gk::VARS;
/// Per block, the EFLAGS bits its dump shows (`MASKS + 4 * i`).
const MASKS: u32 = gk::VARS + 0x100;
/// EFLAGS bits compared: CF PF AF ZF SF DF OF.
pub(super) const FLAGS_MASK: u32 = 0x0CD5;
/// EFLAGS bits the generated POPFDs never set: TF (a #DB after every
/// instruction turns the rest of a block into trap handling). NT and AC,
/// once known VM failures (docs/reliability.md), are set.
pub const KNOWN_BAD_FLAGS: u32 = 0x100;
/// A guest that runs longer is a hang.
pub(super) const RUN_LIMIT: Duration = Duration::from_secs(20);

pub(super) const R32: [Register; 6] =
    [Register::EAX, Register::ECX, Register::EDX, Register::EBX, Register::ESI, Register::EDI];
pub(super) const R16: [Register; 6] =
    [Register::AX, Register::CX, Register::DX, Register::BX, Register::SI, Register::DI];
pub(super) const R8: [Register; 8] =
    [Register::AL, Register::CL, Register::DL, Register::BL, Register::AH, Register::CH, Register::DH, Register::BH];

/// What a target that runs guests needs: the `popek` executable (the fuzz
/// worker) and a scratch directory for the guests, removed when dropped.
pub(super) struct GuestDir {
    pub exe: PathBuf,
    pub dir: PathBuf,
}

impl GuestDir {
    pub(super) fn new(target: &str) -> Result<GuestDir, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        if !exe.file_name().is_some_and(|n| n.to_string_lossy().starts_with("popek")) {
            return Err(format!("needs the popek executable to start guests, not {}", exe.display()));
        }
        static INSTANCE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("popek-fuzz-{target}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        Ok(GuestDir { exe, dir })
    }
}

impl Drop for GuestDir {
    fn drop(&mut self) {
        // POPEK_FUZZ_KEEP keeps the last guest (guest.elf) for a look by hand.
        if std::env::var_os("POPEK_FUZZ_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

struct Cpl3(GuestDir);

pub fn cpl3() -> Result<Box<dyn Target>, String> {
    Ok(Box::new(Cpl3(GuestDir::new("cpl3")?)))
}

/// One generated block: its bytes (closing `int 0x80` included), initial
/// registers (EAX ECX EDX EBX, ESI EDI) and arithmetic flags, and the
/// EFLAGS bits whose final values are compared (those defined all through
/// the block).
#[derive(Clone, Debug)]
pub struct Block {
    pub code: Vec<u8>,
    pub regs: [u32; 6],
    pub flags: u32,
    pub compared: u32,
}

pub(super) fn mem(u: &mut Unstructured<'_>, size_scale: i64) -> arbitrary::Result<MemoryOperand> {
    let disp = i64::from(u.int_in_range(-120i8..=112)?) & !(size_scale - 1);
    Ok(MemoryOperand::with_base_displ(Register::EBP, disp))
}

/// Arm `arm` (0-24) of the first generator: one random unprivileged
/// instruction or a short straight-line idiom. Arms 0-12 leave ESP alone
/// (the bodies of local calls are made of them).
pub(super) fn plain(u: &mut Unstructured<'_>, arm: u8) -> arbitrary::Result<Vec<Instruction>> {
    use Code::*;
    let r32 = |u: &mut Unstructured<'_>| u.choose(&R32).copied();
    let r16 = |u: &mut Unstructured<'_>| u.choose(&R16).copied();
    let r8 = |u: &mut Unstructured<'_>| u.choose(&R8).copied();
    let ok = |i: Result<Instruction, iced_x86::IcedError>| i.map_err(|_| arbitrary::Error::IncorrectFormat);
    let alu32 =
        [Add_rm32_r32, Or_rm32_r32, Adc_rm32_r32, Sbb_rm32_r32, And_rm32_r32, Sub_rm32_r32, Xor_rm32_r32, Cmp_rm32_r32];
    let alu16 =
        [Add_rm16_r16, Or_rm16_r16, Adc_rm16_r16, Sbb_rm16_r16, And_rm16_r16, Sub_rm16_r16, Xor_rm16_r16, Cmp_rm16_r16];
    let alu8 = [Add_rm8_r8, Or_rm8_r8, Adc_rm8_r8, Sbb_rm8_r8, And_rm8_r8, Sub_rm8_r8, Xor_rm8_r8, Cmp_rm8_r8];
    let alu_imm = [
        Add_rm32_imm32,
        Or_rm32_imm32,
        Adc_rm32_imm32,
        Sbb_rm32_imm32,
        And_rm32_imm32,
        Sub_rm32_imm32,
        Xor_rm32_imm32,
        Cmp_rm32_imm32,
    ];
    let unary32 = [Inc_rm32, Dec_rm32, Neg_rm32, Not_rm32, Mul_rm32, Imul_rm32, Div_rm32, Idiv_rm32];
    let shift_imm =
        [Rol_rm32_imm8, Ror_rm32_imm8, Rcl_rm32_imm8, Rcr_rm32_imm8, Shl_rm32_imm8, Shr_rm32_imm8, Sar_rm32_imm8];
    let shift_cl = [Rol_rm32_CL, Ror_rm32_CL, Rcl_rm32_CL, Rcr_rm32_CL, Shl_rm32_CL, Shr_rm32_CL, Sar_rm32_CL];
    let shift16 = [Rol_rm16_imm8, Shl_rm16_imm8, Shr_rm16_imm8, Sar_rm16_imm8, Rcr_rm16_imm8];
    let cmov = [
        Cmovo_r32_rm32,
        Cmovb_r32_rm32,
        Cmove_r32_rm32,
        Cmovbe_r32_rm32,
        Cmovs_r32_rm32,
        Cmovp_r32_rm32,
        Cmovl_r32_rm32,
        Cmovle_r32_rm32,
    ];
    let setcc =
        [Seto_rm8, Setb_rm8, Sete_rm8, Setbe_rm8, Sets_rm8, Setp_rm8, Setl_rm8, Setle_rm8, Setae_rm8, Setne_rm8];
    let flags_ops = [Pushfd, Lahf, Sahf, Clc, Stc, Cmc, Cld, Std];
    let v = match arm {
        0..=2 => vec![ok(Instruction::with2(*u.choose(&alu32)?, r32(u)?, r32(u)?))?],
        3 => vec![ok(Instruction::with2(*u.choose(&alu16)?, r16(u)?, r16(u)?))?],
        4 => vec![ok(Instruction::with2(*u.choose(&alu8)?, r8(u)?, r8(u)?))?],
        5 => vec![ok(Instruction::with2(*u.choose(&alu_imm)?, r32(u)?, u.arbitrary::<u32>()?))?],
        6 => vec![ok(Instruction::with2(*u.choose(&alu32)?, mem(u, 4)?, r32(u)?))?],
        7 => vec![ok(Instruction::with1(*u.choose(&unary32)?, r32(u)?))?],
        8 => vec![ok(Instruction::with2(*u.choose(&shift_imm)?, r32(u)?, u32::from(u.int_in_range(0..=33u8)?)))?],
        9 => vec![ok(Instruction::with2(*u.choose(&shift_cl)?, r32(u)?, Register::CL))?],
        10 => vec![ok(Instruction::with2(*u.choose(&shift16)?, r16(u)?, u32::from(u.int_in_range(0..=17u8)?)))?],
        11 => vec![ok(Instruction::with2(*u.choose(&cmov)?, r32(u)?, r32(u)?))?],
        12 => vec![ok(Instruction::with1(*u.choose(&setcc)?, r8(u)?))?],
        13 if u.ratio(1u8, 3)? => {
            // POPFD of a chosen value, without KNOWN_BAD_FLAGS; ID, AC,
            // RF, IOPL, IF and the rest are set.
            let v = u.arbitrary::<u32>()? & !KNOWN_BAD_FLAGS;
            vec![ok(Instruction::with1(Pushd_imm32, v))?, Instruction::with(Popfd)]
        }
        13 => vec![Instruction::with(*u.choose(&flags_ops)?)],
        14 => {
            // Balanced or not: both runs see the same stack page.
            let r = r32(u)?;
            if u.arbitrary()? {
                vec![ok(Instruction::with1(Push_r32, r))?]
            } else {
                vec![ok(Instruction::with1(Pop_r32, r))?]
            }
        }
        15 => vec![
            ok(Instruction::with2(Mov_r32_rm32, r32(u)?, mem(u, 4)?))?,
            ok(Instruction::with2(Mov_rm32_r32, mem(u, 4)?, r32(u)?))?,
        ],
        16 => vec![
            ok(Instruction::with2(Lea_r32_m, r32(u)?, mem(u, 1)?))?,
            ok(Instruction::with2(Xchg_rm32_r32, r32(u)?, r32(u)?))?,
        ],
        17 => vec![
            ok(Instruction::with2(Movzx_r32_rm8, r32(u)?, r8(u)?))?,
            ok(Instruction::with2(Movsx_r32_rm16, r32(u)?, r16(u)?))?,
        ],
        18 => vec![ok(Instruction::with2(
            *u.choose(&[
                Bt_rm32_r32,
                Bts_rm32_r32,
                Btr_rm32_r32,
                Btc_rm32_r32,
                Bsf_r32_rm32,
                Bsr_r32_rm32,
                Xadd_rm32_r32,
                Cmpxchg_rm32_r32,
            ])?,
            r32(u)?,
            r32(u)?,
        ))?],
        19 => vec![
            ok(Instruction::with3(Imul_r32_rm32_imm32, r32(u)?, r32(u)?, u.arbitrary::<u32>()?))?,
            ok(Instruction::with1(Bswap_r32, r32(u)?))?,
        ],
        20 => {
            // A string instruction, with and without REP, on the data page.
            let esi = DATA_PAGE + 0x400 + 4 * u.int_in_range(0..=64u32)?;
            let edi = DATA_PAGE + 0x800 + 4 * u.int_in_range(0..=64u32)?;
            let ecx = u.int_in_range(0..=16u32)?;
            use iced_x86::RepPrefixKind::{None as NoRep, Repe, Repne};
            let rep = if u.arbitrary()? { Repe } else { NoRep };
            let s = match u.int_in_range(0..=6u8)? {
                0 => Instruction::with_movsb(32, Register::None, rep),
                1 => Instruction::with_movsd(32, Register::None, rep),
                2 => Instruction::with_movsw(32, Register::None, NoRep),
                3 => Instruction::with_stosd(32, rep),
                4 => Instruction::with_lodsd(32, Register::None, NoRep),
                5 => Instruction::with_cmpsb(32, Register::None, if u.arbitrary()? { Repne } else { Repe }),
                _ => Instruction::with_scasb(32, if u.arbitrary()? { Repne } else { NoRep }),
            };
            let s = ok(s)?;
            vec![
                ok(Instruction::with2(Mov_r32_imm32, Register::ESI, esi))?,
                ok(Instruction::with2(Mov_r32_imm32, Register::EDI, edi))?,
                ok(Instruction::with2(Mov_r32_imm32, Register::ECX, ecx))?,
                s,
            ]
        }
        22 => vec![
            // x87 and SSE moves through memory and registers.
            ok(Instruction::with1(Fld_m32fp, mem(u, 4)?))?,
            ok(Instruction::with1(Fstp_m64fp, mem(u, 8)?))?,
            ok(Instruction::with2(Movd_xmm_rm32, Register::XMM0, r32(u)?))?,
            ok(Instruction::with2(Movd_rm32_xmm, r32(u)?, Register::XMM0))?,
        ],
        23 => vec![
            ok(Instruction::with2(Movdqu_xmm_xmmm128, Register::XMM1, mem(u, 16)?))?,
            ok(Instruction::with2(Movdqu_xmmm128_xmm, mem(u, 16)?, Register::XMM1))?,
        ],
        // Sensitive at CPL 3 with IOPL 0: #GP in both runs.
        _ => vec![Instruction::with(*u.choose(&[Cli, Sti, Hlt])?)],
    };
    Ok(v)
}

/// A generated piece before encoding: instructions in layout order and
/// the branches and addresses inside it, by label.
#[derive(Default)]
pub(super) struct Idiom {
    insns: Vec<Instruction>,
    /// (instruction, label): a relative branch to the label.
    near: Vec<(usize, usize)>,
    /// (instruction, label): the instruction's last four bytes (its imm32)
    /// become the label's address in the block.
    abs: Vec<(usize, usize)>,
    /// Per label, the index of the instruction it stands before.
    labels: Vec<usize>,
    /// Which generator made it, for `--verbose-outcomes` (None: the first).
    kind: Option<&'static str>,
}

impl From<Vec<Instruction>> for Idiom {
    fn from(insns: Vec<Instruction>) -> Idiom {
        Idiom { insns, ..Idiom::default() }
    }
}

impl Idiom {
    pub(super) fn push(&mut self, i: Instruction) -> usize {
        self.insns.push(i);
        self.insns.len() - 1
    }

    pub(super) fn extend(&mut self, is: impl IntoIterator<Item = Instruction>) {
        self.insns.extend(is);
    }

    pub(super) fn kind(self, kind: &'static str) -> Idiom {
        Idiom { kind: Some(kind), ..self }
    }

    /// Whether an instruction uses 16-bit addressing.
    fn a16(&self) -> bool {
        self.insns.iter().any(|i| {
            (0..i.op_count()).any(|k| i.op_kind(k) == iced_x86::OpKind::Memory)
                && (i.memory_base().size() == 2
                    || i.memory_index().size() == 2
                    || (i.memory_base() == Register::None && i.memory_displ_size() == 2))
        })
    }

    pub(super) fn label(&mut self) -> usize {
        self.labels.push(usize::MAX);
        self.labels.len() - 1
    }

    pub(super) fn bind(&mut self, l: usize) {
        self.labels[l] = self.insns.len();
    }

    /// `i`, a branch with a rel8/rel32, to label `l`.
    pub(super) fn branch_to(&mut self, i: Instruction, l: usize) {
        let n = self.push(i);
        self.near.push((n, l));
    }

    /// `i`, whose imm32 (its last four bytes) becomes the address of `l`.
    pub(super) fn address_of(&mut self, i: Instruction, l: usize) {
        let n = self.push(i);
        self.abs.push((n, l));
    }
}

/// An encoded piece: position independent but for `relocs`, (offset of an
/// imm32, offset of the piece byte whose guest address it must hold).
struct Piece {
    bytes: Vec<u8>,
    relocs: Vec<(usize, usize)>,
}

/// Encodes an idiom at offset 0: a first pass for the lengths (the branch
/// and immediate forms used have fixed lengths), a second with the labels'
/// offsets. `None` when iced refuses an instruction or a rel8 is too short.
fn assemble(d: &Idiom) -> Option<Piece> {
    let encode = |i: &Instruction, ip: u64| {
        let mut e = Encoder::new(32);
        e.encode(i, ip).ok()?;
        Some(e.take_buffer())
    };
    let mut at = Vec::with_capacity(d.insns.len() + 1);
    let mut off = 0u64;
    for (n, i) in d.insns.iter().enumerate() {
        let mut i = *i;
        if d.near.iter().any(|&(b, _)| b == n) {
            i.set_near_branch32(off as u32);
        }
        at.push(off);
        off += encode(&i, off)?.len() as u64;
    }
    at.push(off);
    let label = |l: usize| d.labels.get(l).and_then(|&n| at.get(n)).copied();
    let mut bytes = Vec::new();
    let mut relocs = Vec::new();
    for (n, i) in d.insns.iter().enumerate() {
        let mut i = *i;
        if let Some(&(_, l)) = d.near.iter().find(|&&(b, _)| b == n) {
            i.set_near_branch32(label(l)? as u32);
        }
        let b = encode(&i, at[n])?;
        if bytes.len() as u64 != at[n] || at[n] + b.len() as u64 != at[n + 1] {
            return None;
        }
        if let Some(&(_, l)) = d.abs.iter().find(|&&(b, _)| b == n) {
            relocs.push((at[n + 1] as usize - 4, label(l)? as usize));
        }
        bytes.extend_from_slice(&b);
    }
    Some(Piece { bytes, relocs })
}

/// One random unprivileged instruction or idiom.
fn instruction(u: &mut Unstructured<'_>) -> arbitrary::Result<Idiom> {
    let arm = u.int_in_range(0..=31u8)?;
    instruction_arm(u, arm)
}

/// Arm `arm` (0-31) of [`instruction`]: 0-24 [`plain`] (21 a CALL to the
/// next instruction and POP; 24 CLI/STI/HLT), 25-31 the second generator's
/// pieces. The cpl0 target picks its arms itself (no HLT at CPL 0).
pub(super) fn instruction_arm(u: &mut Unstructured<'_>, arm: u8) -> arbitrary::Result<Idiom> {
    use Code::*;
    match arm {
        21 => {
            // CALL to the next instruction and POP: the guest's return
            // address must be on the stack, never a TC address.
            let mut d = Idiom::default();
            let next = d.label();
            d.branch_to(
                Instruction::with_branch(Call_rel32_32, 0).map_err(|_| arbitrary::Error::IncorrectFormat)?,
                next,
            );
            d.bind(next);
            d.push(Instruction::with1(Pop_r32, *u.choose(&R32)?).map_err(|_| arbitrary::Error::IncorrectFormat)?);
            Ok(d)
        }
        a @ 0..=24 => plain(u, a).map(Idiom::from),
        25 | 26 => segment_op(u).map(|d| d.kind("cpl3 piece: FS/GS operand or 16-bit LEA")),
        27 => segment_string(u).map(|d| d.kind("cpl3 piece: FS/GS string instruction")),
        28 | 29 => branch(u).map(|d| d.kind("cpl3 piece: indirect branch or local call")),
        _ => x87(u).map(|d| d.kind("cpl3 piece: x87 arithmetic")),
    }
}

pub(super) fn ok(i: Result<Instruction, iced_x86::IcedError>) -> arbitrary::Result<Instruction> {
    i.map_err(|_| arbitrary::Error::IncorrectFormat)
}

pub(super) fn mov_imm(r: Register, v: u32) -> arbitrary::Result<Instruction> {
    ok(Instruction::with2(Code::Mov_r32_imm32, r, v))
}

/// The segments whose bases are in the data page: (override, offset of
/// the base in the data page, byte-granular limit). GDT entries 6 and 7,
/// DPL 3, loaded into FS and GS by the kernel before each block (user code
/// never loads or reads a segment register).
pub(super) const SEGMENTS: [(Register, u32, u32); 2] = [(Register::FS, 0, 0xFFF), (Register::GS, 0x800, 0x7FF)];
pub(super) const FS_SEL: u16 = 0x33;
pub(super) const GS_SEL: u16 = 0x3B;
/// EBP in every block: the data page's middle (`mem` addresses through it).
pub(super) const EBP_VALUE: u32 = DATA_PAGE + 0x800;

/// A memory operand inside the data page and the register loads (to be
/// put just before it) that place it there; `restore` puts EBP back when
/// the operand used it.
struct Operand {
    setup: Vec<Instruction>,
    mem: MemoryOperand,
    restore: Vec<Instruction>,
}

/// An FS- or GS-relative operand of `size` (at most 16) bytes, aligned to
/// its size, in 32-bit (absolute, base+disp, base+index*scale+disp) or
/// 16-bit addressing (the eight forms and disp16): the base and index
/// registers get random high halves (16-bit) or values whose 32-bit sum
/// wraps (32-bit), and the effective address lands in the segment. EBP or
/// BP is used only when `bp` (it must be restored after the operand);
/// `a16` forces one addressing size.
fn seg_operand(u: &mut Unstructured<'_>, size: u32, bp: bool, a16: Option<bool>) -> arbitrary::Result<Operand> {
    use Register::*;
    let &(seg, _, limit) = u.choose(&SEGMENTS)?;
    let align = size.next_power_of_two().min(16);
    let t = u.int_in_range(0..=limit + 1 - 16)? & !(align - 1);
    let mut setup = Vec::new();
    let mut used_bp = false;
    let mem = if a16.map_or(u.arbitrary()?, |a| a) {
        // 16-bit addressing: EA = (base + index + disp) mod 2^16.
        let base = *u.choose(if bp { &[BX, BP, None][..] } else { &[BX, None][..] })?;
        let index = *u.choose(&[SI, DI, None])?;
        // [si] and [di] alone: iced takes SI and DI as bases then.
        let (base, index) = if base == None { (index, None) } else { (base, index) };
        let regs: Vec<Register> = [base, index].into_iter().filter(|&r| r != None).collect();
        let displ_size = if regs.is_empty() { 2 } else { *u.choose(&[0u32, 1, 2])? };
        let disp = match displ_size {
            _ if regs.is_empty() => i64::from(t),
            0 => 0,
            1 => i64::from(u.arbitrary::<i8>()?),
            _ => i64::from(u.arbitrary::<u16>()?),
        };
        let mut rest = (i64::from(t) - disp) as u16;
        for (k, &r) in regs.iter().enumerate() {
            let low = if k + 1 == regs.len() { rest } else { u.arbitrary::<u16>()? };
            rest = rest.wrapping_sub(low);
            setup.push(mov_imm(r.full_register32(), (u32::from(u.arbitrary::<u16>()?) << 16) | u32::from(low))?);
            used_bp |= r == BP;
        }
        MemoryOperand::new(base, index, 1, disp, displ_size, false, seg)
    } else {
        let regs: &[Register] = if bp { &[EAX, ECX, EDX, EBX, ESI, EDI, EBP] } else { &R32 };
        match u.int_in_range(0..=2u8)? {
            0 => MemoryOperand::new(None, None, 1, i64::from(t), 4, false, seg),
            form => {
                let base = *u.choose(regs)?;
                let (disp, displ_size) = if u.arbitrary()? {
                    (i64::from(u.arbitrary::<i8>()?), 1)
                } else {
                    (i64::from(u.arbitrary::<i32>()?), 4)
                };
                let mut b = t.wrapping_sub(disp as u32);
                let (index, scale) = if form == 2 {
                    let others: Vec<Register> = regs.iter().copied().filter(|&r| r != base).collect();
                    let index = *u.choose(&others)?;
                    let (scale, v) = (*u.choose(&[1u32, 2, 4, 8])?, u.arbitrary::<u32>()?);
                    b = b.wrapping_sub(v.wrapping_mul(scale));
                    setup.push(mov_imm(index, v)?);
                    used_bp |= index == EBP;
                    (index, scale)
                } else {
                    (None, 1)
                };
                setup.push(mov_imm(base, b)?);
                used_bp |= base == EBP;
                MemoryOperand::new(base, index, scale, disp, displ_size, false, seg)
            }
        }
    };
    let restore = if used_bp { vec![mov_imm(EBP, EBP_VALUE)?] } else { Vec::new() };
    Ok(Operand { setup, mem, restore })
}

/// Either an EBP-relative operand (no setup) or a segment one.
fn any_operand(u: &mut Unstructured<'_>, size: u32, bp: bool) -> arbitrary::Result<Operand> {
    if u.arbitrary()? {
        let scale = i64::from(size.next_power_of_two().min(16));
        Ok(Operand { setup: Vec::new(), mem: mem(u, scale)?, restore: Vec::new() })
    } else {
        seg_operand(u, size, bp, None)
    }
}

/// An operation on an FS/GS operand (32- or 16-bit addressing), or a
/// 16-bit-addressing LEA (its EA computed, no access).
fn segment_op(u: &mut Unstructured<'_>) -> arbitrary::Result<Idiom> {
    use Code::*;
    /// Operand shapes: memory and register, register and memory, memory
    /// alone, memory and imm8.
    #[derive(Clone, Copy)]
    enum S {
        MR,
        RM,
        M,
        MI,
    }
    const OPS: [(Code, u32, S); 26] = [
        (Mov_r32_rm32, 4, S::RM),
        (Mov_rm32_r32, 4, S::MR),
        (Mov_r16_rm16, 2, S::RM),
        (Mov_rm8_r8, 1, S::MR),
        (Add_rm32_r32, 4, S::MR),
        (Adc_rm32_r32, 4, S::MR),
        (Sub_r32_rm32, 4, S::RM),
        (Sbb_rm16_r16, 2, S::MR),
        (Xor_rm8_r8, 1, S::MR),
        (And_r32_rm32, 4, S::RM),
        (Or_rm32_r32, 4, S::MR),
        (Cmp_rm32_r32, 4, S::MR),
        (Test_rm32_r32, 4, S::MR),
        (Movzx_r32_rm16, 2, S::RM),
        (Movsx_r32_rm8, 1, S::RM),
        (Inc_rm32, 4, S::M),
        (Neg_rm16, 2, S::M),
        (Not_rm8, 1, S::M),
        (Mul_rm32, 4, S::M),
        (Shl_rm32_imm8, 4, S::MI),
        (Rcr_rm16_imm8, 2, S::MI),
        (Bts_rm32_imm8, 4, S::MI),
        (Xadd_rm32_r32, 4, S::MR),
        (Cmpxchg_rm32_r32, 4, S::MR),
        (Sete_rm8, 1, S::M),
        (Imul_r32_rm32, 4, S::RM),
    ];
    let mut d = Idiom::default();
    if u.ratio(1u8, 8)? {
        let mut o = seg_operand(u, 1, true, Some(true))?;
        o.mem.segment_prefix = Register::None;
        d.extend(o.setup);
        let lea = if u.arbitrary()? {
            ok(Instruction::with2(Lea_r32_m, *u.choose(&R32)?, o.mem))?
        } else {
            ok(Instruction::with2(Lea_r16_m, *u.choose(&R16)?, o.mem))?
        };
        d.push(lea);
        d.extend(o.restore);
        return Ok(d);
    }
    let &(code, size, shape) = u.choose(&OPS)?;
    let o = seg_operand(u, size, true, None)?;
    let r = match size {
        4 => *u.choose(&R32)?,
        2 => *u.choose(&R16)?,
        _ => *u.choose(&R8)?,
    };
    let i = match shape {
        S::MR => Instruction::with2(code, o.mem, r),
        S::RM => Instruction::with2(code, r, o.mem),
        S::M => Instruction::with1(code, o.mem),
        S::MI => Instruction::with2(code, o.mem, u32::from(u.int_in_range(0..=33u8)?)),
    };
    d.extend(o.setup);
    d.push(ok(i)?);
    d.extend(o.restore);
    Ok(d)
}

/// A string instruction whose source is FS- or GS-relative: 32-bit
/// addressing (MOVS, LODS, CMPS, with REP) or 16-bit (LODS with SI and a
/// CX count: the destination of a 16-bit MOVS or CMPS, ES:DI, cannot be
/// in the data page with a flat ES). Counts up to 16, so the source stays
/// in its segment whatever DF is.
fn segment_string(u: &mut Unstructured<'_>) -> arbitrary::Result<Idiom> {
    use iced_x86::RepPrefixKind::{None as NoRep, Repe, Repne};
    let &(seg, _, limit) = u.choose(&SEGMENTS)?;
    let src = u.int_in_range(0x80..=limit + 1 - 0x80)? & !3;
    let count = u.int_in_range(0..=16u32)?;
    let rep = if u.arbitrary()? { Repe } else { NoRep };
    let mut d = Idiom::default();
    if u.arbitrary()? {
        // 16-bit: only SI and CX count; their high halves are random.
        d.push(mov_imm(Register::ESI, u32::from(u.arbitrary::<u16>()?) << 16 | src)?);
        d.push(mov_imm(Register::ECX, u32::from(u.arbitrary::<u16>()?) << 16 | count)?);
        let s =
            if u.arbitrary()? { Instruction::with_lodsd(16, seg, rep) } else { Instruction::with_lodsb(16, seg, rep) };
        d.push(ok(s)?);
    } else {
        let edi = DATA_PAGE + 0x800 + 4 * u.int_in_range(0..=64u32)?;
        d.push(mov_imm(Register::ESI, src)?);
        d.push(mov_imm(Register::EDI, edi)?);
        d.push(mov_imm(Register::ECX, count)?);
        let s = match u.int_in_range(0..=3u8)? {
            0 => Instruction::with_movsb(32, seg, rep),
            1 => Instruction::with_movsd(32, seg, rep),
            2 => Instruction::with_lodsd(32, seg, NoRep),
            _ => Instruction::with_cmpsb(32, seg, if u.arbitrary()? { Repne } else { Repe }),
        };
        d.push(ok(s)?);
    }
    Ok(d)
}

/// Puts `target`'s address where an indirect branch `code` (Jmp_rm32 or
/// Call_rm32) takes it: a register loaded just before, or memory (through
/// EBP, FS or GS) written just before. The branch ends the idiom so far.
fn indirect(u: &mut Unstructured<'_>, d: &mut Idiom, code: Code, target: usize) -> arbitrary::Result<()> {
    if u.arbitrary()? {
        let r = *u.choose(&R32)?;
        d.address_of(mov_imm(r, 0)?, target);
        d.push(ok(Instruction::with1(code, r))?);
    } else {
        // No EBP: a local call's body addresses through it.
        let o = any_operand(u, 4, false)?;
        d.extend(o.setup);
        d.address_of(ok(Instruction::with2(Code::Mov_rm32_imm32, o.mem, 0u32))?, target);
        d.push(ok(Instruction::with1(code, o.mem))?);
    }
    Ok(())
}

/// Control flow inside the block: an indirect JMP (register, memory, or
/// PUSH imm32 + RET) forward over never-run INT3s, or a short local call
/// (CALL rel32, register or memory) to a body of arms 0-12 that returns
/// with RET or RET 4 (after a PUSH that it pops), jumped over afterwards.
/// Branches, calls and returns leave the arithmetic flags alone, so the
/// flag state [`block`] follows in layout order is the executed one.
fn branch(u: &mut Unstructured<'_>) -> arbitrary::Result<Idiom> {
    use Code::*;
    let mut d = Idiom::default();
    if u.arbitrary()? {
        let over = d.label();
        match u.int_in_range(0..=2u8)? {
            0 => indirect(u, &mut d, Jmp_rm32, over)?,
            1 => {
                d.address_of(ok(Instruction::with1(Pushd_imm32, 0u32))?, over);
                d.push(Instruction::with(Retnd));
            }
            _ => {
                let o = any_operand(u, 4, false)?;
                d.extend(o.setup);
                d.address_of(ok(Instruction::with2(Mov_rm32_imm32, o.mem, 0u32))?, over);
                d.push(ok(Instruction::with1(Jmp_rm32, o.mem))?);
            }
        }
        for _ in 0..u.int_in_range(1..=3u8)? {
            d.push(Instruction::with(Int3));
        }
        d.bind(over);
    } else {
        let (sub, after) = (d.label(), d.label());
        let ret4 = u.arbitrary()?;
        if ret4 {
            d.push(ok(Instruction::with1(Push_r32, *u.choose(&R32)?))?);
        }
        match u.int_in_range(0..=2u8)? {
            0 => d.branch_to(ok(Instruction::with_branch(Call_rel32_32, 0))?, sub),
            _ => indirect(u, &mut d, Call_rm32, sub)?,
        }
        d.branch_to(ok(Instruction::with_branch(Jmp_rel8_32, 0))?, after);
        d.bind(sub);
        for _ in 0..u.int_in_range(1..=2u8)? {
            let arm = u.int_in_range(0..=12u8)?;
            d.extend(plain(u, arm)?);
        }
        d.push(if ret4 { ok(Instruction::with1(Retnd_imm16, 4u32))? } else { Instruction::with(Retnd) });
        d.bind(after);
    }
    Ok(d)
}

/// x87 arithmetic on the data page, from FNINIT (a defined state: empty
/// stack, all exceptions masked) to an empty stack again: a load (memory
/// or constant), one to three operations (memory operands in 32/64-bit
/// float and 32-bit integer, through EBP, FS or GS; unary ones; a second
/// load with an arithmetic pop or FCOMIP, which sets ZF, PF and CF), maybe
/// a translator exit (PUSH + RET to the next instruction) in between, a
/// store, maybe FNSTSW AX. The stores land in the hashed data page.
fn x87(u: &mut Unstructured<'_>) -> arbitrary::Result<Idiom> {
    use Code::*;
    const MEM_OPS: [(Code, u32); 12] = [
        (Fadd_m32fp, 4),
        (Fsub_m32fp, 4),
        (Fmul_m32fp, 4),
        (Fdivr_m32fp, 4),
        (Fadd_m64fp, 8),
        (Fsubr_m64fp, 8),
        (Fmul_m64fp, 8),
        (Fdiv_m64fp, 8),
        (Fiadd_m32int, 4),
        (Fimul_m32int, 4),
        (Fisub_m32int, 4),
        (Fidiv_m32int, 4),
    ];
    const LOADS: [(Code, u32); 4] = [(Fld_m32fp, 4), (Fld_m64fp, 8), (Fild_m32int, 4), (Fld_m80fp, 10)];
    const STORES: [(Code, u32); 4] = [(Fstp_m64fp, 8), (Fstp_m32fp, 4), (Fistp_m32int, 4), (Fstp_m80fp, 10)];
    let mut d = Idiom::default();
    let with_mem = |u: &mut Unstructured<'_>, d: &mut Idiom, code: Code, size: u32| -> arbitrary::Result<()> {
        let o = any_operand(u, size, true)?;
        d.extend(o.setup);
        d.push(ok(Instruction::with1(code, o.mem))?);
        d.extend(o.restore);
        Ok(())
    };
    d.push(Instruction::with(Fninit));
    match u.int_in_range(0..=5u8)? {
        0 => {
            d.push(Instruction::with(*u.choose(&[Fld1, Fldpi, Fldl2e, Fldz])?));
        }
        _ => {
            let &(code, size) = u.choose(&LOADS)?;
            with_mem(u, &mut d, code, size)?;
        }
    }
    for _ in 0..u.int_in_range(1..=3u8)? {
        match u.int_in_range(0..=5u8)? {
            0 => {
                d.push(Instruction::with(*u.choose(&[Fsqrt, Fchs, Fabs, Frndint])?));
            }
            1 => {
                let &(code, size) = u.choose(&LOADS[..3])?;
                with_mem(u, &mut d, code, size)?;
                let op = *u.choose(&[Faddp_sti_st0, Fmulp_sti_st0, Fsubp_sti_st0, Fdivp_sti_st0, Fcomip_st0_sti])?;
                let i = if op == Fcomip_st0_sti {
                    Instruction::with2(op, Register::ST0, Register::ST1)
                } else {
                    Instruction::with2(op, Register::ST1, Register::ST0)
                };
                d.push(ok(i)?);
            }
            2 => {
                let next = d.label();
                d.address_of(ok(Instruction::with1(Pushd_imm32, 0u32))?, next);
                d.push(Instruction::with(Retnd));
                d.bind(next);
            }
            _ => {
                let &(code, size) = u.choose(&MEM_OPS)?;
                with_mem(u, &mut d, code, size)?;
            }
        }
    }
    let &(code, size) = u.choose(&STORES)?;
    with_mem(u, &mut d, code, size)?;
    if u.arbitrary()? {
        d.push(ok(Instruction::with1(Fnstsw_AX, Register::AX))?);
    }
    Ok(d)
}

/// A random block at `ip`, closed by `int 0x80`; forward conditional jumps
/// within the block are inserted between instructions.
pub fn block(u: &mut Unstructured<'_>, ip: u32) -> arbitrary::Result<Block> {
    block_with(u, ip, "cpl3", instruction)
}

/// [`block`] with pieces from `gen` (the cpl0 target's generator); `tag`
/// prefixes the outcome notes.
pub(super) fn block_with(
    u: &mut Unstructured<'_>,
    ip: u32,
    tag: &str,
    mut gen: impl FnMut(&mut Unstructured<'_>) -> arbitrary::Result<Idiom>,
) -> arbitrary::Result<Block> {
    // Which arithmetic flags are defined before each piece (iced-x86's
    // flag info): all at entry (IRET loads them), then what instructions
    // write, minus what they leave undefined. A piece that reads an
    // undefined flag is left out (the rule in the module doc).
    let mut pieces: Vec<Piece> = Vec::new();
    let mut states = Vec::new();
    let mut defined = ARITH;
    let mut len = 0usize;
    // An idiom (a string instruction and its setup, a local call, ...) is
    // one piece: a jump skips all of it or none, never its setup alone.
    // Its flags are followed in layout order, which is the order they
    // are written and read in (the idioms' branches touch no flag, the
    // INT3s they skip touch none of these).
    'outer: for _ in 0..u.int_in_range(1..=12u8)? {
        let idiom = gen(u)?;
        let mut st = defined;
        for i in &idiom.insns {
            if i.rflags_read() & ARITH & !st != 0 {
                super::note(&format!("{tag}: left out, reads undefined flags"));
                continue 'outer;
            }
            st = (st | i.rflags_modified()) & !i.rflags_undefined();
        }
        let Some(piece) = assemble(&idiom) else { continue 'outer };
        if len + piece.bytes.len() + 8 + CLOSE.len() > (SLOT as usize) - 4 {
            break;
        }
        len += piece.bytes.len();
        if let Some(k) = idiom.kind {
            super::note(k);
        }
        if idiom.a16() {
            super::note("cpl3 piece: 16-bit addressing");
        }
        pieces.push(piece);
        states.push(defined);
        defined = st;
    }
    states.push(defined);
    // Forward jumps over the next few pieces (a Jcc rel8 is position
    // independent). No jump inside the range another one skips (its length
    // would be missing from that jump's displacement); a jump only where
    // its condition's flags are defined, and only over pieces after which
    // no flag is defined that was not before (so the flag states above hold
    // on both paths).
    let mut code = Vec::new();
    let mut i = 0;
    let mut free_from = 0;
    while i < pieces.len() {
        if i >= free_from
            && u.ratio(1u8, 6)?
            && code.len() + 2 + pieces[i..].iter().map(|p| p.bytes.len()).sum::<usize>() + CLOSE.len()
                < SLOT as usize - 4
        {
            let k = u.int_in_range(1..=3usize)?.min(pieces.len() - i);
            let skip: usize = pieces[i..i + k].iter().map(|p| p.bytes.len()).sum();
            let cc = u.int_in_range(0..=15u8)?;
            if skip < 120 && condition_flags(cc) & !states[i] == 0 && states[i + k] & !states[i] == 0 {
                code.extend_from_slice(&[0x70 + cc, skip as u8]);
                free_from = i + k;
            }
        }
        let at = code.len();
        code.extend_from_slice(&pieces[i].bytes);
        for &(imm, target) in &pieces[i].relocs {
            code[at + imm..at + imm + 4].copy_from_slice(&(ip + (at + target) as u32).to_le_bytes());
        }
        i += 1;
    }
    // The closing INT 0x80 runs with EAX = 0 (EAX is kept in the data
    // page, which is hashed): direct execution makes it a host system call
    // trapped by seccomp, and Linux rewinds or rewrites it when EAX looks
    // like a restart code (docs/reliability.md, "Found by cpl3").
    code.extend_from_slice(&CLOSE);
    let mut regs = [0u32; 6];
    for r in &mut regs {
        *r = match u.int_in_range(0..=3u8)? {
            0 => 0,
            1 => u32::MAX,
            2 => DATA_PAGE + 0x800,
            _ => u.arbitrary()?,
        };
    }
    // Compared: the flags defined everywhere in the block (an exception
    // may stop it anywhere), and DF.
    let everywhere = states.iter().fold(ARITH, |a, s| a & s);
    Ok(Block { code, regs, flags: u.arbitrary::<u32>()? & FLAGS_MASK, compared: eflags_bits(everywhere) | DF })
}

/// `mov [ebp+0x7c], eax ; mov eax, 0 ; int 0x80`: how every block ends.
pub const CLOSE: [u8; 10] = [0x89, 0x45, 0x7C, 0xB8, 0, 0, 0, 0, 0xCD, 0x80];

/// iced-x86's arithmetic flag bits.
pub(super) const ARITH: u32 =
    RflagsBits::OF | RflagsBits::SF | RflagsBits::ZF | RflagsBits::AF | RflagsBits::CF | RflagsBits::PF;
/// EFLAGS.DF.
pub(super) const DF: u32 = 1 << 10;

/// The flags Jcc condition `cc` (the low nibble of 0x70+cc) reads.
fn condition_flags(cc: u8) -> u32 {
    use RflagsBits as F;
    match cc >> 1 {
        0 => F::OF,
        1 => F::CF,
        2 => F::ZF,
        3 => F::CF | F::ZF,
        4 => F::SF,
        5 => F::PF,
        6 => F::SF | F::OF,
        _ => F::ZF | F::SF | F::OF,
    }
}

/// iced-x86 flag bits as EFLAGS bits.
pub(super) fn eflags_bits(f: u32) -> u32 {
    use RflagsBits as F;
    [(F::CF, 0), (F::PF, 2), (F::AF, 4), (F::ZF, 6), (F::SF, 7), (F::OF, 11)]
        .iter()
        .filter(|(b, _)| f & b != 0)
        .fold(0, |a, (_, bit)| a | 1 << bit)
}

/// The guest: kernel at [`KCODE`], blocks in their slots; returns the
/// multiboot ELF.
pub fn guest(blocks: &[Block]) -> Vec<u8> {
    let img = guest_image(blocks, FLAGS_MASK);
    guest_runs(img, blocks, |i| BLOCKS_AT + SLOT * i as u32, |_| {}, |_, _| {})
}

/// The guest of [`guest`] for runs that are not one per slot: run `i`
/// enters `blocks[i]` at `entry(i)` (`img` holds the code where that
/// address leads); `prologue` runs once before the first run (paging set
/// up, say) and `before(k, i)` before each run's entry (its address space).
pub(super) fn guest_runs(
    mut img: Image,
    blocks: &[Block],
    entry: impl Fn(usize) -> u32,
    prologue: impl FnOnce(&mut Asm),
    before: impl Fn(&mut Asm, usize),
) -> Vec<u8> {
    let mut k = Asm::new(KCODE);
    let (start, r) = kernel_start(&mut k);
    init_pic(&mut k, false);
    let (tss_esp0, ktop) = ((gk::TSS + 4) as i32, KSTACK_TOP as i32);
    x86!(k; mov DWORD [tss_esp0], ktop);
    prologue(&mut k);
    let setups: Vec<_> = (0..=blocks.len()).map(|_| k.label()).collect();
    let common = k.label();
    let next = NEXT as i32;
    x86!(k; jmp =>setups[0]);
    for (i, b) in blocks.iter().enumerate() {
        k.bind(setups[i]);
        let (uds, ustack) = (i32::from(USER_DS), USTACK_TOP as i32);
        let (flags, ucs, at) = ((0x202 | b.flags) as i32, i32::from(USER_CS), entry(i) as i32);
        let following = i as i32 + 1;
        // NEXT = the index of the setup the handler goes on with.
        x86!(k; mov esp, ktop ; mov DWORD [next], following);
        fill_pages(&mut k, i);
        before(&mut k, i);
        x86!(k; mov eax, uds);
        k.load_data_segs_ax();
        load_fs_gs(&mut k);
        x86!(k;
            push uds
            ; push ustack
            ; push flags
            ; push ucs
            ; push at
        );
        enter_block(&mut k, b);
    }
    k.bind(setups[blocks.len()]);
    let exit = r.exit;
    x86!(k; mov al, 0x31 ; call =>exit);

    // Vectors 0-31 (DPL 0) and 0x80 (DPL 3) dump the state.
    interrupt_stubs(&mut k, &mut img, (0u8..32).chain([0x80]), common, 0x80);
    let (putc, hex) = (r.putc, r.print_hex);
    k.bind(common);
    x86!(k; pushad ; cld ; mov al, 0x42 ; call =>putc);
    // pushad: EDI ESI EBP ESP' EBX EDX ECX EAX, then vector, error, EIP, CS, EFLAGS, ESP, SS.
    // The block's index is NEXT - 1.
    let masks = (MASKS - 4) as i32;
    for off in [32, 36, 40, 48, 52, 28, 24, 20, 16, 8, 4, 0] {
        x86!(k; mov al, 0x20 ; call =>putc ; mov eax, [esp + off]);
        if off == 48 {
            x86!(k; mov ebx, DWORD [next] ; and eax, [ebx * 4 + masks]);
        }
        x86!(k; call =>hex);
    }
    finish_guest(k, img, &r, &setups, start)
}

/// The image both fuzz guests start from: the descriptor tables, FS and GS
/// ([`put_segments`]), each block in its slot and its mask of compared
/// EFLAGS bits (`& mask`) in the masks table.
pub(super) fn guest_image(blocks: &[Block], mask: u32) -> Image {
    guest_image_at(blocks, mask, |i| BLOCKS_AT + SLOT * i as u32)
}

/// [`guest_image`] with block `i`'s bytes at guest-physical `at(i)` (in the
/// two block pages).
pub(super) fn guest_image_at(blocks: &[Block], mask: u32, at: impl Fn(usize) -> u32) -> Image {
    let mut img = Image::new();
    img.bytes.resize((BLOCKS_AT + SLOT * BLOCKS as u32 - LOAD_ADDR) as usize, 0);
    img.tables();
    put_segments(&mut img);
    for (i, b) in blocks.iter().enumerate() {
        img.put(at(i), &b.code);
        img.put_u32(MASKS + 4 * i as u32, b.compared & mask);
    }
    img
}

/// FS and GS as every block starts with them ([`SEGMENTS`]; clobbers EAX).
pub(super) fn load_fs_gs(k: &mut Asm) {
    let (fs_sel, gs_sel) = (i32::from(FS_SEL), i32::from(GS_SEL));
    x86!(k; mov eax, fs_sel);
    k.raw(&[0x8E, 0xE0]); // mov fs, ax
    x86!(k; mov eax, gs_sel);
    k.raw(&[0x8E, 0xE8]); // mov gs, ax
}

/// Loads block `b`'s registers (and EBP's fixed value) and IRETs to it
/// through the frame already pushed.
pub(super) fn enter_block(k: &mut Asm, b: &Block) {
    let [v0, v1, v2, v3, v4, v5] = b.regs.map(|v| v as i32);
    let base = EBP_VALUE as i32;
    x86!(k;
        mov eax, v0
        ; mov ecx, v1
        ; mov edx, v2
        ; mov ebx, v3
        ; mov esi, v4
        ; mov edi, v5
        ; mov ebp, base
    );
    k.iretd();
}

/// The end of a dump handler and of the guest: the page hashes, then on to
/// the setup of block NEXT (or exit); the kernel placed in `img`, which
/// becomes the multiboot ELF.
pub(super) fn finish_guest(
    mut k: Asm,
    mut img: Image,
    r: &gk::Routines,
    setups: &[dynasmrt::DynamicLabel],
    entry: u32,
) -> Vec<u8> {
    let (putc, exit, next) = (r.putc, r.exit, NEXT as i32);
    hash_pages(&mut k, r);
    x86!(k; mov al, 0x0A ; call =>putc ; mov eax, DWORD [next]);
    for (j, &l) in setups.iter().enumerate() {
        let j = j as i32;
        x86!(k; cmp eax, j ; je =>l);
    }
    x86!(k; mov al, 0x32 ; call =>exit);
    let code = k.finish();
    assert!(code.len() <= gk::KCODE_MAX as usize, "fuzz kernel too long: {} bytes", code.len());
    img.put(KCODE, &code);
    crate::loader::multiboot::build_elf(&img.bytes, LOAD_ADDR, entry, 0x6_0000)
}

/// GDT entries 6 and 7: FS and GS, DPL 3 data segments based in the data
/// page ([`SEGMENTS`]); the GDT limit covers them.
pub(super) fn put_segments(img: &mut Image) {
    for (i, &(_, off, limit)) in SEGMENTS.iter().enumerate() {
        let d = Descriptor {
            base: DATA_PAGE + off,
            limit,
            typ: 0x3,
            s: true,
            dpl: 3,
            present: true,
            db: true,
            g: false,
            avl: false,
        };
        img.put(gk::GDT + 8 * (6 + i as u32), &d.to_u64().to_le_bytes());
    }
    img.put(gk::GDTR, &(8 * 8 - 1u16).to_le_bytes());
}

/// Fills the data page with block `i`'s pattern and zeroes the stack page
/// (kernel code, ES flat; clobbers EAX, ECX, EDI).
pub(super) fn fill_pages(k: &mut Asm, i: usize) {
    let fill = k.label();
    let (data, seed) = (DATA_PAGE as i32, (0x1234_5678u32.wrapping_mul(i as u32 + 1)) as i32);
    let stack_bottom = (USTACK_TOP - 0x1000) as i32;
    let golden = 0x9E37_79B9u32 as i32;
    x86!(k;
        cld
        ; mov edi, data
        ; mov ecx, 1024
        ; mov eax, seed
        ; =>fill
        ; stosd
        ; add eax, golden
        ; dec ecx
        ; jnz =>fill
        ; mov edi, stack_bottom
        ; mov ecx, 1024
        ; xor eax, eax
        ; rep stosd
    );
}

/// Prints ` hash` of the data page and of the stack page (kernel code,
/// DS flat; clobbers EAX, ECX, ESI).
pub(super) fn hash_pages(k: &mut Asm, r: &gk::Routines) {
    let (putc, hex) = (r.putc, r.print_hex);
    for page in [DATA_PAGE, USTACK_TOP - 0x1000] {
        let l = k.label();
        let p = page as i32;
        x86!(k;
            mov esi, p
            ; mov ecx, 1024
            ; xor eax, eax
            ; =>l
            ; rol eax, 5
            ; xor eax, [esi]
            ; add esi, 4
            ; dec ecx
            ; jnz =>l
            ; push eax
            ; mov al, 0x20
            ; call =>putc
            ; pop eax
            ; call =>hex
        );
    }
}

/// Runs the guest with `user_exec` and returns its console output.
fn run(exe: &std::path::Path, elf: &std::path::Path, user_exec: &str) -> Result<String, String> {
    run_with(exe, elf, &["--user-exec", user_exec], user_exec, RUN_LIMIT)
}

/// Runs the guest `elf` under `popek run` (isa machine, 16 MiB) with the
/// extra arguments `args` and returns its console output; `what` names
/// the run in errors. A run longer than `limit` is killed and an error.
pub(super) fn run_with(
    exe: &std::path::Path,
    elf: &std::path::Path,
    args: &[&str],
    what: &str,
    limit: Duration,
) -> Result<String, String> {
    run_capture(exe, elf, args, what, limit).map(|r| r.0)
}

/// [`run_with`], also returning the run's stderr and exit status. Both
/// outputs go through files beside `elf`: a pipe read only after the exit
/// could fill, and the guest would wait on it until the time limit.
pub(super) fn run_capture(
    exe: &std::path::Path,
    elf: &std::path::Path,
    args: &[&str],
    what: &str,
    limit: Duration,
) -> Result<(String, String, std::process::ExitStatus), String> {
    let err_path = elf.with_extension("stderr");
    let out_path = elf.with_extension("stdout");
    let create = |p: &std::path::Path| std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()));
    let (out_file, err_file) = (create(&out_path)?, create(&err_path)?);
    // The isa machine unless `args` names one.
    let machine: &[&str] = if args.contains(&"--machine") { &[] } else { &["--machine", "isa"] };
    let mut child = Command::new(exe)
        .args(["run", "--mem", "16M", "--no-input"])
        .args(machine)
        .args(args)
        .arg("--kernel")
        .arg(elf)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_file))
        .stderr(Stdio::from(err_file))
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the guest ({what}) did not finish in {} s", limit.as_secs()));
            }
            // Most guests finish in milliseconds: poll finely at first.
            Ok(None) if start.elapsed() < Duration::from_millis(50) => std::thread::sleep(Duration::from_micros(200)),
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(e.to_string()),
        }
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    Ok((out, err, status))
}

/// The blocks of one input, one per slot while its bytes last (both fuzz
/// guests generate them this way; `make` is the guest's block generator).
pub(super) fn blocks_from(
    input: &[u8],
    make: impl Fn(&mut Unstructured<'_>, u32) -> arbitrary::Result<Block>,
) -> Vec<Block> {
    let mut u = Unstructured::new(input);
    let mut blocks = Vec::new();
    for i in 0..BLOCKS {
        if u.is_empty() && i > 0 {
            break;
        }
        match make(&mut u, BLOCKS_AT + SLOT * i as u32) {
            Ok(b) => blocks.push(b),
            Err(_) => break,
        }
    }
    blocks
}

/// Disassembly of a block, for failure reports.
pub fn disassemble(code: &[u8], ip: u32) -> String {
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
    let mut d = Decoder::with_ip(32, code, u64::from(ip), DecoderOptions::NONE);
    let mut f = IntelFormatter::new();
    let mut s = String::new();
    for i in &mut d {
        let mut t = String::new();
        f.format(&i, &mut t);
        s += &format!("  {:08x}  {t}\n", i.ip());
    }
    s
}

impl Target for Cpl3 {
    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        let blocks = blocks_from(input, block);
        if blocks.is_empty() {
            return Ok(());
        }
        compare(&self.0.exe, &self.0.dir, &blocks)
    }
}

/// Runs `blocks` in one guest with user code direct and translated (through
/// the `popek` at `exe`, the guest written in `dir`); `Err` names the first
/// block whose state differs, with its disassembly.
pub fn compare(exe: &std::path::Path, dir: &std::path::Path, blocks: &[Block]) -> Result<(), String> {
    let at = |i: usize| BLOCKS_AT + SLOT * i as u32;
    compare_runs(exe, dir, &guest(blocks), blocks, &|i| (at(i), format!("block {i}")))
}

/// [`compare`] for the guest `elf`, whose run `i` is `blocks[i]` at the
/// address and under the name `what(i)` gives.
pub(super) fn compare_runs(
    exe: &std::path::Path,
    dir: &std::path::Path,
    elf_bytes: &[u8],
    blocks: &[Block],
    what: &dyn Fn(usize) -> (u32, String),
) -> Result<(), String> {
    let elf = dir.join("guest.elf");
    std::fs::write(&elf, elf_bytes).map_err(|e| e.to_string())?;
    let direct = run(exe, &elf, "direct")?;
    let translated = run(exe, &elf, "translated")?;
    let (dl, tl): (Vec<&str>, Vec<&str>) = (direct.lines().collect(), translated.lines().collect());
    if dl.len() != blocks.len() || tl.len() != blocks.len() {
        super::note("guest output incomplete");
    }
    for (i, b) in blocks.iter().enumerate() {
        let (x, y) = (dl.get(i).copied().unwrap_or("(none)"), tl.get(i).copied().unwrap_or("(none)"));
        if x != y {
            let (ip, name) = what(i);
            return Err(format!(
                "{name} differs:\n  direct:     {x}\n  translated: {y}\n  initial EAX ECX EDX EBX ESI EDI {:08x?}, flags {:#x}\n{}",
                b.regs,
                b.flags,
                disassemble(&b.code, ip)
            ));
        }
        super::note(if x.starts_with("B 0x00000080") {
            "block: ended by int 0x80"
        } else {
            "block: ended by an exception"
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind};

    use super::*;

    /// `n` bytes of a fixed xorshift64 sequence.
    fn bytes(mut x: u64, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn has_memory(i: &Instruction) -> bool {
        (0..i.op_count()).any(|k| i.op_kind(k) == OpKind::Memory)
    }

    fn a16(i: &Instruction) -> bool {
        has_memory(i)
            && (i.memory_base().size() == 2
                || i.memory_index().size() == 2
                || (i.memory_base() == Register::None
                    && i.memory_index() == Register::None
                    && i.memory_displ_size() == 2))
    }

    /// The forms of issue 15's second generator an instruction shows.
    fn forms(i: &Instruction) -> Vec<&'static str> {
        use Code::*;
        let seg = matches!(i.segment_prefix(), Register::FS | Register::GS);
        let reg0 = i.op_count() > 0 && i.op0_kind() == OpKind::Register;
        let mut f = Vec::new();
        if a16(i) && i.mnemonic() == Mnemonic::Lea {
            f.push("lea a16");
        }
        if seg && a16(i) {
            f.push(if i.segment_prefix() == Register::FS { "fs a16" } else { "gs a16" });
        }
        if seg && has_memory(i) && !a16(i) {
            f.push(if i.segment_prefix() == Register::FS { "fs a32" } else { "gs a32" });
        }
        if seg && i.is_string_instruction() {
            f.push(if i.op_kind(i.op_count() - 1) == OpKind::MemorySegSI {
                "string fs/gs a16"
            } else {
                "string fs/gs a32"
            });
        }
        match i.code() {
            Jmp_rm32 => f.push(if reg0 { "jmp reg" } else { "jmp mem" }),
            Call_rm32 => f.push(if reg0 { "call reg" } else { "call mem" }),
            Call_rel32_32 => f.push("call rel32"),
            Retnd => f.push("ret"),
            Retnd_imm16 => f.push("ret 4"),
            Fninit => f.push("fninit"),
            Fcomip_st0_sti => f.push("fcomip"),
            Fnstsw_AX => f.push("fnstsw ax"),
            _ => {}
        }
        if has_memory(i) && matches!(i.mnemonic(), Mnemonic::Fadd | Mnemonic::Fiadd) {
            f.push("fadd mem");
        }
        if has_memory(i) && matches!(i.mnemonic(), Mnemonic::Fmul | Mnemonic::Fimul) {
            f.push("fmul mem");
        }
        if has_memory(i) && matches!(i.mnemonic(), Mnemonic::Fdiv | Mnemonic::Fdivr | Mnemonic::Fidiv) {
            f.push("fdiv mem");
        }
        if has_memory(i) && matches!(i.mnemonic(), Mnemonic::Fld | Mnemonic::Fild) {
            f.push("fld mem");
        }
        if has_memory(i) && matches!(i.mnemonic(), Mnemonic::Fstp | Mnemonic::Fistp) {
            f.push("fstp mem");
        }
        if seg && format!("{:?}", i.mnemonic()).starts_with('F') {
            f.push("x87 fs/gs");
        }
        f
    }

    /// Many blocks from a fixed byte seed: every block decodes to the
    /// end of its code (which is `CLOSE`), every indirect branch target is
    /// an instruction later in the same block, and every new form shows up.
    #[test]
    fn second_generator_forms_are_generated_and_blocks_decode() {
        let data = bytes(0x15_1515, 4 << 20);
        let mut u = Unstructured::new(&data);
        let mut seen = BTreeSet::new();
        for n in 0..3000u32 {
            let ip = BLOCKS_AT + SLOT * (n % BLOCKS as u32);
            let b = block(&mut u, ip).expect("enough bytes");
            assert!(b.code.len() <= SLOT as usize, "block {n} too long");
            assert!(b.code.ends_with(&CLOSE));
            let insns: Vec<Instruction> =
                Decoder::with_ip(32, &b.code, u64::from(ip), DecoderOptions::NONE).into_iter().collect();
            assert!(insns.iter().all(|i| !i.is_invalid()), "block {n} does not decode:\n{}", disassemble(&b.code, ip));
            assert_eq!(insns.iter().map(Instruction::len).sum::<usize>(), b.code.len());
            let starts: BTreeSet<u64> = insns.iter().map(Instruction::ip).collect();
            for w in insns.windows(2) {
                let (set, br) = (&w[0], &w[1]);
                let indirect = matches!(br.code(), Code::Jmp_rm32 | Code::Call_rm32 | Code::Retnd);
                let imm = match set.code() {
                    Code::Mov_r32_imm32 | Code::Mov_rm32_imm32 | Code::Pushd_imm32 => u64::from(set.immediate32()),
                    _ => continue,
                };
                let feeds = match br.code() {
                    Code::Retnd => set.code() == Code::Pushd_imm32,
                    _ if br.op0_kind() == OpKind::Register => set.op0_register() == br.op0_register(),
                    _ => set.code() == Code::Mov_rm32_imm32 && has_memory(br),
                };
                if indirect && feeds {
                    assert!(
                        starts.contains(&imm) && imm > br.ip(),
                        "block {n}: {br} at {:#x} goes to {imm:#x}, not a later instruction:\n{}",
                        br.ip(),
                        disassemble(&b.code, ip)
                    );
                }
            }
            for i in &insns {
                seen.extend(forms(i));
            }
        }
        let want = [
            "lea a16",
            "fs a16",
            "gs a16",
            "fs a32",
            "gs a32",
            "string fs/gs a16",
            "string fs/gs a32",
            "jmp reg",
            "jmp mem",
            "call reg",
            "call mem",
            "call rel32",
            "ret",
            "ret 4",
            "fninit",
            "fadd mem",
            "fmul mem",
            "fdiv mem",
            "fld mem",
            "fstp mem",
            "fcomip",
            "fnstsw ax",
            "x87 fs/gs",
        ];
        for w in want {
            assert!(seen.contains(w), "never generated: {w} (seen {seen:?})");
        }
    }

    /// Segment operands land in their segment, aligned, whatever the
    /// addressing: the effective address computed from the setup's
    /// register values and the decoded operand.
    #[test]
    fn segment_operands_land_in_their_segment() {
        let data = bytes(0x31337, 1 << 20);
        let mut u = Unstructured::new(&data);
        let (mut n16, mut n32) = (0, 0);
        for _ in 0..5000 {
            let size = *u.choose(&[1u32, 2, 4, 8, 10]).unwrap();
            let o = seg_operand(&mut u, size, true, None).unwrap();
            let mut regs = std::collections::HashMap::new();
            regs.insert(Register::EBP, EBP_VALUE);
            for s in &o.setup {
                regs.insert(s.op0_register(), s.immediate32());
            }
            let mut e = Encoder::new(32);
            e.encode(&Instruction::with2(Code::Mov_r32_rm32, Register::EAX, o.mem).unwrap(), 0).unwrap();
            let buf = e.take_buffer();
            let i = Decoder::new(32, &buf, DecoderOptions::NONE).decode();
            let val = |r: Register| if r == Register::None { 0 } else { regs[&r.full_register32()] };
            let ea = if a16(&i) {
                n16 += 1;
                (val(i.memory_base()).wrapping_add(val(i.memory_index())).wrapping_add(i.memory_displacement32()))
                    & 0xFFFF
            } else {
                n32 += 1;
                val(i.memory_base())
                    .wrapping_add(val(i.memory_index()).wrapping_mul(i.memory_index_scale()))
                    .wrapping_add(i.memory_displacement32())
            };
            let &(_, _, limit) = SEGMENTS.iter().find(|s| s.0 == i.segment_prefix()).unwrap();
            assert!(ea + size - 1 <= limit, "{i}: EA {ea:#x} + {size} beyond {limit:#x}");
            assert_eq!(ea % size.next_power_of_two().min(16), 0, "{i}: EA {ea:#x} misaligned");
            assert_eq!(o.restore.is_empty(), o.setup.iter().all(|s| s.op0_register() != Register::EBP));
        }
        assert!(n16 > 1000 && n32 > 1000, "{n16} 16-bit, {n32} 32-bit");
    }
}
