"""Transport behaviour against a real scripted HTTP server on loopback."""
from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import ssl
import threading
import time
from collections import deque
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import requests
import urllib3.exceptions

from nomyo.client import http_pools
from nomyo.client import transport as transport_module
from nomyo.client.transport import (
    RetryPolicy,
    Transport,
    error_for_status,
    parse_retry_after,
    require_secure_url,
)
from nomyo.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadGatewayError,
    DisposedError,
    ForbiddenError,
    GatewayTimeoutError,
    InvalidRequestError,
    PackageError,
    RateLimitError,
    SecurityError,
    ServerError,
    ServiceUnavailableError,
)


def data_segments_in(sock: socket.socket) -> int:
    """TCP segments carrying data received so far on `sock` (Linux tcp_info.tcpi_data_segs_in,
    at byte 152 since kernel 4.6)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    assert len(info) >= 156, "kernel tcp_info has no tcpi_data_segs_in (Linux 4.6 or later)"
    return int.from_bytes(info[152:156], "little")


class QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):  # keep test output quiet
        pass


class LoopbackServer:
    """A threaded HTTP server on loopback for `handler` (HTTPS with an SSL context)."""

    def __init__(self, handler: type, ssl_context: ssl.SSLContext | None = None) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        scheme = "http"
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ScriptedServer(LoopbackServer):
    """Answers each request with the next scripted reply; records what it received.

    A reply is (status, headers, body), "drop" (close without answering) or ("sleep", s).
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.replies: deque = deque()
        self.received: list[dict] = []
        script = self

        class Handler(QuietHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                script.received.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers),
                     "body": body, "peer": self.client_address,
                     "data_segments_in": data_segments_in(self.connection)}
                )
                reply = script.replies.popleft() if script.replies else (200, {}, b"ok")
                if reply == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if reply[0] == "sleep":
                    time.sleep(reply[1])
                    reply = (200, {}, b"late")
                status, headers, payload = reply
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if headers.get("Connection") == "close":  # body delimited by closing
                    self.close_connection = True
                elif "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _serve

        super().__init__(Handler, ssl_context)


@pytest.fixture
def server():
    srv = ScriptedServer()
    yield srv
    srv.close()


