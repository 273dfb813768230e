//! Segment shadowing: the host LDT copies of the guest's descriptors and the
//! host selectors each kind of guest-mode code runs with. The bt backend's
//! own business (the host LDT is its execution host's), which is why it
//! lives here and not in the shared [`crate::cpu`] model.
//!
//! Each guest descriptor has two shadow slots in the host LDT, one-to-one,
//! so mapping a host selector found at an exit back to the guest selector
//! is arithmetic, not a search. Guest entry `i` of table `ti` (0 GDT, 1
//! LDT) has host index `FIRST_SHADOW + 4 i + 2 ti + user`:
//!
//! | `user` | holds |
//! | --- | --- |
//! | 0 | the descriptor, limit truncated below the VMM area (translated kernel code) |
//! | 1 | the descriptor as the guest wrote it (direct user code) |
//!
//! Interleaved, so a guest that uses the first few dozen GDT entries (Linux
//! uses 32) keeps the host LDT under a page: the kernel copies the whole
//! table at every `modify_ldt` write, and a write that cost ~17 µs with
//! the 64 KB table of the earlier layout (user slots 2048 entries up)
//! costs a few µs. In selector terms the host selector of guest GDT
//! selector `s` is `4 (s & ~7) + 0x27`, and [`area::SHADOW_USER_BIT`]
//! (bit 3) tells the two slots apart.
//!
//! The two slots of a descriptor are written together, so either always
//! shadows the same descriptor as the other: inline privilege transitions
//! switch a loaded segment between them by flipping the selector's
//! [`area::SHADOW_USER_BIT`].
//!
//! Why two: user code runs directly and glibc addresses its TLS with
//! negative offsets that wrap around 4 GiB (`gs:[-0x54]`), which a truncated
//! segment turns into #GP (Xen's "nosegneg" problem). Truncating user
//! segments would buy nothing here anyway: in-process user code can load the
//! host's flat selectors itself.

use engine::vmm_area::{self as area, vcpu as page};

use super::memory::Guest;
use super::{failed, BackendError};
use crate::cpu::{Cpu, Descriptor, Seg, SegReg};
use crate::host::ldt::{ldt_selector, HostSegment, SegKind, FIRST_SHADOW, LDT_ENTRIES};
use crate::host::{Segments, Vcpu, VmmAlias};

/// Guest GDT/LDT indexes that have a shadow slot.
pub const MAX_SHADOWED: u16 = (LDT_ENTRIES - FIRST_SHADOW) / 4;

/// The host LDT copy of code/data descriptor `d`, truncated below the VMM
/// area (`vmm_base`), or as written when `vmm_base` is `None`. System
/// descriptors have no shadow.
pub fn descriptor_shadow(d: &Descriptor, vmm_base: Option<u32>) -> Option<HostSegment> {
    if !d.s {
        return None;
    }
    let kind = if d.is_code() {
        SegKind::Code { readable: d.typ & 2 != 0 }
    } else {
        SegKind::Data { writable: d.typ & 2 != 0, expand_down: d.typ & 4 != 0 }
    };
    let seg = HostSegment { base: d.base, limit: d.limit, kind, big: d.db, present: d.present };
    Some(match vmm_base {
        Some(b) => seg.truncated(b),
        None => seg,
    })
}

/// Host LDT index of the shadow of guest selector `sel`: the truncated
/// slot, or the user slot (as written) when `user` (None for null
/// selectors and indexes beyond the shadow space).
pub fn shadow_index(sel: u16, user: bool) -> Option<u16> {
    let index = sel >> 3;
    if sel & !3 == 0 || index >= MAX_SHADOWED {
        return None;
    }
    let table = (sel >> 2) & 1;
    Some(FIRST_SHADOW + 4 * index + 2 * table + u16::from(user))
}

/// Host selector (RPL 3, TI=1) for guest selector `sel`.
pub fn shadow_selector(sel: u16, user: bool) -> Option<u16> {
    shadow_index(sel, user).map(ldt_selector)
}

/// Guest selector for host selector `host` given the guest RPL to report
/// (the host always has RPL 3). Inverse of [`shadow_selector`].
pub fn guest_selector(host: u16, rpl: u8) -> Option<u16> {
    if host & 4 == 0 {
        return None;
    }
    let rest = (host >> 3).checked_sub(FIRST_SHADOW)?;
    let (gi, ti) = (rest / 4, (rest >> 1) & 1);
    Some((gi << 3) | (ti << 2) | u16::from(rpl & 3))
}

