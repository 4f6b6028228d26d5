"""The `nomyo` command, run as a real subprocess (`python -m nomyo`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from nomyo.memory import get_memory_protection_info
from tests.helpers import ROOT, child_env
from tests.peer_server import PeerServer


def nomyo(*args: str, env: dict | None = None, prefix: tuple[str, ...] = (),
          stdin: str | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([*prefix, sys.executable, "-m", "nomyo", *args], capture_output=True,
                          text=True, env=full_env, timeout=120, input=stdin, check=False)


def test_doctor_human_report():
    result = nomyo("doctor")
    assert result.returncode == 0, result.stderr
    assert "protection level" in result.stdout and "memory locking" in result.stdout


def test_doctor_json_report():
    result = nomyo("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("enabled", "platform", "protection_level", "has_memory_locking",
                "has_secure_zeroing", "supports_full_protection", "page_size", "can_lock",
                "method", "is_platform_secure", "core_dumps_disabled"):
        assert key in report


def test_doctor_require_passes_where_protections_hold():
    report = get_memory_protection_info()
    in_force = report["has_memory_locking"] and report["core_dumps_disabled"]
    result = nomyo("doctor", "--require", "mlock,no-core-dumps", "--json")
    assert result.returncode == (0 if in_force else 1), result.stderr
    assert (json.loads(result.stdout)["missing"] == []) is bool(in_force)


def test_doctor_require_fails_without_the_right_to_lock_memory():
    missing = [tool for tool in ("setpriv", "prlimit") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (util-linux) to drop CAP_IPC_LOCK")
    if os.geteuid() != 0:
        pytest.skip("dropping a capability from the bounding set needs root (CAP_SETPCAP)")
    prefix = ("setpriv", "--bounding-set=-ipc_lock", "prlimit", "--memlock=0:0")
    result = nomyo("doctor", "--require", "mlock,no-core-dumps", prefix=prefix)
    assert result.returncode == 1
    assert "require mlock           MISSING" in result.stdout
    assert "mlock is not in force" in result.stderr
    as_json = nomyo("doctor", "--json", "--require", "mlock", prefix=prefix)
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["missing"] == ["mlock"]


def test_doctor_harden_clears_dumpable():
    assert nomyo("doctor", "--require", "not-dumpable").returncode == 1
    assert nomyo("doctor", "--harden", "--require", "not-dumpable").returncode == 0


def test_doctor_unknown_requirement_is_usage_error():
    result = nomyo("doctor", "--require", "mlock,teleport")
    assert result.returncode == 2 and "teleport" in result.stderr


def test_no_command_prints_help():
    result = nomyo()
    assert result.returncode == 2 and "chat" in result.stderr


def test_chat_against_an_endpoint(peer):
    result = nomyo("chat", "--base-url", peer.url, "--allow-http", "--key-size", "2048",
                   "--tier", "high", "--show-metadata", "hello", "there")
    assert result.returncode == 0, result.stderr
    answer, _, meta = result.stdout.partition("{")
    assert answer.strip() == "hello there"
    metadata = json.loads("{" + meta)["_metadata"]
    assert metadata["is_encrypted"] is True and metadata["security_tier"] == "high"
    assert json.loads(peer.request_plaintexts[0])["messages"][-1]["content"] == "hello there"


def test_chat_reads_stdin(peer):
    result = nomyo("chat", "--base-url", peer.url, "--allow-http", "--key-size", "2048",
                   stdin="from stdin\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from stdin"


def test_chat_api_key_from_environment_only():
    with PeerServer(api_key="sk-cli-secret") as peer:
        ok = nomyo("chat", "--base-url", peer.url, "--allow-http", "--key-size", "2048", "hi",
                   env={"NOMYO_API_KEY": "sk-cli-secret"})
        assert ok.returncode == 0, ok.stderr
        bad = nomyo("chat", "--base-url", peer.url, "--allow-http", "--key-size", "2048", "hi",
                    env={"NOMYO_API_KEY": "sk-wrong-secret"})
    assert bad.returncode == 1
    assert "AuthenticationError" in bad.stderr and "sk-wrong-secret" not in bad.stderr


def test_chat_refuses_plain_http_without_allow_http(peer):
    result = nomyo("chat", "--base-url", peer.url, "--key-size", "2048", "hi")
    assert result.returncode == 1 and "SecurityError" in result.stderr
    assert peer.received == [] and peer.key_fetches == 0


def test_chat_without_base_url_uses_the_embedded_endpoint():
    pytest.importorskip("nomyo.server", reason="nomyo.server (server branch) not merged yet")
    result = nomyo("chat", "--show-metadata", "--key-size", "2048", "What is 2+2?")
    assert result.returncode == 0, result.stderr
    answer, _, meta = result.stdout.partition("{")
    assert "What is 2+2?" in answer
    metadata = json.loads("{" + meta)["_metadata"]
    assert metadata["is_encrypted"] is True
    assert metadata["encryption_algorithm"] == "hybrid-aes256-rsa4096"


def test_serve_delegates_to_the_server_cli():
    pytest.importorskip("nomyo.cli.serve",
                        reason="nomyo.cli.serve (server branch) not merged yet")
    result = nomyo("serve", "--help")
    assert result.returncode == 0 and "serve" in result.stdout


def test_keys_generate_and_fingerprint(tmp_path):
    made = nomyo("keys", "generate", str(tmp_path / "k"), "--key-size", "2048",
                 "--password-env", "KEYPW", env={"KEYPW": "pw-for-the-test"})
    assert made.returncode == 0, made.stderr
    fingerprint = made.stdout.split("fingerprint ")[1].strip()
    private = tmp_path / "k" / "private_key.pem"
    assert b"ENCRYPTED PRIVATE KEY" in private.read_bytes()
    assert os.stat(private).st_mode & 0o777 == 0o600
    public = nomyo("keys", "fingerprint", str(tmp_path / "k" / "public_key.pem"))
    assert public.stdout.strip() == fingerprint
    unlocked = nomyo("keys", "fingerprint", str(private), "--password-env", "KEYPW",
                     env={"KEYPW": "pw-for-the-test"})
    assert unlocked.stdout.strip() == fingerprint
    locked = nomyo("keys", "fingerprint", str(private))
    assert locked.returncode == 1 and "pw-for-the-test" not in locked.stderr


def test_keys_fingerprint_of_a_server_for_pinning(peer):
    from nomyo.protocol import keys

    result = nomyo("keys", "fingerprint", "--url", peer.url, "--allow-http")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == keys.fingerprint(peer.public_pem.decode())
    refused = nomyo("keys", "fingerprint", "--url", peer.url)
    assert refused.returncode == 1 and "SecurityError" in refused.stderr


@pytest.mark.parametrize("argv", [["serve", "--bogus"], ["chat", "--nope"], ["bogus"],
                                  ["serve", "--port", "abc"]])
def test_bad_flags_give_one_line_and_status_2(argv):
    proc = subprocess.run([sys.executable, "-m", "nomyo", *argv], capture_output=True,
                          text=True, timeout=60, env=child_env())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [["keys", "generate", "--key-size", "2048", "/proc/nope/keys"],
                                  ["chat", "--key-dir", "/proc/nope/keys", "hello"]])
def test_unusable_directories_are_one_line_errors(argv):
    proc = subprocess.run([sys.executable, "-m", "nomyo", *argv], capture_output=True,
                          text=True, timeout=120, env=child_env())
    assert proc.returncode not in (0, 2) and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2 and "error:" in proc.stderr


def test_version_names_the_package_version():
    from nomyo import __version__

    result = nomyo("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"nomyo {__version__}"


def test_doctor_loads_only_the_secure_memory_layer():
    """A container health check runs `nomyo doctor`: no TLS, HTTP or crypto stack."""
    from tests.helpers import run_python

    proc = run_python("""
        import sys
        from nomyo.cli.main import main
        main(["doctor", "--json"])
        heavy = ("ssl", "requests", "urllib3", "cryptography", "nomyo.server", "nomyo.client")
        print(sorted(m for m in heavy if m in sys.modules))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
