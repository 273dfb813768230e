//! Stage 3, emit: lowers mangled operations to IA-32 code with dynasmrt at
//! the block's final TC address. Everything that must be patched later is
//! in an explicit relocation list ([`ExitReloc`]); nothing searches the
//! emitted bytes for magic values.
//!
//! Block layout in the TC:
//!
//! ```text
//! indirect entry:  mov ecx, gs:[callout_target]; lea ecx, [ecx - EIP]; jecxz hit
//!                  jmp miss_stub (or the next block of its lookup slot)
//!            hit:  (count hit) mov ecx, gs:[scratch0]
//! entry:           poll (optional) -- chained jumps land here
//! body:            one sequence per guest instruction
//! exit stubs:      mov dword gs:[callout_id], ID; jmp far gs:[exit_far]
//! ```
//!
//! Every sequence keeps the guest's arithmetic flags (mov, movzx, lea,
//! jecxz, push/pop; PUSHF/POPF restore them with popfd) and records its
//! recovery points as it goes.

use crate::callout::CalloutKind;
use crate::classify::LoopKind;
use crate::decode::DecodedBlock;
use crate::mangle::{MangledBlock, Op};
use crate::recover::RecoveryEntry;
use crate::vmm_area::{
    trans, transition, vcpu, CACHED_PORTS, EXC_GATE_CACHE, GATE_CACHE, GUARD_BIT_SELECT, INVLPG_FILTER, LOOKUP_TABLE,
    LOOKUP_TABLE_USER, PORT_CACHE, SCRATCH_EAX, SCRATCH_EBX, SCRATCH_ECX, SCRATCH_EDX, SCRATCH_ESP, SCRATCH_FLAGS,
    SEG_BASE_ZERO, SEG_CACHE, SEG_CACHE_ENTRIES, SEG_CACHE_ENTRY, SEG_USER_OK, SHADOW_USER_BIT, VMM_STACK_TOP,
};
use dynasmrt::x86::X86Relocation;
use dynasmrt::{dynasm, DynasmApi, VecAssembler};
use iced_x86::Instruction;

macro_rules! x86 {
    ($asm:expr; $($t:tt)*) => {
        dynasm!($asm ; .arch x86 ; $($t)*)
    };
}

const SPILL: i32 = vcpu::scratch(SCRATCH_ECX) as i32;
const CALLOUT_ID: i32 = vcpu::CALLOUT_ID as i32;
const CALLOUT_TARGET: i32 = vcpu::CALLOUT_TARGET as i32;
const VIF: i32 = vcpu::VIF as i32;
const VIOPL: i32 = vcpu::VIOPL as i32;
const POLL: i32 = vcpu::POLL as i32;
const BUDGET: i32 = vcpu::BUDGET as i32;
const IRQ_PENDING: i32 = vcpu::IRQ_PENDING as i32;
const HITS: i32 = vcpu::INDIRECT_HITS as i32;
const GDT_LIVE: i32 = vcpu::GDT_LIVE as i32;
const GDT_LIVE_END: i32 = vcpu::GDT_LIVE_END as i32;
const SEG_LOADED: i32 = vcpu::SEG_LOADED as i32;
const GUEST_SEL: i32 = vcpu::GUEST_SEL as i32;
const GUEST_GS_SEL: i32 = vcpu::GUEST_GS_SEL as i32;
const SPILL_EAX: i32 = vcpu::scratch(SCRATCH_EAX) as i32;
const SPILL_EDX: i32 = vcpu::scratch(SCRATCH_EDX) as i32;
const SPILL_EBX: i32 = vcpu::scratch(SCRATCH_EBX) as i32;
const SPILL_FLAGS: i32 = vcpu::scratch(SCRATCH_FLAGS) as i32;
const SEG_DESC: i32 = SEG_CACHE as i32;
const SEG_RPL_OK: i32 = SEG_CACHE as i32 + 8;
const SEG_VERW_OK: i32 = SEG_CACHE as i32 + 12;
const SEG_ENTRY_USER_OK: i32 = (SEG_CACHE + SEG_USER_OK) as i32;
const SEG_ENTRY_BASE_ZERO: i32 = (SEG_CACHE + SEG_BASE_ZERO) as i32;
const FILTER: i32 = INVLPG_FILTER as i32;
const PAGE_SEG_USER_OK: i32 = vcpu::SEG_USER_OK as i32;
const SPILL_ESP: i32 = vcpu::scratch(SCRATCH_ESP) as i32;
const FRAME: i32 = vcpu::FRAME as i32;
const NEW_SELS: i32 = vcpu::NEW_SELS as i32;
const TRANSITION: i32 = vcpu::TRANSITION as i32;
const INLINE_ENTRIES: i32 = vcpu::INLINE_ENTRIES as i32;
const SAVE_SS: i32 = vcpu::SAVE_SS as i32;
/// Selector bit that tells a segment's two host LDT slots apart
/// ([`crate::vmm_area::SHADOW_USER_BIT`]).
const USER_SLOT_BIT: i32 = crate::vmm_area::SHADOW_USER_BIT as i32;
/// EFLAGS bits an inline IRET to CPL 3 requires clear (TF, IOPL, NT, VM)
/// or set (IF): anything else is the callout's.
const IRET_FLAGS_CHECKED: i32 = 0x100 | 0x200 | 0x3000 | 0x4000 | 0x2_0000;
const IF_MASK: i32 = 0x200;
const IOPL_MASK: i32 = 0x3000;
/// EFLAGS.NT: virtual only (the host's is not read back), so kept with
/// IOPL in `viopl` by the inline PUSHF/POPF (cpl0 fuzzer finding).
const NT_MASK: i32 = 0x4000;

/// Where and how a block is emitted.
#[derive(Clone, Copy, Debug)]
pub struct EmitCtx {
    /// Guest-linear (= TC segment) address of the block's first byte.
    pub tc_addr: u32,
    /// Guest-linear base of the VMM area (for `cs:[abs]` operands).
    pub vmm_base: u32,
    /// Id of the block's first callout site; the rest follow in order.
    pub first_site: u32,
    /// Address of the shared indirect-miss stub.
    pub miss_stub: u32,
    pub guest_eip: u32,
    pub poll_at_entry: bool,
    pub count_indirect_hits: bool,
    /// Charge the block's instruction count to `VcpuPage.budget` at entry.
    pub count_insns: bool,
    /// VMM-area offset of the lookup table indirect branches go through
    /// (`vmm_area::lookup_table(cpl)`).
    pub lookup_table: u32,
    /// Test the user-page guard bits of the block's pages at entry
    /// ([`Emitter::page_guard`]): CPL 3 blocks with `Config::user_page_guards`.
    pub guard_pages: bool,
}

/// A callout site of the block, before it is registered.
#[derive(Clone, Debug)]
pub struct PendingSite {
    pub id: u32,
    pub kind: CalloutKind,
    pub guest_eip: u32,
    pub next_eip: u32,
    pub instruction: Instruction,
    /// Offset in the block where execution continues after the callout.
    pub resume_off: Option<u32>,
    pub insns_before: u32,
    /// For `BlockExit` sites: index into `Emitted::exits`.
    pub exit: Option<usize>,
}

/// A chainable exit: the rel32 field of a `jmp`/`jcc` that targets its
/// exit stub until `link` patches it to the target block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitReloc {
    /// Offset of the rel32 field in the block.
    pub field_off: u32,
    /// Offset of the exit stub in the block.
    pub stub_off: u32,
    pub target_eip: u32,
    pub site: u32,
    /// Guest instructions retired when this exit is taken.
    pub insns_before: u32,
}

/// Output of stage 3. The engine keeps one and emits every block into it
/// ([`emit_block`]): its vectors and the assembler's buffer are allocated
/// once, not per block.
pub struct Emitted {
    pub code: Vec<u8>,
    /// Offset of the direct entry (after the indirect-entry prologue).
    pub entry_off: u32,
    /// Offset past the user-page guard (`entry_off` without one): where a
    /// chain from a block of the same pages may enter.
    pub guarded_off: u32,
    /// Offset of the rel32 of the prologue's mismatch jump (to the miss
    /// stub, or along its lookup slot's collision chain).
    pub mismatch_off: u32,
    pub sites: Vec<PendingSite>,
    pub exits: Vec<ExitReloc>,
    pub recovery: Vec<RecoveryEntry>,
    /// Per guest instruction: TC byte range of its inline translation.
    pub insn_ranges: Vec<(u32, u32)>,
    /// Start of the out-of-line exit stubs.
    pub stubs_off: u32,
    /// The assembler, empty between blocks. No dynasm label or relocation
    /// is used (rel32 fields are computed from `EmitCtx::tc_addr` or listed
    /// in `exits`), so its base address does not matter.
    asm: VecAssembler<X86Relocation>,
    /// Exit relocations waiting for their stub: (field offset, target, insns).
    pending_exits: Vec<(u32, u32, u32)>,
}

