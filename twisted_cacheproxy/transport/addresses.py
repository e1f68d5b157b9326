"""Network addresses as users write them: ``HOST:PORT``, with an IPv6
address in brackets (``[::1]:9999``), the same rule for every option and
every message."""

from __future__ import annotations

import ipaddress
import os

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress

from .numerals import integer


def address(host: str, port: int) -> str:
    """``host:port`` as users write it (``[::1]:9999`` for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def in_words(where: IAddress) -> str | None:
    """A Twisted address as the logs show it: ``127.0.0.1:9998``,
    ``[::1]:9998``, ``unix:/run/cacheproxy.sock``; None for other kinds."""
    if isinstance(where, (IPv4Address, IPv6Address)):
        return address(where.host, where.port)
    if isinstance(where, UNIXAddress):
        return "unix:" + (os.fsdecode(where.name) if where.name is not None else "?")
    return None


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9999`` for IPv6) as a (host, port) pair;
    ValueError saying what is wrong otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"not HOST:PORT: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port}")
    return host, parse_port(port)


def parse_port(text: str) -> int:
    """A TCP port number, 1..65535 in ASCII digits; ValueError saying what is
    wrong otherwise."""
    try:
        number = integer(text)
    except ValueError:
        raise ValueError(f"not a port number: {text!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"port must be 1..65535, not {number}")
    return number


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an address, or the name ``localhost``) is this
    host's loopback; any other name may resolve anywhere, so it is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
