"""The runner contract: what one forward pass runs, for several sequences at once.

Sessions never call the model. They *prepare* `SeqRows` (a prompt chunk to prefill, a subtree to
verify, leaves to expand), the engine hands every ready sequence's rows to `Runner.forward` in one
call, and each session *commits* the logits of its own rows (accept and compact, add children,
re-root). This is nano-vllm's Sequence / ModelRunner split: the linear layers run on all rows of
the step at once, attention runs per sequence (varlen, kernels/tree_attention), and only the rows
that need logits go through the LM head.

A sequence's mask covers only the slots after its prefix ([rows, start + rows - prefix]), so it
never grows with the context: a verified subtree is n x n, a draft expansion is leaves x (tree
slots + leaves), a prefill chunk is a causal n x n triangle, a one-token decode has none.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

from specmesh.kernels import TreeLayout

from .errors import InvalidRequest
from .kv_cache import KVCache


class Logits(Enum):
    """Which of a sequence's rows need logits."""

    ALL = "all"    # verify / expansion: every node
    LAST = "last"  # the last chunk of a prefill or catch-up
    NONE = "none"  # a prefill chunk that is not the last


@dataclass
class SeqRows:
    """One sequence's part of a forward: `tokens` at `positions`, KV written to slots [start, start + n).

    Every row sees cache slots [0, prefix); slots [prefix, start + n) are gated by `mask`
    ([n, start + n - prefix] bool), or all visible when `mask` is None. `key` says whose rows these
    are (tensor-parallel followers find their own shard of the cache by it).
    """

    cache: KVCache
    tokens: list[int]
    positions: list[int]
    start: int
    prefix: int
    mask: torch.Tensor | None
    logits: Logits = Logits.ALL
    key: int = 0

    @property
    def n(self) -> int:
        return len(self.tokens)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def logit_rows(self) -> int:
        return {Logits.ALL: self.n, Logits.LAST: 1, Logits.NONE: 0}[self.logits]


@dataclass
class ForwardBatch:
    """SeqRows packed into the runner's static buffers: what `Transformer.forward` consumes."""

    tokens: torch.Tensor     # [R] views of the step buffers
    positions: torch.Tensor  # [R]
    caches: list[KVCache]
    starts: list[int]
    layout: TreeLayout       # rows, visible slots, prefix and tree mask per sequence
    logit_rows: torch.Tensor | None  # [L] row indices that need logits; None = no logits at all
    # The leading rows, and logit rows, that carry tokens being decoded (verify, expansion, decode:
    # Logits.ALL). They always run the quantized kernels (specmesh's give bit-identical rows
    # whatever the batch), so a speculative step computes every token as a one-row decode would;
    # only prompt rows may take the dense copies (quant.linear).
    token_rows: int = 0
    token_seqs: int = 0  # the sequences those rows belong to (tree attention's kernel takes them)

    @property
    def max_end(self) -> int:
        return max(s + n for s, n in zip(self.starts, self.layout.q_len))


_TRIL: dict[torch.device, torch.Tensor] = {}


def causal(n: int, device: torch.device) -> torch.Tensor | None:
    """[n, n] lower triangle (a view of one shared tensor), None for a single row."""
    if n <= 1:
        return None
    tril = _TRIL.get(device)
    if tril is None or tril.shape[0] < n:
        tril = _TRIL[device] = torch.ones(max(n, 256), max(n, 256), dtype=torch.bool, device=device).tril_()
    return tril[:n, :n]


class Runner:
    """The model plus preallocated step buffers sized by the configured maxima.

    `forward(seqs)` runs every sequence in one pass and returns, per sequence, the logits of the
    rows it asked for ([rows, vocab] in the model's dtype: a greedy argmax of those is the same
    token as of an fp32 copy, so nobody pays for the upcast unless it needs probabilities).
    """

    def __init__(self, model: "Transformer", max_rows: int = 512) -> None:  # noqa: F821
        self.model = model
        self.max_rows = max_rows
        device = model.device
        self._tokens = torch.zeros(max_rows, dtype=torch.long, device=device)
        self._positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        self._logit_rows = torch.zeros(max_rows, dtype=torch.long, device=device)
        # Tensor parallelism: the leader's hook that broadcasts each batch before running it.
        self.on_forward: Callable[[list[SeqRows]], None] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def forward(self, seqs: list[SeqRows]) -> list[torch.Tensor | None]:
        rows = sum(s.n for s in seqs)
        if not seqs or rows == 0:
            return [None] * len(seqs)
        if rows > self.max_rows:
            raise InvalidRequest(f"a step of {rows} rows exceeds the runner's {self.max_rows}")
        for s in seqs:
            if s.end > s.cache.capacity:
                raise InvalidRequest(f"context full: {s.end} slots > {s.cache.capacity}")
        if self.on_forward is not None:
            self.on_forward(seqs)
        # Token rows first (see ForwardBatch.token_rows); the logits go back in the callers' order.
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].logits is not Logits.ALL)
        seqs = [seqs[i] for i in order]
        tokens, positions, picks, q_start, at = [], [], [], [], 0
        token_seqs = sum(s.logits is Logits.ALL for s in seqs)
        token_rows = sum(s.n for s in seqs[:token_seqs])
        for s in seqs:
            tokens += s.tokens
            positions += s.positions
            q_start.append(at)
            if s.logits is Logits.ALL:
                picks += range(at, at + s.n)
            elif s.logits is Logits.LAST:
                picks.append(at + s.n - 1)
            at += s.n
        self._tokens[:rows].copy_(torch.tensor(tokens), non_blocking=True)
        self._positions[:rows].copy_(torch.tensor(positions), non_blocking=True)
        logit_rows = None
        if picks:
            logit_rows = self._logit_rows[:len(picks)]
            logit_rows.copy_(torch.tensor(picks), non_blocking=True)
        layout = TreeLayout(q_start, [s.n for s in seqs], [s.end for s in seqs], [s.prefix for s in seqs],
                            [s.mask for s in seqs])
        batch = ForwardBatch(self._tokens[:rows], self._positions[:rows], [s.cache for s in seqs],
                             [s.start for s in seqs], layout, logit_rows, token_rows, token_seqs)
        logits = self.model.forward(batch)
        out: list[torch.Tensor | None] = [None] * len(seqs)
        at = 0
        for i, s in zip(order, seqs):
            k = s.logit_rows
            out[i] = logits[at:at + k] if k else None
            at += k
        return out

    def forward_one(self, seq: SeqRows) -> torch.Tensor | None:
        return self.forward([seq])[0]
