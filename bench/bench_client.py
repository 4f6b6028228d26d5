"""Client speed next to the published client, same machine, same run, same server.

    python bench/bench_client.py [--rounds 6] [--small 10] [--concurrent 1] [--large 1]

Starts one `nomyo.server` echo endpoint (RSA-4096) in its own process and two client worker
processes speaking to it: ours (this checkout) and the published `nomyo==0.2.9` (installed
by this script into a throwaway venv, `NOMYO_BENCH_VENV` to choose where). Measurements are
interleaved round by round so background load hits both alike; every figure is a median.

- small request: client overhead = client latency - server time, where server time is the
  latency of the same request pre-sealed and posted raw over a kept-alive connection (the
  server does all its work, the client none). Each worker alternates one raw request and
  one client request, so both see the same scheduling and load; the overhead is the median
  of the per-pair differences. Compared with the client's cryptographic floor, timed in our
  worker: one RSA-4096 private decryption, one RSA-4096 public encryption, AES-GCM both
  ways, back to back. Goal: ours within 1.25x of the floor. The same operations are also
  timed right after a network wait ("in situ"): an idle CPU wakes slower, and even a client
  doing nothing but the cryptography pays that.
- 16 concurrent `create()` calls: throughput (requests/s), ours / published. Goal >= 3.5x.
- one 8 MiB message: client overhead (latency - interleaved raw server time, as for small
  requests), published / ours. Goal >= 6x.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path
from urllib.parse import quote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nomyo.protocol import envelope, keys  # noqa: E402

PUBLISHED = "nomyo==0.2.9"
SMALL_MESSAGES = [{"role": "user", "content": "Hello! What is the capital of France?"}]
LARGE_BYTES = 8 * 1024 * 1024

# The worker speaks the published API only, so the same code drives both clients.
WORKER = r"""
import asyncio, base64, functools, json, os, re, socket, ssl, sys, time, uuid, warnings, logging
from urllib.parse import urlsplit
warnings.simplefilter("ignore")
logging.disable(logging.CRITICAL)
_born = time.perf_counter()
from nomyo import SecureChatCompletion

client = SecureChatCompletion(base_url=sys.argv[1], allow_http=True)
SMALL = [{"role": "user", "content": "Hello! What is the capital of France?"}]
with open(sys.argv[3]) as f:
    RAW = json.load(f)
RAW_BODIES = {name: base64.b64decode(body) for name, body in RAW["bodies"].items()}
_url = urlsplit(sys.argv[1])
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*([0-9]+)")


