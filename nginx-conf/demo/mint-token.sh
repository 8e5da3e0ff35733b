#!/usr/bin/env bash
# Mints an RS256 JWT with the openssl CLI (no other tool needed).
# Usage: mint-token.sh PRIVATE_KEY.pem KID CLAIMS_JSON
set -euo pipefail
key=${1:?usage: mint-token.sh KEY.pem KID CLAIMS_JSON}; kid=$2; claims=$3
b64url() { basenc --base64url -w0 | tr -d '='; }
header=$(printf '{"alg":"RS256","typ":"JWT","kid":"%s"}' "$kid" | b64url)
payload=$(printf '%s' "$claims" | b64url)
sig=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -sign "$key" -binary | b64url)
printf '%s.%s.%s\n' "$header" "$payload" "$sig"
