//! The classification table: every IA-32 instruction that is control flow
//! or sensitive, and what it is. Reads like the list in the architecture
//! manual (and DynamoRIO's decode table): one row per instruction (family),
//! first match wins, anything not listed is IDENT.
//!
//! iced-x86's `is_privileged()` is not enough: it misses POPF/PUSHF, SGDT,
//! SIDT, SMSW, STR, MOV r,Sreg, LAR, IRET, which behave differently (and
//! silently) when a de-privileged guest kernel runs them. No other module of
//! the engine matches on opcodes: they ask this table.

use crate::fxhash::FxHashMap;
use iced_x86::{Code, FlowControl, Instruction, Mnemonic, OpKind, Register};
use std::sync::OnceLock;

/// What the translator does with an instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// Copied as is into the TC.
    Ident,
    /// Changes EIP: rewritten to TC targets, lookups or callouts.
    ControlFlow(Flow),
    /// Behaves differently (or not at all) in host user mode: rewritten to
    /// an inline sequence on virtual state or a callout.
    Sensitive(Sensitive),
}

/// Control-flow kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flow {
    DirectJmp,
    Jcc,
    DirectCall,
    Ret,
    RetImm,
    IndirectJmp,
    IndirectCall,
    /// LOOP/LOOPE/LOOPNE/JCXZ/JECXZ: counter semantics kept exactly.
    Loop(LoopKind),
    FarJmp,
    FarCall,
    FarRet,
    Iret,
    Int,
    Int3,
    Into,
    Int1,
    Sysenter,
    Sysexit,
    Syscall,
    Sysret,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoopKind {
    Loop,
    Loope,
    Loopne,
    Jcxz,
}

/// Sensitive-instruction kinds: each has a virtual semantics the monitor
/// implements (docs/translator.md lists them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sensitive {
    Pushf,
    Popf,
    Cli,
    Sti,
    MovToCr,
    MovFromCr,
    MovToDr,
    MovFromDr,
    /// MOV to/from test registers (386/486 only): #UD on later CPUs.
    MovTr,
    Lgdt,
    Lidt,
    Lldt,
    Ltr,
    Sgdt,
    Sidt,
    Sldt,
    Str,
    Smsw,
    Lmsw,
    Clts,
    MovToSeg,
    MovFromSeg,
    PopSeg,
    PushSeg,
    /// LDS/LES/LFS/LGS/LSS, with the segment register each loads.
    LoadFarPtr(Register),
    Lar,
    Lsl,
    Verr,
    Verw,
    In,
    Out,
    Ins,
    Outs,
    Hlt,
    Invlpg,
    Invd,
    Wbinvd,
    Rdmsr,
    Wrmsr,
    Rdtsc,
    Rdtscp,
    Rdpmc,
    Rdpid,
    Cpuid,
    Monitor,
    Mwait,
    Xsetbv,
    Xgetbv,
    Clac,
    Stac,
    Invpcid,
    Rsm,
    /// UD0/UD1/UD2: the guest gets #UD.
    Ud,
    /// Bytes iced cannot decode: the guest gets #UD.
    Invalid,
    /// Decodable but not supported by the translator (TSX, other control
    /// flow not in this table): the guest gets #UD.
    Unsupported,
}

impl Sensitive {
    /// Whether performing it can load a segment register (exceptions it
    /// raises aside): the monitor then re-derives the segment shadows.
    pub fn loads_segments(&self) -> bool {
        matches!(self, Sensitive::MovToSeg | Sensitive::PopSeg | Sensitive::LoadFarPtr(_) | Sensitive::Rsm)
    }
}

/// Flag usage bits.
pub const FLAGS_R: u8 = 1;
pub const FLAGS_W: u8 = 2;

/// A classified instruction: its class and attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classification {
    pub class: Class,
    /// #GP(0) when executed at CPL > 0 (privileged instruction).
    pub cpl0_only: bool,
    /// #GP(0) when CPL > IOPL (CLI, STI, IN, OUT, INS, OUTS; POPF ignores IF).
    pub iopl_sensitive: bool,
    /// The block ends after this instruction.
    pub ends_block: bool,
    /// FLAGS_R / FLAGS_W of the guest's EFLAGS (arithmetic, IF, IOPL, AC).
    pub flags: u8,
}

impl Classification {
    pub fn is_ident(&self) -> bool {
        self.class == Class::Ident
    }
}

