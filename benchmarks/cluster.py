#!/usr/bin/env python3
"""A site of several hosts on one machine: proxies, servers and memcached
nodes each on a host of their own (a Linux network namespace), load clients
on theirs, and faults under load: links cut and healed, processes killed and
restarted.

    python3 benchmarks/cluster.py --proxies 2 --servers 3 --memcached 2 \
        --duration 40 --json out.json

Run as root, after ``pip install .``; needs iproute2 (``ip``, ``ss``) and
memcached. The site, for one run whose names start with a prefix of its own
(``cpx`` and six hex digits, or ``--prefix``):

- a switch: a namespace ``<prefix>-switch`` holding a bridge;
- one namespace per host, ``<prefix>-p1``, ``-s1``, ``-m1``, ``-c1``...,
  linked to the bridge by a veth pair made inside the namespaces (nothing is
  added to the machine's own network namespace), with an address in
  198.18.0.0/16, the range RFC 2544 sets aside for benchmarks, which here
  exists only inside the run's namespaces: 198.18.1.N for proxy N, .2.N for
  servers, .3.N for memcached nodes, .4.N for load clients;
- ``twistd -n cacheserver`` on each server host, ``memcached`` on each node,
  ``twistd -n cacheproxy`` on each proxy host in front of every server and
  node, with the options of `proxy_options`, its admin site on its host;
- on each client host a load client (this script's ``agent load``, threads
  in lockstep, each connection on one proxy) asking expressions from one
  pool that slides over time, so that an answer one proxy fetched is a
  shared-tier hit for the others; and on the first one a watcher (``agent
  watch``) reading every proxy's ``/stats.json`` five times a second.

If ``twistd cacheproxy --help`` lists ``--memcached-secret-file``, the
proxies get one secret file (mode 0600) to sign their shared entries with.

The phases (``--phases``, by default all six in this order) split
``--duration``: steady; a server partitioned (its link down) then healed; a
server killed (SIGKILL) then started again; the same for a memcached node;
steady again. A fault lasts ``--fault-share`` of its phase. Every answer is
checked against the expression's true value; a request counts in the phase
in which it ended. Per phase and in all: requests,
wrong answers, unanswered requests (none within ``--client-timeout``), 500s,
p50/p99/max latency, shared-tier hits, requests the proxies sent to servers,
the seconds from healing until the fault stops showing (``recovered_s``:
every proxy has the server or node back in use and no client sees an
error), and for a memcached node's loss the share of the shared tier's
lookups that could not use their node (``keys_moved``; those keys go to the
servers) and the share of the other nodes' entries that belong to another
node (``keys_on_other_node``). A Markdown table on standard output; with
``--json FILE``, the same as one object: ``requests``, ``wrong``,
``unanswered``, ``errors_500``, ``shared_hits``... and ``phases``, one object
per phase with its ``name`` and ``fault``.

Everything the run made (processes, by PID; namespaces, with their links and
addresses, by name) is removed at the end, also on Ctrl-C, SIGTERM or a failed
step (whose logs are then kept). If the script itself is killed with SIGKILL,
``ip netns list`` shows what is left under its prefix (``ip netns pids NAME``,
``ip netns delete NAME``).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import pathlib
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from twisted_cacheproxy.proxy.ring import Ring
from twisted_cacheproxy.transport import wire

# --- the site's plan ---------------------------------------------------------------

#: Each host's third address byte and name letter, by role.
ROLES = {"proxy": (1, "p"), "server": (2, "s"), "memcached": (3, "m"), "client": (4, "c")}
#: RFC 2544's benchmarking range; every host is on one link.
NETWORK_PREFIX = "198.18"
NETWORK_BITS = 16
SERVER_PORT, PROXY_PORT, ADMIN_PORT, MEMCACHED_PORT = 9999, 9998, 9980, 11211
PHASES = (
    "steady",
    "server-partition",
    "server-kill",
    "memcached-partition",
    "memcached-kill",
    "steady-again",
)
#: What a load client's answer was.
OK, WRONG, ERROR_500, UNANSWERED = range(4)
SCRIPT = str(pathlib.Path(__file__).resolve())


def _twistd() -> str:
    """The installed package's twistd: beside this Python, else on the PATH."""
    here = pathlib.Path(sys.executable).with_name("twistd")
    return str(here) if here.exists() else shutil.which("twistd") or "twistd"


TWISTD = _twistd()


