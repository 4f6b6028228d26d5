"""Fuzz targets: each takes arbitrary bytes and raises AssertionError only on a real finding.

The same functions are driven two ways: by hypothesis inside pytest (test_fuzz_targets.py,
a bounded number of examples), and by atheris, coverage-guided, for a bounded time
(`python -m security.fuzz.run TARGET SECONDS`), where atheris installs.

- b64: the native codec against `base64.b64decode(validate=True)`: same bytes or both
  refuse (ValueError); decode_into writes only [offset, end), and on refusal leaves only
  zeros where it had written.
- json_loads / json_dumps: secure_json (its native reader, its writer) against the stdlib
  json (compact, UTF-8, NaN, infinities and out-of-range numbers refused, surrogates refused
  when writing).
- json_spans: the span reader (what a SecureAnswer reads) against json.loads: each string
  value's span, unescaped by json_unescape_into, is json.loads's str in UTF-8 (a lone
  surrogate refused, its size counted as its 3-byte form), and both refuse the same documents.
- envelope: open_package on mutations of valid packages: only PackageError or SecurityError.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import sys
from functools import lru_cache
from typing import Any

from nomyo.errors import PackageError, SecurityError
from nomyo.memory import secure_json
from nomyo.protocol import b64, envelope

# The codec's acceptance rules are CPython 3.11's b64decode(validate=True); 3.10, 3.12 and
# 3.13 differ on '=' after a complete group (tests/protocol/test_b64.py), so only a 3.11
# interpreter is a reference. Elsewhere the target still checks decode_into's invariants.
STDLIB_IS_REFERENCE = sys.version_info[:2] == (3, 11)


def b64_target(data: bytes) -> None:
    try:
        expected: bytes | None = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        expected = None
    try:
        got: bytes | None = b64.decode(data)
    except ValueError:
        got = None
    if STDLIB_IS_REFERENCE:
        assert got == expected, f"decode differs from base64.b64decode on {data!r}"
    else:
        expected = got  # no stdlib reference here: decode_into must agree with decode
    offset = len(data) % 5
    sentinel = 0xA5
    out = bytearray([sentinel]) * (offset + len(data) * 3 // 4 + 4)
    try:
        end = b64.decode_into(data, out, offset)
    except ValueError:
        assert expected is None, f"decode_into refused what base64 accepts: {data!r}"
        # what it wrote before finding the bad character is zeroed, never left decoded
        assert set(out) <= {sentinel, 0}, "decode_into left decoded bytes behind a refusal"
        assert out[:offset] == bytearray([sentinel]) * offset, "wrote before its offset"
    else:
        assert expected is not None, f"decode_into accepted what base64 refuses: {data!r}"
        assert out[offset:end] == expected
        untouched = out[:offset] + out[end:]
        assert untouched == bytearray([sentinel]) * len(untouched), "wrote outside its range"
    assert b64.encode(data) == base64.b64encode(data)


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("out of range")  # the contract: 1e400 is refused, not infinity
    return value


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _json_reference(data: bytes) -> tuple[bool, Any]:
    """What json.loads makes of `data` with NaN, infinities and out-of-range numbers refused:
    (True, value), or (False, None) when it refuses."""
    try:
        return True, json.loads(data.decode("utf-8"), parse_constant=_refuse_constant,
                                parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False, None


def json_loads_target(data: bytes) -> None:
    """The native reader (csrc/pyobjects.c json_loads) against json.loads with NaN,
    infinities and out-of-range numbers refused: equal values of equal types, or both refuse
    (deeper nesting than MAX_DEPTH is refused by the reader alone)."""
    ok, expected = _json_reference(data)
    try:
        got = secure_json.loads(data)
    except PackageError:
        assert not ok or _depth(expected) > secure_json.MAX_DEPTH, (
            f"secure_json.loads refused what json accepts: {data!r}")
        return
    assert ok, f"secure_json.loads accepted what json refuses: {data!r}"
    # repr tells 1 from 1.0 and True, -0.0 from 0.0, and compares key order
    assert got == expected and repr(got) == repr(expected), (
        f"secure_json.loads differs on {data!r}")


_SURROGATE = "<lone surrogate: refused>"


def _unescaped(data: bytes, node: Any) -> Any:
    """The spans tree with every span replaced by its text, through json_unescape_into."""
    from nomyo.memory import binding

    if type(node) is tuple:
        start, end, size = node
        out = bytearray(size + 1)  # one byte spare: the writer must stop at `size`
        try:
            written = binding.pyobjects.json_unescape_into(data, start, end, out)
        except ValueError as exc:
            assert str(exc) == secure_json.SURROGATES_REFUSED, exc
            assert not any(out), "json_unescape_into left text behind a refusal"
            return _SURROGATE, size
        assert written == size and out[size] == 0, f"wrote {written} of {size} bytes"
        return out[:size].decode("utf-8"), size
    if isinstance(node, dict):
        return {k: _unescaped(data, v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unescaped(data, v) for v in node]
    return node


def _as_spans(value: Any) -> Any:
    """json.loads's value in _unescaped's form: each str as (text, UTF-8 size)."""
    if isinstance(value, str):
        size = len(value.encode("utf-8", "surrogatepass"))
        has_surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in value)
        return (_SURROGATE if has_surrogate else value), size
    if isinstance(value, dict):
        return {k: _as_spans(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_spans(v) for v in value]
    return value


def json_spans_target(data: bytes) -> None:
    """secure_json.spans against json.loads (see the module docstring)."""
    ok, expected = _json_reference(data)
    try:
        tree = secure_json.spans(data)
    except PackageError:
        assert not ok or _depth(expected) > secure_json.MAX_DEPTH, (
            f"secure_json.spans refused what json accepts: {data!r}")
        return
    assert ok, f"secure_json.spans accepted what json refuses: {data!r}"
    got = _unescaped(data, tree)
    assert got == _as_spans(expected) and repr(got) == repr(_as_spans(expected)), (
        f"secure_json.spans differs on {data!r}")


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return False


def json_dumps_target(data: bytes) -> None:
    """Strings of any code point (UTF-16 view of the input, lone surrogates included), as
    values and keys; and the input itself parsed as JSON when it is JSON."""
    text = data.decode("utf-16-le", errors="surrogatepass") if len(data) % 2 == 0 else (
        data.decode("latin-1"))
    candidates: list[Any] = [text, {text: [text, 1]}]
    try:
        candidates.append(json.loads(data.decode("utf-8"), parse_constant=_refuse_constant))
    except (UnicodeDecodeError, ValueError, RecursionError):
        pass
    for obj in candidates:
        try:
            reference = json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                                   allow_nan=False).encode("utf-8")
        except ValueError:  # UnicodeEncodeError included
            reference = None  # a lone surrogate (no UTF-8 form), or inf from 1e400
        except RecursionError:
            continue
        try:
            buf = secure_json.dumps(obj)
        except ValueError:
            assert reference is None or _depth(obj) > secure_json.MAX_DEPTH, (
                f"secure_json.dumps refused what json writes: {obj!r}")
            continue
        with buf, memoryview(buf) as view:
            written = view.tobytes()
        assert reference is not None, f"secure_json.dumps wrote what json refuses: {obj!r}"
        assert written == reference, f"secure_json.dumps differs from json on {obj!r}"


@lru_cache(maxsize=1)
def _packages() -> tuple[bytes, ...]:
    from tests.server_fixtures import keypair
    public = keypair("server").public_key
    return tuple(envelope.seal(plain, public, tag_layout=layout)
                 for plain in (b"x", b'{"messages":[{"role":"user","content":"hi"}]}')
                 for layout in envelope.TAG_LAYOUTS)


def envelope_target(data: bytes) -> None:
    """Byte 0 picks a valid package; each following 3 bytes overwrite, insert or delete one
    byte at a position; a trailing lone byte truncates."""
    from tests.server_fixtures import keypair
    packages = _packages()
    package = bytearray(packages[data[0] % len(packages)] if data else packages[0])
    ops = data[1:]
    for i in range(0, len(ops) - 2, 3):
        pos = (ops[i] << 8 | ops[i + 1]) % (len(package) + 1)
        kind, value = ops[i + 2] % 4, ops[i + 2]
        if kind == 0 and pos < len(package):
            package[pos] = value
        elif kind == 1:
            package.insert(pos, value)
        elif kind == 2 and pos < len(package):
            del package[pos]
        elif kind == 3 and pos < len(package):
            package[pos] ^= 1 << (value % 8)
    if len(ops) % 3 == 1:
        del package[ops[-1] * len(package) // 256:]
    try:
        with envelope.open_package(bytes(package), keypair("server")):
            pass
    except (PackageError, SecurityError):
        pass


TARGETS = {
    "b64": b64_target,
    "json_loads": json_loads_target,
    "json_dumps": json_dumps_target,
    "json_spans": json_spans_target,
    "envelope": envelope_target,
}
