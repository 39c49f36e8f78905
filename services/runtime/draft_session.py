"""The draft side of one request: the token tree and the evolving tree KV cache.

KV layout: [committed prefix | tree slots]. A tree node is either *forwarded* (its KV sits in a
tree slot, its children have been proposed) or *pending* (a proposed token, not yet run). One
`expand` runs the `width` best pending leaves in a single non-square forward (new leaves against
prefix + tree) and proposes their children. `reroot` commits verified tokens: the accepted path's
KV joins the prefix, the surviving subtree's KV slides right after it, dead branches are dropped,
nothing is recomputed; only tokens the tree never ran (a miss) are forwarded.

The session never runs the model: `next_rows` says what its next forward is (a chunk of tokens
to catch up on, or an expansion), the draft engine batches several sessions' rows into one
forward (forward_batch.Runner), and `commit` takes this session's logits.

Node scores are cumulative log-probabilities, never increasing from parent to child nor along a
sibling list, and ties break by node index (parents and earlier siblings have smaller indices), so
the best `bs` nodes always form a subtree whose children at each node are a prefix of the
proposal order: exactly what greedy and without-replacement speculative sampling verification need.

Sampling (temperature > 0) needs two more rules, or the output is no longer distributed as the
target's (verify.speculative_sampling_accept assumes the children sent at a node are the first k
draws from q, with k not depending on what was drawn):
  - the j-th draw at a node scores as the j-th largest draft probability there (a function of the
    parent only), not as its own probability. Otherwise a second child is sent only when it is a
    likely token and the verifier sees a biased draw (tests/test_runtime_sampling.py has a pair
    where the first token is off by 0.35 in L1);
  - draws that may have shaped the round just verified are not reused as fresh draws. With rank
    scores the subtree of an unsent node (the bonus always is one) changes which nodes were sent
    only through the tree's size limits (max_tree, max_nodes, nodes with fewer than `width`
    possible children); to stay exact anyway, a new root that already had forwarded children when
    the subtree was chosen keeps its KV and q, but its descendants are dropped and its children
    re-drawn (no forward). Whatever grew after the choice carries over. Serially this costs about
    nothing: at temperature > 0 the bonus is rarely a forwarded node.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InvalidRequest
from .forward_batch import Logits, SeqRows, causal
from .kv_cache import KVCache
from .sampling import SamplingParams, probs_from_logits
from .tree_params import TreeParams


@dataclass
class TokenTree:
    """Parallel lists, index order is topological (parent index < child index)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    kv_slot: list[int] = field(default_factory=list)  # tree-local KV slot, -1 while pending
    children: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, score: float, kv_slot: int = -1) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.depth.append(0 if parent < 0 else self.depth[parent] + 1)
        self.score.append(score)
        self.kv_slot.append(kv_slot)
        self.children.append([])
        if parent >= 0:
            self.children[parent].append(len(self.tokens) - 1)
        return len(self.tokens) - 1

    def child_with_token(self, node: int, token: int) -> int | None:
        return next((c for c in self.children[node] if self.tokens[c] == token), None)

    def subtree(self, node: int) -> list[int]:
        """node and all its descendants, in index order."""
        out, stack = [], [node]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(self.children[n])
        return sorted(out)

    def best(self, k: int, candidates: list[int] | None = None) -> list[int]:
        pool = range(len(self.tokens)) if candidates is None else candidates
        return sorted(pool, key=lambda i: (-self.score[i], i))[:k]


@dataclass
class RerootResult:
    hit: bool  # the new root was already forwarded: its subtree and KV carry over
    kept_nodes: int
    forwarded_tokens: int  # tokens the draft had to run because the tree never ran them
    tree_hits: int  # verified tokens before the bonus that lay on a path of the tree (accepted draft
    # tokens; tokens the target committed alone count only where the tree proposed them)


