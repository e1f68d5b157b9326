"""Numbers as users write them in options, addresses and endpoint strings:
ASCII digits only, as in a Python literal. ``int()`` and ``float()`` alone
would also take the digits of other scripts (``١٢``, fullwidth ones),
blanks around the number, underscores between digits, and ``inf`` or
``nan``."""

from __future__ import annotations

import math
import re

_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def integer(text: str) -> int:
    """A whole number in ASCII digits, with an optional sign (``-1``, ``9998``);
    ValueError ``not a number: ...`` otherwise."""
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"not a number: {text!r}")
    try:
        return int(text)
    except ValueError:  # past Python's limit of 4,300 digits
        raise ValueError(f"number too long: {len(text)} characters") from None


def decimal(text: str) -> float:
    """A finite number in ASCII digits, with an optional sign, decimal point
    and exponent (``0.5``, ``10``, ``1e-3``); ValueError otherwise."""
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"not a number: {text!r}")
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range: {text!r}")
    return value
