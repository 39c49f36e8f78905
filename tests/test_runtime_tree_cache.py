"""The evolving tree cache (runtime.draft_session) against from-scratch forwards.

A hypothesis state machine drives one DraftSession through random expand() / select_subtree() /
reroot(verified) sequences. verified is what a target could send back: a random root-to-node path
through the current tree (forwarded or pending nodes) plus a bonus token that is a forwarded child,
a pending child, or a token the tree does not hold; also fully rejected trees (verified = [bonus]) and
verified tokens the tree never held at all. After every step:

- committed prefix KV (cache slots [0, length)) == KV of the committed tokens run from scratch;
- every forwarded tree node's KV (slot length + node slot) == the last KV of committed + its path run
  from scratch as a plain sequence;
- every forward the session ran produced the logits of its nodes' from-scratch sequences, and the
  children it proposed are the ones those logits give (greedy: top-w in order; sampling: the stored
  draft distribution q equals the from-scratch one and every child has q > 0);
- TokenTree invariants and the subtree select_subtree returns (connected, rooted at 0, each node's
  children a prefix of its children in proposal order).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from specmesh.services.runtime.draft_session import DraftSession, TokenTree
from specmesh.services.runtime.forward_batch import Logits, Runner
from specmesh.services.runtime.tree_params import TreeParams
from specmesh.services.runtime.sampling import SamplingParams, probs_from_logits

from runner_testing import run_rows

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 48
KV_ATOL = 2e-5
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def draft_model(make_hf_model: Any) -> Any:
    return make_hf_model("qwen2", seed=7, vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2)[1]


class Driver:
    """Runs a DraftSession's forwards through the runner as the draft engine does (next_rows ->
    Runner.forward -> commit) and records each forward's rows and logits."""

    def __init__(self, model: Any) -> None:
        self.runner = Runner(model, max_rows=256)
        self.calls: list[dict] = []

    def run(self, sess: DraftSession) -> int:
        """One forward; returns the leaves an expansion ran, 1 for a catch-up, 0 when nothing ran."""
        rows = sess.next_rows(self.runner.max_rows)
        if rows is None:
            return 0
        logits = self.runner.forward_one(rows)
        self.calls.append(dict(tokens=list(rows.tokens), start=rows.start,
                               logits=logits.float().clone() if logits is not None else None))
        return sess.commit(rows, logits) or 1

    def start(self, sess: DraftSession, prompt: list[int]) -> None:
        sess.start(prompt)
        self.run(sess)

    def expand(self, sess: DraftSession) -> int:
        assert sess.ready
        return self.run(sess)

    def reroot(self, sess: DraftSession, verified: list[int]) -> Any:
        result = sess.reroot(verified)
        if not sess.ready:
            self.run(sess)
        return result


class Reference:
    """From-scratch forwards of plain sequences (fresh cache, causal), memoised per sequence."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.memo: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def run(self, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v) [layers, kv_heads, len, head_dim] of every position, and the last position's logits."""
        key = tuple(seq)
        if key not in self.memo:
            n = len(seq)
            cache = self.model.new_cache(n)
            logits = run_rows(self.model, seq, cache, logits=Logits.LAST)
            self.memo[key] = (cache.k.clone(), cache.v.clone(), logits[0])
        return self.memo[key]


