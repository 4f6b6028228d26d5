"""The secure-completion application: one request in, one response out, transport-agnostic.

`SecureCompletionApp.handle` is used by the embedded HTTP server (nomyo.server.http) and by
the WSGI entry point (`app(environ, start_response)`), so both speak exactly the same protocol.
Plaintext only exists inside `envelope.open_package` / `seal_json` buffers and the parsed
request object; nothing here logs a header value, a key or a payload.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from nomyo.errors import ChatRequestError, PackageError, SecurityError
from nomyo.memory import get_memory_protection_info
from nomyo.memory.scrub import wipe_tree
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
from nomyo.protocol.workspace import Workspace
from nomyo.server.backends import Backend, BackendError
from nomyo.server.policy import ApiKeys, RateLimiter, TierPolicy

logger = logging.getLogger("nomyo.server")

HEALTH_PATH = "/health"


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


class HttpError(Exception):
    """Ends a request with `{"detail": ...}` and a status; `headers` go along (Retry-After)."""

    def __init__(self, status: int, detail: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = list(headers)


def error_response(status: int, detail: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, json.dumps({"detail": detail}).encode("utf-8"), headers=list(headers))


BodyReader = Callable[[int], Any]


@dataclass
class AppOptions:
    """What the app enforces; the embedded server and the CLI fill it in."""

    api_keys: ApiKeys | None = None
    tier_policy: TierPolicy | None = None
    rate_limiter: RateLimiter | None = None
    max_request_bytes: int = MAX_PACKAGE_BYTES
    attestor: Any = None  # object with .quote(payload_id) -> dict, or None


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

    # -- transport-independent entry point -------------------------------------------------
    def handle(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        content_length: int | None,
        read_body: BodyReader,
        client: str,
    ) -> Response:
        """Answer one request; `headers` keys are lowercase; `read_body(n)` returns n bytes."""
        started = time.perf_counter()
        path = path.split("?", 1)[0]
        try:
            response = self._route(method, path, headers, content_length, read_body, client)
        except HttpError as err:
            response = error_response(err.status, err.detail, err.headers)
        except Exception as err:  # last resort: a 500, and a log line without the message
            # An exception's message may quote request data: log its type and place only.
            where = traceback.extract_tb(err.__traceback__)[-1]
            logger.error(
                "internal error handling %s %s: %s at %s:%d",
                method,
                path,
                type(err).__name__,
                where.filename,
                where.lineno,
            )
            response = error_response(500, "internal server error")
        logger.info(
            "%s %s %d %.1fms", method, path, response.status, (time.perf_counter() - started) * 1000
        )
        return response

    def _route(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        content_length: int | None,
        read_body: BodyReader,
        client: str,
    ) -> Response:
        routes = {PUBLIC_KEY_PATH: "GET", HEALTH_PATH: "GET", COMPLETION_PATH: "POST"}
        if path not in routes:
            raise HttpError(404, "not found")
        if method != routes[path] and not (method == "HEAD" and routes[path] == "GET"):
            raise HttpError(
                405, f"method not allowed; use {routes[path]}", [("Allow", routes[path])]
            )
        if path == PUBLIC_KEY_PATH:
            return Response(200, self._public_pem, "application/x-pem-file")
        if path == HEALTH_PATH:
            return Response(200, json.dumps(self.health()).encode("utf-8"))
        return self._secure_completion(headers, content_length, read_body, client)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "backend": self.backend.name,
            "key_fingerprint": self.keypair.fingerprint,
            "memory_protection": self._memory_protection,
        }

    # -- POST /v1/chat/secure_completion ---------------------------------------------------
    def _secure_completion(
        self,
        headers: Mapping[str, str],
        content_length: int | None,
        read_body: BodyReader,
        client: str,
    ) -> Response:
        identity = self._authenticate(headers) or f"addr:{client}"
        self._rate_limit(identity)
        payload_id = _payload_id(headers.get("x-payload-id"))
        client_key = _client_public_key(headers.get("x-public-key"))
        tier = _security_tier(headers.get("x-security-tier"))
        if content_length is None:
            raise HttpError(411, "Content-Length is required")
        if content_length > self.options.max_request_bytes:
            raise HttpError(413, f"request body larger than {self.options.max_request_bytes} bytes")
        body = read_body(content_length)
        # One workspace for the exchange: the request's key and plaintext buffers hold the
        # answer's next (wiped in between), and all are released before the reply is sent.
        with Workspace() as work:
            try:
                request, info = envelope.open_json(body, self.keypair, workspace=work)
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
                    result = self.backend.complete(request)
                except BackendError as err:
                    raise HttpError(err.status, err.detail) from None
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
                sealed = envelope.seal_json(result, client_key, tag_layout=info.tag_layout,
                                            processed_at=processed_at, workspace=work)
            finally:
                # The answer first: it shares strings (model, user text) with the request.
                wipe_tree(result)
                wipe_tree(request)
        return Response(200, sealed)

    def _authenticate(self, headers: Mapping[str, str]) -> str | None:
        if self.options.api_keys is None:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
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
        return [response.body]


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
