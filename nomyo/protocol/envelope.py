"""Protocol 1.0 packages: seal and open, in both directions (see docs/protocol.md).

Where each secret lives (every buffer comes from a `Workspace`):
- the AES key is born in secure memory (getrandom) and wiped before `seal` returns;
- plaintext is encrypted straight from the caller's buffer and decrypted straight into a
  secure buffer (`encrypt_into` / `decrypt_into`), which the caller closes;
- the unwrapped AES key, which RSA-OAEP can only return as `bytes`, is copied into secure
  memory and the `bytes` object is zeroed in place at once with `wipe_bytes_owned`;
- every seal and open ends with `scrub()`: the vector registers are cleared and the stack
  below zeroed, where copies of the key and plaintext are otherwise left behind.
By default every secret gets a new buffer; a `Workspace` (nomyo.protocol.workspace) lets one
exchange reuse its buffers instead.
Structural problems raise `PackageError` (a `ValueError`); anything that fails authentication
raises `SecurityError` with one fixed message, so an attacker learns nothing from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nomyo.errors import PackageError, SecurityError
from nomyo.memory import SecureBuffer, adopt_bytes, foreign_frees, secure_json, wipe_bytes_owned
from nomyo.memory.binding import scrub
from nomyo.protocol import b64, keys
from nomyo.protocol.constants import MAX_PACKAGE_BYTES, MAX_PLAINTEXT_BYTES
from nomyo.protocol.workspace import FRESH, Workspace

VERSION = "1.0"
ALGORITHM = "hybrid-aes256-rsa4096"
KEY_ALGORITHM = "RSA-OAEP-SHA256"
PAYLOAD_ALGORITHM = "AES-256-GCM"

TAG_SEPARATE = "separate"  # published Python client and router: `tag` field of its own
TAG_APPENDED = "appended"  # nomyo-js: 16-byte tag appended to `ciphertext`, no `tag` field
TAG_LAYOUTS = (TAG_SEPARATE, TAG_APPENDED)

NONCE_BYTES = 12
TAG_BYTES = 16
AES_KEY_BYTES = 32
AUTH_FAILED = "Decryption failed: integrity check or authentication failed"

_OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)

PublicKeyLike = rsa.RSAPublicKey | str | bytes

# before any key is unwrapped: cryptography's RSA decrypt leaves it in a block it frees
foreign_frees.wipe_cryptography_frees()


@dataclass(frozen=True)
class PackageInfo:
    """What a package said about itself, besides its plaintext."""

    tag_layout: str
    processed_at: float | None
    algorithm: str




@dataclass(frozen=True)
class Opened(PackageInfo):
    """An opened package; `plaintext` is a SecureBuffer the caller must close (or use `with`).
    Closing hands it back to the workspace it came from, which wipes (and may reuse) it."""

    plaintext: SecureBuffer
    release: Callable[[SecureBuffer], None] = field(default=FRESH.done, repr=False)

    @property
    def info(self) -> PackageInfo:
        return PackageInfo(self.tag_layout, self.processed_at, self.algorithm)

    def close(self) -> None:
        self.release(self.plaintext)

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Opened(tag_layout={self.tag_layout!r}, plaintext=<{len(self.plaintext)} bytes>)"


def seal(
    plaintext: Any,
    recipient_public_key: PublicKeyLike,
    *,
    tag_layout: str = TAG_SEPARATE,
    processed_at: float | None = None,
    workspace: Workspace = FRESH,
) -> bytes:
    """Encrypt `plaintext` (any buffer, normally a SecureBuffer) to the recipient's RSA key.

    Returns the package as UTF-8 JSON bytes; `processed_at` (response direction) is added
    at top level when given. The AES key is born in the workspace's key buffer.
    """
    if tag_layout not in TAG_LAYOUTS:
        raise ValueError(f"tag_layout must be one of {TAG_LAYOUTS}, not {tag_layout!r}")
    public_key = keys.load_public_key(recipient_public_key)
    with _byte_view(plaintext) as data:
        size = data.nbytes
        if size > MAX_PLAINTEXT_BYTES:
            raise PackageError(
                f"plaintext is {size} bytes; the protocol allows at most {MAX_PLAINTEXT_BYTES}"
            )
        if size == 0:
            raise PackageError("empty plaintext: nothing to seal")
        nonce = os.urandom(NONCE_BYTES)
        sealed = bytearray(size + TAG_BYTES)  # ciphertext || tag: not secret
        foreign_frees.require_wiped(workspace.require)  # AESGCM copies the key we make here
        aes_key = workspace.key(AES_KEY_BYTES)
        try:
            aes_key.fill_random()
            with memoryview(aes_key) as key_view:
                AESGCM(key_view).encrypt_into(nonce, data, None, sealed)
                wrapped = _wrap_key(key_view, public_key)
        finally:
            workspace.done(aes_key)
            scrub()  # AESGCM's key setup and our copies leave the key in registers/stack

    ciphertext = sealed if tag_layout == TAG_APPENDED else memoryview(sealed)[:size]
    fields = [(b"ciphertext", ciphertext), (b"nonce", nonce)]
    if tag_layout == TAG_SEPARATE:
        fields.append((b"tag", memoryview(sealed)[size:]))
    return _package_json(fields, wrapped, processed_at)


_PACKAGE_HEAD = (
    f'{{"version":{json.dumps(VERSION)},"algorithm":{json.dumps(ALGORITHM)},'
    '"encrypted_payload":{'
).encode("ascii")
_PACKAGE_KEY = b'},"encrypted_aes_key":"'
_PACKAGE_TAIL = (
    f'","key_algorithm":{json.dumps(KEY_ALGORITHM)},'
    f'"payload_algorithm":{json.dumps(PAYLOAD_ALGORITHM)}'
).encode("ascii")


def _package_json(payload_fields: list[tuple[bytes, Any]], wrapped: bytes,
                  processed_at: float | None) -> bytes:
    """The package as compact JSON, joined from base64 pieces (which never need escaping):
    json.dumps would re-scan every byte of the ciphertext (about 40 ms for 8 MiB), and the
    native codec encodes about 8x faster than binascii."""
    parts = [_PACKAGE_HEAD]
    for i, (name, value) in enumerate(payload_fields):
        parts += [b',"' if i else b'"', name, b'":"', b64.encode(value), b'"']
    parts += [_PACKAGE_KEY, b64.encode(wrapped), _PACKAGE_TAIL]
    if processed_at is not None:
        parts += [b',"processed_at":', json.dumps(processed_at, allow_nan=False).encode("ascii")]
    parts.append(b"}")
    return b"".join(parts)


def open_package(package: Any, private_key: Any, *, workspace: Workspace = FRESH) -> Opened:
    """Authenticate and decrypt a package with our RSA private key (or a `keys.KeyPair`).

    Accepts both tag layouts; the returned `Opened.tag_layout` tells which one was used so
    that an answer can be sealed the same way. The plaintext lands in the workspace's
    plaintext slot (by default a new buffer).
    """
    fields = _parse(package)
    key = keys.private_key_of(private_key)
    ciphertext_and_tag = fields["ciphertext_and_tag"]
    size = len(ciphertext_and_tag) - TAG_BYTES
    plaintext = workspace.plaintext(size)
    try:
        aes_key = _unwrap_key(fields["encrypted_aes_key"], key, workspace)
        try:
            with memoryview(aes_key) as key_view, memoryview(plaintext) as out:
                cipher = AESGCM(key_view)
                try:
                    cipher.decrypt_into(fields["nonce"], ciphertext_and_tag, None, out)
                except InvalidTag:  # the one verdict on the tag; nothing else is relabelled
                    raise SecurityError(AUTH_FAILED) from None
        finally:
            workspace.done(aes_key)
    except BaseException:
        workspace.done(plaintext)  # may hold unauthenticated bytes: wipe them on every failure
        raise
    finally:
        scrub()  # the key and plaintext passed through registers, some spilled to the stack
    return Opened(fields["tag_layout"], fields["processed_at"], fields["algorithm"], plaintext,
                  workspace.done)


def seal_json(obj: Any, recipient_public_key: PublicKeyLike, *, workspace: Workspace = FRESH,
              **kwargs: Any) -> bytes:
    """Serialise `obj` into secure memory and seal it; see `seal` for the keywords."""
    plaintext = secure_json.dumps(obj, workspace.plaintext)
    try:
        return seal(plaintext, recipient_public_key, workspace=workspace, **kwargs)
    finally:
        workspace.done(plaintext)


def open_json(package: Any, private_key: Any, *, workspace: Workspace = FRESH
              ) -> tuple[Any, PackageInfo]:
    """Open a package and parse its JSON plaintext; the plaintext buffer is wiped before return."""
    with open_package(package, private_key, workspace=workspace) as opened:
        # secure_json raises PackageError itself, naming position but never content
        return secure_json.loads(opened.plaintext), opened.info


def _wrap_key(key_view: memoryview, public_key: rsa.RSAPublicKey) -> bytes:
    # cryptography's RSA encrypt only takes `bytes`: make the one copy it forces on us,
    # and zero it in place right after use (the list holds its one reference).
    key_copy = [bytes(key_view)]
    try:
        return public_key.encrypt(key_copy[0], _OAEP)
    finally:
        wipe_bytes_owned(key_copy)


def _rsa_decrypt(wrapped: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """cryptography's ValueError from decrypt is its verdict on the wrapped key, the one error
    turned into an integrity failure; errors of ours after it (copying, wiping) are not.
    Its modulus-sized result buffer, the AES key at its start, is zeroed when freed
    (nomyo.memory.foreign_frees)."""
    try:
        return private_key.decrypt(wrapped, _OAEP)
    except ValueError:
        raise SecurityError(AUTH_FAILED) from None


def _unwrap_key(wrapped: bytes, private_key: keys.PrivateKey, workspace: Workspace
                ) -> SecureBuffer:
    """The AES key, in the workspace's key buffer (the caller hands it back with `done`)."""
    # before the decrypt (with a cryptography key, its result block is freed inside it);
    # AESGCM copies the key too
    foreign_frees.require_wiped(workspace.require)
    if isinstance(private_key, keys.SecureRsaKey):
        # OpenSSL decrypts in its secure heap and copies the key straight into ours
        key = workspace.key(AES_KEY_BYTES)
        try:
            with memoryview(key) as out:
                size = private_key.decrypt_into(wrapped, out)
        except BaseException:
            workspace.done(key)
            raise
    else:
        # cryptography returns an immutable `bytes` (its freed result buffer is zeroed, see
        # _rsa_decrypt): handed over in a list (no local keeps it) to adopt_bytes, which
        # moves it into secure memory and zeroes the original.
        key = adopt_bytes([_rsa_decrypt(wrapped, private_key)], workspace.key)
        size = len(key)
    if size != AES_KEY_BYTES:
        workspace.done(key)
        raise SecurityError(AUTH_FAILED) from None
    return key


