"""RSA key pairs: generate, save (private key 0600, atomic), load into secure memory, fingerprint.

The fingerprint a user pins is the lowercase hex SHA-256 of the public key's DER
SubjectPublicKeyInfo (the bytes inside the `-----BEGIN PUBLIC KEY-----` PEM), e.g.
`openssl pkey -pubin -in public_key.pem -outform DER | sha256sum`.
File names match the published client: `private_key.pem` and `public_key.pem`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from nomyo.errors import DisposedError, SecureMemoryUnavailable
from nomyo.memory import SecureBuffer, adopt_bytes, binding, settings, wipe_bytes_owned
from nomyo.protocol.constants import DEFAULT_KEY_BITS, GENERATE_KEY_BITS, MIN_KEY_BITS

logger = logging.getLogger(__name__)

PRIVATE_KEY_FILE = "private_key.pem"
PUBLIC_KEY_FILE = "public_key.pem"
MAX_PEM_BYTES = 64 * 1024  # an RSA-16384 PKCS#8 PEM is about 13 KiB

Password = str | bytes | bytearray | memoryview | SecureBuffer | None


class SecureRsaKey:
    """An RSA private key held by OpenSSL in its secure heap (nomyo._osslkey): d, p, q and the
    CRT numbers never enter the ordinary heap, and neither does a decrypted key.

    Its operations run in C without the GIL, so `close()` may come while another thread is
    inside one: each operation holds a lease, and the last lease out frees the key."""

    def __init__(self, handle: Any) -> None:
        self._handle: Any = handle
        self._lock = threading.Lock()
        self._leases = 0
        self._closing = False
        self.key_size = binding.rsa_bits(handle)
        self._public = serialization.load_der_public_key(binding.rsa_public_der(handle))

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public  # type: ignore[return-value]

    def decrypt_into(self, wrapped: Any, out: memoryview) -> int:
        """RSA-OAEP-SHA256 decrypt into `out`; the length, or negative when refused."""
        with self._lease() as handle:
            return binding.rsa_decrypt_into(handle, wrapped, out)

    def private_pem(self, password: memoryview | None) -> SecureBuffer:
        """PKCS#8 PEM (PBES2 AES-256-CBC with a password), in secure memory only."""
        with self._lease() as handle:
            return binding.rsa_private_pem(handle, password, SecureBuffer)

    def close(self) -> None:
        """Free the key (OpenSSL clears its numbers): now, or when the last running
        operation ends; no new one starts."""
        with self._lock:
            self._closing = True
            handle = self._take_if_unused()
        if handle is not None:
            binding.rsa_release(handle)

    @contextmanager
    def _lease(self) -> Iterator[Any]:
        with self._lock:
            if self._closing:
                raise DisposedError("key pair is closed")
            self._leases += 1
            handle = self._handle
        try:
            yield handle
        finally:
            with self._lock:
                self._leases -= 1
                last = self._take_if_unused() if self._closing else None
            if last is not None:
                binding.rsa_release(last)

    def _take_if_unused(self) -> Any:
        """The handle to free once closing and no lease is out (under the lock), else None."""
        if self._leases:
            return None
        handle, self._handle = self._handle, None
        return handle


PrivateKey = SecureRsaKey | rsa.RSAPrivateKey


