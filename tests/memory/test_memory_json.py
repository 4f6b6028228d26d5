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


# What each native reader is raced with (see the test below): N-byte contents it flips
# between, the call, and how a returned str is re-encoded to compare with the N bytes read.
_RACES = {
    "decode_utf8": ('[("\\xe9" + "a" * (N - 2)).encode(), ("\\u20ac" * (N // 3)).encode()]',
                    "_pyobjects.decode_utf8(buf)", "s.encode('utf-8')"),
    # plain runs (read eight bytes at a time), escapes and two-byte characters in one string
    "json_loads": ('[b\'"\' + c + b\'"\' for c in (b"a" * (N - 2), b"\\\\n" * ((N - 2) // 2), '
                   '"\\xe9".encode() * ((N - 2) // 2))]',
                   "_pyobjects.json_loads(buf)",
                   "json.dumps(s, ensure_ascii=False).encode('utf-8')"),
}


@pytest.mark.parametrize("reader", sorted(_RACES))
def test_native_readers_survive_a_buffer_changing_between_their_passes(reader):
    """decode_utf8 and the JSON string reader count characters in one pass and copy them in
    a second; a base64 decode_into of another thread (GIL-free for large inputs) can rewrite
    the buffer in between. Here the buffer's data ends on its guard page and flips between
    contents of different character counts: an unbounded second pass read past the end
    (SIGSEGV in the child). Each call must return a canonical str of exactly the buffer's
    bytes, or raise: ValueError for invalid input, RuntimeError for a change between the
    passes."""
    from tests.helpers import run_python

    contents, call, encoded = _RACES[reader]
    proc = run_python("""
        import base64, json, sys, threading, time
        from nomyo import _pyobjects
        from nomyo.protocol import b64
        from nomyo.memory import SecureBuffer

        N = 3 * 32768  # 24 pages: the data ends against the guard page
        contents = CONTENTS
        texts = [base64.b64encode(c) for c in contents]  # decoded without the GIL
        buf = SecureBuffer(N)
        stop = threading.Event()

        def writer():
            i = 0
            while not stop.is_set():
                b64.decode_into(texts[i % len(texts)], buf, 0)
                i += 1

        sys.setswitchinterval(1e-5)
        thread = threading.Thread(target=writer)
        thread.start()
        seen = {"str": 0, "invalid": 0, "changed": 0, "bad": 0}
        deadline = time.monotonic() + 60  # ends as soon as both counts reach 10 (ASan: ~8 a minute)
        try:
            while time.monotonic() < deadline and (seen["changed"] < 10 or seen["str"] < 10):
                try:
                    s = CALL
                except ValueError:
                    seen["invalid"] += 1
                except RuntimeError as exc:
                    assert str(exc) == "buffer changed while it was being decoded"
                    seen["changed"] += 1
                else:
                    again = s.encode("utf-8").decode("utf-8")
                    exact = len(ENCODED) == N
                    seen["str" if exact and sys.getsizeof(s) == sys.getsizeof(again)
                         else "bad"] += 1
        finally:
            stop.set()
            thread.join()
        print(json.dumps(seen))
    """.replace("CONTENTS", contents).replace("CALL", call).replace("ENCODED", encoded),
        timeout=120)
    assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-2000:]}"
    seen = json.loads(proc.stdout)
    # a change between the passes is a narrow window: under AddressSanitizer on two busy cores
    # it was hit 8 times in the minute, so one hit proves the check runs; none bad is the point
    assert seen["bad"] == 0 and seen["changed"] >= 1 and seen["str"] >= 10, seen


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
        assert type(err.value) is secure_json.SurrogatesRefused  # a ValueError
        assert str(err.value) == secure_json.SURROGATES_REFUSED
        assert err.value.__context__ is None and err.value.__cause__ is None
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
    expected = ["SurrogatesRefused", secure_json.SURROGATES_REFUSED, True]
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [expected] * 5


# JSON text as a peer may write it: escapes of every kind (pairs, lone surrogates, \/),
# whitespace between tokens, numbers in every form, duplicate keys; plus broken documents.
_ws = st.sampled_from(["", " ", "\n", "\t", "\r\n  "])
_escape = st.sampled_from(['\\"', "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t", "\\u00e9",
                           "\\ud83d\\ude00", "\\ud800", "\\udc00x", "\\u0000", "\\uFFFF"])
