"""SecureCompletionClient against an independent protocol implementation (peer_server.py)."""
from __future__ import annotations

import asyncio
import ctypes
import json
import os
import socket
import stat
import time
import uuid
from urllib.parse import unquote

import pytest

from nomyo.client import core as client_module
from nomyo.client.core import SecureCompletionClient
from nomyo.errors import (
    APIConnectionError,
    ChatRequestError,
    DisposedError,
    InvalidRequestError,
    PackageError,
    RateLimitError,
    SecurityError,
    ServiceUnavailableError,
)
from nomyo.protocol import keys
from nomyo.protocol import workspace as workspace_module
from tests.helpers import wait_until
from tests.peer_server import PeerServer, open_with, seal_for

MESSAGES = [{"role": "user", "content": "hello peer"}]


@pytest.fixture
def client(peer):
    c = SecureCompletionClient(peer.url, allow_http=True, key_size=2048, max_retries=2)
    yield c
    c.close()


def send(client: SecureCompletionClient, payload=None, **kw):
    payload = payload or {"model": "m", "messages": MESSAGES}
    return client.send_secure_request_sync(payload, str(uuid.uuid4()), **kw)


def test_round_trip_and_response_shape(client, peer):
    payload_id = str(uuid.uuid4())
    response = asyncio.run(client.send_secure_request(
        {"model": "m", "messages": MESSAGES, "temperature": 0.3}, payload_id))
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"] == {"role": "assistant", "content": "hello peer"}
    meta = response["_metadata"]
    assert meta["payload_id"] == payload_id
    assert meta["is_encrypted"] is True
    assert meta["encryption_algorithm"] == "hybrid-aes256-rsa4096"
    assert isinstance(meta["processed_at"], int)
    assert meta["response_status"] == "success"  # server-side metadata is kept


def test_wire_headers_and_payload(client, peer):
    payload_id = str(uuid.uuid4())
    client.send_secure_request_sync(
        {"model": "m", "messages": MESSAGES, "tools": [], "seed": 7}, payload_id,
        api_key="sk-test", security_tier="high")
    headers = peer.received[-1]["headers"]
    assert headers["x-payload-id"] == payload_id
    assert headers["content-type"] == "application/octet-stream"
    assert headers["authorization"] == "Bearer sk-test"
    assert headers["x-security-tier"] == "high"
    assert unquote(headers["x-public-key"]) == client.public_key_pem
    plaintext = json.loads(peer.request_plaintexts[-1])
    assert plaintext == {"model": "m", "messages": MESSAGES, "tools": [], "seed": 7}
    send(client)
    headers = peer.received[-1]["headers"]
    assert "authorization" not in headers and "x-security-tier" not in headers


def test_server_key_fetched_once(client, peer):
    for _ in range(4):
        send(client)
    assert peer.key_fetches == 1


def test_server_key_refreshed_once_when_server_rotates(client, peer):
    send(client)
    peer.rotate_key()
    response = send(client)
    assert response["choices"][0]["message"]["content"] == "hello peer"
    assert peer.key_fetches == 2
    statuses = len(peer.received)
    assert statuses == 3  # first ok, refused with the old key, accepted with the new one


def test_pinned_fingerprint_accepts_the_right_key(peer):
    pin = keys.fingerprint(peer.public_pem.decode())
    with SecureCompletionClient(peer.url, allow_http=True, key_size=2048,
                                server_key_fingerprint=pin.upper()) as c:
        send(c)
        assert asyncio.run(c.fetch_server_public_key()) == peer.public_pem.decode()


def test_pin_mismatch_is_security_error_before_any_post(peer):
    with SecureCompletionClient(peer.url, allow_http=True, key_size=2048,
                                server_key_fingerprint="ab" * 32) as c, \
            pytest.raises(SecurityError, match="pinned"):
        send(c)
    assert peer.received == []


def test_pinned_client_never_switches_silently(peer):
    pin = keys.fingerprint(peer.public_pem.decode())
    with SecureCompletionClient(peer.url, allow_http=True, key_size=2048,
                                server_key_fingerprint=pin) as c:
        send(c)
        peer.rotate_key()
        with pytest.raises(SecurityError, match="pinned"):
            send(c)
    assert len(peer.received) == 2  # the refused POST, then nothing sealed to the new key


