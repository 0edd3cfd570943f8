"""A real HTTP server on loopback with the routes of tests/imageserver.py."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.bombs import jpeg_bomb, png_bomb
from tests.conftest import free_port
from tests.imageserver import ImageServer


@pytest.fixture(scope="session")
def image_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("served")
    Image.new("RGB", (64, 48), (10, 200, 30)).save(directory / "ok.png")
    Image.new("RGB", (64, 48), (200, 10, 30)).save(directory / "other.png")
    png_bomb(directory / "bomb.png")
    jpeg_bomb(directory / "bomb.jpg")
    server = ImageServer(free_port(), directory)
    yield server
    server.close()
