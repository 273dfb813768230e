//! The PC platform every backend runs: the devices on their `layout.rs`
//! ports, their interrupt lines wired into the PIC pair, the timers, and the
//! event queue. No CPU assumptions: a backend turns port exits into
//! [`Platform::io_in`]/[`Platform::io_out`], asks [`Platform::pending_interrupt`]
//! when the guest can take an interrupt, delivers the vector from
//! [`Platform::acknowledge_interrupt`], calls [`Platform::poll_timers`] on every
//! exit and before sleeping until [`Platform::next_deadline_ns`], and drains
//! [`Platform::take_events`].

use std::io::Write;
use std::sync::{Arc, Mutex};

use thiserror::Error;

use super::apic::{ApicStats, LocalApic, DM_EXTINT};
use super::bus::{lock, AccessCounts, BusError, DeviceId, DeviceStats, MmioBus, PortBus, SharedMmioDevice};
use super::clock::{Clock, HostClock, HostWallClock, WallClock};
use super::cmos::Cmos;
use super::ioapic::IoApic;
use super::misc::{BochsShutdown, DebugExit, EventSink, PciConfig, PlatformEvent, PostPort, SystemControlA, I8042};
use super::mptable::PciIrq;
use super::pci::{host_bridge, PciBus};
use super::pic::PicPair;
use super::pit::Pit;
use super::serial::{Serial, SerialStats};
use super::virtio::pci::{config_header, VirtioPci, BAR_SIZE};
use super::virtio::{DeviceMemory, VirtioDevice};
use crate::layout::{IOAPIC_BASE, IOAPIC_SIZE, LAPIC_BASE, LAPIC_SIZE, PCI_FIRST_IOAPIC_PIN, PCI_IO_BASE};
use crate::layout::{
    IRQ_COM1, IRQ_KEYBOARD, IRQ_PIT, IRQ_RTC, PORT_BOCHS_SHUTDOWN, PORT_CMOS, PORT_COM1, PORT_DEBUG_EXIT, PORT_ELCR,
    PORT_I8042_CMD, PORT_I8042_DATA, PORT_PCI_CONFIG_ADDRESS, PORT_PIC_MASTER, PORT_PIC_SLAVE, PORT_PIT, PORT_POST,
    PORT_SYSTEM_CONTROL_A, PORT_SYSTEM_CONTROL_B,
};

/// Which PC the platform is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Machine {
    /// The ISA PC Popek had first: 8259 pair, PIT, RTC, UART, no APIC, no
    /// PCI devices (0xcf8 answers nothing). What traces recorded without a
    /// `--machine` option ran on.
    Isa,
    /// The ISA devices plus a local APIC, an I/O APIC (announced by an MP
    /// table) and a PCI host bridge; CPUID shows the APIC and the TSC
    /// frequency (leaves 0x15/0x16).
    #[default]
    Pc,
}

impl Machine {
    pub fn name(self) -> &'static str {
        match self {
            Machine::Isa => "isa",
            Machine::Pc => "pc",
        }
    }
}

impl std::str::FromStr for Machine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "isa" => Ok(Machine::Isa),
            "pc" => Ok(Machine::Pc),
            o => Err(format!("unknown machine {o:?} (pc or isa)")),
        }
    }
}