def test_plain_http_refused_before_any_byte(peer):
    with SecureCompletionClient(peer.url, key_size=2048) as c:
        with pytest.raises(SecurityError, match="HTTP"):
            send(c)
        with pytest.raises(SecurityError):
            asyncio.run(c.fetch_server_public_key())
    assert peer.key_fetches == 0 and peer.received == []


@pytest.mark.parametrize("field", ["api_key", "payload_id"])
def test_header_injection_refused_before_any_byte(client, peer, field):
    kwargs = {"api_key": "sk\r\nX-Evil: 1"} if field == "api_key" else {}
    payload_id = "id\nX-Evil: 1" if field == "payload_id" else str(uuid.uuid4())
    with pytest.raises(SecurityError) as info:
        client.send_secure_request_sync({"model": "m", "messages": MESSAGES}, payload_id, **kwargs)
    assert "sk\r\n" not in str(info.value)
    assert peer.key_fetches == 0 and peer.received == []


def test_invalid_tier_and_stream_refused_before_any_byte(client, peer):
    with pytest.raises(ValueError, match="ultra"):
        send(client, security_tier="ultra")
    with pytest.raises(InvalidRequestError, match="stream"):
        send(client, {"model": "m", "messages": MESSAGES, "stream": True})
    assert peer.received == []


def test_oversized_plaintext_refused_before_sending(client, peer):
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * (10 * 1024 * 1024)}]}
    with pytest.raises(ValueError):
        send(client, big)
    assert peer.received == []


def test_per_call_base_url_keeps_the_key_pair(client, peer):
    with PeerServer() as other:
        send(client)
        client.send_secure_request_sync({"model": "m", "messages": MESSAGES}, "p2",
                                        base_url=other.url)
        first = unquote(peer.received[-1]["headers"]["x-public-key"])
        second = unquote(other.received[-1]["headers"]["x-public-key"])
    assert first == second == client.public_key_pem


@pytest.mark.parametrize("status", [429, 503])
def test_retried_honouring_retry_after_with_same_payload_id(client, peer, status):
    peer.inject(status, {"Retry-After": "1"}, {"detail": "slow down"})
    start = time.monotonic()
    send(client)
    assert time.monotonic() - start >= 0.95
    ids = {r["headers"]["x-payload-id"] for r in peer.received}
    assert len(peer.received) == 2 and len(ids) == 1


@pytest.mark.parametrize("status,cls", [(429, RateLimitError), (503, ServiceUnavailableError)])
def test_retries_run_out(peer, status, cls):
    peer.inject(status, {"Retry-After": "0"}, {"detail": "busy"}, times=3)
    with SecureCompletionClient(peer.url, allow_http=True, key_size=2048, max_retries=2) as c, \
            pytest.raises(cls) as info:
        send(c)
    assert info.value.status_code == status
    assert info.value.error_details == {"detail": "busy"}
    assert len(peer.received) == 3


def test_network_failure_is_api_connection_error():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    with SecureCompletionClient(url, allow_http=True, key_size=2048, max_retries=0) as c, \
            pytest.raises(APIConnectionError) as info:
        send(c)
    assert info.value.__cause__ is not None


def test_tampered_response_is_security_error(client, peer):
    send(client)
    wrong_key = keys.KeyPair.generate(2048).public_key
    package, _ = seal_for(wrong_key, b'{"id": "x"}')
    peer.inject(200, {"Content-Type": "application/json"}, package)
    with pytest.raises(SecurityError) as info:
        send(client)
    assert str(info.value) == "Decryption failed: integrity check or authentication failed"


def test_malformed_response_is_package_error(client, peer):
    peer.inject(200, {}, b"not json at all")
    with pytest.raises(PackageError):
        send(client)


def test_sixteen_concurrent_requests_overlap(client, peer):
    send(client)  # keys and server key ready
    peer.hold_until = 16  # each POST is held until all 16 are in flight (30 s at most)

    async def many():
        return await asyncio.gather(*[
            client.send_secure_request({"model": "m", "messages": [
                {"role": "user", "content": f"n{i}"}]}, str(uuid.uuid4())) for i in range(16)])

    answers = asyncio.run(many())
    assert [a["choices"][0]["message"]["content"] for a in answers] == [f"n{i}" for i in range(16)]
    assert peer.max_in_flight == 16


