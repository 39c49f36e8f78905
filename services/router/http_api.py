"""OpenAI-style HTTP beside the gRPC API (aiohttp, on the router's event loop).

    POST /v1/completions        prompt (str | [int] | [str] | [[int]] with one element)
    POST /v1/chat/completions   messages
    GET  /v1/models, GET /health

Request fields: model (echoed), max_tokens (max_completion_tokens for chat), temperature, top_p,
seed, stop (str or list), stream, n (1 only), and the extensions top_k, ignore_eos, stop_token_ids,
request_id (so gRPC Abort can reach an HTTP request). Defaults are OpenAI's: temperature 1,
max_tokens 16 for completions and "the rest of the context" for chat. Errors are
{"error": {"message", "type", "code"}} with 400 (bad input), 429 (admission), 503 (a service down).
Every request runs through the same Router.prepare / Router.generate as gRPC.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from ..runtime.errors import InvalidRequest, SpecmeshError
from .output import ChunkEvent, FinalEvent, Usage
from .pipeline import Event, Router
from .request import GenRequest

log = logging.getLogger("specmesh.router.http")

ROUTER_KEY = web.AppKey("router", Router)
STATUS = {"INVALID_ARGUMENT": (400, "invalid_request_error"), "NOT_FOUND": (404, "not_found_error"),
          "RESOURCE_EXHAUSTED": (429, "rate_limit_error"), "UNAVAILABLE": (503, "service_unavailable"),
          "DEADLINE_EXCEEDED": (504, "timeout"), "CANCELLED": (499, "cancelled")}
FINISH = {"stop": "stop", "eos": "stop", "length": "length", "abort": "abort"}


def error_body(exc: SpecmeshError) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI-style error object) for a SpecmeshError."""
    status, kind = STATUS.get(exc.grpc_code_name, (500, "internal_error"))
    return status, {"error": {"message": str(exc), "type": kind, "code": exc.grpc_code_name.lower(), "param": None}}


def error_response(exc: SpecmeshError) -> web.Response:
    status, body = error_body(exc)
    return web.json_response(body, status=status)


# ------------------------------------------------------------------------------- request parsing

_KINDS: dict[Any, str] = {int: "an integer", str: "a string", bool: "a boolean", list: "a list",
                         (int, float): "a number"}


