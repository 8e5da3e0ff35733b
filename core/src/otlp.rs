//! Spans as OTLP/HTTP protobuf (`opentelemetry/proto/collector/trace/v1`
//! `ExportTraceServiceRequest`), encoded by hand: the few messages a hop needs, written
//! field by field in field-number order, with no schema compiler and no allocation per field.
//! A span borrows what it reports from the request and is encoded once, on the worker
//! ([`Span::encode`]); the exporter only joins encoded spans into a request body.
//!
//! What a request's hop becomes is decided here too ([`Span`], [`Attr`]); the shell only
//! fills the values it reads from nginx.

use std::borrow::Cow;

/// `Span.SpanKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// An inbound request (`SPAN_KIND_SERVER`).
    Server = 2,
    /// A call this hop makes to another service (`SPAN_KIND_CLIENT`).
    Client = 3,
}

/// An attribute value (`AnyValue`): the kinds spans here carry.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Bool(bool),
}

/// One attribute (`KeyValue`).
#[derive(Clone, Debug, PartialEq)]
pub struct Attr<'a> {
    pub key: &'static str,
    pub value: Value<'a>,
}

impl<'a> Attr<'a> {
    pub fn str(key: &'static str, v: impl Into<Cow<'a, str>>) -> Attr<'a> {
        Attr {
            key,
            value: Value::Str(v.into()),
        }
    }

    pub fn int(key: &'static str, v: i64) -> Attr<'a> {
        Attr {
            key,
            value: Value::Int(v),
        }
    }

    pub fn bool(key: &'static str, v: bool) -> Attr<'a> {
        Attr {
            key,
            value: Value::Bool(v),
        }
    }
}

/// One hop, as it is exported.
#[derive(Clone, Debug, PartialEq)]
pub struct Span<'a> {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The incoming `traceparent`'s span; `None` for a trace that starts here.
    pub parent_span_id: Option<[u8; 8]>,
    /// The incoming `tracestate`, as received (W3C, passed on unchanged).
    pub trace_state: &'a [u8],
    pub name: Cow<'a, str>,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<Attr<'a>>,
    /// `STATUS_CODE_ERROR` (a 5xx answer, OTel HTTP semantic conventions for servers);
    /// otherwise the status is left unset.
    pub error: bool,
}

/// The `Resource` every span of a process shares, and the instrumentation scope's name and
/// version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resource {
    pub attributes: Vec<Attr<'static>>,
    pub scope_name: String,
    pub scope_version: String,
}

/// The span's name: the method and the route (the location as configured), as OTel's HTTP
/// conventions name server spans: `GET /orders/`.
pub fn span_name<'a>(method: &'a str, route: &str) -> Cow<'a, str> {
    if route.is_empty() {
        Cow::Borrowed(method)
    } else {
        let mut s = String::with_capacity(method.len() + 1 + route.len());
        s.push_str(method);
        s.push(' ');
        s.push_str(route);
        Cow::Owned(s)
    }
}

/// `mesh_trace_export URL [interval=TIME] [batch=N] [queue=N] [auth=google];`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSettings {
    /// Where spans are POSTed: the URL as written when it has a path, else with
    /// `/v1/traces` added (OTLP/HTTP's default path, as OTel SDKs do with a bare endpoint).
    pub url: String,
    /// How long a span may wait for its batch, in milliseconds.
    pub interval_ms: u64,
    /// Spans per request to the receiver, at most.
    pub batch: usize,
    /// Spans a worker holds at most; more are dropped and counted.
    pub queue: usize,
    /// `auth=google`: an access token from the metadata server on every export.
    pub auth_google: bool,
}

/// Defaults: a batch at least every second (a Cloud Run instance whose CPU is throttled
/// between requests still sends within about a second of a request), OTel's batch
/// processor's sizes.
pub const DEFAULT_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_BATCH: usize = 512;
pub const DEFAULT_QUEUE: usize = 2048;

