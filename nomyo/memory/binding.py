"""The one binding layer: loads the compiled helpers once, checks they belong to this nomyo,
and wraps every C call in a checked function. No other module touches `ffi` or `lib`.

Nothing is compiled here: the modules are built at install time. When they are missing or
stale (built for another nomyo version), or `NOMYO_MEMORY_BACKEND=fallback` forces it (for
tests and diagnosis), the fallback backend is used and every report says why.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from nomyo import _buildstamp
from nomyo._version import __version__
from nomyo.memory import settings

log = logging.getLogger("nomyo.memory")

_ffi: Any = None
_lib: Any = None
# nomyo._pyobjects: Region (which owns its nm_region: secmem.c is linked into it too, so
# its allocation, refit and release run under the GIL), the wipers, the JSON and UTF-8 helpers
pyobjects: Any = None
FALLBACK_REASON: str | None = None


@functools.cache
def _checkout_digest() -> str | None:
    """The digest of csrc/ when running from a source checkout (nomyo/_buildstamp.py)."""
    csrc = _buildstamp.checkout_sources()
    return _buildstamp.source_digest(csrc) if csrc is not None else None


def stale_build(name: str, built_for: str | None) -> str | None:
    """Why a compiled module cannot be used with this package, or None when it can
    (`built_for` is the stamp compiled into it, None when it carries none: the version, and
    the digest of the C sources, which must match csrc/ in a source checkout)."""
    version, _, digest = (built_for or "").partition(_buildstamp.SOURCE_MARK)
    if built_for and version == __version__:
        current = _checkout_digest()
        if current is None or digest == current:
            return None
        return (f"{name} was built from other C sources than csrc/ holds now: a stale "
                "build; rebuild it (pip install -e .) in this environment")
    made = f"built for nomyo {version}" if built_for else "built with no version stamp"
    return (f"{name} was {made}, this is nomyo {__version__}: a stale build; reinstall "
            "nomyo (pip install --force-reinstall) to rebuild it")


def _load() -> None:
    global _ffi, _lib, pyobjects
    if settings.fallback_forced():
        raise ImportError("forced by NOMYO_MEMORY_BACKEND=fallback")
    from nomyo import _pyobjects
    from nomyo._secmem import ffi, lib

    stamp = ffi.string(lib.nm_build_version()).decode("ascii") if hasattr(
        lib, "nm_build_version") else None
    stale = (stale_build("nomyo._secmem", stamp)
             or stale_build("nomyo._pyobjects", getattr(_pyobjects, "BUILD_VERSION", None)))
    if stale:
        raise ImportError(stale)
    _ffi, _lib, pyobjects = ffi, lib, _pyobjects


try:
    _load()
except ImportError as exc:
    FALLBACK_REASON = str(exc)
    log.warning("nomyo native secure memory unavailable, using the fallback backend: %s", exc)
    if not settings.fallback_forced():
        # weaker protection must never be silent, even where logging is not configured (the
        # nomyo logger has a NullHandler): a warning reaches stderr by default
        warnings.warn(f"nomyo native secure memory unavailable, using the fallback backend "
                      f"(not locked, not excluded from dumps): {exc}",
                      RuntimeWarning, stacklevel=2)

BACKEND = "native" if _lib is not None else "fallback"
CANARY_BYTES = _lib.NM_CANARY_BYTES if _lib is not None else 0


def check_errno(rc: int, what: str) -> None:
    """The one place C return codes (0 or -errno) become Python exceptions."""
    if rc == 0:
        return
    err = -rc
    if err == 12:  # ENOMEM
        raise MemoryError(f"{what}: {os.strerror(err)}")
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _allocator_flags() -> int:
    """Read the allocator switch once: NOMYO_SECURE_ALLOCATOR=mmap skips memfd_secret."""
    if _lib is None:
        return 0
    choice = os.environ.get("NOMYO_SECURE_ALLOCATOR", "auto").strip().lower()
    if choice == "mmap":
        return _lib.NM_FLAG_FORCE_MMAP
    if choice not in ("", "auto", "memfd_secret"):
        log.warning("NOMYO_SECURE_ALLOCATOR=%r is not auto|memfd_secret|mmap; using auto", choice)
    return 0


_ALLOCATOR_FLAGS = _allocator_flags()


def region_flags(*, lock: bool) -> int:
    """nm_region_alloc's flags for a new Region: the allocator switch, and whether to lock."""
    return _ALLOCATOR_FLAGS | (0 if lock else _lib.NM_FLAG_NO_LOCK)


