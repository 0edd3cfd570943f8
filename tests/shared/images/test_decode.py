"""Decoding under COFEAT_IMAGE_MAX_PIXELS: bombs refused from the header, large JPEGs
decoded at reduced scale, only common web formats parsed."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shared.images import NotAnImage, TooManyPixels, decode
from tests.bombs import jpeg_bomb, peak_rss_growth, png_bomb

MB = 1024 * 1024
LIMIT = 25_000_000


@pytest.mark.parametrize("make", [png_bomb, jpeg_bomb], ids=["png", "jpeg"])
def test_bombs_are_refused_from_the_header_in_little_memory(make, tmp_path):
    data = make(tmp_path / "bomb").read_bytes()
    assert len(data) < 600_000  # small files...
    refused = []

    def attempt():
        with pytest.raises(TooManyPixels) as error:
            decode(data, 64, LIMIT)
        refused.append(error.value.reason)

    assert peak_rss_growth(attempt) < 20 * MB  # ...that would take 0.5 to 10 GB as pixels
    assert refused[0].startswith("too many pixels")


def test_a_large_jpeg_decodes_in_draft_mode(tmp_path):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=80)
    data = buffer.getvalue()
    del photo
    img = decode(data, 64, LIMIT)
    assert img.mode == "RGB" and min(img.size) >= 128 and img.size[0] <= 4000 // 8 * 2
    # 12 MP at full size would be 36 MB as RGB; at 1/8 scale it is about half a megabyte.
    assert peak_rss_growth(lambda: decode(data, 64, LIMIT)) < 20 * MB


def test_large_pngs_are_reduced_before_conversion(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGBA", (2000, 1000), (0, 0, 255, 0)).save(buffer, "PNG")
    img = decode(buffer.getvalue(), 32, LIMIT)
    assert img.mode == "RGB" and img.size == (134, 67)  # 1/15: 2 x 32 px or more
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent goes on white


def test_only_web_formats_are_parsed():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    for data in (eps, b"", b"GIF89a", b"\x89PNG\r\n\x1a\nnot really"):
        with pytest.raises(NotAnImage):
            decode(data, 32, LIMIT)
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buffer, "TIFF")
    with pytest.raises(NotAnImage):
        decode(buffer.getvalue(), 32, LIMIT)


def test_truncated_images_are_not_images(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200), "green").save(buffer, "PNG")
    with pytest.raises(NotAnImage):
        decode(buffer.getvalue()[:300], 32, LIMIT)