class RawConnection:
    # One kept-alive connection posting pre-sealed requests: the server's own time. Written on
    # the socket, so it reads in quick-ACK mode too: a server without TCP_NODELAY must not
    # make the server time look longer than it is (which would flatter the clients).
    def __init__(self):
        self.sock = None

    def _connect(self):
        sock = socket.create_connection((_url.hostname, _url.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _url.scheme == "https":
            context = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE"))
            sock = context.wrap_socket(sock, server_hostname=_url.hostname)
        self.sock = sock

    def _recv(self):
        if _QUICKACK is not None:
            self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed by the server")
        return data

    def post(self, body):
        head = ("POST /v1/chat/secure_completion HTTP/1.1\r\nHost: %s\r\nX-Payload-ID: %s\r\n"
                "X-Public-Key: %s\r\nContent-Type: application/octet-stream\r\n"
                "Content-Length: %d\r\n\r\n" % (_url.netloc, uuid.uuid4(), RAW["public_key"],
                                                len(body))).encode()
        for attempt in (1, 2):  # a kept-alive connection the server closed: once more
            if self.sock is None:
                self._connect()
            start = time.perf_counter()
            try:
                if len(body) < 65536:  # one segment, as the clients send small requests
                    self.sock.sendall(head + body)
                else:
                    self.sock.sendall(head)
                    self.sock.sendall(body)
                buf = self._recv()
                while b"\r\n\r\n" not in buf:
                    buf += self._recv()
            except (ConnectionError, ssl.SSLError):
                self.sock = None
                if attempt == 2:
                    raise
                continue
            end = buf.index(b"\r\n\r\n") + 4
            assert buf[9:12] == b"200", buf[:200]
            need = end + int(_LENGTH.search(buf[:end]).group(1))
            have = len(buf)
            while have < need:
                have += len(self._recv())
            return time.perf_counter() - start


raw_conn = RawConnection()

def raw_post(name="small"):  # the server's own time: the same request pre-sealed, posted raw
    return raw_conn.post(RAW_BODIES[name])

class Floor:  # the client's unavoidable cryptography for one small request, step by step
    def __init__(self):
        import os
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                            label=None)
        key = rsa.generate_private_key(65537, 4096)
        peer = rsa.generate_private_key(65537, 4096).public_key()
        wrapped = key.public_key().encrypt(os.urandom(32), oaep)
        aes, nonce = AESGCM(AESGCM.generate_key(256)), os.urandom(12)
        request = json.dumps({"model": "bench", "messages": SMALL}).encode()
        sealed = aes.encrypt(nonce, os.urandom(700), None)  # about the echo answer's size
        self.steps = {
            "rsa_private_decrypt": lambda: key.decrypt(wrapped, oaep),
            "rsa_public_encrypt": lambda: peer.encrypt(nonce * 2 + nonce[:8], oaep),
            "aes_gcm_both_ways": lambda: (aes.encrypt(nonce, request, None),
                                          aes.decrypt(nonce, sealed, None)),
        }

    def __call__(self):  # {step: seconds}
        out = {}
        for name, step in self.steps.items():
            start = time.perf_counter()
            step()
            out[name] = time.perf_counter() - start
        return out

@functools.lru_cache(maxsize=None)
def floor():  # made once, on first use (two RSA-4096 key generations)
    return Floor()

def floor_pair():  # the floor back to back (hot), then right after a network wait
    hot = floor()()
    raw_post()
    return hot, floor()()

def timed_sync(messages):
    start = time.perf_counter()
    client.create_sync("bench", messages)
    return time.perf_counter() - start

async def timed(messages):
    start = time.perf_counter()
    response = await client.create(model="bench", messages=messages)
    elapsed = time.perf_counter() - start
    assert response["_metadata"]["is_encrypted"]
    return elapsed

async def concurrent():
    start = time.perf_counter()
    answers = await asyncio.gather(*[client.create(model="bench", messages=[
        {"role": "user", "content": f"concurrent {i}"}]) for i in range(16)])
    elapsed = time.perf_counter() - start
    assert len(answers) == 16
    return 16 / elapsed

class LargeFloor:  # the envelope of an 8 MiB exchange, plainly: JSON, base64, AES, RSA
    def __init__(self):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        self.oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                                 label=None)
        self.key = rsa.generate_private_key(65537, 4096)
        self.peer = rsa.generate_private_key(65537, 4096).public_key()
        self.AESGCM = AESGCM
        self.content = "x" * int(sys.argv[2])
        answer = json.dumps({"choices": [{"message": {"role": "assistant",
                                                      "content": self.content}}]}).encode()
        aes_key, nonce = AESGCM.generate_key(256), os.urandom(12)
        self.answer = json.dumps({"ciphertext": base64.b64encode(
            AESGCM(aes_key).encrypt(nonce, answer, None)).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "key": base64.b64encode(self.key.public_key().encrypt(aes_key, self.oaep)).decode()})

    def __call__(self):
        start = time.perf_counter()
        plaintext = json.dumps({"model": "bench", "messages": [
            {"role": "user", "content": self.content}]}).encode()
        aes_key, nonce = self.AESGCM.generate_key(256), os.urandom(12)
        sealed = self.AESGCM(aes_key).encrypt(nonce, plaintext, None)
        json.dumps({"ciphertext": base64.b64encode(sealed).decode(),
                    "key": base64.b64encode(self.peer.encrypt(aes_key, self.oaep)).decode()})
        package = json.loads(self.answer)
        key = self.key.decrypt(base64.b64decode(package["key"]), self.oaep)
        opened = self.AESGCM(key).decrypt(base64.b64decode(package["nonce"]),
                                          base64.b64decode(package["ciphertext"]), None)
        json.loads(opened)
        return time.perf_counter() - start

