"""Several calculator servers behind one proxy (nginx's ``upstream`` block):
one `UpstreamPool` per server, a choice of server per miss, passive and
active health, and failover.

- Choice: the least outstanding requests among the healthy servers, ties
  broken round-robin, so a slow server gets less.
- Passive health: `MAX_FAILS` consecutive failures (a refused or timed-out
  connection, a request that timed out, a closed or broken answer) take a
  server out for `EJECT_FIRST` seconds, doubled on each ejection that follows
  without a success between, up to `EJECT_MAX`. When the time is up, one
  probe request is sent; a well-formed answer puts the server back, a
  failure ejects it again for twice as long.
- Active health (``interval``, off by default): a probe on every server each
  ``interval`` seconds; any well-formed answer (even a course server's 400 for
  a text request it cannot read) proves it alive and puts an ejected server
  back, a failure counts as one.
- Failover: a miss whose server cannot be reached, closed the connection or
  answered out of step is tried on the next healthy server at once; once every
  server has been tried, the round starts again after a backoff
  (``retry_delay``, doubling), for ``rounds`` rounds. A request that a server
  accepted and then did not answer in time is not sent elsewhere unless
  ``retry_timeouts`` (each try then has half the timeout). When every server
  is out, each miss still tries them all, so a server that comes back is
  used again at once.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..transport import wire
from .failures import UpstreamError
from .interfaces import Answer, IFetcher, IUpstreamServer
from .upstream import Tally, UpstreamPool

log = Logger()

#: Consecutive failures that take a server out.
MAX_FAILS = 3
#: Seconds out after the first ejection; doubled on each repeat, capped.
EJECT_FIRST = 1.0
EJECT_MAX = 30.0
#: Failure kinds after which a miss may go to another server at once.
_FAILOVER = frozenset({"unreachable", "closed", "invalid", "overloaded"})


def probe_frame(now: int) -> bytes:
    """The small request of a health probe: ``1`` in the text encoding, not
    cacheable. Our servers answer 200; a course server, which reads only
    pickles, answers 400: both are well-formed answers, so both prove it alive."""
    return wire.encode(now, wire.make_flags(request=True), 0, b"1")


@implementer(IUpstreamServer)
class Server:
    """One server of a `Balancer`: its pool and its health."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.address = pool.address
        #: How error messages name it.
        self.name = pool.name
        #: Consecutive failures since the last success.
        self.fails = 0
        #: Ejections in a row without a success between.
        self.ejections = 0
        #: Clock time until which it is out (0: in).
        self.out_until = 0.0
        self.probing = False
        self.timer: IDelayedCall | None = None
        #: Times taken out.
        self.ejected = 0

    @property
    def healthy(self) -> bool:
        return not self.out_until

    @property
    def outstanding(self) -> int:
        return self.pool.outstanding

    @property
    def tally(self) -> Tally:
        """Its answers and failures, probes included: its pool counts what
        it sees, and the balancer adds the timeouts it gives up on."""
        return self.pool.tally


class _Job:
    """One miss on its way through the servers."""

    __slots__ = (
        "current",
        "d",
        "errors",
        "frame",
        "kind",
        "pending",
        "retry",
        "round",
        "timer",
        "tried",
    )

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self.kind = "unreachable"  # of the last failure
        self.round = 1
        self.tried: list[Server] = []  # in this round
        self.errors: dict[str, str] = {}  # server name: its last error
        self.current: Server | None = None  # the server it waits for
        self.pending: defer.Deferred | None = None  # that server's fetch
        self.retry: IDelayedCall | None = None  # the next round's start
        self.timer: IDelayedCall | None = None
        self.d: defer.Deferred = defer.Deferred(self.cancel)

    def cancel(self, d: defer.Deferred | None = None) -> None:
        """Stop the timers and the fetch in flight (also ``d``'s canceller)."""
        for call in (self.timer, self.retry):
            if call is not None and call.active():
                call.cancel()
        pending = self.pending
        self.timer = self.retry = self.pending = None
        if pending is not None and not pending.called:
            pending.cancel()


