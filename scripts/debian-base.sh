#!/usr/bin/env bash
# Make a local `debian:trixie-slim` for `make test-image`, so the image is built and tested with no
# container registry: debootstrap's minbase (the variant Debian's official images start from),
# trimmed the way the official slim images are (no docs, man pages or locales, apt lists removed),
# then packed as one tarball for `podman import`.
# Usage: scripts/debian-base.sh OUT.tar   (does nothing if OUT.tar exists: it is the cache)
set -euo pipefail
out=${1:?usage: debian-base.sh OUT.tar}
suite=trixie
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ -s "$out" ] && exit 0
command -v debootstrap >/dev/null || { echo "debootstrap is not installed" >&2; exit 1; }
root=$(mktemp -d "$(dirname "$out")/rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "debootstrap --variant=minbase $suite (a few minutes, once)" >&2
debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"

# What the slim variant leaves out, for every package installed later too.
cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CFG
find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/usr/share/lintian/*

# apt as in the official image: no recommends kept from debootstrap, no caches, the release,
# its updates and its security archive.
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<CFG
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
CFG
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* "$root"/tmp/* \
       "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
: >"$root/etc/hostname"
# No init runs in a container: packages must not try to start their services while installed.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
: >"$root/etc/resolv.conf"
tar -C "$root" --numeric-owner --xattrs -cf "$out.tmp" .
mv -f "$out.tmp" "$out"
