"""``calc-client``: the calculator client, one-shot or with the exercise's menu.

The network runs on the reactor: the wire code is `FrameClient`, and
`Calculator` keeps one connection, opened again when the far end has closed
it. The menu reads each line with the standard library's ``input`` in a
thread of its own (`ConsoleReader`), so that ``readline`` gives line editing
and history on a terminal while the reactor keeps running; piped input is
read the same way, one line per prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet import defer, error, protocol, task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from . import __version__
from .calculator import codec
from .calculator.expression import BINARY, CONSTANTS, FUNCTIONS, CalculationError, Real
from .calculator.parser import parse
from .operations.units import seconds
from .transport import numerals, wire
from .transport.addresses import address, parse_port
from .transport.frameclient import FrameClient
from .transport.tls import AwaitsHandshake, TLSError, client_options, connect_tls

#: The exercise's six standard example expressions.
EXAMPLES = (
    "(sin(max(2, 3 * 4, 5, 6 * ((7 * 8) / 9), 10 / 11)) / 12) * 13",
    "max(2, 3) + 3",
    "3 + ((4 * 2) / ((1 - 5) ** (2 ** 3)))",
    "((1 + 2) ** (3 * 4)) / (5 * 6)",
    "-(-((1 + (2 + 3)) ** -(4 + 5)))",
    "max(2, 3 * 4, log(e), 6 * 7, 9 / 8)",
)

#: Seconds without an answer before `WaitingLine` shows itself.
WAIT_NOTICE = 1.0
#: Seconds ``--timeout`` gives connecting and each answer by default: longer
#: than a proxy with its default options takes to give up on a miss (its
#: ``--timeout 10`` covers the server's answer and every retry), so a slow
#: miss through the proxy still ends in the proxy's own 500 rather than here.
TIMEOUT = 15.0
#: The exit status after a Ctrl-C, as shells give a program that SIGINT ended.
INTERRUPTED = 128 + signal.SIGINT


class TLSFrameClient(AwaitsHandshake, FrameClient):
    """A `FrameClient` over TLS, usable once its handshake is done."""


class GaveUpError(Exception):
    """Nothing came from the peer within ``seconds``: no connection
    (``connecting``) or no answer to a request sent."""

    def __init__(self, seconds: float, connecting: bool = False) -> None:
        super().__init__(seconds, connecting)
        self.seconds = seconds
        self.connecting = connecting


@dataclass(frozen=True)
class Answer:
    """One answer as the user sees it: its header's marks and its payload."""

    status: int
    cache: bool
    max_age: int
    value: Real | None = None
    steps: tuple[str, ...] = ()
    error: codec.RemoteError | None = None
    #: The ``H`` bit: a cache served it from its store (PROTOCOL.md 6).
    from_cache: bool = False
    #: The ``G`` bit: served past its lifetime while the server was unreachable.
    grace: bool = False
    #: The request was sent with C=0 (``--no-cache``): nobody stored the answer.
    no_cache: bool = False


@dataclass(frozen=True)
class Settings:
    """How requests are sent: flags, cache control and payload encoding."""

    steps: bool = True
    cache: bool = True
    max_age: int = wire.FOREVER
    legacy: bool = False


