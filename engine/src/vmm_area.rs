//! Layout of the VMM area: the one place that fixes where translated code
//! finds its state (docs/tc-abi.md). The monitor imports these constants.
//!
//! ```text
//! base + 0x00_0000  vCPU page (VcpuPage, GS-relative state of translated code)
//! base + 0x00_0800    re-execution scratch (redirected memory operands)
//! base + 0x00_1000  exit gate (64-bit code written by the monitor)
//! base + 0x00_1040    bare-call trampoline (host benchmark baseline)
//! base + 0x00_1100    native step (one guest instruction run outside the TC)
//! base + 0x00_2000  transition page: what inline INT/IRET may assume (read-only)
//! base + 0x00_2800    gate cache: validated IDT gates
//! base + 0x00_3000  segment cache: validated GDT descriptors (read-only)
//! base + 0x00_4000  IDT alias: the guest frames holding its IDT, read-only
//! base + 0x00_6000  TSS alias: the guest frame holding TSS.ESP0/SS0, read-only
//! base + 0x00_8000  user-page guards: one bit per guest page, read-only
//! base + 0x02_8000    bit-select table of the guards (8 x 256 bytes)
//! base + 0x04_0000  indirect lookup table: 65 536 x u32 TC addresses
//! base + 0x08_0000  the same for CPL 3 blocks
//! base + 0x0C_0000  GDT alias: the guest frames holding its GDT, read-only
//! base + 0x0E_0000  INVLPG filter: one bit per guest page, read-only
//! base + 0x10_0000  translation cache (7 MiB): engine stubs, then blocks
//! ```
//!
//! Every offset of the area lives here, including the monitor-owned ones
//! (exit gate, trampoline, native step, re-execution scratch): the host
//! window, the execution host and the bt backend import them, and the
//! `const` assertions below check that the pieces do not overlap.

use std::mem::{offset_of, size_of};

