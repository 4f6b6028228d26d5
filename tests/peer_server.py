"""An independent, minimal implementation of the server side of docs/protocol.md, for tests.

Written from the protocol text with `cryptography` directly; it deliberately shares no code
with `nomyo` (no `nomyo.protocol.envelope`, no `nomyo.protocol.keys`), so a client bug cannot
be mirrored by the same bug on the server. Fault injection: scripted replies (status, headers,
body) answered before a request is processed, dropped connections, server-key rotation. It
records what it saw (headers, request plaintexts, AES keys of both directions, response
plaintexts) so tests can check the wire and scan a client process for residues.

Run standalone: `python tests/peer_server.py` prints its URL and serves until killed.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = "1.0"
ALGORITHM = "hybrid-aes256-rsa4096"
MAX_PLAINTEXT = 10 * 1024 * 1024
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
TIERS = ("standard", "high", "maximum")
UNDECRYPTABLE = "Could not decrypt the package with the server key"


class ProtocolFault(Exception):
    """A request the peer refuses: HTTP status and detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def seal_for(public_key: rsa.RSAPublicKey, plaintext: bytes) -> tuple[bytes, bytes]:
    """Encrypt plaintext to public_key per docs/protocol.md; returns (package JSON, AES key)."""
    key = AESGCM.generate_key(256)
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plaintext, None)
    package = {
        "version": VERSION,
        "algorithm": ALGORITHM,
        "encrypted_payload": {
            "ciphertext": _b64(sealed[:-16]),
            "nonce": _b64(nonce),
            "tag": _b64(sealed[-16:]),
        },
        "encrypted_aes_key": _b64(public_key.encrypt(key, OAEP)),
        "key_algorithm": "RSA-OAEP-SHA256",
        "payload_algorithm": "AES-256-GCM",
        "processed_at": int(time.time()),
    }
    return json.dumps(package).encode(), key


def open_with(private_key: rsa.RSAPrivateKey, body: bytes) -> tuple[bytes, bytes]:
    """Decrypt a request package; returns (plaintext, AES key) or raises ProtocolFault."""
    try:
        package = json.loads(body)
        if package["version"] != VERSION or package["algorithm"] != ALGORITHM:
            raise ProtocolFault(400, "Unsupported version or algorithm")
        enc = package["encrypted_payload"]
        ciphertext = base64.b64decode(enc["ciphertext"], validate=True)
        nonce = base64.b64decode(enc["nonce"], validate=True)
        tag = base64.b64decode(enc["tag"], validate=True)
        wrapped = base64.b64decode(package["encrypted_aes_key"], validate=True)
    except (ValueError, KeyError, TypeError) as err:
        raise ProtocolFault(400, "Malformed encrypted package") from err
    try:
        key = private_key.decrypt(wrapped, OAEP)
        plaintext = AESGCM(key).decrypt(nonce, ciphertext + tag, None)
    except Exception as err:  # any crypto failure: the key did not fit or data was tampered
        raise ProtocolFault(400, UNDECRYPTABLE) from err
    if len(plaintext) > MAX_PLAINTEXT:
        raise ProtocolFault(400, "Plaintext too large")
    return plaintext, key


def echo_completion(request: dict[str, Any], payload_id: str, tier: str | None,
                    reply: Any = None) -> dict[str, Any]:
    """An OpenAI chat.completion answering with the last user message (tool call if tools),
    or with what `reply(message)` makes of it."""
    messages = request.get("messages") or []
    last = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    content = last.get("content", "")
    if reply is not None:
        content = reply(content)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    finish = "stop"
    if request.get("tools"):
        name = request["tools"][0]["function"]["name"]
        message = {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_" + uuid.uuid4().hex[:12], "type": "function",
            "function": {"name": name, "arguments": json.dumps({"echo": content})}}]}
        finish = "tool_calls"
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", ""),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        "_metadata": {
            "payload_id": payload_id, "processed_at": int(time.time()), "is_encrypted": True,
            "response_status": "success", "security_tier": tier or "standard",
            "memory_protection": {"platform": "linux", "memory_locking": False,
                                  "secure_zeroing": False, "core_dump_prevention": False},
        },
    }


HOLD_LIMIT = 30.0  # seconds a held POST waits for the others at most

