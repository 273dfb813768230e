//! The I/O APIC (82093AA-style, version 0x11, 24 pins) at `IOAPIC_BASE`:
//! an index register (IOREGSEL, +0x00) and a data window (IOWIN, +0x10)
//! over the ID, version, arbitration and redirection-table registers.
//!
//! Pins follow their input line's level ([`IoApic::set_pin`]). An unmasked
//! edge-triggered pin sends one message per rising edge (a masked edge is
//! lost, as on the chip); an unmasked level-triggered pin sends one while its
//! line is asserted and Remote IRR is clear, and sets Remote IRR until the
//! local APIC's EOI for its vector comes back ([`IoApic::eoi`]). Messages
//! wait in an outbox the platform hands to the local APIC
//! ([`IoApic::take_messages`]). Polarity is recorded, not applied: devices
//! report "asserted", whatever the wire level.

use super::apic::Message;
use super::bus::MmioDevice;
use crate::layout::IOAPIC_BASE;

/// Number of redirection-table entries (pins).
pub const PINS: usize = 24;
/// Version register: version 0x11, maximum redirection entry 23.
pub const VERSION: u32 = 0x0017_0011;

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const DELIVERY_STATUS: u64 = 1 << 12;
/// Bits the guest may write: vector, delivery mode, destination mode,
/// polarity, trigger mode, mask, destination.
const WRITABLE: u64 = 0xFF00_0000_0001_AFFF;

pub struct IoApic {
    id: u32,
    select: u32,
    table: [u64; PINS],
    levels: [bool; PINS],
    outbox: Vec<Message>,
    /// Messages sent, for stats output.
    pub sent: u64,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    pub fn new() -> Self {
        Self { id: 0, select: 0, table: [MASKED; PINS], levels: [false; PINS], outbox: Vec::new(), sent: 0 }
    }

    /// Sets the level of input `pin`.
    pub fn set_pin(&mut self, pin: usize, level: bool) {
        let Some(old) = self.levels.get(pin).copied() else {
            crate::guest_warn!(pin, "I/O APIC: pin out of range");
            return;
        };
        self.levels[pin] = level;
        let entry = self.table[pin];
        if entry & LEVEL == 0 {
            if level && !old {
                self.send(pin);
            }
        } else {
            self.service_level(pin);
        }
    }

    /// One edge on an edge-triggered input.
    pub fn pulse_pin(&mut self, pin: usize) {
        self.set_pin(pin, true);
        self.set_pin(pin, false);
    }

    fn service_level(&mut self, pin: usize) {
        let entry = self.table[pin];
        if entry & LEVEL != 0 && self.levels[pin] && entry & REMOTE_IRR == 0 && self.send(pin) {
            self.table[pin] |= REMOTE_IRR;
        }
    }

    /// Queues pin `pin`'s message unless the pin is masked.
    fn send(&mut self, pin: usize) -> bool {
        let e = self.table[pin];
        if e & MASKED != 0 {
            return false;
        }
        self.outbox.push(Message {
            vector: e as u8,
            mode: ((e >> 8) & 7) as u32,
            logical: e & (1 << 11) != 0,
            dest: (e >> 56) as u8,
            level: e & LEVEL != 0,
        });
        self.sent += 1;
        true
    }

    /// The local APIC's EOI for `vector`: Remote IRR clears on the pins
    /// that use it, and a line still asserted sends again.
    pub fn eoi(&mut self, vector: u8) {
        for pin in 0..PINS {
            let e = self.table[pin];
            if e & LEVEL != 0 && e as u8 == vector && e & REMOTE_IRR != 0 {
                self.table[pin] &= !REMOTE_IRR;
                self.service_level(pin);
            }
        }
    }

