//! Per-worker cache of verified tokens, never serving an entry at or past its `exp`.
//!
//! An entry is found by [`Hashed::cache_key`] (a keyed hash of the token's length and
//! signature end, computed once per request) and served only if its token equals the
//! request's byte for byte: two
//! tokens share an entry only if they are the same token. A hash collision (chance, since
//! the key is random per process) costs a miss and a verification, never a token that was
//! not verified. A hit computes no SHA-256; a miss computes the one RS256/PS256/ES256
//! verification needs ([`Hashed`]).
//!
//! The entry records which provider and which key verified the token: a lookup through
//! [`TokenCache::get_checked`] drops an entry whose key left the provider's key set.
//! Callers whose candidate providers differ per location must check `Verified::provider`
//! against the location's list (and the audience) on a hit.

use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

use crate::token::{Hashed, Verified};

struct Entry {
    /// The whole token, compared on every hit.
    token: Box<[u8]>,
    verified: Arc<Verified>,
}

/// The map's hasher: the key already is a keyed hash of the token, so it is used as is.
#[derive(Default)]
struct KeyIsHash(u64);

impl Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed; this is never reached, but stays a correct hash.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type Lru = LruCache<u64, Entry, BuildHasherDefault<KeyIsHash>>;

pub struct TokenCache {
    /// `None` when disabled (capacity 0).
    lru: Option<Lru>,
}

