"""Authorization: mesh_role, mesh_allow / mesh_deny, methods=, dry run, $mesh_roles and $mesh_rule.

Every refused request is checked for: 403, `$mesh_decision` = deny, nginx's own error page, the
upstream not reached, and one `[info]` line in error.log naming the decision, the caller and the rule.
"""

from __future__ import annotations

import time

import pytest

from mesh_test.client import Connection, Response, bearer, request
from mesh_test.configs import JWKS_PROVIDER, claims
from mesh_test.nginx import emerg_at_marked_line, line_of, passes_nginx_t, render
from mesh_test.tokens import jwks_token

PROVIDER = JWKS_PROVIDER

OBSERVE = """
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    add_header X-Roles "[$mesh_roles]" always;
    add_header X-Rule "[$mesh_rule]" always;
    proxy_set_header X-Test-Caller $mesh_caller;
    proxy_set_header X-Test-Decision $mesh_decision;
    proxy_set_header X-Test-Roles "[$mesh_roles]";
    proxy_set_header X-Test-Rule "[$mesh_rule]";
"""

# (id, the rule line, callers it lets in, callers it refuses); a caller is (sub, extra claims).
PATTERN_CASES = [
    ("any", "mesh_allow any;",
     [("svc-anything-1", {}), ("x", {})], []),
    ("role", "mesh_allow role:writers;",
     [("svc-writer", {}), ("batch-nightly", {})],
     [("svc-reader", {}), ("svc-other", {})]),
    ("role-bound-by-claim", "mesh_allow role:readers;",
     [("svc-reader", {}), ("svc-some-1", {"team": "reporting"})],
     [("svc-some-2", {"team": "payments"}), ("svc-writer", {})]),
    ("claim", "mesh_allow claim:team=payments;",
     [("svc-pay-1", {"team": "payments"}), ("svc-pay-2", {"team": ["ops", "payments"]})],
     [("svc-pay-3", {"team": "reporting"}), ("svc-pay-4", {}), ("svc-pay-5", {"team": "Payments"}),
      ("svc-pay-6", {"team": "payments-eu"})]),
    ("claim-nested", "mesh_allow claim:org.unit=core;",
     [("svc-org-1", {"org": {"unit": "core", "site": "eu"}})],
     [("svc-org-2", {"org": {"unit": "edge"}}), ("svc-org-3", {"org": "core"}), ("svc-org-4", {"unit": "core"})]),
    ("claim-array", "mesh_allow claim:groups=admins;",
     [("svc-grp-1", {"groups": ["ops", "admins"]}), ("svc-grp-2", {"groups": "admins"})],
     [("svc-grp-3", {"groups": ["administrators"]}), ("svc-grp-4", {"groups": []}), ("svc-grp-5", {})]),
    ("claim-boolean", "mesh_allow claim:email_verified=true;",
     [("svc-bool-1", {"email_verified": True})],
     [("svc-bool-2", {"email_verified": False}), ("svc-bool-3", {})]),
    ("regex", "mesh_allow ~^svc-[a-z]+-prod$;",
     [("svc-orders-prod", {})],
     [("svc-orders-prod-2", {}), ("SVC-ORDERS-PROD", {}), ("x-svc-orders-prod", {}), ("svc-orders-dev", {})]),
    ("regex-unanchored-searches", "mesh_allow ~prod;",
     [("svc-orders-prod", {}), ("prod-x", {})],
     [("svc-orders-dev", {}), ("PROD", {})]),
    ("regex-caseless", "mesh_allow ~*^svc-upper-;",
     [("SVC-UPPER-1", {}), ("svc-upper-2", {}), ("Svc-Upper-3", {})],
     [("svc-lower-1", {}), ("x-svc-upper-1", {})]),
    ("regex-case-sensitive", "mesh_allow ~^svc-upper-;",
     [("svc-upper-4", {})],
     [("SVC-UPPER-5", {})]),
    ("glob-prefix", "mesh_allow *@shop.example;",
     [("checkout@shop.example", {}), ("@shop.example", {})],
     [("checkout@shop.example.evil", {}), ("checkout@shopXexample", {}), ("checkout@SHOP.example", {})]),
    ("glob-middle", "mesh_allow batch-*-eu;",
     [("batch-nightly-eu", {}), ("batch-a-b-eu", {})],
     [("batch-nightly-us", {}), ("batch-eu", {}), ("xbatch-nightly-eu", {})]),
    ("exact", "mesh_allow svc-exact-1;",
     [("svc-exact-1", {})],
     [("svc-exact-10", {}), ("svc-exact", {}), ("SVC-EXACT-1", {}), ("xsvc-exact-1", {})]),
    ("several-patterns-any-of", "mesh_allow svc-a role:auditors;",
     [("svc-a", {}), ("svc-audit-1", {"groups": ["audit"]}), ("svc-writer", {})],
     [("svc-b", {})]),
]


