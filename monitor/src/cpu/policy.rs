//! The CPU the guest is told it runs on: a plain 686-class processor with
//! SSE2, no SYSENTER/SYSCALL (their fast paths lose the return address on
//! this kind of host, see docs/execution-host.md), no RDRAND, no long mode.
//! Both backends present the same policy.

/// CPUID leaf 1 EDX feature bits.
pub mod edx1 {
    pub const FPU: u32 = 1 << 0;
    pub const DE: u32 = 1 << 2;
    pub const PSE: u32 = 1 << 3;
    pub const TSC: u32 = 1 << 4;
    pub const MSR: u32 = 1 << 5;
    pub const PAE: u32 = 1 << 6;
    pub const CX8: u32 = 1 << 8;
    pub const APIC: u32 = 1 << 9;
    pub const SEP: u32 = 1 << 11;
    pub const PGE: u32 = 1 << 13;
    pub const CMOV: u32 = 1 << 15;
    pub const PAT: u32 = 1 << 16;
    pub const CLFSH: u32 = 1 << 19;
    pub const MMX: u32 = 1 << 23;
    pub const FXSR: u32 = 1 << 24;
    pub const SSE: u32 = 1 << 25;
    pub const SSE2: u32 = 1 << 26;
}

/// CPUID leaf 1 ECX feature bits.
pub mod ecx1 {
    /// The local APIC timer has TSC-deadline mode (IA32_TSC_DEADLINE).
    pub const TSC_DEADLINE: u32 = 1 << 24;
}

/// CPUID leaf 0x8000_0001 EDX: execute-disable (EFER.NXE, PTE bit 63).
pub const EXT_EDX_NX: u32 = 1 << 20;
/// CPUID leaf 7 EDX: the IA32_ARCH_CAPABILITIES MSR exists.
pub const EDX7_ARCH_CAPABILITIES: u32 = 1 << 29;
/// IA32_ARCH_CAPABILITIES bit 0: not susceptible to rogue data cache load
/// (Meltdown); Linux then leaves page-table isolation off.
pub const ARCH_CAP_RDCL_NO: u64 = 1 << 0;
/// EFER bits the guest may set: NXE only (no long mode, no SYSCALL).
pub const EFER_NXE: u64 = 1 << 11;

/// The guest CPUID/MSR policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuPolicy {
    pub vendor: [u8; 12],
    /// Leaf 1 EAX: family 6, model 13 (a Pentium M: SSE2, no long mode).
    pub signature: u32,
    pub edx1: u32,
    pub ecx1: u32,
    pub brand: [u8; 48],
    /// The guest TSC's frequency, announced in leaves 0x15 (a crystal of
    /// `tsc_hz / tsc_ratio` Hz, TSC = crystal × `tsc_ratio`) and 0x16; `None`
    /// keeps the highest basic leaf at 2 (the `isa` machine's CPU).
    pub tsc_hz: Option<u64>,
    /// Leaf 0x8000_0001 EDX: NX on the `pc` machine (its shadow MMU maps
    /// XD pages without host execute rights), nothing on `isa` (traces
    /// recorded there must see the same CPU).
    pub ext_edx: u32,
    /// IA32_ARCH_CAPABILITIES, announced in leaf 7 when `Some`:
    /// `RDCL_NO` only when the monitor itself keeps supervisor pages out of
    /// user code's reach (`--engine isolate`), see docs/security.md.
    pub arch_caps: Option<u64>,
}

impl Default for CpuPolicy {
    fn default() -> Self {
        use edx1::*;
        let mut brand = [0u8; 48];
        let b = b"Popek virtual 686 CPU";
        brand[..b.len()].copy_from_slice(b);
        CpuPolicy {
            vendor: *b"GenuineIntel",
            signature: 0x0000_06D8,
            edx1: FPU | DE | PSE | TSC | MSR | CX8 | PGE | CMOV | PAT | CLFSH | MMX | FXSR | SSE | SSE2,
            ecx1: 0,
            brand,
            tsc_hz: None,
            ext_edx: 0,
            arch_caps: None,
        }
    }
}

impl CpuPolicy {
    /// Offers PAE (for PAE guest kernels) when the shadow MMU handles it.
    pub fn with_pae(mut self) -> Self {
        self.edx1 |= edx1::PAE;
        self
    }

    /// The CPU of the `pc` machine: a local APIC (IA32_APIC_BASE) with the
    /// TSC-deadline timer (IA32_TSC_DEADLINE), and a TSC of `tsc_hz` that
    /// CPUID announces (leaves 0x15 and 0x16), so that Linux neither
    /// calibrates the TSC nor the APIC timer.
    pub fn pc(tsc_hz: u64) -> Self {
        let mut p = Self::default();
        p.edx1 |= edx1::APIC;
        p.ecx1 |= ecx1::TSC_DEADLINE;
        p.tsc_hz = Some(tsc_hz.max(1_000_000));
        p.ext_edx = EXT_EDX_NX;
        p
    }

