//! RBAC: patterns, role bindings, rules and decisions.

use mesh_core::policy::{
    decide, parse_role, parse_rule, roles_into, roles_of, Caller, Effect, Pattern, Rule, Verdict,
};
use serde_json::{json, Map, Value};

fn claims(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn caller<'a>(
    principal: &'a str,
    claims: &'a Map<String, Value>,
    roles: &'a [String],
) -> Caller<'a> {
    Caller {
        principal: Some(principal),
        claims: Some(claims),
        roles,
        provider: None,
    }
}

fn p(s: &str) -> Pattern {
    Pattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn matches(pattern: &str, principal: &str) -> bool {
    let c = Map::new();
    p(pattern).matches(&caller(principal, &c, &[]))
}

#[test]
fn parse_kinds() {
    assert!(matches!(p("any"), Pattern::Any));
    assert!(matches!(p("anonymous"), Pattern::Anonymous));
    assert!(matches!(p("role:writers"), Pattern::Role(n) if n == "writers"));
    assert!(matches!(p("role:orders:write"), Pattern::Role(n) if n == "orders:write"));
    match p("claim:org.team=core") {
        Pattern::Claim(r) => {
            assert_eq!(r.path, vec!["org", "team"]);
            assert_eq!(r.value, "core");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(p("~^batch-"), Pattern::Regex(r) if r.as_str() == "^batch-"));
    assert!(matches!(p("~*^Batch-"), Pattern::Regex(r) if r.as_str() == "(?i)^Batch-"));
    assert!(matches!(p("a@b.c"), Pattern::Principal(s) if s == "a@b.c"));
    assert!(matches!(p("*@b.c"), Pattern::Principal(s) if s == "*@b.c"));
    // Reserved words only when exact.
    assert!(matches!(p("Any"), Pattern::Principal(_)));
    assert!(matches!(p("anyone"), Pattern::Principal(_)));
    assert!(matches!(
        p("system:serviceaccount:ns:sa"),
        Pattern::Principal(_)
    ));
}

#[test]
fn parse_errors() {
    let err = |s: &str| Pattern::parse(s).unwrap_err();
    assert_eq!(err(""), "empty pattern");
    assert!(err("role:").contains("empty role name"), "{}", err("role:"));
    assert!(err("role:a,b").contains("\"role:a,b\""));
    assert!(
        err("claim:novalue").contains("expected CLAIM=VALUE"),
        "{}",
        err("claim:novalue")
    );
    assert!(err("claim:").contains("expected CLAIM=VALUE"));
    assert!(err("claim:a..b=c").contains("empty segment"));
    assert!(err("~").contains("empty regular expression"));
    assert!(err("~*").contains("empty regular expression"));
    let e = err("~^batch-(");
    assert!(
        e.starts_with("\"~^batch-(\": invalid regular expression: "),
        "{e}"
    );
    assert!(e.contains("unclosed group"), "{e}");
    assert!(err("~[z-a]").contains("invalid regular expression"));
    assert!(err("a\nb").contains("control character"));
}

#[test]
fn display_round_trip() {
    for s in [
        "any",
        "anonymous",
        "role:writers",
        "claim:org.team=core",
        "~^batch-.*$",
        "*@shop.iam.gserviceaccount.com",
    ] {
        assert_eq!(p(s).to_string(), s);
    }
    assert_eq!(p("~*x").to_string(), "~(?i)x");
}

#[test]
fn any_and_anonymous() {
    let c = Map::new();
    let verified = caller("svc@x", &c, &[]);
    let anon = Caller::anonymous();
    assert!(p("any").matches(&verified));
    assert!(!p("any").matches(&anon));
    assert!(p("anonymous").matches(&anon));
    assert!(!p("anonymous").matches(&verified));
    // Nothing else matches an anonymous caller.
    for s in ["role:r", "claim:a=b", "~.*", "~", "*"] {
        if let Ok(pat) = Pattern::parse(s) {
            assert!(!pat.matches(&anon), "{s}");
        }
    }
}

#[test]
fn roles() {
    let c = Map::new();
    let roles = vec!["writers".to_owned(), "readers".to_owned()];
    let with = caller("a", &c, &roles);
    let without = caller("a", &c, &[]);
    assert!(p("role:writers").matches(&with));
    assert!(p("role:readers").matches(&with));
    assert!(!p("role:admins").matches(&with));
    assert!(!p("role:writers").matches(&without));
    assert!(!p("role:Writers").matches(&with));
}

#[test]
fn claim_patterns() {
    let cl = claims(json!({
        "email_verified": true,
        "groups": ["ops", "dev"],
        "org": {"team": "core"},
        "n": 7,
    }));
    let c = caller("a", &cl, &[]);
    assert!(p("claim:email_verified=true").matches(&c));
    assert!(!p("claim:email_verified=false").matches(&c));
    assert!(p("claim:groups=dev").matches(&c));
    assert!(!p("claim:groups=qa").matches(&c));
    assert!(p("claim:org.team=core").matches(&c));
    assert!(p("claim:n=7").matches(&c));
    assert!(!p("claim:missing=x").matches(&c));
    // A caller with a principal but no claims.
    let no_claims = Caller {
        principal: Some("a"),
        claims: None,
        roles: &[],
        provider: None,
    };
    assert!(!p("claim:n=7").matches(&no_claims));
}

#[test]
fn globs() {
    let g = "*@shop.iam.gserviceaccount.com";
    assert!(matches(g, "checkout@shop.iam.gserviceaccount.com"));
    assert!(matches(g, "@shop.iam.gserviceaccount.com"));
    assert!(!matches(
        g,
        "checkout@shop.iam.gserviceaccount.com.evil.com"
    ));
    assert!(!matches(g, "checkout@shopXiamXgserviceaccountXcom"));
    assert!(!matches(g, "checkout@other.iam.gserviceaccount.com"));
    assert!(matches(
        "batch-*",
        "batch-nightly@shop.iam.gserviceaccount.com"
    ));
    assert!(matches("batch-*", "batch-"));
    assert!(!matches("batch-*", "xbatch-1"));
    assert!(!matches("batch-*", "batch"));
    assert!(matches("a*b*c", "a-b-b-c"));
    assert!(matches("*", "anything"));
    // Exact, case-sensitive; '.', '?', '[' are literal.
    assert!(matches("checkout@shop.com", "checkout@shop.com"));
    assert!(!matches("checkout@shop.com", "Checkout@shop.com"));
    assert!(!matches("checkout@shop.com", "checkout@shopXcom"));
    assert!(!matches("checkout@shop.com", "checkout@shop.com2"));
    assert!(!matches("a?", "ab"));
    assert!(matches("a[1]", "a[1]"));
}

#[test]
fn regexes() {
    // Unanchored, like nginx.
    assert!(matches("~^batch-", "batch-1@x"));
    assert!(!matches("~^batch-", "xbatch-1@x"));
    assert!(matches("~batch", "xbatch-1@x"));
    let anchored = r"~^batch-.*@shop\.iam\.gserviceaccount\.com$";
    assert!(matches(anchored, "batch-a@shop.iam.gserviceaccount.com"));
    assert!(!matches(
        anchored,
        "batch-a@shop.iam.gserviceaccount.com.evil"
    ));
    assert!(!matches(anchored, "batch-a@shopXiam.gserviceaccount.com"));
    // Case-sensitive unless ~*.
    assert!(!matches("~^batch-", "BATCH-1"));
    assert!(matches("~*^batch-", "BATCH-1"));
}

#[test]
fn role_bindings() {
    let b = parse_role(
        "writers",
        &[
            "checkout@shop.iam.gserviceaccount.com",
            r"~^batch-.*@shop\.iam\.gserviceaccount\.com$",
        ],
    )
    .unwrap();
    assert_eq!(b.name, "writers");
    assert_eq!(b.patterns.len(), 2);
    assert!(parse_role("r", &["any", "claim:a=b", "*@x"]).is_ok());

    let e = parse_role("r", &["role:other"]).unwrap_err();
    assert!(e.contains("roles do not nest"), "{e}");
    let e = parse_role("r", &["a@x", "anonymous"]).unwrap_err();
    assert!(e.contains("anonymous"), "{e}");
    assert!(parse_role("r", &[]).unwrap_err().contains("no pattern"));
    assert!(parse_role("", &["a"])
        .unwrap_err()
        .contains("empty role name"));
    assert!(parse_role("a,b", &["a"]).is_err());
    assert!(parse_role("r", &["~("])
        .unwrap_err()
        .contains("invalid regular expression"));
}

#[test]
fn roles_of_callers() {
    let bindings = vec![
        parse_role("writers", &["checkout@shop.com"]).unwrap(),
        parse_role("readers", &["*@shop.com"]).unwrap(),
        parse_role("ops", &["claim:groups=ops"]).unwrap(),
        // A second line for an existing role: the name once, first position.
        parse_role("writers", &["~^batch-"]).unwrap(),
        parse_role("everyone", &["any"]).unwrap(),
    ];
    let none = Map::new();
    let ops = claims(json!({"groups": ["ops"]}));
    assert_eq!(
        roles_of(&bindings, Some("checkout@shop.com"), Some(&none)),
        ["writers", "readers", "everyone"]
    );
    assert_eq!(
        roles_of(&bindings, Some("batch-1@shop.com"), Some(&ops)),
        ["readers", "ops", "writers", "everyone"]
    );
    assert_eq!(
        roles_of(&bindings, Some("web@other.com"), Some(&none)),
        ["everyone"]
    );
    assert!(roles_of(&bindings, None, None).is_empty());
    assert!(roles_of(&[], Some("a"), Some(&none)).is_empty());
    // One scratch list reused across callers: always the same answer as roles_of.
    let mut scratch = vec!["stale".to_string(); 6];
    for (p, c) in [
        (Some("batch-1@shop.com"), Some(&ops)),
        (Some("checkout@shop.com"), Some(&none)),
        (None, None),
        (Some("web@other.com"), Some(&none)),
        (Some("batch-1@shop.com"), Some(&ops)),
    ] {
        roles_into(&bindings, p, c, &mut scratch);
        assert_eq!(scratch, roles_of(&bindings, p, c));
    }
}

fn rule(effect: Effect, args: &[&str]) -> Rule {
    parse_rule(effect, args, format!("{args:?}")).unwrap()
}

#[test]
fn rule_parsing() {
    let r = rule(Effect::Allow, &["role:writers", "methods=POST,PUT,DELETE"]);
    assert_eq!(r.effect, Effect::Allow);
    assert_eq!(r.patterns.len(), 1);
    assert_eq!(r.methods.as_deref().unwrap(), ["POST", "PUT", "DELETE"]);
    // methods= anywhere, text kept.
    let r = parse_rule(
        Effect::Deny,
        &["methods=GET", "a@x", "b@x"],
        "mesh_deny a@x b@x methods=GET; (/etc/nginx/nginx.conf:12)".into(),
    )
    .unwrap();
    assert_eq!(r.patterns.len(), 2);
    assert_eq!(r.methods.as_deref().unwrap(), ["GET"]);
    assert_eq!(
        r.text,
        "mesh_deny a@x b@x methods=GET; (/etc/nginx/nginx.conf:12)"
    );
    // No methods=: all methods; duplicates collapse.
    assert!(rule(Effect::Allow, &["any"]).methods.is_none());
    let r = rule(Effect::Allow, &["any", "methods=GET,GET,M-SEARCH"]);
    assert_eq!(r.methods.as_deref().unwrap(), ["GET", "M-SEARCH"]);

    let err = |args: &[&str]| parse_rule(Effect::Allow, args, String::new()).unwrap_err();
    assert!(err(&["any", "methods="]).contains("empty method list"));
    assert!(err(&["any", "methods=GET,"]).contains("empty method"));
    assert!(err(&["any", "methods=,GET"]).contains("empty method"));
    assert!(err(&["any", "methods=get"])
        .contains("invalid method \"get\": method names are case-sensitive (did you mean GET?)"));
    assert!(err(&["any", "methods=Get"]).contains("case-sensitive"));
    assert!(err(&["any", "methods=GET POST"]).contains("invalid method"));
    assert!(err(&["any", "methods=G\u{e9}T"]).contains("invalid method"));
    assert!(err(&["any", "methods=GET", "methods=POST"]).contains("twice"));
    assert!(err(&["methods=GET"]).contains("no pattern"));
    assert!(err(&["any", "method=GET"]).contains("unknown parameter"));
    assert!(err(&["any", "methods=POST", "limit=5"]).contains("unknown parameter"));
    assert!(err(&[]).contains("no pattern"));
    assert!(err(&["role:"]).contains("empty role name"));
    assert!(err(&["~("]).contains("invalid regular expression"));
}

#[test]
fn rule_methods() {
    let c = Map::new();
    let who = caller("a@x", &c, &[]);
    let r = rule(Effect::Allow, &["any", "methods=GET,POST"]);
    assert!(r.matches(&who, "GET"));
    assert!(r.matches(&who, "POST"));
    assert!(!r.matches(&who, "HEAD"), "GET does not imply HEAD");
    assert!(!r.matches(&who, "get"));
    assert!(!r.matches(&who, "DELETE"));
    let all = rule(Effect::Allow, &["any"]);
    for m in ["GET", "HEAD", "PATCH", "WHATEVER"] {
        assert!(all.matches(&who, m));
    }
    // Method matches but no pattern does.
    assert!(!rule(Effect::Allow, &["b@x", "methods=GET"]).matches(&who, "GET"));
    assert!(!r.matches(&Caller::anonymous(), "GET"));
}

#[test]
fn decisions() {
    let c = Map::new();
    let writers = vec!["writers".to_owned()];
    let writer = caller("checkout@shop.com", &c, &writers);
    let reader = caller("web@shop.com", &c, &[]);
    let stranger = caller("x@evil.com", &c, &[]);
    let anon = Caller::anonymous();

    assert!(matches!(decide(&[], &writer, "GET"), Verdict::NoRules));

    let rules = vec![
        rule(Effect::Deny, &["~^web@", "methods=DELETE"]),
        rule(Effect::Allow, &["role:writers", "methods=POST,PUT,DELETE"]),
        rule(Effect::Allow, &["*@shop.com", "methods=GET,HEAD"]),
        rule(Effect::Allow, &["anonymous", "methods=GET"]),
    ];
    let text = |v: Verdict| match v {
        Verdict::Allowed(r) => format!("allow {}", r.text),
        Verdict::Denied(r) => format!("deny {}", r.text),
        Verdict::NoRules => "norules".into(),
        Verdict::NoMatch => "nomatch".into(),
    };
    assert!(
        matches!(decide(&rules, &writer, "POST"), Verdict::Allowed(r) if std::ptr::eq(r, &rules[1]))
    );
    assert!(
        matches!(decide(&rules, &writer, "GET"), Verdict::Allowed(r) if std::ptr::eq(r, &rules[2]))
    );
    assert!(
        matches!(decide(&rules, &reader, "GET"), Verdict::Allowed(r) if std::ptr::eq(r, &rules[2]))
    );
    assert!(matches!(decide(&rules, &reader, "POST"), Verdict::NoMatch));
    // Deny listed first wins over a later allow that also matches.
    let v = decide(&rules, &reader, "DELETE");
    assert!(
        matches!(v, Verdict::Denied(r) if std::ptr::eq(r, &rules[0])),
        "{}",
        text(v)
    );
    assert!(matches!(decide(&rules, &stranger, "GET"), Verdict::NoMatch));
    assert!(
        matches!(decide(&rules, &anon, "GET"), Verdict::Allowed(r) if std::ptr::eq(r, &rules[3]))
    );
    assert!(matches!(decide(&rules, &anon, "HEAD"), Verdict::NoMatch));

    // First match wins: an allow listed before a deny.
    let rules = vec![
        rule(Effect::Allow, &["*@shop.com"]),
        rule(Effect::Deny, &["web@shop.com"]),
    ];
    assert!(matches!(
        decide(&rules, &reader, "GET"),
        Verdict::Allowed(_)
    ));
    let rules = vec![
        rule(Effect::Deny, &["web@shop.com"]),
        rule(Effect::Allow, &["*@shop.com"]),
    ];
    assert!(matches!(decide(&rules, &reader, "GET"), Verdict::Denied(_)));
    assert!(matches!(
        decide(&rules, &writer, "GET"),
        Verdict::Allowed(_)
    ));
    // Deny everyone else at the end.
    let rules = vec![
        rule(Effect::Allow, &["role:writers"]),
        rule(Effect::Deny, &["any", "anonymous"]),
    ];
    assert!(matches!(
        decide(&rules, &stranger, "GET"),
        Verdict::Denied(_)
    ));
    assert!(matches!(decide(&rules, &anon, "GET"), Verdict::Denied(_)));
    assert!(matches!(
        decide(&rules, &writer, "GET"),
        Verdict::Allowed(_)
    ));
}

#[test]
fn provider_filter() {
    let claims = Map::new();
    let from = |provider| Caller {
        principal: Some("svc@x.com"),
        claims: Some(&claims),
        roles: &[],
        provider,
    };
    let r = rule(Effect::Allow, &["svc@x.com", "provider=google,ci"]);
    assert_eq!(
        r.providers.as_deref(),
        Some(&["google".to_string(), "ci".to_string()][..])
    );
    assert!(r.matches(&from(Some("google")), "GET"));
    assert!(r.matches(&from(Some("ci")), "GET"));
    assert!(!r.matches(&from(Some("lax")), "GET"));
    assert!(!r.matches(&from(None), "GET"));
    // Without provider=, the rule applies to callers of any provider.
    assert!(rule(Effect::Allow, &["svc@x.com"]).matches(&from(Some("lax")), "GET"));
    for bad in [
        &["any", "provider="][..],
        &["any", "provider=a,,b"],
        &["any", "provider=a", "provider=b"],
        &["any", "providers=a"],
    ] {
        assert!(
            parse_rule(Effect::Allow, bad, String::new()).is_err(),
            "{bad:?}"
        );
    }
}

#[test]
fn methods_are_rfc9110_tokens() {
    let claims = Map::new();
    let c = caller("svc", &claims, &[]);
    let r = rule(Effect::Deny, &["any", "methods=PURGE,REPORT,M-SEARCH,x.y!"]);
    assert!(r.matches(&c, "PURGE"));
    assert!(r.matches(&c, "x.y!"));
    assert!(!r.matches(&c, "purge"), "methods are case-sensitive");
    assert!(!r.matches(&c, "UNKNOWN"));
    // UNKNOWN is a method name like any other, not a wildcard for non-core methods.
    let u = rule(Effect::Deny, &["any", "methods=UNKNOWN"]);
    assert!(!u.matches(&c, "PURGE"));
    for bad in [
        "methods=GE T",
        "methods=GET;",
        "methods=G\"",
        "methods=(GET)",
        "methods=GÉT",
        "methods=delete",
    ] {
        assert!(
            parse_rule(Effect::Allow, &["any", bad], String::new()).is_err(),
            "{bad}"
        );
    }
}
