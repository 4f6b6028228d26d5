"""Connection pools whose connections send a small request in a single write.

urllib3 writes the header block and the body with two separate sends. With TCP_NODELAY
that makes two segments (two TLS records over HTTPS): the server wakes for the headers,
finds no body yet and waits again, which costs about 50 us per request on loopback. Here
the header block of a request with a small body is held back and leaves together with the
body. Only ciphertext and headers pass through; larger bodies go out as urllib3 sends them.
"""
from __future__ import annotations

from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

ONE_WRITE_MAX = 64 * 1024  # larger bodies are not copied behind their headers


class _OneWrite:
    """Mixin for urllib3 connections: the first write of a request with a small body (the
    header block) is held and prepended to the next one (the body)."""

    _hold = False
    _held: bytes | None = None

    def request(self, method: str, url: str, body: Any = None, headers: Any = None,
                **kwargs: Any) -> None:
        self._hold = isinstance(body, (bytes, bytearray)) and 0 < len(body) <= ONE_WRITE_MAX
        try:
            super().request(method, url, body=body, headers=headers, **kwargs)  # type: ignore[misc]
            if self._held is not None:  # nothing followed the header block: send it alone
                super().send(self._held)  # type: ignore[misc]
        finally:
            self._hold, self._held = False, None

    def send(self, data: Any) -> None:
        if self._hold:
            if self._held is None:
                self._held = data
                return
            data = self._held + data
            self._hold, self._held = False, None
        super().send(data)  # type: ignore[misc]


class OneWriteHTTPConnection(_OneWrite, HTTPConnection):
    pass


class OneWriteHTTPSConnection(_OneWrite, HTTPSConnection):
    pass


class OneWriteHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = OneWriteHTTPConnection


class OneWriteHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = OneWriteHTTPSConnection


class OneWriteAdapter(HTTPAdapter):
    """requests' adapter, with pools of one-write connections for direct connections
    (requests through a proxy keep urllib3's own connections)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        # a new dict: the manager's default is urllib3's module-level one
        self.poolmanager.pool_classes_by_scheme = {
            "http": OneWriteHTTPConnectionPool, "https": OneWriteHTTPSConnectionPool,
        }
