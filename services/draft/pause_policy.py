"""When a greedy session stops speculating for a while, and when the draft looks again.

Under load (or with a draft the target keeps rejecting) the planner sends a session's root alone:
plain decoding. A draft that still follows that session only spends memory bandwidth the target
needs, so after `PAUSE_AFTER` root-only plans in a row the session is paused: the target runs it
alone and the draft does no work for it. A pause is a bet that the reason lasts, so it ends either
when its time is up or when the load that caused it has halved, stayed so for `SETTLE_FRACTION`
of the shortest pause (a closed-loop client's next request follows the last one's end within
milliseconds: resuming on that dip would pay a catch-up for nothing) and is no plain load (the
draft judges that: below the remembered one, and not one its cost curves call plain). Then the
draft looks again: a resumed session that the planner still sends alone within `RECHECK_AFTER`
plans was paused for the right reason, and pauses again for twice as long (up to `MAX_DOUBLINGS`
times), so a steadily loaded server spends almost all its time target-only. One speculative plan
resets the backoff.

A session that opens while at least half the others are paused starts paused (`start_paused`),
and so does one that opens under a plain load: one under which a session paused lately
(`plain_under`), or one the planner's verdict calls plain (the draft asks both). A running
session (not one looking) is held the same way at its next send once the load is plain: while
the draft follows any session the target steps on its own cores only, so one session still
speculating slows every other. The policy remembers the least load that made a session pause,
for as long as the longest pause, and forgets it when a look finds speculation paying again.

Probes (the planner's forced full subtrees, for calibration) neither count towards a pause nor
reset one: they are not the planner's choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PAUSE_AFTER = 8  # root-only plans in a row after which a session pauses
RECHECK_AFTER = 3  # after a resume, root-only plans that confirm the pause
MAX_DOUBLINGS = 3  # a pause lasts at most pause_s * 2**MAX_DOUBLINGS
SETTLE_FRACTION = 0.25  # of pause_s: how long a lower load must last before it ends a pause


@dataclass
class SessionPause:
    """One session's pause state."""

    streak: int = 0  # root-only plans in a row (probes not counted)
    doublings: int = 0  # pauses confirmed in a row, without a speculative plan between
    looking: bool = False  # resumed, and no speculative plan since
    paused_at: float | None = None  # the target runs the session alone since then
    sessions_at_pause: int = 0  # the draft's sessions when it paused
    low_since: float | None = None  # the load has been low enough to end the pause since then

    @property
    def paused(self) -> bool:
        return self.paused_at is not None


@dataclass
class PausePolicy:
    """The draft's rule for pausing sessions; `pause_s` = 0 never pauses."""

    pause_s: float
    plain_load: int = field(default=0, init=False)  # the least load a session paused under lately
    plain_until: float = field(default=0.0, init=False)  # ... remembered until then

    def should_pause(self, p: SessionPause, size: int, probe: bool) -> bool:
        """Record one plan of size `size` (1 = the root alone); True when the session should pause now."""
        if not self.pause_s or probe:
            return False
        if size > 1:
            if p.looking:  # a look found speculation paying: the remembered load no longer holds
                self.plain_until = 0.0
            p.streak, p.doublings, p.looking = 0, 0, False
            return False
        p.streak += 1
        return p.streak >= (RECHECK_AFTER if p.looking else PAUSE_AFTER)

    def pause(self, p: SessionPause, now: float, sessions: int) -> None:
        if p.looking:  # the look confirmed the pause: wait longer this time
            p.doublings = min(MAX_DOUBLINGS, p.doublings + 1)
        self.plain_load = sessions if now >= self.plain_until else min(self.plain_load, sessions)
        self.plain_until = now + self.pause_s * 2 ** MAX_DOUBLINGS
        self._hold(p, now, sessions)

    def plain_under(self, sessions: int, now: float) -> bool:
        """Whether a session paused lately under a load of at most `sessions` (see the module doc)."""
        return bool(self.pause_s) and now < self.plain_until and sessions >= self.plain_load

    def start_paused(self, p: SessionPause, now: float, sessions: int) -> None:
        """A session that opens while most others are paused (or under the plain load) would only be
        caught up to pause PAUSE_AFTER rounds later: it starts paused, for the longest pause or until
        the load halves (its catch-up then comes with the look). A running session held under the
        plain load is paused the same way."""
        p.doublings = MAX_DOUBLINGS
        self._hold(p, now, sessions)

    @staticmethod
    def _hold(p: SessionPause, now: float, sessions: int) -> None:
        p.paused_at, p.sessions_at_pause, p.streak, p.looking, p.low_since = now, sessions, 0, False, None

    def duration(self, p: SessionPause) -> float:
        return self.pause_s * 2 ** p.doublings

    def resume_due(self, p: SessionPause, now: float, sessions: int, plain: bool) -> bool:
        """Time is up, or the load that caused the pause has halved and is no plain load (`plain`:
        the draft's judgement, `plain_under` included), and has been so for SETTLE_FRACTION *
        pause_s (called once per tick: it tracks that)."""
        if p.paused_at is None:
            return False
        if now - p.paused_at >= self.duration(p):
            return True
        if 2 * sessions > p.sessions_at_pause or plain:
            p.low_since = None
            return False
        if p.low_since is None:
            p.low_since = now
        return now - p.low_since >= SETTLE_FRACTION * self.pause_s

    def resume(self, p: SessionPause) -> None:
        p.paused_at, p.streak, p.looking = None, 0, True