_string_text = st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"],
                                                       blacklist_characters='"\\'),
                                 max_size=6) | _escape, max_size=8).map(
    lambda parts: '"' + "".join(parts).replace("\x00", "") + '"')
_number_text = st.from_regex(r"-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?",
                             fullmatch=True)
_json_text = st.recursive(
    _string_text | _number_text | st.sampled_from(["true", "false", "null"]),
    lambda children: st.lists(st.tuples(_ws, children), max_size=4).map(
        lambda items: "[" + ",".join(w + v for w, v in items) + "]")
    | st.lists(st.tuples(_string_text | st.sampled_from(['"k"']), _ws, children),
               max_size=4).map(lambda items: "{" + ",".join(f"{k}{w}:{v}" for k, w, v in items)
                               + "}"),
    max_leaves=12,
)


def _reference(text: bytes):
    def finite(number: str) -> float:
        value = float(number)
        if value in (float("inf"), float("-inf")):
            raise ValueError("out of range")
        return value
    return json.loads(text.decode("utf-8"), parse_float=finite)


@settings(max_examples=600, deadline=None)
@given(_json_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
       st.sampled_from([None, "cut", "byte"]), st.integers(0, 10**6))
def test_native_reader_agrees_with_json_loads(raw, damage, where):
    """Equal values of equal types (repr: 1 / 1.0 / True, -0.0, key order), or both refuse."""
    if damage == "cut":
        raw = raw[: where % (len(raw) + 1)]
    elif damage == "byte":
        i = where % len(raw)
        raw = raw[:i] + bytes([where % 256]) + raw[i + 1:]
    try:
        expected, ok = _reference(raw), True
    except (UnicodeDecodeError, ValueError):
        ok = False
    with SecureBuffer.copy_of(raw) if raw else SecureBuffer(1) as buf:
        data = buf if raw else b""
        if ok:
            got = secure_json.loads(data)
            assert got == expected and repr(got) == repr(expected)
        else:
            with pytest.raises(PackageError):
                secure_json.loads(data)


@pytest.mark.parametrize("raw", [b"1e400", b"[-1e400]", b'{"usage": 1.8e309}'])
def test_out_of_range_numbers_are_refused_not_made_infinite(raw):
    with SecureBuffer.copy_of(raw) as buf, pytest.raises(PackageError, match="out of range"):
        secure_json.loads(buf)


def test_reader_keeps_json_semantics_at_the_edges():
    cases = {b'{"a": 1, "b": 2, "a": 3}': {"a": 3, "b": 2},
             b"1e-400": 0.0, b"-0": 0, b"-0.0": -0.0,
             b"12345678901234567890123": 12345678901234567890123,
             b'"\\ud83d\\ude00\\ud800"': "\U0001f600\ud800", b' [] ': []}
    for raw, expected in cases.items():
        with SecureBuffer.copy_of(raw) as buf:
            got = secure_json.loads(buf)
        assert got == expected and repr(got) == repr(expected), raw
    depth = secure_json.MAX_DEPTH + 1  # what dumps writes at its limit is read back
    nested: list = []
    for _ in range(depth - 1):
        nested = [nested]
    with secure_json.dumps(nested) as buf:
        assert secure_json.loads(buf) == nested
    with SecureBuffer.copy_of(b"[" * (depth + 1) + b"]" * (depth + 1)) as buf, \
            pytest.raises(PackageError, match="nested too deeply"):
        secure_json.loads(buf)


def test_plain_runs_stop_at_every_byte_in_every_position_of_a_word():
    """The readers take runs of plain ASCII eight bytes at a time (csrc/pyobjects.c
    plain_run): every byte value, at every offset of the first, second and third word, inside
    a string, closed or cut off, must read as json.loads reads it (values, or refusals), for
    loads and for spans with their unescaped text."""
    from security.fuzz.targets import json_loads_target, json_spans_target

    checked = 0
    for before in range(19):
        for value in range(256):
            body = b"p" * before + bytes([value]) + b"q" * 9
            for raw in (b'["' + body + b'"]', b'"' + body, b'{"' + body + b'": 1}'):
                json_loads_target(raw)
                json_spans_target(raw)
                checked += 1
    assert checked == 19 * 256 * 3