/// Parses the directive's arguments (after its name).
pub fn parse_export(args: &[&str]) -> Result<ExportSettings, String> {
    let (url, opts) = args.split_first().ok_or("a URL is required")?;
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("invalid URL \"{url}\": it must start with http:// or https://"))?;
    let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if host_end == 0
        || rest.bytes().any(|b| b <= b' ' || b == 0x7f)
        || rest[..host_end].contains('@')
    {
        return Err(format!("invalid URL \"{}\"", url.escape_debug()));
    }
    let url = match &rest[host_end..] {
        "" | "/" => format!("{}/v1/traces", url.trim_end_matches('/')),
        _ => url.to_string(),
    };
    let mut out = ExportSettings {
        url,
        interval_ms: DEFAULT_INTERVAL_MS,
        batch: DEFAULT_BATCH,
        queue: DEFAULT_QUEUE,
        auth_google: false,
    };
    let mut seen: Vec<&str> = Vec::new();
    for opt in opts {
        let (k, v) = opt
            .split_once('=')
            .ok_or_else(|| format!("invalid parameter \"{opt}\""))?;
        if seen.contains(&k) {
            return Err(format!("duplicate parameter \"{k}\""));
        }
        seen.push(k);
        let count = |lo: usize, hi: usize| {
            v.parse::<usize>()
                .ok()
                .filter(|n| (lo..=hi).contains(n))
                .ok_or_else(|| format!("invalid {k} \"{v}\": a number from {lo} to {hi}"))
        };
        match k {
            "interval" => out.interval_ms = parse_interval(v)?,
            "batch" => out.batch = count(1, 8192)?,
            "queue" => out.queue = count(1, 1 << 20)?,
            "auth" if v == "google" => out.auth_google = true,
            "auth" => {
                return Err(format!(
                    "invalid auth \"{v}\": the only value is \"google\""
                ))
            }
            _ => return Err(format!("invalid parameter \"{opt}\"")),
        }
    }
    if out.queue < out.batch {
        return Err(format!(
            "queue={} is smaller than batch={}",
            out.queue, out.batch
        ));
    }
    Ok(out)
}

/// `interval=`: `100ms`, `1s`, `2m` (nginx's time syntax; a bare number is seconds),
/// from 10 ms to 60 s.
fn parse_interval(v: &str) -> Result<u64, String> {
    let err = || format!("invalid interval \"{v}\": a time from 10ms to 60s, like 1s");
    let ms = match v.strip_suffix("ms") {
        Some(d) if !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) => {
            d.parse::<u64>().map_err(|_| err())?
        }
        Some(_) => return Err(err()),
        None => crate::units::parse_time_secs(v)
            .map_err(|_| err())?
            .checked_mul(1000)
            .ok_or_else(err)?,
    };
    if !(10..=60_000).contains(&ms) {
        return Err(err());
    }
    Ok(ms)
}

/// The metadata server's access token answer (`{"access_token": ..., "expires_in": N}`):
/// the token and its lifetime in seconds.
pub fn parse_access_token(body: &[u8]) -> Result<(String, u64), String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "access token: not JSON".to_string())?;
    let token = v["access_token"]
        .as_str()
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or("access token: no access_token")?;
    Ok((token.to_string(), v["expires_in"].as_u64().unwrap_or(0)))
}

// Wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire)));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A length-delimited submessage written by `body`: the body goes into `out` after one
/// byte reserved for its length, which is all a body under 128 bytes needs (an attribute);
/// a longer body is moved up by the bytes its length takes beyond that one.
fn message(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    key(out, field, LEN);
    let at = out.len();
    out.push(0);
    body(out);
    let len = out.len() - at - 1;
    if len < 0x80 {
        out[at] = len as u8;
        return;
    }
    let mut prefix = Vec::with_capacity(10);
    varint(&mut prefix, len as u64);
    let extra = prefix.len() - 1;
    out.resize(out.len() + extra, 0);
    out.copy_within(at + 1..at + 1 + len, at + 1 + extra);
    out[at..at + prefix.len()].copy_from_slice(&prefix);
}

/// The bytes of `v` as a varint.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// The encoded length of an `AnyValue` holding `v`.
fn any_value_len(v: &Value) -> usize {
    match v {
        Value::Str(s) => 1 + varint_len(s.len() as u64) + s.len(),
        Value::Bool(_) => 2,
        Value::Int(i) => 1 + varint_len(*i as u64),
    }
}

