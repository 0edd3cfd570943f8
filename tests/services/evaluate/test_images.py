"""`cofeat eval` reads image_uris through the reader: refused and bomb images are black
tiles, read in little memory, and never stop the run."""

from __future__ import annotations

import numpy as np
from PIL import Image

from services.evaluate.evaluate import Catalog, read_images
from shared.images import ImageReader
from shared.settings import Settings
from tests.bombs import jpeg_bomb, peak_rss_growth, png_bomb


def test_bombs_and_refused_uris_are_black_tiles(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (250, 0, 0)).save(images / "ok.png")
    Image.new("RGB", (40, 40), (250, 0, 0)).save(tmp_path / "outside.png")
    uris = [str(images / "ok.png"), str(png_bomb(images / "b.png")),
            str(jpeg_bomb(images / "b.jpg")), str(tmp_path / "outside.png")]
    reader = ImageReader.from_settings(Settings(data_dir=tmp_path))
    catalog = Catalog(np.arange(4), uris, np.zeros(4, int), np.zeros(4, int), reader)
    out = []
    grown = peak_rss_growth(lambda: out.append(read_images(catalog, np.arange(4), 16)))
    pixels = out[0]
    assert pixels[0].max() == 250 and not pixels[1:].any()
    assert grown < 100 * 1024 * 1024, grown
