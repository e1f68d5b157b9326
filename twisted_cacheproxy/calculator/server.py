"""The calculator server: `CalculatorServerProtocol` / `CalculatorServerFactory`."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..transport import answers, wire
from ..transport.service import ServiceFactory, ServiceProtocol
from . import codec
from .events import IServerObserver, Served
from .expression import CalculationError, evaluate, evaluate_with_steps, is_deterministic

log = Logger()

#: Room kept in a message for the result and the encoding around the steps.
_STEPS_SLACK = 256


class CalculatorServerProtocol(ServiceProtocol):
    """Answers each request as it arrives, so pipelined answers keep their order."""

    factory: CalculatorServerFactory

    def frameReceived(self, header: wire.Header, data: bytes) -> None:
        factory = self.factory
        started = factory.clock.seconds()
        now = int(started)
        encoding = codec.encoding_of(data)
        if not header.flags & wire.FLAG_REQUEST:
            answer = answers.not_a_request(header, data, now)
        else:
            answer = factory.answer(header, data, encoding, now)
        self.sendMessage(answer)
        observer = factory.observer
        if observer is not None:
            observer.served(Served(encoding, started, header, data, self, answer))

    def invalidFrame(self, reason: str, first: bytes) -> None:
        self.sendMessage(answers.bad_frame(reason, first, int(self.factory.clock.seconds())))
        self.closeAfterSending()


class CalculatorServerFactory(ServiceFactory):
    """Shared state of the server's connections: limits and the cache policy
    that the course server keeps in module constants."""

    protocol = CalculatorServerProtocol

    def __init__(
        self,
        *,
        clock: IReactorTime | None = None,
        max_message_size: int = wire.MAX_MESSAGE_SIZE,
        idle_timeout: float | None = 60.0,
        max_age: int = wire.FOREVER,
        cache: bool = True,
        max_connections: int | None = 10_000,
    ) -> None:
        super().__init__(
            clock=clock,
            max_message_size=max_message_size,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
        )
        self.max_age = max_age
        self.cacheable = cache and max_age > 0
        self.shapes = codec.ShapeMemo()
        #: Told of every answer sent (`operations.metrics.ServerMetrics`); None: nobody.
        self.observer: IServerObserver | None = None

    def answer(self, header: wire.Header, data: bytes, encoding: str, now: int) -> bytes:
        """The whole response message for one request: ``L`` set and the
        request's tag echoed (PROTOCOL.md 6)."""
        steps = header.flags & wire.FLAG_STEPS
        cacheable = self.cacheable
        try:
            node = codec.decode_request(data, shapes=self.shapes)
            cacheable = cacheable and is_deterministic(node)
            if steps:
                budget = self.max_message_size - wire.HEADER_SIZE - _STEPS_SLACK
                value, step_list = evaluate_with_steps(node, budget)
            else:
                value, step_list = evaluate(node), []
            payload = codec.encode_result(encoding, value, step_list)
            status = wire.OK
        except CalculationError as e:
            payload = codec.encode_error(encoding, e.kind, str(e))
            status, steps = wire.BAD_REQUEST, 0
        except Exception:
            log.failure("Unexpected failure answering a request of {size} bytes", size=len(data))
            payload = codec.encode_error(encoding, "RuntimeError", "internal server error")
            status, steps, cacheable = wire.SERVER_ERROR, 0, False
        if wire.HEADER_SIZE + len(payload) > self.max_message_size:
            payload = codec.encode_error(
                encoding, "ValueError", "the answer does not fit in one message"
            )
            status, steps = wire.BAD_REQUEST, 0
        flags = wire.make_flags(request=False, status=status, cache=cacheable, steps=bool(steps))
        return wire.encode(
            now, flags, self.max_age if cacheable else 0, payload, wire.answer_ext(header)
        )
