"""Tensor parallelism for the target: rank 0 is the service, ranks 1..N-1 are worker processes.

Every rank holds a shard of the weights (column-parallel q/k/v and gate/up, row-parallel o and
down, one all-reduce after each; see runtime/model.py) and a shard of every session's KV (its kv
heads). Rank 0 broadcasts *batches*, not per-session operations: before each batched forward the
rows of every sequence in it (tokens, positions, start, prefix, tree mask), so all ranks run the
same forward in lockstep; after it, only rank 0 decides what is accepted and broadcasts the
step's decisions, so every shard commits (compacts) the same slots. Sessions opening and closing
are the only other commands. The pool's layout is the leader's decision too: every command carries
the pool ops (placements, releases, compaction moves, prefix copies) the leader made since the last
one, and a follower replays them on its shard before it executes the command.
The group is the default torch.distributed group of these processes (gloo on CPU, NCCL on GPU),
rendezvoused through the target's TCPStore under the prefix "tp".
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from specmesh.services.runtime.channel import join_store
from specmesh.services.runtime.errors import SpecmeshError
from specmesh.services.runtime.forward_batch import Logits, Runner, SeqRows
from specmesh.services.runtime.kv_pool import KVPool
from specmesh.services.runtime.model_worker import load_service_model
from specmesh.services.runtime.request import Request
from specmesh.services.runtime.sampling import SamplingParams
from specmesh.services.runtime.speculation_planner import measure_cost_curve
from specmesh.services.runtime.target_session import Decision, TargetSession, Tree

from .config import TargetConfig

log = logging.getLogger("specmesh.target.tp")


def init_group(store: dist.Store, rank: int, world: int, device: str) -> None:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, store=dist.PrefixStore("tp", store), rank=rank, world_size=world,
                            timeout=datetime.timedelta(days=365))


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class TPLeader:
    """Rank 0's handle: start the workers, broadcast sessions, batches and decisions to them."""

    def __init__(self, config: TargetConfig, store_host: str, store_port: int) -> None:
        self.world = config.tp
        self.procs: list[subprocess.Popen] = []
        self.kv: KVPool | None = None  # the leader's pool, whose ops every command carries
        payload = json.dumps(dataclasses.asdict(config))
        for rank in range(1, self.world):
            device = _rank_device(config.device, rank)
            cmd = [sys.executable, "-m", "specmesh.services.target.tensor_parallel", "--rank", str(rank),
                   "--store", f"{store_host}:{store_port}", "--device", device]
            self.procs.append(subprocess.Popen(cmd, env={**os.environ, "SPECMESH_TP_CONFIG": payload}))

    def join(self, store: dist.Store, device: str) -> None:
        init_group(store, 0, self.world, device)

    def attach(self, runner: Runner, kv: KVPool) -> None:
        """Every batch the leader's runner runs is first broadcast to the followers, and so is every
        change to its pool (`kv` must record its ops)."""
        runner.on_forward = self.forward
        self.kv = kv

    def _send(self, op: str, *rest: Any) -> None:
        _broadcast((op, self.kv.take_ops() if self.kv is not None else [], *rest))

    def open(self, key: int, session_id: str, request: Request, cached: int) -> None:
        self._send("open", key, session_id, dataclasses.asdict(request.sampling), request.prompt, cached)

    def forward(self, seqs: list[SeqRows]) -> None:
        self._send("forward", [(s.key, s.tokens, s.positions, s.start, s.prefix,
                                s.mask.cpu() if s.mask is not None else None, s.logits.value) for s in seqs])

    def commit(self, decisions: list[tuple[int, Decision | None]]) -> None:
        self._send("commit", decisions)

    def close(self, key: int) -> None:
        self._send("close", key)

    def calibrate(self) -> None:
        self._send("calibrate")

    def stop(self) -> None:
        try:
            self._send("stop")
        except Exception:
            pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _rank_device(device: str, rank: int) -> str:
    if device.startswith("cuda"):
        base = int(device.split(":")[1]) if ":" in device else 0
        return f"cuda:{base + rank}"
    return device


@dataclass
class _Follower:
    """A follower rank's sessions, its shard of the pool (laid out by the leader's ops) and the rows
    of the batch it ran last (committed by the next "commit" with the leader's decisions)."""

    runner: Runner
    pool: KVPool
    sessions: dict[int, TargetSession] = field(default_factory=dict)
    last: dict[int, SeqRows] = field(default_factory=dict)

    def execute(self, op: str, rest: list[Any]) -> None:
        if op == "open":
            key, session_id, sampling, prompt, cached = rest
            session = TargetSession(self.pool.cache(session_id), SamplingParams(**sampling), self.runner.device, key)
            session.begin(prompt, cached)
            self.sessions[key] = session
        elif op == "forward":
            (described,) = rest
            seqs = [SeqRows(self.sessions[key].cache, tokens, positions, start, prefix,
                            mask.to(self.runner.device) if mask is not None else None, Logits(logits), key)
                    for key, tokens, positions, start, prefix, mask, logits in described]
            self.runner.forward(seqs)
            self.last = {s.key: s for s in seqs}
        elif op == "commit":
            (decisions,) = rest
            for key, decision in decisions:
                session, rows = self.sessions[key], self.last.pop(key)
                if session.prefilling:
                    session.commit_prefill(rows, None, decision)
                else:
                    session.commit_verify(Tree(rows.tokens, []), None, decision)
        elif op == "close":
            (key,) = rest
            self.sessions.pop(key, None)  # its blocks go with the leader's "release" op, if it frees them
        elif op == "calibrate":
            measure_cost_curve(self.runner.model)


def worker_main(argv: list[str] | None = None) -> int:
    """A follower rank: load the shard, then execute the leader's commands until "stop"."""
    parser = argparse.ArgumentParser(description="specmesh target tensor-parallel worker (started by rank 0)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    config = TargetConfig(**json.loads(os.environ["SPECMESH_TP_CONFIG"]))
    config.device = args.device
    logging.basicConfig(level=config.log_level.upper(), format=f"%(asctime)s target-tp{args.rank} %(levelname)s %(message)s")
    host, port = args.store.rsplit(":", 1)
    init_group(join_store(host, int(port)), args.rank, config.tp, config.device)
    model, _ = load_service_model(config, "target", tp_rank=args.rank, tp_size=config.tp)
    follower = _Follower(Runner(model, config.step_rows),
                         KVPool.for_model(model, config.pool_blocks, config.block_size, "target pool"))
    while True:
        op, pool_ops, *rest = _broadcast(None)
        follower.pool.apply(pool_ops)
        if op == "stop":
            return 0
        try:
            follower.execute(op, rest)
        except SpecmeshError as exc:  # the leader hit the same error and handles it (closes the session)
            log.debug("%s failed on this rank too: %s", op, exc)


if __name__ == "__main__":
    raise SystemExit(worker_main())
