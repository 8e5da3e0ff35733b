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
reader=$(mint "{\"iss\":\"https://issuer.demo.local\",\"aud\":\"https://orders.demo.local\",\"sub\":\"reporting@shop.demo\",\"iat\":$now,\"exp\":$((now + 3600))}")
wrong_aud=$(mint "{\"iss\":\"https://issuer.demo.local\",\"aud\":\"https://billing.demo.local\",\"sub\":\"checkout@shop.demo\",\"iat\":$now,\"exp\":$((now + 3600))}")

cat <<MSG
ngx-mesh demo: nginx with the module on http://127.0.0.1:8080 (Ctrl-C stops it)
Callers: checkout@shop.demo (role writers: any method), reporting@shop.demo (GET only).
Try, in another terminal:

  # 200: a valid token; the upstream names the caller and gets traceparent / X-Cloud-Trace-Context
  curl -i -H 'Authorization: Bearer $good' http://127.0.0.1:8080/orders/42

  # 200 continuing your trace: same trace id upstream, a new span for this hop
  curl -i -H 'Authorization: Bearer $good' -H 'traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01' http://127.0.0.1:8080/orders/42

  # 401: no token (WWW-Authenticate: Bearer realm="mesh")
  curl -i http://127.0.0.1:8080/orders/42

  # 401: expired token (error="invalid_token", error_description="token expired")
  curl -i -H 'Authorization: Bearer $expired' http://127.0.0.1:8080/orders/42

  # 401: a token for another audience
  curl -i -H 'Authorization: Bearer $wrong_aud' http://127.0.0.1:8080/orders/42

  # 403: reporting@shop.demo may only GET
  curl -i -X POST -H 'Authorization: Bearer $reader' http://127.0.0.1:8080/orders/42

  # 429: rate=2r/s burst=3 per caller -- the 5th request at once is refused (RateLimit headers, Retry-After)
  for i in 1 2 3 4 5; do curl -s -o /dev/null -w '%{http_code} ' -H 'Authorization: Bearer $reader' http://127.0.0.1:8080/orders/42; done; echo

  # 200 without a token: the health check is exempt
  curl -i http://127.0.0.1:8080/healthz

MSG
nginx -t -q -p "$dir" -c "$dir/nginx.conf"
exec nginx -p "$dir" -c "$dir/nginx.conf"
