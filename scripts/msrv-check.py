"""Fails if any package in Cargo.lock declares a rust-version newer than the MSRV.

Only the container image build runs the real MSRV toolchain (Debian 13's rustc 1.85),
so CI checks the lockfile against it here. Usage: cargo metadata ... | python3 msrv-check.py 1.85
"""
import json
import sys


def version(s):
    return tuple(int(x) for x in s.split(".")[:2])


msrv = sys.argv[1]
meta = json.load(sys.stdin)
bad = [
    "%s %s needs Rust %s" % (p["name"], p["version"], p["rust_version"])
    for p in meta["packages"]
    if p.get("rust_version") and version(p["rust_version"]) > version(msrv)
]
if bad:
    print("packages newer than the MSRV %s:\n  %s" % (msrv, "\n  ".join(bad)))
    sys.exit(1)
print("msrv-check: all %d locked packages build with Rust %s" % (len(meta["packages"]), msrv))
