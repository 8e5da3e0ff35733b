//! Trace context: the W3C Trace Context Level 1 `traceparent` and
//! `tracestate` tables, `X-Cloud-Trace-Context`, id generation, the sampling
//! decision and the outgoing header formats.

use std::collections::HashSet;

use mesh_core::trace::{
    check_tracestate, cloud_logging_trace, parse_cloud_trace, parse_ratio, parse_traceparent,
    IdGenerator, Incoming, Origin, TraceContext, TRACESTATE_MAX_LEN,
};

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT: &str = "b7ad6b7169203331";
const TRACE_BYTES: [u8; 16] = [
    0x0a, 0xf7, 0x65, 0x19, 0x16, 0xcd, 0x43, 0xdd, 0x84, 0x48, 0xeb, 0x21, 0x1c, 0x80, 0x31, 0x9c,
];
const PARENT_BYTES: [u8; 8] = [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31];

fn tp(version: &str, trace: &str, parent: &str, flags: &str) -> String {
    format!("{version}-{trace}-{parent}-{flags}")
}

fn parse(v: &str) -> Option<Incoming> {
    parse_traceparent(v.as_bytes())
}

fn valid(v: &str) -> bool {
    parse(v).is_some()
}

fn sampled(v: &str) -> Option<bool> {
    parse(v).and_then(|i| i.sampled)
}

fn ids() -> IdGenerator {
    IdGenerator::from_seed(*b"0123456789abcdef0123456789abcdef")
}

// ---------------------------------------------------------------------------
// traceparent

