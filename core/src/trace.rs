//! Trace context: W3C `traceparent`/`tracestate`, Google
//! `X-Cloud-Trace-Context`, id generation, and the sampling decision.
//!
//! The W3C rules follow Trace Context Level 1 (W3C Recommendation,
//! <https://www.w3.org/TR/trace-context/>); section names are cited where a
//! rule comes from. Only `traceresponse` comes from Trace Context Level 2
//! (<https://www.w3.org/TR/trace-context-2/>).
//!
//! One hop, as the nginx shell uses it:
//!
//! 1. [`parse_traceparent`]; when it fails (or the header is absent),
//!    [`parse_cloud_trace`]; when both fail, no incoming context
//!    ("4.2 No traceparent Received": a new trace).
//! 2. [`check_tracestate`], only when `traceparent` parsed ("3.3 Tracestate
//!    Header": a vendor that failed to parse `traceparent` MUST NOT parse
//!    `tracestate`; "4.2 No traceparent Received", step 3: a `tracestate`
//!    without a `traceparent` MUST be discarded).
//! 3. [`TraceContext::start`]: the incoming trace id and decision with a new
//!    span id ("3.4 Mutating the traceparent Field": "Update parent-id"), or
//!    a new trace.
//! 4. [`TraceContext::traceparent`] and [`TraceContext::cloud_trace`] for the
//!    upstream request.
//!
//! Header values are bytes as received; leading and trailing optional white
//! space (spaces and horizontal tabs) is ignored. Several `traceparent`
//! headers in one request are the shell's business (they are not one valid
//! value); several `tracestate` headers are joined with `,` before
//! [`check_tracestate`] ("3.3.1.1 tracestate Header Field Values", RFC 7230
//! section 3.2.2).

use std::fmt;

use crate::text::{self, TextBuf, WriteText};

/// Length of a version-00 `traceparent`: `2 + 1 + 32 + 1 + 16 + 1 + 2`.
const TRACEPARENT_LEN: usize = 55;
/// The `sampled` bit of `trace-flags` ("3.2.2.5.1 Sampled flag").
const FLAG_SAMPLED: u8 = 0x01;
/// Longest `tracestate` passed on, OWS and commas included ("3.3.1.5
/// tracestate Limits": vendors SHOULD propagate at least 512 characters).
pub const TRACESTATE_MAX_LEN: usize = 512;
/// At most 32 list members ("3.3.1.1 tracestate Header Field Values").
pub const TRACESTATE_MAX_MEMBERS: usize = 32;

/// This hop's trace context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// This hop's span (new per hop).
    pub span_id: [u8; 8],
    /// The incoming parent id, if any.
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
}

/// Where the incoming context came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    TraceParent,
    CloudTrace,
    New,
}

/// A parsed incoming context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    /// The caller's sampling decision; `None` = no decision
    /// (`X-Cloud-Trace-Context` without `;o=`).
    pub sampled: Option<bool>,
    pub origin: Origin,
}

/// Strip leading and trailing optional white space (RFC 7230 section 3.2.3
/// `OWS`: spaces and horizontal tabs, nothing else).
fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// `HEXDIGLC` ("3.2.2 traceparent Header Field Values").
fn hexdig_lc(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Any-case hex digit (for `X-Cloud-Trace-Context`).
fn hexdig_any(c: u8) -> Option<u8> {
    hexdig_lc(c.to_ascii_lowercase())
}

/// Exactly `2 * N` hex digits to `N` bytes.
fn decode_hex<const N: usize>(s: &[u8], digit: fn(u8) -> Option<u8>) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// Lowercase hex of `bytes`.
fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// `traceparent` / `traceresponse` of a context ([`TraceContext::w3c_field`]):
/// [`W3C_FIELD_LEN`] bytes.
pub struct W3cField<'a>(&'a TraceContext);

impl WriteText for W3cField<'_> {
    fn max_len(&self) -> usize {
        W3C_FIELD_LEN
    }

    fn write_text(&self, out: &mut TextBuf<'_>) {
        out.bytes(b"00-");
        out.hex(&self.0.trace_id);
        out.byte(b'-');
        out.hex(&self.0.span_id);
        out.bytes(if self.0.sampled { b"-01" } else { b"-00" });
    }
}

impl fmt::Display for W3cField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        text::display(self, f)
    }
}

