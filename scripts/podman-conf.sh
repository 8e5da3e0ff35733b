#!/usr/bin/env bash
# Write the podman configuration `make test-image` runs with, under DIR: runc with cgroupfs (this
# machine has no systemd), ulimits the tests' nginx can use, events to a file, and storage under
# DIR. CONTAINERS_CONF and CONTAINERS_STORAGE_CONF point podman here, so the machine's own
# /etc/containers is never read or changed.
# Usage: scripts/podman-conf.sh DIR
set -euo pipefail
mkdir -p "${1:?usage: podman-conf.sh DIR}"
dir=$(cd "$1" && pwd)
mkdir -p "$dir/storage" "$dir/run"
cat >"$dir/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$dir/run/events.log"
CONF
cat >"$dir/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$dir/storage"
runroot = "$dir/run"
CONF