class Calculator:
    """Sends expressions to one server or proxy and reads their answers.

    It keeps one connection, opened when first needed. When the far end has
    closed it (an idle timeout, a restart), the next request opens a new one
    and `notify` says so. A request lost with a connection opened before it
    (closed by the far end just as it was sent) is sent once more on a new
    connection: a calculation has no side effects, so sending it again is
    safe. Connecting and each answer may take ``timeout`` seconds; then the
    request fails with `GaveUpError`, and a connection that did not answer is
    closed (a late answer would be taken for the next request's).
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        settings: Settings,
        *,
        timeout: float = TIMEOUT,
        connection: FrameClient | None = None,
        notify: Callable[[str], None] | None = None,
        tls: Any = None,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.settings = settings
        self.timeout = timeout
        #: TLS client options (`transport.tls.client_options`), or None: plain TCP.
        self.tls = tls
        self.connection = connection
        self.notify = notify or (lambda text: None)

    @property
    def where(self) -> str:
        return address(self.host, self.port)

    def open(self) -> defer.Deferred:
        """Connect now; the Deferred fires with the new `FrameClient` (over
        TLS: once its handshake has verified the certificate, within the
        timeout too)."""
        if self.tls is None:
            creator = protocol.ClientCreator(self.reactor, FrameClient)
            d = creator.connectTCP(self.host, self.port, timeout=self.timeout)
        else:
            d = connect_tls(
                self.reactor, TLSFrameClient, self.host, self.port, self.tls, self.timeout
            )
            d.addTimeout(self.timeout, self.reactor)

        def connected(connection: FrameClient) -> FrameClient:
            self.connection = connection
            return connection

        def failed(failure: Failure) -> Failure:
            failure.trap(error.TimeoutError, defer.TimeoutError)
            raise GaveUpError(self.timeout, connecting=True)

        return d.addCallbacks(connected, failed)

    def close(self) -> None:
        """Close the connection, if one is open."""
        if self.connection is not None and self.connection.connected:
            self.connection.closeAfterSending()

    def request_data(self, text: str) -> bytes:
        """Request data for ``text``: the text itself, or the course client's
        pickle of its parsed tree (so a parse error stops it here)."""
        if self.settings.legacy:
            return codec.encode_request(parse(text), codec.LEGACY)
        return text.encode()

    @defer.inlineCallbacks
    def calculate(self, text: str) -> Generator[defer.Deferred[Any], Any, Answer]:
        """Send ``text``; the Deferred fires with an `Answer`."""
        data = self.request_data(text)
        connection, fresh = yield self._usable()
        try:
            message = yield self._send(connection, data)
        except (error.ConnectionDone, error.ConnectionLost):
            if fresh:
                raise
            # Closed by the far end just as we sent: once more, on a new one.
            connection, _ = yield self._usable()
            message = yield self._send(connection, data)
        return _answer(message, no_cache=not self.settings.cache)

    @defer.inlineCallbacks
    def _usable(self):
        """The open connection and False, or a new one and True if there is
        none yet or the far end closed the last one (which `notify` tells)."""
        closed = self.connection
        if closed is not None and closed.usable:
            return closed, False
        connection = yield self.open()
        if closed is not None:
            self.notify(f"(connection closed by {self.where}; reconnected)\n")
        return connection, True

    def _send(self, connection: FrameClient, data: bytes) -> defer.Deferred:
        s = self.settings
        flags = wire.make_flags(request=True, cache=s.cache, steps=s.steps)
        frame = wire.encode(int(self.reactor.seconds()), flags, s.max_age if s.cache else 0, data)

        def gave_up(result: Any, timeout: float) -> Any:
            # Cancelling the request closed the connection: the next request
            # opens a new one without a note that the far end closed it.
            self.connection = None
            if isinstance(result, Failure) and result.check(defer.CancelledError):
                return Failure(GaveUpError(timeout))
            return result

        d = connection.sendRequest(frame)
        return d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=gave_up)


def _answer(message: tuple[wire.Header, bytes], no_cache: bool = False) -> Answer:
    header, data = message
    kwargs: dict[str, Any] = {
        "status": header.status,
        "cache": header.cache,
        "max_age": header.max_age,
        "from_cache": header.from_cache,
        "grace": header.grace,
        "no_cache": no_cache,
    }
    try:
        value, steps = codec.decode_response(data)
    except codec.RemoteError as e:
        return Answer(error=e, **kwargs)
    if header.status != wire.OK:
        return Answer(error=codec.RemoteError("Error", show(value)), **kwargs)
    return Answer(value=value, steps=tuple(steps), **kwargs)


def show(value: object) -> str:
    """``repr`` of a result; integers past Python's 4,300-digit limit for
    decimal text (a course server sends them) are described instead."""
    try:
        return repr(value)
    except ValueError:
        return f"<an integer of {value.bit_length()} bits, too long to print>"  # type: ignore[attr-defined]


def origin(answer: Answer) -> str:
    """Where an answer came from and how long it may be kept, in words. A
    course server (or ours) never sets ``H``: without it, the server computed
    the answer for this request."""
    if answer.grace:
        return (
            "from the proxy's cache, stale: served past its lifetime "
            "because the server is unreachable"
        )
    source = "from the proxy's cache" if answer.from_cache else "computed by the server"
    if answer.no_cache:
        keep = "not stored: asked with --no-cache"
    elif answer.cache and answer.max_age:
        keep = "cacheable for " + (
            "ever" if answer.max_age == wire.FOREVER else f"{answer.max_age} s"
        )
    else:
        keep = "not cacheable"
    return f"{source}, {keep}"


def render(text: str, answer: Answer) -> str:
    """The answer as printed: steps aligned under the expression, or one
    line for an error."""
    if answer.error is not None:
        e = answer.error
        where = "  (from the proxy's cache)" if answer.from_cache else ""
        return f"Error {answer.status} ({e.kind}): {e.message}{where}\n"
    label = "Expression: "
    lines = [f"{label}{text}"]
    lines += [f"{' ' * (len(label) - 2)}= {step}" for step in answer.steps[1:]]
    lines.append(f"Result: {show(answer.value)}  ({origin(answer)})")
    return "\n".join(lines) + "\n"


def describe_failure(e: BaseException | None, peer: str = "the server") -> str:
    """A one-line message for a failed connection or request to ``peer``
    (``host:port``)."""
    if isinstance(e, CalculationError):
        return f"Error (local, {e.kind}): {e}\n"
    if isinstance(e, GaveUpError):
        what = "cannot connect to" if e.connecting else "no answer from"
        return f"Error: {what} {peer} within {seconds(e.seconds)}\n"
    if isinstance(e, error.ConnectError):
        return f"Error: cannot connect to {peer}: {str(e).rstrip('.')}\n"
    if isinstance(e, TLSError):
        return f"Error: {peer}: {e}\n"
    if isinstance(e, error.ConnectionDone | error.ConnectionLost):
        return f"Error: {peer} closed the connection before the answer came\n"
    return f"Error: {e}\n"


class WaitingLine:
    """After `WAIT_NOTICE` seconds without an answer, one line saying how
    long the client has waited, rewritten in place (``\\r``) every second
    and wiped when the answer comes. Meant for a terminal only."""

    def __init__(self, clock: IReactorTime, write: Callable[[str], None], peer: str) -> None:
        self.clock = clock
        self.write = write
        self.peer = peer

    def watch(self, d: defer.Deferred) -> defer.Deferred:
        """Show the line while ``d`` has not fired; ``d``'s result passes on."""
        started = self.clock.seconds()
        shown = [0]

        def tick() -> None:
            elapsed = self.clock.seconds() - started
            text = f"\rwaiting for an answer from {self.peer}... {elapsed:.0f} s"
            self.write(text)
            shown[0] = len(text) - 1
            call[0] = self.clock.callLater(1.0, tick)

        call = [self.clock.callLater(WAIT_NOTICE, tick)]

        def done(result):
            if call[0].active():
                call[0].cancel()
            if shown[0]:
                self.write("\r" + " " * shown[0] + "\r")
            return result

        return d.addBoth(done)