class Clock:
    """Records requested sleeps instead of waiting (retry timing is asserted, not waited for)."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def make(max_retries: int = 2, timeout: float = 5.0, **kw) -> tuple[Transport, Clock]:
    clock = Clock()
    kw.setdefault("allow_http", True)  # the scripted servers are plain HTTP on loopback
    transport = Transport(timeout=timeout, retry=RetryPolicy(max_retries=max_retries),
                          sleep=clock, **kw)
    return transport, clock


HEADERS = {"X-Payload-ID": "pid-1", "Content-Type": "application/octet-stream"}


def post_then_close(transport: Transport, url: str, times: int) -> None:
    """POST b"cipher" `times` times, each answered b"ok"; the transport is closed after."""
    try:
        for _ in range(times):
            assert transport.post(url, b"cipher", HEADERS) == b"ok"
    finally:
        transport.close()


def test_success_returns_body_and_reuses_one_connection(server):
    post_then_close(make()[0], server.url + "/x", 5)
    assert {r["peer"] for r in server.received} == {server.received[0]["peer"]}
    assert server.received[0]["body"] == b"cipher"


@pytest.mark.parametrize("status", [429, 503])
def test_retryable_status_is_retried_with_same_payload_id(server, status):
    server.replies.extend([(status, {}, b"{}"), (status, {}, b"{}"), (200, {}, b"done")])
    transport, clock = make(max_retries=2)
    assert transport.post(server.url, b"c", HEADERS) == b"done"
    assert len(server.received) == 3
    assert {r["headers"]["X-Payload-ID"] for r in server.received} == {"pid-1"}
    assert len(clock.sleeps) == 2
    transport.close()


@pytest.mark.parametrize("status", [500, 502, 504])
def test_status_after_the_endpoint_acted_is_not_retried(server, status):
    # the endpoint (or the backend behind a proxy) had the request: sending it again could
    # run it twice, since payload ids are not deduplicated
    server.replies.extend([(status, {}, b"{}"), (200, {}, b"done")])
    transport, clock = make(max_retries=2)
    with pytest.raises(APIError) as info:
        transport.post(server.url, b"c", HEADERS)
    assert info.value.status_code == status and info.value.payload_id == "pid-1"
    assert len(server.received) == 1 and clock.sleeps == []
    transport.close()


def test_retry_after_seconds_is_honoured(server):
    server.replies.extend([(429, {"Retry-After": "7"}, b"{}"), (200, {}, b"ok")])
    transport, clock = make()
    transport.post(server.url, b"c", HEADERS)
    assert clock.sleeps == [7.0]


def test_retry_after_http_date_is_honoured(server):
    when = datetime.now(timezone.utc) + timedelta(seconds=20)
    server.replies.extend([(503, {"Retry-After": format_datetime(when, usegmt=True)}, b""),
                           (200, {}, b"ok")])
    transport, clock = make()
    transport.post(server.url, b"c", HEADERS)
    assert 17.0 <= clock.sleeps[0] <= 20.0


def test_retry_after_is_capped(server):
    server.replies.extend([(429, {"Retry-After": "86400"}, b"{}"), (200, {}, b"ok")])
    transport, clock = make()
    transport.post(server.url, b"c", HEADERS)
    assert clock.sleeps == [transport.retry.retry_after_cap]


def test_backoff_is_exponential_and_jittered_without_retry_after(server):
    server.replies.extend([(503, {}, b"{}")] * 4)
    transport, clock = make(max_retries=3)
    with pytest.raises(ServiceUnavailableError):
        transport.post(server.url, b"c", HEADERS)
    assert len(server.received) == 4
    for exact, got in zip([1.0, 2.0, 4.0], clock.sleeps, strict=True):
        assert 0.75 * exact <= got <= exact


def test_retry_after_real_wait(server):
    server.replies.extend([(503, {"Retry-After": "1"}, b"{}"), (200, {}, b"ok")])
    transport = Transport(timeout=5, retry=RetryPolicy(max_retries=1), allow_http=True)
    start = time.monotonic()
    assert transport.post(server.url, b"c", HEADERS) == b"ok"
    assert time.monotonic() - start >= 0.95
    transport.close()


@pytest.mark.parametrize(
    "status,cls",
    [(400, InvalidRequestError), (401, AuthenticationError), (403, ForbiddenError),
     (404, APIError), (429, RateLimitError), (500, ServerError), (502, BadGatewayError),
     (503, ServiceUnavailableError), (504, GatewayTimeoutError), (418, APIError)],
)
def test_status_maps_to_class_once_retries_run_out(server, status, cls):
    body = json.dumps({"detail": f"reason {status}"}).encode()
    server.replies.extend([(status, {}, body)] * 3)
    transport, _ = make(max_retries=2)
    with pytest.raises(cls) as info:
        transport.post(server.url, b"c", HEADERS)
    err = info.value
    assert type(err) is cls
    assert err.status_code == status
    assert err.error_details == {"detail": f"reason {status}"}
    assert f"reason {status}" in str(err)
    assert err.__cause__ is None and err.__suppress_context__
    assert err.payload_id == "pid-1"
    retried = status in (429, 503)
    assert len(server.received) == (3 if retried else 1)


def test_non_json_error_body_is_handled(server):
    server.replies.append((401, {"Content-Type": "text/html"}, b"<html>nope</html>"))
    transport, _ = make()
    with pytest.raises(AuthenticationError) as info:
        transport.post(server.url, b"c", HEADERS)
    assert info.value.error_details is None
    assert info.value.status_code == 401


def test_api_key_never_in_message(server):
    token = "sk-very-secret-token-123"
    server.replies.append((401, {}, json.dumps({"detail": f"bad key {token}"}).encode()))
    transport, _ = make()
    with pytest.raises(AuthenticationError) as info:
        transport.post(server.url, b"c", HEADERS, api_key=token)  # the transport builds the header
    assert token not in str(info.value)
    assert server.received[0]["headers"]["Authorization"] == f"Bearer {token}"


def test_max_retries_zero_means_one_attempt(server):
    server.replies.append((503, {}, b"{}"))
    transport, clock = make(max_retries=0)
    with pytest.raises(ServiceUnavailableError):
        transport.post(server.url, b"c", HEADERS)
    assert len(server.received) == 1 and clock.sleeps == []


def test_connection_refused_is_retried_then_chained():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    transport, clock = make(max_retries=2)
    with pytest.raises(APIConnectionError) as info:
        transport.post(f"http://127.0.0.1:{port}/", b"c", HEADERS)
    cause = info.value.__cause__
    assert isinstance(cause, (requests.ConnectionError, urllib3.exceptions.HTTPError))
    assert len(clock.sleeps) == 2


def test_connection_dropped_after_the_request_is_not_retried(server):
    server.replies.extend(["drop", (200, {}, b"second")])
    transport, clock = make()
    with pytest.raises(APIConnectionError) as info:
        transport.post(server.url, b"c", HEADERS)
    assert info.value.payload_id == "pid-1"
    assert len(server.received) == 1 and clock.sleeps == []


def test_dropped_get_is_retried(server):
    server.replies.extend(["drop", (200, {}, b"second")])
    transport, clock = make()
    assert transport.get(server.url) == b"second"
    assert len(server.received) == 2 and len(clock.sleeps) == 1


def test_reset_while_writing_the_request_is_retried(server, monkeypatch):
    # The first write of the first attempt meets a reset connection (the server never had
    # the request): sent again on a new connection.
    real_send, failed = http.client.HTTPConnection.send, []

    def send(self, data):  # under the connection's own bookkeeping, as the socket would fail
        if not failed:
            failed.append(True)
            if self.sock is None:
                self.connect()
            self.sock.shutdown(socket.SHUT_RDWR)
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
        return real_send(self, data)

    monkeypatch.setattr(http.client.HTTPConnection, "send", send)
    transport, clock = make()
    assert transport.post(server.url, b"c", HEADERS) == b"ok"
    assert failed and len(server.received) == 1 and len(clock.sleeps) == 1


def test_read_timeout_after_sending_is_raised_not_retried(server):
    server.replies.extend([("sleep", 1.0), (200, {}, b"ok")])
    transport, clock = make(max_retries=2, timeout=0.2)
    with pytest.raises(APITimeoutError, match="timed out") as info:
        transport.post(server.url, b"c", HEADERS)
    assert isinstance(info.value, APIConnectionError) and isinstance(info.value, TimeoutError)
    assert info.value.payload_id == "pid-1"
    assert isinstance(info.value.__cause__, urllib3.exceptions.TimeoutError)
    assert clock.sleeps == []


def test_get_timeout_is_retried_then_raised(server):
    server.replies.extend([("sleep", 1.0), ("sleep", 1.0)])
    transport, clock = make(max_retries=1, timeout=0.2)
    with pytest.raises(APITimeoutError, match="timed out"):
        transport.get(server.url)
    assert len(clock.sleeps) == 1


def test_per_call_timeout_and_retries_override_the_transport(server):
    server.replies.extend([(503, {}, b"{}"), ("sleep", 0.6)])
    transport, clock = make(max_retries=0, timeout=5.0)
    request = transport.prepare("POST", server.url, HEADERS)
    with pytest.raises(APITimeoutError):
        transport.send(request, b"c", timeout=0.2, max_retries=1)
    assert len(server.received) == 2 and len(clock.sleeps) == 1


@pytest.mark.parametrize("bad", ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\0b"])
def test_header_injection_refused_before_sending(server, bad):
    transport, _ = make()
    with pytest.raises(SecurityError):
        transport.post(server.url, b"c", HEADERS, api_key=bad)
    with pytest.raises(SecurityError):
        transport.get(server.url, {"X-Security-Tier": bad})
    with pytest.raises(SecurityError):
        transport.get(server.url, {f"X-{bad}": "1"})
    assert server.received == []


def test_plain_http_refused_unless_allowed(server):
    transport, _ = make(allow_http=False)
    with pytest.raises(SecurityError, match="plain HTTP"):
        transport.get(server.url)
    assert server.received == []


def test_closed_transport_raises_disposed(server):
    transport, _ = make()
    transport.close()
    with pytest.raises(DisposedError):
        transport.get(server.url)
    transport.close()  # idempotent


def test_require_secure_url():
    require_secure_url("https://api.example", allow_http=False)
    require_secure_url("http://127.0.0.1:1", allow_http=True)
    for url in ("http://127.0.0.1:1", "ftp://x", "file:///etc/passwd"):
        with pytest.raises(SecurityError):
            require_secure_url(url, allow_http=False)
    with pytest.raises(SecurityError):
        require_secure_url("ftp://x", allow_http=True)


def test_parse_retry_after():
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(format_datetime(now + timedelta(seconds=9), usegmt=True), now) == 9.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=9), usegmt=True), now) == 0.0
    for bad in (None, "", "-1", "nan", "soon"):
        assert parse_retry_after(bad) is None


def test_error_for_status_detail_shapes():
    err = error_for_status(400, json.dumps({"detail": [{"loc": "x"}]}).encode())
    assert isinstance(err, InvalidRequestError) and "loc" in str(err)
    assert error_for_status(500, b"[1,2]").error_details is None


@pytest.fixture(scope="module")
def tls_pair():
    trustme = pytest.importorskip("trustme", reason="trustme (test extra) is needed for TLS tests")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ca, ctx


def test_https_verified_with_private_ca_bundle(tls_pair, tmp_path):
    ca, ctx = tls_pair
    srv = ScriptedServer(ctx)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    try:
        transport, _ = make(verify=str(bundle))
        assert transport.get(srv.url + "/pki/public_key") == b"ok"
        untrusting, clock = make()
        with pytest.raises(SecurityError):
            untrusting.get(srv.url + "/pki/public_key")
        assert clock.sleeps == []
    finally:
        srv.close()


def test_oversized_answer_refused_by_its_declared_length(server):
    server.replies.append((200, {"Content-Length": str(64 * 1024 * 1024)}, b""))
    transport, _ = make()
    with pytest.raises(PackageError, match="larger than"):
        transport.post(server.url, b"c", HEADERS)


def test_oversized_answer_without_length_refused(server, monkeypatch):
    monkeypatch.setattr(transport_module, "MAX_RESPONSE_BYTES", 1000)
    server.replies.append((200, {"Connection": "close"}, b"x" * 5000))
    transport, _ = make()
    with pytest.raises(PackageError, match="larger than"):
        transport.post(server.url, b"c", HEADERS)
    assert transport.post(server.url, b"c", HEADERS) == b"ok"  # the pool recovers


@pytest.mark.parametrize("length", ["abc", "\u00b2", None])
def test_answers_without_a_valid_length_are_capped_while_reading(server, monkeypatch, length):
    monkeypatch.setattr(transport_module, "MAX_RESPONSE_BYTES", 1000)
    headers = {"Connection": "close"} if length is None else {"Content-Length": length,
                                                              "Connection": "close"}
    server.replies.append((200, headers, b"x" * 50_000))
    transport, _ = make(max_retries=0)
    with pytest.raises(PackageError, match="larger than 1000 bytes"):
        transport.post(server.url + "/x", b"body", HEADERS)


def test_echoed_api_key_is_redacted_from_message_and_details():
    key = "sk-live-0123456789"
    err = error_for_status(401, json.dumps({"detail": f"invalid key {key}",
                                            "extra": [key]}).encode(), (key,))
    assert key not in str(err) and key not in json.dumps(err.error_details)
    assert err.error_details["detail"] == "invalid key [redacted]"


def test_ca_bundle_default_and_missing_path():
    with pytest.raises(ValueError, match="CA bundle not found"):
        Transport(verify="/nonexistent/ca.pem")
    import requests.certs

    env_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    assert Transport().ca_bundle == (env_bundle or requests.certs.where())


def test_closed_pool_is_replaced_without_a_retry(server):
    # urllib3 1.x closes the pool of the least recently used endpoint to make room for a new
    # one (2.x drops it unclosed); the transport's cached route must then find a new pool.
    transport, clock = make(max_retries=0)
    url = server.url + "/x"
    try:
        assert transport.post(url, b"cipher", HEADERS) == b"ok"
        pools = transport.connection_pools(url)
        for key in pools.keys():  # evicted as 1.x does: out of the manager, then closed
            pool = pools[key]
            del pools[key]
            pool.close()
        assert transport.post(url, b"cipher", HEADERS) == b"ok"
    finally:
        transport.close()
    first, again = server.received
    assert clock.sleeps == []
    assert first["peer"] != again["peer"]  # a new connection from a new pool


class ForwardProxy(LoopbackServer):
    """A plain HTTP forward proxy on loopback: records each absolute-form target it relays."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        proxy = self

        class Handler(QuietHandler):
            def _relay(self) -> None:
                proxy.targets.append(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                target = urlsplit(self.path)
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=5)
                upstream.request(self.command, target.path, body,
                                 {"X-Payload-ID": self.headers["X-Payload-ID"]})
                answer = upstream.getresponse()
                content = answer.read()
                upstream.close()
                self.send_response(answer.status)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = _relay

        super().__init__(Handler)


