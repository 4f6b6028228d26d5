"""RSA private keys in OpenSSL's secure heap (nomyo._osslkey) next to `cryptography` keys.

    python bench/bench_keys.py [rounds]

Prints medians and ratios (native / cryptography) for RSA-4096 key generation (its time
varies a lot with the primes found: the medians of `rounds` each) and for the per-request
cost of opening a small package (RSA-OAEP-SHA256 unwrap + AES-GCM), same run, same keys.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from nomyo.memory import binding
from nomyo.protocol import envelope
from nomyo.protocol.keys import KeyPair


def interleaved(first, second, rounds: int) -> tuple[float, float]:
    """Median milliseconds of each, run in turns so that a busy machine slows both alike."""
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in ((first, samples[0]), (second, samples[1])):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples[0]), statistics.median(samples[1])


def main() -> None:
    if not binding.RSA_NATIVE:
        sys.exit(f"nomyo._osslkey not in use: {binding.KEYS_FALLBACK_REASON}")
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    native_gen, crypto_gen = interleaved(lambda: KeyPair.generate(4096).close(),
                                         lambda: rsa.generate_private_key(65537, 4096), rounds)
    print(f"keygen RSA-4096   native {native_gen:8.1f} ms   cryptography {crypto_gen:8.1f} ms"
          f"   ratio {native_gen / crypto_gen:.2f}")

    native = KeyPair.generate(4096)
    with native._private_pem(None) as pem, memoryview(pem) as view:
        crypto = KeyPair(serialization.load_pem_private_key(bytes(view), None))
    package = envelope.seal(b'{"content": "a small request"}', native.public_pem)

    def opener(pair: KeyPair):
        def run() -> None:
            with envelope.open_package(package, pair):
                pass
        return run

    opens = 20 * rounds
    for _ in range(5):  # warm both (blinding, Montgomery caches)
        opener(native)()
        opener(crypto)()
    native_open, crypto_open = interleaved(opener(native), opener(crypto), opens)
    print(f"open small pkg    native {native_open:8.2f} ms   cryptography {crypto_open:8.2f} ms"
          f"   ratio {native_open / crypto_open:.2f}")
    print(f"secure heap: {binding.secure_heap_info()}")


if __name__ == "__main__":
    main()