async def cpu_async(n):
    start = time.process_time()
    for _ in range(n):
        await client.create(model="bench", messages=SMALL)
    per_request = (time.process_time() - start) / n
    start = time.process_time()
    for _ in range(n):
        floor()()
    return per_request, (time.process_time() - start) / n

async def main():
    await timed(SMALL)  # the first request: key pair, server key, connection
    first = time.perf_counter() - _born
    print(json.dumps({"ready": True, "first": first}), flush=True)
    for line in sys.stdin:
        mode, n = line.split()
        n = int(n)
        if mode.startswith("small"):
            await timed(SMALL)  # untimed: caches are cold after another process ran
            raw_post()
        if mode == "small":  # pairs: (server time, client latency), interleaved
            out = [(raw_post(), await timed(SMALL)) for _ in range(n)]
        elif mode == "small_sync":  # ours only: the blocking call, no event-loop hop
            out = [(raw_post(), timed_sync(SMALL)) for _ in range(n)]
        elif mode == "floor":  # pairs: (back to back, hot), (right after a network wait)
            out = [floor_pair() for _ in range(n)]
        elif mode == "concurrent":
            out = [await concurrent() for _ in range(n)]
        elif mode == "cpu":  # (client CPU per request, floor CPU per request)
            out = [await cpu_async(n)]
        elif mode == "large_floor":
            large_floor = globals().get("_large_floor") or LargeFloor()
            globals()["_large_floor"] = large_floor
            out = [large_floor() for _ in range(n)]
        elif mode == "large":  # pairs, as for small requests
            big = [{"role": "user", "content": "x" * int(sys.argv[2])}]
            out = [(raw_post("large"), await timed(big)) for _ in range(n)]
            del big
        else:
            break
        print(json.dumps(out), flush=True)

asyncio.run(main())
"""

SERVER = r"""
import sys
from nomyo.server import start_background
handle = start_background(backend="echo")
print(handle.url, flush=True)
sys.stdin.readline()
handle.stop()
"""


def published_python() -> str:
    """Python of a throwaway venv holding the published client (created once, then reused)."""
    where = Path(os.environ.get("NOMYO_BENCH_VENV", "/tmp/nomyo-bench-published-0.2.9"))
    python = where / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('nomyo'))"]
    if python.exists() and subprocess.run(probe, capture_output=True, text=True,
                                          check=False, cwd="/").stdout.strip() == "0.2.9":
        return str(python)
    print(f"installing {PUBLISHED} into {where} ...", file=sys.stderr)
    venv.create(where, with_pip=True, clear=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", PUBLISHED], check=True)
    return str(python)


class Worker:
    """A client worker process; `run(mode, n)` returns its list of measurements."""

    def __init__(self, name: str, python: str, url: str, ours: bool, raw_file: str,
                 ca_file: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if ca_file:  # our client reads REQUESTS_CA_BUNDLE, httpx (published) SSL_CERT_FILE
            env.update(SSL_CERT_FILE=ca_file, REQUESTS_CA_BUNDLE=ca_file)
        if ours:
            env["PYTHONPATH"] = str(ROOT)
        self.name = name
        self.proc = subprocess.Popen([python, "-c", WORKER, url, str(LARGE_BYTES), raw_file],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd="/")
        ready = json.loads(self.proc.stdout.readline())
        assert ready["ready"], name
        self.first = ready["first"]  # seconds from interpreter start to the first answer

    def run(self, mode: str, n: int) -> list[float]:
        self.proc.stdin.write(f"{mode} {n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.write("quit 0\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


class RawBodies:
    """Requests pre-sealed to the server's key, which the workers post raw (no client work):
    the server's own time for the same request."""

    def __init__(self, url: str, ca_file: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme == "https":
            import ssl

            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, context=ssl.create_default_context(cafile=ca_file))
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port)
        conn.request("GET", "/pki/public_key")
        self.server_key = conn.getresponse().read().decode()
        conn.close()
        pair = keys.KeyPair.generate(4096)  # the same size as the clients' keys
        self.public_key = quote(pair.public_pem)
        self.bodies: dict[str, bytes] = {}

    def prepare(self, name: str, messages: list) -> None:
        self.bodies[name] = envelope.seal_json({"model": "bench", "messages": messages},
                                               self.server_key)

    def save(self) -> str:
        """Write them to a temporary JSON file for the workers; returns its path."""
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"public_key": self.public_key, "bodies": {
                name: base64.b64encode(body).decode() for name, body in self.bodies.items()}}, f)
        return f.name


