"""A generation request, whichever front door it came through (gRPC or HTTP), and its validation.

`GenRequest` is the framework-neutral form; `prepare()` checks it and tokenizes it into a
`Prepared` request the pipeline runs. Every problem is an `InvalidRequest` whose message names it.
"""
from __future__ import annotations

import unicodedata
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from specmesh.v1 import generation_pb2

from ..runtime.request import Request
from ..runtime.errors import InvalidRequest
from ..runtime.sampling import SamplingParams


@dataclass
class GenRequest:
    """What the client asked for. Exactly one of prompt / token_ids / messages should be set."""

    request_id: str = ""
    prompt: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None  # None: the rest of the context (OpenAI chat without max_tokens)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class Limits:
    """What the router accepts (from RouterConfig and the model)."""

    max_context: int
    vocab_size: int
    max_stop_strings: int
    max_stop_len: int
    max_token_chars: int = 1  # ModelMeta.max_token_chars: bounds the text that can fit the context


@dataclass
class Prepared:
    """A validated, tokenized request."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    user_stop_ids: list[int]
    eos_ids: list[int]  # the EOS ids the router adds as stop ids ([] with ignore_eos)
    owner: str = ""  # the API key that sent it ('' when keys are off): only it may Abort the request

    @property
    def stop_token_ids(self) -> list[int]:
        """Everything the target must stop on: the user's ids, then the added EOS ids."""
        return list(dict.fromkeys([*self.user_stop_ids, *self.eos_ids]))


def from_proto(msg: generation_pb2.GenerateRequest) -> GenRequest:
    """The public gRPC message -> GenRequest (no checks yet; `prepare` does them)."""
    which = msg.WhichOneof("input")
    s = msg.sampling
    return GenRequest(
        request_id=msg.request_id,
        prompt=msg.prompt if which == "prompt" else None,
        token_ids=list(msg.token_ids.ids) if which == "token_ids" else None,
        messages=[{"role": m.role, "content": m.content} for m in msg.messages.messages]
        if which == "messages" else None,
        max_tokens=msg.max_tokens,
        temperature=s.temperature, top_p=s.top_p if s.HasField("top_p") else 1.0, top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
    )


def prepare(req: GenRequest, tokenizer: Any, limits: Limits, eos_ids: Sequence[int]) -> Prepared:
    """Validate and tokenize; raises InvalidRequest naming the first problem found.

    Cheap checks come first so a bad request never pays for tokenization.
    """
    given = [name for name, value in (("prompt", req.prompt), ("token_ids", req.token_ids),
                                      ("messages", req.messages)) if value is not None]
    if not given:
        raise InvalidRequest("no input: set one of prompt, token_ids or messages")
    if len(given) > 1:
        raise InvalidRequest(f"set only one of prompt, token_ids or messages (got {' and '.join(given)})")
    if req.max_tokens is not None and req.max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be > 0, got {req.max_tokens}")
    _check_request_id(req.request_id)
    # top_p 0 is refused (SamplingParams: it must be in (0, 1]), never read as "off".
    sampling = SamplingParams(temperature=float(req.temperature), top_p=float(req.top_p),
                              top_k=int(req.top_k), seed=req.seed)
    if req.seed is not None and not 0 <= req.seed < 2 ** 64:
        raise InvalidRequest(f"seed must be in [0, 2^64), got {req.seed}")
    _check_stops(req.stop, limits)
    _check_ids("stop_token_ids", req.stop_token_ids, limits.vocab_size)

    prompt_ids = _tokenize(req, tokenizer, limits)
    max_tokens = req.max_tokens if req.max_tokens is not None else limits.max_context - len(prompt_ids)
    if max_tokens <= 0:
        raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) leaves no room in the context length "
                             f"({limits.max_context})")
    Request(prompt_ids, max_tokens, sampling).validate(limits.max_context)  # empty / too long for the context
    return Prepared(request_id=req.request_id or uuid.uuid4().hex, prompt_ids=prompt_ids, max_tokens=max_tokens,
                    sampling=sampling, stop=list(dict.fromkeys(req.stop)),
                    user_stop_ids=list(dict.fromkeys(int(t) for t in req.stop_token_ids)),
                    eos_ids=[] if req.ignore_eos else list(eos_ids))


MAX_REQUEST_ID_CHARS = 256


def _check_request_id(request_id: str) -> None:
    """Ids end up in logs, metrics and other services: printable text of bounded length only."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id is too long: {len(request_id)} characters (at most {MAX_REQUEST_ID_CHARS})")
    bad = next((c for c in request_id if unicodedata.category(c)[0] in "CZ" and c != " "), None)
    if bad is not None:
        raise InvalidRequest(f"request_id must not contain control or separator characters (found {bad!r})")


def _check_length(text_chars: int, what: str, limits: Limits) -> None:
    """Refuse text that cannot fit the context before paying for its tokenization."""
    most = limits.max_context * limits.max_token_chars
    if text_chars > most:
        raise InvalidRequest(f"{what} is too long: {text_chars} characters cannot fit the context length "
                             f"({limits.max_context} tokens of at most {limits.max_token_chars} characters)")


def _check_stops(stops: Sequence[str], limits: Limits) -> None:
    if len(stops) > limits.max_stop_strings:
        raise InvalidRequest(f"too many stop strings: {len(stops)} (at most {limits.max_stop_strings})")
    for s in stops:
        if not s:
            raise InvalidRequest("stop strings must not be empty")
        if len(s) > limits.max_stop_len:
            raise InvalidRequest(f"stop string too long: {len(s)} characters (at most {limits.max_stop_len})")


def _check_ids(what: str, ids: Sequence[int], vocab_size: int) -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise InvalidRequest(f"{what} contains {t}, outside the vocabulary [0, {vocab_size})")


def _tokenize(req: GenRequest, tokenizer: Any, limits: Limits) -> list[int]:
    if req.token_ids is not None:
        if not req.token_ids:
            raise InvalidRequest("token_ids is empty")
        _check_ids("token_ids", req.token_ids, limits.vocab_size)
        return [int(t) for t in req.token_ids]
    if req.prompt is not None:
        if not req.prompt:
            raise InvalidRequest("prompt is empty")
        _check_length(len(req.prompt), "prompt", limits)
        # add_special_tokens=True adds what the model expects in front of raw text: nothing for Qwen
        # (no BOS), <s> / <|begin_of_text|> for Llama.
        return _encode(tokenizer, req.prompt, "prompt", add_special_tokens=True)
    assert req.messages is not None
    if not req.messages:
        raise InvalidRequest("messages is empty")
    for i, m in enumerate(req.messages):
        if not m.get("role"):
            raise InvalidRequest(f"messages[{i}] has no role")
    _check_length(sum(len(m.get("content") or "") for m in req.messages), "messages", limits)
    try:
        # Render to text, then encode without specials: the template already wrote BOS if any.
        text = tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises its own types (TemplateError, TypeError, ...)
        raise InvalidRequest(f"cannot apply the chat template to messages: {exc}") from None
    return _encode(tokenizer, text, "messages", add_special_tokens=False)


def _encode(tokenizer: Any, text: str, what: str, add_special_tokens: bool) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    except (TypeError, ValueError, UnicodeError) as exc:  # e.g. lone surrogates from a JSON "\ud800"
        raise InvalidRequest(f"cannot tokenize the {what}: {exc}") from None
