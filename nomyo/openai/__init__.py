"""The OpenAI ecosystem over end-to-end encryption (docs/openai.md).

`nomyo proxy` serves the OpenAI routes on loopback (`nomyo.openai.wsgi`); the httpx
transports (`nomyo.openai.transport`, extra `nomyo[openai]`) do the same in process;
`nomyo.openai.types` has TypedDicts of the request and answer shapes. Nothing here is
imported by `import nomyo`.
"""
from __future__ import annotations

from typing import Any

__all__ = ["AsyncNomyoTransport", "NomyoTransport"]


def __getattr__(name: str) -> Any:
    # httpx is imported only when a transport is asked for
    if name in __all__:
        from nomyo.openai import transport

        return getattr(transport, name)
    raise AttributeError(f"module 'nomyo.openai' has no attribute {name!r}")
