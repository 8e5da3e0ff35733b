"""Bad configurations fail `nginx -t` with an [emerg] naming the file, the line and what is wrong."""

from __future__ import annotations

import pytest

from mesh_test.configs import identity_http
from mesh_test.nginx import emerg_at_marked_line, passes_nginx_t, render

GOOD = """
mesh_provider good {
    issuer https://good.mesh.test;
    keys   @KEYS@/jwks.json;
}
"""


def server(inner: str) -> str:
    return "server {\n    listen 127.0.0.1:@PORT@;\n" + inner + "\n    location / { return 204; }\n}\n"


# (id, http body with "# BAD" on the line nginx must report, words of which one must be in that
#  [emerg] line, extra files to write into the config directory)
CASES = [
    ("unknown-provider-in-mesh_auth",
     GOOD + server("    mesh_auth good nosuchprovider;  # BAD"), ["nosuchprovider"], {}),
    ("mesh_auth-without-providers",
     GOOD + server("    mesh_auth;  # BAD"), ["mesh_auth"], {}),
    ("mesh_auth-optional-without-providers",
     GOOD + server("    mesh_auth optional;  # BAD"), ["mesh_auth", "optional"], {}),
    ("unknown-provider-in-location",
     GOOD + "server {\n    listen 127.0.0.1:@PORT@;\n    location / {\n        mesh_auth ghost;  # BAD\n    }\n}\n",
     ["ghost"], {}),
    ("key-file-missing", """
mesh_provider p {
    issuer https://p.mesh.test;
    keys   @TMP@/no-such-dir/jwks.json;  # BAD
}
""", ["no-such-dir/jwks.json"], {}),
    ("key-file-garbage", """
mesh_provider p {
    issuer https://p.mesh.test;
    keys   @KEYS@/garbage.pem;  # BAD
}
""", ["garbage.pem"], {}),
    ("jwks-rsa-key-without-modulus", """
mesh_provider p {
    issuer https://p.mesh.test;
    keys   @TMP@/broken-jwks.json;  # BAD
}
""", ["broken-jwks.json"], {"broken-jwks.json": '{"keys":[{"kty":"RSA","kid":"k1","e":"AQAB"}]}'}),
    ("secret-file-missing", """
mesh_provider p {
    issuer https://p.mesh.test;
    secret @TMP@/no-such-secret;  # BAD
}
""", ["no-such-secret"], {}),
    ("unknown-algorithm", """
mesh_provider p {
    issuer     https://p.mesh.test;
    keys       @KEYS@/jwks.json;
    algorithms RS256 RS257;  # BAD
}
""", ["RS257"], {}),
    ("algorithm-none", """
mesh_provider p {
    issuer     https://p.mesh.test;
    keys       @KEYS@/jwks.json;
    algorithms none;  # BAD
}
""", ['"none"', " none", "none"], {}),
    ("secret-together-with-keys", """
mesh_provider p {
    issuer https://p.mesh.test;
    keys   @KEYS@/jwks.json;
    secret @KEYS@/hmac.secret;  # BAD
}
""", ["secret", "keys"], {}),
    ("hs256-without-secret", """
mesh_provider p {
    issuer     https://p.mesh.test;
    keys       @KEYS@/jwks.json;
    algorithms RS256 HS256;  # BAD
}
""", ["HS256"], {}),
    ("rs256-with-secret", """
mesh_provider p {
    issuer     https://p.mesh.test;
    secret     @KEYS@/hmac.secret;
    algorithms RS256;  # BAD
}
""", ["RS256"], {}),
    ("leeway-not-a-time", """
mesh_provider p {
    issuer https://p.mesh.test;
    keys   @KEYS@/jwks.json;
    leeway abc;  # BAD
}
""", ["abc", "leeway"], {}),
    ("unknown-directive-in-provider", """
mesh_provider p {
    issuer https://p.mesh.test;
    keys   @KEYS@/jwks.json;
    colour blue;  # BAD
}
""", ["colour"], {}),
    ("issuer-without-value", """
mesh_provider p {
    issuer;  # BAD
    keys   @KEYS@/jwks.json;
}
""", ["issuer"], {}),
    ("duplicate-provider-name", """
mesh_provider twice {
    issuer https://a.mesh.test;
    keys   @KEYS@/jwks.json;
}
mesh_provider twice {  # BAD
    issuer https://b.mesh.test;
    keys   @KEYS@/jwks.json;
}
""", ["twice"], {}),
    ("require-without-equals", """
mesh_provider p {
    issuer  https://p.mesh.test;
    keys    @KEYS@/jwks.json;
    require groups;  # BAD
}
""", ["groups", "require"], {}),
    ("require-with-empty-claim", """
mesh_provider p {
    issuer  https://p.mesh.test;
    keys    @KEYS@/jwks.json;
    require =admins;  # BAD
}
""", ["=admins", "require"], {}),
    ("token-cache-negative",
     GOOD + "mesh_token_cache -1;  # BAD\n", ["-1", "mesh_token_cache"], {}),
    ("token-cache-not-a-number",
     GOOD + "mesh_token_cache lots;  # BAD\n", ["lots", "mesh_token_cache"], {}),
    ("mesh_provider-inside-server",
     server("    mesh_provider inner {  # BAD\n        issuer https://i.mesh.test;\n"
            "        keys @KEYS@/jwks.json;\n    }"), ["mesh_provider"], {}),
    ("mesh_token_cache-inside-server",
     GOOD + server("    mesh_token_cache 10;  # BAD"), ["mesh_token_cache"], {}),
    ("mesh_config_version-inside-location",
     GOOD + "server {\n    listen 127.0.0.1:@PORT@;\n    location / {\n        mesh_config_version v1;  # BAD\n"
            "    }\n}\n", ["mesh_config_version"], {}),
]

