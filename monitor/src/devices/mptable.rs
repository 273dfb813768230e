//! The Intel MultiProcessor Specification 1.4 tables the VMM writes in place
//! of firmware (as Firecracker's `arch/x86_64/mptable.rs`): the floating
//! pointer at `MPTABLE_ADDR` (inside the EBDA range Linux scans, reserved in
//! the e820 map) and the configuration table right after it, announcing the
//! one processor (its local APIC at `LAPIC_BASE`), the ISA bus (and the PCI
//! bus when there is one), the I/O APIC at `IOAPIC_BASE`, ISA IRQ n on I/O
//! APIC pin n, PCI INTx lines on their pins, and LINT0 = ExtINT, LINT1 = NMI
//! (virtual-wire mode: no IMCR).
//!
//! With these, Linux leaves PIC mode ("Enabling APIC mode: Flat") and
//! routes its interrupts through the I/O APIC.

use thiserror::Error;

use crate::layout::{IOAPIC_BASE, LAPIC_BASE, MPTABLE_ADDR, MPTABLE_END};
use crate::memory::{GuestMemory, MemoryError};

#[derive(Debug, Error)]
pub enum MpTableError {
    #[error("the MP table needs {need} bytes; {room} are reserved for it")]
    TooLarge { need: usize, room: usize },
    #[error("cannot write the MP table: {0}")]
    Memory(#[from] MemoryError),
}

/// I/O APIC ID in the tables (the local APIC is ID 0).
pub const IOAPIC_ID: u8 = 1;
/// MP bus IDs. Linux looks PCI interrupts up by comparing the PCI bus
/// number with the MP bus ID (`IO_APIC_get_PCI_irq_vector`), so PCI bus 0
/// must be MP bus 0; the ISA bus comes after it (as SeaBIOS numbers them).
const BUS_PCI: u8 = 0;
const BUS_ISA: u8 = 1;
/// Number of ISA IRQs announced on I/O APIC pins 0-15.
const ISA_IRQS: u8 = 16;

/// A PCI device's interrupt pin wired to an I/O APIC pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIrq {
    pub device: u8,
    /// INTA# = 0 .. INTD# = 3.
    pub pin: u8,
    pub ioapic_pin: u8,
}

