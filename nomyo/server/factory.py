"""Build a `SecureCompletionApp` from plain options (shared by the CLI, tests and WSGI)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nomyo.memory import foreign_frees, get_memory_protection_info
from nomyo.protocol.constants import DEFAULT_BACKEND_TIMEOUT, DEFAULT_KEY_BITS, MAX_PACKAGE_BYTES
from nomyo.protocol.keys import KeyPair
from nomyo.server.app import AppOptions, SecureCompletionApp
from nomyo.server.backends import create_backend
from nomyo.server.policy import ApiKeys, AuthThrottle, RateLimiter, TierPolicy, check_private_file

logger = logging.getLogger("nomyo.server")


def create_app(
    *,
    backend: str = "echo",
    key: KeyPair | None = None,
    key_file: str | Path | None = None,
    key_password: str | None = None,
    key_bits: int = DEFAULT_KEY_BITS,
    api_keys: ApiKeys | Iterable[str] | None = None,
    api_key_file: str | Path | None = None,
    tier_policy: TierPolicy | Mapping[str, Any] | None = None,
    tier_policy_file: str | Path | None = None,
    rate_limit: float | None = None,
    max_request_bytes: int = MAX_PACKAGE_BYTES,
    backend_timeout: float = DEFAULT_BACKEND_TIMEOUT,
    attestor: Any = None,
) -> SecureCompletionApp:
    """A ready application; the server key is `key`, loaded from `key_file`, or ephemeral.

    Raises ValueError (one-line message) for any unusable option, and
    SecureMemoryUnavailable in fail-closed mode when a protection it needs is missing.
    """
    if sum(x is not None for x in (api_keys, api_key_file)) > 1:
        raise ValueError("give api_keys or api_key_file, not both")
    if sum(x is not None for x in (tier_policy, tier_policy_file)) > 1:
        raise ValueError("give tier_policy or tier_policy_file, not both")
    if max_request_bytes <= 0:
        raise ValueError("max_request_bytes must be positive")
    if not backend_timeout > 0:
        raise ValueError("backend timeout must be positive")
    keys_ = ApiKeys.from_file(api_key_file) if api_key_file is not None else _api_keys(api_keys)
    policy = (
        TierPolicy.from_file(tier_policy_file)
        if tier_policy_file is not None
        else _tier_policy(tier_policy)
    )
    options = AppOptions(
        api_keys=keys_,
        tier_policy=policy,
        # built (and validated: positive, finite) before the backend and key are made
        rate_limiter=RateLimiter(rate_limit) if rate_limit is not None else None,
        max_request_bytes=max_request_bytes,
        attestor=attestor,
        auth_throttle=AuthThrottle() if keys_ is not None else None,
        memory_policy=_memory_policy,
    )
    # fail-closed mode (NOMYO_REQUIRE_SECURE_MEMORY=1) refuses at start, not once per request
    foreign_frees.require_wiped()
    inference = create_backend(backend, timeout=backend_timeout)
    if key is None:
        if key_file is not None:
            check_private_file(key_file)
            key = KeyPair.load(key_file, key_password)
        else:
            logger.info("generating an ephemeral RSA-%d server key", key_bits)
            key = KeyPair.generate(key_bits)
    logger.info("server key fingerprint (SHA-256 of the public key) %s", key.fingerprint)
    return SecureCompletionApp(key, inference, options)


def _memory_policy() -> str | None:
    """For /ready: a problem when plaintext would be handled with no memory protection."""
    info = get_memory_protection_info()
    if info.get("protection_level") == "none":
        return "memory protection: none (see nomyo doctor)"
    return None


def _api_keys(value: ApiKeys | Iterable[str] | None) -> ApiKeys | None:
    if value is None or isinstance(value, ApiKeys):
        return value
    if isinstance(value, str):
        raise TypeError("api_keys must be an iterable of keys, not one string")
    return ApiKeys(value)


def _tier_policy(value: TierPolicy | Mapping[str, Any] | None) -> TierPolicy | None:
    if value is None or isinstance(value, TierPolicy):
        return value
    return TierPolicy(value)
