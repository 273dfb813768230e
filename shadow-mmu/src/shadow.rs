//! The shadow state: which guest-virtual pages the window maps, to which
//! guest-physical frame, with which host rights, and which guest translation
//! each came from. It behaves like a TLB: entries are created on hidden
//! faults, dropped on INVLPG / MOV CR3 / paging-mode changes, and may stay
//! stale in between exactly as far as the architecture allows.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A multiplicative hash for frame numbers (FxHash's): the shadow state is
/// keyed by page-aligned integers that no one chooses adversarially, and
/// SipHash showed up in profiles of MOV CR3 under page-table isolation.
#[derive(Default)]
struct FrameHasher(u64);

impl Hasher for FrameHasher {
    fn finish(&self) -> u64 {
        // Page-aligned keys leave the product's low bits zero, and those
        // are std's bucket index: the high bits go low (engine::fxhash).
        self.0.rotate_left(26)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type FrameMap<V> = HashMap<u64, V, BuildHasherDefault<FrameHasher>>;
type FrameSet = HashSet<u64, BuildHasherDefault<FrameHasher>>;
use std::ops::RangeInclusive;
use std::sync::Arc;

use tracing::{debug, trace};

use crate::error::MmuError;
use crate::host::{HostMapper, PhysMem, Prot};
use crate::paging::{
    accessed_neighbour, cr0, cr4, dir_key, dir_reserved, directory_entry, efer, leaf_of, load_pdptes, pte, walk,
    Access, PageFault, PageSize, PagingMode, PagingRegs, Perms, Translation, PAGE_MASK, PAGE_SIZE,
};
use crate::stats::Stats;

/// Tunables and host constraints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmuConfig {
    /// The host's `vm.mmap_min_addr`: pages below it are never mapped.
    pub mmap_min_addr: u32,
    /// Base of the VMM area: nothing is mapped at or above it.
    pub vmm_base: u32,
    /// Largest run (bytes) mapped in one call from consecutive 4 KiB PTEs.
    pub batch_small: u32,
    /// Largest run (bytes) mapped in one call inside a 2/4 MiB guest page,
    /// or of identity-mapped RAM with paging off.
    pub batch_large: u32,
    /// Isolation of user code: on a switch to CPL 3, unmap supervisor-only
    /// shadows and refuse to map them while at CPL 3.
    pub user_isolation: bool,
    /// MOV CR3 maps what the new address space's hidden faults mapped last
    /// time it ran ([`ShadowMmu::working_sets`]).
    pub working_set: bool,
}

impl Default for MmuConfig {
    fn default() -> Self {
        MmuConfig {
            mmap_min_addr: 4096,
            vmm_base: 0xFF80_0000,
            batch_small: 64 << 10,
            batch_large: 4 << 20,
            user_isolation: false,
            working_set: true,
        }
    }
}

/// Why a hidden fault must go to the instruction emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EmulateReason {
    /// The guest-physical address is not RAM (MMIO or a hole).
    Mmio,
    /// The guest-virtual page is below the host's `mmap_min_addr`.
    LowPage,
    /// The guest-virtual address is inside the VMM area.
    VmmArea,
    /// A write to a guest-physical page holding translated code: invalidate
    /// its translations, call [`ShadowMmu::unprotect_code_page`], retry.
    CodeWrite,
    /// A supervisor write to a read-only page with CR0.WP=0: allowed by the
    /// guest architecture, but the shadow stays read-only.
    SupervisorWriteWp0,
    /// A supervisor-only page touched at CPL 3 under user isolation.
    SupervisorInUserMode,
}

/// What the monitor does after a hidden fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The shadow now allows the access: resume the faulting instruction.
    Resolved,
    /// Deliver #PF to the guest with this CR2 and error code.
    GuestPageFault { cr2: u32, error_code: u32 },
    /// Emulate the instruction; `gpa` is the guest-physical address of the
    /// faulting access (A/D are already set in the guest's entries).
    Emulate { gpa: u64, reason: EmulateReason },
}

/// One shadowed 4 KiB page of the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowEntry {
    /// Guest-physical frame mapped there.
    pub gpa: u64,
    /// Host rights currently in force.
    pub prot: Prot,
    /// Linear base and size of the guest page this came from (INVLPG of any
    /// address inside a large page drops all its shadows).
    pub guest_page: u32,
    pub guest_size: PageSize,
    /// Survives MOV CR3 (G in the leaf with CR4.PGE).
    pub global: bool,
    /// The guest lets user mode reach it; `false` is a supervisor-only page.
    pub user: bool,
    /// The guest grants write and D is set: writable unless code-protected.
    pub write_ok: bool,
    /// For a shadow of a 2/4 MiB page, the directory entry that maps it
    /// ([`crate::paging::dir_key`]): a MOV CR3 keeps the shadow when the new
    /// address space has the same one. 0 for 4 KiB pages, which are
    /// compared leaf by leaf.
    pub dir: u64,
}

/// The shadow MMU of one vCPU.
#[derive(Debug)]
pub struct ShadowMmu {
    config: MmuConfig,
    regs: PagingRegs,
    /// PAE PDPTE registers, loaded like MOV CR3 loads them.
    pdptes: [u64; 4],
    /// Keyed by guest-virtual page base.
    entries: BTreeMap<u32, ShadowEntry>,
    /// The non-global subset of `entries`' keys: MOV CR3 drops exactly
    /// these, without walking the (mostly global) kernel shadows.
    nonglobal: BTreeSet<u32>,
    /// How many of `nonglobal` fall in each 2 MiB of the guest-virtual
    /// space (the smallest directory region): a MOV CR3 asks per region
    /// whether it holds any, and a range query of the set per region was
    /// 17 % of a page-table-isolation kernel's time.
    nonglobal_per_2m: Vec<u32>,
    /// Guest-physical frame → virtual aliases shadowing it.
    rmap: FrameMap<BTreeSet<u32>>,
    /// Large guest pages that have (or had) shadows, for INVLPG.
    large: BTreeSet<(u32, PageSize)>,
    /// Guest-physical frames holding translated code.
    code_pages: FrameSet,
    /// What the non-global shadows in force were validated under, per
    /// directory region (2 MiB under PAE, 4 MiB otherwise): MOV CR3 checks
    /// a region at once when its directory entry and page-table bytes did
    /// not change, and page by page only where they did.
    regions: BTreeMap<u32, Region>,
    /// Regions whose non-global shadows belong to another address space
    /// (the current one has another directory entry there): their entries
    /// stay in `entries`, mapped on the host with no rights, so any access
    /// faults as if they were gone. A MOV CR3 back to an address space with
    /// that directory entry revives them with one `protect` per run instead
    /// of a hidden fault and an `mmap` each; a fault in the region while
    /// parked unmaps them.
    parked_regions: BTreeMap<u32, Region>,
    /// Per address space (CR3), the non-global pages its last hidden faults
    /// mapped, most recent last: a MOV CR3 back to it maps those whose
    /// guest entries are still present and accessed, one `mmap` each
    /// instead of a host fault (a trap, 5-9 µs here) and the same `mmap`.
    working_sets: HashMap<u32, Vec<u32>>,
    cpl: u8,
    stats: Stats,
}

/// Pages remembered per address space ([`ShadowMmu::working_sets`]).
const WORKING_SET_PAGES: usize = 16;
/// Address spaces remembered (a fork storm must not grow the map).
const WORKING_SET_SPACES: usize = 256;

/// The validation state of the non-global shadows of one directory region.
#[derive(Clone, Debug, Default)]
struct Region {
    /// The directory entry ([`dir_key`]) every one of them was validated
    /// under; `None` when they came from different ones.
    key: Option<u64>,
    /// First page covered by `snap`.
    lo: u32,
    /// The page-table bytes of `lo` and the pages after it, as they were
    /// when the shadows were last validated (4 KiB pages only).
    snap: Vec<u8>,
    /// 4 KiB pages installed or upgraded since `snap` was taken: their
    /// entries changed (A/D) or are not covered, so they are checked alone.
    fresh: Vec<u32>,
    /// Some shadow lets writes through (a large page's D must still be set).
    write_ok: bool,
    /// Times parked: every [`EVICT_EVERY`]th park unmaps instead, so a region
    /// the guest stopped using leaves the working set.
    parks: u32,
    /// Its pages as host calls see them; `None` once a shadow of the region
    /// was added, removed or changed rights.
    cache: Option<Arc<RegionCache>>,
    /// The other half of a page-table isolation pair: a directory entry
    /// under which none of these (supervisor-only) pages is present, with
    /// its page-table bytes then. While they are unchanged the shadows
    /// stay in place there, as for a region that is not mapped at all.
    alt: Option<AbsentView>,
    /// No shadow of the region was added, removed or changed since `snap`
    /// was taken: every one is inside it, nothing needs looking up.
    settled: bool,
}

