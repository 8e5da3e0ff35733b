//! Fixed-size per-key rate state, for nginx shared memory.
//!
//! The nginx shell places a `[Slot]` array in a shared memory zone (seen by
//! all workers), takes the zone's mutex, and calls [`check`] on the slice.
//! A [`Slot`] is plain data: `#[repr(C)]`, `Copy`, no pointers, and all
//! zeros is an empty slot, so a zero-filled zone is a valid empty table.
//!
//! The table is set-associative: a key lives in one bucket of [`WAYS`]
//! slots, chosen by its hash. When the bucket is full, a slot whose state has
//! run out (its TAT is not after `now`, so dropping it loses nothing) is
//! reused first, then the longest-idle one is evicted.

use sha2::{Digest, Sha256};

use crate::gcra::{Gcra, Outcome};

/// One key's state: 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Slot {
    /// 128-bit hash of the key ([`key_hash`]); `[0, 0]` = empty.
    pub key: [u64; 2],
    /// The GCRA theoretical arrival time, µs.
    pub tat: u64,
    /// Last use, µs.
    /// When the key was last used, as the zone's request sequence number (not a time:
    /// nginx's cached clock stands still across a batch of requests, and ties would let
    /// eviction pick a busy key).
    pub last: u64,
}

impl Slot {
    pub fn is_empty(&self) -> bool {
        self.key == EMPTY
    }
}

/// Slots per bucket.
pub const WAYS: usize = 8;

const EMPTY: [u64; 2] = [0, 0];

/// Counters the shell may keep next to the slots (plain data too).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Live keys evicted to make room (the `bool` of [`check`]).
    pub evictions: u64,
    /// Slots holding a key (live or run out): what [`check_counted`] counts.
    pub keys: u64,
}

/// The 128-bit key of `key` in a zone: the first 16 bytes of
/// SHA-256(len(salt) as u64 LE, salt, key), as two little-endian `u64`s;
/// never `[0, 0]` (which marks an empty slot; mapped to `[0, 1]`).
pub fn key_hash(zone_salt: &[u8], key: &[u8]) -> [u64; 2] {
    key_hash_parts(zone_salt, &[key])
}

/// [`key_hash`] of the concatenation of `parts` (e.g. `[b"caller:", principal]`), without
/// building it: the same value, nothing allocated.
pub fn key_hash_parts(zone_salt: &[u8], parts: &[&[u8]]) -> [u64; 2] {
    let mut h = Sha256::new();
    h.update((zone_salt.len() as u64).to_le_bytes());
    h.update(zone_salt);
    for part in parts {
        h.update(part);
    }
    let d = h.finalize();
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&d[0..8]);
    b.copy_from_slice(&d[8..16]);
    nonzero([u64::from_le_bytes(a), u64::from_le_bytes(b)])
}

/// The last [`key_hash_parts`] input and its value: a worker's consecutive requests mostly
/// come from one caller, whose key then costs a compare of its bytes instead of a SHA-256.
/// The whole input (salt included) is compared, so the value is always the one
/// [`key_hash_parts`] gives.
#[derive(Default)]
pub struct KeyMemo {
    input: Vec<u8>,
    identity: [u64; 2],
}

impl KeyMemo {
    /// [`key_hash_parts`]`(zone_salt, parts)`.
    pub fn key_hash_parts(&mut self, zone_salt: &[u8], parts: &[&[u8]]) -> [u64; 2] {
        let salt_len = (zone_salt.len() as u64).to_le_bytes();
        let pieces = || {
            [&salt_len[..], zone_salt]
                .into_iter()
                .chain(parts.iter().copied())
        };
        let len: usize = pieces().map(<[u8]>::len).sum();
        if len == self.input.len() && !self.input.is_empty() {
            let mut rest = &self.input[..];
            let same = pieces().all(|p| {
                let (head, tail) = rest.split_at(p.len());
                rest = tail;
                head == p
            });
            if same {
                return self.identity;
            }
        }
        self.identity = key_hash_parts(zone_salt, parts);
        self.input.clear();
        // Kept only while small: a long key (a header value) is hashed each time.
        if len <= 256 {
            pieces().for_each(|p| self.input.extend_from_slice(p));
        }
        self.identity
    }
}

