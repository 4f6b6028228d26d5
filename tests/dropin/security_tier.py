"""security_tier is sent per call (never in the payload) and validated."""
import asyncio
import os

from nomyo import SecureChatCompletion


async def main():
    client = SecureChatCompletion(base_url=os.environ["NOMYO_URL"], allow_http=True)
    for tier in ("standard", "high", "maximum"):
        response = await client.create(
            model="Qwen/Qwen3-0.6B",
            messages=[{"role": "user", "content": f"tier {tier}"}],
            security_tier=tier,
        )
        assert response["_metadata"]["security_tier"] == tier, response["_metadata"]
    try:
        await client.create(model="Qwen/Qwen3-0.6B", messages=[{"role": "user", "content": "x"}],
                            security_tier="ultra")
    except ValueError as err:
        assert "ultra" in str(err)
    else:
        raise AssertionError("invalid security_tier accepted")
    print("OK")


asyncio.run(main())
