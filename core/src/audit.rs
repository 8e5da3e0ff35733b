//! `mesh_require_auth`: which routes of a configuration must verify their callers, what
//! `nginx -t` says about one that does not, and the one-line summary of the rest.
//!
//! A route is where a request can end up and be answered: a `location` block, or a server's
//! own configuration, which answers the requests that match none of its locations. The shell
//! describes each route it merges as a [`Route`]; the rule is [`Route::verdict`].

use std::collections::BTreeMap;
use std::fmt;

/// The nearest level that wrote the `mesh_auth` a route runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// No level wrote `mesh_auth`: the default, off.
    Nowhere,
    /// The `http` block.
    Http,
    /// The route's `server` block (or the server itself, for its default route).
    Server,
    /// The location itself, or a location it is nested in.
    Location,
}

/// What a route is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// A `location` block; its name as written, with its modifier (`= /healthz`, `@app`).
    Location(String),
    /// A server's own configuration: requests that match none of its locations.
    ServerDefault,
}

/// One route, as the configuration left it after merging.
#[derive(Clone, Debug)]
pub struct Route {
    pub kind: RouteKind,
    /// Where the block opens.
    pub file: String,
    pub line: usize,
    /// The providers of the `mesh_auth` in force; empty: `mesh_auth off` (or nothing).
    pub providers: Vec<String>,
    /// `mesh_auth optional ...`.
    pub optional: bool,
    /// Where that `mesh_auth` was written.
    pub written: Written,
    /// Every request is answered by `return` before the access phase (the first rewrite
    /// directive of the route, or of its server, is `return`).
    pub return_only: bool,
    /// Clients cannot ask for it: `internal;`, or a named location (`@name`). Said for what
    /// it is worth: nginx sends requests there itself (`error_page`, `try_files`,
    /// `rewrite ... last`, `X-Accel-Redirect`), so such a route is judged like any other.
    pub internal: bool,
    /// `satisfy any` is in force and another access module can admit a request without a
    /// token: then `mesh_auth` protects nothing there.
    pub bypass: Option<Bypass>,
}

/// An access module that, under `satisfy any`, admits requests the module did not verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    /// `allow` (any address or range: `allow all`, `allow 10.0.0.0/8`).
    Allow,
    /// `auth_basic`: a user and password, no token.
    AuthBasic,
    /// `auth_request`: whatever its subrequest says.
    AuthRequest,
}

impl Bypass {
    pub fn as_str(self) -> &'static str {
        match self {
            Bypass::Allow => "allow",
            Bypass::AuthBasic => "auth_basic",
            Bypass::AuthRequest => "auth_request",
        }
    }
}

/// Why a route needs no `mesh_auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exemption {
    /// `return` answers before any check could run.
    ReturnOnly,
}

/// Why a route serves requests without a verified token, and that is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenReason {
    /// `mesh_auth off` written on purpose: in the location (or one it is nested in) or in
    /// its server.
    MeshAuthOff,
    /// `mesh_auth` is in force, but `satisfy any` lets this access module admit requests
    /// without a token.
    SatisfyAny(Bypass),
}

/// What `mesh_require_auth` makes of a route: the one answer the check, its summary and the
/// access report give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A `mesh_auth` that is not off is in force, and nothing else can admit a request.
    Protected,
    /// Requests pass without a verified token, and the configuration says so.
    Open(OpenReason),
    Exempt(Exemption),
    /// Serves content to callers nobody identified: `nginx -t` fails.
    Unprotected,
}

impl Verdict {
    /// What the verdict says, in a few words (for logs and reports).
    pub fn describe(&self) -> String {
        match self {
            Verdict::Protected => "protected".into(),
            Verdict::Open(OpenReason::MeshAuthOff) => "open (mesh_auth off)".into(),
            Verdict::Open(OpenReason::SatisfyAny(b)) => format!(
                "open (satisfy any: {} admits requests without a token)",
                b.as_str()
            ),
            Verdict::Exempt(Exemption::ReturnOnly) => "exempt (return-only)".into(),
            Verdict::Unprotected => "unprotected".into(),
        }
    }
}