fn any_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Str(s) => bytes_field(out, 1, s.as_bytes()),
        Value::Bool(b) => {
            key(out, 2, VARINT);
            varint(out, u64::from(*b));
        }
        Value::Int(i) => {
            key(out, 3, VARINT);
            varint(out, *i as u64);
        }
    }
}

/// A `KeyValue`, its lengths computed first: written front to back, no length patched in
/// (a span has a dozen; through [`message`] they cost about twice as much).
fn key_value(out: &mut Vec<u8>, field: u32, a: &Attr) {
    let klen = a.key.len();
    let any_len = any_value_len(&a.value);
    let kv_len = 1 + varint_len(klen as u64) + klen + 1 + varint_len(any_len as u64) + any_len;
    out.reserve(kv_len + 11);
    key(out, field, LEN);
    varint(out, kv_len as u64);
    bytes_field(out, 1, a.key.as_bytes());
    key(out, 2, LEN);
    varint(out, any_len as u64);
    any_value(out, &a.value);
}

fn span(out: &mut Vec<u8>, s: &Span<'_>) {
    bytes_field(out, 1, &s.trace_id);
    bytes_field(out, 2, &s.span_id);
    if !s.trace_state.is_empty() {
        bytes_field(out, 3, s.trace_state);
    }
    if let Some(p) = &s.parent_span_id {
        bytes_field(out, 4, p);
    }
    bytes_field(out, 5, s.name.as_bytes());
    key(out, 6, VARINT);
    varint(out, s.kind as u64);
    key(out, 7, FIXED64);
    out.extend_from_slice(&s.start_unix_nanos.to_le_bytes());
    key(out, 8, FIXED64);
    out.extend_from_slice(&s.end_unix_nanos.to_le_bytes());
    for a in &s.attributes {
        key_value(out, 9, a);
    }
    if s.error {
        // Status { code = STATUS_CODE_ERROR (2) }
        message(out, 15, |out| {
            key(out, 3, VARINT);
            varint(out, 2);
        });
    }
    // flags: the W3C trace flags in the low byte (sampled: every exported span is), and
    // bit 8 set: whether the parent is remote is known (bit 9: it is).
    let remote = if s.parent_span_id.is_some() { 0x200 } else { 0 };
    key(out, 16, FIXED32);
    out.extend_from_slice(&(0x101u32 | remote).to_le_bytes());
}

/// A [`Span`] message's bytes ([`Span::encode`]), ready to join a batch ([`encode_export`]).
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedSpan(Vec<u8>);

impl Span<'_> {
    /// The span as protobuf: what the exporter sends of it, owning nothing of the request.
    pub fn encode(&self) -> EncodedSpan {
        let attrs: usize = self
            .attributes
            .iter()
            .map(|a| a.key.len() + 8 + any_value_len(&a.value))
            .sum();
        let mut out = Vec::with_capacity(96 + self.trace_state.len() + self.name.len() + attrs);
        span(&mut out, self);
        EncodedSpan(out)
    }
}