def _pattern_locations() -> str:
    out = []
    for case_id, rule, _ok, _no in PATTERN_CASES:
        out.append(f"    location /p/{case_id}/ {{\n        {rule}  # P-{case_id}.\n"
                   "        proxy_pass http://@UPSTREAM@;\n    }")
    return "\n".join(out) + "\n"


RBAC_HTTP = PROVIDER + """
mesh_role writers svc-writer;
mesh_role writers ~^batch-;
mesh_role readers svc-reader claim:team=reporting;
mesh_role auditors claim:groups=audit svc-writer;
server {
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
""" + OBSERVE + """
    location /open/ {
        proxy_pass http://@UPSTREAM@;
    }
""" + _pattern_locations() + """
    location /methods/ {
        mesh_allow any methods=GET,PUT;  # M-GET-PUT
        proxy_pass http://@UPSTREAM@;
    }
    location /purge-deny/ {
        mesh_deny any methods=PURGE;  # PG-DENY
        mesh_allow any;  # PG-ALLOW
        proxy_pass http://@UPSTREAM@;
    }
    location /purge-only/ {
        mesh_allow any methods=PURGE,REPORT;  # PO-ALLOW
        proxy_pass http://@UPSTREAM@;
    }
    location /unknown-name/ {
        mesh_allow any methods=UNKNOWN;  # UN-ALLOW
        proxy_pass http://@UPSTREAM@;
    }
    location /methods-by-role/ {
        mesh_allow role:writers methods=POST,DELETE;  # MR-WRITE
        mesh_allow any methods=GET;  # MR-READ
        proxy_pass http://@UPSTREAM@;
    }
    location /order/deny-first/ {
        mesh_deny ~^svc-blocked-;  # O-DF-DENY
        mesh_allow any;  # O-DF-ALLOW
        proxy_pass http://@UPSTREAM@;
    }
    location /order/allow-first/ {
        mesh_allow any;  # O-AF-ALLOW
        mesh_deny ~^svc-blocked-;  # O-AF-DENY
        proxy_pass http://@UPSTREAM@;
    }
    location /order/deny-method/ {
        mesh_deny any methods=DELETE;  # O-DM-DENY
        mesh_allow any;  # O-DM-ALLOW
        proxy_pass http://@UPSTREAM@;
    }
    location /anon-ok/ {
        mesh_auth optional jwks;
        mesh_allow anonymous svc-named;  # A-OK
        proxy_pass http://@UPSTREAM@;
    }
    location /anon-no/ {
        mesh_auth optional jwks;
        mesh_allow any;  # A-NO
        proxy_pass http://@UPSTREAM@;
    }
    location /dry/ {
        mesh_policy_dry_run on;
        mesh_allow svc-dry-ok;  # D-ALLOW
        proxy_pass http://@UPSTREAM@;
    }
    location /dry-deny/ {
        mesh_policy_dry_run on;
        mesh_deny svc-dry-bad;  # DD-DENY
        mesh_allow any;  # DD-ALLOW
        proxy_pass http://@UPSTREAM@;
    }
    location /vars/ {
        mesh_allow role:writers methods=GET;  # V-ALLOW
        mesh_deny claim:team=payments;  # V-DENY
        proxy_pass http://@UPSTREAM@;
    }
    location /included/ {
        include @TMP@/rbac-included.conf;
        proxy_pass http://@UPSTREAM@;
    }
    location /static/ {
        mesh_allow svc-static;  # S-ALLOW
        root @TMP@;
    }
    location /errpage/ {
        mesh_allow svc-errpage;  # E-ALLOW
        error_page 403 /rbac-denied;
        proxy_pass http://@UPSTREAM@;
    }
    location = /rbac-denied {
        internal;
        mesh_auth off;
        return 403 "custom denial page\\n";
    }
}
"""

