"""nginx-conf/cloud-logging.conf: one JSON object per request, in the shape Cloud Logging reads,
whose trace fields match what the upstream (or the client, via traceresponse) got."""

from __future__ import annotations

import json
import re
import time

import pytest

from mesh_test.client import bearer, request
from mesh_test.configs import JWKS_PROVIDER, claims
from mesh_test.nginx import REPO, line_of
from mesh_test.tokens import jwks_token, now

PROJECT = "e2e-log-proj"
VERSION = "2026-11-26.log"
T = "4bf92f3577b34da6a3ce929d0e0e4736"
P = "00f067aa0ba902b7"
TP_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")

LOG_HTTP = f"""
include {REPO}/nginx-conf/cloud-logging.conf;
{JWKS_PROVIDER}
mesh_config_version "{VERSION}";
mesh_trace_project {PROJECT};
server {{
    listen unix:@TMP@/fail.sock;
    access_log off;
    location / {{ return 500; }}
}}
server {{
    listen 127.0.0.1:@PORT@;
    access_log @TMP@/cloud.log mesh_cloud_logging;
    mesh_trace on;
    mesh_trace_response on;
    mesh_auth jwks;

    location /api/ {{
        mesh_allow svc-log-*;  # RULE-ALLOW
        mesh_deny svc-banned;  # RULE-DENY
        proxy_pass http://@UPSTREAM@;
    }}
    location /deny-first/ {{
        mesh_deny svc-log-blocked;  # RULE-BLOCK-FIRST
        mesh_allow any;  # RULE-ANY
        proxy_pass http://@UPSTREAM@;
    }}
    location /optional/ {{ mesh_auth optional jwks; proxy_pass http://@UPSTREAM@; }}
    location /open/     {{ mesh_auth off; proxy_pass http://@UPSTREAM@; }}
    location /missing/  {{ root @TMP@/no-such-dir; }}
    location /open-missing/ {{ mesh_auth off; root @TMP@/no-such-dir; }}
    location /broken/   {{ mesh_auth off; proxy_pass http://127.0.0.1:1; }}
    location /fails/    {{ proxy_pass http://unix:@TMP@/fail.sock:; }}
    location /sample0/  {{ mesh_auth off; mesh_trace_sample 0; proxy_pass http://@UPSTREAM@; }}
    location /untraced/ {{ mesh_auth off; mesh_trace off; proxy_pass http://@UPSTREAM@; }}
}}
"""


@pytest.fixture(scope="module")
def site(module_path, launcher):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
        return launcher.start(LOG_HTTP)


def rule_text(site, marker: str) -> str:
    """$mesh_rule for the rule on the config line carrying `# marker`: as written, with file:line."""
    conf = site.ngx.conf_text
    n = line_of(conf, f"# {marker}")
    written = conf.splitlines()[n - 1].split("#", 1)[0].strip().rstrip(";").strip()
    return f"{' '.join(written.split())} ({site.ngx.conf_path}:{n})"


def severity(status: int) -> str:
    return "ERROR" if status >= 500 else "WARNING" if status >= 400 else "INFO"


def check_line(entry: dict, exp: dict) -> None:
    """One access-log object against what the request should have logged."""
    status = exp["status"]
    assert entry["severity"] == severity(status), entry
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", entry["time"]), entry["time"]
    hr = entry["httpRequest"]
    assert hr["requestMethod"] == exp.get("method", "GET"), hr
    assert hr["requestUrl"] == exp["url"], hr
    assert type(hr["status"]) is int and hr["status"] == status, hr
    assert isinstance(hr["responseSize"], str) and re.fullmatch(r"\d+", hr["responseSize"]), hr
    assert hr["userAgent"] == exp.get("ua", ""), hr
    assert hr["remoteIp"] == "127.0.0.1", hr
    assert isinstance(hr["latency"], str) and re.fullmatch(r"\d+\.\d{3}s", hr["latency"]), hr
    assert hr["protocol"] == "HTTP/1.1", hr
    if exp["trace"]:
        assert entry["logging.googleapis.com/trace"] == f"projects/{PROJECT}/traces/{exp['trace']}", entry
        assert entry["logging.googleapis.com/spanId"] == exp["span"], entry
    else:
        assert entry["logging.googleapis.com/trace"] == "" and entry["logging.googleapis.com/spanId"] == "", entry
    assert entry["logging.googleapis.com/trace_sampled"] is exp["sampled"], entry
    for field in ("caller", "provider", "authStatus", "decision", "rule"):
        assert entry[field] == exp[field], f"{field}: expected {exp[field]!r}, got {entry[field]!r} in {entry}"
    assert entry["configVersion"] == VERSION, entry


