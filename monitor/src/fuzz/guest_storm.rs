//! Platform storms from a guest (issue 15, item 3 as written): the
//! `platform` target drives the machine model through its buses with no
//! CPU; this one has a multiboot guest do it, so the exits, the in-place
//! port paths, the port read cache, the MMIO emulation and interrupt
//! delivery are on the way too. Each input becomes up to [`MAX_OPS`]
//! operations: port writes and reads of every width (the devices' ports,
//! weighted, or any port), local APIC and I/O APIC register writes and
//! reads, short interrupt windows (`sti; nop; nop; nop; cli`) and delay
//! loops. Exceptions print their vector and end the guest; interrupts are
//! acknowledged (both PICs, the local APIC) and return with IF clear (one
//! per window: a timer programmed faster than the handler would otherwise
//! livelock the guest, as it would a real CPU).
//!
//! The guest runs under `popek run` on the `pc` machine. It may end any
//! way the machine allows (done, a reset the guest asked for, an exception,
//! a clear guest error); a failure is a panic, a death by signal, or a run
//! longer than [`RUN_LIMIT`] (a spin).

use std::time::Duration;

use arbitrary::Unstructured;
use dynasmrt::{DynasmApi, DynasmLabelApi};

use super::cpl3::{run_capture, GuestDir};
use super::platform::{LAPIC_REGS, PORTS};
use super::Target;
use crate::guests::kernel::{interrupt_stubs, kernel_start, x86, Asm, Image, KCODE, LOAD_ADDR};
use crate::layout::{IOAPIC_BASE, LAPIC_BASE, PORT_DEBUG_EXIT};

/// Operations per guest.
pub const MAX_OPS: usize = 256;
/// A guest that runs longer is a spin.
const RUN_LIMIT: Duration = Duration::from_secs(8);
/// A guest slower than this is counted apart (storms take milliseconds;
/// the PIT kicks of docs/reliability.md made a few take 2-10 s before they
/// were fixed).
const SLOW: Duration = Duration::from_secs(1);

/// One thing the guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Out {
        port: u16,
        size: u8,
        value: u32,
    },
    In {
        port: u16,
        size: u8,
    },
    MmioWrite {
        addr: u32,
        value: u32,
    },
    MmioRead {
        addr: u32,
    },
    /// `sti; nop; nop; nop; cli`: pending interrupts arrive.
    Window,
    /// `dec ecx; jnz` this many times: timers move on.
    Delay(u32),
}

/// Ports the storm leaves alone: isa-debug-exit (it would end the storm;
/// the guest's own end uses it). PIT channel 0 was left out too until an
/// IRQ0 edge nobody could take stopped setting deadlines
/// (docs/reliability.md, "Found, then fixed: timer kicks for interrupts
/// nobody can take").
const LEFT_OUT: [u16; 1] = [PORT_DEBUG_EXIT];

/// A port to hit ([`LEFT_OUT`] becomes the POST port 0x80).
fn port(u: &mut Unstructured<'_>) -> arbitrary::Result<u16> {
    let p = if u.ratio(7u8, 8)? { *u.choose(PORTS)? } else { u.arbitrary()? };
    Ok(if LEFT_OUT.contains(&p) { 0x80 } else { p })
}

fn mmio(u: &mut Unstructured<'_>) -> arbitrary::Result<u32> {
    Ok(if u.ratio(3u8, 4)? {
        LAPIC_BASE as u32 + *u.choose(LAPIC_REGS)? as u32
    } else {
        // IOREGSEL and IOWIN.
        IOAPIC_BASE as u32 + *u.choose(&[0u32, 0x10])?
    })
}

fn ops(input: &[u8]) -> Vec<Op> {
    let mut u = Unstructured::new(input);
    let mut v = Vec::new();
    while v.len() < MAX_OPS && !u.is_empty() {
        let op = (|| -> arbitrary::Result<Op> {
            Ok(match u.int_in_range(0..=9u8)? {
                0..=3 => Op::Out { port: port(&mut u)?, size: *u.choose(&[1u8, 1, 2, 4])?, value: u.arbitrary()? },
                4 | 5 => Op::In { port: port(&mut u)?, size: *u.choose(&[1u8, 1, 2, 4])? },
                6 => Op::MmioWrite { addr: mmio(&mut u)?, value: u.arbitrary()? },
                7 => Op::MmioRead { addr: mmio(&mut u)? },
                8 => Op::Window,
                _ => Op::Delay(u.int_in_range(1..=20_000u32)?),
            })
        })();
        match op {
            Ok(op) => v.push(op),
            Err(_) => break,
        }
    }
    v
}

