//! The shared-memory rate table: plain slots, set-associative buckets,
//! eviction of expired, then longest-idle keys.

use mesh_core::gcra::{parse_rate, Gcra};
use mesh_core::ratetable::{check, key_hash, Slot, Stats, WAYS};

const MS: u64 = 1_000;
const SEC: u64 = 1_000_000;
const T0: u64 = 1_700_000_000 * SEC;

fn gcra(rate: &str, burst: u64) -> Gcra {
    Gcra::new(parse_rate(rate).unwrap(), burst)
}

fn key(n: u64) -> [u64; 2] {
    key_hash(b"zone", &n.to_le_bytes())
}

/// How many of `n` requests at `now` pass.
fn burst_at(slots: &mut [Slot], k: [u64; 2], g: &Gcra, now: u64, n: usize) -> usize {
    (0..n)
        .filter(|_| check(slots, k, g, now, now, false).0.allowed)
        .count()
}

#[test]
fn hashes() {
    let a = key_hash(b"zone", b"checkout@shop.com");
    assert_eq!(a, key_hash(b"zone", b"checkout@shop.com"));
    assert_ne!(a, key_hash(b"zone2", b"checkout@shop.com"));
    assert_ne!(a, key_hash(b"zone", b"checkout@shop.co"));
    // The salt is length-prefixed: no ambiguity between salt and key.
    assert_ne!(key_hash(b"ab", b"c"), key_hash(b"a", b"bc"));
    assert_ne!(key_hash(b"", b""), [0, 0]);
    let distinct: std::collections::HashSet<[u64; 2]> = (0..10_000).map(key).collect();
    assert_eq!(distinct.len(), 10_000);
}

#[test]
fn zero_filled_is_empty() {
    let mut slots = [Slot::default(); 64];
    assert!(slots
        .iter()
        .all(|s| s.key == [0, 0] && s.tat == 0 && s.last == 0 && s.is_empty()));
    assert_eq!(std::mem::size_of::<Slot>(), 32);
    assert_eq!(Stats::default().evictions, 0);
    let g = gcra("10r/s", 5);
    assert_eq!(burst_at(&mut slots, key(1), &g, T0, 10), 6);
    let used: Vec<&Slot> = slots.iter().filter(|s| !s.is_empty()).collect();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].key, key(1));
    assert_eq!(used[0].tat, T0 + 600 * MS);
    assert_eq!(used[0].last, T0);
}

#[test]
fn per_key_state() {
    let mut slots = [Slot::default(); 64];
    let g = gcra("10r/s", 5);
    assert_eq!(burst_at(&mut slots, key(1), &g, T0, 10), 6);
    assert_eq!(burst_at(&mut slots, key(2), &g, T0, 10), 6);
    let (o, evicted) = check(&mut slots, key(1), &g, T0 + 100 * MS, T0 + 100 * MS, false);
    assert!(o.allowed && !evicted);
    let (o, _) = check(&mut slots, key(1), &g, T0 + 100 * MS, T0 + 100 * MS, false);
    assert!(!o.allowed);
    assert_eq!(o.retry_after_us, 100 * MS);
}

#[test]
fn no_slots_and_tiny_tables() {
    let g = gcra("1r/m", 0);
    let mut none: [Slot; 0] = [];
    for _ in 0..5 {
        let (o, evicted) = check(&mut none, key(1), &g, T0, T0, false);
        assert!(o.allowed && !evicted);
    }
    // Fewer slots than WAYS: one bucket of that many.
    let mut three = [Slot::default(); 3];
    for k in 0..3 {
        assert_eq!(burst_at(&mut three, key(k), &g, T0, 2), 1);
    }
    assert!(three.iter().all(|s| !s.is_empty()));
    // A fourth key evicts the longest idle (key 0, used first).
    let (o, evicted) = check(&mut three, key(3), &g, T0 + SEC, T0 + SEC, false);
    assert!(o.allowed && evicted);
    assert!(!three.iter().any(|s| s.key == key(0)));
    // Key 0 comes back with no state: allowed again, evicting key 1.
    let (o, evicted) = check(&mut three, key(0), &g, T0 + 2 * SEC, T0 + 2 * SEC, false);
    assert!(o.allowed && evicted);
    assert!(!three.iter().any(|s| s.key == key(1)));
}

