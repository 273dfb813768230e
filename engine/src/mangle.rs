//! Stage 2, mangle: one walk over the decoded block that turns each guest
//! instruction into translator operations ([`Op`]), one handler per
//! instruction family. Nothing here knows TC addresses; `emit` lowers the
//! operations to bytes.

use crate::callout::CalloutKind;
use crate::classify::{self, Class, Flow, LoopKind, Sensitive};
use crate::decode::{BlockEnd, DecodedBlock, DecodedInsn, InsnBytes, MAX_INSN_LEN};
use iced_x86::{Code, Encoder, Instruction, OpKind, Register};
use std::ops::Range;

/// How an instruction was translated (for the disassembly log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Copied byte for byte (32-bit code) or re-encoded unchanged (16-bit).
    Ident,
    /// Replaced by an inline sequence.
    Rewritten,
    /// Replaced by a callout.
    Callout,
}

impl Disposition {
    pub fn label(&self) -> &'static str {
        match self {
            Disposition::Ident => "IDENT",
            Disposition::Rewritten => "REWRITTEN",
            Disposition::Callout => "CALLOUT",
        }
    }
}

/// A translator operation: what the emitter must produce for (part of) a
/// guest instruction. Plain data (`Copy`): byte sequences are inline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Guest instruction bytes, run as is; `gs`: wrap in the GS-prefix
    /// rewrite (guest GS selector loaded around it).
    Copy { bytes: InsnBytes, gs: bool },
    /// Exit to the monitor; `resume`: the translation goes on after it.
    Callout { kind: CalloutKind, resume: bool },
    /// Direct jump out of the block (chainable exit).
    Jmp { target: u32 },
    /// Conditional exit to `target` (condition code nibble `cc`), otherwise
    /// exit to `fallthrough`.
    Jcc { cc: u8, target: u32, fallthrough: u32 },
    /// LOOP/LOOPcc/JCXZ run natively on a local label, both outcomes exits.
    Loop { kind: LoopKind, cx: bool, target: u32, fallthrough: u32 },
    /// Direct call: push the guest return address, exit to `target`.
    Call { ret_eip: u32, op16: bool, target: u32 },
    /// Near return through the lookup table.
    Ret { op16: bool, imm: u16, ss32: bool },
    /// Indirect jump: `load` is `mov ecx|cx, <operand>`, then lookup; `gs`:
    /// the load runs with the guest's GS (the GS-prefix rewrite).
    IndirectJmp { load: InsnBytes, op16: bool, gs: bool },
    /// Indirect call: load target, push the guest return address, lookup.
    IndirectCall { load: InsnBytes, op16: bool, ret_eip: u32, gs: bool },
    /// Virtual IF := value (CLI 0, STI 0x200).
    SetVif(u32),
    /// PUSHFD with the virtual IF/IOPL merged in.
    Pushf,
    /// POPFD into real arithmetic flags plus virtual IF/IOPL.
    Popf,
    /// Exit with `Poll` if an interrupt is pending (and, with `check_vif`,
    /// the virtual IF is set). Emitted after STI's shadow and after POPF.
    IrqCheck { check_vif: bool },
    /// The block ends without a branch (page end, size cap).
    FallThrough { target: u32 },
    /// Before DIV/IDIV: `load` is `mov ecx, <divisor>` (or MOVZX), and a
    /// zero divisor exits with a `DivideError` callout, flag-free (JECXZ),
    /// instead of the host trap the instruction would take; `inline`: the
    /// #DE is delivered in the TC first, as an inline INT delivers (CPL 3).
    DivCheck { load: InsnBytes, inline: bool },
    /// MOV/POP to DS, ES, FS or GS (`sreg`: 0, 3, 4, 5) through the segment
    /// cache: `load` is `movzx ecx, <selector>`; a hit loads the host
    /// shadow selector and, for POP, releases `pop` bytes of stack; a miss
    /// is the instruction's callout (`kind`).
    LoadSeg { sreg: u8, load: InsnBytes, pop: u8, kind: CalloutKind },
    /// VERW through the segment cache (`load` as for `LoadSeg`): Linux's
    /// MDS mitigation runs one on every return to user mode.
    Verw { load: InsnBytes },
    /// INT n from CPL 3 through the gate cache and the transition page:
    /// the stack switch, the frame and the jump to the translated handler
    /// inline; anything the caches do not vouch for is the INT's callout.
    IntGate { vector: u8 },
    /// `in al, dx` (`port` None) or `in al, imm8` of a cached port through
    /// the port read cache; anything else is the IN's callout.
    PortRead { port: Option<u16> },
    /// IRETD from CPL 0 to the CPL 3 code and stack segments the transition
    /// page names, inline; anything else is the IRET's callout.
    Iret,
    /// INVLPG at CPL 0 through the INVLPG filter: `load` is `lea ecx,
    /// <operand>`, `sreg` the operand's segment (0 ES, 2 SS, 3 DS, 4 FS),
    /// whose host selector must be a GDT shadow of base 0; a page whose
    /// filter bit is clear retires with nothing to do, anything else is
    /// the INVLPG's callout.
    Invlpg { load: InsnBytes, sreg: u8 },
}

