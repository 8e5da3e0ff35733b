#!/usr/bin/env bash
# Prepare a configured copy of Debian's nginx-dev source tree, so that nginx-sys
# generates bindings for exactly the stock nginx binary on this machine.
# Usage: scripts/nginx-tree.sh OUTDIR   (prints the objs/ directory to use as NGINX_BUILD_DIR)
set -euo pipefail
out=${1:?usage: nginx-tree.sh OUTDIR}
src=/usr/share/nginx/src
[ -f "$src/conf_flags" ] || { echo "nginx-dev is not installed ($src/conf_flags missing)" >&2; exit 1; }
stamp="$out/.configured-$(dpkg-query -W -f='${Version}' nginx-dev 2>/dev/null || echo unknown)"
if [ ! -f "$stamp" ]; then
    rm -rf "$out"; mkdir -p "$out"
    cp -a "$src/." "$out/"
    # conf_flags defines NGX_CONF_FLAGS=( ... ): the flags Debian's nginx was configured with.
    # shellcheck disable=SC1091
    . "$src/conf_flags"
    (cd "$out" && ./configure "${NGX_CONF_FLAGS[@]}" --with-cc-opt=-fPIC --with-ld-opt=-fPIC) >"$out/configure.log" 2>&1 \
        || { tail -20 "$out/configure.log" >&2; exit 1; }
    touch "$stamp"
fi
echo "$out/objs"
