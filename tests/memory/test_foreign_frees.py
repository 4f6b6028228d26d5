"""nomyo.memory.foreign_frees: cryptography's RSA decrypt frees its result buffer (the AES key
at its start) unwiped; once nomyo is imported, every block that extension frees is zeroed
first (csrc/freewipe.c), and nothing else in the process changes."""
from __future__ import annotations

import json

import pytest

from nomyo.memory import binding, foreign_frees
from tests.helpers import require_tool, run_python

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


# Builds a lazily bound test object (its free slot in .got.plt, the first page after RELRO,
# shared with .data), moves its PT_GNU_RELRO end to the end of .got.plt, loads it, patches
# it and writes its global. The loader rounds that end down, so the page stays writable; a
# patch that made it read-only again would crash the write.
RELRO_TAIL_PROBE = """
    import ctypes, os, struct, subprocess, sys, tempfile
    from nomyo.memory import binding
    work = tempfile.mkdtemp()
    src, so = os.path.join(work, "tail.c"), os.path.join(work, "libtail.so")
    with open(src, "w") as f:
        # the volatile pointer keeps the compiler from eliding the malloc/free pair
        f.write("#include <stdlib.h>\\nint counter;\\n"
                "void *(*volatile alloc)(size_t) = malloc;\\n"
                "int bump(void) { void *p = alloc(32); free(p); return ++counter; }\\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wl,-z,relro,-z,lazy", "-o", so, src],
                   check=True)
    elf = bytearray(open(so, "rb").read())
    phoff, shoff = struct.unpack_from("<QQ", elf, 0x20)
    phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", elf, 0x36)
    section = lambda i: struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
    names = section(shstrndx)[4]
    def name(i):
        start = names + section(i)[0]
        return bytes(elf[start:elf.index(0, start)]).decode()
    got_plt = next(section(i) for i in range(shnum) if name(i) == ".got.plt")
    end = got_plt[3] + got_plt[5]
    for i in range(phnum):
        at = phoff + i * phentsize
        if struct.unpack_from("<I", elf, at)[0] == 0x6474E552:  # PT_GNU_RELRO
            vaddr = struct.unpack_from("<Q", elf, at + 16)[0]
            was = vaddr + struct.unpack_from("<Q", elf, at + 40)[0]
            struct.pack_into("<QQ", elf, at + 32, end - vaddr, end - vaddr)
    page = os.sysconf("SC_PAGE_SIZE")
    assert was % page == 0 and was < end and end % page != 0, ("layout", was, end)
    open(so, "wb").write(elf)
    lib = ctypes.CDLL(so)
    lib.bump()
    assert binding.wipe_frees_of(so) >= 1
    assert lib.bump() == 2
    print("written")
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
    # free and realloc, each as a call slot and an address slot (cryptography 50's wheel)
    assert entry["slots"] >= 2, entry
    # safe to call again: the same slots, already pointing at the wrappers
    assert foreign_frees.wipe_cryptography_frees() is True
    assert binding.wipe_frees_of(rust.__file__) == entry["slots"]


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


UNWIPED_FREES = """
    import json, logging
    logging.disable(logging.WARNING)  # the warning that the frees are not wiped: expected
    from nomyo.memory import binding
    def refuse(path):
        raise OSError("no GOT slot for free (as with a statically linked extension)")
    binding.wipe_frees_of = refuse
    from nomyo.errors import SecureMemoryUnavailable
    from nomyo.protocol import envelope
    from nomyo.protocol.keys import KeyPair
    from nomyo.client.core import SecureCompletionClient
    key = KeyPair.generate(2048)
    out = {}
    def attempt(name, call):
        try:
            call()
            out[name] = "ok"
        except SecureMemoryUnavailable as exc:
            out[name] = str(exc)
    attempt("seal", lambda: envelope.seal_json({"m": 1}, key.public_key))
    attempt("client", lambda: SecureCompletionClient(
        "http://127.0.0.1:9", allow_http=True, require_secure_memory=True).close())
    from nomyo.server.factory import create_app
    attempt("server", lambda: create_app(key=key))
    import os
    os.environ.pop("NOMYO_REQUIRE_SECURE_MEMORY", None)
    package = envelope.seal_json({"m": 1}, key.public_key)
    os.environ["NOMYO_REQUIRE_SECURE_MEMORY"] = "1"  # set late: it is read on every call
    decrypts = []
    real_decrypt = envelope._rsa_decrypt
    envelope._rsa_decrypt = lambda *a: decrypts.append(1) or real_decrypt(*a)
    attempt("open", lambda: envelope.open_json(package, key))
    out["decrypts"] = len(decrypts)
    print(json.dumps(out))
"""


@pytest.mark.parametrize("required", [False, True])
def test_fail_closed_mode_refuses_when_cryptographys_frees_are_not_wiped(required):
    """Fail-closed mode promises no secret in memory that is not locked: cryptography's copy of
    every AES key ends in a block it frees, so with those frees unwiped it refuses, naming
    why; without it the envelope still works (and the report says the frees are not wiped).
    Before, fail-closed mode sealed and opened packages regardless."""
    _native()
    env = {"NOMYO_REQUIRE_SECURE_MEMORY": "1"} if required else {}
    proc = run_python(UNWIPED_FREES, **env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "blocks cryptography frees are not wiped (no GOT slot" in out["client"], out
    for name in ("seal", "server"):
        if required:
            assert "blocks cryptography frees are not wiped" in out[name], out
        else:
            assert out[name] == "ok", out
    # refused before the RSA decrypt, whose result block cryptography frees inside it
    assert "blocks cryptography frees are not wiped" in out["open"], out
    assert out["decrypts"] == 0, out


def test_an_object_that_is_not_loaded_is_refused_by_name(tmp_path):
    _native()
    stray = tmp_path / "libnotloaded.so"
    stray.write_bytes(b"\x7fELF")
    with pytest.raises(OSError, match="libnotloaded.so") as info:
        binding.wipe_frees_of(str(stray))
    assert info.value.errno == 2  # ENOENT: no such object in this process
    with pytest.raises(FileNotFoundError):
        binding.wipe_frees_of(str(tmp_path / "missing.so"))


def test_an_object_without_a_free_slot_is_refused_not_reported_as_wiped():
    """_bisect calls neither free nor realloc: patching nothing must not count as wiping."""
    _native()
    import _bisect

    with pytest.raises(OSError, match="_bisect") as info:
        binding.wipe_frees_of(_bisect.__file__)
    assert info.value.errno == 38  # ENOSYS


def test_a_slot_at_the_end_of_relro_leaves_the_data_page_writable():
    """The loader rounds PT_GNU_RELRO's end down to the page: a GOT slot in the last partial
    page shares it with .data. A test object whose RELRO ends 16 bytes into that page (the
    layout a 16K or 64K-page kernel gives 4K-linked objects) keeps its data writable."""
    _native()
    require_tool("gcc", "gcc")
    proc = run_python(RELRO_TAIL_PROBE, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "written", proc.stdout


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
