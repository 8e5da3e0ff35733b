#!/bin/bash
# mesh-entrypoint: the ngx-mesh image's PID 1.
#
# 1. Every line the container writes to stderr goes through json-log.awk (one JSON object with a
#    `severity` per line, for Cloud Logging); nginx's access log is JSON already (stdout).
# 2. Hooks in /docker-entrypoint.d run: `*.envsh` are sourced (they may set variables), executable
#    `*.sh` are run, in name order.
# 3. Templates under /etc/nginx/templates (`*.template`, any depth) are rendered with envsubst into
#    /tmp/nginx/templates/ (same relative path, `.template` dropped), substituting only variables
#    whose names match MESH_ENVSUBST_FILTER.
# 4. Unless MESH_NGINX_CONF names a configuration to use as it is, every MESH_* setting is checked
#    and quoted, and the image's nginx.conf is rendered from them. A bad value stops the container
#    here, with a message that names the variable and says what is wrong.
# 5. nginx -t, then nginx in the foreground as a child. SIGTERM (Cloud Run's stop signal) and
#    SIGQUIT become nginx's graceful shutdown: listeners close, requests in flight finish, and
#    worker_shutdown_timeout closes what is left. SIGINT is a fast stop, SIGHUP a reload. The
#    container exits with nginx's status, after the last log line is written.
#    With the argument -t, it stops after nginx -t (exit 0 when the configuration is valid) and
#    prints the access report (Markdown) on stdout. MESH_ACCESS_REPORT=PATH: nginx also writes
#    the JSON report there (mesh_access_report), at every start, reload and check.
set -euo pipefail
shopt -s nullglob

readonly RUN_DIR=/tmp/nginx
readonly SHARE=/usr/share/ngx-mesh
readonly TEMPLATE_DIR=/etc/nginx/templates
readonly RENDER_DIR=$RUN_DIR/templates
readonly HOOK_DIR=/docker-entrypoint.d
# The Markdown access report the image's nginx.conf writes (printed by `-t`).
readonly REPORT_MD=$RUN_DIR/access-report.md

log() { printf 'mesh-entrypoint: [%s] %s\n' "$1" "$2" >&2; }
die() { log emerg "$1"; exit 1; }

# --- 1. stderr through the JSON converter -------------------------------------------------
mkdir -p "$RUN_DIR"
fifo=$RUN_DIR/stderr.fifo
rm -f "$fifo"
mkfifo -m 600 "$fifo"
exec 3>&2
utc=0
case "${TZ:-}" in "" | UTC | Etc/UTC | UTC0 | :UTC) utc=1 ;; esac
# The converter ignores stop signals: it ends when the last writer (nginx, this script) closes the
# pipe, so the lines written during a shutdown are not lost.
(trap '' INT TERM QUIT HUP USR1 USR2 WINCH; LC_ALL=C exec awk -v utc="$utc" -f "$SHARE/json-log.awk") <"$fifo" >&3 2>&3 &
converter=$!
exec 2>"$fifo"

nginx_pid=
finish() {
    local rc=$?
    trap - EXIT
    exec 2>&3
    # Bounded: a hook's leftover process holding the pipe must not keep the container alive.
    (sleep 3; kill -KILL "$converter" 2>/dev/null) &
    local watchdog=$!
    wait "$converter" 2>/dev/null || true
    kill "$watchdog" 2>/dev/null || true
    exit "$rc"
}
trap finish EXIT
# Stopped before nginx runs: just exit (PID 1 ignores signals it has no handler for).
trap 'exit 143' TERM QUIT
trap 'exit 130' INT

