"""HTTP transport for the secure-completion protocol.

One pooled `requests.Session` per client, a default timeout, retries (honouring
`Retry-After`, else jittered exponential backoff) only where the endpoint cannot have acted on
the request: connection failures before the request was sent, 429 and 503. A POST that reached
the endpoint and failed there (500, 502, 504, a dropped connection or a read timeout after
sending) is not sent again: the endpoint does not deduplicate payload ids. The idempotent GET
of the server key is also retried after network failures once sent. Then the
mapping from HTTP status to the exception classes of docs/protocol.md. It only ever carries
ciphertext; it never sees plaintext or key material, and never puts the API key in a message.
`prepare` is the one boundary where a URL's scheme and every header are checked, and where
the `Authorization` header is built, so the transport knows which value to redact.
"""
from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
import urllib3.exceptions
from requests.utils import get_environ_proxies

from nomyo.client.http_pools import OneWriteAdapter, RequestNotSent
from nomyo.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadGatewayError,
    DisposedError,
    ForbiddenError,
    GatewayTimeoutError,
    InvalidRequestError,
    PackageError,
    RateLimitError,
    SecurityError,
    ServerError,
    ServiceUnavailableError,
)
from nomyo.protocol.constants import AUTHORIZATION_HEADER, DEFAULT_TIMEOUT, PAYLOAD_ID_HEADER

logger = logging.getLogger(__name__)

# Answers that say the request was not acted on: sent again. 500, 502 and 504 are not.
RETRYABLE_STATUS = frozenset({429, 503})
# The exchange talks to the urllib3 pool directly: its errors are the network failures.
_NETWORK_ERRORS = (urllib3.exceptions.HTTPError,)
_NO_RETRY = urllib3.Retry(total=False, redirect=False)  # what retries=False means, built once
USE_DEFAULT: Any = object()  # "this transport's own timeout" (None means no limit)
_BASE_HEADERS = {"User-Agent": "nomyo-python", "Accept": "*/*", "Accept-Encoding": "identity"}
# Largest answer read: a protocol package carries at most 10 MiB of plaintext (about 14 MiB
# of base64); anything far beyond is refused before it can exhaust memory.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
_CACHE_LIMIT = 64  # routes remembered (endpoint and method)
POOL_SIZE = 32  # connections kept per endpoint: one per client worker thread
MAX_DETAIL_CHARS = 500

# Per status: exception class, message prefix, fallback detail when the body has none.
_STATUS_ERRORS: dict[int, tuple[type[APIError], str, str]] = {
    400: (InvalidRequestError, "Bad request: ", "Invalid request"),
    401: (AuthenticationError, "", "Invalid API key or authentication failed"),
    403: (ForbiddenError, "Forbidden: ", "Model not allowed for the requested security tier"),
    404: (APIError, "Endpoint not found: ", "Secure inference not enabled"),
    429: (RateLimitError, "Rate limit exceeded: ", "unknown"),
    500: (ServerError, "Server error: ", "unknown"),
    502: (BadGatewayError, "Bad gateway: ", "unknown"),
    503: (ServiceUnavailableError, "Service unavailable: ", "unknown"),
    504: (GatewayTimeoutError, "Gateway timeout: ", "unknown"),
}


class _NetworkFailure(Exception):
    """An exchange's network error and whether the request may have reached the server."""

    def __init__(self, error: Exception, sent: bool) -> None:
        super().__init__(type(error).__name__)
        self.error = error
        self.sent = sent


def _before_sending(err: Exception) -> bool:
    """True when urlopen's error says no request reached the server: the connection or TLS
    handshake failed, or the request failed while being written (RequestNotSent). Errors
    reading an answer after a complete write are neither (see http_pools)."""
    if isinstance(err, urllib3.exceptions.ReadTimeoutError):
        return False
    if isinstance(err, (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.SSLError)):
        return True
    return any(isinstance(arg, RequestNotSent) for arg in getattr(err, "args", ()))