def _byte_view(obj: Any) -> memoryview:
    """A flat unsigned-byte view of any contiguous buffer (the caller releases it)."""
    try:
        view = memoryview(obj)
    except TypeError:
        kind = type(obj).__name__
        raise TypeError(f"plaintext must be a bytes-like buffer, not {kind}") from None
    if view.format == "B" and view.ndim == 1:
        return view
    with view:
        return view.cast("B")


def _parse(package: Any) -> dict[str, Any]:
    """Validate the package structure; every problem is a PackageError naming what is wrong."""
    try:
        raw = _byte_view(package)
    except (TypeError, ValueError):
        raise PackageError(f"package must be bytes, not {type(package).__name__}") from None
    with raw:
        if raw.nbytes == 0:
            raise PackageError("empty package")
        if raw.nbytes > MAX_PACKAGE_BYTES:
            raise PackageError(f"package is larger than {MAX_PACKAGE_BYTES} bytes")
        try:
            text = str(raw, "utf-8")
            doc = json.loads(text)
        except UnicodeDecodeError:
            raise PackageError("package is not valid UTF-8") from None
        except (ValueError, RecursionError):
            raise PackageError("package is not valid JSON") from None
    if not isinstance(doc, dict):
        raise PackageError("package must be a JSON object")
    missing = [
        k
        for k in ("version", "algorithm", "encrypted_payload", "encrypted_aes_key")
        if k not in doc
    ]
    if missing:
        raise PackageError(f"package is missing required fields: {', '.join(missing)}")
    if doc["version"] != VERSION:
        raise PackageError(f"unsupported protocol version (expected {VERSION!r})")
    if doc["algorithm"] != ALGORITHM:
        raise PackageError(f"unsupported algorithm (expected {ALGORITHM!r})")
    payload = doc["encrypted_payload"]
    if not isinstance(payload, dict):
        raise PackageError("encrypted_payload must be a JSON object")
    for name in ("ciphertext", "nonce"):
        if name not in payload:
            raise PackageError(f"encrypted_payload is missing {name!r}")
    nonce = _b64decode(payload["nonce"], "encrypted_payload.nonce")
    if len(nonce) != NONCE_BYTES:
        raise PackageError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    # Ciphertext and tag are decoded straight into one buffer, the form decrypt_into takes;
    # each is validated in the same pass that decodes it.
    ciphertext = _b64text(payload["ciphertext"], "encrypted_payload.ciphertext")
    tag = _b64text(payload["tag"], "encrypted_payload.tag") if "tag" in payload else ""
    ciphertext_and_tag = bytearray((len(ciphertext) + len(tag)) * 3 // 4)  # room; not secret
    cipher_end = _b64into(ciphertext, "encrypted_payload.ciphertext", ciphertext_and_tag, 0)
    if "tag" in payload:
        tag_layout = TAG_SEPARATE
        end = _b64into(tag, "encrypted_payload.tag", ciphertext_and_tag, cipher_end)
        if end - cipher_end != TAG_BYTES:
            raise PackageError(f"tag must be {TAG_BYTES} bytes, got {end - cipher_end}")
    else:
        tag_layout = TAG_APPENDED
        end = cipher_end
        if end < TAG_BYTES:
            raise PackageError("ciphertext too short to carry the appended 16-byte tag")
    del ciphertext_and_tag[end:]
    size = end - TAG_BYTES
    if size > MAX_PLAINTEXT_BYTES:
        raise PackageError(f"plaintext would exceed {MAX_PLAINTEXT_BYTES} bytes")
    if size == 0:
        raise PackageError("empty ciphertext: a package carries at least one byte of plaintext")
    processed_at = doc.get("processed_at")
    if processed_at is not None and (
        isinstance(processed_at, bool) or not isinstance(processed_at, (int, float))
    ):
        raise PackageError("processed_at must be a number")
    return {
        "ciphertext_and_tag": ciphertext_and_tag,
        "nonce": nonce,
        "tag_layout": tag_layout,
        "encrypted_aes_key": _b64decode(doc["encrypted_aes_key"], "encrypted_aes_key"),
        "processed_at": processed_at,
        "algorithm": doc["algorithm"],
    }


def _b64text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise PackageError(f"{name} must be a base64 string")
    return value


def _b64decode(value: Any, name: str) -> bytes:
    try:
        return b64.decode(_b64text(value, name))
    except ValueError:
        raise PackageError(f"{name} is not valid base64") from None


def _b64into(text: str, name: str, out: bytearray, offset: int) -> int:
    """Decode `text` into out[offset:]; the end offset, or PackageError naming the field."""
    try:
        return b64.decode_into(text, out, offset)
    except ValueError:
        raise PackageError(f"{name} is not valid base64") from None
