"""The residue scanner: find fragments of a run's secrets in a live process and in its core.

Secrets and what counts as a hit (a "fragment" is a run of bytes equal to a piece of one
encoded secret, found anywhere in readable memory):
- an AES key: any 16-byte window of it;
- an RSA private number (d, p, q): any 32-byte window, big- and little-endian (OpenSSL's
  BIGNUM limbs are little-endian);
- a request or answer content: any 24-character window, in every form the text can take in
  a process: UTF-8, CPython's own storage (Latin-1, UCS-2, UCS-4, by widest character), and
  its JSON string form (escaped ASCII and raw UTF-8).

Matching every window with a regex is far too slow on a whole process (a trie of a few
hundred 16-byte needles runs at about 0.3 s per MB in `re`), so the scan works on 8-byte
words and set lookups, which run in C: memory is sampled as the 8-byte words starting at
every 4th address (two `struct` unpacks per chunk), a secret is indexed as the 8-byte words
starting at every offset (keys) or every 3rd offset (contents). A fragment of L bytes holds
a sampled word that is also an indexed word whenever L - 7 >= 4 (every offset) or
L - 7 >= 4 * 3 (every 3rd offset: 4 and 3 are coprime, so one address in any 12 has both
properties), that is L >= 11 and L >= 19 bytes: every 16-byte key window and every
24-character window (24 bytes at least) is caught. A sampled word found in the index is a
candidate; it is extended byte-exactly in both directions against the secret, runs on the
same diagonal are merged (chunks overlap), and the run is a hit only if it holds the whole
window the rule asks for (16 bytes, 32 bytes, 24 complete characters). So the index may
stride, the verdict never guesses.

Memory both locked and excluded from dumps (VmFlags `lo` and `dd`: OpenSSL's secure heap,
nomyo's secure buffers) is reported apart: that is where keys belong while in use.
Positive controls: secrets labelled "control" are planted by the test in the scanned
process's ordinary heap; `Scan.controls` must find them, or a 0 proves nothing.
"""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
from bisect import bisect_right
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 1 << 18
OVERLAP = 256  # chunks overlap so that no word is cut; runs are merged across them
MEMORY_STEP = 4
CONTENT_STEP = 3
AES_WINDOW, RSA_WINDOW, CONTENT_WINDOW = 16, 32, 24
CONTROL = "control"
_WORD = 8


