"""The attack run against `nomyo serve` (issue 14), one test per finding, on the real process.

Every test drives `python -m nomyo.server` (granian since issue 14) over loopback sockets,
the way a hostile client or a misbehaving backend would. Loops are bounded; servers are
killed with their whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from nomyo.protocol.constants import MAX_PACKAGE_BYTES
from tests.helpers import wait_until
from tests.server_fixtures import (
    COMPLETION,
    Served,
    chat_request,
    completion_headers,
    kill_group,
    open_response,
    post_sealed,
    seal_request,
    serve_process,
    vector_keys,
)

psutil = pytest.importorskip("psutil", reason="psutil (runtime dependency) measures the server")
API_KEY = "sk-attack-test-key"


def _exchange(address: tuple[str, int], raw: bytes, wait: float = 3.0) -> tuple[bytes, bool]:
    """Send `raw`, read until the server closes or `wait` passes: (bytes read, closed?)."""
    with socket.create_connection(address, timeout=wait) as sock:
        sock.sendall(raw)
        data, deadline = b"", time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return data, True
            except TimeoutError:
                return data, False
            if not chunk:
                return data, True
            data += chunk
        return data, False


def _statuses(data: bytes) -> list[int]:
    return [int(line.split()[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def _complete(srv, text: str = "still serving?", **headers: str) -> requests.Response:
    return post_sealed(
        srv.url,
        seal_request(chat_request(text), srv.public_key_pem),
        completion_headers(vector_keys()["client_public_pem"], **headers),
    )


def _answer_text(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    return open_response(response.content)[0]["choices"][0]["message"]["content"]


def _rss_mb(proc) -> float:
    """Resident memory of the server and its workers, in MB."""
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 1e6


def _keyfile(folder: Path, text: str = f"{API_KEY}\n") -> Path:
    path = folder / "api_keys"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("attacks")
    with Served("--api-key-file", str(_keyfile(folder)), key_dir=folder) as handle:
        yield handle


# -- smuggling: every item is a 400 and a closed connection ----------------------------------

_HOST = b"Host: x\r\n"
SMUGGLING = {
    "two-content-lengths": b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 42\r\n"
    b"Content-Length: 0\r\n\r\nGET /pki/public_key HTTP/1.1\r\nHost: x\r\n\r\n",
    "space-before-colon": b"POST " + COMPLETION.encode() + b" HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length : 5\r\n\r\nGET /pki/public_key HTTP/1.1\r\n\r\n",
    "line-without-colon": b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n"
    b"Content-Length: 40\r\n\r\n",
    "first-header-starts-with-space": b"GET /health HTTP/1.1\r\n Host: x\r\n"
    b"Content-Length: 40\r\n\r\n",
    "bare-cr-in-value": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\rContent-Length: 40\r\n\r\n",
    "nul-in-value": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "nul-in-name": b"GET /health HTTP/1.1\r\nHost: x\r\nX-\x00A: a\r\n\r\n",
    "two-authorizations": b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\n"
    b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n",
    "obs-fold": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(SMUGGLING))
def test_smuggling_attempt_is_400_and_closed(srv, case) -> None:
    raw = SMUGGLING[case]
    if case == "two-authorizations":  # reaches the app only on the completion path
        raw = raw.replace(b"GET /health", b"POST " + COMPLETION.encode()).replace(
            b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n")
    data, closed = _exchange(srv.address, raw)
    assert _statuses(data) == [400], data[:200]
    assert closed, "the connection stays open after a malformed head"
    assert _answer_text(_complete(srv, Authorization=f"Bearer {API_KEY}")) == (
        "Echo: still serving?")


def test_duplicate_connection_headers_close(srv) -> None:
    """Old: the first Connection header won ('keep-alive'); a close must never be lost."""
    raw = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
    data, closed = _exchange(srv.address, raw)
    assert _statuses(data) == [200] and closed


# -- denial ----------------------------------------------------------------------------------

def _timed_request(srv) -> float:
    started = time.monotonic()
    response = requests.get(srv.url + "/pki/public_key", timeout=5)
    assert response.status_code == 200
    return time.monotonic() - started


def _open_sockets(address, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(address, timeout=5)
        socks.append(sock)
    return socks


def test_idle_and_slow_header_connections_do_not_lock_out_a_client(srv) -> None:
    """Old: 64 idle sockets refused every other client for 30 s."""
    idle = _open_sockets(srv.address, 500)
    slow = _open_sockets(srv.address, 64)
    try:
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert _timed_request(srv) < 1.0
        assert _answer_text(_complete(srv, Authorization=f"Bearer {API_KEY}"))
    finally:
        for sock in idle + slow:
            sock.close()


def test_idle_keep_alive_connections_do_not_lock_out_a_client(srv) -> None:
    held = _open_sockets(srv.address, 64)
    try:
        for sock in held:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in held:
            assert b" 200 " in sock.recv(4096)
        assert _timed_request(srv) < 1.0
    finally:
        for sock in held:
            sock.close()


def test_idle_connections_are_closed_by_the_header_timeout(tmp_path) -> None:
    with Served("--header-timeout", "1", key_dir=tmp_path) as short:
        with socket.create_connection(short.address, timeout=5) as sock:
            started = time.monotonic()
            assert sock.recv(10) == b""
            assert time.monotonic() - started < 3


def _completion_head(length: int) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in completion_headers(
        vector_keys()["client_public_pem"], Authorization=f"Bearer {API_KEY}").items())
    return (f"POST {COMPLETION} HTTP/1.1\r\nHost: x\r\n{head}"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_declared_body_is_not_allocated_up_front(srv) -> None:
    """Old: 64 heads declaring ~14 MB and sending one byte took the RSS from 39 to 896 MB."""
    # A long-running server has served big bodies before (glibc then stops giving large
    # blocks fresh zero pages): one full 13 MB body first, refused after reading.
    warm = _completion_head(MAX_PACKAGE_BYTES) + b"x" * MAX_PACKAGE_BYTES
    assert _statuses(_exchange(srv.address, warm, wait=10)[0]) == [400]
    socks = _open_sockets(srv.address, 64)
    try:
        for sock in socks:
            sock.sendall(_completion_head(MAX_PACKAGE_BYTES - 4096) + b"{")
        time.sleep(1.0)
        assert _rss_mb(srv.proc) < 200
        assert _timed_request(srv) < 1.0
    finally:
        for sock in socks:
            sock.close()


def test_fat_heads_are_refused_and_cost_no_memory(srv) -> None:
    """Old: 99 headers of 65 KB were accepted (6.4 MB a head; 64 such heads held: 436 MB)."""
    fat = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-F%d: %s\r\n" % (i, b"a" * 65_000) for i in range(99))  # head not yet finished
    socks = _open_sockets(srv.address, 64)

    def send(sock: socket.socket) -> None:
        try:
            sock.sendall(fat)
        except OSError:
            pass  # refused while sending: the server closed it

    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(send, socks))
        time.sleep(1.0)
        assert _rss_mb(srv.proc) < 200
        assert _timed_request(srv) < 1.0
        for sock in socks:  # each was answered 431 (or closed), never served
            sock.settimeout(5)
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            assert data == b"" or _statuses(data) == [431], data[:100]
    finally:
        for sock in socks:
            sock.close()


# -- supervision -----------------------------------------------------------------------------

def _workers(proc) -> list:
    return [c for c in psutil.Process(proc.pid).children() if c.status() != psutil.STATUS_ZOMBIE]


def test_killed_worker_is_respawned_and_the_others_keep_serving(tmp_path) -> None:
    """Old: SIGKILL of one of 2 workers made the parent stop the other and exit."""
    with Served("--workers", "2", key_dir=tmp_path) as srv:
        wait_until(lambda: len(_workers(srv.proc)) == 2, seconds=10)
        victim = _workers(srv.proc)[0]
        victim.kill()
        victim.wait(timeout=10)
        failures = 0
        for _ in range(20):
            try:
                requests.get(srv.url + "/health", timeout=5).raise_for_status()
            except requests.RequestException:
                failures += 1
            time.sleep(0.05)
        assert failures == 0
        wait_until(lambda: len(_workers(srv.proc)) == 2
                   and victim.pid not in [w.pid for w in _workers(srv.proc)], seconds=15)
        assert srv.proc.poll() is None
        assert _answer_text(_complete(srv)) == "Echo: still serving?"


def test_workers_exit_when_the_parent_is_killed(tmp_path) -> None:
    """Old: SIGKILL of the parent left both workers serving, orphaned."""
    srv = Served("--workers", "2", key_dir=tmp_path)
    try:
        wait_until(lambda: len(_workers(srv.proc)) == 2, seconds=10)
        workers = _workers(srv.proc)
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(timeout=10)
        # the watchdog's 0.5 s poll, then at most ORPHAN_GRACE_SECONDS: 10 s is ample
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers):
            time.sleep(0.1)
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finally:
        kill_group(srv.proc)


def test_more_requests_than_capacity_wait_instead_of_being_refused(tmp_path) -> None:
    """Old: a full worker accepted a connection and then refused it (503)."""
    with Served("--threads", "2", key_dir=tmp_path) as srv:
        def one(i: int) -> int:
            return _complete(srv, f"n{i}").status_code

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(one, range(32)))
        assert statuses == [200] * 32


# -- the backend -----------------------------------------------------------------------------

class RawBackend:
    """A scripted OpenAI-compatible backend on a raw socket; records what reached it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.paths: list[str] = []
        self.closed_at: list[float] = []
        self.hits_on_redirect_target = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _read_request(self, conn: socket.socket) -> tuple[str, bytes]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next((int(v) for k, _, v in (x.partition(":") for x in lines[1:])
                       if k.strip().lower() == "content-length"), 0)
        while len(rest) < length:
            rest += conn.recv(65536)
        return lines[0].split()[1], rest

    def _reply(self, conn: socket.socket, status: str, body: bytes, extra: str = "") -> None:
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def _one(self, conn: socket.socket) -> None:
        with conn:
            try:
                path, body = self._read_request(conn)
            except (ConnectionError, OSError):
                return
            self.paths.append(path)
            if path.startswith("/elsewhere"):
                self.hits_on_redirect_target += 1
            if path.endswith("/models"):
                self._reply(conn, "200 OK", b'{"data": []}')
            elif self.mode == "redirect":
                self._reply(conn, "307 Temporary Redirect", b"{}",
                            f"Location: {self.url}/elsewhere/v1/chat/completions\r\n")
            elif self.mode in ("trickle", "generate"):
                if self.mode == "trickle":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                started = time.monotonic()
                conn.settimeout(0.1)
                while time.monotonic() - started < 30:  # "generating" until the peer leaves
                    try:
                        if self.mode == "trickle":
                            conn.sendall(b" ")
                        if conn.recv(1) == b"":
                            break
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                self.closed_at.append(time.monotonic())
            elif self.mode == "context":
                prompt = json.loads(body)["messages"][-1]["content"]
                error = {"error": {"message": f"This prompt is too long: {prompt}",
                                   "type": "invalid_request_error",
                                   "code": "context_length_exceeded", "param": "messages"}}
                self._reply(conn, "400 Bad Request", json.dumps(error).encode())
            elif self.mode == "nomodel":
                error = {"error": {"message": "The model `x` does not exist",
                                   "type": "invalid_request_error", "code": "model_not_found",
                                   "param": None}}
                self._reply(conn, "404 Not Found", json.dumps(error).encode())
            elif self.mode == "crash":
                self._reply(conn, "500 Internal Server Error", b'{"error": "boom"}')
            else:
                request = json.loads(body)
                answer = {"id": "x", "object": "chat.completion", "created": 1,
                          "model": request["model"],
                          "choices": [{"index": 0, "finish_reason": "stop", "message": {
                              "role": "assistant", "content": "raw backend"}}]}
                self._reply(conn, "200 OK", json.dumps(answer).encode())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture
