"""The gate every gRPC request passes before a servicer sees it: decodable, and allowed.

- Decoding: a message that does not parse (garbage bytes, invalid UTF-8 in a string field) is
  INVALID_ARGUMENT naming the method, instead of grpc's UNKNOWN "Exception deserializing request".
- Access: internal services require the mesh's shared secret in the `x-specmesh-secret` metadata;
  the router's public port, when API keys are set, requires `authorization: Bearer <key>`, as the
  OpenAI clients send it. Health checking stays open, for probes.

Only unary-request methods are guarded (every specmesh method is one); the reflection service's
own stream is passed through untouched.
"""
from __future__ import annotations

import hmac
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import grpc

SECRET_METADATA = "x-specmesh-secret"
OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # probes carry no credentials


@dataclass(frozen=True)
class Access:
    """What a server demands of its callers (nothing, by default)."""

    secret: str = ""  # internal: the mesh's shared secret
    api_keys: frozenset[str] = frozenset()  # public: any of these as a bearer token

    def refusal(self, metadata: Any) -> str | None:
        """Why a call with this metadata is refused, or None if it is let in."""
        values = dict(metadata or ())
        if self.secret and not hmac.compare_digest(str(values.get(SECRET_METADATA, "")).encode(),
                                                   self.secret.encode()):
            return f"missing or wrong {SECRET_METADATA} metadata (the mesh's shared secret)"
        if self.api_keys and bearer_token(metadata) not in self.api_keys:
            return "missing or wrong API key (send authorization: Bearer <key>)"
        return None


def bearer_token(metadata: Any) -> str:
    """The token of an `authorization: Bearer <token>` entry ('' if none)."""
    value = str(dict(metadata or ()).get("authorization", ""))
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Undecodable:
    """Stands in for a request message that failed to parse, so the handler can refuse it."""

    def __init__(self, error: Exception) -> None:
        self.reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'cannot parse'}"


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or anything a broken message makes the parser raise
            return Undecodable(exc)

    return parse


class Guard(grpc.aio.ServerInterceptor):
    """The server interceptor enforcing `access` and refusing undecodable messages.

    `on_refused(code_name)` is told about every refusal (the router counts them)."""

    def __init__(self, access: Access, on_refused: Callable[[str], None] | None = None) -> None:
        self.access = access
        self.on_refused = on_refused or (lambda code: None)

    async def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or details.method.startswith(OPEN_SERVICES):
            return handler
        denied = self.access.refusal(details.invocation_metadata)
        method = details.method

        async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
            if denied is not None:
                self.on_refused("UNAUTHENTICATED")
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, denied)
            if isinstance(request, Undecodable):
                self.on_refused("INVALID_ARGUMENT")
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the request message does not "
                                                                      f"parse ({request.reason})")

        if handler.response_streaming:
            inner = handler.unary_stream
            if inspect.isasyncgenfunction(inner):
                async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    await check(request, context)
                    async for reply in inner(request, context):
                        yield reply
            else:  # a handler that writes with context.write
                async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
                    await check(request, context)
                    return await inner(request, context)
            return handler._replace(request_deserializer=_tolerant(handler.request_deserializer),
                                    unary_stream=unary_stream)
        inner_unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(request, context)
            return await inner_unary(request, context)

        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer), unary_unary=unary_unary)
