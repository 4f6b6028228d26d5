"""nomyo.memory.foreign_frees: cryptography's RSA decrypt frees its result buffer (the AES key
at its start) unwiped; once nomyo is imported, every block that extension frees is zeroed
first (csrc/freewipe.c), and nothing else in the process changes."""
from __future__ import annotations

import json

import pytest

from nomyo.memory import binding, foreign_frees
from tests.helpers import run_python

# A child decrypts 40 fresh AES keys with cryptography, each followed by eight mallocs of the
# result buffer's size: the allocator hands the just-freed block back first. It counts the
# keys whose last 16 bytes (what glibc's free-list pointers leave of them) it finds there.
PROBE = """
    import ctypes, json, os, sys
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    if os.environ["PROBE_IMPORTS"] == "nomyo":
        import nomyo.protocol.envelope
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    key = rsa.generate_private_key(65537, 2048)
    size = key.key_size // 8
    kept = 0
    for _ in range(40):
        secret = os.urandom(32)
        assert key.decrypt(key.public_key().encrypt(secret, oaep), oaep) == secret
        blocks = [libc.malloc(size) for _ in range(8)]
        kept += any(secret[16:] in ctypes.string_at(b, size) for b in blocks)
        for b in blocks:
            libc.free(b)
    print(json.dumps(kept))
"""


def _native() -> None:
    if binding.BACKEND != "native":
        pytest.skip(f"needs the native backend: {binding.FALLBACK_REASON}")


def _keys_kept(imports: str) -> int:
    proc = run_python(PROBE, timeout=120, PROBE_IMPORTS=imports)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_aes_key_cryptography_decrypts_is_zeroed_when_its_buffer_is_freed():
    _native()
    control = _keys_kept("cryptography only")
    assert control > 0, "positive control: without nomyo the probe found no key in freed memory"
    assert _keys_kept("nomyo") == 0, f"without nomyo {control} of 40 keys were found"


def test_the_report_says_cryptographys_frees_are_wiped():
    _native()
    import cryptography.hazmat.bindings._rust as rust

    import nomyo.protocol.envelope  # noqa: F401 (loads cryptography, so makes its frees wipe)
    entry = __import__("nomyo").get_memory_protection_info()["third_party_frees_wiped"]
    assert entry["wiped"] is True and "reason" not in entry, entry
    assert entry["module"].startswith("cryptography "), entry
    # done once per process: a second call finds every slot already pointing at the wrappers
    assert foreign_frees.wipe_cryptography_frees() is True
    assert binding.wipe_frees_of(rust.__file__) == 0


def test_before_cryptography_is_loaded_the_report_says_so():
    proc = run_python("""
        import json, sys, nomyo
        entry = nomyo.get_memory_protection_info()["third_party_frees_wiped"]
        print(json.dumps([entry, "cryptography" in sys.modules]))
    """)
    assert proc.returncode == 0, proc.stderr
    entry, loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not loaded and entry["wiped"] is None and "not loaded yet" in entry["reason"], entry


def test_the_fallback_backend_reports_why_frees_are_not_wiped():
    proc = run_python("""
        import json, warnings
        warnings.simplefilter("ignore")
        import nomyo, nomyo.protocol.envelope
        print(json.dumps(nomyo.get_memory_protection_info()["third_party_frees_wiped"]))
    """, NOMYO_MEMORY_BACKEND="fallback")
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout.strip().splitlines()[-1])
    assert entry["wiped"] is False and "native backend" in entry["reason"], entry


def test_an_object_that_is_not_loaded_is_refused_by_name(tmp_path):
    _native()
    stray = tmp_path / "libnotloaded.so"
    stray.write_bytes(b"\x7fELF")
    with pytest.raises(OSError, match="libnotloaded.so") as info:
        binding.wipe_frees_of(str(stray))
    assert info.value.errno == 2  # ENOENT: no such object in this process
    with pytest.raises(FileNotFoundError):
        binding.wipe_frees_of(str(tmp_path / "missing.so"))


def test_the_wrappers_keep_the_data_and_zero_every_block_they_release():
    """realloc moves a block it cannot keep and zeroes the old one; free zeroes the block
    (both read after release, in a child: the allocator keeps small freed blocks mapped)."""
    _native()
    proc = run_python("""
        import json
        from nomyo._secmem import ffi, lib
        marker = bytes(range(1, 65))
        seen = {}
        p = ffi.cast("unsigned char *", lib.nm_wiping_realloc(ffi.NULL, 64))
        ffi.memmove(p, marker, 64)
        q = ffi.cast("unsigned char *", lib.nm_wiping_realloc(p, 40))
        seen["shrink_in_place"] = q == p and ffi.buffer(q, 40)[:] == marker[:40]
        r = ffi.cast("unsigned char *", lib.nm_wiping_realloc(q, 1 << 16))
        seen["grow_keeps_data"] = ffi.buffer(r, 64)[:] == marker
        seen["moved_block_zeroed"] = marker[16:64] not in ffi.buffer(q, 64)[:]
        lib.nm_wiping_free(r)
        seen["freed_block_zeroed"] = marker[16:64] not in ffi.buffer(r, 1 << 16)[:]
        small = lib.nm_wiping_realloc(ffi.NULL, 8)
        seen["realloc_to_zero_frees"] = lib.nm_wiping_realloc(small, 0) == ffi.NULL
        print(json.dumps(seen))
    """)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(seen.values()), seen
