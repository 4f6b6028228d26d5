"""Residue scan for the RSA private key and the AES keys it unwraps.

A child process generates a key pair, saves it encrypted with a password, loads it back and
opens 50 packages one after another and 64 from 16 threads at once. The packages are sealed
here, so this side knows each AES key; it reads d, p and q from the saved PEM. It then scans
the child's live memory (/proc/<pid>/mem) and a core of it (gcore) for the 32-byte windows
(stride 32) of d, p and q in both byte orders (OpenSSL's BIGNUM limbs are little-endian) and
the 16-byte windows at offsets 0, 8 and 16 of every AES key. Memory both locked and
dump-excluded (VmFlags `lo` and `dd`: OpenSSL's secure heap, nomyo's mmap-backed secure
buffers) is counted apart: that is where the key belongs, and a core never holds it.
Positive controls: the child plants a copy of one
window of d and 16 random bytes in ordinary bytearrays, and both scans must find them.

`python -m security.test_key_residue` prints the counts for the native key and for a
`cryptography` key (the path before nomyo._osslkey), for SECURITY.md.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from security.memscan import CHUNK, aes_windows, any_of, readable_regions
from security.residue import child_process, hear, mappings, say, write_core
from tests.helpers import ROOT

SEQUENTIAL, CONCURRENT, THREADS = 50, 64, 16
PASSWORD = "residue-test-password"

CHILD = r"""
import base64, gc, json, sys
from concurrent.futures import ThreadPoolExecutor
from nomyo.protocol import envelope
from nomyo.protocol.keys import KeyPair

mode, folder, password = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "native":
    made = KeyPair.generate(4096)
else:  # the path before nomyo._osslkey: a cryptography key object
    from cryptography.hazmat.primitives.asymmetric import rsa
    made = KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=4096))
made.save(folder, password)
made.close()
del made
if mode == "native":
    pair = KeyPair.load(folder + "/private_key.pem", password)
else:
    from cryptography.hazmat.primitives import serialization
    with open(folder + "/private_key.pem", "rb") as f:
        pair = KeyPair(serialization.load_pem_private_key(f.read(), password.encode()))
print(json.dumps({"kind": type(pair.private_key).__name__}), flush=True)
packages = [base64.b64decode(line) for line in iter(sys.stdin.readline, "end\n")]

def open_one(package):
    with envelope.open_package(package, pair) as opened:
        return len(opened.plaintext)

sequential, concurrent = packages[:SEQUENTIAL], packages[SEQUENTIAL:]
assert all(open_one(p) == 100 for p in sequential)
with ThreadPoolExecutor(THREADS) as pool:
    assert all(n == 100 for n in pool.map(open_one, concurrent))
