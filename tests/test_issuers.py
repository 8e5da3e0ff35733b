"""Tokens from the issuers Cloud Run services meet: audiences with a trailing slash, ES512
(P-521) keys from JWKS and PEM files, x509 key maps (files and URLs), `preset firebase` and
`preset service_account` (their key URLs replaced by a `keys` line pointing at a loopback
HTTPS key server, which serves what Google serves there).

Every token is signed here with a real key; every answer is checked as a user would (200 with
the caller at the upstream, or 401 with its exact `$mesh_auth_status`).
"""

from __future__ import annotations

import datetime
import json
import shutil
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from mesh_test.client import bearer
from mesh_test.configs import claims
from mesh_test.keyserver import KeyServer, TestPKI
from mesh_test.live import keys_info, wait_until
from mesh_test.nginx import make_private_dir
from mesh_test.tokens import jwks_token, make_token, now, public_jwk

RUN_URL = "https://orders-abc123-uc.a.run.app"
ISS_RUN = "https://run.mesh.test"
ISS_PLAIN = "https://plain.mesh.test"
ISS_ES512 = "https://es512.mesh.test"
ISS_ES512_PEM = "https://es512-pem.mesh.test"
KID_P521 = "p521-1"


@pytest.fixture(scope="module")
def p521():
    return ec.generate_private_key(ec.SECP521R1())


def _files(p521) -> dict[str, bytes]:
    pem = p521.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return {
        "p521.jwks.json": json.dumps({"keys": [public_jwk(p521, KID_P521)]}).encode(),
        "p521.pub.pem": pem,
    }


HTTP = f"""
mesh_provider run_url {{
    issuer   {ISS_RUN};
    keys     @KEYS@/jwks.json;
    audience {RUN_URL} https://billing-abc123-uc.a.run.app/;
}}
mesh_provider plain_aud {{
    issuer   {ISS_PLAIN};
    keys     @KEYS@/jwks.json;
    audience orders http://orders.internal;
}}
mesh_provider es512_jwks {{
    issuer {ISS_ES512};
    keys   @TMP@/p521.jwks.json;
}}
mesh_provider es512_pem {{
    issuer     {ISS_ES512_PEM};
    keys       @TMP@/p521.pub.pem;
    algorithms ES512;
}}
server {{
    listen 127.0.0.1:@PORT@;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    proxy_set_header X-Test-Caller   $mesh_caller;
    proxy_set_header X-Test-Provider $mesh_provider;
    mesh_auth run_url plain_aud es512_jwks es512_pem;
    location / {{ proxy_pass http://@UPSTREAM@; }}
}}
"""


@pytest.fixture(scope="module")
def site(module_path, launcher, p521):
    return launcher.start(HTTP, files=_files(p521))


# ---------------------------------------------------------------- audiences

@pytest.mark.parametrize("aud", [RUN_URL, RUN_URL + "/", "https://billing-abc123-uc.a.run.app",
                                 "https://billing-abc123-uc.a.run.app/", ["x", RUN_URL + "/"]])
def test_an_https_audience_matches_with_or_without_one_trailing_slash(site, keyring, aud):
    resp = site.allowed("/a", bearer(jwks_token(keyring, claims(iss=ISS_RUN, aud=aud))))
    assert resp.upstream_header("X-Test-Provider") == "run_url"


@pytest.mark.parametrize("iss,aud", [
    (ISS_RUN, RUN_URL + "//"),
    (ISS_RUN, RUN_URL + "/orders"),
    (ISS_RUN, RUN_URL.replace("https://", "http://") + "/"),
    (ISS_RUN, RUN_URL.upper()),
    (ISS_PLAIN, "orders/"),
    (ISS_PLAIN, "http://orders.internal/"),
], ids=["two-slashes", "a-path", "http-scheme", "upper-case", "plain-with-slash", "http-url-with-slash"])
def test_anything_else_must_match_exactly(site, keyring, iss, aud):
    token = jwks_token(keyring, claims(iss=iss, aud=aud))
    site.refused("/a", bearer(token), "wrong_audience", token=token)