impl Route {
    /// The rule, in order: a route answered by `return` is exempt whatever its `mesh_auth`
    /// (the access phase never runs there); one with a `mesh_auth` that is not off is
    /// protected, unless `satisfy any` lets another access module admit without a token
    /// (then it is open, for that reason); one whose `mesh_auth off` was written in the
    /// location or its server is open; anything else is unprotected. An `off` written only at
    /// the `http` level opens nothing: it is the default, said once for every server.
    /// Internal and named locations follow the same rule: nginx hands requests to them
    /// (`error_page`, `try_files`, `rewrite ... last`, `X-Accel-Redirect`) and runs their own
    /// access settings, not the ones of the location the request came from.
    pub fn verdict(&self) -> Verdict {
        if self.return_only {
            Verdict::Exempt(Exemption::ReturnOnly)
        } else if !self.providers.is_empty() {
            match self.bypass {
                Some(b) => Verdict::Open(OpenReason::SatisfyAny(b)),
                None => Verdict::Protected,
            }
        } else if matches!(self.written, Written::Server | Written::Location) {
            Verdict::Open(OpenReason::MeshAuthOff)
        } else {
            Verdict::Unprotected
        }
    }

    /// What `nginx -t` says about an unprotected route (nginx adds " in FILE:LINE").
    pub fn complaint(&self) -> String {
        let why = match self.written {
            Written::Http => " (\"mesh_auth off\" at the http level opens nothing)",
            _ => "",
        };
        match &self.kind {
            RouteKind::Location(name) => format!(
                "mesh_require_auth: location \"{name}\" serves requests without mesh_auth{why}: \
                 write \"mesh_auth PROVIDER ...;\" in it or in its server, or \"mesh_auth off;\" \
                 in it to leave it open on purpose"
            ),
            RouteKind::ServerDefault => format!(
                "mesh_require_auth: this server serves the requests that match none of its \
                 locations (from its root) without mesh_auth{why}: write \"mesh_auth PROVIDER ...;\" \
                 in the server, or \"mesh_auth off;\" in it to leave it open on purpose, or add a \
                 \"location /\""
            ),
        }
    }
}

/// The policy surface of a configuration: what `nginx -t` prints at `notice`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub protected: usize,
    /// Of the protected: under `mesh_auth optional`.
    pub optional: usize,
    pub open: usize,
    /// Of the open: by their server's `mesh_auth off`, not their own.
    pub open_by_server: usize,
    /// Of the open: by `satisfy any` beside another access module.
    pub open_by_satisfy: usize,
    pub exempt: usize,
    pub unprotected: usize,
    /// How many protected routes each provider guards.
    pub providers: BTreeMap<String, usize>,
}

impl Summary {
    pub fn of<'a>(routes: impl IntoIterator<Item = &'a Route>) -> Summary {
        let mut s = Summary::default();
        for r in routes {
            match r.verdict() {
                Verdict::Protected => {
                    s.protected += 1;
                    s.optional += usize::from(r.optional);
                    for p in &r.providers {
                        *s.providers.entry(p.clone()).or_default() += 1;
                    }
                }
                Verdict::Open(OpenReason::MeshAuthOff) => {
                    s.open += 1;
                    s.open_by_server += usize::from(r.written == Written::Server);
                }
                Verdict::Open(OpenReason::SatisfyAny(_)) => {
                    s.open += 1;
                    s.open_by_satisfy += 1;
                }
                Verdict::Exempt(_) => s.exempt += 1,
                Verdict::Unprotected => s.unprotected += 1,
            }
        }
        s
    }

    fn total(&self) -> usize {
        self.protected + self.open + self.exempt + self.unprotected
    }
}