/// How a row matches.
#[derive(Clone, Copy, Debug)]
pub enum Pat {
    /// Every encoding of a mnemonic.
    M(Mnemonic),
    /// Exactly these encodings.
    C(&'static [Code]),
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub pat: Pat,
    pub info: Classification,
}

const fn cf(pat: Pat, f: Flow) -> Row {
    Row {
        pat,
        info: Classification {
            class: Class::ControlFlow(f),
            cpl0_only: false,
            iopl_sensitive: false,
            ends_block: true,
            flags: 0,
        },
    }
}

const fn se(pat: Pat, s: Sensitive) -> Row {
    Row {
        pat,
        info: Classification {
            class: Class::Sensitive(s),
            cpl0_only: false,
            iopl_sensitive: false,
            ends_block: false,
            flags: 0,
        },
    }
}

impl Row {
    /// Privileged: #GP at CPL > 0.
    const fn p(mut self) -> Row {
        self.info.cpl0_only = true;
        self
    }
    /// IOPL-sensitive: #GP when CPL > IOPL.
    const fn io(mut self) -> Row {
        self.info.iopl_sensitive = true;
        self
    }
    /// Ends the block (changes what the next instruction means).
    const fn end(mut self) -> Row {
        self.info.ends_block = true;
        self
    }
    const fn fl(mut self, f: u8) -> Row {
        self.info.flags = f;
        self
    }
}

use Flow as F;
use Mnemonic as Mn;
use Pat::{C, M};
use Sensitive as S;
const R: u8 = FLAGS_R;
const W: u8 = FLAGS_W;

/// THE table. First match wins; specific encodings come before mnemonics.
pub static TABLE: &[Row] = &[
    // ---- control flow ----
    cf(C(&[Code::Jmp_rel8_16, Code::Jmp_rel8_32, Code::Jmp_rel16, Code::Jmp_rel32_32]), F::DirectJmp),
    cf(C(&[Code::Jmp_rm16, Code::Jmp_rm32]), F::IndirectJmp),
    cf(C(&[Code::Jmp_ptr1616, Code::Jmp_ptr1632, Code::Jmp_m1616, Code::Jmp_m1632]), F::FarJmp),
    cf(C(&[Code::Call_rel16, Code::Call_rel32_32]), F::DirectCall),
    cf(C(&[Code::Call_rm16, Code::Call_rm32]), F::IndirectCall),
    cf(C(&[Code::Call_ptr1616, Code::Call_ptr1632, Code::Call_m1616, Code::Call_m1632]), F::FarCall),
    cf(C(&[Code::Retnw, Code::Retnd]), F::Ret),
    cf(C(&[Code::Retnw_imm16, Code::Retnd_imm16]), F::RetImm),
    cf(C(&[Code::Retfw, Code::Retfd, Code::Retfw_imm16, Code::Retfd_imm16]), F::FarRet),
    cf(M(Mn::Jo), F::Jcc).fl(R),
    cf(M(Mn::Jno), F::Jcc).fl(R),
    cf(M(Mn::Jb), F::Jcc).fl(R),
    cf(M(Mn::Jae), F::Jcc).fl(R),
    cf(M(Mn::Je), F::Jcc).fl(R),
    cf(M(Mn::Jne), F::Jcc).fl(R),
    cf(M(Mn::Jbe), F::Jcc).fl(R),
    cf(M(Mn::Ja), F::Jcc).fl(R),
    cf(M(Mn::Js), F::Jcc).fl(R),
    cf(M(Mn::Jns), F::Jcc).fl(R),
    cf(M(Mn::Jp), F::Jcc).fl(R),
    cf(M(Mn::Jnp), F::Jcc).fl(R),
    cf(M(Mn::Jl), F::Jcc).fl(R),
    cf(M(Mn::Jge), F::Jcc).fl(R),
    cf(M(Mn::Jle), F::Jcc).fl(R),
    cf(M(Mn::Jg), F::Jcc).fl(R),
    cf(M(Mn::Loop), F::Loop(LoopKind::Loop)),
    cf(M(Mn::Loope), F::Loop(LoopKind::Loope)).fl(R),
    cf(M(Mn::Loopne), F::Loop(LoopKind::Loopne)).fl(R),
    cf(M(Mn::Jcxz), F::Loop(LoopKind::Jcxz)),
    cf(M(Mn::Jecxz), F::Loop(LoopKind::Jcxz)),
    cf(M(Mn::Iret), F::Iret).fl(W),
    cf(M(Mn::Iretd), F::Iret).fl(W),
    cf(M(Mn::Int), F::Int).fl(W),
    cf(M(Mn::Int3), F::Int3).fl(W),
    cf(M(Mn::Into), F::Into).fl(R | W),
    cf(M(Mn::Int1), F::Int1).fl(W),
    cf(M(Mn::Sysenter), F::Sysenter).fl(W),
    cf(M(Mn::Sysexit), F::Sysexit).p().fl(W),
    cf(M(Mn::Syscall), F::Syscall).fl(W),
    cf(M(Mn::Sysret), F::Sysret).p().fl(W),
    // ---- flags and interrupts ----
    se(M(Mn::Pushf), S::Pushf).fl(R),
    se(M(Mn::Pushfd), S::Pushf).fl(R),
    se(M(Mn::Popf), S::Popf).fl(W),
    se(M(Mn::Popfd), S::Popf).fl(W),
    se(M(Mn::Cli), S::Cli).io().fl(W),
    se(M(Mn::Sti), S::Sti).io().fl(W),
    se(M(Mn::Clac), S::Clac).p().fl(W),
    se(M(Mn::Stac), S::Stac).p().fl(W),
    // ---- control, debug and test registers ----
    se(C(&[Code::Mov_cr_r32]), S::MovToCr).p().end(),
    se(C(&[Code::Mov_r32_cr]), S::MovFromCr).p(),
    se(C(&[Code::Mov_dr_r32]), S::MovToDr).p(),
    se(C(&[Code::Mov_r32_dr]), S::MovFromDr).p(),
    se(C(&[Code::Mov_tr_r32, Code::Mov_r32_tr]), S::MovTr).p(),
    se(M(Mn::Lmsw), S::Lmsw).p().end(),
    se(M(Mn::Smsw), S::Smsw),
    se(M(Mn::Clts), S::Clts).p(),
    // ---- descriptor tables ----
    se(M(Mn::Lgdt), S::Lgdt).p(),
    se(M(Mn::Lidt), S::Lidt).p(),
    se(M(Mn::Lldt), S::Lldt).p(),
    se(M(Mn::Ltr), S::Ltr).p(),
    se(M(Mn::Sgdt), S::Sgdt),
    se(M(Mn::Sidt), S::Sidt),
    se(M(Mn::Sldt), S::Sldt),
    se(M(Mn::Str), S::Str),
    se(M(Mn::Lar), S::Lar).fl(W),
    se(M(Mn::Lsl), S::Lsl).fl(W),
    se(M(Mn::Verr), S::Verr).fl(W),
    se(M(Mn::Verw), S::Verw).fl(W),
    // ---- segment registers (CS and SS show the virtual RPL) ----
    se(C(&[Code::Mov_Sreg_rm16, Code::Mov_Sreg_r32m16]), S::MovToSeg),
    se(C(&[Code::Mov_rm16_Sreg, Code::Mov_r32m16_Sreg]), S::MovFromSeg),
    se(
        C(&[
            Code::Pushw_ES,
            Code::Pushd_ES,
            Code::Pushw_CS,
            Code::Pushd_CS,
            Code::Pushw_SS,
            Code::Pushd_SS,
            Code::Pushw_DS,
            Code::Pushd_DS,
            Code::Pushw_FS,
            Code::Pushd_FS,
            Code::Pushw_GS,
            Code::Pushd_GS,
        ]),
        S::PushSeg,
    ),
    se(
        C(&[
            Code::Popw_ES,
            Code::Popd_ES,
            Code::Popw_CS,
            Code::Popw_SS,
            Code::Popd_SS,
            Code::Popw_DS,
            Code::Popd_DS,
            Code::Popw_FS,
            Code::Popd_FS,
            Code::Popw_GS,
            Code::Popd_GS,
        ]),
        S::PopSeg,
    ),
    se(M(Mn::Lds), S::LoadFarPtr(Register::DS)),
    se(M(Mn::Les), S::LoadFarPtr(Register::ES)),
    se(M(Mn::Lfs), S::LoadFarPtr(Register::FS)),
    se(M(Mn::Lgs), S::LoadFarPtr(Register::GS)),
    se(M(Mn::Lss), S::LoadFarPtr(Register::SS)),
    // ---- I/O (to the monitor's port bus) ----
    se(M(Mn::In), S::In).io(),
    se(M(Mn::Out), S::Out).io(),
    se(M(Mn::Insb), S::Ins).io(),
    se(M(Mn::Insw), S::Ins).io(),
    se(M(Mn::Insd), S::Ins).io(),
    se(M(Mn::Outsb), S::Outs).io(),
    se(M(Mn::Outsw), S::Outs).io(),
    se(M(Mn::Outsd), S::Outs).io(),
    // ---- processor control ----
    se(M(Mn::Hlt), S::Hlt).p().end(),
    se(M(Mn::Invlpg), S::Invlpg).p(),
    se(M(Mn::Invd), S::Invd).p(),
    se(M(Mn::Wbinvd), S::Wbinvd).p(),
    se(M(Mn::Wbnoinvd), S::Wbinvd).p(),
    se(M(Mn::Invpcid), S::Invpcid).p(),
    se(M(Mn::Rdmsr), S::Rdmsr).p(),
    se(M(Mn::Wrmsr), S::Wrmsr).p(),
    se(M(Mn::Rdtsc), S::Rdtsc),
    se(M(Mn::Rdtscp), S::Rdtscp),
    se(M(Mn::Rdpmc), S::Rdpmc),
    se(M(Mn::Rdpid), S::Rdpid),
    se(M(Mn::Cpuid), S::Cpuid),
    se(M(Mn::Monitor), S::Monitor).p(),
    se(M(Mn::Mwait), S::Mwait).p().end(),
    se(M(Mn::Xsetbv), S::Xsetbv).p(),
    se(M(Mn::Xgetbv), S::Xgetbv),
    se(M(Mn::Rsm), S::Rsm).end().fl(W),
    // ---- undefined ----
    se(M(Mn::Ud0), S::Ud).end(),
    se(M(Mn::Ud1), S::Ud).end(),
    se(M(Mn::Ud2), S::Ud).end(),
    se(M(Mn::Xbegin), S::Unsupported).end(),
    se(M(Mn::Xabort), S::Unsupported).end(),
    se(M(Mn::Xend), S::Unsupported).end(),
];

const IDENT: Classification =
    Classification { class: Class::Ident, cpl0_only: false, iopl_sensitive: false, ends_block: false, flags: 0 };
const INVALID: Classification = se(M(Mn::INVALID), S::Invalid).end().info;
const UNSUPPORTED: Classification = se(M(Mn::INVALID), S::Unsupported).end().info;

impl Pat {
    /// Whether the row matches an encoding (a mnemonic is a function of
    /// the encoding: `Instruction::mnemonic()` is `code().mnemonic()`).
    fn matches(&self, code: Code) -> bool {
        match *self {
            Pat::M(m) => code.mnemonic() == m,
            Pat::C(codes) => codes.contains(&code),
        }
    }
}

/// The table's answer for an encoding, by a scan of every row (first match
/// wins): the definition of the classification. Everything it reads of an
/// instruction (mnemonic, flow control) is a function of its `Code`.
fn classify_code_by_scan(code: Code) -> Classification {
    if code == Code::INVALID {
        return INVALID;
    }
    if let Some(row) = TABLE.iter().find(|r| r.pat.matches(code)) {
        return row.info;
    }
    // Safety net: any control transfer the table does not know must not be
    // copied (its target would be relative to the TC).
    if code.flow_control() != FlowControl::Next {
        return UNSUPPORTED;
    }
    IDENT
}

/// [`classify_code_by_scan`] for every `Code`, computed once: classifying
/// is then one load instead of a scan of the table per instruction (15 %
/// of the translation time before).
fn by_code() -> &'static [Classification] {
    static INDEX: OnceLock<Box<[Classification]>> = OnceLock::new();
    INDEX.get_or_init(|| Code::values().map(classify_code_by_scan).collect())
}

