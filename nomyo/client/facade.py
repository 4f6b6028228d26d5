"""`SecureChatCompletion`: the OpenAI-style facade over `SecureCompletionClient`.

Every OpenAI chat parameter goes inside the encrypted payload; `base_url`, `api_key` and
`security_tier` are per-call options that never do. Key generation starts when the object is
built, so the first request does not pay for an RSA-4096 key on its critical path.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

from nomyo.client.core import SecureCompletionClient
from nomyo.protocol.constants import DEFAULT_KEY_BITS, DEFAULT_TIMEOUT
from nomyo.protocol.keys import Password

_CALL_OPTIONS = ("base_url", "api_key", "security_tier")


class SecureChatCompletion:
    """OpenAI-compatible secure chat completions (drop-in for the published class)."""

    def __init__(
        self,
        base_url: str = "https://api.nomyo.ai",
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

    async def create(self, model: str, messages: list[dict[str, Any]], **kwargs: Any
                     ) -> dict[str, Any]:
        """Create an encrypted chat completion; returns the response dict with `_metadata`."""
        payload, options = self._prepare(model, messages, kwargs)
        return await self.client.send_secure_request(
            payload, options["payload_id"], options["api_key"], options["security_tier"],
            base_url=options["base_url"],
        )

    async def acreate(self, model: str, messages: list[dict[str, Any]], **kwargs: Any
                      ) -> dict[str, Any]:
        """Alias of `create` (OpenAI naming)."""
        return await self.create(model, messages, **kwargs)

    def create_sync(self, model: str, messages: list[dict[str, Any]], **kwargs: Any
                    ) -> dict[str, Any]:
        """Blocking `create` for synchronous code (no event loop needed)."""
        payload, options = self._prepare(model, messages, kwargs)
        return self.client.send_secure_request_sync(
            payload, options["payload_id"], options["api_key"], options["security_tier"],
            base_url=options["base_url"],
        )

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
        options = {name: kwargs.pop(name, None) for name in _CALL_OPTIONS}
        if not isinstance(messages, list):  # a TypeError, as the published signature implies
            raise TypeError("messages must be a list of message dicts")
        if options["api_key"] is None:
            options["api_key"] = self.api_key
        options["payload_id"] = str(uuid.uuid4())
        return {"model": model, "messages": messages, **kwargs}, options