/// `ExportTraceServiceRequest` for `spans`, all under `resource`.
pub fn encode_export(resource: &Resource, spans: &[EncodedSpan]) -> Vec<u8> {
    let body: usize = spans.iter().map(|s| s.0.len() + 4).sum();
    let mut out = Vec::with_capacity(256 + body);
    // resource_spans = 1
    message(&mut out, 1, |out| {
        // resource = 1 { attributes = 1 }
        message(out, 1, |out| {
            for a in &resource.attributes {
                key_value(out, 1, a);
            }
        });
        // scope_spans = 2 { scope = 1 { name = 1, version = 2 }, spans = 2 }
        message(out, 2, |out| {
            message(out, 1, |out| {
                bytes_field(out, 1, resource.scope_name.as_bytes());
                bytes_field(out, 2, resource.scope_version.as_bytes());
            });
            for s in spans {
                bytes_field(out, 2, &s.0);
            }
        });
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal protobuf reader for the tests: (field, wire type, payload) triples.
    fn fields(mut b: &[u8]) -> Vec<(u32, u8, Vec<u8>)> {
        fn read_varint(b: &mut &[u8]) -> u64 {
            let mut v = 0u64;
            let mut shift = 0;
            loop {
                let byte = b[0];
                *b = &b[1..];
                v |= u64::from(byte & 0x7f) << shift;
                if byte < 0x80 {
                    return v;
                }
                shift += 7;
            }
        }
        let mut out = Vec::new();
        while !b.is_empty() {
            let k = read_varint(&mut b);
            let (field, wire) = ((k >> 3) as u32, (k & 7) as u8);
            let payload = match wire {
                VARINT => read_varint(&mut b).to_le_bytes().to_vec(),
                FIXED64 => {
                    let (p, rest) = b.split_at(8);
                    b = rest;
                    p.to_vec()
                }
                FIXED32 => {
                    let (p, rest) = b.split_at(4);
                    b = rest;
                    p.to_vec()
                }
                LEN => {
                    let n = read_varint(&mut b) as usize;
                    let (p, rest) = b.split_at(n);
                    b = rest;
                    p.to_vec()
                }
                w => panic!("wire type {w}"),
            };
            out.push((field, wire, payload));
        }
        out
    }

    fn one(fs: &[(u32, u8, Vec<u8>)], field: u32) -> Vec<u8> {
        let mut it = fs.iter().filter(|f| f.0 == field);
        let v = it.next().expect("field present").2.clone();
        assert!(it.next().is_none(), "field {field} repeated");
        v
    }

    fn sample() -> Span<'static> {
        Span {
            trace_id: [0xab; 16],
            span_id: [1, 2, 3, 4, 5, 6, 7, 8],
            parent_span_id: Some([9; 8]),
            trace_state: b"k=v",
            name: span_name("GET", "/orders/"),
            kind: SpanKind::Server,
            start_unix_nanos: 1_700_000_000_123_000_000,
            end_unix_nanos: 1_700_000_000_456_000_000,
            attributes: vec![
                Attr::str("http.request.method", "GET"),
                Attr::int("http.response.status_code", 503),
                Attr::bool("b", true),
            ],
            error: true,
        }
    }

    #[test]
    fn varint_lengths_are_what_varint_writes() {
        for v in [
            0u64,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(varint_len(v), out.len(), "{v}");
        }
    }

    #[test]
    fn varints_are_little_endian_base_128() {
        for (v, want) in [
            (0u64, vec![0u8]),
            (1, vec![1]),
            (127, vec![0x7f]),
            (128, vec![0x80, 1]),
            (300, vec![0xac, 2]),
            (
                u64::MAX,
                vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1],
            ),
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out, want, "{v}");
        }
    }

    #[test]
    fn a_span_carries_every_field_once_in_its_place() {
        let res = Resource {
            attributes: vec![Attr::str("service.name", "orders")],
            scope_name: "ngx-mesh".into(),
            scope_version: "0.1.0".into(),
        };
        let body = encode_export(&res, &[sample().encode(), sample().encode()]);
        let top = fields(&body);
        assert_eq!(top.len(), 1);
        let rs = fields(&one(&top, 1));
        let resource = fields(&one(&rs, 1));
        let kv = fields(&one(&resource, 1));
        assert_eq!(one(&kv, 1), b"service.name");
        assert_eq!(fields(&one(&kv, 2)), vec![(1, LEN, b"orders".to_vec())]);
        let ss = fields(&one(&rs, 2));
        let scope = fields(&one(&ss, 1));
        assert_eq!(one(&scope, 1), b"ngx-mesh");
        assert_eq!(one(&scope, 2), b"0.1.0");
        let spans: Vec<_> = ss.iter().filter(|f| f.0 == 2).collect();
        assert_eq!(spans.len(), 2);
        let s = fields(&spans[0].2);
        assert_eq!(one(&s, 1), [0xab; 16]);
        assert_eq!(one(&s, 2), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(one(&s, 3), b"k=v");
        assert_eq!(one(&s, 4), [9; 8]);
        assert_eq!(one(&s, 5), b"GET /orders/");
        assert_eq!(one(&s, 6)[0], 2);
        assert_eq!(one(&s, 7), 1_700_000_000_123_000_000u64.to_le_bytes());
        assert_eq!(one(&s, 8), 1_700_000_000_456_000_000u64.to_le_bytes());
        let attrs: Vec<_> = s
            .iter()
            .filter(|f| f.0 == 9)
            .map(|f| fields(&f.2))
            .collect();
        assert_eq!(attrs.len(), 3);
        assert_eq!(one(&attrs[1], 1), b"http.response.status_code");
        let v = fields(&one(&attrs[1], 2));
        assert_eq!((v[0].0, v[0].1), (3, VARINT));
        assert_eq!(u64::from_le_bytes(v[0].2[..8].try_into().unwrap()), 503);
        let status = fields(&one(&s, 15));
        assert_eq!(one(&status, 3)[0], 2);
        assert_eq!(one(&s, 16), 0x301u32.to_le_bytes());
    }

    #[test]
    fn a_root_span_has_no_parent_and_an_ok_span_no_status() {
        let mut s = sample();
        s.parent_span_id = None;
        s.trace_state = b"";
        s.error = false;
        let body = encode_export(&Resource::default(), &[s.encode()]);
        let rs = fields(&one(&fields(&body), 1));
        let ss = fields(&one(&rs, 2));
        let span = fields(&one(&ss, 2));
        for absent in [3, 4, 15] {
            assert!(span.iter().all(|f| f.0 != absent), "field {absent}");
        }
        assert_eq!(one(&span, 16), 0x101u32.to_le_bytes());
    }

    #[test]
    fn long_messages_get_multi_byte_lengths() {
        let mut s = sample();
        s.name = "x".repeat(300).into();
        let body = encode_export(&Resource::default(), &[s.encode()]);
        let rs = fields(&one(&fields(&body), 1));
        let ss = fields(&one(&rs, 2));
        let span = fields(&one(&ss, 2));
        assert_eq!(one(&span, 5).len(), 300);
    }

    #[test]
    fn export_settings_parse_with_defaults_and_bounds() {
        let s = parse_export(&["http://127.0.0.1:4318"]).unwrap();
        assert_eq!(s.url, "http://127.0.0.1:4318/v1/traces");
        assert_eq!(
            (s.interval_ms, s.batch, s.queue, s.auth_google),
            (1000, 512, 2048, false)
        );
        let s = parse_export(&[
            "https://telemetry.googleapis.com/v1/traces",
            "interval=250ms",
            "batch=10",
            "queue=100",
            "auth=google",
        ])
        .unwrap();
        assert_eq!(s.url, "https://telemetry.googleapis.com/v1/traces");
        assert_eq!(
            (s.interval_ms, s.batch, s.queue, s.auth_google),
            (250, 10, 100, true)
        );
        assert_eq!(
            parse_export(&["http://h/", "interval=2s"])
                .unwrap()
                .interval_ms,
            2000
        );
        assert_eq!(parse_export(&["http://h/x"]).unwrap().url, "http://h/x");
        for bad in [
            &["ftp://h"][..],
            &[][..],
            &["http://"][..],
            &["http://u:p@h/"][..],
            &["http://h", "interval=5ms"][..],
            &["http://h", "interval=2m"][..],
            &["http://h", "interval=x"][..],
            &["http://h", "batch=0"][..],
            &["http://h", "queue=10", "batch=20"][..],
            &["http://h", "auth=aws"][..],
            &["http://h", "batch=1", "batch=2"][..],
            &["http://h", "color=red"][..],
            &["http://h", "batch"][..],
        ] {
            assert!(parse_export(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn access_tokens_are_read_from_the_metadata_answer() {
        let body = br#"{"access_token":"ya29.abc","expires_in":3599,"token_type":"Bearer"}"#;
        assert_eq!(parse_access_token(body).unwrap(), ("ya29.abc".into(), 3599));
        for bad in [
            &b"{}"[..],
            b"nope",
            br#"{"access_token":"a b"}"#,
            br#"{"access_token":""}"#,
        ] {
            assert!(parse_access_token(bad).is_err());
        }
    }

    #[test]
    fn names_are_method_and_route() {
        assert_eq!(span_name("POST", "/orders/"), "POST /orders/");
        assert_eq!(span_name("GET", ""), "GET");
    }
}
