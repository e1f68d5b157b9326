"""calc-check run as users run it: against our server and proxy (every case
passes), against stand-ins with one deliberate bug each (that bug's cases
fail, and only those), against a target that never answers, and against
nothing at all."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from html.parser import HTMLParser

import checkstandins as standins
import pytest
from processes import HOST, free_port, script, start_proxy

from twisted_cacheproxy.check import catalogue
from twisted_cacheproxy.check.case import MUST, PROXY, SERVER

pytestmark = pytest.mark.integration

LEVEL = {c.id: c.level for c in catalogue.CATALOGUE}


def check(tmp_path, *args: str, timeout: float = 300):
    """Run ``calc-check *args``; its exit status, output and JSON report."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [script("calc-check"), *args, "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    document = json.loads(report.read_text()) if report.exists() else None
    return done.returncode, done.stdout + done.stderr, document


def failed(document) -> set[str]:
    """The cases that did not pass (failed, or skipped)."""
    return {c["id"] for c in document["cases"] if c["outcome"] != "pass"}


def counts(document) -> str:
    return ", ".join(
        f"{level} {n['pass']}/{n['pass'] + n['fail'] + n['skip']}"
        for level, n in document["summary"].items()
    )


def expected_status(bugs: set[str]) -> int:
    return 1 if any(LEVEL[b] == MUST for b in bugs) else 0


# --- ours ---------------------------------------------------------------------------


def test_our_server_passes_every_case(twistd, tmp_path):
    port = free_port()
    twistd("cacheserver", "--port", str(port), port=port)
    status, output, document = check(tmp_path, SERVER, f"{HOST}:{port}")
    assert failed(document) == set(), output
    assert status == 0
    assert len(document["cases"]) == len(catalogue.select(SERVER))
    print(f"our server: {counts(document)}")


def test_our_proxy_passes_every_case(twistd, tmp_path):
    upstream = free_port()
    proxy = start_proxy(twistd, upstream, "--timeout", "3")
    status, output, document = check(
        tmp_path, PROXY, f"{HOST}:{proxy.port}", "--upstream-port", str(upstream)
    )
    assert failed(document) == set(), output
    assert status == 0
    assert len(document["cases"]) == len(catalogue.select(PROXY))
    print(f"our proxy: {counts(document)}")


# --- stand-ins ----------------------------------------------------------------------


def test_a_server_without_section_6_passes_every_must_case(tmp_path):
    with standins.Server() as server:
        status, output, document = check(tmp_path, SERVER, f"{HOST}:{server.port}")
    assert failed(document) == {"ext.length-framed", "ext.tag-echo"}, output
    assert status == 0


ERRORS = {c.id for c in catalogue.CATALOGUE if c.group == "errors"}

SERVER_BUGS = [
    (
        standins.OneRecvServer,
        "framing,connection",
        {
            "framing.split-request",
            "framing.two-in-one",
            "framing.pipelined",
            "framing.largest-message",
            "framing.length-too-small",
            "framing.length-too-large",
            "connection.concurrent",
        },
    ),
    (standins.AlwaysStepsServer, "payload", {"payload.no-steps-unless-asked"}),
    (
        standins.PickleOnlyServer,
        "framing,payload,errors",
        {
            "framing.largest-message",  # skipped: it is a text message
            "payload.text-results",
            "payload.text-steps",
            "payload.no-steps-unless-asked",
            "payload.text-grammar",
            "payload.rand",
            "errors.division-by-zero",
        },
    ),
    (standins.EnumsByValueServer, "payload", {"payload.legacy-enums-by-name"}),
    (standins.ErrorsAre200Server, "errors,payload", ERRORS | {"payload.legacy-runs-no-code"}),
    (standins.ZeroStampServer, "header", {"header.timestamp"}),
    (standins.OneClientServer, "connection", {"connection.concurrent"}),
    (standins.UntaggedServer, "header,ext", {"ext.tag-echo"}),
]


@pytest.mark.parametrize(
    ("server_class", "only", "bugs"), SERVER_BUGS, ids=[bug[0].__name__ for bug in SERVER_BUGS]
)
def test_each_server_bug_fails_its_cases_and_only_those(tmp_path, server_class, only, bugs):
    with server_class() as server:
        status, output, document = check(tmp_path, SERVER, f"{HOST}:{server.port}", "--only", only)
    assert failed(document) == bugs, output
    assert status == expected_status(bugs)


#: The cases of what a proxy stores and serves, none of which waits.
STORAGE = ",".join(
    f"cache.{name}"
    for name in (
        "forwards",
        "miss-then-hit",
        "key-steps",
        "key-encoding",
        "nocache-request-not-served",
        "nocache-request-not-stored",
        "nocache-answer-not-stored",
        "lifetime-zero-not-stored",
        "reload",
        "rand-not-stored",
    )
)

