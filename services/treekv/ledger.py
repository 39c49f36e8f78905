"""The treekv ledger: admission into every pair's draft and target pools, the prefix index over
what those pools cache, placement of new sessions on a pair, and each session's committed log.

Plain Python with no gRPC and no tensors, so it is unit-tested directly; server.py wraps it.

Who owns what (docs/architecture.md, "One KV authority"): each model service owns its pool's
*placement* (which blocks a session gets, compaction, which cached entries to evict when it needs
room). The ledger owns *admission*: it counts the blocks admitted to live sessions per pool and
admits a session only if it fits (`used + need <= total`; blocks that only hold cached entries are
reclaimable, so they do not count). Pool sizes are not configured here: the router registers each
pool from its service's report (`register_pool`), and `need` comes from that report too.

The prefix index (prefix_index.py, one per pool) says which entry holds the longest prefix of a
new prompt. It is a hint the service checks, so it may lag (an entry the service evicted is
pruned at the next registration) but it never makes an output wrong.

Concurrency: the gRPC servicer calls it from a single asyncio loop and no method awaits, so each
call is atomic with respect to the others without a lock.

Leases are bounded in time: a session expires `lease_ttl_s` after it was opened or last renewed,
so a router that dies cannot strand blocks. A CloseSession that overtakes its OpenSession leaves a
tombstone, and the late open is refused. `leases()` / `restore()` let a restarted treekv keep
counting the blocks of running sessions; their committed logs are not kept and read as lost.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable

from ..runtime.errors import InvalidRequest, NotFound, ResourceExhausted, ServiceUnavailable, SessionClosed
from ..runtime.expiring_ids import ExpiringIds
from .prefix_index import PrefixIndex, PrefixMatch

MAX_SESSION_ID_CHARS = 256  # ids are router-made (uuid-like); the cap keeps Stats and logs bounded
DEFAULT_LEASE_TTL_S = 60.0
# A finished entry missing from its service's report is pruned only after this long: the report
# may have been taken before the session ended and the service kept its blocks.
PRUNE_GRACE_S = 5.0

DRAFT = "draft"
TARGET = "target"
MODELS = (DRAFT, TARGET)


@dataclasses.dataclass(frozen=True)
class PoolReport:
    """What a model service says about its pool (mesh.proto PoolReport)."""

    num_blocks: int
    block_size: int
    reserve_slots: int = 0
    cached_entries: tuple[str, ...] = ()
    cached_blocks: int = 0


@dataclasses.dataclass
class Pool:
    """One pair's draft or target pool, as the ledger sees it."""

    pair: str
    model: str
    instance_id: str
    report: PoolReport
    used_blocks: int = 0
    index: PrefixIndex = dataclasses.field(default_factory=PrefixIndex)
    closed_at: dict[str, float] = dataclasses.field(default_factory=dict)  # finished entries -> when
    hit_tokens: int = 0
    miss_tokens: int = 0
    rejections: int = 0

    @property
    def name(self) -> str:
        return f"{self.model} pool of pair {self.pair}"

    def blocks_for(self, slots: int) -> int:
        """Blocks needed for `slots` KV slots plus the service's scratch (ceil division)."""
        return -(-(slots + self.report.reserve_slots) // self.report.block_size)

    @property
    def free_blocks(self) -> int:
        return self.report.num_blocks - self.used_blocks


@dataclasses.dataclass(frozen=True)
class Admission:
    """A session's blocks in one pool, and the cached prefix it may copy (None: prefill it all)."""

    num_blocks: int
    block_size: int
    prefix: PrefixMatch | None = None


@dataclasses.dataclass
class SessionRecord:
    """What the ledger keeps per live session."""

    session_id: str
    pair: str
    draft: Admission | None   # None: the pair has no draft pool registered
    target: Admission
    prompt_ids: list[int]
    expires_at: float  # on the ledger's clock; pushed back by renew()
    instances: dict[str, str] = dataclasses.field(default_factory=dict)  # model -> instance at open
    committed_ids: list[int] = dataclasses.field(default_factory=list)
    log_lost: bool = False  # restored after a restart: its prompt and committed log are unknown

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the target may copy instead of prefilling (the index's prediction)."""
        return self.target.prefix.num_tokens if self.target.prefix else 0


@dataclasses.dataclass(frozen=True)
class SessionUsage:
    """Blocks one session holds in each pool of its pair."""

    session_id: str
    pair: str
    draft_blocks: int
    target_blocks: int


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """A snapshot of one pool."""

    pair: str
    model: str
    block_size: int
    blocks_total: int
    blocks_used: int
    cached_blocks: int
    cached_entries: int
    hit_tokens: int
    miss_tokens: int
    rejections: int


class KVLedger:
    """Admits sessions into registered pools, indexes their prefixes, records committed tokens."""

    def __init__(self, lease_ttl_s: float = DEFAULT_LEASE_TTL_S, prefix_cache: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be positive, got {lease_ttl_s}")
        self.lease_ttl_s = lease_ttl_s
        self.prefix_cache = prefix_cache
        self.clock = clock
        self._tombstones = ExpiringIds(clock=clock)  # closed before they opened
        self._closed = ExpiringIds(clock=clock)  # closed after they opened: a repeated close is no tombstone
        self.pools: dict[tuple[str, str], Pool] = {}  # (pair, model)
        self._sessions: dict[str, SessionRecord] = {}
        # Blocks of restored sessions whose pool has not registered yet: (pair, model) -> blocks.
        self._pending_used: dict[tuple[str, str], int] = {}

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

    # ---------------------------------------------------------------- pools

    def register_pool(self, pair: str, model: str, instance_id: str, report: PoolReport) -> Pool:
        """Add or refresh a pool from its service's report (the router sends one every poll).

        A new instance id means the service restarted and its cached KV is gone: the pool's index
        is emptied. Finished entries the service no longer lists (it evicted them) are pruned.
        """
        if not pair:
            raise InvalidRequest("pair must not be empty")
        if model not in MODELS:
            raise InvalidRequest(f"model must be one of {', '.join(MODELS)}, got {model!r}")
        if report.num_blocks <= 0 or report.block_size <= 0 or report.reserve_slots < 0:
            raise InvalidRequest(f"{model} pool of pair {pair}: num_blocks and block_size must be positive and "
                                 f"reserve_slots >= 0, got {report.num_blocks}, {report.block_size}, "
                                 f"{report.reserve_slots}")
        key = (pair, model)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(pair, model, instance_id, report,
                                          used_blocks=self._pending_used.pop(key, 0))
        elif pool.instance_id != instance_id:
            pool.instance_id, pool.index, pool.closed_at = instance_id, PrefixIndex(), {}
        pool.report = report
        listed, now = set(report.cached_entries), self.clock()
        for entry_id, closed_at in list(pool.closed_at.items()):
            if entry_id not in listed and now - closed_at > PRUNE_GRACE_S:
                pool.index.remove(entry_id)
                del pool.closed_at[entry_id]
        return pool

    def pairs(self) -> list[str]:
        """Pairs with a registered target pool, in registration order."""
        return [pair for (pair, model) in self.pools if model == TARGET]

    # ---------------------------------------------------------------- sessions

    def open_session(self, session_id: str, prompt_ids: Iterable[int], max_tokens: int,
                     pairs: Iterable[str] = ()) -> SessionRecord:
        """Place a session on one of `pairs` (all registered pairs if empty) and admit it there.

        Placement prefers the pair whose target pool caches the longest prefix of the prompt, then
        the most free target blocks, then the fewest live sessions. Admission is both pools or
        neither. Raises InvalidRequest for bad arguments, SessionClosed after a tombstone,
        ServiceUnavailable when no listed pair is registered, ResourceExhausted (naming the pool and
        the numbers) when no pair has room.
        """
        _check_session_id(session_id)
        if session_id in self._sessions:
            raise InvalidRequest(f"session {session_id!r} is already open")
        if self._tombstones.take(session_id):
            raise SessionClosed(f"session {session_id!r} was closed before it opened")
        prompt = _check_tokens(prompt_ids, "prompt_ids")
        if not prompt:
            raise InvalidRequest("prompt_ids must not be empty")
        if max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be positive, got {max_tokens}")
        wanted = list(dict.fromkeys(pairs)) or self.pairs()
        candidates = [p for p in wanted if (p, TARGET) in self.pools]
        if not candidates:
            raise ServiceUnavailable(f"no KV pool is registered for pair(s) {', '.join(wanted) or '(none)'} "
                                     f"yet (the router registers a pair once it reaches its services)")
        slots = len(prompt) + max_tokens
        refusals: list[str] = []
        options = []
        for pair in candidates:
            target, draft = self.pools[(pair, TARGET)], self.pools.get((pair, DRAFT))
            refusal = next((r for r in (_refusal(pool, slots) for pool in (draft, target) if pool) if r), None)
            if refusal:
                refusals.append(refusal)
                continue
            hit = self._match(target, prompt)
            options.append((-(hit.num_tokens if hit else 0), -target.free_blocks, self._live_on(pair), pair))
        if not options:
            for pair in candidates:
                for model in MODELS:
                    if (pool := self.pools.get((pair, model))) and _refusal(pool, slots):
                        pool.rejections += 1
            raise ResourceExhausted("; ".join(refusals))
        pair = min(options)[3]
        record = SessionRecord(session_id, pair, None, self._admit(self.pools[(pair, TARGET)], prompt, slots),
                               prompt, expires_at=self.clock() + self.lease_ttl_s)
        if (draft := self.pools.get((pair, DRAFT))) is not None:
            record.draft = self._admit(draft, prompt, slots)
        for model in MODELS:
            if (pool := self.pools.get((pair, model))) is not None:
                record.instances[model] = pool.instance_id
                if self.prefix_cache:  # a running prompt is a source too (the service waits for it)
                    pool.index.insert(session_id, prompt)
        self._sessions[session_id] = record
        return record

    def _match(self, pool: Pool, prompt: list[int]) -> PrefixMatch | None:
        """The pool's longest cached prefix of `prompt`, leaving its last token to be run (its
        logits give the first token)."""
        return pool.index.match(prompt, limit=len(prompt) - 1) if self.prefix_cache else None

    def _admit(self, pool: Pool, prompt: list[int], slots: int) -> Admission:
        hit = self._match(pool, prompt)
        cached = hit.num_tokens if hit else 0
        pool.hit_tokens += cached
        pool.miss_tokens += len(prompt) - cached
        need = pool.blocks_for(slots)
        pool.used_blocks += need
        return Admission(need, pool.report.block_size, hit)

    def _live_on(self, pair: str) -> int:
        return sum(1 for r in self._sessions.values() if r.pair == pair)

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

    def close_session(self, session_id: str, draft_kv_tokens: int = 0, target_kv_tokens: int = 0) -> bool:
        """Free the session's blocks and drop its log. Idempotent: False if it was not open.

        `*_kv_tokens`: how many leading tokens of prompt + committed have valid KV in each service
        now. Those stay in the service as a cache entry, so they are indexed (0: nothing cached).
        Closing an id that was never opened leaves a tombstone: its open, should it still arrive, is
        refused (SessionClosed) instead of admitting blocks nobody will free.
        """
        if draft_kv_tokens < 0 or target_kv_tokens < 0:
            raise InvalidRequest(f"kv token counts must be >= 0, got {draft_kv_tokens}, {target_kv_tokens}")
        record = self._sessions.pop(session_id, None)
        if record is None:
            if session_id and session_id not in self._closed:
                self._tombstones.add(session_id)
            return False
        self._closed.add(session_id)
        tokens = [] if record.log_lost else record.prompt_ids + record.committed_ids
        for model, admission, kv_tokens in ((DRAFT, record.draft, draft_kv_tokens),
                                            (TARGET, record.target, target_kv_tokens)):
            key = (record.pair, model)
            if admission is None:
                continue
            pool = self.pools.get(key)
            if pool is None:  # restored, and the pool never registered again
                self._pending_used[key] = self._pending_used.get(key, 0) - admission.num_blocks
                continue
            pool.used_blocks -= admission.num_blocks
            pool.index.remove(session_id)
            same_process = record.instances.get(model) == pool.instance_id
            if self.prefix_cache and same_process and kv_tokens > 0 and tokens:
                pool.index.insert(session_id, tokens[:kv_tokens])
                pool.closed_at[session_id] = self.clock()
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

    # ---------------------------------------------------------------- restart

    def leases(self) -> list[dict[str, int | str]]:
        """Every open session's admissions, JSON-ready (what a restarted ledger needs to `restore`)."""
        return [{"session_id": r.session_id, "pair": r.pair, "target_blocks": r.target.num_blocks,
                 "draft_blocks": r.draft.num_blocks if r.draft else 0}
                for r in self._sessions.values()]

    def restore(self, leases: Iterable[dict[str, int | str]]) -> int:
        """Count these sessions' blocks again (from `leases()` of the ledger this one replaces).

        Each gets a full TTL, so sessions whose router is gone expire as usual; their pools are
        charged when they register. Returns how many sessions were restored.
        """
        count = 0
        for item in leases:
            session_id, pair = str(item["session_id"]), str(item["pair"])
            admissions = {}
            for model in MODELS:
                blocks = int(item[f"{model}_blocks"])
                if blocks > 0:
                    key = (pair, model)
                    if key in self.pools:
                        self.pools[key].used_blocks += blocks
                    else:
                        self._pending_used[key] = self._pending_used.get(key, 0) + blocks
                    admissions[model] = Admission(blocks, 0)
            self._sessions[session_id] = SessionRecord(
                session_id, pair, admissions.get(DRAFT), admissions.get(TARGET, Admission(0, 0)), [],
                expires_at=self.clock() + self.lease_ttl_s, log_lost=True)
            count += 1
        return count

    # ---------------------------------------------------------------- stats

    def pool_stats(self) -> list[PoolStats]:
        """One snapshot per registered pool, in registration order."""
        return [PoolStats(p.pair, p.model, p.report.block_size, p.report.num_blocks, p.used_blocks,
                          p.report.cached_blocks,
                          len(p.closed_at), p.hit_tokens, p.miss_tokens, p.rejections)
                for p in self.pools.values()]

    def session_usage(self) -> list[SessionUsage]:
        """Each live session's blocks, in opening order."""
        return [SessionUsage(r.session_id, r.pair, r.draft.num_blocks if r.draft else 0, r.target.num_blocks)
                for r in self._sessions.values()]


def _refusal(pool: Pool, slots: int) -> str | None:
    """Why `pool` cannot admit a session of `slots` slots now, or None if it can."""
    need = pool.blocks_for(slots)
    if need > pool.report.num_blocks:
        return (f"{pool.name}: the session needs {need} blocks ({slots} slots + {pool.report.reserve_slots} "
                f"scratch), more than the whole pool of {pool.report.num_blocks}")
    if need > pool.free_blocks:
        return (f"{pool.name} full: need {need} blocks, {pool.free_blocks} free of {pool.report.num_blocks} "
                f"(cached blocks are reclaimed by the service as needed)")
    return None


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
