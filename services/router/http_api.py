"""OpenAI-style HTTP beside the gRPC API (aiohttp, on the router's event loop).

    POST /v1/completions        prompt (str | [int] | [str] | [[int]] with one element)
    POST /v1/chat/completions   messages
    GET  /v1/models, GET /v1/models/{id}, GET /health

Model entries carry a `specmesh` key: the draft, whether it is paired, and the speculation shape
(tree width, depth, max subtree size, and the draft planner's current choice), as in ModelInfo.

Bodies are validated by the pydantic models of openai_schema.py: unknown fields and parameters
specmesh cannot honour are refused, never ignored. `model` must be the target's name or one of
--served-model-names (absent = the target); anything else is 404 model_not_found, as OpenAI
answers. Defaults are OpenAI's (temperature 1, max_tokens 16 for completions) except chat without
max_tokens, which gets --default-max-tokens (so it does not reserve KV for the whole context).
Errors are {"error": {"message", "type", "code", "param"}} with 400 (bad input), 404 (unknown
model), 429 (admission), 503 (a service down). Every request runs through the same
Router.prepare / Router.generate as gRPC.
"""
from __future__ import annotations

import contextlib
import json
import logging
import ssl
import time
import uuid
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from specmesh.v1 import generation_pb2

from ..runtime.errors import NotFound, SpecmeshError
from ..runtime.guard import bearer_token
from . import metrics
from .openai_schema import ChatBody, CompletionBody, parse_body
from .output import ChunkEvent, FinalEvent, Usage
from .pipeline import Event, Router
from .request import GenRequest

log = logging.getLogger("specmesh.router.http")

ROUTER_KEY = web.AppKey("router", Router)
STATUS = {"INVALID_ARGUMENT": (400, "invalid_request_error"), "NOT_FOUND": (404, "not_found_error"),
          "RESOURCE_EXHAUSTED": (429, "rate_limit_error"), "UNAVAILABLE": (503, "service_unavailable"),
          "DEADLINE_EXCEEDED": (504, "timeout"), "CANCELLED": (499, "cancelled")}
FINISH = {"stop": "stop", "eos": "stop", "length": "length", "abort": "abort"}


class ModelNotFound(NotFound):
    """A `model` the router does not serve (OpenAI's 404 model_not_found)."""

    openai_code = "model_not_found"
    openai_type = "invalid_request_error"


def specmesh_fields(info: generation_pb2.ModelInfoResponse) -> dict[str, Any]:
    """ModelInfo's specmesh-specific part of a model entry: the draft and the speculation shape."""
    out: dict[str, Any] = {"draft_model": info.draft_model, "draft_connected": info.draft_connected}
    if info.HasField("speculation"):
        s = info.speculation
        shape: dict[str, Any] = {"tree_width": s.tree_width, "depth": s.depth, "max_subtree_size": s.max_subtree_size}
        if s.HasField("planner"):
            p = s.planner
            shape["planner"] = {"active": p.active, "rounds": p.rounds, "subtree_size": round(p.subtree_size, 3),
                                "tokens_per_round": round(p.tokens_per_round, 3), "round_ms": round(p.round_ms, 3),
                                "verify_ms_by_rows": [round(ms, 3) for ms in p.verify_ms_by_rows]}
        out["speculation"] = shape
    return out