class PeerServer:
    """The peer endpoint on a loopback ephemeral port, served from a background thread."""

    def __init__(self, key_size: int = 2048, api_key: str | None = None,
                 record: bool = True, nodelay: bool = True, port: int = 0,
                 ssl_context: Any = None) -> None:
        self.key_size = key_size
        self.api_key = api_key
        self.record = record
        self.faults: deque = deque()
        self.received: list[dict[str, Any]] = []
        self.request_plaintexts: list[bytes] = []
        self.response_plaintexts: list[bytes] = []
        self.aes_keys: list[bytes] = []
        self.key_fetches = 0
        self.delay = 0.0  # seconds each POST is held before it is answered
        self.key_delay = 0.0  # seconds each public-key GET is held
        self.attestation: dict[str, Any] | None = None  # served as _metadata.tpm_attestation
        # the answer's text made from the user's message instead of the echo (e.g. text the
        # client never saw, for residue scans)
        self.reply: Any = None
        self.in_flight = 0
        self.max_in_flight = 0
        # POSTs wait until this many have been in flight at once (or HOLD_LIMIT seconds
        # pass): a test of concurrency that counts, rather than races a delay
        self.hold_until = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self.rotate_key()
        # nodelay=False: the stock http.server behaviour (head and body in two sends, Nagle
        # on), which many real servers share and which a client must not stall on.
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler(nodelay))
        self.httpd.daemon_threads = True
        scheme = "http"
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def rotate_key(self) -> None:
        """Switch to a fresh server key pair (clients holding the old public key now fail)."""
        self.private_key = rsa.generate_private_key(65537, self.key_size)
        self.public_pem = self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def inject(self, status: int, headers: dict[str, str] | None = None,
               body: bytes | dict | None = None, times: int = 1,
               after_open: bool = False) -> None:
        """Answer the next `times` POSTs with this reply instead of processing them;
        after_open: open and record the request first (its plaintext and AES key)."""
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        for _ in range(times):
            self.faults.append((status, headers or {}, body if body is not None else b"{}",
                                after_open))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> PeerServer:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handle_post(self, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        """Process one secure-completion POST; returns (status, headers, body)."""
        if headers.get("content-type") != "application/octet-stream":
            raise ProtocolFault(400, "Content-Type must be application/octet-stream")
        payload_id = headers.get("x-payload-id", "")
        if not payload_id or len(payload_id) > 128 or not payload_id.isprintable():
            raise ProtocolFault(400, "Missing or invalid X-Payload-ID")
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            raise ProtocolFault(401, "Invalid API key")
        tier = headers.get("x-security-tier")
        if tier is not None and tier not in TIERS:
            raise ProtocolFault(400, "Invalid security tier")
        try:
            client_key = serialization.load_pem_public_key(
                unquote(headers.get("x-public-key", "")).encode())
        except ValueError as err:
            raise ProtocolFault(400, "Invalid X-Public-Key") from err
        if not isinstance(client_key, rsa.RSAPublicKey) or client_key.key_size < 2048:
            raise ProtocolFault(400, "Client key must be RSA >= 2048 bits")
        plaintext, request_key = open_with(self.private_key, body)
        request = json.loads(plaintext)
        if request.get("stream"):
            raise ProtocolFault(400, "Streaming is not supported")
        if tier == "maximum" and str(request.get("model", "")).startswith("forbidden"):
            raise ProtocolFault(403, "Model not allowed for the requested security tier")
        completion = echo_completion(request, payload_id, tier, self.reply)
        if self.attestation is not None:
            completion["_metadata"]["tpm_attestation"] = self.attestation
        answer = json.dumps(completion).encode()
        package, response_key = seal_for(client_key, answer)
        if self.record:
            with self._lock:
                self.request_plaintexts.append(plaintext)
                self.response_plaintexts.append(answer)
                self.aes_keys.extend((request_key, response_key))
        return 200, {"Content-Type": "application/json"}, package

    def _handler(self, nodelay: bool) -> type[BaseHTTPRequestHandler]:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = nodelay

            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, headers: dict, body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path != "/pki/public_key":
                    return self._reply(404, {}, b'{"detail": "Not found"}')
                peer.key_fetches += 1
                if peer.key_delay:
                    time.sleep(peer.key_delay)
                self._reply(200, {"Content-Type": "text/plain"}, peer.public_pem)

            def do_POST(self) -> None:
                with peer._arrived:
                    peer.in_flight += 1
                    peer.max_in_flight = max(peer.max_in_flight, peer.in_flight)
                    peer._arrived.notify_all()
                    peer._arrived.wait_for(lambda: peer.max_in_flight >= peer.hold_until,
                                           HOLD_LIMIT)
                try:
                    self._post()
                finally:
                    with peer._lock:
                        peer.in_flight -= 1

            def _post(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                peer.received.append({"headers": headers, "size": len(body), "path": self.path,
                                      "client": self.client_address})
                if peer.delay:
                    time.sleep(peer.delay)
                if urlsplit(self.path).path != "/v1/chat/secure_completion":
                    return self._reply(404, {}, b'{"detail": "Secure inference not enabled"}')
                if peer.faults:
                    *fault, after_open = peer.faults.popleft()
                    if fault[0] == "drop":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return None
                    if after_open:
                        plaintext, key = open_with(peer.private_key, body)
                        with peer._lock:
                            peer.request_plaintexts.append(plaintext)
                            peer.aes_keys.append(key)
                    return self._reply(*fault)
                try:
                    self._reply(*peer.handle_post(headers, body))
                except ProtocolFault as fault:
                    self._reply(fault.status, {"Content-Type": "application/json"},
                                json.dumps({"detail": fault.detail}).encode())

        return Handler


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="the independent protocol peer")
    parser.add_argument("--nagle", action="store_true",
                        help="leave Nagle on (http.server's default): two sends, no NODELAY")
    parser.add_argument("--key-size", type=int, default=2048)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--certfile", help="serve HTTPS with this PEM (cert and key)")
    args = parser.parse_args()
    context = None
    if args.certfile:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certfile)
    server = PeerServer(key_size=args.key_size, record=False, nodelay=not args.nagle,
                        port=args.port, ssl_context=context)
    print(server.url, flush=True)
    threading.Event().wait()