/// Classifies one decoded instruction.
pub fn classify(i: &Instruction) -> Classification {
    by_code()[i.code() as usize]
}

/// The table's attributes of instruction kind `class` (the privilege and
/// IOPL checks of a callout site, whose kind is all the monitor keeps):
/// every row of one kind agrees on them (a test checks it).
pub fn of_class(class: Class) -> Classification {
    // Indexed once (first row of each class, as a scan would find): every
    // callout site asks when it is recorded.
    static INDEX: OnceLock<FxHashMap<Class, Classification>> = OnceLock::new();
    let index = INDEX.get_or_init(|| {
        let mut m = FxHashMap::default();
        for r in TABLE {
            m.entry(r.info.class).or_insert(r.info);
        }
        m
    });
    let info = index.get(&class).copied().unwrap_or(UNSUPPORTED);
    Classification { class, ..info }
}

/// Width of the counter a LOOP/JCXZ-family instruction uses (CX or ECX):
/// its address size.
pub fn loop_counter_is_cx(i: &Instruction) -> bool {
    use Code::*;
    matches!(
        i.code(),
        Loopne_rel8_16_CX
            | Loopne_rel8_32_CX
            | Loope_rel8_16_CX
            | Loope_rel8_32_CX
            | Loop_rel8_16_CX
            | Loop_rel8_32_CX
            | Jcxz_rel8_16
            | Jcxz_rel8_32
    )
}

