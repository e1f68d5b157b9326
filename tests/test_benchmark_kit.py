"""The benchmark's parts: the load kit in ``benchmarks/kit`` builds with the
system C compiler and measures the installed server, the peers in
``benchmarks/peers`` answer correctly, and ``benchmarks/run.py`` measures
ours against them and computes its ratios. Bounded smoke runs, not
benchmarks."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest
from helpers import request_frame
from processes import HOST, WAIT, accepting, free_port, read_message, terminate, wait_for

from twisted_cacheproxy.calculator import codec, parser
from twisted_cacheproxy.transport import wire

ROOT = pathlib.Path(__file__).resolve().parent.parent
KIT = ROOT / "benchmarks" / "kit"
PEERS = ROOT / "benchmarks" / "peers"
STEPS = ["max(2, 3) + 3", "3 + 3", "6"]


@pytest.fixture
def built(tmp_path) -> pathlib.Path:
    """The kit's C programs, built from the repository's sources in a
    temporary directory (the source tree stays clean)."""
    if not (shutil.which("make") and (shutil.which("cc") or shutil.which("gcc"))):
        pytest.skip("needs make and a C compiler")
    for name in ("Makefile", "loadgen.c", "limit_server.c"):
        shutil.copy(KIT / name, tmp_path / name)
    subprocess.run(["make", "-s", "-C", str(tmp_path)], check=True, capture_output=True)
    return tmp_path


@pytest.mark.integration
def test_the_load_generator_builds_and_measures_our_server(built, twistd, tmp_path):
    """Two connections for one second against ``twistd cacheserver``: a few
    hundred answered requests, all 200, no error, and a JSON line to say so."""
    frames = tmp_path / "max.bin"
    subprocess.run(
        [sys.executable, str(KIT / "mkframes.py"), "-o", str(frames), "--expr", "ex2"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    twistd("cacheserver", "--port", str(port), port=port)
    out = subprocess.run(
        [str(built / "loadgen"), HOST, str(port), "2", "1", str(frames)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0, result
    assert result["requests"] >= 200, result
    assert result["status"] == {"200": result["requests"]}, result
    assert 0 < result["p50_us"] <= result["p99_us"]
    assert (built / "limit_server").exists()


@pytest.fixture
def peer():
    """Starts a program of ``benchmarks/peers`` with this Python:
    ``peer("naive_server.py", "--port", "N", port=N)``, returning once it
    accepts connections; every one is stopped by its PID when the test ends."""
    started: list[subprocess.Popen] = []

    def start(script: str, *args: str, port: int) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, str(PEERS / script), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        started.append(proc)
        assert wait_for(lambda: accepting(port) or proc.poll() is not None, WAIT)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        return proc

    yield start
    for proc in started:
        terminate(proc)


def send_and_read(port: int, *chunks: bytes, answers: int = 1) -> list[tuple[wire.Header, bytes]]:
    """Send ``chunks`` (each one ``send``) on one connection to ``port`` and
    read ``answers`` whole answers."""
    with socket.create_connection((HOST, port), timeout=WAIT) as s:
        for chunk in chunks:
            s.sendall(chunk)
        return [read_message(s) for _ in range(answers)]


def legacy(text: str) -> bytes:
    """The course client's pickle of ``text``'s expression."""
    return codec.encode_request(parser.parse(text), codec.LEGACY)


@pytest.mark.integration
def test_the_naive_server_answers_by_length_in_both_encodings(peer):
    """A pickle and a text request sent in one write, and a third request in
    two writes: three answers, in order, with the course server's values."""
    port = free_port()
    peer("naive_server.py", "--port", str(port), port=port)
    pickled = request_frame(legacy("max(2, 3) + 3"), steps=True)
    text = request_frame("1 / 0")
    split = request_frame("2 ** 10")
    answers = send_and_read(port, pickled + text + split[:7], split[7:], answers=3)
    (h1, d1), (h2, d2), (h3, d3) = answers
    assert (h1.status, h1.cache, h1.steps, h1.max_age) == (200, True, True, wire.FOREVER)
    assert codec.decode_response(d1) == (6, STEPS)
    assert (h2.status, h2.cache) == (400, False)
    assert json.loads(d2) == {"error": "division by zero", "type": "ZeroDivisionError"}
    assert (h3.status, json.loads(d3)) == (200, {"result": 1024, "steps": []})


@pytest.mark.integration
def test_the_naive_proxy_serves_hits_from_its_cache_and_never_c0(peer):
    """With the server stopped after one answer, the same request is answered
    from the cache, byte for byte; a request with C=0, max-age 0 or the other
    S flag is not served from it, nor was an answer to C=0 stored: they get
    the proxy's 500."""
    server_port, proxy_port = free_port(), free_port()
    server = peer("naive_server.py", "--port", str(server_port), port=server_port)
    args = ("--port", str(proxy_port), "--server-port", str(server_port))
    peer("naive_proxy.py", *args, port=proxy_port)
    request = request_frame(legacy("max(2, 3) + 3"), steps=True)
    [(first, data)] = send_and_read(proxy_port, request)
    assert (first.status, codec.decode_response(data)) == (200, (6, STEPS))
    [(c0, _)] = send_and_read(proxy_port, request_frame(legacy("1 + 1"), cache=False))
    assert c0.status == 200
    terminate(server)
    assert send_and_read(proxy_port, request, request, answers=2) == [(first, data)] * 2
    refused = [
        request_frame(legacy("1 + 1")),
        request_frame(legacy("max(2, 3) + 3"), steps=True, cache=False, max_age=wire.FOREVER),
        request_frame(legacy("max(2, 3) + 3"), steps=True, max_age=0),
        request_frame(legacy("max(2, 3) + 3"), steps=False),
    ]
    for frame in refused:
        [(header, data)] = send_and_read(proxy_port, frame)
        assert header.status == 500, frame
        with pytest.raises(codec.RemoteError, match="ConnectionError"):
            codec.decode_response(data)


