//! Guest devices: state machines on a port bus and an MMIO bus.
