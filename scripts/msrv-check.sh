#!/usr/bin/env bash
# Fails if any package in Cargo.lock declares a rust-version newer than the MSRV ($1).
set -euo pipefail
cargo metadata --locked --format-version 1 | python3 "$(dirname "$0")/msrv-check.py" "${1:?usage: msrv-check.sh 1.85}"