@implementer(IFetcher)
class Balancer:
    """Several servers behind one `fetch`/`close`, as a `UpstreamPool` offers
    for one; see the module docstring. Each server's pool should make one
    connection attempt per fetch (``retries=1``): the balancer does the
    retrying, across servers first."""

    backoff = 2.0

    def __init__(
        self,
        pools: list[UpstreamPool],
        clock: IReactorTime,
        *,
        rounds: int = 5,
        retry_delay: float = 0.5,
        timeout: float = 10.0,
        retry_timeouts: bool = False,
        interval: float = 0.0,
        max_fails: int = MAX_FAILS,
        eject_first: float = EJECT_FIRST,
        eject_max: float = EJECT_MAX,
    ) -> None:
        self.servers = [Server(p) for p in pools]
        self.clock = clock
        self.rounds = max(1, rounds)
        self.retry_delay = retry_delay
        self.timeout = timeout
        self.retry_timeouts = retry_timeouts
        self.max_fails = max_fails
        self.eject_first = eject_first
        self.eject_max = eject_max
        self._next = 0  # round-robin start for ties
        self._active: IDelayedCall | None = None
        self.interval = interval
        if interval > 0:
            self._active = clock.callLater(interval, self._checkAll)

    # --- the figures a pool offers, over every server (for status pages) --------

    @property
    def idle(self) -> int:
        """Open connections waiting for a request, over every server."""
        return sum(s.pool.idle for s in self.servers)

    @property
    def connections(self) -> int:
        """Connections open or being opened, over every server."""
        return sum(s.pool.connections for s in self.servers)

    @property
    def outstanding(self) -> int:
        """Requests sent and not yet answered, over every server."""
        return sum(s.outstanding for s in self.servers)

    @property
    def framed(self) -> bool:
        """Whether every server's last answer carried ``L``."""
        return all(s.pool.framed for s in self.servers)

    @property
    def pipelining(self) -> bool:
        """Whether requests may be pipelined to any server."""
        return any(s.pool.pipelining for s in self.servers)

    # --- choosing -------------------------------------------------------------

    def choose(self, exclude: list[Server]) -> Server | None:
        """The healthy server with the least outstanding requests, not in
        ``exclude``, ties taken in turn; when none is healthy, any not tried."""
        candidates = [s for s in self.servers if s.healthy and s not in exclude]
        if not candidates and not any(s.healthy for s in self.servers):
            candidates = [s for s in self.servers if s not in exclude]
        if not candidates:
            return None
        least = min(s.outstanding for s in candidates)
        count = len(self.servers)
        for step in range(count):
            server = self.servers[(self._next + step) % count]
            if server in candidates and server.outstanding == least:
                self._next = (self._next + step + 1) % count
                return server
        return None  # not reached

    # --- fetching -------------------------------------------------------------

    def fetch(self, frame: bytes) -> defer.Deferred[Answer]:
        """Send one request frame to a server; fires ``(header, data, sent)``
        or fails with `UpstreamError` naming every server tried."""
        job = _Job(frame)
        job.timer = self.clock.callLater(self.timeout, self._timedOut, job)
        self._try(job)
        return job.d

    def _try(self, job: _Job) -> None:
        server = self.choose(job.tried)
        if server is None:
            if job.round >= self.rounds:
                self._give_up(job)
                return
            delay = self.retry_delay * self.backoff ** (job.round - 1)
            job.round += 1
            job.tried = []
            job.retry = self.clock.callLater(delay, self._try, job)
            return
        job.retry = None
        job.tried.append(server)
        job.current = server
        d = server.pool.fetch(job.frame)
        if self.retry_timeouts and len(self.servers) > 1:
            job.retry = self.clock.callLater(self.timeout / 2, self._tryTimedOut, job, server)
        job.pending = d
        d.addCallbacks(
            self._answered, self._failed, callbackArgs=(job, server), errbackArgs=(job, server)
        )

    def _tryTimedOut(self, job: _Job, server: Server) -> None:
        """With ``retry_timeouts``, a server has half the timeout to answer."""
        job.retry = None
        pending, job.pending, job.current = job.pending, None, None
        if pending is not None:
            pending.cancel()
        half = self.timeout / 2
        self._timedOutOn(job, server, f"{server.name} did not answer within {half:g} s")
        self._try(job)

    def _answered(self, result: tuple, job: _Job, server: Server) -> None:
        job.pending = job.current = None
        self._stopTry(job)
        self.succeeded(server)
        timer, job.timer = job.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if not job.d.called:
            job.d.callback(result)

    def _failed(self, reason: Failure, job: _Job, server: Server) -> None:
        if reason.check(defer.CancelledError):
            return
        job.pending = job.current = None
        self._stopTry(job)
        e = reason.value
        kind = e.kind if isinstance(e, UpstreamError) else "invalid"
        job.kind = kind
        job.errors[server.name] = str(e)
        if kind != "overloaded":
            self.failed(server, kind)
        if kind in _FAILOVER or (kind == "timeout" and self.retry_timeouts):
            self._try(job)
        else:
            self._give_up(job)

    @staticmethod
    def _stopTry(job: _Job) -> None:
        retry, job.retry = job.retry, None
        if retry is not None and retry.active():
            retry.cancel()

    def _timedOut(self, job: _Job) -> None:
        job.timer = None
        server = job.current
        job.cancel()
        if server is not None:
            self._timedOutOn(job, server, f"{server.name} did not answer")
        self._give_up(job, f"no answer within {self.timeout:g} s", "timeout")

    def _timedOutOn(self, job: _Job, server: Server, message: str) -> None:
        """The balancer gave up waiting for ``server``: a timeout of its own,
        which its pool (whose request was cancelled) never saw."""
        job.errors[server.name] = message
        server.tally.failed(self.clock.seconds(), UpstreamError(message, "timeout"))
        self.failed(server, "timeout")

    def _give_up(self, job: _Job, why: str = "", kind: str = "") -> None:
        """Fail the miss with every server's last error; its kind is
        ``kind`` or else that of the last failure."""
        job.cancel()
        if job.d.called:
            return
        tried = "; ".join(job.errors.values()) or "no server tried"
        head = why or "no server could answer"
        job.d.errback(UpstreamError(f"{head}: {tried}", kind or job.kind))

    # --- health ---------------------------------------------------------------

    def succeeded(self, server: Server) -> None:
        """A well-formed answer: the server is in, its counts start again."""
        server.fails = 0
        server.ejections = 0
        if not server.healthy:
            self._putBack(server)

    def failed(self, server: Server, kind: str) -> None:
        """One more failure; `max_fails` in a row take the server out."""
        server.fails += 1
        if server.healthy and server.fails >= self.max_fails:
            self._eject(server, f"{server.fails} failures in a row ({kind})")

    def _eject(self, server: Server, why: str) -> None:
        wait = min(self.eject_max, self.eject_first * self.backoff**server.ejections)
        server.ejections += 1
        server.ejected += 1
        server.out_until = self.clock.seconds() + wait
        log.warn("{server} taken out for {wait:g} s: {why}", server=server.name, wait=wait, why=why)
        self._stopTimer(server)
        server.timer = self.clock.callLater(wait, self._probe, server)

    def _putBack(self, server: Server) -> None:
        self._stopTimer(server)
        server.out_until = 0.0
        server.fails = 0
        log.info("{server} is back", server=server.name)

    def _probe(self, server: Server) -> None:
        """Send one small request; its answer decides."""
        server.timer = None
        if server.probing:
            return
        server.probing = True
        d = server.pool.fetch(probe_frame(int(self.clock.seconds())))
        d.addCallbacks(
            self._probed, self._probeFailed, callbackArgs=(server,), errbackArgs=(server,)
        )

    def _probed(self, result: tuple, server: Server) -> None:
        server.probing = False
        if not server.healthy:
            self._putBack(server)  # its ejections keep doubling until real traffic succeeds
        server.fails = 0

    def _probeFailed(self, reason: Failure, server: Server) -> None:
        server.probing = False
        if server.healthy:
            self.failed(server, getattr(reason.value, "kind", "invalid"))
        else:
            self._eject(server, f"probe failed: {reason.value}")

    def _checkAll(self) -> None:
        self._active = self.clock.callLater(self.interval, self._checkAll)
        for server in self.servers:
            self._probe(server)

    def _stopTimer(self, server: Server) -> None:
        timer, server.timer = server.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def close(self) -> None:
        """Stop the probes and close every idle connection (on shutdown)."""
        if self._active is not None and self._active.active():
            self._active.cancel()
        self._active = None
        for server in self.servers:
            self._stopTimer(server)
            server.pool.close()


__all__ = ["Balancer", "Server", "probe_frame"]
