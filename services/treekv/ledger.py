"""The treekv ledger: KV block leases of the draft and target pools plus each session's committed log.

Plain Python with no gRPC and no tensors, so it is unit-tested directly; server.py wraps it.

Concurrency: the gRPC servicer calls it from a single asyncio loop and no method awaits, so each
call is atomic with respect to the others without a lock (open's "both leases or neither" included).

Leases are bounded in time: each session expires `lease_ttl_s` after it was opened or last renewed
(`renew`, which the router sends for all its live sessions about every second or so), so a router
that dies cannot strand blocks. A CloseSession that overtakes its OpenSession (the router gave up
while the open was in flight) leaves a tombstone, and the late open is refused.

`leases()` / `restore()` let a restarted treekv rebuild exactly the leases its predecessor had
granted (server.py keeps them in --state-file), so blocks that running sessions still use on the
draft and target are never leased twice. Committed-token logs are not kept across a restart: a
restored session's log reads as lost.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable

from ..runtime.block_allocator import BlockAllocator
from ..runtime.errors import InvalidRequest, NotFound, ResourceExhausted, SessionClosed
from ..runtime.expiring_ids import ExpiringIds

MAX_SESSION_ID_CHARS = 256  # ids are router-made (uuid-like); the cap keeps Stats and logs bounded
DEFAULT_LEASE_TTL_S = 60.0

DRAFT = "draft"
TARGET = "target"
POOLS = (DRAFT, TARGET)


@dataclasses.dataclass(frozen=True)
class Lease:
    """A contiguous range of blocks [first_block, first_block + num_blocks) in one pool."""

    first_block: int
    num_blocks: int


@dataclasses.dataclass
class SessionRecord:
    """What the ledger keeps per live session."""

    session_id: str
    draft: Lease
    target: Lease
    prompt_ids: list[int]
    expires_at: float  # on the ledger's clock; pushed back by renew()
    committed_ids: list[int] = dataclasses.field(default_factory=list)
    log_lost: bool = False  # restored after a restart: its prompt and committed log are unknown


@dataclasses.dataclass(frozen=True)
class SessionUsage:
    """Blocks one session holds in each pool."""

    session_id: str
    draft_blocks: int
    target_blocks: int


@dataclasses.dataclass(frozen=True)
class LedgerStats:
    """A consistent snapshot of the ledger's occupancy."""

    draft_blocks_total: int
    draft_blocks_used: int
    target_blocks_total: int
    target_blocks_used: int
    block_size: int
    sessions: tuple[SessionUsage, ...]


