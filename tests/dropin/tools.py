"""Tool definitions and tool_choice pass through the encrypted payload."""
import asyncio
import json
import os

from nomyo import SecureChatCompletion

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}]


async def main():
    client = SecureChatCompletion(base_url=os.environ["NOMYO_URL"], allow_http=True)
    response = await client.create(
        model="Qwen/Qwen3-0.6B",
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=TOOLS,
        tool_choice="auto",
        temperature=0.2,
    )
    choice = response["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert calls and calls[0]["function"]["name"] == "get_weather", response
    json.loads(calls[0]["function"]["arguments"])
    assert choice["finish_reason"] == "tool_calls"
    print("OK", calls[0]["function"]["name"])


asyncio.run(main())