MENU_HELP = ("m", "?", "help", "menu")
MENU_QUIT = ("q", "quit", "exit")
#: The example a menu choice ``1`` to ``6`` (in ASCII digits) stands for.
_EXAMPLE_CHOICES = {str(i): text for i, text in enumerate(EXAMPLES, 1)}


def menu_text() -> str:
    """The menu, printed at start and again on request."""
    lines = ["", "Choose an expression to calculate, or type one:"]
    lines += [f"  {i}) {text}" for i, text in enumerate(EXAMPLES, 1)]
    lines += [
        f"  {len(EXAMPLES) + 1}) type your own",
        "  m) show this menu again",
        "  q) quit (or Ctrl-D)",
        "",
    ]
    return "\n".join(lines)


class Menu:
    """The interactive menu. ``read(prompt)`` gives the next line typed (a
    Deferred firing with the line, or None at the end of input / Ctrl-D);
    ``write`` shows text. One request at a time: the next prompt comes
    after the answer."""

    def __init__(
        self,
        calculator: Calculator,
        read: Callable[[str], defer.Deferred],
        write: Callable[[str], None],
        waiting: WaitingLine | None = None,
    ) -> None:
        self.calculator = calculator
        self.read = read
        self.write = write
        self.waiting = waiting

    @defer.inlineCallbacks
    def run(self):
        """Show the menu and answer choices until the user quits."""
        self.write(menu_text())
        while True:
            line = yield self.read("choice> ")
            if line is None:  # end of input, or Ctrl-D at the menu
                self.write("\n")
                return
            choice = line.strip()
            if choice.lower() in MENU_QUIT:
                return
            text = yield self.choose(choice)
            if text:
                yield self.send(text)

    @defer.inlineCallbacks
    def choose(self, choice: str) -> Generator[defer.Deferred[Any], Any, str | None]:
        """The expression a menu answer asks for (None: nothing to send)."""
        if not choice:
            return None
        if choice.lower() in MENU_HELP:
            self.write(menu_text())
            return None
        if choice in _EXAMPLE_CHOICES:
            return _EXAMPLE_CHOICES[choice]
        if choice == str(len(EXAMPLES) + 1):
            text = yield self.read("expression> ")
            if text is None:  # Ctrl-D: back to the menu prompt
                self.write("\n")
                return None
            return text.strip() or None
        return choice  # anything else is an expression to calculate

    def send(self, text: str) -> defer.Deferred:
        """Calculate ``text`` and show its answer, or one line saying why
        there is none; the menu goes on either way."""
        d = defer.maybeDeferred(self.calculator.calculate, text)
        if self.waiting is not None:
            d = self.waiting.watch(d)
        d.addCallback(lambda answer: self.write(render(text, answer) + "\n"))
        d.addErrback(self._failed)
        return d

    def _failed(self, failure: Failure) -> Failure | None:
        if failure.check(defer.CancelledError):  # a Ctrl-C: the menu ends
            return failure
        self.write(describe_failure(failure.value, self.calculator.where) + "\n")
        return None


