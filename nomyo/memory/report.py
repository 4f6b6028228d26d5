"""The protection report: every value measured in this process, now."""
from __future__ import annotations

import logging
import mmap
import sys
from enum import Enum
from typing import Any

from nomyo.memory import binding, foreign_frees, limits, settings

log = logging.getLogger("nomyo.memory")


class MemoryProtectionLevel(Enum):
    """The published client's three levels."""

    FULL = "full"
    ZEROING_ONLY = "zeroing_only"
    NONE = "none"


def _trial_region(lock: bool) -> dict[str, Any]:
    """Allocate and free one buffer the way new buffers are made, and record what held."""
    try:
        region = binding.pyobjects.Region(1, 1, binding.region_flags(lock=lock))
    except (OSError, MemoryError):
        return {"locked": False, "dump_excluded": False, "allocator": None, "fork": None}
    result = {"locked": region.locked, "dump_excluded": region.dump_excluded,
              "allocator": region.allocator, "fork": region.fork_protection}
    try:
        region._close()
    except OSError:  # the trial is over either way; the report must not fail a health check
        log.warning("freeing the protection report's trial buffer failed", exc_info=True)
    return result


def get_memory_protection_info() -> dict[str, Any]:
    """Protection report for health checks: the published keys plus what was measured here."""
    native = binding.BACKEND == "native"
    enabled = settings.enabled()
    if native:
        # can_lock: can this process lock memory at all (measured even while disabled)
        lock_trial = _trial_region(lock=True)
        live = lock_trial if enabled else _trial_region(lock=False)
        can_lock = lock_trial["locked"]
        dump_excluded = live["dump_excluded"]
        allocator = live["allocator"] or "mmap"
        fork_protection = live["fork"]
    else:
        can_lock = dump_excluded = False
        allocator, fork_protection = "heap", None

    dump_flag = binding.get_dumpable()
    core = limits.core_limit()
    suid = limits.suid_dumpable()
    core_dumps_disabled = bool(
        (dump_flag == 0 and suid != 2) or (core == 0 and not limits.core_pattern_is_pipe())
    )
    locking = native and enabled and can_lock
    full = locking and dump_excluded
    level = MemoryProtectionLevel.FULL if full else MemoryProtectionLevel.ZEROING_ONLY
    report: dict[str, Any] = {
        "enabled": enabled,
        "platform": sys.platform,
        "protection_level": level.value,
        "has_memory_locking": locking,
        "has_secure_zeroing": True,
        "supports_full_protection": full,
        "page_size": mmap.PAGESIZE,
        "backend": binding.BACKEND,
        "allocator": allocator,
        "can_lock": can_lock,
        "memlock_limit": limits.memlock_limit(),
        "locked_bytes": limits.locked_bytes(),
        "dump_excluded": dump_excluded,
        "dumpable": None if dump_flag is None else bool(dump_flag),
        "core_limit": core,
        "core_dumps_disabled": core_dumps_disabled,
        "method": "mlock" if locking else "zero-only",
        "is_platform_secure": full,
        "guard_pages": native,
        "fork_protection": fork_protection,
        "fail_closed": settings.required(),
        # where RSA private keys live: "openssl_secure_heap" (nomyo._osslkey: OpenSSL's
        # CRYPTO_secure_malloc arena, mlocked, guarded, dump-excluded) or "ordinary_heap"
        # (a cryptography object; private_key_heap says why)
        "private_key_storage": "openssl_secure_heap" if binding.RSA_NATIVE else "ordinary_heap",
        "private_key_heap": binding.secure_heap_info(),
        # blocks cryptography's extension frees are zeroed first (its RSA decrypt result,
        # the AES key, among them): foreign_frees.report() says the fields
        "third_party_frees_wiped": foreign_frees.report(),
    }
    if not native:
        report["fallback_reason"] = binding.FALLBACK_REASON
    return report
