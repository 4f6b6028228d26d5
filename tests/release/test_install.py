"""The README's main command on a fresh machine: `pip install .` from a checkout into a new
venv, then the native backend imports with no compiler anywhere."""
import pytest

from tests.release.venvs import (
    clean_env,
    fresh_venv,
    no_compiler_env,
    probe_backend,
    run,
    source_tree,
)


@pytest.mark.slow
def test_fresh_venv_install_then_import_without_compiler(tmp_path):
    src = source_tree(tmp_path / "src")
    py = fresh_venv(tmp_path / "venv")
    install = run([py, "-m", "pip", "install", "-q", src], env=clean_env())
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = no_compiler_env(tmp_path, py, cc="/nonexistent/cc")
    found = probe_backend(py, elsewhere, env)
    assert found["backend"] == "native" and found["native_b64"]
    assert found["file"].startswith(str(tmp_path / "venv"))
    package = tmp_path.joinpath(found["file"]).parent
    assert (package / "_b64.pyi").exists()
    before = set((tmp_path / "venv").rglob("*"))
    imported = run([py, "-c", "import nomyo.memory"], cwd=elsewhere, env=env)
    assert imported.returncode == 0, imported.stderr
    written = set((tmp_path / "venv").rglob("*")) - before
    assert not [p for p in written if "__pycache__" not in str(p)], "import wrote files"