@dataclass
class _CatchUp:
    """A chunk of tokens the draft never ran; the last chunk's last token becomes the root."""

    n: int
    last: bool


@dataclass
class _Expansion:
    leaves: list[int]


class DraftSession:
    def __init__(self, cache: KVCache, params: TreeParams, sampling: SamplingParams, vocab_width: int,
                 device: torch.device | str = "cpu", key: int = 0) -> None:
        self.cache = cache
        self.params = params
        self.sampling = sampling
        self.vocab_width = vocab_width
        self.device = torch.device(device)
        self.key = key
        self.generator = sampling.generator(salt=2, device=self.device) if not sampling.greedy else None
        self.tree = TokenTree()
        self.tokens: list[int] = []  # prompt + verified tokens; the first cache.length have KV
        self.forwarded = 0  # tree slots in use
        self._anc = torch.zeros(params.max_tree, params.max_tree, dtype=torch.bool, device=self.device)
        # Draft distributions of forwarded nodes, only needed (and only allocated) when sampling.
        self._q = None if sampling.greedy else torch.zeros(params.max_tree, self.vocab_width, device=self.device)
        self._chosen_at: int | None = None  # forwarded slots when the last subtree was chosen
        self._to_run: list[int] = []  # tokens to catch up on before the next tree exists
        self._inflight: _CatchUp | _Expansion | None = None

    # -- growing -----------------------------------------------------------------------------
    def start(self, prompt: list[int], cached: int = 0) -> None:
        """Take the prompt; its last token becomes the root of the first tree once it has run.

        `cached`: the KV of the first `cached` prompt tokens is already in the cache (copied from
        the prefix cache); the rest is caught up on. The last prompt token always runs."""
        if not prompt:
            raise InvalidRequest("prompt is empty")
        if not 0 <= cached < len(prompt):
            raise InvalidRequest(f"{cached} cached tokens of a {len(prompt)}-token prompt: the last one must run")
        self.tokens = list(prompt)
        self.cache.length = cached
        self._catch_up(prompt[cached:])

    @property
    def ready(self) -> bool:
        """A tree exists (nothing left to catch up on): it can be expanded and sent."""
        return not self._to_run

    @property
    def root_position(self) -> int:
        """The root token's index in prompt + output (its KV sits right after the prefix)."""
        return self.cache.length

    def can_expand(self) -> bool:
        return self.ready and self.forwarded < self.params.max_tree and any(s < 0 for s in self.tree.kv_slot)

    def next_rows(self, budget: int) -> SeqRows | None:
        """This session's next forward, at most `budget` rows: catch-up first, else an expansion."""
        if self._to_run:
            return self._catch_up_rows(budget)
        return self._expansion_rows(budget)

    def commit(self, rows: SeqRows, logits: torch.Tensor | None) -> int:
        """Take the logits of the rows `next_rows` prepared; returns how many leaves ran (0 for catch-up)."""
        work, self._inflight = self._inflight, None
        if isinstance(work, _CatchUp):
            del self._to_run[:work.n]
            self.cache.length = rows.end - 1 if work.last else rows.end
            if work.last:
                self.tree = TokenTree()
                self.tree.add(rows.tokens[-1], -1, 0.0, kv_slot=0)
                self.forwarded = 1
                self._chosen_at = None
                self._anc[0].zero_()
                self._anc[0, 0] = True
                self._propose_children([0], logits)
            return 0
        self._propose_children(work.leaves, logits)
        return len(work.leaves)

    def _catch_up_rows(self, budget: int) -> SeqRows:
        n = min(budget, len(self._to_run))
        last = n == len(self._to_run)
        start = self.cache.length
        self._inflight = _CatchUp(n, last)
        return SeqRows(self.cache, self._to_run[:n], list(range(start, start + n)), start, start,
                       causal(n, self.device), Logits.LAST if last else Logits.NONE, self.key)

    def _expansion_rows(self, budget: int) -> SeqRows | None:
        """The `width` best pending leaves, each seeing the prefix plus its ancestors (non-square)."""
        t, p = self.tree, self.params
        room = min(p.width, budget, p.max_tree - self.forwarded,
                   self.cache.capacity - self.cache.length - self.forwarded)
        limit = self.cache.capacity - self.cache.length - 1
        pending = [i for i, s in enumerate(t.kv_slot) if s < 0 and t.depth[i] < limit]
        leaves = sorted(t.best(room, pending)) if room > 0 else []
        if not leaves:
            return None
        n, base = len(leaves), self.forwarded
        new_slots = torch.arange(base, base + n, device=self.device)
        parent_slots = torch.tensor([t.kv_slot[t.parents[i]] for i in leaves], device=self.device)
        self._anc[new_slots] = self._anc[parent_slots]
        self._anc[new_slots, new_slots] = True
        for j, i in enumerate(leaves):
            t.kv_slot[i] = base + j
        self.forwarded += n
        length = self.cache.length
        self._inflight = _Expansion(leaves)
        return SeqRows(self.cache, [t.tokens[i] for i in leaves], [length + t.depth[i] for i in leaves],
                       length + base, length, self._anc[base:base + n, :base + n], Logits.ALL, self.key)

    def _propose_children(self, nodes: list[int], logits: torch.Tensor) -> None:
        logits = self._fit_vocab(logits)
        if self.sampling.greedy:
            logp = torch.log_softmax(logits.float(), dim=-1)  # w rows: scores shape the tree
            top = torch.topk(logp, min(self.params.width, logp.shape[-1]), dim=-1)
            self._add_children(nodes, top.values.tolist(), top.indices.tolist())
        else:
            probs = probs_from_logits(logits, self.sampling)
            self._q[[self.tree.kv_slot[i] for i in nodes]] = probs
            self._draw_children(nodes, probs)

    def _draw_children(self, nodes: list[int], probs: torch.Tensor) -> None:
        """Sampling: `width` draws without replacement from q (Gumbel-top-k), in draw order."""
        logp = probs.log()
        w = min(self.params.width, logp.shape[-1])
        uniform = torch.rand(logp.shape, generator=self.generator, device=logp.device)
        gumbel = -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0)))
        ids = torch.topk(logp + gumbel, w, dim=-1).indices.tolist()
        # Scores by draw rank, not by the drawn token (see the module docstring): the j-th draw scores
        # as the j-th largest probability. A -inf score (fewer than j tokens possible) ends the list.
        self._add_children(nodes, torch.topk(logp, w, dim=-1).values.tolist(), ids)

    def _add_children(self, nodes: list[int], values: list[list[float]], ids: list[list[int]]) -> None:
        t = self.tree
        room = self.params.max_nodes - len(t)
        for node, vals, toks in zip(nodes, values, ids):
            score = t.score[node]
            for v, tok in zip(vals, toks):
                if room <= 0 or v == float("-inf"):
                    break
                score = min(score, t.score[node] + v)  # keeps sibling scores non-increasing
                t.add(tok, node, score)
                room -= 1

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Cut or pad draft logits to the target's vocab width (Qwen pairs differ by padding only)."""
        v = logits.shape[-1]
        if v == self.vocab_width:
            return logits
        if v > self.vocab_width:
            return logits[:, :self.vocab_width]
        return torch.nn.functional.pad(logits, (0, self.vocab_width - v), value=float("-inf"))

    # -- sending -----------------------------------------------------------------------------
    def select_subtree(self, size: int) -> tuple[list[int], list[int], torch.Tensor | None]:
        """The `size` most probable nodes (a subtree rooted at the root), as (tokens, parents, q)."""
        t = self.tree
        self._chosen_at = self.forwarded
        chosen = sorted(t.best(size))
        local = {node: i for i, node in enumerate(chosen)}
        tokens = [t.tokens[i] for i in chosen]
        parents = [local[t.parents[i]] if i else -1 for i in chosen]
        q = None
        if self._q is not None:
            q = torch.zeros(len(chosen), self.vocab_width, device=self._q.device)
            fwd = [i for i, node in enumerate(chosen) if t.kv_slot[node] >= 0]
            q[fwd] = self._q[[t.kv_slot[chosen[i]] for i in fwd]]
        return tokens, parents, q

    # -- committing ----------------------------------------------------------------------------
    def reroot(self, verified: list[int]) -> RerootResult:
        """Commit the target's verified tokens (accepted draft tokens + bonus) and move the root."""
        self.tokens.extend(verified)
        t = self.tree
        path, node = [0], 0
        for tok in verified[:-1]:
            nxt = t.child_with_token(node, tok)
            if nxt is None:
                break
            path.append(nxt)
            node = nxt
        missing = verified[len(path) - 1:-1]  # committed tokens the tree does not hold
        new_root = t.child_with_token(node, verified[-1]) if not missing else None
        ran = [n for n in path if t.kv_slot[n] >= 0]  # a prefix of the path: ancestors run first
        all_ran = len(ran) == len(path)
        if all_ran and new_root is not None and t.kv_slot[new_root] >= 0:
            keep = t.subtree(new_root)
            seen = self.forwarded if self._chosen_at is None else self._chosen_at
            redraw = not self.sampling.greedy and any(0 <= t.kv_slot[c] < seen for c in t.children[new_root])
            if redraw:  # its draws may have shaped the verified round: keep the node, draw afresh
                keep = [new_root]
            keep_ran = sorted((n for n in keep if t.kv_slot[n] >= 0), key=lambda n: t.kv_slot[n])
            base = self.cache.length
            self.cache.move_slots([base + t.kv_slot[n] for n in ran + keep_ran], base)
            self.cache.length = base + len(ran)
            self._rebuild(keep, keep_ran)
            if redraw:
                self._draw_children([0], self._q[:1])
            return RerootResult(True, len(keep), 0, len(path) - 1)
        base = self.cache.length
        if ran:
            self.cache.move_slots([base + t.kv_slot[n] for n in ran], base)
            self.cache.length = base + len(ran)
        catch_up = [t.tokens[n] for n in path[len(ran):]] + missing + [verified[-1]]
        self._catch_up(catch_up)
        return RerootResult(False, 1, len(catch_up), len(path) - 1)

    def _rebuild(self, keep: list[int], keep_ran: list[int]) -> None:
        """Re-index the surviving subtree (root first) and its slots, preserving their order."""
        old = self.tree
        new_index = {n: i for i, n in enumerate(keep)}
        new_slot = {n: s for s, n in enumerate(keep_ran)}
        tree = TokenTree()
        root_score = old.score[keep[0]]
        for n in keep:
            tree.add(old.tokens[n], new_index[old.parents[n]] if n != keep[0] else -1,
                     old.score[n] - root_score, new_slot.get(n, -1))
        old_slots = torch.tensor([old.kv_slot[n] for n in keep_ran], device=self.device)
        m = len(keep_ran)
        # Ancestry restricted to the subtree is unchanged, so it is one gather, not a rebuild.
        self._anc[:m, :m] = self._anc[old_slots][:, old_slots]
        if self._q is not None:
            self._q[:m] = self._q[old_slots]
        self.tree, self.forwarded = tree, m
        self._chosen_at = None

    def _catch_up(self, tokens: list[int]) -> None:
        """Tokens the draft never ran: all but the last join the prefix, the last becomes the root."""
        if self.cache.length + len(tokens) > self.cache.capacity:
            raise InvalidRequest(f"context full: {self.cache.length + len(tokens)} tokens > {self.cache.capacity}")
        self._to_run = list(tokens)
        self.tree = TokenTree()
        self.forwarded = 0
        self._chosen_at = None
