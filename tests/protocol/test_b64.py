"""nomyo.protocol.b64: both backends agree with base64.b64encode and b64decode(validate=True).

The native functions (nomyo._b64) and the fallback ones (nomyo.protocol.b64_fallback) run
through the same tests via the `codec` fixture. The acceptance rules are CPython 3.11's; the
explicit edge table pins them on every interpreter, the comparisons with the running stdlib
need 3.11.
"""
import array
import base64
import json
import os
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nomyo
from nomyo.protocol import b64
from nomyo.protocol import b64_fallback as _b64_fallback
from tests.helpers import run_python

try:
    from nomyo import _b64 as native
except ImportError:  # reported by test_native_codec_is_built and by every native test
    native = None

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
NOISE = "=-_ \n\x00é€\U0001f600"
STDLIB_IS_REFERENCE = pytest.mark.skipif(
    sys.version_info[:2] != (3, 11),
    reason="the reference is CPython 3.11's b64decode(validate=True); the other releases "
           "here (3.10, 3.12, 3.13) differ on some '=' placements, 3.13 on '=' after a "
           "complete group (the fixed edge table still runs)")


@pytest.fixture(scope="module", params=["native", "fallback"])
def codec(request):
    if request.param == "fallback":
        return _b64_fallback
    if native is None:
        pytest.fail("nomyo._b64 is not built: reinstall with pip install -e '.[test]'")
    return native


def stdlib_decode(text):
    """base64.b64decode(text, validate=True), or None where it rejects the text."""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, and the non-ASCII str error
        return None


def outcome(fn, *args):
    """fn's result, or ('error', message) when it raises ValueError."""
    try:
        return fn(*args)
    except ValueError as exc:
        return ("error", str(exc))


def assert_decodes_like_stdlib(codec, text):
    expected = stdlib_decode(text)
    got = outcome(codec.decode, text)
    out = bytearray(3 + len(text))
    end = outcome(codec.decode_into, text, out, 3)
    if expected is None:
        assert isinstance(got, tuple) and got == end, (text, got, end)
    else:
        assert got == expected, text
        assert end == 3 + len(expected) and out[3:end] == expected, text


# ---- the edge cases, determined by experiment on CPython 3.11.7 ----

EDGE_CASES = [
    ("YQ==", b"a"),
    ("YQ=", "incorrect base64 padding: 1 '=' where the last group needs 2"),
    ("YQ", "incorrect base64 padding: 0 '=' where the last group needs 2"),
    ("YWI", "incorrect base64 padding: 0 '=' where the last group needs 1"),
    ("YWI=", b"ab"),
    ("YWI==", "incorrect base64 padding: 2 '=' where the last group needs 1"),
    ("Y", "invalid base64 length: the number of data characters (1) is 1 more than a "
          "multiple of 4"),
    ("Y===", "invalid base64 length: the number of data characters (1) is 1 more than a "
             "multiple of 4"),
    ("YWJjY", "invalid base64 length: the number of data characters (5) is 1 more than a "
              "multiple of 4"),
    ("YQ===", "incorrect base64 padding: 3 '=' where the last group needs 2"),
    ("=YQ=", "incorrect base64 padding: '=' at the start"),
    ("=", "incorrect base64 padding: '=' at the start"),
    ("====", "incorrect base64 padding: '=' at the start"),
    ("", b""),
    ("YR==", b"a"),             # unused low bits need not be zero
    ("YWJ=", b"ab"),
    ("YQ==YQ==", "incorrect base64 padding: data character after '=' at position 4"),
    ("Y=Q=", "incorrect base64 padding: data character after '=' at position 2"),
    ("YQ=a", "incorrect base64 padding: data character after '=' at position 3"),
    ("YWJj", b"abc"),
    ("YWJj=", b"abc"),          # 3.11 ignores '=' after a complete group, any number of them
    ("YWJj====", b"abc"),
    ("YWJjYQ", "incorrect base64 padding: 0 '=' where the last group needs 2"),
    ("YQ==\n", "invalid base64 character at position 4"),
    (" YQ==", "invalid base64 character at position 0"),
    ("YW Jj", "invalid base64 character at position 2"),
    ("YW-j", "invalid base64 character at position 2"),   # urlsafe alphabet is not accepted
    ("YW_j", "invalid base64 character at position 2"),
    ("YWJ\x00", "invalid base64 character at position 3"),
    ("YWé=", "invalid base64 character at position 2"),
    ("YQ==\U0001f600", "invalid base64 character at position 4"),
    ("Y!==YQ", "invalid base64 character at position 1"),  # a bad character outranks padding
]


