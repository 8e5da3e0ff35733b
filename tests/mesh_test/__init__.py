"""Helpers for ngx-mesh's end-to-end tests: nginx runner, echo upstream, token minting, client."""