INCLUDED_RULES = b"# rules kept in a file of their own\nmesh_allow svc-included;\n"


@pytest.fixture(scope="module")
def site(module_path, launcher):
    return launcher.start(RBAC_HTTP, files={"rbac-included.conf": INCLUDED_RULES})


@pytest.fixture(scope="module")
def static_site(site):
    (site.ngx.tmp / "static").mkdir(exist_ok=True)
    (site.ngx.tmp / "static" / "page.txt").write_bytes(b"static page\n")
    (site.ngx.tmp / "static" / "page.txt").chmod(0o644)
    (site.ngx.tmp / "static").chmod(0o755)
    return site


_TOKENS: dict = {}


def tok(keyring, sub: str, **extra) -> str:
    key = (sub, repr(sorted(extra.items())))
    if key not in _TOKENS:
        _TOKENS[key] = jwks_token(keyring, claims(sub=sub, **extra))
    return _TOKENS[key]


def rule_text(site, marker: str) -> str:
    """What $mesh_rule holds for the rule on the config line carrying `# marker`."""
    conf = site.ngx.conf_text
    n = line_of(conf, f"# {marker}")
    line = conf.splitlines()[n - 1]
    written = line.split("#", 1)[0].strip().rstrip(";").strip()
    return f"{' '.join(written.split())} ({site.ngx.conf_path}:{n})"


def send(site, path: str, token: str | None = None, method: str = "GET") -> Response:
    """One request on a fresh connection; POST and PUT carry a one-byte body."""
    body = b"x" if method in ("POST", "PUT") else b""
    return request(site.port, path, bearer(token) if token else None, method=method, body=body)


def _info_lines(text: str, *needles: str) -> list[str]:
    return [l for l in text.splitlines() if "[info]" in l and all(n in l for n in needles)]


def assert_logged_once(site, mark: int, *needles: str) -> str:
    return site.ngx.info_lines(mark, *needles)[0]


def allowed(site, path: str, token: str | None, *, method: str = "GET", decision: str = "allow",
            rule: str | None = None, caller: str | None = None) -> Response:
    """200 from the upstream (reached exactly once), with the decision and, if given, the rule."""
    before = site.echo.requests
    resp = send(site, path, token, method)
    assert resp.status == 200, f"expected 200 for {method} {path}, got {resp!r}"
    assert site.echo.requests == before + 1, "the upstream did not get exactly one request"
    assert resp.header("X-Decision") == decision, resp
    assert resp.upstream_header("X-Test-Decision") == decision, resp
    if rule is not None:
        assert resp.header("X-Rule") == f"[{rule}]", f"$mesh_rule: expected {rule!r}, got {resp.header('X-Rule')!r}"
        assert resp.upstream_header("X-Test-Rule") == f"[{rule}]", resp
    if caller is not None:
        assert resp.upstream_header("X-Test-Caller") == caller, resp
    return resp


def forbidden(site, path: str, token: str | None, caller: str | None, *, method: str = "GET",
              rule: str | None = None) -> Response:
    """403 (nginx's page), $mesh_decision deny, upstream untouched, one [info] line."""
    before = site.echo.requests
    mark = site.ngx.log_mark()
    resp = send(site, path, token, method)
    assert resp.status == 403, f"expected 403 for {method} {path} as {caller!r}, got {resp!r}"
    assert resp.header("X-Decision") == "deny", resp
    assert b"403 Forbidden" in resp.body, f"not nginx's own 403 page: {resp.body[:300]!r}"
    assert resp.header("WWW-Authenticate") is None, resp
    assert site.echo.requests == before, "a request refused by RBAC reached the upstream"
    if rule is not None:
        assert resp.header("X-Rule") == f"[{rule}]", f"$mesh_rule: expected {rule!r}, got {resp.header('X-Rule')!r}"
    needles = ["mesh:", "decision: deny", f'caller: "{caller if caller else "-"}"']
    if rule is not None:
        needles.append(rule)
    assert_logged_once(site, mark, *needles)
    return resp


