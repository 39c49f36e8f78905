"""Helpers for the router / SDK tests: the tiny model pair, closed ports, treekv idleness.

Not a test module; import what you need (`from router_testing import ...`).
"""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Iterator

import grpc

from specmesh.models.tiny import make_tiny_pair
from specmesh.v1 import mesh_pb2, mesh_pb2_grpc

ROUTER = "specmesh.services.router.server"
TREEKV = "specmesh.services.treekv.server"
TARGET = "specmesh.services.target.server"
DRAFT = "specmesh.services.draft.server"


def tiny_pair(base: Path) -> tuple[Path, Path]:
    """The tiny (target, draft) pair under base (made once, reused while its settings match)."""
    return make_tiny_pair(base / "router-tiny-pair")


def closed_port() -> int:
    """A loopback port nothing listens on (bound then released, so the OS just handed it out)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kv_stats(addr: str) -> mesh_pb2.KVStats:
    with grpc.insecure_channel(addr) as ch:
        return mesh_pb2_grpc.TreeKVStub(ch).Stats(mesh_pb2.Empty(), timeout=5)


def wait_kv_idle(addr: str, timeout: float = 5.0) -> mesh_pb2.KVStats:
    """Poll treekv until no session holds blocks; fail with the last stats if that takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        stats = kv_stats(addr)
        if not stats.sessions and all(pool.blocks_used == 0 for pool in stats.pools):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"treekv still holds sessions after {timeout}s: {stats}")
        time.sleep(0.05)


class FullMesh:
    """treekv + target + draft + router on loopback (`stop()` ends them all).

    `pair` is a (target_dir, draft_dir) pair (default: the tiny pair under base); `*_args` are
    extra flags per service; `env` entries are added to every service's environment. `pairs`
    draft/target pairs run behind the router: pair 0 is `mesh.target` / `mesh.draft`, pair i
    `mesh.procs["target-i"]` / `mesh.procs["draft-i"]` (`pair_names` lists them).
    """

    def __init__(self, base: Path, pool_blocks: int = 256, router_args: list[str] | None = None,
                 target_args: list[str] | None = None, draft_args: list[str] | None = None,
                 pair: tuple[Path, Path] | None = None, env: dict[str, str] | None = None,
                 pairs: int = 1) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from service_helpers import start_service

        self.target_dir, self.draft_dir = pair if pair is not None else tiny_pair(base)
        pools = ["--pool-blocks", str(pool_blocks), "--block-size", "16", "--threads", "1"]
        self.procs: dict[str, object] = {}
        self.pair_names = [("target", "draft") if i == 0 else (f"target-{i}", f"draft-{i}") for i in range(pairs)]
        try:
            # The back ends import torch and load models: start them side by side.
            with ThreadPoolExecutor(1 + 2 * pairs) as pool:
                futures = {"treekv": pool.submit(start_service, TREEKV, [], env=env)}
                for target, draft in self.pair_names:
                    futures[target] = pool.submit(start_service, TARGET, ["--model", str(self.target_dir),
                                                                          "--tensor-port", "0", *pools,
                                                                          *(target_args or [])], env=env)
                    futures[draft] = pool.submit(start_service, DRAFT, ["--model", str(self.draft_dir), *pools,
                                                                        *(draft_args or [])], env=env)
                errors = []
                for name, future in futures.items():  # keep every one that started, so stop() ends it
                    try:
                        self.procs[name] = future.result()
                    except BaseException as exc:
                        errors.append(exc)
                if errors:
                    raise errors[0]
            self.procs["router"] = start_service(ROUTER, [
                "--model", str(self.target_dir), "--http-port", "0", "--treekv-addr", self.treekv.addr,
                "--target-addr", ",".join(self.procs[t].addr for t, _ in self.pair_names),  # type: ignore[attr-defined]
                "--draft-addr", ",".join(self.procs[d].addr for _, d in self.pair_names),  # type: ignore[attr-defined]
                *(router_args or [])], env=env)
        except BaseException:
            self.stop()
            raise

    def __getattr__(self, name: str):  # mesh.router, mesh.target, ... -> the ServiceProcess
        procs = self.__dict__.get("procs", {})
        if name in procs:
            return procs[name]
        raise AttributeError(name)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.router.ready['http_port']}"

    def health(self) -> dict:
        """The router's /health (per pair: target_reachable, draft_connected)."""
        import json
        import urllib.request

        with urllib.request.urlopen(self.http + "/health", timeout=5) as resp:
            return json.loads(resp.read())

    def wait_paired(self, timeout: float = 60.0) -> None:
        """Until the router reports every pair's draft connected (it pairs them in the background)."""
        deadline = time.monotonic() + timeout
        while not all(p["draft_connected"] for p in self.health()["pairs"]):
            if time.monotonic() > deadline:
                raise AssertionError(f"drafts not paired after {timeout}s ({self.health()['pairs']}); router log:\n"
                                     f"{self.router.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        for name in ("router", *(name for pair in self.pair_names for name in reversed(pair)), "treekv"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop()  # type: ignore[attr-defined]


def serve_mesh(base: Path, **kwargs: object) -> "Iterator[FullMesh]":
    """Body of a module-scoped mesh fixture: start, wait until the draft is paired, always stop."""
    mesh = FullMesh(base, **kwargs)  # type: ignore[arg-type]
    try:
        mesh.wait_paired()
        yield mesh
    finally:
        mesh.stop()
