//! A keyed 64-bit hash that costs one multiplication per 16 bytes (the folded multiply of
//! foldhash and wyhash), for the request path's hash lookups.
//!
//! std's `HashMap` hashes with SipHash-1-3, about 230 instructions for a token's key or a
//! principal (measured with callgrind); this costs about 30. It is not a PRF: it serves
//! where the table's keys are not chosen by clients — entries fixed at configuration time
//! (the rule index), or admitted only after a check a client cannot pass at will (verified
//! tokens, admitted callers) — so a client can make a lookup collide with an entry at most,
//! which costs a compare, never a long chain. The key is drawn once per process.

use std::hash::{BuildHasher, Hasher};

/// The process's random key (from the OS, once).
fn seed() -> &'static [u64; 4] {
    static SEED: std::sync::OnceLock<[u64; 4]> = std::sync::OnceLock::new();
    SEED.get_or_init(|| {
        let s = std::hash::RandomState::new();
        [0u8, 1, 2, 3].map(|i| s.hash_one(i))
    })
}

/// The 128-bit product of `a` and `b`, its halves folded together.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

fn word(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap_or_default())
}

/// The state `h` after absorbing `bytes` (16 bytes a multiplication; the end zero-padded).
fn absorb(k: &[u64; 4], mut h: u64, bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(16);
    for c in &mut chunks {
        h = folded_multiply(word(&c[..8]) ^ k[1] ^ h, word(&c[8..]) ^ k[2]);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 16];
        last[..rest.len()].copy_from_slice(rest);
        h = folded_multiply(word(&last[..8]) ^ k[1] ^ h, word(&last[8..]) ^ k[2]);
    }
    h
}

fn finish(k: &[u64; 4], h: u64) -> u64 {
    folded_multiply(h ^ k[3], k[1] | 1)
}

/// The hash of `tag` (a length, say) and `bytes`.
pub fn hash(tag: u64, bytes: &[u8]) -> u64 {
    let k = seed();
    finish(k, absorb(k, k[0] ^ tag, bytes))
}

/// [`hash`] as a `HashMap` hasher.
#[derive(Clone, Copy, Debug, Default)]
pub struct FastState;

impl BuildHasher for FastState {
    type Hasher = FastHasher;

    fn build_hasher(&self) -> FastHasher {
        FastHasher(seed()[0])
    }
}

pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        // The length too, so that ("ab", "c") and ("a", "bc") differ.
        self.0 = absorb(seed(), self.0 ^ bytes.len() as u64, bytes);
    }

    fn write_u64(&mut self, v: u64) {
        let k = seed();
        self.0 = folded_multiply(self.0 ^ v ^ k[1], k[2]);
    }

    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }

    fn finish(&self) -> u64 {
        finish(seed(), self.0)
    }
}

/// A `HashMap` under [`FastState`].
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastState>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_inputs_equal_hashes_and_others_spread() {
        assert_eq!(hash(3, b"abc"), hash(3, b"abc"));
        assert_ne!(hash(3, b"abc"), hash(4, b"abc"));
        // Zero padding does not make a shorter input equal a longer one (the tag differs).
        assert_ne!(hash(3, b"abc"), hash(4, b"abc\0"));
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000u32 {
            // Low bits pick the bucket: they must differ too.
            seen.insert(hash(32, format!("svc-{i}@example.com").as_bytes()) & 0xfffff);
        }
        assert!(seen.len() > 9_900, "{} distinct of 10 000", seen.len());
    }

    #[test]
    fn a_map_finds_what_it_holds() {
        let mut m: FastMap<String, usize> = FastMap::default();
        for i in 0..1000 {
            m.insert(format!("caller-{i}"), i);
        }
        assert!((0..1000).all(|i| m.get(format!("caller-{i}").as_str()) == Some(&i)));
        assert_eq!(m.get("caller-1000"), None);
    }
}
