# ngx-mesh: the front door.
#   make run    build the module and run the demo on 127.0.0.1:8080
#   make check  the shell's layers (scripts/layers.py), rustfmt and clippy (-D warnings)
#   make test   make check, then every test: core unit tests, then real nginx 1.22 (Debian) and
#               1.28 (vendored), each with 1 and 2 workers
#   make bench  wrk against stock nginx and the module, in one run, printing ratios
#   make image  build the container image (Dockerfile) with docker where an engine runs, else podman
#   make test-image  build the image with podman from a local Debian 13 base (no registry), run it
#               and check it from outside (tests/image/)
#   make deps   the Debian packages the above need (run by run, test and bench; build never
#               touches apt, so it can run without root once they are there)
# Scripts the targets call live in scripts/.

SHELL := /bin/bash
ROOT := $(CURDIR)
CARGO ?= cargo
NGINX_TREE := $(ROOT)/target/nginx-1.22
export NGINX_BUILD_DIR := $(NGINX_TREE)/objs
MODULE := $(ROOT)/target/release/ngx_http_mesh_module.so
VENDORED_DIR := $(ROOT)/target/vendored
VENDORED_MODULE := $(VENDORED_DIR)/ngx_http_mesh_module.so
VENDORED_NGINX := $(VENDORED_DIR)/nginx
VENV := $(ROOT)/.venv
PYTEST := $(VENV)/bin/pytest
APT_PACKAGES := nginx nginx-dev libclang-dev libssl-dev libpcre2-dev zlib1g-dev \
	python3 python3-venv openssl curl wrk make gcc redis-server

# Replace the module by rename, never in place: a running nginx maps the file, and
# overwriting it under a live worker can kill that worker with SIGBUS.
install-module = cp $(1) $(2).tmp && mv -f $(2).tmp $(2)

.PHONY: all deps check build build-vendored test test-core test-nginx msrv-check run bench bench-guard clean image test-image test-image-build image-deps

all: build

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (1.85 or newer)"; exit 1; }
	@# make check runs rustfmt and clippy: rustup toolchains may lack them.
	@if ! $(CARGO) fmt --version >/dev/null 2>&1 || ! $(CARGO) clippy --version >/dev/null 2>&1; then \
		command -v rustup >/dev/null || { echo "cargo fmt and cargo clippy are needed: install rustfmt and clippy"; exit 1; }; \
		echo "installing: rustfmt clippy"; rustup component add rustfmt clippy; \
	fi

$(NGINX_TREE)/objs/ngx_auto_config.h:
	scripts/nginx-tree.sh $(NGINX_TREE)

# One-way layers and no circle between files (it prints the folder graph), formatting, and
# clippy on both crates with every warning an error (release: the build scripts' output, nginx
# bindings and aws-lc, is then shared with make build).
check: deps $(NGINX_TREE)/objs/ngx_auto_config.h
	python3 scripts/layers.py
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets --locked -- -D warnings

# The module for the machine's stock nginx (Debian 12: 1.22.1).
build: $(NGINX_TREE)/objs/ngx_auto_config.h
	$(CARGO) build --release --locked
	$(call install-module,target/release/libngx_http_mesh_module.so,$(MODULE))

# The module and an nginx binary for nginx 1.28, from the ngx crate's bundled sources.
# nginx-src appends NGX_CONFIGURE_ARGS to its configure flags: auth_request is in Debian's
# nginx, so the 1.28 binary needs it too for the suite to run the same tests on both.
build-vendored:
	env -u NGINX_BUILD_DIR CARGO_TARGET_DIR=$(VENDORED_DIR) NGX_CONFIGURE_ARGS=--with-http_auth_request_module \
		$(CARGO) build --release --locked --features vendored
	$(call install-module,$(VENDORED_DIR)/release/libngx_http_mesh_module.so,$(VENDORED_MODULE))
	scripts/find-vendored-nginx.sh $(VENDORED_DIR) $(VENDORED_NGINX)

$(PYTEST): tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r tests/requirements.txt
	touch $(PYTEST)

test-core:
	$(CARGO) test --locked -p mesh-core

# Only the image build runs the real 1.85 toolchain; check every locked package fits it.
msrv-check:
	scripts/msrv-check.sh 1.85

