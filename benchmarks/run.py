#!/usr/bin/env python3
"""Benchmark the installed ``twistd cacheserver`` and ``twistd cacheproxy``
against peers, and against the load kit's C yardstick.

Builds the load kit (``benchmarks/kit``) with the system C compiler, then
prints two tables. Every run starts its services afresh, pinned to core 0,
with the kit's load generator pinned to core 1.

1. **Peers**, measured in the same run in interleaved pairs (ours, the peer,
   ours, the peer, ...): a naive threaded server and proxy in the style of
   the exercise's programs (``peers/naive_server.py``,
   ``peers/naive_proxy.py``) and the simplest Twisted server, which answers
   canned bytes (``peers/canned_twisted.py``). Each row gives the median of
   the pairs' ratios with their range, and the CPU time per request of the
   services' processes (user + system, from ``/proc``).
2. **The C yardstick**: the kit's matrix (``kit/bench.py``), our figures as
   ratios to ``kit/limit_server.c`` measured in the same run.

    python3 benchmarks/run.py                         # both tables, ~8 min
    python3 benchmarks/run.py --quick                 # the peer table from 1-second runs, ~2 min
    python3 benchmarks/run.py --tables peers --pairs 5 --duration 10   # steadier peer figures
    python3 benchmarks/run.py --workloads hits,server --tables peers   # some peer rows
    python3 benchmarks/run.py --table benchmarks/out/peers.jsonl       # a table again
    python3 benchmarks/run.py --against /tmp/old-venv                  # against another version

``--against VENV`` measures the installed version against the one
installed in another virtualenv (its ``bin/twistd``), in the peer table's
interleaved pairs: how to show that a change made a path faster or kept it
as fast.

Any other option goes to ``kit/bench.py`` (for example ``--miss-n N``).
Needs ``twistd`` on the PATH (``pip install .``), ``taskset``, ``make`` and a
C compiler. Loopback only (127.0.0.1). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
#: The load kit: loadgen.c, limit_server.c, mkframes.py, bench.py, Makefile.
KIT = os.path.join(HERE, "kit")
#: The peers' programs.
PEERS = os.path.join(HERE, "peers")
#: Frames, results and the printed tables (ignored by git).
OUT = os.path.join(HERE, "out")
SERVER = "twistd -n --pidfile= cacheserver --port {port}"
PROXY = "twistd -n --pidfile= cacheproxy --port {port} --server-port {server_port}"

sys.path.insert(0, KIT)
import bench  # noqa: E402  (the kit's runner: one fresh, pinned, measured run)


def peer_command(script: str, arguments: str) -> str:
    """The command template that runs one of the peers with this Python."""
    path = os.path.join(PEERS, script)
    return f"{shlex.quote(sys.executable)} {shlex.quote(path)} {arguments}"


NAIVE_SERVER = peer_command("naive_server.py", "--port {port}")
NAIVE_PROXY = peer_command("naive_proxy.py", "--port {port} --server-port {server_port}")
CANNED = peer_command("canned_twisted.py", "--port {port}")
CANNED_AT_ONCE = peer_command("canned_twisted.py", "--port {port} --send-at-once")


class Contender(NamedTuple):
    """What serves one side of a pair: a name, the kit's target (which
    frames, whether through a proxy) and the commands that start it."""

    name: str
    target: str
    server: str
    proxy: str | None = None


class Row(NamedTuple):
    """One line of the peer table: ours against ``peer`` by ``measure``
    (``req/s``: higher is better; ``p99``: lower is better)."""

    workload: str
    peer: Contender
    measure: str = "req/s"


class Group(NamedTuple):
    """Runs measured together: ours and each peer in turn, ``pairs`` times."""

    key: str
    connections: int
    reconnect: bool
    ours: Contender
    rows: tuple[Row, ...]


OUR_HITS = Contender("ours", "proxy-hit", SERVER, PROXY)
OUR_MISSES = Contender("ours", "proxy-allmiss", SERVER, PROXY)
OUR_SERVER = Contender("ours", "server", SERVER)
NAIVE_HITS = Contender("naive proxy", "proxy-hit", NAIVE_SERVER, NAIVE_PROXY)
CANNED_SERVER = Contender("canned Twisted", "server", CANNED)
CANNED_AT_ONCE_SERVER = Contender("canned, at once", "server", CANNED_AT_ONCE)
GROUPS = (
    Group(
        "hits",
        16,
        False,
        OUR_HITS,
        (
            Row("cache hits vs the naive threaded proxy", NAIVE_HITS),
            Row("cache hits vs the canned Twisted server", CANNED_SERVER),
            Row("cache hits vs the canned server, sendatonce:", CANNED_AT_ONCE_SERVER),
        ),
    ),
    Group(
        "hits-p99",
        128,
        False,
        OUR_HITS,
        (
            Row("hit p99 latency vs the canned Twisted server", CANNED_SERVER, "p99"),
            Row("hit p99 latency vs the canned server, sendatonce:", CANNED_AT_ONCE_SERVER, "p99"),
        ),
    ),
    Group(
        "allmiss",
        16,
        False,
        OUR_MISSES,
        (
            Row(
                "every request a miss vs the naive proxy + server",
                Contender("naive proxy", "proxy-allmiss", NAIVE_SERVER, NAIVE_PROXY),
            ),
        ),
    ),
    Group(
        "server",
        16,
        False,
        OUR_SERVER,
        (Row("our server alone vs the naive server", Contender("naive", "server", NAIVE_SERVER)),),
    ),
    Group(
        "reconnect",
        16,
        True,
        OUR_HITS,
        (Row("a new connection per request vs the naive proxy", NAIVE_HITS),),
    ),
)


def version_groups(twistd: str) -> tuple[Group, ...]:
    """Ours against another installed version of this package, started with
    its ``twistd``: every workload of the peer table, as pairs."""
    server = SERVER.replace("twistd", shlex.quote(twistd), 1)
    proxy = PROXY.replace("twistd", shlex.quote(twistd), 1)
    hits = Contender("other version", "proxy-hit", server, proxy)
    misses = Contender("other version", "proxy-allmiss", server, proxy)
    alone = Contender("other version", "server", server)
    return (
        Group("hits", 16, False, OUR_HITS, (Row("cache hits vs the other version", hits),)),
        Group(
            "hits-p99",
            128,
            False,
            OUR_HITS,
            (Row("hit p99 latency vs the other version", hits, "p99"),),
        ),
        Group(
            "allmiss",
            16,
            False,
            OUR_MISSES,
            (Row("every request a miss vs the other version", misses),),
        ),
        Group("server", 16, False, OUR_SERVER, (Row("server alone vs the other version", alone),)),
        Group(
            "reconnect",
            16,
            True,
            OUR_HITS,
            (Row("a new connection per request vs the other version", hits),),
        ),
    )


def run_pairs(group: Group, a: argparse.Namespace, frames_for: dict, sink) -> list[dict]:
    """Measure ``group``: ours, then each peer, ``a.pairs`` times over. One
    JSON line per run goes to ``sink``."""
    rows = []
    contenders = [group.ours, *(row.peer for row in group.rows)]
    for pair in range(a.pairs):
        for c in contenders:
            settings = argparse.Namespace(
                label=c.name,
                server_cmd=c.server,
                proxy_cmd=c.proxy,
                server_port=a.server_port,
                proxy_port=a.proxy_port,
                limit_port=a.limit_port,
                duration=a.duration,
                cwd=None,
            )
            r = bench.run_one(
                settings, c.target, group.connections, group.reconnect, pair, frames_for
            )
            r.update(group=group.key, contender=c.name)
            rows.append(r)
            sink.write(json.dumps(r) + "\n")
            sink.flush()
            print(
                f"{group.key:<10} pair {pair + 1}/{a.pairs} {c.name:<15} "
                f"req/s={r['req_per_s']:>9,.0f} p99={r['p99_us']}us "
                f"errors={r['errors']} status={r['status']} "
                f"cpu us/request={cpu_per_request(r, SERVICES) or 0:.1f}",
                flush=True,
            )
            time.sleep(a.pause)
    return rows


#: The processes whose CPU time a request costs: the services, not the load.
SERVICES = ("limit", "server", "proxy")


def pair_ratios(ours: list[dict], peer: list[dict], measure: str) -> list[float]:
    """Our figure over the peer's, for each pair measured (runs matched by
    their ``rep``): requests per second, or the p99 latency."""
    field = "req_per_s" if measure == "req/s" else "p99_us"
    theirs = {r["rep"]: r[field] for r in peer}
    return [r[field] / theirs[r["rep"]] for r in ours if theirs.get(r["rep"])]


def cpu_ratios(ours: list[dict], peer: list[dict]) -> list[float]:
    """The peer's CPU time per request over ours, for each pair: above 1, a
    request costs us less of a core."""
    theirs = {r["rep"]: cpu_per_request(r, SERVICES) for r in peer}
    out = []
    for r in ours:
        mine, other = cpu_per_request(r, SERVICES), theirs.get(r["rep"])
        if mine and other:
            out.append(other / mine)
    return out


def ratio_text(values: list[float]) -> str:
    """``median x [min..max]``, or ``-`` without values."""
    if not values:
        return "-"
    med, lo, hi = spread(values)
    return f"{med:.2f}x [{lo:.2f}..{hi:.2f}]" if len(values) > 1 else f"{med:.2f}x"


def figure_text(runs: list[dict], measure: str) -> str:
    """The median figure of ``runs``: requests per second or p99 latency."""
    if measure == "req/s":
        return f"{statistics.median(r['req_per_s'] for r in runs):,.0f} req/s"
    return f"{statistics.median(r['p99_us'] for r in runs):,.0f} us p99"


def cpu_text(runs: list[dict]) -> str:
    """The median CPU time per request of ``runs``' services, in us."""
    values = [v for r in runs if (v := cpu_per_request(r, SERVICES)) is not None]
    return f"{statistics.median(values):.1f}" if values else "-"


