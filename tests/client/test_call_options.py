"""OpenAI call conventions on `SecureChatCompletion`: per-call timeout, max_retries,
extra_headers, extra_query and extra_body; the environment variables; the logger's
NullHandler. What the caller meant for the transport never enters the encrypted payload."""
from __future__ import annotations

import json
import time

import pytest

from nomyo import (
    APITimeoutError,
    SecureChatCompletion,
    SecurityError,
    ServiceUnavailableError,
)
from tests.helpers import run_python

MESSAGES = [{"role": "user", "content": "options test"}]


def test_extra_body_is_encrypted_headers_and_query_are_not(chat, peer):
    chat.create_sync("m", MESSAGES, temperature=0.5, extra_body={"top_k": 4, "mirostat": 1},
                     extra_headers={"X-Trace": "t-1"}, extra_query={"api-version": "2"})
    sent = json.loads(peer.request_plaintexts[-1])
    seen = peer.received[-1]
    assert sent == {"model": "m", "messages": MESSAGES, "temperature": 0.5, "top_k": 4,
                    "mirostat": 1}
    assert seen["headers"]["x-trace"] == "t-1"
    assert seen["path"] == "/v1/chat/secure_completion?api-version=2"
    assert "t-1" not in peer.request_plaintexts[-1].decode()


@pytest.mark.parametrize("kwargs, match", [
    ({"extra_headers": {"X-Payload-ID": "mine"}}, "may not set"),
    ({"extra_headers": {"authorization": "Bearer x"}}, "api_key="),
    ({"extra_headers": {"Content-Type": "text/plain"}}, "may not set"),
    ({"extra_headers": [("X-A", "b")]}, "extra_headers must"),
    ({"extra_headers": {"X-A": 1}}, "extra_headers must"),
    ({"extra_query": {"a": object()}}, "extra_query must"),
    ({"extra_body": ["top_k"]}, "extra_body must"),
    ({"extra_body": {"temperature": 1}, "temperature": 0.5}, "repeats temperature"),
    ({"extra_body": {"model": "other"}}, "repeats model"),
    ({"headers": {"X-A": "b"}}, "not a chat parameter"),
    ({"idempotency_key": "k"}, "not a chat parameter"),
    ({"timeout": "fast"}, "timeout must"),
    ({"timeout": 0}, "timeout must"),
    ({"max_retries": -1}, "max_retries must"),
    ({"max_retries": 1.5}, "max_retries must"),
])
def test_misused_options_are_refused_before_sending(chat, peer, kwargs, match):
    with pytest.raises(TypeError, match=match):
        chat.create_sync("m", MESSAGES, **kwargs)
    assert peer.received == []


def test_extra_header_with_a_line_break_is_refused(chat, peer):
    with pytest.raises(SecurityError):
        chat.create_sync("m", MESSAGES, extra_headers={"X-A": "b\r\nX-Evil: 1"})
    assert peer.received == []


def test_per_call_timeout_is_honoured(chat, peer):
    chat.create_sync("m", MESSAGES)  # key fetched, connection open
    peer.delay = 2.0
    start = time.monotonic()
    with pytest.raises(APITimeoutError) as info:
        chat.create_sync("m", MESSAGES, timeout=0.3)
    assert time.monotonic() - start < 1.5
    assert info.value.payload_id == peer.received[-1]["headers"]["x-payload-id"]
    assert len(peer.received) == 2  # a sent request that timed out is not sent again


def test_per_call_timeout_covers_the_server_key_fetch(chat, peer):
    peer.key_delay = 2.0  # the first call fetches the key: its timeout and retries bound that
    start = time.monotonic()
    with pytest.raises(APITimeoutError):
        chat.create_sync("m", MESSAGES, timeout=0.3, max_retries=0)
    assert time.monotonic() - start < 1.5
    assert peer.key_fetches == 1  # a GET may be retried, but this call allowed none
    assert peer.received == []  # nothing was sealed without the key