/// Where a key lives in a zone's table: its identity ([`key_hash`], the same on every
/// instance, so global zones agree on it in Redis) hashed again under the zone's secret
/// (random, kept in the zone) with SipHash-2-4, a keyed hash built for this (a few hundred
/// instructions, where a second SHA-256 cost 3 500 per request). Without the secret, nobody
/// can tell which keys share a bucket, so a chosen caller cannot be evicted by sending
/// colliding keys: the bucket of each key is a 1-in-`buckets` draw the attacker cannot see.
pub fn placed(secret: [u64; 2], identity: [u64; 2]) -> [u64; 2] {
    let mut m = [0u8; 17];
    m[..8].copy_from_slice(&identity[0].to_le_bytes());
    m[8..16].copy_from_slice(&identity[1].to_le_bytes());
    let a = siphash24(secret, &m);
    m[16] = 1;
    nonzero([a, siphash24(secret, &m)])
}

/// SipHash-2-4 (Aumasson and Bernstein) of `m` under the 128-bit key `k` (`k[0]` the first
/// eight key bytes, little-endian).
fn siphash24(k: [u64; 2], m: &[u8]) -> u64 {
    let mut v = [
        k[0] ^ 0x736f_6d65_7073_6575,
        k[1] ^ 0x646f_7261_6e64_6f6d,
        k[0] ^ 0x6c79_6765_6e65_7261,
        k[1] ^ 0x7465_6462_7974_6573,
    ];
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    let mut chunks = m.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        v[3] ^= w;
        round(&mut v);
        round(&mut v);
        v[0] ^= w;
    }
    let mut last = [0u8; 8];
    let rest = chunks.remainder();
    last[..rest.len()].copy_from_slice(rest);
    last[7] = m.len() as u8;
    let w = u64::from_le_bytes(last);
    v[3] ^= w;
    round(&mut v);
    round(&mut v);
    v[0] ^= w;
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

fn nonzero(key: [u64; 2]) -> [u64; 2] {
    if key == EMPTY {
        [0, 1]
    } else {
        key
    }
}

/// The bucket of `key`: `slots.len() / WAYS` buckets of `WAYS` slots (the
/// `len % WAYS` slots at the end are unused); fewer than `WAYS` slots make
/// one bucket.
fn bucket(slots: &mut [Slot], key: [u64; 2]) -> &mut [Slot] {
    let nbuckets = slots.len() / WAYS;
    if nbuckets == 0 {
        return slots;
    }
    // The remainder is < nbuckets, which is a usize.
    let b = (key[0] % nbuckets as u64) as usize;
    &mut slots[b * WAYS..(b + 1) * WAYS]
}

/// Which slot of the bucket serves `key` at `now`: its own; else an empty
/// one; else one whose state has run out (`tat <= now`); else the one idle
/// the longest (smallest `last`, a sequence number). `None` only for an empty bucket.
fn pick(bucket: &[Slot], key: [u64; 2], now: u64) -> Option<usize> {
    bucket
        .iter()
        .position(|s| s.key == key)
        .or_else(|| bucket.iter().position(Slot::is_empty))
        .or_else(|| bucket.iter().position(|s| s.tat <= now))
        .or_else(|| {
            bucket
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.last)
                .map(|(i, _)| i)
        })
}

/// Check one request for `key` at `now` against the table, and record it. `seq` orders uses
/// for eviction: the caller increments it for every call on the same table (under the
/// table's lock).
///
/// Returns the outcome and whether a key with live state (`tat > now`) was
/// evicted for this one. An allowed request stores its new TAT; a refused
/// one leaves the TAT as it was. `last` and the key are always updated.
/// With no slots, every request is allowed and nothing is kept.
///
/// `dry_run` does not change the accounting, as nginx's
/// `limit_req_dry_run`: allowed requests advance the TAT, refused ones
/// (which the shell lets through and reports as `would_rate_limit`) do not,
/// so the dry run refuses exactly what enforcement would.
pub fn check(
    slots: &mut [Slot],
    key: [u64; 2],
    gcra: &Gcra,
    now: u64,
    seq: u64,
    dry_run: bool,
) -> (Outcome, bool) {
    let mut stats = Stats::default();
    let outcome = check_counted(slots, key, gcra, now, seq, dry_run, &mut stats);
    (outcome, stats.evictions > 0)
}

