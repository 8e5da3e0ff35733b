//! Authorization (RBAC): caller patterns, `mesh_role` bindings and
//! `mesh_allow`/`mesh_deny` rules.
//!
//! A PATTERN is one of
//!
//! * `any`: any verified caller;
//! * `anonymous`: no token (under `mesh_auth optional`);
//! * `role:NAME`: a caller bound to role NAME by `mesh_role`;
//! * `claim:PATH=VALUE`: a verified caller whose claims satisfy PATH=VALUE,
//!   matched exactly as the providers' `require` lines
//!   ([`Requirement::holds`]);
//! * `~REGEX`: a principal matching REGEX (unanchored, as nginx's regexes:
//!   anchor with `^...$`); `~*REGEX` is the case-insensitive form, as in
//!   nginx's `map` and `location`;
//! * anything else: a principal, exactly (case-sensitive), where `*` matches
//!   any run of characters, including none (`*@shop.iam.gserviceaccount.com`,
//!   `batch-*`). No other character is special.
//!
//! Rules are read in order and the first that matches decides ([`decide`]).

use std::fmt;

use regex::Regex;
use serde_json::{Map, Value};

use crate::fasthash::FastMap;
use crate::token::Requirement;

/// Who is asking: what the patterns are matched against.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    /// The verified principal; `None` for an anonymous request.
    pub principal: Option<&'a str>,
    /// The verified claims; `None` for an anonymous request.
    pub claims: Option<&'a Map<String, Value>>,
    /// The caller's roles (see [`roles_of`]).
    pub roles: &'a [String],
    /// The provider that verified the caller (`mesh_provider NAME`); `None` for an anonymous
    /// request. Rules with `provider=` match only callers verified by those providers.
    pub provider: Option<&'a str>,
}

impl<'a> Caller<'a> {
    /// An anonymous caller (no token).
    pub fn anonymous() -> Caller<'a> {
        Caller {
            principal: None,
            claims: None,
            roles: &[],
            provider: None,
        }
    }
}

/// One PATTERN of `mesh_role`, `mesh_allow`, `mesh_deny` (and
/// `mesh_rate_limit_caller`).
#[derive(Clone, Debug)]
pub enum Pattern {
    /// `any`: any verified caller.
    Any,
    /// `anonymous`: no token.
    Anonymous,
    /// `role:NAME`.
    Role(String),
    /// `claim:PATH=VALUE`.
    Claim(Requirement),
    /// `~REGEX` (or `~*REGEX`, compiled as `(?i)REGEX`), on the principal.
    Regex(Regex),
    /// A principal, exactly or as a `*` glob.
    Principal(String),
}

impl Pattern {
    /// Parse a PATTERN as written in the configuration.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        match s {
            "" => return Err("empty pattern".to_owned()),
            "any" => return Ok(Pattern::Any),
            "anonymous" => return Ok(Pattern::Anonymous),
            _ => {}
        }
        if let Some(name) = s.strip_prefix("role:") {
            check_role_name(name).map_err(|e| format!("\"{s}\": {e}"))?;
            return Ok(Pattern::Role(name.to_owned()));
        }
        if let Some(req) = s.strip_prefix("claim:") {
            return Requirement::parse(req)
                .map(Pattern::Claim)
                .map_err(|e| format!("\"{s}\": bad claim pattern: {e}"));
        }
        if let Some(re) = s.strip_prefix('~') {
            let (re, source) = match re.strip_prefix('*') {
                Some(rest) => (rest, format!("(?i){rest}")),
                None => (re, re.to_owned()),
            };
            if re.is_empty() {
                return Err(format!("\"{s}\": empty regular expression"));
            }
            return Regex::new(&source)
                .map(Pattern::Regex)
                // One line: the regex crate draws a caret diagram over several, which would
                // split nginx's "[emerg] ... in FILE:LINE" across log lines.
                .map_err(|e| {
                    let why = e.to_string();
                    let why = why
                        .lines()
                        .last()
                        .unwrap_or("")
                        .trim_start_matches("error: ");
                    format!("\"{s}\": invalid regular expression: {why}")
                });
        }
        if s.chars().any(char::is_control) {
            return Err(format!(
                "\"{}\": control character in pattern",
                s.escape_debug()
            ));
        }
        Ok(Pattern::Principal(s.to_owned()))
    }

    /// Whether the caller matches. `any` and principal patterns need a
    /// principal, `claim:` needs claims, `role:` looks at `caller.roles`.
    pub fn matches(&self, caller: &Caller) -> bool {
        match self {
            Pattern::Any => caller.principal.is_some(),
            Pattern::Anonymous => caller.principal.is_none(),
            Pattern::Role(name) => caller.roles.iter().any(|r| r == name),
            Pattern::Claim(req) => caller.claims.is_some_and(|c| req.holds(c)),
            Pattern::Regex(re) => caller.principal.is_some_and(|p| re.is_match(p)),
            Pattern::Principal(glob) => caller.principal.is_some_and(|p| glob_match(glob, p)),
        }
    }
}