def fill_random(view: memoryview) -> None:
    """Overwrite a writable buffer with bytes from the kernel CSPRNG, in place."""
    check_errno(_lib.nm_fill_random(_ffi.from_buffer(view), len(view)), "getrandom failed")


def get_dumpable() -> int | None:
    """The process dumpable flag (prctl PR_GET_DUMPABLE); None where it cannot be read."""
    if _lib is None:
        return None
    value = _lib.nm_get_dumpable()
    return value if value >= 0 else None


def set_dumpable(value: int) -> bool:
    """Set the dumpable flag; False (nothing done) on the fallback backend."""
    if _lib is None:
        return False
    check_errno(_lib.nm_set_dumpable(value), f"prctl(PR_SET_DUMPABLE, {value}) failed")
    return True


def native_module(name: str) -> tuple[ModuleType | None, str | None]:
    """Another compiled helper of this package (e.g. `_b64`), or None and why not."""
    if settings.fallback_forced():
        return None, "forced by NOMYO_MEMORY_BACKEND=fallback"
    try:
        module = __import__(f"nomyo.{name}", fromlist=["BUILD_VERSION"])
    except ImportError as exc:
        return None, str(exc)
    stale = stale_build(f"nomyo.{name}", getattr(module, "BUILD_VERSION", None))
    return (None, stale) if stale else (module, None)


# How much stack below the caller `scrub` zeroes: the deepest spill seen in the residue check
# (security/test_stack_residue.py) with room to spare; bench/bench_memory.py prints its cost.
SCRUB_STACK_BYTES = 64 << 10


def scrub() -> int:
    """Clear the vector registers and zero a stretch of stack below this call, so that a
    secret an operation just moved (memmove leaves it in a vector register, and the lazy
    binding trampoline spills those to the stack) does not outlive it there. The bytes of
    stack zeroed; 0 on the fallback backend, which cannot do it."""
    if _lib is None:
        return 0
    return int(_lib.nm_scrub(SCRUB_STACK_BYTES))


def copy_scrub(dst: memoryview, src: Any) -> None:
    """Copy the bytes of `src` into `dst` (same length) in C, then `scrub`: the one way the
    library copies a secret. The fallback backend copies in Python and cannot scrub."""
    with memoryview(src) as view:
        if view.nbytes != dst.nbytes:
            raise ValueError(f"copy of {view.nbytes} bytes into a buffer of {dst.nbytes}")
        if _lib is None:
            dst[:] = view.cast("B") if view.format != "B" or view.ndim != 1 else view
            return
        check_errno(_lib.nm_copy_scrub(_ffi.from_buffer(dst), _ffi.from_buffer(view),
                                       view.nbytes, SCRUB_STACK_BYTES),
                    "secure copy failed")



def wipe_frees_of(path: str) -> int:
    """Make the loaded shared object at `path` zero every block it frees or moves with
    realloc (nm_wipe_frees_of, csrc/freewipe.c); safe to call again. The GOT slots pointing
    at the wrappers. OSError (every failure, ENOMEM too) when it cannot: not loaded, no free
    slot, an unknown architecture, mprotect refused."""
    if _lib is None:
        raise OSError(f"needs the native backend ({FALLBACK_REASON})")
    rc = int(_lib.nm_wipe_frees_of(os.fsencode(path)))
    if rc < 0:
        raise OSError(-rc, f"cannot make {os.path.basename(path)} wipe what it frees: "
                      f"{os.strerror(-rc)}")
    return rc


