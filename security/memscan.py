"""Scan another process's memory for byte strings (residue checks).

Reads /proc/<pid>/maps and /proc/<pid>/mem; needs ptrace access to the target (same user
and a dumpable target, or root). Pages the kernel will not hand out (memfd_secret, guard
pages) are skipped: that is exactly the memory no other process can read either.
"""
from __future__ import annotations

import re
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


def scan_process(pid: int, needles: Iterable[bytes]) -> dict[bytes, int]:
    """How often each needle occurs in the readable memory of pid (overlap-safe chunks)."""
    needles = [n for n in needles if n]
    counts = {n: 0 for n in needles}
    if not needles:
        return counts
    longest = max(len(n) for n in needles)
    pattern = re.compile(b"|".join(re.escape(n) for n in sorted(needles, key=len, reverse=True)))
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
