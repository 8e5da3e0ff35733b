#!/bin/sh
# The image's entrypoint: renders nginx.conf from the environment, checks it, runs nginx in
# the foreground, and turns Cloud Run's stop signal (SIGTERM) into nginx's graceful shutdown
# (SIGQUIT), so in-flight requests finish; anything still running after 9 s is stopped.
set -eu
: "${PORT:=8080}"
: "${MESH_AUDIENCE:?set MESH_AUDIENCE to this service's URL (the audience of its ID tokens)}"
: "${MESH_UPSTREAM:=http://127.0.0.1:8081}"
: "${MESH_ALLOWED_CALLERS:=}"
: "${MESH_RATE:=100r/s}"
: "${MESH_BURST:=200}"
: "${MESH_RATE_ZONE_SIZE:=10m}"
: "${MESH_PLATFORM_VERIFIED:=off}"
: "${MESH_HEALTH_PATH:=/healthz}"
: "${MESH_WORKERS:=auto}"
: "${MESH_ERROR_LOG_LEVEL:=warn}"
: "${MESH_CONFIG_VERSION:=image}"
if [ -n "$MESH_ALLOWED_CALLERS" ]; then
    # Space-separated principals or patterns (`*@shop.iam.gserviceaccount.com`, `~REGEX`).
    MESH_ALLOW_RULE="mesh_allow $MESH_ALLOWED_CALLERS;"
else
    MESH_ALLOW_RULE="# any verified caller (MESH_ALLOWED_CALLERS unset)"
fi
export PORT MESH_AUDIENCE MESH_UPSTREAM MESH_ALLOW_RULE MESH_RATE MESH_BURST MESH_RATE_ZONE_SIZE \
    MESH_PLATFORM_VERIFIED MESH_HEALTH_PATH MESH_WORKERS MESH_ERROR_LOG_LEVEL MESH_CONFIG_VERSION
conf=/tmp/nginx/nginx.conf
envsubst "$(env | sed -n 's/^\(PORT\|MESH_[A-Z_]*\)=.*/${\1}/p' | tr '\n' ' ')" \
    < /etc/nginx/mesh/nginx.conf.template > "$conf"
nginx -t -q -c "$conf"
nginx -c "$conf" -g 'daemon off;' &
pid=$!
trap 'kill -QUIT "$pid" 2>/dev/null; (sleep 9; kill -TERM "$pid" 2>/dev/null) & wait "$pid"; exit 0' TERM INT
wait "$pid"
