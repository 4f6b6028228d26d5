"""SecureBuffer behaviour in the pytest process: the API contract, refusals, lifecycles."""
import copy
import ctypes
import io
import json
import os
import pickle
import sys
import textwrap

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import nomyo
from nomyo.errors import NomyoError, WipeRefusedError
from nomyo.memory import SecureBuffer, secure_bytearray, wipe_bytes_owned, wipe_str_owned
from tests.helpers import run_python


def test_new_buffer_is_zeroed_writable_and_sized():
    with SecureBuffer(100) as buf:
        assert len(buf) == 100 and buf.size == 100
        with memoryview(buf) as mv:
            assert mv.format == "B" and not mv.readonly and mv.tobytes() == bytes(100)
            mv[:5] = b"hello"
            assert mv[:5].tobytes() == b"hello"


def test_wipe_zeroes_in_place():
    buf = SecureBuffer.copy_of(b"top secret material")
    buf.wipe()
    assert buf.data.tobytes() == bytes(len(buf))
    buf.close()


def test_random_is_filled_from_the_kernel():
    a, b = SecureBuffer.random(32), SecureBuffer.random(32)
    assert a.data.tobytes() != bytes(32) and a.data.tobytes() != b.data.tobytes()
    a.close(), b.close()


def test_silent_copies_are_refused():
    with SecureBuffer.copy_of(b"secret-value") as buf:
        with pytest.raises(TypeError):
            bytes(buf)
        with pytest.raises(TypeError):
            pickle.dumps(buf)
        with pytest.raises(TypeError):
            copy.copy(buf)
        with pytest.raises(TypeError):
            list(buf)
        assert "secret" not in repr(buf) and "SecureBuffer size=12" in repr(buf)
        other = SecureBuffer.copy_of(b"secret-value")
        assert buf != other  # never compared by value
        other.close()


def test_use_after_close_and_double_close_raise():
    buf = SecureBuffer(16)
    buf.close()
    assert buf.closed and not buf.locked
    with pytest.raises(ValueError):
        memoryview(buf)
    with pytest.raises(ValueError):
        buf.wipe()
    with pytest.raises(ValueError):
        buf.close()
    assert "closed" in repr(buf)


def test_close_with_a_live_view_wipes_now_and_unmaps_later():
    buf = SecureBuffer.copy_of(b"still-viewed secret")
    view = memoryview(buf)
    buf.close()
    assert view.tobytes() == bytes(len(view))  # wiped at once, memory still valid
    view.release()
    with pytest.raises(ValueError):
        memoryview(buf)


def test_what_a_view_writes_after_close_is_wiped_when_the_last_view_goes():
    """close() with a live view wipes at once, but the view can still write: another thread's
    GIL-free decode_into does exactly that. Releasing the last view now wipes and unmaps the
    buffer, instead of leaving the late bytes mapped until finalisation."""
    buf = SecureBuffer(64)
    where = buf.address
    view = memoryview(buf)
    buf.close()
    late = os.urandom(64)
    view[:] = late
    assert ctypes.string_at(where, 64) == late  # mapped and readable while the view lives
    view.release()
    assert buf.closed and not buf._mapped  # nm_region_free wiped it before unmapping


def test_what_a_view_writes_into_a_closed_cell_is_wiped_when_the_last_view_goes():
    owner = SecureBuffer(100, capacity=4096)
    cell = owner.cell_below(32)
    view = memoryview(cell)
    cell.close()
    view[:] = os.urandom(32)
    view.release()
    assert ctypes.string_at(cell.address, 32) == bytes(32)  # the owner's page, still mapped
    owner.refit(200)  # and the cell let go of its owner: it may move again
    owner.close()


