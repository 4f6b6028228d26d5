"""What a long-lived owner (a client, a pool of secure buffers) leaves behind in a forked
child (a pre-forking server, multiprocessing's fork start method): pooled connections, worker
threads, idle secure buffers and key pairs still being born all belong to the parent.

Without this, a client's first request in a child failed (its idle secure buffers are the
parent's and refuse it), and a kept-alive connection would be shared by two processes whose
answers then cross. `os.register_at_fork` runs the hook in the child right after the fork,
before any caller code, so no request ever sees the parent's state; the parent keeps all.
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import Protocol

logger = logging.getLogger(__name__)


class ForkAware(Protocol):
    def forget_parent(self) -> None:
        """Drop, without touching the parent's side, what the parent process owns."""


_tracked: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def track(owner: ForkAware) -> None:
    """Call `owner.forget_parent()` in every child forked while `owner` is alive."""
    _tracked.add(owner)


def _in_child() -> None:
    for owner in list(_tracked):
        try:
            owner.forget_parent()
        except Exception:  # a hook cannot raise into the fork; the next request will
            logger.exception("dropping state inherited across fork failed")


os.register_at_fork(after_in_child=_in_child)
