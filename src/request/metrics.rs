//! `mesh_status`: the content handler that answers with the counters, in the Prometheus text
//! format (the log phase counts each request: `count`).

use std::ptr;

use mesh_core::decision::Decision;
use mesh_core::metrics::{
    Exposition, Kind, AUTH_STATUSES, CODE_CLASSES, CONTENT_TYPE, REFRESH_RESULTS,
};
use ngx::core::{Buffer, Status};
use ngx::ffi::{
    ngx_chain_t, ngx_http_request_t, ngx_int_t, ngx_str_t, NGX_HTTP_GET, NGX_HTTP_HEAD,
    NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_NOT_ALLOWED,
};
use ngx::http::{HTTPStatus, HttpModuleMainConf, Request};

use crate::conf::MainConf;
use crate::nginx::no_panic;
use crate::state::metrics::{self, CallerCounts, Snapshot, SPAN_DROPS};
use crate::state::unix_now;
use crate::MeshModule;

/// The content handler: GET and HEAD only; never blocks (relaxed loads of shared counters,
/// and each rate zone's mutex for two words).
pub unsafe extern "C" fn handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    no_panic(NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls content handlers with a live request.
        let r = unsafe { Request::from_ngx_http_request(r) };
        let method = r.as_ref().method;
        if method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as usize == 0 {
            return NGX_HTTP_NOT_ALLOWED as ngx_int_t;
        }
        let rc = r.discard_request_body();
        if rc != Status::NGX_OK {
            return rc.into();
        }
        let Some(mcf) = MeshModule::main_conf(r) else {
            return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        };
        let body = render(mcf, metrics::snapshot().as_ref());
        send(r, &body, method & NGX_HTTP_HEAD as usize != 0)
    })
}

fn send(r: &mut Request, body: &str, head: bool) -> ngx_int_t {
    r.set_status(HTTPStatus::OK);
    r.set_content_length_n(body.len());
    // A static string as the response's content type (nginx only reads it).
    let out = &mut r.as_mut().headers_out;
    out.content_type = ngx_str_t {
        len: CONTENT_TYPE.len(),
        data: CONTENT_TYPE.as_ptr().cast_mut(),
    };
    out.content_type_len = CONTENT_TYPE.len();
    let rc = r.send_header();
    if rc == Status::NGX_ERROR || rc.0 > Status::NGX_OK.0 || head {
        return rc.into();
    }
    let pool = r.pool();
    let Some(mut buf) = pool.create_buffer_from_str(body) else {
        return Status::NGX_ERROR.into();
    };
    buf.set_last_buf(r.is_main());
    buf.set_last_in_chain(true);
    let chain = pool.alloc_type::<ngx_chain_t>();
    if chain.is_null() {
        return Status::NGX_ERROR.into();
    }
    // SAFETY: `chain` is a fresh pool allocation for one link; the buffer lives in the pool.
    unsafe {
        (*chain).buf = buf.as_ngx_buf_mut();
        (*chain).next = ptr::null_mut();
        r.output_filter(&mut *chain).into()
    }
}