    /// The `pc` CPU as it was before it offered the TSC-deadline timer:
    /// traces recorded then replay on it.
    pub fn without_tsc_deadline(mut self) -> Self {
        self.ecx1 &= !ecx1::TSC_DEADLINE;
        self
    }

    /// Tells the guest it is not susceptible to Meltdown (RDCL_NO): right
    /// when user code cannot reach supervisor pages in the window, i.e. with
    /// user isolation. Needs leaf 7 (the `pc` machine); no effect otherwise.
    pub fn with_rdcl_no(mut self) -> Self {
        if self.max_basic_leaf() >= 7 {
            self.arch_caps = Some(ARCH_CAP_RDCL_NO);
        }
        self
    }

    /// Does the CPU offer NX (and so EFER)?
    pub fn has_nx(&self) -> bool {
        self.ext_edx & EXT_EDX_NX != 0
    }

    /// Has the CPU a local APIC?
    pub fn has_apic(&self) -> bool {
        self.edx1 & edx1::APIC != 0
    }

    /// Has the local APIC timer TSC-deadline mode (only with an APIC)?
    pub fn has_tsc_deadline(&self) -> bool {
        self.has_apic() && self.ecx1 & ecx1::TSC_DEADLINE != 0
    }

    /// TSC / crystal ratio of leaf 0x15: the smallest that makes the crystal
    /// frequency fit ECX.
    fn tsc_ratio(tsc_hz: u64) -> u32 {
        u32::try_from(tsc_hz / (1 << 32) + 1).unwrap_or(u32::MAX)
    }

    /// The crystal clock of leaf 0x15: the local APIC timer's input clock.
    pub fn crystal_hz(&self) -> Option<u64> {
        self.tsc_hz.map(|t| t / u64::from(Self::tsc_ratio(t)))
    }

    fn max_basic_leaf(&self) -> u32 {
        if self.tsc_hz.is_some() {
            0x16
        } else {
            2
        }
    }

    /// CPUID leaf `eax` (subleaf `ecx`): `[eax, ebx, ecx, edx]`.
    pub fn cpuid(&self, leaf: u32, _subleaf: u32) -> [u32; 4] {
        let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let max = self.max_basic_leaf();
        match leaf {
            0 => [max, word(&self.vendor[0..4]), word(&self.vendor[8..12]), word(&self.vendor[4..8])],
            // EBX: CLFLUSH line size 8 qwords, one logical CPU, APIC id 0.
            1 => [self.signature, 0x0001_0800, self.ecx1, self.edx1],
            2 => [0x0000_0001, 0, 0, 0],
            // Thermal and power: ARAT (the APIC timer runs in every C-state).
            6 if max >= 6 => [1 << 2, 0, 0, 0],
            7 if max >= 7 => [0, 0, 0, if self.arch_caps.is_some() { EDX7_ARCH_CAPABILITIES } else { 0 }],
            0x15 if max >= 0x15 => {
                let tsc = self.tsc_hz.unwrap_or(0);
                let ratio = Self::tsc_ratio(tsc);
                [1, ratio, self.crystal_hz().and_then(|c| u32::try_from(c).ok()).unwrap_or(0), 0]
            }
            0x16 if max >= 0x16 => {
                let mhz = u32::try_from(self.tsc_hz.unwrap_or(0) / 1_000_000).unwrap_or(0) & 0xFFFF;
                [mhz, mhz, 100, 0]
            }
            3..=0x14 if leaf <= max => [0, 0, 0, 0],
            0x8000_0000 => [0x8000_0004, 0, 0, 0],
            0x8000_0001 => [0, 0, 0, self.ext_edx],
            0x8000_0002..=0x8000_0004 => {
                let o = ((leaf - 0x8000_0002) * 16) as usize;
                let b = &self.brand[o..o + 16];
                [word(&b[0..4]), word(&b[4..8]), word(&b[8..12]), word(&b[12..16])]
            }
            // Out-of-range basic leaves return the highest basic leaf's data (Intel).
            l if l < 0x8000_0000 => self.cpuid(max, 0),
            _ => [0, 0, 0, 0],
        }
    }
}

/// MSRs a 686 has and Linux touches. Anything else is #GP, as on hardware.
pub mod msr {
    pub const TSC: u32 = 0x10;
    pub const PLATFORM_ID: u32 = 0x17;
    pub const BIOS_SIGN_ID: u32 = 0x8B;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MISC_ENABLE: u32 = 0x1A0;
    /// IA32_APIC_BASE (CPUs with a local APIC).
    pub const APIC_BASE: u32 = 0x1B;
    /// IA32_TSC_DEADLINE (CPUs with TSC-deadline mode): held by the local
    /// APIC, served by the machine.
    pub const TSC_DEADLINE: u32 = 0x6E0;
    pub const PAT: u32 = 0x277;
    /// IA32_ARCH_CAPABILITIES (read-only; CPUs that announce it in leaf 7).
    pub const ARCH_CAPABILITIES: u32 = 0x10A;
    /// IA32_EFER (CPUs with NX here: only NXE is writable).
    pub const EFER: u32 = 0xC000_0080;
}

