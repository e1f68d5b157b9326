#!/usr/bin/env python3
"""Benchmark the installed ``twistd cacheserver`` and ``twistd cacheproxy``
with this repository's load kit (``benchmarks/kit``).

Builds the kit with the system C compiler (``make``), then runs its matrix
(``kit/bench.py``): every target started fresh for each run and pinned to
core 0, the load generator pinned to core 1, the 16-connection runs repeated.
Prints, for each workload, our figure as median [min..max] of the repeated
runs and as a ratio to the kit's C yardstick server measured in the same run,
beside the course's threaded proxy and server from the kit's recorded
baseline on a machine of the same kind.

    python3 benchmarks/run.py                                 # ~4 min
    python3 benchmarks/run.py --duration 10 --reps 5          # steadier figures
    python3 benchmarks/run.py --targets limit,proxy-hit       # a part of the matrix
    python3 benchmarks/run.py --table benchmarks/out/results.jsonl   # table only

Any other option goes to ``kit/bench.py`` (for example ``--server-port N``).
Needs ``twistd`` on the PATH (``pip install .``), ``taskset``, ``make`` and a
C compiler. Loopback only (127.0.0.1). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
#: The load kit: loadgen.c, limit_server.c, mkframes.py, bench.py, Makefile.
KIT = os.path.join(HERE, "kit")
#: Frames, results and the printed table (ignored by git).
OUT = os.path.join(HERE, "out")
SERVER = "twistd -n --pidfile= cacheserver --port {port}"
PROXY = "twistd -n --pidfile= cacheproxy --port {port} --server-port {server_port}"

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
    """The CPU time ``processes`` together spent per answered request in one
    run, in us: steadier than throughput on a busy machine, since it leaves
    out the time a process waited for a core."""
    fields = [run.get(f"{p}_cpu_pct") for p in processes]
    if any(f is None for f in fields) or not run["requests"]:
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
    if not ours:
        ours = [v for x in runs if (v := cpu_per_request(x, ("server",))) is not None]
    base = [v for x in limit if (v := cpu_per_request(x, ("limit",))) is not None]
    if not ours or not base:
        return "-"
    return f"{statistics.median(base) / statistics.median(ours):.3f}x"


def table(rows: list[dict]) -> str:
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


def context() -> str:
    """The machine and software the figures were measured on."""
    commit = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import twisted

        twisted_version = twisted.__version__
    except ImportError:
        twisted_version = "unknown"
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{today}, commit {commit or 'unknown'}, {os.cpu_count()} cores ({cpu}), "
        f"Python {platform.python_version()}, Twisted {twisted_version}, "
        f"{platform.system()} {platform.release()}"
    )


def prepare_kit() -> None:
    """Build the load generator and the yardstick server (``make``)."""
    subprocess.run(["make", "-s", "-C", KIT], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=3, help="seconds per run")
    ap.add_argument("--reps", type=int, default=3, help="runs of each 16-connection workload")
    ap.add_argument("--targets", default="limit,server,proxy-hit,proxy-allmiss")
    ap.add_argument("--table", metavar="JSONL", help="only print the table of an earlier run")
    a, extra = ap.parse_known_args()
    if a.table:
        print(table(load(a.table)))
        return 0
    for tool in ("twistd", "taskset", "make"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool} on the PATH (twistd: pip install .; taskset: util-linux)")
    prepare_kit()
    os.makedirs(OUT, exist_ok=True)
    results = os.path.join(OUT, "results.jsonl")
    if os.path.exists(results):
        os.remove(results)
    command = [sys.executable, os.path.join(KIT, "bench.py"), "--label", "twisted-cacheproxy"]
    command += ["--server-cmd", SERVER, "--proxy-cmd", PROXY, "--targets", a.targets]
    command += ["--duration", str(a.duration), "--reps", str(a.reps)]
    command += ["--work", OUT, "--out", results, *extra]
    subprocess.run(command, check=True)
    report = f"Run: {context()}\n\n{table(load(results))}\n"
    with open(os.path.join(OUT, "table.md"), "w") as f:
        f.write(report)
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
