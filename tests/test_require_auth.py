"""mesh_require_auth: `nginx -t` fails on every location that serves requests without a
`mesh_auth` nobody opened on purpose, one [emerg] at each one's own line, and otherwise prints
a one-line summary at `notice`; the configurations it accepts protect what it says they do."""

from __future__ import annotations

import re

import pytest

from mesh_test.client import bearer
from mesh_test.configs import claims
from mesh_test.nginx import (
    emerg_at_marked_line,
    emergs_at_marked_lines,
    nginx_built_with,
    nginx_t,
    passes_nginx_t,
    render,
)
from mesh_test.tokens import jwks_token

PROVIDERS = """
mesh_provider jwks {
    issuer   https://jwks.mesh.test;
    keys     @KEYS@/jwks.json;
    audience aud-orders-7f3;
}
mesh_provider ci {
    issuer   https://ci.mesh.test;
    keys     @KEYS@/jwks.json;
}
"""

SUMMARY = re.compile(
    r"\[notice\].*mesh_require_auth: (?P<total>\d+) locations?: (?P<protected>\d+) protected"
    r"(?: \((?P<optional>\d+) optional\))?, (?P<open>\d+) explicitly open"
    r"(?: \((?P<by_server>\d+) by (?:its|their) server\))?(?: \((?P<by_satisfy>\d+) by satisfy any\))?, "
    r"(?P<exempt>\d+) exempt \(return-only\); "
    r"providers: (?P<providers>.*)$"
)


def conf(body: str, tmp, keyring) -> str:
    return render(PROVIDERS + body, tmp, port=8, upstream="127.0.0.1:9", keys=keyring.dir)


def passes(body: str, tmp, keyring) -> str:
    """nginx -t accepts the config without [emerg] or [warn]; returns its output and what it
    wrote to its default error log: notices go to stderr only where nginx was built with
    `--error-log-path=stderr` (Debian's), to logs/error.log under the prefix elsewhere (1.28 here)."""
    default_log = tmp / "logs" / "error.log"
    default_log.unlink(missing_ok=True)
    out = passes_nginx_t(conf(body, tmp, keyring), tmp)
    if default_log.exists():
        out += default_log.read_text(errors="replace")
    return out


def summary(out: str) -> dict:
    found = [m for m in (SUMMARY.search(l) for l in out.splitlines()) if m]
    assert len(found) == 1, f"expected one mesh_require_auth summary at notice:\n{out}"
    m = found[0]
    counts = {k: int(v or 0) for k, v in m.groupdict().items() if k != "providers"}
    counts["providers"] = m["providers"]
    return counts


# ---- what fails, and where

def test_an_unprotected_proxy_pass_location_fails_at_its_own_line(module_path, conf_dir, keyring):
    body = """
mesh_require_auth on;
server {
    listen 127.0.0.1:@PORT@;
    location / { mesh_auth jwks; proxy_pass http://@UPSTREAM@; }
    location /api/ {  # BAD
        proxy_pass http://@UPSTREAM@;
    }
}
"""
    emerg = emerg_at_marked_line(conf(body, conf_dir, keyring), conf_dir)
    assert 'location "/api/"' in emerg, emerg
    assert '"mesh_auth PROVIDER ...;"' in emerg and '"mesh_auth off;"' in emerg, emerg


def content_locations() -> list[str]:
    """One location per way of serving content; each must be protected or opened."""
    locs = [
        "location /proxy/     { proxy_pass http://@UPSTREAM@; }",
        "location /static/    { root @TMP@; }",
        "location /alias/     { alias @TMP@/; }",
        "location /fastcgi/   { fastcgi_pass 127.0.0.1:9; }",
        "location /uwsgi/     { uwsgi_pass 127.0.0.1:9; }",
        "location /scgi/      { scgi_pass 127.0.0.1:9; }",
        "location /memcached/ { set $memcached_key $uri; memcached_pass 127.0.0.1:9; }",
        "location /grpc/      { grpc_pass grpc://127.0.0.1:9; }",
        "location ~ ^/regex/  { proxy_pass http://@UPSTREAM@; }",
        "location = /exact    { proxy_pass http://@UPSTREAM@; }",
        "location /tries/     { try_files $uri =404; }",
        "location /ends-in-return/ { set $x 1; return 200 $x; }",
        "location /if-first/  { if ($arg_a) { return 403; } return 200; }",
        "location /rewrite-first/ { rewrite ^/rewrite-first/(.*)$ /static/$1 break; return 403; }",
    ]
    if nginx_built_with("--with-http_stub_status_module"):
        locs.append("location /stub/ { stub_status; }")
    return locs


