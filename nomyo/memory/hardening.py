"""Process hardening: no core dumps, not dumpable (no ptrace-attach by peers, no /proc/pid/mem)."""
from __future__ import annotations

import logging
import resource
from typing import Any

from nomyo.memory import binding
from nomyo.memory.report import get_memory_protection_info

log = logging.getLogger("nomyo.memory")


def harden_process() -> dict[str, Any]:
    """Clear the dumpable flag and set RLIMIT_CORE to 0 (soft and hard); return the report."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if not binding.set_dumpable(0):
        log.warning("fallback backend: the dumpable flag cannot be cleared, only RLIMIT_CORE")
    return get_memory_protection_info()
