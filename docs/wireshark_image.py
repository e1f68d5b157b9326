"""Makes docs/wireshark.png: Wireshark showing the proxy's answer from its
cache (frame 23 of docs/wireshark.md's "Through the proxy"), its calc tree
expanded, from a capture of real ``twistd`` services and ``calc-client``.

    pip install . && python docs/wireshark_image.py
    python docs/wireshark_image.py --out /tmp/wireshark.png --pcap /tmp/proxy.pcap

It runs the programs installed beside this Python (or on PATH) on 127.0.0.1,
on the documented ports 9999 and 9998 where they are free, captures with
tcpdump (root), and opens the capture in the real Wireshark on a virtual
screen, with the dissector and the colouring rules of contrib/wireshark/.
Debian: ``apt-get install tcpdump tshark wireshark-qt xvfb xdotool imagemagick``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from status_image import pick_port, program, stop, twistd

HERE = pathlib.Path(__file__).resolve().parent
WIRESHARK = HERE.parent / "contrib" / "wireshark"
DISSECTOR = WIRESHARK / "calcproto.lua"
COLOURING = WIRESHARK / "calc.colorfilters"
#: The picture's size: the virtual screen and Wireshark's window fill it.
WIDTH, HEIGHT = 1280, 860
#: The walkthrough's requests, as docs/wireshark.md sends them to the proxy.
REQUESTS = [["max(2, 3) + 3"], ["max(2, 3) + 3"], ["--no-steps", "2 ** 10"]]
#: Pixels: the packet list's height, the details pane's width.
LIST_HEIGHT, TREE_WIDTH = 200, 900
WAIT = 30.0  # seconds: the most any one step may take


def tool(name: str, package: str) -> str:
    """The path of the program ``name``, or an exit naming its Debian package."""
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} is not installed (Debian: apt-get install {package})")
    return found


@contextlib.contextmanager
def tcpdump(pcap: pathlib.Path, *ports: int) -> Iterator[None]:
    """Captures the loopback traffic of ``ports`` into ``pcap`` until the block ends."""
    log = pcap.with_suffix(".log")
    expression = " or ".join(f"tcp port {port}" for port in ports)
    command = [tool("tcpdump", "tcpdump"), "-i", "lo", "-n", "-U", "--immediate-mode"]
    with log.open("w") as errors:
        process = subprocess.Popen(
            [*command, "-w", str(pcap), expression], stdout=subprocess.DEVNULL, stderr=errors
        )
    try:
        deadline = time.monotonic() + WAIT
        while "listening on" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"tcpdump did not start (it needs root):\n{log.read_text()}")
            time.sleep(0.05)
        yield
        # Every packet has been sent; let tcpdump write the last ones.
        size = -1
        while pcap.stat().st_size != size:
            size = pcap.stat().st_size
            time.sleep(0.5)
    finally:
        stop(process)


def walkthrough(proxy: int) -> None:
    """docs/wireshark.md's three requests to the proxy: a miss, a hit, a miss."""
    for request in REQUESTS:
        subprocess.run(
            [program("calc-client"), "--port", str(proxy), *request],
            capture_output=True,
            timeout=WAIT,
            check=True,
        )


def calc_ports(*ports: int) -> list[str]:
    """The options that make tshark and Wireshark decode ``ports`` as calc."""
    return ["-X", f"lua_script:{DISSECTOR}", "-o", f"calc.ports:{','.join(map(str, ports))}"]


