"""mesh_access_report: at configuration time (start, reload, `nginx -t`) nginx writes who may
call which route, as it merged the configuration, in JSON and Markdown; never a secret, never
half a file, and in an order that makes two versions diff line by line."""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

from mesh_test.nginx import MESH_MODULE, NGINX_BIN, emerg_at_marked_line, line_of, passes_nginx_t, render

VERSION = "2026-12-04.r1"

BODY = """
mesh_config_version 2026-12-04.r1;
mesh_access_report @TMP@/access.json;
mesh_access_report access.md format=markdown;
mesh_provider jwks {
    issuer   https://jwks.mesh.test;
    keys     @KEYS@/jwks.json;
    audience aud-orders-7f3;
}
mesh_provider ci {
    issuer     https://ci.mesh.test;
    keys       @KEYS@/jwks.json;
    algorithms RS256;
}
mesh_rate_limit_zone api 1m;
mesh_outbound_token $billing_token https://billing.example;
mesh_require_auth on;
mesh_role admin alice@shop.test ~^ops-[a-z]+$;
mesh_auth jwks;
server {  # S1
    listen 127.0.0.1:@PORT@;
    server_name orders.test;
    location /orders/ {  # ORDERS
        mesh_auth jwks ci;
        mesh_allow role:admin;  # R1
        mesh_allow ~^svc-[a-z]+@ci\\.test$ methods=GET,HEAD provider=ci;  # R2
        mesh_deny any methods=DELETE;  # R3
        mesh_rate_limit zone=api rate=10r/s burst=5;
        mesh_rate_limit_caller role:admin rate=100r/s burst=20;
        mesh_rate_limit_dry_run on;
        location /orders/export/ {  # EXPORT
            mesh_policy_dry_run on;
        }
    }
    location ~ ^/reports/[0-9]+$ {  # REPORTS
        mesh_auth optional jwks;
        mesh_token $http_x_report_token;
        mesh_allow anonymous methods=GET;  # R4
    }
    location = /healthz {  # HEALTHZ
        mesh_auth off;
    }
    location @fallback {  # FALLBACK
        mesh_auth off;
    }
}
server {  # S2
    listen 127.0.0.1:@PORT@;
    server_name admin.test *.admin.test ~^(?<tenant>[a-z]+)\\.admin\\.test$;
    mesh_auth ci;
    mesh_role ops ~^ops-;
    location / {  # ADMIN
        mesh_allow role:ops role:admin;  # R5
    }
    location = /old {  # OLD
        return 301 /;
    }
}
"""


def conf_text(body: str, tmp, keyring) -> str:
    return render(body, tmp, port=8, upstream="127.0.0.1:9", keys=keyring.dir)


def route(kind, match, line, verdict, why, providers, written, *, optional=False, token=None,
          rules=(), no_match=None, policy_dry_run=False, rate_limit=None) -> dict:
    """One route of the report, as the JSON holds it (members in the documented order)."""
    if no_match is None:
        no_match = "allow any verified caller (no rules)" if providers else "allow any request (no rules)"
    return {
        "kind": kind, "match": match, "file": CONF, "line": line,
        "verdict": verdict, "why": why, "require_auth": True,
        "auth": {"providers": providers, "optional": optional, "written": written},
        "token": token, "audience": None, "rules": list(rules), "no_match": no_match,
        "policy_dry_run": policy_dry_run, "rate_limit": rate_limit, "outbound_auth": None,
    }


def rule(effect, patterns, directive, line, *, methods=None, providers=None) -> dict:
    return {
        "effect": effect,
        "patterns": [{"pattern": p, "role_patterns": r} for p, r in patterns],
        "methods": methods, "providers": providers,
        "directive": directive, "file": CONF, "line": line,
    }


CONF = ""  # set per test: the configuration file's full path


