"""The client against independent peers: one benchmark matrix, our client beside the
published `nomyo==0.2.9` on every row, same run.

    python bench/bench_matrix.py [--rows ours,peer,waitress,nginx,ours-tls,nginx-tls]
                                 [--rounds 3] [--small 8] [--cpu 20] [--json out.json]

Rows (every server on loopback, started here and stopped at the end):
- `ours`: the `nomyo.server` echo endpoint under `nomyo serve` (its production server);
- `peer`: the independent protocol peer `tests/peer_server.py` on `http.server`, Nagle on
  (head and body in two sends, no TCP_NODELAY, as many real servers);
- `waitress`: the endpoint's WSGI app under waitress;
- `nginx`: our endpoint behind a real nginx (/usr/sbin/nginx, generated config, keep-alive
  upstream);
- `ours-tls`, `nginx-tls`: the same over TLS (a throwaway CA from trustme).

Per row, medians of interleaved rounds (see bench_client.py for the method): small-request
client overhead (latency - the same request pre-sealed and posted raw) against the crypto
floor timed in the same worker, hot and in situ (right after a network wait); 16 concurrent
requests (throughput); 8 MiB client overhead against the envelope floor (JSON, base64,
AES-GCM and RSA of an 8 MiB exchange, plainly, in the same worker); the first request (from
interpreter start: imports, key pair, server key, connection); client CPU per small request
(process time, all threads) against the floor's CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_client import (  # noqa: E402
    LARGE_BYTES,
    SMALL_MESSAGES,
    RawBodies,
    Worker,
    count,
    published_python,
)

ALL_ROWS = ("ours", "peer", "waitress", "nginx", "ours-tls", "nginx-tls")
NGINX = os.environ.get("NOMYO_BENCH_NGINX", "/usr/sbin/nginx")

WAITRESS_SERVER = r"""
import logging, sys, threading
from waitress.server import create_server
logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # a 16-wide burst queues: expected
from nomyo.server.wsgi import create_app
server = create_server(create_app(), host="127.0.0.1", port=0, threads=8)
print(f"http://127.0.0.1:{server.effective_port}", flush=True)
threading.Thread(target=lambda: (sys.stdin.readline(), server.close()), daemon=True).start()
server.run()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Row:
    """A running server for one row: its URL, the CA bundle when TLS, what to stop."""

    name: str
    url: str = ""
    ca_file: str | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    def spawn(self, argv: list[str]) -> str:
        """Start a server process that prints its URL on its first line; returns the URL."""
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
        self.procs.append(proc)
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"{self.name}: server did not start ({argv[:3]})")
        return url

    def serve(self, extra: list[str]) -> str:
        """Start `nomyo serve` (the production server) on a free loopback port; its URL."""
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "nomyo", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), *extra], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.procs.append(proc)
        for line in proc.stdout:
            if "listening on " in line:
                return line.split("listening on ", 1)[1].split()[0]
        raise RuntimeError(f"{self.name}: nomyo serve did not start")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    if proc.stdin is None or proc.stdin.closed:
                        raise OSError("no way to ask it to stop")
                    proc.stdin.write("\n")
                    proc.stdin.flush()
                    proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    proc.terminate()  # nginx stops on SIGTERM; the peer has no stdin
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


class Certificates:
    """A throwaway CA and a 127.0.0.1 server certificate (trustme), as files."""

    def __init__(self, folder: Path) -> None:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        self.ca = str(folder / "ca.pem")
        self.cert = str(folder / "server.crt")
        self.key = str(folder / "server.key")
        ca.cert_pem.write_to_path(self.ca)
        cert.cert_chain_pems[0].write_to_path(self.cert)
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
        pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())  # what nomyo serve takes
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # and only 0600
        with os.fdopen(fd, "wb") as f:
            f.write(pkcs8)


