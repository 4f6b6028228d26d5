"""The one check of a chat request's plaintext, shared by the client (before sealing) and the
server (after opening), so both refuse exactly the same payloads with the same words."""
from __future__ import annotations

from typing import Any

from nomyo.errors import ChatRequestError
from nomyo.protocol.constants import SECURITY_TIERS


def check_chat_request(payload: Any) -> None:
    """Refuse a payload that is not a chat request the protocol can carry (ChatRequestError,
    a ValueError and an InvalidRequestError)."""
    if not isinstance(payload, dict):
        raise ChatRequestError("payload must be a dict (a JSON object)")
    if not payload:
        raise ChatRequestError("payload cannot be empty")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise ChatRequestError("payload needs a non-empty 'model' string")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) for m in messages
    ):
        raise ChatRequestError("payload needs a non-empty 'messages' list of objects")
    if payload.get("stream"):
        raise ChatRequestError(
            "stream=True is not supported: the protocol carries whole encrypted responses only"
        )


def check_security_tier(security_tier: str | None) -> None:
    """Refuse a tier outside standard | high | maximum (ValueError, as the published client)."""
    if security_tier is not None and security_tier not in SECURITY_TIERS:
        raise ValueError(
            f"Invalid security_tier: {security_tier!r}. Must be one of: {', '.join(SECURITY_TIERS)}"
        )
