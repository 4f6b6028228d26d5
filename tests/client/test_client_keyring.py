"""Client key lifecycle: early background birth, leases, rotation, key_dir, close."""
from __future__ import annotations

import os
import stat
import time

import pytest

from nomyo.client.keyring import KeyRing
from nomyo.errors import DisposedError
from tests.helpers import wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_start_makes_the_first_pair_in_the_background():
    ring = KeyRing(key_size=2048)
    assert ring.current is None
    ring.start()
    wait_until(lambda: ring.pending_first is not None and ring.pending_first.done())
    with ring.lease() as pair:
        assert pair.key_size == 2048
    ring.close()


def test_first_lease_without_start_generates():
    ring = KeyRing(key_size=2048)
    with ring.lease() as pair:
        assert not pair.closed
    ring.close()
    assert pair.closed


def test_rotation_prepared_early_and_switched_when_due():
    clock = FakeClock()
    ring = KeyRing(key_size=2048, rotation_interval=100, clock=clock)
    with ring.lease() as first:
        pass
    clock.now += 74
    with ring.lease() as pair:
        assert pair is first and ring.pending_next is None
    clock.now += 1  # 3/4 of the interval: the next pair is prepared in the background
    with ring.lease() as pair:
        assert pair is first and ring.pending_next is not None
    wait_until(ring.pending_next.done)
    clock.now += 20  # still inside the interval
    with ring.lease() as pair:
        assert pair is first
    clock.now += 5  # due and ready: switch without waiting
    with ring.lease() as pair:
        assert pair is not first
    assert first.closed
    ring.close()


def test_rotation_never_waits_for_an_unready_pair():
    clock = FakeClock()
    ring = KeyRing(key_size=2048, rotation_interval=100, clock=clock)
    with ring.lease() as first:
        pass
    clock.now += 500  # long overdue, nothing prepared yet
    with ring.lease() as pair:
        assert pair is first  # served at once with the current pair
        assert ring.pending_next is not None
    wait_until(ring.pending_next.done)
    with ring.lease() as pair:
        assert pair is not first
    ring.close()


def test_pair_in_flight_survives_rotation_until_its_lease_ends():
    clock = FakeClock()
    ring = KeyRing(key_size=2048, rotation_interval=100, clock=clock)
    with ring.lease() as old:
        clock.now += 80
        with ring.lease():
            pass
        wait_until(ring.pending_next.done)
        clock.now += 30
        with ring.lease() as new:
            assert new is not old
        assert not old.closed  # the outer request still decrypts with it
    assert old.closed
    ring.close()


@pytest.mark.parametrize("interval", [0, None])
def test_rotation_disabled(interval):
    clock = FakeClock()
    ring = KeyRing(key_size=2048, rotation_interval=interval, clock=clock)
    with ring.lease() as first:
        pass
    clock.now += 10 ** 9
    with ring.lease() as pair:
        assert pair is first and ring.pending_next is None
    ring.close()


def test_key_dir_generates_saves_then_loads(tmp_path):
    ring = KeyRing(key_size=2048, key_dir=tmp_path / "k")
    with ring.lease() as pair:
        pem = pair.public_pem
    ring.close()
    private = tmp_path / "k" / "private_key.pem"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert (tmp_path / "k" / "public_key.pem").read_text() == pem
    again = KeyRing(key_dir=tmp_path / "k")
    with again.lease() as pair:
        assert pair.public_pem == pem
    again.close()


def test_key_dir_pair_older_than_interval_is_rotated_and_saved(tmp_path):
    ring = KeyRing(key_size=2048, key_dir=tmp_path)
    with ring.lease() as pair:
        old_pem = pair.public_pem
    ring.close()
    old = time.time() - 7200
    os.utime(tmp_path / "private_key.pem", (old, old))
    ring = KeyRing(key_size=2048, key_dir=tmp_path, rotation_interval=3600)
    with ring.lease() as pair:
        assert pair.public_pem == old_pem  # served at once; replacement prepared meanwhile
    wait_until(ring.pending_next.done)
    with ring.lease() as pair:
        assert pair.public_pem != old_pem
        assert (tmp_path / "public_key.pem").read_text() == pair.public_pem
    ring.close()


def test_wrong_password_is_an_error_never_an_overwrite(tmp_path):
    ring = KeyRing(key_size=2048, key_dir=tmp_path, key_password="right-password")
    with ring.lease():
        pass
    ring.close()
    before = (tmp_path / "private_key.pem").read_bytes()
    ring = KeyRing(key_size=2048, key_dir=tmp_path, key_password="wrong-password")
    with pytest.raises(ValueError), ring.lease():
        pass
    ring.close()
    assert (tmp_path / "private_key.pem").read_bytes() == before


def test_close_disposes_and_closes_pending_pairs():
    ring = KeyRing(key_size=2048)
    ring.start()
    pending = ring.pending_first
    ring.close()
    with pytest.raises(DisposedError), ring.lease():
        pass
    if not pending.cancelled():
        wait_until(lambda: pending.done() and pending.result()[0].closed)


def test_bad_options():
    with pytest.raises(ValueError):
        KeyRing(key_size=1024)
    with pytest.raises(ValueError):
        KeyRing(rotation_interval=-1)


def test_install_supersedes_a_pair_still_being_born():
    ring = KeyRing(key_size=2048)
    ring.start()
    pending = ring.pending_first
    mine = ring.generate()
    ring.install(mine)
    with ring.lease() as pair:
        assert pair is mine
    wait_until(lambda: pending.done() and pending.result()[0].closed)
    ring.close()
    assert mine.closed


def test_a_failed_first_pair_is_retried_by_the_next_lease(tmp_path):
    blocked = tmp_path / "keys"
    ring = KeyRing(key_size=2048, key_dir=blocked)  # usable when the client is made
    blocked.rmdir()
    blocked.write_text("a file where the key directory should be")  # broken afterwards
    with pytest.raises(OSError), ring.lease():
        pass
    blocked.unlink()  # the operator fixes the directory
    with ring.lease() as pair:
        assert not pair.closed
    assert (blocked / "private_key.pem").exists()
    ring.close()


def test_in_a_forked_child_the_parents_leases_and_births_are_dropped():
    """What the at-fork hook leaves (nomyo/memory/forks.py): a lease taken by a parent's
    request whose thread is gone no longer keeps a retired pair (its private key) alive in
    the child, and a birth in flight is dropped without asking its Future (whose lock the
    gone worker may have held), so the child makes its own pair. The real fork is in
    tests/client/test_fork.py; here the hook is called as the child would call it."""
    clock = FakeClock()
    ring = KeyRing(key_size=2048, rotation_interval=100, clock=clock)
    held = ring.lease()
    first = held.__enter__()  # a parent's request, in flight at the fork
    clock.now += 80
    with ring.lease():
        pass
    assert ring.pending_next is not None  # a birth in flight at the fork
    ring.forget_parent()
    assert ring.pending_next is None and ring.pending_first is None
    clock.now += 30  # due: the child prepares its own next pair and switches to it
    with ring.lease():
        pass
    wait_until(lambda: ring.pending_next is not None and ring.pending_next.done())
    with ring.lease() as pair:
        assert pair is not first
    assert first.closed, "the retired pair was kept for a lease of a thread that is gone"
    held.__exit__(None, None, None)  # the forking thread's own lease ending: allowed
    ring.close()