def proxy_options(args: argparse.Namespace) -> list[str]:
    """What a proxy of a site with several servers and memcached nodes should
    be told besides the addresses (docs/scaling.md says why):

    - ``--timeout``: a miss may take this long in all; a calculation takes
      milliseconds, so a second without an answer means a lost server;
    - ``--retry-timeouts``: a miss whose server does not answer within half
      of ``--timeout`` goes to another server instead of becoming a 500 (a
      cut-off server does not refuse, it is silent);
    - ``--health-interval``: every server probed this often, so one taken
      out comes back within about as long once it answers again.

    ``--no-retry-timeouts`` and ``--health-interval 0`` show what each buys."""
    options = ["--timeout", f"{args.timeout:g}", "--health-interval", f"{args.health_interval:g}"]
    return [*options, "--retry-timeouts"] if args.retry_timeouts else options


# --- commands, namespaces, hosts --------------------------------------------------


class StepError(Exception):
    """A step of building or running the site failed; the message says which."""


def sh(*command: str, check: bool = True) -> str:
    """Run ``command``; its standard output, or `StepError` with its error."""
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode:
        raise StepError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def namespaces() -> set[str]:
    """The names ``ip netns list`` gives."""
    return {line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()}


class Namespace:
    """One network namespace of this run, known by its name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def create(self) -> None:
        sh("ip", "netns", "add", self.name)
        self.ip("link", "set", "lo", "up")

    def delete(self) -> None:
        """Remove it with every link and address in it (its processes must be gone)."""
        sh("ip", "netns", "delete", self.name, check=False)

    def ip(self, *args: str) -> str:
        """``ip`` inside this namespace."""
        return sh("ip", "-n", self.name, *args)

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this namespace (``ip netns exec`` executes it in
        its own place, so the PID is the program's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def listening(self, port: int) -> bool:
        """Whether a TCP socket listens on ``port`` here."""
        return bool(sh("ss", "-N", self.name, "-Hltn", f"sport = :{port}").strip())


class Host:
    """A namespace with one link to the switch, named for its role and number
    (``p1``, ``s2``...): the link's switch end, named as the host, is its
    port, which a partition takes down."""

    def __init__(self, role: str, number: int, prefix: str, switch: Namespace) -> None:
        self.role = role
        self.number = number
        self.name = ROLES[role][1] + str(number)
        self.namespace = Namespace(f"{prefix}-{self.name}")
        self.switch = switch

    @property
    def address(self) -> str:
        return f"{NETWORK_PREFIX}.{ROLES[self.role][0]}.{self.number}"

    def cut(self) -> None:
        self.switch.ip("link", "set", self.name, "down")

    def heal(self) -> None:
        self.switch.ip("link", "set", self.name, "up")


class Daemon:
    """A long-running program on a host (a server, a proxy, memcached),
    started in a session of its own so that Ctrl-C reaches only this script,
    and stopped by its PID."""

    def __init__(self, host: Host, argv: list[str], port: int, log: pathlib.Path) -> None:
        self.host = host
        self.argv = argv
        self.port = port
        self.log = log
        self.proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"{self.host.role} {self.host.address}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.host.namespace.command(*self.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_listening(self, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while not self.host.namespace.listening(self.port):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise StepError(f"{self} did not start listening on {self.port}:\n{tail}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self) -> None:
        """SIGTERM: stop as a service stops."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait(self) -> None:
        """Wait for it to exit after `terminate`, 10 s at most, then SIGKILL."""
        if self.proc is None:
            return
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()


# --- the site -------------------------------------------------------------------


