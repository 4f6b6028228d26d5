"""The real LLM stack, shared by the llm-marked files of this package."""
from __future__ import annotations

import pytest

from tests.openai import stack


@pytest.fixture(scope="package")
def llm():
    """(llama.cpp URL, nomyo serve URL, nomyo proxy URL), all real processes."""
    procs = []
    try:
        llama, llama_url = stack.llama_server()
        procs.append(llama)
        server, server_url = stack.serve(llama_url)
        procs.append(server)
        proxy, proxy_url = stack.proxy(server_url)
        procs.append(proxy)
        yield llama_url, server_url, proxy_url
    finally:
        for proc in reversed(procs):
            stack.stop(proc)
