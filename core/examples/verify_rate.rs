//! Verifications per second on one thread, for the benchmark's "ideal" throughput
//! (`bench/run.sh`): how fast can a worker check signatures if it did nothing else?
//!
//! Usage:
//!   cargo run --release --locked -p mesh-core --example verify_rate -- \
//!       KEYS_FILE TOKENS_FILE ISSUER AUDIENCE [SECONDS]
//!
//! KEYS_FILE is a JWKS or PEM file (as `keys` in `mesh_provider`), TOKENS_FILE one token per
//! line, all valid for ISSUER and AUDIENCE. The tokens are cycled through, each measurement
//! running for SECONDS (default 2). Three rates are printed, and their ratio:
//!
//! * `raw`:  `jsonwebtoken::crypto::verify` alone: base64 of the signature and the signature
//!   check, with the key already chosen, but parsed again on every call (what
//!   `jsonwebtoken` does);
//! * `awslc`: aws-lc-rs alone, `ParsedPublicKey::verify_sig` on a key parsed once and a
//!   signature decoded once: the crypto library's own rate, the "ideal";
//! * `full`: `mesh_core::token::verify` + `check_audience`: what the module does on a cache
//!   miss (parse, JSON, issuer, key selection, signature, time claims, principal);
//! * `miss`: the module's whole cache-miss path: hash the token once, miss in the token
//!   cache, decode once, verify (reusing the digest), check the audience, insert;
//! * `ratio`: full/awslc, the share of the ideal the full path reaches, and the cost of
//!   each per verification.
//!
//! For instruction counts (`valgrind --tool=callgrind`, repeatable on a busy machine), set
//! `VERIFY_RATE_COUNT=N` to run exactly N verifications per measurement (no warm-up; the
//! clock is not read), and `VERIFY_RATE_ONLY=raw|awslc|full|miss` to run one of them: each runs
//! inside a function of its own name (`measure_raw`, `measure_awslc`, `measure_full`, `measure_miss`), so
//! `callgrind_annotate --inclusive=yes` shows each one's instructions.
//!
//! Each as verifications per second of this thread's CPU time (on Linux, from
//! `/proc/thread-self/schedstat`: what one core does when nothing else shares it) and per
//! second of wall-clock time (lower when other processes take the core):
//!
//!     raw   41885 verifications/s  (wall 41002/s; jsonwebtoken::crypto::verify)
//!
//! Every verification must succeed, else the program fails (a rate of failures means nothing).

use std::hint::black_box;
use std::process::exit;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{self as lc, ParsedPublicKey, VerificationAlgorithm};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use mesh_core::cache::TokenCache;
use mesh_core::keys::{algorithm_name, parse_algorithm, Algorithm, Key, KeySet};
use mesh_core::token::{check_audience, verify, Hashed, Jwt, Provider};
use serde_json::Value;

/// A token split once, up front, for the raw measurements.
struct Prepared<'a> {
    signing_input: &'a [u8],
    signature: &'a str,
    /// The signature, decoded.
    signature_bytes: Vec<u8>,
    alg: Algorithm,
    key: &'a Key,
    /// The key, parsed by aws-lc-rs for `alg`.
    parsed: Arc<ParsedPublicKey>,
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
    if let Some(n) = fixed_count() {
        for done in 0..n {
            if !f(&items[(done % items.len() as u64) as usize]) {
                die(format!("verification #{done} failed"));
            }
        }
        return (0.0, 0.0);
    }
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

/// `VERIFY_RATE_COUNT`: a fixed number of verifications per measurement.
fn fixed_count() -> Option<u64> {
    let n = std::env::var("VERIFY_RATE_COUNT").ok()?;
    Some(
        n.parse()
            .unwrap_or_else(|_| die("VERIFY_RATE_COUNT: not a number")),
    )
}

/// aws-lc-rs's verification algorithm for a JOSE algorithm (as jsonwebtoken 10 picks them).
fn lc_algorithm(alg: Algorithm) -> &'static dyn VerificationAlgorithm {
    match alg {
        Algorithm::RS256 => &lc::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &lc::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &lc::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &lc::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &lc::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &lc::RSA_PSS_2048_8192_SHA512,
        Algorithm::ES256 => &lc::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &lc::ECDSA_P384_SHA384_FIXED,
        Algorithm::ES512 => &lc::ECDSA_P521_SHA512_FIXED,
        Algorithm::EdDSA => &lc::ED25519,
        _ => die("verify_rate measures public-key algorithms only"),
    }
}

