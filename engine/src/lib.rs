//! Popek's binary translator.
//!
//! Guest kernel code never runs directly: it is decoded into blocks,
//! mangled (sensitive and control-flow instructions rewritten), emitted
//! into the translation cache (TC) in the VMM area, chained, and mapped
//! back to guest state for precise exceptions. The stages are modules:
//!
//! `decode` → `mangle` → `emit` → `link` → `recover`, driven by [`Engine`].
//! The classification of every instruction is in one table
//! ([`classify::TABLE`]). The contract with the monitor is docs/tc-abi.md;
//! the design is docs/translator.md.
//!
//! The engine has no host mechanics: it writes the TC and the lookup table
//! through [`vmm_area::VmmAreaView`] and reads guest code through
//! [`decode::GuestCode`].

pub mod callout;
pub mod classify;
pub mod decode;
pub mod disasm;
pub mod emit;
mod engine;
pub mod fxhash;
pub mod link;
pub mod mangle;
pub mod recover;
pub mod stats;
pub mod vmm_area;

pub use callout::{CalloutKind, CalloutSite};
pub use decode::{FetchFault, GuestCode};
pub use engine::{Block, Engine, GuestInsnRecord, Wake};
pub use recover::Recovery;
pub use stats::Stats;
pub use vmm_area::{VmmAreaView, VmmMemory};

/// What a translation depends on (QEMU-style key): the same guest bytes
/// translate differently with another CS base, code size, CPL or SS size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    /// Guest EIP (offset in CS).
    pub eip: u32,
    pub cs_base: u32,
    /// CS.D: 32-bit code (else 16-bit).
    pub cs32: bool,
    /// Virtual CPL the block was translated for.
    pub cpl: u8,
    /// Mode word from the monitor: [`key_flags`] bits the engine reads,
    /// plus any the monitor wants to key on (paging, V86, ...).
    pub flags: u32,
}

/// Bits of [`BlockKey::flags`] the engine interprets.
pub mod key_flags {
    /// SS.B: the stack is 32-bit (ESP). Inline PUSHF/POPF and RET imm need it.
    pub const SS32: u32 = 1 << 0;
}

/// The part of a key shared by all blocks of one execution context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyContext {
    pub cs_base: u32,
    pub cs32: bool,
    pub cpl: u8,
    pub flags: u32,
}

impl BlockKey {
    /// A flat 32-bit ring-0 key with a 32-bit stack (the common kernel case).
    pub fn flat32(eip: u32) -> BlockKey {
        BlockKey { eip, cs_base: 0, cs32: true, cpl: 0, flags: key_flags::SS32 }
    }
    /// Guest-linear address of the first instruction.
    pub fn linear(&self) -> u32 {
        self.cs_base.wrapping_add(self.eip)
    }
    pub fn with_eip(&self, eip: u32) -> BlockKey {
        BlockKey { eip, ..*self }
    }
    pub fn ss32(&self) -> bool {
        self.flags & key_flags::SS32 != 0
    }
    pub fn context(&self) -> KeyContext {
        KeyContext { cs_base: self.cs_base, cs32: self.cs32, cpl: self.cpl, flags: self.flags }
    }
}

