//! What a host exit means for the guest: hidden faults the shadow MMU
//! resolves, guest exceptions, system calls of direct user code, kicks, and
//! the callouts of translated code.

use engine::callout::CalloutKind;
use engine::classify::{self, Class, Flow};
use engine::vmm_area::vcpu as page;
use engine::{BlockKey, EngineError, Wake};
use iced_x86::{Decoder, DecoderOptions};
use shadow_mmu::{EmulateReason, FaultOutcome};

use super::segments::{guest_error_code, guest_selector};
use super::{failed, unsupported, BtBackend, Resume, Step};
use crate::backend::VmExit;
use crate::cpu::interrupt::{self, Event};
use crate::cpu::operand::gpr_write;
use crate::cpu::{vector, Fault, Seg};
use crate::host::{Exit, Segments, SyscallKind};

/// The MMU access a host page fault's error code describes.
pub(super) fn fault_access(error_code: u32, user: bool) -> shadow_mmu::Access {
    shadow_mmu::Access { write: error_code & 2 != 0, user, fetch: error_code & 0x10 != 0 }
}

/// The guest event for a host exit that is an exception of the guest.
pub(super) fn exception_of(exit: Exit) -> Event {
    match exit {
        Exit::DivideError => Event::Exception(Fault::new(vector::DE)),
        Exit::Debug => Event::Exception(Fault::new(vector::DB)),
        Exit::Breakpoint => Event::Software(vector::BP),
        Exit::Overflow => Event::Software(vector::OF),
        Exit::BoundRange => Event::Exception(Fault::new(vector::BR)),
        Exit::InvalidOpcode => Event::Exception(Fault::ud()),
        Exit::StackFault { error_code } => Event::Exception(Fault::with_code(vector::SS, guest_error_code(error_code))),
        Exit::SegmentNotPresent { error_code } => {
            Event::Exception(Fault::with_code(vector::NP, guest_error_code(error_code)))
        }
        Exit::AlignmentCheck => Event::Exception(Fault::with_code(vector::AC, 0)),
        Exit::X87Fault => Event::Exception(Fault::new(vector::MF)),
        Exit::SimdFault => Event::Exception(Fault::new(vector::XM)),
        Exit::GeneralProtection { error_code, .. } => Event::Exception(Fault::gp(guest_error_code(error_code))),
        Exit::PageFault { address, error_code } => Event::Exception(Fault::page(address, error_code)),
        Exit::SystemCall { .. } | Exit::Kick | Exit::Callout | Exit::Hooked => Event::Exception(Fault::gp(0)),
    }
}

impl BtBackend {
    /// Guest user code may load selectors itself: map what the host holds
    /// now back to guest selectors. A raw guest GDT selector that loaded on
    /// the host (0x33, 0x2b, 0x7b are host GDT entries too) names a host
    /// segment, not the guest's: the virtual CPU loads the guest's
    /// descriptor and the next entry uses its shadow. Returns whether that
    /// happened (a fault then was probably the raw selector's, and the
    /// instruction is retried).
    pub(super) fn sync_user_selectors(&mut self, loaded: Segments) -> bool {
        let now = self.host.segments();
        let mut raw = false;
        for (s, was, is) in [
            (Seg::Ds, loaded.ds, now.ds),
            (Seg::Es, loaded.es, now.es),
            (Seg::Fs, loaded.fs, now.fs),
            (Seg::Gs, loaded.gs, now.gs),
        ] {
            if was != is {
                let guest = guest_selector(is, 3).unwrap_or(is);
                raw |= is & 4 == 0 && is & !3 != 0;
                if interrupt::load_segment(&mut self.cpu, &mut self.guest.linear(), s, guest).is_err() {
                    tracing::debug!(selector = guest, "user code loaded a selector the guest GDT does not back");
                }
            }
        }
        raw
    }

