"""One exception hierarchy for the whole library.

Names and constructor shapes match the published client so `except` clauses written for it
keep working. Messages never carry plaintext, key material or API keys.
"""
from __future__ import annotations

import traceback
from typing import Any

_CLASS_DEFAULT: Any = object()


class NomyoError(Exception):
    """Base of every error this library raises on purpose."""


class ConfigurationError(NomyoError, ValueError):
    """A client setting that cannot work (an unusable key directory, a key that needs a
    password), refused at construction instead of failing at the first request."""


class SecurityError(NomyoError):
    """A protection could not be guaranteed: crypto or integrity failure, HTTPS not used,
    header injection, a pinned key that changed, or secure memory that is required but missing."""


class SecureMemoryUnavailable(SecurityError):
    """Fail-closed mode is on and secure memory cannot be locked or excluded from dumps."""


class PackageError(NomyoError, ValueError):
    """An encrypted package is structurally invalid (malformed JSON, missing field, bad base64,
    unsupported version or algorithm, oversized plaintext)."""


class WipeRefusedError(NomyoError, ValueError):
    """An immutable object handed over for wiping (`wipe_bytes_owned`, `wipe_str_owned`) was
    still referenced elsewhere, or is interned, so it was left as it was, not zeroed. An
    internal error, never an integrity verdict."""


class DisposedError(NomyoError, RuntimeError):
    """A client, or a secure answer, was used after `close()` / `dispose()`."""


class AnswerFieldError(NomyoError, LookupError):
    """A secure answer was asked for a field it does not have (a missing key, a choice out of
    range) or for a view of a field that is not a string; the message names the field's
    path, never its value."""


class APIError(NomyoError):
    """An HTTP error answer from the endpoint; base of the status-specific classes."""

    default_status: int | None = None

    def __init__(
        self,
        message: str,
        status_code: Any = _CLASS_DEFAULT,
        error_details: dict[str, Any] | None = None,
        *,
        payload_id: str | None = None,
    ) -> None:
        self.message = message
        self.payload_id = payload_id  # the request's X-Payload-ID, for the server's logs
        # The class's status unless given; an explicit None means no HTTP answer (raised here)
        self.status_code = self.default_status if status_code is _CLASS_DEFAULT else status_code
        self.error_details = error_details
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class InvalidRequestError(APIError):
    """400: the request was malformed (also raised locally, e.g. for `stream=True`)."""

    default_status = 400


class ChatRequestError(InvalidRequestError, ValueError):
    """A chat request the protocol cannot carry, refused before sealing (client) or after
    opening (server, as a 400); a ValueError too, as the published client raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=None)


class AuthenticationError(APIError):
    """401: missing or invalid API key."""

    default_status = 401


class ForbiddenError(APIError):
    """403: the model is not allowed for the requested security tier."""

    default_status = 403


class RateLimitError(APIError):
    """429: rate limit exceeded (after retries ran out)."""

    default_status = 429


class ServerError(APIError):
    """500: the endpoint failed (after retries ran out)."""

    default_status = 500


class BadGatewayError(APIError):
    """502: a proxy in front of the endpoint got no valid answer from it (not retried: the
    request may have been processed)."""

    default_status = 502


class ServiceUnavailableError(APIError):
    """503: the inference backend is unavailable (after retries ran out)."""

    default_status = 503


class GatewayTimeoutError(APIError):
    """504: a proxy in front of the endpoint timed out waiting for it (not retried: the
    request may still be processed)."""

    default_status = 504


class APIConnectionError(NomyoError, ConnectionError):
    """The endpoint could not be reached: network failure or timeout (after retries ran out).
    Also a builtin ConnectionError, which the published client's docs tell users to catch."""

    def __init__(self, message: str, *, payload_id: str | None = None) -> None:
        self.message = message
        self.status_code = None
        self.error_details = None
        self.payload_id = payload_id
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class APITimeoutError(APIConnectionError, TimeoutError):
    """The endpoint did not answer (or accept the connection) in time. A timed-out request
    that was sent is not retried: the endpoint may have processed it."""


def origin_of(err: BaseException) -> str:
    """`Type at file:line` where `err` was raised: all a log may say of an unexpected error,
    whose message may quote request or answer data."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return type(err).__name__
    return f"{type(err).__name__} at {frames[-1].filename}:{frames[-1].lineno}"
