//! Popek's built-in guests: small protected-mode kernels assembled at run
//! time with dynasmrt. Each is a flat image loaded at 0x100000 and entered
//! in flat 32-bit protected mode (CPL 0, paging off, IF = 0, as
//! [`Cpu::flat_protected`](crate::cpu::Cpu::flat_protected) or a multiboot
//! loader leaves it); it ignores EAX/EBX and talks to the machine only
//! through I/O ports: COM1, the PIT, the PICs and isa-debug-exit (0xf4).
//! See docs/guests.md.

#[macro_use]
pub(crate) mod kernel;
pub mod demo;
pub mod nano;

use crate::cpu::Cpu;

pub use kernel::{LOAD_ADDR, RUNTIME_END};

/// A built-in guest image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guest {
    pub name: &'static str,
    /// The bytes to copy to guest-physical `load_addr`.
    pub image: Vec<u8>,
    pub load_addr: u32,
    pub entry: u32,
    pub description: &'static str,
}

impl Guest {
    /// Guest RAM the guest needs: its image and everything it zeroes and
    /// uses at run time (page tables, stacks, frames).
    pub fn memory_needed(&self) -> u64 {
        u64::from(RUNTIME_END)
    }

    /// The entry state: flat protected mode with the guest's own kernel
    /// selectors, EIP at the entry.
    pub fn entry_cpu(&self) -> Cpu {
        let mut cpu = Cpu::flat_protected(kernel::KERNEL_CS, kernel::KERNEL_DS);
        cpu.eip = self.entry;
        cpu
    }
}

/// Names and one-line descriptions of the built-in guests.
pub fn list() -> Vec<(&'static str, &'static str)> {
    vec![("demo", demo_description()), ("nano", nano::DESCRIPTION)]
}

fn demo_description() -> &'static str {
    "two user tasks under timer preemption with paging, system calls, demand paging and faults, then a report"
}

/// The built-in guest called `name`.
pub fn by_name(name: &str) -> Option<Guest> {
    match name {
        "demo" => Some(demo()),
        "nano" => Some(nano::guest(nano::DEFAULT_ITERATIONS)),
        _ => None,
    }
}

/// The `demo` guest.
pub fn demo() -> Guest {
    let (image, entry) = demo::build();
    Guest { name: "demo", image, load_addr: LOAD_ADDR, entry, description: demo_description() }
}

/// The guest as a multiboot v1 ELF32 (`qemu-system-i386 -kernel x.elf
/// -device isa-debug-exit,iobase=0xf4,iosize=0x04`), with the run-time area
/// as bss so the loader knows the memory is taken.
pub fn export_multiboot(g: &Guest) -> Vec<u8> {
    let end = g.load_addr.saturating_add(g.image.len() as u32);
    let bss = RUNTIME_END.saturating_sub(end);
    crate::loader::multiboot::build_elf(&g.image, g.load_addr, g.entry, bss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderError, DecoderOptions, Formatter, IntelFormatter, Mnemonic};

    /// The first `code_len` bytes (the boot prologue) decode as instructions.
    fn decodes(g: &Guest, code_len: usize) {
        let code = &g.image[..code_len];
        let mut d = Decoder::with_ip(32, code, u64::from(g.load_addr), DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        let mut out = String::new();
        while d.can_decode() {
            let i = d.decode();
            if d.last_error() == DecoderError::NoMoreBytes {
                break;
            }
            assert_ne!(i.mnemonic(), Mnemonic::INVALID, "invalid instruction at {:#x}", i.ip());
            out.clear();
            f.format(&i, &mut out);
        }
    }

    #[test]
    fn every_guest_builds_and_exports() {
        for (name, _) in list() {
            let g = by_name(name).unwrap();
            assert_eq!(g.load_addr, 0x10_0000);
            assert_eq!(g.entry, g.load_addr);
            assert!(g.image.len() <= (kernel::IMAGE_END - LOAD_ADDR) as usize);
            let elf = export_multiboot(&g);
            assert!(crate::loader::multiboot::is_multiboot(&elf), "{name}: multiboot header in the first 8 KiB");
            // The image bytes are in the ELF verbatim.
            assert!(elf.windows(64).any(|w| w == &g.image[..64]));
        }
        assert!(by_name("nope").is_none());
    }

    #[test]
    fn kernel_code_decodes() {
        decodes(&demo(), 0x40);
        decodes(&nano::guest(10), 0x40);
    }
}