def test_a_plain_audience_still_matches_itself(site, keyring):
    site.allowed("/a", bearer(jwks_token(keyring, claims(iss=ISS_PLAIN, aud="http://orders.internal"))))


# ---------------------------------------------------------------- ES512

@pytest.mark.parametrize("iss,kid,provider", [
    (ISS_ES512, KID_P521, "es512_jwks"),
    (ISS_ES512, None, "es512_jwks"),
    (ISS_ES512_PEM, None, "es512_pem"),
], ids=["jwks-kid", "jwks-no-kid", "pem"])
def test_es512_tokens_verify_with_p521_keys(site, p521, iss, kid, provider):
    resp = site.allowed("/es512", bearer(make_token("ES512", p521, claims(iss=iss, aud=None), kid=kid)))
    assert resp.upstream_header("X-Test-Provider") == provider
    assert resp.upstream_header("X-Test-Caller") == "svc-orders-caller-51d"


def test_es512_with_a_wrong_signature_or_another_key_is_refused(site, p521, keyring):
    c = claims(iss=ISS_ES512, aud=None)
    other = make_token("ES512", ec.generate_private_key(ec.SECP521R1()), c, kid=KID_P521)
    site.refused("/es512", bearer(other), "bad_signature", token=other)
    # the P-521 key verifies ES512 only
    es384 = make_token("ES384", keyring.ec384, c, kid=KID_P521)
    site.refused("/es512", bearer(es384), "bad_signature", token=es384)


# ---------------------------------------------------------------- x509 key maps

ISS_X509_FILE = "https://x509-file.mesh.test"


def cert_pem(key, cn: str = "ngx-mesh test signer") -> str:
    """A self-signed certificate for key's public key (a container, as Google's are)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    t = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(t - datetime.timedelta(days=1)).not_valid_after(t + datetime.timedelta(days=14))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def x509_map(pairs: dict[str, object]) -> bytes:
    return json.dumps({kid: cert_pem(key) for kid, key in pairs.items()}).encode()


@pytest.fixture(scope="module")
def signers():
    return {
        "r1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "r2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "e1": ec.generate_private_key(ec.SECP256R1()),
        "sa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


FIREBASE_PROJECT = "shop-prod-1"
FIREBASE_ISS = f"https://securetoken.google.com/{FIREBASE_PROJECT}"
FIREBASE_PATH = "/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com"
SA_EMAIL = "deployer@shop-prod-1.iam.gserviceaccount.com"
SA_PATH = f"/service_accounts/v1/jwk/{SA_EMAIL}"
SA_AUD = "https://orders-abc123-uc.a.run.app"


def live_http(ks: KeyServer) -> str:
    ca = "ca=@TMP@/ca.pem"
    return f"""
