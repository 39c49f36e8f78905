"""Where draft and target share cores, they never prefill at once: the target tells the draft a
new session is prefilled only when no prompt is left to prefill, and it prefills on every core
only in steps of prefill alone, which never come while the draft follows a session. Once the
draft follows none, every step borrows its cores.

The target engine over a real tensor channel (gloo on loopback), with this test as the draft.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

import torch

from specmesh.services.runtime.engines import generate_ar
from specmesh.services.runtime.forward_batch import Runner
from specmesh.services.runtime.model_worker import service_pool
from specmesh.services.runtime.request import Request
from specmesh.services.target.config import TargetConfig
from specmesh.services.target.engine import SessionState, TargetEngine

from channel_testing import channel_pair


def test_the_draft_hears_of_prefills_once_none_is_left_and_only_steps_without_it_are_wide(tiny_target: Any) -> None:
    prompts = [list(range(3, 40)), list(range(50, 250)), [7, 8, 9]]
    n = 40
    refs = [sum(generate_ar(tiny_target, Request(p, n), 2048), []) for p in prompts]
    target_end, draft_end = channel_pair(tiny_target.vocab_size)
    engine = TargetEngine(Runner(tiny_target, 64),
                          service_pool(tiny_target, TargetConfig(pool_blocks=96, block_size=16), "target"),
                          prefill_chunk=32, borrow_threads=torch.get_num_threads() + 1, draft_patience_s=60.0)
    events: list[tuple[str, Any]] = []  # in the engine's thread, in order
    real_forward, real_signal = engine.runner.forward, target_end.send_prefilled

    def forward(rows: list) -> Any:
        followed = any(s.speculative and not s.done and s.draft_told_prefilled for s in engine.sessions.values())
        events.append(("forward", (torch.get_num_threads() == engine.borrow_threads, followed)))
        return real_forward(rows)

    def signal(channel_id: int) -> None:
        busy = [s.channel_id for s in engine.sessions.values() if s.waiting or s.session.prefilling]
        events.append(("signal", (channel_id, busy)))
        real_signal(channel_id)

    engine.runner.forward = forward  # type: ignore[method-assign]
    target_end.send_prefilled = signal  # type: ignore[method-assign]
    engine.attach_channel(target_end)
    received: list[Any] = []  # the draft's side drains the channel, as the draft's receiver does

    def drain() -> None:
        try:
            while True:
                received.append(draft_end.recv_verified())
        except Exception:  # the channel closed at the end of the test
            pass

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()

    async def signals(count: int) -> None:
        while sum(v.prefilled for v in received) < count:
            await asyncio.sleep(0.005)

    async def collect(state: SessionState) -> list[int]:
        tokens: list[int] = []
        while True:
            o = await state.out.get()
            tokens += o.tokens
            if o.finish is not None:
                return tokens

    async def main() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        states = [SessionState(channel_id=i + 1, session_id=f"s{i}", request=Request(p, n), num_blocks=24,
                               speculative=True, out=asyncio.Queue(), loop=loop) for i, p in enumerate(prompts)]
        engine.open(states[0])
        engine.open(states[1])
        running = [asyncio.create_task(collect(s)) for s in states[:2]]
        await signals(2)
        # The third arrives while the draft follows the first two: its prefill shares their
        # steps (ahead rounds while they wait for their subtrees), on --threads.
        engine.open(states[2])
        running.append(asyncio.create_task(collect(states[2])))
        await signals(3)
        for channel_id in (1, 2, 3):  # the draft gives them up: they finish target-only
            await asyncio.to_thread(draft_end.send_subtree, channel_id, 0, [], [])
        return [await t for t in running]

    try:
        outs = asyncio.run(main())
    finally:
        engine.stop()
        draft_end.close()
        target_end.close()
    assert outs == refs  # no subtree ever came
    assert [(v.tokens, v.end, v.channel_id) for v in received if v.prefilled] == [([], False, 1), ([], False, 2),
                                                                                  ([], False, 3)]
    told = [data for kind, data in events if kind == "signal"]
    assert told == [(1, []), (2, []), (3, [])]  # never while a prompt was left to prefill
    first_told = next(i for i, (kind, _) in enumerate(events) if kind == "signal")
    forwards = [(i, wide, followed) for i, (kind, (wide, followed)) in enumerate(events) if kind == "forward"]
    # the first two prefilled on every core, the third did not: the draft followed the first two
    assert any(wide for i, wide, _ in forwards if i < first_told)
    assert not any(wide for i, wide, followed in forwards if i > first_told and followed)
    # once the draft gave every session up, their plain steps borrowed its cores
    assert all(wide for i, wide, followed in forwards if not followed and i > first_told)
    assert any(not followed for i, _, followed in forwards if i > first_told)
    assert engine.active_sessions == 0 and engine.pool.snapshot().used_blocks == 0
