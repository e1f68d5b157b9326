"""The project's files agree with the package and with each other: the
version in the package, setup.cfg and the changelog, the licence, and the
twistd examples of docs/running.md; and the tests' own rules: a missing tool skips a
test on a developer's machine but fails it in CI, and the hypothesis
profile runs the full example counts in CI and a fifth of them elsewhere."""

from __future__ import annotations

import shutil

import pytest
from helpers import ROOT, doc_commands, examples, hypothesis_profile, require_tool
from hypothesis import settings


def test_package_version_is_the_distributions():
    from importlib.metadata import version

    import twisted_cacheproxy

    assert twisted_cacheproxy.__version__ == version("twisted-cacheproxy")
    assert "version = " + twisted_cacheproxy.__version__ in (ROOT / "setup.cfg").read_text()


def test_license_and_changelog_match_the_release():
    from importlib.metadata import version

    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n")
    assert "Copyright (c) the twisted-cacheproxy developers" in license_text
    assert "license = MIT" in (ROOT / "setup.cfg").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text().splitlines()
    assert f"## {version('twisted-cacheproxy')}" in changelog
    assert next(line for line in changelog if line.startswith("## ")) == (
        f"## {version('twisted-cacheproxy')}"
    )


def test_running_page_twistd_examples_never_share_a_pid_file():
    """Two twistd started from one directory must not both write twistd.pid:
    every example of docs/running.md that starts a service names its pid
    file (``--pidfile=`` for none), and the daemons' are server.pid and proxy.pid."""
    commands = doc_commands("docs/running.md", "twistd")
    services = [c for c in commands if not {"--help", "--version"} & set(c.split())]
    assert len(services) >= 10
    assert [c for c in services if "--pidfile" not in c] == []
    pidfiles = {c.split("--pidfile")[1].split()[0].lstrip("=") for c in services}
    assert pidfiles - {""} == {"server.pid", "proxy.pid"}


def test_require_tool_skips_but_fails_in_ci(monkeypatch):
    def require_tshark() -> str:
        return require_tool("tshark", "tshark tcpdump", "the Wireshark tests")

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="tshark is not installed"):
        require_tshark()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the Wireshark tests"):
        require_tshark()
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert require_tshark() == "/usr/bin/tshark"


@pytest.mark.parametrize(
    ("environment", "profile"),
    [
        ({}, "dev"),
        ({"CI": "true"}, "ci"),
        ({"CI": "true", "HYPOTHESIS_PROFILE": "dev"}, "dev"),
        ({"HYPOTHESIS_PROFILE": "ci"}, "ci"),
    ],
)
def test_hypothesis_profile_is_ci_in_ci_and_dev_elsewhere(monkeypatch, environment, profile):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert hypothesis_profile() == profile


def test_examples_are_the_full_count_under_ci_and_a_fifth_under_dev():
    try:
        settings.load_profile("ci")
        assert (examples(300), examples(100), settings().derandomize) == (300, 100, True)
        settings.load_profile("dev")
        assert (examples(300), examples(100), settings().derandomize) == (60, 20, False)
    finally:
        settings.load_profile(hypothesis_profile())