impl TokenCache {
    /// A cache of at most `capacity` entries; 0 disables it.
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache {
            lru: NonZeroUsize::new(capacity).map(|c| LruCache::with_hasher(c, Default::default())),
        }
    }

    /// The cached verification of `token`, if any and still valid at `now`
    /// (an entry with `now >= exp` is removed). Hashes the token: on the request path use
    /// [`TokenCache::lookup`] with the [`Hashed`] that verification reuses.
    pub fn get(&mut self, token: &[u8], now: u64) -> Option<Arc<Verified>> {
        self.lookup(&Hashed::new(token), now).cloned()
    }

    /// [`TokenCache::get`], but an entry for which `still_valid` is false is removed and not
    /// served: the shell passes "the provider's current keys still hold the key that verified
    /// it" ([`Verified::key_still_held`]), so a key withdrawn from a key set stops its cached
    /// tokens at once, however the new keys arrived.
    pub fn get_checked(
        &mut self,
        token: &[u8],
        now: u64,
        still_valid: impl FnOnce(&Verified) -> bool,
    ) -> Option<Arc<Verified>> {
        self.lookup_checked(&Hashed::new(token), now, still_valid)
            .cloned()
    }

    /// [`TokenCache::get_checked`] for a token hashed once.
    pub fn lookup_checked(
        &mut self,
        token: &Hashed,
        now: u64,
        still_valid: impl FnOnce(&Verified) -> bool,
    ) -> Option<&Arc<Verified>> {
        let valid = still_valid(self.lookup(token, now)?);
        let (lru, k) = (self.lru.as_mut()?, token.cache_key()?);
        if !valid {
            lru.pop(&k);
            return None;
        }
        lru.peek(&k).map(|e| &e.verified)
    }

    /// Remember a verified token (the least recently used entry goes when full).
    pub fn put(&mut self, token: &[u8], v: Arc<Verified>) {
        self.insert(&Hashed::new(token), v)
    }

    /// [`TokenCache::get`] for a token hashed once ([`Hashed::new`]); borrows the entry
    /// (clone the `Arc` to keep it past the next call).
    pub fn lookup(&mut self, token: &Hashed, now: u64) -> Option<&Arc<Verified>> {
        let lru = self.lru.as_mut()?;
        let k = token.cache_key()?;
        let expired = {
            let hit = lru.get(&k)?;
            // The whole token, byte for byte: a key collision is a miss.
            if *hit.token != *token.token() {
                return None;
            }
            now >= hit.verified.exp
        };
        if expired {
            lru.pop(&k);
            return None;
        }
        lru.peek(&k).map(|e| &e.verified)
    }

    /// [`TokenCache::put`] for a token hashed once. A token over the size limit (which
    /// never verifies) is not kept. An entry of another token under the same key (a
    /// collision) is replaced.
    pub fn insert(&mut self, token: &Hashed, v: Arc<Verified>) {
        let (Some(lru), Some(k)) = (self.lru.as_mut(), token.cache_key()) else {
            return;
        };
        lru.put(
            k,
            Entry {
                token: Box::from(token.token()),
                verified: v,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.lru.as_ref().map_or(0, LruCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most entries it keeps (0: disabled).
    pub fn capacity(&self) -> usize {
        self.lru.as_ref().map_or(0, |l| l.cap().get())
    }

    /// Drop every entry (e.g. after a key set change).
    pub fn clear(&mut self) {
        if let Some(lru) = self.lru.as_mut() {
            lru.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(principal: &str) -> Arc<Verified> {
        Arc::new(Verified {
            provider: "p".into(),
            principal: principal.into(),
            claims: serde_json::Map::new(),
            claims_json: "{}".into(),
            claims_b64: "e30".into(),
            audiences: vec![],
            exp: 1000,
            iss: String::new(),
            key: None,
        })
    }

    /// Two different tokens under one key (a collision): neither is ever served the other's
    /// verification; the second one inserted replaces the first.
    #[test]
    fn a_key_collision_is_a_miss_never_a_pass() {
        let (a, b) = (&b"h.pa.sa"[..], &b"h.pb.sb"[..]);
        let mut c = TokenCache::new(8);
        c.insert(&Hashed::with_cache_key(a, 7), verified("alice"));
        // `b` was never verified: it collides with `a`, and is not let through.
        assert!(c.lookup(&Hashed::with_cache_key(b, 7), 1).is_none());
        assert!(c
            .lookup_checked(&Hashed::with_cache_key(b, 7), 1, |_| true)
            .is_none());
        // The miss left `a`'s entry alone.
        let hit = c
            .lookup(&Hashed::with_cache_key(a, 7), 1)
            .map(|v| v.principal.clone());
        assert_eq!(hit.as_deref(), Some("alice"));
        // `b` verified in turn takes the slot: now `a` misses, `b` hits with its own.
        c.insert(&Hashed::with_cache_key(b, 7), verified("bob"));
        assert!(c.lookup(&Hashed::with_cache_key(a, 7), 1).is_none());
        let hit = c
            .lookup(&Hashed::with_cache_key(b, 7), 1)
            .map(|v| v.principal.clone());
        assert_eq!(hit.as_deref(), Some("bob"));
        assert_eq!(c.len(), 1);
    }

    /// A token that is a prefix or an extension of a cached one, or differs in one byte
    /// anywhere, is another token, whatever its key.
    #[test]
    fn the_whole_token_is_compared() {
        let t = &b"hdr.payload.signature"[..];
        let mut c = TokenCache::new(8);
        c.insert(&Hashed::with_cache_key(t, 1), verified("alice"));
        for other in [
            &b"hdr.payload.signatur"[..],
            b"hdr.payload.signaturee",
            b"hdr.payload",
            b"Hdr.payload.signature",
            b"hdr.paylOad.signature",
            b"",
        ] {
            assert!(c.lookup(&Hashed::with_cache_key(other, 1), 1).is_none());
        }
        assert!(c.lookup(&Hashed::with_cache_key(t, 1), 1).is_some());
    }

    /// Within a process the key of a token does not change (two requests, one entry), and
    /// different tokens almost never share one.
    #[test]
    fn keys_are_stable_and_spread() {
        let t = b"a.b.c";
        assert_eq!(Hashed::new(t).cache_key(), Hashed::new(t).cache_key());
        let keys: std::collections::HashSet<u64> = (0..10_000u32)
            .filter_map(|i| Hashed::new(format!("h.p{i}.s").as_bytes()).cache_key())
            .collect();
        assert_eq!(keys.len(), 10_000);
        let mut c = TokenCache::new(8);
        c.put(t, verified("alice"));
        assert!(c.get(t, 1).is_some());
    }
}