# -- RSA private keys in OpenSSL's secure heap (nomyo._osslkey) --------------------------------
# One mlocked, guarded, dump-excluded arena for every private key number OpenSSL allocates
# with BN_FLG_SECURE (generation and PEM decoding do), the OAEP scratch and the PEM buffers.
# An RSA-4096 key takes 1792 bytes of it at rest (measured); 4 MiB holds many keys and concurrent
# decrypts. The minimum block size is OpenSSL's granularity (powers of two).
SECURE_HEAP_BYTES = 4 << 20
SECURE_HEAP_MIN_BYTES = 64

_kffi: Any = None
_klib: Any = None
KEYS_FALLBACK_REASON: str | None = None


def _load_keys() -> None:
    global _kffi, _klib
    if _lib is None:
        raise ImportError(f"the native memory backend is not in use ({FALLBACK_REASON})")
    from nomyo._osslkey import ffi, lib

    stale = stale_build("nomyo._osslkey", ffi.string(lib.nk_build_version()).decode("ascii"))
    if stale:
        raise ImportError(stale)
    init = lib.nk_secure_init(SECURE_HEAP_BYTES, SECURE_HEAP_MIN_BYTES)
    if not init:
        raise ImportError("CRYPTO_secure_malloc_init failed (no memory to map or lock?)")
    _kffi, _klib = ffi, lib
    _heap_lock["locked"] = init == 1  # 2: mapped, but OpenSSL's mlock failed
    _heap_lock["arena"] = int(lib.nk_secure_arena())
    os.register_at_fork(after_in_child=_relock_secure_heap)


# Whether the secure heap's arena is locked in RAM, and where it is. A forked child (granian's
# server workers are) inherits the mapping but not its lock, so it locks it again at once.
_heap_lock: dict[str, Any] = {"locked": False, "arena": 0}


def _relock_secure_heap() -> None:
    """After fork, in the child: mlock the inherited arena again (no OpenSSL lock is taken:
    another parent thread may have held it at the fork). Nothing to restore when the parent
    could not lock it either."""
    if not _heap_lock["locked"]:
        return
    rc = int(_klib.nk_secure_lock(_heap_lock["arena"])) if _heap_lock["arena"] else -1
    _heap_lock["locked"] = rc == 0
    if rc != 0:
        reason = os.strerror(rc) if rc > 0 else "the arena's mapping was not found"
        _heap_lock["error"] = reason
        log.warning("OpenSSL's secure heap is not locked in this forked process (the private "
                    "key can be swapped out): %s", reason)


if not settings.secure_private_keys():
    KEYS_FALLBACK_REASON = ("off (the default): NOMYO_SECURE_PRIVATE_KEYS=1 holds them in "
                            "OpenSSL's secure heap, at about 2.4x the RSA decrypt time")
else:
    try:
        _load_keys()
    except ImportError as exc:  # asked for and not available: say so, loudly
        KEYS_FALLBACK_REASON = str(exc)
        log.warning("RSA private keys are held by cryptography (ordinary heap): %s", exc)
        warnings.warn(f"nomyo RSA private keys are held by cryptography in the ordinary heap "
                      f"(not locked, not excluded from dumps): {exc}",
                      RuntimeWarning, stacklevel=2)

RSA_NATIVE = _klib is not None
# return codes of nomyo._osslkey (osslkey.h), for protocol/keys.py to turn into its errors
(NK_ERR_DECRYPT, NK_ERR_DECODE, NK_ERR_NEED_PASSWORD, NK_ERR_NOT_ENCRYPTED, NK_ERR_SIZE,
 NK_ERR_MULTI_PRIME) = (-2, -3, -4, -5, -6, -8)


def _key_check(rc: int, what: str) -> None:
    if rc == -7:
        raise RuntimeError(f"{what}: OpenSSL's secure heap is not initialised")
    if rc != 0:
        raise RuntimeError(f"{what}: OpenSSL failed (code {rc})")


def secure_heap_info() -> dict[str, Any]:
    """What OpenSSL's secure heap holds the private keys in (for the protection report)."""
    if _klib is None:
        return {"in_use": False, "reason": KEYS_FALLBACK_REASON}
    info = {"in_use": bool(_klib.nk_secure_initialized()), "size": SECURE_HEAP_BYTES,
            "used": int(_klib.nk_secure_used()), "locked": _heap_lock["locked"],
            "openssl": _kffi.string(_klib.nk_openssl_version()).decode("ascii")}
    if "error" in _heap_lock:
        info["lock_error"] = _heap_lock["error"]
    return info


