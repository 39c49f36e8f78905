"""What the router knows about the target model: tokenizer, vocab, context, EOS ids, names.

Read from the model directory's config files and tokenizer only; the router never loads weights.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.errors import ModelError
from ..runtime.loader import load_tokenizer, read_generation_defaults

log = logging.getLogger("specmesh.router")


@dataclass
class ModelMeta:
    """The target model as the router sees it."""

    tokenizer: Any
    target_name: str
    draft_name: str
    vocab_size: int
    context_length: int
    eos_ids: list[int]
    dtype: str
    model_dir: Path
    max_token_chars: int  # the longest token's text: no text longer than n * this fits in n tokens


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def load_model_meta(spec: str, max_context: int, draft_model: str = "") -> ModelMeta:
    """Resolve the target model (`spec` "" = the default pair) and read its metadata.

    The context length is `max_context` clamped to the model's max_position_embeddings.
    EOS ids are the union of config.json's, generation_config.json's and the tokenizer's.
    """
    from specmesh.models.store import DEFAULT_MODELS, resolve_model_dir

    model_dir = resolve_model_dir(spec or None, "target")
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {model_dir / 'config.json'}: {exc}") from None
    tokenizer = load_tokenizer(model_dir)
    vocab_size = int(config.get("vocab_size") or len(tokenizer))
    positions = int(config.get("max_position_embeddings") or max_context)
    context = min(max_context, positions)
    if context < max_context:
        log.info("context length %d (the model's max_position_embeddings; --max-context was %d)", context, max_context)
    eos = _ids(config.get("eos_token_id")) + _ids(read_generation_defaults(model_dir).get("eos_token_id"))
    eos += _ids(tokenizer.eos_token_id)
    eos_ids = [t for t in dict.fromkeys(eos) if 0 <= t < vocab_size]
    default = not spec or (spec == "default" and not Path("default").exists())
    if default:
        target_name, draft_name = DEFAULT_MODELS["target"].name, draft_model or DEFAULT_MODELS["draft"].name
    else:
        target_name, draft_name = _name(spec), _name(draft_model) if draft_model else ""
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    return ModelMeta(tokenizer=tokenizer, target_name=target_name, draft_name=draft_name, vocab_size=vocab_size,
                     context_length=context, eos_ids=eos_ids, dtype=dtype, model_dir=model_dir,
                     max_token_chars=max_token_chars(tokenizer))


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for, from the vocabulary's token strings.

    A token's stored form is at least as long as the text it decodes to (byte-level BPE writes one
    symbol per byte, SentencePiece one per character, byte fallback six, "<0xE4>"), so a text of
    more than n * this characters cannot fit in n tokens: the router refuses it before tokenizing.
    """
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def _name(spec: str) -> str:
    path = Path(spec.rstrip("/"))
    return path.stem if path.suffix.lower() == ".gguf" else path.name
