"""Fixtures shared by the client-side tests."""
import pytest

from tests.peer_server import PeerServer


@pytest.fixture
def peer():
    """An independent docs/protocol.md endpoint (not nomyo's server) on loopback."""
    server = PeerServer()
    yield server
    server.close()
