"""`nomyo serve` as a real subprocess: start, answer, stop on SIGTERM/SIGINT; flag errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from nomyo.protocol.keys import KeyPair
from tests.helpers import ROOT
from tests.server_fixtures import (
    COMPLETION,
    chat_request,
    completion_headers,
    kill_group,
    listening_url,
    open_response,
    seal_request,
    serve_process,
    vector_keys,
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_and_stops_cleanly_on_signal(tmp_path, sig) -> None:
    pair = KeyPair.generate(2048)
    pair.save(tmp_path, password="s3cret pass")
    proc = serve_process(
        "--key-file", str(tmp_path / "private_key.pem"), env={"NOMYO_KEY_PASSWORD": "s3cret pass"}
    )
    try:
        url = listening_url(proc)
        assert requests.get(url + "/pki/public_key", timeout=10).text == pair.public_pem
        session = requests.Session()  # an idle keep-alive connection must not delay shutdown
        response = session.post(
            url + COMPLETION,
            timeout=30,
            data=seal_request(chat_request("over the CLI"), pair.public_pem),
            headers=completion_headers(vector_keys()["client_public_pem"]),
        )
        assert (
            "Echo: over the CLI"
            in open_response(response.content)[0]["choices"][0]["message"]["content"]
        )
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, err
    assert "stopped" in out
    assert "Traceback" not in err and "over the CLI" not in err + out


def run_server_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m nomyo.server ARGS` from the checkout; output captured, never raised on."""
    return subprocess.run([sys.executable, "-m", "nomyo.server", *args], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "http"], "--port: expected a port number"),
        (["--rate-limit", "-1"], "--rate-limit: must be a positive number"),
        (["--key-bits", "1024"], "--key-bits: invalid choice"),
        (["--frobnicate"], "unrecognized arguments"),
        (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
        (["--api-key-file", "/nonexistent/keys"], "/nonexistent/keys: No such file"),
        (["--backend", "ftp://x"], "backend must be 'echo' or an http(s):// URL"),
        (["--key-file", "/nonexistent/key.pem"], "No such file"),
    ],
)
def test_bad_flags_give_one_line_errors(args, message) -> None:
    proc = run_server_cli("--port", "0", "--key-bits", "2048", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_bad_policy_and_wrong_password_are_one_line(tmp_path) -> None:
    (tmp_path / "tiers.json").write_text(json.dumps({"m": ["ultra"]}))
    proc = run_server_cli("--tier-policy", str(tmp_path / "tiers.json"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    KeyPair.generate(2048).save(tmp_path, password="right")
    proc = run_server_cli("--key-file", str(tmp_path / "private_key.pem"),
                          env={**os.environ, "NOMYO_KEY_PASSWORD": "wrong"})
    assert proc.returncode == 2
    key_file = tmp_path / "private_key.pem"
    assert proc.stderr.strip().splitlines() == [
        f"nomyo serve: error: {key_file}: not a PEM private key, or wrong password"
    ]


def test_help_is_clear() -> None:
    proc = run_server_cli("--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for flag in (
        "--backend",
        "--key-file",
        "NOMYO_KEY_PASSWORD",
        "--api-key-file",
        "--tier-policy",
        "--rate-limit",
        "--tls-cert",
        "--tpm",
    ):
        assert flag in out


def test_workers_share_port_and_key_and_stop_together(tmp_path) -> None:
    psutil = pytest.importorskip("psutil", reason="psutil (runtime dependency) counts the workers")
    pair = KeyPair.generate(2048)
    pair.save(tmp_path)
    proc = serve_process("--workers", "2", "--key-file", str(tmp_path / "private_key.pem"))
    try:
        url = listening_url(proc)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        headers = completion_headers(vector_keys()["client_public_pem"])

        def one(i: int) -> str:
            body = seal_request(chat_request(f"worker {i}"), pair.public_pem)
            response = requests.post(url + COMPLETION, data=body, headers=headers, timeout=30)
            return open_response(response.content)[0]["choices"][0]["message"]["content"]

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(one, range(12))) == [f"Echo: worker {i}" for i in range(12)]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, err
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_serve_without_the_server_extra_says_what_to_install() -> None:
    """`nomyo serve` needs granian (nomyo[server]); without it: one line and status 2."""
    code = ("import sys; sys.modules['granian'] = None\n"
            "from nomyo.cli.serve import main; sys.exit(main(['--port', '0']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "pip install 'nomyo[server]'" in proc.stderr