@pytest.mark.parametrize("text,expected", EDGE_CASES)
def test_edge_cases(codec, text, expected):
    inputs = [text] + ([text.encode()] if text.isascii() else [])
    for given_text in inputs:
        if isinstance(expected, bytes):
            assert codec.decode(given_text) == expected
        else:
            with pytest.raises(ValueError) as err:
                codec.decode(given_text)
            assert str(err.value) == expected


@STDLIB_IS_REFERENCE
@pytest.mark.parametrize("text,expected", EDGE_CASES)
def test_edge_table_is_what_the_stdlib_does(text, expected):
    got = stdlib_decode(text)
    assert got == expected if isinstance(expected, bytes) else got is None


# ---- encoding and decoding: equality with the stdlib ----

SIZES = [*range(65), 100, 255, 1000, 4095, 4096, 4097, 49151, 49152, 49153, 65535, 65536,
         65537, 70000]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_matches_stdlib_at_every_small_length(codec, size):
    data = os.urandom(size)
    text = base64.b64encode(data)
    assert codec.encode(data) == text
    assert codec.decode(text) == data
    assert codec.decode(text.decode("ascii")) == data


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_encode_decode_match_stdlib(codec, data):
    text = base64.b64encode(data)
    assert codec.encode(data) == text
    assert codec.decode(text) == data


@st.composite
def near_base64(draw):
    """Valid encodings with a few insertions, deletions, replacements and padding changes."""
    text = list(base64.b64encode(draw(st.binary(max_size=24))).decode("ascii"))
    any_char = st.sampled_from(ALPHABET + NOISE)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "pad", "unpad"]))
        at = draw(st.integers(0, len(text)))
        if op == "insert":
            text.insert(at, draw(any_char))
        elif op == "delete" and text:
            del text[min(at, len(text) - 1)]
        elif op == "replace" and text:
            text[min(at, len(text) - 1)] = draw(any_char)
        elif op == "pad":
            text.extend("=" * draw(st.integers(1, 3)))
        elif op == "unpad" and text and text[-1] == "=":
            text.pop()
    return "".join(text)


texts = st.text(alphabet=st.sampled_from(ALPHABET + NOISE), max_size=24) | near_base64()


@STDLIB_IS_REFERENCE
@settings(max_examples=1500, deadline=None)
@given(text=texts)
def test_accepts_and_rejects_like_stdlib(codec, text):
    assert_decodes_like_stdlib(codec, text)
    assert_decodes_like_stdlib(codec, text.encode("utf-8"))  # non-ASCII becomes bytes >= 0x80


@settings(max_examples=1000, deadline=None)
@given(text=texts)
def test_backends_agree_on_results_and_messages(text):
    assert native is not None, "nomyo._b64 is not built"
    for given_text in (text, text.encode("utf-8")):
        got = outcome(native.decode, given_text)
        assert got == outcome(_b64_fallback.decode, given_text), given_text
        states = []
        for codec in (native, _b64_fallback):
            out = sentinel_buffer(20)
            states.append((outcome(codec.decode_into, given_text, out, 3), out))
        assert states[0] == states[1], given_text


@STDLIB_IS_REFERENCE
@pytest.mark.parametrize("at", range(8))
def test_every_byte_value_at_every_position(codec, at):
    for value in range(256):
        text = bytearray(b"YWJjZGU=")
        text[at] = value
        assert_decodes_like_stdlib(codec, bytes(text))


