"""The benchmark kit in ``benchmarks/kit`` builds with the system C compiler
and measures the installed server: a bounded smoke run, not a benchmark."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
from processes import HOST, free_port

pytestmark = pytest.mark.integration

KIT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "kit"


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
