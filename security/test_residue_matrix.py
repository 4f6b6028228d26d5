"""The residue matrix (issue 16): a client process and a server process (echo backend, and an
OpenAI-compatible HTTP backend in its own process), scanned live and in a gcore core once
every case has run, for any 16-byte window of each AES key of the run, any 32-byte window of
the private key's d, p and q (both byte orders) and any 24-character window of each request
and answer content (security/residue.py says how, and why that is exact).

Cases (security/residue_cases.py): 50 sequential, 64 at concurrency 16, multi-line 4 KB
answers with escapes, CJK and emoji, tool calls, one 8 MiB request, error paths (4xx/5xx
answers, a tampered and an unparseable answer package, one sealed to another key; on the
server, refused plaintexts and a failing backend). The processes run with
NOMYO_SECURE_PRIVATE_KEYS=1, the configuration in which d, p and q are meant to be absent.

The caller's own dict: the client child's request messages and returned answers are its own
ordinary Python objects. It hands each of them, once done, to `nomyo.memory.scrub.wipe_tree`,
which empties it and zeroes every string only it held (`nomyo.memory.wipe_str_owned`): the
documented way for a caller to drop secret text (SECURITY.md). Any content found after that
was copied by nomyo or what it runs on, and is a finding.

Positive controls: a control AES key window, RSA window and text (24+ characters) go into the
scanned process through its environment, which CPython copies into bytes objects of its
ordinary heap at start (`os.environb`); the same scan must find each of them outside the
stack, live and in the core.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from security.residue import (
    CONTROL,
    Needles,
    Scan,
    child_process,
    family,
    hear,
    merged,
    say,
    scan_core,
    scan_live,
)
from security.residue_cases import CASES, CONCURRENCY, TOOLS, content, messages
from tests.helpers import ROOT, child_env

pytestmark = pytest.mark.slow
PASSWORD = "residue-matrix-password"
CONTROL_ENV = "NOMYO_RESIDUE_CONTROL_"
SERVER_ERRORS = ("truncated", "messages-not-a-list", "stream", "fail-500", "fail-garbage",
                 "other-key")
CLIENT_ERRORS = (500, 400, 429, "tampered", "truncated", "other-key")

CLIENT = r"""
import asyncio, gc, json, sys
from nomyo import SecureChatCompletion
from nomyo.memory.scrub import wipe_tree
from security.residue_cases import CASES, CONCURRENCY, TOOLS, messages

url, seed, folder, password = sys.argv[1:5]
client = SecureChatCompletion(base_url=url, allow_http=True, key_dir=folder,
                              key_password=password)
failures = []

def ask(case, i, **options):
    box = messages(seed, case, i)
    try:
        answer = client.create_sync("residue-model", box, **options)
        wipe_tree(answer)  # the caller's own dict, dropped the documented way
        del answer
    except Exception as exc:
        failures.append([case, i, type(exc).__name__])
    wipe_tree(box)

async def batch(case, start):
    boxes = [messages(seed, case, i) for i in range(start, start + CONCURRENCY)]
    answers = await asyncio.gather(*[client.create("residue-model", b) for b in boxes])
    wipe_tree(answers)
    wipe_tree(boxes)

for case, (count, _sizes, _alphabet) in CASES.items():
    if case == "concurrent":
        for start in range(0, count, CONCURRENCY):
            asyncio.run(batch(case, start))
        continue
    if case == "errors":
        print(json.dumps({"step": "errors"}), flush=True)
        sys.stdin.readline()
    for i in range(count):
        ask(case, i, **({"tools": TOOLS} if case == "tools" else {}),
            **({"max_retries": 0} if case == "errors" else {}))
