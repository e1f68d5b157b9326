"""Helpers shared by the tests (not fixtures): the vectors, Deferred
inspection, the course programs' ``calculator``/``api`` modules (written
independently of the package's own stand-ins in codec/legacy.py), fakes of
the proxy's far ends, frame builders, and a reader of ``/metrics``."""

from __future__ import annotations

import builtins
import copyreg
import enum
import io
import json
import math
import operator
import os
import pathlib
import pickle
import random
import shutil
import types

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from twisted_cacheproxy.application import options as opts
from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator import expression as ex
from twisted_cacheproxy.operations import site
from twisted_cacheproxy.proxy.upstream import IConnector
from twisted_cacheproxy.transport import wire

HERE = pathlib.Path(__file__).parent
#: The repository's top folder.
ROOT = HERE.resolve().parent
#: The six standard expressions (a copy of shared/protocol-vectors.json).
VECTORS = json.loads((HERE / "data" / "protocol-vectors.json").read_text())["vectors"]


def vector_value(vector):
    """The exact result of a vector as a Python number of the right type."""
    kind = {"int": int, "float": float}[vector["result_type"]]
    value = kind(vector["result_repr"])
    assert repr(value) == vector["result_repr"]
    return value


# --- hypothesis profiles ------------------------------------------------------

#: The hypothesis profiles conftest.py registers, by their ``max_examples``:
#: "ci" keeps hypothesis's default, "dev" runs a fifth of it so that local
#: unit runs stay quick. ``HYPOTHESIS_PROFILE`` chooses; by default "ci" in
#: CI (``CI=true``), "dev" elsewhere.
PROFILES = {"ci": 100, "dev": 20}


def hypothesis_profile() -> str:
    """The profile to load: ``HYPOTHESIS_PROFILE``, else "ci" in CI, else "dev"."""
    return os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if in_ci() else "dev")