/// The exposition of this configuration's counters.
fn render(mcf: &MainConf, s: Option<&Snapshot>) -> String {
    let mut e = Exposition::new();
    let now = unix_now();
    let now_precise = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());

    render_requests(&mut e, s.map_or(&[][..], |s| &s.callers[..]));

    e.family(
        "mesh_auth_total",
        Kind::Counter,
        "Token verification outcomes ($mesh_auth_status), by provider (empty: none could be named).",
    );
    for p in s.map_or(&[][..], |s| &s.providers[..]) {
        for (i, st) in AUTH_STATUSES.iter().enumerate() {
            // The unnamed bucket only when something fell into it.
            if p.name.is_empty() && p.auth[i] == 0 {
                continue;
            }
            e.sample(
                "mesh_auth_total",
                &[("provider", &p.name), ("status", st.as_str())],
                p.auth[i],
            );
        }
    }

    let zones = s.map_or(&[][..], |s| &s.zones[..]);
    e.family(
        "mesh_rate_limited_total",
        Kind::Counter,
        "Requests refused by a rate-limit zone (dry runs not included).",
    );
    for z in zones {
        e.sample(
            "mesh_rate_limited_total",
            &[("zone", &z.name)],
            z.rate_limited,
        );
    }
    e.family(
        "mesh_rate_limit_keys",
        Kind::Gauge,
        "Keys holding a slot in a rate-limit zone.",
    );
    for z in zones {
        e.sample("mesh_rate_limit_keys", &[("zone", &z.name)], z.keys);
    }
    e.family(
        "mesh_rate_limit_evictions_total",
        Kind::Counter,
        "Keys with live state evicted from a full rate-limit zone.",
    );
    for z in zones {
        e.sample(
            "mesh_rate_limit_evictions_total",
            &[("zone", &z.name)],
            z.evictions,
        );
    }

    e.family(
        "mesh_rate_limit_sync_up",
        Kind::Gauge,
        "Global (redis=) rate-limit zones: 1 if the last sync reached Redis, 0 if not (limits are then local).",
    );
    for z in zones {
        if let Some((up, _, _)) = z.sync {
            e.sample(
                "mesh_rate_limit_sync_up",
                &[("zone", &z.name)],
                u64::from(up),
            );
        }
    }
    e.family(
        "mesh_rate_limit_sync_last_success_timestamp_seconds",
        Kind::Gauge,
        "Global (redis=) rate-limit zones: when a sync last reached Redis, seconds since the epoch; 0: never.",
    );
    for z in zones {
        if let Some((_, age, _)) = z.sync {
            let at = age.map_or(0.0, |ms| now_precise - ms as f64 / 1000.0);
            e.sample(
                "mesh_rate_limit_sync_last_success_timestamp_seconds",
                &[("zone", &z.name)],
                at,
            );
        }
    }
    e.family(
        "mesh_rate_limit_sync_age_seconds",
        Kind::Gauge,
        "Deprecated (removed in the next release): use mesh_rate_limit_sync_last_success_timestamp_seconds. Seconds since a sync last reached Redis (+Inf: never).",
    );
    for z in zones {
        if let Some((_, age, _)) = z.sync {
            let age = age.map_or(f64::INFINITY, |ms| ms as f64 / 1000.0);
            e.sample(
                "mesh_rate_limit_sync_age_seconds",
                &[("zone", &z.name)],
                age,
            );
        }
    }
    e.family(
        "mesh_rate_limit_sync_dropped_total",
        Kind::Counter,
        "Global (redis=) rate-limit zones: admitted requests not sent to Redis because more keys than one sync carries were used in one interval (limited locally only).",
    );
    for z in zones {
        if let Some((_, _, dropped)) = z.sync {
            e.sample(
                "mesh_rate_limit_sync_dropped_total",
                &[("zone", &z.name)],
                dropped,
            );
        }
    }

    e.family(
        "mesh_token_cache_hits_total",
        Kind::Counter,
        "Verified-token cache lookups that found the token (all workers).",
    );
    e.sample(
        "mesh_token_cache_hits_total",
        &[],
        s.map_or(0, |s| s.cache_hits),
    );
    e.family(
        "mesh_token_cache_misses_total",
        Kind::Counter,
        "Verified-token cache lookups that did not (the token was verified).",
    );
    e.sample(
        "mesh_token_cache_misses_total",
        &[],
        s.map_or(0, |s| s.cache_misses),
    );

    if mcf.trace_export.is_some() {
        e.family(
            "mesh_trace_spans_exported_total",
            Kind::Counter,
            "Spans the mesh_trace_export receiver accepted.",
        );
        e.sample(
            "mesh_trace_spans_exported_total",
            &[],
            s.map_or(0, |s| s.spans_exported),
        );
        e.family(
            "mesh_trace_spans_dropped_total",
            Kind::Counter,
            "Spans lost, by reason: queue_full (the worker's queue was full), export_failed (the receiver did not take them), shutdown (still queued when a leaving worker's flush time ran out).",
        );
        for (i, reason) in SPAN_DROPS.iter().enumerate() {
            e.sample(
                "mesh_trace_spans_dropped_total",
                &[("reason", reason)],
                s.map_or(0, |s| s.spans_dropped[i]),
            );
        }
    }

    e.family("mesh_keys", Kind::Gauge, "Keys loaded for a provider.");
    for p in &mcf.providers {
        e.sample(
            "mesh_keys",
            &[("provider", &p.name)],
            p.snapshot().keys.keys.len() as u64,
        );
    }
    let named = || {
        s.into_iter()
            .flat_map(|s| &s.providers)
            .filter(|p| !p.name.is_empty())
    };
    e.family(
        "mesh_keys_last_refresh_timestamp_seconds",
        Kind::Gauge,
        "When a provider's keys were last loaded (read at configuration time, or fetched), seconds since the epoch; 0: never.",
    );
    // A key URL provider: the shared key store's record (one fetch serves every worker, the
    // master's at start included, kept across reloads); a key file: when it was read, and no
    // fetches.
    let refresh = |p: &crate::state::metrics::ProviderCounts| -> (u64, u64, u64) {
        mcf.providers
            .iter()
            .find(|q| q.name == p.name)
            .and_then(|q| crate::state::keystore::refresh_record(q))
            .unwrap_or((p.last_refresh, 0, 0))
    };
    for p in named() {
        e.sample(
            "mesh_keys_last_refresh_timestamp_seconds",
            &[("provider", &p.name)],
            refresh(p).0,
        );
    }
    e.family(
        "mesh_keys_refresh_total",
        Kind::Counter,
        "Fetches of a provider's key URL, by result.",
    );
    for p in named() {
        let (_, ok, failed) = refresh(p);
        for (result, v) in REFRESH_RESULTS.iter().zip([ok, failed]) {
            e.sample(
                "mesh_keys_refresh_total",
                &[("provider", &p.name), ("result", result)],
                v,
            );
        }
    }

    e.family(
        "mesh_outbound_token_expiry_timestamp_seconds",
        Kind::Gauge,
        "When the current outbound token for an audience expires, seconds since the epoch; 0: none held.",
    );
    for t in &mcf.outbound {
        e.sample(
            "mesh_outbound_token_expiry_timestamp_seconds",
            &[("audience", &t.audience)],
            t.expires_at().unwrap_or(0),
        );
    }
    e.family(
        "mesh_outbound_token_expiry_seconds",
        Kind::Gauge,
        "Deprecated (removed in the next release): use mesh_outbound_token_expiry_timestamp_seconds. Seconds until the current outbound token for an audience expires; 0: none held.",
    );
    for t in &mcf.outbound {
        let left = t
            .expires_at()
            .map_or(0, |exp| exp as i64 - now as i64)
            .max(0);
        e.sample(
            "mesh_outbound_token_expiry_seconds",
            &[("audience", &t.audience)],
            left,
        );
    }

    if let Some(s) = s {
        e.family(
            "mesh_upstream_requests_total",
            Kind::Counter,
            "Outbound calls (requests through a location with mesh_outbound_auth), by route (the location) and status class.",
        );
        for r in &s.routes {
            for (class, v) in CODE_CLASSES.iter().zip(r.by_class) {
                e.sample(
                    "mesh_upstream_requests_total",
                    &[("route", &r.route), ("code", class)],
                    v,
                );
            }
        }
        e.family(
            "mesh_upstream_duration_seconds",
            Kind::Histogram,
            "Duration of outbound calls by route, from the request's start to its end (retries and a wait for the token included).",
        );
        for r in &s.routes {
            e.histogram(
                "mesh_upstream_duration_seconds",
                &[("route", &r.route)],
                &r.buckets,
                r.sum_ms,
            );
        }
    }

    e.family(
        "mesh_outbound_token_fetches_total",
        Kind::Counter,
        "Fetches of an outbound token from the metadata server, by audience and result (all processes, kept across reloads).",
    );
    for t in &mcf.outbound {
        let (ok, failed) = crate::state::keystore::token_record(t).unwrap_or((0, 0));
        for (result, v) in REFRESH_RESULTS.iter().zip([ok, failed]) {
            e.sample(
                "mesh_outbound_token_fetches_total",
                &[("audience", &t.audience), ("result", result)],
                v,
            );
        }
    }

    e.family(
        "mesh_config_info",
        Kind::Gauge,
        "The configuration in force (mesh_config_version).",
    );
    e.sample(
        "mesh_config_info",
        &[("version", &mcf.config_version)],
        1u64,
    );
    e.family(
        "mesh_build_info",
        Kind::Gauge,
        "The module's version and the nginx it runs in.",
    );
    e.sample(
        "mesh_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("nginx", nginx_version()),
        ],
        1u64,
    );
    e.finish()
}

