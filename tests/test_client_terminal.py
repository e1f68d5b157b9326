"""``calc-client`` as a user meets it, over real TCP on 127.0.0.1: the menu on
a pseudo-terminal (readline history, Ctrl-D, an expression typed at the menu
prompt, the waiting line) and on pipes (reconnecting after the server closed
an idle connection). The processes run the installed package."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import subprocess
import termios
import time

import pytest
from processes import ESTABLISHED, free_port, script, tcp_states_to, wait_for

pytestmark = pytest.mark.integration

WAIT = 10.0  # seconds: the most any single wait here may take


class Session:
    """A running ``calc-client``: keys typed into it and what it shows.

    On a pseudo-terminal (``tty=True``) it sees a terminal on stdin and
    stdout, as a user's shell gives it; otherwise pipes.
    """

    def __init__(self, *args: str, tty: bool = True, cwd=None) -> None:
        env = dict(os.environ)
        env.update(TERM="xterm", INPUTRC=os.devnull, COLUMNS="200", LINES="50")
        if tty:
            self.fd, slave = os.openpty()
            self.proc = subprocess.Popen(
                [script("calc-client"), *args],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                cwd=cwd,
                start_new_session=True,
                # The terminal becomes its controlling one: Ctrl-C is a SIGINT.
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            )
            os.close(slave)
            self.keys = self.fd
        else:
            self.proc = subprocess.Popen(
                [script("calc-client"), *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
            )
            self.fd = self.proc.stdout.fileno()
            self.keys = self.proc.stdin.fileno()
        self.screen = ""
        self.seen = 0

    def type(self, keys: str) -> None:
        os.write(self.keys, keys.encode())

    def _read(self, timeout: float) -> bool:
        """Add what shows within ``timeout``; False once the output has ended."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the terminal's other side has gone
            chunk = b""
        self.screen += chunk.decode(errors="replace")
        return bool(chunk)

    def expect(self, text: str, timeout: float = WAIT) -> str:
        """Wait until ``text`` shows after what earlier waits saw; returns
        the screen up to it."""
        deadline = time.monotonic() + timeout
        while text not in self.screen[self.seen :]:
            left = deadline - time.monotonic()
            ended = left > 0 and not self._read(min(left, 0.2)) and self.proc.poll() is not None
            if left <= 0 or ended:
                raise AssertionError(f"{text!r} never came; the screen:\n{self.screen!r}")
        end = self.screen.index(text, self.seen) + len(text)
        shown, self.seen = self.screen[self.seen : end], end
        return shown

    def finish(self, timeout: float = WAIT) -> int:
        """Wait for the process to end, reading what it still shows."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0) and select.select([self.fd], [], [], 0)[0]:
            pass
        return self.proc.wait(timeout=1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
        if self.fd != getattr(self.proc.stdout, "fileno", lambda: None)():
            os.close(self.fd)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@pytest.fixture
def session():
    """Starts ``calc-client`` sessions; each is ended when the test ends."""
    started: list[Session] = []

    def start(*args: str, tty: bool = True) -> Session:
        s = Session(*args, tty=tty)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


@pytest.fixture
def server(twistd):
    port = free_port()
    return twistd("cacheserver", "--port", str(port), port=port)


# --- the menu on a terminal ---------------------------------------------------------------------


def test_menu_on_a_terminal(server, session):
    """An expression typed at the menu prompt, arrow-up history, Ctrl-D at
    the expression prompt (back to the menu) and at the menu (quit)."""
    t = session("--port", str(server.port))
    start = t.expect("choice> ")
    assert f"Connected to 127.0.0.1:{server.port}." in start
    assert start.count("Choose an expression") == 1
    t.type("2\r")
    t.expect("Result: 6  (computed by the server, cacheable for ever)")
    after = t.expect("choice> ")
    assert "Choose an expression" not in after  # the menu is not reprinted
    t.type("6 * 7\r")  # not a menu entry: calculated
    t.expect("Expression: 6 * 7")
    t.expect("Result: 42")
    t.expect("choice> ")
    t.type("\x1b[A")  # arrow up: the last line again, from readline's history
    t.expect("6 * 7")
    t.type("\r")
    t.expect("Expression: 6 * 7")
    t.expect("Result: 42")
    t.expect("choice> ")
    t.type("m\r")
    t.expect("Choose an expression")
    t.expect("choice> ")
    t.type("7\r")
    t.expect("expression> ")
    t.type("\x04")  # Ctrl-D: back to the menu prompt
    t.expect("choice> ")
    assert t.proc.poll() is None
    t.type("\x04")  # Ctrl-D at the menu: quit
    assert t.finish() == 0
    assert "Error" not in t.screen and "Traceback" not in t.screen


def test_ctrl_c_at_the_menu_quits_and_gives_the_terminal_back(server, session):
    t = session("--port", str(server.port))
    t.expect("choice> ")
    cooked = termios.ECHO | termios.ICANON
    assert termios.tcgetattr(t.fd)[3] & cooked != cooked  # readline's own mode
    t.type("\x03")
    t.finish()
    assert t.proc.returncode is not None
    assert termios.tcgetattr(t.fd)[3] & cooked == cooked
    assert "Traceback" not in t.screen


def test_waiting_line_on_a_terminal(session):
    """A server that accepts but does not answer: after about a second, one
    line counting the seconds, rewritten in place."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(WAIT)
        port = silent.getsockname()[1]
        t = session("--port", str(port), "1 + 1")
        conn, _ = silent.accept()
        with conn:
            t.expect(f"\rwaiting for an answer from 127.0.0.1:{port}... 1 s")
            t.expect(f"\rwaiting for an answer from 127.0.0.1:{port}... 2 s")
    assert t.finish() == 2
    assert t.screen.endswith(
        f"\rError: 127.0.0.1:{port} closed the connection before the answer came\r\n"
    )


