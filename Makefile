# ngx-mesh: the front door.
#   make run    build the module and run the demo on 127.0.0.1:8080
#   make test   every test: core unit tests, then real nginx 1.22 (Debian) and 1.28 (vendored),
#               each with 1 and 2 workers
#   make bench  wrk against stock nginx and the module, in one run, printing ratios
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
	python3 python3-venv openssl curl wrk make gcc

# Replace the module by rename, never in place: a running nginx maps the file, and
# overwriting it under a live worker can kill that worker with SIGBUS.
install-module = cp $(1) $(2).tmp && mv -f $(2).tmp $(2)

.PHONY: all deps build build-vendored test test-core test-nginx msrv-check run bench clean

all: build

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (1.85 or newer)"; exit 1; }

$(NGINX_TREE)/objs/ngx_auto_config.h:
	scripts/nginx-tree.sh $(NGINX_TREE)

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

test-nginx: deps build build-vendored $(PYTEST)
	@set -e; for combo in "/usr/sbin/nginx $(MODULE) 1" "/usr/sbin/nginx $(MODULE) 2" \
	                      "$(VENDORED_NGINX) $(VENDORED_MODULE) 1" "$(VENDORED_NGINX) $(VENDORED_MODULE) 2"; do \
		set -- $$combo; \
		echo "== $$($$1 -v 2>&1 | sed 's/.*version: //'), $$3 worker(s)"; \
		NGINX_BIN=$$1 MESH_MODULE=$$2 MESH_WORKERS=$$3 $(PYTEST) -q -p no:cacheprovider tests; \
	done

test: deps msrv-check test-core test-nginx

run: deps build
	nginx-conf/demo/run.sh $(MODULE)

bench: deps build $(PYTEST)
	bench/run.sh $(MODULE)

clean:
	$(CARGO) clean
	rm -rf $(VENV)