class KVLedger:
    """Grants per-session leases in the draft and target pools and records committed tokens."""

    def __init__(self, draft_blocks: int, target_blocks: int, block_size: int,
                 lease_ttl_s: float = DEFAULT_LEASE_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be positive, got {lease_ttl_s}")
        self.block_size = block_size
        self.lease_ttl_s = lease_ttl_s
        self.clock = clock
        self._tombstones = ExpiringIds(clock=clock)  # closed before they opened
        self._closed = ExpiringIds(clock=clock)  # closed after they opened: a repeated close is no tombstone
        self.pools: dict[str, BlockAllocator] = {
            DRAFT: BlockAllocator(draft_blocks, name="draft pool"),
            TARGET: BlockAllocator(target_blocks, name="target pool"),
        }
        self._sessions: dict[str, SessionRecord] = {}
        # Admission refusals per pool, for metrics: a rising count is the signal to add memory.
        self.rejections: dict[str, int] = {pool: 0 for pool in POOLS}

    def blocks_for(self, slots: int) -> int:
        """Blocks needed to hold `slots` KV slots (ceil division)."""
        return -(-slots // self.block_size)

    @property
    def active_sessions(self) -> int:
        """Number of open sessions."""
        return len(self._sessions)

    def session(self, session_id: str) -> SessionRecord:
        """The live record of a session (NotFound if it is not open)."""
        record = self._sessions.get(session_id)
        if record is None:
            raise NotFound(f"unknown session {session_id!r} (never opened or already closed)")
        return record

    def open_session(self, session_id: str, draft_slots: int, target_slots: int,
                     prompt_ids: Iterable[int] = ()) -> SessionRecord:
        """Lease one contiguous range in each pool and start the session's log with the prompt.

        Atomic: either both leases are granted or neither (a refused target lease returns the draft
        one). Raises InvalidRequest for a bad id, non-positive slot counts, negative token ids or an
        id that is already open; ResourceExhausted (naming the pool) when a pool has no room.
        """
        _check_session_id(session_id)
        if session_id in self._sessions:
            raise InvalidRequest(f"session {session_id!r} is already open")
        if self._tombstones.take(session_id):
            raise SessionClosed(f"session {session_id!r} was closed before it opened")
        if draft_slots <= 0 or target_slots <= 0:
            raise InvalidRequest(f"slot counts must be positive, got draft_slots={draft_slots} "
                                 f"target_slots={target_slots}")
        prompt = _check_tokens(prompt_ids, "prompt_ids")
        draft_pool, target_pool = self.pools[DRAFT], self.pools[TARGET]
        draft_n, target_n = self.blocks_for(draft_slots), self.blocks_for(target_slots)
        try:
            draft_first = draft_pool.allocate(draft_n)
        except ResourceExhausted:
            self.rejections[DRAFT] += 1
            raise
        try:
            target_first = target_pool.allocate(target_n)
        except ResourceExhausted:
            draft_pool.release(draft_first, draft_n)  # all or nothing: never strand a draft lease
            self.rejections[TARGET] += 1
            raise
        record = SessionRecord(session_id, Lease(draft_first, draft_n), Lease(target_first, target_n), prompt,
                               expires_at=self.clock() + self.lease_ttl_s)
        self._sessions[session_id] = record
        return record

    def append_committed(self, session_id: str, token_ids: Iterable[int]) -> int:
        """Append verified tokens to the session's log; returns the committed count after it."""
        record = self.session(session_id)
        tokens = _check_tokens(token_ids, "token_ids")
        record.committed_ids.extend(tokens)
        return len(record.committed_ids)

    def get_committed(self, session_id: str) -> tuple[list[int], list[int]]:
        """Copies of (prompt_ids, committed_ids) for a live session (NotFound otherwise)."""
        record = self.session(session_id)
        if record.log_lost:
            raise NotFound(f"the committed log of session {session_id!r} was lost when treekv restarted")
        return list(record.prompt_ids), list(record.committed_ids)

    def leases(self) -> list[dict[str, int | str]]:
        """Every open session's leases, JSON-ready (what a restarted ledger needs to `restore`)."""
        return [{"session_id": r.session_id, "draft_first": r.draft.first_block, "draft_blocks": r.draft.num_blocks,
                 "target_first": r.target.first_block, "target_blocks": r.target.num_blocks}
                for r in self._sessions.values()]

    def restore(self, leases: Iterable[dict[str, int | str]]) -> int:
        """Re-grant exactly these leases (from `leases()` of the ledger this one replaces); each
        gets a full TTL, so sessions whose router is gone expire as usual. Returns how many."""
        count = 0
        for item in leases:
            draft, target = (Lease(int(item["draft_first"]), int(item["draft_blocks"])),
                             Lease(int(item["target_first"]), int(item["target_blocks"])))
            self.pools[DRAFT].claim(draft.first_block, draft.num_blocks)
            self.pools[TARGET].claim(target.first_block, target.num_blocks)
            session_id = str(item["session_id"])
            self._sessions[session_id] = SessionRecord(session_id, draft, target, [],
                                                       expires_at=self.clock() + self.lease_ttl_s, log_lost=True)
            count += 1
        return count

    def close_session(self, session_id: str) -> bool:
        """Free both leases and drop the log. Idempotent: returns False if the session was not open.

        Closing an id that was never opened leaves a tombstone: its open, should it still arrive, is
        refused (SessionClosed) instead of leasing blocks nobody will free.
        """
        record = self._sessions.pop(session_id, None)
        if record is None:
            if session_id and session_id not in self._closed:
                self._tombstones.add(session_id)
            return False
        self._release(record)
        self._closed.add(session_id)
        return True

    def renew(self, session_ids: Iterable[str]) -> list[str]:
        """Push back the expiry of these sessions; returns the ids that are not open here."""
        expires_at = self.clock() + self.lease_ttl_s
        unknown = []
        for session_id in session_ids:
            record = self._sessions.get(session_id)
            if record is None:
                unknown.append(session_id)
            else:
                record.expires_at = expires_at
        return unknown

    def expire(self) -> list[str]:
        """Close every session whose lease ran out (nobody renewed it); returns their ids."""
        now = self.clock()
        gone = [r.session_id for r in self._sessions.values() if r.expires_at <= now]
        for session_id in gone:
            self.close_session(session_id)
        return gone

    def _release(self, record: SessionRecord) -> None:
        self.pools[DRAFT].release(record.draft.first_block, record.draft.num_blocks)
        self.pools[TARGET].release(record.target.first_block, record.target.num_blocks)

    def stats(self) -> LedgerStats:
        """Totals, used blocks per pool, block size and each session's blocks (in opening order)."""
        draft_pool, target_pool = self.pools[DRAFT], self.pools[TARGET]
        return LedgerStats(
            draft_blocks_total=draft_pool.num_blocks, draft_blocks_used=draft_pool.used_blocks,
            target_blocks_total=target_pool.num_blocks, target_blocks_used=target_pool.used_blocks,
            block_size=self.block_size,
            sessions=tuple(SessionUsage(r.session_id, r.draft.num_blocks, r.target.num_blocks)
                           for r in self._sessions.values()))


def _check_session_id(session_id: str) -> None:
    if not session_id:
        raise InvalidRequest("session_id must not be empty")
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidRequest(f"session_id has {len(session_id)} characters, at most {MAX_SESSION_ID_CHARS}")


def _check_tokens(token_ids: Iterable[int], what: str) -> list[int]:
    tokens = [int(t) for t in token_ids]
    bad = [t for t in tokens if t < 0]
    if bad:
        raise InvalidRequest(f"{what} must be non-negative token ids, got {bad[0]}")
    return tokens
