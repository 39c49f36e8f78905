"""Keep each draft/target pair introduced (their tensor channel), its target's reachability known,
and both of its pools registered in treekv.

The router polls each pair's services' Info about once a second. Every poll registers the pools it
saw in treekv (`TreeKV.RegisterPool`: the service's PoolReport and instance_id), which is how treekv
learns pool sizes, cached prefixes and restarts. A pair whose target does not answer is out of
placement until it does. The router (re-)pairs when the draft reports no channel, or when either
service's instance_id changes (a restarted process has lost its channel): Target.PrepareChannel()
gives an endpoint, Draft.ConnectChannel(endpoint) joins it. When both services already report a
channel that this router did not make, another router replica paired them (all replicas pair
draft i with target i): it is adopted, not replaced. Services that are not up yet are waited for
with backoff, logging which one is missing (once per state change). Each new channel of a pair
(made here or by another replica) gets a number (`generation`), and `on_paired(pairing)` lets the
router resume the pair's running sessions on its draft (recovery.py).
"""
from __future__ import annotations

import asyncio
import logging
import math
from typing import Callable

from specmesh.v1 import mesh_pb2

from ..runtime.errors import ServiceUnavailable, SpecmeshError
from .mesh import Mesh, Pair, Peer

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
    """One pair: is its target reachable (`reachable`, placement), is speculation possible now
    (`connected`), and the tree depth to ask its draft for."""

    def __init__(self, treekv: Peer, pair: Pair, depth: int,
                 on_paired: Callable[["Pairing"], None] | None = None) -> None:
        self.treekv = treekv
        self.pair = pair
        self.fixed_depth = depth  # 0 = auto
        self.depth = max(depth, 1)
        self.connected = False
        self.generation = 0  # counts the pair's channels seen here; 0 = none yet
        self.on_paired = on_paired
        self.reachable = False
        # Why not reachable: what a request that no pair can take is told.
        self.error: SpecmeshError = ServiceUnavailable(f"{pair.target.name} at {pair.target.addr} has not "
                                                       f"answered yet")
        self._draft_instance = ""
        self._target_instance = ""
        self._waiting_for: str | None = None
        self._unregistered: dict[str, str] = {}  # model -> the RegisterPool error last logged
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.pair.draft is None:
            log.info("pair %s has no draft: target-only decoding", self.pair.id)
        self._task = asyncio.create_task(self._run(), name=f"router-pairing-{self.pair.id}")

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
                log.debug("pairing %s: %s", self.pair.id, exc)
            except Exception:  # a bug must not kill pairing for the life of the router
                self.connected = False
                backoff = MAX_BACKOFF_S
                log.exception("pairing %s failed", self.pair.id)
            await asyncio.sleep(backoff)

    def _wait(self, what: str | None, error: str = "", meanwhile: str = "generating target-only") -> None:
        """Log once per change which service pairing waits for (None: nothing missing)."""
        if what != self._waiting_for:
            if what is not None:
                log.warning("pair %s waits for %s: %s; %s meanwhile", self.pair.id, what, error, meanwhile)
            self._waiting_for = what

    async def probe_target(self) -> mesh_pb2.ServiceTiming:
        """Info of the pair's target: updates `reachable` and registers its pool in treekv.
        Raises SpecmeshError when the target does not answer."""
        target = self.pair.target
        try:
            info = await target.call("Info", mesh_pb2.Empty(), timeout=INFO_TIMEOUT_S)
        except SpecmeshError as exc:
            self.lost_target(exc)
            self._lost("target")
            self._wait(target.name, str(exc), "out of placement")
            raise
        if not self.reachable:
            log.info("pair %s: target reachable, in placement", self.pair.id)
        self.reachable = True
        await self._register("target", info)
        return info

    def lost_target(self, error: SpecmeshError) -> None:
        """Take the pair out of placement until its target answers a poll again."""
        if self.reachable:
            log.warning("pair %s out of placement: %s", self.pair.id, error)
        self.reachable = False
        self.error = error

    async def _register(self, model: str, info: mesh_pb2.ServiceTiming) -> None:
        """RegisterPool in treekv; a failure is logged (once per change), never fatal: the next
        poll registers again."""
        try:
            await self.treekv.call("RegisterPool", mesh_pb2.PoolRegistration(
                pair=self.pair.id, model=model, instance_id=info.instance_id, pool=info.pool), timeout=INFO_TIMEOUT_S)
        except SpecmeshError as exc:
            if self._unregistered.get(model) != str(exc):
                log.warning("cannot register the %s pool of pair %s in treekv: %s", model, self.pair.id, exc)
            self._unregistered[model] = str(exc)
        else:
            if self._unregistered.pop(model, None) is not None:
                log.info("registered the %s pool of pair %s in treekv", model, self.pair.id)

    async def poll_once(self) -> None:
        """One pairing check; raises SpecmeshError when a service is missing (the caller backs off)."""
        t_info = await self.probe_target()
        draft, target = self.pair.draft, self.pair.target
        if draft is None:
            return
        try:
            d_info = await draft.call("Info", mesh_pb2.Empty(), timeout=INFO_TIMEOUT_S)
        except SpecmeshError as exc:
            self._lost("draft")
            self._wait(draft.name, str(exc))
            raise
        await self._register("draft", d_info)
        same = d_info.instance_id == self._draft_instance and t_info.instance_id == self._target_instance
        if self.connected and d_info.channel_connected and same:
            return
        if d_info.channel_connected and t_info.channel_connected:
            # Both have a channel: ours after a missed poll, or one another router replica made
            # (every replica pairs draft i with target i). Replacing it would cut its sessions off.
            self._wait(None)
            self._paired(d_info, t_info, new_channel=not same)
            if not same:
                log.info("pair %s: draft %s and target %s are already paired; depth %d", self.pair.id, draft.addr,
                         target.addr, self.depth)
            return
        if self.connected:
            log.warning("pair %s: draft or target restarted or lost its channel: re-pairing", self.pair.id)
        self.connected = False
        endpoint = await target.call("PrepareChannel", mesh_pb2.Empty())
        if endpoint.host in ("", "0.0.0.0", "::"):
            endpoint.host = target.host  # the target listens everywhere: dial it where we dial it
        self._wait(None)
        await draft.call("ConnectChannel", endpoint, timeout=CONNECT_TIMEOUT_S)
        await self._target_attached()
        self._paired(d_info, t_info, new_channel=True)
        log.info("paired draft %s with target %s over %s:%d (%s, epoch %s); depth %d (target %.1f ms, draft %.1f ms)",
                 draft.addr, target.addr, endpoint.host, endpoint.port, endpoint.backend or "gloo",
                 endpoint.epoch[:8], self.depth, t_info.forward_ms, d_info.forward_ms)

    def _paired(self, d_info: mesh_pb2.ServiceTiming, t_info: mesh_pb2.ServiceTiming, new_channel: bool) -> None:
        """The pair speculates from now on (with the depth its timings give). On a new channel the
        draft holds none of the pair's running sessions: they are resumed on it."""
        self._draft_instance, self._target_instance = d_info.instance_id, t_info.instance_id
        if self.fixed_depth == 0:
            self.depth = auto_depth(t_info.forward_ms, d_info.forward_ms)
        self.connected = True
        if new_channel:
            self.generation += 1
            if self.on_paired is not None:
                self.on_paired(self)

    async def _target_attached(self) -> None:
        """The target attaches its end of the channel in the background after the draft joined:
        report the pair connected only once it has, so no session is told to speculate early."""
        deadline = asyncio.get_running_loop().time() + ATTACH_TIMEOUT_S
        while True:
            info = await self.pair.target.call("Info", mesh_pb2.Empty(), timeout=INFO_TIMEOUT_S)
            if info.channel_connected:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise ServiceUnavailable(f"{self.pair.target.name} at {self.pair.target.addr} did not attach the "
                                         f"tensor channel within {ATTACH_TIMEOUT_S:.0f}s of the draft joining it")
            await asyncio.sleep(0.02)

    def _lost(self, which: str) -> None:
        if self.connected:
            log.warning("pair %s: %s-service unreachable: speculation off until it is back", self.pair.id, which)
        self.connected = False


