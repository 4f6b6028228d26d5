"""Server cost per request next to its cryptographic floor, and throughput under concurrency.

    python bench/bench_server.py [--requests 200] [--workers 2]

The floor is what protocol 1.0 cannot avoid for one small request: open the request package
(one RSA-4096 private decryption + AES-GCM) and seal the answer (RSA-OAEP to the client key
+ AES-GCM), timed in this process in the same run. The server's CPU per request is read
from the kernel's accounting of the `nomyo serve` process (and its workers) over a batch of
keep-alive requests. Goal: server CPU within 1.25x of the floor, and throughput that grows
past one request at a time (threads decrypt in parallel; --workers also spreads the Python
parts). The machine's load is printed: on a shared box the throughput lines vary with it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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


def run_batch(url: str, packages: list[bytes], headers: dict, session: requests.Session) -> None:
    for package in packages:
        response = session.post(url + PATH, data=package, headers=headers, timeout=60)
        if response.status_code != 200:
            raise SystemExit(f"request failed: {response.status_code} {response.text[:200]}")


def server_cpu_ms(
    url: str, proc: subprocess.Popen, packages: list[bytes], headers: dict, batches: int
) -> float:
    """Median over batches of (server CPU seconds / requests) on one keep-alive connection."""
    ps = psutil.Process(proc.pid)
    per_request = []
    size = len(packages) // batches
    with requests.Session() as session:
        run_batch(url, packages[:10], headers, session)  # warm-up
        for b in range(batches):
            chunk = packages[b * size : (b + 1) * size]
            before = cpu_seconds(ps)
            run_batch(url, chunk, headers, session)
            per_request.append((cpu_seconds(ps) - before) / len(chunk) * 1e3)
    return statistics.median(per_request)


def throughput(url: str, packages: list[bytes], headers: dict, concurrency: int) -> float:
    """Requests per second with `concurrency` clients, each on its own keep-alive session."""
    slices = [packages[i::concurrency] for i in range(concurrency)]

    def client(chunk: list[bytes]) -> None:
        with requests.Session() as session:
            run_batch(url, chunk, headers, session)

    threads = [threading.Thread(target=client, args=(chunk,)) for chunk in slices]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(packages) / (time.perf_counter() - t0)


def rate_table(url: str, packages: list[bytes], headers: dict, rounds: int = 3) -> dict:
    """Median requests/s per concurrency level over interleaved rounds (the box is shared)."""
    samples: dict[int, list[float]] = {1: [], 4: [], 8: []}
    for _ in range(rounds):
        for concurrency in samples:
            samples[concurrency].append(throughput(url, packages, headers, concurrency))
    return {c: statistics.median(s) for c, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement")
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
        floor = floor_ms(server_key, client_key, 100)
        proc, url = start_server(key_file, 1)
        try:
            cpu = server_cpu_ms(url, proc, packages, headers, batches=5)
            floor_after = floor_ms(server_key, client_key, 100)
            floor = statistics.median([floor, floor_after])
            ratio = cpu / floor
            verdict = "OK" if ratio <= 1.25 else "OVER BUDGET"
            print(f"crypto floor (open + seal, RSA-4096): {floor:7.2f} ms CPU/request (median)")
            print(
                f"server CPU per small request:         {cpu:7.2f} ms CPU/request (median of 5 "
                f"batches)   ratio {ratio:5.2f}x of floor (goal <= 1.25x) -> {verdict}"
            )
            rates = rate_table(url, packages, headers)
        finally:
            proc.terminate()
            proc.wait(30)
        proc, url = start_server(key_file, args.workers)
        try:
            worker_rates = rate_table(url, packages, headers)
        finally:
            proc.terminate()
            proc.wait(30)
    base = rates[1]
    for label, table in (("1 worker", rates), (f"{args.workers} workers", worker_rates)):
        cells = "   ".join(f"c={c}: {r:6.1f} req/s ({r / base:4.2f}x)" for c, r in table.items())
        print(f"throughput, {label:>9}: {cells}")
    print(f"floor-bound ceiling per core: {1000 / floor:6.1f} req/s")


if __name__ == "__main__":
    main()
