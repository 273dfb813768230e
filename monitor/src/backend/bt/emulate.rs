//! Sensitive instructions on the virtual CPU ([`crate::cpu::sensitive`]) and
//! what their outcome asks of the backend: MMU updates, I/O the machine
//! performs, halts, software interrupts. Owns the instructions left half
//! done while the machine answers (I/O, MMIO reads).

use engine::classify::{Class, Classification, Sensitive};
use iced_x86::Instruction;

use super::{unsupported, BtBackend, Step};
use crate::backend::{BackendError, VmExit};
use crate::cpu::interrupt::{DeliveryError, Event};
use crate::cpu::operand::gpr_write;
use crate::cpu::sensitive::{self, Env, ExecError, IoOp, MmuEffect, MsrOp, Outcome};
use crate::cpu::Fault;

/// An I/O instruction waiting for the machine.
#[derive(Clone, Copy, Debug)]
pub(super) enum PendingIo {
    In { size: u8, next_eip: u32 },
    Ins { insn: Instruction, op: IoOp, next_eip: u32 },
    Outs { insn: Instruction, op: IoOp, next_eip: u32 },
    Out { next_eip: u32 },
}

/// An MMIO read instruction waiting for the device's value.
#[derive(Clone, Copy, Debug)]
pub(super) struct PendingMmio {
    pub insn: Instruction,
    pub gpa: u64,
    pub size: usize,
    pub writes: bool,
}

/// Instructions half done, waiting for the machine.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub io: Option<PendingIo>,
    /// An MMIO read waiting for its value.
    pub mmio: Option<PendingMmio>,
    /// A RDMSR waiting for the machine's value: the EIP after it.
    pub msr_read: Option<u32>,
    /// What `run` returns first (the second half of an MMIO access).
    pub exit: Option<Result<VmExit, BackendError>>,
}

impl Pending {
    /// Nothing waits for the machine.
    pub fn is_idle(&self) -> bool {
        self.io.is_none() && self.mmio.is_none() && self.msr_read.is_none() && self.exit.is_none()
    }
}

/// Whether the instruction completed (its count and EIP move on).
fn completes(result: &Result<Outcome, ExecError>) -> bool {
    matches!(
        result,
        Ok(Outcome::Next
            | Outcome::SegmentLoaded(_)
            | Outcome::Jumped
            | Outcome::Mmu(_)
            | Outcome::Halt
            | Outcome::Interrupt(_)
            | Outcome::Msr(MsrOp::Write { .. }))
    )
}

impl BtBackend {
    /// Performs sensitive instruction `insn`, classified `c`, on the
    /// virtual CPU.
    pub(super) fn emulate(&mut self, insn: &Instruction, c: &Classification, next_eip: u32) -> Step {
        tracing::trace!(eip = format_args!("{:#x}", self.cpu.eip), next = format_args!("{next_eip:#x}"), %insn, "sensitive");
        if self.cpu.cpl == 3
            && matches!(c.class, Class::Sensitive(Sensitive::Cpuid | Sensitive::Xgetbv))
            && !self.host.hides_host_cpuid()
            && self.user_exec.mode() != super::user_exec::UserExec::Translated
        {
            // Without CPUID faulting, user code run directly sees the host's
            // CPUID; translated, it must see the same CPU (an XGETBV after
            // OSXSAVE was seen natively is no #UD).
            return self.step_host_native(insn, next_eip);
        }
        // The clock only for what reads it (a TSC read is a tenth of a
        // hooked callout on these hosts).
        let reads_tsc = matches!(
            c.class,
            Class::Sensitive(Sensitive::Rdtsc | Sensitive::Rdtscp | Sensitive::Rdmsr | Sensitive::Wrmsr)
        );
        let host_tsc = if reads_tsc { self.guest_tsc_base() } else { 0 };
        let result = {
            let mut lin = self.guest.linear();
            let mut env = Env { mem: &mut lin, policy: &self.policy, host_tsc };
            sensitive::execute(&mut self.cpu, &mut env, insn, c)
        };
        if reads_tsc || matches!(c.class, Class::Sensitive(Sensitive::MovToCr)) {
            // Native RDTSC only while the guest's TSC is the host's.
            let tsc_is_hosts = self.cpu.msr.tsc_offset == 0 && self.cpu.cr4 & crate::cpu::state::cr4::TSD == 0;
            if !tsc_is_hosts {
                self.engine.set_native_rdtsc(false);
            }
        }
        if completes(&result) {
            self.counter.retire();
            if matches!(c.class, Class::Sensitive(Sensitive::Rdtsc | Sensitive::Rdtscp)) {
                self.counter.tsc_read();
            }
        }
        let iret = matches!(c.class, Class::ControlFlow(engine::classify::Flow::Iret));
        match result {
            Ok(outcome) if iret => {
                let step = self.apply(outcome, insn, next_eip);
                self.retry_after_iret()?;
                step
            }
            Ok(outcome) => self.apply(outcome, insn, next_eip),
            Err(ExecError::Fault(f)) => self.fault(f),
            Err(ExecError::Unsupported(what)) => {
                tracing::debug!(%insn, what, "unsupported sensitive instruction: #UD");
                self.fault(Fault::ud())
            }
            Err(ExecError::Delivery(DeliveryError::TripleFault { .. })) => Ok(Some(VmExit::TripleFault)),
            Err(ExecError::Delivery(DeliveryError::Unsupported(what))) => Err(unsupported(what)),
        }
    }

