"""The request contents of the residue matrix, made the same way in the scanned child and in
the test (from one seed), so the test knows every content without the child printing it.

Each content is built by one `"".join` of one-character strings: the finished text is the only
object holding it, so whatever of it the scan finds was copied by the code under test, not
by the generator.
"""
from __future__ import annotations

import random

WORDS = "abcdefghijklmnopqrstuvwxyz     "
ESCAPES = WORDS + '\n\n"\\\t\x01/é'  # JSON escapes: \n \" \\ \t \u0001 and \u00e9 (ASCII form)
WIDE = WORDS + "中文字符漢語かなカナ한국어😀🎉🚀ñü"

# case -> (number of requests, characters per request (cycled), alphabet)
CASES: dict[str, tuple[int, tuple[int, ...], str]] = {
    "sequential": (50, (40, 700, 5_000, 40_000), WORDS),
    "concurrent": (64, (40, 700, 5_000), WORDS),
    "multiline": (10, (4_096,), ESCAPES),
    "unicode": (10, (2_000,), WIDE),
    "tools": (10, (300, 3_000), WORDS),
    "large": (1, (8 << 20,), WORDS),
    "errors": (6, (500, 3_000), ESCAPES),
}
CONCURRENCY = 16


def content(seed: str, case: str, i: int) -> str:
    """Content `i` of `case` for this run's seed."""
    count, sizes, alphabet = CASES[case]
    rng = random.Random(f"{seed}/{case}/{i}")
    return "".join(rng.choices(alphabet, k=sizes[i % len(sizes)]))


def messages(seed: str, case: str, i: int) -> list[dict[str, str]]:
    """A caller's messages: a fixed system line and the content as the user's turn."""
    return [{"role": "system", "content": "be brief"},
            {"role": "user", "content": content(seed, case, i)}]


TOOLS = [{"type": "function", "function": {
    "name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
