//! Re-execution: one guest instruction run natively in the exit-gate page
//! ([`vmm_area::NATIVE_STEP`]) with the guest's registers and flags, its
//! memory operand redirected to the vCPU page's scratch bytes
//! ([`vmm_area::REEXEC_SCRATCH`]) when the window cannot serve it. The
//! hardware computes results and flags: no hand-written flag logic.

use engine::vmm_area;
use iced_x86::{Decoder, DecoderOptions, Instruction};

use super::emulate::PendingMmio;
use super::exits::{exception_of, fault_access};
use super::{failed, unsupported, BtBackend, Step};
use crate::backend::{BackendError, VmExit};
use crate::cpu::{Access, LinearMemory};
use crate::host::Exit;

/// The longest x86 instruction.
const MAX_INSN: usize = 15;

/// `ud2`: ends a native step (the #UD at the right address says "done").
const UD2: [u8; 2] = [0x0F, 0x0B];

/// The explicit memory operand of `insn` and how it is used:
/// `(size, reads, writes)`, or why it cannot be redirected.
fn memory_operand(insn: &Instruction) -> Result<(usize, bool, bool), String> {
    if !(0..insn.op_count()).any(|i| insn.op_kind(i) == iced_x86::OpKind::Memory) {
        return Err(format!("`{insn}` has no explicit memory operand"));
    }
    if insn.is_string_instruction() || insn.stack_pointer_increment() != 0 || insn.memory_index().is_vector_register() {
        return Err(format!("`{insn}` has implicit or vector memory operands"));
    }
    let size = insn.memory_size().size();
    if size == 0 || size > vmm_area::REEXEC_SCRATCH_LEN as usize {
        return Err(format!("`{insn}` has a {size}-byte memory operand"));
    }
    let mut factory = iced_x86::InstructionInfoFactory::new();
    let used = factory.info(insn).used_memory();
    use iced_x86::OpAccess as A;
    let writes = used.iter().any(|m| matches!(m.access(), A::Write | A::ReadWrite | A::CondWrite | A::ReadCondWrite));
    let reads = used.iter().any(|m| matches!(m.access(), A::Read | A::ReadWrite | A::CondRead | A::ReadCondWrite));
    Ok((size, reads, writes))
}

impl BtBackend {
    /// Fetches and decodes the guest instruction at CS:EIP (32-bit code),
    /// with its bytes. `Err(step)` when the fetch itself faulted (the fault
    /// is delivered).
    pub(super) fn fetch_insn(&mut self) -> Result<(Instruction, [u8; MAX_INSN]), Step> {
        let key = self.key();
        if !key.cs32 {
            return Err(Err(unsupported("re-executing 16-bit code")));
        }
        let mut bytes = [0u8; MAX_INSN];
        let lin = key.linear();
        if self.guest.fetch(lin, &mut bytes, key.cpl == 3) == 0 {
            return Err(self.fetch_fault(lin));
        }
        Ok((Decoder::with_ip(32, &bytes, u64::from(self.cpu.eip), DecoderOptions::NONE).decode(), bytes))
    }

    /// Guest-linear address of the native-step slot.
    fn native_step_eip(&self) -> u32 {
        self.guest.window.vmm_base() + vmm_area::NATIVE_STEP
    }

    /// Runs `bytes` (one instruction, 32-bit) natively in the exit-gate page
    /// with the guest's registers, flags and data segments, GS being the VMM
    /// segment unless `guest_gs`. Returns the exit and whether the
    /// instruction completed.
    fn run_snippet(&mut self, bytes: &[u8], guest_gs: bool) -> Result<(Exit, bool), BackendError> {
        let len = bytes.len();
        assert!(len + UD2.len() <= vmm_area::NATIVE_STEP_LEN as usize);
        // No guest-mode code runs while the slot is written.
        self.alias.write(vmm_area::NATIVE_STEP as usize, bytes);
        self.alias.write(vmm_area::NATIVE_STEP as usize + len, &UD2);
        let segs = self.shadows.native_step(&mut self.host, &self.cpu, guest_gs)?;
        self.host.set_segments(segs).map_err(failed)?;
        let snippet = self.native_step_eip();
        self.load_host_regs(snippet);
        let exit = self.run_host(true)?;
        let host_eip = self.save_host_regs();
        Ok((exit, host_eip == snippet + len as u32))
    }

    /// What to do after a snippet ran the instruction at EIP.
    fn after_snippet(&mut self, exit: Exit, done: bool, next_eip: u32) -> Step {
        match exit {
            Exit::InvalidOpcode if done => {
                self.cpu.eip = next_eip;
                self.counter.retire();
                Ok(None)
            }
            Exit::Kick if done => {
                self.cpu.eip = next_eip;
                self.counter.retire();
                Ok(Some(VmExit::Interrupted))
            }
            Exit::Kick => Ok(Some(VmExit::Interrupted)),
            Exit::PageFault { address, error_code } => {
                self.hidden_fault(address, fault_access(error_code, self.cpu.cpl == 3), false)
            }
            other => self.raise(exception_of(other)),
        }
    }