def trace_of(resp, upstream: bool) -> tuple[str, str, bool]:
    """(trace, span, sampled) this hop used: from the upstream's traceparent, else traceresponse."""
    if upstream:
        tps = resp.upstream_headers("traceparent")
        assert len(tps) == 1, resp
        value = tps[0]
    else:
        value = resp.header("traceresponse")
    m = TP_RE.fullmatch(value or "")
    assert m, f"no usable trace context on {resp!r}"
    if upstream:
        assert resp.header("traceresponse") == value, "traceresponse and the upstream's traceparent differ"
    return m.group(1), m.group(2), m.group(3) == "01"


def read_entries(site, urls: list[str]) -> dict[str, dict]:
    def done(text: str) -> bool:
        return all(f'"requestUrl":"{json.dumps(u)[1:-1]}"' in text for u in urls)

    text = site.ngx.wait_log(0, done, name="cloud.log", timeout=5)
    entries: dict[str, list] = {}
    for n, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise AssertionError(f"cloud.log line {n} is not JSON ({e}):\n{line}") from None
        assert isinstance(entry, dict), line
        entries.setdefault(entry["httpRequest"]["requestUrl"], []).append(entry)
    out = {}
    for u in urls:
        found = entries.get(u, [])
        assert len(found) == 1, f"expected one cloud.log entry for {u}, got {len(found)}"
        out[u] = found[0]
    return out


