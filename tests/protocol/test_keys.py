"""RSA key pairs: generation sizes, atomic 0600 save, password round trip, fingerprints."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from nomyo.errors import DisposedError
from nomyo.protocol import keys
from nomyo.protocol.constants import DEFAULT_KEY_BITS
from nomyo.protocol.keys import KeyPair
from tests.server_fixtures import keypair, vector_keys


def test_default_is_4096_and_2048_allowed() -> None:
    assert DEFAULT_KEY_BITS == 4096
    assert KeyPair.generate(2048).key_size == 2048


@pytest.mark.parametrize("bits", [1024, 3000, 8192, "4096"])
def test_other_sizes_refused(bits) -> None:
    with pytest.raises(ValueError, match="key size"):
        KeyPair.generate(bits)


def test_weak_keys_refused_everywhere() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="under 2048"):
        KeyPair(weak)
    with pytest.raises(ValueError, match="under 2048"):
        keys.load_public_key(keys.public_pem(weak))


def test_save_and_load_with_password(tmp_path) -> None:
    pair = KeyPair.generate(2048)
    path = pair.save(tmp_path / "k", password="correct horse")
    assert path.name == "private_key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    public_file = tmp_path / "k" / "public_key.pem"
    assert public_file.read_text() == pair.public_pem
    assert b"ENCRYPTED" in path.read_bytes()
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "private_key.pem",
        "public_key.pem",
    ]
    loaded = KeyPair.load(path, password="correct horse")
    assert loaded.fingerprint == pair.fingerprint
    with pytest.raises(ValueError, match="wrong password"):
        KeyPair.load(path, password="wrong")
    with pytest.raises(ValueError, match="no password"):
        KeyPair.load(path)


def test_private_key_mode_is_0600_from_creation_under_open_umask(tmp_path) -> None:
    # Run in a child with umask 0: a chmod-after-write would leave a 0644 window; ours does not.
    code = (
        "import os, stat, sys; os.umask(0);"
        "from nomyo.protocol.keys import KeyPair; p = KeyPair.generate(2048).save(sys.argv[1]);"
        "print(oct(stat.S_IMODE(p.stat().st_mode)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert out == "0o600"


def test_unencrypted_save_overwrites_atomically(tmp_path) -> None:
    first, second = KeyPair.generate(2048), KeyPair.generate(2048)
    first.save(tmp_path)
    second.save(tmp_path)
    assert KeyPair.load(tmp_path / "private_key.pem").fingerprint == second.fingerprint
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_load_rejects_garbage_and_huge_files(tmp_path) -> None:
    (tmp_path / "bad.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    with pytest.raises(ValueError, match="not a PEM private key"):
        KeyPair.load(tmp_path / "bad.pem")
    (tmp_path / "huge.pem").write_bytes(b"x" * (keys.MAX_PEM_BYTES + 1))
    with pytest.raises(ValueError, match="expected a PEM key file"):
        KeyPair.load(tmp_path / "huge.pem")


def test_fingerprint_is_sha256_of_der_spki() -> None:
    pem = vector_keys()["server_public_pem"]
    der = serialization.load_pem_public_key(pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert keys.fingerprint(pem) == hashlib.sha256(der).hexdigest()
    assert keypair("server").fingerprint == keys.fingerprint(pem)
    assert keypair("server").public_pem.strip() == pem.strip()


def test_close_drops_private_key_and_repr_is_safe() -> None:
    pair = KeyPair.generate(2048)
    assert "BEGIN" not in repr(pair) and "2048" in repr(pair)
    with pair:
        pass
    assert pair.closed
    with pytest.raises(DisposedError):
        _ = pair.private_key
    assert pair.public_pem.startswith("-----BEGIN PUBLIC KEY-----")


def test_public_key_parsing_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="not a PEM public key"):
        keys.load_public_key("-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----")
    with pytest.raises(TypeError):
        keys.load_public_key(42)
