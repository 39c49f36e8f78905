"""The OpenAI-style HTTP request bodies as pydantic models, and their translation to GenRequest.

Validation is strict (JSON true is not a number, "5" is not an integer) and closed: an unknown
field is refused, never ignored. Fields OpenAI defines that specmesh cannot honour losslessly are
accepted only at their no-op value (presence_penalty 0, best_of 1, logit_bias {}, ...) and refused
otherwise. pydantic's JSON parser (jiter) bounds nesting depth, so a deeply nested body is a 400,
not a RecursionError.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..runtime.errors import InvalidRequest
from .request import GenRequest

INT32 = 2 ** 31
Int32 = Annotated[int, Field(ge=-INT32, lt=INT32)]
NonNegInt32 = Annotated[int, Field(ge=0, lt=INT32)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = True  # false: the final chunk carries no usage


class ResponseFormat(_Strict):
    type: str
    json_schema: Any = None


class _Common(_Strict):
    """Fields both endpoints share. Defaults are OpenAI's."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Annotated[int, Field(ge=0, lt=2 ** 64)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None  # an end-user id for the operator's logs; nothing to honour
    # Accepted at their no-op value only (they change the distribution; draft and target would
    # both have to apply them for speculation to stay lossless).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # Not supported at all; any value but the default is refused.
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    # specmesh extensions
    top_k: NonNegInt32 | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Int32] | None = None
    request_id: str | None = None

    def refuse_unsupported(self) -> None:
        """InvalidRequest naming the first field set to something specmesh would not honour."""
        if self.n not in (None, 1):
            raise InvalidRequest(f"n: only n=1 is supported, got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequest(f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported (only {})")
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequest(f"response_format {self.response_format.type!r} is not supported (only 'text')")
        for name in ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
                     "parallel_tool_calls"):
            if getattr(self, name) not in (None, False, [], 0):
                raise InvalidRequest(f"{name} is not supported")

    def gen_request(self, max_tokens: int | None) -> GenRequest:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenRequest(
            request_id=self.request_id or "", max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, seed=self.seed,
            stop=stop, stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos)


class CompletionBody(_Common):
    """POST /v1/completions."""

    prompt: str | list[Int32] | list[str] | list[list[Int32]]
    max_tokens: int | None = None
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None

    def to_gen_request(self) -> GenRequest:
        self.refuse_unsupported()
        if self.best_of not in (None, 1):
            raise InvalidRequest(f"best_of: only best_of=1 is supported, got {self.best_of}")
        if self.echo:
            raise InvalidRequest("echo is not supported")
        if self.suffix:
            raise InvalidRequest("suffix is not supported")
        req = self.gen_request(16 if self.max_tokens is None else self.max_tokens)
        prompt: Any = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequest(f"only one prompt per request is supported, got {len(prompt)}")
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            req.prompt = prompt
        else:
            req.token_ids = list(prompt)
        return req


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None


class ChatBody(_Common):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None

    def to_gen_request(self, default_max_tokens: int | None) -> GenRequest:
        """default_max_tokens: what a request without max_tokens gets (None: the rest of the context)."""
        self.refuse_unsupported()
        given = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        req = self.gen_request(default_max_tokens if given is None else given)
        req.messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                         "".join(p.text for p in m.content or [])} for m in self.messages]
        return req


# Fields whose type is a union: when no alternative gets anywhere, one hint reads better than
# pydantic's one error per alternative.
_UNION_HINTS = {"stop": "must be a string or a list of strings",
                "prompt": "must be a string, a list of token ids, or a list with one of those",
                "content": 'must be a string or a list of text parts ({"type": "text", "text": ...})'}
_FIELDS = {name for cls in (CompletionBody, ChatBody, ChatMessage, TextPart, StreamOptions, ResponseFormat)
           for name in cls.model_fields}


def validation_message(err: ValidationError) -> str:
    """One line naming the field at fault, e.g. 'messages[0].content[0].text: Input should be ...'."""
    errors = err.errors(include_url=False)
    if errors[0]["type"] == "json_invalid":
        return f"request body is not valid JSON: {errors[0].get('ctx', {}).get('error', errors[0]['msg'])}"
    if not errors[0]["loc"]:
        return "request body must be a JSON object"
    best = max(errors, key=lambda e: len(e["loc"]))  # inside the union alternative that got furthest
    path, name = "", ""
    for part in best["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _FIELDS or best["type"] == "extra_forbidden":  # an unknown name is quoted, escaped
            path += ("." if path else "") + (part if part.isidentifier() else json.dumps(part)[:60])
            name = part
    if best["loc"][-1] not in _FIELDS and not isinstance(best["loc"][-1], int) and name in _UNION_HINTS:
        return f"{path} {_UNION_HINTS[name]}"  # the value matched no alternative at all
    if best["type"] == "missing":
        return f"{path} is required"
    if best["type"] == "extra_forbidden":
        return f"{path} is not a known field"
    got = best.get("input")
    shown = f", got {json.dumps(got)[:80]}" if isinstance(got, (int, float, str, bool)) else ""
    return f"{path}: {best['msg']}{shown}"


def parse_body(schema: type[_Strict], raw: bytes) -> Any:
    """raw JSON -> schema instance (raises InvalidRequest with validation_message)."""
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc)) from None
