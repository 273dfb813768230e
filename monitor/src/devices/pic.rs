//! i8259A programmable interrupt controllers: a master at 0x20 and a slave at
//! 0xa0 cascaded on the master's IR2, plus the ELCR edge/level registers at
//! 0x4d0/0x4d1.
//!
//! The model follows the data sheet as far as a PC guest (Linux, BSDs, small
//! test kernels) programs it: ICW1-ICW4, OCW1 (IMR), OCW2 (non-specific and
//! specific EOI, rotate on EOI, set priority, rotate in auto-EOI), OCW3 (IRR/ISR
//! read, poll, special mask), auto-EOI, special fully nested mode on the master,
//! edge triggering and ELCR level triggering, priority resolution and the
//! spurious IRQ7/IRQ15 answers. Not modelled: 8080/8085 call-address mode
//! (ICW1 bit 2, ICW1 bit 3 "LTIM" is accepted as level triggering of all lines)
//! and buffered mode (ICW4 bits 2-3, meaningless without a bus).

use crate::layout::{PORT_ELCR, PORT_PIC_MASTER, PORT_PIC_SLAVE};

use super::bus::ByteRegisters;

/// The cascade input on the master.
const CASCADE_IRQ: u8 = 2;

/// One 8259A.
#[derive(Debug, Clone, Default)]
struct Chip {
    is_master: bool,
    /// Line levels as last set (edge detection).
    last_level: u8,
    irr: u8,
    isr: u8,
    imr: u8,
    /// Line with the lowest priority is `priority_add - 1` (rotation).
    priority_add: u8,
    vector_base: u8,
    /// OCW3: read ISR (true) or IRR (false) at the command port.
    read_isr: bool,
    /// OCW3 poll command: the next read is a poll.
    poll: bool,
    special_mask: bool,
    /// 0 = operational, 1 = expecting ICW2, 2 = ICW3, 3 = ICW4.
    init_state: u8,
    needs_icw4: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    /// ICW1 LTIM: every line level triggered.
    ltim: bool,
    /// ELCR: level-triggered lines.
    elcr: u8,
    elcr_mask: u8,
}

impl Chip {
    fn new(is_master: bool) -> Self {
        // IRQ0, 1, 2 (master) and 8, 13 (slave) are always edge triggered on a PC.
        let elcr_mask = if is_master { 0xF8 } else { 0xDE };
        Self { is_master, elcr_mask, ..Default::default() }
    }

    fn level_triggered(&self) -> u8 {
        if self.ltim {
            0xFF
        } else {
            self.elcr
        }
    }