/// `mesh_requests_total{caller,decision,code}` and `mesh_request_duration_seconds{caller,
/// decision}`: a decision's series appear once it happened (for the unnamed caller, always,
/// so that a fresh scrape shows the families' shape).
fn render_requests(e: &mut Exposition, callers: &[CallerCounts]) {
    e.family(
        "mesh_requests_total",
        Kind::Counter,
        "Requests decided by the mesh module, by caller (the verified principal of an admitted request; empty: anonymous or refused; other: past mesh_metrics_callers), final decision ($mesh_decision) and status class.",
    );
    let fresh = |c: &CallerCounts, d: usize| {
        c.name.as_deref().is_none_or(str::is_empty) || c.requests[d].iter().any(|&n| n > 0)
    };
    for c in callers {
        for (d, decision) in Decision::ALL.iter().map(|d| d.as_str()).enumerate() {
            if !fresh(c, d) {
                continue;
            }
            for (k, code) in CODE_CLASSES.iter().enumerate() {
                // A caller's classes as they happen; the unnamed set shows every one.
                if c.requests[d][k] == 0 && c.name.as_deref().is_some_and(|n| !n.is_empty()) {
                    continue;
                }
                let mut labels = vec![("decision", decision), ("code", *code)];
                if let Some(name) = &c.name {
                    labels.insert(0, ("caller", name.as_str()));
                }
                e.sample("mesh_requests_total", &labels, c.requests[d][k]);
            }
        }
    }
    e.family(
        "mesh_request_duration_seconds",
        Kind::Histogram,
        "Time from the request's first byte to its log phase (nginx's $request_time), by caller and final decision.",
    );
    for c in callers {
        for (d, decision) in Decision::ALL.iter().map(|d| d.as_str()).enumerate() {
            if !fresh(c, d) {
                continue;
            }
            let mut labels = vec![("decision", decision)];
            if let Some(name) = &c.name {
                labels.insert(0, ("caller", name.as_str()));
            }
            e.histogram(
                "mesh_request_duration_seconds",
                &labels,
                &c.buckets[d],
                c.sum_ms[d],
            );
        }
    }
}

/// The version of the nginx headers the module was built against (it loads only into that nginx).
fn nginx_version() -> &'static str {
    ngx::ffi::NGINX_VERSION.to_str().unwrap_or("")
}
