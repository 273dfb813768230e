//! Inline privilege transitions (docs/translator.md, "Inline privilege
//! transitions"): what the monitor validates so that translated user code
//! enters the guest kernel with INT n, and the kernel returns with IRET,
//! without a callout.
//!
//! The engine's sequences ([`engine::mangle::Op::IntGate`],
//! [`engine::mangle::Op::Iret`]) trust only what this module writes to the
//! transition page and the gate cache, which guest-mode code can read but
//! not write, and the live IDT, GDT and TSS they read through read-only
//! aliases of the guest frames. They note what they did in the vCPU page
//! (`transition`); at the next exit [`BtBackend::sync_transition`] takes
//! the new CS, SS and CPL from this module's own records, never from that
//! page.

use engine::vmm_area::{self as area, transition, vcpu as page};
use engine::KeyContext;

use super::{failed, BackendError, BtBackend};
use crate::cpu::interrupt::read_descriptor;
use crate::cpu::state::flags;
use crate::cpu::{Access, Descriptor, LinearMemory, Seg, SegReg};
use crate::host::VmmAlias;

/// One side of a transition: the code and stack segments it arrives with
/// and the translation context its blocks are keyed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Side {
    cs: SegReg,
    ss: SegReg,
    ctx: KeyContext,
}

impl Side {
    fn new(cs: SegReg, ss: SegReg, cpl: u8) -> Side {
        let flags = if ss.cache.db { engine::key_flags::SS32 } else { 0 };
        Side { cs, ss, ctx: KeyContext { cs_base: cs.cache.base, cs32: cs.cache.db, cpl, flags } }
    }
}

/// What the aliases were built for: IDTR, TR's base, the paging registers.
type AliasKey = (u32, u16, u32, u32, u32, u32);

/// The monitor's half of the inline transitions.
pub struct Transitions {
    alias: VmmAlias,
    /// What the transition page holds.
    page: area::Transitions,
    /// The gates written to the gate cache (0: none).
    gates: Box<[u64; 256]>,
    /// Where INT from CPL 3 arrives (TSS.SS0 and the gates' CS).
    kernel: Option<Side>,
    /// Where IRET to CPL 3 arrives (the CS and SS user code last ran with).
    user: Option<Side>,
    built_for: Option<AliasKey>,
    /// What the kernel side was built for: IDTR, TR, and the frames of
    /// the IDT and the TSS (a new address space maps the same ones).
    kernel_for: Option<(AliasKey, [Option<u64>; area::IDT_ALIAS_PAGES as usize], Option<u64>)>,
    /// Vectors whose gate was looked at again since the last full build.
    rechecked: Box<[bool; 256]>,
    idt_frames: [Option<u64>; area::IDT_ALIAS_PAGES as usize],
    tss_frame: Option<u64>,
    /// A CPL 3 INT through this vector took its callout: look at its gate
    /// and TSS.SS0 again (the guest may have set them up since).
    stale: Option<u8>,
    /// Inline transitions taken (for `--stats`).
    pub taken: u64,
}

impl Transitions {
    pub fn new(alias: VmmAlias) -> Transitions {
        // The VMM area outlives a VM: clear what a previous one left.
        let t = Transitions {
            alias,
            page: area::Transitions::default(),
            gates: Box::new([0; 256]),
            kernel: None,
            user: None,
            built_for: None,
            kernel_for: None,
            rechecked: Box::new([false; 256]),
            idt_frames: [None; area::IDT_ALIAS_PAGES as usize],
            tss_frame: None,
            stale: None,
            taken: 0,
        };
        t.write_page();
        alias.write(area::GATE_CACHE as usize, &[0; 256 * 8]);
        alias.write(area::EXC_GATE_CACHE as usize, &[0; 32 * 8]);
        for off in [page::TRANSITION, page::INLINE_ENTRIES] {
            alias.write_u32(off, 0);
        }
        t
    }