@pytest.mark.parametrize("kind", [str, bytes, bytearray, memoryview, "array"])
def test_text_types_decode_alike(codec, kind):
    data = os.urandom(100)
    text = base64.b64encode(data)
    given_text = {str: lambda: text.decode(), "array": lambda: array.array("B", text)}.get(
        kind, lambda: kind(text))()
    assert codec.decode(given_text) == data


def test_any_contiguous_buffer_encodes_as_its_bytes(codec):
    words = array.array("I", [1, 2, 3])
    assert codec.encode(words) == base64.b64encode(words)
    assert codec.encode(memoryview(bytearray(b"abcdef"))[1:4]) == b"YmNk"


@pytest.mark.parametrize("bad", [5, None, 1.5, ["YQ=="], "abc"])
def test_encode_type_errors(codec, bad):
    with pytest.raises(TypeError):
        codec.encode(bad)


@pytest.mark.parametrize("bad", [5, None, ["YQ=="], memoryview(b"YWJjZGVm")[::2]])
def test_decode_type_errors(codec, bad):
    with pytest.raises(TypeError):
        codec.decode(bad)
    with pytest.raises(TypeError):
        codec.decode_into(bad, bytearray(8), 0)


def test_non_contiguous_data_is_a_type_error(codec):
    with pytest.raises(TypeError):
        codec.encode(memoryview(b"abcdef")[::2])


def test_messages_never_carry_the_text(codec):
    for text in ("SECRETKEYxx!", "SECRETKEYxxx=a", "SECRETKEY", "SECRETKEYx=", "SECRETKEYé"):
        with pytest.raises(ValueError) as err:
            codec.decode(text)
        assert "SECRET" not in str(err.value) and "KEY" not in str(err.value)


def test_large_round_trip(codec):
    data = os.urandom(8 << 20)
    text = codec.encode(data)
    assert text == base64.b64encode(data)
    assert codec.decode(text) == data
    assert codec.decode(text.decode("ascii")) == data
    out = bytearray(len(data))
    assert codec.decode_into(text, out, 0) == len(data) and out == data


def test_threads_share_the_codec(codec):
    # Large inputs run without the GIL: concurrent calls must not disturb each other.
    blobs = [os.urandom((1 << 20) + i) for i in range(4)]
    failures = []

    def work(blob):
        for _ in range(3):
            if codec.decode(codec.encode(blob)) != blob:
                failures.append(len(blob))

    threads = [threading.Thread(target=work, args=(blob,)) for blob in blobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# ---- decode_into ----

SENTINEL = 0xA5


def sentinel_buffer(size):
    return bytearray([SENTINEL]) * size


@pytest.mark.parametrize("offset", [0, 1, 7, 40])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 31, 64])
def test_decode_into_writes_exactly_its_range(codec, offset, size):
    data = os.urandom(size)
    out = sentinel_buffer(offset + size + 9)
    end = codec.decode_into(base64.b64encode(data), out, offset)
    assert end == offset + size and out[offset:end] == data
    assert out[:offset] == sentinel_buffer(offset) and out[end:] == sentinel_buffer(9)


def test_decode_into_ciphertext_and_tag_share_one_buffer(codec):
    ciphertext, tag = os.urandom(1000), os.urandom(16)
    out = bytearray(len(ciphertext) + len(tag))
    end = codec.decode_into(base64.b64encode(ciphertext), out, 0)
    assert codec.decode_into(base64.b64encode(tag).decode(), out, end) == len(out)
    assert out == ciphertext + tag


def test_decode_into_exact_fit_and_empty_at_the_end(codec):
    out = sentinel_buffer(3)
    assert codec.decode_into("YWJj", out, 0) == 3 and out == b"abc"
    assert codec.decode_into("", out, 3) == 3 and out == b"abc"


@pytest.mark.parametrize("offset,size", [(0, 2), (1, 3), (3, 3)])
def test_decode_into_too_small_writes_nothing(codec, offset, size):
    out = sentinel_buffer(size)
    with pytest.raises(ValueError, match="output buffer too small"):
        codec.decode_into("YWJj", out, offset)
    assert out == sentinel_buffer(size)


