//! Property tests of every parser in the core: arbitrary and mutated inputs never panic, and a
//! token the core verifies is one the reference decoding ([`reference`]: base64, serde_json
//! and `jsonwebtoken`'s signature check) verifies too, with the same claims. Each property prints how many
//! cases it ran (to stderr directly, so `cargo test` shows it without `--nocapture`).

mod common;

use std::io::Write;

use common::*;
use jsonwebtoken::DecodingKey;
use mesh_core::keys::{Algorithm, KeySet};
use mesh_core::policy::Pattern;
use mesh_core::token::{unverified_issuer, verify, Jwt, Provider, Requirement};
use mesh_core::trace::{check_tracestate, parse_cloud_trace, parse_traceparent};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

/// Runs `test` on `cases` inputs of `strategy` and reports the count.
fn run<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("property {name}: {e}");
    }
    let _ = writeln!(std::io::stderr(), "property {name}: {cases} cases");
}

/// Changes to a token's bytes: flip one byte, cut a range, insert bytes, or repeat a part.
#[derive(Clone, Debug)]
enum Mutation {
    Set(usize, u8),
    Cut(usize, usize),
    Insert(usize, Vec<u8>),
    Repeat(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), 0usize..64).prop_map(|(i, n)| Mutation::Cut(i, n)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Mutation::Repeat(i, n)),
        // the characters a token is made of, and the separator, at any place
        (
            any::<usize>(),
            prop::sample::select(b".-_=+/ A0\0\xff".to_vec())
        )
            .prop_map(|(i, b)| Mutation::Set(i, b)),
    ]
}

fn mutate(token: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut t = token.to_vec();
    for m in muts {
        let n = t.len().max(1);
        match m {
            Mutation::Set(i, b) => {
                if !t.is_empty() {
                    let i = i % t.len();
                    t[i] = *b;
                }
            }
            Mutation::Cut(i, len) => {
                let i = i % n;
                let end = (i + len).min(t.len());
                if i < end {
                    t.drain(i..end);
                }
            }
            Mutation::Insert(i, v) => {
                let i = i % (t.len() + 1);
                t.splice(i..i, v.iter().copied());
            }
            Mutation::Repeat(i, len) => {
                let i = i % n;
                let end = (i + len).min(t.len());
                if i < end {
                    let part = t[i..end].to_vec();
                    t.splice(end..end, part);
                }
            }
        }
    }
    t
}

/// The tokens mutations start from: one per key kind, all valid at `NOW`.
fn seeds() -> Vec<(String, Algorithm)> {
    let c = claims(JWKS_ISS);
    let h = claims(HMAC_ISS);
    vec![
        (
            sign(&header("RS256", Some("rsa1")), &c, &rsa(), Algorithm::RS256),
            Algorithm::RS256,
        ),
        (
            sign(&header("PS256", Some("rsa1")), &c, &rsa(), Algorithm::PS256),
            Algorithm::PS256,
        ),
        (
            sign(
                &header("ES256", Some("ec256")),
                &c,
                &ec256(),
                Algorithm::ES256,
            ),
            Algorithm::ES256,
        ),
        (
            sign(&header("EdDSA", Some("ed1")), &c, &ed(), Algorithm::EdDSA),
            Algorithm::EdDSA,
        ),
        (
            sign(&header("HS256", None), &h, &hmac(), Algorithm::HS256),
            Algorithm::HS256,
        ),
    ]
}

fn providers() -> Vec<Provider> {
    vec![jwks_provider(), hmac_provider()]
}

/// The reference decoding (RFC 7515 compact serialization, done apart from the core): three
/// base64url segments without padding, a header that is a JSON object whose `alg` (the last
/// one, RFC 7515 4 lets a parser keep the last of duplicate members, as the core does) is the
/// seed's, a signature `jsonwebtoken`'s crypto verifies with the public key, and a payload
/// that is a JSON object: its claims. The core's clock, issuer and `kid` checks are stricter
/// and come on top.
fn reference(token: &str, alg: Algorithm) -> Option<Value> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let key = match alg {
        Algorithm::RS256 | Algorithm::PS256 => DecodingKey::from_rsa_pem(RSA_PUB).ok()?,
        Algorithm::ES256 => DecodingKey::from_ec_pem(EC256_PUB).ok()?,
        Algorithm::EdDSA => DecodingKey::from_ed_pem(ED_PUB).ok()?,
        _ => DecodingKey::from_secret(SECRET.strip_suffix(b"\n")?),
    };
    let mut parts = token.split('.');
    let (h, p, sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
    let want = Value::String(mesh_core::keys::algorithm_name(alg).to_string());
    if header.as_object()?.get("alg")? != &want {
        return None;
    }
    let message = &token[..h.len() + 1 + p.len()];
    if !jsonwebtoken::crypto::verify(sig, message.as_bytes(), &key, jwt_alg(alg)).ok()? {
        return None;
    }
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).ok()?).ok()?;
    claims.is_object().then_some(claims)
}