#[derive(Debug, Error)]
pub enum PlatformError {
    #[error("cannot place a platform device: {0}")]
    Bus(#[from] BusError),
    #[error("{0} needs the pc machine (PCI and an I/O APIC)")]
    NeedsPc(&'static str),
    #[error("no PCI slot left for {0} (at most {MAX_PCI_DEVICES} devices)")]
    NoSlot(&'static str),
}

/// What a platform is built from.
pub struct PlatformConfig {
    /// Guest RAM in bytes (for the CMOS memory-size bytes).
    pub ram_size: u64,
    /// Where COM1's output goes; flushed after every byte.
    pub console: Box<dyn Write + Send>,
    /// Drives the PIT and the RTC.
    pub clock: Arc<dyn Clock>,
    /// Read once, to set the RTC.
    pub wall_clock: Arc<dyn WallClock>,
}

impl PlatformConfig {
    /// A platform on the host's clocks.
    pub fn new(ram_size: u64, console: Box<dyn Write + Send>) -> Self {
        Self { ram_size, console, clock: Arc::new(HostClock::new()), wall_clock: Arc::new(HostWallClock) }
    }
}

/// Counters for `popek` stats output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformStats {
    /// Accesses per registered port range, by base port.
    pub ports: Vec<DeviceStats>,
    pub unclaimed_ports: AccessCounts,
    pub mmio: Vec<DeviceStats>,
    pub unclaimed_mmio: AccessCounts,
    pub serial: SerialStats,
    /// Rising edges of PIT channel 0 seen by `poll_timers`.
    pub pit_irq0_edges: u64,
    /// Vectors handed out by `acknowledge_interrupt`.
    pub interrupts_acknowledged: u64,
    /// The local APIC's counters (the `pc` machine).
    pub apic: Option<ApicStats>,
    /// Messages the I/O APIC sent.
    pub ioapic_messages: u64,
}

/// Devices on PCI bus 0 besides the host bridge (I/O APIC pins 16-23).
pub const MAX_PCI_DEVICES: usize = 8;

/// A virtio device on the PCI bus.
struct VirtioSlot {
    id: DeviceId,
    dev: Arc<Mutex<VirtioPci>>,
    irq: PciIrq,
}

/// The interrupt controllers of the `pc` machine.
struct Apics {
    lapic: Arc<Mutex<LocalApic>>,
    ioapic: Arc<Mutex<IoApic>>,
    lapic_id: DeviceId,
    ioapic_id: DeviceId,
}

/// Bus registrations whose accesses can move an interrupt line.
struct IrqSources {
    serial: DeviceId,
    cmos: DeviceId,
    i8042: DeviceId,
}

pub struct Platform {
    ports: PortBus,
    mmio: MmioBus,
    clock: Arc<dyn Clock>,
    events: EventSink,
    pic: Arc<Mutex<PicPair>>,
    pit: Arc<Mutex<Pit>>,
    serial: Arc<Mutex<Serial>>,
    cmos: Arc<Mutex<Cmos>>,
    i8042: Arc<Mutex<I8042>>,
    port92: Arc<Mutex<SystemControlA>>,
    irq_sources: IrqSources,
    apics: Option<Apics>,
    pci: Option<Arc<Mutex<PciBus>>>,
    virtio: Vec<VirtioSlot>,
    pit_irq0_edges: u64,
    interrupts_acknowledged: u64,
}

impl Platform {
    /// The `isa` machine.
    pub fn new(config: PlatformConfig) -> Result<Self, PlatformError> {
        Self::with_machine(config, Machine::Isa, 1, 1)
    }

    /// The `machine`; the local APIC timer (`pc`) counts at `apic_timer_hz`
    /// before its divider (what CPUID leaf 0x15 announces), and the guest
    /// TSC runs at `tsc_hz` against the platform clock (its TSC-deadline
    /// mode).
    pub fn with_machine(
        config: PlatformConfig,
        machine: Machine,
        apic_timer_hz: u64,
        tsc_hz: u64,
    ) -> Result<Self, PlatformError> {
        let PlatformConfig { ram_size, console, clock, wall_clock } = config;
        let events = EventSink::new();
        let pic = Arc::new(Mutex::new(PicPair::new()));
        let pit = Arc::new(Mutex::new(Pit::new(clock.clone())));
        let serial = Arc::new(Mutex::new(Serial::new(PORT_COM1, console)));
        let cmos = Arc::new(Mutex::new(Cmos::new(ram_size, clock.clone(), wall_clock.as_ref())));
        let i8042 = Arc::new(Mutex::new(I8042::new(events.clone())));
        let port92 = Arc::new(Mutex::new(SystemControlA::new(events.clone())));

        let mut ports = PortBus::new();
        ports.register("pic-master", PORT_PIC_MASTER, 2, pic.clone())?;
        ports.register("pic-slave", PORT_PIC_SLAVE, 2, pic.clone())?;
        ports.register("elcr", PORT_ELCR, 2, pic.clone())?;
        ports.register("pit", PORT_PIT, 4, pit.clone())?;
        ports.register("system-control-b", PORT_SYSTEM_CONTROL_B, 1, pit.clone())?;
        let i8042_data = ports.register("i8042-data", PORT_I8042_DATA, 1, i8042.clone())?;
        ports.register("i8042-cmd", PORT_I8042_CMD, 1, i8042.clone())?;
        let cmos_id = ports.register("cmos", PORT_CMOS, 2, cmos.clone())?;
        ports.register("post", PORT_POST, 1, Arc::new(Mutex::new(PostPort::default())))?;
        ports.register("system-control-a", PORT_SYSTEM_CONTROL_A, 1, port92.clone())?;
        ports.register("debug-exit", PORT_DEBUG_EXIT, 4, Arc::new(Mutex::new(DebugExit::new(events.clone()))))?;
        let serial_id = ports.register("com1", PORT_COM1, 8, serial.clone())?;
        let pci_bus = (machine == Machine::Pc).then(|| {
            let mut bus = PciBus::new(events.clone());
            bus.add(0, Box::new(host_bridge()));
            Arc::new(Mutex::new(bus))
        });
        let pci: super::bus::SharedPortDevice = match &pci_bus {
            None => Arc::new(Mutex::new(PciConfig::new(events.clone()))),
            Some(bus) => bus.clone(),
        };
        ports.register("pci-config", PORT_PCI_CONFIG_ADDRESS, 8, pci)?;
        let mut mmio = MmioBus::new();
        let apics = match machine {
            Machine::Isa => None,
            Machine::Pc => {
                let lapic = Arc::new(Mutex::new(LocalApic::new(clock.clone(), apic_timer_hz).with_tsc_hz(tsc_hz)));
                let ioapic = Arc::new(Mutex::new(IoApic::new()));
                let lapic_id = mmio.register("lapic", LAPIC_BASE, LAPIC_SIZE, lapic.clone())?;
                let ioapic_id = mmio.register("ioapic", IOAPIC_BASE, IOAPIC_SIZE, ioapic.clone())?;
                Some(Apics { lapic, ioapic, lapic_id, ioapic_id })
            }
        };
        ports.register(
            "bochs-shutdown",
            PORT_BOCHS_SHUTDOWN,
            1,
            Arc::new(Mutex::new(BochsShutdown::new(events.clone()))),
        )?;

        Ok(Self {
            ports,
            mmio,
            clock,
            events,
            pic,
            pit,
            serial,
            cmos,
            i8042,
            port92,
            irq_sources: IrqSources { serial: serial_id, cmos: cmos_id, i8042: i8042_data },
            apics,
            pci: pci_bus,
            virtio: Vec::new(),
            pit_irq0_edges: 0,
            interrupts_acknowledged: 0,
        })
    }

    /// A guest `IN` of `size` bytes (1, 2 or 4) from `port`.
    pub fn io_in(&mut self, port: u16, size: u8) -> u32 {
        let (value, id) = self.ports.read(port, size);
        self.after_access(id);
        value
    }

    /// A guest `OUT` of `size` bytes (1, 2 or 4) to `port`.
    pub fn io_out(&mut self, port: u16, size: u8, value: u32) {
        let id = self.ports.write(port, size, value);
        self.after_access(id);
    }

    /// What the run loop acts on (see [`crate::backend::Ports`]).
    pub fn loop_state(&mut self) -> crate::backend::LoopState {
        crate::backend::LoopState {
            interrupt_pending: self.pending_interrupt(),
            next_deadline_ns: self.next_deadline_ns(),
            events: self.events.any(),
        }
    }

    /// A guest read of MMIO at `addr`.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        let id = self.mmio.read(addr, data);
        self.after_mmio(id);
    }

    /// A guest write of MMIO at `addr`.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        let id = self.mmio.write(addr, data);
        self.after_mmio(id);
    }

