"""Helpers shared by the envelope, keys and server tests (imported, not a conftest)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

_REPO = Path(__file__).resolve().parent.parent
_VECTOR_DIRS = (
    os.environ.get("NOMYO_VECTORS_DIR", ""),
    str(_REPO / "tests" / "vectors" / "protocol"),
    str(_REPO.parent / "shared" / "vectors" / "protocol"),  # shared/ beside the checkout
)


def vectors_dir() -> Path:
    """The protocol vectors directory; the test is skipped, naming what is missing, if absent."""
    for candidate in _VECTOR_DIRS:
        if candidate and (Path(candidate) / "keys.json").is_file():
            return Path(candidate)
    pytest.skip("protocol vectors not found: set NOMYO_VECTORS_DIR or add tests/vectors/protocol")


def vector(name: str) -> dict[str, Any]:
    return json.loads((vectors_dir() / name).read_text(encoding="utf-8"))


def vector_names(prefix: str) -> list[str]:
    for candidate in _VECTOR_DIRS:
        if candidate and (Path(candidate) / "keys.json").is_file():
            return sorted(p.name for p in Path(candidate).glob(f"{prefix}_*.json"))
    return [f"{prefix}_MISSING.json"]


def package_bytes(vec: dict[str, Any]) -> bytes:
    return json.dumps(vec["package"]).encode("utf-8")


@cache
def vector_keys() -> dict[str, str]:
    return vector("keys.json")


@cache
def keypair(role: str) -> Any:
    """The server or client KeyPair of keys.json (shared across tests; never closed)."""
    from nomyo.protocol.keys import KeyPair

    return KeyPair.from_pem(vector_keys()[f"{role}_private_pem"].encode("ascii"))


COMPLETION = "/v1/chat/secure_completion"


def completion_headers(
    client_pem: str, *, payload_id: str = "test-payload-1", **extra: str
) -> dict:
    """Request headers as the published Python client sends them (quote() of the PEM)."""
    from urllib.parse import quote

    headers = {
        "X-Payload-ID": payload_id,
        "X-Public-Key": quote(client_pem),
        "Content-Type": "application/octet-stream",
    }
    headers.update(extra)
    return headers


def chat_request(text: str = "Hello, server", **extra: Any) -> dict[str, Any]:
    return {"model": "test-model", "messages": [{"role": "user", "content": text}], **extra}


def seal_request(obj: Any, server_pem: str, **kwargs: Any) -> bytes:
    from nomyo.protocol import envelope

    return envelope.seal_json(obj, server_pem, **kwargs)


def open_response(content: bytes, role: str = "client") -> tuple[Any, Any]:
    from nomyo.protocol import envelope

    return envelope.open_json(content, keypair(role))


def post_sealed(url: str, body: bytes, headers: dict, session: Any = None) -> Any:
    """POST a sealed package to an endpoint's completion path (the one way tests post one)."""
    import requests

    return (session or requests).post(url + COMPLETION, data=body, headers=headers, timeout=30)


def post_request(srv: Any, obj: Any = None, **headers: str) -> Any:
    """Seal `obj` (a default chat request) to `srv` and post it with the vector client key."""
    return post_sealed(srv.url, seal_request(obj or chat_request(), srv.public_key_pem),
                       completion_headers(vector_keys()["client_public_pem"], **headers))


def serve_process(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`python -m nomyo.server --port 0 ARGS` in its own process group (workers included).

    $NOMYO_SERVE_ROOT runs another checkout's server instead (to show a test fails on it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "nomyo.server", "--port", "0", *args],
        cwd=os.environ.get("NOMYO_SERVE_ROOT") or _REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def listening_url(proc: subprocess.Popen) -> str:
    """The URL from the server's "listening on" line (fails with its stderr if it died)."""
    line = proc.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    assert match, (
        f"no listening line: {line!r} / {proc.stderr.read() if proc.poll() is not None else ''}"
    )
    return match.group(1)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a server started by serve_process, workers included, if it still runs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


class Served:
    """`nomyo serve` (granian) in a child process with the vector server key: `.url`,
    `.public_key_pem`, `.proc`, `.stop()`. Skipped, naming it, when granian is missing."""

    def __init__(self, *args: str, key_dir: Path, env: dict | None = None) -> None:
        pytest.importorskip("granian", reason="granian (the `server` extra) runs nomyo serve")
        key_file = key_dir / "server_key.pem"
        if not key_file.exists():
            key_file.write_text(vector_keys()["server_private_pem"])
            key_file.chmod(0o600)
        self.proc = serve_process("--key-file", str(key_file), *args, env=env)
        try:
            self.url = listening_url(self.proc)
        except BaseException:
            kill_group(self.proc)
            raise
        self.public_key_pem = vector_keys()["server_public_pem"]
        host, port = self.url.rsplit("/", 1)[1].rsplit(":", 1)
        self.address = (host.strip("[]"), int(port))

    def stop(self) -> tuple[str, str]:
        """SIGTERM, wait (graceful), and return (stdout, stderr); SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            raise

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            kill_group(self.proc)