def test_every_kind_of_unprotected_location_fails_each_at_its_line(module_path, conf_dir, keyring):
    body = (
        "mesh_require_auth on;\nserver {\n    listen 127.0.0.1:@PORT@;\n"
        "    location / { mesh_auth jwks; proxy_pass http://@UPSTREAM@; }\n"
        + "".join(f"    {loc}  # BAD\n" for loc in content_locations())
        + "}\n"
    )
    emergs = emergs_at_marked_lines(conf(body, conf_dir, keyring), conf_dir)
    for loc, emerg in zip(content_locations(), emergs):
        name = loc.split("{")[0].removeprefix("location").strip()
        assert f'location "{name}"' in emerg, (loc, emerg)


def test_the_same_locations_pass_once_protected_or_opened(module_path, conf_dir, keyring):
    protected = "".join(
        f"    {loc.replace('{ ', '{ mesh_auth jwks; ', 1)}\n" for loc in content_locations()
    )
    body = f"""
mesh_require_auth on;
server {{
    listen 127.0.0.1:@PORT@;
    location / {{ mesh_auth off; proxy_pass http://@UPSTREAM@; }}
{protected}}}
"""
    s = summary(passes(body, conf_dir, keyring))
    n = len(content_locations())
    assert (s["total"], s["protected"], s["open"], s["exempt"]) == (n + 1, n, 1, 0), s
    assert s["providers"] == f"jwks {n}", s


def test_off_by_default_checks_nothing_and_prints_nothing(module_path, conf_dir, keyring):
    body = """
server {
    listen 127.0.0.1:@PORT@;
    location /api/ { proxy_pass http://@UPSTREAM@; }
}
"""
    out = passes(body, conf_dir, keyring)
    assert "mesh_require_auth" not in out, out
    out = passes("mesh_require_auth off;\n" + body, conf_dir, keyring)
    assert "mesh_require_auth" not in out, out


# ---- explicit mesh_auth off, and inheritance

def test_an_explicit_mesh_auth_off_in_the_location_passes(module_path, conf_dir, keyring):
    body = """
mesh_require_auth on;
server {
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    location /api/    { proxy_pass http://@UPSTREAM@; }
    location /public/ { mesh_auth off; proxy_pass http://@UPSTREAM@; }
}
"""
    s = summary(passes(body, conf_dir, keyring))
    # the server's own configuration (no location /) is protected too
    assert (s["total"], s["protected"], s["open"], s["by_server"], s["exempt"]) == (3, 2, 1, 0, 0), s
    assert s["providers"] == "jwks 2", s


def test_mesh_auth_of_the_http_or_server_block_protects_its_locations(module_path, conf_dir, keyring):
    for where in ("http", "server"):
        http_line = "mesh_auth jwks ci;" if where == "http" else ""
        server_line = "mesh_auth jwks ci;" if where == "server" else ""
        body = f"""
mesh_require_auth on;
{http_line}
server {{
    listen 127.0.0.1:@PORT@;
    {server_line}
    location / {{ proxy_pass http://@UPSTREAM@; }}
    location /orders/ {{ proxy_pass http://@UPSTREAM@; }}
}}
"""
        s = summary(passes(body, conf_dir, keyring))
        assert (s["total"], s["protected"], s["open"], s["exempt"]) == (2, 2, 0, 0), (where, s)
        assert s["providers"] == "ci 2, jwks 2", (where, s)


def test_mesh_auth_off_of_the_server_opens_its_locations_explicitly(module_path, conf_dir, keyring):
    body = """
mesh_require_auth on;
server {
    listen 127.0.0.1:@PORT@;
    mesh_auth off;
    location /health-details/ { proxy_pass http://@UPSTREAM@; }
    location /orders/ { mesh_auth jwks; proxy_pass http://@UPSTREAM@; }
}
"""
    s = summary(passes(body, conf_dir, keyring))
    # the server's own configuration and /health-details/ are open by the server's line
    assert (s["total"], s["protected"], s["open"], s["by_server"]) == (3, 1, 2, 2), s


def test_mesh_auth_off_at_the_http_level_opens_nothing(module_path, conf_dir, keyring):
    body = """
mesh_require_auth on;
mesh_auth off;
server {
    listen 127.0.0.1:@PORT@;
    location / {  # BAD
        proxy_pass http://@UPSTREAM@;
    }
}
"""
    emerg = emerg_at_marked_line(conf(body, conf_dir, keyring), conf_dir)
    assert "at the http level opens nothing" in emerg, emerg