impl Default for Emitted {
    fn default() -> Emitted {
        Emitted {
            code: Vec::new(),
            entry_off: 0,
            guarded_off: 0,
            mismatch_off: 0,
            sites: Vec::new(),
            exits: Vec::new(),
            recovery: Vec::new(),
            insn_ranges: Vec::new(),
            stubs_off: 0,
            asm: VecAssembler::new(0),
            pending_exits: Vec::new(),
        }
    }
}

/// End offset of a rel8 jump whose displacement is patched by `bind`.
#[must_use]
struct ShortFixup(u32);

/// End offset of a rel32 jump whose displacement is patched by `bind_near`.
#[must_use]
struct NearFixup(u32);

/// rel8 opcodes (32-bit address size: ECX).
const JECXZ: u8 = 0xE3;
const LOOP: u8 = 0xE2;
const LOOPE: u8 = 0xE1;
const LOOPNE: u8 = 0xE0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    eip: u32,
    spilled: bool,
    gs: bool,
    exact: bool,
    fallback: bool,
    esp_saved: bool,
}

/// The emitter's state; its vectors are those of an [`Emitted`], borrowed
/// for the block.
struct Emitter {
    asm: VecAssembler<X86Relocation>,
    ctx: EmitCtx,
    sites: Vec<PendingSite>,
    exits: Vec<ExitReloc>,
    /// Exit relocations waiting for their stub: (field offset, target, insns).
    pending_exits: Vec<(u32, u32, u32)>,
    /// The flag-clobbering block-entry poll's `jne` waiting for its
    /// out-of-line stub: (rel32 field offset, resume offset).
    pending_poll: Option<(u32, u32)>,
    recovery: Vec<RecoveryEntry>,
    insns_done: u32,
    /// Marks made now are inside a transition's guest accesses
    /// ([`RecoveryEntry::fallback`]).
    fallback: bool,
    /// Marks made now have guest ESP in its spill slot.
    esp_saved: bool,
}

/// Emits one mangled block into `out` (overwriting what it held).
pub fn emit_block(
    ctx: EmitCtx,
    decoded: &DecodedBlock,
    mangled: &MangledBlock,
    out: &mut Emitted,
) -> Result<(), dynasmrt::DynasmError> {
    if out.asm.offset().0 != 0 {
        // A previous block failed half-way: start from a fresh assembler.
        out.asm = VecAssembler::new(0);
    }
    let mut e = Emitter {
        asm: std::mem::replace(&mut out.asm, VecAssembler::new(0)),
        ctx,
        sites: cleared(&mut out.sites),
        exits: cleared(&mut out.exits),
        pending_exits: cleared(&mut out.pending_exits),
        pending_poll: None,
        recovery: cleared(&mut out.recovery),
        insns_done: 0,
        fallback: false,
        esp_saved: false,
    };
    let mut insn_ranges = cleared(&mut out.insn_ranges);
    let mismatch_off = e.indirect_entry();
    let entry_off = e.off();
    if ctx.guard_pages {
        e.page_guard(ctx.guest_eip, &decoded.pages);
    }
    let guarded_off = e.off();
    let flags_dead = || crate::classify::arith_flags_dead_at_entry(decoded.insns.iter().map(|d| &d.instr));
    if ctx.poll_at_entry && !ctx.count_insns && flags_dead() {
        e.flag_poll(ctx.guest_eip);
    } else if ctx.poll_at_entry || ctx.count_insns {
        let charge = ctx.count_insns.then_some(mangled.len() as u32);
        e.poll_check(ctx.guest_eip, ctx.poll_at_entry.then_some(POLL), None, charge, 0);
    }
    for (d, m) in decoded.insns.iter().zip(&mangled.insns) {
        let start = e.off();
        let (eip, next) = (d.eip(), d.next_eip());
        for op in mangled.ops(m) {
            e.op(op, eip, next, &d.instr);
        }
        insn_ranges.push((start, e.off()));
        e.insns_done += 1;
    }
    let stubs_off = e.off();
    e.exit_stubs();
    out.code.clear();
    out.code.extend(e.asm.drain()?);
    out.asm = e.asm;
    out.entry_off = entry_off;
    out.guarded_off = guarded_off;
    out.mismatch_off = mismatch_off;
    out.stubs_off = stubs_off;
    out.sites = e.sites;
    out.exits = e.exits;
    out.pending_exits = e.pending_exits;
    out.recovery = e.recovery;
    out.insn_ranges = insn_ranges;
    Ok(())
}

/// `v`'s buffer, emptied (taken out of an [`Emitted`] for one block).
fn cleared<T>(v: &mut Vec<T>) -> Vec<T> {
    let mut v = std::mem::take(v);
    v.clear();
    v
}

impl Emitter {
    fn off(&self) -> u32 {
        self.asm.offset().0 as u32
    }

    fn addr(&self) -> u32 {
        self.ctx.tc_addr + self.off()
    }

    /// Records the guest state from here on.
    fn mark(&mut self, eip: u32, spilled: bool, gs: bool, exact: bool) {
        let e = RecoveryEntry {
            tc_off: self.off(),
            guest_eip: eip,
            ecx_spilled: spilled,
            gs_is_guest: gs,
            exact,
            fallback: self.fallback,
            esp_saved: self.esp_saved,
        };
        match self.recovery.last_mut() {
            Some(last) if last.tc_off == e.tc_off => *last = e,
            Some(last) if State::of(last) == State::of(&e) => {}
            _ => self.recovery.push(e),
        }
    }

    fn at(&mut self, eip: u32) {
        self.mark(eip, false, false, true);
    }

    fn spill_ecx(&mut self) {
        x86!(self.asm; gs mov DWORD [SPILL], ecx);
    }

    fn reload_ecx(&mut self) {
        x86!(self.asm; gs mov ecx, DWORD [SPILL]);
    }

    /// `mov dword gs:[callout_id], ID; jmp far gs:[exit_far]` (docs/tc-abi.md).
    fn callout(&mut self, kind: CalloutKind, eip: u32, next: u32, instr: &Instruction, resume: bool) -> u32 {
        let id = self.ctx.first_site + self.sites.len() as u32;
        emit_callout(&mut self.asm, id);
        let resume_off = resume.then(|| self.off());
        self.sites.push(PendingSite {
            id,
            kind,
            guest_eip: eip,
            next_eip: next,
            instruction: *instr,
            resume_off,
            insns_before: self.insns_done,
            exit: None,
        });
        id
    }

    /// A 5/6-byte jump whose rel32 goes to an exit stub for `target`.
    fn exit_jump(&mut self, opcode: &[u8], target: u32, insns: u32) {
        self.asm.extend(opcode);
        let field = self.off();
        self.asm.extend([0u8; 4]);
        self.pending_exits.push((field, target, insns));
    }

    /// A rel8 jump to a later point ([`Emitter::bind`]). Raw opcodes:
    /// dynasm 5.1 encodes `jecxz` with a 0x67 prefix in x86 mode, which
    /// makes it JCXZ.
    fn short_jump(&mut self, opcode: u8) -> ShortFixup {
        self.asm.extend([opcode, 0]);
        ShortFixup(self.off())
    }

    fn bind(&mut self, f: ShortFixup) {
        let rel = self.off() - f.0;
        assert!(rel < 0x80, "short jump out of range");
        let mut alter = self.asm.alter();
        alter.goto(dynasmrt::AssemblyOffset(f.0 as usize - 1));
        alter.push(rel as u8);
    }

    /// A near Jcc (condition nibble `cc`) to a later point
    /// ([`Emitter::bind_near`]).
    fn near_jcc(&mut self, cc: u8) -> NearFixup {
        self.asm.extend([0x0F, 0x80 | cc, 0, 0, 0, 0]);
        NearFixup(self.off())
    }

    fn bind_near(&mut self, f: NearFixup) {
        let rel = self.off() - f.0;
        let mut alter = self.asm.alter();
        alter.goto(dynasmrt::AssemblyOffset(f.0 as usize - 4));
        alter.extend(rel.to_le_bytes());
    }

    fn rel32_to(&mut self, opcode: &[u8], abs: u32) {
        self.asm.extend(opcode);
        let rel = abs.wrapping_sub(self.addr() + 4);
        self.asm.extend(rel.to_le_bytes());
    }