/// What the tables describe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MpConfig {
    /// CPUID leaf 1 EAX and EDX of the processor.
    pub cpu_signature: u32,
    pub cpu_features: u32,
    /// `Some` when there is a PCI bus 0 (even with no device interrupts).
    pub pci: Option<Vec<PciIrq>>,
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// The floating pointer and the configuration table, as bytes for
/// `MPTABLE_ADDR`.
pub fn build(cfg: &MpConfig) -> Vec<u8> {
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    // Processor: APIC ID 0, version 0x14, enabled | bootstrap.
    entries.extend_from_slice(&[0, 0, 0x14, 0x03]);
    entries.extend_from_slice(&cfg.cpu_signature.to_le_bytes());
    entries.extend_from_slice(&cfg.cpu_features.to_le_bytes());
    entries.extend_from_slice(&[0; 8]);
    count += 1;
    let mut bus = |id: u8, name: &[u8; 6]| {
        entries.extend_from_slice(&[1, id]);
        entries.extend_from_slice(name);
        count += 1;
    };
    if cfg.pci.is_some() {
        bus(BUS_PCI, b"PCI   ");
    }
    bus(BUS_ISA, b"ISA   ");
    // I/O APIC: ID, version 0x11, enabled, address.
    entries.extend_from_slice(&[2, IOAPIC_ID, 0x11, 1]);
    entries.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    count += 1;
    // I/O interrupt assignments: (type, flags, bus, bus irq, pin).
    // Flags 0: the bus's own polarity and trigger (ISA: edge, high;
    // PCI: level, low).
    let mut intsrc = |kind: u8, flags: u16, bus: u8, irq: u8, dst_apic: u8, pin: u8, entry: u8| {
        entries.extend_from_slice(&[entry, kind]);
        entries.extend_from_slice(&flags.to_le_bytes());
        entries.extend_from_slice(&[bus, irq, dst_apic, pin]);
        count += 1;
    };
    for irq in 0..ISA_IRQS {
        if irq == 2 {
            continue; // the cascade has no input of its own
        }
        intsrc(0, 0, BUS_ISA, irq, IOAPIC_ID, irq, 3);
    }
    for p in cfg.pci.iter().flatten() {
        intsrc(0, 0, BUS_PCI, (p.device << 2) | (p.pin & 3), IOAPIC_ID, p.ioapic_pin, 3);
    }
    // Local interrupts: LINT0 ExtINT (virtual wire), LINT1 NMI, to all APICs.
    intsrc(3, 0, BUS_ISA, 0, 0xFF, 0, 4);
    intsrc(1, 0, BUS_ISA, 0, 0xFF, 1, 4);

    let table_addr = MPTABLE_ADDR + 16;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"POPEK   ");
    header.extend_from_slice(b"VIRTUAL PC  ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 (16 bytes), rev 1.4, no IMCR
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

/// Writes the tables at `MPTABLE_ADDR`.
pub fn write(mem: &GuestMemory, cfg: &MpConfig) -> Result<(), MpTableError> {
    let bytes = build(cfg);
    let room = (MPTABLE_END - MPTABLE_ADDR) as usize;
    if bytes.len() > room {
        return Err(MpTableError::TooLarge { need: bytes.len(), room });
    }
    mem.write(MPTABLE_ADDR, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    /// Parses the tables back as Linux's mpparse.c does: (entry type, bytes).
    fn parse(b: &[u8]) -> Vec<(u8, Vec<u8>)> {
        assert_eq!(&b[0..4], b"_MP_");
        assert_eq!(sum(&b[0..16]), 0, "floating pointer checksum");
        let phys = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
        assert_eq!(phys, MPTABLE_ADDR + 16);
        let t = &b[16..];
        assert_eq!(&t[0..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(sum(&t[..len]), 0, "table checksum");
        assert_eq!(u32::from_le_bytes(t[36..40].try_into().unwrap()) as u64, LAPIC_BASE);
        let count = u16::from_le_bytes([t[34], t[35]]);
        let mut out = Vec::new();
        let mut o = 44;
        for _ in 0..count {
            let n = if t[o] == 0 { 20 } else { 8 };
            out.push((t[o], t[o..o + n].to_vec()));
            o += n;
        }
        assert_eq!(o, len, "entries fill the table");
        out
    }

    #[test]
    fn tables_parse_back() {
        let cfg = MpConfig {
            cpu_signature: 0x6D8,
            cpu_features: 0x0781_abf9,
            pci: Some(vec![PciIrq { device: 1, pin: 0, ioapic_pin: 16 }]),
        };
        let b = build(&cfg);
        assert!(b.len() <= (MPTABLE_END - MPTABLE_ADDR) as usize);
        let e = parse(&b);
        assert_eq!(e[0].0, 0);
        assert_eq!(e[0].1[3], 3, "enabled bootstrap processor");
        assert_eq!(&e[1].1[2..8], b"PCI   ");
        assert_eq!(&e[2].1[2..8], b"ISA   ");
        assert_eq!(e[3].1, vec![2, 1, 0x11, 1, 0x00, 0x00, 0xC0, 0xFE]);
        let ints: Vec<_> = e.iter().filter(|x| x.0 == 3).map(|x| (x.1[4], x.1[5], x.1[7])).collect();
        assert_eq!(ints.len(), 16);
        assert!(ints.contains(&(BUS_ISA, 0, 0)), "IRQ0 on pin 0");
        assert!(ints.contains(&(BUS_PCI, 1 << 2, 16)), "00:01.0 INTA# on pin 16");
        let lint: Vec<_> = e.iter().filter(|x| x.0 == 4).map(|x| (x.1[1], x.1[7])).collect();
        assert_eq!(lint, vec![(3, 0), (1, 1)]);
    }

    #[test]
    fn a_flipped_byte_breaks_a_checksum() {
        let b = build(&MpConfig::default());
        for i in [0usize, 9, 16, 30, b.len() - 1] {
            let mut c = b.clone();
            c[i] ^= 0x40;
            let fp_ok = sum(&c[0..16]) == 0;
            let len = u16::from_le_bytes([c[20], c[21]]) as usize;
            let table_ok = c.len() >= 16 + len && sum(&c[16..16 + len]) == 0;
            assert!(!(fp_ok && table_ok), "byte {i}");
        }
    }

    #[test]
    fn written_into_guest_memory() {
        let mem = GuestMemory::new(2 << 20).unwrap();
        write(&mem, &MpConfig::default()).unwrap();
        let mut b = vec![0u8; 512];
        mem.read(MPTABLE_ADDR, &mut b).unwrap();
        parse(&b);
    }
}