del packages, sequential, concurrent
controls = [bytearray(bytes.fromhex(line.strip())) for line in iter(sys.stdin.readline, "end\n")]
gc.collect()
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
""".replace("SEQUENTIAL", str(SEQUENTIAL)).replace("THREADS", str(THREADS))


def key_windows(private_pem: bytes) -> dict[bytes, str]:
    """The 32-byte windows (stride 32) of d, p and q in both byte orders, named."""
    from cryptography.hazmat.primitives import serialization

    numbers = serialization.load_pem_private_key(
        private_pem, PASSWORD.encode()).private_numbers()  # type: ignore[union-attr]
    needles: dict[bytes, str] = {}
    for name, value in (("d", numbers.d), ("p", numbers.p), ("q", numbers.q)):
        size = (value.bit_length() + 7) // 8
        for order in ("big", "little"):
            raw = value.to_bytes(size, order)
            for at in range(0, size - 31, 32):
                needles[raw[at:at + 32]] = f"{name} ({order} endian)"
    return needles


def _count(pattern: re.Pattern, data: bytes, counts: dict[bytes, int], skip: int) -> None:
    for match in pattern.finditer(data):
        if match.end() > skip:
            counts[match.group()] = counts.get(match.group(), 0) + 1


def scan_live(pid: int, needles: list[bytes]) -> tuple[dict[bytes, int], dict[bytes, int]]:
    """(counts in ordinary memory, counts in locked dump-excluded memory) of a live process."""
    pattern = re.compile(any_of(needles))
    protected = {(m.start, m.end) for m in mappings(pid) if m.protected}
    ordinary: dict[bytes, int] = {}
    secure: dict[bytes, int] = {}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end, _name in readable_regions(pid):
            counts = secure if (start, end) in protected else ordinary
            tail, pos = b"", start
            while pos < end:
                try:
                    mem.seek(pos)
                    chunk = mem.read(min(CHUNK, end - pos))
                except (OSError, ValueError, OverflowError):
                    break
                if not chunk:
                    break
                _count(pattern, tail + chunk, counts, len(tail))
                tail = (tail + chunk)[-31:]
                pos += len(chunk)
    return ordinary, secure


def scan_core(pid: int, needles: list[bytes], folder: str) -> dict[bytes, int]:
    """Counts in a core of the process written by gcore (which honours dump exclusion)."""
    core = write_core(pid, folder)
    pattern = re.compile(any_of(needles))
    counts: dict[bytes, int] = {}
    try:
        with core.open("rb") as f:  # about 1 GB, mostly the threads' unused arenas: zeros
            tail = b""
            while chunk := f.read(CHUNK):
                if chunk.count(0) != len(chunk):
                    _count(pattern, tail + chunk, counts, len(tail))
                tail = chunk[-31:]
    finally:
        core.unlink()
    return counts


def run(mode: str) -> dict[str, object]:
    """Run the child in `mode` ("native" or "cryptography") and scan it; a summary dict."""
    from tests.peer_server import seal_for

    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "NOMYO_SECURE_PRIVATE_KEYS": "1" if mode == "native" else "0"}
    with tempfile.TemporaryDirectory() as folder:
        with child_process([sys.executable, "-c", CHILD, mode, folder, PASSWORD],
                           env=env) as child:
            kind = hear(child)["kind"]
            from cryptography.hazmat.primitives import serialization

            public = serialization.load_pem_public_key(
                Path(folder, "public_key.pem").read_bytes())
            secrets_ = key_windows(Path(folder, "private_key.pem").read_bytes())
            aes_keys = []
            for _ in range(SEQUENTIAL + CONCURRENT):
                package, key = seal_for(public, os.urandom(100))
                aes_keys.append(key)
                child.stdin.write(base64.b64encode(package).decode() + "\n")
            secrets_.update(aes_windows(aes_keys))
            controls = [next(iter(secrets_)), os.urandom(16)]
            secrets_[controls[1]] = "control"
            say(child, "end\n" + "".join(c.hex() + "\n" for c in controls) + "end")
            assert hear(child).get("ready")
            needles = list(secrets_)
            ordinary, secure = scan_live(child.pid, needles)
            core = scan_core(child.pid, needles, folder) if shutil.which("gcore") else None
            say(child, "exit")
            assert child.wait(timeout=60) == 0

    def hits(counts: dict[bytes, int] | None) -> dict[str, int] | None:
        if counts is None:
            return None
        named: dict[str, int] = {}
        for needle, n in counts.items():
            label = "control" if needle in controls else secrets_[needle].split(" (")[0]
            label = "AES keys" if label.startswith("AES key") else label
            named[label] = named.get(label, 0) + n
        return named

    leaked = sorted({secrets_[n] for n, c in ordinary.items() if c and n not in controls})
    return {"kind": kind, "live": hits(ordinary), "live_locked_dontdump": hits(secure),
            "core": hits(core), "leaked_live": leaked,
            "leaked_core": sorted({secrets_[n] for n, c in (core or {}).items()
                                   if c and n not in controls}),
            "controls_live": [ordinary.get(c, 0) for c in controls],
            "controls_core": [core.get(c, 0) for c in controls] if core is not None else None}


@pytest.mark.slow
def test_no_private_key_number_or_aes_key_outside_the_secure_heap():
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs /proc/<pid>/mem (Linux procfs) to scan a process")
    try:
        import nomyo._osslkey  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"nomyo._osslkey (OpenSSL secure-heap keys) is not built: {exc}")
    result = run("native")
    assert result["kind"] == "SecureRsaKey", result
    assert all(n >= 1 for n in result["controls_live"]), f"a control was not found: {result}"
    # d, p, q and every AES key absent (p and q were one copy each, in OpenSSL's Montgomery
    # cache, before the key was built without it: csrc/osslkey.c uncached_key)
    assert result["leaked_live"] == [], result
    # the key is there, in the locked dump-excluded arena (this is what it protects)
    assert all(result["live_locked_dontdump"].get(n, 0) >= 1 for n in "dpq"), result
    if result["core"] is not None:
        assert all(n >= 1 for n in result["controls_core"]), f"core control missing: {result}"
        assert result["leaked_core"] == [], result


if __name__ == "__main__":
    for mode_ in sys.argv[1:] or ["cryptography", "native"]:
        print(mode_, json.dumps(run(mode_), indent=None))