def test_no_waiting_line_on_a_pipe(session):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(WAIT)
        port = silent.getsockname()[1]
        t = session("--port", str(port), "1 + 1", tty=False)
        conn, _ = silent.accept()
        with conn:
            time.sleep(1.5)  # past the point where a terminal shows the line
    assert t.finish() == 2
    assert t.screen == f"Error: 127.0.0.1:{port} closed the connection before the answer came\n"


# --- the menu after the far end closed its connection -------------------------------------------


def test_menu_reconnects_after_the_server_closed_the_idle_connection(twistd, session):
    port = free_port()
    server = twistd("cacheserver", "--port", str(port), "--idle-timeout", "0.5", port=port)
    t = session("--port", str(port), tty=False)
    t.expect("choice> ")
    t.type("2\n")
    t.expect("Result: 6")
    t.expect("choice> ")
    # The server closes the idle connection after 0.5 s: then no connection
    # to it is established any more (the client's end is closed or half-closed).
    assert wait_for(lambda: ESTABLISHED not in tcp_states_to(port), WAIT), tcp_states_to(port)
    t.type("2\n")
    shown = t.expect("Result: 6")
    assert f"(connection closed by 127.0.0.1:{port}; reconnected)\n" in shown
    t.expect("choice> ")
    # Now the server is gone: one line naming it, and the menu goes on.
    server.stop()
    t.type("2\n")
    shown = t.expect("choice> ")
    assert f"Error: cannot connect to 127.0.0.1:{port}: " in shown
    assert shown.count("Error") == 1
    t.type("q\n")
    assert t.finish() == 0


# --- giving up, and Ctrl-C ------------------------------------------------------------------------


@pytest.fixture
def silent():
    """A listener that accepts connections and never answers (what a
    stuck server, or an HTTP port given by mistake, looks like)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(WAIT)
        yield listener


def test_calc_client_gives_up_on_a_listener_that_never_answers(silent, session):
    port = silent.getsockname()[1]
    started = time.monotonic()
    t = session("--port", str(port), "--timeout", "1", "1 + 1", tty=False)
    conn, _ = silent.accept()
    with conn:
        assert t.finish() == 2
        assert time.monotonic() - started >= 1
        assert t.screen == f"Error: no answer from 127.0.0.1:{port} within 1 s\n"
        assert conn.recv(100).endswith(b"1 + 1")  # it was asked
        assert conn.recv(100) == b""  # and the client closed the connection


def test_calc_client_menu_gives_up_and_asks_again(silent, session):
    port = silent.getsockname()[1]
    t = session("--port", str(port), "--timeout", "1", tty=False)
    conn, _ = silent.accept()
    with conn:
        t.expect("choice> ")
        t.type("2\n")
        shown = t.expect("choice> ")
        assert f"Error: no answer from 127.0.0.1:{port} within 1 s\n" in shown
        t.type("2\n")
        conn2, _ = silent.accept()  # the next request opens a new connection
        conn2.close()
        shown = t.expect("choice> ")
        assert "reconnected" not in shown  # the client closed the first one itself
        assert f"Error: 127.0.0.1:{port} closed the connection before the answer came" in shown
        t.type("q\n")
        assert t.finish() == 0


def test_ctrl_c_while_waiting_says_the_user_stopped_it(silent, session):
    port = silent.getsockname()[1]
    t = session("--port", str(port), "1 + 1")
    conn, _ = silent.accept()
    with conn:
        t.expect(f"\rwaiting for an answer from 127.0.0.1:{port}... 1 s")
        t.type("\x03")
        assert t.finish() == 130
    assert t.screen.endswith("\r\nStopped by Ctrl-C.\r\n"), t.screen
    assert "closed the connection" not in t.screen and "Traceback" not in t.screen


def test_ctrl_c_at_the_menu_says_the_user_stopped_it(server, session):
    t = session("--port", str(server.port))
    t.expect("choice> ")
    t.type("\x03")
    assert t.finish() == 130
    assert t.screen.endswith("choice> \r\nStopped by Ctrl-C.\r\n"), t.screen
