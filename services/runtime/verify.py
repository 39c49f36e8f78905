"""Lossless tree verification: which path of a speculated tree the target accepts.

A tree arrives as parallel lists (tokens, parents) in topological order: node 0 is the root (the
last committed token), parents[i] < i, and siblings appear in the order the draft proposed them.
Both functions return (path, bonus): the accepted node indices starting with 0, and the token the
target itself produces after the last accepted node.
"""
from __future__ import annotations

import torch


def children_of(parents: list[int]) -> list[list[int]]:
    children: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents[1:], start=1):
        children[p].append(i)
    return children


def greedy_accept(logits: torch.Tensor, tokens: list[int], parents: list[int]) -> tuple[list[int], int]:
    """Follow the target's argmax from the root while the tree holds it; the first miss is the bonus."""
    best = logits.argmax(-1).tolist()
    children = children_of(parents)
    path, node = [0], 0
    while True:
        nxt = next((c for c in children[node] if tokens[c] == best[node]), None)
        if nxt is None:
            return path, best[node]
        path.append(nxt)
        node = nxt


def speculative_sampling_accept(p: torch.Tensor, q: torch.Tensor, tokens: list[int], parents: list[int],
                                generator: torch.Generator) -> tuple[list[int], int]:
    """Multi-step speculative sampling over a tree (SpecInfer), children drawn WITHOUT replacement.

    p[i]: the target's distribution after node i; q[i]: the draft distribution node i's children
    were drawn from, in sibling order, without replacement (Gumbel-top-k).

    Proof sketch (per node, by induction on the number of untried children). Let p_j, q_j be the
    current target residual and draft distributions when child c_j is tried; c_j ~ q_j because the
    draft drew without replacement and q_j is q with the earlier siblings removed and renormalised.
    Accept c_j with probability min(1, p_j(c_j)/q_j(c_j)); on rejection continue with
    p_{j+1} = norm(max(p_j - q_j, 0)) and q_{j+1} = q_j without c_j. If the continuation outputs a
    token distributed as p_{j+1} whatever c_j was (induction hypothesis; with no child left we sample
    p_{j+1} directly), then P(x) = min(p_j, q_j)(x) + (1 - sum min(p_j, q_j)) * p_{j+1}(x) = p_j(x),
    the classic rejection-sampling identity. So each emitted token is distributed exactly as the
    target's p at the accepted node, and by the chain rule the whole sequence is distributed as
    target-only sampling. The draft may choose its tree any way it likes, as long as the children
    present at a node are the first k draws of its without-replacement sequence and k does not
    depend on what those draws were (sending a second child only when it is a likely token, say,
    biases the output; see draft_session).
    """
    children = children_of(parents)
    path, node = [0], 0
    while True:
        residual = p[node].clone()
        draft = q[node].clone()
        accepted = None
        for child in children[node]:
            tok = tokens[child]
            qt, pt = float(draft[tok]), float(residual[tok])
            if qt > 0.0 and float(torch.rand((), generator=generator, device=generator.device)) * qt < pt:
                accepted = child
                break
            residual = (residual - draft).clamp_(min=0.0)
            mass = float(residual.sum())
            if mass <= 0.0:  # p_j == q_j: rejection had probability 0; keep p_j as the fallback
                residual = p[node].clone()
            else:
                residual /= mass
            draft[tok] = 0.0
            left = float(draft.sum())
            if left <= 0.0:
                break
            draft /= left
        if accepted is None:
            return path, int(torch.multinomial(residual, 1, generator=generator))
        path.append(accepted)
        node = accepted