class KeyPair:
    """An RSA private key with its public half; `close()` drops the private key.

    With the native helper the key is a SecureRsaKey; without it (or given a `cryptography`
    key) a `cryptography` object in the ordinary heap, as the memory report says."""

    def __init__(self, private_key: PrivateKey) -> None:
        if not isinstance(private_key, (SecureRsaKey, rsa.RSAPrivateKey)):
            raise TypeError("KeyPair needs an RSA private key")
        _check_size(private_key.key_size)
        self._private_key: PrivateKey | None = private_key
        self.public_key = private_key.public_key()
        self.public_pem = public_pem(self.public_key)
        self.fingerprint = fingerprint(self.public_key)
        self.key_size = private_key.key_size

    @classmethod
    def generate(cls, bits: int = DEFAULT_KEY_BITS) -> KeyPair:
        """A fresh key pair of 2048 or 4096 bits (4096 by default)."""
        if bits not in GENERATE_KEY_BITS:
            raise ValueError(f"key size must be one of {GENERATE_KEY_BITS} bits, not {bits!r}")
        if binding.RSA_NATIVE:
            return cls(SecureRsaKey(binding.rsa_generate(bits)))
        _refuse_ordinary_heap_when_required()
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=bits))

    @classmethod
    def load(cls, path: str | os.PathLike, password: Password = None) -> KeyPair:
        """Load a PEM private key file; the PEM is read straight into secure memory."""
        with _read_secure(Path(path)) as pem:
            return cls.from_pem(pem, password, source=str(path))

    @classmethod
    def from_pem(cls, pem: Any, password: Password = None, *, source: str = "PEM data") -> KeyPair:
        """Parse a PEM private key held in any buffer (normally a SecureBuffer)."""
        with _password_buffer(password) as pw, memoryview(pem) as data:
            pw_view = memoryview(pw) if pw is not None else None
            if binding.RSA_NATIVE:
                try:
                    return cls._from_pem_native(data, pw_view, source)
                finally:
                    if pw_view is not None:
                        pw_view.release()
            _refuse_ordinary_heap_when_required()
            try:
                key = serialization.load_pem_private_key(data, password=pw_view)
            except TypeError:
                raise ValueError(
                    f"{source}: the private key is encrypted and no password was given"
                    if pw_view is None
                    else f"{source}: the key is not encrypted; drop the password"
                ) from None
            except ValueError:
                raise ValueError(f"{source}: not a PEM private key, or wrong password") from None
            finally:
                if pw_view is not None:
                    pw_view.release()
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{source}: not an RSA private key")
        return cls(key)

    @classmethod
    def _from_pem_native(cls, data: memoryview, pw: memoryview | None, source: str) -> KeyPair:
        rc, handle = binding.rsa_from_pem(data, pw)
        if rc == binding.NK_ERR_NEED_PASSWORD:
            raise ValueError(f"{source}: the private key is encrypted and no password was given")
        if rc == binding.NK_ERR_NOT_ENCRYPTED:
            raise ValueError(f"{source}: the key is not encrypted; drop the password")
        if rc == binding.NK_ERR_MULTI_PRIME:
            raise ValueError(f"{source}: a multi-prime RSA key; only two-prime keys are used")
        if rc != 0:
            raise ValueError(f"{source}: not a PEM private key, or wrong password")
        key = SecureRsaKey(handle)
        try:
            return cls(key)
        except BaseException:
            key.close()
            raise

    @property
    def private_key(self) -> PrivateKey:
        if self._private_key is None:
            raise DisposedError("key pair is closed")
        return self._private_key

    @property
    def closed(self) -> bool:
        return self._private_key is None

    def save(self, directory: str | os.PathLike, password: Password = None) -> Path:
        """Write `private_key.pem` (0600, created atomically) and `public_key.pem` (0644).

        With a password, the private key is PKCS#8 encrypted (best available algorithm).
        Returns the private key path.
        """
        folder = Path(directory)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_path = folder / PRIVATE_KEY_FILE
        with self._private_pem(password) as secure_pem:
            _write_atomic(private_path, secure_pem, 0o600)
        _write_atomic(folder / PUBLIC_KEY_FILE, self.public_pem.encode("ascii"), 0o644)
        if password is None:
            logger.warning("private key saved without a password in %s", folder)
        return private_path

    def _private_pem(self, password: Password) -> SecureBuffer:
        """PKCS#8 PEM of the private key in secure memory, encrypted when a password is given."""
        fmt = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8)
        key = self.private_key
        with _password_buffer(password) as pw:
            if isinstance(key, SecureRsaKey):
                if pw is None:
                    return key.private_pem(None)
                with memoryview(pw) as view:
                    return key.private_pem(view)
            if pw is None:
                return adopt_bytes(
                    [key.private_bytes(*fmt, serialization.NoEncryption())]
                )
            # cryptography takes the password only as `bytes`: one copy, zeroed right after use.
            with memoryview(pw) as view:
                pw_bytes = [bytes(view)]
            encryption = serialization.BestAvailableEncryption(pw_bytes[0])
            try:
                return adopt_bytes([key.private_bytes(*fmt, encryption)])
            finally:
                encryption = None  # it holds the password: drop it first, on failure too
                wipe_bytes_owned(pw_bytes)

    def close(self) -> None:
        """Drop the private key (OpenSSL clears its numbers when the object is freed)."""
        key, self._private_key = self._private_key, None
        if isinstance(key, SecureRsaKey):
            key.close()

    def __enter__(self) -> KeyPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.key_size} bits"
        return f"KeyPair({state}, fingerprint={self.fingerprint[:16]}...)"