def test_the_server_decides_for_itself(module_path, conf_dir, keyring):
    # on at http, off in one server: only the other server is checked
    body = """
mesh_require_auth on;
server {
    listen 127.0.0.1:@PORT@;
    mesh_require_auth off;
    location / { proxy_pass http://@UPSTREAM@; }
}
server {
    listen 127.0.0.1:@PORT@;
    server_name checked.test;
    location / {  # BAD
        proxy_pass http://@UPSTREAM@;
    }
}
"""
    emerg_at_marked_line(conf(body, conf_dir, keyring), conf_dir)
    # off at http (the default), on in one server
    body = """
server {
    listen 127.0.0.1:@PORT@;
    location / { proxy_pass http://@UPSTREAM@; }
}
server {
    listen 127.0.0.1:@PORT@;
    server_name checked.test;
    mesh_require_auth on;
    location / {  # BAD
        proxy_pass http://@UPSTREAM@;
    }
}
"""
    emerg_at_marked_line(conf(body, conf_dir, keyring), conf_dir)


def test_a_server_without_location_slash_is_checked_at_its_server_line(module_path, conf_dir, keyring):
    body = """
mesh_require_auth on;
server {  # BAD
    listen 127.0.0.1:@PORT@;
    location = / { mesh_auth jwks; proxy_pass http://@UPSTREAM@; }
    location /api/ { mesh_auth jwks; proxy_pass http://@UPSTREAM@; }
}
"""
    emerg = emerg_at_marked_line(conf(body, conf_dir, keyring), conf_dir)
    assert "match none of its locations" in emerg and '"location /"' in emerg, emerg
    # a location / (or ^~ /) catches every request: the server's own configuration is unused
    for catch_all in ("location /", "location ^~ /"):
        s = summary(passes(body.replace("  # BAD", "").replace(
            "location = /", catch_all), conf_dir, keyring))
        assert (s["total"], s["protected"]) == (2, 2), (catch_all, s)


def test_a_location_in_an_included_file_is_named_by_that_file_and_line(module_path, conf_dir, keyring):
    snippet = conf_dir / "server.d" / "extra.conf"
    snippet.parent.mkdir()
    snippet.write_text("# added later\nlocation /extra/ { proxy_pass http://@UPSTREAM@; }\n".replace(
        "@UPSTREAM@", "127.0.0.1:9"))
    body = f"""
mesh_require_auth on;
server {{
    listen 127.0.0.1:@PORT@;
    location / {{ mesh_auth jwks; proxy_pass http://@UPSTREAM@; }}
    include {snippet};
}}
"""
    rc, out, _ = nginx_t(conf(body, conf_dir, keyring), conf_dir)
    assert rc != 0, out
    emergs = [l for l in out.splitlines() if "[emerg]" in l]
    assert len(emergs) == 1 and re.search(rf'location "/extra/".* in {re.escape(str(snippet))}:2$', emergs[0]), out


# ---- nested, named, return-only, internal

def test_nested_locations(module_path, conf_dir, keyring):
    body = """
mesh_require_auth on;
server {
    listen 127.0.0.1:@PORT@;
    location / { mesh_auth jwks; proxy_pass http://@UPSTREAM@; }
    location /guarded/ {
        mesh_auth ci;
        location /guarded/inner/ { proxy_pass http://@UPSTREAM@; }
    }
    location /opened/ {
        mesh_auth off;
        location /opened/inner/ { proxy_pass http://@UPSTREAM@; }
    }
}
"""
    s = summary(passes(body, conf_dir, keyring))
    assert (s["total"], s["protected"], s["open"], s["by_server"]) == (5, 3, 2, 0), s
    assert s["providers"] == "ci 2, jwks 1", s

    body = """
mesh_require_auth on;
server {
    listen 127.0.0.1:@PORT@;
    location / { mesh_auth jwks; proxy_pass http://@UPSTREAM@; }
    location /outer/ {  # BAD
        location /outer/guarded/ { mesh_auth jwks; proxy_pass http://@UPSTREAM@; }
        location /outer/bare/ {  # BAD
            proxy_pass http://@UPSTREAM@;
        }
    }
}
"""
    emergs = emergs_at_marked_lines(conf(body, conf_dir, keyring), conf_dir)
    assert 'location "/outer/"' in emergs[0] and 'location "/outer/bare/"' in emergs[1], emergs


