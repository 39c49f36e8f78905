"""Attention masks for tree forwards: each node sees the committed prefix, its ancestors and itself."""
from __future__ import annotations

import torch


def ancestor_matrix(parents: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, N] bool, row i True at i and at every ancestor of i (parents[i] < i, root's parent -1)."""
    n = len(parents)
    anc = torch.zeros(n, n, dtype=torch.bool, device=device)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] = anc[p]
        anc[i, i] = True
    return anc


def tree_mask(prefix_len: int, tree_rows: torch.Tensor) -> torch.Tensor:
    """[N, prefix_len + T] bool: every row sees the whole prefix, then its own tree columns."""
    n, t = tree_rows.shape
    mask = torch.empty(n, prefix_len + t, dtype=torch.bool, device=tree_rows.device)
    mask[:, :prefix_len] = True
    mask[:, prefix_len:] = tree_rows
    return mask
