//! `mesh_access_report`: who may call which route, as the configuration merged it, written as
//! JSON or Markdown.
//!
//! The shell describes what it merged ([`Report`]: the providers, the outbound tokens, and
//! per server each route with its [`Route`] from the audit and the access settings in force);
//! this file turns that into text. Everything comes out in configuration order (servers,
//! locations, rules) and one fact per line, so two versions of a configuration give two
//! reports that `diff` line by line. Nothing secret is ever part of the model: key URLs are
//! scrubbed of their user info and query values ([`scrub_url`]), HMAC secrets are named by
//! their file, global rate-limit zones by `host:port/db`.

use std::fmt::Write as _;

use crate::audit::{Exemption, OpenReason, Route, RouteKind, Verdict, Written};
use crate::policy::{Effect, Pattern, RoleBinding, Rule};

/// The report format's version: raised when a field changes meaning or goes away.
pub const FORMAT_VERSION: u32 = 1;

/// `format=` of `mesh_access_report`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Markdown,
}

impl Format {
    /// `json` or `markdown`.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "json" => Some(Format::Json),
            "markdown" => Some(Format::Markdown),
            _ => None,
        }
    }
}

/// The whole configuration's access matrix.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// `mesh_config_version`; `None` when not set.
    pub config_version: Option<String>,
    pub providers: Vec<ProviderInfo>,
    /// `mesh_outbound_token` lines: (variable with its `$`, audience).
    pub outbound_tokens: Vec<(String, String)>,
    pub servers: Vec<ServerInfo>,
}

/// A URL with its user info and query values replaced by `***` ([`scrub_url`]): the only
/// form in which a key URL enters the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrubbedUrl(String);

impl ScrubbedUrl {
    pub fn new(url: &str) -> ScrubbedUrl {
        ScrubbedUrl(scrub_url(url))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where a provider's keys come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `keys URL` (or a preset's).
    Url(ScrubbedUrl),
    /// `discovery on`: the issuer's OpenID Connect discovery document, whose `jwks_uri` has
    /// the keys.
    Discovery(ScrubbedUrl),
    /// `keys FILE`: the path as nginx resolved it.
    File(String),
    /// `secret FILE`: the path only, never what it holds.
    Secret(String),
    /// None (yet): a block the shell could not describe.
    Unknown,
}

impl KeySource {
    /// A key URL, scrubbed.
    pub fn url(url: &str) -> KeySource {
        KeySource::Url(ScrubbedUrl::new(url))
    }

    /// A discovery document's URL, scrubbed.
    pub fn discovery(url: &str) -> KeySource {
        KeySource::Discovery(ScrubbedUrl::new(url))
    }

    fn kind(&self) -> &'static str {
        match self {
            KeySource::Url(_) => "url",
            KeySource::Discovery(_) => "discovery",
            KeySource::File(_) => "file",
            KeySource::Secret(_) => "secret_file",
            KeySource::Unknown => "unknown",
        }
    }

    fn location(&self) -> Option<&str> {
        match self {
            KeySource::Url(u) | KeySource::Discovery(u) => Some(u.as_str()),
            KeySource::File(s) | KeySource::Secret(s) => Some(s),
            KeySource::Unknown => None,
        }
    }
}

/// A `mesh_provider` block.
#[derive(Clone, Debug)]
pub struct ProviderInfo {
    pub name: String,
    pub issuers: Vec<String>,
    /// Empty: `aud` is not checked.
    pub audiences: Vec<String>,
    /// `algorithms` as written (or preset); empty: whatever the keys allow.
    pub algorithms: Vec<String>,
    pub keys: KeySource,
    pub principal: String,
    pub leeway_secs: u64,
    /// `require PATH=VALUE` lines, as `PATH=VALUE`.
    pub require: Vec<String>,
    pub platform_verified: bool,
}

/// A `server` block.
#[derive(Clone, Debug, Default)]
pub struct ServerInfo {
    /// `server_name` values (`""` for the empty name nginx gives a server without one).
    pub names: Vec<String>,
    /// The addresses it listens on, as nginx prints them (`127.0.0.1:8080`, `*:80`).
    pub listen: Vec<String>,
    pub file: String,
    pub line: usize,
    /// Its routes in configuration order: its own configuration first (unless a `location /`
    /// answers every request), then each location, nested ones after their parent.
    pub routes: Vec<RouteInfo>,
}