def load_public_key(key: rsa.RSAPublicKey | str | bytes) -> rsa.RSAPublicKey:
    """An RSA public key of at least 2048 bits from a key object or PEM text."""
    if isinstance(key, rsa.RSAPublicKey):
        public = key
    elif isinstance(key, (str, bytes, bytearray)):
        data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        try:
            public = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError("not a PEM public key") from None
        if not isinstance(public, rsa.RSAPublicKey):
            raise ValueError("public key is not an RSA key")
    else:
        raise TypeError(f"expected an RSA public key or PEM text, not {type(key).__name__}")
    _check_size(public.key_size)
    return public


def private_key_of(key: KeyPair | PrivateKey) -> PrivateKey:
    """The RSA private key held by a KeyPair, or the key itself."""
    if isinstance(key, KeyPair):
        return key.private_key
    if isinstance(key, (SecureRsaKey, rsa.RSAPrivateKey)):
        return key
    raise TypeError(f"expected a KeyPair or an RSA private key, not {type(key).__name__}")


def public_pem(key: rsa.RSAPublicKey | PrivateKey) -> str:
    """SubjectPublicKeyInfo PEM text of a key."""
    if isinstance(key, (SecureRsaKey, rsa.RSAPrivateKey)):
        key = key.public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def fingerprint(key: rsa.RSAPublicKey | str | bytes) -> str:
    """Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo: the value a user pins."""
    der = load_public_key(key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _check_size(bits: int) -> None:
    if bits < MIN_KEY_BITS:
        raise ValueError(f"RSA keys under {MIN_KEY_BITS} bits are refused (got {bits})")


class _NoPassword:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _password_buffer(password: Password) -> Any:
    """The password in secure memory (a context manager yielding a SecureBuffer, or None)."""
    if password is None:
        return _NoPassword()
    if isinstance(password, str):
        if not password:
            raise ValueError("password must not be empty")
        # str.encode makes a bytes copy: move it into secure memory and zero it at once. A
        # one-character ASCII password encodes to the interpreter's shared one-byte object:
        # no copy is made then, and the wipe leaves that object alone (returns False).
        return adopt_bytes([password.encode("utf-8")])
    if isinstance(password, (SecureBuffer, bytes, bytearray, memoryview)):
        return SecureBuffer.copy_of(password)
    raise TypeError(f"password must be str or bytes-like, not {type(password).__name__}")


def _read_secure(path: Path) -> SecureBuffer:
    """Read a small file straight into a SecureBuffer (readinto, no intermediate bytes)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0 or size > MAX_PEM_BYTES:
            raise ValueError(f"{path}: expected a PEM key file of 1..{MAX_PEM_BYTES} bytes")
        buf = SecureBuffer(size)
        try:
            with memoryview(buf) as view:
                done = 0
                while done < size:
                    n = f.readinto(view[done:])
                    if not n:
                        raise ValueError(f"{path}: file shrank while being read")
                    done += n
        except BaseException:
            buf.close()
            raise
        return buf


def _write_atomic(path: Path, data: Any, mode: int) -> None:
    """Create a new file with `mode` from the start (O_EXCL temp name), then rename over `path`."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never widened beyond `mode`
            with memoryview(data) as view:
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _refuse_ordinary_heap_when_required() -> None:
    """Fail-closed mode with secure-heap keys asked for and not available: refuse to make or
    load a key in the ordinary heap instead of warning and going on."""
    if settings.secure_private_keys() and settings.required():
        raise SecureMemoryUnavailable(
            "NOMYO_SECURE_PRIVATE_KEYS=1 and NOMYO_REQUIRE_SECURE_MEMORY=1, but RSA private "
            f"keys cannot be held in OpenSSL's secure heap: {binding.KEYS_FALLBACK_REASON}")