/// jsonwebtoken's name for the same algorithm (it has no ES512).
fn jwt_algorithm(alg: Algorithm) -> jsonwebtoken::Algorithm {
    use jsonwebtoken::Algorithm as J;
    match alg {
        Algorithm::RS256 => J::RS256,
        Algorithm::RS384 => J::RS384,
        Algorithm::RS512 => J::RS512,
        Algorithm::PS256 => J::PS256,
        Algorithm::PS384 => J::PS384,
        Algorithm::PS512 => J::PS512,
        Algorithm::ES256 => J::ES256,
        Algorithm::ES384 => J::ES384,
        Algorithm::EdDSA => J::EdDSA,
        _ => die("jsonwebtoken measures RS*, PS*, ES256/384 and EdDSA only"),
    }
}

/// The public key of a JWK as aws-lc-rs parses it: PKCS#1 RSAPublicKey DER for RSA, the
/// uncompressed point for EC, the 32 bytes for Ed25519 (written here, not taken from
/// mesh-core, so the ideal does not depend on the code it measures).
fn jwk_public_key(jwk: &Value) -> Vec<u8> {
    let member = |name: &str| {
        jwk[name]
            .as_str()
            .and_then(|s| URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok())
            .unwrap_or_else(|| die(format!("JWK member {name} missing or not base64url")))
    };
    fn der(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = body.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|&b| b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(body);
        out
    }
    fn integer(magnitude: &[u8]) -> Vec<u8> {
        let m: Vec<u8> = magnitude.iter().copied().skip_while(|&b| b == 0).collect();
        let mut body = Vec::new();
        if m.first().is_none_or(|&b| b & 0x80 != 0) {
            body.push(0);
        }
        body.extend(m);
        der(0x02, &body)
    }
    match jwk["kty"].as_str() {
        Some("RSA") => der(
            0x30,
            &[integer(&member("n")), integer(&member("e"))].concat(),
        ),
        Some("EC") => [&[4u8][..], &member("x"), &member("y")].concat(),
        Some("OKP") => member("x"),
        _ => die("unsupported JWK kty"),
    }
}

/// The raw public key of every JWK of a JWKS file, by `kid` (PEM files: none; `awslc` is
/// then not measured).
fn jwks_public_keys(bytes: &[u8]) -> Vec<(Option<String>, Vec<u8>)> {
    let doc: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    doc["keys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .map(|k| (k["kid"].as_str().map(str::to_owned), jwk_public_key(k)))
                .collect()
        })
        .unwrap_or_default()
}

fn prepare<'a>(
    token: &'a str,
    keys: &'a KeySet,
    raw_keys: &[(Option<String>, Vec<u8>)],
    parsed_keys: &mut Vec<(Algorithm, Vec<u8>, Arc<ParsedPublicKey>)>,
) -> Prepared<'a> {
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
    let raw_key = raw_keys
        .iter()
        .find(|(k, _)| kid.is_none() || k.as_deref() == kid)
        .map(|(_, der)| der)
        .unwrap_or_else(|| die("KEYS_FILE must be a JWKS whose kids the tokens name"));
    // One parsed key per (key, algorithm), shared by the tokens, as a verifier keeps it:
    // aws-lc caches per-key state (RSA's Montgomery constants) on first use.
    let parsed = match parsed_keys
        .iter()
        .find(|(a, der, _)| *a == alg && der == raw_key)
    {
        Some((_, _, p)) => Arc::clone(p),
        None => {
            let p = Arc::new(
                ParsedPublicKey::new(lc_algorithm(alg), raw_key)
                    .unwrap_or_else(|e| die(format!("aws-lc-rs refuses the key: {e}"))),
            );
            parsed_keys.push((alg, raw_key.clone(), Arc::clone(&p)));
            p
        }
    };
    Prepared {
        signing_input: signing_input.as_bytes(),
        signature,
        signature_bytes: URL_SAFE_NO_PAD
            .decode(signature)
            .unwrap_or_else(|_| die("bad token signature")),
        alg,
        key,
        parsed,
    }
}

/// Which measurements to run (`VERIFY_RATE_ONLY`; default all).
fn wanted(name: &str) -> bool {
    std::env::var("VERIFY_RATE_ONLY").map_or(true, |only| only == name)
}

