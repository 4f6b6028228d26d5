"""Stack and register residue of the secret paths (issue 12, item A).

Copying a secret passes it through vector registers (glibc's memmove), and the first call of
a lazily bound symbol afterwards spills those registers to the stack, where the bytes stay
below the live frames. So each path runs in a fresh child (lazy binding, as deployed: no
LD_BIND_NOW), which then blocks on stdin while this process reads the child's own [stack]
mapping through /proc/<pid>/mem and looks for any 16-byte run of the secret.

A positive control plants the secret on the child's stack (ctypes passes a 32-byte struct by
value, which lands in the call frame) and must be found, so a count of 0 means 0; after
`binding.scrub()` the planted copy must be gone, which is the scrub working at all.
`RESIDUE_RUNS` children run per path (the spill happens in most runs, not all).
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest

from tests.helpers import ROOT, child_env

RESIDUE_RUNS = int(os.environ.get("NOMYO_RESIDUE_RUNS", "3"))
WINDOW = 16

CHILD = r"""
import ctypes, json, sys
from nomyo.memory import adopt_bytes, binding, secure_bytearray, SecureBuffer
from nomyo.protocol import envelope
from cryptography.hazmat.primitives import serialization

job = json.loads(sys.stdin.readline())
secret = bytes.fromhex(job["secret"])

def pause(**kw):
    print(json.dumps(kw), flush=True)
    sys.stdin.readline()

path = job["path"]
if path == "control":
    # A struct passed by value is copied into the call's frame; its first bytes lie lowest,
    # ~16 KiB below this frame, deeper than printing and reading stdin reach afterwards.
    class Blob(ctypes.Structure):
        _fields_ = [("b", ctypes.c_char * (16 << 10))]
    blob = Blob()
    ctypes.memmove(ctypes.addressof(blob), secret, len(secret))
    libc = ctypes.CDLL(None)
    libc.getpid.argtypes = [Blob]
    libc.getpid(blob)
    ctypes.memset(ctypes.addressof(blob), 0, len(secret))
    del blob
    pause(step="planted")
    binding.scrub()
    pause(step="scrubbed")
elif path == "secure_bytearray":
    with secure_bytearray(bytearray(secret)):
        pass
    pause(step="done")
elif path == "adopt_bytes":
    adopt_bytes([bytes.fromhex(job["secret"])]).close()
    pause(step="done")
elif path == "seal":
    public = serialization.load_pem_public_key(job["public"].encode())
    with SecureBuffer.copy_of(secret) as plaintext:
        package = envelope.seal(plaintext, public)
    pause(step="done", package=package.decode())
elif path == "open_package":
    private = serialization.load_pem_private_key(job["private"].encode(), None)
    with envelope.open_package(job["package"].encode(), private) as opened:
        assert bytes(memoryview(opened.plaintext)) == b"" or True
    pause(step="done")
"""


def stack_bytes(pid: int) -> bytes:
    with open(f"/proc/{pid}/maps", encoding="ascii") as maps:
        for line in maps:
            if line.rstrip().endswith("[stack]"):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                break
        else:
            raise AssertionError("the child has no [stack] mapping")
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(start)
        return mem.read(end - start)


def runs_found(memory: bytes, secret: bytes) -> int:
    """How many of the secret's 16-byte windows occur in `memory`."""
    return sum(secret[i:i + WINDOW] in memory for i in range(len(secret) - WINDOW + 1))


def aes_key_of(package: bytes, private) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from nomyo.protocol import b64
    wrapped = b64.decode(json.loads(package)["encrypted_aes_key"])
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    return private.decrypt(wrapped, oaep)


class Child:
    def __init__(self, job: dict) -> None:
        env = child_env()
        env.pop("LD_BIND_NOW", None)  # lazy binding, as deployed: the spill needs it
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.send(job)

    def send(self, obj: object) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def step(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited ({self.proc.wait()}) before reporting")
        return json.loads(line)

    def finish(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def rsa_pair():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, pem, public


@pytest.fixture(autouse=True)
def native_only():
    from nomyo.memory import binding
    if binding.BACKEND != "native":
        pytest.skip(f"the scrub is native; this backend is {binding.BACKEND}: "
                    f"{binding.FALLBACK_REASON}")
    if not os.access("/proc/self/mem", os.R_OK):
        pytest.skip("/proc/self/mem is not readable here")


def test_control_is_found_then_scrubbed():
    secret = secrets.token_bytes(32)
    child = Child({"path": "control", "secret": secret.hex()})
    try:
        child.step()
        planted = runs_found(stack_bytes(child.proc.pid), secret)
        child.send("next")
        child.step()
        after = runs_found(stack_bytes(child.proc.pid), secret)
    finally:
        child.finish()
    assert planted > 0, "the scanner did not find a copy planted on the stack: 0 would mean nothing"
    assert after == 0, f"{after} runs of the planted secret survived binding.scrub()"


def residue(path: str, rsa_pair) -> list[int]:
    """For each run, how many 16-byte windows of the path's secrets were on the stack."""
    from nomyo.protocol import envelope
    private, pem, public = rsa_pair
    counts = []
    for _ in range(RESIDUE_RUNS):
        secret = secrets.token_bytes(32)
        job = {"path": path, "secret": secret.hex(), "public": public, "private": pem}
        needles = [secret]
        if path == "open_package":
            job["package"] = envelope.seal(secret, private.public_key()).decode()
            needles.append(aes_key_of(job["package"].encode(), private))
        child = Child(job)
        try:
            report = child.step()
            memory = stack_bytes(child.proc.pid)
        finally:
            child.finish()
        if path == "seal":
            needles.append(aes_key_of(report["package"].encode(), private))
        counts.append(sum(runs_found(memory, n) for n in needles))
    return counts


@pytest.mark.parametrize("path", ["secure_bytearray", "adopt_bytes", "seal", "open_package"])
def test_no_secret_left_on_the_stack(path, rsa_pair):
    counts = residue(path, rsa_pair)
    assert counts == [0] * len(counts), (
        f"{path}: 16-byte runs of the secret on the child's stack, per run: {counts}")
