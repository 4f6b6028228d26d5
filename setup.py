"""Build hooks pyproject.toml cannot express: the cffi helper, the CPython-object glue and the
native base64 codec."""
from setuptools import Extension, setup

setup(
    cffi_modules=["csrc/build_secmem.py:ffi"],
    ext_modules=[
        Extension(
            "nomyo._pyobjects",
            sources=["csrc/pyobjects.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-fstack-protector-strong"],
        ),
        Extension(
            "nomyo._b64",
            sources=["csrc/b64codec.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-fstack-protector-strong"],
        ),
    ],
)
