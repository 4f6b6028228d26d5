"""Scan another process's memory for byte strings (residue checks).

Reads /proc/<pid>/maps and /proc/<pid>/mem; needs ptrace access to the target (same user
and a dumpable target, or root). Pages the kernel will not hand out (memfd_secret, guard
pages) are skipped: that is exactly the memory no other process can read either.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

CHUNK = 1 << 20


def readable_regions(pid: int) -> list[tuple[int, int, str]]:
    regions = []
    with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] == "[vvar]"):
                continue
            regions.append((start, end, fields[5] if len(fields) > 5 else ""))
    return regions


def any_of(needles: Iterable[bytes]) -> bytes:
    """A regex matching any of `needles`, longest first, factored by shared leading bytes.

    A flat alternation makes the regex engine try every needle at every position whose byte
    starts one of them, which on memory full of similar text (the caller's own messages)
    costs minutes; factored, each position only follows the needles that share what was read.
    """
    distinct = sorted(set(needles))
    prefix = _common_prefix(distinct)
    rests = [n[len(prefix):] for n in distinct]
    ends_here = b"" in rests
    groups: dict[bytes, list[bytes]] = defaultdict(list)
    for rest in rests:
        if rest:
            groups[rest[:1]].append(rest)
    branches = [any_of(group) for group in groups.values()]
    if not branches:
        return re.escape(prefix)
    body = branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"
    return re.escape(prefix) + (b"(?:" + body + b")?" if ends_here else body)


def _common_prefix(sorted_needles: list[bytes]) -> bytes:
    first, last = sorted_needles[0], sorted_needles[-1]
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def scan_process(pid: int, needles: Iterable[bytes]) -> dict[bytes, int]:
    """How often each needle occurs in the readable memory of pid (overlap-safe chunks)."""
    needles = [n for n in needles if n]
    counts = {n: 0 for n in needles}
    if not needles:
        return counts
    longest = max(len(n) for n in needles)
    pattern = re.compile(any_of(needles))
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end, _name in readable_regions(pid):
            tail = b""
            pos = start
            while pos < end:
                size = min(CHUNK, end - pos)
                try:
                    mem.seek(pos)
                    chunk = mem.read(size)
                except (OSError, ValueError, OverflowError):
                    break
                if not chunk:
                    break
                data = tail + chunk
                for match in pattern.finditer(data):
                    if match.end() > len(tail):  # not already counted in the previous chunk
                        counts[match.group()] += 1
                tail = data[-(longest - 1):] if longest > 1 else b""
                pos += len(chunk)
    return counts


def aes_windows(keys_: list[bytes]) -> dict[bytes, str]:
    """16-byte windows (offsets 0, 8, 16) of every AES key, named by key: a freed block keeps
    all but its first 16 bytes, so whole-key needles miss that residue; every window was too
    slow for Python's regex on a whole process."""
    return {key[at:at + 16]: f"AES key {i}" for i, key in enumerate(keys_) for at in (0, 8, 16)}


# Helpers a residue test's child script starts with (after importing gc, json, sys, time):
# its locked memory (VmLck), waiting for it to settle, and one JSON line per report.
CHILD_HELPERS = """
def vmlck():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
    return None

def settled(target, within=2.0):
    deadline = time.monotonic() + within
    while (now := vmlck()) != target and time.monotonic() < deadline:
        time.sleep(0.005)
    return now

def say(**kw):
    print(json.dumps(kw), flush=True)
"""
