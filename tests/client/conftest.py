"""Fixtures of the client tests (the `peer` endpoint comes from tests/conftest.py)."""
import pytest

from nomyo import SecureChatCompletion


@pytest.fixture
def chat(peer):
    """A facade on the peer, plain HTTP on loopback, 2048-bit keys (quick to make)."""
    c = SecureChatCompletion(base_url=peer.url, allow_http=True, key_size=2048)
    yield c
    c.close()
