"""One sequence through the runner, for tests that check the model itself (not the engines)."""
from __future__ import annotations

from typing import Any

import torch

from specmesh.services.runtime.forward_batch import Logits, Runner, SeqRows, causal


def run_rows(model: Any, tokens: list[int], cache: Any, start: int = 0, *, positions: list[int] | None = None,
             mask: torch.Tensor | None | str = "causal", logits: Logits = Logits.ALL) -> torch.Tensor:
    """Run `tokens` at cache slots [start, start + n), seeing the whole prefix [0, start).

    mask: "causal" (a prefill chunk), None (every row sees every slot) or [n, n] tree rows.
    Returns the fp32 logits of the rows `logits` picks.
    """
    n = len(tokens)
    rows = SeqRows(cache, list(tokens), positions if positions is not None else list(range(start, start + n)),
                   start, start, causal(n, model.device) if isinstance(mask, str) else mask, logits)
    out = Runner(model, max_rows=max(n, 1)).forward_one(rows)
    return out.float() if out is not None else torch.empty(0)
