"""The residue scanner's pattern matches exactly what a plain longest-first alternation does."""
from __future__ import annotations

import random
import re

from security.memscan import any_of


def flat(needles: list[bytes]) -> re.Pattern[bytes]:
    return re.compile(b"|".join(re.escape(n) for n in sorted(set(needles), key=len, reverse=True)))


def test_same_matches_as_a_flat_alternation():
    rng = random.Random(7)
    alphabet = b'ab{}"'
    for _ in range(500):
        needles = [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
                   for _ in range(rng.randint(1, 12))]
        haystack = bytes(rng.choice(alphabet) for _ in range(300))
        want = [(m.start(), m.group()) for m in flat(needles).finditer(haystack)]
        got = [(m.start(), m.group()) for m in re.finditer(any_of(needles), haystack)]
        assert got == want, needles
