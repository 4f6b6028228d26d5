#!/usr/bin/env bash
# The native helpers' own tests under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   security/sanitizers.sh [PYTHON]     (default: python3)
#
# The extensions are built with -fsanitize=address,undefined into a copy of the working tree
# (.venv-asan/tree), never in place: an instrumented .so left in nomyo/ would refuse to load
# in every other venv. The tests then run with the ASan runtime preloaded (the interpreter
# itself is not instrumented, so the runtime must come first) and with:
#   detect_leaks=0      CPython keeps its interned objects, caches and module state until
#                       exit by design; LeakSanitizer would report all of it, not our bugs
#   handle_segv=0       the guard-page tests expect the SIGSEGV itself, in a child
# Left out, for reasons of the sanitizer (they run in the ordinary suite): the tests that
# read freed heap memory on purpose to prove it was wiped (ASan rightly reports the read),
# the residue and core-dump scans (ASan's terabytes of shadow mappings make them hours), and
# the two that measure locked memory: ASan's runtime replaces mlock with a no-op that
# reports success, so VmLck stays 0 whatever the allocator does; and the freed-block probes
# of foreign_frees, which read freed blocks on purpose and measure glibc's allocator.
# UBSan stops at the first finding (-fno-sanitize-recover), so a finding fails the run.
# SECURITY.md says what this does and does not cover.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
root=.venv-asan
# the secure answer's tests: its views of native buffers, released on close, GC and re-export
tests=(tests/memory tests/protocol/test_b64.py tests/client/test_secure_answer.py)
left_out="not test_wipe_owned_zeroes_the_data_its_caches_and_its_hash
 and not test_secret_is_absent_from_a_gcore_dump
 and not test_closed_buffer_leaves_no_residue_in_process_memory
 and not test_decode_into_its_own_text_leaves_no_decoded_copy_in_freed_memory
 and not test_locks_are_per_buffer_and_never_interfere
 and not test_hardened_container_without_ipc_lock_reports_truthfully_and_fails_closed
 and not test_an_aes_key_cryptography_decrypts_is_zeroed_when_its_buffer_is_freed
 and not test_the_wrappers_keep_the_data_and_zero_every_block_they_release"

libasan=$(gcc -print-file-name=libasan.so)
if [ ! -e "$libasan" ] || [ "$libasan" = libasan.so ]; then
    echo "sanitizers: gcc has no libasan.so (Debian: apt-get install libasan8)" >&2
    exit 1
fi

rm -rf "$root/tree"
mkdir -p "$root/tree"
# the tracked and new files of the working tree, as they are now (uncommitted edits too)
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$root/tree"
"$python" -m venv "$root/venv"
"$root/venv/bin/python" -m pip install -q --upgrade pip
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
(cd "$root/tree" && CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
    ../venv/bin/python -m pip install -q --no-cache-dir -e . pytest hypothesis)

export LD_PRELOAD="$libasan"
export ASAN_OPTIONS=detect_leaks=0:handle_segv=0:abort_on_error=0:detect_stack_use_after_return=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
cd "$root/tree"
# the instrumented build must be the one loaded, on the native backend
../venv/bin/python - <<'PY'
import sys
import nomyo
from nomyo import _b64, _pyobjects, _secmem
backend = nomyo.get_memory_protection_info()["backend"]
if backend != "native":
    sys.exit(f"sanitizers: the memory backend is {backend!r}, not native")
for module in (_b64, _pyobjects, _secmem):
    with open(module.__file__, "rb") as f:
        if b"__asan_init" not in f.read():
            sys.exit(f"sanitizers: {module.__file__} is not built with ASan")
print("sanitizers: instrumented native helpers loaded")
PY
t0=$SECONDS
../venv/bin/python -m pytest -q -p no:cacheprovider -k "${left_out//$'\n'/}" "${tests[@]}"
echo "sanitizers: ${tests[*]} passed under ASan+UBSan in $((SECONDS - t0)) s"
