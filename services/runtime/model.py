"""The one model runner: a Llama / Qwen2 decoder forward over a KV cache we own.

One `forward` serves every case the engines need, because they differ only in which cache slots
the new tokens see:
  - prefill / catch-up: N tokens, causal against the prefix (`causal_mask`);
  - decode: 1 token, sees everything (mask None);
  - tree verify (target) and tree expansion (draft, non-square): N nodes written after `start`,
    each seeing the prefix plus its ancestors (mask [N, start + N] built by the caller).
Positions are passed explicitly (committed length + depth for tree nodes), so RoPE is right for
any tree shape. Tensor parallelism (Megatron-style column/row split with one all-reduce after the
attention output and one after the MLP) is built in: with tp_size 1 it costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specmesh.kernels import tree_attention

from .kv_cache import KVCache
from .quant import Weight, linear
from .model_config import ModelConfig


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Weight  # fused [q; k; v] rows of this rank's heads
    qkv_bias: torch.Tensor | None
    o: Weight  # columns of this rank's heads
    post_norm: torch.Tensor
    gate_up: Weight  # fused [gate; up] rows of this rank's shard
    down: Weight
    o_bias: torch.Tensor | None = None  # Llama attention_bias: o_proj bias (added once, after the all-reduce)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same op order as transformers (normalise in fp32, cast back, then scale) so bf16 rounds alike.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def causal_mask(start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n, start + n] bool: new token i sees the whole prefix and new tokens 0..i."""
    mask = torch.ones(n, start + n, dtype=torch.bool, device=device)
    mask[:, start:] = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
    return mask


class Transformer:
    """Weights plus a forward pass; no nn.Module, no autograd, no hidden state besides the cache."""

    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[LayerWeights],
                 final_norm: torch.Tensor, lm_head: torch.Tensor, *, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: object | None = None, max_positions: int | None = None) -> None:
        self.config = config
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.local_heads = config.num_heads // tp_size
        self.local_kv_heads = config.num_kv_heads // tp_size
        self.dtype = embed.dtype
        self.device = embed.device
        self._rope_table(max_positions or config.max_position_embeddings)
        self.scale = config.head_dim ** -0.5

    def _rope_table(self, positions: int) -> None:
        inv_freq, scaling = self.config.rope_inv_freq()
        freqs = torch.arange(positions, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = (emb.cos() * scaling).to(self.device)
        self._sin = (emb.sin() * scaling).to(self.device)

    @property
    def vocab_size(self) -> int:
        return self.lm_head.shape[0]

    def new_cache(self, capacity: int) -> KVCache:
        """A standalone cache (in-process engines); services carve caches out of a KVPool."""
        return KVCache.allocate(self.config, capacity, self.dtype, self.device, self.local_kv_heads)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            torch.distributed.all_reduce(x, group=self.tp_group)
        return x

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                mask: torch.Tensor | None, logits_rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Run N new tokens, write their KV at cache slots [start, start + N), return fp32 logits.

        mask: [N, start + N] bool (True = may attend) or None when every new token sees every slot
        (single-token decode). logits_rows picks the rows that need logits (prefill needs one).
        """
        cfg = self.config
        n = tokens.shape[0]
        end = start + n
        hd, nh, nkv = cfg.head_dim, self.local_heads, self.local_kv_heads
        q_size, kv_size = nh * hd, nkv * hd
        if end > self._cos.shape[0]:
            # Every position is < end (a tree node's depth never exceeds its slot), so a Python-int
            # check suffices. Speculative trees near the end of a context as long as the model's
            # max_position_embeddings run a few positions past it (never committed).
            self._rope_table(max(end, 2 * self._cos.shape[0]))
        cos = self._cos[positions].to(self.dtype)[:, None, :]
        sin = self._sin[positions].to(self.dtype)[:, None, :]
        h = self.embed[tokens]
        for i, w in enumerate(self.layers):
            x = rms_norm(h, w.input_norm, cfg.rms_norm_eps)
            qkv = linear(x, w.qkv, w.qkv_bias)
            q = self._rope(qkv[:, :q_size].view(n, nh, hd), cos, sin)
            k = self._rope(qkv[:, q_size:q_size + kv_size].view(n, nkv, hd), cos, sin)
            v = qkv[:, q_size + kv_size:].view(n, nkv, hd)
            cache.k[i, :, start:end] = k.transpose(0, 1)
            cache.v[i, :, start:end] = v.transpose(0, 1)
            attn = tree_attention(q.transpose(0, 1), cache.k[i, :, :end], cache.v[i, :, :end], mask, self.scale)
            h = h + self._all_reduce(linear(attn.transpose(0, 1).reshape(n, q_size), w.o))
            if w.o_bias is not None:
                h = h + w.o_bias
            x = rms_norm(h, w.post_norm, cfg.rms_norm_eps)
            gate, up = linear(x, w.gate_up).chunk(2, dim=-1)
            h = h + self._all_reduce(linear(F.silu(gate) * up, w.down))
        if logits_rows is not None:
            h = h[logits_rows]
        return linear(rms_norm(h, self.final_norm, cfg.rms_norm_eps), self.lm_head).float()
