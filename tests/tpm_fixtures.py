"""Shared helpers for the attestation tests: the swtpm vectors, a software "TPM" that marshals
quotes signed by keys made here (for schemes and curves the vectors do not cover), and a
real swtpm started on loopback for live quotes.
"""
from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

VECTOR_DIR = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "tpm"
FIELDS = ("quote_b64", "signature_b64", "aik_pubkey_b64")
BLOCK_KEYS = ("is_available", "pcr_banks", "pcr_values", "quote_b64", "signature_b64",
              "aik_pubkey_b64")

HASH_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
AIK_ATTRS = 0x00050072  # fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign
CURVE_IDS = {"secp256r1": 0x0003, "secp384r1": 0x0004, "secp521r1": 0x0005}


def load_vectors() -> dict[str, dict]:
    """All vector files by stem; skips (naming the path) when shared/ is not beside the repo."""
    files = sorted(VECTOR_DIR.glob("*.json"))
    if not files:
        pytest.skip(f"TPM vectors missing: expected shared/vectors/tpm at {VECTOR_DIR}")
    return {f.stem: json.loads(f.read_text()) for f in files}


def block_of(vector: dict) -> dict:
    """Only the protocol's `tpm_attestation` keys of a vector (deep copy, safe to mutate)."""
    return copy.deepcopy({k: vector[k] for k in BLOCK_KEYS})


def flip(b64: str, pos: int, mask: int) -> str:
    """Base64 of the decoded field with byte `pos` XORed with `mask`."""
    raw = bytearray(base64.b64decode(b64))
    raw[pos] ^= mask
    return base64.b64encode(bytes(raw)).decode()


# Byte 8 of TPM2B_PUBLIC holds object-attribute bits 8-15; 0x04 there is noDA, the one
# attribute an AIK may have or not (test_optional_noda_is_accepted shows why it is unbound).
NODA_FLIP = ("aik_pubkey_b64", 8, 0x04)
FLIP_MASKS = (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF)


def assert_every_flip_rejected(block: dict, payload_id: str, field: str) -> int:
    """Flip every bit of every byte of `field` (and invert each byte): each copy must be
    invalid with at least one string reason. Returns the number of copies checked."""
    from nomyo.attestation import verify_tpm_attestation

    checked = 0
    for pos in range(len(base64.b64decode(block[field]))):
        for mask in FLIP_MASKS:
            if (field, pos, mask) == NODA_FLIP:
                continue
            tampered = copy.deepcopy(block)
            tampered[field] = flip(block[field], pos, mask)
            result = verify_tpm_attestation(tampered, payload_id)
            assert not result.valid, (field, pos, mask)
            assert result.reasons and all(isinstance(r, str) for r in result.reasons)
            checked += 1
    return checked


# ---- software quotes: marshalled here, signed with cryptography keys ----