    /// What the backend does after a sensitive instruction's semantics.
    fn apply(&mut self, outcome: Outcome, insn: &Instruction, next_eip: u32) -> Step {
        match outcome {
            Outcome::Next | Outcome::SegmentLoaded(_) => {
                self.cpu.eip = next_eip;
                Ok(None)
            }
            Outcome::Jumped => Ok(None),
            Outcome::Mmu(effect) => {
                self.cpu.eip = next_eip;
                self.mmu_effect(effect)?;
                Ok(None)
            }
            Outcome::Io(op) => self.start_io(insn, op, next_eip),
            Outcome::Halt => {
                self.cpu.eip = next_eip;
                self.cpu.halted = true;
                Ok(Some(VmExit::Halt))
            }
            Outcome::Interrupt(v) => {
                self.cpu.eip = next_eip;
                self.raise(Event::Software(v))
            }
            // The WRMSR is complete once the machine has the value: EIP
            // moves now, before the machine may inject an interrupt.
            Outcome::Msr(MsrOp::Write { index, value, tsc }) => {
                self.cpu.eip = next_eip;
                self.stats.count("msr");
                Ok(Some(VmExit::MsrWrite { index, value, tsc }))
            }
            Outcome::Msr(MsrOp::Read { index }) => {
                self.pending.msr_read = Some(next_eip);
                self.stats.count("msr");
                Ok(Some(VmExit::MsrRead { index }))
            }
        }
    }

    /// The machine's value for the pending RDMSR: EDX:EAX, and the
    /// instruction retires.
    pub(super) fn finish_msr_read(&mut self, value: u64) {
        if let Some(next_eip) = self.pending.msr_read.take() {
            self.cpu.gpr[0] = value as u32;
            self.cpu.gpr[2] = (value >> 32) as u32;
            self.cpu.eip = next_eip;
            self.counter.retire();
        }
    }

    fn mmu_effect(&mut self, effect: MmuEffect) -> Result<(), BackendError> {
        let (mmu, phys, mut mapper) = self.guest.paging();
        let r = match effect {
            MmuEffect::Cr3 { new } => mmu.set_cr3(&phys, &mut mapper, new),
            MmuEffect::Invlpg(lin) => mmu.invlpg(&phys, &mut mapper, lin),
            MmuEffect::Cr0 { new, .. } => mmu.set_cr0(&phys, &mut mapper, new),
            MmuEffect::Cr4 { new, .. } => mmu.set_cr4(&phys, &mut mapper, new),
            MmuEffect::Efer { new } => mmu.set_efer(&phys, &mut mapper, new),
        };
        r.map_err(super::failed)?;
        // The GDT's, IDT's and TSS's linear pages may map elsewhere now
        // (after INVLPG, only when it names one of them).
        if let MmuEffect::Invlpg(lin) = effect {
            let gdt = self.shadows.seg_cache.invalidate_gdt_page(lin, &self.cpu);
            let aliases = self.transitions.invalidate_page(lin, &self.cpu);
            // One mapping changed: the translated user code on that page only.
            self.engine.revalidate_user_page(lin, &mut self.guest.code(true));
            // Nothing left that a later INVLPG of this page could
            // change: the next one retires in the TC (INVLPG_FILTER).
            if !gdt && !aliases && !self.guest.mmu.has_shadow(lin) && !self.engine.has_user_page(lin) {
                self.guest.window.clear_invlpg(lin);
            }
            return Ok(());
        }
        self.shadows.seg_cache.invalidate_gdt();
        self.transitions.invalidate();
        if let MmuEffect::Cr3 { .. } = effect {
            // The address space changed: translated user code whose pages
            // now map elsewhere goes, before user code next runs from the
            // TC (an exec'd child that runs directly never asks).
            self.user_revalidate = true;
        } else {
            // Paging changed: translations whose linear pages now map elsewhere go.
            self.engine.revalidate_mappings(&mut self.guest.code(false));
        }
        Ok(())
    }

