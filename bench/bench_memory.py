"""Secure-memory cost next to plain bytearrays, measured in the same run.

    python bench/bench_memory.py

Prints medians (microseconds) and ratios. Goal: a small secret costs under 50 us end to
end (allocate + fill + wipe + free), and wiping 8 MiB runs at memory speed.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nomyo.memory import SecureBuffer, get_memory_protection_info


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
    small = median_us(secure_cycle(32), 3000)
    verdict = "OK" if small < 50 else "OVER BUDGET"
    print(f"small-secret budget: {small:.1f} us of 50 us -> {verdict}")


if __name__ == "__main__":
    main()
