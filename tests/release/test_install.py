"""A fresh clone installs into a new venv and imports the native backend with no compiler."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_fresh_venv_install_then_import_without_compiler(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git not installed (Debian package git)")
    src = tmp_path / "src"
    subprocess.run(["git", "clone", "-q", ROOT, str(src)], check=True)
    # the clone holds what is committed; overlay the working tree so this tests the code as is
    for rel in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.split():
        if os.path.exists(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(src / rel), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), src / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    install = subprocess.run([py, "-m", "pip", "install", "-q", str(src)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": os.environ["PATH"], "CC": "/bin/false", "HOME": str(tmp_path)}
    probe = subprocess.run(
        [py, "-c", "import nomyo, nomyo.b64, json; i = nomyo.get_memory_protection_info(); "
                   "print(json.dumps([i['backend'], nomyo.__file__, nomyo.b64.NATIVE]))"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    backend, where, native_b64 = __import__("json").loads(probe.stdout)
    assert backend == "native" and str(venv) in where and native_b64
    assert os.path.exists(os.path.join(os.path.dirname(where), "_b64.pyi"))
    before = {p for p in venv.rglob("*")}
    subprocess.run([py, "-c", "import nomyo.memory"], cwd=elsewhere, env=env, check=True)
    written = {p for p in venv.rglob("*")} - before
    assert not [p for p in written if "__pycache__" not in str(p)], "import wrote files"