def path_of(tree: TokenTree, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


def check_tree_invariants(sess: DraftSession) -> None:
    t, p = sess.tree, sess.params
    n = len(t)
    assert n >= 1 and len(t.parents) == len(t.depth) == len(t.score) == len(t.kv_slot) == len(t.children) == n
    assert t.parents[0] == -1 and t.depth[0] == 0 and t.kv_slot[0] == 0, "root must be node 0, forwarded in slot 0"
    assert n <= max(p.max_nodes, 1)
    for i in range(1, n):
        par = t.parents[i]
        assert 0 <= par < i, f"parent of {i} is {par}: not topological"
        assert t.depth[i] == t.depth[par] + 1
        assert t.score[i] <= t.score[par], "a child never scores above its parent"
        if t.kv_slot[i] >= 0:
            assert t.kv_slot[par] >= 0 and t.kv_slot[par] < t.kv_slot[i], "forwarded node with a pending/later parent"
    for i in range(n):
        kids = t.children[i]
        assert kids == sorted(kids) and all(t.parents[c] == i for c in kids)
        toks = [t.tokens[c] for c in kids]
        assert len(set(toks)) == len(toks), "siblings must be distinct tokens"
        assert all(t.score[a] >= t.score[b] for a, b in zip(kids, kids[1:])), "sibling scores must not increase"
        assert len(kids) <= p.width
    assert sum(len(k) for k in t.children) == n - 1
    slots = sorted(s for s in t.kv_slot if s >= 0)
    assert slots == list(range(sess.forwarded)), "forwarded nodes must fill slots 0..forwarded-1"
    assert sess.forwarded <= p.max_tree
    # The ancestry matrix over slots (the source of every expansion's attention mask) must be exact,
    # also for rows no expansion has used yet.
    f = sess.forwarded
    expect = torch.zeros(f, f, dtype=torch.bool)
    for i in range(n):
        if t.kv_slot[i] >= 0:
            for a in path_of(t, i):
                expect[t.kv_slot[i], t.kv_slot[a]] = True
    assert torch.equal(sess._anc[:f, :f].cpu(), expect), "ancestry matrix does not match the tree"


def check_subtree(sess: DraftSession, size: int) -> None:
    t = sess.tree
    tokens, parents, q = sess.select_subtree(size)
    assert len(tokens) == len(parents) == min(size, len(t))
    assert parents[0] == -1 and tokens[0] == t.tokens[0]
    node_of = [0]  # subtree index -> tree node, by walking tokens (siblings are distinct)
    for i in range(1, len(tokens)):
        assert 0 <= parents[i] < i, "subtree must be topological and connected to the root"
        node = t.child_with_token(node_of[parents[i]], tokens[i])
        assert node is not None, "subtree node is not in the tree"
        node_of.append(node)
    assert len(set(node_of)) == len(node_of)
    for i, node in enumerate(node_of):
        chosen = [node_of[j] for j in range(len(tokens)) if parents[j] == i]
        assert chosen == t.children[node][:len(chosen)], "children must be a prefix in proposal order"
        if chosen:
            assert t.kv_slot[node] >= 0, "a node with children must have been forwarded"
    if sess.sampling.greedy:
        assert q is None
    else:
        assert q is not None and q.shape == (len(tokens), sess.vocab_width)
        for i, node in enumerate(node_of):
            if t.kv_slot[node] >= 0:
                torch.testing.assert_close(q[i], sess._q[t.kv_slot[node]])
                if any(parents[j] == i for j in range(len(tokens))):
                    assert abs(float(q[i].sum()) - 1.0) < 1e-4


def check_against_scratch(sess: DraftSession, committed: list[int], ref: Reference, recorded: list[dict]) -> None:
    t, cache = sess.tree, sess.cache
    length = cache.length
    assert length == len(committed) - 1, "every committed token but the root is in the prefix"
    assert t.tokens[0] == committed[-1], "the root is the last committed token"
    k, v, _ = ref.run(committed)
    torch.testing.assert_close(cache.k[:, :, :length + 1], k, atol=KV_ATOL, rtol=0, msg=lambda m: f"prefix K: {m}")
    torch.testing.assert_close(cache.v[:, :, :length + 1], v, atol=KV_ATOL, rtol=0, msg=lambda m: f"prefix V: {m}")
    node_by_slot = {t.kv_slot[i]: i for i in range(len(t)) if t.kv_slot[i] >= 0}
    for slot, node in node_by_slot.items():
        seq = committed + [t.tokens[j] for j in path_of(t, node)[1:]]
        rk, rv, rlogits = ref.run(seq)
        torch.testing.assert_close(cache.k[:, :, length + slot], rk[:, :, -1], atol=KV_ATOL, rtol=0,
                                   msg=lambda m, s=slot: f"tree slot {s} K: {m}")
        torch.testing.assert_close(cache.v[:, :, length + slot], rv[:, :, -1], atol=KV_ATOL, rtol=0,
                                   msg=lambda m, s=slot: f"tree slot {s} V: {m}")
        kids = [t.tokens[c] for c in t.children[node]]
        if sess.sampling.greedy:
            top = torch.topk(rlogits, len(kids)).indices.tolist()
            assert kids == top, f"node {node}: children {kids} are not the top-{len(kids)} {top}"
        else:
            q = probs_from_logits(rlogits[None], sess.sampling)[0]
            torch.testing.assert_close(sess._q[slot], q, atol=1e-5, rtol=1e-4)
            assert all(float(q[x]) > 0 for x in kids)
    # logits of the forwards this step ran: rows map to tree slots (expand) or to the new root
    for call in recorded:
        if call["start"] >= length:  # expansion: rows are consecutive slots after base
            base = call["start"] - length
            for j, tok in enumerate(call["tokens"]):
                node = node_by_slot[base + j]
                assert t.tokens[node] == tok
                seq = committed + [t.tokens[x] for x in path_of(t, node)[1:]]
                torch.testing.assert_close(call["logits"][j], ref.run(seq)[2], atol=LOGIT_ATOL, rtol=LOGIT_ATOL)
        else:  # catch-up forward of a new tree: one logits row, the root's
            assert call["tokens"][-1] == committed[-1]
            torch.testing.assert_close(call["logits"][-1], ref.run(committed)[2], atol=LOGIT_ATOL, rtol=LOGIT_ATOL)


def draw_verified(data: st.DataObject, tree: TokenTree) -> list[int]:
    """Tokens a target could verify: path tokens below the root, then the bonus."""
    path = [0]
    while tree.children[path[-1]] and data.draw(st.booleans(), label="go deeper"):
        path.append(data.draw(st.sampled_from(tree.children[path[-1]]), label="child"))
    verified = [tree.tokens[n] for n in path[1:]]
    last = path[-1]
    kids = tree.children[last]
    forwarded = [c for c in kids if tree.kv_slot[c] >= 0]
    pending = [c for c in kids if tree.kv_slot[c] < 0]
    absent = [x for x in range(VOCAB) if x not in {tree.tokens[c] for c in kids}]
    kinds = ["absent", "missing"] + ["forwarded"] * bool(forwarded) * 3 + ["pending"] * bool(pending) * 2
    kind = data.draw(st.sampled_from(kinds), label="bonus kind")
    if kind == "forwarded":
        return verified + [tree.tokens[data.draw(st.sampled_from(forwarded), label="bonus")]]
    if kind == "pending":
        return verified + [tree.tokens[data.draw(st.sampled_from(pending), label="bonus")]]
    bonus = data.draw(st.sampled_from(absent), label="bonus")
    if kind == "missing":  # committed tokens the tree never held, then anything
        extra = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3), label="extra")
        return verified + [bonus] + extra
    return verified + [bonus]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_evolving_tree_cache_equals_from_scratch(draft_model: Any, data: st.DataObject) -> None:
    width = data.draw(st.integers(1, 4), label="width")
    params = TreeParams(width=width, subtree_size=8, depth=1,
                        max_tree=data.draw(st.integers(width + 1, 14), label="max_tree"),
                        max_nodes=data.draw(st.integers(2, 40), label="max_nodes"))
    sampling = data.draw(st.sampled_from([SamplingParams(), SamplingParams(temperature=1.0, seed=3),
                                          SamplingParams(temperature=0.7, top_k=6, top_p=0.9, seed=5)]),
                         label="sampling")
    prompt = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6), label="prompt")
    model = Driver(draft_model)
    ref = Reference(draft_model)
    sess = DraftSession(draft_model.new_cache(160), params, sampling, VOCAB)
    model.start(sess, prompt)
    committed = list(prompt)
    check_tree_invariants(sess)
    check_against_scratch(sess, committed, ref, model.calls)
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        model.calls = []
        op = data.draw(st.sampled_from(["expand"] * 3 + ["select+reroot", "reroot"]), label="op")
        if op == "expand":
            before = sess.forwarded
            ran = model.expand(sess)
            assert sess.forwarded == before + ran and len(model.calls) == (1 if ran else 0)
        else:
            if op == "select+reroot":
                check_subtree(sess, data.draw(st.integers(1, 12), label="subtree size"))
            verified = draw_verified(data, sess.tree)
            result = model.reroot(sess, verified)
            committed += verified
            assert result.hit == (not model.calls), "a hit must not run the draft; a miss must"
        check_tree_invariants(sess)
        check_against_scratch(sess, committed, ref, model.calls)
        check_subtree(sess, data.draw(st.integers(1, 12), label="subtree size"))


