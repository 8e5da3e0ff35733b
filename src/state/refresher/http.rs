//! The refresher's HTTP client: bounded GETs that never follow a redirect (a key URL answering
//! `302` to another host, or to `http://`, would otherwise let that host choose the keys).

use std::sync::Arc;
use std::time::Duration;

/// Longest a fetch may take, connect to last byte.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read (a JWKS is a few KiB).
const MAX_BODY: u64 = 1 << 20;

/// Resolves host names in the calling thread. ureq's own resolver runs each lookup in a
/// thread of its own that it leaves behind on a timeout; before nginx forks its workers, no
/// thread may be left behind (only the forking thread survives a fork, with whatever locks
/// the others held). A lookup is then bounded by the system resolver's own timeouts.
#[derive(Debug, Default)]
struct InlineResolver(ureq::unversioned::resolver::DefaultResolver);

impl ureq::unversioned::resolver::Resolver for InlineResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let untimed = ureq::unversioned::transport::NextTimeout {
            after: ureq::unversioned::transport::time::Duration::NotHappening,
            reason: timeout.reason,
        };
        self.0.resolve(uri, config, untimed)
    }
}

/// An HTTP client for one fetch: `roots` to trust (else the system store), a deadline for
/// the whole exchange, and `inline_resolve` when no thread may be left behind (see above).
pub fn agent(
    roots: Option<&Arc<Vec<ureq::tls::Certificate<'static>>>>,
    timeout: Duration,
    inline_resolve: bool,
) -> ureq::Agent {
    let mut tls = ureq::tls::TlsConfig::builder().provider(ureq::tls::TlsProvider::Rustls);
    if let Some(roots) = roots {
        tls = tls.root_certs(ureq::tls::RootCerts::Specific(roots.clone()));
    }
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        // Never follow a redirect: a 3xx is a failed fetch (the last good keys are kept).
        .max_redirects(0)
        .user_agent("ngx-mesh")
        .tls_config(tls.build())
        .build();
    if inline_resolve {
        ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::default(),
            InlineResolver::default(),
        )
    } else {
        config.into()
    }
}

/// GET `url`; the body and `Cache-Control` of a 200, else why not.
pub fn get(
    agent: &ureq::Agent,
    url: &str,
    header: Option<(&str, &str)>,
) -> Result<(Vec<u8>, Option<String>), String> {
    let mut req = agent.get(url);
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let mut resp = req.call().map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    if (300..400).contains(&status) {
        return Err(format!("status {status}: redirects are never followed"));
    }
    if status != 200 {
        return Err(format!("status {status}"));
    }
    let cache_control = resp
        .headers()
        .get("cache-control")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    Ok((body, cache_control))
}

/// RFC 3986 percent-encoding of a query value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
