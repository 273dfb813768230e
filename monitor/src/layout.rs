//! Every fixed guest address and I/O port Popek uses, in one place.
//!
//! Devices, loaders and backends take their numbers from here, so a newcomer
//! can read the whole platform map on one page (as Firecracker's
//! `arch/x86_64/layout.rs`).

/// Default base of the VMM area: the top 8 MiB of the guest linear space
/// (its inner layout is `engine::vmm_area`, the one source of its offsets).
pub const VMM_AREA_BASE: u32 = engine::vmm_area::DEFAULT_BASE;
/// Size of the VMM area (TC, exit gate, vCPU page, lookup table).
pub const VMM_AREA_SIZE: u32 = engine::vmm_area::AREA_SIZE;

/// Guest-physical page size.
pub const PAGE_SIZE: u32 = 4096;

/// Smallest guest RAM Popek accepts.
pub const MIN_GUEST_MEM: u64 = 2 << 20;
/// Largest guest RAM: the 32-bit physical space below the MMIO hole.
pub const MAX_GUEST_MEM: u64 = 0xC000_0000;

/// Legacy PC hole: VGA and BIOS ROM area, never RAM in the e820 map.
pub const LEGACY_HOLE_START: u32 = 0x000A_0000;
pub const LEGACY_HOLE_END: u32 = 0x0010_0000;

// ---- I/O ports -----------------------------------------------------------

/// Master i8259 PIC command/data.
pub const PORT_PIC_MASTER: u16 = 0x20;
/// Slave i8259 PIC command/data.
pub const PORT_PIC_SLAVE: u16 = 0xA0;
/// i8254 PIT channels 0-2 and the mode/command register (0x40-0x43).
pub const PORT_PIT: u16 = 0x40;
/// Ports whose accesses may move a timer deadline: the PIT (0x40-0x43),
/// its channel-2 gate (0x61), the RTC (0x70-0x71), and the PICs (whether
/// IRQ0 is latched decides whether the PIT's deadline counts).
pub const fn port_moves_deadlines(port: u16) -> bool {
    matches!(
        port,
        PORT_PIC_MASTER..=0x21 | PORT_PIC_SLAVE..=0xA1 | PORT_PIT..=0x43 | PORT_SYSTEM_CONTROL_B | PORT_CMOS..=0x71
    )
}
/// Keyboard controller data port (i8042).
pub const PORT_I8042_DATA: u16 = 0x60;
/// NMI status and control / PC speaker gate (PIT channel 2 gate and output).
pub const PORT_SYSTEM_CONTROL_B: u16 = 0x61;
/// Keyboard controller command/status port (i8042).
pub const PORT_I8042_CMD: u16 = 0x64;
/// CMOS RTC index/data (0x70-0x71).
pub const PORT_CMOS: u16 = 0x70;
/// POST diagnostic port; also used by Linux as an I/O delay.
pub const PORT_POST: u16 = 0x80;
/// System control port A: fast A20 and reset.
pub const PORT_SYSTEM_CONTROL_A: u16 = 0x92;
/// isa-debug-exit (as QEMU's `-device isa-debug-exit,iobase=0xf4,iosize=4`).
pub const PORT_DEBUG_EXIT: u16 = 0xF4;
/// COM1 16550 UART (0x3f8-0x3ff).
pub const PORT_COM1: u16 = 0x3F8;
/// PCI configuration address/data (0xcf8, 0xcfc-0xcff).
pub const PORT_PCI_CONFIG_ADDRESS: u16 = 0xCF8;
pub const PORT_PCI_CONFIG_DATA: u16 = 0xCFC;

// ---- IRQ lines -----------------------------------------------------------

/// PIT channel 0.
pub const IRQ_PIT: u8 = 0;
/// COM1.
pub const IRQ_COM1: u8 = 4;
/// CMOS RTC.
pub const IRQ_RTC: u8 = 8;

// ---- Devices (appended by the devices module) -----------------------------

