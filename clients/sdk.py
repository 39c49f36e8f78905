"""Python client SDK for a specmesh router (the public `specmesh.v1.Generation` gRPC API).

    from specmesh.clients import Client

    with Client("127.0.0.1:50051") as client:
        for chunk in client.generate("def fib(n):", max_tokens=64, stop=["\\n\\n"]):
            print(chunk.text, end="", flush=True)
        done = client.complete(messages=[{"role": "user", "content": "Hi"}], max_tokens=32)
        print(done.text, done.finish_reason, done.usage.mean_accepted_tokens)

`AsyncClient` has the same methods for asyncio (`generate` is an async iterator). Failures raise a
`SpecmeshClientError` subclass carrying the gRPC status code and the router's one-line message.
This module needs only grpcio and the generated protos (no torch, no transformers).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable, Iterator, Mapping, Sequence

import grpc

from specmesh.v1 import generation_pb2, generation_pb2_grpc

_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the router's limit (services/runtime/rpc.py)
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]
_FINISH = {generation_pb2.FINISH_REASON_STOP: "stop", generation_pb2.FINISH_REASON_LENGTH: "length",
           generation_pb2.FINISH_REASON_EOS: "eos", generation_pb2.FINISH_REASON_ABORT: "abort"}

Message = Mapping[str, str] | tuple[str, str]


# ------------------------------------------------------------------------------------------ errors

class SpecmeshClientError(Exception):
    """A failed call: `code` is the grpc.StatusCode, `message` the router's one-line explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(SpecmeshClientError):
    """The request was rejected (empty prompt, max_tokens <= 0, too long for the context, ...)."""


class UnavailableError(SpecmeshClientError):
    """The router, or a service behind it, is down or unreachable."""


class ResourceExhaustedError(SpecmeshClientError):
    """No room right now (KV memory or the router's concurrency limit): retry later."""


class DeadlineExceededError(SpecmeshClientError):
    """The call's timeout passed."""


class RequestCancelledError(SpecmeshClientError):
    """The call was cancelled."""


_ERRORS: dict[grpc.StatusCode, type[SpecmeshClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
}


def _error(exc: grpc.RpcError, addr: str) -> SpecmeshClientError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    details = exc.details() if hasattr(exc, "details") else str(exc)  # type: ignore[attr-defined]
    message = (details or code.name).splitlines()[0]
    if code == grpc.StatusCode.UNAVAILABLE and message.startswith("failed to connect"):
        message = f"router at {addr} is unavailable ({message})"  # the router itself, not a service behind it
    return _ERRORS.get(code, SpecmeshClientError)(code, message)


# ------------------------------------------------------------------------------------------ results

@dataclass(frozen=True)
class Usage:
    """Token accounting of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    rounds: int  # target forwards
    mean_accepted_tokens: float  # completion tokens per target forward
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (not prefilled)


@dataclass(frozen=True)
class Chunk:
    """One streamed piece. The last chunk of a stream has `finish_reason` and `usage` set (and
    usually no text): "stop" (stop string or stop token id), "length", "eos" or "abort"."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    accepted: int = 0  # draft tokens the target accepted in this round
    tree_size: int = 0  # nodes the target verified in this round
    round: int = 0
    target_ms: float = 0.0  # the target's verification forward for this round
    finish_reason: str | None = None
    usage: Usage | None = None
    request_id: str = ""

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Completion:
    """A whole completion (what `complete` returns)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage
    request_id: str


@dataclass(frozen=True)
class PlannerReport:
    """How the draft's planner sizes subtrees. The sums run since the pair was made: the difference
    of two reports gives the means over the rounds between them (`means_since`). `subtree_size`,
    `tokens_per_round` and `round_ms` average recent rounds: the current choice."""

    active: bool  # False: the draft runs --no-plan or is not paired; every round sends max_subtree_size
    rounds: int
    subtree_size_sum: float
    tokens_per_round_sum: float  # predicted committed tokens (accepted draft tokens + the bonus)
    round_ms_sum: float  # predicted target step time
    subtree_size: float
    tokens_per_round: float
    round_ms: float
    verify_ms_by_rows: tuple[float, ...]  # the target's verify time for 1, 2, ... rows, measured at start-up

    def means_since(self, earlier: "PlannerReport | None" = None) -> tuple[int, float, float, float] | None:
        """(rounds, mean subtree size, predicted tokens per round, predicted round ms) over the rounds
        planned since `earlier` (None: since the pair was made); None if no round was planned."""
        e = earlier or PlannerReport(False, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, ())
        n = self.rounds - e.rounds
        if n <= 0:
            return None
        return (n, (self.subtree_size_sum - e.subtree_size_sum) / n,
                (self.tokens_per_round_sum - e.tokens_per_round_sum) / n, (self.round_ms_sum - e.round_ms_sum) / n)


@dataclass(frozen=True)
class Speculation:
    """The tree shape the router asks the draft for, and the planner's choice within it."""

    tree_width: int
    depth: int  # expansions per round
    max_subtree_size: int
    planner: PlannerReport | None  # None: the draft did not answer


@dataclass(frozen=True)
class ModelInfo:
    """What the router serves."""

    target_model: str
    draft_model: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    draft_connected: bool
    speculation: Speculation | None = None  # None: no draft configured


def build_request(prompt: str | None = None, *, messages: Sequence[Message] | None = None,
                  token_ids: Sequence[int] | None = None, max_tokens: int = 256, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: str | Iterable[str] = (),
                  stop_token_ids: Iterable[int] = (), ignore_eos: bool = False,
                  request_id: str = "") -> generation_pb2.GenerateRequest:
    """The GenerateRequest for these arguments (the router does all validation, except that exactly
    one of prompt / messages / token_ids may be given)."""
    given = [n for n, v in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids)) if v is not None]
    if len(given) > 1:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"set only one of prompt, messages or token_ids (got {' and '.join(given)})")
    sampling = generation_pb2.SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k)
    if seed is not None:
        sampling.seed = seed
    req = generation_pb2.GenerateRequest(
        request_id=request_id, sampling=sampling, max_tokens=max_tokens,
        stop=[stop] if isinstance(stop, str) else list(stop), stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos)
    if prompt is not None:
        req.prompt = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
        req.token_ids.SetInParent()  # an empty list is still "token_ids given" (and rejected as empty)
    elif messages is not None:
        for m in messages:
            role, content = (m["role"], m.get("content", "")) if isinstance(m, Mapping) else m
            req.messages.messages.add(role=role, content=content or "")
        req.messages.SetInParent()
    return req


