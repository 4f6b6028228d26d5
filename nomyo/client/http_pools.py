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


MAX_HEADER_LINE = 65536
MAX_HEADERS = 100


def read_header_block(fp: Any) -> http.client.HTTPMessage:
    """The header lines up to the blank line, as the `HTTPMessage` http.client would build.

    http.client hands them to the `email` package's feed parser, which costs about 50 us per
    answer (a twentieth of the client's cryptography): here each line is split once. Folded
    lines (obsolete, but legal) continue the previous value; a line with no colon, an
    overlong line or too many lines is refused as http.client refuses the last two.
    """
    message = http.client.HTTPMessage()
    name = value = None
    for _ in range(MAX_HEADERS + 1):
        line = fp.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            if name is not None:
                message[name] = value
            return message
        text = line.decode("iso-8859-1").rstrip("\r\n")
        if text[:1] in (" ", "\t") and name is not None:
            value = f"{value} {text.strip()}"
            continue
        if name is not None:
            message[name] = value
        name, colon, value = text.partition(":")
        if not colon or not name or name != name.strip():
            raise http.client.HTTPException("malformed header line in the answer")
        value = value.strip()
    raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")


class QuickAckResponse(http.client.HTTPResponse):
    """An answer whose every socket read is preceded by TCP_QUICKACK, and whose header block
    is parsed by `read_header_block`."""

    def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(_QuickAckSocket(sock), *args, **kwargs)

    def begin(self) -> None:
        if self.headers is not None:  # already begun
            return
        while True:  # interim 100 Continue answers: their headers are skipped
            version, status, reason = self._read_status()  # type: ignore[attr-defined]
            if status != http.client.CONTINUE:
                break
            read_header_block(self.fp)
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = read_header_block(self.fp)
        coding = self.headers.get("transfer-encoding")
        self.chunked = bool(coding) and coding.lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()  # type: ignore[attr-defined]
        self.length = None
        declared = self.headers.get("content-length")
        if declared and not self.chunked:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            self.length = length if length >= 0 else None
        bodiless = status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED)
        if bodiless or 100 <= status < 200 or self._method == "HEAD":  # type: ignore[attr-defined]
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True  # the body ends where the connection does


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
