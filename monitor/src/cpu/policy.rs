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

/// The guest CPUID/MSR policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuPolicy {
    pub vendor: [u8; 12],
    /// Leaf 1 EAX: family 6, model 13 (a Pentium M: SSE2, no long mode).
    pub signature: u32,
    pub edx1: u32,
    pub ecx1: u32,
    pub brand: [u8; 48],
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
        }
    }
}

impl CpuPolicy {
    /// Offers PAE (for PAE guest kernels) when the shadow MMU handles it.
    pub fn with_pae(mut self) -> Self {
        self.edx1 |= edx1::PAE;
        self
    }

    /// CPUID leaf `eax` (subleaf `ecx`): `[eax, ebx, ecx, edx]`.
    pub fn cpuid(&self, leaf: u32, _subleaf: u32) -> [u32; 4] {
        let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        match leaf {
            0 => [2, word(&self.vendor[0..4]), word(&self.vendor[8..12]), word(&self.vendor[4..8])],
            // EBX: CLFLUSH line size 8 qwords, one logical CPU, APIC id 0.
            1 => [self.signature, 0x0001_0800, self.ecx1, self.edx1],
            2 => [0x0000_0001, 0, 0, 0],
            0x8000_0000 => [0x8000_0004, 0, 0, 0],
            0x8000_0001 => [0, 0, 0, 0],
            0x8000_0002..=0x8000_0004 => {
                let o = ((leaf - 0x8000_0002) * 16) as usize;
                let b = &self.brand[o..o + 16];
                [word(&b[0..4]), word(&b[4..8]), word(&b[8..12]), word(&b[12..16])]
            }
            // Out-of-range basic leaves return the highest basic leaf's data (Intel).
            l if l < 0x8000_0000 => self.cpuid(2, 0),
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
    pub const PAT: u32 = 0x277;
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
        assert_ne!(p.clone().with_pae().cpuid(1, 0)[3] & edx1::PAE, 0);
    }
}