# A provider block missing a required line: the [emerg] may point at the block's first line or its
# closing brace (both are "the provider"), nothing else.
BLOCK_CASES = [
    ("provider-without-issuer", """
mesh_provider noissuer {  # BAD
    keys @KEYS@/jwks.json;
}  # END
""", ["issuer"]),
    ("provider-without-keys-or-secret", """
mesh_provider nokeys {  # BAD
    issuer https://nokeys.mesh.test;
    audience orders;
}  # END
""", ["keys", "secret"]),
]


def _render(body: str, conf_dir, keyring) -> str:
    return render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)


@pytest.mark.parametrize("body,words,files", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_fails_nginx_t_naming_file_line_and_cause(module_path, conf_dir, keyring, body, words, files):
    for name, content in files.items():
        (conf_dir / name).write_text(content)
    emerg_at_marked_line(_render(body, conf_dir, keyring), conf_dir, words=words)


@pytest.mark.parametrize("body,words", [c[1:] for c in BLOCK_CASES], ids=[c[0] for c in BLOCK_CASES])
def test_incomplete_provider_fails_nginx_t_naming_the_provider(module_path, conf_dir, keyring, body, words):
    emerg_at_marked_line(_render(body, conf_dir, keyring), conf_dir, words=words, or_marker="# END")


def test_the_full_test_configuration_passes_nginx_t(module_path, conf_dir, keyring):
    passes_nginx_t(_render(identity_http(), conf_dir, keyring), conf_dir)


def test_mesh_auth_in_a_server_block_naming_a_provider_passes_nginx_t(module_path, conf_dir, keyring):
    body = GOOD + server("    mesh_auth good;\n    mesh_realm orders;\n    mesh_audience a b;")
    passes_nginx_t(_render(body, conf_dir, keyring), conf_dir)


def test_mesh_provider_options_all_together_pass_nginx_t(module_path, conf_dir, keyring):
    body = """
mesh_provider all {
    issuer     https://all.mesh.test accounts.mesh.test;
    keys       @KEYS@/rsa.cert.pem;
    audience   a1 a2;
    algorithms RS256 PS256;
    leeway     1m;
    principal  email;
    require    email_verified=true google.compute_engine.project_id=p1;
}
mesh_provider mac {
    issuer     https://mac.mesh.test;
    secret     @KEYS@/hmac.secret;
    algorithms HS256 HS512;
}
mesh_token_cache off;
mesh_config_version "v 1";
""" + server("    mesh_auth optional all mac;\n    mesh_token $cookie_id_token;\n"
             "    location /x { mesh_auth off; }")
    passes_nginx_t(_render(body, conf_dir, keyring), conf_dir)
