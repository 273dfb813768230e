//! The translation cache and its bookkeeping: blocks by key, by TC address
//! and by guest-physical page; callout sites; chaining; the indirect
//! lookup table; invalidation and flush.

use crate::callout::{CalloutKind, CalloutSite, FIRST_SITE_ID, MISS_SITE_ID};
use crate::classify::{self, Class};
use crate::decode::{self, CodePage, DecodedBlock, GuestCode, InsnBytes};
use crate::emit::{self, EmitCtx, Emitted};
use crate::fxhash::{FxHashMap, FxHashSet};
use crate::link::{self, ExitLink, LinkRef};
use crate::mangle::{self, Disposition, MangleCtx, MangledBlock};
use crate::recover::{self, Recovery, RecoveryEntry};
use crate::stats::Stats;
use crate::vmm_area::{self, VmmAreaView, LOOKUP_ENTRIES, SCRATCH_ECX, TC};
use crate::{BlockKey, Config, EngineError, KeyContext};
use iced_x86::{Instruction, Register};
use std::collections::BTreeSet;

/// TC bytes kept at the end for the capped block of the counting mode.
const CAPPED_SLOT: u32 = 16 * 1024;

/// One guest instruction of a block, as translated (for logs and tests).
#[derive(Clone, Debug)]
pub struct GuestInsnRecord {
    pub instr: Instruction,
    pub bytes: InsnBytes,
    pub disposition: Disposition,
    /// TC address range of its inline translation.
    pub tc_start: u32,
    pub tc_end: u32,
}

/// A translated block.
#[derive(Clone, Debug)]
pub struct Block {
    pub key: BlockKey,
    /// First TC byte (the indirect-entry prologue; lookup table entries).
    pub tc_start: u32,
    pub tc_len: u32,
    /// Direct entry (chains and the monitor enter here).
    pub entry: u32,
    /// Past the user-page guard (`entry` without one): chains from a
    /// block whose pages include all of this one's enter here.
    pub entry_guarded: u32,
    /// Start of the out-of-line exit stubs.
    pub stubs: u32,
    pub pages: Vec<CodePage>,
    pub exits: Vec<ExitLink>,
    /// Exits of other blocks chained to this one.
    pub incoming: Vec<LinkRef>,
    pub recovery: Vec<RecoveryEntry>,
    pub insns: Vec<GuestInsnRecord>,
    pub guest_bytes: u32,
    /// Callout site ids of this block (contiguous).
    pub sites: std::ops::Range<u32>,
    /// Its place in the lookup table: whether its slot's collision chain
    /// holds it, the next block of that chain, and whether it was ever
    /// installed (a revived block goes back in).
    indirect: ChainLink,
    /// TC address of the rel32 of its indirect entry's mismatch jump.
    mismatch_jump: u32,
    /// While parked: the chains into it that parking undid, to redo when
    /// it comes back (the blocks of one address space return together).
    parked_links: Vec<LinkRef>,
}

impl Block {
    /// Guest instructions of this block retired when execution stands at
    /// TC address `tc_eip` (counting mode: what a fault there leaves done).
    pub fn retired_at(&self, tc_eip: u32) -> u32 {
        if tc_eip >= self.stubs {
            return self.insns.len() as u32;
        }
        self.insns.iter().take_while(|i| i.tc_end <= tc_eip).count() as u32
    }
}

#[derive(Clone, Debug)]
struct SiteRecord {
    site: CalloutSite,
    block: Option<u32>,
    exit: Option<usize>,
    /// Callouts taken through this site (folded by kind at `stats()`).
    taken: u64,
}

/// The translator: owns the TC, the lookup table and their maps.
pub struct Engine {
    view: VmmAreaView,
    config: Config,
    /// TC offsets (from the VMM area base): first block byte, next free, end.
    tc_first: u32,
    tc_next: u32,
    tc_end: u32,
    /// Counting mode: the slot at the end of the TC where capped blocks go
    /// (one at a time: each is entered right away and is dead once left).
    capped_slot: Option<u32>,
    /// The block in the capped slot (the latest capped block).
    capped_block: Option<u32>,
    miss_stub: u32,
    miss_len: u32,
    miss_site: CalloutSite,
    blocks: Vec<Option<Block>>,
    by_key: FxHashMap<BlockKey, u32>,
    /// (first TC byte, block) in TC order: blocks are bump-allocated, each
    /// after the previous one until a flush, so recording one is a push (a
    /// BTreeMap insert before). Dropped blocks stay until the flush
    /// (`block_at` skips them); the capped slot's block is `capped_block`.
    by_tc: Vec<(u32, u32)>,
    by_page: FxHashMap<u64, Vec<u32>>,
    /// CPL 3 blocks by linear page (revalidated on every address-space switch).
    user_pages: FxHashMap<u32, Vec<u32>>,
    /// The frame the registered CPL 3 blocks of each linear page were
    /// decoded from: one per page ([`Engine::claim_user_page`] parks the
    /// others), so a page's guard bit can stand for all its blocks.
    /// Meaningful only while `user_pages` lists the page.
    user_frames: FxHashMap<u32, u64>,
    /// The other blocks by linear page: a paging change (a CR4.PGE toggle,
    /// Linux's global TLB flush) walks each page once instead of each block.
    kernel_pages: FxHashMap<u32, Vec<u32>>,
    /// User blocks parked by a MOV CR3 or INVLPG that mapped their pages
    /// elsewhere (or nowhere): unreachable (no chain into them, no lookup
    /// entry, not under their key) but kept, so an address space that maps
    /// the same frames again (a parent after its child exited, processes
    /// of one binary) gets them back without translating. By key.
    parked: FxHashMap<BlockKey, Vec<u32>>,
    /// Parked blocks by linear page: those revived together with a block
    /// of the same page.
    parked_pages: FxHashMap<u32, Vec<u32>>,
    new_pages: BTreeSet<u64>,
    /// The lookup tables: [CPL 0-2, CPL 3].
    tables: [LookupTable; 2],
    sites: Vec<SiteRecord>,
    site_base: u32,
    generation: u64,
    stats: Stats,
    callouts_by_kind: FxHashMap<CalloutKind, u64>,
    /// Callout sites of flushed generations, by kind (the live ones are
    /// counted at `stats()`: naming each site as it was recorded cost a
    /// `format!` and a string-keyed map insert per site).
    sites_by_kind: FxHashMap<CalloutKind, u64>,
    /// The stages' outputs, reused from block to block.
    scratch: Scratch,
}

/// What [`Engine::wake_user_block`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// The block's pages map where they did: its guard bits are set, enter it.
    Live,
    /// The block's first page maps nowhere here: the guest takes the fetch
    /// fault at this EIP (the block's start) before anything runs.
    Absent(u32),
    /// Some page maps another frame: the block (and its page's) are parked;
    /// translate or revive the key anew.
    Stale,
}