/// Where a region's shadows are all absent ([`Region::alt`]).
#[derive(Clone, Debug)]
struct AbsentView {
    key: u64,
    lo: u32,
    snap: Vec<u8>,
}

/// What parking and reviving a region costs in host calls, computed once
/// per change of its shadows instead of once per MOV CR3.
#[derive(Clone, Debug, Default)]
struct RegionCache {
    /// Non-global shadows.
    pages: usize,
    /// `(first, last page)` spans to protect to none when parking.
    park: Vec<(u32, u32)>,
    /// `(start, len, rights)` runs to restore when reviving.
    revive: Vec<(u32, u32, Prot)>,
    /// Every shadow is of a supervisor-only page.
    supervisor_only: bool,
}

/// What [`ShadowMmu::check_region`] found.
struct RegionCheck {
    /// Pages that no longer map as their shadow says (ascending).
    failed: Vec<u32>,
    /// The region's current directory entry, if usable.
    key: Option<u64>,
    /// Nothing was checked alone: the region's record stays as it is.
    unchanged: bool,
    /// Every non-global shadow of the region failed.
    all_failed: bool,
    /// Pages checked one by one.
    checked: usize,
}

/// A region is unmapped rather than parked once in this many parks: MOV
/// CR3 revives every parked region of the address space, touched or not,
/// and the host cannot say which were; one that is still in use refaults.
const EVICT_EVERY: u32 = 16;

const PAGE: u64 = PAGE_SIZE as u64;

fn page_of(gva: u32) -> u32 {
    gva & !PAGE_MASK
}

fn frame_of(gpa: u64) -> u64 {
    gpa & !(PAGE - 1)
}

fn range_of(base: u32, size: PageSize) -> RangeInclusive<u32> {
    base..=base + (size.bytes() - 1)
}

impl ShadowMmu {
    /// A shadow MMU with paging off (CR0=0) and nothing mapped.
    pub fn new(config: MmuConfig) -> Self {
        let round = |cap: u32| (cap & !PAGE_MASK).max(PAGE_SIZE);
        let config = MmuConfig {
            batch_small: round(config.batch_small),
            batch_large: round(config.batch_large),
            vmm_base: page_of(config.vmm_base),
            ..config
        };
        ShadowMmu {
            config,
            regs: PagingRegs::default(),
            pdptes: [0; 4],
            entries: BTreeMap::new(),
            nonglobal: BTreeSet::new(),
            nonglobal_per_2m: vec![0; 2048],
            rmap: FrameMap::default(),
            large: BTreeSet::new(),
            code_pages: FrameSet::default(),
            regions: BTreeMap::new(),
            parked_regions: BTreeMap::new(),
            working_sets: HashMap::new(),
            cpl: 0,
            stats: Stats::default(),
        }
    }

    pub fn config(&self) -> &MmuConfig {
        &self.config
    }

    pub fn regs(&self) -> PagingRegs {
        self.regs
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Whether the shadow at `gva` (if any) is parked.
    fn is_parked(&self, gva: u32, e: &ShadowEntry) -> bool {
        !e.global && !self.parked_regions.is_empty() && self.parked_regions.contains_key(&self.region_of(gva))
    }

    /// The shadow in force for the page holding `gva`, if any.
    pub fn entry(&self, gva: u32) -> Option<ShadowEntry> {
        self.entries.get(&page_of(gva)).copied().filter(|e| !self.is_parked(page_of(gva), e))
    }

    /// Every shadow in force, ascending by guest-virtual address.
    pub fn entries(&self) -> impl Iterator<Item = (u32, ShadowEntry)> + '_ {
        self.entries.iter().filter(|(&k, e)| !self.is_parked(k, e)).map(|(&k, &e)| (k, e))
    }

    pub fn mapped_pages(&self) -> usize {
        self.entries().count()
    }