#[test]
fn many_keys_tiny_table() {
    let mut slots = [Slot::default(); 64];
    let g = gcra("10r/s", 3);
    let mut stats = Stats::default();
    for n in 0..100_000u64 {
        let now = T0 + n; // 1 µs apart: every key still owes when evicted
        let k = key(n);
        for i in 0..4 {
            let (o, evicted) = check(&mut slots, k, &g, now, now, false);
            assert!(o.allowed, "key {n} request {i}");
            if evicted {
                assert_eq!(i, 0);
                stats.evictions += 1;
            }
        }
        let (o, _) = check(&mut slots, k, &g, now, now, false);
        assert!(!o.allowed, "key {n}: burst exceeded");
    }
    assert!(slots.iter().all(|s| !s.is_empty()));
    assert_eq!(stats.evictions, 100_000 - 64);
}

#[test]
fn hot_key_survives_churn() {
    // One bucket: the hot key competes with every cold key.
    let mut slots = [Slot::default(); WAYS];
    let g = gcra("1r/s", 9);
    let hot = key_hash(b"zone", b"hot");
    let mut now = T0;
    let mut hot_allowed = 0;
    for n in 0..10_000u64 {
        now += MS;
        // Cold keys: seen once, never again (each still owes: tat > now).
        let (o, _) = check(&mut slots, key(n), &g, now, now, false);
        assert!(o.allowed);
        if n % 4 == 0 {
            if check(&mut slots, hot, &g, now, now, false).0.allowed {
                hot_allowed += 1;
            }
            assert!(slots.iter().any(|s| s.key == hot));
        }
    }
    // Over ~10 s (first hit at 1 ms, last at 9997 ms) at 1r/s with burst 9:
    // 10 at once, then one per second (at 1 s .. 9 s). Had the hot key been
    // evicted, it would have got a fresh burst.
    assert_eq!(hot_allowed, 19);
}

#[test]
fn expired_slots_preferred() {
    let mut slots = [Slot::default(); WAYS];
    let g_fast = gcra("10r/s", 0); // tat = now + 100 ms
    let g_slow = gcra("1r/m", 0); // tat = now + 60 s
                                  // Slot 0: the longest idle, but with live state for a minute.
    check(&mut slots, key(0), &g_slow, T0, T0, false);
    // Slots 1..8: more recent, expiring after 100 ms.
    for k in 1..WAYS as u64 {
        check(&mut slots, key(k), &g_fast, T0 + k * MS, T0 + k * MS, false);
    }
    assert!(slots.iter().all(|s| !s.is_empty()));
    // 1 s later the fast keys' state has run out: one of them is reused, not key 0.
    let (o, evicted) = check(&mut slots, key(100), &g_fast, T0 + SEC, T0 + SEC, false);
    assert!(o.allowed);
    assert!(!evicted, "reusing an expired slot loses nothing");
    assert!(slots.iter().any(|s| s.key == key(0)));
    assert!(slots.iter().any(|s| s.key == key(100)));
    // Key 0 still owes: refused.
    let (o, _) = check(&mut slots, key(0), &g_slow, T0 + SEC, T0 + SEC, false);
    assert!(!o.allowed);
    assert_eq!(o.retry_after_us, 59 * SEC);

    // With nothing expired, the longest idle goes (key 0 was just used, so
    // it is now the most recent).
    let mut slots = [Slot::default(); WAYS];
    for k in 0..WAYS as u64 {
        check(&mut slots, key(k), &g_slow, T0 + k * MS, T0 + k * MS, false);
    }
    check(&mut slots, key(0), &g_slow, T0 + SEC, T0 + SEC, false);
    let (_, evicted) = check(
        &mut slots,
        key(50),
        &g_slow,
        T0 + 2 * SEC,
        T0 + 2 * SEC,
        false,
    );
    assert!(evicted);
    assert!(slots.iter().any(|s| s.key == key(0)));
    assert!(!slots.iter().any(|s| s.key == key(1)));
}

