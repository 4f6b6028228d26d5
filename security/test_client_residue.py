"""Residue scan of a client process after 50 encrypted requests.

A child process makes 50 requests of varied sizes (sync and concurrent async) through
`SecureChatCompletion` to the independent peer server running here, drops its own references,
and pauses. The peer server recorded every request and response plaintext exactly as it was
on the wire inside the encryption, and every AES key of both directions; this test then reads
the child's memory through /proc/<pid>/mem and requires that none of them is there: no copy of
a plaintext in its JSON form (windows with JSON syntax and the per-request random token), no
16-byte window of an AES key (cryptography's freed RSA result buffer kept the last 16 bytes
of 1 to 7 keys in 100 per run before nomyo.memory.foreign_frees). A positive control proves the
scan sees ordinary heap memory. The child's locked memory (VmLck) must be back to its
baseline, measured before the client was created, once the client is closed; between
requests the client may hold only its idle workspaces (wiped, at most MAX_IDLE_WORKSPACES of
small exchanges). An async request hands its answer over first and releases its wiped buffers
just after, so the child waits (at most two seconds) for VmLck to settle: memory that leaked
would never come back.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from security.memscan import CHILD_HELPERS, aes_windows, scan_process
from security.residue import child_process, hear, say
from tests.helpers import ROOT
from tests.peer_server import PeerServer

REQUESTS = 50
SIZES = (40, 700, 5_000, 40_000, 300_000, 1_500_000)

CHILD = r"""
import asyncio, gc, json, secrets, sys, time
""" + CHILD_HELPERS + r"""

from nomyo import SecureChatCompletion
url, count, sizes = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
control = bytearray(b'{"residue-control": "') + secrets.token_hex(16).encode() + b'"}'
baseline = vmlck()
say(baseline=baseline, control=control.decode())

def message(i):
    size = sizes[i % len(sizes)]
    token = secrets.token_hex(16)
    filler = ("lorem ipsum " * (size // 12 + 1))[:size]
    return [{"role": "system", "content": "be brief"},
            {"role": "user", "content": token + " " + filler}]

client = SecureChatCompletion(base_url=url, allow_http=True)
for i in range(10):
    response = client.create_sync("residue-model", message(i), temperature=0.1)
    assert response["_metadata"]["is_encrypted"]
    del response

async def batch(start):
    return await asyncio.gather(*[
        client.create(model="residue-model", messages=message(i)) for i in range(start, start + 8)])

for start in range(10, count, 8):
    answers = asyncio.run(batch(start))
    assert len(answers) == 8
    del answers
gc.collect()
say(ready=True, vmlck=settled(baseline))
sys.stdin.readline()
client.close()
gc.collect()
say(closed_vmlck=settled(baseline))
sys.stdin.readline()
"""


def windows(plaintext: bytes, token_at: int) -> list[bytes]:
    """JSON-form windows of a plaintext: its start, its end, and around its random token."""
    return [plaintext[:96], plaintext[-64:], plaintext[max(0, token_at - 24):token_at + 40]]


def find_token(plaintext: bytes) -> int:
    doc = json.loads(plaintext)
    messages = doc.get("messages") or [c["message"] for c in doc["choices"]]
    token = messages[-1]["content"].split(" ", 1)[0]
    return plaintext.index(token.encode())


@pytest.mark.slow
def test_no_plaintext_or_aes_key_left_in_the_client_process():
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs /proc/<pid>/mem (Linux procfs) to scan a process")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with PeerServer(record=True) as peer, child_process(
            [sys.executable, "-c", CHILD, peer.url, str(REQUESTS), ",".join(map(str, SIZES))],
            env=env) as child:
        first = hear(child)
        ready = hear(child)
        assert ready.get("ready"), ready
        assert len(peer.request_plaintexts) == REQUESTS
        needles: dict[bytes, str] = {}
        for i, plaintext in enumerate(peer.request_plaintexts):
            for w in windows(plaintext, find_token(plaintext)):
                needles[w] = f"request {i} plaintext (JSON form)"
        for i, plaintext in enumerate(peer.response_plaintexts):
            for w in windows(plaintext, find_token(plaintext)):
                needles[w] = f"response {i} plaintext (JSON form)"
        needles.update(aes_windows(peer.aes_keys))
        control = first["control"].encode()
        counts = scan_process(child.pid, [*needles, control])
        say(child, "close")
        closed = hear(child)
        say(child, "exit")
        assert child.wait(timeout=60) == 0
    assert counts.pop(control) >= 1, "positive control not found: the scan did not work"
    found = sorted({needles[n] for n, c in counts.items() if c})
    assert found == [], f"residues in the client process: {found[:10]}"
    assert len(peer.aes_keys) == 2 * len(peer.request_plaintexts)
    from nomyo.client.core import MAX_IDLE_WORKSPACES
    from nomyo.protocol.workspace import POOLED_CAPACITY_MAX

    # an idle workspace: a plaintext slot (a small plaintext plus the 4 KiB answer headroom,
    # in pages, with its canary) and at most one key page
    kept = MAX_IDLE_WORKSPACES * (POOLED_CAPACITY_MAX + 2 * 4096)
    assert first["baseline"] <= ready["vmlck"] <= first["baseline"] + kept, (first, ready)
    assert closed["closed_vmlck"] == first["baseline"], (first, closed)