impl fmt::Display for Pattern {
    /// The pattern as written (`~*RE` shows as `~(?i)RE`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("any"),
            Pattern::Anonymous => f.write_str("anonymous"),
            Pattern::Role(name) => write!(f, "role:{name}"),
            Pattern::Claim(req) => write!(f, "claim:{}={}", req.path_text(), req.value),
            Pattern::Regex(re) => write!(f, "~{}", re.as_str()),
            Pattern::Principal(p) => f.write_str(p),
        }
    }
}

/// Role names end up in `$mesh_roles` (comma-separated): non-empty, no
/// comma, no whitespace or control characters.
fn check_role_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty role name".to_owned());
    }
    if name
        .chars()
        .any(|c| c == ',' || c.is_whitespace() || c.is_control())
    {
        return Err("a role name may not contain ',', spaces or control characters".to_owned());
    }
    Ok(())
}

/// `*` matches any run of bytes (including none); every other byte matches
/// itself. Matching whole UTF-8 literals only ever splits the text at
/// character boundaries, so bytes are enough. Linear backtracking on the last
/// `*` (at most `glob.len() * text.len()` steps).
fn glob_match(glob: &str, text: &str) -> bool {
    let (g, t) = (glob.as_bytes(), text.as_bytes());
    let (mut gi, mut ti) = (0, 0);
    // Position of the last `*` seen in the glob, and where in the text it
    // currently ends.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if gi < g.len() && g[gi] == b'*' {
            star = Some((gi, ti));
            gi += 1;
        } else if gi < g.len() && g[gi] == t[ti] {
            gi += 1;
            ti += 1;
        } else if let Some((sg, st)) = star {
            // Let that `*` swallow one more byte.
            star = Some((sg, st + 1));
            gi = sg + 1;
            ti = st + 1;
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&b| b == b'*')
}

/// `mesh_role NAME PATTERN ...;`.
#[derive(Clone, Debug)]
pub struct RoleBinding {
    pub name: String,
    pub patterns: Vec<Pattern>,
}

/// Parse `mesh_role NAME PATTERN ...`: at least one pattern; `role:` (roles
/// do not nest) and `anonymous` (anonymous callers have no roles) are refused.
pub fn parse_role(name: &str, patterns: &[&str]) -> Result<RoleBinding, String> {
    check_role_name(name).map_err(|e| format!("role \"{name}\": {e}"))?;
    if patterns.is_empty() {
        return Err(format!("role \"{name}\": no pattern"));
    }
    let mut parsed = Vec::with_capacity(patterns.len());
    for s in patterns {
        match Pattern::parse(s)? {
            Pattern::Role(_) => {
                return Err(format!(
                    "\"{s}\": a role cannot be bound to a role (roles do not nest)"
                ))
            }
            Pattern::Anonymous => {
                return Err(format!("\"{s}\": anonymous callers cannot have roles"))
            }
            p => parsed.push(p),
        }
    }
    Ok(RoleBinding {
        name: name.to_owned(),
        patterns: parsed,
    })
}

