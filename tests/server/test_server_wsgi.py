"""The same application under a production WSGI server (waitress), configured by environment."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import requests

from nomyo.protocol.keys import KeyPair
from tests.helpers import ROOT
from tests.server_fixtures import (
    COMPLETION,
    chat_request,
    completion_headers,
    open_response,
    seal_request,
    vector_keys,
)

pytest.importorskip("waitress", reason="waitress (WSGI server) is needed for the WSGI test")


@pytest.mark.slow
def test_runs_under_waitress(tmp_path) -> None:
    pair = KeyPair.generate(2048)
    pair.save(tmp_path, password="pw")
    (tmp_path / "api_keys").write_text("wsgi-key\n")
    (tmp_path / "api_keys").chmod(0o600)
    env = {
        **os.environ,
        "NOMYO_KEY_FILE": str(tmp_path / "private_key.pem"),
        "NOMYO_KEY_PASSWORD": "pw",
        "NOMYO_API_KEY_FILE": str(tmp_path / "api_keys"),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "waitress",
            "--listen=127.0.0.1:0",
            "--threads=4",
            "--call",
            "nomyo.server.wsgi:create_app",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = None
        for _ in range(50):
            match = re.search(r"Serving on (http://\S+)", proc.stdout.readline())
            if match:
                url = match.group(1)
                break
        assert url, "waitress did not start"
        assert requests.get(url + "/pki/public_key", timeout=10).text == pair.public_pem
        headers = completion_headers(
            vector_keys()["client_public_pem"], Authorization="Bearer wsgi-key"
        )
        body = seal_request(chat_request("through WSGI"), pair.public_pem)
        ok = requests.post(url + COMPLETION, data=body, headers=headers, timeout=30)
        assert ok.status_code == 200, ok.text
        obj, _ = open_response(ok.content)
        assert "through WSGI" in obj["choices"][0]["message"]["content"]
        assert obj["_metadata"]["payload_id"] == headers["X-Payload-ID"]
        bad = requests.post(url + COMPLETION, data=b"junk", headers=headers, timeout=30)
        assert bad.status_code == 400 and bad.json()["detail"]
        unauthorized = requests.post(
            url + COMPLETION,
            data=body,
            timeout=30,
            headers={**headers, "Authorization": "Bearer nope"},
        )
        assert unauthorized.status_code == 401
        assert requests.get(url + "/health", timeout=10).json() == {"status": "ok"}
        # raw: an HTTP client never reads a HEAD body, so only the socket shows one was sent
        host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"HEAD /pki/public_key HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n")  # old: a body
        assert obj["_metadata"]["memory_protection"]["core_dump_prevention"] is True  # hardened
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
