"""The target side of one request: committed KV, lossless verification, prepare / commit per step.

The KV layout is [committed prefix | scratch]. Each round the tree (root = last committed token,
whose KV is not computed yet) is written into the scratch, verified, and only the accepted path's
KV slides down to extend the prefix. Autoregressive decoding is the same round with a one-node tree.

The session never runs the model: `prefill_rows` / `verify_rows` say what to run, the engine runs
every ready session's rows in one batched forward (forward_batch.Runner), and `commit_prefill` /
`commit_verify` take this session's logits. Long prompts go in chunks, so a new prompt never
stalls running sessions for more than one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidRequest
from .forward_batch import Logits, SeqRows, causal
from .kv_cache import KVCache
from .sampling import SamplingParams, probs_from_logits, sample
from .tree_mask import ancestor_matrix
from .verify import greedy_accept, speculative_sampling_accept

Decision = tuple[list[int], int]  # (accepted node indices starting at the root, bonus token)


@dataclass
class RoundResult:
    """What one verification round commits: `tokens` = accepted draft tokens followed by the bonus."""

    tokens: list[int]
    accepted_draft: int  # how many of the tree's tokens were accepted (len(tokens) - 1)
    tree_size: int


@dataclass
class Tree:
    """A tree sent for verification: node 0 is the root, parents[i] < i, q only when sampling."""

    tokens: list[int]
    parents: list[int]
    draft_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)


class TargetSession:
    def __init__(self, cache: KVCache, sampling: SamplingParams, device: torch.device | str = "cpu",
                 key: int = 0) -> None:
        self.cache = cache
        self.sampling = sampling
        self.device = torch.device(device)
        self.key = key
        self.generator = sampling.generator(salt=1, device=self.device) if not sampling.greedy else None
        self.root: int | None = None  # last committed token; its KV is computed by the next round
        self.tokens: list[int] = []  # prompt + committed tokens; the first cache.length have KV
        self._prompt: list[int] = []
        self._unprefilled = 0  # prompt tokens still to run

    # -- prefill -------------------------------------------------------------------------------
    def begin(self, prompt: list[int], cached: int = 0) -> None:
        """Take the prompt; `prefill_rows` then hands it out in chunks.

        `cached`: the KV of the first `cached` prompt tokens is already in the cache (copied from
        the prefix cache), so prefill starts there. The last prompt token always runs: its logits
        give the first token."""
        if not prompt:
            raise InvalidRequest("prompt is empty")
        if len(prompt) > self.cache.capacity:
            raise InvalidRequest(f"prompt of {len(prompt)} tokens exceeds the context ({self.cache.capacity})")
        if not 0 <= cached < len(prompt):
            raise InvalidRequest(f"{cached} cached tokens of a {len(prompt)}-token prompt: the last one must run")
        self._prompt, self._unprefilled = list(prompt), len(prompt) - cached
        self.tokens = list(prompt)
        self.cache.length = cached

    @property
    def prefilling(self) -> bool:
        return self._unprefilled > 0

    def prefill_rows(self, budget: int) -> SeqRows:
        """The next chunk of at most `budget` prompt tokens, causal against the tokens before it."""
        start = len(self._prompt) - self._unprefilled
        n = min(budget, self._unprefilled)
        last = n == self._unprefilled
        return SeqRows(self.cache, self._prompt[start:start + n], list(range(start, start + n)), start, start,
                       causal(n, self.device), Logits.LAST if last else Logits.NONE, self.key)

    def commit_prefill(self, rows: SeqRows, logits: torch.Tensor | None, decision: Decision | None = None
                       ) -> int | None:
        """Advance past the chunk; after the last one, commit the first token (TTFT = prefill).

        The draft's first tree is still rooted at the last prompt token, one token behind:
        `adopt_draft_tree` fits it to the token committed here. `decision`: a tensor-parallel
        follower passes the leader's.
        """
        self._unprefilled -= rows.n
        self.cache.length = rows.end
        if self._unprefilled:
            return None
        _path, first = decision if decision is not None else self.decide(logits, Tree([self._prompt[-1]], [-1]))
        self.root = first
        self.tokens.append(first)
        return first

    # -- rounds --------------------------------------------------------------------------------
    def adopt_draft_tree(self, tree: Tree, position: int) -> tuple[Tree, list[int]] | None:
        """Fit a draft subtree whose root is token `position` of prompt + output; returns (the tree
        to verify, skipped), or None if the root is not the committed token there.

        The draft roots its tree at the last token it knows. In a steady round that is the target's
        root. The first tree after prefill is one token behind (it grew while the prefill committed
        the first token), and a draft that (re)joins a running session (it restarted, and the
        target went on alone meanwhile) is as far behind as the target got. `skipped` = the
        committed tokens after the draft's root, up to and including the target's root: the draft
        must see them in front of the verified tokens to re-root. Where the tree proposed them, the
        subtree under the last one is verified; otherwise the root alone (a plain decoding round).
        Nothing changes until the round commits, so a tree that waits for a later step is fitted
        again then.
        """
        seq = self.tokens
        if not 0 <= position < len(seq) or tree.tokens[0] != seq[position]:
            return None
        skipped = seq[position + 1:]
        tokens, parents = tree.tokens, tree.parents
        node: int | None = 0
        for token in skipped:
            node = next((i for i in range(node + 1, len(tokens)) if parents[i] == node and tokens[i] == token), None)
            if node is None:
                return Tree([self.root], [-1]), skipped
        if node == 0:
            return tree, skipped
        inside = [False] * len(tokens)
        inside[node] = True
        for i in range(node + 1, len(tokens)):
            inside[i] = inside[parents[i]]
        keep = [i for i in range(len(tokens)) if inside[i]]
        local = {n: j for j, n in enumerate(keep)}
        new_parents = [-1] + [local[parents[i]] for i in keep[1:]]
        probs = tree.draft_probs[keep] if tree.draft_probs is not None else None
        return Tree([tokens[i] for i in keep], new_parents, probs), skipped

    def decode_tree(self) -> Tree:
        """Plain autoregressive decoding: the one-node tree [root]."""
        return Tree([self.root], [-1])

    def verify_rows(self, tree: Tree) -> SeqRows:
        """The tree's nodes after the committed prefix, each seeing the prefix and its ancestors."""
        n = len(tree)
        start = self.cache.length
        if tree.tokens[0] != self.root:
            raise InvalidRequest(f"tree root {tree.tokens[0]} is not the last committed token {self.root}")
        if start + n > self.cache.capacity:
            raise InvalidRequest(f"context full: {start} committed + {n} tree tokens > {self.cache.capacity}")
        depth = [0] * n
        for i in range(1, n):
            depth[i] = depth[tree.parents[i]] + 1
        mask = ancestor_matrix(tree.parents, self.device) if n > 1 else None
        return SeqRows(self.cache, list(tree.tokens), [start + d for d in depth], start, start, mask, Logits.ALL,
                       self.key)

    def commit_verify(self, tree: Tree, logits: torch.Tensor | None, decision: Decision | None = None
                      ) -> RoundResult:
        """Accept the longest lossless path, keep only its KV; `decision` as in commit_prefill."""
        path, bonus = decision if decision is not None else self.decide(logits, tree)
        start = self.cache.length
        self.cache.move_slots([start + i for i in path], start)
        self.cache.length = start + len(path)
        self.root = bonus
        committed = [tree.tokens[i] for i in path[1:]] + [bonus]
        self.tokens.extend(committed)
        return RoundResult(committed, len(path) - 1, len(tree))

    def decide(self, logits: torch.Tensor, tree: Tree) -> Decision:
        """Which path of `tree` the target accepts, and its bonus token (logits: one row per node)."""
        if self.sampling.greedy:
            return greedy_accept(logits, tree.tokens, tree.parents)
        probs = probs_from_logits(logits, self.sampling)
        if len(tree) == 1:
            return [0], sample(probs[0], self.generator)
        q = tree.draft_probs if tree.draft_probs is not None else torch.zeros_like(probs)
        return speculative_sampling_accept(probs, q, tree.tokens, tree.parents, self.generator)