def expected(text: str, tmp, keyring) -> dict:
    global CONF
    CONF = str(tmp / "nginx.conf")
    at = lambda marker: line_of(text, f"# {marker}")  # noqa: E731
    admin = [("role:admin", ["alice@shop.test", "~^ops-[a-z]+$"])]
    orders_rules = [
        rule("allow", admin, "mesh_allow role:admin", at("R1")),
        rule("allow", [("~^svc-[a-z]+@ci\\.test$", None)],
             "mesh_allow ~^svc-[a-z]+@ci\\.test$ methods=GET,HEAD provider=ci", at("R2"),
             methods=["GET", "HEAD"], providers=["ci"]),
        rule("deny", [("any", None)], "mesh_deny any methods=DELETE", at("R3"), methods=["DELETE"]),
    ]
    limit = {
        "zone": "api", "global": None, "rate": "10r/s", "burst": 5, "key": None,
        "callers": [{"pattern": {"pattern": "role:admin", "role_patterns": admin[0][1]},
                     "rate": "100r/s", "burst": 20}],
        "dry_run": True, "status": 429,
    }
    return {
        "report": "ngx-mesh access report",
        "format_version": 1,
        "config_version": VERSION,
        "providers": [
            {"name": "jwks", "issuers": ["https://jwks.mesh.test"], "audiences": ["aud-orders-7f3"],
             "algorithms": [], "keys": {"kind": "file", "source": str(keyring.dir / "jwks.json")},
             "principal": "sub", "leeway": 30, "require": [], "platform_verified": False},
            {"name": "ci", "issuers": ["https://ci.mesh.test"], "audiences": [],
             "algorithms": ["RS256"], "keys": {"kind": "file", "source": str(keyring.dir / "jwks.json")},
             "principal": "sub", "leeway": 30, "require": [], "platform_verified": False},
        ],
        "outbound_tokens": [{"variable": "$billing_token", "audience": "https://billing.example"}],
        "servers": [
            {"names": ["orders.test"], "listen": ["127.0.0.1:8"], "file": CONF, "line": at("S1"),
             "routes": [
                 route("server", None, at("S1"), "protected", "mesh_auth jwks written at the http level",
                       ["jwks"], "http"),
                 route("location", "/orders/", at("ORDERS"), "protected",
                       "mesh_auth jwks ci written in the location", ["jwks", "ci"], "location",
                       rules=orders_rules, no_match="deny 403", rate_limit=limit),
                 route("location", "/orders/export/", at("EXPORT"), "protected",
                       "mesh_auth jwks ci written in the location", ["jwks", "ci"], "location",
                       rules=orders_rules, no_match="deny 403 (dry run: logged, allowed)",
                       policy_dry_run=True, rate_limit=limit),
                 route("location", "~ ^/reports/[0-9]+$", at("REPORTS"), "protected",
                       "mesh_auth optional jwks written in the location", ["jwks"], "location",
                       optional=True, token="$http_x_report_token",
                       rules=[rule("allow", [("anonymous", None)], "mesh_allow anonymous methods=GET",
                                   at("R4"), methods=["GET"])],
                       no_match="deny 403"),
                 route("location", "= /healthz", at("HEALTHZ"), "open",
                       "mesh_auth off written in the location", [], "location"),
                 # judged on its own: nginx sends requests there (error_page, try_files)
                 route("location", "@fallback", at("FALLBACK"), "open",
                       "mesh_auth off written in the location", [], "location"),
             ]},
            {"names": ["admin.test", "*.admin.test", "~^(?<tenant>[a-z]+)\\.admin\\.test$"], "listen": ["127.0.0.1:8"], "file": CONF,
             "line": at("S2"),
             "routes": [
                 # no server default: `location /` answers every request of this server
                 route("location", "/", at("ADMIN"), "protected", "mesh_auth ci written in its server",
                       ["ci"], "server",
                       rules=[rule("allow", [("role:ops", ["~^ops-"]), ("role:admin", [])],
                                   "mesh_allow role:ops role:admin", at("R5"))],
                       no_match="deny 403"),
                 route("location", "= /old", at("OLD"), "exempt",
                       "answered by return before the access phase", ["ci"], "server"),
             ]},
        ],
    }