    pub(super) fn handle_direct_exit(&mut self, exit: Exit) -> Step {
        match exit {
            Exit::PageFault { address, error_code } => {
                self.stats.count("user_page_fault");
                self.hidden_fault(address, fault_access(error_code, true), false)
            }
            Exit::GeneralProtection { error_code, insn, len } => {
                self.stats.count("user_gp");
                let d =
                    Decoder::with_ip(32, &insn[..len as usize], u64::from(self.cpu.eip), DecoderOptions::NONE).decode();
                if d.is_invalid() {
                    return self.fault(Fault::gp(error_code));
                }
                let c = classify::classify(&d);
                if c.class == Class::ControlFlow(Flow::Int) {
                    self.cpu.eip = d.next_ip32();
                    return self.raise(Event::Software(d.immediate8()));
                }
                if c.is_ident() {
                    self.fault(Fault::gp(error_code))
                } else {
                    self.emulate(&d, &c, d.next_ip32())
                }
            }
            Exit::SystemCall { kind, eip_known, .. } => {
                self.stats.count("user_syscall");
                if !eip_known {
                    return Err(failed(format!("guest user code made a {kind:?} fast system call whose return address the host kernel discards (hidden from the guest's CPUID)")));
                }
                match kind {
                    SyscallKind::Int80 => self.raise(Event::Software(0x80)),
                    _ => {
                        // SYSENTER: guest CPUID hides it; a 686 without SEP gives #UD.
                        self.cpu.eip = self.cpu.eip.wrapping_sub(2);
                        self.fault(Fault::ud())
                    }
                }
            }
            Exit::Kick => {
                self.stats.count("kick");
                Ok(Some(VmExit::Interrupted))
            }
            Exit::Callout | Exit::Hooked => Err(failed("guest user code jumped into the exit gate")),
            other => {
                self.stats.count("user_exception");
                self.raise(exception_of(other))
            }
        }
    }

    /// After an IRET: if it returned to the instruction whose access became
    /// the last guest #PF, in the same address space, map the page now when
    /// the handler made it valid (one host fault saved per demand page).
    pub(super) fn retry_after_iret(&mut self) -> Result<(), crate::backend::BackendError> {
        let Some(r) = self.retry.take() else { return Ok(()) };
        if r.cr3 != self.cpu.cr3 || r.eip != self.cpu.eip {
            return Ok(());
        }
        let (mmu, mut phys, mut mapper) = self.guest.paging();
        if mmu.prefault(&mut phys, &mut mapper, r.address, r.access, self.cpu.cpl).map_err(failed)? {
            self.stats.count("iret_prefault");
        }
        Ok(())
    }

    /// A host fault at `address` in the window: resolve it or give the guest
    /// its page fault.
    pub(super) fn hidden_fault(&mut self, address: u32, access: shadow_mmu::Access, from_tc: bool) -> Step {
        let (mmu, mut phys, mut mapper) = self.guest.paging();
        let out = mmu.handle_fault(&mut phys, &mut mapper, address, access, self.cpu.cpl).map_err(failed)?;
        match out {
            FaultOutcome::Resolved => Ok(None),
            FaultOutcome::GuestPageFault { cr2, error_code } => {
                // Not in the deterministic mode: mapping at the IRET sets
                // A/D one guest instruction early, which recordings keep.
                if !self.config.deterministic {
                    self.retry = Some(RetryFault { cr3: self.cpu.cr3, eip: self.cpu.eip, address, access });
                }
                self.fault(Fault::page(cr2, error_code))
            }
            FaultOutcome::Emulate { gpa, reason: EmulateReason::CodeWrite } => {
                self.stats.count("code_write");
                let dropped = self.engine.invalidate_phys_page(gpa & !0xFFF);
                tracing::debug!(
                    gpa = format_args!("{gpa:#x}"),
                    address = format_args!("{address:#x}"),
                    eip = format_args!("{:#x}", self.cpu.eip),
                    cpl = self.cpu.cpl,
                    blocks = dropped.len(),
                    "write to a translated code page"
                );
                let (mmu, _, mut mapper) = self.guest.paging();
                mmu.unprotect_code_page(&mut mapper, gpa & !0xFFF).map_err(failed)?;
                if from_tc {
                    // Retranslating would protect the page again before the
                    // write could happen (the writer may be on it): step over it.
                    return self.step_native();
                }
                Ok(None)
            }
            FaultOutcome::Emulate { gpa, reason } => {
                self.stats.count("emulate");
                self.emulate_memory_access(gpa, reason)
            }
        }
    }

    /// An access the window cannot serve (page below `mmap_min_addr`, a
    /// CR0.WP=0 supervisor write to a read-only page, MMIO): perform the
    /// instruction on the virtual CPU's view of memory.
    fn emulate_memory_access(&mut self, gpa: u64, reason: EmulateReason) -> Step {
        match reason {
            EmulateReason::LowPage | EmulateReason::SupervisorWriteWp0 | EmulateReason::VmmArea => {
                self.emulate_by_reexecution()
            }
            EmulateReason::Mmio => self.emulate_mmio(gpa),
            _ => {
                let insn = self.fetch_insn().map(|(i, _)| i.to_string()).unwrap_or_else(|_| "?".into());
                Err(unsupported(format!(
                    "emulating a memory access ({reason:?} at guest-physical {gpa:#x}) by `{insn}`"
                )))
            }
        }
    }

