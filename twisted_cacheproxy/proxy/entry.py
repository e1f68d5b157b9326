"""`Entry`: one stored answer, as the proxy's memory and its shared tier
keep it, and the freshness rules a hit checks."""

from __future__ import annotations

from ..transport.wire import FOREVER


class Entry:
    """One stored answer: its bytes, when it was fetched and for how long it is fresh."""

    __slots__ = ("answer", "lifetime", "stored")

    def __init__(self, answer: bytes, stored: float, lifetime: int) -> None:
        self.answer = answer
        self.stored = stored
        self.lifetime = lifetime

    def age(self, now: float) -> float:
        """Seconds since the answer was fetched (never negative)."""
        return max(0.0, now - self.stored)

    def fresh(self, now: float, grace: float = 0.0) -> bool:
        """Whether the answer is within its freshness lifetime (plus ``grace``)."""
        return self.lifetime == FOREVER or now - self.stored < self.lifetime + grace

    def servable(self, now: float, max_age: int) -> float | None:
        """Its `age` when it is fresh and a request's ``max_age`` (`FOREVER`:
        any age) accepts it, else None: what a hit checks, in one call."""
        age = max(0.0, now - self.stored)
        if (self.lifetime == FOREVER or age < self.lifetime) and (
            max_age == FOREVER or age < max_age
        ):
            return age
        return None
