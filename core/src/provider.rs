//! `mesh_provider NAME { ... }`: the block's lines, and the provider they build.
//!
//! Everything here is a decision about configuration text, with no nginx types: the shell reads
//! the words (and the key files, whose paths nginx resolves) and reports errors at the line
//! they name. The rules: lines written in the block win over a `preset`; an HMAC `secret` is
//! never combined with public `keys`; an algorithm must fit the configured keys (RFC 8725).

use std::sync::Arc;

use crate::keys::{algorithm_name, parse_algorithm, Algorithm, KeyKind, KeySet, ALL_ALGORITHMS};
use crate::token::{Provider, Requirement};
use crate::units::{parse_on_off, parse_time_secs};

/// Issuers of Google-signed ID tokens (`preset google`).
pub const GOOGLE_ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];
/// Google's JWKS (`preset google`).
pub const GOOGLE_KEYS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";
/// Firebase Authentication's issuer prefix (`preset firebase PROJECT`: the issuer is this and
/// the project ID).
pub const FIREBASE_ISSUER_PREFIX: &str = "https://securetoken.google.com/";
/// Firebase Authentication's keys: the x509 key map of securetoken@system.gserviceaccount.com.
pub const FIREBASE_KEYS_URL: &str =
    "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com";
/// A service account's public keys as a JWKS (`preset service_account EMAIL`: this and the
/// email).
pub const SERVICE_ACCOUNT_KEYS_PREFIX: &str = "https://www.googleapis.com/service_accounts/v1/jwk/";
/// `leeway` when the block does not set it, in seconds.
pub const DEFAULT_LEEWAY: u64 = 30;
/// `principal` when the block does not set it.
pub const DEFAULT_PRINCIPAL: &str = "sub";

/// Where a provider's public keys come from: keys read now, or a URL (of the shell's type
/// `U`, which holds what it takes to fetch it) whose keys arrive later.
pub enum KeySource<U> {
    File(KeySet),
    Url(U),
}

/// `preset NAME [ARG];`: defaults for a well-known issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Preset {
    /// Google-signed ID tokens (Cloud Run service-to-service, `gcloud auth print-identity-token`).
    Google,
    /// Firebase Authentication ID tokens of one project (end users of an app).
    Firebase(String),
    /// JWTs a service account signs with its own key (issuer and subject: its email).
    ServiceAccount(String),
}

impl Preset {
    /// `preset NAME [ARG]` as written: the words after `preset`.
    pub fn parse(words: &[String]) -> Result<Preset, String> {
        const KNOWN: &str = "known: google, firebase PROJECT, service_account EMAIL";
        match words {
            [name] if name == "google" => Ok(Preset::Google),
            [name, project] if name == "firebase" => {
                // Project IDs: lower-case letters, digits, hyphens; legacy domain-scoped ones
                // ("example.com:project") add '.' and ':'.
                let ok = !project.is_empty()
                    && project
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:_".contains(&b));
                if !ok {
                    return Err(format!(
                        "preset firebase: invalid project ID \"{}\"",
                        project.escape_debug()
                    ));
                }
                Ok(Preset::Firebase(project.clone()))
            }
            [name, email] if name == "service_account" => {
                // The email goes into the key URL's path: letters, digits and ._+-@ only.
                let ok = email.matches('@').count() == 1
                    && !email.starts_with('@')
                    && !email.ends_with('@')
                    && email
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._+-@".contains(&b));
                if !ok {
                    return Err(format!(
                        "preset service_account: invalid service account email \"{}\"",
                        email.escape_debug()
                    ));
                }
                Ok(Preset::ServiceAccount(email.clone()))
            }
            [name] if name == "firebase" => {
                Err("preset firebase: the project ID is missing (preset firebase PROJECT;)".into())
            }
            [name] if name == "service_account" => Err(
                "preset service_account: the email is missing (preset service_account EMAIL;)"
                    .into(),
            ),
            [name, ..] if name == "google" || name == "firebase" || name == "service_account" => {
                Err(format!("preset {name}: too many arguments ({KNOWN})"))
            }
            [other, ..] => Err(format!("preset: unknown preset \"{other}\" ({KNOWN})")),
            [] => Err(format!("preset: which one? ({KNOWN})")),
        }
    }

