"""Server cost per request next to its cryptographic floor, and throughput under concurrency.

    python bench/bench_server.py [--requests 1000] [--workers 2]

The floor is what protocol 1.0 cannot avoid for one small request: open the request package
(one RSA-4096 private decryption + AES-GCM) and seal the answer (RSA-OAEP to the client key
+ AES-GCM), timed in this process in the same run. The server's CPU per request is read
from the kernel's accounting of the `nomyo serve` process (and its workers) over a batch of
keep-alive requests, with 1 worker and with --workers. Goal: server CPU within 1.25x of the
floor in both, throughput that grows past one request at a time, and at concurrency 16, with
64 idle connections held open beside it, no failed request and none waiting behind an idle
connection (the slowest request is printed). The machine's load is printed: on a shared box
the throughput lines vary with it.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402
import requests  # noqa: E402

from nomyo.protocol import envelope  # noqa: E402
from nomyo.protocol.keys import KeyPair  # noqa: E402
from nomyo.server.backends import EchoBackend  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PATH = "/v1/chat/secure_completion"
BATCHES = 5


def small_request(i: int) -> dict:
    return {"model": "bench", "messages": [{"role": "user", "content": f"ping {i}"}]}


def floor_ms(server: KeyPair, client: KeyPair, rounds: int) -> float:
    """Median CPU time of open(request) + seal(answer): the envelope work one request needs.

    CPU time (not wall time), like the server's figure, so other load on the machine does
    not count against either side.
    """
    packages = [envelope.seal_json(small_request(i), server.public_key) for i in range(rounds)]
    samples = []
    for package in packages:
        t0 = time.thread_time()
        request, info = envelope.open_json(package, server)
        answer = EchoBackend().complete(request)
        envelope.seal_json(answer, client.public_key, tag_layout=info.tag_layout)
        samples.append((time.thread_time() - t0) * 1e3)
    return statistics.median(samples)


def cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def start_server(key_file: Path, workers: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nomyo.server",
            "--port",
            "0",
            "--key-file",
            str(key_file),
            "--workers",
            str(workers),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    match = re.search(r"listening on (\S+)", proc.stdout.readline())
    if not match:
        proc.kill()
        raise SystemExit("server did not start")
    return proc, match.group(1)


def run_batch(
    url: str, packages: list[bytes], headers: dict, session: requests.Session,
    latencies: list[float] | None = None,
) -> int:
    """Post each package; returns how many failed (any status but 200, or an exception)."""
    failed = 0
    for package in packages:
        t0 = time.perf_counter()
        try:
            response = session.post(url + PATH, data=package, headers=headers, timeout=60)
            ok = response.status_code == 200
        except requests.RequestException:
            ok = False
        if latencies is not None:
            latencies.append(time.perf_counter() - t0)
        failed += not ok
    return failed


def server_cpu_ratio(
    url: str, proc: subprocess.Popen, packages: list[bytes], headers: dict, batches: int,
    floor: Callable[[], float],
) -> tuple[float, float]:
    """Median over batches of server CPU ms per request on one keep-alive connection, and the
    median of each batch's ratio to a floor measured right before it: this machine's speed
    drifts by 20% within minutes, so each batch is judged against its own floor. A batch is
    at least 200 requests: the kernel counts CPU time in 10 ms ticks."""
    ps = psutil.Process(proc.pid)
    per_request, ratios = [], []
    size = len(packages) // batches
    with requests.Session() as session:
        run_batch(url, packages[:10], headers, session)  # warm-up
        for b in range(batches):
            chunk = packages[b * size : (b + 1) * size]
            base = floor()
            before = cpu_seconds(ps)
            run_batch(url, chunk, headers, session)
            cpu = (cpu_seconds(ps) - before) / len(chunk) * 1e3
            per_request.append(cpu)
            ratios.append(cpu / base)
    return statistics.median(per_request), statistics.median(ratios)


def throughput(
    url: str, packages: list[bytes], headers: dict, concurrency: int,
    latencies: list[float] | None = None,
) -> tuple[float, int]:
    """(requests/s, failures) with `concurrency` clients, each on its own keep-alive session."""
    slices = [packages[i::concurrency] for i in range(concurrency)]
    failures: list[int] = []

    def client(chunk: list[bytes]) -> None:
        with requests.Session() as session:
            failures.append(run_batch(url, chunk, headers, session, latencies))

    threads = [threading.Thread(target=client, args=(chunk,)) for chunk in slices]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(packages) / (time.perf_counter() - t0), sum(failures)


def rate_table(url: str, packages: list[bytes], headers: dict, rounds: int = 3) -> dict:
    """Median requests/s per concurrency level over interleaved rounds (the box is shared)."""
    samples: dict[int, list[float]] = {1: [], 4: [], 8: [], 16: []}
    for _ in range(rounds):
        for concurrency in samples:
            rate, failed = throughput(url, packages, headers, concurrency)
            if failed:
                raise SystemExit(f"{failed} requests failed at concurrency {concurrency}")
            samples[concurrency].append(rate)
    return {c: statistics.median(s) for c, s in samples.items()}


def beside_idle_connections(url: str, packages: list[bytes], headers: dict) -> str:
    """Concurrency 16 while 64 idle connections (a few opened mid-run too) sit open."""
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(64)]
    latencies: list[float] = []
    try:
        rate, failed = throughput(url, packages, headers, 16, latencies)
    finally:
        for sock in idle:
            sock.close()
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1e3
    return (f"c=16 beside 64 idle connections: {rate:6.1f} req/s, {failed} failed, "
            f"median {p50:.0f} ms, slowest {latencies[-1] * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=BATCHES * 200,
                        help="requests per measurement")
    parser.add_argument("--workers", type=int, default=2, help="worker processes to compare with 1")
    args = parser.parse_args()

    server_key, client_key = KeyPair.generate(4096), KeyPair.generate(4096)
    headers = {
        "X-Payload-ID": "bench",
        "X-Public-Key": quote(client_key.public_pem),
        "Content-Type": "application/octet-stream",
    }
    packages = [
        envelope.seal_json(small_request(i), server_key.public_key) for i in range(args.requests)
    ]
    print(f"cores={os.cpu_count()} load={os.getloadavg()[0]:.2f} requests={args.requests}")
    with tempfile.TemporaryDirectory() as folder:
        server_key.save(folder)
        key_file = Path(folder) / "private_key.pem"
        floors: list[float] = []

        def floor() -> float:
            floors.append(floor_ms(server_key, client_key, 40))
            return floors[-1]

        results = {}
        for workers in (1, args.workers):
            proc, url = start_server(key_file, workers)
            try:
                cpu, ratio = server_cpu_ratio(url, proc, packages, headers, BATCHES, floor)
                rates = rate_table(url, packages, headers)
                idle = beside_idle_connections(url, packages, headers)
            finally:
                proc.terminate()
                proc.wait(30)
            results[workers] = (cpu, ratio, rates, idle)
    print(f"crypto floor (open + seal, RSA-4096): {statistics.median(floors):7.2f} ms "
          f"CPU/request (median; {min(floors):.2f}-{max(floors):.2f} over the run)")
    base = results[1][2][1]
    for workers, (cpu, ratio, rates, idle) in results.items():
        verdict = "OK" if ratio <= 1.25 else "OVER BUDGET"
        label = f"{workers} worker{'s' if workers > 1 else ''}"
        print(f"{label:>9}: server CPU per small request {cpu:6.2f} ms (median of {BATCHES} "
              f"batches), ratio {ratio:4.2f}x of the floor beside each batch (goal <= 1.25x) "
              f"-> {verdict}")
        cells = "   ".join(f"c={c}: {r:6.1f} req/s ({r / base:4.2f}x)" for c, r in rates.items())
        print(f"{label:>9}: {cells}")
        print(f"{label:>9}: {idle}")
    print(f"floor-bound ceiling per core: {1000 / statistics.median(floors):6.1f} req/s")


if __name__ == "__main__":
    main()