/// Default guest-linear base of the VMM area (top 8 MiB, 4 MiB aligned).
pub const DEFAULT_BASE: u32 = 0xFF80_0000;
/// Size of the whole VMM area.
pub const AREA_SIZE: u32 = 0x0080_0000;
/// The vCPU page: state translated code reads and writes through `GS`.
pub const VCPU_PAGE: u32 = 0x0000;
/// The exit gate: the target of every callout's far jump (monitor-owned).
pub const EXIT_GATE: u32 = 0x1000;
/// The indirect lookup table (blocks translated for CPL 0-2).
pub const LOOKUP_TABLE: u32 = 0x4_0000;
/// The lookup table of blocks translated for CPL 3 (the counting mode and
/// IOPL-3 user code): kernel and user code each keep their table across
/// the constant switches between them.
pub const LOOKUP_TABLE_USER: u32 = LOOKUP_TABLE + LOOKUP_TABLE_SIZE;
/// Entries of the lookup table (indexed by the low 16 bits of a guest EIP).
pub const LOOKUP_ENTRIES: u32 = 65_536;
/// Size in bytes of the lookup table.
pub const LOOKUP_TABLE_SIZE: u32 = LOOKUP_ENTRIES * 4;
/// Start of the translation cache.
pub const TC: u32 = 0x10_0000;
/// The GDT alias: the guest-RAM frames that hold the guest's GDT, mapped
/// read-only by the monitor, so inline segment loads compare the live
/// descriptor with the validated one without a guest-memory access.
pub const GDT_ALIAS: u32 = 0xC_0000;
/// Pages of the GDT alias (the cached entries may straddle a page).
pub const GDT_ALIAS_PAGES: u32 = 2;
/// The segment cache: per GDT index below [`SEG_CACHE_ENTRIES`], the
/// descriptor the monitor validated and wrote to that index's two host LDT
/// slots (8 bytes), then one byte per RPL: nonzero when a CPL 0 load of
/// DS/ES/FS/GS with that RPL passes every check and needs no accessed-bit
/// write; then one byte per RPL: nonzero when VERW at CPL 0 sets ZF; then
/// one byte ([`SEG_USER_OK`]): nonzero when the segment survives an IRET
/// to CPL 3 (DPL 3 or conforming code). Inline MOV/POP Sreg and VERW hit
/// when the live GDT entry equals it. In a page that guest-mode code can
/// only read: user code must not forge what the kernel's loads trust.
pub const SEG_CACHE: u32 = 0x3000;
/// The selector bit that tells a guest descriptor's two host LDT shadow
/// slots apart (the truncated kernel one and the user one as written):
/// host selector `4 (s & ~7) + 0x27` for guest GDT selector `s`, `| 8` for
/// the user twin (monitor::backend::bt::segments).
pub const SHADOW_USER_BIT: u16 = 8;
/// Bytes per segment-cache entry (descriptor, 4 load bytes, 4 VERW bytes,
/// the user byte, padding).
pub const SEG_CACHE_ENTRY: u32 = 32;
/// Offset of the "survives an IRET to CPL 3" byte in an entry.
pub const SEG_USER_OK: u32 = 16;
/// Offset of the "base is 0" byte in an entry: nonzero when the
/// descriptor both host LDT slots of the index hold has base 0, so a
/// segment register holding either slot turns an effective address into
/// the same linear address (inline INVLPG, [`INVLPG_FILTER`]).
pub const SEG_BASE_ZERO: u32 = 17;
/// Top of the VMM stack at the end of the vCPU page: an inline INT points
/// SS:ESP here (SS the VMM data selector) for the PUSHFD that reads the
/// guest's whole EFLAGS without touching guest memory.
pub const VMM_STACK_TOP: u32 = VCPU_PAGE + 0x1000;
/// Bytes of the VMM stack.
pub const VMM_STACK_LEN: u32 = 16;
/// The transition page ([`Transitions`]): what the monitor validated for
/// inline INT from CPL 3 and IRET to CPL 3, read-only to guest-mode code.
pub const TRANSITIONS: u32 = 0x2000;
/// The gate cache: per vector, the IDT gate the monitor validated for an
/// inline INT n from CPL 3 (8 bytes, zero when the vector must take the
/// callout). Inline INT hits when the live IDT entry equals it.
pub const GATE_CACHE: u32 = TRANSITIONS + 0x800;
/// The port read cache: for the PIC mask registers (0x21, then 0xA1), a
/// u32 that is nonzero when the monitor vouches for the value and the
/// value (u32). A CPL 0 `in al` of such a port reads it here instead of a
/// callout. The monitor refreshes it whenever the machine's ports are in
/// its hands and after every access it performs in place.
pub const PORT_CACHE: u32 = TRANSITIONS + 0x300;
/// The ports [`PORT_CACHE`] covers, in slot order.
pub const CACHED_PORTS: [u16; 2] = [0x21, 0xA1];
/// The exception gate cache: for vectors 0-31, the IDT gate the monitor
/// validated for delivering that exception inline from CPL 3 (any DPL:
/// exceptions do not check it), 0 when it must take the callout.
pub const EXC_GATE_CACHE: u32 = TRANSITIONS + 0x400;
/// The IDT alias: the guest frames that hold the IDT, mapped read-only.
pub const IDT_ALIAS: u32 = 0x4000;
/// Pages of the IDT alias (256 gates may straddle a page).
pub const IDT_ALIAS_PAGES: u32 = 2;
/// The TSS alias: the guest frame that holds TSS.ESP0 and TSS.SS0.
pub const TSS_ALIAS: u32 = 0x6000;
/// The INVLPG filter: one bit per 4 KiB guest-linear page (bit `p & 7` of
/// byte `p >> 3` for page number `p`), set when an INVLPG of that page may
/// have work for the monitor: a shadow mapping there (the window sets the
/// bit on every map), translated CPL 3 code from it, a page of the GDT,
/// IDT or TSS aliases. A clear bit is a promise that the INVLPG callout
/// would change nothing, so a CPL 0 INVLPG of such a page retires inline;
/// only the INVLPG callout clears a bit, after finding nothing left. Why:
/// Linux unmaps and INVLPGs pages it never let the shadow see (vmalloc,
/// kmap, fixmap slots), and a callout costs more than QEMU's whole INVLPG.
pub const INVLPG_FILTER: u32 = 0xE_0000;
/// Bytes of the INVLPG filter: 2^20 pages, one bit each.
pub const INVLPG_FILTER_LEN: u32 = 0x2_0000;

