//! The span this hop exports (`mesh_trace_export`), built in the log phase once the request
//! is answered: its ids are the ones sent upstream, so the upstream's own spans hang under it.
//! Attributes follow OpenTelemetry's HTTP server conventions, plus the mesh's decision.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use mesh_core::otlp::{span_name, Attr, Span, SpanKind};
use ngx::http::{HttpModuleLocationConf, NgxHttpCoreModule, Request};

use super::ctx::RequestCtx;
use crate::nginx::request::{client_addr, method_name};
use crate::state::span_export;
use mesh_core::decision::Decision;

/// Queues this request's span when its trace is sampled and spans are exported.
pub fn export(r: &Request, ctx: &RequestCtx) {
    if !span_export::active() {
        return;
    }
    let Some(t) = ctx.started_trace() else { return };
    if !t.ctx.sampled {
        return;
    }
    let raw = r.as_ref();
    let method = method_name(r);
    let route = NgxHttpCoreModule::location_conf(r)
        .map(|clcf| clcf.name.to_str().unwrap_or(""))
        .unwrap_or("");
    let start = (raw.start_sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(raw.start_msec as u64 * 1_000_000);
    let end = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        .max(start);
    let status = raw.headers_out.status as i64;
    let path = raw.unparsed_uri.as_bytes();
    let path = &path[..path.iter().position(|&b| b == b'?').unwrap_or(path.len())];

    let mut attributes = Vec::with_capacity(12);
    attributes.push(Attr::str("http.request.method", method));
    attributes.push(Attr::str("url.path", text(path)));
    if !route.is_empty() {
        attributes.push(Attr::str("http.route", route));
    }
    attributes.push(Attr::int("http.response.status_code", status));
    let host = text(raw.headers_in.server.as_bytes());
    if !host.is_empty() {
        attributes.push(Attr::str("server.address", host));
    }
    attributes.push(Attr::str("network.peer.address", text(client_addr(r))));
    let id = ctx.identity();
    if let Some(caller) = id.principal() {
        attributes.push(Attr::str("enduser.id", caller));
    }
    if !id.provider().is_empty() {
        attributes.push(Attr::str("mesh.provider", id.provider()));
    }
    if let Some(d) = ctx.decision() {
        attributes.push(Attr::str("mesh.decision", Decision::as_str(d)));
    }
    if !ctx.rule().is_empty() {
        attributes.push(Attr::str("mesh.rule", ctx.rule()));
    }
    // A call this service makes through `mesh_outbound_auth` is the client side of the hop.
    let kind = if ctx.outbound_used() {
        attributes.push(Attr::str("mesh.route", route));
        SpanKind::Client
    } else {
        SpanKind::Server
    };
    // Encoded here, once: the queue holds bytes, not the request's strings.
    span_export::submit(
        Span {
            trace_id: t.ctx.trace_id,
            span_id: t.ctx.span_id,
            parent_span_id: t.ctx.parent_span_id,
            trace_state: t.tracestate.as_deref().unwrap_or_default(),
            name: span_name(method, route),
            kind,
            start_unix_nanos: start,
            end_unix_nanos: end,
            attributes,
            error: status >= 500,
        }
        .encode(),
    );
}

/// `bytes` as text: borrowed when they are UTF-8 (`from_utf8`'s ASCII path is far quicker
/// than `from_utf8_lossy`'s), else with U+FFFD for what is not.
fn text(bytes: &[u8]) -> Cow<'_, str> {
    std::str::from_utf8(bytes).map_or_else(|_| String::from_utf8_lossy(bytes), Cow::Borrowed)
}
