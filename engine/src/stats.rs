//! Translation statistics: plain counters with stable names (VirtualBox
//! style `/engine/...` paths), cheap enough to keep on always.

use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub blocks_translated: u64,
    /// Of those, blocks of CPL 3 code (translated user code).
    pub user_blocks_translated: u64,
    pub guest_insns_translated: u64,
    pub guest_bytes_translated: u64,
    /// TC bytes in use now (since the last flush), stubs included.
    pub tc_bytes_used: u64,
    /// TC bytes ever emitted.
    pub tc_bytes_emitted: u64,
    /// Exits patched to jump straight to their target (chain operations).
    pub chains_patched: u64,
    /// Chains undone by invalidation.
    pub chains_unpatched: u64,
    /// Unchained exits taken (monitor-reported BlockExit callouts).
    pub exits_unchained: u64,
    /// Indirect lookups that missed (monitor-reported).
    pub indirect_misses: u64,
    /// Indirect lookups that hit (read from the vCPU page when counting is on).
    pub indirect_hits: u64,
    pub indirect_installs: u64,
    /// Of those installs, the ones that replaced another block's entry (two
    /// hot targets with the same low 16 bits).
    pub indirect_conflicts: u64,
    /// Callouts taken, by kind name (monitor-reported).
    pub callouts_taken: BTreeMap<String, u64>,
    /// Callout sites emitted, by kind name.
    pub callout_sites: BTreeMap<String, u64>,
    /// Calls to `invalidate_phys_page`/`revalidate_mappings` that dropped something.
    pub invalidations: u64,
    pub blocks_invalidated: u64,
    /// User blocks set aside because the address space mapped their pages
    /// elsewhere, and of those, taken back when it mapped them again.
    pub blocks_parked: u64,
    pub blocks_revived: u64,
    /// Address-space switches that refreshed the user-page guard bits, and
    /// block entries that stopped at a clear one (`UserPage` callouts).
    pub guard_refreshes: u64,
    pub guard_stops: u64,
    pub flushes: u64,
}

impl Stats {
    /// Every counter with its stable path name.
    pub fn named(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = vec![
            ("/engine/blocks/translated".into(), self.blocks_translated),
            ("/engine/blocks/translated-user".into(), self.user_blocks_translated),
            ("/engine/guest/insns".into(), self.guest_insns_translated),
            ("/engine/guest/bytes".into(), self.guest_bytes_translated),
            ("/engine/tc/bytes-used".into(), self.tc_bytes_used),
            ("/engine/tc/bytes-emitted".into(), self.tc_bytes_emitted),
            ("/engine/chain/patched".into(), self.chains_patched),
            ("/engine/chain/unpatched".into(), self.chains_unpatched),
            ("/engine/exits/unchained".into(), self.exits_unchained),
            ("/engine/indirect/hits".into(), self.indirect_hits),
            ("/engine/indirect/misses".into(), self.indirect_misses),
            ("/engine/indirect/installs".into(), self.indirect_installs),
            ("/engine/indirect/conflicts".into(), self.indirect_conflicts),
            ("/engine/invalidations".into(), self.invalidations),
            ("/engine/blocks/invalidated".into(), self.blocks_invalidated),
            ("/engine/blocks/parked".into(), self.blocks_parked),
            ("/engine/blocks/revived".into(), self.blocks_revived),
            ("/engine/guards/refreshes".into(), self.guard_refreshes),
            ("/engine/guards/stops".into(), self.guard_stops),
            ("/engine/flushes".into(), self.flushes),
        ];
        v.extend(self.callouts_taken.iter().map(|(k, n)| (format!("/engine/callouts/{k}"), *n)));
        v.extend(self.callout_sites.iter().map(|(k, n)| (format!("/engine/sites/{k}"), *n)));
        v
    }
}