    fn write_page(&self) {
        let p = &self.page;
        let words = [
            p.int_ok,
            p.iret_ok,
            p.int_cs_sel,
            p.int_cs_off,
            p.int_cs_desc[0],
            p.int_cs_desc[1],
            p.int_ss_sel,
            p.int_ss_off,
            p.int_ss_desc[0],
            p.int_ss_desc[1],
            p.int_ss_host,
            p.tss_live,
            p.idt_live,
            p.user_cs_sel,
            p.user_cs_off,
            p.user_cs_desc[0],
            p.user_cs_desc[1],
            p.user_ss_sel,
            p.user_ss_off,
            p.user_ss_desc[0],
            p.user_ss_desc[1],
            p.user_ss_host,
            p.user_if,
            p.kiret_ok,
        ];
        // Every field, in order (`Transitions` is `repr(C)`, all u32).
        const _: () = assert!(std::mem::size_of::<area::Transitions>() == 24 * 4);
        let mut bytes = [0u8; 24 * 4];
        for (chunk, w) in bytes.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        self.alias.write(area::TRANSITIONS as usize, &bytes);
    }

    /// Writes `next` when it differs from what the page holds.
    fn publish(&mut self, next: area::Transitions) {
        if next != self.page {
            tracing::debug!(?next, kernel = ?self.kernel, user = ?self.user, "transition page");
            self.page = next;
            self.write_page();
        }
    }

    /// A CPL 3 `INT vector` (or exception `vector`) went through its
    /// callout while inline entries
    /// were allowed: its gate may have been set up since the last build
    /// (looked at once per vector and build).
    pub fn int_missed(&mut self, vector: u8) {
        if self.page.int_ok != 0 && !self.rechecked[usize::from(vector)] {
            self.rechecked[usize::from(vector)] = true;
            self.stale = Some(vector);
        }
    }

    /// Paging changed (MOV CR0/CR3/CR4, a state restore): map the aliases
    /// again before the next entry.
    pub fn invalidate(&mut self) {
        self.built_for = None;
    }

    /// INVLPG of `linear`: the aliases only when it maps one of their
    /// pages. Returns whether it does.
    pub fn invalidate_page(&mut self, linear: u32, cpu: &crate::cpu::Cpu) -> bool {
        let page = linear & !0xFFF;
        let idt = cpu.idtr.base & !0xFFF;
        let tss = cpu.tr.cache.base.wrapping_add(4) & !0xFFF;
        let covers = page == idt || page == idt.wrapping_add(0x1000) || page == tss;
        if covers {
            self.built_for = None;
        }
        covers
    }
}

/// The code selector of a present 32-bit interrupt or trap gate.
fn gate_selector(gate: u64) -> Option<u16> {
    let access = (gate >> 40) as u8;
    let present = access & 0x80 != 0;
    let typ = access & 0x1F;
    (present && (typ == 0x0E || typ == 0x0F)).then_some((gate >> 16) as u16 & !3)
}

/// A 32-bit interrupt or trap gate user code may use (DPL 3, present).
fn user_gate(gate: u64) -> Option<u16> {
    let dpl = (gate >> 45) as u8 & 3;
    gate_selector(gate).filter(|_| dpl == 3)
}

/// A loaded segment's descriptor as the two dwords the TC compares with
/// the live GDT entry.
fn desc_words(r: &SegReg) -> [u32; 2] {
    let v = r.cache.to_u64();
    [v as u32, (v >> 32) as u32]
}

/// The kernel side's code segment: 32-bit, present, DPL 0, not conforming.
fn kernel_code(d: &Descriptor) -> bool {
    d.is_code() && d.present && d.dpl == 0 && d.db && !d.is_conforming_code()
}

/// A stack segment a transition may load without touching memory:
/// writable, present, accessed, 32-bit, expand-up, of DPL `dpl`.
fn stack_segment(d: &Descriptor, dpl: u8) -> bool {
    d.is_writable_data() && d.present && d.typ & 1 != 0 && d.db && !d.is_expand_down() && d.dpl == dpl
}

/// The user side's code segment: 32-bit, present, DPL 3, not conforming.
fn user_code(d: &Descriptor) -> bool {
    d.is_code() && d.present && d.dpl == 3 && d.db && !d.is_conforming_code()
}

