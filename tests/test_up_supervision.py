"""`specmesh up` keeps the mesh up: kill -9 of treekv or of the draft (neither is on the path of a
running stream) is named on the console, the service is restarted on its port, and the 4 streams in
flight complete normally. Meanwhile new requests get UNAVAILABLE naming treekv, and the restarted
treekv restores the leases of the running streams (no block is leased twice); a stream that ended
while treekv was down has its lease closed once treekv is back. SIGTERM then drains and stops
everything."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc

from router_testing import kv_stats, wait_kv_idle

STREAMS = 4
TOKENS = 800


def _wait_for(what: str, check: Any, log: Path, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s; console:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    return value


@dataclass
class UpRun:
    proc: subprocess.Popen
    ready: Path  # the ready file (rewritten when a service restarts)
    console: Path
    info: dict  # the ready file at start-up


@contextmanager
def _running_up(tmp_path: Path, *args: str) -> Iterator[UpRun]:
    """`specmesh up --tiny` (fp32, one thread per model) with `args`, once it is ready. A body that
    succeeds ends it with SIGTERM, which must exit 0; anything else kills its process group."""
    ready, console = tmp_path / "up.json", tmp_path / "console.txt"
    with open(console, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "specmesh.clients.cli", "up", "--tiny", "--port", "0",
                               "--ready-file", str(ready), "--dtype", "fp32", "--target-threads", "1",
                               "--draft-threads", "1", *args],
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        info = json.loads(_wait_for("start-up", lambda: ready.exists() and ready.read_text(), console, 300))
        yield UpRun(up, ready, console, info)
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0, console.read_text()[-4000:]
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)


def test_up_restarts_a_dead_treekv_and_draft_while_streams_run(tmp_path: Path) -> None:
    with _running_up(tmp_path, "--http-port", "-1", "--pool-blocks", "256",
                     "--extra-target-args", "--verify-delay-ms 5") as run:
        up, ready, console, info = run.proc, run.ready, run.console, run.info
        treekv_addr = f"127.0.0.1:{info['services']['treekv']['port']}"
        channel = grpc.insecure_channel(info["addr"])
        stub = pb_grpc.GenerationStub(channel)
        _wait_for("pairing", lambda: stub.ModelInfo(pb.ModelInfoRequest(), timeout=5).draft_connected, console)
        calls = [stub.Generate(pb.GenerateRequest(prompt=f"survive {i}", max_tokens=TOKENS, ignore_eos=True,
                                                  request_id=f"survive-{i}"), timeout=300) for i in range(STREAMS)]
        results: list[Any] = [None] * STREAMS

        def read(i: int) -> None:
            try:
                results[i] = list(calls[i])
            except grpc.RpcError as exc:
                results[i] = exc

        firsts = [next(call) for call in calls]  # all four are running
        readers = [threading.Thread(target=read, args=(i,)) for i in range(STREAMS)]
        for r in readers:
            r.start()
        before = {s.session_id: (s.draft_blocks, s.target_blocks) for s in kv_stats(treekv_addr).sessions}
        assert len(before) == STREAMS

        # treekv dies, and (supervisor paused) stays dead for a moment: new requests are refused.
        os.kill(up.pid, signal.SIGSTOP)
        try:
            os.kill(info["pids"]["treekv"], signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(pb.GenerateRequest(prompt="no treekv", max_tokens=4), timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "treekv-service" in refused.value.details()
            # One stream ends now: its CloseSession finds treekv dead, and is retried once it is back.
            assert stub.Abort(pb.AbortRequest(request_id="survive-0"), timeout=10).found
            readers[0].join(60)
        finally:
            os.kill(up.pid, signal.SIGCONT)
        _wait_for("treekv's restart", lambda: "treekv is back on" in console.read_text(), console)
        assert "warning: treekv exited with status -9; restarting it" in console.read_text()
        # The new treekv holds exactly the running streams' leases, so a new request gets other blocks.
        restored = {s.session_id: (s.draft_blocks, s.target_blocks) for s in kv_stats(treekv_addr).sessions}
        running = sum(r.is_alive() for r in readers)  # their leases are certainly still held
        assert running and len(restored) >= running and restored.items() <= before.items()

        def served() -> bool:  # as soon as the router has reconnected (within about a second)
            try:
                done = list(stub.Generate(pb.GenerateRequest(prompt="treekv is back", max_tokens=8, ignore_eos=True),
                                          timeout=60))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and "treekv-service" in exc.details()
                return False
            return done[-1].final.finish_reason == pb.FINISH_REASON_LENGTH

        _wait_for("a request served by the new treekv", served, console, timeout=10)

        # Then the draft dies: the streams continue target-only, a new draft is started and paired.
        pids = json.loads(ready.read_text())["pids"]
        os.kill(pids["draft"], signal.SIGKILL)
        _wait_for("the draft's restart", lambda: "draft is back on" in console.read_text(), console)
        assert "warning: draft exited with status -9; restarting it" in console.read_text()

        for r in readers:
            r.join(300)
        for i, got in enumerate(results):
            assert not isinstance(got, BaseException), f"stream {i} broke: {got}\n{console.read_text()[-4000:]}"
            tokens = len(firsts[i].chunk.token_ids) + sum(len(r.chunk.token_ids) for r in got[:-1])
            if i == 0:
                assert got[-1].final.finish_reason == pb.FINISH_REASON_ABORT and tokens < TOKENS
            else:
                assert got[-1].final.finish_reason == pb.FINISH_REASON_LENGTH and tokens == TOKENS
        _wait_for("re-pairing", lambda: stub.ModelInfo(pb.ModelInfoRequest(), timeout=5).draft_connected, console)
        done = list(stub.Generate(pb.GenerateRequest(prompt="draft is back", max_tokens=32, ignore_eos=True),
                                  timeout=60))
        assert done[-1].final.usage.rounds < 32  # speculating again
        wait_kv_idle(treekv_addr, timeout=10)  # the aborted stream's lease too, long before its TTL
        channel.close()


def test_up_runs_n_pairs_behind_the_router(tmp_path: Path) -> None:
    """`specmesh up --pairs 2`: two drafts and two targets of their own, the router pairing draft i with
    target i (its /health lists both pairs, named by their targets' addresses), requests served."""
    import urllib.request

    with _running_up(tmp_path, "--pairs", "2", "--http-port", "0", "--pool-blocks", "64") as run:
        info, console = run.info, run.console
        names = ("treekv", "target", "draft", "target-1", "draft-1", "router")
        assert sorted(info["services"]) == sorted(names) and sorted(info["pids"]) == sorted(names)
        assert len({info["services"][n]["port"] for n in names}) == len(names)
        targets = [f"127.0.0.1:{info['services'][t]['port']}" for t in ("target", "target-1")]

        def health() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{info['http_port']}/health", timeout=5) as resp:
                return json.loads(resp.read())

        _wait_for("pairing of both", lambda: all(p["draft_connected"] for p in health()["pairs"]), console)
        assert [p["pair"] for p in health()["pairs"]] == targets
        with grpc.insecure_channel(info["addr"]) as channel:
            stub = pb_grpc.GenerationStub(channel)
            done = list(stub.Generate(pb.GenerateRequest(prompt="two pairs", max_tokens=16, ignore_eos=True),
                                      timeout=60))
        assert done[-1].final.finish_reason == pb.FINISH_REASON_LENGTH
        assert "2 draft/target pairs" in console.read_text()
