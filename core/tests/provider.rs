//! `mesh_provider` blocks: lines, the Google preset, algorithm/key-type rules, validation.

mod common;

use common::{JWKS, RSA_PUB, SECRET};
use mesh_core::keys::{Algorithm, KeySet};
use mesh_core::provider::{
    allowed_algorithms, check_key_url, BlockError, KeySource, Line, ProviderBlock, UrlFor,
    DEFAULT_LEEWAY, GOOGLE_ISSUERS, GOOGLE_KEYS_URL,
};

fn block() -> ProviderBlock<String> {
    ProviderBlock::new("p".into())
}

fn words(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn err(r: Result<mesh_core::provider::Built<String>, BlockError>) -> BlockError {
    match r {
        Ok(_) => panic!("the block was accepted"),
        Err(e) => e,
    }
}

#[test]
fn google_preset_fills_what_the_block_leaves_out() {
    let mut b = block();
    b.line("preset", &words(&["google"])).unwrap();
    b.line("audience", &words(&["https://svc.example"]))
        .unwrap();
    let built = b.finish(|u| Ok(u.url().to_string())).unwrap();
    assert_eq!(built.url.as_deref(), Some(GOOGLE_KEYS_URL));
    assert_eq!(
        built.provider.issuers,
        GOOGLE_ISSUERS.map(String::from).to_vec()
    );
    assert_eq!(built.provider.algorithms, vec![Algorithm::RS256]);
    assert_eq!(built.algorithms, Some(vec![Algorithm::RS256]));
    // the caller: a verified email when the token has one, else sub
    assert_eq!(built.provider.principal, "sub");
    assert!(built.provider.email_first);
    assert!(built.provider.require.is_empty());
    assert!(built.provider.keys.is_empty(), "URL keys arrive later");
}

#[test]
fn lines_written_win_over_the_preset() {
    let mut b = block();
    b.line("preset", &words(&["google"])).unwrap();
    b.line("issuer", &words(&["https://other.example"]))
        .unwrap();
    b.line("principal", &words(&["sub"])).unwrap();
    b.line("require", &words(&["email_verified=false"]))
        .unwrap();
    b.set_keys(KeySource::File(KeySet::load(RSA_PUB).unwrap()));
    let built = b
        .finish(|_| panic!("the preset URL is not used when keys are given"))
        .unwrap();
    assert_eq!(
        built.provider.issuers,
        vec!["https://other.example".to_string()]
    );
    assert_eq!(built.provider.principal, "sub");
    assert!(
        !built.provider.email_first,
        "a principal line names the claim alone"
    );
    assert_eq!(built.provider.require.len(), 1);
    assert!(built.url.is_none());
}

#[test]
fn preset_url_failure_blames_the_block() {
    let mut b = block();
    b.line("preset", &words(&["google"])).unwrap();
    let e = err(b.finish(|_| Err("no CA".into())));
    assert_eq!(e.line, Line::Block);
    assert_eq!(e.message, "preset google: no CA");
}

#[test]
fn defaults_without_preset() {
    let mut b = block();
    b.line("issuer", &words(&["https://p.example"])).unwrap();
    b.set_keys(KeySource::File(KeySet::load(JWKS).unwrap()));
    let built = b.finish(|_| unreachable!()).unwrap();
    assert_eq!(built.provider.leeway, DEFAULT_LEEWAY);
    assert_eq!(built.provider.principal, "sub");
    assert!(built.provider.audiences.is_empty());
    assert!(built.algorithms.is_none());
    assert!(!built.platform_verified);
    assert!(!built.provider.algorithms.is_empty());
    assert!(built
        .provider
        .algorithms
        .iter()
        .all(|a| !matches!(a, Algorithm::HS256)));
}

#[test]
fn missing_issuer_and_missing_keys_blame_the_block() {
    let mut b = block();
    b.set_keys(KeySource::File(KeySet::load(JWKS).unwrap()));
    let e = err(b.finish(|_| unreachable!()));
    assert_eq!(
        (e.line, e.message.as_str()),
        (Line::Block, "mesh_provider \"p\": no \"issuer\"")
    );

    let mut b = block();
    b.line("issuer", &words(&["https://p.example"])).unwrap();
    let e = err(b.finish(|_| unreachable!()));
    assert_eq!(e.line, Line::Block);
    assert!(
        e.message.contains("no \"keys\" or \"secret\""),
        "{}",
        e.message
    );
}

#[test]
fn secret_with_keys_is_refused_at_the_secret() {
    let mut b = block();
    b.line("issuer", &words(&["https://p.example"])).unwrap();
    b.set_keys(KeySource::File(KeySet::load(JWKS).unwrap()));
    b.set_secret(KeySet::from_secret(SECRET));
    let e = err(b.finish(|_| unreachable!()));
    assert_eq!(e.line, Line::Secret);
}

#[test]
fn algorithms_must_fit_the_keys() {
    let rsa = KeySet::load(RSA_PUB).unwrap();
    let hmac = KeySet::from_secret(SECRET);
    assert_eq!(
        allowed_algorithms(&rsa, false, Some(&[Algorithm::RS256, Algorithm::HS256])),
        Err((Algorithm::HS256, "HMAC algorithms need \"secret\""))
    );
    assert_eq!(
        allowed_algorithms(&hmac, false, Some(&[Algorithm::RS256])),
        Err((Algorithm::RS256, "no configured key can verify it"))
    );
    assert_eq!(
        allowed_algorithms(&rsa, false, Some(&[Algorithm::ES256])),
        Err((Algorithm::ES256, "no configured key can verify it"))
    );
    assert_eq!(
        allowed_algorithms(&hmac, false, Some(&[Algorithm::HS256])),
        Ok(vec![Algorithm::HS256])
    );
    // URL keys: unknown yet, so only HMAC is ruled out; unconfigured = every public-key algorithm.
    let empty = KeySet::default();
    assert_eq!(
        allowed_algorithms(&empty, true, Some(&[Algorithm::ES256])),
        Ok(vec![Algorithm::ES256])
    );
    assert!(allowed_algorithms(&empty, true, Some(&[Algorithm::HS384])).is_err());
    let all = allowed_algorithms(&empty, true, None).unwrap();
    assert_eq!(all.len(), 10);
    assert!(!all.contains(&Algorithm::HS512));
}

#[test]
fn a_bad_algorithm_blames_the_algorithms_line() {
    let mut b = block();
    b.line("issuer", &words(&["https://p.example"])).unwrap();
    b.set_keys(KeySource::File(KeySet::load(RSA_PUB).unwrap()));
    b.line("algorithms", &words(&["RS256", "HS256"])).unwrap();
    let e = err(b.finish(|_| unreachable!()));
    assert_eq!(e.line, Line::Algorithms);
    assert_eq!(
        e.message,
        "mesh_provider \"p\": algorithm \"HS256\" cannot be used: HMAC algorithms need \"secret\""
    );
}

#[test]
fn line_errors() {
    let mut b = block();
    assert!(b
        .line("algorithms", &words(&["RS257"]))
        .unwrap_err()
        .contains("\"RS257\""));
    assert!(b
        .line("algorithms", &words(&["none"]))
        .unwrap_err()
        .contains("\"none\""));
    b.line("algorithms", &words(&["RS256", "RS256"])).unwrap();
    assert_eq!(
        b.line("algorithms", &words(&["RS384"])).unwrap_err(),
        "\"algorithms\" is duplicate in mesh_provider \"p\""
    );
    assert_eq!(
        b.line("issuer", &[]).unwrap_err(),
        "invalid number of arguments in \"issuer\" of mesh_provider \"p\""
    );
    assert_eq!(
        b.line("leeway", &words(&["1s", "2s"])).unwrap_err(),
        "invalid number of arguments in \"leeway\" of mesh_provider \"p\""
    );
    assert!(b
        .line("leeway", &words(&["abc"]))
        .unwrap_err()
        .starts_with("leeway: invalid value \"abc\""));
    assert!(b
        .line("require", &words(&["groups"]))
        .unwrap_err()
        .starts_with("require: \"groups\""));
    assert!(b.line("require", &words(&["=admins"])).is_err());
    assert_eq!(
        b.line("colour", &words(&["blue"])).unwrap_err(),
        "unknown directive \"colour\" in mesh_provider \"p\""
    );
    assert!(b
        .line("preset", &words(&["amazon"]))
        .unwrap_err()
        .contains("known: google"));
    assert!(b.line("platform_verified", &words(&["maybe"])).is_err());
    assert_eq!(
        b.line("principal", &words(&[""])).unwrap_err(),
        "principal: empty claim name"
    );
}

#[test]
fn key_urls() {
    assert!(check_key_url("https://keys.example/jwks", true).is_ok());
    assert!(check_key_url("http://127.0.0.1:8/jwks", false).is_ok());
    assert!(check_key_url("http://keys.example/jwks", true)
        .unwrap_err()
        .contains("applies to https:// URLs only"));
    assert!(check_key_url("https://", false).is_err());
    assert!(check_key_url("https:///path", false).is_err());
    assert!(check_key_url("https://a b", false).is_err());
}

#[test]
fn google_issuers_need_an_audience() {
    // preset google without audience
    let mut b = block();
    b.line("preset", &words(&["google"])).unwrap();
    let e = err(b.finish(|u| Ok(u.url().to_string())));
    assert_eq!(e.line, Line::Block);
    assert!(e.message.contains("need \"audience\""), "{}", e.message);
    // a Google issuer written by hand, any spelling
    for iss in [
        "https://accounts.google.com",
        "accounts.google.com",
        "https://accounts.google.com/",
    ] {
        let mut b = block();
        b.line("issuer", &words(&["https://ci.example", iss]))
            .unwrap();
        b.set_keys(KeySource::File(KeySet::load(RSA_PUB).unwrap()));
        let e = err(b.finish(|u| Ok(u.url().to_string())));
        assert!(
            e.message.contains("need \"audience\""),
            "{iss}: {}",
            e.message
        );
    }
    // with an audience: accepted; another issuer needs none
    let mut b = block();
    b.line("issuer", &words(&["accounts.google.com"])).unwrap();
    b.line("audience", &words(&["https://svc.example"]))
        .unwrap();
    b.set_keys(KeySource::File(KeySet::load(RSA_PUB).unwrap()));
    assert!(b.finish(|u| Ok(u.url().to_string())).is_ok());
    let mut b = block();
    b.line("issuer", &words(&["https://ci.example"])).unwrap();
    b.set_keys(KeySource::File(KeySet::load(RSA_PUB).unwrap()));
    assert!(b.finish(|u| Ok(u.url().to_string())).is_ok());
}

#[test]
fn firebase_preset_fills_issuer_audience_keys() {
    let mut b = block();
    b.line("preset", &words(&["firebase", "shop-prod-1"]))
        .unwrap();
    let built = b.finish(|u| Ok(u.url().to_string())).unwrap();
    assert_eq!(
        built.url.as_deref(),
        Some("https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com")
    );
    assert_eq!(
        built.provider.issuers,
        vec!["https://securetoken.google.com/shop-prod-1".to_string()]
    );
    assert_eq!(built.provider.audiences, vec!["shop-prod-1".to_string()]);
    assert_eq!(built.provider.algorithms, vec![Algorithm::RS256]);
    assert_eq!(built.provider.principal, "sub");
    assert!(!built.provider.email_first);
    // lines written win: the audience and the keys
    let mut b = block();
    b.line("preset", &words(&["firebase", "shop-prod-1"]))
        .unwrap();
    b.line("audience", &words(&["other"])).unwrap();
    b.set_keys(KeySource::Url("https://127.0.0.1:9/x509".to_string()));
    let built = b.finish(|_| panic!("keys were given")).unwrap();
    assert_eq!(built.provider.audiences, vec!["other".to_string()]);
    assert_eq!(built.url.as_deref(), Some("https://127.0.0.1:9/x509"));
}

#[test]
fn service_account_preset_fills_issuer_subject_keys() {
    let email = "deployer@shop-prod-1.iam.gserviceaccount.com";
    let mut b = block();
    b.line("preset", &words(&["service_account", email]))
        .unwrap();
    b.line("audience", &words(&["https://orders.example"]))
        .unwrap();
    let built = b.finish(|u| Ok(u.url().to_string())).unwrap();
    assert_eq!(
        built.url,
        Some(format!(
            "https://www.googleapis.com/service_accounts/v1/jwk/{email}"
        ))
    );
    assert_eq!(built.provider.issuers, vec![email.to_string()]);
    assert_eq!(built.provider.require.len(), 1);
    assert_eq!(built.provider.require[0].path_text(), "sub");
    assert_eq!(built.provider.require[0].value, email);
    // no audience is required: only the account's own keys can sign
    let mut b = block();
    b.line("preset", &words(&["service_account", email]))
        .unwrap();
    assert!(b.finish(|u| Ok(u.url().to_string())).is_ok());
}

#[test]
fn preset_arguments_are_checked() {
    for (w, want) in [
        (&["firebase"][..], "the project ID is missing"),
        (&["firebase", "a/b"], "invalid project ID"),
        (&["firebase", "p", "q"], "too many arguments"),
        (&["google", "x"], "too many arguments"),
        (&["service_account"], "the email is missing"),
        (
            &["service_account", "no-at-sign"],
            "invalid service account email",
        ),
        (
            &["service_account", "a@b/../c"],
            "invalid service account email",
        ),
        (
            &["service_account", "a@b@c"],
            "invalid service account email",
        ),
        (&["okta"], "unknown preset \"okta\""),
    ] {
        let e = block().line("preset", &words(w)).unwrap_err();
        assert!(e.contains(want), "{w:?}: {e}");
    }
}

#[test]
fn discovery_fetches_below_the_one_issuer() {
    let mut b = block();
    b.line(
        "issuer",
        &words(&["https://token.actions.githubusercontent.com"]),
    )
    .unwrap();
    b.set_discovery(Some("/etc/ca.pem".into()));
    let mut asked = None;
    let built = b
        .finish(|u| {
            asked = Some(format!("{u:?}"));
            Ok(u.url().to_string())
        })
        .unwrap();
    assert_eq!(
        built.url.as_deref(),
        Some("https://token.actions.githubusercontent.com/.well-known/openid-configuration")
    );
    assert_eq!(
        asked.unwrap(),
        format!(
            "{:?}",
            UrlFor::Discovery {
                document:
                    "https://token.actions.githubusercontent.com/.well-known/openid-configuration",
                issuer: "https://token.actions.githubusercontent.com",
                ca: Some("/etc/ca.pem"),
            }
        )
    );
    assert!(built.provider.keys.is_empty(), "keys arrive later");
    // with a preset: the preset's issuer, discovery's keys
    let mut b = block();
    b.line("preset", &words(&["firebase", "p1"])).unwrap();
    b.set_discovery(None);
    let built = b.finish(|u| Ok(u.url().to_string())).unwrap();
    assert_eq!(
        built.url.as_deref(),
        Some("https://securetoken.google.com/p1/.well-known/openid-configuration")
    );
}

#[test]
fn discovery_errors_blame_its_line() {
    type Setup = fn(&mut ProviderBlock<String>);
    let cases: [(Setup, &str); 4] = [
        (
            |b| b.set_keys(KeySource::File(KeySet::load(JWKS).unwrap())),
            "cannot be combined",
        ),
        (
            |b| b.set_secret(KeySet::from_secret(SECRET)),
            "cannot be combined",
        ),
        (
            |b| {
                b.line(
                    "issuer",
                    &words(&["https://a.example", "https://b.example"]),
                )
                .unwrap()
            },
            "exactly one issuer",
        ),
        (
            |b| b.line("issuer", &words(&["a.example"])).unwrap(),
            "https:// URL",
        ),
    ];
    for (setup, want) in cases {
        let mut b = block();
        setup(&mut b);
        // (a duplicate, and ignored, where the setup wrote the issuer)
        let _ = b.line("issuer", &words(&["https://p.example"]));
        b.set_discovery(None);
        let e = err(b.finish(|u| Ok(u.url().to_string())));
        assert_eq!(e.line, Line::Discovery, "{want}");
        assert!(e.message.contains(want), "{}", e.message);
    }
}

#[test]
fn key_urls_are_shown_without_secrets() {
    use mesh_core::provider::{scrub_url, shown_url};
    let cases = [
        ("https://keys.example/jwks", "https://keys.example/jwks"),
        (
            "https://user:pa%40ss@keys.example:8443/jwks?token=s3cr3t&v=1",
            "https://***@keys.example:8443/jwks?token=***&v=***",
        ),
        ("https://k.example?SECRET", "https://k.example?***"),
        ("https://k.example/a?x=&y", "https://k.example/a?x=***&***"),
        ("https://@k.example/", "https://***@k.example/"),
        ("http://k.example/p#frag", "http://k.example/p#frag"),
        ("https://k.example/p@x/q", "https://k.example/p@x/q"),
        ("https://a@b@k.example/", "https://***@k.example/"),
        ("https://k.example/?a=1?b=2", "https://k.example/?a=***"),
    ];
    for (url, shown) in cases {
        assert_eq!(shown_url(url), shown, "{url}");
    }
    let url = "https://user:hunter22@keys.example/jwks?token=s3cr3tvalue&v=1";
    let msg = format!(
        "https://keys.example/jwks?token=s3cr3tvalue: connect failed for {url} (user:hunter22)"
    );
    let scrubbed = scrub_url(&msg, url);
    assert!(
        !scrubbed.contains("hunter22") && !scrubbed.contains("s3cr3tvalue"),
        "{scrubbed}"
    );
    assert!(
        scrubbed.contains("https://***@keys.example/jwks?token=***&v=***"),
        "{scrubbed}"
    );
}