    /// Puts a virtio device on the next PCI slot (the `pc` machine): its
    /// registers at a VMM-assigned I/O BAR, INTA# on the next I/O APIC pin.
    /// Returns the routing for the MP table.
    pub fn add_virtio(
        &mut self,
        dev: Box<dyn VirtioDevice>,
        mem: &Arc<crate::memory::GuestMemory>,
    ) -> Result<PciIrq, PlatformError> {
        let name = dev.name();
        let Some(bus) = &self.pci else { return Err(PlatformError::NeedsPc(name)) };
        if self.virtio.len() >= MAX_PCI_DEVICES {
            return Err(PlatformError::NoSlot(name));
        }
        let n = self.virtio.len() as u8;
        let slot = 1 + n;
        let io_base = PCI_IO_BASE + u16::from(n) * BAR_SIZE;
        let pin = PCI_FIRST_IOAPIC_PIN + n;
        let device_type = dev.device_type();
        let dev = Arc::new(Mutex::new(VirtioPci::new(dev, DeviceMemory::new(mem), io_base)));
        let id = self.ports.register(name, io_base, BAR_SIZE, dev.clone())?;
        lock(bus).add(slot, Box::new(config_header(device_type, io_base, pin)));
        let irq = PciIrq { device: slot, pin: 0, ioapic_pin: pin };
        self.virtio.push(VirtioSlot { id, dev, irq });
        Ok(irq)
    }

    /// The PCI interrupt routing (for the MP table).
    pub fn pci_irqs(&self) -> Vec<PciIrq> {
        self.virtio.iter().map(|v| v.irq).collect()
    }

    /// Counters of the virtio devices: `(device name/counter, value)`.
    pub fn virtio_stats(&self) -> Vec<(String, u64)> {
        let mut v = Vec::new();
        for (i, s) in self.virtio.iter().enumerate() {
            let d = lock(&s.dev);
            for (k, n) in d.stats() {
                v.push((format!("{}{i}/{k}", d.name()), n));
            }
        }
        v
    }

    /// Which machine this is.
    pub fn machine(&self) -> Machine {
        if self.apics.is_some() {
            Machine::Pc
        } else {
            Machine::Isa
        }
    }

    /// After an access to an interrupt controller: EOIs to the I/O APIC,
    /// its messages to the local APIC.
    fn after_mmio(&mut self, id: Option<DeviceId>) {
        if let (Some(id), Some(a)) = (id, &self.apics) {
            if id == a.lapic_id || id == a.ioapic_id {
                self.route_apic_messages();
            }
        }
    }

    fn route_apic_messages(&mut self) {
        let Some(a) = &self.apics else { return };
        let mut lapic = lock(&a.lapic);
        let mut ioapic = lock(&a.ioapic);
        loop {
            for v in lapic.take_eois() {
                ioapic.eoi(v);
            }
            let messages = ioapic.take_messages();
            if messages.is_empty() {
                break;
            }
            for m in messages {
                if m.mode == DM_EXTINT {
                    // An I/O APIC pin in ExtINT mode passes the 8259's INTR:
                    // the 8259 path below serves it when LINT0 is open.
                    continue;
                }
                lapic.accept(m);
            }
        }
    }

    /// ISA line `line` at `level`: into the 8259 pair and (the `pc`
    /// machine) I/O APIC pin `line`, as the MP table says.
    fn set_line(&mut self, line: u8, level: bool) {
        lock(&self.pic).set_irq(line, level);
        if let Some(a) = &self.apics {
            lock(&a.ioapic).set_pin(usize::from(line), level);
            self.route_apic_messages();
        }
    }

    /// Adds an MMIO device (local APIC, test devices).
    pub fn register_mmio(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: SharedMmioDevice,
    ) -> Result<DeviceId, PlatformError> {
        Ok(self.mmio.register(name, base, len, device)?)
    }

    /// Is an interrupt waiting for the CPU (the PIC's INT output)?
    pub fn pending_interrupt(&mut self) -> bool {
        match &self.apics {
            None => lock(&self.pic).pending(),
            Some(a) => {
                let lapic = lock(&a.lapic);
                lapic.pending().is_some() || (lapic.extint_open() && lock(&self.pic).pending())
            }
        }
    }

    /// The INTA cycle: the vector to deliver now, or `None` if nothing is
    /// pending any more. Call only when the guest can take it (IF=1, no
    /// interrupt shadow): the PIC marks it in service.
    pub fn acknowledge_interrupt(&mut self) -> Option<u8> {
        let v = match &self.apics {
            None => lock(&self.pic).acknowledge(),
            // The APIC's fixed interrupts first, then the 8259 through LINT0
            // (QEMU's order).
            Some(a) => {
                let mut lapic = lock(&a.lapic);
                match lapic.acknowledge() {
                    Some(v) => Some(v),
                    None if lapic.extint_open() => lock(&self.pic).acknowledge(),
                    None => None,
                }
            }
        };
        self.interrupts_acknowledged += u64::from(v.is_some());
        v
    }

    /// Raises the interrupts that timers owe up to `now_ns` (IRQ0 from PIT
    /// channel 0, IRQ8 from the RTC).
    pub fn poll_timers(&mut self, now_ns: u64) {
        let edges = lock(&self.pit).poll(now_ns);
        let rtc = lock(&self.cmos).poll(now_ns);
        if edges > 0 {
            self.pit_irq0_edges += edges;
            self.set_line(IRQ_PIT, true);
            self.set_line(IRQ_PIT, false);
        }
        self.set_line(IRQ_RTC, rtc);
        if let Some(a) = &self.apics {
            lock(&a.lapic).poll(now_ns);
        }
    }