# The last combination also runs the multi-second scenarios marked to run once (MESH_ONCE=1:
# global rate limits with Redis); the tests start their own redis-server (a `deps` package).
test-nginx: deps build build-vendored $(PYTEST)
	@set -e; for combo in "/usr/sbin/nginx $(MODULE) 1 0" "/usr/sbin/nginx $(MODULE) 2 0" \
	                      "$(VENDORED_NGINX) $(VENDORED_MODULE) 1 0" "$(VENDORED_NGINX) $(VENDORED_MODULE) 2 1"; do \
		set -- $$combo; \
		echo "== $$($$1 -v 2>&1 | sed 's/.*version: //'), $$3 worker(s)"; \
		NGINX_BIN=$$1 MESH_MODULE=$$2 MESH_WORKERS=$$3 MESH_ONCE=$$4 $(PYTEST) -q -p no:cacheprovider tests; \
	done

# A short bench (under a minute): fails only when a ratio to stock nginx falls below 75 % of
# bench/baseline.tsv (bench/guard.sh MODULE --update rewrites it).
bench-guard: deps build $(PYTEST)
	bench/guard.sh $(MODULE)

test: deps check msrv-check test-core test-nginx bench-guard

run: deps build
	nginx-conf/demo/run.sh $(MODULE)

bench: deps build $(PYTEST)
	bench/run.sh $(MODULE)

# --- the container image
IMAGE ?= ngx-mesh
# The machine's extra CA certificates (a TLS-intercepting egress, say), trusted by the build
# only: mounted, never copied into the image.
BUILD_CA_DIR ?= /usr/local/share/ca-certificates
build-ca-volume = $(if $(wildcard $(BUILD_CA_DIR)/*.crt),-v $(BUILD_CA_DIR):/build-ca:ro)

image:
	@if command -v docker >/dev/null && docker info >/dev/null 2>&1; then \
		echo "docker build -t $(IMAGE) ."; docker build -t $(IMAGE) .; \
	else \
		echo "podman build $(build-ca-volume) -t $(IMAGE) ."; podman build $(build-ca-volume) -t $(IMAGE) .; \
	fi

# make test-image: everything podman needs lives under IMAGE_CACHE (config, storage, the base
# image tarball), so the machine's own container setup is left alone and a rerun is warm.
IMAGE_CACHE ?= $(ROOT)/target/image
# This machine's cargo downloads (crate files, index cache), shared with the build in the image.
CARGO_REGISTRY ?= $(or $(CARGO_HOME),$(HOME)/.cargo)/registry
TEST_IMAGE := localhost/ngx-mesh:test
# Extra `podman build` flags for make test-image-build (.ci/run: --cpu-shares=2).
IMAGE_BUILD_FLAGS ?=
IMAGE_PACKAGES := podman runc debootstrap
test-image test-image-build image-deps: export CONTAINERS_CONF := $(IMAGE_CACHE)/containers.conf
test-image test-image-build image-deps: export CONTAINERS_STORAGE_CONF := $(IMAGE_CACHE)/storage.conf

image-deps:
	@missing=$$(for p in $(IMAGE_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	scripts/podman-conf.sh $(IMAGE_CACHE)

# The image alone (`.ci/run` builds it in the background, at low priority, while `make test`
# runs, then calls `make test-image`, which finds it built).
test-image-build: image-deps
	scripts/debian-base.sh $(IMAGE_CACHE)/trixie-slim.tar
	podman image exists docker.io/library/debian:trixie-slim \
		|| podman import --quiet $(IMAGE_CACHE)/trixie-slim.tar docker.io/library/debian:trixie-slim
	@mkdir -p $(CARGO_REGISTRY) $(IMAGE_CACHE)/cargo-target
	@# The Dockerfile as users build it; the volumes only lend it cargo's downloads (those of
	@# `make test`, the same Cargo.lock: nothing is fetched again) and keep its build between
	@# runs (a rerun recompiles only what changed).
	time podman build --pull=never --network=host $(IMAGE_BUILD_FLAGS) $(build-ca-volume) \
		-v $(CARGO_REGISTRY):/root/.cargo/registry \
		-v $(IMAGE_CACHE)/cargo-target:/src/target -t $(TEST_IMAGE) .
	@podman image inspect --format '{{.Size}}' $(TEST_IMAGE) | awk '{ printf "image size: %.1f MB\n", $$1 / 1e6 }'

test-image: test-image-build $(PYTEST)
	MESH_TEST_IMAGE=$(TEST_IMAGE) BUILD_CA_DIR=$(BUILD_CA_DIR) $(PYTEST) -q -p no:cacheprovider tests/image

clean:
	$(CARGO) clean
	rm -rf $(VENV)