def test_nginx_t_writes_the_exact_merged_report(module_path, conf_dir, keyring):
    """Two servers, inheritance (http, server, an enclosing location), roles expanded where
    they are in force (a server's mesh_role replaces the http level's), regexes, methods=,
    provider=, dry runs, a limit with a per-caller rate, an open and two exempt routes."""
    text = conf_text(BODY, conf_dir, keyring)
    passes_nginx_t(text, conf_dir)
    written = (conf_dir / "access.json").read_text()
    want = expected(text, conf_dir, keyring)
    assert json.loads(written) == want
    # byte for byte: two-space indent, one member a line, members in the documented order
    assert written == json.dumps(want, indent=2, ensure_ascii=False) + "\n"
    md = (conf_dir / "access.md").read_text()
    for line in [
        f"Configuration version: `{VERSION}`",
        f"- keys: file `{keyring.dir / 'jwks.json'}`",
        "- `$billing_token` for audience `https://billing.example`",
        f"## Server `orders.test` ({CONF}:{want['servers'][0]['line']})",
        f"### location `/orders/` ({CONF}:{line_of(text, '# ORDERS')}): protected",
        f"  1. allow `role:admin` (= `alice@shop.test`, `~^ops-[a-z]+$`) ({CONF}:{line_of(text, '# R1')})",
        f"  2. allow `~^svc-[a-z]+@ci\\.test$`; methods `GET`, `HEAD`; providers `ci` ({CONF}:{line_of(text, '# R2')})",
        "- rate limit: zone `api`, 10r/s burst 5, key the caller (else the client address), refused with 429, dry run",
        "  - caller `role:admin` (= `alice@shop.test`, `~^ops-[a-z]+$`): 100r/s burst 20",
        f"### location `= /healthz` ({CONF}:{line_of(text, '# HEALTHZ')}): open",
        "- verdict: exempt: answered by return before the access phase",
        "  1. allow `role:ops` (= `~^ops-`), `role:admin` (= nobody: no such role)"
        f" ({CONF}:{line_of(text, '# R5')})",
    ]:
        assert line in md.splitlines(), f"missing {line!r} in\n{md}"
    assert "server default" not in md.split("## Server `admin.test`")[1]


def diff(a: str, b: str) -> list[str]:
    """The lines removed (-) and added (+), in order: a minimal line diff (difflib without its
    "popular lines are junk" heuristic, which a long JSON file's `],` lines would trigger)."""
    x, y = a.splitlines(), b.splitlines()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, x, y, autojunk=False).get_opcodes():
        if op != "equal":
            out += ["-" + l for l in x[i1:i2]] + ["+" + l for l in y[j1:j2]]
    return out


def test_one_changed_rule_is_a_minimal_diff(module_path, conf_dir, keyring):
    """Changing the methods of one rule changes exactly the lines that say so, in both
    formats: in its location and in the nested location that inherits it."""
    before = conf_text(BODY, conf_dir, keyring)
    passes_nginx_t(before, conf_dir)
    json1, md1 = (conf_dir / "access.json").read_text(), (conf_dir / "access.md").read_text()
    after = before.replace("mesh_deny any methods=DELETE;", "mesh_deny any methods=DELETE,PATCH;")
    assert after != before
    passes_nginx_t(after, conf_dir)
    json2, md2 = (conf_dir / "access.json").read_text(), (conf_dir / "access.md").read_text()
    assert diff(json1, json2) == [
        '-                "DELETE"',
        '+                "DELETE",',
        '+                "PATCH"',
        '-              "directive": "mesh_deny any methods=DELETE",',
        '+              "directive": "mesh_deny any methods=DELETE,PATCH",',
    ] * 2
    at = f"({conf_dir / 'nginx.conf'}:{line_of(before, '# R3')})"
    assert diff(md1, md2) == [
        f"-  3. deny `any`; methods `DELETE` {at}",
        f"+  3. deny `any`; methods `DELETE`, `PATCH` {at}",
    ] * 2


