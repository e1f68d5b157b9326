"""``demo.sh`` as a newcomer runs it: it refuses taken ports instead of
talking to whatever listens there, and it runs its own services."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest
from helpers import ROOT
from processes import free_port

pytestmark = pytest.mark.integration

DEMO = ROOT / "demo.sh"


def demo(tmp_path: pathlib.Path, server_port: int, proxy_port: int, *args: str):
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env["PATH"]])
    env.update(SERVER_PORT=str(server_port), PROXY_PORT=str(proxy_port))
    return subprocess.run(
        ["sh", str(DEMO), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_demo_refuses_ports_already_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = demo(tmp_path, port, free_port(), "1 + 1")
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"demo.sh: 127.0.0.1:{port} already in use")
    assert not (tmp_path / "demo-logs").exists()  # nothing was started


def test_demo_runs_one_calculation_through_its_own_services(tmp_path):
    server_port, proxy_port = free_port(), free_port()
    proc = demo(tmp_path, server_port, proxy_port, "6 * 7")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines()[-1].startswith("Result: 42  (")
    logs = tmp_path / "demo-logs"
    assert f"listening on 127.0.0.1:{server_port}" in (logs / "server.log").read_text()
    assert f"listening on 127.0.0.1:{proxy_port}" in (logs / "proxy.log").read_text()
    for port in (server_port, proxy_port):  # both stopped on the way out
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_demo_says_to_activate_the_virtualenv_when_twistd_is_not_on_path(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        ["sh", str(DEMO), "1 + 1"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("demo.sh: twistd is not on PATH: activate the virtualenv")
    assert ". .venv/bin/activate" in proc.stderr


def test_demo_logs_start_fresh_each_run(tmp_path):
    logs = tmp_path / "demo-logs"
    logs.mkdir()
    (logs / "proxy.log").write_text("an earlier run's line\n")
    proc = demo(tmp_path, free_port(), free_port(), "6 * 7")
    assert proc.returncode == 0, proc.stderr
    assert "an earlier run's line" not in (logs / "proxy.log").read_text()
