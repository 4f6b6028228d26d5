"""nomyo.server over real loopback HTTP: protocol, vectors, every 4xx path, policy, connections."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
import requests

from nomyo.protocol import envelope
from nomyo.protocol.constants import MAX_PACKAGE_BYTES
from nomyo.protocol.keys import KeyPair
from nomyo.server import start_background
from tests.server_fixtures import (
    COMPLETION,
    Served,
    chat_request,
    completion_headers,
    keypair,
    kill_group,
    open_response,
    package_bytes,
    post_sealed,
    seal_request,
    vector,
    vector_keys,
    vector_names,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real `nomyo serve` (granian) process: every test here goes through its HTTP."""
    with Served("--key-bits", "2048", key_dir=tmp_path_factory.mktemp("served")) as handle:
        yield handle


@pytest.fixture(scope="module")
def client_pem() -> str:
    return vector_keys()["client_public_pem"]


def _complete(server, client_pem: str, text: str = "still serving?") -> dict:
    response = post_sealed(
        server.url,
        seal_request(chat_request(text), server.public_key_pem),
        completion_headers(client_pem),
    )
    assert response.status_code == 200, response.text
    obj, _ = open_response(response.content)
    return obj


def test_public_key_and_health(server) -> None:
    response = requests.get(server.url + "/pki/public_key", timeout=10)
    assert response.status_code == 200
    assert response.text == keypair("server").public_pem
    assert response.text.startswith("-----BEGIN PUBLIC KEY-----")
    health = requests.get(server.url + "/health", timeout=10)
    assert health.json() == {"status": "ok"}  # liveness only: no configuration disclosed
    ready = requests.get(server.url + "/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    head = requests.head(server.url + "/pki/public_key", timeout=10)
    assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize("name", vector_names("request"))
def test_opens_every_vector_and_answers_sealed_to_client_key(server, client_pem, name) -> None:
    vec = vector(name)
    response = post_sealed(
        server.url,
        package_bytes(vec),
        completion_headers(client_pem, payload_id="6f1c2a4e-1d2b-4c1e-9a7e-d3b42c4e598a"),
    )
    assert response.status_code == 200, response.text
    obj, info = open_response(response.content)
    last = vec["plaintext"]["messages"][-1]["content"]
    message = obj["choices"][0]["message"]
    assert last in message["content"]
    assert obj["object"] == "chat.completion" and obj["model"] == vec["plaintext"]["model"]
    usage = obj["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert ("tool_calls" in message) == bool(vec["plaintext"].get("tools"))
    meta = obj["_metadata"]
    assert meta["payload_id"] == "6f1c2a4e-1d2b-4c1e-9a7e-d3b42c4e598a"
    assert meta["processed_at"] == info.processed_at
    assert meta["response_status"] == "success" and meta["security_tier"] == "standard"
    assert set(meta["memory_protection"]) == {
        "platform",
        "memory_locking",
        "secure_zeroing",
        "core_dump_prevention",
    }
    assert meta["tpm_attestation"] == {"is_available": False}
    assert info.tag_layout == envelope.TAG_SEPARATE


def test_nomyo_js_layout_and_header_encoding(server, client_pem) -> None:
    """nomyo-js: tag appended to ciphertext, encodeURIComponent(PEM) without final newline."""
    package = seal_request(
        chat_request("from js"), server.public_key_pem, tag_layout=envelope.TAG_APPENDED
    )
    headers = completion_headers(client_pem, payload_id="openai-compat-1700000000000-k3j5x")
    headers["X-Public-Key"] = quote(client_pem.rstrip("\n"), safe="-_.!~*'()")
    assert "%2F" in headers["X-Public-Key"] or "/" not in client_pem
    response = post_sealed(server.url, package, headers)
    assert response.status_code == 200, response.text
    doc = json.loads(response.content)
    assert "tag" not in doc["encrypted_payload"]
    obj, info = open_response(response.content)
    assert info.tag_layout == envelope.TAG_APPENDED
    assert "from js" in obj["choices"][0]["message"]["content"]


@pytest.mark.parametrize("tier", ["standard", "high", "maximum"])
def test_security_tier_header_is_reported(server, client_pem, tier) -> None:
    response = post_sealed(
        server.url,
        seal_request(chat_request(), server.public_key_pem),
        completion_headers(client_pem, **{"X-Security-Tier": tier}),
    )
    assert open_response(response.content)[0]["_metadata"]["security_tier"] == tier


def _tampered(server_pem: str) -> bytes:
    doc = json.loads(seal_request(chat_request(), server_pem))
    raw = bytearray(base64.b64decode(doc["encrypted_payload"]["ciphertext"]))
    raw[0] ^= 0x40
    doc["encrypted_payload"]["ciphertext"] = base64.b64encode(raw).decode()
    return json.dumps(doc).encode()


def _bad_bodies(server_pem: str) -> dict[str, bytes]:
    good = seal_request(chat_request(), server_pem)
    other = KeyPair.generate(2048)
    return {
        "garbage": b"\x00\x01garbage",
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "tampered": _tampered(server_pem),
        "wrong-key": seal_request(chat_request(), other.public_pem),
        "old-version": good.replace(b'"version":"1.0"', b'"version":"0.1"'),
        "not-a-chat-request": seal_request(["model", "messages"], server_pem),
        "bare-string": seal_request("just a string", server_pem),
        "no-messages": seal_request({"model": "m", "messages": []}, server_pem),
        "stream": seal_request(chat_request(stream=True), server_pem),
    }


@pytest.mark.parametrize(
    "case",
    [
        "garbage",
        "empty",
        "truncated",
        "tampered",
        "wrong-key",
        "old-version",
        "not-a-chat-request",
        "bare-string",
        "no-messages",
        "stream",
    ],
)
def test_bad_bodies_get_400_json_and_server_keeps_serving(server, client_pem, case) -> None:
    body = _bad_bodies(server.public_key_pem)[case]
    response = post_sealed(server.url, body, completion_headers(client_pem))
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    if case in ("tampered", "wrong-key"):
        assert detail == envelope.AUTH_FAILED
    assert (
        "Echo: still serving?" in _complete(server, client_pem)["choices"][0]["message"]["content"]
    )


def _header_cases(client_pem: str) -> dict[str, dict]:
    base = completion_headers(client_pem)
    without = {
        name: {k: v for k, v in base.items() if k != name}
        for name in ("X-Payload-ID", "X-Public-Key")
    }
    weak = quote(_weak_pem())
    return {
        "no-payload-id": without["X-Payload-ID"],
        "no-public-key": without["X-Public-Key"],
        "payload-id-too-long": {**base, "X-Payload-ID": "x" * 300},
        "payload-id-control-char": {**base, "X-Payload-ID": "abc\x7fdef"},
        "public-key-garbage": {**base, "X-Public-Key": "not%20a%20key"},
        "public-key-bad-escape": {**base, "X-Public-Key": "%FF%FE"},
        "public-key-1024-bit": {**base, "X-Public-Key": weak},
        "invalid-tier": {**base, "X-Security-Tier": "ultra"},
    }


def _weak_pem() -> str:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from nomyo.protocol.keys import public_pem

    return public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))