def the_hit(pcap: pathlib.Path, ports: list[str]) -> int:
    """The frame number of the answer from the cache (H set) in ``pcap``."""
    command = [tool("tshark", "tshark"), "-n", "-2", "-r", str(pcap), *ports]
    done = subprocess.run(
        [*command, "-Y", "calc.ext.from_cache == 1", "-T", "fields", "-e", "frame.number"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    frames = done.stdout.split()
    if len(frames) != 1:
        raise SystemExit(f"expected one answer from the cache, tshark found {frames}")
    return int(frames[0])


def configuration(folder: pathlib.Path) -> pathlib.Path:
    """A Wireshark configuration folder of its own: a profile ``calc`` with the
    colouring rules, and a window that fills the virtual screen."""
    profile = folder / "profiles" / "calc"
    profile.mkdir(parents=True)
    shutil.copy(COLOURING, profile / "colorfilters")
    (folder / "recent_common").write_text(
        "gui.geometry_main_x: 0\n"
        "gui.geometry_main_y: 0\n"
        f"gui.geometry_main_width: {WIDTH}\n"
        f"gui.geometry_main_height: {HEIGHT}\n"
        "gui.geometry_main_maximized: FALSE\n"
        "privs.warn_if_elevated: FALSE\n"
    )
    # The packet list as high as its ten rows, the details pane wide enough
    # for the whole calc tree.
    (profile / "recent").write_text(
        f"gui.geometry_main_upper_pane: {LIST_HEIGHT}\ngui.geometry_main_lower_pane: {TREE_WIDTH}\n"
    )
    return folder


@contextlib.contextmanager
def xvfb() -> Iterator[str]:
    """A virtual screen of the picture's size; its DISPLAY name."""
    read, write = os.pipe()
    command = [tool("Xvfb", "xvfb"), "-displayfd", str(write), "-nolisten", "tcp"]
    command += ["-screen", "0", f"{WIDTH}x{HEIGHT}x24"]
    process = subprocess.Popen(command, pass_fds=[write], stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        with os.fdopen(read) as numbers:
            number = numbers.readline().strip()
        if not number:
            raise SystemExit("Xvfb did not start")
        yield f":{number}"
    finally:
        stop(process)


def xdotool(env: dict[str, str], *args: str) -> str:
    """Runs ``xdotool`` on the virtual screen of ``env``; what it printed."""
    command = [tool("xdotool", "xdotool"), *args]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=WAIT)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"xdotool {' '.join(args)} timed out: did Wireshark start?") from None
    if done.returncode:
        raise SystemExit(f"xdotool {' '.join(args)} failed: {done.stderr}")
    return done.stdout


def picture(pcap: pathlib.Path, frame: int, ports: list[str], out: pathlib.Path) -> None:
    """Opens ``pcap`` in Wireshark at ``frame``, expands that frame's calc tree
    and takes the screen's picture into ``out``."""
    folder = pcap.parent
    wireshark = tool("wireshark", "wireshark-qt")
    grab = tool("import", "imagemagick")
    config = configuration(folder / "wireshark")
    with xvfb() as display:
        env = dict(os.environ, DISPLAY=display, WIRESHARK_CONFIG_DIR=str(config))
        env.update(XDG_CONFIG_HOME=str(folder / "xdg"), XDG_RUNTIME_DIR=str(folder))
        command = [wireshark, "-C", "calc", *ports, "-r", str(pcap), "-Y", "calc", "-g", str(frame)]
        with (folder / "wireshark.log").open("w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # The title names the file once Wireshark has read it.
            xdotool(env, "search", "--sync", "--onlyvisible", "--name", f"^{pcap.name}")
            time.sleep(3)  # the display filter applied, the frame selected
            # Click in the details pane below its last line, then select that
            # line (the calc tree) and expand everything under it.
            xdotool(env, "mousemove", str(TREE_WIDTH // 2), str(HEIGHT - 60), "click", "1")
            xdotool(env, "key", "End")
            xdotool(env, "key", "shift+Right")
            time.sleep(1)
            subprocess.run(
                [grab, "-window", "root", f"png:{out}"], env=env, timeout=WAIT, check=True
            )
        finally:
            stop(process)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "wireshark.png")
    parser.add_argument("--pcap", type=pathlib.Path, help="keep the capture in this file too")
    options = parser.parse_args(argv)
    server, proxy = pick_port(9999), pick_port(9998)
    ports = calc_ports(proxy, server)
    with tempfile.TemporaryDirectory() as scratch:
        folder = pathlib.Path(scratch)
        pcap = folder / "proxy.pcap"
        serve = ["cacheserver", "--port", str(server)]
        front = ["cacheproxy", "--port", str(proxy), "--server-port", str(server)]
        with (
            twistd(folder, server, *serve),
            twistd(folder, proxy, *front, "--retries", "2"),
            tcpdump(pcap, proxy, server),
        ):
            walkthrough(proxy)
        if options.pcap:
            shutil.copy(pcap, options.pcap)
        picture(pcap, the_hit(pcap, ports), ports, options.out.resolve())
    print(f"wrote {options.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
