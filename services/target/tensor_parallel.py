"""Tensor parallelism for the target: rank 0 is the service, ranks 1..N-1 are worker processes.

Every rank holds a shard of the weights (column-parallel q/k/v and gate/up, row-parallel o and
down, one all-reduce after each; see runtime/model.py) and a shard of every session's KV (its kv
heads). Rank 0 replays each session operation it performs — open, prefill, verify, close — to the
workers as a small broadcast command, so all ranks run the same forward in lockstep; only rank 0
decides what is accepted, and broadcasts (path, bonus) so every shard compacts the same slots.
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
from typing import Any

import torch
import torch.distributed as dist

from specmesh.services.runtime.channel import join_store
from specmesh.services.runtime.errors import SpecmeshError
from specmesh.services.runtime.model_worker import LeasedPool, load_service_model
from specmesh.services.runtime.sampling import SamplingParams
from specmesh.services.runtime.target_session import TargetSession

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


def sync_path(decision: tuple[list[int], int] | None) -> tuple[list[int], int]:
    """Leader passes its (path, bonus); followers pass None and receive it."""
    return _broadcast(decision)


class TPLeader:
    """Rank 0's handle: start the workers, replay session operations to them."""

    def __init__(self, config: TargetConfig, store_host: str, store_port: int) -> None:
        self.world = config.tp
        self.procs: list[subprocess.Popen] = []
        payload = json.dumps(dataclasses.asdict(config))
        for rank in range(1, self.world):
            device = _rank_device(config.device, rank)
            cmd = [sys.executable, "-m", "specmesh.services.target.tensor_parallel", "--rank", str(rank),
                   "--store", f"{store_host}:{store_port}", "--device", device]
            self.procs.append(subprocess.Popen(cmd, env={**os.environ, "SPECMESH_TP_CONFIG": payload}))

    def join(self, store: dist.Store, device: str) -> None:
        init_group(store, 0, self.world, device)

    def replay(self, op: str, *args: Any) -> None:
        _broadcast((op, *args))

    def attach(self, session: TargetSession) -> None:
        session.path_sync = sync_path

    def stop(self) -> None:
        try:
            self.replay("stop")
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
    pool = LeasedPool(model, config)
    sessions: dict[int, tuple[TargetSession, tuple[int, int]]] = {}
    while True:
        op, *rest = _broadcast(None)
        if op == "stop":
            return 0
        try:
            _execute(op, rest, model, pool, sessions)
        except SpecmeshError as exc:  # the leader hit the same error and handles it (closes the session)
            log.debug("%s failed on this rank too: %s", op, exc)


def _execute(op: str, rest: list[Any], model: Any, pool: LeasedPool,
             sessions: dict[int, tuple[TargetSession, tuple[int, int]]]) -> None:
    if op == "open":
        slot, lease, sampling = rest
        session = TargetSession(model, pool.open(*lease), SamplingParams(**sampling))
        session.path_sync, session.leader = sync_path, False
        sessions[slot] = (session, lease)
    elif op == "prefill":
        slot, prompt = rest
        sessions[slot][0].prefill(prompt)
    elif op == "verify":
        slot, tokens, parents = rest
        sessions[slot][0].verify(tokens, parents)
    elif op == "close":
        (slot,) = rest
        _session, lease = sessions.pop(slot)
        pool.close(*lease)
    elif op == "calibrate":
        from specmesh.services.runtime.model_worker import time_tree_forward

        time_tree_forward(model, rest[0])


if __name__ == "__main__":
    raise SystemExit(worker_main())