@dataclass
class Secret:
    """One encoded form of a secret: `data`, and where its characters start (None: bytes)."""

    label: str
    form: str
    data: bytes
    window: int  # complete characters (bytes when starts is None) a hit must hold
    unit: int = 1  # bytes per character for fixed-width forms
    starts: bytearray | None = None  # 1 at each character start, and at len(data)

    def characters(self, lo: int, hi: int) -> int:
        """Complete characters of this form inside data[lo:hi]."""
        if self.starts is None:
            return max(0, hi // self.unit - (lo + self.unit - 1) // self.unit)
        return max(0, self.starts.count(1, lo, hi + 1) - 1)


@dataclass
class Hit:
    label: str
    form: str
    characters: int
    address: int
    mapping: str
    context: str  # hex of the 16 bytes before and after the run, for the report
    pid: int = 0

    def __str__(self) -> str:
        return (f"{self.label} [{self.form}] {self.characters} chars at pid {self.pid} "
                f"{self.address:#x} "
                f"({self.mapping or 'anonymous'}) around {self.context}")


@dataclass
class Scan:
    """Hits of one scan: `ordinary` (the findings), `secure` (locked dump-excluded memory)."""

    ordinary: list[Hit] = field(default_factory=list)
    secure: list[Hit] = field(default_factory=list)

    @property
    def controls(self) -> list[Hit]:
        return [h for h in self.ordinary if h.label.startswith(CONTROL)]

    def findings(self, prefix: str = "") -> list[Hit]:
        """Ordinary-memory hits of secrets whose label starts with `prefix` (controls aside)."""
        return [h for h in self.ordinary
                if h.label.startswith(prefix) and not h.label.startswith(CONTROL)]


class Needles:
    """The secrets of a run, in every form looked for, and the word index over them."""

    def __init__(self) -> None:
        self.secrets: list[Secret] = []
        # word -> number of the secret holding it, or a tuple of numbers when several do
        self.index: dict[int, int | tuple[int, ...]] = {}

    def add_aes_key(self, label: str, key: bytes) -> None:
        self._add(Secret(label, "raw", bytes(key), AES_WINDOW), 1)

    def add_rsa_number(self, label: str, value: int) -> None:
        size = (value.bit_length() + 7) // 8
        for order in ("big", "little"):
            self._add(Secret(label, f"{order} endian", value.to_bytes(size, order), RSA_WINDOW), 1)

    def add_content(self, label: str, text: str) -> None:
        """Index `text` in each form it can take; forms equal to one already added are one."""
        widest = max(map(ord, text), default=0)
        forms: dict[bytes, tuple[str, int, bytearray | None]] = {}
        utf8 = text.encode("utf-8", "surrogatepass")
        forms[utf8] = ("utf-8", 1, _utf8_starts(utf8))
        if 0x80 <= widest <= 0xFF:
            forms.setdefault(text.encode("latin-1"), ("latin-1", 1, None))
        if widest > 0xFF:
            forms.setdefault(text.encode("utf-16-le", "surrogatepass"), ("ucs-2", 2, None))
        if widest > 0xFFFF:
            forms.setdefault(text.encode("utf-32-le", "surrogatepass"), ("ucs-4", 4, None))
        for ascii_only in (True, False):
            escaped = json.dumps(text, ensure_ascii=ascii_only)[1:-1]
            encoded = escaped.encode("utf-8", "surrogatepass")
            if encoded not in forms:
                forms[encoded] = (f"json{' ascii' if ascii_only else ''}", 1,
                                  _json_starts(text, ascii_only))
        for data, (form, unit, starts) in forms.items():
            self._add(Secret(label, form, data, CONTENT_WINDOW, unit, starts), CONTENT_STEP)

    def _add(self, secret: Secret, step: int) -> None:
        number = len(self.secrets)
        self.secrets.append(secret)
        index = self.index
        words = set(_words(secret.data, step)) - _BORING
        shared = words & index.keys()
        index.update(dict.fromkeys(words - shared, number))
        for word in shared:
            held = index[word]
            index[word] = (*held, number) if type(held) is tuple else (held, number)


_LEAD = bytes(0 if 0x80 <= b < 0xC0 else 1 for b in range(256))


def _utf8_starts(data: bytes) -> bytearray:
    starts = bytearray(data.translate(_LEAD))
    starts.append(1)
    return starts


def _json_starts(text: str, ascii_only: bool) -> bytearray:
    """Character starts of json.dumps(text) without its quotes (an escape is one character)."""
    starts = bytearray()
    for ch in text:
        piece = json.dumps(ch, ensure_ascii=ascii_only)[1:-1].encode("utf-8", "surrogatepass")
        starts.append(1)
        starts.extend(bytes(len(piece) - 1))
    starts.append(1)
    return starts


def _words(data: bytes, step: int) -> Iterator[int]:
    """The little-endian 8-byte words of data starting at every `step`-th offset."""
    for align in range(_WORD):
        count = (len(data) - align) // _WORD
        if count <= 0:
            continue
        words = struct.unpack_from(f"<{count}Q", data, align)
        first = next((j for j in range(step) if (align + _WORD * j) % step == 0), None)
        if first is not None:
            yield from words[first::step]


# words any memory has plenty of (a repeated byte); no secret is told apart by them
_BORING = frozenset(int.from_bytes(bytes([b]) * _WORD, "little") for b in range(256))


class _Matcher:
    """Candidates of one buffer to runs: (secret number, diagonal, start, end) in addresses."""

    def __init__(self, needles: Needles) -> None:
        self.needles = needles
        self.index = needles.index
        self.runs: list[tuple[int, int, int, int]] = []

    def feed(self, buffer: bytes, base: int) -> None:
        if buffer.count(0) == len(buffer):
            return
        keys = self.index.keys()
        candidates: set[int] = set()
        for align in range(0, _WORD, MEMORY_STEP):
            count = (len(buffer) - align) // _WORD
            if count > 0:
                candidates |= keys & set(struct.unpack_from(f"<{count}Q", buffer, align))
        places = []
        for word in candidates:
            raw = word.to_bytes(_WORD, "little")
            at = buffer.find(raw)
            while at != -1:
                places.append((at, raw, self.index[word]))
                at = buffer.find(raw, at + 1)
        covered: dict[int, int] = {}  # secret -> end of its runs found so far in buffer
        for at, raw, held in sorted(places, key=lambda place: place[0]):
            for n in held if type(held) is tuple else (held,):
                if at + _WORD <= covered.get(n, 0):
                    continue  # inside a run of this secret found already
                data = self.needles.secrets[n].data
                offset = data.find(raw)
                while offset != -1:
                    lo, hi = _extend(buffer, at, data, offset)
                    self.runs.append((n, base + at - offset, base + at - offset + lo,
                                      base + at - offset + hi))
                    covered[n] = max(covered.get(n, 0), at - offset + hi)
                    offset = data.find(raw, offset + 1)


def _extend(buffer: bytes, at: int, data: bytes, offset: int) -> tuple[int, int]:
    """The largest [lo, hi) of data around offset equal to buffer around at (binary search)."""
    ahead = _common(lambda k: buffer[at:at + k] == data[offset:offset + k],
                    min(len(buffer) - at, len(data) - offset))
    behind = _common(lambda k: buffer[at - k:at] == data[offset - k:offset],
                     min(at, offset))
    return offset - behind, offset + ahead


def _common(equal, limit: int) -> int:
    """Largest k <= limit with equal(k), equal being monotone (slice compares run in C)."""
    good, step = 0, 64
    while good < limit and equal(min(limit, good + step)):
        good = min(limit, good + step)
        step *= 2
    bad = min(limit, good + step) + 1 if good < limit else limit + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        if equal(mid):
            good = mid
        else:
            bad = mid
    return good


def _hits(matcher: _Matcher, read, name_of, pid: int) -> list[Hit]:
    """Merge the runs on each diagonal and keep those holding a whole window."""
    hits = []
    for number, diagonal, start, end in _merged(matcher.runs):
        secret = matcher.needles.secrets[number]
        chars = secret.characters(start - diagonal, end - diagonal)
        if chars >= secret.window:
            hits.append(Hit(secret.label, secret.form, chars, start, name_of(start),
                            read(start - 16, 16).hex() + "|" + read(end, 16).hex(), pid))
    return hits


def _merged(runs: list[tuple[int, int, int, int]]) -> Iterator[tuple[int, int, int, int]]:
    current = None
    for run in sorted(runs):
        if current and run[:2] == current[:2] and run[2] <= current[3]:
            current = (*current[:3], max(current[3], run[3]))
            continue
        if current:
            yield current
        current = run
    if current:
        yield current


@dataclass
class Mapping:
    start: int
    end: int
    name: str
    protected: bool  # locked and excluded from dumps (VmFlags lo and dd)
    written: bool  # may differ from zeros or from its file: something to scan


def mappings(pid: int) -> list[Mapping]:
    """The readable mappings of pid, from /proc/<pid>/smaps.

    A mapping nothing was ever written to cannot hold a secret of the run, so it is marked
    not `written` and not read: an anonymous one with no page resident or swapped (all
    zeros), a file-backed one with no dirty or anonymous page (all the file's own bytes,
    such as the text of the libraries)."""
    found: list[Mapping] = []
    readable, fields = False, {}
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            head, _, rest = line.partition(" ")
            if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head):
                parts = rest.split(maxsplit=4)
                name = parts[4].strip() if len(parts) > 4 else ""
                readable, fields = "r" in parts[0] and name != "[vvar]", {}
                found.append(Mapping(*(int(x, 16) for x in head.split("-")), name, False, False))
            elif head == "VmFlags:" and found:
                flags = rest.split()
                current = found[-1]
                current.protected = "lo" in flags and "dd" in flags
                file_backed = current.name and not current.name.startswith("[")
                changed = (("Private_Dirty", "Shared_Dirty", "Anonymous", "Swap") if file_backed
                           else ("Rss", "Swap"))
                current.written = readable and any(fields.get(n, 1) for n in changed)
            elif head.endswith(":") and rest.split() and rest.split()[0].isdigit():
                fields[head[:-1]] = int(rest.split()[0])
    return found