/// A token the core verifies: the reference verifies it too, with the same claims.
fn agrees(token: &[u8], alg: Algorithm, ps: &[&Provider]) -> Result<(), TestCaseError> {
    let _ = unverified_issuer(token);
    let _ = Jwt::decode(token);
    if let Ok(v) = verify(token, ps, NOW) {
        let text =
            std::str::from_utf8(token).map_err(|_| TestCaseError::fail("verified non-UTF-8"))?;
        let claims = reference(text, alg).ok_or_else(|| {
            TestCaseError::fail(format!("verified, the reference refuses: {text}"))
        })?;
        prop_assert_eq!(Value::Object(v.claims.clone()), claims);
    }
    Ok(())
}

#[test]
fn mutated_tokens_never_verify_what_the_reference_refuses() {
    let seeds = seeds();
    let owned = providers();
    let ps: Vec<&Provider> = owned.iter().collect();
    for (token, alg) in &seeds {
        assert!(
            verify(token.as_bytes(), &ps, NOW).is_ok(),
            "seed {alg:?} must verify"
        );
        assert!(
            reference(token, *alg).is_some(),
            "seed {alg:?} must pass the reference"
        );
    }
    run(
        "token (mutated)",
        3000,
        (0..seeds.len(), proptest::collection::vec(mutation(), 1..4)),
        |(i, muts)| {
            let (token, alg) = &seeds[i];
            agrees(&mutate(token.as_bytes(), &muts), *alg, &ps)
        },
    );
}

#[test]
fn arbitrary_bytes_never_verify() {
    let owned = providers();
    let ps: Vec<&Provider> = owned.iter().collect();
    let dotted = "[A-Za-z0-9_=+/-]{0,40}\\.[A-Za-z0-9_=+/-]{0,80}\\.[A-Za-z0-9_=+/-]{0,90}";
    run(
        "token (arbitrary)",
        3000,
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..400),
            dotted.prop_map(String::into_bytes),
        ],
        |t| {
            let _ = unverified_issuer(&t);
            let _ = Jwt::decode(&t);
            prop_assert!(verify(&t, &ps, NOW).is_err());
            Ok(())
        },
    );
}

/// Header or payload bytes of the prover's choice, validly signed: the core's JSON readers
/// meet every shape, and what they accept the reference accepts.
#[test]
fn signed_arbitrary_headers_and_claims_agree_with_the_reference() {
    let owned = providers();
    let ps: Vec<&Provider> = owned.iter().collect();
    let good_header = serde_json::to_vec(&header("RS256", Some("rsa1"))).unwrap();
    let good_claims = serde_json::to_vec(&claims(JWKS_ISS)).unwrap();
    let good = [good_header.clone(), good_claims.clone()];
    let bytes = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..120),
        // JSON-ish text: the characters JSON is made of
        "[{}\\[\\]\":,a-z0-9 .\\\\-]{0,120}".prop_map(String::into_bytes),
        // small edits of the good documents
        (0usize..2, proptest::collection::vec(mutation(), 1..3))
            .prop_map(move |(i, m)| mutate(&good[i], &m)),
    ];
    run(
        "JOSE header and claims (signed)",
        2000,
        (any::<bool>(), bytes),
        |(in_header, bytes)| {
            let (h, c) = if in_header {
                (bytes.as_slice(), good_claims.as_slice())
            } else {
                (good_header.as_slice(), bytes.as_slice())
            };
            let token = sign_raw(h, c, &rsa(), Algorithm::RS256);
            agrees(token.as_bytes(), Algorithm::RS256, &ps)
        },
    );
}