/// The roles of a caller: the name of every binding (in order, each name
/// once) with a pattern matching the caller. `role:` patterns cannot occur
/// in bindings, so the caller is matched with no roles.
pub fn roles_of(
    bindings: &[RoleBinding],
    principal: Option<&str>,
    claims: Option<&Map<String, Value>>,
) -> Vec<String> {
    let mut roles = Vec::new();
    roles_into(bindings, principal, claims, &mut roles);
    roles
}

/// [`roles_of`] into `out` (replacing what it held), reusing the buffers of the strings it
/// holds: once `out` has held as many roles, nothing is allocated (for a per-worker scratch
/// list on the request path).
pub fn roles_into(
    bindings: &[RoleBinding],
    principal: Option<&str>,
    claims: Option<&Map<String, Value>>,
    out: &mut Vec<String>,
) {
    let caller = Caller {
        principal,
        claims,
        roles: &[],
        provider: None,
    };
    let mut n = 0;
    for b in bindings {
        if !out[..n].contains(&b.name) && b.patterns.iter().any(|p| p.matches(&caller)) {
            match out.get_mut(n) {
                Some(slot) => slot.clone_from(&b.name),
                None => out.push(b.name.clone()),
            }
            n += 1;
        }
    }
    out.truncate(n);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Effect {
    Allow,
    Deny,
}

impl Effect {
    /// The directive: `mesh_allow` or `mesh_deny`.
    pub fn directive(self) -> &'static str {
        match self {
            Effect::Allow => "mesh_allow",
            Effect::Deny => "mesh_deny",
        }
    }
}

/// A `mesh_allow` or `mesh_deny` line.
#[derive(Clone, Debug)]
pub struct Rule {
    pub effect: Effect,
    /// Any of these (at least one).
    pub patterns: Vec<Pattern>,
    /// `methods=`: the rule applies to these methods only; `None`: to all.
    pub methods: Option<Vec<String>>,
    /// `provider=`: the rule applies to callers verified by these providers only; `None`: to
    /// callers of any provider (and anonymous ones).
    pub providers: Option<Vec<String>>,
    /// The rule as written, with its file:line (`$mesh_rule`).
    pub text: String,
}

const METHODS_PREFIX: &str = "methods=";
const PROVIDER_PREFIX: &str = "provider=";

/// Parse the arguments of `mesh_allow`/`mesh_deny`: one or more patterns, at most one
/// `methods=M,...` and at most one `provider=NAME,...` argument (anywhere; conventionally
/// last). Methods are RFC 9110 tokens (`GET`, `PURGE`, `REPORT`, ...), compared exactly and
/// case-sensitively, as HTTP does: `GET` does not imply `HEAD`. Provider names are checked
/// against the `mesh_provider` blocks by the caller (the configuration knows them).
/// `text` is kept as the rule's description.
pub fn parse_rule(effect: Effect, args: &[&str], text: String) -> Result<Rule, String> {
    let mut patterns = Vec::with_capacity(args.len());
    let mut methods: Option<Vec<String>> = None;
    let mut providers: Option<Vec<String>> = None;
    for arg in args {
        if let Some(list) = arg.strip_prefix(METHODS_PREFIX) {
            if methods.is_some() {
                return Err(format!("\"{arg}\": methods= given twice"));
            }
            methods = Some(parse_methods(list).map_err(|e| format!("\"{arg}\": {e}"))?);
        } else if let Some(list) = arg.strip_prefix(PROVIDER_PREFIX) {
            if providers.is_some() {
                return Err(format!("\"{arg}\": provider= given twice"));
            }
            providers = Some(parse_providers(list).map_err(|e| format!("\"{arg}\": {e}"))?);
        } else if is_parameter(arg) {
            // `method=GET` (a typo) must not become a principal that matches nobody while
            // the rule silently applies to every method.
            return Err(format!(
                "\"{arg}\": unknown parameter (only methods= and provider= are known)"
            ));
        } else {
            patterns.push(Pattern::parse(arg)?);
        }
    }
    if patterns.is_empty() {
        return Err("no pattern".to_owned());
    }
    Ok(Rule {
        effect,
        patterns,
        methods,
        providers,
        text,
    })
}

