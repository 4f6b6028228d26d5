"""The client's CPU savings keep their promises: a kept workspace is wiped and reused (and
large or failed ones are not kept); the fast header parser reads what http.client reads."""
from __future__ import annotations

import http.client
import io

import pytest

from nomyo import ServerError
from nomyo.client.core import MAX_IDLE_WORKSPACES
from nomyo.client.http_pools import MAX_HEADERS, read_header_block
from tests.helpers import wait_until

MESSAGES = [{"role": "user", "content": "workspace marker 5f3a"}]


def _idle(chat):
    return chat.client._workspaces._idle


def test_one_workspace_serves_sequential_requests_and_is_wiped(chat):
    chat.create_sync("m", MESSAGES)
    (first,) = _idle(chat)
    for _ in range(3):
        chat.create_sync("m", MESSAGES)
        assert _idle(chat) == [first]
    assert first._slots, "the workspace kept no buffer"
    for buf in first._slots.values():
        with memoryview(buf) as view:
            assert not any(view), "a kept workspace holds data of the last exchange"


def test_a_large_exchange_does_not_keep_its_workspace(chat):
    chat.create_sync("m", [{"role": "user", "content": "x" * 200_000}])
    assert _idle(chat) == []


def test_a_failed_exchange_does_not_keep_its_workspace(chat, peer):
    peer.inject(500, body={"detail": "boom"})
    with pytest.raises(ServerError):
        chat.create_sync("m", MESSAGES)
    assert _idle(chat) == []


def test_async_requests_return_their_workspaces_and_close_releases_them(chat, peer):
    import asyncio

    async def burst():
        await asyncio.gather(*[chat.create("m", MESSAGES) for _ in range(4)])

    peer.hold_until = 4  # all four in flight at once: four workspaces, none reused
    asyncio.run(burst())
    # each worker hands its workspace back after the answer went to the loop: wait for it
    wait_until(lambda: len(_idle(chat)) >= MAX_IDLE_WORKSPACES, seconds=10)
    kept = list(_idle(chat))
    # four were handed back, exactly the pool's cap is kept, the rest released
    assert len(kept) == MAX_IDLE_WORKSPACES
    chat.close()
    assert _idle(chat) == []
    assert all(not work._slots for work in kept)


HEAD = (b"Server: test\r\nContent-Type: application/json\r\nSet-Cookie: a=1\r\n"
        b"Set-Cookie: b=2\r\nX-Folded: first\r\n  second\r\nContent-Length: 12\r\n\r\nbody")


def test_header_block_reads_as_http_client_does():
    ours, theirs = read_header_block(io.BytesIO(HEAD)), http.client.parse_headers(io.BytesIO(HEAD))
    assert ours.get_all("set-cookie") == theirs.get_all("set-cookie") == ["a=1", "b=2"]
    assert ours["content-length"] == theirs["content-length"] == "12"
    assert ours["X-Folded"] == "first second"
    assert [k.lower() for k in ours.keys()] == [k.lower() for k in theirs.keys()]


@pytest.mark.parametrize("block, error", [
    (b"no colon here\r\n\r\n", http.client.HTTPException),
    (b" leading: space\r\n\r\n", http.client.HTTPException),
    (b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n", http.client.LineTooLong),
    (b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n",
     http.client.HTTPException),
])
def test_header_block_refuses_malformed_answers(block, error):
    with pytest.raises(error):
        read_header_block(io.BytesIO(block))


def test_a_kept_workspace_is_reused_only_under_its_fail_closed_setting(chat):
    from nomyo import SecureMemoryUnavailable

    chat.create_sync("m", MESSAGES)
    (lenient,) = _idle(chat)
    try:
        chat.client.require_secure_memory = True
    except SecureMemoryUnavailable as err:
        pytest.skip(f"secure memory cannot be required here: {err}")
    chat.create_sync("m", MESSAGES)
    assert lenient in _idle(chat)  # not taken: made without fail-closed
    assert any(work.require for work in _idle(chat))
