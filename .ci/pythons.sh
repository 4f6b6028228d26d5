# Sourced by .ci/run and .ci/wheels: the Pythons nomyo supports, and where to find them.
# pyproject.toml's requires-python and classifiers say the same; keep them in step.
SUPPORTED_PYTHONS=(3.10 3.11 3.12 3.13)

# find_python X.Y: print the path of a CPython X.Y interpreter (pyenv's newest X.Y.z, else
# pythonX.Y on PATH), checked by running it; fail when there is none.
find_python() {
    local want=$1 root candidate
    local probe='import sys, sysconfig; v = sys.version_info
print(f"{v[0]}.{v[1]}", sysconfig.get_config_var("Py_GIL_DISABLED") or 0)'
    local -a candidates=()
    if command -v pyenv >/dev/null 2>&1; then
        root=$(pyenv root)
    else
        root=${PYENV_ROOT:-$HOME/.pyenv}
    fi
    if [ -d "$root/versions" ]; then
        while IFS= read -r candidate; do
            candidates+=("$candidate")
        done < <(ls -d "$root/versions/$want".*/bin/"python$want" 2>/dev/null | sort -rV)
    fi
    candidate=$(command -v "python$want" 2>/dev/null) && candidates+=("$candidate")
    for candidate in "${candidates[@]}"; do
        # a pyenv shim for a version not selected, or a free-threaded build, does not count
        if [ "$("$candidate" -c "$probe" 2>/dev/null)" = "$want 0" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}
