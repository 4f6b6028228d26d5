"""Inference backends behind the server: the built-in echo model, any OpenAI-compatible API."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from typing import Any, Protocol

import requests
import urllib3.exceptions

from nomyo.memory import SecureBuffer, secure_json, wipe_bytes_owned
from nomyo.memory.scrub import wipe_tree
from nomyo.protocol.constants import DEFAULT_BACKEND_TIMEOUT

logger = logging.getLogger(__name__)

MAX_BACKEND_RESPONSE_BYTES = 10 * 1024 * 1024  # what one response package can carry


class BackendError(Exception):
    """The backend failed; `status` is the HTTP status to answer with (502, 503 or 504)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Backend(Protocol):
    name: str

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer a chat-completions request with a `chat.completion` object."""

    def close(self) -> None:
        """Release connections."""


def create_backend(spec: str, *, timeout: float = DEFAULT_BACKEND_TIMEOUT) -> Backend:
    """`"echo"` or the base URL of an OpenAI-compatible server (`http://host:port`)."""
    if spec == "echo":
        return EchoBackend()
    if spec.startswith(("http://", "https://")):
        return HttpBackend(spec, timeout=timeout)
    raise ValueError(f"backend must be 'echo' or an http(s):// URL, not {spec!r}")


class EchoBackend:
    """Deterministic stand-in model: repeats the last user message, calls a tool when offered one.

    The same request always gives the same `id` and content; `created` is the current time.
    """

    name = "echo"

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        # Built without transient copies of the user's text (no json.dumps, split or join of
        # it), so that wiping the request and answer trees leaves none of it behind.
        messages = [m for m in request.get("messages") or [] if isinstance(m, dict)]
        counts = [sum(map(_count_tokens, _text_parts(m.get("content")))) for m in messages]
        echoed = _last_user_index(messages)
        last = _text_parts(messages[echoed].get("content")) if messages else []
        content = "".join(["Echo: ", *last])
        with secure_json.dumps(request) as body, memoryview(body) as view:
            digest = hashlib.sha256(view).hexdigest()
        message: dict[str, Any] = {"role": "assistant", "content": content}
        finish_reason = "stop"
        tool = _chosen_tool(request)
        if tool is not None:
            message["tool_calls"] = [
                {
                    "id": f"call_{digest[:24]}",
                    "type": "function",
                    "function": {
                        "name": tool.get("name", ""),
                        "arguments": _json_text(
                            _arguments_for(tool, last[0] if len(last) == 1 else content)
                        ),
                    },
                }
            ]
            finish_reason = "tool_calls"
        # Each text is counted once (counting is a Python loop over the whole prompt):
        # the answer is "Echo:" (one word, one mark) plus the echoed message.
        prompt_tokens = sum(counts)
        completion_tokens = 2 + (counts[echoed] if messages else 0)
        return {
            "id": f"chatcmpl-echo-{digest[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "echo"),
            "system_fingerprint": "nomyo-echo",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def close(self) -> None:
        return None


def _text_parts(content: Any) -> list[str]:
    """The text strings of an OpenAI message content: a string or a list of parts."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
    return []


def _last_user_index(messages: list[dict]) -> int:
    """Index of the last user message (of the last message when there is none; -1 if empty)."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    return users[-1] if users else len(messages) - 1


_WORD = re.compile(r"\S+")
_PUNCTUATION = re.compile(r"[^\w\s]")


def _count_tokens(text: str) -> int:
    """A rough, deterministic token count: whitespace-separated words plus punctuation marks.

    Counted with finditer, which makes no substrings of the (secret) text.
    """
    return sum(1 for _ in _WORD.finditer(text)) + sum(1 for _ in _PUNCTUATION.finditer(text))


def _json_text(obj: Any) -> str:
    """JSON text of `obj` made in secure memory, then decoded once into the returned str."""
    with secure_json.dumps(obj) as body, memoryview(body) as view:
        return str(view, "utf-8")


def _chosen_tool(request: dict[str, Any]) -> dict[str, Any] | None:
    tools = request.get("tools")
    choice = request.get("tool_choice", "auto")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    functions = [
        t["function"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        functions = [f for f in functions if f.get("name") == wanted] or functions
    return functions[0] if functions else None


def _arguments_for(function: dict[str, Any], text: str) -> dict[str, Any]:
    """Arguments that satisfy the tool's JSON schema shape: strings carry the user's text."""
    schema = function.get("parameters")
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict):
        return {}
    defaults = {
        "string": text,
        "number": 0,
        "integer": 0,
        "boolean": False,
        "array": [],
        "object": {},
    }
    return {
        name: defaults.get(spec.get("type") if isinstance(spec, dict) else None, text)
        for name, spec in props.items()
    }


class HttpBackend:
    """Forwards to `<base>/v1/chat/completions` of an OpenAI-compatible server (requests)."""

    def __init__(
        self, base_url: str, *, timeout: float = DEFAULT_BACKEND_TIMEOUT,
        connect_timeout: float = 5.0,
    ) -> None:
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.name = base_url.rstrip("/")
        self._timeout = (connect_timeout, timeout)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        """One pooled session per worker thread (requests.Session is not thread-safe)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        with secure_json.dumps(request) as body, memoryview(body) as view:
            try:
                response = self._session().post(
                    self.url,
                    data=view,
                    timeout=self._timeout,
                    stream=True,
                    headers={"Content-Type": "application/json", "Accept": "application/json"},
                )
            except requests.ConnectTimeout:
                raise BackendError(503, "backend unavailable: connection timed out") from None
            except requests.ReadTimeout:
                raise BackendError(504, "backend timed out") from None
            except requests.RequestException as err:
                raise BackendError(503, f"backend unavailable: {type(err).__name__}") from None
        with response:
            if response.status_code != 200:
                status = response.status_code if response.status_code in (503, 504) else 502
                raise BackendError(status, f"backend answered HTTP {response.status_code}")
            with _read_secure(response) as raw:
                try:
                    result = secure_json.loads(raw)
                except (ValueError, RecursionError):
                    raise BackendError(502, "backend answered with invalid JSON") from None
        if not isinstance(result, dict) or not isinstance(result.get("choices"), list):
            wipe_tree(result)  # may hold completion or echoed prompt text
            raise BackendError(502, "backend answer is not a chat.completion object")
        return result

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()


def _read_secure(response: requests.Response) -> SecureBuffer:
    """Read the (plaintext) backend answer into secure memory, wiping each transient chunk."""
    chunks: list[SecureBuffer] = []
    try:
        total = 0
        while True:
            try:
                chunk = response.raw.read(65536, decode_content=True)
            except urllib3.exceptions.ReadTimeoutError:  # urllib3 wraps every socket error
                raise BackendError(504, "backend timed out mid-answer") from None
            except (urllib3.exceptions.HTTPError, OSError):
                raise BackendError(502, "backend connection failed mid-answer") from None
            if not chunk:
                break
            total += len(chunk)
            # urllib3 hands out `bytes`: copy each chunk into secure memory, then zero it
            # (handed over in a list, our own name for it deleted first).
            box = [chunk]
            del chunk
            if total > MAX_BACKEND_RESPONSE_BYTES:
                wipe_bytes_owned(box)
                raise BackendError(502, "backend answer is larger than 10 MiB")
            chunks.append(SecureBuffer.copy_of(box[0]))
            wipe_bytes_owned(box)
        joined = SecureBuffer(total)
        with memoryview(joined) as out:
            offset = 0
            for part in chunks:
                with memoryview(part) as view:
                    out[offset : offset + len(view)] = view
                offset += len(part)
        return joined
    finally:
        for part in chunks:
            part.close()
