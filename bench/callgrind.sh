#!/usr/bin/env bash
# Instructions per request of one nginx process under callgrind: repeatable on a busy machine,
# where wall-clock ratios are noise.
#
#   bench/callgrind.sh INSTANCE_DIR URL_PATH TOKENS_FILE OUT
#
# INSTANCE_DIR is an nginx directory written by bench/run.sh (BENCH_KEEP=1 keeps them:
# target/bench/run.*/stock and .../mesh). nginx runs in one process (master_process off),
# instrumented only after a 2 s warm-up (token cache filled), for 4 s of wrk traffic; every
# response must be < 400. Prints the requests, the instructions and their ratio; OUT.1 is the
# profile for callgrind_annotate. A configuration with `mesh_trace_export` or
# `mesh_metadata_server` gets a fresh bench/loopback.py (the run's is gone).
set -euo pipefail
dir=$(realpath "$1") path=$2 tokens=$(realpath "$3") out=$(realpath -m "$4")
bench=$(cd "$(dirname "$0")" && pwd)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rm -f "$out" "$out".* "$dir/cg.ports"
# The span receiver and metadata server the configuration names (bench/loopback.py), anew.
python3 "$bench/loopback.py" "$dir/cg.ports" > "$out.loopback" 2>&1 &
lp=$!
for _ in $(seq 100); do [ -f "$dir/cg.ports" ] && break; sleep 0.1; done
read -r otlp metadata < "$dir/cg.ports"
sed -e 's/^worker_processes 1;/master_process off;/' -e 's/worker_cpu_affinity 01;//' \
    -e "s/listen 127.0.0.1:[0-9]*;/listen 127.0.0.1:$port;/" -e "s|^pid .*;|pid $dir/cg.pid;|" \
    -e "s|mesh_trace_export http://127.0.0.1:[0-9]*/|mesh_trace_export http://127.0.0.1:$otlp/|" \
    -e "s|mesh_metadata_server http://127.0.0.1:[0-9]*;|mesh_metadata_server http://127.0.0.1:$metadata;|" \
    "$dir/nginx.conf" > "$dir/cg.conf"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    /usr/sbin/nginx -p "$dir" -c "$dir/cg.conf" 2> "$out.log" &
vp=$!
trap 'kill $vp $lp 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.2; done
wrk -t1 -c4 -d2s -s "$bench/tokens.lua" "http://127.0.0.1:$port$path" -- "$tokens" 1 > /dev/null
callgrind_control -i on "$vp" > /dev/null
wrk -t1 -c4 -d4s -s "$bench/tokens.lua" "http://127.0.0.1:$port$path" -- "$tokens" 1 > "$out.wrk"
callgrind_control -d "$vp" > /dev/null
kill "$vp"; wait "$vp" 2>/dev/null || true
n=$(grep -o 'requests=[0-9]*' "$out.wrk" | cut -d= -f2)
grep -q ' status=0 ' "$out.wrk" || { echo "callgrind.sh: responses >= 400: $(cat "$out.wrk")" >&2; exit 1; }
ir=$(awk '/^summary:/ { print $2 }' "$out.1")
echo "$path requests=$n instructions=$ir per_request=$((ir / n))"
