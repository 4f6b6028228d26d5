"""Build hooks pyproject.toml cannot express: the cffi helper, the CPython-object glue and the
native base64 codec."""
import os

from setuptools import Extension, setup
from setuptools.errors import PlatformError

CFLAGS = ["-O2", "-Wall", "-Wextra", "-fstack-protector-strong"]

# NOMYO_PORTABLE_GLIBC=1: link no glibc symbol newer than 2.17, so auditwheel can tag the
# wheel manylinux2014 (csrc/compat.h says what changes). csrc/build_secmem.py reads it too.
PORTABLE_GLIBC = os.environ.get("NOMYO_PORTABLE_GLIBC", "0")
if PORTABLE_GLIBC not in ("0", "1"):
    raise PlatformError(f"NOMYO_PORTABLE_GLIBC must be 0 or 1, not {PORTABLE_GLIBC!r}")

# csrc/pyobjects.c calls explicit_bzero by name; on the old baseline it is routed to nm_wipe
# (csrc/wipe.c, linked into that extension).
PYOBJECTS_MACROS = []
if PORTABLE_GLIBC == "1":
    PYOBJECTS_MACROS = [("NM_PORTABLE_GLIBC", "1"), ("explicit_bzero", "nm_wipe")]

setup(
    cffi_modules=["csrc/build_secmem.py:ffi"],
    ext_modules=[
        Extension(
            "nomyo._pyobjects",
            sources=["csrc/pyobjects.c", "csrc/wipe.c"],
            include_dirs=["csrc"],
            define_macros=PYOBJECTS_MACROS,
            extra_compile_args=CFLAGS,
        ),
        Extension(
            "nomyo._b64",
            sources=["csrc/b64codec.c"],
            extra_compile_args=CFLAGS,
        ),
    ],
)