/// One guest instruction after mangling (the `n`th of the block: its
/// decoded form is `DecodedBlock::insns[n]`).
#[derive(Clone, Debug)]
pub struct MangledInsn {
    pub disposition: Disposition,
    /// Its operations in [`MangledBlock::ops`].
    ops: Range<u32>,
}

/// The result of stage 2: per guest instruction a disposition and a run of
/// operations, all operations in one vector. The engine keeps one and
/// mangles every block into it: no allocation per instruction.
#[derive(Clone, Debug, Default)]
pub struct MangledBlock {
    pub insns: Vec<MangledInsn>,
    ops: Vec<Op>,
}

impl MangledBlock {
    /// The operations of `m` (one of `self.insns`).
    pub fn ops(&self, m: &MangledInsn) -> &[Op] {
        &self.ops[m.ops.start as usize..m.ops.end as usize]
    }
    pub fn len(&self) -> usize {
        self.insns.len()
    }
    pub fn is_empty(&self) -> bool {
        self.insns.is_empty()
    }
    /// Appends an instruction whose operations are those pushed since
    /// `first_op` (`self.ops.len()` before its handler ran).
    fn finish(&mut self, first_op: usize, disposition: Disposition) {
        let ops = first_op as u32..self.ops.len() as u32;
        self.insns.push(MangledInsn { disposition, ops });
    }
    /// Appends `op` to the last instruction.
    fn push_to_last(&mut self, op: Op) {
        self.ops.push(op);
        if let Some(last) = self.insns.last_mut() {
            last.ops.end = self.ops.len() as u32;
        }
    }
}

/// What the translation depends on besides the bytes.
#[derive(Clone, Copy, Debug)]
pub struct MangleCtx {
    pub cpl: u8,
    pub ss32: bool,
    pub cs32: bool,
    /// Inline PUSHF/POPF (else callouts).
    pub inline_flags: bool,
    /// Inline MOV/POP Sreg through the segment cache (else callouts).
    pub inline_segments: bool,
    /// Inline INT n at CPL 3 and IRETD at CPL 0 ([`Op::IntGate`], [`Op::Iret`]).
    pub inline_transitions: bool,
    /// Inline `in al` of cached ports ([`Op::PortRead`]).
    pub inline_port_reads: bool,
    /// Inline INVLPG of pages the filter clears ([`Op::Invlpg`]).
    pub inline_invlpg: bool,
    /// RDTSC as itself ([`crate::Config::native_rdtsc`]).
    pub native_rdtsc: bool,
    /// Test-only corruption ([`crate::Config::corrupt`]).
    pub corrupt: Option<iced_x86::Mnemonic>,
}

/// The mangle walk.
pub fn mangle(block: &DecodedBlock, ctx: &MangleCtx) -> MangledBlock {
    let mut out = MangledBlock::default();
    mangle_into(block, ctx, &mut out);
    out
}