def test_every_line_is_json_and_matches_its_request(site, keyring, echo):
    n = time.time_ns()
    ok_token = jwks_token(keyring, claims(sub="svc-log-reader"))
    quoted_token = jwks_token(keyring, claims(sub='svc-log-"quoted"\\back'))
    banned = jwks_token(keyring, claims(sub="svc-banned"))
    stranger = jwks_token(keyring, claims(sub="svc-stranger"))
    blocked = jwks_token(keyring, claims(sub="svc-log-blocked"))
    expired = jwks_token(keyring, claims(sub="svc-log-late", exp=now() - 600, iat=now() - 900))
    allow, deny = rule_text(site, "RULE-ALLOW"), rule_text(site, "RULE-DENY")
    deny_first, any_rule = rule_text(site, "RULE-BLOCK-FIRST"), rule_text(site, "RULE-ANY")
    verified = dict(provider="jwks", authStatus="verified")
    anonymous = dict(caller="", provider="", rule="")

    # (url, extra headers, upstream reached?, expected fields apart from the trace ones)
    cases = [
        (f"/api/ok-{n}", bearer(ok_token), True,
         dict(status=200, caller="svc-log-reader", decision="allow", rule=allow, **verified)),
        (f"/api/quoted-{n}?q=%22x%22&u=caf%C3%A9", bearer(quoted_token) + [("User-Agent", 'agent "007" \\ \x01\t end')],
         True, dict(status=200, caller='svc-log-"quoted"\\back', decision="allow", rule=allow,
                    ua='agent "007" \\ \x01\t end', **verified)),
        (f"/api/post-{n}", bearer(ok_token), True,
         dict(status=200, caller="svc-log-reader", decision="allow", rule=allow, method="POST", **verified)),
        (f"/api/traced-{n}", bearer(ok_token) + [("traceparent", f"00-{T}-{P}-00")], True,
         dict(status=200, caller="svc-log-reader", decision="allow", rule=allow, **verified)),
        (f"/api/cloud-traced-{n}", bearer(ok_token) + [("X-Cloud-Trace-Context", f"{T}/42;o=1")], True,
         dict(status=200, caller="svc-log-reader", decision="allow", rule=allow, **verified)),
        (f"/api/no-token-{n}", [], False,
         dict(status=401, authStatus="missing", decision="unauthenticated", **anonymous)),
        (f"/api/expired-{n}", bearer(expired), False,
         dict(status=401, authStatus="expired", decision="unauthenticated", **anonymous)),
        (f"/api/banned-{n}", bearer(banned), False,
         dict(status=403, caller="svc-banned", decision="deny", rule=deny, **verified)),
        (f"/api/stranger-{n}", bearer(stranger), False,
         dict(status=403, caller="svc-stranger", decision="deny", rule="no rule matched", **verified)),
        (f"/deny-first/blocked-{n}", bearer(blocked), False,
         dict(status=403, caller="svc-log-blocked", decision="deny", rule=deny_first, **verified)),
        (f"/deny-first/other-{n}", bearer(stranger), True,
         dict(status=200, caller="svc-stranger", decision="allow", rule=any_rule, **verified)),
        (f"/missing/x-{n}", bearer(ok_token), False,
         dict(status=404, caller="svc-log-reader", decision="allow", rule="", **verified)),
        (f"/optional/anon-{n}", [], True,
         dict(status=200, authStatus="missing", decision="allow", **anonymous)),
        (f"/optional/named-{n}", bearer(ok_token), True,
         dict(status=200, caller="svc-log-reader", decision="allow", rule="", **verified)),
        (f"/open/x-{n}", bearer(ok_token), True,
         dict(status=200, authStatus="off", decision="", **anonymous)),
        (f"/open-missing/x-{n}", [], False,
         dict(status=404, authStatus="off", decision="", **anonymous)),
        (f"/broken/x-{n}", [], False,
         dict(status=502, authStatus="off", decision="", **anonymous)),
        (f"/fails/x-{n}", bearer(ok_token), False,
         dict(status=500, caller="svc-log-reader", decision="allow", rule="", **verified)),
        (f"/sample0/x-{n}", [], True,
         dict(status=200, authStatus="off", decision="", **anonymous)),
        (f"/untraced/x-{n}", [("traceparent", f"00-{T}-{P}-01")], True,
         dict(status=200, authStatus="off", decision="", **anonymous)),
    ]
    expected: dict[str, dict] = {}
    for url, headers, upstream, exp in cases:
        before = echo.requests
        method = exp.get("method", "GET")
        hdrs = list(headers)
        if "ua" not in exp:
            exp["ua"] = f"log-test/{n}"
            hdrs.append(("User-Agent", exp["ua"]))
        resp = request(site.port, url, hdrs, method=method, body=b"x" * 1000 if method == "POST" else b"")
        assert resp.status == exp["status"], f"{url}: {resp!r}"
        assert echo.requests == before + (1 if upstream else 0), url
        exp["url"] = url
        if url.startswith("/untraced/"):
            assert resp.header("traceresponse") is None
            exp.update(trace="", span="", sampled=False)
        else:
            exp["trace"], exp["span"], exp["sampled"] = trace_of(resp, upstream)
        if "traced-" in url:
            assert exp["trace"] == T, "incoming trace id not used"
        exp["_body_len"] = len(resp.body)
        expected[url] = exp
    assert expected[f"/sample0/x-{n}"]["sampled"] is False
    assert expected[f"/api/traced-{n}"]["sampled"] is False
    assert expected[f"/api/cloud-traced-{n}"]["sampled"] is True

    entries = read_entries(site, list(expected))
    problems = []
    for url, exp in expected.items():
        try:
            check_line(entries[url], exp)
            assert entries[url]["httpRequest"]["responseSize"] == str(exp["_body_len"]), entries[url]
        except AssertionError as e:
            problems.append(f"{url}: {e}")
    assert not problems, "\n\n".join(problems)

    # and nothing in the file is anything but one JSON object per line
    for line in (site.ngx.tmp / "cloud.log").read_text().splitlines():
        assert isinstance(json.loads(line), dict), line


def test_the_include_passes_nginx_t_with_the_module(module_path, conf_dir, keyring):
    from mesh_test.nginx import passes_nginx_t, render

    passes_nginx_t(render(LOG_HTTP, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir), conf_dir)