/// Per-block work buffers: decode, mangle and emit write into these
/// instead of allocating per block and per instruction.
#[derive(Default)]
struct Scratch {
    decoded: DecodedBlock,
    mangled: MangledBlock,
    emitted: Emitted,
}

impl Engine {
    /// Sets up the TC in `view`: writes the shared stubs and an empty lookup
    /// table (every entry aimed at the miss stub).
    pub fn new(view: VmmAreaView, config: Config) -> Result<Engine, EngineError> {
        if view.base & 0x3F_FFFF != 0 {
            return Err(EngineError::Misaligned(view.base));
        }
        let tc_size = config.tc_size.min(vmm_area::TC_SIZE);
        let need = (TC + tc_size) as usize;
        if view.len() < need {
            return Err(EngineError::AreaTooSmall { have: view.len(), need });
        }
        let miss_stub = view.addr(TC);
        let stub = emit::emit_miss_stub(miss_stub, MISS_SITE_ID);
        let miss_len = stub.len() as u32;
        let tc_first = (TC + miss_len).next_multiple_of(16);
        let reserve_capped = config.count_insns && tc_size >= 8 * CAPPED_SLOT;
        let mut e = Engine {
            view,
            config: Config { tc_size, ..config },
            tc_first,
            tc_next: tc_first,
            tc_end: if reserve_capped { TC + tc_size - CAPPED_SLOT } else { TC + tc_size },
            capped_slot: reserve_capped.then_some(TC + tc_size - CAPPED_SLOT),
            capped_block: None,
            miss_stub,
            miss_len,
            miss_site: CalloutSite {
                id: MISS_SITE_ID,
                kind: CalloutKind::IndirectMiss,
                guest_eip: 0,
                next_eip: 0,
                instruction: Instruction::default(),
                classification: classify::of_class(Class::Ident),
                resume_tc: None,
                insns_before: 0,
                block_insns: 0,
            },
            blocks: Vec::new(),
            by_key: FxHashMap::default(),
            by_tc: Vec::new(),
            by_page: FxHashMap::default(),
            user_pages: FxHashMap::default(),
            user_frames: FxHashMap::default(),
            kernel_pages: FxHashMap::default(),
            parked: FxHashMap::default(),
            parked_pages: FxHashMap::default(),
            new_pages: BTreeSet::new(),
            tables: [LookupTable::new(vmm_area::LOOKUP_TABLE), LookupTable::new(vmm_area::LOOKUP_TABLE_USER)],
            sites: Vec::new(),
            site_base: FIRST_SITE_ID,
            generation: 0,
            stats: Stats::default(),
            callouts_by_kind: FxHashMap::default(),
            sites_by_kind: FxHashMap::default(),
            scratch: Scratch::default(),
        };
        e.view.write(TC, &stub);
        // The VMM area outlives a VM: no guard bit of a previous one stays.
        e.view.write(vmm_area::USER_GUARDS, &vec![0; vmm_area::USER_GUARDS_LEN as usize]);
        let select: Vec<u8> = (0..vmm_area::GUARD_BIT_SELECT_LEN).map(|i| ((i & 0xFF) >> (i >> 8) & 1) as u8).collect();
        e.view.write(vmm_area::GUARD_BIT_SELECT, &select);
        e.clear_table(0);
        e.clear_table(1);
        e.stats.tc_bytes_used = u64::from(tc_first - TC);
        Ok(e)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Guest-linear base of the VMM area.
    pub fn vmm_base(&self) -> u32 {
        self.view.base
    }

    /// Bumped by every flush: TC addresses of older generations are dead.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The translation of `key` (its direct entry), translating it first if
    /// needed. May flush the whole TC when it is full.
    pub fn translate(&mut self, key: BlockKey, code: &mut dyn GuestCode) -> Result<u32, EngineError> {
        if let Some(tc) = self.lookup(&key) {
            return Ok(tc);
        }
        if let Some(tc) = self.revive(&key, code) {
            return Ok(tc);
        }
        self.build(key, code, self.config.max_block_insns, true)
    }

    /// Most blocks parked per key: a key whose page maps to ever new
    /// frames (exec after exec) must not fill the TC with dead versions.
    const MAX_PARKED: usize = 4;

    /// A parked block of `key` whose pages map where they did when it was
    /// translated, registered again, with the parked blocks of its pages
    /// that are valid too ([`Engine::revive_page_mates`]).
    fn revive(&mut self, key: &BlockKey, code: &mut dyn GuestCode) -> Option<u32> {
        let ids = self.parked.get(key)?;
        let id = ids.iter().copied().find(|&id| {
            self.blocks[id as usize]
                .as_ref()
                .is_some_and(|b| b.pages.iter().all(|p| code.phys_page(p.linear) == Some(p.phys)))
        })?;
        let entry = self.revive_block(id, key)?;
        let pages: Vec<u32> = self.blk(id).pages.iter().map(|p| p.linear).collect();
        for &page in &pages {
            remove_id(&mut self.parked_pages, page, id);
        }
        self.revive_page_mates(id, code);
        Some(entry)
    }

    /// Revives the parked blocks that share a page with block `id` and
    /// whose pages all map where they did. Reviving blocks one at a time,
    /// as execution reached them, left each one's exits unchained until
    /// its successor came back: a process whose tables were refilled
    /// (exec, then the shell again) took one block-exit callout per
    /// revived block and an indirect miss per three.
    fn revive_page_mates(&mut self, id: u32, code: &mut dyn GuestCode) {
        let pages: Vec<u32> = self.blk(id).pages.iter().map(|p| p.linear).collect();
        // (Blocks of another context would take the lookup table over.)
        let context = self.blk(id).key.context();
        let mut phys: FxHashMap<u32, Option<u64>> = FxHashMap::default();
        let mut back: FxHashSet<u32> = FxHashSet::default();
        let mut touched: Vec<u32> = Vec::new();
        for page in pages {
            let Some(mates) = self.parked_pages.get(&page).cloned() else { continue };
            for m in mates {
                let Some(b) = self.blocks.get(m as usize).and_then(Option::as_ref) else { continue };
                let key = b.key;
                if key.context() != context || self.by_key.contains_key(&key) {
                    continue;
                }
                let mut valid = true;
                for p in &b.pages {
                    let now = *phys.entry(p.linear).or_insert_with(|| code.phys_page(p.linear));
                    valid &= now == Some(p.phys);
                }
                if valid {
                    touched.extend(b.pages.iter().map(|p| p.linear));
                    self.revive_block(m, &key);
                    back.insert(m);
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for page in touched {
            if let Some(list) = self.parked_pages.get_mut(&page) {
                list.retain(|m| !back.contains(m));
                if list.is_empty() {
                    self.parked_pages.remove(&page);
                }
            }
        }
    }

    /// Registers parked block `id` of `key` again (its pages were checked).
    fn revive_block(&mut self, id: u32, key: &BlockKey) -> Option<u32> {
        remove_id(&mut self.parked, *key, id);
        let b = self.blocks[id as usize].as_ref()?;
        let (entry, had_slot) = (b.entry, b.indirect.installed);
        let pages = b.pages.clone();
        for p in &pages {
            self.claim_user_page(p.linear, p.phys);
            self.user_pages.entry(p.linear).or_default().push(id);
            self.view.mark_invlpg(p.linear);
        }
        self.by_key.insert(*key, id);
        self.stats.blocks_revived += 1;
        if self.config.chaining {
            self.chain_eagerly(id, key);
            // The chains parking undid, from blocks that are back too.
            let links =
                self.blocks[id as usize].as_mut().map(|b| std::mem::take(&mut b.parked_links)).unwrap_or_default();
            for l in links {
                let relink = self.blocks.get(l.block as usize).and_then(Option::as_ref).is_some_and(|src| {
                    let x = src.exits[l.exit as usize];
                    self.by_key.get(&src.key) == Some(&l.block)
                        && x.chained.is_none()
                        && src.key.with_eip(x.target_eip) == *key
                });
                if relink {
                    self.link(l.block, l.exit as usize, id);
                }
            }
        }
        if had_slot {
            let _ = self.install_indirect(key);
        }
        Some(entry)
    }

    /// Sets user block `id` aside ([`Engine::parked`]); blocks that are not
    /// registered under their key (capped ones) are dropped instead.
    fn park_block(&mut self, id: u32, left: &mut Vec<u32>) -> Option<BlockKey> {
        let key = self.blocks.get(id as usize)?.as_ref()?.key;
        if self.by_key.get(&key) != Some(&id) || key.cpl != 3 {
            return self.drop_block(id);
        }
        let undone = self.unlink_incoming(id);
        let b = self.blocks[id as usize].as_mut()?;
        b.parked_links = undone;
        let pages = b.pages.clone();
        self.chain_remove(id);
        for p in &pages {
            left.push(p.linear);
            self.parked_pages.entry(p.linear).or_default().push(id);
        }
        self.by_key.remove(&key);
        let list = self.parked.entry(key).or_default();
        list.push(id);
        let oldest = (list.len() > Self::MAX_PARKED).then(|| list[0]);
        if let Some(old) = oldest {
            self.drop_block(old);
        }
        self.stats.blocks_parked += 1;
        Some(key)
    }

    /// A one-off translation of at most `cap` instructions at `key` (the
    /// counting mode's way to stop at an exact instruction count). It is
    /// not registered under `key`: nothing chains or looks it up, and its
    /// exits lead to the normal blocks. It lives until the next flush or
    /// invalidation of its pages.
    pub fn translate_capped(
        &mut self,
        key: BlockKey,
        cap: usize,
        code: &mut dyn GuestCode,
    ) -> Result<u32, EngineError> {
        self.switch_context(key.context());
        self.build(key, code, cap.clamp(1, self.config.max_block_insns), false)
    }

    fn build(
        &mut self,
        key: BlockKey,
        code: &mut dyn GuestCode,
        max_insns: usize,
        register: bool,
    ) -> Result<u32, EngineError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = self.build_in(&mut scratch, key, code, max_insns, register);
        self.scratch = scratch;
        r
    }

    /// The translator's stages, each writing into `s`.
    fn build_in(
        &mut self,
        s: &mut Scratch,
        key: BlockKey,
        code: &mut dyn GuestCode,
        max_insns: usize,
        register: bool,
    ) -> Result<u32, EngineError> {
        decode::decode_into(&key, code, max_insns, &mut s.decoded)?;
        let mctx = MangleCtx {
            cpl: key.cpl,
            ss32: key.ss32(),
            cs32: key.cs32,
            inline_flags: self.config.inline_flags,
            inline_segments: self.config.inline_segments,
            inline_transitions: self.config.inline_transitions && !self.config.count_insns,
            inline_port_reads: self.config.inline_port_reads && !self.config.count_insns,
            inline_invlpg: self.config.inline_invlpg && !self.config.count_insns,
            native_rdtsc: self.config.native_rdtsc && !self.config.count_insns,
            corrupt: self.config.corrupt,
        };
        mangle::mangle_into(&s.decoded, &mctx, &mut s.mangled);
        // Capped blocks use the reserved slot when they fit: they would
        // otherwise fill the TC (one per exact stop) until a flush.
        if let (false, Some(slot)) = (register, self.capped_slot) {
            self.emit_at(slot, &key, s)?;
            if s.emitted.code.len() as u32 <= CAPPED_SLOT {
                return Ok(self.install(key, s, register, slot));
            }
        }
        if !self.emit_at_next(&key, s)? {
            tracing::debug!(target: "engine", "translation cache full: flushing");
            self.flush();
            if !self.emit_at_next(&key, s)? {
                return Err(EngineError::BlockTooLarge);
            }
        }
        let at = self.tc_next;
        Ok(self.install(key, s, register, at))
    }

    /// What the monitor calls to enter the TC at `key`: makes `key`'s
    /// context current for the lookup table (which holds the blocks of one
    /// context only: its entries compare the guest EIP, not CS or mode)
    /// and translates if needed.
    pub fn enter(&mut self, key: BlockKey, code: &mut dyn GuestCode) -> Result<u32, EngineError> {
        self.switch_context(key.context());
        self.translate(key, code)
    }

    /// The direct entry of `key`'s translation, if any.
    pub fn lookup(&self, key: &BlockKey) -> Option<u32> {
        self.by_key.get(key).and_then(|&id| self.blocks[id as usize].as_ref()).map(|b| b.entry)
    }

    /// The translated block of `key`.
    pub fn block(&self, key: &BlockKey) -> Option<&Block> {
        self.by_key.get(key).and_then(|&id| self.blocks[id as usize].as_ref())
    }

    /// The block whose TC bytes contain `tc_eip`.
    pub fn block_at(&self, tc_eip: u32) -> Option<&Block> {
        let id = match self.capped_slot {
            Some(slot) if tc_eip >= self.view.addr(slot) => self.capped_block?,
            _ => {
                let n = self.by_tc.partition_point(|&(start, _)| start <= tc_eip);
                self.by_tc[n.checked_sub(1)?].1
            }
        };
        let b = self.blocks[id as usize].as_ref()?;
        (tc_eip.wrapping_sub(b.tc_start) < b.tc_len).then_some(b)
    }

    /// The callout site `id` (from `VcpuPage.callout_id`).
    pub fn callout_site(&self, id: u32) -> Option<&CalloutSite> {
        if id == MISS_SITE_ID {
            return Some(&self.miss_site);
        }
        let n = id.checked_sub(self.site_base)?;
        self.sites.get(n as usize).map(|r| &r.site)
    }

    /// After a `BlockExit` callout and the translation of its target:
    /// patches the exit to jump straight to the target (unless chaining is
    /// off) and returns the target's entry.
    pub fn chain(&mut self, id: u32) -> Result<u32, EngineError> {
        let n = id.checked_sub(self.site_base).ok_or(EngineError::UnknownSite(id))?;
        let rec = self.sites.get(n as usize).ok_or(EngineError::UnknownSite(id))?;
        if rec.site.kind != CalloutKind::BlockExit {
            return Err(EngineError::NotBlockExit(id));
        }
        let (Some(src), Some(exit)) = (rec.block, rec.exit) else {
            return Err(EngineError::StaleSite(id));
        };
        let Some(sb) = self.blocks[src as usize].as_ref() else {
            return Err(EngineError::StaleSite(id));
        };
        let key = sb.key.with_eip(rec.site.next_eip);
        let dst = *self.by_key.get(&key).ok_or(EngineError::NotTranslated(key))?;
        if self.config.chaining {
            self.link(src, exit, dst);
        }
        Ok(self.blk(dst).entry)
    }

    /// Makes indirect branches to `key.eip` (in `key`'s context) find its
    /// translation inline. `key` must be translated.
    ///
    /// The table is indexed by the low 16 bits of the EIP, and in a fork
    /// and exec of Linux about 130 hot targets a time met another one in
    /// their slot: each such meeting was a miss callout. So a slot holds a
    /// **collision chain**: the new block goes in front, and its indirect
    /// entry's mismatch jump leads to the block it displaced (whose own
    /// mismatch jump leads on), up to [`MAX_CHAIN`] blocks; the last one's
    /// leads to the miss stub.
    pub fn install_indirect(&mut self, key: &BlockKey) -> Result<(), EngineError> {
        let id = *self.by_key.get(key).ok_or(EngineError::NotTranslated(*key))?;
        self.switch_context(key.context());
        self.chain_remove(id);
        let slot = key.eip as u16;
        let class = table_class(key.cpl);
        let old = self.tables[class].entries[slot as usize];
        let next_entry = self.chain_target(old);
        let (start, mismatch) = (self.blk(id).tc_start, self.blk(id).mismatch_jump);
        link::aim(&mut self.view, mismatch, next_entry);
        if let Some(b) = self.blocks[id as usize].as_mut() {
            b.indirect = ChainLink { in_table: true, next: old, installed: true };
        }
        let t = &mut self.tables[class];
        self.view.write_u32(t.offset + 4 * u32::from(slot), start);
        if old.is_none() {
            t.installed.get_or_insert_with(Vec::new).push(slot);
        }
        t.entries[slot as usize] = Some(id);
        self.stats.indirect_installs += 1;
        self.stats.indirect_conflicts += u64::from(old.is_some());
        // Keep the chain short: a lookup walks it.
        let mut last = id;
        for _ in 1..MAX_CHAIN {
            match self.blk(last).indirect.next {
                Some(n) => last = n,
                None => return Ok(()),
            }
        }
        let mut cut = self.blocks[last as usize].as_mut().and_then(|b| b.indirect.next.take());
        let miss = self.miss_stub;
        let field = self.blk(last).mismatch_jump;
        link::aim(&mut self.view, field, miss);
        while let Some(c) = cut {
            let Some(b) = self.blocks.get_mut(c as usize).and_then(Option::as_mut) else { break };
            cut = b.indirect.next.take();
            b.indirect.in_table = false;
            let field = b.mismatch_jump;
            link::aim(&mut self.view, field, miss);
        }
        Ok(())
    }

    /// Where a mismatch jump goes when `next` follows in the chain.
    fn chain_target(&self, next: Option<u32>) -> u32 {
        next.and_then(|n| self.blocks.get(n as usize)?.as_ref()).map_or(self.miss_stub, |b| b.tc_start)
    }

    /// Takes block `id` out of its slot's collision chain (if it is in
    /// one): its predecessor, or the table entry, skips it.
    fn chain_remove(&mut self, id: u32) {
        let Some(b) = self.blocks.get(id as usize).and_then(Option::as_ref) else { return };
        if !b.indirect.in_table {
            return;
        }
        let (slot, class, next, field) = (b.key.eip as u16, table_class(b.key.cpl), b.indirect.next, b.mismatch_jump);
        let target = self.chain_target(next);
        let head = self.tables[class].entries[slot as usize];
        if head == Some(id) {
            let t = &mut self.tables[class];
            t.entries[slot as usize] = next;
            self.view.write_u32(t.offset + 4 * u32::from(slot), target);
        } else {
            let mut at = head;
            while let Some(p) = at {
                let Some(pb) = self.blocks.get_mut(p as usize).and_then(Option::as_mut) else { break };
                if pb.indirect.next == Some(id) {
                    pb.indirect.next = next;
                    let pf = pb.mismatch_jump;
                    link::aim(&mut self.view, pf, target);
                    break;
                }
                at = pb.indirect.next;
            }
        }
        let miss = self.miss_stub;
        link::aim(&mut self.view, field, miss);
        if let Some(b) = self.blocks[id as usize].as_mut() {
            b.indirect.in_table = false;
            b.indirect.next = None;
        }
    }

    /// Precise guest state at a TC address (docs/tc-abi.md "Precise state").
    pub fn recover(&self, tc_eip: u32) -> Option<Recovery> {
        let miss = self.miss_stub;
        if (miss..miss + self.miss_len).contains(&tc_eip) {
            let spilled = tc_eip == miss;
            return Some(Recovery {
                guest_eip: 0,
                restore: if spilled { vec![(Register::ECX, SCRATCH_ECX)] } else { Vec::new() },
                gs_is_guest: false,
                exact: true,
                eip_is_callout_target: true,
                fallback: false,
            });
        }
        let b = self.block_at(tc_eip)?;
        recover::find(&b.recovery, tc_eip - b.tc_start).map(RecoveryEntry::to_recovery)
    }

    /// Drops every block decoded from guest-physical page `page` (a write
    /// hit it): unlinks the chains into them, clears their lookup-table
    /// entries. Returns the keys dropped.
    pub fn invalidate_phys_page(&mut self, page: u64) -> Vec<BlockKey> {
        let ids = self.by_page.get(&(page & !0xFFF)).cloned().unwrap_or_default();
        let keys: Vec<BlockKey> = ids.iter().filter_map(|&id| self.drop_block(id)).collect();
        if !keys.is_empty() {
            self.stats.invalidations += 1;
            self.stats.blocks_invalidated += keys.len() as u64;
        }
        keys
    }

    /// Drops blocks whose linear pages no longer map to the physical pages
    /// they were decoded from (call after MOV CR3 / INVLPG of code pages).
    pub fn revalidate_mappings(&mut self, code: &mut dyn GuestCode) -> Vec<BlockKey> {
        let mut stale = moved_blocks(&self.blocks, &self.user_pages, code);
        stale.extend(moved_blocks(&self.blocks, &self.kernel_pages, code));
        stale.sort_unstable();
        stale.dedup();
        let keys: Vec<BlockKey> = stale.into_iter().filter_map(|id| self.drop_block(id)).collect();
        if !keys.is_empty() {
            self.stats.invalidations += 1;
            self.stats.blocks_invalidated += keys.len() as u64;
        }
        // What is left maps where it was decoded from.
        for (&linear, ids) in &self.user_pages {
            if !ids.is_empty() {
                self.view.set_user_guard(linear, true);
            }
        }
        keys
    }

    /// [`Engine::revalidate_mappings`] for the blocks translated for CPL 3
    /// only: user code is what changes with the address space on MOV CR3
    /// (kernel mappings are shared by every address space). Each linear page
    /// is walked once.
    pub fn revalidate_user_mappings(&mut self, code: &mut dyn GuestCode) -> Vec<BlockKey> {
        if self.config.user_page_guards {
            // One guard bit per page: the blocks stay registered and
            // chained, and the first entry into a page that maps elsewhere
            // (or not yet) stops at its guard.
            for (&linear, ids) in &self.user_pages {
                if !ids.is_empty() {
                    self.view.set_user_guard(linear, guard_open(&self.user_frames, linear, code.phys_page(linear)));
                }
            }
            self.stats.guard_refreshes += 1;
            return Vec::new();
        }
        // Through the index of CPL 3 blocks by linear page: every MOV CR3
        // comes here, and walking all blocks cost more than the switch.
        let mut stale = moved_blocks(&self.blocks, &self.user_pages, code);
        stale.sort_unstable();
        stale.dedup();
        self.park_all(stale)
    }

    /// Parks the `stale` user blocks (a revalidation's result), counted.
    /// They leave the index of live user pages in one pass per page: a
    /// switch parks hundreds of blocks of a few pages, and removing them
    /// one by one was quadratic.
    fn park_all(&mut self, stale: Vec<u32>) -> Vec<BlockKey> {
        let mut left = Vec::new();
        let keys: Vec<BlockKey> = stale.iter().filter_map(|&id| self.park_block(id, &mut left)).collect();
        if !left.is_empty() {
            left.sort_unstable();
            left.dedup();
            let gone: FxHashSet<u32> = stale.iter().copied().collect();
            for page in left {
                if let Some(list) = self.user_pages.get_mut(&page) {
                    list.retain(|id| !gone.contains(id));
                    if list.is_empty() {
                        self.user_pages.remove(&page);
                    }
                }
            }
        }
        if !keys.is_empty() {
            self.stats.invalidations += 1;
            self.stats.blocks_invalidated += keys.len() as u64;
        }
        keys
    }

    /// Makes `linear`'s registered user blocks those of `frame` (a block
    /// of that frame is being registered there): parks the blocks of
    /// another frame, which the page's guard bit could no longer stand
    /// for, and sets the bit (the caller just read the mapping).
    fn claim_user_page(&mut self, linear: u32, frame: u64) {
        let others = self.user_frames.get(&linear) != Some(&frame);
        if let Some(ids) = self.user_pages.get(&linear).filter(|ids| others && !ids.is_empty()) {
            let stale = ids.clone();
            self.park_all(stale);
        }
        self.user_frames.insert(linear, frame);
        if self.config.user_page_guards {
            self.view.set_user_guard(linear, true);
        }
    }

    /// After a `UserPage` callout of site `site`: whether its block may
    /// run in the current address space. Its pages mapping where they did
    /// set their guard bits again ([`Wake::Live`]); a first page that
    /// maps nowhere is the guest's fetch fault ([`Wake::Absent`]; the
    /// blocks stay, for the same frame coming back); a page that maps
    /// another frame parks the blocks of the old one ([`Wake::Stale`]:
    /// enter the key again, which translates or revives).
    pub fn wake_user_block(&mut self, site: u32, code: &mut dyn GuestCode) -> Wake {
        self.stats.guard_stops += 1;
        let Some(id) = site.checked_sub(self.site_base).and_then(|n| self.sites.get(n as usize)).and_then(|r| r.block)
        else {
            return Wake::Stale;
        };
        let Some(b) = self.blocks.get(id as usize).and_then(Option::as_ref) else { return Wake::Stale };
        let (eip, pages) = (b.key.eip, b.pages.clone());
        for (i, p) in pages.iter().enumerate() {
            let now = code.phys_page(p.linear);
            if now == Some(p.phys) {
                continue;
            }
            if i == 0 && now.is_none() {
                return Wake::Absent(eip);
            }
            let stale = if i == 0 { self.user_pages.get(&p.linear).cloned().unwrap_or_default() } else { vec![id] };
            self.park_all(stale);
            return Wake::Stale;
        }
        for p in &pages {
            self.view.set_user_guard(p.linear, true);
        }
        Wake::Live
    }

    /// Whether the user-page guard of the page holding `linear` lets its
    /// blocks run (`vmm_area::USER_GUARDS`).
    pub fn user_guard(&self, linear: u32) -> bool {
        self.view.user_guard(linear)
    }

    /// Whether translated CPL 3 code comes from the page holding `linear`
    /// (an INVLPG of it has work: `vmm_area::INVLPG_FILTER`).
    pub fn has_user_page(&self, linear: u32) -> bool {
        self.user_pages.get(&(linear & !0xFFF)).is_some_and(|ids| !ids.is_empty())
    }

    /// [`Engine::revalidate_user_mappings`] for one linear page (INVLPG:
    /// the guest changed one mapping, and walking every user page for it
    /// cost more than the mprotect it came from).
    pub fn revalidate_user_page(&mut self, linear: u32, code: &mut dyn GuestCode) -> Vec<BlockKey> {
        let linear = linear & !0xFFF;
        let Some(ids) = self.user_pages.get(&linear) else { return Vec::new() };
        let now = code.phys_page(linear);
        if self.config.user_page_guards {
            let open = !ids.is_empty() && guard_open(&self.user_frames, linear, now);
            self.view.set_user_guard(linear, open);
            return Vec::new();
        }
        let stale: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| {
                self.blocks[id as usize]
                    .as_ref()
                    .is_some_and(|b| b.pages.iter().any(|p| p.linear == linear && Some(p.phys) != now))
            })
            .collect();
        self.park_all(stale)
    }

    /// Guest-physical pages that hold translated code now: the monitor
    /// write-protects them in every shadow mapping.
    pub fn code_pages(&self) -> Vec<u64> {
        let mut pages: Vec<u64> = self.by_page.keys().copied().collect();
        pages.sort_unstable();
        pages
    }

    /// Code pages that appeared since the last call (incremental protection).
    pub fn take_new_code_pages(&mut self) -> Vec<u64> {
        if self.new_pages.is_empty() {
            return Vec::new();
        }
        std::mem::take(&mut self.new_pages).into_iter().collect()
    }

    /// Forgets every translation: TC, lookup table, callout sites (ids are
    /// never reused: sites of older generations answer `None`).
    pub fn flush(&mut self) {
        self.blocks.clear();
        self.by_key.clear();
        self.parked.clear();
        self.parked_pages.clear();
        self.by_tc.clear();
        self.by_page.clear();
        for &linear in self.user_pages.keys() {
            self.view.set_user_guard(linear, false);
        }
        self.user_pages.clear();
        self.user_frames.clear();
        self.kernel_pages.clear();
        self.new_pages.clear();
        self.clear_table(0);
        self.clear_table(1);
        self.site_base += self.sites.len() as u32;
        for r in self.sites.drain(..) {
            if r.taken != 0 {
                *self.callouts_by_kind.entry(r.site.kind).or_default() += r.taken;
            }
            *self.sites_by_kind.entry(r.site.kind).or_default() += 1;
        }
        self.tc_next = self.tc_first;
        self.capped_block = None;
        self.generation += 1;
        self.stats.flushes += 1;
        self.stats.tc_bytes_used = u64::from(self.tc_first - TC);
    }

    /// Whether RDTSC runs natively from now on; flushes the TC when that
    /// changes (translations embed the choice).
    pub fn set_native_rdtsc(&mut self, on: bool) {
        if self.config.native_rdtsc != on {
            self.config.native_rdtsc = on;
            self.flush();
        }
    }

    /// Monitor-reported: a callout was taken (for statistics).
    pub fn note_callout(&mut self, id: u32) {
        // Counted per site and named at `stats()` time: a name, or even a
        // hash by kind, per callout cost more than the rest of a hooked
        // callout's bookkeeping.
        let kind = if id == MISS_SITE_ID {
            *self.callouts_by_kind.entry(CalloutKind::IndirectMiss).or_default() += 1;
            CalloutKind::IndirectMiss
        } else {
            let Some(r) = id.checked_sub(self.site_base).and_then(|n| self.sites.get_mut(n as usize)) else { return };
            r.taken += 1;
            r.site.kind
        };
        match kind {
            CalloutKind::BlockExit => self.stats.exits_unchained += 1,
            CalloutKind::IndirectMiss => self.stats.indirect_misses += 1,
            _ => {}
        }
    }

    /// Blocks translated so far (cheap: no copy of the other counters).
    pub fn blocks_translated(&self) -> u64 {
        self.stats.blocks_translated
    }

    /// The counters (indirect hits read from the vCPU page).
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        for (kind, n) in &self.callouts_by_kind {
            *s.callouts_taken.entry(kind.name()).or_default() += n;
        }
        for r in self.sites.iter().filter(|r| r.taken != 0) {
            *s.callouts_taken.entry(r.site.kind.name()).or_default() += r.taken;
        }
        let mut sites = self.sites_by_kind.clone();
        for r in &self.sites {
            *sites.entry(r.site.kind).or_default() += 1;
        }
        for (kind, n) in sites {
            *s.callout_sites.entry(kind.name()).or_default() += n;
        }
        s.indirect_hits = u64::from(self.view.read_u32(vmm_area::vcpu::INDIRECT_HITS));
        s
    }

    /// Guest instructions of `key`'s block next to their translation.
    pub fn disassemble_block(&self, key: &BlockKey) -> Option<String> {
        let b = self.block(key)?;
        let tc = self.view.read(b.tc_start - self.view.base, b.tc_len as usize);
        Some(crate::disasm::listing(b, &tc))
    }

    /// TC bytes of `key`'s block (for tests and tools).
    pub fn block_bytes(&self, key: &BlockKey) -> Option<Vec<u8>> {
        let b = self.block(key)?;
        Some(self.view.read(b.tc_start - self.view.base, b.tc_len as usize))
    }

    /// The lookup-table entry for a guest EIP (the CPL 0-2 table).
    pub fn table_entry(&self, guest_eip: u32) -> u32 {
        self.table_entry_for(0, guest_eip)
    }

    /// The entry for a guest EIP in the table of blocks translated for `cpl`.
    pub fn table_entry_for(&self, cpl: u8, guest_eip: u32) -> u32 {
        self.view.read_u32(vmm_area::lookup_table(cpl) + 4 * (guest_eip & 0xFFFF))
    }

    /// Address of the shared indirect-miss stub.
    pub fn miss_stub(&self) -> u32 {
        self.miss_stub
    }

    /// Current target of an exit's jump (its stub, or a chained block).
    pub fn exit_target(&self, exit: &ExitLink) -> u32 {
        link::aimed_at(&self.view, exit.field)
    }

    // ---- internals ----

    fn blk(&self, id: u32) -> &Block {
        self.blocks[id as usize].as_ref().expect("live block")
    }

    /// Emits `key`'s block (decoded and mangled in `s`) into `s.emitted`
    /// for the next free TC offset; false when it does not fit.
    fn emit_at_next(&self, key: &BlockKey, s: &mut Scratch) -> Result<bool, EngineError> {
        self.emit_at(self.tc_next, key, s)?;
        // Strictly below the end: the TC ends at 2^32 with the default VMM
        // base, and a block ending exactly there had `tc_start + tc_len`
        // wrap to 0, so no address of it was found (a kick landing in it
        // stopped the VM with "no translation covers TC address").
        Ok(u64::from(self.tc_next) + (s.emitted.code.len() as u64) < u64::from(self.tc_end))
    }

    /// Emits `key`'s block into `s.emitted` for TC offset `at`.
    fn emit_at(&self, at: u32, key: &BlockKey, s: &mut Scratch) -> Result<(), EngineError> {
        let ctx = EmitCtx {
            tc_addr: self.view.addr(at),
            vmm_base: self.view.base,
            first_site: self.site_base + self.sites.len() as u32,
            miss_stub: self.miss_stub,
            guest_eip: key.eip,
            poll_at_entry: self.config.poll_at_block_entry,
            count_indirect_hits: self.config.count_indirect_hits,
            count_insns: self.config.count_insns,
            lookup_table: vmm_area::lookup_table(key.cpl),
            guard_pages: self.config.user_page_guards && key.cpl == 3,
        };
        Ok(emit::emit_block(ctx, &s.decoded, &s.mangled, &mut s.emitted)?)
    }

    /// Writes the block emitted in `s` at TC offset `at` and records it.
    fn install(&mut self, key: BlockKey, s: &Scratch, register: bool, at: u32) -> u32 {
        let e = &s.emitted;
        let id = self.blocks.len() as u32;
        let start = self.view.addr(at);
        let len = e.code.len() as u32;
        self.view.write(at, &e.code);
        if at == self.tc_next {
            self.tc_next = (self.tc_next + len).next_multiple_of(16);
        }

        let n_insns = s.decoded.insns.len() as u32;
        let first_site = self.site_base + self.sites.len() as u32;
        self.record_sites(e, start, id, n_insns);
        let exits = e
            .exits
            .iter()
            .map(|x| ExitLink {
                field: start + x.field_off,
                stub: start + x.stub_off,
                target_eip: x.target_eip,
                site: x.site,
                chained: None,
            })
            .collect();
        let guest_bytes: u32 = s.decoded.insns.iter().map(|d| d.bytes.len() as u32).sum();
        let insns = guest_records(&s.decoded, &s.mangled, e, start);
        let pages = s.decoded.pages.clone();
        self.index_pages(&key, &pages, id);
        self.stats.blocks_translated += 1;
        self.stats.user_blocks_translated += u64::from(key.cpl == 3);
        self.stats.guest_insns_translated += u64::from(n_insns);
        self.stats.guest_bytes_translated += u64::from(guest_bytes);
        self.stats.tc_bytes_used = u64::from(self.tc_next - TC);
        self.stats.tc_bytes_emitted += u64::from(len);
        let block = Block {
            key,
            tc_start: start,
            tc_len: len,
            entry: start + e.entry_off,
            entry_guarded: start + e.guarded_off,
            stubs: start + e.stubs_off,
            pages,
            exits,
            incoming: Vec::new(),
            recovery: e.recovery.clone(),
            insns,
            guest_bytes,
            sites: first_site..first_site + e.sites.len() as u32,
            indirect: ChainLink::default(),
            mismatch_jump: start + e.mismatch_off,
            parked_links: Vec::new(),
        };
        let entry = block.entry;
        self.blocks.push(Some(block));
        if register {
            self.by_key.insert(key, id);
        }
        if Some(at) == self.capped_slot {
            self.capped_block = Some(id);
        } else {
            self.by_tc.push((start, id));
        }
        tracing::trace!(target: "engine", ?key, start, len, "translated");
        if self.config.chaining {
            self.chain_eagerly(id, &key);
        }
        entry
    }

    /// The callout sites of block `id` (emitted at TC address `start`).
    fn record_sites(&mut self, e: &Emitted, start: u32, id: u32, block_insns: u32) {
        for s in &e.sites {
            self.sites.push(SiteRecord {
                site: CalloutSite {
                    id: s.id,
                    kind: s.kind,
                    guest_eip: s.guest_eip,
                    next_eip: s.next_eip,
                    instruction: s.instruction,
                    classification: classify::of_class(s.kind.class()),
                    resume_tc: s.resume_off.map(|o| start + o),
                    insns_before: s.insns_before,
                    // A guard stops before the entry charges anything.
                    block_insns: if s.kind == CalloutKind::UserPage { 0 } else { block_insns },
                },
                block: Some(id),
                exit: s.exit,
                taken: 0,
            });
        }
    }

    /// Indexes block `id` by the guest pages its code came from (for
    /// invalidation on writes and, at CPL 3, on address-space changes).
    fn index_pages(&mut self, key: &BlockKey, pages: &[CodePage], id: u32) {
        for p in pages {
            let list = self.by_page.entry(p.phys).or_default();
            if list.is_empty() {
                self.new_pages.insert(p.phys);
            }
            list.push(id);
            if key.cpl == 3 {
                self.claim_user_page(p.linear, p.phys);
                // INVLPG of this page must reach revalidate_user_page.
                self.user_pages.entry(p.linear).or_default().push(id);
                self.view.mark_invlpg(p.linear);
            } else {
                self.kernel_pages.entry(p.linear).or_default().push(id);
            }
        }
    }

    /// Eager chaining of block `id`'s exits to targets already translated.
    fn chain_eagerly(&mut self, id: u32, key: &BlockKey) {
        for n in 0..self.blk(id).exits.len() {
            let t = key.with_eip(self.blk(id).exits[n].target_eip);
            if let Some(&dst) = self.by_key.get(&t) {
                self.link(id, n, dst);
            }
        }
    }

    fn link(&mut self, src: u32, exit: usize, dst: u32) {
        let x = self.blk(src).exits[exit];
        if x.chained == Some(dst) {
            return;
        }
        if x.chained.is_some() {
            self.unlink(src, exit);
        }
        let (d, src_pages) = (self.blk(dst), &self.blk(src).pages);
        let same_pages = d.pages.iter().all(|p| src_pages.iter().any(|q| q.linear == p.linear && q.phys == p.phys));
        let entry = if same_pages { d.entry_guarded } else { d.entry };
        link::aim(&mut self.view, x.field, entry);
        if let Some(b) = self.blocks[src as usize].as_mut() {
            b.exits[exit].chained = Some(dst);
        }
        if let Some(b) = self.blocks[dst as usize].as_mut() {
            b.incoming.push(LinkRef { block: src, exit: exit as u32 });
        }
        self.stats.chains_patched += 1;
    }

    fn unlink(&mut self, src: u32, exit: usize) {
        let Some(x) = self.blocks[src as usize].as_ref().map(|b| b.exits[exit]) else { return };
        let Some(dst) = x.chained else { return };
        link::aim(&mut self.view, x.field, x.stub);
        if let Some(b) = self.blocks[src as usize].as_mut() {
            b.exits[exit].chained = None;
        }
        if let Some(b) = self.blocks[dst as usize].as_mut() {
            b.incoming.retain(|l| !(l.block == src && l.exit == exit as u32));
        }
        self.stats.chains_unpatched += 1;
    }

    /// Unlinks the chains of other blocks into block `id`; returns them.
    fn unlink_incoming(&mut self, id: u32) -> Vec<LinkRef> {
        let incoming = self.blocks.get(id as usize).and_then(Option::as_ref).map(|b| b.incoming.clone());
        let others: Vec<LinkRef> = incoming.unwrap_or_default().into_iter().filter(|l| l.block != id).collect();
        for l in &others {
            self.unlink(l.block, l.exit as usize);
        }
        others
    }

    fn drop_block(&mut self, id: u32) -> Option<BlockKey> {
        self.blocks.get(id as usize)?.as_ref()?;
        self.unlink_incoming(id);
        self.chain_remove(id);
        let b = self.blocks[id as usize].take()?;
        for x in &b.exits {
            if let Some(dst) = x.chained.filter(|&d| d != id) {
                if let Some(d) = self.blocks[dst as usize].as_mut() {
                    d.incoming.retain(|l| l.block != id);
                }
            }
        }
        for sid in b.sites.clone() {
            if let Some(r) = sid.checked_sub(self.site_base).and_then(|n| self.sites.get_mut(n as usize)) {
                r.site.resume_tc = None;
                r.block = None;
            }
        }
        if self.by_key.get(&b.key) == Some(&id) {
            self.by_key.remove(&b.key);
        }
        let was_parked = self.parked.get(&b.key).is_some_and(|l| l.contains(&id));
        remove_id(&mut self.parked, b.key, id);
        for p in &b.pages {
            if was_parked {
                remove_id(&mut self.parked_pages, p.linear, id);
            }
            remove_id(&mut self.by_page, p.phys, id);
            let by_linear = if b.key.cpl == 3 { &mut self.user_pages } else { &mut self.kernel_pages };
            remove_id(by_linear, p.linear, id);
        }
        Some(b.key)
    }

    /// The context whose blocks lookup table `vmm_area::lookup_table(cpl)`
    /// holds now: an inline privilege transition jumps through the other
    /// CPL's table, which is right only when it holds the context the
    /// transition arrives in.
    pub fn table_context(&self, cpl: u8) -> Option<KeyContext> {
        self.tables[table_class(cpl)].context
    }

    fn switch_context(&mut self, ctx: KeyContext) {
        let class = table_class(ctx.cpl);
        if self.tables[class].context != Some(ctx) {
            if self.tables[class].context.is_some() {
                self.clear_table(class);
            }
            self.tables[class].context = Some(ctx);
        }
    }

    /// Aims every entry of lookup table `class` at the miss stub. After the
    /// first time only the installed slots are rewritten.
    fn clear_table(&mut self, class: usize) {
        let miss = self.miss_stub;
        let t = &mut self.tables[class];
        match t.installed.take() {
            None => {
                let mut bytes = Vec::with_capacity(vmm_area::LOOKUP_TABLE_SIZE as usize);
                for _ in 0..LOOKUP_ENTRIES {
                    bytes.extend_from_slice(&miss.to_le_bytes());
                }
                self.view.write(t.offset, &bytes);
                t.entries.iter_mut().for_each(|e| *e = None);
                for b in self.blocks.iter_mut().flatten().filter(|b| table_class(b.key.cpl) == class) {
                    if b.indirect.in_table {
                        link::aim(&mut self.view, b.mismatch_jump, miss);
                    }
                    b.indirect = ChainLink::default();
                }
            }
            Some(slots) => {
                for slot in slots {
                    // (After a flush the blocks are already gone.)
                    let mut at = t.entries[slot as usize].take();
                    while let Some(b) = at.and_then(|id| self.blocks.get_mut(id as usize)?.as_mut()) {
                        at = b.indirect.next;
                        link::aim(&mut self.view, b.mismatch_jump, miss);
                        b.indirect = ChainLink::default();
                    }
                    self.view.write_u32(t.offset + 4 * u32::from(slot), miss);
                }
            }
        }
        t.installed = Some(Vec::new());
    }
}

/// Longest collision chain of a lookup slot (a lookup walks it: each step
/// is three instructions and a jump, against a ~1 µs miss callout).
const MAX_CHAIN: usize = 4;

/// A block's link in its lookup slot's collision chain.
#[derive(Clone, Copy, Debug, Default)]
struct ChainLink {
    /// The chain holds it: the table or another block's mismatch jump
    /// leads to its indirect entry.
    in_table: bool,
    /// Where its own mismatch jump leads (`None`: the miss stub).
    next: Option<u32>,
    /// It was installed since the last clear of its table.
    installed: bool,
}

/// One indirect lookup table: which block heads each slot's chain, the context its
/// blocks belong to, and the slots written since the last clear (`None`
/// before the first full clear).
struct LookupTable {
    offset: u32,
    entries: Vec<Option<u32>>,
    context: Option<KeyContext>,
    installed: Option<Vec<u16>>,
}

impl LookupTable {
    fn new(offset: u32) -> LookupTable {
        LookupTable { offset, entries: vec![None; LOOKUP_ENTRIES as usize], context: None, installed: None }
    }
}

/// Which lookup table serves blocks translated for `cpl`.
fn table_class(cpl: u8) -> usize {
    usize::from(cpl == 3)
}

/// What the engine keeps of each guest instruction of a block emitted at
/// TC address `start`.
fn guest_records(decoded: &DecodedBlock, mangled: &MangledBlock, e: &Emitted, start: u32) -> Vec<GuestInsnRecord> {
    decoded
        .insns
        .iter()
        .zip(&mangled.insns)
        .zip(&e.insn_ranges)
        .map(|((d, m), &(a, b))| GuestInsnRecord {
            instr: d.instr,
            bytes: d.bytes,
            disposition: m.disposition,
            tc_start: start + a,
            tc_end: start + b,
        })
        .collect()
}

/// Removes `id` from the list of `key` in an index, and the list once empty.
/// The blocks of `index` (linear page -> blocks) whose code on that page
/// is no longer the frame it was decoded from: each page walked once.
fn moved_blocks(blocks: &[Option<Block>], index: &FxHashMap<u32, Vec<u32>>, code: &mut dyn GuestCode) -> Vec<u32> {
    let mut stale = Vec::new();
    for (&linear, ids) in index {
        let now = code.phys_page(linear);
        for &id in ids {
            let moved = blocks[id as usize]
                .as_ref()
                .is_some_and(|b| b.pages.iter().any(|p| p.linear == linear && Some(p.phys) != now));
            if moved {
                stale.push(id);
            }
        }
    }
    stale
}

/// Whether the guard of `linear` opens: the page maps (`now`) the frame its
/// registered user blocks came from (`frames`, `Engine::user_frames`).
fn guard_open(frames: &FxHashMap<u32, u64>, linear: u32, now: Option<u64>) -> bool {
    now.is_some() && frames.get(&linear).copied() == now
}

fn remove_id<K: std::hash::Hash + Eq>(index: &mut FxHashMap<K, Vec<u32>>, key: K, id: u32) {
    if let Some(list) = index.get_mut(&key) {
        list.retain(|&x| x != id);
        if list.is_empty() {
            index.remove(&key);
        }
    }
}
