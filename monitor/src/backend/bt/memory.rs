//! The bt backend's views of guest memory, each the adapter one consumer
//! needs: guest RAM for the shadow MMU's page walker ([`Phys`]), the window
//! for its mappings ([`WindowMapper`]), guest-linear memory for the virtual
//! CPU's semantics ([`Linear`]) and guest code for the translator
//! ([`Code`]). [`Guest`] owns the memory and the MMU together and hands out
//! these views, borrowing only itself, so the backend's other parts (CPU,
//! engine) stay free to borrow alongside.

use std::sync::Arc;

use shadow_mmu::{HostMapper, MapError, MapOp, OutsideRam, PhysMem, ShadowMmu};

use crate::cpu::{self, Cpu, Fault, LinearMemory};
use crate::host::Window;
use crate::memory::GuestMemory;

/// Guest RAM as the page walker reads and writes it.
pub struct Phys<'a>(pub &'a GuestMemory);

impl PhysMem for Phys<'_> {
    fn read_u32(&self, gpa: u64) -> Option<u32> {
        self.0.read_u32(gpa).ok()
    }
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        let mut b = [0; 8];
        self.0.read(gpa, &mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn write_u32(&mut self, gpa: u64, value: u32) -> Result<(), OutsideRam> {
        self.0.write_u32(gpa, value).map_err(|_| OutsideRam(gpa))
    }
    fn write_u64(&mut self, gpa: u64, value: u64) -> Result<(), OutsideRam> {
        self.0.write(gpa, &value.to_le_bytes()).map_err(|_| OutsideRam(gpa))
    }
    fn is_ram(&self, gpa: u64) -> bool {
        gpa < self.0.size()
    }
    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.0.read(gpa, buf).is_ok()
    }
    fn bytes_equal(&self, gpa: u64, expected: &[u8]) -> Option<bool> {
        self.0.slice(gpa, expected.len() as u64).ok().map(|now| now == expected)
    }
}

/// The window, as the shadow MMU drives it.
pub struct WindowMapper<'a> {
    pub window: &'static Window,
    pub mem: &'a GuestMemory,
}

impl HostMapper for WindowMapper<'_> {
    fn map(&mut self, gva: u32, gpa: u64, len: u32, prot: shadow_mmu::Prot) -> Result<(), MapError> {
        self.window.map(gva, self.mem, gpa, len, prot).map_err(|e| MapError {
            op: MapOp::Map,
            gva,
            len,
            detail: e.to_string(),
        })
    }
    fn note_large_page(&mut self, gva: u32, len: u32) {
        self.window.mark_invlpg(gva, len);
    }
    fn unmap(&mut self, gva: u32, len: u32) -> Result<(), MapError> {
        self.window.unmap(gva, len).map_err(|e| MapError { op: MapOp::Unmap, gva, len, detail: e.to_string() })
    }
    fn protect(&mut self, gva: u32, len: u32, prot: shadow_mmu::Prot) -> Result<(), MapError> {
        self.window.protect(gva, len, prot).map_err(|e| MapError {
            op: MapOp::Protect,
            gva,
            len,
            detail: e.to_string(),
        })
    }
}

/// Guest-linear memory through the guest's paging (A/D set as the access
/// would), for the virtual CPU's semantics. Accesses outside RAM read as
/// all ones and drop writes (open bus), logged.
pub struct Linear<'a> {
    pub mmu: &'a mut ShadowMmu,
    pub mem: &'a GuestMemory,
}

impl Linear<'_> {
    fn each_page(
        &mut self,
        lin: u32,
        len: usize,
        access: shadow_mmu::Access,
        mut f: impl FnMut(&GuestMemory, u64, usize, usize),
    ) -> Result<(), Fault> {
        let mut done = 0usize;
        while done < len {
            let at = lin.wrapping_add(done as u32);
            let chunk = (4096 - (at as usize & 0xFFF)).min(len - done);
            let gpa = self
                .mmu
                .translate(&mut Phys(self.mem), at, access)
                .map_err(|pf| Fault::page(pf.cr2, pf.error_code))?
                .gpa;
            f(self.mem, gpa, done, chunk);
            done += chunk;
        }
        Ok(())
    }
}