@pytest.mark.parametrize("send_at_once", [False, True], ids=["tcp", "sendatonce"])
@pytest.mark.integration
def test_the_canned_server_answers_every_whole_request_with_the_yardsticks_bytes(
    peer, send_at_once
):
    """Three requests in one write and one in two writes: four answers, each
    the C yardstick's 60 bytes (limit_server.c) but for the time stamp."""
    port = free_port()
    peer("canned_twisted.py", "--port", str(port), *["--send-at-once"] * send_at_once, port=port)
    frame = request_frame(legacy("max(2, 3) + 3"), steps=True)
    answers = send_and_read(port, frame * 3 + frame[:5], frame[5:], answers=4)
    pickled = bytes.fromhex(
        "80049525000000000000004b065d94288c0d6d617828322c203329202b2033"
        "948c0533202b2033948c0136946586942e"
    )
    flags = wire.make_flags(request=False, status=200, cache=True, steps=True)
    for header, data in answers:
        assert (header.length, header.flags, header.max_age, data) == (
            60,
            flags,
            wire.FOREVER,
            pickled,
        )


def run_py():
    """``benchmarks/run.py`` as a module, for its arithmetic."""
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_peer_ratios_are_taken_pair_by_pair():
    """Each ratio is ours over the peer's run of the same pair (by ``rep``);
    CPU per request is user + system time over answered requests; the text
    is the median with the range."""
    run = run_py()

    def r(rep, rate, p99, cpu_pct):
        return {
            "rep": rep,
            "req_per_s": rate,
            "p99_us": p99,
            "requests": rate,
            "wall_s": 1.0,
            "proxy_cpu_pct": cpu_pct,
            "server_cpu_pct": 0.0,
        }

    ours = [r(0, 100, 10, 25.0), r(1, 300, 20, 60.0), r(2, 200, 30, 90.0)]
    peer = [r(2, 100, 60, 90.0), r(0, 200, 20, 100.0), r(1, 150, 40, 30.0)]
    assert run.pair_ratios(ours, peer, "req/s") == [0.5, 2.0, 2.0]
    assert run.pair_ratios(ours, peer, "p99") == [0.5, 0.5, 0.5]
    assert run.cpu_per_request(ours[0], run.SERVICES) == pytest.approx(2500.0)
    assert run.cpu_ratios(ours, peer) == pytest.approx([2.0, 1.0, 2.0])
    assert run.ratio_text(run.pair_ratios(ours, peer, "req/s")) == "2.00x [0.50..2.00]"
    assert run.ratio_text([1.234]) == "1.23x"
    assert run.ratio_text([]) == "-"


def test_against_another_version_pairs_every_workload_with_its_twistd():
    """``--against VENV``: each workload of the peer table, ours against the
    same service started with the other virtualenv's ``twistd``."""
    run = run_py()
    groups = run.version_groups("/old venv/bin/twistd")
    assert [g.key for g in groups] == [g.key for g in run.GROUPS]
    for group in groups:
        (row,) = group.rows
        assert row.peer.target == group.ours.target
        assert row.peer.server.startswith("'/old venv/bin/twistd' -n --pidfile= cacheserver ")
        assert (row.peer.proxy is None) == (group.ours.proxy is None)
        if row.peer.proxy:
            assert row.peer.proxy.startswith("'/old venv/bin/twistd' -n --pidfile= cacheproxy ")
    assert [row.measure for g in groups for row in g.rows].count("p99") == 1


@pytest.mark.integration
def test_run_py_measures_ours_against_the_peers(tmp_path):
    """``run.py --quick`` with the hits rows, one pair of half-second runs:
    four runs without an error, and the table's rows with their ratios."""
    if not (shutil.which("make") and shutil.which("taskset")):
        pytest.skip("needs make, a C compiler and taskset")
    ports = [str(free_port()) for _ in range(3)]
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--workloads",
            "hits",
            "--pairs",
            "1",
            "--duration",
            "0.5",
            "--pause",
            "0",
            "--work",
            str(tmp_path),
            "--server-port",
            ports[0],
            "--proxy-port",
            ports[1],
            "--limit-port",
            ports[2],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [json.loads(line) for line in (tmp_path / "peers.jsonl").read_text().splitlines()]
    assert [r["contender"] for r in rows] == [
        "ours",
        "naive proxy",
        "canned Twisted",
        "canned, at once",
    ]
    for r in rows:
        assert r["errors"] == 0 and r["requests"] > 0, r
        assert r["status"] == {"200": r["requests"]}, r
    assert "Processor: " in out.stdout
    for workload in (
        "cache hits vs the naive threaded proxy",
        "cache hits vs the canned Twisted server",
        "cache hits vs the canned server, sendatonce:",
    ):
        [line] = [x for x in out.stdout.splitlines() if x.startswith(f"| {workload} |")]
        assert line.count("x |") == 2, line
