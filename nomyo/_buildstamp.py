"""The stamp compiled into every native module: the package version and a digest of the C
sources it was built from, so that a source checkout whose csrc/ changed since its modules
were built (an editable install, one venv rebuilt and another not) is told it runs old C code
instead of running it. Standard library only: the build scripts load this file by path,
before the package can be imported. An installed wheel has no csrc/ beside it, so there
only the version is compared."""
from __future__ import annotations

import hashlib
import os

SOURCE_MARK = "+src."


def source_digest(csrc: str) -> str:
    """The first 12 hex digits of SHA-256 over csrc/'s .c and .h files, names and contents."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(csrc)):
        if name.endswith((".c", ".h")):
            with open(os.path.join(csrc, name), "rb") as f:
                digest.update(name.encode("utf-8") + b"\0" + f.read() + b"\0")
    return digest.hexdigest()[:12]


def stamp(version: str, csrc: str) -> str:
    """What a module built now from `csrc` carries: e.g. `0.4.0+src.1a2b3c4d5e6f`."""
    return f"{version}{SOURCE_MARK}{source_digest(csrc)}"


def checkout_sources() -> str | None:
    """The csrc/ of the source checkout this package is imported from, or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = os.path.join(root, "csrc")
    return csrc if os.path.isfile(os.path.join(csrc, "build_secmem.py")) else None
