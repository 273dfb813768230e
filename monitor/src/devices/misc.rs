//! The small platform devices: the i8042 keyboard controller, system control
//! port A (0x92), the POST port (0x80), PCI configuration mechanism #1 with
//! no devices behind it (0xcf8-0xcff, including the 0xcf9 reset control),
//! isa-debug-exit (0xf4) and the Bochs/QEMU shutdown port (0x8900).
//!
//! None of them stops anything: they post [`PlatformEvent`]s to an
//! [`EventSink`] that the run loop drains.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::bus::{all_ones, lock, read_bytewise, write_bytewise, ByteRegisters, PortDevice};
use crate::layout::{
    PORT_I8042_CMD, PORT_I8042_DATA, PORT_PCI_CONFIG_ADDRESS, PORT_PCI_RESET_CONTROL, PORT_SYSTEM_CONTROL_A,
};

/// What the platform asks of the run loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformEvent {
    /// The guest pulsed a reset line (i8042 0xfe, port 0x92 bit 0, 0xcf9).
    Reset,
    /// isa-debug-exit: the VM should exit with this status, `(v << 1) | 1`.
    DebugExit(u32),
    /// The guest asked to be powered off.
    PowerOff,
}

/// Where devices post events; clones share one queue.
#[derive(Debug, Clone, Default)]
pub struct EventSink(Arc<Mutex<Vec<PlatformEvent>>>);

impl EventSink {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&self, event: PlatformEvent) {
        tracing::info!(?event, "platform event");
        lock(&self.0).push(event);
    }

    /// Whether an event waits.
    pub fn any(&self) -> bool {
        !lock(&self.0).is_empty()
    }

    /// All events posted since the last call, oldest first.
    pub fn take(&self) -> Vec<PlatformEvent> {
        std::mem::take(&mut *lock(&self.0))
    }
}

// ---- i8042 ---------------------------------------------------------------

const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;
/// Never set: there is no AUX port.
#[cfg(test)]
const STATUS_AUXDATA: u8 = 0x20;

const CTR_KBDINT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

/// Keyboard acknowledge.
const KBD_ACK: u8 = 0xFA;

/// An i8042 with a keyboard that answers the probe commands and never types,
/// and no auxiliary (mouse) port: the AUX loopback test fails cleanly, so
/// Linux registers the keyboard port only.
#[derive(Debug)]
pub struct I8042 {
    events: EventSink,
    /// Output buffer: bytes for the guest, the controller's 1-byte buffer plus
    /// what the keyboard has queued behind it.
    out: VecDeque<u8>,
    ctr: u8,
    /// Output port: bit 0 = not in reset, bit 1 = A20.
    output_port: u8,
    /// A controller command waiting for its data byte.
    pending: Option<u8>,
    last_write_was_command: bool,
    /// The keyboard expects a parameter byte for this command.
    kbd_param: Option<u8>,
    last_data: u8,
    /// The guest read a byte and another one moved into the output buffer:
    /// IRQ1 falls and rises again for it, as the controller's does
    /// ([`I8042::take_new_byte`]).
    new_byte: bool,
    /// Models revision 0 (traces recorded before): no new edge per byte.
    legacy_irq: bool,
}

impl I8042 {
    pub fn new(events: EventSink) -> Self {
        Self {
            events,
            out: VecDeque::new(),
            ctr: CTR_XLATE | CTR_SYS | CTR_KBDINT,
            output_port: 0x03,
            pending: None,
            last_write_was_command: false,
            kbd_param: None,
            last_data: 0,
            new_byte: false,
            legacy_irq: false,
        }
    }

    /// The keyboard interrupt line (IRQ1): a byte waits and KBDINT is enabled.
    pub fn irq1_level(&self) -> bool {
        !self.out.is_empty() && self.ctr & CTR_KBDINT != 0
    }

    /// Whether a byte moved into the output buffer after the guest read the
    /// one before (cleared by asking). The 8259 and the I/O APIC see IRQ1 as
    /// an edge: a line that stayed high from one byte to the next would
    /// announce only the first of the keyboard's multi-byte answers (the
    /// ACK of 0xF2, never the ID bytes), and Linux's atkbd probe then
    /// timed out (about 0.7 s, after which a VM's power-off waited for it).
    pub fn take_new_byte(&mut self) -> bool {
        std::mem::take(&mut self.new_byte) && !self.legacy_irq
    }

    /// Behaves as before [`crate::trace::format::MODEL_REVISION`] 1, for
    /// the replay of traces recorded then.
    pub fn use_legacy_irq(&mut self) {
        self.legacy_irq = true;
    }

    /// A20 as the output port last set it.
    pub fn a20(&self) -> bool {
        self.output_port & 0x02 != 0
    }

