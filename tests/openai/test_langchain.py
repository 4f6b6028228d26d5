"""LangChain's `ChatOpenAI` on the real stack (SmolLM2 on llama.cpp behind `nomyo serve`): the
LangChain block of docs/openai.md as written, then invoke and bind_tools through the httpx
transport (`http_client=`, and `http_async_client=` for ainvoke) and through `nomyo proxy`
(`base_url=`), each answer equal to llama.cpp's own. Run by the CI llm stage."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re

import pytest

from tests.helpers import ROOT
from tests.openai import stack

langchain_openai = pytest.importorskip(
    "langchain_openai", reason="langchain-openai is not installed (the CI llm stage installs it)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (test extra)")

pytestmark = pytest.mark.llm

ASK = "Name three colours."
WEATHER_ASK = "What is the weather in Paris?"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
SETTINGS = {"temperature": 0, "seed": 7, "max_tokens": 24}
# ChatOpenAI sends max_tokens as max_completion_tokens, which llama-cpp-python's server does
# not read: the old name goes in the body too, and the reference gets both
EXTRA = {"max_tokens": SETTINGS["max_tokens"]}


def docs_block() -> str:
    """The python block of docs/openai.md's LangChain section."""
    with open(os.path.join(ROOT, "docs", "openai.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text.split("## LangChain", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "docs/openai.md: the LangChain section has no python block"
    return found.group(1)


def test_the_docs_example_runs_on_the_real_stack(llm):
    _, server_url, proxy_url = llm
    code = docs_block()
    # the example's endpoint, model and proxy address, pointed at this stack
    swaps = {'SecureChatCompletion(base_url="https://api.nomyo.ai")':
             f'SecureChatCompletion(base_url="{server_url}", allow_http=True, key_size=2048)',
             '"my-model"': '"smollm2"', "http://127.0.0.1:12435/v1": proxy_url}
    for old, new in swaps.items():
        assert old in code, f"docs/openai.md's LangChain example no longer has {old}"
        code = code.replace(old, new)
    printed = io.StringIO()
    scope: dict = {}
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "docs/openai.md", "exec"), scope)  # noqa: S102 (our own docs)
    finally:
        if "client" in scope:
            scope["client"].close()
    lines = printed.getvalue().splitlines()
    assert lines[0].strip(), "invoke printed no content"
    # the tool call, through the transport and then through the proxy
    assert [line.count("'name': 'get_weather'") for line in lines[1:]] == [1, 1]


def chat_models(server_url: str, proxy_url: str, client) -> dict:
    from nomyo.openai import AsyncNomyoTransport, NomyoTransport

    via_transport = langchain_openai.ChatOpenAI(
        model="smollm2", base_url="http://nomyo.invalid/v1", api_key="unused", max_retries=0,
        http_client=httpx.Client(transport=NomyoTransport(client)),
        http_async_client=httpx.AsyncClient(transport=AsyncNomyoTransport(client)),
        extra_body=EXTRA, **SETTINGS)
    via_proxy = langchain_openai.ChatOpenAI(model="smollm2", base_url=proxy_url,
                                            api_key="unused", max_retries=0, extra_body=EXTRA,
                                            **SETTINGS)
    return {"transport": via_transport, "proxy": via_proxy}


def llama_body(content: str, **extra) -> dict:
    return {"model": "smollm2", "messages": [{"role": "user", "content": content}],
            **SETTINGS, "max_completion_tokens": SETTINGS["max_tokens"], **extra}


@pytest.mark.parametrize("route", ["transport", "proxy"])
def test_invoke_and_ainvoke_match_llama_cpp(llm, route):
    from nomyo.client import SecureChatCompletion

    llama_url, server_url, proxy_url = llm
    expected = stack.reference(llama_url, llama_body(ASK))["choices"][0]
    with SecureChatCompletion(base_url=server_url, allow_http=True, key_size=2048) as client:
        model = chat_models(server_url, proxy_url, client)[route]
        answer = model.invoke(ASK)
        again = asyncio.run(model.ainvoke(ASK))
    assert answer.content == expected["message"]["content"]
    assert answer.response_metadata["finish_reason"] == expected["finish_reason"]
    assert again.content == answer.content


@pytest.mark.parametrize("route", ["transport", "proxy"])
def test_bind_tools_matches_llama_cpp(llm, route):
    from nomyo.client import SecureChatCompletion

    llama_url, server_url, proxy_url = llm
    forced = {"type": "function", "function": {"name": "get_weather"}}
    expected = stack.reference(llama_url, llama_body(WEATHER_ASK, tools=[WEATHER],
                                                     tool_choice=forced))
    expected_call = expected["choices"][0]["message"]["tool_calls"][0]["function"]
    with SecureChatCompletion(base_url=server_url, allow_http=True, key_size=2048) as client:
        model = chat_models(server_url, proxy_url, client)[route]
        answer = model.bind_tools([WEATHER], tool_choice="get_weather").invoke(WEATHER_ASK)
    assert len(answer.tool_calls) == 1
    call = answer.tool_calls[0]
    assert call["name"] == "get_weather" == expected_call["name"]
    assert call["args"] == json.loads(expected_call["arguments"])
