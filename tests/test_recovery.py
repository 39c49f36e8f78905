"""Recovery from the committed log: a draft that dies mid-stream and comes back re-enters the
running sessions, and their output stays exactly target-only greedy.

In process: a draft session opened on prompt + part of the committed tokens, while the target
went on alone, is fitted by the target (adopt_draft_tree) and speculation continues losslessly.
Over real processes: kill -9 of the draft in the middle of a long greedy stream, a new draft
started on its port; the router re-pairs, re-opens the stream's session on it, and the rounds
after that are speculative again with accepted draft tokens; nothing is left held anywhere.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import grpc
import pytest
import torch

from specmesh.services.runtime.draft_session import DraftSession
from specmesh.services.runtime.engines import generate_ar, run_draft, run_prefill, run_verify
from specmesh.services.runtime.forward_batch import Runner
from specmesh.services.runtime.loader import load_transformer
from specmesh.services.runtime.request import Request
from specmesh.services.runtime.sampling import SamplingParams
from specmesh.services.runtime.target_session import TargetSession, Tree
from specmesh.services.runtime.tree_params import TreeParams
from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc
from specmesh.v1 import mesh_pb2, mesh_pb2_grpc

from channel_testing import channel_pair
from router_testing import DRAFT, FullMesh, serve_mesh, wait_kv_idle
from service_helpers import start_service

FP32 = ["--dtype", "fp32"]
TREE = TreeParams(width=3, subtree_size=8, depth=3)


@pytest.mark.parametrize("alone, known", [(12, 0), (12, 7), (5, 5)])
def test_a_draft_opened_mid_stream_is_fitted_and_output_stays_target_only(tiny_target: Any, tiny_draft: Any,
                                                                         alone: int, known: int) -> None:
    """The target decodes `alone` tokens by itself; then a draft opens on the prompt plus the first
    `known` committed tokens (what a router's log held), and the two speculate to the end."""
    target_model, draft_model = tiny_target, tiny_draft
    prompt, n = [5, 6, 7, 8, 9], 60
    reference = sum(generate_ar(target_model, Request(prompt, n), 256), [])
    trunner, drunner = Runner(target_model, max_rows=256), Runner(draft_model, max_rows=256)
    target = TargetSession(target_model.new_cache(256), SamplingParams())
    run_prefill(trunner, target, prompt)
    for _ in range(alone - 1):
        run_verify(trunner, target, target.decode_tree())
    committed = target.tokens[len(prompt):]
    draft = DraftSession(draft_model.new_cache(256), TREE, SamplingParams(), target_model.vocab_size)
    draft.start(prompt + committed[:known])
    accepted = 0
    while len(target.tokens) - len(prompt) < n:
        while not draft.ready:  # the catch-up (after the open, or after a re-root that missed)
            run_draft(drunner, draft)
        for _ in range(TREE.depth):
            run_draft(drunner, draft)
        tokens, parents, _ = draft.select_subtree(TREE.subtree_size)
        fitted = target.adopt_draft_tree(Tree(tokens, parents), draft.root_position)
        assert fitted is not None
        tree, skipped = fitted
        result = run_verify(trunner, target, tree)
        accepted += result.accepted_draft
        draft.reroot([*skipped, *result.tokens])
    assert target.tokens[len(prompt):len(prompt) + n] == reference
    assert accepted > 0  # the draft really took part after joining


@pytest.fixture(scope="module")
def slow_mesh(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A target slowed down (random delay per step) so a stream outlives a draft restart. --no-plan:
    the planner may send the root alone (a plain decoding round) when trees do not pay on a loaded
    machine, and the test must see trees verified after the recovery."""
    yield from serve_mesh(tmp_path_factory.mktemp("recovery"), target_args=[*FP32, "--verify-delay-ms", "40"],
                          draft_args=[*FP32, "--no-plan"])


def _wait_no_sessions(addr: str, stub: Any, timeout: float = 10.0) -> None:
    """Until the service's Info reports no session (the router's cleanup runs after the stream ends)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(addr) as ch:
        while (info := stub(ch).Info(mesh_pb2.Empty(), timeout=5)).active_sessions:
            assert time.monotonic() < deadline, f"{addr} still holds sessions after {timeout}s: {info}"
            time.sleep(0.05)


def _resumed_rounds(after_kill: list[Any]) -> list[Any]:
    """Rounds with accepted draft tokens once the target went on alone (a target-only round)."""
    alone = next((i for i, c in enumerate(after_kill) if c.tree_size == 1), len(after_kill))
    return [c for c in after_kill[alone:] if c.tree_size > 1 and c.accepted > 0]


def test_draft_killed_and_restarted_mid_stream_resumes_speculation(slow_mesh: FullMesh) -> None:
    prompt, n = list(range(60, 90)), 1900
    draft_args = ["--model", str(slow_mesh.draft_dir), "--pool-blocks", "256", "--block-size", "16",
                  "--threads", "1", *FP32, "--no-plan", "--port", str(slow_mesh.draft.port)]
    chunks: list[Any] = []  # (chunk, phase): 0 before the kill, 1 after it
    phase = [0]
    resumed = threading.Event()
    final: list[Any] = []
    channel = grpc.insecure_channel(slow_mesh.router.addr)
    stub = pb_grpc.GenerationStub(channel)
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=n, ignore_eos=True,
                                            request_id="recover-me"), timeout=300)

    def read() -> None:
        for response in call:
            if response.HasField("chunk"):
                chunks.append((response.chunk, phase[0]))
                if len(_resumed_rounds([c for c, p in chunks if p == 1])) >= 5:
                    resumed.set()
            else:
                final.append(response.final)
        resumed.set()  # the stream ended (either way): the main thread looks at what came

    reader = threading.Thread(target=read)
    reader.start()
    try:
        while sum(c.tree_size > 1 for c, _ in chunks) < 3:  # speculating before the kill
            assert reader.is_alive(), f"stream ended early: {final}"
            threading.Event().wait(0.05)
        os.kill(slow_mesh.draft.proc.pid, signal.SIGKILL)
        phase[0] = 1
        slow_mesh.procs.pop("draft").stop()
        slow_mesh.procs["draft"] = start_service(DRAFT, draft_args)  # on its old port, as `specmesh up` does
        resumed.wait(300)
        assert not final, f"the stream ended before speculation resumed: {final[0]}\n{slow_mesh.router.log_tail()}"
        assert stub.Abort(pb.AbortRequest(request_id="recover-me"), timeout=10).found
        reader.join(60)
    finally:
        call.cancel()
        reader.join(60)
        channel.close()
    assert _resumed_rounds([c for c, p in chunks if p == 1]), "no speculative round after recovery"
    got = [t for c, _ in chunks for t in c.token_ids]
    assert final and final[0].finish_reason == pb.FINISH_REASON_ABORT and len(got) < n
    reference = sum(generate_ar(load_transformer(slow_mesh.target_dir, torch.float32), Request(prompt, len(got)),
                                2048), [])
    assert got == reference
    assert "resumed on the draft" in slow_mesh.router.log_tail(100_000)
    # Everything the session held is free: treekv, the target, and the draft it resumed on.
    wait_kv_idle(slow_mesh.treekv.addr, timeout=10)
    _wait_no_sessions(slow_mesh.target.addr, mesh_pb2_grpc.TargetStub)
    _wait_no_sessions(slow_mesh.draft.addr, mesh_pb2_grpc.DraftStub)


