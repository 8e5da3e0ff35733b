#!/usr/bin/env bash
# The `vendored` feature of nginx-sys builds nginx from bundled sources in its OUT_DIR;
# copy the newest such binary to a stable path for the tests.
# Usage: find-vendored-nginx.sh TARGET_DIR DEST
set -euo pipefail
bin=$(ls -t "$1"/release/build/nginx-sys-*/out/objs/nginx 2>/dev/null | head -1)
[ -n "$bin" ] || { echo "no vendored nginx binary under $1" >&2; exit 1; }
cp "$bin" "$2.tmp" && mv -f "$2.tmp" "$2"   # rename: the old binary may be running
"$2" -v