def test_a_rollout_shows_in_logs_and_metrics_alike(module_path, launcher_fn, keyring):
    """After `nginx -s reload` with a new mesh_config_version, log lines and mesh_config_info
    name the new version, and only it."""
    from prometheus_client.parser import text_string_to_metric_families

    body = LOG_HTTP.replace(
        "    location /api/ {",
        "    location = /metrics { mesh_auth off; allow 127.0.0.1; deny all; mesh_status; }\n    location /api/ {",
    )
    s = launcher_fn.start(body)
    token = jwks_token(keyring, claims(sub="svc-log-reader"))

    def versions() -> tuple[str, list[str]]:
        resp = request(s.port, "/api/rollout", bearer(token))
        assert resp.status == 200, resp
        metrics = request(s.port, "/metrics")
        info = [smp.labels["version"] for fam in text_string_to_metric_families(metrics.body.decode())
                for smp in fam.samples if smp.name == "mesh_config_info"]
        time.sleep(0.2)  # the access log is written when the request ends
        lines = [json.loads(ln) for ln in (s.ngx.tmp / "cloud.log").read_text().splitlines()]
        last = [e for e in lines if e["httpRequest"]["requestUrl"] == "/api/rollout"][-1]
        return last["configVersion"], info

    assert versions() == (VERSION, [VERSION])
    new = VERSION + ".next"
    s.ngx.conf_text = s.ngx.conf_text.replace(f'mesh_config_version "{VERSION}"', f'mesh_config_version "{new}"')
    s.ngx.conf_path.write_text(s.ngx.conf_text)
    s.ngx.reload()
    assert versions() == (new, [new])


# ---------------------------------------------------------------- mesh_log_level

LEVEL_HTTP = f"""
{JWKS_PROVIDER}
server {{
    listen 127.0.0.1:@PORT@;
    # as the image logs: warn and up (the harness's own error_log stays at info)
    error_log @TMP@/warn.log warn;
    mesh_auth jwks;
    location /warn/    {{ mesh_log_level warn; mesh_deny svc-level-denied; mesh_allow any; proxy_pass http://@UPSTREAM@; }}
    location /dry/     {{ mesh_log_level warn; mesh_policy_dry_run on; mesh_deny any; proxy_pass http://@UPSTREAM@; }}
    location /default/ {{ mesh_deny svc-level-denied; mesh_allow any; proxy_pass http://@UPSTREAM@; }}
    location /default-info/ {{ error_log @TMP@/info.log info; mesh_allow any; proxy_pass http://@UPSTREAM@; }}
}}
"""


def _mesh_lines(path) -> list[str]:
    return [l for l in path.read_text().splitlines() if "mesh:" in l] if path.exists() else []


def test_mesh_log_level_puts_refusals_where_a_warn_error_log_sees_them(launcher_fn, keyring):
    site = launcher_fn.start(LEVEL_HTTP, workers=1)
    warn_log = site.ngx.tmp / "warn.log"
    denied = jwks_token(keyring, claims(sub="svc-level-denied"))
    ok = jwks_token(keyring, claims(sub="svc-level-ok"))

    # the default (info) is below a warn error_log: a refusal leaves no line there
    assert request(site.port, "/default/x").status == 401
    assert request(site.port, "/default/x", bearer(denied)).status == 403
    assert _mesh_lines(warn_log) == [], warn_log.read_text()
    # ... where an info error_log has it
    assert request(site.port, "/default-info/x").status == 401
    info = _mesh_lines(site.ngx.tmp / "info.log")
    assert len(info) == 1 and "[info]" in info[0] and "refused 401" in info[0], "\n".join(info)

    # mesh_log_level warn: each refusal (and a dry run's would-deny) is one [warn] line
    assert request(site.port, "/warn/x").status == 401
    assert request(site.port, "/warn/x", bearer(denied)).status == 403
    assert request(site.port, "/warn/x", bearer(ok)).status == 200
    assert request(site.port, "/dry/x", bearer(ok)).status == 200
    lines = _mesh_lines(warn_log)
    assert len(lines) == 3, "\n".join(lines)
    assert all("[warn]" in l for l in lines), "\n".join(lines)
    assert "refused 401" in lines[0] and "decision: unauthenticated" in lines[0], lines[0]
    assert "refused 403" in lines[1] and 'caller: "svc-level-denied"' in lines[1], lines[1]
    assert "would deny (dry run)" in lines[2] and "decision: would_deny" in lines[2], lines[2]


@pytest.mark.parametrize("value", ["debug", "WARN", "crit"])
def test_a_bad_mesh_log_level_fails_nginx_t_at_its_line(module_path, conf_dir, keyring, value):
    from mesh_test.nginx import emerg_at_marked_line, render

    body = f"server {{\n    listen 127.0.0.1:@PORT@;\n    mesh_log_level {value};  # BAD\n}}"
    line = emerg_at_marked_line(render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir),
                                conf_dir, words=["mesh_log_level"])
    assert f'"{value}"' in line and '"warn"' in line, line