# ---------------------------------------------------------------- each pattern kind

def _pattern_params():
    params = []
    for case_id, _rule, ok, no in PATTERN_CASES:
        for sub, extra in ok:
            params.append(pytest.param(case_id, sub, extra, True, id=f"{case_id}-allows-{sub}"))
        for sub, extra in no:
            params.append(pytest.param(case_id, sub, extra, False, id=f"{case_id}-refuses-{sub}"))
    return params


@pytest.mark.parametrize("case_id,sub,extra,expect_allowed", _pattern_params())
def test_each_pattern_kind_allows_exactly_the_callers_it_names(site, keyring, case_id, sub, extra, expect_allowed):
    token = tok(keyring, sub, **extra)
    path = f"/p/{case_id}/x"
    if expect_allowed:
        allowed(site, path, token, rule=rule_text(site, f"P-{case_id}."), caller=sub)
    else:
        forbidden(site, path, token, sub, rule="no rule matched")


def test_rules_still_require_a_valid_token(site, keyring):
    before = site.echo.requests
    resp = send(site, "/p/any/x")
    assert resp.status == 401 and resp.header("X-Decision") == "unauthenticated", resp
    expired = jwks_token(keyring, claims(sub="svc-late", exp=int(time.time()) - 600, iat=int(time.time()) - 900))
    resp = send(site, "/p/any/x", expired)
    assert resp.status == 401 and resp.header("X-Auth-Status") == "expired", resp
    assert site.echo.requests == before


# ---------------------------------------------------------------- methods=

@pytest.mark.parametrize("method,ok", [("GET", True), ("PUT", True), ("POST", False), ("DELETE", False)])
def test_methods_restricts_a_rule_to_those_methods(site, keyring, method, ok):
    token = tok(keyring, "svc-methods")
    if ok:
        allowed(site, "/methods/x", token, method=method, rule=rule_text(site, "M-GET-PUT"))
    else:
        forbidden(site, "/methods/x", token, "svc-methods", method=method, rule="no rule matched")


def test_methods_let_writers_write_and_everyone_read(site, keyring):
    writer, reader = tok(keyring, "svc-writer"), tok(keyring, "svc-reader")
    allowed(site, "/methods-by-role/x", writer, method="POST", rule=rule_text(site, "MR-WRITE"))
    allowed(site, "/methods-by-role/x", writer, method="DELETE", rule=rule_text(site, "MR-WRITE"))
    allowed(site, "/methods-by-role/x", writer, method="GET", rule=rule_text(site, "MR-READ"))
    allowed(site, "/methods-by-role/x", reader, method="GET", rule=rule_text(site, "MR-READ"))
    forbidden(site, "/methods-by-role/x", reader, "svc-reader", method="POST", rule="no rule matched")
    forbidden(site, "/methods-by-role/x", reader, "svc-reader", method="DELETE", rule="no rule matched")
    forbidden(site, "/methods-by-role/x", writer, "svc-writer", method="PUT", rule="no rule matched")


# Methods nginx has no constant for (PURGE, REPORT, ...) are compared by their real name too.


def test_a_deny_rule_for_purge_refuses_purge(site, keyring):
    token = tok(keyring, "svc-purger")
    forbidden(site, "/purge-deny/x", token, "svc-purger", method="PURGE", rule=rule_text(site, "PG-DENY"))
    allowed(site, "/purge-deny/x", token, method="GET", rule=rule_text(site, "PG-ALLOW"))


def test_an_allow_rule_for_purge_and_report_lets_exactly_those_in(site, keyring):
    token = tok(keyring, "svc-purger")
    for method in ("PURGE", "REPORT"):
        allowed(site, "/purge-only/x", token, method=method, rule=rule_text(site, "PO-ALLOW"))
    forbidden(site, "/purge-only/x", token, "svc-purger", method="GET", rule="no rule matched")


def test_methods_unknown_names_a_method_called_unknown_only(site, keyring):
    token = tok(keyring, "svc-purger")
    forbidden(site, "/unknown-name/x", token, "svc-purger", method="PURGE", rule="no rule matched")
    allowed(site, "/unknown-name/x", token, method="UNKNOWN", rule=rule_text(site, "UN-ALLOW"))


