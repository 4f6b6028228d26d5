"""nomyo: end-to-end encrypted LLM chat completions on native secure memory.

Public names are resolved lazily so that `import nomyo` (e.g. in a container health check)
loads only the secure-memory layer, never the HTTP stack.
"""
from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import Any

from nomyo._version import __version__ as __version__

_EXPORTS = {
    # errors
    "NomyoError": "nomyo.errors",
    "ConfigurationError": "nomyo.errors",
    "SecurityError": "nomyo.errors",
    "SecureMemoryUnavailable": "nomyo.errors",
    "PackageError": "nomyo.errors",
    "DisposedError": "nomyo.errors",
    "AnswerFieldError": "nomyo.errors",
    "APIError": "nomyo.errors",
    "InvalidRequestError": "nomyo.errors",
    "ChatRequestError": "nomyo.errors",
    "AuthenticationError": "nomyo.errors",
    "ForbiddenError": "nomyo.errors",
    "RateLimitError": "nomyo.errors",
    "ServerError": "nomyo.errors",
    "ServiceUnavailableError": "nomyo.errors",
    "BadGatewayError": "nomyo.errors",
    "GatewayTimeoutError": "nomyo.errors",
    "APIConnectionError": "nomyo.errors",
    "APITimeoutError": "nomyo.errors",
    # secure memory
    "SecureBuffer": "nomyo.memory",
    "secure_bytearray": "nomyo.memory",
    "secure_bytes": "nomyo.memory",
    "get_memory_protection_info": "nomyo.memory",
    "enable_secure_memory": "nomyo.memory",
    "disable_secure_memory": "nomyo.memory",
    "harden_process": "nomyo.memory",
    "MemoryProtectionLevel": "nomyo.memory",
    # client
    "SecureCompletionClient": "nomyo.client.core",
    "SecureChatCompletion": "nomyo.client.facade",
    "SecureAnswer": "nomyo.client.secure_answer",
    "SecureToolCall": "nomyo.client.secure_answer",
    # attestation
    "verify_tpm_attestation": "nomyo.attestation",
    "AttestationResult": "nomyo.attestation",
}

__all__ = list(_EXPORTS)

# A library logs, an application decides where to: without this, Python's last-resort handler
# would print the client's retry warnings to stderr of an application that never set logging up.
logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nomyo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps `nomyo.SecureCompletionClient` the class when the published client's submodule
    of the same name is imported (the import system would rebind the attribute to it)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "SecureCompletionClient" and isinstance(value, types.ModuleType):
            return  # the submodule stays importable through sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