    /// The indirect-entry prologue; returns the offset of its mismatch
    /// jump's rel32.
    fn indirect_entry(&mut self) -> u32 {
        let eip = self.ctx.guest_eip;
        self.mark(eip, true, false, true);
        let neg = eip.wrapping_neg() as i32;
        x86!(self.asm
            ; gs mov ecx, DWORD [CALLOUT_TARGET]
            ; lea ecx, [ecx + neg]
        );
        let hit = self.short_jump(JECXZ);
        let miss = self.ctx.miss_stub;
        self.rel32_to(&[0xE9], miss);
        let mismatch = self.off() - 4;
        self.bind(hit);
        if self.ctx.count_indirect_hits {
            x86!(self.asm
                ; gs mov ecx, DWORD [HITS]
                ; lea ecx, [ecx + 1]
                ; gs mov DWORD [HITS], ecx
            );
        }
        self.reload_ecx();
        self.at(eip);
        mismatch
    }

    /// Spill ECX; with `charge`, subtract it from the budget and exit when
    /// the budget went negative; then load `flag` (and the virtual IF first
    /// when `vif`) and exit with `Poll` when nonzero. Resumes after the
    /// check with ECX reloaded. `retired`: guest instructions of the block
    /// done at this point (the site's `insns_before`).
    fn poll_check(&mut self, eip: u32, flag: Option<i32>, vif: Option<()>, charge: Option<u32>, retired: u32) {
        self.at(eip);
        self.spill_ecx();
        self.mark(eip, true, false, true);
        let mut exhausted = None;
        if let Some(n) = charge {
            // Flag-free: budget -= n; the high half is 0xFFFF exactly when
            // the result is negative (budgets stay below BUDGET_MAX, blocks
            // are short), and LEA + JECXZ test that without touching EFLAGS.
            let neg = -(n as i32);
            x86!(self.asm
                ; gs mov ecx, DWORD [BUDGET]
                ; lea ecx, [ecx + neg]
                ; gs mov DWORD [BUDGET], ecx
                ; gs movzx ecx, WORD [BUDGET + 2]
                ; lea ecx, [ecx - 0xFFFF]
            );
            exhausted = Some(self.short_jump(JECXZ));
        }
        let vif_skip = vif.map(|()| {
            x86!(self.asm; gs mov ecx, DWORD [VIF]);
            self.short_jump(JECXZ)
        });
        let flag_skip = match flag {
            Some(flag) => {
                x86!(self.asm; gs mov ecx, DWORD [flag]);
                self.short_jump(JECXZ)
            }
            None => {
                self.asm.extend([0xEB, 0]);
                ShortFixup(self.off())
            }
        };
        if let Some(f) = exhausted {
            self.bind(f);
        }
        self.reload_ecx();
        self.at(eip);
        let id = self.ctx.first_site + self.sites.len() as u32;
        emit_callout(&mut self.asm, id);
        self.mark(eip, true, false, true);
        if let Some(s) = vif_skip {
            self.bind(s);
        }
        self.bind(flag_skip);
        self.reload_ecx();
        self.at(eip);
        let resume = self.off();
        self.sites.push(PendingSite {
            id,
            kind: CalloutKind::Poll,
            guest_eip: eip,
            next_eip: eip,
            instruction: Instruction::default(),
            resume_off: Some(resume),
            insns_before: retired,
            exit: None,
        });
    }

    /// The user-page guard (`vmm_area::USER_GUARDS`): for each page of the
    /// block, its guard byte, then that byte's bit through the bit-select
    /// table, and `jecxz` to a `UserPage` callout when it is clear. Flag-free
    /// (the guest's EFLAGS are live at a block entry), before the entry's
    /// poll and charge, so the callout stops at the block's start with
    /// nothing charged. Every way into the block from elsewhere (chains
    /// from other pages, the lookup table, the monitor) passes here, which
    /// is what lets an address-space switch leave the chains in place; a
    /// chain from a block of the same pages skips it (that block passed
    /// the same guard, and bits change only while no user block runs).
    fn page_guard(&mut self, eip: u32, pages: &[crate::decode::CodePage]) {
        self.at(eip);
        self.spill_ecx();
        self.mark(eip, true, false, true);
        let mut clear = Vec::with_capacity(pages.len());
        for p in pages {
            let (byte, bit) = crate::vmm_area::user_guard_bit(p.linear);
            let select = (GUARD_BIT_SELECT + 256 * bit.trailing_zeros()) as i32;
            x86!(self.asm
                ; gs movzx ecx, BYTE [byte as i32]
                ; gs movzx ecx, BYTE [ecx + select]
            );
            clear.push(self.short_jump(JECXZ));
        }
        self.reload_ecx();
        let live = self.short_jump(0xEB);
        for f in clear {
            self.bind(f);
        }
        self.reload_ecx();
        self.at(eip);
        self.callout(CalloutKind::UserPage, eip, eip, &Instruction::default(), false);
        self.bind(live);
        self.at(eip);
    }

    /// The block-entry poll where the guest's arithmetic flags are dead
    /// (`classify::arith_flags_dead_at_entry`): `cmp gs:[poll], 0` and a
    /// `jne` to an out-of-line callout, with no register touched. The ECX
    /// spill of [`Emitter::poll_check`] put a store/reload pair on any loop
    /// whose counter is ECX (kernel_compute_ratio 0.65 -> 0.98 here).
    fn flag_poll(&mut self, eip: u32) {
        self.at(eip);
        x86!(self.asm; gs cmp DWORD [POLL], 0);
        self.asm.extend([0x0F, 0x85]);
        let field = self.off();
        self.asm.extend([0u8; 4]);
        self.pending_poll = Some((field, self.off()));
    }

    /// Stores ECX as the lookup target and jumps through the table:
    /// `jmp gs:[table + (target & 0xffff) * 4]`. ECX stays spilled;
    /// the entry prologue reloads it.
    fn dispatch(&mut self, eip: u32) {
        self.dispatch_to(eip, self.ctx.lookup_table);
    }

    /// [`Emitter::dispatch`] through lookup table `table` (an inline
    /// privilege transition goes to the other CPL's table).
    fn dispatch_to(&mut self, eip: u32, table: u32) {
        self.mark(eip, true, false, false);
        let table = table as i32;
        x86!(self.asm
            ; gs mov DWORD [CALLOUT_TARGET], ecx
            ; movzx ecx, cx
            ; gs jmp DWORD [ecx * 4 + table]
        );
    }

    fn op(&mut self, op: &Op, eip: u32, next: u32, instr: &Instruction) {
        match op {
            Op::Copy { bytes, gs } => self.copy(bytes, *gs, eip, next),
            Op::Callout { kind, resume } => {
                self.at(eip);
                self.callout(*kind, eip, next, instr, *resume);
                if *resume {
                    self.at(next);
                }
            }
            Op::Jmp { target } | Op::FallThrough { target } => {
                self.at(*target);
                let n = self.insns_done + 1;
                self.exit_jump(&[0xE9], *target, n);
            }
            Op::Jcc { cc, target, fallthrough } => {
                self.at(eip);
                let n = self.insns_done + 1;
                self.exit_jump(&[0x0F, 0x80 | cc], *target, n);
                self.at(*fallthrough);
                self.exit_jump(&[0xE9], *fallthrough, n);
            }
            Op::Loop { kind, cx, target, fallthrough } => self.loop_op(*kind, *cx, *target, *fallthrough, eip),
            Op::Call { ret_eip, op16, target } => {
                self.at(eip);
                self.push_imm(*ret_eip, *op16);
                self.at(*target);
                let n = self.insns_done + 1;
                self.exit_jump(&[0xE9], *target, n);
            }
            Op::Ret { op16, imm, ss32 } => self.ret(*op16, *imm, *ss32, eip),
            Op::IndirectJmp { load, op16, gs } => {
                self.at(eip);
                self.spill_ecx();
                self.mark(eip, true, false, true);
                self.load_target(load, *gs, eip);
                if *op16 {
                    x86!(self.asm; movzx ecx, cx);
                }
                self.dispatch(eip);
            }
            Op::IndirectCall { load, op16, ret_eip, gs } => {
                self.at(eip);
                self.spill_ecx();
                self.mark(eip, true, false, true);
                self.load_target(load, *gs, eip);
                self.push_imm(*ret_eip, *op16);
                if *op16 {
                    x86!(self.asm; movzx ecx, cx);
                }
                self.dispatch(eip);
            }
            Op::SetVif(v) => {
                self.at(eip);
                let v = *v as i32;
                x86!(self.asm; gs mov DWORD [VIF], v);
                self.at(next);
            }
            Op::DivCheck { load, inline } => self.div_check(load, *inline, eip, next, instr),
            Op::LoadSeg { sreg, load, pop, kind } => self.load_seg(*sreg, load, *pop, *kind, eip, next, instr),
            Op::Verw { load } => self.verw(load, eip, next, instr),
            Op::IntGate { vector } => {
                let kind = CalloutKind::ControlFlow(crate::classify::Flow::Int);
                self.int_gate(GATE_CACHE + 8 * u32::from(*vector), 8 * i32::from(*vector), next, eip, next, instr, kind)
            }
            Op::Iret => self.iret(eip, next, instr),
            Op::PortRead { port } => self.port_read(*port, eip, next, instr),
            Op::Invlpg { load, sreg } => self.invlpg(load, *sreg, eip, next, instr),
            Op::Pushf => self.pushf(eip, next),
            Op::Popf => self.popf(eip, next),
            Op::IrqCheck { check_vif } => {
                // After the instruction it belongs to (STI's successor, POPF).
                let retired = self.insns_done + 1;
                self.poll_check(next, Some(IRQ_PENDING), check_vif.then_some(()), None, retired)
            }
        }
    }

