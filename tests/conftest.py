"""Shared fixtures: the protocol vectors and the course-style `calculator` stand-ins."""

from __future__ import annotations

import json
import pathlib

import pytest

HERE = pathlib.Path(__file__).parent
VECTORS = json.loads((HERE / "data" / "protocol-vectors.json").read_text())["vectors"]


@pytest.fixture(params=VECTORS, ids=lambda v: v["text"])
def vector(request):
    """One of the six standard expressions with its exact result and steps."""
    return request.param
