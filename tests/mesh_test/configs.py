"""nginx `http {}` bodies shared by the test modules, and the claims the tokens carry."""

from __future__ import annotations

from .tokens import now

ISS_JWKS = "https://jwks.mesh.test"
ISS_OTHER = "https://other.mesh.test"
ISS_PEM_RSA = "https://pem-rsa.mesh.test"
ISS_PEM_CERT = "https://pem-cert.mesh.test"
ISS_PEM_EC256 = "https://pem-ec256.mesh.test"
ISS_PEM_EC384 = "https://pem-ec384.mesh.test"
ISS_PEM_ED25519 = "https://pem-ed25519.mesh.test"
ISS_HMAC = "https://hmac.mesh.test"
ISS_PEM_BUNDLE = "https://pem-bundle.mesh.test"
ISS_JWKS_ALG = "https://jwks-alg.mesh.test"
ISS_PEOPLE = "https://people.mesh.test"
ISS_PEOPLE_ALT = "https://people-alt.mesh.test"
ISS_ES_ONLY = "https://es-only.mesh.test"
ISS_WIDE_LEEWAY = "https://wide-leeway.mesh.test"
ISS_NO_LEEWAY = "https://no-leeway.mesh.test"
ISS_UNLISTED = "https://unlisted.mesh.test"

AUD = "aud-orders-7f3"
AUD_EXTRA = "aud-extra-7f3"
AUD_BILLING = "aud-billing-7f3"
CONFIG_VERSION = "2026-11-26.e2e"

# The one provider most test files need: jwks.json, issuer ISS_JWKS, audience AUD.
JWKS_PROVIDER = """
mesh_provider jwks {
    issuer   https://jwks.mesh.test;
    keys     @KEYS@/jwks.json;
    audience aud-orders-7f3;
}
"""

PROVIDERS = """
mesh_provider jwks {
    issuer   https://jwks.mesh.test;
    keys     @KEYS@/jwks.json;
    audience aud-orders-7f3 aud-extra-7f3;
}
mesh_provider jwks_other {
    issuer https://other.mesh.test;
    keys   @KEYS@/jwks.json;
}
mesh_provider pem_rsa     { issuer https://pem-rsa.mesh.test;     keys @KEYS@/rsa.pub.pem; }
mesh_provider pem_cert    { issuer https://pem-cert.mesh.test;    keys @KEYS@/rsa.cert.pem; }
mesh_provider pem_ec256   { issuer https://pem-ec256.mesh.test;   keys @KEYS@/ec256.pub.pem; }
mesh_provider pem_ec384   { issuer https://pem-ec384.mesh.test;   keys @KEYS@/ec384.pub.pem; }
mesh_provider pem_ed25519 { issuer https://pem-ed25519.mesh.test; keys @KEYS@/ed25519.pub.pem; }
mesh_provider pem_bundle  { issuer https://pem-bundle.mesh.test;  keys @KEYS@/bundle.pem; }
mesh_provider jwks_alg    { issuer https://jwks-alg.mesh.test;    keys @KEYS@/jwks-alg.json; }
mesh_provider hmac        { issuer https://hmac.mesh.test;        secret @KEYS@/hmac.secret; }
mesh_provider people {
    issuer    https://people.mesh.test https://people-alt.mesh.test;
    keys      @KEYS@/jwks.json;
    principal email;
    require   google.compute_engine.project_id=p1 groups=admins email_verified=true;
}
mesh_provider es_only {
    issuer     https://es-only.mesh.test;
    keys       @KEYS@/jwks.json;
    algorithms ES256;
}
mesh_provider wide_leeway { issuer https://wide-leeway.mesh.test; keys @KEYS@/jwks.json; leeway 2m; }
mesh_provider no_leeway   { issuer https://no-leeway.mesh.test;   keys @KEYS@/jwks.json; leeway 0s; }
mesh_provider unlisted    { issuer https://unlisted.mesh.test;    keys @KEYS@/jwks.json; }
"""