NGINX_CONF = """
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_max_body_size 64m;
    client_body_buffer_size 16m;
    proxy_buffer_size 64k;
    proxy_buffers 64 256k;
    upstream endpoint {{ server {upstream}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port}{ssl};
        {tls}
        location / {{
            proxy_pass http://endpoint;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def start_nginx(row: Row, folder: Path, upstream: str, certs: Certificates | None) -> str:
    if not os.path.exists(NGINX):
        raise RuntimeError(f"nginx not found at {NGINX} (Debian package nginx)")
    prefix = folder / f"nginx-{row.name}"
    prefix.mkdir()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir()
    shutil.chown(prefix, "nobody") if os.geteuid() == 0 else None
    for sub in prefix.iterdir():
        if os.geteuid() == 0:
            shutil.chown(sub, "nobody")
    port = free_port()
    tls = (f"ssl_certificate {certs.cert}; ssl_certificate_key {certs.key};" if certs else "")
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, upstream=upstream.split("://")[1],
                                      port=port, ssl=" ssl" if certs else "", tls=tls))
    proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    row.procs.append(proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {proc.stderr.read().strip()[:300]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return f"{'https' if certs else 'http'}://127.0.0.1:{port}"


def start_row(name: str, folder: Path) -> Row:
    row = Row(name)
    py = sys.executable
    if name.endswith("-tls"):
        (folder / name).mkdir()
        certs: Certificates | None = Certificates(folder / name)  # one CA per row
    else:
        certs = None
    row.ca_file = certs.ca if certs else None
    try:
        if name == "ours":
            row.url = row.serve([])
        elif name == "ours-tls":
            row.url = row.serve(["--tls-cert", certs.cert, "--tls-key", certs.key])
        elif name == "peer":
            row.url = row.spawn([py, str(ROOT / "tests" / "peer_server.py"), "--nagle",
                                 "--key-size", "4096"])
            row.procs[-1].stdin.close()  # the peer serves until killed
        elif name == "waitress":
            row.url = row.spawn([py, "-c", WAITRESS_SERVER])
        elif name in ("nginx", "nginx-tls"):
            upstream = row.serve([])
            row.url = start_nginx(row, folder, upstream, certs)
        else:
            raise ValueError(f"unknown row {name!r}; rows: {', '.join(ALL_ROWS)}")
    except BaseException:
        row.stop()
        raise
    return row


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure(row: Row, old_python: str, args: argparse.Namespace) -> dict[str, float]:
    raw = RawBodies(row.url, row.ca_file)
    raw.prepare("small", SMALL_MESSAGES)
    raw.prepare("large", [{"role": "user", "content": "x" * LARGE_BYTES}])
    raw_file = raw.save()
    ours = Worker("ours", sys.executable, row.url, ours=True, raw_file=raw_file,
                  ca_file=row.ca_file)
    published = Worker("published 0.2.9", old_python, row.url, ours=False, raw_file=raw_file,
                       ca_file=row.ca_file)
    got: dict[str, list] = {k: [] for k in (
        "ours_small", "pub_small", "floor", "ours_conc", "pub_conc", "ours_large",
        "pub_large", "large_floor", "ours_cpu", "pub_cpu")}
    try:
        for r in range(args.rounds):
            print(f"  {row.name}: round {r + 1}/{args.rounds}", file=sys.stderr)
            got["ours_small"] += ours.run("small", args.small)
            got["pub_small"] += published.run("small", args.small)
            got["floor"] += ours.run("floor", args.small)
            got["ours_conc"] += ours.run("concurrent", 1)
            got["pub_conc"] += published.run("concurrent", 1)
            if args.large:
                got["ours_large"] += ours.run("large", 1)
                got["pub_large"] += published.run("large", 1)
                got["large_floor"] += ours.run("large_floor", 1)
            got["ours_cpu"] += ours.run("cpu", args.cpu)
            got["pub_cpu"] += published.run("cpu", args.cpu)
        first = {"ours_first": ours.first, "pub_first": published.first}
    finally:
        for worker in (ours, published):
            worker.close()
        os.unlink(raw_file)
    out: dict[str, float] = dict(first)
    for key in ("ours_small", "pub_small", "ours_large", "pub_large"):
        pairs = got[key]
        out[key + "_over"] = median([latency - server for server, latency in pairs])
        out[key + "_server"] = median([server for server, _ in pairs])
    out["floor"] = median([sum(hot.values()) for hot, _ in got["floor"]])
    out["floor_in_situ"] = median([sum(after.values()) for _, after in got["floor"]])
    out["ours_conc"] = median(got["ours_conc"])
    out["pub_conc"] = median(got["pub_conc"])
    out["large_floor"] = median(got["large_floor"])
    out["ours_cpu"] = median([c for c, _ in got["ours_cpu"]])
    out["ours_cpu_floor"] = median([f for _, f in got["ours_cpu"]])
    out["pub_cpu"] = median([c for c, _ in got["pub_cpu"]])
    return out


def table(results: dict[str, dict[str, float]]) -> str:
    """The matrix as a Markdown table (ms, req/s, ratios)."""
    head = ("| row | small overhead ours / published | ours ÷ floor (hot / in situ) "
            "| 16 concurrent ours / published | 8 MiB overhead ours / published "
            "| ours ÷ envelope floor | first request ours / published "
            "| CPU per request ours / published | ours CPU ÷ floor CPU |")
    lines = [head, "|" + "---|" * 9]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['ours_small_over'] * 1e3:.2f} / {m['pub_small_over'] * 1e3:.2f} ms "
            f"| {m['ours_small_over'] / m['floor']:.2f}x / "
            f"{m['ours_small_over'] / m['floor_in_situ']:.2f}x "
            f"| {m['ours_conc']:.0f} / {m['pub_conc']:.0f} req/s "
            f"({m['ours_conc'] / m['pub_conc']:.1f}x) "
            f"| {m['ours_large_over'] * 1e3:.0f} / {m['pub_large_over'] * 1e3:.0f} ms "
            f"({m['pub_large_over'] / m['ours_large_over']:.1f}x smaller) "
            f"| {m['ours_large_over'] / m['large_floor']:.2f}x "
            f"| {m['ours_first'] * 1e3:.0f} / {m['pub_first'] * 1e3:.0f} ms "
            f"| {m['ours_cpu'] * 1e3:.2f} / {m['pub_cpu'] * 1e3:.2f} ms "
            f"| {m['ours_cpu'] / m['ours_cpu_floor']:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ALL_ROWS),
                        help="comma-separated rows (default: all)")
    parser.add_argument("--rounds", type=count(1), default=3, help="interleaved rounds per row")
    parser.add_argument("--small", type=count(1), default=8, help="small requests per round")
    parser.add_argument("--cpu", type=count(1), default=20,
                        help="sequential requests per CPU measurement")
    parser.add_argument("--large", type=count(0), default=1,
                        help="1 measures 8 MiB requests, 0 skips them")
    parser.add_argument("--json", help="also write the medians to this file")
    args = parser.parse_args()
    rows = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = sorted(set(rows) - set(ALL_ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; rows: {', '.join(ALL_ROWS)}")
    old_python = published_python()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="nomyo-matrix-") as tmp:
        folder = Path(tmp)
        os.chmod(folder, 0o755)  # nginx workers (nobody) reach their temp paths
        failed: dict[str, str] = {}
        for name in rows:
            print(f"row {name}", file=sys.stderr)
            try:
                row = start_row(name, folder)
                try:
                    results[name] = measure(row, old_python, args)
                finally:
                    row.stop()
            except Exception as err:  # one row's failure is reported; the others still run
                failed[name] = f"{type(err).__name__}: {err}"
                print(f"row {name} failed: {failed[name]}", file=sys.stderr)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{args.rounds} interleaved rounds per row; medians\n")
    print(table(results))
    for name, reason in failed.items():
        print(f"\nrow {name} did not run: {reason}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
