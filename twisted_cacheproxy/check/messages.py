"""Requests as the cases send them and answers as they judge them: building
a request in either encoding (pickles exactly as the course client writes
them), reading an answer's payload, and the expectations that raise
`Failed` with a message a student can act on."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..calculator import codec
from ..calculator.codec import legacy as pickles
from ..calculator.codec.base import brief
from ..calculator.expression import Real, evaluate
from ..calculator.parser import parse
from ..transport import wire
from .probe import Frame
from .verdicts import Failed

STATUS_WORDS = {200: "200 (success)", 400: "400 (client error)", 500: "500 (server error)"}


@dataclass(frozen=True)
class Request:
    """One request message and how the report names it."""

    frame: bytes
    label: str
    encoding: str = codec.TEXT
    #: The exact result it must get, when the case knows it.
    expected: Real | None = None
    #: The exact steps it must get (S=1), when the case knows them.
    steps: list[str] | None = field(default=None)

    @property
    def header(self) -> wire.Header:
        return wire.decode_header(self.frame)

    @property
    def data(self) -> bytes:
        return self.frame[wire.HEADER_SIZE :]


def request(
    expression: str,
    *,
    legacy: bool = False,
    steps: bool = False,
    cache: bool = True,
    max_age: int = wire.FOREVER,
    flags: int = 0,
    ext: int = 0,
    expected: Real | None = None,
    known: bool = True,
    enums_by_name: bool = False,
) -> Request:
    """The request for a text ``expression``, in the text encoding or pickled
    as the course client pickles it (``enums_by_name``: on a Python that
    pickles enum members by name); ``flags`` are ORed into the flags word.
    With ``known`` its exact result is worked out here, unless ``expected``
    gives it."""
    encoding = codec.LEGACY if legacy else codec.TEXT
    if legacy:
        data = pickles.encode_request(parse(expression), enums_by_name=enums_by_name)
    else:
        data = expression.encode()
    if expected is None and known:
        expected = evaluate(parse(expression))
    word = wire.make_flags(request=True, cache=cache, steps=steps) | flags
    frame = wire.encode(int(time.time()), word, max_age, data, ext)
    pickled = "pickled, enums by name" if enums_by_name else "pickled"
    marks = [pickled if legacy else "text", f"S={int(steps)}", f"C={int(cache)}"]
    if cache and max_age != wire.FOREVER:
        marks.append(f"max-age {max_age}")
    if flags:
        marks.append(f"flags word {word:#06x}")
    if ext:
        marks.append(f"bytes 10-11 {ext:#06x}")
    return Request(frame, f"{expression!r} ({', '.join(marks)})", encoding, expected)


def raw(frame: bytes, label: str) -> Request:
    """A message built by hand (a broken one, say)."""
    return Request(frame, label, codec.encoding_of(frame[wire.HEADER_SIZE :]))


# --- the six standard expressions ---------------------------------------------------


@dataclass(frozen=True)
class Vector:
    """One of the six standard expressions with its exact result and steps."""

    text: str
    result: Real
    steps: list[str]


def vectors() -> list[Vector]:
    """The six standard expressions (PROTOCOL.md 4, protocol-vectors.json)."""
    document = json.loads(resources.files(__package__).joinpath("vectors.json").read_text())
    kinds = {"int": int, "float": float}
    return [
        Vector(v["text"], kinds[v["result_type"]](v["result_repr"]), v["steps"])
        for v in document["vectors"]
    ]


def vector_request(vector: Vector, *, legacy: bool = False, steps: bool = False) -> Request:
    """A standard expression as the course client sends it (C=1, any age)."""
    r = request(vector.text, legacy=legacy, steps=steps, expected=vector.result)
    return Request(r.frame, r.label, r.encoding, vector.result, vector.steps if steps else None)


# --- reading answers -------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """An answer's payload: a result and its steps, or an error."""

    value: Any = None
    steps: list[str] | None = None
    error_kind: str | None = None
    error_message: str | None = None

    @property
    def error(self) -> str | None:
        if self.error_kind is None:
            return None
        return f"{self.error_kind}: {self.error_message}"


def preview(data: bytes, size: int = 100) -> str:
    """The start of some bytes, for a message."""
    shown = repr(data[:size])
    return shown + (f"... ({len(data)} bytes)" if len(data) > size else "")


