//! The per-worker cache of verified tokens.

use std::sync::Arc;

use mesh_core::cache::TokenCache;
use mesh_core::token::Verified;

fn verified(principal: &str, exp: u64) -> Arc<Verified> {
    Arc::new(Verified {
        provider: "p".into(),
        principal: principal.into(),
        claims: serde_json::Map::new(),
        claims_json: "{}".into(),
        claims_b64: "e30".into(),
        audiences: vec![],
        exp,
        iss: String::new(),
        key: None,
    })
}

#[test]
fn hit_and_miss() {
    let mut c = TokenCache::new(8);
    assert!(c.get(b"t1", 100).is_none());
    c.put(b"t1", verified("a", 200));
    assert_eq!(c.get(b"t1", 100).unwrap().principal, "a");
    assert!(c.get(b"t2", 100).is_none());
    assert!(c.get(b"t1 ", 100).is_none());
    assert_eq!(c.len(), 1);
    // Replacing an entry.
    c.put(b"t1", verified("b", 200));
    assert_eq!(c.get(b"t1", 100).unwrap().principal, "b");
    assert_eq!(c.len(), 1);
}

#[test]
fn never_served_at_or_past_exp() {
    let mut c = TokenCache::new(8);
    c.put(b"t", verified("a", 200));
    assert!(c.get(b"t", 199).is_some());
    assert!(c.get(b"t", 200).is_none());
    assert_eq!(c.len(), 0, "the expired entry is removed");
    assert!(c.get(b"t", 199).is_none());
    c.put(b"u", verified("a", 200));
    assert!(c.get(b"u", 5000).is_none());
    assert!(c.is_empty());
}

#[test]
fn capacity_evicts_least_recently_used() {
    let mut c = TokenCache::new(2);
    c.put(b"a", verified("a", 1000));
    c.put(b"b", verified("b", 1000));
    assert!(c.get(b"a", 1).is_some()); // a is now the most recent
    c.put(b"c", verified("c", 1000));
    assert_eq!(c.len(), 2);
    assert!(c.get(b"b", 1).is_none());
    assert!(c.get(b"a", 1).is_some());
    assert!(c.get(b"c", 1).is_some());
    c.clear();
    assert!(c.is_empty());
}

#[test]
fn disabled() {
    let mut c = TokenCache::new(0);
    c.put(b"a", verified("a", 1000));
    assert!(c.get(b"a", 1).is_none());
    assert_eq!(c.len(), 0);
}

#[test]
fn an_entry_whose_key_left_the_set_is_dropped() {
    let mut c = TokenCache::new(8);
    c.put(b"t", verified("a", 200));
    assert!(c.get_checked(b"t", 100, |_| true).is_some());
    assert!(c.get_checked(b"t", 100, |_| false).is_none());
    assert_eq!(c.len(), 0, "the entry is removed, not only skipped");
    assert!(c.get(b"t", 100).is_none());
}