/// `X-Cloud-Trace-Context` of a context ([`TraceContext::cloud_trace_field`]): at most
/// [`CLOUD_TRACE_FIELD_MAX_LEN`] bytes.
pub struct CloudTraceField<'a>(&'a TraceContext);

impl WriteText for CloudTraceField<'_> {
    fn max_len(&self) -> usize {
        CLOUD_TRACE_FIELD_MAX_LEN
    }

    fn write_text(&self, out: &mut TextBuf<'_>) {
        out.hex(&self.0.trace_id);
        out.byte(b'/');
        out.decimal(u64::from_be_bytes(self.0.span_id));
        out.bytes(if self.0.sampled { b";o=1" } else { b";o=0" });
    }
}

impl fmt::Display for CloudTraceField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        text::display(self, f)
    }
}

/// The length of `traceparent` and `traceresponse` (version 00).
pub const W3C_FIELD_LEN: usize = TRACEPARENT_LEN;
/// The longest `X-Cloud-Trace-Context` this module writes (a 20-digit span id).
pub const CLOUD_TRACE_FIELD_MAX_LEN: usize = 32 + 1 + 20 + 4;

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Parse a W3C `traceparent` value ("3.2 Traceparent Header"):
/// `version "-" trace-id "-" parent-id "-" trace-flags`, lowercase hex only
/// (`HEXDIGLC`, "3.2.2 traceparent Header Field Values").
///
/// * "3.2.2.1 version": version `ff` is invalid.
/// * "3.2.2.2 version-format": version `00` is exactly 55 characters, so
///   anything after `trace-flags` makes it invalid.
/// * "3.2.4 Versioning of traceparent": a higher (unknown) version is parsed
///   as version `00` from its first 55 characters, which must be followed by
///   the end of the value or a `-`; what follows is ignored ("Vendors MUST
///   NOT parse or assume anything about unknown fields").
/// * "3.2.2.3 trace-id", "3.2.2.4 parent-id": all zeroes is invalid.
/// * "3.2.2.5 trace-flags": `sampled` is bit 0x01; other bits are ignored
///   (and never propagated, "3.2.2.5.2 Other Flags").
///
/// Leading and trailing OWS (spaces, tabs) is trimmed first.
pub fn parse_traceparent(v: &[u8]) -> Option<Incoming> {
    let v = trim_ows(v);
    if v.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = decode_hex::<1>(&v[0..2], hexdig_lc)?[0];
    if version == 0xff || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = decode_hex::<16>(&v[3..35], hexdig_lc)?;
    let parent_id = decode_hex::<8>(&v[36..52], hexdig_lc)?;
    let flags = decode_hex::<1>(&v[53..55], hexdig_lc)?[0];
    let rest_ok = if version == 0 {
        v.len() == TRACEPARENT_LEN
    } else {
        v.len() == TRACEPARENT_LEN || v[TRACEPARENT_LEN] == b'-'
    };
    if !rest_ok || is_zero(&trace_id) || is_zero(&parent_id) {
        return None;
    }
    Some(Incoming {
        trace_id,
        parent_id,
        sampled: Some(flags & FLAG_SAMPLED != 0),
        origin: Origin::TraceParent,
    })
}

/// Parse Google's `X-Cloud-Trace-Context: TRACE_ID/SPAN_ID;o=OPTIONS`.
///
/// `TRACE_ID` is 32 hex digits in any case (normalised to bytes; all zeroes
/// is invalid); `SPAN_ID` is the span id as an unsigned decimal, required,
/// `1..=u64::MAX` (digits only: no sign, no white space); `;o=1` means
/// sampled, `;o=0` not sampled, no `;o=` means no decision (`sampled:
/// None`). Anything else (other options, trailing characters) is invalid.
/// Leading and trailing OWS is trimmed first.
pub fn parse_cloud_trace(v: &[u8]) -> Option<Incoming> {
    let v = trim_ows(v);
    let slash = v.iter().position(|&c| c == b'/')?;
    let trace_id = decode_hex::<16>(&v[..slash], hexdig_any)?;
    if is_zero(&trace_id) {
        return None;
    }
    let rest = &v[slash + 1..];
    let (span, options) = match rest.iter().position(|&c| c == b';') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let sampled = match options {
        None => None,
        Some(b"o=1") => Some(true),
        Some(b"o=0") => Some(false),
        Some(_) => return None,
    };
    let span = parse_decimal_u64(span)?;
    if span == 0 {
        return None;
    }
    Some(Incoming {
        trace_id,
        parent_id: span.to_be_bytes(),
        sampled,
        origin: Origin::CloudTrace,
    })
}

