//! Per-worker cache of verified tokens, never serving an entry at or past its `exp`.
//!
//! An entry is found by the SHA-256 of the token's signing input (`HEADER.PAYLOAD`, the
//! digest [`Hashed`] computes once per request, which RS256/PS256/ES256 verification reuses)
//! and then the signature segment compared byte for byte. Two tokens share an entry only if
//! their signing inputs collide under SHA-256 and their signatures are identical: a token
//! is identified as a whole, as by the SHA-256 of the whole token, with one hash per
//! request instead of two or three. The cache holds signatures, never a whole token.
//!
//! The entry records which provider and which key verified the token: a lookup through
//! [`TokenCache::get_checked`] drops an entry whose key left the provider's key set.
//! The entry records which provider verified the token; callers whose
//! candidate providers differ per location must check `Verified::provider`
//! against the location's list (and the audience) on a hit.

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

use crate::token::{Hashed, Verified};

struct Entry {
    /// The signature segment (base64url text) of the cached token; `None`: it had no `.`.
    signature: Option<Box<[u8]>>,
    verified: Arc<Verified>,
}

pub struct TokenCache {
    /// `None` when disabled (capacity 0).
    lru: Option<LruCache<[u8; 32], Entry>>,
}

impl TokenCache {
    /// A cache of at most `capacity` entries; 0 disables it.
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache {
            lru: NonZeroUsize::new(capacity).map(LruCache::new),
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
        if !valid {
            if let (Some(lru), Some(k)) = (self.lru.as_mut(), token.signing_input_sha256()) {
                lru.pop(k);
            }
            return None;
        }
        self.lru
            .as_mut()?
            .peek(token.signing_input_sha256()?)
            .map(|e| &e.verified)
    }

    /// Remember a verified token (the least recently used entry goes when full).
    pub fn put(&mut self, token: &[u8], v: Arc<Verified>) {
        self.insert(&Hashed::new(token), v)
    }

    /// [`TokenCache::get`] for a token hashed once ([`Hashed::new`]); borrows the entry
    /// (clone the `Arc` to keep it past the next call).
    pub fn lookup(&mut self, token: &Hashed, now: u64) -> Option<&Arc<Verified>> {
        let lru = self.lru.as_mut()?;
        let k = token.signing_input_sha256()?;
        let expired = {
            let hit = lru.get(k)?;
            if hit.signature.as_deref() != token.signature() {
                return None;
            }
            now >= hit.verified.exp
        };
        if expired {
            lru.pop(k);
            return None;
        }
        lru.peek(k).map(|e| &e.verified)
    }

    /// [`TokenCache::put`] for a token hashed once. A token over the size limit (which
    /// never verifies) is not kept.
    pub fn insert(&mut self, token: &Hashed, v: Arc<Verified>) {
        let (Some(lru), Some(k)) = (self.lru.as_mut(), token.signing_input_sha256()) else {
            return;
        };
        lru.put(
            *k,
            Entry {
                signature: token.signature().map(Box::from),
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
