"""A generation request as the model services see it, and how a round's tokens are cut to it."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidRequest
from .sampling import SamplingParams


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()

    def validate(self, context: int) -> None:
        if not self.prompt:
            raise InvalidRequest("prompt is empty")
        if self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be > 0, got {self.max_tokens}")
        if len(self.prompt) + self.max_tokens > context:
            raise InvalidRequest(f"prompt ({len(self.prompt)} tokens) + max_tokens ({self.max_tokens}) "
                                 f"exceeds the context length ({context})")


def clip_chunk(chunk: list[int], produced: int, request: Request) -> tuple[list[int], str | None]:
    """Cut a round's tokens at max_tokens or a stop token; returns (kept tokens, finish reason)."""
    for i, tok in enumerate(chunk):
        if tok in request.stop_token_ids:
            return chunk[:i + 1], "stop"
        if produced + i + 1 >= request.max_tokens:
            return chunk[:i + 1], "length"
    return chunk, None
