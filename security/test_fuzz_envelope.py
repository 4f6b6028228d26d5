"""Fuzz `open_package`: for any input bytes only PackageError or SecurityError may escape."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nomyo.errors import PackageError, SecurityError
from nomyo.protocol import envelope
from tests.server_fixtures import keypair

_SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_b64 = st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode())
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | _b64,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _open(data: bytes) -> None:
    try:
        with envelope.open_package(data, keypair("server")):
            pass
    except (PackageError, SecurityError):
        pass


@pytest.mark.slow
@_SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _open(data)


@pytest.mark.slow
@_SETTINGS
@given(
    version=st.sampled_from(["1.0", "1.1", 1.0, None]) | _json_value,
    algorithm=st.sampled_from([envelope.ALGORITHM, "x"]) | _json_value,
    ciphertext=_b64 | _json_value,
    nonce=st.binary(min_size=11, max_size=13).map(lambda b: base64.b64encode(b).decode())
    | _json_value,
    tag=st.one_of(
        st.just(None),
        st.binary(min_size=15, max_size=17).map(lambda b: base64.b64encode(b).decode()),
        _json_value,
    ),
    wrapped=st.binary(min_size=510, max_size=514).map(lambda b: base64.b64encode(b).decode())
    | _json_value,
    extra=st.dictionaries(st.text(max_size=10), _json_value, max_size=3),
)
def test_structured_packages(version, algorithm, ciphertext, nonce, tag, wrapped, extra) -> None:
    payload = {"ciphertext": ciphertext, "nonce": nonce}
    if tag is not None:
        payload["tag"] = tag
    doc = {
        **extra,
        "version": version,
        "algorithm": algorithm,
        "encrypted_payload": payload,
        "encrypted_aes_key": wrapped,
    }
    _open(json.dumps(doc).encode())


@pytest.mark.slow
@_SETTINGS
@given(st.data())
def test_mutated_real_package(data) -> None:
    """Replace, delete and insert bytes of a genuine package (found an empty-ciphertext case)."""
    package = bytearray(envelope.seal_json({"m": "hello"}, keypair("server").public_key))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(package) - 1))
        action = data.draw(st.sampled_from(["replace", "delete", "insert"]))
        if action == "replace":
            package[i] = data.draw(st.integers(0, 255))
        elif action == "delete":
            del package[i : i + data.draw(st.integers(1, 64))]
        else:
            package[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        if not package:
            break
    _open(bytes(package))


@pytest.mark.slow
@_SETTINGS
@given(
    field=st.sampled_from(["ciphertext", "nonce", "tag", "encrypted_aes_key"]),
    size=st.integers(0, 1100),
    layout=st.sampled_from(envelope.TAG_LAYOUTS),
)
def test_fields_of_every_length(field, size, layout) -> None:
    doc = json.loads(envelope.seal_json({"m": 1}, keypair("server").public_key, tag_layout=layout))
    value = base64.b64encode(bytes(size)).decode()
    if field == "encrypted_aes_key":
        doc[field] = value
    else:
        doc["encrypted_payload"][field] = value
    _open(json.dumps(doc).encode())
