"""Process-wide secure-memory switches: the enable flag and fail-closed mode."""
from __future__ import annotations

import os

from nomyo.errors import SecureMemoryUnavailable

_TRUE = {"1", "true", "yes", "on"}
_enabled = True


def fallback_forced() -> bool:
    """NOMYO_MEMORY_BACKEND=fallback: use the pure-Python backends (for tests and diagnosis)."""
    return os.environ.get("NOMYO_MEMORY_BACKEND", "").strip().lower() == "fallback"


def required() -> bool:
    """Fail-closed mode: NOMYO_REQUIRE_SECURE_MEMORY=1 (read on every call: it may be set late)."""
    return os.environ.get("NOMYO_REQUIRE_SECURE_MEMORY", "").strip().lower() in _TRUE


def secure_private_keys() -> bool:
    """NOMYO_SECURE_PRIVATE_KEYS=1: hold RSA private keys in OpenSSL's secure heap (read once,
    at import). Off by default: with the system's OpenSSL 3.0 an RSA-4096 decrypt costs
    about 2.4x what `cryptography`'s bundled OpenSSL takes (SECURITY.md has the figures)."""
    return os.environ.get("NOMYO_SECURE_PRIVATE_KEYS", "").strip().lower() in _TRUE


def enabled() -> bool:
    """Whether new secure buffers are locked in RAM (they are always guarded and wiped)."""
    return _enabled


def enable_secure_memory() -> None:
    """Lock new secure buffers in RAM again (the default)."""
    global _enabled
    _enabled = True


def disable_secure_memory() -> None:
    """Stop locking new buffers (they are still wiped); refused in fail-closed mode."""
    global _enabled
    if required():
        raise SecureMemoryUnavailable(
            "secure memory cannot be disabled while NOMYO_REQUIRE_SECURE_MEMORY=1 is set"
        )
    _enabled = False
