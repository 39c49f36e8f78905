"""A GGUF file's tensors as the runner's weight formats, without a dense detour where none is needed.

`GGUFWeights(path, config)` is a `loader.WeightSource`: called with a transformers tensor name it
returns the tensor and the format the runner keeps it in, by the tensor's GGUF type:

| GGUF type | runner format | how |
|---|---|---|
| Q4_0, Q4_1, Q4_K | int4, group 32 | exact: their 32-value (sub-)blocks are (q - 8) * scale + zero |
| other 2- to 5-bit types | int4, group 32 | dequantized by the gguf package, re-quantized min/max |
| Q8_0, Q6_K, Q8_K | int8 per channel | dequantized by the gguf package, re-quantized |
| F32, F16, BF16 | dense | as stored |

Llama GGUFs store q/k rows permuted for llama.cpp's RoPE (convert_hf_to_gguf's `permute`); they are
put back in transformers' order here, so the one runner sees one layout.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch

from specmesh.services.runtime.errors import ModelError
from specmesh.services.runtime.loader import SourceTensor
from specmesh.services.runtime.model_config import ModelConfig
from specmesh.services.runtime.quant import INT4_GROUP, Int4Groups, int4_groups_from_dense

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")

EXACT_INT4 = ("Q4_0", "Q4_1", "Q4_K")
EIGHT_BIT = ("Q8_0", "Q8_1", "Q8_K", "Q6_K")
FLOAT = ("F32", "F16", "BF16", "F64")


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name llama.cpp's converter gives a transformers tensor."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = _LAYER.fullmatch(hf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise ModelError(f"no GGUF name for tensor '{hf_name}'")
    return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., B] bytes -> [..., 2B] values: the B low nibbles, then the B high ones (ggml's order)."""
    lo, hi = qs & 0x0F, qs >> 4
    return np.concatenate([lo[..., None, :], hi[..., None, :]], axis=-2).reshape(*qs.shape[:-1], -1)


def decode_int4(qtype: str, data: np.ndarray, n: int, k: int) -> Int4Groups:
    """Exact 4-bit groups of a Q4_0 / Q4_1 / Q4_K tensor stored as [n, bytes per row]."""
    blocks = np.ascontiguousarray(data).reshape(n, -1)
    if qtype in ("Q4_0", "Q4_1"):
        head = 2 if qtype == "Q4_0" else 4
        b = blocks.reshape(n, k // 32, head + 16)
        d = _f16(b[..., 0:2])
        q = _nibbles(b[..., head:])  # [n, k/32, 32]
        # Q4_0: w = d * (q - 8); Q4_1: w = d * q + m = d * (q - 8) + (m + 8 d)
        zero = np.zeros_like(d) if qtype == "Q4_0" else _f16(b[..., 2:4]) + 8.0 * d
        scale = d
    else:  # Q4_K: 256-value super-blocks of 8 sub-blocks of 32, 6-bit scales and mins
        from gguf.quants import Q4_K

        b = blocks.reshape(n * (k // 256), 144)
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = Q4_K.get_scale_min(b[:, 4:16])
        scale = (d[:, None] * sc.astype(np.float32))  # [blocks, 8]
        # w = d * sc * q - dmin * m = scale * (q - 8) + (8 * scale - dmin * m)
        zero = 8.0 * scale - dmin[:, None] * mn.astype(np.float32)
        q = _nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
        scale, zero = scale.reshape(n, k // 32), zero.reshape(n, k // 32)
    return Int4Groups(torch.from_numpy(q.reshape(n, k).astype(np.uint8)),
                      torch.from_numpy(np.ascontiguousarray(scale.reshape(n, k // 32), dtype=np.float32)),
                      torch.from_numpy(np.ascontiguousarray(zero.reshape(n, k // 32), dtype=np.float32)))


def _llama_rope_order(rows: int, heads: int) -> torch.Tensor:
    """Row index that undoes convert_hf_to_gguf's q/k permutation (per head: [2, hd/2] <-> [hd/2, 2])."""
    hd = rows // heads
    h = torch.arange(heads)[:, None, None] * hd
    j = torch.arange(2)[None, :, None]
    i = torch.arange(hd // 2)[None, None, :]
    return (h + 2 * i + j).reshape(-1)


class GGUFWeights:
    """A `loader.WeightSource` over one GGUF file (the gguf package reads it, memory-mapped)."""

    def __init__(self, path: str | os.PathLike[str], config: ModelConfig) -> None:
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path)
        except Exception as exc:  # truncated / corrupt file: numpy or struct errors
            raise ModelError(f"cannot read GGUF tensors from {path}: {exc}") from None
        self.path = path
        self.tensors = {t.name: t for t in reader.tensors}
        self.config = config

    def types(self) -> dict[str, str]:
        """GGUF type name of every tensor (for logs and the cache manifest)."""
        return {name: t.tensor_type.name for name, t in self.tensors.items()}

    def __call__(self, hf_name: str) -> SourceTensor:
        name = gguf_name(hf_name)
        if name not in self.tensors:
            raise ModelError(f"tensor '{name}' ({hf_name}) missing from {self.path}")
        t = self.tensors[name]
        qtype = t.tensor_type.name
        shape = [int(x) for x in reversed(t.shape.tolist())]  # GGUF lists ne0 (the inner dim) first
        value, fmt = self._decode(qtype, t.data, shape)
        heads = {"attn_q": self.config.num_heads, "attn_k": self.config.num_kv_heads}.get(name.split(".")[-2])
        if self.config.model_type == "llama" and heads is not None:
            order = _llama_rope_order(shape[0], heads)
            value = value.take_rows(order) if isinstance(value, Int4Groups) else value[order]
        return value, fmt

    def _decode(self, qtype: str, data: np.ndarray, shape: list[int]) -> SourceTensor:
        if qtype in FLOAT:
            return torch.from_numpy(np.asarray(data, dtype=np.float32).reshape(shape).copy()), "dense"
        if len(shape) != 2:
            raise ModelError(f"quantized GGUF tensor of shape {shape} is not a matrix")
        n, k = shape
        if qtype in EXACT_INT4 and k % 32 == 0:
            return decode_int4(qtype, data, n, k), "int4"
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        dense = torch.from_numpy(dequantize(np.asarray(data), GGMLQuantizationType[qtype]).reshape(n, k).copy())
        if qtype in EIGHT_BIT or k % INT4_GROUP:
            return dense, "int8"
        return int4_groups_from_dense(dense), "int4"