/// [`check`], counting into `stats` (kept next to the slots, under the same lock): an
/// eviction of a live key, and a key taking an empty slot (slots are never emptied again, so
/// `stats.keys` is the number of slots in use).
pub fn check_counted(
    slots: &mut [Slot],
    key: [u64; 2],
    gcra: &Gcra,
    now: u64,
    seq: u64,
    dry_run: bool,
    stats: &mut Stats,
) -> Outcome {
    check_at(slots, key, gcra, now, seq, dry_run, stats, 0).0
}

/// [`check_counted`] for a key that may owe `debt_us` beyond its burst (see
/// [`Gcra::check_owing`]), also returning the index of the key's slot (`None`: no slots).
#[allow(clippy::too_many_arguments)]
pub fn check_at(
    slots: &mut [Slot],
    key: [u64; 2],
    gcra: &Gcra,
    now: u64,
    seq: u64,
    dry_run: bool,
    stats: &mut Stats,
    debt_us: u64,
) -> (Outcome, Option<usize>) {
    let _ = dry_run;
    let key = nonzero(key);
    let base = bucket_start(slots.len(), key);
    let bucket = bucket(slots, key);
    let Some(i) = pick(bucket, key, now) else {
        return (gcra.check_owing(0, now, debt_us), None);
    };
    let slot = &mut bucket[i];
    if slot.is_empty() {
        stats.keys += 1;
    }
    let (tat, evicted) = if slot.key == key {
        (slot.tat, false)
    } else {
        (0, !slot.is_empty() && slot.tat > now)
    };
    let outcome = gcra.check_owing(tat, now, debt_us);
    // Refused: `new_tat` is `tat` (or, after a clock step back, lower), so
    // storing it never advances the state.
    slot.tat = outcome.new_tat;
    slot.key = key;
    slot.last = seq;
    if evicted {
        stats.evictions += 1;
    }
    (outcome, Some(base + i))
}

/// Index of the first slot of `key`'s bucket in a table of `len` slots (as [`bucket`]).
fn bucket_start(len: usize, key: [u64; 2]) -> usize {
    let nbuckets = len / WAYS;
    if nbuckets == 0 {
        return 0;
    }
    (key[0] % nbuckets as u64) as usize * WAYS
}