def backend(request) -> Iterator[RawBackend]:
    raw = RawBackend(request.param)
    yield raw
    raw.close()


@pytest.mark.parametrize("backend", ["redirect"], indirect=True)
def test_backend_redirect_is_not_followed(backend, tmp_path) -> None:
    """Old: a 307 was followed, re-POSTing the plaintext prompt to the Location."""
    with Served("--backend", backend.url, key_dir=tmp_path) as srv:
        response = _complete(srv, "secret prompt")
        assert response.status_code == 502
        assert "secret prompt" not in response.text
    assert backend.hits_on_redirect_target == 0


@pytest.mark.parametrize("backend", ["trickle"], indirect=True)
def test_trickling_backend_is_held_to_one_total_deadline(backend, tmp_path) -> None:
    """Old: the timeout was per read; a trickling backend held a request 22 s past 3 s."""
    with Served("--backend", backend.url, "--backend-timeout", "2", key_dir=tmp_path) as srv:
        started = time.monotonic()
        response = _complete(srv)
        assert response.status_code == 504
        assert time.monotonic() - started < 4


@pytest.mark.parametrize("backend", ["trickle"], indirect=True)
def test_deadline_closes_the_backend_connection(backend, tmp_path) -> None:
    """Old: a timed-out request left the backend generating (llama.cpp went on for 88 s)."""
    with Served("--backend", backend.url, "--backend-timeout", "1.5", key_dir=tmp_path) as srv:
        started = time.monotonic()
        assert _complete(srv).status_code == 504
        wait_until(lambda: backend.closed_at, seconds=5)
        assert backend.closed_at[0] - started < 3


