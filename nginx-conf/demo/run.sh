#!/usr/bin/env bash
# Runs the demo: demo keys, demo tokens, nginx with the module on 127.0.0.1:8080 and a demo
# upstream on 127.0.0.1:8081. Prints curl lines to try, then runs nginx in the foreground.
# Usage: run.sh MODULE.so
set -euo pipefail
module=$(realpath "${1:?usage: run.sh MODULE.so}")
here=$(cd "$(dirname "$0")" && pwd)
dir=$(realpath "$here/../../target/demo")
mkdir -p "$dir/tmp"
[ -f "$dir/demo-key.pem" ] || openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$dir/demo-key.pem" 2>/dev/null
openssl pkey -in "$dir/demo-key.pem" -pubout -out "$dir/demo-keys.pem"
sed -e "s|@MODULE@|$module|" -e "s|@DIR@|$dir|g" "$here/nginx.conf.in" > "$dir/nginx.conf"

now=$(date +%s)
mint() { "$here/mint-token.sh" "$dir/demo-key.pem" demo-1 "$1"; }
good=$(mint "{\"iss\":\"https://issuer.demo.local\",\"aud\":\"https://orders.demo.local\",\"sub\":\"checkout@shop.demo\",\"iat\":$now,\"exp\":$((now + 3600))}")
expired=$(mint "{\"iss\":\"https://issuer.demo.local\",\"aud\":\"https://orders.demo.local\",\"sub\":\"checkout@shop.demo\",\"iat\":$((now - 7200)),\"exp\":$((now - 3600))}")
wrong_aud=$(mint "{\"iss\":\"https://issuer.demo.local\",\"aud\":\"https://billing.demo.local\",\"sub\":\"checkout@shop.demo\",\"iat\":$now,\"exp\":$((now + 3600))}")

cat <<MSG
ngx-mesh demo: nginx with the module on http://127.0.0.1:8080 (Ctrl-C stops it)
Try, in another terminal:

  # 200: a valid token; the upstream names the caller
  curl -i -H 'Authorization: Bearer $good' http://127.0.0.1:8080/orders/42

  # 401: no token (WWW-Authenticate: Bearer realm="mesh")
  curl -i http://127.0.0.1:8080/orders/42

  # 401: expired token (error="invalid_token", error_description="token expired")
  curl -i -H 'Authorization: Bearer $expired' http://127.0.0.1:8080/orders/42

  # 401: token for another audience
  curl -i -H 'Authorization: Bearer $wrong_aud' http://127.0.0.1:8080/orders/42

  # 200 without a token: the health check is exempt
  curl -i http://127.0.0.1:8080/healthz

MSG
nginx -t -q -p "$dir" -c "$dir/nginx.conf"
exec nginx -p "$dir" -c "$dir/nginx.conf"