/// Brings `key`'s TAT up to at least `tat` (what other instances consumed, learnt from a
/// global zone's sync). `hint` is where the key was last seen; a key no longer in the table
/// (evicted since) is left alone. Returns whether the key was found.
pub fn raise(slots: &mut [Slot], key: [u64; 2], hint: usize, tat: u64) -> bool {
    let key = nonzero(key);
    let slot = match slots.get(hint) {
        Some(s) if s.key == key => hint,
        _ => match bucket(slots, key).iter().position(|s| s.key == key) {
            Some(i) => bucket_start(slots.len(), key) + i,
            None => return false,
        },
    };
    let s = &mut slots[slot];
    s.tat = s.tat.max(tat);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memo_gives_what_key_hash_parts_gives() {
        let mut m = KeyMemo::default();
        let cases: [(&[u8], &[&[u8]]); 6] = [
            (b"zone", &[b"caller:", b"p", b"\0", b"a@x"]),
            (b"zone", &[b"caller:", b"p", b"\0", b"a@x"]),
            (b"zone", &[b"caller:", b"p", b"\0", b"b@x"]),
            (b"zon", &[b"ecaller:", b"p", b"\0", b"b@x"]),
            (b"zone", &[b"caller:p", b"\0b@x"]),
            (b"zone", &[&[b'k'; 300]]),
        ];
        for _ in 0..2 {
            for (salt, parts) in cases {
                assert_eq!(m.key_hash_parts(salt, parts), key_hash_parts(salt, parts));
            }
        }
    }

    #[test]
    fn siphash24_matches_the_reference_vectors() {
        // The SipHash paper's example: key 00..0f, message 00..0e.
        let k = [
            u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]),
            u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]),
        ];
        let m: Vec<u8> = (0..15).collect();
        assert_eq!(siphash24(k, &m), 0xa129_ca61_49be_45e5);
        // The reference implementation's vectors for the empty and the 8-byte message.
        assert_eq!(siphash24(k, &[]), 0x726f_db47_dd0e_0e31);
        let m: Vec<u8> = (0..8).collect();
        assert_eq!(siphash24(k, &m), 0x93f5_f579_9a93_2462);
    }

    #[test]
    fn key_hash_of_parts_is_that_of_their_concatenation() {
        let salt = b"callers";
        for parts in [
            &[&b"caller:"[..], b"svc@example.com"][..],
            &[b"addr:", b"127.0.0.1"],
            &[b"", b"", b"x"],
            &[],
        ] {
            assert_eq!(key_hash_parts(salt, parts), key_hash(salt, &parts.concat()));
        }
        // The salt's length is hashed: moving bytes between salt and key changes the key.
        assert_ne!(key_hash(b"ab", b"c"), key_hash(b"a", b"bc"));
    }

    #[test]
    fn check_at_names_the_slot_and_raise_charges_it() {
        let g = crate::gcra::Gcra::new(crate::gcra::parse_rate("10r/s").unwrap(), 0);
        let mut slots = [Slot::default(); 32];
        let mut stats = Stats::default();
        let now = 1_000_000;
        let (o, i) = check_at(&mut slots, [5, 9], &g, now, 1, false, &mut stats, 0);
        let i = i.unwrap();
        assert!(o.allowed);
        assert_eq!(slots[i].key, [5, 9]);
        assert_eq!(bucket_start(32, [5, 9]), i / WAYS * WAYS);
        // Others consumed 3 s worth: the key is refused for that long, even past the clamp
        // a plain check applies, as long as the debt allowed covers it.
        assert!(raise(&mut slots, [5, 9], i, now + 3_000_000));
        let (o, _) = check_at(
            &mut slots,
            [5, 9],
            &g,
            now,
            2,
            false,
            &mut stats,
            10_000_000,
        );
        assert!(!o.allowed);
        assert_eq!(o.retry_after_us, 3_000_000);
        // Never lowers a TAT; a wrong hint still finds the key; an absent key is left alone.
        assert!(raise(&mut slots, [5, 9], 0, now));
        assert_eq!(slots[i].tat, now + 3_000_000);
        assert!(!raise(&mut slots, [6, 9], i, now + 1));
        assert!(!raise(&mut [], [6, 9], 3, now + 1));
    }

    #[test]
    fn slot_layout() {
        assert_eq!(std::mem::size_of::<Slot>(), 32);
        assert_eq!(std::mem::align_of::<Slot>(), 8);
        assert!(Slot::default().is_empty());
    }

    #[test]
    fn buckets() {
        let mut slots = [Slot::default(); 20];
        // 2 buckets of 8; slots 16..20 unused.
        assert_eq!(bucket(&mut slots, [3, 0]).len(), WAYS);
        let base = slots.as_ptr() as usize;
        let b1 = bucket(&mut slots, [3, 0]).as_ptr() as usize;
        assert_eq!((b1 - base) / std::mem::size_of::<Slot>(), 8);
        let b0 = bucket(&mut slots, [4, 0]).as_ptr() as usize;
        assert_eq!(b0, base);
        let mut few = [Slot::default(); 3];
        assert_eq!(bucket(&mut few, [7, 7]).len(), 3);
        let mut none: [Slot; 0] = [];
        assert!(pick(bucket(&mut none, [1, 1]), [1, 1], 0).is_none());
    }

    #[test]
    fn counts_keys_in_use_and_evictions() {
        let g = crate::gcra::Gcra::new(crate::gcra::parse_rate("1r/m").unwrap(), 0);
        let mut slots = [Slot::default(); 3];
        let mut stats = Stats::default();
        for (seq, k) in [1u64, 2, 1, 3, 3].iter().enumerate() {
            check_counted(
                &mut slots,
                [*k, 0],
                &g,
                1_000,
                seq as u64,
                false,
                &mut stats,
            );
        }
        assert_eq!(
            stats,
            Stats {
                evictions: 0,
                keys: 3
            }
        );
        // A fourth key in a full one-bucket table evicts a live key; keys in use stay 3.
        check_counted(&mut slots, [4, 0], &g, 1_000, 9, false, &mut stats);
        assert_eq!(
            stats,
            Stats {
                evictions: 1,
                keys: 3
            }
        );
        assert_eq!(
            slots.iter().filter(|s| !s.is_empty()).count() as u64,
            stats.keys
        );
    }
}