ALL_LISTED = "jwks jwks_other pem_rsa pem_cert pem_ec256 pem_ec384 pem_ed25519 pem_bundle jwks_alg hmac people es_only wide_leeway no_leeway"

# $mesh_* variables towards the upstream, on the response, in a map, a log_format and a limit_req key.
VARIABLES = """
mesh_config_version "2026-11-26.e2e";
map $mesh_caller $mesh_test_kind {
    default  other;
    ""       anonymous;
    ~^svc-   service;
}
log_format meshlog 'MESHLOG uri=$request_uri status=$status caller=$mesh_caller provider=$mesh_provider auth=$mesh_auth_status decision=$mesh_decision version=$mesh_config_version';
limit_req_zone $mesh_caller zone=per_caller:1m rate=1r/m;
"""

SERVER_COMMON = """
    listen 127.0.0.1:@PORT@;
    large_client_header_buffers 4 64k;
    access_log @TMP@/mesh_access.log meshlog;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    proxy_set_header X-Test-Caller   $mesh_caller;
    proxy_set_header X-Test-Provider $mesh_provider;
    proxy_set_header X-Test-Email    $mesh_claim_email;
    proxy_set_header X-Test-Groups   $mesh_claim_groups;
    proxy_set_header X-Test-Status   $mesh_auth_status;
    proxy_set_header X-Test-Decision $mesh_decision;
    proxy_set_header X-Test-Version  $mesh_config_version;
    proxy_set_header X-Test-Kind     $mesh_test_kind;
"""

LOCATIONS = """
    location /           { proxy_pass http://@UPSTREAM@; }
    location /optional/  { mesh_auth optional jwks; proxy_pass http://@UPSTREAM@; }
    location /cookie/    { mesh_token $cookie_id_token; proxy_pass http://@UPSTREAM@; }
    location /billing/   { mesh_audience aud-billing-7f3; proxy_pass http://@UPSTREAM@; }
    location /realm/     { mesh_realm "orders api"; proxy_pass http://@UPSTREAM@; }
    location /open/      { mesh_auth off; proxy_pass http://@UPSTREAM@; }
    location /only-jwks/ { mesh_auth jwks; proxy_pass http://@UPSTREAM@; }
    location /teapot/    { if ($mesh_auth_status = expired) { return 418; } proxy_pass http://@UPSTREAM@; }
    location /set/       { set $who "caller:$mesh_caller"; proxy_set_header X-Test-Who $who; proxy_pass http://@UPSTREAM@; }
    location /errpage/   { error_page 401 /errors/401; proxy_pass http://@UPSTREAM@; }
    location /errors/    { internal; mesh_auth off; return 401 "custom refusal page\n"; }
    location /limited/   { limit_req zone=per_caller; limit_req_status 429; proxy_pass http://@UPSTREAM@; }
"""


def identity_http(extra_http: str = "") -> str:
    """The main configuration: every provider, every variable, one location per option."""
    return (
        PROVIDERS
        + VARIABLES
        + extra_http
        + "server {\n"
        + SERVER_COMMON
        + f"    mesh_auth {ALL_LISTED};\n"
        + LOCATIONS
        + "}\n"
    )


def claims(iss: str = ISS_JWKS, sub: str = "svc-orders-caller-51d", aud=AUD, **extra) -> dict:
    """Valid claims for `iss` (exp in 5 minutes); a value of None drops that claim."""
    t = now()
    c = {"iss": iss, "sub": sub, "aud": aud, "iat": t, "exp": t + 300}
    c.update(extra)
    return {k: v for k, v in c.items() if v is not None}


def people_claims(**extra) -> dict:
    """Claims that satisfy the `people` provider's principal and require lines."""
    c = claims(
        iss=ISS_PEOPLE,
        sub="1180447730982",
        aud=None,
        email="checkout-9c1@shop.iam.gserviceaccount.com",
        email_verified=True,
        groups=["admins", "ops"],
        google={"compute_engine": {"project_id": "p1", "zone": "us-central1-a"}},
    )
    c.update(extra)
    return {k: v for k, v in c.items() if v is not None}