    /// `mov [spill], ecx; <load divisor into ecx>; jecxz zero; reload ecx;
    /// jmp over; zero: reload ecx; callout DivideError; over:` -- the guest
    /// state at the callout is the DIV's own (flags untouched).
    fn div_check(&mut self, load: &[u8], inline: bool, eip: u32, next: u32, instr: &Instruction) {
        self.at(eip);
        self.spill_ecx();
        self.mark(eip, true, false, true);
        self.asm.extend(load.iter());
        let zero = self.short_jump(JECXZ);
        self.reload_ecx();
        self.at(eip);
        if inline {
            // The delivery is longer than a rel8 reaches: a near jump over.
            self.asm.extend([0xE9, 0, 0, 0, 0]);
            let over = NearFixup(self.off());
            self.bind(zero);
            self.mark(eip, true, false, true);
            self.reload_ecx();
            self.at(eip);
            // #DE through its gate, returning to the DIV itself.
            self.int_gate(EXC_GATE_CACHE, 0, eip, eip, next, instr, CalloutKind::DivideError);
            self.bind_near(over);
        } else {
            let over = self.short_jump(0xEB);
            self.bind(zero);
            self.mark(eip, true, false, true);
            self.reload_ecx();
            self.at(eip);
            self.callout(CalloutKind::DivideError, eip, next, instr, false);
            self.bind(over);
        }
        self.at(eip);
    }

    /// `in al` of a cached port (`vmm_area::PORT_CACHE`), flag-free:
    ///
    /// ```text
    ///       mov [spill], ecx
    ///       (dx form: movzx ecx, dx; lea ecx, [ecx - port0]; jecxz slot0;
    ///                 lea ecx, [ecx - (port1 - port0)]; jecxz slot1; jmp miss)
    /// slotN: mov ecx, [valid N]; jecxz miss; mov al, [value N]
    ///       reload ecx; jmp done
    /// miss: reload ecx; callout IN (resumes at done)
    /// done:
    /// ```
    fn port_read(&mut self, port: Option<u16>, eip: u32, next: u32, instr: &Instruction) {
        self.at(eip);
        self.spill_ecx();
        self.mark(eip, true, false, true);
        let mut misses = Vec::new();
        let mut slots = Vec::new();
        match port {
            None => {
                x86!(self.asm; movzx ecx, dx);
                let mut base = 0i32;
                for (slot, &p) in CACHED_PORTS.iter().enumerate() {
                    let delta = i32::from(p) - base;
                    base = i32::from(p);
                    x86!(self.asm; lea ecx, [ecx - delta]);
                    let hit = self.short_jump(JECXZ);
                    slots.push((slot, Some(hit)));
                }
                misses.push(self.short_jump(0xEB));
            }
            Some(p) => {
                let slot = CACHED_PORTS.iter().position(|&c| c == p).expect("a cached port");
                slots.push((slot, None));
            }
        }
        let mut done = Vec::new();
        for (slot, hit) in slots {
            if let Some(hit) = hit {
                self.bind(hit);
            }
            let valid = (PORT_CACHE + 8 * slot as u32) as i32;
            x86!(self.asm; gs mov ecx, DWORD [valid]);
            misses.push(self.short_jump(JECXZ));
            x86!(self.asm; gs mov al, BYTE [valid + 4]);
            self.mark(next, true, false, false);
            self.reload_ecx();
            self.at(next);
            done.push(self.short_jump(0xEB));
        }
        for m in misses {
            self.bind(m);
        }
        self.mark(eip, true, false, true);
        self.reload_ecx();
        self.at(eip);
        self.callout(CalloutKind::Sensitive(crate::classify::Sensitive::In), eip, next, instr, true);
        for d in done {
            self.bind(d);
        }
        self.at(next);
    }

    /// INVLPG through the filter (`vmm_area::INVLPG_FILTER`):
    ///
    /// ```text
    ///       mov [spill], ecx; lea ecx, <operand>         (effective address)
    ///       save eax, edx, ebx; lahf; seto al; save eax (flags free from here)
    ///       mov eax, <sreg>; sub eax, 0x27               (host selector - first shadow)
    ///       test eax, ~0x7E8; jnz miss                   (not a GDT shadow slot < 64)
    ///       and eax, ~8                                   (the index's cache entry)
    ///       cmp byte [SEG_CACHE + eax + SEG_BASE_ZERO], 0; je miss
    ///       edx = ecx >> 15; ecx = (ecx >> 12) & 7
    ///       movzx eax, byte [INVLPG_FILTER + edx]; bt eax, ecx; jc miss
    ///       restore; jmp done                             (nothing to invalidate)
    /// miss: restore; callout INVLPG
    /// done:
    /// ```
    ///
    /// The segment test reads the host register, not the guest selector:
    /// its hidden base is that of the slot it was loaded from, and the
    /// monitor rewrites a slot's cache entry with the slot. Nothing after
    /// the LEA can fault (GS-relative reads of the VMM area).
    fn invlpg(&mut self, load: &[u8], sreg: u8, eip: u32, next: u32, instr: &Instruction) {
        self.load_ecx_and_save(load, eip);
        // mov eax, Sreg (8C /r, mod 11, reg = sreg, rm = EAX).
        self.asm.extend([0x8C, 0xC0 | (sreg << 3)]);
        let slots = (SEG_CACHE_ENTRIES * SEG_CACHE_ENTRY - SEG_CACHE_ENTRY) as i32 | i32::from(SHADOW_USER_BIT);
        x86!(self.asm
            ; sub eax, 0x27
            ; test eax, !slots
        );
        let mut misses = vec![self.near_jcc(0x5)]; // jnz
        let user_bit = !i32::from(SHADOW_USER_BIT);
        x86!(self.asm
            ; and eax, user_bit
            ; gs cmp BYTE [eax + SEG_ENTRY_BASE_ZERO], 0
        );
        misses.push(self.near_jcc(0x4)); // je
        x86!(self.asm
            ; mov edx, ecx
            ; shr edx, 15
            ; shr ecx, 12
            ; and ecx, 7
            ; gs movzx eax, BYTE [edx + FILTER]
            ; bt eax, ecx
        );
        misses.push(self.near_jcc(0x2)); // jc (jb)
        self.seg_cache_tails(misses, CalloutKind::Sensitive(crate::classify::Sensitive::Invlpg), eip, next, instr);
    }