def test_per_call_max_retries_is_honoured(chat, peer):
    peer.inject(503, {"Retry-After": "0"}, {"detail": "busy"}, times=2)
    with pytest.raises(ServiceUnavailableError) as info:
        chat.create_sync("m", MESSAGES, max_retries=0)
    assert len(peer.received) == 1
    assert info.value.payload_id == peer.received[0]["headers"]["x-payload-id"]
    assert chat.create_sync("m", MESSAGES, max_retries=1)["choices"]  # 503 once more, then OK
    assert len(peer.received) == 3


def test_async_create_takes_the_same_options(chat, peer):
    import asyncio

    asyncio.run(chat.create("m", MESSAGES, extra_body={"top_k": 2},
                            extra_headers={"X-Trace": "a"}, timeout=10, max_retries=0))
    assert json.loads(peer.request_plaintexts[-1])["top_k"] == 2
    assert peer.received[-1]["headers"]["x-trace"] == "a"


def test_environment_supplies_base_url_and_api_key(peer, monkeypatch):
    peer.api_key = "sk-from-env"
    monkeypatch.setenv("NOMYO_BASE_URL", peer.url)
    monkeypatch.setenv("NOMYO_API_KEY", "sk-from-env")
    with SecureChatCompletion(allow_http=True, key_size=2048) as chat:
        assert chat.client.router_url == peer.url
        chat.create_sync("m", MESSAGES)
    assert peer.received[-1]["headers"]["authorization"] == "Bearer sk-from-env"


def test_arguments_win_over_the_environment(peer, monkeypatch):
    monkeypatch.setenv("NOMYO_BASE_URL", "https://elsewhere.invalid")
    monkeypatch.setenv("NOMYO_API_KEY", "sk-env")
    with SecureChatCompletion(base_url=peer.url, api_key="sk-arg", allow_http=True,
                              key_size=2048) as chat:
        chat.create_sync("m", MESSAGES)
    assert peer.received[-1]["headers"]["authorization"] == "Bearer sk-arg"


def test_retry_warnings_stay_off_stderr_without_logging_config(peer):
    peer.inject(503, {"Retry-After": "0"}, {"detail": "busy"})
    proc = run_python(f"""
        from nomyo import SecureChatCompletion
        with SecureChatCompletion(base_url={peer.url!r}, allow_http=True, key_size=2048) as c:
            c.create_sync("m", [{{"role": "user", "content": "hi"}}])
        print("done")
    """)
    assert proc.returncode == 0, proc.stderr
    assert len(peer.received) == 2  # the 503 was retried, so a warning was logged
    assert proc.stdout.strip() == "done"
    assert proc.stderr == ""


def test_a_failed_server_key_fetch_names_the_request_payload_id(peer):
    from nomyo import APIConnectionError

    port = peer.httpd.server_address[1]
    peer.close()  # nothing listens any more: the key fetch itself fails
    with SecureChatCompletion(base_url=f"http://127.0.0.1:{port}", allow_http=True,
                              key_size=2048, max_retries=0) as chat:
        with pytest.raises(APIConnectionError) as info:
            chat.create_sync("m", MESSAGES)
    assert info.value.payload_id  # the completion's id, though the GET carried none


def test_secure_response_without_the_native_helper_is_refused_before_sending(peer):
    """The fallback backend cannot read an answer in place: ConfigurationError, nothing sent."""
    from tests.helpers import run_python

    before = len(peer.received)
    proc = run_python(f"""
        from nomyo import SecureChatCompletion
        from nomyo.errors import ConfigurationError
        with SecureChatCompletion(base_url={peer.url!r}, allow_http=True, key_size=2048) as c:
            try:
                c.create_sync("m", [{{"role": "user", "content": "x"}}], secure_response=True)
            except ConfigurationError as exc:
                print("refused:", exc)
    """, NOMYO_MEMORY_BACKEND="fallback", check=True)
    assert "refused: secure_response=True needs the native helper" in proc.stdout
    assert len(peer.received) == before
