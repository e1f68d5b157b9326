#!/usr/bin/env python3
"""Benchmark the shared cache tier (memcached) with the shared load kit.

Runs, with fresh processes, the proxy on core 0 and the load generator,
memcached and our server on core 1 (127.0.0.1 only):

- the C yardstick server, 16 connections (the ratios' denominator);
- hits served from L2: 5,000 distinct expressions through a proxy whose
  ``--cache-size 64K`` holds about a hundred of them, so nearly every request
  is an L1 miss answered by memcached; beside it, the same frames through a
  proxy whose L1 holds them all;
- what an L2 lookup adds to a miss: every request a miss, one connection
  and 16, without ``--memcached``, with it, and with it and
  ``--memcached-lock-wait`` (one more round trip per miss).

    python3 benchmarks/shared_tier.py                 # ~3 min
    python3 benchmarks/shared_tier.py --duration 3 --reps 1

Needs ``pip install .``, memcached, taskset and a C compiler. Not part of
the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import KIT, OUT, prepare_kit

HOST = "127.0.0.1"
LIMIT_PORT, SERVER_PORT, PROXY_PORT, MEMCACHED_PORT = 29987, 29989, 29988, 29986


def free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) != 0


def wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 15
    while free(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"nothing listens on {port}")
        time.sleep(0.05)


def start(core: int, *command: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["taskset", "-c", str(core), *command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def loadgen(port: int, conns: int, duration: float, frames: str) -> dict:
    command = ["taskset", "-c", "1", os.path.join(KIT, "loadgen"), HOST, str(port)]
    out = subprocess.run(
        [*command, str(conns), str(duration), frames],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memcached_stats() -> dict[str, int]:
    with socket.create_connection((HOST, MEMCACHED_PORT), timeout=5) as s:
        s.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            data += s.recv(65536)
    stats = {}
    for line in data.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "STAT" and parts[2].isdigit():
            stats[parts[1]] = int(parts[2])
    return stats


def proxy(*extra: str) -> subprocess.Popen:
    command = ["twistd", "-n", "--pidfile=", "--logfile=/dev/null", "cacheproxy"]
    command += ["--port", str(PROXY_PORT), "--server-port", str(SERVER_PORT), *extra]
    return start(0, *command, port=PROXY_PORT)


def memcached() -> subprocess.Popen:
    command = ["memcached", "-l", HOST, "-p", str(MEMCACHED_PORT), "-U", "0", "-t", "1"]
    command += ["-m", "64"]
    if os.geteuid() == 0:
        command += ["-u", "root"]
    return start(1, *command, port=MEMCACHED_PORT)


def row(name: str, runs: list[dict], limit: float | None) -> dict:
    rates = [r["req_per_s"] for r in runs]
    best = sorted(runs, key=lambda r: r["req_per_s"])[len(runs) // 2]
    median = statistics.median(rates)
    result = {
        "name": name,
        "req_per_s": round(median),
        "min": round(min(rates)),
        "max": round(max(rates)),
        "p50_us": best["p50_us"],
        "p99_us": best["p99_us"],
        "errors": sum(r.get("errors", 0) for r in runs),
        "ratio": round(median / limit, 3) if limit else None,
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    for tool in ("twistd", "taskset", "memcached"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool}")
    for port in (LIMIT_PORT, SERVER_PORT, PROXY_PORT, MEMCACHED_PORT):
        if not free(port):
            sys.exit(f"port {port} is in use")
    prepare_kit()
    frames = os.path.join(OUT, "frames")
    os.makedirs(frames, exist_ok=True)
    work, misses = os.path.join(frames, "work5000.bin"), os.path.join(frames, "miss.bin")
    mk = [sys.executable, os.path.join(KIT, "mkframes.py")]
    subprocess.run([*mk, "-o", work, "--random", "5000", "--seed", "7"], check=True)
    subprocess.run([*mk, "-o", misses, "--random", "200000", "--seed", "9"], check=True)
    d, reps = a.duration, a.reps
    rows = []

    limit_server = start(0, os.path.join(KIT, "limit_server"), str(LIMIT_PORT), port=LIMIT_PORT)
    try:
        limit = row("C yardstick", [loadgen(LIMIT_PORT, 16, d, work) for _ in range(reps)], None)
    finally:
        stop(limit_server)
    yard = limit["req_per_s"]
    rows.append(limit)

    server = start(1, "twistd", "-n", "--pidfile=", "--logfile=/dev/null", "cacheserver",
                   "--port", str(SERVER_PORT), port=SERVER_PORT)  # fmt: skip
    try:
        # L1 holding the whole working set: L1 hits, for comparison.
        p = proxy()
        try:
            loadgen(PROXY_PORT, 16, 3, work)  # warm
            rows.append(row("L1 hits (64M L1)", [loadgen(PROXY_PORT, 16, d, work)], yard))
        finally:
            stop(p)
        # A tiny L1: nearly every request an L1 miss answered by memcached.
        mc = memcached()
        try:
            p = proxy("--cache-size", "64K", "--memcached", f"{HOST}:{MEMCACHED_PORT}")
            try:
                loadgen(PROXY_PORT, 16, 3, work)  # warm memcached
                before = memcached_stats()
                runs = [loadgen(PROXY_PORT, 16, d, work) for _ in range(reps)]
                after = memcached_stats()
                r = row("L2 hits (64K L1 + memcached)", runs, yard)
                served = sum(x["requests"] for x in runs)
                lookups = (after["cmd_get"] - before["cmd_get"]) // 2  # gen key + entry
                data_hits = after["get_hits"] - before["get_hits"] - lookups
                stored = after["cmd_set"] - before["cmd_set"]
                r["l2_share"] = round(data_hits / served, 3)
                r["server_share"] = round(stored / served, 4)
                print(json.dumps(r), flush=True)
                rows.append(r)
            finally:
                stop(p)
            # Every request a miss: with and without the L2 lookup before the server.
            for conns in (1, 16):
                node = ("--memcached", f"{HOST}:{MEMCACHED_PORT}")
                for name, extra in (
                    ("misses, no memcached", ()),
                    ("misses, L2 lookup first", node),
                    ("misses, L2 lookup and lock", (*node, "--memcached-lock-wait", "100")),
                ):
                    runs = []
                    for _ in range(reps):
                        # Fresh every time: an empty L1, and an empty L2 under a new prefix.
                        p = proxy(*extra, "--memcached-prefix", f"run{time.time_ns()}:")
                        try:
                            runs.append(loadgen(PROXY_PORT, conns, d, misses))
                        finally:
                            stop(p)
                    rows.append(row(f"{name}, {conns} connection(s)", runs, yard))
        finally:
            stop(mc)
    finally:
        stop(server)
    with open(os.path.join(OUT, "shared_tier.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