    /// The preset's name as written.
    pub fn name(&self) -> &'static str {
        match self {
            Preset::Google => "google",
            Preset::Firebase(_) => "firebase",
            Preset::ServiceAccount(_) => "service_account",
        }
    }

    /// The issuers it accepts.
    pub fn issuers(&self) -> Vec<String> {
        match self {
            Preset::Google => GOOGLE_ISSUERS.iter().map(|s| s.to_string()).collect(),
            Preset::Firebase(project) => vec![format!("{FIREBASE_ISSUER_PREFIX}{project}")],
            Preset::ServiceAccount(email) => vec![email.clone()],
        }
    }

    /// Where its keys are published.
    pub fn keys_url(&self) -> String {
        match self {
            Preset::Google => GOOGLE_KEYS_URL.into(),
            Preset::Firebase(_) => FIREBASE_KEYS_URL.into(),
            Preset::ServiceAccount(email) => format!("{SERVICE_ACCOUNT_KEYS_PREFIX}{email}"),
        }
    }
}

/// What the shell is asked to turn into its URL type when the block is finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UrlFor<'a> {
    /// A preset's key URL.
    Preset(&'a str),
    /// `discovery on [ca=FILE]`: the issuer's discovery document, the issuer it must name, and
    /// the CA file (a path the shell resolved).
    Discovery {
        document: &'a str,
        issuer: &'a str,
        ca: Option<&'a str>,
    },
}

impl UrlFor<'_> {
    /// The URL fetched first.
    pub fn url(&self) -> &str {
        match self {
            UrlFor::Preset(u) => u,
            UrlFor::Discovery { document, .. } => document,
        }
    }
}

/// The line a block-level error belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// The block itself (its first line).
    Block,
    Secret,
    Algorithms,
    Discovery,
}

/// Why a block cannot become a provider, and which line to blame.
#[derive(Debug, PartialEq, Eq)]
pub struct BlockError {
    pub line: Line,
    pub message: String,
}

/// A provider as built from its block.
pub struct Built<U> {
    pub provider: Provider,
    /// `algorithms` as written (or preset); `None`: whatever the keys allow.
    pub algorithms: Option<Vec<Algorithm>>,
    pub platform_verified: bool,
    /// Keys from a URL: they arrive later; until then `provider.keys` is empty.
    pub url: Option<U>,
}

/// A `mesh_provider` block while it is being read.
pub struct ProviderBlock<U> {
    pub name: String,
    issuers: Vec<String>,
    keys: Option<KeySource<U>>,
    secret: Option<KeySet>,
    audiences: Option<Vec<String>>,
    algorithms: Option<Vec<Algorithm>>,
    leeway: Option<u64>,
    principal: Option<String>,
    require: Vec<Requirement>,
    preset: Option<Preset>,
    platform_verified: Option<bool>,
    /// `discovery on [ca=FILE]`: `Some(ca)`.
    discovery: Option<Option<String>>,
}

impl<U> ProviderBlock<U> {
    pub fn new(name: String) -> Self {
        ProviderBlock {
            name,
            issuers: Vec::new(),
            keys: None,
            secret: None,
            audiences: None,
            algorithms: None,
            leeway: None,
            principal: None,
            require: Vec::new(),
            preset: None,
            platform_verified: None,
            discovery: None,
        }
    }

    /// The error for a line given twice.
    pub fn duplicate(&self, dir: &str) -> String {
        format!("\"{dir}\" is duplicate in mesh_provider \"{}\"", self.name)
    }

    /// The error for a line with the wrong number of values.
    pub fn arity(&self, dir: &str) -> String {
        format!(
            "invalid number of arguments in \"{dir}\" of mesh_provider \"{}\"",
            self.name
        )
    }

    /// Whether `keys` was given (the shell reads key files before calling `set_keys`).
    pub fn has_keys(&self) -> bool {
        self.keys.is_some()
    }

    pub fn has_secret(&self) -> bool {
        self.secret.is_some()
    }

    pub fn set_keys(&mut self, keys: KeySource<U>) {
        self.keys = Some(keys);
    }

    pub fn set_secret(&mut self, secret: KeySet) {
        self.secret = Some(secret);
    }