@pytest.mark.parametrize("offset", [-1, -100, 9, 1 << 40, 1 << 63, 1 << 80, -(1 << 80)])
def test_decode_into_offset_out_of_range(codec, offset):
    # beyond the C ssize_t range too: the same ValueError, with the offset as given
    out = sentinel_buffer(8)
    with pytest.raises(ValueError, match=f"^offset {offset} is outside the output buffer "
                                         r"\(length 8\)$"):
        codec.decode_into("", out, offset)
    assert out == sentinel_buffer(8)


def test_decode_into_offset_must_be_an_integer(codec):
    with pytest.raises(TypeError):
        codec.decode_into("YWJj", bytearray(8), 1.0)


@pytest.mark.parametrize("text", ["YWJjZGVm!", "YWJjZGVmZ", "YWJjZGVmZ=", "=YWJjZGVm",
                                  "YWJjZGVmé", "YWJjZGVm!Q="])
def test_decode_into_padding_and_length_errors_write_nothing(codec, text):
    out = sentinel_buffer(16)
    with pytest.raises(ValueError):
        codec.decode_into(text, out, 2)
    assert out == sentinel_buffer(16)


@pytest.mark.parametrize("text,position,length", [
    ("YWJj!GVm", 4, 6), ("YWJjZGVm=Q==", 9, 7), ("YW\njZGVm", 2, 6), (b"YWJjZG\xffm", 6, 6)])
def test_decode_into_bad_character_zeroes_its_range(codec, text, position, length):
    # Found while decoding in one pass: what was written is zeroed, nothing else is touched.
    out = sentinel_buffer(16)
    with pytest.raises(ValueError, match=f"at position {position}$"):
        codec.decode_into(text, out, 2)
    assert out == sentinel_buffer(2) + bytes(length) + sentinel_buffer(14 - length)


def test_decode_into_large_bad_text_zeroes_its_range(codec):
    text = bytearray(base64.b64encode(os.urandom(300000)))
    text[-10] = ord("*")
    out = sentinel_buffer(300010)
    with pytest.raises(ValueError, match=f"invalid base64 character at position {len(text) - 10}"):
        codec.decode_into(text, out, 5)
    assert out == sentinel_buffer(5) + bytes(300000) + sentinel_buffer(5)


def test_decode_into_size_is_checked_before_characters(codec):
    out = sentinel_buffer(5)
    with pytest.raises(ValueError, match="output buffer too small"):
        codec.decode_into("YWJj!GVm", out, 0)
    assert out == sentinel_buffer(5)


@pytest.mark.parametrize("out", [b"\0" * 8, memoryview(bytearray(8)).toreadonly(), "12345678",
                                 memoryview(bytearray(16))[::2], 8])
def test_decode_into_refuses_outputs_it_cannot_write(codec, out):
    with pytest.raises(TypeError):
        codec.decode_into("YWJj", out, 0)


def test_decode_into_memoryview_slice_stays_inside(codec):
    backing = sentinel_buffer(32)
    window = memoryview(backing)[10:20]
    assert codec.decode_into("YWJjZGVm", window, 2) == 8
    assert backing[12:18] == b"abcdef"
    assert backing[:12] == sentinel_buffer(12) and backing[18:] == sentinel_buffer(14)
    with pytest.raises(ValueError, match="too small"):
        codec.decode_into("YWJjZGVmZ2hp", window, 2)  # 9 bytes, 8 left in the window


def test_decode_into_other_item_formats_count_bytes(codec):
    out = array.array("I", [0, 0])
    assert codec.decode_into("YWJjZGVmZ2g=", out, 0) == 8
    assert out.tobytes() == b"abcdefgh"


def test_decode_into_the_buffer_holding_the_text(codec):
    data = os.urandom(3000)
    for offset in (0, 500, 1000):  # the text is 4000 characters: out overlaps it
        shared = bytearray(base64.b64encode(data))
        end = codec.decode_into(shared, shared, offset)
        assert end == offset + 3000 and shared[offset:end] == data
    shared = bytearray(base64.b64encode(data))
    shared[3990] = ord("!")
    with pytest.raises(ValueError, match="at position 3990$"):  # explained before zeroing
        codec.decode_into(shared, shared, 500)
    assert shared[500:3500] == bytes(3000)