    /// The guest's code fetch at `linear` failed: its page fault, or an
    /// error when the address translates to no RAM.
    pub(super) fn fetch_fault(&mut self, linear: u32) -> Step {
        let access = shadow_mmu::Access { write: false, user: self.cpu.cpl == 3, fetch: true };
        let (mmu, mut phys, _) = self.guest.paging();
        match mmu.translate(&mut phys, linear, access) {
            Err(pf) => self.fault(Fault::page(pf.cr2, pf.error_code)),
            Ok(t) => Err(unsupported(format!(
                "executing code outside guest RAM (linear {linear:#x}, physical {:#x})",
                t.gpa
            ))),
        }
    }

    /// Puts the guest state back to the start of the guest instruction the
    /// TC was executing at `host_eip`.
    fn recover(&mut self, host_eip: u32) -> Result<(bool, bool), crate::backend::BackendError> {
        let rec = self
            .engine
            .recover(host_eip)
            .ok_or_else(|| failed(format!("no translation covers TC address {host_eip:#x}")))?;
        for (reg, slot) in &rec.restore {
            let v = self.alias.read_u32(page::scratch(*slot));
            gpr_write(&mut self.cpu, *reg, v);
        }
        self.cpu.eip =
            if rec.eip_is_callout_target { self.alias.read_u32(page::CALLOUT_TARGET) } else { rec.guest_eip };
        Ok((rec.exact, rec.fallback))
    }

    pub(super) fn handle_translated_exit(&mut self, exit: Exit, host_eip: u32) -> Step {
        if exit == Exit::Callout {
            return self.callout();
        }
        let deferred = exit == Exit::Kick && self.config.engine.poll_at_block_entry;
        if self.counter.is_on() && !deferred {
            // A fault or stop inside a block: what it did not retire is refunded.
            if let Some((n, done)) =
                self.engine.block_at(host_eip).map(|b| (b.insns.len() as u32, b.retired_at(host_eip)))
            {
                self.counter.refund(n, done);
            }
        }
        if deferred && self.engine.block_at(host_eip).is_some() {
            // Asynchronous stops happen at the translator's own safe points:
            // raise the poll flag and let the TC run on to the next block
            // entry, where it exits with a Poll callout in a clean state
            // (VMware delivered interrupts the same way). Recovery maps stay
            // for synchronous faults, which happen at the faulting
            // instruction.
            self.stats.count("kick_deferred");
            self.alias.write_u32(page::POLL, 1);
            self.raw_resume = true;
            self.kick_deferred = true;
            return Ok(None);
        }
        let (exact, fallback) = self.recover(host_eip)?;
        if fallback && exit != Exit::Kick {
            return self.transition_fault(exit);
        }
        if !exact {
            // Inside the committed tail of a rewritten sequence (nothing there
            // can fault): a kick landed between guest instruction boundaries.
            // Resume the host state as it is; the next exit is a clean one.
            if exit == Exit::Kick {
                self.raw_resume = true;
                return Ok(None);
            }
            return Err(failed(format!("{exit:?} inside a committed TC sequence at {host_eip:#x}")));
        }
        self.translated_exception(exit)
    }

    /// A fault in the guest accesses of an inline INT or IRET (the state
    /// recovered to the instruction): those are supervisor accesses to
    /// another stack, or reads the instruction may not make, so the fault
    /// is not the guest's as such. A page the shadow MMU can map is mapped
    /// and the instruction runs again; anything else is the instruction's
    /// callout semantics, which raises what the architecture says.
    fn transition_fault(&mut self, exit: Exit) -> Step {
        self.stats.count("transition_fault");
        if let Exit::PageFault { address, error_code } = exit {
            let access = shadow_mmu::Access { write: error_code & 2 != 0, user: false, fetch: false };
            let (mmu, mut phys, mut mapper) = self.guest.paging();
            if let Ok(FaultOutcome::Resolved) = mmu.handle_fault(&mut phys, &mut mapper, address, access, 0) {
                return Ok(None);
            }
        }
        let (insn, _) = match self.fetch_insn() {
            Ok(i) => i,
            Err(step) => return step,
        };
        let c = classify::classify(&insn);
        self.emulate(&insn, &c, insn.next_ip32())
    }

    /// A synchronous exit of translated code, the guest state recovered.
    fn translated_exception(&mut self, exit: Exit) -> Step {
        match exit {
            Exit::Kick => {
                self.stats.count("kick");
                Ok(Some(VmExit::Interrupted))
            }
            Exit::PageFault { address, error_code } => {
                self.stats.count("kernel_page_fault");
                if self.cpu.cpl == 3 {
                    // As for direct code: the run that ended in a fault
                    // costs a fault in either mode and says nothing about
                    // which is cheaper (user_exec.rs).
                    self.user_exec.stretch_cancel();
                }
                self.hidden_fault(address, fault_access(error_code, self.cpu.cpl == 3), true)
            }
            Exit::GeneralProtection { error_code, .. } => {
                self.stats.count("kernel_gp");
                self.fault(Fault::gp(error_code))
            }
            other => {
                self.stats.count("kernel_exception");
                self.raise(exception_of(other))
            }
        }
    }

