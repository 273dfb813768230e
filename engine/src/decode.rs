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
/// The architectural limit on an x86 instruction's length.
pub const MAX_INSN_LEN: usize = 15;

/// The bytes of one instruction, inline: x86 instructions are at most 15
/// bytes, and a `Vec` per instruction made allocation a third of the
/// translation time. Reads as a byte slice.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct InsnBytes {
    len: u8,
    buf: [u8; MAX_INSN_LEN],
}

impl InsnBytes {
    /// `bytes` must be at most [`MAX_INSN_LEN`] long (panics otherwise).
    pub fn new(bytes: &[u8]) -> InsnBytes {
        let mut buf = [0u8; MAX_INSN_LEN];
        buf[..bytes.len()].copy_from_slice(bytes);
        InsnBytes { len: bytes.len() as u8, buf }
    }
}

impl std::ops::Deref for InsnBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for InsnBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl From<&[u8]> for InsnBytes {
    fn from(bytes: &[u8]) -> InsnBytes {
        InsnBytes::new(bytes)
    }
}

/// A guest page a block was decoded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CodePage {
    /// Linear page address (4 KiB aligned).
    pub linear: u32,
    /// Guest-physical page address.
    pub phys: u64,
}

/// One decoded guest instruction.
#[derive(Clone, Copy, Debug)]
pub struct DecodedInsn {
    pub instr: Instruction,
    pub bytes: InsnBytes,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BlockEnd {
    /// The last instruction ends blocks (control flow, some sensitive ones).
    #[default]
    Instruction,
    /// The next instruction lies on another page or could not be fetched.
    PageEnd,
    /// `max_insns` reached.
    SizeCap,
}

/// The result of stage 1. The engine keeps one and decodes every block
/// into it ([`decode_into`]): its vectors are allocated once.
#[derive(Clone, Debug, Default)]
pub struct DecodedBlock {
    pub insns: Vec<DecodedInsn>,
    pub pages: Vec<CodePage>,
    pub end: BlockEnd,
    /// Guest EIP after the last instruction.
    pub next_eip: u32,
    /// The fetched guest bytes (this page's rest, then up to 15 bytes of
    /// the next), kept for the next block.
    fetch_buf: Vec<u8>,
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
    let mut block = DecodedBlock::default();
    decode_into(key, code, max_insns, &mut block)?;
    Ok(block)
}

/// [`decode_block`] into `out`, reusing its buffers.
pub fn decode_into(
    key: &BlockKey,
    code: &mut dyn GuestCode,
    max_insns: usize,
    out: &mut DecodedBlock,
) -> Result<(), DecodeError> {
    out.insns.clear();
    out.pages.clear();
    let linear = key.linear();
    let page = linear & !(PAGE - 1);
    let in_page = (page + PAGE - linear) as usize;
    // This page up to its end, plus up to 15 bytes of the next one (only
    // used by an instruction that straddles the boundary). Every byte read
    // below was fetched: no need to clear the buffer between blocks.
    let buf = &mut out.fetch_buf;
    buf.resize(in_page + MAX_INSN_LEN, 0);
    let buf = &mut buf[..in_page + MAX_INSN_LEN];
    code.fetch(linear, &mut buf[..in_page])?;
    let next_page = page.wrapping_add(PAGE);
    let next_ok = code.fetch(next_page, &mut buf[in_page..]).is_ok();
    let avail = if next_ok { buf.len() } else { in_page };
    let phys = code.phys_page(linear).ok_or(DecodeError::NoPhysPage(linear))?;
    let pages = &mut out.pages;
    pages.push(CodePage { linear: page, phys });

    let bitness = if key.cs32 { 32 } else { 16 };
    let mut dec = Decoder::with_ip(bitness, &buf[..avail], u64::from(key.eip), DecoderOptions::NONE);
    let insns = &mut out.insns;
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
        if instr.is_invalid() && dec.last_error() == iced_x86::DecoderError::NoMoreBytes {
            // Cut short by the end of the fetched bytes: the next page could
            // not be fetched. As the first instruction, that is the fetch
            // fault the CPU takes on the next page (not #UD: demand-paged
            // code straddles page ends); else the next block reports it.
            if insns.is_empty() {
                return Err(FetchFault { linear: next_page }.into());
            }
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
        let bytes = InsnBytes::new(&buf[pos..pos + len]);
        pos += len;
        insns.push(DecodedInsn { instr, bytes, class });
        if class.ends_block {
            break BlockEnd::Instruction;
        }
        if pos > in_page {
            break BlockEnd::PageEnd;
        }
    };
    out.end = end;
    out.next_eip = insns.last().map_or(key.eip, |i| i.next_eip());
    Ok(())
}
