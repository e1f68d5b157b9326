"""The supervisor of ``--workers`` without processes: how a worker's output
is logged again, a worker that never served stops the parent, and a
draining worker keeps its factory started until its connections are done."""

from __future__ import annotations

import json
import socket

import pytest
from twisted.internet import error, task
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from twisted_cacheproxy.application import parent as workers
from twisted_cacheproxy.application.worker import AdoptedListening
from twisted_cacheproxy.calculator.server import CalculatorServerFactory

pytestmark = pytest.mark.usefixtures("proxy_log")


class StoppableClock(task.Clock):
    stopped = False

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def clock():
    return StoppableClock()


def parent(count: int = 2, reactor=None) -> workers.WorkersService:
    return workers.WorkersService(reactor, "127.0.0.1", 0, 5, count, ["cacheproxy", "{}"])


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


class FakePort:
    """Stops its factory as a listening port does when it stops listening."""

    def __init__(self, factory) -> None:
        self.factory = factory

    def stopListening(self) -> None:
        self.factory.doStop()


def test_a_draining_worker_keeps_its_factory_started_until_it_stops():
    factory = CalculatorServerFactory(clock=task.Clock())
    factory.doStart()
    listening = AdoptedListening(None, socket.AF_INET, factory, "cacheserver")
    listening.port = FakePort(factory)  # as startService leaves it
    listening.startService = lambda: None
    listening.running = 1
    listening.drain()
    assert listening.port is None
    assert factory.numPorts == 1  # still started: its pool and shared tier work on
    listening.stopService()
    assert factory.numPorts == 0