    fn callout(&mut self) -> Step {
        let id = self.alias.read_u32(page::CALLOUT_ID);
        let site = self.engine.callout_site(id).cloned().ok_or_else(|| failed(format!("unknown callout site {id}")))?;
        self.engine.note_callout(id);
        if self.config.flush_at_callouts {
            // The site was copied: what follows finds no block of the old
            // generation (no resume address, no chain, no lookup entry).
            self.engine.flush();
        }
        self.counter.refund(site.block_insns, site.insns_before);
        self.stats.count("callout");
        if self.config.profile_callouts {
            self.open_callout = Some((site.kind, super::stats::rdtsc()));
        }
        // The key the continuation belongs to: the one at the callout,
        // moved to the next instruction.
        let key = BlockKey { eip: site.next_eip, ..self.key() };
        match site.kind {
            CalloutKind::BlockExit => {
                self.cpu.eip = site.next_eip;
                self.translate_and(|e, _| {
                    let _ = e.chain(id);
                })
            }
            CalloutKind::IndirectMiss => {
                self.cpu.eip = self.alias.read_u32(page::CALLOUT_TARGET);
                self.translate_and(|e, key| {
                    let _ = e.install_indirect(key);
                })
            }
            CalloutKind::Poll => {
                self.cpu.eip = site.guest_eip;
                let budget_only = site.insns_before == 0 && self.alias.read_u32(page::POLL) == 0;
                if budget_only && self.counter.left().is_some_and(|l| l > 0) {
                    // The block would overrun the stop: the next step runs a
                    // shorter translation up to it.
                    return Ok(None);
                }
                Ok(Some(VmExit::Interrupted))
            }
            CalloutKind::UserPage => {
                self.cpu.eip = site.guest_eip;
                match self.engine.wake_user_block(id, &mut self.guest.code(true)) {
                    // Entered again through the lookup: the guard passes,
                    // or the key translates (or revives) for this frame.
                    Wake::Live | Wake::Stale => Ok(None),
                    Wake::Absent(eip) => self.fetch_fault(eip),
                }
            }
            CalloutKind::GeneralProtection => {
                self.cpu.eip = site.guest_eip;
                self.fault(Fault::gp(0))
            }
            CalloutKind::DivideError => {
                self.cpu.eip = site.guest_eip;
                if self.cpu.cpl == 3 {
                    self.transitions.int_missed(vector::DE);
                }
                self.fault(Fault::new(vector::DE))
            }
            CalloutKind::Sensitive(_) | CalloutKind::ControlFlow(_) => {
                self.cpu.eip = site.guest_eip;
                if site.kind == CalloutKind::ControlFlow(Flow::Int) && self.cpu.cpl == 3 {
                    self.transitions.int_missed(site.instruction.immediate8());
                }
                let before = (self.cpu.seg(Seg::Cs).selector, self.cpu.cpl);
                let step = self.emulate(&site.instruction, &site.classification, site.next_eip);
                // Segments as they were: an instruction that loads none, which
                // went on to the next one (no exception delivered) at the same
                // CS and CPL.
                let segs_kept = matches!(site.kind, CalloutKind::Sensitive(s) if !s.loads_segments())
                    && self.cpu.eip == site.next_eip
                    && (self.cpu.seg(Seg::Cs).selector, self.cpu.cpl) == before;
                // Asked again: the instruction may have dropped its block.
                if let Some(tc) = self.engine.callout_site(id).and_then(|s| s.resume_tc) {
                    self.resume_at = Some(Resume { key, tc, segs_kept });
                }
                step
            }
        }
    }

    /// Translates the block at the guest's EIP, then links it with `link`
    /// (chaining, the indirect lookup table).
    fn translate_and(&mut self, link: impl FnOnce(&mut engine::Engine, &BlockKey)) -> Step {
        let key = self.key();
        let translated = self.user_timed(|b| b.engine.translate(key, &mut b.guest.code(key.cpl == 3)));
        match translated {
            Ok(_) => {
                self.after_translation(&key);
                link(&mut self.engine, &key);
                Ok(None)
            }
            Err(EngineError::Fetch(f)) => self.fetch_fault(f.linear),
            Err(e) => Err(failed(e)),
        }
    }
}

/// Where the last guest #PF from a hidden fault came from.
#[derive(Clone, Copy, Debug)]
pub(super) struct RetryFault {
    pub cr3: u32,
    pub eip: u32,
    pub address: u32,
    pub access: shadow_mmu::Access,
}
