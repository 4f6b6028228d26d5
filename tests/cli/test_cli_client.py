"""The client commands' configuration errors: early, one line, naming CLI flags."""
from __future__ import annotations

import pytest

from tests.cli.test_cli import nomyo

PW = {"KEYPW": "pw-for-the-cli-test"}


@pytest.fixture
def locked_dir(tmp_path):
    """A key directory holding a password-protected pair: (directory, its fingerprint)."""
    made = nomyo("keys", "generate", str(tmp_path / "k"), "--key-size", "2048",
                 "--password-env", "KEYPW", env=PW)
    assert made.returncode == 0, made.stderr
    return tmp_path / "k", made.stdout.split("fingerprint ")[1].strip()


def test_keys_generate_does_not_replace_a_pair_without_force(locked_dir):
    key_dir, fingerprint = locked_dir
    before = (key_dir / "private_key.pem").read_bytes()
    again = nomyo("keys", "generate", str(key_dir), "--key-size", "2048")
    assert again.returncode == 1
    assert "--force" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert (key_dir / "private_key.pem").read_bytes() == before  # still the encrypted one
    forced = nomyo("keys", "generate", str(key_dir), "--key-size", "2048", "--force",
                   "--password-env", "KEYPW", env=PW)
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.split("fingerprint ")[1].strip() != fingerprint


def test_chat_uses_a_password_protected_key_dir(locked_dir, peer):
    key_dir, fingerprint = locked_dir
    before = (key_dir / "private_key.pem").read_bytes()
    ok = nomyo("chat", "--base-url", peer.url, "--allow-http", "--key-dir", str(key_dir),
               "--key-password-env", "KEYPW", "hello", env=PW)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "hello"
    assert (key_dir / "private_key.pem").read_bytes() == before  # loaded, not replaced
    from urllib.parse import unquote

    from nomyo.protocol import keys

    sent = unquote(peer.received[-1]["headers"]["x-public-key"])
    assert keys.fingerprint(sent) == fingerprint


def test_chat_without_the_password_is_one_line_naming_the_flag(locked_dir, peer):
    key_dir, _ = locked_dir
    result = nomyo("chat", "--base-url", peer.url, "--allow-http", "--key-dir", str(key_dir),
                   "hello")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--key-password-env" in lines[0] and "--key-dir" in lines[0]
    assert "key_password" not in lines[0]
    assert peer.received == []


def test_chat_with_an_empty_password_variable_is_a_usage_error(locked_dir):
    key_dir, _ = locked_dir
    result = nomyo("chat", "--key-dir", str(key_dir), "--key-password-env", "NOPE_UNSET", "hi")
    assert result.returncode == 2 and "$NOPE_UNSET" in result.stderr


def test_chat_plain_http_refusal_names_the_flag(peer):
    result = nomyo("chat", "--base-url", peer.url, "--key-size", "2048", "hi")
    assert result.returncode == 1
    assert "--allow-http" in result.stderr and "allow_http" not in result.stderr


def test_chat_key_dir_under_a_file_fails_before_any_request(tmp_path, peer):
    (tmp_path / "f").write_text("x")
    result = nomyo("chat", "--base-url", peer.url, "--allow-http", "--key-dir",
                   str(tmp_path / "f" / "keys"), "hi")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "ConfigurationError" in line and "--key-dir" in line and "Not a directory" in line
    assert peer.received == [] and peer.key_fetches == 0