/// [`mangle`] into `out`, reusing its vectors.
pub fn mangle_into(block: &DecodedBlock, ctx: &MangleCtx, out: &mut MangledBlock) {
    out.insns.clear();
    out.ops.clear();
    let mut sti_shadow = false;
    for insn in &block.insns {
        let first_op = out.ops.len();
        let disposition = mangle_one(insn, ctx, &mut out.ops);
        // STI: interrupts become deliverable after the NEXT instruction.
        // (The check reads vif too: the shadowed instruction may be a CLI.)
        if sti_shadow && !insn.class.ends_block {
            out.ops.push(Op::IrqCheck { check_vif: true });
        }
        sti_shadow = out.ops[first_op..].contains(&Op::SetVif(0x200));
        out.finish(first_op, disposition);
    }
    if block.end != BlockEnd::Instruction && !out.insns.is_empty() {
        out.push_to_last(Op::FallThrough { target: block.next_eip });
    }
}

/// Each handler pushes the instruction's operations to `ops` and returns
/// its disposition.
fn mangle_one(insn: &DecodedInsn, ctx: &MangleCtx, ops: &mut Vec<Op>) -> Disposition {
    let c = insn.class;
    if c.cpl0_only && ctx.cpl > 0 {
        return callout(ops, CalloutKind::GeneralProtection, false);
    }
    match c.class {
        Class::Ident => mangle_ident(insn, ctx, ops),
        Class::ControlFlow(f) => mangle_flow(insn, f, ctx, ops),
        Class::Sensitive(s) => mangle_sensitive(insn, s, ctx, ops),
    }
}

/// `push Sreg` (32-bit): push the guest's selector, which the monitor keeps
/// in the vCPU page, with one flag-free, restartable instruction:
/// `push dword gs:[guest_sel + 4*sreg]` (65 FF 35 disp32).
fn push_segment(insn: &DecodedInsn, ops: &mut Vec<Op>) -> Disposition {
    use iced_x86::Register;
    let index = match insn.instr.op0_register() {
        Register::ES => 0,
        Register::CS => 1,
        Register::SS => 2,
        Register::DS => 3,
        Register::FS => 4,
        Register::GS => 5,
        _ => return callout(ops, CalloutKind::Sensitive(Sensitive::PushSeg), !insn.class.ends_block),
    };
    let disp = (crate::vmm_area::vcpu::GUEST_SEL + 4 * index).to_le_bytes();
    let bytes = InsnBytes::new(&[0x65, 0xFF, 0x35, disp[0], disp[1], disp[2], disp[3]]);
    rewritten(ops, &[Op::Copy { bytes, gs: false }])
}

/// MOV Sreg, r/m16 or POP Sreg (DS, ES, FS, GS) as an inline load through
/// the segment cache ([`Op::LoadSeg`]): Linux reloads four of them on every
/// kernel entry and exit. `None` (a callout) for SS and CS, a GS-relative
/// operand (it would need the GS rewrite) or what the encoder cannot say.
fn segment_load(insn: &DecodedInsn, s: Sensitive) -> Option<Op> {
    let i = &insn.instr;
    let sreg = match i.op0_register() {
        Register::ES => 0,
        Register::DS => 3,
        Register::FS => 4,
        Register::GS => 5,
        _ => return None,
    };
    let kind = CalloutKind::Sensitive(s);
    if s == Sensitive::PopSeg {
        // movzx ecx, word [esp]; the pop releases 4 bytes (2 with 66h).
        let pop = match classify::operand_size(i) {
            32 => 4,
            16 => 2,
            _ => return None,
        };
        return Some(Op::LoadSeg { sreg, load: InsnBytes::new(&[0x0F, 0xB7, 0x0C, 0x24]), pop, kind });
    }
    if classify::uses_gs_memory(i) {
        return None;
    }
    Some(Op::LoadSeg { sreg, load: selector_load(i, 1)?, pop: 0, kind })
}