    fn start_io(&mut self, insn: &Instruction, op: IoOp, next_eip: u32) -> Step {
        if sensitive::string_io_is_empty(&self.cpu, insn) {
            self.cpu.eip = next_eip;
            self.counter.retire();
            return Ok(None);
        }
        if let Some(step) = self.io_in_place(op, next_eip) {
            return step;
        }
        self.stats.count("io");
        Ok(Some(match op {
            IoOp::In { port, size } => {
                self.pending.io = Some(PendingIo::In { size, next_eip });
                VmExit::IoIn { port, size }
            }
            IoOp::Out { port, size, value } => {
                // The OUT is complete once the machine has the value: EIP
                // moves now, before the machine may inject an interrupt.
                self.pending.io = Some(PendingIo::Out { next_eip });
                self.finish_io(0);
                VmExit::IoOut { port, size, value }
            }
            IoOp::Ins { port, size } => {
                self.pending.io = Some(PendingIo::Ins { insn: *insn, op, next_eip });
                VmExit::IoIn { port, size }
            }
            IoOp::Outs { port, size, value } => {
                self.pending.io = Some(PendingIo::Outs { insn: *insn, op, next_eip });
                self.finish_io(0);
                VmExit::IoOut { port, size, value }
            }
        }))
    }

    /// IN/OUT performed on the machine's ports from here, when it lent
    /// them (`run_with_ports`) and the run is not counted: no trip through
    /// the run loop, unless the access changed what the loop acts on (an
    /// interrupt pending, a timer deadline, a platform event), which then
    /// gets the loop's attention at once. `None`: take the run loop's way.
    fn io_in_place(&mut self, op: IoOp, next_eip: u32) -> Option<Step> {
        let ports = self.ports?;
        if self.counter.is_on() {
            return None;
        }
        let (port, size, value) = match op {
            IoOp::In { port, size } => (port, size, None),
            IoOp::Out { port, size, value } => (port, size, Some(value)),
            IoOp::Ins { .. } | IoOp::Outs { .. } => return None,
        };
        // SAFETY: `ports` is the `&mut dyn Ports` of the enclosing
        // `run_with_ports` call, which outlives this one and makes no other
        // use of it meanwhile.
        let ports = unsafe { &mut *ports.0.as_ptr() };
        let timers = ports.port_moves_deadlines(port);
        let state = |p: &mut dyn crate::backend::Ports| {
            if timers {
                p.loop_state()
            } else {
                p.loop_state_without_deadlines()
            }
        };
        let before = state(&mut *ports);
        match value {
            None => {
                let v = ports.io_in(port, size);
                let reg = match size {
                    1 => iced_x86::Register::AL,
                    2 => iced_x86::Register::AX,
                    _ => iced_x86::Register::EAX,
                };
                gpr_write(&mut self.cpu, reg, v);
            }
            Some(v) => ports.io_out(port, size, v),
        }
        // The access may have changed what the TC reads of cached ports
        // (a write, or a read that leaves poll mode).
        self.refresh_port_cache();
        self.cpu.eip = next_eip;
        self.counter.retire();
        self.stats.count("io_in_place");
        let after = state(&mut *ports);
        Some(Ok(if after != before || after.events { Some(VmExit::Interrupted) } else { None }))
    }

    /// Finishes the pending I/O instruction (OUT completes on the next run).
    pub(super) fn finish_io(&mut self, value: u32) {
        let Some(p) = self.pending.io.take() else { return };
        match p {
            PendingIo::In { size, next_eip } => {
                let reg = match size {
                    1 => iced_x86::Register::AL,
                    2 => iced_x86::Register::AX,
                    _ => iced_x86::Register::EAX,
                };
                gpr_write(&mut self.cpu, reg, value);
                self.cpu.eip = next_eip;
                self.counter.retire();
            }
            PendingIo::Out { next_eip } => {
                self.cpu.eip = next_eip;
                self.counter.retire();
            }
            PendingIo::Ins { insn, op, next_eip } | PendingIo::Outs { insn, op, next_eip } => {
                match sensitive::complete_string_io(&mut self.cpu, &mut self.guest.linear(), &insn, op, value) {
                    Ok(true) => {
                        self.cpu.eip = next_eip;
                        self.counter.retire();
                    }
                    Ok(false) => {}
                    Err(f) => {
                        let _ = self.fault(f);
                    }
                }
            }
        }
    }

    /// The machine's value for the pending MMIO read: the instruction runs
    /// on it now; what that produced is what `run` returns next.
    pub(super) fn finish_mmio_read(&mut self, value: u64) {
        if let Some(p) = self.pending.mmio.take() {
            match self.mmio_execute(p, value) {
                Ok(Some(e)) => self.pending.exit = Some(Ok(e)),
                Ok(None) => {}
                Err(e) => self.pending.exit = Some(Err(e)),
            }
        }
    }
}
