"""Build a `Transformer` from a local checkpoint (weights and config through transformers/safetensors)."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .errors import ModelError
from .model import LayerWeights, Transformer
from .model_config import ModelConfig
from .quant import QUANT_MODES, Weight, quantize_int8

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype '{name}' (use bf16 or fp32)") from None


def build_transformer(config: ModelConfig, get: Callable[[str], torch.Tensor], dtype: torch.dtype,
                      device: str | torch.device = "cpu", tp_rank: int = 0, tp_size: int = 1,
                      tp_group: Any = None, max_positions: int | None = None, quantize: str = "none") -> Transformer:
    """Fuse q/k/v and gate/up, shard them for tensor parallelism, cast, and wrap in a Transformer.

    quantize "int8" stores every projection and the LM head as weight-only int8 (see quant.py).

    `get(name)` returns one tensor of the transformers state dict (names like
    "model.layers.0.self_attn.q_proj.weight").
    """
    if config.num_heads % tp_size or config.num_kv_heads % tp_size or config.intermediate_size % tp_size:
        raise ModelError(f"tensor parallel size {tp_size} does not divide heads {config.num_heads}/"
                         f"kv heads {config.num_kv_heads}/intermediate {config.intermediate_size}")
    hd = config.head_dim
    q_rows = config.num_heads // tp_size * hd
    kv_rows = config.num_kv_heads // tp_size * hd
    ff = config.intermediate_size // tp_size

    if quantize not in QUANT_MODES:
        raise ModelError(f"unknown quantization '{quantize}' (use {', '.join(QUANT_MODES)})")
    if quantize == "int8" and str(device).startswith("cuda"):
        raise ModelError("int8 weight-only quantization is a CPU path; use --quantize none on CUDA")

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    def weight(t: torch.Tensor) -> Weight:
        return quantize_int8(t, dtype) if quantize == "int8" else cast(t)

    def rows(t: torch.Tensor, size: int) -> torch.Tensor:
        return t[tp_rank * size:(tp_rank + 1) * size]

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([rows(get(p + f"self_attn.{n}_proj.weight"), s)
                         for n, s in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))])
        bias = None
        if config.attention_bias:
            bias = cast(torch.cat([rows(get(p + f"self_attn.{n}_proj.bias"), s)
                                   for n, s in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))]))
        o = get(p + "self_attn.o_proj.weight")[:, tp_rank * q_rows:(tp_rank + 1) * q_rows]
        gate_up = torch.cat([rows(get(p + "mlp.gate_proj.weight"), ff), rows(get(p + "mlp.up_proj.weight"), ff)])
        down = get(p + "mlp.down_proj.weight")[:, tp_rank * ff:(tp_rank + 1) * ff]
        # Llama's attention_bias also gives o_proj a bias (Qwen2's o_proj has none).
        o_bias = None
        if config.attention_bias and config.model_type == "llama":
            o_bias = cast(get(p + "self_attn.o_proj.bias"))
        layers.append(LayerWeights(
            input_norm=cast(get(p + "input_layernorm.weight")), qkv=weight(qkv), qkv_bias=bias, o=weight(o),
            post_norm=cast(get(p + "post_attention_layernorm.weight")), gate_up=weight(gate_up), down=weight(down),
            o_bias=o_bias))
    embed = cast(get("model.embed_tokens.weight"))
    lm_head = get("model.embed_tokens.weight") if config.tie_word_embeddings else get("lm_head.weight")
    lm_head = embed if config.tie_word_embeddings and quantize == "none" else weight(lm_head)
    return Transformer(config, embed, layers, cast(get("model.norm.weight")), lm_head, tp_rank=tp_rank,
                       tp_size=tp_size, tp_group=tp_group, max_positions=max_positions)


def load_transformer(model_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                     device: str | torch.device = "cpu", tp_rank: int = 0, tp_size: int = 1,
                     tp_group: Any = None, max_positions: int | None = None, quantize: str = "none") -> Transformer:
    """Load a dense safetensors checkpoint directory (see model_store.resolve_model_dir)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model directory {model_dir} does not exist (or is not a directory)")
    files = sorted(glob.glob(str(model_dir / "*.safetensors")))
    if not files:
        raise ModelError(f"no *.safetensors weights in {model_dir}")
    try:
        hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # missing / malformed config.json: OSError, ValueError, KeyError, ...
        raise ModelError(f"cannot read the model config in {model_dir}: {_first_line(exc)}") from None
    config = ModelConfig.from_hf(hf_config)
    try:
        handles = [safe_open(f, framework="pt") for f in files]
    except Exception as exc:  # truncated or not a safetensors file
        raise ModelError(f"cannot read weights in {model_dir}: {_first_line(exc)}") from None
    where = {name: h for h in handles for name in h.keys()}

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise ModelError(f"weight '{name}' missing from {model_dir}")
        return where[name].get_tensor(name)

    return build_transformer(config, get, dtype, device, tp_rank, tp_size, tp_group, max_positions, quantize)


def transformer_from_state_dict(hf_config: Any, state_dict: Mapping[str, torch.Tensor],
                                dtype: torch.dtype = torch.float32, **kwargs: Any) -> Transformer:
    """Wrap an in-memory transformers model's weights (tests, benchmarks)."""
    return build_transformer(ModelConfig.from_hf(hf_config), state_dict.__getitem__, dtype, **kwargs)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    if not Path(model_dir).is_dir():
        raise ModelError(f"tokenizer directory {model_dir} does not exist (or is not a directory)")
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # transformers raises many types; the user needs one line
        raise ModelError(f"cannot load tokenizer from {model_dir}: {exc}") from None


def check_pair(target_tok: Any, draft_tok: Any, target_vocab: int, draft_vocab: int) -> int:
    """Check that draft tokens mean the same as target tokens; return the shared vocab width.

    Qwen pairs differ only in the padded rows of the embedding (config.vocab_size), which is fine:
    logits are compared on the target's width, the draft's padding is cut or filled with -inf.
    Different token lists would silently verify nonsense, so they are refused.
    """
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise ModelError("draft and target tokenizers differ (different token lists); speculative decoding "
                         "needs a draft that shares the target's tokenizer")
    if min(target_vocab, draft_vocab) < len(target_tok):
        raise ModelError(f"model vocab ({min(target_vocab, draft_vocab)}) is smaller than the tokenizer "
                         f"({len(target_tok)} tokens)")
    return target_vocab


def read_generation_defaults(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "generation_config.json"
    return json.loads(path.read_text()) if path.exists() else {}
