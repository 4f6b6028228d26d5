"""SecureBuffer behaviour in the pytest process: the API contract, refusals, lifecycles."""
import copy
import ctypes
import io
import os
import pickle

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import nomyo
from nomyo.memory import SecureBuffer, secure_bytearray, wipe_bytes, wipe_str
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


def test_wipe_bytes_zeroes_a_sole_reference_and_refuses_shared_ones():
    secret = _fresh_bytes()
    assert wipe_bytes(secret) is True and secret == bytes(24)
    shared = _fresh_bytes()
    holder = [shared]
    with pytest.raises(ValueError):
        wipe_bytes(shared)
    assert holder[0] == shared
    text = "".join(["pass", "word-", str(os.getpid())])
    assert wipe_str(text) is True and set(text) == {"\x00"}
    with pytest.raises(TypeError):
        wipe_bytes(bytearray(3))


def test_adopt_bytes_moves_a_temporary_and_refuses_a_referenced_one():
    from nomyo.memory import adopt_bytes

    with adopt_bytes(_fresh_bytes()) as moved:
        assert len(moved) == 24 and moved.data.tobytes() != bytes(24)
    kept = _fresh_bytes()
    with pytest.raises(ValueError, match="referenced elsewhere"):
        adopt_bytes(kept)


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
    assert os.waitstatus_to_exitcode(status) == 0
    cell.close()
    owner.close()


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