/// Operand size of a near branch, call or return (16 or 32).
pub fn operand_size(i: &Instruction) -> u32 {
    if is_op16(i.code()) {
        16
    } else {
        32
    }
}

/// True when `code`, an instruction the table does not copy, has a 16-bit
/// operand size. Written out rather than read from iced's
/// `Code::op_code()`: its first use builds the whole `OpCodeInfo` table,
/// formatted strings and all, which was a fifth of a small guest's run
/// (the fuzzers start one VM per input). A test checks the list against
/// `op_code()` for every such code.
pub fn is_op16(code: Code) -> bool {
    use Code::*;
    matches!(
        code,
        Pushw_ES
            | Popw_ES
            | Pushw_CS
            | Popw_CS
            | Pushw_SS
            | Popw_SS
            | Pushw_DS
            | Popw_DS
            | Pushw_FS
            | Popw_FS
            | Pushw_GS
            | Popw_GS
            | Insw_m16_DX
            | Outsw_DX_m16
            | In_AX_imm8
            | Out_imm8_AX
            | In_AX_DX
            | Out_DX_AX
            | Jo_rel8_16
            | Jno_rel8_16
            | Jb_rel8_16
            | Jae_rel8_16
            | Je_rel8_16
            | Jne_rel8_16
            | Jbe_rel8_16
            | Ja_rel8_16
            | Js_rel8_16
            | Jns_rel8_16
            | Jp_rel8_16
            | Jnp_rel8_16
            | Jl_rel8_16
            | Jge_rel8_16
            | Jle_rel8_16
            | Jg_rel8_16
            | Jo_rel16
            | Jno_rel16
            | Jb_rel16
            | Jae_rel16
            | Je_rel16
            | Jne_rel16
            | Jbe_rel16
            | Ja_rel16
            | Js_rel16
            | Jns_rel16
            | Jp_rel16
            | Jnp_rel16
            | Jl_rel16
            | Jge_rel16
            | Jle_rel16
            | Jg_rel16
            | Mov_rm16_Sreg
            | Mov_Sreg_rm16
            | Pushfw
            | Popfw
            | Retnw_imm16
            | Retnw
            | Retfw_imm16
            | Retfw
            | Iretw
            | Les_r16_m1616
            | Lds_r16_m1616
            | Lss_r16_m1616
            | Lfs_r16_m1616
            | Lgs_r16_m1616
            | Xbegin_rel16
            | Loopne_rel8_16_CX
            | Loopne_rel8_16_ECX
            | Loopne_rel8_16_RCX
            | Loope_rel8_16_CX
            | Loope_rel8_16_ECX
            | Loope_rel8_16_RCX
            | Loop_rel8_16_CX
            | Loop_rel8_16_ECX
            | Loop_rel8_16_RCX
            | Jcxz_rel8_16
            | Jecxz_rel8_16
            | Jrcxz_rel8_16
            | Call_rel16
            | Call_ptr1616
            | Call_rm16
            | Call_m1616
            | Jmp_rel16
            | Jmp_rel8_16
            | Jmp_ptr1616
            | Jmp_rm16
            | Jmp_m1616
            | Jmpe_rm16
            | Jmpe_disp16
            | Sldt_rm16
            | Str_rm16
            | Lldt_rm16
            | Ltr_rm16
            | Verr_rm16
            | Verw_rm16
            | Sgdt_m1632_16
            | Sidt_m1632_16
            | Lgdt_m1632_16
            | Lidt_m1632_16
            | Smsw_rm16
            | Lmsw_rm16
            | Lar_r16_rm16
            | Lsl_r16_rm16
            | Ud1_r16_rm16
            | Ud0_r16_rm16
    )
}

