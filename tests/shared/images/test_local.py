"""Local image_uris: only regular files inside COFEAT_IMAGE_ROOTS, one reason for every
refusal, whether or not something exists where the URI points."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from PIL import Image

from shared.images import REFUSED, ImageError, ImageReader, NotFound
from shared.settings import Settings


@pytest.fixture
def layout(tmp_path):
    """data/images/ (the default root) with one image, and things around it."""
    data = tmp_path / "data"
    images = data / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(images / "ok.png")
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "secret.png")  # outside the root
    (images / "escape.png").symlink_to(tmp_path / "secret.png")
    (images / "escape-missing.png").symlink_to(tmp_path / "missing.png")
    (images / "inside-link.png").symlink_to(images / "ok.png")
    os.mkfifo(images / "fifo.png")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(images / "socket.png"))
    yield data, images, tmp_path
    unix.close()


def reason(reader: ImageReader, uri: str) -> str:
    try:
        reader.read(uri)
    except ImageError as error:
        return error.reason
    return "read"


def test_attacks_on_local_roots_all_get_one_reason(layout):
    data, images, outside = layout
    reader = ImageReader.from_settings(Settings(data_dir=data, image_cache_bytes=0))
    attacks = [
        str(outside / "secret.png"),  # a file outside the roots
        str(outside / "missing.png"),  # ... and one that does not exist there
        str(images / ".." / ".." / "secret.png"),  # traversal
        "images/../../secret.png", "../../../../etc/hostname",  # relative traversal
        str(images / "escape.png"), str(images / "escape-missing.png"),  # symlinks out
        str(images / "fifo.png"),  # would block a plain open() for as long as it stays open
        str(images / "socket.png"), str(images / "sub"),  # not regular files
        "file://attacker.example/etc/hostname", f"file://{outside}/secret.png",
        "/etc/hostname", "/dev/zero", "", "images/ok.png\x00.txt",
    ]
    assert {uri: reason(reader, uri) for uri in attacks} == {uri: REFUSED for uri in attacks}
    assert reason(reader, str(images / "ok.png")) == "read"
    assert reason(reader, "images/ok.png") == "read"  # relative to COFEAT_DATA_DIR
    assert reason(reader, str(images / "inside-link.png")) == "read"  # stays inside
    assert reason(reader, f"file://{images}/ok.png") == "read"
    assert reason(reader, f"file://localhost{images}/ok.png") == "read"
    with pytest.raises(NotFound):  # inside a root, a missing file is only missing
        reader.read(str(images / "nope.png"))


def test_a_device_inside_a_root_is_refused_too(layout):
    data, images, _ = layout
    reader = ImageReader.from_settings(Settings(data_dir=data, image_roots=f"{images},/dev",
                                                image_cache_bytes=0))
    for device in ("/dev/zero", "/dev/null", "/dev/urandom"):
        assert reason(reader, device) == REFUSED


def test_a_fifo_never_blocks_the_reader(layout):
    """Issue 14: a FIFO as image_uri held the embedder's loop for as long as it was open."""
    data, images, _ = layout
    reader = ImageReader.from_settings(Settings(data_dir=data, image_cache_bytes=0))
    done = threading.Event()
    thread = threading.Thread(target=lambda: (reason(reader, str(images / "fifo.png")),
                                              done.set()), daemon=True)
    thread.start()
    assert done.wait(10), "reading a FIFO blocked"


def test_several_roots_and_a_symlinked_root(layout, tmp_path):
    data, images, outside = layout
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "x.png")
    (tmp_path / "alias").symlink_to(other)  # a root named through a symlink
    reader = ImageReader.from_settings(Settings(
        data_dir=data, image_roots=f"{images},{tmp_path / 'alias'}", image_cache_bytes=0))
    assert reason(reader, str(other / "x.png")) == "read"
    assert reason(reader, str(tmp_path / "alias" / "x.png")) == "read"
    # A root is a directory, not a prefix of names: "images-private" is not under "images".
    (data / "images-private").mkdir()
    Image.new("RGB", (8, 8)).save(data / "images-private" / "y.png")
    assert reason(reader, str(data / "images-private" / "y.png")) == REFUSED


def test_size_is_enforced_while_reading(layout):
    data, images, _ = layout
    (images / "big.png").write_bytes(b"\0" * 5000)
    reader = ImageReader.from_settings(Settings(data_dir=data, image_max_bytes=4096,
                                                image_cache_bytes=0))
    assert reason(reader, str(images / "big.png")).startswith("too large")