def examples(full: int) -> int:
    """A property test's example count: ``full`` under the "ci" profile, and
    as much less under another as its ``max_examples`` is below ci's."""
    return max(1, full * settings().max_examples // PROFILES["ci"])


# --- external tools ----------------------------------------------------------


def in_ci() -> bool:
    """Whether the tests run in CI (``CI`` set), where a missing tool is a failure."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require_tool(name: str, install: str, tests: str) -> str:
    """The path of the program ``name``; skips the test when it is missing, or
    fails it in CI. ``install`` names the Debian packages that bring it,
    ``tests`` the tests that need it (for the messages)."""
    found = shutil.which(name)
    if found:
        return found
    why = f"{name} is not installed (Debian/Ubuntu: apt-get install {install})"
    if in_ci():
        pytest.fail(f"{why}; CI must run {tests}")
    pytest.skip(why)


# --- Deferred helpers -------------------------------------------------------


def success_of(d):
    """The result a Deferred has already fired with (fails if it has not)."""
    box = []
    d.addBoth(box.append)
    assert len(box) == 1, "the Deferred has not fired"
    assert not isinstance(box[0], Failure), box[0].getTraceback()
    return box[0]


def failure_of(d, *types_):
    """The Failure a Deferred has already failed with; handled here."""
    box = []
    d.addBoth(box.append)
    assert len(box) == 1, "the Deferred has not fired"
    assert isinstance(box[0], Failure), f"succeeded with {box[0]!r}"
    if types_:
        assert box[0].check(*types_), box[0].getTraceback()
    return box[0]


# --- the course's `calculator` module, written independently of codec/legacy.py -


def _course_class(module, name, fields):
    def init(self, *values):
        assert len(values) == len(fields)
        for field, value in zip(fields, values, strict=True):
            setattr(self, field, value)

    return type(
        name,
        (),
        {"__init__": init, "__module__": module, "__qualname__": name, "fields": fields},
    )


def course_pickle(obj, protocol: int = 4) -> bytes:
    """``pickle.dumps`` as it behaves in the course client's process.

    Importing ``twisted.persisted.styles`` (``twisted.application.service``
    does) registers a process-wide copyreg reducer that pickles every bound
    method as ``twisted.persisted.styles.unpickleMethod``; the course client
    has no Twisted, so a bound ``Random.uniform`` pickles as
    ``getattr(Random, 'uniform')``. This pickler ignores that registration.
    """
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol)
    table = dict(copyreg.dispatch_table)
    table.pop(types.MethodType, None)
    pickler.dispatch_table = table
    pickler.dump(obj)
    return buf.getvalue()


def make_course_module(seed: int = 1234) -> types.ModuleType:
    """A module named ``calculator`` holding classes shaped like the course
    client's, its shared operator and function objects, and helpers that turn
    one of our model trees into the course client's object graph."""
    m = types.ModuleType("calculator", "course-style stand-ins (tests only)")
    m.Constant = _course_class("calculator", "Constant", ("value",))
    m.NamedConstant = _course_class("calculator", "NamedConstant", ("name", "value"))
    m.BinaryExpr = _course_class(
        "calculator", "BinaryExpr", ("left_operand", "operator", "right_operand")
    )
    m.BinaryOperator = _course_class(
        "calculator", "BinaryOperator", ("symbol", "function", "associativity")
    )
    m.UnaryExpr = _course_class("calculator", "UnaryExpr", ("operator", "operand"))
    m.UnaryOperator = _course_class("calculator", "UnaryOperator", ("symbol", "function"))
    m.FunctionCallExpr = _course_class("calculator", "FunctionCallExpr", ("function", "args"))
    m.Function = _course_class("calculator", "Function", ("name", "function"))
    m.Associativity = enum.Enum(
        "Associativity", [("LEFT", 0), ("RIGHT", 1)], module="calculator", qualname="Associativity"
    )
    left, right = m.Associativity.LEFT, m.Associativity.RIGHT
    # One operator object per symbol, shared by every node, as the course client does.
    m.BINARY = {
        "+": m.BinaryOperator("+", operator.add, left),
        "-": m.BinaryOperator("-", operator.sub, left),
        "*": m.BinaryOperator("*", operator.mul, left),
        "/": m.BinaryOperator("/", operator.truediv, left),
        "%": m.BinaryOperator("%", operator.mod, left),
        "**": m.BinaryOperator("**", operator.pow, right),
    }
    m.UNARY = {
        "-": m.UnaryOperator("-", operator.neg),
        "+": m.UnaryOperator("+", operator.pos),
    }
    m.FUNCTIONS = {
        "sin": m.Function("sin", math.sin),
        "cos": m.Function("cos", math.cos),
        "tan": m.Function("tan", math.tan),
        "sqrt": m.Function("sqrt", math.sqrt),
        "log": m.Function("log", math.log),
        "max": m.Function("max", builtins.max),
        "min": m.Function("min", builtins.min),
        "pow": m.Function("pow", builtins.pow),
        "rand": m.Function("rand", random.Random(seed).uniform),
    }

    def build(node):
        """Our model tree as the course client's objects."""
        if isinstance(node, ex.Number):
            return m.Constant(node.value)
        if isinstance(node, ex.Constant):
            return m.NamedConstant(node.name, ex.CONSTANTS[node.name])
        if isinstance(node, ex.Binary):
            return m.BinaryExpr(build(node.left), m.BINARY[node.op], build(node.right))
        if isinstance(node, ex.Unary):
            return m.UnaryExpr(m.UNARY[node.op], build(node.operand))
        return m.FunctionCallExpr(m.FUNCTIONS[node.name], [build(a) for a in node.args])

    def dumps(node, protocol=4):
        """The course client's request data for ``node``."""
        return course_pickle(build(node), protocol)

    m.build = build
    m.dumps = dumps
    return m


def make_api_module() -> types.ModuleType:
    """The course server's ``api`` module: its three exception classes."""
    m = types.ModuleType("api", "course-style error classes (tests only)")
    m.CalculatorError = type(
        "CalculatorError", (Exception,), {"__module__": "api", "__qualname__": "CalculatorError"}
    )
    for name in ("CalculatorClientError", "CalculatorServerError"):
        setattr(
            m,
            name,
            type(name, (m.CalculatorError,), {"__module__": "api", "__qualname__": name}),
        )
    return m


def untagged(stream: bytes, keep: int = ~wire.TAG_MASK) -> bytes:
    """``stream``'s whole messages with the tag bits (or every extension bit
    but ``keep``) zeroed."""
    out, offset = [], 0
    while len(stream) - offset >= 12:
        length = wire.decode_header(stream, offset).length
        if length < 12:
            break
        frame = stream[offset : offset + length]
        ext = int.from_bytes(frame[10:12], "big") & keep
        out.append(frame[:10] + ext.to_bytes(2, "big") + frame[12:])
        offset += length
    return b"".join(out) + stream[offset:]


def headers(stream: bytes) -> list[wire.Header]:
    """The headers of ``stream``'s whole messages."""
    out, offset = [], 0
    while len(stream) - offset >= 12:
        header = wire.decode_header(stream, offset)
        if header.length < 12 or len(stream) - offset < header.length:
            break
        out.append(header)
        offset += header.length
    return out


class Peer:
    """Our end of one connection a protocol under test has made (for the
    proxy, the server side of an upstream connection). It answers the way our
    server does: ``L`` set and each request's tag echoed, in request order,
    unless told to answer as a course server (``framed=False``)."""

    def __init__(self, protocol, transport, framed: bool = True) -> None:
        self.protocol = protocol
        self.transport = transport
        self.framed = framed
        self.tags: list[int] = []  # of the requests not answered yet
        self.seen: list[int] = []  # of every request, in order
        self._read = 0

    def _scan(self) -> None:
        """Note the tags of the whole requests written since the last look."""
        raw = self.transport.value()
        while len(raw) - self._read >= 12:
            header = wire.decode_header(raw, self._read)
            if len(raw) - self._read < header.length:
                break
            self.tags.append(header.tag)
            self.seen.append(header.tag)
            self._read += header.length

    def take(self) -> bytes:
        """Everything the protocol wrote to us since the last take, with the
        tags of its requests zeroed (they are in `seen`)."""
        self._scan()
        value = self.transport.value()
        self.transport.clear()
        self._read = 0
        return untagged(value)

    def reply(self, *frames: bytes, framed: bool | None = None) -> None:
        """Send ``frames`` as answers, each marked for the next request waiting."""
        self._scan()
        if self.framed if framed is None else framed:
            frames = tuple(self._mark(frame) for frame in frames)
        self.protocol.dataReceived(b"".join(frames))

    def _mark(self, frame: bytes) -> bytes:
        if len(frame) < 12:
            return frame
        tag = self.tags.pop(0) if self.tags else 0
        ext = int.from_bytes(frame[10:12], "big") | wire.EXT_FRAMED | tag << wire.TAG_SHIFT
        return frame[:10] + ext.to_bytes(2, "big") + frame[12:]

    def close(self, reason=None) -> None:
        """The connection is lost (cleanly unless ``reason`` says otherwise)."""
        from twisted.internet import error

        self.protocol.connectionLost(Failure((reason or error.ConnectionDone)()))


def trees(functions: tuple[str, ...], max_leaves: int) -> st.SearchStrategy[ex.Node]:
    """Expression trees of every kind of node, with integers around each
    width the pickler writes differently; calls to ``functions``."""
    numbers = (
        st.integers(-(2**80), 2**80)
        | st.sampled_from([0, 255, 256, 65535, 65536, -1, -128, -129, 2**31 - 1, 2**31, -(2**31)])
        | st.floats(allow_nan=False)
    ).map(ex.Number)
    return st.recursive(
        numbers | st.sampled_from(sorted(ex.CONSTANTS)).map(ex.Constant),
        lambda sub: (
            st.builds(ex.Binary, sub, st.sampled_from(sorted(ex.BINARY)), sub)
            | st.builds(ex.Unary, st.sampled_from(sorted(ex.UNARY)), sub)
            | st.builds(ex.Call, st.sampled_from(functions), st.lists(sub, max_size=4).map(tuple))
        ),
        max_leaves=max_leaves,
    )


@implementer(IConnector)
class FakeConnector:
    """The far end of a pool's connections, for `UpstreamPool` in place of a
    `TCPConnector`: every `connect` is an attempt that the test lets succeed
    (`accept`, handing back the server's side as a `Peer`) or fail (`refuse`)."""

    address = "127.0.0.1:9999"
    #: The tag of each connection's first request.
    first_tag = 1

    def __init__(self, clock) -> None:
        self.clock = clock
        self.attempts: list = []
        self._given_up: list = []

    def connect(self):
        from twisted.internet import defer

        d: defer.Deferred = defer.Deferred(self._given_up.append)
        self.attempts.append(d)
        return d

    def accept(self, index: int = -1, framed: bool = True) -> Peer:
        """Let attempt ``index`` succeed; a connection opens as over TCP: its
        protocol is connected, then (a turn later) handed to the pool."""
        from twisted.internet.testing import StringTransport

        from twisted_cacheproxy.proxy.upstream import UpstreamProtocol

        protocol = UpstreamProtocol()
        protocol._lastTag = self.first_tag - 1  # tags start at random; here, known
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.clock.callLater(0, self.attempts[index].callback, protocol)
        self.clock.advance(0)
        return Peer(protocol, transport, framed)

    def refuse(self, index: int = -1, reason: Exception | None = None) -> None:
        """Let attempt ``index`` fail (refused, unless ``reason`` says otherwise)."""
        from twisted.internet import error

        self.attempts[index].errback(Failure(reason or error.ConnectionRefusedError()))
        self.clock.advance(0)

    def cancelled(self, index: int) -> bool:
        """Whether the pool gave attempt ``index`` up."""
        return any(d is self.attempts[index] for d in self._given_up)


def proxy_factory(server_port: int, **pool_options):
    """A `CacheProxyFactory` in this process, put together as ``twistd
    cacheproxy`` does: a 64 MiB cache and a pool to 127.0.0.1:``server_port``,
    observed by its metrics (``factory.observer``)."""
    from twisted.internet import reactor

    from twisted_cacheproxy.operations.metrics import ProxyMetrics
    from twisted_cacheproxy.proxy.cache import MemoryCache
    from twisted_cacheproxy.proxy.factory import CacheProxyFactory
    from twisted_cacheproxy.proxy.upstream import TCPConnector, UpstreamPool

    connector = TCPConnector(reactor, "127.0.0.1", server_port)
    pool = UpstreamPool(connector, reactor, **pool_options)
    factory = CacheProxyFactory(MemoryCache(64 << 20, reactor), pool)
    factory.observer = ProxyMetrics(factory)
    return factory


def request_frame(
    data: bytes | str,
    *,
    steps: bool = False,
    cache: bool = True,
    max_age: int | None = None,
    ts: int | None = None,
    request: bool = True,
) -> bytes:
    """One request message: ``data`` (text is UTF-8 encoded) with the S and C
    flags, the max-age (by default any age with C=1, 0 with C=0) and the time
    stamp (by default now); ``request=False`` sends it with T=0."""
    import time

    if isinstance(data, str):
        data = data.encode()
    if max_age is None:
        max_age = wire.FOREVER if cache else 0
    flags = wire.make_flags(request=request, cache=cache, steps=steps)
    return wire.encode(int(time.time()) if ts is None else ts, flags, max_age, data)


#: The fake clocks' start, and the time stamp of the unit tests' frames.
T0 = 1_700_000_000.0
TS = int(T0)


def answer(
    result,
    *,
    steps=(),
    cache=True,
    max_age=wire.FOREVER,
    ts=TS,
    status=wire.OK,
    encoding=codec.TEXT,
) -> bytes:
    """A server's success answer."""
    payload = codec.encode_result(encoding, result, list(steps))
    flags = wire.make_flags(request=False, status=status, cache=cache, steps=bool(steps))
    return wire.encode(ts, flags, max_age, payload)


def error_answer(
    kind, message, *, status=wire.BAD_REQUEST, cache=False, max_age=0, ts=TS, encoding=codec.TEXT
) -> bytes:
    """A server's error answer."""
    payload = codec.encode_error(encoding, kind, message)
    return wire.encode(
        ts, wire.make_flags(request=False, status=status, cache=cache), max_age, payload
    )


def with_max_age(frame: bytes, max_age: int) -> bytes:
    """``frame`` with another cache-control field (what a hit carries)."""
    return frame[:8] + max_age.to_bytes(2, "big") + frame[10:]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """A ``/metrics`` page read by prometheus_client's own parser: each
    sample's value by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def scrape(metrics) -> dict[tuple[str, tuple], float]:
    """``/metrics`` rendered and read back by prometheus_client's own parser."""
    request = DummyRequest([b""])
    body = site.MetricsResource(metrics).render_GET(request)
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    return samples(body.decode())


def built(config):
    """The service the composition root builds from parsed ``config`` for
    the global reactor (built, not started)."""
    from twisted.internet import reactor

    from twisted_cacheproxy.application import compose, tap

    return tap.ENTRIES[config.tapname].make(config, reactor, compose.endpoint_listener(reactor))


def options(*argv):
    """``twistd cacheserver``'s options parsed from ``argv``."""
    config = opts.ServerOptions()
    config.parseOptions(list(argv))
    return config


def doc_commands(page: str, prefix: str) -> list[str]:
    """The command lines of a page's ``sh`` code blocks (``page`` relative
    to the top of the project: ``docs/running.md``) that start with
    ``prefix``, without a trailing comment."""
    found, shell = [], False
    for line in (ROOT / page).read_text().splitlines():
        if line.startswith("```"):
            shell = line == "```sh"
            continue
        command = line.split("  #")[0].strip()
        if shell and command.startswith(prefix + " "):
            found.append(command)
    return found


def status_image():
    """``docs/status_image.py``, the script that takes the status page's
    picture, as a module (the browser test starts Chromium as it does)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("status_image", ROOT / "docs" / "status_image.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