/// One or more ASCII digits that fit in a `u64`.
fn parse_decimal_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &c| {
        if !c.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(c - b'0'))
    })
}

/// Check a `tracestate` value ("3.3 Tracestate Header") before passing it
/// on. Call it only when `traceparent` parsed ("3.3 Tracestate Header");
/// `None` means: drop the header ("4.3 A traceparent is Received", step 3:
/// a `tracestate` that cannot be parsed MAY be discarded).
///
/// * "3.3.1.1 tracestate Header Field Values", "3.3.1.2 list": list
///   members separated by `,` with OWS around them; empty and
///   whitespace-only members are allowed and not counted; at most 32
///   members.
/// * "3.3.1.3.1 Key": `simple-key` (`lcalpha 0*255(lcalpha / DIGIT / "_" /
///   "-" / "*" / "/")`) or `multi-tenant-key` (`tenant-id "@" system-id`).
/// * "3.3.1.3.2 Value": 1 to 256 printable ASCII characters (0x20-0x7E)
///   except `,` and `=`, not ending in a space.
/// * "3.3.1.4 Combined Header Value": only one entry per key.
/// * "3.3.1.5 tracestate Limits": at most [`TRACESTATE_MAX_LEN`] characters
///   (commas and OWS included) are passed on; a longer value is dropped
///   whole.
///
/// Returns the value without its leading and trailing OWS, or `None` when it
/// is invalid or has no members (vendors "SHOULD avoid sending" empty
/// `tracestate` headers).
pub fn check_tracestate(v: &[u8]) -> Option<&[u8]> {
    let v = trim_ows(v);
    if v.len() > TRACESTATE_MAX_LEN {
        return None;
    }
    let mut keys: [&[u8]; TRACESTATE_MAX_MEMBERS] = [&[]; TRACESTATE_MAX_MEMBERS];
    let mut n = 0;
    for member in v.split(|&c| c == b',') {
        let member = trim_ows(member);
        if member.is_empty() {
            continue;
        }
        if n == TRACESTATE_MAX_MEMBERS {
            return None;
        }
        let eq = member.iter().position(|&c| c == b'=')?;
        let (key, value) = (&member[..eq], &member[eq + 1..]);
        if !tracestate_key(key) || !tracestate_value(value) || keys[..n].contains(&key) {
            return None;
        }
        keys[n] = key;
        n += 1;
    }
    if n == 0 {
        None
    } else {
        Some(v)
    }
}

/// `lcalpha / DIGIT / "_" / "-" / "*" / "/"` ("3.3.1.3.1 Key").
fn key_char(c: u8) -> bool {
    matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/')
}

/// `first 0*max_tail(key_char)`.
fn key_part(s: &[u8], first: fn(u8) -> bool, max_tail: usize) -> bool {
    match s.split_first() {
        Some((&c, tail)) => first(c) && tail.len() <= max_tail && tail.iter().all(|&c| key_char(c)),
        None => false,
    }
}

/// "3.3.1.3.1 Key": `simple-key / multi-tenant-key`.
fn tracestate_key(key: &[u8]) -> bool {
    let lcalpha = |c: u8| c.is_ascii_lowercase();
    let lcalpha_digit = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match key.iter().position(|&c| c == b'@') {
        None => key_part(key, lcalpha, 255),
        Some(at) => {
            key_part(&key[..at], lcalpha_digit, 240) && key_part(&key[at + 1..], lcalpha, 13)
        }
    }
}

/// "3.3.1.3.2 Value": `0*255(chr) nblk-chr`.
fn tracestate_value(value: &[u8]) -> bool {
    let chr = |c: u8| matches!(c, 0x20..=0x7e) && c != b',' && c != b'=';
    !value.is_empty()
        && value.len() <= 256
        && value.iter().all(|&c| chr(c))
        && value.last() != Some(&b' ')
}

