#!/usr/bin/env bash
# The regression guard (make bench-guard, part of make test): a short bench/run.sh (under a
# minute) whose ratios to stock nginx must each be at least 75 % of the committed baseline
# (bench/baseline.tsv). It fails only on a gross regression: ratios only, never absolute
# times, and the ratios from the worker's CPU time per request, which load on a shared
# machine moves far less than requests/s (both are printed).
#
#   bench/guard.sh MODULE.so            check
#   bench/guard.sh MODULE.so --update   write bench/baseline.tsv from this run
set -euo pipefail

module=${1:?usage: guard.sh MODULE.so [--update]}
bench=$(cd "$(dirname "$0")" && pwd)
baseline=$bench/baseline.tsv
floor=0.75
mkdir -p "$bench/../target/bench"
out=$(mktemp -d "$bench/../target/bench/guard.XXXXXX")
trap 'rm -rf "$out"' EXIT

BENCH_VARIANTS="stock cached full rs256 es256 rbac10 rbac1000" BENCH_ROUNDS=3 \
    BENCH_DURATION=1 BENCH_TOKENS=${BENCH_TOKENS:-4200} BENCH_RSS_TOKENS=0 \
    BENCH_VERIFY_SECS=0.3 BENCH_RESULTS="$out/results.md" BENCH_RATIOS="$out/ratios.tsv" \
    "$bench/run.sh" "$module" > "$out/run.log" 2>&1 || { cat "$out/run.log"; exit 1; }
grep -A12 '^| ratio |' "$out/run.log" || true

if [ "${2:-}" = --update ]; then
    { echo "# bench/guard.sh baseline: ratios to stock nginx ($(date -u '+%Y-%m-%d %H:%M UTC'), load $(cut -d' ' -f1-3 /proc/loadavg))"
      grep '^cpu-' "$out/ratios.tsv"; } > "$baseline"
    echo "written: $baseline"
    exit 0
fi

python3 - "$baseline" "$out/ratios.tsv" "$floor" <<'PY'
import sys
base_path, now_path, floor = sys.argv[1], sys.argv[2], float(sys.argv[3])
read = lambda p: {k: float(v) for k, v in (l.split() for l in open(p) if l.strip() and not l.startswith("#"))}
base, now = read(base_path), read(now_path)
bad = []
for k, b in base.items():
    n = now.get(k)
    ok = n is not None and n >= floor * b
    print(f"  {k:<12} baseline {b:.3f}  now {n if n is None else f'{n:.3f}'}  floor {floor * b:.3f}  {'ok' if ok else 'REGRESSION'}")
    if not ok:
        bad.append(k)
if bad:
    sys.exit(f"bench-guard: below {floor:.0%} of the baseline: {', '.join(bad)}")
print("bench-guard: no gross regression")
PY
