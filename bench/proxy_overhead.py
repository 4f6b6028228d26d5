"""Overhead of `nomyo proxy` per small request against calling our client directly.

    python -m bench.proxy_overhead [ROUNDS] [KEY_BITS]

Both paths reach the same echo endpoint (`nomyo serve`, one real process) with the same client
settings: the proxy's client and the direct one both have a KEY_BITS key pair (default the
library's default) and the proxy's default timeout and retries. The proxy path is one more
loopback HTTP hop (a kept-alive connection) plus JSON in and out. Each round runs every path
once, in a rotating order, so drift and other load hit them alike. Prints each path's median,
the proxy's difference and ratio against the direct sync client (the proxy forwards with
`create_sync` on the granian thread serving the request); the goal is a difference within
0.5 ms. The direct async client is shown too, for callers who would use it instead.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable

from nomyo.protocol.constants import DEFAULT_KEY_BITS
from tests.openai import stack

logger = logging.getLogger("bench.proxy_overhead")
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
WARMUP_ROUNDS = 30


def _rounds(paths: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Milliseconds per call of each path; every round calls each path once, in an order
    rotated by one each round."""
    names = list(paths)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for number in range(WARMUP_ROUNDS + rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            paths[name]()
            if number >= WARMUP_ROUNDS:
                samples[name].append((time.perf_counter() - started) * 1000)
    return samples


def _proxy_call(proxy_url: str) -> tuple[http.client.HTTPConnection, Callable[[], None]]:
    host = proxy_url.split("//")[1].split("/")[0]
    conn = http.client.HTTPConnection(host, timeout=30)
    payload = json.dumps(BODY).encode()
    headers = {"content-type": "application/json"}

    def call() -> None:
        conn.request("POST", "/v1/chat/completions", body=payload, headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"proxy answered {response.status}")

    return conn, call


def main(rounds: int = 400, key_bits: int = DEFAULT_KEY_BITS) -> None:
    from nomyo.client import SecureChatCompletion

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server, server_url = stack.serve("echo")
    proxy, proxy_url = stack.proxy(server_url, "--key-size", str(key_bits))
    loop = asyncio.new_event_loop()
    try:
        conn, via_proxy = _proxy_call(proxy_url)
        with SecureChatCompletion(base_url=server_url, allow_http=True,
                                  key_size=key_bits) as client:
            samples = _rounds({
                "direct sync": lambda: client.create_sync(**BODY),
                "direct async": lambda: loop.run_until_complete(client.create(**BODY)),
                "via nomyo proxy": via_proxy,
            }, rounds)
        conn.close()
    finally:
        loop.close()
        stack.stop(proxy)
        stack.stop(server)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=10)
        logger.info("%-16s median %.3f ms (p10 %.3f, p90 %.3f)", name, medians[name], q[0], q[-1])
    direct, proxied = medians["direct sync"], medians["via nomyo proxy"]
    logger.info("overhead %.3f ms per request (goal <= 0.5 ms), ratio %.3f; against the async "
                "client %.3f ms (%d interleaved rounds, %d-bit client keys)",
                proxied - direct, proxied / direct, proxied - medians["direct async"], rounds,
                key_bits)


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3]))