    /// Parked shadows (mapped on the host without rights, kept for an
    /// address space that may come back), ascending by guest-virtual address.
    pub fn parked_entries(&self) -> impl Iterator<Item = (u32, ShadowEntry)> + '_ {
        self.entries.iter().filter(|(&k, e)| self.is_parked(k, e)).map(|(&k, &e)| (k, e))
    }

    /// Unmaps the parked shadows of the region at `base` (the current
    /// address space is about to map something there).
    fn evict_parked<H: HostMapper + ?Sized>(&mut self, mapper: &mut H, base: u32) -> Result<(), MmuError> {
        if self.parked_regions.remove(&base).is_some() {
            let n = self.drop_where(mapper, self.region_range(base), |_, e| !e.global)?;
            self.stats.parked_evicted_pages += n as u64;
        }
        Ok(())
    }

    /// Virtual aliases currently shadowing the frame holding `gpa`.
    pub fn aliases(&self, gpa: u64) -> Vec<u32> {
        self.rmap.get(&frame_of(gpa)).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    pub fn is_code_protected(&self, gpa: u64) -> bool {
        self.code_pages.contains(&frame_of(gpa))
    }

    /// Mapped runs `(gva, len)` of supervisor-only pages: what guest user
    /// code could reach in the shared window (the in-process limitation),
    /// and what an isolation mode unmaps on a switch to CPL 3.
    pub fn supervisor_only_runs(&self) -> Vec<(u32, u32)> {
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for (gva, e) in self.entries() {
            if e.user {
                continue;
            }
            match runs.last_mut() {
                Some((start, len)) if start.wrapping_add(*len) == gva => *len += PAGE_SIZE,
                _ => runs.push((gva, PAGE_SIZE)),
            }
        }
        runs
    }

    /// Walks the guest tables and sets A/D like the access would, without
    /// touching the shadow: for the translator's code fetches and the
    /// instruction emulator's memory operands.
    pub fn translate<M: PhysMem + ?Sized>(
        &mut self,
        mem: &mut M,
        gva: u32,
        access: Access,
    ) -> Result<Translation, PageFault> {
        walk(mem, &self.regs, &self.pdptes, gva, access, true)
    }

    /// Like [`ShadowMmu::translate`] but leaves A/D alone (debuggers, traces).
    pub fn probe<M: PhysMem + ?Sized>(&self, mem: &mut M, gva: u32, access: Access) -> Result<Translation, PageFault> {
        walk(mem, &self.regs, &self.pdptes, gva, access, false)
    }

    /// Resolves a host fault at `gva` in the window.
    ///
    /// `access.user` is the architectural user/supervisor classification of
    /// the access; `cpl` is the virtual CPL the guest ran at (user isolation
    /// uses it).
    pub fn handle_fault<M: PhysMem + ?Sized, H: HostMapper + ?Sized>(
        &mut self,
        mem: &mut M,
        mapper: &mut H,
        gva: u32,
        access: Access,
        cpl: u8,
    ) -> Result<FaultOutcome, MmuError> {
        self.stats.hidden_faults += 1;
        let t = match walk(mem, &self.regs, &self.pdptes, gva, access, true) {
            Ok(t) => t,
            Err(pf) => {
                self.stats.guest_page_faults += 1;
                trace!(gva, error_code = pf.error_code, "hidden fault is a guest #PF");
                // A #PF invalidates the TLB entries of the faulting address.
                if self.entries.contains_key(&page_of(gva)) {
                    self.drop_translation(mapper, gva)?;
                }
                return Ok(FaultOutcome::GuestPageFault { cr2: pf.cr2, error_code: pf.error_code });
            }
        };
        if let Some(reason) = self.emulate_reason(mem, &t, access, cpl) {
            self.stats.count_emulation(reason);
            trace!(gva, gpa = t.gpa, ?reason, "hidden fault goes to the emulator");
            return Ok(FaultOutcome::Emulate { gpa: t.gpa, reason });
        }
        self.install(mem, mapper, &t)?;
        self.stats.resolved += 1;
        if self.config.working_set && !t.global && t.leaf.is_some() {
            self.remember(page_of(t.gva));
        }
        Ok(FaultOutcome::Resolved)
    }

    /// The guest's #PF handler is returning to the instruction that faulted
    /// at `gva`: if the guest's tables now allow `access`, map the page (and
    /// set A/D as the retried access is about to) so the retry does not take
    /// a second host fault. Does nothing when they still do not, or when the
    /// page would go to the emulator. Returns whether it mapped.
    pub fn prefault<M: PhysMem + ?Sized, H: HostMapper + ?Sized>(
        &mut self,
        mem: &mut M,
        mapper: &mut H,
        gva: u32,
        access: Access,
        cpl: u8,
    ) -> Result<bool, MmuError> {
        let Ok(t) = walk(mem, &self.regs, &self.pdptes, gva, access, true) else { return Ok(false) };
        if self.emulate_reason(mem, &t, access, cpl).is_some() {
            return Ok(false);
        }
        self.install(mem, mapper, &t)?;
        self.stats.prefaults += 1;
        Ok(true)
    }

    fn emulate_reason<M: PhysMem + ?Sized>(
        &self,
        mem: &M,
        t: &Translation,
        access: Access,
        cpl: u8,
    ) -> Option<EmulateReason> {
        let page = page_of(t.gva);
        if page >= self.config.vmm_base {
            Some(EmulateReason::VmmArea)
        } else if page < self.config.mmap_min_addr {
            Some(EmulateReason::LowPage)
        } else if !mem.is_ram(frame_of(t.gpa)) {
            Some(EmulateReason::Mmio)
        } else if self.config.user_isolation && cpl == 3 && !t.perms.user {
            Some(EmulateReason::SupervisorInUserMode)
        } else if access.write && self.is_code_protected(t.gpa) {
            Some(EmulateReason::CodeWrite)
        } else if access.write && !t.perms.writable {
            // The walk allowed it, so this is a supervisor write with WP=0.
            Some(EmulateReason::SupervisorWriteWp0)
        } else {
            None
        }
    }

    /// Host rights for a guest page: read always (every valid translation
    /// allows supervisor reads), write only once D is set and the frame holds
    /// no translated code, exec unless NX.
    fn prot_for(&self, perms: Perms, dirty: bool, frame: u64) -> Prot {
        Prot { read: true, write: perms.writable && dirty && !self.is_code_protected(frame), exec: !perms.nx }
    }

    fn install<M: PhysMem + ?Sized, H: HostMapper + ?Sized>(
        &mut self,
        mem: &M,
        mapper: &mut H,
        t: &Translation,
    ) -> Result<(), MmuError> {
        let page = page_of(t.gva);
        let frame = frame_of(t.gpa);
        if !self.parked_regions.is_empty() {
            self.evict_parked(mapper, self.region_of(page))?;
        }
        let entry = ShadowEntry {
            gpa: frame,
            prot: self.prot_for(t.perms, t.dirty, frame),
            guest_page: if t.size == PageSize::Size4K { page } else { t.page_gva },
            guest_size: t.size,
            global: t.global,
            user: t.perms.user,
            write_ok: t.perms.writable && t.dirty,
            dir: if t.size == PageSize::Size4K { 0 } else { t.dir },
        };
        if let Some(old) = self.entries.get(&page).copied().filter(|old| old.gpa == frame) {
            self.upgrade(mapper, page, old, entry)?;
            self.note_run(page, std::slice::from_ref(&entry), t.dir);
            return Ok(());
        }
        let run = self.plan_run(mem, t, entry);
        self.map_run(mapper, run.0, &run.1)?;
        self.note_run(run.0, &run.1, t.dir);
        Ok(())
    }

    /// Size of a directory region: what one directory entry maps.
    fn region_size(&self) -> u32 {
        if self.regs.mode() == PagingMode::Pae {
            2 << 20
        } else {
            4 << 20
        }
    }

    fn region_of(&self, gva: u32) -> u32 {
        gva & !(self.region_size() - 1)
    }

    fn region_range(&self, base: u32) -> RangeInclusive<u32> {
        base..=base + (self.region_size() - 1)
    }

    /// Records that `run` (one guest page table or large page, so one
    /// region) was just shadowed through directory entry `key`.
    fn note_run(&mut self, start: u32, run: &[ShadowEntry], key: u64) {
        if self.regs.mode() == PagingMode::Off {
            return;
        }
        let base = self.region_of(start);
        let mut region = self.regions.remove(&base).unwrap_or(Region { key: Some(key), ..Region::default() });
        for (i, e) in run.iter().enumerate().filter(|(_, e)| !e.global) {
            if region.key != Some(key) {
                region.key = None;
            }
            if e.guest_size == PageSize::Size4K {
                region.fresh.push(start + PAGE_SIZE * i as u32);
            }
            region.write_ok |= e.write_ok;
        }
        self.regions.insert(base, region);
    }

    /// The frame is already shadowed here: fix the rights in place.
    fn upgrade<H: HostMapper + ?Sized>(
        &mut self,
        mapper: &mut H,
        page: u32,
        old: ShadowEntry,
        new: ShadowEntry,
    ) -> Result<(), MmuError> {
        if old == new {
            self.stats.spurious += 1;
            debug!(page, "spurious hidden fault: the shadow already allows the access");
            return Ok(());
        }
        let large = new.guest_size != PageSize::Size4K;
        if large && self.large.insert((new.guest_page, new.guest_size)) {
            mapper.note_large_page(new.guest_page, new.guest_size.bytes());
        }
        if new.prot.write && !old.prot.write {
            self.stats.dirty_upgrades += 1;
        }
        if large && new.prot.write && !old.prot.write {
            // Upgrade this page together with its siblings, in few calls.
            self.put(page, ShadowEntry { prot: old.prot, ..new });
            self.upgrade_large_siblings(mapper, new)?;
            if self.entries[&page].prot == new.prot {
                return Ok(());
            }
        }
        let current = self.entries[&page].prot;
        if current != new.prot {
            self.host_protect(mapper, page, PAGE_SIZE, new.prot)?;
        }
        self.put(page, new);
        Ok(())
    }

    /// A write set D in a large page's only leaf: every shadow of that page
    /// that was read-only for want of D becomes writable too.
    fn upgrade_large_siblings<H: HostMapper + ?Sized>(
        &mut self,
        mapper: &mut H,
        leaf: ShadowEntry,
    ) -> Result<(), MmuError> {
        let mut pages = Vec::new();
        self.region_changed(leaf.guest_page);
        for (&gva, e) in self.entries.range_mut(range_of(leaf.guest_page, leaf.guest_size)) {
            if e.guest_page != leaf.guest_page || e.guest_size != leaf.guest_size {
                continue;
            }
            e.write_ok = true;
            if !e.prot.write && e.prot.writable() == leaf.prot && !self.code_pages.contains(&e.gpa) {
                e.prot = leaf.prot;
                pages.push(gva);
            }
        }
        for (start, len) in runs(&pages) {
            self.host_protect(mapper, start, len, leaf.prot)?;
        }
        Ok(())
    }

    /// The batch window around the faulting page: a `cap`-sized, aligned
    /// block inside the guest page (large pages), the page table's span
    /// (4 KiB pages) or the identity map (paging off).
    fn batch_window(&self, t: &Translation) -> (u32, u64) {
        let page = page_of(t.gva);
        let (base, span, cap) = match (t.leaf, t.size) {
            (None, _) => (0u32, 1u64 << 32, self.config.batch_large),
            (Some(_), PageSize::Size4K) => {
                let span = if self.regs.mode() == PagingMode::Pae { 2u32 << 20 } else { 4 << 20 };
                (page & !(span - 1), u64::from(span), self.config.batch_small.min(span))
            }
            (Some(_), size) => (t.page_gva, u64::from(size.bytes()), self.config.batch_large.min(size.bytes())),
        };
        let lo = base + (page - base) / cap * cap;
        let hi = (u64::from(lo) + u64::from(cap)).min(u64::from(base) + span);
        (lo, hi)
    }

    /// The shadow `page` would get as part of `first`'s run, if it may join:
    /// free in the shadow, inside the mappable window, RAM, same host rights,
    /// and for 4 KiB PTEs present, already accessed, with the same rights.
    fn candidate<M: PhysMem + ?Sized>(
        &self,
        mem: &M,
        t: &Translation,
        first: &ShadowEntry,
        page: u32,
    ) -> Option<ShadowEntry> {
        if self.entries.contains_key(&page) || page < self.config.mmap_min_addr || page >= self.config.vmm_base {
            return None;
        }
        let fault_page = page_of(t.gva);
        let e = match (t.leaf, t.size) {
            (None, _) => {
                let gpa = u64::from(page);
                ShadowEntry { gpa, guest_page: page, prot: self.prot_for(t.perms, true, gpa), ..*first }
            }
            (Some(leaf), PageSize::Size4K) => {
                let esz: i64 = if leaf.wide { 8 } else { 4 };
                let delta = (i64::from(page) - i64::from(fault_page)) / i64::from(PAGE_SIZE);
                let entry_gpa = u64::try_from(leaf.entry_gpa as i64 + delta * esz).ok()?;
                let n = accessed_neighbour(mem, &self.regs, &leaf, entry_gpa)?;
                if n.perms != t.perms {
                    return None;
                }
                ShadowEntry {
                    gpa: n.frame,
                    prot: self.prot_for(n.perms, n.dirty, n.frame),
                    guest_page: page,
                    guest_size: PageSize::Size4K,
                    global: n.global,
                    user: n.perms.user,
                    write_ok: n.perms.writable && n.dirty,
                    dir: 0,
                }
            }
            (Some(_), _) => {
                let gpa = t.page_gpa + u64::from(page - t.page_gva);
                ShadowEntry { gpa, prot: self.prot_for(t.perms, t.dirty, gpa), ..*first }
            }
        };
        (e.prot == first.prot && mem.is_ram(e.gpa)).then_some(e)
    }

    /// The run to map for a new shadow: the faulting page, extended both
    /// ways inside the batch window while pages are physically consecutive.
    fn plan_run<M: PhysMem + ?Sized>(&self, mem: &M, t: &Translation, first: ShadowEntry) -> (u32, Vec<ShadowEntry>) {
        let page = page_of(t.gva);
        let (lo, hi) = self.batch_window(t);
        let mut before = Vec::new();
        let mut p = page;
        while p > lo {
            p -= PAGE_SIZE;
            let expect = first.gpa.checked_sub(PAGE * (before.len() as u64 + 1));
            match self.candidate(mem, t, &first, p) {
                Some(e) if Some(e.gpa) == expect => before.push(e),
                _ => break,
            }
        }
        let start = page - PAGE_SIZE * before.len() as u32;
        before.reverse();
        before.push(first);
        let mut p = u64::from(page) + PAGE;
        while p < hi {
            let expect = first.gpa + (p - u64::from(page));
            match self.candidate(mem, t, &first, p as u32) {
                Some(e) if e.gpa == expect => before.push(e),
                _ => break,
            }
            p += PAGE;
        }
        (start, before)
    }

    fn map_run<H: HostMapper + ?Sized>(
        &mut self,
        mapper: &mut H,
        start: u32,
        run: &[ShadowEntry],
    ) -> Result<(), MmuError> {
        let len = PAGE_SIZE * run.len() as u32;
        let prot = run[0].prot;
        mapper.map(start, run[0].gpa, len, prot)?;
        self.stats.host_map_calls += 1;
        self.stats.pages_mapped += run.len() as u64;
        trace!(start, gpa = run[0].gpa, len, ?prot, "mapped shadow run");
        for (i, e) in run.iter().enumerate() {
            let gva = start + PAGE_SIZE * i as u32;
            if let Some(old) = self.put(gva, *e) {
                self.rmap_remove(old.gpa, gva);
            }
            self.rmap.entry(e.gpa).or_default().insert(gva);
            if e.guest_size != PageSize::Size4K && self.large.insert((e.guest_page, e.guest_size)) {
                mapper.note_large_page(e.guest_page, e.guest_size.bytes());
            }
        }
        Ok(())
    }

    fn rmap_remove(&mut self, gpa: u64, gva: u32) {
        if let Some(set) = self.rmap.get_mut(&gpa) {
            set.remove(&gva);
            if set.is_empty() {
                self.rmap.remove(&gpa);
            }
        }
    }

    fn host_protect<H: HostMapper + ?Sized>(
        &mut self,
        mapper: &mut H,
        gva: u32,
        len: u32,
        prot: Prot,
    ) -> Result<(), MmuError> {
        mapper.protect(gva, len, prot)?;
        self.stats.host_protect_calls += 1;
        Ok(())
    }

    /// Drops the shadows in `range` that `doomed` selects, unmapping each
    /// span of them that no surviving shadow interrupts in one call (holes
    /// in a span are already unmapped, so covering them is harmless).
    /// Inserts a shadow entry, keeping the non-global index in step.
    /// A shadow at `gva` was added, removed or changed rights: its region's
    /// host-call cache is stale.
    fn region_changed(&mut self, gva: u32) {
        let base = self.region_of(gva);
        if let Some(r) = self.regions.get_mut(&base) {
            r.cache = None;
            r.alt = None;
            r.settled = false;
        }
        if let Some(r) = self.parked_regions.get_mut(&base) {
            r.cache = None;
            r.alt = None;
            r.settled = false;
        }
    }

    /// The host-call cache of the region at `base` (in force or parked).
    /// Shared, not copied: MOV CR3 asks for it per region and switch.
    fn region_cache(&mut self, base: u32) -> Arc<RegionCache> {
        let cached = self.regions.get(&base).or_else(|| self.parked_regions.get(&base)).and_then(|r| r.cache.clone());
        if let Some(c) = cached {
            return c;
        }
        let c = Arc::new(self.compute_region_cache(base));
        if let Some(r) = self.regions.get_mut(&base).or(self.parked_regions.get_mut(&base)) {
            r.cache = Some(c.clone());
        }
        c
    }

    fn compute_region_cache(&self, base: u32) -> RegionCache {
        let pages: Vec<u32> = self.nonglobal.range(self.region_range(base)).copied().collect();
        let mut revive: Vec<(u32, u32, Prot)> = Vec::new();
        for &gva in &pages {
            let prot = self.entries[&gva].prot;
            match revive.last_mut() {
                Some((start, len, p)) if *start + *len == gva && *p == prot => *len += PAGE_SIZE,
                _ => revive.push((gva, PAGE_SIZE, prot)),
            }
        }
        let supervisor_only = pages.iter().all(|gva| !self.entries[gva].user);
        RegionCache { pages: pages.len(), park: self.spans_without_globals(&pages), revive, supervisor_only }
    }

    fn put(&mut self, gva: u32, e: ShadowEntry) -> Option<ShadowEntry> {
        if !self.regions.is_empty() || !self.parked_regions.is_empty() {
            self.region_changed(gva);
        }
        if e.global {
            self.nonglobal_remove(gva);
        } else if self.nonglobal.insert(gva) {
            self.nonglobal_per_2m[(gva >> 21) as usize] += 1;
        }
        self.entries.insert(gva, e)
    }

    fn nonglobal_remove(&mut self, gva: u32) {
        if self.nonglobal.remove(&gva) {
            self.nonglobal_per_2m[(gva >> 21) as usize] -= 1;
        }
    }

    /// Non-global shadows in the region at `base`.
    fn region_len(&self, base: u32) -> usize {
        let first = (base >> 21) as usize;
        let n = (self.region_size() >> 21) as usize;
        let len = self.nonglobal_per_2m[first..first + n].iter().map(|&c| c as usize).sum();
        debug_assert_eq!(len, self.nonglobal.range(self.region_range(base)).count());
        len
    }

    fn drop_where<H: HostMapper + ?Sized>(
        &mut self,
        mapper: &mut H,
        range: RangeInclusive<u32>,
        doomed: impl Fn(u32, &ShadowEntry) -> bool,
    ) -> Result<usize, MmuError> {
        let mut spans: Vec<(u32, u32)> = Vec::new();
        let mut victims = Vec::new();
        let mut open = false;
        for (&gva, e) in self.entries.range(range) {
            if !doomed(gva, e) {
                open = false;
                continue;
            }
            victims.push(gva);
            match spans.last_mut() {
                Some((_, last)) if open => *last = gva + (PAGE_SIZE - 1),
                _ => spans.push((gva, gva + (PAGE_SIZE - 1))),
            }
            open = true;
        }
        self.drop_victims(mapper, spans, victims)
    }

    fn drop_victims<H: HostMapper + ?Sized>(
        &mut self,
        mapper: &mut H,
        spans: Vec<(u32, u32)>,
        victims: Vec<u32>,
    ) -> Result<usize, MmuError> {
        for &(start, last) in &spans {
            mapper.unmap(start, last - start + 1)?;
            self.stats.host_unmap_calls += 1;
        }
        for &gva in &victims {
            if let Some(e) = self.entries.remove(&gva) {
                if !e.global {
                    self.region_changed(gva);
                }
                self.nonglobal_remove(gva);
                self.rmap_remove(e.gpa, gva);
            }
        }
        self.stats.pages_unmapped += victims.len() as u64;
        Ok(victims.len())
    }

    /// What INVLPG and a guest #PF drop: the shadows of the page holding
    /// `gva`, all of a large page's if it came from one.
    fn drop_translation<H: HostMapper + ?Sized>(&mut self, mapper: &mut H, gva: u32) -> Result<(), MmuError> {
        for size in [PageSize::Size4M, PageSize::Size2M] {
            let base = gva & !(size.bytes() - 1);
            if self.large.remove(&(base, size)) {
                self.drop_where(mapper, range_of(base, size), |_, e| e.guest_page == base && e.guest_size == size)?;
            }
        }
        let page = page_of(gva);
        self.drop_where(mapper, page..=page, |_, _| true)?;
        Ok(())
    }

    /// Whether an INVLPG of `gva` could change anything here: a shadow of
    /// its page (parked ones included) or of a large page holding it.
    pub fn has_shadow(&self, gva: u32) -> bool {
        self.entries.contains_key(&page_of(gva))
            || [PageSize::Size4M, PageSize::Size2M]
                .into_iter()
                .any(|size| self.large.contains(&(gva & !(size.bytes() - 1), size)))
    }

    /// INVLPG: the TLB entry of the page holding `gva` (of the whole guest
    /// page when it came from a 2/4 MiB page), global or not, is gone. A
    /// shadow the current tables still map identically (same frame, same
    /// rights, A set, D set if it lets writes through) stays: dropping and
    /// refaulting it would set no A/D bit and map the same thing, so keeping
    /// it is indistinguishable (a large page's 512 shadows cost one
    /// directory-entry read). Anything else goes, parked shadows of the page
    /// included.
    pub fn invlpg<M: PhysMem + ?Sized, H: HostMapper + ?Sized>(
        &mut self,
        mem: &M,
        mapper: &mut H,
        gva: u32,
    ) -> Result<(), MmuError> {
        self.stats.invlpg += 1;
        if !self.parked_regions.is_empty() && self.parked_regions.contains_key(&self.region_of(gva)) {
            // Not in force: nothing to keep.
            return self.drop_translation(mapper, gva);
        }
        let mut dir = None;
        for size in [PageSize::Size4M, PageSize::Size2M] {
            let base = gva & !(size.bytes() - 1);
            if !self.large.contains(&(base, size)) {
                continue;
            }
            let mut siblings =
                self.entries.range(range_of(base, size)).filter(|(_, e)| e.guest_page == base && e.guest_size == size);
            let keep = match siblings.next().map(|(&g, &e)| (g, e)) {
                // One sibling stands for all (they share the leaf); D is
                // needed if any of them lets writes through.
                Some((g, e)) => {
                    let write_ok = e.write_ok || siblings.any(|(_, s)| s.write_ok);
                    self.still_maps(mem, g, &ShadowEntry { write_ok, ..e }, &mut dir)
                }
                None => false,
            };
            if keep {
                self.stats.invlpg_kept += 1;
            } else {
                self.large.remove(&(base, size));
                self.drop_where(mapper, range_of(base, size), |_, e| e.guest_page == base && e.guest_size == size)?;
            }
        }
        let page = page_of(gva);
        if let Some(e) = self.entries.get(&page).copied().filter(|e| e.guest_size == PageSize::Size4K) {
            if self.still_maps(mem, page, &e, &mut dir) {
                self.stats.invlpg_kept += 1;
            } else {
                self.drop_where(mapper, page..=page, |_, _| true)?;
            }
        }
        Ok(())
    }

    /// Drops every shadow, global ones included.
    pub fn flush_all<H: HostMapper + ?Sized>(&mut self, mapper: &mut H) -> Result<(), MmuError> {
        self.stats.flushes += 1;
        self.flush(mapper)
    }

    fn flush<H: HostMapper + ?Sized>(&mut self, mapper: &mut H) -> Result<(), MmuError> {
        let n = self.drop_where(mapper, 0..=u32::MAX, |_, _| true)?;
        self.large.clear();
        self.regions.clear();
        self.parked_regions.clear();
        debug!(dropped = n, "shadow flush");
        Ok(())
    }

    /// MOV CR3: like a TLB flush of the non-global entries (all with
    /// CR4.PGE=0), except that a shadow the new address space maps
    /// identically stays (an accessed directory entry, then for a 4 KiB page
    /// an accessed leaf mapping the same frame with the same rights, its own
    /// page table or a shared one; for a large page the same directory
    /// entry): keeping it is indistinguishable from dropping it and
    /// refaulting, which would set no A/D bit that is not already set.
    ///
    /// The check goes by directory region: when the region's directory entry
    /// is the one its shadows were validated under and the page-table bytes
    /// behind them did not change since (a snapshot), all of them stay
    /// without a walk; only changed entries are checked one by one. Shadows
    /// that fail because the new address space has another directory entry
    /// there are *parked* (host rights removed, one `protect` per span)
    /// rather than unmapped, and parked shadows whose directory entry is
    /// back (Linux's page-table isolation switches between a user and a
    /// kernel page directory twice per system call) are revived after the
    /// same check. Under PAE paging the PDPTEs are reloaded first; on
    /// [`MmuError::PdpteReserved`] nothing changed and the guest gets #GP(0).
    pub fn set_cr3<M: PhysMem + ?Sized, H: HostMapper + ?Sized>(
        &mut self,
        mem: &M,
        mapper: &mut H,
        cr3: u32,
    ) -> Result<(), MmuError> {
        let new = PagingRegs { cr3, ..self.regs };
        if new.mode() == PagingMode::Pae {
            self.pdptes = load_pdptes(mem, cr3)?;
        }
        self.regs = new;
        self.stats.cr3_switches += 1;
        if new.mode() == PagingMode::Off {
            // Identity: no translation depends on CR3.
            return Ok(());
        }
        if !new.pge() && self.entries.len() > self.nonglobal.len() {
            // Global shadows kept by a CR4.PGE clear ([`ShadowMmu::resync`]):
            // without PGE no page survives a MOV CR3.
            self.drop_where(mapper, 0..=u32::MAX, |_, e| e.global)?;
        }
        // The new address space's working set (mapped again in step 5):
        // the old shadows at those pages are replaced by that mapping
        // instead of being unmapped first, and a region holding some is not
        // parked, since the prefetch would evict it at once (two processes
        // of one program use the same addresses: a park, an unmap and a map
        // per region and switch, where one map does).
        let mut incoming: Vec<u32> = self.working_sets.get(&cr3).cloned().unwrap_or_default();
        incoming.sort_unstable();
        let mut incoming_regions: Vec<u32> = incoming.iter().map(|&p| self.region_of(p)).collect();
        incoming_regions.dedup();
        // 1. The shadows in force, region by region (updated in place: a
        // page-table isolation switch changes nothing in most of them).
        let bases: Vec<u32> = self.regions.keys().copied().collect();
        let mut victims = Vec::new();
        let mut to_park: Vec<(u32, Region)> = Vec::new();
        let mut touched = Vec::new();
        let mut kept = 0usize;
        for base in bases {
            if self.region_len(base) == 0 {
                self.regions.remove(&base);
                continue;
            }
            self.stats.cr3_regions_checked += 1;
            if !self.config.user_isolation && self.region_absent(mem, base) {
                // The new address space does not map this region at all:
                // Linux's page-table isolation (the user half of each pair
                // maps no kernel memory). Supervisor-only shadows stay, so
                // the switch back finds them in place: without isolation
                // the guest's user code reaches supervisor pages anyway
                // (docs/security.md), and guest kernel code never runs
                // there on the user tables.
                let c = self.region_cache(base);
                if c.supervisor_only && c.pages > 0 {
                    kept += c.pages;
                    self.stats.cr3_absent_kept_pages += c.pages as u64;
                    continue;
                }
            }
            if !self.config.user_isolation
                && self.regions[&base].alt.as_ref().is_some_and(|alt| self.still_absent(mem, base, alt))
            {
                // The other half of a page-table isolation pair, as last
                // time: the region's pages are still absent here.
                let pages = self.region_cache(base).pages;
                kept += pages;
                self.stats.cr3_absent_kept_pages += pages as u64;
                continue;
            }
            let check = self.check_region(mem, base, &self.regions[&base]);
            self.stats.cr3_checked_pages += check.checked as u64;
            let r = &self.regions[&base];
            if check.all_failed
                && r.key.is_some()
                && r.key != check.key
                && incoming_regions.binary_search(&base).is_err()
            {
                if !self.config.user_isolation {
                    if let Some(view) = self.absent_view(mem, base) {
                        // Present here, but none of its pages is (the user
                        // half of a page-table isolation pair maps kernel
                        // regions sparsely): keep, like an absent region.
                        let pages = self.region_cache(base).pages;
                        kept += pages;
                        self.stats.cr3_absent_kept_pages += pages as u64;
                        self.regions.get_mut(&base).expect("listed").alt = Some(view);
                        continue;
                    }
                }
                // Another directory entry (or none) here: the address space
                // these came from may come back.
                let r = self.regions.remove(&base).expect("listed");
                to_park.push((base, r));
                continue;
            }
            victims.extend_from_slice(&check.failed);
            if check.all_failed {
                self.regions.remove(&base);
                continue;
            }
            let r = self.regions.get_mut(&base).expect("listed");
            if check.unchanged {
                r.key = check.key;
                // Counted only where the region's cache is fresh: computing
                // it for a statistic cost more than the switch itself.
                kept += r.cache.as_ref().map_or(0, |c| c.pages);
            } else {
                *r = Region { key: check.key, parks: r.parks, ..Region::default() };
                kept += self.region_len(base) - check.failed.len();
                touched.push(base);
            }
        }
        let dropped = victims.len();
        let (replaced, unmapped): (Vec<u32>, Vec<u32>) =
            victims.iter().copied().partition(|p| incoming.binary_search(p).is_ok());
        let dropped_replaced = replaced.len();
        let spans = runs(&unmapped).into_iter().map(|(s, l)| (s, s + (l - 1))).collect();
        self.drop_victims(mapper, spans, victims)?;
        // 2. Park what another address space may want back: one `protect`
        // per span of the region not interrupted by a global shadow.
        let mut parked_now = BTreeSet::new();
        let mut parked_pages = 0usize;
        for (base, mut r) in to_park {
            r.parks += 1;
            if r.parks % EVICT_EVERY == 0 {
                let n = self.drop_where(mapper, self.region_range(base), |_, e| !e.global)?;
                self.stats.parked_evicted_pages += n as u64;
                continue;
            }
            self.parked_regions.insert(base, r);
            let cache = self.region_cache(base);
            for &(start, last) in &cache.park {
                self.host_protect(mapper, start, last - start + PAGE_SIZE, Prot::NONE)?;
            }
            parked_pages += cache.pages;
            parked_now.insert(base);
        }
        self.stats.cr3_parked_pages += parked_pages as u64;
        // 3. Revive parked regions whose directory entry is back.
        let mut revived = 0usize;
        let candidates: Vec<u32> = self.parked_regions.keys().copied().filter(|b| !parked_now.contains(b)).collect();
        for base in candidates {
            let Some((_, pde)) = directory_entry(mem, &self.regs, &self.pdptes, base) else { continue };
            if self.parked_regions[&base].key != Some(dir_key(pde)) {
                continue;
            }
            let check = self.check_region(mem, base, &self.parked_regions[&base]);
            self.stats.cr3_checked_pages += check.checked as u64;
            if !check.failed.is_empty() {
                // Still without rights: the unmap needs no protect first.
                let spans = runs(&check.failed).into_iter().map(|(s, l)| (s, s + (l - 1))).collect();
                self.drop_victims(mapper, spans, check.failed.clone())?;
            }
            let cache = self.region_cache(base);
            let r = self.parked_regions.remove(&base).expect("present");
            if check.all_failed || cache.pages == 0 {
                continue;
            }
            for &(start, len, prot) in &cache.revive {
                self.host_protect(mapper, start, len, prot)?;
            }
            revived += cache.pages;
            if check.unchanged {
                self.regions.insert(base, Region { key: check.key, ..r });
            } else {
                self.regions.insert(base, Region { key: check.key, parks: r.parks, ..Region::default() });
                touched.push(base);
            }
        }
        self.stats.cr3_unparked_pages += revived as u64;
        self.stats.cr3_kept_pages += (kept + revived) as u64;
        // 4. New snapshots where something changed.
        for base in touched {
            self.snapshot(mem, base);
        }
        // 5. What this address space faulted in last time it ran, when the
        // switch took something away (not a page-table isolation switch
        // between the two halves of one process, which keeps everything:
        // walking the set there would cost more than it saves).
        let prefetched = if dropped + parked_pages > 0 { self.prefetch_working_set(mem, mapper)? } else { 0 };
        // What the prefetch did not map over still shows the old frame.
        let stale: Vec<u32> = replaced.into_iter().filter(|p| !self.entries.contains_key(p)).collect();
        for (start, len) in runs(&stale) {
            mapper.unmap(start, len)?;
            self.stats.host_unmap_calls += 1;
        }
        self.stats.cr3_replaced_pages += (dropped_replaced - stale.len()) as u64;
        debug!(dropped, kept, parked = parked_pages, revived, prefetched, "address space switch");
        Ok(())
    }

    /// Notes that the current address space faulted `page` in.
    fn remember(&mut self, page: u32) {
        if !self.working_sets.contains_key(&self.regs.cr3) && self.working_sets.len() >= WORKING_SET_SPACES {
            self.working_sets.clear();
        }
        let ws = self.working_sets.entry(self.regs.cr3).or_default();
        if ws.contains(&page) {
            return;
        }
        if ws.len() == WORKING_SET_PAGES {
            ws.remove(0);
        }
        ws.push(page);
    }

    /// Maps the remembered pages of the current address space that are not
    /// mapped and whose guest entry is present and accessed (no A/D bit is
    /// set here: what the guest has not touched stays for its fault), with
    /// the rights a fault would give them. Returns how many it mapped.
    fn prefetch_working_set<M: PhysMem + ?Sized, H: HostMapper + ?Sized>(
        &mut self,
        mem: &M,
        mapper: &mut H,
    ) -> Result<usize, MmuError> {
        let Some(pages) = self.working_sets.get(&self.regs.cr3).cloned() else { return Ok(0) };
        let access = Access { write: false, user: false, fetch: false };
        let mut mapped = 0;
        for page in pages {
            if self.entries.get(&page).is_some_and(|e| !self.is_parked(page, e)) {
                continue;
            }
            // The walk a fault would make, reading only: a present 4 KiB
            // entry with A set under a present, accessed directory entry.
            let Some((_, pde)) = directory_entry(mem, &self.regs, &self.pdptes, page) else { continue };
            if pde & pte::P == 0 || pde & pte::A == 0 || pde & pte::PS != 0 || dir_reserved(&self.regs, pde) {
                continue;
            }
            let leaf = leaf_of(&self.regs, pde, page);
            let Some(n) = accessed_neighbour(mem, &self.regs, &leaf, leaf.entry_gpa) else { continue };
            let t = Translation {
                gva: page,
                gpa: n.frame,
                page_gva: page,
                page_gpa: n.frame,
                size: PageSize::Size4K,
                perms: n.perms,
                global: n.global,
                dirty: n.dirty,
                leaf: Some(leaf),
                dir: dir_key(pde),
            };
            if t.global
                || self.emulate_reason(mem, &t, access, self.cpl).is_some()
                || (self.config.user_isolation && self.cpl == 3 && !t.perms.user)
            {
                continue;
            }
            self.install(mem, mapper, &t)?;
            mapped += 1;
        }
        self.stats.working_set_prefetched += mapped as u64;
        Ok(mapped)
    }

    /// Spans `(first, last page)` covering sorted non-global `pages`, merged
    /// across gaps that hold no other shadow (unmapped window pages, whose
    /// rights a `protect` to none leaves as they are).
    fn spans_without_globals(&self, pages: &[u32]) -> Vec<(u32, u32)> {
        let mut spans: Vec<(u32, u32)> = Vec::new();
        for &p in pages {
            match spans.last_mut() {
                Some((_, last)) if self.entries.range(*last + PAGE_SIZE..p).next().is_none() => *last = p,
                _ => spans.push((p, p)),
            }
        }
        spans
    }

    /// Checks the non-global shadows of the region at `base`, validated as
    /// `r` says, against the current tables: by the directory entry and the
    /// page-table snapshot, and page by page only where those changed.
    /// The region at `base` has no directory entry at all (not present):
    /// not one the guest has yet to walk (A clear) or another one.
    fn region_absent<M: PhysMem + ?Sized>(&self, mem: &M, base: u32) -> bool {
        directory_entry(mem, &self.regs, &self.pdptes, base).is_none_or(|(_, v)| v & pte::P == 0)
    }

    /// When every shadow of the region at `base` is supervisor-only and
    /// absent from the current tables (4 KiB entries, P clear), what shows
    /// it later: the directory entry and the page-table bytes over them.
    fn absent_view<M: PhysMem + ?Sized>(&mut self, mem: &M, base: u32) -> Option<AbsentView> {
        let cache = self.region_cache(base);
        if !cache.supervisor_only || cache.pages == 0 {
            return None;
        }
        let pde = self.region_dir(mem, base)?;
        if pde & pte::PS != 0 && (self.regs.pse() || self.regs.mode() == PagingMode::Pae) {
            return None;
        }
        let mut pages = self.nonglobal.range(self.region_range(base));
        let lo = *pages.next()?;
        let hi = pages.next_back().copied().unwrap_or(lo);
        let esz = if self.regs.mode() == PagingMode::Pae { 8usize } else { 4 };
        let mut snap = vec![0u8; ((hi - lo) / PAGE_SIZE + 1) as usize * esz];
        if !mem.read_bytes(leaf_of(&self.regs, pde, lo).entry_gpa, &mut snap) {
            return None;
        }
        let present = |gva: u32| {
            let i = ((gva - lo) / PAGE_SIZE) as usize * esz;
            snap[i] & (pte::P as u8) != 0
        };
        if self.nonglobal.range(self.region_range(base)).any(|&p| present(p)) {
            return None;
        }
        Some(AbsentView { key: dir_key(pde), lo, snap })
    }

    /// Whether the current tables still show `alt` at the region at `base`.
    fn still_absent<M: PhysMem + ?Sized>(&self, mem: &M, base: u32, alt: &AbsentView) -> bool {
        let Some(pde) = self.region_dir(mem, base) else { return false };
        if dir_key(pde) != alt.key {
            return false;
        }
        mem.bytes_equal(leaf_of(&self.regs, pde, alt.lo).entry_gpa, &alt.snap) == Some(true)
    }

    /// The usable directory entry of the region at `base`, if any.
    fn region_dir<M: PhysMem + ?Sized>(&self, mem: &M, base: u32) -> Option<u64> {
        directory_entry(mem, &self.regs, &self.pdptes, base)
            .map(|(_, v)| v)
            .filter(|&p| p & pte::P != 0 && p & pte::A != 0 && !dir_reserved(&self.regs, p))
    }

    fn check_region<M: PhysMem + ?Sized>(&self, mem: &M, base: u32, r: &Region) -> RegionCheck {
        let pde = self.region_dir(mem, base);
        let Some(pde) = pde else {
            let failed: Vec<u32> = self.nonglobal.range(self.region_range(base)).copied().collect();
            return RegionCheck { failed, key: None, unchanged: false, all_failed: true, checked: 0 };
        };
        let key = dir_key(pde);
        let large = pde & pte::PS != 0 && (self.regs.pse() || self.regs.mode() == PagingMode::Pae);
        let all = |s: &Self| -> Vec<u32> { s.nonglobal.range(s.region_range(base)).copied().collect() };
        let suspects: Vec<u32> = if r.key != Some(key) || (large && r.write_ok && pde & pte::D == 0) {
            all(self)
        } else if large {
            Vec::new()
        } else {
            self.changed_pages(mem, pde, base, r)
        };
        let unchanged = suspects.is_empty() && r.fresh.is_empty();
        let mut dir = None;
        let mut failed = Vec::new();
        let checked = suspects.len();
        for gva in suspects {
            match self.entries.get(&gva) {
                Some(e) if self.still_maps(mem, gva, e, &mut dir) => {}
                _ => failed.push(gva),
            }
        }
        let all_failed = !failed.is_empty() && failed.len() == checked && checked == self.region_len(base);
        RegionCheck { failed, key: Some(key), unchanged, all_failed, checked }
    }

    /// The non-global pages of a 4 KiB region whose page-table entries may
    /// differ from what they were validated against: outside the snapshot,
    /// changed since it, or shadowed after it.
    fn changed_pages<M: PhysMem + ?Sized>(&self, mem: &M, pde: u64, base: u32, r: &Region) -> Vec<u32> {
        let esz = if self.regs.mode() == PagingMode::Pae { 8usize } else { 4 };
        let first = leaf_of(&self.regs, pde, r.lo).entry_gpa;
        let covered = (r.snap.len() / esz) as u32;
        let end = r.lo.wrapping_add(covered * PAGE_SIZE);
        let range = self.region_range(base);
        // The common case (every switch of a page-table isolation pair):
        // compared in place, nothing copied.
        if !r.snap.is_empty() && r.fresh.is_empty() && mem.bytes_equal(first, &r.snap) == Some(true) {
            if r.settled {
                return Vec::new();
            }
            // Only pages outside the snapshot (none, normally).
            let mut out: Vec<u32> = self.nonglobal.range(*range.start()..r.lo.max(*range.start())).copied().collect();
            if u64::from(end) <= u64::from(*range.end()) && end > r.lo {
                out.extend(self.nonglobal.range(end..=*range.end()));
            }
            return out;
        }
        let mut now = vec![0u8; r.snap.len()];
        let readable = r.snap.is_empty() || mem.read_bytes(first, &mut now);
        let mut fresh = r.fresh.clone();
        fresh.sort_unstable();
        self.nonglobal
            .range(range)
            .copied()
            .filter(|&p| {
                if !readable || r.snap.is_empty() || p < r.lo || fresh.binary_search(&p).is_ok() {
                    return true;
                }
                let i = ((p - r.lo) / PAGE_SIZE) as usize;
                i >= covered as usize || now[i * esz..(i + 1) * esz] != r.snap[i * esz..(i + 1) * esz]
            })
            .collect()
    }

    /// Takes a new snapshot of the page-table bytes behind the 4 KiB
    /// shadows in force in the region at `base`.
    fn snapshot<M: PhysMem + ?Sized>(&mut self, mem: &M, base: u32) {
        let small: Vec<u32> = self
            .nonglobal
            .range(self.region_range(base))
            .copied()
            .filter(|p| self.entries.get(p).is_some_and(|e| e.guest_size == PageSize::Size4K))
            .collect();
        let write_ok =
            self.nonglobal.range(self.region_range(base)).any(|p| self.entries.get(p).is_some_and(|e| e.write_ok));
        let only_small = small.len() == self.region_len(base);
        let pde = directory_entry(mem, &self.regs, &self.pdptes, base).map(|(_, v)| v);
        let Some(r) = self.regions.get_mut(&base) else { return };
        r.write_ok = write_ok;
        r.fresh.clear();
        r.snap.clear();
        r.settled = false;
        let (Some(&lo), Some(&hi), Some(pde)) = (small.first(), small.last(), pde) else { return };
        let esz = if self.regs.mode() == PagingMode::Pae { 8u64 } else { 4 };
        let first = leaf_of(&self.regs, pde, lo).entry_gpa;
        let mut snap = vec![0u8; (u64::from((hi - lo) / PAGE_SIZE + 1) * esz) as usize];
        if mem.read_bytes(first, &mut snap) {
            r.lo = lo;
            r.snap = snap;
            r.settled = only_small;
        } else {
            // Outside RAM: no snapshot, so every page is checked alone.
            r.fresh = small;
        }
    }

    /// Whether the current paging registers translate `gva` exactly as its
    /// shadow `e` says (without setting any A/D bit). `dir` caches the
    /// directory entry of the last 2/4 MiB region looked at.
    fn still_maps<M: PhysMem + ?Sized>(
        &self,
        mem: &M,
        gva: u32,
        e: &ShadowEntry,
        dir: &mut Option<(u32, Option<u64>)>,
    ) -> bool {
        if self.regs.mode() == PagingMode::Off {
            return true;
        }
        let region = gva >> if self.regs.mode() == PagingMode::Pae { 21 } else { 22 };
        let pde = match *dir {
            Some((r, pde)) if r == region => pde,
            _ => {
                let pde = directory_entry(mem, &self.regs, &self.pdptes, gva).map(|(_, v)| v);
                *dir = Some((region, pde));
                pde
            }
        };
        let Some(pde) = pde else { return false };
        if pde & pte::P == 0 || pde & pte::A == 0 || dir_reserved(&self.regs, pde) {
            return false;
        }
        if e.guest_size != PageSize::Size4K {
            // The directory entry is the leaf: the same one, dirty if the
            // shadow lets writes through.
            return dir_key(pde) == e.dir && (!e.write_ok || pde & pte::D != 0);
        }
        if pde & pte::PS != 0 && (self.regs.pse() || self.regs.mode() == PagingMode::Pae) {
            return false;
        }
        let leaf = leaf_of(&self.regs, pde, gva);
        let Some(n) = accessed_neighbour(mem, &self.regs, &leaf, leaf.entry_gpa) else { return false };
        let now = ShadowEntry {
            gpa: n.frame,
            prot: self.prot_for(n.perms, n.dirty, n.frame),
            guest_page: page_of(gva),
            guest_size: PageSize::Size4K,
            global: n.global,
            user: n.perms.user,
            write_ok: n.perms.writable && n.dirty,
            dir: 0,
        };
        now == *e
    }

    /// MOV CR0: a change of PG or WP drops every shadow (the host rights
    /// depend on WP); entering PAE paging loads the PDPTEs.
    pub fn set_cr0<M: PhysMem + ?Sized, H: HostMapper + ?Sized>(
        &mut self,
        mem: &M,
        mapper: &mut H,
        value: u32,
    ) -> Result<(), MmuError> {
        let changed = (self.regs.cr0 ^ value) & (cr0::PG | cr0::WP) != 0;
        self.apply(mem, mapper, PagingRegs { cr0: value, ..self.regs }, changed, true)
    }

    /// MOV CR4: a change of PSE or PAE drops every shadow, globals too. A
    /// change of PGE alone flushes the TLB, globals included, but keeps the
    /// page-table format: shadows the tables still map identically stay
    /// ([`ShadowMmu::resync`]). Linux flushes global pages that way, CR4.PGE
    /// off and on again, whenever no INVPCID is offered (vmalloc purges,
    /// module loads: ~460 pairs in a Debian boot, each a full flush and the
    /// refaults after it before).
    pub fn set_cr4<M: PhysMem + ?Sized, H: HostMapper + ?Sized>(
        &mut self,
        mem: &M,
        mapper: &mut H,
        value: u32,
    ) -> Result<(), MmuError> {
        let diff = self.regs.cr4 ^ value;
        let changed = diff & (cr4::PSE | cr4::PAE) != 0;
        let new = PagingRegs { cr4: value, ..self.regs };
        if !changed && diff & cr4::PGE != 0 {
            if new.mode() == PagingMode::Pae {
                // A PGE change reloads the PDPTEs like a MOV CR3 (SDM 4.4.1).
                self.pdptes = load_pdptes(mem, new.cr3)?;
            }
            self.regs = new;
            return self.resync(mem, mapper);
        }
        self.apply(mem, mapper, new, changed, true)
    }

    /// A flush of the whole TLB that keeps every shadow in force the tables
    /// still map identically: dropping and refaulting it would map the same
    /// thing and set no A/D bit, so keeping it is indistinguishable. A
    /// shadow marked global stays marked while its leaf has G (which is what
    /// the flag records without PGE too); [`ShadowMmu::set_cr3`] drops the
    /// marked ones while PGE is clear. Parked shadows are checked when they
    /// come back, as always.
    fn resync<M: PhysMem + ?Sized, H: HostMapper + ?Sized>(&mut self, mem: &M, mapper: &mut H) -> Result<(), MmuError> {
        self.stats.global_resyncs += 1;
        if self.regs.mode() == PagingMode::Off {
            return Ok(());
        }
        let mut dir = None;
        let mut victims = Vec::new();
        let mut demoted = Vec::new();
        for (&gva, e) in &self.entries {
            if self.is_parked(gva, e) {
                continue;
            }
            // The flag as a walk would set it now, with G's meaning under PGE.
            if self.still_maps(mem, gva, e, &mut dir) {
                continue;
            }
            let flipped = ShadowEntry { global: !e.global, ..*e };
            if e.guest_size == PageSize::Size4K && self.still_maps(mem, gva, &flipped, &mut dir) {
                // Only G (or PGE) differs: a page that became global stays
                // checked at MOV CR3 like before; one whose leaf lost G
                // must be checked from now on. Without PGE, a walk reports
                // no global page: the flag stays (set_cr3 minds it).
                if e.global && self.regs.pge() {
                    demoted.push((gva, flipped));
                }
                continue;
            }
            victims.push(gva);
        }
        self.stats.global_resync_dropped_pages += victims.len() as u64;
        let spans = runs(&victims).into_iter().map(|(s, l)| (s, s + (l - 1))).collect();
        self.drop_victims(mapper, spans, victims)?;
        for (gva, e) in demoted {
            self.put(gva, e);
            if let Some((_, pde)) = directory_entry(mem, &self.regs, &self.pdptes, gva) {
                self.note_run(gva, std::slice::from_ref(&e), dir_key(pde));
            }
        }
        Ok(())
    }

    /// WRMSR EFER: a change of NXE drops every shadow (host exec rights
    /// follow NX).
    pub fn set_efer<M: PhysMem + ?Sized, H: HostMapper + ?Sized>(
        &mut self,
        mem: &M,
        mapper: &mut H,
        value: u64,
    ) -> Result<(), MmuError> {
        let changed = (self.regs.efer ^ value) & efer::NXE != 0;
        self.apply(mem, mapper, PagingRegs { efer: value, ..self.regs }, changed, false)
    }

    fn apply<M: PhysMem + ?Sized, H: HostMapper + ?Sized>(
        &mut self,
        mem: &M,
        mapper: &mut H,
        new: PagingRegs,
        changed: bool,
        loads_pdptes: bool,
    ) -> Result<(), MmuError> {
        if changed && loads_pdptes && new.mode() == PagingMode::Pae {
            self.pdptes = load_pdptes(mem, new.cr3)?;
        }
        self.regs = new;
        if changed {
            self.stats.flushes += 1;
            self.flush(mapper)?;
        }
        Ok(())
    }

    /// The translator made code from the frame holding `gpa`: every alias
    /// mapping it writable becomes read-only now, and later shadows of it
    /// are read-only until [`ShadowMmu::unprotect_code_page`].
    pub fn protect_code_page<H: HostMapper + ?Sized>(&mut self, mapper: &mut H, gpa: u64) -> Result<(), MmuError> {
        let frame = frame_of(gpa);
        if !self.code_pages.insert(frame) {
            return Ok(());
        }
        self.stats.code_pages_protected += 1;
        for gva in self.aliases(frame) {
            let e = self.entries[&gva];
            if e.prot.write {
                // A parked shadow has no host rights: only its record changes.
                if !self.is_parked(gva, &e) {
                    self.host_protect(mapper, gva, PAGE_SIZE, e.prot.read_only())?;
                }
                self.put(gva, ShadowEntry { prot: e.prot.read_only(), ..e });
            }
        }
        Ok(())
    }

    /// The frame's translations are gone: aliases whose guest translation
    /// is writable and dirty become writable again right away (one mprotect
    /// each is cheaper than the fault a lazy scheme would take on the very
    /// write that is about to be retried).
    pub fn unprotect_code_page<H: HostMapper + ?Sized>(&mut self, mapper: &mut H, gpa: u64) -> Result<(), MmuError> {
        let frame = frame_of(gpa);
        if !self.code_pages.remove(&frame) {
            return Ok(());
        }
        self.stats.code_pages_unprotected += 1;
        for gva in self.aliases(frame) {
            let e = self.entries[&gva];
            if e.write_ok && !e.prot.write {
                if !self.is_parked(gva, &e) {
                    self.host_protect(mapper, gva, PAGE_SIZE, e.prot.writable())?;
                }
                self.put(gva, ShadowEntry { prot: e.prot.writable(), ..e });
            }
        }
        Ok(())
    }

    /// The virtual CPL the guest is about to run at. With user isolation, a
    /// switch to CPL 3 unmaps every supervisor-only shadow; otherwise this
    /// only records the CPL (in-process mode keeps them, a documented
    /// limitation).
    pub fn set_cpl<H: HostMapper + ?Sized>(&mut self, mapper: &mut H, cpl: u8) -> Result<(), MmuError> {
        let entering_user = cpl == 3 && self.cpl != 3;
        self.cpl = cpl;
        if entering_user && self.config.user_isolation {
            let n = self.drop_where(mapper, 0..=u32::MAX, |_, e| !e.user)?;
            if n > 0 {
                self.stats.isolation_unmaps += 1;
            }
        }
        Ok(())
    }

    pub fn cpl(&self) -> u8 {
        self.cpl
    }
}

/// Contiguous `(start, len)` runs of sorted page addresses.
fn runs(pages: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((start, len)) if u64::from(*start) + u64::from(*len) == u64::from(p) => *len += PAGE_SIZE,
            _ => out.push((p, PAGE_SIZE)),
        }
    }
    out
}