    /// Runs the one guest instruction at EIP natively, outside any
    /// translation: the way forward after a write to a code page whose
    /// translations were just dropped (the writing instruction may sit on
    /// that very page).
    pub(super) fn step_native(&mut self) -> Step {
        let (insn, bytes) = match self.fetch_insn() {
            Ok(i) => i,
            Err(r) => return r,
        };
        if insn.is_invalid() || !engine::classify::classify(&insn).is_ident() {
            return Err(unsupported(format!(
                "a write to a code page by `{insn}`, which cannot run outside translation"
            )));
        }
        self.stats.count("native_step");
        let (exit, done) = self.run_snippet(&bytes[..insn.len()], insn.segment_prefix() == iced_x86::Register::GS)?;
        self.after_snippet(exit, done, insn.next_ip32())
    }

    /// Runs register-only `insn` natively as the host CPU has it (CPUID,
    /// XGETBV at CPL 3 on a host without CPUID faulting).
    pub(super) fn step_host_native(&mut self, insn: &Instruction, next_eip: u32) -> Step {
        let mut enc = iced_x86::Encoder::new(32);
        enc.encode(insn, u64::from(self.native_step_eip()))
            .map_err(|e| unsupported(format!("re-encoding `{insn}`: {e}")))?;
        let bytes = enc.take_buffer();
        self.stats.count("native_step");
        let (exit, done) = self.run_snippet(&bytes, false)?;
        self.after_snippet(exit, done, next_eip)
    }

    /// Runs `insn` natively with its memory operand redirected to the
    /// vCPU page's scratch slot holding `data`; `data` gets the slot back.
    fn redirect_and_run(&mut self, insn: &Instruction, data: &mut [u8]) -> Result<(Exit, bool), BackendError> {
        // The size is checked by `memory_operand` against the slot.
        self.alias.write(vmm_area::REEXEC_SCRATCH as usize, data);
        let mut redirected = *insn;
        redirected.set_memory_base(iced_x86::Register::None);
        redirected.set_memory_index(iced_x86::Register::None);
        redirected.set_memory_index_scale(1);
        redirected.set_memory_displacement32(vmm_area::REEXEC_SCRATCH);
        redirected.set_memory_displ_size(4);
        redirected.set_segment_prefix(iced_x86::Register::GS);
        let mut enc = iced_x86::Encoder::new(32);
        enc.encode(&redirected, u64::from(self.native_step_eip()))
            .map_err(|e| unsupported(format!("re-encoding `{insn}`: {e}")))?;
        let bytes = enc.take_buffer();
        let r = self.run_snippet(&bytes, false)?;
        self.alias.read(vmm_area::REEXEC_SCRATCH as usize, data);
        Ok(r)
    }

    /// MMIO (or a hole): the access goes to the machine's MMIO bus. A read
    /// first asks the machine for the value ([`VmExit::MmioRead`]), then the
    /// instruction runs on it; a write reports the value the instruction
    /// produced ([`VmExit::MmioWrite`]).
    pub(super) fn emulate_mmio(&mut self, gpa: u64) -> Step {
        let (insn, _) = match self.fetch_insn() {
            Ok(i) => i,
            Err(r) => return r,
        };
        let (size, reads, writes) =
            memory_operand(&insn).map_err(|what| unsupported(format!("MMIO emulation: {what}")))?;
        if size > 8 {
            return Err(unsupported(format!("MMIO emulation of `{insn}`")));
        }
        self.stats.count("mmio");
        let access = PendingMmio { insn, gpa, size, writes };
        if reads {
            self.pending.mmio = Some(access);
            return Ok(Some(VmExit::MmioRead { addr: gpa, size: size as u8 }));
        }
        self.mmio_execute(access, 0)
    }

    /// Runs the MMIO instruction `p` on `value` (what the device read).
    pub(super) fn mmio_execute(&mut self, p: PendingMmio, value: u64) -> Step {
        if let Some(step) = self.far_pointer_load(&p.insn, p.size, value) {
            return step;
        }
        let mut data = value.to_le_bytes()[..p.size].to_vec();
        let (exit, done) = self.redirect_and_run(&p.insn, &mut data)?;
        if done && matches!(exit, Exit::InvalidOpcode | Exit::Kick) {
            self.cpu.eip = p.insn.next_ip32();
            self.counter.retire();
            if p.writes {
                let mut b = [0u8; 8];
                b[..p.size].copy_from_slice(&data);
                return Ok(Some(VmExit::MmioWrite { addr: p.gpa, size: p.size as u8, value: u64::from_le_bytes(b) }));
            }
            return Ok(None);
        }
        self.after_snippet(exit, done, p.insn.next_ip32())
    }