/// `name=...` with a plain lower-case name: a parameter, not a pattern (patterns with `=` are
/// `claim:PATH=VALUE`, regexes and principals, none of which look like this).
fn is_parameter(arg: &str) -> bool {
    match arg.split_once('=') {
        Some((name, _)) => {
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        }
        None => false,
    }
}

/// RFC 9110 5.6.2 `tchar`: what a method name (a `token`) is made of.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn parse_methods(list: &str) -> Result<Vec<String>, String> {
    if list.is_empty() {
        return Err("empty method list".to_owned());
    }
    let mut methods: Vec<String> = Vec::new();
    for m in list.split(',') {
        if m.is_empty() {
            return Err("empty method in the list".to_owned());
        }
        if !m.bytes().all(is_tchar) {
            return Err(format!(
                "invalid method \"{}\" (an HTTP method name, like GET, POST or PURGE)",
                m.escape_debug()
            ));
        }
        // Method names are case-sensitive: `get` is not GET, and a rule for it would never
        // apply to the requests it was meant for.
        let upper = m.to_ascii_uppercase();
        if upper != m && STANDARD_METHODS.contains(&upper.as_str()) {
            return Err(format!(
                "invalid method \"{m}\": method names are case-sensitive (did you mean {upper}?)"
            ));
        }
        if !methods.iter().any(|x| x == m) {
            methods.push(m.to_owned());
        }
    }
    Ok(methods)
}

/// RFC 9110 section 9 and RFC 5789 (PATCH).
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn parse_providers(list: &str) -> Result<Vec<String>, String> {
    if list.is_empty() {
        return Err("empty provider list".to_owned());
    }
    let mut names: Vec<String> = Vec::new();
    for n in list.split(',') {
        if n.is_empty() {
            return Err("empty provider name in the list".to_owned());
        }
        if n.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!("invalid provider name \"{}\"", n.escape_debug()));
        }
        if !names.iter().any(|x| x == n) {
            names.push(n.to_owned());
        }
    }
    Ok(names)
}

impl Rule {
    /// Whether this rule applies: the method is listed (or no `methods=`),
    /// and any pattern matches the caller.
    pub fn matches(&self, caller: &Caller, method: &str) -> bool {
        self.applies(caller, method) && self.patterns.iter().any(|p| p.matches(caller))
    }

    /// Whether the rule's `methods=` and `provider=` admit this request (before patterns).
    /// A rule with `provider=` never applies to an anonymous caller.
    pub fn applies(&self, caller: &Caller, method: &str) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|ms| ms.iter().any(|m| m == method))
            && self
                .providers
                .as_ref()
                .is_none_or(|ps| caller.provider.is_some_and(|c| ps.iter().any(|p| p == c)))
    }
}

/// The result of [`decide`].
#[derive(Clone, Copy, Debug)]
pub enum Verdict<'a> {
    /// No rules in this scope: any verified caller passes (the caller of
    /// [`decide`] applies that).
    NoRules,
    /// The first matching rule is a `mesh_allow`.
    Allowed(&'a Rule),
    /// The first matching rule is a `mesh_deny`.
    Denied(&'a Rule),
    /// Rules, none matching: 403.
    NoMatch,
}

/// The first matching rule decides.
pub fn decide<'a>(rules: &'a [Rule], caller: &Caller, method: &str) -> Verdict<'a> {
    if rules.is_empty() {
        return Verdict::NoRules;
    }
    match rules.iter().find(|r| r.matches(caller, method)) {
        Some(r) if r.effect == Effect::Allow => Verdict::Allowed(r),
        Some(r) => Verdict::Denied(r),
        None => Verdict::NoMatch,
    }
}