class RecordingWorkspace(workspace_module.Workspace):
    """Reports, when the exchange hands it back, whether every slot and key cell was already
    wiped (cells are read through their slot's mapping, which is still there)."""

    def key(self, size: int):
        buf = super().key(size)
        self.cells = [*getattr(self, "cells", []), (buf.address, size)]
        return buf

    def report(self) -> str:
        slots = [buf for buf in self._slots.values() if not buf.closed]
        with_secrets = sum(1 for buf in slots if any(memoryview(buf).cast("B")))
        cells, self.cells = getattr(self, "cells", []), []
        cells_with_secrets = sum(1 for where, size in cells if any(ctypes.string_at(where, size)))
        return (f"end: {len(slots)} slots, {with_secrets} not wiped; "
                f"{len(cells)} keys, {cells_with_secrets} not wiped")


@pytest.fixture
def recorded(monkeypatch):
    """The events of every exchange: answers handed to the loop, workspaces handed back."""
    events: list[str] = []
    monkeypatch.setattr(workspace_module, "Workspace", RecordingWorkspace)
    give = workspace_module.WorkspacePool.give

    def recording_give(pool, work, ended_cleanly):
        events.append(work.report())
        give(pool, work, ended_cleanly)

    monkeypatch.setattr(workspace_module.WorkspacePool, "give", recording_give)
    settle = client_module._settle

    def recording_settle(future, result, exc):
        events.append("cancelled" if future.cancelled() else "answer")
        settle(future, result, exc)

    monkeypatch.setattr(client_module, "_settle", recording_settle)
    return events


def test_slots_are_wiped_when_the_exchange_returns(client, peer, recorded):
    send(client)
    asyncio.run(client.send_secure_request({"model": "m", "messages": MESSAGES}, "p"))
    wait_until(lambda: len(recorded) >= 3, seconds=10)  # handed back just after the answer
    # sync: handed back before it returns; async: the answer is posted to the loop, then the
    # workspace is handed back (which of the two the test sees first is up to the scheduler)
    # one mapping each: the AES keys lived in cells of the plaintext slot
    closed = "end: 1 slots, 0 not wiped; 2 keys, 0 not wiped"
    assert recorded[0] == closed
    assert sorted(recorded[1:]) == ["answer", closed]


