"""`nomyo proxy`'s ASGI application: the OpenAI routes, forwarded through our async client.

granian (the `server` extra) runs it through `nomyo.server.production`, as `nomyo serve` runs
its app. The client (and its key pair) is made in the worker process on first use, never in
the parent, so no key crosses a fork.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from nomyo.openai.gateway import Call, Gateway, Reply, error_reply, failure

MAX_HEAD_BODY_WAIT = 30.0


class ProxyApp:
    """ASGI 3 application: `gateway` judges, a client made by `make_client` forwards."""

    def __init__(self, gateway: Gateway, make_client: Callable[[], Any], *,
                 security_tier: str | None = None, body_timeout: float = MAX_HEAD_BODY_WAIT
                 ) -> None:
        self.gateway = gateway
        self.make_client = make_client
        self.security_tier = security_tier
        self.body_timeout = body_timeout
        self._client: Any = None

    def client(self) -> Any:
        """The forwarding `SecureChatCompletion`, made on first use in this process."""
        if self._client is None:
            self._client = self.make_client()
        return self._client

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.client()  # key generation starts before the first request
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._client is not None:
                        self._client.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "http":
            await self._send(send, await self._http(scope, receive))

    async def _http(self, scope: dict[str, Any], receive: Any) -> Reply:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                   for name, value in scope["headers"]}
        try:
            body = await asyncio.wait_for(self._body(receive), self.body_timeout)
        except asyncio.TimeoutError:
            return error_reply(408, "request body not received in time", code="timeout")
        except ValueError as err:
            return error_reply(413, str(err))
        routed = self.gateway.route(scope["method"], scope.get("path") or "/", headers, body)
        if isinstance(routed, Reply):
            return routed
        return await self.forward(routed)

    async def forward(self, call: Call) -> Reply:
        """Send `call` through the client; any failure becomes an OpenAI error reply."""
        try:
            response = await self.client().create(**call.arguments(),
                                                  security_tier=self.security_tier)
        except Exception as err:  # every failure reaches the caller as an OpenAI error
            return failure(err)
        finally:
            call.wipe()
        return self.gateway.finish(call, response)

    async def _body(self, receive: Any) -> bytearray:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            body += message.get("body", b"")
            if len(body) > self.gateway.max_body_bytes:
                body[:] = bytes(len(body))
                raise ValueError(f"request body larger than {self.gateway.max_body_bytes} bytes")
            if not message.get("more_body", False):
                break
        return body

    @staticmethod
    async def _send(send: Any, reply: Reply) -> None:
        headers = [(b"content-type", reply.content_type.encode("latin-1")),
                   (b"content-length", str(len(reply.body)).encode("ascii")),
                   *((k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers)]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body, "more_body": False})
