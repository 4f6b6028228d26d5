"""SecureChatCompletion, the OpenAI-style facade, against the independent peer server."""
from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import unquote

import pytest

from nomyo import SecureChatCompletion, SecureCompletionClient
from nomyo.errors import DisposedError, InvalidRequestError, SecurityError
from tests.helpers import run_python, wait_until
from tests.peer_server import PeerServer
from tests.tpm_fixtures import block_of, load_vectors

MESSAGES = [{"role": "user", "content": "facade test"}]
OPENAI_PARAMS = {
    "temperature": 0.2, "top_p": 0.9, "max_tokens": 12, "stop": ["\n"], "n": 1,
    "presence_penalty": 0.1, "frequency_penalty": 0.2, "logit_bias": {"42": -1.0},
    "user": "u-1", "tool_choice": "none", "response_format": {"type": "json_object"},
    "seed": 3, "stream": False,
}


def test_create_acreate_and_create_sync(chat):
    async def both():
        return (await chat.create(model="m", messages=MESSAGES),
                await chat.acreate(model="m", messages=MESSAGES))

    for response in (*asyncio.run(both()), chat.create_sync("m", MESSAGES)):
        assert response["choices"][0]["message"]["content"] == "facade test"
        assert response["_metadata"]["is_encrypted"] is True


def test_openai_params_in_payload_call_options_never(chat, peer):
    with PeerServer() as other:
        chat.create_sync("m", MESSAGES, security_tier="maximum", api_key="sk-1",
                         base_url=other.url, **OPENAI_PARAMS)
        sent = json.loads(other.request_plaintexts[-1])
        headers = other.received[-1]["headers"]
    assert sent == {"model": "m", "messages": MESSAGES, **OPENAI_PARAMS}
    for option in ("security_tier", "api_key", "base_url"):
        assert option not in sent
    assert headers["x-security-tier"] == "maximum"
    assert headers["authorization"] == "Bearer sk-1"
    assert peer.received == []


def test_per_call_base_url_does_not_regenerate_keys(chat, peer):
    with PeerServer() as other:
        chat.create_sync("m", MESSAGES)
        chat.create_sync("m", MESSAGES, base_url=other.url)
        chat.create_sync("m", MESSAGES)
        seen = {unquote(r["headers"]["x-public-key"]) for r in [*peer.received, *other.received]}
    assert seen == {chat.client.public_key_pem}


def test_constructor_api_key_and_per_call_override(peer):
    with SecureChatCompletion(peer.url, True, "sk-constructor", key_size=2048) as c:
        c.create_sync("m", MESSAGES)
        assert peer.received[-1]["headers"]["authorization"] == "Bearer sk-constructor"
        c.create_sync("m", MESSAGES, api_key="sk-call")
        assert peer.received[-1]["headers"]["authorization"] == "Bearer sk-call"


def test_published_positional_constructor(peer, tmp_path):
    c = SecureChatCompletion(peer.url, True, None, True, str(tmp_path), 0)
    assert c.client.max_retries == 0 and c.client.allow_http
    c.close()


def test_stream_and_bad_tier_refused_before_any_byte(chat, peer):
    with pytest.raises(InvalidRequestError, match="stream"):
        asyncio.run(chat.create(model="m", messages=MESSAGES, stream=True))
    with pytest.raises(ValueError, match="standard, high, maximum"):
        chat.create_sync("m", MESSAGES, security_tier="top-secret")
    with pytest.raises(TypeError):
        chat.create_sync("m", "not a list")
    assert peer.received == [] and peer.key_fetches == 0


def test_key_generation_starts_at_construction(peer):
    c = SecureChatCompletion(base_url=peer.url, allow_http=True, key_size=2048)
    try:
        ring = c.client.keyring
        wait_until(lambda: ring.pending_first is None or ring.pending_first.done())
        assert peer.received == []  # born without any request
        c.create_sync("m", MESSAGES)
    finally:
        c.close()


def test_sixteen_concurrent_creates_overlap(chat, peer):
    chat.create_sync("m", MESSAGES)
    peer.delay = 0.3

    async def many():
        return await asyncio.gather(*[
            chat.create(model="m", messages=[{"role": "user", "content": str(i)}])
            for i in range(16)])

    answers = asyncio.run(many())
    assert [a["choices"][0]["message"]["content"] for a in answers] == [str(i) for i in range(16)]
    assert peer.max_in_flight >= 12


def test_close_dispose_and_context_managers(peer):
    c = SecureChatCompletion(base_url=peer.url, allow_http=True, key_size=2048)
    c.create_sync("m", MESSAGES)
    pair = c.client.keyring.current
    c.dispose()
    assert pair.closed
    with pytest.raises(DisposedError):
        c.create_sync("m", MESSAGES)
    with pytest.raises(DisposedError):
        asyncio.run(c.create(model="m", messages=MESSAGES))

    with SecureChatCompletion(base_url=peer.url, allow_http=True, key_size=2048) as c2:
        c2.create_sync("m", MESSAGES)
    with pytest.raises(DisposedError):
        c2.create_sync("m", MESSAGES)

    async def use():
        async with SecureChatCompletion(base_url=peer.url, allow_http=True, key_size=2048) as c3:
            await c3.create(model="m", messages=MESSAGES)
        return c3

    c3 = asyncio.run(use())
    with pytest.raises(DisposedError):
        c3.create_sync("m", MESSAGES)