    /// Priority (0 = highest) of the highest-priority line set in `mask`, 8 if none.
    fn priority(&self, mask: u8) -> u8 {
        (0..8).find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0).unwrap_or(8)
    }

    /// The line this chip wants to interrupt with: an unmasked request of
    /// higher priority than anything in service.
    fn wanted(&self) -> Option<u8> {
        let p = self.priority(self.irr & !self.imr);
        if p == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && self.is_master {
            in_service &= !(1 << CASCADE_IRQ);
        }
        (p < self.priority(in_service)).then_some((p + self.priority_add) & 7)
    }

    fn set_line(&mut self, line: u8, level: bool) {
        let bit = 1u8 << line;
        if self.level_triggered() & bit != 0 {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.last_level & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.last_level |= bit;
        } else {
            self.last_level &= !bit;
        }
    }

    /// INTA for `line`: set ISR (unless auto-EOI), clear IRR for an edge.
    fn intack(&mut self, line: u8) {
        let bit = 1u8 << line;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (line + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        if self.level_triggered() & bit == 0 {
            self.irr &= !bit;
        }
    }

    /// ICW1 resets the chip (IMR cleared, IRQ7 lowest priority, IRR read).
    fn icw1(&mut self, value: u8) {
        *self = Self {
            is_master: self.is_master,
            last_level: self.last_level,
            elcr: self.elcr,
            elcr_mask: self.elcr_mask,
            vector_base: self.vector_base,
            init_state: 1,
            needs_icw4: value & 0x01 != 0,
            single: value & 0x02 != 0,
            ltim: value & 0x08 != 0,
            ..Self::default()
        };
        if value & 0x04 != 0 {
            tracing::debug!("i8259: ICW1 call address interval 4 ignored (x86 has no call-address mode)");
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            self.icw1(value);
        } else if value & 0x08 != 0 {
            self.ocw3(value);
        } else {
            self.ocw2(value);
        }
    }

    fn ocw2(&mut self, value: u8) {
        let level = value & 7;
        match value >> 5 {
            // Rotate in automatic EOI mode: clear (0) or set (4).
            0 => self.rotate_on_auto_eoi = false,
            4 => self.rotate_on_auto_eoi = true,
            // Non-specific EOI (1), rotate on non-specific EOI (5).
            cmd @ (1 | 5) => {
                let p = self.priority(self.isr);
                if p != 8 {
                    let line = (p + self.priority_add) & 7;
                    self.isr &= !(1 << line);
                    if cmd == 5 {
                        self.priority_add = (line + 1) & 7;
                    }
                }
            }
            // Specific EOI.
            3 => self.isr &= !(1 << level),
            // Set priority: `level` becomes the lowest.
            6 => self.priority_add = (level + 1) & 7,
            // Rotate on specific EOI.
            7 => {
                self.isr &= !(1 << level);
                self.priority_add = (level + 1) & 7;
            }
            // 2: no operation.
            _ => {}
        }
    }

    fn ocw3(&mut self, value: u8) {
        if value & 0x04 != 0 {
            self.poll = true;
        }
        if value & 0x02 != 0 {
            self.read_isr = value & 0x01 != 0;
        }
        if value & 0x40 != 0 {
            self.special_mask = value & 0x20 != 0;
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_state {
            1 => {
                self.vector_base = value & 0xF8;
                self.init_state = match (self.single, self.needs_icw4) {
                    (false, _) => 2,
                    (true, true) => 3,
                    (true, false) => 0,
                };
            }
            // ICW3: cascade wiring, fixed on a PC.
            2 => self.init_state = if self.needs_icw4 { 3 } else { 0 },
            3 => {
                if value & 0x01 == 0 {
                    crate::guest_warn!("i8259: ICW4 selects 8080/8085 mode; treated as 8086 mode");
                }
                self.auto_eoi = value & 0x02 != 0;
                self.special_fully_nested = value & 0x10 != 0;
                self.init_state = 0;
            }
            _ => self.imr = value,
        }
    }

    fn read_command(&self) -> u8 {
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

/// The cascaded master/slave pair with its ELCR.
#[derive(Debug, Clone)]
pub struct PicPair {
    master: Chip,
    slave: Chip,
}

impl Default for PicPair {
    fn default() -> Self {
        Self::new()
    }
}

impl PicPair {
    pub fn new() -> Self {
        Self { master: Chip::new(true), slave: Chip::new(false) }
    }

    /// Sets the level of ISA line `line` (0-15). Edge-triggered lines latch a
    /// request on a rising edge; level-triggered ones follow the level.
    pub fn set_irq(&mut self, line: u8, level: bool) {
        match line {
            0..=7 => self.master.set_line(line, level),
            8..=15 => {
                self.slave.set_line(line - 8, level);
                self.update_cascade();
            }
            _ => crate::guest_warn!(line, "i8259: IRQ line out of range"),
        }
    }

    /// Raises and lowers an edge-triggered line: one request.
    pub fn pulse_irq(&mut self, line: u8) {
        self.set_irq(line, true);
        self.set_irq(line, false);
    }

    /// Whether a pulse on ISA line `line` (0-7) would leave the chip as it
    /// is: the request is latched already, or the line is level-triggered
    /// (a pulse sets and clears its request before anyone can take it).
    pub fn pulse_is_moot(&self, line: u8) -> bool {
        let chip = &self.master;
        let bit = 1u8 << (line & 7);
        line < 8 && (chip.level_triggered() & bit != 0 || chip.irr & bit != 0)
    }

    /// The master's INT output: an unmasked request of higher priority than
    /// anything in service.
    pub fn pending(&self) -> bool {
        self.master.wanted().is_some()
    }

    /// The INTA cycle: the vector the CPU receives, with ISR set and an edge
    /// request cleared. `None` if the INT output is not asserted (nothing to
    /// deliver). A cascade request whose slave line went away in the meantime
    /// answers the slave's spurious IRQ15 vector, as the hardware does.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let line = self.master.wanted()?;
        let vector = if line == CASCADE_IRQ && !self.master.single {
            let vector = match self.slave.wanted() {
                Some(l) => {
                    self.slave.intack(l);
                    self.slave.vector_base + l
                }
                None => self.slave.vector_base + 7,
            };
            self.master.intack(line);
            self.update_cascade();
            vector
        } else {
            self.master.intack(line);
            self.master.vector_base + line
        };
        Some(vector)
    }

    /// The master's vector for a spurious IRQ7 (INTA with nothing left to
    /// deliver on real hardware); for backends that must answer an INTA that
    /// they already committed to.
    pub fn spurious_vector(&self) -> u8 {
        self.master.vector_base + 7
    }

    /// IRR of the pair (slave in the high byte).
    pub fn irr(&self) -> u16 {
        u16::from(self.master.irr) | u16::from(self.slave.irr) << 8
    }

    /// ISR of the pair (slave in the high byte).
    pub fn isr(&self) -> u16 {
        u16::from(self.master.isr) | u16::from(self.slave.isr) << 8
    }

    /// IMR of the pair (slave in the high byte).
    /// A read of mask register `port` (0x21, 0xA1) without side effects:
    /// `None` in poll mode, where a read acknowledges an interrupt.
    pub fn quiet_read(&self, port: u16) -> Option<u8> {
        match port {
            0x21 if !self.master.poll => Some(self.master.imr),
            0xA1 if !self.slave.poll => Some(self.slave.imr),
            _ => None,
        }
    }

    pub fn imr(&self) -> u16 {
        u16::from(self.master.imr) | u16::from(self.slave.imr) << 8
    }

    /// The slave's INT output drives the master's IR2.
    fn update_cascade(&mut self) {
        let out = self.slave.wanted().is_some();
        self.master.set_line(CASCADE_IRQ, out);
    }

    /// Poll command read: like INTA but answered on the data bus as
    /// `0x80 | line`, or 0 if nothing is requested.
    fn poll_read(&mut self, slave: bool) -> u8 {
        if slave {
            self.slave.poll = false;
            let r = match self.slave.wanted() {
                Some(l) => {
                    self.slave.intack(l);
                    0x80 | l
                }
                None => 0,
            };
            self.update_cascade();
            return r;
        }
        self.master.poll = false;
        match self.master.wanted() {
            Some(l) => {
                self.master.intack(l);
                0x80 | l
            }
            None => 0,
        }
    }
}

impl ByteRegisters for PicPair {
    fn read_byte(&mut self, port: u16) -> u8 {
        match port {
            PORT_PIC_MASTER | 0x21 if self.master.poll => self.poll_read(false),
            PORT_PIC_SLAVE | 0xA1 if self.slave.poll => self.poll_read(true),
            PORT_PIC_MASTER => self.master.read_command(),
            0x21 => self.master.imr,
            PORT_PIC_SLAVE => self.slave.read_command(),
            0xA1 => self.slave.imr,
            PORT_ELCR => self.master.elcr,
            0x4D1 => self.slave.elcr,
            _ => 0xFF,
        }
    }

    fn write_byte(&mut self, port: u16, value: u8) {
        match port {
            PORT_PIC_MASTER => self.master.write_command(value),
            0x21 => self.master.write_data(value),
            PORT_PIC_SLAVE => self.slave.write_command(value),
            0xA1 => self.slave.write_data(value),
            PORT_ELCR => self.master.elcr = value & self.master.elcr_mask,
            0x4D1 => self.slave.elcr = value & self.slave.elcr_mask,
            _ => {}
        }
        self.update_cascade();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::PortDevice;

    /// Linux's `init_8259A`: ICW1-4 on both chips, vectors 0x30/0x38, all masked.
    fn linux_init() -> PicPair {
        let mut pic = PicPair::new();
        let out = |pic: &mut PicPair, port: u16, v: u8| pic.write(port, 1, u32::from(v));
        out(&mut pic, 0x21, 0xFF); // mask all of 8259A-1
        out(&mut pic, 0xA1, 0xFF); // mask all of 8259A-2
        out(&mut pic, 0x20, 0x11); // ICW1: edge, cascade, ICW4
        out(&mut pic, 0x21, 0x30); // ICW2: IRQ0-7 -> 0x30-0x37
        out(&mut pic, 0x21, 0x04); // ICW3: slave on IR2
        out(&mut pic, 0x21, 0x01); // ICW4: 8086 mode, normal EOI
        out(&mut pic, 0xA0, 0x11);
        out(&mut pic, 0xA1, 0x38); // ICW2: IRQ8-15 -> 0x38-0x3f
        out(&mut pic, 0xA1, 0x02); // ICW3: slave id 2
        out(&mut pic, 0xA1, 0x01);
        out(&mut pic, 0x21, 0xFF);
        out(&mut pic, 0xA1, 0xFF);
        pic
    }

    fn eoi(pic: &mut PicPair, line: u8) {
        if line >= 8 {
            pic.write(0xA0, 1, 0x60 | u32::from(line & 7)); // specific EOI on the slave
            pic.write(0x20, 1, 0x62); // specific EOI of the cascade
        } else {
            pic.write(0x20, 1, 0x60 | u32::from(line));
        }
    }

    #[test]
    fn masked_lines_latch_but_do_not_interrupt() {
        let mut pic = linux_init();
        pic.set_irq(0, true);
        assert!(!pic.pending(), "IRQ0 is masked");
        assert_eq!(pic.irr() & 1, 1, "the request is latched in IRR");
        pic.write(0x21, 1, 0xFE); // unmask IRQ0
        assert!(pic.pending());
        assert_eq!(pic.acknowledge(), Some(0x30));
        assert_eq!(pic.isr(), 1);
        assert_eq!(pic.irr() & 1, 0, "INTA clears an edge request");
        assert!(!pic.pending());
        assert_eq!(pic.acknowledge(), None);
    }

    #[test]
    fn edge_needs_a_new_rising_edge() {
        let mut pic = linux_init();
        pic.write(0x21, 1, 0x00);
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), Some(0x34));
        eoi(&mut pic, 4);
        pic.set_irq(4, true); // still high: no new edge
        assert!(!pic.pending());
        pic.set_irq(4, false);
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), Some(0x34));
    }

    #[test]
    fn priorities_and_nesting() {
        let mut pic = linux_init();
        pic.write(0x21, 1, 0x00);
        pic.write(0xA1, 1, 0x00);
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), Some(0x34));
        // A lower-priority request waits while IRQ4 is in service...
        pic.pulse_irq(6);
        assert!(!pic.pending());
        // ...a higher-priority one nests.
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x31));
        // The slave sits at IR2's priority: above 4, below 1.
        pic.pulse_irq(8);
        assert!(!pic.pending(), "IRQ1 in service blocks the cascade");
        pic.write(0x20, 1, 0x20); // non-specific EOI ends IRQ1
        assert_eq!(pic.acknowledge(), Some(0x38));
        assert_eq!(pic.isr(), 0x0114);
        eoi(&mut pic, 8);
        assert_eq!(pic.isr(), 0x0010);
        assert!(!pic.pending());
        pic.write(0x20, 1, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x36));
    }

    #[test]
    fn simultaneous_requests_resolve_lowest_line_first() {
        let mut pic = linux_init();
        pic.write(0x21, 1, 0x00);
        pic.write(0xA1, 1, 0x00);
        for line in [15, 7, 3, 12, 0] {
            pic.pulse_irq(line);
        }
        let mut order = Vec::new();
        while let Some(v) = pic.acknowledge() {
            order.push(v);
            pic.write(0xA0, 1, 0x20);
            pic.write(0x20, 1, 0x20);
        }
        // Slave lines resolve at IR2: 0, (8..15 by slave priority), 3, 7.
        assert_eq!(order, vec![0x30, 0x3C, 0x3F, 0x33, 0x37]);
    }

    #[test]
    fn ocw3_reads_irr_and_isr() {
        let mut pic = linux_init();
        pic.write(0x21, 1, 0xF7);
        pic.pulse_irq(3);
        pic.pulse_irq(5);
        pic.write(0x20, 1, 0x0A); // OCW3: read IRR
        assert_eq!(pic.read(0x20, 1), 0x28);
        pic.acknowledge();
        pic.write(0x20, 1, 0x0B); // OCW3: read ISR
        assert_eq!(pic.read(0x20, 1), 0x08);
        assert_eq!(pic.read(0x21, 1), 0xF7, "the data port reads IMR");
    }

    #[test]
    fn poll_command() {
        let mut pic = linux_init();
        pic.write(0x21, 1, 0x00);
        pic.write(0x20, 1, 0x0C); // OCW3: poll
        assert_eq!(pic.read(0x20, 1), 0x00, "nothing requested");
        pic.pulse_irq(5);
        pic.write(0x20, 1, 0x0C);
        assert_eq!(pic.read(0x20, 1), 0x85);
        assert_eq!(pic.isr(), 0x20, "poll acknowledges");
        pic.write(0x20, 1, 0x0B);
        assert_eq!(pic.read(0x20, 1), 0x20, "the next read is a register read again");
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut pic = PicPair::new();
        for (p, v) in [(0x20, 0x11), (0x21, 0x08), (0x21, 0x04), (0x21, 0x03), (0x21, 0x00)] {
            pic.write(p, 1, v);
        }
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x09));
        assert_eq!(pic.isr(), 0);
        pic.pulse_irq(5);
        assert_eq!(pic.acknowledge(), Some(0x0D));
    }

    #[test]
    fn rotation_changes_priorities() {
        let mut pic = linux_init();
        pic.write(0x21, 1, 0x00);
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x30));
        pic.write(0x20, 1, 0xA0); // rotate on non-specific EOI: IRQ0 becomes lowest
        pic.pulse_irq(0);
        pic.pulse_irq(6);
        assert_eq!(pic.acknowledge(), Some(0x36));
        pic.write(0x20, 1, 0xC1); // set priority: IRQ1 lowest, IRQ2 highest
        pic.write(0x20, 1, 0x66); // specific EOI for 6
        pic.pulse_irq(3);
        assert_eq!(pic.acknowledge(), Some(0x33), "IRQ3 outranks IRQ0 after 0xC1");
    }

    #[test]
    fn spurious_slave_interrupt_answers_irq15() {
        let mut pic = linux_init();
        pic.write(0x21, 1, 0x00);
        pic.write(0x4D1, 1, 0x02); // IRQ9 level triggered
        pic.write(0xA1, 1, 0x00);
        pic.set_irq(9, true);
        assert!(pic.pending());
        pic.write(0xA1, 1, 0x02); // the guest masks IRQ9; master IR2 stays latched
        assert!(pic.pending());
        assert_eq!(pic.acknowledge(), Some(0x3F));
        assert_eq!(pic.isr(), 0x0004, "the master has the cascade in service, the slave nothing");
    }

    #[test]
    fn level_triggered_lines_follow_the_level() {
        let mut pic = linux_init();
        pic.write(0x4D0, 1, 0xFF);
        assert_eq!(pic.read(0x4D0, 1), 0xF8, "IRQ0-2 cannot be level triggered");
        pic.write(0x21, 1, 0x00);
        pic.set_irq(5, true);
        assert_eq!(pic.acknowledge(), Some(0x35));
        eoi(&mut pic, 5);
        assert!(pic.pending(), "the level is still asserted");
        pic.set_irq(5, false);
        assert!(!pic.pending());
    }

    #[test]
    fn special_fully_nested_lets_the_slave_nest() {
        let mut pic = PicPair::new();
        for (p, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x11), (0x21, 0x00)] {
            pic.write(p, 1, v);
        }
        for (p, v) in [(0xA0, 0x11), (0xA1, 0x28), (0xA1, 0x02), (0xA1, 0x01), (0xA1, 0x00)] {
            pic.write(p, 1, v);
        }
        pic.pulse_irq(12);
        assert_eq!(pic.acknowledge(), Some(0x2C));
        pic.pulse_irq(9);
        assert_eq!(pic.acknowledge(), Some(0x29), "a higher slave line nests despite IR2 in service");
    }
}
