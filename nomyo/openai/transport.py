"""httpx transports that answer the openai SDK's requests through our client, in process.

    client = SecureChatCompletion(base_url="https://api.nomyo.ai")
    OpenAI(base_url="http://nomyo.invalid/v1", api_key="unused",
           http_client=httpx.Client(transport=NomyoTransport(client)))

The SDK's URL only picks the route (/v1/chat/completions, /v1/models); the request goes end to
end encrypted to the client's endpoint. httpx comes with the `openai` extra and is imported
only by this module.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from nomyo.openai.gateway import Call, Gateway, Reply


def _request_parts(request: httpx.Request, body: bytes) -> tuple[str, str, dict[str, str],
                                                                 bytearray]:
    box = bytearray(body)
    return request.method, request.url.path, {k.lower(): v for k, v in request.headers.items()}, box


def _response(reply: Reply, request: httpx.Request) -> httpx.Response:
    return httpx.Response(reply.status, headers=[("content-type", reply.content_type),
                                                 *reply.headers],
                          content=reply.body, request=request)


class _Base:
    def __init__(self, client: Any, *, security_tier: str | None = None,
                 models: Sequence[str] = ()) -> None:
        self.client = client  # a nomyo SecureChatCompletion; the caller closes it
        self.security_tier = security_tier
        self.gateway = Gateway(models=models)

    def _route(self, request: httpx.Request, body: bytes) -> Reply | Call:
        return self.gateway.route(*_request_parts(request, body))

    def _answer(self, call: Call, request: httpx.Request, answer: Any,
                error: Exception | None) -> httpx.Response:
        """A failure reaches the SDK as an OpenAI error body (Gateway.answer)."""
        return _response(self.gateway.answer(call, answer, error), request)


class NomyoTransport(_Base, httpx.BaseTransport):
    """Synchronous transport for `httpx.Client` (and so `openai.OpenAI`)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        routed = self._route(request, request.read())
        if not isinstance(routed, Call):
            return _response(routed, request)
        try:
            answer = self.client.create_sync(**routed.arguments(),
                                             security_tier=self.security_tier)
        except Exception as err:  # every failure reaches the SDK as an OpenAI error
            return self._answer(routed, request, None, err)
        return self._answer(routed, request, answer, None)


class AsyncNomyoTransport(_Base, httpx.AsyncBaseTransport):
    """Asynchronous transport for `httpx.AsyncClient` (and so `openai.AsyncOpenAI`)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        routed = self._route(request, await request.aread())
        if not isinstance(routed, Call):
            return _response(routed, request)
        try:
            answer = await self.client.create(**routed.arguments(),
                                              security_tier=self.security_tier)
        except Exception as err:  # every failure reaches the SDK as an OpenAI error
            return self._answer(routed, request, None, err)
        return self._answer(routed, request, answer, None)