impl BtBackend {
    /// Whether inline transitions may run at all: not in the counting mode
    /// (whose stops are the run loop's), not with user isolation (each CPL
    /// change must reach the shadow MMU), only in protected mode.
    fn transitions_allowed(&self) -> bool {
        self.config.engine.inline_transitions
            && !self.counter.is_on()
            && !self.config.user_isolation
            && self.cpu.protected_mode()
            && self.cpu.eflags & flags::VM == 0
    }

    /// At every entry into the TC: the aliases, the two sides and the
    /// permissions on the transition page as the virtual CPU stands.
    pub(super) fn refresh_transitions(&mut self) -> Result<(), BackendError> {
        let mut next = self.transitions.page;
        if !self.transitions_allowed() {
            next.int_ok = 0;
            next.iret_ok = 0;
            next.kiret_ok = 0;
            self.transitions.publish(next);
            return Ok(());
        }
        let c = &self.cpu;
        let key = (c.idtr.base, c.idtr.limit, c.tr.cache.base, c.cr0, c.cr3, c.cr4);
        if self.transitions.built_for != Some(key) {
            self.transitions.built_for = Some(key);
            self.build_aliases(&mut next)?;
            let t = &self.transitions;
            let kernel_for = Some(((key.0, key.1, key.2, 0, 0, 0), t.idt_frames, t.tss_frame));
            if t.kernel_for != kernel_for {
                self.transitions.kernel_for = kernel_for;
                self.transitions.rechecked.fill(false);
                self.build_kernel_side(&mut next, None)?;
            }
        } else if let Some(v) = self.transitions.stale.take() {
            self.build_kernel_side(&mut next, Some(v))?;
        }
        if self.cpu.cpl == 3 {
            self.note_user_side(&mut next)?;
            next.user_if = self.cpu.eflags & flags::IF;
        }
        let gdt_end = self.alias.read_u32(page::GDT_LIVE_END);
        let in_gdt = |off: u32| off + 8 <= gdt_end;
        let c = &self.cpu;
        // User code that reaches an INT inline came from an inline IRET,
        // which checked these, or from this entry.
        let user_flags_ok = c.cpl != 3 || c.eflags & (flags::IOPL | flags::NT | flags::TF) == 0;
        next.int_ok = u32::from(
            self.transitions.kernel.is_some_and(|k| self.engine.table_context(0) == Some(k.ctx))
                && next.idt_live != 0
                && next.tss_live != 0
                && in_gdt(next.int_cs_off)
                && in_gdt(next.int_ss_off)
                && user_flags_ok,
        );
        // From CPL 3 the kernel is reached by an INT, which clears NT.
        next.kiret_ok = u32::from(
            self.transitions.kernel.is_some_and(|k| self.engine.table_context(0) == Some(k.ctx))
                && self.retry.is_none()
                && in_gdt(next.int_cs_off)
                && (c.cpl == 3 || c.eflags & flags::NT == 0),
        );
        let translated = self.user_exec.translated(c.cr3);
        next.iret_ok = u32::from(
            self.transitions.user.is_some_and(|u| self.engine.table_context(3) == Some(u.ctx))
                && translated
                // Not before the user blocks are revalidated (prepare_tc_entry).
                && !self.user_revalidate
                && self.retry.is_none()
                && (c.cpl == 3 || c.eflags & flags::NT == 0)
                && in_gdt(next.user_cs_off)
                && in_gdt(next.user_ss_off),
        );
        self.transitions.publish(next);
        Ok(())
    }