gc.collect()
print(json.dumps({"ready": True, "failures": failures}), flush=True)
sys.stdin.readline()
"""


def controls() -> tuple[dict[str, bytes], Needles]:
    """Control secrets for one process: its environment and the needles that find them."""
    def no_nul(size: int) -> bytes:
        while b"\0" in (value := os.urandom(size)):
            pass
        return value

    aes, number = no_nul(32), int.from_bytes(no_nul(256), "big")
    text = "control " + secrets.token_hex(8) + " 中文 😀 " + secrets.token_hex(8)
    needles = Needles()
    needles.add_aes_key(f"{CONTROL} aes", aes)
    needles.add_rsa_number(f"{CONTROL} rsa", number)
    needles.add_content(f"{CONTROL} text", text)
    # odd offsets: a window the index does not start at must be found too
    return {CONTROL_ENV + "AES": aes[5:22],
            CONTROL_ENV + "RSA": number.to_bytes(256, "little")[9:42],
            CONTROL_ENV + "TEXT": text.encode()[3:]}, needles


def environment(controls_: dict[str, bytes]) -> dict:
    """The child's environment (bytes values pass to exec unchanged)."""
    return {**child_env(NOMYO_SECURE_PRIVATE_KEYS="1"), **controls_}


def add_rsa(needles: Needles, private_pem: bytes, password: bytes | None) -> None:
    from cryptography.hazmat.primitives import serialization

    numbers = serialization.load_pem_private_key(private_pem, password).private_numbers()
    for name in ("d", "p", "q"):
        needles.add_rsa_number(f"rsa {name}", getattr(numbers, name))


def add_answer(needles: Needles, label: str, text: str, request: str) -> None:
    """An answer's text: only its windows that are not windows of the request it repeats."""
    at = text.find(request) if len(request) >= 24 else -1
    if at < 0:
        needles.add_content(label, text)
        return
    if at > 0:
        needles.add_content(label, text[:at + 23])
    if at + len(request) < len(text):
        needles.add_content(label, text[at + len(request) - 23:])


def answer_texts(plaintext: bytes) -> list[str]:
    """The message contents and tool-call arguments of a chat.completion plaintext."""
    texts = []
    for choice in json.loads(plaintext).get("choices") or []:
        message = choice.get("message") or {}
        if isinstance(message.get("content"), str):
            texts.append(message["content"])
        texts += [c["function"]["arguments"] for c in message.get("tool_calls") or []]
    return texts


def request_contents(needles: Needles, seed: str) -> dict[str, str]:
    """Index every request content of the run; {content: label}."""
    known = {}
    for case, (count, _sizes, _alphabet) in CASES.items():
        for i in range(count):
            text = content(seed, case, i)
            needles.add_content(f"{case} request {i}", text)
            known[text] = f"{case} {i}"
    return known


def scan_both(pid: int, needles: Needles, folder: str) -> dict[str, Scan | None]:
    """Live and core scans of pid and its descendants (a server's workers)."""
    pids = family(pid)
    return {"live": merged([scan_live(p, needles) for p in pids]),
            "core": merged([scan_core(p, needles, folder) for p in pids])
            if shutil.which("gcore") else None}


