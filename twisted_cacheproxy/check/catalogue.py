"""The catalogue: every case in the order they run, grouped, and the
selection a command line asks for."""

from __future__ import annotations

from types import ModuleType

from .case import Case
from .cases import cache, connection, errors, ext, framing, header, payload

#: The groups, in the order they run and are reported.
MODULES: tuple[ModuleType, ...] = (header, framing, connection, payload, errors, cache, ext)
GROUPS = tuple(m.__name__.rpartition(".")[2] for m in MODULES)

#: Every case, in order.
CATALOGUE: tuple[Case, ...] = tuple(
    value for module in MODULES for value in vars(module).values() if isinstance(value, Case)
)


def select(kind: str, only: list[str] | None = None) -> list[Case]:
    """The cases that apply to a target of ``kind``, in catalogue order; with
    ``only``, those whose ID or group is listed (ValueError for a name that
    is neither)."""
    cases = [c for c in CATALOGUE if kind in c.kinds]
    if not only:
        return cases
    known = {c.id for c in CATALOGUE} | set(GROUPS)
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ValueError(f"no case or group named {', '.join(unknown)} (see --list)")
    return [c for c in cases if c.id in only or c.group in only]


def worst_case_seconds(cases: list[Case]) -> float:
    """How long a run of ``cases`` can take against a target that never
    answers: every case runs out its time limit."""
    return sum(c.limit for c in cases)