def test_a_draft_far_behind_is_sent_the_tokens_it_missed_then_its_tree_is_adopted(tiny_target: Any) -> None:
    """The target engine over a real tensor channel, with this test as the draft: a tree rooted
    more than CATCH_UP_TOKENS behind gets a catch-up message (the next CATCH_UP_TOKENS committed
    tokens, round 0) while the session goes on alone; the next tree, rooted where that ended, is
    fitted (the draft is sent what it missed in front of the round's tokens) and the session
    speculates again."""
    from specmesh.services.runtime.channel import CATCH_UP_TOKENS
    from specmesh.services.runtime.model_worker import service_pool
    from specmesh.services.target.config import TargetConfig
    from specmesh.services.target.engine import SessionState, TargetEngine

    prompt, n, vocab = [5, 6, 7, 8, 9], 500, tiny_target.vocab_size
    ref = prompt + sum(generate_ar(tiny_target, Request(prompt, n), 2048), [])
    target_end, draft_end = channel_pair(vocab)
    engine = TargetEngine(Runner(tiny_target, 64),
                          service_pool(tiny_target, TargetConfig(pool_blocks=64, block_size=16), "target"),
                          verify_delay_ms=20)
    engine.attach_channel(target_end)

    async def main() -> tuple[list[Any], Any, Any, Any]:
        loop = asyncio.get_running_loop()
        state = SessionState(channel_id=1, session_id="s", request=Request(prompt, n), num_blocks=48,
                             speculative=False, out=asyncio.Queue(), loop=loop)
        engine.open(state)
        outs = [await state.out.get()]
        while sum(len(o.tokens) for o in outs) < CATCH_UP_TOKENS + 20:  # the target alone, far ahead
            outs.append(await state.out.get())
        # A tree at the end of the prompt: too far behind to verify.
        await asyncio.to_thread(draft_end.send_subtree, 1, 0, [prompt[-1]], [-1], None, (0, 0, 0), len(prompt) - 1)
        catch_up = await asyncio.to_thread(draft_end.recv_verified)
        # Rooted where the catch-up ended: the committed tokens that follow, as a chain (the
        # target went on meanwhile, by fewer tokens than the chain holds).
        at = len(prompt) - 1 + CATCH_UP_TOKENS
        await asyncio.to_thread(draft_end.send_subtree, 1, 0, ref[at:at + 64], list(range(-1, 63)), None, (0, 0, 0),
                                at)
        adopted = await asyncio.to_thread(draft_end.recv_verified)
        while sum(len(o.tokens) for o in outs) < at + 1 + len(adopted.tokens) - len(prompt):
            outs.append(await state.out.get())  # up to the round that verified the chain
        engine.abort(1)
        end = await asyncio.to_thread(draft_end.recv_verified)
        while outs[-1].finish is None:
            outs.append(await state.out.get())
        return outs, catch_up, adopted, end

    try:
        outs, catch_up, adopted, end = asyncio.run(main())
    finally:
        engine.stop()
        draft_end.close()
        target_end.close()
    assert (catch_up.round, catch_up.end) == (0, False)
    assert catch_up.tokens == ref[len(prompt):len(prompt) + CATCH_UP_TOKENS]
    at = len(prompt) - 1 + CATCH_UP_TOKENS
    assert adopted.tokens == ref[at + 1:at + 1 + len(adopted.tokens)] and not adopted.end
    # the tokens the target committed alone past the chain's root lead, and are marked as such
    assert 20 <= adopted.skipped < len(adopted.tokens) and catch_up.skipped == 0
    resumed = next(o for o in outs if o.speculative)
    assert resumed.accepted > 0  # the chain beyond the target's root was accepted
    assert [t for o in outs for t in o.tokens] == ref[len(prompt):len(prompt) + sum(len(o.tokens) for o in outs)]
    assert end.end and outs[-1].finish == "abort"
    assert engine.pool.snapshot().used_blocks == 0 and engine.active_sessions == 0