class Pairings:
    """Every pair's Pairing, by pair id, and the placement view the router gives treekv."""

    def __init__(self, mesh: Mesh, depth: int, on_paired: Callable[[Pairing], None] | None = None) -> None:
        self.by_id = {pair.id: Pairing(mesh.treekv, pair, depth, on_paired) for pair in mesh.pairs}

    async def start(self) -> None:
        """Probe every target once (so the first requests find their pools registered), then poll."""
        await asyncio.gather(*(self._probe(p) for p in self.by_id.values()))
        for pairing in self.by_id.values():
            pairing.start()

    @staticmethod
    async def _probe(pairing: Pairing) -> None:
        try:
            await pairing.probe_target()
        except SpecmeshError:
            pass  # logged; the pair stays out of placement until a poll reaches its target

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.by_id.values()))

    def usable(self) -> list[str]:
        """Ids of the pairs a new session may be placed on (their target answered the last poll)."""
        return [pair_id for pair_id, p in self.by_id.items() if p.reachable]

    def unavailable(self) -> SpecmeshError:
        """The error of a request that no pair can take: one pair's own (with its status, e.g. a
        refused secret), or UNAVAILABLE listing every pair's."""
        errors = [p.error for p in self.by_id.values()]
        if len(errors) == 1:
            return errors[0].with_traceback(None)  # raised again and again: keep no old frames
        return ServiceUnavailable("no pair can take the request: " + "; ".join(map(str, errors)))

    @property
    def any_connected(self) -> bool:
        """Some pair speculates (what ModelInfo.draft_connected reports)."""
        return any(p.connected for p in self.by_id.values())

    def status(self) -> list[dict[str, object]]:
        """Per pair, for /health."""
        return [{"pair": pair_id, "target_reachable": p.reachable, "draft_connected": p.connected}
                for pair_id, p in self.by_id.items()]