def error_body(exc: SpecmeshError) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI-style error object) for a SpecmeshError."""
    status, kind = STATUS.get(exc.grpc_code_name, (500, "internal_error"))
    code = getattr(exc, "openai_code", exc.grpc_code_name.lower())
    return status, {"error": {"message": str(exc), "type": getattr(exc, "openai_type", kind), "code": code,
                              "param": None}}


def error_response(exc: SpecmeshError) -> web.Response:
    status, body = error_body(exc)
    return web.json_response(body, status=status)


# ------------------------------------------------------------------------------- responses

def _usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},  # OpenAI's shape
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
        return await self._generate(request, _Kind(chat=False),
                                    lambda raw: parse_body(CompletionBody, raw))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, _Kind(chat=True), lambda raw: parse_body(ChatBody, raw))

    def _model(self, name: str, extra: dict[str, Any]) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "specmesh",
                "max_model_len": self.router.meta.context_length, "specmesh": extra}

    async def models(self, request: web.Request) -> web.Response:
        extra = specmesh_fields(await self.router.model_info())
        return web.json_response({"object": "list", "data": [self._model(n, extra) for n in self.router.model_names]})

    async def model(self, request: web.Request) -> web.Response:
        try:
            name = self._resolve(request.match_info["model"])
        except SpecmeshError as exc:
            return error_response(exc)
        return web.json_response(self._model(name, specmesh_fields(await self.router.model_info())))

    def _resolve(self, model: str | None) -> str:
        """The served name a request's `model` names (absent = the target); ModelNotFound otherwise."""
        if model is None:
            return self.router.meta.target_name
        if model not in self.router.model_names:
            shown = model[:200] if model.isprintable() else json.dumps(model[:200])
            raise ModelNotFound(f"The model `{shown}` does not exist (served: "
                                f"{', '.join(self.router.model_names)})")
        return model

    async def health(self, request: web.Request) -> web.Response:
        """draft_connected: some pair speculates; pairs: each pair's target reachability and pairing."""
        pairings = self.router.pairings
        body = {"draft_connected": pairings.any_connected, "pairs": pairings.status()}
        if self.router.drain.draining:  # load balancers stop sending; running streams finish
            return web.json_response({"status": "draining", **body}, status=503)
        return web.json_response({"status": "ok", **body})

    async def _generate(self, request: web.Request, kind: _Kind,
                        parse: Callable[[bytes], CompletionBody | ChatBody]) -> web.StreamResponse:
        try:
            try:
                body = parse(await request.read())
                model = self._resolve(body.model)
                gen: GenRequest = (body.to_gen_request(self.router.config.default_max_tokens or None)
                                   if isinstance(body, ChatBody) else body.to_gen_request())
            except SpecmeshError as exc:
                metrics.ERRORS.labels(exc.grpc_code_name).inc()
                raise
            if not gen.request_id:
                gen.request_id = uuid.uuid4().hex
            prepared = await self.router.prepare_async(gen)
            prepared.owner = _bearer(request) if self.router.api_keys else ""
        except SpecmeshError as exc:
            return error_response(exc)
        meta = {"id": kind.prefix + prepared.request_id, "created": int(time.time()), "model": model}
        async with contextlib.aclosing(self.router.generate(prepared)) as events:
            try:
                first = await anext(events)  # errors before the first event still get a real HTTP status
            except SpecmeshError as exc:
                return error_response(exc)
            if body.stream:
                usage = body.stream_options is None or body.stream_options.include_usage
                return await self._stream(request, kind, meta, first, events, usage)
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
                      events: AsyncIterator[Event], include_usage: bool) -> web.StreamResponse:
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
                        **({"usage": _usage(event.usage)} if include_usage else {})})
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


def _bearer(request: web.Request) -> str:
    return bearer_token([("authorization", request.headers.get("Authorization", ""))])


def api_key_check(keys: frozenset[str]) -> Callable[..., Any]:
    """Middleware: /v1/* needs `Authorization: Bearer <one of keys>` (401 invalid_api_key otherwise)."""

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        if request.path.startswith("/v1/") and _bearer(request) not in keys:
            metrics.ERRORS.labels("UNAUTHENTICATED").inc()
            return web.json_response({"error": {"message": "Incorrect or missing API key (send Authorization: "
                                                "Bearer <key>)", "type": "invalid_request_error",
                                                "code": "invalid_api_key", "param": None}}, status=401)
        return await handler(request)

    return check


def make_app(router: Router) -> web.Application:
    """The aiohttp application (exposed for tests)."""
    api = HttpApi(router)
    middlewares = [json_errors, *([api_key_check(router.api_keys)] if router.api_keys else [])]
    app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=middlewares)
    app[ROUTER_KEY] = router
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/v1/models/{model}", api.model)
    app.router.add_get("/health", api.health)
    return app


async def start_http(router: Router, host: str, port: int, shutdown_s: float = 5.0,
                     ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve the HTTP API on host:port (0 = a free port; HTTPS with ssl_context); returns the runner
    (cleanup() stops it, giving running requests `shutdown_s`) and the bound port."""
    # handler_cancellation: a client that hangs up cancels its handler, which runs the request's
    # cleanup at once instead of generating for nobody.
    runner = web.AppRunner(make_app(router), handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    return runner, runner.addresses[0][1]