/// A scope's rules, indexed for [`decide`]'s answer without reading every rule: exact
/// principals and `role:` names are looked up in hash maps, and only rules with another
/// kind of pattern (`any`, `anonymous`, `claim:`, `~REGEX`, globs) are read in order.
/// First match wins exactly as in [`decide`]: the answer is the matching rule with the
/// lowest position, wherever it was found. Build it once, at configuration time.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// An exact principal (a pattern without `*`): the rules naming it, in order.
    by_principal: FastMap<String, Vec<u32>>,
    /// A role name: the rules with `role:NAME`, in order.
    by_role: FastMap<String, Vec<u32>>,
    /// The rules with other patterns, in order: (rule, the positions of those patterns).
    scanned: Vec<(u32, Vec<u32>)>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> RuleSet {
        let mut set = RuleSet {
            rules: Vec::new(),
            by_principal: FastMap::default(),
            by_role: FastMap::default(),
            scanned: Vec::new(),
        };
        for (i, rule) in rules.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            let mut others = Vec::new();
            for (j, p) in rule.patterns.iter().enumerate() {
                let list = match p {
                    Pattern::Principal(name) if !name.contains('*') => {
                        set.by_principal.entry(name.clone()).or_default()
                    }
                    Pattern::Role(name) => set.by_role.entry(name.clone()).or_default(),
                    _ => {
                        others.push(u32::try_from(j).unwrap_or(u32::MAX));
                        continue;
                    }
                };
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
            if !others.is_empty() {
                set.scanned.push((i, others));
            }
        }
        set.rules = rules;
        set
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// [`decide`] on these rules: the same verdict, the same rule.
    pub fn decide(&self, caller: &Caller, method: &str) -> Verdict<'_> {
        if self.rules.is_empty() {
            return Verdict::NoRules;
        }
        let applies = |i: u32| self.rules[i as usize].applies(caller, method);
        // The lowest position of a rule that matches, so far.
        let mut best = u32::MAX;
        let first_in = |list: Option<&Vec<u32>>, best: &mut u32| {
            for &i in list.into_iter().flatten() {
                if i >= *best {
                    break;
                }
                if applies(i) {
                    *best = i;
                    break;
                }
            }
        };
        if let Some(p) = caller.principal {
            first_in(self.by_principal.get(p), &mut best);
        }
        for role in caller.roles {
            first_in(self.by_role.get(role.as_str()), &mut best);
        }
        for (i, patterns) in &self.scanned {
            if *i >= best {
                break;
            }
            let rule = &self.rules[*i as usize];
            if applies(*i)
                && patterns
                    .iter()
                    .any(|&j| rule.patterns[j as usize].matches(caller))
            {
                best = *i;
                break;
            }
        }
        match self.rules.get(best as usize) {
            Some(r) if r.effect == Effect::Allow => Verdict::Allowed(r),
            Some(r) => Verdict::Denied(r),
            None => Verdict::NoMatch,
        }
    }
}

impl Verdict<'_> {
    /// `$mesh_rule` for this verdict, borrowed from the rule (`None` for `NoRules`).
    pub fn rule_text(&self) -> Option<&str> {
        match self {
            Verdict::NoRules => None,
            Verdict::Allowed(r) | Verdict::Denied(r) => Some(&r.text),
            Verdict::NoMatch => Some("no rule matched"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("", ""));
        assert!(!glob_match("", "a"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("**", "x"));
        assert!(glob_match("a*", "a"));
        assert!(glob_match("a*b*c", "abc"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("*@x.com", "me@x.com"));
        assert!(glob_match("*@x.com", "@x.com"));
        assert!(!glob_match("*@x.com", "me@x.com.evil"));
        assert!(!glob_match("*@x.com", "me@xxcom"));
        assert!(glob_match("batch-*", "batch-"));
        assert!(!glob_match("batch-*", "batch"));
        assert!(glob_match("*ab", "aab"));
        assert!(glob_match("é*ü", "éaü"));
        assert!(!glob_match("a?c", "abc"));
        assert!(glob_match("a?c", "a?c"));
        // Pathological: still fast.
        let text = "a".repeat(10_000);
        assert!(!glob_match(&format!("{}b", "*a".repeat(50)), &text));
    }

    #[test]
    fn role_names() {
        assert!(check_role_name("writers").is_ok());
        assert!(check_role_name("orders:write").is_ok());
        for bad in ["", "a,b", "a b", "a\tb", "a\u{7f}"] {
            assert!(check_role_name(bad).is_err(), "{bad:?}");
        }
    }
}