/// SplitMix64's output function (Steele, Lea, Flood 2014): a bijection on
/// `u64` that maps 0 to 0.
fn splitmix64_mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64's increment, the golden ratio in 64 bits.
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Per-worker id generator: the ChaCha20 keystream (RFC 8439, as aws-lc computes it for
/// ChaCha20-Poly1305 over zeroes) under a 256-bit key, the seed, which the nginx shell reads
/// from the OS after fork, so that workers and restarts never share a sequence.
///
/// Span ids are published (`traceparent` upstream, `traceresponse` to the client): from a
/// stream cipher, ids seen tell nothing about the key, hence nothing about the ids before or
/// after them (a linear generator such as xoshiro gives its whole state away in a few
/// outputs). Ids are never all zeroes ("3.2.2.3 trace-id", "3.2.2.4 parent-id"): a zero draw
/// is drawn again.
pub struct IdGenerator {
    /// `None` only if aws-lc refused a 32-byte ChaCha20 key (it never does).
    key: Option<aws_lc_rs::aead::LessSafeKey>,
    /// The nonce of the next block of keystream (a counter: never repeats under one key).
    nonce: u64,
    buf: [u8; ID_BUFFER],
    /// Bytes of `buf` already handed out.
    used: usize,
}

/// Keystream drawn at once: 256 span ids per call into aws-lc (each call costs a fixed
/// ~1 500 instructions of setup and tag besides the keystream: at 256 bytes a call, that
/// was most of an id's cost).
const ID_BUFFER: usize = 2048;

impl std::fmt::Debug for IdGenerator {
    /// The state stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdGenerator").finish_non_exhaustive()
    }
}

impl IdGenerator {
    /// A generator keyed by `seed` (32 bytes from the OS); the same seed gives the same
    /// sequence, any other seed an unrelated one.
    pub fn from_seed(seed: [u8; 32]) -> IdGenerator {
        use aws_lc_rs::aead::{LessSafeKey, UnboundKey, CHACHA20_POLY1305};
        // A 32-byte key is what ChaCha20 takes: this does not fail.
        let key = UnboundKey::new(&CHACHA20_POLY1305, &seed)
            .ok()
            .map(LessSafeKey::new);
        IdGenerator {
            key,
            nonce: 0,
            buf: [0; ID_BUFFER],
            used: ID_BUFFER,
        }
    }

    /// The next block of keystream.
    fn refill(&mut self) {
        use aws_lc_rs::aead::{Aad, Nonce};
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.nonce.to_be_bytes());
        self.nonce = self.nonce.wrapping_add(1);
        self.buf = [0; ID_BUFFER];
        let sealed = self.key.as_ref().map(|k| {
            k.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(n),
                Aad::empty(),
                &mut self.buf,
            )
        });
        if !matches!(sealed, Some(Ok(_))) {
            // Never for 2 KiB; were it to happen, the counter still makes each block
            // distinct (ids unique, not secret), rather than all zeroes forever.
            for (i, chunk) in self.buf.chunks_exact_mut(8).enumerate() {
                let v = splitmix64_mix(self.nonce ^ (i as u64).wrapping_mul(GOLDEN_GAMMA));
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
        self.used = 0;
    }

    /// The next 64 random bits.
    fn next_u64(&mut self) -> u64 {
        if self.used + 8 > ID_BUFFER {
            self.refill();
        }
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.buf[self.used..self.used + 8]);
        self.used += 8;
        u64::from_le_bytes(w)
    }

    /// A random non-zero 16-byte trace id ("3.2.2.3 trace-id").
    pub fn trace_id(&mut self) -> [u8; 16] {
        loop {
            let (hi, lo) = (self.next_u64(), self.next_u64());
            if hi != 0 || lo != 0 {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&hi.to_be_bytes());
                id[8..].copy_from_slice(&lo.to_be_bytes());
                return id;
            }
        }
    }

    /// A random non-zero 8-byte span id ("3.2.2.4 parent-id").
    pub fn span_id(&mut self) -> [u8; 8] {
        loop {
            let n = self.next_u64();
            if n != 0 {
                return n.to_be_bytes();
            }
        }
    }

    /// Uniform in `[0, 1)`: the top 53 bits as a multiple of 2^-53.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

