//! Per-worker cache of verified tokens, keyed by the SHA-256 of the token (so
//! the cache holds no token), never serving an entry at or past its `exp`.
//!
//! The entry records which provider verified the token; callers whose
//! candidate providers differ per location must check `Verified::provider`
//! against the location's list (and the audience) on a hit.

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;
use sha2::{Digest, Sha256};

use crate::token::Verified;

pub struct TokenCache {
    /// `None` when disabled (capacity 0).
    lru: Option<LruCache<[u8; 32], Arc<Verified>>>,
}

fn key(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl TokenCache {
    /// A cache of at most `capacity` entries; 0 disables it.
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache {
            lru: NonZeroUsize::new(capacity).map(LruCache::new),
        }
    }

    /// The cached verification of `token`, if any and still valid at `now`
    /// (an entry with `now >= exp` is removed).
    pub fn get(&mut self, token: &[u8], now: u64) -> Option<Arc<Verified>> {
        let lru = self.lru.as_mut()?;
        let k = key(token);
        let hit = lru.get(&k)?;
        if now >= hit.exp {
            lru.pop(&k);
            return None;
        }
        Some(Arc::clone(hit))
    }

    /// Remember a verified token (the least recently used entry goes when full).
    pub fn put(&mut self, token: &[u8], v: Arc<Verified>) {
        if let Some(lru) = self.lru.as_mut() {
            lru.put(key(token), v);
        }
    }

    pub fn len(&self) -> usize {
        self.lru.as_ref().map_or(0, LruCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drop every entry (e.g. after a key set change).
    pub fn clear(&mut self) {
        if let Some(lru) = self.lru.as_mut() {
            lru.clear();
        }
    }
}
