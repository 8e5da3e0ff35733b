//! Verifications per second on one thread, for the benchmark's "ideal" throughput
//! (`bench/run.sh`): how fast can a worker check signatures if it did nothing else?
//!
//! Usage:
//!   cargo run --release --locked -p mesh-core --example verify_rate -- \
//!       KEYS_FILE TOKENS_FILE ISSUER AUDIENCE [SECONDS]
//!
//! KEYS_FILE is a JWKS or PEM file (as `keys` in `mesh_provider`), TOKENS_FILE one token per
//! line, all valid for ISSUER and AUDIENCE. The tokens are cycled through, each measurement
//! running for SECONDS (default 2). Two rates are printed:
//!
//! * `raw`:  `jsonwebtoken::crypto::verify` alone: base64 of the signature and the signature
//!   check, with the key already chosen (the signature library's own rate);
//! * `full`: `mesh_core::token::verify` + `check_audience`: what the module does on a cache
//!   miss (parse, JSON, issuer, key selection, signature, time claims, principal).
//!
//! Each as verifications per second of this thread's CPU time (on Linux, from
//! `/proc/thread-self/schedstat`: what one core does when nothing else shares it) and per
//! second of wall-clock time (lower when other processes take the core):
//!
//!     raw  41885 verifications/s  (wall 41002/s; jsonwebtoken::crypto::verify)
//!
//! Every verification must succeed, else the program fails (a rate of failures means nothing).

use std::hint::black_box;
use std::process::exit;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use mesh_core::keys::{algorithm_name, parse_algorithm, Algorithm, Key, KeySet};
use mesh_core::token::{check_audience, verify, Provider};
use serde_json::Value;

/// A token split once, up front, for the raw measurement.
struct Prepared<'a> {
    signing_input: &'a [u8],
    signature: &'a str,
    alg: Algorithm,
    key: &'a Key,
}

fn die(msg: impl AsRef<str>) -> ! {
    eprintln!("verify_rate: {}", msg.as_ref());
    exit(1)
}

/// This thread's CPU time so far (the scheduler's count, in ns), if the system tells.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    (ns > 0).then(|| Duration::from_nanos(ns))
}

/// Runs `f` on the tokens in turn for about `secs` of wall-clock time; verifications per
/// second of CPU time (wall-clock time where CPU time is unknown) and of wall-clock time.
fn rate<T>(items: &[T], secs: f64, mut f: impl FnMut(&T) -> bool) -> (f64, f64) {
    let budget = Duration::from_secs_f64(secs);
    let cpu_start = thread_cpu();
    let start = Instant::now();
    let mut done: u64 = 0;
    loop {
        // Check the clock every 64 verifications (a verification is tens of microseconds).
        for _ in 0..64 {
            if !f(&items[(done % items.len() as u64) as usize]) {
                die(format!("verification #{done} failed"));
            }
            done += 1;
        }
        let elapsed = start.elapsed();
        if elapsed >= budget {
            let wall = done as f64 / elapsed.as_secs_f64();
            let cpu = match (cpu_start, thread_cpu()) {
                (Some(a), Some(b)) if b > a => done as f64 / (b - a).as_secs_f64(),
                _ => wall,
            };
            return (cpu, wall);
        }
    }
}

fn prepare<'a>(token: &'a str, keys: &'a KeySet) -> Prepared<'a> {
    let (signing_input, signature) = token.rsplit_once('.').unwrap_or_else(|| die("bad token"));
    let header_b64 = signing_input.split('.').next().unwrap_or_default();
    let header: Value = URL_SAFE_NO_PAD
        .decode(header_b64)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .unwrap_or_else(|| die("bad token header"));
    let alg = header["alg"]
        .as_str()
        .and_then(parse_algorithm)
        .unwrap_or_else(|| die("token alg missing or unsupported"));
    let kid = header["kid"].as_str();
    let key = keys
        .keys
        .iter()
        .find(|k| k.allows(alg) && (kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid))
        .unwrap_or_else(|| die("no key in KEYS_FILE for the token"));
    Prepared {
        signing_input: signing_input.as_bytes(),
        signature,
        alg,
        key,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(4..=5).contains(&args.len()) {
        die("usage: verify_rate KEYS_FILE TOKENS_FILE ISSUER AUDIENCE [SECONDS]");
    }
    let secs: f64 = args
        .get(4)
        .map_or(Ok(2.0), |s| s.parse())
        .unwrap_or_else(|_| die("SECONDS: not a number"));
    let key_bytes = std::fs::read(&args[0]).unwrap_or_else(|e| die(format!("{}: {e}", args[0])));
    let keys = KeySet::load(&key_bytes).unwrap_or_else(|e| die(format!("{}: {e}", args[0])));
    let text =
        std::fs::read_to_string(&args[1]).unwrap_or_else(|e| die(format!("{}: {e}", args[1])));
    let tokens: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    if tokens.is_empty() {
        die(format!("{}: no tokens", args[1]));
    }
    let audience = vec![args[3].clone()];
    let provider = Provider {
        name: "bench".into(),
        issuers: vec![args[2].clone()],
        audiences: audience.clone(),
        algorithms: keys.algorithms(),
        keys: Arc::new(keys.clone()),
        leeway: 30,
        principal: "sub".into(),
        require: Vec::new(),
    };
    let providers = [&provider];
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());

    let prepared: Vec<Prepared> = tokens.iter().map(|t| prepare(t, &keys)).collect();
    let algs: Vec<&str> = {
        let mut a: Vec<&str> = prepared.iter().map(|p| algorithm_name(p.alg)).collect();
        a.dedup();
        a
    };
    let clock = if thread_cpu().is_some() {
        "per CPU second"
    } else {
        "per second"
    };
    println!(
        "verify_rate: {}, {} tokens, {secs} s per measurement, one thread, rates {clock}",
        algs.join("+"),
        tokens.len()
    );

    let raw_check = |p: &Prepared| {
        jsonwebtoken::crypto::verify(
            black_box(p.signature),
            black_box(p.signing_input),
            &p.key.key,
            p.alg,
        )
        .unwrap_or(false)
    };
    let full_check = |t: &&str| {
        verify(black_box(t.as_bytes()), &providers, now)
            .and_then(|v| check_audience(&v, &audience))
            .is_ok()
    };
    // A short warm-up of each (page faults, caches, CPU frequency), then the measurements.
    rate(&prepared, secs / 10.0, raw_check);
    rate(&tokens, secs / 10.0, full_check);
    let (raw, raw_wall) = rate(&prepared, secs, raw_check);
    let (full, full_wall) = rate(&tokens, secs, full_check);
    println!("raw  {raw:.0} verifications/s  (wall {raw_wall:.0}/s; jsonwebtoken::crypto::verify)");
    println!(
        "full {full:.0} verifications/s  (wall {full_wall:.0}/s; \
         mesh_core::token::verify + check_audience)"
    );
}
