#!/usr/bin/env bash
# Regenerates the test keys (run once; the outputs are committed).
# Needs the openssl CLI and python3 (stdlib only, to write jwks.json).
set -euo pipefail
cd "$(dirname "$0")"

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out rsa.key
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out rsa2.key
# A key too small for the verifier (refused at load).
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024 | openssl pkey -pubout > rsa1024.pub.pem
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ec256.key
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out ec384.key
openssl genpkey -algorithm ED25519 -out ed25519.key
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-521 -out p521.key
# Public keys of types we do not support (must be skipped).
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:secp256k1 | openssl pkey -pubout -out k256.pub.pem
openssl genpkey -algorithm X25519 | openssl pkey -pubout -out x25519.pub.pem
for k in rsa rsa2 ec256 ec384 p521 ed25519; do
    openssl pkey -in "$k.key" -pubout -out "$k.pub.pem"
done
# PKCS#1 "RSA PUBLIC KEY" (not supported: only SPKI "PUBLIC KEY").
openssl rsa -in rsa.key -RSAPublicKey_out -out rsa.pkcs1.pem
openssl req -new -x509 -key rsa.key -subj "/CN=ngx-mesh test RSA" -days 36500 -out rsa.crt
openssl req -new -x509 -key ec256.key -subj "/CN=ngx-mesh test P-256" -days 36500 -out ec256.crt

# jwks.json: the public keys above (kids rsa1 ec256 ec384 ed1 p521) plus keys that
# must be skipped (use=enc, kty=oct, crv=secp256k1, crv=X25519).
python3 - <<'PY'
import base64, json, subprocess

def der(name):
    return subprocess.run(["openssl", "pkey", "-pubin", "-in", name, "-outform", "DER"],
                          check=True, capture_output=True).stdout

def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

def rsa(name):
    out = subprocess.run(["openssl", "rsa", "-pubin", "-in", name, "-noout", "-modulus"],
                         check=True, capture_output=True, text=True).stdout
    n = bytes.fromhex(out.strip().split("=", 1)[1])
    return {"kty": "RSA", "n": b64(n), "e": "AQAB"}

def ec(name, crv, size):
    point = der(name)[-(1 + 2 * size):]
    assert point[0] == 4
    return {"kty": "EC", "crv": crv, "x": b64(point[1:1 + size]), "y": b64(point[1 + size:])}

keys = [
    dict(rsa("rsa.pub.pem"), kid="rsa1", use="sig"),
    dict(ec("ec256.pub.pem", "P-256", 32), kid="ec256", alg="ES256"),
    dict(ec("ec384.pub.pem", "P-384", 48), kid="ec384"),
    {"kty": "OKP", "crv": "Ed25519", "x": b64(der("ed25519.pub.pem")[-32:]), "kid": "ed1"},
    dict(rsa("rsa2.pub.pem"), kid="enc1", use="enc"),
    {"kty": "oct", "k": b64(b"0123456789abcdef0123456789abcdef"), "kid": "oct1"},
    dict(ec("p521.pub.pem", "P-521", 66), kid="p521"),
    {"kty": "EC", "crv": "secp256k1", "x": b64(bytes(32)), "y": b64(bytes(32)), "kid": "k256"},
    {"kty": "OKP", "crv": "X25519", "x": b64(bytes(32)), "kid": "x1"},
]
with open("jwks.json", "w") as f:
    json.dump({"keys": keys}, f, indent=2)
    f.write("\n")
PY