impl LinearMemory for Linear<'_> {
    fn read(&mut self, _cpu: &Cpu, lin: u32, buf: &mut [u8], access: cpu::Access) -> Result<(), Fault> {
        let a = shadow_mmu::Access { write: false, user: access.user, fetch: access.fetch };
        let len = buf.len();
        self.each_page(lin, len, a, |mem, gpa, off, n| {
            if mem.read(gpa, &mut buf[off..off + n]).is_err() {
                tracing::debug!(gpa, "read outside guest RAM (open bus)");
                buf[off..off + n].fill(0xFF);
            }
        })
    }

    fn write(&mut self, _cpu: &Cpu, lin: u32, data: &[u8], access: cpu::Access) -> Result<(), Fault> {
        let a = shadow_mmu::Access { write: true, user: access.user, fetch: false };
        self.each_page(lin, data.len(), a, |mem, gpa, off, n| {
            if mem.write(gpa, &data[off..off + n]).is_err() {
                tracing::debug!(gpa, "write outside guest RAM dropped");
            }
        })
    }
}

/// Guest code as the translator fetches it: through the guest's paging
/// with fetch rights at the block's CPL.
pub struct Code<'a> {
    pub mmu: &'a mut ShadowMmu,
    pub mem: &'a GuestMemory,
    pub user: bool,
}

impl engine::GuestCode for Code<'_> {
    fn fetch(&mut self, linear: u32, buf: &mut [u8]) -> Result<(), engine::FetchFault> {
        let a = shadow_mmu::Access { write: false, user: self.user, fetch: true };
        let t = self.mmu.translate(&mut Phys(self.mem), linear, a).map_err(|_| engine::FetchFault { linear })?;
        self.mem.read(t.gpa, buf).map_err(|_| engine::FetchFault { linear })
    }
    fn phys_page(&mut self, linear: u32) -> Option<u64> {
        let a = shadow_mmu::Access { write: false, user: self.user, fetch: true };
        self.mmu.probe(&mut Phys(self.mem), linear, a).ok().map(|t| t.gpa & !0xFFF)
    }
}

/// Guest RAM, the shadow MMU over it and the window it maps into.
pub struct Guest {
    pub mem: Arc<GuestMemory>,
    pub mmu: ShadowMmu,
    pub window: &'static Window,
}

impl Guest {
    /// Guest-linear memory for the virtual CPU.
    pub fn linear(&mut self) -> Linear<'_> {
        Linear { mmu: &mut self.mmu, mem: &self.mem }
    }

    /// Guest code as the translator fetches it at CPL 3 (`user`) or below.
    pub fn code(&mut self, user: bool) -> Code<'_> {
        Code { mmu: &mut self.mmu, mem: &self.mem, user }
    }

    /// Maps the guest frames behind the `frames.len()` linear pages from
    /// page `linear` read-only at VMM-area offset `alias` and on (the GDT,
    /// IDT and TSS aliases), each only when its frame changed (`frames`
    /// remembers what is mapped). Returns false, mapping nothing, when a
    /// page does not translate to guest RAM.
    pub fn map_alias(
        &mut self,
        linear: u32,
        alias: u32,
        frames: &mut [Option<u64>],
    ) -> Result<bool, crate::host::HostError> {
        let size = self.mem.size();
        let mut gpas = [0u64; 2];
        let gpas = &mut gpas[..frames.len()];
        for (k, gpa) in gpas.iter_mut().enumerate() {
            let lin = (linear & !0xFFF).wrapping_add(k as u32 * 0x1000);
            // An INVLPG of an alias page must reach the monitor.
            self.window.mark_invlpg(lin, 0x1000);
            let access = shadow_mmu::Access { write: false, user: false, fetch: false };
            match self.mmu.probe(&mut Phys(&self.mem), lin, access) {
                Ok(t) if t.gpa.saturating_add(0x1000) <= size => *gpa = t.gpa & !0xFFF,
                _ => return Ok(false),
            }
        }
        for (k, gpa) in gpas.iter().enumerate() {
            if frames[k] != Some(*gpa) {
                self.window.map_vmm_page(alias + k as u32 * 0x1000, &self.mem, *gpa)?;
                frames[k] = Some(*gpa);
            }
        }
        Ok(true)
    }

    /// The MMU with its page walker's memory and its mapper.
    pub fn paging(&mut self) -> (&mut ShadowMmu, Phys<'_>, WindowMapper<'_>) {
        (&mut self.mmu, Phys(&self.mem), WindowMapper { window: self.window, mem: &self.mem })
    }

    /// Fetches guest code at `linear` into `buf` page by page, as the
    /// translator would. Returns how many bytes arrived before the first
    /// page that could not be fetched (the rest of `buf` is zeroed).
    pub fn fetch(&mut self, linear: u32, buf: &mut [u8], user: bool) -> usize {
        use engine::GuestCode;
        let mut code = self.code(user);
        let mut done = 0;
        while done < buf.len() {
            let lin = linear.wrapping_add(done as u32);
            let n = (4096 - (lin & 0xFFF) as usize).min(buf.len() - done);
            if code.fetch(lin, &mut buf[done..done + n]).is_err() {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        done
    }
}
