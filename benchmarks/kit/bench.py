#!/usr/bin/env python3
"""Run the benchmark matrix: start each target pinned to core 0, drive it with
loadgen pinned to core 1, record one JSON line per run, print a summary.
``benchmarks/run.py`` drives this script for the installed services; it can
also be run by hand, for any server and proxy that speak the protocol.

Every run gets freshly started target processes (empty proxy cache), which
are stopped afterwards by their own PIDs.  Servers' stdout/stderr go to
/dev/null.  Only 127.0.0.1 is used.

  python3 bench.py --label mine \
      --server-cmd "twistd -n --pidfile= cacheserver --port {port}" \
      --proxy-cmd "twistd -n --pidfile= cacheproxy --port {port} --server-port {server_port}"
  python3 bench.py --targets limit --duration 3 --reps 1
  python3 bench.py --ref DIR --label reference   # a server.py/proxy.py pair in the course's style
  python3 bench.py --summary results.jsonl   # only print the table of an earlier run

Frames and results go to ``--work DIR`` (default: ``benchmarks/out`` beside
this directory).

Command templates are split like a shell line (shlex) and may use {port}
(where the target must listen) and {server_port} (the proxy's upstream).
"""

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(os.path.dirname(HERE), "out")
HEADER = struct.Struct("!LHHHxx")
TICK = os.sysconf("SC_CLK_TCK")
TARGETS = ("limit", "server", "proxy-hit", "proxy-miss", "proxy-allmiss")
#: proxy-allmiss frames: twice the misses a second one core makes, for every
#: second of a run, so that no run comes round to a frame it already sent.
ALLMISS_PER_S = 25_000
ALLMISS_MIN = 100_000


def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except OSError:
        return None


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None


def core_busy():
    """{'cpu0': (busy, total), ...} jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                p = line.split()
                v = list(map(int, p[1:]))
                idle = v[3] + v[4]
                out[p[0]] = (sum(v) - idle, sum(v))
    return out


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def port_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def one_request(port, frame):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(frame)
        buf = b""
        while len(buf) < 12 or len(buf) < HEADER.unpack(buf[:12])[1]:
            d = s.recv(65536)
            if not d:
                raise ConnectionError("closed")
            buf += d
        return HEADER.unpack(buf[:12])[2] & 0x3FF


class Procs:
    """Processes this runner started; stopped by PID only."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, cwd=None):
        p = subprocess.Popen(
            ["taskset", "-c", "0", *argv],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append((name, p))
        return p

    def stop(self):
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def command(template, **ports):
    return shlex.split(template.format(**ports))


def run_one(a, target, conns, reconnect, rep, frames_for):
    procs = Procs()
    try:
        if target == "limit":
            procs.start("limit", [os.path.join(HERE, "limit_server"), str(a.limit_port)], HERE)
            port = a.limit_port
        else:
            procs.start("server", command(a.server_cmd, port=a.server_port), a.cwd)
            if not wait_port(a.server_port):
                raise RuntimeError("server did not start")
            port = a.server_port
            if target.startswith("proxy"):
                procs.start(
                    "proxy",
                    command(a.proxy_cmd, port=a.proxy_port, server_port=a.server_port),
                    a.cwd,
                )
                port = a.proxy_port
        if not wait_port(port):
            raise RuntimeError(f"{target} did not start")
        frames = frames_for[target]
        if target == "proxy-hit":  # warm-up: one request so that every later one is a hit
            with open(frames, "rb") as f:
                st = one_request(port, f.read())
            if st != 200:
                raise RuntimeError(f"warm-up answered {st}")
        pids = {name: p.pid for name, p in procs.procs}
        # taskset execs the command in place, so these PIDs are the targets'
        t0 = {n: cpu_ticks(pid) for n, pid in pids.items()}
        c0 = core_busy()
        load = os.getloadavg()[0]
        w0 = time.time()
        cmd = ["taskset", "-c", "1", os.path.join(HERE, "loadgen"), "--tag", f"{target}/r{rep}"]
        if reconnect:
            cmd.append("--reconnect")
        cmd += ["127.0.0.1", str(port), str(conns), str(a.duration), frames]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.duration + 60)
        wall = time.time() - w0
        c1 = core_busy()
        t1 = {n: cpu_ticks(pid) for n, pid in pids.items()}
        rss = {n: rss_kb(pid) for n, pid in pids.items()}
        if out.returncode != 0 or not out.stdout.strip():
            raise RuntimeError(f"loadgen failed: {out.stderr.strip()}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(
            label=a.label,
            target=target,
            rep=rep,
            wall_s=round(wall, 2),
            loadavg_before=round(load, 2),
        )
        for n in pids:
            if t0[n] is not None and t1[n] is not None:
                r[f"{n}_cpu_pct"] = round(100.0 * (t1[n] - t0[n]) / TICK / wall, 1)
            r[f"{n}_rss_kb_end"] = rss[n]
        for core in ("cpu0", "cpu1"):
            if core in c0 and core in c1:
                db, dt = c1[core][0] - c0[core][0], c1[core][1] - c0[core][1]
                r[f"{core}_busy_pct"] = round(100.0 * db / dt, 1) if dt else None
        if target in ("proxy-miss", "proxy-allmiss"):
            # fresh proxy + global round robin: the first pass over the frames misses
            r["est_cache_misses"] = min(r["requests"] + r["late_discarded"], r["frames"])
            r["est_miss_pct"] = round(
                100.0 * r["est_cache_misses"] / max(1, r["requests"] + r["late_discarded"]), 1
            )
        for name, p in procs.procs:
            if p.poll() is not None:
                r.setdefault("notes", []).append(f"{name} exited early rc={p.returncode}")
        return r
    finally:
        procs.stop()