def test_named_and_internal_locations_are_judged_on_their_own_settings(module_path, conf_dir, keyring):
    # nginx hands requests to them (try_files, error_page, rewrite ... last, X-Accel-Redirect)
    # and runs their own access settings: `internal` or `@` exempts nothing
    body = """
mesh_require_auth on;
server {
    listen 127.0.0.1:@PORT@;
    location / { mesh_auth jwks; try_files /nonexistent @app; }
    location @app { proxy_pass http://@UPSTREAM@; }  # BAD
    location @opened { mesh_auth off; proxy_pass http://@UPSTREAM@; }
    location /errors/ { internal; root @TMP@; }  # BAD
    location = /healthz { return 200 "ok\\n"; }
    location = /redirect { mesh_auth jwks; return 301 /; }
}
"""
    emergs = emergs_at_marked_lines(conf(body, conf_dir, keyring), conf_dir)
    assert 'location "@app"' in emergs[0] and 'location "/errors/"' in emergs[1], emergs
    fixed = body.replace("location @app {", "location @app { mesh_auth jwks;").replace(
        "location /errors/ { internal;", "location /errors/ { internal; mesh_auth off;").replace("  # BAD", "")
    s = summary(passes(fixed, conf_dir, keyring))
    # /redirect: its mesh_auth never runs (return answers first), so it is not "protected"
    assert (s["total"], s["protected"], s["open"], s["exempt"]) == (6, 2, 2, 2), s
    assert s["providers"] == "jwks 2", s


def test_a_server_that_only_returns_is_exempt_with_its_locations(module_path, conf_dir, keyring):
    body = """
mesh_require_auth on;
server {
    listen 127.0.0.1:@PORT@;
    return 301 https://$host$request_uri;
    location /never/ { proxy_pass http://@UPSTREAM@; }
}
"""
    s = summary(passes(body, conf_dir, keyring))
    assert (s["total"], s["exempt"]) == (2, 2), s


def test_the_summary_counts_optional_and_each_provider(module_path, conf_dir, keyring):
    body = """
mesh_require_auth on;
server {
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks ci;
    location / { proxy_pass http://@UPSTREAM@; }
    location /ci/ { mesh_auth ci; proxy_pass http://@UPSTREAM@; }
    location /maybe/ { mesh_auth optional jwks; proxy_pass http://@UPSTREAM@; }
    location /public/ { mesh_auth off; proxy_pass http://@UPSTREAM@; }
    location = /healthz { return 200; }
}
server {
    listen 127.0.0.1:@PORT@;
    server_name other.test;
    mesh_auth off;
    location / { proxy_pass http://@UPSTREAM@; }
}
"""
    s = summary(passes(body, conf_dir, keyring))
    assert s == {"total": 6, "protected": 3, "optional": 1, "open": 2, "by_server": 1, "by_satisfy": 0,
                 "exempt": 1, "providers": "ci 2, jwks 2"}, s


def test_bad_mesh_require_auth_lines(module_path, conf_dir, keyring):
    cases = [
        ("mesh_require_auth maybe;  # BAD\n", "maybe"),
        ("mesh_require_auth on;\nmesh_require_auth on;  # BAD\n", "duplicate"),
        ("server {\n    listen 127.0.0.1:@PORT@;\n    mesh_auth off;\n"
         "    location / {\n        mesh_require_auth on;  # BAD\n    }\n}\n", "not allowed"),
    ]
    for body, word in cases:
        emerg = emerg_at_marked_line(conf(body, conf_dir, keyring), conf_dir)
        assert word in emerg and "mesh_require_auth" in emerg, emerg


# ---- the accepted configuration does what the summary says, on real requests

LIVE = """
mesh_require_auth on;
server {
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    location /orders/ {
        if ($arg_via_if) { proxy_pass http://@UPSTREAM@; }
        limit_except GET POST { deny all; }
        proxy_pass http://@UPSTREAM@;
    }
    location /nested/ {
        location /nested/inner/ { proxy_pass http://@UPSTREAM@; }
    }
    location /fallback/ { try_files /nonexistent @app; }
    location @app { proxy_pass http://@UPSTREAM@; }
    location /public/ { mesh_auth off; proxy_pass http://@UPSTREAM@; }
    location = /healthz { return 200 "ok\\n"; }
}
"""


def test_the_accepted_configuration_protects_what_it_says(launcher_fn, module_path, keyring):
    site = launcher_fn.start(PROVIDERS + LIVE)
    token = jwks_token(keyring, claims())
    for path in ("/orders/1", "/orders/1?via_if=1", "/nested/inner/x", "/fallback/x", "/nope"):
        site.refused(path, None, "missing", token=token)
    for path in ("/orders/1", "/orders/1?via_if=1", "/nested/inner/x", "/fallback/x"):
        site.allowed(path, bearer(token))
    assert site.allowed("/public/x", None, auth_status="off").status == 200
    resp = site.get("/healthz")
    assert resp.status == 200 and resp.body == b"ok\n", resp


