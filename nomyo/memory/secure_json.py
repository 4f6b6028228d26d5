"""JSON straight into and out of secure memory.

`json.dumps` grows its output by reallocating, leaving prefixes of the whole document in
freed heap memory; `bytes(...).decode()` leaves another copy. Here the document is sized
first and written once into a SecureBuffer, strings escaped by the native glue directly
from the caller's objects; parsing (csrc/pyobjects.c json_loads) builds each str once at its
exact size straight from the buffer, with no intermediate text.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from nomyo.errors import PackageError
from nomyo.memory import binding
from nomyo.memory.buffer import SecureBuffer

MAX_DEPTH = 256

_LITERALS = {True: b"true", False: b"false"}


def _key_piece(key: Any) -> Any:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return _scalar(key).decode("ascii")  # JSON turns such keys into strings, like json
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _scalar(value: Any) -> bytes:
    if value is None:
        return b"null"
    if value is True or value is False:
        return _LITERALS[value]
    if isinstance(value, int):
        return int.__repr__(value).encode("ascii")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("NaN and infinity are not valid JSON")
        return float.__repr__(value).encode("ascii")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _collect(value: Any, out: list, depth: int) -> None:
    """Flatten into pieces: str objects (quoted later, in C) and ASCII bytes literals."""
    if depth > MAX_DEPTH:
        raise ValueError("JSON document nested too deeply")
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        out.append(b"{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(b",")
            out.append(_key_piece(key))
            out.append(b":")
            _collect(item, out, depth + 1)
        out.append(b"}")
    elif isinstance(value, (list, tuple)):
        out.append(b"[")
        for i, item in enumerate(value):
            if i:
                out.append(b",")
            _collect(item, out, depth + 1)
        out.append(b"]")
    else:
        out.append(_scalar(value))


def dumps(obj: Any, alloc: Callable[[int], SecureBuffer] = SecureBuffer) -> SecureBuffer:
    """Serialise obj as compact UTF-8 JSON into `alloc(size)`: by default a new SecureBuffer
    the caller closes, or a reused one (see envelope.Workspace)."""
    glue = binding.pyobjects
    if glue is None:  # fallback backend: the document passes through the heap once
        return _fallback_dumps(obj, alloc)
    pieces: list = []
    _collect(obj, pieces, 0)
    try:
        total = sum(len(p) if type(p) is bytes else glue.json_quote_len(p) for p in pieces)
    except ValueError as exc:  # the C writer's twin of the message below
        if str(exc) != SURROGATES_REFUSED:
            raise
        total = None
    if total is None:  # raised outside the except block, as _fallback_dumps does
        raise SurrogatesRefused(SURROGATES_REFUSED)
    buf = alloc(total)
    try:
        with memoryview(buf) as out:
            offset = 0
            for piece in pieces:
                if type(piece) is bytes:
                    end = offset + len(piece)
                    out[offset:end] = piece
                    offset = end
                else:
                    offset = glue.json_quote_into(piece, out, offset)
    except BaseException:
        buf.close()
        raise
    return buf


# Both writers refuse surrogates (lone, or a pair stored as two code points) with this error:
# they have no UTF-8 form, and escaping them (as json.dumps would) changes or breaks the text.
SURROGATES_REFUSED = ("JSON strings must not contain surrogates (U+D800 to U+DFFF): "
                      "they have no UTF-8 form")  # = SURROGATES_REFUSED in csrc/pyobjects.c


class SurrogatesRefused(ValueError):
    """A str holds a surrogate, so the document has no UTF-8 form; the message names no part
    of it. A server told this of a backend's answer answers 502, not 500."""


def _fallback_dumps(obj: Any, alloc: Callable[[int], SecureBuffer]) -> SecureBuffer:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # its .object is the whole document: raised outside, below
        data = None
    if data is None:
        raise SurrogatesRefused(SURROGATES_REFUSED)
    buf = alloc(len(data))
    with memoryview(buf) as out:
        out[:] = data
    return buf


def loads(data: Any) -> Any:
    """Parse UTF-8 JSON from a buffer (native: each str built once from it, nothing else).
    NaN and infinities are refused, as dumps refuses them, and so are numbers out of the
    float range (1e400), which json.loads would turn into infinity; PackageError for all."""
    glue = binding.pyobjects
    if glue is None:  # fallback backend: the decoded text cannot be wiped
        with memoryview(data) as view:
            try:
                text = str(view, "utf-8")
            except UnicodeDecodeError as exc:  # its .object holds the plaintext
                error = f"plaintext is not valid UTF-8 at byte {exc.start}"
            else:
                value, error = _parse(text)
        if error is not None:
            raise PackageError(error)
        return value
    return _native(glue.json_loads, data)


def _native(reader: Callable[[Any], Any], data: Any) -> Any:
    """A native reader's value; its errors as PackageError (they name a position only)."""
    try:
        return reader(data)
    except RecursionError:
        error = "plaintext JSON is nested too deeply"
    except (ValueError, OverflowError) as exc:  # messages name a position, never the text
        error = f"plaintext is not valid JSON: {exc}"
    raise PackageError(error)


Span = tuple[int, int, int]  # a string value left in place: body start, body end, text size


def spans(data: Any) -> Any:
    """Parse UTF-8 JSON from a buffer as `loads` does, except that each string value (object
    keys excepted) is a Span, the offsets of its body in `data` and the UTF-8 size of its
    unescaped text, instead of a str: no secret text leaves the buffer. Native helper only."""
    return _native(_glue("spans").json_spans, data)


def text_into(data: Any, span: Span, alloc: Callable[[int], SecureBuffer] = SecureBuffer
              ) -> SecureBuffer:
    """The unescaped UTF-8 text of a string Span of `data`, written in C into `alloc(size)`
    (a new SecureBuffer by default, the caller's to close). SurrogatesRefused for a lone
    surrogate escape (no UTF-8 form), PackageError when the span is not one of `data`."""
    glue = _glue("text_into")
    start, end, size = span
    buf = alloc(size)
    error = None
    try:
        with memoryview(buf) as out:
            glue.json_unescape_into(data, start, end, out)
    except ValueError as exc:
        error = str(exc)
    except BaseException:
        buf.close()
        raise
    if error is None:
        return buf
    buf.close()  # raised outside the except block, as dumps does: no exception chain
    if error == SURROGATES_REFUSED:
        raise SurrogatesRefused(SURROGATES_REFUSED)
    raise PackageError(f"not a string of this document: {error}")


def _glue(name: str) -> Any:
    glue = binding.pyobjects
    if glue is None:
        raise RuntimeError(f"secure_json.{name} needs the native helper (nomyo._pyobjects)")
    return glue


def _no_constant(name: str) -> Any:
    raise ValueError("NaN and infinity are not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def _parse(text: str) -> tuple[Any, str | None]:
    """(value, None) or (None, message), for the fallback backend. Errors are turned into a
    message here and raised by the caller outside any except block: a JSONDecodeError's .doc
    is the plaintext, and it would otherwise stay reachable through the new exception's
    __context__."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float), None
    except json.JSONDecodeError as exc:
        return None, (f"plaintext is not valid JSON: {exc.msg} "
                      f"(line {exc.lineno} column {exc.colno})")
    except ValueError as exc:
        return None, f"plaintext is not valid JSON: {exc}"
    except RecursionError:
        return None, "plaintext JSON is nested too deeply"
