"""The internet-facing deployment of docs/server.md, for real: our client -> nginx (TLS) ->
`nomyo serve`. The nginx configuration is the one in the docs, taken from there verbatim
(only addresses and file paths are replaced), run by the Debian package's binary."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import ROOT
from tests.server_fixtures import Served

trustme = pytest.importorskip("trustme", reason="trustme (test extra) makes the TLS certificate")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
pytestmark = pytest.mark.skipif(NGINX is None,
                                reason="nginx (Debian package `nginx`) not installed")


def docs_config() -> str:
    text = (Path(ROOT) / "docs" / "server.md").read_text(encoding="utf-8")
    match = re.search(r"```nginx\n(.*?)```", text, re.S)
    assert match, "docs/server.md has no ```nginx block"
    return match.group(1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def edge(tmp_path):
    """nginx with the docs' configuration in front of `nomyo serve`: yields (url, ca_file)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    with Served("--client-address-header", "X-Real-IP", key_dir=tmp_path) as served:
        port = _free_port()
        snippet = (
            docs_config()
            .replace("127.0.0.1:12434", f"{served.address[0]}:{served.address[1]}")
            .replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
            .replace("/etc/nomyo/tls/fullchain.pem", str(cert_file))
            .replace("/etc/nomyo/tls/privkey.pem", str(key_file))
        )
        (tmp_path / "nomyo.conf").write_text(snippet)
        temp = tmp_path / "nginx-temp"
        temp.mkdir()
        user = "user root;\n" if os.geteuid() == 0 else ""
        (tmp_path / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\n"
            f"error_log {tmp_path}/error.log warn;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n  access_log off;\n"
            + "".join(f"  {kind}_temp_path {temp}/{kind};\n"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            + f"  include {tmp_path}/nomyo.conf;\n}}\n"
        )
        nginx = subprocess.Popen(
            [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            url = f"https://127.0.0.1:{port}"
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert nginx.poll() is None, nginx.communicate()[1]
                    assert time.monotonic() < deadline, "nginx did not start"
                    time.sleep(0.1)
            yield url, str(ca_file), served
        finally:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(nginx.pid, signal.SIGKILL)
                nginx.communicate()


def test_project_client_through_nginx(edge) -> None:
    from nomyo import SecureChatCompletion

    url, ca_file, served = edge
    with SecureChatCompletion(base_url=url, ca_bundle=ca_file) as client:
        answer = client.create_sync(
            model="echo", messages=[{"role": "user", "content": "through the edge"}]
        )
    assert answer["choices"][0]["message"]["content"] == "Echo: through the edge"
    assert answer["_metadata"]["is_encrypted"] is True
    # nginx refuses an oversized body itself, before nomyo serve sees a byte of it
    huge = requests.post(url + "/v1/chat/secure_completion", data=b"x" * (15 * 1024 * 1024),
                         verify=ca_file, timeout=30)
    assert huge.status_code == 413
    assert requests.get(url + "/health", verify=ca_file, timeout=10).json() == {"status": "ok"}
    _, err = served.stop()
    assert re.search(r"127\.0\.0\.1 POST /v1/chat/secure_completion id=\S+ 200", err)


def test_smuggling_through_nginx_is_refused(edge) -> None:
    import ssl

    url, ca_file, _ = edge
    port = int(url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=ca_file)
    raw = (b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 42\r\nContent-Length: 0\r\n\r\n"
           b"GET /pki/public_key HTTP/1.1\r\nHost: x\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(raw)
        data = b""
        while True:
            try:
                chunk = tls.recv(65536)
            except (OSError, ssl.SSLError):
                break
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 400") and data.count(b"HTTP/1.1 ") == 1
