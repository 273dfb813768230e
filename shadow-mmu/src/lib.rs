//! Popek's shadow MMU: guest page-table walks (32-bit, PSE, PAE/NX), the
//! shadow state that mirrors guest translations into the monitor's address
//! window, hidden-fault resolution, A/D-bit emulation, TLB semantics
//! (INVLPG, MOV CR3, global pages) and write protection of code pages.
//!
//! The crate has no host mechanics: the monitor supplies guest RAM through
//! [`PhysMem`] and the window through [`HostMapper`]. See docs/shadow-mmu.md.

mod error;
pub mod fake;
mod host;
pub mod paging;
mod shadow;
mod stats;

pub use error::MmuError;
pub use host::{HostMapper, MapError, MapOp, OutsideRam, PhysMem, Prot};
pub use paging::{Access, PageFault, PageSize, PagingMode, PagingRegs, Perms, Translation};
pub use shadow::{EmulateReason, FaultOutcome, MmuConfig, ShadowEntry, ShadowMmu};
pub use stats::Stats;
