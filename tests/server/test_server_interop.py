"""Interop: the published `nomyo==0.2.9` client from PyPI, unchanged, in its own throwaway venv,
talks to `python -m nomyo.server` (echo backend): 50 sequential and 50 concurrent (16 at a time)
requests each get the echo of their own message, with `_metadata`."""

from __future__ import annotations

import json
import os
import subprocess
import venv

import pytest

from tests.server_fixtures import kill_group, listening_url, serve_process

PUBLISHED = "nomyo==0.2.9"

CLIENT_SCRIPT = r"""
import asyncio, json, sys
from nomyo import SecureChatCompletion

async def main(url):
    client = SecureChatCompletion(base_url=url, allow_http=True)
    failures, done = [], []

    async def one(tag):
        text = f"interop message {tag} \u00e4\u2713"
        response = await client.create(model="echo-model", messages=[
            {"role": "system", "content": "test"}, {"role": "user", "content": text}])
        content = response["choices"][0]["message"]["content"]
        meta = response.get("_metadata", {})
        if text not in content or meta.get("response_status") != "success" \
                or meta.get("is_encrypted") is not True or "memory_protection" not in meta \
                or "payload_id" not in meta or meta.get("processed_at") is None:
            failures.append({"tag": tag, "content": content, "meta": sorted(meta)})
        done.append(tag)

    for i in range(50):
        await one(f"seq-{i}")
    gate = asyncio.Semaphore(16)

    async def limited(i):
        async with gate:
            await one(f"par-{i}")

    await asyncio.gather(*(limited(i) for i in range(50)))
    print(json.dumps({"failures": failures, "done": len(set(done))}))

asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture(scope="session")
def published_client_python(tmp_path_factory) -> str:
    """A fresh venv (cached for this test run) with the published client from the registry."""
    folder = tmp_path_factory.mktemp("nomyo029-venv")
    venv.create(folder, with_pip=True, clear=True)
    python = str(folder / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PUBLISHED],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if install.returncode != 0:
        pytest.fail(
            f"pip install {PUBLISHED} failed (the package registry is required):\n"
            f"{install.stderr[-2000:]}"
        )
    return python


@pytest.mark.slow
def test_published_client_against_nomyo_serve(published_client_python, tmp_path) -> None:
    server = serve_process()
    try:
        url = listening_url(server)
        script = tmp_path / "client.py"
        script.write_text(CLIENT_SCRIPT)
        # -I: isolated mode, so the published package is imported, never this checkout's.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        run = subprocess.run(
            [published_client_python, "-I", str(script), url],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
            check=False,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result == {"failures": [], "done": 100}
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
        kill_group(server)
    assert server.returncode == 0, err
    assert "interop message" not in err + out