/// [`Op::Invlpg`] for `invlpg m`: `lea ecx, m` (its effective address,
/// 16-bit addressing included) and the segment that makes it linear. CS
/// and GS are not the guest's in translated code: those take the callout.
fn invlpg_load(i: &Instruction) -> Option<Op> {
    if i.op0_kind() != OpKind::Memory {
        return None;
    }
    let sreg = match i.memory_segment() {
        Register::ES => 0,
        Register::SS => 2,
        Register::DS => 3,
        Register::FS => 4,
        _ => return None,
    };
    let mut load = *i;
    load.set_code(Code::Lea_r32_m);
    load.set_op0_kind(OpKind::Register);
    load.set_op0_register(Register::ECX);
    load.set_op1_kind(OpKind::Memory);
    load.set_segment_prefix(Register::None);
    Some(Op::Invlpg { load: encode32(&load)?, sreg })
}

/// `movzx ecx, <operand n of i>`: a selector operand read with the guest's
/// own addressing (a register's low word).
fn selector_load(i: &Instruction, n: u32) -> Option<InsnBytes> {
    let mut load = *i;
    load.set_code(Code::Movzx_r32_rm16);
    load.set_op0_kind(OpKind::Register);
    load.set_op0_register(Register::ECX);
    load.set_op1_kind(i.op_kind(n));
    if i.op_kind(n) == OpKind::Register {
        // MOV Sreg, r32 names the 32-bit register; the selector is its low word.
        load.set_op1_register(low_word(i.op_register(n))?);
    }
    encode32(&load)
}

/// The 16-bit register of a general-purpose register (itself if 16-bit).
fn low_word(r: Register) -> Option<Register> {
    const WORDS: [Register; 8] = [
        Register::AX,
        Register::CX,
        Register::DX,
        Register::BX,
        Register::SP,
        Register::BP,
        Register::SI,
        Register::DI,
    ];
    if r.is_gpr16() {
        return Some(r);
    }
    r.is_gpr32().then(|| WORDS[r.number() - Register::EAX.number()])
}

fn rewritten(ops: &mut Vec<Op>, seq: &[Op]) -> Disposition {
    ops.extend_from_slice(seq);
    Disposition::Rewritten
}

fn callout(ops: &mut Vec<Op>, kind: CalloutKind, resume: bool) -> Disposition {
    ops.push(Op::Callout { kind, resume });
    Disposition::Callout
}

/// IDENT: the bytes themselves in 32-bit code; 16-bit code is re-encoded
/// for the 32-bit TC segment (operand/address-size prefixes), which is the
/// same instruction. A guest GS memory operand gets the GS rewrite.
fn mangle_ident(insn: &DecodedInsn, ctx: &MangleCtx, ops: &mut Vec<Op>) -> Disposition {
    let gs = classify::uses_gs_memory(&insn.instr);
    let bytes = if ctx.cs32 {
        insn.bytes
    } else {
        match encode32(&insn.instr) {
            Some(b) => b,
            None => return callout(ops, CalloutKind::Sensitive(Sensitive::Unsupported), false),
        }
    };
    let mut disposition = if gs || !ctx.cs32 { Disposition::Rewritten } else { Disposition::Ident };
    if let Some(load) = divisor_load(&insn.instr) {
        let inline = ctx.inline_transitions && ctx.cpl == 3 && ctx.cs32 && ctx.ss32;
        ops.push(Op::DivCheck { load, inline });
        disposition = Disposition::Rewritten;
    }
    ops.push(Op::Copy { bytes, gs });
    if ctx.corrupt == Some(insn.instr.mnemonic()) {
        if let Some(lea) = corrupting_lea(&insn.instr) {
            ops.push(Op::Copy { bytes: lea, gs: false });
        }
    }
    disposition
}

