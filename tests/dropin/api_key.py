"""The API key travels as a Bearer header; a per-call override wins; a wrong key is a 401."""
import asyncio
import os

from nomyo import AuthenticationError, SecureChatCompletion


async def main():
    url = os.environ["NOMYO_URL"]
    key = os.environ["NOMYO_TEST_API_KEY"]
    client = SecureChatCompletion(base_url=url, allow_http=True, api_key=key)
    response = await client.create(model="Qwen/Qwen3-0.6B",
                                   messages=[{"role": "user", "content": "authed"}])
    assert response["choices"][0]["message"]["content"] == "authed"
    try:
        await client.create(model="Qwen/Qwen3-0.6B", messages=[{"role": "user", "content": "x"}],
                            api_key="wrong-key")
    except AuthenticationError as err:
        assert err.status_code == 401
        assert "wrong-key" not in str(err)
    else:
        raise AssertionError("wrong per-call api_key accepted")
    anonymous = SecureChatCompletion(base_url=url, allow_http=True)
    override = await anonymous.create(model="Qwen/Qwen3-0.6B",
                                      messages=[{"role": "user", "content": "per call"}],
                                      api_key=key)
    assert override["choices"][0]["message"]["content"] == "per call"
    print("OK")


asyncio.run(main())
