//! The cost of the core's request-path calls at scale, for issue 11's targets:
//!
//! * `rbac`: one decision among 10 rules and among 1 000 (exact principals, one regex and
//!   one claim rule before them, the caller matching the last rule), by the linear
//!   `policy::decide` and by `policy::RuleSet::decide`;
//! * `ratetable`: one `ratetable::check` in a table holding 100 keys and in one holding
//!   1 000 000 (keys drawn at random from those held);
//! * `cache`: a token cache hit, `Hashed::new` + `TokenCache::lookup`, for a 554-byte token,
//!   and what it cost before (`bench_cache_hit_before`: SHA-256 of the whole token, LRU get).
//!
//! Usage: `cargo run --release -p mesh-core --example request_path [SECONDS]` (default 1).
//! Prints nanoseconds per call (wall clock: noisy on a shared machine; compare the lines of
//! one run). With `REQUEST_PATH_COUNT=N` each measurement runs exactly N calls and prints
//! nothing timed: for `valgrind --tool=callgrind`, where each runs in a function named
//! `bench_<name>` (`callgrind_annotate --inclusive=yes`); `REQUEST_PATH_ONLY` picks one.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use mesh_core::cache::TokenCache;
use mesh_core::gcra::{parse_rate, Gcra};
use mesh_core::policy::{decide, parse_rule, Caller, Effect, Rule, RuleSet};
use mesh_core::ratetable::{check, key_hash_parts, Slot};
use mesh_core::token::{Hashed, Verified};
use serde_json::json;
use sha2::Digest as _;

/// `REQUEST_PATH_ONLY=rbac-10|rbac-1000|ratetable-100|ratetable-1000000|cache`: run that
/// measurement only (one process each, so callgrind counts them apart).
fn wanted(name: &str) -> bool {
    std::env::var("REQUEST_PATH_ONLY").map_or(true, |only| only == name)
}

fn count() -> Option<u64> {
    std::env::var("REQUEST_PATH_COUNT")
        .ok()
        .and_then(|n| n.parse().ok())
}

/// Runs `f` for `secs` (or `REQUEST_PATH_COUNT` times); nanoseconds per call.
fn time(secs: f64, mut f: impl FnMut(u64) -> bool) -> f64 {
    if let Some(n) = count() {
        for i in 0..n {
            assert!(f(i));
        }
        return 0.0;
    }
    let start = Instant::now();
    let mut i = 0u64;
    loop {
        for _ in 0..256 {
            assert!(f(i));
            i += 1;
        }
        let e = start.elapsed().as_secs_f64();
        if e >= secs {
            return e * 1e9 / i as f64;
        }
    }
}

fn rules(n: usize) -> Vec<Rule> {
    let mut rules = vec![
        parse_rule(Effect::Deny, &["~^batch-.*@evil\\.com$"], "regex".into()).unwrap(),
        parse_rule(
            Effect::Allow,
            &["claim:team=core", "methods=POST"],
            "claim".into(),
        )
        .unwrap(),
    ];
    for i in 0..n - 2 {
        let who = format!("svc-{i}@shop.iam.gserviceaccount.com");
        rules.push(
            parse_rule(
                Effect::Allow,
                &[&who, "methods=GET,HEAD"],
                format!("rule {i}"),
            )
            .unwrap(),
        );
    }
    rules
}

#[inline(never)]
fn bench_rbac_linear(rules: &[Rule], caller: &Caller, secs: f64) -> f64 {
    time(secs, |_| {
        !matches!(
            decide(black_box(rules), caller, "GET"),
            mesh_core::policy::Verdict::NoMatch
        )
    })
}

#[inline(never)]
fn bench_rbac_indexed(set: &RuleSet, caller: &Caller, secs: f64) -> f64 {
    time(secs, |_| {
        !matches!(
            black_box(set).decide(caller, "GET"),
            mesh_core::policy::Verdict::NoMatch
        )
    })
}

