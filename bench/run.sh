#!/usr/bin/env bash
# The benchmark: stock nginx against nginx with ngx-mesh, in one run, on loopback.
#
#   bench/run.sh MODULE.so          (make bench builds the module and calls this)
#
# Variants, each served by one nginx worker (the same /usr/sbin/nginx binary):
#   stock   the module not loaded; a 100-byte static file
#   cached  load_module + `mesh_auth demo;` on that location, one RS256 token on every
#           request (the worker's token cache hits)
#   rs256   10 000 distinct RS256 tokens in turn: more than `mesh_token_cache 4096` holds, so
#           the LRU misses on every request and each request is a signature check
#   es256   the same with ES256 tokens
#   full    the cached token on a location with everything on: identity, RBAC (10 rules, a
#           regex and claim rules among them, the last one matching), a rate limit that never
#           refuses, mesh_trace with mesh_trace_response
#   rbac10, rbac1000  the cached token, RBAC only: 10 rules, or 1 000 (a regex, a claim
#           rule, exact principals), the caller's exact principal the last rule
#   zone100, zone1m   no token; a never-refusing rate limit keyed by the Authorization header,
#           cycling through 100 keys, or through 1 000 000 keys in an equal zone that holds
#           them all (filled before the rounds)
# and verify_rate (core/examples/verify_rate.rs): one core's verifications per second; its
# `awslc` line (aws-lc-rs on a key parsed once) is the raw cost of the crypto, from which the
# ideal of the rotating variants is computed.
# Then (BENCH_RSS_TOKENS > 0) the memory check: that many distinct HS256 tokens, once each,
# through the worker; its RSS after the first 5 % and at the end.
# Besides wrk's requests/s, each run records the nginx worker's CPU time per request (from
# /proc/PID/schedstat), which other load on a shared machine disturbs far less.
#
# ROUNDS rounds, each running every variant for DURATION seconds (the order rotating from
# round to round) and verify_rate once, so drift hits all of them alike; the medians go into
# a table (printed, and written to bench/results.md). Every wrk run must see 200s only: any
# 4xx/5xx response or socket error fails the run. About two minutes in all.
#
# Environment (optional): NGINX_BIN (default /usr/sbin/nginx), BENCH_ROUNDS (5),
# BENCH_DURATION (3), BENCH_CONNECTIONS (32), BENCH_TOKENS (10000), BENCH_ZONE_KEYS (1000000),
# BENCH_RSS_TOKENS (1000000; 0 skips the memory check), BENCH_VERIFY_SECS (1), BENCH_VARIANTS (all), BENCH_RESULTS
# (bench/results.md), BENCH_RATIOS (a file to write the ratios to), BENCH_KEEP=1 (keep the temp dir: configs, tokens, error logs, wrk
# output).
set -euo pipefail

module=$(realpath "${1:?usage: run.sh MODULE.so}")
[ -f "$module" ] || { echo "run.sh: $module: no such file" >&2; exit 1; }
bench=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$bench")
nginx=${NGINX_BIN:-/usr/sbin/nginx}
rounds=${BENCH_ROUNDS:-5}
duration=${BENCH_DURATION:-3}
connections=${BENCH_CONNECTIONS:-32}
ntokens=${BENCH_TOKENS:-10000}
zone_keys=${BENCH_ZONE_KEYS:-1000000}
rss_tokens=${BENCH_RSS_TOKENS:-1000000}
results=${BENCH_RESULTS:-$bench/results.md}
threads=1
verify_secs=${BENCH_VERIFY_SECS:-1}
issuer=https://bench.local
audience=bench
cache_size=4096 # mesh_token_cache (the default)
read -r -a variants <<< "${BENCH_VARIANTS:-stock cached full rs256 es256 nocache rbac10 rbac1000 zone100 zone1m proxy egress}"

# Cycling through N tokens, an LRU of C entries misses on every request only if N > C.
[ "$ntokens" -gt "$cache_size" ] ||
    { echo "run.sh: BENCH_TOKENS must exceed the token cache ($cache_size)" >&2; exit 1; }