    pub fn has_discovery(&self) -> bool {
        self.discovery.is_some()
    }

    /// `discovery on [ca=FILE]` (the shell resolved the CA path); `discovery off` is no line.
    pub fn set_discovery(&mut self, ca: Option<String>) {
        self.discovery = Some(ca);
    }

    /// One line of the block other than `keys` and `secret` (which read files). `dir` is the
    /// line's first word, `vals` the rest.
    pub fn line(&mut self, dir: &str, vals: &[String]) -> Result<(), String> {
        let one = || match vals {
            [v] => Ok(v.as_str()),
            _ => Err(self.arity(dir)),
        };
        let many = || {
            if vals.is_empty() {
                Err(self.arity(dir))
            } else {
                Ok(vals)
            }
        };
        let dup = |set: bool| {
            if set {
                Err(self.duplicate(dir))
            } else {
                Ok(())
            }
        };
        match dir {
            "issuer" => {
                dup(!self.issuers.is_empty())?;
                self.issuers = many()?.to_vec();
            }
            "audience" => {
                dup(self.audiences.is_some())?;
                self.audiences = Some(many()?.to_vec());
            }
            "preset" => {
                dup(self.preset.is_some())?;
                self.preset = Some(Preset::parse(vals)?);
            }
            "platform_verified" => {
                dup(self.platform_verified.is_some())?;
                let v = one()?;
                self.platform_verified = Some(parse_on_off(v).ok_or_else(|| {
                    format!(
                        "platform_verified: invalid value \"{v}\", it must be \"on\" or \"off\""
                    )
                })?);
            }
            "algorithms" => {
                dup(self.algorithms.is_some())?;
                let mut algs = Vec::new();
                for v in many()? {
                    let alg = parse_algorithm(v).ok_or_else(|| {
                        let known: Vec<&str> =
                            ALL_ALGORITHMS.iter().map(|a| algorithm_name(*a)).collect();
                        format!(
                            "algorithms: unknown algorithm \"{v}\" ({})",
                            known.join(", ")
                        )
                    })?;
                    if !algs.contains(&alg) {
                        algs.push(alg);
                    }
                }
                self.algorithms = Some(algs);
            }
            "leeway" => {
                dup(self.leeway.is_some())?;
                let v = one()?;
                self.leeway = Some(
                    parse_time_secs(v)
                        .map_err(|e| format!("leeway: invalid value \"{v}\": {e}"))?,
                );
            }
            "principal" => {
                dup(self.principal.is_some())?;
                let v = one()?;
                if v.is_empty() {
                    return Err("principal: empty claim name".into());
                }
                self.principal = Some(v.to_string());
            }
            "require" => {
                for v in many()? {
                    self.require
                        .push(Requirement::parse(v).map_err(|e| format!("require: \"{v}\": {e}"))?);
                }
            }
            _ => {
                return Err(format!(
                    "unknown directive \"{dir}\" in mesh_provider \"{}\"",
                    self.name
                ))
            }
        }
        Ok(())
    }