def our_stages(server_pem: str, n: int) -> dict[str, dict[str, float]]:
    """Median seconds of our client's local steps (no network), small and 8 MiB."""
    from nomyo.memory import secure_json

    pair = keys.KeyPair.generate(4096)
    server_key = keys.load_public_key(server_pem)
    out = {}
    for name, content, reps in (("small", SMALL_MESSAGES[0]["content"], n),
                                ("8 MiB", "x" * LARGE_BYTES, 3)):
        payload = {"model": "bench", "messages": [{"role": "user", "content": content}]}
        answer = envelope.seal_json({"id": "r", "choices": [{"index": 0, "message": {
            "role": "assistant", "content": "Echo: " + content}}]}, pair.public_key)
        times: dict[str, list[float]] = {"secure_json.dumps": [], "envelope.seal": [],
                                         "envelope.open_json": []}
        for _ in range(reps):
            start = time.perf_counter()
            plaintext = secure_json.dumps(payload)
            dumped = time.perf_counter()
            envelope.seal(plaintext, server_key)
            sealed = time.perf_counter()
            plaintext.close()
            opened_at = time.perf_counter()
            envelope.open_json(answer, pair)
            done = time.perf_counter()
            times["secure_json.dumps"].append(dumped - start)
            times["envelope.seal"].append(sealed - dumped)
            times["envelope.open_json"].append(done - opened_at)
        out[name] = {k: statistics.median(v) for k, v in times.items()}
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


