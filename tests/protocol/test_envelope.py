"""Protocol 1.0 envelope: vectors of the published client, both tag layouts, every error path."""

from __future__ import annotations

import base64
import ctypes
import json

import pytest

import nomyo
from nomyo.errors import PackageError, SecurityError
from nomyo.memory import SecureBuffer, secure_json
from nomyo.protocol import envelope, keys
from nomyo.protocol.constants import MAX_PLAINTEXT_BYTES
from nomyo.protocol.keys import KeyPair
from nomyo.protocol.workspace import Workspace
from tests.server_fixtures import keypair, package_bytes, vector, vector_keys, vector_names


@pytest.mark.parametrize("name", vector_names("request"))
def test_opens_requests_sealed_by_published_client(name: str) -> None:
    vec = vector(name)
    obj, info = envelope.open_json(package_bytes(vec), keypair("server"))
    assert obj == vec["plaintext"]
    assert info.tag_layout == envelope.TAG_SEPARATE
    assert info.algorithm == envelope.ALGORITHM


@pytest.mark.parametrize("name", vector_names("response"))
def test_opens_responses_with_processed_at(name: str) -> None:
    vec = vector(name)
    with envelope.open_package(package_bytes(vec), keypair("client")) as opened:
        assert secure_json.loads(opened.plaintext) == vec["plaintext"]
        assert opened.processed_at == vec["expected_metadata_added_by_client"]["processed_at"]
    assert opened.plaintext.closed


@pytest.mark.parametrize("layout", envelope.TAG_LAYOUTS)
def test_round_trip_both_layouts(layout: str) -> None:
    message = {"model": "m", "messages": [{"role": "user", "content": 'Grüße \U0001f642 "x"'}]}
    package = envelope.seal_json(
        message, vector_keys()["client_public_pem"], tag_layout=layout, processed_at=1700000000
    )
    doc = json.loads(package)
    assert doc["version"] == "1.0" and doc["algorithm"] == "hybrid-aes256-rsa4096"
    assert doc["key_algorithm"] == "RSA-OAEP-SHA256"
    assert doc["payload_algorithm"] == "AES-256-GCM"
    assert doc["processed_at"] == 1700000000
    assert ("tag" in doc["encrypted_payload"]) == (layout == envelope.TAG_SEPARATE)
    assert len(base64.b64decode(doc["encrypted_payload"]["nonce"])) == 12
    obj, info = envelope.open_json(package, keypair("client"))
    assert obj == message and info.tag_layout == layout


def _secretmem_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("secretmem" in line for line in f)


def test_workspace_carries_one_exchange_in_one_secure_mapping() -> None:
    """The plaintext slot is reused for the answer and both AES keys live in cells of it:
    one mapping, not four."""
    client, server = keypair("client"), keypair("server")
    before = _secretmem_mappings()
    with Workspace(headroom=4096) as work:
        request = secure_json.dumps({"q": "x" * 5000}, work.plaintext)
        slot = request
        package = envelope.seal(request, server.public_key, workspace=work)
        work.done(request)
        assert request.data.tobytes() == bytes(len(request))  # wiped, kept for the answer
        assert envelope.open_json(package, server)[0] == {"q": "x" * 5000}
        answer = envelope.seal_json({"a": "y" * 8000}, client.public_key)
        obj, _ = envelope.open_json(answer, client, workspace=work)
        assert obj == {"a": "y" * 8000}
        assert not slot.closed and slot.data.tobytes() == bytes(len(slot))  # held the answer
        if nomyo.get_memory_protection_info()["allocator"] == "memfd_secret":
            assert _secretmem_mappings() - before == 1
    assert slot.closed and _secretmem_mappings() == before


