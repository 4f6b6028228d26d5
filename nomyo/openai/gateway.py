"""The OpenAI HTTP surface over our client, shared by `nomyo proxy` and the httpx transport.

`Gateway.route` turns one HTTP request (method, path, headers, body) into either a finished
`Reply` or a `Call` (the chat request to forward); `finish` turns the client's answer into
the OpenAI reply (JSON, or one server-sent-event chunk plus `[DONE]` for `stream: true`);
`failure` turns any exception into an OpenAI error body with the status the openai SDK maps
to its classes. The forwarding itself (sync or async) is the caller's, so each front end
keeps its own concurrency model.

The plaintext request body is parsed with `secure_json` (its one transient str wiped) and the
caller's buffer zeroed; the request and answer trees are wiped after use. The answer's
serialised bytes are an ordinary-heap copy, handed to the HTTP layer (SECURITY.md).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nomyo.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    DisposedError,
    NomyoError,
    PackageError,
    SecurityError,
    origin_of,
)
from nomyo.memory import secure_json, wipe_str_owned
from nomyo.memory.scrub import wipe_tree

logger = logging.getLogger("nomyo.openai")

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
MAX_BODY_BYTES = 10 * 1024 * 1024
# Our retries already ran (the client's max_retries): the openai SDK must not add its own.
_NO_RETRY = ("x-should-retry", "false")
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
    413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
}


@dataclass
class Reply:
    """One HTTP answer: status, headers (lowercase names) and body."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"


@dataclass
class Call:
    """A chat request to forward: `create(model, messages, extra_body=extra, ...)`."""

    model: str
    messages: list[Any]
    extra: dict[str, Any]
    stream: bool
    include_usage: bool
    started: float

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of `SecureChatCompletion.create` for this call."""
        return {"model": self.model, "messages": self.messages, "extra_body": self.extra}

    def wipe(self) -> None:
        """Empty the request tree (its strings zeroed where this was their only holder)."""
        wipe_tree(self.messages)
        wipe_tree(self.extra)


class GatewayError(Exception):
    """A request refused before forwarding: its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def reply(self) -> Reply:
        """This refusal as an OpenAI error reply."""
        return error_reply(self.status, self.message, code=self.code, param=self.param)


class Gateway:
    """OpenAI routes in front of a `SecureChatCompletion`; `api_keys` guards the front door."""

    def __init__(self, *, models: Sequence[str] = (), api_keys: Any = None,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.models = tuple(models)
        self.api_keys = api_keys  # nomyo.server.policy.ApiKeys, or None (loopback only)
        self.max_body_bytes = max_body_bytes

    def route(self, method: str, path: str, headers: Mapping[str, str],
              body: bytearray) -> Reply | Call:
        """Judge one whole request; the body buffer is zeroed before this returns."""
        try:
            return self.admit(method, path, headers, len(body)) or self.parse(body)
        finally:
            _zero(body)

    def admit(self, method: str, path: str, headers: Mapping[str, str],
              length: int | None) -> Reply | None:
        """Judge a request by its head alone (`length`: its declared body size): a finished
        reply (a refusal, the model list), or None when the body is to be read and parsed.
        A front end that streams bodies calls this first, so an unauthenticated or oversized
        request is refused before any of its body is read."""
        path = path.split("?", 1)[0].rstrip("/")
        try:
            if path not in (CHAT_PATH, MODELS_PATH):
                raise GatewayError(404, f"no route {path or '/'}; this proxy serves "
                                   f"{CHAT_PATH} and {MODELS_PATH}", code="unknown_url")
            self._authenticate(headers)
            wanted = "POST" if path == CHAT_PATH else "GET"
            if method != wanted:
                raise GatewayError(405, f"{path} takes {wanted}", code="method_not_allowed")
            if path == MODELS_PATH:
                return self._models()
            if length is not None and length > self.max_body_bytes:
                raise GatewayError(413, f"request body larger than {self.max_body_bytes} "
                                   "bytes")
        except GatewayError as err:
            return err.reply()
        return None

    def parse(self, body: bytearray) -> Reply | Call:
        """The chat call in an admitted request's body, or the 400 that refuses it; the
        body buffer is zeroed before this returns."""
        try:
            return self._parse(body)
        except GatewayError as err:
            return err.reply()
        finally:
            _zero(body)

    @staticmethod
    def _parse(body: bytearray) -> Call:
        try:
            request = secure_json.loads(body)
        except (PackageError, RecursionError):
            raise GatewayError(400, "request body is not valid JSON") from None
        if not isinstance(request, dict):
            raise GatewayError(400, "request body must be a JSON object")
        model, messages = request.pop("model", None), request.pop("messages", None)
        if not isinstance(model, str) or not model:
            wipe_tree(request)
            wipe_tree(messages)
            raise GatewayError(400, "'model' must be a non-empty string", param="model")
        if not isinstance(messages, list):
            wipe_tree(request)
            wipe_tree(messages)
            raise GatewayError(400, "'messages' must be a list", param="messages")
        stream = request.pop("stream", False) is True
        options = request.pop("stream_options", None)
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return Call(model, messages, request, stream, include_usage, time.time())

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        if self.api_keys is None:
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and token.strip()
                and self.api_keys.identify(token.strip()) is not None):
            raise GatewayError(401, "missing or invalid API key for this proxy",
                               code="invalid_api_key")

    def _models(self) -> Reply:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "nomyo"}
                for name in self.models]
        return Reply(200, json.dumps({"object": "list", "data": data}).encode("utf-8"))

    def answer(self, call: Call, response: dict[str, Any] | None,
               error: Exception | None) -> Reply:
        """The reply for a forwarded call: the client's answer, or the OpenAI error for the
        exception it raised. The call's request tree is wiped either way."""
        call.wipe()
        return failure(error) if error is not None else self.finish(call, response or {})

    def finish(self, call: Call, response: dict[str, Any]) -> Reply:
        """The OpenAI reply for the client's answer; the answer tree is wiped."""
        try:
            response.pop("_metadata", None)
            answer = _sse(response, call.include_usage) if call.stream else [json.dumps(
                response, ensure_ascii=False)]
        finally:
            wipe_tree(response)
        body = answer[0].encode("utf-8")  # the ordinary-heap copy the HTTP layer sends
        wipe_str_owned(answer)
        if call.stream:
            return Reply(200, body, [("cache-control", "no-cache")],
                         content_type="text/event-stream")
        return Reply(200, body)


