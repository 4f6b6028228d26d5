"""Backends: the echo model's shape, and forwarding to a real OpenAI-compatible HTTP server."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import requests

from nomyo.server import start_background
from nomyo.server.backends import EchoBackend, create_backend
from tests.server_fixtures import (
    COMPLETION,
    chat_request,
    completion_headers,
    keypair,
    open_response,
    seal_request,
    vector_keys,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            },
        },
    }
]


def test_echo_is_deterministic_and_realistic() -> None:
    request = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "last "}, {"type": "text", "text": "one"}],
            },
        ],
    }
    first, second = EchoBackend().complete(request), EchoBackend().complete(request)
    assert first["id"] == second["id"] and first["choices"] == second["choices"]
    assert first["object"] == "chat.completion" and first["model"] == "m"
    choice = first["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Echo: last one"}
    assert choice["finish_reason"] == "stop"
    usage = first["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_echo_calls_a_tool_when_offered() -> None:
    result = EchoBackend().complete(chat_request("find cats", tools=TOOLS))
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert "find cats" in choice["message"]["content"]
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "lookup"
    assert json.loads(call["function"]["arguments"]) == {"query": "find cats", "limit": 0}
    none = EchoBackend().complete(chat_request("x", tools=TOOLS, tool_choice="none"))
    assert "tool_calls" not in none["choices"][0]["message"]


def test_backend_spec_validation() -> None:
    with pytest.raises(ValueError, match="echo"):
        create_backend("ftp://x")


class _FakeOpenAI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mode = "ok"
    seen: ClassVar[list] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append((self.path, json.loads(body)))
        if self.mode == "slow":
            time.sleep(2)
        if self.mode == "error":
            self._reply(500, b'{"error": "boom"}')
        elif self.mode == "unavailable":
            self._reply(503, b"{}")
        elif self.mode == "garbage":
            self._reply(200, b"<html>not json")
        elif self.mode == "nan":
            self._reply(200, b'{"choices": [], "logprob": -Infinity}')
        elif self.mode == "surrogate":  # valid JSON whose text has no UTF-8 form
            self._reply(200, b'{"choices": [{"index": 0, "finish_reason": "stop", "message": '
                             b'{"role": "assistant", "content": "half \\ud800 a pair"}}]}')
        elif self.mode == "empty":
            self._reply(200, b"")
        elif self.mode == "empty_error":
            self._reply(500, b"")
        elif self.mode == "empty_chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"0\r\n\r\n")
        elif self.mode == "odd_retry":  # a digit that is not ASCII: int() refuses it
            self.send_response(429)
            self.send_header("Retry-After", "\u00b2")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
        elif self.mode == "notchat":
            self._reply(200, b'{"echo": "to the backend"}')
        elif self.mode in ("stall_body", "cut_body"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"choices": [')
            self.wfile.flush()
            if self.mode == "stall_body":
                time.sleep(2)
            self.close_connection = True
        else:
            request = json.loads(body)
            answer = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 1,
                "model": request["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {
                            "role": "assistant",
                            "content": "fake: " + request["messages"][-1]["content"],
                        },
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            }
            self._reply(200, json.dumps(answer).encode())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # the server under test gave up waiting (timeout case)
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def fake_backend():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _ask(srv, text: str = "to the backend", **extra) -> requests.Response:
    return requests.post(
        srv.url + COMPLETION,
        timeout=30,
        data=seal_request(chat_request(text, **extra), srv.public_key_pem),
        headers=completion_headers(vector_keys()["client_public_pem"]),
    )


def test_forwards_to_openai_compatible_backend(fake_backend) -> None:
    _FakeOpenAI.mode, _FakeOpenAI.seen = "ok", []
    with start_background(key=keypair("server"), backend=fake_backend) as srv:
        response = _ask(srv, "héllo backend", temperature=0.2, tools=TOOLS)
        assert response.status_code == 200, response.text
        obj, _ = open_response(response.content)
    assert obj["choices"][0]["message"]["content"] == "fake: héllo backend"
    assert obj["_metadata"]["response_status"] == "success"
    path, forwarded = _FakeOpenAI.seen[-1]
    assert path == "/v1/chat/completions"
    assert forwarded == chat_request("héllo backend", temperature=0.2, tools=TOOLS)


@pytest.mark.parametrize(
    ("mode", "status"),
    [("error", 502), ("unavailable", 503), ("garbage", 502), ("slow", 504), ("nan", 502),
     ("notchat", 502), ("stall_body", 504), ("cut_body", 502), ("surrogate", 502),
     ("empty", 502), ("empty_error", 502), ("empty_chunked", 502), ("odd_retry", 429)],
)
def test_backend_failures_become_json_5xx(fake_backend, mode, status) -> None:
    _FakeOpenAI.mode = mode
    try:
        with start_background(
            key=keypair("server"), backend=fake_backend, backend_timeout=0.5
        ) as srv:
            response = _ask(srv)
            assert response.status_code == status
            detail = response.json()["detail"]
            assert "Traceback" not in detail and "to the backend" not in detail
    finally:
        _FakeOpenAI.mode = "ok"


def test_unreachable_backend_is_503() -> None:
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with start_background(key=keypair("server"), backend=f"http://127.0.0.1:{port}") as srv:
        response = _ask(srv)
    assert response.status_code == 503
    assert response.json()["detail"].startswith("backend unavailable")