def test_workspace_key_cell_is_wiped_and_never_shared() -> None:
    with Workspace() as work:
        plaintext = work.plaintext(100)
        key = work.key(32)
        assert 0 < plaintext.address - key.address <= 64  # in the slot's page, below its data
        key.fill_random()
        where = key.address
        assert any(ctypes.string_at(where, 32))
        second = work.key(32)  # while the cell is out: a slot of its own, never the same bytes
        assert second.address != where and len(second) == 32
        with pytest.raises(BufferError):
            work.plaintext(200)  # the slot cannot move under a live cell
        work.done(key)
        assert key.closed and ctypes.string_at(where, 32) == bytes(32)
        assert work.plaintext(200) is plaintext  # free to move again
        work.done(second)
        assert not second.closed and second.data.tobytes() == bytes(32)


def test_workspace_key_without_room_in_the_slot_gets_its_own_mapping() -> None:
    page = 4096
    with Workspace(headroom=0) as work:
        full = work.plaintext(page - 8)  # the canary and data fill the one page
        key = work.key(32)
        assert abs(full.address - key.address) >= page and not key.closed


def test_workspace_replaces_a_slot_too_small_and_wipes_on_failure() -> None:
    client = keypair("client")
    with Workspace() as work:
        small = work.plaintext(10)
        big_answer = envelope.seal_json({"a": "z" * 10_000}, client.public_key)
        with envelope.open_package(big_answer, client, workspace=work) as opened:
            assert small.closed and opened.plaintext is not small
            slot = opened.plaintext
        assert not slot.closed and slot.data.tobytes() == bytes(len(slot))
        doc = json.loads(big_answer)
        doc["encrypted_payload"]["nonce"] = base64.b64encode(bytes(12)).decode()
        with pytest.raises(SecurityError):
            envelope.open_package(json.dumps(doc).encode(), client, workspace=work)
        assert not slot.closed and slot.data.tobytes() == bytes(len(slot))
    assert slot.closed


def test_appended_layout_is_ciphertext_plus_tag() -> None:
    with SecureBuffer.copy_of(b"0123456789") as plaintext:
        separate = json.loads(envelope.seal(plaintext, keypair("client").public_key))
    payload = separate["encrypted_payload"]
    joined = base64.b64decode(payload["ciphertext"]) + base64.b64decode(payload.pop("tag"))
    payload["ciphertext"] = base64.b64encode(joined).decode()
    with envelope.open_package(json.dumps(separate).encode(), keypair("client")) as opened:
        assert opened.tag_layout == envelope.TAG_APPENDED
        with memoryview(opened.plaintext) as view:
            assert view.tobytes() == b"0123456789"


def test_fresh_key_and_nonce_every_time() -> None:
    packages = [
        json.loads(envelope.seal_json({"a": 1}, keypair("client").public_key)) for _ in range(3)
    ]
    assert len({p["encrypted_aes_key"] for p in packages}) == 3
    assert len({p["encrypted_payload"]["nonce"] for p in packages}) == 3


def test_plaintext_over_10_mib_refused_before_encrypting() -> None:
    with (
        SecureBuffer(MAX_PLAINTEXT_BYTES + 1) as big,
        pytest.raises(PackageError, match="at most"),
    ):
        envelope.seal(big, keypair("client").public_key)
    with SecureBuffer(MAX_PLAINTEXT_BYTES) as exact:
        assert envelope.seal(exact, keypair("client").public_key)


def _sealed() -> dict:
    return json.loads(envelope.seal_json({"hello": "world"}, keypair("server").public_key))


def _mutate(path: tuple, value: object) -> bytes:
    doc = _sealed()
    target = doc
    for part in path[:-1]:
        target = target[part]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(doc).encode()


_DELETE = object()