for tool in wrk curl "$nginx"; do
    command -v "$tool" >/dev/null || { echo "run.sh: $tool not found (make deps)" >&2; exit 1; }
done

# --- Cleanup: every process this script started, by pid; the temp dir unless BENCH_KEEP=1.
# (Under target/ where nginx's workers can reach it, not /tmp: nothing else sweeps it while a
# run is under way.)
mkdir -p "$root/target/bench"
work=$(mktemp -d "$root/target/bench/run.XXXXXX")
chmod 755 "$work" # nginx's workers run as nobody when started as root
# ...and must reach the files they serve: a checkout inside a private directory (a
# `mktemp -d`, mode 0700) cannot be reached, so the run goes to /tmp instead.
if [ "$(id -u)" = 0 ] && ! runuser -u nobody -- test -x "$work" 2>/dev/null; then
    rmdir "$work"
    work=$(mktemp -d /tmp/ngx-mesh-bench.XXXXXX)
    chmod 755 "$work"
fi
nginx_pids=() # nginx masters (they stop their workers)
bg_pid=""     # the wrk or verify_rate running now, if any
exec 3>&2     # the script's stderr, for cleanup's word (a signal may come while 2 is redirected)
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in $bg_pid "${nginx_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in $bg_pid "${nginx_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "${BENCH_KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then
        echo "run.sh: files kept in $work" >&3
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { echo "run.sh: FAILED: $*" >&2; exit 1; }

# Run a command in the background and wait for it, so the trap can stop it at any moment.
run_bg() {
    local rc=0
    "$@" &
    bg_pid=$!
    wait "$bg_pid" || rc=$?
    bg_pid=""
    return "$rc"
}

# --- CPU placement: with two or more cores, nginx's worker gets core 0 and wrk core 1;
# verify_rate runs on core 0 too, the core it stands in for.
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    pin_nginx="worker_cpu_affinity 01;"
    pin_upstream="worker_cpu_affinity 10;"
    pin_server=(taskset -c 0)
    pin_client=(taskset -c 1)
    placement="nginx worker pinned to CPU 0 (verify_rate too), wrk, the egress rows' upstream nginx and the loopback OTLP receiver to CPU 1"
else
    pin_nginx=""; pin_upstream=""; pin_server=(); pin_client=()
    placement="no CPU pinning"
fi

# --- Python with `cryptography`: the project's venv, the system's, or a private one.
python=""
for py in "$root/.venv/bin/python" python3; do
    if "$py" -c 'import cryptography' 2>/dev/null; then python=$py; break; fi
done
if [ -z "$python" ]; then
    echo "== creating a Python venv with cryptography in $work/venv"
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" install -q "$(grep -i '^cryptography' "$root/tests/requirements.txt")"
    python=$work/venv/bin/python
fi

# --- The module under test, copied: a rebuild during the run (make build copies over the .so
# in place) must not change or break what the running nginx has mapped.
cp "$module" "$work/ngx_http_mesh_module.so"
module_copy=$work/ngx_http_mesh_module.so

# --- Material: keys, tokens, the static file.
echo "== minting keys, $ntokens RS256 + $ntokens ES256 tokens, $rss_tokens HS256 tokens"
"$python" "$bench/mint.py" "$work/keys" "$ntokens" "$rss_tokens"
chmod -R a+rX "$work/keys"
mkdir -p "$work/www"
head -c 99 /dev/zero | tr '\0' 'x' > "$work/www/hello.txt"
echo >> "$work/www/hello.txt" # 100 bytes
chmod -R a+rX "$work/www"

echo "== building core/examples/verify_rate.rs"
run_bg cargo build -q --release --locked --manifest-path "$root/Cargo.toml" -p mesh-core \
    --example verify_rate
verify_rate=${CARGO_TARGET_DIR:-$root/target}/release/examples/verify_rate

# --- nginx: two instances of the same binary, one without the module and one with it.
free_port() {
    "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# write_conf DIR PORT MODE: MODE `stock` (the module not loaded), `mesh` (loaded, every
# location of the bench), `nocache` (as `mesh` with `mesh_token_cache off`: every request a
# signature check, the shape of the peers without a cache) or `upstream` (the static file
# only: what the egress rows proxy to). `stock` and `mesh` have the same locations, so that
# nginx's own location lookup costs both the same.
write_conf() {
    local dir=$1 port=$2 mode=$3 load="" mesh_http="" on=""
    local caller
    caller=$(printf 'svc-rs-%05d@bench.local' "$ntokens") # the cached token's sub
    if [ "$mode" = mesh ] || [ "$mode" = nocache ]; then
        on=1
        load="load_module $module_copy;"
        mesh_http="mesh_provider demo {
        issuer $issuer;
        keys $work/keys/jwks.json;
        audience $audience;
    }
    mesh_provider hs {
        issuer https://hs.bench.local;
        secret $work/keys/hs.secret;
        audience $audience;
    }
    mesh_token_cache $([ "$mode" = nocache ] && echo off || echo "$cache_size");
    mesh_rate_limit_zone bench 10m;
    mesh_rate_limit_zone z100 80m;
    mesh_rate_limit_zone z1m 80m;
    mesh_role readers svc-rs-*@bench.local;
    mesh_trace_export http://127.0.0.1:$port_otlp/v1/traces;
    mesh_trace_service bench;
    mesh_metadata_server http://127.0.0.1:$port_metadata;
    mesh_outbound_token \$upstream_token https://upstream.bench.local;"
    fi
    # location PATH DIRECTIVES...: the static file under PATH, with the module's directives
    # only where the module is loaded.
    location() {
        local path=$1; shift
        echo "location $path { alias $work/www/; ${on:+$*} }"
    }
    # RBAC alone at two sizes: a regex, a claim rule, then exact principals, the caller's
    # the last of all.
    rbac_rules() { # rbac_rules N
        echo "mesh_deny ~^blocked-;"
        echo "mesh_deny claim:tier=banned;"
        for ((k = 3; k < $1; k++)); do echo "mesh_allow other-$k@bench.local;"; done
        echo "mesh_allow $caller;"
    }
    local locations
    if [ "$mode" = upstream ]; then
        locations=""
    else
        # full: nine rules that do not match the caller, then the one that does; a rate
        # limit that never refuses; the trace, sampled, every span exported; the request
        # counted by caller in mesh_status (always on).
        locations="location / { ${on:+mesh_auth demo;} }
        $(location /full/ 'mesh_auth demo;
            mesh_deny ~^blocked- role:nobody claim:tier=banned;
            mesh_allow admin@bench.local methods=DELETE;
            mesh_allow role:nobody;
            mesh_allow claim:tier=gold methods=POST;
            mesh_allow ~^batch-.*@other\\.local$;
            mesh_allow ops-*@bench.local methods=PUT,PATCH;
            mesh_deny anonymous;
            mesh_allow claim:team=payments;
            mesh_allow svc-es-*@bench.local methods=POST;
            mesh_allow role:readers methods=GET,HEAD;
            mesh_rate_limit zone=bench rate=1000000r/s burst=1000000;
            mesh_trace on;
            mesh_trace_sample 1;
            mesh_trace_response on;')
        $(location /rbac10/ "mesh_auth demo; $(rbac_rules 10)")
        $(location /rbac1000/ "mesh_auth demo; $(rbac_rules 1000)")
        $(location /zone100/ 'mesh_rate_limit zone=z100 rate=1000000r/s burst=1000000 key=$http_authorization;')
        $(location /zone1m/ 'mesh_rate_limit zone=z1m rate=1000000r/s burst=1000000 key=$http_authorization;')
        $(location /rss/ 'mesh_auth hs;')
        location = /proxy/hello.txt { proxy_pass http://bench_upstream/hello.txt; }
        location = /egress/hello.txt {
            ${on:+mesh_outbound_auth \$upstream_token;}
            proxy_pass http://bench_upstream/hello.txt;
        }
        location = /metrics { ${on:+mesh_auth off; mesh_status;} }"
    fi
    mkdir -p "$dir/tmp"
    cat > "$dir/nginx.conf" <<CONF
# Written by bench/run.sh.
$load
worker_processes 1;
$([ "$mode" = upstream ] && echo "$pin_upstream" || echo "$pin_nginx")
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }

http {
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    default_type text/plain;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    $mesh_http
    # The egress rows' upstream, over kept-alive connections (as a route of the image).
    upstream bench_upstream {
        server 127.0.0.1:$port_upstream;
        keepalive 64;
    }
    proxy_http_version 1.1;
    proxy_set_header Connection "";

    server {
        listen 127.0.0.1:$port;
        root $work/www;
        $locations
    }
}
CONF
}

declare -A master worker # per instance (stock, mesh): the master's and the worker's pid

# The instance's worker pid (one worker; nginx's master is our child).
worker_of() { pgrep -P "${master[$1]}" | head -n1; }

start_nginx() { # start_nginx INSTANCE PORT
    local dir=$work/$1
    "$nginx" -t -q -p "$dir" -c "$dir/nginx.conf" || fail "nginx -t for $dir/nginx.conf"
    "$nginx" -p "$dir" -c "$dir/nginx.conf" 2>>"$dir/error.log" &
    master[$1]=$!
    nginx_pids+=("$!")
    for _ in $(seq 100); do
        if curl -s -o /dev/null "http://127.0.0.1:$2/"; then
            worker[$1]=$(worker_of "$1")
            return 0
        fi
        sleep 0.1
    done
    fail "nginx in $dir did not answer on port $2"
}

# Nanoseconds the process has run on a CPU (the scheduler's own count, not ticks).
# Every thread of it: the span exporter's and key fetchers' too.
cpu_ns() { cat "/proc/$1"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f", s }'; }

# The loopback OTLP receiver and metadata server (bench/loopback.py), on wrk's core.
"${pin_client[@]}" "$python" "$bench/loopback.py" "$work/loopback.ports" > "$work/loopback.out" 2>&1 &
loopback_pid=$!
nginx_pids+=("$loopback_pid")
for _ in $(seq 100); do [ -f "$work/loopback.ports" ] && break; sleep 0.1; done
read -r port_otlp port_metadata < "$work/loopback.ports" || fail "bench/loopback.py did not start"

declare -A port
for inst in stock mesh nocache upstream; do
    port[$inst]=$(free_port)
done
[ "$(printf '%s\n' "${port[@]}" | sort -u | wc -l)" = 4 ] || fail "free_port gave one port twice; run again"
port_upstream=${port[upstream]}
for inst in upstream stock mesh nocache; do
    write_conf "$work/$inst" "${port[$inst]}" "$inst"
done
start_nginx upstream "${port[upstream]}"
start_nginx stock "${port[stock]}"
start_nginx mesh "${port[mesh]}"
[[ " ${variants[*]} " != *" nocache "* ]] || start_nginx nocache "${port[nocache]}"

declare -A url tokens instance script
instance=([stock]=stock [cached]=mesh [rs256]=mesh [es256]=mesh [full]=mesh [rbac10]=mesh
    [rbac1000]=mesh [zone100]=mesh [zone1m]=mesh [rss]=mesh [proxy]=stock [egress]=mesh
    [nocache]=nocache)
url[stock]=http://127.0.0.1:${port[stock]}/hello.txt
url[cached]=http://127.0.0.1:${port[mesh]}/hello.txt
url[rs256]=${url[cached]}
url[es256]=${url[cached]}
url[nocache]=http://127.0.0.1:${port[nocache]}/hello.txt
url[full]=http://127.0.0.1:${port[mesh]}/full/hello.txt
for v in rbac10 rbac1000 zone100 zone1m rss; do url[$v]=http://127.0.0.1:${port[mesh]}/$v/hello.txt; done
url[proxy]=http://127.0.0.1:${port[stock]}/proxy/hello.txt
url[egress]=http://127.0.0.1:${port[mesh]}/egress/hello.txt
tokens[stock]=$work/keys/cached.txt # the same header as `cached`; stock nginx ignores it
tokens[cached]=$work/keys/cached.txt
tokens[rs256]=$work/keys/rs256.txt
tokens[es256]=$work/keys/es256.txt
tokens[full]=$work/keys/cached.txt
tokens[rbac10]=$work/keys/cached.txt
tokens[rbac1000]=$work/keys/cached.txt
tokens[rss]=$work/keys/hs256.txt
tokens[nocache]=$work/keys/cached.txt # one token, verified on every request
tokens[proxy]=- # an app's own call: no credentials of its own (bench/tokens.lua)
tokens[egress]=-
for v in "${!instance[@]}"; do script[$v]="$bench/tokens.lua"; done
# The zone variants: keys.lua's arguments (how many keys; where to start) instead of a file.
script[zone100]="$bench/keys.lua"; tokens[zone100]=100
script[zone1m]="$bench/keys.lua"; tokens[zone1m]=$zone_keys

# --- Sanity: the module refuses a request without a token, and every variant's token
# (the first of each file) gets the file.
expect() { # expect CODE URL [TOKEN]
    local got
    got=$(curl -s -o "$work/body" -w '%{http_code}' ${3:+-H "Authorization: Bearer $3"} "$2")
    [ "$got" = "$1" ] || fail "GET $2 ${3:+(with a token) }gave $got, expected $1" \
        "(see the error.log files in $work)"
    if [ "$1" = 200 ]; then cmp -s "$work/body" "$work/www/hello.txt" || fail "GET $2: wrong body"; fi
}
expect 200 "${url[stock]}"
expect 401 "${url[cached]}"
for v in "${variants[@]}"; do
    case $v in
        zone*) expect 200 "${url[$v]}" k1 ;;
        proxy | egress) expect 200 "${url[$v]}" ;;
        *) expect 200 "${url[$v]}" "$(head -n1 "${tokens[$v]}")" ;;
    esac
