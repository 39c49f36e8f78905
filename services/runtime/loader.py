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
from .weight_formats import WEIGHT_FORMATS
from .quant import (Int4Groups, Weight, int4_groups_from_dense, int4_supported, pack_int4,
                    quantize_int8, weight_from_tensors, weight_tensors)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype '{name}' (use bf16 or fp32)") from None


#: What a weight source returns for one tensor: a float tensor or 4-bit groups, and the format the
#: runner should keep it in ("dense", "int8" or "int4").
SourceTensor = tuple["torch.Tensor | Int4Groups", str]
WeightSource = Callable[[str], SourceTensor]


def dense_source(get: Callable[[str], torch.Tensor], fmt: str) -> WeightSource:
    """Weights of a dense checkpoint, to be kept dense ("bf16") or quantized on load ("int8"/"int4")."""
    keep = {"bf16": "dense", "int8": "int8", "int4": "int4"}[fmt]

    def source(name: str) -> SourceTensor:
        t = get(name)
        if keep == "int4" and t.dim() == 2 and int4_supported(t.shape):
            return int4_groups_from_dense(t), "int4"
        return t, ("int8" if keep != "dense" and t.dim() == 2 else "dense")
    return source


def build_transformer(config: ModelConfig, get: Callable[[str], torch.Tensor] | WeightSource, dtype: torch.dtype,
                      device: str | torch.device = "cpu", tp_rank: int = 0, tp_size: int = 1,
                      tp_group: Any = None, max_positions: int | None = None, weights: str = "bf16",
                      keep_dense: bool = True, progress: bool = False) -> Transformer:
    """Fuse q/k/v and gate/up, shard them for tensor parallelism, convert, and wrap in a Transformer.

    `get(name)` returns one tensor of the transformers state dict (names like
    "model.layers.0.self_attn.q_proj.weight"); with weights="gguf" it is a `WeightSource` instead,
    which also says which format each tensor keeps. `weights` bf16 keeps projections dense, int8 /
    int4 quantize them on load (quant.py); `keep_dense` keeps a dense copy of quantized projections
    for many-row forwards (prefill): faster prefill for more memory.
    """
    if config.num_heads % tp_size or config.num_kv_heads % tp_size or config.intermediate_size % tp_size:
        raise ModelError(f"tensor parallel size {tp_size} does not divide heads {config.num_heads}/"
                         f"kv heads {config.num_kv_heads}/intermediate {config.intermediate_size}")
    if weights not in WEIGHT_FORMATS or weights == "auto":
        raise ModelError(f"unknown weight format '{weights}' (use {', '.join(WEIGHT_FORMATS[1:])})")
    if weights != "bf16" and str(device).startswith("cuda"):
        raise ModelError(f"--weights {weights} uses CPU weight-only kernels; use --weights bf16 on CUDA")
    source: WeightSource = get if weights == "gguf" else dense_source(get, weights)  # type: ignore[arg-type]
    hd = config.head_dim
    q_rows = config.num_heads // tp_size * hd
    kv_rows = config.num_kv_heads // tp_size * hd
    ff = config.intermediate_size // tp_size

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    def dense(name: str) -> torch.Tensor:
        t, _fmt = source(name)
        return cast(t.dequantize() if isinstance(t, Int4Groups) else t)

    def rows(name: str, size: int) -> SourceTensor:
        t, fmt = source(name)
        a, b = tp_rank * size, (tp_rank + 1) * size
        return (t.rows(a, b) if isinstance(t, Int4Groups) else t[a:b]), fmt

    def cols(name: str, size: int) -> SourceTensor:
        t, fmt = source(name)
        a, b = tp_rank * size, (tp_rank + 1) * size
        return (t.columns(a, b) if isinstance(t, Int4Groups) else t[:, a:b]), fmt

    def weight(parts: list[SourceTensor]) -> Weight:
        """One runner weight from fused parts: int4 only if every part is int4, int8 if any is 8-bit."""
        formats = {fmt for _t, fmt in parts}
        if formats == {"int4"}:
            groups = Int4Groups.cat([t for t, _f in parts])  # type: ignore[misc]
            if int4_supported(groups.shape):
                return pack_int4(groups, dtype, keep_dense)
        if formats == {"dense"}:
            return cast(torch.cat([t for t, _f in parts]))  # type: ignore[misc]
        floats = torch.cat([t.dequantize() if isinstance(t, Int4Groups) else t.float() for t, _f in parts])
        return quantize_int8(floats, dtype, keep_dense)

    attn = [("q", q_rows), ("k", kv_rows), ("v", kv_rows)]
    layers = []
    from tqdm import tqdm

    for i in tqdm(range(config.num_layers), desc=f"repacking weights ({weights})", unit="layer",
                  disable=not progress, leave=False):
        p = f"model.layers.{i}."
        bias = None
        if config.attention_bias:
            bias = cast(torch.cat([rows(p + f"self_attn.{n}_proj.bias", s)[0] for n, s in attn]))
        # Llama's attention_bias also gives o_proj a bias (Qwen2's o_proj has none).
        o_bias = dense(p + "self_attn.o_proj.bias") if config.attention_bias and config.model_type == "llama" else None
        layers.append(LayerWeights(
            input_norm=dense(p + "input_layernorm.weight"),
            qkv=weight([rows(p + f"self_attn.{n}_proj.weight", s) for n, s in attn]), qkv_bias=bias,
            o=weight([cols(p + "self_attn.o_proj.weight", q_rows)]),
            post_norm=dense(p + "post_attention_layernorm.weight"),
            gate_up=weight([rows(p + "mlp.gate_proj.weight", ff), rows(p + "mlp.up_proj.weight", ff)]),
            down=weight([cols(p + "mlp.down_proj.weight", ff)]), o_bias=o_bias))
    embed = dense("model.embed_tokens.weight")
    head_name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    head_fmt = source(head_name)[1]
    lm_head = embed if head_fmt == "dense" and config.tie_word_embeddings else weight([source(head_name)])
    return Transformer(config, embed, layers, dense("model.norm.weight"), lm_head, tp_rank=tp_rank,
                       tp_size=tp_size, tp_group=tp_group, max_positions=max_positions)