PROXY_BUGS = [
    (standins.Proxy, f"{STORAGE},ext", {"ext.length-framed", "ext.tag-echo", "ext.hit-mark"}),
    (standins.StoresNoCacheProxy, STORAGE, {"cache.nocache-answer-not-stored"}),
    (
        standins.NoRewriteProxy,
        "cache.miss-then-hit,cache.remaining-lifetime",
        {"cache.remaining-lifetime"},
    ),
    (
        standins.KeepsForeverProxy,
        "cache.miss-then-hit,cache.lifetime-honoured,cache.remaining-lifetime,"
        "cache.request-max-age",
        {"cache.lifetime-honoured", "cache.remaining-lifetime", "cache.request-max-age"},
    ),
    (
        standins.StoresEverythingProxy,
        STORAGE,
        {
            "cache.nocache-answer-not-stored",
            "cache.lifetime-zero-not-stored",
            "cache.reload",
            "cache.rand-not-stored",
        },
    ),
    (
        standins.CachesErrorsProxy,
        f"{STORAGE},cache.server-error-not-stored,cache.down-uncached-error,"
        "cache.unreachable-not-stored",
        {
            "cache.nocache-answer-not-stored",
            "cache.server-error-not-stored",
            "cache.unreachable-not-stored",
        },
    ),
    (
        standins.HangsWhenDownProxy,
        "cache.down-serves-cached,cache.down-uncached-error",
        {"cache.down-uncached-error"},
    ),
]


@pytest.mark.parametrize(
    ("proxy_class", "only", "bugs"), PROXY_BUGS, ids=[bug[0].__name__ for bug in PROXY_BUGS]
)
def test_each_proxy_bug_fails_its_cases_and_only_those(tmp_path, proxy_class, only, bugs):
    upstream = free_port()
    with proxy_class(upstream) as proxy:
        status, output, document = check(
            tmp_path,
            PROXY,
            f"{HOST}:{proxy.port}",
            "--upstream-port",
            str(upstream),
            "--only",
            only,
        )
    assert failed(document) == bugs, output
    assert status == expected_status(bugs)


# --- the reports, as written ---------------------------------------------------------


class Sections(HTMLParser):
    """The ids of a page's sections, the text of each, and what it links to."""

    def __init__(self):
        super().__init__()
        self.text: dict[str, list[str]] = {}
        self.current: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.current = self.text.setdefault(attrs["id"], [])
        self.links.extend(v for k, v in attrs.items() if k in ("href", "src"))

    def handle_data(self, data):
        self.current.append(data)


def test_reports_name_every_case_and_show_the_bytes_of_each_failure(tmp_path):
    page = tmp_path / "report.html"
    with standins.ZeroStampServer() as server:
        target = f"{HOST}:{server.port}"
        status, output, document = check(
            tmp_path, SERVER, target, "--only", "header", "--html", str(page)
        )
    assert status == 1
    header = catalogue.select(SERVER, ["header"])
    assert document["target"] == target and document["kind"] == SERVER
    assert [(c["id"], c["title"], c["level"]) for c in document["cases"]] == [
        (c.id, c.title, c.level) for c in header
    ]
    outcomes = {c["id"]: (c["outcome"], c["detail"]) for c in document["cases"]}
    outcome, detail = outcomes.pop("header.timestamp")
    assert outcome == "fail" and detail.startswith("the answer to ") and " is stamped 0 (" in detail
    assert set(outcomes.values()) == {("pass", "")}
    assert "  FAIL  MUST    header.timestamp " in output
    assert "  pass  MUST    header.length " in output
    sections = Sections()
    sections.feed(page.read_text())
    assert list(sections.text) == [c.id for c in header]
    assert all(link.startswith("#") for link in sections.links)
    stamp = "".join(sections.text.pop("header.timestamp"))
    # What was sent and what came back, decoded and in hex.
    assert "sent: " in stamp and "received: " in stamp
    assert "message 1: time 0, length " in stamp and "0000  00 00 00 00 " in stamp
    assert not any("sent: " in "".join(text) for text in sections.text.values())


# --- a silent target, and no target --------------------------------------------------


def test_a_target_that_never_answers_fails_within_the_time_limits(tmp_path):
    with standins.SilentServer() as server:
        started = time.monotonic()
        status, output, document = check(
            tmp_path,
            SERVER,
            f"{HOST}:{server.port}",
            "--only",
            "header.answer-type,payload.legacy-runs-no-code",
        )
        took = time.monotonic() - started
    assert status == 1
    first, second = document["cases"]
    assert first["outcome"] == second["outcome"] == "fail"
    assert first["detail"].startswith("no progress within the case's limit of 3 s: waiting for")
    assert "limit cut from 6 s" in second["detail"]
    assert took < 3 + 3 + 10, output


def test_nothing_listening_is_exit_status_2(tmp_path):
    status, output, document = check(tmp_path, SERVER, f"{HOST}:{free_port()}", timeout=60)
    assert status == 2 and document is None
    assert "calc-check: cannot reach 127.0.0.1:" in output


def test_a_taken_upstream_port_is_exit_status_2(tmp_path):
    with socket.create_server((HOST, 0)) as taken:
        upstream = taken.getsockname()[1]
        status, output, _ = check(
            tmp_path, PROXY, f"{HOST}:{free_port()}", "--upstream-port", str(upstream), timeout=60
        )
    assert status == 2
    assert "the scripted upstream cannot listen" in output
