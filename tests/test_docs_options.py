"""docs/running.md documents every option of ``twistd cacheserver`` and
``twistd cacheproxy``: each plugin's table names exactly the options its
`usage.Options` class takes (``optParameters``, ``optFlags`` and ``opt_``
methods, short forms included), with their defaults, so that an option
cannot be added, renamed or given a new default without the page."""

from __future__ import annotations

import re

import pytest
from helpers import ROOT
from twisted.python import usage

from twisted_cacheproxy.application.options import ProxyOptions, ServerOptions

PAGE = ROOT / "docs" / "running.md"


def table_rows(heading: str) -> dict[str, list[str]]:
    """The first table under ``heading`` in docs/running.md: each option the
    first cell names (``--name``, ``-x``), with the row's cells."""
    text = PAGE.read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `-"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        for name in re.findall(r"`(--?[a-z][a-z-]*)", cells[0]):
            rows[name] = cells
    return rows


def documented(options: usage.Options) -> dict[str, str]:
    """Each option the class takes, long and short, with its long name
    (Twisted gathers ``optParameters``, ``optFlags`` and ``opt_`` methods
    into ``synonyms``)."""
    return {
        ("-" if len(name) == 1 else "--") + name: long for name, long in options.synonyms.items()
    }


def default_text(value: object) -> str:
    """A default as the page writes it: ``15`` for 15.0, ``64M`` as it is."""
    return f"{value:g}" if isinstance(value, float) else str(value)


PLUGINS = [
    ("## The server: `twistd cacheserver`", ServerOptions),
    ("## The proxy: `twistd cacheproxy`", ProxyOptions),
]


@pytest.mark.parametrize(("heading", "cls"), PLUGINS, ids=["cacheserver", "cacheproxy"])
def test_every_option_is_in_its_table_and_nothing_else(heading, cls):
    rows = table_rows(heading)
    names = documented(cls())
    assert sorted(rows) == sorted(names)
    for name, long in names.items():
        if len(name) == 2:  # a short form shares its long form's row
            assert rows[name] is rows[f"--{long}"]


@pytest.mark.parametrize(("heading", "cls"), PLUGINS, ids=["cacheserver", "cacheproxy"])
def test_each_default_is_the_one_in_the_table(heading, cls):
    rows = table_rows(heading)
    options = cls()
    shown, expected = {}, {}
    for long in set(documented(options).values()):
        # the default cell's first words: `cacheproxy:`, 0 (off), 64M
        shown[long] = rows[f"--{long}"][1].strip("`").split("`")[0].split(" (")[0]
        value = options.defaults.get(long)
        if long in ("help", "version"):
            expected[long] = ""
        elif value is None:  # repeatable, or nothing unless given
            expected[long] = shown[long] if shown[long] in ("none", "off") else "none or off"
        elif f"{long}=" not in options.longOpt:  # a flag
            expected[long] = "off"
        else:
            expected[long] = default_text(value)
    assert shown == expected
