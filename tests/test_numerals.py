"""Numbers as users write them (`transport.numerals`), and every place that
reads one from a user: ports, endpoint strings, sizes. ASCII digits only, as
in a Python literal: ``int()`` and ``float()`` alone take other scripts'
digits, blanks, underscores, ``inf`` and ``nan``."""

from __future__ import annotations

import pytest

from twisted_cacheproxy.operations.units import parse_size
from twisted_cacheproxy.transport import numerals
from twisted_cacheproxy.transport.addresses import parse_address, parse_port

#: What ``int()`` or ``float()`` would take but a user's number is not.
NOT_ASCII_NUMBERS = [
    "١٢",  # Arabic-Indic digits
    "\uff11\uff12",  # fullwidth digits
    "\u0967",  # Devanagari one
    " 12",
    "12 ",
    "12\n",
    "1_2",
    "",
    "+",
    "0x10",
]


def test_what_int_and_float_alone_would_take():
    assert (int("١٢"), int("\uff11\uff12"), int(" 1_2\n"), float("nan") != float("nan")) == (
        12,
        12,
        12,
        True,
    )


@pytest.mark.parametrize("text", NOT_ASCII_NUMBERS)
def test_integer_takes_ascii_digits_only(text):
    with pytest.raises(ValueError, match=r"^not a number: "):
        numerals.integer(text)


@pytest.mark.parametrize("text", [*NOT_ASCII_NUMBERS, "inf", "-inf", "nan", "Infinity", "1e", "."])
def test_decimal_takes_ascii_digits_only(text):
    with pytest.raises(ValueError, match=r"^not a number: "):
        numerals.decimal(text)


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("9998", 9998), ("-1", -1), ("+5", 5), ("007", 7)]
)
def test_integer(text, value):
    assert numerals.integer(text) == value


def test_integer_past_pythons_digit_limit_is_refused_in_words():
    with pytest.raises(ValueError, match=r"^number too long: 5000 characters$"):
        numerals.integer("1" * 5000)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0.5", 0.5), ("10", 10.0), ("1e-3", 0.001), ("-2.", -2.0), (".25", 0.25), ("1E2", 100.0)],
)
def test_decimal(text, value):
    assert numerals.decimal(text) == value


def test_decimal_out_of_range():
    with pytest.raises(ValueError, match=r"^number out of range: '1e400'$"):
        numerals.decimal("1e400")


@pytest.mark.parametrize("text", ["٩٩٩٩", "\uff19\uff19\uff19\uff19", " 9999", "9_999", "+"])
def test_a_port_is_ascii_digits(text):
    with pytest.raises(ValueError, match=r"^not a port number: "):
        parse_port(text)
    with pytest.raises(ValueError, match=r"^not a port number: "):
        parse_address(f"127.0.0.1:{text}")


def test_parse_address():
    assert parse_address("[::1]:9999") == ("::1", 9999)
    assert parse_address("localhost:1") == ("localhost", 1)
    with pytest.raises(ValueError, match=r"^port must be 1\.\.65535, not 0$"):
        parse_address("localhost:0")


def test_the_endpoint_string_takes_ascii_digits_only():
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    with pytest.raises(ValueError, match=r"^not a number: '٩٩٩٩'$"):
        serverFromString(reactor, "sendatonce:٩٩٩٩")
    with pytest.raises(ValueError, match=r"^not a number: '5_11'$"):
        serverFromString(reactor, "sendatonce:9999:backlog=5_11")


@pytest.mark.parametrize(
    ("text", "size"),
    [("64M", 64 << 20), ("512k", 512 << 10), ("1.5K", 1536), ("1G", 1 << 30), ("100", 100)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    ["\uff16\uff14M", "٦٤M", " 64M", "6_4M", "inf", "nanM", "1e400", "1e308G", "M", "64 M"],
)
def test_parse_size_refuses_what_is_not_an_ascii_size(text):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == f"not a size: {text!r} (use e.g. 512K, 64M, 1G)"
