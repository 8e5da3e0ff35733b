# ngx-mesh: a Cloud Run-ready nginx with the module, from Debian 13 packages only.
#   docker build -t ngx-mesh .        (or podman build; `make image` picks whichever runs here)
#   docker run -p 8080:8080 -e MESH_AUDIENCE=https://orders-abc123-uc.a.run.app \
#       -e MESH_ALLOWED_CALLERS='checkout@shop.iam.gserviceaccount.com' ngx-mesh
# Configuration is by environment variables and mounted snippets: README.md, "The container image".
#
# Behind a TLS-intercepting proxy, mount its CA certificates (*.crt) at /build-ca for the build:
#   podman build -v /usr/local/share/ca-certificates:/build-ca:ro -t ngx-mesh .
# They are trusted by cargo in the builder only and never copied into the image.

# --- builder: Debian 13's cargo/rustc (1.85, the MSRV) and nginx-dev (1.26, the runtime's nginx)
FROM debian:trixie-slim AS builder
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      cargo rustc nginx-dev libclang-dev libssl-dev libpcre2-dev zlib1g-dev make gcc \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the module is built from, so editing the image's scripts does not rebuild it.
COPY Cargo.toml Cargo.lock build.rs ./
COPY scripts/nginx-tree.sh scripts/
COPY core/ core/
COPY src/ src/
RUN set -eu; \
    if ls /build-ca/*.crt >/dev/null 2>&1; then \
        cat /etc/ssl/certs/ca-certificates.crt /build-ca/*.crt > /tmp/build-ca.pem; \
        export CARGO_HTTP_CAINFO=/tmp/build-ca.pem; \
    fi; \
    scripts/nginx-tree.sh /src/target/nginx >/dev/null; \
    NGINX_BUILD_DIR=/src/target/nginx/objs cargo build --release --locked; \
    strip --strip-unneeded -o /ngx_http_mesh_module.so target/release/libngx_http_mesh_module.so; \
    rm -f /tmp/build-ca.pem

# --- runtime: Debian 13's stock nginx (no recommends), the module, a non-root user
FROM debian:trixie-slim
# The CA bundle is Debian's (ca-certificates, installed in the builder before any build CA was
# seen), copied so the image needs neither that package nor the openssl tool it pulls in.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx gettext-base \
 && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log /var/cache/debconf/*-old \
           /var/lib/dpkg/*-old /etc/nginx/sites-enabled/* \
 && groupadd --system --gid 10001 mesh \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin mesh \
 && mkdir -p /etc/nginx/templates /etc/nginx/conf.d /etc/nginx/server.d /docker-entrypoint.d /tmp/nginx \
 && chown mesh:mesh /tmp/nginx
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /ngx_http_mesh_module.so /usr/lib/nginx/modules/ngx_http_mesh_module.so
COPY nginx-conf/cloud-logging.conf /etc/nginx/mesh/cloud-logging.conf
COPY nginx-conf/image/nginx.conf.template nginx-conf/image/json-log.awk /usr/share/ngx-mesh/
COPY nginx-conf/image/entrypoint.sh /usr/local/bin/mesh-entrypoint
USER 10001:10001
ENV PORT=8080
EXPOSE 8080
# Cloud Run stops a container with SIGTERM; the entrypoint turns that (and SIGQUIT, sent by
# `docker stop` with this STOPSIGNAL) into nginx's graceful shutdown.
STOPSIGNAL SIGQUIT
ENTRYPOINT ["/usr/local/bin/mesh-entrypoint"]