# ---- what a request can be handed to is judged on its own (the review's walk-arounds)

@pytest.mark.parametrize("entry,target", [
    ('location /a { return 404; error_page 404 = @backend; }', "location @backend { proxy_pass http://@UPSTREAM@; }"),
    ('location /b { return 418; error_page 418 /private/; }',
     "location /private/ { internal; proxy_pass http://@UPSTREAM@; }"),
    ('location /c { mesh_auth jwks; try_files /nonexistent @files; }', "location @files { proxy_pass http://@UPSTREAM@; }"),
    ('location /d { mesh_auth jwks; rewrite ^ /inner/ last; }',
     "location /inner/ { internal; proxy_pass http://@UPSTREAM@; }"),
    ('location /e { mesh_auth jwks; proxy_pass http://@UPSTREAM@; }',
     "location /accel/ { internal; root @TMP@; }"),  # X-Accel-Redirect: /accel/...
], ids=["error_page-named", "error_page-internal", "try_files", "rewrite-last", "x-accel-redirect"])
def test_a_location_nginx_hands_requests_to_is_judged_on_its_own(module_path, conf_dir, keyring, entry, target):
    body = f"""
mesh_require_auth on;
server {{
    listen 127.0.0.1:@PORT@;
    mesh_auth off;
    {entry}
}}
server {{
    listen 127.0.0.1:@PORT@;
    server_name second.test;
    location / {{ mesh_auth jwks; proxy_pass http://@UPSTREAM@; }}
    {entry}
    {target}  # BAD
}}
"""
    line = emerg_at_marked_line(conf(body, conf_dir, keyring), conf_dir)
    assert "serves requests without mesh_auth" in line, line
    protected = body.replace(target, target.replace("{ ", "{ mesh_auth jwks; ", 1))
    s = summary(passes(protected.replace("  # BAD", ""), conf_dir, keyring))
    assert s["protected"] >= 2, s


def test_a_server_that_returns_and_hands_to_a_named_location_is_judged_by_it(module_path, conf_dir, keyring):
    body = """
mesh_require_auth on;
server {
    listen 127.0.0.1:@PORT@;
    return 404;
    error_page 404 = @app;
    location @app { proxy_pass http://@UPSTREAM@; }  # BAD
}
"""
    emerg_at_marked_line(conf(body, conf_dir, keyring), conf_dir)


SATISFY_CASES = [
    ("allow all;", "allow"),
    ("allow 10.0.0.0/8; deny all;", "allow"),
    ('auth_basic "staff"; auth_basic_user_file @TMP@/htpasswd;', "auth_basic"),
    ("auth_request /auth;", "auth_request"),
]


@pytest.mark.parametrize("access,module", SATISFY_CASES, ids=["allow-all", "allow-range", "auth_basic", "auth_request"])
def test_satisfy_any_beside_another_access_module_is_reported_open_with_its_reason(
        module_path, conf_dir, keyring, access, module):
    (conf_dir / "htpasswd").write_text("u:{PLAIN}p\n")
    body = f"""
mesh_require_auth on;
server {{
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    location /p/ {{ satisfy any; {access} proxy_pass http://@UPSTREAM@; }}
    location /all/ {{ satisfy all; {access} proxy_pass http://@UPSTREAM@; }}
    location /any-deny/ {{ satisfy any; deny all; proxy_pass http://@UPSTREAM@; }}
    location = /auth {{ internal; mesh_auth off; return 204; }}
}}
"""
    out = passes(body, conf_dir, keyring)
    s = summary(out)
    # /p/ open by satisfy any; /all/ and /any-deny/ protected; /auth exempt (return-only),
    # and the server's own root protected
    assert (s["protected"], s["open"], s["by_satisfy"], s["exempt"]) == (3, 1, 1, 1), s
    reason = [l for l in out.splitlines() if '[notice]' in l and 'location "/p/"' in l]
    assert len(reason) == 1 and f"satisfy any: {module} admits requests without a token" in reason[0], out
    assert re.search(r"nginx\.conf:\d+", reason[0]), reason


def test_satisfy_any_with_allow_all_really_admits_without_a_token(launcher_fn, module_path, keyring):
    # what the audit reports open is open: the request with no token reaches the upstream
    site = launcher_fn.start(PROVIDERS + """
mesh_require_auth on;
server {
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    location /p/ { satisfy any; allow all; proxy_pass http://@UPSTREAM@; }
}
""")
    assert site.get("/p/x").status == 200
