"""`nomyo doctor`: the protection report for humans, `--json` for machines, `--require` for
health checks (exit 1 when a required protection is missing, saying how to grant it)."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from nomyo.cli.parser import EXIT_FAILED, EXIT_OK

# --require names: what must hold in the report, and how to obtain it when it does not.
REQUIREMENTS: dict[str, tuple[Callable[[dict[str, Any]], bool], str]] = {
    "mlock": (
        lambda r: bool(r.get("has_memory_locking")),
        "grant CAP_IPC_LOCK or raise RLIMIT_MEMLOCK "
        "(docker: --ulimit memlock=-1 or --cap-add IPC_LOCK)",
    ),
    "no-core-dumps": (
        lambda r: bool(r.get("core_dumps_disabled")),
        "set RLIMIT_CORE to 0 (ulimit -c 0, docker --ulimit core=0) or call nomyo.harden_process()",
    ),
    "dump-exclusion": (
        lambda r: bool(r.get("dump_excluded")),
        "needs the native helper and madvise(MADV_DONTDUMP) (Linux)",
    ),
    "not-dumpable": (
        lambda r: r.get("dumpable") is False,
        "call nomyo.harden_process() in the application (prctl PR_SET_DUMPABLE 0)",
    ),
    "native": (
        lambda r: r.get("backend") == "native",
        "reinstall nomyo so that its native helper is built",
    ),
    "guard-pages": (
        lambda r: bool(r.get("guard_pages")),
        "needs the native helper",
    ),
    "memfd-secret": (
        lambda r: r.get("allocator") == "memfd_secret",
        "needs Linux >= 5.14 booted with secretmem enabled and no seccomp block on memfd_secret",
    ),
    "full": (
        lambda r: r.get("protection_level") == "full",
        "memory locking and dump exclusion must both be in force",
    ),
}


def register(sub: Any) -> None:
    """Add `doctor` to the command's subparsers."""
    doctor = sub.add_parser("doctor", help="report the memory protections in force here")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--require", type=_requirement_list, default=[], metavar="LIST",
                        help="comma-separated protections that must be in force, else exit 1: "
                        + ", ".join(REQUIREMENTS))
    doctor.add_argument("--harden", action="store_true",
                        help="apply nomyo.harden_process() first, as an application would")
    doctor.set_defaults(run=run)


def _requirement_list(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in REQUIREMENTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown protection {', '.join(unknown)}; known: {', '.join(REQUIREMENTS)}")
    return names


def run(args: argparse.Namespace) -> int:
    from nomyo.memory import get_memory_protection_info, harden_process

    report = harden_process() if args.harden else get_memory_protection_info()
    missing = [name for name in args.require if not REQUIREMENTS[name][0](report)]
    if args.json:
        out = dict(report)
        if args.require:
            out["required"] = list(args.require)
            out["missing"] = missing
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(_human_report(report))
        for name in args.require:
            state = "MISSING" if name in missing else "ok"
            print(f"require {name:<15} {state}")
    for name in missing:
        print(f"nomyo doctor: {name} is not in force: {REQUIREMENTS[name][1]}", file=sys.stderr)
    return EXIT_FAILED if missing else EXIT_OK


def _yes(value: Any) -> str:
    return {True: "yes", False: "no", None: "unknown"}.get(value, str(value))


def _size(value: Any) -> str:
    if value is None:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:g} {unit}"
        value /= 1024
    return str(value)  # pragma: no cover


def _human_report(r: dict[str, Any]) -> str:
    rows = [
        ("protection level", r.get("protection_level")),
        ("backend", f"{r.get('backend')} ({r.get('allocator')} allocator)"),
        ("memory locking", (f"{_yes(r.get('has_memory_locking'))} (can lock: "
                            f"{_yes(r.get('can_lock'))}, RLIMIT_MEMLOCK "
                            f"{_size(r.get('memlock_limit'))}, "
                            f"locked now {_size(r.get('locked_bytes') or 0)})")),
        ("excluded from dumps", _yes(r.get("dump_excluded"))),
        ("core dumps disabled", (f"{_yes(r.get('core_dumps_disabled'))} (RLIMIT_CORE "
                                 f"{_size(r.get('core_limit'))}, "
                                 f"dumpable {_yes(r.get('dumpable'))})")),
        ("guard pages", _yes(r.get("guard_pages"))),
        ("fork protection", r.get("fork_protection") or "none"),
        ("fail-closed mode", _yes(r.get("fail_closed"))),
        ("platform", r.get("platform")),
    ]
    if r.get("fallback_reason"):
        rows.append(("fallback reason", r["fallback_reason"]))
    return "\n".join(f"{name:<20} {value}" for name, value in rows)