def make_frames(work, targets, duration, miss_n=5000, allmiss_n=None):
    """Write the frame files ``targets`` need under ``work/frames``; the file
    of each target. The proxy-allmiss one has ``allmiss_n`` frames, by
    default more than a run of ``duration`` seconds sends."""
    fdir = os.path.join(work, "frames")
    os.makedirs(fdir, exist_ok=True)
    hit = os.path.join(fdir, "max_s1_c1.bin")
    miss = os.path.join(fdir, f"random{miss_n}_s1_c1.bin")
    mk = [sys.executable, os.path.join(HERE, "mkframes.py")]
    subprocess.run([*mk, "-o", hit, "--expr", "ex2", "--cache-control", "65535"], check=True)
    frames_for = {"limit": hit, "server": hit, "proxy-hit": hit}
    if "proxy-miss" in targets:
        subprocess.run([*mk, "-o", miss, "--random", str(miss_n), "--seed", "1"], check=True)
        frames_for["proxy-miss"] = miss
    if "proxy-allmiss" in targets:
        if allmiss_n is None:
            allmiss_n = max(ALLMISS_MIN, int(ALLMISS_PER_S * duration))
        allmiss = os.path.join(fdir, f"random{allmiss_n}_s1_c1.bin")
        subprocess.run([*mk, "-o", allmiss, "--random", str(allmiss_n), "--seed", "2"], check=True)
        frames_for["proxy-allmiss"] = allmiss
    return frames_for


def plan(reps):
    """(conns, reconnect) per run, the 16-connection runs repeated and interleaved."""
    runs = [(1, False, 0), (16, False, 0), (16, True, 0), (128, False, 0)]
    for k in range(1, reps):
        runs += [(16, False, k), (16, True, k)]
    return runs