    /// Checks the block as a whole, at its closing brace. `url` turns a preset's key URL, or
    /// the discovery document of `discovery on`, into the shell's URL type.
    pub fn finish(
        mut self,
        mut url: impl FnMut(UrlFor<'_>) -> Result<U, String>,
    ) -> Result<Built<U>, BlockError> {
        let at = |line: Line, message: String| BlockError { line, message };
        let mut email_first = false;
        if let Some(preset) = self.preset.take() {
            // Lines written in the block win over the preset's defaults.
            if self.issuers.is_empty() {
                self.issuers = preset.issuers();
            }
            if self.keys.is_none() && self.secret.is_none() && self.discovery.is_none() {
                let u = url(UrlFor::Preset(&preset.keys_url()))
                    .map_err(|e| at(Line::Block, format!("preset {}: {e}", preset.name())))?;
                self.keys = Some(KeySource::Url(u));
            }
            // Google signs all three with RSA keys.
            self.algorithms
                .get_or_insert_with(|| vec![Algorithm::RS256]);
            match &preset {
                // The caller: a verified `email` when the token has one, else `sub` (IAM's
                // generateIdToken adds `email` only with includeEmail=true).
                Preset::Google => email_first = self.principal.is_none(),
                // A Firebase ID token's audience is its project.
                Preset::Firebase(project) => {
                    self.audiences.get_or_insert_with(|| vec![project.clone()]);
                }
                // Issuer and subject are both the account: a token it signed names itself.
                Preset::ServiceAccount(email) => {
                    if !self.require.iter().any(|r| r.path_text() == "sub") {
                        if let Ok(r) = Requirement::parse(&format!("sub={email}")) {
                            self.require.push(r);
                        }
                    }
                }
            }
        }
        let name = self.name;
        // Anyone can mint a Google-signed ID token for any audience (from their own service
        // account, or any site's "Sign in with Google"): without an audience, every Google
        // identity in the world would be accepted.
        if self.audiences.as_ref().is_none_or(Vec::is_empty)
            && self.issuers.iter().any(|i| is_google_issuer(i))
        {
            return Err(at(
                Line::Block,
                format!(
                    "mesh_provider \"{name}\": Google issuers need \"audience\" (anyone can get a Google-signed token for any audience, so without one every Google account would be accepted)"
                ),
            ));
        }
        if self.issuers.is_empty() {
            return Err(at(
                Line::Block,
                format!("mesh_provider \"{name}\": no \"issuer\""),
            ));
        }
        if let Some(ca) = self.discovery.take() {
            let blame = |m: String| at(Line::Discovery, format!("mesh_provider \"{name}\": {m}"));
            if self.keys.is_some() || self.secret.is_some() {
                return Err(blame(
                    "\"discovery\" cannot be combined with \"keys\" or \"secret\" (discovery finds the keys)".into(),
                ));
            }
            let [issuer] = self.issuers.as_slice() else {
                return Err(blame(
                    "\"discovery\" needs exactly one issuer (the document is found below it)"
                        .into(),
                ));
            };
            let document = crate::discovery::document_url(issuer).map_err(blame)?;
            let u = url(UrlFor::Discovery {
                document: &document,
                issuer,
                ca: ca.as_deref(),
            })
            .map_err(|e| blame(format!("discovery: {e}")))?;
            self.keys = Some(KeySource::Url(u));
        }
        let (keys, url) = match (self.keys, self.secret) {
            (Some(_), Some(_)) => return Err(at(
                Line::Secret,
                format!("mesh_provider \"{name}\": \"secret\" cannot be combined with \"keys\" (an HMAC secret and public keys in one provider would let one stand in for the other)"),
            )),
            (None, None) => {
                return Err(at(
                    Line::Block,
                    format!("mesh_provider \"{name}\": no \"keys\" or \"secret\""),
                ))
            }
            (Some(KeySource::File(k)), None) | (None, Some(k)) => (k, None),
            // Keys from a URL arrive later; until then requests get 503 `no_keys`.
            (Some(KeySource::Url(u)), None) => (KeySet::default(), Some(u)),
        };
        let algorithms = allowed_algorithms(&keys, url.is_some(), self.algorithms.as_deref())
            .map_err(|(bad, why)| {
                at(
                    Line::Algorithms,
                    format!(
                        "mesh_provider \"{name}\": algorithm \"{}\" cannot be used: {why}",
                        algorithm_name(bad)
                    ),
                )
            })?;
        let provider = Provider {
            name,
            issuers: self.issuers,
            audiences: self.audiences.unwrap_or_default(),
            algorithms,
            keys: Arc::new(keys),
            leeway: self.leeway.unwrap_or(DEFAULT_LEEWAY),
            principal: self.principal.unwrap_or_else(|| DEFAULT_PRINCIPAL.into()),
            email_first,
            require: self.require,
        };
        Ok(Built {
            provider,
            algorithms: self.algorithms,
            platform_verified: self.platform_verified.unwrap_or(false),
            url,
        })
    }
}

/// The algorithms a provider accepts: the configured list, checked against the keys, or
/// what the keys allow. Keys from a URL are not known yet: until they are, every public-key
/// algorithm passes, so that requests get `no_keys` rather than `bad_signature`, and only
/// HMAC can be ruled out. `Err`: the first configured algorithm that cannot be used, and why.
pub fn allowed_algorithms(
    keys: &KeySet,
    from_url: bool,
    configured: Option<&[Algorithm]>,
) -> Result<Vec<Algorithm>, (Algorithm, &'static str)> {
    let hmac = |a: &Algorithm| KeyKind::Hmac.fits(*a);
    let Some(algs) = configured else {
        return Ok(if from_url {
            ALL_ALGORITHMS
                .iter()
                .copied()
                .filter(|a| !hmac(a))
                .collect()
        } else {
            keys.algorithms()
        });
    };
    let allowed = keys.algorithms();
    let bad = if from_url {
        algs.iter().find(|a| hmac(a))
    } else {
        algs.iter().find(|a| !allowed.contains(a))
    };
    match bad {
        Some(&bad) if hmac(&bad) => Err((bad, "HMAC algorithms need \"secret\"")),
        Some(&bad) => Err((bad, "no configured key can verify it")),
        None => Ok(algs.to_vec()),
    }
}

/// Checks the shape of a key URL (`http://` or `https://`, a host, no whitespace or control
/// characters) and that `ca=` is only given for `https://`.
pub fn check_key_url(url: &str, has_ca: bool) -> Result<(), String> {
    if !url.starts_with("https://") && has_ca {
        return Err(format!(
            "keys \"{}\": \"ca=\" applies to https:// URLs only",
            shown_url(url)
        ));
    }
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    if rest.is_empty()
        || rest.starts_with('/')
        || url
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!("keys: invalid URL \"{}\"", shown_url(url)));
    }
    Ok(())
}