def ancestry(tree: TokenTree, nodes: list[int]) -> torch.Tensor:
    """[m, m] bool over `nodes` (in the given order): row i marks i and its ancestors among nodes."""
    pos = {n: i for i, n in enumerate(nodes)}
    out = torch.zeros(len(nodes), len(nodes), dtype=torch.bool)
    for n in nodes:
        for a in path_of(tree, n):
            if a in pos:
                out[pos[n], pos[a]] = True
    return out


@pytest.mark.parametrize("accepted", [0, 1])
def test_reroot_hit_keeps_subtree_without_forwarding(draft_model: Any, accepted: int) -> None:
    """Greedy, deterministic: grow a tree, commit a path of it (`accepted` tokens + a forwarded bonus)
    whose surviving subtree has a different shape than the top of the old tree (so stale ancestry
    would show); the re-rooted tree keeps exactly the surviving forwarded nodes without running the
    draft, and growing it further still matches from-scratch forwards."""
    ref = Reference(draft_model)
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, VOCAB, (4,), generator=gen).tolist()
        model = Driver(draft_model)
        sess = DraftSession(draft_model.new_cache(96), TreeParams(width=2, max_tree=40), SamplingParams(), VOCAB)
        model.start(sess, prompt)
        for _ in range(12):
            model.expand(sess)
        t = sess.tree
        old_anc = sess._anc.clone()
        for node in range(1, len(t)):
            path = path_of(t, node)
            if len(path) != accepted + 2 or t.kv_slot[node] < 0:
                continue
            survivors = sorted((n for n in t.subtree(node) if t.kv_slot[n] >= 0), key=lambda n: t.kv_slot[n])
            m = len(survivors)
            if m >= 3 and not torch.equal(ancestry(t, survivors), old_anc[:m, :m]):
                break
        else:
            continue
        break
    else:
        pytest.fail("no tree with a differently shaped surviving subtree found; the test needs one")
    verified = [t.tokens[n] for n in path[1:]]
    model.calls = []
    result = model.reroot(sess, verified)
    assert result.hit and not model.calls
    assert sess.forwarded == m and result.kept_nodes == len(t.subtree(node))
    assert sess.cache.length == len(prompt) - 1 + accepted + 1
    committed = prompt + verified
    check_tree_invariants(sess)
    check_against_scratch(sess, committed, ref, [])
    for _ in range(3):
        model.calls = []
        assert model.expand(sess)
        check_tree_invariants(sess)
        check_against_scratch(sess, committed, ref, model.calls)


