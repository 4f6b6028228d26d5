"""Request policy of the server: API keys (401), model-to-tier policy (403), rate limits (429)."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from nomyo.protocol.constants import SECURITY_TIERS as TIERS


class ApiKeys:
    """A set of accepted API keys, compared in constant time; never printed."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys if k]
        if not self._digests:
            raise ValueError("the API key list is empty")

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        """One key per line; blank lines and lines starting with '#' are ignored."""
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        keys = [
            line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
        ]
        if not keys:
            raise ValueError(f"{path}: no API keys in the file")
        return cls(keys)

    def identify(self, presented: str) -> str | None:
        """The key's stable identity (for rate limiting) when it is accepted, else None.

        Every stored key is compared (hmac.compare_digest on SHA-256 digests), so the time
        taken does not depend on which key, or which prefix, matched.
        """
        candidate = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        match = None
        for digest in self._digests:
            if hmac.compare_digest(candidate, digest):
                match = digest
        return None if match is None else "key:" + match.hex()[:16]

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._digests)} keys)"


class TierPolicy:
    """Which security tiers each model may be served at: `{"model": ["standard", "high"]}`.

    A `"*"` entry applies to models not listed; without it, unlisted models are refused.
    """

    def __init__(self, mapping: Mapping[str, Iterable[str]]) -> None:
        if not isinstance(mapping, Mapping) or not mapping:
            raise ValueError('tier policy must be a non-empty JSON object {"model": ["tier", ...]}')
        self._allowed: dict[str, tuple[str, ...]] = {}
        for model, tiers in mapping.items():
            if not isinstance(model, str) or isinstance(tiers, str) or not isinstance(tiers, list):
                raise ValueError(f"tier policy entry {model!r} must map to a list of tiers")
            bad = [t for t in tiers if t not in TIERS]
            if bad or not tiers:
                raise ValueError(
                    f"tier policy entry {model!r}: tiers must be a non-empty subset of {TIERS}"
                )
            self._allowed[model] = tuple(t for t in TIERS if t in tiers)

    @classmethod
    def from_file(cls, path: str | Path) -> TierPolicy:
        try:
            mapping = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        try:
            return cls(mapping)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def resolve(self, model: str, requested: str | None) -> tuple[str | None, str]:
        """(tier to use, "") when allowed, else (None, reason).

        Without a requested tier the lowest tier the model allows is used.
        """
        allowed = self._allowed.get(model, self._allowed.get("*"))
        if allowed is None:
            return None, "model is not allowed on this server"
        if requested is None:
            return allowed[0], ""
        if requested not in allowed:
            return None, f"model not allowed for the requested security tier {requested!r}"
        return requested, ""


class RateLimiter:
    """Token bucket per client identity: `rate` requests per second, bursts up to `rate`."""

    def __init__(self, rate: float, *, max_clients: int = 10_000) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("rate limit must be a positive number of requests per second")
        self.rate = float(rate)
        self.max_clients = max_clients
        self.capacity = max(1.0, self.rate)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, identity: str) -> float:
        """0.0 when a request may proceed, else the seconds to wait before retrying."""
        now = time.monotonic()
        with self._lock:
            tokens, stamp = self._buckets.get(identity, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - stamp) * self.rate)
            if tokens >= 1.0:
                self._store(identity, tokens - 1.0, now)
                return 0.0
            self._store(identity, tokens, now)
            return (1.0 - tokens) / self.rate

    def clients(self) -> list[str]:
        """The identities remembered, least recently seen first."""
        with self._lock:
            return list(self._buckets)

    def _store(self, identity: str, tokens: float, now: float) -> None:
        # Re-inserted so the table stays in least-recently-seen order; when full, the oldest
        # entry goes (O(1)): a client unseen that long has refilled or nearly so.
        self._buckets.pop(identity, None)
        if len(self._buckets) >= self.max_clients:
            del self._buckets[next(iter(self._buckets))]
        self._buckets[identity] = (tokens, now)