@pytest.mark.parametrize("backend", ["generate"], indirect=True)
def test_caller_going_away_closes_the_backend_connection(backend, tmp_path) -> None:
    with Served("--backend", backend.url, "--backend-timeout", "60", key_dir=tmp_path) as srv:
        with pytest.raises(requests.Timeout):
            post_sealed_timeout(srv, 1.0)
        left = time.monotonic()
        wait_until(lambda: backend.closed_at, seconds=5)
        assert backend.closed_at[0] - left < 3


def post_sealed_timeout(srv, timeout: float) -> requests.Response:
    return requests.post(
        srv.url + COMPLETION, timeout=timeout,
        data=seal_request(chat_request("are you there"), srv.public_key_pem),
        headers=completion_headers(vector_keys()["client_public_pem"]))


@pytest.mark.parametrize("backend", ["context"], indirect=True)
def test_backend_400_is_mirrored_with_machine_fields_only(backend, tmp_path) -> None:
    """Old: a backend 400 (context_length_exceeded) became a bare 502 and was retried."""
    with Served("--backend", backend.url, key_dir=tmp_path) as srv:
        response = _complete(srv, "the secret prompt text")
    assert response.status_code == 400
    assert response.json()["error"] == {"type": "invalid_request_error",
                                        "code": "context_length_exceeded", "param": "messages"}
    assert "secret prompt" not in response.text and "too long" not in response.text


