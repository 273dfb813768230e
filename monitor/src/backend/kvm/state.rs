//! Conversions between the virtual CPU's state and KVM's structures, and
//! the CPUID policy the kvm backend gives its guest.

use super::*;

pub(super) fn to_kvm_seg(s: &SegReg) -> kvm_segment {
    let c = &s.cache;
    kvm_segment {
        base: u64::from(c.base),
        limit: c.limit,
        selector: s.selector,
        type_: c.typ,
        present: u8::from(c.present),
        dpl: c.dpl,
        db: u8::from(c.db),
        s: u8::from(c.s),
        l: 0,
        g: u8::from(c.g),
        avl: u8::from(c.avl),
        unusable: u8::from(!c.present),
        padding: 0,
    }
}

pub(super) fn from_kvm_seg(k: &kvm_segment) -> SegReg {
    SegReg {
        selector: k.selector,
        cache: Descriptor {
            base: k.base as u32,
            limit: k.limit,
            typ: k.type_ & 0xF,
            s: k.s != 0,
            dpl: k.dpl & 3,
            present: k.present != 0 && k.unusable == 0,
            db: k.db != 0,
            g: k.g != 0,
            avl: k.avl != 0,
        },
    }
}

pub(super) fn to_kvm_dtable(t: &TableReg) -> kvm_dtable {
    kvm_dtable { base: u64::from(t.base), limit: t.limit, padding: [0; 3] }
}

/// Fills `sregs` (as read from KVM, to keep fields Popek does not model)
/// from the neutral state.
pub(super) fn apply_sregs(sregs: &mut kvm_sregs, cpu: &Cpu) {
    sregs.es = to_kvm_seg(cpu.seg(Seg::Es));
    sregs.cs = to_kvm_seg(cpu.seg(Seg::Cs));
    sregs.ss = to_kvm_seg(cpu.seg(Seg::Ss));
    sregs.ds = to_kvm_seg(cpu.seg(Seg::Ds));
    sregs.fs = to_kvm_seg(cpu.seg(Seg::Fs));
    sregs.gs = to_kvm_seg(cpu.seg(Seg::Gs));
    sregs.tr = to_kvm_seg(&cpu.tr);
    sregs.ldt = to_kvm_seg(&cpu.ldtr);
    sregs.gdt = to_kvm_dtable(&cpu.gdtr);
    sregs.idt = to_kvm_dtable(&cpu.idtr);
    sregs.cr0 = u64::from(cpu.cr0);
    sregs.cr2 = u64::from(cpu.cr2);
    sregs.cr3 = u64::from(cpu.cr3);
    sregs.cr4 = u64::from(cpu.cr4);
    sregs.efer = cpu.msr.efer;
    sregs.apic_base = cpu.msr.apic_base;
    sregs.interrupt_bitmap = [0; 4];
}

pub(super) fn to_kvm_regs(cpu: &Cpu) -> kvm_regs {
    let g = |i: usize| u64::from(cpu.gpr[i]);
    kvm_regs {
        rax: g(0),
        rcx: g(1),
        rdx: g(2),
        rbx: g(3),
        rsp: g(4),
        rbp: g(5),
        rsi: g(6),
        rdi: g(7),
        rip: u64::from(cpu.eip),
        rflags: u64::from(cpu.eflags | 2),
        ..Default::default()
    }
}

/// The guest-visible MSRs Popek models and KVM holds.
pub(super) const MSR_LIST: [u32; 4] = [msr::SYSENTER_CS, msr::SYSENTER_ESP, msr::SYSENTER_EIP, msr::PAT];

