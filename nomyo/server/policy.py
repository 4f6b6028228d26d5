"""Request policy of the server: API keys (401), model-to-tier policy (403), rate limits (429)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import os
import shlex
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from nomyo.protocol.constants import SECURITY_TIERS as TIERS


def check_private_file(path: str | Path) -> None:
    """Refuse a secret file (server key, API keys) that group or others may read."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise ValueError(
            f"{path}: readable by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {shlex.quote(str(path))}"
        )


def read_private_text(path: str | Path) -> str:
    """A secret text file as UTF-8, with or without a byte-order mark (after the mode check)."""
    check_private_file(path)
    return Path(path).read_text(encoding="utf-8-sig")


class ApiKeys:
    """A set of accepted API keys, compared in constant time; never printed."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys if k]
        if not self._digests:
            raise ValueError("the API key list is empty")

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        """One key per line; blank lines and lines starting with '#' are ignored."""
        lines = read_private_text(path).splitlines()
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


class AuthThrottle:
    """Failed authentications per client address: `burst` failures, then `rate` per second.

    While an address has no failure left, its requests are answered 429 before any key is
    compared, so guessing keys costs the guesser time, not the server CPU.
    """

    def __init__(self, rate: float = 1.0, burst: int = 10, *, max_clients: int = 10_000) -> None:
        if not (rate > 0 and math.isfinite(rate)) or burst < 1:
            raise ValueError("auth throttle needs a positive rate and burst")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _tokens(self, client: str, now: float) -> float:
        tokens, stamp = self._buckets.get(client, (self.burst, now))
        return min(self.burst, tokens + (now - stamp) * self.rate)

    def blocked(self, client: str) -> float:
        """Seconds until `client` may try again (0.0: it may)."""
        with self._lock:
            tokens = self._tokens(client, time.monotonic())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens = max(0.0, self._tokens(client, now) - 1.0)
            self._buckets.pop(client, None)
            if len(self._buckets) >= self.max_clients:
                del self._buckets[next(iter(self._buckets))]
            self._buckets[client] = (tokens, now)


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (what the dev server, the
    proxy and the trusted-forwarder check accept without further proof)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
