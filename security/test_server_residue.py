"""After `nomyo serve` has answered, no plaintext of the requests or answers remains in its memory.

The server runs as a real subprocess; its readable memory is scanned (security/memscan.py,
needs ptrace rights: root or a dumpable same-user target) for markers that only ever
travelled inside encrypted packages. A control string the server holds on purpose (its
public key, in the clear) proves the scanner reads real memory.
"""

from __future__ import annotations

import os
import secrets
import time

import pytest
import requests

from security.memscan import scan_process
from security.residue import family
from tests.server_fixtures import (
    COMPLETION,
    chat_request,
    completion_headers,
    kill_group,
    listening_url,
    open_response,
    seal_request,
    serve_process,
    vector_keys,
)


@pytest.mark.slow
@pytest.mark.parametrize("tools", [False, True], ids=["plain", "tools"])
def test_no_plaintext_residue_in_server_memory(tools: bool) -> None:
    if os.geteuid() != 0:
        pytest.skip("memory scan of a hardened (non-dumpable) server needs root (CAP_SYS_PTRACE)")
    proc = serve_process("--key-bits", "2048")
    try:
        url = listening_url(proc)
        pem = requests.get(url + "/pki/public_key", timeout=10).text
        prefix = "RESIDUE" + secrets.token_hex(6)
        extra = {}
        if tools:
            extra["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": "lookup",
                        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                    },
                }
            ]
        with requests.Session() as session:
            for i in range(20):
                text = f"{prefix} message {i} with some words, punctuation; and more {prefix}"
                body = seal_request(chat_request(text, **extra), pem)
                headers = completion_headers(vector_keys()["client_public_pem"])
                response = session.post(url + COMPLETION, data=body, headers=headers, timeout=30)
                assert (
                    prefix in open_response(response.content)[0]["choices"][0]["message"]["content"]
                )
        time.sleep(0.5)  # let the connection's worker thread finish and exit
        control = pem.splitlines()[1].encode()
        # the requests are served by the worker processes: scan each of them
        counts = {}
        for pid in family(proc.pid):
            for needle, n in scan_process(pid, [prefix.encode(), prefix.encode("utf-16-le"),
                                                control]).items():
                counts[needle] = counts.get(needle, 0) + n
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
        kill_group(proc)
    assert counts[control] >= 1, "the scanner did not find the control: it reads no real memory"
    assert counts[prefix.encode()] == 0 and counts[prefix.encode("utf-16-le")] == 0, counts