@pytest.mark.parametrize(
    "case",
    [
        "no-payload-id",
        "no-public-key",
        "payload-id-too-long",
        "payload-id-control-char",
        "public-key-garbage",
        "public-key-bad-escape",
        "public-key-1024-bit",
        "invalid-tier",
    ],
)
def test_bad_headers_get_400(server, client_pem, case) -> None:
    headers = _header_cases(client_pem)[case]
    response = post_sealed(server.url, seal_request(chat_request(), server.public_key_pem), headers)
    assert response.status_code == 400, response.text
    if case != "payload-id-control-char":  # that one granian's parser refuses, before the app
        assert response.json()["detail"]
    assert _complete(server, client_pem)["object"] == "chat.completion"


def _raw(url: str, data: bytes, *, read: bool = True) -> bytes:
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        if not read:
            return b""
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_oversized_body_refused_with_413_before_reading(server, client_pem) -> None:
    headers = "".join(f"{k}: {v}\r\n" for k, v in completion_headers(client_pem).items())
    answer = _raw(
        server.url,
        f"POST {COMPLETION} HTTP/1.1\r\nHost: x\r\n{headers}"
        f"Content-Length: {MAX_PACKAGE_BYTES + 1}\r\n\r\n".encode(),
    )
    status, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status and b"connection: close" in rest.lower()
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["detail"]
    assert _complete(server, client_pem)["object"] == "chat.completion"


def test_configured_size_limit_and_chunked_and_bad_length(client_pem, tmp_path) -> None:
    with Served("--max-request-bytes", "1500", key_dir=tmp_path) as small:
        response = post_sealed(
            small.url,
            seal_request(chat_request("x" * 2000), small.public_key_pem),
            completion_headers(client_pem),
        )
        assert response.status_code == 413
        chunked = post_sealed(small.url, iter([b"abc"]), completion_headers(client_pem))
        assert chunked.status_code == 411
        bad = _raw(
            small.url,
            f"POST {COMPLETION} HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n".encode(),
        )
        assert b" 400 " in bad.split(b"\r\n")[0]
        assert _complete(small, client_pem)["object"] == "chat.completion"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", COMPLETION, 405),
        ("POST", "/pki/public_key", 405),
        ("DELETE", "/health", 405),
    ],
)
def test_unknown_paths_and_methods(server, method, path, status) -> None:
    response = requests.request(method, server.url + path, timeout=10)
    assert response.status_code == status
    assert response.json()["detail"]