def test_a_non_core_method_outside_methods_is_judged_by_the_other_rules(site, keyring):
    # what holds today as well: a rule with methods= does not apply to PURGE, the next one does
    token = tok(keyring, "svc-purger")
    allowed(site, "/order/deny-method/x", token, method="PURGE", rule=rule_text(site, "O-DM-ALLOW"))
    forbidden(site, "/methods/x", token, "svc-purger", method="PURGE", rule="no rule matched")


# ---------------------------------------------------------------- order

def test_deny_before_allow_refuses_the_matching_caller(site, keyring):
    blocked = tok(keyring, "svc-blocked-1")
    forbidden(site, "/order/deny-first/x", blocked, "svc-blocked-1", rule=rule_text(site, "O-DF-DENY"))
    allowed(site, "/order/deny-first/x", tok(keyring, "svc-fine-1"), rule=rule_text(site, "O-DF-ALLOW"))


def test_the_same_rules_in_the_other_order_allow_that_caller(site, keyring):
    blocked = tok(keyring, "svc-blocked-1")
    allowed(site, "/order/allow-first/x", blocked, rule=rule_text(site, "O-AF-ALLOW"))
    allowed(site, "/order/allow-first/x", tok(keyring, "svc-fine-1"), rule=rule_text(site, "O-AF-ALLOW"))


def test_a_deny_rule_with_methods_only_refuses_those_methods(site, keyring):
    token = tok(keyring, "svc-dm")
    forbidden(site, "/order/deny-method/x", token, "svc-dm", method="DELETE", rule=rule_text(site, "O-DM-DENY"))
    allowed(site, "/order/deny-method/x", token, method="GET", rule=rule_text(site, "O-DM-ALLOW"))
    allowed(site, "/order/deny-method/x", token, method="POST", rule=rule_text(site, "O-DM-ALLOW"))


# ---------------------------------------------------------------- no rules, anonymous

def test_without_rules_any_verified_caller_passes(site, keyring):
    for sub in ("svc-open-1", "anyone@else.example", "batch-x"):
        resp = allowed(site, "/open/x", tok(keyring, sub), rule="", caller=sub)
        assert resp.header("X-Auth-Status") == "verified"
    resp = send(site, "/open/x")
    assert resp.status == 401 and resp.header("X-Decision") == "unauthenticated", resp


def test_anonymous_pattern_lets_callers_without_a_token_in(site, keyring):
    resp = allowed(site, "/anon-ok/x", None, rule=rule_text(site, "A-OK"))
    assert resp.header("X-Auth-Status") == "missing"
    assert resp.upstream_header("X-Test-Caller") is None
    allowed(site, "/anon-ok/x", tok(keyring, "svc-named"), rule=rule_text(site, "A-OK"), caller="svc-named")
    forbidden(site, "/anon-ok/x", tok(keyring, "svc-unnamed"), "svc-unnamed", rule="no rule matched")


def test_any_does_not_match_an_anonymous_caller(site, keyring):
    resp = forbidden(site, "/anon-no/x", None, None, rule="no rule matched")
    assert resp.header("X-Auth-Status") == "missing"
    allowed(site, "/anon-no/x", tok(keyring, "svc-named"), rule=rule_text(site, "A-NO"))


def test_an_invalid_token_under_optional_is_still_401_not_anonymous(site, keyring):
    bad = jwks_token(keyring, claims(sub="svc-x", aud="aud-nobody"))
    before = site.echo.requests
    resp = send(site, "/anon-ok/x", bad)
    assert resp.status == 401 and resp.header("X-Auth-Status") == "wrong_audience", resp
    assert resp.header("X-Decision") == "unauthenticated", resp
    assert site.echo.requests == before


# ---------------------------------------------------------------- dry run

def test_policy_dry_run_lets_a_refused_caller_through_and_logs_it(site, keyring):
    mark = site.ngx.log_mark()
    resp = allowed(site, "/dry/x", tok(keyring, "svc-dry-other"), decision="would_deny", rule="no rule matched")
    assert resp.header("X-Auth-Status") == "verified"
    assert_logged_once(site, mark, "mesh:", "decision: would_deny", 'caller: "svc-dry-other"', "no rule matched")
    mark = site.ngx.log_mark()
    allowed(site, "/dry/x", tok(keyring, "svc-dry-ok"), decision="allow", rule=rule_text(site, "D-ALLOW"))
    time.sleep(0.1)
    assert not _info_lines(site.ngx.log_since(mark), "mesh:"), site.ngx.log_since(mark)


