"""``calc-check``: judge a server or a caching proxy of the calculator
protocol against the catalogue, and print its report card.

It runs on the reactor, like the services it judges: in proxy mode it
must be the client and the proxy's server at once (the scripted upstream
answers while a case waits for the proxy), and a Deferred per wait with
one time limit per case (``addTimeout``) bounds every case however the
target misbehaves, with no thread and no socket timeout to keep in step.
Each connection is a `probe.Probe` that sends exactly the bytes it is
given, so a case controls how its requests are cut into segments.

Exit status: 0 when every MUST case passed, 1 when one failed, 2 when the
target cannot be reached at all (or the command line is wrong).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer, error, protocol, task

from .. import __version__
from ..transport import wire
from ..transport.addresses import parse_address
from .case import PROXY, SERVER
from .catalogue import CATALOGUE, GROUPS, select
from .context import Session, readable_encoding
from .report import Terminal, as_html, as_json, listing, must_failures
from .runner import run_cases
from .scripted import ScriptedUpstream

#: Seconds the first connection to the target may take before it counts as unreachable.
CONNECT_TIMEOUT = 5.0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", metavar="HOST:PORT", help="where the target listens")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the JSON report there")
    p.add_argument("--html", type=Path, metavar="FILE", help="write the HTML report there")
    p.add_argument(
        "--only",
        metavar="ID,...",
        help=f"run only these cases or groups ({', '.join(GROUPS)})",
    )
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--max-message-size",
        type=int,
        default=wire.MAX_MESSAGE_SIZE,
        metavar="N",
        help="the largest message the target was configured for (default 8192)",
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="calc-check",
        description="Check a server or caching proxy of the calculator protocol "
        "(docs/PROTOCOL.md) against a catalogue of cases.",
    )
    p.add_argument("--list", action="store_true", help="list every case and exit")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    kinds = p.add_subparsers(dest="kind", metavar="{server,proxy}")
    server = kinds.add_parser(SERVER, help="check a calculator server")
    _add_common(server)
    proxy = kinds.add_parser(
        PROXY,
        help="check a caching proxy started against calc-check's scripted upstream",
        description="The proxy must have been started with its server at 127.0.0.1:N "
        "(twistd cacheproxy --server-port N); calc-check runs a scripted server there.",
    )
    _add_common(proxy)
    proxy.add_argument(
        "--upstream-port",
        type=int,
        metavar="N",
        help="the port of the proxy's server, where calc-check's scripted upstream listens",
    )
    args = p.parse_args(argv)
    if args.kind is None and not args.list:
        p.error("say what to check: server or proxy")
    if args.kind is None or args.list:
        return args
    if args.target is None:
        p.error("say where the target listens: HOST:PORT")
    try:
        args.host, args.port = parse_address(args.target)
    except ValueError as e:
        p.error(str(e))
    if args.kind == PROXY and args.upstream_port is None:
        p.error("proxy mode needs --upstream-port N (the proxy's --server-port)")
    if not wire.HEADER_SIZE < args.max_message_size <= wire.LENGTH_LIMIT:
        p.error(f"--max-message-size must be 13..{wire.LENGTH_LIMIT}")
    try:
        only = [name.strip() for name in args.only.split(",")] if args.only else None
        args.cases = select(args.kind, only)
    except ValueError as e:
        p.error(str(e))
    return args


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@defer.inlineCallbacks
def reachable(reactor: Any, host: str, port: int) -> Generator[Any, Any, None]:
    """Connect once and close; fails if the target cannot be reached."""
    creator = protocol.ClientCreator(reactor, protocol.Protocol)
    connection = yield creator.connectTCP(host, port, timeout=CONNECT_TIMEOUT)
    connection.transport.abortConnection()


@defer.inlineCallbacks
def run(reactor: Any, argv: list[str]) -> Generator[Any, Any, int]:
    """The command's main: returns the exit status."""
    args = parse_args(argv)
    if args.list:
        _write(listing(CATALOGUE if args.kind is None else select(args.kind)))
        return 0
    upstream = None
    if args.kind == PROXY:
        upstream = ScriptedUpstream(reactor, args.upstream_port)
        try:
            yield upstream.start()
        except error.CannotListenError as e:
            sys.stderr.write(f"calc-check: the scripted upstream cannot listen: {e}\n")
            return 2
    session = Session(
        reactor,
        args.kind,
        args.host,
        args.port,
        max_message_size=args.max_message_size,
        upstream=upstream,
    )
    try:
        yield reachable(reactor, args.host, args.port)
    except error.ConnectError as e:
        sys.stderr.write(f"calc-check: cannot reach {session.target}: {e}\n")
        return 2
    session.legacy = yield readable_encoding(session)
    where = f", its upstream at {upstream.address}" if upstream else ""
    _write(f"calc-check {args.kind} {session.target}{where}: {len(args.cases)} cases\n")
    if session.legacy:
        _write(
            "It answered a pickled request but not a text one: the cases that judge no "
            "encoding send pickles.\n"
        )
    terminal = Terminal(_write)
    try:
        results = yield run_cases(args.cases, session, terminal)
    finally:
        if upstream is not None:
            yield upstream.stop()
    terminal.finish(results)
    if args.json:
        args.json.write_text(as_json(session.target, args.kind, results))
    if args.html:
        args.html.write_text(as_html(session.target, args.kind, results))
    return 1 if must_failures(results) else 0


def _exit(code: int) -> None:
    if code:
        raise SystemExit(code)


def main() -> None:
    """Console-script entry point."""
    task.react(lambda reactor: run(reactor, sys.argv[1:]).addCallback(_exit))
