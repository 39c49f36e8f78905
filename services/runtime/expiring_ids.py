"""A set of session ids that forgets each id a fixed time after it was added.

The services use it for *tombstones*: an end (Abort, CloseSession) that overtakes the open of the
same session leaves the id here, and the late open honours it instead of starting a session that
nobody will ever end. Ids are unique per request attempt (the router makes them), so remembering
an id for a while can never refuse a legitimate session.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

DEFAULT_TTL_S = 120.0  # far longer than any open can lag behind its end (the router's RPC deadlines)
DEFAULT_MAX_IDS = 100_000  # bounds memory whatever the request rate


class ExpiringIds:
    """Thread-safe: the draft adds from gRPC handlers and reads from its worker thread."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, max_ids: int = DEFAULT_MAX_IDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_ids, self.clock = ttl_s, max_ids, clock
        self._ids: OrderedDict[str, float] = OrderedDict()  # id -> when added, oldest first
        self._lock = threading.Lock()

    def add(self, session_id: str) -> None:
        with self._lock:
            self._ids.pop(session_id, None)
            self._ids[session_id] = self.clock()
            self._prune()

    def take(self, session_id: str) -> bool:
        """Remove the id; True if it was there (and not expired)."""
        with self._lock:
            self._prune()
            return self._ids.pop(session_id, None) is not None

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            self._prune()
            return session_id in self._ids

    def __len__(self) -> int:
        with self._lock:
            self._prune()
            return len(self._ids)

    def _prune(self) -> None:
        horizon = self.clock() - self.ttl_s
        while self._ids and (len(self._ids) > self.max_ids or next(iter(self._ids.values())) < horizon):
            self._ids.popitem(last=False)
