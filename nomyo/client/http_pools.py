"""Connection pools whose connections send a small request in a single write and read
their answers in quick-ACK mode.

urllib3 writes the header block and the body with two separate sends. With TCP_NODELAY
that makes two segments (two TLS records over HTTPS): the server wakes for the headers,
finds no body yet and waits again, which costs about 50 us per request on loopback. Here
the header block of a request with a small body is held back and leaves together with the
body. Only ciphertext and headers pass through; larger bodies go out as urllib3 sends them.

Reading: a server that writes an answer's head and body in two sends without TCP_NODELAY
(Python's `http.server`, many others) holds the second segment until the first is ACKed
(Nagle), and on a kept-alive connection Linux delays that ACK by about 40 ms. Every read of
an answer here first puts the socket in quick-ACK mode (TCP_QUICKACK, which the kernel clears
again by itself, hence once per read), so the first segment is ACKed at once. TLS sockets
read through the same path (TCP_QUICKACK acts on the TCP socket under the TLS layer).
"""
from __future__ import annotations

import errno
import http.client
import io
import socket
import ssl
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

ONE_WRITE_MAX = 64 * 1024  # larger bodies are not copied behind their headers
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only; elsewhere reads are plain


class _QuickAckReader(io.RawIOBase):
    """The raw reader under an answer's buffered file: quick-ACK mode before every receive.
    It reads through the socket's own raw file, which holds a reference on the socket, so an
    answer that closes the connection can still be read to its end."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # type: ignore[arg-type]
        except OSError:  # not a TCP socket (a test double): read plainly
            pass
        return self._raw.readinto(buffer)

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        self._raw.close()
        super().close()


class _QuickAckSocket:
    """What `http.client.HTTPResponse` asks of a socket: only `makefile("rb")`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        if mode != "rb":  # pragma: no cover - http.client only reads
            raise ValueError(mode)
        return io.BufferedReader(_QuickAckReader(self._sock))


class QuickAckResponse(http.client.HTTPResponse):
    """An answer whose every socket read is preceded by TCP_QUICKACK."""

    def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(_QuickAckSocket(sock), *args, **kwargs)


class RequestNotSent(ConnectionError):
    """A request failed while it was being written, so the server cannot have acted on it
    (it never had the whole request); safe to send again. Raised by the connection in
    place of the read or write error that followed the failed write."""


# The write errors urllib3 swallows so that an early answer can still be read.
_SWALLOWED = (errno.EPIPE, errno.ECONNRESET, errno.EPROTOTYPE)


class _OneWrite:
    """Mixin for urllib3 connections: the first write of a request with a small body (the
    header block) is held and prepended to the next one (the body); answers are read in
    quick-ACK mode."""

    if _QUICKACK is not None:
        response_class = QuickAckResponse

    _hold = False
    _held: bytes | None = None
    _write_failed = False

    def request(self, method: str, url: str, body: Any = None, headers: Any = None,
                **kwargs: Any) -> None:
        self._write_failed = False
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
        try:
            super().send(data)  # type: ignore[misc]
        except OSError as err:
            self._write_failed = True
            if err.errno in _SWALLOWED:  # urllib3 goes on to read an early answer, if any
                raise
            raise RequestNotSent(f"request not sent ({type(err).__name__})") from err

    def getresponse(self) -> Any:
        try:
            return super().getresponse()  # type: ignore[misc]
        except (OSError, http.client.HTTPException) as err:
            if self._write_failed:  # no answer to a request the server never had whole
                raise RequestNotSent(f"request not sent ({type(err).__name__})") from err
            if isinstance(err, ssl.SSLError):  # after the request went out: not a handshake
                raise ConnectionAbortedError(f"TLS failure reading the answer ({err.reason})"
                                             ) from err
            raise


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
