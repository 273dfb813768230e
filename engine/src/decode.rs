//! Stage 1, decode: guest bytes from a start EIP to the first block-ending
//! instruction, the end of the guest page (an instruction may straddle it)
//! or the size cap. Records the guest-physical pages the block came from.

use crate::classify::{classify, Classification};
use crate::BlockKey;
use iced_x86::{Decoder, DecoderOptions, Instruction};

/// A guest fetch failed (not present, not executable): the monitor turns it
/// into the guest's #PF when it happens at the first instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest code fetch fault at linear {linear:#x}")]
pub struct FetchFault {
    pub linear: u32,
}

/// How the engine reads guest code; the monitor implements it over the
/// guest page tables and guest RAM.
pub trait GuestCode {
    /// Fills `buf` with guest bytes at linear address `linear` (never
    /// crossing a page boundary when called by the engine).
    fn fetch(&mut self, linear: u32, buf: &mut [u8]) -> Result<(), FetchFault>;
    /// Guest-physical page (address, 4 KiB aligned) backing `linear`.
    fn phys_page(&mut self, linear: u32) -> Option<u64>;
}

pub const PAGE: u32 = 4096;
const MAX_INSN_LEN: usize = 15;

/// A guest page a block was decoded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CodePage {
    /// Linear page address (4 KiB aligned).
    pub linear: u32,
    /// Guest-physical page address.
    pub phys: u64,
}

/// One decoded guest instruction.
#[derive(Clone, Debug)]
pub struct DecodedInsn {
    pub instr: Instruction,
    pub bytes: Vec<u8>,
    pub class: Classification,
}

impl DecodedInsn {
    pub fn eip(&self) -> u32 {
        self.instr.ip32()
    }
    pub fn next_eip(&self) -> u32 {
        self.instr.next_ip32()
    }
}

/// Why decoding stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockEnd {
    /// The last instruction ends blocks (control flow, some sensitive ones).
    Instruction,
    /// The next instruction lies on another page or could not be fetched.
    PageEnd,
    /// `max_insns` reached.
    SizeCap,
}

/// The result of stage 1.
#[derive(Clone, Debug)]
pub struct DecodedBlock {
    pub insns: Vec<DecodedInsn>,
    pub pages: Vec<CodePage>,
    pub end: BlockEnd,
    /// Guest EIP after the last instruction.
    pub next_eip: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Fetch(#[from] FetchFault),
    #[error("no guest-physical page behind linear {0:#x}")]
    NoPhysPage(u32),
}

/// Decodes one block for `key`.
pub fn decode_block(key: &BlockKey, code: &mut dyn GuestCode, max_insns: usize) -> Result<DecodedBlock, DecodeError> {
    let linear = key.linear();
    let page = linear & !(PAGE - 1);
    let in_page = (page + PAGE - linear) as usize;
    // This page up to its end, plus up to 15 bytes of the next one (only
    // used by an instruction that straddles the boundary).
    let mut buf = vec![0u8; in_page + MAX_INSN_LEN];
    code.fetch(linear, &mut buf[..in_page])?;
    let next_page = page.wrapping_add(PAGE);
    let next_ok = code.fetch(next_page, &mut buf[in_page..]).is_ok();
    let avail = if next_ok { buf.len() } else { in_page };
    let phys = code.phys_page(linear).ok_or(DecodeError::NoPhysPage(linear))?;
    let mut pages = vec![CodePage { linear: page, phys }];

    let bitness = if key.cs32 { 32 } else { 16 };
    let mut dec = Decoder::with_ip(bitness, &buf[..avail], u64::from(key.eip), DecoderOptions::NONE);
    let mut insns: Vec<DecodedInsn> = Vec::new();
    let mut pos = 0usize;
    let end = loop {
        if insns.len() >= max_insns {
            break BlockEnd::SizeCap;
        }
        if pos >= in_page {
            break BlockEnd::PageEnd;
        }
        let instr = dec.decode();
        let len = instr.len();
        if instr.is_invalid() && pos + MAX_INSN_LEN > avail && !insns.is_empty() {
            // Possibly cut short by the page end: let the next block (whose
            // fetch reports the fault precisely) deal with it.
            break BlockEnd::PageEnd;
        }
        let len = if instr.is_invalid() { len.max(1) } else { len };
        if pos + len > in_page {
            // Straddles into the next page.
            match code.phys_page(next_page) {
                Some(p) if next_ok => pages.push(CodePage { linear: next_page, phys: p }),
                _ if insns.is_empty() => return Err(FetchFault { linear: next_page }.into()),
                _ => break BlockEnd::PageEnd,
            }
        }
        let class = classify(&instr);
        let bytes = buf[pos..pos + len].to_vec();
        pos += len;
        insns.push(DecodedInsn { instr, bytes, class });
        if class.ends_block {
            break BlockEnd::Instruction;
        }
        if pos > in_page {
            break BlockEnd::PageEnd;
        }
    };
    let next_eip = insns.last().map_or(key.eip, |i| i.next_eip());
    Ok(DecodedBlock { insns, pages, end, next_eip })
}