@pytest.mark.parametrize("backend", ["nomodel"], indirect=True)
def test_backend_unknown_model_is_404(backend, tmp_path) -> None:
    with Served("--backend", backend.url, key_dir=tmp_path) as srv:
        response = _complete(srv)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("backend", ["crash"], indirect=True)
def test_backend_failure_after_forwarding_is_502(backend, tmp_path) -> None:
    with Served("--backend", backend.url, key_dir=tmp_path) as srv:
        response = _complete(srv)
    assert response.status_code == 502 and "Retry-After" not in response.headers


@pytest.mark.parametrize("backend", ["ok"], indirect=True)
def test_backend_base_url_with_v1_and_ready(backend, tmp_path) -> None:
    """Old: --backend http://host:port/v1 posted to /v1/v1/chat/completions."""
    with Served("--backend", backend.url + "/v1", key_dir=tmp_path) as srv:
        assert _answer_text(_complete(srv)) == "raw backend"
        assert requests.get(srv.url + "/ready", timeout=10).status_code == 200
    assert "/v1/chat/completions" in backend.paths
    assert "/v1/v1/chat/completions" not in backend.paths


# -- operator basics -------------------------------------------------------------------------

def test_health_discloses_nothing_and_ready_reports_a_dead_backend(tmp_path) -> None:
    """Old: /health said "ok" with the backend dead, and showed the backend URL to anyone."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with Served("--backend", dead, key_dir=tmp_path) as srv:
        health = requests.get(srv.url + "/health", timeout=10)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = requests.get(srv.url + "/ready", timeout=10)
        assert ready.status_code == 503
        assert dead not in ready.text and "127.0.0.1" not in ready.text
        head, _ = _exchange(srv.address, b"HEAD /health HTTP/1.1\r\nHost: x\r\n"
                            b"Connection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")  # no body
    _, err = srv.stop()
    assert "does not answer" in err  # the start-up probe warned


@pytest.mark.parametrize("which", ["--key-file", "--api-key-file"])
def test_group_readable_secret_files_are_refused(tmp_path, which) -> None:
    """Old: a key file readable by group/world was used without a word."""
    secret = tmp_path / "secret"
    secret.write_text(vector_keys()["server_private_pem"] if which == "--key-file" else "k\n")
    secret.chmod(0o644)
    proc = serve_process(which, str(secret))
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        kill_group(proc)
    assert proc.returncode == 2
    assert "chmod 600" in err


def test_api_key_file_with_bom_matches_its_first_key(tmp_path) -> None:
    """Old: a UTF-8 BOM made the first API key never match."""
    keys = _keyfile(tmp_path, f"\ufeff{API_KEY}\n")
    with Served("--api-key-file", str(keys), key_dir=tmp_path) as srv:
        assert _answer_text(_complete(srv, Authorization=f"Bearer {API_KEY}"))


def test_failed_authentication_is_throttled_per_address(srv) -> None:
    """Old: 300 wrong keys in 1.1 s, never slowed down."""
    statuses = [_complete(srv, Authorization=f"Bearer wrong-{i}").status_code for i in range(30)]
    assert statuses[0] == 401 and statuses[-1] == 429
    assert statuses.count(401) <= 12


def test_access_log_has_client_payload_status_and_escapes_control_chars(tmp_path) -> None:
    """Old: no client address, the raw path (a NUL landed in the log)."""
    srv = Served(key_dir=tmp_path)
    try:
        assert _answer_text(_complete(srv, "log me not", **{"X-Payload-ID": "pid-42"}))
        requests.get(srv.url + "/x%00y%1b[31m", timeout=10)
    finally:
        _, err = srv.stop()
    line = next(x for x in err.splitlines() if "id=pid-42" in x)
    assert "127.0.0.1" in line and " 200 " in line and "ms" in line
    assert "\x00" not in err and "\x1b" not in err and "\\x00" in err
    assert "log me not" not in err and "PRIVATE" not in err


def test_busy_port_is_found_before_the_key_is_made(tmp_path) -> None:
    """Old: a busy port was found only after the (slow) key generation."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = serve_process("--port", str(port), "--key-bits", "4096")
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            kill_group(proc)
    assert proc.returncode == 2 and "cannot listen" in err
    assert "generating" not in err
