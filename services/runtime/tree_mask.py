"""Tree masks: each node sees its ancestors and itself (the prefix is a length, never a mask)."""
from __future__ import annotations

import torch


def ancestor_matrix(parents: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, N] bool, row i True at i and at every ancestor of i (parents[i] < i, root's parent -1)."""
    n = len(parents)
    anc = torch.zeros(n, n, dtype=torch.bool)  # built on the host, then one copy to the device
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] = anc[p]
        anc[i, i] = True
    return anc.to(device)
