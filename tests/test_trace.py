"""Trace context: W3C `traceparent`/`tracestate`, Google `X-Cloud-Trace-Context`, sampling,
`traceresponse`, the trace variables, internal redirects, proxy/grpc/fastcgi, id uniqueness.

What the upstream receives is read from the echo upstream (every header, duplicates kept), so each
check also asserts that `traceparent` and `X-Cloud-Trace-Context` arrive exactly once and agree
with each other and with the `$mesh_*` variables of the same request.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass

import pytest

from mesh_test.client import Connection, Response, bearer, raw_request
from mesh_test.configs import JWKS_PROVIDER, claims
from mesh_test.nginx import emerg_at_marked_line, passes_nginx_t, render
from mesh_test.upstream import RecordingUpstream
from mesh_test.tokens import jwks_token, now

T = "4bf92f3577b34da6a3ce929d0e0e4736"  # the W3C examples' ids
P = "00f067aa0ba902b7"
T2 = "0af7651916cd43dd8448eb211c80319c"
P2 = "b7ad6b7169203331"
PROJECT = "e2e-trace-proj"

TP_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")
XCTC_RE = re.compile(r"([0-9a-f]{32})/([0-9]+);o=([01])")
ZERO_TRACE, ZERO_SPAN = "0" * 32, "0" * 16

PROVIDER = JWKS_PROVIDER

# Every trace variable, to the upstream (an empty value sends no header) and to a log line.
OBSERVE = """
    proxy_set_header X-Test-Trace   $mesh_trace_id;
    proxy_set_header X-Test-Span    $mesh_span_id;
    proxy_set_header X-Test-Parent  $mesh_parent_span_id;
    proxy_set_header X-Test-Sampled $mesh_trace_sampled;
    proxy_set_header X-Test-Tp      $mesh_traceparent;
    proxy_set_header X-Test-Cloud   $mesh_cloud_trace;
"""

LOG_FORMAT = (
    "log_format tracelog 'TRACELOG uri=$request_uri status=$status trace=$mesh_trace_id "
    "span=$mesh_span_id parent=$mesh_parent_span_id sampled=$mesh_trace_sampled "
    "tp=$mesh_traceparent cloud=$mesh_cloud_trace pid=$pid';\n"
)


def trace_http(grpc_port: int, fcgi_port: int) -> str:
    return (
        PROVIDER
        + LOG_FORMAT
        + f"mesh_trace_project {PROJECT};\n"
        + """
