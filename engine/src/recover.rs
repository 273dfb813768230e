//! Stage 5, recover: precise guest state for any TC address, kept as data
//! (like DynamoRIO's translate.h entries or QEMU's per-block pc deltas).
//!
//! Each block carries a sorted list of [`RecoveryEntry`]: from `tc_off` up
//! to the next entry, the guest state is "at `guest_eip`", with the listed
//! registers in scratch slots and GS holding the guest or the VMM selector.

use crate::vmm_area::{SCRATCH_ECX, SCRATCH_ESP};
use iced_x86::Register;

/// One run of TC bytes with the same guest state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecoveryEntry {
    /// Offset from the block's TC start.
    pub tc_off: u32,
    pub guest_eip: u32,
    /// Guest ECX is in `scratch[SCRATCH_ECX]`, not in ECX.
    pub ecx_spilled: bool,
    /// GS holds the guest's selector (inside a GS-prefix rewrite).
    pub gs_is_guest: bool,
    /// False inside the tail of a non-IDENT sequence that has already
    /// committed guest-visible effects (e.g. after the pop of a `ret`,
    /// before the lookup jump). Nothing there can fault; an asynchronous
    /// exit there must resume at the same TC address, not at `guest_eip`.
    pub exact: bool,
    /// Inside the guest-memory accesses of an inline privilege transition
    /// (INT's pushes, IRET's frame reads): a fault here is not the guest
    /// instruction's own (those accesses are supervisor ones, the pushes
    /// go to another stack). The monitor resolves it as such, or performs
    /// the instruction itself.
    pub fallback: bool,
    /// Guest ESP is in `scratch[SCRATCH_ESP]` (an inline INT on the kernel
    /// stack), not in ESP.
    pub esp_saved: bool,
}

/// What `Engine::recover` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Guest EIP of the instruction whose start state this is.
    pub guest_eip: u32,
    /// Registers to reload from scratch slots (register, slot index).
    pub restore: Vec<(Register, u8)>,
    /// GS holds the guest's selector here: do not reload it from GS.
    pub gs_is_guest: bool,
    pub exact: bool,
    /// The guest EIP is dynamic: `VcpuPage.callout_target` (shared
    /// indirect-miss stub); `guest_eip` is 0 then.
    pub eip_is_callout_target: bool,
    /// See [`RecoveryEntry::fallback`].
    pub fallback: bool,
}

impl RecoveryEntry {
    pub fn to_recovery(&self) -> Recovery {
        let mut restore = if self.ecx_spilled { vec![(Register::ECX, SCRATCH_ECX)] } else { Vec::new() };
        if self.esp_saved {
            restore.push((Register::ESP, SCRATCH_ESP));
        }
        Recovery {
            guest_eip: self.guest_eip,
            restore,
            gs_is_guest: self.gs_is_guest,
            exact: self.exact,
            eip_is_callout_target: false,
            fallback: self.fallback,
        }
    }
}

/// The entry covering `off` in a sorted list.
pub fn find(entries: &[RecoveryEntry], off: u32) -> Option<&RecoveryEntry> {
    let n = entries.partition_point(|e| e.tc_off <= off);
    n.checked_sub(1).map(|i| &entries[i])
}