/// DIV/IDIV's divisor into ECX (`mov ecx, r/m32`, `movzx ecx, r/m16|8`),
/// for the zero check of [`Op::DivCheck`]: a #DE the translator sees coming
/// costs a callout instead of a host trap (5-9 µs). `None` for a GS operand
/// (it would need the GS rewrite) or an operand the 32-bit encoder cannot
/// express.
fn divisor_load(i: &Instruction) -> Option<InsnBytes> {
    if !matches!(i.mnemonic(), iced_x86::Mnemonic::Div | iced_x86::Mnemonic::Idiv) || classify::uses_gs_memory(i) {
        return None;
    }
    let size = match i.op0_kind() {
        OpKind::Register => i.op0_register().size(),
        OpKind::Memory => i.memory_size().size(),
        _ => return None,
    };
    let code = match size {
        1 => Code::Movzx_r32_rm8,
        2 => Code::Movzx_r32_rm16,
        4 => Code::Mov_r32_rm32,
        _ => return None,
    };
    let mut load = *i;
    load.set_code(code);
    load.set_op1_kind(i.op0_kind());
    if i.op0_kind() == OpKind::Register {
        load.set_op1_register(i.op0_register());
    }
    load.set_op0_kind(OpKind::Register);
    load.set_op0_register(Register::ECX);
    encode32(&load)
}

/// `lea r32, [r32 + 1]` for an instruction whose first operand is a 32-bit
/// general-purpose register other than ESP (the corrupting test switch).
fn corrupting_lea(i: &Instruction) -> Option<InsnBytes> {
    if i.op_count() == 0 || i.op0_kind() != OpKind::Register {
        return None;
    }
    let r = i.op0_register();
    if !r.is_gpr32() || r == Register::ESP {
        return None;
    }
    let n = (r.number() - Register::EAX.number()) as u8;
    // 8D /r with mod=01 (disp8), reg=r, rm=r: lea r, [r + 1].
    Some(InsnBytes::new(&[0x8D, 0x40 | (n << 3) | n, 0x01]))
}

/// `i` encoded for the 32-bit TC segment (16-bit code, indirect branch
/// loads).
fn encode32(i: &Instruction) -> Option<InsnBytes> {
    let mut enc = Encoder::new(32);
    let len = enc.encode(i, 0).ok()?;
    (len <= MAX_INSN_LEN).then(|| InsnBytes::new(&enc.take_buffer()))
}

fn mangle_flow(insn: &DecodedInsn, f: Flow, ctx: &MangleCtx, ops: &mut Vec<Op>) -> Disposition {
    let i = &insn.instr;
    let op16 = classify::operand_size(i) == 16;
    let next = insn.next_eip();
    match f {
        Flow::DirectJmp => rewritten(ops, &[Op::Jmp { target: i.near_branch32() }]),
        Flow::Jcc => {
            let cc = i.condition_code() as u8 - 1;
            rewritten(ops, &[Op::Jcc { cc, target: i.near_branch32(), fallthrough: next }])
        }
        Flow::Loop(kind) => {
            let cx = classify::loop_counter_is_cx(i);
            rewritten(ops, &[Op::Loop { kind, cx, target: i.near_branch32(), fallthrough: next }])
        }
        Flow::DirectCall => rewritten(ops, &[Op::Call { ret_eip: next, op16, target: i.near_branch32() }]),
        Flow::Ret | Flow::RetImm => {
            let imm = if f == Flow::RetImm { i.immediate16() } else { 0 };
            rewritten(ops, &[Op::Ret { op16, imm, ss32: ctx.ss32 }])
        }
        Flow::IndirectJmp | Flow::IndirectCall => mangle_indirect(insn, f, op16, ops),
        // Flat 32-bit code and stacks only: the sequences address the
        // frames with ESP and push dwords.
        Flow::Int if ctx.inline_transitions && ctx.cpl == 3 && ctx.cs32 && ctx.ss32 => {
            rewritten(ops, &[Op::IntGate { vector: i.immediate8() }])
        }
        Flow::Iret if ctx.inline_transitions && ctx.cpl == 0 && ctx.cs32 && ctx.ss32 && !op16 => {
            rewritten(ops, &[Op::Iret])
        }
        _ => callout(ops, CalloutKind::ControlFlow(f), false),
    }
}

