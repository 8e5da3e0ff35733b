//! Global rate-limit zones: what each instance owes Redis, and what Redis tells it back.
//!
//! A zone with `redis=` still decides every request locally, from its shared-memory table
//! (`ratetable`). Next to the table the shell keeps, in plain data:
//!
//! - a list of [`Pending`] charges: for each key admitted since the last sync, the time its
//!   admissions cost (the sum of their emission intervals, so keys with different rates in
//!   one zone are charged right), bounded to a fixed number of keys per sync;
//! - one `u32` per slot: where that slot's key is in the list (1-based, 0 = not listed), so a
//!   request adds to its entry without a search.
//!
//! Every `sync` interval one worker per instance [`take`]s the list and sends it to Redis in
//! one pipelined round trip of [`SCRIPT`] calls. Redis keeps one GCRA TAT per key, in its
//! own clock: each charge moves it by that much, and the reply is how far ahead of Redis's
//! "now" the TAT is (`owed`), which covers what every instance admitted. The worker then
//! brings the key's local TAT up to `now + owed` (`ratetable::raise`): never down, so a
//! flushed or restarted Redis is no credit. Only relative times cross the network, so clocks
//! of instances and of Redis need not agree.

/// One key's charge since the last sync: 32 bytes, all-zero = unused.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Pending {
    /// The key's 128-bit hash (`ratetable::key_hash`).
    pub key: [u64; 2],
    /// The slot the key was in when charged (a hint: it may have been evicted since).
    pub slot: u32,
    pub _pad: u32,
    /// Microseconds of emission intervals admitted since the last sync.
    pub charge_us: u64,
}

/// Keys one sync carries at most: more distinct keys in one interval are limited locally
/// only (and counted as dropped). Bounds the memory, the batch and the time Redis spends.
pub const MAX_PENDING: usize = 8192;

/// Keys per script call: a batch is pipelined as calls of at most this many keys, so Redis
/// never runs one long script.
pub const KEYS_PER_CALL: usize = 256;

/// How far beyond its burst a key of a global zone may be owed (see
/// `Gcra::check_owing`): what other instances admitted before a sync told this one.
pub const MAX_DEBT_US: u64 = 60_000_000;

/// Records one admitted request of `key` (in slot `slot`, costing `interval_us`). `index` has
/// one entry per slot; `list[..*len]` are the keys charged so far. Returns `false` if the key
/// could not be listed (the list is full): it is then limited locally only this interval.
pub fn note(
    index: &mut [u32],
    list: &mut [Pending],
    len: &mut u32,
    slot: usize,
    key: [u64; 2],
    interval_us: u64,
) -> bool {
    let Some(at) = index.get_mut(slot) else {
        return false;
    };
    let n = (*len as usize).min(list.len());
    if let Some(p) = (*at as usize)
        .checked_sub(1)
        .filter(|&i| i < n)
        .and_then(|i| list.get_mut(i))
    {
        if p.key == key {
            p.charge_us = p.charge_us.saturating_add(interval_us);
            return true;
        }
    }
    if n >= list.len() {
        return false;
    }
    list[n] = Pending {
        key,
        slot: slot as u32,
        _pad: 0,
        charge_us: interval_us,
    };
    *len = n as u32 + 1;
    *at = n as u32 + 1;
    true
}

/// Takes every pending charge and empties the list (and the index entries pointing into it).
pub fn take(index: &mut [u32], list: &mut [Pending], len: &mut u32) -> Vec<Pending> {
    let n = (*len as usize).min(list.len());
    let out = list[..n].to_vec();
    for p in &out {
        if let Some(at) = index.get_mut(p.slot as usize) {
            *at = 0;
        }
    }
    list[..n].fill(Pending::default());
    *len = 0;
    out
}

/// The Redis key of `key` in zone `zone`: `PREFIX:ZONE:HASH`, HASH the 32 hex digits of the
/// key's hash (the caller's name never reaches Redis).
pub fn redis_key(prefix: &str, zone: &str, key: [u64; 2]) -> String {
    format!("{prefix}:{zone}:{:016x}{:016x}", key[0], key[1])
}

/// The script each sync calls: `KEYS` the keys, `ARGV[i]` the charge of `KEYS[i]` in µs.
/// Returns, per key, how many µs its TAT is ahead of Redis's clock. Every key expires when
/// its state has run out, so Redis holds only keys in use.
pub const SCRIPT: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, k in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', k)) or 0
  if tat < now then tat = now end
  tat = tat + (tonumber(ARGV[i]) or 0)
  local owed = tat - now
  redis.call('SET', k, string.format('%.0f', tat), 'PX', math.floor(owed / 1000) + 1)
  out[i] = owed
end
return out
"#;

/// `sync=`: milliseconds, as nginx writes times: `100ms`, `1s`, or a bare number of
/// milliseconds; from 10 ms to 60 s.
pub fn parse_sync(s: &str) -> Result<u64, String> {
    let err = || format!("invalid sync \"{s}\": expected a time from 10ms to 60s, like 100ms");
    let (digits, scale) = if let Some(d) = s.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = s.strip_suffix('s') {
        (d, 1000)
    } else {
        (s, 1)
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let ms = digits
        .parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(scale))
        .ok_or_else(err)?;
    if !(10..=60_000).contains(&ms) {
        return Err(err());
    }
    Ok(ms)
}

/// `prefix=`: 1 to 64 bytes of letters, digits and `_-.:{}` (no spaces or quotes, so keys
/// stay readable in `redis-cli`).
pub fn check_prefix(p: &str) -> Result<(), String> {
    let ok = !p.is_empty()
        && p.len() <= 64
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:{}".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid prefix \"{}\": 1 to 64 letters, digits or \"_-.:{{}}\"",
            p.escape_debug()
        ))
    }
}

