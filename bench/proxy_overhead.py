"""Overhead of `nomyo proxy` per small request against calling our client directly.

    python -m bench.proxy_overhead [N]

Both paths reach the same echo endpoint (`nomyo serve`, a real process); the proxy path is
one more loopback HTTP hop plus JSON in and out. Prints medians and their difference; the
goal is a difference within 0.5 ms.
"""
from __future__ import annotations

import http.client
import json
import logging
import statistics
import sys
import time

from tests.openai import stack

logger = logging.getLogger("bench.proxy_overhead")
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _timed(call, n: int) -> list[float]:
    for _ in range(20):
        call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def main(n: int = 300) -> None:
    from nomyo.client import SecureChatCompletion

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server, server_url = stack.serve("echo")
    proxy, proxy_url = stack.proxy(server_url)
    try:
        with SecureChatCompletion(base_url=server_url, allow_http=True, key_size=2048) as client:
            direct = _timed(lambda: client.create_sync(**BODY), n)
        host = proxy_url.split("//")[1].split("/")[0]
        conn = http.client.HTTPConnection(host, timeout=30)
        payload = json.dumps(BODY).encode()

        def via_proxy() -> None:
            conn.request("POST", "/v1/chat/completions", body=payload,
                         headers={"content-type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200

        proxied = _timed(via_proxy, n)
        conn.close()
    finally:
        stack.stop(proxy)
        stack.stop(server)
    d, p = statistics.median(direct), statistics.median(proxied)
    logger.info("direct client: median %.3f ms; via nomyo proxy: median %.3f ms", d, p)
    logger.info("overhead %.3f ms per request (goal <= 0.5 ms), ratio %.3f (%d requests each)",
                p - d, p / d, n)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