/// The multiboot guest that performs `ops`, then prints "done" and exits.
fn guest(ops: &[Op]) -> Vec<u8> {
    let mut img = Image::new();
    img.tables();
    let mut k = Asm::new(KCODE);
    let (entry, r) = kernel_start(&mut k);
    let (putc, hex, exit) = (r.putc, r.print_hex, r.exit);
    let (body, exc) = (k.label(), k.label());
    x86!(k; jmp =>body);
    // Interrupts (vectors 32-255): acknowledge everywhere, return.
    let irq = k.here();
    let eoi = (LAPIC_BASE as u32 + 0xB0) as i32;
    x86!(k; push eax ; mov al, 0x20);
    k.raw(&[0xE6, 0xA0, 0xE6, 0x20]); // out 0xa0, al ; out 0x20, al
                                      // Return with IF clear: one interrupt per window, so a timer the storm
                                      // set to fire faster than this handler runs cannot livelock the guest
                                      // (as it would a real CPU: that is the guest's doing, not a spin).
    x86!(k; mov DWORD [eoi], 0 ; pop eax ; and DWORD [esp + 8], !0x200);
    k.iretd();
    for v in 32..=255u8 {
        img.gate(v, irq, 0);
    }
    // Exceptions: "X <vector>", then the end.
    interrupt_stubs(&mut k, &mut img, 0u8..32, exc, 0x80);
    k.bind(exc);
    x86!(k; mov al, 0x58 ; call =>putc ; mov eax, [esp] ; call =>hex ; mov al, 0x0A ; call =>putc ; mov al, 0x35 ; call =>exit);
    k.bind(body);
    for op in ops {
        match *op {
            Op::Out { port, size, value } => {
                let (p, v) = (i32::from(port), value as i32);
                x86!(k; mov edx, p ; mov eax, v);
                k.raw(match size {
                    1 => &[0xEE],
                    2 => &[0x66, 0xEF],
                    _ => &[0xEF],
                });
            }
            Op::In { port, size } => {
                let p = i32::from(port);
                x86!(k; mov edx, p);
                k.raw(match size {
                    1 => &[0xEC],
                    2 => &[0x66, 0xED],
                    _ => &[0xED],
                });
            }
            Op::MmioWrite { addr, value } => {
                let (a, v) = (addr as i32, value as i32);
                x86!(k; mov eax, v ; mov DWORD [a], eax);
            }
            Op::MmioRead { addr } => {
                let a = addr as i32;
                x86!(k; mov eax, DWORD [a]);
            }
            Op::Window => k.raw(&[0xFB, 0x90, 0x90, 0x90, 0xFA]),
            Op::Delay(n) => {
                let (l, n) = (k.label(), n as i32);
                x86!(k; mov ecx, n ; =>l ; dec ecx ; jnz =>l);
            }
        }
    }
    for b in b"done\n" {
        let c = *b as i8;
        x86!(k; mov al, BYTE c ; call =>putc);
    }
    x86!(k; mov al, 0x31 ; call =>exit);
    let code = k.finish();
    img.put(KCODE, &code);
    crate::loader::multiboot::build_elf(&img.bytes, LOAD_ADDR, entry, 0x6_0000)
}

struct GuestStorm(GuestDir);

pub fn guest_storm() -> Result<Box<dyn Target>, String> {
    Ok(Box::new(GuestStorm(GuestDir::new("guest-storm")?)))
}

impl Target for GuestStorm {
    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        let ops = ops(input);
        if ops.is_empty() {
            return Ok(());
        }
        let elf = self.0.dir.join("guest.elf");
        std::fs::write(&elf, guest(&ops)).map_err(|e| e.to_string())?;
        let t = std::time::Instant::now();
        let (_out, err, status) = run_capture(&self.0.exe, &elf, &["--machine", "pc"], "storm", RUN_LIMIT)?;
        if t.elapsed() > SLOW {
            super::note("slower than 1 s");
        }
        let describe = || format!("{} operations, exit {status}\nstderr: {err}\nops: {ops:x?}", ops.len());
        if err.contains("panicked") || status.code().is_none_or(|c| c == 101) {
            return Err(format!("the monitor crashed: {}", describe()));
        }
        // The UART may be in loopback or have DLAB set by now: the end is
        // told by the isa-debug-exit value (0x31 done, 0x35 an exception).
        let last = err.lines().rfind(|l| l.starts_with("popek:")).unwrap_or("");
        let kind = last.split(['(', ',', ':']).take(2).collect::<Vec<_>>().join(":");
        super::note(if last.contains("wrote 49 to isa-debug-exit") {
            "guest finished its storm"
        } else if last.contains("wrote 53 to isa-debug-exit") {
            "guest took an exception"
        } else if last.is_empty() {
            "ended without a word"
        } else {
            // The machine ended it (a reset, a guest error): the kind, not its numbers.
            kind.trim_end()
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_operation_is_generated() {
        let mut seen = [false; 6];
        let mut rng = super::super::Rng::new(0x5707);
        let input: Vec<u8> = (0..8192).map(|_| rng.next_u64() as u8).collect();
        let v = ops(&input);
        assert_eq!(v.len(), MAX_OPS);
        for op in &v {
            let i = match op {
                Op::Out { .. } => 0,
                Op::In { .. } => 1,
                Op::MmioWrite { .. } => 2,
                Op::MmioRead { .. } => 3,
                Op::Window => 4,
                Op::Delay(_) => 5,
            };
            seen[i] = true;
        }
        assert_eq!(seen, [true; 6]);
        // And the guest assembles into a multiboot ELF.
        assert!(crate::loader::multiboot::is_multiboot(&guest(&v)));
    }
}