    /// Maps the guest frames of the IDT and of TSS.ESP0/SS0 into their
    /// aliases (`idt_live`/`tss_live` 0 when they do not translate to RAM).
    fn build_aliases(&mut self, next: &mut area::Transitions) -> Result<(), BackendError> {
        let c = &self.cpu;
        let (idt_base, idt_len) = (c.idtr.base, (u32::from(c.idtr.limit) + 1).min(256 * 8));
        let tss = c.tr.cache;
        let tss_ok = c.tr.selector & !3 != 0 && tss.present && !tss.s && tss.typ & 0x9 == 0x9 && tss.limit >= 11;
        let esp0 = tss.base.wrapping_add(4);
        next.idt_live = 0;
        if idt_len >= 8 {
            let pages = (1 + ((idt_base & 0xFFF) + idt_len - 1) / 0x1000) as usize;
            let frames = &mut self.transitions.idt_frames[..pages];
            if self.guest.map_alias(idt_base, area::IDT_ALIAS, frames).map_err(failed)? {
                next.idt_live = area::IDT_ALIAS + (idt_base & 0xFFF);
            }
        }
        next.tss_live = 0;
        // ESP0 and SS0 in one page.
        if tss_ok && esp0 & 0xFFF <= 0x1000 - 6 {
            let frames = std::slice::from_mut(&mut self.transitions.tss_frame);
            if self.guest.map_alias(esp0, area::TSS_ALIAS, frames).map_err(failed)? {
                next.tss_live = area::TSS_ALIAS + (esp0 & 0xFFF);
            }
        }
        Ok(())
    }

    /// Where INT n from CPL 3 arrives: TSS.SS0 and the code segment of the
    /// user-callable gates (that of vector 0x80 when it has one), each
    /// validated; the gates through it in the gate cache. `only`: just that
    /// vector's gate (after its callout), and SS0 again.
    fn build_kernel_side(&mut self, next: &mut area::Transitions, only: Option<u8>) -> Result<(), BackendError> {
        let cpu = self.cpu.clone();
        let mut lin = self.guest.linear();
        let idt_entries = ((u32::from(cpu.idtr.limit) + 1) / 8).min(256) as usize;
        let mut gates = [0u64; 256];
        for (v, g) in gates.iter_mut().enumerate().take(idt_entries) {
            if only.is_some_and(|o| usize::from(o) != v) {
                continue;
            }
            *g = lin.read_u64(&cpu, cpu.idtr.base.wrapping_add(8 * v as u32), Access::SUPERVISOR).unwrap_or(0);
        }
        let ss0 = if next.tss_live != 0 {
            lin.read_u16(&cpu, cpu.tr.cache.base.wrapping_add(8), Access::SUPERVISOR).ok()
        } else {
            None
        };
        let kernel_cs = match (only, self.transitions.kernel) {
            (Some(_), Some(k)) => Some(k.cs.selector),
            _ => user_gate(gates[0x80]).or_else(|| gates.iter().find_map(|&g| user_gate(g))),
        };
        let desc = |lin: &mut dyn LinearMemory, sel: u16| read_descriptor(&cpu, lin, sel, false).ok();
        let cs = kernel_cs.filter(|s| s & 4 == 0).and_then(|s| Some((s, desc(&mut lin, s)?)));
        let ss = ss0.filter(|s| s & 7 == 0 && *s != 0).and_then(|s| Some((s, desc(&mut lin, s)?)));
        let side = match (cs, ss) {
            (Some((cs, csd)), Some((ss, ssd))) if kernel_code(&csd) && stack_segment(&ssd, 0) => {
                Some(Side::new(SegReg { selector: cs, cache: csd }, SegReg { selector: ss, cache: ssd }, 0))
            }
            _ => None,
        };
        if only.is_none() || side != self.transitions.kernel {
            // A new kernel side: every gate is checked against it.
            self.transitions.gates.fill(0);
        }
        self.transitions.kernel = side;
        let Some(k) = side else {
            next.int_cs_off = u32::MAX - 8;
            next.int_ss_off = u32::MAX - 8;
            self.alias.write(area::GATE_CACHE as usize, &[0; 256 * 8]);
            self.alias.write(area::EXC_GATE_CACHE as usize, &[0; 32 * 8]);
            return Ok(());
        };
        for (v, &g) in gates.iter().enumerate() {
            if only.is_some_and(|o| usize::from(o) != v) {
                continue;
            }
            let inside = v < idt_entries;
            let valid = if inside && user_gate(g) == Some(k.cs.selector) { g } else { 0 };
            if self.transitions.gates[v] != valid || only.is_none() {
                self.transitions.gates[v] = valid;
                self.alias.write(area::GATE_CACHE as usize + 8 * v, &valid.to_le_bytes());
            }
            if v < 32 {
                // Exceptions do not check the gate's DPL.
                let valid = if inside && gate_selector(g) == Some(k.cs.selector) { g } else { 0 };
                self.alias.write(area::EXC_GATE_CACHE as usize + 8 * v, &valid.to_le_bytes());
            }
        }
        let host_ss = self.shadows.shadow(&mut self.host, k.ss, false, false)?;
        next.int_cs_sel = u32::from(k.cs.selector);
        next.int_cs_off = u32::from(k.cs.selector & !7);
        next.int_cs_desc = desc_words(&k.cs);
        next.int_ss_sel = u32::from(k.ss.selector);
        next.int_ss_off = u32::from(k.ss.selector & !7);
        next.int_ss_desc = desc_words(&k.ss);
        next.int_ss_host = u32::from(host_ss);
        Ok(())
    }