#[test]
fn traceparent_valid() {
    let got = parse(&tp("00", TRACE, PARENT, "01")).unwrap();
    assert_eq!(
        got,
        Incoming {
            trace_id: TRACE_BYTES,
            parent_id: PARENT_BYTES,
            sampled: Some(true),
            origin: Origin::TraceParent,
        }
    );
    // The spec's examples ("3.2.3 Examples of HTTP traceparent Headers").
    let ex = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    assert_eq!(
        ex.parent_id,
        [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
    );
    assert_eq!(ex.sampled, Some(true));
    assert_eq!(
        sampled("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        Some(false)
    );
}

#[test]
fn traceparent_version() {
    assert!(!valid(&tp("ff", TRACE, PARENT, "01")));
    for bad in [
        "0", "000", "0g", ".0", "0.", "-0", "0A", "A0", "CC", "  ", "+0", "0-",
    ] {
        assert!(!valid(&tp(bad, TRACE, PARENT, "01")), "version {bad:?}");
    }
    // Any other version parses ("3.2.4 Versioning of traceparent").
    for good in ["01", "02", "0a", "cc", "fe"] {
        assert!(valid(&tp(good, TRACE, PARENT, "01")), "version {good:?}");
    }
}

#[test]
fn traceparent_upper_case_hex() {
    assert!(!valid(&tp("0A", TRACE, PARENT, "01")));
    assert!(!valid(&tp(
        "00",
        "0AF7651916CD43DD8448EB211C80319C",
        PARENT,
        "01"
    )));
    assert!(!valid(&tp(
        "00",
        "0af7651916cd43dd8448eb211c80319C",
        PARENT,
        "01"
    )));
    assert!(!valid(&tp("00", TRACE, "B7AD6B7169203331", "01")));
    assert!(!valid(&tp("00", TRACE, "b7ad6b716920333A", "01")));
    assert!(!valid(&tp("00", TRACE, PARENT, "0A")));
    assert!(!valid(&tp("00", TRACE, PARENT, "FF")));
}

#[test]
fn traceparent_all_zero_ids() {
    assert!(!valid(&tp(
        "00",
        "00000000000000000000000000000000",
        PARENT,
        "01"
    )));
    assert!(!valid(&tp("00", TRACE, "0000000000000000", "01")));
    // Also for a higher version.
    assert!(!valid(&tp(
        "cc",
        "00000000000000000000000000000000",
        PARENT,
        "01"
    )));
    assert!(!valid(&tp("cc", TRACE, "0000000000000000", "01")));
    // One non-zero digit is enough.
    assert!(valid(&tp(
        "00",
        "00000000000000000000000000000001",
        "0000000000000001",
        "01"
    )));
}

#[test]
fn traceparent_field_lengths() {
    let short_trace = &TRACE[..31];
    let long_trace = format!("{TRACE}0");
    let short_parent = &PARENT[..15];
    let long_parent = format!("{PARENT}0");
    for v in [
        tp("00", short_trace, PARENT, "01"),
        tp("00", &long_trace, PARENT, "01"),
        tp("00", TRACE, short_parent, "01"),
        tp("00", TRACE, &long_parent, "01"),
        tp("00", TRACE, PARENT, "1"),
        tp("00", TRACE, PARENT, "001"),
        tp("00", &long_trace, short_parent, "01"),
        tp("00", short_trace, &long_parent, "01"),
        tp("cc", short_trace, PARENT, "01"),
        tp("cc", TRACE, &long_parent, "01"),
        tp("cc", TRACE, PARENT, "1"),
        tp("cc", TRACE, PARENT, "001"),
        tp("00", TRACE, PARENT, ""),
        String::new(),
        "00".into(),
        "00-".into(),
    ] {
        assert!(!valid(&v), "{v:?}");
    }
}

#[test]
fn traceparent_version_00_is_exactly_55() {
    let base = tp("00", TRACE, PARENT, "01");
    assert_eq!(base.len(), 55);
    for suffix in ["-", "-what-the-future-will-be-like", ".", "0", " x", "-01"] {
        let v = format!("{base}{suffix}");
        assert!(!valid(&v), "{v:?}");
    }
}

#[test]
fn traceparent_higher_version() {
    let base = tp("01", TRACE, PARENT, "01");
    // Exactly 55.
    let got = parse(&base).unwrap();
    assert_eq!(got.trace_id, TRACE_BYTES);
    assert_eq!(got.parent_id, PARENT_BYTES);
    assert_eq!(got.sampled, Some(true));
    // Extra fields after a '-' are ignored, whatever they hold.
    for suffix in [
        "-what-ever",
        "-",
        "-what-the-future-will-be-like",
        "-XYZ.,;",
    ] {
        let v = format!("{base}{suffix}");
        assert_eq!(parse(&v), Some(got), "{v:?}");
    }
    assert_eq!(
        sampled(&format!("{}-what-ever", tp("cc", TRACE, PARENT, "00"))),
        Some(false)
    );
    // The 56th character must be '-'.
    for suffix in [".what-ever", "0", "1-what-ever", "x", "_"] {
        let v = format!("{base}{suffix}");
        assert!(!valid(&v), "{v:?}");
    }
    // Shorter than 55: not parsed.
    assert!(!valid(&base[..54]));
}

#[test]
fn traceparent_flags() {
    for (flags, want) in [
        ("00", false),
        ("01", true),
        ("02", false),
        ("03", true),
        ("09", true),
        ("0f", true),
        ("10", false),
        ("fe", false),
        ("ff", true),
    ] {
        assert_eq!(
            sampled(&tp("00", TRACE, PARENT, flags)),
            Some(want),
            "flags {flags}"
        );
    }
    for bad in ["0g", ".0", "0.", "-1", "  ", "0 "] {
        assert!(!valid(&tp("00", TRACE, PARENT, bad)), "flags {bad:?}");
    }
}

#[test]
fn traceparent_dashes() {
    let good = tp("00", TRACE, PARENT, "01");
    // Each dash replaced, or removed.
    for at in [2, 35, 52] {
        for with in ["_", ".", " ", "", "0"] {
            let v = format!("{}{with}{}", &good[..at], &good[at + 1..]);
            assert!(!valid(&v), "{v:?}");
        }
    }
    assert!(!valid(&format!("00{TRACE}{PARENT}01")));
    assert!(!valid(&format!("00-{TRACE}{PARENT}-01")));
    // Dashes in the wrong places (right length overall).
    assert!(!valid(&format!(
        "00-{}-{}{}-01",
        &TRACE[..31],
        &TRACE[31..],
        PARENT
    )));
    assert!(!valid(&format!("00--{}-{}-01", &TRACE[..31], PARENT)));
    // For a higher version too.
    assert!(!valid(&format!("01-{TRACE}_{PARENT}-01-what-ever")));
    assert!(!valid(&format!("01-{TRACE}-{PARENT}_01-what-ever")));
    assert!(!valid(&format!("01_{TRACE}-{PARENT}-01-what-ever")));
}

#[test]
fn traceparent_non_hex() {
    let good = tp("00", TRACE, PARENT, "01");
    // Every hex position, with characters that are not lowercase hex.
    let positions = (0..55).filter(|&i| !matches!(i, 2 | 35 | 52));
    for i in positions {
        for c in ["g", "z", ".", "-", " ", "G", "\u{7f}", "\0"] {
            let v = format!("{}{c}{}", &good[..i], &good[i + 1..]);
            assert!(!valid(&v), "{v:?}");
        }
    }
    // Non-ASCII (a multi-byte character) instead of a field.
    assert!(!valid(&format!("00-{}é-{PARENT}-01", &TRACE[..30])));
    assert!(parse_traceparent(&[0xff; 55]).is_none());
}

#[test]
fn traceparent_ows() {
    let good = tp("00", TRACE, PARENT, "01");
    for v in [
        format!(" {good}"),
        format!("{good} "),
        format!("\t{good}"),
        format!("{good}\t"),
        format!(" \t  {good}\t \t"),
        format!("   {}-what-ever  ", tp("cc", TRACE, PARENT, "01")),
    ] {
        assert_eq!(
            parse(&v).map(|i| (i.trace_id, i.parent_id)),
            Some((TRACE_BYTES, PARENT_BYTES)),
            "{v:?}"
        );
    }
    // Only spaces and tabs are OWS; none inside the value.
    for v in [
        format!("{good}\r\n"),
        format!("\n{good}"),
        format!("{good}\u{b}"),
        format!("00 -{TRACE}-{PARENT}-01"),
        format!("00- {TRACE}-{PARENT}-01"),
        format!("00-{TRACE}-{PARENT}- 01"),
        " ".into(),
        "\t \t".into(),
    ] {
        assert!(!valid(&v), "{v:?}");
    }
}

// ---------------------------------------------------------------------------
// X-Cloud-Trace-Context

fn xctc(v: &str) -> Option<Incoming> {
    parse_cloud_trace(v.as_bytes())
}

#[test]
fn cloud_trace_valid() {
    let want = |sampled| Incoming {
        trace_id: TRACE_BYTES,
        parent_id: 12345u64.to_be_bytes(),
        sampled,
        origin: Origin::CloudTrace,
    };
    assert_eq!(xctc(&format!("{TRACE}/12345;o=1")), Some(want(Some(true))));
    assert_eq!(xctc(&format!("{TRACE}/12345;o=0")), Some(want(Some(false))));
    assert_eq!(xctc(&format!("{TRACE}/12345")), Some(want(None)));
    assert_eq!(
        xctc(&format!(" \t{TRACE}/12345;o=1 ")),
        Some(want(Some(true)))
    );
    // Leading zeros are still the same number.
    assert_eq!(xctc(&format!("{TRACE}/0012345")), Some(want(None)));
}

#[test]
fn cloud_trace_span_decimal_hex_round_trip() {
    let inc = xctc(&format!("{TRACE}/12345;o=1")).unwrap();
    assert_eq!(inc.parent_id, [0, 0, 0, 0, 0, 0, 0x30, 0x39]);
    let ctx = TraceContext {
        trace_id: inc.trace_id,
        span_id: inc.parent_id,
        parent_span_id: None,
        sampled: true,
    };
    assert_eq!(ctx.span_id_hex(), "0000000000003039");
    assert_eq!(ctx.cloud_trace(), format!("{TRACE}/12345;o=1"));
    assert_eq!(xctc(&ctx.cloud_trace()).unwrap().parent_id, ctx.span_id);

    let max = xctc(&format!("{TRACE}/18446744073709551615;o=0")).unwrap();
    assert_eq!(max.parent_id, [0xff; 8]);
    let ctx = TraceContext {
        span_id: max.parent_id,
        sampled: false,
        ..ctx
    };
    assert_eq!(ctx.span_id_hex(), "ffffffffffffffff");
    assert_eq!(
        ctx.cloud_trace(),
        format!("{TRACE}/18446744073709551615;o=0")
    );
    assert_eq!(
        xctc(&format!("{TRACE}/1")).unwrap().parent_id,
        [0, 0, 0, 0, 0, 0, 0, 1]
    );
}

#[test]
fn cloud_trace_upper_case_normalised() {
    let upper = xctc(&format!("{}/12345;o=1", TRACE.to_uppercase())).unwrap();
    assert_eq!(upper.trace_id, TRACE_BYTES);
    let mixed = xctc("0AF7651916cd43dd8448EB211C80319c/12345").unwrap();
    assert_eq!(mixed.trace_id, TRACE_BYTES);
    let ctx = TraceContext::start(Some(&upper), 1.0, &mut ids());
    assert_eq!(ctx.trace_id_hex(), TRACE);
}

#[test]
fn cloud_trace_invalid() {
    for v in [
        // span id: 0, overflow, missing, not decimal
        format!("{TRACE}/0;o=1"),
        format!("{TRACE}/0"),
        format!("{TRACE}/00000"),
        format!("{TRACE}/18446744073709551616;o=1"),
        format!("{TRACE}/99999999999999999999"),
        format!("{TRACE}/;o=1"),
        format!("{TRACE}/"),
        TRACE.to_string(),
        format!("{TRACE};o=1"),
        format!("{TRACE}/+12345"),
        format!("{TRACE}/-1"),
        format!("{TRACE}/12a45"),
        format!("{TRACE}/0x3039"),
        format!("{TRACE}/12 345"),
        format!("{TRACE}/ 12345"),
        format!("{TRACE}/12345 ;o=1"),
        // trace id: bad hex, wrong length, all zero
        format!("{}g/12345;o=1", &TRACE[..31]),
        format!("{}/12345;o=1", &TRACE[..31]),
        format!("{TRACE}0/12345;o=1"),
        "00000000000000000000000000000000/12345;o=1".to_string(),
        "/12345;o=1".to_string(),
        format!("-{}/12345", &TRACE[..31]),
        // options
        format!("{TRACE}/12345;o=2"),
        format!("{TRACE}/12345;o="),
        format!("{TRACE}/12345;"),
        format!("{TRACE}/12345;o=10"),
        format!("{TRACE}/12345;o=1;o=1"),
        format!("{TRACE}/12345;O=1"),
        format!("{TRACE}/12345;x=1"),
        format!("{TRACE}/12345;o=1x"),
        format!("{TRACE}/12345;o= 1"),
        format!("{TRACE}/12345/6;o=1"),
        String::new(),
        "/".into(),
    ] {
        assert_eq!(xctc(&v), None, "{v:?}");
    }
}

// ---------------------------------------------------------------------------
// tracestate

fn ts(v: &str) -> Option<&str> {
    check_tracestate(v.as_bytes()).map(|s| std::str::from_utf8(s).unwrap())
}

#[test]
fn tracestate_valid() {
    for v in [
        "rojo=00f067aa0ba902b7",
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
        "congo=ucfJifl5GOE,rojo=00f067aa0ba902b7",
        "foo=1 , bar=2",
        "foo=1,\tbar=2",
        "foo=1,,bar=2",
        "foo=1, ,bar=2,",
        ",foo=1",
        "foo= leading space kept",
        "foo=!\"#$%&'()*+-./:;<>?@[\\]^_`{|}~",
        "a=1",
        "a_-*/9=x",
        "tenant@system=x",
        "0tenant@s=x",
        "t-_*/9@s-_*/9=x",
    ] {
        assert_eq!(ts(v), Some(v), "{v:?}");
    }
    // Leading and trailing OWS is trimmed.
    assert_eq!(ts("  foo=1,bar=2 \t"), Some("foo=1,bar=2"));
    assert_eq!(ts("foo=bar   "), Some("foo=bar"));
    // 32 members (plus empty ones, which do not count).
    let members: Vec<String> = (0..32).map(|i| format!("k{i}=v")).collect();
    let v = members.join(",");
    assert_eq!(ts(&v), Some(v.as_str()));
    let v = format!(",{}, ,", members.join(", ,"));
    assert_eq!(ts(&v), Some(v.as_str()));
    // Keys and values at their longest.
    let v = format!("a{}=v,k={}", "b".repeat(255), "v".repeat(251));
    assert_eq!(v.len(), TRACESTATE_MAX_LEN);
    assert_eq!(ts(&v), Some(v.as_str()));
    let v = format!("k={}", "v".repeat(256));
    assert_eq!(ts(&v), Some(v.as_str()));
    let v = format!("t{}@s{}=x", "b".repeat(240), "y".repeat(13));
    assert_eq!(ts(&v), Some(v.as_str()));
    // Exactly the length limit.
    let v = format!("a={} , b={}", "v".repeat(255), "w".repeat(250));
    assert_eq!(v.len(), TRACESTATE_MAX_LEN);
    assert_eq!(ts(&v), Some(v.as_str()));
}

#[test]
fn tracestate_invalid() {
    for v in [
        // keys
        "Foo=1",
        "fOo=1",
        "=1",
        "1foo=1",
        "_foo=1",
        "foo.bar=1",
        "foo bar=1",
        "foo\tbar=1",
        "foo =1",
        "@sys=1",
        "tenant@=1",
        "tenant@1sys=1",
        "_t@sys=1",
        "a@b@c=1",
        "tenant@Sys=1",
        // values
        "foo",
        "foo=",
        "foo=1=2",
        "foo==1",
        "foo=a\tb",
        "foo=a\u{7f}",
        "foo=é",
        "foo=a\nb",
        // duplicated keys ("3.3.1.4 Combined Header Value")
        "foo=1,foo=1",
        "foo=1,bar=2,foo=3",
        // empty: nothing to pass on
        "",
        " ",
        ",",
        " , ,\t",
    ] {
        assert_eq!(ts(v), None, "{v:?}");
    }
    // Too long keys and values.
    assert_eq!(ts(&format!("a{}=1", "b".repeat(256))), None);
    assert_eq!(ts(&format!("a={}", "v".repeat(257))), None);
    assert_eq!(ts(&format!("t{}@s=1", "b".repeat(241))), None);
    assert_eq!(ts(&format!("t@s{}=1", "b".repeat(14))), None);
    // 33 members.
    let v: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
    assert_eq!(ts(&v.join(",")), None);
    // Over 512 characters (OWS and commas count).
    let v = format!("k={}", "v".repeat(TRACESTATE_MAX_LEN - 1));
    assert_eq!(v.len(), TRACESTATE_MAX_LEN + 1);
    assert_eq!(ts(&v), None);
    let v = format!("a={},b={}", "v".repeat(250), "w".repeat(250));
    assert!(ts(&v).is_some());
    let v = format!("a={} , b={}", "v".repeat(255), "w".repeat(251));
    assert_eq!(v.len(), TRACESTATE_MAX_LEN + 1);
    assert_eq!(ts(&v), None);
    // Non-UTF-8 bytes.
    assert_eq!(check_tracestate(b"foo=\xff"), None);
}

// ---------------------------------------------------------------------------
// IdGenerator

#[test]
fn ids_unique_and_non_zero() {
    let mut g = ids();
    let mut seen = HashSet::with_capacity(1_000_000);
    for _ in 0..1_000_000 {
        let id = g.span_id();
        assert_ne!(id, [0; 8]);
        assert!(seen.insert(id), "repeated span id {id:02x?}");
    }
    let mut traces = HashSet::new();
    for _ in 0..10_000 {
        let id = g.trace_id();
        assert_ne!(id, [0; 16]);
        assert!(traces.insert(id));
    }
}

#[test]
fn ids_depend_on_the_seed() {
    let seq = |seed: [u8; 32]| {
        let mut g = IdGenerator::from_seed(seed);
        (0..100).map(|_| g.span_id()).collect::<Vec<_>>()
    };
    let a = seq([1; 32]);
    let b = seq([2; 32]);
    assert_ne!(a, b);
    assert!(a.iter().all(|id| !b.contains(id)));
    // Seeds that differ in one bit anywhere give unrelated sequences.
    let base = seq([0x5a; 32]);
    for byte in 0..32 {
        let mut seed = [0x5a; 32];
        seed[byte] ^= 0x01;
        let other = seq(seed);
        assert!(other.iter().all(|id| !base.contains(id)), "byte {byte}");
    }
    // The same seed gives the same sequence.
    assert_eq!(seq([7; 32]), seq([7; 32]));
}

#[test]
fn ids_zero_seed() {
    let mut g = IdGenerator::from_seed([0; 32]);
    let mut seen = HashSet::new();
    for _ in 0..10_000 {
        let id = g.span_id();
        assert_ne!(id, [0; 8]);
        assert!(seen.insert(id));
    }
    let t = g.trace_id();
    assert_ne!(t, [0; 16]);
    assert_ne!(t[..8], t[8..]);
    // The words of the state are not all alike: bits are spread.
    let ones: u32 = (0..1000)
        .map(|_| u64::from_be_bytes(g.span_id()).count_ones())
        .sum();
    assert!((30_000..34_000).contains(&ones), "{ones}");
    assert!(format!("{g:?}").starts_with("IdGenerator"));
}

#[test]
fn next_f64_range() {
    let mut g = ids();
    let n = 200_000;
    let (mut sum, mut low, mut high) = (0.0, 0, 0);
    for _ in 0..n {
        let x = g.next_f64();
        assert!((0.0..1.0).contains(&x), "{x}");
        sum += x;
        if x < 0.01 {
            low += 1;
        }
        if x >= 0.99 {
            high += 1;
        }
    }
    let mean = sum / f64::from(n);
    assert!((0.49..0.51).contains(&mean), "{mean}");
    assert!((1_600..2_400).contains(&low), "{low}");
    assert!((1_600..2_400).contains(&high), "{high}");
    let mut z = IdGenerator::from_seed([0; 32]);
    assert!((0..1000).all(|_| (0.0..1.0).contains(&z.next_f64())));
}

// ---------------------------------------------------------------------------
// TraceContext::start

#[test]
fn start_from_traceparent() {
    let mut g = ids();
    for (flags, want) in [("01", true), ("00", false), ("03", true), ("ff", true)] {
        let inc = parse(&tp("00", TRACE, PARENT, flags)).unwrap();
        for ratio in [0.0, 0.5, 1.0] {
            let ctx = TraceContext::start(Some(&inc), ratio, &mut g);
            assert_eq!(ctx.trace_id, TRACE_BYTES);
            assert_eq!(ctx.parent_span_id, Some(PARENT_BYTES));
            assert_ne!(ctx.span_id, PARENT_BYTES);
            assert_ne!(ctx.span_id, [0; 8]);
            assert_eq!(ctx.sampled, want, "flags {flags} ratio {ratio}");
            // Unknown flags are not propagated.
            let flags_out = if want { "01" } else { "00" };
            assert_eq!(
                ctx.traceparent(),
                format!("00-{TRACE}-{}-{flags_out}", ctx.span_id_hex())
            );
        }
    }
    // A higher version is sent on as version 00.
    let inc = parse(&format!("{}-what-ever", tp("cc", TRACE, PARENT, "01"))).unwrap();
    let ctx = TraceContext::start(Some(&inc), 0.0, &mut g);
    assert!(ctx.traceparent().starts_with(&format!("00-{TRACE}-")));
    assert!(ctx.traceparent().ends_with("-01"));
    // New span ids per hop.
    let a = TraceContext::start(Some(&inc), 1.0, &mut g);
    let b = TraceContext::start(Some(&inc), 1.0, &mut g);
    assert_ne!(a.span_id, b.span_id);
}

#[test]
fn start_from_cloud_trace() {
    let mut g = ids();
    let with = |o: &str| xctc(&format!("{TRACE}/12345{o}")).unwrap();
    for ratio in [0.0, 1.0] {
        let ctx = TraceContext::start(Some(&with(";o=1")), ratio, &mut g);
        assert!(ctx.sampled);
        assert_eq!(ctx.parent_span_id, Some(12345u64.to_be_bytes()));
        assert_eq!(ctx.parent_span_id_hex(), "0000000000003039");
        assert_ne!(ctx.span_id, 12345u64.to_be_bytes());
        let ctx = TraceContext::start(Some(&with(";o=0")), ratio, &mut g);
        assert!(!ctx.sampled);
        assert_eq!(ctx.trace_id, TRACE_BYTES);
    }
    // No decision: keep the trace id, decide by ratio.
    let none = with("");
    for _ in 0..100 {
        let ctx = TraceContext::start(Some(&none), 0.0, &mut g);
        assert_eq!(ctx.trace_id, TRACE_BYTES);
        assert_eq!(ctx.parent_span_id, Some(12345u64.to_be_bytes()));
        assert!(!ctx.sampled);
        assert!(TraceContext::start(Some(&none), 1.0, &mut g).sampled);
    }
    let n = 20_000;
    let hits = (0..n)
        .filter(|_| TraceContext::start(Some(&none), 0.25, &mut g).sampled)
        .count();
    assert!((4_500..5_500).contains(&hits), "{hits}");
}

#[test]
fn start_new_trace() {
    let mut g = ids();
    let mut traces = HashSet::new();
    for _ in 0..1000 {
        let ctx = TraceContext::start(None, 0.0, &mut g);
        assert!(!ctx.sampled);
        assert_eq!(ctx.parent_span_id, None);
        assert_eq!(ctx.parent_span_id_hex(), "");
        assert_ne!(ctx.trace_id, [0; 16]);
        assert_ne!(ctx.span_id, [0; 8]);
        assert!(traces.insert(ctx.trace_id));
        assert!(TraceContext::start(None, 1.0, &mut g).sampled);
        assert!(!TraceContext::start(None, f64::NAN, &mut g).sampled);
    }
    let n = 20_000;
    let hits = (0..n)
        .filter(|_| TraceContext::start(None, 0.25, &mut g).sampled)
        .count();
    assert!((4_500..5_500).contains(&hits), "{hits}");
    // Origin::New exists for the shell to report where a context came from.
    assert_ne!(Origin::New, Origin::TraceParent);
}

// ---------------------------------------------------------------------------
// Formatting

fn ctx(sampled: bool, parent: Option<[u8; 8]>) -> TraceContext {
    TraceContext {
        trace_id: TRACE_BYTES,
        span_id: [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
        parent_span_id: parent,
        sampled,
    }
}

#[test]
fn formatting() {
    let c = ctx(true, Some(PARENT_BYTES));
    assert_eq!(c.trace_id_hex(), TRACE);
    assert_eq!(c.span_id_hex(), "00f067aa0ba902b7");
    assert_eq!(c.parent_span_id_hex(), PARENT);
    assert_eq!(
        c.traceparent(),
        "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
    );
    assert_eq!(
        c.traceresponse(),
        "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
    );
    assert_eq!(
        c.cloud_trace(),
        "0af7651916cd43dd8448eb211c80319c/67667974448284343;o=1"
    );
    assert_eq!(
        cloud_logging_trace("shop-prod", &c),
        "projects/shop-prod/traces/0af7651916cd43dd8448eb211c80319c"
    );
    assert_eq!(cloud_logging_trace("", &c), "");

    let c = ctx(false, None);
    assert_eq!(c.parent_span_id_hex(), "");
    assert_eq!(
        c.traceparent(),
        "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-00"
    );
    assert_eq!(
        c.traceresponse(),
        "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-00"
    );
    assert_eq!(
        c.cloud_trace(),
        "0af7651916cd43dd8448eb211c80319c/67667974448284343;o=0"
    );

    // What we send parses back to the same ids and decision.
    let mut g = ids();
    for sampled in [true, false] {
        let c = TraceContext::start(None, if sampled { 1.0 } else { 0.0 }, &mut g);
        let back = parse(&c.traceparent()).unwrap();
        assert_eq!(
            (back.trace_id, back.parent_id, back.sampled),
            (c.trace_id, c.span_id, Some(sampled))
        );
        let back = xctc(&c.cloud_trace()).unwrap();
        assert_eq!(
            (back.trace_id, back.parent_id, back.sampled),
            (c.trace_id, c.span_id, Some(sampled))
        );
        assert_eq!(c.traceresponse(), c.traceparent());
        assert_eq!(c.trace_id_hex().len(), 32);
        assert_eq!(c.span_id_hex().len(), 16);
    }
}

// ---------------------------------------------------------------------------
// parse_ratio

#[test]
fn ratio() {
    for (s, want) in [
        ("0", 0.0),
        ("1", 1.0),
        ("0.25", 0.25),
        ("1.0", 1.0),
        ("0.0", 0.0),
        ("0.001", 0.001),
        (".5", 0.5),
        ("0.", 0.0),
        ("00.5", 0.5),
        ("1.000", 1.0),
    ] {
        assert_eq!(parse_ratio(s), Ok(want), "{s:?}");
    }
    for s in [
        "", "-0", "-0.1", "-1", "1.1", "1.0001", "2", "10", "NaN", "nan", "inf", "-inf",
        "infinity", "abc", "0.5x", "1e-1", "1e0", "+0.5", " 0.5", "0.5 ", "0.5.1", ".", "0,5",
        "50%", "½",
    ] {
        let err = parse_ratio(s).unwrap_err();
        assert!(err.starts_with("invalid ratio"), "{s:?}: {err}");
    }
    assert_eq!(
        parse_ratio("1.5").unwrap_err(),
        "invalid ratio \"1.5\": must be from 0 to 1"
    );
}

#[test]
fn fields_render_as_the_strings() {
    use mesh_core::trace::{CLOUD_TRACE_FIELD_MAX_LEN, W3C_FIELD_LEN};
    let mut ids = IdGenerator::from_seed([7; 32]);
    for sampled in [0.0, 1.0] {
        let mut ctx = TraceContext::start(None, sampled, &mut ids);
        for span in [[0u8; 8], [0xff; 8], ctx.span_id] {
            ctx.span_id = span;
            let tp = ctx.w3c_field().to_string();
            assert_eq!(tp, ctx.traceparent());
            assert_eq!(tp, ctx.traceresponse());
            assert_eq!(tp.len(), W3C_FIELD_LEN);
            let ct = ctx.cloud_trace_field().to_string();
            assert_eq!(
                ct,
                format!(
                    "{}/{};o={}",
                    ctx.trace_id_hex(),
                    u64::from_be_bytes(span),
                    u8::from(ctx.sampled)
                )
            );
            assert!(ct.len() <= CLOUD_TRACE_FIELD_MAX_LEN);
        }
    }
}
