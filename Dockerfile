# ngx-mesh: a Cloud Run-ready nginx with the module, from Debian packages only.
#   podman build -t ngx-mesh .      (or docker build)
#   docker run -p 8080:8080 -e MESH_AUDIENCE=https://orders.example -e MESH_UPSTREAM=http://127.0.0.1:8081 ngx-mesh
# Configuration is by environment variables: see README.md, "The container image".

# --- builder: Debian 13's cargo/rustc (1.85, the MSRV) and nginx-dev (1.26, the runtime's nginx)
FROM debian:trixie-slim AS builder
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      cargo rustc nginx-dev libclang-dev libssl-dev libpcre2-dev zlib1g-dev make gcc \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN build/nginx-tree.sh /src/target/nginx \
 && NGINX_BUILD_DIR=/src/target/nginx/objs cargo build --release --locked \
 && cp target/release/libngx_http_mesh_module.so /ngx_http_mesh_module.so

# --- runtime: Debian 13's stock nginx, the module, a non-root user
FROM debian:trixie-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      nginx ca-certificates gettext-base \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /nonexistent --shell /usr/sbin/nologin mesh \
 && mkdir -p /etc/nginx/mesh /tmp/nginx \
 && chown -R mesh /etc/nginx/mesh /tmp/nginx
COPY --from=builder /ngx_http_mesh_module.so /usr/lib/nginx/modules/ngx_http_mesh_module.so
COPY nginx-conf/cloud-logging.conf /etc/nginx/mesh/cloud-logging.conf
COPY nginx-conf/image/nginx.conf.template /etc/nginx/mesh/nginx.conf.template
COPY nginx-conf/image/entrypoint.sh /usr/local/bin/mesh-entrypoint
USER mesh
ENV PORT=8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/mesh-entrypoint"]
