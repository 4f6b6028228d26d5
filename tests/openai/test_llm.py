"""A real LLM (SmolLM2-135M on llama.cpp) behind `nomyo serve`, reached four ways: our client,
the openai SDK through `nomyo proxy` (sync, async, 16 at once) and the httpx transport. Each
answer must equal, field by field, the same request sent to llama.cpp directly (only `id`,
`created` and generated tool-call ids may differ). Run by the CI llm stage (`pytest -m llm`)."""
from __future__ import annotations

import asyncio
import copy

import pytest

from tests.openai import stack

openai = pytest.importorskip("openai", reason="the openai SDK is not installed (test extra)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (test extra)")

pytestmark = pytest.mark.llm

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "Name three colours."}]
BASE = {"temperature": 0, "seed": 7}
CASES = {
    "plain": {"messages": ASK, "max_tokens": 24},
    "params": {"messages": ASK, "max_tokens": 20, "stop": ["\n", "."], "temperature": 0.0,
               "seed": 42},
    "length": {"messages": ASK, "max_tokens": 3},
    "logprobs": {"messages": ASK, "max_tokens": 5, "logprobs": True, "top_logprobs": 2},
    "json": {"messages": [{"role": "user", "content": "Give a JSON object with a name."}],
             "max_tokens": 24, "response_format": {"type": "json_object"}},
    "tools_auto": {"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                   "max_tokens": 32, "tools": [WEATHER], "tool_choice": "auto"},
    "tools_forced": {"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                     "max_tokens": 32, "tools": [WEATHER],
                     "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
}
OVERFLOW = {"messages": [{"role": "user", "content": "word " * 2000}], "max_tokens": 5}


def request(case: str) -> dict:
    return copy.deepcopy({"model": "smollm2", **BASE, **CASES[case]})


def comparable(answer: dict) -> dict:
    """The answer without what may differ between two runs of one request."""
    answer = copy.deepcopy(answer)
    for name in ("id", "created", "_metadata"):
        answer.pop(name, None)
    for choice in answer.get("choices") or []:
        for call in (choice.get("message") or {}).get("tool_calls") or []:
            call.pop("id", None)
    return answer


def sdk_dump(completion) -> dict:
    return completion.model_dump(exclude_unset=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_client_matches_llama_cpp(llm, case):
    from nomyo.client import SecureChatCompletion

    llama_url, server_url, _ = llm
    body = request(case)
    expected = stack.reference(llama_url, copy.deepcopy(body))
    with SecureChatCompletion(base_url=server_url, allow_http=True, key_size=2048) as client:
        answer = client.create_sync(**body)
    assert answer["_metadata"]["is_encrypted"] is True
    assert comparable(answer) == comparable(expected)
    if case == "length":
        assert answer["choices"][0]["finish_reason"] == "length"
    if case == "tools_forced":
        assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == \
            "get_weather"


@pytest.mark.parametrize("case", sorted(CASES))
def test_openai_sdk_through_the_proxy_matches_llama_cpp(llm, case):
    llama_url, _, proxy_url = llm
    body = request(case)
    expected = stack.reference(llama_url, copy.deepcopy(body))
    sdk = openai.OpenAI(base_url=proxy_url, api_key="unused", max_retries=0)
    answer = sdk.chat.completions.create(**body)
    assert comparable(sdk_dump(answer)) == comparable(expected)
    # the SDK's own view of the direct answer (its defaults filled the same way)
    direct_sdk = openai.OpenAI(base_url=f"{llama_url}/v1", api_key="unused", max_retries=0)
    assert comparable(sdk_dump(answer)) == comparable(
        sdk_dump(direct_sdk.chat.completions.create(**request(case))))


@pytest.mark.parametrize("case", sorted(CASES))
def test_async_sdk_matches_llama_cpp(llm, case):
    llama_url, _, proxy_url = llm
    expected = comparable(stack.reference(llama_url, request(case)))

    async def main():
        async with openai.AsyncOpenAI(base_url=proxy_url, api_key="unused", max_retries=0) as sdk:
            return await sdk.chat.completions.create(**request(case))

    assert comparable(sdk_dump(asyncio.run(main()))) == expected


def test_16_at_once_match_llama_cpp(llm):
    # one case 16 times: llama.cpp takes them one by one, each after the same prompt (see
    # `stack.reference`), so each must equal the reference
    llama_url, _, proxy_url = llm
    expected = comparable(stack.reference(llama_url, request("length")))

    async def main():
        async with openai.AsyncOpenAI(base_url=proxy_url, api_key="unused", max_retries=0) as sdk:
            return await asyncio.gather(*(sdk.chat.completions.create(**request("length"))
                                          for _ in range(16)))

    answers = asyncio.run(main())
    assert len(answers) == 16
    assert all(comparable(sdk_dump(answer)) == expected for answer in answers)


@pytest.mark.parametrize("case", sorted(CASES))
def test_httpx_transport_matches_llama_cpp(llm, case):
    from nomyo.client import SecureChatCompletion
    from nomyo.openai import AsyncNomyoTransport, NomyoTransport

    llama_url, server_url, _ = llm
    expected = comparable(stack.reference(llama_url, request(case)))
    with SecureChatCompletion(base_url=server_url, allow_http=True, key_size=2048) as client:
        sdk = openai.OpenAI(base_url="http://nomyo.invalid/v1", api_key="unused",
                            http_client=httpx.Client(transport=NomyoTransport(client)))
        assert comparable(sdk_dump(sdk.chat.completions.create(**request(case)))) == expected

        async def main():
            transport = AsyncNomyoTransport(client)
            async with httpx.AsyncClient(transport=transport) as http:
                sdk = openai.AsyncOpenAI(base_url="http://nomyo.invalid/v1", api_key="unused",
                                         http_client=http)
                return await sdk.chat.completions.create(**request(case))

        assert comparable(sdk_dump(asyncio.run(main()))) == expected


def test_context_overflow_is_a_400_with_the_backends_code_everywhere(llm):
    from nomyo.client import SecureChatCompletion
    from nomyo.errors import InvalidRequestError

    llama_url, server_url, proxy_url = llm
    body = {"model": "smollm2", **OVERFLOW}
    status, direct_answer = stack.post_json(llama_url, "/v1/chat/completions", body)
    assert status == 400 and direct_answer["error"]["code"] == "context_length_exceeded"
    with SecureChatCompletion(base_url=server_url, allow_http=True, key_size=2048) as client:
        with pytest.raises(InvalidRequestError) as ours:
            client.create_sync(**body)
    assert ours.value.status_code == 400
    assert ours.value.error_details["error"]["code"] == "context_length_exceeded"
    sdk = openai.OpenAI(base_url=proxy_url, api_key="unused")  # default retries: none happen
    with pytest.raises(openai.BadRequestError) as theirs:
        sdk.chat.completions.create(**body)
    assert theirs.value.status_code == 400
    assert theirs.value.code == "context_length_exceeded"
    assert theirs.value.param == "messages"


def test_stream_through_the_proxy_is_the_whole_answer_in_one_chunk(llm):
    llama_url, _, proxy_url = llm
    expected = stack.reference(llama_url, request("plain"))
    sdk = openai.OpenAI(base_url=proxy_url, api_key="unused", max_retries=0)
    chunks = list(sdk.chat.completions.create(**request("plain"), stream=True,
                                              stream_options={"include_usage": True}))
    assert len(chunks) == 2  # the answer, then the usage
    delta = chunks[0].choices[0].delta
    assert delta.content == expected["choices"][0]["message"]["content"]
    assert chunks[0].choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert chunks[1].usage.model_dump(exclude_none=True) == expected["usage"]
    # .stream() callers: the SDK's event helper sees one content delta and the end. (Its
    # get_final_completion() refuses a "length" finish by design, so the events are read.)
    with sdk.chat.completions.stream(**request("plain")) as events:
        kinds = [event.type for event in events]
        text = events.current_completion_snapshot.choices[0].message.content
    assert kinds.count("content.delta") == 1 and "content.done" in kinds
    assert text == expected["choices"][0]["message"]["content"]
