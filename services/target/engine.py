"""The target's engine: continuous batching of verification rounds and prefill chunks.

One worker thread (runtime.actor) owns the model. Each step it takes every session that has work:
the next subtree the draft sent (or the one-node tree of a session without a draft) and, within
the step's row budget, the next chunk of each newly arrived prompt; all of it runs in one forward
(runtime.forward_batch.Runner). Then, per session: accept, compact, send the verified tokens to
the draft first (it is what the next round waits on), then hand them to the session's gRPC
stream. Sessions join and leave between steps; a long prompt never stalls running sessions for
more than one chunk. Sessions whose draft is gone (never paired, or it died mid-stream) continue
target-only: same session, one-node trees; when a draft sends a subtree for such a session (the
router re-opened it on a restarted draft, from the committed tokens), it speculates again. Any
exception in a session's work (its message, its part of a step) ends that session alone, with its
error, and frees its KV (runtime/session_failure.py, the policy the draft follows too); a failed
forward ends the sessions of that step.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from specmesh.services.runtime import telemetry
from specmesh.services.runtime.actor import ChannelUp, EngineActor
from specmesh.services.runtime.channel import CATCH_UP_TOKENS, Subtree, TensorChannel
from specmesh.services.runtime.errors import InvalidRequest
from specmesh.services.runtime.expiring_ids import ExpiringIds
from specmesh.services.runtime.forward_batch import Runner, SeqRows
from specmesh.services.runtime.prefix_cache import SessionPool
from specmesh.services.runtime.request import Request, clip_chunk
from specmesh.services.runtime.session_failure import FAILED, SessionFailure, describe
from specmesh.services.runtime.target_session import Decision, TargetSession, Tree

from . import metrics

log = logging.getLogger("specmesh.target")
ORPHAN_TTL_S = 60.0  # a session opens within the router's RPC deadlines of its draft's open, or never
_TRACER = telemetry.tracer("specmesh.target")


@dataclass
class RoundOut:
    """What the gRPC stream relays for one round."""

    tokens: list[int]
    accepted: int
    tree_size: int
    round: int
    finish: str | None  # "length", "stop", "abort", or None
    verify_ms: float
    speculative: bool
    error: str | None = None  # the session failed: this message, with gRPC status error_code
    error_code: str = "INTERNAL"
    cached_tokens: int = 0  # first update: prompt tokens whose KV was copied from the prefix cache
    kv_tokens: int = 0  # last update: leading tokens of prompt + output whose KV the pool keeps


@dataclass
class SessionState:
    channel_id: int  # the session's tag on the tensor channel
    session_id: str
    request: Request
    num_blocks: int  # treekv admitted the session for this many blocks of the pool
    speculative: bool
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    prefix: tuple[str, int] | None = None  # treekv's prefix-cache hint: (entry id, tokens)
    session: TargetSession | None = None
    waiting: bool = True  # for its prefix source to compute the tokens it may copy (no prefill yet)
    cached: int = 0  # prompt tokens copied from the prefix cache
    trees: deque = field(default_factory=deque)  # subtrees received, not verified yet
    produced: int = 0
    rounds: int = 0
    done: bool = False
    trace_ctx: Any = None  # the Generate span's context: round spans are its children
    sent_at: float | None = None  # when verified tokens last went to the draft
    draft_told_prefilled: bool = False  # the draft heard this session's prefill is done
    draft_sent: bool = False  # a subtree came for it (the draft follows it, or did)

    @property
    def draft_follows(self) -> bool:
        """The draft works for this live session: it speculates, and the draft is not holding it
        until it hears of the prefill (DraftOpenRequest.after_target_prefill)."""
        return self.speculative and not self.done and (self.draft_told_prefilled or self.draft_sent)

    def emit(self, item: RoundOut) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


# -- inbox messages ------------------------------------------------------------------------------
@dataclass
class Open:
    state: SessionState


@dataclass
class Abort:
    channel_id: int


@dataclass
class SubtreeIn:
    subtree: Subtree
    channel: TensorChannel | None = None  # the channel it came on (a replaced channel's are dropped)


@dataclass
class _Job:
    """One session's part of a step: a prefill chunk (tree None) or a tree to verify."""

    state: SessionState
    rows: SeqRows
    tree: Tree | None = None
    skipped: list[int] = field(default_factory=list)
    draft_span: tuple[int, int, int] = (0, 0, 0)
    received: float = 0.0
    ahead: bool = False  # a plain round while the draft's subtree is on its way: the draft is not told


