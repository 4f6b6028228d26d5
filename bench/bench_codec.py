"""Native base64 codec next to the stdlib, measured in the same run.

    python bench/bench_codec.py

Prints medians (milliseconds) for 8 MiB of random data and the stdlib / native ratios. The two
sides are timed in alternation, so load from elsewhere on the machine hits both alike. Goal:
encode and decode each at least 4x faster than base64.b64encode / b64decode(validate=True).
"""
from __future__ import annotations

import base64
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nomyo import _b64  # the native codec itself: this bench has no fallback to measure

SIZE = 8 << 20
ROUNDS = 21
GOAL = 4.0


def paired_ms(native, stdlib, rounds: int = ROUNDS) -> tuple[float, float]:
    """Median milliseconds of each function, the two called in alternation."""
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in ((native, samples[0]), (stdlib, samples[1])):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples[0]), statistics.median(samples[1])


def report(label: str, native, stdlib) -> float:
    """Time one native/stdlib pair, print it, return the ratio."""
    native_ms, stdlib_ms = paired_ms(native, stdlib)
    ratio = stdlib_ms / native_ms
    print(f"{label:<12} native {native_ms:6.2f} ms ({SIZE / native_ms / 1e6:5.2f} GB/s)   "
          f"stdlib {stdlib_ms:6.2f} ms ({SIZE / stdlib_ms / 1e6:5.2f} GB/s)   ratio {ratio:5.2f}x")
    return ratio


def main() -> None:
    data = os.urandom(SIZE)
    text = base64.b64encode(data)
    text_str = text.decode("ascii")
    out = bytearray(SIZE)
    assert _b64.encode(data) == text and _b64.decode(text) == data
    print(f"8 MiB of random data, median of {ROUNDS} rounds (GB/s of raw bytes)")
    encode = report("encode", lambda: _b64.encode(data), lambda: base64.b64encode(data))

    def stdlib_decode() -> bytes:
        return base64.b64decode(text, validate=True)
    decode = report("decode", lambda: _b64.decode(text), stdlib_decode)
    report("decode_into", lambda: _b64.decode_into(text, out, 0), stdlib_decode)
    report("decode str", lambda: _b64.decode(text_str),
           lambda: base64.b64decode(text_str, validate=True))
    verdict = "OK" if min(encode, decode) >= GOAL else "UNDER GOAL"
    print(f"goal: encode and decode each >= {GOAL:.0f}x the stdlib -> {verdict}")


if __name__ == "__main__":
    main()
