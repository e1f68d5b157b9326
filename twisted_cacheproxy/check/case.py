"""The vocabulary of the catalogue: a `Case`, its levels and the kinds of
target it applies to (how a case says it failed or does not apply is in
`verdicts`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

if TYPE_CHECKING:
    from .context import Context

#: What PROTOCOL.md sections 1-5 require: a failure makes the exit status 1.
MUST = "MUST"
#: What a good implementation does although the protocol does not demand it.
SHOULD = "SHOULD"
#: The extension word of PROTOCOL.md section 6, which the course programs ignore.
EXT = "EXT"
LEVELS = (MUST, SHOULD, EXT)

SERVER = "server"
PROXY = "proxy"
BOTH = frozenset({SERVER, PROXY})

#: Seconds a case may take unless it says otherwise (an answer on a
#: healthy target takes milliseconds; a busy machine gets ample room).
DEFAULT_LIMIT = 3.0


Run = Callable[["Context"], Generator[defer.Deferred[Any], Any, "str | None"]]


@dataclass(frozen=True)
class Case:
    """One check: a stable ID (``group.name``), what it checks in a line,
    the PROTOCOL.md section it comes from, its level, the kinds of target it
    applies to, the seconds it may take in all, and the hint a failure
    shows (what the protocol asks, and the usual mistake)."""

    id: str
    title: str
    section: str
    level: str
    kinds: frozenset[str]
    limit: float
    hint: str
    run: Callable[[Context], defer.Deferred[str | None]]

    @property
    def group(self) -> str:
        return self.id.partition(".")[0]


def case(
    id: str,
    title: str,
    *,
    section: str,
    level: str = MUST,
    kinds: frozenset[str] = BOTH,
    limit: float = DEFAULT_LIMIT,
) -> Callable[[Run], Case]:
    """Declare a case: the decorated generator (``inlineCallbacks`` style)
    runs it against a `Context`; it returns an optional note on success and
    raises `verdicts.Failed` or `verdicts.Skipped` otherwise. Its docstring is the hint."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}")

    def declare(run: Run) -> Case:
        hint = " ".join((inspect.getdoc(run) or "").split())
        return Case(id, title, section, level, kinds, limit, hint, defer.inlineCallbacks(run))

    return declare