def require_secure_url(url: str, allow_http: bool) -> None:
    """Refuse any URL that is not HTTPS (or HTTP when explicitly allowed), before any I/O."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "https" or (scheme == "http" and allow_http):
        return
    if scheme == "http":
        raise SecurityError(
            "Refusing plain HTTP: the server key and requests must travel over HTTPS. "
            "For local development only, pass allow_http=True."
        )
    raise SecurityError(f"Unsupported URL scheme {scheme!r}: use https://")


def check_header_values(headers: Mapping[str, str]) -> None:
    """Refuse header names or values containing CR, LF or NUL (header injection)."""
    for name, value in headers.items():
        if any(ch in text for text in (name, value) for ch in "\r\n\0"):
            raise SecurityError(f"Header {name.strip()[:40]!r} contains a line break; refused")


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value (delta-seconds or HTTP date); None if invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
        return max(0.0, seconds)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _error_body(content: bytes) -> dict[str, Any] | None:
    """The parsed JSON error body when it is a JSON object, else None."""
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def error_for_status(
    status: int, content: bytes, redact: tuple[str, ...] = (), payload_id: str | None = None
) -> APIError:
    """Build the docs/protocol.md exception for an HTTP error status (the caller raises it)."""
    details = _error_body(content)
    detail = details.get("detail") if details else None
    cls, prefix, fallback = _STATUS_ERRORS.get(
        status, (APIError, f"Unexpected status code: {status} ", "unknown")
    )
    text = detail if isinstance(detail, str) and detail else (
        json.dumps(detail)[:MAX_DETAIL_CHARS] if detail is not None else fallback
    )
    return cls(prefix + _redacted(text, redact)[:MAX_DETAIL_CHARS], status_code=status,
               error_details=_redacted(details, redact), payload_id=payload_id)


def _redacted(value: Any, secrets: tuple[str, ...]) -> Any:
    """A copy of value (str, or JSON containers of them) with every secret replaced:
    a server that echoes the API key must not put it into an exception apps will log."""
    if isinstance(value, str):
        for secret in secrets:
            if secret:
                value = value.replace(secret, "[redacted]")
        return value
    if isinstance(value, dict):
        return {_redacted(k, secrets): _redacted(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(item, secrets) for item in value]
    return value


@dataclass(frozen=True)
class Prepared:
    """A request whose URL and headers passed `Transport.prepare`; `redact` holds the values
    no message may show (the API key)."""

    method: str
    url: str
    headers: Mapping[str, str] = field(repr=False)  # Authorization among them
    redact: tuple[str, ...] = field(default=(), repr=False)


@dataclass
class RetryPolicy:
    """How many extra attempts and how long to wait between them."""

    max_retries: int = 2
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    retry_after_cap: float = 60.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        """Wait before extra attempt `attempt` (1-based): Retry-After if given, else backoff."""
        hinted = parse_retry_after(retry_after)
        if hinted is not None:
            return min(hinted, self.retry_after_cap)
        exact = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
        return exact * (1.0 - 0.25 * random.random())


def _new_session() -> requests.Session:
    """A session of one-write connections that reads nothing from the environment."""
    session = requests.Session()
    session.trust_env = False
    adapter = OneWriteAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


class Transport:
    """A pooled HTTP client with retries; thread-safe, one per SDK client."""

    def __init__(
        self,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        verify: bool | str = True,
        allow_http: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.allow_http = allow_http
        self._sleep = sleep
        self._lock = threading.Lock()
        # The environment is read once (the CA bundle here, proxies once per route) instead of
        # on every request: requests' trust_env costs about a millisecond per call (os.environ
        # scans, netrc stats).
        # The exchange bypasses requests' send(), which is where certifi's bundle would be
        # chosen, so the default bundle is resolved here too.
        if verify is True:
            env = os.environ
            verify = (env.get("REQUESTS_CA_BUNDLE") or env.get("CURL_CA_BUNDLE")
                      or requests.certs.where())
        if isinstance(verify, str) and not os.path.exists(verify):
            raise ValueError(f"CA bundle not found: {verify}")
        self._verify = verify
        self._routes: dict[tuple[str, str], tuple[urllib3.HTTPConnectionPool, str]] = {}
        self.timeout = timeout
        self._session: requests.Session | None = _new_session()

    @property
    def timeout(self) -> float | None:
        """Seconds to connect and between bytes read, per attempt (None: no limit)."""
        return self._timeout.connect_timeout

    @timeout.setter
    def timeout(self, seconds: float | None) -> None:
        self._timeout = urllib3.Timeout(connect=seconds, read=seconds)

    @property
    def ca_bundle(self) -> bool | str:
        """What server certificates are verified against (a CA bundle path, or False)."""
        return self._verify

    def connection_pools(self, url: str) -> Any:
        """The pool manager's pools behind `url` (a diagnostic read-out)."""
        session = self._session
        if session is None:
            raise DisposedError("This client has been closed")
        return session.get_adapter(url).poolmanager.pools

    def close(self) -> None:
        """Release pooled connections; later calls raise DisposedError."""
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()

    def forget_parent(self) -> None:
        """In a forked child: the pooled connections are shared with the parent, whose
        answers would cross ours; start a new pool and leave them to the parent (collecting
        them here only closes the child's descriptors)."""
        self._lock = threading.Lock()
        self._routes = {}
        if self._session is not None:
            self._session = _new_session()

    def prepare(self, method: str, url: str, headers: Mapping[str, str] | None = None, *,
                api_key: str | None = None) -> Prepared:
        """Check the URL's scheme and every header (SecurityError before any byte is sent) and
        add `Authorization: Bearer <api_key>` when a key is given."""
        require_secure_url(url, self.allow_http)
        checked = dict(headers or {})
        if any(name.strip().lower() == AUTHORIZATION_HEADER.lower() for name in checked):
            raise ValueError("pass the API key as api_key=, not as an Authorization header: "
                             "the transport builds that header and redacts its value")
        if api_key:
            checked[AUTHORIZATION_HEADER] = f"Bearer {api_key}"
        check_header_values(checked)
        return Prepared(method, url, checked, (api_key,) if api_key else ())

    def get(self, url: str, headers: Mapping[str, str] | None = None, *,
            api_key: str | None = None, timeout: Any = USE_DEFAULT,
            max_retries: int | None = None) -> bytes:
        """GET with retries; the body of a 200 answer, else the mapped exception."""
        return self.send(self.prepare("GET", url, headers, api_key=api_key),
                         timeout=timeout, max_retries=max_retries)

    def post(self, url: str, body: bytes, headers: Mapping[str, str], *,
             api_key: str | None = None) -> bytes:
        """POST with retries (same headers, hence same X-Payload-ID, on every attempt)."""
        return self.send(self.prepare("POST", url, headers, api_key=api_key), body)

    def send(self, request: Prepared, body: bytes | None = None,
             generated: Mapping[str, str] | None = None, *,
             timeout: Any = USE_DEFAULT, max_retries: int | None = None) -> bytes:
        """Send until success, an answer or failure that must not be retried, or retries run
        out. `generated` headers are ones this library made itself (a percent-encoded PEM): no
        caller input, no check. `timeout` and `max_retries` override this transport's for one
        call (`timeout=USE_DEFAULT`, the default, keeps its own; None waits without limit)."""
        method, url, redact = request.method, request.url, request.redact
        headers = {**request.headers, **generated} if generated else request.headers
        payload_id = request.headers.get(PAYLOAD_ID_HEADER)
        limits = self._timeout if timeout is USE_DEFAULT else urllib3.Timeout(
            connect=timeout, read=timeout)  # type: ignore[arg-type]
        retries = self.retry.max_retries if max_retries is None else max_retries
        attempts = retries + 1
        idempotent = method == "GET"
        for attempt in range(attempts):
            session = self._session
            if session is None:
                raise DisposedError("This client has been closed")
            last = attempt + 1 == attempts
            try:
                status, retry_after, content = self._exchange(
                    session, method, url, headers, body, limits)
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema):
                raise InvalidRequestError("Invalid endpoint URL", status_code=None,
                                          payload_id=payload_id) from None
            except _NetworkFailure as failure:
                err = failure.error
                if "CERTIFICATE_VERIFY_FAILED" in str(err):
                    raise SecurityError("TLS certificate verification failed") from err
                if last or (failure.sent and not idempotent):
                    raise _connection_error(err, url, payload_id) from err
                logger.warning("%s on attempt %d/%d", _failure_kind(err), attempt + 1, attempts)
                self._sleep(self.retry.delay(attempt + 1, None))
                continue
            if status == 200:
                return content
            if status in RETRYABLE_STATUS and not last:
                wait = self.retry.delay(attempt + 1, retry_after)
                logger.warning(
                    "HTTP %d on attempt %d/%d; retrying in %.2fs",
                    status, attempt + 1, attempts, wait,
                )
                self._sleep(wait)
                continue
            raise error_for_status(status, content, redact, payload_id) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _exchange(
        self, session: requests.Session, method: str, url: str,
        headers: Mapping[str, str], body: bytes | None, limits: urllib3.Timeout,
    ) -> tuple[int, str | None, bytes]:
        """One HTTP exchange on the Session's pooled connections: (status, Retry-After, body).

        The Session's adapter picks the connection pool (TLS verification, CA bundle, proxy);
        the exchange itself goes straight to that urllib3 pool, which saves requests'
        per-call preparation (about 0.4 ms, a tenth of the client's cryptographic floor),
        and the body is read in one call of its announced length.
        """
        route = self._route(session, method, url)
        try:
            try:
                response = self._urlopen(route, method, headers, body, limits)
            except urllib3.exceptions.ClosedPoolError:
                # The PoolManager closed this pool to make room for another endpoint's: a pool
                # looked up afresh gets a new connection. Anything else is the caller's.
                self._routes.pop((method, url), None)
                response = self._urlopen(self._route(session, method, url), method, headers,
                                         body, limits)
        except _NETWORK_ERRORS as err:
            raise _NetworkFailure(err, sent=not _before_sending(err)) from err
        try:
            # urllib3's parsed length: None for chunked bodies or an invalid Content-Length,
            # which are then read only up to the cap.
            declared = response.length_remaining
            if declared is not None and declared > MAX_RESPONSE_BYTES:
                raise PackageError(f"answer larger than {MAX_RESPONSE_BYTES} bytes refused")
            # Never asked for a content coding, so none is decoded (no decompression bombs).
            content = response.read(None if declared is not None else MAX_RESPONSE_BYTES + 1,
                                    decode_content=False)
            if len(content) > MAX_RESPONSE_BYTES:
                raise PackageError(f"answer larger than {MAX_RESPONSE_BYTES} bytes refused")
        except _NETWORK_ERRORS as err:
            response.close()  # a half-read connection must not be reused
            raise _NetworkFailure(err, sent=True) from err
        except BaseException:
            response.close()
            raise
        finally:
            response.release_conn()
        return response.status, response.headers.get("Retry-After"), content

    def _urlopen(self, route: tuple[urllib3.HTTPConnectionPool, str], method: str,
                 headers: Mapping[str, str], body: bytes | None, limits: urllib3.Timeout,
                 ) -> urllib3.BaseHTTPResponse:
        pool, target = route
        return pool.urlopen(
            method, target, body=body, headers={**_BASE_HEADERS, **headers}, retries=_NO_RETRY,
            redirect=False, assert_same_host=False, timeout=limits,
            preload_content=False, decode_content=False,
        )

    def _route(self, session: requests.Session, method: str, url: str
               ) -> tuple[urllib3.HTTPConnectionPool, str]:
        """The URL's connection pool, as the Session's adapter picks it (TLS verification, CA
        bundle, proxy), and the request target; cached, since the lookup costs about 70 us
        right after a network wait (a stat of the CA bundle among it)."""
        key = (method, url)
        route = self._routes.get(key)
        if route is None:
            if len(self._routes) >= _CACHE_LIMIT:  # many per-call base_urls: start afresh
                self._routes.clear()
            adapter = session.get_adapter(url)
            proxies = get_environ_proxies(url)  # read here, once per route: trust_env is off
            stub = requests.Request(method, url).prepare()
            pool = adapter.get_connection_with_tls_context(stub, self._verify, proxies=proxies)
            route = self._routes[key] = (pool, adapter.request_url(stub, proxies))
        return route


def _failure_kind(err: Exception) -> str:
    """What failed, for a log line: the error's class, or the write error it wraps."""
    inner = next((arg for arg in getattr(err, "args", ()) if isinstance(arg, Exception)), None)
    return type(inner if inner is not None else err).__name__


def _connection_error(err: Exception, url: str, payload_id: str | None) -> APIConnectionError:
    """APITimeoutError or APIConnectionError, naming the failure kind and host only."""
    host = urlsplit(url).netloc or "the server"
    if isinstance(err, urllib3.exceptions.ReadTimeoutError):
        return APITimeoutError(f"Request to {host} timed out", payload_id=payload_id)
    if (isinstance(err, urllib3.exceptions.ConnectTimeoutError)
            and not isinstance(err, urllib3.exceptions.NewConnectionError)):
        return APITimeoutError(f"Connecting to {host} timed out", payload_id=payload_id)
    if isinstance(err, urllib3.exceptions.SSLError):
        return APIConnectionError(f"TLS handshake with {host} failed", payload_id=payload_id)
    return APIConnectionError(f"Failed to connect to {host} ({_failure_kind(err)})",
                              payload_id=payload_id)