/// The filter byte and bit of the page holding `linear`.
pub const fn invlpg_filter_bit(linear: u32) -> (u32, u8) {
    (INVLPG_FILTER + (linear >> 15), 1 << ((linear >> 12) & 7))
}

/// The user-page guards: one bit per 4 KiB guest-linear page (bit `p & 7`
/// of byte `p >> 3`), set while the current address space maps the page
/// to the frame the translated CPL 3 blocks of that page were decoded
/// from. Every CPL 3 block tests the bits of its pages at entry and takes
/// a `UserPage` callout when one is clear. Why: an address-space switch
/// then costs one bit per page of translated user code instead of parking
/// and reviving every block whose page the new space maps elsewhere or not
/// yet (a fork and exec of busybox parked and revived ~4,000 blocks).
pub const USER_GUARDS: u32 = 0x8000;
/// Bytes of the user-page guards: 2^20 pages, one bit each.
pub const USER_GUARDS_LEN: u32 = 0x2_0000;
/// The guards' bit-select table: byte `256 k + b` is bit `k` of `b`, so
/// two flag-free loads (`movzx`) and a `jecxz` test a guard bit without
/// touching the guest's EFLAGS.
pub const GUARD_BIT_SELECT: u32 = USER_GUARDS + USER_GUARDS_LEN;
/// Bytes of the bit-select table.
pub const GUARD_BIT_SELECT_LEN: u32 = 8 * 256;

/// The guard byte and bit of the page holding `linear`.
pub const fn user_guard_bit(linear: u32) -> (u32, u8) {
    (USER_GUARDS + (linear >> 15), 1 << ((linear >> 12) & 7))
}

/// GDT indexes with a segment-cache entry (Linux uses 32).
pub const SEG_CACHE_ENTRIES: u32 = 64;
/// Size of the translation cache.
pub const TC_SIZE: u32 = AREA_SIZE - TC;

/// Length of the exit gate: `jmp qword [rip+2]` (6 bytes), two bytes of
/// padding and the 8-aligned 64-bit address of the callout exit path.
pub const EXIT_GATE_LEN: u32 = 16;
/// The bare-call trampoline of the host benchmark: 64-bit code below 4 GiB
/// (a far call with a 32-bit operand pushes a 32-bit return address).
pub const BARE_TRAMPOLINE: u32 = EXIT_GATE + 0x40;
/// Length of the bare-call trampoline (code and its far pointer).
pub const BARE_TRAMPOLINE_LEN: u32 = 0x16;
/// Where the monitor runs one guest instruction natively, outside any
/// translation (re-execution, a step over a code-page write).
pub const NATIVE_STEP: u32 = EXIT_GATE + 0x100;
/// Room at [`NATIVE_STEP`]: the longest x86 instruction and a `ud2` stop.
pub const NATIVE_STEP_LEN: u32 = 15 + 2;
/// Scratch bytes in the vCPU page that a re-executed instruction's memory
/// operand is redirected to (through `GS`).
pub const REEXEC_SCRATCH: u32 = VCPU_PAGE + 0x800;
/// Size of [`REEXEC_SCRATCH`]: the largest memory operand re-execution takes.
pub const REEXEC_SCRATCH_LEN: u32 = 64;

const _: () = assert!(EXIT_GATE + EXIT_GATE_LEN <= BARE_TRAMPOLINE);
const _: () = assert!(BARE_TRAMPOLINE + BARE_TRAMPOLINE_LEN <= NATIVE_STEP);
const _: () = assert!(NATIVE_STEP + NATIVE_STEP_LEN <= EXIT_GATE + 0x1000);
const _: () = assert!(REEXEC_SCRATCH + REEXEC_SCRATCH_LEN <= VMM_STACK_TOP - VMM_STACK_LEN);
const _: () = assert!(VMM_STACK_TOP <= EXIT_GATE);
const _: () = assert!(EXIT_GATE + 0x1000 <= TRANSITIONS);
const _: () = assert!(TRANSITIONS + size_of::<Transitions>() as u32 <= PORT_CACHE);
const _: () = assert!(PORT_CACHE + 8 * CACHED_PORTS.len() as u32 <= EXC_GATE_CACHE);
const _: () = assert!(EXC_GATE_CACHE + 32 * 8 <= GATE_CACHE);
const _: () = assert!(GATE_CACHE + 256 * 8 <= SEG_CACHE);
const _: () = assert!(SEG_CACHE + SEG_CACHE_ENTRY * SEG_CACHE_ENTRIES <= IDT_ALIAS);
const _: () = assert!(IDT_ALIAS + IDT_ALIAS_PAGES * 4096 <= TSS_ALIAS);
const _: () = assert!(TSS_ALIAS + 4096 <= USER_GUARDS);
const _: () = assert!(GUARD_BIT_SELECT + GUARD_BIT_SELECT_LEN <= LOOKUP_TABLE);
const _: () = assert!(USER_GUARDS_LEN * 8 == 1 << 20);
const _: () = assert!(LOOKUP_TABLE_USER + LOOKUP_TABLE_SIZE <= GDT_ALIAS);
const _: () = assert!(GDT_ALIAS + GDT_ALIAS_PAGES * 4096 <= INVLPG_FILTER);
const _: () = assert!(INVLPG_FILTER + INVLPG_FILTER_LEN <= TC);
const _: () = assert!(INVLPG_FILTER_LEN * 8 == 1 << 20);
const _: () = assert!(SEG_BASE_ZERO < SEG_CACHE_ENTRY);

