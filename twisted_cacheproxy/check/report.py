"""The report card in three forms: lines on the terminal as cases finish
(grouped, with a summary line), a JSON document, and one self-contained
HTML page that shows, for each failure, every byte sent and received, in
hex and decoded."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from twisted.web.template import Tag, flattenString, tags

from ..calculator import codec
from ..calculator.codec import legacy
from ..calculator.codec.base import brief
from ..calculator.expression import CalculationError, format_node
from ..transport import wire
from .case import LEVELS, MUST, Case
from .probe import RECEIVED, SENT, UPSTREAM, Frame, Transcript, split_frames
from .runner import FAIL, PASS, SKIP, Result

WIDTH = 100
_MARKS = {PASS: "pass", FAIL: "FAIL", SKIP: "skip"}


# --- counting -----------------------------------------------------------------------


def tally(results: Iterable[Result]) -> dict[str, dict[str, int]]:
    """Outcomes counted by level: ``{"MUST": {"pass": 3, "fail": 1, "skip": 0}, ...}``."""
    counts = {level: dict.fromkeys((PASS, FAIL, SKIP), 0) for level in LEVELS}
    for r in results:
        counts[r.case.level][r.outcome] += 1
    return counts


def must_failures(results: Iterable[Result]) -> list[str]:
    return [r.case.id for r in results if r.case.level == MUST and r.outcome == FAIL]


def summary(results: list[Result]) -> str:
    """One line: passes per level, skips, and the verdict."""
    counts = tally(results)
    parts = []
    for level in LEVELS:
        c = counts[level]
        ran = c[PASS] + c[FAIL]
        if ran:
            parts.append(f"{level} {c[PASS]}/{ran} passed")
    skipped = sum(c[SKIP] for c in counts.values())
    line = ", ".join(parts) or "no case ran"
    if skipped:
        line += f", {skipped} skipped"
    failed = must_failures(results)
    if failed:
        return f"{line}: FAIL, {len(failed)} MUST case(s) failed ({', '.join(failed)})"
    return f"{line}: every MUST case passed"


# --- the terminal -------------------------------------------------------------------


class Terminal:
    """Writes each result as it comes, under its group's name."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self._group: str | None = None

    def __call__(self, result: Result) -> None:
        case = result.case
        if case.group != self._group:
            self._group = case.group
            self.write(f"\n{case.group}\n")
        mark = _MARKS[result.outcome]
        self.write(f"  {mark:4}  {case.level:6}  {case.id:34} {case.title}\n")
        if result.outcome != PASS and result.detail:
            self.write(_indented(result.detail))
        if result.outcome == FAIL and case.hint:
            self.write(_indented(f"hint: {case.hint}"))

    def finish(self, results: list[Result]) -> None:
        self.write(f"\n{summary(results)}\n")


def _indented(text: str) -> str:
    return textwrap.fill(text, WIDTH, initial_indent=" " * 16, subsequent_indent=" " * 16) + "\n"


def listing(cases: Iterable[Case]) -> str:
    """The catalogue as a table: ID, level, kinds of target, section, time
    limit and title."""
    rows = [("ID", "LEVEL", "FOR", "SECTION", "LIMIT", "TITLE")]
    for c in cases:
        kinds = ",".join(sorted(c.kinds, reverse=True))
        rows.append((c.id, c.level, kinds, c.section, f"{c.limit:g}s", c.title))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)) + f"  {row[5]}\n"
        for row in rows
    )


# --- JSON ---------------------------------------------------------------------------