impl TraceContext {
    /// This hop's context.
    ///
    /// With an incoming context: keep its trace id, take its parent id as
    /// `parent_span_id` and draw a new span id (different from the parent
    /// id) — "3.4 Mutating the traceparent Field", "Update parent-id". Its
    /// sampling decision is kept whatever `ratio` says ("3.2.2.5.1 Sampled
    /// flag": a component that needs to make a recording decision SHOULD
    /// respect the `sampled` flag). Without a decision
    /// (`X-Cloud-Trace-Context` without `;o=`), decide by `ratio`.
    ///
    /// Without an incoming context, start a new trace ("4.2 No traceparent
    /// Received"), sampled with probability `ratio` (0 never, 1 always; a
    /// NaN never samples).
    pub fn start(incoming: Option<&Incoming>, ratio: f64, ids: &mut IdGenerator) -> TraceContext {
        let (trace_id, parent_span_id, decision) = match incoming {
            Some(inc) => (inc.trace_id, Some(inc.parent_id), inc.sampled),
            None => (ids.trace_id(), None, None),
        };
        let span_id = loop {
            let id = ids.span_id();
            if Some(id) != parent_span_id {
                break id;
            }
        };
        let sampled = match decision {
            Some(s) => s,
            None => ids.next_f64() < ratio,
        };
        TraceContext {
            trace_id,
            span_id,
            parent_span_id,
            sampled,
        }
    }

    /// The trace id: 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        encode_hex(&self.trace_id)
    }

    /// This hop's span id: 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        encode_hex(&self.span_id)
    }

    /// The incoming parent id: 16 lowercase hex digits, or `""` when none.
    pub fn parent_span_id_hex(&self) -> String {
        self.parent_span_id
            .map_or_else(String::new, |p| encode_hex(&p))
    }

    /// `00-`, `-01` or `-00` around trace and span.
    fn w3c(&self) -> String {
        self.w3c_field().to_string()
    }

    /// [`traceparent`](Self::traceparent) (and [`traceresponse`](Self::traceresponse)), to
    /// write into a buffer without allocating ([`WriteText`]): [`W3C_FIELD_LEN`] bytes.
    pub fn w3c_field(&self) -> W3cField<'_> {
        W3cField(self)
    }

    /// [`cloud_trace`](Self::cloud_trace), to write into a buffer ([`WriteText`]): at most
    /// [`CLOUD_TRACE_FIELD_MAX_LEN`] bytes.
    pub fn cloud_trace_field(&self) -> CloudTraceField<'_> {
        CloudTraceField(self)
    }

    /// The `traceparent` for upstream: `00-TRACE-SPAN-FLAGS`, version 00
    /// ("3.2.4 Versioning of traceparent": construct it per the highest
    /// version known), this hop's span id as `parent-id`, and `trace-flags`
    /// `01` if sampled else `00` (unknown flags are not propagated,
    /// "3.2.2.5.2 Other Flags").
    pub fn traceparent(&self) -> String {
        self.w3c()
    }

    /// The `X-Cloud-Trace-Context` for upstream: `TRACE/SPAN_DECIMAL;o=1`
    /// (or `;o=0`), the span id as an unsigned decimal.
    pub fn cloud_trace(&self) -> String {
        self.cloud_trace_field().to_string()
    }

    /// The `traceresponse` response header (Trace Context Level 2,
    /// "traceresponse Header Field Values"): `00-TRACE-CHILD-FLAGS`, the
    /// same shape as [`traceparent`](Self::traceparent), with this hop's
    /// span id as `child-id`.
    pub fn traceresponse(&self) -> String {
        self.w3c()
    }
}

/// `projects/PROJECT/traces/TRACE` (Cloud Logging's `trace` field); `""`
/// when `project` is empty.
pub fn cloud_logging_trace(project: &str, ctx: &TraceContext) -> String {
    if project.is_empty() {
        return String::new();
    }
    format!("projects/{project}/traces/{}", ctx.trace_id_hex())
}

/// Parse the argument of `mesh_trace_sample RATIO;`: a plain decimal number
/// (digits with at most one `.`: `0`, `1`, `0.25`, `1.0`, `.5`) from 0 to 1.
/// Signs, exponents, `inf` and `NaN` are refused.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    let err = |why: &str| format!("invalid ratio \"{}\": {why}", s.escape_debug());
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    let dots = s.bytes().filter(|&c| c == b'.').count();
    if digits == 0 || dots > 1 || digits + dots != s.len() {
        return Err(err("expected a number from 0 to 1, like 0.25"));
    }
    let ratio: f64 = s
        .parse()
        .map_err(|_| err("expected a number from 0 to 1, like 0.25"))?;
    if !(0.0..=1.0).contains(&ratio) {
        return Err(err("must be from 0 to 1"));
    }
    Ok(ratio)
}
