"""The residue scanner finds every window of the size its rule names, at any offset and in
any form, and nothing shorter: planted in a child process, scanned live and in a core."""
from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path

import pytest

from security.residue import Needles, child_process, hear, say, scan_core, scan_live
from tests.helpers import child_env

CHILD = r"""
import json, sys
planted = [bytearray.fromhex(line.strip()) for line in iter(sys.stdin.readline, "end\n")]
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
"""


def _fenced(key: bytes, at: int, size: int) -> bytes:
    """key[at:at + size] between two bytes that differ from the key's own neighbours of that
    slice: planted bare, memory next to it (bytearray's trailing NUL, a header byte) matched the
    key's next byte by chance in about one run in ten, and made a 15-byte slice a hit."""
    around = {key[at - 1] if at > 0 else None, key[at + size] if at + size < len(key) else None}
    fence = next(b for b in range(256) if b not in around)
    return bytes([fence]) + key[at:at + size] + bytes([fence])


def test_every_offset_and_form_is_found_and_nothing_shorter(tmp_path: Path) -> None:
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs /proc/<pid>/mem (Linux procfs) to scan a process")
    needles, planted, want = Needles(), [], set()
    for at in range(17):  # every 16-byte window of a key, and one byte short of it
        key = os.urandom(32)
        needles.add_aes_key(f"key {at}", key)
        planted.append(key[at:at + 16])
        want.add(f"key {at}")
        short = os.urandom(32)
        needles.add_aes_key(f"short key {at}", short)
        planted.append(_fenced(short, at, 15))
    number = int.from_bytes(os.urandom(256), "big")
    needles.add_rsa_number("rsa", number)
    planted.append(number.to_bytes(256, "little")[37:69])
    want.add("rsa")
    text = secrets.token_hex(12) + ' 中文 "quoted"\n😀 ' + secrets.token_hex(12)
    needles.add_content("text", text)
    for at, encoding in enumerate(("utf-8", "utf-16-le", "utf-32-le")):
        planted.append(text[at + 20:at + 44].encode(encoding))  # 24 characters
    # 23 characters, fenced by U+FFFF (not in the text): not a hit
    planted.append(b"\xff\xff" + text[30:53].encode("utf-16-le") + b"\xff\xff")
    planted.append(text[25:50].encode("utf-8").replace(b"\n", b"\\n").replace(b'"', b'\\"'))
    want.add("text")
    with child_process([sys.executable, "-c", CHILD], env=child_env()) as child:
        say(child, "".join(p.hex() + "\n" for p in planted) + "end")
        assert hear(child)["ready"]
        scans = [scan_live(child.pid, needles)]
        if shutil.which("gcore"):
            scans.append(scan_core(child.pid, needles, tmp_path))
        say(child, "exit")
    for scan in scans:
        assert {h.label for h in scan.ordinary} == want, [str(h) for h in scan.ordinary]
        forms = {h.form for h in scan.ordinary if h.label == "text"}
        assert {"utf-8", "ucs-2", "ucs-4"} <= forms and forms & {"json", "json ascii"}, forms
        assert all(h.characters >= 24 for h in scan.ordinary if h.label == "text")