/// IA32_APIC_BASE: the enable bit (11) is the guest's; the BSP flag (8) is
/// read-only; the base stays at `LAPIC_BASE`: a relocation, like a reserved
/// bit (x2APIC's enable among them), is refused with #GP.
pub fn apic_base_write(old: u64, value: u64) -> Result<u64, super::Fault> {
    const ENABLE: u64 = 1 << 11;
    const BSP: u64 = 1 << 8;
    if value & !(ENABLE | BSP) != crate::layout::LAPIC_BASE {
        crate::guest_warn!(
            value = format_args!("{value:#x}"),
            "IA32_APIC_BASE: relocation or reserved bits refused (#GP)"
        );
        return Err(super::Fault::gp(0));
    }
    Ok((old & !ENABLE) | (value & ENABLE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_is_a_plain_686() {
        let p = CpuPolicy::default();
        let l0 = p.cpuid(0, 0);
        let mut v = Vec::new();
        for w in [l0[1], l0[3], l0[2]] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&v, b"GenuineIntel");
        let edx = p.cpuid(1, 0)[3];
        for bit in
            [edx1::TSC, edx1::CX8, edx1::CMOV, edx1::PSE, edx1::PGE, edx1::FXSR, edx1::MMX, edx1::SSE, edx1::SSE2]
        {
            assert_ne!(edx & bit, 0);
        }
        assert_eq!(edx & edx1::SEP, 0, "SYSENTER hidden");
        assert_eq!(edx & edx1::PAE, 0, "PAE only on request");
        assert_eq!(p.cpuid(1, 0)[2] & (1 << 30), 0, "no RDRAND");
        assert_eq!(p.cpuid(0x8000_0001, 0)[3] & (1 << 29), 0, "no long mode");
        assert_ne!(p.with_pae().cpuid(1, 0)[3] & edx1::PAE, 0);
        assert_eq!(p.cpuid(0, 0)[0], 2);
        assert_eq!(p.cpuid(0x15, 0), p.cpuid(2, 0), "beyond the highest leaf: the highest's data");
    }

    #[test]
    fn pc_cpu_announces_apic_and_tsc_frequency() {
        let p = CpuPolicy::pc(2_450_123_000);
        assert!(p.has_apic());
        assert_ne!(p.cpuid(1, 0)[3] & edx1::APIC, 0);
        assert_eq!(p.cpuid(0, 0)[0], 0x16);
        let [den, num, crystal, _] = p.cpuid(0x15, 0);
        assert_eq!(u64::from(crystal) * u64::from(num) / u64::from(den), 2_450_123_000);
        assert_eq!(p.cpuid(0x16, 0)[0], 2450);
        assert_eq!(p.cpuid(6, 0)[0], 1 << 2);
        assert_eq!(p.cpuid(7, 0), [0; 4], "no structured extended features");
        assert_ne!(p.cpuid(0x8000_0001, 0)[3] & EXT_EDX_NX, 0, "NX on the pc machine");
        assert_eq!(CpuPolicy::default().cpuid(0x8000_0001, 0)[3], 0, "isa: the recorded traces' CPU");
        let iso = p.with_rdcl_no();
        assert_ne!(iso.cpuid(7, 0)[3] & EDX7_ARCH_CAPABILITIES, 0);
        assert_eq!(iso.arch_caps, Some(ARCH_CAP_RDCL_NO));
        assert_eq!(CpuPolicy::default().with_rdcl_no().arch_caps, None, "no leaf 7 on isa");
        assert_ne!(p.cpuid(1, 0)[2] & ecx1::TSC_DEADLINE, 0, "TSC-deadline timer");
        assert!(p.has_tsc_deadline());
        let isa = CpuPolicy::default();
        assert_eq!(isa.cpuid(1, 0)[2] & ecx1::TSC_DEADLINE, 0, "isa: no APIC, no TSC-deadline");
        assert!(!isa.has_tsc_deadline());
        // A TSC beyond 4.29 GHz: a crystal of half of it.
        let fast = CpuPolicy::pc(5_000_000_000);
        assert_eq!(fast.cpuid(0x15, 0), [1, 2, 2_500_000_000, 0]);
        assert_eq!(fast.crystal_hz(), Some(2_500_000_000));
    }

    #[test]
    fn apic_base_takes_the_enable_bit_and_refuses_relocation() {
        let reset = 0xFEE0_0900;
        assert_eq!(apic_base_write(reset, 0xFEE0_0100), Ok(0xFEE0_0100), "disable");
        assert_eq!(apic_base_write(0xFEE0_0100, 0xFEE0_0800), Ok(0xFEE0_0900), "enable; BSP stays");
        assert!(apic_base_write(reset, 0xFED0_0900).is_err(), "relocation");
        assert!(apic_base_write(reset, 0xFEE0_0D00).is_err(), "x2APIC enable");
        assert!(apic_base_write(reset, 0x1_FEE0_0900).is_err(), "beyond the physical width");
    }
}
