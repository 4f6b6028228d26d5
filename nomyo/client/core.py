"""`SecureCompletionClient`: one encrypted request, end to end.

A request is checked once (the protocol's chat-request check, then the transport's URL and
header boundary) before any key is made or byte is sent. Its plaintext is serialised straight
into secure memory and sealed by the envelope to the server's key (fetched once per endpoint
and cached, optionally pinned by fingerprint); the answer is opened with the client's leased
key pair, parsed out of secure memory and, when asked, its TPM attestation verified. The async
methods do all of that in one worker trip, so the event loop never blocks on RSA or HTTP;
`*_sync` variants serve synchronous code.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from cryptography.hazmat.primitives.asymmetric import rsa

from nomyo.client.keyring import KeyRing
from nomyo.client.secure_answer import SecureAnswer, require_span_reader
from nomyo.client.transport import USE_DEFAULT, Prepared, RetryPolicy, Transport
from nomyo.errors import (
    APIConnectionError,
    APIError,
    DisposedError,
    InvalidRequestError,
    PackageError,
    SecureMemoryUnavailable,
    SecurityError,
)
from nomyo.memory import (
    foreign_frees,
    forks,
    get_memory_protection_info,
    require_native,
    require_protection,
)
from nomyo.protocol import envelope, keys
from nomyo.protocol.chat_request import check_chat_request, check_security_tier
from nomyo.protocol.constants import (
    AUTHORIZATION_HEADER,
    COMPLETION_PATH,
    DEFAULT_KEY_BITS,
    DEFAULT_TIMEOUT,
    PAYLOAD_ID_HEADER,
    PUBLIC_KEY_HEADER,
    PUBLIC_KEY_PATH,
    SECURITY_TIER_HEADER,
)
from nomyo.protocol.workspace import Fresh, Workspace, WorkspacePool

logger = logging.getLogger(__name__)

T = TypeVar("T")

ATTESTATION_MODES = (None, "verify", "require")
MAX_WORKERS = 32
MAX_CACHED_SERVER_KEYS = 64  # endpoints (per-call base_url) whose key is remembered
# Idle workspaces kept for the next exchange (see WorkspacePool): two, so the locked memory
# a client holds between requests stays within a few pages of a small RLIMIT_MEMLOCK budget.
MAX_IDLE_WORKSPACES = 2
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def normalise_fingerprint(value: str) -> str:
    """Lowercase hex without separators; ValueError unless it is a SHA-256 digest."""
    text = value.replace(":", "").replace(" ", "").lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError("server_key_fingerprint must be a SHA-256 hex digest (64 hex digits)")
    return text


# Headers the protocol or HTTP itself sets: extra_headers may not replace them.
_RESERVED_HEADERS = frozenset(name.lower() for name in (
    PAYLOAD_ID_HEADER, PUBLIC_KEY_HEADER, SECURITY_TIER_HEADER, AUTHORIZATION_HEADER,
    "Content-Type", "Content-Length", "Transfer-Encoding", "Host", "Connection",
))


@dataclass(frozen=True)
class CallOptions:
    """One call's transport options (OpenAI conventions); none of them enters the payload."""

    timeout: Any = USE_DEFAULT
    max_retries: int | None = None
    headers: Mapping[str, str] | None = None
    query: str = ""  # the encoded query string, without "?"

    @classmethod
    def check(cls, timeout: Any = USE_DEFAULT, max_retries: Any = None,
              extra_headers: Any = None, extra_query: Any = None) -> CallOptions:
        """The options, checked: TypeError for a value of the wrong kind or a protocol
        header (header values are checked for line breaks later, by the transport)."""
        if timeout is not USE_DEFAULT and timeout is not None and (
                isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not timeout > 0):
            raise TypeError("timeout must be a positive number of seconds or None")
        if max_retries is not None and (
                isinstance(max_retries, bool) or not isinstance(max_retries, int)
                or max_retries < 0):
            raise TypeError("max_retries must be an int >= 0")
        headers = None
        if extra_headers is not None:
            if not isinstance(extra_headers, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in extra_headers.items()):
                raise TypeError("extra_headers must map header names (str) to values (str)")
            for name in extra_headers:
                if name.strip().lower() in _RESERVED_HEADERS:
                    raise TypeError(f"extra_headers may not set {name.strip()[:40]!r}: the "
                                    "client sets it (use api_key= for Authorization)")
            headers = dict(extra_headers)
        query = ""
        if extra_query is not None:
            if not isinstance(extra_query, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, (str, int, float))
                    for k, v in extra_query.items()):
                raise TypeError("extra_query must map names (str) to str or number values")
            query = urlencode(extra_query)
        return cls(timeout, max_retries, headers, query)


