"""An unusable key_dir is a one-line ConfigurationError when the client is made, naming the
directory, not a PermissionError from the key thread at the first request."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from nomyo import ConfigurationError, SecureChatCompletion
from nomyo.client.keyring import KeyRing
from nomyo.protocol.keys import KeyPair
from tests.helpers import run_python


def _refused(key_dir, **kw) -> str:
    with pytest.raises(ConfigurationError) as info:
        SecureChatCompletion(base_url="https://127.0.0.1:9", key_dir=key_dir, **kw)
    message = str(info.value)
    assert str(key_dir) in message and "\n" not in message
    assert ".nomyo-probe" not in message and ".tmp" not in message
    return message


def test_key_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "Not a directory" in _refused(tmp_path / "file" / "keys")


def test_key_dir_that_is_a_file(tmp_path):
    (tmp_path / "keys").write_text("x")
    assert "not a directory" in _refused(tmp_path / "keys").lower()


def test_encrypted_key_without_password(tmp_path):
    with KeyPair.generate(2048) as pair:
        pair.save(tmp_path, "pw-1234")
    assert "encrypted" in _refused(tmp_path)
    ring = KeyRing(key_size=2048, key_dir=tmp_path, key_password="pw-1234")  # with it: fine
    with ring.lease() as pair:
        assert not pair.closed
    ring.close()


def test_immutable_key_dir(tmp_path):
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("chattr not installed (Debian package e2fsprogs)")
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    if subprocess.run([chattr, "+i", str(key_dir)], capture_output=True).returncode != 0:
        pytest.skip(f"this filesystem ({tmp_path}) does not support the immutable attribute")
    try:
        assert "not writable" in _refused(key_dir)
    finally:
        subprocess.run([chattr, "-i", str(key_dir)], check=True)


@pytest.fixture
def public_dir():
    """A directory anyone can enter (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="nomyo-keydir-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_key_dir_not_writable_for_an_unprivileged_user(public_dir):
    """As a process without the right to override file permissions (root minus
    CAP_DAC_OVERRIDE, as in a hardened container; another uid could not even run a pyenv
    interpreter kept under /root)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv not installed (Debian package util-linux)")
    key_dir = public_dir / "keys"
    key_dir.mkdir(mode=0o555)
    code = f"""
        from nomyo import ConfigurationError, SecureChatCompletion
        try:
            SecureChatCompletion(base_url="https://127.0.0.1:9", key_dir={str(key_dir)!r})
        except ConfigurationError as err:
            print("refused:", err)
    """
    proc = run_python(code, prefix=[setpriv, "--bounding-set=-dac_override,-dac_read_search"])
    if "Operation not permitted" in proc.stderr and "setpriv" in proc.stderr:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here (setpriv refused)")
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "not writable" in proc.stdout
    assert "Permission denied" in proc.stdout


def test_usable_key_dir_is_created_and_used(tmp_path):
    key_dir = tmp_path / "new" / "keys"
    with SecureChatCompletion(base_url="https://127.0.0.1:9", key_dir=key_dir,
                              key_size=2048) as chat:
        chat.client.keyring.pending_first.result(timeout=60)
    assert (key_dir / "private_key.pem").exists()
    assert not list(key_dir.glob(".nomyo-probe-*"))
