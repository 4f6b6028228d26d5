"""Strict base64 in Python on binascii: nomyo._b64's behaviour where it is not built.

Same acceptance as CPython 3.11's `base64.b64decode(text, validate=True)` on every Python
version (3.10 refuses three or more `=` after a complete group, 3.13 any), same ValueError
messages, same TypeErrors. The strict check is done here; binascii's lenient decoder then only
sees text this module accepted, which it decodes exactly as the strict one would.
"""
from __future__ import annotations

import binascii
import operator
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_OUTSIDE = re.compile(r"[^A-Za-z0-9+/=]")
_NOT_PAD = re.compile(r"[^=]")
_TEXT = "text must be an ASCII str or a C-contiguous bytes-like object"


@contextmanager
def _borrowed(obj: Any, what: str, writable: bool = False) -> Iterator[memoryview]:
    """obj's memory as flat unsigned bytes, released on exit; TypeError as nomyo._b64 raises it."""
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{what}, not '{type(obj).__name__}'") from None
    try:
        if not view.c_contiguous or (writable and view.readonly):
            raise TypeError(f"{what}, not '{type(obj).__name__}'")
        with view.cast("B") as flat:
            yield flat
    finally:
        view.release()


def _explain(text: str) -> ValueError:
    """The error for invalid text, first applicable rule first, worded as csrc/b64codec.c does.

    Bytes are passed decoded as latin-1, so positions are byte positions.
    """
    bad = _OUTSIDE.search(text)
    if bad:
        return ValueError(f"invalid base64 character at position {bad.start()}")
    first_pad = text.find("=")
    if first_pad == 0:
        return ValueError("incorrect base64 padding: '=' at the start")
    after = _NOT_PAD.search(text, first_pad) if first_pad > 0 else None
    if after:
        return ValueError(
            f"incorrect base64 padding: data character after '=' at position {after.start()}")
    data = len(text) - text.count("=")
    if data % 4 == 1:
        return ValueError(f"invalid base64 length: the number of data characters ({data}) "
                          "is 1 more than a multiple of 4")
    return ValueError(f"incorrect base64 padding: {len(text) - data} '=' where the last group "
                      f"needs {4 - data % 4}")


def _ascii(text: Any) -> bytes:
    """The text as bytes; a non-ASCII str is invalid base64 (ValueError)."""
    if isinstance(text, str):
        if not text.isascii():
            raise _explain(text)
        return text.encode("ascii")
    if type(text) is bytes:
        return text
    with _borrowed(text, _TEXT) as view:
        return view.tobytes()


def _layout(raw: bytes) -> tuple[int, int]:
    """(data characters, decoded length) from the trailing '=' run and the padding and length
    rules, or the ValueError explaining the text; the data characters are checked apart."""
    pads = len(raw) - len(raw.rstrip(b"="))
    data = len(raw) - pads
    left = data % 4
    if (pads and not data) or left == 1 or (left == 2 and pads != 2) or (left == 3 and pads != 1):
        raise _explain(raw.decode("latin-1"))
    return data, data // 4 * 3 + max(left - 1, 0)


def _check_alphabet(raw: bytes, data: int) -> None:
    """ValueError unless the first `data` characters are all in the alphabet."""
    if len(raw.translate(None, _ALPHABET)) != len(raw) - data:
        raise _explain(raw.decode("latin-1"))


def _checked_length(raw: bytes) -> int:
    """Decoded length of raw, or the ValueError explaining why it is not strict base64."""
    data, length = _layout(raw)
    _check_alphabet(raw, data)
    return length


def encode(data: Any, /) -> bytes:
    """Standard base64 of a C-contiguous buffer, '=' padded, no newline (= base64.b64encode)."""
    with _borrowed(data, "data must be a C-contiguous bytes-like object") as view:
        return binascii.b2a_base64(view, newline=False)


def decode(text: Any, /) -> bytes:
    """Decode strict base64 (= base64.b64decode(text, validate=True)); ValueError if invalid."""
    raw = _ascii(text)
    _checked_length(raw)
    return binascii.a2b_base64(raw)


def decode_into(text: Any, out: Any, offset: int, /) -> int:
    """Decode strict base64 into out[offset:] and return the end offset. On ValueError no
    decoded byte is left in out: offset, padding, length and size errors are found before
    writing; a character outside the alphabet zeroes the range, as the native one-pass does."""
    offset = operator.index(offset)
    raw = _ascii(text)
    with _borrowed(out, "out must be a writable C-contiguous bytes-like object", True) as view:
        if not 0 <= offset <= len(view):
            raise ValueError(f"offset {offset} is outside the output buffer (length {len(view)})")
        data, length = _layout(raw)
        if length > len(view) - offset:
            raise ValueError(f"output buffer too small: {length} bytes decoded, "
                             f"{len(view) - offset} available at offset {offset}")
        try:
            _check_alphabet(raw, data)
        except ValueError:
            view[offset:offset + length] = bytes(length)
            raise
        view[offset:offset + length] = binascii.a2b_base64(raw)
    return offset + length
