//! `RuleSet` (exact principals and roles looked up, not scanned) decides exactly as the
//! linear `decide`: the same verdict and the same rule, on randomized rule sets mixing
//! exact, glob, regex, role, claim, `any` and `anonymous` patterns with method and provider filters.

use mesh_core::policy::{decide, parse_rule, Caller, Effect, RuleSet, Verdict};
use serde_json::{json, Map, Value};

/// xorshift64*: a fixed sequence, so a failure is reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const PRINCIPALS: [&str; 5] = [
    "a@x.com",
    "b@x.com",
    "c@y.com",
    "batch-1@x.com",
    "Batch-2@y.com",
];
const PATTERNS: [&str; 16] = [
    "a@x.com",
    "b@x.com",
    "c@y.com",
    "batch-1@x.com",
    "nobody@z.com",
    "*@x.com",
    "batch-*",
    "*",
    "~^b",
    "~*^batch-",
    "role:writers",
    "role:readers",
    "role:ghost",
    "claim:team=core",
    "any",
    "anonymous",
];
const METHODS: [&str; 4] = ["GET", "POST", "DELETE", "PURGE"];

fn same(a: &Verdict, b: &Verdict) -> bool {
    match (a, b) {
        (Verdict::NoRules, Verdict::NoRules) | (Verdict::NoMatch, Verdict::NoMatch) => true,
        (Verdict::Allowed(x), Verdict::Allowed(y)) | (Verdict::Denied(x), Verdict::Denied(y)) => {
            std::ptr::eq(*x, *y)
        }
        _ => false,
    }
}

#[test]
fn index_decides_as_the_linear_scan() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let team_core = json!({"team": "core"});
    let team_other = json!({"team": ["edge", "web"]});
    let claim_sets: [&Map<String, Value>; 2] = [
        team_core.as_object().unwrap(),
        team_other.as_object().unwrap(),
    ];
    let role_sets: [Vec<String>; 4] = [
        vec![],
        vec!["writers".into()],
        vec!["readers".into(), "writers".into()],
        vec!["readers".into()],
    ];
    let mut decided = [0usize; 3];
    for round in 0..400 {
        let n = 1 + rng.below(if round % 10 == 0 { 60 } else { 8 });
        let rules: Vec<_> = (0..n)
            .map(|i| {
                let effect = if rng.below(3) == 0 {
                    Effect::Deny
                } else {
                    Effect::Allow
                };
                let mut args: Vec<String> = (0..1 + rng.below(3))
                    .map(|_| rng.pick(&PATTERNS[..]).to_string())
                    .collect();
                match rng.below(4) {
                    0 => args.push("methods=GET".into()),
                    1 => args.push("methods=POST,PURGE".into()),
                    _ => {}
                }
                match rng.below(4) {
                    0 => args.push("provider=google".into()),
                    1 => args.push("provider=ci,google".into()),
                    _ => {}
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                parse_rule(effect, &args, format!("rule {i}")).unwrap()
            })
            .collect();
        let set = RuleSet::new(rules.clone());
        for _ in 0..40 {
            let anonymous = rng.below(6) == 0;
            let roles = rng.pick(&role_sets[..]);
            let caller = if anonymous {
                Caller::anonymous()
            } else {
                Caller {
                    principal: Some(*rng.pick(&PRINCIPALS[..])),
                    claims: Some(*rng.pick(&claim_sets[..])),
                    roles,
                    provider: Some(*rng.pick(&["google", "ci", "other"][..])),
                }
            };
            let method = *rng.pick(&METHODS[..]);
            let linear = decide(&rules, &caller, method);
            let indexed = set.decide(&caller, method);
            // The same rule (by position: the set holds its own copy).
            let pos = |v: &Verdict, rs: &[mesh_core::policy::Rule]| match v {
                Verdict::Allowed(r) | Verdict::Denied(r) => {
                    Some(rs.iter().position(|x| std::ptr::eq(x, *r)).unwrap())
                }
                _ => None,
            };
            assert_eq!(
                pos(&linear, &rules),
                pos(&indexed, set.rules()),
                "round {round}: {caller:?} {method}: {:?}",
                rules.iter().map(|r| &r.text).collect::<Vec<_>>()
            );
            assert!(same(&linear, &decide(&rules, &caller, method)));
            assert_eq!(
                std::mem::discriminant(&linear),
                std::mem::discriminant(&indexed)
            );
            assert_eq!(linear.rule_text(), indexed.rule_text());
            decided[match linear {
                Verdict::Allowed(_) => 0,
                Verdict::Denied(_) => 1,
                _ => 2,
            }] += 1;
        }
    }
    // The sample exercised every outcome.
    assert!(decided.iter().all(|&n| n > 200), "{decided:?}");
}

#[test]
fn order_decides_between_exact_glob_and_regex() {
    let rule = |e, args: &[&str], t: &str| parse_rule(e, args, t.into()).unwrap();
    let caller = Caller {
        principal: Some("batch-1@x.com"),
        claims: None,
        roles: &[],
        provider: None,
    };
    // The same three rules in every order: the first listed wins, whatever its kind.
    let kinds = [
        rule(Effect::Deny, &["batch-1@x.com"], "exact"),
        rule(Effect::Allow, &["*@x.com"], "glob"),
        rule(Effect::Deny, &["~^batch-"], "regex"),
    ];
    for order in [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ] {
        let rules: Vec<_> = order.iter().map(|&i| kinds[i].clone()).collect();
        let set = RuleSet::new(rules.clone());
        let want = &kinds[order[0]].text;
        assert_eq!(set.decide(&caller, "GET").rule_text(), Some(want.as_str()));
        assert_eq!(
            decide(&rules, &caller, "GET").rule_text(),
            Some(want.as_str())
        );
    }
    // An exact rule for another method does not hide a later glob.
    let rules = vec![
        rule(
            Effect::Deny,
            &["batch-1@x.com", "methods=POST"],
            "exact post",
        ),
        rule(Effect::Allow, &["batch-*"], "glob"),
    ];
    let set = RuleSet::new(rules);
    assert_eq!(set.decide(&caller, "GET").rule_text(), Some("glob"));
    assert_eq!(set.decide(&caller, "POST").rule_text(), Some("exact post"));
    assert!(matches!(
        RuleSet::new(vec![]).decide(&caller, "GET"),
        Verdict::NoRules
    ));
    let set = RuleSet::new(vec![rule(Effect::Allow, &["role:ops"], "ops")]);
    assert!(matches!(set.decide(&caller, "GET"), Verdict::NoMatch));
    let roles = ["ops".to_string()];
    let ops = Caller {
        roles: &roles,
        provider: None,
        ..caller
    };
    assert_eq!(set.decide(&ops, "GET").rule_text(), Some("ops"));
}