def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def public_area(key, scheme: int, scheme_hash: str = "sha256", attrs: int = AIK_ATTRS,
                name_alg: str = "sha256") -> bytes:
    """TPM2B_PUBLIC for an RSA or ECC public key with the given signing scheme."""
    scheme_part = struct.pack(">H", scheme)
    if scheme != 0x0010:
        scheme_part += struct.pack(">H", HASH_IDS[scheme_hash])
    head = struct.pack(">HI", HASH_IDS[name_alg], attrs) + _tpm2b(b"") + struct.pack(">H", 0x0010)
    if isinstance(key, rsa.RSAPublicKey):
        nums = key.public_numbers()
        exponent = 0 if nums.e == 65537 else nums.e
        body = (struct.pack(">H", 0x0001) + head + scheme_part
                + struct.pack(">HI", key.key_size, exponent)
                + _tpm2b(nums.n.to_bytes((key.key_size + 7) // 8, "big")))
    else:
        nums = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        body = (struct.pack(">H", 0x0023) + head + scheme_part
                + struct.pack(">HH", CURVE_IDS[key.curve.name], 0x0010)
                + _tpm2b(nums.x.to_bytes(size, "big")) + _tpm2b(nums.y.to_bytes(size, "big")))
    return _tpm2b(body)


def attest_bytes(extra_data: bytes, selections: list[tuple[str, list[int]]], pcr_digest: bytes,
                 qualified_signer: bytes = b"\x00\x0b" + bytes(32)) -> bytes:
    """A TPMS_ATTEST of type ATTEST_QUOTE with 3-byte PCR bitmaps."""
    sel = struct.pack(">I", len(selections))
    for bank, indices in selections:
        bitmap = bytearray(3)
        for i in indices:
            bitmap[i // 8] |= 1 << (i % 8)
        sel += struct.pack(">HB", HASH_IDS[bank], 3) + bytes(bitmap)
    return (struct.pack(">IH", 0xFF544347, 0x8018) + _tpm2b(qualified_signer)
            + _tpm2b(extra_data) + struct.pack(">QIIB", 1234, 1, 0, 1)
            + struct.pack(">Q", 0x2019102300163636) + sel + _tpm2b(pcr_digest))


def sign(private_key, message: bytes, scheme: str, hash_name: str = "sha256",
         pss_salt: int | None = None) -> bytes:
    """TPMT_SIGNATURE over `message`: scheme is rsassa, rsapss or ecdsa."""
    algorithm = getattr(hashes, hash_name.upper())()
    hash_id = HASH_IDS[hash_name]
    if scheme == "ecdsa":
        r, s = decode_dss_signature(private_key.sign(message, ec.ECDSA(algorithm)))
        size = (private_key.curve.key_size + 7) // 8
        return (struct.pack(">HH", 0x0018, hash_id) + _tpm2b(r.to_bytes(size, "big"))
                + _tpm2b(s.to_bytes(size, "big")))
    if scheme == "rsassa":
        sig = private_key.sign(message, padding.PKCS1v15(), algorithm)
        return struct.pack(">HH", 0x0014, hash_id) + _tpm2b(sig)
    salt = algorithm.digest_size if pss_salt is None else pss_salt
    sig = private_key.sign(message, padding.PSS(padding.MGF1(algorithm), salt), algorithm)
    return struct.pack(">HH", 0x0016, hash_id) + _tpm2b(sig)


def soft_block(private_key, scheme: str, payload_id: str, *, hash_name: str = "sha256",
               banks: dict[str, dict[int, bytes]] | None = None, binding: str = "raw",
               pss_salt: int | None = None, attrs: int = AIK_ATTRS,
               key_scheme: int | None = None) -> dict:
    """A complete `tpm_attestation` block signed by a software key (not a TPM)."""
    banks = banks or {"sha256": {0: bytes(32), 7: b"\x07" * 32, 10: b"\x0a" * 32}}
    raw = payload_id.encode()
    extra = raw if binding == "raw" else hashlib.sha256(raw).digest()
    selections = [(bank, sorted(values)) for bank, values in banks.items()]
    concat = b"".join(banks[bank][i] for bank, idx in selections for i in idx)
    digest = hashlib.new(hash_name, concat).digest()
    quote = attest_bytes(extra, selections, digest)
    scheme_ids = {"rsassa": 0x0014, "rsapss": 0x0016, "ecdsa": 0x0018}
    public = public_area(private_key.public_key(),
                         scheme_ids[scheme] if key_scheme is None else key_scheme,
                         hash_name, attrs)
    return {
        "is_available": True,
        "pcr_banks": "+".join(f"{b}:{','.join(map(str, idx))}" for b, idx in selections),
        "pcr_values": {b: {str(i): v.hex() for i, v in vals.items()} for b, vals in banks.items()},
        "quote_b64": base64.b64encode(quote).decode(),
        "signature_b64": base64.b64encode(
            sign(private_key, quote, scheme, hash_name, pss_salt)).decode(),
        "aik_pubkey_b64": base64.b64encode(public).decode(),
    }


# ---- a real swtpm on loopback ----

SWTPM_PROGRAMS = {"swtpm": "swtpm", "tpm2_quote": "tpm2-tools"}


def missing_tpm_packages() -> list[str]:
    """Debian packages whose programs are not on PATH (the state dir needs no swtpm_setup,
    and tpm2-tools pulls in the swtpm TCTI, libtss2-tcti-swtpm0)."""
    return sorted({pkg for prog, pkg in SWTPM_PROGRAMS.items() if shutil.which(prog) is None})


def _free_port_pair() -> int:
    """A free loopback port whose successor is free too: the swtpm TCTI expects the control
    channel on port + 1."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@contextlib.contextmanager
def running_swtpm() -> Iterator[str]:
    """Start swtpm (TPM 2.0, started and cleared) on free loopback ports with a temporary
    state dir; yield its tcti string; stop it afterwards."""
    missing = missing_tpm_packages()
    if missing:
        pytest.skip(f"swtpm tests need the Debian packages: {' '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="nomyo-swtpm-") as state:
        for _attempt in range(5):
            port = _free_port_pair()
            ctrl = port + 1
            proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
                 "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
                 "--flags", "not-need-init,startup-clear"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if _wait_listening(proc, port):
                break
            proc.kill()
            proc.wait()
        else:
            pytest.fail("swtpm did not start listening on loopback")
        try:
            yield f"swtpm:host=127.0.0.1,port={port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False  # e.g. the port was taken between probing and binding
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False