def label_of_answer(text: str, known: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """(case label, request content) of an echoed answer text; known maps each request
    content to its label and its JSON-escaped form (a tool call's arguments carry that)."""
    for request, (label, escaped) in known.items():
        if request in text or escaped in text:
            return label, request
    raise AssertionError(f"an answer that echoes no request: {text[:40]!r}")


def client_run(folder: str) -> dict[str, Any]:
    """Run every case in one client child against the peer server; scan it live and in a core."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tests.peer_server import PeerServer, seal_for

    seed = secrets.token_hex(8)
    env, needles = controls()
    keys = Path(folder, "keys")
    with PeerServer(record=True) as peer, child_process(
            [sys.executable, "-c", CLIENT, peer.url, seed, str(keys), PASSWORD],
            env=environment(env), cwd=ROOT) as child:
        assert hear(child) == {"step": "errors"}
        public = serialization.load_pem_public_key((keys / "public_key.pem").read_bytes())
        sealed = []
        for i, fault in enumerate(CLIENT_ERRORS):
            answer = json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": content(seed, "errors", i)}}]}).encode()
            if fault == "truncated":
                answer = answer[:-10]
            target = rsa.generate_private_key(65537, 2048).public_key() if (
                fault == "other-key") else public
            package, key = seal_for(target, answer)
            if fault == "tampered":  # the key unwraps, the tag does not verify
                doc = json.loads(package)
                tag = bytearray(base64.b64decode(doc["encrypted_payload"]["tag"]))
                tag[0] ^= 1
                doc["encrypted_payload"]["tag"] = base64.b64encode(tag).decode()
                package = json.dumps(doc).encode()
            if fault != "other-key":
                sealed.append(key)
            if isinstance(fault, int):
                peer.inject(fault, {"Content-Type": "application/json"},
                            {"detail": f"refused ({fault})"}, after_open=True)
            else:
                peer.inject(200, {"Content-Type": "application/json"}, package, after_open=True)
        say(child, "go")
        ready = hear(child)
        known = request_contents(needles, seed)
        escaped = {text: (label, json.dumps(text)[1:-1]) for text, label in known.items()}
        for plaintext in peer.response_plaintexts:
            for text in answer_texts(plaintext):
                label, request = label_of_answer(text, escaped)
                add_answer(needles, f"{label.split()[0]} answer {label.split()[1]}", text,
                           request)
        for i, key in enumerate(peer.aes_keys + sealed):
            needles.add_aes_key(f"{'errors' if i >= len(peer.aes_keys) else 'any'} aes {i}", key)
        add_rsa(needles, (keys / "private_key.pem").read_bytes(), PASSWORD.encode())
        wire = b"\n".join(peer.request_plaintexts)
        unseen = [label for text, label in known.items()
                  if not any(json.dumps(text, ensure_ascii=ascii_only)[1:-1].encode() in wire
                             for ascii_only in (True, False))]
        scans = scan_both(child.pid, needles, folder)
        say(child, "exit")
        assert child.wait(timeout=60) == 0
    return {"ready": ready, "scans": scans, "unseen": unseen, "seed": seed,
            "keys": len(peer.aes_keys) + len(sealed)}


def server_run(folder: str, backend: str) -> dict[str, Any]:
    """Run every case against `nomyo serve` (echo, or the HTTP backend process); scan it."""
    import requests
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tests.peer_server import open_with, seal_for
    from tests.server_fixtures import COMPLETION, Served, completion_headers, vector_keys

    seed = secrets.token_hex(8)
    env, needles = controls()
    vectors = vector_keys()
    server_public = serialization.load_pem_public_key(vectors["server_public_pem"].encode())
    client_private = serialization.load_pem_private_key(
        vectors["client_private_pem"].encode(), None)
    headers = completion_headers(vectors["client_public_pem"])
    aes: list[bytes] = []
    answers: list[tuple[str, str, str]] = []
    statuses: dict[str, list[int]] = {}

    def post(case: str, i: int) -> None:
        request: dict[str, Any] = {"model": "residue-model", "messages": messages(seed, case, i)}
        target = server_public
        if case == "tools":
            request["tools"] = TOOLS
        if case == "errors":
            error = SERVER_ERRORS[i]
            if error == "messages-not-a-list":
                request["messages"] = {"content": content(seed, case, i)}
            elif error == "stream":
                request["stream"] = True
            elif error.startswith("fail-"):
                request["model"] = error
            elif error == "other-key":
                target = rsa.generate_private_key(65537, 2048).public_key()
        body = json.dumps(request).encode()
        if case == "errors" and SERVER_ERRORS[i] == "truncated":
            body = body[:-40]
        package, key = seal_for(target, body)
        aes.append(key)
        response = requests.post(url + COMPLETION, data=package, headers=headers, timeout=120)
        statuses.setdefault(case, []).append(response.status_code)
        if response.status_code == 200:
            plaintext, key = open_with(client_private, response.content)
            aes.append(key)
            answers.extend((case, str(i), text) for text in answer_texts(plaintext))

    backend_proc = None
    try:
        spec = "echo"
        if backend == "http":
            backend_proc = subprocess.Popen(
                [sys.executable, str(Path(ROOT, "tests", "openai_backend.py"))],
                stdout=subprocess.PIPE, text=True)
            spec = backend_proc.stdout.readline().split("listening on ")[1].strip()
        with Served("--backend", spec, "--log-level", "ERROR", key_dir=Path(folder),
                    env=environment(env)) as served:
            url = served.url
            for case, (count, _sizes, _alphabet) in CASES.items():
                with ThreadPoolExecutor(CONCURRENCY if case == "concurrent" else 1) as pool:
                    list(pool.map(lambda i, case=case: post(case, i), range(count)))
            known = request_contents(needles, seed)
            by_label = {label: text for text, label in known.items()}
            for case, i, text in answers:
                add_answer(needles, f"{case} answer {i}", text, by_label[f"{case} {i}"])
            for i, key in enumerate(aes):
                needles.add_aes_key(f"any aes {i}", key)
            add_rsa(needles, vectors["server_private_pem"].encode(), None)
            scans = scan_both(served.proc.pid, needles, folder)
            processes = len(family(served.proc.pid))
    finally:
        if backend_proc is not None:
            backend_proc.kill()
            backend_proc.wait()
    return {"scans": scans, "statuses": statuses, "keys": len(aes), "processes": processes}


def _require_scanner() -> None:
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs /proc/<pid>/mem (Linux procfs) to scan a process")
    if os.geteuid() != 0:
        pytest.skip("scanning a hardened (non-dumpable) process needs root (CAP_SYS_PTRACE)")
    try:
        import nomyo._osslkey  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"nomyo._osslkey (OpenSSL secure-heap keys) is not built: {exc}")


_RUNS: dict[str, dict[str, Any]] = {}


def run_of(process: str) -> dict[str, Any]:
    """The run of `process` ("client", "server-echo", "server-http"), made once per module."""
    _require_scanner()
    if process not in _RUNS:
        with tempfile.TemporaryDirectory() as folder:
            _RUNS[process] = (client_run(folder) if process == "client"
                              else server_run(folder, process.split("-")[1]))
    return _RUNS[process]


PROCESSES = ("client", "server-echo", "server-http")


def _report(scans: dict[str, Scan | None], prefix: str) -> dict[str, list[str]]:
    return {where: [str(h) for h in scan.findings(prefix)][:12]
            for where, scan in scans.items() if scan is not None and scan.findings(prefix)}


@pytest.fixture(scope="module", autouse=True)
def _forget_runs():
    yield
    _RUNS.clear()


@pytest.mark.parametrize("process", PROCESSES)
def test_positive_controls_are_found_live_and_in_the_core(process: str) -> None:
    for where, scan in run_of(process)["scans"].items():
        if scan is None:
            continue
        heap = {h.label for h in scan.controls if h.mapping != "[stack]"}
        assert heap == {f"{CONTROL} aes", f"{CONTROL} rsa", f"{CONTROL} text"}, (where, heap)


def test_the_needles_have_the_form_on_the_wire() -> None:
    """Each request content's JSON form, as indexed, is what the client put in its package."""
    assert run_of("client")["unseen"] == []


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("process", PROCESSES)
def test_no_content_or_aes_key_of_a_case_is_left(process: str, case: str) -> None:
    run = run_of(process)
    if process == "client":
        assert run["ready"]["failures"] == [
            ["errors", i, name] for i, name in enumerate(
                ("ServerError", "InvalidRequestError", "RateLimitError", "SecurityError",
                 "PackageError", "SecurityError"))], run["ready"]
    else:
        assert run["statuses"]["errors"] == (
            [400, 400, 400, 200, 200, 400] if process == "server-echo"
            else [400, 400, 400, 502, 502, 400]), run["statuses"]
        assert {s for case, got in run["statuses"].items() if case != "errors"
                for s in got} == {200}, run["statuses"]
    found = _report(run["scans"], f"{case} ")
    assert found == {}, f"residues of the {case} case in the {process} process: {found}"


@pytest.mark.parametrize("process", PROCESSES)
def test_no_aes_key_window_is_left(process: str) -> None:
    run = run_of(process)
    found = _report(run["scans"], "any aes")
    assert found == {}, f"{run['keys']} AES keys; windows found: {found}"


@pytest.mark.parametrize("process", PROCESSES)
def test_no_window_of_d_is_left(process: str) -> None:
    found = _report(run_of(process)["scans"], "rsa d")
    assert found == {}, found


@pytest.mark.parametrize("process", PROCESSES)
def test_no_window_of_p_or_q_is_left(process: str) -> None:
    scans = run_of(process)["scans"]
    found = {**_report(scans, "rsa p"), **_report(scans, "rsa q")}
    assert found == {}, found