class _Regions:
    """Address to mapping name, from /proc/<pid>/smaps read once."""

    def __init__(self, pid: int) -> None:
        self.regions = mappings(pid)
        self.starts = [r.start for r in self.regions]

    def at(self, address: int) -> Mapping | None:
        i = bisect_right(self.starts, address) - 1
        if i >= 0 and address < self.regions[i].end:
            return self.regions[i]
        return None

    def name_of(self, address: int) -> str:
        found = self.at(address)
        return found.name if found else "?"


def scan_live(pid: int, needles: Needles) -> Scan:
    """Scan /proc/<pid>/mem (needs ptrace rights: root, or a dumpable same-user process)."""
    regions = _Regions(pid)
    scan = Scan()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:

        def read(address: int, size: int) -> bytes:
            try:
                mem.seek(max(0, address))
                return mem.read(size)
            except (OSError, ValueError, OverflowError):
                return b""

        for region in regions.regions:
            if not region.written:
                continue
            matcher = _Matcher(needles)
            for pos in range(region.start, region.end, CHUNK):
                buffer = read(pos, min(CHUNK + OVERLAP, region.end - pos))
                if not buffer:
                    break
                matcher.feed(buffer, pos)
            found = _hits(matcher, read, regions.name_of, pid)
            (scan.secure if region.protected else scan.ordinary).extend(found)
    return scan


