"""cffi out-of-line API-mode build of nomyo._secmem (runs at install time, never at import).

`VERSION_MACROS` stamps nomyo/_version.py's version and a digest of these C sources into
every compiled module (setup.py uses it too; nomyo/_buildstamp.py), so that the import can
tell a stale build from a current one.
"""
import importlib.util
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
# NOMYO_PORTABLE_GLIBC=1: link no glibc symbol newer than 2.17 (manylinux2014); see compat.h.
# setup.py reads the same variable for the other extensions.
PORTABLE_GLIBC = os.environ.get("NOMYO_PORTABLE_GLIBC", "0")
if PORTABLE_GLIBC not in ("0", "1"):
    raise RuntimeError(f"NOMYO_PORTABLE_GLIBC must be 0 or 1, not {PORTABLE_GLIBC!r}")


def _cdef_from_header(path: str) -> str:
    """The declarations between the cdef markers of the header, so they live in one place."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"/\* cdef-begin \*/(.*?)/\* cdef-end \*/", text, re.DOTALL)
    if match is None:
        raise RuntimeError(f"no cdef markers in {path}")
    return match.group(1)


def _package_version() -> str:
    """`__version__` from nomyo/_version.py, read as text (the package is not importable yet)."""
    with open(os.path.join(HERE, os.pardir, "nomyo", "_version.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError("no __version__ in nomyo/_version.py")
    return match.group(1)


def _build_stamp() -> str:
    """The version and the digest of csrc/, by nomyo/_buildstamp.py (loaded by path)."""
    path = os.path.join(HERE, os.pardir, "nomyo", "_buildstamp.py")
    spec = importlib.util.spec_from_file_location("_nomyo_buildstamp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.stamp(_package_version(), HERE)


VERSION_MACROS = [("NOMYO_BUILD_VERSION", f'"{_build_stamp()}"')]

ffi = FFI()
ffi.cdef(_cdef_from_header(os.path.join(HERE, "secmem.h")))
ffi.set_source(
    "nomyo._secmem",
    '#include "secmem.h"',
    sources=[os.path.relpath(os.path.join(HERE, name))
             for name in ("secmem.c", "freewipe.c", "wipe.c")],
    include_dirs=[os.path.relpath(HERE)],
    define_macros=VERSION_MACROS + ([("NM_PORTABLE_GLIBC", "1")] if PORTABLE_GLIBC == "1" else []),
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-fstack-protector-strong"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