    fn status(&self) -> u8 {
        let obf = if self.out.is_empty() { 0 } else { STATUS_OBF };
        let sys = if self.ctr & CTR_SYS != 0 { STATUS_SYS } else { 0 };
        let cmd = if self.last_write_was_command { STATUS_CMD } else { 0 };
        obf | sys | cmd | STATUS_UNLOCKED
    }

    /// A controller reply replaces whatever was waiting in the buffer.
    fn reply(&mut self, b: u8) {
        self.out.clear();
        self.out.push_back(b);
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            0x20 => self.reply(self.ctr),
            0x60 | 0xD1 | 0xD2 | 0xD3 | 0xD4 => self.pending = Some(cmd),
            0xA7 => self.ctr |= CTR_AUXDIS,
            0xA8 => self.ctr &= !CTR_AUXDIS,
            // AUX interface test: "clock line stuck high", i.e. no AUX port.
            0xA9 => self.reply(0x02),
            // Controller self test passed.
            0xAA => {
                self.ctr |= CTR_SYS;
                self.reply(0x55);
            }
            // Keyboard interface test passed.
            0xAB => self.reply(0x00),
            0xAD => self.ctr |= CTR_KBDDIS,
            0xAE => self.ctr &= !CTR_KBDDIS,
            0xC0 => self.reply(0x00),
            0xD0 => self.reply(self.output_port),
            0xDD => self.output_port &= !0x02,
            0xDF => self.output_port |= 0x02,
            // Pulse output lines low for 6 µs; bit 0 clear pulses reset.
            0xF0..=0xFF => {
                if cmd & 1 == 0 {
                    tracing::info!("i8042: reset pulse");
                    self.events.push(PlatformEvent::Reset);
                }
            }
            _ => tracing::debug!(cmd = format_args!("{cmd:#x}"), "i8042: unhandled controller command"),
        }
    }

    fn data_for_command(&mut self, cmd: u8, value: u8) {
        match cmd {
            0x60 => self.ctr = value,
            0xD1 => {
                self.output_port = value;
                if value & 1 == 0 {
                    tracing::info!("i8042: reset through the output port");
                    self.events.push(PlatformEvent::Reset);
                }
            }
            // Write the keyboard output buffer; the AUX one answers as if
            // from the keyboard (no AUX port), which fails Linux's loop test.
            0xD2 | 0xD3 => self.reply(value),
            // Nothing is attached to the AUX port.
            _ => {}
        }
    }

    fn keyboard(&mut self, value: u8) {
        if self.kbd_param.take().is_some() {
            self.out.push_back(KBD_ACK);
            return;
        }
        match value {
            // Reset: ACK, then BAT passed.
            0xFF => self.out.extend([KBD_ACK, 0xAA]),
            // Identify: an MF2 keyboard.
            0xF2 => self.out.extend([KBD_ACK, 0xAB, 0x83]),
            0xEE => self.out.push_back(0xEE),
            // Set LEDs, scan code set, typematic rate: a parameter follows.
            0xED | 0xF0 | 0xF3 => {
                self.kbd_param = Some(value);
                self.out.push_back(KBD_ACK);
            }
            _ => self.out.push_back(KBD_ACK),
        }
    }
}

impl ByteRegisters for I8042 {
    fn read_byte(&mut self, port: u16) -> u8 {
        match port {
            PORT_I8042_DATA => {
                if let Some(b) = self.out.pop_front() {
                    self.last_data = b;
                    self.new_byte = !self.out.is_empty();
                }
                self.last_data
            }
            PORT_I8042_CMD => self.status(),
            _ => 0xFF,
        }
    }

    fn write_byte(&mut self, port: u16, value: u8) {
        match port {
            PORT_I8042_DATA => {
                self.last_write_was_command = false;
                match self.pending.take() {
                    Some(cmd) => self.data_for_command(cmd, value),
                    None => self.keyboard(value),
                }
            }
            PORT_I8042_CMD => {
                self.last_write_was_command = true;
                self.pending = None;
                self.command(value);
            }
            _ => {}
        }
    }
}

// ---- Port 0x92 -----------------------------------------------------------

/// System control port A: bit 0 requests a reset (rising edge), bit 1 is A20.
#[derive(Debug)]
pub struct SystemControlA {
    events: EventSink,
    value: u8,
}

impl SystemControlA {
    pub fn new(events: EventSink) -> Self {
        Self { events, value: 0x02 }
    }

    pub fn a20(&self) -> bool {
        self.value & 0x02 != 0
    }
}

impl PortDevice for SystemControlA {
    fn read(&mut self, port: u16, size: u8) -> u32 {
        read_bytewise(port, size, |p| if p == PORT_SYSTEM_CONTROL_A { self.value } else { 0xFF })
    }

