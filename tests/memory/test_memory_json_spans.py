"""The span reader and the unescaper a SecureAnswer reads with (csrc/pyobjects.c json_spans,
json_unescape_into; nomyo.memory.secure_json.spans / text_into), against json.loads."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nomyo.errors import PackageError
from nomyo.memory import SecureBuffer, binding, secure_json
from security.fuzz.targets import json_spans_target
from tests.memory.test_memory_json import _json_text

pytestmark = pytest.mark.skipif(binding.pyobjects is None,
                                reason="needs the native helper (nomyo._pyobjects)")


@settings(max_examples=600, deadline=None)
@given(_json_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
       st.sampled_from([None, "cut", "byte"]), st.integers(0, 10**6))
def test_spans_and_their_text_agree_with_json_loads(raw, damage, where):
    """Every escape json.loads knows (pairs, lone surrogates, \\/, \\u0000), damaged too."""
    if damage == "cut":
        raw = raw[: where % (len(raw) + 1)]
    elif damage == "byte" and raw:
        i = where % len(raw)
        raw = raw[:i] + bytes([where % 256]) + raw[i + 1:]
    json_spans_target(raw)


def test_a_span_is_the_body_between_the_quotes_and_keys_stay_str():
    raw = b'{"k": "a\\nb", "n": [1, "\xc3\xa9"], "e": ""}'
    tree = secure_json.spans(raw)
    assert list(tree) == ["k", "n", "e"]
    start, end, size = tree["k"]
    assert raw[start - 1:end + 1] == b'"a\\nb"' and size == 3
    assert tree["n"][1] == (raw.index(b"\xc3"), raw.index(b"\xc3") + 2, 2)
    assert tree["e"][2] == 0


def test_text_into_writes_the_unescaped_text_into_a_secure_buffer():
    raw = b'["tab\\there \\"q\\" \\u00e9 \\ud83d\\ude00"]'
    with SecureBuffer.copy_of(raw) as doc:
        span = secure_json.spans(doc)[0]
        with secure_json.text_into(doc, span) as text, memoryview(text) as view:
            assert bytes(view).decode() == 'tab\there "q" \u00e9 \U0001f600'


def test_a_lone_surrogate_is_refused_typed_and_nothing_is_left_written():
    raw = b'["ab\\ud800"]'
    span = secure_json.spans(raw)[0]
    with pytest.raises(secure_json.SurrogatesRefused) as err:
        secure_json.text_into(raw, span)
    assert err.value.__context__ is None
    out = bytearray(span[2])
    with pytest.raises(ValueError, match="surrogates"):
        binding.pyobjects.json_unescape_into(raw, span[0], span[1], out)
    assert out == bytearray(len(out)), "the text before the surrogate was left behind"


@pytest.mark.parametrize("start, end", [(0, 3), (1, 5), (2, 3), (-1, 3), (1, 0), (1, 99)])
def test_a_span_that_is_not_a_string_body_of_the_buffer_is_refused(start, end):
    """Offsets outside the buffer, not after a quote, or not ending at the closing quote."""
    raw = b'"abc"'
    with pytest.raises((ValueError, RuntimeError)):
        binding.pyobjects.json_unescape_into(raw, start, end, bytearray(8))
    with pytest.raises((PackageError, RuntimeError)):
        secure_json.text_into(raw, (start, end, 8))


def test_an_output_too_small_is_refused_and_zeroed():
    raw = b'"abc\\n"'
    out = bytearray(3)
    with pytest.raises(ValueError, match="too small"):
        binding.pyobjects.json_unescape_into(raw, 1, 6, out)
    assert out == bytearray(3)


def test_a_read_only_output_is_refused():
    with pytest.raises(TypeError):
        binding.pyobjects.json_unescape_into(b'"a"', 1, 2, b"x")