#[inline(never)]
fn measure_raw(prepared: &[Prepared], secs: f64) -> (f64, f64) {
    rate(prepared, secs, |p: &Prepared| {
        jsonwebtoken::crypto::verify(
            black_box(p.signature),
            black_box(p.signing_input),
            &p.key.key,
            jwt_algorithm(p.alg),
        )
        .unwrap_or(false)
    })
}

#[inline(never)]
fn measure_awslc(prepared: &[Prepared], secs: f64) -> (f64, f64) {
    rate(prepared, secs, |p: &Prepared| {
        p.parsed
            .verify_sig(black_box(p.signing_input), black_box(&p.signature_bytes))
            .is_ok()
    })
}

/// The module's whole cache-miss path: hash once, miss in the cache, decode once, verify
/// (reusing the digest), audience, insert (evicting: the cache holds half the tokens).
#[inline(never)]
fn measure_miss(
    tokens: &[&str],
    providers: &[&Provider],
    audience: &[String],
    now: u64,
    secs: f64,
) -> (f64, f64) {
    let mut cache = TokenCache::new((tokens.len() / 2).max(1));
    rate(tokens, secs, |t: &&str| {
        let hashed = Hashed::new(black_box(t.as_bytes()));
        if cache.lookup(&hashed, now).is_some() {
            die("verify_rate: a cache hit where every lookup must miss");
        }
        let v = match Jwt::decode_hashed(&hashed).and_then(|j| j.verify(providers, now)) {
            Ok(v) => v,
            Err(_) => return false,
        };
        let ok = check_audience(&v, audience).is_ok();
        cache.insert(&hashed, Arc::new(v));
        ok
    })
}

#[inline(never)]
fn measure_full(
    tokens: &[&str],
    providers: &[&Provider],
    audience: &[String],
    now: u64,
    secs: f64,
) -> (f64, f64) {
    rate(tokens, secs, |t: &&str| {
        verify(black_box(t.as_bytes()), providers, now)
            .and_then(|v| check_audience(&v, audience))
            .is_ok()
    })
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
        email_first: false,
        require: Vec::new(),
    };
    let providers = [&provider];
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());

    let raw_keys = jwks_public_keys(&key_bytes);
    let mut parsed_keys = Vec::new();
    let prepared: Vec<Prepared> = tokens
        .iter()
        .map(|t| prepare(t, &keys, &raw_keys, &mut parsed_keys))
        .collect();
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

    let count = fixed_count();
    let warm = |f: &dyn Fn(f64) -> (f64, f64)| {
        // A short warm-up (page faults, caches, CPU frequency), then the measurement.
        if count.is_none() {
            f(secs / 10.0);
        }
        f(secs)
    };
    let measured = |name: &str, what: &str, r: Option<(f64, f64)>| {
        if let (Some((cpu, wall)), None) = (r, count) {
            println!("{name:<5} {cpu:.0} verifications/s  (wall {wall:.0}/s; {what})");
        }
    };
    let raw = wanted("raw").then(|| warm(&|s| measure_raw(&prepared, s)));
    let awslc = wanted("awslc").then(|| warm(&|s| measure_awslc(&prepared, s)));
    let full =
        wanted("full").then(|| warm(&|s| measure_full(&tokens, &providers, &audience, now, s)));
    measured(
        "raw",
        "jsonwebtoken::crypto::verify, the key parsed on every call",
        raw,
    );
    measured(
        "awslc",
        "aws-lc-rs ParsedPublicKey::verify_sig, the key parsed once",
        awslc,
    );
    measured("full", "mesh_core::token::verify + check_audience", full);
    let miss =
        wanted("miss").then(|| warm(&|s| measure_miss(&tokens, &providers, &audience, now, s)));
    measured(
        "miss",
        "the module's cache miss: Hashed::new, TokenCache::lookup, Jwt::decode_hashed, verify, insert",
        miss,
    );
    if let (Some((lc, _)), Some((full, _)), None) = (awslc, full, count) {
        println!(
            "ratio full/awslc = {:.3}  (per verification: full {:.2} us, aws-lc {:.2} us, \
             the rest {:.2} us)",
            full / lc,
            1e6 / full,
            1e6 / lc,
            1e6 / full - 1e6 / lc
        );
    }
    if let Some(n) = count {
        println!("ran {n} verifications per measurement");
    }
}
