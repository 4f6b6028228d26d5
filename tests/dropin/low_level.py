"""The lower-level SecureCompletionClient with the published sync/async split."""
import asyncio
import os
import sys
import uuid

from nomyo import SecureChatCompletion  # noqa: F401  (the package exposes both)
from nomyo.SecureCompletionClient import SecureCompletionClient


async def main(key_dir):
    client = SecureCompletionClient(router_url=os.environ["NOMYO_URL"], allow_http=True)
    client.generate_keys(save_to_file=True, key_dir=key_dir)
    pem = await client.fetch_server_public_key()
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    package = await client.encrypt_payload(
        {"model": "m", "messages": [{"role": "user", "content": "low"}]})
    assert isinstance(package, bytes) and b"encrypted_aes_key" in package
    response = await client.send_secure_request(
        {"model": "m", "messages": [{"role": "user", "content": "low level"}]},
        str(uuid.uuid4()), None, "high")
    assert response["choices"][0]["message"]["content"] == "low level"
    other = SecureCompletionClient(router_url=os.environ["NOMYO_URL"], allow_http=True)
    other.load_keys(os.path.join(key_dir, "private_key.pem"),
                    os.path.join(key_dir, "public_key.pem"))
    response = await other.send_secure_request(
        {"model": "m", "messages": [{"role": "user", "content": "loaded"}]}, str(uuid.uuid4()))
    assert response["choices"][0]["message"]["content"] == "loaded"
    print("OK")


asyncio.run(main(sys.argv[1]))
