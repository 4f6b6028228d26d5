"""Build hooks pyproject.toml cannot express: the cffi helper, the CPython-object glue and the
native base64 codec."""
import os
import sys

from setuptools import Extension, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
from build_secmem import VERSION_MACROS  # noqa: E402  (one version, stamped into every module)

setup(
    cffi_modules=["csrc/build_secmem.py:ffi"],
    ext_modules=[
        Extension(
            "nomyo._pyobjects",
            sources=["csrc/pyobjects.c"],
            define_macros=VERSION_MACROS,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-fstack-protector-strong"],
        ),
        Extension(
            "nomyo._b64",
            sources=["csrc/b64codec.c"],
            define_macros=VERSION_MACROS,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-fstack-protector-strong"],
        ),
    ],
)
