"""One tiny world per session: building it is cheap, but every test reuses the same events."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.simulate.behaviour import generate
from services.simulate.stream import Encoder
from services.simulate.world import build_world, preset


@pytest.fixture(scope="session")
def tiny_world():
    return build_world(preset("tiny"))


@pytest.fixture(scope="session")
def tiny_chunks(tiny_world):
    return list(generate(tiny_world))


@pytest.fixture(scope="session")
def tiny_records(tiny_world, tiny_chunks):
    encoder = Encoder(tiny_world, Path("/data/images"), "png")
    return [record for chunk in tiny_chunks for record in encoder.records(chunk)]