    /// RDMSR of an MSR the machine holds: IA32_TSC_DEADLINE, the local
    /// APIC's. The timers are polled first, so a deadline that has passed
    /// reads 0. Anything else (the CPU policy sends nothing else) reads 0.
    pub fn msr_read(&mut self, index: u32) -> u64 {
        match (&self.apics, index) {
            (Some(_), crate::cpu::policy::msr::TSC_DEADLINE) => {
                self.poll_timers(self.clock.now_ns());
                self.apics.as_ref().map_or(0, |a| lock(&a.lapic).tsc_deadline())
            }
            _ => {
                crate::guest_warn!(index = format_args!("{index:#x}"), "RDMSR of an MSR the machine does not hold");
                0
            }
        }
    }

    /// WRMSR of `value` to an MSR the machine holds, when the guest TSC read
    /// `tsc`: IA32_TSC_DEADLINE arms (or disarms) the local APIC timer.
    pub fn msr_write(&mut self, index: u32, value: u64, tsc: u64) {
        match (&self.apics, index) {
            (Some(a), crate::cpu::policy::msr::TSC_DEADLINE) => lock(&a.lapic).set_tsc_deadline(value, tsc),
            _ => crate::guest_warn!(index = format_args!("{index:#x}"), "WRMSR of an MSR the machine does not hold"),
        }
    }

    /// The earliest time at which `poll_timers` will have something to do,
    /// on the platform clock; `None` if no timer is armed.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let pit = lock(&self.pit).next_irq_deadline_ns().filter(|_| !self.irq0_edge_is_moot());
        let rtc = lock(&self.cmos).next_deadline_ns();
        let lapic = self.apics.as_ref().and_then(|a| lock(&a.lapic).next_deadline_ns());
        pit.into_iter().chain(rtc).chain(lapic).min()
    }

    /// Whether another IRQ0 edge would change nothing: the PIC has one
    /// latched in its IRR already (or takes IRQ0 level-triggered, where a
    /// pulse leaves nothing) and the I/O APIC (if any) drops edges of its
    /// pin. Then the PIT's deadline needs no kick: a guest that set the
    /// PIT to its fastest rate with IRQ0 masked everywhere used to take a
    /// kick per period (316 k in 8 s of the guest-storm fuzzer) for no
    /// interrupt. The deadline comes back when the IRR bit is acknowledged
    /// or the pin unmasked (PIC ports move deadlines; MMIO exits and
    /// acknowledgements go through the loop, which asks again).
    fn irq0_edge_is_moot(&self) -> bool {
        lock(&self.pic).pulse_is_moot(IRQ_PIT)
            && self.apics.as_ref().is_none_or(|a| lock(&a.ioapic).masked(usize::from(IRQ_PIT)))
    }

    /// The platform clock's current time (the base of deadlines).
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Host console input for COM1.
    pub fn push_console_input(&mut self, data: &[u8]) {
        let level = {
            let mut s = lock(&self.serial);
            s.push_input(data);
            s.irq_level()
        };
        self.set_line(IRQ_COM1, level);
    }

    /// Reset, debug-exit and power-off requests since the last call.
    pub fn take_events(&mut self) -> Vec<PlatformEvent> {
        self.events.take()
    }

    /// Is the A20 gate open (port 0x92 bit 1 and the i8042 output port)?
    pub fn a20_enabled(&self) -> bool {
        lock(&self.port92).a20() && lock(&self.i8042).a20()
    }

    pub fn stats(&self) -> PlatformStats {
        PlatformStats {
            ports: self.ports.stats(),
            unclaimed_ports: self.ports.unclaimed(),
            mmio: self.mmio.stats(),
            unclaimed_mmio: self.mmio.unclaimed(),
            serial: lock(&self.serial).stats(),
            pit_irq0_edges: self.pit_irq0_edges,
            interrupts_acknowledged: self.interrupts_acknowledged,
            apic: self.apics.as_ref().map(|a| lock(&a.lapic).stats()),
            ioapic_messages: self.apics.as_ref().map_or(0, |a| lock(&a.ioapic).sent),
        }
    }

    /// The i8042 as traces recorded before device-model revision 1 saw it.
    pub fn use_legacy_keyboard_irq(&mut self) {
        lock(&self.i8042).use_legacy_irq();
    }

    /// Propagates the interrupt line of the device just accessed.
    fn after_access(&mut self, id: Option<DeviceId>) {
        let Some(id) = id else { return };
        if let Some(i) = self.virtio.iter().position(|v| v.id == id) {
            let level = lock(&self.virtio[i].dev).irq_level();
            let pin = self.virtio[i].irq.ioapic_pin;
            if let Some(a) = &self.apics {
                lock(&a.ioapic).set_pin(usize::from(pin), level);
                self.route_apic_messages();
            }
            return;
        }
        let src = &self.irq_sources;
        let (line, level) = if id == src.serial {
            (IRQ_COM1, lock(&self.serial).irq_level())
        } else if id == src.cmos {
            (IRQ_RTC, lock(&self.cmos).irq_level())
        } else if id == src.i8042 {
            let mut kbc = lock(&self.i8042);
            if kbc.take_new_byte() {
                // The next byte of an answer: a new edge on IRQ1.
                drop(kbc);
                self.set_line(IRQ_KEYBOARD, false);
                kbc = lock(&self.i8042);
            }
            (IRQ_KEYBOARD, kbc.irq1_level())
        } else {
            return;
        };
        self.set_line(line, level);
    }
}

