"""The secure-completion application: one request in, one response out, transport-agnostic.

`SecureCompletionApp.admit` then `complete` serve the ASGI adapter (nomyo.server.asgi, what
`nomyo serve` runs on granian); `handle` does both for the WSGI entry point
(`app(environ, start_response)`, used by the loopback server), so all speak the same protocol.
Plaintext only exists inside `envelope.open_package` / `seal_json` buffers and the parsed
request object; nothing here logs a header value, a key or a payload.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from nomyo.errors import (
    ChatRequestError,
    PackageError,
    SecureMemoryUnavailable,
    SecurityError,
    origin_of,
)
from nomyo.memory import get_memory_protection_info
from nomyo.memory.scrub import wipe_tree
from nomyo.memory.secure_json import SurrogatesRefused
from nomyo.protocol import envelope, keys
from nomyo.protocol.chat_request import check_chat_request
from nomyo.protocol.constants import (
    COMPLETION_PATH,
    DEFAULT_SECURITY_TIER,
    MAX_PACKAGE_BYTES,
    MAX_PAYLOAD_ID_CHARS,
    MAX_PUBLIC_KEY_HEADER_CHARS,
    PUBLIC_KEY_PATH,
    SECURITY_TIERS,
)
from nomyo.protocol.workspace import WorkspacePool
from nomyo.server.backends import Backend, BackendError
from nomyo.server.policy import ApiKeys, AuthThrottle, RateLimiter, TierPolicy

logger = logging.getLogger("nomyo.server")

HEALTH_PATH = "/health"  # liveness: the process answers
READY_PATH = "/ready"  # readiness: the backend answers and the memory policy holds
# Idle exchange workspaces a server process keeps (wiped, a few locked pages each): enough for
# a steady stream of small requests to map nothing new, few enough for a small memlock limit.
IDLE_WORKSPACES = 4


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    payload_id: str | None = None  # for the access log only


@dataclass
class Ticket:
    """A request admitted on its head (see `SecureCompletionApp.admit`)."""

    method: str
    path: str
    kind: str  # "completion" or "ready"
    client: str
    payload_id: str | None = None
    client_key: Any = None
    tier: str | None = None
    content_length: int = 0


class HttpError(Exception):
    """Ends a request with `{"detail": ...}` and a status; `headers` go along (Retry-After)."""

    def __init__(
        self, status: int, detail: str, headers: Iterable[tuple[str, str]] = (),
        fields: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = list(headers)
        self.fields = dict(fields or {})


def error_response(
    status: int, detail: str, headers: Iterable[tuple[str, str]] = (),
    fields: Mapping[str, str] | None = None,
) -> Response:
    """`{"detail": ...}`, plus `"error": {type, code, param}` when a backend gave them."""
    obj: dict[str, Any] = {"detail": detail}
    if fields:
        obj["error"] = dict(fields)
    return Response(status, json.dumps(obj).encode("utf-8"), headers=list(headers))


BodyReader = Callable[[int], Any]


@dataclass
class AppOptions:
    """What the app enforces; the embedded server and the CLI fill it in."""

    api_keys: ApiKeys | None = None
    tier_policy: TierPolicy | None = None
    rate_limiter: RateLimiter | None = None
    max_request_bytes: int = MAX_PACKAGE_BYTES
    attestor: Any = None  # object with .quote(payload_id) -> dict, or None
    auth_throttle: AuthThrottle | None = None
    memory_policy: Callable[[], str | None] | None = None  # a problem for /ready, or None


def parse_content_length(raw: str | None) -> int | None:
    """The body length a request announced (None when absent); ValueError when invalid.
    Shared by the embedded HTTP server and the WSGI entry point."""
    if raw is None:
        return None
    if not raw.strip().isascii() or not raw.strip().isdigit():
        raise ValueError("invalid Content-Length")
    return int(raw)


class SecureCompletionApp:
    """Protocol 1.0 endpoint logic over a server key pair and a backend."""

    def __init__(
        self, keypair: keys.KeyPair, backend: Backend, options: AppOptions | None = None
    ) -> None:
        self.keypair = keypair
        self.backend = backend
        self.options = options or AppOptions()
        self._limiter = self.options.rate_limiter
        self._public_pem = keypair.public_pem.encode("ascii")
        self._memory_protection = _memory_protection_summary()
        self._workspaces = WorkspacePool(IDLE_WORKSPACES)

    @property
    def cancellable(self) -> bool:
        """Whether backend calls take `cancel` (the caller leaving closes the backend call)."""
        return _takes_cancel(type(self.backend))

    # -- transport-independent entry points ------------------------------------------------
    def handle(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        content_length: int | None,
        read_body: BodyReader,
        client: str,
    ) -> Response:
        """Answer one request; `headers` keys are lowercase; `read_body(n)` returns n bytes.

        The same as `admit`, then `read_body`, then `complete` (what the ASGI adapter does
        with the body read asynchronously in between)."""
        started = time.perf_counter()
        admitted = self.admit(method, path, headers, content_length, client)
        if isinstance(admitted, Response):
            return self.log_answer(admitted, method, path, client, started)
        try:
            body = read_body(admitted.content_length) if admitted.content_length else b""
        except HttpError as err:
            response = error_response(err.status, err.detail, err.headers)
        else:
            response = self.complete(admitted, body)
        return self.log_answer(response, method, path, client, started)

    def admit(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        content_length: int | None,
        client: str,
    ) -> Response | Ticket:
        """Everything that can be decided from the head, before any body byte is read: the
        route, authentication, the rate limit, the protocol headers and the size limit.

        A `Response` ends the request; a `Ticket` says to read `content_length` bytes and
        call `complete` (in a worker thread: it decrypts and may wait for the backend)."""
        path = path.split("?", 1)[0]
        return self._guard(method, path, self._admit, method, path, headers, content_length,
                           client)

    def complete(
        self, ticket: Ticket, body: bytes | bytearray, cancel: threading.Event | None = None
    ) -> Response:
        """Finish an admitted request; `cancel` set means the caller has gone away."""
        return self._guard(ticket.method, ticket.path, self._complete, ticket, body, cancel)

    def log_answer(
        self, response: Response, method: str, path: str, client: str, started: float,
        payload_id: str | None = None,
    ) -> Response:
        """The access log line: client address, request line, payload id, status, latency.

        Every field is escaped (control characters as \\xNN) and bounded; no header value
        other than the payload id, and never a body, a key or an answer."""
        logger.info(
            "%s %s %s id=%s %d %.1fms",
            _printable(client, 64),
            _printable(method, 16),
            _printable(path, 200),
            _printable(payload_id or response.payload_id or "-", MAX_PAYLOAD_ID_CHARS),
            response.status,
            (time.perf_counter() - started) * 1000,
        )
        return response

    def _guard(self, method: str, path: str, step: Callable[..., Response | Ticket],
               *args: Any) -> Any:
        try:
            return step(*args)
        except HttpError as err:
            return error_response(err.status, err.detail, err.headers, err.fields)
        except Exception as err:  # last resort: a 500, and a log line without the message
            # An exception's message may quote request data: log its type and place only.
            logger.error("internal error handling %s %s: %s", _printable(method, 16),
                         _printable(path, 200), origin_of(err))
            return error_response(500, "internal server error")

    def _admit(self, method: str, path: str, headers: Mapping[str, str], length: int | None,
               client: str) -> Response | Ticket:
        routes = {PUBLIC_KEY_PATH: "GET", HEALTH_PATH: "GET", READY_PATH: "GET",
                  COMPLETION_PATH: "POST"}
        if path not in routes:
            raise HttpError(404, "not found")
        if method != routes[path] and not (method == "HEAD" and routes[path] == "GET"):
            raise HttpError(
                405, f"method not allowed; use {routes[path]}", [("Allow", routes[path])]
            )
        if path == PUBLIC_KEY_PATH:
            return Response(200, self._public_pem, "application/x-pem-file")
        if path == HEALTH_PATH:
            return Response(200, b'{"status": "ok"}')  # liveness only: nothing configured
        if path == READY_PATH:
            return Ticket(method, path, "ready", client)
        # POST /v1/chat/secure_completion: everything but the body
        identity = self._authenticate(headers, client) or f"addr:{client}"
        self._rate_limit(identity)
        payload_id = _payload_id(headers.get("x-payload-id"))
        client_key = _client_public_key(headers.get("x-public-key"))
        tier = _security_tier(headers.get("x-security-tier"))
        if length is None:
            raise HttpError(411, "Content-Length is required")
        if length > self.options.max_request_bytes:
            raise HttpError(413, f"request body larger than {self.options.max_request_bytes} bytes")
        return Ticket(method, path, "completion", client, payload_id, client_key, tier, length)

    def _complete(
        self, ticket: Ticket, body: bytes | bytearray, cancel: threading.Event | None
    ) -> Response:
        if ticket.kind == "ready":
            return self._ready()
        response = self._secure_completion(ticket, body, cancel)
        response.payload_id = ticket.payload_id
        return response

    def _ready(self) -> Response:
        """Readiness: the backend answers `GET /v1/models` and the memory policy holds."""
        problems = []
        check = getattr(self.backend, "ready", None)
        if check is not None:
            problem = check()
            if problem:
                problems.append(problem)
        problem = self.options.memory_policy() if self.options.memory_policy else None
        if problem:
            problems.append(problem)
        if problems:
            body = json.dumps({"status": "not ready", "problems": problems}).encode("utf-8")
            return Response(503, body, headers=[("Retry-After", "5")])
        return Response(200, b'{"status": "ready"}')

    # -- POST /v1/chat/secure_completion ---------------------------------------------------
    def _secure_completion(
        self, ticket: Ticket, body: bytes | bytearray, cancel: threading.Event | None
    ) -> Response:
        payload_id, client_key, tier = ticket.payload_id, ticket.client_key, ticket.tier
        # One workspace for the exchange: the request's key and plaintext buffers hold the
        # answer's next (wiped in between), all wiped before the reply is sent; the pool
        # keeps it for a later request unless this one failed or was large.
        work, clean = self._workspaces.take(None), False
        try:
            try:
                request, info = envelope.open_json(body, self.keypair, workspace=work)
            except SecureMemoryUnavailable:
                raise  # the server's own state, not a verdict on the request (below)
            except (PackageError, SecurityError) as err:
                raise HttpError(400, str(err)) from None
            del body
            result: Any = None
            try:
                try:
                    check_chat_request(request)
                except ChatRequestError as err:
                    raise HttpError(400, str(err)) from None
                tier = self._resolve_tier(request["model"], tier)
                try:
                    result = _ask_backend(self.backend, request, cancel)
                except BackendError as err:
                    raise HttpError(err.status, err.detail, err.headers, err.fields) from None
                processed_at = int(time.time())
                result["_metadata"] = {
                    "payload_id": payload_id,
                    "processed_at": processed_at,
                    "is_encrypted": True,
                    "response_status": "success",
                    "security_tier": tier,
                    "memory_protection": dict(self._memory_protection),  # ours stays intact
                    "tpm_attestation": self._attest(payload_id),
                }
                try:
                    sealed = envelope.seal_json(result, client_key, tag_layout=info.tag_layout,
                                                processed_at=processed_at, workspace=work)
                except SurrogatesRefused:
                    # Only the backend's text can hold a surrogate (the request was opened
                    # from UTF-8, the metadata is ours): a bad answer, not our failure.
                    raise HttpError(502, "the backend's answer holds text with no UTF-8 "
                                         "form (a lone surrogate)") from None
            finally:
                # The answer first: it shares strings (model, user text) with the request.
                wipe_tree(result)
                wipe_tree(request)
            clean = True
        except SecureMemoryUnavailable as err:
            # fail-closed mode refused a buffer (NOMYO_REQUIRE_SECURE_MEMORY=1 set after
            # start, locked memory exhausted): the server cannot serve, the caller did no wrong
            logger.error("request refused: %s", err)
            raise HttpError(503, "secure memory is unavailable on this server") from None
        finally:
            self._workspaces.give(work, clean)
        return Response(200, sealed)

    def _authenticate(self, headers: Mapping[str, str], client: str) -> str | None:
        if self.options.api_keys is None:
            return None
        throttle = self.options.auth_throttle
        if throttle is not None:
            wait = throttle.blocked(client)
            if wait > 0:
                raise HttpError(429, "too many failed authentications from this address",
                                [("Retry-After", str(max(1, int(wait + 0.999))))])
        try:
            return self._check_api_key(headers)
        except HttpError:
            if throttle is not None:
                throttle.failed(client)
            raise

    def _check_api_key(self, headers: Mapping[str, str]) -> str:
        value = headers.get("authorization", "")
        if "," in value:  # the server joined two Authorization headers: refuse, never pick one
            raise HttpError(400, "more than one Authorization header")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HttpError(
                401,
                "missing API key: send Authorization: Bearer <key>",
                [("WWW-Authenticate", "Bearer")],
            )
        identity = self.options.api_keys.identify(token.strip())
        if identity is None:
            raise HttpError(401, "invalid API key", [("WWW-Authenticate", "Bearer")])
        return identity

    def _rate_limit(self, identity: str) -> None:
        if self._limiter is None:
            return
        wait = self._limiter.acquire(identity)
        if wait > 0:
            seconds = max(1, int(wait + 0.999))
            raise HttpError(429, "rate limit exceeded", [("Retry-After", str(seconds))])

    def _resolve_tier(self, model: str, requested: str | None) -> str:
        if self.options.tier_policy is None:
            return requested or DEFAULT_SECURITY_TIER
        tier, reason = self.options.tier_policy.resolve(model, requested)
        if tier is None:
            raise HttpError(403, reason)
        return tier

    def _attest(self, payload_id: str) -> dict[str, Any]:
        if self.options.attestor is None:
            return {"is_available": False}
        try:
            return self.options.attestor.quote(payload_id)
        except Exception as err:  # a failed quote must not fail the completion
            logger.warning("TPM quote failed: %s", type(err).__name__)
            return {"is_available": False}

    # -- WSGI ------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """WSGI entry point, for running under a production server (gunicorn, waitress, ...)."""
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        stream = environ["wsgi.input"]

        def read_body(n: int) -> bytes:
            data = stream.read(n)
            if len(data) != n:
                raise HttpError(400, "request body shorter than Content-Length")
            return data

        try:
            content_length = parse_content_length(environ.get("CONTENT_LENGTH") or None)
        except ValueError:
            response = error_response(400, "invalid Content-Length")
        else:
            response = self.handle(
                environ.get("REQUEST_METHOD", "GET"),
                environ.get("PATH_INFO", "/") or "/",
                headers,
                content_length,
                read_body,
                environ.get("REMOTE_ADDR", "unknown"),
            )
        start_response(
            f"{response.status} {_reason(response.status)}",
            [
                ("Content-Type", response.content_type),
                ("Content-Length", str(len(response.body))),
                *response.headers,
            ],
        )
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [response.body]


def _ask_backend(backend: Backend, request: dict[str, Any], cancel: threading.Event | None) -> Any:
    """`backend.complete(request)`, passing `cancel` to backends that take it."""
    if cancel is not None and _takes_cancel(type(backend)):  # cached per class
        return backend.complete(request, cancel=cancel)
    return backend.complete(request)


@functools.cache
def _takes_cancel(kind: type) -> bool:
    return "cancel" in inspect.signature(kind.complete).parameters


def _printable(text: str, limit: int) -> str:
    """`text` for a log line: control and non-ASCII characters escaped, at most `limit` long."""
    if text.isascii() and text.isprintable() and "\\" not in text:  # the usual case, in C
        return text if len(text) <= limit else text[:limit] + "..."
    out = "".join(ch if " " <= ch <= "~" and ch != "\\" else ascii(ch)[1:-1] for ch in text[:limit])
    return out + ("..." if len(text) > limit else "")


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _payload_id(value: str | None) -> str:
    if not value:
        raise HttpError(400, "missing X-Payload-ID header")
    if len(value) > MAX_PAYLOAD_ID_CHARS or not all(" " <= ch <= "~" for ch in value):
        raise HttpError(
            400, f"X-Payload-ID must be 1..{MAX_PAYLOAD_ID_CHARS} printable ASCII characters"
        )
    return value


def _client_public_key(value: str | None) -> Any:
    if not value:
        raise HttpError(400, "missing X-Public-Key header")
    if len(value) > MAX_PUBLIC_KEY_HEADER_CHARS:
        raise HttpError(400, "X-Public-Key header too long")
    return _parsed_public_key(value)


@functools.lru_cache(maxsize=256)
def _parsed_public_key(value: str) -> Any:
    """A client's key, parsed once: clients keep their key pair, and the parse (unquote and
    PEM load, about 30 us) is the server's largest per-request cost outside the envelope.
    Public keys only; a refused header raises, and is not cached."""
    # Python quote() keeps '/', encodeURIComponent() encodes it: unquote() undoes both
    # (never unquote_plus: '+' is a base64 character of the PEM).
    try:
        return keys.load_public_key(unquote(value, errors="strict"))
    except (ValueError, UnicodeDecodeError) as err:
        raise HttpError(400, f"invalid X-Public-Key: {err}") from None


def _security_tier(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if value not in SECURITY_TIERS:
        raise HttpError(
            400, f"invalid X-Security-Tier; must be one of: {', '.join(SECURITY_TIERS)}")
    return value


def _memory_protection_summary() -> dict[str, Any]:
    """The four fields of `_metadata.memory_protection` (docs/protocol.md), from our report."""
    info = get_memory_protection_info()
    return {
        "platform": info["platform"],
        "memory_locking": bool(info["has_memory_locking"]),
        "secure_zeroing": bool(info["has_secure_zeroing"]),
        "core_dump_prevention": bool(info["core_dumps_disabled"]),
    }