@pytest.mark.parametrize(
    ("package", "message"),
    [
        (b"", "empty"),
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b"[" * 100000, "not valid JSON"),
        (lambda: _mutate(("version",), "0.9"), "version"),
        (lambda: _mutate(("algorithm",), "aes128"), "algorithm"),
        (lambda: _mutate(("encrypted_aes_key",), _DELETE), "missing required fields"),
        (lambda: _mutate(("encrypted_payload",), "x"), "JSON object"),
        (lambda: _mutate(("encrypted_payload", "nonce"), _DELETE), "nonce"),
        (lambda: _mutate(("encrypted_payload", "nonce"), "AAAA"), "12 bytes"),
        (lambda: _mutate(("encrypted_payload", "tag"), "AAAA"), "16 bytes"),
        (lambda: _mutate(("encrypted_payload", "ciphertext"), "%%%"), "base64"),
        (lambda: _mutate(("encrypted_payload", "ciphertext"), 5), "base64 string"),
        (lambda: _mutate(("encrypted_aes_key",), "é"), "base64"),
        (lambda: _mutate(("processed_at",), "soon"), "processed_at"),
    ],
)
def test_structural_problems_are_package_errors(package, message: str) -> None:
    data = package() if callable(package) else package
    with pytest.raises(PackageError, match=message):
        envelope.open_package(data, keypair("server"))


def _flip(path: tuple) -> bytes:
    doc = _sealed()
    target = doc
    for part in path[:-1]:
        target = target[part]
    raw = bytearray(base64.b64decode(target[path[-1]]))
    raw[len(raw) // 2] ^= 1
    target[path[-1]] = base64.b64encode(raw).decode()
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "path",
    [
        ("encrypted_payload", "ciphertext"),
        ("encrypted_payload", "tag"),
        ("encrypted_payload", "nonce"),
        ("encrypted_aes_key",),
    ],
)
def test_tampering_is_one_fixed_security_error(path: tuple) -> None:
    with pytest.raises(SecurityError) as err:
        envelope.open_package(_flip(path), keypair("server"))
    assert str(err.value) == envelope.AUTH_FAILED
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_wrong_key_is_security_error() -> None:
    other = KeyPair.generate(2048)
    with pytest.raises(SecurityError, match="^Decryption failed"):
        envelope.open_package(json.dumps(_sealed()).encode(), other)


def test_empty_plaintext_refused_both_ways() -> None:
    with pytest.raises(PackageError, match="empty plaintext"):
        envelope.seal(b"", keypair("server").public_key)
    for layout in envelope.TAG_LAYOUTS:  # a package whose ciphertext is only the tag
        doc = json.loads(envelope.seal(b"x", keypair("server").public_key, tag_layout=layout))
        raw = base64.b64decode(doc["encrypted_payload"]["ciphertext"])
        doc["encrypted_payload"]["ciphertext"] = base64.b64encode(raw[1:]).decode()
        with pytest.raises(PackageError, match="empty ciphertext"):
            envelope.open_package(json.dumps(doc).encode(), keypair("server"))


def test_non_json_plaintext_is_package_error() -> None:
    with SecureBuffer.copy_of(b"\x00not json") as plaintext:
        package = envelope.seal(plaintext, keypair("server").public_key)
    with pytest.raises(PackageError, match="plaintext is not valid (UTF-8|JSON)"):
        envelope.open_json(package, keypair("server"))


def test_bad_arguments_are_typed() -> None:
    with pytest.raises(ValueError, match="tag_layout"):
        envelope.seal(b"x", keypair("server").public_key, tag_layout="inline")
    with pytest.raises(TypeError, match="bytes-like"):
        envelope.seal("text", keypair("server").public_key)
    with pytest.raises(PackageError, match="must be bytes"):
        envelope.open_package({"version": "1.0"}, keypair("server"))
    with pytest.raises(TypeError, match="KeyPair"):
        envelope.open_package(json.dumps(_sealed()).encode(), "pem")