/// True when the instruction addresses memory through the guest's `GS`
/// (explicit or implicit-with-override memory operand).
pub fn uses_gs_memory(i: &Instruction) -> bool {
    let mem = (0..i.op_count()).any(|n| {
        matches!(
            i.op_kind(n),
            OpKind::Memory | OpKind::MemorySegSI | OpKind::MemorySegESI | OpKind::MemorySegDI | OpKind::MemorySegEDI
        )
    });
    mem && i.memory_segment() == iced_x86::Register::GS
}

/// OF SF ZF AF PF CF, as iced-x86 numbers them.
const ARITH_FLAGS: u32 = iced_x86::RflagsBits::OF
    | iced_x86::RflagsBits::SF
    | iced_x86::RflagsBits::ZF
    | iced_x86::RflagsBits::AF
    | iced_x86::RflagsBits::PF
    | iced_x86::RflagsBits::CF;

/// Whether the guest's arithmetic flags are dead where `block` starts:
/// each is written before any is read, and nothing before the last write
/// can fault (an exception frame would carry the flags) or leave the block.
/// The block-entry poll may then test the pending flag with `cmp` instead
/// of spilling ECX, whose store/reload sits on a loop counter's dependency
/// chain (docs/translator.md, "The block-entry poll").
pub fn arith_flags_dead_at_entry<'a>(block: impl IntoIterator<Item = &'a Instruction>) -> bool {
    let mut written = 0;
    for i in block {
        if i.rflags_read() & ARITH_FLAGS & !written != 0 || !cannot_fault(i) {
            return false;
        }
        // A shift or rotate by a count that is zero at run time leaves the
        // flags alone: it never counts as writing them.
        if !matches!(
            i.mnemonic(),
            Mn::Shl | Mn::Sal | Mn::Shr | Mn::Sar | Mn::Rol | Mn::Ror | Mn::Rcl | Mn::Rcr | Mn::Shld | Mn::Shrd
        ) {
            written |= i.rflags_modified() & ARITH_FLAGS;
        }
        if written == ARITH_FLAGS {
            return true;
        }
    }
    false
}