/// A selector error code from the host refers to a host selector: report
/// the guest selector it shadows.
pub fn guest_error_code(code: u32) -> u32 {
    if code == 0 {
        return 0;
    }
    let sel = (code & 0xFFFC) as u16;
    guest_selector(sel | 3, 0).map_or(code, |g| u32::from(g & 0xFFFC) | (code & 1))
}

/// The last translated-mode selectors, valid while the guest segments, the
/// CPL and the host LDT are unchanged.
#[derive(Clone, Copy, Debug)]
struct TcCache {
    regs: [u128; 5],
    ldt_stamp: u64,
    cpl: u8,
    segs: Segments,
    guest_gs: u16,
}

/// The host LDT as this backend wrote it, and the selectors derived from it.
pub struct Shadows {
    vmm_base: u32,
    /// Host LDT entries as written, by index.
    ldt: crate::host::ldt::LdtTable,
    /// Host LDT writes so far (a counter, and the stamp of `tc_cache`).
    writes: u64,
    tc_cache: Option<TcCache>,
    /// What inline segment loads may use (kept with the host LDT it
    /// describes: every write of a kernel GDT slot updates it).
    pub seg_cache: SegCache,
}

impl Shadows {
    pub fn new(vmm_base: u32, alias: VmmAlias) -> Shadows {
        Shadows { vmm_base, ldt: Default::default(), writes: 0, tc_cache: None, seg_cache: SegCache::new(alias) }
    }

    /// Host LDT entries written so far.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Host selector for a guest segment register, writing its shadow into
    /// the host LDT when it changed.
    pub fn shadow(&mut self, host: &mut Vcpu, seg: SegReg, nullable: bool, user: bool) -> Result<u16, BackendError> {
        if seg.selector & !3 == 0 && nullable {
            return Ok(0);
        }
        let index = shadow_index(seg.selector, user)
            .or(if seg.selector & !3 == 0 { Some(0) } else { None })
            .ok_or_else(|| failed(format!("selector {:#x} has no shadow slot", seg.selector)))?;
        let truncated = Some(self.vmm_base);
        let hs = descriptor_shadow(&seg.cache, if user { None } else { truncated })
            .ok_or_else(|| failed(format!("selector {:#x} is not a code/data segment", seg.selector)))?;
        self.write_slot(host, index, hs)?;
        if seg.selector & !3 != 0 {
            // The other slot of the pair shadows the same descriptor.
            let twin = descriptor_shadow(&seg.cache, if user { truncated } else { None }).expect("a code/data segment");
            self.write_slot(host, index ^ 1, twin)?;
            if seg.selector & 4 == 0 {
                // Both slots of this GDT index now shadow `seg.cache`.
                self.seg_cache.record(seg.selector >> 3, &seg.cache);
            }
        }
        Ok(ldt_selector(index))
    }

    fn write_slot(&mut self, host: &mut Vcpu, index: u16, hs: HostSegment) -> Result<(), BackendError> {
        if self.ldt.get(&index) != Some(&hs) {
            host.set_ldt_entry(index, hs).map_err(failed)?;
            self.ldt.insert(index, hs);
            self.writes += 1;
        }
        Ok(())
    }

    /// Host selectors of SS, DS, ES and FS (shadowed in that order).
    fn data(&mut self, host: &mut Vcpu, cpu: &Cpu, user: bool) -> Result<[u16; 4], BackendError> {
        Ok([
            self.shadow(host, *cpu.seg(Seg::Ss), false, user)?,
            self.shadow(host, *cpu.seg(Seg::Ds), true, user)?,
            self.shadow(host, *cpu.seg(Seg::Es), true, user)?,
            self.shadow(host, *cpu.seg(Seg::Fs), true, user)?,
        ])
    }

    /// Selectors for direct user code: every register its user shadow.
    pub fn direct(&mut self, host: &mut Vcpu, cpu: &Cpu) -> Result<Segments, BackendError> {
        let cs = self.shadow(host, *cpu.seg(Seg::Cs), false, true)?;
        let [ss, ds, es, fs] = self.data(host, cpu, true)?;
        let gs = self.shadow(host, *cpu.seg(Seg::Gs), true, true)?;
        Ok(Segments { cs, ss, ds, es, fs, gs })
    }