pub(super) fn msr_entries(cpu: &Cpu) -> Vec<kvm_msr_entry> {
    let m = &cpu.msr;
    [
        (msr::SYSENTER_CS, u64::from(m.sysenter_cs)),
        (msr::SYSENTER_ESP, u64::from(m.sysenter_esp)),
        (msr::SYSENTER_EIP, u64::from(m.sysenter_eip)),
        (msr::PAT, m.pat),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect()
}

// ---- CPUID -----------------------------------------------------------------

/// Highest basic and extended leaves the guest sees.
pub(super) const MAX_BASIC_LEAF: u32 = 1;
pub(super) const MAX_EXT_LEAF: u32 = 0x8000_0004;

/// The guest CPUID: KVM's supported leaves filtered down to a plain 686.
///
/// - leaf 0: the host vendor string, highest basic leaf 1;
/// - leaf 1: the host family/model/stepping; EBX with APIC id 0 and one
///   logical CPU; ECX = 0 (no SSE3+, no RDRAND, no x2APIC, no AVX/XSAVE, no
///   hypervisor bit); EDX = host ∩ [`CpuPolicy`]'s 686 set (FPU, DE, PSE,
///   TSC, MSR, CX8, PGE, CMOV, PAT, CLFSH, MMX, FXSR, SSE, SSE2): no APIC
///   (there is no in-kernel irqchip), no SEP, no PAE;
/// - 0x80000000-0x80000004: the host's brand string, but 0x80000001 empty
///   (no SYSCALL, no long mode, no NX);
/// - nothing else: no KVM paravirtual leaves (0x4000_0000), no cache or
///   topology leaves.
pub fn cpuid_policy(supported: &[kvm_cpuid_entry2]) -> Vec<kvm_cpuid_entry2> {
    let policy = CpuPolicy::default();
    let host = |leaf: u32| supported.iter().find(|e| e.function == leaf && e.index == 0).copied();
    let entry = |function: u32, r: [u32; 4]| kvm_cpuid_entry2 {
        function,
        index: 0,
        flags: 0,
        eax: r[0],
        ebx: r[1],
        ecx: r[2],
        edx: r[3],
        padding: [0; 3],
    };
    let mut out = Vec::new();
    if let Some(l0) = host(0) {
        out.push(entry(0, [l0.eax.min(MAX_BASIC_LEAF), l0.ebx, l0.ecx, l0.edx]));
    }
    if let Some(l1) = host(1) {
        let ebx = (l1.ebx & 0x0000_FF00) | (1 << 16);
        out.push(entry(1, [l1.eax, ebx, 0, l1.edx & policy.edx1]));
    }
    if let Some(e0) = host(0x8000_0000) {
        let max = e0.eax.min(MAX_EXT_LEAF);
        out.push(entry(0x8000_0000, [max, e0.ebx, e0.ecx, e0.edx]));
        if max >= 0x8000_0001 {
            let sig = host(0x8000_0001).map_or(0, |e| e.eax);
            out.push(entry(0x8000_0001, [sig, 0, 0, 0]));
        }
        for leaf in 0x8000_0002..=max {
            if let Some(b) = host(leaf) {
                out.push(entry(leaf, [b.eax, b.ebx, b.ecx, b.edx]));
            }
        }
    }
    out
}

// ---- the backend --------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, r: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, eax: r[0], ebx: r[1], ecx: r[2], edx: r[3], ..Default::default() }
    }

    #[test]
    fn cpuid_policy_is_a_plain_686() {
        let host = [
            leaf(0, [0x10, 0x6874_7541, 0x444D_4163, 0x6974_6E65]), // AuthenticAMD
            leaf(1, [0x00A0_0F11, 0x0A20_0800, 0xFEDA_3203, 0x178B_FBFF]),
            leaf(7, [0, 0xFFFF_FFFF, 0, 0]),
            leaf(0x4000_0000, [0x4000_0001, 1, 2, 3]),
            leaf(0x8000_0000, [0x8000_0028, 0x6874_7541, 0x444D_4163, 0x6974_6E65]),
            leaf(0x8000_0001, [0x00A0_0F11, 0, 0x75C2_37FF, 0x2FD3_FBFF]),
            leaf(0x8000_0002, [1, 2, 3, 4]),
            leaf(0x8000_0003, [5, 6, 7, 8]),
            leaf(0x8000_0004, [9, 10, 11, 12]),
            leaf(0x8000_0008, [0x3030, 0, 0, 0]),
        ];
        let p = cpuid_policy(&host);
        let get = |f: u32| p.iter().find(|e| e.function == f).copied();
        let l0 = get(0).unwrap();
        assert_eq!((l0.eax, l0.ebx, l0.ecx, l0.edx), (1, 0x6874_7541, 0x444D_4163, 0x6974_6E65), "vendor kept");
        let l1 = get(1).unwrap();
        assert_eq!(l1.ecx, 0, "no SSE3+, RDRAND (bit 30), x2APIC (21), AVX (28), XSAVE (26)");
        assert_eq!(l1.edx & (1 << 9), 0, "no APIC");
        assert_eq!(l1.edx & (1 << 11), 0, "no SEP");
        assert_eq!(l1.edx & (1 << 6), 0, "no PAE");
        for bit in [0, 3, 4, 8, 13, 15, 16, 23, 24, 25, 26] {
            assert_ne!(l1.edx & (1 << bit), 0, "686 feature bit {bit} kept");
        }
        assert_eq!(l1.ebx >> 24, 0, "APIC id 0");
        assert!(get(7).is_none() && get(0x4000_0000).is_none() && get(0x8000_0008).is_none());
        assert_eq!(get(0x8000_0000).unwrap().eax, 0x8000_0004);
        let e1 = get(0x8000_0001).unwrap();
        assert_eq!((e1.ecx, e1.edx), (0, 0), "no SYSCALL, long mode, NX");
        assert_eq!(get(0x8000_0003).unwrap().ebx, 6, "brand string kept");
    }

    #[test]
    fn segments_round_trip() {
        let cpu = Cpu::flat_protected(0x08, 0x10);
        for s in Seg::ALL {
            assert_eq!(from_kvm_seg(&to_kvm_seg(cpu.seg(s))), *cpu.seg(s));
        }
        assert_eq!(from_kvm_seg(&to_kvm_seg(&cpu.tr)), cpu.tr);
        assert_eq!(to_kvm_seg(&cpu.ldtr).unusable, 1, "a null LDTR is unusable");
    }
}