    /// Where IRET to CPL 3 arrives: the CS and SS user code runs with now,
    /// when they are ordinary flat-model user segments.
    fn note_user_side(&mut self, next: &mut area::Transitions) -> Result<(), BackendError> {
        let (cs, ss) = (*self.cpu.seg(Seg::Cs), *self.cpu.seg(Seg::Ss));
        if self.transitions.user.is_some_and(|u| u.cs == cs && u.ss == ss) {
            return Ok(());
        }
        let ok = cs.selector & 7 == 3 && ss.selector & 7 == 3 && user_code(&cs.cache) && stack_segment(&ss.cache, 3);
        if !ok {
            self.transitions.user = None;
            next.user_cs_off = u32::MAX - 8;
            next.user_ss_off = u32::MAX - 8;
            return Ok(());
        }
        let host_ss = self.shadows.shadow(&mut self.host, ss, false, true)?;
        self.transitions.user = Some(Side::new(cs, ss, 3));
        next.user_cs_sel = u32::from(cs.selector);
        next.user_cs_off = u32::from(cs.selector & !7);
        next.user_cs_desc = desc_words(&cs);
        next.user_ss_sel = u32::from(ss.selector);
        next.user_ss_off = u32::from(ss.selector & !7);
        next.user_ss_desc = desc_words(&ss);
        next.user_ss_host = u32::from(host_ss);
        Ok(())
    }

    /// At every exit of translated code: the last inline transition's CS,
    /// SS, CPL and flags, from this module's records. Returns whether one
    /// happened, and the inline kernel entries since the last exit.
    pub(super) fn sync_transition(&mut self) -> Result<(bool, u32), BackendError> {
        let t = self.alias.read_u32(page::TRANSITION);
        let entries = self.alias.read_u32(page::INLINE_ENTRIES);
        if t == 0 && entries == 0 {
            return Ok((false, 0));
        }
        self.alias.write_u32(page::TRANSITION, 0);
        self.alias.write_u32(page::INLINE_ENTRIES, 0);
        let side = match t {
            0 => return Ok((false, entries)),
            transition::TO_KERNEL => self.transitions.kernel,
            transition::TO_USER => self.transitions.user,
            _ => None,
        };
        let side = side.ok_or_else(|| failed(format!("the vCPU page reports transition {t} that was not allowed")))?;
        self.transitions.taken += 1;
        let c = &mut self.cpu;
        c.seg[Seg::Cs as usize] = side.cs;
        c.seg[Seg::Ss as usize] = side.ss;
        c.cpl = side.ctx.cpl;
        c.eflags &= !(flags::NT | flags::RF | flags::VM | flags::TF);
        if t == transition::TO_USER {
            // The IRET checked IF and IOPL 0; user code cannot change them.
            c.eflags = (c.eflags & !(flags::IOPL | flags::IF)) | (self.transitions.page.user_if & flags::IF);
        }
        self.written_sels = None;
        Ok((true, entries))
    }
}