@pytest.mark.parametrize(
    "internal",
    [
        ValueError("refusing to wipe an object that is still referenced elsewhere"),
        RuntimeError("an internal failure"),
        MemoryError(),
    ],
    ids=["wipe-refused", "runtime", "memory"],
)
@pytest.mark.parametrize("stage", ["unwrap", "unwrap-native", "decrypt"])
def test_internal_errors_surface_as_themselves_not_as_integrity_failures(
    monkeypatch, internal: BaseException, stage: str
) -> None:
    """Only cryptography's verdict (OAEP's ValueError, GCM's InvalidTag) is an integrity
    failure. An error of our own after it, such as the wipe of the unwrapped key's `bytes`
    being refused, is raised as itself: relabelled, it hid a broken build as tampering."""
    package = json.dumps(_sealed()).encode()

    def failing(*args: object, **kwargs: object) -> None:
        raise internal

    key = keypair("server")
    if stage == "unwrap":  # the cryptography path: its bytes are adopted into secure memory
        monkeypatch.setattr(envelope, "adopt_bytes", failing)
        key = _cryptography_key("server")
    elif stage == "unwrap-native":
        if not isinstance(key.private_key, keys.SecureRsaKey):
            pytest.skip("native private keys are off: needs NOMYO_SECURE_PRIVATE_KEYS=1 and "
                        "nomyo._osslkey built (.ci/run has a pass with them on)")
        monkeypatch.setattr(keys.binding, "rsa_decrypt_into", failing)
    else:
        monkeypatch.setattr(envelope, "AESGCM", failing)
    with pytest.raises(type(internal)) as err:
        envelope.open_package(package, key)
    assert err.value is internal and not isinstance(err.value, SecurityError)


def test_a_refused_wipe_of_the_unwrapped_key_surfaces_as_itself() -> None:
    """The real thing, unmocked: a private key whose decrypt keeps its answer (another holder
    of the AES key's `bytes`) makes the wipe refuse; that is a WipeRefusedError, not an
    integrity failure, and the kept bytes are left as they were."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from nomyo.errors import WipeRefusedError

    class KeepsItsAnswers:
        def __init__(self, key: rsa.RSAPrivateKey) -> None:
            self.key, self.kept = key, []

        def decrypt(self, ciphertext: bytes, pad: object) -> bytes:
            plain = self.key.decrypt(ciphertext, pad)
            self.kept.append(plain)
            return plain

    rsa.RSAPrivateKey.register(KeepsItsAnswers)
    key = KeepsItsAnswers(_cryptography_key("server"))
    with pytest.raises(WipeRefusedError, match="referenced elsewhere"):
        envelope.open_package(json.dumps(_sealed()).encode(), key)
    assert len(key.kept) == 1 and len(key.kept[0]) == 32 and any(key.kept[0])


def _cryptography_key(role: str) -> object:
    """The vectors' private key as a `cryptography` object (the fallback path)."""
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(
        vector_keys()[f"{role}_private_pem"].encode("ascii"), None)


def test_hand_over_gives_the_slot_away_or_an_exact_copy_of_a_much_larger_one():
    """A kept secret (a SecureAnswer's plaintext) leaves the workspace: the slot itself when
    it fits the secret, else an exact copy made in C, the slot wiped and kept for reuse."""
    from nomyo.protocol.workspace import Workspace

    with Workspace() as work:
        slot = work.plaintext(100)
        with memoryview(slot) as v:
            v[:] = b"s" * 100
        kept = work.hand_over(slot)
        assert kept is slot and work.plaintext(100) is not slot  # forgotten by the workspace
        kept.close()
        big = work.plaintext(20_000)
        small = work.plaintext(10)  # refit: the 20 KB slot now holds 10 bytes
        assert small is big
        with memoryview(small) as v:
            v[:] = b"0123456789"
        copy = work.hand_over(small)
        assert copy is not small and len(copy) == 10 and copy.capacity < small.capacity
        with memoryview(copy) as v:
            assert bytes(v) == b"0123456789"
        with memoryview(small) as v:
            assert bytes(v) == bytes(10)  # the slot was wiped
        assert work.plaintext(10) is small  # and kept for reuse
        copy.close()