    /// MOV/POP Sreg through the segment cache (`vmm_area::SEG_CACHE`):
    ///
    /// ```text
    ///       mov [spill], ecx; movzx ecx, <selector>     (the only guest access)
    ///       save eax, edx, ebx; lahf; seto al; save eax (flags free from here)
    ///       cmp ecx, 4; jb null                          (edx = 0: host null)
    ///       cmp ecx, [gdt_live_end]; jae miss           (beyond the cached GDT)
    ///       test cl, 4; jnz miss                         (LDT selector)
    ///       edx = ecx & ~7; eax = ecx & 3
    ///       cmp byte [rpl_ok + edx*2 + eax], 0; je miss  (checks fail at this RPL)
    ///       ebx = [gdt_live]; compare [ebx + edx] (8 bytes) with [cache + edx*2]
    ///       jne miss                                     (the GDT changed)
    ///       edx = 4 (ecx & ~7) + 0x27 (the host shadow selector)
    /// null: guest_sel[sreg] = ecx; Sreg = edx; seg_loaded |= bit
    ///       (pop: lea esp, [esp + n]); restore; jmp done
    /// miss: restore; callout (the instruction's own)
    /// done:
    /// ```
    ///
    /// After the selector read nothing can fault (GS-relative reads of the
    /// monitor's tables, and a shadow slot the monitor wrote), so that
    /// stretch is marked inexact: a kick there resumes in place.
    #[allow(clippy::too_many_arguments)]
    fn load_seg(
        &mut self,
        sreg: u8,
        load: &[u8],
        pop: u8,
        kind: CalloutKind,
        eip: u32,
        next: u32,
        instr: &Instruction,
    ) {
        let (null, misses) = self.seg_cache_probe(load, SEG_RPL_OK, true, eip);
        // Whether it survives an IRET to CPL 3 (the entry's byte; a null
        // selector does).
        x86!(self.asm
            ; gs movzx eax, BYTE [edx * 4 + SEG_ENTRY_USER_OK]
            // The kernel shadow slot: 4 (selector & ~7) + 0x27.
            ; lea edx, [ecx * 4]
            ; and edx, !0x1F
            ; lea edx, [edx + 0x27]
        );
        let join = self.short_jump(0xEB);
        if let Some(null) = null {
            self.bind(null);
        }
        x86!(self.asm; mov eax, 1);
        self.bind(join);
        let user_ok = PAGE_SEG_USER_OK + i32::from(sreg);
        x86!(self.asm; gs mov BYTE [user_ok], al);
        let sel_slot = GUEST_SEL + 4 * i32::from(sreg);
        let bit = 1i32 << sreg;
        x86!(self.asm; gs mov DWORD [sel_slot], ecx);
        if sreg == 5 {
            // GS stays the VMM's; GS-prefixed guest instructions load this.
            x86!(self.asm; gs mov WORD [GUEST_GS_SEL], dx);
        } else {
            // mov Sreg, edx (8E /r, mod 11, reg = sreg, rm = EDX).
            self.asm.extend([0x8E, 0xC2 | (sreg << 3)]);
        }
        x86!(self.asm; gs or DWORD [SEG_LOADED], bit);
        if pop != 0 {
            let n = i32::from(pop);
            x86!(self.asm; lea esp, [esp + n]);
        }
        self.seg_cache_tails(misses, kind, eip, next, instr);
    }

    /// VERW through the segment cache: the probe of [`Emitter::load_seg`]
    /// with the VERW bytes of the entry; a hit sets ZF in the saved flags
    /// (a writable data segment at this RPL), anything else is the callout.
    fn verw(&mut self, load: &[u8], eip: u32, next: u32, instr: &Instruction) {
        let (_, misses) = self.seg_cache_probe(load, SEG_VERW_OK, false, eip);
        x86!(self.asm; gs or BYTE [SPILL_FLAGS + 1], 0x40);
        self.seg_cache_tails(misses, CalloutKind::Sensitive(crate::classify::Sensitive::Verw), eip, next, instr);
    }

    /// The common head of the segment-cache sequences: the selector in ECX,
    /// EAX/EDX/EBX and the flags saved, the entry checked at `ok` (the
    /// entry's byte per RPL) and against the live GDT. Returns the jump
    /// taken for a null selector (`null_ok`; else nulls miss) and the
    /// jumps to the miss path.
    fn seg_cache_probe(
        &mut self,
        load: &[u8],
        ok: i32,
        null_ok: bool,
        eip: u32,
    ) -> (Option<ShortFixup>, Vec<NearFixup>) {
        self.load_ecx_and_save(load, eip);
        x86!(self.asm; cmp ecx, 4);
        let mut misses = Vec::new();
        let null = if null_ok {
            // A null selector (exits to user code reload null FS): host null.
            let not_null = self.short_jump(0x73); // jae
            x86!(self.asm; xor edx, edx);
            let null = self.short_jump(0xEB);
            self.bind(not_null);
            Some(null)
        } else {
            misses.push(self.near_jcc(0x2)); // jb
            None
        };
        // The miss path is further than a rel8 away: near Jcc (0F 8x).
        x86!(self.asm; gs cmp ecx, DWORD [GDT_LIVE_END]);
        misses.push(self.near_jcc(0x3)); // jae
        x86!(self.asm; test cl, 4);
        misses.push(self.near_jcc(0x5)); // jnz
        x86!(self.asm
            ; mov edx, ecx
            ; and edx, 0xFFF8
            ; mov eax, ecx
            ; and eax, 3
            ; gs cmp BYTE [eax + edx * 4 + ok], 0
        );
        misses.push(self.near_jcc(0x4)); // je
        x86!(self.asm
            ; gs mov ebx, DWORD [GDT_LIVE]
            ; gs mov eax, DWORD [ebx + edx]
            ; gs cmp eax, DWORD [edx * 4 + SEG_DESC]
        );
        misses.push(self.near_jcc(0x5)); // jne
        x86!(self.asm
            ; gs mov eax, DWORD [ebx + edx + 4]
            ; gs cmp eax, DWORD [edx * 4 + SEG_DESC + 4]
        );
        misses.push(self.near_jcc(0x5)); // jne
        (null, misses)
    }

    /// The common tail: restore and go on after a hit; restore and take
    /// the instruction's callout after a miss.
    fn seg_cache_tails(&mut self, misses: Vec<NearFixup>, kind: CalloutKind, eip: u32, next: u32, instr: &Instruction) {
        self.mark(next, true, false, false);
        self.restore_after_load_seg();
        self.at(next);
        let done = self.short_jump(0xEB);
        for m in misses {
            self.bind_near(m);
        }
        self.mark(eip, true, false, false);
        self.restore_after_load_seg();
        self.at(eip);
        self.callout(kind, eip, next, instr, true);
        self.bind(done);
        self.at(next);
    }

    /// The head of the checked sequences: ECX spilled, `load` (the only
    /// guest access, exact) puts the operand in ECX, then EAX, EDX, EBX
    /// and the flags are saved (nothing after this can fault: inexact).
    fn load_ecx_and_save(&mut self, load: &[u8], eip: u32) {
        self.at(eip);
        self.spill_ecx();
        self.mark(eip, true, false, true);
        self.asm.extend(load.iter());
        self.mark(eip, true, false, false);
        self.save_for_checks();
    }

    /// The registers and flags [`Emitter::load_seg`] saved, back.
    fn restore_after_load_seg(&mut self) {
        self.restore_saved();
        self.reload_ecx();
    }

    /// Saves EAX, EDX, EBX and the arithmetic flags (`LAHF; SETO AL`) in
    /// their spill slots: the checks that follow may clobber all of them.
    /// ECX must be spilled already.
    fn save_for_checks(&mut self) {
        x86!(self.asm
            ; gs mov DWORD [SPILL_EAX], eax
            ; lahf
            ; seto al
            ; gs mov DWORD [SPILL_FLAGS], eax
            ; gs mov DWORD [SPILL_EDX], edx
            ; gs mov DWORD [SPILL_EBX], ebx
        );
    }

    /// What [`Emitter::save_for_checks`] saved, back (`ADD AL, 0x7F` turns
    /// the saved OF byte back into OF before SAHF).
    fn restore_saved(&mut self) {
        x86!(self.asm
            ; gs mov ebx, DWORD [SPILL_EBX]
            ; gs mov edx, DWORD [SPILL_EDX]
            ; gs mov eax, DWORD [SPILL_FLAGS]
            ; add al, 0x7f
            ; sahf
            ; gs mov eax, DWORD [SPILL_EAX]
        );
    }

    /// `mov Sreg, gs:[off]` (raw: 65 8E /r with a disp32; `sreg` in the
    /// ModRM reg field), flag-free.
    fn load_sreg_from_page(&mut self, sreg: u8, off: i32) {
        self.asm.extend([0x65, 0x8E, 0x05 | (sreg << 3)]);
        self.asm.extend(off.to_le_bytes());
    }

    /// `push dword gs:[off]` (65 FF 35 disp32).
    fn push_from_page(&mut self, off: i32) {
        self.asm.extend([0x65, 0xFF, 0x35]);
        self.asm.extend(off.to_le_bytes());
    }

    /// Compares the live GDT entry at byte offset `gs:[off_slot]` (the
    /// transition page's) with the descriptor at `gs:[desc]`; pushes the
    /// jumps taken when they differ. Clobbers EBX, ECX and the flags.
    fn live_gdt_equals(&mut self, off_slot: u32, desc: u32, misses: &mut Vec<NearFixup>) {
        let (off_slot, desc) = (off_slot as i32, desc as i32);
        x86!(self.asm
            ; gs mov ebx, DWORD [GDT_LIVE]
            ; gs add ebx, DWORD [off_slot]
            ; gs mov ecx, DWORD [ebx]
            ; gs cmp ecx, DWORD [desc]
        );
        misses.push(self.near_jcc(0x5)); // jne
        x86!(self.asm
            ; gs mov ecx, DWORD [ebx + 4]
            ; gs cmp ecx, DWORD [desc + 4]
        );
        misses.push(self.near_jcc(0x5)); // jne
    }