    /// Host selectors for translated code (and the guest GS shadow for
    /// GS-prefix rewrites). Callouts come back here constantly with the
    /// same guest segments: the result is cached until a segment or the
    /// host LDT changes.
    pub fn translated(&mut self, host: &mut Vcpu, cpu: &Cpu) -> Result<(Segments, u16), BackendError> {
        let packed = [Seg::Ss, Seg::Ds, Seg::Es, Seg::Fs, Seg::Gs].map(|s| pack(cpu.seg(s)));
        if let Some(c) = &self.tc_cache {
            if c.regs == packed && c.ldt_stamp == self.writes && c.cpl == cpu.cpl {
                return Ok((c.segs, c.guest_gs));
            }
        }
        let regs = [Seg::Ss, Seg::Ds, Seg::Es, Seg::Fs, Seg::Gs].map(|s| *cpu.seg(s));
        // Translated user code (counting mode) keeps the guest's limits, as
        // direct user code does: glibc's TLS accesses wrap around 4 GiB.
        let user = cpu.cpl == 3;
        let [ss, ds, es, fs] = self.data(host, cpu, user)?;
        let segs = Segments { cs: host.vmm_code_selector(), ss, ds, es, fs, gs: host.vmm_data_selector() };
        let guest_gs = self.shadow(host, regs[4], true, user)?;
        self.tc_cache = Some(TcCache { regs: packed, ldt_stamp: self.writes, cpl: cpu.cpl, segs, guest_gs });
        Ok((segs, guest_gs))
    }

    /// Selectors for one instruction run natively in the exit-gate page:
    /// the guest's data segments (truncated), GS the VMM segment unless
    /// `guest_gs`.
    pub fn native_step(&mut self, host: &mut Vcpu, cpu: &Cpu, guest_gs: bool) -> Result<Segments, BackendError> {
        let gs = if guest_gs { self.shadow(host, *cpu.seg(Seg::Gs), true, false)? } else { host.vmm_data_selector() };
        let [ss, ds, es, fs] = self.data(host, cpu, false)?;
        Ok(Segments { cs: host.vmm_code_selector(), ss, ds, es, fs, gs })
    }
}

/// The segment cache and the GDT alias of `vmm_area` (docs/translator.md,
/// "Inline segment loads"): translated CPL 0 code loads DS, ES, FS and GS
/// itself when the live GDT entry equals the descriptor the monitor last
/// validated for that index and wrote to its host LDT slot. A hit is then
/// exactly the load the callout would do; anything else is the callout.
pub struct SegCache {
    alias: VmmAlias,
    /// Per GDT index, the descriptor its cache entry holds.
    entries: [Option<Descriptor>; area::SEG_CACHE_ENTRIES as usize],
    /// What the GDT alias was built for (GDTR, paging registers and the
    /// generation of [`SegCache::invalidate_gdt`]); `None`: rebuild.
    built_for: Option<(u32, u16, u32, u32, u32)>,
    /// Guest-physical frames mapped in the alias pages.
    frames: [Option<u64>; area::GDT_ALIAS_PAGES as usize],
}

impl SegCache {
    fn new(alias: VmmAlias) -> SegCache {
        // The VMM area outlives a VM: clear what a previous one left.
        let entries = area::SEG_CACHE_ENTRIES * area::SEG_CACHE_ENTRY;
        alias.write(area::SEG_CACHE as usize, &vec![0; entries as usize]);
        for off in [page::GDT_LIVE, page::GDT_LIVE_END, page::SEG_LOADED] {
            alias.write_u32(off, 0);
        }
        SegCache { alias, entries: [None; area::SEG_CACHE_ENTRIES as usize], built_for: None, frames: [None; 2] }
    }

    /// Whether a CPL 0 load of DS/ES/FS/GS with `rpl` and descriptor `d`
    /// passes every check and leaves memory alone (accessed bit set).
    fn loadable(d: &Descriptor, rpl: u8) -> bool {
        d.is_readable() && d.present && d.typ & 1 != 0 && (d.is_conforming_code() || rpl <= d.dpl)
    }

