"""The fuzz targets (targets.py) under hypothesis, a bounded number of examples each.

NOMYO_FUZZ_EXAMPLES sets the number (default 300); security/fuzz/run.py drives the same
targets coverage-guided with atheris for a fixed time. Each target's check is also shown
to bite: a deliberately wrong decoder must be caught.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nomyo.memory import binding
from security.fuzz import targets

EXAMPLES = int(os.environ.get("NOMYO_FUZZ_EXAMPLES", "300"))
_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow])
_B64ISH = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \n-_",
                  max_size=64).map(str.encode)
_NEEDS_NATIVE = pytest.mark.skipif(binding.pyobjects is None,
                                   reason="the span reader needs the native helper")
_JSONISH = st.text(alphabet='{}[]":,0123456789.eE+-truefalsnul\\ \u00e9\u2028\ud800x',
                   max_size=64).map(lambda s: s.encode("utf-8", "surrogatepass"))


@pytest.mark.slow
@_SETTINGS
@given(st.binary(max_size=128) | _B64ISH)
def test_b64(data: bytes) -> None:
    targets.b64_target(data)


@pytest.mark.slow
@pytest.mark.parametrize("target", [
    targets.json_loads_target, targets.json_dumps_target,
    pytest.param(targets.json_spans_target, marks=_NEEDS_NATIVE)], ids=["loads", "dumps", "spans"])
@_SETTINGS
@given(data=st.binary(max_size=128) | _JSONISH)
def test_json(target, data: bytes) -> None:
    target(data)


@pytest.mark.slow
@settings(_SETTINGS, max_examples=max(EXAMPLES // 3, 1))
@given(st.binary(max_size=40))
def test_envelope_mutations(data: bytes) -> None:
    targets.envelope_target(data)


@pytest.mark.skipif(not targets.STDLIB_IS_REFERENCE,
                    reason="needs CPython 3.11: only its b64decode is the codec's reference")
def test_b64_check_bites(monkeypatch) -> None:
    """A decoder that also accepts surplus padding must fail the target."""
    real = targets.b64.decode

    def lenient(text):
        body = bytes(text).rstrip(b"=")
        return real(body + b"=" * (-len(body) % 4))
    monkeypatch.setattr(targets.b64, "decode", lenient)
    with pytest.raises(AssertionError):
        targets.b64_target(b"QQ===")


def test_envelope_check_bites(monkeypatch) -> None:
    """An error type other than PackageError/SecurityError escapes the target."""
    def broken(*args, **kwargs):
        raise KeyError("unexpected")
    monkeypatch.setattr(targets.envelope, "open_package", broken)
    with pytest.raises(KeyError):
        targets.envelope_target(b"\x00")


def test_json_loads_check_bites(monkeypatch) -> None:
    """A reader that turns 1e400 into infinity, or 1.0 into 1, must fail the target."""
    import json

    monkeypatch.setattr(targets.secure_json, "loads", lambda data: json.loads(bytes(data)))
    with pytest.raises(AssertionError):
        targets.json_loads_target(b"[1e400]")
    monkeypatch.setattr(targets.secure_json, "loads", lambda data: [1])
    with pytest.raises(AssertionError):
        targets.json_loads_target(b"[1.0]")


@_NEEDS_NATIVE
def test_json_spans_check_bites(monkeypatch) -> None:
    """A span reader whose size is off by one, or that builds a str, must fail the target."""
    monkeypatch.setattr(targets.secure_json, "spans", lambda data: [(2, 3, 2)])
    with pytest.raises(AssertionError):
        targets.json_spans_target(b'["a"]')
    monkeypatch.setattr(targets.secure_json, "spans", targets.secure_json.loads)
    with pytest.raises(AssertionError):
        targets.json_spans_target(b'["ab"]')
