"""Target engine policies that need no mesh: thread use per step."""
from __future__ import annotations

from typing import Any

import torch


def test_steps_without_the_draft_borrow_every_core(tiny_target: Any) -> None:
    """The target widens torch's threads for a step of prefill chunks only, and for any step while
    the draft follows no live session; a round while it follows one keeps --threads."""
    from types import SimpleNamespace

    from specmesh.services.runtime.forward_batch import Runner
    from specmesh.services.runtime.model_worker import ModelServiceConfig, service_pool
    from specmesh.services.target.engine import SessionState, TargetEngine

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = TargetEngine(Runner(tiny_target, 64), service_pool(tiny_target, ModelServiceConfig(pool_blocks=4), "target"),
                          borrow_threads=3)
    try:
        prefill, mixed = [SimpleNamespace(tree=None)], [SimpleNamespace(tree=None), SimpleNamespace(tree=[1])]
        seen = []
        # followed (told of its prefill, or sent a subtree), paused, ended, held until its prefill
        for speculative, done, told, sent in ((True, False, True, False), (True, False, False, True),
                                              (False, False, True, True), (True, True, True, True),
                                              (True, False, False, False)):
            state = SessionState(1, "s", None, 1, speculative, None, None, done=done,  # type: ignore[arg-type]
                                 draft_told_prefilled=told, draft_sent=sent)
            engine.sessions = {1: state}
            for jobs in (prefill, mixed):
                with engine._threads_for(jobs):  # type: ignore[arg-type]
                    seen.append(torch.get_num_threads())
        assert seen == [3, 1, 3, 1, 3, 3, 3, 3, 3, 3] and torch.get_num_threads() == 1
    finally:
        engine.sessions = {}
        torch.set_num_threads(before)
        engine.stop()