/// One route (a location, or the server's own configuration) and what guards it.
#[derive(Clone, Debug)]
pub struct RouteInfo {
    /// What the audit knows: the match, file:line, the `mesh_auth` in force, the verdict.
    pub route: Route,
    /// `mesh_require_auth` is on here (`nginx -t` refuses the route if unprotected).
    pub checked: bool,
    /// `mesh_token` as written; `None`: the Bearer token of `X-Serverless-Authorization`,
    /// else of `Authorization`.
    pub token: Option<String>,
    /// `mesh_audience`; `None`: each provider's `audience`.
    pub audience: Option<Vec<String>>,
    pub rules: Vec<RuleInfo>,
    pub policy_dry_run: bool,
    pub rate_limit: Option<LimitInfo>,
    /// `mesh_outbound_auth $VAR`: the token sent upstream; `None`: off (or not available in
    /// this build).
    pub outbound_auth: Option<String>,
}

/// A `mesh_allow` / `mesh_deny` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    pub effect: Effect,
    pub patterns: Vec<PatternInfo>,
    pub methods: Option<Vec<String>>,
    pub providers: Option<Vec<String>>,
    /// The directive as written, without its position.
    pub directive: String,
    pub file: String,
    pub line: usize,
}

/// A caller pattern, with what a `role:NAME` stands for here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatternInfo {
    pub pattern: String,
    /// For `role:NAME`: the patterns of every `mesh_role NAME` in force, in order (empty: no
    /// such role here, the pattern matches nobody). `None` for other patterns.
    pub role_patterns: Option<Vec<String>>,
}

impl PatternInfo {
    pub fn of(p: &Pattern, roles: &[RoleBinding]) -> PatternInfo {
        let role_patterns = match p {
            Pattern::Role(name) => Some(
                roles
                    .iter()
                    .filter(|b| &b.name == name)
                    .flat_map(|b| b.patterns.iter().map(|p| p.to_string()))
                    .collect(),
            ),
            _ => None,
        };
        PatternInfo {
            pattern: p.to_string(),
            role_patterns,
        }
    }
}

impl RuleInfo {
    /// A rule as the policy holds it, its `role:` patterns expanded with the roles in force.
    pub fn of(rule: &Rule, roles: &[RoleBinding]) -> RuleInfo {
        let (directive, file, line) = split_position(&rule.text);
        RuleInfo {
            effect: rule.effect,
            patterns: rule
                .patterns
                .iter()
                .map(|p| PatternInfo::of(p, roles))
                .collect(),
            methods: rule.methods.clone(),
            providers: rule.providers.clone(),
            directive,
            file,
            line,
        }
    }
}

/// `DIRECTIVE (FILE:LINE)` (a rule's text) into its three parts; text without a position is
/// the directive alone. nginx names configuration files by their full path, so the position
/// is the first ` (/` after which the rest reads as `FILE:LINE)` (a file name may hold ` (`).
fn split_position(text: &str) -> (String, String, usize) {
    let parsed = text.match_indices(" (/").find_map(|(i, _)| {
        let pos = text[i + 2..].strip_suffix(')')?;
        let (file, line) = pos.rsplit_once(':')?;
        Some((text[..i].to_string(), file.to_string(), line.parse().ok()?))
    });
    parsed.unwrap_or_else(|| (text.to_string(), String::new(), 0))
}

/// `mesh_rate_limit` in force, with its `mesh_rate_limit_caller` lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitInfo {
    pub zone: String,
    /// A global zone's Redis, as `host:port/db` (never its password); `None`: local.
    pub global: Option<String>,
    /// `10r/s`, `600r/m`.
    pub rate: String,
    pub burst: u64,
    /// `key=` as written; `None`: the caller (provider and principal), else the client
    /// address.
    pub key: Option<String>,
    pub callers: Vec<CallerLimit>,
    pub dry_run: bool,
    /// `mesh_rate_limit_status`.
    pub status: u16,
}

/// A `mesh_rate_limit_caller` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerLimit {
    pub pattern: PatternInfo,
    pub rate: String,
    pub burst: u64,
}

/// What a route's verdict means, in a word and a reason.
pub struct VerdictText {
    /// `protected`, `open`, `exempt` or `unprotected`.
    pub label: &'static str,
    pub why: String,
}

