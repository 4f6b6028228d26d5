"""No delayed-ACK stall against a server that writes an answer's head and body in two sends
without TCP_NODELAY (stock `http.server`, run as its own process).

Against such a server a kept-alive connection waits about 40 ms per answer for the client's
delayed ACK, unless the client reads in quick-ACK mode. Each test counts the requests done
in a fixed window and asks for more than twice what a stalled client could do in it.
"""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import pytest

from nomyo import SecureChatCompletion
from tests.helpers import ROOT, child_env

WINDOW = 1.5  # seconds of sequential requests
STALL = 0.040  # Linux's minimum delayed-ACK time
MESSAGES = [{"role": "user", "content": "Hello! What is the capital of France?"}]

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"),
                                reason="TCP_QUICKACK is Linux-only (no delayed-ACK fix here)")


@pytest.fixture(params=["http", "https"])
def nagle_peer(request, tmp_path):
    """The independent peer in its own process, Nagle on, plain or TLS: (url, ca_bundle)."""
    cmd = [sys.executable, "tests/peer_server.py", "--nagle"]
    bundle = None
    if request.param == "https":
        trustme = pytest.importorskip("trustme", reason="trustme (test extra) makes the TLS CA")
        ca = trustme.CA()
        pem = tmp_path / "server.pem"
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
        bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        cmd += ["--certfile", str(pem)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=child_env())
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith(request.param + "://"), "peer did not start"
        yield url, (str(bundle) if bundle else None)
    finally:
        proc.kill()
        proc.wait()


def _client(url: str, bundle: str | None) -> SecureChatCompletion:
    return SecureChatCompletion(base_url=url, allow_http=url.startswith("http:"),
                                ca_bundle=bundle, key_size=2048)


def _enough(count: int) -> None:
    stalled = WINDOW / STALL  # what one stall per request would allow at best
    assert count > 2 * stalled, (
        f"{count} requests in {WINDOW}s: a delayed-ACK stall (at most {stalled:.0f})?")


def test_sync_requests_do_not_wait_for_delayed_ack(nagle_peer):
    url, bundle = nagle_peer
    with _client(url, bundle) as client:
        client.create_sync("m", MESSAGES)  # key fetch and connection set-up out of the window
        count, end = 0, time.monotonic() + WINDOW
        while time.monotonic() < end:
            client.create_sync("m", MESSAGES)
            count += 1
    _enough(count)


def test_async_requests_do_not_wait_for_delayed_ack(nagle_peer):
    url, bundle = nagle_peer

    async def run() -> int:
        async with _client(url, bundle) as client:
            await client.create("m", MESSAGES)
            count, end = 0, time.monotonic() + WINDOW
            while time.monotonic() < end:
                await client.create("m", MESSAGES)
                count += 1
            return count

    _enough(asyncio.run(run()))
