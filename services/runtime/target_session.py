"""The target side of one request: committed KV, one forward per round, lossless verification.

The KV layout is [committed prefix | scratch]. Each round the tree (root = last committed token,
whose KV is not computed yet) is written into the scratch, verified, and only the accepted path's
KV slides down to extend the prefix. Autoregressive decoding is the same round with a one-node tree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import InvalidRequest
from .kv_cache import KVCache
from .model import Transformer, causal_mask
from .sampling import SamplingParams, probs_from_logits, sample
from .tree_mask import ancestor_matrix, tree_mask
from .verify import greedy_accept, speculative_sampling_accept


@dataclass
class RoundResult:
    """What one verification round commits: `tokens` = accepted draft tokens followed by the bonus."""

    tokens: list[int]
    accepted_draft: int  # how many of the tree's tokens were accepted (len(tokens) - 1)
    tree_size: int


class TargetSession:
    def __init__(self, model: Transformer, cache: KVCache, sampling: SamplingParams) -> None:
        self.model = model
        self.cache = cache
        self.sampling = sampling
        self.generator = sampling.generator(salt=1) if not sampling.greedy else None
        self.root: int | None = None  # last committed token; its KV is computed by the next round
        # Tensor parallelism: every rank runs the forward, only the leader decides what is accepted
        # and the others adopt its (path, bonus), so all shards compact identically.
        self.path_sync: Callable[[tuple[list[int], int] | None], tuple[list[int], int]] | None = None
        self.leader = True
        self._draft_behind: int | None = None  # set by prefill: the root of the draft's first tree

    @property
    def prefix_len(self) -> int:
        return self.cache.length

    def prefill(self, prompt: list[int]) -> int:
        """Run the whole prompt and commit the first token at once (time to first token = prefill).

        The draft's first tree is still rooted at the last prompt token, one token behind: the
        first `adopt_draft_tree` re-roots it at the token committed here.
        """
        if not prompt:
            raise InvalidRequest("prompt is empty")
        if len(prompt) > self.cache.capacity:
            raise InvalidRequest(f"prompt of {len(prompt)} tokens exceeds the context ({self.cache.capacity})")
        n = len(prompt)
        device = self.model.device
        logits = self.model.forward(torch.tensor(prompt, dtype=torch.long, device=device),
                                    torch.arange(n, device=device), self.cache, 0, causal_mask(0, n, device),
                                    logits_rows=slice(n - 1, n))
        _path, first = self._decide(logits, [prompt[-1]], [-1], None)
        self.cache.length = n
        self.root = first
        self._draft_behind = prompt[-1]
        return first

    def adopt_draft_tree(self, tokens: list[int], parents: list[int], draft_probs: torch.Tensor | None
                         ) -> tuple[list[int], list[int], torch.Tensor | None, list[int]]:
        """Fit a draft subtree to the committed state; returns (tokens, parents, probs, skipped).

        Only the first tree after prefill needs fitting: it is rooted at the last prompt token, and
        the target already committed the next token. Its subtree under that token (or just the
        token, if the draft did not propose it) is what gets verified; `skipped` = [that token],
        which the draft must see in front of the verified tokens to re-root its own tree.
        """
        behind, self._draft_behind = self._draft_behind, None
        if behind is None or tokens[0] != behind:
            return tokens, parents, draft_probs, []
        first = self.root
        child = next((i for i in range(1, len(tokens)) if parents[i] == 0 and tokens[i] == first), None)
        if child is None:
            return [first], [-1], None, [first]
        inside = [False] * len(tokens)
        inside[child] = True
        for i in range(child + 1, len(tokens)):
            inside[i] = inside[parents[i]]
        keep = [i for i in range(len(tokens)) if inside[i]]
        local = {node: j for j, node in enumerate(keep)}
        new_parents = [-1] + [local[parents[i]] for i in keep[1:]]
        probs = draft_probs[keep] if draft_probs is not None else None
        return [tokens[i] for i in keep], new_parents, probs, [first]

    def step(self) -> int:
        """Plain autoregressive decoding: verify the one-node tree [root]."""
        return self.verify([self.root], [-1]).tokens[0]

    def verify(self, tokens: list[int], parents: list[int], draft_probs: torch.Tensor | None = None) -> RoundResult:
        """One forward over the tree, accept the longest lossless path, keep only its KV."""
        self._draft_behind = None
        n = len(tokens)
        start = self.cache.length
        if tokens[0] != self.root:
            raise InvalidRequest(f"tree root {tokens[0]} is not the last committed token {self.root}")
        if start + n > self.cache.capacity:
            raise InvalidRequest(f"context full: {start} committed + {n} tree tokens > {self.cache.capacity}")
        device = self.model.device
        if n == 1:
            positions = torch.tensor([start], device=device)
            mask = None
        else:
            depth = [0] * n
            for i in range(1, n):
                depth[i] = depth[parents[i]] + 1
            positions = torch.tensor(depth, device=device) + start
            mask = tree_mask(start, ancestor_matrix(parents, device))
        logits = self.model.forward(torch.tensor(tokens, device=device), positions, self.cache, start, mask)
        path, bonus = self._decide(logits, tokens, parents, draft_probs)
        self.cache.move_slots(torch.tensor(path, device=device) + start, start)
        self.cache.length = start + len(path)
        self.root = bonus
        return RoundResult([tokens[i] for i in path[1:]] + [bonus], len(path) - 1, n)

    def _decide(self, logits: torch.Tensor, tokens: list[int], parents: list[int],
                draft_probs: torch.Tensor | None) -> tuple[list[int], int]:
        """The leader accepts; tensor-parallel followers adopt the leader's decision."""
        if not self.leader:
            return self.path_sync(None)
        decision = self._accept(logits, tokens, parents, draft_probs)
        if self.path_sync is not None:
            self.path_sync(decision)
        return decision

    def _accept(self, logits: torch.Tensor, tokens: list[int], parents: list[int],
                draft_probs: torch.Tensor | None) -> tuple[list[int], int]:
        n = len(tokens)
        if self.sampling.greedy:
            path, bonus = greedy_accept(logits, tokens, parents)
        else:
            probs = probs_from_logits(logits, self.sampling)
            if n == 1:
                path, bonus = [0], sample(probs[0], self.generator)
            else:
                q = draft_probs if draft_probs is not None else torch.zeros_like(probs)
                path, bonus = speculative_sampling_accept(probs, q, tokens, parents, self.generator)
        return path, bonus