mesh_provider x509_file {{
    issuer {ISS_X509_FILE};
    keys   @TMP@/x509-map.json;
}}
mesh_provider firebase {{
    preset firebase {FIREBASE_PROJECT};
    keys   {ks.url(FIREBASE_PATH)} {ca};
}}
mesh_provider deployer {{
    preset   service_account {SA_EMAIL};
    keys     {ks.url(SA_PATH)} {ca};
    audience {SA_AUD};
}}
server {{
    listen 127.0.0.1:@PORT@;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    proxy_set_header X-Test-Caller   $mesh_caller;
    proxy_set_header X-Test-Provider $mesh_provider;
    mesh_auth x509_file firebase deployer;
    location / {{ proxy_pass http://@UPSTREAM@; }}
    location /deploy/ {{
        mesh_auth deployer;
        mesh_allow {SA_EMAIL};
        proxy_pass http://@UPSTREAM@;
    }}
}}
"""


@pytest.fixture(scope="module")
def pki():
    directory = make_private_dir("ngx-mesh-pki-issuers-")
    yield TestPKI(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def ks(pki, signers):
    server = KeyServer(pki)
    server.set(FIREBASE_PATH, body=x509_map({"fb-1": signers["r1"]}), cache_control="public, max-age=19000")
    server.set(SA_PATH, keys=[public_jwk(signers["sa"], "sa-key-1")])
    yield server
    server.close()


@pytest.fixture(scope="module")
def live(module_path, launcher, ks, pki, signers):
    files = {"ca.pem": pki.ca_pem, "x509-map.json": x509_map({"x-rsa": signers["r1"], "x-ec": signers["e1"]})}
    site = launcher.start(live_http(ks), files=files)
    wait_until(lambda: {i.provider for i in keys_info(site.ngx.read_error_log())} >= {"firebase", "deployer"}, 10)
    return site


@pytest.mark.parametrize("alg,kid,signer", [("RS256", "x-rsa", "r1"), ("ES256", "x-ec", "e1"),
                                            ("RS256", None, "r1")], ids=["rsa", "ec", "no-kid"])
def test_an_x509_key_map_file_verifies_with_the_certificate_its_kid_names(live, signers, alg, kid, signer):
    resp = live.allowed("/x", bearer(make_token(alg, signers[signer], claims(iss=ISS_X509_FILE, aud=None), kid=kid)))
    assert resp.upstream_header("X-Test-Provider") == "x509_file"


def test_an_x509_key_map_kid_is_bound_to_its_certificate(live, signers):
    c = claims(iss=ISS_X509_FILE, aud=None)
    wrong = make_token("RS256", signers["r2"], c, kid="x-rsa")
    live.refused("/x", bearer(wrong), "bad_signature", token=wrong)
    unknown = make_token("RS256", signers["r1"], c, kid="x-none")
    live.refused("/x", bearer(unknown), "unknown_key", token=unknown)


def firebase_claims(**over) -> dict:
    t = now()
    c = {"iss": FIREBASE_ISS, "aud": FIREBASE_PROJECT, "auth_time": t - 60, "user_id": "u8Ykq2Wf0bOx",
         "sub": "u8Ykq2Wf0bOx", "iat": t, "exp": t + 3600, "email": "ana@example.com",
         "email_verified": True, "firebase": {"identities": {"email": ["ana@example.com"]},
                                               "sign_in_provider": "password"}}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def test_preset_firebase_accepts_a_firebase_id_token_from_the_x509_map_url(live, ks, signers):
    resp = live.allowed("/fb", bearer(make_token("RS256", signers["r1"], firebase_claims(), kid="fb-1")))
    assert resp.upstream_header("X-Test-Provider") == "firebase"
    assert resp.upstream_header("X-Test-Caller") == "u8Ykq2Wf0bOx", "the caller is the Firebase uid (sub)"
    assert ks.count(FIREBASE_PATH) == 1
    info = [i for i in keys_info(live.ngx.read_error_log()) if i.provider == "firebase"]
    assert info and info[0].keys == 1 and info[0].refresh == 19000, info


@pytest.mark.parametrize("over,status", [
    ({"aud": "another-project"}, "wrong_audience"),
    ({"iss": "https://securetoken.google.com/another-project"}, "wrong_issuer"),
    ({"exp": now() - 600, "iat": now() - 4000}, "expired"),
], ids=["other-audience", "other-project", "expired"])
def test_preset_firebase_refuses_tokens_of_another_project(live, signers, over, status):
    token = make_token("RS256", signers["r1"], firebase_claims(**over), kid="fb-1")
    live.refused("/fb", bearer(token), status, token=token)


def test_preset_firebase_picks_up_a_rotated_x509_map(live, ks, signers):
    ks.set(FIREBASE_PATH, body=x509_map({"fb-1": signers["r1"], "fb-2": signers["r2"]}))
    token = make_token("RS256", signers["r2"], firebase_claims(), kid="fb-2")
    # the unknown kid starts one refetch; the next requests pass once it is in
    deadline = time.monotonic() + 10
    while True:
        resp = live.get("/fb", bearer(token))
        if resp.status == 200 or time.monotonic() > deadline:
            break
        assert resp.header("X-Auth-Status") == "unknown_key", resp
        time.sleep(0.1)
    assert resp.status == 200, resp
    assert ks.count(FIREBASE_PATH) == 2


def sa_claims(**over) -> dict:
    t = now()
    c = {"iss": SA_EMAIL, "sub": SA_EMAIL, "aud": SA_AUD, "iat": t, "exp": t + 3600}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def test_preset_service_account_accepts_the_accounts_self_signed_jwt(live, signers):
    resp = live.allowed("/deploy/x", bearer(make_token("RS256", signers["sa"], sa_claims(), kid="sa-key-1")))
    assert resp.upstream_header("X-Test-Caller") == SA_EMAIL
    assert resp.upstream_header("X-Test-Provider") == "deployer"


@pytest.mark.parametrize("over,status", [
    ({"sub": "someone-else@shop-prod-1.iam.gserviceaccount.com"}, "claim_mismatch"),
    ({"iss": "someone-else@shop-prod-1.iam.gserviceaccount.com"}, "wrong_issuer"),
    ({"aud": "https://billing-abc123-uc.a.run.app"}, "wrong_audience"),
], ids=["other-subject", "other-issuer", "other-audience"])
def test_preset_service_account_checks_subject_issuer_and_audience(live, signers, over, status):
    token = make_token("RS256", signers["sa"], sa_claims(**over), kid="sa-key-1")
    live.refused("/deploy/x", bearer(token), status, token=token)


def test_preset_service_account_refuses_another_key(live, signers):
    token = make_token("RS256", signers["r1"], sa_claims(), kid="sa-key-1")
    live.refused("/deploy/x", bearer(token), "bad_signature", token=token)


# ---------------------------------------------------------------- nginx -t

def _block(lines: str) -> str:
    return f"mesh_provider p {{\n{lines}\n}}\n"


BAD_PRESETS = [
    ("firebase-without-project", "    preset firebase;  # BAD", ["project ID"]),
    ("firebase-bad-project", "    preset firebase shop/prod;  # BAD", ["shop/prod"]),
    ("service-account-without-email", "    preset service_account;  # BAD", ["email"]),
    ("service-account-not-an-email", "    preset service_account deployer;  # BAD", ["deployer"]),
    ("service-account-path-in-email", "    preset service_account a@b/../x;  # BAD", ["a@b/../x"]),
    ("google-with-an-argument", "    preset google extra;  # BAD", ["too many"]),
]


@pytest.mark.parametrize("lines,words", [c[1:] for c in BAD_PRESETS], ids=[c[0] for c in BAD_PRESETS])
def test_bad_preset_arguments_fail_nginx_t_at_the_line(module_path, conf_dir, keyring, lines, words):
    from mesh_test.nginx import emerg_at_marked_line, render
    conf = render(_block(lines), conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)
    emerg_at_marked_line(conf, conf_dir, words=words)


@pytest.mark.parametrize("lines", [
    "    preset firebase shop-prod-1;",
    "    preset firebase example.com:legacy-project;",
    f"    preset service_account {SA_EMAIL};",
    f"    preset service_account {SA_EMAIL};\n    audience {SA_AUD};",
], ids=["firebase", "firebase-domain-scoped", "service-account", "service-account-audience"])
def test_presets_pass_nginx_t_in_at_most_two_lines(module_path, conf_dir, keyring, lines):
    from mesh_test.nginx import passes_nginx_t, render
    conf = render(_block(lines), conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)
    passes_nginx_t(conf, conf_dir)


# ---------------------------------------------------------------- OIDC discovery

WELL_KNOWN = "/.well-known/openid-configuration"


def discovery_http(ks: KeyServer) -> str:
    base = ks.url("")
    ca = "ca=@TMP@/ca.pem"
    return f"""
mesh_keys_wait 2s;
mesh_provider idp {{
    issuer    {base};
    discovery on {ca};
    audience  aud-idp;
}}
mesh_provider impostor {{
    issuer    {base}/tenant-b;
    discovery on {ca};
}}
mesh_provider downgrade {{
    issuer    {base}/tenant-c;
    discovery on {ca};
}}
server {{
    listen 127.0.0.1:@PORT@;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    proxy_set_header X-Test-Caller   $mesh_caller;
    proxy_set_header X-Test-Provider $mesh_provider;
    mesh_auth idp impostor downgrade;
    location / {{ proxy_pass http://@UPSTREAM@; }}
}}
"""


@pytest.fixture(scope="module")
def idp(pki, signers):
    server = KeyServer(pki)
    base = server.url("")
    server.set(WELL_KNOWN, body=json.dumps({
        "issuer": base, "jwks_uri": server.url("/oauth/jwks"),
        "id_token_signing_alg_values_supported": ["RS256"]}).encode())
    server.set("/oauth/jwks", keys=[public_jwk(signers["r1"], "idp-1")], cache_control="max-age=600")
    # a document below another issuer that names the first one: its keys must not be taken
    server.set("/tenant-b" + WELL_KNOWN, body=json.dumps({
        "issuer": base, "jwks_uri": server.url("/oauth/jwks")}).encode())
    # a document that sends the keys over plain http
    server.set("/tenant-c" + WELL_KNOWN, body=json.dumps({
        "issuer": base + "/tenant-c", "jwks_uri": f"http://127.0.0.1:{server.port}/oauth/jwks"}).encode())
    yield server
    server.close()


@pytest.fixture(scope="module")
def discovered(module_path, launcher, idp, pki):
    site = launcher.start(discovery_http(idp), files={"ca.pem": pki.ca_pem})
    wait_until(lambda: [i for i in keys_info(site.ngx.read_error_log()) if i.provider == "idp"], 10)
    return site


def test_discovery_finds_the_keys_at_the_documents_jwks_uri(discovered, idp, signers):
    base = idp.url("")
    token = make_token("RS256", signers["r1"], claims(iss=base, aud="aud-idp", sub="repo:shop/orders"), kid="idp-1")
    resp = discovered.allowed("/d", bearer(token))
    assert resp.upstream_header("X-Test-Provider") == "idp"
    assert resp.upstream_header("X-Test-Caller") == "repo:shop/orders"
    # fetched before start, once for all workers: the document, then the keys
    assert idp.count(WELL_KNOWN) == 1 and idp.count("/oauth/jwks") == 1, idp.fetches()
    info = [i for i in keys_info(discovered.ngx.read_error_log()) if i.provider == "idp"]
    assert info[0].url == base + WELL_KNOWN and info[0].keys == 1 and info[0].refresh == 600, info


def test_a_discovery_document_naming_another_issuer_is_refused(discovered, idp, signers):
    log = discovered.ngx.read_error_log()
    warns = [l for l in log.splitlines() if "[warn]" in l and '"impostor"' in l]
    assert warns, log[-3000:]
    assert "names issuer" in warns[0] and "refused" in warns[0], warns[0]
    # the impostor has no keys: its tokens get 503 no_keys, never the other issuer's keys
    token = make_token("RS256", signers["r1"], claims(iss=idp.url("") + "/tenant-b", aud=None), kid="idp-1")
    resp = discovered.get("/d", bearer(token))
    assert resp.status == 503 and resp.header("X-Auth-Status") == "no_keys", resp
    assert resp.header("Retry-After"), resp
    # its document was read (and retried), the jwks_uri it names never fetched for it
    assert idp.count("/tenant-b" + WELL_KNOWN) >= 1
    assert idp.count("/oauth/jwks") == 1, idp.fetches()


def test_a_discovery_document_downgrading_the_keys_to_http_is_refused(discovered, idp, signers):
    log = discovered.ngx.read_error_log()
    warns = [l for l in log.splitlines() if "[warn]" in l and '"downgrade"' in l]
    assert warns and "is not an https:// URL" in warns[0], log[-3000:]
    token = make_token("RS256", signers["r1"], claims(iss=idp.url("") + "/tenant-c", aud=None), kid="idp-1")
    resp = discovered.get("/d", bearer(token))
    assert resp.status == 503 and resp.header("X-Auth-Status") == "no_keys", resp


BAD_DISCOVERY = [
    ("with-keys", "    issuer https://idp.example;\n    keys @KEYS@/jwks.json;\n    discovery on;  # BAD",
     ["cannot be combined"]),
    ("two-issuers", "    issuer https://a.example https://b.example;\n    discovery on;  # BAD",
     ["exactly one issuer"]),
    ("issuer-not-a-url", "    issuer accounts.example;\n    discovery on;  # BAD", ["https:// URL"]),
    ("maybe", "    issuer https://idp.example;\n    discovery maybe;  # BAD", ["maybe"]),
    ("twice", "    issuer https://idp.example;\n    discovery on;\n    discovery on;  # BAD", ["duplicate"]),
    ("ca-missing", "    issuer https://idp.example;\n    discovery on ca=@TMP@/no-such-ca.pem;  # BAD",
     ["no-such-ca.pem"]),
]


@pytest.mark.parametrize("lines,words", [c[1:] for c in BAD_DISCOVERY], ids=[c[0] for c in BAD_DISCOVERY])
def test_bad_discovery_lines_fail_nginx_t_at_the_line(module_path, conf_dir, keyring, lines, words):
    from mesh_test.nginx import emerg_at_marked_line, render
    conf = render(_block(lines), conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)
    emerg_at_marked_line(conf, conf_dir, words=words)


def test_discovery_of_an_http_issuer_passes_nginx_t_with_a_warning(module_path, conf_dir, keyring):
    from mesh_test.nginx import passes_nginx_t, render
    conf = render(_block("    issuer http://127.0.0.1:9;\n    discovery on;"), conf_dir, port=8,
                  upstream="127.0.0.1:9", keys=keyring.dir)
    out = passes_nginx_t(conf, conf_dir, warn_ok=True)
    assert [l for l in out.splitlines() if "[warn]" in l and "plain http://" in l], out


def test_discovered_keys_are_kept_across_a_reload(module_path, launcher_fn, pki, signers):
    server = KeyServer(pki)
    try:
        base = server.url("")
        server.set(WELL_KNOWN, body=json.dumps({"issuer": base, "jwks_uri": server.url("/k")}).encode())
        server.set("/k", keys=[public_jwk(signers["r2"], "idp-2")])
        body = f"""
mesh_provider idp {{
    issuer    {base};
    discovery on ca=@TMP@/ca.pem;
}}
server {{
    listen 127.0.0.1:@PORT@;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    mesh_auth idp;
    location / {{ proxy_pass http://@UPSTREAM@; }}
}}
"""
        site = launcher_fn.start(body, files={"ca.pem": pki.ca_pem})
        token = make_token("RS256", signers["r2"], claims(iss=base, aud=None), kid="idp-2")
        site.allowed("/r", bearer(token))
        assert (server.count(WELL_KNOWN), server.count("/k")) == (1, 1), server.fetches()
        # the issuer goes away: a reload keeps the keys from the shared zone, fetching nothing
        server.down()
        site.ngx.reload()
        site.allowed("/r", bearer(token))
        assert (server.count(WELL_KNOWN), server.count("/k")) == (1, 1), server.fetches()
    finally:
        server.close()
