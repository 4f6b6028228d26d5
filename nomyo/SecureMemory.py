"""The published client's module path for the secure-memory API (`from nomyo.SecureMemory
import ...`); new code imports these names from `nomyo`."""
from nomyo.memory import (
    MemoryProtectionLevel,
    SecureBuffer,
    disable_secure_memory,
    enable_secure_memory,
    get_memory_protection_info,
    secure_bytearray,
    secure_bytes,
)

__all__ = [
    "MemoryProtectionLevel",
    "SecureBuffer",
    "disable_secure_memory",
    "enable_secure_memory",
    "get_memory_protection_info",
    "secure_bytearray",
    "secure_bytes",
]