#[inline(never)]
fn bench_ratetable(slots: &mut [Slot], keys: u64, gcra: &Gcra, secs: f64) -> f64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut seq = keys;
    time(secs, |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = (x % keys).to_le_bytes();
        seq += 1;
        let key = key_hash_parts(b"zone", &[b"caller:", &k]);
        check(slots, key, gcra, 1_000_000, seq, false).0.allowed
    })
}

#[inline(never)]
fn bench_cache_hit(cache: &mut TokenCache, token: &[u8], secs: f64) -> f64 {
    time(secs, |_| {
        cache.lookup(&Hashed::new(black_box(token)), 10).is_some()
    })
}

/// What a hit cost before `Hashed` (for comparison): the SHA-256 of the whole token, then
/// the LRU lookup by it, as `TokenCache::get` did.
#[inline(never)]
fn bench_cache_hit_before(
    lru: &mut lru::LruCache<[u8; 32], Arc<Verified>>,
    token: &[u8],
    secs: f64,
) -> f64 {
    use sha2::Digest;
    time(secs, |_| {
        let k: [u8; 32] = sha2::Sha256::digest(black_box(token)).into();
        lru.get(&k).is_some_and(|v| v.exp > 10)
    })
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let claims = json!({"team": "web"});
    let caller_for = |n: usize| format!("svc-{}@shop.iam.gserviceaccount.com", n - 3);

    for n in [10, 1000] {
        if !wanted(&format!("rbac-{n}")) {
            continue;
        }
        let rs = rules(n);
        let set = RuleSet::new(rs.clone());
        let who = caller_for(n);
        let caller = Caller {
            principal: Some(&who),
            claims: claims.as_object(),
            roles: &[],
            provider: None,
        };
        let lin = bench_rbac_linear(&rs, &caller, secs);
        let idx = bench_rbac_indexed(&set, &caller, secs);
        if count().is_none() {
            println!("rbac {n:>5} rules: linear decide {lin:8.1} ns, RuleSet::decide {idx:6.1} ns");
        }
    }

    // A full rate: nothing is refused (the bench's "never refusing" limit).
    let gcra = Gcra::new(parse_rate("1000000r/s").unwrap(), 1_000_000);
    for keys in [100u64, 1_000_000] {
        if !wanted(&format!("ratetable-{keys}")) {
            continue;
        }
        // Twice as many slots as keys, as a zone sized for them would have.
        let mut slots = vec![Slot::default(); (2 * keys as usize).max(64)];
        for k in 0..keys {
            let key = key_hash_parts(b"zone", &[b"caller:", &k.to_le_bytes()]);
            check(&mut slots, key, &gcra, 1_000_000, k, false);
        }
        let held = slots.iter().filter(|s| !s.is_empty()).count();
        let ns = bench_ratetable(&mut slots, keys, &gcra, secs);
        if count().is_none() {
            println!("ratetable {keys:>8} keys ({held} held): check {ns:6.1} ns");
        }
    }

    if !wanted("cache") {
        return;
    }
    let payload = "x".repeat(190);
    let token = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.{}", "s".repeat(342));
    let mut cache = TokenCache::new(4096);
    let verified = Arc::new(Verified {
        provider: "p".into(),
        principal: "a".into(),
        claims: Default::default(),
        claims_json: "{}".into(),
        claims_b64: "e30".into(),
        audiences: vec![],
        exp: 100,
        iss: String::new(),
        key: None,
    });
    cache.put(token.as_bytes(), Arc::clone(&verified));
    let ns = bench_cache_hit(&mut cache, token.as_bytes(), secs);
    let mut before = lru::LruCache::new(std::num::NonZeroUsize::new(4096).unwrap());
    before.put(sha2::Sha256::digest(token.as_bytes()).into(), verified);
    let ns_before = bench_cache_hit_before(&mut before, token.as_bytes(), secs);
    if count().is_none() {
        println!(
            "token cache hit ({} bytes): Hashed::new + lookup {ns:6.1} ns; \
             before (SHA-256 of the whole token + LRU get) {ns_before:6.1} ns",
            token.len()
        );
    }
}
