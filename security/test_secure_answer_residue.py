"""Residue scan of a client process after 20 `secure_response=True` requests (and after 20
default calls whose dicts were handed to `wipe_tree`, the way docs/client.md shows).

The peer server answers each request with text the client never sent (random tokens around
quotes, a line break and non-ASCII characters, so that every answer goes through the escaped
path: unescaped in C into the answer's second secure buffer), a quarter of them as tool calls
whose arguments carry that text. A child process reads every answer through its views
(content, tool-call arguments), closes it, and pauses; this test then reads the child's
memory through /proc/<pid>/mem for 24-byte windows of every answer text in each form an
ordinary copy would have (UTF-8 as in bytes or a view, and the 1- and 2-byte-per-character
forms of a str), and of the plaintext in its JSON form. None may be there.

Positive control: a last answer is made an ordinary dict with `to_dict()` and kept; its text's
windows must be found, which proves the scan sees an ordinary copy of an answer's text. The
child's locked memory must be back to its baseline once the client is closed.

Measured here (SECURITY.md): default calls whose dicts are merely dropped leave the text of
7 of the 20 answers in freed heap memory (two runs: 7 and 7); handed to `wipe_tree` with no
other reference left, none; secure answers, none.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from security.memscan import CHILD_HELPERS, scan_process
from tests.helpers import ROOT
from tests.peer_server import PeerServer

REQUESTS = 20
WINDOW = 24

CHILD = r"""
import asyncio, gc, json, sys, time
""" + CHILD_HELPERS + r"""

from nomyo import SecureChatCompletion
url, count, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
secure = mode == "secure_answer"
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
baseline = vmlck()
say(baseline=baseline)
seen = []

def read(answer):
    if secure:
        with answer:
            calls = answer.tool_calls()
            view = calls[0].arguments if calls else answer.content()
            seen.append(view.nbytes)
        return
    # the default dict, its text read without making another copy (no encode()), then
    # every string of it zeroed by wipe_tree once no other name holds one
    from nomyo.memory.scrub import wipe_tree
    message = answer["choices"][0]["message"]
    calls = message.get("tool_calls")
    text = calls[0]["function"]["arguments"] if calls else message["content"]
    seen.append(sum(1 if ord(c) < 0x80 else 2 if ord(c) < 0x800 else 3 for c in text))
    del text, calls, message
    wipe_tree(answer)

def options(i):
    return {"tools": TOOLS} if i % 4 == 3 else {}

client = SecureChatCompletion(base_url=url, allow_http=True)
for i in range(count // 2):
    read(client.create_sync("residue-model", [{"role": "user", "content": f"question {i}"}],
                            secure_response=secure, **options(i)))

async def batch(start, stop):
    answers = await asyncio.gather(*[
        client.create(model="residue-model", messages=[{"role": "user", "content": f"q {i}"}],
                      secure_response=secure, **options(i)) for i in range(start, stop)])
    while answers:
        read(answers.pop())

asyncio.run(batch(count // 2, count))
with client.create_sync("residue-model", [{"role": "user", "content": "control"}],
                        secure_response=True) as answer:
    kept = answer.to_dict()  # the positive control: an ordinary copy, kept
gc.collect()
say(ready=True, seen=seen)
sys.stdin.readline()
client.close()
gc.collect()
say(closed_vmlck=settled(baseline))
sys.stdin.readline()
"""


def reply(_message: str) -> str:
    """Text the client never saw, escaped on the wire (quotes, a line break, non-ASCII)."""
    hexes = [secrets.token_hex(20) for _ in range(3)]
    return f'{hexes[0]} "quoted" \u00e9\n{hexes[1]} \u2713 caf\u00e9 {hexes[2]}'


def text_windows(text: str) -> list[bytes]:
    """24-character windows at the start, middle and end of `text`, in each form an ordinary
    copy would hold them: UTF-8 (bytes, a view), Latin-1 and UCS-2 (a str's own storage)."""
    starts = {0, max(0, len(text) // 2 - WINDOW // 2), max(0, len(text) - WINDOW)}
    out = []
    for at in sorted(starts):
        piece = text[at:at + WINDOW]
        out.append(piece.encode("utf-8"))
        if all(ord(c) < 0x100 for c in piece):
            out.append(piece.encode("latin-1"))
        out.append(piece.encode("utf-16-le"))
    return out


def answer_texts(plaintext: bytes) -> list[str]:
    """The secret texts of an answer: its content, or its tool calls' arguments."""
    message = json.loads(plaintext)["choices"][0]["message"]
    if message.get("tool_calls"):
        return [call["function"]["arguments"] for call in message["tool_calls"]]
    return [message["content"]]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["secure_answer", "wipe_tree"])
def test_closed_answers_leave_no_copy_of_their_text_in_the_client_process(mode):
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs /proc/<pid>/mem (Linux procfs) to scan a process")
    from nomyo.memory import binding

    if binding.pyobjects is None:
        pytest.skip("needs the native helper (nomyo._pyobjects) for secure_response")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with PeerServer(record=True) as peer:
        peer.reply = reply
        child = subprocess.Popen([sys.executable, "-c", CHILD, peer.url, str(REQUESTS), mode],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env)
        try:
            first = json.loads(child.stdout.readline())
            ready = json.loads(child.stdout.readline())
            assert ready.get("ready"), ready
            plaintexts = peer.response_plaintexts
            assert len(plaintexts) == REQUESTS + 1
            needles: dict[bytes, str] = {}
            for i, plaintext in enumerate(plaintexts[:REQUESTS]):
                for t in answer_texts(plaintext):
                    for w in text_windows(t):
                        needles[w] = f"answer {i} text"
                for w in (plaintext[:96], plaintext[-64:]):
                    needles[w] = f"answer {i} plaintext (JSON form)"
            (control_text,) = answer_texts(plaintexts[REQUESTS])
            control = [w for w in text_windows(control_text) if len(w) == 2 * WINDOW]
            counts = scan_process(child.pid, [*needles, *control])
            child.stdin.write("close\n")
            child.stdin.flush()
            closed = json.loads(child.stdout.readline())
            child.stdin.write("exit\n")
            child.stdin.flush()
            assert child.wait(timeout=60) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    expected_sizes = [len(answer_texts(p)[0].encode("utf-8")) for p in plaintexts[:REQUESTS]]
    assert sorted(ready["seen"]) == sorted(expected_sizes), "the child did not read the views"
    assert sum(1 for p in plaintexts[:REQUESTS] if b"tool_calls" in p) == REQUESTS // 4
    assert all(counts.pop(w) >= 1 for w in control), (
        "positive control (the str of a to_dict() answer) not found: the scan did not work")
    found = sorted({needles[n] for n, c in counts.items() if c})
    assert found == [], f"residues in the client process: {found[:10]}"
    assert closed["closed_vmlck"] == first["baseline"], (first, closed)
