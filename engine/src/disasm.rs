//! The translation log (`popek run --log-translations`): each guest
//! instruction, marked IDENT / REWRITTEN / CALLOUT, above its translation;
//! both disassembled with iced-x86 (Intel syntax).

use crate::engine::Block;
use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
use std::fmt::Write;

/// Text listing of block `b` whose TC bytes are `tc`.
pub fn listing(b: &Block, tc: &[u8]) -> String {
    let mut out = String::new();
    let mut fmt = IntelFormatter::new();
    let k = &b.key;
    let _ = writeln!(
        out,
        "block eip={:#010x} cs_base={:#x} {}-bit cpl={} flags={:#x} tc={:#010x}+{} entry={:#010x}",
        k.eip,
        k.cs_base,
        if k.cs32 { 32 } else { 16 },
        k.cpl,
        k.flags,
        b.tc_start,
        b.tc_len,
        b.entry
    );
    let first = b.insns.first().map_or(b.stubs, |i| i.tc_start);
    tc_lines(&mut out, &mut fmt, b, tc, b.tc_start, first, "  prologue");
    for g in &b.insns {
        let mut text = String::new();
        fmt.format(&g.instr, &mut text);
        let hex: String = g.bytes.iter().map(|x| format!("{x:02x}")).collect();
        let _ = writeln!(out, "{:08x}  {:<24} {:<10} {}", g.instr.ip32(), hex, g.disposition.label(), text);
        tc_lines(&mut out, &mut fmt, b, tc, g.tc_start, g.tc_end, "");
    }
    tc_lines(&mut out, &mut fmt, b, tc, b.stubs, b.tc_start + b.tc_len, "  exit stubs");
    out
}

fn tc_lines(out: &mut String, fmt: &mut IntelFormatter, b: &Block, tc: &[u8], from: u32, to: u32, title: &str) {
    if from >= to {
        return;
    }
    if !title.is_empty() {
        let _ = writeln!(out, "{title}:");
    }
    let bytes = &tc[(from - b.tc_start) as usize..(to - b.tc_start) as usize];
    let mut d = Decoder::with_ip(32, bytes, u64::from(from), DecoderOptions::NONE);
    let mut text = String::new();
    while d.can_decode() {
        let i = d.decode();
        text.clear();
        fmt.format(&i, &mut text);
        let _ = writeln!(out, "    -> {:08x}  {}", i.ip32(), text);
    }
}
