//! Guest devices: state machines on a port bus and an MMIO bus.
//!
//! Every device is plain data driven by port accesses and by an explicit
//! clock: no threads, no sleeping, no exiting. [`Platform`] puts them on
//! their `layout.rs` ports, wires their interrupt lines into the PIC and
//! collects their requests as [`PlatformEvent`]s. See docs/devices.md.

pub mod apic;
pub mod bus;
pub mod clock;
pub mod cmos;
pub mod ioapic;
pub mod misc;
pub mod mptable;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod platform;
pub mod serial;
pub mod virtio;

pub use bus::{BusError, DeviceId, DeviceStats, MmioBus, MmioDevice, PortBus, PortDevice};
pub use clock::{Clock, HostClock, HostWallClock, ManualClock, WallClock};
pub use misc::{EventSink, PlatformEvent};
pub use platform::{Platform, PlatformConfig, PlatformError, PlatformStats};