def test_policy_dry_run_reports_the_deny_rule_that_would_refuse(site, keyring):
    mark = site.ngx.log_mark()
    rule = rule_text(site, "DD-DENY")
    allowed(site, "/dry-deny/x", tok(keyring, "svc-dry-bad"), decision="would_deny", rule=rule)
    assert_logged_once(site, mark, "mesh:", "decision: would_deny", 'caller: "svc-dry-bad"', rule)
    allowed(site, "/dry-deny/x", tok(keyring, "svc-dry-good"), decision="allow", rule=rule_text(site, "DD-ALLOW"))


# ---------------------------------------------------------------- $mesh_roles, $mesh_rule

ROLE_CASES = [
    ("svc-writer", {}, "writers,auditors"),
    ("batch-nightly", {}, "writers"),
    ("svc-reader", {}, "readers"),
    ("svc-rep-1", {"team": "reporting"}, "readers"),
    ("svc-rep-2", {"team": "reporting", "groups": ["ops", "audit"]}, "readers,auditors"),
    ("svc-nobody", {}, ""),
]


@pytest.mark.parametrize("sub,extra,roles", ROLE_CASES, ids=[c[0] for c in ROLE_CASES])
def test_mesh_roles_lists_every_role_of_the_caller(site, keyring, sub, extra, roles):
    resp = allowed(site, "/open/x", tok(keyring, sub, **extra))
    assert resp.header("X-Roles") == f"[{roles}]", resp
    assert resp.upstream_header("X-Test-Roles") == f"[{roles}]", resp


def test_mesh_roles_is_empty_for_an_anonymous_caller(site):
    resp = allowed(site, "/anon-ok/x", None)
    assert resp.header("X-Roles") == "[]", resp


def test_mesh_rule_names_the_allow_rule_with_its_file_and_line(site, keyring):
    n = line_of(site.ngx.conf_text, "# V-ALLOW")
    expected = f"mesh_allow role:writers methods=GET ({site.ngx.conf_path}:{n})"
    resp = allowed(site, "/vars/x", tok(keyring, "svc-writer"), rule=expected)
    assert resp.header("X-Roles") == "[writers,auditors]"
    resp = allowed(site, "/vars/x", tok(keyring, "batch-vars"), rule=expected)
    assert resp.header("X-Roles") == "[writers]"


def test_mesh_rule_names_the_deny_rule_with_its_file_and_line(site, keyring):
    n = line_of(site.ngx.conf_text, "# V-DENY")
    expected = f"mesh_deny claim:team=payments ({site.ngx.conf_path}:{n})"
    resp = forbidden(site, "/vars/x", tok(keyring, "svc-pay-vars", team="payments"), "svc-pay-vars", rule=expected)
    assert resp.header("X-Roles") == "[]"
    # a writer using a method its rule does not list falls through to the deny rule only if it matches
    resp = forbidden(site, "/vars/x", tok(keyring, "svc-writer"), "svc-writer", method="POST", rule="no rule matched")
    assert resp.header("X-Roles") == "[writers,auditors]"


def test_mesh_rule_says_no_rule_matched_when_none_did(site, keyring):
    resp = forbidden(site, "/vars/x", tok(keyring, "svc-rep-3", team="reporting"), "svc-rep-3", rule="no rule matched")
    assert resp.header("X-Roles") == "[readers]"


def test_mesh_rule_names_an_included_file_and_its_line(site, keyring):
    expected = f"mesh_allow svc-included ({site.ngx.tmp}/rbac-included.conf:2)"
    allowed(site, "/included/x", tok(keyring, "svc-included"), rule=expected)
    forbidden(site, "/included/x", tok(keyring, "svc-not-included"), "svc-not-included", rule="no rule matched")


# ---------------------------------------------------------------- what a refusal looks like