# a peer that answers 503: the first hop of the error_page cases
server {
    listen unix:@TMP@/fail.sock;
    access_log off;
    location / { return 503 "failing peer\\n"; }
}
server {
    listen 127.0.0.1:@PORT@;
    access_log @TMP@/trace.log tracelog;
    mesh_trace on;
    add_header X-Span $mesh_span_id always;
"""
        + OBSERVE
        + f"""
    location /             {{ proxy_pass http://@UPSTREAM@; }}
    location /sample0/     {{ mesh_trace_sample 0; proxy_pass http://@UPSTREAM@; }}
    location /sample1/     {{ mesh_trace_sample 1; proxy_pass http://@UPSTREAM@; }}
    location /sample-half/ {{ mesh_trace_sample 0.5; proxy_pass http://@UPSTREAM@; }}
    location /off/         {{ mesh_trace off; proxy_pass http://@UPSTREAM@; }}
    location /resp/        {{ mesh_trace_response on; proxy_pass http://@UPSTREAM@; }}
    location /resp-auth/   {{ mesh_trace_response on; mesh_auth jwks; proxy_pass http://@UPSTREAM@; }}
    location /resp-off/    {{ mesh_trace_response off; proxy_pass http://@UPSTREAM@; }}
    location /resp-return/ {{ mesh_trace_response on; return 204; }}
    location /resp-static/ {{ mesh_trace_response on; root @TMP@/no-such-dir; }}

    # internal redirects
    location /ep-named/ {{
        proxy_intercept_errors on;
        error_page 503 = @fallback;
        proxy_pass http://unix:@TMP@/fail.sock:;
    }}
    location @fallback  {{ proxy_pass http://@UPSTREAM@; }}
    location /ep-uri/ {{
        proxy_intercept_errors on;
        error_page 503 = /fallback/from-error-page;
        proxy_pass http://unix:@TMP@/fail.sock:;
    }}
    location /fallback/ {{ proxy_pass http://@UPSTREAM@; }}
    location /tf/       {{ root @TMP@; try_files $uri /fallback/from-try-files; }}
    location /tf-ep/    {{ root @TMP@; try_files $uri /ep-uri/from-try-files; }}
    location /idx/      {{ alias @TMP@/; index idx-page.html; }}
    location = /idx/idx-page.html {{ proxy_pass http://@UPSTREAM@; }}
    location /auth-ep/ {{
        mesh_auth jwks;
        proxy_intercept_errors on;
        error_page 503 = @fallback;
        proxy_pass http://unix:@TMP@/fail.sock:;
    }}

    # other upstream protocols
    location /grpc/ {{
        grpc_set_header X-Test-Span $mesh_span_id;
        grpc_set_header X-Test-Trace $mesh_trace_id;
        grpc_pass grpc://127.0.0.1:{grpc_port};
    }}
    location /fcgi/ {{
        fastcgi_param MESH_SPAN  $mesh_span_id;
        fastcgi_param MESH_TRACE $mesh_trace_id;
        fastcgi_pass 127.0.0.1:{fcgi_port};
    }}
}}
"""
    )


# ---------------------------------------------------------------- loopback peers: FastCGI, gRPC (h2c)

class _Peer:
    """A loopback TCP listener; each connection is handled by `handle(sock)` on its own thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            self.handle(conn)
        except Exception as e:  # noqa: BLE001 - reported by the tests
            self.errors.append(repr(e))
        finally:
            conn.close()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("peer closed mid-record")
        out += chunk
    return out


class FastCGIEcho(_Peer):
    """A FastCGI responder: answers 200 with JSON {"headers": [[param, value], ...]} (its params)."""

    def handle(self, conn: socket.socket) -> None:
        params = b""
        request_id = 1
        while True:
            version, rtype, request_id, length, padding, _ = struct.unpack(">BBHHBB", _recv_exact(conn, 8))
            content = _recv_exact(conn, length)
            _recv_exact(conn, padding)
            if rtype == 4:  # FCGI_PARAMS
                params += content
            elif rtype == 5 and length == 0:  # the empty FCGI_STDIN ends the request
                break
        pairs, i = [], 0
        while i < len(params):
            lengths = []
            for _ in range(2):
                if params[i] >> 7:
                    lengths.append(struct.unpack(">I", params[i : i + 4])[0] & 0x7FFFFFFF)
                    i += 4
                else:
                    lengths.append(params[i])
                    i += 1
            name = params[i : i + lengths[0]].decode("latin-1")
            value = params[i + lengths[0] : i + lengths[0] + lengths[1]].decode("latin-1")
            i += lengths[0] + lengths[1]
            pairs.append([name, value])
        body = json.dumps({"headers": pairs}).encode()
        out = b"Status: 200 OK\r\nContent-Type: application/json\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        records = b""
        for k in range(0, len(out), 65535):
            chunk = out[k : k + 65535]
            records += struct.pack(">BBHHBB", 1, 6, request_id, len(chunk), 0, 0) + chunk
        records += struct.pack(">BBHHBB", 1, 6, request_id, 0, 0, 0)  # end of FCGI_STDOUT
        records += struct.pack(">BBHHBB", 1, 3, request_id, 8, 0, 0) + struct.pack(">IB3x", 0, 0)  # END_REQUEST
        conn.sendall(records)


class GrpcEcho(_Peer):
    """An h2c (prior knowledge) server: answers each stream with JSON {"headers": [[name, value], ...]}."""

    def handle(self, conn: socket.socket) -> None:
        import h2.config
        import h2.connection
        import h2.events

        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="latin-1"))
        h2c.initiate_connection()
        conn.sendall(h2c.data_to_send())
        streams: dict[int, list] = {}
        while True:
            try:
                data = conn.recv(65535)
            except (socket.timeout, ConnectionResetError):
                return
            if not data:
                return
            for ev in h2c.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    streams[ev.stream_id] = [[n, v] for n, v in ev.headers]
                elif isinstance(ev, h2.events.DataReceived):
                    h2c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    body = json.dumps({"headers": streams.pop(ev.stream_id, [])}).encode()
                    h2c.send_headers(ev.stream_id, [(":status", "200"), ("content-type", "application/json"),
                                                    ("content-length", str(len(body)))])
                    h2c.send_data(ev.stream_id, body, end_stream=True)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    conn.sendall(h2c.data_to_send())
                    return
            conn.sendall(h2c.data_to_send())


# ---------------------------------------------------------------- fixtures and checks

@pytest.fixture(scope="module")
def peers():
    fcgi, grpc = FastCGIEcho(), GrpcEcho()
    yield grpc, fcgi
    fcgi.close()
    grpc.close()
    assert not fcgi.errors, f"FastCGI peer errors: {fcgi.errors}"
    assert not grpc.errors, f"gRPC peer errors: {grpc.errors}"


@pytest.fixture(scope="module")
def site(module_path, launcher, peers):
    grpc, fcgi = peers
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
        s = launcher.start(trace_http(grpc.port, fcgi.port), files={"idx-page.html": b"static index page\n"})
    return s


@dataclass
class Hop:
    trace: str
    span: str
    sampled: bool
    parent: str | None  # $mesh_parent_span_id ("" is sent as no header)
    tracestate: list[str]
    traceparent: str


def hop_of(resp: Response, *, project: str | None = PROJECT) -> Hop:
    """What the echo upstream got: one traceparent and one X-Cloud-Trace-Context, consistent with
    each other and with every $mesh_* trace variable of the request."""
    assert resp.status == 200, resp
    tps = resp.upstream_headers("traceparent")
    assert len(tps) == 1, f"upstream got {len(tps)} traceparent headers: {tps}"
    m = TP_RE.fullmatch(tps[0])
    assert m, f"traceparent sent upstream is not 00-TRACE-SPAN-0[01]: {tps[0]!r}"
    trace, span, flags = m.groups()
    assert trace != ZERO_TRACE and span != ZERO_SPAN, tps[0]
    xs = resp.upstream_headers("X-Cloud-Trace-Context")
    assert len(xs) == 1, f"upstream got {len(xs)} X-Cloud-Trace-Context headers: {xs}"
    mx = XCTC_RE.fullmatch(xs[0])
    assert mx, f"X-Cloud-Trace-Context sent upstream is not TRACE/DECIMAL;o=0|1: {xs[0]!r}"
    assert mx.group(1) == trace, f"XCTC trace {mx.group(1)} != traceparent trace {trace}"
    assert int(mx.group(2)) == int(span, 16), f"XCTC span {mx.group(2)} != traceparent span {span} (hex)"
    assert mx.group(2) == str(int(mx.group(2))), f"XCTC span has leading zeros: {xs[0]!r}"
    assert mx.group(3) == flags[1], f"XCTC o={mx.group(3)} but traceparent flags {flags}"
    # the variables, for the same request
    for var, header, value in (("$mesh_trace_id", "X-Test-Trace", trace), ("$mesh_span_id", "X-Test-Span", span),
                               ("$mesh_trace_sampled", "X-Test-Sampled", flags[1]),
                               ("$mesh_traceparent", "X-Test-Tp", tps[0])):
        got = resp.upstream_header(header)
        assert got == value, f"{var} is {got!r} but the upstream got traceparent {tps[0]!r}"
    if project is not None:
        assert resp.upstream_header("X-Test-Cloud") == f"projects/{project}/traces/{trace}", resp
    assert resp.header("X-Span") == span, "the response's $mesh_span_id differs from the upstream's span"
    parent = resp.upstream_header("X-Test-Parent")
    if parent is not None:
        assert re.fullmatch(r"[0-9a-f]{16}", parent), parent
        assert parent != span, f"the new span equals the parent {parent}"
    return Hop(trace, span, flags == "01", parent, resp.upstream_headers("tracestate"), tps[0])


def send(site, path: str, headers=None) -> Response:
    return site.get(path, headers)


def assert_new_trace(hop: Hop, *not_these: str) -> None:
    assert hop.trace not in (T, T2, *not_these), f"expected a new trace id, got the incoming {hop.trace}"
    assert hop.parent is None, f"a new trace has no parent, got $mesh_parent_span_id={hop.parent}"


def assert_kept(hop: Hop, trace: str, parent: str) -> None:
    assert hop.trace == trace, f"trace id not kept: sent {trace}, upstream got {hop.trace}"
    assert hop.parent == parent, f"$mesh_parent_span_id: expected {parent}, got {hop.parent}"
    assert hop.span != parent


def _nonce() -> str:
    return f"{time.time_ns():x}"


def log_line(site, mark: int, uri: str) -> dict:
    text = site.ngx.wait_log(mark, lambda t: f"uri={uri} " in t, name="trace.log")
    lines = [l for l in text.splitlines() if f"uri={uri} " in l]
    assert len(lines) == 1, f"expected one trace.log line for {uri}:\n{text}"
    return dict(re.findall(r"(\w+)=(\S*)", lines[0]))


# ---------------------------------------------------------------- traceparent

STATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"

# (id, traceparent values sent, kept?, sampled as sent upstream)
TRACEPARENT_CASES = [
    ("valid-sampled", [f"00-{T}-{P}-01"], True, True),
    ("valid-unsampled", [f"00-{T}-{P}-00"], True, False),
    ("flags-03-sampled-sent-as-01", [f"00-{T}-{P}-03"], True, True),
    ("flags-02-unsampled-sent-as-00", [f"00-{T}-{P}-02"], True, False),
    ("flags-ff-sent-as-01", [f"00-{T}-{P}-ff"], True, True),
    ("flags-0a-sent-as-00", [f"00-{T}-{P}-0a"], True, False),
    ("version-01-with-extra-fields", [f"01-{T}-{P}-01-what-the-future-will-be-like"], True, True),
    ("version-01-exactly-55", [f"01-{T}-{P}-00"], True, False),
    ("version-fe-with-extra-fields", [f"fe-{T}-{P}-01-x-y"], True, True),
    ("version-ff", [f"ff-{T}-{P}-01"], False, True),
    ("version-00-with-extra-fields", [f"00-{T}-{P}-01-extra"], False, True),
    ("version-01-extra-without-dash", [f"01-{T}-{P}-01x"], False, True),
    ("uppercase-trace-id", [f"00-{T.upper()}-{P}-01"], False, True),
    ("uppercase-parent-id", [f"00-{T}-{P.upper()}-01"], False, True),
    ("uppercase-flags", [f"00-{T}-{P}-0A"], False, True),
    ("uppercase-version", [f"0A-{T}-{P}-01"], False, True),
    ("all-zero-trace-id", [f"00-{ZERO_TRACE}-{P}-01"], False, True),
    ("all-zero-parent-id", [f"00-{T}-{ZERO_SPAN}-01"], False, True),
    ("trace-id-31", [f"00-{T[:-1]}-{P}-01"], False, True),
    ("trace-id-33", [f"00-{T}a-{P}-01"], False, True),
    ("parent-id-15", [f"00-{T}-{P[:-1]}-01"], False, True),
    ("parent-id-17", [f"00-{T}-{P}a-01"], False, True),
    ("flags-1-digit", [f"00-{T}-{P}-1"], False, True),
    ("flags-3-digits", [f"00-{T}-{P}-001"], False, True),
    ("version-1-digit", [f"0-{T}-{P}-01"], False, True),
    ("version-3-digits", [f"000-{T}-{P}-01"], False, True),
    ("non-hex-trace-id", [f"00-{T[:-1]}g-{P}-01"], False, True),
    ("underscore-separator", [f"00_{T}-{P}-01"], False, True),
    ("missing-flags", [f"00-{T}-{P}"], False, True),
    ("garbage", ["hello"], False, True),
    ("two-identical-headers", [f"00-{T}-{P}-01", f"00-{T}-{P}-01"], False, True),
    ("two-different-headers", [f"00-{T}-{P}-01", f"00-{T2}-{P2}-01"], False, True),
]


@pytest.mark.parametrize("values,kept,sampled", [c[1:] for c in TRACEPARENT_CASES],
                         ids=[c[0] for c in TRACEPARENT_CASES])
def test_incoming_traceparent(site, values, kept, sampled):
    headers = [("traceparent", v) for v in values] + [("tracestate", STATE)]
    hop = hop_of(send(site, f"/tp/{_nonce()}", headers))
    assert hop.sampled is sampled, f"sampled: expected {sampled}, upstream got {hop.traceparent}"
    if kept:
        assert_kept(hop, T, P)
        assert hop.tracestate == [STATE], f"tracestate of a valid traceparent must pass: {hop.tracestate}"
    else:
        assert_new_trace(hop)
        assert hop.tracestate == [], f"tracestate kept although the traceparent was invalid: {hop.tracestate}"


def test_a_valid_traceparent_without_tracestate_sends_none(site):
    hop = hop_of(send(site, "/tp/no-state", [("traceparent", f"00-{T}-{P}-01")]))
    assert_kept(hop, T, P)
    assert hop.tracestate == []


def test_no_incoming_context_starts_a_new_sampled_trace(site):
    hops = [hop_of(send(site, f"/tp/fresh-{i}")) for i in range(5)]
    for hop in hops:
        assert hop.parent is None and hop.sampled, hop
    assert len({h.trace for h in hops}) == 5, "each request without context gets its own trace id"
    assert len({h.span for h in hops}) == 5


def test_the_span_is_new_on_every_request_with_the_same_parent(site):
    hops = [hop_of(send(site, f"/tp/same-{i}", [("traceparent", f"00-{T}-{P}-01")])) for i in range(5)]
    for hop in hops:
        assert_kept(hop, T, P)
    assert len({h.span for h in hops}) == 5


@pytest.mark.parametrize("names", [
    ("TRACEPARENT", "TRACESTATE", "X-CLOUD-TRACE-CONTEXT"),
    ("TraceParent", "TraceState", "x-cloud-trace-context"),
], ids=["upper-case", "mixed-case"])
def test_header_names_in_any_case_are_read_and_replaced(site, names):
    tp, ts, xc = names
    hop = hop_of(send(site, f"/case/{_nonce()}", [(tp, f"00-{T}-{P}-01"), (ts, STATE), (xc, f"{T2}/5;o=0")]))
    assert_kept(hop, T, P)
    assert hop.tracestate == [STATE]
    hop = hop_of(send(site, f"/case/{_nonce()}", [(xc, f"{T2}/5;o=0")]))
    assert_kept(hop, T2, f"{5:016x}")


def _raw_http10(port: int, header_lines: list[str], path: str) -> Response:
    """An HTTP/1.0 request without Host: the given headers are all of nginx's header list."""
    data = "\r\n".join([f"GET {path} HTTP/1.0", *header_lines]).encode("latin-1") + b"\r\n\r\n"
    return raw_request(port, data)


@pytest.mark.parametrize("extra", [0, 1, 17, 18, 19, 20, 38, 60])
@pytest.mark.parametrize("path", ["/raw/", "/ep-uri/"], ids=["proxy", "error-page"])
def test_trace_headers_as_the_whole_or_the_tail_of_the_header_list(site, echo, extra, path):
    # the trace headers first, then `extra` others, so that removing them empties a whole part
    # of nginx's header list (20 entries a part) or leaves it just full
    trace_lines = [f"traceparent: 00-{T}-{P}-01", f"tracestate: {STATE}", f"X-Cloud-Trace-Context: {T2}/5;o=0",
                   f"traceparent: 00-{T}-{P}-01"]
    others = [f"X-Other-{i:02d}: v{i}" for i in range(extra)]
    for lines in (trace_lines[:3] + others, others + trace_lines[:3], others[:extra // 2] + trace_lines[:3] + others[extra // 2:]):
        resp = _raw_http10(site.port, lines, f"{path}raw-{_nonce()}")
        hop = hop_of(resp)
        assert_kept(hop, T, P)
        assert hop.tracestate == [STATE]
        got = [(n, v) for n, v in resp.json()["headers"] if n.startswith("X-Other-")]
        assert got == [tuple(l.split(": ", 1)) for l in others], "other headers lost or reordered"
    resp = _raw_http10(site.port, trace_lines, f"{path}raw-dup-{_nonce()}")
    hop = hop_of(resp)
    assert_new_trace(hop)  # two traceparents: an invalid context, a new trace (XCTC not used)
    assert hop.tracestate == []


# ---------------------------------------------------------------- tracestate

TS_256 = "a=" + "x" * 254   # one member of 256 characters (a value is at most 256)
TS_255 = "b=" + "y" * 253
TS_256B = "b=" + "y" * 254
assert len(f"{TS_256},{TS_255}") == 512 and len(f"{TS_256},{TS_256B}") == 513

TRACESTATE_CASES = [
    ("one-member", ["rojo=00f067aa0ba902b7"], "rojo=00f067aa0ba902b7"),
    ("two-members", [STATE], STATE),
    ("multi-tenant-key", ["fw529a3039@dt=FW4;0;0;0;0;0;0;ad"], "fw529a3039@dt=FW4;0;0;0;0;0;0;ad"),
    ("two-headers-joined", ["rojo=00f067aa0ba902b7", "congo=t61rcWkgMzE"], "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
    ("three-headers-joined", ["a=1", "b=2", "c=3"], "a=1,b=2,c=3"),
    ("32-members", [",".join(f"k{i}=v{i}" for i in range(32))], ",".join(f"k{i}=v{i}" for i in range(32))),
    ("uppercase-key", ["Rojo=1"], None),
    ("duplicate-key", ["rojo=1,rojo=2"], None),
    ("duplicate-key-across-headers", ["rojo=1", "rojo=2"], None),
    ("member-without-equals", ["rojo"], None),
    ("33-members", [",".join(f"k{i}=v{i}" for i in range(33))], None),
    ("value-with-equals", ["rojo=a=b"], None),
    # W3C 3.3.1.5: the combined value (commas included) is passed on up to 512 characters;
    # each header alone is valid, only their joined value is over the limit
    ("two-headers-joined-512-characters", [TS_256, TS_255], f"{TS_256},{TS_255}"),
    ("two-headers-joined-513-characters", [TS_256, TS_256B], None),
    ("one-header-513-characters", [f"{TS_256},{TS_256B}"], None),
]


@pytest.mark.parametrize("values,expected", [c[1:] for c in TRACESTATE_CASES], ids=[c[0] for c in TRACESTATE_CASES])
def test_tracestate_with_a_valid_traceparent(site, values, expected):
    headers = [("traceparent", f"00-{T}-{P}-01")] + [("tracestate", v) for v in values]
    hop = hop_of(send(site, f"/ts/{_nonce()}", headers))
    assert_kept(hop, T, P)
    if expected is None:
        assert hop.tracestate == [], f"an invalid tracestate was passed on: {hop.tracestate}"
    else:
        assert hop.tracestate == [expected], f"tracestate: expected exactly [{expected!r}], got {hop.tracestate}"


@pytest.mark.parametrize("context", [
    [],
    [("traceparent", f"00-{T}-{ZERO_SPAN}-01")],
    [("traceparent", f"ff-{T}-{P}-01")],
    [("X-Cloud-Trace-Context", f"{T}/12345;o=1")],
    [("traceparent", f"00-{T}-{P}-01"), ("traceparent", f"00-{T}-{P}-01")],
], ids=["no-traceparent", "invalid-traceparent", "version-ff", "cloud-trace-only", "two-traceparents"])
def test_tracestate_without_a_valid_traceparent_is_dropped(site, context):
    hop = hop_of(send(site, f"/ts/drop-{_nonce()}", context + [("tracestate", STATE), ("tracestate", "x=1")]))
    assert hop.tracestate == [], f"tracestate passed without a valid traceparent: {hop.tracestate}"


# ---------------------------------------------------------------- X-Cloud-Trace-Context

@pytest.mark.parametrize("span_dec", [12345, 1, 2**63, 2**64 - 1], ids=["12345", "one", "2^63", "u64-max"])
@pytest.mark.parametrize("option,sampled", [("o=1", True), ("o=0", False)])
def test_incoming_cloud_trace_context(site, span_dec, option, sampled):
    hop = hop_of(send(site, f"/xctc/{_nonce()}", [("X-Cloud-Trace-Context", f"{T}/{span_dec};{option}")]))
    assert_kept(hop, T, f"{span_dec:016x}")
    assert hop.sampled is sampled, f"{option} not kept: {hop.traceparent}"
    assert hop.tracestate == []


@pytest.mark.parametrize("path,sampled", [("/sample0/", False), ("/sample1/", True), ("/", True)],
                         ids=["ratio-0", "ratio-1", "default-ratio"])
def test_cloud_trace_context_without_options_is_decided_by_the_ratio(site, path, sampled):
    for i in range(8):
        hop = hop_of(send(site, f"{path}xctc-noopt-{i}", [("X-Cloud-Trace-Context", f"{T}/777")]))
        assert_kept(hop, T, f"{777:016x}")
        assert hop.sampled is sampled, f"{path}: expected sampled={sampled}, got {hop.traceparent}"


@pytest.mark.parametrize("path,option,sampled", [("/sample0/", "o=1", True), ("/sample1/", "o=0", False)],
                         ids=["o1-at-ratio-0", "o0-at-ratio-1"])
def test_cloud_trace_decision_is_kept_whatever_the_ratio(site, path, option, sampled):
    hop = hop_of(send(site, f"{path}xctc-kept", [("X-Cloud-Trace-Context", f"{T}/99;{option}")]))
    assert_kept(hop, T, f"{99:016x}")
    assert hop.sampled is sampled


def test_cloud_trace_context_trace_id_in_upper_case_is_kept_in_lower_case(site):
    hop = hop_of(send(site, "/xctc/upper", [("X-Cloud-Trace-Context", f"{T.upper()}/5;o=1")]))
    assert_kept(hop, T, f"{5:016x}")


BAD_XCTC = [
    ("span-zero", f"{T}/0;o=1"),
    ("span-overflow", f"{T}/{2**64};o=1"),
    ("span-missing", f"{T}/;o=1"),
    ("span-negative", f"{T}/-5;o=1"),
    ("span-hex", f"{T}/12ab;o=1"),
    ("no-slash", f"{T};o=1"),
    ("trace-only", T),
    ("trace-31", f"{T[:-1]}/5;o=1"),
    ("trace-zero", f"{ZERO_TRACE}/5;o=1"),
    ("option-2", f"{T}/5;o=2"),
    ("unknown-option", f"{T}/5;x=1"),
]


@pytest.mark.parametrize("value", [c[1] for c in BAD_XCTC], ids=[c[0] for c in BAD_XCTC])
def test_invalid_cloud_trace_context_starts_a_new_trace(site, value):
    hop = hop_of(send(site, f"/xctc/bad-{_nonce()}", [("X-Cloud-Trace-Context", value)]))
    assert_new_trace(hop)


def test_traceparent_wins_over_cloud_trace_context(site):
    headers = [("X-Cloud-Trace-Context", f"{T2}/12345;o=0"), ("traceparent", f"00-{T}-{P}-01")]
    hop = hop_of(send(site, "/xctc/both", headers))
    assert_kept(hop, T, P)
    assert hop.sampled


def test_an_invalid_traceparent_starts_a_new_trace_even_with_cloud_trace_context(site):
    # W3C Trace Context: an invalid traceparent starts a new trace and drops tracestate;
    # X-Cloud-Trace-Context counts only when no traceparent came at all
    headers = [("traceparent", f"00-{T}-{ZERO_SPAN}-01"), ("X-Cloud-Trace-Context", f"{T2}/4660;o=0"),
               ("tracestate", STATE)]
    hop = hop_of(send(site, "/xctc/fallback", headers))
    assert_new_trace(hop)
    assert hop.tracestate == []


# ---------------------------------------------------------------- sampling

def test_sample_ratio_0_leaves_new_traces_unsampled(site):
    for i in range(20):
        hop = hop_of(send(site, f"/sample0/new-{i}"))
        assert hop.parent is None
        assert not hop.sampled, f"mesh_trace_sample 0 sampled a new trace: {hop.traceparent}"


def test_sample_ratio_1_and_the_default_sample_every_new_trace(site):
    for path in ("/sample1/", "/"):
        for i in range(20):
            hop = hop_of(send(site, f"{path}new-{i}"))
            assert hop.sampled, f"{path}: a new trace was not sampled: {hop.traceparent}"


@pytest.mark.parametrize("path,flags,sampled", [("/sample0/", "01", True), ("/sample1/", "00", False),
                                                ("/sample0/", "00", False), ("/sample1/", "01", True)],
                         ids=["01-at-ratio-0", "00-at-ratio-1", "00-at-ratio-0", "01-at-ratio-1"])
def test_an_incoming_decision_is_kept_whatever_the_ratio(site, path, flags, sampled):
    hop = hop_of(send(site, f"{path}kept", [("traceparent", f"00-{T}-{P}-{flags}")]))
    assert_kept(hop, T, P)
    assert hop.sampled is sampled


def test_sample_ratio_one_half_samples_about_half(site):
    conn = Connection(site.port)
    sampled = 0
    try:
        for i in range(400):
            hop = hop_of(conn.request(f"/sample-half/{i}"))
            sampled += hop.sampled
    finally:
        conn.close()
    # binomial(400, 0.5): mean 200, sd 10; 120..280 is 8 sd either way
    assert 120 <= sampled <= 280, f"mesh_trace_sample 0.5 sampled {sampled} of 400 new traces"


# ---------------------------------------------------------------- traceresponse

def test_traceresponse_names_this_hops_span(site):
    resp = send(site, "/resp/x", [("traceparent", f"00-{T}-{P}-01")])
    hop = hop_of(resp)
    assert resp.header("traceresponse") == f"00-{T}-{hop.span}-01", resp
    resp = send(site, "/resp/y")
    hop = hop_of(resp)
    assert resp.header("traceresponse") == f"00-{hop.trace}-{hop.span}-01", resp
    resp = send(site, "/resp/z", [("X-Cloud-Trace-Context", f"{T2}/77;o=0")])
    hop = hop_of(resp)
    assert resp.header("traceresponse") == f"00-{T2}-{hop.span}-00", resp


@pytest.mark.parametrize("path", ["/", "/resp-off/"], ids=["default", "off"])
def test_no_traceresponse_unless_asked_for(site, path):
    resp = send(site, f"{path}no-traceresponse", [("traceparent", f"00-{T}-{P}-01")])
    hop_of(resp)
    assert resp.all("traceresponse") == [], resp


def test_traceresponse_on_a_refusal_and_the_refusal_log_names_the_trace(site, keyring, echo):
    before = echo.requests
    mark = site.ngx.log_mark()
    resp = send(site, "/resp-auth/x", [("traceparent", f"00-{T}-{P}-01")])
    assert resp.status == 401, resp
    assert echo.requests == before
    tr = resp.header("traceresponse")
    m = TP_RE.fullmatch(tr or "")
    assert m and m.group(1) == T and m.group(3) == "01" and m.group(2) not in (P, ZERO_SPAN), resp
    assert resp.header("X-Span") == m.group(2), "traceresponse and $mesh_span_id disagree"
    text = site.ngx.wait_log(mark, lambda t: "[info]" in t and "mesh:" in t)
    lines = [l for l in text.splitlines() if "[info]" in l and "mesh:" in l]
    assert len(lines) == 1 and f"trace: {T}" in lines[0], f"the refusal line must name trace {T}:\n{text}"

    expired = jwks_token(keyring, claims(exp=now() - 600, iat=now() - 900))
    resp = send(site, "/resp-auth/y", bearer(expired))
    assert resp.status == 401
    assert TP_RE.fullmatch(resp.header("traceresponse") or ""), resp

    resp = send(site, "/resp-auth/z", bearer(jwks_token(keyring, claims())) + [("traceparent", f"00-{T}-{P}-00")])
    hop = hop_of(resp)
    assert resp.header("traceresponse") == f"00-{T}-{hop.span}-00"


def test_traceresponse_where_the_module_does_not_proxy(site):
    # a `return` (rewrite phase) and a static 404: the header filter still names this hop's span
    resp = send(site, "/resp-return/x", [("traceparent", f"00-{T}-{P}-01")])
    assert resp.status == 204, resp
    m = TP_RE.fullmatch(resp.header("traceresponse") or "")
    assert m and m.group(1) == T and m.group(2) not in (P, ZERO_SPAN) and m.group(3) == "01", resp
    assert resp.header("X-Span") == m.group(2), resp
    resp = send(site, "/resp-static/no-such-file", [("traceparent", f"00-{T}-{P}-00")])
    assert resp.status == 404, resp
    m = TP_RE.fullmatch(resp.header("traceresponse") or "")
    assert m and m.group(1) == T and m.group(3) == "00" and resp.header("X-Span") == m.group(2), resp


# ---------------------------------------------------------------- mesh_trace off

def test_mesh_trace_off_leaves_the_headers_alone_and_the_variables_empty(site):
    sent = [("traceparent", f"00-{T}-{P}-01"), ("traceparent", "garbage"), ("tracestate", "Rojo=1"),
            ("X-Cloud-Trace-Context", f"{T2}/5;o=1")]
    resp = send(site, "/off/x", sent)
    assert resp.status == 200, resp
    assert resp.upstream_headers("traceparent") == [f"00-{T}-{P}-01", "garbage"]
    assert resp.upstream_headers("tracestate") == ["Rojo=1"]
    assert resp.upstream_headers("X-Cloud-Trace-Context") == [f"{T2}/5;o=1"]
    for name in ("X-Test-Trace", "X-Test-Span", "X-Test-Parent", "X-Test-Sampled", "X-Test-Tp", "X-Test-Cloud"):
        assert resp.upstream_headers(name) == [], f"{name} must be empty where mesh_trace is off: {resp!r}"
    assert resp.all("X-Span") == []
    resp = send(site, "/off/nothing")
    assert resp.upstream_headers("traceparent") == [] and resp.upstream_headers("X-Cloud-Trace-Context") == []


def test_trace_variables_in_the_access_log_match_the_upstream(site):
    mark = site.ngx.log_mark("trace.log")
    uri = f"/log/{_nonce()}"
    hop = hop_of(send(site, uri, [("traceparent", f"00-{T}-{P}-01")]))
    f = log_line(site, mark, uri)
    assert (f["trace"], f["span"], f["parent"], f["sampled"], f["tp"]) == (T, hop.span, P, "1", hop.traceparent), f
    assert f["cloud"] == f"projects/{PROJECT}/traces/{T}", f
    mark = site.ngx.log_mark("trace.log")
    uri = f"/off/log-{_nonce()}"
    send(site, uri)
    f = log_line(site, mark, uri)
    for name in ("trace", "span", "parent", "sampled", "tp", "cloud"):
        assert f[name] in ("", "-"), f"${name} logged where mesh_trace is off: {f}"


# ---------------------------------------------------------------- internal redirects

REDIRECTS = [
    ("error-page-named", "/ep-named/"),
    ("error-page-uri", "/ep-uri/"),
    ("try-files", "/tf/"),
    ("try-files-then-error-page", "/tf-ep/"),
    ("index", "/idx/"),
]


@pytest.mark.parametrize("incoming", [True, False], ids=["traceparent-sent", "no-context"])
@pytest.mark.parametrize("path", [c[1] for c in REDIRECTS], ids=[c[0] for c in REDIRECTS])
def test_after_an_internal_redirect_each_header_is_sent_once(site, echo, path, incoming):
    headers = [("traceparent", f"00-{T}-{P}-01"), ("tracestate", STATE),
               ("X-Cloud-Trace-Context", f"{T2}/5;o=0")] if incoming else []
    # index only answers the directory itself: tell requests apart by the query string
    uri = f"/idx/?n={_nonce()}" if path == "/idx/" else f"{path}{_nonce()}"
    mark = site.ngx.log_mark("trace.log")
    before = echo.requests
    resp = send(site, uri, headers)
    assert echo.requests == before + 1, f"the echo upstream got {echo.requests - before} requests"
    hop = hop_of(resp)
    if incoming:
        assert_kept(hop, T, P)
        assert hop.tracestate == [STATE], hop.tracestate
    else:
        assert hop.parent is None and hop.tracestate == []
    f = log_line(site, mark, uri)
    assert f["span"] == hop.span, f"access log span {f['span']} != span sent upstream {hop.span}"
    assert f["trace"] == hop.trace and f["tp"] == hop.traceparent, f


def test_an_internal_redirect_after_authentication_keeps_one_span(site, keyring):
    mark = site.ngx.log_mark("trace.log")
    uri = f"/auth-ep/{_nonce()}"
    hop = hop_of(send(site, uri, bearer(jwks_token(keyring, claims())) + [("traceparent", f"00-{T}-{P}-01")]))
    assert_kept(hop, T, P)
    assert log_line(site, mark, uri)["span"] == hop.span


# ---------------------------------------------------------------- subrequests (auth_request, mirror)

# auth_request is not in nginx's default build: Debian's has it, and `make build-vendored`
# configures the 1.28 build with it (test_harness checks the binary has it)
AUTH_REQUEST_LOCATIONS = "    location /authreq/  { auth_request /auth; proxy_pass http://@UPSTREAM@; }"


def subrequest_http(rec_port: int) -> str:
    return (LOG_FORMAT + """
server {
    listen 127.0.0.1:@PORT@;
    access_log @TMP@/trace.log tracelog;
    mesh_trace on;
    add_header X-Span $mesh_span_id always;
""" + OBSERVE + f"""
{AUTH_REQUEST_LOCATIONS}
    location = /auth    {{ internal; proxy_pass http://127.0.0.1:{rec_port}/auth$request_uri; }}
    location /mirrored/ {{ mirror /mirror; proxy_pass http://@UPSTREAM@; }}
    location = /mirror  {{ internal; proxy_pass http://127.0.0.1:{rec_port}/mirror$request_uri; }}
}}
""")


@pytest.fixture(scope="module")
def recorder():
    rec = RecordingUpstream()
    yield rec
    rec.stop()


@pytest.fixture(scope="module")
def subreq_site(module_path, launcher, recorder):
    return launcher.start(subrequest_http(recorder.port))


def _trace_headers_of(headers: list) -> tuple[list[str], list[str]]:
    tps = [v for n, v in headers if n.lower() == "traceparent"]
    xs = [v for n, v in headers if n.lower() == "x-cloud-trace-context"]
    return tps, xs


SUBREQ_LAYOUTS = [0, 1, 2, 16, 17, 18, 19, 40]


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("extra", SUBREQ_LAYOUTS)
@pytest.mark.parametrize("kind", ["authreq", "mirrored"])
def test_a_subrequest_leaves_the_main_requests_trace_intact(subreq_site, recorder, kind, extra, where):
    others = [(f"X-Other-{i:02d}", f"v{i}") for i in range(extra)]
    trace = [("traceparent", f"00-{T}-{P}-01"), ("X-Cloud-Trace-Context", f"{T2}/5;o=0")]
    sent = trace + others if where == "first" else others + trace
    uri = f"/{kind}/{extra}-{where}-{_nonce()}"
    mark = subreq_site.ngx.log_mark("trace.log")
    resp = subreq_site.get(uri, sent)
    # the main request: one of each header, the client's parent, the span the log names
    hop = hop_of(resp, project=None)
    assert_kept(hop, T, P)
    f = log_line(subreq_site, mark, uri)
    assert f["span"] == hop.span, f"access log $mesh_span_id {f['span']} != span sent upstream {hop.span}"
    got = [(n, v) for n, v in resp.json()["headers"] if n.startswith("X-Other-")]
    assert got == others, "other headers lost or reordered"
    # the subrequest's upstream: one of each header too, in the same trace
    sub = recorder.received(("/auth" if kind == "authreq" else "/mirror") + uri)
    tps, xs = _trace_headers_of(sub)
    assert len(tps) == 1 and len(xs) == 1, f"the {kind} subrequest's upstream got traceparent {tps}, XCTC {xs}"
    assert tps[0].startswith(f"00-{T}-"), tps


# ---------------------------------------------------------------- grpc_pass, fastcgi_pass

def test_grpc_pass_sends_each_trace_header_once(site):
    resp = send(site, "/grpc/x", [("traceparent", f"00-{T}-{P}-01"), ("traceparent", f"00-{T2}-{P2}-01"),
                                  ("tracestate", STATE), ("X-Cloud-Trace-Context", "not-a-context")])
    assert resp.status == 200, resp
    tps = resp.upstream_headers("traceparent")
    assert len(tps) == 1 and TP_RE.fullmatch(tps[0]), f"grpc upstream got traceparent {tps}"
    trace, span, _ = TP_RE.fullmatch(tps[0]).groups()
    assert trace not in (T, T2), "two traceparent headers must start a new trace"
    assert resp.upstream_headers("tracestate") == []
    xs = resp.upstream_headers("x-cloud-trace-context")
    assert len(xs) == 1 and xs[0] == f"{trace}/{int(span, 16)};o=1", xs
    assert resp.upstream_header("x-test-span") == span and resp.header("X-Span") == span

    resp = send(site, "/grpc/y", [("traceparent", f"00-{T}-{P}-00"), ("tracestate", STATE)])
    tps = resp.upstream_headers("traceparent")
    assert len(tps) == 1 and tps[0].startswith(f"00-{T}-") and tps[0].endswith("-00"), tps
    assert resp.upstream_headers("tracestate") == [STATE]
    assert len(resp.upstream_headers("x-cloud-trace-context")) == 1


def test_fastcgi_pass_sends_each_trace_param_once(site):
    resp = send(site, "/fcgi/x", [("traceparent", f"00-{T}-{P}-01"), ("traceparent", f"00-{T2}-{P2}-01"),
                                  ("tracestate", STATE), ("X-Cloud-Trace-Context", "not-a-context")])
    assert resp.status == 200, resp
    tps = resp.upstream_headers("HTTP_TRACEPARENT")
    assert len(tps) == 1 and TP_RE.fullmatch(tps[0]), f"fastcgi peer got HTTP_TRACEPARENT {tps}"
    trace, span, _ = TP_RE.fullmatch(tps[0]).groups()
    assert trace not in (T, T2)
    assert resp.upstream_headers("HTTP_TRACESTATE") == []
    xs = resp.upstream_headers("HTTP_X_CLOUD_TRACE_CONTEXT")
    assert xs == [f"{trace}/{int(span, 16)};o=1"], xs
    assert resp.upstream_header("MESH_SPAN") == span and resp.upstream_header("MESH_TRACE") == trace

    resp = send(site, "/fcgi/y", [("traceparent", f"00-{T}-{P}-01"), ("tracestate", "a=1"), ("tracestate", "b=2")])
    tps = resp.upstream_headers("HTTP_TRACEPARENT")
    assert len(tps) == 1 and tps[0].startswith(f"00-{T}-"), tps
    assert resp.upstream_headers("HTTP_TRACESTATE") == ["a=1,b=2"]
    assert len(resp.upstream_headers("HTTP_X_CLOUD_TRACE_CONTEXT")) == 1


# ---------------------------------------------------------------- uniqueness across workers and restarts

STRESS_HTTP = """
log_format spanlog 'SPAN $pid $mesh_span_id $mesh_trace_id $request_uri';
server {
    listen unix:@TMP@/inner.sock;
    access_log off;
    location / { return 200 "$http_traceparent|$http_x_cloud_trace_context"; }
}
server {
    listen 127.0.0.1:@PORT@ reuseport;
    access_log @TMP@/spans.log spanlog;
    mesh_trace on;
    add_header X-Span $mesh_span_id;
    location / { proxy_pass http://unix:@TMP@/inner.sock:; }
}
"""

STRESS_N = 10_000
STRESS_THREADS = 4
STRESS_PER_CONN = 200


def _stress(port: int, run: int) -> tuple[list[str], list[str], list[str]]:
    """STRESS_N requests over keep-alive connections; every other one carries a traceparent with a
    trace id of its own. Returns (spans, new trace ids, problems)."""
    spans: list[str] = []
    new_traces: list[str] = []
    problems: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        my_spans, my_new, my_problems = [], [], []
        conn = None
        try:
            for i in range(k, STRESS_N, STRESS_THREADS):
                if conn is None or (i // STRESS_THREADS) % STRESS_PER_CONN == 0:
                    if conn is not None:
                        conn.close()
                    conn = Connection(port)
                sent_trace = f"{run:02x}{i:030x}" if i % 2 else None
                sent_parent = f"{i + 1:016x}"
                headers = [("traceparent", f"00-{sent_trace}-{sent_parent}-01")] if sent_trace else None
                resp = conn.request(f"/r{run}/{i}", headers)
                tp, _, xctc = resp.body.decode().partition("|")
                m = TP_RE.fullmatch(tp)
                if resp.status != 200 or not m:
                    my_problems.append(f"/r{run}/{i}: {resp!r}")
                    continue
                trace, span, flags = m.groups()
                if resp.header("X-Span") != span or xctc != f"{trace}/{int(span, 16)};o={flags[1]}":
                    my_problems.append(f"/r{run}/{i}: span/XCTC mismatch: {resp!r}")
                if sent_trace:
                    if trace != sent_trace or span == sent_parent:
                        my_problems.append(f"/r{run}/{i}: sent {sent_trace}/{sent_parent}, got {tp}")
                else:
                    my_new.append(trace)
                my_spans.append(span)
        except Exception as e:  # noqa: BLE001
            my_problems.append(f"thread {k}: {e!r}")
        finally:
            if conn is not None:
                conn.close()
            with lock:
                spans.extend(my_spans)
                new_traces.extend(my_new)
                problems.extend(my_problems)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(STRESS_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return spans, new_traces, problems


def _logged_pids(ngx, expected: int) -> set[str]:
    text = ngx.wait_log(0, lambda t: t.count("SPAN ") >= expected, name="spans.log", timeout=10)
    lines = [l for l in text.splitlines() if l.startswith("SPAN ")]
    assert len(lines) == expected, f"spans.log has {len(lines)} lines, expected {expected}"
    return {l.split()[1] for l in lines}


def test_span_ids_are_unique_across_two_workers_and_a_restart(module_path, launcher_fn):
    site = launcher_fn.start(STRESS_HTTP, workers=2)
    started = time.monotonic()
    spans1, new1, problems = _stress(site.port, 1)
    assert not problems, f"{len(problems)} bad responses, first ones:\n" + "\n".join(problems[:10])
    pids1 = _logged_pids(site.ngx, STRESS_N)
    master1 = site.ngx.pid
    assert len(pids1) == 2, f"expected both workers to serve requests, log shows pids {pids1}"

    site.ngx.stop()
    (site.ngx.tmp / "spans.log").unlink()
    site.ngx.start()
    assert site.ngx.pid != master1
    spans2, new2, problems = _stress(site.port, 2)
    assert not problems, f"{len(problems)} bad responses after the restart:\n" + "\n".join(problems[:10])
    pids2 = _logged_pids(site.ngx, STRESS_N)
    assert len(pids2) == 2, f"expected both workers to serve requests, log shows pids {pids2}"
    elapsed = time.monotonic() - started

    every = spans1 + spans2
    assert len(every) == 2 * STRESS_N
    dupes = len(every) - len(set(every))
    assert dupes == 0, f"{dupes} span ids repeat among {len(every)} (2 workers, restart)"
    traces = new1 + new2
    assert len(traces) == STRESS_N and len(set(traces)) == len(traces), "new trace ids repeat"
    print(f"stress: {2 * STRESS_N} requests in {elapsed:.1f}s")


# ---------------------------------------------------------------- $mesh_cloud_trace and the project

PROJECT_HTTP = """
mesh_trace on;
@HTTP_PROJECT@
server {
    listen 127.0.0.1:@PORT@;
    @SERVER_PROJECT@
"""


def _project_site(launcher, env_project: str | None, http_project: str | None, server_project: str | None):
    body = (
        PROJECT_HTTP.replace("@HTTP_PROJECT@", f"mesh_trace_project {http_project};" if http_project else "")
        .replace("@SERVER_PROJECT@", f"mesh_trace_project {server_project};" if server_project else "")
        + OBSERVE
        + "    add_header X-Span $mesh_span_id always;\n"
        + "    location / { proxy_pass http://@UPSTREAM@; }\n}\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        if env_project is None:
            mp.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
        else:
            mp.setenv("GOOGLE_CLOUD_PROJECT", env_project)
        return launcher.start(body)


PROJECT_CASES = [
    ("http-directive", None, "http-proj-1", None, "http-proj-1"),
    ("server-directive-overrides-http", None, "http-proj-1", "srv-proj-2", "srv-proj-2"),
    ("env-when-no-directive", "env-proj-3", None, None, "env-proj-3"),
    ("directive-wins-over-env", "env-proj-3", "http-proj-4", None, "http-proj-4"),
    ("server-directive-wins-over-env", "env-proj-3", None, "srv-proj-5", "srv-proj-5"),
    ("no-project-at-all", None, None, None, None),
]


@pytest.mark.parametrize("env,http_p,server_p,expected", [c[1:] for c in PROJECT_CASES],
                         ids=[c[0] for c in PROJECT_CASES])
def test_cloud_trace_variable_names_the_project(module_path, launcher_fn, env, http_p, server_p, expected):
    site = _project_site(launcher_fn, env, http_p, server_p)
    resp = site.get("/p", [("traceparent", f"00-{T}-{P}-01")])
    hop = hop_of(resp, project=None)
    assert hop.trace == T
    got = resp.upstream_header("X-Test-Cloud")
    if expected is None:
        assert got is None, f"$mesh_cloud_trace must be empty without a project, got {got!r}"
    else:
        assert got == f"projects/{expected}/traces/{T}", got
    if env is not None and http_p is None and server_p is None:
        # the master read the environment; a reload keeps it
        site.ngx.reload()
        resp = site.get("/p2", [("traceparent", f"00-{T2}-{P}-01")])
        assert resp.upstream_header("X-Test-Cloud") == f"projects/{expected}/traces/{T2}", resp


# ---------------------------------------------------------------- bad configurations

BAD_CONFIGS = [
    ("sample-above-one", "mesh_trace_sample 1.5;", "location", ["1.5"]),
    ("sample-not-a-number", "mesh_trace_sample abc;", "location", ["abc"]),
    ("sample-negative", "mesh_trace_sample -0.5;", "server", ["-0.5"]),
    ("sample-exponent", "mesh_trace_sample 1e-1;", "http", ["1e-1"]),
    ("sample-twice", "mesh_trace_sample 0.5; mesh_trace_sample 0.25;", "location", ["mesh_trace_sample", "duplicate"]),
    ("trace-maybe", "mesh_trace maybe;", "location", ["maybe", "mesh_trace"]),
    ("trace-response-maybe", "mesh_trace_response yes;", "server", ["yes", "mesh_trace_response"]),
    ("trace-without-argument", "mesh_trace;", "server", ["mesh_trace"]),
    ("project-in-location", "mesh_trace_project p1;", "location", ["mesh_trace_project"]),
    ("project-invalid", "mesh_trace_project a/b;", "server", ["a/b"]),
    ("project-twice", "mesh_trace_project p1; mesh_trace_project p2;", "http", ["mesh_trace_project", "duplicate"]),
]


def _bad_body(line: str, where: str) -> str:
    bad = f"{line}  # BAD"
    http = bad if where == "http" else ""
    srv = f"    {bad}" if where == "server" else ""
    loc = f"        {bad}" if where == "location" else ""
    return (f"{http}\nserver {{\n    listen 127.0.0.1:@PORT@;\n    mesh_trace on;\n{srv}\n"
            f"    location / {{\n{loc}\n        proxy_pass http://@UPSTREAM@;\n    }}\n}}\n")


@pytest.mark.parametrize("line,where,words", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_trace_config_fails_nginx_t_at_the_line(module_path, conf_dir, keyring, line, where, words):
    conf_text = render(_bad_body(line, where), conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)
    emerg_at_marked_line(conf_text, conf_dir, words=words)


def test_every_trace_directive_in_its_contexts_passes_nginx_t(module_path, conf_dir, keyring):
    body = """
mesh_trace on;
mesh_trace_sample 0.25;
mesh_trace_project http-proj;
mesh_trace_response on;
server {
    listen 127.0.0.1:@PORT@;
    mesh_trace off;
    mesh_trace_sample 1;
    mesh_trace_project my-project_1.x:y;
    mesh_trace_response off;
    location / {
        mesh_trace on;
        mesh_trace_sample .5;
        mesh_trace_response on;
        proxy_pass http://@UPSTREAM@;
    }
    location /z { mesh_trace_sample 0; proxy_pass http://@UPSTREAM@; }
}
"""
    conf_text = render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)
    passes_nginx_t(conf_text, conf_dir)