/// The audit's verdict on a route ([`Route::verdict`], the one rule `nginx -t` applies),
/// explained.
pub fn verdict_of(route: &Route, checked: bool) -> VerdictText {
    let written = match route.written {
        Written::Location => "in the location",
        Written::Server => "in its server",
        Written::Http => "at the http level",
        Written::Nowhere => "nowhere",
    };
    match route.verdict() {
        Verdict::Protected => VerdictText {
            label: "protected",
            why: format!(
                "mesh_auth {}{} written {written}",
                if route.optional { "optional " } else { "" },
                route.providers.join(" ")
            ),
        },
        Verdict::Open(OpenReason::MeshAuthOff) => VerdictText {
            label: "open",
            why: format!("mesh_auth off written {written}"),
        },
        Verdict::Open(OpenReason::SatisfyAny(b)) => VerdictText {
            label: "open",
            why: format!(
                "satisfy any: {} admits requests without a token (mesh_auth {} written {written})",
                b.as_str(),
                route.providers.join(" ")
            ),
        },
        Verdict::Exempt(e) => VerdictText {
            label: "exempt",
            why: exemption_text(e),
        },
        Verdict::Unprotected => VerdictText {
            label: "unprotected",
            why: match (route.written, checked) {
                (Written::Http, true) => {
                    "mesh_auth off at the http level opens nothing: nginx -t refuses it".into()
                }
                (_, true) => "no mesh_auth in force: nginx -t refuses it".into(),
                (_, false) => "no mesh_auth in force (mesh_require_auth is off)".into(),
            },
        },
    }
}

#[allow(unreachable_patterns)]
fn exemption_text(e: Exemption) -> String {
    match e {
        Exemption::ReturnOnly => "answered by return before the access phase".into(),
        // A reason added to the audit later still shows, by name.
        other => format!("{other:?}"),
    }
}

/// What happens to a request no rule matches (or, without rules, to any request that
/// passed `mesh_auth`).
fn no_match_text(r: &RouteInfo) -> String {
    if r.rules.is_empty() {
        let who = if r.route.providers.is_empty() {
            "any request (no rules)"
        } else if r.route.optional {
            "any caller mesh_auth admits, anonymous ones included (no rules)"
        } else {
            "any verified caller (no rules)"
        };
        return format!("allow {who}");
    }
    if r.policy_dry_run {
        "deny 403 (dry run: logged, allowed)".into()
    } else {
        "deny 403".into()
    }
}