    /// INT n from CPL 3 (docs/translator.md, "Inline privilege
    /// transitions"). Checks, with the flags saved: the transition page
    /// allows it, the live IDT gate equals the validated one in the gate
    /// cache, the live GDT still holds the kernel CS and SS the page names,
    /// the live TSS still says that SS. Then, with the guest's flags back:
    /// switch to SS0:ESP0 and push SS, ESP, EFLAGS (PUSHFD: at CPL 3 the
    /// host's IF and IOPL are the guest's), CS and the return EIP. A fault
    /// there is not the guest's INT (`fallback`). Then commit: DS, ES, FS
    /// and the guest GS to their kernel slots, IF per the gate type, the
    /// new CS and SS in the vCPU page, and a jump through the CPL 0 lookup
    /// table to the handler. Anything unusual: the INT's own callout.
    ///
    /// `gate`: the gate cache entry to check (INT n's, or an exception's);
    /// `idt_off`: its IDT entry's offset; `ret`: the EIP the frame returns
    /// to (the next instruction for INT n, the faulting one for an
    /// exception); `miss`: the callout that performs it otherwise.
    #[allow(clippy::too_many_arguments)]
    fn int_gate(
        &mut self,
        gate: u32,
        idt_off: i32,
        ret: u32,
        eip: u32,
        next: u32,
        instr: &Instruction,
        miss: CalloutKind,
    ) {
        let gate = gate as i32;
        let mut misses = Vec::new();
        self.at(eip);
        self.spill_ecx();
        self.mark(eip, true, false, true);
        // The guest's whole EFLAGS, by PUSHFD on the VMM stack (SS the VMM
        // data selector): the frame's image is built from it.
        x86!(self.asm; gs mov DWORD [SPILL_ESP], esp);
        self.asm.extend([0x8C, 0xD1]); // mov ecx, ss
        x86!(self.asm; gs mov DWORD [SAVE_SS], ecx);
        self.asm.extend([0x8C, 0xE9]); // mov ecx, gs
        self.esp_saved = true;
        self.mark(eip, true, false, true);
        let top = VMM_STACK_TOP as i32;
        self.asm.extend([0x8E, 0xD1]); // mov ss, ecx
        x86!(self.asm
            ; mov esp, top
            ; pushf
            ; gs mov ecx, DWORD [SAVE_SS]
        );
        self.asm.extend([0x8E, 0xD1]); // mov ss, ecx
        x86!(self.asm; gs mov esp, DWORD [SPILL_ESP]);
        self.esp_saved = false;
        self.mark(eip, true, false, true);
        self.save_for_checks();
        self.mark(eip, true, false, false);
        self.miss_unless_allowed(trans::INT_OK, &mut misses);
        x86!(self.asm
            ; gs mov eax, DWORD [gate]
            ; gs mov edx, DWORD [gate + 4]
            ; test edx, edx
        );
        misses.push(self.near_jcc(0x4)); // je: no validated gate
        x86!(self.asm
            ; gs mov ebx, DWORD [trans::IDT_LIVE as i32]
            ; gs cmp eax, DWORD [ebx + idt_off]
        );
        misses.push(self.near_jcc(0x5));
        x86!(self.asm; gs cmp edx, DWORD [ebx + idt_off + 4]);
        misses.push(self.near_jcc(0x5));
        self.live_gdt_equals(trans::INT_CS_OFF, trans::INT_CS_DESC, &mut misses);
        x86!(self.asm
            ; gs mov ebx, DWORD [trans::TSS_LIVE as i32]
            ; gs movzx ecx, WORD [ebx + 4]
            ; gs cmp ecx, DWORD [trans::INT_SS_SEL as i32]
        );
        misses.push(self.near_jcc(0x5));
        x86!(self.asm
            ; gs mov ecx, DWORD [ebx]
            ; gs mov DWORD [FRAME], ecx
        );
        self.live_gdt_equals(trans::INT_SS_OFF, trans::INT_SS_DESC, &mut misses);
        // The handler's EIP and whether the gate keeps IF (a trap gate).
        x86!(self.asm
            ; and eax, 0xFFFF
            ; mov ecx, edx
            ; and ecx, 0xFFFF_0000u32 as i32
            ; or eax, ecx
            ; gs mov DWORD [FRAME + 4], eax
            ; and edx, 0x100
            ; gs mov DWORD [FRAME + 8], edx
            // The EFLAGS image: the guest's flags with the virtual IF.
            ; gs mov ecx, DWORD [top - 4]
            ; and ecx, !IF_MASK
            ; gs or ecx, DWORD [trans::USER_IF as i32]
            ; gs mov DWORD [FRAME + 12], ecx
        );
        // DS, ES, FS and the guest GS go to their kernel slots.
        for (i, sreg) in [3u8, 0, 4].into_iter().enumerate() {
            // mov ecx, Sreg (8C /r)
            self.asm.extend([0x8C, 0xC1 | (sreg << 3)]);
            let slot = NEW_SELS + 4 * i as i32;
            x86!(self.asm
                ; and ecx, !USER_SLOT_BIT
                ; gs mov DWORD [slot], ecx
            );
        }
        x86!(self.asm
            ; gs movzx ecx, WORD [GUEST_GS_SEL]
            ; and ecx, !USER_SLOT_BIT
            ; gs mov DWORD [NEW_SELS + 12], ecx
        );
        // The frame, with the guest's registers and flags back.
        self.restore_saved();
        x86!(self.asm; gs mov DWORD [SPILL_ESP], esp);
        self.fallback = true;
        self.esp_saved = true;
        self.mark(eip, true, false, true);
        x86!(self.asm; gs mov ecx, DWORD [trans::INT_SS_HOST as i32]);
        self.asm.extend([0x8E, 0xD1]); // mov ss, ecx
        x86!(self.asm; gs mov esp, DWORD [FRAME]);
        self.push_from_page(GUEST_SEL + 8);
        self.push_from_page(SPILL_ESP);
        self.push_from_page(FRAME + 12);
        self.push_from_page(GUEST_SEL + 4);
        self.push_imm(ret, false);
        self.fallback = false;
        self.esp_saved = false;
        // Committed: nothing below can fault.
        self.mark(eip, true, false, false);
        for (i, sreg) in [3u8, 0, 4].into_iter().enumerate() {
            self.load_sreg_from_page(sreg, NEW_SELS + 4 * i as i32);
        }
        x86!(self.asm
            ; gs mov ecx, DWORD [NEW_SELS + 12]
            ; gs mov WORD [GUEST_GS_SEL], cx
            ; gs mov ecx, DWORD [FRAME + 8]
        );
        let interrupt_gate = self.short_jump(JECXZ);
        x86!(self.asm; gs mov DWORD [VIF], IF_MASK);
        let done = self.short_jump(0xEB);
        self.bind(interrupt_gate);
        x86!(self.asm; gs mov DWORD [VIF], 0);
        self.bind(done);
        x86!(self.asm
            ; gs mov DWORD [VIOPL], 0
            ; gs mov ecx, DWORD [trans::INT_CS_SEL as i32]
            ; gs mov DWORD [GUEST_SEL + 4], ecx
            ; gs mov ecx, DWORD [trans::INT_SS_SEL as i32]
            ; gs mov DWORD [GUEST_SEL + 8], ecx
            ; gs mov DWORD [TRANSITION], transition::TO_KERNEL as i32
            ; gs mov ecx, DWORD [INLINE_ENTRIES]
            ; lea ecx, [ecx + 1]
            ; gs mov DWORD [INLINE_ENTRIES], ecx
            ; gs mov ecx, DWORD [FRAME + 4]
        );
        self.dispatch_to(eip, LOOKUP_TABLE);
        self.transition_miss(misses, eip, next, instr, miss);
    }

