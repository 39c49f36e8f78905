"""The model: a Llama / Qwen2 decoder forward over KV caches we own, for a batch of sequences.

`Transformer.forward(batch)` is the only forward pass. A `ForwardBatch` (forward_batch.py) packs
the new rows of several sequences (prefill chunks, verified subtrees, draft expansions, one-token
decodes); the linear layers run on all rows at once, attention runs per sequence through the varlen
tree-attention kernel (each sequence: its own cache, prefix length and tree mask), and only the
rows that need logits reach the LM head. Positions are passed explicitly (committed length + depth
for tree nodes), so RoPE is right for any tree shape. Tensor parallelism (Megatron-style
column/row split with one all-reduce after the attention output and one after the MLP) is built
in: with tp_size 1 it costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specmesh.kernels import tree_attention

from .forward_batch import ForwardBatch
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
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run every sequence's new rows, write their KV, return the logits of the rows that need them.

        Returns [len(batch.logit_rows), vocab] in the model's dtype (empty when no row needs logits).
        """
        cfg = self.config
        n = batch.tokens.shape[0]
        hd, nh, nkv = cfg.head_dim, self.local_heads, self.local_kv_heads
        q_size, kv_size = nh * hd, nkv * hd
        end = batch.max_end
        if end > self._cos.shape[0]:
            # Every position is < its sequence's end (a tree node's depth never exceeds its slot),
            # so a Python-int check suffices. Speculative trees near the end of a context as long as
            # the model's max_position_embeddings run a few positions past it (never committed).
            self._rope_table(max(end, 2 * self._cos.shape[0]))
        cos = self._cos[batch.positions].to(self.dtype)[:, None, :]
        sin = self._sin[batch.positions].to(self.dtype)[:, None, :]
        spans = [(a, a + m, s) for a, m, s in zip(batch.layout.q_start, batch.layout.q_len, batch.starts)]
        h = self.embed[batch.tokens]
        kernel_rows = batch.token_rows
        for i, w in enumerate(self.layers):
            x = rms_norm(h, w.input_norm, cfg.rms_norm_eps)
            qkv = linear(x, w.qkv, w.qkv_bias, kernel_rows)
            q = self._rope(qkv[:, :q_size].view(n, nh, hd), cos, sin)
            k = self._rope(qkv[:, q_size:q_size + kv_size].view(n, nkv, hd), cos, sin).transpose(0, 1)
            v = qkv[:, q_size + kv_size:].view(n, nkv, hd).transpose(0, 1)
            for cache, (a, b, start) in zip(batch.caches, spans):
                cache.k[i, :, start:start + b - a] = k[:, a:b]
                cache.v[i, :, start:start + b - a] = v[:, a:b]
            attn = tree_attention(q.transpose(0, 1), [c.k[i] for c in batch.caches], [c.v[i] for c in batch.caches],
                                  batch.layout, self.scale, batch.token_seqs)
            h = h + self._all_reduce(linear(attn.transpose(0, 1).reshape(n, q_size), w.o, None, kernel_rows))
            if w.o_bias is not None:
                h = h + w.o_bias
            x = rms_norm(h, w.post_norm, cfg.rms_norm_eps)
            gate, up = linear(x, w.gate_up, None, kernel_rows).chunk(2, dim=-1)
            h = h + self._all_reduce(linear(F.silu(gate) * up, w.down, None, kernel_rows))
        if batch.logit_rows is None:
            return h[:0, :0]
        h = h.index_select(0, batch.logit_rows)
        return linear(rms_norm(h, self.final_norm, cfg.rms_norm_eps), self.lm_head, None, kernel_rows)
