# Compiled by csrc/build_secmem.py (cffi, out-of-line API mode); declarations in csrc/secmem.h.
from typing import Any

ffi: Any
lib: Any