def scan_core(pid: int, needles: Needles, folder: str | os.PathLike) -> Scan:
    """Write a core of pid with gcore (which leaves dump-excluded memory out) and scan it."""
    regions = _Regions(pid)
    core = write_core(pid, folder)
    scan = Scan()
    try:
        with core.open("rb") as f:
            segments = _load_segments(f)

            def read(address: int, size: int) -> bytes:
                for vaddr, offset, filesz in segments:
                    if vaddr <= address < vaddr + filesz:
                        f.seek(offset + address - vaddr)
                        return f.read(min(size, vaddr + filesz - address))
                return b""

            for vaddr, offset, filesz in segments:
                region = regions.at(vaddr)
                if region is not None and not region.written:
                    continue  # unwritten when the live scan looked (the child is paused)
                matcher = _Matcher(needles)
                for pos in range(0, filesz, CHUNK):
                    f.seek(offset + pos)
                    matcher.feed(f.read(min(CHUNK + OVERLAP, filesz - pos)), vaddr + pos)
                scan.ordinary.extend(_hits(matcher, read, regions.name_of, pid))
    finally:
        core.unlink()
    return scan


def write_core(pid: int, folder: str | os.PathLike) -> Path:
    """A core of the running pid, written by gcore into folder (the caller deletes it)."""
    prefix = os.path.join(folder, "core")
    subprocess.run(["gcore", "-o", prefix, str(pid)], check=True, capture_output=True,
                   timeout=300)
    return Path(f"{prefix}.{pid}")


def _load_segments(f) -> list[tuple[int, int, int]]:
    """(vaddr, file offset, size in file) of each PT_LOAD of an ELF64 little-endian core."""
    header = f.read(64)
    assert header[:4] == b"\x7fELF" and header[4] == 2 and header[5] == 1, "not an ELF64 LE core"
    phoff, = struct.unpack_from("<Q", header, 32)
    phentsize, phnum = struct.unpack_from("<HH", header, 54)
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    segments = []
    for i in range(phnum):
        p_type, _flags, offset, vaddr, _paddr, filesz = struct.unpack_from(
            "<IIQQQQ", table, i * phentsize)
        if p_type == 1 and filesz:
            segments.append((vaddr, offset, filesz))
    return segments


def family(pid: int) -> list[int]:
    """pid and its descendants (a server's workers), parents first."""
    found, i = [pid], 0
    while i < len(found):
        for task in Path(f"/proc/{found[i]}/task").iterdir():
            children = (task / "children").read_text().split()
            found += [int(c) for c in children if int(c) not in found]
        i += 1
    return found


def merged(scans: list[Scan]) -> Scan:
    """One Scan of several (the processes of one server)."""
    return Scan([h for s in scans for h in s.ordinary], [h for s in scans for h in s.secure])


@contextmanager
def child_process(args: list[str], **popen) -> Iterator[subprocess.Popen]:
    """A child with piped text stdin/stdout; killed and reaped on the way out if still running."""
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             **popen)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()


def say(child: subprocess.Popen, line: str) -> None:
    """Send one line to a child_process (it waits on stdin between steps)."""
    child.stdin.write(line + "\n")
    child.stdin.flush()


def hear(child: subprocess.Popen) -> dict:
    """The next JSON line a child_process printed (AssertionError naming it if it died)."""
    line = child.stdout.readline()
    assert line, f"child {child.pid} ended (exit {child.wait()}) before answering"
    return json.loads(line)