def read(frame: Frame, req: Request) -> Reading:
    """The payload of an answer to ``req``, which must be in ``req``'s
    encoding (PROTOCOL.md 3) and of the documented shape."""
    data = frame.data
    if req.encoding == codec.LEGACY:
        if codec.encoding_of(data) != codec.LEGACY:
            raise Failed(
                f"the answer to {req.label} is not a pickle: an answer uses the encoding of "
                f"its request (PROTOCOL.md 3), so a course client could not read {preview(data)}"
            )
        try:
            answer = pickles.decode_answer(data)
        except codec.RemoteError as e:
            if e.kind == "UnreadableAnswer":
                raise Failed(
                    f"the pickled answer to {req.label} cannot be read: {e.message}"
                ) from None
            return Reading(error_kind=e.kind, error_message=e.message)
        if type(answer) is not tuple or len(answer) != 2 or not _strings(answer[1]):
            raise Failed(
                f"the pickled answer to {req.label} must be a tuple (result, [steps...]) "
                f"(PROTOCOL.md 3.2), not {brief(answer)}"
            )
        return Reading(value=answer[0], steps=answer[1])
    try:
        answer = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        raise Failed(
            f"the answer to {req.label} is not UTF-8 JSON (PROTOCOL.md 3.1: a text request "
            f"gets a JSON answer): {preview(data)}"
        ) from None
    if not isinstance(answer, dict):
        answer = {}
    if isinstance(answer.get("error"), str) and isinstance(answer.get("type"), str):
        return Reading(error_kind=answer["type"], error_message=answer["error"])
    if "result" in answer and "steps" in answer:
        value = answer["result"]
        if value in ("inf", "-inf", "nan"):
            value = float(value)
        if type(value) in (int, float) and _strings(answer["steps"]):
            return Reading(value=value, steps=answer["steps"])
    raise Failed(
        f"the answer to {req.label} is not of the documented shape (PROTOCOL.md 3.1): "
        f'{{"result": <number>, "steps": [<string>, ...]}} or {{"error": "<message>", '
        f'"type": "<kind>"}}, not {preview(data)}'
    )


def _strings(steps: Any) -> bool:
    return type(steps) is list and all(type(s) is str for s in steps)


# --- expectations -----------------------------------------------------------------------


def shown(value: Any) -> str:
    """A number with its type, as a student reads it."""
    if type(value) in (int, float):
        return f"{value!r} ({type(value).__name__})"
    return brief(value)


def same_number(a: Any, b: Any) -> bool:
    """Equal in value and in type, bit for bit (PROTOCOL.md 4)."""
    if type(a) is not type(b) or type(a) not in (int, float):
        return False
    return repr(a) == repr(b) or (type(a) is float and math.isnan(a) and math.isnan(b))


def status_of(frame: Frame) -> str:
    status = frame.header.status
    return STATUS_WORDS.get(status, f"{status} (not one of 200, 400, 500)")


def expect_result(frame: Frame, req: Request) -> Reading:
    """``frame`` must be a 200 carrying ``req``'s expected result (and its
    expected steps, when it asked for them)."""
    reading = read(frame, req)
    if frame.header.status != wire.OK or reading.error is not None:
        got = f"status {status_of(frame)}"
        if reading.error is not None:
            got += f" with the error {reading.error}"
        raise Failed(f"{req.label} must get status 200 with {shown(req.expected)}; got {got}")
    if req.expected is not None and not same_number(reading.value, req.expected):
        raise Failed(f"{req.label} must give {shown(req.expected)}, not {shown(reading.value)}")
    if req.steps is not None:
        expect_steps(frame, req, reading)
    return reading


def expect_steps(frame: Frame, req: Request, reading: Reading) -> None:
    if not frame.header.steps:
        raise Failed(f"the answer to {req.label} must have S=1: steps were asked and sent")
    want, got = req.steps or [], reading.steps or []
    for n, (w, g) in enumerate(zip(want, got, strict=False), 1):
        if w != g:
            raise Failed(
                f"step {n} of {req.label} must be {w!r}, not {g!r} (PROTOCOL.md 4 gives "
                f"every step exactly)"
            )
    if len(want) != len(got):
        raise Failed(f"{req.label} must have {len(want)} steps, not {len(got)}: {got!r}")


def expect_error(frame: Frame, req: Request, why: str, status: int = wire.BAD_REQUEST) -> Reading:
    """``frame`` must be an error answer of ``status`` in ``req``'s encoding;
    ``why`` says why the request is an error."""
    if frame.header.status != status:
        raise Failed(
            f"{req.label} is {why}: it must get status {STATUS_WORDS[status]}, "
            f"not {status_of(frame)}"
        )
    reading = read(frame, req)
    if reading.error is None:
        raise Failed(
            f"the {status} answer to {req.label} must carry an error (PROTOCOL.md 3), not the "
            f"result {shown(reading.value)}"
        )
    return reading