/// ELCR: edge/level control of IRQ0-7 (0x4d0) and IRQ8-15 (0x4d1).
pub const PORT_ELCR: u16 = 0x4D0;
/// PCI reset control register (Linux `reboot=pci`), inside the config window.
pub const PORT_PCI_RESET_CONTROL: u16 = 0xCF9;
/// Bochs/QEMU APM shutdown port: writing the string "Shutdown" powers off.
pub const PORT_BOCHS_SHUTDOWN: u16 = 0x8900;
/// Keyboard (i8042 first port).
pub const IRQ_KEYBOARD: u8 = 1;
/// Cascade from the slave PIC.
pub const IRQ_CASCADE: u8 = 2;
/// Input clock of the i8254 PIT, Hz.
pub const PIT_FREQUENCY_HZ: u64 = 1_193_182;

// ---- Boot-time guest-physical layout (appended by the loaders) ------------
//
// Everything a loader writes below 1 MiB, in address order. The kernel itself
// goes at or above `HIGH_MEMORY_START`; initrds and multiboot modules go above
// the kernel. See docs/loaders.md.

/// Boot GDT written by every loader: null, null, flat code at selector 0x10,
/// flat data at 0x18 (Linux's `__BOOT_CS`/`__BOOT_DS`).
pub const BOOT_GDT_ADDR: u32 = 0x0000_0500;
/// Flat 32-bit code selector in the boot GDT.
pub const BOOT_CODE_SELECTOR: u16 = 0x10;
/// Flat data selector in the boot GDT.
pub const BOOT_DATA_SELECTOR: u16 = 0x18;
/// Bottom of the initial stack page; ESP starts at `BOOT_STACK_TOP`.
pub const BOOT_STACK_BOTTOM: u32 = 0x0000_6000;
/// Initial ESP (the stack grows down from here to `BOOT_STACK_BOTTOM`).
pub const BOOT_STACK_TOP: u32 = 0x0000_7000;
/// Linux `boot_params` ("zero page"), 4 KiB.
pub const ZERO_PAGE_ADDR: u32 = 0x0000_7000;
/// Multiboot information area: the info struct, then the memory map, the
/// module list and all strings, up to `MULTIBOOT_INFO_END`.
pub const MULTIBOOT_INFO_ADDR: u32 = 0x0000_9000;
/// End (exclusive) of the multiboot information area.
pub const MULTIBOOT_INFO_END: u32 = 0x0002_0000;
/// Linux kernel command line.
pub const CMDLINE_ADDR: u32 = 0x0002_0000;
/// Room for the Linux command line, terminating NUL included.
pub const CMDLINE_MAX_SIZE: u32 = 0x0001_0000;
/// Start of the EBDA-style reserved range below the legacy hole (e820 type 2).
pub const EBDA_START: u32 = 0x0009_FC00;
/// BIOS ROM range reported reserved in the e820 map.
pub const BIOS_ROM_START: u32 = 0x000F_0000;
/// First byte of memory above the legacy hole ("high memory", 1 MiB).
pub const HIGH_MEMORY_START: u32 = 0x0010_0000;

// ---- The APIC machine (`--machine pc`, devices/apic.rs, ioapic.rs) --------

/// Local APIC registers (xAPIC MMIO, IA32_APIC_BASE's fixed base).
pub const LAPIC_BASE: u64 = 0xFEE0_0000;
pub const LAPIC_SIZE: u64 = 0x1000;
/// I/O APIC index/data window.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
pub const IOAPIC_SIZE: u64 = 0x20;
/// MP floating pointer and configuration table: the EBDA range Linux scans
/// (639 KiB), reserved in the e820 map.
pub const MPTABLE_ADDR: u64 = EBDA_START as u64;
pub const MPTABLE_END: u64 = LEGACY_HOLE_START as u64;

// ---- PCI devices of the `pc` machine (devices/pci.rs, virtio/) ------------

/// I/O space for PCI BARs: device slot n (from 1) gets `PCI_IO_BASE + (n - 1)
/// * 0x100`.
pub const PCI_IO_BASE: u16 = 0xC000;
/// I/O APIC pin of slot 1's INTA#; slot n uses `PCI_FIRST_IOAPIC_PIN + n - 1`
/// (announced in the MP table), up to pin 23.
pub const PCI_FIRST_IOAPIC_PIN: u8 = 16;