/// Number of spill slots in [`VcpuPage::scratch`].
pub const SCRATCH_SLOTS: usize = 8;
/// The spill slot that holds guest `ECX` while a flag-free sequence uses it.
pub const SCRATCH_ECX: u8 = 0;
/// Spill slots of the inline segment load (which saves the arithmetic
/// flags and so may use ordinary compares): guest EAX, EDX, EBX, and the
/// flags as `LAHF; SETO AL` left them in EAX.
pub const SCRATCH_EAX: u8 = 1;
pub const SCRATCH_EDX: u8 = 2;
pub const SCRATCH_EBX: u8 = 3;
pub const SCRATCH_FLAGS: u8 = 4;
/// The spill slot that holds guest `ESP` while an inline INT pushes its
/// frame on the kernel stack (the recovery map restores it from here).
pub const SCRATCH_ESP: u8 = 5;

/// The vCPU page as translated code sees it through `GS` (offset 0 of the
/// VMM area). Field order up to `vmm_gs_sel` is the ABI of docs/tc-abi.md;
/// the engine's own fields follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuPage {
    /// Which callout site is exiting (engine-assigned id).
    pub callout_id: u32,
    /// Indirect branches: the guest target EIP being looked up.
    pub callout_target: u32,
    /// Spill slots; the recovery map says which guest register is where.
    pub scratch: [u32; SCRATCH_SLOTS],
    /// Virtual EFLAGS.IF: 0 or 0x200.
    pub vif: u32,
    /// Nonzero when the virtual PIC has an unmasked request.
    pub irq_pending: u32,
    /// Nonzero when translated code must exit at the next poll point.
    pub poll: u32,
    /// Far pointer to the exit gate: offset.
    pub exit_far_offset: u32,
    /// Far pointer to the exit gate: selector (the 6 bytes are contiguous).
    pub exit_far_selector: u16,
    /// Guest `GS` shadow selector, loaded around GS-prefixed instructions.
    pub guest_gs_sel: u16,
    /// The VMM data selector, reloaded after a GS-prefixed instruction.
    pub vmm_gs_sel: u16,
    pub _pad0: u16,
    // ---- engine fields (after the ABI fields) ----
    /// Virtual EFLAGS.IOPL and NT bits (mask 0x7000), kept by inline
    /// PUSHF/POPF (an inline IRET with NT set misses: a task return).
    pub viopl: u32,
    /// Indirect-lookup hits, counted by the indirect entry prologues when
    /// `Config::count_indirect_hits` is on (wraps).
    pub indirect_hits: u32,
    /// The guest's segment selectors (ES, CS, SS, DS, FS, GS; CS and SS
    /// with the virtual RPL), written by the monitor at every entry into
    /// the TC: `push Sreg` becomes `push dword gs:[guest_sel + 4*sreg]`.
    pub guest_sel: [u32; 6],
    /// Instructions the TC may still retire before it must exit (counting
    /// mode): block entries subtract their length and exit when the result
    /// is negative. The monitor keeps it in `0..=BUDGET_MAX`.
    pub budget: i32,
    /// VMM-area offset at which the live GDT's entry 0 is visible (inside
    /// the [`GDT_ALIAS`] pages).
    pub gdt_live: u32,
    /// Bytes of the live GDT that inline segment loads may use: the GDT
    /// limit and the segment cache's size, rounded down to whole entries;
    /// 0 (every load a callout) when there is no alias.
    pub gdt_live_end: u32,
    /// Bit `sreg` set by an inline load of segment register `sreg` (ES 0,
    /// DS 3, FS 4, GS 5): the monitor takes the new selector from
    /// `guest_sel` at the next exit and clears the bits.
    pub seg_loaded: u32,
    /// Per segment register (by `sreg`), nonzero when the loaded segment
    /// survives an IRET to CPL 3 (null, DPL 3 or conforming code): the
    /// monitor writes it with `guest_sel`, inline loads keep it.
    pub seg_user_ok: [u8; 8],
    /// The last inline privilege transition since the monitor looked
    /// ([`transition`]): written by inline INT and IRET, cleared by the
    /// monitor at every exit.
    pub transition: u32,
    /// Inline INTs from CPL 3 (kernel entries the user-exec policy did not
    /// see as exits; wraps).
    pub inline_entries: u32,
    /// Inline INT/IRET working slots: the IRET frame (EIP, CS, EFLAGS, ESP,
    /// SS) as read, or INT's ESP0, handler EIP and gate type.
    pub frame: [u32; 5],
    /// The guest's SS across an inline INT's switch to the VMM stack.
    pub save_ss: u32,
    /// Host selectors DS, ES, FS and the guest-GS shadow after the
    /// transition (the other slot of the same descriptor).
    pub new_sels: [u32; 4],
}

