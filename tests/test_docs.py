"""The documentation cannot drift from the programs: every relative link in
the README and the docs resolves (to a file, and to a heading there when it
names one), and every command a reader would copy (the ``sh`` code blocks)
names a program this project uses and, for our own programs, options they
take; the blocks marked ``<!-- test: run -->`` are run."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest
from helpers import HERE, in_ci

ROOT = HERE.parent
PAGES = sorted(
    [ROOT / "README.md", ROOT / "BENCHMARKS.md", *ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")]
)
PAGES = sorted(set(PAGES))

#: Programs a command in the docs may run besides our own.
KNOWN = {
    ".",
    "apt-get",
    "base64",
    "cat",
    "cd",
    "chmod",
    "cp",
    "curl",
    "echo",
    "export",
    "git",
    "head",
    "install",
    "ip",
    "journalctl",
    "kill",
    "logrotate",
    "ls",
    "make",
    "memcached",
    "mkdir",
    "nc",
    "openssl",
    "pip",
    "printf",
    "python3",
    "sleep",
    "source",
    "ss",
    "sudo",
    "systemctl",
    "systemd-analyze",
    "systemd-socket-activate",
    "taskset",
    "tcpdump",
    "tshark",
    "twistd",
    "calc-client",
    "calc-check",
    "wireshark",
    "./demo.sh",
    "column",
    "ruff",
    "mypy",
    "lint-imports",
    "grep",
    "tee",
    "rm",
    "mv",
    "chown",
    "useradd",
    "mkfifo",
    "xxd",
    "od",
    "docker",
}

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    found: dict[str, int] = {}
    out = set()
    for line in text.splitlines():
        if line.startswith("#"):
            base = slug(line.lstrip("#"))
            n = found.get(base, 0)
            found[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page) -> list[str]:
    text = _FENCE.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    return [
        target
        for target in _LINK.findall(text)
        if not re.match(r"[a-z]+:", target)  # http:, https:, mailto:...
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target}: no heading #{anchor} there")
    assert broken == []


# --- the commands ----------------------------------------------------------------------------


def blocks(page) -> list[tuple[list[str], bool]]:
    """The ``sh`` code blocks of ``page``: their commands, and whether the
    block is marked to be run."""
    text = page.read_text()
    out = []
    for match in _FENCE.finditer(text):
        if match.group(1) != "sh":
            continue
        before = text[: match.start()].rstrip().splitlines()
        marked = bool(before) and before[-1].strip() == "<!-- test: run -->"
        out.append((commands(match.group(2)), marked))
    return out


def commands(block: str) -> list[str]:
    """One string per command: continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            out.append(current.strip())
            current = ""
    return out