/// The local TAT a sync reply asks for: `now + owed`, less the time since Redis answered
/// (`elapsed_us`), owed bounded by `bound_us`, the zone's own bounds ([`owed_bound`]): what
/// Redis says beyond them (a wrong or hostile reply) never blocks a key longer than the
/// zone's largest burst takes to drain. While Redis keeps owing more, each sync raises the
/// key again, so the limit still holds.
pub fn synced_tat(now: u64, owed_us: u64, elapsed_us: u64, bound_us: u64) -> u64 {
    now.saturating_add(
        owed_us
            .saturating_sub(elapsed_us)
            .min(bound_us)
            .min(MAX_DEBT_US * 2),
    )
}

/// Instances whose simultaneous bursts a key's debt may hold: [`owed_bound`] is this many
/// times the widest `(burst + 1) * T`.
pub const OWED_INSTANCES: u64 = 16;

/// The most a key of a zone may be owed: [`OWED_INSTANCES`] times `(burst + 1) * T` of the
/// widest limit charging the zone (a TAT `(burst + 1) * T` ahead refuses every request until
/// it drains; up to that many instances may each have admitted a burst before a sync told
/// them of the others). More than that is a wrong or hostile reply, or so many instances that
/// the limit then holds within `instances / OWED_INSTANCES` of itself.
pub fn owed_bound(gcras: impl IntoIterator<Item = crate::gcra::Gcra>) -> u64 {
    gcras
        .into_iter()
        .map(|g| g.tolerance_us.saturating_add(g.interval_us))
        .max()
        .unwrap_or(0)
        .saturating_mul(OWED_INSTANCES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(std::mem::size_of::<Pending>(), 32);
        assert_eq!(Pending::default().key, [0, 0]);
    }

    #[test]
    fn note_adds_up_per_key_and_take_empties() {
        let mut index = [0u32; 16];
        let mut list = [Pending::default(); 3];
        let mut len = 0;
        assert!(note(&mut index, &mut list, &mut len, 4, [1, 1], 100));
        assert!(note(&mut index, &mut list, &mut len, 4, [1, 1], 100));
        assert!(note(&mut index, &mut list, &mut len, 9, [2, 2], 50));
        assert_eq!(len, 2);
        assert_eq!(list[0].charge_us, 200);
        // The slot was taken over by another key: a new entry, not the old key's.
        assert!(note(&mut index, &mut list, &mut len, 4, [3, 3], 7));
        assert_eq!(len, 3);
        // Full: a fourth key is not listed, the others still add up.
        assert!(!note(&mut index, &mut list, &mut len, 5, [4, 4], 7));
        assert!(note(&mut index, &mut list, &mut len, 9, [2, 2], 50));
        // A slot outside the index is refused, never a panic.
        assert!(!note(&mut index, &mut list, &mut len, 99, [5, 5], 1));
        let got = take(&mut index, &mut list, &mut len);
        assert_eq!(
            got.iter().map(|p| (p.key, p.charge_us)).collect::<Vec<_>>(),
            vec![([1, 1], 200), ([2, 2], 100), ([3, 3], 7)]
        );
        assert_eq!(len, 0);
        assert!(index.iter().all(|&i| i == 0));
        assert!(take(&mut index, &mut list, &mut len).is_empty());
        // A stale index entry (list emptied under it) starts a new entry.
        index[4] = 2;
        assert!(note(&mut index, &mut list, &mut len, 4, [1, 1], 1));
        assert_eq!((len, index[4]), (1, 1));
    }

    #[test]
    fn keys_and_values() {
        assert_eq!(
            redis_key("mesh", "callers", [1, 0xabc]),
            "mesh:callers:00000000000000010000000000000abc"
        );
        assert_eq!(parse_sync("100ms"), Ok(100));
        assert_eq!(parse_sync("1s"), Ok(1000));
        assert_eq!(parse_sync("250"), Ok(250));
        for bad in [
            "",
            "ms",
            "5ms",
            "61s",
            "1m",
            "-1ms",
            "1.5s",
            "99999999999999999999s",
        ] {
            assert!(parse_sync(bad).is_err(), "{bad}");
        }
        assert!(check_prefix("mesh").is_ok());
        assert!(check_prefix("{shop}:rl-1.x").is_ok());
        for bad in ["", "a b", "a\"", &"x".repeat(65)] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
        let wide = u64::MAX;
        assert_eq!(synced_tat(1_000, 500, 200, wide), 1_300);
        assert_eq!(synced_tat(1_000, 100, 200, wide), 1_000);
        assert_eq!(synced_tat(u64::MAX, u64::MAX, 0, wide), u64::MAX);
        assert_eq!(synced_tat(0, u64::MAX, 0, wide), MAX_DEBT_US * 2);
        // An absurd reply is held to the zone's bound.
        assert_eq!(synced_tat(1_000, 1 << 60, 0, 300_000), 301_000);
        assert_eq!(synced_tat(1_000, 200_000, 0, 300_000), 201_000);
        use crate::gcra::{parse_rate, Gcra};
        let ten = parse_rate("10r/s").unwrap();
        let one = parse_rate("1r/s").unwrap();
        assert_eq!(owed_bound([Gcra::new(ten, 0)]), 100_000 * OWED_INSTANCES);
        assert_eq!(
            owed_bound([Gcra::new(ten, 4), Gcra::new(one, 0)]),
            1_000_000 * OWED_INSTANCES
        );
        assert_eq!(owed_bound([]), 0);
    }
}