class ConsoleReader:
    """Reads one line per prompt with ``input``, in a daemon thread, and
    hands it to the reactor. On a terminal, ``input`` is the standard
    library's ``readline`` (line editing, arrow-key history) when it is
    there. Ctrl-D (end of input) reads as None. Piped input is echoed after
    its prompt, so the screen reads like a session."""

    def __init__(self, reactor: Any, echo: bool = False) -> None:
        self.reactor = reactor
        self.echo = echo

    def __call__(self, prompt: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()

        def read() -> None:
            # Ctrl-C must reach the reactor's thread, which handles it; a
            # signal taken by this thread would leave the reactor asleep.
            if hasattr(signal, "pthread_sigmask"):
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                line = input(prompt)
            except EOFError:
                line = None
            except Exception:
                self.reactor.callFromThread(d.errback, Failure())
                return
            else:
                if self.echo:
                    print(line, flush=True)
            self.reactor.callFromThread(d.callback, line)

        threading.Thread(target=read, name="calc-client input", daemon=True).start()
        return d


_T = TypeVar("_T")


def _argument(parse: Callable[[str], _T]) -> Callable[[str], _T]:
    """``parse`` as an argparse type, its ValueError shown as it words it."""

    def checked(text: str) -> _T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return checked


def _signature(name: str, low: int, high: int) -> str:
    """How a function is called: ``sin(x)``, ``log(x[, base])``,
    ``max(x, ...)``, ``rand(a, b)``."""
    names = {"log": ("x", "base"), "pow": ("x", "y", "mod"), "rand": ("a", "b")}.get(name, ("x",))
    args = ", ".join(names[:low])
    if high > len(names):
        return f"{name}({args}, ...)"
    extra = "".join(f"[, {n}]" for n in names[low:high])
    return f"{name}({args}{extra})"


def calculator_help() -> str:
    """What the calculator knows, from the evaluator's own tables."""
    constants = ", ".join(name.lower() for name in CONSTANTS)
    operators = " ".join(BINARY)
    calls = [_signature(name, low, high) for name, (_, low, high) in FUNCTIONS.items()]
    calls[-1] += " (a uniform random number between a and b)"
    lines = ["  "]
    for n, call in enumerate(calls):
        item = call + (", " if n < len(calls) - 1 else ".")
        if len(lines[-1]) + len(item.rstrip()) > 79:
            lines[-1] = lines[-1].rstrip()
            lines.append("  ")
        lines[-1] += item
    intro = textwrap.fill(
        f"Expressions: numbers (42, 3.25, 1.5e-3), the operators {operators}, unary - "
        f"and +, parentheses, the constants {constants} (in any case), and the functions:",
        79,
    )
    example = 'Several words are joined into one expression: calc-client sin "(pi/2)".'
    return f"{intro}\n" + "\n".join(lines) + f"\n\n{example}"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown, the epilog kept as written."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="calc-client",
        description=textwrap.fill(
            "Calculator client: one expression from the command line, "
            "or the exercise's menu when none is given.",
            79,
        ),
        epilog=calculator_help(),
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "expression",
        nargs="*",
        default=argparse.SUPPRESS,
        help="calculate this and exit (none: the menu)",
    )
    p.add_argument("--host", default="127.0.0.1", help="server or proxy host")
    p.add_argument(
        "--port",
        type=_argument(parse_port),
        default=9999,
        help="9999 for the server, 9998 for the proxy",
    )
    p.add_argument(
        "--steps", action=argparse.BooleanOptionalAction, default=True, help="ask for the steps"
    )
    p.add_argument("--no-cache", action="store_true", help="C=0: no cache may serve or store it")
    p.add_argument(
        "--max-age",
        type=_argument(numerals.integer),
        default=wire.FOREVER,
        metavar="N",
        help="oldest cached answer accepted, seconds (65535: any; 0: reload)",
    )
    p.add_argument("--legacy", action="store_true", help="send pickles, as the course client does")
    p.add_argument(
        "--timeout",
        type=_argument(numerals.decimal),
        default=TIMEOUT,
        metavar="S",
        help="seconds to wait for the connection, and then for each answer, before giving up; "
        "the default outlasts a proxy's own 10 s for a miss with its retries, "
        "so that the proxy's 500 comes first",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="talk TLS, checking the certificate against this host's trusted ones "
        "(or --cafile) and --host, which it must name",
    )
    p.add_argument(
        "--cafile", metavar="FILE", help="with --tls: trust the certificates in this PEM file"
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = p.parse_args(argv)
    args.expression = " ".join(getattr(args, "expression", [])).strip() or None
    if not 0 <= args.max_age <= wire.FOREVER:
        p.error("--max-age must be 0..65535")
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    if args.cafile is not None and not args.tls:
        p.error("--cafile goes with --tls")
    if args.tls:
        try:
            args.tls = client_options(args.host, args.cafile)
        except ValueError as e:
            p.error(f"--cafile: {e}")
    else:
        args.tls = None
    return args


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@defer.inlineCallbacks
def run(reactor: Any, argv: list[str]) -> Generator[defer.Deferred[Any], Any, int]:
    """The client's main: returns the process exit code."""
    args = parse_args(argv)
    settings = Settings(
        steps=args.steps, cache=not args.no_cache, max_age=args.max_age, legacy=args.legacy
    )
    calculator = Calculator(
        reactor, args.host, args.port, settings, timeout=args.timeout, notify=_write, tls=args.tls
    )
    terminal = sys.stdout.isatty()
    waiting = WaitingLine(reactor, _write, calculator.where) if terminal else None
    if args.expression is not None:
        session = _one_shot(calculator, args.expression, waiting)
    else:
        session = _menu(reactor, calculator, waiting)
    cancel_on_ctrl_c(reactor, session)
    try:
        return (yield session)
    except defer.CancelledError:
        # On a terminal the cursor is after the echoed ^C or a prompt.
        sys.stderr.write(("\n" if terminal else "") + "Stopped by Ctrl-C.\n")
        return INTERRUPTED
    finally:
        calculator.close()


@defer.inlineCallbacks
def _one_shot(
    calculator: Calculator, text: str, waiting: WaitingLine | None
) -> Generator[defer.Deferred[Any], Any, int]:
    """Calculate ``text`` and print its answer; the exit code."""
    d = defer.maybeDeferred(calculator.calculate, text)
    try:
        answer = yield (waiting.watch(d) if waiting else d)
    except defer.CancelledError:
        raise
    except Exception as e:
        sys.stderr.write(describe_failure(e, calculator.where))
        return 2
    (sys.stdout if answer.error is None else sys.stderr).write(render(text, answer))
    return 0 if answer.error is None else 1


@defer.inlineCallbacks
def _menu(
    reactor: Any, calculator: Calculator, waiting: WaitingLine | None
) -> Generator[defer.Deferred[Any], Any, int]:
    """Connect, then run the menu until the user quits; the exit code."""
    try:
        yield calculator.open()
    except defer.CancelledError:
        raise
    except Exception as e:
        sys.stderr.write(describe_failure(e, calculator.where))
        return 2
    _write(f"Connected to {calculator.where}.\n")
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (input() edits lines and keeps history)
    reader = ConsoleReader(reactor, echo=not sys.stdin.isatty())
    yield Menu(calculator, reader, _write, waiting).run()
    return 0


def cancel_on_ctrl_c(reactor: Any, d: defer.Deferred) -> None:
    """Cancel ``d`` at a Ctrl-C (SIGINT). Installed once the reactor runs, in
    place of the reactor's own handler, which would stop the reactor and
    close the connection under a request still waiting: the user, not the
    peer, ended it."""

    def interrupted(number: int, frame: Any) -> None:
        reactor.callFromThread(d.cancel)

    reactor.callWhenRunning(signal.signal, signal.SIGINT, interrupted)


def _exit(code: int) -> None:
    if code:
        raise SystemExit(code)


def main() -> None:
    """Console-script entry point; exits 1 on an error answer, 2 when no
    answer could be had, 130 after a Ctrl-C. The terminal's settings are put back on the way
    out, even after a Ctrl-C that interrupted ``readline``."""
    saved = None
    try:
        import termios

        if sys.stdin.isatty():
            saved = termios.tcgetattr(sys.stdin.fileno())
    except (ImportError, OSError):
        pass
    try:
        task.react(lambda reactor: run(reactor, sys.argv[1:]).addCallback(_exit))
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
