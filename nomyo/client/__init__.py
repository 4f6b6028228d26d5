"""The client side: the facade, the core client, its key ring and its HTTP transport."""
from __future__ import annotations

from nomyo.client.core import SecureCompletionClient
from nomyo.client.facade import SecureChatCompletion

__all__ = ["SecureChatCompletion", "SecureCompletionClient"]
