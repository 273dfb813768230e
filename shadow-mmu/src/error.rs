//! Errors of the shadow MMU. Guest-visible outcomes (page faults, emulation)
//! are not errors: they are [`crate::FaultOutcome`]s.

use thiserror::Error;

use crate::host::MapError;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MmuError {
    /// The window refused a map/unmap/protect: the shadow state and the host
    /// may disagree from here on, so the monitor should stop the VM.
    #[error(transparent)]
    Host(#[from] MapError),
    /// Loading the PAE PDPTEs found reserved bits: on hardware the MOV to
    /// CR0/CR3/CR4 raises #GP(0) and the register keeps its old value.
    #[error("PDPTE {index} ({entry:#018x}) has reserved bits set: the MOV to CRn must raise #GP(0)")]
    PdpteReserved { index: u8, entry: u64 },
}