def count(minimum: int):
    """An argparse type: a whole number of at least `minimum`."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return parse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=count(1), default=6, help="interleaved rounds")
    parser.add_argument("--small", type=count(1), default=10, help="small requests per round")
    parser.add_argument("--concurrent", type=count(0), default=1,
                        help="16-wide bursts per round (0 skips)")
    parser.add_argument("--large", type=count(0), default=1,
                        help="8 MiB requests per round (0 skips)")
    args = parser.parse_args()

    old_python = published_python()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = server.stdout.readline().strip()
    raw = RawBodies(url)
    raw.prepare("small", SMALL_MESSAGES)
    raw.prepare("large", [{"role": "user", "content": "x" * LARGE_BYTES}])
    raw_file = raw.save()
    ours = Worker("ours", sys.executable, url, ours=True, raw_file=raw_file)
    published = Worker("published 0.2.9", old_python, url, ours=False, raw_file=raw_file)
    results: dict[str, list] = {k: [] for k in (
        "ours_small", "ours_sync", "pub_small", "floor", "ours_conc", "pub_conc",
        "ours_large", "pub_large")}
    try:
        stages = our_stages(raw.server_key, args.small)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
            results["ours_small"] += ours.run("small", args.small)
            results["ours_sync"] += ours.run("small_sync", args.small)
            results["pub_small"] += published.run("small", args.small)
            results["floor"] += ours.run("floor", args.small)
            if args.concurrent:
                results["ours_conc"] += ours.run("concurrent", args.concurrent)
                results["pub_conc"] += published.run("concurrent", args.concurrent)
            if args.large:
                results["ours_large"] += ours.run("large", args.large)
                results["pub_large"] += published.run("large", args.large)
    finally:
        for worker in (ours, published):
            worker.close()
        server.stdin.write("\n")
        server.stdin.flush()
        server.wait(timeout=60)
        os.unlink(raw_file)

    pairs = {k: results.pop(k) for k in ("ours_small", "ours_sync", "pub_small",
                                         "ours_large", "pub_large")}
    floor_runs = results.pop("floor")  # ({step: s} back to back, {step: s} after a wait)
    floor = {name: statistics.median(hot[name] for hot, _ in floor_runs)
             for name in floor_runs[0][0]}
    floor["total"] = sum(floor.values())
    in_situ = statistics.median(sum(after.values()) for _, after in floor_runs)
    med = {k: statistics.median(v) for k, v in results.items() if v}
    for key, measured in pairs.items():  # (server time, latency) pairs; none when skipped
        if not measured:
            continue
        med[key] = statistics.median(latency for _, latency in measured)
        med[key + "_raw"] = statistics.median(raw_time for raw_time, _ in measured)
        med[key + "_over"] = statistics.median(latency - raw_time for raw_time, latency in measured)
    ours_over = med["ours_small_over"]
    pub_over = med["pub_small_over"]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{args.rounds} interleaved rounds; medians")
    print("\ncryptographic floor of one small request (client side)")
    for name, value in floor.items():
        print(f"  {name:<22} {ms(value)}")
    print(f"  the same, in situ      {ms(in_situ)} (timed right after a network wait, in the "
          "client worker: what even a client doing nothing else pays; the goal uses the total "
          "above)")
    print("\nsmall request (latency; overhead = median of latency - interleaved server time)")
    print(f"  server time (raw)      {ms(med['ours_small_raw'])} (beside ours), "
          f"{ms(med['pub_small_raw']).strip()} (beside published)")
    print(f"  ours, await create()   {ms(med['ours_small'])}  overhead {ms(ours_over)}  "
          f"= {ours_over / floor['total']:.2f}x floor (goal <= 1.25x)")
    sync_over = med["ours_sync_over"]
    print(f"  ours, create_sync      {ms(med['ours_sync'])}  overhead {ms(sync_over)}  "
          f"= {sync_over / floor['total']:.2f}x floor (blocking call, no event-loop hop)")
    print(f"  published 0.2.9        {ms(med['pub_small'])}  overhead {ms(pub_over)}  "
          f"= {pub_over / floor['total']:.2f}x floor")
    print(f"  against the in-situ floor: ours {ours_over / in_situ:.2f}x (await create()), "
          f"{sync_over / in_situ:.2f}x (create_sync); published {pub_over / in_situ:.2f}x")
    if args.concurrent:
        print("\n16 concurrent create() calls (throughput)")
        print(f"  ours                   {med['ours_conc']:8.1f} req/s")
        print(f"  published 0.2.9        {med['pub_conc']:8.1f} req/s")
        print(f"  ratio ours/published   {med['ours_conc'] / med['pub_conc']:8.2f}x "
              "(goal >= 3.5x)")
    if args.large:
        ours_large_over, pub_large_over = med["ours_large_over"], med["pub_large_over"]
        print("\n8 MiB message (latency; overhead = median of latency - interleaved server time)")
        print(f"  server time (raw)      {ms(med['ours_large_raw'])} (beside ours), "
              f"{ms(med['pub_large_raw']).strip()} (beside published)")
        print(f"  ours                   {ms(med['ours_large'])}  overhead {ms(ours_large_over)}")
        print(f"  published 0.2.9        {ms(med['pub_large'])}  overhead {ms(pub_large_over)}")
        print(f"  ratio published/ours   {pub_large_over / ours_large_over:8.2f}x (goal >= 6x)")
    print("\nwhere our client's local time goes (no network; includes the crypto above)")
    for size, parts in stages.items():
        print("  " + size.ljust(7) + "  ".join(f"{k} {ms(v).strip()}" for k, v in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
