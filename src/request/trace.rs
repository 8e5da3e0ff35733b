//! This hop's trace: started from the incoming `traceparent` (else, when none came at all,
//! `X-Cloud-Trace-Context`)
//! with a new span id from the worker's generator.

use std::cell::RefCell;

use mesh_core::text::{TextBuf, WriteText};
use mesh_core::trace::{
    check_tracestate, cloud_logging_trace, parse_cloud_trace, parse_traceparent, IdGenerator,
    TraceContext, CLOUD_TRACE_FIELD_MAX_LEN, W3C_FIELD_LEN,
};
use ngx::http::Request;

use crate::conf::LocConf;
use crate::nginx::headers::{header_in, headers_in_all};

/// Text of at most `N` bytes, rendered once into the value itself (no heap).
pub struct FixedText<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> FixedText<N> {
    /// `value`, cut at `N` bytes (callers size `N` for the longest value).
    pub fn render(value: &impl WriteText) -> FixedText<N> {
        let mut buf = [0u8; N];
        let len = {
            let mut out = TextBuf::new(&mut buf);
            value.write_text(&mut out);
            out.len()
        };
        FixedText { buf, len }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

/// This hop's trace: the context, plus the header values derived from it.
pub struct Trace {
    pub ctx: TraceContext,
    pub traceparent: FixedText<W3C_FIELD_LEN>,
    pub cloud_trace: FixedText<CLOUD_TRACE_FIELD_MAX_LEN>,
    /// The incoming `tracestate`, kept only with a valid incoming `traceparent`.
    pub tracestate: Option<Vec<u8>>,
}

thread_local! {
    /// The worker's id generator, seeded from the operating system after fork
    /// (`seed_worker`), so that no two workers, and no restart, share a sequence.
    static IDS: RefCell<Option<IdGenerator>> = const { RefCell::new(None) };
}

/// Seeds this worker's id generator from the OS. Called from `init_process`.
pub fn seed_worker() -> bool {
    let mut seed = [0u8; 32];
    if getrandom::getrandom(&mut seed).is_err() {
        return false;
    }
    IDS.with(|ids| *ids.borrow_mut() = Some(IdGenerator::from_seed(seed)));
    true
}

/// Starts this hop's trace from the request's incoming headers.
pub(super) fn start(r: &Request, lcf: &LocConf) -> Option<Trace> {
    // Several `traceparent` headers make the context invalid; several `tracestate` headers
    // are one list (W3C Trace Context, 3.2 and 3.3).
    let mut parents = r
        .headers_in_iterator()
        .filter(|(k, _)| k.as_bytes().eq_ignore_ascii_case(b"traceparent"));
    let (first, second) = (parents.next(), parents.next());
    let any_parent = first.is_some();
    let parent = match (first, second) {
        (Some((_, one)), None) => parse_traceparent(one.as_bytes()),
        _ => None,
    };
    let (incoming, tracestate) = match parent {
        Some(tp) => {
            let joined = headers_in_all(r, "tracestate").join(&b","[..]);
            let ts = check_tracestate(&joined).map(<[u8]>::to_vec);
            (Some(tp), ts)
        }
        // A `traceparent` that is present but invalid starts a new trace, with no
        // `tracestate` (W3C Trace Context 3.2.2, 3.3.1): it is not a reason to trust
        // `X-Cloud-Trace-Context`, which only counts when no `traceparent` came at all.
        None if any_parent => (None, None),
        None => (
            header_in(r, "X-Cloud-Trace-Context").and_then(parse_cloud_trace),
            None,
        ),
    };
    let ctx = IDS.with(|ids| {
        let mut ids = ids.borrow_mut();
        if ids.is_none() {
            // Not seeded (init_process failed to read the OS): refuse to guess.
            return None;
        }
        ids.as_mut()
            .map(|g| TraceContext::start(incoming.as_ref(), lcf.trace_sample, g))
    })?;
    Some(Trace {
        traceparent: FixedText::render(&ctx.w3c_field()),
        cloud_trace: FixedText::render(&ctx.cloud_trace_field()),
        ctx,
        tracestate,
    })
}

/// `$mesh_cloud_trace`.
pub fn cloud_logging(lcf: &LocConf, t: &Trace) -> String {
    cloud_logging_trace(&lcf.trace_project, &t.ctx)
}