def test_sampling_reroot_redraws_draws_the_round_could_see(draft_model: Any) -> None:
    """Temperature > 0: re-rooting at a node whose children were already forwarded when the subtree
    was chosen keeps the node (KV, q; no forward) but drops its descendants and draws its children
    afresh; children forwarded only after the choice carry over with their subtrees."""
    ref = Reference(draft_model)
    params = TreeParams(width=2, subtree_size=3, max_tree=32)
    for seed in range(30):
        sampling = SamplingParams(temperature=1.0, seed=seed)
        model = Driver(draft_model)
        sess = DraftSession(draft_model.new_cache(96), params, sampling, VOCAB)
        model.start(sess, [5, 6, 7])
        model.expand(sess)
        model.expand(sess)
        sess.select_subtree(params.subtree_size)
        chosen_at = sess.forwarded
        model.expand(sess)  # grows after the choice, as the mesh draft does while the target verifies
        t = sess.tree
        seen = [c for c in t.children[0] if any(0 <= t.kv_slot[g] < chosen_at for g in t.children[c])]
        fresh = [c for c in t.children[0] if t.kv_slot[c] >= 0 and c not in seen
                 and any(t.kv_slot[g] >= chosen_at for g in t.children[c])]
        if seen and fresh:
            break
    else:
        pytest.fail("no tree with both kinds of re-root target found")
    kept = sum(t.kv_slot[n] >= 0 for n in t.subtree(fresh[0]))
    snapshot = (list(t.tokens), list(t.parents), list(t.kv_slot))
    committed = [5, 6, 7]

    # 1. a node the round could see: kept alone, children re-drawn from its stored q
    q_before = sess._q[t.kv_slot[seen[0]]].clone()
    model.calls = []
    result = model.reroot(sess, [t.tokens[seen[0]]])
    committed = committed + [snapshot[0][seen[0]]]
    assert result.hit and not model.calls
    assert sess.forwarded == 1 and all(s < 0 for s in sess.tree.kv_slot[1:])
    assert 1 <= len(sess.tree.children[0]) <= params.width
    torch.testing.assert_close(sess._q[0], q_before)
    check_tree_invariants(sess)
    check_against_scratch(sess, committed, ref, [])

    # 2. rebuild the same situation and re-root at a node that only grew after the choice
    sess = DraftSession(draft_model.new_cache(96), params, sampling, VOCAB)
    model.start(sess, [5, 6, 7])
    model.expand(sess)
    model.expand(sess)
    sess.select_subtree(params.subtree_size)
    model.expand(sess)
    assert (sess.tree.tokens, sess.tree.parents, sess.tree.kv_slot) == snapshot, "seeded growth must repeat"
    model.calls = []
    result = model.reroot(sess, [sess.tree.tokens[fresh[0]]])
    assert result.hit and not model.calls and sess.forwarded == kept
    check_tree_invariants(sess)
    check_against_scratch(sess, [5, 6, 7, snapshot[0][fresh[0]]], ref, [])