# --- 2. hooks --------------------------------------------------------------------------------
for hook in "$HOOK_DIR"/*; do
    case "$hook" in
    *.envsh)
        log notice "sourcing $hook"
        # shellcheck disable=SC1090
        . "$hook" >&2
        ;;
    *.sh)
        if [ -x "$hook" ]; then
            log notice "running $hook"
            "$hook" >&2 3>&- || die "$hook failed (exit status $?)"
        else
            log warn "ignoring $hook: not executable"
        fi
        ;;
    esac
done

# --- 3. templates ----------------------------------------------------------------------------
: "${MESH_ENVSUBST_FILTER:=^(PORT|GOOGLE_CLOUD_PROJECT|K_[A-Z0-9_]+|MESH_[A-Z0-9_]+|_MESH_[A-Z0-9_]+)$}"

# envsubst's list of ${NAME} for every variable in the environment whose name matches $1.
envsubst_list() {
    local name list=""
    while IFS= read -r name; do
        [[ $name =~ $1 ]] && list+="\${$name} "
    done < <(compgen -e)
    printf '%s' "$list"
}

render_templates() {
    local list template rel out
    [ -d "$TEMPLATE_DIR" ] || return 0
    list=$(envsubst_list "$MESH_ENVSUBST_FILTER")
    rm -rf "$RENDER_DIR"
    while IFS= read -r -d '' template; do
        rel=${template#"$TEMPLATE_DIR"/}
        out=$RENDER_DIR/${rel%.template}
        mkdir -p "$(dirname "$out")"
        envsubst "$list" <"$template" >"$out" || die "cannot render $template"
        log notice "rendered $template to $out"
    done < <(find "$TEMPLATE_DIR" -name '*.template' \( -type f -o -type l \) -print0 | sort -z)
}

# --- 4. the image's configuration, from checked settings -------------------------------------

# An nginx argument that reads back as exactly $1: single quotes, with \ and ' escaped.
q() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\'/\\\'}
    printf "'%s'" "$s"
}

# Every value reaches nginx.conf through q() or a pattern check below; none may hold a control
# character (a newline would end the directive).
check_printable() {
    local name=$1 value=$2
    [[ $value =~ [[:cntrl:]] ]] && die "$name contains a control character (newline, tab, ...): not allowed"
    return 0
}

# $1 = variable name, $2 = extended regex the whole value must match, $3 = what it should be.
check() {
    local name=$1 pattern=$2 what=$3 value=${!1}
    [[ $value =~ $pattern ]] || die "$name=$(q "$value") is not valid: expected $what"
}

on_off() { check "$1" '^(on|off)$' "on or off"; }

# The words of $2 (split on blanks), each quoted: "'a' 'b'".
quoted_words() {
    local word out=""
    for word in $2; do
        out+="$(q "$word") "
    done
    printf '%s' "${out% }"
}

# A rule pattern or role member: a principal, *-glob, ~REGEX, role:NAME, claim:PATH=VALUE, any,
# anonymous. Words that nginx would read as options are refused here, with where they belong.
check_pattern() {
    local name=$1 word=$2
    case "$word" in
    methods=* | provider=* | rate=* | burst=*)
        die "$name: '$word' is an option, not a caller pattern (options go after the patterns of a MESH_RULE_<N> or MESH_RATE_CALLER_<N>)" ;;
    role:)
        die "$name: 'role:' needs a role name" ;;
    esac
}

# The numeric suffixes N of the variables named PREFIX<N>, in numeric order.
numbered() {
    local prefix=$1 name
    for name in $(compgen -e); do
        [[ $name =~ ^${prefix}([0-9]+)$ ]] && printf '%s\n' "${BASH_REMATCH[1]}"
    done | sort -n
}

# MESH_ROUTE_<NAME>="URL [audience=AUD] [timeout=T] [retries=N] [rate=R]": the app's
# http://127.0.0.1:$MESH_EGRESS_PORT/<name>/... goes to URL/... with this service's ID token for
# AUD (default: URL's origin), TLS verified with SNI, keepalive, retries of idempotent requests.
# Sets egress_http (http-level lines) and egress_server (the loopback server), empty without
# routes.
configure_routes() {
    local name route url scheme hostport path audience timeout retries rate word i servers tls
    egress_http=""
    egress_server=""
    local locations=""
    for name in $(compgen -e); do
        [[ $name =~ ^MESH_ROUTE_([A-Z0-9_]+)$ ]] || continue
        route=${BASH_REMATCH[1],,}
        read -r -a words <<<"${!name}"
        url=${words[0]:-}
        [[ $url =~ ^(https?)://([A-Za-z0-9._~-]+(:[0-9]{1,5})?)(/[A-Za-z0-9._~!*+,=:@%/-]*)?$ ]] \
            || die "$name=$(q "${!name}") is not valid: expected an http:// or https:// URL (https://billing-abc123-uc.a.run.app), then optional audience=AUD timeout=T retries=N rate=R"
        scheme=${BASH_REMATCH[1]} hostport=${BASH_REMATCH[2]} path=${BASH_REMATCH[4]}
        path=${path%/}/
        audience=$scheme://$hostport timeout=30s retries=1 rate=""
        for word in "${words[@]:1}"; do
            case "$word" in
            audience=?*)
                [[ $word =~ ^audience=[^[:space:]]+$ ]] || die "$name: '$word' is not valid: expected audience=AUD"
                audience=${word#audience=} ;;
            timeout=*)
                [[ $word =~ ^timeout=[1-9][0-9]*(ms|s|m)?$ ]] || die "$name: '$word' is not valid: expected timeout=T such as 10s or 500ms"
                timeout=${word#timeout=} ;;
            retries=*)
                [[ $word =~ ^retries=[0-5]$ ]] || die "$name: '$word' is not valid: expected retries=N, 0 to 5 (tries after the first)"
                retries=${word#retries=} ;;
            rate=*)
                [[ $word =~ ^rate=[1-9][0-9]*r/[sm]$ ]] || die "$name: '$word' is not valid: expected rate=R such as 50r/s or 600r/m"
                rate=${word#rate=} ;;
            *) die "$name: '$word' is not valid: expected audience=AUD, timeout=T, retries=N or rate=R after the URL" ;;
            esac
        done
        if [ "$scheme" = http ]; then
            log warn "$name: $url is plain http://: the ID token travels unencrypted (for tests only)"
        fi
        # One server line per try: nginx retries on another peer only, and a name that resolves
        # to one address would be one peer.
        servers=""
        for ((i = 0; i <= retries; i++)); do
            servers+="        server $hostport max_fails=0;
"
        done
        egress_http+="    mesh_outbound_token \$egress_$route $(q "$audience");
    upstream egress_$route {
$servers        keepalive 16;
    }
"
        tls=""
        if [ "$scheme" = https ]; then
            tls="
            proxy_ssl_server_name on;
            proxy_ssl_name ${hostport%:*};
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 3;
            proxy_ssl_trusted_certificate /etc/ssl/certs/ca-certificates.crt;
            proxy_ssl_session_reuse on;"
        fi
        local limit=""
        if [ -n "$rate" ]; then
            egress_http+="    mesh_rate_limit_zone egress_$route 1m;
"
            limit="
            mesh_rate_limit zone=egress_$route rate=$rate;"
        fi
        locations+="        location /$route/ {
            mesh_outbound_auth \$egress_$route;$limit
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $hostport;
            proxy_next_upstream error timeout http_502 http_503 http_504;
            proxy_next_upstream_tries $((retries + 1));
            proxy_next_upstream_timeout $timeout;
            proxy_connect_timeout $timeout;
            proxy_send_timeout $timeout;
            proxy_read_timeout $timeout;$tls
            proxy_pass $scheme://egress_$route$path;
        }
"
    done
    if [ -n "${MESH_METADATA_SERVER:-}" ]; then
        check MESH_METADATA_SERVER '^https?://[A-Za-z0-9._~-]+(:[0-9]{1,5})?/?$' "http://HOST[:PORT] (default: Google's metadata server)"
        egress_http="    mesh_metadata_server $MESH_METADATA_SERVER;
$egress_http"
    fi
    [ -n "$locations" ] || return 0
    egress_server="    # The way out: the app's calls to other services (MESH_ROUTE_<NAME>), on loopback only.
    server {
        listen 127.0.0.1:$MESH_EGRESS_PORT;
        mesh_auth off;
        mesh_trace $MESH_TRACE;
${locations}        location / {
            default_type text/plain;
            return 404 \"no such route (MESH_ROUTE_<NAME> defines /<name>/)\\n\";
        }
    }
"
}

configure_image() {
    local name value word words pattern
    # Values are split into words (for word in $VALUE): never expand them as file globs
    # (*@shop.example, [0-9]).
    local -
    set -f
    for name in $(compgen -e); do
        case "$name" in
        MESH_* | PORT | GOOGLE_CLOUD_PROJECT) check_printable "$name" "${!name}" ;;
        esac
    done

    # A misspelt setting would otherwise be ignored without a word.
    local known=" MESH_WORKERS MESH_ERROR_LOG_LEVEL MESH_SHUTDOWN_TIMEOUT MESH_UPSTREAM MESH_GOOGLE
        MESH_AUDIENCE MESH_PLATFORM_VERIFIED MESH_ISSUER MESH_KEYS MESH_KEYS_CA MESH_ISSUER_AUDIENCE
        MESH_ISSUER_ALGORITHMS MESH_ISSUER_PRINCIPAL MESH_ISSUER_NAME MESH_AUTH_PROVIDERS
        MESH_ALLOWED_CALLERS MESH_RATE MESH_BURST MESH_RATE_ZONE_SIZE MESH_TRACE MESH_TRACE_SAMPLE
        MESH_TRACE_RESPONSE MESH_FORWARD_IDENTITY MESH_HEALTH_PATH MESH_CONFIG_VERSION
        MESH_ENVSUBST_FILTER MESH_NGINX_CONF MESH_METRICS_PORT MESH_TRACE_EXPORT
        MESH_TRACE_SERVICE MESH_EGRESS_PORT MESH_REDIS_URL MESH_REDIS_PASSWORD_FILE MESH_REDIS_CA
        MESH_REAL_IP MESH_METADATA_SERVER MESH_ACCESS_REPORT "
    for name in $(compgen -e); do
        [[ $name == MESH_* ]] || continue
        [[ $known == *[[:space:]]$name[[:space:]]* ]] && continue
        [[ $name =~ ^(MESH_RULE_[0-9]+|MESH_RATE_CALLER_[0-9]+|MESH_ROLE_[A-Z0-9_]+|MESH_ROUTE_[A-Z0-9_]+)$ ]] && continue
        log warn "$name is not a setting of the image: ignored here (templates may still use it)"
    done

    : "${PORT:=8080}"
    : "${MESH_WORKERS:=auto}"
    : "${MESH_ERROR_LOG_LEVEL:=warn}"
    : "${MESH_SHUTDOWN_TIMEOUT:=8s}"
    : "${MESH_UPSTREAM:=http://127.0.0.1:8081}"
    : "${MESH_GOOGLE:=on}"
    : "${MESH_PLATFORM_VERIFIED:=off}"
    : "${MESH_RATE:=100r/s}"
    : "${MESH_BURST:=200}"
    : "${MESH_RATE_ZONE_SIZE:=10m}"
    : "${MESH_TRACE:=on}"
    : "${MESH_TRACE_SAMPLE:=1}"
    : "${MESH_TRACE_RESPONSE:=off}"
    : "${MESH_FORWARD_IDENTITY:=on}"
    : "${MESH_HEALTH_PATH:=/health}"
    : "${MESH_CONFIG_VERSION:=image}"
    : "${MESH_ISSUER_NAME:=issuer}"
    : "${MESH_METRICS_PORT:=9464}"
    : "${MESH_EGRESS_PORT:=9090}"
    : "${MESH_REAL_IP:=on}"

    check PORT '^[1-9][0-9]{0,4}$' "a port number (1-65535)"
    ((PORT <= 65535)) || die "PORT=$PORT is not valid: expected a port number (1-65535)"
    check MESH_WORKERS '^(auto|[1-9][0-9]{0,3})$' "auto or a number of worker processes"
    check MESH_METRICS_PORT '^(off|[1-9][0-9]{0,4})$' "off or a port number (1-65535)"
    if [ "$MESH_METRICS_PORT" != off ]; then
        ((MESH_METRICS_PORT <= 65535)) || die "MESH_METRICS_PORT=$MESH_METRICS_PORT is not valid: expected off or a port number (1-65535)"
        [ "$MESH_METRICS_PORT" != "$PORT" ] || die "MESH_METRICS_PORT=$MESH_METRICS_PORT is PORT, the port callers reach: metrics are served on 127.0.0.1 only, on a port of their own"
    fi
    check MESH_ERROR_LOG_LEVEL '^(debug|info|notice|warn|error|crit|alert|emerg)$' "an error_log level (debug, info, notice, warn, error, crit, alert, emerg)"
    check MESH_SHUTDOWN_TIMEOUT '^[0-9]+(ms|s)?$' "a time such as 8s (Cloud Run stops the container 10 s after SIGTERM)"
    check MESH_UPSTREAM '^https?://[A-Za-z0-9._~-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~!&()*+,=:@%/-]*)?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?(/[A-Za-z0-9._~!&()*+,=:@%/-]*)?$' \
        "an http:// or https:// URL without variables, e.g. http://127.0.0.1:8081"
    on_off MESH_GOOGLE
    on_off MESH_PLATFORM_VERIFIED
    on_off MESH_TRACE
    on_off MESH_TRACE_RESPONSE
    on_off MESH_FORWARD_IDENTITY
    on_off MESH_REAL_IP
    check MESH_EGRESS_PORT '^[1-9][0-9]{0,4}$' "a port number (1-65535)"
    ((MESH_EGRESS_PORT <= 65535)) || die "MESH_EGRESS_PORT=$MESH_EGRESS_PORT is not valid: expected a port number (1-65535)"
    [ "$MESH_EGRESS_PORT" != "$PORT" ] || die "MESH_EGRESS_PORT=$MESH_EGRESS_PORT is PORT: the egress routes listen on loopback only, never on the port Cloud Run sends requests to"
    [ "$MESH_EGRESS_PORT" != "$MESH_METRICS_PORT" ] || die "MESH_EGRESS_PORT=$MESH_EGRESS_PORT is MESH_METRICS_PORT: give the egress routes a port of their own"
    check MESH_TRACE_SAMPLE '^(0|1|0?\.[0-9]+|0\.[0-9]+|1\.0*)$' "a ratio from 0 to 1, e.g. 0.1"
    check MESH_RATE '^(off|[1-9][0-9]*r/[sm])$' "off or a rate such as 100r/s or 600r/m"
    check MESH_BURST '^[0-9]+$' "a number of requests"
    check MESH_RATE_ZONE_SIZE '^[1-9][0-9]*[kKmM]?$' "a size such as 10m"
    check MESH_HEALTH_PATH '^(off|/[A-Za-z0-9._~!*+,:@/-]*)$' "off or a path such as /health"
    check MESH_ISSUER_NAME '^[a-z][a-z0-9_-]*$' "a provider name (lower-case letters, digits, _ and -)"
    [ "$MESH_ISSUER_NAME" != google ] || die "MESH_ISSUER_NAME must not be google: that name is the Google provider's"
    [ ${#MESH_CONFIG_VERSION} -le 128 ] || die "MESH_CONFIG_VERSION is longer than 128 characters"
    case "$MESH_HEALTH_PATH" in
    *z) log warn "MESH_HEALTH_PATH=$MESH_HEALTH_PATH ends in z: Cloud Run reserves some such paths (e.g. /healthz) and may not pass them to the container" ;;
    esac
    if [[ $MESH_SHUTDOWN_TIMEOUT =~ ^([0-9]+)s?$ ]] && ((BASH_REMATCH[1] >= 10)); then
        log warn "MESH_SHUTDOWN_TIMEOUT=$MESH_SHUTDOWN_TIMEOUT: Cloud Run kills the container 10 s after SIGTERM, before requests drained this long finish"
    fi

    # Providers: Google's (on unless MESH_GOOGLE=off), one from MESH_ISSUER, and any defined in
    # conf.d snippets and named in MESH_AUTH_PROVIDERS.
    local providers="" auth=""
    if [ "$MESH_GOOGLE" = on ]; then
        [ -n "${MESH_AUDIENCE:-}" ] || die "MESH_AUDIENCE is not set: Google ID tokens are minted for any audience by anyone with a Google account, so the audience (this service's URL, e.g. https://orders-abc123-uc.a.run.app) is what makes a token one for this service. Set it, or MESH_GOOGLE=off to accept only MESH_ISSUER's tokens"
        providers+="    mesh_provider google {
        preset   google;
        audience $(quoted_words MESH_AUDIENCE "$MESH_AUDIENCE");
        platform_verified $MESH_PLATFORM_VERIFIED;
    }
"
        auth+=" google"
    fi
    if [ -n "${MESH_ISSUER:-}" ]; then
        [ -n "${MESH_KEYS:-}" ] || die "MESH_ISSUER is set but MESH_KEYS is not: name the issuer's keys (a JWKS or PEM file mounted into the container, or an https:// JWKS URL)"
        local keys
        case "$MESH_KEYS" in
        https://* | http://*)
            check MESH_KEYS '^https?://[^[:space:]$]+$' "a key URL without spaces or variables"
            keys=$(q "$MESH_KEYS")
            if [ -n "${MESH_KEYS_CA:-}" ]; then
                check MESH_KEYS_CA '^/' "an absolute path to a PEM CA bundle"
                [ -r "$MESH_KEYS_CA" ] || die "MESH_KEYS_CA=$MESH_KEYS_CA cannot be read (is it mounted into the container?)"
                keys+=" $(q "ca=$MESH_KEYS_CA")"
            fi
            ;;
        /*)
            [ -r "$MESH_KEYS" ] || die "MESH_KEYS=$MESH_KEYS cannot be read (is it mounted into the container, readable by uid $(id -u)?)"
            keys=$(q "$MESH_KEYS")
            ;;
        *) die "MESH_KEYS=$(q "$MESH_KEYS") is not valid: expected an absolute file path or an https:// URL" ;;
        esac
        providers+="    mesh_provider $MESH_ISSUER_NAME {
        issuer $(quoted_words MESH_ISSUER "$MESH_ISSUER");
        keys $keys;
"
        if [ -n "${MESH_ISSUER_AUDIENCE:-}" ]; then
            providers+="        audience $(quoted_words MESH_ISSUER_AUDIENCE "$MESH_ISSUER_AUDIENCE");
"
        fi
        if [ -n "${MESH_ISSUER_ALGORITHMS:-}" ]; then
            for word in $MESH_ISSUER_ALGORITHMS; do
                [[ $word =~ ^(RS256|RS384|RS512|PS256|PS384|PS512|ES256|ES384|EdDSA)$ ]] \
                    || die "MESH_ISSUER_ALGORITHMS: '$word' is not one of RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA"
            done
            providers+="        algorithms $MESH_ISSUER_ALGORITHMS;
"
        fi
        if [ -n "${MESH_ISSUER_PRINCIPAL:-}" ]; then
            check MESH_ISSUER_PRINCIPAL '^[A-Za-z0-9_.:-]+$' "a claim name such as sub or email"
            providers+="        principal $MESH_ISSUER_PRINCIPAL;
"
        fi
        providers+="    }
"
        auth+=" $MESH_ISSUER_NAME"
    fi
    if [ -n "${MESH_AUTH_PROVIDERS:-}" ]; then
        for word in $MESH_AUTH_PROVIDERS; do
            [[ $word =~ ^[A-Za-z0-9_-]+$ ]] || die "MESH_AUTH_PROVIDERS: '$word' is not a provider name"
            auth+=" $word"
        done
    fi
    [ -n "$auth" ] || die "no token provider: set MESH_AUDIENCE (Google ID tokens), or MESH_ISSUER and MESH_KEYS, or MESH_AUTH_PROVIDERS naming providers defined in /etc/nginx/conf.d"

    # Roles: MESH_ROLE_<NAME>="PATTERN ..." is mesh_role <name> (lower-cased).
    local roles=""
    for name in $(compgen -e); do
        [[ $name =~ ^MESH_ROLE_([A-Z0-9_]+)$ ]] || continue
        value=${!name}
        [ -n "${value// /}" ] || die "$name is empty: list the callers the role binds"
        for word in $value; do check_pattern "$name" "$word"; done
        roles+="    mesh_role ${BASH_REMATCH[1],,} $(quoted_words "$name" "$value");
"
    done

    # Rules: MESH_RULE_<N>="allow|deny PATTERN ... [methods=M,...] [provider=P,...]" in order of
    # N, then MESH_ALLOWED_CALLERS as the last allow. Rules present and none matches: 403.
    local rules="" n rule effect
    # methods=M,... : HTTP method names, RFC 9110 tokens
    local tchar="[-!#\$%&'*+.^_\`|~0-9A-Za-z]"
    local methods_re="^methods=$tchar+(,$tchar+)*\$"
    for n in $(numbered MESH_RULE_); do
        name=MESH_RULE_$n
        read -r -a words <<<"${!name}"
        effect=${words[0]:-}
        [[ $effect =~ ^(allow|deny)$ ]] || die "$name=$(q "${!name}") is not valid: a rule starts with allow or deny, then caller patterns, then optional methods=M,... provider=P,..."
        [ ${#words[@]} -ge 2 ] || die "$name: '$effect' needs at least one caller pattern (or any)"
        rule="            mesh_$effect"
        pattern=0
        for word in "${words[@]:1}"; do
            case "$word" in
            methods=*)
                [[ $word =~ $methods_re ]] \
                    || die "$name: '$word' is not valid: expected methods=GET,POST,... (HTTP method names)"
                rule+=" $(q "$word")" ;;
            provider=*)
                [[ $word =~ ^provider=[A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*$ ]] \
                    || die "$name: '$word' is not valid: expected provider=NAME,..."
                rule+=" $word" ;;
            *)
                check_pattern "$name" "$word"
                pattern=1
                rule+=" $(q "$word")" ;;
            esac
        done
        [ $pattern = 1 ] || die "$name: '$effect' needs at least one caller pattern (or any)"
        rules+="$rule;
"
    done
    if [ -n "${MESH_ALLOWED_CALLERS:-}" ]; then
        if [ "$MESH_ALLOWED_CALLERS" = any ]; then
            rules+="            mesh_allow any;
"
        else
            for word in $MESH_ALLOWED_CALLERS; do
                [ "$word" != any ] || die "MESH_ALLOWED_CALLERS: any must stand alone (it admits every verified caller)"
                check_pattern MESH_ALLOWED_CALLERS "$word"
            done
            rules+="            mesh_allow $(quoted_words MESH_ALLOWED_CALLERS "$MESH_ALLOWED_CALLERS");
"
        fi
    elif [ -z "$rules" ]; then
        die "MESH_ALLOWED_CALLERS is not set: without it every caller with a valid token would pass, and anyone with a Google account can get a Google-signed token. Set it to the callers to admit (e.g. MESH_ALLOWED_CALLERS='checkout@shop.iam.gserviceaccount.com *@ci.iam.gserviceaccount.com'), write MESH_RULE_1, MESH_RULE_2, ..., or set MESH_ALLOWED_CALLERS=any to admit every verified caller"
    fi

    # Rate limits: one per-caller limit for location /, MESH_RATE_CALLER_<N> for exceptions.
    local zone="" limit=""
    if [ "$MESH_RATE" != off ]; then
        zone="    mesh_rate_limit_zone callers $MESH_RATE_ZONE_SIZE;"
        limit="            mesh_rate_limit zone=callers rate=$MESH_RATE burst=$MESH_BURST;
"
        for n in $(numbered MESH_RATE_CALLER_); do
            name=MESH_RATE_CALLER_$n
            read -r -a words <<<"${!name}"
            [ ${#words[@]} -ge 2 ] || die "$name=$(q "${!name}") is not valid: expected PATTERN rate=R [burst=B]"
            check_pattern "$name" "${words[0]}"
            rule="            mesh_rate_limit_caller $(q "${words[0]}")"
            for word in "${words[@]:1}"; do
                [[ $word =~ ^(rate=[1-9][0-9]*r/[sm]|burst=[0-9]+)$ ]] || die "$name: '$word' is not valid: expected rate=R (e.g. rate=5r/s) or burst=B"
                rule+=" $word"
            done
            [[ " ${words[*]:1}" == *" rate="* ]] || die "$name: missing rate=R"
            limit+="$rule;
"
        done
    elif [ -n "$(numbered MESH_RATE_CALLER_)" ]; then
        log warn "MESH_RATE=off: the MESH_RATE_CALLER_<N> settings are ignored"
    fi

    # MESH_REDIS_URL: the per-caller zone is global across instances (the module's redis=).
    if [ -n "${MESH_REDIS_URL:-}" ]; then
        check MESH_REDIS_URL '^rediss?://[^[:space:]$]+$' "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] or rediss://..."
        if [ "$MESH_RATE" = off ]; then
            log warn "MESH_RATE=off: MESH_REDIS_URL is not used"
        else
            zone="${zone%;} $(q "redis=$MESH_REDIS_URL")"
            if [ -n "${MESH_REDIS_PASSWORD_FILE:-}" ]; then
                check MESH_REDIS_PASSWORD_FILE '^/' "an absolute path to a file holding the Redis password"
                [ -r "$MESH_REDIS_PASSWORD_FILE" ] || die "MESH_REDIS_PASSWORD_FILE=$MESH_REDIS_PASSWORD_FILE cannot be read (is it mounted into the container?)"
                zone+=" $(q "password_file=$MESH_REDIS_PASSWORD_FILE")"
            fi
            if [ -n "${MESH_REDIS_CA:-}" ]; then
                [[ $MESH_REDIS_URL == rediss://* ]] || die "MESH_REDIS_CA is set but MESH_REDIS_URL is not rediss:// (TLS)"
                check MESH_REDIS_CA '^/' "an absolute path to a PEM CA bundle"
                [ -r "$MESH_REDIS_CA" ] || die "MESH_REDIS_CA=$MESH_REDIS_CA cannot be read (is it mounted into the container?)"
                zone+=" $(q "ca_file=$MESH_REDIS_CA")"
            fi
            zone+=";"
        fi
    elif [ -n "${MESH_REDIS_PASSWORD_FILE:-}${MESH_REDIS_CA:-}" ]; then
        die "MESH_REDIS_PASSWORD_FILE or MESH_REDIS_CA is set but MESH_REDIS_URL is not"
    fi

    # The client address from Google's front end: the last X-Forwarded-For address, the one it
    # appended (only Google's front end reaches a Cloud Run container).
    local real_ip="# client address: the connection's (MESH_REAL_IP=off)"
    if [ "$MESH_REAL_IP" = on ]; then
        real_ip="set_real_ip_from 0.0.0.0/0;
        set_real_ip_from ::/0;
        real_ip_header X-Forwarded-For;
        real_ip_recursive off;"
    fi

    configure_routes

    local trace="mesh_trace $MESH_TRACE;"
    if [ "$MESH_TRACE" = on ]; then
        trace+="
        mesh_trace_sample $MESH_TRACE_SAMPLE;
        mesh_trace_response $MESH_TRACE_RESPONSE;"
        if [ -n "${GOOGLE_CLOUD_PROJECT:-}" ]; then
            check GOOGLE_CLOUD_PROJECT '^[a-z0-9][a-z0-9.:-]*$' "a Google Cloud project id"
            trace+="
        mesh_trace_project $GOOGLE_CLOUD_PROJECT;"
        fi
    fi

    # Span export: MESH_TRACE_EXPORT=google (Cloud Trace's OTLP endpoint, with the service
    # account's access token) or an OTLP/HTTP URL (an OpenTelemetry collector sidecar).
    local export=""
    if [ -n "${MESH_TRACE_EXPORT:-}" ]; then
        case "$MESH_TRACE_EXPORT" in
        google) export="    mesh_trace_export https://telemetry.googleapis.com/v1/traces auth=google;" ;;
        *)
            check MESH_TRACE_EXPORT '^https?://[A-Za-z0-9._~-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~!&()*+,=:@%/-]*)?$' \
                "google, or an http:// or https:// OTLP/HTTP URL such as http://127.0.0.1:4318/v1/traces"
            export="    mesh_trace_export $(q "$MESH_TRACE_EXPORT");" ;;
        esac
        [ "$MESH_TRACE" = on ] || log warn "MESH_TRACE_EXPORT is set but MESH_TRACE=off: no request is traced, so no span is sent"
    fi
    if [ -n "${MESH_TRACE_SERVICE:-}" ]; then
        check MESH_TRACE_SERVICE '^[A-Za-z0-9._:/-]{1,256}$' "a service name (letters, digits, . _ : / -)"
        export+="
    mesh_trace_service $MESH_TRACE_SERVICE;"
    fi

    # Metrics for the Managed Prometheus sidecar: loopback only (a Cloud Run instance's
    # containers share it), never on PORT.
    local metrics="    # metrics: off (MESH_METRICS_PORT=off)"
    if [ "$MESH_METRICS_PORT" != off ]; then
        metrics="    server {
        listen 127.0.0.1:$MESH_METRICS_PORT;
        mesh_auth off;
        access_log off;
        location = /metrics { mesh_status; }
        location / { return 404; }
    }"
    fi

    local health="        # health path: off (MESH_HEALTH_PATH=off)"
    if [ "$MESH_HEALTH_PATH" != off ]; then
        health="        location = $MESH_HEALTH_PATH {
            mesh_auth off;
            access_log off;
            default_type text/plain;
            return 200 \"ok\\n\";
        }"
    fi

    export _MESH_PORT=$PORT
    export _MESH_WORKERS=$MESH_WORKERS
    export _MESH_ERROR_LOG_LEVEL=$MESH_ERROR_LOG_LEVEL
    export _MESH_SHUTDOWN_TIMEOUT=$MESH_SHUTDOWN_TIMEOUT
    export _MESH_PROVIDERS=${providers%$'\n'}
    export _MESH_AUTH="mesh_auth$auth;"
    export _MESH_ROLES=${roles%$'\n'}
    export _MESH_RATE_ZONE=$zone
    export _MESH_CONFIG_VERSION
    _MESH_CONFIG_VERSION=$(q "$MESH_CONFIG_VERSION")
    export _MESH_TRACE=$trace
    export _MESH_FORWARD_IDENTITY=$MESH_FORWARD_IDENTITY
    export _MESH_HEALTH=$health
    export _MESH_TRACE_EXPORT=$export
    export _MESH_METRICS_SERVER=$metrics
    export _MESH_RULES=${rules%$'\n'}
    export _MESH_RATE_LIMIT=${limit%$'\n'}
    export _MESH_UPSTREAM
    _MESH_UPSTREAM=$(q "$MESH_UPSTREAM")
    local report="mesh_access_report $(q "$REPORT_MD") format=markdown;"
    if [ -n "${MESH_ACCESS_REPORT:-}" ]; then
        check MESH_ACCESS_REPORT '^/.*[^/]$' "an absolute file path such as /reports/access.json"
        report+=$'\n'"    mesh_access_report $(q "$MESH_ACCESS_REPORT");"
    fi
    export _MESH_ACCESS_REPORT=$report
    export _MESH_REAL_IP=$real_ip
    export _MESH_EGRESS_HTTP=${egress_http%$'\n'}
    export _MESH_EGRESS_SERVER=${egress_server%$'\n'}

    envsubst "$(envsubst_list '^_MESH_[A-Z0-9_]+$')" <"$SHARE/nginx.conf.template" >"$RUN_DIR/nginx.conf" \
        || die "cannot render the image's nginx.conf"
}

if [ -n "${MESH_NGINX_CONF:-}" ]; then
    render_templates
    [ -r "$MESH_NGINX_CONF" ] || die "MESH_NGINX_CONF=$MESH_NGINX_CONF cannot be read (is it mounted into the container?)"
    conf=$MESH_NGINX_CONF
    log notice "using $conf as it is (MESH_NGINX_CONF)"
else
    configure_image
    render_templates
    conf=$RUN_DIR/nginx.conf
fi

# --- 5. nginx ----------------------------------------------------------------------------------
# -e stderr: nginx's messages before its configuration is read go to stderr too, never to a file.
rm -f "$REPORT_MD"
nginx -e stderr -c "$conf" -t -q 3>&- || die "nginx -t refused the configuration (the lines above say where); it was rendered to $conf"
# `-t` (docker run IMAGE -t): check the settings and the configuration, start nothing.
if [ "${1:-}" = -t ]; then
    log notice "configuration $conf is valid"
    # The access report of what was just checked (a MESH_NGINX_CONF configuration has one if it
    # says mesh_access_report /tmp/nginx/access-report.md format=markdown;).
    if [ -f "$REPORT_MD" ]; then
        cat "$REPORT_MD"
    fi
    exit 0
fi
nginx -e stderr -c "$conf" -g "daemon off;" 3>&- &
nginx_pid=$!
trap 'kill -QUIT "$nginx_pid" 2>/dev/null || true' TERM QUIT
trap 'kill -TERM "$nginx_pid" 2>/dev/null || true' INT
trap 'kill -HUP "$nginx_pid" 2>/dev/null || true' HUP
trap 'kill -USR1 "$nginx_pid" 2>/dev/null || true' USR1
# A trapped signal interrupts wait; nginx stays a zombie until reaped, so kill -0 tells whether
# it is still to be waited for.
while :; do
    rc=0
    wait "$nginx_pid" || rc=$?
    kill -0 "$nginx_pid" 2>/dev/null || break
done
if [ "$rc" -ne 0 ]; then
    log error "nginx exited with status $rc"
fi
exit "$rc"
