"""`create(..., secure_response=True)`: a SecureAnswer against the independent peer server.

The peer (tests/peer_server.py) echoes the last user message with json.dumps, so every
non-ASCII character, quote and line break of the prompt comes back as a JSON escape: the
escaped path (text unescaped in C into the answer's second buffer) is exercised by any
prompt that has them, the in-place path by plain ASCII.
"""
from __future__ import annotations

import asyncio
import gc
import json
import pickle
import weakref

import pytest

from nomyo import AnswerFieldError, DisposedError, SecureAnswer, SecureToolCall
from nomyo.memory import binding

pytestmark = pytest.mark.skipif(binding.pyobjects is None,
                                reason="needs the native helper (nomyo._pyobjects)")

ESCAPED = 'quote " backslash \\ tab \t line\nbreak é ✓ 😀 \u2028 end'
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def text(view: memoryview | None) -> str | None:
    return None if view is None else bytes(view).decode("utf-8")


def test_round_trip_gives_read_only_views_and_ordinary_metadata(chat):
    with chat.create_sync("m", ask("plain ascii answer"), secure_response=True) as answer:
        assert isinstance(answer, SecureAnswer)
        view = answer.content()
        assert isinstance(view, memoryview) and view.readonly
        assert text(view) == "plain ascii answer"
        with pytest.raises(TypeError):
            view[0] = 0
        assert answer.id.startswith("chatcmpl-") and answer.model == "m"
        assert answer.finish_reason() == "stop" and answer.role() == "assistant"
        assert answer.usage == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        assert answer.choice_count == 1 and isinstance(answer.created, int)
        metadata = answer.metadata
        assert metadata["is_encrypted"] is True and metadata["response_status"] == "success"
        assert metadata["encryption_algorithm"] == "hybrid-aes256-rsa4096"
        assert "plain ascii" not in repr(answer)


@pytest.mark.parametrize("prompt", [ESCAPED, "é" * 3000, "😀", "", "\\u0041 not an escape"])
def test_escapes_and_non_ascii_come_back_exact(chat, prompt):
    with chat.create_sync("m", ask(prompt), secure_response=True) as answer:
        assert text(answer.content()) == prompt
        assert text(answer.view("choices", 0, "message", "content")) == prompt


def test_to_dict_equals_the_default_calls_dict(chat):
    plain = chat.create_sync("m", ask(ESCAPED))
    with chat.create_sync("m", ask(ESCAPED), secure_response=True) as answer:
        ordinary = answer.to_dict()
    for volatile in ("id", "created"):
        assert type(ordinary.pop(volatile)) is type(plain.pop(volatile))
    for side in (ordinary, plain):
        for volatile in ("payload_id", "processed_at"):
            side["_metadata"].pop(volatile)
    assert ordinary == plain
    assert list(ordinary) == list(plain)


def test_tool_call_arguments_are_views_too(chat):
    with chat.create_sync("m", ask(ESCAPED), tools=TOOLS, secure_response=True) as answer:
        assert answer.content() is None and answer.finish_reason() == "tool_calls"
        (call,) = answer.tool_calls()
        assert isinstance(call, SecureToolCall)
        assert call.name == "lookup" and call.type == "function" and call.id.startswith("call_")
        assert call.arguments.readonly
        assert json.loads(bytes(call.arguments)) == {"echo": ESCAPED}
        assert ESCAPED not in repr(call)
        assert answer.to_dict()["choices"][0]["message"]["tool_calls"][0]["function"][
            "arguments"] == bytes(call.arguments).decode()
    with chat.create_sync("m", ask("x"), secure_response=True) as plain:
        assert plain.tool_calls() == []


