"""The supervisor of ``--workers`` without processes: how a worker's output
is logged again, a worker that never served stops the parent, one that
served is started again, and SIGHUP's replacement round (the new worker
accepts before the old one is told to stop; a replacement that never
accepts leaves the old one serving)."""

from __future__ import annotations

import itertools
import json

import pytest
from twisted.internet import error, task
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from twisted_cacheproxy.application import parent as workers

pytestmark = pytest.mark.usefixtures("proxy_log")


class StoppableClock(task.Clock):
    stopped = False

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def clock():
    return StoppableClock()


def parent(count: int = 2, reactor=None) -> workers.WorkersService:
    return workers.WorkersService(reactor, [], count, ["cacheproxy", "{}"])


def worker(service: workers.WorkersService, number: int = 1) -> workers._Worker:
    w = workers._Worker(service, number, 0.0)
    w.pid = 4242
    service.workers[number] = w
    return w


def event(level: str, namespace: str | None, text: str) -> bytes:
    return json.dumps({"level": level, "namespace": namespace, "text": text}).encode() + b"\n"


def test_a_workers_events_keep_their_level_and_namespace(proxy_log):
    w = worker(parent())
    w.childDataReceived(1, event("warn", "cacheproxy.stats", "memcached lost")[:10])
    assert not proxy_log  # half a line: nothing yet
    w.childDataReceived(1, event("warn", "cacheproxy.stats", "memcached lost")[10:])
    w.childDataReceived(2, b"a library's own line\n")
    w.childDataReceived(1, b"not json\n")
    w.childDataReceived(1, event("info", "log_legacy", "(TCP Port 9999 Closed)"))
    logged = [(e["log_level"], e["log_namespace"], e["line"]) for e in proxy_log if "line" in e]
    assert logged == [
        (LogLevel.warn, "cacheproxy.stats", "memcached lost"),
        (LogLevel.warn, "cacheproxy", "a library's own line"),
        (LogLevel.info, "cacheproxy", "not json"),
        (LogLevel.info, "-", "(TCP Port 9999 Closed)"),
    ]
    assert proxy_log[0]["log_format"] == "worker {number} (pid {pid}): {line}"


def test_a_worker_that_never_served_stops_the_parent(clock, proxy_log):
    service = parent(reactor=clock)
    w = worker(service)
    service.ended(w, Failure(error.ProcessTerminated(exitCode=1)))
    assert clock.stopped
    assert not clock.getDelayedCalls()  # not started again
    (line,) = [e for e in proxy_log if e.get("log_level") == LogLevel.critical]
    assert "before it could serve; stopping" in line["log_format"]
    proxy_log.remove(line)  # expected: the fixture fails a test on any other


def test_a_worker_that_served_is_started_again(clock, proxy_log):
    service = parent(reactor=clock)
    w = worker(service)
    w.childDataReceived(1, event("info", None, workers.READY))
    service.ended(w, Failure(error.ProcessTerminated(exitCode=1)))
    assert not clock.stopped
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == workers.RESTART_FIRST  # a quick exit: after a wait


class Process:
    """What `reactor.spawnProcess` gives the parent, recording the signals sent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        pass

    def closeStdin(self) -> None:
        pass

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class Spawning(StoppableClock):
    """A clock that also spawns (pretend) processes, numbered from 100."""

    def __init__(self) -> None:
        super().__init__()
        self.pids = itertools.count(100)
        self.spawned: list[workers._Worker] = []

    def spawnProcess(self, worker, executable, argv, env, childFDs) -> None:
        worker.makeConnection(Process(next(self.pids)))
        self.spawned.append(worker)


def ready(w: workers._Worker) -> None:
    w.childDataReceived(1, event("info", None, workers.READY))


def exited(w: workers._Worker, code: int = 0) -> None:
    w.processEnded(Failure(error.ProcessTerminated(exitCode=code)))


def replacing():
    """Two workers serving, and SIGHUP's round started: the clock, the
    parent, the first workers and the round's Deferred."""
    clock = Spawning()
    service = parent(reactor=clock)
    first = [service._spawn(1), service._spawn(2)]
    for w in first:
        ready(w)
    return clock, service, first, service.replace()


def test_sighup_replaces_each_worker_once_its_replacement_accepts(proxy_log):
    clock, service, first, done = replacing()
    (new1,) = clock.spawned[2:]
    assert (new1.number, new1.replacing) == (1, True)
    assert first[0].transport.signals == []  # not before its replacement accepts
    ready(new1)
    assert first[0].transport.signals == ["TERM"]
    assert len(clock.spawned) == 3  # one at a time: worker 2 waits for worker 1 to be gone
    exited(first[0])
    (new2,) = clock.spawned[3:]
    ready(new2)
    assert first[1].transport.signals == ["TERM"]
    exited(first[1])
    assert done.called
    assert [w.pid for w in service.workers.values()] == [102, 103]
    assert not service.retiring and not clock.getDelayedCalls()  # none restarted, none killed
    assert "every worker replaced" in [e["log_format"] for e in proxy_log]


def test_a_replacement_that_never_accepts_leaves_the_old_worker_serving(proxy_log):
    clock, service, first, done = replacing()
    exited(clock.spawned[2], code=1)
    assert done.called and len(clock.spawned) == 3  # the round is over
    assert service.workers == {1: first[0], 2: first[1]}
    assert first[0].transport.signals == [] and not clock.getDelayedCalls()
    (line,) = [e for e in proxy_log if e.get("log_level") == LogLevel.error]
    assert "replacement (pid {pid}) {how} before it could serve" in line["log_format"]
    proxy_log.remove(line)  # expected: the fixture fails a test on any other