/// Indirect JMP/CALL: load the target into ECX with the guest's own operand
/// (re-encoded as `mov ecx, <operand>`), then the inline lookup. A GS
/// operand gets the GS-prefix rewrite around the load: i386 glibc makes
/// every system call with `call *%gs:0x10` (the vDSO's entry).
fn mangle_indirect(insn: &DecodedInsn, f: Flow, op16: bool, ops: &mut Vec<Op>) -> Disposition {
    let i = &insn.instr;
    let gs = classify::uses_gs_memory(i);
    let mut load = *i;
    load.set_code(if op16 { Code::Mov_r16_rm16 } else { Code::Mov_r32_rm32 });
    load.set_op1_kind(i.op0_kind());
    if i.op0_kind() == OpKind::Register {
        load.set_op1_register(i.op0_register());
    }
    load.set_op0_kind(OpKind::Register);
    load.set_op0_register(if op16 { Register::CX } else { Register::ECX });
    let Some(load) = encode32(&load) else {
        return callout(ops, CalloutKind::ControlFlow(f), false);
    };
    let op = if f == Flow::IndirectCall {
        Op::IndirectCall { load, op16, ret_eip: insn.next_eip(), gs }
    } else {
        Op::IndirectJmp { load, op16, gs }
    };
    rewritten(ops, &[op])
}

fn mangle_sensitive(insn: &DecodedInsn, s: Sensitive, ctx: &MangleCtx, ops: &mut Vec<Op>) -> Disposition {
    let ring0 = ctx.cpl == 0;
    let flat_stack = ctx.ss32 && classify::operand_size(&insn.instr) == 32;
    match s {
        Sensitive::Cli if ring0 => rewritten(ops, &[Op::SetVif(0)]),
        Sensitive::Sti if ring0 => rewritten(ops, &[Op::SetVif(0x200)]),
        Sensitive::Pushf if ring0 && ctx.inline_flags && flat_stack => rewritten(ops, &[Op::Pushf]),
        Sensitive::Popf if ring0 && ctx.inline_flags && flat_stack => {
            rewritten(ops, &[Op::Popf, Op::IrqCheck { check_vif: true }])
        }
        Sensitive::PushSeg if flat_stack => push_segment(insn, ops),
        Sensitive::In if ring0 && ctx.inline_port_reads && ctx.cs32 => match insn.instr.code() {
            Code::In_AL_DX => rewritten(ops, &[Op::PortRead { port: None }]),
            Code::In_AL_imm8 if crate::vmm_area::CACHED_PORTS.contains(&u16::from(insn.instr.immediate8())) => {
                rewritten(ops, &[Op::PortRead { port: Some(u16::from(insn.instr.immediate8())) }])
            }
            _ => callout(ops, CalloutKind::Sensitive(s), !insn.class.ends_block),
        },
        Sensitive::Invlpg if ring0 && ctx.inline_invlpg && ctx.cs32 => match invlpg_load(&insn.instr) {
            Some(op) => rewritten(ops, &[op]),
            None => callout(ops, CalloutKind::Sensitive(s), !insn.class.ends_block),
        },
        Sensitive::Verw if ring0 && ctx.inline_segments && ctx.cs32 && !classify::uses_gs_memory(&insn.instr) => {
            match selector_load(&insn.instr, 0) {
                Some(load) => rewritten(ops, &[Op::Verw { load }]),
                None => callout(ops, CalloutKind::Sensitive(s), !insn.class.ends_block),
            }
        }
        Sensitive::MovToSeg | Sensitive::PopSeg if ring0 && ctx.inline_segments && ctx.cs32 && ctx.ss32 => {
            match segment_load(insn, s) {
                Some(op) => rewritten(ops, &[op]),
                None => callout(ops, CalloutKind::Sensitive(s), !insn.class.ends_block),
            }
        }
        // The guest's TSC is the host's: the instruction itself (it
        // touches no flags and cannot fault with CR4.TSD clear).
        Sensitive::Rdtsc if ctx.native_rdtsc => {
            rewritten(ops, &[Op::Copy { bytes: InsnBytes::new(&[0x0F, 0x31]), gs: false }])
        }
        _ => callout(ops, CalloutKind::Sensitive(s), !insn.class.ends_block),
    }
}
