"""TypedDicts of the OpenAI chat-completion shapes, for type checkers.

At run time every value is the plain dict the endpoint answered (with our `_metadata`);
these classes only tell a checker which keys to expect. `total=False`: servers differ in
which optional fields they fill.
"""
from __future__ import annotations

from typing import Any, Literal, TypedDict, Union


class FunctionCall(TypedDict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(TypedDict, total=False):
    id: str
    type: Literal["function"]
    function: FunctionCall
    index: int  # in stream chunks only


class ChatMessage(TypedDict, total=False):
    """A message sent (`role` and `content`, ...) or received (`message` of a choice)."""

    role: str
    content: Union[str, list[dict[str, Any]], None]
    name: str
    tool_calls: list[ToolCall]
    tool_call_id: str
    refusal: Union[str, None]


class ChoiceLogprobs(TypedDict, total=False):
    content: Union[list[dict[str, Any]], None]


class Choice(TypedDict, total=False):
    index: int
    message: ChatMessage
    finish_reason: Union[str, None]
    logprobs: Union[ChoiceLogprobs, None]


class Usage(TypedDict, total=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMetadata(TypedDict, total=False):
    """Our addition: how the answer was protected (docs/protocol.md)."""

    payload_id: str
    processed_at: Any
    is_encrypted: bool
    encryption_algorithm: str
    response_status: str
    security_tier: str
    memory_protection: dict[str, Any]
    attestation: dict[str, Any]


class ChatCompletion(TypedDict, total=False):
    """What `SecureChatCompletion.create` returns."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: Union[str, None]
    _metadata: ResponseMetadata


class ChatCompletionRequest(TypedDict, total=False):
    """The body of POST /v1/chat/completions (the fields most callers use)."""

    model: str
    messages: list[ChatMessage]
    max_tokens: int
    max_completion_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: Union[str, list[str]]
    logprobs: bool
    top_logprobs: int
    response_format: dict[str, Any]
    tools: list[dict[str, Any]]
    tool_choice: Union[str, dict[str, Any]]
    stream: bool
    stream_options: dict[str, Any]


__all__ = [
    "ChatCompletion", "ChatCompletionRequest", "ChatMessage", "Choice", "ChoiceLogprobs",
    "FunctionCall", "ResponseMetadata", "ToolCall", "Usage",
]