/// What [`VcpuPage::transition`] says happened last.
pub mod transition {
    /// An inline INT from CPL 3: CS and SS are the transition page's
    /// kernel ones, CPL 0.
    pub const TO_KERNEL: u32 = 1;
    /// An inline IRET to CPL 3: CS and SS are its user ones, CPL 3, IF 1,
    /// IOPL 0.
    pub const TO_USER: u32 = 3;
}

/// The transition page: what the monitor validated for inline privilege
/// transitions, read-only to guest-mode code (so user code cannot forge
/// it). Selectors are guest selectors; `*_off` the byte offset of their GDT
/// entry; `*_desc` the descriptor the live GDT entry must still equal;
/// `*_host` the host LDT selector to load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transitions {
    /// Nonzero: CPL 3 translations may enter the kernel inline (INT n).
    pub int_ok: u32,
    /// Nonzero: CPL 0 translations may return to CPL 3 inline (IRET).
    pub iret_ok: u32,
    pub int_cs_sel: u32,
    pub int_cs_off: u32,
    pub int_cs_desc: [u32; 2],
    /// TSS.SS0 as validated (the TSS alias must still say it).
    pub int_ss_sel: u32,
    pub int_ss_off: u32,
    pub int_ss_desc: [u32; 2],
    pub int_ss_host: u32,
    /// VMM-area offset of TSS.ESP0 in the TSS alias (TSS.SS0 follows).
    pub tss_live: u32,
    /// VMM-area offset of IDT entry 0 in the IDT alias.
    pub idt_live: u32,
    pub user_cs_sel: u32,
    pub user_cs_off: u32,
    pub user_cs_desc: [u32; 2],
    pub user_ss_sel: u32,
    pub user_ss_off: u32,
    pub user_ss_desc: [u32; 2],
    pub user_ss_host: u32,
    /// EFLAGS.IF of user code (0 or 0x200): an inline IRET requires the
    /// frame to restore it, an inline INT pushes it.
    pub user_if: u32,
    /// Nonzero: CPL 0 translations may return to CPL 0 inline (IRET to
    /// the kernel CS, the one `int_cs_*` names).
    pub kiret_ok: u32,
}