def _chunk(resp: generation_pb2.GenerateResponse) -> Chunk:
    if resp.HasField("chunk"):
        c = resp.chunk
        return Chunk(text=c.text, token_ids=tuple(c.token_ids), accepted=c.accepted, tree_size=c.tree_size,
                     round=c.round, target_ms=c.target_ms)
    f = resp.final
    u = f.usage
    return Chunk(finish_reason=_FINISH.get(f.finish_reason, "unspecified"), request_id=f.request_id,
                 usage=Usage(u.prompt_tokens, u.completion_tokens, u.rounds, u.mean_accepted_tokens, u.cached_tokens))


class _Collector:
    """Accumulates chunks into a Completion."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.ids: list[int] = []
        self.final: Chunk | None = None

    def add(self, chunk: Chunk) -> None:
        self.text.append(chunk.text)
        self.ids.extend(chunk.token_ids)
        if chunk.is_final:
            self.final = chunk

    def result(self) -> Completion:
        if self.final is None:
            raise SpecmeshClientError(grpc.StatusCode.INTERNAL, "the stream ended without a final message")
        assert self.final.finish_reason is not None and self.final.usage is not None
        return Completion("".join(self.text), tuple(self.ids), self.final.finish_reason, self.final.usage,
                          self.final.request_id)


def _model_info(r: generation_pb2.ModelInfoResponse) -> ModelInfo:
    speculation = None
    if r.HasField("speculation"):
        s, p = r.speculation, r.speculation.planner
        planner = PlannerReport(p.active, p.rounds, p.subtree_size_sum, p.tokens_per_round_sum, p.round_ms_sum,
                                p.subtree_size, p.tokens_per_round, p.round_ms, tuple(p.verify_ms_by_rows)) \
            if s.HasField("planner") else None
        speculation = Speculation(s.tree_width, s.depth, s.max_subtree_size, planner)
    return ModelInfo(r.target_model, r.draft_model, r.context_length, r.vocab_size, tuple(r.eos_token_ids), r.dtype,
                     r.draft_connected, speculation)


# ------------------------------------------------------------------------------------------ clients

def _credentials(tls_ca: str | None) -> grpc.ChannelCredentials | None:
    if not tls_ca:
        return None
    try:
        with open(tls_ca, "rb") as f:
            return grpc.ssl_channel_credentials(root_certificates=f.read())
    except OSError as exc:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"cannot read the TLS CA {tls_ca}: {exc.strerror or exc}") from None


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    key = api_key if api_key is not None else os.environ.get("SPECMESH_API_KEY", "")
    return (("authorization", f"Bearer {key}"),) if key else ()


class Client:
    """Blocking client. `timeout` (seconds) bounds each call, a whole stream included; None = no limit.

    `api_key` (default: env SPECMESH_API_KEY) is sent as `authorization: Bearer <key>`; `tls_ca`,
    a PEM file, switches to TLS and verifies the router's certificate with it."""

    def __init__(self, addr: str = "127.0.0.1:50051", timeout: float | None = None, api_key: str | None = None,
                 tls_ca: str | None = None) -> None:
        self.addr = addr
        self.timeout = timeout
        credentials = _credentials(tls_ca)
        self._channel = (grpc.secure_channel(addr, credentials, options=_CHANNEL_OPTIONS) if credentials else
                         grpc.insecure_channel(addr, options=_CHANNEL_OPTIONS))
        self._metadata = _metadata(api_key)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Iterator[Chunk]:
        """Stream a completion: text chunks as the target verifies them, then one final Chunk.

        Keyword arguments are those of `build_request` (messages, token_ids, max_tokens, temperature,
        top_p, top_k, seed, stop, stop_token_ids, ignore_eos, request_id). Leaving the loop early
        cancels the request on the router.
        """
        request = build_request(prompt, **kwargs)
        call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
        try:
            for resp in call:
                yield _chunk(resp)
        except grpc.RpcError as exc:
            raise _error(exc, self.addr) from None
        finally:
            call.cancel()  # no-op when the stream is complete; frees the request when abandoned

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Generate to the end and return the whole completion (same arguments as `generate`)."""
        collector = _Collector()
        for chunk in self.generate(prompt, **kwargs):
            collector.add(chunk)
        return collector.result()

    def abort(self, request_id: str) -> bool:
        """Cancel a running request by id (its stream ends with "abort"); False if not running."""
        try:
            return self._stub.Abort(generation_pb2.AbortRequest(request_id=request_id), timeout=self.timeout,
                                    metadata=self._metadata).found
        except grpc.RpcError as exc:
            raise _error(exc, self.addr) from None

    def model_info(self) -> ModelInfo:
        """The served models, context length, vocabulary, EOS ids, whether the draft is paired, and
        the speculation shape (tree asked for, the draft planner's choice)."""
        try:
            return _model_info(self._stub.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=self.timeout,
                                        metadata=self._metadata))
        except grpc.RpcError as exc:
            raise _error(exc, self.addr) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same API as `Client` (create it inside the event loop that uses it)."""

    def __init__(self, addr: str = "127.0.0.1:50051", timeout: float | None = None, api_key: str | None = None,
                 tls_ca: str | None = None) -> None:
        self.addr = addr
        self.timeout = timeout
        credentials = _credentials(tls_ca)
        self._channel = (grpc.aio.secure_channel(addr, credentials, options=_CHANNEL_OPTIONS) if credentials else
                         grpc.aio.insecure_channel(addr, options=_CHANNEL_OPTIONS))
        self._metadata = _metadata(api_key)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    async def generate(self, prompt: str | None = None, **kwargs: Any) -> AsyncIterator[Chunk]:
        """Async iterator of Chunks (see `Client.generate`)."""
        request = build_request(prompt, **kwargs)
        call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
        try:
            async for resp in call:
                yield _chunk(resp)
        except grpc.RpcError as exc:
            raise _error(exc, self.addr) from None
        finally:
            call.cancel()

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Generate to the end and return the whole completion."""
        collector = _Collector()
        async for chunk in self.generate(prompt, **kwargs):
            collector.add(chunk)
        return collector.result()

    async def abort(self, request_id: str) -> bool:
        """Cancel a running request by id; False if not running."""
        try:
            reply = await self._stub.Abort(generation_pb2.AbortRequest(request_id=request_id), timeout=self.timeout,
                                    metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc, self.addr) from None
        return reply.found

    async def model_info(self) -> ModelInfo:
        """The served models (see `Client.model_info`)."""
        try:
            reply = await self._stub.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=self.timeout,
                                        metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc, self.addr) from None
        return _model_info(reply)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