_LAYER_FIELDS = ("input_norm", "qkv", "qkv_bias", "o", "post_norm", "gate_up", "down", "o_bias")


def runner_state(model: Transformer) -> tuple[dict[str, torch.Tensor], dict]:
    """Every weight of a built Transformer as named tensors plus a JSON-able manifest (for the cache)."""
    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {}

    def put(name: str, w: Weight | None) -> None:
        if w is not None:
            t, meta = weight_tensors(name, w)
            tensors.update(t)
            manifest[name] = meta

    for i, layer in enumerate(model.layers):
        for f in _LAYER_FIELDS:
            put(f"layers.{i}.{f}", getattr(layer, f))
    put("embed", model.embed)
    put("final_norm", model.final_norm)
    if model.lm_head is model.embed:
        manifest["lm_head"] = {"format": "embed"}
    else:
        put("lm_head", model.lm_head)
    return tensors, manifest


def transformer_from_runner_state(config: ModelConfig, tensors: dict[str, torch.Tensor], manifest: dict,
                                  **kwargs: Any) -> Transformer:
    """Inverse of `runner_state` (kwargs as for Transformer: tp_rank, tp_size, tp_group, max_positions)."""
    def get(name: str) -> Any:
        return weight_from_tensors(name, tensors, manifest[name]) if name in manifest else None

    layers = [LayerWeights(**{f: get(f"layers.{i}.{f}") for f in _LAYER_FIELDS}) for i in range(config.num_layers)]
    embed = get("embed")
    lm_head = embed if manifest["lm_head"]["format"] == "embed" else get("lm_head")
    return Transformer(config, embed, layers, get("final_norm"), lm_head, **kwargs)


def read_model_config(model_dir: str | os.PathLike) -> ModelConfig:
    """The runner's ModelConfig of a dense checkpoint directory (config.json through transformers)."""
    from transformers import AutoConfig

    try:
        return ModelConfig.from_hf(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    except ModelError:
        raise
    except Exception as exc:  # missing / malformed config.json: OSError, ValueError, KeyError, ...
        raise ModelError(f"cannot read the model config in {model_dir}: {_first_line(exc)}") from None


def load_transformer(model_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                     device: str | torch.device = "cpu", tp_rank: int = 0, tp_size: int = 1,
                     tp_group: Any = None, max_positions: int | None = None, weights: str = "bf16",
                     keep_dense: bool = True, source: WeightSource | None = None,
                     progress: bool = False) -> Transformer:
    """Load a dense safetensors checkpoint directory (see specmesh.models.store.resolve_model_dir).

    weights="gguf" reads the projections from `source` (a models.gguf_weights.GGUFWeights of the
    GGUF the directory was converted from); everything else comes from the directory.
    """
    from safetensors import safe_open

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model directory {model_dir} does not exist (or is not a directory)")
    files = sorted(glob.glob(str(model_dir / "*.safetensors")))
    if not files:
        raise ModelError(f"no *.safetensors weights in {model_dir}")
    config = read_model_config(model_dir)
    try:
        handles = [safe_open(f, framework="pt") for f in files]
    except Exception as exc:  # truncated or not a safetensors file
        raise ModelError(f"cannot read weights in {model_dir}: {_first_line(exc)}") from None
    where = {name: h for h in handles for name in h.keys()}

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise ModelError(f"weight '{name}' missing from {model_dir}")
        return where[name].get_tensor(name)

    if weights == "gguf" and source is None:
        raise ModelError(f"--weights gguf needs the GGUF file {model_dir} was made from; use bf16, int8 or int4")
    return build_transformer(config, source if weights == "gguf" else get, dtype, device, tp_rank, tp_size,
                             tp_group, max_positions, weights, keep_dense, progress)


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