class Site:
    """The switch, the hosts and the programs on them, built for one run and
    taken apart by `close`: processes by PID, namespaces by name, only those
    this object made."""

    def __init__(self, prefix: str, workdir: pathlib.Path) -> None:
        self.prefix = prefix
        self.workdir = workdir
        self.made: list[Namespace] = []
        self.hosts: dict[str, list[Host]] = {role: [] for role in ROLES}
        self.daemons: dict[str, list[Daemon]] = {"server": [], "memcached": [], "proxy": []}
        self.agents: list[subprocess.Popen] = []
        self.switch = Namespace(f"{prefix}-switch")

    def _namespace(self, ns: Namespace) -> Namespace:
        self.made.append(ns)  # before it exists: a half-made one is removed too
        ns.create()
        return ns

    def build(self, args: argparse.Namespace, secret: pathlib.Path | None) -> None:
        """The switch, then servers and memcached nodes, then the proxies in
        front of them all, each on a host of its own, then the client hosts."""
        self._namespace(self.switch)
        self.switch.ip("link", "add", "br0", "type", "bridge")
        self.switch.ip("link", "set", "br0", "up")
        for _ in range(args.servers):
            self.add_daemon("server", server_argv, SERVER_PORT)
        for _ in range(args.memcached):
            self.add_daemon("memcached", memcached_argv, MEMCACHED_PORT)
        servers = [f"{d.host.address}:{SERVER_PORT}" for d in self.daemons["server"]]
        nodes = self.node_names()
        for _ in range(args.proxies):
            self.add_daemon(
                "proxy", lambda host: proxy_argv(host, servers, nodes, args, secret), PROXY_PORT
            )
        for daemon in self.all_daemons():
            daemon.wait_listening()
        for _ in range(args.clients):
            self.add_host("client")

    def add_host(self, role: str) -> Host:
        """A new host of ``role`` on the switch, its address on its one link."""
        host = Host(role, len(self.hosts[role]) + 1, self.prefix, self.switch)
        inside = self._namespace(host.namespace).name
        self.switch.ip("link", "add", host.name, "type", "veth", "peer", "eth0", "netns", inside)
        self.switch.ip("link", "set", host.name, "master", "br0", "up")
        host.namespace.ip("addr", "add", f"{host.address}/{NETWORK_BITS}", "dev", "eth0")
        host.namespace.ip("link", "set", "eth0", "up")
        self.hosts[role].append(host)
        return host

    def add_daemon(self, role: str, argv: Callable[[Host], list[str]], port: int) -> Daemon:
        """A new host of ``role`` running ``argv(host)``, started."""
        host = self.add_host(role)
        daemon = Daemon(host, argv(host), port, self.log(host.name))
        self.daemons[role].append(daemon)
        daemon.start()
        return daemon

    def all_daemons(self) -> list[Daemon]:
        return [d for role in self.daemons.values() for d in role]

    def log(self, name: str) -> pathlib.Path:
        return self.workdir / f"{name}.log"

    def node_names(self) -> list[str]:
        """The memcached nodes as every proxy names them."""
        return [f"{d.host.address}:{MEMCACHED_PORT}" for d in self.daemons["memcached"]]

    def agent(self, host: Host, *argv: str, out: pathlib.Path) -> subprocess.Popen:
        """This script's ``agent`` inside ``host``, writing ``out``."""
        with self.log(f"{host.name}-{argv[0]}").open("ab") as log:
            proc = subprocess.Popen(
                host.namespace.command(sys.executable, SCRIPT, "agent", *argv, "--out", str(out)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.agents.append(proc)
        return proc

    def close(self) -> None:
        """Stop every process it started, then remove every namespace it made."""
        for proc in self.agents:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        daemons = self.all_daemons()
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            daemon.wait()
        for ns in reversed(self.made):
            ns.delete()


def server_argv(host: Host) -> list[str]:
    twistd = [TWISTD, "-n", "--pidfile=", "--logfile=-", "cacheserver"]
    return [*twistd, "--interface", host.address, "--port", str(SERVER_PORT)]


def memcached_argv(host: Host) -> list[str]:
    """memcached on the host's address (``-u root``: as root, it refuses to start without)."""
    binary = shutil.which("memcached") or "memcached"
    return [binary, "-u", "root", "-l", host.address, "-p", str(MEMCACHED_PORT), "-U", "0"]


def proxy_argv(
    host: Host,
    servers: list[str],
    nodes: list[str],
    args: argparse.Namespace,
    secret: pathlib.Path | None,
) -> list[str]:
    argv = [TWISTD, "-n", "--pidfile=", "--logfile=-", "cacheproxy"]
    argv += ["--interface", host.address, "--port", str(PROXY_PORT)]
    argv += ["--admin-port", str(ADMIN_PORT), "--admin-interface", host.address]
    for server in servers:
        argv += ["--server", server]
    for node in nodes:
        argv += ["--memcached", node]
    if secret is not None:
        argv += ["--memcached-secret-file", str(secret)]
    return argv + proxy_options(args)


def signed_tier_secret(workdir: pathlib.Path) -> pathlib.Path | None:
    """A secret file (mode 0600) for the proxies' signed shared-tier entries
    when the installed proxy takes ``--memcached-secret-file``; else None."""
    help_text = subprocess.run([TWISTD, "cacheproxy", "--help"], capture_output=True, text=True)
    if "--memcached-secret-file" not in help_text.stdout + help_text.stderr:
        return None
    path = workdir / "memcached.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
    return path


# --- the agents: what runs inside the client hosts ------------------------------------


class Expressions:
    """The pool every load client asks from: expression ``k`` is
    ``k * (3 + k % 17) + k % 101`` in the text encoding, whose true value is
    computed here. The pool slides: ``rate`` new expressions a second, each
    asked for ``life`` seconds, so each proxy misses every one once, and one
    proxy's miss is a shared-tier hit for the next."""

    def __init__(self, start: float, rate: float, life: float) -> None:
        self.start = start
        self.rate = rate
        self.width = max(1, int(rate * life))

    def pick(self, now: float, rng: random.Random) -> int:
        newest = max(0, int((now - self.start) * self.rate))
        return rng.randint(max(0, newest - self.width), newest)

    @staticmethod
    def text(k: int) -> bytes:
        return f"{k} * {3 + k % 17} + {k % 101}".encode()

    @staticmethod
    def value(k: int) -> int:
        return k * (3 + k % 17) + k % 101


class LoadConnection(threading.Thread):
    """One connection to one proxy, one request at a time; each answer is
    recorded as ``(started, seconds, outcome, proxy)``. An answer that does
    not come within ``timeout`` is UNANSWERED and the connection is replaced."""

    def __init__(self, client: LoadClient, proxy: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.proxy = proxy
        self.address = client.proxies[proxy]
        self.rng = random.Random(seed)
        self.sock: socket.socket | None = None
        self.reader: Any = None  # the socket's buffered reader
        self.tag = 0

    def run(self) -> None:
        client = self.client
        while not client.stopping.is_set():
            k = client.pool.pick(time.monotonic(), self.rng)
            started = time.monotonic()
            try:
                outcome = self.ask(k, started + client.timeout)
            except OSError:
                outcome = UNANSWERED
            if outcome in (UNANSWERED, WRONG) and self.sock is not None:
                self.sock.close()
                self.sock = self.reader = None
            client.records.append((started, time.monotonic() - started, outcome, self.proxy))
            if outcome == UNANSWERED:
                client.stopping.wait(0.05)  # a proxy that refuses: no busy loop

    def ask(self, k: int, deadline: float) -> int:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=self.client.timeout)
            self.reader = self.sock.makefile("rb")
        self.tag = self.tag % wire.MAX_TAG + 1
        flags = wire.make_flags(request=True, cache=True)
        frame = wire.encode(int(time.time()), flags, wire.FOREVER, Expressions.text(k))
        self.sock.sendall(frame[:10] + wire.tag_bits(self.tag).to_bytes(2, "big") + frame[12:])
        head = self.receive(wire.HEADER_SIZE, deadline)
        if head is None:
            return UNANSWERED
        header = wire.decode_header(head)
        data = self.receive(header.length - wire.HEADER_SIZE, deadline)
        if data is None:
            return UNANSWERED
        if header.tag != self.tag or header.request:
            return WRONG
        if header.status == wire.SERVER_ERROR:
            return ERROR_500
        try:
            result = json.loads(data)["result"]
        except (ValueError, KeyError, TypeError):
            return WRONG
        right = header.status == wire.OK and type(result) is int
        return OK if right and result == Expressions.value(k) else WRONG

    def receive(self, size: int, deadline: float) -> bytes | None:
        """``size`` bytes, or None if they do not come by ``deadline`` (each
        read waits until then; the connection is dropped after a None)."""
        assert self.sock is not None
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            data = self.reader.read(size)
        except TimeoutError:
            return None
        return data if len(data) == size else None


class LoadClient:
    """``connections`` `LoadConnection` threads spread over the proxies, until
    ``stopping`` is set."""

    def __init__(self, options: argparse.Namespace, stopping: threading.Event) -> None:
        self.proxies = [_host_port(text) for text in options.proxy]
        self.pool = Expressions(options.start, options.key_rate, options.key_life)
        self.timeout = options.timeout
        self.records: list[tuple[float, float, int, int]] = []
        self.stopping = stopping
        first = options.first
        self.threads = [
            LoadConnection(self, (first + i) % len(self.proxies), seed=options.seed * 1000 + i)
            for i in range(options.connections)
        ]

    def run(self) -> list[tuple[float, float, int, int]]:
        for thread in self.threads:
            thread.start()
        while not self.stopping.wait(1):
            pass
        for thread in self.threads:
            thread.join(self.timeout + 1)
        return list(self.records)


def watch(admins: list[str], every: float, stopping: threading.Event, out: pathlib.Path) -> None:
    """Every ``every`` seconds, each proxy's view of the site from its
    ``/stats.json``, one JSON line per proxy, until ``stopping`` is set."""
    with out.open("w") as lines:
        while not stopping.is_set():
            tick = time.monotonic()
            for number, admin in enumerate(admins):
                try:
                    with urllib.request.urlopen(f"http://{admin}/stats.json", timeout=1) as page:
                        figures = json.load(page)
                except (OSError, ValueError) as e:
                    print(f"{admin}: {e}", file=sys.stderr, flush=True)
                    continue
                shared = figures["shared"] or {}
                sample = {
                    "t": time.monotonic(),
                    "proxy": number,
                    "servers": {s["server"]: s["up"] for s in figures["upstream"]["servers"]},
                    "nodes": shared.get("nodes", {}),
                    "upstream": figures["upstream"]["requests"],
                    **{k: shared.get(k, 0) for k in ("lookups", "hits", "timeouts", "unavailable")},
                }
                lines.write(json.dumps(sample) + "\n")
            lines.flush()
            stopping.wait(max(0.0, tick + every - time.monotonic()))


def memcached_keys(node: str, timeout: float = 5.0) -> list[str]:
    """Every key memcached ``node`` holds (``lru_crawler metadump all``)."""
    chunks = []
    with socket.create_connection(_host_port(node), timeout=timeout) as sock:
        sock.sendall(b"lru_crawler metadump all\r\n")
        while not b"".join(chunks[-2:]).endswith(b"END\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    lines = b"".join(chunks).decode("latin-1").splitlines()
    return [urllib.parse.unquote(line.split()[0][4:]) for line in lines if line.startswith("key=")]


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def agent_main(argv: list[str]) -> None:
    """``agent load``, ``agent watch``, ``agent keys``: the parts of a run
    that live inside a client host, started there by `Site.agent`. The first
    two run until SIGTERM (or ``--until``, should nobody send it)."""
    parser = argparse.ArgumentParser(prog="cluster.py agent")
    roles = parser.add_subparsers(dest="role", required=True)
    load = roles.add_parser("load")
    load.add_argument("--proxy", action="append", required=True)
    load.add_argument("--first", type=int, default=0, help="proxy of the first connection")
    load.add_argument("--connections", type=int, required=True)
    load.add_argument("--start", type=float, required=True)
    load.add_argument("--key-rate", type=float, required=True)
    load.add_argument("--key-life", type=float, required=True)
    load.add_argument("--timeout", type=float, required=True)
    load.add_argument("--seed", type=int, default=1)
    watcher = roles.add_parser("watch")
    watcher.add_argument("--admin", action="append", required=True)
    watcher.add_argument("--every", type=float, default=0.2)
    keys = roles.add_parser("keys")
    keys.add_argument("--node", action="append", required=True)
    for role in (load, watcher):
        role.add_argument("--until", type=float, required=True)
    for role in (load, watcher, keys):
        role.add_argument("--out", type=pathlib.Path, required=True)
    options = parser.parse_args(argv)
    if options.role == "keys":
        options.out.write_text(json.dumps({n: memcached_keys(n) for n in options.node}))
        return
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    timer = threading.Timer(max(0.0, options.until - time.monotonic()), stopping.set)
    timer.daemon = True
    timer.start()
    if options.role == "watch":
        watch(options.admin, options.every, stopping, options.out)
    else:
        options.out.write_text(json.dumps(LoadClient(options, stopping).run()))


# --- the phases -------------------------------------------------------------------


@dataclass
class Phase:
    """One stretch of steady load, with at most one fault: ``role``'s target
    partitioned or killed from ``cut`` until ``healed``."""

    name: str
    role: str | None = None
    how: str | None = None
    target: Daemon | None = None
    fault: str = "none"
    start: float = 0.0
    end: float = 0.0
    cut: float | None = None
    healed: float | None = None
    #: The keys the other memcached nodes held at the end of the fault.
    keys: dict[str, list[str]] = field(default_factory=dict)
    #: The next phase with a fault of the same target, if any.
    next_fault: Phase | None = None

    @property
    def target_name(self) -> str:
        """The target as the proxies' stats name it (``host:port``)."""
        assert self.target is not None
        return f"{self.target.host.address}:{self.target.port}"


def plan(names: list[str], site: Site) -> list[Phase]:
    """The phases asked for, each fault on its own target: the first server
    and node are partitioned, the second killed (the first when alone)."""
    phases = []
    for name in names:
        if name.startswith("steady"):
            phases.append(Phase(name))
            continue
        role, how = name.split("-")
        daemons = site.daemons[role]
        target = daemons[1] if how == "kill" and len(daemons) > 1 else daemons[0]
        phase = Phase(name, role, how, target)
        for earlier in phases:
            if earlier.target is phase.target and earlier.next_fault is None:
                earlier.next_fault = phase
        phases.append(phase)
    return phases


class PhaseRunner:
    """Runs phases one after another, each ``length`` seconds, its fault for
    ``fault_share`` of that; each begins where the one before ended, so that
    every request ended within the phases counts in one of them."""

    def __init__(self, site: Site, length: float, fault_share: float) -> None:
        self.site = site
        self.length = length
        self.fault_share = fault_share
        self.ended: float | None = None

    def run(self, phase: Phase) -> None:
        phase.start = self.ended or time.monotonic()
        print(f"{phase.name} ...", file=sys.stderr, flush=True)
        if phase.target is not None:
            held = self.length * self.fault_share
            self.cut(phase)
            phase.fault = self.describe(phase, held)
            _sleep_until(phase.cut + held)
            if phase.role == "memcached":
                phase.keys = self.others_keys(phase)
            self.heal(phase)
        _sleep_until(phase.start + self.length)
        phase.end = self.ended = time.monotonic()

    def cut(self, phase: Phase) -> None:
        assert phase.target is not None
        if phase.how == "partition":
            phase.target.host.cut()
        else:
            phase.target.kill()
        phase.cut = time.monotonic()

    def heal(self, phase: Phase) -> None:
        """Link up again, or the killed process started again and listening."""
        assert phase.target is not None
        if phase.how == "partition":
            phase.target.host.heal()
        else:
            phase.target.start()
            phase.target.wait_listening()
        phase.healed = time.monotonic()

    @staticmethod
    def describe(phase: Phase, held: float) -> str:
        what = f"{phase.role} {phase.target_name}"
        if phase.how == "partition":
            return f"partition: {what} cut off (link down) for {held:.1f} s"
        return f"kill: {what} killed (SIGKILL), restarted after {held:.1f} s"

    def others_keys(self, phase: Phase) -> dict[str, list[str]]:
        """The keys every other memcached node holds, read from a client host."""
        nodes = [n for n in self.site.node_names() if n != phase.target_name]
        if not nodes:
            return {}
        out = self.site.workdir / f"keys-{phase.name}.json"
        argv = ["keys", *[a for n in nodes for a in ("--node", n)]]
        agent = self.site.agent(self.site.hosts["client"][0], *argv, out=out)
        try:
            failed = agent.wait(30)
        except subprocess.TimeoutExpired:
            failed = True
        if failed:
            raise StepError("reading the memcached nodes' keys failed (c1-keys.log)")
        return json.loads(out.read_text())


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


# --- the report -----------------------------------------------------------------


#: Our memcached keys: ``<prefix><generation>:<sha256 hex of the proxy's key>``.
_ENTRY_KEY = re.compile(r".*?\d+:([0-9a-f]{64})$")


@dataclass
class Report:
    """What the load clients and the watcher saw, cut into phases. A request
    belongs to the phase in which it ended: one in flight on a server when
    its link is cut counts with the partition."""

    phases: list[Phase]
    records: list[tuple[float, float, int, int]]
    samples: list[dict[str, Any]]
    nodes: list[str]

    def __post_init__(self) -> None:
        self.records.sort(key=lambda r: r[0] + r[1])
        self.ends = [started + took for started, took, _, _ in self.records]
        self.by_proxy: dict[int, list[dict[str, Any]]] = {}
        for sample in self.samples:
            self.by_proxy.setdefault(sample["proxy"], []).append(sample)

    def during(self, start: float, end: float) -> list[tuple[float, float, int, int]]:
        """The requests that ended from ``start`` until ``end``."""
        first, last = (bisect.bisect_left(self.ends, t) for t in (start, end))
        return self.records[first:last]

    def phase(self, phase: Phase) -> dict[str, Any]:
        row: dict[str, Any] = {
            "name": phase.name,
            "fault": phase.fault,
            **self.answers(self.during(phase.start, phase.end)),
            "shared_hits": self.grown(phase.start, phase.end, "hits"),
            "to_servers": self.grown(phase.start, phase.end, "upstream"),
            "recovered_s": self.recovery(phase),
        }
        if phase.role == "memcached":
            row.update(self.moved(phase))
        return row

    @staticmethod
    def answers(records: list[tuple[float, float, int, int]]) -> dict[str, Any]:
        """How many requests, how they ended, and how long the answered took."""
        outcomes = [r[2] for r in records]
        answered = sorted(r[1] for r in records if r[2] != UNANSWERED)
        return {
            "requests": len(records),
            "wrong": outcomes.count(WRONG),
            "unanswered": outcomes.count(UNANSWERED),
            "errors_500": outcomes.count(ERROR_500),
            "p50_ms": _ms(_percentile(answered, 0.50)),
            "p99_ms": _ms(_percentile(answered, 0.99)),
            "max_ms": _ms(answered[-1] if answered else None),
        }

    def grown(self, start: float, end: float, *counters: str) -> int:
        """How much ``counters`` grew over every proxy between two moments."""
        total = 0
        for mine in self.by_proxy.values():
            first, last = _at(mine, start), _at(mine, end)
            if first is not None and last is not None:
                total += sum(last[c] - first[c] for c in counters)
        return total

    def recovery(self, phase: Phase) -> float | None:
        """Seconds from healing until every proxy has the target in use again
        (as long as it stays so, up to the next fault of the same target) and
        no client of the phase sees an error; None when the proxies had not
        taken the target back by then."""
        if phase.healed is None:
            return None
        healed, name = phase.healed, phase.target_name
        horizon = phase.next_fault.cut if phase.next_fault is not None else None
        back = healed
        for mine in self.by_proxy.values():
            states = [
                (s["t"], _in_use(s, phase.role, name))
                for s in mine
                if healed <= s["t"] and (horizon is None or s["t"] < horizon)
            ]
            if not states or not states[-1][1]:
                return None
            down = [i for i, (_, up) in enumerate(states) if not up]
            if down:
                back = max(back, states[down[-1] + 1][0])
        for started, took, outcome, _ in self.during(phase.start, phase.end):
            if outcome != OK and started + took > healed:
                back = max(back, started + took)
        return round(back - healed, 2)

    def moved(self, phase: Phase) -> dict[str, Any]:
        """For a memcached node's loss: the share of shared-tier lookups made
        meanwhile that could not use their node (those keys went to the
        servers), and the share of entries on the other nodes whose own node
        is another (what a ring that moves a lost node's keys would put there)."""
        assert phase.cut is not None and phase.healed is not None
        lookups = self.grown(phase.cut, phase.healed, "lookups")
        lost = self.grown(phase.cut, phase.healed, "timeouts", "unavailable")
        ring = Ring(self.nodes, self.nodes)
        entries = elsewhere = 0
        for node, keys in phase.keys.items():
            for key in keys:
                if (found := _ENTRY_KEY.match(key)) is not None:
                    entries += 1
                    elsewhere += ring.node_for(found.group(1).encode()) != node
        return {
            "keys_moved": round(lost / lookups, 3) if lookups else None,
            "keys_on_other_node": round(elsewhere / entries, 3) if entries else None,
        }

    def summary(self) -> dict[str, Any]:
        rows = [self.phase(p) for p in self.phases]
        every = self.during(self.phases[0].start, self.phases[-1].end)
        return {
            **self.answers(every),
            "shared_hits": sum(r["shared_hits"] for r in rows),
            "to_servers": sum(r["to_servers"] for r in rows),
            "phases": rows,
        }


def _in_use(sample: dict[str, Any], role: str | None, name: str) -> bool:
    """Whether a proxy's sample shows the server in or the node up."""
    if role == "memcached":
        return sample["nodes"].get(name) == "up"
    return any(up for server, up in sample["servers"].items() if server.split()[-1] == name)


def _at(samples: list[dict[str, Any]], moment: float) -> dict[str, Any] | None:
    """The last sample taken by ``moment`` (the first one if none was)."""
    before = [s for s in samples if s["t"] <= moment]
    return before[-1] if before else (samples[0] if samples else None)


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table, one row per phase and one in all."""
    columns = [
        ("phase", "name"),
        ("requests", "requests"),
        ("wrong", "wrong"),
        ("unanswered", "unanswered"),
        ("500s", "errors_500"),
        ("p50 ms", "p50_ms"),
        ("p99 ms", "p99_ms"),
        ("max ms", "max_ms"),
        ("shared hits", "shared_hits"),
        ("to servers", "to_servers"),
        ("recovered s", "recovered_s"),
        ("keys moved", "keys_moved"),
    ]
    total = {**summary, "name": "**total**"}
    lines = [
        "| " + " | ".join(title for title, _ in columns) + " |",
        "|---" * len(columns) + "|",
    ]
    for row in [*summary["phases"], total]:
        cells = ["-" if row.get(key) is None else f"{row[key]:,}" for _, key in columns[1:]]
        lines.append("| " + " | ".join([row["name"], *cells]) + " |")
    faults = [
        f"- {row['name']}: {row['fault']}" for row in summary["phases"] if row["fault"] != "none"
    ]
    return "\n".join([*lines, "", *faults])


# --- the run --------------------------------------------------------------------


def run(args: argparse.Namespace, site: Site) -> dict[str, Any]:
    """Build the site, load it through the phases, and say what was seen."""
    site.build(args, signed_tier_secret(site.workdir))
    phases = plan(args.phases, site)
    proxies = [f"{d.host.address}:{PROXY_PORT}" for d in site.daemons["proxy"]]
    admins = [f"{d.host.address}:{ADMIN_PORT}" for d in site.daemons["proxy"]]
    start = time.monotonic()
    until = start + args.warmup + 3 * args.duration + 60  # a net: SIGTERM stops them first
    loads = []
    for number, host in enumerate(site.hosts["client"]):
        out = site.workdir / f"load-{host.name}.json"
        argv = ["load", *[a for p in proxies for a in ("--proxy", p)]]
        argv += ["--first", str(number * args.connections), "--seed", str(number + 1)]
        argv += ["--connections", str(args.connections), "--timeout", str(args.client_timeout)]
        argv += ["--start", str(start), "--until", str(until)]
        argv += ["--key-rate", str(args.key_rate), "--key-life", str(args.key_life)]
        loads.append((site.agent(host, *argv, out=out), out))
    watched = site.workdir / "watch.jsonl"
    admin_args = [a for admin in admins for a in ("--admin", admin)]
    watcher = site.agent(
        site.hosts["client"][0], "watch", *admin_args, "--until", str(until), out=watched
    )
    _sleep_until(start + args.warmup)
    runner = PhaseRunner(site, args.duration / len(phases), args.fault_share)
    for phase in phases:
        runner.run(phase)
    records: list[tuple[float, float, int, int]] = []
    for proc, out in loads:
        proc.terminate()
        if proc.wait(args.client_timeout + 30):
            raise StepError(f"a load client failed: see the logs in {site.workdir}")
        records += [(r[0], r[1], r[2], r[3]) for r in json.loads(out.read_text())]
    watcher.terminate()
    watcher.wait(10)
    samples = [json.loads(line) for line in watched.read_text().splitlines()]
    return Report(phases, records, samples, site.node_names()).summary()


@contextmanager
def signals(handler: Any) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP handled by ``handler`` meanwhile."""
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, handler) for s in caught}
    try:
        yield
    finally:
        for s, was in previous.items():
            signal.signal(s, was)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM and SIGHUP stop the run as Ctrl-C does."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def requirements() -> str | None:
    """What this machine lacks for a run, in words; None when nothing."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("ss", "iproute2"), ("memcached", "memcached")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    if shutil.which(TWISTD) is None:
        return "twistd is not installed beside this Python: pip install . first"
    return None


def _names(text: str) -> list[str]:
    return text.split(",")


#: The options of a run: (group, option, type, default, what it sets).
OPTIONS: list[tuple[str, str, Callable[[str], Any], Any, str]] = [
    ("the site", "--proxies", int, 2, "proxy hosts"),
    ("the site", "--servers", int, 3, "calculator server hosts"),
    ("the site", "--memcached", int, 2, "memcached hosts"),
    ("the site", "--clients", int, 1, "load client hosts"),
    ("the site", "--connections", int, 16, "connections per client host"),
    ("the proxies", "--timeout", float, 2.0, "seconds a miss may take"),
    ("the proxies", "--health-interval", float, 1.0, "seconds between server probes (0: none)"),
    ("the load", "--duration", float, 40.0, "seconds of phases, in all"),
    ("the load", "--phases", _names, ",".join(PHASES), "comma-separated, run in this order"),
    ("the load", "--fault-share", float, 0.5, "share of its phase a fault lasts"),
    ("the load", "--warmup", float, 3.0, "seconds of load before the phases"),
    ("the load", "--key-rate", float, 300.0, "new expressions a second"),
    ("the load", "--key-life", float, 3.0, "seconds each expression is asked for"),
    ("the load", "--client-timeout", float, 5.0, "seconds until a request is unanswered"),
]


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups: dict[str, Any] = {}
    for group, option, kind, default, what in OPTIONS:
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        groups[group].add_argument(option, type=kind, default=default, help=f"{what} (%(default)s)")
    groups["the proxies"].add_argument(
        "--no-retry-timeouts",
        dest="retry_timeouts",
        action="store_false",
        help="leave out --retry-timeouts",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=pathlib.Path, help="write the figures here too")
    out.add_argument("--logs", type=pathlib.Path, help="keep the logs in a folder here")
    out.add_argument("--prefix", help="of the run's namespaces (default: cpx + 6 hex digits)")
    args = parser.parse_args(argv)
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"--phases: unknown {', '.join(sorted(unknown))}")
    for role, option, least in (("server", "servers", 2), ("memcached", "memcached", 1)):
        if any(p.startswith(role) for p in args.phases) and getattr(args, option) < least:
            parser.error(f"the {role} phases need --{option} {least} or more")
    if min(args.proxies, args.servers, args.memcached, args.clients, args.connections) < 1:
        parser.error("every count must be at least 1")
    if not 0 < args.fault_share < 1:
        parser.error("--fault-share must be between 0 and 1")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["agent"]:
        agent_main(argv[1:])
        return 0
    args = arguments(argv)
    missing = requirements()
    if missing:
        print(f"cluster.py: {missing}", file=sys.stderr)
        return 2
    prefix = args.prefix or f"cpx{secrets.token_hex(3)}"
    if any(name.startswith(prefix + "-") for name in namespaces()):
        print(f"cluster.py: namespaces named {prefix}-* exist already", file=sys.stderr)
        return 2
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="cluster-", dir=args.logs))
    site = Site(prefix, workdir)
    summary, failed = None, False
    print(f"site {prefix}: logs in {workdir}", file=sys.stderr, flush=True)
    try:
        with signals(_interrupt):
            summary = run(args, site)
    except KeyboardInterrupt as e:
        print(f"cluster.py: interrupted ({e or 'SIGINT'}); cleaning up", file=sys.stderr)
    except StepError as e:
        print(f"cluster.py: {e}", file=sys.stderr)
        failed = True
    finally:
        with signals(signal.SIG_IGN):  # a second Ctrl-C cannot cut the clean-up short
            site.close()
    if failed:
        print(f"cluster.py: the logs are kept in {workdir}", file=sys.stderr)
    elif args.logs is None:
        shutil.rmtree(workdir)
    if summary is None:
        return 1
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