/// `mesh_require_auth: 5 locations: 3 protected (1 optional), 1 explicitly open (1 by its
/// server), 1 exempt (return-only); providers: ci 1, google 3`
impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.total();
        write!(
            f,
            "mesh_require_auth: {n} location{}: {} protected",
            if n == 1 { "" } else { "s" },
            self.protected
        )?;
        if self.optional > 0 {
            write!(f, " ({} optional)", self.optional)?;
        }
        write!(f, ", {} explicitly open", self.open)?;
        if self.open_by_server > 0 {
            write!(
                f,
                " ({} by {} server)",
                self.open_by_server,
                if self.open_by_server == 1 {
                    "its"
                } else {
                    "their"
                }
            )?;
        }
        if self.open_by_satisfy > 0 {
            write!(f, " ({} by satisfy any)", self.open_by_satisfy)?;
        }
        write!(f, ", {} exempt (return-only)", self.exempt)?;
        if self.unprotected > 0 {
            write!(f, ", {} unprotected", self.unprotected)?;
        }
        f.write_str("; providers:")?;
        if self.providers.is_empty() {
            f.write_str(" none")?;
        }
        for (i, (name, count)) in self.providers.iter().enumerate() {
            write!(f, "{} {name} {count}", if i == 0 { "" } else { "," })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(providers: &[&str], written: Written) -> Route {
        Route {
            kind: RouteKind::Location("/api/".into()),
            file: "/etc/nginx/nginx.conf".into(),
            line: 12,
            providers: providers.iter().map(|s| s.to_string()).collect(),
            optional: false,
            written,
            return_only: false,
            internal: false,
            bypass: None,
        }
    }

    #[test]
    fn a_provider_in_force_protects_wherever_it_was_written() {
        for w in [Written::Http, Written::Server, Written::Location] {
            assert_eq!(route(&["google"], w).verdict(), Verdict::Protected);
        }
    }

    #[test]
    fn off_opens_only_when_written_in_the_location_or_its_server() {
        let off = Verdict::Open(OpenReason::MeshAuthOff);
        assert_eq!(route(&[], Written::Location).verdict(), off);
        assert_eq!(route(&[], Written::Server).verdict(), off);
        assert_eq!(route(&[], Written::Http).verdict(), Verdict::Unprotected);
        assert_eq!(route(&[], Written::Nowhere).verdict(), Verdict::Unprotected);
    }

    #[test]
    fn return_only_is_exempt_even_with_mesh_auth_which_never_runs_there() {
        let mut r = route(&["google"], Written::Server);
        r.return_only = true;
        assert_eq!(r.verdict(), Verdict::Exempt(Exemption::ReturnOnly));
        r.providers.clear();
        r.written = Written::Nowhere;
        assert_eq!(r.verdict(), Verdict::Exempt(Exemption::ReturnOnly));
    }

    #[test]
    fn internal_and_named_routes_are_judged_like_any_other() {
        let mut r = route(&[], Written::Nowhere);
        r.internal = true;
        assert_eq!(r.verdict(), Verdict::Unprotected);
        r.written = Written::Location;
        assert_eq!(r.verdict(), Verdict::Open(OpenReason::MeshAuthOff));
        r.providers = vec!["ci".into()];
        assert_eq!(r.verdict(), Verdict::Protected);
        r.return_only = true;
        assert_eq!(r.verdict(), Verdict::Exempt(Exemption::ReturnOnly));
    }

    #[test]
    fn satisfy_any_beside_another_access_module_is_open_for_that_reason() {
        for b in [Bypass::Allow, Bypass::AuthBasic, Bypass::AuthRequest] {
            let mut r = route(&["google"], Written::Location);
            r.bypass = Some(b);
            let v = r.verdict();
            assert_eq!(v, Verdict::Open(OpenReason::SatisfyAny(b)));
            assert!(v.describe().contains(b.as_str()), "{}", v.describe());
            // without mesh_auth it was never protected: the rule for that stands
            r.providers.clear();
            assert_eq!(r.verdict(), Verdict::Open(OpenReason::MeshAuthOff));
            r.written = Written::Http;
            assert_eq!(r.verdict(), Verdict::Unprotected);
        }
    }

    #[test]
    fn complaints_say_what_to_write() {
        let c = route(&[], Written::Nowhere).complaint();
        assert!(c.contains("location \"/api/\""), "{c}");
        assert!(c.contains("\"mesh_auth off;\""), "{c}");
        assert!(!c.contains("http level"), "{c}");
        let c = route(&[], Written::Http).complaint();
        assert!(c.contains("at the http level opens nothing"), "{c}");
        let mut r = route(&[], Written::Nowhere);
        r.kind = RouteKind::ServerDefault;
        let c = r.complaint();
        assert!(c.contains("match none of its locations"), "{c}");
        assert!(c.contains("\"location /\""), "{c}");
    }

    #[test]
    fn the_summary_counts_each_verdict_and_each_provider() {
        let mut opt = route(&["google"], Written::Server);
        opt.optional = true;
        let mut ret = route(&[], Written::Nowhere);
        ret.return_only = true;
        let routes = [
            route(&["google", "ci"], Written::Server),
            opt,
            route(&[], Written::Location),
            route(&[], Written::Server),
            ret,
        ];
        let s = Summary::of(&routes);
        assert_eq!(
            (s.protected, s.optional, s.open, s.open_by_server, s.exempt),
            (2, 1, 2, 1, 1)
        );
        assert_eq!(
            s.to_string(),
            "mesh_require_auth: 5 locations: 2 protected (1 optional), 2 explicitly open \
             (1 by its server), 1 exempt (return-only); providers: ci 1, google 2"
        );
    }

    #[test]
    fn an_empty_summary_reads_well() {
        assert_eq!(
            Summary::of(&[]).to_string(),
            "mesh_require_auth: 0 locations: 0 protected, 0 explicitly open, \
             0 exempt (return-only); providers: none"
        );
    }
}