MIN_PATIENCE_MS = 50.0  # the least default draft patience: scheduling noise alone is a few ms


class TargetEngine(EngineActor):
    name = "target"

    def __init__(self, runner: Runner, pool: SessionPool, tp: Any = None, verify_delay_ms: float = 0.0,
                 prefill_chunk: int = 256, borrow_threads: int | None = None, draft_patience_s: float = 0.0) -> None:
        super().__init__()
        self.runner, self.pool = runner, pool
        self.model = runner.model
        self.verify_delay_ms = verify_delay_ms
        self.prefill_chunk = prefill_chunk
        self.borrow_threads = borrow_threads  # None: every step keeps the process's threads
        # Steps the draft takes no part in take its cores too: the draft then prefills after the target.
        self.borrows_cores = borrow_threads is not None and borrow_threads > torch.get_num_threads()
        self.draft_patience_s = draft_patience_s  # 0 = wait for the draft as long as it takes
        self.tp = tp  # TPLeader when the target is tensor parallel: broadcasts batches and decisions
        self.sessions: dict[int, SessionState] = {}
        # Subtrees that beat their session's open, with when the first arrived: a session that
        # never opens (its router gave up in between) must not keep them forever.
        self.orphans: dict[int, tuple[float, list[Subtree]]] = {}
        self.ended = ExpiringIds()  # channel ids of ended sessions: a subtree still in flight is dropped
        self._turn = 0  # rotates which session goes first when a step's row budget runs out
        self.handle(Open, self._on_open)
        self.handle(Abort, self._on_abort)
        self.handle(SubtreeIn, self._on_subtree)
        self.start()

    # -- called from the gRPC side -----------------------------------------------------------
    def open(self, state: SessionState) -> None:
        self.post(Open(state))

    def abort(self, channel_id: int) -> None:
        self.post(Abort(channel_id))

    def attach_channel(self, channel: TensorChannel) -> None:
        self.post(ChannelUp(channel))

    @property
    def active_sessions(self) -> int:
        return len(self.sessions)

    # -- messages ------------------------------------------------------------------------------
    def receive(self, channel: TensorChannel) -> object:
        return SubtreeIn(channel.recv_subtree(), channel)

    def session_of(self, message: object) -> SessionState | None:
        if isinstance(message, Open):
            return message.state
        if isinstance(message, Abort):
            return self.sessions.get(message.channel_id)
        if isinstance(message, SubtreeIn):
            return self.sessions.get(message.subtree.channel_id)
        return None

    def end_session(self, state: SessionState, failure: SessionFailure) -> None:
        if not state.done:
            self._finish(state, RoundOut([], 0, 0, state.rounds, "abort", 0.0, state.speculative,
                                         error=failure.message, error_code=failure.code))

    def on_channel_lost(self, why: str) -> None:
        log.warning("running sessions continue target-only (%s)", why)
        for state in self.sessions.values():
            state.speculative, state.sent_at = False, None
            state.trees.clear()
        self.orphans.clear()  # that draft's sessions are gone with it

    def _on_open(self, message: Open) -> None:
        state = message.state
        cache = self.pool.open(state.session_id, state.num_blocks, state.request.prompt, state.prefix)
        state.session = TargetSession(cache, state.request.sampling, self.model.device, key=state.channel_id)
        self.sessions[state.channel_id] = state
        metrics.SESSIONS.set(len(self.sessions))
        if state.speculative and self.channel is None:
            state.speculative = False
        self._begin(state)
        for subtree in self.orphans.pop(state.channel_id, (0.0, []))[1]:
            self._on_subtree(SubtreeIn(subtree))

    def _begin(self, state: SessionState) -> None:
        """Copy the session's cached prefix and start its prefill, unless its source is not there yet."""
        cached = self.pool.start(state.session_id)
        if cached is None:
            return
        state.session.begin(state.request.prompt, cached)
        self.pool.bind(state.session_id, state.session.tokens)
        state.waiting, state.cached = False, cached
        if self.tp is not None:
            self.tp.open(state.channel_id, state.session_id, state.request, cached)

    def tick(self) -> None:
        """Sessions waiting for a live prefix source start once it computed their tokens (or ended)."""
        for state in [s for s in self.sessions.values() if s.waiting and not s.done]:
            self.for_session(state, self._begin, state)

    def _on_subtree(self, message: SubtreeIn) -> None:
        subtree = message.subtree
        if message.channel is not None and message.channel is not self.channel:
            return  # from a draft that is gone: its sessions are not the current draft's
        state = self.sessions.get(subtree.channel_id)
        if state is None:
            if str(subtree.channel_id) not in self.ended:
                self._keep_orphan(subtree)
            return
        if state.done:
            return
        if not subtree.tokens:  # the draft gave up on this session: continue target-only
            state.speculative = False
            state.trees.clear()
            return
        # The current draft holds this session (a session running target-only re-enters speculation
        # here: the router re-opened it on a restarted draft); the tree is fitted when it is verified.
        state.speculative = state.draft_sent = True
        state.trees.append((subtree, time.perf_counter()))

    def _keep_orphan(self, subtree: Subtree) -> None:
        now = time.monotonic()
        for channel_id in [c for c, (since, _) in self.orphans.items() if now - since > ORPHAN_TTL_S]:
            del self.orphans[channel_id]
        self.orphans.setdefault(subtree.channel_id, (now, []))[1].append(subtree)

    def _on_abort(self, message: Abort) -> None:
        state = self.sessions.get(message.channel_id)
        if state is not None and not state.done:
            self._finish(state, RoundOut([], 0, 0, state.rounds, "abort", 0.0, state.speculative))
        self.orphans.pop(message.channel_id, None)

    # -- steps ---------------------------------------------------------------------------------
    def _has_round(self, state: SessionState) -> bool:
        return not state.waiting and not state.session.prefilling and (bool(state.trees) or not state.speculative)

    def _prefilling(self, state: SessionState) -> bool:
        return not state.waiting and state.session.prefilling

    def _tree_due_s(self, state: SessionState, now: float) -> float | None:
        """Seconds until a speculating session waiting for its subtree has waited draft_patience_s
        (<= 0: it is late, and decodes a token alone in the next step); None if it waits for nothing."""
        if not self.draft_patience_s or state.done or not state.speculative or state.trees or \
                state.sent_at is None or state.waiting or state.session.prefilling:
            return None
        return state.sent_at + self.draft_patience_s - now

    def _late(self, state: SessionState, now: float) -> bool:
        due = self._tree_due_s(state, now)
        return due is not None and due <= 0

    @property
    def tick_s(self) -> float | None:
        """Wake when the first session waiting for its subtree runs out of patience."""
        now = time.perf_counter()
        dues = [d for d in (self._tree_due_s(s, now) for s in self.sessions.values()) if d is not None]
        return max(0.001, min(dues)) if dues else None

    def has_work(self) -> bool:
        now = time.perf_counter()
        return any(self._prefilling(s) or self._has_round(s) or self._late(s, now) for s in self.sessions.values())

    def step(self) -> None:
        jobs = self._gather()
        if not jobs:
            return
        if self.verify_delay_ms:
            time.sleep(random.uniform(0, self.verify_delay_ms) / 1000)
        t0 = time.perf_counter()
        try:
            with self._threads_for(jobs):
                logits = self.runner.forward([job.rows for job in jobs])
        except Exception as exc:  # nothing of this step ran: every session in it ends
            log.exception("a forward of %d sessions failed; they end", len(jobs))
            for job in jobs:
                self.end_session(job.state, describe(exc))
            return
        decided = []
        for job, out in zip(jobs, logits):
            decision = self.for_session(job.state, self._decide, job, out)
            if decision is not FAILED:
                decided.append((job, decision))
        if self.tp is not None:
            self.tp.commit([(job.state.channel_id, d) for job, d in decided])
        t1 = time.perf_counter()
        metrics.STEP_ROWS.observe(sum(job.rows.n for job in jobs))
        metrics.STEP_SESSIONS.observe(len(jobs))
        for job, decision in decided:
            commit = self._commit_prefill if job.tree is None else self._commit_round
            self.for_session(job.state, commit, job, decision, t0, t1)
        self._tell_draft_prefilled()

    def _tell_draft_prefilled(self) -> None:
        """Where the target borrows the draft's cores for prefill (borrows_cores), the draft starts
        a new session's catch-up once the target prefilled it. While the draft follows no session
        (a burst of new prompts) that waits until no prompt is left to prefill, so the two never
        prefill at once; sessions meanwhile decode alone. Once the draft follows one, prefill
        shares every step with its rounds, on --threads, and new sessions are told at once."""
        if self.channel is None or not self.borrows_cores:
            return
        sessions = self.sessions.values()
        due = [s for s in sessions if s.speculative and not s.draft_told_prefilled and not s.done and
               not s.waiting and not s.session.prefilling]
        if not due:
            return
        if not any(s.speculative and s.draft_told_prefilled and not s.done for s in sessions) and \
                any(s.waiting or self._prefilling(s) for s in sessions):
            return
        for state in due:
            state.draft_told_prefilled = True
            try:
                self.channel.send_prefilled(state.channel_id)
            except Exception as exc:
                self.channel_failed(exc)
                return

    def _draft_follows_none(self) -> bool:
        """The draft works for no live session: it paused them all (the load, or trees that do not
        pay), holds the rest until they are prefilled, or there is none. Its cores are idle until
        it looks again (or hears of a prefill: a burst's first session is held through the whole
        burst's prefill, which would otherwise share its steps' decode rows on half the cores)."""
        return not any(s.draft_follows for s in self.sessions.values())

    @contextlib.contextmanager
    def _threads_for(self, jobs: list["_Job"]) -> Iterator[None]:
        """All cores (borrow_threads) for a step the draft takes no part in; --threads otherwise.

        - Prefill chunks only (TTFT is prefill-bound): such a step never overlaps the draft's work,
          since every session the draft follows is in every step (a round or an ahead round), and
          it starts following a new one only after the prefills (_tell_draft_prefilled).
        - Any step while the draft follows no session: under load the draft pauses every session,
          and plain decoding at 8 rows is compute-bound, so its idle cores are the target's. A
          look (a paused session resumed) overlaps a step or two, until its subtree comes.
        The kernels' rows do not depend on the thread count, so neither does any token."""
        threads = torch.get_num_threads()
        wide = self.borrows_cores and (all(job.tree is None for job in jobs) or self._draft_follows_none())
        (metrics.STEPS_BORROWED if wide else metrics.STEPS_OWN).inc()
        if wide:
            torch.set_num_threads(self.borrow_threads)
        try:
            yield
        finally:
            if wide:
                torch.set_num_threads(threads)

    def _gather(self) -> list[_Job]:
        """Every ready round first (running sessions), then prefill chunks, within the row budget."""
        states = list(self.sessions.values())
        if states:
            self._turn = (self._turn + 1) % len(states)
            states = states[self._turn:] + states[:self._turn]
        budget, jobs = self.runner.max_rows, []
        for state in states:
            if state.done or not self._has_round(state):
                continue
            job = self.for_session(state, self._round_job, state, budget)
            if job is not None and job is not FAILED:
                jobs.append(job)
                budget -= job.rows.n
        now = time.perf_counter()
        if jobs or any(self._prefilling(s) or self._late(s, now) for s in states):
            # The step runs anyway (or a draft is later than draft_patience_s): a session whose
            # draft has not sent its subtree yet decodes one token in it instead of waiting. Under
            # load, or while the draft prefills a new prompt, the mesh then never falls behind the
            # target alone; the subtree, when it comes, is fitted behind that token.
            stepping = {id(job.state) for job in jobs}
            for state in states:
                if budget <= 0:
                    break
                if id(state) in stepping or state.done or state.waiting or state.session.prefilling or \
                        not state.speculative or state.trees:
                    continue
                job = self.for_session(state, self._ahead_job, state)
                if job is not FAILED:
                    jobs.append(job)
                    budget -= job.rows.n
        for state in states:
            if state.done or not self._prefilling(state) or budget <= 0:
                continue
            rows = self.for_session(state, state.session.prefill_rows, min(self.prefill_chunk, budget))
            if rows is not FAILED:
                jobs.append(_Job(state, rows))
                budget -= rows.n
        return jobs

    def _ahead_job(self, state: SessionState) -> _Job:
        tree = state.session.decode_tree()
        return _Job(state, state.session.verify_rows(tree), tree, received=time.perf_counter(), ahead=True)

    def _round_job(self, state: SessionState, budget: int) -> _Job | None:
        session = state.session
        fitted = None
        if state.trees:
            subtree, received = state.trees[0]
            fitted = session.adopt_draft_tree(Tree(subtree.tokens, subtree.parents, subtree.q), subtree.position)
            if fitted is None or len(fitted[1]) > CATCH_UP_TOKENS:
                state.trees.popleft()
                self._draft_out_of_step(state, fitted)
                fitted = None
        if fitted is not None:
            (tree, skipped), span = fitted, subtree.trace
        else:
            tree, skipped, span, received = session.decode_tree(), [], (0, 0, 0), time.perf_counter()
        rows = session.verify_rows(tree)
        if rows.n > self.runner.max_rows:
            raise InvalidRequest(f"a tree of {rows.n} nodes exceeds --step-rows ({self.runner.max_rows})")
        if rows.n > budget:  # waits for the next step (adopting a tree changes nothing until it commits)
            return None
        if fitted is not None:
            state.trees.popleft()
        return _Job(state, rows, tree, skipped, span, received)

    def _draft_out_of_step(self, state: SessionState, fitted: tuple[Tree, list[int]] | None) -> None:
        """A subtree that cannot be verified now; the session goes on alone until the next one.

        Too far behind (a draft that rejoined while the target ran alone): the draft is sent the
        next CATCH_UP_TOKENS committed tokens, as a round of its own (round 0: nothing was verified,
        so its planner learns nothing from it), and sends its next tree from there. Rooted at a
        token the session never committed: the draft holds another history, so it is told to end
        the session (the router's CloseSession finds it gone).
        """
        state.speculative, state.sent_at = False, None
        if self.channel is None:
            return
        try:
            if fitted is None:
                log.warning("session %s: the draft's tree is not rooted in the committed tokens; target-only",
                            state.session_id)
                self.channel.send_verified(state.channel_id, state.rounds, [], end=True)
            else:
                self.channel.send_verified(state.channel_id, 0, fitted[1][:CATCH_UP_TOKENS], end=False)
        except Exception as exc:
            self.channel_failed(exc)

    def _decide(self, job: _Job, logits: torch.Tensor | None) -> Decision | None:
        session = job.state.session
        if job.tree is None:
            if job.rows.logit_rows == 0:
                return None  # not the last chunk
            return session.decide(logits, Tree([job.rows.tokens[-1]], [-1]))
        return session.decide(logits, job.tree)

    def _commit_prefill(self, job: _Job, decision: Decision | None, t0: float, t1: float) -> None:
        state = job.state
        first = state.session.commit_prefill(job.rows, None, decision)
        if first is None:
            return
        # The first token comes from the prefill itself: time to first token does not wait for the draft.
        chunk, reason = clip_chunk([first], 0, state.request)
        state.produced, state.rounds = len(chunk), 1
        if state.speculative:
            state.sent_at = t1  # from now on the session waits for the draft's first subtree
        out = RoundOut(chunk, 0, 1, 1, reason, (t1 - t0) * 1000, False, cached_tokens=state.cached)
        if reason is not None:
            self._finish(state, out)
        else:
            state.emit(out)

    def _commit_round(self, job: _Job, decision: Decision, t0: float, t1: float) -> None:
        state = job.state
        result = state.session.commit_verify(job.tree, None, decision)
        # (the first subtree often comes before the prefill ends: no wait)
        wait_s = max(0.0, job.received - state.sent_at) if state.sent_at is not None and state.speculative and \
            not job.ahead else None
        chunk, reason = clip_chunk(result.tokens, state.produced, state.request)
        state.produced += len(chunk)
        state.rounds += 1
        if state.speculative and self.channel is not None and not job.ahead:
            try:  # the draft first: it is what the next round waits on
                self.channel.send_verified(state.channel_id, state.rounds, [*job.skipped, *result.tokens],
                                           end=reason is not None, skipped=len(job.skipped))
                state.sent_at = time.perf_counter()
            except Exception as exc:
                self.channel_failed(exc)
        out = RoundOut(chunk, result.accepted_draft, result.tree_size, state.rounds, reason, (t1 - t0) * 1000,
                       len(job.tree) > 1)
        metrics.record_round(result.accepted_draft, result.tree_size, len(chunk), t1 - t0, wait_s, job.ahead)
        if telemetry.trace_round() and state.trace_ctx is not None:
            self._trace_round(state, out, result.tokens[-1], job.draft_span, job.received, t0, t1)
        if reason is not None:
            self._finish(state, out, notify_draft=job.ahead)  # else the verified tokens said end
        else:
            state.emit(out)

    def _trace_round(self, state: SessionState, out: RoundOut, bonus: int, draft_span: tuple[int, int, int],
                     received: float, t0: float, t1: float) -> None:
        """One span per round, a child of the session's Generate span, linked to the draft's round span."""
        to_ns = time.time_ns() - int(time.perf_counter() * 1e9)  # perf_counter -> wall clock
        link = telemetry.link_from_ids(*draft_span)
        span = _TRACER.start_span("target.round", context=state.trace_ctx, start_time=int(received * 1e9) + to_ns,
                                  links=[link] if link else None,
                                  attributes={"specmesh.round": out.round, "specmesh.subtree_size": out.tree_size,
                                              "specmesh.accepted": out.accepted, "specmesh.bonus_token": bonus,
                                              "specmesh.verify_ms": (t1 - t0) * 1000,
                                              "specmesh.speculative": out.speculative,
                                              "specmesh.session_id": state.session_id})
        span.end(end_time=int(time.perf_counter() * 1e9) + to_ns)

    def _finish(self, state: SessionState, out: RoundOut, notify_draft: bool = True) -> None:
        state.done = True
        try:
            if notify_draft and state.speculative and self.channel is not None:
                try:
                    self.channel.send_verified(state.channel_id, state.rounds, [], end=True)
                except Exception as exc:
                    self.channel_failed(exc)
            self.orphans.pop(state.channel_id, None)
            self.ended.add(str(state.channel_id))
            if self.sessions.pop(state.channel_id, None) is not None:
                # A failed session's KV may be half-written: cache none of it.
                valid = 0 if out.error else state.session.cache.length
                out.kv_tokens = min(valid, len(state.request.prompt) + state.produced)
                if state.rounds == 0:
                    out.cached_tokens = state.cached
                self.pool.close(state.session_id, valid)
                if self.tp is not None and not state.waiting:
                    self.tp.close(state.channel_id)
            metrics.SESSIONS.set(len(self.sessions))
        finally:  # the stream always gets its last update, whatever failed above
            state.emit(out)
