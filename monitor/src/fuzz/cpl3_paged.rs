//! The CPL-3 differential fuzzer with paging on and two address spaces
//! (issue 15, item 1): `cpl3`'s blocks, run directly and translated, but
//! each linear code slot holds two blocks, one per address space, and the
//! runs alternate between them. What it checks beyond `cpl3`: that
//! translated user code follows the frame its page maps *now*, the job of
//! the user-page guards (docs/translator.md, "User-page guards"), and that
//! direct code does through the shadow MMU.
//!
//! The guest builds two page directories ([`gk::PD0`], [`gk::PD1`]), each
//! mapping the first 4 MiB to itself, user-accessible, except that in the
//! second the code page ([`CODE_PAGE`]) maps to the frame after it
//! ([`ALT_FRAME`]). Block pair `i` is assembled twice for the same slot
//! address: set A in the code page's frame, set B in the other one. Runs
//! go A0, B0, A1, B1, ..., each after a MOV CR3 to its directory; or, for
//! inputs whose first byte is odd, under one directory whose code-page
//! entry the kernel rewrites before each run, followed by an INVLPG (the
//! guards' other path).

use arbitrary::Unstructured;
use dynasmrt::{DynasmApi, DynasmLabelApi};

use super::cpl3::{self, compare_runs, guest_image_at, guest_runs, Block, GuestDir, BLOCKS_AT, FLAGS_MASK, SLOT};
use super::Target;
use crate::guests::kernel::{self as gk, x86, Asm};

/// Block pairs per guest (two runs each, as many as `cpl3`'s blocks).
pub const PAIRS: usize = cpl3::BLOCKS / 2;
/// The linear page every run's code is at, and set A's frame.
pub const CODE_PAGE: u32 = BLOCKS_AT;
/// Set B's frame.
pub const ALT_FRAME: u32 = CODE_PAGE + 0x1000;
/// Present, writable, user.
const PTE_BITS: u32 = gk::P | gk::RW | gk::US;

const _: () = assert!(CODE_PAGE & 0xFFF == 0);
const _: () = assert!(SLOT * PAIRS as u32 <= 0x1000);

struct Cpl3Paged(GuestDir);

pub fn cpl3_paged() -> Result<Box<dyn Target>, String> {
    Ok(Box::new(Cpl3Paged(GuestDir::new("cpl3-paged")?)))
}

/// One input: the runs (A0, B0, A1, B1, ...) and whether the address space
/// changes by INVLPG of a rewritten entry rather than by MOV CR3.
pub struct Runs {
    pub blocks: Vec<Block>,
    pub invlpg: bool,
}

/// The runs of `input`: pairs while its bytes last.
pub fn runs_from(input: &[u8]) -> Runs {
    let mut u = Unstructured::new(input);
    let invlpg = u.arbitrary::<u8>().is_ok_and(|b| b & 1 == 1);
    let mut blocks = Vec::new();
    for i in 0..PAIRS {
        if u.is_empty() && i > 0 {
            break;
        }
        let at = CODE_PAGE + SLOT * i as u32;
        match (cpl3::block(&mut u, at), cpl3::block(&mut u, at)) {
            (Ok(a), Ok(b)) => blocks.extend([a, b]),
            _ => break,
        }
    }
    Runs { blocks, invlpg }
}

/// Where run `i` is entered, and its name in reports.
fn what(i: usize) -> (u32, String) {
    let set = if i.is_multiple_of(2) { "A (code page's own frame)" } else { "B (the other frame)" };
    (CODE_PAGE + SLOT * (i / 2) as u32, format!("run {i}: pair {}, set {set}", i / 2))
}

/// The page-table entry of `linear` in the table at `pt`.
fn pte(pt: u32, linear: u32) -> u32 {
    pt + 4 * ((linear >> 12) & 0x3FF)
}

/// The multiboot guest of `runs`.
pub fn guest(runs: &Runs) -> Vec<u8> {
    let img = guest_image_at(&runs.blocks, FLAGS_MASK, |i| {
        let frame = if i.is_multiple_of(2) { CODE_PAGE } else { ALT_FRAME };
        frame + SLOT * (i / 2) as u32
    });
    let spaces = [(gk::PD0, gk::PT_USER0), (gk::PD1, gk::PT_USER1)];
    let prologue = |k: &mut Asm| {
        for (pd, pt) in spaces {
            // The first 4 MiB to themselves, user-accessible.
            let (pt_i, bits, pde, pde_v) = (pt as i32, PTE_BITS as i32, pd as i32, (pt | PTE_BITS) as i32);
            x86!(k; mov edi, pt_i ; mov eax, bits ; mov ecx, 1024);
            let fill = k.label();
            k.bind(fill);
            x86!(k
                ; mov [edi], eax
                ; add edi, 4
                ; add eax, 0x1000
                ; dec ecx
                ; jnz =>fill
                ; mov DWORD [pde], pde_v
            );
        }
        let (alt, alt_v) = (pte(gk::PT_USER1, CODE_PAGE) as i32, (ALT_FRAME | PTE_BITS) as i32);
        let (pd0, pg) = (gk::PD0 as i32, 0x8000_0000u32 as i32);
        x86!(k; mov DWORD [alt], alt_v ; mov eax, pd0);
        k.mov_cr_eax(3);
        k.mov_eax_cr(0);
        x86!(k; or eax, pg);
        k.mov_cr_eax(0);
    };
    let invlpg = runs.invlpg;
    let before = |k: &mut Asm, i: usize| {
        if invlpg {
            let frame = if i.is_multiple_of(2) { CODE_PAGE } else { ALT_FRAME };
            let (entry, v, page) = (pte(gk::PT_USER0, CODE_PAGE) as i32, (frame | PTE_BITS) as i32, CODE_PAGE as i32);
            x86!(k; mov DWORD [entry], v ; mov eax, page);
            k.invlpg_eax();
        } else {
            let pd = spaces[i % 2].0 as i32;
            x86!(k; mov eax, pd);
            k.mov_cr_eax(3);
        }
    };
    guest_runs(img, &runs.blocks, |i| what(i).0, prologue, before)
}

/// Runs `runs` in one guest with user code direct and translated (through
/// the `popek` at `exe`, the guest written in `dir`); `Err` names the first
/// run whose state differs, with its disassembly.
pub fn compare(exe: &std::path::Path, dir: &std::path::Path, runs: &Runs) -> Result<(), String> {
    compare_runs(exe, dir, &guest(runs), &runs.blocks, &what)
}

impl Target for Cpl3Paged {
    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        let runs = runs_from(input);
        if runs.blocks.is_empty() {
            return Ok(());
        }
        super::note(if runs.invlpg { "address spaces: INVLPG" } else { "address spaces: MOV CR3" });
        compare(&self.0.exe, &self.0.dir, &runs)
    }
}