def test_cancelled_request_still_releases_its_workspace(client, peer, recorded):
    send(client)
    recorded.clear()
    peer.delay = 0.3

    async def cancel_midway():
        task = asyncio.create_task(client.send_secure_request(
            {"model": "m", "messages": MESSAGES}, "p"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # the worker finishes the exchange meanwhile

    asyncio.run(cancel_midway())
    assert sorted(recorded) == ["cancelled", "end: 1 slots, 0 not wiped; 2 keys, 0 not wiped"]


def test_answer_after_the_loop_closed_is_dropped_and_released(client, peer, recorded, caplog):
    send(client)
    recorded.clear()
    peer.delay = 0.3

    async def leave_it_running():
        asyncio.get_running_loop().create_task(client.send_secure_request(
            {"model": "m", "messages": MESSAGES}, "p"))
        await asyncio.sleep(0.1)

    with caplog.at_level("DEBUG", logger="nomyo.client.core"):
        asyncio.run(leave_it_running())  # cancels the task and closes its loop
        time.sleep(0.6)
    assert recorded == ["end: 1 slots, 0 not wiped; 2 keys, 0 not wiped"]
    assert "event loop closed before the answer arrived" in caplog.text


def test_failed_release_after_the_answer_is_logged(client, peer, recorded, monkeypatch, caplog):
    def failing_give(pool, work, ended_cleanly):
        work.close()
        raise ValueError("secure free failed: [Errno 22] Invalid argument")

    monkeypatch.setattr(workspace_module.WorkspacePool, "give", failing_give)
    with caplog.at_level("ERROR", logger="nomyo.client.core"):
        answer = asyncio.run(client.send_secure_request(
            {"model": "m", "messages": MESSAGES}, "p"))
        # the release runs in the worker after the answer was handed over: wait for its log
        wait_until(lambda: "releasing an exchange's (wiped) secure buffers failed"
                   in caplog.text, seconds=10)
    assert answer["choices"][0]["message"]["content"] == "hello peer"


def test_low_level_methods_interoperate_with_the_peer(client, peer):
    client.generate_keys()
    assert asyncio.run(client.fetch_server_public_key()) == peer.public_pem.decode()
    package = asyncio.run(client.encrypt_payload({"model": "m", "messages": MESSAGES}))
    plaintext, _ = open_with(peer.private_key, package)
    assert json.loads(plaintext) == {"model": "m", "messages": MESSAGES}
    public = keys.load_public_key(client.public_key_pem)
    answer, _ = seal_for(public, json.dumps({"id": "r", "choices": []}).encode())
    opened = asyncio.run(client.decrypt_response(answer, "pid-9"))
    assert opened["id"] == "r" and opened["_metadata"]["payload_id"] == "pid-9"
    with pytest.raises(ValueError):
        asyncio.run(client.decrypt_response(b"", "pid"))


def test_generate_and_load_keys_with_password(peer, tmp_path):
    with SecureCompletionClient(peer.url, allow_http=True, key_size=2048) as c:
        c.generate_keys(save_to_file=True, key_dir=str(tmp_path), password="correct horse")
        saved = c.public_key_pem
    private = tmp_path / "private_key.pem"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in private.read_bytes()
    with SecureCompletionClient(peer.url, allow_http=True) as c:
        c.load_keys(str(private), str(tmp_path / "public_key.pem"), password="correct horse")
        assert c.public_key_pem == saved
        send(c)
        with pytest.raises(ValueError):
            c.load_keys(str(private), password="wrong")
        other = keys.KeyPair.generate(2048)
        (tmp_path / "other.pem").write_text(other.public_pem)
        with pytest.raises(ValueError, match="does not match"):
            c.load_keys(str(private), str(tmp_path / "other.pem"), password="correct horse")


def test_key_dir_constructor_option(peer, tmp_path):
    with SecureCompletionClient(peer.url, allow_http=True, key_size=2048,
                                key_dir=tmp_path, key_password="pw-123456") as c:
        send(c)
        first = c.public_key_pem
    with SecureCompletionClient(peer.url, allow_http=True, key_dir=tmp_path,
                                key_password="pw-123456") as c:
        send(c)
        assert c.public_key_pem == first


def test_wait_for_keys_raises_a_wrong_password_at_once(peer, tmp_path):
    """Without it the wrong password surfaced only at the first request."""
    from nomyo.client import SecureChatCompletion

    keys.KeyPair.generate(2048).save(tmp_path, "pw-123456")
    with SecureChatCompletion(base_url=peer.url, allow_http=True, key_dir=tmp_path,
                              key_password="pw-123456") as good:
        good.wait_for_keys()
        assert good.client.public_key_pem
    with SecureChatCompletion(base_url=peer.url, allow_http=True, key_dir=tmp_path,
                              key_password="not-it") as bad:
        with pytest.raises(ValueError, match="wrong password"):
            bad.wait_for_keys()


def test_close_wipes_keys_and_disposes(peer):
    c = SecureCompletionClient(peer.url, allow_http=True, key_size=2048)
    send(c)
    pair = c.keyring.current
    c.close()
    assert pair.closed and c.closed
    for call in (lambda: send(c), c.generate_keys,
                 lambda: asyncio.run(c.fetch_server_public_key()),
                 lambda: asyncio.run(c.send_secure_request({"model": "m"}, "p"))):
        with pytest.raises(DisposedError):
            call()
    c.close()  # idempotent


def test_context_managers_close(peer):
    with SecureCompletionClient(peer.url, allow_http=True, key_size=2048) as c:
        send(c)
    assert c.closed

    async def use():
        async with SecureCompletionClient(peer.url, allow_http=True, key_size=2048) as ac:
            await ac.send_secure_request({"model": "m", "messages": MESSAGES}, "p")
        return ac

    assert asyncio.run(use()).closed


def test_repr_and_messages_never_leak_secrets(peer):
    c = SecureCompletionClient(peer.url, allow_http=True, key_size=2048)
    send(c)
    pem = c.public_key_pem
    assert "PRIVATE" not in repr(c) and pem not in repr(c)
    c.close()


def test_require_secure_memory_fails_closed_without_the_right_to_lock(peer):
    from tests.helpers import run_python, unprivileged_prefix

    code = f"""
        from nomyo import SecureMemoryUnavailable
        from nomyo.client.core import SecureCompletionClient
        try:
            SecureCompletionClient({peer.url!r}, allow_http=True, key_size=2048,
                                   require_secure_memory=True)
        except SecureMemoryUnavailable as err:
            print("REFUSED", err)
    """
    result = run_python(code, prefix=unprivileged_prefix())
    assert "REFUSED" in result.stdout, result.stderr
    assert "memory locking" in result.stdout and "CAP_IPC_LOCK" in result.stdout
    assert peer.received == [] and peer.key_fetches == 0


def test_require_secure_memory_sends_where_locking_works(peer):
    from nomyo.memory import get_memory_protection_info

    report = get_memory_protection_info()
    if not (report["has_memory_locking"] and report["dump_excluded"]):
        pytest.skip("this machine cannot lock memory (no CAP_IPC_LOCK / RLIMIT_MEMLOCK too small)")
    with SecureCompletionClient(peer.url, allow_http=True, key_size=2048,
                                require_secure_memory=True) as c:
        send(c)


def test_rotation_under_concurrent_load_never_breaks_a_request(peer):
    with SecureCompletionClient(peer.url, allow_http=True, key_size=2048,
                                key_rotation_interval=0.3) as c:
        async def burst():
            return await asyncio.gather(*[
                c.send_secure_request({"model": "m", "messages": MESSAGES}, str(uuid.uuid4()))
                for _ in range(8)])

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answers = asyncio.run(burst())
            assert all(a["choices"][0]["message"]["content"] == "hello peer" for a in answers)
            seen = {r["headers"]["x-public-key"] for r in peer.received}
            if len(seen) >= 3:
                break
            time.sleep(0.1)
    assert len(seen) >= 3  # the pair rotated at least twice while requests were in flight


def test_locally_raised_errors_carry_no_http_status():
    from nomyo.errors import InvalidRequestError, RateLimitError

    assert InvalidRequestError("stream refused", status_code=None).status_code is None
    assert InvalidRequestError("from the server").status_code == 400
    assert RateLimitError("slow down", 429, {"detail": "x"}).error_details == {"detail": "x"}


@pytest.mark.parametrize("payload, words", [
    ({"messages": MESSAGES}, "'model'"),
    ({"model": "m"}, "'messages'"),
    ({"model": "m", "messages": []}, "'messages'"),
    ({"model": "m", "messages": ["hi"]}, "'messages'"),
    ({"model": "m", "messages": MESSAGES, "stream": True}, "stream"),
])
def test_the_one_chat_request_check_refuses_before_any_byte(peer, payload, words):
    """Client and server share one check; its error is both a ValueError (as the published
    client raises) and an InvalidRequestError."""
    with SecureCompletionClient(peer.url, allow_http=True, key_size=2048) as c:
        with pytest.raises(ChatRequestError, match=words) as info:
            c.send_secure_request_sync(payload, "p")
    assert isinstance(info.value, ValueError) and isinstance(info.value, InvalidRequestError)
    assert peer.received == [] and peer.key_fetches == 0


def test_settings_take_effect_when_changed_or_are_read_only(peer):
    with SecureCompletionClient(peer.url, allow_http=True, max_retries=1, timeout=7.0,
                                key_size=2048, secure_memory=False) as c:
        assert (c.max_retries, c.timeout, c.key_size, c.secure_memory) == (1, 7.0, 2048, False)
        for name in ("key_size", "secure_memory"):
            with pytest.raises(AttributeError):
                setattr(c, name, getattr(c, name))
        c.max_retries = 0
        peer.inject(503, body={"detail": "busy"})
        with pytest.raises(ServiceUnavailableError):
            send(c)  # no retry any more: the one scripted 503 is the answer
        send(c)
        c.allow_http = False
        with pytest.raises(SecurityError, match="plain HTTP"):
            send(c)
        c.timeout = 0.2
        c.allow_http = True
        peer.delay = 1.0
        with pytest.raises(APIConnectionError, match="timed out"):
            send(c)