def test_rules_protect_a_static_root_location(static_site, keyring):
    site = static_site
    resp = send(site, "/static/page.txt", tok(keyring, "svc-static"))
    assert resp.status == 200 and resp.body == b"static page\n", resp
    assert resp.header("X-Decision") == "allow"
    mark = site.ngx.log_mark()
    resp = send(site, "/static/page.txt", tok(keyring, "svc-not-static"))
    assert resp.status == 403 and b"static page" not in resp.body, resp
    assert resp.header("X-Decision") == "deny", resp
    assert_logged_once(site, mark, "mesh:", "decision: deny", 'caller: "svc-not-static"')


def test_error_page_replaces_the_403_body(site, keyring):
    before = site.echo.requests
    resp = send(site, "/errpage/x", tok(keyring, "svc-other-errpage"))
    assert resp.status == 403 and resp.body == b"custom denial page\n", resp
    assert site.echo.requests == before
    allowed(site, "/errpage/x", tok(keyring, "svc-errpage"))


def test_refusals_on_one_keepalive_connection_are_judged_separately(site, keyring):
    conn = Connection(site.port)
    try:
        before = site.echo.requests
        r1 = conn.request("/p/exact/x", bearer(tok(keyring, "svc-exact-1")))
        assert r1.status == 200 and r1.header("X-Decision") == "allow", r1
        r2 = conn.request("/p/exact/x", bearer(tok(keyring, "svc-exact-2")))
        assert r2.status == 403 and r2.header("X-Decision") == "deny", r2
        r3 = conn.request("/p/exact/x", bearer(tok(keyring, "svc-exact-1")))
        assert r3.status == 200 and r3.header("X-Decision") == "allow", r3
        assert site.echo.requests == before + 2
    finally:
        conn.close()


# ---------------------------------------------------------------- inheritance between levels

INHERIT_HTTP = PROVIDER + """
mesh_role writers svc-writer;
mesh_allow role:writers svc-http-level;  # H-RULE
server {
    listen 127.0.0.1:@PORT@;
    server_name localhost;
    mesh_auth jwks;
""" + OBSERVE + """
    mesh_role readers svc-reader;
    mesh_allow role:readers;  # S-RULE
    location /inherit/ {
        proxy_pass http://@UPSTREAM@;
    }
    location /own/ {
        mesh_allow role:writers svc-own;  # L-RULE
        proxy_pass http://@UPSTREAM@;
    }
    location /parent/ {
        mesh_allow svc-parent;  # PARENT-RULE
        location /parent/child/ {
            proxy_pass http://@UPSTREAM@;
        }
    }
}
server {
    listen 127.0.0.1:@PORT@;
    server_name http-rules.test;
    mesh_auth jwks;
""" + OBSERVE + """
    location /inherit/ {
        proxy_pass http://@UPSTREAM@;
    }
}
"""


@pytest.fixture(scope="module")
def inherit_site(module_path, launcher):
    return launcher.start(INHERIT_HTTP)


def get_host(site, host: str, path: str, token: str) -> Response:
    return request(site.port, path, bearer(token), host=host)


def test_a_location_without_rules_uses_the_server_rules(inherit_site, keyring):
    site = inherit_site
    resp = allowed(site, "/inherit/x", tok(keyring, "svc-reader"), rule=rule_text(site, "S-RULE"))
    assert resp.header("X-Roles") == "[readers]"
    # the http-level rules are replaced by the server's
    forbidden(site, "/inherit/x", tok(keyring, "svc-http-level"), "svc-http-level", rule="no rule matched")


def test_a_location_with_its_own_rules_replaces_the_server_rules(inherit_site, keyring):
    site = inherit_site
    allowed(site, "/own/x", tok(keyring, "svc-own"), rule=rule_text(site, "L-RULE"))
    forbidden(site, "/own/x", tok(keyring, "svc-reader"), "svc-reader", rule="no rule matched")


def test_server_mesh_role_replaces_the_http_roles(inherit_site, keyring):
    site = inherit_site
    # svc-writer is a writer at http level only: this server binds its own roles
    resp = forbidden(site, "/own/x", tok(keyring, "svc-writer"), "svc-writer", rule="no rule matched")
    assert resp.header("X-Roles") == "[]", resp