@pytest.mark.parametrize("size", [300, 3000], ids=["pymalloc", "malloc"])
def test_decode_into_its_own_text_leaves_no_decoded_copy_in_freed_memory(size):
    """Decoding into the buffer that holds the text goes through a temporary; it is wiped
    before it is freed. The secret is born in secure memory and only its base64 passes the
    heap; the child is scanned from outside for the decoded bytes, in 32-byte windows past the
    first 32 (the allocators write their own pointers there once a block is freed)."""
    import subprocess
    import textwrap
    import time

    from security.memscan import scan_process
    from tests.helpers import child_env

    code = f"""
        import os, sys
        from nomyo.protocol import b64
        from nomyo.memory import SecureBuffer
        out = sys.stdout.fileno()
        secret = SecureBuffer.random({size})
        text = b64.encode(secret)  # the heap sees the text, never the secret
        control = bytearray(os.urandom(48))
        os.write(out, control + text)  # before decoding: nothing is allocated after it
        shared = SecureBuffer(len(text))
        with memoryview(shared) as view:
            view[:] = text
            assert b64.decode_into(view, view, 0) == {size}  # out overlaps the text
            assert view[:{size}] == secret.data
        shared.close()
        secret.close()
        os.write(out, b"closed")
        os.read(0, 1)  # wait without allocating (sys.stdin.read would, over the freed block)
    """
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env())
    try:
        got = b""
        deadline = time.monotonic() + 30
        while not got.endswith(b"closed") and time.monotonic() < deadline:
            chunk = os.read(child.stdout.fileno(), 65536)
            if not chunk:
                break
            got += chunk
        assert got.endswith(b"closed"), got[-200:]
        control, secret = got[:48], base64.b64decode(got[48:-len(b"closed")])
        windows = [secret[i : i + 32] for i in range(32, len(secret) - 31, 32)]
        counts = scan_process(child.pid, [control, *windows])
    finally:
        child.communicate(b"", timeout=30)
    assert child.returncode == 0
    assert counts[control] >= 1, "the scanner found the control: it reads real memory"
    assert [w for w in windows if counts[w]] == []


# ---- the wrapper and its backend choice ----

def test_native_codec_is_built():
    # This build is expected to have the native codec: its absence is a failure, not a skip.
    assert native is not None, "nomyo._b64 is missing: the build did not compile csrc/b64codec.c"
    assert native.BUILD_VERSION.partition("+src.")[0] == nomyo.__version__
    out = json.loads(run_python(
        "import json, nomyo.protocol.b64 as m, nomyo._b64 as n;"
        "print(json.dumps([m.NATIVE, m.decode is n.decode, m.encode(b'abc').decode()]))",
        check=True).stdout)
    assert out == [True, True, "YWJj"]


def test_wrapper_exports_one_backend():
    backend = native if b64.NATIVE else _b64_fallback
    for name in ("encode", "decode", "decode_into"):
        assert getattr(b64, name) is getattr(backend, name)


def test_forced_fallback_backend_still_decodes_right():
    proc = run_python("""
        import base64, json, logging, os
        logging.basicConfig(level=logging.DEBUG, format="%(name)s %(message)s")
        import nomyo.protocol.b64_fallback as fallback
        import nomyo.protocol.b64 as m
        data = os.urandom(100000)
        text = base64.b64encode(data)
        out = bytearray(len(data) + 4)
        ok = (m.encode(data) == text and m.decode(text.decode()) == data
              and m.decode_into(text, out, 4) == len(out) and out[4:] == data)
        try:
            m.decode("YQ=")
            rejected = False
        except ValueError:
            rejected = True
        print(json.dumps([m.NATIVE, ok, rejected, m.decode is fallback.decode]))
    """, NOMYO_MEMORY_BACKEND="fallback", check=True)
    assert json.loads(proc.stdout) == [False, True, True, True]
    assert "nomyo.protocol.b64 native base64 codec unavailable" in proc.stderr
    assert "NOMYO_MEMORY_BACKEND=fallback" in proc.stderr