/// Replaces a URL's user info and every query value with `***`, and drops its fragment: what
/// a key URL may carry as a credential. Scheme, host, port and path are kept.
pub fn scrub_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let rest = rest.split('#').next().unwrap_or("");
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => before_query.split_at(i),
        None => (before_query, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_string(),
    };
    let mut out = String::new();
    if let Some(s) = scheme {
        out.push_str(s);
        out.push_str("://");
    }
    out.push_str(&authority);
    out.push_str(path);
    if let Some(q) = query {
        out.push('?');
        let params: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) => format!("{k}=***"),
                None => kv.to_string(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

/// Writes `text` to `path` so that a reader sees the old file or the new one, never a part:
/// into a temporary file beside it (same directory, so the same file system), flushed to
/// disk, then renamed over `path`. The temporary file is removed when anything fails.
pub fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

// ---------------------------------------------------------------------------------------
// JSON

/// A JSON value with its members in the order given (the report's order is part of it).
enum J {
    Null,
    Bool(bool),
    Num(u64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(&'static str, J)>),
}

fn s(v: &str) -> J {
    J::Str(v.to_string())
}

fn opt_s(v: Option<&str>) -> J {
    v.map_or(J::Null, s)
}

fn strs(v: &[String]) -> J {
    J::Arr(v.iter().map(|x| s(x)).collect())
}

fn opt_strs(v: Option<&[String]>) -> J {
    v.map_or(J::Null, strs)
}

impl J {
    /// Pretty, two spaces an indent, one member or element a line; empty arrays as `[]`.
    fn write(&self, out: &mut String, indent: usize) {
        let pad = |out: &mut String, n: usize| out.extend(std::iter::repeat_n(' ', n));
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(n) => {
                let _ = write!(out, "{n}");
            }
            J::Str(v) => out.push_str(&serde_json::Value::from(v.as_str()).to_string()),
            J::Arr(items) if items.is_empty() => out.push_str("[]"),
            J::Arr(items) => {
                out.push_str("[\n");
                for (i, item) in items.iter().enumerate() {
                    pad(out, indent + 2);
                    item.write(out, indent + 2);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                pad(out, indent);
                out.push(']');
            }
            J::Obj(members) if members.is_empty() => out.push_str("{}"),
            J::Obj(members) => {
                out.push_str("{\n");
                for (i, (k, v)) in members.iter().enumerate() {
                    pad(out, indent + 2);
                    let _ = write!(out, "\"{k}\": ");
                    v.write(out, indent + 2);
                    out.push_str(if i + 1 < members.len() { ",\n" } else { "\n" });
                }
                pad(out, indent);
                out.push('}');
            }
        }
    }
}

fn pattern_json(p: &PatternInfo) -> J {
    J::Obj(vec![
        ("pattern", s(&p.pattern)),
        ("role_patterns", opt_strs(p.role_patterns.as_deref())),
    ])
}

fn written_name(w: Written) -> &'static str {
    match w {
        Written::Nowhere => "nowhere",
        Written::Http => "http",
        Written::Server => "server",
        Written::Location => "location",
    }
}

fn effect_name(e: Effect) -> &'static str {
    match e {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
    }
}

fn route_json(r: &RouteInfo) -> J {
    let v = verdict_of(&r.route, r.checked);
    let (kind, matched) = match &r.route.kind {
        RouteKind::Location(name) => ("location", s(name)),
        RouteKind::ServerDefault => ("server", J::Null),
    };
    let rules = r
        .rules
        .iter()
        .map(|rule| {
            J::Obj(vec![
                ("effect", s(effect_name(rule.effect))),
                (
                    "patterns",
                    J::Arr(rule.patterns.iter().map(pattern_json).collect()),
                ),
                ("methods", opt_strs(rule.methods.as_deref())),
                ("providers", opt_strs(rule.providers.as_deref())),
                ("directive", s(&rule.directive)),
                ("file", s(&rule.file)),
                ("line", J::Num(rule.line as u64)),
            ])
        })
        .collect();
    let limit = r.rate_limit.as_ref().map_or(J::Null, |l| {
        J::Obj(vec![
            ("zone", s(&l.zone)),
            ("global", opt_s(l.global.as_deref())),
            ("rate", s(&l.rate)),
            ("burst", J::Num(l.burst)),
            ("key", opt_s(l.key.as_deref())),
            (
                "callers",
                J::Arr(
                    l.callers
                        .iter()
                        .map(|c| {
                            J::Obj(vec![
                                ("pattern", pattern_json(&c.pattern)),
                                ("rate", s(&c.rate)),
                                ("burst", J::Num(c.burst)),
                            ])
                        })
                        .collect(),
                ),
            ),
            ("dry_run", J::Bool(l.dry_run)),
            ("status", J::Num(u64::from(l.status))),
        ])
    });
    J::Obj(vec![
        ("kind", s(kind)),
        ("match", matched),
        ("file", s(&r.route.file)),
        ("line", J::Num(r.route.line as u64)),
        ("verdict", s(v.label)),
        ("why", J::Str(v.why)),
        ("require_auth", J::Bool(r.checked)),
        (
            "auth",
            J::Obj(vec![
                ("providers", strs(&r.route.providers)),
                ("optional", J::Bool(r.route.optional)),
                ("written", s(written_name(r.route.written))),
            ]),
        ),
        ("token", opt_s(r.token.as_deref())),
        ("audience", opt_strs(r.audience.as_deref())),
        ("rules", J::Arr(rules)),
        ("no_match", J::Str(no_match_text(r))),
        ("policy_dry_run", J::Bool(r.policy_dry_run)),
        ("rate_limit", limit),
        ("outbound_auth", opt_s(r.outbound_auth.as_deref())),
    ])
}

impl Report {
    /// The report as JSON (pretty, ending with a newline).
    pub fn to_json(&self) -> String {
        let providers = self
            .providers
            .iter()
            .map(|p| {
                J::Obj(vec![
                    ("name", s(&p.name)),
                    ("issuers", strs(&p.issuers)),
                    ("audiences", strs(&p.audiences)),
                    ("algorithms", strs(&p.algorithms)),
                    (
                        "keys",
                        J::Obj(vec![
                            ("kind", s(p.keys.kind())),
                            ("source", opt_s(p.keys.location())),
                        ]),
                    ),
                    ("principal", s(&p.principal)),
                    ("leeway", J::Num(p.leeway_secs)),
                    ("require", strs(&p.require)),
                    ("platform_verified", J::Bool(p.platform_verified)),
                ])
            })
            .collect();
        let outbound = self
            .outbound_tokens
            .iter()
            .map(|(var, aud)| J::Obj(vec![("variable", s(var)), ("audience", s(aud))]))
            .collect();
        let servers = self
            .servers
            .iter()
            .map(|sv| {
                J::Obj(vec![
                    ("names", strs(&sv.names)),
                    ("listen", strs(&sv.listen)),
                    ("file", s(&sv.file)),
                    ("line", J::Num(sv.line as u64)),
                    ("routes", J::Arr(sv.routes.iter().map(route_json).collect())),
                ])
            })
            .collect();
        let doc = J::Obj(vec![
            ("report", s("ngx-mesh access report")),
            ("format_version", J::Num(u64::from(FORMAT_VERSION))),
            ("config_version", opt_s(self.config_version.as_deref())),
            ("providers", J::Arr(providers)),
            ("outbound_tokens", J::Arr(outbound)),
            ("servers", J::Arr(servers)),
        ]);
        let mut out = String::new();
        doc.write(&mut out, 0);
        out.push('\n');
        out
    }

    /// The report as Markdown: one heading per server and route, one fact a line; ends with
    /// one newline.
    pub fn to_markdown(&self) -> String {
        let mut o = String::new();
        let _ = self.write_markdown(&mut o);
        o.truncate(o.trim_end().len());
        o.push('\n');
        o
    }

    fn write_markdown(&self, o: &mut String) -> std::fmt::Result {
        writeln!(o, "# Access report")?;
        writeln!(o)?;
        writeln!(
            o,
            "Configuration version: {}",
            self.config_version
                .as_deref()
                .map_or("(no mesh_config_version)".to_string(), code)
        )?;
        writeln!(o)?;
        writeln!(o, "## Providers")?;
        writeln!(o)?;
        if self.providers.is_empty() {
            writeln!(o, "None.")?;
            writeln!(o)?;
        }
        for p in &self.providers {
            writeln!(o, "### {}", code(&p.name))?;
            writeln!(o)?;
            writeln!(o, "- issuers: {}", list(&p.issuers, "none"))?;
            writeln!(
                o,
                "- audiences: {}",
                list(&p.audiences, "any (aud not checked)")
            )?;
            writeln!(
                o,
                "- algorithms: {}",
                list(&p.algorithms, "whatever the keys allow")
            )?;
            let keys = match &p.keys {
                KeySource::Url(u) => format!("URL {}", code(u.as_str())),
                KeySource::Discovery(u) => {
                    format!("the jwks_uri of discovery document {}", code(u.as_str()))
                }
                KeySource::File(f) => format!("file {}", code(f)),
                KeySource::Secret(f) => format!("HMAC secret file {}", code(f)),
                KeySource::Unknown => "unknown".to_string(),
            };
            writeln!(o, "- keys: {keys}")?;
            writeln!(o, "- principal claim: {}", code(&p.principal))?;
            writeln!(o, "- leeway: {}s", p.leeway_secs)?;
            writeln!(o, "- require: {}", list(&p.require, "nothing more"))?;
            writeln!(
                o,
                "- platform_verified: {}",
                if p.platform_verified { "on" } else { "off" }
            )?;
            writeln!(o)?;
        }
        writeln!(o, "## Outbound tokens")?;
        writeln!(o)?;
        if self.outbound_tokens.is_empty() {
            writeln!(o, "None.")?;
        }
        for (var, aud) in &self.outbound_tokens {
            writeln!(o, "- {} for audience {}", code(var), code(aud))?;
        }
        writeln!(o)?;
        for sv in &self.servers {
            let names: Vec<String> = sv.names.iter().filter(|n| !n.is_empty()).cloned().collect();
            writeln!(
                o,
                "## Server {} ({}:{})",
                list(&names, "(no server_name)"),
                sv.file,
                sv.line
            )?;
            writeln!(o)?;
            writeln!(o, "- listen: {}", list(&sv.listen, "none"))?;
            writeln!(o)?;
            for r in &sv.routes {
                write_route(o, r)?;
            }
        }
        Ok(())
    }
}

fn code(v: &str) -> String {
    // A backtick inside would end the span: use a longer fence.
    if v.contains('`') {
        format!("`` {v} ``")
    } else {
        format!("`{v}`")
    }
}

fn list(v: &[String], empty: &str) -> String {
    if v.is_empty() {
        return empty.to_string();
    }
    v.iter().map(|x| code(x)).collect::<Vec<_>>().join(", ")
}

fn pattern_md(p: &PatternInfo) -> String {
    match &p.role_patterns {
        None => code(&p.pattern),
        Some(ps) => format!(
            "{} (= {})",
            code(&p.pattern),
            list(ps, "nobody: no such role")
        ),
    }
}

fn write_route(o: &mut String, r: &RouteInfo) -> std::fmt::Result {
    let v = verdict_of(&r.route, r.checked);
    let title = match &r.route.kind {
        RouteKind::Location(name) => format!("location {}", code(name)),
        RouteKind::ServerDefault => "server default (requests matching no location)".into(),
    };
    writeln!(
        o,
        "### {title} ({}:{}): {}",
        r.route.file, r.route.line, v.label
    )?;
    writeln!(o)?;
    writeln!(o, "- verdict: {}: {}", v.label, v.why)?;
    writeln!(
        o,
        "- mesh_require_auth: {}",
        if r.checked { "on" } else { "off" }
    )?;
    let auth = if r.route.providers.is_empty() {
        "off".to_string()
    } else {
        format!(
            "{}{}",
            if r.route.optional { "optional " } else { "" },
            list(&r.route.providers, "")
        )
    };
    let written = match r.route.written {
        Written::Location => "written in the location",
        Written::Server => "written in the server",
        Written::Http => "written at the http level",
        Written::Nowhere => "the default",
    };
    writeln!(o, "- mesh_auth: {auth} ({written})")?;
    match &r.token {
        Some(t) => writeln!(o, "- token: {}", code(t))?,
        None => writeln!(
            o,
            "- token: Bearer of `X-Serverless-Authorization`, else `Authorization`"
        )?,
    }
    if let Some(a) = &r.audience {
        writeln!(o, "- audience: {}", list(a, ""))?;
    }
    if r.rules.is_empty() {
        writeln!(o, "- rules: none")?;
    } else {
        writeln!(o, "- rules (the first that matches decides):")?;
        for (i, rule) in r.rules.iter().enumerate() {
            let pats: Vec<String> = rule.patterns.iter().map(pattern_md).collect();
            let mut line = format!(
                "  {}. {} {}",
                i + 1,
                effect_name(rule.effect),
                pats.join(", ")
            );
            if let Some(m) = &rule.methods {
                let _ = write!(line, "; methods {}", list(m, ""));
            }
            if let Some(p) = &rule.providers {
                let _ = write!(line, "; providers {}", list(p, ""));
            }
            let _ = write!(line, " ({}:{})", rule.file, rule.line);
            writeln!(o, "{line}")?;
        }
    }
    writeln!(o, "- no rule matches: {}", no_match_text(r))?;
    writeln!(
        o,
        "- mesh_policy_dry_run: {}",
        if r.policy_dry_run { "on" } else { "off" }
    )?;
    match &r.rate_limit {
        None => writeln!(o, "- rate limit: none")?,
        Some(l) => {
            let key = l
                .key
                .as_deref()
                .map_or("the caller (else the client address)".to_string(), code);
            let zone = match &l.global {
                Some(g) => format!("{} (global, Redis {})", code(&l.zone), code(g)),
                None => code(&l.zone),
            };
            writeln!(
                o,
                "- rate limit: zone {zone}, {} burst {}, key {key}, refused with {}{}",
                l.rate,
                l.burst,
                l.status,
                if l.dry_run { ", dry run" } else { "" }
            )?;
            for c in &l.callers {
                writeln!(
                    o,
                    "  - caller {}: {} burst {}",
                    pattern_md(&c.pattern),
                    c.rate,
                    c.burst
                )?;
            }
        }
    }
    writeln!(
        o,
        "- outbound identity: {}",
        r.outbound_auth
            .as_deref()
            .map_or("off".to_string(), |v| format!(
                "mesh_outbound_auth {}",
                code(v)
            ))
    )?;
    writeln!(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{parse_role, parse_rule};

    fn route(kind: RouteKind, providers: &[&str], written: Written) -> Route {
        Route {
            kind,
            file: "/etc/nginx/nginx.conf".into(),
            line: 10,
            providers: providers.iter().map(|p| p.to_string()).collect(),
            optional: false,
            written,
            return_only: false,
            internal: false,
            bypass: None,
        }
    }

    fn info(route: Route) -> RouteInfo {
        RouteInfo {
            route,
            checked: true,
            token: None,
            audience: None,
            rules: Vec::new(),
            policy_dry_run: false,
            rate_limit: None,
            outbound_auth: None,
        }
    }

    fn rule(effect: Effect, args: &[&str], line: usize) -> Rule {
        let text = format!(
            "{} {} (/etc/nginx/nginx.conf:{line})",
            effect.directive(),
            args.join(" ")
        );
        parse_rule(effect, args, text).unwrap()
    }

    fn sample() -> Report {
        let roles = vec![parse_role("admin", &["alice", "~^ops-"]).unwrap()];
        let mut api = info(route(
            RouteKind::Location("/api/".into()),
            &["google", "ci"],
            Written::Server,
        ));
        api.rules = vec![
            RuleInfo::of(
                &rule(Effect::Allow, &["role:admin", "methods=GET,POST"], 21),
                &roles,
            ),
            RuleInfo::of(&rule(Effect::Deny, &["any", "provider=ci"], 22), &roles),
        ];
        api.policy_dry_run = true;
        api.rate_limit = Some(LimitInfo {
            zone: "api".into(),
            global: Some("redis.internal:6379/0".into()),
            rate: "10r/s".into(),
            burst: 5,
            key: None,
            callers: vec![CallerLimit {
                pattern: PatternInfo::of(&Pattern::parse("role:admin").unwrap(), &roles),
                rate: "100r/s".into(),
                burst: 0,
            }],
            dry_run: false,
            status: 429,
        });
        let mut health = info(route(
            RouteKind::Location("= /healthz".into()),
            &[],
            Written::Location,
        ));
        health.checked = false;
        Report {
            config_version: Some("v7".into()),
            providers: vec![ProviderInfo {
                name: "google".into(),
                issuers: vec!["https://accounts.google.com".into()],
                audiences: vec!["https://api.example".into()],
                algorithms: vec!["RS256".into()],
                keys: KeySource::url("https://u:p@keys.example/jwks?token=s3cret"),
                principal: "email".into(),
                leeway_secs: 60,
                require: vec!["email_verified=true".into()],
                platform_verified: false,
            }],
            outbound_tokens: vec![("$orders_token".into(), "https://orders".into())],
            servers: vec![ServerInfo {
                names: vec!["api.example".into()],
                listen: vec!["127.0.0.1:8080".into()],
                file: "/etc/nginx/nginx.conf".into(),
                line: 5,
                routes: vec![api, health],
            }],
        }
    }

    #[test]
    fn urls_lose_their_user_info_and_query_values_but_keep_the_rest() {
        assert_eq!(
            scrub_url("https://user:pw@keys.example:8443/a/jwks?x=1&key=s#frag"),
            "https://***@keys.example:8443/a/jwks?x=***&key=***"
        );
        assert_eq!(
            scrub_url("https://www.googleapis.com/oauth2/v3/certs"),
            "https://www.googleapis.com/oauth2/v3/certs"
        );
        assert_eq!(scrub_url("http://h?flag"), "http://h?flag");
        assert_eq!(scrub_url("https://a@b@host/p"), "https://***@host/p");
        // An `@` in the path is not user info.
        assert_eq!(scrub_url("https://host/p@q"), "https://host/p@q");
    }

    #[test]
    fn a_rule_splits_into_directive_and_position_and_expands_roles() {
        let roles = vec![
            parse_role("admin", &["alice"]).unwrap(),
            parse_role("admin", &["claim:grp=ops"]).unwrap(),
        ];
        let r = RuleInfo::of(
            &rule(Effect::Allow, &["role:admin", "role:ghost", "bob"], 9),
            &roles,
        );
        assert_eq!(r.directive, "mesh_allow role:admin role:ghost bob");
        assert_eq!((r.file.as_str(), r.line), ("/etc/nginx/nginx.conf", 9));
        assert_eq!(
            r.patterns[0].role_patterns,
            Some(vec!["alice".to_string(), "claim:grp=ops".to_string()])
        );
        assert_eq!(r.patterns[1].role_patterns, Some(vec![]));
        assert_eq!(r.patterns[2].role_patterns, None);
        assert_eq!(
            split_position("mesh_allow a (/x (1)/n.conf:3)"),
            ("mesh_allow a".into(), "/x (1)/n.conf".into(), 3)
        );
        assert_eq!(split_position("odd"), ("odd".into(), String::new(), 0));
    }

    #[test]
    fn every_verdict_says_why() {
        let v = verdict_of(
            &route(RouteKind::ServerDefault, &["g"], Written::Http),
            true,
        );
        assert_eq!(
            (v.label, v.why.as_str()),
            ("protected", "mesh_auth g written at the http level")
        );
        let v = verdict_of(&route(RouteKind::ServerDefault, &[], Written::Server), true);
        assert_eq!(
            (v.label, v.why.as_str()),
            ("open", "mesh_auth off written in its server")
        );
        let mut r = route(RouteKind::ServerDefault, &[], Written::Nowhere);
        r.return_only = true;
        let v = verdict_of(&r, true);
        assert_eq!(
            (v.label, v.why.as_str()),
            ("exempt", "answered by return before the access phase")
        );
        let mut r = route(RouteKind::ServerDefault, &["g"], Written::Server);
        r.bypass = Some(crate::audit::Bypass::AuthBasic);
        let v = verdict_of(&r, true);
        assert_eq!(
            (v.label, v.why.as_str()),
            (
                "open",
                "satisfy any: auth_basic admits requests without a token (mesh_auth g written in its server)"
            )
        );
        let v = verdict_of(
            &route(RouteKind::ServerDefault, &[], Written::Nowhere),
            false,
        );
        assert_eq!(v.label, "unprotected");
        assert!(v.why.contains("mesh_require_auth is off"), "{}", v.why);
    }

    #[test]
    fn json_is_valid_ordered_and_holds_no_secret() {
        let text = sample().to_json();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["config_version"], "v7");
        assert_eq!(
            v["providers"][0]["keys"]["source"],
            "https://***@keys.example/jwks?token=***"
        );
        let api = &v["servers"][0]["routes"][0];
        assert_eq!(api["verdict"], "protected");
        assert_eq!(
            api["rules"][0]["methods"],
            serde_json::json!(["GET", "POST"])
        );
        assert_eq!(
            api["rules"][0]["patterns"][0]["role_patterns"],
            serde_json::json!(["alice", "~^ops-"])
        );
        assert_eq!(api["rules"][1]["providers"], serde_json::json!(["ci"]));
        assert_eq!(api["no_match"], "deny 403 (dry run: logged, allowed)");
        assert_eq!(api["rate_limit"]["callers"][0]["rate"], "100r/s");
        assert_eq!(api["outbound_auth"], serde_json::Value::Null);
        let health = &v["servers"][0]["routes"][1];
        assert_eq!(health["verdict"], "open");
        assert_eq!(health["no_match"], "allow any request (no rules)");
        assert!(!text.contains("s3cret") && !text.contains(":p@"), "{text}");
        // Members in the documented order, not sorted.
        let at = |k: &str| text.find(&format!("\"{k}\"")).unwrap();
        assert!(at("report") < at("config_version") && at("config_version") < at("providers"));
        assert!(text.ends_with("}\n"));
    }

    #[test]
    fn one_changed_rule_changes_one_line() {
        let a = sample();
        let mut b = sample();
        let roles = vec![parse_role("admin", &["alice", "~^ops-"]).unwrap()];
        b.servers[0].routes[0].rules[1] =
            RuleInfo::of(&rule(Effect::Deny, &["any", "provider=google"], 22), &roles);
        for (x, y) in [
            (a.to_json(), b.to_json()),
            (a.to_markdown(), b.to_markdown()),
        ] {
            let (xl, yl): (Vec<&str>, Vec<&str>) = (x.lines().collect(), y.lines().collect());
            assert_eq!(xl.len(), yl.len());
            let changed: Vec<(&str, &str)> = xl
                .iter()
                .zip(&yl)
                .filter(|(p, q)| p != q)
                .map(|(p, q)| (*p, *q))
                .collect();
            // JSON: the provider and the directive; Markdown: the rule's line.
            assert!(!changed.is_empty() && changed.len() <= 2, "{changed:?}");
            assert!(
                changed.iter().all(|(_, q)| q.contains("google")),
                "{changed:?}"
            );
        }
    }

    #[test]
    fn markdown_reads_as_a_matrix() {
        let md = sample().to_markdown();
        for want in [
            "Configuration version: `v7`",
            "- keys: URL `https://***@keys.example/jwks?token=***`",
            "## Server `api.example` (/etc/nginx/nginx.conf:5)",
            "- listen: `127.0.0.1:8080`",
            "### location `/api/` (/etc/nginx/nginx.conf:10): protected",
            "  1. allow `role:admin` (= `alice`, `~^ops-`); methods `GET`, `POST` (/etc/nginx/nginx.conf:21)",
            "  2. deny `any`; providers `ci` (/etc/nginx/nginx.conf:22)",
            "- rate limit: zone `api` (global, Redis `redis.internal:6379/0`), 10r/s burst 5, key the caller (else the client address), refused with 429",
            "  - caller `role:admin` (= `alice`, `~^ops-`): 100r/s burst 0",
            "### location `= /healthz` (/etc/nginx/nginx.conf:10): open",
            "- mesh_require_auth: off",
            "- outbound identity: off",
        ] {
            assert!(md.contains(want), "missing {want:?} in\n{md}");
        }
        assert!(!md.contains("s3cret"));
    }

    #[test]
    fn an_empty_configuration_still_reports() {
        let r = Report::default();
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["config_version"], serde_json::Value::Null);
        assert_eq!(v["servers"], serde_json::json!([]));
        let md = r.to_markdown();
        assert!(md.contains("(no mesh_config_version)"));
        assert!(md.ends_with("None.\n") && !md.ends_with("\n\n"), "{md:?}");
    }

    #[test]
    fn writing_replaces_the_file_whole_and_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("mesh-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.json");
        write_atomically(&path, "one\n").unwrap();
        write_atomically(&path, "two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("access.json")]);
        let err = write_atomically(&dir.join("no/such/dir.json"), "x").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn formats_parse() {
        assert_eq!(Format::parse("json"), Some(Format::Json));
        assert_eq!(Format::parse("markdown"), Some(Format::Markdown));
        assert_eq!(Format::parse("md"), None);
    }
}
