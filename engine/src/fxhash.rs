//! FxHash (rustc's hasher): one rotate-xor-multiply per word. The engine's
//! maps are keyed by small integers (block keys, pages); SipHash's flooding
//! resistance buys nothing here (a guest that forces collisions only slows
//! itself) and cost ~2 % of a deterministic Linux boot.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

#[derive(Clone, Copy, Debug, Default)]
pub struct FxHasher(u64);

const K: u64 = 0x517c_c1b7_2722_0a95;

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(b));
        }
    }
    fn write_u8(&mut self, v: u8) {
        self.add(u64::from(v));
    }
    fn write_u16(&mut self, v: u16) {
        self.add(u64::from(v));
    }
    fn write_u32(&mut self, v: u32) {
        self.add(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }
    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }
    fn finish(&self) -> u64 {
        // The multiply leaves the low bits of the product no better than
        // the word's: page-aligned keys (frames, linear pages, CR3s) came
        // out with 12 zero bits, which std's map uses as the bucket index,
        // so every such key probed from one bucket (rmap and code-page
        // lookups were a third of the monitor's time in a Debian boot).
        // The well-mixed high bits go low (as rustc-hash 2 does).
        self.0.rotate_left(26)
    }
}

/// A `HashMap` with [`FxHasher`].
pub type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
/// A `HashSet` with [`FxHasher`].
pub type FxHashSet<K> = std::collections::HashSet<K, BuildHasherDefault<FxHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_small_keys_hash_apart() {
        let mut seen = std::collections::HashSet::new();
        for k in 0u32..10_000 {
            let mut h = FxHasher::default();
            h.write_u32(k);
            seen.insert(h.finish());
        }
        assert_eq!(seen.len(), 10_000);
    }

    #[test]
    fn page_aligned_keys_spread_over_the_low_bits() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<FxHasher>::default();
        let low: std::collections::HashSet<u64> = (0..4096u64).map(|n| build.hash_one(n << 12) & 0xFFF).collect();
        assert!(low.len() > 2048, "{} distinct bucket indexes of 4096", low.len());
    }
}
