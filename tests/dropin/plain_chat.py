"""Plain chat, sync entry point via asyncio.run, both create and acreate."""
import asyncio
import os

from nomyo import SecureChatCompletion


async def main():
    client = SecureChatCompletion(base_url=os.environ["NOMYO_URL"], allow_http=True)
    response = await client.create(
        model="Qwen/Qwen3-0.6B",
        messages=[
            {"role": "system", "content": "You are concise."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        temperature=0.7,
        max_tokens=64,
    )
    assert response["object"] == "chat.completion", response
    message = response["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert "capital of France" in message["content"]
    meta = response["_metadata"]
    assert meta["is_encrypted"] is True
    assert meta["encryption_algorithm"] == "hybrid-aes256-rsa4096"
    assert isinstance(meta["payload_id"], str) and meta["payload_id"]
    assert "usage" in response
    again = await client.acreate(model="Qwen/Qwen3-0.6B",
                                 messages=[{"role": "user", "content": "ping"}])
    assert "ping" in again["choices"][0]["message"]["content"]
    print("OK", message["content"])


asyncio.run(main())
