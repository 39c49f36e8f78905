"""Target engine policies that need no mesh: thread use per step."""
from __future__ import annotations

from typing import Any

import torch


def test_prefill_only_steps_borrow_every_core(tiny_target: Any) -> None:
    """The target widens torch's threads for a step of prefill chunks only, and restores them."""
    from types import SimpleNamespace

    from specmesh.services.runtime.forward_batch import Runner
    from specmesh.services.runtime.model_worker import ModelServiceConfig, service_pool
    from specmesh.services.target.engine import TargetEngine

    engine = TargetEngine(Runner(tiny_target, 64), service_pool(tiny_target, ModelServiceConfig(pool_blocks=4), "target"),
                          prefill_threads=3)
    try:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        seen = []
        for jobs in ([SimpleNamespace(tree=None)], [SimpleNamespace(tree=None), SimpleNamespace(tree=[1])]):
            with engine._threads_for(jobs):  # type: ignore[arg-type]
                seen.append(torch.get_num_threads())
        assert seen == [3, 1] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        engine.stop()
