"""Consistent hashing of keys over cache nodes, the way ketama does it.

Every node gets many points on a ring of 32-bit numbers (160 by default:
40 md5 digests of ``"<name>-<i>"``, four points from each); a key belongs to
the first point at or after the md5 of the key, wrapping round. Adding or
losing a node moves only the keys whose points it owned, so the other
nodes' entries stay where every proxy looks for them.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Sequence
from typing import Generic, TypeVar

N = TypeVar("N")

#: Points per node: libketama's 40 digests x 4 points each.
POINTS = 160


def _points(digest: bytes) -> list[int]:
    """The four ring points in one md5 digest (little-endian, as ketama reads them)."""
    return [int.from_bytes(digest[i : i + 4], "little") for i in (0, 4, 8, 12)]


def key_point(key: bytes) -> int:
    """Where ``key`` falls on the ring."""
    return _points(hashlib.md5(key).digest())[0]


class Ring(Generic[N]):
    """Nodes placed on a ketama ring; `node_for` picks the one owning a key.

    ``names`` identify the nodes on the ring (``"host:port"``): every proxy
    given the same names places the same keys on the same nodes, whatever
    order the names came in.
    """

    def __init__(self, nodes: Sequence[N], names: Sequence[str], points: int = POINTS) -> None:
        if len(nodes) != len(names):
            raise ValueError("one name per node")
        if not nodes:
            raise ValueError("a ring needs at least one node")
        if len(set(names)) != len(names):
            raise ValueError("node names must be distinct")
        ring: list[tuple[int, str, int]] = []
        for index, name in enumerate(names):
            for i in range(points // 4):
                digest = hashlib.md5(f"{name}-{i}".encode()).digest()
                ring.extend((point, name, index) for point in _points(digest))
        # Ties (astronomically rare) go to the smaller name, on every proxy alike.
        ring.sort()
        self.nodes = list(nodes)
        self._points = [point for point, _, _ in ring]
        self._owners = [index for _, _, index in ring]

    def node_for(self, key: bytes) -> N:
        """The node that owns ``key``."""
        at = bisect_left(self._points, key_point(key))
        if at == len(self._points):
            at = 0
        return self.nodes[self._owners[at]]
