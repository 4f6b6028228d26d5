"""Secure-memory cost next to plain bytearrays, measured in the same run.

    python bench/bench_memory.py

Prints medians (microseconds) and ratios. Goal: a small secret costs under 50 us end to
end (allocate + fill + wipe + free), and wiping 8 MiB runs at memory speed. The register and
stack scrub that ends every secret operation (copy in, adopt, seal, open) is timed too: a
small request runs three of them (seal, open, adopt of the unwrapped key), which together
must stay within 2% of the request's crypto floor (about 4.7 ms), i.e. 94 us.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nomyo.memory import SecureBuffer, binding, get_memory_protection_info

CRYPTO_FLOOR_US = 4700  # a small request's crypto floor (RSA-4096 + AES-GCM), per issue 12
SCRUBS_PER_REQUEST = 3  # seal, open_package, adopt_bytes of the unwrapped key


def median_us(fn, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def secure_cycle(n: int):
    def run():
        buf = SecureBuffer.random(n)
        buf.wipe()
        buf.close()
    return run


def plain_cycle(n: int):
    def run():
        buf = bytearray(os.urandom(n))
        buf[:] = bytes(n)
        del buf
    return run


def main() -> None:
    info = get_memory_protection_info()
    print(f"backend={info['backend']} allocator={info['allocator']} "
          f"protection={info['protection_level']}")
    for label, n, rounds in (("32 B", 32, 3000), ("1 MiB", 1 << 20, 200)):
        secure = median_us(secure_cycle(n), rounds)
        plain = median_us(plain_cycle(n), rounds)
        print(f"alloc+fill+wipe+free {label:>6}: secure {secure:9.1f} us   "
              f"bytearray {plain:9.1f} us   ratio {secure / plain:6.2f}x")
    big = SecureBuffer(8 << 20)
    wipe = median_us(big.wipe, 50)
    big.close()
    plain = bytearray(8 << 20)
    zeros = bytes(8 << 20)

    def memset_baseline():
        plain[:] = zeros
    base = median_us(memset_baseline, 50)
    sample = bytearray(64 << 10)

    def python_loop():  # how a byte-by-byte Python wipe performs, extrapolated to 8 MiB
        for i in range(len(sample)):
            sample[i] = 0
    loop = median_us(python_loop, 5) * 128
    print(f"wipe 8 MiB: secure {wipe:9.1f} us ({8 / 1024 / (wipe / 1e6):.1f} GiB/s)   "
          f"memcpy baseline {base:9.1f} us   ratio {wipe / base:5.2f}x   "
          f"python byte loop ~{loop / 1e6:.2f} s ({loop / wipe:.0f}x slower)")
    scrub_report()
    small = median_us(secure_cycle(32), 3000)
    verdict = "OK" if small < 50 else "OVER BUDGET"
    print(f"small-secret budget: {small:.1f} us of 50 us -> {verdict}")


def scrub_report() -> None:
    """What the scrub adds per operation, and per small request against its budget."""
    if binding.BACKEND != "native":
        print("scrub: not measured, the fallback backend has no scrub")
        return
    scrub = median_us(binding.scrub, 3000)
    src = os.urandom(32)
    dst = SecureBuffer(32)
    with memoryview(dst) as view:
        copy_c = median_us(lambda: binding.copy_scrub(view, src), 3000)

        def copy_py():
            view[:] = src
        copy_py_us = median_us(copy_py, 3000)
    dst.close()
    print(f"scrub ({binding.SCRUB_STACK_BYTES >> 10} KiB of stack + vector registers): "
          f"{scrub:6.2f} us per operation;  32 B copy in C + scrub {copy_c:6.2f} us, "
          f"Python slice copy {copy_py_us:6.2f} us")
    per_request = scrub * SCRUBS_PER_REQUEST
    budget = CRYPTO_FLOOR_US * 0.02
    verdict = "OK" if per_request <= budget else "OVER BUDGET"
    print(f"scrub per small request: {SCRUBS_PER_REQUEST} x {scrub:.2f} = {per_request:.1f} us "
          f"of {budget:.0f} us (2% of {CRYPTO_FLOOR_US / 1000:.1f} ms) -> {verdict}")


if __name__ == "__main__":
    main()