def _get(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """body[name] checked against kind; default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, but JSON true is not a number.
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise InvalidRequest(f"{name} must be {_KINDS.get(kind, str(kind))}, got {json.dumps(value)[:80]}")
    return value


def _int_list(body: dict[str, Any], name: str) -> list[int]:
    value = _get(body, name, list, [])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InvalidRequest(f"{name} must be a list of integers")
    return value


def _common(body: dict[str, Any], default_max_tokens: int | None, max_tokens_names: tuple[str, ...]) -> GenRequest:
    if _get(body, "n", int, 1) != 1:
        raise InvalidRequest("only n=1 is supported")
    for name in ("logprobs", "top_logprobs", "echo", "tools", "suffix"):
        if body.get(name):  # silently ignoring these would hand back something else than asked for
            raise InvalidRequest(f"{name} is not supported")
    max_tokens = default_max_tokens
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens = _get(body, name, int, None)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = stop
    else:
        raise InvalidRequest("stop must be a string or a list of strings")
    seed = _get(body, "seed", int, None)
    return GenRequest(
        request_id=_get(body, "request_id", str, ""), max_tokens=max_tokens,
        temperature=float(_get(body, "temperature", (int, float), 1.0)),
        top_p=float(_get(body, "top_p", (int, float), 1.0)), top_k=_get(body, "top_k", int, 0),
        seed=seed, stop=stops, stop_token_ids=_int_list(body, "stop_token_ids"),
        ignore_eos=_get(body, "ignore_eos", bool, False))


def parse_completion(body: dict[str, Any]) -> GenRequest:
    """A /v1/completions body -> GenRequest (raises InvalidRequest)."""
    req = _common(body, 16, ("max_tokens",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if prompt is None:
        raise InvalidRequest("no input: set prompt")
    if isinstance(prompt, str):
        req.prompt = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        req.token_ids = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidRequest(f"only one prompt per request is supported, got {len(prompt)}")
    else:
        raise InvalidRequest("prompt must be a string or a list of token ids")
    return req


def parse_chat(body: dict[str, Any]) -> GenRequest:
    """A /v1/chat/completions body -> GenRequest (raises InvalidRequest)."""
    req = _common(body, None, ("max_tokens", "max_completion_tokens"))
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("no input: set messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages must be a list")
    req.messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with role and content")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        elif content is not None and not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string")
        role = m.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(f"messages[{i}] has no role")
        req.messages.append({"role": role, "content": content or ""})
    return req


# ------------------------------------------------------------------------------- responses

def _usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "rounds": u.rounds, "mean_accepted_tokens": round(u.mean_accepted_tokens, 4)}


class _Kind:
    """What differs between /v1/completions and /v1/chat/completions."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.prefix = "chatcmpl-" if chat else "cmpl-"
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def stream_choice(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def full_choice(self, text: str, finish: str) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


class HttpApi:
    """The aiohttp handlers over one Router."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.created = int(time.time())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, _Kind(chat=False), parse_completion)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, _Kind(chat=True), parse_chat)

    async def models(self, request: web.Request) -> web.Response:
        meta = self.router.meta
        return web.json_response({"object": "list", "data": [
            {"id": meta.target_name, "object": "model", "created": self.created, "owned_by": "specmesh",
             "max_model_len": meta.context_length}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "draft_connected": self.router.pairing.connected})

    async def _generate(self, request: web.Request, kind: _Kind,
                        parse: Callable[[dict[str, Any]], GenRequest]) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(InvalidRequest("request body is not valid JSON"))
        try:
            if not isinstance(body, dict):
                raise InvalidRequest("request body must be a JSON object")
            stream = _get(body, "stream", bool, False)
            gen = parse(body)
            if not gen.request_id:
                gen.request_id = uuid.uuid4().hex
            prepared = await self.router.prepare_async(gen)
        except SpecmeshError as exc:
            return error_response(exc)
        model = body.get("model") if isinstance(body.get("model"), str) else self.router.meta.target_name
        meta = {"id": kind.prefix + prepared.request_id, "created": int(time.time()), "model": model}
        async with contextlib.aclosing(self.router.generate(prepared)) as events:
            try:
                first = await anext(events)  # errors before the first event still get a real HTTP status
            except SpecmeshError as exc:
                return error_response(exc)
            if stream:
                return await self._stream(request, kind, meta, first, events)
            return await self._collect(kind, meta, first, events)

    async def _collect(self, kind: _Kind, meta: dict[str, Any], first: Event,
                       events: AsyncIterator[Event]) -> web.Response:
        parts: list[str] = []
        event: Event = first
        try:
            while isinstance(event, ChunkEvent):
                parts.append(event.text)
                event = await anext(events)
        except SpecmeshError as exc:
            return error_response(exc)
        assert isinstance(event, FinalEvent)
        return web.json_response({**meta, "object": kind.object,
                                  "choices": [kind.full_choice("".join(parts), FINISH[event.finish_reason])],
                                  "usage": _usage(event.usage)})

    async def _stream(self, request: web.Request, kind: _Kind, meta: dict[str, Any], first: Event,
                      events: AsyncIterator[Event]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)

        async def send(payload: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")

        base = {**meta, "object": kind.chunk_object}
        event: Event = first
        try:
            if kind.chat:  # OpenAI opens a chat stream with the assistant role
                await send({**base, "choices": [kind.stream_choice(None, None, first=True)]})
            while isinstance(event, ChunkEvent):
                if event.text:
                    await send({**base, "choices": [kind.stream_choice(event.text, None)]})
                event = await anext(events)
            assert isinstance(event, FinalEvent)
            await send({**base, "choices": [kind.stream_choice(None, FINISH[event.finish_reason])],
                        "usage": _usage(event.usage)})
            await resp.write(b"data: [DONE]\n\n")
        except SpecmeshError as exc:
            await send(error_body(exc)[1])
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:  # the client hung up; leaving here closes the request's stream
            return resp
        await resp.write_eof()
        return resp


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Every error is OpenAI-style JSON: aiohttp's own (404, 405, 413) and bugs (500) too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return web.json_response({"error": {"message": f"{exc.reason}: {request.method} {request.path}"
                                            if exc.status in (404, 405) else exc.text or exc.reason,
                                            "type": "invalid_request_error", "code": code, "param": None}},
                                 status=exc.status)
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": {"message": f"internal error in the router: {type(exc).__name__}: {exc}",
                                            "type": "internal_error", "code": "internal", "param": None}},
                                 status=500)


def make_app(router: Router) -> web.Application:
    """The aiohttp application (exposed for tests)."""
    api = HttpApi(router)
    app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=[json_errors])
    app[ROUTER_KEY] = router
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/health", api.health)
    return app


async def start_http(router: Router, host: str, port: int, shutdown_s: float = 5.0) -> tuple[web.AppRunner, int]:
    """Serve the HTTP API on host:port (0 = a free port); returns the runner (cleanup() stops it,
    giving running requests `shutdown_s`) and the bound port."""
    # handler_cancellation: a client that hangs up cancels its handler, which runs the request's
    # cleanup at once instead of generating for nobody.
    runner = web.AppRunner(make_app(router), handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]