def peer_table(rows: list[dict], groups: tuple[Group, ...] = GROUPS) -> str:
    """The peer rows as a Markdown table; warns on stderr of runs with
    errors, with answers other than 200, or all-miss runs that were not."""
    for r in rows:
        if r["errors"] or set(r["status"]) != {"200"}:
            print(
                f"warning: {r['group']} / {r['contender']} pair {r['rep'] + 1}: "
                f"errors {r['errors']}, status {r['status']}",
                file=sys.stderr,
            )
        if r.get("est_miss_pct", 100) < 99.5:
            print(f"warning: {r['group']} / {r['contender']} was not all misses", file=sys.stderr)
    lines = [
        "| workload | connections | ours / peer: median [min..max] of pairs | ours | peer "
        "| CPU us per request: ours / peer | by CPU: peer's / ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for group in groups:
        runs = [r for r in rows if r.get("group") == group.key]
        ours = [r for r in runs if r["contender"] == group.ours.name]
        for row in group.rows:
            peer = [r for r in runs if r["contender"] == row.peer.name]
            if not ours or not peer:
                continue
            lower = " (lower is better)" if row.measure == "p99" else ""
            conns = f"{group.connections}{', reconnect' if group.reconnect else ''}"
            lines.append(
                f"| {row.workload}{lower} | {conns} "
                f"| {ratio_text(pair_ratios(ours, peer, row.measure))} "
                f"| {figure_text(ours, row.measure)} | {figure_text(peer, row.measure)} "
                f"| {cpu_text(ours)} / {cpu_text(peer)} "
                f"| {'-' if row.measure == 'p99' else ratio_text(cpu_ratios(ours, peer))} |"
            )
    return "\n".join(lines)


# (workload, kit target, connections, mode, what is compared, the course's
# programs' ratios to the yardstick in the kit's recorded baseline: by
# throughput (or p99) and by CPU time per request)
WORKLOADS = [
    (
        "every request a miss, through our server",
        "proxy-allmiss",
        16,
        "persistent",
        "req/s",
        0.0225,
        0.021,
    ),
    ("our server alone", "server", 16, "persistent", "req/s", 0.1461, 0.136),
    ("cache hits", "proxy-hit", 16, "persistent", "req/s", 0.3522, 0.330),
    (
        "cache hits, p99 latency at 128 connections",
        "proxy-hit",
        128,
        "persistent",
        "p99",
        2.945,
        None,
    ),
    (
        "cache hits, a new connection per request",
        "proxy-hit",
        16,
        "reconnect",
        "req/s",
        0.3741,
        0.180,
    ),
]


def load(path: str) -> list[dict]:
    """The rows of a JSON lines results file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (target, connections, mode)."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["target"], r["connections"], r["mode"]), []).append(r)
    return out


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def cpu_per_request(run: dict, processes: tuple[str, ...]) -> float | None:
    """The CPU time (user + system) that those of ``processes`` a run had
    spent together per answered request, in us; None if it had none of them.
    Steadier than throughput on a busy machine, since it leaves out the time
    a process waited for a core."""
    fields = [f for p in processes if (f := run.get(f"{p}_cpu_pct")) is not None]
    if not fields or not run["requests"]:
        return None
    return sum(fields) / 100 * run["wall_s"] / run["requests"] * 1e6


def cpu_us(runs: list[dict], process: str) -> str:
    """The median of `cpu_per_request` for one process, as text."""
    values = [v for x in runs if (v := cpu_per_request(x, (process,))) is not None]
    return f"{statistics.median(values):.0f}" if values else "-"


def cpu_ratio(runs: list[dict], limit: list[dict]) -> str:
    """The yardstick's CPU time per request over ours (server and proxy
    together): the ratio of requests per second if each had one core to
    itself, which a busy machine disturbs less than throughput."""
    ours = [v for x in runs if (v := cpu_per_request(x, ("server", "proxy"))) is not None]
    base = [v for x in limit if (v := cpu_per_request(x, ("limit",))) is not None]
    if not ours or not base:
        return "-"
    return f"{statistics.median(base) / statistics.median(ours):.3f}x"


def yardstick_table(rows: list[dict]) -> str:
    """The workloads' figures and ratios to the yardstick of the same run, as
    a Markdown table; warns on stderr when an all-miss run was not all misses."""
    by = groups(rows)
    lines = [
        "| workload | connections | ours: median [min..max] | ours / yardstick "
        "| course's / yardstick (recorded) | CPU us per request: server / proxy "
        "| by CPU: ours / yardstick | by CPU: course's (recorded) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, target, conns, mode, what, course, course_cpu in WORKLOADS:
        runs = by.get((target, conns, mode))
        limit = by.get(("limit", conns, mode))
        if not runs or not limit:
            continue
        if target == "proxy-allmiss" and any(x.get("est_miss_pct", 100) < 99.5 for x in runs):
            print(f"warning: some '{name}' runs were not all misses", file=sys.stderr)
        field = "req_per_s" if what == "req/s" else "p99_us"
        base = statistics.median(x[field] for x in limit)
        med, lo, hi = spread([x[field] for x in runs])
        unit = "req/s" if what == "req/s" else "us p99"
        ratio = spread([x[field] / base for x in runs])
        mode_text = f"{conns}" + (", reconnect" if mode == "reconnect" else "")
        lines.append(
            f"| {name} | {mode_text} | {med:,.0f}"
            f"{f' [{lo:,.0f}..{hi:,.0f}]' if len(runs) > 1 else ''} {unit} "
            f"| {ratio[0]:.3f}x"
            f"{f' [{ratio[1]:.3f}..{ratio[2]:.3f}]' if len(runs) > 1 else ''} | {course:.3f}x "
            f"| {cpu_us(runs, 'server')} / {cpu_us(runs, 'proxy')} "
            f"| {'-' if what == 'p99' else cpu_ratio(runs, limit)} "
            f"| {'-' if course_cpu is None else f'{course_cpu:.3f}x'} |"
        )
    limits = [
        f"C yardstick, {c} connections{', reconnect' if m == 'reconnect' else ''}: "
        f"{statistics.median(x['req_per_s'] for x in rs):,.0f} req/s, "
        f"p99 {statistics.median(x['p99_us'] for x in rs):,.0f} us (median of {len(rs)})"
        for (t, c, m), rs in sorted(by.items())
        if t == "limit"
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {line}" for line in limits)


def processor() -> str:
    """The processor's model name, as ``/proc/cpuinfo`` gives it: ratios to
    the C yardstick depend on it, ratios to the peers much less."""
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1] for line in f if line.startswith("model name"))
            return next(names).strip()
    except (OSError, StopIteration):
        return "unknown processor"


def context() -> str:
    """The machine and software the figures were measured on."""
    commit = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    try:
        import twisted

        twisted_version = twisted.__version__
    except ImportError:
        twisted_version = "unknown"
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{today}, commit {commit or 'unknown'}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, Twisted {twisted_version}, "
        f"{platform.system()} {platform.release()}"
    )


def tables(rows: list[dict], groups: tuple[Group, ...] = GROUPS) -> str:
    """The peer table and the yardstick table of ``rows``, each under a
    heading that names the processor it was measured on."""
    cpu = processor()
    peers = [r for r in rows if "group" in r]
    rest = [r for r in rows if "group" not in r]
    out = []
    if peers:
        against = "another version" if groups is not GROUPS else "peers"
        out.append(f"Ours against {against}, on {cpu}:\n\n{peer_table(peers, groups)}")
    if rest:
        out.append(f"Ours against the C yardstick, on {cpu}:\n\n{yardstick_table(rest)}")
    return "\n\n".join(out)


def prepare_kit() -> None:
    """Build the load generator and the yardstick server (``make``)."""
    subprocess.run(["make", "-s", "-C", KIT], check=True)


def measure_peers(a: argparse.Namespace, groups: tuple[Group, ...], path: str) -> list[dict]:
    """Run the ``groups`` that ``a.workloads`` names; their rows, also in ``path``."""
    chosen = [g for g in groups if g.key in a.workloads.split(",")]
    targets = {c.target for g in chosen for c in (g.ours, *(r.peer for r in g.rows))}
    for port in (a.server_port, a.proxy_port):
        if not bench.port_free(port):
            sys.exit(f"port {port} is in use; pick others with --server-port and --proxy-port")
    frames_for = bench.make_frames(a.work, targets, a.duration)
    rows = []
    with open(path, "w") as sink:
        for group in chosen:
            rows += run_pairs(group, a, frames_for, sink)
    if "proxy-allmiss" in frames_for:
        os.remove(frames_for["proxy-allmiss"])  # ~38 MB, made again from its seed
    return rows


def measure_yardstick(a: argparse.Namespace, extra: list[str], path: str) -> list[dict]:
    """Run the kit's matrix (``kit/bench.py``); its rows, also in ``path``."""
    if os.path.exists(path):
        os.remove(path)
    command = [sys.executable, os.path.join(KIT, "bench.py"), "--label", "twisted-cacheproxy"]
    command += ["--server-cmd", SERVER, "--proxy-cmd", PROXY, "--targets", a.targets]
    command += ["--duration", str(a.duration), "--reps", str(a.reps)]
    command += ["--server-port", str(a.server_port), "--proxy-port", str(a.proxy_port)]
    command += ["--limit-port", str(a.limit_port)]
    command += ["--work", a.work, "--out", path, *extra]
    subprocess.run(command, check=True)
    return load(path)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tables", default="peers,yardstick", help="which tables to measure")
    ap.add_argument("--quick", action="store_true", help="the peer table only, 1-s runs, 2 pairs")
    ap.add_argument("--duration", type=float, default=3, help="seconds per run")
    ap.add_argument("--pairs", type=int, default=3, help="pairs of runs per peer workload")
    ap.add_argument("--workloads", default=",".join(g.key for g in GROUPS), help="peer rows")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between peer runs")
    ap.add_argument("--reps", type=int, default=3, help="yardstick: runs of each 16-connection one")
    ap.add_argument("--targets", default="limit,server,proxy-hit,proxy-allmiss", help="yardstick")
    ap.add_argument("--server-port", type=int, default=29999)
    ap.add_argument("--proxy-port", type=int, default=29998)
    ap.add_argument("--limit-port", type=int, default=29997)
    ap.add_argument("--work", default=OUT, help="where frames, results and tables go")
    ap.add_argument("--table", metavar="JSONL", nargs="+", help="only print tables of a run")
    ap.add_argument("--against", metavar="VENV", help="ours against the version installed there")
    a, extra = ap.parse_known_args()
    if a.quick or a.against:
        ap.set_defaults(tables="peers")
    if a.quick:
        ap.set_defaults(duration=1.0, pairs=2)
    a, extra = ap.parse_known_args()
    groups = GROUPS
    if a.against:
        other = os.path.join(a.against, "bin", "twistd")
        if not os.access(other, os.X_OK):
            sys.exit(f"--against: no twistd in {a.against}/bin (a virtualenv with the package)")
        groups = version_groups(other)
    if a.table:
        print(tables([row for path in a.table for row in load(path)], groups))
        return 0
    for tool in ("twistd", "taskset", "make"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool} on the PATH (twistd: pip install .; taskset: util-linux)")
    prepare_kit()
    os.makedirs(a.work, exist_ok=True)
    rows = []
    if "peers" in a.tables:
        rows += measure_peers(a, groups, os.path.join(a.work, "peers.jsonl"))
    if "yardstick" in a.tables:
        rows += measure_yardstick(a, extra, os.path.join(a.work, "results.jsonl"))
    report = f"Run: {context()}\nProcessor: {processor()}\n\n{tables(rows, groups)}\n"
    with open(os.path.join(a.work, "table.md"), "w") as f:
        f.write(report)
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