/// Offsets of [`Transitions`] fields from the VMM area base.
pub mod trans {
    use super::*;
    macro_rules! at {
        ($($name:ident = $field:ident),* $(,)?) => {
            $(pub const $name: u32 = TRANSITIONS + offset_of!(Transitions, $field) as u32;)*
        };
    }
    at!(
        INT_OK = int_ok,
        IRET_OK = iret_ok,
        INT_CS_SEL = int_cs_sel,
        INT_CS_OFF = int_cs_off,
        INT_CS_DESC = int_cs_desc,
        INT_SS_SEL = int_ss_sel,
        INT_SS_OFF = int_ss_off,
        INT_SS_DESC = int_ss_desc,
        INT_SS_HOST = int_ss_host,
        TSS_LIVE = tss_live,
        IDT_LIVE = idt_live,
        USER_CS_SEL = user_cs_sel,
        USER_CS_OFF = user_cs_off,
        USER_CS_DESC = user_cs_desc,
        USER_SS_SEL = user_ss_sel,
        USER_SS_OFF = user_ss_off,
        USER_SS_DESC = user_ss_desc,
        USER_SS_HOST = user_ss_host,
        USER_IF = user_if,
        KIRET_OK = kiret_ok,
    );
}

/// Largest budget the monitor may set: the entry check reads the sign from
/// the high half (`0xFFFF` = just went negative), so a block's charge must
/// never wrap a budget past `i32::MIN`.
pub const BUDGET_MAX: i32 = 0x7FFF_0000;

/// Offsets of [`VcpuPage`] fields from the VMM area base (`GS`-relative).
pub mod vcpu {
    use super::*;
    pub const CALLOUT_ID: u32 = VCPU_PAGE + offset_of!(VcpuPage, callout_id) as u32;
    pub const CALLOUT_TARGET: u32 = VCPU_PAGE + offset_of!(VcpuPage, callout_target) as u32;
    pub const SCRATCH: u32 = VCPU_PAGE + offset_of!(VcpuPage, scratch) as u32;
    pub const VIF: u32 = VCPU_PAGE + offset_of!(VcpuPage, vif) as u32;
    pub const IRQ_PENDING: u32 = VCPU_PAGE + offset_of!(VcpuPage, irq_pending) as u32;
    pub const POLL: u32 = VCPU_PAGE + offset_of!(VcpuPage, poll) as u32;
    pub const EXIT_FAR: u32 = VCPU_PAGE + offset_of!(VcpuPage, exit_far_offset) as u32;
    pub const GUEST_GS_SEL: u32 = VCPU_PAGE + offset_of!(VcpuPage, guest_gs_sel) as u32;
    pub const VMM_GS_SEL: u32 = VCPU_PAGE + offset_of!(VcpuPage, vmm_gs_sel) as u32;
    pub const VIOPL: u32 = VCPU_PAGE + offset_of!(VcpuPage, viopl) as u32;
    pub const INDIRECT_HITS: u32 = VCPU_PAGE + offset_of!(VcpuPage, indirect_hits) as u32;
    pub const GUEST_SEL: u32 = VCPU_PAGE + offset_of!(VcpuPage, guest_sel) as u32;
    pub const BUDGET: u32 = VCPU_PAGE + offset_of!(VcpuPage, budget) as u32;
    pub const GDT_LIVE: u32 = VCPU_PAGE + offset_of!(VcpuPage, gdt_live) as u32;
    pub const GDT_LIVE_END: u32 = VCPU_PAGE + offset_of!(VcpuPage, gdt_live_end) as u32;
    pub const SEG_LOADED: u32 = VCPU_PAGE + offset_of!(VcpuPage, seg_loaded) as u32;
    pub const SEG_USER_OK: u32 = VCPU_PAGE + offset_of!(VcpuPage, seg_user_ok) as u32;
    pub const TRANSITION: u32 = VCPU_PAGE + offset_of!(VcpuPage, transition) as u32;
    pub const INLINE_ENTRIES: u32 = VCPU_PAGE + offset_of!(VcpuPage, inline_entries) as u32;
    pub const FRAME: u32 = VCPU_PAGE + offset_of!(VcpuPage, frame) as u32;
    pub const SAVE_SS: u32 = VCPU_PAGE + offset_of!(VcpuPage, save_ss) as u32;
    pub const NEW_SELS: u32 = VCPU_PAGE + offset_of!(VcpuPage, new_sels) as u32;

    /// Offset of scratch slot `slot`.
    pub const fn scratch(slot: u8) -> u32 {
        SCRATCH + 4 * slot as u32
    }
}

