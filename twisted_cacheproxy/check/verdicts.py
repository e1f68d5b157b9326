"""How a case says that the target broke a rule (`Failed`, with what it
had done first: `situation`) or that it cannot judge it (`Skipped`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Failed(Exception):  # noqa: N818 (a verdict on the target, not an error)
    """The target broke the rule the case checks; the message tells the
    student what was expected and what came instead."""


@contextlib.contextmanager
def situation(what: str) -> Iterator[None]:
    """A `Failed` raised within says ``what`` the case had done first."""
    try:
        yield
    except Failed as e:
        raise Failed(f"{what}: {e}") from None


class Skipped(Exception):  # noqa: N818 (a verdict, not an error)
    """The case cannot judge this target (the message says why)."""
