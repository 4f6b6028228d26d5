"""Build hooks pyproject.toml cannot express: the cffi helper and the buffer-export type."""
from setuptools import Extension, setup

setup(
    cffi_modules=["csrc/build_secmem.py:ffi"],
    ext_modules=[
        Extension(
            "nomyo._region",
            sources=["csrc/region.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-fstack-protector-strong"],
        )
    ],
)
