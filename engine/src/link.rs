//! Stage 4, link: chaining of direct exits. An exit is a `jmp`/`jcc` rel32
//! aimed at its exit stub; linking re-aims it at the target block's entry,
//! unlinking re-aims it at the stub. Both are idempotent writes of one
//! rel32 field. Incoming-link lists live in the blocks (`Engine`) so an
//! invalidation can unlink exactly what depends on a dropped block.

use crate::vmm_area::VmmAreaView;

/// Identifies one exit of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinkRef {
    pub block: u32,
    pub exit: u32,
}

/// Live exit of a translated block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitLink {
    /// Guest-linear (TC) address of the rel32 field.
    pub field: u32,
    /// Address of the exit stub (the unlinked target).
    pub stub: u32,
    pub target_eip: u32,
    pub site: u32,
    /// Block the exit is chained to.
    pub chained: Option<u32>,
}

/// Writes `rel32 = target - (field + 4)` through the VMM alias.
pub fn aim(view: &mut VmmAreaView, field: u32, target: u32) {
    let rel = target.wrapping_sub(field.wrapping_add(4));
    let off = field.wrapping_sub(view.base);
    view.write_u32(off, rel);
}

/// The current target of the rel32 at `field`.
pub fn aimed_at(view: &VmmAreaView, field: u32) -> u32 {
    let off = field.wrapping_sub(view.base);
    let rel = view.read_u32(off);
    field.wrapping_add(4).wrapping_add(rel)
}