    /// Whether a segment register holding `d` (not null) keeps it across
    /// an IRET to CPL 3, which nulls data and non-conforming code segments
    /// of DPL < 3.
    pub fn survives_user_return(d: &Descriptor) -> bool {
        d.dpl == 3 || d.is_conforming_code()
    }

    /// The shadow slots of GDT index `index` hold `d`'s shadows.
    fn record(&mut self, index: u16, d: &Descriptor) {
        let Some(e) = self.entries.get_mut(usize::from(index)) else { return };
        if *e == Some(*d) {
            return;
        }
        *e = Some(*d);
        let mut bytes = [0u8; area::SEG_CACHE_ENTRY as usize];
        bytes[..8].copy_from_slice(&d.to_u64().to_le_bytes());
        for rpl in 0..4u8 {
            bytes[8 + usize::from(rpl)] = u8::from(Self::loadable(d, rpl));
            // VERW at CPL 0: a writable data segment with DPL >= RPL.
            bytes[12 + usize::from(rpl)] = u8::from(d.is_writable_data() && rpl <= d.dpl);
        }
        bytes[area::SEG_USER_OK as usize] = u8::from(Self::survives_user_return(d));
        bytes[area::SEG_BASE_ZERO as usize] = u8::from(d.base == 0);
        let off = area::SEG_CACHE + u32::from(index) * area::SEG_CACHE_ENTRY;
        self.alias.write(off as usize, &bytes);
    }

    /// What an inline load of `sel` loaded: the descriptor of its entry,
    /// when the entry allows that load (else the page was not the TC's).
    pub fn loaded(&self, sel: u16) -> Option<Descriptor> {
        if sel < 4 {
            // A null selector loads (its use faults), as in `load_segment`.
            return Some(Descriptor::default());
        }
        if sel & 4 != 0 {
            return None;
        }
        let d = (*self.entries.get(usize::from(sel >> 3))?)?;
        Self::loadable(&d, (sel & 3) as u8).then_some(d)
    }

    /// Paging or the GDT's mapping may have changed (MOV CR0/CR3/CR4,
    /// INVLPG, a state restore): rebuild the alias before the next entry.
    pub fn invalidate_gdt(&mut self) {
        self.built_for = None;
    }

    /// INVLPG of `linear`: the alias only when it maps one of its pages.
    /// Returns whether it does.
    pub fn invalidate_gdt_page(&mut self, linear: u32, cpu: &Cpu) -> bool {
        let first = cpu.gdtr.base & !0xFFF;
        let page = linear & !0xFFF;
        let covers = (0..area::GDT_ALIAS_PAGES).any(|k| first.wrapping_add(k * 0x1000) == page);
        if covers {
            self.built_for = None;
        }
        covers
    }

    /// Maps the guest frames of the GDT's cached part into the alias pages
    /// when GDTR or paging changed since the last build. No alias (every
    /// inline load a callout) outside protected mode or when a page of it
    /// does not translate to RAM.
    pub fn refresh_gdt(&mut self, cpu: &Cpu, guest: &mut Guest) -> Result<(), BackendError> {
        let key = (cpu.gdtr.base, cpu.gdtr.limit, cpu.cr0, cpu.cr3, cpu.cr4);
        if self.built_for == Some(key) {
            return Ok(());
        }
        self.built_for = Some(key);
        let max = area::SEG_CACHE_ENTRIES * 8;
        let mut end = if cpu.protected_mode() { ((u32::from(cpu.gdtr.limit) + 1) & !7).min(max) } else { 0 };
        let base = cpu.gdtr.base;
        if end != 0 {
            let pages = 1 + ((base & 0xFFF) + end - 1) / 0x1000;
            if !guest.map_alias(base, area::GDT_ALIAS, &mut self.frames[..pages as usize]).map_err(failed)? {
                end = 0;
            }
        }
        self.alias.write_u32(page::GDT_LIVE, area::GDT_ALIAS + (base & 0xFFF));
        self.alias.write_u32(page::GDT_LIVE_END, end);
        Ok(())
    }
}