def summarize(rows):
    def key(r):
        return (r.get("label", ""), r["target"], r["connections"], r["mode"])

    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)

    def med(rs, f):
        return statistics.median(x[f] for x in rs)

    lim = {(c, m): med(rs, "req_per_s") for (_, t, c, m), rs in groups.items() if t == "limit"}
    limp50 = {(c, m): med(rs, "p50_us") for (_, t, c, m), rs in groups.items() if t == "limit"}
    width = max([5] + [len(k[0]) for k in groups])
    print(
        f"{'label':<{width}} {'target':<14}{'conns':>6} {'mode':<10}{'n':>2} "
        f"{'req/s median [min..max]':<28}{'p50 us':>8}{'p99 us':>9}{'errors':>7}"
        f"{'x limit':>9}{'p50 x lim':>10}{'tgt cpu%':>9}{'miss%':>7}"
    )
    order = {t: i for i, t in enumerate(TARGETS)}
    for k in sorted(groups, key=lambda k: (order.get(k[1], 9), k[0], k[3], k[2])):
        rs = groups[k]
        label, t, c, m = k
        qs = [x["req_per_s"] for x in rs]
        rng = f"{statistics.median(qs):.0f}" + (
            f" [{min(qs):.0f}..{max(qs):.0f}]" if len(qs) > 1 else ""
        )
        ratio = statistics.median(qs) / lim[(c, m)] if lim.get((c, m)) else float("nan")
        lr = med(rs, "p50_us") / limp50[(c, m)] if limp50.get((c, m)) else float("nan")
        cpu = sum(
            statistics.median(x.get(f, 0) for x in rs)
            for f in ("limit_cpu_pct", "server_cpu_pct", "proxy_cpu_pct")
        )
        print(
            f"{label:<{width}} {t:<14}{c:>6} {m:<10}{len(rs):>2} {rng:<28}"
            f"{med(rs, 'p50_us'):>8.0f}{med(rs, 'p99_us'):>9.0f}"
            f"{sum(x['errors'] for x in rs):>7}{ratio:>9.4f}{lr:>10.1f}{cpu:>9.0f}"
            + (
                f"{statistics.median(x['est_miss_pct'] for x in rs):>7.0f}"
                if "est_miss_pct" in rs[0]
                else ""
            )
        )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--ref", metavar="DIR", help="shorthand: run server.py / proxy.py (course style) from DIR"
    )
    ap.add_argument("--server-cmd", help="command template for the server, with {port}")
    ap.add_argument(
        "--proxy-cmd", help="command template for the proxy, with {port} and {server_port}"
    )
    ap.add_argument("--label", default="", help="name of the implementation, stored with each row")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the 16-connection runs")
    ap.add_argument("--limit-port", type=int, default=29997)
    ap.add_argument("--server-port", type=int, default=29999)
    ap.add_argument("--proxy-port", type=int, default=29998)
    ap.add_argument("--miss-n", type=int, default=5000, help="distinct expressions for proxy-miss")
    ap.add_argument(
        "--allmiss-n",
        type=int,
        help="distinct expressions for proxy-allmiss, more than a run can send "
        f"(default: {ALLMISS_PER_S:,} per second of --duration, at least {ALLMISS_MIN:,})",
    )
    ap.add_argument("--work", default=WORK, help="directory for the frame files and results")
    ap.add_argument("--out", help="JSON lines file to append to (default: WORK/results.jsonl)")
    ap.add_argument("--summary", metavar="JSONL", help="only summarize an existing results file")
    ap.add_argument(
        "--keep-frames", action="store_true", help="keep the large proxy-allmiss frames file"
    )
    a = ap.parse_args()
    if a.summary:
        with open(a.summary) as f:
            summarize([json.loads(line) for line in f if line.strip()])
        return 0

    a.cwd = a.ref
    if a.ref:
        a.server_cmd = a.server_cmd or f"{sys.executable} server.py -p {{port}}"
        a.proxy_cmd = a.proxy_cmd or f"{sys.executable} proxy.py -pp {{port}} -sp {{server_port}}"
    if any(t != "limit" for t in a.targets.split(",")) and not (a.server_cmd and a.proxy_cmd):
        ap.error("targets other than limit need --server-cmd and --proxy-cmd (or --ref DIR)")
    subprocess.run(["make", "-s", "-C", HERE], check=True)
    for p in (a.limit_port, a.server_port, a.proxy_port):
        if not port_free(p):
            sys.exit(f"port {p} is in use; pick others with --*-port")
    a.out = a.out or os.path.join(a.work, "results.jsonl")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    frames_for = make_frames(a.work, a.targets.split(","), a.duration, a.miss_n, a.allmiss_n)

    rows = []
    with open(a.out, "a") as out:
        for target in a.targets.split(","):
            for conns, reconnect, rep in plan(a.reps):
                r = run_one(a, target, conns, reconnect, rep, frames_for)
                rows.append(r)
                out.write(json.dumps(r) + "\n")
                out.flush()
                print(
                    f"{target:<14} c={conns:<4} {r['mode']:<10} rep={rep} "
                    f"req/s={r['req_per_s']:>9.1f} "
                    f"p50={r['p50_us']}us p99={r['p99_us']}us err={r['errors']} "
                    f"status={r['status']} "
                    f"cpu0={r.get('cpu0_busy_pct')}% cpu1={r.get('cpu1_busy_pct')}%",
                    flush=True,
                )
                time.sleep(1)
    if not a.keep_frames and "proxy-allmiss" in frames_for:
        os.remove(frames_for["proxy-allmiss"])  # ~38 MB, regenerated from its seed on demand
    print()
    summarize(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
