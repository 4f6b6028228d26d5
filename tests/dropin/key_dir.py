"""key_dir: the first client generates and saves the pair, the next one loads it."""
import asyncio
import os
import stat
import sys

from nomyo import SecureChatCompletion


async def main(key_dir):
    url = os.environ["NOMYO_URL"]
    first = SecureChatCompletion(base_url=url, allow_http=True, key_dir=key_dir)
    await first.create(model="Qwen/Qwen3-0.6B", messages=[{"role": "user", "content": "one"}])
    private_path = os.path.join(key_dir, "private_key.pem")
    public_path = os.path.join(key_dir, "public_key.pem")
    assert os.path.exists(private_path) and os.path.exists(public_path)
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    with open(public_path) as f:  # noqa: ASYNC230
        public_pem = f.read()
    assert public_pem.startswith("-----BEGIN PUBLIC KEY-----")
    second = SecureChatCompletion(base_url=url, allow_http=True, key_dir=key_dir)
    response = await second.create(model="Qwen/Qwen3-0.6B",
                                   messages=[{"role": "user", "content": "two"}])
    assert response["choices"][0]["message"]["content"] == "two"
    with open(public_path) as f:  # noqa: ASYNC230
        assert f.read() == public_pem, "second client replaced the saved key pair"
    print("OK")


asyncio.run(main(sys.argv[1]))
