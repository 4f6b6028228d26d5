"""Run one fuzz target coverage-guided with atheris for a bounded time.

    python -m security.fuzz.run TARGET SECONDS      (TARGET: see targets.TARGETS, or "all")

Exit 0 when nothing was found in the time given; a finding is atheris's crash report (the
input is written to ./crash-*) and a non-zero exit. Exit 2 when atheris is not installed.
"""
from __future__ import annotations

import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 64
    name, seconds = argv[1], argv[2]
    if name == "all":
        status = 0
        for each in ("b64", "json_loads", "json_dumps", "json_spans", "envelope"):
            # one process each: atheris.Fuzz never returns
            rc = subprocess.call([sys.executable, "-m", "security.fuzz.run", each, seconds])
            status = status or rc
        return status
    try:
        import atheris
    except ImportError:
        print("security.fuzz.run: atheris is not installed (pip install atheris)",
              file=sys.stderr)
        return 2
    # Python-level coverage of our modules and the oracles (instrumenting everything loaded,
    # cryptography included, takes 40 s); the C helpers are not instrumented, so their
    # branches guide nothing, but the oracles still check every input they see.
    with atheris.instrument_imports(include=["nomyo", "security.fuzz", "json", "base64"]):
        from security.fuzz import targets
    target = targets.TARGETS[name]
    if name == "envelope":
        targets._packages()  # sealed before fuzzing starts
    print(f"fuzzing {name} for {seconds} s", flush=True)
    atheris.Setup([argv[0], f"-max_total_time={seconds}", "-rss_limit_mb=4096",
                   f"-artifact_prefix={os.getcwd()}/crash-{name}-"], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