def _sse(response: dict[str, Any], include_usage: bool) -> list[str]:
    """The whole answer as one `chat.completion.chunk` event, then `[DONE]` (in a list, for
    wipe_str_owned). The protocol carries whole answers, so there is one content chunk."""
    head = {key: response.get(key) for key in ("id", "created", "model", "system_fingerprint")}
    choices = []
    for choice in response.get("choices") or []:
        message = dict(choice.get("message") or {})
        delta: dict[str, Any] = {"role": message.pop("role", "assistant")}
        delta.update(message)
        if isinstance(delta.get("tool_calls"), list):
            delta["tool_calls"] = [{"index": i, **call}
                                   for i, call in enumerate(delta["tool_calls"])]
        choices.append({"index": choice.get("index", 0), "delta": delta,
                        "logprobs": choice.get("logprobs"),
                        "finish_reason": choice.get("finish_reason")})
    events = [{**head, "object": "chat.completion.chunk", "choices": choices}]
    if include_usage:
        events.append({**head, "object": "chat.completion.chunk", "choices": [],
                       "usage": response.get("usage")})
    text = "".join(f"data: {json.dumps(event, ensure_ascii=False)}\n\n" for event in events)
    return [text + "data: [DONE]\n\n"]


def error_reply(status: int, message: str, *, type_: str | None = None, code: str | None = None,
                param: str | None = None, headers: Sequence[tuple[str, str]] = ()) -> Reply:
    """`{"error": {"message", "type", "code", "param"}}` with `status`."""
    error = {"message": message,
             "type": type_ or _ERROR_TYPES.get(status, "server_error" if status >= 500
                                               else "invalid_request_error"),
             "code": code, "param": param}
    return Reply(status, json.dumps({"error": error}).encode("utf-8"), [_NO_RETRY, *headers])


def failure(err: BaseException) -> Reply:
    """The OpenAI error reply for an exception raised while forwarding."""
    if isinstance(err, GatewayError):
        return err.reply()
    if isinstance(err, APITimeoutError):
        return error_reply(504, f"upstream: {err}", code="upstream_timeout")
    if isinstance(err, APIConnectionError):
        return error_reply(502, f"upstream: {err}", type_="api_connection_error",
                           code="upstream_unreachable")
    if isinstance(err, APIError):
        status = err.status_code if isinstance(err.status_code, int) else 400
        fields = (err.error_details or {}).get("error") if isinstance(
            err.error_details, dict) else None
        fields = fields if isinstance(fields, dict) else {}
        return error_reply(status, str(err), type_=_str_or_none(fields.get("type")),
                           code=_str_or_none(fields.get("code")),
                           param=_str_or_none(fields.get("param")))
    if isinstance(err, SecurityError):
        return error_reply(502, f"upstream refused by a security check: {err}",
                           type_="security_error", code="security_check_failed")
    if isinstance(err, DisposedError):
        return error_reply(503, "the proxy is shutting down", code="shutting_down")
    if isinstance(err, PackageError):
        return error_reply(502, f"upstream answer unusable: {err}", code="bad_upstream_answer")
    if isinstance(err, TypeError):  # the facade refuses a field it cannot carry
        return error_reply(400, str(err))
    if isinstance(err, NomyoError):
        return error_reply(500, f"{type(err).__name__}: {err}", code="internal_error")
    # its message (and a traceback's locals) may quote the request: type and place only
    logger.error("internal error while forwarding: %s", origin_of(err))
    return error_reply(500, f"internal error ({type(err).__name__})", code="internal_error")


def _zero(buffer: bytearray) -> None:
    with memoryview(buffer) as view:
        view[:] = bytes(len(view))


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
