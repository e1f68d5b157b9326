"""Makes docs/status.png: the proxy's status page, as headless Chromium
shows it, from a real ``twistd cacheproxy`` in front of a real ``twistd
cacheserver`` after a minute of traffic.

    pip install . && python docs/status_image.py
    python docs/status_image.py --seconds 10 --out /tmp/status.png

It runs the programs installed beside this Python (or on PATH), on free
ports of 127.0.0.1, and stops them when it is done; Chromium must be
installed (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from twisted_cacheproxy.transport import wire

HOST = "127.0.0.1"
HERE = pathlib.Path(__file__).resolve().parent
#: Chromium as the browser test starts it: no network of its own, a fresh profile.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def program(name: str) -> str:
    """The installed console script ``name`` beside this Python, else on PATH."""
    here = pathlib.Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} is not installed: pip install . (in a virtualenv) first")
    return found


def pick_port(preferred: int) -> int:
    """``preferred`` (the documented port, for the picture) if it is free, else any free one."""
    with socket.socket() as s:
        try:
            s.bind((HOST, preferred))
        except OSError:
            s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_accepting(number: int, process: subprocess.Popen[bytes], log: pathlib.Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"twistd exited:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, number), timeout=0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"twistd did not listen on {number}:\n{log.read_text()}")


@contextlib.contextmanager
def twistd(folder: pathlib.Path, port: int, *args: str) -> Iterator[None]:
    """One ``twistd -n`` process, listening on ``port`` until the block ends."""
    log = folder / f"twistd-{port}.log"
    command = [program("twistd"), "-n", "--pidfile=", f"--logfile={log}", *args]
    process = subprocess.Popen(command, cwd=folder, stdin=subprocess.DEVNULL)
    try:
        wait_accepting(port, process, log)
        yield
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Ends ``process`` by its PID: SIGTERM (a clean stop), then SIGKILL if
    it lingers past 15 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ask(port: int, texts: list[str]) -> None:
    """Send ``texts`` pipelined on one connection and read every answer."""
    flags = wire.make_flags(request=True, cache=True)
    frames = [wire.encode(int(time.time()), flags, wire.FOREVER, t.encode()) for t in texts]
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(b"".join(frames))
        buffer, answers = b"", 0
        while answers < len(frames):
            while len(buffer) < wire.HEADER_SIZE or len(buffer) < _length(buffer):
                chunk = s.recv(65536)
                if not chunk:
                    raise SystemExit("the proxy closed the connection before answering")
                buffer += chunk
            buffer = buffer[_length(buffer) :]
            answers += 1


def _length(buffer: bytes) -> int:
    return int(struct.unpack_from("!H", buffer, 4)[0])


def traffic(port: int, seconds: float) -> None:
    """A rate that rises and falls, mostly repeated expressions (hits) and
    some new ones (misses), for ``seconds``."""
    started = time.monotonic()
    second = 0
    while time.monotonic() - started < seconds:
        rate = int(30 + 25 * math.sin(second / 9))
        new = [f"{second} * {k} + 1" for k in range(rate // 5)]
        repeated = [f"{k % 12} + {k % 7}" for k in range(rate - len(new))]
        ask(port, new + repeated)
        second += 1
        time.sleep(max(0.0, started + second - time.monotonic()))


def screenshot(url: str, out: pathlib.Path, profile: pathlib.Path, attempts: int = 3) -> None:
    """``url`` as headless Chromium shows it, in ``out``. Chromium can end
    well without writing the picture (a renderer that crashed on a busy
    machine), so it is asked again, up to ``attempts`` times."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (Debian: apt-get install chromium)")
    command = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        f"--screenshot={out.resolve()}",
        "--window-size=1000,800",
        url,
    ]
    out.unlink(missing_ok=True)
    for _ in range(attempts):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
        if out.exists():
            return
    raise SystemExit(f"chromium wrote no picture of {url}:\n{done.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="traffic before the picture")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "status.png")
    options = parser.parse_args(argv)
    server, proxy, admin = pick_port(9999), pick_port(9998), pick_port(9100)
    with tempfile.TemporaryDirectory() as scratch:
        folder = pathlib.Path(scratch)
        serve = ["cacheserver", "--port", str(server)]
        front = ["cacheproxy", "--port", str(proxy), "--server-port", str(server)]
        with (
            twistd(folder, server, *serve),
            twistd(folder, proxy, *front, "--admin-port", str(admin)),
        ):
            traffic(proxy, options.seconds)
            screenshot(f"http://{HOST}:{admin}/status", options.out, folder / "profile")
    print(f"wrote {options.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
