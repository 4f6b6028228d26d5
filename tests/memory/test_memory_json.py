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


def test_native_utf8_decoder_survives_a_buffer_changing_between_its_passes():
    """decode_utf8 counts characters in one pass and copies them in a second; a base64
    decode_into of another thread (GIL-free for large inputs) can rewrite the buffer in
    between. Here the buffer's data ends on its guard page and flips between N - 1 Latin-1
    characters and N / 3 three-byte ones: an unbounded second pass read past the end (SIGSEGV
    in the child). Each call must now return a canonical str of exactly the buffer's bytes, or
    raise: ValueError for invalid UTF-8, RuntimeError for a change between the passes."""
    from tests.helpers import run_python

    proc = run_python("""
        import base64, json, sys, threading, time
        from nomyo import _pyobjects
        from nomyo.protocol import b64
        from nomyo.memory import SecureBuffer

        N = 3 * 32768  # 24 pages: the data ends against the guard page
        contents = [("\\xe9" + "a" * (N - 2)).encode(), ("\\u20ac" * (N // 3)).encode()]
        texts = [base64.b64encode(c) for c in contents]  # decoded without the GIL
        buf = SecureBuffer(N)
        stop = threading.Event()

        def writer():
            i = 0
            while not stop.is_set():
                b64.decode_into(texts[i % 2], buf, 0)
                i += 1

        sys.setswitchinterval(1e-5)
        thread = threading.Thread(target=writer)
        thread.start()
        seen = {"str": 0, "invalid": 0, "changed": 0, "bad": 0}
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline and (seen["changed"] < 10 or seen["str"] < 10):
                try:
                    s = _pyobjects.decode_utf8(buf)
                except ValueError:
                    seen["invalid"] += 1
                except RuntimeError as exc:
                    assert str(exc) == "buffer changed while it was being decoded"
                    seen["changed"] += 1
                else:
                    again = s.encode("utf-8").decode("utf-8")
                    exact = len(s.encode("utf-8")) == N
                    seen["str" if exact and sys.getsizeof(s) == sys.getsizeof(again)
                         else "bad"] += 1
        finally:
            stop.set()
            thread.join()
        print(json.dumps(seen))
    """, timeout=120)
    assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-2000:]}"
    seen = json.loads(proc.stdout)
    assert seen["bad"] == 0 and seen["changed"] >= 10 and seen["str"] >= 10, seen


_SURROGATE_DOCUMENTS = [
    {"content": "lone \ud800 high"},
    {"content": "lone low \udfff"},
    {"content": "a pair as two code points: \ud83d\ude00"},
    {"k\udc00": "in a key"},
    ["x" * 40 + "\ud800"],
]


def test_surrogates_are_refused_by_both_writers_alike():
    """A surrogate has no UTF-8 form: the fallback's encode refuses it, and the native writer
    escaped it instead (\\udXXX; a pair became two escapes that a reader joins into another
    character). Both now raise the same ValueError, which carries no part of the document."""
    from tests.helpers import run_python

    for doc in _SURROGATE_DOCUMENTS:
        with pytest.raises(ValueError) as err:
            secure_json.dumps(doc)
        assert type(err.value) is ValueError
        assert str(err.value) == secure_json.SURROGATES_REFUSED
    proc = run_python("""
        import json
        from nomyo.memory import secure_json
        from tests.memory.test_memory_json import _SURROGATE_DOCUMENTS
        for doc in _SURROGATE_DOCUMENTS:
            try:
                secure_json.dumps(doc)
            except ValueError as exc:
                print(json.dumps([type(exc).__name__, str(exc),
                                  exc.__context__ is None and exc.__cause__ is None]))
            else:
                print(json.dumps("accepted"))
    """, NOMYO_MEMORY_BACKEND="fallback")
    assert proc.returncode == 0, proc.stderr
    expected = ["ValueError", secure_json.SURROGATES_REFUSED, True]
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [expected] * 5