done
[ "$rss_tokens" = 0 ] || expect 200 "${url[rss]}" "$(head -n1 "${tokens[rss]}")"

# --- Measurements.
runs=$work/runs.tsv
: > "$runs"

# bench_wrk ROUND VARIANT SECONDS: one wrk run. Records (unless ROUND is "warmup") the
# requests/s, and the nginx worker's CPU time per request and busy share during the run.
bench_wrk() {
    local out=$work/wrk-$1-$2.txt inst=${instance[$2]} line kv cpu0 cpu1
    [ "$(worker_of "$inst")" = "${worker[$inst]}" ] ||
        fail "the $inst nginx worker was replaced (a crash?): see $work/$inst/error.log"
    cpu0=$(cpu_ns "${worker[$inst]}")
    # tokens.lua: the file, wrk's threads, where to start; keys.lua: how many keys, where.
    local extra=("$threads" "${4:-0}")
    [ "${script[$2]}" = "$bench/keys.lua" ] && extra=("${4:-$RANDOM}")
    run_bg "${pin_client[@]}" wrk -t"$threads" -c"$connections" -d"$3"s -s "${script[$2]}" \
        "${url[$2]}" -- "${tokens[$2]}" "${extra[@]}" > "$out" 2>&1 || fail "wrk ($2): $(cat "$out")"
    cpu1=$(cpu_ns "${worker[$inst]}")
    line=$(grep '^BENCH ' "$out") || fail "wrk ($2) printed no summary: $(cat "$out")"
    local -A w=()
    for kv in ${line#BENCH }; do w[${kv%%=*}]=${kv#*=}; done
    if [ "${w[status]}" != 0 ] || [ "${w[connect]}" != 0 ] || [ "${w[read]}" != 0 ] \
        || [ "${w[write]}" != 0 ] || [ "${w[timeout]}" != 0 ] || [ "${w[requests]}" = 0 ]; then
        fail "$2 (round $1): ${w[status]} responses with status >= 400, and socket errors" \
            "(connect ${w[connect]}, read ${w[read]}, write ${w[write]}, timeout ${w[timeout]})" \
            "in ${w[requests]} requests: a benchmark of refusals is worthless" \
            "(see $out and $work/$inst/error.log)"
    fi
    local rps cpu busy
    rps=$(awk -v n="${w[requests]}" -v us="${w[duration_us]}" 'BEGIN { printf "%.0f", n / (us / 1e6) }')
    cpu=$(awk -v ns=$((cpu1 - cpu0)) -v n="${w[requests]}" 'BEGIN { printf "%.2f", ns / n / 1000 }')
    # (wrk's own duration: its start-up, reading the tokens, leaves the worker idle.)
    busy=$(awk -v ns=$((cpu1 - cpu0)) -v us="${w[duration_us]}" 'BEGIN { printf "%.1f", ns / us / 10 }')
    last_requests=${w[requests]}
    if [ "$1" != warmup ] && [ "$1" != fill ] && [ "$1" != rss ]; then
        printf '%s\t%s\t%s\n%s\tcpu-%s\t%s\n%s\tbusy-%s\t%s\n' \
            "$1" "$2" "$rps" "$1" "$2" "$cpu" "$1" "$2" "$busy" >> "$runs"
    fi
    printf '   %-7s %-7s %8s requests/s   worker: %6s us/request, busy %5s%%\n' \
        "$1" "$2" "$rps" "$cpu" "$busy"
}

# bench_verify ROUND ALG: verify_rate on one core; records the raw and full rates per CPU
# second (what the core does when it is not shared; the formulas use these) and the full
# path's wall-clock rate (lower when other processes took the core).
bench_verify() {
    local out=$work/verify-$1-$2.txt raw full wall awslc
    run_bg "${pin_server[@]}" "$verify_rate" "$work/keys/jwks.json" "$work/keys/$2.txt" \
        "$issuer" "$audience" "$verify_secs" > "$out" 2>&1 || fail "verify_rate: $(cat "$out")"
    raw=$(awk '$1 == "raw" { print $2 }' "$out")
    awslc=$(awk '$1 == "awslc" { print $2 }' "$out")
    full=$(awk '$1 == "full" { print $2 }' "$out")
    wall=$(awk '$1 == "full" { gsub(/[^0-9]/, "", $5); print $5 }' "$out")
    [ -n "$raw" ] && [ -n "$awslc" ] && [ -n "$full" ] && [ -n "$wall" ] ||
        fail "verify_rate printed no rates: $(cat "$out")"
    printf '%s\tverify-%s-%s\t%s\n' "$1" raw "$2" "$raw" "$1" full "$2" "$full" \
        "$1" wall "$2" "$wall" "$1" awslc "$2" "$awslc" >> "$runs"
    printf '   %-7s verify  %8s %s/CPU-s full path (wall %s/s), %s/CPU-s aws-lc alone\n' \
        "$1" "$full" "$2" "$wall" "$awslc"
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
if [[ " ${variants[*]} " == *" zone1m "* ]]; then
    echo "== filling zone z1m with $zone_keys keys"
    filled=0
    while [ "$filled" -lt "$zone_keys" ]; do
        bench_wrk fill zone1m 5 "$filled"
        filled=$((filled + last_requests))
    done
fi
echo "== warm-up: 1 s per variant (load average before: $load_before)"
for v in "${variants[@]}"; do bench_wrk warmup "$v" 1; done

echo "== $rounds rounds: ${variants[*]} (rotating order) x ${duration} s, and verify_rate"
n=${#variants[@]}
for ((r = 1; r <= rounds; r++)); do
    for ((i = 0; i < n; i++)); do bench_wrk "$r" "${variants[(i + r - 1) % n]}" "$duration"; done
    for alg in rs256 es256; do bench_verify "$r" "$alg"; done
done

# --- Memory: distinct tokens, each once, through the worker; its RSS after the first run
# (the token cache, 4096 entries, full long before) and at the end.
rss_kb() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status"; }
rss_line=""
if [ "$rss_tokens" -gt 0 ]; then
    echo "== memory: $rss_tokens distinct HS256 tokens, each once"
    sent=0 rss_warm=""
    while [ "$sent" -lt "$rss_tokens" ]; do
        bench_wrk rss rss 10 "$sent"
        sent=$((sent + last_requests))
        [ -n "$rss_warm" ] || { rss_warm=$(rss_kb "${worker[mesh]}"); rss_warm_at=$sent; }
    done
    rss_end=$(rss_kb "${worker[mesh]}")
    rss_warm=${rss_warm:-$rss_end}
    printf 'rss\trss-warm\t%s\nrss\trss-warm-at\t%s\nrss\trss-end\t%s\nrss\trss-sent\t%s\n' \
        "$rss_warm" "$rss_warm_at" "$rss_end" "$sent" >> "$runs"
    echo "   worker RSS: $rss_warm kB after $rss_warm_at tokens, $rss_end kB after $sent"
fi

# --- What the full and egress rows sent on: spans to the receiver, calls with the token.
metric() { # metric NAME_AND_LABELS: its value in the mesh instance's mesh_status (0 if none)
    curl -s "http://127.0.0.1:${port[mesh]}/metrics" |
        awk -v m="$1" 'index($0, m " ") == 1 { v += $NF } END { printf "%d", v }'
}
spans_exported=$(metric mesh_trace_spans_exported_total)
spans_dropped=$(metric mesh_trace_spans_dropped_total)
kill -TERM "$loopback_pid" 2>/dev/null || true
wait "$loopback_pid" 2>/dev/null || true
receiver=$(tail -n1 "$work/loopback.out")
echo "   spans: $spans_exported exported, $spans_dropped dropped; receiver: $receiver"
if [[ " ${variants[*]} " == *" full "* ]] && [ "$spans_exported" = 0 ]; then
    fail "the full row exported no span (see $work/mesh/error.log and $work/loopback.out)"
fi

# --- Nothing may have gone wrong inside nginx (a crashed worker is respawned silently).
for inst in stock mesh nocache upstream; do
    [ -f "$work/$inst/error.log" ] || continue
    if grep -E '\[(alert|crit|emerg)\]|exited on signal' "$work/$inst/error.log"; then
        fail "$inst nginx logged the lines above ($work/$inst/error.log)"
    fi
done

# --- The table.
cpu=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
hypervisor=$(lscpu 2>/dev/null | awk -F': *' '/^Hypervisor vendor/ { print $2 }')
container=$(systemd-detect-virt --container 2>/dev/null || true)
virt=${hypervisor:+virtual machine: $hypervisor}
[ -z "$container" ] || [ "$container" = none ] || virt="${virt:+$virt, }container: $container"
{
    echo "DATE=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "NGINX=$nginx"
    echo "NGINX_VERSION=$("$nginx" -v 2>&1 | sed 's/^nginx version: //')"
    echo "MODULE=${module#"$root"/}"
    echo "COMMAND=bench/run.sh ${module#"$root"/}"
    echo "WRK_VERSION=$(wrk -v 2>&1 | awk 'NR == 1 { print $2 }')"
    echo "WRK_ARGS=wrk -t$threads -c$connections -d${duration}s -s bench/tokens.lua"
    echo "ROUNDS=$rounds"
    echo "DURATION=$duration"
    echo "TOKENS=$ntokens"
    echo "ZONE_KEYS=$zone_keys"
    echo "RSS_TOKENS=$rss_tokens"
    echo "VARIANTS=${variants[*]}"
    echo "VERIFY_SECS=$verify_secs"
    echo "SPANS=$spans_exported exported, $spans_dropped dropped (receiver: $receiver)"
    echo "MACHINE=$(nproc) cores (${cpu:-unknown CPU}${virt:+, $virt}), $(uname -sr), $(. /etc/os-release && echo "$PRETTY_NAME"), loopback only; $placement; load average before the runs $load_before"
} > "$work/meta.env"
"$python" "$bench/report.py" "$runs" "$work/meta.env" "$results" ${BENCH_RATIOS:+"$BENCH_RATIOS"}
echo
echo "written: $results"
