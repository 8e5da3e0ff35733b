"""Hardening, second round: what a security review of the running module found, one section
per finding. Each test is a check a user can make against real nginx: what the client gets,
what reaches the upstream, what `nginx -t` and error.log say, whether a worker survives.
"""

from __future__ import annotations

import pytest

from mesh_test.client import bearer
from mesh_test.configs import JWKS_PROVIDER, claims
from mesh_test.nginx import emerg_at_marked_line, render
from mesh_test.tokens import jwks_token

JWKS_ISS = "https://jwks.mesh.test"


def _conf(tmp, body: str, keyring) -> str:
    return render(body, tmp, port=1, upstream="127.0.0.1:1", keys=keyring.dir)


def tok(keyring, sub: str, iss: str = JWKS_ISS, **extra) -> str:
    return jwks_token(keyring, claims(iss=iss, sub=sub, **extra))


# ---------------------------------------------------------------- the module's own zone names

# The shared zones the module makes for itself: a rate zone of the same name must never be
# mistaken for one of them (it once was: every worker charging it died on SIGSEGV).
OWN_ZONES = ["mesh_metrics", "mesh_keys", "callers:mesh_redis"]


@pytest.mark.parametrize("name", OWN_ZONES)
@pytest.mark.parametrize("size", ["128k", "1m"])
def test_a_rate_zone_named_like_an_own_zone_fails_nginx_t(module_path, conf_dir, keyring, name, size):
    body = f"""
{JWKS_PROVIDER}
mesh_rate_limit_zone callers 64k redis=redis://127.0.0.1:1;
mesh_rate_limit_zone "{name}" {size};  # BAD
server {{
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    location / {{ mesh_rate_limit zone={name} rate=1r/m; proxy_pass http://@UPSTREAM@; }}
}}
"""
    line = emerg_at_marked_line(_conf(conf_dir, body, keyring), conf_dir)
    assert "reserved" in line and name in line, line


@pytest.mark.parametrize("name", OWN_ZONES)
def test_a_limit_naming_an_own_zone_fails_nginx_t(module_path, conf_dir, keyring, name):
    body = f"""
{JWKS_PROVIDER}
mesh_rate_limit_zone callers 64k redis=redis://127.0.0.1:1;
server {{
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    location / {{
        mesh_rate_limit zone={name} rate=1r/m;  # BAD
        proxy_pass http://@UPSTREAM@;
    }}
}}
"""
    line = emerg_at_marked_line(_conf(conf_dir, body, keyring), conf_dir)
    assert name in line, line


def test_zones_with_mesh_in_their_name_still_work(module_path, launcher_fn, keyring):
    # only the exact names are reserved: a zone called mesh_metrics2 is a zone like any other
    site = launcher_fn.start(f"""
{JWKS_PROVIDER}
mesh_rate_limit_zone mesh_metrics2 128k;
mesh_rate_limit_zone mesh_keys_x 64k;
server {{
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    location /a/ {{ mesh_rate_limit zone=mesh_metrics2 rate=1r/m; proxy_pass http://@UPSTREAM@; }}
    location /b/ {{ mesh_rate_limit zone=mesh_keys_x rate=1r/m; proxy_pass http://@UPSTREAM@; }}
    location = /metrics {{ mesh_auth off; mesh_status; }}
}}
""")
    t = bearer(tok(keyring, "svc-zone-names"))
    for path in ("/a/x", "/b/x"):
        assert site.get(path, t).status == 200
        assert site.get(path, t).status == 429
    metrics = site.get("/metrics").body.decode()
    assert 'mesh_rate_limited_total{zone="mesh_metrics2"} 1' in metrics, metrics
    assert 'mesh_rate_limited_total{zone="mesh_keys_x"} 1' in metrics, metrics