    /// LDS/LES/LFS/LGS/LSS whose far pointer came from MMIO, open bus
    /// beyond RAM or a page the window cannot map (re-execution): the
    /// selector loads through the virtual CPU's checks.
    /// Run natively, the instruction would load whatever *host* selector
    /// the bytes name (found by `popek fuzz cpl3`: selector 0xffff loaded
    /// under direct execution where the architecture says #GP(0xfffc)).
    fn far_pointer_load(&mut self, insn: &Instruction, size: usize, value: u64) -> Option<Step> {
        use iced_x86::Mnemonic;
        let seg = match insn.mnemonic() {
            Mnemonic::Lds => crate::cpu::Seg::Ds,
            Mnemonic::Les => crate::cpu::Seg::Es,
            Mnemonic::Lfs => crate::cpu::Seg::Fs,
            Mnemonic::Lgs => crate::cpu::Seg::Gs,
            Mnemonic::Lss => crate::cpu::Seg::Ss,
            _ => return None,
        };
        let off_size = size.checked_sub(2).filter(|n| *n == 2 || *n == 4)?;
        let bytes = value.to_le_bytes();
        let off = if off_size == 4 {
            u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
        } else {
            u32::from(u16::from_le_bytes([bytes[0], bytes[1]]))
        };
        let sel = u16::from_le_bytes([bytes[off_size], bytes[off_size + 1]]);
        let r = crate::cpu::interrupt::load_segment(&mut self.cpu, &mut self.guest.linear(), seg, sel);
        Some(match r {
            Err(f) => self.fault(f),
            Ok(()) => {
                crate::cpu::operand::gpr_write(&mut self.cpu, insn.op0_register(), off);
                self.cpu.eip = insn.next_ip32();
                self.counter.retire();
                Ok(None)
            }
        })
    }

    /// A string instruction whose accesses the window cannot serve (guest
    /// page 0): run on the virtual CPU, a bounded number of iterations per
    /// step (the rest continue on the next run, natively if they no longer
    /// touch such a page).
    fn emulate_string(&mut self, insn: &Instruction) -> Step {
        use crate::cpu::string::{execute, StringError, StringStep};
        /// Iterations per step: a REP over a whole page stays one step, and
        /// a huge count still lets the run loop deliver interrupts.
        const BUDGET: u32 = 4096;
        self.stats.count("string_emulated");
        let r = execute(&mut self.cpu, &mut self.guest.linear(), insn, BUDGET);
        match r {
            Ok(StringStep::Done) => {
                self.cpu.eip = insn.next_ip32();
                self.counter.retire();
                Ok(None)
            }
            Ok(StringStep::More) => Ok(None),
            Err(StringError::Fault(f)) => self.fault(f),
            Err(e @ StringError::NotString(_)) => Err(unsupported(format!("emulation: {e}"))),
        }
    }

    /// Emulation by re-execution: the instruction at EIP touches guest
    /// memory the window cannot map where the guest sees it (a page below
    /// the host's `mmap_min_addr`, the VMM area's range, a CR0.WP=0
    /// supervisor write to a read-only page). Its memory operand is
    /// redirected to a scratch slot of the vCPU page (through GS), the guest
    /// bytes copied in, the instruction run natively (the hardware computes
    /// the result and the flags), and the bytes copied back.
    pub(super) fn emulate_by_reexecution(&mut self) -> Step {
        let (insn, _) = match self.fetch_insn() {
            Ok(i) => i,
            Err(r) => return r,
        };
        if insn.is_string_instruction() {
            return self.emulate_string(&insn);
        }
        let (size, reads, writes) = memory_operand(&insn).map_err(|what| unsupported(format!("emulation: {what}")))?;
        let lin = match crate::cpu::operand::memory_linear(&self.cpu, &insn, size as u32, writes && !reads) {
            Ok(l) => l,
            Err(f) => return self.fault(f),
        };
        let acc = Access::at_cpl(self.cpu.cpl);
        let mut data = vec![0u8; size];
        if reads || writes {
            if let Err(f) = self.guest.linear().read(&self.cpu, lin, &mut data, acc) {
                return self.fault(f);
            }
        }
        let mut word = [0u8; 8];
        word[..size.min(8)].copy_from_slice(&data[..size.min(8)]);
        if let Some(step) = self.far_pointer_load(&insn, size, u64::from_le_bytes(word)) {
            return step;
        }
        self.stats.count("reexecuted");
        let (exit, done) = self.redirect_and_run(&insn, &mut data)?;
        if done && writes {
            if let Err(f) = self.guest.linear().write(&self.cpu, lin, &data, acc) {
                return self.fault(f);
            }
        }
        if !matches!(exit, Exit::InvalidOpcode | Exit::Kick) {
            // A fault of the instruction itself (e.g. #DE): report it at EIP.
            return self.raise(exception_of(exit));
        }
        self.after_snippet(exit, done, insn.next_ip32())
    }
}