@contextlib.contextmanager
def _c_view(buffer: memoryview | None) -> Iterator[Any]:
    """A C pointer into `buffer` (NULL for None), released on the way out: a pointer left to
    a traceback would keep the caller's memoryview exported (BufferError on its release,
    hiding the real error)."""
    if buffer is None:
        yield _kffi.NULL
        return
    ptr = _kffi.from_buffer(buffer)
    try:
        yield ptr
    finally:
        _kffi.release(ptr)


def _owned(ptr: Any) -> Any:
    return _kffi.gc(ptr, _klib.nk_free)


def rsa_generate(bits: int) -> Any:
    """A new RSA key (e = 65537) whose private numbers live in the secure heap."""
    out = _kffi.new("EVP_PKEY **")
    _key_check(_klib.nk_generate(bits, out), "RSA key generation")
    return _owned(out[0])


def rsa_from_pem(pem: memoryview, password: memoryview | None) -> tuple[int, Any]:
    """Decode a PEM private key read in place from `pem`: (0, key) or (NK_ERR_*, None)."""
    out = _kffi.new("EVP_PKEY **")
    with _c_view(password) as pw:
        rc = _klib.nk_from_pem(_kffi.from_buffer(pem), pem.nbytes, pw,
                               password.nbytes if password is not None else 0, out)
    if rc in (NK_ERR_DECODE, NK_ERR_NEED_PASSWORD, NK_ERR_NOT_ENCRYPTED, NK_ERR_MULTI_PRIME):
        return rc, None
    _key_check(rc, "PEM private key decoding")
    return 0, _owned(out[0])


def rsa_release(key: Any) -> None:
    """Free the key now (OpenSSL clears its numbers); the caller drops every reference."""
    _kffi.release(key)


def rsa_bits(key: Any) -> int:
    return int(_klib.nk_bits(key))


def rsa_public_der(key: Any) -> bytes:
    """DER SubjectPublicKeyInfo of the key's public half."""
    size = _kffi.new("size_t *")
    _key_check(_klib.nk_public_der(key, _kffi.NULL, size), "public key export")
    der = _kffi.new("uint8_t[]", size[0])
    _key_check(_klib.nk_public_der(key, der, size), "public key export")
    return bytes(_kffi.buffer(der, size[0]))


def rsa_decrypt_into(key: Any, wrapped: Any, out: memoryview) -> int:
    """RSA-OAEP-SHA256 decrypt into `out` (the GIL released); the length written, or
    NK_ERR_DECRYPT / NK_ERR_SIZE (negative) as the verdict on the wrapped key."""
    n = _kffi.new("size_t *")
    with memoryview(wrapped) as src:
        rc = _klib.nk_decrypt(key, _kffi.from_buffer(src), src.nbytes,
                              _kffi.from_buffer(out, require_writable=True), out.nbytes, n)
    if rc in (NK_ERR_DECRYPT, NK_ERR_SIZE):
        return rc
    _key_check(rc, "RSA decrypt")
    return int(n[0])


def rsa_private_pem(key: Any, password: memoryview | None, alloc: Any) -> Any:
    """The PKCS#8 PEM (encrypted with `password` when given) in `alloc(n)`'s buffer; it goes
    through a secure-heap BIO only."""
    bio = _kffi.new("BIO **")
    size = _kffi.new("size_t *")
    with _c_view(password) as pw:
        rc = _klib.nk_to_pem(key, pw, password.nbytes if password is not None else 0, bio,
                             size)
    _key_check(rc, "PEM private key encoding")
    try:
        buf = alloc(size[0])
    except BaseException:
        _klib.nk_bio_free(bio[0])
        raise
    with memoryview(buf) as view:
        _key_check(_klib.nk_bio_take(bio[0], _kffi.from_buffer(view, require_writable=True),
                                     size[0]), "PEM private key encoding")
    return buf