impl crate::backend::Ports for Platform {
    fn io_in(&mut self, port: u16, size: u8) -> u32 {
        Platform::io_in(self, port, size)
    }
    fn io_out(&mut self, port: u16, size: u8, value: u32) {
        Platform::io_out(self, port, size, value)
    }
    fn loop_state(&mut self) -> crate::backend::LoopState {
        Platform::loop_state(self)
    }
    fn port_moves_deadlines(&self, port: u16) -> bool {
        // The PIT and its gate, the RTC, the PICs (IRQ0's latch); the local
        // APIC's timer is MMIO.
        crate::layout::port_moves_deadlines(port)
    }
    fn quiet_read(&mut self, port: u16) -> Option<u8> {
        self.pic.lock().expect("pic").quiet_read(port)
    }
    fn loop_state_without_deadlines(&mut self) -> crate::backend::LoopState {
        crate::backend::LoopState {
            interrupt_pending: self.pending_interrupt(),
            next_deadline_ns: None,
            events: self.events.any(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::clock::ManualClock;
    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn platform() -> (Platform, ManualClock, Capture) {
        let clock = ManualClock::new(1_000_000_000);
        let wall = ManualClock::new(1_700_000_000_000_000_000);
        let cap = Capture::default();
        let cfg = PlatformConfig {
            ram_size: 256 << 20,
            console: Box::new(cap.clone()),
            clock: Arc::new(clock.clone()),
            wall_clock: Arc::new(wall),
        };
        (Platform::new(cfg).unwrap(), clock, cap)
    }

    /// Linux's init_8259A, then unmask `mask_master`/`mask_slave`.
    fn init_pic(p: &mut Platform, imr_master: u8, imr_slave: u8) {
        for (port, v) in [(0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01)] {
            p.io_out(port, 1, v);
        }
        for (port, v) in [(0xA0, 0x11), (0xA1, 0x38), (0xA1, 0x02), (0xA1, 0x01)] {
            p.io_out(port, 1, v);
        }
        p.io_out(0x21, 1, u32::from(imr_master));
        p.io_out(0xA1, 1, u32::from(imr_slave));
    }

    #[test]
    fn timer_interrupt_end_to_end() {
        let (mut p, clock, _) = platform();
        init_pic(&mut p, 0xFE, 0xFF);
        assert_eq!(p.next_deadline_ns(), None);
        p.io_out(0x43, 1, 0x34);
        p.io_out(0x40, 1, 0x9B); // 11931 = 100 Hz
        p.io_out(0x40, 1, 0x2E);
        let deadline = p.next_deadline_ns().unwrap();
        assert!((deadline - clock.now_ns()).abs_diff(10_000_000) < 1_000);
        p.poll_timers(clock.now_ns());
        assert!(!p.pending_interrupt());
        let mut vectors = Vec::new();
        for _ in 0..10 {
            let d = p.next_deadline_ns().unwrap();
            clock.set(d);
            p.poll_timers(d);
            assert!(p.pending_interrupt());
            vectors.push(p.acknowledge_interrupt().unwrap());
            assert!(!p.pending_interrupt(), "in service until EOI");
            p.io_out(0x20, 1, 0x20);
        }
        assert_eq!(vectors, vec![0x30; 10]);
        assert_eq!(p.stats().pit_irq0_edges, 10);
        assert_eq!(p.stats().interrupts_acknowledged, 10);
    }

    /// In-place port I/O skips the timers for ports that cannot move them:
    /// every access that does move one must be a port that says so.
    #[test]
    fn only_timer_ports_move_deadlines() {
        use crate::backend::Ports;
        let (mut p, _, _) = platform();
        init_pic(&mut p, 0xFE, 0xFF);
        let accesses: [(u16, u32); 9] = [
            (0x43, 0x34),
            (0x40, 0x9B),
            (0x40, 0x2E),
            (0x21, 0xFC),
            (0x20, 0x20),
            (0x3F8, 0x41),
            (0x61, 0x01),
            (0x70, 0x0B),
            (0x71, 0x42),
        ];
        for (port, value) in accesses {
            let before = p.next_deadline_ns();
            p.io_out(port, 1, value);
            if p.next_deadline_ns() != before {
                assert!(p.port_moves_deadlines(port), "port {port:#x} moved a deadline");
            }
            let (full, cheap) = (Ports::loop_state(&mut p), p.loop_state_without_deadlines());
            assert_eq!((full.interrupt_pending, full.events), (cheap.interrupt_pending, cheap.events));
        }
        assert!(!p.port_moves_deadlines(0x3F8) && !p.port_moves_deadlines(0x60));
    }

    #[test]
    fn console_output_and_interrupts() {
        let (mut p, _, cap) = platform();
        init_pic(&mut p, 0xEF, 0xFF); // IRQ4 only
        for &b in b"ok\n" {
            p.io_out(0x3F8, 1, u32::from(b));
        }
        assert_eq!(&*cap.0.lock().unwrap(), b"ok\n");
        p.io_out(0x3FC, 1, 0x0B);
        p.io_out(0x3F9, 1, 0x01); // RX interrupts
        assert!(!p.pending_interrupt());
        p.push_console_input(b"x");
        assert!(p.pending_interrupt());
        assert_eq!(p.acknowledge_interrupt(), Some(0x34));
        assert_eq!(p.io_in(0x3FA, 1), 0x04);
        assert_eq!(p.io_in(0x3F8, 1), u32::from(b'x'));
        p.io_out(0x20, 1, 0x64);
        // THRE interrupt on enabling THRI: a new edge on IRQ4.
        p.io_out(0x3F9, 1, 0x03);
        assert_eq!(p.acknowledge_interrupt(), Some(0x34));
        let stats = p.stats();
        assert_eq!(stats.serial.tx_bytes, 3);
        let com1 = stats.ports.iter().find(|d| d.name == "com1").unwrap();
        assert_eq!(com1.counts, AccessCounts { reads: 2, writes: 6 });
    }

    #[test]
    fn rtc_update_interrupt_through_the_slave() {
        let (mut p, clock, _) = platform();
        init_pic(&mut p, 0xFB, 0xFE); // cascade and IRQ8
        p.io_out(0x70, 1, 0x0B);
        p.io_out(0x71, 1, 0x12); // UIE, 24h, BCD
        let d = p.next_deadline_ns().unwrap();
        assert!(d - clock.now_ns() <= 1_000_000_000);
        clock.set(d);
        p.poll_timers(d);
        assert_eq!(p.acknowledge_interrupt(), Some(0x38));
        p.io_out(0x70, 1, 0x0C);
        assert_eq!(p.io_in(0x71, 1) & 0x90, 0x90, "IRQF and UF");
        p.io_out(0xA0, 1, 0x20);
        p.io_out(0x20, 1, 0x20);
        assert!(!p.pending_interrupt());
    }

    #[test]
    fn events_and_unclaimed_ports() {
        let (mut p, _, _) = platform();
        assert_eq!(p.io_in(0x3E8, 1), 0xFF, "no COM3");
        assert_eq!(p.io_in(0x1234, 2), 0xFFFF);
        assert_eq!(p.io_in(0xCFC, 4), 0xFFFF_FFFF, "no PCI device");
        p.io_out(0x80, 1, 0x42);
        p.io_out(0xF4, 1, 0x01);
        p.io_out(0x64, 1, 0xFE);
        assert_eq!(p.take_events(), vec![PlatformEvent::DebugExit(3), PlatformEvent::Reset]);
        assert!(p.take_events().is_empty());
        assert_eq!(p.stats().unclaimed_ports, AccessCounts { reads: 2, writes: 0 });
        assert!(p.a20_enabled());
        p.io_out(0x92, 1, 0x00);
        assert!(!p.a20_enabled());
    }

    #[test]
    fn cmos_reports_memory_and_time() {
        let (mut p, _, _) = platform();
        p.io_out(0x70, 1, 0x34);
        let lo = p.io_in(0x71, 1);
        p.io_out(0x70, 1, 0x35);
        let hi = p.io_in(0x71, 1);
        assert_eq!(lo | hi << 8, (240 << 20) >> 16);
        // 2023-11-14 22:13:20 UTC.
        p.io_out(0x70, 1, 0x09);
        assert_eq!(p.io_in(0x71, 1), 0x23);
        p.io_out(0x70, 1, 0x04);
        assert_eq!(p.io_in(0x71, 1), 0x22);
    }

    fn pc_platform() -> (Platform, ManualClock) {
        let clock = ManualClock::new(1_000_000_000);
        let cfg = PlatformConfig {
            ram_size: 256 << 20,
            console: Box::new(Capture::default()),
            clock: Arc::new(clock.clone()),
            wall_clock: Arc::new(ManualClock::new(0)),
        };
        (Platform::with_machine(cfg, Machine::Pc, 1_000_000_000, 1_000_000_000).unwrap(), clock)
    }

    fn mmio_write32(p: &mut Platform, addr: u64, v: u32) {
        p.mmio_write(addr, &v.to_le_bytes());
    }

    fn mmio_read32(p: &mut Platform, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        p.mmio_read(addr, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn pc_machine_passes_the_8259_through_lint0_until_the_guest_masks_it() {
        let (mut p, clock) = pc_platform();
        assert_eq!(p.machine(), Machine::Pc);
        init_pic(&mut p, 0xFE, 0xFF);
        p.io_out(0x43, 1, 0x34);
        p.io_out(0x40, 1, 0x9B);
        p.io_out(0x40, 1, 0x2E);
        let d = p.next_deadline_ns().unwrap();
        clock.set(d);
        p.poll_timers(d);
        assert_eq!(p.acknowledge_interrupt(), Some(0x30), "virtual wire: the APIC is untouched");
        p.io_out(0x20, 1, 0x20);
        // Linux's APIC mode: LINT0 masked ExtINT.
        mmio_write32(&mut p, LAPIC_BASE + 0xF0, 0x1FF);
        mmio_write32(&mut p, LAPIC_BASE + 0x350, 0x1_0700);
        let d = p.next_deadline_ns().unwrap();
        clock.set(d);
        p.poll_timers(d);
        assert!(!p.pending_interrupt(), "the 8259's INTR no longer reaches the CPU");
    }

    #[test]
    fn pc_machine_routes_isa_lines_through_the_io_apic() {
        let (mut p, clock) = pc_platform();
        mmio_write32(&mut p, LAPIC_BASE + 0xF0, 0x1FF);
        mmio_write32(&mut p, LAPIC_BASE + 0x350, 0x1_0700);
        // I/O APIC pin 0 (IRQ0) → vector 0x30, pin 4 (COM1) → 0x34, physical dest 0.
        for (pin, vector) in [(0u32, 0x30u32), (4, 0x34)] {
            mmio_write32(&mut p, IOAPIC_BASE, 0x10 + 2 * pin);
            mmio_write32(&mut p, IOAPIC_BASE + 0x10, vector);
            mmio_write32(&mut p, IOAPIC_BASE, 0x11 + 2 * pin);
            mmio_write32(&mut p, IOAPIC_BASE + 0x10, 0);
        }
        p.io_out(0x43, 1, 0x34);
        p.io_out(0x40, 1, 0x9B);
        p.io_out(0x40, 1, 0x2E);
        let mut vectors = Vec::new();
        for _ in 0..3 {
            let d = p.next_deadline_ns().unwrap();
            clock.set(d);
            p.poll_timers(d);
            vectors.push(p.acknowledge_interrupt().unwrap());
            assert!(!p.pending_interrupt());
            mmio_write32(&mut p, LAPIC_BASE + 0xB0, 0);
        }
        assert_eq!(vectors, vec![0x30; 3]);
        // Serial RX on pin 4.
        p.io_out(0x3F9, 1, 0x01);
        p.push_console_input(b"k");
        assert_eq!(p.acknowledge_interrupt(), Some(0x34));
        mmio_write32(&mut p, LAPIC_BASE + 0xB0, 0);
        assert_eq!(mmio_read32(&mut p, LAPIC_BASE + 0x130), 0, "ISR empty");
        let stats = p.stats();
        assert!(stats.ioapic_messages >= 4);
        assert_eq!(stats.apic.unwrap().eois, 4);
    }

    /// PIT channel 0 periodic (mode 2) at divisor 2, the fastest rate.
    fn pit_at_full_rate(p: &mut Platform) {
        p.io_out(0x43, 1, 0x34);
        p.io_out(0x40, 1, 0x02);
        p.io_out(0x40, 1, 0x00);
    }

    /// A PIT edge that nothing can take sets no deadline: once IRQ0 is
    /// latched in the PIC's IRR and the I/O APIC masks its pin, the next
    /// edges change nothing until the latch is acknowledged or the pin
    /// unmasked (found by the guest-storm fuzzer: one vCPU kick per PIT
    /// period, 316 k kicks in 8 s, at the fastest rate).
    #[test]
    fn an_irq0_edge_nobody_can_take_sets_no_deadline() {
        // The isa machine: the PIC alone.
        let (mut p, clock, _) = platform();
        init_pic(&mut p, 0xFF, 0xFF);
        p.io_out(0x43, 1, 0x34);
        p.io_out(0x40, 1, 0x02); // divisor 2: the fastest periodic rate
        p.io_out(0x40, 1, 0x00);
        let d = p.next_deadline_ns().expect("the first edge has a deadline");
        clock.set(d);
        p.poll_timers(d);
        assert!(!p.pending_interrupt(), "masked");
        assert_eq!(p.next_deadline_ns(), None, "IRQ0 is latched: further edges are moot");
        clock.set(d + 1_000_000);
        p.io_out(0x21, 1, 0xFE);
        assert!(p.pending_interrupt());
        assert_eq!(p.acknowledge_interrupt(), Some(0x30));
        let again = p.next_deadline_ns().expect("acknowledged: the PIT counts again");
        assert!(again <= clock.now_ns() + 2_000, "{again}");

        // A PIC initialised level-triggered (ICW1.LTIM) keeps nothing of a
        // pulse: every edge is moot, even the first.
        let (mut p, _, _) = platform();
        for (port, v) in [(0x20, 0x19), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01), (0x21, 0x00)] {
            p.io_out(port, 1, v);
        }
        pit_at_full_rate(&mut p);
        assert_eq!(p.next_deadline_ns(), None, "level-triggered IRQ0");

        // The pc machine: moot only while the I/O APIC masks pin 0 too.
        let (mut p, clock) = pc_platform();
        init_pic(&mut p, 0xFF, 0xFF);
        pit_at_full_rate(&mut p);
        let d = p.next_deadline_ns().unwrap();
        clock.set(d);
        p.poll_timers(d);
        assert_eq!(p.next_deadline_ns(), None, "pin 0 starts masked");
        mmio_write32(&mut p, LAPIC_BASE + 0xF0, 0x1FF);
        mmio_write32(&mut p, IOAPIC_BASE, 0x10);
        mmio_write32(&mut p, IOAPIC_BASE + 0x10, 0x30);
        assert!(p.next_deadline_ns().is_some(), "an unmasked pin takes every edge");
    }

    #[test]
    fn pc_machine_apic_timer_sets_the_deadline() {
        let (mut p, clock) = pc_platform();
        mmio_write32(&mut p, LAPIC_BASE + 0xF0, 0x1FF);
        mmio_write32(&mut p, LAPIC_BASE + 0x3E0, 0xB);
        mmio_write32(&mut p, LAPIC_BASE + 0x320, 0xEC);
        mmio_write32(&mut p, LAPIC_BASE + 0x380, 4_000_000);
        let d = p.next_deadline_ns().unwrap();
        assert_eq!(d, clock.now_ns() + 4_000_000);
        clock.set(d);
        p.poll_timers(d);
        assert!(p.pending_interrupt());
        assert_eq!(p.acknowledge_interrupt(), Some(0xEC));
    }

    #[test]
    fn pc_machine_serves_the_tsc_deadline_msr() {
        use crate::cpu::policy::msr::TSC_DEADLINE;
        let (mut p, clock) = pc_platform();
        mmio_write32(&mut p, LAPIC_BASE + 0xF0, 0x1FF);
        // One-shot mode: the MSR write is ignored.
        mmio_write32(&mut p, LAPIC_BASE + 0x320, 0xED);
        p.msr_write(TSC_DEADLINE, 5_000, 1_000);
        assert_eq!(p.msr_read(TSC_DEADLINE), 0);
        assert_eq!(p.next_deadline_ns(), None);
        mmio_write32(&mut p, LAPIC_BASE + 0x320, 0x4_00ED);
        // The guest TSC reads 1_000 now (1 GHz): 4_000 ticks ahead.
        p.msr_write(TSC_DEADLINE, 5_000, 1_000);
        assert_eq!(p.msr_read(TSC_DEADLINE), 5_000);
        let d = p.next_deadline_ns().unwrap();
        assert_eq!(d, clock.now_ns() + 4_000);
        clock.set(d - 1);
        p.poll_timers(d - 1);
        assert!(!p.pending_interrupt());
        clock.set(d);
        assert_eq!(p.msr_read(TSC_DEADLINE), 0, "a read polls: the deadline has passed");
        assert_eq!(p.acknowledge_interrupt(), Some(0xED));
        let mut isa = platform().0;
        isa.msr_write(TSC_DEADLINE, 5_000, 1_000);
        assert_eq!(isa.msr_read(TSC_DEADLINE), 0, "no APIC on isa");
    }

    #[test]
    fn pc_machine_has_a_host_bridge_and_the_isa_machine_none() {
        let (mut pc, _) = pc_platform();
        pc.io_out(0xCF8, 4, 0x8000_0000);
        assert_eq!(pc.io_in(0xCFC, 4), 0x1237_8086);
        let (mut isa, _, _) = platform();
        isa.io_out(0xCF8, 4, 0x8000_0000);
        assert_eq!(isa.io_in(0xCFC, 4), 0xFFFF_FFFF);
        assert_eq!(isa.machine(), Machine::Isa);
        let mut b = [0u8; 4];
        isa.mmio_read(LAPIC_BASE + 0x30, &mut b);
        assert_eq!(b, [0xFF; 4], "no local APIC on the isa machine");
    }

    /// A driver's view of a virtio-blk disk on the pc machine: found by
    /// config mechanism #1, set up through its I/O BAR, a read request
    /// completed with an interrupt through I/O APIC pin 16.
    #[test]
    fn virtio_blk_on_the_pc_machine_end_to_end() {
        use crate::devices::virtio::blk::{Block, DiskSpec};
        let (mut p, _) = pc_platform();
        let mem = Arc::new(crate::memory::GuestMemory::new(4 << 20).unwrap());
        let img = std::env::temp_dir().join(format!("popek-platform-blk-{}.img", std::process::id()));
        std::fs::write(&img, [0x5Au8; 4096]).unwrap();
        let blk = Block::open(&DiskSpec { path: img.clone(), read_only: false }, 0).unwrap();
        let irq = p.add_virtio(Box::new(blk), &mem).unwrap();
        assert_eq!((irq.device, irq.ioapic_pin), (1, 16));
        // PCI: 00:01.0 is a virtio block device with BAR0 = I/O 0xc000.
        p.io_out(0xCF8, 4, 0x8000_0800);
        assert_eq!(p.io_in(0xCFC, 4), 0x1001_1AF4);
        p.io_out(0xCF8, 4, 0x8000_0810);
        let bar = p.io_in(0xCFC, 4);
        assert_eq!(bar, 0xC001);
        let io = (bar & !3) as u16;
        // APIC mode, pin 16 level-triggered → vector 0x51.
        mmio_write32(&mut p, LAPIC_BASE + 0xF0, 0x1FF);
        mmio_write32(&mut p, IOAPIC_BASE, 0x10 + 32);
        mmio_write32(&mut p, IOAPIC_BASE + 0x10, 0xA051);
        // Driver set-up: status, features, queue 0 at 0x10000.
        p.io_out(io + 0x12, 1, 0x03);
        let features = p.io_in(io, 4);
        p.io_out(io + 0x04, 4, features);
        assert_eq!(p.io_in(io + 0x14, 4), 8, "capacity: 8 sectors");
        assert_eq!(p.io_in(io + 0x0C, 2), 128);
        p.io_out(io + 0x08, 4, 0x10);
        p.io_out(io + 0x12, 1, 0x07);
        // One read of sector 1 into 0x30000.
        let (desc, avail, _) = crate::devices::virtio::pci::legacy_ring_addresses(0x1_0000, 128);
        let put_desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut b = addr.to_le_bytes().to_vec();
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
            b.extend_from_slice(&next.to_le_bytes());
            mem.write(desc + 16 * i, &b).unwrap();
        };
        mem.write(0x2_0000, &[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        put_desc(0, 0x2_0000, 16, 1, 1);
        put_desc(1, 0x3_0000, 512, 3, 2);
        put_desc(2, 0x2_0100, 1, 2, 0);
        mem.write(avail + 4, &0u16.to_le_bytes()).unwrap();
        mem.write(avail + 2, &1u16.to_le_bytes()).unwrap();
        assert!(!p.pending_interrupt());
        p.io_out(io + 0x10, 2, 0);
        assert_eq!(p.acknowledge_interrupt(), Some(0x51));
        assert_eq!(mem.slice(0x3_0000, 512).unwrap(), &[0x5A; 512][..]);
        assert_eq!(mem.slice(0x2_0100, 1).unwrap(), &[0]);
        // The handler reads the ISR (INTA# drops), then EOIs: no second message.
        assert_eq!(p.io_in(io + 0x13, 1), 1);
        mmio_write32(&mut p, LAPIC_BASE + 0xB0, 0);
        assert!(!p.pending_interrupt());
        let stats = p.virtio_stats();
        assert!(stats.contains(&("virtio-blk0/reads".to_string(), 1)), "{stats:?}");
        let _ = std::fs::remove_file(img);
        // The isa machine has no PCI slots.
        let (mut isa, _, _) = platform();
        let rng = Box::new(crate::devices::virtio::rng::Rng::default());
        assert!(matches!(isa.add_virtio(rng, &mem), Err(PlatformError::NeedsPc("virtio-rng"))));
    }

    #[test]
    fn keyboard_irq1() {
        let (mut p, _, _) = platform();
        init_pic(&mut p, 0xFD, 0xFF);
        p.io_out(0x60, 1, 0xF4); // enable scanning: ACK
        assert_eq!(p.acknowledge_interrupt(), Some(0x31));
        assert_eq!(p.io_in(0x60, 1), 0xFA);
    }

    /// A multi-byte answer (identify: ACK, 0xAB, 0x83) raises IRQ1 once per
    /// byte, as Linux's interrupt-driven atkbd probe needs: the handler
    /// reads one byte per interrupt and EOIs.
    #[test]
    fn keyboard_identify_raises_irq1_for_every_byte() {
        let (mut p, _, _) = platform();
        init_pic(&mut p, 0xFD, 0xFF);
        p.io_out(0x60, 1, 0xF2);
        for byte in [0xFA, 0xAB, 0x83] {
            assert_eq!(p.acknowledge_interrupt(), Some(0x31), "IRQ1 for {byte:#x}");
            assert_eq!(p.io_in(0x60, 1), byte);
            p.io_out(0x20, 1, 0x20);
        }
        assert!(!p.pending_interrupt(), "nothing left: no fourth interrupt");
    }
}