    /// Messages for the local APIC since the last call.
    pub fn take_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.outbox)
    }

    /// Redirection entry `pin` (tests, stats).
    pub fn entry(&self, pin: usize) -> u64 {
        self.table[pin]
    }

    /// Whether pin `pin` is masked (an edge on it is lost). Pins past the
    /// table count as masked: nothing listens there.
    pub fn masked(&self, pin: usize) -> bool {
        self.table.get(pin).is_none_or(|e| e & MASKED != 0)
    }

    fn read_register(&self) -> u32 {
        match self.select {
            0x00 => self.id,
            0x01 => VERSION,
            0x02 => self.id,
            r @ 0x10..=0x3F => {
                let e = self.table[((r - 0x10) / 2) as usize] & !DELIVERY_STATUS;
                if r % 2 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0xFFFF_FFFF,
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            0x00 => self.id = value & 0x0F00_0000,
            r @ 0x10..=0x3F => {
                let pin = ((r - 0x10) / 2) as usize;
                let old = self.table[pin];
                let new = if r % 2 == 0 {
                    (old & !0xFFFF_FFFF) | u64::from(value)
                } else {
                    (old & 0xFFFF_FFFF) | (u64::from(value) << 32)
                };
                // Remote IRR is read-only; an edge pin never holds it.
                let mut e = (new & WRITABLE) | (old & REMOTE_IRR);
                if e & LEVEL == 0 {
                    e &= !REMOTE_IRR;
                }
                self.table[pin] = e;
                // Unmasking a level pin whose line is asserted delivers now.
                self.service_level(pin);
            }
            _ => {}
        }
    }
}

impl MmioDevice for IoApic {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        let offset = addr.wrapping_sub(IOAPIC_BASE) as u32;
        let value = match offset & !3 {
            0x00 => self.select,
            0x10 => self.read_register(),
            _ => 0xFFFF_FFFF,
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get((offset & 3) as usize + i).copied().unwrap_or(0xFF);
        }
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        let offset = addr.wrapping_sub(IOAPIC_BASE) as u32;
        let mut bytes = [0u8; 4];
        for (i, b) in data.iter().take(4).enumerate() {
            bytes[i] = *b;
        }
        let value = u32::from_le_bytes(bytes);
        match (offset, data.len()) {
            (0x00, _) => self.select = value & 0xFF,
            (0x10, 4) => self.write_register(value),
            _ => tracing::debug!(offset, len = data.len(), "I/O APIC: write dropped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(io: &mut IoApic, reg: u32, value: u32) {
        io.write(IOAPIC_BASE, &reg.to_le_bytes());
        io.write(IOAPIC_BASE + 0x10, &value.to_le_bytes());
    }

    fn read(io: &mut IoApic, reg: u32) -> u32 {
        io.write(IOAPIC_BASE, &reg.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(IOAPIC_BASE + 0x10, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identification_registers() {
        let mut io = IoApic::new();
        assert_eq!(read(&mut io, 1), 0x0017_0011);
        write(&mut io, 0, 0x0200_0000);
        assert_eq!(read(&mut io, 0), 0x0200_0000);
        assert_eq!(read(&mut io, 0x10), 1 << 16, "pins start masked");
        assert_eq!(read(&mut io, 0x40), 0xFFFF_FFFF, "beyond the table");
    }

    #[test]
    fn edge_pins_send_one_message_per_rising_edge_and_lose_masked_ones() {
        let mut io = IoApic::new();
        io.pulse_pin(4);
        assert!(io.take_messages().is_empty(), "masked: lost");
        write(&mut io, 0x10 + 8, 0x0000_0834); // vector 0x34, logical
        write(&mut io, 0x11 + 8, 0x0100_0000);
        io.pulse_pin(4);
        io.set_pin(4, true);
        io.set_pin(4, true);
        let m = io.take_messages();
        assert_eq!(m, vec![Message { vector: 0x34, mode: 0, logical: true, dest: 1, level: false }; 2]);
    }

    #[test]
    fn level_pins_hold_remote_irr_until_eoi() {
        let mut io = IoApic::new();
        io.set_pin(16, true);
        write(&mut io, 0x10 + 32, 0x0000_A051); // level, active low, vector 0x51
        assert_eq!(io.take_messages().len(), 1, "unmasking an asserted line delivers");
        assert_ne!(read(&mut io, 0x30) & (1 << 14), 0, "Remote IRR");
        io.set_pin(16, true);
        assert!(io.take_messages().is_empty());
        io.eoi(0x51);
        assert_eq!(io.take_messages().len(), 1, "still asserted: again");
        io.set_pin(16, false);
        io.eoi(0x51);
        assert!(io.take_messages().is_empty());
        assert_eq!(read(&mut io, 0x30) & (1 << 14), 0);
        write(&mut io, 0x30, 0x0000_E051);
        assert_eq!(read(&mut io, 0x30), 0x0000_A051, "Remote IRR is read-only");
    }
}
