//! Counters with stable names (`shadow/...`), so benchmark reports and logs
//! can be compared across versions.

use crate::EmulateReason;

/// Event counters of one [`crate::ShadowMmu`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every `handle_fault` call (a host fault in the window).
    pub hidden_faults: u64,
    /// Hidden faults resolved by mapping or upgrading a shadow.
    pub resolved: u64,
    /// Pages mapped when the guest's #PF handler returned to the faulting
    /// instruction ([`crate::ShadowMmu::prefault`]): one host fault saved each.
    pub prefaults: u64,
    /// Hidden faults whose shadow already allowed the access (nothing done).
    pub spurious: u64,
    /// Hidden faults reflected to the guest as #PF.
    pub guest_page_faults: u64,
    pub emulate_mmio: u64,
    pub emulate_low_page: u64,
    pub emulate_vmm_area: u64,
    pub emulate_code_write: u64,
    pub emulate_wp0_write: u64,
    pub emulate_supervisor_in_user: u64,
    /// Read-only shadows made writable by a first write (D-bit emulation).
    pub dirty_upgrades: u64,
    pub host_map_calls: u64,
    pub host_unmap_calls: u64,
    pub host_protect_calls: u64,
    /// 4 KiB pages created by `map` calls.
    pub pages_mapped: u64,
    /// 4 KiB pages removed by `unmap` calls.
    pub pages_unmapped: u64,
    pub invlpg: u64,
    pub cr3_switches: u64,
    /// Shadows a MOV CR3 kept because the new address space maps them
    /// identically (summed over switches; a region whose host-call cache is
    /// stale is not counted, since counting it would cost a walk).
    pub cr3_kept_pages: u64,
    /// Shadows a MOV CR3 had to check one by one (their page-table entry
    /// changed, or their directory entry did); the others were checked a
    /// region at a time.
    pub cr3_checked_pages: u64,
    /// Directory regions a MOV CR3 checked (summed over switches).
    pub cr3_regions_checked: u64,
    /// Shadows a MOV CR3 parked (mapped with no rights) because the new
    /// address space has another directory entry there.
    pub cr3_parked_pages: u64,
    /// Supervisor-only shadows a MOV CR3 kept although the new address
    /// space maps nothing there (page-table isolation's user tables).
    pub cr3_absent_kept_pages: u64,
    /// Parked shadows a MOV CR3 revived (their directory entry came back).
    pub cr3_unparked_pages: u64,
    /// Parked shadows unmapped: a fault in their region, or the periodic
    /// eviction that keeps unused regions from being revived forever.
    pub parked_evicted_pages: u64,
    /// Shadows a MOV CR3 dropped without unmapping them first: the new
    /// address space's working-set prefetch mapped its own frame there.
    pub cr3_replaced_pages: u64,
    /// Pages a MOV CR3 mapped from the new address space's working set
    /// (what its hidden faults mapped last time it ran).
    pub working_set_prefetched: u64,
    /// INVLPGs whose shadows stayed because the tables still map them
    /// identically (one per small page or per large page).
    pub invlpg_kept: u64,
    /// Full flushes (CR0/CR4/EFER changes, `flush_all`).
    pub flushes: u64,
    /// CR4.PGE changes: TLB flushes that kept what still maps identically.
    pub global_resyncs: u64,
    /// Shadows such a flush dropped (their tables changed).
    pub global_resync_dropped_pages: u64,
    pub code_pages_protected: u64,
    pub code_pages_unprotected: u64,
    /// Switches to CPL 3 that unmapped supervisor-only pages (isolation).
    pub isolation_unmaps: u64,
}

impl Stats {
    pub(crate) fn count_emulation(&mut self, reason: EmulateReason) {
        let c = match reason {
            EmulateReason::Mmio => &mut self.emulate_mmio,
            EmulateReason::LowPage => &mut self.emulate_low_page,
            EmulateReason::VmmArea => &mut self.emulate_vmm_area,
            EmulateReason::CodeWrite => &mut self.emulate_code_write,
            EmulateReason::SupervisorWriteWp0 => &mut self.emulate_wp0_write,
            EmulateReason::SupervisorInUserMode => &mut self.emulate_supervisor_in_user,
        };
        *c += 1;
    }

    /// All counters with their stable names.
    pub fn counters(&self) -> [(&'static str, u64); 36] {
        [
            ("shadow/faults/hidden", self.hidden_faults),
            ("shadow/faults/resolved", self.resolved),
            ("shadow/faults/spurious", self.spurious),
            ("shadow/faults/prefaulted", self.prefaults),
            ("shadow/tlb/cr3_prefetched_pages", self.working_set_prefetched),
            ("shadow/tlb/cr3_replaced_pages", self.cr3_replaced_pages),
            ("shadow/faults/guest_pf", self.guest_page_faults),
            ("shadow/emulate/mmio", self.emulate_mmio),
            ("shadow/emulate/low_page", self.emulate_low_page),
            ("shadow/emulate/vmm_area", self.emulate_vmm_area),
            ("shadow/emulate/code_write", self.emulate_code_write),
            ("shadow/emulate/wp0_write", self.emulate_wp0_write),
            ("shadow/emulate/supervisor_in_user", self.emulate_supervisor_in_user),
            ("shadow/dirty_upgrades", self.dirty_upgrades),
            ("shadow/host/map", self.host_map_calls),
            ("shadow/host/unmap", self.host_unmap_calls),
            ("shadow/host/protect", self.host_protect_calls),
            ("shadow/pages/mapped", self.pages_mapped),
            ("shadow/pages/unmapped", self.pages_unmapped),
            ("shadow/tlb/invlpg", self.invlpg),
            ("shadow/tlb/cr3", self.cr3_switches),
            ("shadow/tlb/cr3_kept_pages", self.cr3_kept_pages),
            ("shadow/tlb/cr3_checked_pages", self.cr3_checked_pages),
            ("shadow/tlb/cr3_regions_checked", self.cr3_regions_checked),
            ("shadow/tlb/cr3_parked_pages", self.cr3_parked_pages),
            ("shadow/tlb/cr3_absent_kept_pages", self.cr3_absent_kept_pages),
            ("shadow/tlb/cr3_unparked_pages", self.cr3_unparked_pages),
            ("shadow/tlb/parked_evicted_pages", self.parked_evicted_pages),
            ("shadow/tlb/invlpg_kept", self.invlpg_kept),
            ("shadow/tlb/flush", self.flushes),
            ("shadow/tlb/global_resync", self.global_resyncs),
            ("shadow/tlb/global_resync_dropped_pages", self.global_resync_dropped_pages),
            ("shadow/code/protected", self.code_pages_protected),
            ("shadow/code/unprotected", self.code_pages_unprotected),
            ("shadow/isolation/unmaps", self.isolation_unmaps),
            ("shadow/emulate/total", self.emulations()),
        ]
    }

    /// Sum of the emulation counters.
    pub fn emulations(&self) -> u64 {
        self.emulate_mmio
            + self.emulate_low_page
            + self.emulate_vmm_area
            + self.emulate_code_write
            + self.emulate_wp0_write
            + self.emulate_supervisor_in_user
    }
}