def test_debug_logging_never_carries_secrets(peer, caplog):
    secret_text = "patient-record-4711"
    with caplog.at_level(logging.DEBUG, logger="nomyo"), \
            SecureChatCompletion(base_url=peer.url, allow_http=True, key_size=2048,
                                 api_key="sk-log-secret", debug=True) as c:
        peer.inject(503, {"Retry-After": "0"}, {"detail": "busy"})
        c.create_sync("m", [{"role": "user", "content": secret_text}])
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "503" in logged  # the retry was logged
    assert secret_text not in logged and "sk-log-secret" not in logged


def test_attestation_absent(peer):
    with SecureChatCompletion(base_url=peer.url, allow_http=True, key_size=2048,
                              attestation="verify") as c:
        response = c.create_sync("m", MESSAGES)
        verdict = response["_metadata"]["attestation_verification"]
        assert verdict["valid"] is False and "not_available" in verdict["reasons"]
    with SecureChatCompletion(base_url=peer.url, allow_http=True, key_size=2048,
                              attestation="require") as c, \
            pytest.raises(SecurityError, match="attestation"):
        c.create_sync("m", MESSAGES)


def test_attestation_bound_to_another_payload_is_refused(peer):
    vector = next(iter(load_vectors().values()))
    peer.attestation = block_of(vector)  # a genuine quote, but for someone else's payload id
    with SecureChatCompletion(base_url=peer.url, allow_http=True, key_size=2048,
                              attestation="verify") as c:
        verdict = c.create_sync("m", MESSAGES)["_metadata"]["attestation_verification"]
        assert verdict["valid"] is False and "nonce_mismatch" in verdict["reasons"]
    with SecureChatCompletion(base_url=peer.url, allow_http=True, key_size=2048,
                              attestation="require") as c, \
            pytest.raises(SecurityError, match="nonce_mismatch"):
        c.create_sync("m", MESSAGES)


@pytest.mark.parametrize("name", sorted(load_vectors()))
def test_attestation_verdict_for_a_bound_quote(name, peer):
    vector = load_vectors()[name]
    peer.attestation = block_of(vector)  # a genuine quote for the payload id sent below
    with SecureCompletionClient(peer.url, allow_http=True, key_size=2048,
                                attestation="require") as client:
        response = client.send_secure_request_sync(
            {"model": "m", "messages": MESSAGES}, vector["payload_id"])
    verdict = response["_metadata"]["attestation_verification"]
    assert verdict["valid"] is True and verdict["nonce_bound"] is True


def test_bad_attestation_mode():
    with pytest.raises(ValueError):
        SecureChatCompletion(attestation="maybe")


def test_event_loop_keeps_running_while_requests_are_in_flight(chat, peer):
    chat.create_sync("m", MESSAGES)
    peer.delay = 0.5  # every answer is held half a second

    async def scenario():
        ticks = 0
        done = asyncio.Event()

        async def heartbeat():
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.create_task(heartbeat())
        await asyncio.gather(*[chat.create(model="m", messages=MESSAGES) for _ in range(16)])
        done.set()
        await beat
        return ticks

    # a loop blocked by HTTP or RSA would tick about zero times in those 0.5 s, not dozens
    assert asyncio.run(scenario()) >= 10


@pytest.mark.parametrize("kwargs", [
    {"attestation": "require", "expected_pcrs": {"sha256": {0: "zz"}}},
    {"attestation": "verify", "expected_pcrs": {"md5": {0: "00"}}},
    {"expected_pcrs": {"sha256": {0: "00" * 32}}},
])
def test_unusable_expected_pcrs_are_refused_at_construction(kwargs):
    with pytest.raises(ValueError, match="expected_pcrs"):
        SecureChatCompletion(base_url="https://example.invalid", **kwargs)


def test_round_trip_on_the_fallback_backend(peer):
    """Without the compiled helpers the client still works, on honestly reported memory."""
    out = run_python(f"""
        import json, nomyo, nomyo.protocol.b64
        from nomyo import SecureChatCompletion
        with SecureChatCompletion(base_url={peer.url!r}, allow_http=True, key_size=2048) as c:
            short = c.create_sync("m", [{{"role": "user", "content": "hi"}}])
            long = c.create_sync("m", [{{"role": "user", "content": "y" * 50000}}])
        info = nomyo.get_memory_protection_info()
        print(json.dumps([short["_metadata"]["is_encrypted"], len(json.dumps(long)),
                          info["backend"], nomyo.protocol.b64.NATIVE]))
    """, NOMYO_MEMORY_BACKEND="fallback", timeout=120)
    assert out.returncode == 0, out.stderr
    encrypted, long_size, backend, native_codec = json.loads(out.stdout.splitlines()[-1])
    assert encrypted and long_size > 50000
    assert backend == "fallback" and native_codec is False
