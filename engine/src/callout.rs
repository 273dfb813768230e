//! Callout sites: what the monitor learns from `VcpuPage.callout_id`.

use crate::classify::{Class, Classification, Flow, Sensitive};
use iced_x86::Instruction;

/// Why translated code exited to the monitor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CalloutKind {
    /// A sensitive instruction: perform it on the virtual CPU.
    Sensitive(Sensitive),
    /// A control transfer the TC does not perform itself (far, INT, IRET,
    /// SYS*, or an indirect branch that could not be inlined).
    ControlFlow(Flow),
    /// A privileged instruction in a block translated for CPL > 0: raise
    /// #GP(0) at `guest_eip` (the instruction is in the site).
    GeneralProtection,
    /// A DIV/IDIV about to divide by zero: raise #DE at `guest_eip`.
    DivideError,
    /// An unchained direct branch: translate `next_eip`, `Engine::chain`, go on.
    BlockExit,
    /// Indirect branch, return or indirect call whose target
    /// (`VcpuPage.callout_target`) is not in the lookup table.
    IndirectMiss,
    /// A CPL 3 block's entry found a guard bit of its pages clear
    /// (`vmm_area::USER_GUARDS`): the address space changed since the bit
    /// was set. The monitor checks the block's pages (`Engine::wake_user_block`).
    UserPage,
    /// A poll point found `poll` (block entry) or `irq_pending` (after STI's
    /// shadow, after POPF set IF) nonzero: an interrupt may be deliverable.
    Poll,
}

impl CalloutKind {
    /// The instruction class a site of this kind performs (`Ident` for the
    /// kinds that perform none: block exits, misses, polls).
    pub fn class(&self) -> Class {
        match *self {
            CalloutKind::Sensitive(s) => Class::Sensitive(s),
            CalloutKind::ControlFlow(f) => Class::ControlFlow(f),
            _ => Class::Ident,
        }
    }

    /// Stable counter name (`/engine/callouts/<name>`).
    pub fn name(&self) -> String {
        match self {
            // Without a kind's operand (`LoadFarPtr(DS)` counts as `loadfarptr`).
            CalloutKind::Sensitive(s) => {
                format!("sensitive/{}", format!("{s:?}").split('(').next().unwrap_or_default()).to_lowercase()
            }
            CalloutKind::ControlFlow(f) => format!("flow/{f:?}").to_lowercase(),
            CalloutKind::GeneralProtection => "gp".into(),
            CalloutKind::DivideError => "de".into(),
            CalloutKind::BlockExit => "block-exit".into(),
            CalloutKind::IndirectMiss => "indirect-miss".into(),
            CalloutKind::Poll => "poll".into(),
            CalloutKind::UserPage => "user-page".into(),
        }
    }
}

/// One callout site of the TC (`Engine::callout_site(id)`).
///
/// Guest state at the far jump of a site:
/// - `Sensitive`, `ControlFlow`, `GeneralProtection`, `DivideError`: as at the start of the
///   instruction at `guest_eip` (nothing of it executed); the monitor
///   performs it and continues at `next_eip` (or `resume_tc`).
/// - `BlockExit`: the branch is done (a call's return address pushed); the
///   guest is at `next_eip`, the branch target.
/// - `Poll`, `UserPage`: the guest is at `guest_eip` (== `next_eip`), all
///   registers clean (a `UserPage` site is the block's start: nothing of
///   the block ran, but its entry charged the block's instructions).
/// - `IndirectMiss`: the branch is done; the guest is at
///   `VcpuPage.callout_target`, registers clean.
#[derive(Clone, Debug)]
pub struct CalloutSite {
    pub id: u32,
    pub kind: CalloutKind,
    /// Guest EIP of the instruction that made the callout.
    pub guest_eip: u32,
    /// Guest EIP where execution continues after it (branch target for
    /// `BlockExit`).
    pub next_eip: u32,
    /// The decoded guest instruction (default for `Poll`/`IndirectMiss`).
    pub instruction: Instruction,
    /// The table's attributes of the site's class (`classify::of_class`,
    /// looked up once here rather than on every callout).
    pub classification: Classification,
    /// Where to re-enter the TC after performing the instruction, when the
    /// translation goes on after it. The monitor may always ignore it and
    /// look up `next_eip` instead, and must when the callout changed
    /// anything in the block key (mode, CPL, CS, SS size). `None` once the
    /// block was dropped.
    pub resume_tc: Option<u32>,
    /// Guest instructions of the block retired before this site (for the
    /// deterministic mode's instruction count).
    pub insns_before: u32,
    /// Guest instructions of the whole block (what its entry charged).
    pub block_insns: u32,
}

/// Reserved id of the shared indirect-miss stub.
pub const MISS_SITE_ID: u32 = 0;
/// First id handed to translated sites.
pub const FIRST_SITE_ID: u32 = 16;
