"""Introduce the draft to the target (their tensor channel) and keep them paired.

The router polls both services' Info about once a second. It (re-)pairs when the draft reports no
channel, or when either service's instance_id changes (a restarted process has lost its channel):
Target.PrepareChannel() gives an endpoint, Draft.ConnectChannel(endpoint) joins it. Services that
are not up yet are waited for with backoff, logging which one is missing (once per state change).
"""
from __future__ import annotations

import asyncio
import logging
import math

from specmesh.v1 import mesh_pb2

from ..runtime.errors import ServiceUnavailable, SpecmeshError
from .mesh import Mesh

log = logging.getLogger("specmesh.router.pairing")

POLL_S = 1.0
MAX_BACKOFF_S = 5.0
CONNECT_TIMEOUT_S = 90.0  # the draft waits for the gloo/NCCL rendezvous (the draft's own limit is 60 s)
INFO_TIMEOUT_S = 2.0
ATTACH_TIMEOUT_S = 10.0


def auto_depth(target_forward_ms: float, draft_forward_ms: float) -> int:
    """d = floor(target forward / draft forward), at least 1: the draft keeps expanding while the
    target verifies, so this many expansions fit in one round without making the target wait."""
    if draft_forward_ms <= 0 or target_forward_ms <= 0 or not math.isfinite(target_forward_ms / draft_forward_ms):
        return 1
    return max(1, math.floor(target_forward_ms / draft_forward_ms))


class Pairing:
    """Tracks whether speculation is possible now (`connected`) and the tree depth to ask for."""

    def __init__(self, mesh: Mesh, depth: int) -> None:
        self.mesh = mesh
        self.fixed_depth = depth  # 0 = auto
        self.depth = max(depth, 1)
        self.connected = False
        self._draft_instance = ""
        self._target_instance = ""
        self._waiting_for: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.mesh.draft is None:
            log.info("no --draft-addr: target-only decoding")
            return
        self._task = asyncio.create_task(self._run(), name="router-pairing")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        backoff = POLL_S
        while True:
            try:
                await self.poll_once()
                backoff = POLL_S
            except asyncio.CancelledError:
                raise
            except SpecmeshError as exc:
                self.connected = False
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                log.debug("pairing: %s", exc)
            except Exception:  # a bug must not kill pairing for the life of the router
                self.connected = False
                backoff = MAX_BACKOFF_S
                log.exception("pairing failed")
            await asyncio.sleep(backoff)

    def _wait(self, what: str | None, error: str = "") -> None:
        """Log once per change which service pairing waits for (None: nothing missing)."""
        if what != self._waiting_for:
            if what is not None:
                log.warning("pairing waits for %s: %s; generating target-only meanwhile", what, error)
            self._waiting_for = what

    async def poll_once(self) -> None:
        """One pairing check; raises SpecmeshError when a service is missing (the caller backs off)."""
        draft, target = self.mesh.draft, self.mesh.target
        assert draft is not None
        try:
            t_info = await target.call("Info", mesh_pb2.Empty(), timeout=INFO_TIMEOUT_S)
        except SpecmeshError as exc:
            self._lost("target")
            self._wait(target.name, str(exc))
            raise
        try:
            d_info = await draft.call("Info", mesh_pb2.Empty(), timeout=INFO_TIMEOUT_S)
        except SpecmeshError as exc:
            self._lost("draft")
            self._wait(draft.name, str(exc))
            raise
        if (self.connected and d_info.channel_connected and d_info.instance_id == self._draft_instance
                and t_info.instance_id == self._target_instance):
            return
        if self.connected:
            log.warning("draft or target restarted or lost its channel: re-pairing")
        self.connected = False
        endpoint = await target.call("PrepareChannel", mesh_pb2.Empty())
        if endpoint.host in ("", "0.0.0.0", "::"):
            endpoint.host = target.host  # the target listens everywhere: dial it where we dial it
        self._wait(None)
        await draft.call("ConnectChannel", endpoint, timeout=CONNECT_TIMEOUT_S)
        await self._target_attached()
        self._draft_instance, self._target_instance = d_info.instance_id, t_info.instance_id
        if self.fixed_depth == 0:
            self.depth = auto_depth(t_info.forward_ms, d_info.forward_ms)
        self.connected = True
        log.info("paired draft %s with target %s over %s:%d (%s, epoch %s); depth %d (target %.1f ms, draft %.1f ms)",
                 draft.addr, target.addr, endpoint.host, endpoint.port, endpoint.backend or "gloo",
                 endpoint.epoch[:8], self.depth, t_info.forward_ms, d_info.forward_ms)

    async def _target_attached(self) -> None:
        """The target attaches its end of the channel in the background after the draft joined:
        report the pair connected only once it has, so no session is told to speculate early."""
        deadline = asyncio.get_running_loop().time() + ATTACH_TIMEOUT_S
        while True:
            info = await self.mesh.target.call("Info", mesh_pb2.Empty(), timeout=INFO_TIMEOUT_S)
            if info.channel_connected:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise ServiceUnavailable(f"{self.mesh.target.name} did not attach the tensor channel within "
                                         f"{ATTACH_TIMEOUT_S:.0f}s of the draft joining it")
            await asyncio.sleep(0.02)

    def _lost(self, which: str) -> None:
        if self.connected:
            log.warning("%s-service unreachable: speculation off until it is back", which)
        self.connected = False