    /// IRETD from CPL 0 to CPL 3. Reads the five-dword frame (a fault there
    /// is not necessarily the guest's: an IRET to CPL 0 reads three,
    /// `fallback`), then checks with the flags saved: the transition page
    /// allows it (the address space's user code runs translated, no
    /// prefault waits for this IRET), CS and SS are the user ones the page
    /// names and the live GDT still holds them, the new EFLAGS have IF set
    /// and TF, IOPL, NT and VM clear, no interrupt is pending, and every
    /// data segment survives the privilege change. Then commit: DS, ES, FS
    /// and the guest GS to their user slots, IF 1 and IOPL 0, the user CS
    /// and SS in the vCPU page, the new flags by POPFD from the frame, the
    /// user SS:ESP, and a jump through the CPL 3 lookup table.
    fn iret(&mut self, eip: u32, next: u32, instr: &Instruction) {
        let mut misses = Vec::new();
        self.at(eip);
        self.spill_ecx();
        self.fallback = true;
        self.mark(eip, true, false, true);
        for k in 0..5i32 {
            let (at, slot) = (4 * k, FRAME + 4 * k);
            x86!(self.asm
                ; mov ecx, DWORD [esp + at]
                ; gs mov DWORD [slot], ecx
            );
        }
        self.fallback = false;
        self.mark(eip, true, false, true);
        self.save_for_checks();
        self.mark(eip, true, false, false);
        // NT set now: a task return, the callout's.
        x86!(self.asm; gs test DWORD [VIOPL], NT_MASK);
        misses.push(self.near_jcc(0x5));
        // RPL 0: a return within the kernel (from an interrupt or an
        // exception taken in kernel code, or Linux's IRET to itself).
        x86!(self.asm
            ; gs movzx ecx, BYTE [FRAME + 4]
            ; test cl, 3
        );
        let to_user = self.near_jcc(0x5); // jnz
        self.iret_to_kernel(eip, &mut misses);
        self.bind_near(to_user);
        self.miss_unless_allowed(trans::IRET_OK, &mut misses);
        self.miss_unless_frame_selector(4, trans::USER_CS_SEL, &mut misses);
        self.miss_unless_frame_selector(16, trans::USER_SS_SEL, &mut misses);
        self.live_gdt_equals(trans::USER_CS_OFF, trans::USER_CS_DESC, &mut misses);
        self.live_gdt_equals(trans::USER_SS_OFF, trans::USER_SS_DESC, &mut misses);
        x86!(self.asm
            ; gs mov ecx, DWORD [FRAME + 8]
            ; and ecx, IRET_FLAGS_CHECKED
            ; gs cmp ecx, DWORD [trans::USER_IF as i32]
        );
        misses.push(self.near_jcc(0x5));
        // With IF set, a pending interrupt is the callout's to deliver.
        x86!(self.asm
            ; gs mov ecx, DWORD [IRQ_PENDING]
            ; gs and ecx, DWORD [trans::USER_IF as i32]
        );
        misses.push(self.near_jcc(0x5));
        x86!(self.asm; gs cmp DWORD [PAGE_SEG_USER_OK], 0x0101_0101);
        misses.push(self.near_jcc(0x5));
        x86!(self.asm; gs cmp WORD [PAGE_SEG_USER_OK + 4], 0x0101);
        misses.push(self.near_jcc(0x5));
        for (i, sreg) in [3u8, 0, 4].into_iter().enumerate() {
            self.asm.extend([0x8C, 0xC1 | (sreg << 3)]);
            let null = self.short_jump(JECXZ);
            x86!(self.asm; or ecx, USER_SLOT_BIT);
            self.bind(null);
            let slot = NEW_SELS + 4 * i as i32;
            x86!(self.asm; gs mov DWORD [slot], ecx);
        }
        x86!(self.asm; gs movzx ecx, WORD [GUEST_GS_SEL]);
        let null = self.short_jump(JECXZ);
        x86!(self.asm; or ecx, USER_SLOT_BIT);
        self.bind(null);
        x86!(self.asm
            ; gs mov DWORD [NEW_SELS + 12], ecx
            ; gs mov ebx, DWORD [SPILL_EBX]
            ; gs mov edx, DWORD [SPILL_EDX]
            ; gs mov eax, DWORD [SPILL_EAX]
        );
        for (i, sreg) in [3u8, 0, 4].into_iter().enumerate() {
            self.load_sreg_from_page(sreg, NEW_SELS + 4 * i as i32);
        }
        x86!(self.asm
            ; gs mov ecx, DWORD [NEW_SELS + 12]
            ; gs mov WORD [GUEST_GS_SEL], cx
            ; gs mov ecx, DWORD [trans::USER_IF as i32]
            ; gs mov DWORD [VIF], ecx
            ; gs mov DWORD [VIOPL], 0
            ; gs mov ecx, DWORD [trans::USER_CS_SEL as i32]
            ; gs mov DWORD [GUEST_SEL + 4], ecx
            ; gs mov ecx, DWORD [trans::USER_SS_SEL as i32]
            ; gs mov DWORD [GUEST_SEL + 8], ecx
            ; gs mov DWORD [TRANSITION], transition::TO_USER as i32
            ; lea esp, [esp + 8]
            ; popf
            ; gs mov ecx, DWORD [trans::USER_SS_HOST as i32]
        );
        self.asm.extend([0x8E, 0xD1]); // mov ss, ecx
        x86!(self.asm
            ; gs mov esp, DWORD [FRAME + 12]
            ; gs mov ecx, DWORD [FRAME]
        );
        self.dispatch_to(eip, LOOKUP_TABLE_USER);
        self.transition_miss(misses, eip, next, instr, CalloutKind::ControlFlow(crate::classify::Flow::Iret));
    }

    /// The IRET-to-CPL-0 half of [`Emitter::iret`] (frame in `frame[0..3]`,
    /// registers and flags saved): to the kernel CS of the transition page
    /// from that same CS, new EFLAGS with TF, NT and VM clear, no interrupt
    /// pending when IF becomes set. Virtual IF and IOPL from the frame, the
    /// rest by POPFD, ESP past the three dwords, through the CPL 0 table.
    fn iret_to_kernel(&mut self, eip: u32, misses: &mut Vec<NearFixup>) {
        self.miss_unless_allowed(trans::KIRET_OK, misses);
        self.miss_unless_frame_selector(4, trans::INT_CS_SEL, misses);
        x86!(self.asm; gs cmp DWORD [GUEST_SEL + 4], ecx);
        misses.push(self.near_jcc(0x5));
        self.live_gdt_equals(trans::INT_CS_OFF, trans::INT_CS_DESC, misses);
        x86!(self.asm
            ; gs mov ecx, DWORD [FRAME + 8]
            ; test ecx, 0x2_4100
        );
        misses.push(self.near_jcc(0x5)); // TF, NT or VM
        x86!(self.asm; test ecx, IF_MASK);
        let masked = self.short_jump(0x74); // jz
        x86!(self.asm; gs cmp DWORD [IRQ_PENDING], 0);
        misses.push(self.near_jcc(0x5));
        self.bind(masked);
        x86!(self.asm
            ; and ecx, IF_MASK
            ; gs mov DWORD [VIF], ecx
            ; gs mov ecx, DWORD [FRAME + 8]
            ; and ecx, IOPL_MASK
            ; gs mov DWORD [VIOPL], ecx
            ; gs mov ebx, DWORD [SPILL_EBX]
            ; gs mov edx, DWORD [SPILL_EDX]
            ; gs mov eax, DWORD [SPILL_EAX]
            ; lea esp, [esp + 8]
            ; popf
            ; gs mov ecx, DWORD [FRAME]
        );
        self.dispatch_to(eip, LOOKUP_TABLE);
    }

    /// A miss unless the transition page's enable word at `word` is set.
    fn miss_unless_allowed(&mut self, word: u32, misses: &mut Vec<NearFixup>) {
        let word = word as i32;
        x86!(self.asm; gs cmp DWORD [word], 0);
        misses.push(self.near_jcc(0x4)); // je
    }

    /// A miss unless the selector at `frame[off]` (its low 16 bits, left
    /// in ECX) is the transition page's selector at `sel`.
    fn miss_unless_frame_selector(&mut self, off: i32, sel: u32, misses: &mut Vec<NearFixup>) {
        let sel = sel as i32;
        x86!(self.asm
            ; gs movzx ecx, WORD [FRAME + off]
            ; gs cmp ecx, DWORD [sel]
        );
        misses.push(self.near_jcc(0x5)); // jne
    }

    /// The miss path of an inline transition: registers and flags back,
    /// then the instruction's own callout.
    fn transition_miss(&mut self, misses: Vec<NearFixup>, eip: u32, next: u32, instr: &Instruction, kind: CalloutKind) {
        for m in misses {
            self.bind_near(m);
        }
        self.mark(eip, true, false, false);
        self.restore_saved();
        self.reload_ecx();
        self.at(eip);
        self.callout(kind, eip, next, instr, false);
    }