def test_malformed_request_line_gets_json_400(server, client_pem) -> None:
    answer = _raw(server.url, b"NONSENSE\r\n\r\n")
    assert b" 400 " in answer.split(b"\r\n")[0]
    assert _complete(server, client_pem)["object"] == "chat.completion"


def test_keep_alive_reuses_one_connection(server, client_pem) -> None:
    host, port = server.url.rsplit("/", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
        first = conn.sock
        for i in range(3):
            conn.request(
                "POST",
                COMPLETION,
                seal_request(chat_request(f"n{i}"), server.public_key_pem),
                completion_headers(client_pem),
            )
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200 and response.getheader("Connection") != "close"
            assert f"n{i}" in open_response(body)[0]["choices"][0]["message"]["content"]
            assert conn.sock is first
    finally:
        conn.close()


def test_concurrent_requests(server, client_pem) -> None:
    def one(i: int) -> str:
        return _complete(server, client_pem, f"concurrent {i}")["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(24)))
    assert answers == [f"Echo: concurrent {i}" for i in range(24)]


def test_slow_client_cannot_pin_the_server(client_pem, tmp_path) -> None:
    with Served("--header-timeout", "1", "--body-timeout", "1.5", key_dir=tmp_path) as srv:
        host, port = srv.address
        headers = "".join(f"{k}: {v}\r\n" for k, v in completion_headers(client_pem).items())
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            slow.sendall(
                f"POST {COMPLETION} HTTP/1.1\r\nHost: x\r\n{headers}"
                "Content-Length: 5000\r\n\r\n".encode()
                + b"{"
            )
            started = time.monotonic()
            assert _complete(srv, client_pem)["object"] == "chat.completion"  # not blocked
            answer = slow.recv(65536)
            assert b" 408 " in answer.split(b"\r\n")[0]
            assert time.monotonic() - started < 5
        with socket.create_connection((host, int(port)), timeout=10) as idle:
            idle.sendall(b"GET /health HTTP/1.1\r\n")  # never finishes its headers
            assert idle.recv(100) == b""  # closed by the 1 s header timeout


def test_trickling_headers_or_body_are_cut_off_by_a_total_deadline(client_pem, tmp_path) -> None:
    """A byte every 0.2 s never trips a per-read timeout; the phase deadline still does."""
    with Served("--header-timeout", "1", "--body-timeout", "1", key_dir=tmp_path) as srv:
        host, port = srv.address
        headers = "".join(f"{k}: {v}\r\n" for k, v in completion_headers(client_pem).items())
        post = f"POST {COMPLETION} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 100\r\n\r\n"
        for head, trickle in (
            (b"GET /health HTTP/1.1\r\n", b"X-Slow: " + b"a" * 100),
            (post.encode(), b"x" * 100),
        ):
            with socket.create_connection((host, int(port)), timeout=10) as slow:
                slow.sendall(head)
                started = time.monotonic()
                try:
                    for byte in trickle:
                        slow.sendall(bytes([byte]))
                        time.sleep(0.2)
                except OSError:
                    pass  # reset by the server: cut off
                assert time.monotonic() - started < 4
                slow.settimeout(5)
                try:
                    answer = slow.recv(65536)
                except ConnectionResetError:
                    answer = b""
                assert answer == b"" or b" 408 " in answer.split(b"\r\n")[0]
        assert _complete(srv, client_pem)["object"] == "chat.completion"


def test_sigterm_stops_gracefully(client_pem, tmp_path) -> None:
    srv = Served(key_dir=tmp_path)
    try:
        assert _complete(srv, client_pem)["object"] == "chat.completion"
        started = time.monotonic()
        out, _ = srv.stop()
        assert srv.proc.returncode == 0 and "stopped" in out
        assert time.monotonic() - started < 20
    finally:
        kill_group(srv.proc)


def test_nothing_secret_is_logged(caplog, client_pem) -> None:
    marker = "PLAINTEXT-MARKER-5e1f"
    api_key = "sk-test-SECRET-KEY-77"
    with (
        caplog.at_level("DEBUG"),
        start_background(key=keypair("server"), api_keys=[api_key]) as srv,
    ):
        response = post_sealed(
            srv.url,
            seal_request(chat_request(marker), srv.public_key_pem),
            completion_headers(client_pem, Authorization=f"Bearer {api_key}"),
        )
        assert response.status_code == 200
        post_sealed(
            srv.url,
            b"{" + marker.encode(),
            completion_headers(client_pem, Authorization=f"Bearer {api_key}"),
        )
        post_sealed(srv.url, b"x", completion_headers(client_pem, Authorization=f"Bearer {marker}"))
    text = caplog.text
    assert "POST /v1/chat/secure_completion id=test-payload-1 200" in text
    for secret in (marker, api_key, "PRIVATE KEY", client_pem.splitlines()[1]):
        assert secret not in text


def test_internal_error_is_500_json_and_logs_no_message(caplog, client_pem) -> None:
    class Broken:
        name = "broken"

        def complete(self, request: dict) -> dict:
            raise KeyError(request["messages"][-1]["content"])  # a message quoting the prompt

        def close(self) -> None:
            pass

    with caplog.at_level("DEBUG"), start_background(key=keypair("server")) as srv:
        srv.app.backend = Broken()
        body = seal_request(chat_request("SECRET-IN-EXCEPTION"), srv.public_key_pem)
        response = post_sealed(srv.url, body, completion_headers(client_pem))
        assert response.status_code == 500
        assert response.json() == {"detail": "internal server error"}
    assert "KeyError at" in caplog.text and "SECRET-IN-EXCEPTION" not in caplog.text


def test_embedded_server_listens_on_loopback_only() -> None:
    """start_background runs on the standard library (no extra needed): never beyond loopback."""
    with pytest.raises(ValueError, match="loopback only"):
        start_background(key=keypair("server"), host="0.0.0.0")
    with start_background(key=keypair("server"), host="::1") as srv:
        assert srv.url.startswith("http://[::1]:")
        assert requests.get(srv.url + "/health", timeout=10).json() == {"status": "ok"}


def test_idle_workspaces_hold_no_secret_and_failures_keep_none(client_pem) -> None:
    """The server keeps an exchange's secure buffers for later requests (mapping new ones was
    a tenth of a millisecond each); what it keeps is wiped, a request that failed or was large
    keeps nothing, and a steady stream of small requests reuses one workspace."""
    with start_background(key=keypair("server")) as srv:
        idle = srv.app._workspaces._idle
        for i in range(5):
            response = post_sealed(srv.url, seal_request(chat_request(f"kept {i}"),
                                                         srv.public_key_pem),
                                   completion_headers(client_pem))
            assert response.status_code == 200
        assert len(idle) == 1
        (work,) = idle
        slots = list(work._slots.values())
        assert slots and all(not any(memoryview(buf).cast("B")) for buf in slots)
        kept = work
        bad = json.loads(seal_request(chat_request("x"), srv.public_key_pem))
        sealed = bytearray(base64.b64decode(bad["encrypted_payload"]["ciphertext"]))
        sealed[0] ^= 1  # the key opens, the AES-GCM tag then fails
        bad["encrypted_payload"]["ciphertext"] = base64.b64encode(sealed).decode()
        bad = json.dumps(bad).encode()
        assert post_sealed(srv.url, bad, completion_headers(client_pem)).status_code == 400
        assert idle == []  # taken by the failed request and released, not given back
        assert all(buf.closed for buf in slots)
        small = seal_request(chat_request("small"), srv.public_key_pem)
        assert post_sealed(srv.url, small, completion_headers(client_pem)).status_code == 200
        assert len(idle) == 1 and idle[0] is not kept
        big = seal_request(chat_request("y" * 50_000), srv.public_key_pem)
        assert post_sealed(srv.url, big, completion_headers(client_pem)).status_code == 200
        assert idle == [], "a workspace grown by a large request was kept"


def test_fail_closed_refusal_mid_run_is_a_503_not_a_verdict_on_the_request(
        client_pem, monkeypatch, caplog) -> None:
    """Fail-closed mode can start refusing after start (NOMYO_REQUIRE_SECURE_MEMORY is read on
    every call; locked memory can run out): SecureMemoryUnavailable is a SecurityError, and
    opening the request turned it into a 400, telling the caller its package was bad."""
    from nomyo.memory import foreign_frees

    with start_background(key=keypair("server")) as srv:
        body = seal_request(chat_request("refused"), srv.public_key_pem)
        foreign_frees.wipe_cryptography_frees()  # the real state, restored by monkeypatch
        monkeypatch.setattr(foreign_frees, "_state", {"wiped": False, "reason": "as a test"})
        monkeypatch.setenv("NOMYO_REQUIRE_SECURE_MEMORY", "1")
        with caplog.at_level("ERROR", logger="nomyo.server"):
            response = post_sealed(srv.url, body, completion_headers(client_pem))
    assert response.status_code == 503, response.text
    assert response.json() == {"detail": "secure memory is unavailable on this server"}
    assert "blocks cryptography frees are not wiped (as a test)" in caplog.text