def test_views_are_released_on_close_and_the_answer_refuses_use(chat):
    answer = chat.create_sync("m", ask(ESCAPED), secure_response=True)
    escaped, in_place = answer.content(), answer.view("id")
    answer.close()
    answer.close()  # idempotent
    assert answer.closed
    for view in (escaped, in_place):
        with pytest.raises(ValueError, match="released"):
            view[0]
    for use in (answer.content, answer.to_dict, answer.tool_calls, lambda: answer.metadata):
        with pytest.raises(DisposedError):
            use()
    assert repr(answer) == "<SecureAnswer closed>"


def test_a_view_reexported_by_the_caller_outlives_close_only_as_zeros(chat):
    """A view the caller re-exported (here memoryview of it) cannot be released by close():
    the memory stays mapped while that export lives, but it was wiped."""
    answer = chat.create_sync("m", ask("reexported text"), secure_response=True)
    kept = memoryview(answer.content())
    answer.close()
    assert bytes(kept) == bytes(len("reexported text"))


def test_with_and_garbage_collection_wipe(chat):
    with chat.create_sync("m", ask(ESCAPED), secure_response=True) as answer:
        view = answer.content()
    assert answer.closed
    with pytest.raises(ValueError):
        view[0]
    answer = chat.create_sync("m", ask(ESCAPED), secure_response=True)
    view, gone = answer.content(), weakref.ref(answer)
    del answer
    gc.collect()
    assert gone() is None
    with pytest.raises(ValueError, match="released"):
        view[0]


def test_async_create_and_concurrent_answers(chat):
    async def main():
        answers = await asyncio.gather(*[
            chat.create(model="m", messages=ask(f"answer {i} é"), secure_response=True)
            for i in range(6)])
        try:
            return [text(a.content()) for a in answers]
        finally:
            for a in answers:
                a.close()
    assert asyncio.run(main()) == [f"answer {i} é" for i in range(6)]


def test_wrong_use_gets_typed_errors(chat):
    with chat.create_sync("m", ask("x"), secure_response=True) as answer:
        with pytest.raises(AnswerFieldError, match=r"\['choices'\]\[3\]"):
            answer.content(choice=3)
        with pytest.raises(AnswerFieldError):
            answer.view("choices", 0, "nothing")
        with pytest.raises(AnswerFieldError, match="not a string"):
            answer.view("usage")
        with pytest.raises(LookupError):  # the builtin it also is
            answer.view("choices", "0")
        with pytest.raises(TypeError):
            pickle.dumps(answer)
    with pytest.raises(TypeError, match="secure_response"):
        chat.create_sync("m", ask("x"), secure_response="yes")


def test_without_the_keyword_nothing_changes(chat, peer):
    plain = chat.create_sync("m", ask("x"))
    assert type(plain) is dict and plain["choices"][0]["message"]["content"] == "x"
    chat.create_sync("m", ask("x"), secure_response=True).close()
    sent = [json.loads(p) for p in peer.request_plaintexts[-2:]]
    assert "secure_response" not in sent[1] and sent[0].keys() == sent[1].keys()


def test_locked_memory_is_given_back_when_answers_close(chat):
    """Each open answer holds its own locked pages; closing all returns to the baseline."""
    def vmlck() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmLck:"))
    chat.create_sync("m", ask("warm up"))
    before = vmlck()
    answers = [chat.create_sync("m", ask("é" * 500), secure_response=True) for _ in range(5)]
    for a in answers:
        a.content()
    for a in answers:
        a.close()
    assert vmlck() <= before


def test_attestation_verdict_is_in_the_metadata_and_require_refuses(peer):
    from nomyo import SecureChatCompletion, SecurityError

    with SecureChatCompletion(base_url=peer.url, allow_http=True, key_size=2048,
                              attestation="verify") as c:
        plain = c.create_sync("m", ask("x"))["_metadata"]["attestation_verification"]
        with c.create_sync("m", ask("x"), secure_response=True) as answer:
            assert answer.metadata["attestation_verification"] == plain
            assert answer.to_dict()["_metadata"]["attestation_verification"] == plain
        c.attestation = "require"
        with pytest.raises(SecurityError, match="not_available"):
            c.create_sync("m", ask("x"), secure_response=True)
