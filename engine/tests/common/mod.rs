//! Shared helpers: a guest memory that implements `GuestCode`, an engine
//! over a detached VMM area, and TC disassembly.
#![allow(dead_code)]

use engine::decode::FetchFault;
use engine::{BlockKey, Config, Engine, GuestCode, VmmAreaView};
use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};

pub const VMM: u32 = 0xFF80_0000;
/// Guest-physical = linear + PHYS_OFFSET in the mock.
pub const PHYS_OFFSET: u64 = 0x10_0000;

/// Guest code at `base..base+len`, everything else faults.
pub struct Mem {
    pub base: u32,
    pub data: Vec<u8>,
}

impl Mem {
    pub fn new(base: u32, code: &[u8]) -> Mem {
        let mut data = code.to_vec();
        data.resize(0x4000, 0x90);
        Mem { base, data }
    }
    pub fn at(&mut self, linear: u32, code: &[u8]) {
        let o = (linear - self.base) as usize;
        self.data[o..o + code.len()].copy_from_slice(code);
    }
}

impl GuestCode for Mem {
    fn fetch(&mut self, linear: u32, buf: &mut [u8]) -> Result<(), FetchFault> {
        let o = linear.wrapping_sub(self.base) as usize;
        match self.data.get(o..o + buf.len()) {
            Some(s) => {
                buf.copy_from_slice(s);
                Ok(())
            }
            None => Err(FetchFault { linear }),
        }
    }
    fn phys_page(&mut self, linear: u32) -> Option<u64> {
        let o = linear.wrapping_sub(self.base) as usize;
        (o < self.data.len()).then(|| u64::from(linear & !0xFFF) + PHYS_OFFSET)
    }
}

pub fn engine() -> Engine {
    engine_with(Config::default())
}

pub fn engine_with(config: Config) -> Engine {
    Engine::new(VmmAreaView::detached(VMM), config).unwrap()
}

pub fn asm32(base: u32, f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler)) -> Vec<u8> {
    let mut a = iced_x86::code_asm::CodeAssembler::new(32).unwrap();
    f(&mut a);
    a.assemble(u64::from(base)).unwrap()
}

/// The block's TC decoded from `from` (a TC address) to its end.
pub fn tc_insns(e: &Engine, key: &BlockKey, from: u32) -> Vec<Instruction> {
    let b = e.block(key).unwrap();
    let bytes = e.block_bytes(key).unwrap();
    let skip = (from - b.tc_start) as usize;
    let mut d = Decoder::with_ip(32, &bytes[skip..], u64::from(from), DecoderOptions::NONE);
    let mut v = Vec::new();
    while d.can_decode() {
        v.push(d.decode());
    }
    v
}

pub fn text(i: &Instruction) -> String {
    let mut s = String::new();
    let mut f = IntelFormatter::new();
    f.options_mut().set_hex_prefix("0x");
    f.options_mut().set_hex_suffix("");
    f.options_mut().set_uppercase_hex(false);
    f.options_mut().set_small_hex_numbers_in_decimal(false);
    f.format(i, &mut s);
    s
}

pub fn texts(v: &[Instruction]) -> Vec<String> {
    v.iter().map(text).collect()
}

/// Position of the first line containing `pat` at or after `from`.
pub fn find(lines: &[String], from: usize, pat: &str) -> usize {
    lines[from..]
        .iter()
        .position(|l| l.contains(pat))
        .map(|p| p + from)
        .unwrap_or_else(|| panic!("`{pat}` not found after line {from} in:\n{}", lines.join("\n")))
}