/// Copied as is, touches no memory (explicit, stack or string), and has no
/// exception of its own (division, BOUND, INTO, the UD family).
fn cannot_fault(i: &Instruction) -> bool {
    classify(i).is_ident()
        && i.flow_control() == FlowControl::Next
        && i.stack_pointer_increment() == 0
        && !i.is_string_instruction()
        && (0..i.op_count()).all(|n| {
            !matches!(
                i.op_kind(n),
                OpKind::Memory
                    | OpKind::MemorySegSI
                    | OpKind::MemorySegESI
                    | OpKind::MemorySegDI
                    | OpKind::MemorySegEDI
                    | OpKind::MemoryESDI
                    | OpKind::MemoryESEDI
            )
        })
        && !matches!(i.mnemonic(), Mn::Div | Mn::Idiv | Mn::Aam | Mn::Bound | Mn::Into | Mn::Ud0 | Mn::Ud1 | Mn::Ud2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn block(bytes: &[u8]) -> Vec<Instruction> {
        Decoder::with_ip(32, bytes, 0x1000, DecoderOptions::NONE).into_iter().collect()
    }

    #[test]
    fn flags_dead_at_entry_needs_every_flag_written_before_a_read_or_a_fault() {
        // imul eax, eax, 69069 (CF OF written, the rest undefined): dead.
        assert!(arith_flags_dead_at_entry(&block(&[0x69, 0xC0, 0xCD, 0x0D, 0x01, 0x00, 0x40])));
        // mov eax, ebx; xor ecx, ecx: dead after the xor.
        assert!(arith_flags_dead_at_entry(&block(&[0x89, 0xD8, 0x31, 0xC9])));
        // inc eax (not CF); adc ebx, 0 (reads CF): live.
        assert!(!arith_flags_dead_at_entry(&block(&[0x40, 0x83, 0xD3, 0x00])));
        // jnz first: reads ZF.
        assert!(!arith_flags_dead_at_entry(&block(&[0x75, 0x00])));
        // mov eax, [esi] may fault before the add: live.
        assert!(!arith_flags_dead_at_entry(&block(&[0x8B, 0x06, 0x01, 0xD8])));
        // div ecx may raise #DE: live.
        assert!(!arith_flags_dead_at_entry(&block(&[0xF7, 0xF1])));
        // shl eax, cl with CL = 0 writes nothing; then only inc (no CF): live.
        assert!(!arith_flags_dead_at_entry(&block(&[0xD3, 0xE0, 0x40])));
        // push eax touches the stack: live.
        assert!(!arith_flags_dead_at_entry(&block(&[0x50, 0x31, 0xC0])));
    }

    fn class_of(bytes: &[u8]) -> Classification {
        let mut d = Decoder::with_ip(32, bytes, 0x1000, DecoderOptions::NONE);
        classify(&d.decode())
    }

    fn sens(bytes: &[u8]) -> Option<Sensitive> {
        match class_of(bytes).class {
            Class::Sensitive(s) => Some(s),
            _ => None,
        }
    }

    #[test]
    fn is_privileged_misses_what_the_table_catches() {
        // (bytes, expected kind): these are the silent ones of Robin & Irvine.
        let cases: &[(&[u8], Sensitive)] = &[
            (&[0x9D], S::Popf),                           // popfd
            (&[0x9C], S::Pushf),                          // pushfd
            (&[0x0F, 0x01, 0x00], S::Sgdt),               // sgdt [eax]
            (&[0x0F, 0x01, 0x08], S::Sidt),               // sidt [eax]
            (&[0x0F, 0x01, 0xE0], S::Smsw),               // smsw eax
            (&[0x0F, 0x00, 0xC8], S::Str),                // str eax
            (&[0x0F, 0x00, 0xC0], S::Sldt),               // sldt eax
            (&[0x8C, 0xC8], S::MovFromSeg),               // mov eax, cs
            (&[0x8C, 0xD0], S::MovFromSeg),               // mov eax, ss
            (&[0x0F, 0x02, 0xC1], S::Lar),                // lar eax, ecx
            (&[0x0F, 0x03, 0xC1], S::Lsl),                // lsl eax, ecx
            (&[0x0F, 0x00, 0xE0], S::Verr),               // verr ax
            (&[0x0E], S::PushSeg),                        // push cs
            (&[0x17], S::PopSeg),                         // pop ss
            (&[0xC5, 0x00], S::LoadFarPtr(Register::DS)), // lds eax, [eax]
            (&[0x0F, 0xA2], S::Cpuid),                    // cpuid
            (&[0x0F, 0x31], S::Rdtsc),                    // rdtsc
        ];
        for (bytes, kind) in cases {
            let mut d = Decoder::with_ip(32, bytes, 0, DecoderOptions::NONE);
            let i = d.decode();
            assert_eq!(sens(bytes), Some(*kind), "{i}");
        }
        // IRET is control flow, also missed by is_privileged.
        assert_eq!(class_of(&[0xCF]).class, Class::ControlFlow(F::Iret));
    }

    #[test]
    fn privileged_rows() {
        for bytes in
            [&[0x0F, 0x20, 0xC0][..], &[0x0F, 0x22, 0xD8], &[0xF4], &[0x0F, 0x01, 0x10], &[0x0F, 0x06], &[0x0F, 0x30]]
        {
            let c = class_of(bytes);
            assert!(c.cpl0_only, "{bytes:x?} {c:?}");
        }
        assert!(class_of(&[0xFA]).iopl_sensitive);
        assert!(class_of(&[0xE4, 0x60]).iopl_sensitive);
        assert!(!class_of(&[0x0F, 0x01, 0x00]).cpl0_only); // sgdt is not privileged: that is the problem
    }

    #[test]
    fn control_flow_rows() {
        assert_eq!(class_of(&[0xEB, 0x00]).class, Class::ControlFlow(F::DirectJmp));
        assert_eq!(class_of(&[0x74, 0x00]).class, Class::ControlFlow(F::Jcc));
        assert_eq!(class_of(&[0xE8, 0, 0, 0, 0]).class, Class::ControlFlow(F::DirectCall));
        assert_eq!(class_of(&[0xFF, 0xD0]).class, Class::ControlFlow(F::IndirectCall));
        assert_eq!(class_of(&[0xFF, 0x20]).class, Class::ControlFlow(F::IndirectJmp));
        assert_eq!(class_of(&[0xC3]).class, Class::ControlFlow(F::Ret));
        assert_eq!(class_of(&[0xC2, 8, 0]).class, Class::ControlFlow(F::RetImm));
        assert_eq!(class_of(&[0xCB]).class, Class::ControlFlow(F::FarRet));
        assert_eq!(class_of(&[0xEA, 0, 0, 0, 0, 8, 0]).class, Class::ControlFlow(F::FarJmp));
        assert_eq!(class_of(&[0xE2, 0]).class, Class::ControlFlow(F::Loop(LoopKind::Loop)));
        assert_eq!(class_of(&[0xE3, 0]).class, Class::ControlFlow(F::Loop(LoopKind::Jcxz)));
        assert_eq!(class_of(&[0xCD, 0x80]).class, Class::ControlFlow(F::Int));
        assert_eq!(class_of(&[0x0F, 0x34]).class, Class::ControlFlow(F::Sysenter));
        assert!(class_of(&[0xEB, 0x00]).ends_block);
    }

    #[test]
    fn ident_rows() {
        for bytes in
            [&[0x89, 0xC8][..], &[0xF3, 0xA4], &[0x8D, 0x44, 0x24, 0x04], &[0x0F, 0xB1, 0x0A], &[0x90], &[0xC9]]
        {
            assert!(class_of(bytes).is_ident(), "{bytes:x?}");
        }
        assert_eq!(class_of(&[0x0F, 0x0B]).class, Class::Sensitive(S::Ud));
        assert_eq!(class_of(&[0x0F, 0xFF, 0xC0]).class, Class::Sensitive(S::Ud)); // ud0 eax, eax
        assert_eq!(class_of(&[0x0F, 0x04]).class, Class::Sensitive(S::Invalid));
        // no such opcode
    }

    #[test]
    fn every_row_is_reachable_and_flow_rows_end_blocks() {
        for (n, row) in TABLE.iter().enumerate() {
            if let Class::ControlFlow(_) = row.info.class {
                assert!(row.info.ends_block, "row {n}");
            }
            // A row shadowed by an earlier one would be dead.
            if let Pat::C(codes) = row.pat {
                for c in codes {
                    let first = TABLE.iter().position(|r| match r.pat {
                        Pat::C(cs) => cs.contains(c),
                        Pat::M(m) => c.mnemonic() == m,
                    });
                    assert_eq!(first, Some(n), "{c:?} shadowed");
                }
            }
        }
    }

    #[test]
    fn rows_of_one_kind_agree_on_their_checks() {
        for row in TABLE {
            let k = of_class(row.info.class);
            assert_eq!((k.cpl0_only, k.iopl_sensitive), (row.info.cpl0_only, row.info.iopl_sensitive), "{row:?}");
        }
        assert_eq!(of_class(Class::Sensitive(S::Invalid)).class, Class::Sensitive(S::Invalid));
    }

    /// The classification as it was before the index: a scan of the table
    /// for each decoded instruction.
    fn classify_by_scan(i: &Instruction) -> Classification {
        if i.is_invalid() {
            return INVALID;
        }
        let hit = TABLE.iter().find(|r| match r.pat {
            Pat::M(m) => i.mnemonic() == m,
            Pat::C(codes) => codes.contains(&i.code()),
        });
        if let Some(row) = hit {
            return row.info;
        }
        if i.flow_control() != FlowControl::Next {
            return UNSUPPORTED;
        }
        IDENT
    }

    #[test]
    fn the_index_answers_as_the_scan_for_every_encoding_and_row() {
        // Every Code, through an instruction of that code.
        for code in Code::values() {
            let mut i = Instruction::default();
            i.set_code(code);
            assert_eq!(classify(&i), classify_by_scan(&i), "{code:?}");
        }
        // Every row answers for what it lists (unless an earlier row does).
        for (n, row) in TABLE.iter().enumerate() {
            let codes: Vec<Code> = match row.pat {
                Pat::C(cs) => cs.to_vec(),
                Pat::M(m) => Code::values().filter(|c| c.mnemonic() == m).collect(),
            };
            assert!(!codes.is_empty(), "row {n} matches nothing");
            for c in codes {
                let first = TABLE.iter().position(|r| r.pat.matches(c)).unwrap();
                assert_eq!(by_code()[c as usize], TABLE[first].info, "row {n}: {c:?}");
            }
        }
        // A sweep of real encodings in both code sizes: opcode maps, the
        // usual prefixes, every second byte (ModRM) and a few third bytes.
        let leads: &[&[u8]] = &[
            &[],
            &[0x66],
            &[0x67],
            &[0xF2],
            &[0xF3],
            &[0x65],
            &[0x0F],
            &[0x66, 0x0F],
            &[0xF2, 0x0F],
            &[0xF3, 0x0F],
            &[0x0F, 0x38],
            &[0x0F, 0x3A],
            &[0x66, 0x0F, 0x38],
        ];
        let mut seen = 0;
        for bitness in [16, 32] {
            for lead in leads {
                for b0 in 0..=255u8 {
                    for b1 in 0..=255u8 {
                        for b2 in [0x00, 0xC1] {
                            let mut bytes = lead.to_vec();
                            bytes.extend_from_slice(&[b0, b1, b2, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
                            let mut d = Decoder::with_ip(bitness, &bytes, 0x1000, DecoderOptions::NONE);
                            let i = d.decode();
                            assert_eq!(classify(&i), classify_by_scan(&i), "{bitness}-bit {bytes:x?}: {i}");
                            seen += 1;
                        }
                    }
                }
            }
        }
        assert!(seen > 1_000_000);
    }

    #[test]
    fn of_class_answers_as_the_scan() {
        let scan = |class: Class| {
            let info = TABLE.iter().find(|r| r.info.class == class).map_or(UNSUPPORTED, |r| r.info);
            Classification { class, ..info }
        };
        let mut classes: Vec<Class> = TABLE.iter().map(|r| r.info.class).collect();
        classes.extend([Class::Ident, Class::Sensitive(S::Invalid), Class::Sensitive(S::Unsupported)]);
        classes.push(Class::Sensitive(S::LoadFarPtr(Register::EAX))); // in no row
        for c in classes {
            assert_eq!(of_class(c), scan(c), "{c:?}");
        }
    }

    /// The written-out sizes are iced's, for every code the table does not
    /// copy; and the stack-sized sensitive kinds always have a size.
    #[test]
    fn written_out_sizes_match_the_opcode_tables() {
        for c in Code::values() {
            let info = classify_code_by_scan(c);
            if c == Code::INVALID || info.class == IDENT.class {
                continue;
            }
            let op = c.op_code();
            assert_eq!(is_op16(c), op.operand_size() == 16, "{c:?}");
            let i = Instruction::with(c);
            if matches!(info.class, Class::ControlFlow(F::Loop(_))) {
                assert_eq!(loop_counter_is_cx(&i), op.address_size() == 16, "{c:?}");
            }
            if matches!(
                info.class,
                Class::Sensitive(S::PushSeg | S::PopSeg)
                    | Class::ControlFlow(F::FarJmp | F::FarCall | F::FarRet | F::Iret)
            ) && op.mode32()
            {
                assert!(matches!(op.operand_size(), 16 | 32), "{c:?}");
            }
        }
    }

    #[test]
    fn sixteen_bit_decoding_uses_the_same_rows() {
        let mut d = Decoder::with_ip(16, &[0x9C, 0xC3, 0x8C, 0xC8], 0, DecoderOptions::NONE);
        assert_eq!(classify(&d.decode()).class, Class::Sensitive(S::Pushf));
        let ret = d.decode();
        assert_eq!(classify(&ret).class, Class::ControlFlow(F::Ret));
        assert_eq!(operand_size(&ret), 16);
        assert_eq!(classify(&d.decode()).class, Class::Sensitive(S::MovFromSeg));
    }
}