/// The secrets a URL may carry: its userinfo (`user:password`) and the value of each query
/// parameter (a parameter without `=` is a value whole: `?SECRET`). Empty ones are left out.
fn url_secrets(url: &str) -> (Option<&str>, Vec<&str>) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let userinfo = rest[..authority_end]
        .rsplit_once('@')
        .map(|(u, _)| u)
        .filter(|u| !u.is_empty());
    let values = rest[authority_end..]
        .split_once('?')
        .map_or(Vec::new(), |(_, q)| {
            q.split('&')
                .map(|kv| kv.split_once('=').map_or(kv, |(_, v)| v))
                .filter(|v| !v.is_empty())
                .collect()
        });
    (userinfo, values)
}

/// A URL as logs and `nginx -t` show it: the userinfo and every query value replaced by
/// `***` (`https://***@host/jwks?token=***`); scheme, host, path and parameter names kept.
pub fn shown_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").map_or(("", url), |(s, r)| (s, r));
    let (rest, fragment) = match rest.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (rest, None),
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let mut out = String::with_capacity(url.len());
    if !scheme.is_empty() {
        out.push_str(scheme);
        out.push_str("://");
    }
    match authority.rsplit_once('@') {
        Some((_, host)) => {
            out.push_str("***@");
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    match tail.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            for (i, kv) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match kv.split_once('=') {
                    Some((k, _)) => {
                        out.push_str(k);
                        out.push_str("=***");
                    }
                    None if kv.is_empty() => {}
                    None => out.push_str("***"),
                }
            }
        }
        None => out.push_str(tail),
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// `text` (an error message that may quote `url`, whole or in part) with the URL shown as
/// [`shown_url`] and its secrets replaced by `***` wherever they still appear. Query values
/// under 4 characters are left alone elsewhere in the text (they would match common words
/// and numbers; the URL itself is always shown redacted).
pub fn scrub_url(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &shown_url(url));
    let (userinfo, values) = url_secrets(url);
    for secret in userinfo
        .into_iter()
        .chain(values.into_iter().filter(|v| v.len() >= 4))
    {
        out = out.replace(secret, "***");
    }
    out
}

/// Whether `iss` is one of Google's token issuers (also written with a trailing `/`).
pub fn is_google_issuer(iss: &str) -> bool {
    let iss = iss.strip_suffix('/').unwrap_or(iss);
    GOOGLE_ISSUERS.iter().any(|g| g.eq_ignore_ascii_case(iss))
}

/// Whether a `keys` source is a URL (else a file).
pub fn is_key_url(src: &str) -> bool {
    src.starts_with("https://") || src.starts_with("http://")
}
