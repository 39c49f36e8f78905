"""Graceful stop, the same in every service (what Kubernetes' SIGTERM and `specmesh up` ask for):

1. stop accepting: health goes NOT_SERVING and new work is refused with UNAVAILABLE naming the
   service (the router then answers its clients UNAVAILABLE / HTTP 503);
2. let what is in flight finish, for up to the grace period (`--shutdown-grace-s`, 30 s by default);
3. then the caller stops its servers.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from grpc_health.v1 import health

from .errors import ServiceUnavailable

log = logging.getLogger("specmesh.drain")

POLL_S = 0.05
STOP_GRACE_S = 1.0  # after draining: what an RPC still running gets when the server stops


class Drain:
    """A service's draining state: `refuse_new()` at the door of every new session, `run()` on stop."""

    def __init__(self, service: str) -> None:
        self.service = service  # "target-service", ... (the name clients see in the refusal)
        self.draining = False

    def refuse_new(self) -> None:
        """Raise ServiceUnavailable once draining has begun."""
        if self.draining:
            raise ServiceUnavailable(f"{self.service} is shutting down and accepts no new sessions")

    async def run(self, health_servicer: health.aio.HealthServicer, in_flight: Callable[[], int],
                  grace_s: float) -> None:
        """Steps 1 and 2: refuse new work, report NOT_SERVING, wait until in_flight() is 0 or
        grace_s has passed (whichever is first)."""
        self.draining = True
        await health_servicer.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        if in_flight():
            log.info("%s draining: up to %.0fs for %d sessions in flight", self.service, grace_s, in_flight())
        while in_flight() and loop.time() < deadline:
            await asyncio.sleep(POLL_S)
        if in_flight():
            log.warning("%s: grace of %.0fs is over with %d sessions in flight; stopping", self.service, grace_s,
                        in_flight())