/// Switches and sizes (DynamoRIO-style knobs to hunt bugs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Poll `VcpuPage.poll` at every block entry (the interrupt delivery
    /// point of chained and indirect transfers).
    pub poll_at_block_entry: bool,
    /// Patch exits to jump straight to translated targets.
    pub chaining: bool,
    /// Cap on guest instructions per block.
    pub max_block_insns: usize,
    /// Bytes of the TC region to use (default: all of it).
    pub tc_size: u32,
    /// Count indirect-lookup hits in `VcpuPage.indirect_hits`.
    pub count_indirect_hits: bool,
    /// Inline PUSHF/POPF sequences (else callouts).
    pub inline_flags: bool,
    /// Inline MOV/POP to DS, ES, FS and GS in CPL 0 code through the
    /// segment cache (else callouts; `vmm_area::SEG_CACHE`).
    pub inline_segments: bool,
    /// Inline INT n from CPL 3 and IRET from CPL 0 to CPL 3 through the
    /// transition page (`vmm_area::TRANSITIONS`): kernel entries and exits
    /// of translated user code with no callout. Off in the counting mode.
    pub inline_transitions: bool,
    /// `in al` of a port the monitor caches (`vmm_area::PORT_CACHE`, the
    /// PIC masks) reads the cache in CPL 0 code. Off in the counting mode.
    pub inline_port_reads: bool,
    /// INVLPG in CPL 0 code retires inline when the monitor's filter says
    /// it has nothing to do (`vmm_area::INVLPG_FILTER`). Off in the
    /// counting mode, like the port cache: whether it hits depends on the
    /// monitor's mapping history, not on the guest alone.
    pub inline_invlpg: bool,
    /// Count retired guest instructions (the deterministic mode): every
    /// block entry charges its instruction count to `VcpuPage.budget` and
    /// exits with a `Poll` callout, before running, when the budget would go
    /// negative (docs/translator.md, "Counting").
    pub count_insns: bool,
    /// RDTSC runs natively (the host's TSC is the guest's: no offset, and
    /// CR4.TSD clear). The monitor turns it off, flushing the TC, when the
    /// guest changes either ([`crate::Engine::set_native_rdtsc`]).
    pub native_rdtsc: bool,
    /// CPL 3 blocks test their pages' guard bits at entry
    /// (`vmm_area::USER_GUARDS`): an address-space switch clears the bits
    /// of pages the new space maps elsewhere instead of parking their
    /// blocks. Off: every switch parks those blocks at once (the older
    /// way, kept for comparison and the metamorphic fuzzer).
    pub user_page_guards: bool,
    /// Test-only fault injection: every IDENT instruction with this mnemonic
    /// and a 32-bit general-purpose destination gets `lea r, [r + 1]`
    /// appended. Replay must catch it (issue 7's acceptance test).
    pub corrupt: Option<iced_x86::Mnemonic>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            poll_at_block_entry: true,
            chaining: true,
            max_block_insns: 64,
            tc_size: vmm_area::TC_SIZE,
            count_indirect_hits: false,
            inline_flags: true,
            inline_segments: true,
            inline_transitions: true,
            inline_port_reads: true,
            inline_invlpg: true,
            count_insns: false,
            native_rdtsc: false,
            user_page_guards: true,
            corrupt: None,
        }
    }
}

impl Config {
    /// Sets the test-only `corrupt` switch from a mnemonic's name (any
    /// case): the engine owns the instruction names, the monitor passes
    /// the user's text.
    pub fn corrupt_named(&mut self, name: &str) -> Result<(), String> {
        let m = iced_x86::Mnemonic::values()
            .find(|m| format!("{m:?}").eq_ignore_ascii_case(name))
            .ok_or_else(|| format!("corrupt={name}: not an x86 mnemonic"))?;
        self.corrupt = Some(m);
        Ok(())
    }
}

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Fetch(#[from] FetchFault),
    #[error("no guest-physical page behind linear {0:#x}")]
    NoPhysPage(u32),
    #[error("VMM area alias too small: {have} bytes, need {need}")]
    AreaTooSmall { have: usize, need: usize },
    #[error("VMM area base {0:#x} is not 4 MiB aligned")]
    Misaligned(u32),
    #[error("a single block does not fit in the translation cache")]
    BlockTooLarge,
    #[error("emitter: {0}")]
    Emit(#[from] dynasmrt::DynasmError),
    #[error("unknown callout site {0}")]
    UnknownSite(u32),
    #[error("callout site {0} is not a block exit")]
    NotBlockExit(u32),
    #[error("callout site {0} belongs to a dropped block")]
    StaleSite(u32),
    #[error("block not translated: {0:?}")]
    NotTranslated(BlockKey),
}

/// The name the brief uses for translation failures.
pub type TranslateError = EngineError;

impl From<decode::DecodeError> for EngineError {
    fn from(e: decode::DecodeError) -> EngineError {
        match e {
            decode::DecodeError::Fetch(f) => EngineError::Fetch(f),
            decode::DecodeError::NoPhysPage(l) => EngineError::NoPhysPage(l),
        }
    }
}
