"""`SecureChatCompletion`: the OpenAI-style facade over `SecureCompletionClient`.

Every OpenAI chat parameter goes inside the encrypted payload, and so do the fields of
`extra_body`. The per-call options never do: `base_url`, `api_key`, `security_tier`, and the
OpenAI SDK's `timeout`, `max_retries`, `extra_headers` (sent as checked HTTP headers) and
`extra_query` (the URL's query). Names the OpenAI SDK or an HTTP client uses for the transport
and which this one has no use for are refused with a TypeError rather than encrypted into the
payload by mistake. `NOMYO_BASE_URL` and `NOMYO_API_KEY` stand in for arguments not given.
Key generation starts when the object is built, so the first request does not pay for an
RSA-4096 key on its critical path.

`secure_response=True` (a per-call option, never sent) returns a `SecureAnswer` instead of the
dict: the answer's text stays in secure memory, handed out as read-only views, until the
caller closes it (nomyo/client/secure_answer.py).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from nomyo.client.core import CallOptions, SecureCompletionClient
from nomyo.client.secure_answer import SecureAnswer
from nomyo.client.transport import USE_DEFAULT
from nomyo.protocol.constants import DEFAULT_KEY_BITS, DEFAULT_TIMEOUT
from nomyo.protocol.keys import Password

if TYPE_CHECKING:  # the shapes type checkers see; at run time the answer is a plain dict
    from nomyo.openai.types import ChatCompletion

DEFAULT_BASE_URL = "https://api.nomyo.ai"
BASE_URL_ENV = "NOMYO_BASE_URL"
API_KEY_ENV = "NOMYO_API_KEY"
_CALL_OPTIONS = ("base_url", "api_key", "security_tier")
_TRANSPORT_OPTIONS = ("timeout", "max_retries", "extra_headers", "extra_query")
# Meant for an HTTP transport, never for the model: refused instead of encrypted into the payload.
_NOT_CHAT_PARAMETERS = ("headers", "default_headers", "query", "default_query", "http_client",
                        "idempotency_key", "allow_http", "ca_bundle", "key_dir", "proxies")


class SecureChatCompletion:
    """OpenAI-compatible secure chat completions (drop-in for the published class)."""

    def __init__(
        self,
        base_url: str | None = None,
        allow_http: bool = False,
        api_key: str | None = None,
        secure_memory: bool = True,
        key_dir: str | os.PathLike | None = None,
        max_retries: int = 2,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        key_size: int = DEFAULT_KEY_BITS,
        key_password: Password = None,
        key_rotation_interval: float | None = 24 * 3600,
        server_key_fingerprint: str | None = None,
        ca_bundle: str | None = None,
        attestation: str | None = None,
        expected_pcrs: Mapping[str, Mapping[Any, str]] | None = None,
        require_secure_memory: bool = False,
        debug: bool = False,
    ) -> None:
        if base_url is None:
            base_url = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV) or None
        self.client = SecureCompletionClient(
            router_url=base_url, allow_http=allow_http, secure_memory=secure_memory,
            max_retries=max_retries, timeout=timeout, key_size=key_size, key_dir=key_dir,
            key_password=key_password, key_rotation_interval=key_rotation_interval,
            server_key_fingerprint=server_key_fingerprint, ca_bundle=ca_bundle,
            require_secure_memory=require_secure_memory, attestation=attestation,
            expected_pcrs=expected_pcrs, debug=debug,
        )
        self.api_key = api_key
        self.client.prepare_keys()

    @overload
    async def create(self, model: str, messages: list[dict[str, Any]], *,
                     secure_response: Literal[True], **kwargs: Any) -> SecureAnswer: ...

    @overload
    async def create(self, model: str, messages: list[dict[str, Any]], *,
                     secure_response: Literal[False] = ..., **kwargs: Any) -> ChatCompletion: ...

    async def create(self, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        """Create an encrypted chat completion; returns the response dict with `_metadata`,
        or with `secure_response=True` a SecureAnswer (close it, or use `with`)."""
        payload, options = self._prepare(model, messages, kwargs)
        return await self.client.send_secure_request(
            payload, options["payload_id"], options["api_key"], options["security_tier"],
            base_url=options["base_url"], options=options["call"],
            secure_response=options["secure_response"],
        )

    async def acreate(self, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        """Alias of `create` (OpenAI naming)."""
        return await self.create(model, messages, **kwargs)

    @overload
    def create_sync(self, model: str, messages: list[dict[str, Any]], *,
                    secure_response: Literal[True], **kwargs: Any) -> SecureAnswer: ...

    @overload
    def create_sync(self, model: str, messages: list[dict[str, Any]], *,
                    secure_response: Literal[False] = ..., **kwargs: Any) -> ChatCompletion: ...

    def create_sync(self, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        """Blocking `create` for synchronous code (no event loop needed)."""
        payload, options = self._prepare(model, messages, kwargs)
        return self.client.send_secure_request_sync(
            payload, options["payload_id"], options["api_key"], options["security_tier"],
            base_url=options["base_url"], options=options["call"],
            secure_response=options["secure_response"],
        )

    def wait_for_keys(self) -> None:
        """Block until the key pair is made or loaded; raises what went wrong (a wrong key
        password, an unreadable key directory) now instead of at the first request."""
        self.client.wait_for_keys()

    def close(self) -> None:
        """Wipe key material and release connections; later calls raise DisposedError."""
        self.client.close()

    dispose = close

    def __enter__(self) -> SecureChatCompletion:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> SecureChatCompletion:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def attestation(self) -> str | None:
        """None, "verify" or "require"; changing it takes effect from the next request."""
        return self.client.attestation

    @attestation.setter
    def attestation(self, mode: str | None) -> None:
        self.client.attestation = mode

    @property
    def expected_pcrs(self) -> Mapping[str, Mapping[Any, str]] | None:
        return self.client.expected_pcrs

    @expected_pcrs.setter
    def expected_pcrs(self, pcrs: Mapping[str, Mapping[Any, str]] | None) -> None:
        self.client.expected_pcrs = pcrs

    def __repr__(self) -> str:
        return f"SecureChatCompletion({self.client.router_url!r})"

    def _prepare(self, model: str, messages: Any, kwargs: dict[str, Any]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split per-call options from the payload. The client checks tier, stream and
        closed state itself (the protocol's one chat-request check), before any work."""
        options: dict[str, Any] = {name: kwargs.pop(name, None) for name in _CALL_OPTIONS}
        options["secure_response"] = kwargs.pop("secure_response", False)
        if not isinstance(options["secure_response"], bool):
            raise TypeError("secure_response must be True or False")
        transport = {name: kwargs.pop(name) for name in _TRANSPORT_OPTIONS if name in kwargs}
        extra_body = kwargs.pop("extra_body", None)
        if not isinstance(messages, list):  # a TypeError, as the published signature implies
            raise TypeError("messages must be a list of message dicts")
        for name in _NOT_CHAT_PARAMETERS:
            if name in kwargs:
                raise TypeError(f"{name!r} is not a chat parameter and is not sent; for HTTP "
                                "headers use extra_headers=, for the query extra_query=")
        transport.setdefault("timeout", USE_DEFAULT)
        options["call"] = CallOptions.check(**transport)
        payload = {"model": model, "messages": messages, **kwargs}
        if extra_body is not None:
            if not isinstance(extra_body, Mapping) or not all(
                    isinstance(name, str) for name in extra_body):
                raise TypeError("extra_body must be a dict of request fields")
            twice = sorted(set(extra_body) & set(payload))
            if twice:
                raise TypeError(f"extra_body repeats {', '.join(twice)}: give each field once")
            payload.update(extra_body)
        if options["api_key"] is None:
            options["api_key"] = self.api_key
        options["payload_id"] = str(uuid.uuid4())
        return payload, options
