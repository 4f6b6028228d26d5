"""Process-level guarantees of the native secure memory, each checked in a real child process.

Both allocator paths are covered: memfd_secret (default where the kernel allows it) and the
locked mmap path (NOMYO_SECURE_ALLOCATOR=mmap).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from security.memscan import scan_process
from tests.helpers import child_env, require_tool, run_python, unprivileged_prefix

ALLOCATORS = ["auto", "mmap"]


def _json_line(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_locks_are_per_buffer_and_never_interfere(allocator):
    out = _json_line(run_python("""
        import json
        from nomyo.memory import SecureBuffer
        from nomyo.memory.limits import locked_bytes
        base = locked_bytes()
        sizes = [3 * 4096, 5 * 4096, 7 * 4096]
        bufs = [SecureBuffer(n) for n in sizes]
        for i, b in enumerate(bufs):
            b.data[:] = bytes([i + 1]) * len(b)
        with_three = locked_bytes()
        bufs[1].close()
        after = locked_bytes()
        print(json.dumps({"base": base, "three": with_three, "after": after,
            "alloc": bufs[0].allocator,
            "intact": [bufs[0].data.tobytes() == b"\\x01" * sizes[0],
                       bufs[2].data.tobytes() == b"\\x03" * sizes[2]],
            "locked": [bufs[0].locked, bufs[2].locked]}))
    """, NOMYO_SECURE_ALLOCATOR=allocator))
    page = 4096
    # each buffer holds its data plus an 8-byte canary: one extra page per buffer here
    footprint = [4 * page, 6 * page, 8 * page]
    assert out["three"] - out["base"] == sum(footprint)
    assert out["three"] - out["after"] == footprint[1]
    assert out["intact"] == [True, True] and out["locked"] == [True, True]
    assert out["alloc"] == ("mmap" if allocator == "mmap" else out["alloc"])


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_secret_is_absent_from_a_gcore_dump(tmp_path, allocator):
    require_tool("gcore", "gdb")
    code = """
        import os, sys
        from nomyo.memory import SecureBuffer
        secret = SecureBuffer(32)
        secret.data[:] = bytes.fromhex(sys.argv[1])
        control = bytearray(bytes.fromhex(sys.argv[2]))
        del sys.argv[1:]
        print("ready", flush=True)
        sys.stdin.read()
    """
    secret, control = os.urandom(32), os.urandom(32)
    import textwrap
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), secret.hex(), control.hex()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=child_env(NOMYO_SECURE_ALLOCATOR=allocator))
    try:
        assert child.stdout.readline().strip() == "ready"
        prefix = tmp_path / "core"
        subprocess.run(["gcore", "-o", str(prefix), str(child.pid)], check=True,
                       capture_output=True, timeout=120)
        dump = (tmp_path / f"core.{child.pid}").read_bytes()
    finally:
        child.communicate("", timeout=30)
    assert control in dump, "control canary missing: the dump is not a real dump"
    assert secret not in dump


def test_hardened_container_without_ipc_lock_reports_truthfully_and_fails_closed():
    prefix = unprivileged_prefix()
    out = _json_line(run_python("""
        import json, nomyo
        from nomyo.memory import SecureBuffer
        info = nomyo.get_memory_protection_info()
        with SecureBuffer.copy_of(b"still works") as b:
            works = b.data.tobytes() == b"still works" and not b.locked
        print(json.dumps({"info": info, "works": works}))
    """, prefix=prefix))
    info = out["info"]
    assert info["can_lock"] is False and info["has_memory_locking"] is False
    assert info["protection_level"] != "full" and info["memlock_limit"] == 0
    assert info["backend"] == "native" and out["works"]

    failed = run_python("""
        import nomyo
        from nomyo.memory import SecureBuffer
        try:
            SecureBuffer(32)
        except nomyo.SecurityError as exc:
            print("refused:", exc)
        else:
            print("created")
    """, prefix=prefix, NOMYO_REQUIRE_SECURE_MEMORY="1")
    assert failed.returncode == 0, failed.stderr
    assert failed.stdout.startswith("refused:")
    assert "memlock" in failed.stdout and "CAP_IPC_LOCK" in failed.stdout


def test_harden_process_disables_core_dumps():
    out = _json_line(run_python("""
        import ctypes, json, resource, nomyo
        before = nomyo.get_memory_protection_info()["dumpable"]
        report = nomyo.harden_process()
        libc = ctypes.CDLL(None)
        print(json.dumps({"before": before, "prctl": libc.prctl(3, 0, 0, 0, 0),
            "core": resource.getrlimit(resource.RLIMIT_CORE), "report": report}))
    """))
    assert out["before"] is True
    assert out["prctl"] == 0 and out["core"] == [0, 0]
    rep = out["report"]
    assert rep["dumpable"] is False and rep["core_limit"] == 0 and rep["core_dumps_disabled"]


@pytest.mark.parametrize("allocator", ALLOCATORS)
@pytest.mark.parametrize("where,signum", [("after_end", signal.SIGSEGV),
                                          ("before_start", signal.SIGABRT)])
@pytest.mark.parametrize("refit", [False, True])
def test_out_of_bounds_write_kills_the_process(allocator, where, signum, refit):
    proc = run_python(f"""
        import ctypes
        from nomyo.memory import SecureBuffer
        buf = SecureBuffer(100, capacity=9000)
        if {refit}:  # a refitted buffer is guarded the same: new canary, same trailing guard
            buf.refit(5000)
        if "{where}" == "after_end":
            ctypes.memset(buf.address + len(buf), 0x41, 1)  # the guard page: any write faults
        else:
            # the canary is random: a fixed byte matches its last byte one time in 256, so
            # flip the byte that is there
            target = ctypes.c_ubyte.from_address(buf.address - 1)
            target.value ^= 0xFF
        buf.close()
        print("survived")
    """, NOMYO_SECURE_ALLOCATOR=allocator)
    assert proc.returncode == -signum, (proc.returncode, proc.stdout, proc.stderr)
    assert "survived" not in proc.stdout


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_forked_child_cannot_read_the_parent_secret(allocator):
    out = _json_line(run_python("""
        import ctypes, json, os
        from nomyo.memory import SecureBuffer
        secret = b"fork-secret-" + os.urandom(8).hex().encode()
        buf = SecureBuffer.copy_of(secret)
        addr, n = buf.address, len(buf)

        def in_child(body):
            pid = os.fork()
            if pid == 0:
                try:
                    code = body()
                except BaseException:
                    code = 9
                os._exit(code)
            return os.waitpid(pid, 0)[1]

        def python_access():
            try:
                memoryview(buf)
            except ValueError:
                return 0  # refused with a Python error
            return 1

        def raw_access():
            data = ctypes.string_at(addr, n)  # absent mapping: SIGSEGV; wiped: zeros
            return 2 if data == secret else 3

        py = in_child(python_access)
        raw = in_child(raw_access)
        print(json.dumps({"py": py, "raw": raw, "parent_ok": buf.data.tobytes() == secret,
                          "alloc": buf.allocator}))
    """, NOMYO_SECURE_ALLOCATOR=allocator))
    assert os.WIFEXITED(out["py"]) and os.WEXITSTATUS(out["py"]) == 0
    raw = out["raw"]
    died_on_absent_page = os.WIFSIGNALED(raw) and os.WTERMSIG(raw) == signal.SIGSEGV
    saw_zeros = os.WIFEXITED(raw) and os.WEXITSTATUS(raw) == 3
    assert died_on_absent_page or saw_zeros, raw
    assert out["parent_ok"]


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_closed_buffer_leaves_no_residue_in_process_memory(allocator):
    code = """
        import os, sys
        from nomyo.memory import SecureBuffer
        out = sys.stdout.fileno()
        secret = SecureBuffer.random(48)
        os.write(out, secret.data)          # straight from secure memory, no Python copy
        viewed = SecureBuffer.random(48)
        os.write(out, viewed.data)
        control = bytearray(os.urandom(48))
        os.write(out, control)
        held = memoryview(viewed)           # a live view: close wipes, unmap waits
        secret.close()
        viewed.close()
        os.write(out, b"closed")
        sys.stdin.read()
        held.release()
    """
    import textwrap
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=child_env(NOMYO_SECURE_ALLOCATOR=allocator))
    try:
        got = b""
        deadline = time.monotonic() + 30
        while not got.endswith(b"closed") and time.monotonic() < deadline:
            got += os.read(child.stdout.fileno(), 4096)
        secret, viewed, control = got[:48], got[48:96], got[96:144]
        counts = scan_process(child.pid, [secret, viewed, control])
    finally:
        child.communicate(b"", timeout=30)
    assert counts[control] >= 1, "scanner found the control: it reads real memory"
    assert counts[secret] == 0 and counts[viewed] == 0


def test_fallback_backend_is_reported_and_still_works():
    out = _json_line(run_python("""
        import json, nomyo
        from nomyo.memory import SecureBuffer, secure_json
        with SecureBuffer.copy_of(b"abc") as b:
            ok = b.data.tobytes() == b"abc"
        doc = secure_json.dumps({"a": "é"})
        ok = ok and secure_json.loads(doc) == {"a": "é"}
        doc.refit(len(doc))  # fallback buffers refit only to their own size, wiping
        ok = ok and doc.capacity == len(doc) and doc.data.tobytes() == bytes(len(doc))
        try:
            doc.refit(len(doc) + 1)
        except ValueError:
            pass
        else:
            ok = False
        print(json.dumps({"ok": ok, "info": nomyo.get_memory_protection_info()}))
    """, NOMYO_MEMORY_BACKEND="fallback"))
    info = out["info"]
    assert out["ok"] and info["backend"] == "fallback"
    assert info["protection_level"] == "zeroing_only" and info["can_lock"] is False
    assert "NOMYO_MEMORY_BACKEND" in info["fallback_reason"]
    refused = run_python("""
        import nomyo
        try:
            nomyo.SecureBuffer(8)
        except nomyo.SecurityError as exc:
            print("refused", exc)
    """, NOMYO_MEMORY_BACKEND="fallback", NOMYO_REQUIRE_SECURE_MEMORY="1")
    assert refused.stdout.startswith("refused")


def test_missing_compiled_modules_fall_back_and_say_why(tmp_path):
    # -S: no site hooks, so an editable install cannot supply the modules from the checkout
    import shutil

    from tests.helpers import ROOT
    shutil.copytree(os.path.join(ROOT, "nomyo"), tmp_path / "nomyo",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-S", "-c", "import nomyo, json; i = nomyo.get_memory_protection_info(); "
         "print(json.dumps([i['backend'], i['fallback_reason'], nomyo.__file__]))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    backend, reason, where = json.loads(proc.stdout)
    assert backend == "fallback" and "_pyobjects" in reason and where.startswith(str(tmp_path))
    assert "fallback" in proc.stderr  # logged as a warning, never silent


@pytest.mark.parametrize("via", ["fork", "multiprocessing"])
@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_forked_child_unmaps_only_its_own_inherited_pages(allocator, via):
    """memfd_secret pages are MADV_DONTFORK: in a child only the two guard pages remain, with
    a hole between them that the child's own allocations may fill. Dropping an inherited
    buffer there must leave whatever the child mapped into the hole in place (before the fix
    its finaliser unmapped the whole range and the child died on its next use)."""
    proc = run_python(f"""
        import ctypes, gc, mmap, multiprocessing, os, sys
        from nomyo.memory import SecureBuffer

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        MAP_FIXED_NOREPLACE = 0x100000
        PAGE = mmap.PAGESIZE
        bufs = [SecureBuffer(1700, capacity=1 << 20) for _ in range(8)]
        for b in bufs:
            b.data[:] = b"inherited secret" * 100 + bytes(100)
        sizes = [b.capacity + 8 for b in bufs]  # the accessible pages (canary included)
        holes = [b.address + len(b) - size for b, size in zip(bufs, sizes)]

        def child():
            mine = []  # what the child maps: into a hole where one is free, anywhere else
            for hole, size in zip(holes, sizes):
                got = libc.mmap(hole, size, mmap.PROT_READ | mmap.PROT_WRITE,
                                mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                                -1, 0)
                if got == hole:
                    ctypes.memset(hole, 0x5A, size)
                    mine.append((hole, size))
            junk = [bytearray(b"x" * 300_000) for _ in range(20)] + [str(i) * 50 for i in
                                                                       range(20_000)]
            bufs.clear()
            gc.collect()
            for hole, size in mine:  # SIGSEGV here when the hole was unmapped
                assert ctypes.string_at(hole, 16) == b"Z" * 16
                assert ctypes.string_at(hole + size - 16, 16) == b"Z" * 16
            assert all(len(j) for j in junk)
            print("holes", len(mine), flush=True)

        if {via!r} == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    child()
                    code = 0
                except BaseException:
                    import traceback
                    traceback.print_exc()
                    code = 1
                os._exit(code)
            status = os.waitpid(pid, 0)[1]
            code = os.waitstatus_to_exitcode(status)
        else:
            p = multiprocessing.get_context("fork").Process(target=child)
            p.start()
            p.join()
            code = p.exitcode
        assert all(b.data.tobytes().startswith(b"inherited secret") for b in bufs)
        print("child", code)
    """, NOMYO_SECURE_ALLOCATOR=allocator)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["child", "0"], (proc.stdout, proc.stderr[-2000:])