SECRETS_BODY = """
mesh_access_report @TMP@/access.json;
mesh_access_report @TMP@/access.md format=markdown;
mesh_provider fetched {
    issuer https://fetched.mesh.test;
    keys   https://reporter:hunter2-pw@keys.mesh.test:8443/jwks.json?api_key=k3y-s3cr3t&v=2;
}
mesh_provider hmac {
    issuer https://hmac.mesh.test;
    secret @KEYS@/hmac.secret;
}
mesh_provider oidc {
    issuer    https://login.mesh.test/tenant-7;
    discovery on;
}
mesh_rate_limit_zone g 1m redis=redis://default:r3dis-pw@127.0.0.1:6390/2;
server {
    listen 127.0.0.1:@PORT@;
    location / {
        mesh_auth fetched hmac;
        mesh_rate_limit zone=g rate=5r/s;
    }
}
"""


def test_no_secret_reaches_the_report(module_path, conf_dir, keyring):
    """A key URL's user info and query values, a Redis URL's password and an HMAC secret's
    contents appear in neither format; the secret's file name and the Redis host do."""
    passes_nginx_t(conf_text(SECRETS_BODY, conf_dir, keyring), conf_dir)
    secret = (keyring.dir / "hmac.secret").read_text().strip()
    assert len(secret) >= 8
    for name in ["access.json", "access.md"]:
        text = (conf_dir / name).read_text()
        for s in ["hunter2-pw", "reporter", "k3y-s3cr3t", "r3dis-pw", "default:", secret]:
            assert s not in text, f"{s!r} in {name}:\n{text}"
        assert "https://***@keys.mesh.test:8443/jwks.json?api_key=***&v=***" in text
        assert str(keyring.dir / "hmac.secret") in text
        assert "127.0.0.1:6390/2" in text
    report = json.loads((conf_dir / "access.json").read_text())
    assert report["servers"][0]["routes"][0]["rate_limit"]["global"] == "127.0.0.1:6390/2"
    assert report["providers"][1]["keys"] == {"kind": "secret_file", "source": str(keyring.dir / "hmac.secret")}
    assert report["providers"][2]["keys"] == {
        "kind": "discovery", "source": "https://login.mesh.test/tenant-7/.well-known/openid-configuration"}


def test_a_file_that_cannot_be_written_fails_nginx_t_at_its_line(module_path, conf_dir, keyring):
    body = "mesh_access_report @TMP@/no/such/dir/access.json;  # BAD\n" + BODY.split("\n", 3)[3]
    line = emerg_at_marked_line(conf_text(body, conf_dir, keyring), conf_dir,
                                words=["mesh_access_report: cannot write"])
    assert "No such file or directory" in line, line
    assert not (conf_dir / "access.md").exists()


def test_bad_parameters_fail_at_their_line(module_path, conf_dir, keyring):
    for bad, says in [
        ("mesh_access_report @TMP@/a.json format=yaml;  # BAD", "(format=json or format=markdown)"),
        ("mesh_access_report @TMP@/a.json;\nmesh_access_report @TMP@/a.json format=markdown;  # BAD",
         "is written twice"),
        ("server { mesh_access_report @TMP@/a.json; }  # BAD", "is not allowed here"),
    ]:
        line = emerg_at_marked_line(conf_text(bad + "\n", conf_dir, keyring), conf_dir, words=[says])
        assert "mesh_access_report" in line, line


