"""Figures in words, the same way in options, the start-up line, the stats
line and the status page: byte sizes (``64M``), durations and counts."""

from __future__ import annotations

from ..transport.numerals import decimal

#: The suffixes a size takes, in powers of 1024 (``--cache-size 64M``).
_SCALES = (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))


def parse_size(text: str) -> int:
    """A byte count with an optional K, M or G suffix (powers of 1024)."""
    scale = dict(_SCALES).get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(decimal(number) * scale)
    except (ValueError, OverflowError):  # OverflowError: 1e308G is past a float
        raise ValueError(f"not a size: {text!r} (use e.g. 512K, 64M, 1G)") from None
    if value < 0:
        raise ValueError("a size cannot be negative")
    return value


def format_size(size: float) -> str:
    """A byte count as `parse_size` takes it when it is a whole number of
    K, M or G (``64M``), else to one decimal (``1.5M``), or in bytes below 1K."""
    for suffix, scale in _SCALES:
        if size >= scale:
            whole = size % scale == 0
            return f"{size // scale:.0f}{suffix}" if whole else f"{size / scale:.1f}{suffix}"
    return f"{size:.0f} bytes"


def seconds(value: float) -> str:
    """A duration in seconds as options take it: ``0.5 s``, ``60 s``."""
    return f"{value:g} s"


def plural(count: int, noun: str, many: str = "") -> str:
    """``1 request``, ``2 requests`` (``many``: the plural when it is not
    the noun and an s, as in ``misses``)."""
    return f"{count} {noun}" if count == 1 else f"{count} {many or noun + 's'}"