def as_json(target: str, kind: str, results: list[Result]) -> str:
    """The JSON report: ``target``, ``kind``, ``summary`` and one object per case."""
    document = {
        "target": target,
        "kind": kind,
        "summary": tally(results),
        "cases": [
            {
                "id": r.case.id,
                "title": r.case.title,
                "level": r.case.level,
                "section": r.case.section,
                "outcome": r.outcome,
                "detail": r.detail,
                "hint": r.case.hint,
                "seconds": round(r.seconds, 3),
            }
            for r in results
        ],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


# --- HTML ---------------------------------------------------------------------------

_STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; } td, th { padding: .15em .6em; text-align: left; }
tr.pass td.outcome { color: #176f2c; } tr.fail td.outcome { color: #b00020; font-weight: bold; }
tr.skip td.outcome { color: #777; } code, pre { font: 13px/1.3 ui-monospace, monospace; }
pre { background: #f5f5f5; padding: .5em; overflow-x: auto; }
section { border-top: 1px solid #ccc; margin-top: 1.5em; }
.detail { color: #b00020; } .hint { color: #555; }
"""


def as_html(target: str, kind: str, results: list[Result]) -> str:
    """The HTML report: one page, no external assets."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"calc-check {kind} {target}"
    page = tags.html(
        tags.head(tags.meta(charset="utf-8"), tags.title(title), tags.style(_STYLE)),
        tags.body(
            tags.h1(title),
            tags.p(f"{when}. ", tags.strong(summary(results))),
            _overview(results),
            [_section(r) for r in results],
        ),
        lang="en",
    )
    out: list[bytes] = []
    flattenString(None, page).addCallback(out.append)
    return "<!DOCTYPE html>\n" + out[0].decode("utf-8")


def _overview(results: list[Result]) -> Tag:
    rows = [tags.tr(*(tags.th(h) for h in ("outcome", "level", "case", "title", "seconds")))]
    for r in results:
        rows.append(
            tags.tr(
                tags.td(r.outcome, class_="outcome"),
                tags.td(r.case.level),
                tags.td(tags.a(tags.code(r.case.id), href=f"#{r.case.id}")),
                tags.td(r.case.title),
                tags.td(f"{r.seconds:.2f}"),
                class_=r.outcome,
            )
        )
    return tags.table(*rows)


def _section(r: Result) -> Tag:
    c = r.case
    parts: list[Any] = [
        tags.h2(tags.code(c.id), f" {r.outcome}"),
        tags.p(
            f"{c.title}. Level {c.level}, PROTOCOL.md section {c.section}, "
            f"{r.seconds:.2f} s of {c.limit:g} s."
        ),
    ]
    if r.detail:
        parts.append(tags.p(r.detail, class_="detail" if r.outcome == FAIL else ""))
    parts.append(tags.p(c.hint, class_="hint"))
    if r.transcript is not None:
        parts.append(_transcript(r.transcript))
    return tags.section(*parts, id=c.id)


def _transcript(transcript: Transcript) -> list[Tag]:
    parts = []
    for name in transcript.connections():
        events = [e for e in transcript.events if e.connection == name]
        timeline = "; ".join(
            f"{e.at:.3f} s {e.what}" + (f" {len(e.data)} bytes" if e.data else "") for e in events
        )
        ours = name.startswith(UPSTREAM)
        parts.append(tags.h3(f"connection {name}" if not ours else f"{name} (scripted upstream)"))
        parts.append(tags.p(timeline))
        for what in (SENT, RECEIVED):
            stream = b"".join(e.data for e in events if e.what == what)
            if stream:
                # On the upstream's connections it receives requests and sends answers.
                requests = (what == SENT) != ours
                parts.append(tags.h4(f"{what}: {len(stream)} bytes"))
                parts.extend(_stream(stream, requests))
    return parts


def _stream(stream: bytes, requests: bool) -> list[Tag]:
    frames, rest = split_frames(stream)
    parts = []
    for n, frame in enumerate(frames, 1):
        parts.append(tags.p(f"message {n}: ", tags.code(describe(frame, requests))))
        parts.append(tags.pre(hexdump(frame.raw)))
    if rest:
        parts.append(tags.p(f"{len(rest)} bytes that are not a whole message:"))
        parts.append(tags.pre(hexdump(rest)))
    return parts


def describe(frame: Frame, request: bool) -> str:
    """A message's header fields and its data, decoded."""
    h = frame.header
    fields = (
        f"time {h.timestamp}, length {h.length}, T={int(h.request)} C={int(h.cache)} "
        f"S={int(h.steps)} status {h.status}, cache control {h.max_age}, "
        f"bytes 10-11 {h.ext:#06x}"
    )
    if h.flags & wire.RESERVED_MASK:
        fields += f", reserved bits {h.flags >> 13:03b}"
    return f"{fields}; data: {decode_data(frame.data, request)}"


def decode_data(data: bytes, request: bool) -> str:
    """Data as a person reads it: the text, or what a pickle holds."""
    if codec.encoding_of(data) == codec.TEXT:
        return repr(data.decode("utf-8", "replace")) if data else "(none)"
    try:
        if request:
            return f"pickle of {format_node(codec.decode_request(data))!r}"
        return f"pickle of {brief(legacy.decode_answer(data))}"
    except codec.RemoteError as e:
        return f"pickle of the exception {e.kind}({e.message!r})"
    except CalculationError as e:
        return f"pickle that cannot be read: {e}"


def hexdump(data: bytes, limit: int = 1024) -> str:
    """Offset, 16 bytes in hex and as ASCII per line (the first ``limit`` bytes)."""
    lines = []
    for offset in range(0, min(len(data), limit), 16):
        chunk = data[offset : offset + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:04x}  {chunk.hex(' '):47}  {text}")
    if len(data) > limit:
        lines.append(f"... {len(data) - limit} more bytes")
    return "\n".join(lines)
