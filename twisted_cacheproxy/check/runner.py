"""Running cases one after another, each within its time limit: a case that
waits past its limit fails with what it was waiting for, and the run goes
on with the next. Once a case has run out of time without a byte from the
target, the next ones get at most the default limit until the target says
something again, so that a target that never answers is judged in a few
minutes."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, error
from twisted.logger import Logger

from .case import DEFAULT_LIMIT, Case
from .context import Context, Session
from .probe import Transcript
from .verdicts import Failed, Skipped

log = Logger()

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass(frozen=True)
class Result:
    """How one case went, with everything it sent and received when it failed."""

    case: Case
    outcome: str
    detail: str
    seconds: float
    transcript: Transcript | None
    #: It ran out of time without a byte from the target.
    silent: bool = False


@defer.inlineCallbacks
def run_case(case: Case, session: Session, limit: float) -> Generator[Any, Any, Result]:
    """Run one case within ``limit`` seconds; never fails."""
    ctx = Context(session)
    upstream = session.upstream
    if upstream is not None:
        upstream.transcript = ctx.transcript
    outcome, detail = PASS, ""
    running = case.run(ctx)
    stalled: list[str] = []  # what it waited for when its time ran out

    def expire() -> None:
        stalled.append(ctx.stalled())
        running.cancel()

    timer = session.reactor.callLater(limit, expire)
    try:
        detail = (yield running) or ""
    except Failed as e:
        outcome, detail = FAIL, str(e)
    except Skipped as e:
        outcome, detail = SKIP, str(e)
    except defer.CancelledError:
        outcome = FAIL
        detail = f"no progress within the case's limit of {limit:g} s: waiting for {stalled[0]}"
        if limit < case.limit:
            detail += f" (limit cut from {case.limit:g} s: the target had been silent before)"
    except error.ConnectError as e:
        outcome, detail = FAIL, f"cannot connect to {session.target}: {e}"
    except Exception as e:
        log.failure("case {id} stopped on an error of the checker", id=case.id)
        outcome, detail = FAIL, f"the checker itself stopped on {type(e).__name__}: {e}"
    if timer.active():
        timer.cancel()
    ctx.close()
    if upstream is not None:
        upstream.case_over()
        try:
            yield upstream.start()  # after the server-down cases
        except error.CannotListenError as e:
            outcome = FAIL
            detail += f" (then the scripted upstream could not listen again: {e})"
    transcript = ctx.transcript
    seconds = session.reactor.seconds() - transcript.started
    silent = bool(stalled) and not transcript.heard_from_target()
    kept = transcript if outcome == FAIL else None
    return Result(case, outcome, detail, seconds, kept, silent)


@defer.inlineCallbacks
def run_cases(
    cases: Iterable[Case], session: Session, done: Callable[[Result], None]
) -> Generator[Any, Any, list[Result]]:
    """Run ``cases`` in order, telling ``done`` of each result as it comes."""
    results: list[Result] = []
    for case in cases:
        silent = bool(results) and results[-1].silent
        limit = min(case.limit, DEFAULT_LIMIT) if silent else case.limit
        result = yield run_case(case, session, limit)
        done(result)
        results.append(result)
    return results
