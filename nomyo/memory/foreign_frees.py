"""cryptography's extension frees the buffer its RSA decrypt built the AES key in without
wiping it, and takes no buffer of ours. When the protocol layer loads cryptography, its
free and realloc are pointed at zeroing wrappers (binding.wipe_frees_of), once per process;
the outcome is kept for the protection report, and a failure is logged as a warning (the
residue is then as cryptography leaves it: SECURITY.md, "Copies we cannot avoid"), or, in
fail-closed mode, refuses every seal and open of a package (`require_wiped`).
Nothing here imports cryptography itself: `import nomyo` and a health check stay light.
"""
from __future__ import annotations

import logging
from typing import Any

from nomyo.errors import SecureMemoryUnavailable
from nomyo.memory import binding, failclosed

log = logging.getLogger("nomyo.memory")

_state: dict[str, Any] | None = None


def wipe_cryptography_frees() -> bool:
    """Make cryptography's extension zero every block it frees (idempotent); whether it does."""
    global _state
    if _state is None:
        import cryptography
        import cryptography.hazmat.bindings._rust as rust

        state: dict[str, Any] = {"module": f"cryptography {cryptography.__version__} "
                                 "(its _rust extension)", "wiped": True}
        try:
            path = getattr(rust, "__file__", None)
            if path is None:  # linked into the interpreter: no object of its own to patch
                raise OSError("cryptography's _rust extension has no file of its own")
            state["slots"] = binding.wipe_frees_of(path)
        except OSError as exc:
            log.warning("blocks cryptography frees are not wiped (an unwrapped AES key may stay "
                        "in freed memory): %s", exc)
            state.update(wiped=False, reason=str(exc))
        _state = state
    return bool(_state["wiped"])


def require_wiped(explicit: bool | None = None) -> None:
    """Fail-closed mode (`explicit`, else NOMYO_REQUIRE_SECURE_MEMORY): SecureMemoryUnavailable
    unless cryptography's frees are wiped; its copies of AES keys would stay in freed heap."""
    if failclosed.required(explicit) and not wipe_cryptography_frees():
        reason = (_state or {}).get("reason", "unknown")
        raise SecureMemoryUnavailable(
            f"{failclosed.ASKED} but the blocks cryptography frees are not wiped ({reason}): "
            "its copies of AES keys would stay in freed heap memory")


def report() -> dict[str, Any]:
    """The report's entry: {"module", "wiped", "slots" (GOT slots pointing at the zeroing
    wrappers) when it is, "reason" when not}; wiped is None until the
    protocol layer has loaded cryptography (nothing can have been decrypted before)."""
    if _state is None:
        return {"module": "cryptography", "wiped": None,
                "reason": "not loaded yet: done when nomyo's protocol layer first loads it"}
    return dict(_state)
