"""Weight-only int8 matmuls for the CPU: half the bytes per token, which is what decode is bound by.

Measured on this 2-core AMX machine (1 thread, [1..4, 896] x [896, 9728]): bf16 2.1 ms, int8 0.5 ms;
but at 16+ rows the int8 kernel loses to bf16, so it pays for the draft (w leaves per expansion)
and for plain decoding, not for verifying 16-node trees. Quantizing the draft never changes what
specmesh outputs (the target verifies every token); quantizing the target does, so it is opt-in
and reported separately.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Int8Weight:
    """Per-output-channel symmetric int8: w ~= q * scale[:, None]."""

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N], activation dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


Weight = torch.Tensor | Int8Weight


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
    wf = w.float()
    scale = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return Int8Weight(q, scale.to(dtype))


INT8_MAX_ROWS = 8  # above this the int8 kernel loses to dequantize-then-bf16 (prefill, catch-up)


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(w, Int8Weight):
        if x.shape[0] > INT8_MAX_ROWS:
            return F.linear(x, w.q.to(x.dtype) * w.scale[:, None], bias)
        y = torch._weight_int8pack_mm(x.contiguous(), w.q, w.scale)
        return y if bias is None else y + bias
    return F.linear(x, w, bias)


QUANT_MODES = ("none", "int8")
