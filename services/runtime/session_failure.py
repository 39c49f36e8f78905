"""The one failure policy both engines follow: whatever goes wrong in one session's work ends that
session (with a one-line error naming what happened) and frees its KV; every other session and the
engine's worker thread go on.

The engine actor (actor.py) applies it to every message that concerns a session, and the engines
call `EngineActor.for_session` around each session's part of a batched step; `end` is how that
engine ends a session (the target finishes the stream with the error, the draft gives the session
up so the target continues alone).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from .errors import SpecmeshError

log = logging.getLogger("specmesh.engine")

FAILED = object()  # what run_session_step returns when the step raised (its session is ended)


@dataclass(frozen=True)
class SessionFailure:
    """Why a session ended: the gRPC status name and a one-line message for its client."""

    code: str
    message: str


def describe(exc: BaseException) -> SessionFailure:
    """SpecmeshErrors keep their status and message; anything else (a torch RuntimeError, out of
    memory, a bug) is INTERNAL and names the exception type."""
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, SpecmeshError):
        return SessionFailure(exc.grpc_code_name, first_line or type(exc).__name__)
    return SessionFailure("INTERNAL", f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__)


def run_session_step(step: Callable[[], Any], end: Callable[[SessionFailure], None], session_id: str) -> Any:
    """Run one session's step and return its result; if it raises, end that session (and only it)
    with the failure and return FAILED."""
    try:
        return step()
    except Exception as exc:
        failure = describe(exc)
        if isinstance(exc, SpecmeshError):
            log.warning("session %s ended: %s", session_id, failure.message)
        else:  # not a user problem: keep the traceback in the log
            log.exception("session %s ended by an unexpected error", session_id)
        try:
            end(failure)
        except Exception:  # ending must not take the worker down either
            log.exception("session %s: ending it after the failure failed too", session_id)
        return FAILED
