"""Build hooks pyproject.toml cannot express: the cffi helper, the CPython-object glue and the
native base64 codec, and a check that they can be compiled at all."""
import os
import shutil
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import PlatformError

CFLAGS = ["-O2", "-Wall", "-Wextra", "-fstack-protector-strong"]

# The cffi build script owns the build switches: the version stamp, and NOMYO_PORTABLE_GLIBC=1
# (link no glibc symbol newer than 2.17, so auditwheel can tag the wheel manylinux2014;
# csrc/compat.h says what changes).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
import build_osslkey  # noqa: E402
from build_secmem import PORTABLE_GLIBC, VERSION_MACROS  # noqa: E402

# csrc/pyobjects.c and csrc/b64codec.c call explicit_bzero by name; on the old baseline it is
# routed to nm_wipe (csrc/wipe.c, linked into each extension). pyobjects' Region owns its
# mapping, so the allocator (csrc/secmem.c) is linked into it too, its calls under the GIL.
WIPE_MACROS = []
if PORTABLE_GLIBC == "1":
    WIPE_MACROS = [("NM_PORTABLE_GLIBC", "1"), ("explicit_bzero", "nm_wipe")]

NEEDS = (
    "nomyo compiles its native helper (csrc/) when installed from source, and needs a C "
    "compiler and the Python headers for that (Debian/Ubuntu: apt-get install gcc "
    "python3-dev; Fedora: dnf install gcc python3-devel; with pyenv the headers come with "
    "Python). A prebuilt nomyo wheel needs neither."
)


class build_ext_checked(build_ext):
    """Before compiling anything, make sure a compiler and Python.h exist, and say so plainly
    when they do not, instead of a traceback ending in "No such file or directory: 'gcc'"."""

    def build_extensions(self):
        for argv in (self.compiler.compiler_so, self.compiler.linker_so):
            program = argv[0] if argv else None
            if program is None or shutil.which(program) is None:
                raise PlatformError(
                    f"no C compiler: {program!r} (from $CC or Python's build settings) is "
                    f"not an executable file, nor one on PATH. {NEEDS}")
        dirs = list(self.include_dirs or []) + list(self.compiler.include_dirs or [])
        if not any(os.path.isfile(os.path.join(d, "Python.h")) for d in dirs):
            raise PlatformError(f"Python.h not found in {dirs}. {NEEDS}")
        super().build_extensions()


setup(
    cmdclass={"build_ext": build_ext_checked},
    # nomyo._osslkey (private keys in OpenSSL's secure heap) needs libcrypto 3 headers
    cffi_modules=["csrc/build_secmem.py:ffi"]
    + (["csrc/build_osslkey.py:ffi"] if build_osslkey.available() else []),
    ext_modules=[
        Extension(
            "nomyo._pyobjects",
            sources=["csrc/pyobjects.c", "csrc/secmem.c", "csrc/wipe.c"],
            include_dirs=["csrc"],
            define_macros=VERSION_MACROS + WIPE_MACROS,
            extra_compile_args=CFLAGS,
        ),
        Extension(
            "nomyo._b64",
            sources=["csrc/b64codec.c", "csrc/wipe.c"],
            include_dirs=["csrc"],
            define_macros=VERSION_MACROS + WIPE_MACROS,
            extra_compile_args=CFLAGS,
        ),
    ],
)