#[test]
fn dry_run_does_not_advance_on_refusal() {
    let g = gcra("10r/s", 2);
    let mut slots = [Slot::default(); 16];
    let k = key(7);
    // Dry run accounts like enforcement: 3 pass, then refusals...
    for i in 0..3 {
        assert!(check(&mut slots, k, &g, T0, T0, true).0.allowed, "{i}");
    }
    let tat = slots.iter().find(|s| s.key == k).unwrap().tat;
    assert_eq!(tat, T0 + 300 * MS);
    for _ in 0..100 {
        let (o, _) = check(&mut slots, k, &g, T0 + 10 * MS, T0 + 10 * MS, true);
        assert!(!o.allowed, "would_rate_limit");
        assert_eq!(o.retry_after_us, 90 * MS);
    }
    // ...which leave the state as it was: one passes 100 ms later.
    let s = slots.iter().find(|s| s.key == k).unwrap();
    assert_eq!(s.tat, tat);
    assert_eq!(s.last, T0 + 10 * MS);
    assert!(
        check(&mut slots, k, &g, T0 + 100 * MS, T0 + 100 * MS, true)
            .0
            .allowed
    );
    assert!(
        !check(&mut slots, k, &g, T0 + 100 * MS, T0 + 100 * MS, true)
            .0
            .allowed
    );
    // The same sequence with and without dry run: same answers, same state.
    let seq = [0, 0, 0, 10, 10, 100, 100, 250, 250, 250, 900];
    let mut dry = [Slot::default(); 16];
    let mut real = [Slot::default(); 16];
    for &dt in &seq {
        let a = check(&mut real, k, &g, T0 + dt * MS, T0 + dt * MS, false).0;
        let b = check(&mut dry, k, &g, T0 + dt * MS, T0 + dt * MS, true).0;
        assert_eq!(a, b);
    }
    assert_eq!(real, dry);
}

#[test]
fn clock_backwards_in_table() {
    let g = gcra("10r/s", 5);
    let mut slots = [Slot::default(); 8];
    let k = key(1);
    assert_eq!(burst_at(&mut slots, k, &g, T0, 6), 6);
    let back = T0 - 3600 * SEC;
    assert!(!check(&mut slots, k, &g, back, back, false).0.allowed);
    // Not locked out for the hour: one interval.
    assert!(
        check(&mut slots, k, &g, back + 100 * MS, back + 100 * MS, false)
            .0
            .allowed
    );
    // Extreme times do not panic.
    for now in [0, 1, u64::MAX - 1, u64::MAX, 0] {
        for n in 0..20 {
            let _ = check(&mut slots, key(n), &g, now, now, false);
        }
    }
    // The reserved empty key is never stored as such.
    let (o, _) = check(&mut slots, [0, 0], &g, T0, T0, false);
    assert!(o.allowed);
    assert!(slots.iter().any(|s| s.key == [0, 1]));
}

#[test]
fn a_busy_key_survives_churn_while_the_clock_stands_still() {
    // nginx's cached clock does not move during a batch of requests: eviction must still
    // tell the busy key (used recently, by sequence) from the churning cold ones.
    let g = Gcra::new(parse_rate("1r/m").unwrap(), 2);
    // 128 buckets: between two uses of the busy key, its bucket sees ~0.2 new keys, so only
    // a wrong eviction order (not the table's size) can push it out.
    let mut slots = vec![Slot::default(); 1024];
    let hot = key(1_000_000);
    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq
    };
    for _ in 0..3 {
        assert!(check(&mut slots, hot, &g, T0, next(), false).0.allowed);
    }
    let mut leaked = 0;
    for n in 0..100_000u64 {
        let _ = check(&mut slots, key(n), &g, T0, next(), false);
        if n % 25 == 0 && check(&mut slots, hot, &g, T0, next(), false).0.allowed {
            leaked += 1;
        }
    }
    assert_eq!(leaked, 0, "the busy key was evicted and its budget reset");
}

#[test]
fn placement_depends_on_the_secret() {
    use mesh_core::ratetable::placed;
    let id = key_hash(b"zone", b"caller:victim");
    let a = placed([1, 2], id);
    assert_eq!(a, placed([1, 2], id));
    assert_ne!(a, placed([1, 3], id));
    assert_ne!(a, id);
    // Keys that share a bucket under one secret are spread under another: of 64 keys
    // colliding with the victim in a 512-bucket table under secret A, about 64/512 still do
    // under secret B.
    let buckets = 512u64;
    let colliding: Vec<[u64; 2]> = (0u32..)
        .map(|i| key_hash(b"zone", format!("caller:attacker-{i}").as_bytes()))
        .filter(|k| placed([1, 2], *k)[0] % buckets == a[0] % buckets)
        .take(64)
        .collect();
    let b = placed([7, 9], id);
    let still = colliding
        .iter()
        .filter(|k| placed([7, 9], **k)[0] % buckets == b[0] % buckets)
        .count();
    assert!(still <= 4, "{still} of 64 still collide");
}
