"""Build hooks pyproject.toml cannot express: the cffi helper and the CPython-object glue."""
from setuptools import Extension, setup

setup(
    cffi_modules=["csrc/build_secmem.py:ffi"],
    ext_modules=[
        Extension(
            "nomyo._pyobjects",
            sources=["csrc/pyobjects.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-fstack-protector-strong"],
        )
    ],
)
