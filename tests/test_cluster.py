"""``benchmarks/cluster.py``, small: a site of network namespaces (two
proxies, two servers, two memcached nodes, one load client host) under load
while a server and then a memcached node are cut off and healed, and what an
interrupted run leaves behind (nothing). Needs root, iproute2 and memcached,
as CI has; figures of the full run are in BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, in_ci, require_tool

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "benchmarks" / "cluster.py"
THESE = "tests/test_cluster.py"


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


@pytest.fixture
def before() -> set[str]:
    """The network namespaces before the test; skips (fails in CI) without
    root or the tools the site needs."""
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail(f"network namespaces need root; CI must run {THESE} as root")
        pytest.skip("network namespaces need root")
    require_tool("ip", "iproute2", THESE)
    require_tool("ss", "iproute2", THESE)
    require_tool("memcached", "memcached", THESE)
    return namespaces()


def cluster(*args: str) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--proxies",
        "2",
        "--servers",
        "2",
        "--memcached",
        "2",
        *args,
    ]


def test_answers_stay_right_while_a_server_and_a_memcached_node_are_cut_off(before, tmp_path):
    """Every answer right and none missing in every phase; a server's
    partition costs at most 1 % 500s, a node's none, and takes about half
    the shared tier's keys off their node; answers crossed between the
    proxies through memcached; no namespace is left."""
    out = tmp_path / "cluster.json"
    phases = ["server-partition", "memcached-partition", "steady"]
    done = subprocess.run(
        cluster(
            *("--connections", "8", "--duration", "12", "--warmup", "2"),
            *("--phases", ",".join(phases), "--json", str(out)),
        ),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert namespaces() == before
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["phases"]}
    assert list(rows) == phases
    assert result["wrong"] == 0, result
    assert result["unanswered"] == 0, result
    assert result["requests"] == sum(row["requests"] for row in rows.values())
    assert all(row["requests"] > 0 for row in rows.values()), result
    server, node = rows["server-partition"], rows["memcached-partition"]
    assert server["fault"].startswith("partition: server 198.18.2.1:9999 cut off"), server
    assert server["errors_500"] <= server["requests"] / 100, server
    assert node["fault"].startswith("partition: memcached 198.18.3.1:11211 cut off"), node
    assert node["errors_500"] == 0, node
    assert 0 < node["keys_moved"] < 1, node
    assert node["keys_on_other_node"] == 0, node
    assert result["shared_hits"] > 0, result
    assert f"| {rows['steady']['requests']:,} |" in done.stdout


def test_an_interrupted_run_leaves_no_namespace_and_no_process(before):
    """Ctrl-C once the load runs: every process of the site gone (by the PIDs
    its namespaces held), every namespace gone."""
    prefix = f"cpxtest{os.getpid()}"
    run = subprocess.Popen(
        cluster("--duration", "120", "--prefix", prefix),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert run.stderr is not None
        for line in run.stderr:  # the first phase begins once the load runs
            if line.startswith("steady ..."):
                break
        ours = sorted(n for n in namespaces() if n.startswith(prefix + "-"))
        pids = [
            int(pid)
            for name in ours
            for pid in subprocess.run(
                ["ip", "netns", "pids", name], capture_output=True, text=True, check=True
            ).stdout.split()
        ]
        run.send_signal(signal.SIGINT)
        assert run.wait(60) == 1
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert len(ours) == 8  # the switch, two proxies, two servers, two nodes, a client host
    assert len(pids) == 8  # the six daemons, the load client and the watcher
    assert namespaces() == before
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
        time.sleep(0.1)
    assert alive == []
