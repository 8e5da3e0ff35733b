//! This hop's trace: started from the incoming `traceparent` (else, when none came at all,
//! `X-Cloud-Trace-Context`)
//! with a new span id from the worker's generator.

use std::cell::RefCell;

use mesh_core::trace::{
    check_tracestate, cloud_logging_trace, parse_cloud_trace, parse_traceparent, IdGenerator,
    TraceContext,
};
use ngx::http::Request;

use crate::conf::LocConf;
use crate::nginx::headers::{header_in, headers_in_all};

/// This hop's trace: the context, plus the header values derived from it.
pub struct Trace {
    pub ctx: TraceContext,
    pub traceparent: String,
    pub cloud_trace: String,
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
    let parents = headers_in_all(r, "traceparent");
    let parent = match parents.as_slice() {
        [one] => parse_traceparent(one),
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
        None if !parents.is_empty() => (None, None),
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
        traceparent: ctx.traceparent(),
        cloud_trace: ctx.cloud_trace(),
        ctx,
        tracestate,
    })
}

/// `$mesh_cloud_trace`.
pub fn cloud_logging(lcf: &LocConf, t: &Trace) -> String {
    cloud_logging_trace(&lcf.trace_project, &t.ctx)
}
