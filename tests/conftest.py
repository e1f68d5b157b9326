"""Shared fixtures: the protocol vectors, the course-style `calculator`
stand-ins, the log watcher, and the processes and servers the integration
tests start (twistd, memcached, misbehaving stand-in servers); and the
hypothesis profile, loaded before any test module is read."""

from __future__ import annotations

import sys

import pytest
from helpers import (
    PROFILES,
    VECTORS,
    hypothesis_profile,
    make_api_module,
    make_course_module,
    require_tool,
)
from hypothesis import settings
from processes import Memcached, Twistd
from standins import StandIn

# Each on top of hypothesis's own profile of the kind: "ci" keeps its
# derandomized, deadline-free runs, "dev" the default's.
settings.register_profile("ci", settings.get_profile("ci"), max_examples=PROFILES["ci"])
settings.register_profile("dev", settings.get_profile("default"), max_examples=PROFILES["dev"])
settings.load_profile(hypothesis_profile())


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what collection imported out of the collector's way, so that the
    full collection `proxy_log` runs after each test looks only at what the
    test made (a tenth of the time)."""
    import gc

    gc.collect()
    gc.freeze()


@pytest.fixture(params=VECTORS, ids=lambda v: v["text"])
def vector(request):
    """One of the six standard expressions with its exact result and steps."""
    return request.param


@pytest.fixture
def course(monkeypatch):
    """The course-style ``calculator`` module, in ``sys.modules`` for this test."""
    module = make_course_module()
    monkeypatch.setitem(sys.modules, "calculator", module)
    return module


@pytest.fixture
def api(monkeypatch):
    """The course-style ``api`` module, in ``sys.modules`` for this test."""
    module = make_api_module()
    monkeypatch.setitem(sys.modules, "api", module)
    return module


@pytest.fixture
def proxy_log():
    """Every event logged during the test (a list); the test fails at teardown
    if any of them carries a failure or is at error or critical level, which
    includes unhandled errors in garbage-collected Deferreds."""
    import gc

    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(events.append)
    bad = [
        e
        for e in events
        if "log_failure" in e or e.get("log_level") in (LogLevel.error, LogLevel.critical)
    ]
    details = [
        formatEvent(e) + ("\n" + e["log_failure"].getTraceback() if "log_failure" in e else "")
        for e in bad
    ]
    assert not bad, "errors were logged:\n" + "\n".join(details)


@pytest.fixture
def twistd(tmp_path):
    """Starts ``twistd -n`` processes of the installed plugins:
    ``twistd("cacheserver", "--port", "N", port=N)``; every one is stopped
    when the test ends."""
    started: list[Twistd] = []

    def start(*args: str, port: int) -> Twistd:
        p = Twistd(list(args), port, tmp_path / f"twistd-{len(started)}.log", tmp_path)
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def memcached():
    """Makes memcached processes; every one is stopped when the test ends."""
    binary = require_tool("memcached", "memcached", "the shared cache tests")
    made: list[Memcached] = []

    def make(port: int | None = None, start: bool = True) -> Memcached:
        m = Memcached(binary, port)
        made.append(m)
        if start:
            m.start()
        return m

    yield make
    for m in made:
        m.stop()


@pytest.fixture
def stand_in():
    """Makes misbehaving stand-in servers (`StandIn`); every one is closed
    when the test ends."""
    made: list[StandIn] = []

    def make(**options) -> StandIn:
        made.append(StandIn(**options))
        return made[-1]

    yield make
    for s in made:
        s.close()