def test_close_during_a_gil_free_decode_into_leaves_nothing_once_it_returns():
    """The real race: a large base64 decode_into runs without the GIL while another thread
    closes the target. Once the decode releases the buffer, the mapping is wiped and gone."""
    proc = run_python("""
        import base64, json, os, threading
        from nomyo.protocol import b64
        from nomyo.memory import SecureBuffer

        size = 8 << 20
        text = base64.b64encode(os.urandom(size))
        raced = released = 0
        for attempt in range(40):
            buf = SecureBuffer(size)
            thread = threading.Thread(target=b64.decode_into, args=(text, buf, 0))
            thread.start()
            while buf._exports == 0 and thread.is_alive():
                pass
            buf.close()
            raced += buf._exports == 1  # the decode was still writing after the wipe
            thread.join()
            released += not buf._mapped
            if raced >= 5:
                break
        print(json.dumps({"attempts": attempt + 1, "raced": raced, "released": released}))
    """, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["raced"] >= 5 and out["released"] == out["attempts"], out


def test_garbage_cycles_with_views_of_closed_and_open_secrets_collect_cleanly():
    """Releasing the last view now calls back into Python; in a garbage cycle the buffer or a
    cell's owner may be finalised (unmapped) before its views are cleared, in any order. The
    callback must then touch nothing: no crash, nothing reported as unraisable."""
    proc = run_python("""
        import gc, random
        from nomyo.memory import SecureBuffer

        rng = random.Random(12)
        for round in range(300):
            owner = SecureBuffer(100, capacity=4096)
            cell = owner.cell_below(32)
            plain = SecureBuffer(64)
            parts = [owner, cell, plain, memoryview(owner), memoryview(cell), memoryview(plain),
                     owner.data, plain.data]
            for secret in (owner, cell, plain):
                if rng.random() < 0.5:
                    secret.close()
            rng.shuffle(parts)
            parts.append(parts)  # one cycle holding everything
            del owner, cell, plain, secret
            parts = None
            if round % 3 == 0:
                gc.collect()
        gc.collect()
        print("ok")
    """, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok"], proc.stderr[-2000:]
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr


def test_bad_sizes_are_typed_errors():
    for bad in (0, -1, 1 << 40):
        with pytest.raises(ValueError):
            SecureBuffer(bad)
    with pytest.raises(TypeError):
        SecureBuffer("32")


def test_refit_reuses_the_mapping_for_a_new_secret_against_the_trailing_guard():
    buf = SecureBuffer.copy_of(b"old secret " * 10)
    end, capacity = buf.address + len(buf), buf.capacity
    assert capacity >= 4096 - 8  # the page's room, less the canary
    old_address, old_len = buf.address, len(buf)
    held = buf.data  # the cached .data view is released by refit itself
    buf.refit(40)
    assert len(buf) == 40 and buf.capacity == capacity and buf.address + 40 == end
    before_canary = old_len - 40 - 8  # the rest of the old place is the new canary and data
    assert ctypes.string_at(old_address, before_canary) == bytes(before_canary)  # wiped
    assert buf.data.tobytes() == bytes(40) and buf.data is not held
    buf.data[:5] = b"fresh"
    buf.refit(capacity)  # grows up to the capacity, still against the guard
    assert len(buf) == capacity and buf.address + capacity == end
    assert buf.data.tobytes() == bytes(capacity)
    buf.close()


def test_capacity_reserves_room_and_refit_refuses_beyond_it():
    with SecureBuffer(10, capacity=10_000) as buf:
        assert len(buf) == 10 and buf.capacity >= 10_000
        buf.refit(10_000)
        assert len(buf) == 10_000
        with pytest.raises(ValueError, match="capacity"):
            buf.refit(buf.capacity + 1)
        with pytest.raises(ValueError):
            buf.refit(0)
        with pytest.raises(TypeError):
            buf.refit("8")
        view = memoryview(buf)
        with pytest.raises(BufferError, match="views"):
            buf.refit(5)
        view.release()
        buf.refit(5)
    with pytest.raises(ValueError, match="closed"):
        buf.refit(5)
    with pytest.raises(ValueError, match="smaller than the size"):
        SecureBuffer(100, capacity=99)


def test_refit_keeps_the_buffer_locked_without_new_locked_memory():
    def locked_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmLck:"))

    buf = SecureBuffer(100, capacity=20_000)
    before = locked_kib()
    for size in (20_000, 1, 7_000):
        buf.refit(size)
        assert buf.locked and locked_kib() == before
    buf.close()
    assert locked_kib() < before


def test_readinto_and_aead_write_straight_into_secure_memory():
    key = SecureBuffer.random(32)
    nonce = os.urandom(12)
    plaintext = SecureBuffer.copy_of(b"patient record 4711")
    aead = AESGCM(key.data)
    sealed = bytearray(len(plaintext) + 16)
    aead.encrypt_into(nonce, plaintext.data, None, sealed)
    out = SecureBuffer(len(plaintext))
    aead.decrypt_into(nonce, bytes(sealed), None, out)
    assert out.data.tobytes() == b"patient record 4711"
    target = SecureBuffer(5)
    assert io.BytesIO(b"abcde").readinto(target) == 5
    assert target.data.tobytes() == b"abcde"
    for b in (key, plaintext, out, target):
        b.close()


def test_secure_bytearray_wipes_the_caller_and_releases_on_error():
    data = bytearray(b"ssn 078-05-1120")
    with pytest.raises(RuntimeError), secure_bytearray(data) as protected:
        assert data == bytearray(len(data))  # caller's copy wiped at once
        assert protected.data.tobytes() == b"ssn 078-05-1120"
        assert memoryview(protected).nbytes == len(data)
        kept = protected
        raise RuntimeError("boom")
    assert kept.closed


def test_secure_bytearray_keeps_the_published_lock_switch():
    with secure_bytearray(bytearray(b"abc"), lock=False) as unlocked:
        assert not unlocked.locked and unlocked.data.tobytes() == b"abc"
    with secure_bytearray(b"abc") as locked:
        assert locked.locked
    with pytest.warns(DeprecationWarning), nomyo.secure_bytes(b"xyz") as old:
        assert old.data.tobytes() == b"xyz"


def test_public_names_are_exported_from_the_package():
    assert nomyo.SecureBuffer is SecureBuffer
    assert nomyo.secure_bytearray is secure_bytearray
    for name in ("get_memory_protection_info", "enable_secure_memory", "disable_secure_memory",
                 "harden_process", "SecurityError", "secure_bytes"):
        assert callable(getattr(nomyo, name))


def _fresh_bytes() -> bytes:
    return os.urandom(24)


# Each case hands a new object to the wipe in a box, with or without one more holder, and
# reports [what the wipe returned or "refused", whether the holder's value is intact].
_HOLDER_CASES = r"""
import functools, json, os, sys
from nomyo.errors import WipeRefusedError
from nomyo.memory import wipe_bytes_owned, wipe_str_owned

def outcome(wipe, box):
    try:
        result = str(wipe(box))
    except WipeRefusedError:
        result = "refused"
    return result if box == [] else result + " (box not emptied)"

def twin(x):  # an equal object that is not x
    return bytes(bytearray(x)) if type(x) is bytes else x.encode().decode()

def intact(x, tw):
    return x == tw and hash(x) == hash(tw)

GLOBAL = None

@functools.lru_cache
def cached(fresh):
    return fresh()

def sole(fresh, wipe):
    data = fresh()
    box = [data]
    del data
    return outcome(wipe, box), True

def module_global(fresh, wipe):
    global GLOBAL
    GLOBAL = fresh()
    tw = twin(GLOBAL)
    return outcome(wipe, [GLOBAL]), intact(GLOBAL, tw)

def lru_cache_entry(fresh, wipe):
    data = cached(fresh)
    tw = twin(data)
    box = [data]
    del data
    return outcome(wipe, box), intact(cached(fresh), tw)

def list_element(fresh, wipe):
    data = fresh()
    tw, holder = twin(data), [data]
    box = [data]
    del data
    return outcome(wipe, box), intact(holder[0], tw)

def dict_key(fresh, wipe):
    data = fresh()
    tw, holder = twin(data), {data: 1}
    box = [data]
    del data
    return outcome(wipe, box), tw in holder and intact(next(iter(holder)), tw)

def closure(fresh, wipe):
    def make():
        value = fresh()
        return lambda: value
    getter = make()
    data = getter()
    tw = twin(data)
    box = [data]
    del data
    return outcome(wipe, box), intact(getter(), tw)

def traced(fresh, wipe, keep):
    # A tracer that reads the caller's f_locals at every event (as debuggers do).
    reads = []
    def local(frame, event, arg):
        reads.append(len(frame.f_locals))
        return local
    def start(frame, event, arg):
        return local if frame.f_code.co_name == "caller" else None
    def caller():
        data = fresh()
        holder = [data] if keep else []
        tw = twin(data)
        box = [data]
        del data
        return outcome(wipe, box), not holder or intact(holder[0], tw)
    sys.settrace(start)
    try:
        result = caller()
    finally:
        sys.settrace(None)
    assert reads
    return result

def traced_sole(fresh, wipe):
    return traced(fresh, wipe, False)

def traced_shared(fresh, wipe):
    return traced(fresh, wipe, True)

def shared_constant(value):
    def case(fresh, wipe):
        tw = twin(value)
        return outcome(wipe, [value]), intact(value, tw)
    return case

CASES = [sole, module_global, lru_cache_entry, list_element, dict_key, closure,
         traced_sole, traced_shared]
report = {}
for kind, fresh, wipe, constants in [
    ("bytes", lambda: os.urandom(40), wipe_bytes_owned, [b"", b"k", bytes([200])]),
    ("str", lambda: os.urandom(20).hex(), wipe_str_owned, ["", "k", chr(233)]),
]:
    for case in CASES:
        report[f"{kind} {case.__name__}"] = case(fresh, wipe)
    for value in constants:
        report[f"{kind} {value!r}"] = shared_constant(value)(fresh, wipe)
# one character but not the interpreter's shared object: an ordinary secret
report["bytes fresh one byte"] = sole(lambda: os.urandom(1), wipe_bytes_owned)
report["str fresh one char"] = sole(lambda: chr(0x20AC + os.getpid() % 7), wipe_str_owned)
report["bytes one byte held elsewhere"] = list_element(lambda: os.urandom(1), wipe_bytes_owned)
print(json.dumps(report))
"""

_WIPED = ["sole", "traced_sole", "fresh one byte", "fresh one char"]
_LEFT_ALONE = ["''", "'k'", "b''", "b'k'", "b'\\xc8'", "'é'", "one byte held elsewhere"]


@pytest.mark.parametrize("setup", ["native", "native, tracer on at import", "fallback"])
def test_wipe_owned_zeroes_only_an_object_nobody_else_holds(setup):
    """The rule is exact on every interpreter and does not depend on how nomyo was imported:
    one other holder of any kind (a global, an lru_cache entry, a list, a dict key, a closure,
    a tracer's f_locals) and nothing is written. A value of at most one byte or Latin-1
    character that is not ours alone (the interpreter's shared objects among them) is left
    alone without refusing anyone's flow. The fallback backend follows the same rule, only
    never writes (True becomes False)."""
    prefix = ""
    if "tracer" in setup:  # reads the f_locals of every nomyo frame while nomyo is imported
        prefix = ("import sys\n"
                  "def t(frame, event, arg):\n"
                  "    if 'nomyo' in frame.f_code.co_filename:\n"
                  "        frame.f_locals\n"
                  "    return t\n"
                  "sys.settrace(t)\n"
                  "import nomyo.memory\n"
                  "sys.settrace(None)\n")
    env = {"NOMYO_MEMORY_BACKEND": "fallback"} if setup == "fallback" else {}
    proc = run_python(prefix + textwrap.dedent(_HOLDER_CASES), **env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    wiped = "False" if setup == "fallback" else "True"
    for name, (result, still_intact) in report.items():
        kind, case = name.split(" ", 1)
        if case in _WIPED:
            assert result == wiped, name
        elif case in _LEFT_ALONE:
            assert result == "False" and still_intact, name
        else:
            assert result == "refused" and still_intact, name
    assert len(report) == 2 * (8 + 3) + 3


def test_wipe_owned_refuses_interned_and_immortal_objects_without_writing():
    secret = os.urandom(12).hex()
    interned = sys.intern("".join(["nomyo-interned-", secret]))
    with pytest.raises(WipeRefusedError, match="interned"):
        wipe_str_owned([interned])
    assert interned == "nomyo-interned-" + secret and interned is sys.intern(interned)
    one = bytes(range(256))[107:108]  # the interpreter's own b"k"
    if sys.version_info >= (3, 12):
        assert sys.getrefcount(one) > 1 << 29  # immortal: counted far above any holder
    assert wipe_bytes_owned([one]) is False and one == b"k" and b"abk".endswith(one)
    assert wipe_str_owned([chr(107)]) is False and "k" == chr(107)


def test_wipe_str_if_owned_leaves_what_others_hold_and_says_so_without_raising():
    from nomyo.memory.binding import pyobjects

    if pyobjects is None:
        pytest.skip("the native helper (nomyo._pyobjects) is not built")
    secret = os.urandom(12).hex()
    interned = sys.intern("".join(["nomyo-interned-", secret]))
    held = "".join(["held-", secret])
    keep = held
    for value in (interned, held, chr(107), ""):
        assert pyobjects.wipe_str_if_owned([value]) is False
    assert interned == "nomyo-interned-" + secret and keep == "held-" + secret
    assert "k" == chr(107)
    with pytest.raises(TypeError):
        pyobjects.wipe_str_if_owned([b"bytes"])


@pytest.mark.parametrize("str_wipe", ["wipe_str_owned", "wipe_str_if_owned"])
def test_an_interned_str_whose_only_counted_reference_is_the_box_is_not_written(str_wipe):
    """Before 3.12, and again on 3.13, the intern table's references are not counted: an
    interned str handed over alone shows the box's reference and the call's, nothing more, so
    only the interned check stands between it and a zeroing that would leave the table
    pointing at a str it can no longer find (CPython reports "deletion of interned string
    failed" when it is freed). Both wipes must leave it; the table must still give its text."""
    proc = run_python(r"""
        import json, os, sys
        from nomyo.errors import WipeRefusedError
        from nomyo.memory.binding import pyobjects
        wipe = getattr(pyobjects, STR_WIPE)
        secret = os.urandom(12).hex()
        box = [sys.intern("".join(["nomyo-interned-", secret]))]
        counted = sys.getrefcount(box[0])
        try:
            result = wipe(box)
        except WipeRefusedError as exc:
            result = str(exc)
        again = sys.intern("".join(["nomyo-interned-", secret]))
        print(json.dumps([result, box, again == "nomyo-interned-" + secret, counted]))
    """.replace("STR_WIPE", repr(str_wipe)))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    result, box, intact, counted = json.loads(proc.stdout)
    if sys.version_info[:2] != (3, 12):  # 3.12 makes every interned str immortal
        assert counted == 2, counted  # the refcount alone would not have refused it
    assert box == [] and intact
    assert result is False if str_wipe == "wipe_str_if_owned" else "interned" in result


def test_wipe_tree_zeroes_the_strings_only_the_tree_held():
    """wipe_tree is what the server and the proxy call on each request and answer: a value
    nothing else holds must be zeroed where it lay, not merely dropped."""
    from nomyo.memory.binding import pyobjects

    if pyobjects is None:
        pytest.skip("the native helper (nomyo._pyobjects) is not built")
    proc = run_python(r"""
        import ctypes, json, os, sys
        from nomyo.memory.scrub import wipe_tree
        scratch = ctypes.create_string_buffer(4096)
        # sizes no other object of this run is made in, so no freed block is reused before
        # it is read
        secret = os.urandom(120).hex()
        tree = json.loads(json.dumps({"messages": [{"content": secret}], "k": secret[:170]}))
        places = []
        for text in (tree["messages"][0]["content"], tree["k"]):
            places.append((id(text) + sys.getsizeof(text) - len(text) - 1, len(text)))
            ctypes.memmove(scratch, places[-1][0], 8)
            assert scratch.raw[:8] == text[:8].encode()
        del text
        wipe_tree(tree)
        result = []
        for at, n in places:
            ctypes.memmove(scratch, at, n)
            result.append(scratch.raw[:n] == bytes(n))
        print(json.dumps([tree, result]))
    """)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{}, [True, True]]


def test_wipe_owned_checks_the_box_before_taking_anything():
    for bad in ([], [b"a", b"b"], (b"abc",), [bytearray(3)], ["text"]):
        with pytest.raises(TypeError):
            wipe_bytes_owned(bad)
        assert bad in ([], [b"a", b"b"], (b"abc",), [bytearray(3)], ["text"])
    box = [b"abc".decode()]
    with pytest.raises(TypeError, match="str"):
        wipe_bytes_owned(box)
    assert box == ["abc"]
    assert issubclass(WipeRefusedError, ValueError) and issubclass(WipeRefusedError, NomyoError)


@pytest.mark.parametrize("str_wipe", ["wipe_str_owned", "wipe_str_if_owned"])
def test_wipe_owned_zeroes_the_data_its_caches_and_its_hash(str_wipe):
    """Read where the object was, right after it was zeroed and freed: no byte of the value,
    of its UTF-8 (and before 3.12 wchar_t) caches, nor its cached hash is left. Offsets are
    CPython's layout, checked against the live object before the wipe."""
    proc = run_python(r"""
        import ctypes, json, os, struct, sys
        from nomyo.memory import wipe_bytes_owned
        from nomyo.memory.binding import pyobjects
        wipe_str = getattr(pyobjects, STR_WIPE)
        api = ctypes.pythonapi
        api.PyUnicode_AsUTF8AndSize.restype = ctypes.c_void_p
        api.PyUnicode_AsUTF8AndSize.argtypes = [ctypes.py_object, ctypes.c_void_p]
        legacy = sys.version_info < (3, 12)
        if legacy:
            api.PyUnicode_AsUnicode.restype = ctypes.c_void_p
            api.PyUnicode_AsUnicode.argtypes = [ctypes.py_object]
        scratch = ctypes.create_string_buffer(4096)

        def peek(address, n):  # copies into a buffer made before the wipe: no allocation
            ctypes.memmove(scratch, address, n)
            return scratch.raw[:n]

        def hash_at(address):
            return struct.unpack("q", peek(address, 8))[0]

        report = {}
        data = os.urandom(200)
        at = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
        shash = at - 8  # PyBytesObject.ob_shash, just before the data
        assert hash_at(shash) == -1
        assert hash(data) == hash_at(shash)  # hash() caches it there
        box = [data]
        del data
        report["bytes"] = [wipe_bytes_owned(box), peek(at, 200) == bytes(200),
                           hash_at(shash) == -1]

        for name, prefix, kind in [("ascii", "", 1), ("latin-1", "\xe9", 1),
                                   ("ucs2", "\u20ac", 2)]:
            text = prefix + os.urandom(60).hex()
            n = len(text)
            base = id(text)
            at = base + sys.getsizeof(text) - (n + 1) * kind
            assert peek(at, 8) == text[:8 // kind].encode(
                {1: "latin-1", 2: "utf-16-le"}[kind])
            hash(text)
            assert hash_at(base + 24) == hash(text)
            caches = [(api.PyUnicode_AsUTF8AndSize(text, None), len(text.encode()))]
            if legacy:
                caches.append((api.PyUnicode_AsUnicode(text), n * ctypes.sizeof(ctypes.c_wchar)))
            box = [text]
            del text
            wiped = wipe_str(box)
            report[name] = [wiped, peek(at, n * kind) == bytes(n * kind),
                            hash_at(base + 24) == -1]
            for address, size in caches:
                if address != at:  # a separate block: its first 8 bytes are the free list's
                    report[name].append(peek(address + 8, size - 8) == bytes(size - 8))
        print(json.dumps(report))
    """.replace("STR_WIPE", repr(str_wipe)))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report == {k: [True] * len(v) for k, v in report.items()} and len(report) == 4
    assert len(report["latin-1"]) >= 4  # its UTF-8 cache was checked too


def test_one_character_password_keys_save_and_load(tmp_path):
    """A one-character ASCII password encodes to the interpreter's shared one-byte object;
    the wipe leaves that alone instead of failing the save."""
    from nomyo.protocol.keys import KeyPair
    from tests.server_fixtures import keypair

    pair = keypair("client")
    path = pair.save(tmp_path, password="k")
    assert KeyPair.load(path, password="k").public_pem == pair.public_pem
    with pytest.raises(ValueError, match="wrong password"):
        KeyPair.load(path, password="j")


def test_adopt_bytes_moves_a_handed_over_temporary_and_refuses_a_referenced_one():
    from nomyo.memory import adopt_bytes

    box = [_fresh_bytes()]
    with adopt_bytes(box) as moved:
        assert box == [] and len(moved) == 24 and moved.data.tobytes() != bytes(24)
    kept = _fresh_bytes()
    box = [kept]
    with pytest.raises(WipeRefusedError, match="referenced elsewhere"):
        adopt_bytes(box)
    assert box == [] and len(kept) == 24 and kept != bytes(24)


def test_cell_below_holds_its_buffer_in_place_until_released():
    owner = SecureBuffer(100, capacity=4096)
    cell = owner.cell_below(32)
    assert cell.locked == owner.locked and len(cell) == 32
    assert 0 < owner.address - cell.address <= 64
    cell.fill_random()
    view = memoryview(cell)
    cell.close()  # wiped at once; the owner stays in place while the view lives
    assert cell.closed and view.tobytes() == bytes(32)
    with pytest.raises(ValueError):
        cell.close()
    with pytest.raises(BufferError):
        owner.refit(200)
    view.release()
    del view, cell
    owner.refit(200)
    owner.close()
    with pytest.raises(ValueError):
        owner.cell_below(32)


def test_cell_below_is_refused_in_a_forked_child():
    # Forked from a fresh single-threaded interpreter: pytest's process has threads by now,
    # and fork() there may deadlock the child (Python 3.12 warns about it).
    proc = run_python("""
        import os
        from nomyo.memory import SecureBuffer
        owner = SecureBuffer(100, capacity=4096)
        cell = owner.cell_below(32)
        pid = os.fork()
        if pid == 0:  # the child must not touch the parent's secret memory
            try:
                memoryview(cell)
            except ValueError:
                os._exit(0)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        cell.close()
        owner.close()
        print("child exit", os.waitstatus_to_exitcode(status))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "child exit 0", proc.stdout


def test_cell_dropped_without_close_is_wiped():
    owner = SecureBuffer(100, capacity=4096)
    cell = owner.cell_below(32)
    cell.fill_random()
    where = cell.address
    assert any(ctypes.string_at(where, 32))
    del cell
    assert ctypes.string_at(where, 32) == bytes(32)
    owner.refit(200)  # its view of the owner went with it
    owner.close()


@pytest.mark.parametrize("first", ["owner", "cell"])
def test_cell_and_owner_collected_together_never_touch_unmapped_pages(first):
    # In a garbage cycle the finalisers run in no set order: the owner may unmap its pages
    # before the cell's finaliser would wipe them (a segfault, before the fix).
    proc = run_python(f"""
        import gc
        from nomyo.memory import SecureBuffer
        for _ in range(50):
            owner = SecureBuffer(100, capacity=4096)
            cell = owner.cell_below(32)
            cell.fill_random()
            box = [owner, cell] if {first!r} == "owner" else [cell, owner]
            box.append(box)
            del owner, cell, box
            gc.collect()
        print("collected")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "collected", proc.stderr


@pytest.mark.parametrize("hold", ["memoryview", "data"])
def test_a_view_in_a_garbage_cycle_outlives_its_buffer_finaliser(hold):
    """A suspended generator holding a view, in one garbage cycle with the buffer: the
    collector may finalise the buffer before it closes the generator, whose `finally` then
    still writes and reads through the view. The pages must stay mapped until the last view
    goes (before the fix __del__ unmapped them: the write was a SIGSEGV, or the read saw the
    next secret mapped at the same address)."""
    proc = run_python(f"""
        import gc, os, sys
        from nomyo.memory import SecureBuffer

        seen = []

        def holder(box):
            view = memoryview(box[0]) if {hold!r} == "memoryview" else box[0].data
            try:
                yield
            finally:
                nxt = SecureBuffer.copy_of(b"N" * len(view))  # may reuse a freed address
                seen.append(view.tobytes() == b"N" * len(view))
                view[:] = os.urandom(len(view))
                nxt.close()

        for round in range(200):
            buf = SecureBuffer.copy_of(b"S" * 4000)
            box = [buf] if round % 2 else []
            gen = holder(box if box else [buf])
            next(gen)
            (box if box else gen.gi_frame.f_locals["box"]).append(gen)
            del buf, gen, box
            gc.collect()
        print("rounds", len(seen), "saw-next", sum(seen))
    """, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.split() == ["rounds", "200", "saw-next", "0"], proc.stdout
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


def test_close_refit_fill_and_views_from_many_threads_only_raise_python_errors():
    """cffi releases the GIL around every nm_* call: refit checked for views in Python and
    then raced another thread's close into nm_region_free on the same region (a canary
    abort, or a write into unmapped pages). Lifecycle calls are serialised per buffer now:
    whatever the interleaving, a caller sees a result or ValueError/BufferError."""
    proc = run_python("""
        import random, sys, threading
        from nomyo.memory import SecureBuffer

        sys.setswitchinterval(1e-6)
        bufs = [SecureBuffer(64, capacity=1 << 16) for _ in range(4)]
        other = []
        lock = threading.Lock()

        def work(seed):
            rng = random.Random(seed)
            for _ in range(3000):
                i = rng.randrange(len(bufs))
                buf = bufs[i]
                op = rng.randrange(6)
                try:
                    if op == 0:
                        buf.refit(rng.randrange(1, 1 << 16))
                    elif op == 1:
                        buf.fill_random()
                    elif op == 2:
                        buf.close()
                        bufs[i] = SecureBuffer(64, capacity=1 << 16)
                    elif op == 3:
                        with memoryview(buf) as v:
                            v[0] = 1
                    elif op == 4:
                        buf.wipe()
                    else:
                        cell = buf.cell_below(16)
                        if cell is not None:
                            cell.fill_random()
                            cell.close()
                except (ValueError, BufferError):
                    pass
                except BaseException as exc:
                    with lock:
                        other.append(repr(exc))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("unexpected", len(other), other[:3])
    """, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.startswith("unexpected 0 "), proc.stdout
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


def test_a_cycle_through_a_cells_hold_on_its_owner_is_collected():
    """A cell holds its owner from C; unless the collector sees that reference, an owner
    pointing back at its cell (a subclass with a __dict__) keeps both, and the locked
    mapping, alive for good."""
    proc = run_python("""
        import gc, weakref
        from nomyo.memory import SecureBuffer

        class Tagged(SecureBuffer):
            pass

        refs = []
        for _ in range(20):
            owner = Tagged(100, capacity=4096)
            owner.cell = owner.cell_below(32)
            owner.cell.fill_random()
            refs.append(weakref.ref(owner))
            del owner
        gc.collect()
        print("alive", sum(r() is not None for r in refs))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["alive", "0"], proc.stdout