const _: () = assert!(VCPU_PAGE as usize + size_of::<VcpuPage>() <= REEXEC_SCRATCH as usize);
const _: () = assert!(vcpu::EXIT_FAR + 4 == VCPU_PAGE + offset_of!(VcpuPage, exit_far_selector) as u32);
const _: () = assert!(LOOKUP_TABLE_USER + LOOKUP_TABLE_SIZE <= TC);

/// The lookup table of blocks translated for `cpl`.
pub const fn lookup_table(cpl: u8) -> u32 {
    if cpl == 3 {
        LOOKUP_TABLE_USER
    } else {
        LOOKUP_TABLE
    }
}

/// What the engine needs of the monitor's alias of the VMM area: reads and
/// writes of its bytes. The monitor implements it over its read-write alias
/// mapping with raw-pointer copies (never a `&mut [u8]`: guest-mode code and
/// the monitor's other views share those bytes); tests use a `Vec<u8>`.
/// Nothing else about the host leaks into the engine.
pub trait VmmMemory {
    /// Bytes available: `AREA_SIZE` (or at least up to the end of the TC
    /// the engine is configured to use).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `buf.len()` bytes at offset `off` into `buf` (in bounds).
    fn read(&self, off: usize, buf: &mut [u8]);
    /// Copies `data` to offset `off` (in bounds).
    fn write(&mut self, off: usize, data: &[u8]);
}

impl VmmMemory for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self[off..off + buf.len()]);
    }
    fn write(&mut self, off: usize, data: &[u8]) {
        self[off..off + data.len()].copy_from_slice(data);
    }
}

/// The engine's view of the VMM area: where guest-mode code sees it and the
/// alias through which the engine writes it.
pub struct VmmAreaView {
    /// Guest-linear base (what `GS` base is while TC runs; 4 MiB aligned).
    pub base: u32,
    pub mem: Box<dyn VmmMemory + Send>,
}

impl VmmAreaView {
    pub fn new(base: u32, mem: Box<dyn VmmMemory + Send>) -> VmmAreaView {
        VmmAreaView { base, mem }
    }

    /// A view over a fresh zeroed buffer, for tests and tools.
    pub fn detached(base: u32) -> VmmAreaView {
        VmmAreaView { base, mem: Box::new(vec![0u8; AREA_SIZE as usize]) }
    }

    /// Guest-linear address of VMM-area offset `off`.
    pub fn addr(&self, off: u32) -> u32 {
        self.base.wrapping_add(off)
    }

    pub fn read_u32(&self, off: u32) -> u32 {
        let mut b = [0u8; 4];
        self.mem.read(off as usize, &mut b);
        u32::from_le_bytes(b)
    }

    pub(crate) fn write_u32(&mut self, off: u32, v: u32) {
        self.write(off, &v.to_le_bytes());
    }

    pub(crate) fn write(&mut self, off: u32, data: &[u8]) {
        self.mem.write(off as usize, data);
    }

    /// Sets the [`INVLPG_FILTER`] bit of the page holding `linear`.
    pub(crate) fn mark_invlpg(&mut self, linear: u32) {
        let (off, bit) = invlpg_filter_bit(linear);
        let mut b = [0u8];
        self.mem.read(off as usize, &mut b);
        if b[0] & bit == 0 {
            self.write(off, &[b[0] | bit]);
        }
    }

    /// Sets or clears the [`USER_GUARDS`] bit of the page holding `linear`.
    pub(crate) fn set_user_guard(&mut self, linear: u32, live: bool) {
        let (off, bit) = user_guard_bit(linear);
        let mut b = [0u8];
        self.mem.read(off as usize, &mut b);
        let v = if live { b[0] | bit } else { b[0] & !bit };
        if v != b[0] {
            self.write(off, &[v]);
        }
    }

    /// Whether the [`USER_GUARDS`] bit of the page holding `linear` is set.
    pub fn user_guard(&self, linear: u32) -> bool {
        let (off, bit) = user_guard_bit(linear);
        let mut b = [0u8];
        self.mem.read(off as usize, &mut b);
        b[0] & bit != 0
    }

    /// A copy of `len` bytes at `off` (a copy, not a borrow: the bytes are
    /// shared with guest-mode code).
    pub fn read(&self, off: u32, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read(off as usize, &mut v);
        v
    }

    /// Length of the aliased memory.
    pub fn len(&self) -> usize {
        self.mem.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
