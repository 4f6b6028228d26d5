"""A minimal OpenAI-compatible chat-completions server, run as its own process (for tests).

Answers `POST /v1/chat/completions` with "backend: " and the last user message (a tool call
whose arguments carry it when tools are offered); the model name picks a failure: `fail-500`
answers 500, `fail-garbage` a 200 that is not JSON. `GET /v1/models` lists one model.
Shares no code with nomyo. `python tests/openai_backend.py` prints "listening on URL".
"""
from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def completion(request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one chat-completions request."""
    users = [m for m in request.get("messages") or [] if m.get("role") == "user"]
    content = users[-1].get("content", "") if users else ""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    message: dict[str, Any] = {"role": "assistant", "content": "backend: " + content}
    finish = "stop"
    if request.get("tools"):
        name = request["tools"][0]["function"]["name"]
        message = {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_backend", "type": "function",
            "function": {"name": name, "arguments": json.dumps({"echo": content})}}]}
        finish = "tool_calls"
    return {"id": "chatcmpl-backend", "object": "chat.completion", "created": int(time.time()),
            "model": request.get("model", ""),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            return self._reply(200, b'{"object": "list", "data": [{"id": "backend-model"}]}')
        return self._reply(404, b'{"error": {"message": "not found"}}')

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        if self.path != "/v1/chat/completions":
            return self._reply(404, b'{"error": {"message": "not found"}}')
        model = request.get("model")
        if model == "fail-500":
            return self._reply(500, b'{"error": {"message": "backend failure"}}')
        if model == "fail-garbage":
            return self._reply(200, b"<html>not json</html>")
        return self._reply(200, json.dumps(completion(request)).encode())


if __name__ == "__main__":
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    print(f"listening on http://127.0.0.1:{httpd.server_address[1]}", flush=True)
    httpd.serve_forever()