    fn write(&mut self, port: u16, size: u8, value: u32) {
        write_bytewise(port, size, value, |p, b| {
            if p != PORT_SYSTEM_CONTROL_A {
                return;
            }
            if b & 1 != 0 && self.value & 1 == 0 {
                tracing::info!("port 0x92: fast reset");
                self.events.push(PlatformEvent::Reset);
            }
            // The reset bit reads back as written until the reset happens.
            self.value = b & 0x03;
        })
    }
}

// ---- Port 0x80 -----------------------------------------------------------

/// The POST diagnostic port: Linux's I/O delay. Keeps the last code written.
#[derive(Debug, Default)]
pub struct PostPort {
    last: u8,
}

impl PostPort {
    pub fn last_code(&self) -> u8 {
        self.last
    }
}

impl PortDevice for PostPort {
    fn read(&mut self, _port: u16, size: u8) -> u32 {
        all_ones(size)
    }

    fn write(&mut self, _port: u16, _size: u8, value: u32) {
        self.last = value as u8;
    }
}

// ---- PCI configuration ---------------------------------------------------

/// PCI configuration mechanism #1 with an empty bus: the address register
/// (32-bit accesses to 0xcf8) reads back, every data read is all-ones. Byte
/// 0xcf9 is the reset control register: bit 2 set requests a reset.
#[derive(Debug)]
pub struct PciConfig {
    events: EventSink,
    address: u32,
    reset_control: u8,
}

impl PciConfig {
    pub fn new(events: EventSink) -> Self {
        Self { events, address: 0, reset_control: 0 }
    }
}

impl PortDevice for PciConfig {
    fn read(&mut self, port: u16, size: u8) -> u32 {
        match (port, size) {
            (PORT_PCI_CONFIG_ADDRESS, 4) => self.address,
            (PORT_PCI_RESET_CONTROL, 1) => u32::from(self.reset_control),
            _ => all_ones(size),
        }
    }

    fn write(&mut self, port: u16, size: u8, value: u32) {
        match (port, size) {
            (PORT_PCI_CONFIG_ADDRESS, 4) => self.address = value & 0x80FF_FFFC,
            (PORT_PCI_RESET_CONTROL, 1) => {
                self.reset_control = value as u8 & 0x0A;
                if value & 0x04 != 0 {
                    tracing::info!(value, "0xcf9: reset");
                    self.events.push(PlatformEvent::Reset);
                }
            }
            // Writes to configuration data of absent devices vanish.
            _ => {}
        }
    }
}

// ---- isa-debug-exit ------------------------------------------------------

/// QEMU's isa-debug-exit: a write of `v` asks to exit with `(v << 1) | 1`.
#[derive(Debug)]
pub struct DebugExit {
    events: EventSink,
}

impl DebugExit {
    pub fn new(events: EventSink) -> Self {
        Self { events }
    }
}

impl PortDevice for DebugExit {
    fn read(&mut self, _port: u16, size: u8) -> u32 {
        all_ones(size)
    }

    fn write(&mut self, _port: u16, _size: u8, value: u32) {
        self.events.push(PlatformEvent::DebugExit(value.wrapping_shl(1) | 1));
    }
}

// ---- Bochs/QEMU shutdown -------------------------------------------------

/// The Bochs APM shutdown port: the bytes of "Shutdown" in a row power off.
#[derive(Debug)]
pub struct BochsShutdown {
    events: EventSink,
    matched: usize,
}

impl BochsShutdown {
    const MAGIC: &'static [u8] = b"Shutdown";

    pub fn new(events: EventSink) -> Self {
        Self { events, matched: 0 }
    }
}

impl PortDevice for BochsShutdown {
    fn read(&mut self, _port: u16, size: u8) -> u32 {
        all_ones(size)
    }