    /// An indirect branch's target load (ECX spilled), with the guest's GS
    /// around it when its operand is GS-relative.
    fn load_target(&mut self, load: &[u8], gs: bool, eip: u32) {
        if !gs {
            self.asm.extend(load.iter());
            return;
        }
        load_gs(&mut self.asm, self.ctx.vmm_base + vcpu::GUEST_GS_SEL);
        self.mark(eip, true, true, true);
        self.asm.extend(load.iter());
        load_gs(&mut self.asm, self.ctx.vmm_base + vcpu::VMM_GS_SEL);
        self.mark(eip, true, false, true);
    }

    fn copy(&mut self, bytes: &[u8], gs: bool, eip: u32, next: u32) {
        self.at(eip);
        if !gs {
            self.asm.extend(bytes.iter());
            return;
        }
        // mov gs, cs:[guest_gs_sel]; instr; mov gs, cs:[vmm_gs_sel]
        let guest_sel = self.ctx.vmm_base + vcpu::GUEST_GS_SEL;
        let vmm_sel = self.ctx.vmm_base + vcpu::VMM_GS_SEL;
        load_gs(&mut self.asm, guest_sel);
        self.mark(eip, false, true, true);
        self.asm.extend(bytes.iter());
        self.mark(next, false, true, true);
        load_gs(&mut self.asm, vmm_sel);
        self.at(next);
    }

    fn push_imm(&mut self, value: u32, op16: bool) {
        if op16 {
            // `push imm16` (66 68 iw): dynasm encodes WORD pushes with an imm32.
            self.asm.extend([0x66, 0x68]);
            self.asm.extend((value as u16).to_le_bytes());
        } else {
            let v = value as i32;
            x86!(self.asm; push DWORD v);
        }
    }

    fn loop_op(&mut self, kind: LoopKind, cx: bool, target: u32, fallthrough: u32, eip: u32) {
        self.at(eip);
        if cx {
            self.asm.push(0x67); // address-size prefix: the counter is CX
        }
        // The instruction itself, with its counter and flags semantics,
        // jumping over the fall-through exit to the taken exit.
        let opcode = match kind {
            LoopKind::Loop => LOOP,
            LoopKind::Loope => LOOPE,
            LoopKind::Loopne => LOOPNE,
            LoopKind::Jcxz => JECXZ,
        };
        let taken = self.short_jump(opcode);
        let n = self.insns_done + 1;
        self.at(fallthrough);
        self.exit_jump(&[0xE9], fallthrough, n);
        self.bind(taken);
        self.at(target);
        self.exit_jump(&[0xE9], target, n);
    }

    /// RET / RET imm16: pop the guest return address into ECX (precise: a
    /// faulting pop changes nothing), release imm16 bytes with LEA, look up.
    fn ret(&mut self, op16: bool, imm: u16, ss32: bool, eip: u32) {
        self.at(eip);
        self.spill_ecx();
        self.mark(eip, true, false, true);
        if op16 {
            x86!(self.asm; pop cx);
        } else {
            x86!(self.asm; pop ecx);
        }
        self.mark(eip, true, false, false);
        if imm != 0 {
            let imm = i32::from(imm);
            if ss32 {
                x86!(self.asm; lea esp, [esp + imm]);
            } else {
                x86!(self.asm; lea sp, [esp + imm]);
            }
        }
        if op16 {
            x86!(self.asm; movzx ecx, cx);
        }
        self.dispatch(eip);
    }

    /// PUSHFD: push the real flags, rewrite IF, IOPL and NT in the pushed
    /// image from the virtual ones, restore the real flags with POPFD.
    fn pushf(&mut self, eip: u32, next: u32) {
        self.at(eip);
        x86!(self.asm; pushf);
        // ESP moved: from here on nothing can fault.
        self.mark(eip, false, false, false);
        self.spill_ecx();
        self.mark(eip, true, false, false);
        let keep = !(IF_MASK | IOPL_MASK | NT_MASK);
        x86!(self.asm
            ; mov ecx, [esp]
            ; and ecx, keep
            ; gs or ecx, DWORD [VIF]
            ; gs or ecx, DWORD [VIOPL]
            ; popf
            ; push ecx
        );
        self.reload_ecx();
        self.at(next);
    }

    /// POPFD: virtual IF, IOPL and NT from the popped image, everything
    /// else into the real flags (host CPL 3 POPF ignores IF and IOPL; NT
    /// reaches the host's flags too, but only the virtual copy is read
    /// back).
    fn popf(&mut self, eip: u32, next: u32) {
        self.at(eip);
        self.spill_ecx();
        self.mark(eip, true, false, true);
        x86!(self.asm; mov ecx, [esp]);
        // The first read succeeded: the rest cannot fault.
        self.mark(eip, true, false, false);
        x86!(self.asm
            ; and ecx, IF_MASK
            ; gs mov DWORD [VIF], ecx
            ; mov ecx, [esp]
            ; and ecx, IOPL_MASK | NT_MASK
            ; gs mov DWORD [VIOPL], ecx
        );
        self.reload_ecx();
        x86!(self.asm; popf);
        self.at(next);
    }

    /// An out-of-line callout stub for guest EIP `eip` (no instruction of
    /// its own): the poll's and each block exit's. Returns its site id.
    fn stub_callout(
        &mut self,
        kind: CalloutKind,
        eip: u32,
        resume_off: Option<u32>,
        insns_before: u32,
        exit: Option<usize>,
    ) -> u32 {
        self.at(eip);
        let id = self.ctx.first_site + self.sites.len() as u32;
        emit_callout(&mut self.asm, id);
        let instruction = Instruction::default();
        self.sites.push(PendingSite {
            id,
            kind,
            guest_eip: eip,
            next_eip: eip,
            instruction,
            resume_off,
            insns_before,
            exit,
        });
        id
    }

    /// Out-of-line exit stubs, then the relocations of the jumps to them.
    fn exit_stubs(&mut self) {
        if let Some((field, resume)) = self.pending_poll.take() {
            let stub = self.off();
            self.stub_callout(CalloutKind::Poll, self.ctx.guest_eip, Some(resume), 0, None);
            let rel = stub.wrapping_sub(field + 4);
            let mut alter = self.asm.alter();
            alter.goto(dynasmrt::AssemblyOffset(field as usize));
            alter.extend(rel.to_le_bytes());
        }
        let pending = std::mem::take(&mut self.pending_exits);
        for (field, target, insns) in pending {
            let stub = self.off();
            let id = self.stub_callout(CalloutKind::BlockExit, target, None, insns, Some(self.exits.len()));
            self.exits.push(ExitReloc {
                field_off: field,
                stub_off: stub,
                target_eip: target,
                site: id,
                insns_before: insns,
            });
        }
        let mut alter = self.asm.alter();
        for x in &self.exits {
            let rel = x.stub_off.wrapping_sub(x.field_off + 4);
            alter.goto(dynasmrt::AssemblyOffset(x.field_off as usize));
            alter.extend(rel.to_le_bytes());
        }
    }
}

impl State {
    fn of(e: &RecoveryEntry) -> State {
        State {
            eip: e.guest_eip,
            spilled: e.ecx_spilled,
            gs: e.gs_is_guest,
            exact: e.exact,
            fallback: e.fallback,
            esp_saved: e.esp_saved,
        }
    }
}

/// `mov gs, cs:[abs]` (2E 8E /5, disp32): dynasm 5.1 encodes the
/// Sreg-from-memory form in the wrong direction, so raw bytes.
fn load_gs(asm: &mut VecAssembler<X86Relocation>, abs: u32) {
    asm.extend([0x2E, 0x8E, 0x2D]);
    asm.extend(abs.to_le_bytes());
}

/// The callout sequence of docs/tc-abi.md. `jmp far m16:32` is not in
/// dynasm's x86 syntax: raw bytes `65 FF 2D disp32` (FF /5, GS prefix).
pub fn emit_callout(asm: &mut VecAssembler<X86Relocation>, id: u32) {
    let id = id as i32;
    x86!(asm; gs mov DWORD [CALLOUT_ID], id);
    asm.extend([0x65, 0xFF, 0x2D]);
    asm.extend(vcpu::EXIT_FAR.to_le_bytes());
}

/// The shared indirect-miss stub: reload ECX, callout `IndirectMiss`.
pub fn emit_miss_stub(tc_addr: u32, id: u32) -> Vec<u8> {
    let mut asm: VecAssembler<X86Relocation> = VecAssembler::new(tc_addr as usize);
    x86!(asm; gs mov ecx, DWORD [SPILL]);
    emit_callout(&mut asm, id);
    asm.finalize().unwrap_or_default()
}