def test_a_nested_location_inherits_its_parent_rules(inherit_site, keyring):
    site = inherit_site
    allowed(site, "/parent/child/x", tok(keyring, "svc-parent"), rule=rule_text(site, "PARENT-RULE"))
    forbidden(site, "/parent/child/x", tok(keyring, "svc-reader"), "svc-reader", rule="no rule matched")


def test_a_server_without_rules_or_roles_uses_the_http_ones(inherit_site, keyring):
    site = inherit_site
    h_rule = rule_text(site, "H-RULE")
    for sub, roles in (("svc-writer", "writers"), ("svc-http-level", "")):
        before = site.echo.requests
        resp = get_host(site, "http-rules.test", "/inherit/x", tok(keyring, sub))
        assert resp.status == 200, resp
        assert resp.header("X-Rule") == f"[{h_rule}]", resp
        assert resp.header("X-Roles") == f"[{roles}]", resp
        assert site.echo.requests == before + 1
    before = site.echo.requests
    resp = get_host(site, "http-rules.test", "/inherit/x", tok(keyring, "svc-reader"))
    assert resp.status == 403 and resp.header("X-Rule") == "[no rule matched]", resp
    assert site.echo.requests == before


# ---------------------------------------------------------------- bad configurations

def _loc(inner: str) -> str:
    return (PROVIDER + "server {\n    listen 127.0.0.1:@PORT@;\n    mesh_auth jwks;\n"
            "    location / {\n" + inner + "\n        proxy_pass http://127.0.0.1:9;\n    }\n}\n")


BAD_CONFIGS = [
    ("regex-unclosed-group", _loc("        mesh_allow ~(;  # BAD"), ["~("]),
    ("caseless-regex-unclosed", _loc("        mesh_deny ~*[a-;  # BAD"), ["~*[a-"]),
    ("regex-empty", _loc("        mesh_allow ~;  # BAD"), ["~"]),
    ("role-without-name", _loc("        mesh_allow role:;  # BAD"), ["role:"]),
    ("claim-without-equals", _loc("        mesh_allow claim:x;  # BAD"), ["claim:x"]),
    ("claim-without-path", _loc("        mesh_deny claim:=x;  # BAD"), ["claim:=x"]),
    ("methods-empty", _loc("        mesh_allow any methods=;  # BAD"), ["methods="]),
    ("methods-lowercase", _loc("        mesh_allow any methods=get;  # BAD"), ["get"]),
    ("methods-trailing-comma", _loc("        mesh_allow any methods=GET,;  # BAD"), ["methods=GET,"]),
    ("methods-without-pattern", _loc("        mesh_allow methods=GET;  # BAD"), ["pattern"]),
    ("unknown-parameter-method-typo", _loc("        mesh_allow any method=GET;  # BAD"), ["method=GET"]),
    ("unknown-parameter-in-deny", _loc("        mesh_deny any methods=POST limit=5;  # BAD"), ["limit=5"]),
    ("mesh_role-in-location", _loc("        mesh_role writers svc-writer;  # BAD"), ["mesh_role"]),
    ("mesh_role-without-pattern", PROVIDER + "mesh_role writers;  # BAD\n", ["mesh_role"]),
    ("mesh_role-nesting-a-role", PROVIDER + "mesh_role writers role:readers;  # BAD\n", ["role:readers"]),
    ("mesh_role-anonymous", PROVIDER + "mesh_role guests anonymous;  # BAD\n", ["anonymous"]),
    ("mesh_role-bad-regex", PROVIDER + "mesh_role writers ~(;  # BAD\n", ["~("]),
    ("policy-dry-run-not-a-flag", _loc("        mesh_policy_dry_run maybe;  # BAD"), ["maybe"]),
]


@pytest.mark.parametrize("body,words", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_rbac_config_fails_nginx_t_at_its_line(module_path, conf_dir, keyring, body, words):
    conf_text = render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)
    emerg_at_marked_line(conf_text, conf_dir, words=words)


def test_the_rbac_test_configurations_pass_nginx_t(module_path, conf_dir, keyring):
    for body in (RBAC_HTTP, INHERIT_HTTP):
        (conf_dir / "rbac-included.conf").write_bytes(INCLUDED_RULES)
        conf_text = render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)
        passes_nginx_t(conf_text, conf_dir)
