"""All misses through the proxy with one server, two servers, one server
of two workers, and two proxy workers sharing memcached, with the CPU time
each request costs; then the time from a server's death to the moment the
proxy stops sending to it.

    python3 benchmarks/several_servers.py [--duration 5] [--conns 16]

It builds the load kit (``make``) and 100,000 distinct frames
(``mkframes.py --random 100000``) so that every request is a miss, unless
``--loadgen`` and ``--frames`` name others; every process is started fresh
per run, on 127.0.0.1. The proxy-workers row needs ``memcached`` on the PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")
TWISTD = str(pathlib.Path(sys.executable).with_name("twistd"))
KIT = pathlib.Path(__file__).resolve().parent / "kit"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def accepting(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def start(log: pathlib.Path, *args: str) -> subprocess.Popen:
    port = int(args[args.index("--port") + 1])
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", f"--logfile={log}", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 15
    while not accepting(port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"{args} did not start: {log.read_text()}")
        time.sleep(0.05)
    time.sleep(0.3)  # workers adopting the socket
    return proc


def family(pid: int) -> list[int]:
    """``pid`` and its children."""
    try:
        kids = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return [pid, *map(int, kids)]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def memcached() -> tuple[subprocess.Popen, int] | None:
    """A fresh memcached on a free port of 127.0.0.1 and the port, or None
    if memcached is not installed."""
    binary = shutil.which("memcached")
    if binary is None:
        return None
    port = free_port()
    command = [binary, "-l", HOST, "-p", str(port), "-U", "0", "-m", "64"]
    proc = subprocess.Popen(command + (["-u", "root"] if os.geteuid() == 0 else []))
    deadline = time.monotonic() + 10
    while not accepting(port):
        if time.monotonic() > deadline:
            raise SystemExit("memcached did not start")
        time.sleep(0.02)
    return proc, port


def run(
    name: str,
    args,
    tmp: pathlib.Path,
    servers: list[list[str]],
    proxy: list[str] | None,
) -> dict:
    """One configuration: ``servers`` (the options of each), and a proxy in
    front of them with the options ``proxy`` (None: load the first server)."""
    procs, ports = [], []
    for i, extra in enumerate(servers):
        port = free_port()
        ports.append(port)
        procs.append(start(tmp / f"{name}-s{i}.log", "cacheserver", "--port", str(port), *extra))
    target = ports[0]
    if proxy is not None:
        target = free_port()
        options = [a for port in ports for a in ("--server", f"{HOST}:{port}")] + proxy
        procs.append(start(tmp / f"{name}-p.log", "cacheproxy", "--port", str(target), *options))
    pids = [pid for p in procs for pid in family(p.pid)]
    before = cpu_seconds(pids)
    out = subprocess.run(
        [args.loadgen, HOST, str(target), str(args.conns), str(args.duration), args.frames],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    used = cpu_seconds(pids) - before
    stop(procs)
    result = json.loads(out.strip().splitlines()[-1])
    requests = result["requests"]
    return {
        "name": name,
        "req_per_s": round(result["req_per_s"]),
        "p50_us": result["p50_us"],
        "p99_us": result["p99_us"],
        "errors": result["errors"],
        "non_200": sum(v for k, v in result["status"].items() if k != "200"),
        "cpu_us_per_request": round(used / requests * 1e6) if requests else None,
    }


def failover(tmp: pathlib.Path, reps: int) -> list[dict]:
    """Kill one of two servers while one client sends misses in lockstep:
    how long until the proxy takes it out (its log line, polled every 2 ms),
    and the slowest request across the kill."""
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
    from twisted_cacheproxy.transport import wire

    found = []
    for rep in range(reps):
        ports = [free_port(), free_port()]
        servers = [
            start(tmp / f"f{rep}-s{i}.log", "cacheserver", "--port", str(p))
            for i, p in enumerate(ports)
        ]
        proxy_port = free_port()
        log = tmp / f"f{rep}-p.log"
        options = [a for port in ports for a in ("--server", f"{HOST}:{port}")]
        proxy = start(log, "cacheproxy", "--port", str(proxy_port), *options)
        sock = socket.create_connection((HOST, proxy_port))
        k, slowest, killed, out_at = 0, 0.0, None, None
        try:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                k += 1
                started = time.monotonic()
                frame = wire.encode(
                    int(time.time()), wire.make_flags(request=True), 0, f"{rep}+{k}".encode()
                )
                sock.sendall(frame)
                answer = sock.recv(4096)
                took = time.monotonic() - started
                assert answer[6:8] and wire.decode_header(answer).status == 200, answer
                if killed is None and k == 200:
                    servers[0].send_signal(signal.SIGKILL)
                    killed = time.monotonic()
                elif killed is not None:
                    slowest = max(slowest, took)
                    if out_at is None and "taken out" in log.read_text():
                        out_at = time.monotonic()
        finally:
            sock.close()
            stop([proxy, *servers])
        found.append(
            {
                "death_to_ejection_ms": round((out_at - killed) * 1000, 1) if out_at else None,
                "slowest_request_after_death_ms": round(slowest * 1000, 2),
            }
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loadgen", help="default: benchmarks/kit/loadgen, built with make")
    parser.add_argument("--frames", help="default: 100,000 distinct frames made by mkframes.py")
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--conns", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        if args.loadgen is None:
            subprocess.run(["make", "-s", "-C", KIT], check=True)
            args.loadgen = str(KIT / "loadgen")
        if args.frames is None:
            args.frames = str(tmp / "misses.bin")
            mkframes = [sys.executable, str(KIT / "mkframes.py"), "-o", args.frames]
            subprocess.run([*mkframes, "--random", "100000", "--seed", "1"], check=True)
        configurations: list[tuple[str, list[list[str]], list[str] | None]] = [
            ("server, 1 process", [[]], None),
            ("server, --workers 2", [["--workers", "2"]], None),
            ("proxy, 1 server (all misses)", [[]], []),
            ("proxy, 2 servers (all misses)", [[], []], []),
            ("proxy, 1 server of --workers 2 (all misses)", [["--workers", "2"]], []),
        ]
        shared = memcached()
        if shared is None:
            print("memcached not found: no row for the proxy's workers", file=sys.stderr)
        else:
            nodes = ["--memcached", f"{HOST}:{shared[1]}"]
            configurations.append(
                (
                    "proxy --workers 2 with memcached, 1 server of --workers 2 (all misses)",
                    [["--workers", "2"]],
                    ["--workers", "2", *nodes],
                )
            )
        try:
            for name, servers, proxy in configurations:
                print(json.dumps(run(name, args, tmp, servers, proxy)), flush=True)
        finally:
            if shared is not None:
                stop([shared[0]])
        for row in failover(tmp, 3):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
