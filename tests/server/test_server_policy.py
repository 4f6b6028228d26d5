"""Server policy over HTTP: API keys (401), tier policy (403), rate limit (429 + Retry-After)."""

from __future__ import annotations

import json

import pytest
import requests

from nomyo.server import start_background
from nomyo.server.policy import ApiKeys, RateLimiter, TierPolicy
from tests.server_fixtures import (
    chat_request,
    keypair,
    open_response,
    post_request,
)


def test_api_key_file(tmp_path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("\ufeff# team keys\nsk-alpha\n\n  sk-beta  \n", encoding="utf-8")  # BOM
    key_file.chmod(0o600)
    with start_background(key=keypair("server"), api_key_file=str(key_file)) as srv:
        missing = post_request(srv)
        assert missing.status_code == 401 and missing.json()["detail"].startswith("missing API key")
        wrong = post_request(srv, Authorization="Bearer sk-alph")
        assert wrong.status_code == 401 and wrong.json() == {"detail": "invalid API key"}
        assert post_request(srv, Authorization="Basic sk-alpha").status_code == 401
        for key in ("sk-alpha", "sk-beta"):
            ok = post_request(srv, Authorization=f"Bearer {key}")
            assert ok.status_code == 200, ok.text
        assert requests.get(srv.url + "/pki/public_key", timeout=10).status_code == 200


def test_api_keys_compare_every_key_and_hide_values() -> None:
    keys = ApiKeys(["k1", "k2"])
    assert keys.identify("k2") and keys.identify("k1") != keys.identify("k2")
    assert keys.identify("k3") is None and keys.identify("") is None
    assert "k1" not in repr(keys)
    with pytest.raises(ValueError, match="empty"):
        ApiKeys([])


def test_tier_policy_file(tmp_path) -> None:
    policy = tmp_path / "tiers.json"
    policy.write_text(json.dumps({"test-model": ["high", "maximum"], "open": ["standard"]}))
    with start_background(key=keypair("server"), tier_policy_file=str(policy)) as srv:
        forbidden = post_request(srv, **{"X-Security-Tier": "standard"})
        assert forbidden.status_code == 403 and "tier" in forbidden.json()["detail"]
        unknown = post_request(
            srv, {"model": "other", "messages": [{"role": "user", "content": "x"}]})
        assert unknown.status_code == 403
        allowed = post_request(srv, **{"X-Security-Tier": "maximum"})
        assert open_response(allowed.content)[0]["_metadata"]["security_tier"] == "maximum"
        default = post_request(srv)  # no tier asked: the lowest the model allows
        assert open_response(default.content)[0]["_metadata"]["security_tier"] == "high"
        # an in-payload security_tier (nomyo-js) is an ordinary field, never used for routing
        sneaky = post_request(
            srv, chat_request(security_tier="maximum"), **{"X-Security-Tier": "standard"}
        )
        assert sneaky.status_code == 403


@pytest.mark.parametrize("bad", [[], {"m": "high"}, {"m": []}, {"m": ["ultra"]}, {"m": [1]}])
def test_tier_policy_validation(bad) -> None:
    with pytest.raises(ValueError, match="tier policy"):
        TierPolicy(bad)


def test_tier_policy_wildcard() -> None:
    policy = TierPolicy({"*": ["standard", "high"], "secret": ["maximum"]})
    assert policy.resolve("anything", None) == ("standard", "")
    assert policy.resolve("secret", "high")[0] is None


def test_rate_limit_burst_gets_429_with_retry_after() -> None:
    with start_background(key=keypair("server"), rate_limit=2) as srv:
        statuses = [post_request(srv) for _ in range(6)]
        codes = [r.status_code for r in statuses]
        assert codes[:2] == [200, 200] and 429 in codes
        limited = next(r for r in statuses if r.status_code == 429)
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["detail"] == "rate limit exceeded"


def test_rate_limit_is_per_api_key(tmp_path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("a\nb\n")
    key_file.chmod(0o600)
    with start_background(key=keypair("server"), api_key_file=str(key_file), rate_limit=1) as srv:
        assert post_request(srv, Authorization="Bearer a").status_code == 200
        assert post_request(srv, Authorization="Bearer a").status_code == 429
        assert post_request(srv, Authorization="Bearer b").status_code == 200


def test_rate_limiter_refills() -> None:
    limiter = RateLimiter(2)
    assert limiter.acquire("x") == 0 and limiter.acquire("x") == 0
    wait = limiter.acquire("x")
    assert 0 < wait <= 0.5
    assert limiter.acquire("y") == 0
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_rate_limit_table_is_bounded_least_recently_seen_first():
    from nomyo.server.policy import RateLimiter

    limiter = RateLimiter(1, max_clients=3)
    for who in ("a", "b", "c", "a", "d"):  # "a" seen again, so "b" is the oldest
        limiter.acquire(who)
    assert limiter.clients() == ["c", "a", "d"]


@pytest.mark.parametrize("rate", [0, -1, float("inf"), float("nan")])
def test_bad_rate_limits_are_refused_before_any_key_is_made(rate):
    from nomyo.server.factory import create_app

    with pytest.raises(ValueError, match="rate limit"):
        create_app(rate_limit=rate, key_bits=2048)


@pytest.mark.parametrize("raw,expected", [(None, None), ("0", 0), ("120", 120)])
def test_content_length_parses_plain_digits(raw, expected):
    from nomyo.server.app import parse_content_length

    assert parse_content_length(raw) == expected


@pytest.mark.parametrize("raw", ["-1", "+5", "abc", "\uff11\uff12", "1e3", ""])
def test_content_length_rejects_anything_else(raw):
    from nomyo.server.app import parse_content_length

    with pytest.raises(ValueError):
        parse_content_length(raw)
