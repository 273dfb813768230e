//! Structure-aware mutations: a target builds a *valid* input in code (a
//! bzImage header, an ELF, a cpio archive, a trace) and lets the fuzz bytes,
//! read through [`arbitrary::Unstructured`], tweak its fields, cut it, and
//! splice pieces of it. Random bytes alone almost never get past a magic
//! number and a checksum; a valid input with a few wrong fields reaches the
//! code behind them.

use arbitrary::Unstructured;

/// A field of a binary format: where it is and how wide (1, 2, 4 or 8 bytes).
#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub offset: usize,
    pub width: usize,
}

impl Field {
    pub const fn new(offset: usize, width: usize) -> Field {
        Field { offset, width }
    }
}

/// Values that tend to break arithmetic on a field of `width` bytes.
fn interesting(u: &mut Unstructured<'_>, width: usize, old: u64, len_hint: u64) -> arbitrary::Result<u64> {
    let max = if width >= 8 { u64::MAX } else { (1u64 << (8 * width)) - 1 };
    let v = match u.int_in_range(0..=11u8)? {
        0 => 0,
        1 => 1,
        2 => max,
        3 => max >> 1,
        4 => (max >> 1) + 1,
        5 => old.wrapping_add(u64::from(u.int_in_range(1..=16u8)?)),
        6 => old.wrapping_sub(u64::from(u.int_in_range(1..=16u8)?)),
        7 => len_hint,
        8 => len_hint.wrapping_add(1),
        9 => 1u64 << u.int_in_range(0..=63u8)?,
        10 => old ^ (1u64 << u.int_in_range(0..=(8 * width as u8).saturating_sub(1))?),
        _ => u.arbitrary::<u64>()?,
    };
    Ok(v & max)
}

fn read_le(buf: &[u8], f: Field) -> u64 {
    let mut v = 0u64;
    for i in 0..f.width.min(8) {
        v |= u64::from(buf.get(f.offset + i).copied().unwrap_or(0)) << (8 * i);
    }
    v
}

/// Writes `v` little-endian into the field; bytes beyond `buf` are dropped.
pub fn write_le(buf: &mut [u8], f: Field, v: u64) {
    for i in 0..f.width.min(8) {
        if let Some(b) = buf.get_mut(f.offset + i) {
            *b = (v >> (8 * i)) as u8;
        }
    }
}

/// Applies up to `max_steps` mutations to `buf`: field tweaks (on `fields`,
/// the format's known fields), byte flips anywhere, truncation, extension,
/// deletion, duplication and splicing of ranges. Stops early when the fuzz
/// bytes run out.
pub fn mutate(u: &mut Unstructured<'_>, buf: &mut Vec<u8>, fields: &[Field], max_steps: u8) -> arbitrary::Result<()> {
    let steps = u.int_in_range(0..=max_steps)?;
    for _ in 0..steps {
        if u.is_empty() {
            break;
        }
        let len = buf.len();
        match u.int_in_range(0..=9u8)? {
            0..=3 if !fields.is_empty() => {
                let f = *u.choose(fields)?;
                let old = read_le(buf, f);
                let v = interesting(u, f.width, old, len as u64)?;
                write_le(buf, f, v);
            }
            4 if len > 0 => {
                let i = u.choose_index(len)?;
                buf[i] = u.arbitrary()?;
            }
            5 => {
                let at = u.int_in_range(0..=len)?;
                buf.truncate(at);
            }
            6 => {
                let n = u.int_in_range(0..=256usize)?;
                let extra = u.bytes(n.min(u.len()))?;
                buf.extend_from_slice(extra);
            }
            7 if len > 0 => {
                let a = u.choose_index(len)?;
                let b = u.int_in_range(a..=len)?;
                buf.drain(a..b);
            }
            8 if len > 0 => {
                // Splice: copy a range of the buffer over another place.
                let a = u.choose_index(len)?;
                let n = u.int_in_range(0..=(len - a).min(512))?;
                let to = u.choose_index(len)?;
                let piece = buf[a..a + n].to_vec();
                for (i, b) in piece.into_iter().enumerate() {
                    if let Some(d) = buf.get_mut(to + i) {
                        *d = b;
                    }
                }
            }
            9 if len > 0 => {
                // Insert raw fuzz bytes.
                let at = u.int_in_range(0..=len)?;
                let n = u.int_in_range(0..=64usize)?;
                let extra = u.bytes(n.min(u.len()))?.to_vec();
                buf.splice(at..at, extra);
            }
            _ => {}
        }
    }
    Ok(())
}

/// A string for command lines and names: usually short printable text from
/// `dictionary` or the bytes, sometimes with NULs, long, or non-ASCII.
pub fn string(u: &mut Unstructured<'_>, dictionary: &[&str], max: usize) -> arbitrary::Result<String> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => String::new(),
        1 | 2 if !dictionary.is_empty() => (*u.choose(dictionary)?).to_string(),
        3 => {
            let n = u.int_in_range(0..=max)?;
            "x".repeat(n)
        }
        _ => {
            let n = u.int_in_range(0..=max.min(64))?;
            let raw = u.bytes(n.min(u.len()))?;
            String::from_utf8_lossy(raw).into_owned()
        }
    })
}
