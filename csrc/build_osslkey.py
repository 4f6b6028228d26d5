"""cffi build of nomyo._osslkey: RSA private keys in OpenSSL 3's secure heap (osslkey.c).

It links the system libcrypto (3.x); a manylinux wheel carries it, vendored by auditwheel.
`available()` tells setup.py whether the headers are there; without them nomyo installs with
keys held by `cryptography` (weaker, and the memory report says so).
"""
import os
import shlex
import subprocess
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from build_secmem import PORTABLE_GLIBC, VERSION_MACROS, _cdef_from_header  # noqa: E402


def _pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", *args, "libcrypto"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return shlex.split(out)


def available() -> bool:
    """True when libcrypto 3 can be built against (NOMYO_OPENSSL=0 turns it off). Not in a
    portable (manylinux2014) build: the system's libcrypto.so.3 needs glibc 2.34 here, so
    auditwheel would tag the wheel manylinux_2_34; such wheels report the module missing."""
    if os.environ.get("NOMYO_OPENSSL", "1") == "0" or PORTABLE_GLIBC == "1":
        return False
    try:
        version = subprocess.run(["pkg-config", "--modversion", "libcrypto"], check=True,
                                 capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return False
    return version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 3


_flags = _pkg_config("--cflags") + _pkg_config("--libs")
ffi = FFI()
ffi.cdef(_cdef_from_header(os.path.join(HERE, "osslkey.h")))
ffi.set_source(
    "nomyo._osslkey",
    '#include "osslkey.h"',
    sources=[os.path.relpath(os.path.join(HERE, "osslkey.c"))],
    include_dirs=[os.path.relpath(HERE)] + [f[2:] for f in _flags if f.startswith("-I")],
    library_dirs=[f[2:] for f in _flags if f.startswith("-L")],
    libraries=[f[2:] for f in _flags if f.startswith("-l")] or ["crypto"],
    define_macros=VERSION_MACROS + ([("NM_PORTABLE_GLIBC", "1")] if PORTABLE_GLIBC == "1" else []),
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-fstack-protector-strong",
                        "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
