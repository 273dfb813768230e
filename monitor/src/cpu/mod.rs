//! The virtual CPU and its architectural semantics: state ([`state`]),
//! descriptors ([`descriptor`]), segment loads and exception/interrupt
//! delivery through the guest's IDT ([`interrupt`]).
//!
//! Nothing here runs guest code: the functions take a [`Cpu`] and a
//! [`LinearMemory`] (guest-linear accesses through the guest's paging,
//! implemented by the machine) and change them as the processor would.

pub mod descriptor;
pub mod interrupt;
pub mod operand;
pub mod policy;
pub mod sensitive;
pub mod state;
pub mod string;

pub use descriptor::Descriptor;
pub use state::{Cpu, Seg, SegReg, TableReg};

/// Exception vectors.
pub mod vector {
    pub const DE: u8 = 0;
    pub const DB: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BP: u8 = 3;
    pub const OF: u8 = 4;
    pub const BR: u8 = 5;
    pub const UD: u8 = 6;
    pub const NM: u8 = 7;
    pub const DF: u8 = 8;
    pub const TS: u8 = 10;
    pub const NP: u8 = 11;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MF: u8 = 16;
    pub const AC: u8 = 17;
    pub const XM: u8 = 19;
}

/// A guest exception raised by an emulated action (what the processor
/// would raise at this point).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// For #PF: the faulting linear address (becomes CR2 on delivery).
    pub cr2: Option<u32>,
}

impl Fault {
    pub const fn new(vector: u8) -> Fault {
        Fault { vector, error_code: None, cr2: None }
    }
    pub const fn with_code(vector: u8, code: u32) -> Fault {
        Fault { vector, error_code: Some(code), cr2: None }
    }
    pub const fn gp(code: u32) -> Fault {
        Fault::with_code(vector::GP, code)
    }
    pub const fn page(addr: u32, code: u32) -> Fault {
        Fault { vector: vector::PF, error_code: Some(code), cr2: Some(addr) }
    }
    pub const fn ud() -> Fault {
        Fault::new(vector::UD)
    }
}

/// How a guest-linear access is made: by the current privilege level or as
/// an implicit supervisor access (descriptor tables, TSS, ring-0 stack).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub user: bool,
    pub fetch: bool,
}

impl Access {
    pub const SUPERVISOR: Access = Access { user: false, fetch: false };
    pub fn at_cpl(cpl: u8) -> Access {
        Access { user: cpl == 3, fetch: false }
    }
}

/// Guest-linear memory as the virtual CPU sees it: translated through the
/// guest's page tables (if paging is on), with A/D bits set and #PF on
/// failure; MMIO reaches devices.
pub trait LinearMemory {
    fn read(&mut self, cpu: &Cpu, lin: u32, buf: &mut [u8], access: Access) -> Result<(), Fault>;
    fn write(&mut self, cpu: &Cpu, lin: u32, data: &[u8], access: Access) -> Result<(), Fault>;

    fn read_u16(&mut self, cpu: &Cpu, lin: u32, access: Access) -> Result<u16, Fault> {
        let mut b = [0; 2];
        self.read(cpu, lin, &mut b, access)?;
        Ok(u16::from_le_bytes(b))
    }
    fn read_u32(&mut self, cpu: &Cpu, lin: u32, access: Access) -> Result<u32, Fault> {
        let mut b = [0; 4];
        self.read(cpu, lin, &mut b, access)?;
        Ok(u32::from_le_bytes(b))
    }
    fn read_u64(&mut self, cpu: &Cpu, lin: u32, access: Access) -> Result<u64, Fault> {
        let mut b = [0; 8];
        self.read(cpu, lin, &mut b, access)?;
        Ok(u64::from_le_bytes(b))
    }
}