    fn write(&mut self, _port: u16, _size: u8, value: u32) {
        let b = value as u8;
        self.matched = if b == Self::MAGIC[self.matched] { self.matched + 1 } else { usize::from(b == Self::MAGIC[0]) };
        if self.matched == Self::MAGIC.len() {
            self.matched = 0;
            self.events.push(PlatformEvent::PowerOff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inb(d: &mut dyn PortDevice, port: u16) -> u8 {
        d.read(port, 1) as u8
    }

    fn outb(d: &mut dyn PortDevice, port: u16, v: u8) {
        d.write(port, 1, u32::from(v));
    }

    #[test]
    fn i8042_self_test_and_ctr_like_linux_probe() {
        let events = EventSink::new();
        let mut kbc = I8042::new(events.clone());
        // i8042_flush: nothing to read.
        assert_eq!(inb(&mut kbc, 0x64) & STATUS_OBF, 0);
        outb(&mut kbc, 0x64, 0xAA);
        assert_eq!(inb(&mut kbc, 0x64) & (STATUS_OBF | STATUS_CMD), STATUS_OBF | STATUS_CMD);
        assert_eq!(inb(&mut kbc, 0x60), 0x55);
        assert_eq!(inb(&mut kbc, 0x64) & STATUS_OBF, 0);
        // Read the CTR, write it back without KBDINT, read it again.
        outb(&mut kbc, 0x64, 0x20);
        let ctr = inb(&mut kbc, 0x60);
        assert_eq!(ctr & CTR_KBDINT, CTR_KBDINT);
        outb(&mut kbc, 0x64, 0x60);
        outb(&mut kbc, 0x60, ctr & !CTR_KBDINT);
        outb(&mut kbc, 0x64, 0x20);
        assert_eq!(inb(&mut kbc, 0x60), ctr & !CTR_KBDINT);
        // AUX loop test answers without the AUX bit; the AUX test then says "stuck".
        outb(&mut kbc, 0x64, 0xD3);
        outb(&mut kbc, 0x60, 0x5A);
        assert_eq!(inb(&mut kbc, 0x64) & (STATUS_OBF | STATUS_AUXDATA), STATUS_OBF);
        outb(&mut kbc, 0x64, 0xA9);
        assert_eq!(inb(&mut kbc, 0x60), 0x02);
        assert!(events.take().is_empty());
    }

    #[test]
    fn i8042_keyboard_answers_and_irq1() {
        let mut kbc = I8042::new(EventSink::new());
        outb(&mut kbc, 0x60, 0xF2);
        assert!(kbc.irq1_level());
        assert_eq!([inb(&mut kbc, 0x60), inb(&mut kbc, 0x60), inb(&mut kbc, 0x60)], [0xFA, 0xAB, 0x83]);
        assert!(!kbc.irq1_level());
        outb(&mut kbc, 0x60, 0xED);
        outb(&mut kbc, 0x60, 0x07);
        assert_eq!([inb(&mut kbc, 0x60), inb(&mut kbc, 0x60)], [0xFA, 0xFA]);
    }

    #[test]
    fn i8042_reset_pulse_posts_reset() {
        let events = EventSink::new();
        let mut kbc = I8042::new(events.clone());
        outb(&mut kbc, 0x64, 0xFE);
        assert_eq!(events.take(), vec![PlatformEvent::Reset]);
        outb(&mut kbc, 0x64, 0xFF); // pulse nothing
        outb(&mut kbc, 0x64, 0xD1);
        outb(&mut kbc, 0x60, 0x01); // A20 off, still out of reset
        assert!(!kbc.a20());
        assert!(events.take().is_empty());
    }

    #[test]
    fn port92_reset_and_a20() {
        let events = EventSink::new();
        let mut p = SystemControlA::new(events.clone());
        assert_eq!(inb(&mut p, 0x92), 0x02);
        outb(&mut p, 0x92, 0x00);
        assert!(!p.a20());
        assert_eq!(inb(&mut p, 0x92), 0x00);
        outb(&mut p, 0x92, 0x03);
        assert_eq!(events.take(), vec![PlatformEvent::Reset]);
        assert_eq!(inb(&mut p, 0x92) & 0x02, 0x02);
    }

    #[test]
    fn pci_config_has_no_devices() {
        let events = EventSink::new();
        let mut pci = PciConfig::new(events.clone());
        // Linux's pci_check_type1.
        pci.write(0xCFB, 1, 0x01);
        let saved = pci.read(0xCF8, 4);
        pci.write(0xCF8, 4, 0x8000_0000);
        assert_eq!(pci.read(0xCF8, 4), 0x8000_0000);
        pci.write(0xCF8, 4, saved);
        // Vendor ID of 00:00.0 and friends.
        pci.write(0xCF8, 4, 0x8000_0000);
        assert_eq!(pci.read(0xCFC, 4), 0xFFFF_FFFF);
        assert_eq!(pci.read(0xCFE, 2), 0xFFFF);
        assert_eq!(pci.read(0xCF8, 1), 0xFF, "byte reads of 0xcf8 fail the type 2 probe");
        pci.write(0xCF9, 1, 0x06);
        assert_eq!(events.take(), vec![PlatformEvent::Reset]);
    }

    #[test]
    fn debug_exit_code() {
        let events = EventSink::new();
        let mut d = DebugExit::new(events.clone());
        d.write(0xF4, 1, 0x10);
        d.write(0xF4, 4, 0);
        assert_eq!(events.take(), vec![PlatformEvent::DebugExit(0x21), PlatformEvent::DebugExit(1)]);
    }

    #[test]
    fn bochs_shutdown_string() {
        let events = EventSink::new();
        let mut d = BochsShutdown::new(events.clone());
        for &b in b"SShutdow" {
            outb(&mut d, 0x8900, b);
        }
        assert!(events.take().is_empty());
        outb(&mut d, 0x8900, b'n');
        assert_eq!(events.take(), vec![PlatformEvent::PowerOff]);
    }
}
