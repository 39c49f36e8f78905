"""A treekv ledger with registered pools, for the tests that drive it directly."""
from __future__ import annotations

from typing import Any

from specmesh.services.treekv.ledger import KVLedger, PoolReport


def registered_ledger(pairs: tuple[str, ...] = ("p0",), draft: int = 8, target: int = 4, block: int = 16,
                      reserve: int = 0, **kwargs: Any) -> KVLedger:
    """A KVLedger whose pairs' draft and target pools are registered as their services would."""
    ledger = KVLedger(**kwargs)
    for pair in pairs:
        ledger.register_pool(pair, "draft", "d1", PoolReport(draft, block, reserve))
        ledger.register_pool(pair, "target", "t1", PoolReport(target, block, reserve))
    return ledger


def used_blocks(ledger: KVLedger) -> dict[tuple[str, str], int]:
    """(pair, model) -> blocks admitted to live sessions."""
    return {(p.pair, p.model): p.blocks_used for p in ledger.pool_stats()}
