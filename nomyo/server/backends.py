"""Inference backends behind the server: the built-in echo model, any OpenAI-compatible API."""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import re
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any, Protocol

from nomyo.memory import SecureBuffer, secure_json
from nomyo.memory.scrub import wipe_tree
from nomyo.protocol.constants import DEFAULT_BACKEND_TIMEOUT

logger = logging.getLogger(__name__)

MAX_BACKEND_RESPONSE_BYTES = 10 * 1024 * 1024  # what one response package can carry


class BackendError(Exception):
    """The backend failed; `status` is the HTTP status to answer with.

    502: failed after the request was forwarded (not to be retried); 503: not reached, or
    busy with a `Retry-After`; 504: the deadline passed; a mirrored 4xx with the backend
    error's machine `fields` (`type`, `code`, `param`)."""

    def __init__(
        self, status: int, detail: str, *, fields: dict[str, str] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.fields = fields or {}
        self.headers = [("Retry-After", str(retry_after))] if retry_after is not None else []


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


class _StaleConnection(Exception):
    """A kept-alive backend connection was closed before any answer came."""


_MACHINE_FIELD = re.compile(r"[A-Za-z0-9_.:\-\[\]]{1,64}")
_MIRRORED_4XX = {400, 404, 409, 413, 415, 422, 429}
MAX_BACKEND_ERROR_BYTES = 64 * 1024


class HttpBackend:
    """Forwards to `<base>/v1/chat/completions` of an OpenAI-compatible server.

    Written on `http.client` so that we hold the socket: redirects are never followed (the
    prompt is never re-sent to a `Location`), one total deadline covers the whole call, and
    when it passes or the caller goes away the socket is shut down, which tells the backend
    to stop generating. One kept-alive connection per worker thread.
    """

    def __init__(
        self, base_url: str, *, timeout: float = DEFAULT_BACKEND_TIMEOUT,
        connect_timeout: float = 5.0,
    ) -> None:
        base = base_url.rstrip("/")
        if base.endswith("/v1"):  # how OpenAI tools spell a base URL
            base = base[: -len("/v1")]
        parts = urllib.parse.urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"backend must be an http(s):// URL, not {base_url!r}")
        if parts.query or parts.fragment or parts.username:
            raise ValueError("backend URL must not carry a query, fragment or credentials")
        self.name = base
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path
        self.url = base + "/v1/chat/completions"
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._context = ssl.create_default_context() if self._https else None
        self._local = threading.local()
        self._connections: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()

    # -- connections -----------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self.connect_timeout, context=self._context
                )
            else:
                conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self.connect_timeout
                )
            conn.response_class = _DirectResponse
            self._local.conn = conn
            with self._lock:
                self._connections.add(conn)
        return conn

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        self._local.conn = None
        with self._lock:
            self._connections.discard(conn)
        conn.close()

    def _call(
        self, method: str, path: str, body: Any, deadline: float,
        cancel: threading.Event | None,
    ) -> tuple[int, dict[str, str], SecureBuffer | None]:
        """`_exchange`, once more on a fresh connection when a kept-alive one turns out to
        have been closed by the backend before it answered (nothing was processed)."""
        reused = getattr(self._local, "conn", None) is not None
        try:
            return self._exchange(method, path, body, deadline, cancel)
        except _StaleConnection:
            if not reused:
                raise BackendError(502, "backend closed the connection") from None
        try:
            return self._exchange(method, path, body, deadline, cancel)
        except _StaleConnection:
            raise BackendError(502, "backend closed the connection") from None

    def _exchange(
        self, method: str, path: str, body: Any, deadline: float,
        cancel: threading.Event | None,
    ) -> tuple[int, dict[str, str], SecureBuffer | None]:
        """One exchange within `deadline` (monotonic): (status, headers, body in secure memory,
        None when empty).

        A watchdog shuts the socket down at the deadline or when `cancel` is set."""
        conn = self._connection()
        stop = threading.Event()
        fired: list[str] = []

        def watch() -> None:
            # Wakes at the end of the call, at the deadline, or (polled) when `cancel` is set.
            while not stop.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                if cancel is not None and cancel.is_set():
                    fired.append("cancelled")
                elif time.monotonic() >= deadline:
                    fired.append("deadline")
                else:
                    continue
                sock = conn.sock
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)  # the backend sees EOF and stops
                    except OSError:
                        pass
                return

        watchdog = threading.Thread(target=watch, daemon=True, name="nomyo-backend-deadline")
        watchdog.start()
        sent = False
        status_seen: int | None = None
        try:
            headers = {"Content-Type": "application/json", "Accept": "application/json",
                       "Connection": "keep-alive"}
            try:
                if conn.sock is None:
                    conn.connect()
                conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
                conn.request(method, self._prefix + path, body=body, headers=headers)
                sent = True
                response = conn.getresponse()
                status = status_seen = response.status
                reply_headers = {k.lower(): v for k, v in response.getheaders()}
                limit = (MAX_BACKEND_RESPONSE_BYTES if status == 200
                         else MAX_BACKEND_ERROR_BYTES)
                try:
                    raw = _read_secure(response, limit)
                finally:
                    response.close()  # read to the end: the connection may serve the next call
                if fired:  # the watchdog cut the answer short: what we have is not it
                    if raw is not None:
                        raw.close()
                    raise OSError("backend call cut off")
                if response.will_close:
                    self._drop(conn)
                return status, reply_headers, raw
            except BackendError:
                self._drop(conn)
                raise
            except (OSError, http.client.HTTPException) as err:
                self._drop(conn)
                if not fired and isinstance(err, (http.client.RemoteDisconnected,
                                                  BrokenPipeError, ConnectionResetError)):
                    if status_seen is None:
                        raise _StaleConnection from None
                if fired and fired[0] == "cancelled":
                    raise BackendError(499, "caller went away") from None
                if fired or isinstance(err, TimeoutError):
                    raise BackendError(504, "backend did not answer within the deadline"
                                       ) from None
                if not sent:
                    raise BackendError(503, f"backend unavailable: {type(err).__name__}",
                                       retry_after=1) from None
                raise BackendError(502, f"backend connection failed: {type(err).__name__}"
                                   ) from None
        finally:
            stop.set()

    def complete(
        self, request: dict[str, Any], cancel: threading.Event | None = None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        with secure_json.dumps(request) as body, memoryview(body) as view:
            status, headers, raw = self._call("POST", "/v1/chat/completions", view, deadline,
                                              cancel)
        if status != 200:
            raise _status_error(status, headers, raw)
        if raw is None:
            raise BackendError(502, "backend answered 200 with an empty body")
        with raw:
            try:
                result = secure_json.loads(raw)
            except (ValueError, RecursionError):
                raise BackendError(502, "backend answered with invalid JSON") from None
        if not isinstance(result, dict) or not isinstance(result.get("choices"), list):
            wipe_tree(result)  # may hold completion or echoed prompt text
            raise BackendError(502, "backend answer is not a chat.completion object")
        return result

    def ready(self, timeout: float = 3.0) -> str | None:
        """None when `GET /v1/models` answers 200, else what is wrong (no URL in it)."""
        try:
            status, _, raw = self._call("GET", "/v1/models", None, time.monotonic() + timeout,
                                        None)
        except BackendError as err:
            return f"backend: {err.detail}"
        if raw is not None:
            raw.close()
        return None if status == 200 else f"backend: GET /v1/models answered HTTP {status}"

    def close(self) -> None:
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            conn.close()


def _status_error(status: int, headers: dict[str, str], raw: SecureBuffer | None
                  ) -> BackendError:
    """The error our caller gets for a backend's non-200 answer.

    A 4xx that is about the request (400, 404 unknown model, 413, 422, 429, ...) keeps its
    status and the machine fields of the OpenAI error object (`type`, `code`, `param`); the
    free-text `message`, which may quote the prompt, is dropped (docs/protocol.md). Other
    answers after forwarding are 502, except a 503 that says when to retry. The body (None
    when empty) is closed here."""
    fields: dict[str, str] = {}
    obj = None
    if raw is not None:
        with raw:
            try:
                obj = secure_json.loads(raw)
            except (ValueError, RecursionError):
                obj = None
    error = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(error, dict):
        for name in ("type", "code", "param"):
            value = error.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if isinstance(value, str) and _MACHINE_FIELD.fullmatch(value):
                fields[name] = value
    wipe_tree(obj)
    retry_after = headers.get("retry-after", "")
    wait = int(retry_after) if retry_after.isascii() and retry_after.isdigit() else None
    if status in _MIRRORED_4XX:
        named = ", ".join(f"{k}={v}" for k, v in fields.items())
        detail = f"backend refused the request: HTTP {status}" + (f" ({named})" if named else "")
        return BackendError(status, detail, fields=fields,
                            retry_after=wait if status == 429 else None)
    if status == 503:  # the backend says it did not take the request on
        return BackendError(503, "backend unavailable: HTTP 503", retry_after=wait)
    if 300 <= status < 400:
        return BackendError(502, f"backend answered a redirect (HTTP {status}); not followed")
    return BackendError(502, f"backend answered HTTP {status}")


class _SocketReader(io.RawIOBase):
    """http.client's response reader without a read buffer, so that no copy of an answer's
    start stays in a buffer (http.client's own reader reads 8 KiB with the headers and keeps
    them, found by security/test_residue_matrix.py). The head is read a byte at a time (a few
    hundred recv calls); `readinto` fills the caller's buffer or reaches EOF, as the buffered
    reader http.client expects does."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as whole, whole.cast("B") as view:
            filled = 0
            while filled < len(view):
                got = self._sock.recv_into(view[filled:])
                if not got:
                    break
                filled += got
            return filled


class _DirectResponse(http.client.HTTPResponse):
    """An HTTPResponse that reads through `_SocketReader`."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the buffered reader made by http.client, nothing read from it yet
        self.fp = _SocketReader(sock)


def _read_secure(response: http.client.HTTPResponse, limit: int) -> SecureBuffer | None:
    """Read the (plaintext) backend answer straight into secure memory with readinto: no
    `bytes` of it is made; None for an empty body. A Content-Length answer lands in one exact
    buffer; a chunked one in a buffer that doubles (secure to secure, the old one wiped) and
    is cut to size. The response reads the socket unbuffered (`_SocketReader`)."""
    size = response.length  # None when chunked or read to EOF
    if size is not None and size > limit:
        raise BackendError(502, f"backend answer is larger than {limit} bytes")
    buf = SecureBuffer(size or 65536)
    filled = 0
    try:
        while True:
            if filled == len(buf):
                if size is not None or filled >= limit + 1:
                    break
                bigger = SecureBuffer(min(2 * filled, limit + 1))
                with memoryview(bigger) as out, memoryview(buf) as old:
                    out[:filled] = old
                buf.close()
                buf = bigger
            with memoryview(buf) as out:
                n = response.readinto(out[filled:])
            if not n:
                break
            filled += n
        if filled > limit:
            raise BackendError(502, f"backend answer is larger than {limit} bytes")
        if filled == 0:
            return None
        if filled == len(buf):
            result, buf = buf, None
            return result
        exact = SecureBuffer(filled)
        with memoryview(exact) as out, memoryview(buf) as view:
            out[:] = view[:filled]
        return exact
    finally:
        if buf is not None:
            buf.close()