def test_proxy_from_the_environment_is_used(server, monkeypatch):
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxy = ForwardProxy()
    monkeypatch.setenv("http_proxy", proxy.url)
    try:
        post_then_close(make()[0], server.url + "/x", 2)
    finally:
        proxy.close()
    assert proxy.targets == [server.url + "/x"] * 2
    assert [r["body"] for r in server.received] == [b"cipher"] * 2


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_small_request_leaves_in_one_segment(scheme, tls_pair, tmp_path):
    ca, ctx = tls_pair
    srv = ScriptedServer(ctx if scheme == "https" else None)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    transport, _ = make(verify=str(bundle))
    large = os.urandom(http_pools.ONE_WRITE_MAX + 1)
    try:
        for body in (b"cipher", b"cipher", large, b"cipher"):
            assert transport.post(srv.url + "/x", body, HEADERS) == b"ok"
    finally:
        transport.close()
        srv.close()
    assert [r["body"] for r in srv.received] == [b"cipher", b"cipher", large, b"cipher"]
    assert len({r["peer"] for r in srv.received}) == 1
    segments = [r["data_segments_in"] for r in srv.received]
    # header block and body in one write, hence one segment (one TLS record over HTTPS)
    assert segments[1] - segments[0] == 1
    assert segments[3] - segments[2] == 1
    if scheme == "http":
        assert segments[0] == 1
