"""secure_json writes and reads exactly what the json module does, without heap copies."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nomyo.errors import PackageError
from nomyo.memory import SecureBuffer, secure_json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_round_trip_matches_the_json_module(value):
    buf = secure_json.dumps(value)
    try:
        text = buf.data.tobytes().decode("utf-8", "surrogatepass")
        assert json.loads(text) == value
        assert secure_json.loads(buf) == value
    finally:
        buf.close()


def test_output_is_compact_utf8():
    buf = secure_json.dumps({"content": "é\n\"", "n": [1, 2.5, None, True]})
    assert buf.data.tobytes() == '{"content":"é\\n\\"","n":[1,2.5,null,true]}'.encode()
    buf.close()


@pytest.mark.parametrize("bad", [float("nan"), {1j: 2}, object(), {"x": {1, 2}}])
def test_unserialisable_values_are_typed_errors(bad):
    with pytest.raises((TypeError, ValueError)):
        secure_json.dumps(bad)


@pytest.mark.parametrize("raw", [b'{"marker-x1": ', b'\xff"marker-x1"', b'{"marker-x1": }',
                                 b'["marker-x1",' + b"[" * 100000])
def test_bad_documents_raise_package_error_without_content(raw):
    buf = SecureBuffer.copy_of(raw)
    with pytest.raises(PackageError) as info:
        secure_json.loads(buf)
    assert "marker-x1" not in str(info.value)
    buf.close()


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(
    lambda t: t.encode("utf-8", "surrogatepass"))))
def test_native_utf8_decoder_agrees_with_pythons_strict_decoder(raw):
    from nomyo import _pyobjects

    try:
        expected = raw.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(ValueError):
            _pyobjects.decode_utf8(raw)
    else:
        assert _pyobjects.decode_utf8(raw) == expected


@pytest.mark.parametrize("text", ["a" * 9 + "é" + "b" * 17, "x" * 20 + "\u20ac", "😀" + "y" * 30,
                                  "tab\there \"q\" \\ \x01 end" * 3])
def test_long_mixed_strings_round_trip(text):
    buf = secure_json.dumps({"k": text})
    assert buf.data.tobytes() == json.dumps({"k": text}, ensure_ascii=False,
                                            separators=(",", ":")).encode()
    assert secure_json.loads(buf) == {"k": text}
    buf.close()


@pytest.mark.parametrize("raw", [b"NaN", b'{"x": -Infinity}', b"[Infinity]"])
def test_non_finite_numbers_are_refused_like_dumps_refuses_them(raw):
    with SecureBuffer.copy_of(raw) as buf, pytest.raises(PackageError, match="NaN and infinity"):
        secure_json.loads(buf)


def test_fallback_backend_errors_are_package_errors_without_plaintext():
    from tests.helpers import run_python

    proc = run_python("""
        from nomyo.errors import PackageError
        from nomyo.memory import SecureBuffer, secure_json
        for raw in (b'\\xff"marker-x1"', b'{"marker-x1": }', b'["marker-x1",' + b'[' * 100000,
                    b'[NaN]'):
            try:
                secure_json.loads(SecureBuffer.copy_of(raw))
            except PackageError as exc:
                chain = [exc, exc.__context__, exc.__cause__]
                leaked = any("marker-x1" in repr(vars(e)) for e in chain if e is not None)
                print("ok" if not leaked and "marker-x1" not in str(exc) else "leak")
            else:
                print("accepted")
    """, NOMYO_MEMORY_BACKEND="fallback")
    assert proc.stdout.split() == ["ok"] * 4, proc.stdout + proc.stderr
