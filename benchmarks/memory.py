#!/usr/bin/env python3
"""Memory figures of the installed proxy: 10,000 idle client connections;
1,000,000 requests over 150,000 distinct keys with ``--cache-size 16M`` (RSS
flat); and the RSS growth against ``--cache-size`` (16M and 64M) after
300,000 distinct tiny answers (``N + 0``), the cache's worst case.

    python3 benchmarks/memory.py                          # all three, ~10 min
    python3 benchmarks/memory.py --connections 2000 --requests 100000
    python3 benchmarks/memory.py --only bound --tiny 300000

Uses the load kit in benchmarks/kit (built here with ``make`` when needed).
Loopback only; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench

from twisted_cacheproxy.transport import wire

SERVER_PORT, PROXY_PORT = 29989, 29988


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def start(command: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["taskset", "-c", "0", *shlex.split(command)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def services(cache_size: str, *options: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    server = start(f"twistd -n --pidfile= cacheserver --port {SERVER_PORT}")
    wait_port(SERVER_PORT)
    proxy = start(
        f"twistd -n --pidfile= cacheproxy --port {PROXY_PORT} --server-port {SERVER_PORT} "
        f"--cache-size {cache_size} {' '.join(options)}"
    )
    wait_port(PROXY_PORT)
    return server, proxy


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=10)


def idle_connections(count: int) -> dict:
    """Open ``count`` connections to the proxy, check a sample is served, report RSS."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 1000
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, max(hard, want)), max(hard, want)))
    server, proxy = services("64M")
    try:
        before = rss_kb(proxy.pid)
        socks = []
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", PROXY_PORT), timeout=5))
        time.sleep(2)
        held = rss_kb(proxy.pid)
        frame = wire.encode(0, wire.make_flags(request=True, cache=True), wire.FOREVER, b"6 * 7")
        served = 0
        for s in socks[:: max(1, count // 50)]:
            s.sendall(frame)
            served += len(s.recv(4096)) > 12
        for s in socks:
            s.close()
        return {
            "connections": count,
            "proxy_rss_mb_before": round(before / 1024, 1),
            "proxy_rss_mb_with_connections": round(held / 1024, 1),
            "per_connection_kb": round((held - before) / count, 2),
            "sampled_connections_answered": served,
        }
    finally:
        stop(proxy, server)


def many_keys(requests: int, keys: int) -> dict:
    """Drive ``requests`` requests over ``keys`` distinct expressions through a
    proxy with a 16 MB cache, sampling its RSS."""
    kit = bench.KIT
    if not os.path.exists(os.path.join(kit, "loadgen")):
        bench.prepare_kit()
    os.makedirs(bench.OUT, exist_ok=True)
    frames = os.path.join(bench.OUT, f"random{keys}.bin")
    if not os.path.exists(frames):
        subprocess.run(
            [
                sys.executable,
                os.path.join(kit, "mkframes.py"),
                "-o",
                frames,
                "--random",
                str(keys),
                "--seed",
                "3",
            ],
            check=True,
        )
    server, proxy = services("16M")
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.time()
        while not done.is_set():
            samples.append((round(time.time() - t0, 1), rss_kb(proxy.pid)))
            done.wait(2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    total = 0
    started = time.time()
    try:
        while total < requests and time.time() - started < 600:
            out = subprocess.run(
                [
                    "taskset",
                    "-c",
                    "1",
                    os.path.join(kit, "loadgen"),
                    "127.0.0.1",
                    str(PROXY_PORT),
                    "16",
                    "60",
                    frames,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            run = json.loads(out.stdout.strip().splitlines()[-1])
            total += run["requests"]
            if run["errors"]:
                print("loadgen errors:", run["error_kinds"], file=sys.stderr)
    finally:
        done.set()
        sampler.join()
        stop(proxy, server)
    rss = [kb for _, kb in samples]
    half = rss[len(rss) // 2 :]
    return {
        "requests": total,
        "distinct_keys": keys,
        "seconds": round(time.time() - started, 1),
        "rss_mb_first_sample": round(rss[0] / 1024, 1),
        "rss_mb_max": round(max(rss) / 1024, 1),
        "rss_mb_second_half_min_max": [round(min(half) / 1024, 1), round(max(half) / 1024, 1)],
        "rss_mb_samples": [round(kb / 1024, 1) for kb in rss[:: max(1, len(rss) // 20)]],
    }


def ask_all(socks: list[socket.socket], frames: list[bytes], batch: int = 32) -> int:
    """Send ``frames`` spread over ``socks``, ``batch`` pipelined requests at
    a time on each (below the proxy's 64 awaited answers per client); the
    number of 200 answers."""
    ok = 0
    step = batch * len(socks)
    for start_at in range(0, len(frames), step):
        chunk = frames[start_at : start_at + step]
        shares = [chunk[i :: len(socks)] for i in range(len(socks))]
        for s, share in zip(socks, shares, strict=True):
            s.sendall(b"".join(share))
        for s, share in zip(socks, shares, strict=True):
            buffer = b""
            for _ in share:
                while len(buffer) < 12 or len(buffer) < wire.decode_header(buffer).length:
                    data = s.recv(65536)
                    if not data:
                        raise SystemExit("the proxy closed a connection")
                    buffer += data
                header = wire.decode_header(buffer)
                ok += header.status == wire.OK
                buffer = buffer[header.length :]
    return ok


def tiny_answers(cache_size: str, count: int) -> dict:
    """RSS growth of a proxy with ``--cache-size cache_size`` after ``count``
    distinct tiny requests (``N + 0``: about 60 bytes of answer each), the
    cache's worst case, since each entry's fixed overhead is most of its
    cost. The baseline is taken after 2,000 uncacheable (C=0) requests, so
    that what the request path itself allocates is in it."""
    admin = PROXY_PORT + 2
    server, proxy = services(cache_size, f"--admin-port {admin}")
    try:
        socks = [socket.create_connection(("127.0.0.1", PROXY_PORT), timeout=30) for _ in range(4)]
        flags = wire.make_flags(request=True, cache=True, steps=True)
        no_cache = wire.make_flags(request=True, cache=False, steps=True)
        warm = [wire.encode(0, no_cache, 0, b"%d + 1" % i) for i in range(2000)]
        ask_all(socks, warm)
        time.sleep(1)
        before = rss_kb(proxy.pid)
        started = time.time()
        frames = [wire.encode(0, flags, wire.FOREVER, b"%d + 0" % i) for i in range(count)]
        answered = ask_all(socks, frames)
        seconds = time.time() - started
        time.sleep(1)
        after = rss_kb(proxy.pid)
        for s in socks:
            s.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats.json", timeout=10) as r:
            cache = json.load(r)["cache"]
    finally:
        stop(proxy, server)
    growth = (after - before) * 1024
    bound = cache["capacity_bytes"]
    return {
        "cache_size": cache_size,
        "tiny_requests": count,
        "answered_200": answered,
        "seconds": round(seconds, 1),
        "entries": cache["entries"],
        "charged_bytes": cache["bytes"],
        "charged_per_entry": round(cache["bytes"] / cache["entries"]),
        "rss_mb_before": round(before / 1024, 1),
        "rss_mb_after": round(after / 1024, 1),
        "rss_growth_per_entry": round(growth / cache["entries"]),
        "rss_growth_over_cache_size": round(growth / bound, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--keys", type=int, default=150_000)
    ap.add_argument("--tiny", type=int, default=300_000, help="distinct tiny answers")
    ap.add_argument("--sizes", default="16M,64M", help="--cache-size values for the bound")
    ap.add_argument("--only", choices=("connections", "keys", "bound"))
    a = ap.parse_args()
    if a.only in (None, "connections"):
        print(json.dumps(idle_connections(a.connections)), flush=True)
    if a.only in (None, "keys"):
        print(json.dumps(many_keys(a.requests, a.keys)), flush=True)
    if a.only in (None, "bound"):
        for size in a.sizes.split(","):
            print(json.dumps(tiny_answers(size, a.tiny)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