DEFAULT_OPTIONS = CallOptions()


@dataclass(frozen=True)
class _ServerKey:
    public_key: rsa.RSAPublicKey
    pem: str
    fingerprint: str


class SecureCompletionClient:
    """Client for `/v1/chat/secure_completion` (drop-in for the published class)."""

    def __init__(
        self,
        router_url: str = "https://api.nomyo.ai",
        allow_http: bool = False,
        secure_memory: bool = True,
        max_retries: int = 2,
        timeout: float | None = DEFAULT_TIMEOUT,
        key_size: int = DEFAULT_KEY_BITS,
        *,
        key_dir: str | os.PathLike | None = None,
        key_password: keys.Password = None,
        key_rotation_interval: float | None = 24 * 3600,
        server_key_fingerprint: str | None = None,
        ca_bundle: str | None = None,
        require_secure_memory: bool = False,
        attestation: str | None = None,
        expected_pcrs: Mapping[str, Mapping[Any, str]] | None = None,
        debug: bool = False,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if attestation not in ATTESTATION_MODES:
            raise ValueError("attestation must be None, 'verify' or 'require'")
        _check_expected_pcrs(expected_pcrs, attestation)
        if debug:
            logging.getLogger("nomyo").setLevel(logging.DEBUG)
        self.router_url = router_url.rstrip("/")
        self._secure_memory = secure_memory
        self._require_secure_memory = require_secure_memory
        if require_secure_memory:
            _require_secure_memory_now()
        self._attestation = attestation
        self._expected_pcrs = expected_pcrs
        self._pin = (normalise_fingerprint(server_key_fingerprint)
                     if server_key_fingerprint else None)
        self._keyring = KeyRing(
            key_size=key_size, key_dir=key_dir, key_password=key_password,
            rotation_interval=key_rotation_interval,
        )
        self._transport = Transport(
            timeout=timeout, retry=RetryPolicy(max_retries=max_retries),
            verify=ca_bundle if ca_bundle else True, allow_http=allow_http,
        )
        self._server_keys: dict[str, _ServerKey] = {}
        self._server_key_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._workspaces = WorkspacePool(MAX_IDLE_WORKSPACES)
        self._closed = False
        forks.track(self)
        _warn_if_plain_http(self.router_url, allow_http)

    # -- settings: each takes effect from the next request when changed, or is read-only ---

    @property
    def allow_http(self) -> bool:
        return self._transport.allow_http

    @allow_http.setter
    def allow_http(self, value: bool) -> None:
        self._transport.allow_http = bool(value)

    @property
    def secure_memory(self) -> bool:
        """Accepted for the published signature; read-only: locking is process-wide here
        (nomyo.disable_secure_memory()), and buffers are always guarded and wiped."""
        return self._secure_memory

    @property
    def require_secure_memory(self) -> bool:
        return self._require_secure_memory

    @require_secure_memory.setter
    def require_secure_memory(self, value: bool) -> None:
        if value:
            _require_secure_memory_now()
        self._require_secure_memory = bool(value)

    @property
    def max_retries(self) -> int:
        return self._transport.retry.max_retries

    @max_retries.setter
    def max_retries(self, value: int) -> None:
        if value < 0:
            raise ValueError("max_retries must be >= 0")
        self._transport.retry.max_retries = value

    @property
    def timeout(self) -> float | None:
        return self._transport.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._transport.timeout = value

    @property
    def key_size(self) -> int:
        """Read-only: the size of every pair this client makes (set at construction)."""
        return self._keyring.key_size

    @property
    def attestation(self) -> str | None:
        return self._attestation

    @attestation.setter
    def attestation(self, mode: str | None) -> None:
        if mode not in ATTESTATION_MODES:
            raise ValueError("attestation must be None, 'verify' or 'require'")
        if mode is None and self._expected_pcrs is not None:
            raise ValueError("expected_pcrs needs attestation='verify' or 'require'")
        self._attestation = mode

    @property
    def expected_pcrs(self) -> Mapping[str, Mapping[Any, str]] | None:
        return self._expected_pcrs

    @expected_pcrs.setter
    def expected_pcrs(self, pcrs: Mapping[str, Mapping[Any, str]] | None) -> None:
        _check_expected_pcrs(pcrs, self._attestation)
        self._expected_pcrs = pcrs

    @property
    def keyring(self) -> KeyRing:
        """The client's key pairs (read-outs for health checks and tests)."""
        return self._keyring

    # -- key management (published signatures) ---------------------------------------------

    def prepare_keys(self) -> None:
        """Start making (or loading) the key pair in the background, ahead of the first request."""
        self._keyring.start()

    def wait_for_keys(self) -> None:
        """Block until the key pair is ready; raises what made its making or loading fail."""
        self._check_open()
        self._keyring.start()
        with self._keyring.lease():
            pass

    def generate_keys(
        self, save_to_file: bool = False, key_dir: str = "client_keys", password: str | None = None
    ) -> None:
        """Generate a fresh RSA pair of `key_size` bits now; optionally save it (0600)."""
        self._check_open()
        pair = self._keyring.generate()
        if save_to_file:
            pair.save(key_dir, password)
        self._keyring.install(pair)

    def load_keys(
        self, private_key_path: str, public_key_path: str | None = None, password: str | None = None
    ) -> None:
        """Load the pair from PEM files; a public key file must match the private key."""
        self._check_open()
        pair = keys.KeyPair.load(private_key_path, password)
        if public_key_path:
            with open(public_key_path, encoding="ascii") as f:
                if keys.fingerprint(f.read()) != pair.fingerprint:
                    pair.close()
                    raise ValueError(f"{public_key_path}: does not match the private key")
        self._keyring.install(pair)

    @property
    def public_key_pem(self) -> str | None:
        """The PEM sent as X-Public-Key, or None while no pair exists yet."""
        pair = self._keyring.current
        return pair.public_pem if pair is not None else None

    @property
    def private_key(self) -> keys.PrivateKey | None:
        """The current private key (a SecureRsaKey with the native helper), or None."""
        pair = self._keyring.current
        return pair.private_key if pair is not None and not pair.closed else None

    # -- async API (published signatures) ---------------------------------------------------

    async def fetch_server_public_key(self) -> str:
        """The server's public key PEM (fetched once per endpoint, then cached)."""
        return await self._run(self.fetch_server_public_key_sync)

    async def encrypt_payload(self, payload: dict[str, Any]) -> bytes:
        """Seal a request payload to the server's key; returns the package bytes."""
        return await self._run(self.encrypt_payload_sync, payload)

    async def decrypt_response(self, encrypted_response: bytes, payload_id: str) -> dict[str, Any]:
        """Open a response package with the current key pair; adds `_metadata`."""
        return await self._run(self.decrypt_response_sync, encrypted_response, payload_id)

    async def send_secure_request(
        self,
        payload: dict[str, Any],
        payload_id: str,
        api_key: str | None = None,
        security_tier: str | None = None,
        *,
        base_url: str | None = None,
        options: CallOptions = DEFAULT_OPTIONS,
        secure_response: bool = False,
    ) -> Any:
        """Encrypt, POST (with retries), decrypt, verify: the whole round trip in one worker
        trip, off the event loop. `options` (CallOptions.check) sets this call's timeout,
        retries, extra headers and query. The answer is a dict, or with `secure_response`
        a SecureAnswer whose text stays in secure memory (the caller closes it).

        The answer is handed to the loop as soon as it is ready; the exchange's workspace,
        wiped by then, is unmapped afterwards in the worker, off the answer's path
        (releasing memfd_secret pages costs about 0.1 ms).
        """
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        pool = self._pool()  # the one "closed?" of an async request: DisposedError once closed
        try:
            pool.submit(self._exchange_for, loop, answer, payload, payload_id, api_key,
                        security_tier, base_url, options, secure_response)
        except RuntimeError:  # the pool was shut down by a concurrent close()
            raise DisposedError("This client has been closed") from None
        return await answer

    # -- blocking API ---------------------------------------------------------------------

    def fetch_server_public_key_sync(self) -> str:
        """Blocking `fetch_server_public_key`."""
        self._check_open()
        return self._server_key(self.router_url).pem

    def encrypt_payload_sync(self, payload: dict[str, Any]) -> bytes:
        """Blocking `encrypt_payload`."""
        self._check_open()
        check_chat_request(payload)
        server_key = self._server_key(self.router_url)
        return envelope.seal_json(payload, server_key.public_key, workspace=self._fresh())

    def decrypt_response_sync(self, encrypted_response: bytes, payload_id: str) -> dict[str, Any]:
        """Blocking `decrypt_response`."""
        self._check_open()
        if not encrypted_response:
            raise PackageError("Empty encrypted response")
        with self._keyring.lease() as pair:
            return _open_response(encrypted_response, pair, payload_id, self._fresh())

    def send_secure_request_sync(
        self,
        payload: dict[str, Any],
        payload_id: str,
        api_key: str | None = None,
        security_tier: str | None = None,
        *,
        base_url: str | None = None,
        options: CallOptions = DEFAULT_OPTIONS,
        secure_response: bool = False,
    ) -> Any:
        """Blocking `send_secure_request`; `base_url` overrides the endpoint for this call."""
        self._check_open()
        work, clean = self._workspaces.take(self._require_secure_memory or None), False
        try:
            response = self._exchange(work, payload, payload_id, api_key, security_tier,
                                      base_url, options, secure_response)
            clean = True
            return response
        finally:
            self._workspaces.give(work, clean)

    def _exchange_for(self, loop: asyncio.AbstractEventLoop, answer: asyncio.Future[Any],
                      *request: Any) -> None:
        """`_exchange` in a worker thread: post its outcome to `answer` on `loop`, then hand
        the workspace, whose slots are wiped by then, back to the pool off the answer's path."""
        work = self._workspaces.take(self._require_secure_memory or None)
        try:
            outcome = (self._exchange(work, *request), None)
        except BaseException as exc:  # handed to the awaiting task, as run_in_executor does
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(_settle, answer, *outcome)
        except RuntimeError:  # the caller's loop closed while the request ran
            logger.debug("event loop closed before the answer arrived")
            _discard(outcome[0])
        try:
            self._workspaces.give(work, outcome[1] is None)
        except Exception:  # nobody awaits this any more: say it instead of dropping it
            logger.exception("releasing an exchange's (wiped) secure buffers failed")

    def _exchange(
        self, work: Workspace, payload: dict[str, Any], payload_id: str,
        api_key: str | None, security_tier: str | None, base_url: str | None,
        options: CallOptions = DEFAULT_OPTIONS, secure_response: bool = False,
    ) -> Any:
        """One round trip in `work`, whose slots are all wiped again when it returns: the
        request's key and plaintext before any byte is sent, the answer's as it is parsed
        (or, `secure_response`, handed over to the SecureAnswer returned)."""
        check_security_tier(security_tier)
        check_chat_request(payload)
        if secure_response:
            require_span_reader()
        url = base_url.rstrip("/") if base_url else self.router_url
        headers = dict(options.headers) if options.headers else {}
        headers[PAYLOAD_ID_HEADER] = str(payload_id)
        headers["Content-Type"] = "application/octet-stream"
        if security_tier:
            headers[SECURITY_TIER_HEADER] = security_tier
        target = url + COMPLETION_PATH + ("?" + options.query if options.query else "")
        # the one boundary: URL scheme and headers, before any key is made or byte is sent
        post = self._transport.prepare("POST", target, headers, api_key=api_key)
        self._keyring.start()  # no-op once a pair exists; else it is made while we fetch
        try:
            server_key = self._server_key(url, options=options)
        except (APIError, APIConnectionError) as err:  # the key's GET has no payload id
            if err.payload_id is None:
                err.payload_id = str(payload_id)
            raise
        opener = _open_secure_answer if secure_response else _open_response
        with self._keyring.lease() as pair:
            content = self._post_sealed(post, url, server_key, payload, pair, work, options)
            response = opener(content, pair, str(payload_id), work)
        if self._attestation is not None:
            try:
                self._attest(response, str(payload_id))
            except BaseException:
                _discard(response)
                raise
        return response

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Wipe the key pairs, release connections and threads; later use raises DisposedError."""
        if self._closed:
            return
        self._closed = True
        self._keyring.close()
        self._transport.close()
        with self._server_key_lock:
            self._server_keys.clear()
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)
        self._workspaces.close()

    dispose = close

    def forget_parent(self) -> None:
        """In a forked child (see nomyo.memory.forks): new locks (another thread may have
        held one at the fork), no worker threads, and the parent's connections, idle buffers
        and key births dropped (the workspace pool drops its own); the current key pair and
        server keys stay usable."""
        self._server_key_lock = threading.Lock()
        self._executor_lock = threading.Lock()
        self._executor = None  # its threads were not forked
        self._transport.forget_parent()
        self._keyring.forget_parent()

    def __enter__(self) -> SecureCompletionClient:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> SecureCompletionClient:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"SecureCompletionClient({self.router_url!r}, {state})"

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DisposedError("This client has been closed")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking step in this client's worker pool, keeping the event loop free."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool(), functools.partial(fn, *args))

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            self._check_open()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=MAX_WORKERS, thread_name_prefix="nomyo-client"
                )
            return self._executor

    def _fresh(self) -> Workspace:
        """No reuse (one-off calls), with this client's fail-closed setting."""
        return Fresh(require=self._require_secure_memory or None)

    def _server_key(self, url: str, stale: _ServerKey | None = None,
                    options: CallOptions = DEFAULT_OPTIONS) -> _ServerKey:
        """The endpoint's key from the cache, fetching it once (again only when `stale`)
        under the call's timeout and retries."""
        cached = self._server_keys.get(url)
        if cached is not None and cached is not stale:
            return cached
        with self._server_key_lock:
            cached = self._server_keys.get(url)
            if cached is None or cached is stale:
                cached = self._fetch_server_key(url, stale, options)
                if len(self._server_keys) >= MAX_CACHED_SERVER_KEYS:
                    self._server_keys.clear()
                self._server_keys[url] = cached
            return cached

    def _fetch_server_key(self, url: str, previous: _ServerKey | None,
                          options: CallOptions) -> _ServerKey:
        body = self._transport.get(url + PUBLIC_KEY_PATH, timeout=options.timeout,
                                   max_retries=options.max_retries)
        try:
            pem = body.decode("ascii")
            public_key = keys.load_public_key(pem)
        except (UnicodeDecodeError, ValueError):
            raise PackageError("Server returned an invalid public key") from None
        fingerprint = keys.fingerprint(public_key)
        if self._pin is not None and fingerprint != self._pin:
            raise SecurityError("Server public key does not match the pinned fingerprint")
        if previous is not None and fingerprint != previous.fingerprint:
            logger.warning("server %s presented a new public key", urlsplit(url).netloc)
        return _ServerKey(public_key, pem, fingerprint)

    def _post_sealed(self, post: Prepared, url: str, server_key: _ServerKey,
                     payload: dict[str, Any], pair: keys.KeyPair, work: Workspace,
                     options: CallOptions) -> bytes:
        """Seal (the plaintext is wiped before any byte is sent) and POST; if the server could
        not open the package, refresh its key once."""
        generated = {PUBLIC_KEY_HEADER: _quoted(pair.public_pem)}
        body = envelope.seal_json(payload, server_key.public_key, workspace=work)
        limits = {"timeout": options.timeout, "max_retries": options.max_retries}
        try:
            return self._transport.send(post, body, generated, **limits)
        except InvalidRequestError as err:
            if not _server_could_not_open(err):
                raise
            fresh = self._server_key(url, stale=server_key, options=options)
            if fresh.fingerprint == server_key.fingerprint:
                raise
            logger.info("retrying once with the server's new public key")
        body = envelope.seal_json(payload, fresh.public_key, workspace=work)
        return self._transport.send(post, body, generated, **limits)

    def _attest(self, response: dict[str, Any] | SecureAnswer, payload_id: str) -> None:
        """Verify the TPM attestation into `_metadata.attestation_verification`; `require`
        refuses an unverified answer."""
        from nomyo.attestation import verify_tpm_attestation  # only clients that ask load it

        secure = isinstance(response, SecureAnswer)
        metadata = response.metadata if secure else response["_metadata"]
        block = metadata.get("tpm_attestation")
        if isinstance(block, dict) and block.get("is_available"):
            result = verify_tpm_attestation(block, payload_id, expected_pcrs=self._expected_pcrs)
            verdict = result.to_dict()
        else:
            verdict = {"valid": False, "reasons": ["not_available"]}
        if secure:
            response._note(attestation_verification=verdict)
        else:
            metadata["attestation_verification"] = verdict
        if self._attestation == "require" and not verdict["valid"]:
            raise SecurityError(
                "TPM attestation required but not verified: " + ", ".join(verdict["reasons"])
            )


@functools.lru_cache(maxsize=8)
def _quoted(public_pem: str) -> str:
    """The percent-encoded PEM for X-Public-Key (public data; quoting it costs ~0.1 ms)."""
    return quote(public_pem)


def _settle(future: asyncio.Future[T], result: T | None, exc: BaseException | None) -> None:
    """Complete `future` on its loop, unless the awaiting task was cancelled meanwhile."""
    if future.done():
        _discard(result)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _server_could_not_open(err: InvalidRequestError) -> bool:
    """True when a 400 says the package could not be decrypted with the server's key."""
    detail = (err.error_details or {}).get("detail")
    return isinstance(detail, str) and "decrypt" in detail.lower()


def _discard(result: Any) -> None:
    """Close a SecureAnswer nobody will receive (a cancelled call, a closed loop)."""
    if isinstance(result, SecureAnswer):
        result.close()


def _client_metadata(info: envelope.PackageInfo, payload_id: str) -> dict[str, Any]:
    """The fields the client adds to an answer's `_metadata`."""
    return {"payload_id": payload_id, "processed_at": info.processed_at, "is_encrypted": True,
            "encryption_algorithm": info.algorithm}


def _open_response(content: bytes, pair: keys.KeyPair, payload_id: str,
                   work: Workspace) -> dict[str, Any]:
    """Open and parse a response package; merge the client-side `_metadata` fields."""
    response, info = envelope.open_json(content, pair, workspace=work)
    if not isinstance(response, dict):
        raise PackageError("decrypted response is not a JSON object")
    metadata = response.get("_metadata")
    if not isinstance(metadata, dict):
        metadata = response["_metadata"] = {}
    metadata.update(_client_metadata(info, payload_id))
    return response


def _open_secure_answer(content: bytes, pair: keys.KeyPair, payload_id: str,
                        work: Workspace) -> SecureAnswer:
    """Open a response package into a SecureAnswer, which keeps the plaintext buffer (the
    workspace hands it over) and closes it."""
    opened = envelope.open_package(content, pair, workspace=work)
    try:
        plaintext = work.hand_over(opened.plaintext)
    except BaseException:
        opened.close()
        raise
    return SecureAnswer(plaintext, _client_metadata(opened.info, payload_id))


def _check_expected_pcrs(pcrs: Mapping[str, Mapping[Any, str]] | None,
                        attestation: str | None) -> None:
    if pcrs is None:
        return
    if attestation is None:
        raise ValueError("expected_pcrs needs attestation='verify' or 'require'")
    from nomyo.attestation import validate_expected_pcrs

    validate_expected_pcrs(pcrs)


def _require_secure_memory_now() -> None:
    """require_secure_memory=True: refuse at once, naming the real cause, unless this process
    can lock memory and exclude it from dumps now."""
    report = get_memory_protection_info()
    if report["backend"] != "native":
        require_native(report.get("fallback_reason"))
    if not report["enabled"]:
        raise SecureMemoryUnavailable(
            "require_secure_memory=True, but locking was switched off in this process "
            "(nomyo.disable_secure_memory()); call nomyo.enable_secure_memory() first")
    require_protection(report["has_memory_locking"], report["dump_excluded"])
    foreign_frees.require_wiped(True)


def _warn_if_plain_http(url: str, allow_http: bool) -> None:
    parts = urlsplit(url)
    if allow_http and parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        warnings.warn(
            "Using plain HTTP to a non-loopback host: only for local development; "
            "a man in the middle can swap the server key.",
            UserWarning,
            stacklevel=3,
        )