/// A segment register in one integer (every field, so equal packs mean
/// equal registers): the cache check runs on every entry into the TC, where
/// a field-by-field compare of five registers cost a sixth of a callout.
fn pack(r: &SegReg) -> u128 {
    let d = &r.cache;
    let bits = u128::from(d.typ & 0xF)
        | u128::from(d.s) << 4
        | u128::from(d.dpl & 3) << 5
        | u128::from(d.present) << 7
        | u128::from(d.db) << 8
        | u128::from(d.g) << 9
        | u128::from(d.avl) << 10;
    u128::from(r.selector) | u128::from(d.base) << 16 | u128::from(d.limit) << 48 | bits << 80
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_registers_differ_in_every_field() {
        let base = SegReg {
            selector: 0x10,
            cache: Descriptor {
                base: 0x1000,
                limit: 0xFFFF,
                typ: 3,
                s: true,
                dpl: 0,
                present: true,
                db: true,
                g: false,
                avl: false,
            },
        };
        let mut variants = vec![base];
        let mut v = base;
        v.selector = 0x18;
        variants.push(v);
        let edits: [fn(&mut Descriptor); 9] = [
            |d| d.base = 0x2000,
            |d| d.limit = 0xFFFE,
            |d| d.typ = 2,
            |d| d.s = false,
            |d| d.dpl = 3,
            |d| d.present = false,
            |d| d.db = false,
            |d| d.g = true,
            |d| d.avl = true,
        ];
        for edit in edits {
            let mut v = base;
            edit(&mut v.cache);
            variants.push(v);
        }
        let packs: std::collections::HashSet<u128> = variants.iter().map(pack).collect();
        assert_eq!(packs.len(), variants.len());
    }

    #[test]
    fn shadows_keep_base_and_limit() {
        let d = Descriptor {
            base: 0x1234_5678,
            limit: 0xABCD,
            typ: 3,
            s: true,
            dpl: 3,
            present: true,
            db: true,
            g: false,
            avl: false,
        };
        let h = descriptor_shadow(&d, Some(0xFF80_0000)).unwrap();
        assert_eq!((h.base, h.limit), (0x1234_5678, 0xABCD));
    }

    #[test]
    fn shadow_selectors_round_trip() {
        assert_eq!(shadow_index(0x10, false), Some(FIRST_SHADOW + 8));
        assert_eq!(shadow_index(0x10, true), Some(FIRST_SHADOW + 9));
        assert_eq!(shadow_index(0x0f, false), Some(FIRST_SHADOW + 6));
        assert_eq!(shadow_index(3, false), None);
        // What the TC computes inline: 4 (s & ~7) + 0x27, bit 3 for the twin.
        for s in [0x08u16, 0x10, 0x7b, 0xfb] {
            let want = 4 * (s & !7) + 0x27;
            assert_eq!(shadow_selector(s, false), Some(want), "{s:#x}");
            assert_eq!(shadow_selector(s, true), Some(want | area::SHADOW_USER_BIT), "{s:#x}");
        }
        // Linux's GDT (32 entries) keeps the host LDT within a page.
        assert!((usize::from(shadow_index(31 << 3 | 3, true).unwrap()) + 1) * 8 <= 4096);
        assert_eq!(guest_selector(crate::host::ldt::ldt_selector(crate::host::ldt::VMM_DATA_INDEX), 3), None);
        for user in [false, true] {
            let h = shadow_selector(0x10, user).unwrap();
            assert_eq!(guest_selector(h, 0), Some(0x10));
            let h = shadow_selector(0x0f, user).unwrap();
            assert_eq!(guest_selector(h, 3), Some(0x0f));
        }
        assert!(shadow_index((MAX_SHADOWED - 1) << 3 | 4, true).unwrap() < LDT_ENTRIES);
        assert_eq!(shadow_index(MAX_SHADOWED << 3, true), None);
    }

    #[test]
    fn user_shadows_keep_wraparound_limits() {
        // glibc TLS: base B, limit 4 GiB: gs:[-0x54] wraps to B - 0x54.
        let tls = Descriptor {
            base: 0x0823_e000,
            limit: u32::MAX,
            typ: 3,
            s: true,
            dpl: 3,
            present: true,
            db: true,
            g: true,
            avl: false,
        };
        assert_eq!(descriptor_shadow(&tls, None).unwrap().limit, u32::MAX);
        assert!(descriptor_shadow(&tls, Some(0xFF80_0000)).unwrap().limit < 0xFF80_0000 - 0x0823_e000);
    }
}