#[test]
fn key_sets_jwks_pem_and_der_never_panic() {
    let jwks = JWKS.to_vec();
    let pem = [RSA_PUB, EC256_PUB, RSA_CRT].concat();
    run(
        "JWKS, x509 map, PEM/DER (mutated and arbitrary)",
        3000,
        prop_oneof![
            (0usize..2, proptest::collection::vec(mutation(), 1..5)),
            proptest::collection::vec(any::<u8>(), 0..300)
                .prop_map(|v| (2usize, vec![Mutation::Insert(0, v)])),
        ],
        |(i, muts)| {
            let base: &[u8] = match i {
                0 => &jwks,
                1 => &pem,
                _ => b"",
            };
            let bytes = mutate(base, &muts);
            let _ = KeySet::from_jwks(&bytes);
            let _ = KeySet::from_pem(&bytes);
            let _ = KeySet::load(&bytes);
            Ok(())
        },
    );
}

#[test]
fn trace_context_headers_never_panic() {
    let tp = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec();
    let ts = b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".to_vec();
    let ct = b"105445aa7843bc8bf206b12000100000/1;o=1".to_vec();
    run(
        "traceparent, tracestate, X-Cloud-Trace-Context",
        5000,
        prop_oneof![
            (0usize..3, proptest::collection::vec(mutation(), 1..4)),
            proptest::collection::vec(any::<u8>(), 0..700)
                .prop_map(|v| (3usize, vec![Mutation::Insert(0, v)])),
        ],
        |(i, muts)| {
            let base: &[u8] = match i {
                0 => &tp,
                1 => &ts,
                2 => &ct,
                _ => b"",
            };
            let v = mutate(base, &muts);
            if let Some(t) = parse_traceparent(&v) {
                prop_assert!(t.trace_id != [0; 16] && t.parent_id != [0; 8]);
            }
            if let Some(kept) = check_tracestate(&v) {
                prop_assert!(kept.len() <= 512 && !kept.is_empty());
            }
            if let Some(t) = parse_cloud_trace(&v) {
                prop_assert!(t.trace_id != [0; 16]);
            }
            Ok(())
        },
    );
}

#[test]
fn claim_paths_patterns_durations_and_sizes_never_panic() {
    run(
        "claim paths, patterns, durations, sizes, rates",
        5000,
        prop_oneof![
            ".{0,40}",
            "[a-z._=:~*@^$\\[\\]0-9-]{0,30}",
            "[0-9]{0,22}(ms|s|m|h|d|w|M|y|k|K|g|G|r/s|r/m|)",
        ],
        |s| {
            let _ = Requirement::parse(&s);
            let _ = Pattern::parse(&s);
            let _ = Pattern::parse(&format!("claim:{s}"));
            let _ = mesh_core::units::parse_time_secs(&s);
            let _ = mesh_core::units::parse_size(&s);
            let _ = mesh_core::gcra::parse_rate(&s);
            let _ = mesh_core::ratesync::parse_sync(&s);
            let _ = mesh_core::trace::parse_ratio(&s);
            Ok(())
        },
    );
    // and what they accept means what it says
    run(
        "durations and sizes (valid)",
        2000,
        (0u64..1_000_000, 0usize..4),
        |(n, unit)| {
            let (suffix, secs) = [("", 1), ("s", 1), ("m", 60), ("h", 3600)][unit];
            prop_assert_eq!(
                mesh_core::units::parse_time_secs(&format!("{n}{suffix}")),
                Ok(n * secs)
            );
            prop_assert_eq!(
                mesh_core::units::parse_size(&format!("{n}k")),
                Ok(n as usize * 1024)
            );
            Ok(())
        },
    );
}

#[test]
fn redis_replies_never_panic_and_stay_within_limits() {
    use mesh_core::resp::{parse, Limits, Value};
    let limits = Limits {
        max_bulk: 64,
        max_items: 8,
        max_depth: 1,
    };
    fn within(v: &Value, l: &Limits) -> bool {
        match v {
            Value::Simple(b) | Value::Error(b) | Value::Bulk(Some(b)) => b.len() <= l.max_bulk,
            Value::Array(Some(items)) => {
                items.len() <= l.max_items
                    && items
                        .iter()
                        .all(|i| within(i, l) && !matches!(i, Value::Array(Some(_))))
            }
            _ => true,
        }
    }
    run(
        "Redis replies",
        5000,
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            "([+:$*-][0-9-]{0,12}\r\n[a-z0-9:$*\r\n]{0,20}){1,6}".prop_map(String::into_bytes),
        ],
        |buf| {
            if let Ok(Some((v, used))) = parse(&buf, &limits) {
                prop_assert!(used <= buf.len());
                prop_assert!(within(&v, &limits));
            }
            Ok(())
        },
    );
}