def test_the_report_is_rewritten_on_reload_and_never_half_written(module_path, launcher_fn):
    """While reloads replace the report (a large one: many locations), a reader that keeps
    reading it only ever sees a whole JSON document, of the old version or the new."""
    many = "\n".join(
        f"    location /r{i}/ {{ mesh_allow role:admin claim:team=t{i} methods=GET,POST; }}" for i in range(150)
    )
    # (no mesh_outbound_token: its workers would wait on a metadata server that is not there)
    body = BODY.replace("mesh_access_report access.md format=markdown;\n", "").replace(
        "mesh_outbound_token $billing_token https://billing.example;\n", "").replace(
        "    location = /healthz {", many + "\n    location = /healthz {")
    site = launcher_fn.start(body)
    ngx = site.ngx
    path = ngx.tmp / "access.json"
    assert json.loads(path.read_text())["config_version"] == VERSION
    seen, bad, stop = set(), [], threading.Event()

    def reader() -> None:
        for _ in range(200_000):
            if stop.is_set():
                return
            text = path.read_text()
            try:
                seen.add(json.loads(text)["config_version"])
            except ValueError:
                bad.append(len(text))
            time.sleep(0)  # let the reloading thread run

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(6):
            version = f"reload-{i}"
            ngx.conf_path.write_text(ngx.conf_text.replace(VERSION, version))
            ngx.reload()
            assert json.loads(path.read_text())["config_version"] == version
    finally:
        stop.set()
        t.join()
    assert not bad, f"{len(bad)} reads saw a partial file (lengths {bad[:5]})"
    assert len(seen) >= 2, seen
    leftovers = [p.name for p in ngx.tmp.iterdir() if p.name.startswith(".access.json")]
    assert not leftovers, leftovers


README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE = re.compile(r"(<!-- access-report-example:(?P<name>\w+) -->\n```\w*\n)(?P<body>.*?)(\n```)", re.S)


def test_the_readme_examples_are_what_the_module_writes(module_path, conf_dir, keyring):
    """README's example reports are this module's output for README's example nginx.conf
    (`MESH_UPDATE_README=1` rewrites them)."""
    readme = README.read_text()
    blocks = {m["name"]: m["body"] for m in EXAMPLE.finditer(readme)}
    assert set(blocks) == {"conf", "markdown", "json"}, blocks.keys()
    etc = str(conf_dir)
    conf = conf_dir / "nginx.conf"
    conf.write_text(blocks["conf"].replace("modules/ngx_http_mesh_module.so", MESH_MODULE)
                    .replace("/etc/nginx", etc) + "\n")
    shutil.copy(keyring.dir / "jwks.json", conf_dir / "ci-jwks.json")
    (conf_dir / "logs").mkdir(exist_ok=True)
    done = subprocess.run([NGINX_BIN, "-t", "-e", "stderr", "-p", etc, "-c", str(conf), "-g", f"pid {etc}/nginx.pid;"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    assert done.returncode == 0 and "[emerg]" not in done.stdout, done.stdout
    written = {
        "markdown": (conf_dir / "access.md").read_text().replace(etc, "/etc/nginx").rstrip("\n"),
        "json": (conf_dir / "access.json").read_text().replace(etc, "/etc/nginx").rstrip("\n"),
    }
    assert "PASSWORD" not in written["markdown"] + written["json"]
    if os.environ.get("MESH_UPDATE_README"):
        README.write_text(EXAMPLE.sub(lambda m: m.group(1) + written.get(m["name"], m["body"]) + m.group(4), readme))
        return
    for name, text in written.items():
        assert blocks[name] == text, f"README's {name} example is not what the module writes " \
            "(MESH_UPDATE_README=1 rewrites it):\n" + "\n".join(diff(blocks[name], text))


def test_outbound_identity_is_reported_per_route(module_path, conf_dir, keyring):
    body = """
mesh_access_report @TMP@/access.json;
mesh_outbound_token $billing_token https://billing.example;
server {
    listen 127.0.0.1:@PORT@;
    location /billing/ { mesh_outbound_auth $billing_token; proxy_pass http://@UPSTREAM@; }
    location /other/ { proxy_pass http://@UPSTREAM@; }
}
"""
    passes_nginx_t(conf_text(body, conf_dir, keyring), conf_dir)
    report = json.loads((conf_dir / "access.json").read_text())
    routes = {r["match"]: r for r in report["servers"][0]["routes"]}
    assert routes["/billing/"]["outbound_auth"] == "$billing_token"
    assert routes["/other/"]["outbound_auth"] is None
    assert report["outbound_tokens"] == [{"variable": "$billing_token", "audience": "https://billing.example"}]