def simple(command: str) -> list[list[str]]:
    """The simple commands of a pipeline or list, each its words (shell
    variables and assignments in front left out)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words, out = list(lexer), [[]]
    redirected = False
    for word in words:
        if word in ("&&", "||", ";", "|", "&"):
            out.append([])
        elif word in (">", ">>", "<", "2>", "&>"):
            redirected = True  # the next word is a file, not an argument
        elif redirected:
            redirected = False
        else:
            out[-1].append(word)
    result = []
    for argv in out:
        while argv and re.match(r"[A-Z_]+=", argv[0]):
            argv = argv[1:]
        if argv and argv[0] == "sudo":
            argv = argv[1:]
        if argv:
            result.append(argv)
    return result


def all_commands() -> list[tuple[str, str]]:
    return [
        (str(page.relative_to(ROOT)), command)
        for page in PAGES
        for cmds, _ in blocks(page)
        for command in cmds
    ]


#: Options that read a file while they are parsed, and what a stand-in file
#: for the one a page names holds (the page's own path may not exist here).
FILE_OPTIONS = {
    "--admin-token-file": b"s3cret-token-for-the-docs-test\n",
    "--memcached-secret-file": b"a-secret-of-more-than-16-bytes\n",
    "--cafile": None,  # a PEM certificate: Twisted's own test one
}


def stand_in_files(argv: list[str], tmp_path) -> list[str]:
    """``argv`` with the files `FILE_OPTIONS` read replaced by stand-ins."""
    import os

    import twisted.test

    out = list(argv)
    for i, word in enumerate(out):
        option, equals, _ = word.partition("=")
        if option not in FILE_OPTIONS:
            continue
        stand_in = tmp_path / f"stand-in-{i}"
        content = FILE_OPTIONS[option]
        if content is None:
            content = (pathlib.Path(twisted.test.__file__).parent / "server.pem").read_bytes()
        stand_in.write_bytes(content)
        os.chmod(stand_in, 0o600)
        if equals:
            out[i] = f"{option}={stand_in}"
        elif i + 1 < len(out):
            out[i + 1] = str(stand_in)
    return out


def check_twistd(argv: list[str]) -> None:
    """Parse a twistd command line as twistd does, our plugins' options
    included (nothing is started)."""
    from twisted.scripts._twistd_unix import ServerOptions

    ServerOptions().parseOptions(argv[1:])


def check_ours(argv: list[str]) -> None:
    from twisted_cacheproxy import client
    from twisted_cacheproxy.check import main

    parse = {"calc-client": client.parse_args, "calc-check": main.parse_args}[argv[0]]
    parse(argv[1:])


COMMANDS = all_commands()


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_every_command_runs_a_known_program_with_options_it_takes(page, command, tmp_path):
    """A renamed option or program, or a typo, fails here rather than on a
    reader's terminal."""
    for argv in simple(command):
        program = argv[0]
        if program.startswith(("$", "/")) or program.endswith(".py"):
            continue
        assert program in KNOWN, f"{page}: {command!r} runs {program}"
        argv = stand_in_files(argv, tmp_path)
        try:
            if program == "twistd":
                check_twistd(argv)
            elif program in ("calc-client", "calc-check"):
                check_ours(argv)
        except SystemExit as e:  # --help and --version end here, with status 0
            assert e.code in (0, None), f"{page}: {command!r}: {e}"


def test_the_pages_have_commands_to_check():
    assert len(COMMANDS) >= 20, COMMANDS


# --- the blocks that are run ------------------------------------------------------------------


def marked() -> list[tuple[str, int, list[str]]]:
    return [
        (str(page.relative_to(ROOT)), n, cmds)
        for page in PAGES
        for n, (cmds, run) in enumerate(blocks(page))
        if run
    ]


MARKED = marked()


@pytest.fixture(scope="module")
def documented_services(tmp_path_factory):
    """A server on 127.0.0.1:9999 and a proxy on 127.0.0.1:9998 in front of
    it, their admin sites on 9101 and 9100 (the ports the pages use), for
    every marked block. Where those ports are taken on a developer's machine
    the blocks are skipped (in CI they fail)."""
    from processes import Twistd, accepting

    ports = (9999, 9998, 9101, 9100)
    if any(accepting(p) for p in ports):
        why = f"one of 127.0.0.1:{ports} is taken: the docs' commands cannot run"
        if in_ci():
            pytest.fail(why)
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("documented")
    started: list[Twistd] = []
    try:
        for args, port in (
            (["cacheserver", "--admin-port", "9101"], 9999),
            (["cacheproxy", "--admin-port", "9100"], 9998),
        ):
            started.append(Twistd(args, port, folder / f"{args[0]}.log", folder).start())
        yield
    finally:
        for service in reversed(started):
            service.stop()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("page", "number", "cmds"), MARKED, ids=[f"{page}-{n}" for page, n, _ in MARKED]
)
def test_the_marked_blocks_run_as_written(page, number, cmds, documented_services, tmp_path):
    """As a reader runs them, against `documented_services`: every command
    of the block exits 0, ``curl`` too only on a 2xx answer (``fail`` in its
    ``.curlrc``)."""
    import os
    import subprocess
    import sys

    (tmp_path / ".curlrc").write_text("fail\nsilent\nshow-error\n")
    env = {
        **os.environ,
        "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
    }
    for command in cmds:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{page}: {command!r}:\n{done.stdout}{done.stderr}"


def test_some_blocks_are_run():
    assert len(MARKED) >= 10
